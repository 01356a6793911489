"""What decode-step attention costs on SmolLM2-135M's shape, inside the model and alone.

    python benchmarks/attention_cost.py [MODEL_DIR] [--threads 1]   # results/attention-cost.{json,md}

Two measurements, one process, quiet machine expected:

* **In the model**: onnxruntime's profiler over the int8 graph's decode step at past lengths 16, 192 (the
  average past of benchmarks/compare.py's runs: 128-token prompt, 128 new tokens) and 512
  (benchmarks/profile_decode.op_profile): kernel time in ``GroupQueryAttention`` against the whole step's.
* **Alone**: one attention node per session, SmolLM2's heads (9 query heads, 3 KV heads of 64), called as a
  decode step is (one new token over ``past`` cached ones), median of 400 calls: the runtime's fused
  ``GroupQueryAttention`` (packed QKV, rotary inside, the cache as one shared buffer bound in and out, as the
  exported graphs run it), the same without rotary, and ONNX's own ``Attention`` (opset 23; its cache is
  concatenated, no shared buffer; no rotary). The question: is there a cheaper attention operator in
  onnxruntime for a decode step?
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
RESULTS = ROOT / "benchmarks" / "results"
MODEL = ROOT / ".cache" / "bench-models" / "smollm2-135m-int8"
HEADS, KV_HEADS, HEAD_DIM, BUFFER = 9, 3, 64, 4096
PASTS = (16, 192, 512, 1024)


def _gqa(rotary: bool):
    import numpy as np
    from onnx import TensorProto as T, helper

    width = (HEADS + 2 * KV_HEADS) * HEAD_DIM
    inputs = [helper.make_tensor_value_info("qkv", T.FLOAT, [1, 1, width]),
              helper.make_tensor_value_info("past_k", T.FLOAT, [1, KV_HEADS, BUFFER, HEAD_DIM]),
              helper.make_tensor_value_info("past_v", T.FLOAT, [1, KV_HEADS, BUFFER, HEAD_DIM]),
              helper.make_tensor_value_info("seqlens_k", T.INT32, [1]),
              helper.make_tensor_value_info("total", T.INT32, [])]
    names, inits = ["qkv", "", "", "past_k", "past_v", "seqlens_k", "total"], []
    if rotary:
        angles = np.outer(np.arange(BUFFER), 1e4 ** (-np.arange(0, HEAD_DIM, 2) / HEAD_DIM)).astype(np.float32)
        inits = [helper.make_tensor("cos", T.FLOAT, list(angles.shape), np.cos(angles).ravel()),
                 helper.make_tensor("sin", T.FLOAT, list(angles.shape), np.sin(angles).ravel())]
        names += ["cos", "sin"]
    node = helper.make_node("GroupQueryAttention", names, ["y", "present_k", "present_v"], domain="com.microsoft",
                            num_heads=HEADS, kv_num_heads=KV_HEADS, do_rotary=int(rotary), scale=HEAD_DIM ** -0.5)
    outs = [helper.make_tensor_value_info(n, T.FLOAT, None) for n in ("y", "present_k", "present_v")]
    return helper.make_model(helper.make_graph([node], "gqa", inputs, outs, inits),
                             opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])


def _onnx_attention():
    from onnx import TensorProto as T, helper

    inputs = [helper.make_tensor_value_info("q", T.FLOAT, [1, 1, HEADS * HEAD_DIM]),
              helper.make_tensor_value_info("k", T.FLOAT, [1, 1, KV_HEADS * HEAD_DIM]),
              helper.make_tensor_value_info("v", T.FLOAT, [1, 1, KV_HEADS * HEAD_DIM]),
              helper.make_tensor_value_info("past_k", T.FLOAT, [1, KV_HEADS, "past", HEAD_DIM]),
              helper.make_tensor_value_info("past_v", T.FLOAT, [1, KV_HEADS, "past", HEAD_DIM])]
    node = helper.make_node("Attention", ["q", "k", "v", "", "past_k", "past_v"], ["y", "present_k", "present_v"],
                            q_num_heads=HEADS, kv_num_heads=KV_HEADS, scale=HEAD_DIM ** -0.5)
    outs = [helper.make_tensor_value_info(n, T.FLOAT, None) for n in ("y", "present_k", "present_v")]
    return helper.make_model(helper.make_graph([node], "attention", inputs, outs),
                             opset_imports=[helper.make_opsetid("", 23)])


def _median_us(call, n: int = 400) -> float:
    for _ in range(20):
        call()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def alone(threads: int) -> list[dict]:
    import numpy as np
    import onnxruntime as ort

    def session(model):
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.log_severity_level = threads, 3
        return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])

    rng = np.random.default_rng(0)
    rows = []
    for past in PASTS:
        row = {"past": past}
        for rotary in (True, False):
            sess = session(_gqa(rotary))
            cache = [ort.OrtValue.ortvalue_from_numpy(rng.standard_normal((1, KV_HEADS, BUFFER, HEAD_DIM))
                                                      .astype(np.float32)) for _ in range(2)]
            feeds = {"qkv": rng.standard_normal((1, 1, (HEADS + 2 * KV_HEADS) * HEAD_DIM)).astype(np.float32),
                     "seqlens_k": np.array([past], np.int32), "total": np.array(past + 1, np.int32)}
            values = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in feeds.items()}
            binding = sess.io_binding()
            for k, v in values.items():
                binding.bind_ortvalue_input(k, v)
            for name, value in zip(("past_k", "past_v"), cache):
                binding.bind_ortvalue_input(name, value)
                binding.bind_ortvalue_output(name.replace("past", "present"), value)
            binding.bind_output("y")
            row["gqa_us" if rotary else "gqa_no_rotary_us"] = _median_us(lambda: sess.run_with_iobinding(binding))
        sess = session(_onnx_attention())
        feeds = {"q": rng.standard_normal((1, 1, HEADS * HEAD_DIM)).astype(np.float32),
                 "k": rng.standard_normal((1, 1, KV_HEADS * HEAD_DIM)).astype(np.float32),
                 "v": rng.standard_normal((1, 1, KV_HEADS * HEAD_DIM)).astype(np.float32),
                 "past_k": rng.standard_normal((1, KV_HEADS, past, HEAD_DIM)).astype(np.float32)}
        feeds["past_v"] = feeds["past_k"].copy()
        row["onnx_attention_us"] = _median_us(lambda: sess.run(None, feeds))
        rows.append(row)
        print(row, flush=True)
    return rows


def in_model(path: Path, threads: int) -> list[dict]:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import profile_decode as pd

    cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    rows = []
    for past in (16, 192, 512):
        r = pd.op_profile(str(path / "model.onnx"), cfg, threads, past, 150)
        rows.append({"past": past, "kernel_ms_per_step": r["kernel_ms_per_step"],
                     "attention_ms_per_step": r["by_op_ms_per_step"].get("GroupQueryAttention", 0.0),
                     "layers": cfg["num_layers"]})
        print(rows[-1], flush=True)
    return rows


def table(data: dict) -> list[str]:
    lines = [f"Decode-step attention on SmolLM2-135M's shape ({HEADS} query heads, {KV_HEADS} KV heads of {HEAD_DIM}), "
             f"{data['threads']} thread(s), onnxruntime {data['onnxruntime']}, commit {data['commit']}, {data['date']} "
             f"(load {data['loadavg']:.2f}); `{data['command']}`.", "",
             "In the int8 model (onnxruntime's profiler, kernel time per decode step):", "",
             "| past tokens | attention ms / step | all kernels ms / step | attention share | per cached token "
             "per layer |", "|---:|---:|---:|---:|---:|"]
    base = data["in_model"][0]
    for r in data["in_model"]:
        slope = ("—" if r is base else
                 f"{(r['attention_ms_per_step'] - base['attention_ms_per_step']) * 1e6 / (r['past'] - base['past']) / r['layers']:.0f} ns")
        lines.append(f"| {r['past']} | {r['attention_ms_per_step']:.2f} | {r['kernel_ms_per_step']:.2f} | "
                     f"{100 * r['attention_ms_per_step'] / r['kernel_ms_per_step']:.0f} % | {slope} |")
    lines += ["", "One attention node alone, one call (median µs):", "",
              "| past tokens | GroupQueryAttention (as exported) | GroupQueryAttention, no rotary "
              "| ONNX Attention (opset 23, concatenated cache) |", "|---:|---:|---:|---:|"]
    for r in data["alone"]:
        lines.append(f"| {r['past']} | {r['gqa_us']:.1f} | {r['gqa_no_rotary_us']:.1f} | {r['onnx_attention_us']:.1f} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", type=Path, default=MODEL)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS / "attention-cost")
    args = ap.parse_args()
    import onnxruntime

    data = {"threads": args.threads, "onnxruntime": onnxruntime.__version__, "model": args.model.name,
            "command": "python benchmarks/attention_cost.py", "loadavg": os.getloadavg()[0],
            "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                     text=True).stdout.strip(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "in_model": in_model(args.model, args.threads), "alone": alone(args.threads)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    lines = table(data)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
