"""Where does each decoded token's time go in edgelm? Three views of one model folder.

    python benchmarks/profile_decode.py MODEL_DIR [--threads 2] [--new-tokens 128] [--json FILE]

1. **split**: the real ``Model.generate`` loop with its ``run`` function wrapped by a timer (the runtime is
   not edited: ``Model._forward_fn`` is wrapped for this process only). Per decode token: time inside
   ``session.run`` versus the Python around it (sampling, log-probability, detokenizing, feeding).
2. **ops**: onnxruntime's own profiler over the same graph's decode steps, kernel time summed by operator
   type, so the share of the weight MatMuls versus everything else (attention glue, norms, KV concat) shows.
3. **options**: decode tokens/s through ``generate`` with the session rebuilt under other session options
   (thread count, spin-waiting), to test tuning ideas on the real loop.
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _prompt(lm, n: int) -> list[int]:
    from edgelm.bench import prompt_ids

    return prompt_ids(lm.tokenizer, n, lm.config.get("bos_token_id"))


def split(lm, prompt: list[int], new_tokens: int, repeat: int = 3) -> dict[str, Any]:
    """Per-token time inside run() and outside it, measured on the runtime's own decode loop.

    The model's ``_run_fn`` (the one function its decode loop calls per step) is wrapped by a timer on this
    instance only; the runtime's code is not changed.
    """
    calls: list[float] = []
    # The runtime calls one of these per step: _run_fn (feed dict, "concat" cache) or _run_bound (IO binding,
    # "shared" cache). Both are looked up on the instance at call time, so wrapping them here is enough.
    originals = {name: getattr(lm, name) for name in ("_run_fn", "_run_bound") if hasattr(lm, name)}

    def timer(fn):
        def timed(*a):
            t = time.perf_counter()
            out = fn(*a)
            calls.append(time.perf_counter() - t)
            return out
        return timed

    for name, fn in originals.items():
        setattr(lm, name, timer(fn))
    try:
        lm.generate(prompt, max_new_tokens=new_tokens, temperature=0, ignore_eos=True)  # warm-up
        rows = []
        for _ in range(repeat):
            calls.clear()
            g = lm.generate(prompt, max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
            decode_calls = calls[1:]  # calls[0] is the prefill
            per_token = 1.0 / g.decode_tokens_per_s
            mean_in = sum(decode_calls) / len(decode_calls)
            rows.append({"per_token_ms": per_token * 1e3, "median_in_run_ms": statistics.median(decode_calls) * 1e3,
                         "mean_in_run_ms": mean_in * 1e3, "outside_run_ms": (per_token - mean_in) * 1e3,
                         "prefill_run_ms": calls[0] * 1e3, "ttft_ms": g.time_to_first_token_s * 1e3})
    finally:
        for name, fn in originals.items():
            setattr(lm, name, fn)
    best = min(rows, key=lambda r: r["per_token_ms"])  # least disturbed by neighbours
    return {"runs": rows, "best": best}


# The weight matrices of a decoder layer (and the LM head) by node name, and the ops that multiply by them.
MATRIX = re.compile(r"(qkv_proj|q_proj|k_proj|v_proj|o_proj|gate_up_proj|gate_proj|up_proj|down_proj|lm_head)")
WEIGHT_OPS = ("MatMulNBits", "DynamicQuantizeMatMul", "MatMul", "MatMulInteger")


def op_profile(onnx_path: str, cfg: dict[str, Any], threads: int, prompt_len: int, steps: int) -> dict[str, Any]:
    """Kernel time per operator type over ``steps`` decode calls (onnxruntime's profiler), past = prompt_len, and
    of the weight matrices by kind (qkv_proj, gate_up_proj, lm_head, ...: the node names say which)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.enable_profiling = True
    tmp = tempfile.mkdtemp(prefix="edgelm-prof-")
    so.profile_file_prefix = os.path.join(tmp, "prof")
    so.log_severity_level = 3
    sess = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in sess.get_inputs()}
    kv, hd = cfg["num_kv_heads"], cfg["head_dim"]
    feed: dict[str, np.ndarray] = {"input_ids": np.array([[5]], dtype=np.int64)}
    if "attention_mask" in inputs:
        feed["attention_mask"] = np.ones((1, prompt_len + 1), dtype=np.int64)
    if "position_ids" in inputs:
        feed["position_ids"] = np.array([[prompt_len]], dtype=np.int64)
    # "concat" graphs take a cache of exactly the past length; "shared" ones a buffer of the whole context,
    # whose first mask-length slots are valid.
    past_len = cfg["context_length"] if cfg.get("onnx", {}).get("kv_cache") == "shared" else prompt_len
    for name, meta in inputs.items():
        if name.startswith("past_key_values"):
            # the graph's own static dims win (a padded head size, for instance); config.json fills the rest
            dims = [d if isinstance(d, int) else default for d, default in zip(meta.shape, (1, kv, past_len, hd))]
            feed[name] = np.random.default_rng(0).standard_normal(dims).astype(np.float32)
    nodes_after_optimisation = None
    # Run it the way the runtime does: with IO binding, and for "shared" graphs each layer's cache buffer bound
    # as both past and present, so the fused attention writes in place instead of into a fresh copy.
    shared = cfg.get("onnx", {}).get("kv_cache") == "shared"
    binding = sess.io_binding()
    values = {name: ort.OrtValue.ortvalue_from_numpy(arr) for name, arr in feed.items()}
    for name, value in values.items():
        binding.bind_ortvalue_input(name, value)
    for out in sess.get_outputs():
        past = out.name.replace("present.", "past_key_values.")
        if shared and past in values:
            binding.bind_ortvalue_output(out.name, values[past])
        else:
            binding.bind_output(out.name)
    for _ in range(3):
        sess.run_with_iobinding(binding)
    t = time.perf_counter()
    for _ in range(steps):
        sess.run_with_iobinding(binding)
    wall = (time.perf_counter() - t) / steps
    trace = sess.end_profiling()
    with open(trace) as f:
        events = json.load(f)
    by_op: dict[str, float] = collections.defaultdict(float)
    by_matrix: dict[str, float] = collections.defaultdict(float)
    node_names = set()
    model_run_us = []
    for ev in events:
        if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time"):
            op = ev["args"].get("op_name", "?")
            by_op[op] += ev["dur"]
            node_names.add(ev["name"])
            kind = MATRIX.search(ev["name"])
            if op in WEIGHT_OPS and kind:
                by_matrix[kind.group(1)] += ev["dur"]
        elif ev.get("cat") == "Session" and ev.get("name") == "model_run":
            model_run_us.append(ev["dur"])
    nodes_after_optimisation = len(node_names)
    runs = len(model_run_us)
    total = sum(by_op.values())
    for p in glob.glob(os.path.join(tmp, "*")):
        os.remove(p)
    os.rmdir(tmp)
    return {
        "steps": steps, "past": prompt_len, "wall_ms_per_step_profiled": wall * 1e3,
        "model_run_ms": statistics.median(model_run_us) / 1e3 if model_run_us else None,
        "kernel_ms_per_step": total / max(runs, 1) / 1e3,
        "nodes_executed": nodes_after_optimisation,
        "by_op_ms_per_step": {k: v / max(runs, 1) / 1e3 for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])},
        "share": {k: v / total for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])},
        "by_matrix_ms_per_step": {k: v / max(runs, 1) / 1e3
                                  for k, v in sorted(by_matrix.items(), key=lambda kv: -kv[1])},
    }


def options(model_path: str, threads: int, prompt: list[int], new_tokens: int,
            variants: dict[str, dict[str, Any]], repeat: int = 5) -> dict[str, dict[str, float]]:
    """Decode tokens/s through ``edgelm.load(...).generate()`` under other session options.

    Each variant loads the model with ``threads`` (or its own) and extra onnxruntime session config entries,
    injected by wrapping ``InferenceSession.__init__`` in this process, so the runtime itself is unchanged.
    The variants are interleaved (A, B, C, then A, B, C again...) so that a change in the machine's load
    during the measurement hits all of them alike; the first round is a warm-up.
    """
    import onnxruntime as ort

    import edgelm

    orig_init = ort.InferenceSession.__init__
    models = {}
    for name, v in variants.items():
        extra = v.get("config", {})

        def patched(self, path_or_bytes, sess_options=None, *a, _extra=extra, **k):
            if sess_options is not None:
                for key, value in _extra.items():
                    sess_options.add_session_config_entry(key, value)
            orig_init(self, path_or_bytes, sess_options, *a, **k)

        ort.InferenceSession.__init__ = patched
        try:
            models[name] = edgelm.load(v.get("path", model_path), threads=v.get("threads", threads),
                                       verify="path" not in v)
        finally:
            ort.InferenceSession.__init__ = orig_init
    speeds: dict[str, list[float]] = {name: [] for name in variants}
    tokens: dict[str, list[int]] = {}
    for r in range(repeat + 1):
        for name, lm in models.items():
            g = lm.generate(prompt, max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
            tokens[name] = list(g.token_ids)
            if r:
                speeds[name].append(g.decode_tokens_per_s)
    first = next(iter(tokens.values()))
    return {name: {"median": statistics.median(v), "best": max(v), "same_tokens": tokens[name] == first}
            for name, v in speeds.items()}


def without_output_identities(src: str, dst: str) -> int:
    """Copy a model folder, removing the ``Identity`` nodes that copy each layer's cache to ``present.*``.

    The tensor the Identity read is renamed to the graph output itself, so the Concat writes the output
    directly and the cache is not copied once more per layer per step. Returns the number of nodes removed.
    (An experiment for the exporter: the folder's manifest no longer matches, so it is loaded unverified.)
    """
    import shutil

    import onnx

    shutil.copytree(src, dst)
    path = Path(dst) / "model.onnx"
    model = onnx.load(str(path))
    g = model.graph
    outputs = {o.name for o in g.output}
    drop = [n for n in g.node if n.op_type == "Identity" and n.output[0] in outputs
            and n.input[0] not in outputs and not any(i.name == n.input[0] for i in g.input)]
    rename = {n.input[0]: n.output[0] for n in drop}
    for n in drop:
        g.node.remove(n)
    for n in g.node:
        for i, name in enumerate(n.input):
            if name in rename:
                n.input[i] = rename[name]
        for i, name in enumerate(n.output):
            if name in rename:
                n.output[i] = rename[name]
    for vi in g.value_info:
        if vi.name in rename:
            vi.name = rename[vi.name]
    onnx.save(model, str(path))
    return len(drop)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--steps", type=int, default=50, help="decode steps under onnxruntime's profiler")
    ap.add_argument("--repeat", type=int, default=5, help="interleaved rounds of the option variants")
    ap.add_argument("--skip-options", action="store_true")
    ap.add_argument("--graph-experiments", action="store_true",
                    help="also time graph edits (no Identity copies of the cache) against the folder as exported")
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--busy-core", action="store_true",
                    help="keep one core busy with a second process throughout (a laptop is never idle)")
    args = ap.parse_args(argv)
    busy = None
    if args.busy_core:
        import subprocess

        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(2)  # let it take its core before anything is measured
    try:
        return _profile(args)
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()


def _profile(args: argparse.Namespace) -> int:

    import edgelm

    lm = edgelm.load(args.model, threads=args.threads)
    prompt = _prompt(lm, args.prompt_tokens)
    res: dict[str, Any] = {"model": str(Path(args.model).resolve()), "threads": args.threads,
                           "dtype": lm.config.get("dtype"), "kv_cache": lm.config.get("onnx", {}).get("kv_cache"),
                           "loadavg_1min": os.getloadavg()[0], "busy_core": args.busy_core}
    res["split"] = split(lm, prompt, args.new_tokens)
    b = res["split"]["best"]
    print(f"per decode token {b['per_token_ms']:.3f} ms: inside session.run {b['mean_in_run_ms']:.3f} ms, "
          f"outside (Python) {b['outside_run_ms']:.3f} ms  [{lm.config.get('dtype')}, {args.threads} threads, "
          f"kv_cache {res['kv_cache']}]")
    res["ops"] = op_profile(str(lm.folder.onnx_path), lm.config, args.threads, args.prompt_tokens, args.steps)
    o = res["ops"]
    print(f"onnxruntime profiler: {o['nodes_executed']} nodes per step, kernels {o['kernel_ms_per_step']:.3f} ms of "
          f"model_run {o['model_run_ms']:.3f} ms per step")
    for op, share in list(o["share"].items())[:12]:
        print(f"  {op:28} {share * 100:5.1f} %  {o['by_op_ms_per_step'][op]:.4f} ms")
    if not args.skip_options:
        variants = {
            "default (runtime as shipped)": {},
            "1 thread": {"threads": 1},
            "no spin-wait": {"config": {"session.intra_op.allow_spinning": "0"}},
            "spin-wait": {"config": {"session.intra_op.allow_spinning": "1"}},
            "1 thread, no spin-wait": {"threads": 1, "config": {"session.intra_op.allow_spinning": "0"}},
        }
        tmp = tempfile.mkdtemp(prefix="edgelm-exp-")
        if args.graph_experiments:
            removed = without_output_identities(args.model, os.path.join(tmp, "no-identity"))
            variants[f"graph without {removed} output Identity copies"] = {"path": os.path.join(tmp, "no-identity")}
            variants["no spin-wait + no Identity copies"] = {
                "path": os.path.join(tmp, "no-identity"), "config": {"session.intra_op.allow_spinning": "0"}}
            variants["1 thread + no Identity copies"] = {"path": os.path.join(tmp, "no-identity"), "threads": 1}
        res["options"] = options(args.model, args.threads, prompt, args.new_tokens, variants, args.repeat)
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        for name, tps in res["options"].items():
            print(f"  {name:40} {tps['median']:8.1f} decode tok/s median, {tps['best']:8.1f} best"
                  f"{'' if tps['same_tokens'] else '  (DIFFERENT greedy tokens!)'}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
