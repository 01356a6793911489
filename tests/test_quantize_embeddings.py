"""The token embedding is found by the graph's structure, not by its initializer's name (export/quantize.py,
:func:`embedding_tables`): other exporters name the table ``model.embed_tokens.weight``, ``transformer.wte.weight``
or ``onnx::Gather_...``, and int8 export must still store it int8 (and ``keep_fp32=["embeddings"]`` must still keep
it). Small graphs built here with onnx.helper: tables under several names, ids reaching the Gather through Cast /
Unsqueeze / Reshape, and Gathers that are not the token embedding (a position table, a lookup on an activation, a
table the LM head also reads). One optimum export of a tiny random GPT-NeoX checks the real generic path.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edgelm_export import quantize as q  # noqa: E402
from test_export_generic import optimum_python  # noqa: E402,F401  (its fixture: skip without optimum, fail in CI)

VOCAB, HIDDEN, CTX = 256, 32, 16  # vocab >= 4 x hidden: lm_head_weight knows the head by shape


def _decoder(table: str, *, ids_path: tuple[str, ...] = (), extra_nodes=(), extra_inits=(), head_reads_table=False,
             logits_dims=("batch", "seq", VOCAB), seed: int = 0) -> onnx.ModelProto:
    """input_ids -> [ops in ``ids_path``] -> Gather(``table``) + Gather(pos, position_ids) -> MatMul(lm) -> logits.

    ``ids_path`` names the ops the ids pass through (Cast to int32, Unsqueeze + Reshape back, ...);
    ``head_reads_table`` makes the LM head Transpose(table) instead of its own initializer (a tied head)."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32), table),
             numpy_helper.from_array(rng.standard_normal((CTX, HIDDEN)).astype(np.float32), "pos_table"),
             *extra_inits]
    if ids_path:
        inits += [numpy_helper.from_array(np.asarray([0], np.int64), "axis0"),
                  numpy_helper.from_array(np.asarray([1, -1], np.int64), "ids_shape")]
    nodes, ids = [], "input_ids"
    for i, op in enumerate(ids_path):
        out = f"ids_{i}"
        if op == "Cast":
            nodes.append(helper.make_node("Cast", [ids], [out], name=f"cast_{i}", to=TensorProto.INT32))
        elif op == "Unsqueeze":
            nodes.append(helper.make_node("Unsqueeze", [ids, "axis0"], [out], name=f"unsqueeze_{i}"))
        elif op == "Reshape":
            nodes.append(helper.make_node("Reshape", [ids, "ids_shape"], [out], name=f"reshape_{i}"))
        ids = out
    nodes += [helper.make_node("Gather", [table, ids], ["tok"]),  # unnamed, as other exporters leave nodes
              helper.make_node("Gather", ["pos_table", "position_ids"], ["pos"], name="positions"),
              helper.make_node("Add", ["tok", "pos"], ["x"], name="add"), *extra_nodes]
    if head_reads_table:
        nodes.append(helper.make_node("Transpose", [table], ["head_w"], name="tied_head", perm=[1, 0]))
    else:
        inits.append(numpy_helper.from_array(rng.standard_normal((HIDDEN, VOCAB)).astype(np.float32), "head_w"))
    nodes.append(helper.make_node("MatMul", ["x", "head_w"], ["logits"], name="head"))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
                     helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, list(logits_dims))], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def _quantize(model: onnx.ModelProto, tmp_path, **kwargs) -> tuple[dict, onnx.ModelProto]:
    src, dst = tmp_path / "src.onnx", tmp_path / "dst.onnx"
    onnx.save(model, str(src))
    info = q.quantize_model(src, dst, method="int8-block", **kwargs)
    json.dumps(info)
    return info, onnx.load(str(dst))


def _run(model: onnx.ModelProto, ids: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"input_ids": ids, "position_ids": np.arange(ids.shape[1])[None]})[0]


def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.mark.parametrize("table", ["embed_tokens.weight", "model.embed_tokens.weight", "transformer.wte.weight",
                                   "gpt_neox.embed_in.weight", "onnx::Gather_1234"])
@pytest.mark.parametrize("ids_path", [(), ("Cast",), ("Unsqueeze", "Reshape"), ("Cast", "Unsqueeze", "Reshape")])
def test_the_token_table_is_quantized_whatever_its_name_and_however_the_ids_arrive(tmp_path, table, ids_path):
    model = _decoder(table, ids_path=ids_path)
    ids = np.asarray([[3, 1, 4, 1, 5, 9, 2, 6]], np.int64)
    ref = _run(model, ids)
    info, out = _quantize(model, tmp_path)
    assert info["embeddings"] == [table]
    inits = _inits(out)
    assert table not in inits and inits[f"{table}.q8"].dtype == np.int8
    assert inits[f"{table}.q8"].shape == (VOCAB, HIDDEN) and inits[f"{table}.row_scales"].shape == (VOCAB, 1)
    assert inits["pos_table"].dtype == np.float32  # the position table (ids from position_ids) stays fp32
    # int8 rows de-quantized: the gathered rows are within half a step of each row's scale of the fp32 ones
    fp32 = _inits(model)[table]
    deq = inits[f"{table}.q8"].astype(np.float32) * inits[f"{table}.row_scales"]
    assert np.abs(deq - fp32).max() <= 0.5 * inits[f"{table}.row_scales"].max() + 1e-6
    got = _run(out, ids)
    assert got.shape == ref.shape and np.abs(got - ref).max() < 0.05 * np.abs(ref).max()

    keep, kept = _quantize(model, tmp_path, keep_fp32=["embeddings"])
    assert keep["embeddings"] == [] and _inits(kept)[table].dtype == np.float32
    assert f"{table}.q8" not in _inits(kept)


def test_builder_graphs_come_out_as_before(tmp_path):
    """Our builder's layout (embed_tokens.weight gathered straight from input_ids, a node named embed_tokens): the
    same nodes, names and initializers as the name-keyed version made."""
    model = _decoder("embed_tokens.weight")
    model.graph.node[0].name = "embed_tokens"
    _, out = _quantize(model, tmp_path)
    nodes = [(n.op_type, n.name, list(n.input), list(n.output)) for n in out.graph.node[:4]]
    assert nodes == [("Gather", "embed_tokens/q_rows", ["embed_tokens.weight.q8", "input_ids"], ["tok/q_rows"]),
                     ("Cast", "embed_tokens/cast", ["tok/q_rows"], ["tok/rows"]),
                     ("Gather", "embed_tokens/scales", ["embed_tokens.weight.row_scales", "input_ids"], ["tok/scales"]),
                     ("Mul", "embed_tokens/dequant", ["tok/rows", "tok/scales"], ["tok"])]


def test_gathers_that_are_not_the_token_embedding_are_left_alone(tmp_path):
    # a lookup on an activation (indices computed from x), a [VOCAB, HIDDEN] table indexed by position_ids, and a
    # table gathered on axis 1: none comes from input_ids on axis 0
    rng = np.random.default_rng(1)
    extra_inits = [numpy_helper.from_array(rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32), name)
                   for name in ("act_table", "pos_like_vocab", "axis1_table")]
    extra_nodes = [helper.make_node("ArgMax", ["x"], ["x_arg"], name="argmax", axis=-1, keepdims=0),
                   helper.make_node("Gather", ["act_table", "x_arg"], ["act_rows"], name="act_lookup"),
                   helper.make_node("Gather", ["pos_like_vocab", "position_ids"], ["pv"], name="pos_like"),
                   helper.make_node("Gather", ["axis1_table", "input_ids"], ["a1"], name="axis1", axis=1)]
    model = _decoder("model.embed_tokens.weight", extra_nodes=extra_nodes, extra_inits=extra_inits)
    assert set(q.embedding_tables(model)) == {"model.embed_tokens.weight"}
    info, out = _quantize(model, tmp_path)
    assert info["embeddings"] == ["model.embed_tokens.weight"]
    inits = _inits(out)
    for name in ("act_table", "pos_like_vocab", "axis1_table", "pos_table"):
        assert inits[name].dtype == np.float32


def test_a_table_something_else_reads_is_kept(tmp_path):
    """A tied head reading the table through a Transpose: quantizing the table would take it from the head."""
    model = _decoder("transformer.wte.weight", head_reads_table=True)
    ids = np.asarray([[1, 2, 3]], np.int64)
    ref = _run(model, ids)
    assert q.embedding_tables(model) == {}
    info, out = _quantize(model, tmp_path)
    assert info["embeddings"] == [] and _inits(out)["transformer.wte.weight"].dtype == np.float32
    np.testing.assert_allclose(_run(out, ids), ref, rtol=1e-5, atol=1e-5)


def test_the_vocabulary_size_must_match(tmp_path):
    """The table's rows must be the vocabulary: the logits' width, else the LM head's; unknown -> nothing taken."""
    model = _decoder("emb")
    assert set(q.embedding_tables(model)) == {"emb"}
    assert q.embedding_tables(model, vocab_size=VOCAB + 1) == {}
    wrong = _decoder("emb", logits_dims=("batch", "seq", VOCAB * 2))
    assert q.embedding_tables(wrong) == {}
    dynamic = _decoder("emb", logits_dims=("batch", "seq", "vocab"))  # falls back on the LM head's width
    assert set(q.embedding_tables(dynamic)) == {"emb"}
    no_head = _decoder("emb", logits_dims=("batch", "seq", "vocab"), head_reads_table=True)
    assert q.embedding_tables(no_head) == {}


# --- the generic path through optimum -----------------------------------------------------------------------------
@pytest.mark.slow
def test_an_optimum_export_gets_its_embedding_quantized(tmp_path, optimum_python):
    """A tiny random GPT-NeoX (not a builder family) through optimum's exporter: its table is called
    gpt_neox.embed_in.weight there, and int8 stores it int8."""
    pytest.importorskip("torch")
    from test_export_archs import hf_folder_for, tiny_model_setup
    from test_export_generic import _family_config

    from edgelm_export.convert import export_model

    tiny_model_setup()
    src = hf_folder_for(_family_config("gpt_neox"), "generic-gpt_neox")
    out = tmp_path / "int8"
    export_model(str(src), str(out), via="optimum", optimum_python=optimum_python, quantize="int8-block",
                 progress=False, threads=1, force=True)
    manifest = json.loads((out / "edgelm.json").read_text())
    assert manifest["export"]["path"] == "generic (optimum)"
    assert manifest["quantization"]["embeddings"] == ["gpt_neox.embed_in.weight"]
    inits = {t.name: t for t in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.initializer}
    assert "gpt_neox.embed_in.weight" not in inits
    assert inits["gpt_neox.embed_in.weight.q8"].data_type == TensorProto.INT8
