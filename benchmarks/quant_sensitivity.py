"""How sensitive a real model's greedy chat answers and perplexity are to each kind of weight/activation error.

    python benchmarks/quant_sensitivity.py FP32_FOLDER --eval-text FILE [--variants ...]

FP32_FOLDER is an fp32 edgelm export (``edgelm export SRC --quantize none``). Each variant is built from its
graph with export/quantize.py (or, for ``fp16-round``, by rounding every 2-D fp32 weight to fp16 and back), then
scored with the runtime on the eval text and compared with fp32 on the 22 built-in chat prompts (greedy, up to 64
tokens; the share of each fp32 answer before the first differing token). Writes
benchmarks/results/quant-sensitivity-NAME.{json,md}. Answers the question "how far can 8-bit get on this
model": docs/models.md quotes it for SmolLM2-135M-Instruct.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = {  # name: (method, quantize_model keyword arguments, what it isolates)
    "fp16-round": (None, {}, "weights rounded to fp16, computed in fp32: a perturbation of ~0.05 %"),
    "int8-weights-only": ("int8-block", {"accuracy_level": 0}, "8-bit block weights, fp32 activations (slow kernel)"),
    "int8-block": ("int8-block", {}, "8-bit block weights, int8 activations per block of 32"),
    "int8-gemm": ("int8-gemm", {}, "int8 per-column weights, one uint8 activation scale per call"),
    "int8-block-offsets": ("int8-block", {"offsets": True},
                           "8-bit blocks as scale + float offset (0..255), int8 activations per block"),
    "int4-b16": ("int4", {"int4_block": 16, "offsets": False}, "4-bit blocks of 16, integer zero points, 8-bit LM head"),
    "int4-b32": ("int4", {"int4_block": 32, "offsets": False}, "4-bit blocks of 32, integer zero points (the former int4)"),
    "int4-b64": ("int4", {"int4_block": 64, "offsets": False}, "4-bit blocks of 64, integer zero points"),
    "int4-b32-down8": ("int4", {"int4_block": 32, "offsets": False, "down8": True},
                       "4-bit blocks of 32, zero points, every down_proj at 8 bits"),
    "int4-offsets": ("int4", {}, "4-bit blocks of 32 as scale + float offset (the int4 mode)"),
    "int4-offsets-b64": ("int4", {"int4_block": 64}, "4-bit blocks of 64 as scale + float offset"),
    "int4-offsets-acc0": ("int4", {"int4_accuracy_level": 0},
                          "int4 as scale + float offset, fp32 activations in the 4-bit matrices (accuracy level 0)"),
}


def _fp16_round(src: Path, dst: Path) -> None:
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from edgelm_export.quantize import save_onnx

    model = onnx.load(str(src))
    for i, t in enumerate(model.graph.initializer):
        a = numpy_helper.to_array(t)
        if a.dtype == np.float32 and a.ndim == 2:
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(a.astype(np.float16).astype(np.float32), t.name))
    save_onnx(model, dst)


def build(fp32: Path, name: str, out: Path) -> None:
    import onnx

    from edgelm.folder import write_manifest
    from edgelm_export import quantize as q

    method, kw, _ = VARIANTS[name]
    out.mkdir(parents=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "config.json"):
        shutil.copyfile(fp32 / f, out / f)
    if method is None:
        _fp16_round(fp32 / "model.onnx", out / "model.onnx")
    else:
        kw = dict(kw)
        level = kw.pop("accuracy_level", q.ACCURACY_LEVEL)
        if kw.pop("down8", False):
            nodes = [n.name for n in onnx.load(str(fp32 / "model.onnx"), load_external_data=False).graph.node
                     if "down_proj" in n.name and n.op_type == "MatMul"]
            kw["plan"] = {n: "block8" for n in nodes}
        level4 = kw.pop("int4_accuracy_level", None)
        saved, q.ACCURACY_LEVEL = q.ACCURACY_LEVEL, level
        try:
            q.quantize_model(fp32 / "model.onnx", out / "model.onnx", method=method, **kw)
        finally:
            q.ACCURACY_LEVEL = saved
        if level4 is not None:  # only the 4-bit matrices: 8-bit MatMulNBits at level 0 is the ~60x slower path
            model = onnx.load(str(out / "model.onnx"), load_external_data=False)
            for node in model.graph.node:
                if node.op_type == "MatMulNBits" and q._attr(node, "bits") == 4:
                    next(a for a in node.attribute if a.name == "accuracy_level").i = level4
            onnx.save_model(model, str(out / "model.onnx"))
    write_manifest(out, source={"model": f"quant_sensitivity {name}"})


def main() -> None:
    import edgelm
    from edgelm_export.evaluate import chat_agreement, chat_prompts, score_text

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("fp32", type=Path)
    ap.add_argument("--eval-text", type=Path, required=True)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--name", default="smollm2")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    text = args.eval_text.read_text(encoding="utf-8")
    ref = edgelm.load(str(args.fp32), verify=False, threads=args.threads)
    base = score_text(ref, text).perplexity
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgelm-sensitivity-") as tmp:
        for name in args.variants:
            t = time.perf_counter()
            build(args.fp32, name, Path(tmp) / name)
            lm = edgelm.load(str(Path(tmp) / name), verify=False, threads=args.threads)
            ppl = score_text(lm, text).perplexity
            share, _ = chat_agreement(ref, lm, chat_prompts())
            size = sum(p.stat().st_size for p in (Path(tmp) / name).glob("model.onnx*"))
            rows.append({"variant": name, "what": VARIANTS[name][2], "perplexity": ppl, "ppl_increase": ppl / base - 1,
                         "chat_prefix_agreement": share, "bytes": size})
            print(f"{name:18s} ppl {ppl:.4f} ({100 * (ppl / base - 1):+.2f} %) chat answers {100 * share:.1f} % "
                  f"{size / 1e6:.1f} MB ({time.perf_counter() - t:.0f} s)", flush=True)
            del lm
            shutil.rmtree(Path(tmp) / name)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"quant-sensitivity-{args.name}.json"
    old = json.loads(out.read_text(encoding="utf-8")) if out.is_file() else {}
    if old.get("eval_text") == args.eval_text.name and abs(old.get("fp32_perplexity", 0) - base) < 1e-4 * base:
        # a run of some variants updates those rows and keeps the others (same fp32 model and text)
        done = {r["variant"]: r for r in old["rows"]} | {r["variant"]: r for r in rows}
        rows = [dict(done[v], what=VARIANTS[v][2]) for v in VARIANTS if v in done]
    data = {"fp32": str(args.fp32), "eval_text": args.eval_text.name, "fp32_perplexity": base, "rows": rows}
    out.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    md = [f"fp32 perplexity {base:.4f} on {args.eval_text.name}; chat answers: share of each fp32 greedy answer (22 "
          "prompts, up to 64 tokens) before the first differing token.", "",
          "| variant | what it isolates | perplexity change | chat answers = fp32 | size |", "|---|---|---|---|---|"]
    md += [f"| `{r['variant']}` | {r['what']} | {100 * r['ppl_increase']:+.2f} % | {100 * r['chat_prefix_agreement']:.0f} % "
           f"| {r['bytes'] / 1e6:.0f} MB |" for r in rows]
    (RESULTS / f"quant-sensitivity-{args.name}.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    print("\n".join(md))


if __name__ == "__main__":
    main()
