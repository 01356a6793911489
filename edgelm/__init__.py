"""edgelm: fast, private, offline small language models, with a large model only when the task needs it.

    >>> import edgelm
    >>> lm = edgelm.load()                      # the shipped default model (or a path to a model folder)
    >>> print(lm.generate("Once upon a time", max_new_tokens=40).text)
    >>> for piece in lm.stream("The cat"):      # text pieces as they are decoded
    ...     print(piece, end="", flush=True)
    >>> lm.score("Tom has a red ball.").bits_per_byte

The runtime needs only onnxruntime, numpy and tokenizers. The build side (``edgelm export``, ``train``,
``distill``) is the ``[export]`` extra and is never imported from here.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edgelm import errors
from edgelm.model import Generation, Model, Score, load

__version__ = "0.1.0"

if TYPE_CHECKING:  # pragma: no cover
    from edgelm.cloud import CloudClient
    from edgelm.hybrid import Hybrid, HybridResult, Router

# The hybrid side is optional: imported on first use, so `import edgelm` stays light.
_LAZY = {
    "CloudClient": "edgelm.cloud",
    "Hybrid": "edgelm.hybrid",
    "HybridResult": "edgelm.hybrid",
    "Router": "edgelm.hybrid",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'edgelm' has no attribute {name!r}")


__all__ = ["load", "Model", "Generation", "Score", "errors", "CloudClient", "Hybrid", "HybridResult", "Router",
           "__version__"]
