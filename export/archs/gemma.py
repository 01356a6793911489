"""Gemma 2 and Gemma 3 text: Llama with

* RMSNorm that multiplies by (1 + weight), and four norms per block: before and after attention, before and
  after the MLP (the "after" norms apply to the block output, before the residual add);
* token embeddings multiplied by sqrt(hidden) -- the module's ``embed_scale`` cast to the table's dtype, folded
  into the table at build time (the LM head, tied to the unscaled table, stays its own initializer);
* a GELU-tanh gated MLP; the query scale is ``query_pre_attn_scalar ** -0.5`` (read from the modules);
* interleaved sliding-window and global layers (``layer_types``), each module carrying its window;
* final logit soft-capping when the config sets ``final_logit_softcapping``.

Gemma 2 also caps the attention scores (``attn_logit_softcapping``). Gemma 3 text (Gemma3ForCausalLM; Hugging
Face model_type gemma3_text) drops that -- transformers' Gemma3Attention keeps the config value but never
applies it, so neither do we -- and adds an RMSNorm over each q and k head before rotary and one rotary table
per layer type: ``rope_local_base_freq`` on local layers, ``rope_theta`` with ``rope_scaling`` on global ones.
The multimodal Gemma3ForConditionalGeneration is another architecture and is refused.
"""
from __future__ import annotations

from typing import Any

from . import decoder as d


def _refuse(cfg: dict[str, Any]) -> str | None:
    if cfg.get("use_bidirectional_attention"):
        return "use_bidirectional_attention=true (not a causal LM) is not supported."
    return None


_GEMMA = dict(activation_key="hidden_activation", activation="gelu_pytorch_tanh", norm_offset=1.0,
              sandwich_norms=True, scaled_embeddings=True, final_softcap=True, windows=d.window_per_module,
              refuse=_refuse)
GEMMA2 = d.Family("gemma2", "Gemma2ForCausalLM", attention_softcap=True, **_GEMMA)
GEMMA3 = d.Family("gemma3", "Gemma3ForCausalLM", qk_norm=True, rotary=d.rotary_per_layer_type, **_GEMMA)
FAMILIES = {f.name: f for f in (GEMMA2, GEMMA3)}
