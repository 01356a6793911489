"""Sampling settings (validated before any work is done) and the token sampler.

The sampler works on one row of next-token logits (a 1-D float32 array of vocabulary size) and applies, in
this order: repetition penalty, temperature, top-k, top-p, min-p, then draws one token. ``temperature == 0``
means greedy: the arg-max of the (penalised) logits, nothing else is computed.

Speed matters here because it runs once per generated token: the candidate set is cut with
``np.argpartition`` (linear time) and only the candidates are sorted, never the whole vocabulary. Without
top-k, top-p is first tried on the best ``_TOP_P_PROBE`` logits; only when those do not hold ``top_p`` of the
probability mass does it fall back to the full vocabulary, so the result is always exact.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from edgelm.errors import InvalidArgumentError

# How many best logits top-p looks at before falling back to a full sort (exactness is kept either way).
_TOP_P_PROBE = 64

# Fallbacks when generation_config.json does not name a value. top_k 0 and top_p 1.0 mean "off".
BUILTIN_DEFAULTS: dict[str, Any] = {
    "temperature": 1.0,
    "top_k": 0,
    "top_p": 1.0,
    "min_p": 0.0,
    "repetition_penalty": 1.0,
    "max_new_tokens": 128,
}


@dataclass(frozen=True)
class SamplingSettings:
    """Validated sampling settings. Build with :func:`resolve_settings`, not directly."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _number(name: str, value: Any) -> float:
    # bool is an int subclass; `temperature=True` is a bug in the caller, not 1.0.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidArgumentError(f"{name} must be a number, got {type(value).__name__} {value!r}.",
                                   hint=f"Pass {name} as an int or float.")
    value = float(value)
    if not math.isfinite(value):
        raise InvalidArgumentError(f"{name} must be finite, got {value!r}.", hint=f"Pass a finite {name}.")
    return value


def _integer(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidArgumentError(f"{name} must be an integer, got {type(value).__name__} {value!r}.",
                                   hint=f"Pass {name} as an int.")
    return int(value)


def resolve_settings(defaults: Mapping[str, Any] | None = None, *, temperature: Any = None, top_k: Any = None,
                     top_p: Any = None, min_p: Any = None, repetition_penalty: Any = None,
                     seed: Any = None) -> SamplingSettings:
    """Fill ``None`` arguments from ``defaults`` (a generation_config.json dict), then validate every value.

    Raises :class:`~edgelm.errors.InvalidArgumentError` for a negative temperature, ``top_k < 0``, ``top_p``
    outside (0, 1], ``min_p`` outside [0, 1), ``repetition_penalty <= 0`` or a non-integer seed.
    A generation_config with ``do_sample: false`` and no temperature means greedy by default.
    """
    d = dict(defaults or {})

    def pick(name: str, given: Any) -> Any:
        if given is not None:
            return given
        value = d.get(name)
        if name == "temperature" and value is None and d.get("do_sample") is False:
            return 0.0
        return BUILTIN_DEFAULTS[name] if value is None else value

    t = _number("temperature", pick("temperature", temperature))
    if t < 0:
        raise InvalidArgumentError(f"temperature must be >= 0, got {t}.",
                                   hint="Use 0 for greedy decoding or a positive value (e.g. 0.8) to sample.")
    k = _integer("top_k", pick("top_k", top_k))
    if k < 0:
        raise InvalidArgumentError(f"top_k must be >= 0, got {k}.", hint="Use 0 to disable top-k.")
    p = _number("top_p", pick("top_p", top_p))
    if not 0.0 < p <= 1.0:
        raise InvalidArgumentError(f"top_p must be in (0, 1], got {p}.", hint="Use 1.0 to disable top-p.")
    mp = _number("min_p", pick("min_p", min_p))
    if not 0.0 <= mp < 1.0:
        raise InvalidArgumentError(f"min_p must be in [0, 1), got {mp}.", hint="Use 0 to disable min-p.")
    rp = _number("repetition_penalty", pick("repetition_penalty", repetition_penalty))
    if rp <= 0:
        raise InvalidArgumentError(f"repetition_penalty must be > 0, got {rp}.",
                                   hint="Use 1.0 for no penalty, values above 1 to discourage repeats.")
    if seed is not None:
        seed = _integer("seed", seed)
        if seed < 0:
            raise InvalidArgumentError(f"seed must be >= 0, got {seed}.", hint="Pass a non-negative integer seed.")
    return SamplingSettings(temperature=t, top_k=k, top_p=p, min_p=mp, repetition_penalty=rp, seed=seed)


def validate_max_new_tokens(value: Any) -> int:
    n = _integer("max_new_tokens", value)
    if n < 1:
        raise InvalidArgumentError(f"max_new_tokens must be >= 1, got {n}.", hint="Ask for at least one token.")
    return n


def log_softmax_at(logits: np.ndarray, index: int) -> float:
    """log p(index) under softmax(logits), computed stably (one pass over the vocabulary)."""
    m = float(logits.max())
    return float(logits[index]) - m - math.log(float(np.exp(logits - m).sum()))


class Sampler:
    """Draws next tokens for one generation. Holds the RNG and the set of tokens seen (for the penalty).

    ``Sampler(settings, vocab_size, seen=prompt_ids)`` then ``sampler(logits) -> token id`` per step, and
    ``sampler.observe(token)`` after each chosen token so the repetition penalty knows about it.
    """

    def __init__(self, settings: SamplingSettings, vocab_size: int, seen: Any = ()) -> None:
        self.settings = settings
        self.vocab_size = vocab_size
        self._rng: Any = None  # made on the first draw: greedy decoding never imports numpy.random (6 MB)
        self._penalise = settings.repetition_penalty != 1.0
        self._seen_mask = np.zeros(vocab_size, dtype=bool)
        self._seen_ids = np.zeros(0, dtype=np.int64)
        self._buf: np.ndarray | None = None  # scratch for the per-token log-sum-exp (_log_sum_exp)
        self._ones: np.ndarray | None = None
        if self._penalise:
            ids = np.asarray(list(seen), dtype=np.int64)
            ids = ids[(ids >= 0) & (ids < vocab_size)]
            self._seen_mask[ids] = True
            self._seen_ids = np.flatnonzero(self._seen_mask)

    @property
    def rng(self) -> Any:
        """The generator behind the draws, seeded with ``settings.seed`` (created on first use)."""
        if self._rng is None:
            self._rng = np.random.default_rng(self.settings.seed)
        return self._rng

    def observe(self, token: int) -> None:
        """Record a generated token (only needed for the repetition penalty)."""
        if self._penalise and 0 <= token < self.vocab_size and not self._seen_mask[token]:
            self._seen_mask[token] = True
            self._seen_ids = np.flatnonzero(self._seen_mask)

    def penalised(self, logits: np.ndarray) -> np.ndarray:
        """The logits after the repetition penalty (a copy; the input is left untouched)."""
        if not self._penalise or self._seen_ids.size == 0:
            return logits
        out = logits.copy()
        vals = out[self._seen_ids]
        rp = self.settings.repetition_penalty
        # CTRL-style penalty, as in Hugging Face: shrink positive logits, push negative ones further down.
        out[self._seen_ids] = np.where(vals > 0, vals / rp, vals * rp)
        return out

    def step(self, logits: np.ndarray, logprobs: np.ndarray | None = None) -> tuple[int, float]:
        """The next token and its log-probability under the unmodified ``logits`` (what the decode loop calls).

        ``logprobs``, when the graph provides them (log-softmax of the same row), give the log-probability by
        lookup. Otherwise it is computed here; greedy without a penalty then reuses the arg-max as the max of the
        log-softmax, and the log-sum-exp runs in a buffer kept for the whole generation with a BLAS dot product
        as the sum (a temporary array per call and numpy's pairwise float32 sum were most of its time).
        """
        if self.settings.greedy and not self._penalise:
            tok = int(logits.argmax())
            if logprobs is not None:
                return tok, float(logprobs[tok])
            return tok, -self._log_sum_exp(logits, float(logits[tok]))
        tok = self(logits)
        if logprobs is not None:
            return tok, float(logprobs[tok])
        m = float(logits.max())
        return tok, float(logits[tok]) - m - self._log_sum_exp(logits, m)

    def _log_sum_exp(self, logits: np.ndarray, shift: float) -> float:
        """log(sum(exp(logits - shift))), ``shift`` the maximum of ``logits`` (so no term overflows)."""
        if self._buf is None or self._buf.shape != logits.shape:
            self._buf = np.empty(logits.shape, dtype=np.float32)
            self._ones = np.ones(logits.shape, dtype=np.float32)
        buf = self._buf
        np.subtract(logits, shift, out=buf, casting="unsafe")
        np.exp(buf, out=buf)
        return math.log(float(np.dot(buf, self._ones)))

    def __call__(self, logits: np.ndarray) -> int:
        logits = self.penalised(logits)
        if self.settings.greedy:
            return int(logits.argmax())
        ids, cum, n = self._prefix(logits)
        # Inverse-CDF draw over the first n candidates (cum is their running, unnormalised weight).
        j = int(np.searchsorted(cum, self.rng.random() * cum[n - 1], side="right"))
        return int(ids[min(j, n - 1)])

    def candidates(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Token ids allowed by top-k/top-p/min-p and their renormalised probabilities.

        ``logits`` must already be penalised. Used by tests to compare with a plain full-sort reference; the
        sampler itself stays on :meth:`_prefix`, which does the same work in fewer numpy calls.
        """
        ids, cum, n = self._prefix(logits)
        weights = np.diff(cum[:n], prepend=0.0)
        keep = weights > 0
        return ids[:n][keep], weights[keep] / cum[n - 1]

    def _prefix(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """(candidate ids, cumulative weights, n): the allowed tokens are ``ids[:n]``.

        Candidates are sorted best first whenever top-p or min-p needs an order; each filter then keeps a prefix.
        """
        s = self.settings
        v = logits.shape[-1]
        # Below 1e-6 a temperature is greedy in all but name; clamping keeps exp() finite in float32.
        inv_t = 1.0 / max(s.temperature, 1e-6)
        k = s.top_k if 0 < s.top_k < v else v
        if k == v and s.top_p >= 1.0:
            # No truncation by rank: weight the whole vocabulary, no sort needed.
            ids = _arange(v)
            weights = np.exp((logits - logits.max()) * inv_t)
            if s.min_p > 0.0:  # the best token has weight 1, so min_p is an absolute threshold here
                weights[weights < s.min_p] = 0.0
            cum = np.cumsum(weights, dtype=np.float64)
            return ids, cum, v
        probe = k if k < v else min(v, _TOP_P_PROBE)
        ids = np.argpartition(logits, v - probe)[v - probe:] if probe < v else _arange(v)
        vals = logits[ids]
        order = np.argsort(-vals, kind="stable")
        ids, vals = ids[order], vals[order]
        cum = np.cumsum(np.exp((vals - vals[0]) * inv_t), dtype=np.float64)
        n = len(ids)
        if s.top_p < 1.0:
            # Normaliser: the kept top-k mass, or (without top-k) the whole vocabulary, so a probe of the best
            # logits gives true probabilities.
            total = cum[-1] if k < v else float(np.exp((logits - vals[0]) * inv_t).sum(dtype=np.float64))
            if cum[-1] < s.top_p * total and probe < v:
                # The probe did not hold top_p of the mass: redo it on the whole vocabulary.
                ids = np.argsort(-logits, kind="stable")
                cum = np.cumsum(np.exp((logits[ids] - vals[0]) * inv_t), dtype=np.float64)
            # The smallest prefix whose mass reaches top_p (at least one token).
            n = min(len(ids), int(np.searchsorted(cum, s.top_p * total * (1 - 1e-9), side="left")) + 1)
        if s.min_p > 0.0:
            # Sorted best first with the best weight 1: the kept tokens are the prefix with weight >= min_p.
            weights = np.diff(cum[:n], prepend=0.0)
            n = max(1, int(np.count_nonzero(weights >= s.min_p)))
        return ids, cum, n


_ARANGE: dict[int, np.ndarray] = {}


def _arange(v: int) -> np.ndarray:
    a = _ARANGE.get(v)
    if a is None:
        a = _ARANGE[v] = np.arange(v)
    return a
