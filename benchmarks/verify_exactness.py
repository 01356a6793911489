"""Is a verification call exact? The largest |logit| difference between one call of m tokens over the cache (as
prompt lookup's verification runs it) and the same tokens fed one by one over the same cache.

    python benchmarks/verify_exactness.py [MODEL_DIR ...]   # results/verify-exactness.{json,md}

Per model folder, in one process at one thread: the benchmark prompt (edgelm.bench.prompt_ids, 64 tokens) is
prefilled, its greedy continuation of 17 tokens is taken by one-token steps (their logits kept), and then for each m
a fresh prefill of the same prompt is followed by one call of the first m of those tokens (``verify``, as
edgelm.lookup calls it). Deterministic: no timing, no sampling. Defaults: the shipped default model and the
SmolLM2-135M-Instruct fp32 and int8 folders benchmarks/real_models.py exports (skipped when absent).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
MODELS = (ROOT / "models" / "tinystories-edge-int8", ROOT / ".cache" / "bench-models" / "smollm2-135m-none",
          ROOT / ".cache" / "bench-models" / "smollm2-135m-int8")
ROWS = (2, 3, 5, 9, 17)
PROMPT_TOKENS = 64


def measure(path: Path) -> dict:
    import numpy as np

    import edgelm
    from edgelm.bench import prompt_ids

    lm = edgelm.load(str(path), threads=1, verify=False)
    ids = np.asarray([prompt_ids(lm.tokenizer, PROMPT_TOKENS, lm.config.get("bos_token_id"))], np.int64)
    pos = ids.shape[1]

    # Plain greedy decoding, one token per call: the reference rows.
    steps, pooled, (logits, _) = lm._prefill(ids)
    tokens, single = [], []
    for i in range(max(ROWS)):
        tokens.append(int(np.argmax(logits)))
        logits, _ = steps.advance(tokens[-1], pos + i)
        single.append(np.array(logits, copy=True))
    lm._release(pooled)

    diffs = {}
    for m in ROWS:
        steps, pooled, _ = lm._prefill(ids)
        steps.draft_ids[0, :m] = tokens[:m]
        rows, _ = steps.verify(m, pos)
        diffs[m] = float(np.max(np.abs(np.asarray(rows[:m]) - np.stack(single[:m]))))
        steps.single()
        lm._release(pooled)
    return {"dtype": lm.config.get("dtype"), "kv_cache": lm.config["onnx"].get("kv_cache", "concat"),
            "max_abs_logit_diff": diffs}


def render(data: dict) -> str:
    """The results table (markdown) from the JSON record."""
    def cell(x: float) -> str:
        return f"{x:.2f}" if x >= 0.01 else f"{x:.1e}"

    head = ["model", "weights", "cache", *(f"{m} tokens" for m in ROWS)]
    body = [[r["model"], r["dtype"], r["kv_cache"], *(cell(r["max_abs_logit_diff"][m]) for m in ROWS)]
            for r in data["rows"]]
    table = [head, ["---"] * 3 + ["---:"] * len(ROWS), *body]
    return "\n".join([
        f"Largest |logit| difference between one call of m tokens over the cache (a verification) and the same "
        f"tokens one by one, after a {data['prompt_tokens']}-token prompt, greedy tokens, 1 thread; onnxruntime "
        f"{data['onnxruntime']}, commit {data['commit']}, {data['date']}; `{data['command']}`.", "",
        *("| " + " | ".join(row) + " |" for row in table)]) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", type=Path)
    ap.add_argument("--out", type=Path, default=RESULTS / "verify-exactness")
    args = ap.parse_args()
    import onnxruntime

    data = {"rows": [], "prompt_tokens": PROMPT_TOKENS, "onnxruntime": onnxruntime.__version__,
            "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                     text=True).stdout.strip(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "command": ("python benchmarks/verify_exactness.py " + " ".join(sys.argv[1:])).strip()}
    for path in args.models or [p for p in MODELS if (p / "edgelm.json").exists()]:
        data["rows"].append({"model": path.name, **measure(path.resolve())})
        print(data["rows"][-1], flush=True)
    args.out.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    args.out.with_suffix(".md").write_text(render(data), encoding="utf-8")
    print(render(data), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
