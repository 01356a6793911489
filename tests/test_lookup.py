"""Prompt lookup (edgelm.lookup): greedy decoding that verifies n-gram drafts several tokens per model call.

What "exact" means here (docs/lookup.md): a multi-token call is not bit-identical to one-token calls (fp32 kernels
differ in the last bits between 1 and several rows; int8 graphs round that into quantization steps and quantize a
call's activations with one scale for all its rows). So lookup's
tokens must equal plain greedy decoding's, or first differ at a step where plain decoding's two best logits were
within that numerical noise of each other. On fp32 exports the noise is ~1e-5 and the tolerance 1e-3, so any real
bookkeeping error (a wrong row, a stale cache slot, a bad position) fails; a fake model with integer logits
checks the bookkeeping bit-exactly.
"""
from __future__ import annotations

import contextlib
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import cut_at_stop
from hypothesis import HealthCheck, given, settings, strategies as st

import edgelm
import edgelm.sampling
from edgelm.errors import InvalidArgumentError
from edgelm.lookup import K_MAX, LookupAdvance, NgramIndex

FP32_TIE = 1e-3  # fp32: batched and single-token logits differ by ~1e-5 (measured); a tie below this may flip
SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
WORDS = "Lily Tom ball park dog cat happy big red went saw the and to she he was played with".split()


# --- the n-gram index against a brute-force search ------------------------------------------------------------
def _reference_draft(hist: list[int], max_ngram: int, limit: int) -> list[int]:
    for n in range(min(max_ngram, len(hist)), 0, -1):
        suffix = hist[len(hist) - n:]
        if n == 1 and hist[:-1].count(hist[-1]) > 1:
            return []  # a single token only when its earlier occurrence is unique
        for start in range(len(hist) - n - 1, -1, -1):  # the most recent occurrence that has a continuation
            if hist[start:start + n] == suffix:
                return hist[start + n:start + n + limit]
    return []


@settings(max_examples=300, **SETTINGS)
@given(hist=st.lists(st.integers(0, 4), min_size=1, max_size=40), split=st.integers(0, 40),
       max_ngram=st.integers(1, 4), limit=st.integers(1, 8))
def test_ngram_draft_matches_brute_force(hist, split, max_ngram, limit):
    index = NgramIndex(hist[:split], max_ngram)  # part as the prompt, the rest pushed one by one
    for tok in hist[split:]:
        index.push(tok)
    assert index.hist == hist
    assert index.draft(limit) == _reference_draft(hist, max_ngram, limit)


# --- bookkeeping, bit-exact, on a fake model ------------------------------------------------------------------
class FakeCache:
    """A deterministic "model" with the shared layout's contract: a call writes its tokens into slots pos.. and
    each row depends only on slots 0..its own (so a stale slot that is read changes the answer). Logits are
    one-hot: no ties, no float noise."""

    def __init__(self, rule, vocab: int, context: int):
        self.rule, self.vocab, self.slots = rule, vocab, [None] * context
        self.draft_ids = np.zeros((1, K_MAX + 1), dtype=np.int64)
        self.verified: list[tuple[int, int]] = []  # (m, pos) of every verification
        self.steps = 0

    def _row(self, slot: int) -> np.ndarray:
        row = np.zeros(self.vocab, dtype=np.float32)
        row[self.rule(self.slots[:slot + 1])] = 1.0
        return row

    def prefill(self, ids: list[int]) -> np.ndarray:
        self.slots[:len(ids)] = ids
        return self._row(len(ids) - 1)

    def advance(self, tok: int, pos: int) -> tuple:
        self.steps += 1
        self.slots[pos] = tok
        return self._row(pos), None

    def verify(self, m: int, pos: int) -> tuple:
        assert pos + m <= len(self.slots), "a verification ran past the context"
        self.verified.append((m, pos))
        self.slots[pos:pos + m] = [int(t) for t in self.draft_ids[0, :m]]
        return np.stack([self._row(pos + j) for j in range(m)]), None

    def single(self) -> None:
        pass

    def rollback(self, pos: int) -> None:
        self.slots[pos:] = [None] * (len(self.slots) - pos)  # a stale slot read later would raise in rule()


def _greedy(cache: FakeCache, prompt: list[int], n: int, advance) -> list[int]:
    """The decode loop's shape (edgelm.model.Model._decode) reduced to greedy arg-max."""
    logits, out = cache.prefill(prompt), []
    while True:
        out.append(int(logits.argmax()))
        if len(out) == n:
            return out
        logits, _ = advance(out[-1], len(prompt) + len(out) - 1)


def _rule(period: int, vocab: int):
    """Next token from the last two (a small vocabulary repeats n-grams, so drafts are often right)."""
    def rule(seq):
        assert None not in seq, "read a rolled-back slot"
        return (seq[-1] * 3 + seq[-2 if len(seq) > 1 else -1] + len(seq) // period) % vocab
    return rule


@settings(max_examples=150, **SETTINGS)
@given(prompt=st.lists(st.integers(0, 5), min_size=1, max_size=30), n=st.integers(1, 60),
       period=st.integers(1, 50), vocab=st.integers(2, 6), k_start=st.integers(1, K_MAX), context_slack=st.booleans())
def test_fake_model_tokens_are_exactly_plain_greedy(prompt, n, period, vocab, k_start, context_slack):
    context = len(prompt) + n + (7 if context_slack else 0)
    rule = _rule(period, vocab)
    plain = FakeCache(rule, vocab, context)
    expected = _greedy(plain, prompt, n, plain.advance)
    fake = FakeCache(rule, vocab, context)
    last_slot = min(len(prompt) + n - 2, context - 1)
    lookup = LookupAdvance(fake, prompt, last_slot, k_start=k_start)
    assert _greedy(fake, prompt, n, lookup) == expected
    assert all(pos + m - 1 <= last_slot for m, pos in fake.verified)  # never past max_new_tokens or the context
    assert lookup.drafted == sum(m - 1 for m, _ in fake.verified)
    assert lookup.accepted <= lookup.drafted
    # every token cost a call, or was an accepted draft (a verification yields >= 1 token)
    assert fake.steps + len(fake.verified) + lookup.accepted == max(0, n - 1)


def test_drafts_that_keep_failing_switch_lookup_off(frozen_clock):
    """An adversarial model that never says what the n-gram index predicts: verifications back off to at most one
    per MAX_PAUSE tokens, each of the shortest draft."""
    from edgelm.lookup import K_MIN, MAX_PAUSE

    def contrary(seq):
        guess = NgramIndex(seq).draft(1)
        return ((guess[0] if guess else 0) + 1) % 3

    n = 2000
    prompt = [0, 1, 2, 0, 1, 2]
    fake = FakeCache(contrary, 3, len(prompt) + n)
    lookup = LookupAdvance(fake, prompt, len(prompt) + n - 2)
    _greedy(fake, prompt, n, lookup)
    assert lookup.accepted == 0
    assert len(fake.verified) <= MAX_PAUSE.bit_length() + n // MAX_PAUSE + 1
    assert all(m <= K_MIN + 1 for m, _ in fake.verified[1:])  # after the first miss: the shortest drafts


def test_drafts_that_are_mostly_wrong_switch_lookup_off(frozen_clock):
    """A model that counts ("1. 2. 3. ..." with two tokens per number): the draft after ". " repeats the previous
    number, whose first token is right a third of the time. A verification then yields 1.33 tokens on average,
    less than it costs, although it accepts something every third call: drafting must pause all the same."""
    from edgelm.lookup import COST_BASE, COST_PER_DRAFT, MAX_PAUSE

    dot, space = 0, 1

    def count(seq):  # ... T(n) O(n) . _ T(n+1) ...: T(n) = n - n // 3 repeats a third of the time, O(n) never
        i, n = (len(seq) - 1) % 4, (len(seq) - 1) // 4
        return [2 + n - n // 3, 2000 + n, dot, space][i]

    n = 1600
    prompt = [count([0] * j) for j in range(1, 9)]
    fake = FakeCache(count, 4000, len(prompt) + n)
    lookup = LookupAdvance(fake, prompt, len(prompt) + n - 2)
    _greedy(fake, prompt, n, lookup)
    charged = sum(COST_BASE + COST_PER_DRAFT * (m - 1) for m, _ in fake.verified)
    yielded = len(fake.verified) + lookup.accepted
    assert 0 < lookup.accepted < len(fake.verified)  # some drafts are right
    assert charged - yielded < 2 + n / MAX_PAUSE  # ... but verification stays rare: about one per MAX_PAUSE tokens


def test_a_model_that_copies_is_verified_in_long_drafts(frozen_clock):
    """The case lookup is for: the output repeats the prompt. Draft lengths grow to K_MAX, and most tokens come
    out of verifications."""
    text = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4, 6, 2, 6, 4, 3, 3, 8, 3, 2, 7, 9, 5] * 3

    def copy(seq):  # continue the 32-token pattern
        return text[len(seq) % 32]

    fake = FakeCache(copy, 10, 200)
    lookup = LookupAdvance(fake, text[:40], 198)
    out = _greedy(fake, text[:40], 120, lookup)
    assert out == [text[i % 32] for i in range(40, 160)]
    assert max(m for m, _ in fake.verified) == K_MAX + 1
    assert lookup.accepted >= 100 and fake.steps <= 4


# --- the measured cost of a verification decides whether drafting pays -----------------------------------------
class FakeClock:
    """Seconds that pass only when a fake model call says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class TimedCache(FakeCache):
    """FakeCache whose one-token step takes 1 s of ``clock`` and a verification of ``m`` tokens ``verify_s(m)``."""

    def __init__(self, rule, vocab: int, context: int, clock: FakeClock, verify_s):
        super().__init__(rule, vocab, context)
        self.clock, self.verify_s = clock, verify_s

    def advance(self, tok: int, pos: int) -> tuple:
        self.clock.now += 1.0
        return super().advance(tok, pos)

    def verify(self, m: int, pos: int) -> tuple:
        self.clock.now += self.verify_s(m)
        return super().verify(m, pos)


@pytest.fixture
def frozen_clock(monkeypatch):
    """A clock that never moves: nothing is measured, so every verification is charged the fixed COST_BASE +
    COST_PER_DRAFT * k (for tests of that policy, and of statistics that must repeat exactly)."""
    import edgelm.lookup

    monkeypatch.setattr(edgelm.lookup, "CLOCK", lambda: 0.0)


def _counting(seq):
    """The counting model of test_drafts_that_are_mostly_wrong_switch_lookup_off: verifications yield 1.33 tokens,
    fewer than the fixed charge for their 2 drafts."""
    i, n = (len(seq) - 1) % 4, (len(seq) - 1) // 4
    return [2 + n - n // 3, 2000 + n, 0, 1][i]


_PATTERN = [(7 * i * i + 3 * i) % 50 + 10 for i in range(40)]


def _copying_with_edits(seq):
    """Copies a 40-token pattern but puts a new token at every 5th slot: verifications of 3 drafts yield 3 tokens,
    more than the fixed charge (1.75 steps), less than a verification that costs 4 steps."""
    return 5000 + len(seq) if len(seq) % 5 == 0 else _PATTERN[len(seq) % 40]


def _timed_lookup(rule, vocab: int, prompt: list[int], n: int, verify_s):
    """Greedy tokens with lookup on a TimedCache, the verifications made, and the tokens plain greedy decoding
    gives."""
    plain = FakeCache(rule, vocab, len(prompt) + n)
    expected = _greedy(plain, prompt, n, plain.advance)
    clock = FakeClock()
    fake = TimedCache(rule, vocab, len(prompt) + n, clock, verify_s)
    lookup = LookupAdvance(fake, prompt, len(prompt) + n - 2, clock=clock)
    return _greedy(fake, prompt, n, lookup), fake.verified, expected


@pytest.mark.parametrize("rule,vocab,prompt", [
    (_counting, 4000, [_counting([0] * j) for j in range(1, 9)]),
    (_copying_with_edits, 7000, _PATTERN * 2),
], ids=["yields-1.33", "yields-3"])
def test_measured_verification_cost_decides_whether_drafting_pays(rule, vocab, prompt):
    """The same drafts are worth verifying when a verification costs what a one-token step does (an accelerator)
    and not when it costs 4 steps (multi-token calls on fp32 activations): lookup must follow the clock, not the
    fixed charge, which pauses the first model and keeps drafting on the second. Either way the tokens are plain
    greedy decoding's."""
    from edgelm.lookup import MAX_PAUSE

    n = 1600
    cheap, cheap_calls, expected = _timed_lookup(rule, vocab, prompt, n, lambda m: 1.0)
    dear, dear_calls, _ = _timed_lookup(rule, vocab, prompt, n, lambda m: 3.9 + 0.01 * m)
    assert cheap == expected and dear == expected
    assert len(cheap_calls) > n // 6  # drafting continued
    assert len(dear_calls) <= MAX_PAUSE.bit_length() + n // MAX_PAUSE + 2  # paused: about one per MAX_PAUSE tokens
    assert sum(m for m, _ in dear_calls) * 5 < sum(m for m, _ in cheap_calls)


@pytest.mark.parametrize("dear", [False, True])
def test_dear_verifications_check_only_drafts_of_full_matches(dear):
    """Where a verification costs more than SURE_DRAFTS_ABOVE steps, a draft found by fewer than max_ngram tokens
    (here most of the counting model's) is not worth one: from the costs measured by an earlier generation on the
    same cache, every verification's last max_ngram tokens occurred before. Cheap verifications take any match."""
    from edgelm.lookup import MAX_NGRAM

    n = 800
    prompt = [_counting([0] * j) for j in range(1, 9)]
    plain = FakeCache(_counting, 4000, len(prompt) + n)
    expected = _greedy(plain, prompt, n, plain.advance)
    clock = FakeClock()
    fake = TimedCache(_counting, 4000, len(prompt) + n, clock, (lambda m: 3.0 + 0.1 * m) if dear else (lambda m: 1.0))
    for _ in range(2):  # the second generation is priced by what the first measured
        fake.verified.clear()
        out = _greedy(fake, prompt, n, LookupAdvance(fake, prompt, len(prompt) + n - 2, clock=clock))
        assert out == expected
    hist = prompt + out
    weak = [not any(hist[i:i + MAX_NGRAM] == hist[pos + 1 - MAX_NGRAM:pos + 1] for i in range(pos + 1 - MAX_NGRAM))
            for _, pos in fake.verified]
    assert fake.verified
    if dear:
        assert not any(weak)
    else:
        assert sum(weak) > len(weak) // 2


def test_costs_are_measured_per_length_and_fall_back_to_the_constants():
    """The charge follows the measured line base + per-draft (the decayed least-squares fit, slope pulled to the
    prior), in units of the measured step; before MIN_TIMED_STEPS steps are timed it is the fixed one. The
    estimates belong to the cache, so later generations on it start from them."""
    from edgelm.lookup import COST_BASE, COST_PER_DRAFT, MIN_TIMED_STEPS

    clock = FakeClock()
    fake = TimedCache(lambda seq: 0, 2, 100, clock, lambda m: 2.0 + 0.5 * m)
    lookup = LookupAdvance(fake, [1, 0], 98, clock=clock)
    assert lookup.costs.cost(4) == COST_BASE + COST_PER_DRAFT * 4  # nothing measured yet
    for k in (2, 6, 2, 6, 10):  # verifications of 2, 6, 10 drafts: 2.5 + 0.5 k seconds each
        lookup._adapt(0, k, 2.5 + 0.5 * k)
    assert lookup.costs.cost(4) == COST_BASE + COST_PER_DRAFT * 4  # no step timed yet
    for pos in range(2, 2 + MIN_TIMED_STEPS):
        lookup._single(0, pos)  # 1 s each
    for k in (1, 4, 8, 16):  # a line through exact points: the fit recovers it (the prior pulls the slope a little)
        assert lookup.costs.cost(k) == pytest.approx(2.5 + 0.5 * k, rel=0.1)
    # the next generation on the same cache starts from these estimates; one timed by another clock does not
    assert LookupAdvance(fake, [1, 0], 98, clock=clock).costs.cost(4) == lookup.costs.cost(4)
    assert LookupAdvance(fake, [1, 0], 98, clock=FakeClock()).costs.cost(4) == COST_BASE + COST_PER_DRAFT * 4


# --- the real runtime on fp32 exports -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stories(stories_fp32):
    return edgelm.load(stories_fp32, threads=1)


def _tiny(arch: str, layout: str):
    """A random-weight export with context 64 (the context-length edge is cheap to reach)."""
    pytest.importorskip("transformers")
    from conftest import cached_export
    from test_export_archs import _hf_folder

    src = _hf_folder(arch)
    lm = edgelm.load(cached_export(f"arch-{src.name}-fp32", src, quantize="none", context_length=64), threads=1)
    assert lm.kv_cache == layout
    return lm


@pytest.fixture(scope="module")
def tiny_llama():
    return _tiny("llama", "shared")


@pytest.fixture(scope="module")
def tiny_gpt2():
    """GPT-2: the "concat" layout, with learned positions (position_ids really matter)."""
    return _tiny("gpt2", "concat")


@contextlib.contextmanager
def top2_gaps():
    """Record, for every token the sampler picks, the gap between the two best (penalised) logits."""
    gaps: list[float] = []
    original = edgelm.sampling.Sampler.step

    def step(self, logits, logprobs=None):
        top = np.partition(self.penalised(logits), -2)[-2:]
        gaps.append(float(top[1] - top[0]))
        return original(self, logits, logprobs)

    edgelm.sampling.Sampler.step = step
    try:
        yield gaps
    finally:
        edgelm.sampling.Sampler.step = original


def compare(lm, prompt, tie: float, **kw):
    """Plain and lookup greedy generations; asserts they agree (module docstring). Returns (plain, lookup, first
    differing token index or None)."""
    with top2_gaps() as gaps:
        plain = lm.generate(prompt, temperature=0, **kw)
    fast = lm.generate(prompt, temperature=0, lookup=True, **kw)
    a, b = plain.token_ids, fast.token_ids
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    if first is None:
        assert a == b and fast.text == plain.text and fast.finish_reason == plain.finish_reason
        # a log-probability moves by at most twice the logits' noise
        assert np.allclose(fast.logprobs, plain.logprobs, rtol=0, atol=2 * tie)
    else:
        assert gaps[first] < tie, f"lookup chose token {b[first]} where plain greedy chose {a[first]} " \
                                  f"(step {first}) although its two best logits were {gaps[first]:.3g} apart"
    assert fast.accepted_tokens <= fast.drafted_tokens
    assert fast.completion_tokens == len(b) and plain.drafted_tokens == 0
    return plain, fast, first


def _prompt(data, lm, repeat: bool):
    words = data.draw(st.lists(st.sampled_from(WORDS), min_size=1, max_size=12), label="words")
    text = " ".join(words)
    if repeat:  # a prompt that repeats itself gives drafts from the start
        text = f"{text}. {text}. {' '.join(words[:max(1, len(words) // 2)])}"
    return text


@settings(max_examples=120, **SETTINGS)
@given(data=st.data(), repeat=st.booleans(), n=st.integers(1, 90), ignore_eos=st.booleans(),
       penalty=st.sampled_from([1.0, 1.0, 1.3]), n_stops=st.integers(0, 2))
def test_stories_lookup_equals_plain_greedy(stories, data, repeat, n, ignore_eos, penalty, n_stops):
    prompt = _prompt(data, stories, repeat)
    kw = dict(max_new_tokens=n, ignore_eos=ignore_eos, repetition_penalty=penalty)
    base = stories.generate(prompt, temperature=0, **kw)
    stops = []
    for _ in range(n_stops):  # stop strings taken from the text, so they really fire (maybe inside a draft)
        if base.text:
            i = data.draw(st.integers(0, len(base.text) - 1), label="stop start")
            stops.append(base.text[i:i + data.draw(st.integers(1, 6), label="stop len")])
    plain, fast, first = compare(stories, prompt, FP32_TIE, stop=stops or None, **kw)
    if first is None and stops:
        assert fast.text == cut_at_stop(base.text, stops)[0]


@settings(max_examples=60, **SETTINGS)
@given(data=st.data(), layout=st.sampled_from(["shared", "concat"]), to_the_end=st.booleans())
def test_tiny_models_both_layouts_up_to_the_context_end(tiny_llama, tiny_gpt2, data, layout, to_the_end):
    lm = tiny_llama if layout == "shared" else tiny_gpt2
    ids = data.draw(st.lists(st.integers(3, 511), min_size=1, max_size=20), label="ids")
    if data.draw(st.booleans(), label="repeat"):
        ids = ids * 3
    n = lm.context_length - len(ids) if to_the_end else data.draw(st.integers(1, lm.context_length - len(ids)))
    compare(lm, ids, FP32_TIE, max_new_tokens=n, ignore_eos=True)


def test_lookup_accepts_drafts_and_streams_the_same_text(stories, frozen_clock):
    prompt = "Lily had a red ball. She liked to play with the ball. Lily had a red ball. She liked"
    plain, fast, first = compare(stories, prompt, FP32_TIE, max_new_tokens=120, ignore_eos=True)
    assert first is None
    assert fast.accepted_tokens >= 10  # the story repeats itself: lookup really worked
    s = stories.stream(prompt, max_new_tokens=120, temperature=0, ignore_eos=True, lookup=True)
    assert "".join(s) == fast.text and s.generation.token_ids == fast.token_ids
    assert s.generation.accepted_tokens == fast.accepted_tokens
    chat = stories.chat([{"role": "user", "content": prompt}], max_new_tokens=40, temperature=0, lookup=True)
    assert chat.token_ids == stories.chat([{"role": "user", "content": prompt}], max_new_tokens=40,
                                          temperature=0).token_ids


def _spy_verifications(monkeypatch, lm) -> list[tuple[list[int], int]]:
    """Record (tokens fed, slot) of every verification call of ``lm``'s shared cache."""
    from edgelm.model import _SharedCache

    calls = []
    original = _SharedCache.verify

    def verify(self, m, pos):
        if self.model is lm:
            calls.append(([int(t) for t in self.draft_ids[0, :m]], pos))
        return original(self, m, pos)

    monkeypatch.setattr(_SharedCache, "verify", verify)
    return calls


def _accepted_slots(calls, tokens, n_prompt) -> set[int]:
    """Slots (n_prompt + index in ``tokens``) of tokens that were accepted drafts of a verification."""
    slots = set()
    for fed, pos in calls:
        for j in range(1, len(fed)):
            i = pos + j - n_prompt
            if i >= len(tokens) or tokens[i] != fed[j]:
                break
            slots.add(pos + j)
    return slots


def test_expensive_verifications_pause_drafting_on_a_real_model(stories, monkeypatch):
    """The runtime's own cache, timed by a fake clock: verifications as cheap as a step keep drafting; at 6 steps
    each, the same repetitive story pauses it (far fewer drafts), and the tokens stay plain greedy's either way."""
    cost = {"verify": 1.0}
    _timed_caches(monkeypatch, cost)
    prompt = "Lily had a red ball. She liked to play with the ball. Lily had a red ball. She liked"
    kw = dict(max_new_tokens=250, ignore_eos=True)
    _, cheap, first = compare(stories, prompt, FP32_TIE, **kw)
    assert first is None
    cost["verify"] = 6.0
    _, dear, first = compare(stories, prompt, FP32_TIE, **kw)
    assert first is None
    assert dear.drafted_tokens * 3 < cheap.drafted_tokens, (dear.drafted_tokens, cheap.drafted_tokens)


def test_eos_inside_an_accepted_draft_ends_generation_there(stories, monkeypatch):
    prompt = "Lily had a red ball. She liked to play with the ball. Lily had a red ball. She liked"
    n_prompt = len(stories.encode(prompt))
    calls = _spy_verifications(monkeypatch, stories)
    ref = stories.generate(prompt, max_new_tokens=100, temperature=0, ignore_eos=True, lookup=True).token_ids
    accepted = _accepted_slots(calls, ref, n_prompt)
    # A token whose first occurrence in the output is an accepted draft (preferably not a draft's first token, so
    # a later row of the verification decides): make it the EOS.
    cand = [i for i in range(len(ref)) if n_prompt + i in accepted and ref[i] not in ref[:i]]
    assert cand, "no accepted draft to place an EOS in"
    i = max(cand, key=lambda i: n_prompt + i - 1 in accepted)
    monkeypatch.setattr(stories, "eos_token_ids", frozenset({ref[i]}))
    calls.clear()
    plain, fast, first = compare(stories, prompt, FP32_TIE, max_new_tokens=100)
    assert first is None and fast.finish_reason == "eos" and fast.token_ids == ref[:i + 1]
    assert n_prompt + i in _accepted_slots(calls, fast.token_ids, n_prompt)


def test_sampling_ignores_lookup(stories):
    kw = dict(max_new_tokens=40, temperature=0.8, seed=3)
    a = stories.generate("Once upon a time", **kw)
    b = stories.generate("Once upon a time", lookup=True, **kw)
    assert b.token_ids == a.token_ids and b.drafted_tokens == 0 == b.accepted_tokens


@pytest.mark.parametrize("bad", ["yes", 1, None, 0.0])
def test_lookup_must_be_a_bool(stories, bad):
    for call in (stories.generate, stories.stream):
        with pytest.raises(InvalidArgumentError, match="lookup must be a bool"):
            call("Once upon a time", temperature=0, lookup=bad)


# --- int8: where exactness does not hold ----------------------------------------------------------------------
def _batch_noise(lm, prompt: list[int], tokens: list[int]) -> float:
    """Largest |logit| difference between one verification call over ``tokens`` and the same tokens fed one by
    one over the same prompt cache (the numerical noise lookup adds)."""
    cache = lm._shared_cache()
    cache.prefill(np.asarray([prompt], dtype=np.int64))
    m = len(tokens)
    cache.draft_ids[0, :m] = tokens
    batched = np.array(cache.verify(m, len(prompt))[0], copy=True)
    cache.single()
    single = np.stack([np.array(cache.advance(t, len(prompt) + j)[0], copy=True) for j, t in enumerate(tokens)])
    lm._kv_pool.append(cache)
    return float(np.abs(batched - single).max())


def test_int8_default_model_differs_from_plain_only_at_near_ties():
    """The shipped model's int8 GEMMs (DynamicQuantizeMatMul) quantize a whole call's activations with one scale,
    so a verification's rows differ from one-token steps by far more than fp32 rounding. Lookup then is greedy
    under slightly different numerics: it may leave plain greedy's path, but only where plain's two best logits
    were closer than that noise."""
    lm = edgelm.load(threads=1)
    assert lm.config["dtype"] == "int8" and lm.kv_cache == "shared"
    prompt = lm.encode("Once upon a time, there was a little girl named Lily. She loved to play outside.")
    cont = lm.generate(prompt, max_new_tokens=K_MAX + 1, temperature=0, ignore_eos=True).token_ids
    noise = max(_batch_noise(lm, prompt, cont[:m]) for m in (2, 5, K_MAX + 1))
    assert noise > 1e-3  # far above fp32's ~1e-5: int8 batching really changes the numbers
    for text in ("Tom had a red ball. Tom had a red ball. Tom", "Lily and Ben went to the park. They saw",
                 "The dog was happy. The dog was happy. The"):
        compare(lm, text, noise, max_new_tokens=150, ignore_eos=True)


def _timed_caches(monkeypatch, cost: dict):
    """The runtime's shared cache timed by a fake clock: a step takes 1 s, a verification ``cost["verify"]``."""
    import edgelm.lookup
    from edgelm.model import _SharedCache

    clock = FakeClock()
    monkeypatch.setattr(edgelm.lookup, "CLOCK", clock)
    advance, verify = _SharedCache.advance, _SharedCache.verify

    def timed_advance(self, tok, pos):
        clock.now += 1.0
        return advance(self, tok, pos)

    def timed_verify(self, m, pos):
        clock.now += cost["verify"]
        return verify(self, m, pos)

    monkeypatch.setattr(_SharedCache, "advance", timed_advance)
    monkeypatch.setattr(_SharedCache, "verify", timed_verify)


def test_int8_lookup_answers_do_not_depend_on_timing(monkeypatch):
    """On int8 graphs a verification's rows may pick another token than one-token steps at a near-tie, so WHEN
    lookup drafts could change the answer. The runtime therefore reads no clock there: however cheap or dear
    verifications are, the same prompt drafts the same tokens and gives the same answer (on fp32 the clock
    decides, test above)."""
    lm = edgelm.load(threads=1)  # the shipped int8 model
    cost = {"verify": 1.0}
    _timed_caches(monkeypatch, cost)
    text = "Tom had a red ball. Tom had a red ball. Tom had a red ball. Tom"
    runs = []
    for cost["verify"] in (1.0, 8.0, 1.0):
        g = lm.generate(text, max_new_tokens=120, temperature=0, ignore_eos=True, lookup=True)
        runs.append((list(g.token_ids), g.drafted_tokens, g.accepted_tokens))
    assert runs[0][1] > 0 and runs[0] == runs[1] == runs[2]


@pytest.mark.parametrize("config,quantization,exact", [
    ({"dtype": "float32"}, None, True),
    ({"dtype": "float16"}, None, False),  # not measured: not assumed
    ({"dtype": "int4"}, {"method": "int4-fp32", "accuracy_level": 0, "gemm_matmuls": 0}, True),
    ({"dtype": "int4"}, {"method": "int4", "accuracy_level": 4, "gemm_matmuls": 0}, False),
    ({"dtype": "int8"}, {"method": "int8", "accuracy_level": 4, "gemm_matmuls": 60}, False),
    ({"dtype": "int8"}, {"method": "int8-gemm", "gemm_matmuls": 121}, False),
    ({"dtype": "int8"}, None, False),  # a folder that does not say: assume rounding
])
def test_which_graphs_compute_in_fp32(config, quantization, exact):
    from edgelm.model import fp32_activations

    manifest = {} if quantization is None else {"quantization": quantization}
    assert fp32_activations(config, manifest) is exact


# --- front ends -----------------------------------------------------------------------------------------------
def test_cli_generate_lookup(stories_fp32, stories):
    prompt = "Tom had a red ball. Tom had a red ball. Tom"
    r = subprocess.run([sys.executable, "-m", "edgelm.cli", "generate", prompt, "--model", str(stories_fp32), "-n",
                        "60", "-t", "0", "--lookup", "--threads", "1", "--no-echo"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    expected = stories.generate(prompt, max_new_tokens=60, temperature=0, lookup=True)
    assert r.stdout == expected.text + "\n"
    # (how many drafts: the subprocess times its own calls, so when drafting pays may differ from this process)
    assert re.search(r"lookup: \d+/\d+ drafts accepted", r.stderr)


def test_server_option_turns_lookup_on_for_requests(stories, monkeypatch):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("starlette")
    from edgelm.server import BackgroundServer, create_app

    with pytest.raises(InvalidArgumentError):
        create_app(stories, lookup="on")
    seen = []
    original = stories.stream

    def stream(prompt, **kw):
        seen.append(kw.get("lookup"))
        return original(prompt, **kw)

    monkeypatch.setattr(stories, "stream", stream)
    prompt = "Tom had a red ball. Tom had a red ball. Tom"
    with BackgroundServer(stories, lookup=True, workers=1) as srv:
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": prompt, "max_tokens": 40, "temperature": 0},
                       timeout=60)
    assert r.status_code == 200, r.text
    assert seen == [True]
    assert r.json()["choices"][0]["text"] == stories.generate(prompt, max_new_tokens=40, temperature=0,
                                                              lookup=True).text


def test_server_default_turns_lookup_on_only_where_it_is_exact(stories, monkeypatch):
    """The server's default "auto": greedy requests to an fp32 model (lookup_exact) use lookup, to the shipped int8
    model they do not; True / False force it for both, anything else is refused."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("starlette")
    from edgelm import server
    from edgelm.server import BackgroundServer, create_app

    assert server.DEFAULT_LOOKUP == "auto"
    int8 = edgelm.load(threads=1)
    assert stories.lookup_exact is True and int8.lookup_exact is False
    seen: dict[str, list] = {"fp32": [], "int8": []}
    for name, lm in (("fp32", stories), ("int8", int8)):
        original = lm.stream

        def stream(prompt, _original=original, _name=name, **kw):
            seen[_name].append(kw.get("lookup"))
            return _original(prompt, **kw)

        monkeypatch.setattr(lm, "stream", stream)
    for setting in ("auto", True, False):
        for name, lm in (("fp32", stories), ("int8", int8)):
            kw = {} if setting == "auto" else {"lookup": setting}
            with BackgroundServer(lm, workers=1, **kw) as srv:
                r = httpx.post(srv.url + "/v1/completions", json={"prompt": "Tom had a red ball. Tom had a red",
                                                                  "max_tokens": 8, "temperature": 0}, timeout=60)
            assert r.status_code == 200, r.text
    assert seen == {"fp32": [True, True, None], "int8": [None, True, None]}
    for bad in ("on", 1, None):
        with pytest.raises(InvalidArgumentError):
            create_app(stories, lookup=bad)


# --- teacher forcing (Model._forced_logits: the export gate's per-step agreement uses it) ---------------------------
@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_forced_logits_are_the_decode_steps_of_greedy_generation(fixture, request):
    lm = request.getfixturevalue(fixture)
    prompt = [5, 9, 3, 17, 2]
    ans = list(lm.generate(prompt, max_new_tokens=20, temperature=0, ignore_eos=True).token_ids)
    assert [int(np.argmax(row)) for row in lm._forced_logits(prompt, ans)] == ans
    # fed other tokens, each step still predicts from exactly the forced prefix (fp32: a fresh prefill agrees)
    other = [(t * 7 + 11) % lm.vocab_size for t in ans]
    forced = [int(np.argmax(row)) for row in lm._forced_logits(prompt, other)]
    for i in (0, 5, 13, 19):
        assert forced[i] == lm.generate(prompt + other[:i], max_new_tokens=1, temperature=0,
                                        ignore_eos=True).token_ids[0]
    with pytest.raises(edgelm.errors.ContextLengthError):
        list(lm._forced_logits(prompt, [1] * lm.context_length))
