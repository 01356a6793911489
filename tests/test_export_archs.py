"""Every supported architecture family, end to end: a tiny random-init Hugging Face model -> `export_model` ->
the edgelm runtime, compared with `transformers` greedy generation token for token.

The tiny configs exercise what differs between families: GQA (4 query heads on 2 KV heads), head size 16,
Qwen2's q/k/v biases and per-layer sliding window, Mistral's and Phi-3's sliding window (8 tokens, shorter
than the 6-token prompt + 24 generated tokens, so the window really cuts), Phi-3's fused projections and
partial rotary (half the head), GPT-2's learned positions / LayerNorm / Conv1D / tanh-GELU / tied head.
`initializer_range=0.2` makes random logits peaked enough that fp32 argmax ties cannot flip on float noise.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from conftest import CACHE, STORIES260K, cached_export

pytestmark = pytest.mark.slow
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ARCHS = ("llama", "qwen2", "mistral", "phi3", "gpt2")
PROMPT_TEXTS = ("Once upon a time", "The little dog ran to the park", "Lily and Ben", "She was happy")
NEW_TOKENS = 24
# int8 vs fp32 floor on random weights, for *teacher-forced* greedy agreement: the int8 model is fed the fp32
# continuation's prefix at every step and must pick the same next token. Free-running agreement is not used
# here: random-init models have much flatter next-token distributions than trained ones, so one near-tie that
# int8 noise flips early decides the whole continuation (we saw 37 % prefix agreement with 88 % teacher-forced
# on llama). Measured teacher-forced agreement on these configs: see docs/export.md. 0.7 still fails loudly for
# a broken quantized graph (~1/512 agreement by chance).
INT8_TEACHER_FORCED_FLOOR = 0.7


def _config(arch: str):
    common = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "max_position_embeddings": 128, "bos_token_id": 1, "eos_token_id": 2,
                  "initializer_range": 0.2}
    if arch == "llama":
        return transformers.LlamaConfig(**common, tie_word_embeddings=True)
    if arch == "qwen2":
        return transformers.Qwen2Config(**common, use_sliding_window=True, sliding_window=8, max_window_layers=1)
    if arch == "mistral":
        return transformers.MistralConfig(**common, sliding_window=8)
    if arch == "phi3":
        return transformers.Phi3Config(**common, partial_rotary_factor=0.5, sliding_window=8, pad_token_id=0)
    return transformers.GPT2Config(vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=1,
                                   eos_token_id=2, initializer_range=0.2)


def _hf_folder(arch: str) -> Path:
    """A save_pretrained folder with seeded random weights and the stories260K tokenizer (cached on disk)."""
    return hf_folder_for(_config(arch), arch)


def hf_folder_for(cfg, name: str, perturb_norms: bool = False) -> Path:
    """``cfg``'s model with seeded random weights and the stories260K tokenizer, saved once under .cache (keyed by
    the config and the transformers version). ``perturb_norms`` adds seeded noise to every norm weight, which
    random init leaves at 1 (or 0 for Gemma's 1 + w), so a norm weight the graph drops or misplaces shows."""
    key = hashlib.sha256(cfg.to_json_string().encode() + transformers.__version__.encode()
                         + (b"perturbed norms" if perturb_norms else b"")).hexdigest()[:10]
    out = CACHE / f"hf-{name}-{key}"
    if not (out / "tokenizer.json").is_file():
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(cfg)
        if perturb_norms:
            with torch.no_grad():
                for pname, param in model.named_parameters():
                    if "norm" in pname:
                        param.add_(torch.rand_like(param) - 0.5)
        model.save_pretrained(str(tmp))
        for file in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(STORIES260K / file, tmp / file)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    return out


def tiny_model_setup() -> None:
    """What every tiny-model test needs: the stories260K tokenizer (skip without it) and torch on one thread."""
    if not STORIES260K.is_dir():
        pytest.skip("stories260K tokenizer fixture not available")
    torch.set_num_threads(1)


@pytest.fixture(scope="module", params=ARCHS)
def arch(request):
    tiny_model_setup()
    return request.param


def _hf_greedy(src: Path, prompts: list[list[int]], n: int) -> list[list[int]]:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    gen = transformers.GenerationConfig(do_sample=False, max_new_tokens=n, min_new_tokens=n, eos_token_id=None,
                                        pad_token_id=0)
    out = []
    with torch.no_grad():
        for ids in prompts:
            seq = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 generation_config=gen)
            out.append(seq[0, len(ids):].tolist())
    return out


def _prompts(lm) -> list[list[int]]:
    return [lm.tokenizer.encode(t, add_bos=True) for t in PROMPT_TEXTS]


def test_fp32_greedy_matches_transformers(arch):
    import edgelm

    src = _hf_folder(arch)
    folder = cached_export(f"arch-{src.name}-fp32", src, quantize="none", context_length=64)
    cfg = json.loads((folder / "config.json").read_text())
    hf = json.loads((src / "config.json").read_text())
    assert cfg["model_type"] == arch and cfg["source_architecture"] == hf["architectures"][0]
    assert cfg["num_kv_heads"] == (4 if arch == "gpt2" else 2) and cfg["head_dim"] == 16 and cfg["dtype"] == "float32"
    manifest = json.loads((folder / "edgelm.json").read_text())
    assert manifest["verification"]["max_abs_logit_diff"] < 1e-4

    lm = edgelm.load(folder)
    prompts = _prompts(lm)
    ours = [list(lm.generate(ids, max_new_tokens=NEW_TOKENS, temperature=0, ignore_eos=True).token_ids)
            for ids in prompts]
    assert ours == _hf_greedy(src, prompts, NEW_TOKENS)


def test_int8_greedy_agreement(arch):
    from edgelm_export.evaluate import teacher_forced_agreement

    import edgelm

    src = _hf_folder(arch)
    fp32_folder = cached_export(f"arch-{src.name}-fp32", src, quantize="none", context_length=64)
    fp32 = edgelm.load(fp32_folder)
    folder = cached_export(f"arch-{src.name}-int8", src, quantize="int8", context_length=64,
                           max_ppl_increase=0.5)  # random weights: the gate is tested on real weights elsewhere
    q = edgelm.load(folder)
    assert q.config["dtype"] == "int8"
    from edgelm_export.quantize import onnx_bytes

    assert onnx_bytes(folder / "model.onnx") < 0.6 * onnx_bytes(fp32_folder / "model.onnx")
    prompts = _prompts(fp32)
    ref = [list(fp32.generate(ids, max_new_tokens=NEW_TOKENS, temperature=0, ignore_eos=True).token_ids)
           for ids in prompts]
    agree = teacher_forced_agreement(q, prompts, ref)
    print(f"{arch}: int8 teacher-forced greedy agreement {agree:.3f}")
    assert agree >= INT8_TEACHER_FORCED_FLOOR, (arch, agree)
    metrics = json.loads((folder / "edgelm.json").read_text())["metrics"]
    assert metrics["quantized_perplexity"] > 0 and metrics["fp32_perplexity"] > 0
