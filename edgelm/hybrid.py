"""Router + Hybrid: answer on the device when the small model can, hand the rest to a large model, and never
lose an answer.

    >>> import edgelm
    >>> cloud = edgelm.CloudClient("https://api.example.com/v1", model="big-model")   # key from the environment
    >>> hy = edgelm.Hybrid(edgelm.load(), cloud)       # the default policy: see below
    >>> r = hy.generate("What is the capital of France?")
    >>> r.text, r.source, r.reason             # where the answer came from, and why

The router combines cheap signals, checked in a fixed order (the first that decides wins):

1. no cloud configured, or ``allow_cloud=False`` (privacy mode)        -> local, and no connection is opened
2. the per-call override ``prefer="local" | "cloud"``
3. the prompt plus ``max_new_tokens`` does not fit the local context   -> cloud
4. the app's rules (regex / keywords / task tags), in order
5. the length rule: prompt longer than ``max_prompt_tokens``           -> cloud
6. the prompt's score under the local model (``max_prompt_nats``)      -> cloud when the prompt looks unfamiliar
7. the cascade (``min_confidence``): generate locally, escalate when the answer's confidence (``uncertainty``
   metric) is below the threshold; if the cloud then fails, the local answer already made is returned
8. otherwise the default side (local)

**The default policy** (``Router()``, nothing set): the prompt score and the cascade take thresholds relative to
what the model folder knows about itself, its held-out nats/token from the export (:func:`reference_nats_per_token`):
a prompt of at least ``MIN_SCORED_TOKENS`` scored tokens whose nats/token exceed ``AUTO_PROMPT_FACTOR`` times the
model's goes to the cloud (text unlike anything the model was trained on), and a local answer whose mean token
log-probability is below ``-AUTO_CONFIDENCE_FACTOR`` times it is escalated (``generate`` / ``chat`` only: a stream
would have to hold its answer back until the end to be judged, so streams skip it unless ``min_confidence`` is set).
A folder without metrics leaves both off; then a :class:`Hybrid` with a cloud warns once that only prompts too
long for the local model would reach it.

A cloud decision is then checked against the budget (calls / tokens per period); past it, everything stays
local. Every outgoing message goes through the ``redact`` hook first; the local model sees the original text.

Chats may carry tools: ``tools`` go into the local model's chat template and, as given, into the cloud request;
``documents`` likewise (the cloud gets them as the ``documents`` field that vLLM and ``edgelm serve`` read);
``chat_template_kwargs`` only shape the local prompt. A cloud answer's tool calls are on
``HybridResult.tool_calls``; the local model's tool call is the text of its answer (nothing parses it).
"""
from __future__ import annotations

import logging
import math
import re
import threading
import time
import warnings
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Literal, Sequence

from edgelm.errors import CloudError, ContextLengthError, EdgeLMError, InvalidArgumentError, RoutingError

if TYPE_CHECKING:  # pragma: no cover
    from edgelm.cloud import CloudClient, CloudReply
    from edgelm.model import Generation, Model

log = logging.getLogger("edgelm.hybrid")

Side = Literal["local", "cloud"]
_SIDES = ("local", "cloud")
# Sampling options the OpenAI API understands; the others (top_k, min_p, ...) only steer the local model.
_CLOUD_OPTIONS = {"temperature": "temperature", "top_p": "top_p", "stop": "stop", "seed": "seed",
                  "max_new_tokens": "max_tokens"}

# The default policy's thresholds, as multiples of the model's held-out nats/token (docs/hybrid.md has the
# measurements behind them). Prompts open without context, so even in-domain openings score above held-out text
# (the story model: median 1.1x, 95th percentile 1.8x on story openings; factual questions 1.8x-4.1x): 2x is
# "twice as surprising per token as the text the model was trained on".
AUTO_PROMPT_FACTOR = 2.0
# Greedy answers score far above held-out text and sampled ones near it (T = 1: story answers down to -1.2x), so
# 1.5x flags only answers much less likely than anything the model writes in its domain: a safety net.
AUTO_CONFIDENCE_FACTOR = 1.5
# A per-token mean over one or two tokens is mostly the first token's surprise (a story model gives "Mom" 6.6
# nats after BOS): shorter prompts are not judged by the prompt score.
MIN_SCORED_TOKENS = 4


def reference_nats_per_token(model: Any) -> float | None:
    """The model's held-out nats/token, as measured by the exporter: the manifest's ``metrics.nats_per_token``,
    or for folders written before that field, ``bits_per_byte * eval_bytes * ln 2 / eval_tokens`` of the shipped
    weights (quantized when there are quantized metrics, else fp32). None when the manifest has neither."""
    manifest = getattr(getattr(model, "folder", None), "manifest", None)
    m = manifest.get("metrics") if isinstance(manifest, dict) else None
    if not isinstance(m, dict):
        return None

    def num(key: str) -> float | None:
        v = m.get(key)
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
        return float(v) if ok else None

    if num("nats_per_token") is not None:
        return num("nats_per_token")
    bpb = num("quantized_bits_per_byte") or num("fp32_bits_per_byte")
    nbytes, tokens = num("eval_bytes"), num("eval_tokens")
    if bpb is None or nbytes is None or tokens is None:
        return None
    return bpb * nbytes * math.log(2) / tokens


def _pair(a: float, b: float) -> tuple[str, str]:
    """``a`` and ``b`` printed with the fewest decimals (2 to 6) that tell them apart, so a comparison never reads
    like a tie it is not (``-0.9291 < -0.9289``, not ``-0.929 < -0.929``)."""
    for d in range(2, 7):
        sa, sb = f"{a:.{d}f}", f"{b:.{d}f}"
        if sa != sb:
            return sa, sb
    return f"{a:.6g}", f"{b:.6g}"


def _cmp(a: float, op: str, b: float) -> str:
    sa, sb = _pair(a, b)
    return f"{sa} {op} {sb}"


# --- building blocks ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    """Send matching queries to one side. A rule matches when any of its conditions holds:
    ``pattern`` (a regex searched case-insensitively in the prompt / last user message), any of ``keywords``
    (case-insensitive substrings), or any of ``tags`` among the call's ``tags=[...]``."""

    route: Side
    pattern: str | None = None
    keywords: Sequence[str] = ()
    tags: Sequence[str] = ()
    name: str | None = None

    def __post_init__(self) -> None:
        if self.route not in _SIDES:
            raise InvalidArgumentError(f"Rule route must be 'local' or 'cloud', got {self.route!r}.")
        if self.pattern is None and not self.keywords and not self.tags:
            raise InvalidArgumentError("A Rule needs a pattern, keywords or tags.",
                                       hint="e.g. Rule('cloud', keywords=['translate']).")
        if isinstance(self.keywords, str) or isinstance(self.tags, str):
            raise InvalidArgumentError("Rule keywords and tags must be lists of strings, not one string.")
        if self.pattern is not None:
            try:
                object.__setattr__(self, "_regex", re.compile(self.pattern, re.IGNORECASE))
            except re.error as exc:
                raise InvalidArgumentError(f"Rule pattern {self.pattern!r} is not a valid regex ({exc}).") from None
        object.__setattr__(self, "keywords", tuple(k.lower() for k in self.keywords))
        object.__setattr__(self, "tags", tuple(self.tags))

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if self.pattern is not None:
            return f"pattern {self.pattern!r}"
        if self.keywords:
            return f"keywords {list(self.keywords)}"
        return f"tags {list(self.tags)}"

    def matches(self, text: str, tags: Sequence[str]) -> bool:
        if self.pattern is not None and self._regex.search(text):  # type: ignore[attr-defined]
            return True
        low = text.lower()
        if any(k in low for k in self.keywords):
            return True
        return any(t in self.tags for t in tags)


class Budget:
    """At most ``max_calls`` cloud calls and/or ``max_tokens`` cloud tokens (prompt + completion) in any
    sliding window of ``period_s`` seconds. A call is counted when it is attempted (it may cost money even if
    it fails); its tokens are counted when the answer arrives. Thread-safe."""

    def __init__(self, max_calls: int | None = None, max_tokens: int | None = None, period_s: float = 3600.0):
        for name, v in (("max_calls", max_calls), ("max_tokens", max_tokens)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise InvalidArgumentError(f"Budget {name} must be an integer >= 0 or None, got {v!r}.")
        if not isinstance(period_s, (int, float)) or not period_s > 0:
            raise InvalidArgumentError(f"Budget period_s must be > 0 seconds, got {period_s!r}.")
        self.max_calls, self.max_tokens, self.period_s = max_calls, max_tokens, float(period_s)
        self._calls: deque[float] = deque()
        self._tokens: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()
        self._clock = time.monotonic

    def _prune(self, now: float) -> None:
        while self._calls and now - self._calls[0] >= self.period_s:
            self._calls.popleft()
        while self._tokens and now - self._tokens[0][0] >= self.period_s:
            self._tokens.popleft()

    def used(self) -> tuple[int, int]:
        """(calls, tokens) in the current window."""
        with self._lock:
            self._prune(self._clock())
            return len(self._calls), sum(t for _, t in self._tokens)

    def try_reserve(self) -> str | None:
        """Count one call if the budget allows it; otherwise return why not (and count nothing)."""
        with self._lock:
            now = self._clock()
            self._prune(now)
            if self.max_calls is not None and len(self._calls) >= self.max_calls:
                return f"cloud budget used up ({self.max_calls} calls per {self.period_s:g} s)"
            if self.max_tokens is not None and sum(t for _, t in self._tokens) >= self.max_tokens:
                return f"cloud budget used up ({self.max_tokens} tokens per {self.period_s:g} s)"
            self._calls.append(now)
            return None

    def record_tokens(self, tokens: int) -> None:
        with self._lock:
            self._tokens.append((self._clock(), max(0, int(tokens))))


@dataclass(frozen=True)
class Decision:
    """Which side should answer and why. ``signal`` names the deciding check (``privacy``, ``no-cloud``,
    ``prefer``, ``context``, ``rule``, ``length``, ``prompt-score``, ``uncertainty``, ``default``,
    ``budget``, ``local-failed``); ``value`` / ``threshold`` are the numbers behind a score-based decision.
    ``reason`` is one readable line; a local decision also says which checks the query passed."""

    target: Side
    signal: str
    reason: str
    value: float | None = None
    threshold: float | None = None


@dataclass
class HybridResult:
    """An answer from :class:`Hybrid`. ``source`` is where the text came from (``"mixed"`` only for a cloud
    stream that broke part-way and was finished by the local model); ``reason`` says why that side was chosen,
    ``fallback`` why the planned cloud answer was not used (None when nothing went wrong)."""

    text: str
    source: Literal["local", "cloud", "mixed"]
    reason: str
    signal: str
    value: float | None = None
    threshold: float | None = None
    fallback: str | None = None
    finish_reason: str | None = None
    generation: "Generation | None" = None   # the local Generation, whenever the local model ran
    cloud_reply: "CloudReply | None" = None  # the cloud's answer, when it gave one
    total_time_s: float = 0.0
    cloud_endpoint: str | None = None          # "chat" or "completions": where the cloud was asked, when it was

    def __str__(self) -> str:
        return self.text

    @property
    def mean_logprob(self) -> float | None:
        """The local answer's mean token log-probability (nats), when the local model answered."""
        return self.generation.mean_logprob if self.generation is not None else None

    @property
    def tool_calls(self) -> list[dict[str, Any]] | None:
        """The function calls the cloud model asked for (OpenAI shape), when the cloud answered with some. A local
        model's tool call is not parsed: it is in ``text``, in the format its chat template taught it."""
        return self.cloud_reply.tool_calls if self.source == "cloud" and self.cloud_reply is not None else None

    def describe(self) -> str:
        """One line for a terminal: ``[cloud] uncertainty: mean logprob -3.10 < -2.50``."""
        line = f"[{self.source}] {self.reason}"
        if self.fallback:
            line += f" | fallback: {self.fallback}"
        return line


@dataclass
class CalibrationReport:
    """What :meth:`Router.calibrate` chose and the split it produces on the calibration prompts.

    ``mode`` is ``"share"`` (a target share of unlabelled traffic) or ``"labelled"`` (examples of each side). In
    labelled mode ``auroc`` is the chance that a cloud example's signal points further to the cloud than a local
    example's (1.0: the classes separate completely, 0.5: the signal says nothing), ``margin`` the gap between the
    classes in the signal's units (> 0: a clean gap, whose middle holds the threshold; < 0: how far they overlap),
    and ``local_to_cloud`` / ``cloud_kept_local`` the shares of each class the threshold routes the other way.
    ``note`` says why the share reached differs from the target (ties, other checks), when it does.
    """

    signal: str
    threshold: float
    target_cloud_share: float | None
    cloud_share: float             # share of the calibration prompts that go to the cloud with this threshold
    counts: dict[str, int]         # prompts per deciding signal, e.g. {"uncertainty": 30, "default": 70}
    values: list[float] = field(repr=False, default_factory=list)   # the signal's value for each prompt
    mode: Literal["share", "labelled"] = "share"
    auroc: float | None = None
    margin: float | None = None
    local_to_cloud: float | None = None
    cloud_kept_local: float | None = None
    note: str | None = None

    def __str__(self) -> str:
        split = ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items()))
        if self.mode == "labelled":
            sep = (f"AUROC {self.auroc:.3f}, margin {self.margin:+.4g}" if self.auroc is not None
                   else "one class is decided entirely by other checks")
            head = (f"{self.signal} threshold {self.threshold:.4g} ({sep}): {self.local_to_cloud:.1%} of the local "
                    f"examples go to the cloud, {self.cloud_kept_local:.1%} of the cloud examples stay local")
        else:
            head = (f"{self.signal} threshold {self.threshold:.4g}: {self.cloud_share:.1%} to the cloud "
                    f"(target {self.target_cloud_share:.1%})")
        return f"{head}; decided by: {split}" + (f" ({self.note})" if self.note else "")


_AUTO = "auto"
_UNSET: Any = object()
_ATTR = {"uncertainty": "min_confidence", "prompt-score": "max_prompt_nats", "length": "max_prompt_tokens"}


# --- the router ----------------------------------------------------------------------------------------
class Router:
    """Decides per query whether the local model or the cloud answers (see the module docstring for the
    order of checks and the default policy).

    Args:
        rules: :class:`Rule` list, first match wins.
        max_prompt_tokens: the length rule: prompts with more tokens go to the cloud.
        max_prompt_nats: the prompt score: a prompt of at least ``MIN_SCORED_TOKENS`` scored tokens whose mean
            negative log-likelihood under the local model (``Model.score(prompt).nats_per_token``; for a chat,
            the last user message's) is above this goes to the cloud. ``"auto"`` (default): ``AUTO_PROMPT_FACTOR`` x the model's held-out nats/token
            (:func:`reference_nats_per_token`); None: off.
        min_confidence: the cascade: a local answer whose ``uncertainty`` metric is below this is escalated.
            ``"auto"`` (default): ``-AUTO_CONFIDENCE_FACTOR`` x the model's held-out nats/token, for the
            ``"mean_logprob"`` metric in ``generate`` / ``chat`` only; None: off.
        uncertainty: the cascade metric: ``"mean_logprob"`` (mean token log-probability of the local answer),
            ``"min_logprob"`` (its least likely token) or a function ``Generation -> float`` (higher = surer).
        allow_cloud: False is privacy mode: nothing is ever sent (no connection is even opened).
        redact: ``str -> str`` applied to every outgoing message's content (and prompt).
        budget: a :class:`Budget`; past it everything stays local.
        default: the side for queries no check decides (normally "local").
        min_mean_logprob: the former name of ``min_confidence`` (it holds the threshold of whichever metric
            ``uncertainty`` names); still accepted.
    """

    def __init__(self, *, rules: Sequence[Rule] = (), max_prompt_tokens: int | None = None,
                 max_prompt_nats: float | Literal["auto"] | None = _AUTO,
                 min_confidence: float | Literal["auto"] | None = _AUTO,
                 uncertainty: str | Callable[["Generation"], float] = "mean_logprob", allow_cloud: bool = True,
                 redact: Callable[[str], str] | None = None, budget: Budget | None = None, default: Side = "local",
                 min_mean_logprob: float | None = _UNSET):
        if min_mean_logprob is not _UNSET:
            if min_confidence != _AUTO:
                raise InvalidArgumentError("Pass min_confidence or its former name min_mean_logprob, not both.")
            min_confidence = min_mean_logprob
        if not all(isinstance(r, Rule) for r in rules):
            raise InvalidArgumentError("rules must be a list of edgelm.hybrid.Rule.")
        if max_prompt_tokens is not None and (not isinstance(max_prompt_tokens, int) or max_prompt_tokens < 0):
            raise InvalidArgumentError(f"max_prompt_tokens must be an integer >= 0, got {max_prompt_tokens!r}.")
        for name, v in (("max_prompt_nats", max_prompt_nats), ("min_confidence", min_confidence)):
            if v is not None and v != _AUTO and (not isinstance(v, (int, float)) or isinstance(v, bool)
                                                 or math.isnan(v)):
                raise InvalidArgumentError(f"{name} must be a number, 'auto' or None, got {v!r}.")
        if not callable(uncertainty) and uncertainty not in _METRICS:
            raise InvalidArgumentError(f"uncertainty must be one of {sorted(_METRICS)} or a function, "
                                       f"got {uncertainty!r}.")
        if not isinstance(allow_cloud, bool):
            raise InvalidArgumentError(f"allow_cloud must be True or False, got {allow_cloud!r}.")
        if redact is not None and not callable(redact):
            raise InvalidArgumentError("redact must be a function str -> str.")
        if budget is not None and not isinstance(budget, Budget):
            raise InvalidArgumentError("budget must be an edgelm.hybrid.Budget.")
        if default not in _SIDES:
            raise InvalidArgumentError(f"default must be 'local' or 'cloud', got {default!r}.")
        self.rules = list(rules)
        self.max_prompt_tokens = max_prompt_tokens
        self.max_prompt_nats = max_prompt_nats
        self.min_confidence = min_confidence
        self.uncertainty = uncertainty
        self.allow_cloud = allow_cloud
        self.redact = redact
        self.budget = budget
        self.default: Side = default
        self._model: Model | None = None  # set by Hybrid, so calibrate() can be called without model=

    @property
    def min_mean_logprob(self) -> float | str | None:
        """The former name of :attr:`min_confidence`."""
        return self.min_confidence

    @min_mean_logprob.setter
    def min_mean_logprob(self, value: float | str | None) -> None:
        self.min_confidence = value

    def __repr__(self) -> str:
        parts = [f"rules={len(self.rules)}"]
        for name in ("max_prompt_tokens", "max_prompt_nats", "min_confidence"):
            v = getattr(self, name)
            if v is not None:
                parts.append(f"{name}={v!r}" if isinstance(v, str) else f"{name}={v:.4g}")
        if self.uncertainty != "mean_logprob":
            parts.append(f"uncertainty={self.uncertainty if isinstance(self.uncertainty, str) else 'function'}")
        if not self.allow_cloud:
            parts.append("allow_cloud=False")
        return f"Router({', '.join(parts)})"

    # --- thresholds ----------------------------------------------------------------------------------
    def thresholds(self, model: "Model | None" = None) -> tuple[float | None, float | None]:
        """``(max_prompt_nats, min_confidence)`` in effect for ``model``: numbers as set, ``"auto"`` resolved
        against the model's held-out nats/token (None when the folder does not know it), None when off."""
        model = model if model is not None else self._model
        ref = reference_nats_per_token(model) if _AUTO in (self.max_prompt_nats, self.min_confidence) else None
        prompt = self.max_prompt_nats
        if prompt == _AUTO:
            prompt = AUTO_PROMPT_FACTOR * ref if ref is not None else None
        conf = self.min_confidence
        if conf == _AUTO:
            conf = -AUTO_CONFIDENCE_FACTOR * ref if ref is not None and self.uncertainty == "mean_logprob" else None
        return prompt, conf

    def _source(self, name: str, model: "Model | None") -> str:
        """How a threshold was set, for reasons: ``" (2 x the model's held-out 2.29 nats/token)"`` for "auto"."""
        if getattr(self, name) != _AUTO:
            return ""
        ref = reference_nats_per_token(model if model is not None else self._model)
        factor = AUTO_PROMPT_FACTOR if name == "max_prompt_nats" else -AUTO_CONFIDENCE_FACTOR
        return f" ({factor:g} x the model's held-out {ref:.2f} nats/token)"

    def cloud_signals(self, model: "Model | None" = None) -> list[str]:
        """The checks that can send a query to the cloud with ``model`` as the local side, besides the context
        check and ``prefer`` (empty: only prompts too long for the local model would ever go)."""
        if not self.allow_cloud:
            return []
        prompt, conf = self.thresholds(model)
        return [name for name, on in (("default", self.default == "cloud"),
                                      ("rule", any(r.route == "cloud" for r in self.rules)),
                                      ("length", self.max_prompt_tokens is not None),
                                      ("prompt-score", prompt is not None), ("uncertainty", conf is not None)) if on]

    # --- decisions ---------------------------------------------------------------------------------
    def before(self, model: "Model", text: str, *, max_new_tokens: int, prefer: Side | None = None,
               tags: Sequence[str] = (), rule_text: str | None = None, cloud_available: bool = True,
               stream: bool = False) -> Decision | None:
        """Decide from the prompt alone. None means "generate locally, then ask :meth:`after`" (the cascade).
        ``text`` is what the local model would see; rules look at ``rule_text`` when given (for a chat, what
        the user wrote rather than the template around it). ``stream=True`` leaves out the default policy's
        cascade (a stream cannot hold its answer back to judge it)."""
        return self._before(model, text, max_new_tokens=max_new_tokens, prefer=prefer, tags=tags,
                            rule_text=rule_text, cloud_available=cloud_available, stream=stream)[0]

    def _before(self, model: "Model", text: str, *, max_new_tokens: int, prefer: Side | None = None,
                tags: Sequence[str] = (), rule_text: str | None = None, cloud_available: bool = True,
                stream: bool = False) -> tuple[Decision | None, list[str]]:
        """:meth:`before`, plus the checks the query passed (for the reason of a later local decision)."""
        if not cloud_available:
            return Decision("local", "no-cloud", "no cloud endpoint configured"), []
        if not self.allow_cloud:
            return Decision("local", "privacy", "privacy mode (allow_cloud=False): nothing leaves the device"), []
        if prefer is not None:
            return Decision(prefer, "prefer", f"prefer={prefer!r} for this call"), []
        n = len(model.encode(text))
        ctx = int(model.context_length)
        if n + max_new_tokens > ctx:
            return Decision("cloud", "context", f"prompt {n} + max_new_tokens {max_new_tokens} tokens > local context "
                            f"{ctx}", float(n + max_new_tokens), float(ctx)), []
        return self._checks(model, text, text if rule_text is None else rule_text, n, tags, stream)

    def _checks(self, model: "Model", text: str, rule_text: str, n: int, tags: Sequence[str],
                stream: bool) -> tuple[Decision | None, list[str]]:
        for rule in self.rules:
            if rule.matches(rule_text, tags):
                return Decision(rule.route, "rule", f"rule {rule.label}"), []
        if self.max_prompt_tokens is not None and n > self.max_prompt_tokens:
            return Decision("cloud", "length", f"length: prompt {n} tokens > {self.max_prompt_tokens}",
                            float(n), float(self.max_prompt_tokens)), []
        prompt_max, conf_min = self.thresholds(model)
        passed: list[str] = []
        # A chat is scored on what the user wrote (rule_text), not on the chat template around it: the template is
        # the same for every query and says nothing about whether the request is in the model's domain.
        if prompt_max is not None and rule_text.strip():
            s = model.score(rule_text)
            nats, src = s.nats_per_token, self._source("max_prompt_nats", model)
            if s.num_tokens < MIN_SCORED_TOKENS:
                passed.append(f"prompt too short to score ({s.num_tokens} tokens < {MIN_SCORED_TOKENS})")
            elif nats > prompt_max:
                return Decision("cloud", "prompt-score", f"prompt score: {_cmp(nats, '>', prompt_max)} nats/token{src}",
                                nats, prompt_max), passed
            else:
                passed.append(f"prompt score {_cmp(nats, '<=', prompt_max)} nats/token{src}")
        if conf_min is not None:
            if not (stream and self.min_confidence == _AUTO):
                return None, passed
            passed.append("no uncertainty check in a stream")
        reason = f"default route ({self.default})" + (": " + "; ".join(passed) if passed else "")
        return Decision(self.default, "default", reason), passed

    def metric(self, generation: "Generation") -> float:
        """The cascade's confidence in a local answer (higher = surer)."""
        fn = self.uncertainty if callable(self.uncertainty) else _METRICS[self.uncertainty]
        return float(fn(generation))

    def after(self, generation: "Generation", model: "Model | None" = None, *,
              passed: Sequence[str] = ()) -> Decision:
        """The cascade's decision once the local answer exists; ``passed`` (the checks the prompt passed) is
        added to the reason when the answer stays local."""
        conf_min = self.thresholds(model)[1]
        if conf_min is None:
            raise InvalidArgumentError("after() needs a cascade threshold (min_confidence).")
        name = self.uncertainty if isinstance(self.uncertainty, str) else "confidence"
        src = self._source("min_confidence", model)
        extra = "".join(f"; {p}" for p in passed)
        value = self.metric(generation)
        if math.isnan(value):  # nothing generated: nothing to be unsure about, keep it
            return Decision("local", "uncertainty", f"uncertainty: empty local answer kept{extra}")
        if value < conf_min:
            return Decision("cloud", "uncertainty", f"uncertainty: {name} {_cmp(value, '<', conf_min)}{src}",
                            value, conf_min)
        return Decision("local", "uncertainty", f"uncertainty: {name} {_cmp(value, '>=', conf_min)}{src}{extra}",
                        value, conf_min)

    # --- calibration -------------------------------------------------------------------------------
    def calibrate(self, prompts: Sequence[str] | None = None, target_cloud_share: Any = None, *,
                  local_prompts: Sequence[str] | None = None, cloud_prompts: Sequence[str] | None = None,
                  signal: str | None = None, model: "Model | None" = None,
                  **generate_kwargs: Any) -> CalibrationReport:
        """Set one threshold from examples, and report the split it produces (rules and context checks included).
        Runs only on the local model: nothing is sent. Two modes:

        * ``calibrate(prompts, target_cloud_share)``: ``prompts`` is a sample of real traffic; the threshold sends
          ``target_cloud_share`` of it to the cloud (RouteLLM-style). Default signal ``"uncertainty"``.
        * ``calibrate(local_prompts, cloud_prompts)`` (or by keyword): examples of what the local model serves well
          and what it cannot; the threshold goes in the middle of the gap between the two classes, or where the
          fewest examples are misrouted when they overlap, and the report gives the separation (AUROC, margin).
          Default signal ``"prompt-score"``.

        ``signal`` is ``"uncertainty"`` (generates each prompt locally with ``generate_kwargs``; sets
        ``min_confidence``), ``"prompt-score"`` (sets ``max_prompt_nats``) or ``"length"`` (sets
        ``max_prompt_tokens``). Prompts that other checks already decide count as those checks route them.
        With sampling, pass ``seed`` for a reproducible calibration: prompt *i* is generated with ``seed + i``.
        """
        model = model or self._model
        if model is None:
            raise InvalidArgumentError("calibrate needs the local model.",
                                       hint="Pass model=edgelm.load(...), or call it on hybrid.router.")
        labelled = local_prompts is not None or cloud_prompts is not None or not (
            target_cloud_share is None or isinstance(target_cloud_share, (int, float)))
        if labelled:
            if local_prompts is None and cloud_prompts is None:  # the positional form calibrate(local, cloud)
                local_prompts, cloud_prompts = prompts, target_cloud_share
            elif prompts is not None or target_cloud_share is not None:
                raise InvalidArgumentError("Pass either prompts and target_cloud_share, or local_prompts and "
                                           "cloud_prompts.")
            local_prompts, cloud_prompts = _prompt_list(local_prompts, "local_prompts"), _prompt_list(
                cloud_prompts, "cloud_prompts")
            prompts, signal = local_prompts + cloud_prompts, signal or "prompt-score"
        else:
            if isinstance(target_cloud_share, bool) or not isinstance(target_cloud_share, (int, float)) \
                    or not 0.0 <= target_cloud_share <= 1.0:
                raise InvalidArgumentError(f"target_cloud_share must be in [0, 1], got {target_cloud_share!r}.")
            prompts, signal = _prompt_list(prompts, "prompts"), signal or "uncertainty"
        if signal not in _ATTR:
            raise InvalidArgumentError(f"signal must be 'uncertainty', 'prompt-score' or 'length', got {signal!r}.")
        max_new = int(generate_kwargs.get("max_new_tokens") or model.generation_config.get("max_new_tokens") or 128)
        fixed, values = self._measure(model, prompts, signal, max_new, generate_kwargs)

        # Keys point to the cloud: low confidence -> cloud for "uncertainty"; high value -> cloud for the others.
        sign = -1.0 if signal == "uncertainty" else 1.0
        open_idx = [i for i, d in enumerate(fixed) if (d is None or d.signal == "default") and not math.isnan(values[i])]
        note = auroc = margin = None
        if labelled:
            label = [0] * len(local_prompts) + [1] * len(cloud_prompts)
            keys_l = sorted(sign * values[i] for i in open_idx if label[i] == 0)
            keys_c = sorted(sign * values[i] for i in open_idx if label[i] == 1)
            threshold_key, auroc, margin = _labelled_threshold(keys_l, keys_c)
        else:
            already = sum(1 for d in fixed if d is not None and d.target == "cloud" and d.signal != "default")
            want = max(0, round(target_cloud_share * len(prompts)) - already)
            keyed = sorted((sign * values[i] for i in open_idx), reverse=True)
            if want <= 0 or not keyed:
                threshold_key = (keyed[0] if keyed else 0.0) + 1.0   # nothing (more) to the cloud
                if already > round(target_cloud_share * len(prompts)):
                    note = f"other checks already send {already} of the {len(prompts)} prompts"
            elif want >= len(keyed):
                threshold_key = keyed[-1] - 1e-9 if keyed[-1] != 0 else -1e-9
            else:
                # Midway between the last value sent and the first kept. Equal values cannot be split by a
                # threshold: all of them stay local then, and the note says so.
                threshold_key = (keyed[want - 1] + keyed[want]) / 2
                if keyed[want - 1] == keyed[want]:
                    tied = sum(k == keyed[want] for k in keyed)
                    note = (f"{tied} prompts tie at {signal} {sign * keyed[want]:g}, which no threshold can split; "
                            "all of them stay local, so the share is below the target")
        threshold = sign * threshold_key
        if signal == "length":
            threshold = math.floor(threshold)
        setattr(self, _ATTR[signal], int(threshold) if signal == "length" else threshold)

        counts: dict[str, int] = {}
        to_cloud: list[bool] = []
        for d, v in zip(fixed, values):
            if d is None or d.signal == "default":
                hit = (not math.isnan(v)) and (v < threshold if signal == "uncertainty" else v > threshold)
                name = signal if (hit or signal == "uncertainty") else (d.signal if d else "default")
                target = "cloud" if hit else "local"
            else:
                name, target = d.signal, d.target
            counts[name] = counts.get(name, 0) + 1
            to_cloud.append(target == "cloud")
        report = CalibrationReport(signal, float(threshold), None if labelled else float(target_cloud_share),
                                   sum(to_cloud) / len(prompts), counts, values, mode="labelled" if labelled else "share",
                                   auroc=auroc, margin=margin, note=note)
        if labelled:
            nl = len(local_prompts)
            report.local_to_cloud = sum(to_cloud[:nl]) / nl
            report.cloud_kept_local = 1.0 - sum(to_cloud[nl:]) / len(cloud_prompts)
        log.info("calibrated %s", report)
        return report

    def _measure(self, model: "Model", prompts: list[str], signal: str, max_new: int,
                 generate_kwargs: dict[str, Any]) -> tuple[list[Decision | None], list[float]]:
        """Each prompt's decision by the other checks, and its value of ``signal`` (NaN: the signal does not
        judge it, e.g. a prompt too short for the prompt score)."""
        saved = {a: getattr(self, a) for a in _ATTR.values()}
        fixed: list[Decision | None] = []
        values: list[float] = []
        try:
            # Measure under the candidate signal only (the other thresholds stay as configured, except that
            # the cascade is disabled while measuring pre-generation signals).
            setattr(self, _ATTR[signal], None)
            if signal != "uncertainty":
                self.min_confidence = None
            kwargs = dict(generate_kwargs)
            seed = kwargs.pop("seed", None)
            for i, p in enumerate(prompts):
                fixed.append(self.before(model, p, max_new_tokens=max_new))
                if signal == "uncertainty":
                    # One seed for every prompt would give every sample the same random stream, which shifts
                    # all the confidences together and biases the threshold: prompt i gets seed + i.
                    values.append(self.metric(model.generate(p, **kwargs, seed=None if seed is None else seed + i)))
                elif signal == "prompt-score":
                    s = model.score(p)
                    values.append(s.nats_per_token if s.num_tokens >= MIN_SCORED_TOKENS else float("nan"))
                else:
                    values.append(float(len(model.encode(p))))
        finally:
            for a, v in saved.items():
                setattr(self, a, v)
        return fixed, values


def _prompt_list(prompts: Any, name: str) -> list[str]:
    prompts = list(prompts) if prompts is not None and not isinstance(prompts, str) else None
    if not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise InvalidArgumentError(f"{name} must be a non-empty list of non-empty strings.")
    return prompts


def _labelled_threshold(local: list[float], cloud: list[float]) -> tuple[float, float | None, float | None]:
    """(threshold key, AUROC, margin) from the sorted cloud-ward keys of each class: the middle of the gap when
    the classes separate, else the cut that misroutes the fewest examples (ties: the fewest local ones)."""
    if not local or not cloud:  # one class is decided by other checks: keep the other on its side
        return (cloud[0] - 1e-6 if cloud else (local[-1] if local else 0.0) + 1e-6), None, None
    auroc = sum((c > x) + 0.5 * (c == x) for x in local for c in cloud) / (len(local) * len(cloud))
    margin = cloud[0] - local[-1]
    if margin > 0:
        return (local[-1] + cloud[0]) / 2, auroc, margin
    points = sorted(set(local + cloud))
    cuts = [points[0] - 1.0] + [(a + b) / 2 for a, b in zip(points, points[1:])] + [points[-1] + 1.0]

    def cost(t: float) -> tuple[int, int]:
        wrong_local = sum(x > t for x in local)
        return wrong_local + sum(c <= t for c in cloud), wrong_local

    return min(cuts, key=cost), auroc, margin


_METRICS: dict[str, Callable[[Any], float]] = {
    "mean_logprob": lambda g: g.mean_logprob,
    "min_logprob": lambda g: min(g.logprobs) if g.logprobs else float("nan"),
}


# --- the hybrid model ------------------------------------------------------------------------------------
class HybridStream:
    """Iterator of text pieces from :meth:`Hybrid.stream` / :meth:`Hybrid.chat_stream`; once exhausted,
    ``result`` holds the :class:`HybridResult` (source, reason, fallback)."""

    def __init__(self, gen: Iterator[str]):
        self._gen = gen
        self.result: HybridResult | None = None
        # Set before the cloud's first piece: which cloud endpoint is answering ("chat" / "completions"), so a
        # caller echoing a plain prompt knows the pieces are a reply, not its continuation. None while local.
        self.cloud_endpoint: str | None = None

    def __iter__(self) -> "HybridStream":
        return self

    def __next__(self) -> str:
        return next(self._gen)

    @property
    def generation(self) -> "Generation | None":
        """The local Generation when the local model gave the answer (as ``TextStream.generation``)."""
        r = self.result
        return r.generation if r is not None and r.source == "local" else None

    def close(self) -> None:
        self._gen.close()  # type: ignore[attr-defined]


class Hybrid:
    """A local :class:`~edgelm.Model` plus an optional :class:`~edgelm.CloudClient`, behind a :class:`Router`,
    with the model's ``generate`` / ``stream`` / ``chat`` / ``chat_stream`` surface. Results are
    :class:`HybridResult` (``text``, ``source``, ``reason``, ``fallback``).

    Chats always go to the cloud's ``/chat/completions``. A plain prompt (``generate`` / ``stream``) goes, with
    ``cloud_endpoint="auto"`` (the default), to ``/completions`` when it is text to continue (a story opening)
    and as one user message to ``/chat/completions`` when it reads as a request (:func:`looks_like_request`: a
    question, or an instruction such as "Translate ..."); ``"chat"`` or ``"completions"`` sends every plain
    prompt one way. ``HybridResult.cloud_endpoint`` says which was used.
    """

    def __init__(self, local: "Model", cloud: "CloudClient | None" = None, router: Router | None = None, *,
                 cloud_endpoint: Literal["auto", "chat", "completions"] = "auto"):
        if local is None or not hasattr(local, "generate"):
            raise InvalidArgumentError("Hybrid needs a local model (edgelm.load(...)).")
        if cloud_endpoint not in ("auto", "chat", "completions"):
            raise InvalidArgumentError(f"cloud_endpoint must be 'auto', 'chat' or 'completions', "
                                       f"got {cloud_endpoint!r}.")
        self.local = local
        self.cloud = cloud
        self.router = router if router is not None else Router()
        if not isinstance(self.router, Router):
            raise InvalidArgumentError("router must be an edgelm.Router.")
        self.router._model = local
        self.cloud_endpoint = cloud_endpoint
        self.last_result: HybridResult | None = None
        self.stats = {"local": 0, "cloud": 0, "mixed": 0, "fallbacks": 0}
        self._stats_lock = threading.Lock()
        self._warned = False

    # --- the Model surface -------------------------------------------------------------------------
    @property
    def context_length(self) -> int:
        return self.local.context_length

    @property
    def tokenizer(self):
        return self.local.tokenizer

    # Pass-throughs so a Hybrid can stand wherever a Model is used (the CLI's generate/chat, a server).
    @property
    def generation_config(self) -> dict[str, Any]:
        return self.local.generation_config

    @property
    def config(self) -> dict[str, Any]:
        return self.local.config

    @property
    def path(self):
        return self.local.path

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        return self.local.encode(text, add_bos=add_bos)

    def score(self, text: str):
        """Scores with the local model (scoring never leaves the device)."""
        return self.local.score(text)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, *,
                            tools: list[dict[str, Any]] | None = None, documents: list[dict[str, Any]] | None = None,
                            **template_kwargs: Any) -> str:
        """The local model's prompt for ``messages`` (see :meth:`edgelm.Model.apply_chat_template`)."""
        return self.local.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                              **_template_args(tools, documents, template_kwargs))

    def __repr__(self) -> str:
        return f"Hybrid(local={self.local!r}, cloud={self.cloud!r}, router={self.router!r})"

    def generate(self, prompt: str, *, prefer: Side | None = None, tags: Sequence[str] = (),
                 **kwargs: Any) -> HybridResult:
        """Answer ``prompt`` (text) locally or in the cloud; ``kwargs`` are :meth:`Model.generate`'s options."""
        _check_prompt(prompt)
        return self._answer(_Query(prompt, None, prompt, prefer, tuple(tags), kwargs))

    def chat(self, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None = None,
             documents: list[dict[str, Any]] | None = None, chat_template_kwargs: dict[str, Any] | None = None,
             prefer: Side | None = None, tags: Sequence[str] = (), **kwargs: Any) -> HybridResult:
        """Reply to ``messages``; the cloud receives the (redacted) messages, the local model its chat template.

        ``messages``, ``tools``, ``documents`` and ``chat_template_kwargs`` are :meth:`edgelm.Model.chat`'s; see
        the module docstring for which of them the cloud gets.
        """
        return self._answer(self._chat_query(messages, tools, documents, chat_template_kwargs, prefer, tags, kwargs))

    def stream(self, prompt: str, *, prefer: Side | None = None, tags: Sequence[str] = (),
               **kwargs: Any) -> HybridStream:
        """Streaming :meth:`generate`. A cascade has to finish the local answer before deciding, so that answer
        arrives in one piece; a cloud stream that breaks part-way is finished by the local model."""
        _check_prompt(prompt)
        return self._stream(_Query(prompt, None, prompt, prefer, tuple(tags), kwargs))

    def chat_stream(self, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None = None,
                    documents: list[dict[str, Any]] | None = None, chat_template_kwargs: dict[str, Any] | None = None,
                    prefer: Side | None = None, tags: Sequence[str] = (), **kwargs: Any) -> HybridStream:
        """Streaming :meth:`chat`. Tool calls from the cloud are on ``result.tool_calls`` once it is exhausted."""
        return self._stream(self._chat_query(messages, tools, documents, chat_template_kwargs, prefer, tags, kwargs))

    def _chat_query(self, messages: Any, tools: Any, documents: Any, template_kwargs: Any, prefer: Side | None,
                    tags: Sequence[str], kwargs: dict[str, Any]) -> "_Query":
        from edgelm.tokenizer import validate_messages, validate_template_kwargs, validate_tools, with_turn_stops

        messages = validate_messages(messages)  # the runtime's rules: tool calls, tool results, content parts
        tools = validate_tools(tools)
        template_kwargs = validate_template_kwargs(template_kwargs)
        text = self.apply_chat_template(messages, tools=tools, documents=documents, **template_kwargs)
        # The local model also stops where its template says a reply ends (Model.chat's rule: the plain fallback's
        # next-turn marker); the cloud gets only the caller's stop strings.
        local_kw = with_turn_stops(kwargs, getattr(self.local, "chat_template", None))
        local_text = None
        if kwargs.get("truncate") == "left":
            # As Model.chat: the local side gets the *messages* fitted to its context (oldest exchanges first,
            # then the start of the newest message), never the rendered prompt cut from the left, which would
            # drop the system message and the template's header first. Routing still sees the whole
            # conversation (too long for the local context -> cloud, which gets every message).
            local_text, local_kw = self._fitted_chat(messages, tools, documents, template_kwargs, local_kw)
        return _Query(text, messages, _last_user(messages), prefer, tuple(tags), kwargs, tools=tools,
                      documents=documents, local_kw=local_kw, local_text=local_text)

    def _fitted_chat(self, messages: list[dict[str, Any]], tools: Any, documents: Any, template_kwargs: Any,
                     local_kw: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
        """The local prompt for ``truncate="left"``: the messages fitted by :func:`edgelm.model.fit_messages`, and
        the local options without ``truncate``. When the template and system message alone leave no room, the
        rendered prompt is kept (its start cut by the local model, as before) rather than failing the query here:
        the cloud may still take it whole."""
        from edgelm.model import fit_messages
        from edgelm.sampling import validate_max_new_tokens

        if local_kw.get("max_new_tokens") is not None:
            validate_max_new_tokens(local_kw["max_new_tokens"])

        def render(msgs: list[dict[str, Any]]) -> str:
            return self.apply_chat_template(msgs, tools=tools, documents=documents, **template_kwargs)

        try:
            fitted, _ = fit_messages(self.local, messages, local_kw.get("max_new_tokens"), render)
        except ContextLengthError:
            return None, local_kw
        return render(fitted), {k: v for k, v in local_kw.items() if k != "truncate"}

    # --- internals ---------------------------------------------------------------------------------
    def _decide(self, q: "_Query", stream: bool = False) -> tuple[Decision | None, list[str]]:
        from edgelm.tokenizer import validate_stop

        if q.prefer is not None and q.prefer not in _SIDES:
            raise InvalidArgumentError(f"prefer must be 'local', 'cloud' or None, got {q.prefer!r}.")
        validate_stop(q.kwargs.get("stop"))  # the runtime's limits, for a request the cloud answers too
        self._warn_if_unused()
        return self.router._before(self.local, q.text, max_new_tokens=self._max_new(q), prefer=q.prefer,
                                   tags=q.tags, rule_text=q.rule_text, cloud_available=self.cloud is not None,
                                   stream=stream)

    def _max_new(self, q: "_Query") -> int:
        return int(q.kwargs.get("max_new_tokens") or self.local.generation_config.get("max_new_tokens") or 128)

    def _warn_if_unused(self) -> None:
        """Warn once when a cloud is configured but nothing except an oversized prompt could ever reach it."""
        if self._warned or self.cloud is None or not self.router.allow_cloud:
            return
        self._warned = True
        if not self.router.cloud_signals(self.local):
            msg = ("A cloud is configured, but this router can send it only prompts too long for the local model: "
                   "the model folder records no held-out nats/token for the default thresholds, and no threshold, "
                   "cloud rule or length limit is set.")
            warnings.warn(f"{msg} Set max_prompt_nats / min_confidence, add Rule('cloud', ...), or calibrate the "
                          "router (router.calibrate(local_prompts, cloud_prompts)).", UserWarning, stacklevel=4)
            log.warning(msg)

    def _endpoint(self, q: "_Query") -> str:
        """Where the cloud is asked: chats -> "chat"; plain prompts as ``cloud_endpoint`` says (see the class)."""
        if q.messages is not None:
            return "chat"
        if self.cloud_endpoint != "auto":
            return self.cloud_endpoint
        return "chat" if looks_like_request(q.prompt) else "completions"

    def _budget_ok(self, d: Decision) -> tuple[Decision, str | None]:
        """Reserve a cloud call, or turn the decision local with the budget as reason."""
        budget = self.router.budget
        if budget is None:
            return d, None
        why = budget.try_reserve()
        if why is None:
            return d, None
        return Decision("local", "budget", f"{d.reason}; but {why}", d.value, d.threshold), why

    def _local(self, q: "_Query") -> "Generation":
        return self.local.generate(q.local_prompt, **q.local_kwargs)

    def _cloud_kwargs(self, q: "_Query") -> dict[str, Any]:
        out = {}
        for key, cloud_key in _CLOUD_OPTIONS.items():
            if q.kwargs.get(key) is not None:
                out[cloud_key] = q.kwargs[key]
        if "max_tokens" not in out:
            out["max_tokens"] = int(self.local.generation_config.get("max_new_tokens") or 128)
        return out

    def _cloud_chat_extras(self, q: "_Query") -> dict[str, Any]:
        """``tools`` (as given: the app's own schemas) and ``documents`` (redacted: they are content)."""
        out: dict[str, Any] = {}
        if q.tools:
            out["tools"] = q.tools
        if q.documents is not None:
            out["documents"] = [{k: self._redact(v) if isinstance(v, str) else v for k, v in d.items()}
                                for d in q.documents]
        return out

    def _redact(self, text: str) -> str:
        if self.router.redact is None:
            return text
        out = self.router.redact(text)
        if not isinstance(out, str):
            raise InvalidArgumentError("the redact hook must return a string.")
        return out

    def _outgoing(self, q: "_Query") -> tuple[list[dict[str, Any]] | None, str]:
        """The redacted messages (chat, in the OpenAI wire shape) or prompt (generate) that may leave the device.

        Everything a user or a tool wrote is redacted: text content, text parts, tool results and tool call
        arguments (which repeat what the user said). Roles, names and ids are not."""
        if q.messages is None:
            return None, self._redact(q.prompt)
        from edgelm.cloud import openai_messages

        out = []
        for m in openai_messages(q.messages):
            content = m.get("content")
            if isinstance(content, str):
                m["content"] = self._redact(content)
            elif isinstance(content, list):
                m["content"] = [{**p, "text": self._redact(p["text"])} if isinstance(p.get("text"), str) else p
                                for p in content]
            if "tool_calls" in m:
                m["tool_calls"] = [_redact_arguments(c, self._redact) for c in m["tool_calls"]]
            out.append(m)
        return out, ""

    def _call_cloud(self, q: "_Query") -> "CloudReply":
        assert self.cloud is not None and self.router.allow_cloud  # privacy mode never reaches here
        self._check_cloud_extra()
        messages, prompt = self._outgoing(q)
        kw = self._cloud_kwargs(q)
        if messages is not None:
            reply = self.cloud.chat(messages, **kw, **self._cloud_chat_extras(q))
        elif self._endpoint(q) == "completions":
            reply = self.cloud.complete(prompt, **kw)
        else:
            reply = self.cloud.chat([{"role": "user", "content": prompt}], **kw)
        self._record_tokens(q, reply)
        return reply

    def _open_cloud_stream(self, q: "_Query"):
        self._check_cloud_extra()
        messages, prompt = self._outgoing(q)
        kw = self._cloud_kwargs(q)
        if messages is not None:
            return self.cloud.stream(messages, **kw, **self._cloud_chat_extras(q))
        if self._endpoint(q) == "completions":
            return self.cloud.stream_complete(prompt, **kw)
        return self.cloud.stream([{"role": "user", "content": prompt}], **kw)

    def _check_cloud_extra(self) -> None:
        """edgelm's CloudClient needs httpx (the [cloud] extra); without it the call becomes a fallback."""
        from edgelm.cloud import CloudClient

        if isinstance(self.cloud, CloudClient):
            try:
                import httpx  # noqa: F401
            except ImportError:
                raise _CloudExtraMissing("The cloud client needs httpx, which is not installed.",
                                         hint='pip install "edgelm[cloud]" (or pip install ".[cloud]" in a '
                                              'checkout)') from None

    def _record_tokens(self, q: "_Query", reply: "CloudReply") -> None:
        if self.router.budget is not None:
            tokens = reply.total_tokens
            if tokens is None:  # the server sent no usage: estimate with the local tokenizer
                tokens = len(self.local.encode(q.text)) + len(self.local.encode(reply.text, add_bos=False))
            self.router.budget.record_tokens(tokens)

    def _finish(self, r: HybridResult, started: float) -> HybridResult:
        r.total_time_s = time.perf_counter() - started
        with self._stats_lock:
            self.stats[r.source] += 1
            self.stats["fallbacks"] += r.fallback is not None
        self.last_result = r
        log.debug("hybrid answer from %s (%s)%s", r.source, r.signal, " with fallback" if r.fallback else "")
        return r

    def _answer(self, q: "_Query") -> HybridResult:
        started = time.perf_counter()
        d, passed = self._decide(q)
        gen: Generation | None = None
        if d is None:  # cascade: answer locally first, then judge the answer
            gen = self._local(q)
            d = self.router.after(gen, self.local, passed=passed)
        budget_note = None
        if d.target == "cloud":
            d, budget_note = self._budget_ok(d)
        if d.target == "local":
            if gen is None:
                try:
                    gen = self._local(q)
                except EdgeLMError as local_exc:
                    return self._finish(self._rescue(q, d, local_exc, budget_note), started)
            return self._finish(_local_result(gen, d, None), started)
        # The cloud should answer.
        try:
            reply = self._call_cloud(q)
        except CloudError as exc:
            fallback = _cloud_failure(exc)
            log.info("cloud failed (%s); answering locally", type(exc).__name__)
            if gen is None:  # no local answer yet (pre-generation decision): make one now
                try:
                    gen = self._local(q)
                except EdgeLMError as local_exc:
                    raise RoutingError(
                        f"Neither side could answer: the cloud failed ({fallback}) and the local model refused "
                        f"({local_exc}).", hint="Shorten the prompt or lower max_new_tokens so it fits the local "
                        "model, or check the cloud endpoint.") from None
            return self._finish(_local_result(gen, d, fallback), started)
        return self._finish(HybridResult(text=reply.text, source="cloud", reason=d.reason, signal=d.signal,
                                         value=d.value, threshold=d.threshold, finish_reason=reply.finish_reason,
                                         generation=gen, cloud_reply=reply, cloud_endpoint=self._endpoint(q)),
                            started)

    def _rescue(self, q: "_Query", d: Decision, local_exc: EdgeLMError, budget_note: str | None) -> HybridResult:
        """The local model refused (e.g. the prompt does not fit): try the cloud if policy allows."""
        d2 = self._rescue_decision(d, local_exc, budget_note)
        try:
            reply = self._call_cloud(q)
        except CloudError as exc:
            raise RoutingError(f"Neither side could answer: the local model refused ({local_exc}) and the cloud "
                               f"failed ({_cloud_failure(exc)}).", hint=local_exc.hint or "") from None
        return HybridResult(text=reply.text, source="cloud", reason=d2.reason, signal=d2.signal,
                            finish_reason=reply.finish_reason, cloud_reply=reply, cloud_endpoint=self._endpoint(q))

    def _rescue_decision(self, d: Decision, local_exc: EdgeLMError, budget_note: str | None) -> Decision:
        """After the local model refused: the decision to ask the cloud instead, or RoutingError if policy,
        configuration or budget rule that out."""
        if self.cloud is None or not self.router.allow_cloud or budget_note is not None:
            why = ("no cloud endpoint" if self.cloud is None else "privacy mode" if not self.router.allow_cloud
                   else budget_note)
            raise RoutingError(f"Neither side could answer: the local model refused ({local_exc}) and the cloud "
                               f"is not available ({why}).", hint=local_exc.hint or "") from None
        d2, note = self._budget_ok(Decision("cloud", "local-failed", f"the local model refused: {local_exc.message}"))
        if note is not None:
            raise RoutingError(f"Neither side could answer: the local model refused ({local_exc}) and {note}.",
                               hint=local_exc.hint or "") from None
        return d2

    def _stream(self, q: "_Query") -> HybridStream:
        d, passed = self._decide(q, stream=True)  # checked now, so bad arguments raise before the first piece
        holder: list[HybridStream] = []
        s = HybridStream(self._stream_gen(q, d, passed, holder))
        holder.append(s)
        return s

    def _stream_gen(self, q: "_Query", d: Decision | None, passed: list[str],
                    holder: list[HybridStream]) -> Iterator[str]:
        started = time.perf_counter()
        gen: Generation | None = None
        if d is None:
            gen = self._local(q)
            d = self.router.after(gen, self.local, passed=passed)
        budget_note = None
        if d.target == "cloud":
            d, budget_note = self._budget_ok(d)
        if d.target == "local":
            if gen is not None:  # the cascade kept its answer: hand it over
                if gen.text:
                    yield gen.text
                holder[0].result = self._finish(_local_result(gen, d, None), started)
                return
            try:
                ts = self.local.stream(q.local_prompt, **q.local_kwargs)  # checks its arguments (and the fit) right away
            except EdgeLMError as local_exc:
                d = self._rescue_decision(d, local_exc, budget_note)  # raises RoutingError when it cannot
            else:
                yield from ts
                if ts.generation is not None:
                    holder[0].result = self._finish(_local_result(ts.generation, d, None), started)
                return
        given: list[str] = []
        try:
            cs = self._open_cloud_stream(q)
            holder[0].cloud_endpoint = self._endpoint(q)
            for piece in cs:
                given.append(piece)
                yield piece
            reply = cs.reply
            self._record_tokens(q, reply)
            holder[0].result = self._finish(HybridResult(
                text=reply.text, source="cloud", reason=d.reason, signal=d.signal, value=d.value,
                threshold=d.threshold, finish_reason=reply.finish_reason, generation=gen, cloud_reply=reply,
                cloud_endpoint=self._endpoint(q)), started)
            return
        except CloudError as exc:
            fallback = _cloud_failure(exc)
        if d.signal == "local-failed" and not given:
            raise RoutingError(f"Neither side could answer: {d.reason}, and the cloud failed ({fallback}).")
        if not given:  # nothing shown yet: the local answer stands in whole
            if gen is not None:
                if gen.text:
                    yield gen.text
            else:
                try:
                    ts = self.local.stream(q.local_prompt, **q.local_kwargs)
                except EdgeLMError as local_exc:
                    raise RoutingError(f"Neither side could answer: the cloud failed ({fallback}) and the local "
                                       f"model refused ({local_exc}).") from None
                yield from ts
                gen = ts.generation
            if gen is not None:
                holder[0].result = self._finish(_local_result(gen, d, fallback), started)
            return
        # Part of the cloud answer is already on the user's screen: the local model continues it, from as much of
        # the prompt and the partial answer as fits its context (truncate="left"), with the tokens still owed --
        # at most half its context, so that a request the local model could never take whole (the context check
        # sent it out: max_new_tokens >= its context) still gets a continuation with half a context to go on.
        partial = "".join(given)
        owed = self._max_new(q) - len(self.local.encode(partial, add_bos=False))
        cap = max(1, int(self.local.context_length) // 2)
        kwargs = dict(q.local_kwargs, truncate="left", max_new_tokens=max(1, min(owed, cap)))
        how = f"{fallback}; the local model finished the answer after {len(partial)} characters from the cloud"
        if owed > cap:
            how += f" (at most {cap} more tokens: half its context)"
        try:
            ts = self.local.stream(q.local_prompt + partial, **kwargs)
        except EdgeLMError as local_exc:
            err = RoutingError(f"The cloud stream broke after {len(partial)} characters ({fallback}) and the local "
                               f"model cannot continue it ({local_exc.message}).",
                               hint="The text shown so far is on this error's partial_text.")
            err.partial_text = partial  # type: ignore[attr-defined]
            raise err from None
        rest = []
        for piece in ts:
            rest.append(piece)
            yield piece
        g2 = ts.generation
        holder[0].result = self._finish(HybridResult(
            text=partial + "".join(rest), source="mixed", reason=d.reason, signal=d.signal, value=d.value,
            threshold=d.threshold, fallback=how, finish_reason=g2.finish_reason if g2 else None, generation=g2,
            cloud_endpoint=self._endpoint(q)), started)


@dataclass(frozen=True)
class _Query:
    text: str                              # what the local model sees (prompt, or the rendered chat template)
    messages: list[dict[str, Any]] | None  # chat messages, validated (None for a plain prompt)
    rule_text: str                         # what rules look at: the prompt, or the last user message
    prefer: Side | None
    tags: tuple[str, ...]
    kwargs: dict[str, Any]
    tools: list[dict[str, Any]] | None = None      # chat only: for the template and the cloud request
    documents: list[dict[str, Any]] | None = None
    local_kw: dict[str, Any] | None = None         # chat only: kwargs plus the local template's turn stops
    local_text: str | None = None                  # chat with truncate="left": the messages fitted to the local context

    @property
    def prompt(self) -> str:
        return self.text

    @property
    def local_prompt(self) -> str:
        """What the local model generates from: ``text``, or the fitted conversation (truncate="left")."""
        return self.text if self.local_text is None else self.local_text

    @property
    def local_kwargs(self) -> dict[str, Any]:
        """What the local model is given (``kwargs``, with a chat's turn stops)."""
        return self.kwargs if self.local_kw is None else self.local_kw


def _local_result(gen: "Generation", d: Decision, fallback: str | None) -> HybridResult:
    return HybridResult(text=gen.text, source="local", reason=d.reason, signal=d.signal, value=d.value,
                        threshold=d.threshold, fallback=fallback, finish_reason=gen.finish_reason, generation=gen)


def _cloud_failure(exc: CloudError) -> str:
    """A short, key-free reason for a cloud failure (the CloudClient already keeps the key out)."""
    from edgelm.errors import CloudHTTPError, CloudResponseError, CloudTimeoutError
    if isinstance(exc, _CloudExtraMissing):
        return f"cloud extra not installed ({exc.hint})"
    if isinstance(exc, CloudTimeoutError):
        kind = "cloud timed out"
    elif isinstance(exc, CloudHTTPError):
        kind = "cloud rate-limited" if exc.status_code == 429 else f"cloud HTTP {exc.status_code}"
    elif isinstance(exc, CloudResponseError):
        kind = "cloud stream cut off" if exc.stream_cut else "cloud answer malformed"
    else:
        kind = "cloud unreachable"
    return f"{kind}: {exc.message.rstrip('.')}"  # it is joined with "; ..." clauses: no sentence stop inside


class _CloudExtraMissing(CloudError):
    """The [cloud] extra (httpx) is not installed: a fallback reason, never raised to the caller."""


# Words that open a request to an assistant rather than text to be continued (lower case, first word).
_REQUEST_WORDS = frozenset("""what who whom whose which when where why how is are was were can could would should do does
    did shall please explain describe write translate summarize summarise list give name tell define compare
    calculate compute find show help suggest recommend convert fix rewrite correct classify answer solve generate
    create draft outline""".split())


def looks_like_request(prompt: str) -> bool:
    """True when a plain prompt reads as a request to an assistant (a question, or an instruction such as
    "Translate ..." / "Write ..."), False when it reads as text to continue ("Once upon a time, ...").
    ``Hybrid(cloud_endpoint="auto")`` sends the first kind to ``/chat/completions`` and the second to
    ``/completions``."""
    text = prompt.strip()
    if text.endswith("?"):
        return True
    first = re.match(r"[A-Za-z']+", text)
    return first is not None and first.group(0).lower() in _REQUEST_WORDS


def _check_prompt(prompt: Any) -> None:
    if not isinstance(prompt, str) or not prompt:
        raise InvalidArgumentError("Hybrid prompts must be non-empty strings.",
                                   hint="Token-id prompts cannot be sent to a cloud model; pass text.")


def _template_args(tools: Any, documents: Any, template_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The template arguments that were given (so a Model-like local without them keeps working)."""
    given = {k: v for k, v in (("tools", tools), ("documents", documents)) if v is not None}
    return {**given, **template_kwargs}


def _content_text(content: Any) -> str:
    """What rules read of a message's content: the str, its text parts joined, or a tool result as JSON."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        import json

        return json.dumps(content, ensure_ascii=False)
    return "\n".join(p["text"] for p in content or () if isinstance(p, dict) and isinstance(p.get("text"), str))


def _last_user(messages: list[dict[str, Any]]) -> str:
    for m in reversed(messages):
        if m["role"] == "user":
            return _content_text(m.get("content"))
    return _content_text(messages[-1].get("content"))


def _redact_arguments(call: dict[str, Any], redact: Callable[[str], str]) -> dict[str, Any]:
    fn = call.get("function")
    if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
        return {**call, "function": {**fn, "arguments": redact(fn["arguments"])}}
    return call


# --- command line -------------------------------------------------------------------------------------------
def add_cli_arguments(parser) -> None:
    """Add ``--cloud-url``, ``--cloud-model``, ``--route`` and ``--cloud-threshold`` to a subcommand."""
    g = parser.add_argument_group("hybrid (optional hand-off to a larger model)")
    g.add_argument("--cloud-url", metavar="URL", default=None,
                   help="an OpenAI-compatible API root, e.g. http://127.0.0.1:8000/v1 (key from "
                        "EDGELM_CLOUD_API_KEY or OPENAI_API_KEY)")
    g.add_argument("--cloud-model", metavar="NAME", default=None, help="model name to request from the cloud")
    g.add_argument("--route", choices=("auto", "local", "cloud"), default="auto",
                   help="auto: the router decides; local: never send; cloud: always send (local on failure)")
    g.add_argument("--cloud-threshold", metavar="NATS", type=float, default=None,
                   help="with --route auto: escalate when the local answer's mean token log-probability is "
                        "below this (e.g. -1.2); without it the default policy decides from the model's own "
                        "held-out nats/token (docs/hybrid.md)")
    g.add_argument("--cloud-timeout", metavar="S", type=float, default=60.0, help="cloud timeout in seconds")
    g.add_argument("--cloud-endpoint", choices=("auto", "chat", "completions"), default="auto",
                   help="how plain prompts are sent: auto (questions and instructions as a chat message, other "
                        "text to /completions to be continued), chat (always one user message) or completions "
                        "(always text continuation)")


def from_cli_args(model: "Model", args) -> "Model | Hybrid":
    """Wrap ``model`` in a :class:`Hybrid` as the CLI options ask; returns ``model`` unchanged without
    ``--cloud-url`` (and ``--route`` auto/local). Raises InvalidArgumentError for ``--route cloud`` alone."""
    url = getattr(args, "cloud_url", None)
    route = getattr(args, "route", "auto") or "auto"
    if url is None:
        if route == "cloud":
            raise InvalidArgumentError("--route cloud needs --cloud-url.",
                                       hint="e.g. --cloud-url http://127.0.0.1:8000/v1")
        return model
    from edgelm.cloud import CloudClient
    cloud = CloudClient(url, model=getattr(args, "cloud_model", None), timeout=getattr(args, "cloud_timeout", 60.0))
    threshold = getattr(args, "cloud_threshold", None)
    auto = route == "auto"
    router = Router(allow_cloud=route != "local", default="cloud" if route == "cloud" else "local",
                    max_prompt_nats="auto" if auto else None,
                    min_confidence=(threshold if threshold is not None else "auto") if auto else None)
    return Hybrid(model, cloud, router, cloud_endpoint=getattr(args, "cloud_endpoint", "auto") or "auto")


def describe(result_or_stream: Any) -> str | None:
    """The ``[source] reason`` line for a HybridResult or an exhausted HybridStream; None for anything else
    (a plain Generation or TextStream), so callers can print it unconditionally when not None."""
    r = getattr(result_or_stream, "result", result_or_stream)
    return r.describe() if isinstance(r, HybridResult) else None


__all__ = ["Hybrid", "HybridResult", "HybridStream", "Router", "Rule", "Budget", "Decision", "CalibrationReport",
           "reference_nats_per_token", "looks_like_request", "add_cli_arguments", "from_cli_args", "describe",
           "AUTO_PROMPT_FACTOR", "AUTO_CONFIDENCE_FACTOR", "MIN_SCORED_TOKENS"]
