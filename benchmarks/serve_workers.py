"""`edgelm serve` on a 2-core machine: two 1-thread workers against one 2-thread worker, for throughput (many
clients) and for one user's latency. The numbers behind docs/server.md's advice on --workers / --threads.

    python benchmarks/serve_workers.py [--duration 10] [--rounds 2]   # results/serve-workers.{json,md} (~4 min)

Each cell is one `benchmarks/serve_load.py` run (a fresh `edgelm serve` child on a loopback port, greedy requests
of 32 tokens cycling completions / chat / streamed chat), the configurations interleaved over ``--rounds``
rounds; the table gives the median over rounds. Models: the shipped default, and SmolLM2-135M-Instruct int8 when
benchmarks/real_models.py has exported it under .cache/bench-models.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "serve-workers"
MODELS = {"tinystories-edge-int8 (default)": ROOT / "models" / "tinystories-edge-int8",
          "SmolLM2-135M int8": ROOT / ".cache" / "bench-models" / "smollm2-135m-int8"}
SETUPS = [(2, 1), (1, 2)]   # (workers, threads per generation)
LOADS = [16, 1]             # concurrent clients


def one(model: Path, workers: int, threads: int, clients: int, duration: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serve_load.py"), str(model), "--duration",
                        str(duration), "--clients", str(clients), "--workers", str(workers), "--threads",
                        str(threads), "--json", str(out)], check=True, capture_output=True, text=True, timeout=300)
        return json.loads(out.read_text())


def run(duration: float, rounds: int) -> dict:
    models = {name: path for name, path in MODELS.items() if (path / "edgelm.json").is_file()}
    cells: dict[str, list[dict]] = {}
    load = [os.getloadavg()[0]]
    for r in range(rounds):
        order = [(m, s, c) for m in models for s in SETUPS for c in LOADS]
        for m, (w, t), c in (order if r % 2 == 0 else order[::-1]):
            rep = one(models[m], w, t, c, duration)
            cells.setdefault(f"{m}|{w}|{t}|{c}", []).append(rep)
            print(f"{m} workers {w} threads {t} clients {c}: {rep['requests_per_s']} req/s, p50 "
                  f"{rep['latency_ms']['p50']} ms", flush=True)
    load.append(os.getloadavg()[0])
    rows = []
    for key, reps in cells.items():
        m, w, t, c = key.split("|")
        rows.append({"model": m, "workers": int(w), "threads": int(t), "clients": int(c),
                     "requests_per_s": statistics.median(x["requests_per_s"] for x in reps),
                     "completion_tokens_per_s": statistics.median(x["completion_tokens_per_s"] for x in reps),
                     "latency_p50_ms": statistics.median(x["latency_ms"]["p50"] for x in reps),
                     "latency_p95_ms": statistics.median(x["latency_ms"]["p95"] for x in reps),
                     "errors": sum(sum(x["errors"].values()) for x in reps), "rounds": len(reps)})
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    return {"rows": rows, "duration_s": duration, "rounds": rounds, "load_average": load, "commit": commit,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu_count": os.cpu_count(),
            "command": "python benchmarks/serve_workers.py " + " ".join(sys.argv[1:])}


def markdown(data: dict) -> str:
    lines = [f"`edgelm serve`: --workers x --threads on {data['cpu_count']} cores, greedy requests of 32 tokens, "
             f"{data['duration_s']:g} s per cell, medians of {data['rounds']} interleaved rounds; commit "
             f"{data['commit']}, {data['date']}, load average {data['load_average'][0]:.2f} -> "
             f"{data['load_average'][1]:.2f}; `{data['command'].strip()}`.", "",
             "| model | clients | workers x threads | requests/s | completion tokens/s | latency p50 / p95 | errors |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for r in sorted(data["rows"], key=lambda r: (r["model"], -r["clients"], -r["workers"])):
        lines.append(f"| {r['model']} | {r['clients']} | {r['workers']} x {r['threads']} | {r['requests_per_s']:.1f} | "
                     f"{r['completion_tokens_per_s']:.0f} | {r['latency_p50_ms']:.0f} / {r['latency_p95_ms']:.0f} ms "
                     f"| {r['errors']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    data = run(args.duration, args.rounds)
    RESULTS.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    RESULTS.with_suffix(".md").write_text(markdown(data), encoding="utf-8")
    print(markdown(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
