"""One graph builder per architecture family.

``SUPPORTED`` maps the Hugging Face ``architectures[0]`` name of a source model to (family module, edgelm
``model_type``). :func:`resolve` works from config.json alone, so an unsupported model is refused before any
weights are loaded.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from edgelm.errors import UnsupportedArchitectureError

# architecture -> (module in this package, edgelm model_type written to config.json)
SUPPORTED: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("llama", "llama"),
    "MistralForCausalLM": ("llama", "mistral"),
    "Qwen2ForCausalLM": ("llama", "qwen2"),
    "Phi3ForCausalLM": ("phi3", "phi3"),
    "GPT2LMHeadModel": ("gpt2", "gpt2"),
}


def resolve(cfg: dict[str, Any]) -> tuple[str, ModuleType, str]:
    """Return (architecture, builder module, model_type) for a source config.json, or raise early."""
    archs = cfg.get("architectures") or []
    arch = archs[0] if archs else None
    if arch not in SUPPORTED:
        what = arch or f"model_type={cfg.get('model_type')!r} (config.json names no architectures)"
        raise UnsupportedArchitectureError(
            f"Cannot export {what}: supported architectures are {', '.join(SUPPORTED)}.",
            hint="Pick a model of a supported family (Llama/SmolLM/TinyLlama, Mistral, Qwen2, Phi-3, GPT-2).")
    module_name, model_type = SUPPORTED[arch]
    module = importlib.import_module(f"{__name__}.{module_name}")
    module.check_config(cfg)
    return arch, module, model_type
