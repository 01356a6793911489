"""Runtime-only checks that scripts/arm64-smoke runs inside the emulated arm64 root (marker `arm`).

They need nothing but the runtime (onnxruntime, numpy, tokenizers) and a model folder: inside the arm64 root
the folder comes from $EDGELM_ARM_MODEL ('default' = the shipped model); on a development machine they use the
`stories_int8` fixture. Keep this module free of torch and of the build side at import time, or the arm64
subset cannot even be collected.
"""
from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import probe_module as _probe_module

import edgelm
from edgelm.errors import ChecksumError

pytestmark = pytest.mark.arm

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def arm_model(request) -> Path:
    """The model folder under test: $EDGELM_ARM_MODEL when set (the arm64 root), else the int8 fixture."""
    env = os.environ.get("EDGELM_ARM_MODEL")
    if env == "default":
        from edgelm_models import default_path
        return default_path()
    if env:
        return Path(env)
    return request.getfixturevalue("stories_int8")


@pytest.fixture(scope="module")
def lm(arm_model):
    return edgelm.load(arm_model, threads=1)



def test_import_edgelm_pulls_in_nothing_heavy():
    code = ("import sys, edgelm; heavy = [m for m in ('torch', 'transformers', 'optimum', 'edgelm_export', "
            "'httpx', 'starlette') if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_greedy_is_repeatable_and_runs_to_length(lm):
    first = lm.generate(PROMPT, max_new_tokens=12, temperature=0, ignore_eos=True)
    second = lm.generate(PROMPT, max_new_tokens=12, temperature=0, ignore_eos=True)
    assert first.completion_tokens == len(first.token_ids) == 12
    assert first.finish_reason == "length"
    assert first.token_ids == second.token_ids and first.text == second.text
    assert all(lp <= 1e-6 for lp in first.logprobs)


def test_greedy_follows_the_raw_graph(lm, arm_model):
    """The runtime's decode loop (KV cache feeding, positions, masks) on this CPU picks, at every step, the
    token the raw ONNX graph ranks first when fed the same tokens one by one."""
    import json

    prompt_ids = lm.tokenizer.encode(PROMPT)
    gen = lm.generate(prompt_ids, max_new_tokens=16, temperature=0, ignore_eos=True)
    config = json.loads((arm_model / "config.json").read_text(encoding="utf-8"))
    onnx_path = arm_model / config.get("onnx", {}).get("file", "model.onnx")
    steps = _probe_module().replay_top2(onnx_path, config, list(prompt_ids), list(gen.token_ids), threads=1)
    assert len(steps) == len(gen.token_ids) == 16
    for k, step in enumerate(steps):
        # chosen_margin < 0 means the graph preferred another token; allow only float noise.
        assert step.chosen_margin > -1e-4, f"step {k}: runtime chose {step.chosen}, graph prefers {step.top1}"


def test_stream_pieces_join_to_the_generated_text(lm):
    text = lm.generate(PROMPT, max_new_tokens=10, temperature=0, ignore_eos=True).text
    pieces = list(lm.stream(PROMPT, max_new_tokens=10, temperature=0, ignore_eos=True))
    assert "".join(pieces) == text


def test_score_is_finite(lm):
    s = lm.score("Tom has a red ball. He likes to play with it in the park.")
    assert s.num_tokens > 0 and s.num_bytes > 0
    assert math.isfinite(s.perplexity) and s.perplexity > 1
    assert 0 < s.bits_per_byte < 16


def test_tokenizer_round_trip(lm):
    text = "Lily and Ben went to the park. They saw a big dog!"
    ids = lm.tokenizer.encode(text, add_bos=False)
    assert ids and all(isinstance(i, int) for i in ids)
    assert lm.tokenizer.decode(ids) == text


def test_checksums_catch_a_flipped_byte(arm_model, tmp_path):
    """sha256 verification works the same on this platform: one flipped byte, same size, is refused."""
    copy = tmp_path / "model"
    shutil.copytree(arm_model, copy)
    onnx = copy / "model.onnx"
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx.write_bytes(bytes(data))
    with pytest.raises(ChecksumError):
        edgelm.load(copy)


def test_info_command_runs(arm_model):
    proc = subprocess.run([sys.executable, "-m", "edgelm.cli", "info", str(arm_model)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip()
