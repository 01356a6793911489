"""What a multi-token call over the cache costs, in one-token decode steps: the price of prompt lookup's verifications.

    python benchmarks/verify_cost.py [MODEL_DIR ...] [--threads 1 2]   # results/verify-cost.{json,md}

Per model folder and thread count, in one process: a 128-token prompt is prefilled, then the median time of 30
one-token steps and of 20 calls of m tokens (the first m of a verification: the token just chosen and m - 1
drafts) at the same cache position, through the runtime's own cache object (``verify``, as edgelm.lookup calls
it). Default model: the SmolLM2-135M-Instruct int8 folder benchmarks/real_models.py exports.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
MODEL = ROOT / ".cache" / "bench-models" / "smollm2-135m-int8"
ROWS = (2, 3, 5, 9, 17)


def measure(path: Path, threads: int) -> dict:
    import numpy as np

    import edgelm
    from edgelm.bench import prompt_ids

    lm = edgelm.load(str(path), threads=threads, verify=False)
    ids = np.asarray([prompt_ids(lm.tokenizer, 128, lm.config.get("bos_token_id"))], np.int64)
    cache = lm._shared_cache()
    cache.prefill(ids)
    pos = ids.shape[1]

    def median_s(fn, n: int) -> float:
        times = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    step = median_s(lambda: cache.advance(42, pos), 30)
    cost = {}
    for m in ROWS:
        cache.draft_ids[0, :m] = 42
        cost[m] = median_s(lambda: cache.verify(m, pos), 20) / step
        cache.single()
    return {"step_ms": step * 1e3, "cost_in_steps": cost}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", type=Path, default=[MODEL])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--out", type=Path, default=RESULTS / "verify-cost")
    args = ap.parse_args()
    rows = []
    for path in args.models:
        for threads in args.threads:
            r = measure(path.resolve(), threads)
            rows.append({"model": path.name, "threads": threads, **r})
            print(f"{path.name} {threads} thread(s): step {r['step_ms']:.2f} ms, "
                  + ", ".join(f"{m} tokens {c:.2f}" for m, c in r["cost_in_steps"].items()), flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    import onnxruntime

    data = {"rows": rows, "commit": commit, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "loadavg_1min": round(os.getloadavg()[0], 2), "onnxruntime": onnxruntime.__version__,
            "command": "python benchmarks/verify_cost.py " + " ".join(sys.argv[1:])}
    args.out.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    lines = [f"A call of m tokens over the cache, in one-token steps (medians; 128-token prompt), onnxruntime "
             f"{data['onnxruntime']}, commit {commit}, {data['date']} (load {data['loadavg_1min']}); "
             f"`{data['command'].strip()}`.", "",
             "| model | threads | one-token step | " + " | ".join(f"{m} tokens" for m in ROWS) + " |",
             "|---|---:|---:|" + "---:|" * len(ROWS)]
    for r in rows:
        lines.append(f"| {r['model']} | {r['threads']} | {r['step_ms']:.2f} ms | "
                     + " | ".join(f"{r['cost_in_steps'][m]:.2f}" for m in ROWS) + " |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
