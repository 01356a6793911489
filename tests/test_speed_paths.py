"""The fast decode path: the fused "shared" KV layout (GroupQueryAttention over one preallocated buffer per layer,
bound with IO binding) must give the same tokens and scores as transformers, reuse its buffers safely, and be
chosen only where onnxruntime's kernel and our equivalence conditions allow it ("concat" stays the fallback).
"""
from __future__ import annotations

import json
import math
import shutil

import pytest
from conftest import STORIES260K, cached_export

pytestmark = pytest.mark.slow
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_export_archs import (  # same tiny configs and cached exports
    _hf_folder,
    _hf_greedy,
    hf_folder_for,
)

CTX = 64


@pytest.fixture(scope="module")
def llama_fp32():
    if not STORIES260K.is_dir():
        pytest.skip("stories260K tokenizer fixture not available")
    torch.set_num_threads(1)
    src = _hf_folder("llama")  # head size 16, 4 query heads on 2 KV heads: the fused kernel applies
    return src, cached_export(f"arch-{src.name}-fp32", src, quantize="none", context_length=CTX)


def _ops(folder) -> set[str]:
    import onnx

    return {n.op_type for n in onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.node}


def test_head16_llama_gets_shared_layout(llama_fp32):
    _, folder = llama_fp32
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["onnx"]["kv_cache"] == "shared"
    assert "position_ids" not in cfg["onnx"]["inputs"]
    ops = _ops(folder)
    assert "GroupQueryAttention" in ops and "Concat" not in ops


def test_shared_greedy_matches_transformers_up_to_context_end(llama_fp32):
    import edgelm

    src, folder = llama_fp32
    lm = edgelm.load(folder, threads=1)
    assert lm.kv_cache == "shared"
    prompts = [lm.encode("Once upon a time"), lm.encode("The little dog ran to the park")]
    # The second run fills the buffer to the last slot of the context.
    lengths = [20, CTX - len(prompts[1])]
    for ids, n in zip(prompts, lengths):
        ours = lm.generate(ids, max_new_tokens=n, temperature=0, ignore_eos=True).token_ids
        assert ours == _hf_greedy(src, [ids], n)[0]


def test_shared_score_matches_transformers(llama_fp32):
    import edgelm

    src, folder = llama_fp32
    lm = edgelm.load(folder, threads=1)
    text = "Lily and Ben went to the park. They saw a big red ball and played all day."
    ids = lm.encode(text)
    assert len(ids) < CTX  # one window: the reference is one forward pass
    model = transformers.AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    ref = float(sum(logp[j, ids[j + 1]] for j in range(len(ids) - 1)))
    s = lm.score(text)
    assert s.num_tokens == len(ids) - 1
    assert math.isclose(s.total_logprob, ref, rel_tol=1e-4, abs_tol=1e-3)


def test_shared_buffers_are_reused_and_never_shared_between_live_generations(llama_fp32):
    import edgelm

    _, folder = llama_fp32
    lm = edgelm.load(folder, threads=1)
    a, b = lm.encode("Once upon a time"), lm.encode("She was happy")
    ref_a = lm.generate(a, max_new_tokens=16, temperature=0, ignore_eos=True).token_ids
    ref_b = lm.generate(b, max_new_tokens=16, temperature=0, ignore_eos=True).token_ids
    assert len(lm._kv_pool) == 1  # one set, returned after each generation

    # Two streams alive at once each need their own buffers; interleaving them must not mix their caches.
    sa = lm.stream(a, max_new_tokens=16, temperature=0, ignore_eos=True)
    sb = lm.stream(b, max_new_tokens=16, temperature=0, ignore_eos=True)
    for _ in zip(sa, sb):
        pass
    for rest in (sa, sb):
        for _ in rest:
            pass
    assert sa.generation.token_ids == ref_a and sb.generation.token_ids == ref_b
    assert len(lm._kv_pool) == 2

    # A stream closed early gives its buffers back; stale slots from it do not leak into the next generation.
    s = lm.stream(b, max_new_tokens=16, temperature=0, ignore_eos=True)
    next(s)
    s.close()
    assert len(lm._kv_pool) == 2
    assert lm.generate(a, max_new_tokens=16, temperature=0, ignore_eos=True).token_ids == ref_a


def test_builder_falls_back_to_concat(llama_fp32, monkeypatch):
    """Forced, and for models the fused kernel cannot reproduce exactly (interleaved rotary, uneven head groups);
    a sliding window is the kernel's local_window_size."""
    import numpy as np
    from edgelm_export.archs import common, llama

    src, _ = llama_fp32
    model = transformers.AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    with torch.no_grad():
        graph, shape = llama.build(model, "llama", 32, kv_cache="concat")
    assert shape.kv_cache == "concat"
    assert "GroupQueryAttention" not in {n.op_type for n in graph.graph.node}
    assert "position_ids" in {i.name for i in graph.graph.input}

    def tables(rot: int):  # Hugging Face's layout: cat(freqs, freqs)
        pos = np.arange(32)[:, None] * (10000.0 ** -(np.arange(rot // 2) / (rot // 2)))[None]
        return np.cos(np.concatenate([pos, pos], 1)), np.sin(np.concatenate([pos, pos], 1))

    ok = common.DecoderShape(2, 4, 2, 16, 64, 512, 32)
    assert common.shared_kv_supported(ok, *tables(16), [None, None])
    assert common.shared_kv_supported(common.DecoderShape(2, 8, 4, 8, 64, 512, 32), *tables(8),
                                      [None, None])  # head size 8 (stories260K): padded to 16
    assert common.shared_kv_supported(ok, *tables(8), [None, None])  # partial rotary
    # A sliding window is the kernel's local_window_size, whose meaning moved in onnxruntime 1.24: the exporting
    # onnxruntime (which verifies the graph) must have the new one, else windowed models get "concat".
    import onnxruntime

    with monkeypatch.context() as mp:
        mp.setattr(onnxruntime, "__version__", "1.24.1")
        assert common.shared_kv_supported(ok, *tables(16), [None, 8])
        mp.setattr(onnxruntime, "__version__", "1.23.2")
        assert not common.shared_kv_supported(ok, *tables(16), [None, 8])
        assert common.shared_kv_supported(ok, *tables(16), [None, None])
    assert not common.shared_kv_supported(common.DecoderShape(2, 4, 3, 16, 64, 512, 32), *tables(16),
                                          [None, None])  # 4 query heads on 3 KV heads
    cos, _ = tables(16)
    interleaved = np.repeat(cos[:, :8], 2, axis=1)  # halves do not repeat
    assert not common.shared_kv_supported(ok, interleaved, interleaved, [None, None])

    # A concat-only model in the tests (GPT-2: learned positions) takes the fallback.
    gpt2 = _hf_folder("gpt2")
    folder = cached_export(f"arch-{gpt2.name}-fp32", gpt2, quantize="none", context_length=CTX)
    assert json.loads((folder / "config.json").read_text())["onnx"]["kv_cache"] == "concat"
    assert "GroupQueryAttention" not in _ops(folder)


@pytest.mark.parametrize("head_dim,rot_dim", [(32, 32), (48, 48), (8, 8), (16, 8), (24, 12), (40, 40)])
def test_cache_head_layout_pads_to_the_kernel_width(head_dim, rot_dim):
    from edgelm_export.archs import common

    width, slot = common.cache_head_layout(head_dim, rot_dim)
    assert width % 16 == 0 and head_dim <= width < head_dim + 16
    assert len(set(slot.tolist())) == head_dim and slot.min() >= 0 and slot.max() < width  # distinct slots
    r = rot_dim // 2
    # the kernel rotates slot i with slot i + width/2 for i < width/2: the model's pairs (j, j + r) must land there
    assert (slot[r:rot_dim] == slot[:r] + width // 2).all()
    # pass-through features sit outside the rotated pairs (whose tables are cos 1 / sin 0 beyond r)
    assert all(s % (width // 2) >= r for s in slot[rot_dim:])
    if head_dim == width and rot_dim == head_dim:
        assert (slot == range(head_dim)).all()  # nothing to re-lay


def test_head8_model_runs_padded_shared_layout(stories_fp32):
    import onnx

    import edgelm

    cfg = json.loads((stories_fp32 / "config.json").read_text())
    assert cfg["head_dim"] == 8 and cfg["onnx"]["kv_cache"] == "shared"
    graph = onnx.load(str(stories_fp32 / "model.onnx")).graph
    past = next(i for i in graph.input if i.name == "past_key_values.0.key")
    assert past.type.tensor_type.shape.dim[3].dim_value == 16  # the kernel's minimum head width
    lm = edgelm.load(stories_fp32, threads=1)
    assert lm.kv_cache == "shared"
    # (greedy equality with PyTorch on this model: tests/test_export_stories260k.py)
    g = lm.generate("Once upon a time", max_new_tokens=lm.context_length - 8, temperature=0, ignore_eos=True)
    assert g.completion_tokens == lm.context_length - 8


def _fused_folder(arch: str):
    """Tiny random models that take the fused path through its re-laid heads: Phi-3 with partial rotary (half of a
    16-wide head: the rotated halves and the pass-through features move), Qwen2 with q/k/v biases and head size
    24 (padded to 32). No sliding window, so the shared layout applies."""
    common = {"vocab_size": 512, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 128, "bos_token_id": 1, "eos_token_id": 2,
              "initializer_range": 0.2}
    if arch == "phi3":
        cfg = transformers.Phi3Config(**common, hidden_size=64, partial_rotary_factor=0.5, sliding_window=None,
                                      pad_token_id=0)
    else:
        cfg = transformers.Qwen2Config(**common, hidden_size=96, use_sliding_window=False)
    return hf_folder_for(cfg, f"fused-{arch}")


@pytest.mark.parametrize("arch", ["phi3", "qwen2"])
def test_relaid_heads_greedy_matches_transformers(arch):
    import edgelm

    if not STORIES260K.is_dir():
        pytest.skip("stories260K tokenizer fixture not available")
    torch.set_num_threads(1)
    src = _fused_folder(arch)
    folder = cached_export(f"fused-{src.name}-fp32", src, quantize="none", context_length=CTX)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["onnx"]["kv_cache"] == "shared"
    lm = edgelm.load(folder, threads=1)
    for text in ("Once upon a time", "The little dog ran to the park"):
        ids = lm.encode(text)
        ours = lm.generate(ids, max_new_tokens=24, temperature=0, ignore_eos=True).token_ids
        assert ours == _hf_greedy(src, [ids], 24)[0]


def test_unknown_cache_layout_is_refused(llama_fp32, tmp_path):
    import edgelm
    from edgelm.errors import ModelFormatError

    _, folder = llama_fp32
    copy = tmp_path / "m"
    shutil.copytree(folder, copy)
    cfg = json.loads((copy / "config.json").read_text())
    cfg["onnx"]["kv_cache"] = "paged"
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFormatError, match="kv_cache"):
        edgelm.load(copy, verify=False)


def test_block_int8_quantizes_the_fused_graph():
    """--quantize int8-block: MatMulNBits (8 bits, blocks) on the fused graph, within the export's quality gate."""
    import edgelm

    if not STORIES260K.is_dir():
        pytest.skip("stories260K fixture not available")
    folder = cached_export("stories260k-int8-block", STORIES260K, quantize="int8-block")
    ops = _ops(folder)
    assert {"GroupQueryAttention", "MatMulNBits"} <= ops and "DynamicQuantizeMatMul" not in ops
    assert json.loads((folder / "config.json").read_text())["onnx"]["kv_cache"] == "shared"
    quant = json.loads((folder / "edgelm.json").read_text())["quantization"]
    assert (quant["method"], quant["dtype"], quant["block_size"]) == ("int8-block", "int8", 32)
    metrics = json.loads((folder / "edgelm.json").read_text())["metrics"]
    assert metrics["ppl_increase"] <= metrics["max_ppl_increase"]  # the export's own quality gate passed
    g = edgelm.load(folder, threads=1).generate("Once upon a time", max_new_tokens=8, temperature=0, ignore_eos=True)
    assert g.completion_tokens == 8


@pytest.mark.parametrize("layout", ["shared", "concat"])
def test_logits_from_computes_only_the_last_prompt_position(llama_fp32, layout):
    """logits_from = -1 gives exactly the last row of the full logits; omitted, every position (scoring)."""
    import numpy as np
    import onnxruntime as ort

    import edgelm

    if layout == "shared":
        _, folder = llama_fp32
    else:
        src = _hf_folder("gpt2")
        folder = cached_export(f"arch-{src.name}-fp32", src, quantize="none", context_length=CTX)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["onnx"]["kv_cache"] == layout and cfg["onnx"]["inputs"]["logits_from"] == "int64"
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(folder / "model.onnx"), so, providers=["CPUExecutionProvider"])
    assert "logits_from" in {i.name for i in sess.get_overridable_initializers()}  # optional: it has a default
    n = 9
    feed = {"input_ids": np.arange(3, 3 + n, dtype=np.int64)[None], "attention_mask": np.ones((1, n), np.int64)}
    if "position_ids" in {i.name for i in sess.get_inputs()}:
        feed["position_ids"] = np.arange(n, dtype=np.int64)[None]
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values."):
            feed[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
    full, lps = sess.run(["logits", "last_logprobs"], feed)
    row64 = full[0, -1].astype(np.float64)
    np.testing.assert_allclose(lps[0, 0], row64 - row64.max() - np.log(np.exp(row64 - row64.max()).sum()), atol=1e-5)
    last = sess.run(["logits"], {**feed, "logits_from": np.array([-1], np.int64)})[0]
    tail = sess.run(["logits"], {**feed, "logits_from": np.array([n - 3], np.int64)})[0]
    assert full.shape == (1, n, cfg["vocab_size"]) and last.shape == (1, 1, cfg["vocab_size"])
    np.testing.assert_allclose(last[0, 0], full[0, -1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(tail[0], full[0, -3:], rtol=1e-5, atol=1e-5)
    # The runtime uses it for a generation's prefill: the first token's log-probability equals the full-logits one.
    lm = edgelm.load(folder, threads=1)
    assert lm._last_only is not None
    g = lm.generate(list(feed["input_ids"][0]), max_new_tokens=1, temperature=0, ignore_eos=True)
    row = full[0, -1].astype(np.float64)
    lse = row.max() + np.log(np.exp(row - row.max()).sum())
    assert g.token_ids[0] == int(row.argmax()) and g.logprobs[0] == pytest.approx(row.max() - lse, abs=1e-4)


@pytest.mark.parametrize("layout", ["shared", "concat"])
def test_a_long_prompt_prefills_in_calls_on_both_layouts(llama_fp32, layout, monkeypatch):
    """A prompt over PREFILL_CALL_ROWS tokens runs in calls of at most that many, each over the cache the calls
    before it filled (the concat layout feeds their presents back); fp32 tokens and log-probabilities are one
    call's."""
    import numpy as np

    import edgelm
    import edgelm.model as m

    if layout == "shared":
        _, folder = llama_fp32
    else:
        src = _hf_folder("gpt2")
        folder = cached_export(f"arch-{src.name}-fp32", src, quantize="none", context_length=CTX)
    lm = edgelm.load(folder, threads=1)
    assert lm.kv_cache == layout
    prompt = list(range(3, 33))  # 30 tokens: calls of 8, 8, 8 and 6
    ends = []
    original = lm._mask
    monkeypatch.setattr(lm, "_mask", lambda n: (ends.append(n), original(n))[1])
    got = {}
    for rows in (10**9, 8):
        monkeypatch.setattr(m, "PREFILL_CALL_ROWS", rows)
        ends.clear()
        got[rows] = (lm.generate(prompt, max_new_tokens=10, temperature=0, ignore_eos=True), list(ends))
    (whole, whole_ends), (chunked, chunked_ends) = got[10**9], got[8]
    assert whole_ends[0] == 30 and chunked_ends[:4] == [8, 16, 24, 30]
    assert len(chunked_ends) == len(whole_ends) + 3
    assert chunked.token_ids == whole.token_ids
    np.testing.assert_allclose(chunked.logprobs, whole.logprobs, atol=1e-4)


def test_folders_without_logits_from_or_last_logprobs_still_generate_the_same(llama_fp32, tmp_path):
    """Folders exported before those two graph features: full prefill logits, log-probabilities in numpy."""
    import numpy as np
    import onnx

    import edgelm

    _, folder = llama_fp32
    old = tmp_path / "old"
    shutil.copytree(folder, old)
    model = onnx.load(str(old / "model.onnx"))
    graph = model.graph
    keep_out = [o for o in graph.output if o.name != "last_logprobs"]
    del graph.output[:]
    graph.output.extend(keep_out)
    keep_in = [i for i in graph.input if i.name != "logits_from"]  # its initializer stays: a constant 0
    del graph.input[:]
    graph.input.extend(keep_in)
    (old / "model.onnx.data").unlink()
    onnx.save_model(model, str(old / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    new_lm, old_lm = edgelm.load(folder, threads=1), edgelm.load(old, verify=False, threads=1)
    assert new_lm._has_lp and new_lm._last_only is not None
    assert not old_lm._has_lp and old_lm._last_only is None
    ids = new_lm.encode("Once upon a time there was")
    for kw in (dict(temperature=0), dict(temperature=0.8, top_k=20, seed=3)):
        a = new_lm.generate(ids, max_new_tokens=12, ignore_eos=True, **kw)
        b = old_lm.generate(ids, max_new_tokens=12, ignore_eos=True, **kw)
        assert a.token_ids == b.token_ids
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)
