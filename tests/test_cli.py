"""The `edgelm generate / chat / info` commands, run as real subprocesses."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

import edgelm

PROMPT = "Once upon a time"


def cli(*args, stdin: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "edgelm.cli", *args], capture_output=True, text=True,
                          input=stdin, env=full_env, timeout=120)


@pytest.fixture(scope="module")
def lm(stories_fp32):
    return edgelm.load(stories_fp32, threads=1)


def test_generate_streams_the_same_text_as_the_api(stories_fp32, lm):
    r = cli("generate", PROMPT, "--model", str(stories_fp32), "-n", "30", "--temperature", "0", "--threads", "1")
    assert r.returncode == 0, r.stderr
    expected = lm.generate(PROMPT, max_new_tokens=30, temperature=0).text
    assert r.stdout == PROMPT + expected + "\n"
    assert "30 generated tokens" in r.stderr and "tokens/s" in r.stderr and "finish: length" in r.stderr


def test_generate_seed_stop_and_escapes(stories_fp32, lm):
    args = ["generate", PROMPT, "--model", str(stories_fp32), "-n", "60", "--seed", "4", "--temperature", "0.9",
            "--top-p", "0.9", "--top-k", "40", "--stop", "\\n", ".", "--no-echo", "-q", "--threads", "1"]
    r = cli(*args)
    assert r.returncode == 0, r.stderr
    g = lm.generate(PROMPT, max_new_tokens=60, seed=4, temperature=0.9, top_p=0.9, top_k=40, stop=["\n", "."])
    assert r.stdout == g.text + "\n" and r.stderr == ""


@pytest.mark.parametrize("bad, words", [
    (["--temperature", "-1"], "temperature"), (["--top-p", "2"], "top_p"), (["-n", "0"], "max_new_tokens"),
    (["-n", "600"], "context"),
])
def test_generate_bad_arguments_one_line_error(stories_fp32, bad, words):
    r = cli("generate", PROMPT, "--model", str(stories_fp32), *bad)
    assert r.returncode == 1
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgelm generate: error:") and words in lines[0]
    assert "Traceback" not in r.stderr


def test_generate_missing_model(tmp_path):
    r = cli("generate", PROMPT, "--model", str(tmp_path / "nope"))
    assert r.returncode == 1 and "No model folder" in r.stderr and "Traceback" not in r.stderr
    r = cli("generate", PROMPT, env={"EDGELM_MODEL": str(tmp_path / "nope")})
    assert r.returncode == 1 and "EDGELM_MODEL" in r.stderr and "Traceback" not in r.stderr
    r = cli("info", env={"EDGELM_MODEL": str(tmp_path / "nope")})
    assert r.returncode == 1 and "EDGELM_MODEL" in r.stderr


def test_generate_help():
    r = cli("generate", "--help")
    assert r.returncode == 0 and "--max-new-tokens" in r.stdout and "--stop" in r.stdout


def test_info(stories_fp32):
    r = cli("info", str(stories_fp32))
    assert r.returncode == 0, r.stderr
    for words in ("architecture llama", "5 layers", "context 512", "checksums   OK", "float32", "metrics"):
        assert words in r.stdout
    r = cli("info", str(stories_fp32), "--json")
    info = json.loads(r.stdout)
    assert info["checksums"]["ok"] and info["architecture"]["num_layers"] == 5
    assert info["size_bytes"] == sum(p.stat().st_size for p in stories_fp32.iterdir() if p.is_file())


def test_info_reports_a_corrupt_file(stories_fp32, model_copy):
    folder = model_copy(stories_fp32)
    data = bytearray((folder / "model.onnx").read_bytes())
    data[100] ^= 1
    (folder / "model.onnx").write_bytes(bytes(data))
    r = cli("info", str(folder))
    assert r.returncode == 1
    assert "checksums   FAILED" in r.stdout and "model.onnx" in r.stdout  # still shows the summary
    assert "architecture llama" in r.stdout and "Traceback" not in r.stderr


def test_info_missing_folder(tmp_path):
    r = cli("info", str(tmp_path / "nope"))
    assert r.returncode == 1 and r.stderr.startswith("edgelm info: error:")


def test_chat_reads_stdin_with_history_and_commands(stories_fp32, lm):
    r = cli("chat", "--model", str(stories_fp32), "-n", "20", "--temperature", "0", "--threads", "1",
            stdin="Hi there\n/reset\nHello\n/exit\nnever read\n")
    assert r.returncode == 0, r.stderr
    first = lm.chat([{"role": "user", "content": "Hi there"}], max_new_tokens=20, temperature=0).text
    second = lm.chat([{"role": "user", "content": "Hello"}], max_new_tokens=20, temperature=0).text  # after /reset
    assert r.stdout == first + "\n" + second + "\n"
    assert "cleared" in r.stderr


def test_chat_keeps_history_and_ends_on_eof(stories_fp32, lm):
    r = cli("chat", "--model", str(stories_fp32), "-n", "15", "--temperature", "0", "--threads", "1",
            stdin="Hi\nAnd then?\n")
    assert r.returncode == 0, r.stderr
    msgs = [{"role": "user", "content": "Hi"}]
    a1 = lm.chat(msgs, max_new_tokens=15, temperature=0).text
    msgs += [{"role": "assistant", "content": a1.strip()}, {"role": "user", "content": "And then?"}]
    a2 = lm.chat(msgs, max_new_tokens=15, temperature=0).text
    assert r.stdout == a1 + "\n" + a2 + "\n"


def test_chat_drops_old_turns_when_the_context_is_full(stories_fp32):
    line = "Tell me a long story about a cat and a dog who play in the park all day. " * 3
    r = cli("chat", "--model", str(stories_fp32), "-n", "40", "--temperature", "0", "--threads", "1",
            stdin=(line + "\n") * 12)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) >= 12  # every turn was answered, none refused for length
