"""The rotary decoder: Llama, and every family described by what it does differently from Llama.

Llama is the baseline: pre-norm blocks with RMSNorm, rotary position embeddings, grouped-query attention, a
SiLU-gated MLP and a final RMSNorm. A :class:`Family` lists a family's differences, and nothing else:

    projections   separate q/k/v and gate/up Linears (fused into one MatMul each) or already fused ones (Phi-3)
    norms         RMSNorm weight w or (1 + w) (Gemma); sandwich norms around attention and MLP (Gemma 3);
                  RMSNorm over each q and k head before rotary (Qwen3, Gemma 3)
    rotary        read from the model's own rotary module(s), one table per layer: one table everywhere
                  (Llama), one per layer type (Gemma 3's local/global bases), none on NoPE layers (SmolLM3)
    attention     the sliding window of each layer (none, every layer, or each module's own); score
                  soft-capping (Gemma 2)
    MLP           SiLU or GELU-tanh gate
    embeddings    scaled by sqrt(hidden) (Gemma); final logit soft-capping (Gemma 2 and 3)

Everything numeric (rotary tables for every rope_scaling variant, the query scale, windows) is read from the
loaded modules, so the graph follows the source's implementation rather than a re-derivation of it.
:func:`build` turns a model and its description into the graph of docs/model-format.md: the fused "shared"
layout where onnxruntime's GroupQueryAttention reproduces the model exactly, the plain "concat" layout otherwise.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from edgelm.errors import ExportError, UnsupportedArchitectureError

from . import common as c

Tables = tuple[np.ndarray, np.ndarray]  # rotary cos, sin [context, rotary dim]


# --- how a family's modules are read -----------------------------------------------------------------------------
def separate_qkv(attn: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """q_proj, k_proj, v_proj as one [in, (Hq + 2 Hkv) D] MatMul (+ bias where the source has one)."""
    return c.cat_linear([attn.q_proj, attn.k_proj, attn.v_proj])


def separate_gate_up(mlp: Any) -> tuple[np.ndarray, np.ndarray | None, int]:
    """gate_proj, up_proj as one [in, 2 I] MatMul; returns (W, bias, I)."""
    w, b = c.cat_linear([mlp.gate_proj, mlp.up_proj])
    return w, b, mlp.gate_proj.weight.shape[0]


def _bias(linear: Any) -> np.ndarray | None:
    return None if linear.bias is None else linear.bias.detach().cpu().numpy()


def fused_qkv(attn: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """A source ``qkv_proj`` that is already one Linear (Phi-3)."""
    return c.t(attn.qkv_proj.weight), _bias(attn.qkv_proj)


def fused_gate_up(mlp: Any) -> tuple[np.ndarray, np.ndarray | None, int]:
    """A source ``gate_up_proj`` that is already one Linear, gate first (Phi-3)."""
    w = c.t(mlp.gate_up_proj.weight)
    return w, _bias(mlp.gate_up_proj), w.shape[1] // 2


def _tables(rotary_emb: Any, positions: Any, *args: Any) -> Tables:
    import torch

    cos, sin = rotary_emb(torch.zeros(1, dtype=torch.float32), positions, *args)
    return cos[0].float().numpy(), sin[0].float().numpy()


def one_rotary(model: Any, positions: Any) -> list[Tables | None]:
    """Every layer uses the model's one rotary module (so every rope_scaling variant it implements -- linear,
    llama3, yarn, longrope... -- is reproduced for positions 0..context-1)."""
    base = model.model
    # (transformers < 4.48 kept a rotary module per attention layer for some families)
    tables = _tables(getattr(base, "rotary_emb", None) or base.layers[0].self_attn.rotary_emb, positions)
    return [tables] * len(base.layers)


def rotary_per_layer_type(model: Any, positions: Any) -> list[Tables | None]:
    """Gemma 3: one rotary table per layer type (local layers: rope_local_base_freq; global layers: rope_theta
    and rope_scaling), from the model's rotary module called with the layer type."""
    types = model.config.layer_types
    tables = {t: _tables(model.model.rotary_emb, positions, t) for t in sorted(set(types))}
    return [tables[t] for t in types]


def rotary_except_nope_layers(model: Any, positions: Any) -> list[Tables | None]:
    """SmolLM3: the model's rotary table, except on the layers whose attention module has ``use_rope`` off."""
    tables = one_rotary(model, positions)
    return [t if getattr(layer.self_attn, "use_rope", True) else None for t, layer in zip(tables, model.model.layers)]


def no_window(model: Any) -> list[int | None]:
    return [None] * len(model.model.layers)


def window_on_every_layer(model: Any) -> list[int | None]:
    """Mistral, Phi-3: ``config.sliding_window`` (when set) on every layer."""
    return [getattr(model.config, "sliding_window", None)] * len(model.model.layers)


def window_per_module(model: Any) -> list[int | None]:
    """Families whose attention modules carry their own ``sliding_window`` (set from ``layer_types`` by the
    Hugging Face modules: Qwen2, Qwen3, SmolLM3, Gemma 2 and 3); ``layer_types`` itself where a transformers
    version's modules do not carry it."""
    layers, cfg = model.model.layers, model.config
    if all(hasattr(layer.self_attn, "sliding_window") for layer in layers):
        return [layer.self_attn.sliding_window for layer in layers]
    types = getattr(cfg, "layer_types", None) or ["full_attention"] * len(layers)
    return [getattr(cfg, "sliding_window", None) if t == "sliding_attention" else None for t in types]


# the config's activation name -> the graph's gate activation (GELU-tanh is spelled the way onnxruntime fuses)
GATE_ACTIVATIONS = {"silu": c.silu, "gelu_pytorch_tanh": c.gelu_tanh}


@dataclass(frozen=True)
class Family:
    """One rotary decoder family: Llama plus these differences (the defaults are Llama)."""

    name: str                                   # edgelm model_type written to config.json
    architecture: str                           # Hugging Face architectures[0]
    qkv: Callable[[Any], tuple] = separate_qkv
    gate_up: Callable[[Any], tuple] = separate_gate_up
    activation_key: str = "hidden_act"          # config.json key naming the MLP activation ...
    activation: str = "silu"                    # ... and the one value this family's graph implements
    norm_offset: float = 0.0                    # RMSNorm multiplies by (norm_offset + weight); Gemma: 1
    qk_norm: bool = False                       # RMSNorm over each q and k head, before rotary
    sandwich_norms: bool = False                # attention / MLP outputs normed before their residual add
    scaled_embeddings: bool = False             # token embeddings times the module's embed_scale
    attention_softcap: bool = False             # scores capped by config.attn_logit_softcapping (when set)
    final_softcap: bool = False                 # logits capped by config.final_logit_softcapping (when set)
    rotary: Callable[[Any, Any], list[Tables | None]] = one_rotary
    windows: Callable[[Any], list[int | None]] = no_window
    refuse: Callable[[dict[str, Any]], str | None] = lambda cfg: None  # other unsupported config features

    def check_config(self, cfg: dict[str, Any]) -> None:
        """Refuse what this family's graph does not implement, from config.json alone (before any weights)."""
        act = cfg.get(self.activation_key, self.activation)
        if act != self.activation:
            raise UnsupportedArchitectureError(
                f"{self.architecture} with {self.activation_key}={act!r} is not supported (this builder "
                f"implements {self.activation!r}).", hint="Open an issue with the model id.")
        problem = self.refuse(cfg)
        if problem:
            raise UnsupportedArchitectureError(f"{self.architecture}: {problem}",
                                               hint="Open an issue with the model id.")

    def build(self, model: Any, model_type: str, context_length: int, *, kv_cache: str = "auto"
              ) -> tuple[onnx.ModelProto, c.DecoderShape]:
        """The builder interface every family offers (gpt2.py's module functions are the other one)."""
        return build(model, self, context_length, kv_cache=kv_cache)


def _norm(norm: Any, offset: float) -> tuple[np.ndarray, float]:
    """(weight as the graph multiplies by, eps) of an RMSNorm module (Llama's ``variance_epsilon``, Gemma's ``eps``)."""
    w = norm.weight.detach().cpu().float().numpy()
    eps = getattr(norm, "variance_epsilon", None)
    return (w + np.float32(offset) if offset else w), float(norm.eps if eps is None else eps)


def _distinct(tables: list[Tables | None]) -> list[Tables]:
    seen: dict[int, Tables] = {}
    for t in tables:
        if t is not None:
            seen.setdefault(id(t), t)
    return list(seen.values())


def build(model: Any, family: Family, context_length: int, *, kv_cache: str = "auto"
          ) -> tuple[onnx.ModelProto, c.DecoderShape]:
    """Build the decoder graph from a loaded (fp32, eval) Hugging Face causal LM described by ``family``.

    ``kv_cache``: "auto" builds the fused "shared" layout where :func:`common.shared_kv_supported` allows it
    for every layer and the plain "concat" graph otherwise; "concat" forces the plain graph."""
    import torch

    if kv_cache not in ("auto", "concat"):
        raise ValueError(f"kv_cache must be 'auto' or 'concat', got {kv_cache!r}")
    cfg, base = model.config, model.model
    attn0 = base.layers[0].self_attn
    head_dim = int(getattr(attn0, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    hq = cfg.num_attention_heads
    hkv = getattr(cfg, "num_key_value_heads", None) or hq
    shape = c.DecoderShape(
        num_layers=len(base.layers), num_attention_heads=hq, num_kv_heads=hkv, head_dim=head_dim,
        hidden_size=cfg.hidden_size, vocab_size=base.embed_tokens.weight.shape[0], context_length=context_length)
    attn_cap = getattr(cfg, "attn_logit_softcapping", None) if family.attention_softcap else None
    final_cap = getattr(cfg, "final_logit_softcapping", None) if family.final_softcap else None
    gb = c.GraphBuilder()

    with torch.no_grad():
        tables = family.rotary(model, torch.arange(context_length, dtype=torch.long)[None])
    distinct = _distinct(tables)
    # A window as long as the context never cuts: left out.
    windows = [w if w is not None and w < context_length else None for w in family.windows(model)]
    rot_dims = {cos.shape[1] for cos, _ in distinct}
    shared = kv_cache == "auto" and len(rot_dims) <= 1 and all(
        c.shared_kv_supported(shape, cos, sin, windows) for cos, sin in (distinct or [(None, None)]))
    rot_dim = rot_dims.pop() if len(rot_dims) == 1 else head_dim
    if shared:
        shape.kv_cache = "shared"
        if any(w is not None for w in windows):
            shape.min_onnxruntime = c.GQA_WINDOW_ONNXRUNTIME
        width, slot = c.cache_head_layout(head_dim, rot_dim)
        shape.cache_head_dim = width
        relaid = width != head_dim or rot_dim != head_dim  # heads padded/re-laid for the fused kernel
        io = c.declare_io_shared(gb, shape)
        kv = c.shared_kv_inputs(gb, io)
        rotary = {id(t): c.rotary_caches(gb, t[0], t[1], width) for t in distinct}
    else:
        io = c.declare_io(gb, shape)
        rotary = {id(t): c.rotary_tables(gb, io, t[0], t[1], head_dim) for t in distinct}

    table = base.embed_tokens.weight.detach()
    if family.scaled_embeddings:  # folded into the table, multiplied in the table's dtype as the module does
        table = table * base.embed_tokens.embed_scale.to(table.dtype)
    x = gb.op("Gather", [gb.weight("embed_tokens.weight", table), io.input_ids], axis=0, name="embed_tokens")
    pending = None  # the previous block's output, not yet added to the residual stream `x`
    for i, layer in enumerate(base.layers):
        a, m = layer.self_attn, layer.mlp
        w, eps = _norm(layer.input_layernorm, family.norm_offset)
        if pending is None:
            h = c.rms_norm(gb, x, w, eps, f"layers.{i}.input_layernorm")
        else:  # the residual add of the previous block fused with this norm
            h, x = c.skip_rms_norm(gb, pending, x, w, eps, f"layers.{i}.input_layernorm")

        qkv_w, qkv_b = family.qkv(a)
        scale = float(getattr(a, "scaling", head_dim ** -0.5))
        head_norm = None
        if family.qk_norm:  # the scale goes after the norm (which would undo it if folded into the projection)
            (qn, q_eps), (kn, k_eps) = _norm(a.q_norm, family.norm_offset), _norm(a.k_norm, family.norm_offset)
            if q_eps != k_eps:
                raise ExportError(f"layer {i}: q_norm and k_norm epsilons differ ({q_eps} vs {k_eps}).",
                                  hint="Please report this model; the builder assumes one epsilon.")
            head_norm = c.HeadNorm(c.head_norm_weight(qn, kn, hq, hkv, scale), q_eps)
        else:
            qkv_w, qkv_b = c.fold_query_scale(qkv_w, qkv_b, hq * head_dim, scale)
        o_w = c.t(a.o_proj.weight)
        layer_rotary = None if tables[i] is None else rotary[id(tables[i])]
        if shared:
            if relaid:
                qkv_w = c.spread_heads(qkv_w, hq + 2 * hkv, head_dim, width, slot, axis=1)
                qkv_b = None if qkv_b is None else c.spread_heads(qkv_b, hq + 2 * hkv, head_dim, width, slot, axis=0)
                o_w = c.spread_heads(o_w, hq, head_dim, width, slot, axis=0)
                if head_norm is not None:
                    head_norm = c.padded_head_norm(head_norm, head_dim, width, slot)
            fused = c.linear(gb, h, qkv_w, qkv_b, f"layers.{i}.attn.qkv_proj")
            ctx = c.attention_shared(gb, io, shape, i, fused, kv, rotary=layer_rotary, window=windows[i],
                                     head_norm=head_norm, softcap=attn_cap)
        else:
            fused = c.linear(gb, h, qkv_w, qkv_b, f"layers.{i}.attn.qkv_proj")
            bias = c.attention_bias(gb, io, windows[i], hq // hkv)
            ctx = c.attention(gb, io, shape, i, fused, rotary=layer_rotary, bias=bias, head_norm=head_norm,
                              softcap=attn_cap)
        attn_out = c.linear(gb, ctx, o_w, a.o_proj.bias, f"layers.{i}.attn.o_proj")

        if family.sandwich_norms:  # Gemma: post_attention_layernorm norms the output; the MLP's own norm follows
            w, eps = _norm(layer.post_attention_layernorm, family.norm_offset)
            attn_out = c.rms_norm(gb, attn_out, w, eps, f"layers.{i}.post_attention_layernorm")
            name, norm = f"layers.{i}.pre_feedforward_layernorm", layer.pre_feedforward_layernorm
        else:  # Llama: post_attention_layernorm is the MLP's input norm
            name, norm = f"layers.{i}.post_attention_layernorm", layer.post_attention_layernorm
        w, eps = _norm(norm, family.norm_offset)
        h, x = c.skip_rms_norm(gb, attn_out, x, w, eps, name)

        gu_w, gu_b, inter = family.gate_up(m)
        gate, up = gb.op("Split", [c.linear(gb, h, gu_w, gu_b, f"layers.{i}.mlp.gate_up_proj"),
                                   gb.const([inter, gu_w.shape[1] - inter])],
                         outputs=2, axis=-1, name=f"layers.{i}.mlp/split")
        act = GATE_ACTIVATIONS[family.activation](gb, gate, f"layers.{i}.mlp/act")
        gated = gb.op("Mul", [act, up], name=f"layers.{i}.mlp/gate")
        pending = c.linear(gb, gated, c.t(m.down_proj.weight), m.down_proj.bias, f"layers.{i}.mlp.down_proj")
        if family.sandwich_norms:
            w, eps = _norm(layer.post_feedforward_layernorm, family.norm_offset)
            pending = c.rms_norm(gb, pending, w, eps, f"layers.{i}.post_feedforward_layernorm")
    w, eps = _norm(base.norm, family.norm_offset)
    x, _ = c.skip_rms_norm(gb, pending, x, w, eps, "norm")
    c.lm_head_and_logits(gb, x, model.lm_head.weight, getattr(model.lm_head, "bias", None), shape, softcap=final_cap)
    return gb.model(f"edgelm-{family.name}"), shape
