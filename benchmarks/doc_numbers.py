"""Small facts the docs quote that no other benchmark records: measured here so that each has a file behind it.

* the prompt score of a two-token prompt under the shipped model (docs/hybrid.md: why prompts of fewer than
  `MIN_SCORED_TOKENS` tokens are not judged);
* what tokenizing a megabyte of text costs a server process with SmolLM2's tokenizer (time and resident memory,
  in a fresh interpreter), and how many characters an English token covers (docs/server.md: why the prompt
  length is bounded in characters before tokenizing).

The first is deterministic; the tokenizer's time depends on the machine and its load (recorded with it).
Runs in well under a minute on 2 cores:

    nice -n 10 python benchmarks/doc_numbers.py      # results/doc-numbers.{json,md}
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
NAME = "doc-numbers"
DEFAULT_MODEL = ROOT / "models" / "tinystories-edge-int8"
SMOLLM2 = ROOT / ".cache" / "bench-models" / "smollm2-135m-int8"   # python benchmarks/real_models.py prepare
EVAL_TEXT = ROOT.parent / "shared" / "eval" / "tinystories-v1-valid-a.txt"
SHORT_PROMPT = "Mom said"
PROMPT_CHARS = 1_000_000

# Run in a fresh interpreter so the resident-memory growth is the tokenizer's alone.
PROBE = r"""
import json, sys, time
import tokenizers
def rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
def hwm_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
tok = tokenizers.Tokenizer.from_file(sys.argv[1])
text = open(sys.argv[2], encoding="utf-8").read()
prompt = (text * (int(sys.argv[3]) // len(text) + 1))[: int(sys.argv[3])]
before = rss_mb()
t0 = time.perf_counter()
ids = tok.encode(prompt).ids
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "rss_before_mb": before, "peak_rss_mb": hwm_mb(), "tokens": len(ids),
                  "eval_chars_per_token": len(text) / len(tok.encode(text).ids)}))
"""


def prompt_score() -> dict:
    import edgelm

    lm = edgelm.load(DEFAULT_MODEL, threads=1)
    s = lm.score(SHORT_PROMPT)
    return {"model": DEFAULT_MODEL.name, "prompt": SHORT_PROMPT, "tokens": s.num_tokens,
            "nats_per_token": s.nats_per_token}


def tokenize_cost() -> dict:
    tokenizer = SMOLLM2 / "tokenizer.json"
    if not tokenizer.exists():
        return {"skipped": f"{tokenizer} missing: run python benchmarks/real_models.py prepare --modes int8"}
    out = subprocess.run([sys.executable, "-c", PROBE, str(tokenizer), str(EVAL_TEXT), str(PROMPT_CHARS)],
                         capture_output=True, text=True, check=True).stdout
    r = json.loads(out)
    r.update(tokenizer="SmolLM2-135M-Instruct", text=f"{EVAL_TEXT.name} repeated to {PROMPT_CHARS:,} characters",
             rss_growth_mb=r["peak_rss_mb"] - r["rss_before_mb"])
    return r


def markdown(res: dict) -> str:
    p, t = res["prompt_score"], res["tokenize"]
    lines = [f"Small facts quoted in the docs; `python benchmarks/doc_numbers.py`, {res['when']}, {res['machine']}.",
             "", "| fact | value |", "| --- | --- |",
             f"| prompt score of \"{p['prompt']}\" under `{p['model']}` ({p['tokens']} tokens) | "
             f"{p['nats_per_token']:.2f} nats/token |"]
    if "skipped" in t:
        lines.append(f"| tokenizing {PROMPT_CHARS:,} characters | skipped: {t['skipped']} |")
    else:
        lines += [f"| {t['tokenizer']} tokenizing {t['text']} ({t['tokens']:,} tokens) | {t['seconds']:.2f} s |",
                  f"| resident memory it added to the process (peak minus before) | {t['rss_growth_mb']:.0f} MB |",
                  f"| characters per token on {EVAL_TEXT.name} (English) | {t['eval_chars_per_token']:.2f} |"]
    return "\n".join(lines) + "\n"


def stamp() -> dict:
    """When and where a measurement ran, for the first line of its results file."""
    return {"when": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.machine()}, {os.cpu_count()} vCPUs, "
                       f"1-minute load average {os.getloadavg()[0]:.2f}"}


def write_results(name: str, res: dict, md: str) -> None:
    """results/NAME.json and results/NAME.md, and the table on stdout."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")
    (RESULTS / f"{name}.md").write_text(md, encoding="utf-8")
    print(md)


def main() -> int:
    res = {**stamp(), "prompt_score": prompt_score(), "tokenize": tokenize_cost()}
    write_results(NAME, res, markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
