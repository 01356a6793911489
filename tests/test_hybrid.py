"""Router + Hybrid against real loopback servers (tests/faults.py).

The local side here is ``LocalDouble``: a stand-in for ``edgelm.Model`` with the same surface whose answers
and log-probabilities are set per prompt, so each routing signal can be driven precisely and every call to
the local model is counted (that is how "the local answer is reused, never regenerated" is checked). The
cloud side is always a real HTTP server on 127.0.0.1. tests/test_hybrid_serve.py repeats the key paths
with a real exported model and a real ``edgelm serve``.
"""
from __future__ import annotations

import argparse
import json
import logging
import re

import pytest

pytest.importorskip("httpx")

from edgelm.cloud import CloudClient  # noqa: E402
from edgelm.errors import ContextLengthError, InvalidArgumentError, RoutingError  # noqa: E402
from edgelm.hybrid import Budget, Hybrid, Router, Rule, add_cli_arguments, describe, from_cli_args  # noqa: E402
from edgelm.model import Generation, Score, TextStream  # noqa: E402

from faults import (ConnectionSpy, FaultServer, broken_stream, echo, free_port_refusing, garbage_stream,  # noqa: E402
                    hang, malformed, ok, reset, status)

KEY = "sk-hybrid-SECRET-9876543210"
# The doubles carry no held-out metrics, so a Hybrid with a cloud and no thresholds warns (checked where it matters).
pytestmark = pytest.mark.filterwarnings("ignore:A cloud is configured")


class LocalDouble:
    """Same surface as edgelm.Model. ``confidence[prompt]`` sets the mean logprob of its answer."""

    def __init__(self, confidence: dict[str, float] | None = None, context_length: int = 64):
        self.confidence = confidence or {}
        self.context_length = context_length
        self.generation_config = {"max_new_tokens": 8}
        self.calls: list[str] = []  # every prompt generate/stream was asked to continue
        self.templates: list[dict] = []  # every apply_chat_template call's arguments

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        return [1] * add_bos + [2] * len(text.split())

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, *, tools=None, documents=None,
                            **template_kwargs) -> str:
        self.templates.append(dict(messages=messages, tools=tools, documents=documents, **template_kwargs))
        head = f"<tools> {json.dumps(tools)}\n" if tools else ""
        return head + "".join(f"<{m['role']}> {m.get('content', '')}\n" for m in messages) + "<assistant>"

    def _check(self, prompt: str, max_new_tokens: int | None, truncate: str | None) -> int:
        n = len(self.encode(prompt)) + (max_new_tokens or 8)
        if n > self.context_length and truncate != "left":
            raise ContextLengthError(f"{n} tokens do not fit {self.context_length}.", prompt_tokens=n,
                                     max_new_tokens=max_new_tokens or 8, context_length=self.context_length)
        return n

    def generate(self, prompt: str, *, max_new_tokens: int | None = None, **kw) -> Generation:
        n = self._check(prompt, max_new_tokens, kw.get("truncate"))
        self.calls.append(prompt)
        lp = self.confidence.get(prompt, -1.0)
        return Generation(text=f" local answer {len(self.calls)}", token_ids=[5, 6, 7], finish_reason="length",
                          prompt_tokens=n, completion_tokens=3, time_to_first_token_s=0.0, decode_tokens_per_s=1.0,
                          total_time_s=0.0, logprobs=[lp, lp, lp])

    def stream(self, prompt: str, **kw) -> TextStream:
        self._check(prompt, kw.get("max_new_tokens"), kw.get("truncate"))  # like Model.stream: before any piece

        def gen():
            g = self.generate(prompt, **kw)
            for word in g.text.split(" ")[1:]:
                yield " " + word
            return g
        return TextStream(gen())

    def score(self, text: str) -> Score:
        nats = 5.0 if "zxq" in text else 1.0  # an "unfamiliar" word makes the prompt score high
        n = len(self.encode(text))
        return Score(total_logprob=-nats * n, num_tokens=n, num_bytes=len(text), perplexity=2.0,
                     bits_per_byte=1.0, nats_per_token=nats)


def cloud_for(srv_or_url, **kw) -> CloudClient:
    url = srv_or_url if isinstance(srv_or_url, str) else srv_or_url.url
    kw.setdefault("timeout", 2.0)
    return CloudClient(url, model="big", api_key=KEY, backoff=0.01, backoff_max=0.02, connect_timeout=0.5, **kw)


# --- decisions ---------------------------------------------------------------------------------------
def test_default_is_local_and_sends_nothing():
    with FaultServer(ok("cloud")) as srv, pytest.warns(UserWarning, match="only prompts too long"):
        hy = Hybrid(LocalDouble(), cloud_for(srv))  # a double without held-out metrics: no default thresholds
        r = hy.generate("Once upon a time")
    assert r.source == "local" and r.signal == "default" and r.fallback is None
    assert r.text == " local answer 1" and srv.connections == 0


def test_prefer_overrides_per_call():
    with FaultServer(ok("from the cloud")) as srv:
        hy = Hybrid(LocalDouble(), cloud_for(srv), Router(rules=[Rule("cloud", keywords=["story"])]))
        r1 = hy.generate("a story please", prefer="local")
        r2 = hy.generate("hello there", prefer="cloud")
    assert (r1.source, r1.signal) == ("local", "prefer")
    assert (r2.source, r2.signal, r2.text) == ("cloud", "prefer", "from the cloud")
    assert len(srv.requests) == 1
    with pytest.raises(InvalidArgumentError):
        hy.generate("x", prefer="somewhere")


def test_prompt_that_does_not_fit_locally_goes_to_the_cloud():
    with FaultServer(ok("long answer")) as srv:
        hy = Hybrid(LocalDouble(context_length=16), cloud_for(srv))
        short = hy.generate("short prompt", max_new_tokens=4)
        long = hy.generate("word " * 14, max_new_tokens=4)
    assert short.source == "local"
    assert (long.source, long.signal) == ("cloud", "context")
    assert long.value == 19 and long.threshold == 16  # 14 words + BOS + 4 new tokens > 16
    assert srv.requests[0].body["max_tokens"] == 4


def test_rules_keywords_regex_and_tags_first_match_wins():
    rules = [Rule("local", keywords=["secret"], name="keep-secrets"), Rule("cloud", pattern=r"\btranslate\b"),
             Rule("cloud", tags=["code"]), Rule("cloud", keywords=["Poem"])]
    with FaultServer(ok("cloud")) as srv:
        hy = Hybrid(LocalDouble(), cloud_for(srv), Router(rules=rules))
        got = {p: hy.generate(p, tags=t) for p, t in [("Translate this", ()), ("write a poem", ()),
                                                        ("fix my bug", ("code",)), ("translate my secret", ()),
                                                        ("translated text", ())]}
    assert {p: (r.source, r.reason) for p, r in got.items()} == {
        "Translate this": ("cloud", "rule pattern '\\\\btranslate\\\\b'"),
        "write a poem": ("cloud", "rule keywords ['poem']"),
        "fix my bug": ("cloud", "rule tags ['code']"),
        "translate my secret": ("local", "rule keep-secrets"),
        "translated text": ("local", "default route (local)"),  # \b: "translated" is another word
    }
    with pytest.raises(InvalidArgumentError):
        Rule("cloud")
    with pytest.raises(InvalidArgumentError):
        Rule("cloud", pattern="(")


def test_chat_rules_look_at_the_user_text_not_the_template():
    with FaultServer(echo()) as srv:
        hy = Hybrid(LocalDouble(), cloud_for(srv), Router(rules=[Rule("cloud", pattern=r"^summar")]))
        r = hy.chat([{"role": "system", "content": "be kind"}, {"role": "user", "content": "Summarize this"}])
    assert r.source == "cloud" and r.signal == "rule"
    assert srv.requests[0].messages == [{"role": "system", "content": "be kind"},
                                        {"role": "user", "content": "Summarize this"}]


def test_length_rule_and_prompt_score():
    with FaultServer(ok("cloud")) as srv:
        hy = Hybrid(LocalDouble(), cloud_for(srv), Router(max_prompt_tokens=5, max_prompt_nats=3.0))
        short = hy.generate("a b c")
        longer = hy.generate("a b c d e f")
        odd = hy.generate("zxq blorp zxq")  # 4 scored tokens: MIN_SCORED_TOKENS
    assert short.source == "local"
    assert (longer.source, longer.signal, longer.value) == ("cloud", "length", 7.0)
    assert (odd.source, odd.signal, odd.value, odd.threshold) == ("cloud", "prompt-score", 5.0, 3.0)


def test_cascade_keeps_confident_answers_and_escalates_unsure_ones():
    local = LocalDouble({"easy": -0.5, "hard": -4.0})
    with FaultServer(ok("the cloud knows")) as srv:
        hy = Hybrid(local, cloud_for(srv), Router(min_mean_logprob=-2.0))
        easy = hy.generate("easy")
        hard = hy.generate("hard")
    assert (easy.source, easy.signal, easy.value) == ("local", "uncertainty", -0.5)
    assert (hard.source, hard.signal, hard.value, hard.threshold) == ("cloud", "uncertainty", -4.0, -2.0)
    assert hard.text == "the cloud knows" and hard.generation is not None  # the local try is kept for inspection
    assert len(srv.requests) == 1 and local.calls == ["easy", "hard"]


# --- fallbacks ---------------------------------------------------------------------------------------
FAULTS = {
    "hang": (hang(), "cloud timed out"),
    "reset": (reset(), "cloud unreachable"),
    "500": (status(500), "cloud HTTP 500"),
    "429 + Retry-After too long": (status(429, retry_after="3600"), "cloud rate-limited"),
    "429 without Retry-After": (status(429), "cloud rate-limited"),
    "malformed JSON": (malformed(), "cloud answer malformed"),
    "not a completion": (malformed(b'{"object": "list"}'), "cloud answer malformed"),
}


@pytest.mark.parametrize("name", list(FAULTS))
def test_cascade_falls_back_to_the_local_answer_it_already_has(name, caplog):
    behaviour, kind = FAULTS[name]
    caplog.set_level(logging.DEBUG)
    local = LocalDouble({"hard": -4.0})
    with FaultServer(behaviour) as srv:
        hy = Hybrid(local, cloud_for(srv, timeout=0.6, max_retries=1), Router(min_mean_logprob=-2.0))
        r = hy.generate("hard")
    assert r.source == "local" and r.signal == "uncertainty"
    assert r.text == " local answer 1" and local.calls == ["hard"]  # reused, not regenerated
    assert r.fallback.startswith(kind), r.fallback
    assert len(srv.requests) >= 1 and hy.stats["fallbacks"] == 1
    for text in (r.fallback, r.reason, r.describe(), repr(hy), caplog.text):
        assert KEY not in text


def test_unreachable_cloud_falls_back_when_the_router_chose_the_cloud_first():
    local = LocalDouble()
    hy = Hybrid(local, cloud_for(free_port_refusing(), max_retries=1), Router(rules=[Rule("cloud", tags=["x"])]))
    r = hy.generate("anything", tags=["x"])
    assert (r.source, r.signal) == ("local", "rule") and r.fallback.startswith("cloud unreachable")
    assert local.calls == ["anything"]  # generated once, after the cloud failed


def test_neither_side_answering_raises_routing_error():
    hy = Hybrid(LocalDouble(context_length=8), cloud_for(free_port_refusing(), max_retries=0))
    with pytest.raises(RoutingError) as info:
        hy.generate("one two three four five six", max_new_tokens=4)
    msg = str(info.value)
    assert "cloud unreachable" in msg and "do not fit" in msg and KEY not in msg
    # Without any cloud, an oversized prompt is a routing error too, naming the local refusal.
    with pytest.raises(RoutingError, match="no cloud endpoint"):
        Hybrid(LocalDouble(context_length=8)).generate("one two three four five six", max_new_tokens=4)


# --- policy ------------------------------------------------------------------------------------------
def test_privacy_mode_opens_no_connection_at_all():
    local = LocalDouble({"hard": -9.0}, context_length=12)
    with FaultServer(ok("should never be seen")) as srv, ConnectionSpy() as spy:
        hy = Hybrid(local, cloud_for(srv), Router(allow_cloud=False, min_mean_logprob=-1.0,
                                                  rules=[Rule("cloud", keywords=["hard"])]))
        results = [hy.generate("hard"), hy.generate("hard", prefer="cloud"), hy.chat([{"role": "user", "content": "hard"}])]
        results.append(list(hy.stream("hard", prefer="cloud")))
        with pytest.raises(RoutingError, match="privacy mode"):
            hy.generate("one two three four five six seven eight nine ten", max_new_tokens=4)  # too long
    assert all(r.source == "local" and r.signal == "privacy" for r in results[:3])
    assert spy.connects == [] and srv.connections == 0 and srv.requests == []


def test_redaction_hook_applies_to_every_outgoing_message():
    seen_locally = []

    def redact(text: str) -> str:
        return re.sub(r"[\w.]+@[\w.]+", "[email]", text)

    local = LocalDouble()
    with FaultServer(echo()) as srv:
        hy = Hybrid(local, cloud_for(srv), Router(redact=redact))
        r1 = hy.generate("mail bob@example.com now", prefer="cloud")
        r2 = hy.chat([{"role": "system", "content": "owner: ann@corp.org"},
                      {"role": "user", "content": "write to bob@example.com"}], prefer="cloud")
        r3 = "".join(hy.stream("cc carl@x.io", prefer="cloud"))
        seen_locally.append(hy.generate("mail bob@example.com now", prefer="local"))
    wire = b"".join(req.raw for req in srv.requests)
    assert b"@" not in wire and wire.count(b"[email]") == 4
    assert r1.text == "echo: mail [email] now" and r2.text == "echo: owner: [email] | write to [email]"
    assert r3 == "echo: cc [email]"
    assert local.calls == ["mail bob@example.com now"]  # the local model gets the original text


def test_budget_caps_cloud_calls_per_period():
    clock = [1000.0]
    budget = Budget(max_calls=2, period_s=60)
    budget._clock = lambda: clock[0]
    with FaultServer(ok("cloud")) as srv:
        hy = Hybrid(LocalDouble(), cloud_for(srv), Router(budget=budget))
        sources = [hy.generate("q", prefer="cloud").source for _ in range(3)]
        third = hy.last_result
        clock[0] += 61  # a new period
        sources.append(hy.generate("q", prefer="cloud").source)
    assert sources == ["cloud", "cloud", "local", "cloud"]
    assert third.signal == "budget" and "2 calls per 60 s" in third.reason
    assert len(srv.requests) == 3


def test_budget_caps_cloud_tokens_and_counts_failed_calls():
    budget = Budget(max_tokens=10, period_s=3600)
    with FaultServer(ok("one two three four five six")) as srv:  # usage: 5 prompt + 6 completion tokens
        hy = Hybrid(LocalDouble(), cloud_for(srv), Router(budget=budget))
        assert hy.generate("q", prefer="cloud").source == "cloud"
        assert budget.used() == (1, 11)
        r = hy.generate("q", prefer="cloud")
    assert r.source == "local" and "10 tokens" in r.reason and len(srv.requests) == 1
    b2 = Budget(max_calls=1)
    hy2 = Hybrid(LocalDouble(), cloud_for(free_port_refusing(), max_retries=0), Router(budget=b2))
    assert hy2.generate("q", prefer="cloud").fallback.startswith("cloud unreachable")
    assert hy2.generate("q", prefer="cloud").signal == "budget"  # the failed attempt used the one call


# --- streams -----------------------------------------------------------------------------------------
def test_stream_from_cloud_and_local():
    with FaultServer(ok("alpha beta gamma")) as srv:
        hy = Hybrid(LocalDouble(), cloud_for(srv))
        s = hy.stream("x", prefer="cloud")
        assert list(s) == ["alpha", " beta", " gamma"] and s.result.source == "cloud"
        s2 = hy.stream("x")
        assert "".join(s2) == " local answer 1" and s2.result.source == "local"


def test_stream_failing_before_its_first_piece_streams_the_local_answer():
    local = LocalDouble()
    with FaultServer(status(500)) as srv:
        hy = Hybrid(local, cloud_for(srv, max_retries=1))
        s = hy.stream("x", prefer="cloud")
        text = "".join(s)
    assert text == " local answer 1" and s.result.source == "local"
    assert s.result.fallback.startswith("cloud HTTP 500")


@pytest.mark.parametrize("behaviour, kind", [(broken_stream("one two three four", after=2), "cloud stream cut off"),
                                             (garbage_stream(after=1), "cloud answer malformed")])
def test_stream_breaking_part_way_is_finished_by_the_local_model(behaviour, kind):
    local = LocalDouble()
    with FaultServer(behaviour) as srv:
        hy = Hybrid(local, cloud_for(srv))
        s = hy.stream("Tell me", prefer="cloud")
        pieces = list(s)
    r = s.result
    assert r.source == "mixed" and "".join(pieces) == r.text
    assert r.fallback.startswith(kind) and "finished the answer" in r.fallback
    assert ".;" not in r.fallback  # one clause joined to the next, not a sentence stop before the semicolon
    cloud_part = r.text[: r.text.index(" local")]
    assert cloud_part in ("one two", "alpha")
    assert local.calls == ["Tell me" + cloud_part]  # the local model continued from what was shown


def test_cascade_stream_reuses_the_local_answer_on_fallback():
    local = LocalDouble({"hard": -5.0})
    with FaultServer(reset()) as srv:
        hy = Hybrid(local, cloud_for(srv, max_retries=0), Router(min_mean_logprob=-2.0))
        s = hy.stream("hard")
        assert "".join(s) == " local answer 1"
    assert s.result.source == "local" and s.result.fallback and local.calls == ["hard"]


# --- calibration -------------------------------------------------------------------------------------
def test_calibrate_hits_the_target_share_and_the_router_then_routes_it():
    prompts = [f"prompt {i}" for i in range(20)]
    local = LocalDouble({p: -0.2 * i for i, p in enumerate(prompts)})  # later prompts are less certain
    router = Router(rules=[Rule("cloud", keywords=["prompt 1"], name="ones")])  # "prompt 1", "prompt 1x"
    with FaultServer(ok("cloud")) as srv:
        hy = Hybrid(local, cloud_for(srv), router)
        report = router.calibrate(prompts, target_cloud_share=0.4, max_new_tokens=4)
        # The rule already sends 11 of 20 (prompt 1 and prompt 10..19), more than the 8 asked for: the
        # threshold sends nothing more and the report says so, rather than pretending to hit 40 %.
        assert report.counts == {"rule": 11, "uncertainty": 9} and report.cloud_share == pytest.approx(0.55)
        open_values = [v for p, v in zip(prompts, report.values) if not p.startswith("prompt 1")]
        assert router.min_mean_logprob < min(open_values)
        report = router.calibrate(prompts, target_cloud_share=0.75, max_new_tokens=4)
        assert report.cloud_share == pytest.approx(0.75) and report.counts == {"rule": 11, "uncertainty": 9}
        assert srv.requests == []  # calibration never calls the cloud
        sources = [hy.generate(p, max_new_tokens=4).source for p in prompts]
    assert sources.count("cloud") == 15
    # the 5 kept locally are the 5 most confident ones outside the rule (6..9 escalate)
    assert [p for p, s in zip(prompts, sources) if s == "local"] == ["prompt 0", "prompt 2", "prompt 3", "prompt 4",
                                                                     "prompt 5"]


def test_calibrate_length_and_prompt_score():
    prompts = ["a " * n for n in range(1, 11)]
    router = Router()
    report = router.calibrate(prompts, 0.3, signal="length", model=LocalDouble())
    assert report.cloud_share == pytest.approx(0.3) and router.max_prompt_tokens == 8  # 9..11 tokens go
    with pytest.raises(InvalidArgumentError):
        Router().calibrate(prompts, 0.3)  # no model known yet
    with pytest.raises(InvalidArgumentError):
        router.calibrate(prompts, 1.5, model=LocalDouble())


# --- command line ------------------------------------------------------------------------------------
def test_cli_helpers_wrap_the_model_as_asked():
    parser = argparse.ArgumentParser()
    add_cli_arguments(parser)
    local = LocalDouble()
    assert from_cli_args(local, parser.parse_args([])) is local
    with pytest.raises(InvalidArgumentError):
        from_cli_args(local, parser.parse_args(["--route", "cloud"]))
    with FaultServer(ok("from cloud")) as srv:
        hy = from_cli_args(local, parser.parse_args(["--cloud-url", srv.url, "--route", "cloud",
                                                     "--cloud-model", "big"]))
        assert hy.generate("hi").describe() == "[cloud] default route (cloud)"
        assert srv.requests[0].body["model"] == "big"
        private = from_cli_args(local, parser.parse_args(["--cloud-url", srv.url, "--route", "local"]))
        assert private.generate("hi").source == "local"
        auto = from_cli_args(LocalDouble({"hi": -5.0}), parser.parse_args(["--cloud-url", srv.url,
                                                                          "--cloud-threshold", "-2"]))
        assert auto.generate("hi").source == "cloud"
        text = from_cli_args(local, parser.parse_args(["--cloud-url", srv.url, "--route", "cloud",
                                                       "--cloud-endpoint", "completions"]))
        s = text.stream("Once")
        assert "".join(s) == "from cloud" and describe(s) == "[cloud] default route (cloud)"
        assert describe(local.stream("x")) is None
    assert len(srv.requests) == 3 and srv.requests[2].path == "/v1/completions"


def test_importing_the_hybrid_side_stays_light():
    import subprocess
    import sys
    code = ("import sys, edgelm, edgelm.hybrid, edgelm.cloud; edgelm.CloudClient('http://127.0.0.1:9/v1'); "
            "edgelm.Router(); print(sorted(m for m in ('httpx', 'torch', 'starlette') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_local_refusal_is_rescued_by_the_cloud_in_generate_and_stream():
    long_prompt = "w " * 20
    with FaultServer(ok("the cloud took it")) as srv:
        hy = Hybrid(LocalDouble(context_length=16), cloud_for(srv))
        r = hy.generate(long_prompt, prefer="local", max_new_tokens=4)
        s = hy.stream(long_prompt, prefer="local", max_new_tokens=4)
        assert "".join(s) == "the cloud took it"
    assert (r.source, r.signal) == ("cloud", "local-failed") and "do not fit" in r.reason
    assert (s.result.source, s.result.signal) == ("cloud", "local-failed")
    hy = Hybrid(LocalDouble(context_length=16), cloud_for(free_port_refusing(), max_retries=0))
    with pytest.raises(RoutingError, match="cloud unreachable"):
        list(hy.stream(long_prompt, prefer="local", max_new_tokens=4))
    with pytest.raises(RoutingError, match="cloud unreachable"):
        list(hy.stream(long_prompt, max_new_tokens=4))  # the context check chose the cloud, which failed


# --- tools --------------------------------------------------------------------------------------------
from test_cloud import CALLS, TOOLS, tool_answer  # noqa: E402

TOOL_CONVO = [{"role": "user", "content": "Weather in Paris?"},
              {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function", "function": {
                  "name": "get_weather", "arguments": {"city": "Paris"}}}]},
              {"role": "tool", "tool_call_id": "call_1", "content": {"temp_c": 21}},
              {"role": "user", "content": [{"type": "text", "text": "And in Oslo?"}]}]


def test_chat_tools_reach_the_local_template_and_the_cloud_request():
    local = LocalDouble(context_length=512)
    docs = [{"title": "Oslo", "text": "Oslo is cold."}]
    with FaultServer(tool_answer(CALLS)) as srv:
        hy = Hybrid(local, cloud_for(srv))
        r_local = hy.chat(TOOL_CONVO, tools=TOOLS, documents=docs, chat_template_kwargs={"date_string": "1 May"},
                          prefer="local")
        r_cloud = hy.chat(TOOL_CONVO, tools=TOOLS, documents=docs, prefer="cloud")
        s = hy.chat_stream(TOOL_CONVO, tools=TOOLS, prefer="cloud")
        streamed = list(s)
        assert hy.apply_chat_template(TOOL_CONVO, tools=TOOLS) == local.calls[0]
    # local: tools, documents and template variables went into the template, whose text the model continued
    seen = local.templates[0]
    assert seen["tools"] == TOOLS and seen["documents"] == docs and seen["date_string"] == "1 May"
    assert local.calls == [hy.apply_chat_template(TOOL_CONVO, tools=TOOLS, documents=docs, date_string="1 May")]
    assert local.calls[0].startswith("<tools> ") and r_local.source == "local" and r_local.tool_calls is None
    # cloud: tools and documents as given, messages in the OpenAI shape; its tool calls come back
    sent = srv.requests[0].body
    assert sent["tools"] == TOOLS and sent["documents"] == docs
    assert sent["messages"][1]["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris"}'
    assert sent["messages"][2] == {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'}
    assert r_cloud.source == "cloud" and r_cloud.tool_calls == CALLS and r_cloud.text == ""
    assert r_cloud.finish_reason == "tool_calls"
    assert streamed == [] and s.result.tool_calls == CALLS and srv.requests[1].body["tools"] == TOOLS
    assert "documents" not in srv.requests[1].body


def test_rules_read_text_parts_and_redaction_covers_everything_a_tool_chat_sends():
    def redact(text: str) -> str:
        return re.sub(r"[\w.]+@[\w.]+", "[email]", text)

    convo = [{"role": "user", "content": [{"type": "text", "text": "mail bob@example.com the forecast"}]},
             {"role": "assistant", "tool_calls": [{"id": "c1", "function": {
                 "name": "send_mail", "arguments": {"to": "bob@example.com"}}}]},
             {"role": "tool", "tool_call_id": "c1", "content": {"sent_to": "bob@example.com"}}]
    local = LocalDouble(context_length=512)
    with FaultServer(ok()) as srv:
        hy = Hybrid(local, cloud_for(srv), Router(redact=redact, rules=[Rule("cloud", keywords=["forecast"])]))
        r = hy.chat(convo, tools=TOOLS, documents=[{"title": "from ann@corp.org", "text": "cc carl@x.io"}])
    assert (r.source, r.signal) == ("cloud", "rule")  # the keyword sits in a text part of the user message
    wire = srv.requests[0].raw
    assert b"@" not in wire and wire.count(b"[email]") == 5
    assert local.templates[0]["messages"][1]["tool_calls"][0]["function"]["arguments"] == {"to": "bob@example.com"}
    assert "bob@example.com" in hy.apply_chat_template(convo)  # the local prompt keeps the original


@pytest.mark.parametrize("bad", [dict(messages=[{"role": "user", "content": 5}]),
                                 dict(messages=[{"role": "user", "content": "hi"}], tools={"name": "f"}),
                                 dict(messages=[{"role": "user", "content": "hi"}],
                                      chat_template_kwargs={"messages": []})])
def test_bad_chat_arguments_are_refused_before_anything_runs(bad):
    local = LocalDouble()
    with ConnectionSpy() as spy:
        hy = Hybrid(local, CloudClient("http://127.0.0.1:9/v1", api_key=KEY))
        with pytest.raises(InvalidArgumentError):
            hy.chat(prefer="cloud", **bad)
    assert spy.connects == [] and local.calls == []
