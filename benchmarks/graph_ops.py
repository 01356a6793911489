"""What each engine's SmolLM2-135M-Instruct graph asks onnxruntime to run: node counts by operator and how the
weight matrices are quantized, read from the artifacts benchmarks/compare.py measured (no model is run).

    python benchmarks/graph_ops.py      # results/graph-ops-smollm2.md

The graphs as stored; onnxruntime's optimizer fuses a few more at load (Sigmoid + Mul into QuickGelu in edgelm's,
for example), so the nodes executed per decode step are a little fewer (edgelm int8: 315, profile_decode.py).
"""
from __future__ import annotations

import collections
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / ".cache" / "bench-models" / "SmolLM2-135M"
ENGINES = ("edgelm-int8", "edgelm-int8-block", "edgelm-int4", "ogenai-int8", "ogenai-int4")
OUT = ROOT / "benchmarks" / "results" / "graph-ops-smollm2.md"


def _attr(node, name):
    from onnx import helper

    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), None)


def describe(path: Path) -> dict:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    ops = collections.Counter(n.op_type for n in model.graph.node)
    kernels = collections.Counter()
    for n in model.graph.node:
        if n.op_type == "MatMulNBits":
            zp = len(n.input) > 3 and bool(n.input[3])
            kernels[f"MatMulNBits {_attr(n, 'bits')}-bit{' + zero points' if zp else ''}, "
                    f"accuracy {_attr(n, 'accuracy_level')}"] += 1
        elif n.op_type in ("DynamicQuantizeMatMul", "MatMulInteger", "MatMul"):
            kernels[n.op_type] += 1
    return {"nodes": sum(ops.values()), "ops": ops, "kernels": kernels}


def main() -> None:
    rows = {e: describe(MODELS / e / "model.onnx") for e in ENGINES if (MODELS / e / "model.onnx").is_file()}
    lines = ["Graph nodes of each engine's SmolLM2-135M-Instruct artifact (`python benchmarks/graph_ops.py`; the "
             "files benchmarks/compare.py measured).", "",
             "| engine | nodes | weight kernels | most frequent operators |", "|---|---:|---|---|"]
    for e, d in rows.items():
        kernels = "; ".join(f"{v} {k}" for k, v in d["kernels"].most_common())
        ops = ", ".join(f"{k} {v}" for k, v in d["ops"].most_common(8))
        lines.append(f"| {e} | {d['nodes']} | {kernels} | {ops} |")
    OUT.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
