"""`edgelm serve` as a real process: banner, API key from the environment, clean stop on SIGTERM/SIGINT."""
from __future__ import annotations

import json
import os
import queue
import re
import secrets
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT, needs_shared

pytestmark = [needs_shared(), pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")]

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")


class ServeProcess:
    """`python -m edgelm.cli serve ...` with its combined output collected by a reader thread."""

    def __init__(self, *args: str, env: dict[str, str] | None = None):
        self.proc = subprocess.Popen([sys.executable, "-m", "edgelm.cli", "serve", *args], cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
        self.lines: list[str] = []
        self._q: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            self._q.put(line)

    def wait_for_url(self, timeout: float = 90) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._q.get(timeout=0.5)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            m = re.search(r"(http://127\.0\.0\.1:\d+)/v1", line)
            if m:
                return m.group(1)
        self.kill()
        raise AssertionError("no URL printed:\n" + "".join(self.lines))

    def output(self) -> str:
        time.sleep(0.2)  # let the reader thread drain the pipe
        return "".join(self.lines)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.mark.slow
def test_serve_cli_banner_key_and_sigterm(stories_int8):
    key = "sk-cli-" + secrets.token_hex(16)
    sp = ServeProcess(str(stories_int8), "--port", "0", "--threads", "1", "--workers", "1",
                      env={"EDGELM_API_KEY": key})
    try:
        url = sp.wait_for_url()
        auth = {"Authorization": f"Bearer {key}"}
        models = httpx.get(url + "/v1/models", headers=auth, timeout=30).json()["data"]
        assert models[0]["id"] == stories_int8.name
        assert httpx.get(url + "/v1/models", timeout=30).status_code == 401
        r = httpx.post(url + "/v1/chat/completions", headers=auth, timeout=60,
                       json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        sp.proc.send_signal(signal.SIGTERM)
        assert sp.proc.wait(30) == 0
    finally:
        sp.kill()
    out = sp.output()
    assert "curl " + url + "/v1/chat/completions" in out
    assert "Authorization: Bearer $EDGELM_API_KEY" in out  # the example names the variable, not the key
    assert key not in out


@pytest.mark.slow
def test_serve_cli_ctrl_c_mid_stream_ends_the_stream_properly(stories_int8):
    sp = ServeProcess(str(stories_int8), "--port", "0", "--threads", "1", "--workers", "1")
    try:
        url = sp.wait_for_url()
        lines = []
        with httpx.stream("POST", url + "/v1/completions", timeout=60,
                          json={"prompt": "Once upon a time", "max_tokens": 400, "stream": True,
                                "ignore_eos": True}) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line:
                    lines.append(line)
                if len(lines) == 2:
                    sp.proc.send_signal(signal.SIGINT)  # Ctrl-C while the answer is streaming
        assert sp.proc.wait(60) == 0
    finally:
        sp.kill()
    # In-flight work finished (or was ended) with a proper end of stream, not a cut connection.
    assert lines[-1] == "data: [DONE]", lines[-3:]
    last = json.loads(lines[-2][len("data: "):])
    assert "error" in last or last["choices"][0]["finish_reason"] in ("length", "stop")
    assert "stopped" in sp.output()


def test_serve_turns_spinning_off_for_several_workers_unless_told():
    from edgelm.commands.serve import server_spin

    assert server_spin(2, None) is False      # parallel generations: no spinning pools
    assert server_spin(1, None) is None       # one worker: the runtime's load-based default
    assert server_spin(4, True) is True and server_spin(1, False) is False  # --spin / --no-spin win


def test_serve_lookup_flag_reaches_the_server(monkeypatch):
    """--lookup / --no-lookup go to server.serve; the default is the server's (off)."""
    import argparse

    import edgelm
    from edgelm import server
    from edgelm.commands import serve as cmd

    seen = {}
    monkeypatch.setattr(edgelm, "load", lambda *a, **k: object())
    monkeypatch.setattr(server, "serve", lambda model, **kw: seen.update(kw))
    parser = argparse.ArgumentParser()
    cmd.add_arguments(parser)
    for argv, want in (([], server.DEFAULT_LOOKUP), (["--lookup"], True), (["--no-lookup"], False)):
        cmd.run(parser.parse_args(argv))
        assert seen["lookup"] is want


# --- the [server] extra missing: one line, exit 1 (issue 16, item 1) ---------------------------------------------
BLOCKER = """
import sys
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, Blocker())
from edgelm.cli import main
sys.exit(main({argv!r}))
"""


@pytest.mark.parametrize("blocked", [("starlette",), ("uvicorn",), ("starlette", "uvicorn")])
@pytest.mark.parametrize("argv", [["serve"], ["serve", "--help"], ["serve", "--model", "x", "--port", "0"]])
def test_serve_without_the_server_extra_prints_one_line(blocked, argv):
    code = BLOCKER.format(blocked=set(blocked), argv=argv)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "[server]" in lines[0] and blocked[0] in lines[0]
    assert 'pip install "edgelm[server]"' in lines[0] and 'pip install ".[server]"' in lines[0]
    assert done.stdout == ""


# --- --model/-m as well as the positional form (issue 16, item 7); the limit flags reach serve() -----------------
def _run_serve(monkeypatch, argv):
    import argparse

    import edgelm
    from edgelm import server
    from edgelm.commands import serve as cmd

    loaded, served = [], {}
    monkeypatch.setattr(edgelm, "load", lambda path, **k: loaded.append(path) or object())
    monkeypatch.setattr(server, "serve", lambda model, **kw: served.update(kw))
    parser = argparse.ArgumentParser()
    cmd.add_arguments(parser)
    assert cmd.run(parser.parse_args(argv)) == 0
    return loaded, served


@pytest.mark.parametrize("argv", [["models/x"], ["--model", "models/x"], ["-m", "models/x"],
                                  ["models/x", "--model", "models/x"]])
def test_serve_takes_the_model_positionally_or_with_model(monkeypatch, argv):
    loaded, _ = _run_serve(monkeypatch, argv)
    assert loaded == ["models/x"]


def test_serve_refuses_two_different_models(monkeypatch):
    from edgelm.errors import InvalidArgumentError
    with pytest.raises(InvalidArgumentError, match="two models"):
        _run_serve(monkeypatch, ["models/a", "--model", "models/b"])


def test_serve_limit_flags_reach_the_server(monkeypatch):
    from edgelm import server
    _, served = _run_serve(monkeypatch, [])
    assert served["allowed_hosts"] == [] and served["cors_origins"] == []  # nothing opened by default
    assert (served["header_timeout"], served["body_timeout"], served["keep_alive_timeout"], served["send_timeout"],
            served["max_connections"], served["chars_per_token"]) == (
        server.DEFAULT_HEADER_TIMEOUT, server.DEFAULT_BODY_TIMEOUT, server.DEFAULT_KEEP_ALIVE_TIMEOUT,
        server.DEFAULT_SEND_TIMEOUT, server.DEFAULT_MAX_CONNECTIONS, server.DEFAULT_CHARS_PER_TOKEN)
    _, served = _run_serve(monkeypatch, [
        "--allowed-hosts", "box.lan, other.lan", "--allowed-hosts", "third", "--cors-origins", "http://a:1",
        "--header-timeout", "2", "--body-timeout", "3.5", "--keep-alive-timeout", "1", "--send-timeout", "9",
        "--max-connections", "7", "--chars-per-token", "8"])
    assert served["allowed_hosts"] == ["box.lan", "other.lan", "third"] and served["cors_origins"] == ["http://a:1"]
    assert (served["header_timeout"], served["body_timeout"], served["keep_alive_timeout"], served["send_timeout"],
            served["max_connections"], served["chars_per_token"]) == (2, 3.5, 1, 9, 7, 8)


@pytest.mark.parametrize("flag,value", [("--header-timeout", "0"), ("--send-timeout", "-1"), ("--body-timeout", "inf"),
                                        ("--max-connections", "0"), ("--chars-per-token", "0")])
def test_serve_refuses_limits_that_are_not_positive(monkeypatch, flag, value):
    from edgelm.errors import InvalidArgumentError
    with pytest.raises(InvalidArgumentError, match=flag):
        _run_serve(monkeypatch, [flag, value])
