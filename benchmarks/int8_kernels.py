"""Where the gated int8's decode time goes on a real model, and which 8-bit layouts buy it back.

    python benchmarks/int8_kernels.py build   [--variants ...]   # quantize each variant from the fp32 folder
    python benchmarks/int8_kernels.py quality [--variants ...]   # perplexity + chat answers against fp32
    python benchmarks/int8_kernels.py speed   [--variants ...] --rounds 3 --threads 1 2
    python benchmarks/int8_kernels.py profile [--variants ...]   # per-matrix kernel time (onnxruntime profiler)
    python benchmarks/int8_kernels.py table                      # results/int8-kernels-smollm2.md from the JSON

The model is SmolLM2-135M-Instruct as exported by ``benchmarks/real_models.py prepare`` (its fp32 folder,
``.cache/bench-models/smollm2-135m-none``, is the source graph of every variant). Each variant is one 8-bit layout
of the 121 weight MatMuls, built with ``edgelm_export.quantize.quantize_model`` into ``.cache/int8-variants/``:
``MatMulNBits`` (bits=8, symmetric, accuracy level 4) with blocks of 32..256 input features, optionally with the LM
head on ``DynamicQuantizeMatMul`` or on its own block size. Quality is the runtime's ``score()`` on the first
20,000 characters of ``carroll-alice.txt`` and the greedy chat agreement with the fp32 folder (the export gate's
own measures). Speed is ``edgelm bench`` in a fresh process per measurement (128-token prompt, 128 forced new
tokens, greedy, one warm-up, ``--repeat`` timed runs), variants interleaved in a rotating order across rounds,
with the 1-minute load average recorded next to each run. Results: ``benchmarks/results/int8-kernels-smollm2.*``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("EDGELM_SHARED", ROOT.parent / "shared"))
BENCH_MODELS = ROOT / ".cache" / "bench-models"
FP32 = BENCH_MODELS / "smollm2-135m-none"
OUT = ROOT / ".cache" / "int8-variants"
RESULTS = ROOT / "benchmarks" / "results"
NAME = "int8-kernels-smollm2"
HEAD = "lm_head/MatMul"
# name: (block size of the layer matrices, block size of down_proj (K = 1536; None = the same), the LM head's
# kernel (None = as the layers, "gemm" = DynamicQuantizeMatMul, an int = its own block size; "calibrated" = the
# exporter's own int8 plan, and ("calibrated", X) that plan with X: "gemm" or a block size for the LM head, or
# {name part: block size} for the block-wise matrices whose node name contains it); what it tests).
# Every other matrix has K = 576 = 9 x 64: blocks of 128 or 256 would pad it to 640 / 768 (11 % / 33 % more
# bytes read per token, measured in the first run of this script), so 64 is the largest block they take.
VARIANTS: dict[str, tuple[int | None, int | None, Any, str]] = {
    "gemm": (None, None, "gemm", "every matrix DynamicQuantizeMatMul (int8-gemm: fails the gate; the speed reference)"),
    "b32": (32, None, None, "MatMulNBits 8-bit, blocks of 32 everywhere (the int8 default before this change)"),
    "b64": (64, None, None, "blocks of 64 everywhere"),
    "b128": (128, None, None, "blocks of 128 everywhere (K = 576 padded to 640)"),
    "b64-down256": (64, 256, None, "blocks of 64, down_proj 256"),
    "b32-head-gemm": (32, None, "gemm", "blocks of 32, LM head on DynamicQuantizeMatMul"),
    "b64-head-gemm": (64, None, "gemm", "blocks of 64, LM head on DynamicQuantizeMatMul"),
    "b64-down256-head-gemm": (64, 256, "gemm", "blocks of 64, down_proj 256, LM head DynamicQuantizeMatMul"),
    "int8": (32, None, "calibrated",
             "`--quantize int8` as exported now: calibrated plan, smoothed GEMMs where they pass"),
    "int8-head64": (32, None, ("calibrated", 64), "int8 as exported now, LM head blocks of 64"),
    "int8-head128": (32, None, ("calibrated", 128), "int8 as exported now, LM head blocks of 128 (K padded to 640)"),
    "int8-head-gemm": (32, None, ("calibrated", "gemm"), "int8 as exported now, LM head DynamicQuantizeMatMul"),
    "int8-b128": (32, None, ("calibrated", {"": 128}), "int8 as exported now, every block-wise matrix blocks of 128"),
    "int8-o128-head128": (32, None, ("calibrated", {"o_proj": 128, "lm_head": 128}),
                          "int8 as exported now, o_proj and LM head blocks of 128"),
}


def folder(name: str) -> Path:
    return OUT / name


def eval_text() -> str:
    return (SHARED / "corpus" / "classics" / "carroll-alice.txt").read_text(encoding="utf-8")[:20000]


def build(name: str, force: bool = False) -> Path:
    """Quantize the fp32 graph into ``folder(name)`` with the variant's layout; copy the folder's other files."""
    import onnx

    from edgelm.folder import write_manifest
    from edgelm_export import quantize as q

    out = folder(name)
    if (out / "edgelm.json").is_file() and not force:
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "config.json"):
        shutil.copyfile(FP32 / f, out / f)
    block, down, head, _ = VARIANTS[name]
    nodes = [n.name for n in onnx.load(str(FP32 / "model.onnx"), load_external_data=False).graph.node
             if n.op_type == "MatMul"]
    if block is None:
        info = q.quantize_model(FP32 / "model.onnx", out / "model.onnx", method="int8-gemm")
    elif head == "calibrated" or isinstance(head, tuple):
        # what `edgelm export --quantize int8` does with the fp32 graph, then (a tuple) the LM head changed
        from edgelm_export.assemble import int8_plan

        plan = int8_plan(FP32, json.loads((FP32 / "config.json").read_text()), 1)
        head = head[1] if isinstance(head, tuple) else None
        if head == "gemm":
            plan[HEAD] = "gemm"
        sizes = head if isinstance(head, dict) else {"lm_head": head} if isinstance(head, int) else {}
        original = q._nbits_node

        def nbits(node: Any, w_name: str, w: Any, bits: int, size: int, asym: bool) -> Any:
            size = next((b for part, b in sizes.items() if part in node.name), size)
            return original(node, w_name, w, bits, size, asym)

        q._nbits_node = nbits
        try:
            info = q.quantize_model(FP32 / "model.onnx", out / "model.onnx", method="int8", plan=plan)
        finally:
            q._nbits_node = original
    else:
        plan = {n: "block" for n in nodes}
        if head == "gemm":
            plan[HEAD] = "gemm"
        blocks = {n: down for n in nodes if down and "down_proj" in n}
        if isinstance(head, int):
            blocks[HEAD] = head
        original = q._nbits_node

        def nbits(node: Any, w_name: str, w: Any, bits: int, size: int, asym: bool) -> Any:
            # the quantizer's own node builder, with this variant's block size (per node where the plan says)
            return original(node, w_name, w, bits, blocks.get(node.name, block), asym)

        q._nbits_node = nbits
        try:
            info = q.quantize_model(FP32 / "model.onnx", out / "model.onnx", method="int8", plan=plan)
        finally:
            q._nbits_node = original
    write_manifest(out, source={"model": f"int8_kernels {name}", "quantization": info})
    return out


def quality(names: list[str], threads: int) -> dict[str, dict[str, float]]:
    import edgelm
    from edgelm_export.evaluate import chat_agreement, chat_prompts

    text = eval_text()
    ref = edgelm.load(str(FP32), verify=False, threads=threads)
    base = ref.score(text).perplexity
    rows = {}
    for name in names:
        t = time.perf_counter()
        lm = edgelm.load(str(build(name)), verify=False, threads=threads)
        ppl = lm.score(text).perplexity
        share, _ = chat_agreement(ref, lm, chat_prompts())
        rows[name] = {"perplexity": ppl, "ppl_increase": ppl / base - 1, "chat_prefix_agreement": share,
                      "bytes": sum(p.stat().st_size for p in folder(name).glob("model.onnx*"))}
        print(f"{name:16s} ppl {ppl:.4f} ({100 * (ppl / base - 1):+.2f} %) chat answers {100 * share:.1f} % "
              f"({time.perf_counter() - t:.0f} s)", flush=True)
        del lm
    return {"fp32_perplexity": base, "rows": rows}


def speed(names: list[str], rounds: int, threads: list[int], repeat: int) -> list[dict[str, Any]]:
    """``edgelm bench`` per (round, threads, variant), the variants in an order rotated by one each round."""
    from real_models import _bench  # `edgelm bench` in a fresh process, its JSON back

    n = len(names)
    schedule = [(r, t, v) for r in range(rounds) for t in threads for v in names[r % n:] + names[:r % n]]
    runs = []
    for r, t, name in schedule:
        res = _bench(build(name), t, repeat)
        row = {"variant": name, "threads": t, "round": r, "load_average": os.getloadavg()[0],
               "decode_tokens_per_s": res["decode_tokens_per_s"]["median"],
               "time_to_first_token_s": res["time_to_first_token_s"]["median"],
               "peak_rss_bytes": res["peak_rss_bytes"], "spin": res["spin"]}
        runs.append(row)
        print(f"round {r} threads {t} {name:16s} {row['decode_tokens_per_s']:7.1f} tok/s TTFT "
              f"{1e3 * row['time_to_first_token_s']:6.1f} ms load {row['load_average']:.2f}", flush=True)
    return runs


def profile(name: str, threads: int = 1, steps: int = 60) -> dict[str, Any]:
    """Kernel time per decode step by matrix kind (qkv, o, gate_up, down, lm_head) and by operator type:
    onnxruntime's profiler over ``steps`` decode calls at past length 128 (profile_decode.op_profile)."""
    from profile_decode import op_profile

    path = build(name)
    p = op_profile(str(path / "model.onnx"), json.loads((path / "config.json").read_text()), threads, 128, steps)
    return {"threads": threads, "steps": steps, "past": 128, "load_average": os.getloadavg()[0],
            "nodes_per_step": p["nodes_executed"],
            "kernel_ms": p["kernel_ms_per_step"], "by_matrix_ms": p["by_matrix_ms_per_step"],
            "by_op_ms": p["by_op_ms_per_step"]}


def _load() -> dict[str, Any]:
    path = RESULTS / f"{NAME}.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _save(data: dict[str, Any]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{NAME}.json").write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def table() -> str:
    data = _load()
    q = data.get("quality", {}).get("rows", {})
    runs = data.get("speed", {}).get("runs", [])
    threads = sorted({r["threads"] for r in runs})
    names = [n for n in VARIANTS if n in q or any(r["variant"] == n for r in runs)]

    def cell(name: str, t: int, key: str, scale: float, fmt: str) -> str:
        v = [r[key] * scale for r in runs if r["variant"] == name and r["threads"] == t]
        if not v:
            return "—"
        return f"{statistics.median(v):{fmt}} [{min(v):{fmt}}-{max(v):{fmt}}]" if key.startswith("decode") \
            else f"{statistics.median(v):{fmt}}"

    head = ["variant", "layout", "perplexity change", "chat answers = fp32", "size"]
    for t in threads:
        head += [f"decode tok/s, {t} thr", f"TTFT ms, {t} thr"]
    head.append("peak RSS")
    lines = [f"| {' | '.join(head)} |", "|" + "---|" * len(head)]
    for n in names:
        r = q.get(n, {})
        row = [f"`{n}`", VARIANTS[n][3],
               f"{100 * r['ppl_increase']:+.2f} %" if r else "—",
               f"{100 * r['chat_prefix_agreement']:.0f} %" if r else "—",
               f"{r['bytes'] / 1e6:.0f} MB" if r else "—"]
        for t in threads:
            row += [cell(n, t, "decode_tokens_per_s", 1, ".0f"), cell(n, t, "time_to_first_token_s", 1e3, ".0f")]
        rss = [x["peak_rss_bytes"] for x in runs if x["variant"] == n]
        row.append(f"{statistics.median(rss) / 2**20:.0f} MiB" if rss else "—")
        lines.append(f"| {' | '.join(row)} |")
    loads = [r["load_average"] for r in runs]
    sp = data.get("speed", {})
    intro = (f"SmolLM2-135M-Instruct, edgelm {sp.get('edgelm_commit', '?')}, {sp.get('rounds', '?')} interleaved "
             f"rounds of `edgelm bench` (fresh process each, {sp.get('repeat', '?')} timed runs; median [min-max] "
             f"over rounds), 1-minute load average {min(loads, default=0):.2f}-{max(loads, default=0):.2f} "
             f"(2 vCPUs shared with other jobs). Quality: `score()` on carroll-alice.txt's first 20,000 characters "
             f"(fp32 perplexity {data.get('quality', {}).get('fp32_perplexity', float('nan')):.4f}) and the share of "
             f"each fp32 greedy chat answer kept (22 prompts, 64 tokens).")
    out = [intro, "", *lines]
    prof = data.get("profile", {})
    if prof:
        kinds = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head"]
        loads = [p["load_average"] for p in prof.values() if "load_average" in p]
        out += ["", f"Kernel time per decode step by matrix (onnxruntime profiler, 1 thread, past 128, ms; "
                    f"profiling itself adds overhead, compare rows with each other"
                    + (f"; load average {min(loads):.2f}-{max(loads):.2f}" if loads else "") + "):", "",
                "| variant | " + " | ".join(kinds) + " | all weight matrices | attention | everything |",
                "|---|" + "---:|" * (len(kinds) + 3)]
        for n, p in prof.items():
            m = p["by_matrix_ms"]
            out.append(f"| `{n}` | " + " | ".join(f"{m.get(k, 0):.2f}" for k in kinds)
                       + f" | {sum(m.values()):.2f} | {p['by_op_ms'].get('GroupQueryAttention', 0):.2f} | "
                         f"{p['kernel_ms']:.2f} |")
    text = "\n".join(out) + "\n"
    (RESULTS / f"{NAME}.md").write_text(text, encoding="utf-8")
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=["build", "quality", "speed", "profile", "table"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--force", action="store_true", help="rebuild variant folders that exist")
    args = ap.parse_args()
    if args.command == "build":
        for n in args.variants:
            t = time.perf_counter()
            build(n, force=args.force)
            print(f"{n}: {folder(n)} ({time.perf_counter() - t:.0f} s)", flush=True)
        return
    data = _load()
    if args.command == "quality":
        res = quality(args.variants, args.threads[-1])
        old = data.get("quality", {"rows": {}})
        old["fp32_perplexity"] = res["fp32_perplexity"]
        old["rows"].update(res["rows"])
        data["quality"] = old
    elif args.command == "speed":
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
        runs = speed(args.variants, args.rounds, args.threads, args.repeat)
        data["speed"] = {"edgelm_commit": commit, "rounds": args.rounds, "repeat": args.repeat,
                         "spin_env": os.environ.get("EDGELM_SPIN"), "runs": runs}
    elif args.command == "profile":
        data.setdefault("profile", {}).update({n: profile(n) for n in args.variants})
        for n, p in data["profile"].items():
            print(n, {k: round(v, 3) for k, v in p["by_matrix_ms"].items()}, f"kernels {p['kernel_ms']:.2f} ms")
    if args.command != "table":
        _save(data)
    print(table())


if __name__ == "__main__":
    main()
