"""The runtime: load a model folder and generate, stream, chat and score with it (contract: docs/architecture.md).

One onnxruntime session runs the whole graph: the prompt in one call (prefill), then one token per call with
the key/value cache fed back (decode). The decode loop is the product, so it stays short. Two cache layouts
(config.json ``onnx.kv_cache``, docs/model-format.md):

* "shared" (the exporter's fused GroupQueryAttention graph): one preallocated buffer per layer is bound with IO
  binding as both past and present, the kernel writes the new slots in place, and the logits land in a
  preallocated buffer -- a decode step allocates and copies nothing (:class:`_SharedCache`);
* "concat": each step's ``present.*`` outputs go straight back in as ``past_key_values.*`` as onnxruntime values
  (never copied through numpy).

Either way the ``input_ids`` / ``position_ids`` buffers are allocated once and written in place, and sampling
works on a top-k slice of the logits (see edgelm.sampling).

numpy, onnxruntime and tokenizers are imported inside the functions that use them so ``import edgelm`` stays
cheap (the CLI's ``--help``, the server's import); they are imported once, by ``load``.
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence, TypedDict

from edgelm.errors import (ContextLengthError, InvalidArgumentError, ModelFormatError, ModelNotFoundError)
from edgelm.folder import ModelFolder, check_onnxruntime, open_folder

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from edgelm.sampling import SamplingSettings
    from edgelm.tokenizer import ChatTemplate, Tokenizer
    from typing_extensions import Unpack

ENV_MODEL = "EDGELM_MODEL"
ENV_SPIN = "EDGELM_SPIN"  # "1" / "0": force onnxruntime's spin-waiting on or off (see default_spin)
FINISH_REASONS = ("stop", "length", "eos")
# Idle key/value buffer sets a model keeps for reuse ("shared" graphs, see _SharedCache). Each live generation
# (a running or suspended stream) holds one set; when it ends its set goes back to the pool unless the pool already
# holds this many, so memory after a burst of N concurrent streams falls back to this many sets, not N. One set is
# 2 x layers x kv_heads x context x head_dim x 4 bytes (SmolLM2-135M at context 4096: 189 MB; the default model:
# 3.1 MB), paged in only where written. ``Model.kv_pool_max`` overrides it per model.
KV_POOL_MAX = 4


# --- results -------------------------------------------------------------------------------------------
@dataclass
class Generation:
    """The result of ``generate`` / ``chat``.

    ``token_ids`` are every token the model produced, including a final EOS (``finish_reason == "eos"``), which
    is not part of ``text``; with a stop string, ``text`` ends just before it while ``token_ids`` include the
    tokens that spelled it. ``logprobs[i]`` is the log-probability (nats) of ``token_ids[i]`` under the model's
    unmodified distribution (before temperature, penalties or truncation).
    """

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    time_to_first_token_s: float
    decode_tokens_per_s: float
    total_time_s: float
    logprobs: list[float] = field(default_factory=list)
    # Prompt lookup (``lookup=True``, greedy only; edgelm.lookup): draft tokens the model verified, and how many of
    # them it agreed with (each accepted draft is a token that cost no model call of its own). 0 without lookup.
    drafted_tokens: int = 0
    accepted_tokens: int = 0

    @property
    def mean_logprob(self) -> float:
        """Mean log-probability per generated token (nats); ``nan`` when nothing was generated."""
        return sum(self.logprobs) / len(self.logprobs) if self.logprobs else float("nan")


@dataclass
class Score:
    """Log-likelihood of a text under the model (see ``Model.score``)."""

    total_logprob: float    # nats, summed over the scored tokens (<= 0)
    num_tokens: int         # tokens scored (every token after the first)
    num_bytes: int          # UTF-8 bytes of the text
    perplexity: float       # exp(-total_logprob / num_tokens)
    bits_per_byte: float    # -total_logprob / ln 2 / num_bytes: comparable across tokenizers
    nats_per_token: float   # -total_logprob / num_tokens


class TextStream:
    """What ``stream`` / ``chat_stream`` return: an iterator of text pieces.

    After it is exhausted, ``.generation`` holds the full :class:`Generation` (finish reason, token counts,
    timings, logprobs), which lets a server send usage and finish_reason at the end of a stream.
    ``close()`` stops generation early (``.generation`` then stays None).
    """

    __slots__ = ("_it", "generation")

    def __init__(self, it: Iterator[str]) -> None:
        self._it = it
        self.generation: Generation | None = None

    def __iter__(self) -> "TextStream":
        return self

    def __next__(self) -> str:
        try:
            return next(self._it)
        except StopIteration as stop:
            if stop.value is not None:
                self.generation = stop.value
            raise StopIteration(self.generation) from None

    def close(self) -> None:
        self._it.close()  # type: ignore[attr-defined]


@dataclass(frozen=True)
class _Request:
    prompt_ids: list[int]
    max_new_tokens: int
    settings: "SamplingSettings"
    stops: tuple[str, ...]
    ignore_eos: bool
    lookup: bool = False


# --- loading -------------------------------------------------------------------------------------------
def physical_cores() -> int:
    """Physical CPU cores available to this process (hyper-threads counted once), without psutil."""
    try:
        cpus: Sequence[int] = sorted(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cpus = range(os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        try:  # Linux: one entry per physical core, shared by its hyper-threads
            with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list") as f:
                cores.add(f.read().strip())
        except OSError:
            cores = set()
            break
    if cores:
        return len(cores)
    if sys.platform == "darwin":
        try:
            import subprocess

            out = subprocess.run(["sysctl", "-n", "hw.physicalcpu"], capture_output=True, text=True, timeout=2)
            return max(1, int(out.stdout.strip()))
        except (OSError, ValueError, subprocess.SubprocessError):
            pass
    return max(1, len(cpus))


# score() keeps one window's logits (fp32, every position) under this: 1 GiB holds a 4,096-token window for
# vocabularies up to 65,536 entries (SmolLM2, Llama 2, the default model keep their full context); Gemma 3's
# 262,144 entries are scored 1,024 tokens at a time.
SCORE_LOGITS_BYTES = 2**30
# Where the cache stays in place ("shared"), score() runs a window in calls of at most this many tokens over the
# cache: the logits of one call, not of the whole window, are in memory (SmolLM2, a 4,096-token window: 0.1 GB instead
# of 0.8, and a rescored LM head's ranking copy of them the same; benchmarks/results/rescored-head-smollm2.md).
# Graphs whose rows do not depend on the call (fp32, MatMulNBits) give the same numbers as one call; an int8 GEMM
# (one activation scale per call) gives those of 512-token calls, as a prefill of that length computes them.
SCORE_CALL_ROWS = 512
# A prefill runs a long prompt in calls of at most this many tokens over the cache (either layout). The fused
# attention of a "shared" graph holds the scores of one call, [heads, call rows, past + call rows] floats, and for
# a whole prompt in one call [heads, prompt, prompt] (SmolLM2-135M, 3,500 tokens: 440 MB). Measured there (int8,
# fresh processes, benchmarks/results/long-prefill-smollm2.md): peak RSS 648 -> 495 MiB, time to first token 5.28
# -> 4.80 s at 1 thread and 2.81 -> 2.60 s at 2. Calls of 256 were within 7 % either way; 512 is score()'s call
# too, so an int8 GEMM (one activation scale per call) computes a prompt's rows the same way in both. A short
# prompt is one call.
PREFILL_CALL_ROWS = 512


# Below this many bytes of weights (the graph file plus any external data), the default is ONE onnxruntime thread.
# A decode step of such a model is a few hundred microseconds of small MatMuls, and handing each of them to a
# second thread costs more than it saves. Measured on a 2-vCPU Xeon/EPYC with other jobs running (decode tokens/s,
# weight-only int8, fused graph): 5.5M-parameter default model 5,000 at 1 thread vs 2,000 at 2; 15M shape (25 MB)
# 1,660 vs 960; SmolLM2-135M shape (170 MB) gains from 2 threads (benchmarks/results/compare-t*.md). The
# threshold sits between the measured small and large sizes; ``threads=N`` always overrides it.
SINGLE_THREAD_BELOW_BYTES = 64 * 2**20


def default_threads(model_bytes: int) -> int:
    """The default intra-op thread count for a model whose weights take ``model_bytes``: 1 below
    :data:`SINGLE_THREAD_BELOW_BYTES`, else one per physical core (see the measurements above)."""
    return 1 if model_bytes < SINGLE_THREAD_BELOW_BYTES else physical_cores()


# How long default_spin watches /proc/stat. The kernel counts CPU time in jiffies (1/100 s on most kernels), so
# 50 ms gives ~5 ticks per core: enough to tell an idle core from a busy one, at 50 ms of load time.
SPIN_SAMPLE_S = 0.05


def _read_cpu_times(path: str = "/proc/stat") -> tuple[int, int] | None:
    """(idle, total) jiffies summed over all cores, from the ``cpu`` line of Linux's /proc/stat; None elsewhere.

    Idle counts ``idle + iowait`` (a core waiting on disk is free to run a worker); the total counts user, nice,
    system, idle, iowait, irq, softirq and steal (guest time is already inside user)."""
    try:
        with open(path) as f:
            fields = f.readline().split()
    except OSError:
        return None
    if len(fields) < 6 or fields[0] != "cpu":
        return None
    try:
        ticks = [int(x) for x in fields[1:9]]
    except ValueError:
        return None
    return ticks[3] + ticks[4], sum(ticks)


def _own_cpu_ticks() -> float:
    """CPU time this process (all its threads) has used, in /proc/stat's jiffies."""
    t = os.times()
    return (t.user + t.system) * os.sysconf("SC_CLK_TCK")


def idle_cores(sample_s: float = SPIN_SAMPLE_S) -> float | None:
    """How many cores other processes left idle over the next ``sample_s`` seconds (idle share of all CPU time
    x cpu count), read from /proc/stat twice; None where /proc/stat is missing or did not advance.

    This process's own CPU time counts as idle: right after ``import onnxruntime`` one of its threads stays busy
    for ~60 ms, which made a fast-loading small model see 1.2 of 2 cores idle on a quiet machine."""
    before, own_before = _read_cpu_times(), _own_cpu_ticks()
    if before is None:
        return None
    time.sleep(sample_s)
    after, own_after = _read_cpu_times(), _own_cpu_ticks()
    if after is None or after[1] <= before[1]:
        return None
    total = after[1] - before[1]
    idle = min(total, after[0] - before[0] + max(0.0, own_after - own_before))
    return idle / total * (os.cpu_count() or 1)


def default_spin(threads: int) -> bool:
    """Whether onnxruntime's worker threads should spin-wait between kernels (``allow_spinning``).

    Spinning keeps a worker hot between the many short kernels of a decode step: on a quiet 2-vCPU machine it
    made 2-thread decode 37-38 % faster (15M and 135M shapes, +38 % on SmolLM2-135M int8). But a spinning worker
    burns a core that another process may need, and when the cores are already busy it steals time from the
    thread doing the real work: with one core busy it made SmolLM2 decode 24 % slower, with a load average of ~9
    5x slower (docs/performance.md). So the default looks at the machine as the model loads: spin only with
    more than one thread and at least ``threads - 0.5`` cores idle. On Linux "idle" is measured now, from
    /proc/stat sampled :data:`SPIN_SAMPLE_S` apart (see :func:`idle_cores`), not from the 1-minute load average:
    that average still remembers a process that just exited (the previous benchmark run, a finished build) and
    so turned spinning off on a quiet machine, 27 % slower. Where /proc/stat is missing the load average
    decides (``cpu_count - load >= threads - 0.5``), and without one either (Windows) spinning stays on, as
    onnxruntime's own default. ``$EDGELM_SPIN`` = 1 or 0 overrides all this; so does ``spin=`` on
    :func:`edgelm.load`. With one thread there are no workers and the setting does nothing.
    """
    env = os.environ.get(ENV_SPIN, "").strip().lower()
    if env in ("1", "true", "yes", "on"):
        return True
    if env in ("0", "false", "no", "off"):
        return False
    if env not in ("", "auto"):
        raise InvalidArgumentError(f"${ENV_SPIN} is {os.environ[ENV_SPIN]!r}.",
                                   hint="Set it to 1 (spin-wait), 0 (never), or unset it (or 'auto') for the default.")
    if threads <= 1:
        return False
    idle = idle_cores()
    if idle is None:
        try:
            idle = (os.cpu_count() or 1) - os.getloadavg()[0]
        except (AttributeError, OSError):  # Windows: no load average; onnxruntime's own default is to spin
            return True
    return idle >= threads - 0.5


def _default_model_path() -> Path:
    env = os.environ.get(ENV_MODEL)
    if env:
        return Path(env).expanduser()
    try:
        import edgelm_models
    except ImportError:
        raise ModelNotFoundError("No model path was given and the default model package (edgelm_models) is not "
                                 "installed.", hint="Pass a model folder, e.g. edgelm.load('models/my-model'), or "
                                                    f"set {ENV_MODEL}=/path/to/folder.") from None
    return edgelm_models.default_path()


def _check_path_argument(path: Any) -> None:
    """A model path must be a non-empty str or os.PathLike: ``Path("")`` is the current directory, which would
    otherwise be opened as the model folder."""
    if isinstance(path, os.PathLike):
        path = os.fspath(path)
    if not isinstance(path, str):
        raise InvalidArgumentError(f"The model path must be a str or os.PathLike, got {type(path).__name__} "
                                   f"{str(path)[:80]!r}.", hint="Pass a model folder, e.g. load('models/my-model').")
    if not path.strip():
        raise InvalidArgumentError("The model path is empty.",
                                   hint="Pass a model folder, or omit it (None) for the default model.")


def resolve_model_path(path: str | os.PathLike | None) -> Path:
    """``path`` itself, or for None ``$EDGELM_MODEL`` / the shipped default model, which must exist.

    A ``.gguf`` file is exported once into edgelm's cache (:func:`edgelm.hub.resolve_gguf`) and loaded from there.
    A string ``org/name`` that is not a local path is a model by name: edgelm's cache, else a download or a
    first-use export into it (:func:`edgelm.hub.resolve`; a local folder of that name wins, and so does a local
    folder ``org``: then the name is a mistyped path, and the error says no model folder is there)."""
    if path is not None:
        _check_path_argument(path)
        local = Path(path).expanduser()
        if local.is_file() and local.suffix.lower() == ".gguf":  # exported once into edgelm's cache, then reused
            from edgelm import hub
            return hub.resolve_gguf(local)
        if isinstance(path, str) and not local.exists():
            from edgelm import hub
            if hub.is_model_name(path):
                # A name whose first part is a folder here ("models/my-mdl", a typo) is a path, never sent to the hub.
                if local.parent.is_dir():
                    raise ModelNotFoundError(
                        f"No model folder at {local}.", hint=f"{local.parent} is a folder here, so {path} was read "
                        f"as a path, not as a Hugging Face model name (for that, run from another directory).")
                return hub.resolve(path)
        return local
    default = _default_model_path()
    if not default.is_dir():
        via = f"${ENV_MODEL}" if os.environ.get(ENV_MODEL) else "The default model"
        raise ModelNotFoundError(f"{via} folder is not there ({default}).",
                                 hint=f"Pass a model folder (--model DIR / load(path)), set {ENV_MODEL}, or build one "
                                      "with `edgelm export SRC --out DIR`.")
    return default


def load(path: str | os.PathLike | None = None, *, threads: int | None = None, spin: bool | None = None,
         verify: bool = True) -> "Model":
    """Open a model folder (or a model by name, ``org/name``) and return a ready :class:`Model`.

    ``path`` None means ``$EDGELM_MODEL`` if set, else the shipped default model. ``threads`` defaults to one
    per physical core, or 1 for a small model (see :func:`default_threads`). ``spin``: whether onnxruntime's
    worker threads spin-wait (faster on idle cores, much slower on busy ones); None decides from the machine's
    load, see :func:`default_spin`. ``verify`` checks every file's sha256 against the manifest first (raises
    :class:`~edgelm.errors.ChecksumError` naming the file). ``path`` may also be a Hugging Face name ``org/name``
    (edgelm.hub): the only case that can reach the network, and only when the name is not cached yet.
    """
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise InvalidArgumentError(f"threads must be a positive int, got {threads!r}.",
                                   hint="Omit it for the default: 1 thread below 64 MiB of weights, else one per physical core.")
    if spin is not None and not isinstance(spin, bool):
        raise InvalidArgumentError(f"spin must be True, False or None, got {spin!r}.",
                                   hint="Omit it to decide from the machine's load.")
    folder = open_folder(resolve_model_path(path), verify=verify)
    return Model(folder, threads=threads, spin=spin)


# Upper bounds on config.json's sizes: far above any model edgelm runs (vocabularies reach ~260k, contexts ~1M),
# low enough that a corrupt or hostile config cannot make load() allocate without limit before the graph is checked.
MAX_CONFIG_VALUE = 1 << 24


def _config_int(config: dict[str, Any], key: str, path: Path, maximum: int = MAX_CONFIG_VALUE) -> int:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= maximum:
        raise ModelFormatError(f"{path / 'config.json'} has no valid {key!r} (got {str(value)[:80]!r}; expected an "
                               f"int from 0 to {maximum:,}).", hint="Re-export the model folder with `edgelm export`.")
    return value


def _token_ids(config: dict[str, Any], path: Path, vocab_size: int) -> tuple[int | None, list[int]]:
    """config.json's bos_token_id (an id or null) and eos_token_ids (an id or a list of ids), checked."""
    def ok(i: Any) -> bool:
        return isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab_size

    bos = config.get("bos_token_id")
    eos = config.get("eos_token_ids", [])
    eos = [eos] if isinstance(eos, int) and not isinstance(eos, bool) else eos
    if (bos is not None and not ok(bos)) or not isinstance(eos, list) or not all(ok(i) for i in eos):
        raise ModelFormatError(f"{path / 'config.json'} has invalid bos_token_id / eos_token_ids "
                               f"({str(bos)[:40]!r} / {str(eos)[:80]!r}; expected ids below the vocabulary size "
                               f"{vocab_size}).", hint="Re-export the model folder with `edgelm export`.")
    return bos, eos


def fp32_activations(config: dict[str, Any], manifest: dict[str, Any]) -> bool:
    """Whether no kernel of the folder's graph rounds activations per call: an fp32 export, or ``int4-fp32``
    (MatMulNBits at accuracy level 0, no int8 GEMM; its tied head ranks with int8 activations rounded per row and
    block, which a call's other rows do not change, and rescores its best tokens in fp32). Then a multi-token call's
    rows are a one-token step's up to fp32 summation order, so prompt lookup may time its calls to decide when to
    draft without that changing the answer (edgelm.lookup). Unknown formats count as False."""
    if config.get("dtype") == "float32":  # (fp16 graphs: not measured, so not assumed)
        return True
    quant = manifest.get("quantization")
    return isinstance(quant, dict) and quant.get("accuracy_level") == 0 and not quant.get("gemm_matmuls")


class GenerateOptions(TypedDict, total=False):
    """The keyword options of :meth:`Model.generate`, for the signatures of stream / chat / chat_stream (editors
    and type checkers show them); the meaning of each is in generate's docstring."""
    max_new_tokens: int | None
    temperature: float | None
    top_k: int | None
    top_p: float | None
    min_p: float | None
    repetition_penalty: float | None
    stop: str | list[str] | None
    seed: int | None
    truncate: str | None
    ignore_eos: bool
    lookup: bool


# The options generate / stream / chat / chat_stream take (generate's keyword parameters), and the names other
# libraries use for them: an unknown option is refused naming the method the caller called, not an internal one.
GENERATE_OPTIONS = tuple(GenerateOptions.__annotations__)
_OPTION_ALIASES = {"max_tokens": "max_new_tokens", "max_length": "max_new_tokens", "max_completion_tokens":
                   "max_new_tokens", "n_predict": "max_new_tokens", "stop_sequences": "stop", "random_seed": "seed",
                   "repeat_penalty": "repetition_penalty"}


def check_options(kwargs: dict[str, Any], method: str) -> None:
    """Raise InvalidArgumentError for a keyword ``method`` (e.g. "Model.chat") does not take."""
    import difflib

    for name in kwargs:
        if name not in GENERATE_OPTIONS:
            guess = _OPTION_ALIASES.get(name) or next(iter(difflib.get_close_matches(name, GENERATE_OPTIONS, 1)), None)
            raise InvalidArgumentError(f"{method}() got an unexpected option {name!r}.",
                                       hint=(f"Did you mean {guess}? " if guess else "") +
                                            f"It takes {', '.join(GENERATE_OPTIONS)}.")


def fit_messages(model: "Model", messages: list[dict[str, Any]], max_new_tokens: int | None,
                 render: Any = None) -> tuple[list[dict[str, Any]], int]:
    """``messages`` cut to fit the context with room for ``max_new_tokens``: the oldest exchanges go first (never
    a leading system message or the newest message, and never leaving a reply whose question is gone), then the
    start of the newest message's text. Returns the messages and how many of the newest message's tokens went.

    The rendered prompt is never cut itself: from the left that would drop the system message and the template's
    own header first. ``render(messages) -> str`` renders as the call will (default: the chat template). Raises
    ContextLengthError when the template and system message leave no room for any of the newest message (or it
    is not plain text that could be shortened)."""
    render = render or model.apply_chat_template
    new = max_new_tokens or model.generation_config.get("max_new_tokens") or 128
    budget, ctx = model.context_length - new, model.context_length

    def size(conversation: list[dict[str, Any]]) -> int:
        return len(model.encode(render(conversation)))

    system = [m for m in messages[:1] if isinstance(m, dict) and m.get("role") == "system"]
    turns = list(messages[len(system):])
    while len(turns) > 1 and size(system + turns) > budget:
        turns = turns[1:]
        while len(turns) > 1 and turns[0].get("role") != "user":  # never start on a reply whose question went
            turns = turns[1:]
    if not turns or size(system + turns) <= budget:
        return system + turns, 0
    last = turns[-1]
    text = last.get("content")

    def keeping(k: int) -> list[dict[str, Any]]:
        return system + [dict(last, content=model.tokenizer.decode(ids[len(ids) - k:]) if k else "")]

    ids = model.encode(text, add_bos=False) if isinstance(text, str) else []
    floor = size(keeping(0)) if ids else size(system + turns)
    if not ids or floor > budget:
        what = "the chat template and system message" if system else "the chat template"
        raise ContextLengthError(
            f"{what} take {floor} tokens and max_new_tokens is {new}: no room for the last message in the model's "
            f"context of {ctx} tokens." if ids else
            f"The last message alone takes {floor} tokens with max_new_tokens {new} in a context of {ctx}, and it is "
            f"not plain text that could be shortened.",
            hint="Lower max_new_tokens" + (" or shorten the system message." if system else "."),
            prompt_tokens=floor, max_new_tokens=new, context_length=ctx)
    lo, hi = 0, len(ids)  # keeping(lo) fits, keeping(hi) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if size(keeping(mid)) <= budget else (lo, mid)
    return keeping(lo), len(ids) - lo


class Model:
    """A loaded model. Create with :func:`edgelm.load`. Safe to share between threads (no per-call state)."""

    def __init__(self, folder: ModelFolder, *, threads: int | None = None, spin: bool | None = None) -> None:
        import numpy as np
        import onnxruntime as ort

        # numpy.random is NOT imported here: it costs 6 MB of resident memory, and greedy decoding and scoring never
        # need it. The first sampled generation imports it (~8 ms, once per process; edgelm.sampling.Sampler).
        import edgelm.sampling  # noqa: F401  (the decode loop imports it: not on the first request's clock)
        from edgelm.tokenizer import ChatTemplate, Tokenizer

        check_onnxruntime(folder, ort.__version__)  # before anything is built: an older kernel loads but differs
        self.folder = folder
        self.path: Path = folder.path
        self.config: dict[str, Any] = folder.config
        self.generation_config: dict[str, Any] = folder.generation_config
        cfg = self.config
        self.num_layers = _config_int(cfg, "num_layers", self.path)
        self.context_length: int = _config_int(cfg, "context_length", self.path)
        self.vocab_size: int = _config_int(cfg, "vocab_size", self.path)
        bos, eos = _token_ids(cfg, self.path, self.vocab_size)
        self.tokenizer: Tokenizer = Tokenizer(folder.tokenizer_path, bos_token_id=bos,
                                              eos_token_ids=eos, add_bos_token=cfg.get("add_bos_token"),
                                              tokenizer_config=folder.tokenizer_config)
        self.eos_token_ids = frozenset(self.tokenizer.eos_token_ids)
        self.chat_template: ChatTemplate = ChatTemplate.from_tokenizer_config(
            folder.tokenizer_config, bos_token=self.tokenizer.bos_token, eos_token=self.tokenizer.eos_token,
            name=f"{self.path / 'tokenizer_config.json'}'s chat_template")
        if threads is None:
            onnx_path = folder.onnx_path
            size = sum(p.stat().st_size for p in onnx_path.parent.glob(onnx_path.name + "*") if p.is_file())
            threads = default_threads(size)
        self.threads = threads
        self.spin: bool = default_spin(threads) if spin is None else spin
        # Prompt lookup gives exactly plain greedy decoding's tokens here (no activation rounded per call), so it may
        # time its calls, and a server may turn it on by itself (edgelm.server, lookup="auto").
        self.lookup_exact: bool = fp32_activations(cfg, folder.manifest)

        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3  # warnings about unused initializers etc. are noise for users
        # Spin-waiting workers: see default_spin for when it pays and when it costs 5x.
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spin else "0")
        try:
            self._session = ort.InferenceSession(str(folder.onnx_path), sess_options=so,
                                                 providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for corrupt/unsupported graphs
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelFormatError(f"onnxruntime cannot load {folder.onnx_path}: {first}",
                                   hint="The graph is corrupt or from an incompatible exporter; re-export the model "
                                        "(or load with verify=True to check its checksums).") from None

        inputs = {i.name: i for i in self._session.get_inputs()}
        if self.num_layers > len(inputs):
            raise ModelFormatError(f"{self.path / 'config.json'} says {self.num_layers} layers, but {folder.onnx_path} "
                                   f"has only {len(inputs)} inputs.", hint="Re-export the model folder.")
        self._past_names = [f"past_key_values.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]
        missing = [n for n in ["input_ids", *self._past_names] if n not in inputs]
        if missing:
            raise ModelFormatError(f"{folder.onnx_path} lacks the inputs {missing[:4]} that config.json promises "
                                   f"({self.num_layers} layers).", hint="Re-export the model folder.")
        # The cache layout (docs/model-format.md): "concat" feeds each step's present.* back as the next past.*;
        # "shared" binds one preallocated buffer per layer as both past and present (see _SharedCache).
        self.kv_cache = (cfg.get("onnx") or {}).get("kv_cache", "concat")
        if self.kv_cache not in ("concat", "shared"):
            raise ModelFormatError(f"{self.path / 'config.json'} names an unknown onnx.kv_cache {self.kv_cache!r} "
                                   "(this edgelm knows 'concat' and 'shared').",
                                   hint="Upgrade edgelm, or re-export the model folder with this version.")
        if self.kv_cache == "shared" and "attention_mask" not in inputs:
            raise ModelFormatError(f"{folder.onnx_path} has a 'shared' cache but no attention_mask input.",
                                   hint="Re-export the model folder.")
        self._kv_pool: list[Any] = []  # idle _SharedCache buffers, reused by the next generation
        self.kv_pool_max: int = KV_POOL_MAX  # at most this many idle sets are kept (see KV_POOL_MAX)
        self._has_mask = "attention_mask" in inputs
        self._has_pos = "position_ids" in inputs
        self._output_names = ["logits"] + [n.replace("past_key_values.", "present.") for n in self._past_names]
        outputs = {o.name for o in self._session.get_outputs()}
        # The last position's log-softmax (docs/model-format.md): the chosen token's log-probability without a
        # pass over the vocabulary in Python. Older folders lack it; the sampler then computes it.
        self._has_lp = "last_logprobs" in outputs
        if self._has_lp:
            self._output_names.append("last_logprobs")
        if not set(self._output_names) <= outputs:
            raise ModelFormatError(f"{folder.onnx_path} lacks the outputs logits/present.* of docs/model-format.md.",
                                   hint="Re-export the model folder.")
        # Calling the C session with C-level values skips the wrapper's per-call checks and one Python object per
        # output per step. Fall back to the public API if a future onnxruntime renames these internals.
        c_sess = getattr(self._session, "_sess", None)
        probe = ort.OrtValue.ortvalue_from_numpy(np.zeros(1, np.int64))
        self._raw = c_sess is not None and hasattr(c_sess, "run_with_ort_values") and hasattr(probe, "_ortvalue")
        self._OrtValue = ort.OrtValue
        names = self._output_names
        if self._raw:
            self._run_fn = lambda feed: c_sess.run_with_ort_values(feed, names, None)
            self._run_bound = lambda binding: c_sess.run_with_iobinding(binding, None)
        else:
            session = self._session
            self._run_fn = lambda feed: session.run_with_ort_values(names, feed)
            self._run_bound = session.run_with_iobinding
        # Graphs since the logits_from input (docs/model-format.md) compute a generation's prefill logits for the
        # last prompt position only; older folders compute them for every position, which is only slower.
        optional = {i.name for i in self._session.get_overridable_initializers()}
        self._last_only: Any = None
        if "logits_from" in optional or "logits_from" in inputs:
            self._minus_one = np.full(1, -1, dtype=np.int64)  # owned here: the values below read them
            self._last_only = self._value(self._minus_one)
            self._zero = np.zeros(1, dtype=np.int64)
            self._all_rows = self._value(self._zero)  # logits for every new position (lookup's verification)
        # Zero-length caches for a prefill, in the graph's own dtype and head layout; made once and shared.
        # (A "shared" graph accepts them too: with separate past and present it behaves like "concat", which is
        # what score() and the warm-up use.)
        self._empty_arrays = []
        self._empty_feed: dict[str, Any] = {}
        self._kv_shapes: list[tuple[tuple[int, ...], Any]] = []
        for name in self._past_names:
            shape = inputs[name].shape
            kv_heads = _config_int(cfg, "num_kv_heads", self.path) if not isinstance(shape[1], int) else shape[1]
            head_dim = _config_int(cfg, "head_dim", self.path) if not isinstance(shape[3], int) else shape[3]
            dtype = np.float16 if "float16" in inputs[name].type else np.float32
            self._kv_shapes.append(((1, kv_heads, self.context_length, head_dim), dtype))
            arr = np.zeros((1, kv_heads, 0, head_dim), dtype)
            self._empty_arrays.append(arr)  # owned here: the values below read it
            self._empty_feed[name] = self._value(arr)
        # A preallocated all-ones mask; each step feeds a view of its first `past + 1` columns (see _mask).
        self._ones = np.ones((1, self.context_length), dtype=np.int64)
        self._mask_cache: list[Any] = [None] * (self.context_length + 1)
        # onnxruntime does one-time work (kernel setup, the memory arena) on the first run: ~10 ms even for a tiny
        # model. Pay it here, so the first request's time to first token is like every later one's.
        warm_ids = np.zeros((1, 1), dtype=np.int64)
        warm_pos = np.zeros((1, 1), dtype=np.int64)
        try:
            self._run_fn(self._prefill_feed(warm_ids, warm_pos))
            if self.kv_cache == "shared":  # the same for the bound path; its buffers wait in the pool
                cache = _SharedCache(self)
                cache.prefill(warm_ids)
                self._kv_pool.append(cache)
        except Exception as exc:  # a graph that loads but cannot run one token is unusable
            raise ModelFormatError(f"{folder.onnx_path} loads but fails on a one-token input: "
                                   f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}",
                                   hint="Re-export the model folder.") from None

    def __repr__(self) -> str:
        return (f"Model({str(self.path)!r}, {self.config.get('model_type')}, {self.num_layers} layers, "
                f"context {self.context_length}, {self.config.get('dtype')}, threads={self.threads}, "
                f"spin={self.spin})")

    # --- argument handling (everything is checked before any work) ---------------------------------------
    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """The token ids of ``text``, as generate() reads a text prompt (with the model's BOS first when
        ``add_bos`` and the model's tokenizer adds one)."""
        return self.tokenizer.encode(text, add_bos=add_bos)

    def _prompt_ids(self, prompt: Any) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidArgumentError("prompt is empty.", hint="Pass some text (or token ids) to continue.")
            return self.tokenizer.encode(prompt, add_bos=True)
        if getattr(prompt, "ndim", None) == 1 and hasattr(prompt, "tolist"):  # a 1-D numpy array of ids
            prompt = prompt.tolist()
        if isinstance(prompt, (list, tuple)):
            if not prompt:
                raise InvalidArgumentError("prompt is an empty list of token ids.", hint="Pass at least one token id.")
            ids = []
            for t in prompt:
                if isinstance(t, bool) or not isinstance(t, int) and not hasattr(t, "__index__"):
                    raise InvalidArgumentError(f"prompt token ids must be ints, got {type(t).__name__} {t!r}.",
                                               hint="Pass a str or a list of int token ids.")
                t = int(t)
                if not 0 <= t < self.vocab_size:
                    raise InvalidArgumentError(f"prompt token id {t} is outside the vocabulary "
                                               f"(0..{self.vocab_size - 1}).",
                                               hint="Use ids produced by this model's tokenizer.")
                ids.append(t)
            return ids
        raise InvalidArgumentError(f"prompt must be a str or a list of token ids, got {type(prompt).__name__}.",
                                   hint="Pass a str or a list of int token ids.")

    def _prepare(self, prompt: Any, *, max_new_tokens: Any = None, temperature: Any = None, top_k: Any = None,
                 top_p: Any = None, min_p: Any = None, repetition_penalty: Any = None, stop: Any = None,
                 seed: Any = None, truncate: Any = None, ignore_eos: bool = False, lookup: bool = False) -> _Request:
        from edgelm.sampling import resolve_settings, validate_max_new_tokens
        from edgelm.tokenizer import validate_stop

        gen = self.generation_config
        implicit = max_new_tokens is None
        if implicit:
            max_new_tokens = gen.get("max_new_tokens") or 128
        max_new = validate_max_new_tokens(max_new_tokens)
        settings = resolve_settings(gen, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                    repetition_penalty=repetition_penalty, seed=seed)
        stops = validate_stop(stop)
        if truncate not in (None, "left"):
            raise InvalidArgumentError(f"truncate must be None or 'left', got {truncate!r}.",
                                       hint="Use truncate='left' to drop the start of a prompt that is too long.")
        if not isinstance(ignore_eos, bool):
            raise InvalidArgumentError(f"ignore_eos must be a bool, got {ignore_eos!r}.", hint="Pass True or False.")
        if not isinstance(lookup, bool):
            raise InvalidArgumentError(f"lookup must be a bool, got {type(lookup).__name__} {lookup!r}.",
                                       hint="Pass True to verify prompt-lookup drafts (greedy only), or False.")
        ids = self._prompt_ids(prompt)
        ctx = self.context_length
        if implicit and len(ids) < ctx:
            # A default the caller never asked for is capped to the room left; an explicit value is not.
            max_new = min(max_new, ctx - len(ids))
        if len(ids) + max_new > ctx:
            if truncate != "left" or max_new >= ctx:
                # With no max_new_tokens given, only the prompt is too long: say so, not a limit never set.
                said = (f"the model's context holds {ctx} tokens, so no new token fits (max_new_tokens was not "
                        f"given)" if implicit else
                        f"max_new_tokens is {max_new}: {len(ids) + max_new} > the model's context of {ctx} tokens")
                raise ContextLengthError(
                    f"The prompt has {len(ids)} tokens and {said}.",
                    hint=("Shorten the prompt" + (", or pass truncate='left' to drop its start." if implicit else
                          ", lower max_new_tokens" + (", or pass truncate='left' to drop the start of the prompt."
                                                      if max_new < ctx else "."))),
                    prompt_tokens=len(ids), max_new_tokens=max_new, context_length=ctx,
                    max_new_tokens_given=not implicit)
            keep = ctx - max_new
            # Drop from the left but keep a leading BOS: the model was trained with it in slot 0.
            bos = self.tokenizer.bos_token_id
            if bos is not None and ids[0] == bos and keep > 1:
                ids = [bos] + ids[len(ids) - keep + 1:]
            else:
                ids = ids[len(ids) - keep:]
        # Prompt lookup only for greedy decoding (see edgelm.lookup); with sampling the flag is ignored.
        return _Request(ids, max_new, settings, stops, ignore_eos, lookup and settings.greedy)

    # --- public API ---------------------------------------------------------------------------------------
    def generate(self, prompt: str | list[int], *, max_new_tokens: int | None = None, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
                 repetition_penalty: float | None = None, stop: str | list[str] | None = None,
                 seed: int | None = None, truncate: str | None = None, ignore_eos: bool = False,
                 lookup: bool = False) -> Generation:
        """Continue ``prompt`` (text, or token ids used as-is) and return a :class:`Generation`.

        ``None`` sampling values take generation_config.json's defaults; ``temperature=0`` is greedy. Stops at
        an EOS token (unless ``ignore_eos``), at the first ``stop`` string (not included in the text), or after
        ``max_new_tokens``. ``lookup=True`` (greedy only, ignored when sampling) verifies drafts copied from
        the prompt and output so far, several tokens per model call (edgelm.lookup, docs/lookup.md); the result's
        ``drafted_tokens`` / ``accepted_tokens`` count them. Raises InvalidArgumentError / ContextLengthError before
        doing any work.
        """
        req = self._prepare(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                            top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty, stop=stop, seed=seed,
                            truncate=truncate, ignore_eos=ignore_eos, lookup=lookup)
        it = self._run(req)
        try:
            while True:
                next(it)
        except StopIteration as done:
            return done.value

    def stream(self, prompt: str | list[int], **kwargs: Unpack[GenerateOptions]) -> TextStream:
        """Like :meth:`generate` but yields text pieces as they are decoded (joined, they equal generate's text
        for the same seed). Arguments are checked now, before the first piece is asked for."""
        check_options(kwargs, "Model.stream")
        return TextStream(self._run(self._prepare(prompt, **kwargs)))

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, *,
                            tools: list[dict[str, Any]] | None = None, documents: list[dict[str, Any]] | None = None,
                            **template_kwargs: Any) -> str:
        """The prompt text for ``messages`` (the model's chat template, or the plain fallback in docs/runtime.md).

        ``tools`` (JSON-schema dicts), ``documents`` and any other variable the template reads (``date_string``,
        ``enable_thinking``, ...) are passed to it as transformers' ``apply_chat_template`` passes them. A model
        with named templates renders its ``tool_use`` one when ``tools`` is given (not None), else ``default``.
        """
        return self.chat_template.render(messages, add_generation_prompt=add_generation_prompt, tools=tools,
                                         documents=documents, **template_kwargs)

    def chat(self, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None = None,
             documents: list[dict[str, Any]] | None = None, chat_template_kwargs: dict[str, Any] | None = None,
             **kwargs: Unpack[GenerateOptions]) -> Generation:
        """Reply to ``messages`` (``[{"role": "user", "content": "..."}]``); same options as :meth:`generate`.

        ``tools``, ``documents`` and ``chat_template_kwargs`` (extra template variables) go to the chat template,
        see :meth:`apply_chat_template`. With the plain fallback template (no chat template in the model),
        generation always stops at a new ``"\nUser:"`` line (the fallback's next-turn marker, left out of the
        text), so the model does not write the user's next turn: the caller's ``stop`` strings are added to it,
        never replace it, and it does not count against the limit on their number.
        """
        check_options(kwargs, "Model.chat")
        prompt = self._chat_prompt(messages, tools, documents, chat_template_kwargs, kwargs)  # may take "truncate"
        return self.generate(prompt, **self._chat_kwargs(kwargs))

    def chat_stream(self, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None = None,
                    documents: list[dict[str, Any]] | None = None, chat_template_kwargs: dict[str, Any] | None = None,
                    **kwargs: Unpack[GenerateOptions]) -> TextStream:
        """Streaming :meth:`chat`."""
        check_options(kwargs, "Model.chat_stream")
        prompt = self._chat_prompt(messages, tools, documents, chat_template_kwargs, kwargs)  # may take "truncate"
        return self.stream(prompt, **self._chat_kwargs(kwargs))

    def _chat_prompt(self, messages: Any, tools: Any, documents: Any, template_kwargs: Any,
                     options: dict[str, Any] | None = None) -> str:
        """The rendered prompt. With ``truncate="left"`` in ``options`` the *messages* are fitted to the context
        (:func:`fit_messages`) and the option is dropped from ``options``: cutting the rendered text from the left
        would take the system message and the template's header first."""
        from edgelm.tokenizer import validate_template_kwargs

        extra = validate_template_kwargs(template_kwargs)

        def render(msgs: Any) -> str:
            return self.apply_chat_template(msgs, tools=tools, documents=documents, **extra)

        if options is not None and options.get("truncate") == "left" and isinstance(messages, list) and messages:
            from edgelm.sampling import validate_max_new_tokens

            render(messages)  # the messages' own errors first, as without truncate
            if options.get("max_new_tokens") is not None:
                validate_max_new_tokens(options["max_new_tokens"])
            messages, _ = fit_messages(self, messages, options.get("max_new_tokens"), render)
            del options["truncate"]
        return render(messages)

    def _chat_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        from edgelm.tokenizer import with_turn_stops

        return with_turn_stops(kwargs, self.chat_template)

    # --- the decode loop ----------------------------------------------------------------------------------
    def _value(self, array: "np.ndarray") -> Any:
        """An onnxruntime value reading ``array``'s memory (no copy).

        On the fast path this is the C-level value, which does NOT keep ``array`` alive (only the Python
        ``OrtValue`` wrapper does): the caller must hold a reference to ``array`` until ``run`` has returned.
        """
        v = self._OrtValue.ortvalue_from_numpy(array)
        return v._ortvalue if self._raw else v

    def _mask(self, n: int) -> Any:
        """The all-ones attention mask of length ``n`` as an onnxruntime value, made once per length and kept:
        it views ``self._ones``, which lives as long as the model, so the decode loop allocates nothing here."""
        v = self._mask_cache[n]
        if v is None:
            v = self._mask_cache[n] = self._value(self._ones[:, :n])
        return v

    def _prefill_feed(self, ids_arr: "np.ndarray", pos_arr: "np.ndarray", last_only: bool = False
                      ) -> dict[str, Any]:
        """Inputs for a call over ``ids_arr`` with empty caches. Keep both arrays referenced until it has run.
        ``last_only``: logits for the last position only, where the graph can (else for every position)."""
        feed = dict(self._empty_feed)
        feed["input_ids"] = self._value(ids_arr)
        if self._has_pos:
            feed["position_ids"] = self._value(pos_arr)
        if self._has_mask:
            feed["attention_mask"] = self._mask(ids_arr.shape[1])
        if last_only and self._last_only is not None:
            feed["logits_from"] = self._last_only
        return feed

    def _shared_cache(self) -> "_SharedCache":
        """Buffers for one generation on a "shared" graph: an idle set from the pool, or a new one."""
        try:
            return self._kv_pool.pop()
        except IndexError:
            return _SharedCache(self)

    def _prefill(self, prefill_ids: "np.ndarray") -> tuple:
        """Run the prompt ``prefill_ids`` [1, S]: (the steps object whose ``advance`` runs decode steps, the
        pooled buffers to give back with :meth:`_release` or None, the last position's (logits, logprobs))."""
        if self.kv_cache == "shared":
            cache = self._shared_cache()
            return cache, cache, cache.prefill(prefill_ids)
        steps = _ConcatCache(self, prefill_ids)
        return steps, None, steps.first

    def _release(self, cache: "_SharedCache | None") -> None:
        """A generation's buffers back to the pool, unless it is full (then they are freed with their owner)."""
        if cache is not None and len(self._kv_pool) < self.kv_pool_max:
            self._kv_pool.append(cache)

    def _run(self, req: _Request) -> Iterator[str]:
        """Generator of text pieces; returns (StopIteration.value) the Generation."""
        import numpy as np

        from edgelm.sampling import Sampler
        from edgelm.tokenizer import StopMatcher, StreamingDetokenizer

        t_start = time.perf_counter()
        prompt = req.prompt_ids
        n_prompt = len(prompt)
        sampler = Sampler(req.settings, self.vocab_size, seen=prompt)
        detok = StreamingDetokenizer(self.tokenizer, prompt)
        matcher = StopMatcher(req.stops)
        eos = frozenset() if req.ignore_eos else self.eos_token_ids

        # Prefill: the whole prompt in one call (the ids array is a local of this generator, so it outlives every
        # call that reads it). Then `advance(tok, pos)` runs one decode step. Both return the last position's
        # (logits, log-probabilities or None).
        prefill_ids = np.asarray([prompt], dtype=np.int64)
        steps, cache, first = self._prefill(prefill_ids)
        advance = steps.advance
        lookup = None
        if req.lookup:  # greedy only (_prepare): verify drafts, several tokens per call (edgelm.lookup)
            from edgelm.lookup import LookupAdvance

            # The last generated token is never fed, so fed tokens take slots up to n_prompt + max_new - 2.
            advance = lookup = LookupAdvance(steps, prompt, min(n_prompt + req.max_new_tokens - 2,
                                                                self.context_length - 1),
                                             measured=self.lookup_exact)
        try:
            gen = yield from self._decode(req, n_prompt, sampler, detok, matcher, eos, t_start, first, advance)
        finally:
            # Back to the pool (also when the caller closes the stream early), unless it is full: then the buffers
            # are freed with this generator.
            self._release(cache)
        if lookup is not None:
            gen.drafted_tokens, gen.accepted_tokens = lookup.drafted, lookup.accepted
        return gen

    def _decode(self, req: _Request, n_prompt: int, sampler: Any, detok: Any, matcher: Any, eos: frozenset,
                t_start: float, first: tuple, advance: Any) -> Iterator[str]:
        """The token loop shared by both cache layouts; returns the Generation."""
        logits, lps = first
        step = sampler.step
        tokens: list[int] = []
        logprobs: list[float] = []
        text_parts: list[str] = []
        finish = "length"
        t_first = 0.0
        max_new = req.max_new_tokens
        while True:
            tok, lp = step(logits, lps)
            logprobs.append(lp)
            tokens.append(tok)
            if not t_first:
                t_first = time.perf_counter()
            if tok in eos:
                finish = "eos"
                break
            sampler.observe(tok)
            piece = detok.push(tok)
            if piece:
                safe, stopped = matcher.feed(piece)
                if safe:
                    text_parts.append(safe)
                    yield safe
                if stopped:
                    finish = "stop"
                    break
            if len(tokens) >= max_new:
                break
            # One decode step: the new token at slot n_prompt + len(tokens) - 1.
            logits, lps = advance(tok, n_prompt + len(tokens) - 1)

        if finish != "stop":
            safe, stopped = matcher.feed(detok.flush())
            tail = safe if stopped else safe + matcher.flush()
            if stopped:
                finish = "stop"
            if tail:
                text_parts.append(tail)
                yield tail
        t_end = time.perf_counter()
        n = len(tokens)
        decode_s = t_end - t_first
        return Generation(
            text="".join(text_parts), token_ids=tokens, finish_reason=finish, prompt_tokens=n_prompt,
            completion_tokens=n, time_to_first_token_s=t_first - t_start,
            decode_tokens_per_s=(n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0,
            total_time_s=t_end - t_start, logprobs=logprobs)

    # --- scoring ------------------------------------------------------------------------------------------
    def _logits(self, ids: Sequence[int]) -> "np.ndarray":
        """Logits ``[len(ids), vocab]`` of one prefill call over ``ids`` (no cache)."""
        import numpy as np

        ids_arr = np.asarray([ids], dtype=np.int64)  # both referenced until run() returns (see _value)
        pos_arr = np.arange(len(ids), dtype=np.int64)[None, :]
        outs = self._run_fn(self._prefill_feed(ids_arr, pos_arr))
        # Copy while `outs` is alive: the numpy view shares onnxruntime's output buffer.
        return np.array(outs[0].numpy()[0], copy=True)

    def _target_logprobs(self, ids: Sequence[int], skip: int) -> "np.ndarray":
        """log p(ids[j+1] | ids[:j+1]) for j >= skip (float64): from calls of at most SCORE_CALL_ROWS tokens over
        the cache where it stays in place ("shared"; one call's logits in memory), else from one call over ``ids``.

        Works through the logits in blocks of rows, reading onnxruntime's output buffer in place, so a long
        window with a large vocabulary never needs a second full-size (or float64) copy of the logits.
        """
        import numpy as np

        ids_arr = np.asarray([ids], dtype=np.int64)  # both referenced until run() returns (see _value)
        out = np.empty(len(ids) - 1 - skip, dtype=np.float64)
        if self.kv_cache == "shared" and len(ids) > SCORE_CALL_ROWS:
            cache = self._shared_cache()
            try:
                cache.score_rows(ids_arr[:, :-1], skip, lambda a, logits: _logprobs_into(
                    logits, ids_arr[0, a + 1:a + 1 + len(logits)], out, a - skip))
            finally:
                self._release(cache)
            return out
        pos_arr = np.arange(len(ids), dtype=np.int64)[None, :]
        outs = self._run_fn(self._prefill_feed(ids_arr, pos_arr))
        logits = outs[0].numpy()[0]  # a view: `outs` stays alive until this function returns
        _logprobs_into(logits[skip:len(ids) - 1], ids_arr[0, skip + 1:], out, 0)
        return out

    def _forced_logits(self, prompt_ids: Sequence[int], tokens: Sequence[int]) -> Iterator["np.ndarray"]:
        """Teacher forcing for quality checks: the logits [vocab] before each of ``tokens``, the model fed
        ``prompt_ids`` in one prefill and then ``tokens`` one decode step at a time, exactly as generation runs
        (a multi-token call would round int8 activations differently). Each array is a view, valid until the next
        one is taken. The export's quality gate and benchmarks/chat_agreement.py use it to count the steps where a
        quantized model's own greedy choice is the reference's token."""
        import numpy as np

        if len(prompt_ids) + max(len(tokens) - 1, 0) > self.context_length:
            raise ContextLengthError(f"{len(prompt_ids)} prompt tokens + {len(tokens)} forced tokens do not fit the "
                                     f"context of {self.context_length} tokens.", prompt_tokens=len(prompt_ids),
                                     max_new_tokens=len(tokens), context_length=self.context_length,
                                     hint="Force fewer tokens.")
        ids = np.asarray([list(prompt_ids)], dtype=np.int64)
        steps, cache, (logits, _) = self._prefill(ids)
        try:
            for i, tok in enumerate(tokens):
                yield logits
                if i + 1 < len(tokens):
                    logits, _ = steps.advance(int(tok), len(prompt_ids) + i)
        finally:
            self._release(cache)

    def score(self, text: str) -> Score:
        """Log-likelihood of ``text``: tokenized once (BOS at the start only), scored in windows of the context
        length with a stride of half of it, so every token after the first is scored once, each with at least
        half a window of context after the first window. ``bits_per_byte`` matches the exporter's quality gate.

        A window is also at most as many tokens as fit :data:`SCORE_LOGITS_BYTES` of logits: each call returns
        logits for every position of its window, which for a large vocabulary at full context would be gigabytes
        (Gemma 3: 262,144 entries x 4,096 positions = 4.3 GB); such a model is scored in shorter windows."""
        if not isinstance(text, str):
            raise InvalidArgumentError(f"text must be a str, got {type(text).__name__}.", hint="Pass a str.")
        if not text:
            raise InvalidArgumentError("text is empty.", hint="Pass some text to score.")
        ids = self.tokenizer.encode(text, add_bos=True)
        if len(ids) < 2:
            raise InvalidArgumentError("text is too short to score: it encodes to a single token.",
                                       hint="Pass a longer text.")
        win = max(2, min(self.context_length, SCORE_LOGITS_BYTES // (4 * self.vocab_size)))
        stride = max(1, win // 2)
        total, count = 0.0, 0
        for start in range(0, len(ids) - 1, stride):
            chunk = ids[start:start + win]
            # After the first window only the last `stride` targets are new; the others were scored already.
            skip = 0 if start == 0 else win - stride - 1
            lp = self._target_logprobs(chunk, skip)
            total += float(lp.sum())
            count += len(lp)
            if start + win >= len(ids):
                break
        nbytes = len(text.encode("utf-8"))
        return Score(total_logprob=total, num_tokens=count, num_bytes=nbytes,
                     perplexity=math.exp(-total / count), bits_per_byte=-total / math.log(2) / nbytes,
                     nats_per_token=-total / count)


def _logprobs_into(logits: "np.ndarray", targets: "np.ndarray", out: "np.ndarray", at: int) -> None:
    """out[at + j] = log-softmax(logits[j])[targets[j]] in float64, 256 rows at a time (no full float64 copy)."""
    import numpy as np

    for a in range(0, len(logits), 256):
        rows = logits[a:a + 256].astype(np.float64)
        m = rows.max(axis=1)
        lse = m + np.log(np.exp(rows - m[:, None]).sum(axis=1))
        out[at + a:at + a + len(rows)] = rows[np.arange(len(rows)), targets[a:a + len(rows)]] - lse


class _SharedCache:
    """The key/value buffers of one generation on a "shared" graph, bound once with onnxruntime IO binding.

    Each layer has one [1, Hkv, context, D] buffer bound as both ``past_key_values.{i}.*`` and ``present.{i}.*``;
    the fused attention node writes the new slots in place, so a decode step allocates and copies nothing: only
    the token (written into a bound buffer) and the attention mask (a cached view of the right length, whose
    length tells the graph how many slots are valid) change. Logits land in a preallocated buffer. Buffers are
    zero-filled (lazily, by the OS) once and reused by later generations through the model's pool: slots past
    the mask's length are never read, so stale values from an earlier generation do no harm.
    """

    def __init__(self, model: Model) -> None:
        import numpy as np

        self.model = model
        self.arrays = [np.zeros(shape, dtype) for shape, dtype in model._kv_shapes]  # owned: values view them
        self.values = [model._value(a) for a in self.arrays]
        self.tok = np.zeros((1, 1), dtype=np.int64)
        self.tok_value = model._value(self.tok)
        self.logits = np.empty((1, 1, model.vocab_size), dtype=np.float32)
        self.logits_value = model._value(self.logits)
        self.logprobs = np.empty((1, 1, model.vocab_size), dtype=np.float32) if model._has_lp else None
        self.lp_row = self.logprobs[0, 0] if model._has_lp else None
        io = model._session.io_binding()
        self.binding = io._iobinding if model._raw else io
        for name, value in zip(model._past_names, self.values):
            self.binding.bind_ortvalue_input(name, value)
            self.binding.bind_ortvalue_output(name.replace("past_key_values.", "present."), value)
        if model._has_lp:  # [1, 1, V] at prefill and decode alike: bound once
            self.binding.bind_ortvalue_output("last_logprobs", model._value(self.logprobs))
        self._prefill_arrays: tuple = ()
        self.draft_ids, self._drafts = _draft_buffers(model)

    def prefill(self, ids: "np.ndarray") -> tuple:
        """Run the prompt ``ids`` [1, S] into slots 0..S-1; return the last position's (logits, logprobs or None).
        Then switch the bindings to single-token decode steps."""
        import numpy as np

        m, b = self.model, self.binding
        n = ids.shape[1]
        done = (n - 1) // PREFILL_CALL_ROWS * PREFILL_CALL_ROWS  # the last call holds 1..PREFILL_CALL_ROWS tokens
        if done:  # a long prompt: the calls before the last one only fill the cache
            self.score_rows(ids[:, :done], done, None, PREFILL_CALL_ROWS)
            ids = np.ascontiguousarray(ids[:, done:])
        if m._last_only is not None:  # logits for the last position only, as in every decode step: bound once
            out = self.logits
            b.bind_ortvalue_input("logits_from", m._last_only)
            b.bind_ortvalue_output("logits", self.logits_value)
        else:
            out = np.empty((1, ids.shape[1], m.vocab_size), dtype=np.float32)
            b.bind_ortvalue_output("logits", m._value(out))
        self._prefill_arrays = (ids, out)  # alive until the next prefill: the bound values read them
        b.bind_ortvalue_input("input_ids", m._value(ids))
        b.bind_ortvalue_input("attention_mask", m._mask(n))
        m._run_bound(b)
        b.bind_ortvalue_input("input_ids", self.tok_value)
        b.bind_ortvalue_output("logits", self.logits_value)
        return out[0, -1], self.lp_row

    def advance(self, tok: int, pos: int) -> tuple:
        """One decode step: token ``tok`` at slot ``pos``; returns its (logits, logprobs or None): views, valid
        until the next call."""
        self.tok[0, 0] = tok
        self.binding.bind_ortvalue_input("attention_mask", self.model._mask(pos + 1))
        self.model._run_bound(self.binding)
        return self.logits[0, -1], self.lp_row

    # --- prompt lookup (edgelm.lookup.LookupAdvance drives these) ---
    def verify(self, m: int, pos: int) -> tuple:
        """The ``m`` tokens in ``draft_ids[0, :m]`` at slots ``pos..pos+m-1`` in one call; returns their logits
        ``[m, vocab]`` and the last row's log-probabilities (or None): views valid until the next call."""
        model, b = self.model, self.binding
        ids_value, rows, rows_value = self._drafts.get(m)
        b.bind_ortvalue_input("input_ids", ids_value)
        b.bind_ortvalue_output("logits", rows_value)
        if model._last_only is not None:
            b.bind_ortvalue_input("logits_from", model._all_rows)
        b.bind_ortvalue_input("attention_mask", model._mask(pos + m))
        model._run_bound(b)
        return rows[0], self.lp_row

    def single(self) -> None:
        """Back to :meth:`advance`'s bindings after :meth:`verify`."""
        b = self.binding
        b.bind_ortvalue_input("input_ids", self.tok_value)
        b.bind_ortvalue_output("logits", self.logits_value)
        if self.model._last_only is not None:
            b.bind_ortvalue_input("logits_from", self.model._last_only)

    def rollback(self, pos: int) -> None:
        """Nothing to undo: the mask's length says how many slots are valid, and positions follow from it, so the
        slots of rejected drafts are never read and the next call overwrites them."""

    # --- score() on long windows ---
    def score_rows(self, ids: "np.ndarray", skip: int, take: Any, call_rows: int | None = None) -> None:
        """Run ``ids`` [1, S] into slots 0..S-1 in calls of at most ``call_rows`` (SCORE_CALL_ROWS) tokens; for each
        call that holds rows at or past ``skip``, ``take(first row, logits [rows, vocab])`` with the logits of those
        rows (a view, valid during the call). Calls wholly before ``skip`` only fill the cache (last row's logits
        only, where the graph can). The bindings are left for :meth:`prefill`, which sets all of its own."""
        import numpy as np

        m, b = self.model, self.binding
        n = ids.shape[1]
        step = call_rows or SCORE_CALL_ROWS
        buf = np.empty((1, min(n, step), m.vocab_size), dtype=np.float32) if m._last_only is None or skip < n else None
        for a in range(0, n, step):
            chunk = np.ascontiguousarray(ids[:, a:a + step])  # referenced until run() returns
            rows = chunk.shape[1]
            wanted = a + rows > skip
            if wanted or m._last_only is None:
                out = buf[:, :rows]
                if m._last_only is not None:
                    b.bind_ortvalue_input("logits_from", m._all_rows)
            else:
                out = self.logits
                b.bind_ortvalue_input("logits_from", m._last_only)
            b.bind_ortvalue_input("input_ids", m._value(chunk))
            b.bind_ortvalue_output("logits", m._value(out))
            b.bind_ortvalue_input("attention_mask", m._mask(a + rows))
            m._run_bound(b)
            if wanted:
                first = max(skip - a, 0)
                take(a + first, out[0, first:])


def _draft_buffers(model: Model) -> tuple["np.ndarray", "_DraftValues"]:
    """The ``[1, rows]`` token buffer lookup writes its drafts into, and the per-length values over it."""
    import numpy as np

    from edgelm.lookup import K_MAX

    ids = np.zeros((1, K_MAX + 1), dtype=np.int64)
    return ids, _DraftValues(model, ids)


class _DraftValues:
    """onnxruntime values over the first ``m`` columns of the draft buffers, made on first use per ``m`` and kept
    (like the masks), so a verification allocates nothing after the first of its length. The logits rows buffer
    itself is allocated on the first verification: generations without lookup never pay for it."""

    def __init__(self, model: Model, ids: "np.ndarray") -> None:
        self.model = model
        self.ids = ids
        self.rows: Any = None
        self.cache: list[Any] = [None] * (ids.shape[1] + 1)

    def get(self, m: int) -> tuple:
        """(ids value, logits rows view [1, m, vocab], its value) for ``m`` tokens."""
        entry = self.cache[m]
        if entry is None:
            import numpy as np

            if self.rows is None:
                self.rows = np.empty((1, self.ids.shape[1], self.model.vocab_size), dtype=np.float32)
            rows = self.rows[:, :m]
            entry = self.cache[m] = (self.model._value(self.ids[:, :m]), rows, self.model._value(rows))
        return entry


class _ConcatCache:
    """The "concat" layout's state for one generation: prefill with empty caches, then each step's ``present.*``
    values go straight back in as ``past_key_values.*`` as onnxruntime values (never through numpy).

    The constructor runs the prefill (``first`` holds its last position's (logits, logprobs or None)). The step
    functions are closures over one generation's locals rather than methods: the one-token ``advance`` is the hot
    loop, and cell lookups are cheaper than attribute lookups on ``self``.
    """

    def __init__(self, model: Model, prefill_ids: "np.ndarray") -> None:
        import numpy as np

        run = model._run_fn
        n_prompt = prefill_ids.shape[1]
        prefill_pos = np.arange(n_prompt, dtype=np.int64)[None, :]
        # A long prompt in calls of at most PREFILL_CALL_ROWS tokens, each over the presents of the one before
        # (the shared layout's reason, docs/runtime.md; here each call also concatenates the cache once).
        step = PREFILL_CALL_ROWS
        first = min(n_prompt, step)
        feed = model._prefill_feed(np.ascontiguousarray(prefill_ids[:, :first]), prefill_pos[:, :first],
                                   last_only=True)  # stays for the decode steps
        outs = run(feed)
        past_names = model._past_names
        for a in range(first, n_prompt, step):
            ids_chunk = np.ascontiguousarray(prefill_ids[:, a:a + step])  # referenced until run() returns
            pos_chunk = prefill_pos[:, a:a + step]
            feed["input_ids"] = model._value(ids_chunk)
            if model._has_pos:
                feed["position_ids"] = model._value(pos_chunk)
            if model._has_mask:
                feed["attention_mask"] = model._mask(a + ids_chunk.shape[1])
            for i, name in enumerate(past_names):
                feed[name] = outs[i + 1]
            outs = run(feed)
        # Decode inputs: buffers written in place each step; onnxruntime reads them through the same values.
        tok_buf = np.zeros((1, 1), dtype=np.int64)
        pos_buf = np.zeros((1, 1), dtype=np.int64)
        tok_value = model._value(tok_buf)
        pos_value = model._value(pos_buf)
        feed["input_ids"] = tok_value
        has_pos = model._has_pos
        if has_pos:
            feed["position_ids"] = pos_value
        n_past = len(past_names)
        has_mask = model._has_mask
        mask = model._mask
        # Arrays the feed's values read (see Model._value): alive as long as this object.
        self._keep: list[Any] = [prefill_ids, prefill_pos, tok_buf, pos_buf]
        lp_index = len(model._output_names) - 1 if model._has_lp else 0  # an OrtValueVector takes no negative index

        def last(outs: Any) -> tuple:
            return outs[0].numpy()[0, -1], (outs[lp_index].numpy()[0, -1] if lp_index else None)

        def advance(tok: int, pos: int) -> tuple:
            """One decode step: token ``tok`` at slot ``pos``; returns its (logits, logprobs or None)."""
            nonlocal outs
            tok_buf[0, 0] = tok
            pos_buf[0, 0] = pos
            if has_mask:
                feed["attention_mask"] = mask(pos + 1)
            for i in range(n_past):
                feed[past_names[i]] = outs[i + 1]
            outs = run(feed)
            return last(outs)

        # --- prompt lookup (edgelm.lookup.LookupAdvance drives these) ---
        self.draft_ids, drafts = _draft_buffers(model)
        draft_pos = np.zeros_like(self.draft_ids)
        arange = np.arange(self.draft_ids.shape[1], dtype=np.int64)
        pos_values: list[Any] = [None] * (self.draft_ids.shape[1] + 1)
        self._keep.append(draft_pos)
        length = n_prompt  # slots in the present tensors of the last call (rollback trims to fewer)

        def verify(m: int, pos: int) -> tuple:
            """The ``m`` tokens in ``draft_ids[0, :m]`` at slots ``pos..pos+m-1`` in one call; returns their logits
            ``[m, vocab]`` and the last row's log-probabilities (or None): views valid until the next call."""
            nonlocal outs, length
            feed["input_ids"] = drafts.get(m)[0]
            if has_pos:
                np.add(arange[:m], pos, out=draft_pos[0, :m])
                value = pos_values[m]
                if value is None:
                    value = pos_values[m] = model._value(draft_pos[:, :m])
                feed["position_ids"] = value
            if model._last_only is not None:
                feed["logits_from"] = model._all_rows  # (for one token, 0 and -1 agree: left for advance)
            if has_mask:
                feed["attention_mask"] = mask(pos + m)
            for i in range(n_past):
                feed[past_names[i]] = outs[i + 1]
            outs = run(feed)
            length = pos + m
            return outs[0].numpy()[0], (outs[lp_index].numpy()[0, -1] if lp_index else None)

        def single() -> None:
            """Back to ``advance``'s inputs after ``verify``."""
            feed["input_ids"] = tok_value
            if has_pos:
                feed["position_ids"] = pos_value

        def rollback(pos: int) -> None:
            """Keep only slots ``< pos``: the present tensors of rejected drafts are cut off (one copy of the cache,
            the same order of work as the Concat that every step of this layout already does)."""
            nonlocal outs, length
            if length <= pos:
                return
            arrays = [np.ascontiguousarray(outs[i + 1].numpy()[:, :, :pos]) for i in range(n_past)]
            self._keep[4:] = arrays  # the values below read them until the next call has run
            outs = [None, *(model._value(a) for a in arrays)]
            length = pos

        self.first = last(outs)
        self.advance, self.verify, self.single, self.rollback = advance, verify, single, rollback
