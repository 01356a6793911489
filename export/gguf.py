"""GGUF (llama.cpp) files as an export source: one ``.gguf`` -> an equivalent Hugging Face folder.

``edgelm export model.gguf --out DIR`` converts the file into a work folder with :func:`gguf_to_hf_folder` and
then runs the ordinary pipeline (convert.py) on that folder, so a GGUF gets the same graph builder, verification,
quantization and quality gate as any Hugging Face model. The folder holds:

* ``config.json``: the transformers config rebuilt from the ``{arch}.*`` metadata (sizes, heads, epsilon, rotary
  base and scaling, context length; tied embeddings when the file has no ``output.weight``, which is how llama.cpp
  marks them);
* ``model.safetensors``: every tensor dequantized to float32 (``gguf.quants.dequantize``) and renamed to the
  Hugging Face name, with llama.cpp's layout changes undone (the Q/K row order for Llama-style rotary, GPT-2's
  transposed Conv1D weights, the 1 added to Gemma's norm weights);
* ``tokenizer.json`` / ``tokenizer_config.json``: the tokenizer rebuilt from ``tokenizer.ggml.*`` the way
  transformers' GGUF loader builds it (byte-level BPE with the file's merges and a pre-tokenizer chosen by
  ``tokenizer.ggml.pre``, or a SentencePiece-style BPE with byte fallback and merges derived from the scores), the
  chat template, special tokens and ``add_bos_token``/``add_eos_token``;
* ``generation_config.json`` with the bos/eos ids, and a ``README.md`` carrying ``general.license``.

The dequantized weights are what llama.cpp computes with, so the fp32 export reproduces the quantized model; the
export's own int8/int4 step then quantizes again (``--quantize none`` keeps exactly the GGUF's values).
"""
from __future__ import annotations

import errno
import hashlib
import json
import math
import re
import shutil
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgelm.errors import (
    ExportError,
    InvalidArgumentError,
    OutOfDiskError,
    TokenizerError,
    UnsupportedArchitectureError,
)

# Tensor types we dequantize. gguf.quants implements more (IQ*, TQ*, MXFP4), but these are the ones tested here.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                   "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


@dataclass(frozen=True)
class Family:
    """How one llama.cpp architecture maps onto a Hugging Face one."""

    hf_architecture: str                  # config.json architectures[0] (must be one export/archs/ builds)
    model_type: str                       # config.json model_type
    globals: dict[str, str]               # GGUF tensor stem outside the blocks -> HF module path
    block: dict[str, str]                 # GGUF tensor stem inside blk.N -> HF module path under the layer
    layer_prefix: str                     # HF path of block N, with {i}
    permute_qk: bool = False              # llama.cpp reorders Q/K rows for its interleaved rotary kernel
    transposed: tuple[str, ...] = ()      # stems stored as [out, in] where HF keeps Conv1D [in, out]
    config_only: tuple[str, ...] = ()     # global stems that become config values, not weights
    norm_offset: float = 0.0              # llama.cpp stores RMSNorm weights plus this (Gemma's (1 + w) form)


_ROPE_DECODER_BLOCK = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_ROPE_DECODER_GLOBALS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# Gemma's four norms per block: llama.cpp calls the one before the MLP ffn_norm, as Llama's only second norm
_GEMMA_BLOCK = {**_ROPE_DECODER_BLOCK, "post_attention_norm": "post_attention_layernorm",
                "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}

# general.architecture -> Family. Mistral files say "llama" (llama.cpp converts them as Llama; it applies no
# sliding window to them either), so they become LlamaForCausalLM, which computes what llama.cpp computes.
FAMILIES: dict[str, Family] = {
    "llama": Family("LlamaForCausalLM", "llama", _ROPE_DECODER_GLOBALS, _ROPE_DECODER_BLOCK, "model.layers.{i}",
                    permute_qk=True, config_only=("rope_freqs",)),
    "qwen2": Family("Qwen2ForCausalLM", "qwen2", _ROPE_DECODER_GLOBALS, _ROPE_DECODER_BLOCK, "model.layers.{i}"),
    "qwen3": Family("Qwen3ForCausalLM", "qwen3", _ROPE_DECODER_GLOBALS,
                    {**_ROPE_DECODER_BLOCK, "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"},
                    "model.layers.{i}"),
    "phi3": Family("Phi3ForCausalLM", "phi3", _ROPE_DECODER_GLOBALS,
                   {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                    "attn_qkv": "self_attn.qkv_proj", "attn_output": "self_attn.o_proj",
                    "ffn_up": "mlp.gate_up_proj", "ffn_down": "mlp.down_proj"},
                   "model.layers.{i}", config_only=("rope_factors_long", "rope_factors_short")),
    # llama.cpp's converter adds 1 to every Gemma "*norm.weight" (its kernel multiplies by w; transformers' by
    # 1 + w) and leaves Q/K in Hugging Face's row order (Gemma is a NeoX-rotary model there)
    "gemma2": Family("Gemma2ForCausalLM", "gemma2", _ROPE_DECODER_GLOBALS, _GEMMA_BLOCK, "model.layers.{i}",
                     norm_offset=1.0),
    "gemma3": Family("Gemma3ForCausalLM", "gemma3_text", _ROPE_DECODER_GLOBALS,
                     {**_GEMMA_BLOCK, "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"},
                     "model.layers.{i}", norm_offset=1.0),
    # SmolLM3 is converted as Llama (Q/K rows reordered); its NoPE layers are fixed in llama.cpp, not stored
    "smollm3": Family("SmolLM3ForCausalLM", "smollm3", _ROPE_DECODER_GLOBALS, _ROPE_DECODER_BLOCK, "model.layers.{i}",
                      permute_qk=True, config_only=("rope_freqs",)),
    "gpt2": Family("GPT2LMHeadModel", "gpt2",
                   {"token_embd": "transformer.wte", "position_embd": "transformer.wpe",
                    "output_norm": "transformer.ln_f", "output": "lm_head"},
                   {"attn_norm": "ln_1", "attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj",
                    "ffn_norm": "ln_2", "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"},
                   "transformer.h.{i}", transposed=("attn_qkv", "attn_output", "ffn_up", "ffn_down")),
}

_BLOCK_TENSOR = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_GLOBAL_TENSOR = re.compile(r"^(\w+)\.(weight|bias)$")


# --- finding and opening the file ------------------------------------------------------------------------------------
def find_gguf(src: str | Path) -> Path | None:
    """The GGUF file ``src`` names: a ``.gguf`` file, or a folder holding exactly one and no config.json.

    None for anything else (a Hugging Face folder, a hub id, a missing path): the caller treats it as before.
    A folder with several ``.gguf`` files is ambiguous and raises InvalidArgumentError naming them."""
    path = Path(src).expanduser()
    if path.is_file():
        return path if path.suffix.lower() == ".gguf" else None
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() == ".gguf")
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise InvalidArgumentError(f"{path} holds {len(found)} GGUF files ({names}); which one should be exported?",
                                   hint=f"Pass the file itself, e.g. {found[0]}.")
    return found[0] if found else None


def _open(gguf_path: Path) -> Any:
    import gguf

    try:
        return gguf.GGUFReader(str(gguf_path))
    except Exception as exc:  # noqa: BLE001 -- bad magic, truncation and corrupt headers surface as many types
        what = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"{gguf_path} is not a readable GGUF file ({type(exc).__name__}: {what}).",
                          hint="Re-download it (a truncated or corrupt file cannot be converted).") from exc


def _metadata(reader: Any) -> dict[str, Any]:
    """Every metadata field as a plain Python value (strings, numbers, lists)."""
    import gguf

    meta: dict[str, Any] = {}
    for name, fld in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        if fld.types and fld.types[0] == gguf.GGUFValueType.ARRAY and fld.types[-1] != gguf.GGUFValueType.STRING:
            # numeric arrays (scores, token types) as one numpy array; contents() would build a Python list
            meta[name] = (np.concatenate([fld.parts[i] for i in fld.data]) if len(fld.data)
                          else np.zeros(0, np.float32))
        else:
            meta[name] = fld.contents()
    return meta


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


# --- the conversion --------------------------------------------------------------------------------------------------
@dataclass
class _Tensor:
    gguf: Any                      # gguf.ReaderTensor
    hf_name: str
    shape: tuple[int, ...]         # the HF shape (numpy order, after any transpose)
    transform: str = ""            # "", "T", "permute_q", "permute_k", "norm_offset"
    extra: dict[str, Any] = field(default_factory=dict)


def gguf_to_hf_folder(gguf_path: Path, out_dir: Path) -> dict[str, Any]:
    """Write the Hugging Face folder equivalent to ``gguf_path`` into ``out_dir`` (created if missing).

    Refuses, before writing any weights, an architecture or tensor type it cannot convert
    (UnsupportedArchitectureError / ExportError naming it). Returns the source info for the manifest:
    ``{"file", "path", "sha256", "bytes", "architecture", "name", "license", "quant_types": {type: count}}``."""
    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    reader = _open(gguf_path)
    meta = _metadata(reader)
    arch = str(meta.get("general.architecture", ""))
    tensors = {t.name: t for t in reader.tensors}
    _refuse_vision(arch, tensors, gguf_path)
    family = _family(arch, gguf_path)
    types = Counter(t.tensor_type.name for t in reader.tensors)
    bad = sorted(set(types) - set(SUPPORTED_TYPES))
    if bad:
        first = next(t.name for t in reader.tensors if t.tensor_type.name in bad)
        raise ExportError(f"{gguf_path.name} stores tensors as {', '.join(bad)} (e.g. {first}), which edgelm cannot "
                          f"dequantize; supported: {', '.join(SUPPORTED_TYPES)}.",
                          hint="Use a GGUF quantized with one of those types (Q8_0, Q4_K_M, Q4_0, F16, ...).")
    config = _hf_config(meta, arch, family, tensors, gguf_path)
    # (set before the completeness check: some config classes default to ids outside a small vocabulary)
    config.update(bos_token_id=_token_id(meta, "bos_token_id"), eos_token_id=_token_id(meta, "eos_token_id"),
                  pad_token_id=_token_id(meta, "padding_token_id"))
    plan = _plan(family, config, tensors, gguf_path)
    _check_complete(config, plan, gguf_path)

    out_dir.mkdir(parents=True, exist_ok=True)
    need = sum(4 * math.prod(t.shape) for t in plan) + (16 << 20)
    free = shutil.disk_usage(out_dir).free
    if free < need:
        raise OutOfDiskError(f"Not enough free disk space in {out_dir} to unpack {gguf_path.name}: about "
                             f"{need >> 20} MiB needed, {free >> 20} MiB free.",
                             hint="Free some space or choose an --out on another disk.")
    try:
        _write_safetensors(plan, out_dir / "model.safetensors", config)
        tok_cfg, gen_ids = _write_tokenizer(meta, arch, out_dir)
        config.update(gen_ids)
        _write_json(out_dir / "config.json", config)
        _write_json(out_dir / "generation_config.json", gen_ids)
        licence = meta.get("general.license")
        if licence:  # front matter, so convert.py's licence notes carry it into the model card
            (out_dir / "README.md").write_text(f"---\nlicense: {licence}\n---\n\nConverted from {gguf_path.name}.\n",
                                               encoding="utf-8")
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OutOfDiskError(f"The disk filled up while unpacking {gguf_path.name} ({exc}).",
                                 hint="Free some space or choose an --out on another disk.") from exc
        raise
    del tok_cfg
    return {"file": gguf_path.name, "path": str(gguf_path.resolve()), "sha256": sha256_file(gguf_path),
            "bytes": gguf_path.stat().st_size, "architecture": arch, "name": meta.get("general.name"),
            "license": licence, "quant_types": dict(sorted(types.items()))}


def _family(arch: str, gguf_path: Path) -> Family:
    from .archs import SUPPORTED

    family = FAMILIES.get(arch)
    if family is None or family.hf_architecture not in SUPPORTED:
        ok = [a for a, f in FAMILIES.items() if f.hf_architecture in SUPPORTED]
        raise UnsupportedArchitectureError(
            f"Cannot export {gguf_path.name}: GGUF architecture {arch or '(none)'!r} is not supported; edgelm converts "
            f"GGUF files of architecture {', '.join(ok)}.",
            hint="Export the model's Hugging Face folder instead, or pick a GGUF of a supported family.")
    return family


def _refuse_vision(arch: str, tensors: dict[str, Any], gguf_path: Path) -> None:
    """A vision tower (llama.cpp's "clip" mmproj file, or ``v.*`` / ``mm.*`` tensors) is not a language model."""
    vision = [n for n in tensors if n.startswith(("v.", "mm."))]
    if arch == "clip" or vision:
        what = f"its {len(vision)} vision-tower tensors (e.g. {vision[0]})" if vision else "architecture 'clip'"
        raise UnsupportedArchitectureError(
            f"Cannot export {gguf_path.name}: it is a vision encoder/projector file ({what}); edgelm exports the "
            "text model only.", hint="Export the model's text GGUF (the file without 'mmproj' in its name).")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# --- config.json -----------------------------------------------------------------------------------------------------
def _scalar(meta: dict[str, Any], key: str, gguf_path: Path, default: Any = None) -> Any:
    value = meta.get(key, default)
    if isinstance(value, np.ndarray):  # per-layer arrays: fine when every layer agrees
        if value.size and np.all(value == value.flat[0]):
            return value.flat[0].item()
        raise UnsupportedArchitectureError(f"{gguf_path.name}: {key} differs between layers ({value.tolist()[:8]}...); "
                                           "edgelm's builders need one value for every layer.",
                                           hint="Export the model's Hugging Face folder instead.")
    if value is None:
        raise ExportError(f"{gguf_path.name} lacks the metadata key {key}.", hint="The file is incomplete; re-download it.")
    return value


def _f32(value: Any) -> float:
    """A float32 metadata value as the shortest decimal that is the same float32 (1e-05, not 9.99999974e-06):
    the value the file's writer started from, so config.json reads as the original model's."""
    return float(repr(np.float32(value)).removeprefix("np.float32(").removesuffix(")"))


def _hf_config(meta: dict[str, Any], arch: str, family: Family, tensors: dict[str, Any],
               gguf_path: Path) -> dict[str, Any]:
    def key(name: str, default: Any = None) -> Any:
        return _scalar(meta, f"{arch}.{name}", gguf_path, default)

    embd = tensors.get("token_embd.weight")
    if embd is None:
        raise ExportError(f"{gguf_path.name} has no token_embd.weight tensor.", hint="The file is incomplete; re-download it.")
    vocab = int(embd.shape[1])  # ggml order: [hidden, vocab]
    tied = "output.weight" not in tensors
    n_layer, hidden, n_head = int(key("block_count")), int(key("embedding_length")), int(key("attention.head_count"))
    ctx = int(key("context_length", 2048))
    if family.model_type == "gpt2":
        return {"architectures": [family.hf_architecture], "model_type": "gpt2", "vocab_size": vocab,
                "n_embd": hidden, "n_layer": n_layer, "n_head": n_head, "n_positions": ctx, "n_ctx": ctx,
                "n_inner": int(key("feed_forward_length", 4 * hidden)), "activation_function": "gelu_new",
                "layer_norm_epsilon": _f32(key("attention.layer_norm_epsilon", 1e-5)),
                "tie_word_embeddings": tied, "torch_dtype": "float32"}
    head_dim = int(key("attention.key_length", hidden // n_head))
    rot_dims = int(key("rope.dimension_count", head_dim))
    cfg: dict[str, Any] = {
        "architectures": [family.hf_architecture], "model_type": family.model_type, "vocab_size": vocab,
        "hidden_size": hidden, "intermediate_size": int(key("feed_forward_length")), "num_hidden_layers": n_layer,
        "num_attention_heads": n_head, "num_key_value_heads": int(key("attention.head_count_kv", n_head)),
        "head_dim": head_dim, "hidden_act": "silu", "max_position_embeddings": ctx,
        "rms_norm_eps": _f32(key("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": _f32(key("rope.freq_base", 10000.0)), "tie_word_embeddings": tied, "torch_dtype": "float32",
    }
    window = meta.get(f"{arch}.attention.sliding_window")
    if family.model_type == "phi3":
        cfg["partial_rotary_factor"] = rot_dims / head_dim
        # llama.cpp writes the window because the model uses it (transformers' GGUF loader drops it)
        cfg["sliding_window"] = int(window) if window else None
        if "rope_factors_long.weight" in tensors:
            cfg["rope_scaling"] = {"type": "longrope",
                                   "long_factor": _dequantized(tensors["rope_factors_long.weight"]).tolist(),
                                   "short_factor": _dequantized(tensors["rope_factors_short.weight"]).tolist()}
            cfg["original_max_position_embeddings"] = int(key("rope.scaling.original_context_length", ctx))
            attn_factor = meta.get(f"{arch}.rope.scaling.attn_factor")
            if attn_factor is not None:
                cfg["rope_scaling"]["attention_factor"] = float(attn_factor)
    else:
        if rot_dims != head_dim:
            raise UnsupportedArchitectureError(f"{gguf_path.name}: rotary over {rot_dims} of {head_dim} head features "
                                               f"is not supported for {arch}.", hint="Open an issue with the file.")
        if family.model_type in ("qwen2", "qwen3") and window:
            cfg.update(use_sliding_window=True, sliding_window=int(window))
        scaling = _rope_scaling(meta, arch, tensors, cfg, gguf_path)
        if scaling:
            cfg["rope_scaling"] = scaling
        if arch in ("gemma2", "gemma3"):
            _gemma_config(cfg, meta, arch, gguf_path)
        elif arch == "smollm3":
            # llama.cpp skips rotary on every 4th layer (its n_no_rope_layer_step is fixed, not in the file)
            cfg.update(no_rope_layer_interval=4, no_rope_layers=[int((i + 1) % 4 != 0) for i in range(n_layer)],
                       use_sliding_window=False, sliding_window=None)
    return cfg


# llama.cpp's Gemma facts that the file does not carry (llama-model.cpp's hparams for each architecture): the
# local/global layer pattern, Gemma 3's local rotary base, and which sizes scale queries by hidden / heads
# rather than head_dim (the 27B models, told apart by their layer count).
_GEMMA_SWA_PATTERN = {"gemma2": 2, "gemma3": 6}
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
_GEMMA3_LOCAL_ROPE_BASE = 10000.0


def _gemma_config(cfg: dict[str, Any], meta: dict[str, Any], arch: str, gguf_path: Path) -> None:
    """Gemma 2 / Gemma 3 text fields on top of the rotary-decoder config, as llama.cpp computes the model."""
    n_layer = cfg["num_hidden_layers"]
    del cfg["hidden_act"]
    cfg["hidden_activation"] = "gelu_pytorch_tanh"
    big = n_layer == _GEMMA_27B_LAYERS[arch]
    cfg["query_pre_attn_scalar"] = cfg["hidden_size"] // cfg["num_attention_heads"] if big else cfg["head_dim"]
    # Local (sliding) layers: il % n < n - 1 in llama.cpp, i.e. every n-th layer is global -- the same layers as
    # transformers' layer_types. A file may spell the pattern out (an int, or one flag per layer).
    window = meta.get(f"{arch}.attention.sliding_window")
    pattern = meta.get(f"{arch}.attention.sliding_window_pattern", _GEMMA_SWA_PATTERN[arch])
    if isinstance(pattern, np.ndarray) and pattern.size == n_layer:
        local = [bool(x) for x in pattern.tolist()]
    elif isinstance(pattern, (int, np.integer)) or (isinstance(pattern, np.ndarray) and pattern.size == 1):
        n = int(np.asarray(pattern).flat[0])
        local = [n == 0 or i % n < n - 1 for i in range(n_layer)]
    else:
        raise UnsupportedArchitectureError(f"{gguf_path.name}: {arch}.attention.sliding_window_pattern has "
                                           f"{np.asarray(pattern).size} entries for {n_layer} layers.",
                                           hint="The file is inconsistent; re-convert it with a current llama.cpp.")
    if not window:
        local = [False] * n_layer
    cfg["sliding_window"] = int(window) if window else None
    cfg["layer_types"] = ["sliding_attention" if x else "full_attention" for x in local]
    final_cap = meta.get(f"{arch}.final_logit_softcapping")
    if arch == "gemma2":
        # llama.cpp's defaults when absent are Gemma 2's own (50 and 30); its converter always writes both
        cfg["attn_logit_softcapping"] = _f32(meta.get(f"{arch}.attn_logit_softcapping", 50.0))
        cfg["final_logit_softcapping"] = _f32(30.0 if final_cap is None else final_cap)
    else:
        if meta.get(f"{arch}.attn_logit_softcapping") is not None:
            raise UnsupportedArchitectureError(f"{gguf_path.name}: Gemma 3 with attention logit soft-capping is not "
                                               "a model transformers or edgelm compute.",
                                               hint="Export the model's Hugging Face folder instead.")
        cfg["final_logit_softcapping"] = None if final_cap is None else _f32(final_cap)
        cfg["attn_logit_softcapping"] = None
        # rope.freq_base is the global layers' base; rope scaling applies to them only
        cfg["rope_local_base_freq"] = _f32(meta.get(f"{arch}.rope.freq_base_swa", _GEMMA3_LOCAL_ROPE_BASE))


def _rope_scaling(meta: dict[str, Any], arch: str, tensors: dict[str, Any], cfg: dict[str, Any],
                  gguf_path: Path) -> dict[str, Any] | None:
    """The HF rope_scaling for the file's rotary: linear / yarn from metadata, Llama-3 from its rope_freqs tensor."""
    kind = meta.get(f"{arch}.rope.scaling.type")
    factor = meta.get(f"{arch}.rope.scaling.factor")
    orig = meta.get(f"{arch}.rope.scaling.original_context_length")
    if "rope_freqs.weight" in tensors:
        return _llama3_scaling(_dequantized(tensors["rope_freqs.weight"]), cfg, orig, gguf_path)
    if kind in (None, "none") or (kind == "linear" and (factor is None or float(factor) == 1.0)):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": _f32(factor)}
    if kind == "yarn":
        out = {"rope_type": "yarn", "factor": _f32(factor)}
        if orig:
            out["original_max_position_embeddings"] = int(orig)
        for gguf_key, hf_key in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            if meta.get(f"{arch}.rope.scaling.{gguf_key}") is not None:
                out[hf_key] = float(meta[f"{arch}.rope.scaling.{gguf_key}"])
        return out
    raise UnsupportedArchitectureError(f"{gguf_path.name}: rope scaling {kind!r} is not supported.",
                                       hint="Export the model's Hugging Face folder instead.")


def _llama3_scaling(freqs: np.ndarray, cfg: dict[str, Any], orig: Any, gguf_path: Path) -> dict[str, Any] | None:
    """Recover Llama-3 rope scaling from llama.cpp's per-frequency divisors (the ``rope_freqs`` tensor).

    Llama-3 divides frequency i by 1 (short wavelengths), by ``factor`` (long ones) or by a blend whose weight
    ``s = (orig_ctx / wavelength - low) / (high - low)`` is linear in 1/wavelength. ``factor`` is the largest
    divisor; the slope and intercept of that line give ``low`` and ``high`` for a chosen ``orig_ctx`` (only the
    ratios matter). The result is checked by recomputing every divisor."""
    freqs = freqs.astype(np.float64)
    if np.allclose(freqs, 1.0):
        return None
    head_dim, theta = cfg["head_dim"], cfg["rope_theta"]
    inv = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    x = inv / (2 * np.pi)                          # 1 / wavelength
    factor = float(freqs.max())
    orig_ctx = int(orig) if orig else 8192         # Llama 3.x's; any value works with matching low/high
    mid = (freqs > 1 + 1e-6) & (freqs < factor * (1 - 1e-6))
    if mid.sum() >= 2:
        s = (1 / freqs[mid] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit(x[mid], s, 1)
        span = orig_ctx / slope                    # high - low
        low, high = -intercept * span, -intercept * span + span
    else:                                          # no blended band: put both edges between the two groups
        short, long_ = x[freqs <= 1 + 1e-6], x[freqs >= factor * (1 - 1e-6)]
        edge = (short.min() + long_.max()) / 2 if len(short) and len(long_) else x.min()
        low = high = orig_ctx * edge
        high *= 1 + 1e-9
    wavelen = 1 / x
    smooth = np.clip((orig_ctx / wavelen - low) / (high - low), 0, 1)
    rebuilt = np.where(wavelen < orig_ctx / high, 1.0,
                       np.where(wavelen > orig_ctx / low, factor, 1 / ((1 - smooth) / factor + smooth)))
    if not np.allclose(rebuilt, freqs, rtol=1e-4, atol=1e-6):
        raise UnsupportedArchitectureError(f"{gguf_path.name}: its rope_freqs tensor is not Llama-3 rope scaling.",
                                           hint="Export the model's Hugging Face folder instead.")
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": float(low), "high_freq_factor": float(high),
            "original_max_position_embeddings": orig_ctx}


# --- weights ---------------------------------------------------------------------------------------------------------
def _dequantized(t: Any) -> np.ndarray:
    """A tensor's values as float32, in numpy (HF) order."""
    from gguf.quants import dequantize

    shape = tuple(int(d) for d in reversed(t.shape))
    return np.ascontiguousarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)


def _plan(family: Family, config: dict[str, Any], tensors: dict[str, Any], gguf_path: Path) -> list[_Tensor]:
    """Which GGUF tensor becomes which HF tensor, and how; an unknown tensor name is an error."""
    plan = []
    for name, t in tensors.items():
        shape = tuple(int(d) for d in reversed(t.shape))
        m = _BLOCK_TENSOR.match(name)
        stem = m.group(2) if m else (_GLOBAL_TENSOR.match(name) or [None, None])[1]
        if not m and stem in family.config_only:
            continue
        target = family.block.get(stem) if m else family.globals.get(stem)
        if target is None:
            raise UnsupportedArchitectureError(
                f"{gguf_path.name}: tensor {name!r} has no counterpart in {family.hf_architecture}.",
                hint="This variant of the architecture is not supported; export its Hugging Face folder instead.")
        suffix = m.group(3) if m else name.rsplit(".", 1)[1]
        hf = (family.layer_prefix.format(i=m.group(1)) + "." + target if m else target) + "." + suffix
        transform = ""
        if stem in family.transposed and len(shape) == 2:
            transform, shape = "T", shape[::-1]
        elif family.permute_qk and stem in ("attn_q", "attn_k"):
            transform = "permute_q" if stem == "attn_q" else "permute_k"
        elif family.norm_offset and stem.endswith("norm") and suffix == "weight":
            transform = "norm_offset"
        extra = {"offset": family.norm_offset} if transform == "norm_offset" else {}
        plan.append(_Tensor(t, hf, shape, transform, extra))
    return plan


def _check_complete(config: dict[str, Any], plan: list[_Tensor], gguf_path: Path) -> None:
    """Every parameter the HF model has must come from the file: transformers would silently random-init the rest."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(config["model_type"],
                               **{k: v for k, v in config.items() if k not in ("architectures", "model_type")})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.get("tie_word_embeddings"):
        expected.pop("lm_head.weight", None)
    have = {t.hf_name: t.shape for t in plan}
    missing = sorted(set(expected) - set(have))
    wrong = sorted(k for k in set(expected) & set(have) if expected[k] != have[k])
    extra = sorted(set(have) - set(expected))
    if missing or wrong or extra:
        detail = "; ".join(f"{label}: {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}"
                           for label, names in (("missing", missing), ("wrong shape", wrong), ("unexpected", extra))
                           if names)
        raise ExportError(f"{gguf_path.name} does not match the {config['architectures'][0]} its metadata describes "
                          f"({detail}).", hint="The file is incomplete or a variant edgelm does not know.")


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row order: it stores each head's rotary pairs interleaved (x0, x_{d/2}, x1, ...)
    where HF keeps the two halves apart; rows of head h go [h, 2, d/2] -> [h, d/2, 2] there, so back here."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_safetensors(plan: list[_Tensor], path: Path, config: dict[str, Any]) -> None:
    """Write float32 tensors one at a time (the header first, from the planned shapes), so memory stays at the
    largest single tensor rather than the whole model."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in plan:
        n = 4 * math.prod(t.shape)
        header[t.hf_name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for t in plan:
            w = _dequantized(t.gguf)
            if t.transform == "T":
                w = w.T
            elif t.transform == "permute_q":
                w = _unpermute(w, config["num_attention_heads"])
            elif t.transform == "permute_k":
                w = _unpermute(w, config["num_key_value_heads"])
            elif t.transform == "norm_offset":
                w = w - np.float32(t.extra["offset"])
            f.write(np.ascontiguousarray(w, dtype="<f4").tobytes())


# --- tokenizer -------------------------------------------------------------------------------------------------------
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# tokenizer.ggml.pre -> how text is split before byte-level BPE. The splits are llama.cpp's for each type.
_GPT2_SPLIT = None  # ByteLevel's built-in GPT-2 regex
_DIGITS_THEN_GPT2 = "digits"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS: dict[str, str | None] = {
    "default": _GPT2_SPLIT, "gpt-2": _GPT2_SPLIT, "gpt2": _GPT2_SPLIT, "mpt": _GPT2_SPLIT, "olmo": _GPT2_SPLIT,
    "jais": _GPT2_SPLIT,
    # "\p{N}" split off first, then the GPT-2 regex: every digit is its own pre-token
    "smollm": _DIGITS_THEN_GPT2, "starcoder": _DIGITS_THEN_GPT2, "refact": _DIGITS_THEN_GPT2,
    "command-r": _DIGITS_THEN_GPT2, "codeshell": _DIGITS_THEN_GPT2,
    "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT,
    "dbrx": _LLAMA3_SPLIT, "falcon3": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT, "megrez": _QWEN2_SPLIT,
}


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's printable spelling of the 256 bytes: printable Latin-1 bytes stand for themselves, the rest are
    shifted to code points from 256 up, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spelling, extra = {}, 0
    for b in range(256):
        if b in keep:
            spelling[b] = chr(b)
        else:
            spelling[b] = chr(256 + extra)
            extra += 1
    return spelling


def _spm_merges(tokens: list[str], scores: np.ndarray) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's score-driven merging: every split of a token into two vocabulary
    pieces is a merge ranked by the token's score (higher first), ties broken toward the longer left piece, then
    the longer right piece, then vocabulary order (the order transformers' GGUF loader produces)."""
    ids = {tok: i for i, tok in enumerate(tokens)}
    score = {tok: float(scores[i]) for i, tok in enumerate(tokens)}  # a repeated token keeps its last score
    ranked = []
    for i, tok in enumerate(ids):  # unique tokens, in order of first appearance
        for k in range(1, len(tok)):
            left, right = tok[:k], tok[k:]
            if left in ids and right in ids:
                ranked.append((-score[tok], -len(left), -len(right), i, left, right))
    ranked.sort(key=lambda r: r[:4])
    return [(r[4], r[5]) for r in ranked]


def _token_id(meta: dict[str, Any], name: str) -> int | None:
    value = meta.get(f"tokenizer.ggml.{name}")
    return None if value is None else int(value)


def _write_tokenizer(meta: dict[str, Any], arch: str, out_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """tokenizer.json + tokenizer_config.json; returns (tokenizer config, {bos/eos/pad ids})."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise TokenizerError("The GGUF file has no tokenizer (tokenizer.ggml.tokens).",
                             hint="Export the model's Hugging Face folder instead.")
    types = meta.get("tokenizer.ggml.token_type")
    types = [int(t) for t in types] if types is not None and len(types) == len(tokens) else [_NORMAL] * len(tokens)
    bos, eos, unk, pad = (_token_id(meta, k) for k in ("bos_token_id", "eos_token_id", "unknown_token_id",
                                                       "padding_token_id"))
    embedded = meta.get("tokenizer.huggingface.json")
    if embedded:  # the original tokenizer.json, stored verbatim by some converters: nothing to rebuild
        tok = Tokenizer.from_str(embedded)
    elif kind == "gpt2":
        merges = meta.get("tokenizer.ggml.merges")
        if not merges:
            raise TokenizerError("The GGUF byte-level (gpt2) tokenizer has no merges (tokenizer.ggml.merges).",
                                 hint="Re-convert the model with a current llama.cpp.")
        pre = meta.get("tokenizer.ggml.pre", "default")
        if pre not in PRE_TOKENIZERS:
            raise TokenizerError(f"The GGUF tokenizer's pre-tokenizer type {pre!r} is not one edgelm knows "
                                 f"({', '.join(sorted(PRE_TOKENIZERS))}); encoding would not match the model's.",
                                 hint="Export the model's Hugging Face folder instead, or open an issue naming it.")
        spelling = _byte_alphabet()
        alphabet = set(spelling.values())
        vocab = {}
        for i, t in enumerate(tokens):
            # Ordinary tokens are stored in the byte alphabet; a few converters store raw text: re-spell those.
            # Control / user-defined tokens keep their text, since they are matched whole in the input.
            if types[i] not in (_CONTROL, _USER_DEFINED) and not set(t) <= alphabet:
                t = "".join(spelling[b] for b in t.encode("utf-8"))
            vocab[t] = i
        pairs = [tuple(m.split(" ", 1)) for m in merges]
        tok = Tokenizer(models.BPE(vocab, pairs, dropout=None, continuing_subword_prefix="", end_of_word_suffix="",
                                   fuse_unk=False))
        split = PRE_TOKENIZERS[pre]
        if split is _GPT2_SPLIT:
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        elif split == _DIGITS_THEN_GPT2:
            tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                         pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                  use_regex=True)])
        else:
            tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                         pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                  use_regex=False)])
        tok.decoder = decoders.ByteLevel()
    elif kind == "llama":
        scores = meta.get("tokenizer.ggml.scores")
        if scores is None or len(scores) != len(tokens):
            raise TokenizerError("The GGUF SentencePiece (llama) tokenizer has no scores (tokenizer.ggml.scores).",
                                 hint="Re-convert the model with a current llama.cpp.")
        vocab = {t: i for i, t in enumerate(tokens)}
        tok = Tokenizer(models.BPE(vocab, _spm_merges(tokens, scores), fuse_unk=True, byte_fallback=True,
                                   dropout=None))
        prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
        steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        if arch == "phi3":  # Phi-3's own tokenizer.json prefixes and replaces spaces in a normalizer
            from tokenizers import normalizers
            tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
            prefix = True
        else:
            tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first" if prefix else "never",
                                                         split=False)
        if prefix:
            steps.append(decoders.Strip(" ", 1, 0))
        tok.decoder = decoders.Sequence(steps)
    else:
        raise TokenizerError(f"The GGUF tokenizer model {kind!r} is not supported (only 'gpt2' byte-level BPE and "
                             "'llama' SentencePiece).", hint="Export the model's Hugging Face folder instead.")

    # Control tokens (<|im_start|>, <s>) are special and matched whole; user-defined ones are matched whole too.
    named = {i for i in (bos, eos, unk, pad) if i is not None and 0 <= i < len(tokens)}
    special = [AddedToken(tokens[i], special=True, normalized=False)
               for i in range(len(tokens)) if types[i] == _CONTROL or i in named]
    user = [AddedToken(tokens[i], special=False, normalized=False)
            for i in range(len(tokens)) if types[i] == _USER_DEFINED]
    if not embedded:
        tok.add_special_tokens(special)
        if user:
            tok.add_tokens(user)

    # add_bos_token/add_eos_token: the file's flags. A file that does not say gets transformers' defaults for its
    # tokenizer kind (llama.cpp's too): BOS for SentencePiece vocabularies, nothing for byte-level BPE.
    add_bos = meta.get("tokenizer.ggml.add_bos_token")
    add_bos = (kind == "llama") if add_bos is None else bool(add_bos)
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    name = {i: tokens[i] for i in named}
    add_bos, add_eos = add_bos and bos is not None, add_eos and eos is not None
    if not embedded:
        single = " ".join(([f"{name[bos]}:0"] if add_bos else []) + ["$A:0"] + ([f"{name[eos]}:0"] if add_eos else []))
        pair = single + " " + " ".join(([f"{name[bos]}:1"] if add_bos else []) + ["$B:1"]
                                       + ([f"{name[eos]}:1"] if add_eos else []))
        specials = ([(name[bos], bos)] if add_bos else []) + ([(name[eos], eos)] if add_eos and eos != bos else [])
        tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
    tok.save(str(out_dir / "tokenizer.json"))

    tok_cfg: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
        "bos_token": name.get(bos), "eos_token": name.get(eos), "unk_token": name.get(unk), "pad_token": name.get(pad),
        "add_bos_token": add_bos, "add_eos_token": add_eos,
        "model_max_length": int(meta.get(f"{arch}.context_length", 2048)),
    }
    if meta.get("tokenizer.chat_template"):
        tok_cfg["chat_template"] = meta["tokenizer.chat_template"]
    _write_json(out_dir / "tokenizer_config.json", tok_cfg)
    # End of generation: llama.cpp stops at eos and also at eot (end of turn) when the file names one.
    eos_ids = [i for i in (eos, _token_id(meta, "eot_token_id")) if i is not None]
    eos_ids = list(dict.fromkeys(eos_ids))
    gen = {"bos_token_id": bos, "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else (eos_ids or None),
           "pad_token_id": pad}
    return tok_cfg, gen
