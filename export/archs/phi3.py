"""Phi-3: Llama with a fused ``qkv_proj`` and a fused ``gate_up_proj`` (gate first, then up), a sliding window on
every layer (Phi-3-mini sets 2047; applied when shorter than the graph's context) and, in some checkpoints,
partial rotary (``partial_rotary_factor`` < 1), which follows from the width of the model's cos/sin tables.
"""
from __future__ import annotations

from . import decoder as d

PHI3 = d.Family("phi3", "Phi3ForCausalLM", qkv=d.fused_qkv, gate_up=d.fused_gate_up, windows=d.window_on_every_layer)
FAMILIES = {PHI3.name: PHI3}
