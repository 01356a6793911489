"""--quantize auto and a quality gate that names a mode that passes, on stories260K (real trained weights)."""
from __future__ import annotations

import json

import pytest
from conftest import STORIES260K, cached_export, needs_shared

pytest.importorskip("torch")
pytest.importorskip("transformers")

from edgelm.errors import QualityGateError  # noqa: E402
from edgelm_export.assemble import AUTO_ORDER, FALLBACKS, fallbacks  # noqa: E402
from edgelm_export.convert import export_model  # noqa: E402

pytestmark = [needs_shared(), pytest.mark.slow]


@pytest.fixture(scope="module")
def auto_strict():
    """auto with a gate so tight that int4 fails it: the table must show int4 over it and a later mode chosen."""
    return cached_export("stories260k-auto-strict", STORIES260K, quantize="auto", max_ppl_increase=0.01)


def test_auto_takes_the_first_mode_within_the_gate(auto_strict):
    m = json.loads((auto_strict / "edgelm.json").read_text())
    tried = m["metrics"]["auto"]
    assert [t["method"] for t in tried] == list(AUTO_ORDER[:len(tried)])
    assert all(t["passed"] == (t["ppl_increase"] <= 0.01) for t in tried)
    assert not any(t["passed"] for t in tried[:-1]) and tried[-1]["passed"]  # stopped at the first that passed
    assert tried[0]["method"] == "int4" and not tried[0]["passed"]  # int4 costs stories260K more than 1 %
    assert m["quantization"]["method"] == tried[-1]["method"] != "int4"
    assert abs(m["metrics"]["ppl_increase"] - tried[-1]["ppl_increase"]) < 1e-9  # the gate measured the same
    card = (auto_strict / "README.md").read_text()
    assert "`--quantize auto` tried" in card and f"| {tried[0]['method']} | {100 * tried[0]['ppl_increase']:+.2f} %" in card


def test_a_refused_mode_names_one_that_passes(auto_strict, tmp_path):
    tried = {t["method"]: t["ppl_increase"] for t in json.loads((auto_strict / "edgelm.json").read_text())["metrics"]["auto"]}
    passing = next(alt for alt in FALLBACKS["int4"] if alt in tried and tried[alt] <= 0.01)
    with pytest.raises(QualityGateError) as info:
        export_model(str(STORIES260K), str(tmp_path / "out"), quantize="int4", max_ppl_increase=0.01, progress=False)
    err = info.value
    assert "int4" not in err.hint.split("passes")[0] and f"--quantize {passing} passes" in err.hint
    assert f"{100 * tried[passing]:+.2f} %" in err.hint  # the number it measured, the same as auto's
    assert not (tmp_path / "out").exists()  # nothing written


def test_the_most_accurate_mode_failing_points_at_fp32(tmp_path):
    """int8-block has nothing more accurate to try: the hint says fp32, a looser gate or --force."""
    with pytest.raises(QualityGateError) as info:
        export_model(str(STORIES260K), str(tmp_path / "out"), quantize="int8-block", max_ppl_increase=0.0,
                     progress=False)
    assert "more than the allowed 0.00 %" in info.value.message and "Also measured" not in info.value.message
    assert "--quantize none" in info.value.hint and not (tmp_path / "out").exists()


def test_a_4bit_gguf_source_adds_int4_to_the_fallbacks():
    """int4 reproduces a Q4_x source's matrices, so a refused 8-bit mode also measures int4 there; not elsewhere."""
    q4_1 = {"gguf": {"quant_types": {"F32": 61, "Q4_1": 210, "Q8_0": 1}}}
    assert fallbacks("int8", q4_1) == FALLBACKS["int8"] + ("int4",)
    assert fallbacks("int8-block", q4_1) == ("int4",) and fallbacks("int4", q4_1) == FALLBACKS["int4"]
    # a refused int4-fp32 (the same 4-bit matrices) names the most accurate 8-bit modes, never int4 (int8 activations)
    assert fallbacks("int4-fp32", q4_1) == FALLBACKS["int4-fp32"] == ("int8-block", "int8")
    for other in ({"gguf": {"quant_types": {"Q8_0": 201, "F32": 61}}}, {"model": "hf-folder"}):
        assert {m: fallbacks(m, other) for m in FALLBACKS} == FALLBACKS


def _optimized_ops(path, tmp_path) -> dict[str, int]:
    """Node counts of the graph onnxruntime actually runs (its optimizer at the runtime's level, all fusions)."""
    import collections

    import onnx
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    opts.optimized_model_filepath = str(tmp_path / f"opt-{path.parent.name}-{path.name}")
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return dict(collections.Counter(n.op_type for n in onnx.load(opts.optimized_model_filepath,
                                                                  load_external_data=False).graph.node))


def test_int4_offsets_leave_onnxruntime_fusions_intact(stories_fp32, tmp_path):
    """int4's offset term on a real decoder graph: onnxruntime's optimizer still fuses what it fused with integer
    zero points (norms, SiLU, every MatMulNBits kept), folds the fp16 offsets' Casts away, and runs the other
    offset ops as they are in the file: a
    Reshape + ReduceSum (or, where K is no multiple of 32 -- stories260K's down_proj, K = 172 -- one indicator
    MatMul) for the block sums, then a MatMul and an Add per 4-bit matrix."""
    import collections

    import onnx

    from edgelm_export.quantize import quantize_model

    src = stories_fp32 / "model.onnx"
    zp = quantize_model(src, tmp_path / "zp.onnx", method="int4", offsets=False)
    off = quantize_model(src, tmp_path / "offsets.onnx", method="int4")
    assert off["offsets"] is True and zp["block_matmuls"] == off["block_matmuls"] > 0

    def diff(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
        return {op: b.get(op, 0) - a.get(op, 0) for op in sorted(set(a) | set(b)) if b.get(op, 0) != a.get(op, 0)}

    def ops(name: str) -> dict[str, int]:
        return dict(collections.Counter(n.op_type for n in onnx.load(str(tmp_path / name)).graph.node))

    in_file = diff(ops("zp.onnx"), ops("offsets.onnx"))
    n = off["block_matmuls"]
    assert in_file["Add"] == n and in_file["ReduceSum"] == in_file["Reshape"] and in_file["MatMul"] >= n
    assert in_file["ReduceSum"] + in_file["MatMul"] - n == n  # one block sum per matrix (each reads its own x)
    indicators = [t for t in onnx.load(str(tmp_path / "offsets.onnx")).graph.initializer
                  if t.name.startswith("block_indicator")]
    assert len(indicators) == 1 and list(indicators[0].dims) == [172, 6]  # one, shared by the five down_proj
    assert in_file.pop("Cast") == n  # fp16 offsets: folded into fp32 initializers when the session loads
    a, b = _optimized_ops(tmp_path / "zp.onnx", tmp_path), _optimized_ops(tmp_path / "offsets.onnx", tmp_path)
    assert diff(a, b) == in_file, (a, b)
    assert b["MatMulNBits"] == a["MatMulNBits"] and b["SkipSimplifiedLayerNormalization"] > 0


def test_int4_fp32_exports_end_to_end_and_lookup_stays_exact(tmp_path):
    """``--quantize int4-fp32`` on a Hugging Face folder (stories260K): the manifest and card say what it is, the
    runtime loads it, and since no activation is rounded per call, prompt lookup's multi-token verifications give
    exactly plain greedy decoding's tokens (int8 graphs may part at near-ties: edgelm/lookup.py)."""
    import edgelm

    out = tmp_path / "int4-fp32"
    export_model(str(STORIES260K), str(out), quantize="int4-fp32", max_ppl_increase=0.5, progress=False)
    m = json.loads((out / "edgelm.json").read_text())
    q = m["quantization"]
    assert q["method"] == "int4-fp32" and q["accuracy_level"] == 0 and q["embedding_block_size"] == 32
    assert "activations fp32" in q["weights"]
    assert q["rescored_top"] == 8  # stories260K ties its head: ranked on the fast kernel, its best 8 rescored
    assert "activations fp32" in (out / "README.md").read_text()
    lm = edgelm.load(str(out), threads=1)
    prompt = "Tom had a red ball. Tom had a red ball. Tom had a red ball. Tom had"
    plain = lm.generate(prompt, max_new_tokens=40, temperature=0, ignore_eos=True)
    fast = lm.generate(prompt, max_new_tokens=40, temperature=0, ignore_eos=True, lookup=True)
    assert fast.drafted_tokens > 0 and list(fast.token_ids) == list(plain.token_ids)


@pytest.mark.parametrize("method,share,says", [("int8", 0.52, True), ("int8-block", 0.899, True), ("int8", 0.95, False),
                                               ("int4-fp32", 0.5, False), ("int8", None, False)])
def test_low_chat_agreement_points_at_int4_fp32(method, share, says):
    """A chat model whose quantized answers leave fp32's gets one line naming the mode that keeps them (card and
    export summary); not when they follow fp32 closely, not for int4-fp32 itself, not for a base model."""
    from edgelm_export.assemble import chat_agreement_hint

    metrics = {} if share is None else {"chat_prefix_agreement": share}
    hint = chat_agreement_hint(method, metrics)
    assert (hint is not None) == says
    if says:
        assert "--quantize int4-fp32" in hint and f"{100 * share:.0f} %" in hint
