"""Prompt-lookup (n-gram) speculative decoding for greedy generation.

Extraction, rewriting, summaries and code edits copy long runs of tokens from their prompt. When the last few
generated tokens also occur earlier in the prompt or the output, the tokens that followed that earlier
occurrence are a cheap guess ("draft") of what comes next. The model checks a guess of ``k`` tokens in ONE
call: it is fed the last accepted token plus the ``k`` drafts over the existing cache and returns logits for all
``k + 1`` positions. Row ``j`` is exactly the distribution the model would give after the drafts ``1..j``, so the
decode loop picks its token from row 0 as usual, and as long as its pick equals the next draft the next row is
valid too: one call yields every agreeing draft plus the model's own next token (at least one token per call).

This module is the policy: :class:`NgramIndex` finds drafts, :class:`LookupAdvance` wraps a cache's one-token
``advance`` (``edgelm.model``) so the decode loop itself does not change. Rejected drafts' cache slots are rolled
back by the cache (``rollback``): the "shared" layout derives the valid length and the positions from the
attention mask's length, so slots past it are never read and need nothing; the "concat" layout trims its
``present`` tensors.

Numerics: a multi-token call is not bit-identical to single-token calls. fp32 kernels (the fused attention, GEMMs)
differ in the last bits between 1 and m rows (logits by ~1e-5); int8 graphs round activations to int8, which turns
such differences into whole quantization steps, and DynamicQuantizeMatMul quantizes a call's activations with one
scale for all its rows, so int8 rows move by 0.1-3 logits. Greedy tokens therefore equal plain decoding's except
at near-ties of the two best logits: on fp32 that was never seen, on int8 it is common (docs/lookup.md).

Only greedy decoding uses it: the caller (``Model._run``) ignores ``lookup=True`` when sampling.
"""
from __future__ import annotations

import time
import weakref
from typing import Any, Callable

# Defaults, tuned by replaying SmolLM2-135M-Instruct outputs (docs/lookup.md): drafts start at 4 tokens, double on
# full acceptance up to 16, and shrink to one more than the accepted length (at least 2) on a rejection. A call's
# cost grows less than linearly with its length (a 17-token call costs 2.4-2.7 one-token calls there), so long
# drafts pay once text is being copied, and a 2-token floor recovers faster after a corrected word. (Starting at 8
# did as well, but a first draft that fails costs more on small models, whose calls grow faster with length.)
MAX_NGRAM = 3
K_START = 4
K_MIN = 2
K_MAX = 16
# Is drafting paying? Each verification is credited with the tokens it yielded and charged what it cost in one-token
# steps: the measured time of a verification of its length over the measured time of a one-token step (CallCosts).
# Measured, not assumed, because that price depends on the graph: on SmolLM2-135M int8 (int8 activations) a
# verification of 2 drafts costs about 1.4 steps, with fp32 activations (accuracy level 0, whose multi-row calls are
# far slower than one-row ones) over 3 (benchmarks/results/lookup-measured-cost.md). While the running
# average (weight SCORE_WEIGHT on the newest call) of credit minus charge is negative, every verification is a miss:
# drafting pauses for 2, 4, ... tokens of plain one-token steps, times the square of the steps the miss lost (charge
# minus credit, when over 1: where verifications are dear, a miss wastes more and fewer drafts pay, so tries are
# rarer), up to MAX_PAUSE; text that does not repeat pays for at most one verification per MAX_PAUSE tokens.
# Until MIN_TIMED_STEPS one-token steps (and a verification) have been timed, a verification of k drafts is
# charged the fixed COST_BASE + COST_PER_DRAFT * k (about the steepest int8 curve measured, docs/lookup.md).
COST_BASE = 1.3
COST_PER_DRAFT = 0.15
SCORE_WEIGHT = 0.3
MAX_PAUSE = 64
MIN_TIMED_STEPS = 3
# Where a verification of the shortest draft (K_MIN) costs more than SURE_DRAFTS_ABOVE steps, only drafts found by a
# match of max_ngram tokens are verified. Replaying SmolLM2-135M-Instruct int8 answers to benchmarks/lookup.py's
# tasks with the fixed charge, a verification yielded 3.1 tokens on average when its draft was found by a 3-token
# match, 2.7 by a 2-token one and 1.8 by a single token: where a verification costs about 3 steps, only the first
# kind pays; where it costs under 2 (int8, and the fixed charge for short drafts), every kind is worth a try.
SURE_DRAFTS_ABOVE = 2.7
# The running estimates: a one-token step's time is an exponential average (weight STEP_WEIGHT on the newest
# step); a verification's is a line base + per_draft * k fitted by least squares to the verifications so far, each
# older one's weight multiplied by VERIFY_DECAY per newer one. The slope is pulled towards COST_PER_DRAFT steps per
# draft with the weight of VERIFY_PRIOR (drafts squared) of spread in k, so a run of verifications of one length
# still gives a line, and a new length is priced from its neighbours.
STEP_WEIGHT = 0.1
VERIFY_DECAY = 0.8
VERIFY_PRIOR = 1.0
# A clock in seconds; LookupAdvance reads this at construction unless given one (tests inject a fake).
CLOCK: Callable[[], float] = time.perf_counter


def _unmeasured() -> float:
    """The clock of a LookupAdvance that does not measure (``measured=False``): it never moves, so nothing is
    ever timed and every verification is charged the fixed COST_BASE + COST_PER_DRAFT * k."""
    return 0.0


class CallCosts:
    """Running estimates of one cache's call times (seconds, from ``clock``): the one-token step (``step_s``, an
    average of ``timed_steps`` steps) and a verification of ``k`` drafts (a fitted line). Kept per cache across
    generations (a model's pooled caches are reused), so a short answer is priced from what earlier ones
    measured."""

    __slots__ = ("clock", "step_s", "timed_steps", "fit")

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.step_s = 0.0
        self.timed_steps = 0
        self.fit = [0.0] * 5  # decayed sums of weights, k, k*k, seconds, k*seconds over verifications

    def verification(self, k: int, seconds: float) -> None:
        fit = self.fit
        for i, x in enumerate((1.0, k, k * k, seconds, k * seconds)):
            fit[i] = VERIFY_DECAY * fit[i] + x

    def cost(self, k: int) -> float:
        """What a verification of ``k`` drafts costs, in one-token steps: the fitted line over the measured
        verifications divided by the measured step, or the fixed COST_BASE + COST_PER_DRAFT * k until
        MIN_TIMED_STEPS steps (and one verification) have been timed."""
        w, wk, wkk, wt, wkt = self.fit
        step = self.step_s
        if self.timed_steps < MIN_TIMED_STEPS or not w or step <= 0:
            return COST_BASE + COST_PER_DRAFT * k
        mean_k, mean_t = wk / w, wt / w
        # least squares' slope, pulled towards the prior COST_PER_DRAFT steps per draft (VERIFY_PRIOR)
        slope = (wkt / w - mean_k * mean_t + VERIFY_PRIOR * COST_PER_DRAFT * step) / \
            (max(0.0, wkk / w - mean_k * mean_k) + VERIFY_PRIOR)
        return (mean_t + max(0.0, slope) * (k - mean_k)) / step


# cache -> its CallCosts (weak: a cache that is freed takes its estimates along)
_COSTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _costs(cache: Any, clock: Callable[[], float]) -> CallCosts:
    costs = _COSTS.get(cache)
    if costs is None or costs.clock is not clock:  # times from another clock mean nothing in this one
        costs = CallCosts(clock)
        try:
            _COSTS[cache] = costs
        except TypeError:  # not weakly referenceable: this generation's measurements only
            pass
    return costs


class NgramIndex:
    """The token history (prompt + output) and, for every n-gram of 2..``max_ngram`` tokens that has a
    continuation, the position right after its most recent occurrence; for single tokens, the position after
    their only occurrence, or -1 once they occurred twice.

    Why single tokens only when unambiguous: on SmolLM2-135M outputs a draft found by one token whose earlier
    occurrence is unique started right 65 % of the time on input-grounded tasks (it is how a copy of the prompt
    begins), one found by a repeated token 8-25 % of the time, less than a verification costs (docs/lookup.md).
    """

    __slots__ = ("hist", "index", "max_ngram")

    def __init__(self, prompt: list[int], max_ngram: int = MAX_NGRAM) -> None:
        self.hist: list[int] = []
        self.index: dict[Any, int] = {}
        self.max_ngram = max_ngram
        for tok in prompt:
            self.push(tok)

    def push(self, tok: int) -> None:
        """Append ``tok``; the n-grams ending just before it now have a continuation (it)."""
        hist = self.hist
        n_hist = len(hist)
        hist.append(tok)
        if n_hist:
            index = self.index
            prev = hist[n_hist - 1]  # 1-grams keyed by the int, longer ones by tuples: no collisions
            index[prev] = -1 if prev in index else n_hist
            for n in range(2, min(self.max_ngram, n_hist) + 1):
                index[tuple(hist[n_hist - n:n_hist])] = n_hist

    def draft(self, limit: int, min_ngram: int = 1) -> list[int]:
        """Up to ``limit`` tokens that followed the most recent earlier occurrence of the longest matching suffix
        (``max_ngram`` tokens down to ``min_ngram``, a single token only if it occurred once before); empty when
        nothing matches."""
        hist = self.hist
        n_hist = len(hist)
        index = self.index
        for n in range(min(self.max_ngram, n_hist), min_ngram - 1, -1):
            j = index.get(hist[-1] if n == 1 else tuple(hist[n_hist - n:]))
            if j is not None:
                return hist[j:j + limit] if j >= 0 else []
        return []


class LookupAdvance:
    """A drop-in for a cache's ``advance(tok, pos) -> (logits, logprobs)`` that verifies drafts.

    ``cache`` provides ``advance`` (one token), ``verify(m, pos)`` (the ``m`` tokens in ``cache.draft_ids[0, :m]``
    at slots ``pos..pos+m-1``; returns logits ``[m, vocab]`` and the last row's log-probabilities or None, views
    valid until the next call), ``single()`` (back to one-token calls after a verification) and
    ``rollback(pos)`` (only slots ``< pos`` are valid). ``last_slot``: the highest slot a fed token may take
    (from max_new_tokens and the context), so drafts never run past either. ``clock``: seconds (default
    :data:`CLOCK`), read around every model call to price verifications in one-token steps; ``measured=False``
    reads no clock and charges the fixed costs (a graph whose multi-token calls may pick other tokens than
    one-token steps: answers must not depend on timing).
    """

    def __init__(self, cache: Any, prompt: list[int], last_slot: int, *, max_ngram: int = MAX_NGRAM,
                 k_start: int = K_START, k_min: int = K_MIN, k_max: int = K_MAX, max_pause: int = MAX_PAUSE,
                 clock: Callable[[], float] | None = None, measured: bool = True) -> None:
        self.cache = cache
        self.prompt, self.max_ngram = prompt, max_ngram
        self.ngrams: NgramIndex | None = None  # built at the first step, so the time to first token is unchanged
        self.last_slot = last_slot
        self.k_max = min(k_max, cache.draft_ids.shape[1] - 1)
        self.k_min = min(k_min, self.k_max)
        self.k = max(self.k_min, min(k_start, self.k_max))
        self.max_pause = max_pause
        # Timing decides WHEN drafts are verified, which changes which tokens share a call. Where a call's rows are
        # not bit-equal to one-token steps' (int8 activations rounded per call), that can change a near-tie's
        # token, so the caller turns measuring off there (``measured=False``): the same prompt then always gives
        # the same answer, at the fixed charge's speed.
        clock = (CLOCK if clock is None else clock) if measured else _unmeasured
        self.clock = clock
        self.costs = _costs(cache, clock)  # what this cache's calls cost (measured; shared with later generations)
        self.min_ngram = self._min_ngram()
        self.rows: Any = None         # logits rows of the last verification
        self.last_lp: Any = None      # log-probabilities of its last row (None: the sampler computes them)
        self.drafts: list[int] = []   # the drafts of the last verification
        self.used = 0                 # how many of them the decode loop has accepted so far
        self.dirty = False            # the cache holds slots of rejected drafts / is bound for multi-token calls
        self.score = 0.0              # running average of tokens yielded minus cost charged per verification
        self.misses = 0               # consecutive verifications while that average was negative
        self.pause = 0                # tokens left before drafting resumes
        self.verify_s = 0.0           # how long the last verification took (seconds)
        # Reported on the Generation: draft tokens verified, and how many of those the model agreed with.
        self.drafted = 0
        self.accepted = 0

    def __call__(self, tok: int, pos: int) -> tuple:
        """The decode loop's step: ``tok`` (just chosen) is at slot ``pos``; return the next row to sample."""
        ngrams = self.ngrams
        if ngrams is None:
            ngrams = self.ngrams = NgramIndex(self.prompt, self.max_ngram)  # ~1 us per prompt token
        ngrams.push(tok)
        used = self.used
        drafts = self.drafts
        if used < len(drafts) and tok == drafts[used]:  # the loop agreed with the next draft: its row is valid
            used = self.used = used + 1
            self.accepted += 1
            return self.rows[used], (self.last_lp if used == len(drafts) else None)
        cache = self.cache
        clock = self.clock
        if drafts:  # the last verification is done with: undo its rejected slots (part of its cost), then judge it
            self.drafts = []
            t = clock()
            cache.rollback(pos)
            self._adapt(used, len(drafts), self.verify_s + clock() - t)
        room = self.last_slot - pos
        if self.pause or room <= 0:
            if self.pause:
                self.pause -= 1
            return self._single(tok, pos)
        drafts = ngrams.draft(min(self.k, room), self.min_ngram)
        if not drafts:
            return self._single(tok, pos)
        m = len(drafts) + 1
        ids = cache.draft_ids
        ids[0, 0] = tok
        ids[0, 1:m] = drafts
        t = clock()
        self.rows, self.last_lp = cache.verify(m, pos)
        self.verify_s = clock() - t
        self.drafts, self.used, self.dirty = drafts, 0, True
        self.drafted += m - 1
        return self.rows[0], None

    def _single(self, tok: int, pos: int) -> tuple:
        if self.dirty:
            self.cache.single()
            self.dirty = False
        clock = self.clock
        t = clock()
        out = self.cache.advance(tok, pos)
        dt = clock() - t
        costs = self.costs
        n = costs.timed_steps = costs.timed_steps + 1
        costs.step_s += max(STEP_WEIGHT, 1 / n) * (dt - costs.step_s)  # a plain mean of the first 1/STEP_WEIGHT
        return out

    def _min_ngram(self) -> int:
        """The shortest match whose drafts are worth verifying on this graph: max_ngram tokens where the shortest
        draft's verification costs more than SURE_DRAFTS_ABOVE steps, else one."""
        return self.max_ngram if self.costs.cost(self.k_min) > SURE_DRAFTS_ABOVE else 1

    def _adapt(self, used: int, k: int, seconds: float) -> None:
        """After a verification of ``k`` drafts of which ``used`` were accepted, which took ``seconds``: record its
        cost, size the next draft, and pause drafting while verifications cost more than they yield (see
        COST_BASE)."""
        costs = self.costs
        costs.verification(k, seconds)
        lost = costs.cost(k) - used - 1  # in one-token steps: what it cost minus the tokens it yielded
        if used == k:
            self.k = min(self.k_max, 2 * self.k)
        else:
            self.k = max(self.k_min, used + 1)
        self.min_ngram = self._min_ngram()
        self.score += SCORE_WEIGHT * (-lost - self.score)
        if self.score >= 0:
            self.misses = 0
        else:
            self.misses += 1
            # the more a miss lost, the longer until the next try (lost^2: the fewer drafts pay, too)
            self.pause = min(self.max_pause, int((1 << self.misses) * max(1.0, lost) ** 2))
