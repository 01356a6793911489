"""Could SmolLM2's block-wise matrices (o_proj, down_proj) take the int8 GEMM if smoothed through the layer before?

    python benchmarks/smooth_reach.py [FP32_FOLDER]    # results/smooth-reach-smollm2.{json,md} (~1 min)

The default int8 plan runs a weight MatMul on onnxruntime's int8 GEMM (``DynamicQuantizeMatMul``, the faster
kernel at batch 1) only where its calibrated error is at most 2x the block-wise kernel's (``quantize.plan_int8``);
smoothing (SmoothQuant) rescues the MatMuls fed by a norm, whose weight can absorb a per-channel scale. SmolLM2's
``o_proj`` and ``down_proj`` are fed by attention and by the MLP's product instead, so they stay block-wise -- and
they are a third of a decode step's weight time. Both inputs *can* be smoothed exactly another way:

* ``down_proj``'s input is silu(gate) * up, linear in ``up``: dividing the up half of ``gate_up_proj``'s output
  columns by s divides down's input channel k by s_k;
* ``o_proj``'s input is the attention output, linear in V: dividing V's output columns by s divides every query
  head's channel by its key/value head's s (one scale per (kv head, channel), shared by the heads of a group).

This script measures, with the exporter's own calibration tokens and error metric (``quantize.calibrate``'s), how
far that goes: per matrix the block kernel's error, the GEMM's, and the GEMM's after the best of
``quantize.SMOOTH_ALPHAS`` -- for a prefill (one activation scale per call, what the rule uses) and per row (a
decode step's single row has its own scale). Nothing is exported; it answers whether building the folding is worth it.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
RESULTS = ROOT / "benchmarks" / "results"
NAME = "smooth-reach-smollm2"
KINDS = ("o_proj", "down_proj")


def _per_row_uint8(x: np.ndarray) -> np.ndarray:
    """DynamicQuantizeLinear's rounding with one scale per row (a decode step: one row per call), de-quantized."""
    lo = np.minimum(x.min(axis=1, keepdims=True), 0.0)
    hi = np.maximum(x.max(axis=1, keepdims=True), 0.0)
    scale = np.where(hi > lo, (hi - lo) / 255.0, 1.0)
    zero = np.rint(-lo / scale)
    return (np.clip(np.rint(x / scale) + zero, 0, 255) - zero) * scale


def activations(src: Path) -> tuple[list[tuple[str, np.ndarray, np.ndarray]], dict, int]:
    """(node, calibration input x [T, K], weight [K, N]) for every o_proj / down_proj of the fp32 graph."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from export import quantize as q
    from export.evaluate import calibration_ids

    cfg = json.loads((src / "config.json").read_text(encoding="utf-8"))
    ids = calibration_ids(src, 2)
    model = onnx.load(str(src / "model.onnx"), load_external_data=False)
    nodes = [n for n in q.weight_matmuls(model) if any(k in n[0] for k in KINDS)]
    for _, x, _ in nodes:
        model.graph.output.append(helper.make_tensor_value_info(x, TensorProto.FLOAT, None))
    probe = src / ".smooth-reach-probe.onnx"  # beside the weights: onnxruntime reads external data from there
    onnx.save_model(model, str(probe))
    try:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.log_severity_level = 2, 3
        sess = ort.InferenceSession(str(probe), opts, providers=["CPUExecutionProvider"])
        a = np.asarray([ids], np.int64)
        feeds = {"input_ids": a, "attention_mask": np.ones_like(a)}
        for inp in sess.get_inputs():
            if inp.name.startswith("past_key_values."):
                feeds[inp.name] = np.zeros((1, cfg["num_kv_heads"], 0, cfg["head_dim"]), np.float32)
        acts = sess.run([x for _, x, _ in nodes], feeds)
    finally:
        probe.unlink(missing_ok=True)
    inits = q._initializers(model)
    out = [(name, x.reshape(-1, x.shape[-1]).astype(np.float32),
            numpy_helper.to_array(inits[w], base_dir=str(src))) for (name, _, w), x in zip(nodes, acts)]
    return out, cfg, len(ids)


def grouped_scales(x: np.ndarray, w: np.ndarray, alpha: float, kv: int, group: int, d: int) -> np.ndarray:
    """quantize.smooth_scales with one scale per (kv head, channel): the query heads of a group share V."""
    ax = np.abs(x).max(axis=0).reshape(kv, group, d).max(axis=1).astype(np.float64)
    aw = np.abs(w).max(axis=1).reshape(kv, group, d).max(axis=1).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = ax ** alpha / aw ** (1.0 - alpha)
    s = np.where(np.isfinite(s) & (s > 0), s, 1.0)
    return np.repeat(s[:, None, :], group, axis=1).reshape(-1).astype(np.float32)


def measure(src: Path) -> dict:
    from export import quantize as q

    rows, cfg, tokens = activations(src)
    kv, d = int(cfg["num_kv_heads"]), int(cfg["head_dim"])
    group = int(cfg["num_attention_heads"]) // kv
    out = []
    for name, x, w in rows:
        ref = x @ w
        b, bs, _ = q.quantize_blocks(w, 8, q.BLOCK_SIZE[8])
        block = q._row_error(q._per_block_int8(x, q.BLOCK_SIZE[8]) @ q.dequantize_blocks(b, bs, 8, w.shape[0]), ref)
        qw, sw = q.quantize_columns(w)
        wq = qw.astype(np.float32) * sw
        r = {"node": name, "kind": next(k for k in KINDS if k in name), "abs_max_input": float(np.abs(x).max()),
             "block": block, "gemm_prefill": q._row_error(q._per_call_uint8(x) @ wq, ref),
             "gemm_per_row": q._row_error(_per_row_uint8(x) @ wq, ref)}
        best: dict[str, tuple[float, float]] = {}
        for alpha in q.SMOOTH_ALPHAS:
            s = grouped_scales(x, w, alpha, kv, group, d) if r["kind"] == "o_proj" else q.smooth_scales(x, w, alpha)
            qs, ss = q.quantize_columns(w * s[:, None])
            ws = qs.astype(np.float32) * ss
            for mode, rnd in (("prefill", q._per_call_uint8), ("per_row", _per_row_uint8)):
                err = q._row_error(rnd(x / s) @ ws, ref)
                if err < best.get(mode, (np.inf, 0.0))[0]:
                    best[mode] = (err, alpha)
        for mode, (err, alpha) in best.items():
            r[f"smoothed_{mode}"], r[f"alpha_{mode}"] = err, alpha
        out.append(r)
        print(f"{name:34s} block {block:.4f}  GEMM {r['gemm_prefill'] / block:5.1f}x  smoothed "
              f"{r['smoothed_prefill'] / block:5.1f}x  per row {r['gemm_per_row'] / block:4.1f}x / smoothed "
              f"{r['smoothed_per_row'] / block:4.1f}x", flush=True)
    return {"rows": out, "calibration_tokens": tokens, "rule": q.GEMM_MAX_RATIO}


def write(data: dict, src: Path) -> None:
    import onnxruntime

    data.update(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), onnxruntime=onnxruntime.__version__,
                folder=str(src.relative_to(ROOT)) if src.is_relative_to(ROOT) else str(src),
                command="python benchmarks/smooth_reach.py " + " ".join(sys.argv[1:]))
    (RESULTS / f"{NAME}.json").write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    rule = data["rule"]
    lines = [f"Calibrated errors of SmolLM2-135M-Instruct's block-wise int8 matrices if they took the int8 GEMM, as "
             f"multiples of the block kernel's error (the plan's rule: at most {rule:g}x), with smoothing folded "
             f"into the layer before (down_proj: the up half of gate_up_proj; o_proj: V, one scale per kv head and "
             f"channel); the exporter's {data['calibration_tokens']} calibration tokens, {data['date']}, "
             f"onnxruntime {data['onnxruntime']}; `{data['command'].strip()}`.", "",
             "| matrices | GEMM, prefill | smoothed, prefill | pass the rule, prefill | GEMM, per row (decode) | "
             "smoothed, per row | pass the rule, per row |", "|---|---:|---:|---:|---:|---:|---:|"]

    def spread(vals: list[float]) -> str:
        return f"{statistics.median(vals):.1f}x [{min(vals):.1f}-{max(vals):.1f}]"

    for kind in KINDS:
        rs = [r for r in data["rows"] if r["kind"] == kind]
        ratio = {m: [r[m] / r["block"] for r in rs]
                 for m in ("gemm_prefill", "smoothed_prefill", "gemm_per_row", "smoothed_per_row")}
        passing = {m: sum(v <= rule for v in ratio[f"smoothed_{m}"]) for m in ("prefill", "per_row")}
        lines.append(f"| {kind} (x{len(rs)}) | {spread(ratio['gemm_prefill'])} | {spread(ratio['smoothed_prefill'])} "
                     f"| {passing['prefill']} of {len(rs)} | {spread(ratio['gemm_per_row'])} | "
                     f"{spread(ratio['smoothed_per_row'])} | {passing['per_row']} of {len(rs)} |")
    lines += ["", "Median [min-max] over the layers. Per matrix: "
              f"[{NAME}.json](../results/{NAME}.json) (`abs_max_input`: the largest input seen)."]
    (RESULTS / f"{NAME}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


def main() -> int:
    src = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / ".cache" / "bench-models" / "smollm2-135m-none"
    if not (src / "model.onnx").is_file():
        print(f"No fp32 export at {src}: run benchmarks/real_models.py first (it exports smollm2-135m-none).",
              file=sys.stderr)
        return 1
    write(measure(src.resolve()), src.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
