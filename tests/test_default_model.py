"""The shipped default model: found with no path, intact, and as good as its card says."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import edgelm
import edgelm_models
from edgelm.folder import read_json

from conftest import EVAL_TEXT

FOLDER = edgelm_models.default_path()
pytestmark = pytest.mark.skipif(not (FOLDER / "edgelm.json").is_file(), reason="default model not built")


def test_load_without_a_path_uses_the_shipped_model():
    lm = edgelm.load()   # verifies every checksum
    assert Path(lm.path).resolve() == FOLDER.resolve()
    g = lm.generate("Once upon a time", max_new_tokens=20, temperature=0)
    assert g.completion_tokens >= 1 and g.text.strip()
    assert g.finish_reason in ("length", "eos", "stop")


def test_bar_size_and_recorded_quality():
    size = sum(p.stat().st_size for p in FOLDER.iterdir() if p.is_file())
    assert size <= 16 * 1024 * 1024
    m = read_json(FOLDER / "edgelm.json")
    assert m["metrics"]["quantized_bits_per_byte"] <= 0.95
    assert m["build"]["bits_per_byte"]["stories260K"] > m["metrics"]["quantized_bits_per_byte"]
    card = (FOLDER / "README.md").read_text()
    for section in ("## How it was built", "## Samples (unedited)", "## Licence", "CDLA-Sharing-1.0", "MIT"):
        assert section in card


@pytest.mark.slow
def test_int8_bits_per_byte_on_the_eval_file_beats_the_reference():
    if not EVAL_TEXT.is_file():
        pytest.skip("eval text not available")
    lm = edgelm.load(threads=2)
    s = lm.score(EVAL_TEXT.read_text(encoding="utf-8"))
    assert s.num_bytes == len(EVAL_TEXT.read_bytes())
    assert s.bits_per_byte <= 0.95                         # the bar
    recorded = read_json(FOLDER / "edgelm.json")["metrics"]["quantized_bits_per_byte"]
    assert abs(s.bits_per_byte - recorded) < 1e-3           # the card's number is what the runtime measures


def test_info_without_a_model_describes_the_default_model():
    out = subprocess.run([sys.executable, "-m", "edgelm", "info"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "checksums    OK" in out.stdout and FOLDER.name in out.stdout
    card = subprocess.run([sys.executable, "-m", "edgelm", "info", "--card"], capture_output=True, text=True,
                          timeout=120)
    assert card.returncode == 0 and "## How it was built" in card.stdout
