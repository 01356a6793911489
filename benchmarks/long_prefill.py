"""Long prompts: time to first token and peak memory when the prefill runs in calls of N tokens over the cache.

    python benchmarks/long_prefill.py run [MODEL_DIR] [--rounds 3]   # results/long-prefill-smollm2.{json,md}
    python benchmarks/long_prefill.py table   # the table, also spliced into docs/performance.md

A "shared" graph's fused attention holds the scores of a whole call, [heads, call rows, past + call rows] floats;
for a 3,400-token prompt in one call that is SmolLM2's 9 heads x 3,400^2 x 4 bytes = 420 MB on top of the model.
``edgelm.model.PREFILL_CALL_ROWS`` bounds a call. Each cell: a fresh process loads the model (default: the
SmolLM2-135M-Instruct int8 that benchmarks/real_models.py exports), feeds the first N tokens of a public-domain
tale from ``$EDGELM_SHARED/corpus/classics`` as the prompt, generates one token, and reports the generation's time
to first token and the process's peak RSS (VmHWM). Settings interleaved per round; medians over rounds.
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
SHARED = Path(os.environ.get("EDGELM_SHARED", ROOT.parent / "shared")).resolve()
TEXT = SHARED / "corpus" / "classics" / "grimm.txt"
MODEL = ROOT / ".cache" / "bench-models" / "smollm2-135m-int8"
RESULTS = ROOT / "benchmarks" / "results"
NAME = "long-prefill-smollm2"
LENGTHS = (1024, 2048, 3500)
CALL_ROWS = (None, 1024, 512, 256)
SHIPPED = 512  # edgelm.model.PREFILL_CALL_ROWS when the table was written (the table says so)
DOC = ROOT / "docs" / "performance.md"  # None: the whole prompt in one call (the runtime before PREFILL_CALL_ROWS)
THREADS = (1, 2)

_PROBE = r"""
import json, sys, edgelm, edgelm.model as m
path, text, n, rows, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
m.PREFILL_CALL_ROWS = 10**9 if rows == "none" else int(rows)
lm = edgelm.load(path, threads=threads, verify=False)
ids = lm.encode(open(text, encoding="utf-8").read())[:n]
assert len(ids) == n, len(ids)
g = lm.generate(ids, max_new_tokens=1, temperature=0)
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps({"ttft_s": g.time_to_first_token_s, "peak_rss_kib": hwm, "token": g.token_ids[0]}))
"""


def _measure(model: Path, n: int, rows: int | None, threads: int) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE, str(model), str(TEXT), str(n), str(rows or "none"),
                          str(threads)], check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(model: Path, rounds: int) -> None:
    import onnxruntime

    cells: dict[tuple, list[dict]] = {}
    loads = []
    for r in range(rounds):
        loads.append(round(os.getloadavg()[0], 2))
        for threads in THREADS:
            for n in LENGTHS:
                for rows in CALL_ROWS:
                    got = _measure(model, n, rows, threads)
                    cells.setdefault((threads, n, rows), []).append(got)
                    print(f"round {r} threads {threads} prompt {n} calls of {rows or 'all'}: "
                          f"TTFT {got['ttft_s']:.2f} s, peak {got['peak_rss_kib'] / 1024:.0f} MiB", flush=True)
    rows_out = []
    for (threads, n, rows), got in cells.items():
        rows_out.append({"threads": threads, "prompt_tokens": n, "call_rows": rows,
                         "ttft_s": statistics.median(g["ttft_s"] for g in got),
                         "ttft_runs": [g["ttft_s"] for g in got],
                         "peak_rss_mib": statistics.median(g["peak_rss_kib"] for g in got) / 1024,
                         "first_tokens": sorted({g["token"] for g in got})})
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    manifest = json.loads((model / "edgelm.json").read_text(encoding="utf-8"))
    data = {"model": str(model.name), "weights": manifest.get("quantization", {}).get("method"),
            "text": TEXT.name, "rounds": rounds, "loadavg_1min": loads, "onnxruntime": onnxruntime.__version__,
            "commit": commit, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "command": "python benchmarks/long_prefill.py run", "rows": rows_out}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{NAME}.json").write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    table()


def table() -> None:
    data = json.loads((RESULTS / f"{NAME}.json").read_text(encoding="utf-8"))
    lines = [f"Long prompts on {data['model']} ({data['weights']}): the first N tokens of {data['text']}, one new "
             f"token, each cell a fresh process, medians of {data['rounds']} interleaved rounds (load "
             f"{min(data['loadavg_1min']):.2f}-{max(data['loadavg_1min']):.2f}), onnxruntime {data['onnxruntime']}, "
             f"commit {data['commit']}, {data['date']}; `{data['command']}`.",
             ""]
    settings = sorted({r["call_rows"] for r in data["rows"]}, key=lambda c: -(c or 10**9))
    names = ["the whole prompt (before)" if c is None else f"calls of {c}" + (" (shipped)" if c == SHIPPED else "")
             for c in settings]
    lines += ["Time to first token and peak RSS per prefill setting:", "",
              "| threads | prompt tokens | " + " | ".join(names) + " |", "|---:|---:|" + "---:|" * len(names)]
    cell = {(r["threads"], r["prompt_tokens"], r["call_rows"]): r for r in data["rows"]}
    for threads, n in sorted({(r["threads"], r["prompt_tokens"]) for r in data["rows"]}):
        lines.append(f"| {threads} | {n:,} | " + " | ".join(
            f"{cell[threads, n, c]['ttft_s']:.2f} s, {cell[threads, n, c]['peak_rss_mib']:.0f} MiB" for c in settings)
            + " |")
    text = "\n".join(lines) + "\n"
    (RESULTS / f"{NAME}.md").write_text(text, encoding="utf-8")
    print(text)
    from compare import splice  # benchmarks/compare.py: the <!-- results/NAME --> markers

    DOC.write_text(splice(DOC.read_text(encoding="utf-8"), f"{NAME}.md", text), encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("model", nargs="?", type=Path, default=MODEL)
    r.add_argument("--rounds", type=int, default=3)
    sub.add_parser("table")
    args = ap.parse_args()
    if args.cmd == "run":
        run(args.model.resolve(), args.rounds)
    else:
        table()


if __name__ == "__main__":
    main()
