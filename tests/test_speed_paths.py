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

from test_export_archs import _hf_folder, _hf_greedy  # noqa: E402  (same tiny configs and cached exports)

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


def test_builder_falls_back_to_concat(llama_fp32):
    """Forced, and for shapes the fused kernel or our equivalence conditions exclude."""
    import numpy as np
    from edgelm_export.archs import common, llama

    src, _ = llama_fp32
    model = transformers.AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    with torch.no_grad():
        graph, shape = llama.build(model, "llama", 32, kv_cache="concat")
    assert shape.kv_cache == "concat"
    assert "GroupQueryAttention" not in {n.op_type for n in graph.graph.node}
    assert "position_ids" in {i.name for i in graph.graph.input}

    pos = np.arange(32)[:, None] * (10000.0 ** -(np.arange(8) / 8))[None]
    cos, sin = np.cos(np.concatenate([pos, pos], 1)), np.sin(np.concatenate([pos, pos], 1))
    ok = common.DecoderShape(2, 4, 2, 16, 64, 512, 32)
    assert common.shared_kv_supported(ok, cos, sin, [None, None])
    assert not common.shared_kv_supported(ok, cos, sin, [None, 8])  # a sliding window
    assert not common.shared_kv_supported(common.DecoderShape(2, 8, 8, 8, 64, 512, 32), cos[:, :8], sin[:, :8],
                                          [None, None])  # head size 8 (stories260K)
    assert not common.shared_kv_supported(ok, cos[:, :8], sin[:, :8], [None, None])  # partial rotary


def test_head8_model_keeps_concat_layout(stories_fp32):
    import edgelm

    cfg = json.loads((stories_fp32 / "config.json").read_text())
    assert cfg["head_dim"] == 8 and cfg["onnx"]["kv_cache"] == "concat"
    assert "GroupQueryAttention" not in _ops(stories_fp32)
    assert edgelm.load(stories_fp32, threads=1).kv_cache == "concat"


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
