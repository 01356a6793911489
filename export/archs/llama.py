"""Llama-style decoders: Llama (also SmolLM, TinyLlama), Mistral and Qwen2.

Pre-norm blocks with RMSNorm, rotary position embeddings, grouped-query attention and a SiLU-gated MLP.
Qwen2 adds q/k/v biases (read from the modules, so any bias the source has is carried); Mistral and Qwen2
may use a sliding attention window, which is built into the attention mask when it is shorter than the
context the graph is built for (otherwise it changes nothing and is left out).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import onnx

from edgelm.errors import UnsupportedArchitectureError

from . import common as c

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}


def check_config(cfg: dict[str, Any]) -> None:
    """Refuse features this builder does not implement, from config.json alone (before loading weights)."""
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedArchitectureError(
            f"hidden_act={act!r} is not supported for {cfg.get('architectures')}; the Llama builder implements 'silu'.",
            hint="Open an issue with the model id, or export a model with the standard SiLU MLP.")


def sliding_windows(model: Any, family: str, num_layers: int) -> list[int | None]:
    """The sliding window of each layer (None = full attention), following the Hugging Face modules' rules."""
    cfg = model.config
    window = getattr(cfg, "sliding_window", None)
    if family == "llama" or window is None:  # (phi3 and mistral: every layer slides when the window is set)
        return [None] * num_layers
    if family == "qwen2":
        types = getattr(cfg, "layer_types", None) or ["full_attention"] * num_layers
        return [window if t == "sliding_attention" else None for t in types]
    return [window] * num_layers


def build(model: Any, family: str, context_length: int, *, kv_cache: str = "auto"
          ) -> tuple[onnx.ModelProto, c.DecoderShape]:
    """Build the decoder graph from a loaded (fp32, eval) Hugging Face causal LM.

    ``kv_cache``: "auto" builds the fused "shared" layout where :func:`common.shared_kv_supported` allows it and
    the plain "concat" graph otherwise; "concat" forces the plain graph."""
    def qkv(a: Any) -> tuple[Any, Any]:  # separate q/k/v projections, fused into one MatMul
        return c.cat_linear([a.q_proj, a.k_proj, a.v_proj])

    def gate_up(m: Any) -> tuple[Any, Any, int]:  # separate gate/up projections, fused into one MatMul
        w, b = c.cat_linear([m.gate_proj, m.up_proj])
        return w, b, m.gate_proj.weight.shape[0]

    return build_rope_decoder(model, family, context_length, qkv=qkv, gate_up=gate_up, kv_cache=kv_cache)


def build_rope_decoder(model: Any, family: str, context_length: int, *, qkv: Callable, gate_up: Callable,
                       kv_cache: str = "auto") -> tuple[onnx.ModelProto, c.DecoderShape]:
    """The pre-norm RMSNorm / rotary / gated-SiLU decoder shared by Llama, Mistral, Qwen2 and Phi-3.

    ``qkv(attn) -> (W [in, (Hq+2Hkv)D], bias|None)`` and ``gate_up(mlp) -> (W [in, 2I], bias|None, I)`` adapt
    each family's projection layout (separate Linears here, already fused ones in Phi-3).
    """
    import torch

    cfg, base = model.config, model.model
    attn0 = base.layers[0].self_attn
    head_dim = int(getattr(attn0, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    shape = c.DecoderShape(
        num_layers=len(base.layers), num_attention_heads=cfg.num_attention_heads,
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads, head_dim=head_dim,
        hidden_size=cfg.hidden_size, vocab_size=base.embed_tokens.weight.shape[0], context_length=context_length)
    if kv_cache not in ("auto", "concat"):
        raise ValueError(f"kv_cache must be 'auto' or 'concat', got {kv_cache!r}")
    gb = c.GraphBuilder()

    # Rotary tables straight from the model's own rotary module, so every rope_scaling variant it implements
    # (linear, dynamic, llama3, yarn, longrope...) is reproduced exactly for positions 0..context_length-1.
    with torch.no_grad():
        pos = torch.arange(context_length, dtype=torch.long)[None]
        # (transformers < 4.48 kept a rotary module per attention layer for some families)
        rotary_emb = getattr(base, "rotary_emb", None) or attn0.rotary_emb
        cos, sin = rotary_emb(torch.zeros(1, dtype=torch.float32), pos)
    cos_np, sin_np = cos[0].float().numpy(), sin[0].float().numpy()
    n_rep = shape.num_attention_heads // shape.num_kv_heads
    windows = [w if w is not None and w < context_length else None
               for w in sliding_windows(model, family, shape.num_layers)]
    shared = kv_cache == "auto" and c.shared_kv_supported(shape, cos_np, sin_np, windows)
    if shared:
        shape.kv_cache = "shared"
        width, slot = c.cache_head_layout(head_dim, cos_np.shape[1])
        shape.cache_head_dim = width
        io = c.declare_io_shared(gb, shape)
        kv = c.shared_kv_inputs(gb, io, cos_np, sin_np, width)
    else:
        io = c.declare_io(gb, shape)
        rot = c.rotary_tables(gb, io, cos_np, sin_np, head_dim)

    x = gb.op("Gather", [gb.weight("embed_tokens.weight", base.embed_tokens.weight), io.input_ids], axis=0,
              name="embed_tokens")
    pending = None  # the previous block's output, not yet added to the residual stream `x`
    for i, layer in enumerate(base.layers):
        a, m = layer.self_attn, layer.mlp
        norm = layer.input_layernorm
        if pending is None:
            h = c.rms_norm(gb, x, norm.weight, norm.variance_epsilon, f"layers.{i}.input_layernorm")
        else:  # the residual add of the previous MLP fused with this norm
            h, x = c.skip_rms_norm(gb, pending, x, norm.weight, norm.variance_epsilon, f"layers.{i}.input_layernorm")
        qkv_w, qkv_b = c.fold_query_scale(*qkv(a), shape.num_attention_heads * head_dim,
                                          float(getattr(a, "scaling", head_dim ** -0.5)))
        o_w = c.t(a.o_proj.weight)
        if shared:
            if width != head_dim or cos_np.shape[1] != head_dim:  # heads padded/re-laid for the fused kernel
                n_heads = shape.num_attention_heads + 2 * shape.num_kv_heads
                qkv_w = c.spread_heads(qkv_w, n_heads, head_dim, width, slot, axis=1)
                qkv_b = None if qkv_b is None else c.spread_heads(qkv_b, n_heads, head_dim, width, slot, axis=0)
                o_w = c.spread_heads(o_w, shape.num_attention_heads, head_dim, width, slot, axis=0)
            fused = c.linear(gb, h, qkv_w, qkv_b, f"layers.{i}.attn.qkv_proj")
            ctx = c.attention_shared(gb, io, shape, i, fused, kv)
        else:
            fused = c.linear(gb, h, qkv_w, qkv_b, f"layers.{i}.attn.qkv_proj")
            ctx = c.attention(gb, io, shape, i, fused, rotary=rot, bias=c.attention_bias(gb, io, windows[i], n_rep))
        attn_out = c.linear(gb, ctx, o_w, a.o_proj.bias, f"layers.{i}.attn.o_proj")
        norm = layer.post_attention_layernorm
        h, x = c.skip_rms_norm(gb, attn_out, x, norm.weight, norm.variance_epsilon, f"layers.{i}.post_attention_layernorm")
        gu_w, gu_b, inter = gate_up(m)
        gate, up = gb.op("Split", [c.linear(gb, h, gu_w, gu_b, f"layers.{i}.mlp.gate_up_proj"),
                                   gb.const([inter, gu_w.shape[1] - inter])],
                         outputs=2, axis=-1, name=f"layers.{i}.mlp/split")
        act = gb.op("Mul", [c.silu(gb, gate, f"layers.{i}.mlp/silu"), up], name=f"layers.{i}.mlp/gate")
        pending = c.linear(gb, act, c.t(m.down_proj.weight), m.down_proj.bias, f"layers.{i}.mlp.down_proj")
    x, _ = c.skip_rms_norm(gb, pending, x, base.norm.weight, base.norm.variance_epsilon, "norm")
    c.lm_head_and_logits(gb, x, model.lm_head.weight, getattr(model.lm_head, "bias", None), shape)
    return gb.model(f"edgelm-{family}"), shape
