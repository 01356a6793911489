"""CPU training throughput of the `small` and `edge-5m` presets (docs/distillation.md, "CPU training throughput").

    nice -n 10 python benchmarks/cpu_train_throughput.py            # about 2 minutes on 2 cores
    nice -n 10 python benchmarks/cpu_train_throughput.py --steps 30 # the longer run the docs' command does

Trains a 4,096-token tokenizer on 2 MB of TinyStories, then runs ``edgelm_export.train.train`` for each preset
on the CPU at block 256 x batch 16 (4,096 tokens a step), fp32, ``--num-threads`` threads, and reads the
``tokens_per_s`` records of its train_log.jsonl (one per ``log_every`` steps). The first window holds the
first steps' one-off costs (allocation, warm caches), so the table reports the median of the later ones, and
each run's overall tokens/s beside it. The machine's load average is recorded before and after: on a shared
machine it decides the numbers more than anything else.

Writes benchmarks/results/cpu-train-throughput.json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EDGELM_SHARED", ROOT.parent / "shared")).resolve()
CORPUS = SHARED / "corpus" / "tinystories" / "tinystories-v1-train-sample.txt"
WORK = ROOT / ".cache" / "cpu-train-throughput"
RESULTS = ROOT / "benchmarks" / "results" / "cpu-train-throughput"
PRESETS = ("small", "edge-5m")
BLOCK, BATCH = 256, 16


def measure(preset: str, tokenizer: Path, *, steps: int, log_every: int, threads: int) -> dict:
    from edgelm_export.train import TrainConfig, train

    out = WORK / preset
    res = train(TrainConfig(out_dir=str(out), corpus=[str(CORPUS)], tokenizer=str(tokenizer), model_config=preset,
                            layout="blank-line-paragraphs", straight_quotes=True, block_size=BLOCK,
                            batch_size=BATCH, max_steps=steps, warmup_steps=2, eval_every=10**9,
                            save_every=10**9, log_every=log_every, eval_max_tokens=4096, device="cpu",
                            num_threads=threads, overwrite=True, progress=False))
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    windows = [round(r["tokens_per_s"], 1) for r in records if "tokens_per_s" in r]
    later = windows[1:] or windows
    return {"preset": preset, "params": res.params, "steps": res.steps, "tokens": res.tokens,
            "window_tokens_per_s": windows, "median_later_windows": round(statistics.median(later), 1),
            "overall_tokens_per_s": round(res.tokens_per_s, 1), "wall_time_s": round(res.wall_time_s, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8, help="training steps per preset (4,096 tokens each)")
    ap.add_argument("--log-every", type=int, default=2, help="steps per tokens/s window")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    args = ap.parse_args()

    import torch

    from edgelm_export.tokenizer import train_tokenizer

    WORK.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    t0 = time.time()
    tok = WORK / "tok4096"
    if not (tok / "tokenizer.json").is_file():
        train_tokenizer([str(CORPUS)], 4096, tok, layout="blank-line-paragraphs", straight_quotes=True)
    rows = [measure(p, tok, steps=args.steps, log_every=args.log_every, threads=args.threads) for p in PRESETS]
    result = {
        "what": f"edgelm_export.train.train on CPU, fp32, block {BLOCK} x batch {BATCH}, {args.threads} threads, "
                f"{args.steps} steps per preset, tokens/s windows of {args.log_every} steps",
        "command": f"nice -n 10 python benchmarks/cpu_train_throughput.py --steps {args.steps} "
                   f"--log-every {args.log_every} --threads {args.threads}",
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "python": platform.python_version(),
                    "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in os.getloadavg()]},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "total_wall_s": round(time.time() - t0, 1),
        "rows": rows,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    m = result["machine"]
    lines = [f"# CPU training throughput ({result['date']})", "",
             f"{result['what']}. `{result['command']}`; {m['cpus']} CPUs, torch {m['torch']}, load average "
             f"(1/5/15 min) {'/'.join(map(str, m['load_average_before']))} before and "
             f"{'/'.join(map(str, m['load_average_after']))} after; {result['total_wall_s']} s in all.", "",
             "| preset | params | tokens/s (median of windows after the first) | windows | overall |",
             "| --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| `{r['preset']}` | {r['params'] / 1e6:.2f}M | {r['median_later_windows']:,.0f} | "
                     f"{' / '.join(f'{w:,.0f}' for w in r['window_tokens_per_s'])} | "
                     f"{r['overall_tokens_per_s']:,.0f} |")
    RESULTS.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
