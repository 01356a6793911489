"""Measure decode-step and prefill time of the quantization methods on a random mid-size Llama.

    python benchmarks/bench_quantize.py [--threads 2] [--steps 200]

Builds a random-weight Llama of the llama2.c "stories15M" shape (dim 288, 6 layers, 6 heads, MLP 768,
vocab 32000, tied embeddings; ``--shape smollm135m`` for SmolLM-135M's), exports it with our builder, quantizes it every way, and times one decode step
(best of ``--rounds`` medians over ``--steps``, 64 tokens of cache) and a 128-token prefill with onnxruntime. The numbers behind the
default ``--quantize int8`` are recorded in docs/export.md.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

SHAPES = {
    # llama2.c stories15M: 15M parameters (24M with the tied 32000-token embedding counted once)
    "stories15m": {"hidden_size": 288, "intermediate_size": 768, "num_hidden_layers": 6, "num_attention_heads": 6,
                       "num_key_value_heads": 6, "vocab_size": 32000},
    # SmolLM-135M: the shape shared/notes/performance.md measured
    "smollm135m": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                       "num_key_value_heads": 3, "vocab_size": 49152},
}


def _session(path: Path, threads: int, optimized_path: Path | None = None):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    if optimized_path is not None:
        opts.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _feeds(cfg, batch_ids, past_len):
    feeds = {"input_ids": batch_ids, "attention_mask": np.ones((1, past_len + batch_ids.shape[1]), np.int64),
             "position_ids": np.arange(past_len, past_len + batch_ids.shape[1], dtype=np.int64)[None]}
    d = cfg.hidden_size // cfg.num_attention_heads
    for i in range(cfg.num_hidden_layers):
        for kv in ("key", "value"):
            feeds[f"past_key_values.{i}.{kv}"] = np.random.rand(1, cfg.num_key_value_heads, past_len, d).astype(np.float32)
    return feeds


def _time(sess, feeds, steps: int) -> float:
    for _ in range(3):
        sess.run(None, feeds)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def main(argv: list[str] | None = None) -> None:
    import onnx
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from edgelm_export import quantize as q
    from edgelm_export.archs import llama

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="stories15m")
    ap.add_argument("--steps", type=int, default=100, help="decode steps per round (median)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--only", help="comma-separated variant names to time (default: all)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    cfg = LlamaConfig(**SHAPES[args.shape], max_position_embeddings=512, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        tmp = Path(tmp)
        graph, _ = llama.build(model, "llama", 512)
        fp32 = tmp / "fp32.onnx"
        onnx.save_model(graph, str(fp32))
        variants = {"fp32": fp32}
        for method in ("int8", "int8-block", "int4"):
            variants[method] = tmp / f"{method}.onnx"
            q.quantize_model(fp32, variants[method], method=method)
        # the alternatives to the defaults in quantize.py: other MatMulNBits accuracy levels and block sizes
        saved = (q.ACCURACY_LEVEL, dict(q.BLOCK_SIZE))
        for level, block in ((0, 32), (4, 32), (4, 128)):
            q.ACCURACY_LEVEL, q.BLOCK_SIZE[8] = level, block
            if (level, block) != (saved[0], saved[1][8]):
                variants[f"int8 acc{level} block{block}"] = tmp / f"int8-acc{level}-b{block}.onnx"
                q.quantize_model(fp32, variants[f"int8 acc{level} block{block}"], method="int8-block")
        q.ACCURACY_LEVEL, q.BLOCK_SIZE = saved[0], saved[1]
        if args.only:
            variants = {k: v for k, v in variants.items() if k in args.only.split(",")}
        decode = _feeds(cfg, np.array([[5]], np.int64), 64)
        prefill = _feeds(cfg, np.random.randint(0, 32000, (1, 128)).astype(np.int64), 0)
        sessions, rows = {}, {}
        for name, path in variants.items():
            opt = tmp / f"{path.stem}.opt.onnx"
            sessions[name] = _session(path, args.threads, opt)
            rows[name] = [path.stat().st_size / 1e6, len(onnx.load(str(path)).graph.node),
                          len(onnx.load(str(opt)).graph.node), [], []]
        # Other processes share the CPU: interleave the variants over several rounds and keep each one's best
        # round, so a busy moment does not land on one variant only.
        for _ in range(args.rounds):
            for name, sess in sessions.items():
                rows[name][3].append(_time(sess, decode, args.steps))
                rows[name][4].append(_time(sess, prefill, max(5, args.steps // 20)))
        print(f"{'variant':<22}{'MB':>7}{'nodes':>7}{'after ORT opt':>14}{'decode ms':>11}{'prefill128 ms':>15}")
        for name, (mb, nodes, opt_nodes, d, p) in rows.items():
            print(f"{name:<22}{mb:>7.1f}{nodes:>7}{opt_nodes:>14}{min(d):>11.3f}{min(p):>15.2f}")


if __name__ == "__main__":
    main()
