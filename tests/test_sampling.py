"""The sampler and its settings, against a plain full-sort reference (no model needed)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from edgelm.errors import InvalidArgumentError
from edgelm.sampling import Sampler, log_softmax_at, resolve_settings, validate_max_new_tokens


def reference_candidates(logits, temperature, top_k, top_p, min_p):
    """The textbook definition, on the whole sorted vocabulary: {token: probability} after each filter."""
    order = sorted(range(len(logits)), key=lambda i: -float(logits[i]))
    m = float(max(logits))
    probs = {i: math.exp((float(logits[i]) - m) / temperature) for i in order}
    if top_k:
        order = order[:top_k]
    total = sum(probs[i] for i in order)
    probs = {i: probs[i] / total for i in order}
    if top_p < 1.0:
        kept, mass = [], 0.0
        for i in order:
            kept.append(i)
            mass += probs[i]
            if mass >= top_p * (1 - 1e-9):
                break
        order = kept
    if min_p > 0.0:
        best = probs[order[0]]
        order = [i for i in order if probs[i] >= min_p * best]
    total = sum(probs[i] for i in order)
    return {i: probs[i] / total for i in order}


@pytest.mark.parametrize("kwargs", [
    dict(temperature=-0.1), dict(temperature=float("nan")), dict(temperature="hot"), dict(temperature=True),
    dict(top_k=-1), dict(top_k=2.5), dict(top_p=0.0), dict(top_p=1.01), dict(top_p=-0.5),
    dict(min_p=1.0), dict(min_p=-0.01), dict(repetition_penalty=0.0), dict(repetition_penalty=-1.0),
    dict(seed=-3), dict(seed=1.5), dict(seed="x"),
])
def test_invalid_settings_raise(kwargs):
    with pytest.raises(InvalidArgumentError) as info:
        resolve_settings({}, **kwargs)
    assert list(kwargs)[0] in str(info.value)


@pytest.mark.parametrize("bad", [0, -5, 1.0, "10", None, True])
def test_invalid_max_new_tokens(bad):
    with pytest.raises(InvalidArgumentError, match="max_new_tokens"):
        validate_max_new_tokens(bad)


def test_defaults_come_from_generation_config_and_arguments_win():
    gen = {"temperature": 0.7, "top_k": 40, "top_p": 0.9, "repetition_penalty": 1.1}
    s = resolve_settings(gen)
    assert (s.temperature, s.top_k, s.top_p, s.min_p, s.repetition_penalty) == (0.7, 40, 0.9, 0.0, 1.1)
    s = resolve_settings(gen, temperature=0, top_k=0)
    assert s.greedy and s.top_k == 0 and s.top_p == 0.9
    assert resolve_settings({"do_sample": False}).greedy
    assert not resolve_settings({}).greedy


def test_greedy_is_argmax_and_ignores_the_rng():
    rng = np.random.default_rng(0)
    for _ in range(20):
        logits = rng.normal(size=300).astype(np.float32)
        s = Sampler(resolve_settings({}, temperature=0, seed=None), 300)
        assert s(logits) == int(np.argmax(logits))


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), vocab=st.integers(2, 400), temperature=st.floats(0.05, 3.0),
       top_k=st.integers(0, 80), top_p=st.floats(0.05, 1.0), min_p=st.floats(0.0, 0.5),
       scale=st.floats(0.1, 8.0))
def test_candidates_match_full_sort_reference(seed, vocab, temperature, top_k, top_p, min_p, scale):
    logits = (np.random.default_rng(seed).normal(size=vocab) * scale).astype(np.float32)
    s = Sampler(resolve_settings({}, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p), vocab)
    ids, probs = s.candidates(logits)
    ref = reference_candidates(logits, temperature, top_k, top_p, min_p)
    # The sampler draws by inverse CDF over a float64 cumulative sum, so a token with less than ~1e-16 of the
    # mass adds nothing to the sum and can never be drawn: compare the sets above a margin of that.
    tiny = 1e-12
    ref = {i: p for i, p in ref.items() if p >= tiny}
    ids, probs = ids[probs >= tiny], probs[probs >= tiny]
    assert sorted(int(i) for i in ids) == sorted(ref)
    for i, p in zip(ids, probs):
        assert p == pytest.approx(ref[int(i)], rel=1e-4, abs=1e-7)
    # and every draw comes from that set
    drawn = {s(logits) for _ in range(20)}
    assert drawn <= set(ref)


def test_draws_follow_the_probabilities():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05, 1e-9], dtype=np.float32))
    s = Sampler(resolve_settings({}, temperature=1.0, seed=123), 5)
    counts = np.bincount([s(logits) for _ in range(20000)], minlength=5) / 20000
    np.testing.assert_allclose(counts[:4], [0.5, 0.3, 0.15, 0.05], atol=0.015)


def test_top_p_probe_falls_back_to_full_vocabulary():
    # A flat distribution: the best 64 logits hold far less than top_p of the mass, so the probe must widen.
    vocab = 1000
    logits = np.random.default_rng(1).normal(size=vocab).astype(np.float32) * 0.01
    s = Sampler(resolve_settings({}, temperature=1.0, top_p=0.9), vocab)
    ids, _ = s.candidates(logits)
    assert len(ids) == len(reference_candidates(logits, 1.0, 0, 0.9, 0.0)) > 64


def test_seeded_sampling_is_reproducible_and_seeds_differ():
    logits = np.zeros(256, dtype=np.float32)
    a = Sampler(resolve_settings({}, temperature=1.0, seed=7), 256)
    b = Sampler(resolve_settings({}, temperature=1.0, seed=7), 256)
    c = Sampler(resolve_settings({}, temperature=1.0, seed=8), 256)
    seq_a = [a(logits) for _ in range(50)]
    assert seq_a == [b(logits) for _ in range(50)]
    assert seq_a != [c(logits) for _ in range(50)]


def test_repetition_penalty_follows_the_ctrl_rule():
    logits = np.array([2.0, -1.0, 0.5, 3.0], dtype=np.float32)
    s = Sampler(resolve_settings({}, temperature=0, repetition_penalty=2.0), 4, seen=[0, 1])
    out = s.penalised(logits)
    np.testing.assert_allclose(out, [1.0, -2.0, 0.5, 3.0])
    assert logits[0] == 2.0  # the input is not modified
    s.observe(3)
    assert s(logits) == 3  # penalised: 3.0 / 2 = 1.5 is still above token 0's 2.0 / 2 = 1.0
    assert s.penalised(logits)[3] == pytest.approx(1.5)
    # greedy with a strong penalty avoids a token it has seen
    s = Sampler(resolve_settings({}, temperature=0, repetition_penalty=10.0), 4, seen=[3])
    assert s(logits) == 0


def test_log_softmax_at_matches_direct_formula():
    logits = np.random.default_rng(5).normal(size=50).astype(np.float32) * 5
    direct = np.log(np.exp(logits.astype(np.float64)) / np.exp(logits.astype(np.float64)).sum())
    for i in (0, 7, 49):
        assert log_softmax_at(logits, i) == pytest.approx(direct[i], abs=1e-5)


@pytest.mark.parametrize("temperature", [1e-300, 1e-8, 1e-3])
def test_tiny_temperature_is_finite_and_picks_the_best(temperature):
    import warnings

    logits = np.random.default_rng(2).normal(size=512).astype(np.float32) * 10
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow / invalid-value warnings
        for kw in (dict(), dict(top_p=0.9), dict(top_k=5)):
            s = Sampler(resolve_settings({}, temperature=temperature, seed=0, **kw), 512)
            assert s(logits) == int(np.argmax(logits))


@pytest.mark.parametrize("kw", [dict(temperature=0), dict(temperature=0, repetition_penalty=1.5),
                                dict(temperature=0.7, top_k=5, seed=1)])
def test_step_returns_the_token_and_its_unmodified_logprob(kw):
    logits = np.random.default_rng(9).normal(size=128).astype(np.float32) * 4
    a = Sampler(resolve_settings({}, **kw), 128, seen=[int(np.argmax(logits))])
    b = Sampler(resolve_settings({}, **kw), 128, seen=[int(np.argmax(logits))])
    tok, lp = a.step(logits)
    assert tok == b(logits)
    assert lp == pytest.approx(log_softmax_at(logits, tok), abs=1e-5)
