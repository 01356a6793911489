"""A hostile cloud endpoint, fuzzed (issue 15, faults 1, 2, 3 and 12).

A loopback server (tests/faults.py) answers each request with a reply that hypothesis draws: any status, a
body that is JSON of the wrong types, garbage, an SSE stream of junk or a flood, gzip that is not gzip, an
unknown encoding, broken chunked framing, a connection reset or a hang, with the API key echoed back in the
body and the headers. Whatever comes back, the client must give a proper reply or a typed ``CloudError``:
never another exception, never the key (in messages, args, chained exceptions, traceback frames or DEBUG
logs), never past its deadline by more than a little slack, never more than max_tokens. The last tests go
through ``edgelm.Hybrid`` and the CLI: every such fault is a local answer with a reason, not a lost one.
"""
from __future__ import annotations

import gzip
import json
import logging
import os
import subprocess
import sys
import time
import zlib

import pytest

pytest.importorskip("httpx")
pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import edgelm  # noqa: E402
from edgelm.cloud import TEXT_BYTES_PER_TOKEN, CloudClient, CloudReply  # noqa: E402
from edgelm.errors import CloudError  # noqa: E402

from faults import FaultServer, completion_json, ok, sse_event  # noqa: E402
from test_cloud import KEY, MSGS, gzip_lie, no_key_anywhere, raw_reply, sse_flood  # noqa: E402

TIMEOUT = 0.6      # the client's one deadline in the fuzz
SLACK = 1.4        # what a call may take past it (thread scheduling on a busy 2-core machine)
MAX_TOKENS = 16
FUZZ = settings(max_examples=80, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# --- what a hostile server may send ---------------------------------------------------------------------
_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                 max_size=4), max_leaves=12)
_texts = st.one_of(st.text(max_size=40), st.just(KEY), st.just(f"leak {KEY!r} {json.dumps(KEY)}"))


@st.composite
def _completion(draw) -> bytes:
    """A chat or text completion whose fields may be of any JSON type."""
    pick = lambda good: draw(st.one_of(st.just(good), _json))  # noqa: E731
    message = pick({"role": "assistant", "content": draw(_texts), "tool_calls": pick(None)})
    body = {"choices": pick([{"index": 0, "message": message, "text": pick(draw(_texts)),
                              "finish_reason": pick("stop")}]),
            "model": pick("m"), "usage": pick({"prompt_tokens": pick(3), "completion_tokens": pick(4)})}
    if draw(st.booleans()):
        body["error"] = pick({"message": KEY})
    return json.dumps(body).encode()


@st.composite
def _event(draw) -> bytes:
    kind = draw(st.sampled_from(["piece", "piece", "json", "garbage", "comment", "done", "tool", "usage"]))
    if kind == "piece":
        return sse_event(draw(_texts), draw(st.sampled_from([None, None, "stop", "length"])),
                         chat=draw(st.booleans()))
    if kind == "json":
        return b"data: " + json.dumps(draw(_json)).encode() + b"\n\n"
    if kind == "garbage":
        return b"data: " + draw(st.binary(max_size=60)).replace(b"\n", b" ") + b"\n\n"
    if kind == "comment":
        return b": keep-alive " + KEY.encode() + b"\n"
    if kind == "tool":
        frag = {"index": draw(st.one_of(st.integers(0, 3), _json)), "id": "c",
                "function": {"name": "f", "arguments": draw(_texts)}}
        return b"data: " + json.dumps({"choices": [{"delta": {"tool_calls": [frag]}}]}).encode() + b"\n\n"
    if kind == "usage":
        return b"data: " + json.dumps({"choices": [], "usage": {"completion_tokens": draw(_json)}}).encode() + b"\n\n"
    return b"data: [DONE]\n\n"


@st.composite
def _body(draw) -> bytes:
    kind = draw(st.sampled_from(["completion", "completion", "json", "bytes", "sse", "sse", "flood", "huge",
                                 "deep", "bigint"]))
    if kind == "completion":
        return draw(_completion())
    if kind == "json":
        return json.dumps(draw(_json)).encode()
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    if kind == "sse":
        return b"".join(draw(st.lists(_event(), max_size=12)))
    if kind == "flood":  # tiny pieces, far more than max_tokens
        return sse_event("x") * draw(st.integers(100, 20_000)) + b"data: [DONE]\n\n"
    if kind == "huge":  # one answer far past the byte cap
        return b'{"choices": [{"message": {"content": "' + b"h" * draw(st.integers(1 << 20, 3 << 20)) + b'"}}]}'
    if kind == "deep":
        depth = draw(st.integers(1_000, 200_000))
        return b"[" * depth + b"]" * depth
    return b'{"choices": [{"index": ' + b"7" * draw(st.integers(4_301, 20_000)) + b"}]}"


@st.composite
def hostile_reply(draw) -> dict:
    return {"status": draw(st.sampled_from([200, 200, 200, 200, 201, 204, 302, 400, 401, 404, 429, 500, 503])),
            "retry_after": draw(st.sampled_from([None, "0", "0.01", "-3", "nan", "inf", "1e309", "soon",
                                                 "Wed, 21 Oct 2015 07:28:00 GMT"])),
            "encoding": draw(st.sampled_from([None, None, None, "gzip", "gzip-lie", "deflate", "br",
                                              "gzip, gzip"])),
            "framing": draw(st.sampled_from(["length", "length", "close", "chunked", "bad-chunked", "too-short"])),
            "body": draw(_body()),
            "end": draw(st.sampled_from(["close"] * 6 + ["reset", "hang"])),
            "echo_header": draw(st.booleans()),
            "mode": draw(st.sampled_from(["chat", "stream", "complete", "stream_complete"])),
            "max_tokens": draw(st.sampled_from([None, MAX_TOKENS, MAX_TOKENS]))}


def _serve(spec: dict):
    """The behaviour for tests/faults.FaultServer: write ``spec`` as raw HTTP."""
    def behave(conn, req) -> None:
        body = spec["body"]
        head = [f"HTTP/1.1 {spec['status']} X", "Content-Type: "
                + ("text/event-stream" if req.streaming else "application/json")]
        enc = spec["encoding"]
        if enc == "gzip":
            body = gzip.compress(body, 1)
        elif enc == "deflate":
            body = zlib.compress(body, 1)
        if enc:
            head.append(f"Content-Encoding: {'gzip' if enc == 'gzip-lie' else enc}")
        if spec["retry_after"] is not None:
            head.append(f"Retry-After: {spec['retry_after']}")
        if spec["echo_header"]:
            head.append(f"X-Echo: Bearer {KEY}")
        framing = spec["framing"]
        if framing == "length":
            head.append(f"Content-Length: {len(body)}")
        elif framing == "too-short":  # promises more than it sends
            head.append(f"Content-Length: {len(body) + 100}")
        elif framing in ("chunked", "bad-chunked"):
            head.append("Transfer-Encoding: chunked")
            step = 4096
            parts = [b"%x\r\n%s\r\n" % (len(body[i:i + step]), body[i:i + step]) for i in range(0, len(body), step)]
            body = b"".join(parts) + (b"zz\r\n" if framing == "bad-chunked" else b"0\r\n\r\n")
        head.append("Connection: close")
        conn.send(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        if spec["end"] == "hang":
            conn.stopping.wait(TIMEOUT + SLACK + 2)
        elif spec["end"] == "reset":
            import socket
            import struct
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.sock.close()
    return behave


@pytest.fixture(scope="module")
def server():
    current: dict = {}

    def dispatch(conn, req):
        _serve(current["spec"])(conn, req)
    with FaultServer(dispatch) as srv:
        srv.current = current
        yield srv


def _ask(c: CloudClient, mode: str, max_tokens: int | None):
    """One call in ``mode``: the reply (and the pieces, for streams)."""
    if mode == "chat":
        return c.chat(MSGS, max_tokens=max_tokens), None
    if mode == "complete":
        return c.complete("Once upon a time", max_tokens=max_tokens), None
    s = c.stream(MSGS, max_tokens=max_tokens) if mode == "stream" else \
        c.stream_complete("Once upon a time", max_tokens=max_tokens)
    pieces = list(s)
    return s.reply, pieces


@FUZZ
@given(spec=hostile_reply())
def test_any_hostile_reply_is_a_reply_or_a_typed_error_without_the_key(server, caplog, spec):
    caplog.set_level(logging.DEBUG)
    caplog.clear()
    server.current["spec"] = spec
    c = CloudClient(server.url, model="m", api_key=KEY + "\n", timeout=TIMEOUT, max_retries=1, backoff=0.01,
                    backoff_max=0.02, connect_timeout=TIMEOUT)
    t0 = time.monotonic()
    try:
        reply, pieces = _ask(c, spec["mode"], spec["max_tokens"])
    except CloudError as exc:  # anything else escapes and fails the test
        no_key_anywhere(exc)
    else:
        assert isinstance(reply, CloudReply)
        if pieces is not None:
            assert "".join(pieces) == reply.text
        if spec["max_tokens"] is not None:  # the cap holds whatever the server sent
            assert len(reply.text.encode()) <= spec["max_tokens"] * TEXT_BYTES_PER_TOKEN
            assert pieces is None or len(pieces) <= spec["max_tokens"]
    finally:
        c.close()
    elapsed = time.monotonic() - t0
    assert elapsed < TIMEOUT + SLACK, (elapsed, {k: v for k, v in spec.items() if k != "body"})
    assert KEY not in caplog.text
    assert all(KEY not in r.getMessage() for r in caplog.records)


@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(piece=st.text(min_size=1, max_size=200), per_send=st.integers(1, 500),
       max_tokens=st.integers(1, 64), reported=st.one_of(st.none(), st.integers(0, 10)),
       mode=st.sampled_from(["stream", "stream_complete"]))
def test_a_flood_is_capped_by_tokens_and_stops_early(piece, per_send, max_tokens, reported, mode):
    """Endless events of any size (and a server that under-reports its usage): the answer stops at
    max_tokens, counted conservatively, well before the deadline."""
    chat = mode == "stream"
    event = json.loads(sse_event(piece, chat=chat)[6:])
    if reported is not None:
        event["usage"] = {"completion_tokens": reported}
    data = b"data: " + json.dumps(event).encode() + b"\n\n"

    def flood(conn, req):
        conn.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n")
        while not conn.stopping.is_set():
            conn.send(data * per_send)

    with FaultServer(flood) as srv, CloudClient(srv.url, api_key=KEY, timeout=5.0) as c:
        t0 = time.monotonic()
        try:
            reply, pieces = _ask(c, mode, max_tokens)
        except CloudError as exc:  # only the byte cap may end it instead (huge pieces)
            assert "bytes" in str(exc)
            no_key_anywhere(exc)
        else:
            assert reply.finish_reason == "length"
            assert len(pieces) <= max_tokens  # (none: the first piece alone was past the text cap)
            assert len(reply.text.encode()) <= max_tokens * TEXT_BYTES_PER_TOKEN
        assert time.monotonic() - t0 < 3.0


# --- through Hybrid and the CLI: a fault is a fallback with a reason ---------------------------------------------
HYBRID_FAULTS = {
    "gzip-lie": gzip_lie(),
    "garbage-status": raw_reply(b"NOT HTTP\r\n\r\n"),
    "bad-chunk": raw_reply(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"),
    "unknown-encoding": raw_reply(b"HTTP/1.1 200 OK\r\nContent-Encoding: br\r\nContent-Length: 2\r\n\r\n{}"),
    "deep-json": raw_reply(b"HTTP/1.1 200 OK\r\n\r\n" + b"[" * 100_000),
    "huge-json": raw_reply(b'HTTP/1.1 200 OK\r\n\r\n{"choices": [{"message": {"content": "' + b"h" * (2 << 20)),
    "echoed-key": raw_reply(b"HTTP/1.1 400 Bad\r\nX-Echo: " + KEY.encode() + b"\r\n\r\nbad key " + KEY.encode()),
}


@pytest.fixture(scope="module")
def local():
    return edgelm.load(threads=1)


@pytest.mark.parametrize("fault", sorted(HYBRID_FAULTS))
def test_hybrid_answers_locally_with_a_reason(local, fault, caplog):
    caplog.set_level(logging.DEBUG)
    with FaultServer(HYBRID_FAULTS[fault]) as srv, \
            CloudClient(srv.url, api_key=KEY + "\n", timeout=3, max_retries=0) as cloud:
        hy = edgelm.Hybrid(local, cloud)
        r = hy.generate("Once upon a time", prefer="cloud", max_new_tokens=8, seed=0)
        s = hy.stream("Once upon a time", prefer="cloud", max_new_tokens=8, seed=0)
        streamed = "".join(s)
    expected = local.generate("Once upon a time", max_new_tokens=8, seed=0).text
    for result, text in ((r, r.text), (s.result, streamed)):
        assert result.source == "local" and text == expected
        assert result.fallback and result.fallback.startswith("cloud ")
        assert KEY not in result.fallback and KEY not in result.describe()
    assert KEY not in caplog.text


def test_hybrid_gets_a_capped_cloud_answer_from_a_flood(local):
    with FaultServer(sse_flood()) as srv, CloudClient(srv.url, api_key=KEY, timeout=10) as cloud:
        hy = edgelm.Hybrid(local, cloud)
        t0 = time.monotonic()
        s = hy.stream("Once upon a time", prefer="cloud", max_new_tokens=20)
        text = "".join(s)
    assert time.monotonic() - t0 < 3
    assert s.result.source == "cloud" and text == "x" * 20 and s.result.finish_reason == "length"


def test_cli_falls_back_without_a_traceback_or_the_key():
    """`edgelm generate --route cloud` against a server that lies about gzip, with the key read from a secret
    file (a trailing newline): the local answer, the reason, exit 0, and the key nowhere in the output."""
    with FaultServer(gzip_lie()) as srv:
        env = {**os.environ, "EDGELM_CLOUD_API_KEY": KEY + "\n", "PYTHONWARNINGS": "ignore"}
        out = subprocess.run([sys.executable, "-m", "edgelm.cli", "generate", "Once upon a time", "-n", "8",
                              "--threads", "1", "--cloud-url", srv.url, "--route", "cloud"],
                             capture_output=True, text=True, timeout=120, env=env, stdin=subprocess.DEVNULL)
        assert srv.requests and srv.requests[0].headers["authorization"] == f"Bearer {KEY}"
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr and "[local]" in out.stderr and "malformed" in out.stderr
    assert KEY not in out.stdout + out.stderr


def test_cli_refuses_a_key_no_header_can_carry_with_one_clear_error():
    bad = KEY[:12] + "é" + KEY[12:]
    env = {**os.environ, "EDGELM_CLOUD_API_KEY": bad, "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([sys.executable, "-m", "edgelm.cli", "generate", "Once upon a time", "-n", "4",
                          "--threads", "1", "--cloud-url", "http://127.0.0.1:9/v1", "--route", "cloud"],
                         capture_output=True, text=True, timeout=120, env=env, stdin=subprocess.DEVNULL)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "EDGELM_CLOUD_API_KEY" in out.stderr and "non-ASCII" in out.stderr
    assert bad not in out.stderr and KEY[:12] not in out.stderr + out.stdout
