"""``int4-fp32`` (export/quantize.py): int4's weights with fp32 activations, and every table stored so that a GGUF's
own Q4_1 / Q8_0 values come back exactly. On weights already on those grids the quantized graph must compute what
the fp32 graph computes (to fp32 summation order), where int4 (activations int8 per block, per-row embeddings)
is measurably off. The real-model check (all of SmolLM2-135M-Instruct's greedy chat answers) is in
tests/test_real_smollm2.py."""
from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")

from edgelm_export import quantize as q  # noqa: E402
from test_quantize import _decoder_like_matmuls, _q4_1_grid, _run_all  # noqa: E402


def _q8_0_grid(k: int, n: int, seed: int = 0) -> np.ndarray:
    """A weight [K, N] on llama.cpp's Q8_0 grid: per block of 32 along K, d * q with an fp16 d and q in
    -127..127, each block reaching +-127 (Q8_0's d is the block's max |w| / 127)."""
    rng = np.random.default_rng(seed)
    nb = k // 32
    d = (np.abs(rng.standard_normal((n, nb, 1))) * 0.002 + 1e-4).astype(np.float16).astype(np.float32)
    levels = rng.integers(-127, 128, (n, nb, 32))
    levels[..., 0] = np.where(rng.random((n, nb)) < 0.5, -127, 127)
    return np.ascontiguousarray((d * levels).reshape(n, k).T.astype(np.float32))


def _ops(path):
    return [n for n in onnx.load(str(path)).graph.node]


def test_split_int8_halves_hold_every_8_bit_value_exactly():
    """s = 16 hi + lo for every s in -127..127, with hi and lo in 4-bit range: the split loses nothing."""
    w = _q8_0_grid(64, 8, seed=3)
    b, scales, _ = q.quantize_blocks(w, 8, 32)
    assert np.array_equal(q.dequantize_blocks(b, scales, 8, 64), w)  # the grid itself is reproduced
    s = np.arange(-127, 128)
    lo = s & 15
    hi = (s - lo) // 16
    assert lo.min() == 0 and lo.max() == 15 and hi.min() >= -8 and hi.max() <= 7
    assert np.array_equal(16 * hi + lo, s)


def test_int4_fp32_computes_the_fp32_graph_on_gguf_grids(tmp_path):
    """A Q8_0 embedding table, a Q4_1 matrix and a Q8_0 LM head ([96, 512]: found by its shape): int4-fp32
    gives the fp32 graph's outputs to 1e-5 of their range; int4 (int8 activations, per-row embeddings) cannot."""
    table_q8 = _q8_0_grid(96, 512, seed=4).T.copy()  # [vocab 512, hidden 96], blocks of 32 along the hidden axis
    ws = [_q4_1_grid(96, 40, seed=1), _q8_0_grid(96, 512, seed=2)]
    src, _ = _decoder_like_matmuls(tmp_path, ws, 96)
    model = onnx.load(str(src))
    table = next(t for t in model.graph.initializer if t.name == "table")
    table.CopyFrom(onnx.numpy_helper.from_array(table_q8, "table"))
    # the head's output is the logits, of static width: that is how the exporter tells the table (vocab rows)
    next(n for n in model.graph.node if n.name == "mm1").output[0] = "logits"
    model.graph.output[1].CopyFrom(onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [1, "s", 512]))
    onnx.save_model(model, str(src))
    ids = [3, 1, 4, 1, 5, 9, 2]
    refs = [table_q8[ids] @ w for w in ws]

    dst = tmp_path / "int4-fp32.onnx"
    info = q.quantize_model(src, dst, method="int4-fp32")
    assert info["accuracy_level"] == 0 and info["embedding_block_size"] == 32 and info["int8_matmuls"] == 1
    assert "activations fp32" in info["weights"] and "two 4-bit halves" in info["weights"]
    nodes = _ops(dst)
    nbits = [n for n in nodes if n.op_type == "MatMulNBits"]
    assert len(nbits) == 2 and all(q._attr(n, "accuracy_level") == 0 and q._attr(n, "bits") == 4 for n in nbits)
    head = next(n for n in nbits if n.name == "mm1")
    assert q._attr(head, "K") == 2 * 96  # [x, x] against [W_hi; W_lo]
    assert "table" not in {t.name for t in onnx.load(str(dst)).graph.initializer}  # the table is int8 now
    for _ in range(2):  # a prefill of 7 rows, then one row (a decode step)
        got = _run_all(dst, ids)
        for y, ref in zip(got, refs):
            np.testing.assert_allclose(y[0], ref, rtol=0, atol=1e-5 * np.abs(ref).max())
        ids, refs = ids[-1:], [r[-1:] for r in refs]

    ids = [3, 1, 4, 1, 5, 9, 2]
    refs = [table_q8[ids] @ w for w in ws]
    int4 = tmp_path / "int4.onnx"
    q.quantize_model(src, int4, method="int4")
    errs = [np.abs(y[0] - ref).max() / np.abs(ref).max() for y, ref in zip(_run_all(int4, ids), refs)]
    assert min(errs) > 1e-3, errs  # what the test would see if activations or tables were rounded


def test_block_scaled_rows_keep_static_shapes_where_the_ids_rank_is_known(tmp_path):
    """The block-scaled rows go back to [*ids.shape, hidden] through a constant Reshape target when the ids are a
    graph input of known rank, so shape inference still knows every later tensor (a target computed in the graph
    hid them from onnxruntime's planner: a 128-token prefill of SmolLM2 peaked ~90 MB higher); ids that arrive
    through another op (a Cast here) keep the computed target. Both give the Q8_0 table's rows exactly."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper, shape_inference

    table = _q8_0_grid(64, 300, seed=5).T.copy()  # [vocab 300, hidden 64]
    w = np.random.default_rng(7).standard_normal((64, 300)).astype(np.float32)
    for via_cast in (False, True):
        ids = "ids64" if via_cast else "input_ids"
        nodes = [helper.make_node("Cast", ["input_ids"], ["ids64"], name="cast", to=TensorProto.INT64)
                 ] if via_cast else []
        g = helper.make_graph(
            nodes + [helper.make_node("Gather", ["table", ids], ["x"], name="embed"),
                     helper.make_node("Relu", ["x"], ["h"], name="after"),
                     helper.make_node("MatMul", ["h", "W"], ["logits"], name="mm")], "g",
            [helper.make_tensor_value_info("input_ids", TensorProto.INT32 if via_cast else TensorProto.INT64,
                                           [1, "s"])],
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, None),
             helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "s", 300])],
            [numpy_helper.from_array(table, "table"), numpy_helper.from_array(w, "W")])
        src, dst = tmp_path / f"c{via_cast}.onnx", tmp_path / f"c{via_cast}-q.onnx"
        onnx.save_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(src))
        q.quantize_model(src, dst, method="int4-fp32", keep_fp32=("lm_head",))
        model = onnx.load(str(dst))
        ops = [n.op_type for n in model.graph.node]
        assert ("Shape" in ops) == via_cast  # computed only where the ids' rank is not declared
        inferred = {v.name: v for v in shape_inference.infer_shapes(model).graph.value_info}
        if not via_cast:
            dims = [d.dim_value or d.dim_param for d in inferred["h"].type.tensor_type.shape.dim]
            assert dims == [1, "s", 64], dims
        x = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"]).run(
            ["x"], {"input_ids": np.asarray([[7, 0, 299]], np.int32 if via_cast else np.int64)})[0]
        assert np.array_equal(x[0], table[[7, 0, 299]])


def test_block_scaled_embeddings_keep_any_ids_shape(tmp_path):
    """The block-scaled table's rows are reshaped back to [*ids.shape, hidden] whatever the ids' rank, and equal a
    Q8_0 table exactly; a table whose width is not whole blocks keeps one scale per row."""
    from onnx import TensorProto, helper, numpy_helper

    import onnxruntime as ort

    for hidden, blocked in ((64, True), (40, False)):
        table = (_q8_0_grid(64, 300, seed=5).T[:, :hidden] if blocked
                 else np.random.default_rng(6).standard_normal((300, hidden)).astype(np.float32))
        w = np.random.default_rng(7).standard_normal((hidden, 300)).astype(np.float32)
        g = helper.make_graph(  # the logits' static width tells the vocabulary, so the table is found
            [helper.make_node("Gather", ["table", "input_ids"], ["x"], name="embed"),
             helper.make_node("MatMul", ["x", "W"], ["logits"], name="mm")], "g",
            [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "s"])],
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, None),
             helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "s", 300])],
            [numpy_helper.from_array(np.ascontiguousarray(table), "table"), numpy_helper.from_array(w, "W")])
        src, dst = tmp_path / f"e{hidden}.onnx", tmp_path / f"e{hidden}-q.onnx"
        onnx.save_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(src))
        info = q.quantize_model(src, dst, method="int4-fp32", keep_fp32=("lm_head",))
        assert info["embeddings"] == ["table"]
        x = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"]).run(
            ["x"], {"input_ids": np.asarray([[7, 0, 299]], np.int64)})[0]
        assert x.shape == (1, 3, hidden)
        if blocked:
            assert np.array_equal(x[0], table[[7, 0, 299]])
        else:
            assert np.abs(x[0] - table[[7, 0, 299]]).max() <= np.abs(table).max() / 127


def _norm_head_graph(path, table: np.ndarray, gamma: np.ndarray, head: np.ndarray):
    """ids -> Gather(table) -> Mul(gamma) (a norm's weight) -> MatMul(head) -> logits [1, s, vocab], saved at path."""
    from onnx import TensorProto, helper, numpy_helper

    g = helper.make_graph(
        [helper.make_node("Gather", ["table", "input_ids"], ["e"], name="embed"),
         helper.make_node("Mul", ["e", "gamma"], ["x"], name="norm"),
         helper.make_node("MatMul", ["x", "lm_head.weight"], ["logits"], name="lm_head")], "g",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "s"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "s", head.shape[1]])],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(gamma, "gamma"),
         numpy_helper.from_array(np.ascontiguousarray(head), "lm_head.weight")])
    onnx.save_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_int8_ranks_only_a_large_head_whose_gemm_fails_calibration(tmp_path, monkeypatch):
    """Rescoring is for a large head whose plain GEMM fails the calibration rule. Where the plan puts the head on
    the GEMM as it is (small models without outliers), int8 keeps it plain, and a head under
    GEMM_RANK_MIN_WEIGHTS keeps the plan's block kernel: no TopK, no rescoring nodes in a step that may be a tenth
    of a millisecond, and the table keeps one scale per row."""
    from onnx import TensorProto, helper, numpy_helper

    table = _q8_0_grid(96, 512, seed=4).T.copy()
    g = helper.make_graph(
        [helper.make_node("Gather", ["table", "input_ids"], ["x"], name="embed"),
         helper.make_node("MatMul", ["x", "lm_head.weight"], ["logits"], name="lm_head")], "g",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "s"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "s", 512])],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(np.ascontiguousarray(table.T), "lm_head.weight")])
    src = tmp_path / "tied.onnx"
    onnx.save_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    plain = q.quantize_model(src, tmp_path / "plain.onnx", method="int8", plan=q.Int8Plan({"lm_head": "gemm"}))
    assert [n.op_type for n in _ops(tmp_path / "plain.onnx")][-1] == "DynamicQuantizeMatMul"
    assert "rescored_top" not in plain and "embedding_block_size" not in plain and plain["gemm_matmuls"] == 1
    small = q.quantize_model(src, tmp_path / "small.onnx", method="int8", plan=q.Int8Plan({"lm_head": "block"}))
    assert 96 * 512 < q.GEMM_RANK_MIN_WEIGHTS and "rescored_top" not in small and small["block_matmuls"] == 1
    monkeypatch.setattr(q, "GEMM_RANK_MIN_WEIGHTS", 96 * 512)
    ranked = q.quantize_model(src, tmp_path / "ranked.onnx", method="int8", plan=q.Int8Plan({"lm_head": "block"}))
    assert ranked["rescored_top"] == q.GEMM_RESCORE_TOP and ranked["embedding_block_size"] == 32


@pytest.mark.parametrize("method", q.RESCORED_HEADS)
def test_a_head_tied_to_a_scaled_table_is_rescored_over_the_scale(tmp_path, monkeypatch, method):
    """Gemma folds its embedding scale sqrt(hidden) into the table, so the table is the head times a scalar: still a
    tie (the block-scaled rows are the head's 8-bit values times it), and the rescoring divides the scale out."""
    monkeypatch.setattr(q, "GEMM_RANK_MIN_WEIGHTS", 0)
    head = _q8_0_grid(96, 512, seed=4)  # [hidden 96, vocab 512]
    scale = np.float32(np.sqrt(96.0))
    table = np.ascontiguousarray(head.T * scale)
    gamma = np.random.default_rng(8).uniform(0.5, 1.5, 96).astype(np.float32)
    src, dst = _norm_head_graph(tmp_path / "scaled.onnx", table, gamma, head), tmp_path / "scaled-q.onnx"
    assert q._tie_scale(table, head) == pytest.approx(scale, rel=1e-6)
    assert q._tie_scale(table + 0.01, head) is None
    info = q.quantize_model(src, dst, method=method)
    assert "rescored exactly" in info["weights"]
    ids = [3, 1, 4, 1, 5, 9, 2]
    ref = (table[ids] * gamma) @ head
    got = _run_all(dst, ids)[0][0]
    best = ref.argmax(axis=-1)
    assert np.array_equal(got.argmax(axis=-1), best)
    np.testing.assert_allclose(got[np.arange(len(best)), best], ref[np.arange(len(best)), best], rtol=0,
                               atol=1e-5 * np.abs(ref).max())


def test_keep_fp32_lm_head_leaves_the_norm_before_it_alone(tmp_path, monkeypatch):
    """--keep-fp32 lm_head with a plan that would smooth the head's ranking GEMM: the head stays an fp32 MatMul, so
    nothing may be folded into the final norm (an fp32 head reading x / s would be wrong by s)."""
    from onnx import numpy_helper

    monkeypatch.setattr(q, "GEMM_RANK_MIN_WEIGHTS", 0)
    table = _q8_0_grid(96, 512, seed=4).T.copy()
    gamma = np.random.default_rng(8).uniform(0.5, 1.5, 96).astype(np.float32)
    src, dst = _norm_head_graph(tmp_path / "tied.onnx", table, gamma, table.T), tmp_path / "kept.onnx"
    plan = q.Int8Plan({"lm_head": "block"}, head_smooth={"lm_head": np.full(96, 3.0, np.float32)})
    info = q.quantize_model(src, dst, method="int8", plan=plan, keep_fp32=("lm_head",))
    assert "rescored_top" not in info and [n.op_type for n in _ops(dst)][-1] == "MatMul"
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(dst)).graph.initializer}
    np.testing.assert_array_equal(inits["gamma"], gamma)
    ids = [3, 1, 4]  # the logits stay fp32's up to the int8 embedding rows (they would be off by 3x if folded)
    ref = _run_all(src, ids)[0][0]
    np.testing.assert_allclose(_run_all(dst, ids)[0][0], ref, rtol=0, atol=0.02 * np.abs(ref).max())


@pytest.mark.parametrize("method,smoothed", [(m, False) for m in q.RESCORED_HEADS]
                         + [(m, True) for m in q.RESCORED_HEADS if q.RANK_KERNEL.get(m) == "gemm"])
def test_a_tied_head_ranks_on_the_fast_kernel_and_rescores_its_best_exactly(tmp_path, monkeypatch, method,
                                                                           smoothed):
    """A head tied to the (Q8_0) embedding table runs on a fast 8-bit kernel with int8 activations (int4 and
    int4-fp32: 8-bit blocks; int8: the GEMM, optionally smoothed into the norm before it), and its best
    RESCORE_TOP (GEMM_RESCORE_TOP) tokens per position are scored again in fp32 from the block-scaled table: every
    row's best token and its logit are the fp32 graph's; the rest keep the fast kernel's approximate values."""
    from onnx import numpy_helper

    gemm = q.RANK_KERNEL.get(method) == "gemm"
    monkeypatch.setattr(q, "GEMM_RANK_MIN_WEIGHTS", 0)  # a head of 49,152 weights, far under SmolLM2's 28M

    table = _q8_0_grid(96, 512, seed=4).T.copy()  # [vocab 512, hidden 96]; the head is its transpose (tied)
    gamma = np.random.default_rng(8).uniform(0.5, 1.5, 96).astype(np.float32)  # a norm's weight: off the grid
    src, dst = _norm_head_graph(tmp_path / "tied.onnx", table, gamma, table.T), tmp_path / "tied-q.onnx"
    scales = np.random.default_rng(9).uniform(0.25, 4.0, 96).astype(np.float32)
    plan = q.Int8Plan({}, head_smooth={"lm_head": scales} if smoothed else None) if method == "int8" else None
    assert q.smoothable(onnx.load(str(src))) == {"lm_head": ["gamma"]}
    info = q.quantize_model(src, dst, method=method, plan=plan)
    top = q.GEMM_RESCORE_TOP if gemm else q.RESCORE_TOP
    assert info["rescored_top"] == top and "rescored exactly" in info["weights"]
    assert info["rank_kernel"] == ("gemm" if gemm else "block") and info["rank_smoothed"] == smoothed
    assert info["embeddings"] == ["table"] and info["embedding_block_size"] == 32
    ops = [n.op_type for n in _ops(dst)]
    assert "TopK" in ops and "ScatterElements" in ops
    head = next(n for n in _ops(dst) if n.name == "lm_head")  # one 8-bit head over x, not two halves over [x, x]
    if gemm:
        assert head.op_type == "DynamicQuantizeMatMul" and info["gemm_matmuls"] == 1
    else:
        assert q._attr(head, "bits") == 8 and q._attr(head, "K") == 96
        assert q._attr(head, "accuracy_level") == q.ACCURACY_LEVEL
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(dst)).graph.initializer}
    np.testing.assert_allclose(inits["gamma"], gamma / scales if smoothed else gamma, rtol=1e-6)
    ids = [3, 1, 4, 1, 5, 9, 2]
    ref = (table[ids] * gamma) @ table.T
    for rows in (slice(None), slice(-1, None)):  # a prefill, then one decode row
        got = _run_all(dst, ids[rows])[0][0]
        r = ref[rows]
        best = r.argmax(axis=-1)
        assert np.array_equal(got.argmax(axis=-1), best)
        np.testing.assert_allclose(got[np.arange(len(best)), best], r[np.arange(len(best)), best], rtol=0,
                                   atol=1e-5 * np.abs(r).max())
    # the tail is the fast kernel's: int8 activations move it (what the rescoring corrects at the top)
    assert np.abs(got - r).max() > 1e-4 * np.abs(r).max()
