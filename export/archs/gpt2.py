"""GPT-2: learned position embeddings, LayerNorm, Conv1D projections (weights stored [in, out]), biases
everywhere, the tanh approximation of GELU ("gelu_new") and an LM head tied to the token embeddings.

Attention is plain multi-head (no KV-head sharing, no rotary); ``position_ids`` index the learned table.
"""
from __future__ import annotations

from typing import Any

import onnx

from edgelm.errors import UnsupportedArchitectureError

from . import common as c

_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu")


def check_config(cfg: dict[str, Any]) -> None:
    act = cfg.get("activation_function", "gelu_new")
    if act not in _ACTIVATIONS:
        raise UnsupportedArchitectureError(f"GPT-2 with activation_function={act!r} is not supported "
                                           f"(supported: {', '.join(_ACTIVATIONS)}).", hint="Open an issue with the model id.")
    if cfg.get("add_cross_attention"):
        raise UnsupportedArchitectureError("GPT-2 with cross-attention (an encoder-decoder setup) is not supported.",
                                           hint="Export a decoder-only GPT-2.")


def _gelu(gb: c.GraphBuilder, x: str, act: str, name: str) -> str:
    if act == "gelu":  # exact: 0.5 x (1 + erf(x / sqrt 2))
        import numpy as np
        e = gb.op("Erf", [gb.op("Mul", [x, gb.const(float(1 / np.sqrt(2)), np.float32)])], name=f"{name}/Erf")
        return gb.op("Mul", [gb.op("Mul", [x, gb.const(0.5, np.float32)]),
                             gb.op("Add", [e, gb.const(1.0, np.float32)])], name=f"{name}/Mul")
    return c.gelu_tanh(gb, x, name)


def build(model: Any, family: str, context_length: int) -> tuple[onnx.ModelProto, c.DecoderShape]:
    """Build the decoder graph from a loaded (fp32, eval) GPT2LMHeadModel."""
    cfg, base = model.config, model.transformer
    heads = cfg.n_head
    shape = c.DecoderShape(num_layers=len(base.h), num_attention_heads=heads, num_kv_heads=heads,
                           head_dim=cfg.n_embd // heads, hidden_size=cfg.n_embd,
                           vocab_size=base.wte.weight.shape[0], context_length=context_length)
    gb = c.GraphBuilder()
    io = c.declare_io(gb, shape)
    bias = c.attention_bias(gb, io)
    tok = gb.op("Gather", [gb.weight("wte.weight", base.wte.weight), io.input_ids], axis=0, name="wte")
    pos = gb.op("Gather", [gb.weight("wpe.weight", base.wpe.weight[:context_length]), io.position_ids], axis=0,
                name="wpe")
    x = gb.op("Add", [tok, pos], name="embeddings")
    act = getattr(cfg, "activation_function", "gelu_new")
    for i, block in enumerate(base.h):
        a, m = block.attn, block.mlp
        h = c.layer_norm(gb, x, block.ln_1.weight, block.ln_1.bias, block.ln_1.eps, f"h.{i}.ln_1")
        w, b = c.fold_query_scale(a.c_attn.weight.detach().numpy(), a.c_attn.bias.detach().numpy(), cfg.n_embd,
                                  float(getattr(a, "scaling", shape.head_dim ** -0.5)))
        qkv = c.linear(gb, h, w, b, f"h.{i}.attn.c_attn")  # Conv1D weights are already [in, out]
        ctx = c.attention(gb, io, shape, i, qkv, rotary=None, bias=bias)
        x = gb.op("Add", [x, c.linear(gb, ctx, a.c_proj.weight, a.c_proj.bias, f"h.{i}.attn.c_proj")],
                  name=f"h.{i}/attn_residual")
        h = c.layer_norm(gb, x, block.ln_2.weight, block.ln_2.bias, block.ln_2.eps, f"h.{i}.ln_2")
        h = _gelu(gb, c.linear(gb, h, m.c_fc.weight, m.c_fc.bias, f"h.{i}.mlp.c_fc"), act, f"h.{i}.mlp/gelu")
        x = gb.op("Add", [x, c.linear(gb, h, m.c_proj.weight, m.c_proj.bias, f"h.{i}.mlp.c_proj")],
                  name=f"h.{i}/mlp_residual")
    x = c.layer_norm(gb, x, base.ln_f.weight, base.ln_f.bias, base.ln_f.eps, "ln_f")
    c.lm_head_and_logits(gb, x, model.lm_head.weight, getattr(model.lm_head, "bias", None), shape)
    return gb.model(f"edgelm-{family}"), shape
