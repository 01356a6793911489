"""Chat on a model without a chat template stops at the plain fallback's next-turn marker.

The fallback renders ``User: ...`` / ``Assistant: ...`` lines, so a reply can run on into a made-up next turn
(``"\\nUser: ..."``). Every chat path -- Model.chat / chat_stream, the Hybrid router's local answers (direct, after
a cloud failure, and finishing a broken cloud stream), and the server's chat endpoint over either -- must stop
there, leave the marker out of the text, and add the caller's stop strings to it rather than replace it. Plain
``generate`` is not a chat and keeps going.

The folder is a copy of the shipped default model with any chat template removed. That model tells stories and
never writes "User:", so most tests set the marker (``edgelm.tokenizer.FALLBACK_STOP``, which the fallback's
``turn_stops`` reads) to text its greedy answers do contain, and check first that an unstopped answer has it.
"""
from __future__ import annotations

import json
import shutil

import pytest

import edgelm
import edgelm.tokenizer as tokmod
import edgelm_models
from edgelm.folder import MANIFEST, write_manifest
from edgelm.tokenizer import ChatTemplate

MESSAGES = [{"role": "user", "content": "Tell me a story about a cat."}]
GREEDY = dict(max_new_tokens=40, temperature=0)
MARKER = "\n\n"  # the stand-in marker: the story model ends a paragraph within 40 tokens
NEVER = "zq-not-written#"


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    dst = tmp_path_factory.mktemp("fallback") / "model"
    shutil.copytree(edgelm_models.default_path(), dst)
    cfg_path = dst / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
    cfg.pop("chat_template", None)
    cfg_path.write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    (dst / "chat_template.jinja").unlink(missing_ok=True)
    manifest = json.loads((dst / MANIFEST).read_text(encoding="utf-8"))
    write_manifest(dst, **{k: v for k, v in manifest.items() if k not in ("format_version", "created", "files")})
    lm = edgelm.load(dst, threads=1)  # verify=True against the rewritten manifest
    assert lm.chat_template.is_fallback
    return lm


@pytest.fixture
def marker(monkeypatch):
    monkeypatch.setattr(tokmod, "FALLBACK_STOP", MARKER)
    return MARKER


def _unstopped(lm, prompt: str, **kwargs) -> str:
    """The model's answer with no marker in effect; the test is void unless it contains the marker."""
    text = lm.generate(prompt, **{**GREEDY, **kwargs}).text
    assert MARKER in text and text.index(MARKER) > 0, f"the stand-in marker never came up: {text!r}"
    return text


def _cut(text: str, stop: str = MARKER) -> str:
    return text[:text.index(stop)]


def test_the_marker_is_where_the_fallback_starts_a_user_turn(lm):
    assert tokmod.FALLBACK_STOP == "\nUser:" and lm.chat_template.turn_stops == ("\nUser:",)
    turns = MESSAGES + [{"role": "assistant", "content": "Once a cat sat."}, {"role": "user", "content": "More."}]
    prompt = lm.apply_chat_template(turns)
    assert prompt.count(tokmod.FALLBACK_STOP) == 1
    assert prompt.index(tokmod.FALLBACK_STOP) == prompt.index("Once a cat sat.") + len("Once a cat sat.")
    # A model's own template ends a reply with its end-of-turn token (an EOS id), not a stop string.
    assert ChatTemplate("{{ messages[0].content }}").turn_stops == ()


def test_chat_and_chat_stream_stop_at_the_marker(lm, marker):
    prompt = lm.apply_chat_template(MESSAGES)
    want = _cut(_unstopped(lm, prompt))
    g = lm.chat(MESSAGES, **GREEDY)
    assert (g.text, g.finish_reason) == (want, "stop") and marker not in g.text
    s = lm.chat_stream(MESSAGES, **GREEDY)
    assert "".join(s) == want and s.generation.finish_reason == "stop"
    # Plain generate on the same prompt is not a chat: no marker.
    assert marker in lm.generate(prompt, **GREEDY).text


def test_the_callers_stops_are_added_to_the_marker(lm, marker):
    full = _unstopped(lm, lm.apply_chat_template(MESSAGES))
    # A stop that never comes up does not replace the marker.
    assert lm.chat(MESSAGES, stop=NEVER, **GREEDY).text == _cut(full)
    assert lm.chat(MESSAGES, stop=[NEVER], **GREEDY).text == _cut(full)
    # One that comes up first ends the reply there.
    early = full[len(full.split()[0]) + 1:][:5]  # text from the second word on: before the marker
    assert 0 < full.index(early) < full.index(marker)
    assert lm.chat(MESSAGES, stop=[NEVER, early], **GREEDY).text == _cut(full, early)


def test_hybrid_local_answers_stop_at_the_marker(lm, marker):
    from edgelm.hybrid import Hybrid

    prompt = lm.apply_chat_template(MESSAGES)
    want = _cut(_unstopped(lm, prompt))
    hy = Hybrid(lm)  # no cloud: local answers
    r = hy.chat(MESSAGES, **GREEDY)
    assert (r.source, r.text, r.finish_reason) == ("local", want, "stop")
    s = hy.chat_stream(MESSAGES, **GREEDY)
    assert "".join(s) == want and s.result.text == want
    assert hy.chat(MESSAGES, stop=[NEVER], **GREEDY).text == want
    assert marker in hy.generate(prompt, **GREEDY).text  # a plain prompt is not a chat


def test_hybrid_local_fallbacks_after_a_cloud_failure_stop_at_the_marker(lm, marker):
    pytest.importorskip("httpx")
    from faults import FaultServer, broken_stream, status

    from edgelm.cloud import CloudClient
    from edgelm.hybrid import Hybrid

    prompt = lm.apply_chat_template(MESSAGES)
    want = _cut(_unstopped(lm, prompt))
    with FaultServer(status(500)) as srv:
        hy = Hybrid(lm, CloudClient(srv.url, timeout=5, max_retries=0))
        r = hy.chat(MESSAGES, prefer="cloud", **GREEDY)
        assert (r.source, r.text) == ("local", want) and r.fallback
        s = hy.chat_stream(MESSAGES, prefer="cloud", **GREEDY)
        assert "".join(s) == want and s.result.fallback
    # The cloud stream breaks after two pieces; the local model finishes the answer from there.
    partial = ' "Look,'
    with FaultServer(broken_stream(partial + " a cat", after=2)) as srv:
        hy = Hybrid(lm, CloudClient(srv.url, timeout=5, max_retries=0))
        s = hy.chat_stream(MESSAGES, prefer="cloud", **GREEDY)
        text = "".join(s)
        assert s.result.source == "mixed" and text.startswith(partial)
        owed = GREEDY["max_new_tokens"] - len(lm.encode(partial, add_bos=False))
        rest = _unstopped(lm, prompt + partial, max_new_tokens=owed, truncate="left")
        assert text == partial + _cut(rest) and marker not in text


@pytest.mark.parametrize("hybrid", [False, True], ids=["model", "hybrid"])
def test_the_servers_chat_endpoint_stops_at_the_marker(lm, marker, hybrid):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("starlette")
    pytest.importorskip("uvicorn")
    from edgelm.hybrid import Hybrid
    from edgelm.server import BackgroundServer

    want = _cut(_unstopped(lm, lm.apply_chat_template(MESSAGES)))
    with BackgroundServer(Hybrid(lm) if hybrid else lm, workers=1) as srv:  # loopback only
        model_id = next(iter(srv.state.models))
        for stream in (False, True):
            body = {"model": model_id, "messages": MESSAGES, "max_tokens": GREEDY["max_new_tokens"],
                    "temperature": 0, "stop": [NEVER], "stream": stream}
            r = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=60)
            assert r.status_code == 200, r.text
            if stream:
                events = [json.loads(line[6:]) for line in r.text.splitlines()
                          if line.startswith("data: {")]
                text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
            else:
                text = r.json()["choices"][0]["message"]["content"]
            assert text == want, stream
