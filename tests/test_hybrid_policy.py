"""The router's default policy (thresholds relative to the model's own held-out nats/token), labelled
calibration, readable reasons, the cloud endpoint per prompt, a missing [cloud] extra, and a context-routed
stream whose cloud breaks part-way (issue 17; issue 15 fault 9; issue 16 item 1).

The local side is tests/test_hybrid.py's ``LocalDouble`` (answers and scores set per prompt), given a manifest
where the default policy needs one; the cloud is a real HTTP server on 127.0.0.1 (tests/faults.py). One test
runs the shipped story model itself.
"""
from __future__ import annotations

import math
import sys
import types
import warnings

import pytest

pytest.importorskip("httpx")

import edgelm  # noqa: E402
from edgelm.errors import ContextLengthError, InvalidArgumentError, RoutingError  # noqa: E402
from edgelm.hybrid import (AUTO_CONFIDENCE_FACTOR, AUTO_PROMPT_FACTOR, MIN_SCORED_TOKENS, Hybrid, Router,  # noqa: E402
                           Rule, looks_like_request, reference_nats_per_token)
from edgelm.model import Generation  # noqa: E402

from faults import ConnectionSpy, FaultServer, broken_stream, ok  # noqa: E402
from test_hybrid import LocalDouble, cloud_for  # noqa: E402

REF = 2.0  # the doubles' held-out nats/token: the default prompt threshold is then 4.0, the confidence one -3.0


def with_manifest(local: LocalDouble, metrics: dict | None = None) -> LocalDouble:
    local.folder = types.SimpleNamespace(manifest={"metrics": {"nats_per_token": REF} if metrics is None else metrics})
    return local


# --- what the folder knows about itself ---------------------------------------------------------------
def test_reference_nats_per_token_from_the_manifest_or_derived_for_older_folders():
    shipped = edgelm.load(threads=1)
    m = shipped.folder.manifest["metrics"]
    assert "nats_per_token" not in m  # the shipped folder predates the field: the value is derived
    # nats/token is the log of the perplexity the exporter measured on the same text: two routes, one number
    assert reference_nats_per_token(shipped) == pytest.approx(math.log(m["quantized_perplexity"]), rel=1e-6)
    fp32_only = {k: v for k, v in m.items() if not k.startswith("quantized")}
    assert reference_nats_per_token(with_manifest(LocalDouble(), fp32_only)) == pytest.approx(
        math.log(m["fp32_perplexity"]), rel=1e-6)
    assert reference_nats_per_token(with_manifest(LocalDouble(), {**m, "nats_per_token": 3.25})) == 3.25
    for bad in ({}, {"eval_bytes": 10, "eval_tokens": 0, "fp32_bits_per_byte": 1.0}, {"nats_per_token": "x"}):
        assert reference_nats_per_token(with_manifest(LocalDouble(), bad)) is None
    assert reference_nats_per_token(LocalDouble()) is None  # no folder at all


def test_the_exporter_writes_nats_per_token_of_the_shipped_weights(monkeypatch, tmp_path):
    pytest.importorskip("torch")
    from edgelm_export import assemble, evaluate

    measured = {"eval_bytes": 1000, "eval_tokens": 250, "fp32_bits_per_byte": 1.0, "quantized_bits_per_byte": 1.1}
    monkeypatch.setattr(evaluate, "quality_gate", lambda *a, **k: dict(measured))
    metrics = assemble.gate(tmp_path, tmp_path / "q", tmp_path, {}, {}, {"method": "int8"}, (), tmp_path / "e.txt",
                            max_ppl_increase=0.05, force=False, threads=1, progress=False)
    assert metrics["nats_per_token"] == pytest.approx(1.1 * 1000 * math.log(2) / 250)
    assert reference_nats_per_token(with_manifest(LocalDouble(), metrics)) == metrics["nats_per_token"]


# --- the default policy ---------------------------------------------------------------------------------
class Scored(LocalDouble):
    """A double whose prompt score is set per prompt (nats/token), every prompt 10 scored tokens."""

    def __init__(self, nats: dict[str, float], confidence: dict[str, float] | None = None, **kw):
        super().__init__(confidence, **kw)
        self.nats = nats

    def score(self, text):
        from edgelm.model import Score
        nats = self.nats.get(text, 1.0)
        return Score(total_logprob=-nats * 10, num_tokens=10, num_bytes=len(text), perplexity=math.exp(nats),
                     bits_per_byte=1.0, nats_per_token=nats)


def test_default_policy_sends_unfamiliar_prompts_out_and_keeps_the_rest_with_its_reasons():
    local = with_manifest(Scored({"What is odd?": 2.5 * REF, "story": 1.2 * REF, "edge": 2 * REF + 1e-4},
                                 {"unsure": -AUTO_CONFIDENCE_FACTOR * REF - 0.5}))
    with FaultServer(ok("from the cloud")) as srv:
        hy = Hybrid(local, cloud_for(srv))  # no options at all
        odd, story, edge, unsure = (hy.generate(p) for p in ("What is odd?", "story", "edge", "unsure"))
        chat = hy.chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is odd?"}])
    thr = AUTO_PROMPT_FACTOR * REF
    assert (odd.source, odd.signal, odd.value, odd.threshold) == ("cloud", "prompt-score", 2.5 * REF, thr)
    assert odd.reason == "prompt score: 5.00 > 4.00 nats/token (2 x the model's held-out 2.00 nats/token)"
    assert edge.source == "cloud" and "4.0001 > 4.0000" in edge.reason  # never printed as a tie
    # a kept answer says which checks it passed: the prompt score, then the answer's confidence
    assert (story.source, story.signal) == ("local", "uncertainty")
    assert story.reason == ("uncertainty: mean_logprob -1.00 >= -3.00 (-1.5 x the model's held-out 2.00 "
                            "nats/token); prompt score 2.40 <= 4.00 nats/token (2 x the model's held-out 2.00 "
                            "nats/token)")
    assert (unsure.source, unsure.signal, unsure.value) == ("cloud", "uncertainty", -3.5)
    # a chat is scored on what the user wrote, not on the template around it
    assert (chat.source, chat.signal, chat.value) == ("cloud", "prompt-score", 2.5 * REF)
    assert [r.path for r in srv.requests] == ["/v1/chat/completions", "/v1/completions", "/v1/completions",
                                              "/v1/chat/completions"]


def test_default_policy_streams_skip_the_uncertainty_check_and_short_prompts_skip_the_score():
    class Short(Scored):
        def score(self, text):
            s = super().score(text)
            return type(s)(s.total_logprob, MIN_SCORED_TOKENS - 1, s.num_bytes, s.perplexity, 1.0, s.nats_per_token)

    local = with_manifest(Scored({}, {"unsure": -9.0}))
    with FaultServer(ok("cloud")) as srv:
        hy = Hybrid(local, cloud_for(srv))
        s = hy.stream("unsure")
        text = "".join(s)
        short = Hybrid(with_manifest(Short({"Mom said": 9.0})), cloud_for(srv), Router(min_confidence=None))
        r = short.generate("Mom said")
    assert text == " local answer 1" and (s.result.source, s.result.signal) == ("local", "default")
    assert "no uncertainty check in a stream" in s.result.reason
    assert r.source == "local" and f"prompt too short to score (3 tokens < {MIN_SCORED_TOKENS})" in r.reason
    assert srv.requests == []


def test_warns_once_when_a_configured_cloud_can_never_be_used():
    url = "http://127.0.0.1:9/v1"
    with pytest.warns(UserWarning, match="only prompts too long") as got:
        hy = Hybrid(LocalDouble(), cloud_for(url))  # no manifest: no default thresholds, none set
        hy.generate("a")
        hy.generate("b")
    assert len([w for w in got if issubclass(w.category, UserWarning)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Hybrid(with_manifest(LocalDouble()), cloud_for(url), Router(min_confidence=None)).generate("a")  # auto score
        Hybrid(LocalDouble(), cloud_for(url), Router(rules=[Rule("cloud", keywords=["x"])])).generate("a")
        Hybrid(LocalDouble(), cloud_for(url), Router(allow_cloud=False)).generate("a")  # privacy is a choice
        Hybrid(LocalDouble()).generate("a")  # no cloud: nothing to warn about
    assert Router().cloud_signals(LocalDouble()) == []
    assert Router().cloud_signals(with_manifest(LocalDouble())) == ["prompt-score", "uncertainty"]


def test_the_shipped_story_model_keeps_stories_and_sends_questions_by_default():
    local = edgelm.load(threads=1)
    with FaultServer(ok("Paris.")) as srv:
        hy = Hybrid(local, cloud_for(srv))
        q = hy.generate("What is the capital of France?", max_new_tokens=8, temperature=0)
        story = hy.generate("Once upon a time, there was a little girl named Lily.", max_new_tokens=8,
                            temperature=0)
    ref = reference_nats_per_token(local)
    assert (q.source, q.signal, q.text, q.cloud_endpoint) == ("cloud", "prompt-score", "Paris.", "chat")
    assert q.value > AUTO_PROMPT_FACTOR * ref == q.threshold
    assert story.source == "local" and story.text == local.generate(
        "Once upon a time, there was a little girl named Lily.", max_new_tokens=8, temperature=0).text
    assert local.score("Once upon a time, there was a little girl named Lily.").nats_per_token < q.threshold
    assert len(srv.requests) == 1 and srv.requests[0].messages == [
        {"role": "user", "content": "What is the capital of France?"}]


# --- names and reasons ------------------------------------------------------------------------------------
def test_min_logprob_metric_has_its_own_name_and_the_old_keyword_still_works():
    r = Router(uncertainty="min_logprob", min_confidence=-3.0)
    assert r.min_confidence == -3.0 and r.min_mean_logprob == -3.0
    g = Generation(text=" x", token_ids=[1, 2], finish_reason="length", prompt_tokens=1, completion_tokens=2,
                   time_to_first_token_s=0, decode_tokens_per_s=1, total_time_s=0, logprobs=[-0.1, -3.00004])
    d = r.after(g)
    assert (d.target, d.reason) == ("cloud", "uncertainty: min_logprob -3.00004 < -3.00000")
    old = Router(min_mean_logprob=-2.0)
    assert old.min_confidence == -2.0 and "min_confidence=-2" in repr(old)
    with pytest.raises(InvalidArgumentError, match="not both"):
        Router(min_mean_logprob=-2.0, min_confidence=-1.0)
    with pytest.raises(InvalidArgumentError):
        Router(max_prompt_nats="high")


# --- calibration from labelled examples ------------------------------------------------------------------
def test_labelled_calibration_puts_the_threshold_in_the_gap_and_reports_the_separation():
    local_p = [f"story {i}" for i in range(6)]
    cloud_p = [f"question {i}" for i in range(6)]
    nats = {**{p: 2.0 + 0.1 * i for i, p in enumerate(local_p)}, **{p: 4.0 + 0.2 * i for i, p in enumerate(cloud_p)}}
    local = Scored(nats)
    router = Router(min_confidence=None)
    with FaultServer(ok("cloud")) as srv:
        hy = Hybrid(local, cloud_for(srv), router)
        rep = router.calibrate(local_p, cloud_p)  # positional form; signal defaults to the prompt score
        assert rep.mode == "labelled" and rep.signal == "prompt-score"
        assert router.max_prompt_nats == pytest.approx((2.5 + 4.0) / 2)  # the middle of the gap
        assert rep.auroc == 1.0 and rep.margin == pytest.approx(1.5)
        assert (rep.local_to_cloud, rep.cloud_kept_local, rep.cloud_share) == (0.0, 0.0, 0.5)
        assert "AUROC 1.000, margin +1.5" in str(rep)
        routed = [hy.generate(p).source for p in local_p + cloud_p]
    assert routed == ["local"] * 6 + ["cloud"] * 6
    # Overlapping classes: the cut that misroutes the fewest, and the report says how far they overlap
    nats["story 5"] = 4.1
    rep = Router(min_confidence=None).calibrate(local_prompts=local_p, cloud_prompts=cloud_p, model=Scored(nats))
    assert rep.margin == pytest.approx(4.0 - 4.1) and rep.auroc == pytest.approx(1 - 1 / 36)
    assert rep.local_to_cloud + rep.cloud_kept_local == pytest.approx(1 / 6)  # one example misrouted
    with pytest.raises(InvalidArgumentError):
        Router().calibrate(local_p, 0.3, local_prompts=local_p, model=local)


def test_labelled_calibration_of_the_uncertainty_signal_and_other_checks():
    local_p, cloud_p = ["a", "b", "c"], ["d", "e", "translate f"]
    conf = {"a": -0.5, "b": -0.6, "c": -0.7, "d": -1.5, "e": -1.2, "translate f": -0.1}
    router = Router(max_prompt_nats=None, rules=[Rule("cloud", keywords=["translate"])])
    rep = router.calibrate(local_prompts=local_p, cloud_prompts=cloud_p, signal="uncertainty",
                           model=LocalDouble(conf), max_new_tokens=3)
    # the rule already routes "translate f"; the threshold sits between -0.7 (kept) and -1.2 (sent)
    assert router.min_confidence == pytest.approx(-0.95) and rep.counts == {"rule": 1, "uncertainty": 5}
    assert rep.auroc == 1.0 and rep.margin == pytest.approx(0.5) and rep.cloud_kept_local == 0.0


def test_share_calibration_says_why_ties_miss_the_target():
    prompts = ["a b"] * 4 + ["a b c d"] * 4 + ["a b c d e f"] * 2
    router = Router()
    rep = router.calibrate(prompts, 0.4, signal="length", model=LocalDouble())
    # 40 % would be 4 prompts; the next-longest 4 tie at 5 tokens, and a threshold cannot split them
    assert rep.cloud_share == pytest.approx(0.2) and router.max_prompt_tokens == 5
    assert "4 prompts tie at length 5" in rep.note and rep.note in str(rep)
    assert router.calibrate(prompts, 0.2, signal="length", model=LocalDouble()).note is None


# --- the endpoint per prompt ------------------------------------------------------------------------------
def test_continuations_go_to_completions_and_requests_to_chat_unless_told_otherwise():
    assert looks_like_request("What is the capital of France?")
    assert looks_like_request("Translate 'hello' into Spanish.") and looks_like_request("  write a poem")
    assert not looks_like_request("Once upon a time, there was a girl.") and not looks_like_request("Mom said")
    assert not looks_like_request("Will and May went to the park.")  # names, not requests
    with FaultServer(ok("x")) as srv:
        hy = Hybrid(LocalDouble(), cloud_for(srv), Router(default="cloud"))
        results = [hy.generate("Tom had a red ball."), hy.generate("Who wrote Hamlet?"),
                   hy.chat([{"role": "user", "content": "Tom had a red ball."}])]
        s = hy.stream("Tom had a red ball.")
        "".join(s)
        forced = [Hybrid(LocalDouble(), cloud_for(srv), Router(default="cloud"), cloud_endpoint=e).generate(
            "Tom had a red ball." if e == "chat" else "Who wrote Hamlet?") for e in ("chat", "completions")]
    paths = [r.path for r in srv.requests]
    assert paths == ["/v1/completions", "/v1/chat/completions", "/v1/chat/completions", "/v1/completions",
                     "/v1/chat/completions", "/v1/completions"]
    assert [r.cloud_endpoint for r in results + [s.result] + forced] == [
        "completions", "chat", "chat", "completions", "chat", "completions"]
    assert srv.requests[0].body["prompt"] == "Tom had a red ball."  # continued, not commented on
    with pytest.raises(InvalidArgumentError):
        Hybrid(LocalDouble(), cloud_endpoint="chatty")


# --- issue 16 item 1: the [cloud] extra is missing ----------------------------------------------------------
@pytest.mark.filterwarnings("ignore:A cloud is configured")
def test_missing_cloud_extra_falls_back_to_the_local_answer(monkeypatch):
    monkeypatch.delitem(sys.modules, "httpx", raising=False)
    monkeypatch.setitem(sys.modules, "httpx", None)  # "import httpx" now fails as if it were not installed
    local = LocalDouble()
    with ConnectionSpy() as spy:
        hy = Hybrid(local, cloud_for("http://127.0.0.1:9/v1"))
        r = hy.generate("anything", prefer="cloud")
        s = hy.stream("anything", prefer="cloud")
        text = "".join(s)
    assert (r.source, r.text) == ("local", " local answer 1")
    assert r.fallback.startswith("cloud extra not installed") and 'edgelm[cloud]' in r.fallback
    assert text == " local answer 2" and s.result.fallback.startswith("cloud extra not installed")
    assert spy.connects == []


# --- issue 15 fault 9: a context-routed stream whose cloud breaks part-way ---------------------------------
class Recording(LocalDouble):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.stream_kwargs: list[dict] = []

    def stream(self, prompt, **kw):
        self.stream_kwargs.append(kw)
        return super().stream(prompt, **kw)


@pytest.mark.filterwarnings("ignore:A cloud is configured")
def test_context_routed_stream_broken_by_the_cloud_is_continued_locally_within_its_context():
    local = Recording(context_length=16)
    with FaultServer(broken_stream("one two three four", after=2)) as srv:
        hy = Hybrid(local, cloud_for(srv))
        s = hy.stream("Tell me", max_new_tokens=40)  # 40 new tokens can never fit a 16-token context
        pieces = list(s)
    r = s.result
    assert r.signal == "context" and r.source == "mixed" and "".join(pieces) == r.text
    assert r.text.startswith("one two local answer")
    kw = local.stream_kwargs[0]
    assert kw["truncate"] == "left" and kw["max_new_tokens"] == 8  # half the local context
    assert "at most 8 more tokens" in r.fallback and local.calls == ["Tell meone two"]


@pytest.mark.filterwarnings("ignore:A cloud is configured")
def test_broken_stream_the_local_model_cannot_continue_is_a_routing_error_with_the_partial_text():
    class Refuses(LocalDouble):
        def stream(self, prompt, **kw):
            raise ContextLengthError("does not fit", prompt_tokens=99, max_new_tokens=8, context_length=16)

    with FaultServer(broken_stream("one two three four", after=2)) as srv:
        hy = Hybrid(Refuses(context_length=16), cloud_for(srv))
        s = hy.stream("Tell me", max_new_tokens=40)
        got = []
        with pytest.raises(RoutingError, match="broke after 7 characters") as info:
            for piece in s:
                got.append(piece)
    assert "".join(got) == "one two" and info.value.partial_text == "one two"
