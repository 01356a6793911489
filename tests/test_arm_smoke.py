"""Host-side tests of the arm64 smoke test's parts (scripts/arm64-smoke, scripts/arm64_probe.py).

The full emulated run needs root, qemu and network and takes minutes, so CI runs it only with
EDGELM_ARM_SMOKE=1 (.ci/run). These tests keep its pieces honest on every run: the probe and the comparison
that decide pass/fail, and the rule that the arm-marked subset stays importable without torch.
"""
from __future__ import annotations

import ast
import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import probe_module as _probe_module

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "arm64-smoke"
PROBE = ROOT / "scripts" / "arm64_probe.py"
# What must not be imported at module level by a test file that runs inside the torch-free arm64 root.
BUILD_SIDE = {"torch", "transformers", "optimum", "onnx", "edgelm_export", "safetensors"}



def _arm_test_files() -> list[Path]:
    """The same selection the script makes: test files that use the `arm` marker."""
    return [p for p in sorted((ROOT / "tests").glob("test_*.py"))
            if re.search(r"pytest\.mark\.arm\b", p.read_text(encoding="utf-8"))]


def _top_level_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:  # module level only: lazy imports are fine
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_arm_subset_is_collectable_without_torch():
    files = _arm_test_files()
    assert ROOT / "tests" / "test_arm_runtime.py" in files
    for path in files + [ROOT / "tests" / "conftest.py"]:
        bad = _top_level_imports(path) & BUILD_SIDE
        assert not bad, f"{path.name} imports {sorted(bad)} at module level; the arm64 root has no torch"


def test_script_parses_and_prints_help_without_root():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    proc = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and "--model" in proc.stdout
    bad = subprocess.run(["bash", str(SCRIPT), "--no-such-flag"], capture_output=True, text=True, timeout=30)
    assert bad.returncode != 0 and "unknown argument" in bad.stderr


@pytest.fixture(scope="module")
def host_probe(stories_int8, tmp_path_factory) -> dict:
    """The probe run as the script runs it on the x86-64 side: a separate process, one thread."""
    out = tmp_path_factory.mktemp("probe") / "x86_64.json"
    proc = subprocess.run([sys.executable, str(PROBE), "probe", "--model", str(stories_int8),
                           "--max-new-tokens", "12", "--threads", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.read_text(encoding="utf-8"))


def test_probe_records_a_consistent_greedy_run(host_probe):
    doc = host_probe
    assert doc["repeatable"] and doc["replay_agrees"]
    assert doc["heavy_imported_by_edgelm"] == []
    assert len(doc["token_ids"]) == len(doc["steps"]) == 12
    for tok, step in zip(doc["token_ids"], doc["steps"]):
        assert step["chosen"] == step["top1"] == tok
        assert step["top1_logit"] >= step["top2_logit"] and step["top1"] != step["top2"]
        assert step["chosen_margin"] == pytest.approx(step["top1_logit"] - step["top2_logit"])
    assert doc["timings"]["decode_tokens_per_s"] > 0


def test_compare_identical_runs(host_probe):
    result = _probe_module().compare(host_probe, copy.deepcopy(host_probe))
    assert result.identical and result.first_divergence is None
    assert result.compared_tokens == 12 and result.max_top1_logit_delta == 0.0


def test_compare_reports_the_first_divergence_and_its_margin(host_probe):
    probe = _probe_module()
    other = copy.deepcopy(host_probe)
    k = 5
    # What the other platform would record had it taken the runner-up token at step k.
    other["token_ids"][k] = host_probe["steps"][k]["top2"]
    other["steps"][k]["top1"], other["steps"][k]["top2"] = host_probe["steps"][k]["top2"], host_probe["steps"][k]["top1"]
    margin = host_probe["steps"][k]["top1_logit"] - host_probe["steps"][k]["top2_logit"]
    result = probe.compare(host_probe, other, tie_margin=margin + 1.0)
    assert not result.identical and result.first_divergence == k
    assert result.reference_token == host_probe["token_ids"][k] and result.other_token == other["token_ids"][k]
    assert result.reference_margin == pytest.approx(margin)
    assert result.near_tie is True
    strict = probe.compare(host_probe, other, tie_margin=margin / 2)
    assert strict.near_tie is False
    assert "first divergence at generated token 5" in strict.summary()


def test_compare_refuses_different_prompts(host_probe):
    other = copy.deepcopy(host_probe)
    other["prompt_ids"] = other["prompt_ids"] + [0]
    with pytest.raises(ValueError, match="tokenized the prompt differently"):
        _probe_module().compare(host_probe, other)
