"""Folders whose graph needs a newer onnxruntime say so (config.json onnx.min_onnxruntime) and the runtime refuses
an older one. A fused graph with sliding windows is the case today: before onnxruntime 1.24 its window attribute
let each query see one key more, so the graph would load and quietly compute something else."""
from __future__ import annotations

import json
import shutil

import onnxruntime
import pytest

import edgelm
from edgelm.errors import ModelError, ModelFormatError

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from test_export_families import _export, _src  # noqa: E402
from test_export_archs import tiny_model_setup  # noqa: E402


@pytest.fixture(scope="module")
def windowed():
    """Qwen3 with a window of 8 on its second layer (context 96): the exporter builds the fused graph."""
    tiny_model_setup()
    return _export(_src("qwen3"), "shared")


def test_windowed_fused_export_records_the_minimum(windowed):
    from edgelm_export.archs.common import GQA_WINDOW_ONNXRUNTIME

    onnx_cfg = json.loads((windowed / "config.json").read_text())["onnx"]
    assert onnx_cfg["kv_cache"] == "shared"
    assert onnx_cfg["min_onnxruntime"] == GQA_WINDOW_ONNXRUNTIME == "1.24"


def test_graphs_without_windows_record_none():
    tiny_model_setup()
    for folder in (_export(_src("smollm3"), "shared"), _export(_src("qwen3"), "concat")):  # no window; window, concat
        assert "min_onnxruntime" not in json.loads((folder / "config.json").read_text())["onnx"]


@pytest.mark.parametrize("old", ["1.23.2", "1.20.1", "1.9.0"])  # 1.9 < 1.24: numbers, not strings, are compared
def test_runtime_refuses_an_older_onnxruntime(windowed, monkeypatch, old):
    monkeypatch.setattr(onnxruntime, "__version__", old)
    with pytest.raises(ModelError) as info:
        edgelm.load(windowed)
    assert "onnxruntime >= 1.24" in info.value.message and old in info.value.message
    assert info.value.hint == 'Upgrade it: pip install -U "onnxruntime>=1.24".'


@pytest.mark.parametrize("new", ["1.24.0", "1.24.1+cu12", "1.25.0.dev20250101", "2.0"])
def test_runtime_accepts_the_minimum_and_newer(windowed, monkeypatch, new):
    monkeypatch.setattr(onnxruntime, "__version__", new)
    lm = edgelm.load(windowed)
    assert lm.generate([1, 5, 9], max_new_tokens=3, temperature=0).completion_tokens == 3


def test_a_malformed_minimum_is_a_format_error(windowed, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(windowed, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["onnx"]["min_onnxruntime"] = 1.24  # a number, not a version string
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFormatError, match="min_onnxruntime"):
        edgelm.load(folder, verify=False)
