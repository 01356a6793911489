"""Llama and the families that are Llama with one or two differences (export/archs/decoder.py has the builder).

    Llama (SmolLM, TinyLlama)  the baseline; any rope_scaling the model's rotary module implements (llama3 too)
    Mistral                    a sliding window on every layer
    Qwen2                      q/k/v biases (carried from the modules); per-layer sliding window (layer_types)
    Qwen3                      RMSNorm over each q and k head before rotary; head_dim may differ from
                               hidden / heads; per-layer sliding window
    SmolLM3                    no rotary on every no_rope_layer_interval-th layer (no_rope_layers)

A window is built into the attention (mask or fused kernel) when it is shorter than the graph's context;
otherwise it changes nothing and is left out.
"""
from __future__ import annotations

from typing import Any

import onnx

from . import common as c
from . import decoder as d

LLAMA = d.Family("llama", "LlamaForCausalLM")
MISTRAL = d.Family("mistral", "MistralForCausalLM", windows=d.window_on_every_layer)
QWEN2 = d.Family("qwen2", "Qwen2ForCausalLM", windows=d.window_per_module)
QWEN3 = d.Family("qwen3", "Qwen3ForCausalLM", qk_norm=True, windows=d.window_per_module)
SMOLLM3 = d.Family("smollm3", "SmolLM3ForCausalLM", rotary=d.rotary_except_nope_layers, windows=d.window_per_module)

FAMILIES = {f.name: f for f in (LLAMA, MISTRAL, QWEN2, QWEN3, SMOLLM3)}


def build(model: Any, family: str, context_length: int, *, kv_cache: str = "auto"
          ) -> tuple[onnx.ModelProto, c.DecoderShape]:
    """Build the graph of a loaded (fp32, eval) model of ``family`` ("llama", "qwen3", ...; ``kv_cache`` as in
    decoder.build)."""
    return d.build(model, FAMILIES[family], context_length, kv_cache=kv_cache)
