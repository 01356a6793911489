"""GGUF files as an export source (export/gguf.py).

The reference is transformers' own GGUF loader (``from_pretrained(dir, gguf_file=...)``), an independent
implementation of the same conversion: our Hugging Face folder must hold the same tensors, encode text the same way
and carry the same chat template and special tokens. The synthetic files are written here with ``gguf.GGUFWriter``
from tiny random Hugging Face models, with tensor names from the gguf package's own HF->GGUF table and llama.cpp's
Q/K row order, quantized with ``gguf.quants``. The real-model test uses the SmolLM2-135M-Instruct Q4_1 GGUF
(``EDGELM_SMOLLM2_GGUF``) and is skipped when it is absent.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from gguf import GGMLQuantizationType as Q  # noqa: E402

from edgelm.errors import ExportError, InvalidArgumentError, UnsupportedArchitectureError  # noqa: E402
from edgelm_export.gguf import find_gguf, gguf_to_hf_folder, sha256_file  # noqa: E402
from conftest import SMOLLM2_GGUF, real_model  # noqa: E402

CORPUS = ["Once upon a time there was a little robot who liked numbers like 12, 345 and 2024.",
          "def square(x):\n    return x * x  # the square\n", "Ünïcödé text: naïve café, 日本語, русский, Ελληνικά.",
          "The quick brown fox jumps over the lazy dog. She said: 'it's 10:30, we'll go!'"] * 3
TEXTS = ["Hello world! In 2024 there were 365 days; pi is 3.14159.", "def f(x):\n\treturn x**2  # sq\n\n  two  spaces",
         "Ünïcödé: 日本語のテキスト 🤖👍🏽 Ελληνικά", "<|im_start|>user\nHi 42<|im_end|>\n", " leading and trailing ",
         "<s>hello</s> <unk>"]
CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
GGUF_ARCH = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2, "phi3": gguf.MODEL_ARCH.PHI3,
             "qwen3": gguf.MODEL_ARCH.QWEN3, "gemma2": gguf.MODEL_ARCH.GEMMA2, "gemma3": gguf.MODEL_ARCH.GEMMA3,
             "smollm3": gguf.MODEL_ARCH.SMOLLM3, "gpt2": gguf.MODEL_ARCH.GPT2}
GEMMA = ("gemma2", "gemma3")
# Q/K rows reordered by llama.cpp's converter (its LlamaModel subclasses); Gemma keeps Hugging Face's order
PERMUTED = ("llama", "smollm3")


# --- writing GGUF files the way llama.cpp's converter does ---------------------------------------------------------
def _byte_bpe() -> tuple[list[str], list[int], list[str]]:
    """A tiny byte-level BPE (tokens, token types, merges) trained on CORPUS, with three ChatML control tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=420, special_tokens=specials, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in json.loads(tok.to_str())["model"]["merges"]]
    return tokens, [3 if t in specials else 1 for t in tokens], merges


def _sentencepiece() -> tuple[list[str], list[int], list[float]]:
    """A tiny SentencePiece-style vocabulary (tokens, types, scores): <unk> <s> </s>, 256 byte tokens, pieces."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    vocab = tok.get_vocab()
    pieces = sorted(vocab, key=vocab.get)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    return tokens, types, scores


def _hf_model(arch: str, vocab: int, **extra):
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, initializer_range=0.2)
    cfg = {"llama": lambda: transformers.LlamaConfig(**common, rope_theta=50000.0, tie_word_embeddings=True, **extra),
           "qwen2": lambda: transformers.Qwen2Config(**common, tie_word_embeddings=False),
           "qwen3": lambda: transformers.Qwen3Config(**common, tie_word_embeddings=True),
           "phi3": lambda: transformers.Phi3Config(**common, pad_token_id=0),
           # (1024 positions: transformers' GGUF loader reads context_length into n_ctx only, keeping n_positions 1024)
           "gpt2": lambda: transformers.GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=1024,
                                                   initializer_range=0.2),
           # What llama.cpp can express: query_pre_attn_scalar = head_dim (it derives the scale from the size),
           # every 2nd (Gemma 2) / 6th (Gemma 3) layer global, Gemma 3's local rotary base 10000. A window of 8
           # and soft-caps strong enough to change the argmax make them matter.
           "gemma2": lambda: transformers.Gemma2Config(**common, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                                                       attn_logit_softcapping=5.0, final_logit_softcapping=3.0),
           "gemma3": lambda: transformers.Gemma3TextConfig(
               **{**common, "num_hidden_layers": 6}, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
               rope_theta=1e6, rope_local_base_freq=10000.0, rope_scaling={"rope_type": "linear", "factor": 2.0}),
           # llama.cpp's fixed NoPE step is 4: layer 3 of 4 has no rotary
           "smollm3": lambda: transformers.SmolLM3Config(**{**common, "num_hidden_layers": 4}, rope_theta=50000.0,
                                                         no_rope_layer_interval=4, bos_token_id=1, eos_token_id=2,
                                                         pad_token_id=0)}[arch]()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # norms away from their init (Gemma's 0, i.e. a factor 1), so every offset is visible
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(torch.randn_like(param) * 0.3 + (0.0 if arch in GEMMA else 1.0))
        if arch in GEMMA:  # the tied table times sqrt(hidden) would otherwise drown the blocks: greedy echoes input
            model.model.embed_tokens.weight.mul_(0.03)
    return model


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's Q/K row order for its interleaved rotary (what convert_hf_to_gguf.py does to Llama)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path: Path, arch: str, model, *, types=None, spm: bool = False, pre: str = "gpt-2",
               add_bos: bool | None = False, rope_freqs: np.ndarray | None = None) -> Path:
    """``model`` as llama.cpp would write it. ``types``: GGUF leaf name -> quantization (default F32)."""
    types = types or {}
    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    n_layer = cfg.num_hidden_layers
    w.add_block_count(n_layer)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_head_count(cfg.num_attention_heads)
    if arch == "gpt2":
        w.add_feed_forward_length(4 * cfg.hidden_size)
        w.add_layer_norm_eps(cfg.layer_norm_epsilon)
    else:
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count_kv(cfg.num_key_value_heads)
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        rope = cfg.rope_parameters.get("full_attention", cfg.rope_parameters)  # Gemma 3: the global layers'
        w.add_rope_freq_base(rope["rope_theta"])
        if rope.get("rope_type") == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(rope["factor"])
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        w.add_rope_dimension_count(head_dim)
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if arch in GEMMA:  # what llama.cpp's converter writes for them
        w.add_sliding_window(cfg.sliding_window)
        if cfg.final_logit_softcapping:
            w.add_final_logit_softcapping(cfg.final_logit_softcapping)
        if arch == "gemma2":
            w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
    if spm:
        tokens, token_types, scores = _sentencepiece()
        w.add_tokenizer_model("llama")
        w.add_token_scores(scores)
        if arch in GEMMA:
            w.add_add_space_prefix(False)
        bos, eos, unk, pad = 1, 2, 0, 0  # (transformers cannot load a Phi-3 GGUF without a pad id)
    else:
        tokens, token_types, merges = _byte_bpe()
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_merges(merges)
        bos, eos, unk, pad = 1, 2, 0, 2
    assert len(tokens) == cfg.vocab_size, (len(tokens), cfg.vocab_size)
    w.add_token_list(tokens)
    w.add_token_types(token_types)
    w.add_bos_token_id(bos)
    w.add_eos_token_id(eos)
    w.add_unk_token_id(unk)
    if pad is not None:
        w.add_pad_token_id(pad)
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    w.add_chat_template(CHAT)
    names = gguf.get_tensor_name_map(GGUF_ARCH[arch], n_layer)
    for hf_name, t in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        stem, suffix = hf_name.rsplit(".", 1)
        name = names.get_name(stem)
        assert name, hf_name
        data = t.float().numpy()
        leaf = name.split(".")[-1]
        if arch in PERMUTED and leaf in ("attn_q", "attn_k"):
            data = _permute(data, cfg.num_attention_heads if leaf == "attn_q" else cfg.num_key_value_heads)
        if arch in GEMMA and leaf.endswith("norm"):
            data = data + np.float32(1.0)  # llama.cpp multiplies by the stored weight: 1 + w
        if arch == "gpt2" and data.ndim == 2 and leaf != "token_embd" and leaf != "position_embd" and stem != "lm_head":
            data = data.T  # Conv1D [in, out] -> ggml [out, in]
        qtype = types.get(leaf, Q.F32) if data.ndim == 2 else Q.F32
        w.add_tensor(f"{name}.{suffix}", gguf.quants.quantize(np.ascontiguousarray(data), qtype), raw_dtype=qtype)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _vocab_size(spm: bool) -> int:
    return len(_sentencepiece()[0]) if spm else len(_byte_bpe()[0])


def _state_dict(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(folder / "model.safetensors"))


@functools.lru_cache(maxsize=1)  # the real file takes ~25 s to load this way: once per module
def _reference(path: Path):
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model, tok


def assert_same_as_transformers(path: Path, folder: Path, texts=TEXTS) -> float:
    """Our folder vs transformers' GGUF loader: tensors, config, tokenizer. Returns the max abs tensor diff."""
    ref_model, ref_tok = _reference(path)
    ours = _state_dict(folder)
    ref = {k: v.numpy() for k, v in ref_model.state_dict().items()}
    cfg = json.loads((folder / "config.json").read_text())
    if cfg["tie_word_embeddings"]:
        assert ref_model.config.tie_word_embeddings
        ref.pop("lm_head.weight")
    assert set(ours) == set(ref)
    diff = max(float(np.abs(ours[k] - ref[k]).max()) for k in ours)
    # The tokenizer as the edgelm runtime reads it: tokenizer.json with the `tokenizers` library, and
    # tokenizer_config.json. (AutoTokenizer on the folder is not the reference: for some model types transformers 5
    # swaps in its own pre-tokenizer instead of the file's.)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok_cfg = json.loads((folder / "tokenizer_config.json").read_text())
    for text in texts:
        ids = tok.encode(text).ids
        assert ids == ref_tok.encode(text), text
        assert tok.decode(ids, skip_special_tokens=False) == ref_tok.decode(ids), text
    assert tok_cfg["chat_template"] == ref_tok.chat_template
    assert tok_cfg["add_bos_token"] == ref_tok.add_bos_token and tok_cfg["add_eos_token"] == ref_tok.add_eos_token
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        assert tok_cfg[name] == getattr(ref_tok, name), name
    specials = sorted(t.content for t in tok.get_added_tokens_decoder().values() if t.special)
    # (transformers' Gemma tokenizer adds Gemma's named specials, <bos> <pad> <mask> ..., whether or not the file's
    # vocabulary has them: only those that are token ids of the file can be compared)
    vocab = tok.get_vocab()
    ref_specials = sorted(t.content for t in ref_tok.backend_tokenizer.get_added_tokens_decoder().values()
                          if t.special and t.content in vocab)
    assert specials == ref_specials
    return diff


MIXED = {"token_embd": Q.Q8_0, "attn_q": Q.Q4_0, "attn_k": Q.Q4_1, "attn_v": Q.Q5_0, "attn_output": Q.Q5_1,
         "ffn_gate": Q.Q8_0, "ffn_up": Q.Q4_0, "ffn_down": Q.F16, "output": Q.BF16, "attn_qkv": Q.Q4_0}


# --- (a) synthetic files: equal to transformers' GGUF loader --------------------------------------------------------
@pytest.mark.parametrize("arch,spm", [("llama", False), ("llama", True), ("qwen2", False), ("qwen3", False),
                                      ("phi3", True), ("gemma2", True), ("gemma3", True), ("gpt2", False)])
def test_conversion_equals_transformers(tmp_path, torch_one_thread, arch, spm):
    from edgelm_export.archs import SUPPORTED
    from edgelm_export.gguf import FAMILIES

    if FAMILIES[arch].hf_architecture not in SUPPORTED:
        pytest.skip(f"{FAMILIES[arch].hf_architecture} has no graph builder in this tree")
    model = _hf_model(arch, _vocab_size(spm))
    path = write_gguf(tmp_path / f"{arch}.gguf", arch, model, types=MIXED, spm=spm, add_bos=True if spm else False)
    info = gguf_to_hf_folder(path, tmp_path / "hf")
    assert info["architecture"] == arch and info["file"] == path.name and info["bytes"] == path.stat().st_size
    assert info["quant_types"]["F32"] > 0 and sum(info["quant_types"].values()) == len(gguf.GGUFReader(path).tensors)
    assert assert_same_as_transformers(path, tmp_path / "hf") == 0.0
    tok_cfg = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert tok_cfg["add_bos_token"] is spm and tok_cfg["chat_template"] == CHAT


def test_f32_file_gives_back_the_original_weights(tmp_path, torch_one_thread):
    """With nothing quantized the conversion must invert llama.cpp's exactly (names, Q/K order, tied head)."""
    model = _hf_model("llama", _vocab_size(False))
    path = write_gguf(tmp_path / "m.gguf", "llama", model)
    gguf_to_hf_folder(path, tmp_path / "hf")
    ours = _state_dict(tmp_path / "hf")
    original = {k: v.numpy() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert set(ours) == set(original)
    assert all(np.array_equal(ours[k], original[k]) for k in ours)


# --- (a2) families transformers' GGUF loader cannot load (smollm3) or loads with the wrong hyper-parameters -----------
# (Gemma: it keeps its config defaults for query_pre_attn_scalar and the soft-caps instead of what llama.cpp
# computes). The reference is the original model: file -> our folder must give its tensors and config back.
ROUND_TRIP = ("gemma2", "gemma3", "smollm3")
CONFIG_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "head_dim", "rms_norm_eps", "tie_word_embeddings", "layer_types", "sliding_window",
                 "rope_parameters", "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping",
                 "hidden_activation", "no_rope_layers", "use_sliding_window")


def _q8_0_bound(w: np.ndarray) -> float:
    """Q8_0's worst error for ``w``: half a step of max|block| / 127, plus the fp16 rounding of each block scale."""
    amax = float(np.abs(w).max())
    return amax / 254 + amax * 2.0 ** -11


@pytest.mark.parametrize("arch", ROUND_TRIP)
@pytest.mark.parametrize("quant", ["F32", "Q8_0"])
def test_round_trip_gives_back_the_original(tmp_path, torch_one_thread, arch, quant):
    """Tiny random model -> GGUF as llama.cpp writes it -> our folder: every tensor equal to the original (F32:
    exactly, except Gemma's norms, which lose the low bits of w in (1 + w) - 1; Q8_0: within its error bound),
    the config fields that shape the computation equal, and (F32) logits over 40 positions (5 windows) identical."""
    model = _hf_model(arch, _vocab_size(True))
    types = {} if quant == "F32" else {leaf: Q.Q8_0 for leaf in ("token_embd", "attn_q", "attn_k", "attn_v",
                                                                 "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
    path = write_gguf(tmp_path / f"{arch}.gguf", arch, model, types=types, spm=True, add_bos=True)
    info = gguf_to_hf_folder(path, tmp_path / "hf")
    assert info["architecture"] == arch and info["quant_types"].get("Q8_0", 0) == (0 if quant == "F32" else 1 + 7 * model.config.num_hidden_layers)
    ours = _state_dict(tmp_path / "hf")
    original = {k: v.numpy() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert set(ours) == set(original)
    for name, want in original.items():
        diff = float(np.abs(ours[name] - want).max())
        if name.endswith("norm.weight") and arch in GEMMA:
            assert diff <= 2.0 ** -23 * (1 + float(np.abs(want).max())), name  # one float32 step at |1 + w|
        elif quant == "Q8_0" and want.ndim == 2:
            assert 0 < diff <= _q8_0_bound(want), (name, diff, _q8_0_bound(want))
        else:
            assert diff == 0.0, name
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    for field in CONFIG_FIELDS:
        want = getattr(model.config, field, None)
        if field == "head_dim" and want is None:  # SmolLM3's config derives it
            want = model.config.hidden_size // model.config.num_attention_heads
        assert getattr(hf.config, field, None) == want, field
    if quant == "F32":  # (Q8_0's logits differ by its noise, which the tensor bounds above already limit)
        ids = (torch.arange(40)[None] * 7 + 3) % model.config.vocab_size
        with torch.no_grad():
            got, want = hf(ids).logits, model(ids).logits
        # exact, Gemma too: the model computes 1 + w, and 1 + ((1 + w) - 1) is 1 + w again in float32
        assert torch.equal(got, want), float((got - want).abs().max())


def test_gemma_metadata_overrides(tmp_path, torch_one_thread):
    """A file that spells out what llama.cpp otherwise fixes (the local/global pattern, one flag per layer, and
    Gemma 3's local rotary base) gets those values; the 27B layer count scales queries by hidden / heads."""
    from edgelm_export.gguf import _hf_config, FAMILIES

    model = _hf_model("gemma3", _vocab_size(True))
    path = tmp_path / "g.gguf"
    w = gguf.GGUFWriter(str(path), "gemma3")
    for key, value in (("block_count", 6), ("context_length", 256), ("embedding_length", 64),
                       ("feed_forward_length", 96), ("attention.head_count", 4), ("attention.head_count_kv", 2),
                       ("attention.key_length", 16), ("attention.sliding_window", 8)):
        w.add_uint32(f"gemma3.{key}", value)
    w.add_float32("gemma3.rope.freq_base_swa", 100.0)
    w.add_sliding_window_pattern([True, False] * 3)
    w.add_tensor("token_embd.weight", model.model.embed_tokens.weight.detach().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    reader = gguf.GGUFReader(str(path))
    from edgelm_export.gguf import _metadata

    meta = _metadata(reader)
    tensors = {t.name: t for t in reader.tensors}
    cfg = _hf_config(meta, "gemma3", FAMILIES["gemma3"], tensors, path)
    assert cfg["layer_types"] == ["sliding_attention", "full_attention"] * 3 and cfg["rope_local_base_freq"] == 100.0
    assert cfg["query_pre_attn_scalar"] == 16
    meta["gemma3.block_count"] = 62
    meta["gemma3.attention.sliding_window_pattern"] = np.array([6], np.uint32)
    cfg = _hf_config(meta, "gemma3", FAMILIES["gemma3"], tensors, path)
    assert cfg["query_pre_attn_scalar"] == 64 // 4 and cfg["layer_types"][:6] == ["sliding_attention"] * 5 + ["full_attention"]


def test_llama3_rope_scaling_from_rope_freqs(tmp_path, torch_one_thread):
    """llama.cpp keeps Llama-3 rope scaling only as per-frequency divisors (rope_freqs); transformers' loader drops
    it. Ours rebuilds rope_scaling, so the converted model's rotary frequencies and logits equal the original's."""
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 64.0,
               "original_max_position_embeddings": 4096}
    model = _hf_model("llama", _vocab_size(False), rope_scaling=scaling)
    inv = model.model.rotary_emb.inv_freq.double().numpy()
    head_dim = model.config.head_dim
    plain = model.config.rope_parameters["rope_theta"] ** (-np.arange(0, head_dim, 2) / head_dim)
    freqs = plain / inv
    assert 1.0 < freqs.max() and ((freqs > 1.001) & (freqs < 7.99)).sum() >= 2  # a blended band to fit
    path = write_gguf(tmp_path / "m.gguf", "llama", model, rope_freqs=freqs)
    gguf_to_hf_folder(path, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["rope_scaling"]["rope_type"] == "llama3"
    ours = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    np.testing.assert_allclose(ours.model.rotary_emb.inv_freq.double().numpy(), inv, rtol=1e-6)
    ids = torch.arange(3, 200)[None] % model.config.vocab_size
    with torch.no_grad():
        assert torch.allclose(ours(ids).logits, model(ids).logits, atol=1e-4)


def test_smollm_pre_tokenizer_splits_digits(tmp_path, torch_one_thread):
    """tokenizer.ggml.pre "smollm" (llama.cpp: \\p{N} split off before the GPT-2 regex): one digit per token."""
    model = _hf_model("llama", _vocab_size(False))
    digits = gguf_to_hf_folder(write_gguf(tmp_path / "a.gguf", "llama", model, pre="smollm"), tmp_path / "a")
    assert digits["architecture"] == "llama"
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tmp_path / "a" / "tokenizer.json"))
    pieces = [tok.decode([i]) for i in tok.encode("year 2024 and 345").ids]
    assert [p.strip() for p in pieces if p.strip().isdigit()] == list("2024345")


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fp32_export_matches_transformers_greedy(tmp_path, torch_one_thread, arch):
    """`export_model(file.gguf)` end to end: the fp32 folder's greedy continuation equals transformers' greedy
    continuation from the same GGUF, token for token; the manifest records the file."""
    import edgelm
    from edgelm_export.convert import export_model

    model = _hf_model(arch, _vocab_size(False))
    types = {k: v for k, v in MIXED.items() if v in (Q.Q8_0, Q.Q4_0)}  # Q8_0 embeddings/gate, Q4_0 q and up
    (tmp_path / "src").mkdir()
    path = write_gguf(tmp_path / "src" / f"{arch}.gguf", arch, model, types=types)
    report = export_model(str(path.parent), str(tmp_path / "out"), quantize="none", progress=False, threads=1)
    assert report.source == str(path.parent)
    assert not [p for p in tmp_path.iterdir() if "edgelm-gguf" in p.name]  # the unpacked folder is gone
    source = json.loads((tmp_path / "out" / "edgelm.json").read_text())["source"]
    assert source["gguf"]["sha256"] == sha256_file(path) and source["path"] == str(path.resolve())
    assert path.name in (tmp_path / "out" / "README.md").read_text()

    ref_model, ref_tok = _reference(path)
    lm = edgelm.load(tmp_path / "out")
    eos = ref_model.config.eos_token_id
    for text in ("Once upon a time", "def square(x):", "numbers like 12"):
        ids = ref_tok.encode(text)
        assert lm.tokenizer.encode(text) == ids
        with torch.no_grad():
            want = ref_model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False,
                                      pad_token_id=eos)[0, len(ids):].tolist()
        got = lm.generate(ids, max_new_tokens=16, temperature=0).token_ids
        cut = lambda seq: seq[:seq.index(eos)] if eos in seq else seq  # noqa: E731 -- both stop at EOS
        assert cut(got) == cut(want), text


@pytest.mark.slow
@pytest.mark.parametrize("arch", ROUND_TRIP)
def test_round_trip_fp32_export_greedy_matches_original(tmp_path, torch_one_thread, arch):
    """`export_model(file.gguf)` for the families transformers' loader cannot be the reference for: the fp32
    folder's 40 greedy tokens (past Gemma's window of 8 five times) equal transformers' generate on the model the
    file was written from."""
    import edgelm
    from edgelm_export.convert import export_model

    model = _hf_model(arch, _vocab_size(True))
    (tmp_path / "src").mkdir()
    path = write_gguf(tmp_path / "src" / f"{arch}.gguf", arch, model, spm=True, add_bos=True)
    export_model(str(path), str(tmp_path / "out"), quantize="none", progress=False, threads=1)
    lm = edgelm.load(tmp_path / "out")
    for ids in ([1, 40, 300, 77, 12], [1, 5, 6, 7]):
        with torch.no_grad():
            want = model.generate(torch.tensor([ids]), max_new_tokens=40, min_new_tokens=40, do_sample=False,
                                  pad_token_id=0)[0, len(ids):].tolist()
        got = lm.generate(ids, max_new_tokens=40, temperature=0, ignore_eos=True).token_ids
        assert len(set(want)) >= 10 and got == want, (ids, got, want)  # (a varied continuation, not one token)


# --- (b) refusals: one typed line each -------------------------------------------------------------------------------
@pytest.mark.slow
def test_load_a_gguf_file_exports_it_once_into_the_cache(tmp_path, torch_one_thread, monkeypatch):
    """`edgelm.load("file.gguf")` / `--model file.gguf`: exported once into edgelm's cache (int8, the export
    pipeline), then loaded from there; an edited file is exported afresh; without the export extra, one line."""
    import edgelm
    from edgelm import hub
    from edgelm_export import convert

    monkeypatch.setenv("EDGELM_CACHE", str(tmp_path / "cache"))
    path = write_gguf(tmp_path / "tiny.gguf", "llama", _hf_model("llama", _vocab_size(False)))
    lm = edgelm.load(str(path), threads=1)
    assert lm.path.parent == tmp_path / "cache" / "models" and lm.path.name.startswith("gguf--tiny-")
    assert json.loads((lm.path / "edgelm.json").read_text())["source"]["gguf"]["sha256"] == sha256_file(path)
    text = lm.generate("Once upon a time", max_new_tokens=8, temperature=0).text
    monkeypatch.setattr(convert, "export_model", lambda *a, **k: pytest.fail("exported a second time"))
    again = edgelm.load(path, threads=1)  # a Path works as well as a str
    assert again.path == lm.path and again.generate("Once upon a time", max_new_tokens=8, temperature=0).text == text
    assert [m.path for m in hub.cached_models()] == [lm.path] and hub.cached_models()[0].source == "exported"
    path.write_bytes(path.read_bytes() + b"\0")  # a different file now: not the cached export
    monkeypatch.setattr(hub, "_export_extra_installed", lambda: False)
    with pytest.raises(edgelm.errors.ModelNotFoundError, match="GGUF file.*export.*extra") as info:
        edgelm.load(str(path), threads=1)
    assert f"edgelm export {path} --out DIR" in info.value.hint


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text and text.strip()
    return text


def _minimal(path: Path, arch: str = "llama", tensor_type=Q.F32, hidden: int = 64) -> Path:
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    data = np.ones((8, hidden), np.float32)
    if tensor_type == Q.F32:
        w.add_tensor("token_embd.weight", data)
    else:  # raw blocks of a type gguf cannot write (zeros are a valid payload for the reader)
        nbytes = gguf.quants.quant_shape_to_byte_shape(data.shape, tensor_type)
        w.add_tensor("token_embd.weight", np.zeros(nbytes, np.uint8), raw_dtype=tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_unsupported_architecture(tmp_path):
    with pytest.raises(UnsupportedArchitectureError) as err:
        gguf_to_hf_folder(_minimal(tmp_path / "m.gguf", arch="mamba"), tmp_path / "hf")
    assert "'mamba'" in _one_line(err.value) and "llama" in str(err.value)


def test_vision_tower_file_is_refused(tmp_path):
    """Gemma 3's mmproj file (architecture "clip") and a text file carrying v.* tensors: one line each."""
    with pytest.raises(UnsupportedArchitectureError) as err:
        gguf_to_hf_folder(_minimal(tmp_path / "mmproj.gguf", arch="clip"), tmp_path / "hf")
    assert "vision" in _one_line(err.value) and "'clip'" in str(err.value)
    path = tmp_path / "g.gguf"
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.ones((8, 64), np.float32))
    w.add_tensor("v.blk.0.attn_q.weight", np.ones((64, 64), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedArchitectureError) as err:
        gguf_to_hf_folder(path, tmp_path / "hf2")
    assert "v.blk.0.attn_q.weight" in _one_line(err.value) and "text model only" in str(err.value)


def test_unsupported_tensor_type(tmp_path):
    with pytest.raises(ExportError) as err:
        gguf_to_hf_folder(_minimal(tmp_path / "m.gguf", tensor_type=Q.IQ2_XXS, hidden=256), tmp_path / "hf")
    assert "IQ2_XXS" in _one_line(err.value) and "token_embd.weight" in str(err.value)
    assert not (tmp_path / "hf" / "model.safetensors").exists()


def test_folder_with_two_gguf_files(tmp_path):
    for name in ("a.Q4_0.gguf", "a.Q8_0.gguf"):
        _minimal(tmp_path / name)
    with pytest.raises(InvalidArgumentError) as err:
        find_gguf(tmp_path)
    assert "a.Q4_0.gguf" in _one_line(err.value) and "a.Q8_0.gguf" in str(err.value)
    from edgelm_export.convert import export_model

    with pytest.raises(InvalidArgumentError):
        export_model(str(tmp_path), str(tmp_path.parent / "out"), progress=False)


def test_find_gguf(tmp_path):
    assert find_gguf(tmp_path) is None and find_gguf(tmp_path / "missing.gguf") is None
    one = _minimal(tmp_path / "m.gguf")
    assert find_gguf(tmp_path) == one and find_gguf(one) == one and find_gguf(str(one)) == one
    (tmp_path / "config.json").write_text("{}")
    assert find_gguf(tmp_path) is None  # a Hugging Face folder that also holds a GGUF stays a Hugging Face folder


@pytest.mark.parametrize("damage", ["truncated", "not_gguf", "empty"])
def test_corrupt_file(tmp_path, damage):
    path = _minimal(tmp_path / "m.gguf")
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) - 100], "not_gguf": b"PK\x03\x04" + data[4:],
                      "empty": b""}[damage])
    with pytest.raises(ExportError) as err:
        gguf_to_hf_folder(path, tmp_path / "hf")
    assert "not a readable GGUF file" in _one_line(err.value)


def test_cli_prints_one_error_line(tmp_path, capsys):
    from edgelm.cli import main

    path = _minimal(tmp_path / "m.gguf", arch="mamba")
    assert main(["export", str(path), "--out", str(tmp_path / "out"), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "mamba" in err and "UnsupportedArchitecture" not in err
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if "edgelm-" in p.name]


# --- (c) the real model ----------------------------------------------------------------------------------------------
def smollm2_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct Q4_1 GGUF (EDGELM_SMOLLM2_GGUF), or None when it is not on this machine."""
    return SMOLLM2_GGUF if SMOLLM2_GGUF.is_file() else None


@pytest.fixture(scope="module")
def smollm2_folder(tmp_path_factory):
    real_model(SMOLLM2_GGUF)
    out = tmp_path_factory.mktemp("smollm2-hf")
    return gguf_to_hf_folder(SMOLLM2_GGUF, out), out


@pytest.mark.slow
def test_smollm2_gguf_equals_transformers(smollm2_folder, torch_one_thread):
    """The real file: tensors identical to transformers' GGUF loader's, the same tokens for varied text (non-ASCII,
    digits, code, ChatML specials), the same chat template and special ids, and the same logits."""
    info, folder = smollm2_folder
    assert info["sha256"] == sha256_file(SMOLLM2_GGUF) and info["quant_types"] == {"F32": 61, "Q4_1": 210, "Q8_0": 1}
    cfg = json.loads((folder / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["vocab_size"], cfg["tie_word_embeddings"]) == (30, 49152, True)
    texts = TEXTS + ["<|im_start|>system\nYou are SmolLM.<|im_end|>\n<|im_start|>user\n1+1=?<|im_end|>\n",
                     "for (int i = 0; i < 10; ++i) { sum += a[i]; }", "Größe: 12,5 cm — naïve résumé 😀"]
    assert assert_same_as_transformers(SMOLLM2_GGUF, folder, texts) == 0.0
    tok_cfg = json.loads((folder / "tokenizer_config.json").read_text())
    assert tok_cfg["add_bos_token"] is False and "<|im_start|>" in tok_cfg["chat_template"]
    ours = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    ref, tok = _reference(SMOLLM2_GGUF)
    ids = torch.tensor([tok.encode("The capital of France is")])
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, ref(ids).logits)
