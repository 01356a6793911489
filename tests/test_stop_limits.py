"""The limits on stop strings: at most STOP_MAX_COUNT strings of at most STOP_MAX_CHARS characters each.

Every generated piece is searched for every stop string, so without a cap one call (or one server request) could
make each token cost as much as the caller likes. Past either limit, generate / stream / chat / chat_stream, a
Hybrid (before anything reaches its cloud) and the server (400, param "stop") refuse, naming the limit. The plain
fallback chat template's own turn marker, which chat adds to the caller's stop strings, is not counted.
Runs on the shipped default model (no chat template, so chat uses the plain fallback).
"""
from __future__ import annotations

from pathlib import Path

import pytest

import edgelm
from edgelm.errors import InvalidArgumentError
from edgelm.tokenizer import FALLBACK_STOP, STOP_MAX_CHARS, STOP_MAX_COUNT, validate_stop

PROMPT = "Once upon a time"
MESSAGES = [{"role": "user", "content": "Tell me a story about a cat."}]
FEW = dict(max_new_tokens=4, temperature=0)
# Strings the story model never writes, so allowed stops do not end the short generations early.
AT_COUNT = [f"zq{i}#" for i in range(STOP_MAX_COUNT)]
TOO_MANY = AT_COUNT + ["zq-one-more#"]
AT_CHARS = "#" * STOP_MAX_CHARS
TOO_LONG = "#" * (STOP_MAX_CHARS + 1)


@pytest.fixture(scope="module")
def lm():
    lm = edgelm.load(threads=1)  # the shipped default model
    assert lm.chat_template.is_fallback, "these tests count on the default model having no chat template"
    return lm


def test_the_docs_state_the_limits():
    def doc(name: str) -> str:  # whitespace folded, so reflowing a paragraph does not matter
        return " ".join((Path(__file__).resolve().parent.parent / "docs" / name).read_text(encoding="utf-8").split())

    assert f"At most {STOP_MAX_COUNT} strings of at most {STOP_MAX_CHARS} characters each" in doc("runtime.md")
    assert f"up to {STOP_MAX_COUNT} strings of at most {STOP_MAX_CHARS} characters each" in doc("server.md")
    assert f"| {STOP_MAX_COUNT} / {STOP_MAX_CHARS} | `edgelm.tokenizer.STOP_MAX_COUNT`" in doc("security.md")


def _calls(lm):
    """Every runtime entry point that takes stop=, as (name, call(stop))."""
    return [("generate", lambda stop: lm.generate(PROMPT, stop=stop, **FEW)),
            ("stream", lambda stop: lm.stream(PROMPT, stop=stop, **FEW)),  # refuses when called, before a piece
            ("chat", lambda stop: lm.chat(MESSAGES, stop=stop, **FEW)),
            ("chat_stream", lambda stop: lm.chat_stream(MESSAGES, stop=stop, **FEW))]


@pytest.mark.parametrize("stop, limit", [(TOO_MANY, f"at most {STOP_MAX_COUNT}"),
                                         ([TOO_LONG], f"at most {STOP_MAX_CHARS}"),
                                         (TOO_LONG, f"at most {STOP_MAX_CHARS}"),  # a single str too
                                         (AT_COUNT[:3] + [TOO_LONG], f"at most {STOP_MAX_CHARS}")],
                         ids=["too-many", "too-long", "too-long-str", "one-too-long"])
def test_past_a_limit_every_entry_point_refuses(lm, stop, limit):
    for name, call in _calls(lm):
        with pytest.raises(InvalidArgumentError, match=limit) as info:
            call(stop)
        assert "stop" in info.value.message and info.value.hint, name  # names the argument, says what to do


def test_at_the_limits_every_entry_point_generates(lm):
    for stop in (AT_COUNT, [AT_CHARS], AT_COUNT[:-1] + [AT_CHARS]):
        ref = lm.generate(PROMPT, **FEW)
        for name, call in _calls(lm):
            out = call(stop)
            text = out.text if hasattr(out, "text") else "".join(out)
            want = ref.text if name in ("generate", "stream") else lm.chat(MESSAGES, **FEW).text
            assert text == want, name


def test_chat_on_the_fallback_adds_its_marker_beyond_the_limit(lm):
    # The caller may use all 16; the fallback's next-turn marker comes on top and is not counted.
    assert FALLBACK_STOP in lm.chat_template.turn_stops
    g = lm.chat(MESSAGES, stop=AT_COUNT, **FEW)
    assert g.text == lm.generate(lm.apply_chat_template(MESSAGES), stop=AT_COUNT + [FALLBACK_STOP], **FEW).text
    assert validate_stop(AT_COUNT + [FALLBACK_STOP]) == tuple(AT_COUNT + [FALLBACK_STOP])


def test_repeats_count_and_are_dropped():
    assert validate_stop(["a", "a", "b"]) == ("a", "b")
    with pytest.raises(InvalidArgumentError, match=f"at most {STOP_MAX_COUNT}"):
        validate_stop(["a"] * (STOP_MAX_COUNT + 1))


def test_a_hybrid_refuses_before_its_cloud_is_asked(lm):
    pytest.importorskip("httpx")
    from faults import FaultServer, ok

    from edgelm.cloud import CloudClient
    from edgelm.hybrid import Hybrid

    with FaultServer(ok()) as srv:
        hy = Hybrid(lm, CloudClient(srv.url, timeout=5, max_retries=0))
        for call in (lambda s: hy.generate(PROMPT, stop=s, prefer="cloud", **FEW),
                     lambda s: hy.stream(PROMPT, stop=s, prefer="cloud", **FEW),
                     lambda s: hy.chat(MESSAGES, stop=s, prefer="cloud", **FEW),
                     lambda s: hy.chat_stream(MESSAGES, stop=s, prefer="cloud", **FEW)):
            for stop in (TOO_MANY, [TOO_LONG]):
                with pytest.raises(InvalidArgumentError, match="at most"):
                    call(stop)
        assert srv.requests == []
        # Within the limits the cloud gets the caller's stops, and only those (no local turn marker).
        assert hy.chat(MESSAGES, stop=AT_COUNT, prefer="cloud", **FEW).source == "cloud"
        assert srv.requests[-1].body["stop"] == AT_COUNT


@pytest.fixture(scope="module")
def server(lm):
    pytest.importorskip("httpx")
    pytest.importorskip("starlette")
    pytest.importorskip("uvicorn")
    from edgelm.server import BackgroundServer

    with BackgroundServer(lm, workers=1) as srv:  # binds 127.0.0.1
        yield srv


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_the_server_answers_400_naming_the_limit(lm, server, path, stream):
    import httpx

    base = {"prompt": PROMPT} if path == "/v1/completions" else {"messages": MESSAGES}
    base.update(max_tokens=4, temperature=0, stream=stream)
    for stop, limit in ((TOO_MANY, f"at most {STOP_MAX_COUNT}"), ([TOO_LONG], f"at most {STOP_MAX_CHARS}"),
                        (TOO_LONG, f"at most {STOP_MAX_CHARS}")):
        r = httpx.post(server.url + path, json={**base, "stop": stop}, timeout=60)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "stop" and err["code"] == "invalid_value" and limit in err["message"], err
    r = httpx.post(server.url + path, json={**base, "stop": AT_COUNT[:-1] + [AT_CHARS]}, timeout=60)
    assert r.status_code == 200, r.text
