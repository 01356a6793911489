"""Shipped model folders. Installed as the package ``edgelm_models`` so the default model travels in the wheel."""
from __future__ import annotations

from pathlib import Path

#: Folder name (inside this package) of the model ``edgelm.load()`` uses when given no path.
DEFAULT_MODEL = "tinystories-edge-int8"


def default_path() -> Path:
    """Path of the shipped default model folder (it may be absent in a source tree that has not built it)."""
    return Path(__file__).resolve().parent / DEFAULT_MODEL
