"""Docs quote committed results files verbatim: docs/models.md (benchmarks/real_models.py docs splices them in),
the README's example output (benchmarks/readme_run.py docs) and its quality numbers (the default model's manifest)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _real_models():
    return _load("real_models", ROOT / "benchmarks" / "real_models.py")


def test_models_md_tables_are_the_results_files():
    mod = _real_models()
    doc = mod.DOC.read_text(encoding="utf-8")
    for name in mod.SPLICED:
        text = (mod.RESULTS / name).read_text(encoding="utf-8")
        assert mod.splice(doc, name, text) == doc, f"docs/models.md is out of date with results/{name}: run " \
                                                   "python benchmarks/real_models.py docs"


def test_spliced_results_in_the_other_docs_are_the_results_files():
    """Every `<!-- results/NAME -->` block in docs/*.md is results/NAME verbatim (the benchmarks' `docs` commands,
    or a paste of the file, put them there; a hand edit or a rerun without updating the docs shows here)."""
    import re

    splice = _real_models().splice
    for doc_path in sorted((ROOT / "docs").glob("*.md")):
        doc = doc_path.read_text(encoding="utf-8")
        names = re.findall(r"<!-- results/([\w.-]+) -->", doc)
        assert doc_path.name != "export.md" or "stories260k-modes.md" in names
        for name in names:
            text = (ROOT / "benchmarks" / "results" / name).read_text(encoding="utf-8")
            assert splice(doc, name, text) == doc, f"{doc_path.name} is out of date with results/{name}"


def test_readme_output_block_is_the_recorded_run():
    mod = _load("readme_run", ROOT / "benchmarks" / "readme_run.py")
    result = json.loads(mod.RESULTS.read_text(encoding="utf-8"))
    readme = mod.README.read_text(encoding="utf-8")
    assert mod.render(result) in readme and mod.splice(readme, result) == readme, \
        "README.md's output block is not benchmarks/results/readme-run.json: run python benchmarks/readme_run.py docs"
    assert result["stats"] in readme


def test_readme_quality_numbers_are_the_default_models_manifest():
    manifest = json.loads((ROOT / "models" / "tinystories-edge-int8" / "edgelm.json").read_text(encoding="utf-8"))
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    bpb = manifest["metrics"]["quantized_bits_per_byte"]
    ref = manifest["build"]["bits_per_byte"]["stories260K"]
    assert f"{bpb:.3f} bits/byte" in readme, f"README should quote the shipped model's {bpb:.3f} bits/byte"
    assert f"scores {ref:.3f}" in readme, f"README should quote stories260K's {ref:.3f} bits/byte"


def test_default_model_card_prose_is_generated_from_the_build_logs():
    """The card's build prose (build time, sample size, % fewer steps, layout) is what the logs say today."""
    from importlib.machinery import SourceFileLoader

    loader = SourceFileLoader("finish_default_model", str(ROOT / "scripts" / "finish-default-model"))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    card = (ROOT / "models" / "tinystories-edge-int8" / "README.md").read_text(encoding="utf-8")
    for paragraph in mod.build_prose(mod.build_facts(ROOT / "artifacts" / "tinystories-edge")):
        assert paragraph in card, f"card out of date with artifacts/tinystories-edge/logs: run " \
                                  f"python scripts/finish-default-model --reuse-speed\n{paragraph}"
    build = json.loads((ROOT / "models" / "tinystories-edge-int8" / "edgelm.json").read_text())["build"]
    ours, ref = build["single_newline_eval"]["bits_per_byte"].values()
    assert f"**{ours:.4f}** bits/byte" in card and f"stories260K's {ref:.4f}" in card
    assert len(build["eval_sha256"]["eval/tinystories-v1-valid-a.txt"]) == 64


def test_performance_md_summary_is_the_compare_results():
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))  # compare.py imports its sibling shapes.py
    try:
        mod = _load("compare_bench", ROOT / "benchmarks" / "compare.py")
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    text = mod.summary()
    assert (mod.RESULTS_DIR / "compare-summary.md").read_text(encoding="utf-8") == text
    doc = mod.DOC.read_text(encoding="utf-8")
    assert mod.splice(doc, "compare-summary.md", text) == doc, \
        "docs/performance.md is out of date with the compare results: run python benchmarks/compare.py docs"


def test_raspberry_pi_memory_table_is_the_rss_results():
    mod = _load("rss_shapes", ROOT / "benchmarks" / "rss_shapes.py")
    text = mod.RESULTS.with_suffix(".md").read_text(encoding="utf-8")
    doc = mod.DOC.read_text(encoding="utf-8")
    assert mod.splice(doc, text) == doc, "docs/raspberry-pi.md's memory table is out of date: run " \
                                         "python benchmarks/rss_shapes.py docs"
    rows = json.loads(mod.RESULTS.with_suffix(".json").read_text(encoding="utf-8"))["rows"]
    assert set(rows) == set(mod.SHAPES) and all(r["import"] < r["load"] <= r["peak"] for r in rows.values())


def test_raspberry_pi_emulation_table_is_the_committed_smoke_output():
    import re

    doc = (ROOT / "docs" / "raspberry-pi.md").read_text(encoding="utf-8")
    runs = sorted((ROOT / "benchmarks" / "results").glob("arm64-smoke-stories260K-*"))
    assert len(runs) == 3
    for run in runs:
        summary = (run / "summary.txt").read_text(encoding="utf-8")
        host, arm = [float(x) for x in re.findall(r"decode ([\d.]+) tok/s", summary)]
        delta = float(re.search(r"max \|top-1 logit delta\| ([\d.e+-]+)", summary).group(1))
        assert "identical: True" in summary
        row = next(ln for ln in doc.splitlines() if f"(`{run.name.split('-', 3)[-1]}`)" in ln)
        assert f"{arm:,.0f} tokens/s" in row and f"{host:,.0f} tokens/s" in row, row
        assert (f"{delta:.2f}" if delta >= 0.01 else f"{delta:.1e}") in row, row
