"""docs/models.md quotes committed results files verbatim (benchmarks/real_models.py docs splices them in)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _real_models():
    spec = importlib.util.spec_from_file_location("real_models", ROOT / "benchmarks" / "real_models.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_models_md_tables_are_the_results_files():
    mod = _real_models()
    doc = mod.DOC.read_text(encoding="utf-8")
    for name in mod.SPLICED:
        text = (mod.RESULTS / name).read_text(encoding="utf-8")
        assert mod.splice(doc, name, text) == doc, f"docs/models.md is out of date with results/{name}: run " \
                                                   "python benchmarks/real_models.py docs"
