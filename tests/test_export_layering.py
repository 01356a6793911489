"""The training side of export/ is a stack, not a web.

The library modules (corpus, tokenizer, train, distill, recipe) import each other in one direction only and never
import the command-line layer (``edgelm_export.commands``), which sits on top of all of them. Checked two ways:
statically, over every import in the source (including the ones inside functions, which run only later), and by
importing each module in a fresh interpreter and looking at what came with it.
"""
from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXPORT = ROOT / "export"

# module -> the edgelm_export modules it may import. The exporter (convert) is used by recipe's export stage
# and is not part of this stack.
ALLOWED: dict[str, set[str]] = {
    "corpus": set(),
    "tokenizer": {"corpus"},
    "train": {"corpus"},
    "distill": {"corpus", "train"},
    "recipe": {"tokenizer", "train", "distill", "convert"},
    "commands": {"corpus", "tokenizer", "train", "distill", "recipe", "convert", "assemble", "archs"},
}
LIBRARY = [m for m in ALLOWED if m != "commands"]


def edgelm_export_imports(module: str) -> set[str]:
    """The edgelm_export modules ``export/<module>.py`` imports anywhere in its source (first name after the
    package: ``from edgelm_export.archs.common import X`` counts as ``archs``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse((EXPORT / f"{module}.py").read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("edgelm_export.")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from .x import y / from . import x
                found |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
            elif node.module == "edgelm_export":
                found |= {a.name for a in node.names}
            elif node.module and node.module.startswith("edgelm_export."):
                found.add(node.module.split(".")[1])
    return found - {module}


@pytest.mark.parametrize("module", list(ALLOWED))
def test_imports_point_down_the_stack_only(module):
    imported = edgelm_export_imports(module)
    assert imported <= ALLOWED[module], f"{module} imports {sorted(imported - ALLOWED[module])}"


def test_training_side_has_no_import_cycle():
    graph = {m: edgelm_export_imports(m) & set(ALLOWED) for m in ALLOWED}
    done: set[str] = set()

    def visit(m: str, path: list[str]) -> None:
        assert m not in path, "import cycle: " + " -> ".join(path[path.index(m):] + [m])
        if m in done:
            return
        for dep in sorted(graph[m]):
            visit(dep, path + [m])
        done.add(m)

    for m in graph:
        visit(m, [])
    assert done == set(ALLOWED)


PROBE = """
import importlib, json, sys
importlib.import_module("edgelm_export." + sys.argv[1])
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("edgelm_export", "torch", "transformers"))))
"""


@pytest.mark.parametrize("module", list(ALLOWED))
def test_fresh_import_brings_only_what_is_below(module):
    """Importing a module loads the modules under it and nothing above: no commands, no torch, no transformers."""
    out = subprocess.run([sys.executable, "-c", PROBE, module], capture_output=True, text=True, check=True, cwd=ROOT)
    loaded = {m.split(".")[1] if m.startswith("edgelm_export.") else m for m in json.loads(out.stdout)}
    below: set[str] = set()
    todo = [module]
    while todo:
        for dep in {**EXPORT_ALLOWED, **ALLOWED}.get(todo.pop(), set()) - below:
            below.add(dep)
            todo.append(dep)
    assert loaded <= {"edgelm_export", module} | below, f"importing {module} also loaded {sorted(loaded - below)}"
    assert module in loaded
    if module != "commands":
        assert "commands" not in loaded


@pytest.mark.parametrize("verb, flag", [("train-tokenizer", "--vocab-size"), ("train", "--preset"),
                                        ("distill", "--hidden-weight"), ("build-recipe", "--stages")])
def test_each_training_verb_reaches_its_command(verb, flag):
    from edgelm.cli import build_parser

    parser = build_parser([verb])
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    verb_parser = sub.choices[verb]
    assert flag in verb_parser.format_help()
    assert verb_parser.get_default("_run").__module__ == "edgelm_export.commands"


# The export side: two paths (convert = our builder, generic = optimum / ready-made ONNX) on one shared library
# (assemble), which imports neither path; convert picks a path, so it alone may import generic.
EXPORT_ALLOWED: dict[str, set[str]] = {
    "quantize": set(),
    "verify": set(),
    "evaluate": {"quantize"},
    "gguf": {"archs"},
    "assemble": {"quantize", "evaluate"},
    "generic": {"archs", "assemble", "evaluate", "quantize", "verify"},
    "convert": {"archs", "assemble", "generic", "gguf", "quantize", "verify"},
}


@pytest.mark.parametrize("module", list(EXPORT_ALLOWED))
def test_export_paths_share_a_library_without_cycles(module):
    imported = edgelm_export_imports(module)
    assert imported <= EXPORT_ALLOWED[module], f"{module} imports {sorted(imported - EXPORT_ALLOWED[module])}"
