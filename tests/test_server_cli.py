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
