"""docs/hybrid.md quotes the committed routing results verbatim (`python benchmarks/routing_eval.py docs`
splices benchmarks/results/routing-mixed.md in), and that file agrees with the JSON it was written from."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _routing_eval():
    spec = importlib.util.spec_from_file_location("routing_eval", ROOT / "benchmarks" / "routing_eval.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_hybrid_md_table_is_the_results_file():
    mod = _routing_eval()
    doc = mod.DOC.read_text(encoding="utf-8")
    text = mod.MIXED_MD.read_text(encoding="utf-8")
    assert mod.splice(doc, mod.MIXED_MD.name, text) == doc, \
        "docs/hybrid.md is out of date with benchmarks/results/routing-mixed.md: run python benchmarks/routing_eval.py docs"
    result = json.loads(mod.MIXED_JSON.read_text(encoding="utf-8"))
    assert mod.mixed_markdown(result) == text, "routing-mixed.md was not written from routing-mixed.json"
    assert mod.MIXED_PNG.is_file()
