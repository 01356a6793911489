"""The families described in export/archs/ beyond the first five: Qwen3, Gemma 3 text, Gemma 2, SmolLM3 and
Llama 3.x rope scaling. Each is a tiny random config built here; every test compares with transformers itself.

What each config makes matter:
  qwen3    q/k head norms (perturbed weights), head_dim 24 != hidden/heads (padded to 32 in the fused layout),
           a sliding window of 8 on layers >= 1
  gemma3   local/global layers (window 8, pattern 2) with their own rotary bases (local 100, global 10000 with
           linear scaling 2), (1 + w) RMSNorm and sandwich norms (perturbed), q/k head norms,
           query_pre_attn_scalar 24 (not head_dim), sqrt(hidden) embedding scale, GELU-tanh MLP, final soft-cap 15
  gemma2   attention soft-cap 5 and final soft-cap 3 (strong enough to change the argmax), window 8
  smollm3  no rotary on every second layer (no_rope_layer_interval 2)
  llama3   rope_type llama3 with original_max_position_embeddings 32: generation runs to position ~75
Greedy continuations run 64 tokens after ~6-token prompts, so every window is long passed; both cache layouts
(the fused "shared" one the exporter picks, and "concat", forced) run through the edgelm runtime.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import cached_export

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_export_archs import PROMPT_TEXTS, _hf_greedy, hf_folder_for, tiny_model_setup  # noqa: E402

CTX = 96
NEW_TOKENS = 64
FAMILIES = ("qwen3", "gemma3", "gemma2", "smollm3", "llama3")


def _config(name: str, **over):
    common = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128, "bos_token_id": 1,
              "eos_token_id": 2, "pad_token_id": 0, "initializer_range": 0.2}
    gemma = {"head_dim": 16, "sliding_window": 8, "query_pre_attn_scalar": 24}
    cfgs = {
        "qwen3": lambda: transformers.Qwen3Config(**common, head_dim=24, use_sliding_window=True, sliding_window=8,
                                                  max_window_layers=1),
        "gemma3": lambda: transformers.Gemma3TextConfig(
            **{**common, "num_hidden_layers": 4}, **gemma, sliding_window_pattern=2, rope_local_base_freq=100.0,
            rope_scaling={"rope_type": "linear", "factor": 2.0}, final_logit_softcapping=15.0),
        "gemma2": lambda: transformers.Gemma2Config(**common, **gemma, attn_logit_softcapping=5.0,
                                                    final_logit_softcapping=3.0),
        "smollm3": lambda: transformers.SmolLM3Config(**{**common, "num_hidden_layers": 4}, no_rope_layer_interval=2),
        "llama3": lambda: transformers.LlamaConfig(**common, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32}),
    }
    cfg = cfgs[name]()
    for k, v in over.items():
        setattr(cfg, k, v)
    return cfg


def _src(name: str):
    return hf_folder_for(_config(name), f"family-{name}", perturb_norms=True)


def _export(src, layout: str, quantize: str = "none"):
    """The exporter's folder; ``layout`` "concat" forces the plain graph where the exporter would fuse."""
    from edgelm_export.archs import decoder

    with pytest.MonkeyPatch.context() as mp:
        if layout == "concat":
            mp.setattr(decoder.Family, "build", lambda self, model, model_type, ctx, kv_cache="auto":
                       decoder.build(model, self, ctx, kv_cache="concat"))
        return cached_export(f"family-{src.name}-{layout}-{quantize}", src, quantize=quantize, context_length=CTX)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    tiny_model_setup()
    return request.param


def _hf_model(src):
    return transformers.AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()


def _onnx_logits(folder, ids: list[int], prefill: int) -> np.ndarray:
    """Logits of the folder's graph for every position of ``ids``: a prefill of ``prefill`` tokens, then one
    cached decode step per token (caches fed back as separate buffers, so both layouts run the same loop)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.log_severity_level = 1, 3
    sess = ort.InferenceSession(str(folder / "model.onnx"), so, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    feed = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
            for i in sess.get_inputs() if i.name.startswith("past_key_values.")}
    out, start = [], 0
    for end in [prefill, *range(prefill + 1, len(ids) + 1)]:
        feed["input_ids"] = np.array([ids[start:end]], np.int64)
        feed["attention_mask"] = np.ones((1, end), np.int64)
        if "position_ids" in names:
            feed["position_ids"] = np.arange(start, end, dtype=np.int64)[None]
        res = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed)))
        out.append(res["logits"][0])
        for k in [k for k in feed if k.startswith("past_key_values.")]:
            feed[k] = res[k.replace("past_key_values", "present")]
        start = end
    return np.concatenate(out)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["shared", "concat"])
def test_fp32_greedy_and_logits_match_transformers(family, layout):
    """64 greedy tokens from the edgelm runtime equal transformers' generate; every logit along one of those
    continuations (prefill + 64 cached decode steps, and one prefill of all of it) within 1e-4 of one full
    transformers forward."""
    import edgelm

    src = _src(family)
    folder = _export(src, layout)
    cfg = json.loads((folder / "config.json").read_text())
    hf = json.loads((src / "config.json").read_text())
    assert cfg["onnx"]["kv_cache"] == layout and cfg["source_architecture"] == hf["architectures"][0]
    lm = edgelm.load(folder, threads=1)
    prompts = [lm.tokenizer.encode(t, add_bos=True) for t in PROMPT_TEXTS[:2]]
    ours = [list(lm.generate(ids, max_new_tokens=NEW_TOKENS, temperature=0, ignore_eos=True).token_ids)
            for ids in prompts]
    ref = _hf_greedy(src, prompts, NEW_TOKENS)
    assert ours == ref

    seq = prompts[0] + ref[0]
    with torch.no_grad():
        want = _hf_model(src)(torch.tensor([seq])).logits[0].numpy()
    # decode steps one token at a time, and one prefill of the whole sequence (how Model.score runs a window)
    diff = max(float(np.abs(_onnx_logits(folder, seq, prefill=n) - want).max()) for n in (len(prompts[0]), len(seq)))
    verified = json.loads((folder / "edgelm.json").read_text())["verification"]["max_abs_logit_diff"]
    print(f"{family} {layout}: {NEW_TOKENS} greedy tokens x {len(prompts)} prompts equal; max |logit diff| over "
          f"{len(seq)} positions {diff:.2e} (export verification {verified:.2e})")
    assert diff < 1e-4


@pytest.mark.slow
def test_int8_passes_the_quality_gate(family):
    """The default int8 export (export_model's own quality gate at its default 5 %) succeeds and generates."""
    import edgelm

    folder = _export(_src(family), "shared", quantize="int8")
    manifest = json.loads((folder / "edgelm.json").read_text())
    m = manifest["metrics"]
    print(f"{family}: int8 ppl {m['fp32_perplexity']:.3f} -> {m['quantized_perplexity']:.3f} "
          f"({100 * m['ppl_increase']:+.2f} %), greedy token agreement {100 * m['greedy_token_agreement']:.0f} %")
    assert m["ppl_increase"] <= m["max_ppl_increase"] == 0.05 and not m.get("forced")
    lm = edgelm.load(folder, threads=1)
    assert lm.config["dtype"] == "int8" and lm.kv_cache == "shared"
    assert lm.generate("Once upon a time", max_new_tokens=8, temperature=0, ignore_eos=True).completion_tokens == 8


@pytest.mark.slow
def test_what_the_configs_exercise_really_matters():
    """Guards against vacuous equality: each feature under test changes transformers' own logits on these
    configs, and the fused graphs carry the windows, NoPE layers and soft-caps where they belong."""
    import onnx

    tiny_model_setup()
    seq = torch.arange(3, 3 + 80)[None] % 500

    def logits(name, **over):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(_config(name, **over)).eval()
        with torch.no_grad():
            return model(seq).logits

    base = {n: logits(n) for n in ("gemma3", "gemma2", "llama3")}
    assert (base["gemma3"] - logits("gemma3", sliding_window=128)).abs().max() > 1e-2  # the window cuts
    assert (base["gemma2"] - logits("gemma2", attn_logit_softcapping=None)).abs().max() > 1e-2
    assert (base["gemma2"] - logits("gemma2", final_logit_softcapping=None)).abs().max() > 1e-2
    # llama3 scaling (low frequencies divided by the factor, a smooth band between) changes the logits
    plain = logits("llama3", rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    assert (base["llama3"] - plain).abs().max() > 1e-2

    def gqa(name):
        graph = onnx.load(str(_export(_src(name), "shared") / "model.onnx"), load_external_data=False).graph
        return [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
                for n in graph.node if n.op_type == "GroupQueryAttention"]

    assert [a.get("local_window_size") for a in gqa("gemma3")] == [8, None, 8, None]  # = sliding_window
    assert [a.get("local_window_size") for a in gqa("qwen3")] == [None, 8]
    assert [a["do_rotary"] for a in gqa("smollm3")] == [1, 0, 1, 0]
    assert {a.get("softcap") for a in gqa("gemma2")} == {5.0}
    # the window's meaning needs a recent onnxruntime, which the graph's shape says (only where a window cuts)
    from edgelm_export.archs import common, resolve

    for name, need in (("gemma3", common.GQA_WINDOW_ONNXRUNTIME), ("smollm3", None)):
        model = _hf_model(_src(name))
        _, builder, model_type = resolve(json.loads((_src(name) / "config.json").read_text()))
        with torch.no_grad():
            assert builder.build(model, model_type, CTX)[1].min_onnxruntime == need


def test_export_list_prints_the_family_table_that_docs_show(capsys):
    from edgelm_export.archs import FAMILIES, GENERIC, family_table

    from edgelm.cli import main

    assert main(["export", "--list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 + len(FAMILIES) + len(GENERIC)  # the builder's families, then the generic path
    for f, line in zip(FAMILIES, lines[1:]):
        assert line.split()[:4] == [f.architecture, f"export/archs/{f.module}.py", f.model_type, f.cache]
    docs = (Path(__file__).resolve().parents[1] / "docs" / "export.md").read_text()
    assert family_table(markdown=True) in docs  # the docs table is the registry's, row for row


@pytest.mark.parametrize("cfg,words", [
    ({"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3"}, ["Gemma3ForConditionalGeneration",
                                                                                      "Gemma3ForCausalLM", "--list"]),
    ({"architectures": ["Gemma3ForCausalLM"], "hidden_activation": "gelu"}, ["hidden_activation", "'gelu'"]),
    ({"architectures": ["Gemma3ForCausalLM"], "use_bidirectional_attention": True}, ["use_bidirectional_attention"]),
    ({"architectures": ["Qwen3ForCausalLM"], "hidden_act": "relu"}, ["Qwen3ForCausalLM", "'relu'"]),
    ({"architectures": ["SmolLM3ForCausalLM"], "hidden_act": "gelu"}, ["SmolLM3ForCausalLM", "'gelu'"]),
])
def test_unsupported_is_refused_from_config_alone_in_one_line(cfg, words):
    from edgelm_export.archs import resolve

    from edgelm.errors import UnsupportedArchitectureError

    with pytest.raises(UnsupportedArchitectureError) as info:
        resolve(cfg)
    msg = str(info.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_new_families_resolve_to_their_descriptions():
    from edgelm_export.archs import resolve

    for arch, model_type in (("Qwen3ForCausalLM", "qwen3"), ("Gemma3ForCausalLM", "gemma3"),
                             ("Gemma2ForCausalLM", "gemma2"), ("SmolLM3ForCausalLM", "smollm3")):
        got_arch, builder, got_type = resolve({"architectures": [arch]})
        assert (got_arch, got_type, builder.architecture, builder.name) == (arch, model_type, arch, model_type)


def test_gqa_window_meaning_of_the_installed_onnxruntime():
    """The fused layout sets local_window_size = sliding_window W, which is Hugging Face's rule (keys p-W+1..p)
    only on onnxruntime >= GQA_WINDOW_ONNXRUNTIME (older kernels see one key more). One GroupQueryAttention node
    against that rule, prefill and decode: if an onnxruntime upgrade changes the meaning again, this fails."""
    import onnxruntime as ort
    from edgelm_export.archs import common
    from onnx import TensorProto, helper

    if not common.gqa_windows_supported():
        ok = common.DecoderShape(2, 4, 2, 16, 64, 512, 32)
        assert not common.shared_kv_supported(ok, None, None, [None, 8])  # windowed models stay on "concat"
        pytest.skip(f"onnxruntime {ort.__version__} < {common.GQA_WINDOW_ONNXRUNTIME}: no windowed fused graphs")
    n, w, d = 20, 5, 16
    node = helper.make_node("GroupQueryAttention", ["qkv", "", "", "pk", "pv", "sl", "tot"], ["o", "k", "v"],
                            domain="com.microsoft", num_heads=2, kv_num_heads=1, scale=1.0, local_window_size=w)
    f32 = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info("qkv", f32, [1, None, 4 * d]),
              helper.make_tensor_value_info("pk", f32, [1, 1, None, d]),
              helper.make_tensor_value_info("pv", f32, [1, 1, None, d]),
              helper.make_tensor_value_info("sl", TensorProto.INT32, [1]),
              helper.make_tensor_value_info("tot", TensorProto.INT32, [])]
    graph = helper.make_graph([node], "gqa", inputs, [helper.make_tensor_value_info(x, f32, None) for x in "okv"])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                     helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    qkv = np.random.default_rng(0).standard_normal((1, n, 4 * d)).astype(np.float32) * 2

    q, k, v = qkv[0, :, :2 * d].reshape(n, 2, d), qkv[0, :, 2 * d:3 * d], qkv[0, :, 3 * d:]
    pos = np.arange(n)
    allowed = (pos[None] <= pos[:, None]) & (pos[None] > pos[:, None] - w)  # Hugging Face's sliding rule
    scores = np.where(allowed[:, None], np.einsum("qhd,kd->qhk", q, k), -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    want = np.einsum("qhk,kd->qhd", p / p.sum(-1, keepdims=True), v).reshape(n, 2 * d)

    empty = np.zeros((1, 1, 0, d), np.float32)
    prefill = sess.run(["o"], {"qkv": qkv, "pk": empty, "pv": empty, "sl": np.array([n - 1], np.int32),
                               "tot": np.array(n, np.int32)})[0][0]
    out, kc, vc = sess.run(None, {"qkv": qkv[:, :3], "pk": empty, "pv": empty, "sl": np.array([2], np.int32),
                                  "tot": np.array(3, np.int32)})
    steps = [out[0]]
    for i in range(3, n):
        out, kc, vc = sess.run(None, {"qkv": qkv[:, i:i + 1], "pk": kc, "pv": vc, "sl": np.array([i], np.int32),
                                      "tot": np.array(i + 1, np.int32)})
        steps.append(out[0])
    np.testing.assert_allclose(prefill, want, atol=1e-5)
    np.testing.assert_allclose(np.concatenate(steps), want, atol=1e-5)
