"""CloudClient against real loopback servers that misbehave on purpose (tests/faults.py).

Every test counts what actually reached the server, so "retried" and "did not retry" are facts on the wire,
not assumptions about the client's internals. Backoffs are tiny so the whole file runs in a few seconds.
"""
from __future__ import annotations

import json
import logging
import time
import traceback

import pytest

pytest.importorskip("httpx")

from edgelm.cloud import CloudClient, _parse_retry_after  # noqa: E402
from edgelm.errors import (CloudError, CloudHTTPError, CloudResponseError, CloudTimeoutError,  # noqa: E402
                           InvalidArgumentError)

from faults import (ConnectionSpy, FaultServer, broken_stream, echo, free_port_refusing, garbage_stream,  # noqa: E402
                    hang, malformed, ok, reset, status)

KEY = "sk-test-SECRET-0123456789abcdef"
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
