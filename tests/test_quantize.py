"""export/quantize.py: the weight formats, checked on their own numbers and through onnxruntime."""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("onnx")

from edgelm_export import quantize as q  # noqa: E402


def _weights(k: int, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)).astype(np.float32) * 0.05
    w[:, 3] *= 20  # one loud output channel: its scale must not leak into the others
    w[:, 5] = 0.0  # an all-zero channel must not divide by zero
    return w


def test_per_channel_round_trip_error_is_half_a_step_per_column():
    w = _weights(96, 40)
    qw, scales = q.quantize_columns(w)
    assert qw.dtype == np.int8 and qw.shape == w.shape and scales.shape == (40,)
    assert qw.min() >= -127 and qw.max() <= 127
    err = np.abs(qw.astype(np.float32) * scales - w)
    assert np.all(err <= scales / 2 + 1e-7)
    assert np.all(qw[:, 5] == 0)
    # each column's scale is its own: the loud column 3 does not coarsen column 0
    assert scales[3] > 10 * scales[0]


@pytest.mark.parametrize("bits", [8, 4])
def test_block_round_trip_error_is_half_a_step_per_block(bits):
    w = _weights(80, 24)  # 80 is not a multiple of 32: the last block is zero-padded
    b, scales = q.quantize_blocks(w, bits, 32)
    back = q.dequantize_blocks(b, scales, bits, 80)
    assert back.shape == w.shape
    step = scales.reshape(24, -1).max(axis=1)  # the coarsest block of each column bounds its error
    assert np.all(np.abs(back - w) <= step[None, :] / 2 + 1e-7)


def _one_matmul(tmp_path, w: np.ndarray):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    k, n = w.shape
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "s", k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "s", n])],
                          [numpy_helper.from_array(w, "W")])
    path = tmp_path / "fp32.onnx"
    onnx.save_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.mark.parametrize("method,op,rel", [("int8", "DynamicQuantizeMatMul", 0.03),
                                           ("int8-block", "MatMulNBits", 0.03),
                                           ("int4", "MatMulNBits", 0.25)])
def test_quantized_matmul_matches_fp32_in_onnxruntime(tmp_path, method, op, rel):
    import onnx
    import onnxruntime as ort

    w = _weights(128, 64)
    src = _one_matmul(tmp_path, w)
    dst = tmp_path / f"{method}.onnx"
    info = q.quantize_model(src, dst, method=method)
    assert info["method"] == method and info["matmuls"] == 1 and info["bytes"] < src.stat().st_size
    json.dumps(info)  # goes into the manifest as is
    graph = onnx.load(str(dst)).graph
    assert [node.op_type for node in graph.node] == [op]
    assert "W" not in {t.name for t in graph.initializer}  # the fp32 weight is gone
    x = np.random.default_rng(1).standard_normal((1, 7, 128)).astype(np.float32)  # prefill-like: 7 rows
    sess = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
    for rows in (x, x[:, :1]):  # and a decode step
        y = sess.run(None, {"x": rows})[0]
        ref = rows @ w
        assert np.abs(y - ref).max() <= rel * np.abs(ref).max()


def test_unknown_method_is_refused(tmp_path):
    src = _one_matmul(tmp_path, _weights(32, 8))
    with pytest.raises(ValueError, match="int3"):
        q.quantize_model(src, tmp_path / "x.onnx", method="int3")
