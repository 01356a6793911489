"""--quantize auto and a quality gate that names a mode that passes, on stories260K (real trained weights)."""
from __future__ import annotations

import json

import pytest
from conftest import STORIES260K, cached_export, needs_shared

pytest.importorskip("torch")
pytest.importorskip("transformers")

from edgelm.errors import QualityGateError  # noqa: E402
from edgelm_export.assemble import AUTO_ORDER, FALLBACKS  # noqa: E402
from edgelm_export.convert import export_model  # noqa: E402

pytestmark = [needs_shared(), pytest.mark.slow]


@pytest.fixture(scope="module")
def auto_strict():
    """auto with a gate so tight that int4 fails it: the table must show int4 over it and a later mode chosen."""
    return cached_export("stories260k-auto-strict", STORIES260K, quantize="auto", max_ppl_increase=0.01)


def test_auto_takes_the_first_mode_within_the_gate(auto_strict):
    m = json.loads((auto_strict / "edgelm.json").read_text())
    tried = m["metrics"]["auto"]
    assert [t["method"] for t in tried] == list(AUTO_ORDER[:len(tried)])
    assert all(t["passed"] == (t["ppl_increase"] <= 0.01) for t in tried)
    assert not any(t["passed"] for t in tried[:-1]) and tried[-1]["passed"]  # stopped at the first that passed
    assert tried[0]["method"] == "int4" and not tried[0]["passed"]  # int4 costs stories260K more than 1 %
    assert m["quantization"]["method"] == tried[-1]["method"] != "int4"
    assert abs(m["metrics"]["ppl_increase"] - tried[-1]["ppl_increase"]) < 1e-9  # the gate measured the same
    card = (auto_strict / "README.md").read_text()
    assert "`--quantize auto` tried" in card and f"| {tried[0]['method']} | {100 * tried[0]['ppl_increase']:+.2f} %" in card


def test_a_refused_mode_names_one_that_passes(auto_strict, tmp_path):
    tried = {t["method"]: t["ppl_increase"] for t in json.loads((auto_strict / "edgelm.json").read_text())["metrics"]["auto"]}
    passing = next(alt for alt in FALLBACKS["int4"] if alt in tried and tried[alt] <= 0.01)
    with pytest.raises(QualityGateError) as info:
        export_model(str(STORIES260K), str(tmp_path / "out"), quantize="int4", max_ppl_increase=0.01, progress=False)
    err = info.value
    assert "int4" not in err.hint.split("passes")[0] and f"--quantize {passing} passes" in err.hint
    assert f"{100 * tried[passing]:+.2f} %" in err.hint  # the number it measured, the same as auto's
    assert not (tmp_path / "out").exists()  # nothing written


def test_the_most_accurate_mode_failing_points_at_fp32(tmp_path):
    """int8-block has nothing more accurate to try: the hint says fp32, a looser gate or --force."""
    with pytest.raises(QualityGateError) as info:
        export_model(str(STORIES260K), str(tmp_path / "out"), quantize="int8-block", max_ppl_increase=0.0,
                     progress=False)
    assert "more than the allowed 0.00 %" in info.value.message and "Also measured" not in info.value.message
    assert "--quantize none" in info.value.hint and not (tmp_path / "out").exists()
