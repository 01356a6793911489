"""Phi-3: the Llama-style decoder with a fused ``qkv_proj`` and a fused ``gate_up_proj`` (gate first, then up).

The fused projections map one to one onto the builder's own fused MatMuls. Partial rotary embeddings
(``partial_rotary_factor`` < 1) follow from the width of the model's cos/sin tables; a sliding window
(Phi-3-mini sets 2047) is applied to every layer when it is shorter than the graph's context.
"""
from __future__ import annotations

from typing import Any

import onnx

from edgelm.errors import UnsupportedArchitectureError

from . import common as c
from .llama import build_rope_decoder


def check_config(cfg: dict[str, Any]) -> None:
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedArchitectureError(f"Phi-3 with hidden_act={act!r} is not supported (only 'silu').",
                                           hint="Open an issue with the model id.")


def build(model: Any, family: str, context_length: int, *, kv_cache: str = "auto"
          ) -> tuple[onnx.ModelProto, c.DecoderShape]:
    """Build the decoder graph from a loaded (fp32, eval) Phi3ForCausalLM (``kv_cache`` as in llama.build)."""
    def qkv(a: Any) -> tuple[Any, Any]:
        return c.t(a.qkv_proj.weight), (None if a.qkv_proj.bias is None else a.qkv_proj.bias.detach().numpy())

    def gate_up(m: Any) -> tuple[Any, Any, int]:
        w = c.t(m.gate_up_proj.weight)
        b = None if m.gate_up_proj.bias is None else m.gate_up_proj.bias.detach().numpy()
        return w, b, w.shape[1] // 2

    return build_rope_decoder(model, family, context_length, qkv=qkv, gate_up=gate_up, kv_cache=kv_cache)
