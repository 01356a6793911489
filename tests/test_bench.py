"""`edgelm bench` and the benchmark helpers: real measurements on the stories260K int8 fixture, no mocks."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgelm.bench import Stat, folder_size_bytes, peak_rss_bytes, run_bench
from edgelm.cli import main
from edgelm.errors import ContextLengthError, InvalidArgumentError

ROOT = Path(__file__).resolve().parents[1]


def test_stat_is_median_and_spread():
    s = Stat.of([3.0, 1.0, 2.0, 10.0])
    assert (s.median, s.min, s.max) == (2.5, 1.0, 10.0)
    assert s.values == [3.0, 1.0, 2.0, 10.0]


def test_peak_rss_sees_a_large_allocation():
    before = peak_rss_bytes()
    assert before is not None and before > 1 << 20
    block = np.ones(96 << 20, dtype=np.uint8)  # 96 MiB, every page touched
    after = peak_rss_bytes()
    assert block[-1] == 1
    assert after >= before + (64 << 20)


def test_bad_arguments_raise_before_loading(tmp_path):
    missing = tmp_path / "no-such-model"  # a load would raise ModelNotFoundError; the argument check comes first
    for kwargs in ({"repeat": 0}, {"new_tokens": 1}, {"prompt_tokens": 0}, {"threads": 0}, {"warmup": -1}):
        with pytest.raises(InvalidArgumentError):
            run_bench(missing, measure_import=False, **kwargs)


def test_import_edgelm_bench_stays_light():
    code = ("import sys, edgelm.bench, edgelm.commands.bench; "
            "heavy = [m for m in ('torch', 'transformers', 'matplotlib', 'psutil') if m in sys.modules]; "
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == ""


def test_ceiling_counts_the_real_models_parameters(shared_dir):
    """The decode ceiling's parameter count equals the stories260K checkpoint's (tied embedding counted once)."""
    from safetensors.numpy import load_file

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import ceiling

    cfg = json.loads((shared_dir / "fixtures/stories260K/config.json").read_text())
    tensors = load_file(str(shared_dir / "fixtures/stories260K/model.safetensors"))
    n_params = sum(t.size for name, t in tensors.items() if "rotary" not in name)
    est = ceiling.decode_ceiling(cfg, read_GBps=10.0)
    assert est["params_read_per_token"] == n_params
    # fp32 reads four bytes per weight, so its bound is a quarter of the one-byte int8 bound (norms aside)
    assert est["fp32_ceiling_tok_s"] == pytest.approx(est["int8_1byte_ceiling_tok_s"] / 4, rel=0.01)
    assert est["int4_ceiling_tok_s"] > est["int8_ceiling_tok_s"] > est["fp32_ceiling_tok_s"]


@pytest.mark.slow
def test_bench_cli_writes_sane_json(stories_int8, tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["bench", str(stories_int8), "--prompt-tokens", "16", "--new-tokens", "8", "--threads", "1",
               "--repeat", "3", "--json", str(out), "--no-spin"])
    assert rc == 0
    table = capsys.readouterr().out
    assert "spin-wait off" in table
    for label in ("time to first token", "decode", "peak RSS", "load"):
        assert label in table
    d = json.loads(out.read_text())
    assert (d["prompt_tokens"], d["new_tokens"], d["repeat"], d["threads"], d["spin"]) == (16, 8, 3, 1, False)
    assert d["dtype"] == "int8"
    assert d["model_size_bytes"] == folder_size_bytes(stories_int8) > 0
    assert 0 < d["load_s"] < 60
    assert d["import_s"] is None or 0 < d["import_s"] < 30
    assert d["peak_rss_bytes"] > 10 << 20
    for key in ("time_to_first_token_s", "prefill_tokens_per_s", "decode_tokens_per_s"):
        s = d[key]
        assert len(s["values"]) == 3
        assert 0 < s["min"] <= s["median"] <= s["max"]
    # prefill speed is the prompt length over the time to first token, run by run
    for ttft, pre in zip(d["time_to_first_token_s"]["values"], d["prefill_tokens_per_s"]["values"]):
        assert pre == pytest.approx(16 / ttft)
    # a 0.3M-parameter model decodes far faster than 1 token/s and slower than 1M tokens/s on any CPU
    assert 1 < d["decode_tokens_per_s"]["median"] < 1e6


@pytest.mark.slow
def test_bench_refuses_a_prompt_longer_than_the_context(stories_int8):
    with pytest.raises(ContextLengthError):
        run_bench(stories_int8, prompt_tokens=500, new_tokens=100, threads=1, repeat=1, measure_import=False)
