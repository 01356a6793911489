"""Measurements behind ``edgelm bench``: load time, time to first token, prefill and decode speed, memory.

Everything here uses the public runtime API (``edgelm.load`` and ``Model.generate``), so the numbers are what
a user of the library gets, not what a hand-tuned loop could get. Only the standard library, numpy-free code
and the runtime are imported: matplotlib is imported lazily by :func:`plot_result` (the ``[bench]`` extra).

Method (the same one ``benchmarks/compare.py`` applies to every engine):

* the prompt is a fixed list of token ids (``prompt_tokens`` long, BOS first), so tokenizers do not vary it;
* generation is greedy (``temperature=0``) and always produces ``new_tokens`` tokens (``ignore_eos=True``);
* one untimed warm-up generation of the same shape comes first (ONNX Runtime sizes its arenas then);
* ``repeat`` timed generations follow; each reported figure is the median, with the min and max as spread.

Time to first token includes the whole prefill and the choice of the first token; prefill tokens/s is
``prompt_tokens / time_to_first_token_s``; decode tokens/s counts the tokens after the first one over the time
after the first one (the runtime's ``Generation.decode_tokens_per_s``).
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from edgelm.errors import ContextLengthError, InvalidArgumentError

# A fixed, ordinary English passage. Its token ids (repeated as needed) are the benchmark prompt, so every
# run and every engine sees the same ids for the same tokenizer.
PROMPT_TEXT = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the sunshine with her "
    "dog, Max. One day, Lily and Max went to the park to find a big red ball. They looked under the slide, "
    "behind the tree and near the pond, but the ball was not there. Lily felt sad, so her mom gave her a hug "
    "and said they could look again tomorrow. The next morning the sun was warm and the birds were singing. "
)


@dataclass
class Stat:
    """Median and spread of one measured quantity over the timed repeats."""

    median: float
    min: float
    max: float
    values: list[float] = field(default_factory=list)

    @classmethod
    def of(cls, values: Sequence[float]) -> "Stat":
        vals = [float(v) for v in values]
        return cls(statistics.median(vals), min(vals), max(vals), vals)


@dataclass
class BenchResult:
    """What ``edgelm bench`` measured for one model (all times in seconds, sizes in bytes)."""

    model: str
    model_path: str
    dtype: str | None
    model_size_bytes: int
    threads: int | None
    prompt_tokens: int
    new_tokens: int
    repeat: int
    load_s: float
    time_to_first_token_s: Stat
    prefill_tokens_per_s: Stat
    decode_tokens_per_s: Stat
    peak_rss_bytes: int | None
    import_s: float | None = None
    spin: bool | None = None  # whether onnxruntime's workers spin-waited (edgelm.model.default_spin)
    environment: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


# --- small measurements ------------------------------------------------------------------------------
def peak_rss_bytes() -> int | None:
    """This process's peak resident set size so far, in bytes (None where the OS does not say).

    Linux: ``VmHWM`` from ``/proc/self/status``, which belongs to this process's own address space.
    (``ru_maxrss`` is the fallback elsewhere; on Linux it survives ``exec``, so a process started by a
    larger parent would report the parent's peak.) macOS reports ``ru_maxrss`` in bytes, Linux in KiB.
    psutil is deliberately not needed.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)
    except (ImportError, OSError, ValueError):
        return None


def folder_size_bytes(path: str | os.PathLike) -> int:
    """Total size of the files in a model folder (the graph, its weights, the tokenizer, ...)."""
    root = Path(path)
    if root.is_file():
        return root.stat().st_size
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def cold_import_seconds(timeout: float = 60.0) -> float | None:
    """Seconds a fresh interpreter takes to ``import edgelm`` (measured in a subprocess, so it is really cold).

    Returns None when the subprocess fails (for example a frozen application without a usable interpreter).
    """
    code = "import time; t = time.perf_counter(); import edgelm; print(time.perf_counter() - t)"
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                             check=True)
        return float(out.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def prompt_ids(tokenizer: Any, n_tokens: int, bos_token_id: int | None) -> list[int]:
    """The benchmark prompt: ``n_tokens`` ids from :data:`PROMPT_TEXT`, repeated as needed, BOS first."""
    body = list(tokenizer.encode(PROMPT_TEXT, add_bos=False))
    if not body:
        raise InvalidArgumentError("The tokenizer turned the benchmark prompt into no tokens.",
                                   hint="Check the model folder's tokenizer.json.")
    ids: list[int] = [] if bos_token_id is None else [int(bos_token_id)]
    while len(ids) < n_tokens:
        ids.extend(body)
    return ids[:n_tokens]


def _environment(threads: int | None) -> dict[str, Any]:
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
    }
    try:
        import onnxruntime

        env["onnxruntime"] = onnxruntime.__version__
    except ImportError:  # pragma: no cover - the runtime needs it anyway
        pass
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    env["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return env


# --- the benchmark -----------------------------------------------------------------------------------
def _check_args(prompt_tokens: int, new_tokens: int, repeat: int, warmup: int, threads: int | None) -> None:
    for name, value, low in (("prompt_tokens", prompt_tokens, 1), ("new_tokens", new_tokens, 2),
                             ("repeat", repeat, 1), ("warmup", warmup, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise InvalidArgumentError(f"{name} must be an integer >= {low}, got {value!r}.",
                                       hint=f"Pass a {name.replace('_', '-')} of at least {low}.")
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise InvalidArgumentError(f"threads must be a positive integer or None, got {threads!r}.",
                                   hint="Pass --threads 1 or more (or leave it out for edgelm's default).")


def run_bench(model: str | os.PathLike | None = None, *, prompt_tokens: int = 128, new_tokens: int = 128,
              threads: int | None = None, repeat: int = 5, warmup: int = 1, measure_import: bool = True,
              verify: bool = True, spin: bool | None = None) -> BenchResult:
    """Load ``model`` (a model folder; None for the shipped default) and measure it.

    Raises ``InvalidArgumentError`` for bad counts and ``ContextLengthError`` when the prompt plus the new
    tokens do not fit the model's context, both before the timed work starts.
    """
    _check_args(prompt_tokens, new_tokens, repeat, warmup, threads)
    import_s = cold_import_seconds() if measure_import else None

    import edgelm

    t0 = time.perf_counter()
    lm = edgelm.load(model, threads=threads, spin=spin, verify=verify)
    load_s = time.perf_counter() - t0

    context = int(lm.context_length)
    if prompt_tokens + new_tokens > context:
        raise ContextLengthError(
            f"{prompt_tokens} prompt tokens + {new_tokens} new tokens do not fit the model's context of {context}.",
            prompt_tokens=prompt_tokens, max_new_tokens=new_tokens, context_length=context,
            hint="Lower --prompt-tokens or --new-tokens.")
    ids = prompt_ids(lm.tokenizer, prompt_tokens, lm.config.get("bos_token_id"))

    def once():
        g = lm.generate(ids, max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
        if g.completion_tokens != new_tokens:  # the speed figures would not be comparable
            raise InvalidArgumentError(
                f"The model produced {g.completion_tokens} tokens instead of the {new_tokens} asked for.",
                hint="This is a runtime bug: generate(ignore_eos=True) must produce max_new_tokens tokens.")
        return g

    for _ in range(warmup):
        once()
    ttft, prefill, decode = [], [], []
    for _ in range(repeat):
        g = once()
        ttft.append(g.time_to_first_token_s)
        prefill.append(prompt_tokens / g.time_to_first_token_s if g.time_to_first_token_s > 0 else float("inf"))
        decode.append(g.decode_tokens_per_s)

    path = Path(getattr(lm, "path", None) or model or _default_model_path())
    return BenchResult(
        model=path.name,
        model_path=str(path),
        dtype=lm.config.get("dtype"),
        model_size_bytes=folder_size_bytes(path) if path.exists() else 0,
        threads=lm.threads,  # what ran: None picks edgelm.load's default, as `edgelm generate` does
        spin=lm.spin,
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        repeat=repeat,
        load_s=load_s,
        time_to_first_token_s=Stat.of(ttft),
        prefill_tokens_per_s=Stat.of(prefill),
        decode_tokens_per_s=Stat.of(decode),
        peak_rss_bytes=peak_rss_bytes(),
        import_s=import_s,
        environment=_environment(lm.threads),
    )


def _default_model_path() -> Path:
    try:
        from edgelm_models import default_path

        return default_path()
    except ImportError:  # pragma: no cover - edgelm_models ships with edgelm
        return Path("default")


# --- output ------------------------------------------------------------------------------------------
def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / (1 << 20):.1f} MiB"


def _spread(s: Stat, fmt: str) -> str:
    return f"{format(s.median, fmt)}  ({format(s.min, fmt)} .. {format(s.max, fmt)})"


def format_table(r: BenchResult) -> str:
    """A plain two-column table for the terminal (median, then min .. max over the repeats)."""
    rows = [
        ("model", f"{r.model_path}"),
        ("weights", f"{r.dtype or '?'}, {_mib(r.model_size_bytes)} on disk"),
        ("threads", ("onnxruntime default" if r.threads is None else str(r.threads))
         + ("" if r.spin is None else f" (spin-wait {'on' if r.spin else 'off'})")),
        ("prompt / new tokens", f"{r.prompt_tokens} / {r.new_tokens}  (greedy, EOS ignored, {r.repeat} repeat{'s' if r.repeat != 1 else ''})"),
    ]
    if r.import_s is not None:
        rows.append(("import edgelm", f"{r.import_s * 1000:.0f} ms"))
    rows += [
        ("load", f"{r.load_s * 1000:.0f} ms"),
        ("time to first token", _spread(Stat(*(v * 1000 for v in (r.time_to_first_token_s.median,
                                                                   r.time_to_first_token_s.min,
                                                                   r.time_to_first_token_s.max))), ".1f") + " ms"),
        ("prefill", _spread(r.prefill_tokens_per_s, ".0f") + " tokens/s"),
        ("decode", _spread(r.decode_tokens_per_s, ".1f") + " tokens/s"),
        ("peak RSS", _mib(r.peak_rss_bytes)),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def plot_result(r: BenchResult, path: str | os.PathLike) -> Path:
    """Write a PNG: decode tokens/s and time to first token per repeat. Needs matplotlib ([bench] extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError as exc:
        from edgelm.cli import install_hint

        raise InvalidArgumentError("--plot needs matplotlib, which is not installed.",
                                   hint=install_hint("bench")) from exc
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    runs = list(range(1, r.repeat + 1))
    a.bar(runs, r.decode_tokens_per_s.values, color="#4477aa")
    a.axhline(r.decode_tokens_per_s.median, color="k", lw=1, ls="--", label="median")
    a.set(title="decode", xlabel="repeat", ylabel="tokens/s", xticks=runs)
    a.legend()
    b.bar(runs, [v * 1000 for v in r.time_to_first_token_s.values], color="#ee6677")
    b.axhline(r.time_to_first_token_s.median * 1000, color="k", lw=1, ls="--")
    b.set(title=f"time to first token ({r.prompt_tokens}-token prompt)", xlabel="repeat", ylabel="ms", xticks=runs)
    fig.suptitle(f"{r.model} ({r.dtype}), {r.threads} threads")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
