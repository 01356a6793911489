"""Why the 24M shape's int8 at 2 threads is bimodal (docs/performance.md, "Why the misses happen").

    python benchmarks/thread_phases.py [--minutes 8]   # results/thread-phases-rand15m.{json,md}
    python benchmarks/thread_phases.py --int8 DIR --block DIR --name smollm2 --steps 100 --indicator --minutes 8
    python benchmarks/thread_phases.py --name NAME --table   # rewrite the table (and docs/performance.md's copy)

For the given time, over and over, each in a fresh process: the rand-15M int8 graph (every matrix on the int8
GEMM, DynamicQuantizeMatMul) and its int8-block graph (8-bit MatMulNBits), at 2 threads (spin-waiting forced on,
so that the spin default's load sample cannot be the difference; the int8 graph also with it off) and at 1: the
median time of 300 one-token decode steps through the runtime's cache (128-token prompt). Each line of the log is
one sweep over the four, a few seconds apart, so a phase of the machine shows up in all four at once. A
"slow" sweep is one whose int8 2-thread step is over 1.5x the run's fastest.

The folders are those benchmarks/compare.py prepares (.cache/bench-models/rand-15M/edgelm-int8, -int8-block), or
any int8 / int8-block pair given (``--int8``, ``--block``; results/thread-phases-NAME). ``--indicator`` adds the
rand-15M int8 graph at 2 threads to every sweep and classifies the sweeps by it (the phase as the small model
sees it), so a larger model's sweeps can be sorted into the same phases.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / ".cache" / "bench-models" / "rand-15M"
RESULTS = ROOT / "benchmarks" / "results"
# (graph, threads, spin-waiting)
CONFIGS = (("int8", 2, True), ("int8-block", 2, True), ("int8", 2, False), ("int8", 1, False),
           ("int8-block", 1, False))

_PROBE = r"""
import statistics, sys, time
import numpy as np
import edgelm
from edgelm.bench import prompt_ids
threads = int(sys.argv[2])
lm = edgelm.load(sys.argv[1], threads=threads, spin=sys.argv[3] == "spin", verify=False)
cache = lm._shared_cache()
cache.prefill(np.asarray([prompt_ids(lm.tokenizer, 128, lm.config.get("bos_token_id"))], np.int64))
times = []
for _ in range(int(sys.argv[4])):
    t = time.perf_counter()
    cache.advance(42, 128)
    times.append(time.perf_counter() - t)
print(statistics.median(times) * 1e6)
"""


def step_us(folder: Path, threads: int, spin: bool, steps: int) -> float:
    args = [str(folder), str(threads), "spin" if spin else "no", str(steps)]
    out = subprocess.run([sys.executable, "-c", _PROBE, *args], check=True,
                         capture_output=True, text=True, cwd=ROOT)
    return float(out.stdout.split()[-1])


def _key(folder: str, threads: int, spin: bool) -> str:
    return f"{folder}/{threads}" + ("" if spin or threads == 1 else "/no-spin")


def run(name: str, folders: dict[str, Path], steps: int, minutes: float) -> None:
    sweeps = []
    end = time.time() + 60 * minutes
    while time.time() < end:
        row = {"time": time.strftime("%H:%M:%S", time.gmtime()), "loadavg_1min": round(os.getloadavg()[0], 2)}
        if "indicator" in folders:
            row["indicator"] = step_us(folders["indicator"], 2, True, 300)
        for folder, threads, spin in CONFIGS:
            row[_key(folder, threads, spin)] = step_us(folders[folder], threads, spin, steps)
        sweeps.append(row)
        print(" ".join(f"{k} {v:.0f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    import onnxruntime

    data = {"sweeps": sweeps, "commit": commit, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "onnxruntime": onnxruntime.__version__, "folders": {k: str(v) for k, v in folders.items()},
            "steps": steps, "command": "python benchmarks/thread_phases.py " + " ".join(sys.argv[1:])}
    (RESULTS / f"thread-phases-{name}.json").write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    table(name)


def table(name: str) -> None:
    data = json.loads((RESULTS / f"thread-phases-{name}.json").read_text(encoding="utf-8"))
    sweeps = data["sweeps"]
    key = "indicator" if "indicator" in sweeps[0] else _key("int8", 2, True)
    fastest = min(s[key] for s in sweeps)
    phases = {"fast": [s for s in sweeps if s[key] <= 1.5 * fastest],
              "slow": [s for s in sweeps if s[key] > 1.5 * fastest]}
    loads = [s["loadavg_1min"] for s in sweeps]
    lines = [f"{name} decode step, median of {data.get('steps', 300)} steps per fresh process, {len(sweeps)} sweeps "
             f"over the {len(CONFIGS)} settings ({sweeps[0]['time']}-{sweeps[-1]['time']} UTC, load "
             f"{min(loads):.2f}-{max(loads):.2f}), onnxruntime {data['onnxruntime']}, commit {data['commit']}; "
             f"`{data['command']}`. A sweep is slow when its "
             + ("rand-15M int8 2-thread step (the indicator)" if key == "indicator" else "int8 2-thread step")
             + " is over 1.5x the fastest.", "",
             "| sweeps | count | " + " | ".join(f"{f}, {t} thread{'s' if t > 1 else ''}"
                                                + ("" if spin or t == 1 else ", no spin") for f, t, spin in CONFIGS)
             + " |",
             "|---|---:|" + "---:|" * len(CONFIGS)]
    for phase, rows in phases.items():
        if rows:
            lines.append(f"| {phase} | {len(rows)} | " + " | ".join(
                f"{statistics.median(r[_key(f, t, spin)] for r in rows):.0f} us" for f, t, spin in CONFIGS) + " |")
    text = "\n".join(lines) + "\n"
    (RESULTS / f"thread-phases-{name}.md").write_text(text, encoding="utf-8")
    print(text)
    doc = ROOT / "docs" / "performance.md"
    if f"<!-- results/thread-phases-{name}.md -->" in doc.read_text(encoding="utf-8"):
        from compare import splice  # benchmarks/compare.py: the <!-- results/NAME --> markers

        doc.write_text(splice(doc.read_text(encoding="utf-8"), f"thread-phases-{name}.md", text), encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=8)
    ap.add_argument("--int8", type=Path, default=MODELS / "edgelm-int8")
    ap.add_argument("--block", type=Path, default=MODELS / "edgelm-int8-block")
    ap.add_argument("--name", default="rand15m", help="results/thread-phases-NAME.{json,md}")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--indicator", action="store_true", help="classify sweeps by rand-15M int8 at 2 threads")
    ap.add_argument("--table", action="store_true", help="only rewrite the table from the JSON")
    args = ap.parse_args()
    if args.table:
        table(args.name)
    else:
        folders = {"int8": args.int8.resolve(), "int8-block": args.block.resolve()}
        if args.indicator:
            folders["indicator"] = (MODELS / "edgelm-int8").resolve()
        run(args.name, folders, args.steps, args.minutes)


if __name__ == "__main__":
    main()
