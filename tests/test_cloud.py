"""CloudClient against real loopback servers that misbehave on purpose (tests/faults.py).

Every test counts what actually reached the server, so "retried" and "did not retry" are facts on the wire,
not assumptions about the client's internals. Backoffs are tiny so the whole file runs in a few seconds.
"""
from __future__ import annotations

import gzip
import json
import logging
import time
import traceback
import zlib
from pathlib import Path

import pytest

pytest.importorskip("httpx")

import edgelm  # noqa: E402
from edgelm.cloud import CloudClient, _parse_retry_after  # noqa: E402
from edgelm.errors import (CloudError, CloudHTTPError, CloudResponseError, CloudTimeoutError,  # noqa: E402
                           InvalidArgumentError)

from faults import (ConnectionSpy, FaultServer, broken_stream, completion_json, echo, free_port_refusing,  # noqa: E402
                    garbage_stream, hang, malformed, ok, reset, sse_event, status)

KEY = "sk-test-SECRET-0123456789abcdef"
EDGELM = str(Path(edgelm.__file__).resolve().parent)
MSGS = [{"role": "user", "content": "Tell me a story."}]


def client(url: str, **kw) -> CloudClient:
    kw.setdefault("timeout", 5.0)
    kw.setdefault("backoff", 0.01)
    kw.setdefault("backoff_max", 0.05)
    kw.setdefault("connect_timeout", 1.0)
    return CloudClient(url, model="big", api_key=kw.pop("api_key", KEY), **kw)


def test_chat_sends_an_openai_request_and_parses_the_answer():
    with FaultServer(ok("Once upon a time.")) as srv, client(srv.url) as c:
        reply = c.chat(MSGS, max_tokens=7, temperature=0.0, stop="\n")
    assert reply.text == "Once upon a time."
    assert reply.finish_reason == "stop" and reply.attempts == 1
    assert reply.completion_tokens == 4 and reply.total_tokens == 9
    (req,) = srv.requests
    assert req.method == "POST" and req.path == "/v1/chat/completions"
    assert req.headers["authorization"] == f"Bearer {KEY}"
    assert req.body == {"model": "big", "messages": MSGS, "stream": False, "max_tokens": 7, "temperature": 0.0,
                        "stop": ["\n"]}


def test_stream_yields_pieces_and_a_final_reply():
    text = "The cat sat on the mat."
    with FaultServer(ok(text)) as srv, client(srv.url) as c:
        s = c.stream(MSGS)
        pieces = list(s)
    assert len(pieces) > 1 and "".join(pieces) == text
    assert s.reply is not None and s.reply.text == text and s.reply.finish_reason == "stop"
    assert srv.requests[0].body["stream"] is True


def test_5xx_is_retried_with_backoff_until_it_succeeds():
    with FaultServer(status(500), status(503), ok("fine")) as srv, client(srv.url, max_retries=2) as c:
        reply = c.chat(MSGS)
    assert reply.text == "fine" and reply.attempts == 3
    assert len(srv.requests) == 3


def test_5xx_past_the_retries_raises_http_error_with_status():
    with FaultServer(status(500)) as srv, client(srv.url, max_retries=2) as c:
        with pytest.raises(CloudHTTPError) as info:
            c.chat(MSGS)
    assert info.value.status_code == 500
    assert len(srv.requests) == 3  # the first try plus two retries, no more
    assert "3 attempts" in str(info.value)


def test_429_honours_retry_after_seconds():
    with FaultServer(status(429, retry_after="1"), ok("after the wait")) as srv, client(srv.url) as c:
        reply = c.chat(MSGS)
    assert reply.text == "after the wait"
    gap = srv.requests[1].at - srv.requests[0].at
    assert 0.95 <= gap < 3.0, gap


def test_429_honours_retry_after_http_date():
    assert _parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past: retry now
    future = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 28 <= _parse_retry_after(future) <= 31
    assert _parse_retry_after("soon") is None and _parse_retry_after(None) is None


def test_429_without_retry_after_uses_backoff():
    with FaultServer(status(429), status(429), ok("ok now")) as srv, client(srv.url, max_retries=3) as c:
        reply = c.chat(MSGS)
    assert reply.text == "ok now" and len(srv.requests) == 3
    assert srv.requests[2].at - srv.requests[0].at < 0.5  # small backoff, not a fixed long sleep


def test_429_asking_for_too_long_a_wait_gives_up_at_once():
    with FaultServer(status(429, retry_after="120")) as srv, client(srv.url, max_retry_after=10) as c:
        t0 = time.monotonic()
        with pytest.raises(CloudHTTPError) as info:
            c.chat(MSGS)
    assert time.monotonic() - t0 < 1.0
    assert info.value.status_code == 429 and len(srv.requests) == 1
    assert "max_retry_after" in str(info.value)


@pytest.mark.parametrize("code", [400, 401, 404, 422])
def test_other_4xx_are_not_retried(code):
    with FaultServer(status(code), ok()) as srv, client(srv.url, max_retries=3) as c:
        with pytest.raises(CloudHTTPError) as info:
            c.chat(MSGS)
    assert info.value.status_code == code
    assert len(srv.requests) == 1


def test_a_hanging_server_times_out_within_the_total_deadline():
    with FaultServer(hang()) as srv, client(srv.url, timeout=0.6, max_retries=5) as c:
        t0 = time.monotonic()
        with pytest.raises(CloudTimeoutError):
            c.chat(MSGS)
        elapsed = time.monotonic() - t0
    assert 0.5 <= elapsed < 1.5, elapsed  # the deadline covers all attempts, not 0.6 s each


def test_a_hanging_stream_times_out_too():
    with FaultServer(hang()) as srv, client(srv.url, timeout=0.5) as c:
        t0 = time.monotonic()
        with pytest.raises(CloudTimeoutError):
            list(c.stream(MSGS))
    assert time.monotonic() - t0 < 1.5


def test_connection_reset_is_retried_then_reported():
    with FaultServer(reset()) as srv, client(srv.url, max_retries=2) as c:
        with pytest.raises(CloudError) as info:
            c.chat(MSGS)
    assert not isinstance(info.value, (CloudHTTPError, CloudTimeoutError))
    assert len(srv.requests) == 3
    assert "Could not reach" in str(info.value) or "broke" in str(info.value)


def test_reset_then_success_recovers():
    with FaultServer(reset(), ok("second try")) as srv, client(srv.url) as c:
        assert c.chat(MSGS).text == "second try"
    assert len(srv.requests) == 2


def test_connection_refused_is_a_cloud_error_quickly():
    with client(free_port_refusing(), max_retries=1) as c:
        t0 = time.monotonic()
        with pytest.raises(CloudError) as info:
            c.chat(MSGS)
    assert time.monotonic() - t0 < 2.0
    assert "Could not reach" in str(info.value)


@pytest.mark.parametrize("body", [b'{"choices": [{"message": {"content": "cut', b'{"id": "x"}',
                                  b'{"choices": [{"message": {"content": null}}]}', b"[1, 2]",
                                  b'{"error": {"message": "model overloaded"}}'])
def test_malformed_answers_raise_response_error_without_retry(body):
    with FaultServer(malformed(body), ok()) as srv, client(srv.url) as c:
        with pytest.raises(CloudResponseError):
            c.chat(MSGS)
    assert len(srv.requests) == 1


def test_broken_stream_gives_its_pieces_then_raises():
    with FaultServer(broken_stream("one two three four", after=2)) as srv, client(srv.url) as c:
        got = []
        with pytest.raises(CloudResponseError) as info:
            for piece in c.stream(MSGS):
                got.append(piece)
    assert "".join(got) == "one two"
    assert "2 pieces" in str(info.value)
    assert len(srv.requests) == 1  # never retried after pieces were given out


def test_garbage_stream_event_raises_response_error():
    with FaultServer(garbage_stream(after=1)) as srv, client(srv.url) as c:
        with pytest.raises(CloudResponseError):
            list(c.stream(MSGS))


def test_stream_is_retried_before_its_first_piece():
    with FaultServer(status(503), ok("streamed fine")) as srv, client(srv.url) as c:
        s = c.stream(MSGS)
        assert "".join(s) == "streamed fine"
    assert s.reply.attempts == 2 and len(srv.requests) == 2


def test_api_key_never_appears_in_repr_logs_or_errors(monkeypatch, caplog):
    monkeypatch.setenv("EDGELM_CLOUD_API_KEY", KEY)
    caplog.set_level(logging.DEBUG)  # every logger, httpx and httpcore included
    leaked_body = ('{"error": "bad key ' + KEY + '"}').encode()  # a server that echoes the key back
    seen: list[str] = []
    faults = [status(500, body=leaked_body), status(401, body=leaked_body), hang(), reset(),
              malformed(b"not json " + KEY.encode()), malformed(b'{"error": "' + KEY.encode() + b'"}')]
    for behaviour in faults:
        with FaultServer(behaviour) as srv:
            c = CloudClient(srv.url, model="m", timeout=0.5, backoff=0.01, max_retries=1)
            assert c.has_api_key  # read from the environment
            seen += [repr(c), str(c)]
            with pytest.raises(CloudError) as info:
                c.chat(MSGS)
            assert srv.requests[0].headers["authorization"] == f"Bearer {KEY}"  # it was really sent
            exc = info.value
            seen += [str(exc), repr(exc), "".join(traceback.format_exception(exc))]
            seen += [str(a) for a in exc.args]
            c.close()
    for text in seen + [caplog.text] + [r.getMessage() for r in caplog.records]:
        assert KEY not in text
    assert "***" in "".join(seen)  # the echoed key was scrubbed, not dropped silently


def test_invalid_settings_are_refused_before_any_connection():
    with ConnectionSpy() as spy:
        with pytest.raises(InvalidArgumentError):
            CloudClient("ftp://example.com")
        with pytest.raises(InvalidArgumentError):
            CloudClient("https://example.com/v1", verify=False)
        with pytest.raises(InvalidArgumentError):
            CloudClient("https://example.com/v1", timeout=0)
        with pytest.raises(InvalidArgumentError):
            CloudClient("https://example.com/v1", max_retries=-1)
        c = CloudClient("https://example.com/v1", api_key="k")
        with pytest.raises(InvalidArgumentError):
            c.chat([])
        with pytest.raises(InvalidArgumentError):
            c.chat([{"role": "user"}])
    assert spy.connects == []


def test_url_credentials_are_not_shown():
    c = CloudClient("http://user:hunter2@127.0.0.1:9/v1?token=abc", api_key="k")
    assert "hunter2" not in repr(c) and "abc" not in repr(c)


def test_redacted_messages_are_what_the_server_sees():
    with FaultServer(echo()) as srv, client(srv.url) as c:
        reply = c.chat([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])
    assert reply.text == "echo: be brief | hi"
    assert [m["role"] for m in srv.requests[0].messages] == ["system", "user"]


def test_text_completions_endpoint():
    with FaultServer(ok("and they lived happily."), echo()) as srv, client(srv.url) as c:
        reply = c.complete("Once upon a time", max_tokens=5)
        s = c.stream_complete("The end")
        streamed = "".join(s)
    assert reply.text == "and they lived happily."
    assert streamed == "echo: The end" and s.reply.finish_reason == "stop"
    assert srv.requests[0].path == "/v1/completions"
    assert srv.requests[0].body["prompt"] == "Once upon a time" and "messages" not in srv.requests[0].body


# --- tools ---------------------------------------------------------------------------------------------
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
CALLS = [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
         {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]


def tool_answer(calls, *, content=None):
    """A chat completion whose answer is tool calls (content null, as OpenAI sends it), or its stream, with each
    call's arguments split over several events as real servers do."""
    def behave(conn, req):
        if not req.streaming:
            body = {"id": "c", "object": "chat.completion", "model": "fault-server",
                    "choices": [{"index": 0, "finish_reason": "tool_calls",
                                 "message": {"role": "assistant", "content": content, "tool_calls": calls}}]}
            conn.respond(200, json.dumps(body).encode())
            return
        conn.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n")

        def event(delta, finish=None):
            e = {"id": "c", "object": "chat.completion.chunk", "choices": [
                {"index": 0, "delta": delta, "finish_reason": finish}]}
            conn.send(b"data: " + json.dumps(e).encode() + b"\n\n")
        event({"role": "assistant", "content": None})
        for i, c in enumerate(calls):
            args = c["function"]["arguments"]
            event({"tool_calls": [{"index": i, "id": c["id"], "type": "function",
                                   "function": {"name": c["function"]["name"], "arguments": ""}}]})
            for j in range(0, len(args), 5):
                event({"tool_calls": [{"index": i, "function": {"arguments": args[j:j + 5]}}]})
        event({}, "tool_calls")
        conn.send(b"data: [DONE]\n\n")
    return behave


def test_tools_and_tool_messages_go_out_in_the_openai_shape():
    # The runtime's message shapes (what chat templates take) on the way in ...
    convo = [{"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}], "app_note": "local only"},
             {"role": "assistant", "tool_calls": [{"id": "call_1", "function": {"name": "get_weather",
                                                                                "arguments": {"city": "Paris"}}}]},
             {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": {"temp_c": 21}}]
    with FaultServer(ok("It is 21 C.")) as srv, client(srv.url) as c:
        reply = c.chat(convo, tools=TOOLS)
        c.chat([{"role": "user", "content": "hi"}], tools=[])  # no tools: no "tools" field (OpenAI refuses [])
    assert reply.text == "It is 21 C." and reply.tool_calls is None
    body = srv.requests[0].body
    assert body["tools"] == TOOLS and "documents" not in body
    # ... and OpenAI's on the wire: arguments and tool results as JSON text, null content beside tool calls.
    assert body["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "content": '{"temp_c": 21}', "name": "get_weather", "tool_call_id": "call_1"}]
    assert "tools" not in srv.requests[1].body
    # Messages already in the OpenAI shape go out unchanged.
    openai_convo = [{"role": "user", "content": "Weather in Paris and Oslo?"},
                    {"role": "assistant", "content": None, "tool_calls": CALLS},
                    {"role": "tool", "tool_call_id": "call_1", "content": "21 C"}]
    with FaultServer(ok()) as srv, client(srv.url) as c:
        c.chat(openai_convo, documents=[{"title": "t", "text": "d"}])
    assert srv.requests[0].body["messages"] == openai_convo
    assert srv.requests[0].body["documents"] == [{"title": "t", "text": "d"}]


def test_tool_calls_in_the_answer_come_back_on_the_reply():
    with FaultServer(tool_answer(CALLS), tool_answer(CALLS)) as srv, client(srv.url) as c:
        reply = c.chat(MSGS, tools=TOOLS)
        s = c.stream(MSGS, tools=TOOLS)
        pieces = list(s)
    assert reply.tool_calls == CALLS and reply.text == "" and reply.finish_reason == "tool_calls"
    assert pieces == [] and s.reply.tool_calls == CALLS and s.reply.finish_reason == "tool_calls"
    assert srv.requests[1].body["tools"] == TOOLS and srv.requests[1].body["stream"] is True


@pytest.mark.parametrize("message", [{"role": "assistant", "content": None, "tool_calls": "call it"},
                                     {"role": "assistant", "content": None, "tool_calls": []},
                                     {"role": "assistant", "tool_calls": [1]}])
def test_malformed_tool_calls_in_the_answer_raise_response_error(message):
    body = {"choices": [{"index": 0, "finish_reason": "tool_calls", "message": message}]}
    with FaultServer(malformed(json.dumps(body).encode())) as srv, client(srv.url) as c:
        with pytest.raises(CloudResponseError):
            c.chat(MSGS)
    assert len(srv.requests) == 1


def test_bad_tools_and_messages_are_refused_before_any_connection():
    c = CloudClient("https://example.com/v1", api_key="k")
    with ConnectionSpy() as spy:
        for bad in (dict(tools={"name": "f"}), dict(tools=[print]), dict(documents="text")):
            with pytest.raises(InvalidArgumentError):
                c.chat(MSGS, **bad)
        with pytest.raises(InvalidArgumentError):  # content may be left out only beside tool calls
            c.chat([{"role": "assistant", "content": None}])
    assert spy.connects == []


# --- issue 15: hostile endpoints (faults 1, 2, 3, 12) ---------------------------------------------------
def no_key_anywhere(exc: BaseException, key: str = KEY) -> None:
    """The key is in no text, argument, attribute, chained exception or traceback frame of ``exc``."""
    assert exc.__context__ is None and exc.__cause__ is None  # fault 12: not even hidden by `from None`
    texts = [str(exc), repr(exc), "".join(traceback.format_exception(exc)), repr(exc.args), repr(vars(exc))]
    tb = exc.__traceback__
    while tb is not None:  # edgelm's frames' locals, and one level into objects (a client's attributes)
        if tb.tb_frame.f_code.co_filename.startswith(EDGELM):  # (the tests' own frames hold the fake servers)
            for value in tb.tb_frame.f_locals.values():
                texts.append(repr(value))
                if hasattr(value, "__dict__"):
                    texts.append(repr(vars(value)))
        tb = tb.tb_next
    for text in texts:
        assert key not in text
        assert repr(key)[1:-1] not in text


def gzip_lie(body: bytes = b'{"choices": []}') -> object:
    """A 200 that says Content-Encoding: gzip and sends a body that is not gzip (httpx: DecodingError)."""
    def behave(conn, req):
        conn.respond(200, body, headers={"Content-Encoding": "gzip"})
    return behave


def raw_reply(data: bytes) -> object:
    """Write ``data`` as the whole answer, status line and all, then close."""
    def behave(conn, req):
        conn.send(data)
    return behave


def sse_flood(piece: str = "x", events_per_send: int = 200) -> object:
    """An SSE stream of tiny events that never ends on its own (it stops when the client goes away);
    ``sent`` counts the events it managed to send."""
    state = {"sent": 0}

    def behave(conn, req):
        conn.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n")
        event = sse_event(piece, chat=req.path.endswith("/chat/completions"))  # either endpoint's shape
        while not conn.stopping.is_set():
            conn.send(event * events_per_send)
            state["sent"] += events_per_send
    behave.state = state
    return behave


@pytest.mark.parametrize("behaviour, kind", [
    (gzip_lie(), CloudResponseError),
    (raw_reply(b"NOT HTTP AT ALL\r\n\r\n"), CloudError),                                      # RemoteProtocolError
    (raw_reply(b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n{\"choices\""), CloudError),   # body cut short
    (raw_reply(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"), CloudError),  # bad chunk size
    (raw_reply(b"HTTP/1.1 200 OK\r\nContent-Encoding: br\r\nContent-Length: 2\r\n\r\n{}"), CloudResponseError),
], ids=["gzip-lie", "garbage-status", "short-body", "bad-chunk", "unknown-encoding"])
def test_broken_http_from_the_server_is_a_typed_cloud_error(behaviour, kind, caplog):
    caplog.set_level(logging.DEBUG)
    for stream in (False, True):
        with FaultServer(behaviour) as srv, client(srv.url, max_retries=1) as c:
            with pytest.raises(kind) as info:
                list(c.stream(MSGS)) if stream else c.chat(MSGS)
        no_key_anywhere(info.value)
    assert KEY not in caplog.text


def _httpx_exceptions():
    """Every exception class httpx exports, built the way httpx builds them, with a request that carries the
    Authorization header and a message that quotes the key (as h11's errors do), raw and escaped."""
    import httpx

    request = httpx.Request("POST", "http://127.0.0.1:9/v1/chat/completions",
                            headers={"Authorization": f"Bearer {KEY}"})
    message = f"Illegal header value b'Bearer {KEY}\\n' ({KEY!r})"
    out = []
    for name in httpx.__all__:
        cls = getattr(httpx, name)
        if not (isinstance(cls, type) and issubclass(cls, Exception)):
            continue
        for make in (lambda: cls(message, request=request),
                     lambda: cls(message, request=request, response=httpx.Response(500, request=request)),
                     lambda: cls(message), lambda: cls()):
            try:
                out.append(make())
                break
            except TypeError:
                continue
    assert len(out) >= 25, [type(e).__name__ for e in out]  # httpx 0.28 exports 29
    return out


@pytest.mark.parametrize("where", ["send", "body", "stream"])
def test_every_httpx_exception_becomes_a_typed_cloud_error(where, monkeypatch, caplog):
    """Fault 1, the whole class: whatever httpx raises, at whatever point of a call, comes out as a CloudError
    without the key - so Hybrid falls back instead of losing the answer."""
    import httpx

    caplog.set_level(logging.DEBUG)
    current: list[BaseException] = []
    real_send, real_iter_raw = httpx.Client.send, httpx.Response.iter_raw

    def send(self, request, **kw):
        if where == "send":
            raise current[0]
        return real_send(self, request, **kw)

    def iter_raw(self, *a, **kw):
        for chunk in real_iter_raw(self, *a, **kw):
            yield chunk[:5]  # a first bit of the body, then the failure
            raise current[0]

    monkeypatch.setattr(httpx.Client, "send", send)
    monkeypatch.setattr(httpx.Response, "iter_raw", iter_raw)
    kinds = set()
    with FaultServer(ok("fine")) as srv, client(srv.url, max_retries=0) as c:
        for exc in _httpx_exceptions() + [RuntimeError(KEY), ValueError(KEY), RecursionError(), OSError(5, KEY)]:
            current[:] = [exc]
            with pytest.raises(CloudError) as info:
                list(c.stream(MSGS)) if where == "stream" else c.chat(MSGS)
            no_key_anywhere(info.value)
            kinds.add(type(info.value))
    assert CloudTimeoutError in kinds and CloudResponseError in kinds  # timeouts and bad answers keep their kind
    assert KEY not in caplog.text


def test_hostile_bodies_in_json_answers_are_response_errors():
    deep = b"[" * 100_000 + b"]" * 100_000
    huge_int = b'{"choices": [{"message": {"content": "x"}, "index": ' + b"9" * 5000 + b"}]}"
    for body in (deep, huge_int, b"\xff\xfe not utf-8", gzip.compress(deep)):
        with FaultServer(malformed(body)) as srv, client(srv.url) as c:
            with pytest.raises(CloudResponseError):
                c.chat(MSGS)
    with FaultServer(garbage_stream_with(b"data: " + deep + b"\n\n")) as srv, client(srv.url) as c:
        with pytest.raises(CloudResponseError):
            list(c.stream(MSGS))


def garbage_stream_with(event: bytes) -> object:
    def behave(conn, req):
        conn.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n" + event)
    return behave


def test_a_gzipped_answer_is_still_read():
    """Servers that compress although the client asks for identity are decoded (gzip, deflate)."""
    body = completion_json("squeezed")
    for encoding, data in (("gzip", gzip.compress(body)), ("deflate", zlib.compress(body))):
        def behave(conn, req, data=data, encoding=encoding):
            conn.respond(200, data, headers={"Content-Encoding": encoding})
        with FaultServer(behave) as srv, client(srv.url) as c:
            assert c.chat(MSGS).text == "squeezed"
        assert srv.requests[0].headers["accept-encoding"] == "identity"


# --- fault 2: keys ----------------------------------------------------------------------------------------
def test_a_key_from_a_secret_file_has_its_newline_stripped(monkeypatch):
    for given in (KEY + "\n", f"  {KEY}\r\n", "\t" + KEY):
        with FaultServer(ok("fine")) as srv, client(srv.url, api_key=given) as c:
            assert c.chat(MSGS).text == "fine"
        assert srv.requests[0].headers["authorization"] == f"Bearer {KEY}"
    monkeypatch.setenv("EDGELM_CLOUD_API_KEY", KEY + "\n")
    with FaultServer(ok("fine")) as srv, CloudClient(srv.url, timeout=5) as c:
        assert c.chat(MSGS).text == "fine"
    assert srv.requests[0].headers["authorization"] == f"Bearer {KEY}"


@pytest.mark.parametrize("bad", [KEY + "é", KEY[:10] + "\n" + KEY[10:], KEY + "\x00", "ключ-" + KEY, KEY + "\x7f",
                                 KEY[:5] + "\u2028" + KEY[5:], KEY + "😀"])
def test_a_key_no_header_can_carry_is_refused_at_construction_without_echoing_it(bad, monkeypatch):
    with ConnectionSpy() as spy:
        with pytest.raises(InvalidArgumentError) as info:
            CloudClient("http://127.0.0.1:9/v1", api_key=bad)
        raised = [info.value]
        if "\x00" not in bad:  # the environment cannot hold a NUL
            monkeypatch.setenv("EDGELM_CLOUD_API_KEY", bad)
            with pytest.raises(InvalidArgumentError) as from_env:
                CloudClient("http://127.0.0.1:9/v1")
            assert "EDGELM_CLOUD_API_KEY" in str(from_env.value)
            raised.append(from_env.value)
    assert spy.connects == []
    for exc in raised:
        assert "non-ASCII" in str(exc)
        no_key_anywhere(exc, bad)
        no_key_anywhere(exc, KEY[:10])  # not even a part of it


def test_every_rendering_of_the_key_is_scrubbed(caplog):
    """A key with characters that escape differently; a server that echoes it raw, repr-escaped, JSON-escaped,
    URL-encoded and in a response header (which httpcore logs at DEBUG)."""
    from urllib.parse import quote, quote_plus

    key = 'sk-a/b+c"d\\e=f\'g'
    forms = [key, repr(key)[1:-1], json.dumps(key)[1:-1], quote(key, safe=""), quote_plus(key)]
    caplog.set_level(logging.DEBUG)
    for form in forms:
        body = ("ERR " + form + " ERR").encode()

        def behave(conn, req, body=body, form=form):
            conn.respond(500, body, headers={"X-Echo": quote(form, safe="")})
        with FaultServer(behave) as srv, client(srv.url, api_key=key, max_retries=0) as c:
            with pytest.raises(CloudHTTPError) as info:
                c.chat(MSGS)
        assert "ERR *** ERR" in str(info.value)
        for f in forms:
            no_key_anywhere(info.value, f)
    for f in forms:
        assert f not in caplog.text and f not in "".join(r.getMessage() for r in caplog.records)


def test_a_key_cut_by_an_excerpt_is_still_scrubbed():
    """Messages quote the start of a bad body; the key straddling the cut must not leave a prefix behind."""
    for body in ((b"x" * 70 + KEY.encode() + b" not json"), b"data: " + b"y" * 50 + KEY.encode() + b" {\n\n"):
        behaviour = malformed(body) if not body.startswith(b"data:") else garbage_stream_with(body)
        with FaultServer(behaviour) as srv, client(srv.url) as c:
            with pytest.raises(CloudResponseError) as info:
                list(c.stream(MSGS)) if body.startswith(b"data:") else c.chat(MSGS)
        no_key_anywhere(info.value, KEY[:8])


def test_extra_headers_are_checked_and_secret_ones_scrubbed():
    with pytest.raises(InvalidArgumentError) as info:
        CloudClient("http://127.0.0.1:9/v1", headers={"api-key": KEY + "\n"})
    no_key_anywhere(info.value)
    with pytest.raises(InvalidArgumentError):
        CloudClient("http://127.0.0.1:9/v1", headers={"bad name": "v"})
    with FaultServer(status(400, body=b"echo " + KEY.encode())) as srv:
        with CloudClient(srv.url, headers={"api-key": KEY}, timeout=5) as c:
            with pytest.raises(CloudHTTPError) as info:
                c.chat(MSGS)
    assert srv.requests[0].headers["api-key"] == KEY
    no_key_anywhere(info.value)


# --- fault 3: floods and the one deadline ------------------------------------------------------------------
def test_a_flood_of_tiny_events_is_cut_at_max_tokens_and_reading_stops():
    flood = sse_flood()
    with FaultServer(flood) as srv, client(srv.url, timeout=10) as c:
        t0 = time.monotonic()
        s = c.stream(MSGS, max_tokens=20)
        pieces = list(s)
        elapsed = time.monotonic() - t0
        sent_at_close = flood.state["sent"]
        time.sleep(0.3)  # the client closed the connection: the server's sends fail and it stops
        assert flood.state["sent"] - sent_at_close <= 400
    assert len(pieces) == 20 and s.reply.finish_reason == "length"
    assert elapsed < 2.0  # not the 10 s deadline: reading stopped at the cap


def test_few_huge_pieces_are_cut_by_text_size():
    """Without the server's own count, a piece's bytes count too (TEXT_BYTES_PER_TOKEN per token)."""
    from edgelm.cloud import TEXT_BYTES_PER_TOKEN

    with FaultServer(sse_flood(piece="y" * 50_000, events_per_send=1)) as srv, client(srv.url) as c:
        s = c.stream(MSGS, max_tokens=20)
        text = "".join(s)
    assert len(text) <= 20 * TEXT_BYTES_PER_TOKEN and s.reply.finish_reason == "length"
    big = ok("word " * 5000)  # a JSON answer far past max_tokens: cut the same way
    with FaultServer(big) as srv, client(srv.url, max_answer_bytes=1 << 20) as c:
        reply = c.chat(MSGS, max_tokens=20)
    assert len(reply.text.encode()) <= 20 * TEXT_BYTES_PER_TOKEN and reply.finish_reason == "length"


def test_an_honest_answer_of_max_tokens_is_not_cut():
    text = " ".join(["abcdefghijklmnopqrstuvwxyz0123"] * 20)  # 20 pieces of 30-31 bytes: just inside the cap
    with FaultServer(ok(text)) as srv, client(srv.url) as c:
        s = c.stream(MSGS, max_tokens=20)
        assert "".join(s) == text and s.reply.finish_reason == "stop"
        assert c.chat(MSGS, max_tokens=20).text == text


def test_the_byte_cap_stops_a_huge_body_and_is_configurable():
    from edgelm.cloud import ANSWER_BYTES_BASE, ANSWER_BYTES_PER_TOKEN

    def endless_json(conn, req):  # a JSON answer whose string never ends
        conn.send(b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n'
                  b'{"choices": [{"message": {"content": "')
        while not conn.stopping.is_set():
            conn.send(b"z" * 65536)

    def keepalive_flood(conn, req):  # events that carry nothing: only the byte cap (or the deadline) ends it
        conn.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n")
        while not conn.stopping.is_set():
            conn.send(b": ping\n" * 10000)

    cap = ANSWER_BYTES_BASE + ANSWER_BYTES_PER_TOKEN * 20
    for behaviour, call in ((endless_json, lambda c: c.chat(MSGS, max_tokens=20)),
                            (keepalive_flood, lambda c: list(c.stream(MSGS, max_tokens=20)))):
        with FaultServer(behaviour) as srv, client(srv.url, timeout=10) as c:
            t0 = time.monotonic()
            with pytest.raises(CloudResponseError) as info:
                call(c)
        assert f"more than {cap} bytes" in str(info.value) and time.monotonic() - t0 < 3
    with FaultServer(ok("a" * 3000)) as srv, client(srv.url, max_answer_bytes=1000) as c:
        with pytest.raises(CloudResponseError, match="more than 1000 bytes"):
            c.chat(MSGS)
    with pytest.raises(InvalidArgumentError):
        CloudClient("http://127.0.0.1:9/v1", max_answer_bytes=0)


def test_a_flood_does_not_grow_memory():
    import tracemalloc

    tracemalloc.start()
    try:
        with FaultServer(sse_flood()) as srv, client(srv.url) as c:
            list(c.stream(MSGS, max_tokens=500))
        with FaultServer(sse_flood(piece="q" * 4000, events_per_send=4)) as srv, client(srv.url) as c:
            list(c.stream(MSGS))  # no max_tokens: the 16 MiB byte cap ends it
    except CloudResponseError:
        pass
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < 48 << 20, peak  # the uncapped stream above would have grown until the deadline


@pytest.mark.parametrize("phase", ["headers", "body", "stream"])
def test_trickling_cannot_stretch_the_one_deadline(phase):
    """A server that sends a byte just before each read would time out: the call still ends at its one
    deadline (the timeout is total, not per read). A per-read timeout would let this run to ~2x the
    deadline (body, stream) or for as long as the server likes (headers)."""
    deadline = 2.0
    head = {"headers": b"",
            "body": b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n",
            "stream": b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n"}[phase]

    def trickle(conn, req):
        conn.send(head)
        until = time.monotonic() + 3 * deadline  # (bounded, so a client without one deadline fails, not hangs)
        while not conn.stopping.is_set() and time.monotonic() < until:
            time.sleep(0.9 * deadline)
            conn.send(b"H" if phase == "headers" else b" " if phase == "body" else b": \n")

    with FaultServer(trickle) as srv, client(srv.url, timeout=deadline, max_retries=3) as c:
        t0 = time.monotonic()
        with pytest.raises(CloudTimeoutError) as info:
            list(c.stream(MSGS)) if phase == "stream" else c.chat(MSGS)
        elapsed = time.monotonic() - t0
    assert deadline - 0.1 <= elapsed < deadline + 1.2, elapsed
    no_key_anywhere(info.value)


def test_errors_carry_no_chain_for_every_failure_kind():
    """Fault 12: not even a hidden __context__, for each path an error can come from."""
    faults = [status(500), status(400), hang(), reset(), malformed(b"nope"), gzip_lie(), broken_stream(after=1)]
    for behaviour in faults:
        for stream in (False, True):
            with FaultServer(behaviour) as srv, client(srv.url, timeout=0.5, max_retries=1) as c:
                with pytest.raises(CloudError) as info:
                    list(c.stream(MSGS)) if stream else c.chat(MSGS)
            no_key_anywhere(info.value)


def test_a_flood_of_tool_call_fragments_is_capped_too():
    """Tool-call arguments in endless tiny fragments: cut by their bytes (no quadratic joining); fragments that
    carry nothing meet the byte cap."""
    from edgelm.cloud import TEXT_BYTES_PER_TOKEN

    def fragments(arguments):
        def behave(conn, req):
            conn.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n")
            first = {"index": 0, "id": "c1", "type": "function", "function": {"name": "f", "arguments": ""}}
            conn.send(b"data: " + json.dumps({"choices": [{"delta": {"tool_calls": [first]}}]}).encode() + b"\n\n")
            more = {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": arguments}}]}}]}
            while not conn.stopping.is_set():
                conn.send((b"data: " + json.dumps(more).encode() + b"\n\n") * 500)
        return behave

    with FaultServer(fragments("abcde")) as srv, client(srv.url, timeout=10) as c:
        t0 = time.monotonic()
        s = c.stream(MSGS, max_tokens=20, tools=TOOLS)
        assert list(s) == [] and s.reply.finish_reason == "length"
    (call,) = s.reply.tool_calls
    assert len(call["function"]["arguments"]) <= 20 * TEXT_BYTES_PER_TOKEN and time.monotonic() - t0 < 3
    with FaultServer(fragments("")) as srv, client(srv.url, timeout=10) as c:
        with pytest.raises(CloudResponseError, match="bytes"):
            list(c.stream(MSGS, max_tokens=20, tools=TOOLS))
