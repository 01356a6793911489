"""The runtime's declared dependencies (pyproject.toml): the four packages the runtime needs, with minimums that
matter for safety or behaviour."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11; the check is the same on every version

ROOT = Path(__file__).resolve().parents[1]


def _minimums() -> dict[str, tuple[int, ...]]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    out = {}
    for dep in deps:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", dep.replace(" ", ""))
        assert m, f"runtime dependency without a plain minimum: {dep!r}"
        out[m.group(1).lower()] = tuple(int(x) for x in m.group(2).split("."))
    return out


def test_runtime_dependencies_are_the_four_light_ones():
    assert set(_minimums()) == {"onnxruntime", "numpy", "tokenizers", "jinja2"}


def test_jinja2_minimum_has_the_sandbox_fixes():
    # Chat templates ship with downloaded models and run in jinja2's sandbox; releases before 3.1.6 have known
    # sandbox escapes (and transformers refuses them in apply_chat_template).
    assert _minimums()["jinja2"] >= (3, 1, 6)
