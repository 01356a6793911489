"""One graph builder per architecture family.

``FAMILIES`` is the one table of what `edgelm export` supports: the Hugging Face ``architectures[0]`` name of a
source model, the module that describes it, the edgelm ``model_type`` it gets, the cache layout its graph uses
and what the tests verified. :func:`resolve` works from config.json alone, so an unsupported model is refused
before any weights are loaded. Rotary families are a :class:`decoder.Family` each (what differs from Llama);
GPT-2 has its own builder module.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from edgelm.errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class Supported:
    architecture: str   # Hugging Face architectures[0]
    module: str         # the module in this package that describes or builds it
    model_type: str     # edgelm model_type written to config.json
    cache: str          # the KV cache layout the builder picks (docs/model-format.md)
    verified: str       # what the tests check it against


# "random config": a tiny random model built in the tests, whose greedy tokens from the edgelm runtime equal
# transformers' generate (tests/test_export_archs.py, tests/test_export_families.py); "both layouts": the
# fused and the plain graph each; "window cuts": generation runs well past a sliding window shorter than it.
FAMILIES: tuple[Supported, ...] = (
    Supported("LlamaForCausalLM", "llama", "llama", "shared",
              "random config; llama3 rope, both layouts; real weights: stories260K"),
    Supported("MistralForCausalLM", "llama", "mistral", "shared", "random config, window cuts"),
    Supported("Qwen2ForCausalLM", "llama", "qwen2", "shared", "random config, window cuts"),
    Supported("Qwen3ForCausalLM", "llama", "qwen3", "shared", "random config, both layouts, window cuts, head 24"),
    Supported("SmolLM3ForCausalLM", "llama", "smollm3", "shared", "random config, both layouts, NoPE layers"),
    Supported("Gemma2ForCausalLM", "gemma", "gemma2", "shared", "random config, both layouts, window cuts, soft-caps"),
    Supported("Gemma3ForCausalLM", "gemma", "gemma3", "shared", "random config, both layouts, window cuts"),
    Supported("Phi3ForCausalLM", "phi3", "phi3", "shared", "random config, window cuts, partial rotary"),
    Supported("GPT2LMHeadModel", "gpt2", "gpt2", "concat", "random config"),
)
# The generic path (export/generic.py) for everything else: optimum's exporter, or a folder's ready-made graph.
# "random config" here: tiny random models exported by optimum in tests/test_export_generic.py whose greedy tokens
# from the edgelm runtime equal transformers' generate; "hand-built graph": a graph written with onnx.helper,
# converted with torch blocked from import.
GENERIC: tuple[tuple[str, str, str, str, str], ...] = (
    ("any other causal LM", "optimum (--via optimum)", "the source's", "concat",
     "random config: GPT-NeoX, OPT, Bloom, Falcon, StableLM, OLMo"),
    ("ready-made ONNX folder", "its graph (--via onnx)", "the source's", "concat",
     "optimum's folder, onnx/model*.onnx variants, hand-built graph without torch"),
)
# architecture -> (module in this package, edgelm model_type written to config.json)
SUPPORTED: dict[str, tuple[str, str]] = {f.architecture: (f.module, f.model_type) for f in FAMILIES}


def family_table(markdown: bool = False) -> str:
    """The supported families as one table (``edgelm export --list``; the same rows are in docs/export.md): the
    builder's families, then the generic path's rows."""
    head = ("architectures[0]", "path", "model_type", "KV cache", "verified")
    rows = [(f.architecture, f"export/archs/{f.module}.py", f.model_type, f.cache, f.verified) for f in FAMILIES]
    rows += list(GENERIC)
    if markdown:
        return "\n".join("| " + " | ".join(r) + " |" for r in [head, ("---",) * len(head), *rows])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head, *rows])


def resolve(cfg: dict[str, Any]) -> tuple[str, Any, str]:
    """Return (architecture, builder, model_type) for a source config.json, or raise early.

    The builder has ``build(model, model_type, context_length)``: a :class:`decoder.Family`, or gpt2's module."""
    archs = cfg.get("architectures") or []
    arch = archs[0] if archs else None
    if arch not in SUPPORTED:
        what = arch or f"model_type={cfg.get('model_type')!r} (config.json names no architectures)"
        raise UnsupportedArchitectureError(
            f"Cannot export {what}: supported architectures are {', '.join(SUPPORTED)}.",
            hint="Leave out --via builder to export it through optimum (--via optimum), or pick a family of "
                 "`edgelm export --list`.")
    module_name, model_type = SUPPORTED[arch]
    module = importlib.import_module(f"{__name__}.{module_name}")
    builder = module.FAMILIES[model_type] if hasattr(module, "FAMILIES") else module
    try:
        builder.check_config(cfg)
    except UnsupportedArchitectureError as exc:  # a feature the builder lacks: optimum may still export it
        raise UnsupportedArchitectureError(exc.message, hint=f"{exc.hint or ''} Or export it through optimum with "
                                           "--via optimum (a slower graph).".strip()) from None
    return arch, builder, model_type
