"""benchmarks/graph_ops.py counts a graph's nodes by operator and its weight kernels."""
import importlib.util
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parents[1]


def test_describe_counts_the_shipped_models_graph():
    spec = importlib.util.spec_from_file_location("graph_ops", ROOT / "benchmarks" / "graph_ops.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    path = ROOT / "models" / "tinystories-edge-int8" / "model.onnx"
    d = mod.describe(path)
    nodes = onnx.load(str(path), load_external_data=False).graph.node
    assert d["nodes"] == len(nodes) == sum(d["ops"].values())
    weight_ops = sum(1 for n in nodes if n.op_type in ("MatMulNBits", "DynamicQuantizeMatMul", "MatMulInteger",
                                                        "MatMul"))
    assert weight_ops > 0 and sum(d["kernels"].values()) == weight_ops
    assert d["ops"]["DynamicQuantizeMatMul"] == d["kernels"].get("DynamicQuantizeMatMul", 0)
