"""`edgelm serve` over real sockets: the official openai client, malformed requests, auth, disconnects.

Every test talks to a uvicorn server on a free 127.0.0.1 port started in this process, serving the real
stories260K export. Expected texts are always computed by calling the same Model directly.
"""
from __future__ import annotations

import json
import logging
import secrets
import subprocess
import sys
import threading
import time

import pytest

from conftest import needs_shared

pytestmark = [needs_shared()]

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

PROMPT = "Once upon a time, there was a little girl named Lily."
MESSAGES = [{"role": "user", "content": "Tell me a story about a cat."}]
MAX_BODY = 64 * 1024


def test_import_edgelm_does_not_import_the_server_stack():
    code = ("import sys, edgelm; bad = [m for m in ('starlette', 'uvicorn', 'httpx', 'edgelm.server') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture(scope="module")
def lm(stories_int8):
    import edgelm
    return edgelm.load(stories_int8, threads=1)


@pytest.fixture(scope="module")
def server(lm):
    from edgelm.server import BackgroundServer
    with BackgroundServer(lm, workers=2, max_queue=16, max_body_bytes=MAX_BODY) as srv:
        yield srv


@pytest.fixture(scope="module")
def model_id(server):
    return next(iter(server.state.models))


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


# --- the openai client gets what model.generate gives --------------------------------------------------
@pytest.mark.slow
def test_models_list(client, lm, model_id):
    models = client.models.list()
    assert [m.id for m in models.data] == [model_id]
    assert models.data[0].owned_by == "edgelm"
    assert client.models.retrieve(model_id).id == model_id


@pytest.mark.slow
@pytest.mark.parametrize("settings", [dict(temperature=0.0), dict(temperature=0.9, top_p=0.9, seed=1234)],
                         ids=["greedy", "seeded"])
def test_completion_matches_generate(client, lm, model_id, settings):
    ref = lm.generate(PROMPT, max_new_tokens=40, **settings)
    got = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=40, **settings)
    assert got.choices[0].text == ref.text
    assert got.choices[0].finish_reason == {"eos": "stop"}.get(ref.finish_reason, ref.finish_reason)
    assert got.usage.prompt_tokens == ref.prompt_tokens
    assert got.usage.completion_tokens == ref.completion_tokens
    assert got.usage.total_tokens == ref.prompt_tokens + ref.completion_tokens
    assert got.model == model_id and got.object == "text_completion"


@pytest.mark.slow
def test_completion_with_token_ids(client, lm, model_id):
    ids = lm.encode(PROMPT)
    ref = lm.generate(ids, max_new_tokens=20, temperature=0)
    got = client.completions.create(model=model_id, prompt=ids, max_tokens=20, temperature=0)
    assert got.choices[0].text == ref.text
    assert got.usage.prompt_tokens == len(ids)


@pytest.mark.slow
def test_chat_matches_chat(client, lm, model_id):
    ref = lm.chat(MESSAGES, max_new_tokens=48, temperature=0)
    got = client.chat.completions.create(model=model_id, messages=MESSAGES, max_tokens=48, temperature=0)
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == ref.text
    assert got.usage.completion_tokens == ref.completion_tokens
    assert got.usage.prompt_tokens == ref.prompt_tokens


@pytest.mark.slow
def test_chat_stream_matches_chat(client, lm, model_id):
    ref = lm.chat(MESSAGES, max_new_tokens=60, temperature=0.8, seed=7)
    chunks = list(client.chat.completions.create(model=model_id, messages=MESSAGES, max_tokens=60, temperature=0.8,
                                                 seed=7, stream=True, stream_options={"include_usage": True}))
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) > 1, "tokens should arrive as separate chunks"
    assert "".join(c.choices[0].delta.content for c in content) == ref.text
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1
    assert finals[0].choices[0].finish_reason == {"eos": "stop"}.get(ref.finish_reason, ref.finish_reason)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == ref.completion_tokens
    assert chunks[-1].usage.prompt_tokens == ref.prompt_tokens
    assert len({c.id for c in chunks}) == 1


@pytest.mark.slow
def test_completion_stream_matches_generate_and_ends_with_done(server, lm, model_id, client):
    ref = lm.generate(PROMPT, max_new_tokens=30, temperature=0)
    pieces = [c.choices[0].text for c in client.completions.create(model=model_id, prompt=PROMPT, max_tokens=30,
                                                                    temperature=0, stream=True)]
    assert "".join(pieces) == ref.text
    # The raw wire format: SSE `data:` lines, the last one `data: [DONE]`.
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                      json={"prompt": PROMPT, "max_tokens": 5, "temperature": 0, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    last = json.loads(lines[-2][len("data: "):])
    assert last["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.slow
def test_stop_sequence(client, lm, model_id):
    full = lm.generate(PROMPT, max_new_tokens=60, temperature=0, ignore_eos=True).text
    words = full.split()
    assert len(words) > 4, full
    stop = " " + words[len(words) // 2]  # a word from the middle of the greedy continuation
    ref = lm.generate(PROMPT, max_new_tokens=60, temperature=0, stop=[stop])
    got = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=60, temperature=0, stop=stop)
    assert got.choices[0].text == ref.text
    assert stop not in got.choices[0].text and len(got.choices[0].text) < len(full)
    assert got.choices[0].finish_reason == "stop"


@pytest.mark.slow
def test_length_finish_reason(client, model_id):
    got = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=3, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert got.choices[0].finish_reason == "length" and got.usage.completion_tokens == 3


@pytest.mark.slow
def test_edgelm_cloud_client_can_use_the_server_as_its_cloud(server, lm):
    """The hybrid router's CloudClient, pointed at `edgelm serve`, gets the model's own answer."""
    from edgelm.cloud import CloudClient
    ref = lm.chat(MESSAGES, max_new_tokens=24, temperature=0)
    cloud = CloudClient(server.url + "/v1", model=None, api_key="unused")
    try:
        assert cloud.chat(MESSAGES, max_tokens=24, temperature=0).text == ref.text
        stream = cloud.stream(MESSAGES, max_tokens=24, temperature=0)
        assert "".join(stream) == ref.text
    finally:
        cloud.close()


@pytest.mark.slow
def test_chat_without_max_tokens_fits_the_remaining_context(client, lm, model_id):
    ctx = lm.context_length
    words = []
    while True:  # a user message that leaves about 20 tokens of room
        msgs = [{"role": "user", "content": " ".join(words)}]
        n_prompt = len(lm.encode(lm.apply_chat_template(msgs)))
        if n_prompt >= ctx - 20:
            break
        words.append("cat")
    room = ctx - n_prompt
    assert 0 < room < int(lm.generation_config.get("max_new_tokens") or 128)
    ref = lm.chat(msgs, max_new_tokens=room, temperature=0)
    got = client.chat.completions.create(model=model_id, messages=msgs, temperature=0)
    assert got.choices[0].message.content == ref.text
    assert got.usage.prompt_tokens == n_prompt and got.usage.completion_tokens <= room
    # An explicit max_tokens is never shrunk: too many is an error with the numbers.
    with pytest.raises(openai.BadRequestError, match=str(n_prompt)):
        client.chat.completions.create(model=model_id, messages=msgs, max_tokens=room + 1)


# --- malformed requests: documented status and OpenAI error body, and the server keeps serving ----------
def _bad_requests(lm, model_id):
    ctx = lm.context_length
    long_prompt = "Once upon a time there was a big dog. " * 60
    n_long = len(lm.encode(long_prompt))
    assert n_long > ctx, "the overflow case needs a prompt longer than the context"
    return [
        # (name, path, raw body, status, code, param, words the message must contain)
        ("not json", "/v1/completions", b"{not json", 400, "invalid_json", None, ["JSON"]),
        ("not an object", "/v1/chat/completions", b"[1, 2]", 400, "invalid_json", None, ["object"]),
        ("prompt wrong type", "/v1/completions", json.dumps({"prompt": 5}).encode(), 400, "invalid_type", "prompt", []),
        ("missing prompt", "/v1/completions", b"{}", 400, "missing_required_parameter", "prompt", []),
        ("max_tokens string", "/v1/completions", json.dumps({"prompt": "x", "max_tokens": "9"}).encode(), 400,
         "invalid_type", "max_tokens", ["integer"]),
        ("max_tokens zero", "/v1/completions", json.dumps({"prompt": "x", "max_tokens": 0}).encode(), 400,
         "invalid_value", "max_tokens", []),
        ("temperature bool", "/v1/completions", json.dumps({"prompt": "x", "temperature": True}).encode(), 400,
         "invalid_type", "temperature", []),
        ("top_p out of range", "/v1/completions", json.dumps({"prompt": "x", "top_p": 1.5}).encode(), 400,
         "invalid_value", "top_p", []),
        ("stop wrong type", "/v1/completions", json.dumps({"prompt": "x", "stop": [1]}).encode(), 400,
         "invalid_type", "stop", []),
        ("n > 1", "/v1/completions", json.dumps({"prompt": "x", "n": 3}).encode(), 400, "unsupported_parameter", "n",
         ["n"]),
        ("messages missing", "/v1/chat/completions", b"{}", 400, "missing_required_parameter", "messages", []),
        ("messages wrong type", "/v1/chat/completions", json.dumps({"messages": "hi"}).encode(), 400, "invalid_type",
         "messages", []),
        ("bad role", "/v1/chat/completions", json.dumps({"messages": [{"role": "robot", "content": "x"}]}).encode(),
         400, "invalid_value", "messages[0].role", []),
        ("stream_options.include_usage not bool", "/v1/chat/completions",
         json.dumps({"messages": MESSAGES, "stream": True, "stream_options": {"include_usage": "yes"}}).encode(),
         400, "invalid_type", "stream_options.include_usage", ["stream_options.include_usage"]),
        ("stream not bool", "/v1/chat/completions",
         json.dumps({"messages": MESSAGES, "stream": "yes"}).encode(), 400, "invalid_type", "stream", []),
        ("empty prompt (runtime InvalidArgumentError)", "/v1/completions", json.dumps({"prompt": ""}).encode(), 400,
         "invalid_value", "prompt", ["prompt"]),
        ("bad repetition_penalty (runtime InvalidArgumentError)", "/v1/completions",
         json.dumps({"prompt": "x", "repetition_penalty": -1}).encode(), 400, "invalid_value", "repetition_penalty",
         ["repetition_penalty"]),
        ("unknown model", "/v1/completions", json.dumps({"model": "no-such-model", "prompt": "x"}).encode(), 404,
         "model_not_found", "model", ["no-such-model", model_id]),
        ("context overflow", "/v1/completions",
         json.dumps({"model": model_id, "prompt": long_prompt, "max_tokens": 10}).encode(), 400,
         "context_length_exceeded", "prompt", [str(ctx), str(n_long), str(n_long + 10)]),
        ("context overflow, no max_tokens: the prompt alone", "/v1/completions",
         json.dumps({"model": model_id, "prompt": long_prompt}).encode(), 400,
         "context_length_exceeded", "prompt", [str(ctx), str(n_long), "prompt alone"]),
        ("context overflow, streamed chat", "/v1/chat/completions",
         json.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": ctx + 1,
                     "stream": True}).encode(), 400, "context_length_exceeded", "max_tokens", [str(ctx)]),
        ("body too large", "/v1/completions",
         json.dumps({"prompt": "x" * (MAX_BODY + 10)}).encode(), 413, "request_too_large", None, [str(MAX_BODY)]),
    ]


@pytest.mark.slow
def test_malformed_requests_get_documented_errors_and_server_keeps_serving(server, lm, model_id):
    with httpx.Client(base_url=server.url, timeout=60) as http:
        for name, path, body, status, code, param, words in _bad_requests(lm, model_id):
            r = http.post(path, content=body, headers={"Content-Type": "application/json"})
            assert r.status_code == status, (name, r.text)
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"}, name
            assert err["code"] == code and err["param"] == param, (name, err)
            assert err["type"] == "invalid_request_error", name
            for word in words:
                assert word in err["message"], (name, word, err["message"])
            # ...and a good request right after still works.
            ok = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, "temperature": 0})
            assert ok.status_code == 200, (name, ok.text)
        for method, path, status in (("GET", "/v1/nowhere", 404), ("GET", "/v1/completions", 405)):
            r = http.request(method, path)
            assert r.status_code == status and r.json()["error"]["code"] in ("not_found", "method_not_allowed")
        assert http.get("/health").json()["status"] == "ok"


@pytest.mark.slow
def test_openai_client_raises_typed_errors(client, model_id):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="context length"):
        client.chat.completions.create(model=model_id, messages=MESSAGES, max_tokens=100_000)


# --- queue limits and disconnects ---------------------------------------------------------------------
@pytest.mark.slow
def test_full_queue_answers_503_with_retry_after_and_nothing_is_lost(lm):
    from edgelm.server import BackgroundServer
    n = 12
    results: list[httpx.Response] = []
    lock = threading.Lock()
    with BackgroundServer(lm, workers=1, max_queue=1) as srv:
        barrier = threading.Barrier(n)

        def one():
            with httpx.Client(base_url=srv.url, timeout=120) as http:
                barrier.wait(timeout=30)
                r = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 300, "temperature": 0,
                                                       "ignore_eos": True})
            with lock:
                results.append(r)

        threads = [threading.Thread(target=one) for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert len(results) == n  # every request got an answer
        busy = [r for r in results if r.status_code == 503]
        ok = [r for r in results if r.status_code == 200]
        assert len(busy) + len(ok) == n, [r.status_code for r in results]
        assert busy, "12 simultaneous requests against 1 worker + 1 queue slot must overflow"
        assert ok, "the request that reached the worker must complete"
        for r in busy:
            assert int(r.headers["Retry-After"]) >= 1
            assert r.json()["error"]["code"] == "server_busy"
        # The overflow is temporary: the server serves again.
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 4}, timeout=60)
        assert r.status_code == 200


@pytest.mark.slow
def test_client_disconnect_stops_generation(lm, caplog):
    import logging

    from edgelm.server import BackgroundServer
    caplog.set_level(logging.INFO, logger="edgelm.server")
    budget = lm.context_length - len(lm.encode(PROMPT)) - 1
    with BackgroundServer(lm, workers=1) as srv:
        engine = srv.state.engine
        t0 = time.monotonic()
        with httpx.stream("POST", srv.url + "/v1/completions", timeout=60,
                          json={"prompt": PROMPT, "max_tokens": budget, "stream": True, "ignore_eos": True}) as r:
            got = 0
            for line in r.iter_lines():
                got += line.startswith("data: ")
                if got >= 3:
                    break  # hang up after a few tokens
        deadline = time.monotonic() + 30
        while engine.stats()["running"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert engine.stats()["running"] == 0
        assert engine.cancelled == 1, "the hung-up stream should have been stopped between tokens"
        assert any("client disconnected mid-stream" in r.getMessage() for r in caplog.records)
        # The same for a non-streamed request whose client gives up (times out) while it is generating. The
        # timeout is a quarter of what the whole generation takes here, measured, so it lands mid-generation.
        t = time.perf_counter()
        lm.generate(PROMPT, max_new_tokens=budget, ignore_eos=True)
        give_up = (time.perf_counter() - t) / 4
        with pytest.raises(httpx.TimeoutException):
            httpx.post(srv.url + "/v1/completions", timeout=give_up,
                       json={"prompt": PROMPT, "max_tokens": budget, "ignore_eos": True})
        deadline = time.monotonic() + 30
        while (engine.stats()["running"] or engine.cancelled < 2) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert engine.cancelled == 2 and engine.stats()["running"] == 0
        gave_up = [r.getMessage() for r in caplog.records if "of generating; generation cancelled" in r.getMessage()]
        assert gave_up and "before the first token" not in gave_up[0]
        # The worker is free again: a full-length generation still completes afterwards.
        ref = lm.generate(PROMPT, max_new_tokens=8, temperature=0)
        r2 = httpx.post(srv.url + "/v1/completions", timeout=60,
                        json={"prompt": PROMPT, "max_tokens": 8, "temperature": 0})
        assert r2.json()["choices"][0]["text"] == ref.text
        assert time.monotonic() - t0 < 60


@pytest.mark.slow
def test_stream_cut_by_shutdown_ends_with_error_event_and_done(lm):
    from edgelm.server import BackgroundServer
    budget = lm.context_length - len(lm.encode(PROMPT)) - 1
    with BackgroundServer(lm, workers=1) as srv:
        lines = []
        with httpx.stream("POST", srv.url + "/v1/completions", timeout=60,
                          json={"prompt": PROMPT, "max_tokens": budget, "stream": True, "ignore_eos": True}) as r:
            for line in r.iter_lines():
                if line:
                    lines.append(line)
                if len(lines) == 2:
                    srv.state.engine.cancel_all("server shutting down")  # what a shutdown grace timeout does
        assert lines[-1] == "data: [DONE]"
        err = json.loads(lines[-2][len("data: "):])["error"]
        assert err["code"] == "cancelled" and "shutting down" in err["message"]
        assert len(lines) < budget // 2


# --- API key -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_api_key_required_and_never_logged(lm, caplog, capfd):
    from edgelm.server import BackgroundServer
    key = "sk-edgelm-" + secrets.token_hex(16)
    wrong = "sk-wrong-" + secrets.token_hex(16)
    caplog.set_level(logging.DEBUG)
    with BackgroundServer(lm, api_key=key, log_level="debug") as srv:
        with httpx.Client(base_url=srv.url, timeout=60) as http:
            for headers in ({}, {"Authorization": f"Bearer {wrong}"}, {"Authorization": key},
                            {"Authorization": f"Basic {key}"}):
                for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions")):
                    r = http.request(method, path, headers=headers, json={"messages": MESSAGES, "max_tokens": 4})
                    assert r.status_code == 401, (headers, path, r.text)
                    err = r.json()["error"]
                    assert err["code"] == "invalid_api_key" and set(err) == {"message", "type", "param", "code"}
                    assert key not in r.text and wrong not in r.text
                    assert r.headers["WWW-Authenticate"] == "Bearer"
            assert http.get("/health").status_code == 200  # health checks need no key
        good = openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0, timeout=60)
        assert good.chat.completions.create(model=next(iter(srv.state.models)), messages=MESSAGES,
                                            max_tokens=4).choices[0].message.content is not None
        bad = openai.OpenAI(base_url=srv.url + "/v1", api_key=wrong, max_retries=0, timeout=60)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    out, err = capfd.readouterr()
    logs = caplog.text + out + err
    assert "POST /v1/chat/completions" in logs and "chatcmpl-" in logs, "the test should have captured request logs"
    assert key not in logs and wrong not in logs


# --- tools: OpenAI's tool-calling messages reach the chat template; a Hybrid's cloud tool calls come back -------
# A template that writes everything tools add, so the prompt (and its token count) shows what reached it. Tool
# call arguments go through `tojson`: a dict and a JSON string render differently, which pins the conversion.
TOOL_TEMPLATE = (
    "{%- if tools %}T: {% for t in tools %}{{ t.function.name }} {{ t.function.parameters | tojson }} {% endfor %}"
    "{{ '\\n' }}{% endif %}"
    "{%- if documents %}D: {% for d in documents %}{{ d.text }} {% endfor %}{{ '\\n' }}{% endif %}"
    "{%- if date_string is defined %}date {{ date_string }}{{ '\\n' }}{% endif %}"
    "{%- for m in messages %}{{ m.role }}: "
    "{%- if m.tool_calls %}{% for c in m.tool_calls %} call {{ c.function.name }} {{ c.function.arguments | tojson }}"
    "{% endfor %}{% else %} {{ m.content }}{% endif %}{% if m.tool_call_id %} ({{ m.tool_call_id }}){% endif %}"
    "{{ '\\n' }}{% endfor %}"
    "{%- if add_generation_prompt %}assistant:{% endif %}")
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {}}}}}]
ASK = [{"role": "user", "content": "Is it sunny in Paris?"}]
# The conversation after a tool call, as an OpenAI client sends it, and as the runtime (templates) takes it.
TOOL_TURN = ASK + [
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "sunny"}]}]
TOOL_TURN_RUNTIME = ASK + [
    {"role": "assistant", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]


@pytest.fixture(scope="module")
def tool_lm(stories_int8, tmp_path_factory):
    """stories260K with TOOL_TEMPLATE as its chat template."""
    import shutil

    import edgelm
    folder = tmp_path_factory.mktemp("tools") / "stories-tools"
    shutil.copytree(stories_int8, folder)
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    cfg_path.write_text(json.dumps({**cfg, "chat_template": TOOL_TEMPLATE}))
    return edgelm.load(folder, threads=1, verify=False)


@pytest.fixture(scope="module")
def tool_client(tool_lm):
    from edgelm.server import BackgroundServer
    with BackgroundServer({"m": tool_lm}, workers=1) as srv:
        yield openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60), srv


def _n_prompt(lm, messages, **template) -> int:
    return len(lm.encode(lm.apply_chat_template(messages, **template)))


def test_tools_and_tool_messages_reach_the_chat_template(tool_client, tool_lm):
    client, _ = tool_client
    greedy = dict(max_tokens=12, temperature=0)
    for messages, runtime in ((ASK, ASK), (TOOL_TURN, TOOL_TURN_RUNTIME)):
        got = client.chat.completions.create(model="m", messages=messages, tools=TOOLS, **greedy)
        ref = tool_lm.chat(runtime, tools=TOOLS, max_new_tokens=12, temperature=0)
        assert got.usage.prompt_tokens == ref.prompt_tokens == _n_prompt(tool_lm, runtime, tools=TOOLS)
        assert got.choices[0].message.content == ref.text and got.choices[0].message.tool_calls is None
        streamed = client.chat.completions.create(model="m", messages=messages, tools=TOOLS, stream=True, **greedy)
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == ref.text
    assert "call get_weather {\"city\": \"Paris\"}" in tool_lm.apply_chat_template(TOOL_TURN_RUNTIME)
    # tool_choice "none": the model is not shown the tools; "auto" is the default
    none = client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, tool_choice="none", **greedy)
    auto = client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, tool_choice="auto", **greedy)
    assert none.usage.prompt_tokens == _n_prompt(tool_lm, ASK) < auto.usage.prompt_tokens
    # vLLM's extensions: documents and template variables
    docs = [{"title": "w", "text": "Paris is sunny."}]
    got = client.chat.completions.create(model="m", messages=ASK, max_tokens=4, extra_body={
        "documents": docs, "chat_template_kwargs": {"date_string": "1 May"}})
    assert got.usage.prompt_tokens == _n_prompt(tool_lm, ASK, documents=docs, date_string="1 May")


@pytest.mark.parametrize("name,extra,code,param", [
    ("tools not an array", {"tools": {"name": "f"}}, "invalid_type", "tools"),
    ("tool without a function", {"tools": [{"type": "function"}]}, "invalid_value", "tools[0]"),
    ("tool_choice required", {"tools": TOOLS, "tool_choice": "required"}, "unsupported_parameter", "tool_choice"),
    ("legacy functions", {"functions": [{"name": "f"}]}, "unsupported_parameter", "functions"),
    ("tool_calls not an array", {"messages": [{"role": "assistant", "tool_calls": "f()"}]}, "invalid_type",
     "messages[0].tool_calls"),
    ("tool call without a name", {"messages": [{"role": "assistant", "tool_calls": [{"function": {}}]}]},
     "invalid_value", "messages[0].tool_calls[0]"),
    ("arguments a number", {"messages": [{"role": "assistant", "tool_calls": [
        {"function": {"name": "f", "arguments": 5}}]}]}, "invalid_type",
     "messages[0].tool_calls[0].function.arguments"),
    ("tool_call_id a number", {"messages": [{"role": "tool", "tool_call_id": 5, "content": "x"}]}, "invalid_type",
     "messages[0].tool_call_id"),
    ("image part", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "invalid_value", "messages[0].content"),
    ("reserved template variable", {"chat_template_kwargs": {"tools": []}}, "invalid_value", "chat_template_kwargs"),
    ("documents not objects", {"documents": ["text"]}, "invalid_type", "documents"),
])
def test_malformed_tool_requests_get_400_naming_the_field(tool_client, name, extra, code, param):
    _, srv = tool_client
    r = httpx.post(srv.url + "/v1/chat/completions", json={"messages": ASK, "max_tokens": 2, **extra}, timeout=60)
    assert r.status_code == 400, (name, r.text)
    err = r.json()["error"]
    assert (err["code"], err["param"]) == (code, param), (name, err)


def test_a_served_hybrid_returns_its_clouds_tool_calls(tool_lm):
    """client -> edgelm serve -> Hybrid -> cloud (a loopback fault server) and back, tools both ways."""
    from edgelm.cloud import CloudClient
    from edgelm.hybrid import Hybrid, Router, Rule
    from edgelm.server import BackgroundServer
    from faults import FaultServer
    from test_cloud import CALLS, tool_answer

    with FaultServer(tool_answer(CALLS)) as cloud_srv:
        hy = Hybrid(tool_lm, CloudClient(cloud_srv.url, api_key="k", timeout=10),
                    # rules only: the default prompt-score and confidence checks would send this random-weight
                    # model's every prompt to the cloud
                    Router(rules=[Rule("cloud", keywords=["weather"])], max_prompt_nats=None, min_confidence=None))
        with BackgroundServer({"m": hy}, workers=1) as srv:
            client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
            ask = [{"role": "user", "content": "weather in Paris and Oslo?"}]
            got = client.chat.completions.create(model="m", messages=ask, tools=TOOLS, max_tokens=8)
            chunks = list(client.chat.completions.create(model="m", messages=ask, tools=TOOLS, max_tokens=8,
                                                         stream=True))
            local = client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, max_tokens=8, temperature=0)
    choice = got.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert [c.model_dump() for c in choice.message.tool_calls] == CALLS
    assert all(r.body["tools"] == TOOLS for r in cloud_srv.requests) and len(cloud_srv.requests) == 2
    streamed: dict[int, dict] = {}
    for c in chunks:
        for d in (c.choices[0].delta.tool_calls or []) if c.choices else []:
            call = streamed.setdefault(d.index, {"id": d.id, "type": d.type, "function": {"name": "", "arguments": ""}})
            call["function"]["name"] += d.function.name or ""
            call["function"]["arguments"] += d.function.arguments or ""
    assert [streamed[i] for i in sorted(streamed)] == CALLS
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    # no rule matched: the local model answered, with text (its tool call, if any, is not parsed)
    assert local.choices[0].message.tool_calls is None
    assert local.choices[0].message.content == tool_lm.chat(ASK, tools=TOOLS, max_new_tokens=8, temperature=0).text


# --- hostile input: 400 with an OpenAI error and no traceback (issue 15, fault 8) ----------------------------------
def _assert_openai_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text[:300]
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    if code is not None:
        assert err["code"] == code, err
    return err


HOSTILE_BODIES = [
    # (name, path, raw body, code)
    ("lone surrogate in a prompt", "/v1/completions", b'{"prompt": "Once \\ud800 upon", "max_tokens": 2}',
     "invalid_value"),
    ("lone low surrogate in a message", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "hi \\udc00"}], "max_tokens": 2}', "invalid_value"),
    ("surrogate as UTF-8 bytes", "/v1/completions", b'{"prompt": "a\xed\xa0\x80b", "max_tokens": 2}', "invalid_value"),
    ("surrogate in a key", "/v1/completions", b'{"prompt": "a", "\\ud800": 1, "max_tokens": 2}', "invalid_value"),
    ("surrogate in a tool call's arguments", "/v1/chat/completions",
     json.dumps({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {
         "name": "f", "arguments": '{"x": "\\ud800"}'}}]}, {"role": "user", "content": "hi"}],
                 "max_tokens": 2}).encode(), "invalid_value"),
    ("an integer of 5,000 digits", "/v1/completions", b'{"prompt": "a", "max_tokens": ' + b"7" * 5000 + b"}",
     "invalid_json"),
    ("an integer of 4,000 digits", "/v1/completions", b'{"prompt": "a", "seed": ' + b"7" * 4000 + b"}",
     "invalid_value"),
    ("nested 200,000 deep", "/v1/chat/completions", b"[" * 200_000 + b"]" * 200_000, "invalid_json"),
    ("objects nested 150,000 deep", "/v1/completions", b'{"a":' * 150_000 + b"1" + b"}" * 150_000, "invalid_json"),
    ("nested 100 deep in tools", "/v1/chat/completions",
     json.dumps({"messages": MESSAGES, "tools": [{"type": "function", "function": {
         "name": "f", "parameters": json.loads('{"a":' * 100 + "1" + "}" * 100)}}]}).encode(), "invalid_json"),
    ("tool call arguments nested 100,000 deep", "/v1/chat/completions",
     json.dumps({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {
         "name": "f", "arguments": "[" * 100_000 + "]" * 100_000}}]}, {"role": "user", "content": "hi"}],
                 "max_tokens": 2}).encode(), None),
    ("NaN temperature", "/v1/completions", b'{"prompt": "a", "temperature": NaN}', "invalid_value"),
    ("Infinity top_p", "/v1/completions", b'{"prompt": "a", "top_p": 1e999}', "invalid_value"),
]


@pytest.mark.slow
def test_hostile_bodies_get_400_and_no_traceback(lm, caplog, capfd):
    from edgelm.server import BackgroundServer
    caplog.set_level(logging.DEBUG)
    with BackgroundServer(lm, workers=1) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        for name, path, body, code in HOSTILE_BODIES:  # all under the default 1 MiB body limit
            r = http.post(path, content=body, headers={"Content-Type": "application/json"})
            if code is None:  # arguments that are not a JSON object stay text, as OpenAI's docs allow
                assert r.status_code in (200, 400), (name, r.text[:300])
                continue
            err = _assert_openai_error(r, 400, code)
            assert len(err["message"]) < 400, (name, err["message"])
        assert http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}).status_code == 200
    out, err = capfd.readouterr()
    assert "Traceback" not in caplog.text + out + err
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR], caplog.text[-2000:]


# --- cross-site use: Host, Origin, CORS, body types (issue 15, fault 5) --------------------------------------------
def test_foreign_host_is_refused_and_local_names_pass(server):
    port = server.url.rsplit(":", 1)[1]
    body = {"prompt": PROMPT, "max_tokens": 2}
    with httpx.Client(base_url=server.url, timeout=60) as http:
        for host in ("evil.example", f"evil.example:{port}", "rebind.attacker.test", "localhost.evil.example"):
            for method, path in (("POST", "/v1/completions"), ("GET", "/v1/models"), ("GET", "/health")):
                r = http.request(method, path, json=body if method == "POST" else None, headers={"Host": host})
                _assert_openai_error(r, 403, "host_not_allowed")
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"[::1]:{port}", f"LocalHost.:{port}",
                     f"app.localhost:{port}", f"10.1.2.3:{port}", f"[fe80::1]:{port}"):
            r = http.post("/v1/completions", json=body, headers={"Host": host})
            assert r.status_code == 200, (host, r.text)


def test_allowed_hosts_and_cors_origins_are_opt_in(lm):
    from edgelm.server import BackgroundServer
    app_origin = "http://app.example:3000"
    with BackgroundServer(lm, workers=1, allowed_hosts=["box.lan"], cors_origins=[app_origin]) as srv:
        with httpx.Client(base_url=srv.url, timeout=60) as http:
            body = {"prompt": PROMPT, "max_tokens": 2}
            assert http.post("/v1/completions", json=body, headers={"Host": "box.lan:8000"}).status_code == 200
            _assert_openai_error(http.post("/v1/completions", json=body, headers={"Host": "other.lan"}), 403,
                                 "host_not_allowed")
            # the listed origin: preflight answered, the answer carries CORS headers
            pre = http.options("/v1/chat/completions", headers={
                "Origin": app_origin, "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type"})
            assert pre.status_code == 204
            assert pre.headers["Access-Control-Allow-Origin"] == app_origin
            assert "POST" in pre.headers["Access-Control-Allow-Methods"]
            assert "content-type" in pre.headers["Access-Control-Allow-Headers"]
            r = http.post("/v1/completions", json=body, headers={"Origin": app_origin})
            assert r.status_code == 200 and r.headers["Access-Control-Allow-Origin"] == app_origin
            assert "Origin" in r.headers["Vary"]
            # any other origin: refused, preflight included, and never given CORS headers
            for origin in ("https://evil.example", "null", "http://app.example:3001"):
                pre = http.options("/v1/chat/completions", headers={"Origin": origin,
                                                                     "Access-Control-Request-Method": "POST"})
                _assert_openai_error(pre, 403, "origin_not_allowed")
                assert "Access-Control-Allow-Origin" not in pre.headers
                r = http.post("/v1/completions", json=body, headers={"Origin": origin})
                _assert_openai_error(r, 403, "origin_not_allowed")
            assert "Access-Control-Allow-Origin" not in http.post("/v1/completions", json=body).headers


def test_no_origin_is_allowed_by_default_and_non_json_bodies_get_415(server):
    body = json.dumps({"prompt": PROMPT, "max_tokens": 2})
    with httpx.Client(base_url=server.url, timeout=60) as http:
        # A page on any site: a "simple" cross-site request needs no preflight, so it must be refused outright.
        r = http.post("/v1/completions", content=body, headers={"Content-Type": "text/plain",
                                                                 "Origin": "https://evil.example"})
        _assert_openai_error(r, 403, "origin_not_allowed")
        pre = http.options("/v1/completions", headers={"Origin": "http://localhost:3000",
                                                       "Access-Control-Request-Method": "POST"})
        assert pre.status_code == 403 and "Access-Control-Allow-Origin" not in pre.headers
        # Without an Origin too (a form post, a script): only JSON bodies are read.
        for ctype in ("text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
                      "multipart/form-data; boundary=x", None):
            headers = {"Content-Type": ctype} if ctype else {}
            r = http.post("/v1/completions", content=body.encode(), headers=headers)
            err = _assert_openai_error(r, 415, "unsupported_media_type")
            assert "application/json" in err["message"]
        for ctype in ("application/json", "application/json; charset=utf-8", "Application/JSON"):
            assert http.post("/v1/completions", content=body, headers={"Content-Type": ctype}).status_code == 200


# --- slow and idle connections (issue 15: timeouts and a connection cap) -------------------------------------------
def _connect(url: str):
    import socket
    host, port = url.split("://")[1].rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=10)
    return s


def _read_all(s) -> bytes:
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            return data
        data += chunk


def test_idle_slow_and_surplus_connections_are_closed(lm):
    from edgelm.server import BackgroundServer
    with BackgroundServer(lm, workers=1, header_timeout=0.5, body_timeout=0.5, keep_alive_timeout=0.3,
                          max_connections=4) as srv:
        t0 = time.monotonic()
        idle = _connect(srv.url)                                         # says nothing
        slow_head = _connect(srv.url)                                    # a head that never ends
        slow_head.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        slow_body = _connect(srv.url)                                    # a body that never ends
        slow_body.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 100\r\n\r\n{\"prompt\": ")
        kept = _connect(srv.url)                                         # idle after a request (keep-alive)
        kept.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        answer = b""
        while not answer.endswith(b"}"):  # the whole /health answer
            answer += kept.recv(65536)
        surplus = _connect(srv.url)                                      # one more than max_connections
        assert _read_all(surplus).startswith(b"HTTP/1.1 503")
        assert _read_all(idle) == b""
        head = _read_all(slow_head)
        assert head.startswith(b"HTTP/1.1 408") and b"request_timeout" in head
        body = _read_all(slow_body)
        assert body.startswith(b"HTTP/1.1 408") and b"request_timeout" in body
        assert _read_all(kept) == b""
        assert time.monotonic() - t0 < 20  # each closes after its timeout, not never
        for s in (idle, slow_head, slow_body, kept, surplus):
            s.close()
        # and the server serves as before
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}, timeout=60)
        assert r.status_code == 200


def test_a_client_that_stops_reading_is_dropped():
    """The stall timer, driven directly: writing paused (the client reads nothing) for send_timeout -> the
    connection is aborted; writing resumed in time -> it is kept."""
    import asyncio

    from starlette.applications import Starlette
    from uvicorn.server import ServerState

    from edgelm.server import _uvicorn_config

    class App(Starlette):
        pass

    app = App()
    app.state.edgelm = type("S", (), {"body_timeout": 30.0})()

    class Transport:
        def __init__(self):
            self.aborted = self.closed = False

        def get_extra_info(self, name, default=None):
            return {"sockname": ("127.0.0.1", 1), "peername": ("127.0.0.1", 2)}.get(name, default)

        def write(self, data):
            pass

        def close(self):
            self.closed = True

        def abort(self):
            self.aborted = True

        def is_closing(self):
            return self.closed or self.aborted

        def pause_reading(self):
            pass

        def resume_reading(self):
            pass

    async def run():
        config = _uvicorn_config(app, send_timeout=0.1, header_timeout=30)
        config.load()
        results = []
        for resume in (False, True):
            proto = config.http_protocol_class(config=config, server_state=ServerState(), app_state={},
                                               _loop=asyncio.get_running_loop())
            transport = Transport()
            proto.connection_made(transport)
            proto.pause_writing()
            if resume:
                await asyncio.sleep(0.05)
                proto.resume_writing()
            await asyncio.sleep(0.3)
            results.append(transport.aborted)
            proto.connection_lost(None)
        return results

    assert asyncio.run(run()) == [True, False]


def test_accepted_connections_have_nagle_off():
    """The listening socket says IPPROTO_TCP, so asyncio sets TCP_NODELAY on every accepted connection. Bound with
    protocol 0 it did not, and each response after the first few on a keep-alive connection waited for the
    client's delayed ACK (~40 ms: 52 ms for a 32-token request the model answers in 6; benchmarks in the note)."""
    import asyncio
    import socket

    from edgelm.server import _bind

    sock = _bind("127.0.0.1", 0)
    assert sock.proto == socket.IPPROTO_TCP
    seen: list[int] = []

    class Probe(asyncio.Protocol):
        def connection_made(self, transport):
            seen.append(transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            transport.close()

    async def main():
        server = await asyncio.get_running_loop().create_server(Probe, sock=sock)
        async with server:
            port = sock.getsockname()[1]
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            for _ in range(100):  # bounded: the accept runs on this loop
                if seen:
                    break
                await asyncio.sleep(0.01)
            writer.close()

    asyncio.run(main())
    assert seen and seen[0] != 0
