"""This machine's ceiling for small-model decode: memory bandwidth, matmul throughput, tokens/s bounds.

Decoding one token at batch 1 reads every weight matrix once, so a model cannot decode faster than
``memory bandwidth / bytes of weights read per token``. This script measures the bandwidth (numpy, one
slice per thread) and the matmul throughput that onnxruntime reaches (fp32 MatMul, int8 MatMulInteger,
and weight-only int8 MatMulNBits for the batch-1 shape), then prints that bound for each benchmark shape.

    python benchmarks/ceiling.py --threads 2 [--json benchmarks/results/ceiling.json]

It takes about 10-20 seconds. ``benchmarks/compare.py`` imports :func:`measure` and :func:`decode_ceiling`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from shapes import SHAPES  # benchmarks/ (the script's folder, or put on sys.path by whoever imports this)


def _best(fn, seconds: float, min_runs: int = 3) -> float:
    """Best wall time of ``fn()`` over at least ``min_runs`` calls or ``seconds`` of trying (noise only adds)."""
    best, start, n = float("inf"), time.perf_counter(), 0
    while n < min_runs or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
        n += 1
    return best


def memory_bandwidth(threads: int, mib: int = 512, seconds: float = 2.0) -> dict[str, float]:
    """DRAM read and copy bandwidth in GB/s over a buffer far larger than the caches.

    numpy releases the GIL inside its loops, so ``threads`` Python threads each reducing one slice use
    ``threads`` cores, the way a decode step streams weights on ``threads`` cores. The read kernel is a
    bitwise-OR reduction over 64-bit words: a float ``sum`` is limited by its pairwise adds (it measured
    about half the bandwidth here), an integer OR is not.
    """
    n = mib * (1 << 20) // 8
    a = np.ones(n, dtype=np.uint64)
    b = np.empty_like(a)
    parts = np.array_split(np.arange(n), threads)
    bounds = [(int(p[0]), int(p[-1]) + 1) for p in parts]
    pool = ThreadPoolExecutor(threads)

    def read():
        list(pool.map(lambda lo_hi: np.bitwise_or.reduce(a[lo_hi[0]:lo_hi[1]]), bounds))

    def copy():
        list(pool.map(lambda lo_hi: np.copyto(b[lo_hi[0]:lo_hi[1]], a[lo_hi[0]:lo_hi[1]]), bounds))

    read()
    copy()
    t_read = _best(read, seconds)
    t_copy = _best(copy, seconds)
    pool.shutdown()
    return {"read_GBps": a.nbytes / t_read / 1e9, "copy_GBps": 2 * a.nbytes / t_copy / 1e9}


def _ort_session(model, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _matmul_model(kind: str, m: int, k: int, n: int, rng: np.random.Generator):
    """A one-node ONNX graph: Y = X @ W with W an initializer (fp32, dynamic int8, or weight-only int8)."""
    from onnx import TensorProto, helper, numpy_helper

    inits, nodes = [], []
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT if kind != "int8" else TensorProto.UINT8, [m, k])
    if kind == "fp32":
        inits.append(numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "W"))
        nodes.append(helper.make_node("MatMul", ["X", "W"], ["Y"]))
        y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [m, n])
    elif kind == "int8":  # MatMulInteger: what dynamic quantization runs (activations quantized per call)
        inits.append(numpy_helper.from_array(rng.integers(-127, 127, (k, n), dtype=np.int8), "W"))
        nodes.append(helper.make_node("MatMulInteger", ["X", "W"], ["Y"]))
        y = helper.make_tensor_value_info("Y", TensorProto.INT32, [m, n])
    elif kind == "nbits8":  # com.microsoft MatMulNBits, 8-bit weights, block size 32: weight-only int8
        block = 32
        blocks = (k + block - 1) // block
        inits.append(numpy_helper.from_array(rng.integers(0, 255, (n, blocks, block), dtype=np.uint8), "W"))
        inits.append(numpy_helper.from_array(rng.random(n * blocks).astype(np.float32) * 0.01, "S"))
        nodes.append(helper.make_node("MatMulNBits", ["X", "W", "S"], ["Y"], domain="com.microsoft",
                                      K=k, N=n, bits=8, block_size=block, accuracy_level=4))
        y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [m, n])
    else:
        raise ValueError(kind)
    graph = helper.make_graph(nodes, kind, [x], [y], initializer=inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets)


def matmul_throughput(threads: int, seconds: float = 1.0) -> dict[str, float]:
    """GFLOP/s onnxruntime reaches: large GEMMs (prefill-like) and batch-1 GEMVs (decode-like, GB/s too)."""
    rng = np.random.default_rng(0)
    out: dict[str, float] = {}
    m = k = n = 1024
    for kind in ("fp32", "int8", "nbits8"):
        sess = _ort_session(_matmul_model(kind, m, k, n, rng), threads)
        x = (rng.integers(0, 255, (m, k), dtype=np.uint8) if kind == "int8"
             else rng.standard_normal((m, k)).astype(np.float32))
        t = _best(lambda: sess.run(None, {"X": x}), seconds)
        out[f"gemm_{kind}_GFLOPs"] = 2 * m * k * n / t / 1e9
    # Decode shape: one row times a weight matrix bigger than the caches (8192 x 8192: 256 MB fp32, 72 MB int8).
    k = n = 8192
    for kind, bytes_per_weight in (("fp32", 4.0), ("nbits8", 1.0 + 4 / 32)):
        sess = _ort_session(_matmul_model(kind, 1, k, n, rng), threads)
        x = rng.standard_normal((1, k)).astype(np.float32)
        t = _best(lambda: sess.run(None, {"X": x}), seconds)
        out[f"gemv_{kind}_GBps"] = k * n * bytes_per_weight / t / 1e9
    return out


def weight_params(cfg: dict[str, Any]) -> dict[str, int]:
    """Parameters a decode step reads, split into the matrices of the layers and the LM head.

    The embedding lookup reads one row per token, so only the LM head counts the vocabulary table (once,
    whether or not it is tied to the embedding). Norm weights are included; biases are absent in Llama.
    """
    d, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    hd = cfg.get("head_dim") or d // heads
    per_layer = d * heads * hd + 2 * d * kv * hd + heads * hd * d + 3 * d * inter + 2 * d
    return {"layers": layers * per_layer, "lm_head": cfg["vocab_size"] * d, "final_norm": d}


def decode_ceiling(cfg: dict[str, Any], read_GBps: float) -> dict[str, Any]:
    """Upper bound on batch-1 decode tokens/s per weight format: bandwidth / bytes of weights per token.

    int8 counts one byte per weight plus one fp32 scale per 32 weights (block-wise, the more expensive of
    per-channel and block-wise layouts); int4 half a byte plus the same scales. Norms stay fp32. The KV cache
    read is left out: at 128-256 positions it is under 2 % of the weights for these shapes.
    """
    p = weight_params(cfg)
    matrices = p["layers"] + p["lm_head"]
    fmt = {"fp32": 4.0, "int8": 1.0 + 4 / 32, "int4": 0.5 + 4 / 32}
    out: dict[str, Any] = {"params_read_per_token": matrices + p["final_norm"]}
    for name, b in fmt.items():
        total = matrices * b + p["final_norm"] * 4
        out[f"{name}_bytes_per_token"] = int(total)
        out[f"{name}_ceiling_tok_s"] = read_GBps * 1e9 / total
    # The simpler rule (int8 weights read once, one byte each), for comparison with its 197 tok/s.
    out["int8_1byte_ceiling_tok_s"] = read_GBps * 1e9 / matrices
    return out


def measure(threads: int = 2, quick: bool = False) -> dict[str, Any]:
    """All of the above for this machine (about 10-20 s; ``quick`` halves it)."""
    s = 0.5 if quick else 1.0
    bw = memory_bandwidth(threads, seconds=2 * s)
    res: dict[str, Any] = {"threads": threads, "cpu_count": os.cpu_count(), **bw, **matmul_throughput(threads, s)}
    # The bound uses the fastest weight streaming seen: the plain read, or a GEMV over a matrix 2-8x the L3.
    res["stream_GBps"] = max(res["read_GBps"], res["gemv_fp32_GBps"], res["gemv_nbits8_GBps"])
    res["models"] = {name: {**cfg, **decode_ceiling(cfg, res["stream_GBps"])} for name, cfg in SHAPES.items()}
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="shorter timing windows")
    ap.add_argument("--json", metavar="FILE", help="write the measurements as JSON")
    args = ap.parse_args(argv)
    res = measure(args.threads, args.quick)
    print(f"memory read {res['read_GBps']:.1f} GB/s, copy {res['copy_GBps']:.1f} GB/s ({args.threads} threads)")
    print(f"GEMM 1024^3: fp32 {res['gemm_fp32_GFLOPs']:.0f} GFLOP/s, int8 MatMulInteger "
          f"{res['gemm_int8_GFLOPs']:.0f} GOP/s, MatMulNBits(8) {res['gemm_nbits8_GFLOPs']:.0f} GFLOP/s")
    print(f"GEMV 1x8192x8192 (weight streaming): fp32 {res['gemv_fp32_GBps']:.1f} GB/s, "
          f"MatMulNBits(8) {res['gemv_nbits8_GBps']:.1f} GB/s")
    print(f"ceiling bandwidth (best of the above) {res['stream_GBps']:.1f} GB/s")
    print(f"\n{'model':14} {'params/token':>13} {'fp32 tok/s':>11} {'int8 tok/s':>11} {'int4 tok/s':>11}")
    for name, m in res["models"].items():
        print(f"{name:14} {m['params_read_per_token']:>13,} {m['fp32_ceiling_tok_s']:>11,.0f} "
              f"{m['int8_ceiling_tok_s']:>11,.0f} {m['int4_ceiling_tok_s']:>11,.0f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=2)
        print(f"\nwrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
