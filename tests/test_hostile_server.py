"""Hostile clients against `edgelm serve` (issue 15): hypothesis fuzzes request bodies and headers.

One real `edgelm serve` process (loopback, the stories260K export, an API key) takes every example. Whatever
arrives, the answer is a 2xx or a 4xx, never a 5xx; every error is OpenAI-shaped
(``{"error": {"message", "type", "param", "code"}}``); a stream ends with ``data: [DONE]``; the server's log
holds no traceback and never the key; and the server's RSS stays near where it started.
"""
from __future__ import annotations

import json
import os
import secrets

import pytest

from conftest import needs_shared

pytestmark = [needs_shared(), pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc")]

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

KEY = "sk-hostile-" + secrets.token_hex(12)
MAX_BODY = 64 * 1024
RSS_MARGIN_MB = 60  # generous: allocator slack, not a leak, stays well under it
# EDGELM_FUZZ_EXAMPLES=1000 for a deeper local run; CI keeps to 100 per test (about 10-20 s each).
FUZZ = settings(max_examples=int(os.environ.get("EDGELM_FUZZ_EXAMPLES", "100")), deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                         HealthCheck.data_too_large])


def _rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def served(stories_int8):
    """(url, ServeProcess, RSS in MB after warm-up): one server for the whole module."""
    from test_server_cli import ServeProcess

    sp = ServeProcess(str(stories_int8), "--port", "0", "--threads", "1", "--workers", "2",
                      "--max-body-bytes", str(MAX_BODY), env={"EDGELM_API_KEY": KEY})
    try:
        url = sp.wait_for_url()
        with httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {KEY}"}) as http:
            for _ in range(5):  # warm up: what the first requests allocate stays for later ones
                http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                        "max_tokens": 8, "stream": True})
                http.post("/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 8})
        yield url, sp, _rss_mb(sp.proc.pid)
    finally:
        sp.kill()


# --- strategies ----------------------------------------------------------------------------------------------
# Each request starts valid and gets a few hostile mutations, so the fuzz reaches every layer (headers, body,
# fields, the model) instead of stopping at the first bad field.
plain_texts = st.text(st.characters(), max_size=40)
# Text with a lone surrogate in it: json.dumps writes it as a \ud800-style escape (valid JSON, not text).
surrogate_texts = st.tuples(plain_texts, st.characters(categories=["Cs"]), plain_texts).map("".join)
texts = st.one_of(plain_texts, plain_texts, plain_texts, surrogate_texts)
numbers = st.one_of(st.integers(-10, 600), st.integers(), st.integers(min_value=10**30, max_value=10**60),
                    st.floats(allow_nan=True, allow_infinity=True))
json_values = st.recursive(st.none() | st.booleans() | numbers | texts,
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
                           max_leaves=16)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "user"]),
                                           "content": texts}), min_size=1, max_size=3)
tool_call_turn = st.fixed_dictionaries({"role": st.just("assistant"), "content": st.none(), "tool_calls": st.lists(
    st.fixed_dictionaries({"id": texts, "type": st.just("function"), "function": st.fixed_dictionaries(
        {"name": texts, "arguments": st.one_of(texts, st.just('{"city": "Oslo"}'),
                                               json_values.map(json.dumps))})}), min_size=1, max_size=2)})
VALID = {  # what a well-behaved client sends in each field
    "max_tokens": st.integers(1, 16), "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1),
    "top_k": st.integers(0, 50), "seed": st.integers(0, 2**32), "stop": st.lists(texts, max_size=3),
    "stream": st.booleans(), "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "min_p": st.floats(0, 1), "repetition_penalty": st.floats(1, 2),
}
COMPLETION_KEYS = [*VALID, "prompt", "model", "n", "echo", "best_of", "suffix", "logprobs", "logit_bias", "junk"]
CHAT_KEYS = [*VALID, "messages", "model", "tools", "tool_choice", "documents", "chat_template_kwargs",
             "max_completion_tokens", "response_format", "logprobs", "functions", "junk"]
# Wide but legal bodies, and the shapes that broke the parser (issue 15, fault 8).
hostile_values = st.one_of(
    json_values, json_values,
    st.integers(1, 2000).map(lambda n: json.loads("[" * n + "]" * n) if n < 900 else [[[]]]),
    st.integers(min_value=10**4000, max_value=10**4200))


@st.composite
def mutated(draw, base: dict, keys: list[str]) -> dict:
    body = dict(base)
    for name, strategy in VALID.items():
        if name not in body and draw(st.integers(0, 3)) == 0:
            body[name] = draw(strategy)
    for _ in range(draw(st.integers(0, 2))):  # a few fields replaced by anything, or removed
        key = draw(st.sampled_from(keys))
        if draw(st.integers(0, 4)) == 0:
            body.pop(key, None)
        else:
            body[key] = draw(hostile_values)
    return body


@st.composite
def completion_bodies(draw) -> dict:
    prompt = draw(st.one_of(texts.filter(bool), st.lists(st.integers(0, 511), min_size=1, max_size=30)))
    return draw(mutated({"prompt": prompt, "max_tokens": draw(VALID["max_tokens"])}, COMPLETION_KEYS))


@st.composite
def chat_bodies(draw) -> dict:
    msgs = draw(messages)
    if draw(st.booleans()):
        msgs = [*msgs[:1], draw(tool_call_turn), {"role": "tool", "tool_call_id": "c", "content": draw(texts)}]
    base = {"messages": msgs, "max_tokens": draw(VALID["max_tokens"])}
    if draw(st.booleans()):
        base["tools"] = [{"type": "function", "function": {"name": draw(texts), "parameters": draw(json_values)}}]
    return draw(mutated(base, CHAT_KEYS))


# Bodies that are not what json.dumps writes: garbage, and the shapes that broke the parser (issue 15, fault 8).
raw_bodies = st.one_of(
    st.binary(max_size=2000),
    st.integers(1, 30_000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(4000, 6_000).map(lambda n: b'{"prompt": "a", "max_tokens": ' + b"9" * n + b"}"),
    st.sampled_from([b"", b"null", b"[]", b'"text"', b"1e99999", b"NaN", b'{"prompt": "\\ud800"}',
                     b'{"messages": [{"role": "user", "content": "\\udfff"}]}', b"\xef\xbb\xbf{}", b'{"prompt": "a"',
                     b'{"prompt": "a\xed\xa0\x80"}', b'{"messages": [{"role": "user", "content": "\xff"}]}']))
# Header values httpx will send (it refuses control characters and surrounding blanks itself); the raw-socket
# test below sends the rest.
header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40).map(str.strip)
HEADER_CHOICES = {
    "Content-Type": st.sampled_from(["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; "
                                     "boundary=b", "application/vnd.api+json", "application/json; charset=latin-1"]),
    "Host": st.sampled_from(["localhost", "[::1]", "evil.example", "attacker.test:80", "a" * 200, "127.0.0.1:1",
                             "[::1", "::1]", "app.localhost"]),
    "Origin": st.sampled_from(["https://evil.example", "null", "http://localhost:3000"]),
    "Authorization": st.sampled_from([f"bearer {KEY}", "Bearer wrong", KEY, f"Basic {KEY}", f"Bearer  {KEY}"]),
    "Expect": st.just("100-continue"), "Accept-Encoding": st.just("gzip, br"), "X-Forwarded-Host": header_text,
    "Cookie": header_text,
}


@st.composite
def headers(draw) -> dict[str, str]:
    out = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    for _ in range(draw(st.integers(0, 2))):
        name = draw(st.sampled_from(sorted(HEADER_CHOICES)))
        if draw(st.integers(0, 5)) == 0:
            out.pop(name, None)
        else:
            out[name] = draw(st.one_of(HEADER_CHOICES[name], header_text))
    return out


# --- checks --------------------------------------------------------------------------------------------------
def _check(r: httpx.Response, text: str) -> None:
    assert r.status_code < 500, (r.status_code, text[:500])
    assert KEY not in text
    if r.status_code >= 400:
        err = json.loads(text)["error"]
        assert set(err) == {"message", "type", "param", "code"}, err
        assert isinstance(err["message"], str) and err["message"]
    elif r.headers.get("content-type", "").startswith("text/event-stream"):
        lines = [line for line in text.split("\n") if line]
        assert lines and all(line.startswith("data: ") for line in lines), lines[:3]
        assert lines[-1] == "data: [DONE]", lines[-3:]
        for line in lines[:-1]:
            json.loads(line[len("data: "):])
    elif r.status_code == 200:
        assert "choices" in json.loads(text) or "data" in json.loads(text) or "status" in json.loads(text)


def _send(url: str, path: str, body: bytes, hdrs: dict[str, str]) -> None:
    with httpx.Client(base_url=url, timeout=60) as http:  # a fresh connection: a refused one closes its own
        with http.stream("POST", path, content=body, headers=hdrs) as r:
            text = r.read().decode("utf-8", "replace")
    _check(r, text)


def _log_and_rss_are_clean(sp, since: int, rss_start: float) -> None:
    log = "".join(sp.lines[since:])
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-3000:]
    assert " ERROR " not in log, [line for line in log.splitlines() if " ERROR " in line][:5]
    assert KEY not in log
    assert sp.proc.poll() is None, "the server died"
    rss = _rss_mb(sp.proc.pid)
    assert rss - rss_start < RSS_MARGIN_MB, f"RSS {rss_start:.0f} -> {rss:.0f} MB"


def _json_bytes(body: dict) -> bytes:
    return json.dumps(body).encode()  # ensure_ascii: lone surrogates become \udXXX escapes


def _fuzz(served, send, **strategies) -> None:
    """Run ``send(url, **example)`` on FUZZ examples of ``strategies``, then check the server's log and RSS."""
    url, sp, rss_start = served
    since = len(sp.lines)
    FUZZ(given(**strategies)(lambda **example: send(url, **example)))()
    _log_and_rss_are_clean(sp, since, rss_start)


@pytest.mark.slow
def test_fuzzed_completion_requests(served):
    _fuzz(served, lambda url, body, hdrs: _send(url, "/v1/completions", _json_bytes(body), hdrs),
          body=completion_bodies(), hdrs=headers())


@pytest.mark.slow
def test_fuzzed_chat_requests(served):
    _fuzz(served, lambda url, body, hdrs: _send(url, "/v1/chat/completions", _json_bytes(body), hdrs),
          body=chat_bodies(), hdrs=headers())


@pytest.mark.slow
def test_fuzzed_raw_bodies(served):
    _fuzz(served, _send, body=raw_bodies, hdrs=headers(),
          path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/v1/nowhere"]))


# Request heads httpx would never send: control characters, bad framing, odd methods and versions.
head_lines = st.one_of(
    st.sampled_from([b"POST /v1/completions HTTP/1.1", b"GET / HTTP/1.0", b"OPTIONS * HTTP/1.1",
                     b"POST /v1/chat/completions HTTP/2.0", b"BREW /v1/completions HTTP/1.1", b"GET /%ff%00 HTTP/1.1",
                     b"GET /v1/models/" + b"a" * 5000 + b" HTTP/1.1", b"POST /v1/completions"]),
    st.binary(max_size=60).filter(lambda b: b"\n" not in b))
raw_headers = st.lists(st.one_of(
    st.sampled_from([b"Host: 127.0.0.1", b"Host: evil.example", b"Host:", b"Host: 127.0.0.1\r\nHost: localhost",
                     b"Content-Type: application/json", b"Content-Length: 5", b"Content-Length: -1",
                     b"Content-Length: 99999999999999999999999", b"Content-Length: 2, 3", b"Transfer-Encoding: chunked",
                     b"Transfer-Encoding: gzip", b"Expect: 100-continue", b"Origin: https://evil.example",
                     b"Authorization: Bearer " + KEY.encode(), b"X-Big: " + b"x" * 20_000, b" folded: header",
                     b"Bad Header: x", b"Connection: close"]),
    st.binary(max_size=60).filter(lambda b: b"\n" not in b)), max_size=6)


@pytest.mark.slow
def test_fuzzed_raw_requests_over_a_socket(served):
    """Malformed HTTP gets an HTTP answer under 500 (OpenAI-shaped when it is an error) or a closed connection."""
    import socket

    def send(url, line, hdrs, body):
        host, port = url.split("://")[1].rsplit(":", 1)
        request = line + b"\r\n" + b"".join(h + b"\r\n" for h in hdrs) + b"\r\n" + body
        with socket.create_connection((host, int(port)), timeout=30) as s:
            try:
                s.sendall(request)
                s.shutdown(socket.SHUT_WR)  # nothing more is coming: the server answers or closes
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
            except (ConnectionResetError, BrokenPipeError):  # closed on us: allowed, 5xx are not
                return
        if not data:
            return
        status_line, _, rest = data.partition(b"\r\n")
        status = int(status_line.split()[1])
        assert status < 500, data[:500]
        assert KEY.encode() not in data
        if status >= 400:
            body_bytes = rest.partition(b"\r\n\r\n")[2]
            err = json.loads(body_bytes.split(b"HTTP/1.1 ")[0])["error"]  # the first answer's body
            assert set(err) == {"message", "type", "param", "code"}, err

    _fuzz(served, send, line=head_lines, hdrs=raw_headers, body=st.binary(max_size=200) | raw_bodies)
