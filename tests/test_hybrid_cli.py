"""`edgelm generate` with --cloud-url: the route options work end to end and the source is shown."""
from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("uvicorn")
pytest.importorskip("httpx")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cloud(stories_fp32):
    import edgelm
    from edgelm.server import BackgroundServer

    with BackgroundServer(edgelm.load(stories_fp32, threads=1), workers=1) as srv:
        yield srv.url + "/v1"


def _generate(model, *extra):
    cmd = [sys.executable, "-m", "edgelm.cli", "generate", "Once upon a time", "--model", str(model), "-n", "12",
           "-t", "0", "--threads", "1", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def test_route_cloud_answers_from_the_cloud(cloud, stories_int8, stories_fp32):
    import edgelm

    out = _generate(stories_int8, "--cloud-url", cloud, "--route", "cloud", "--cloud-endpoint", "completions",
                    "--no-echo")
    assert out.returncode == 0, out.stderr
    assert "[cloud]" in out.stderr
    # The cloud is the fp32 model: its greedy continuation is what came back.
    expected = edgelm.load(stories_fp32, threads=1).generate("Once upon a time", max_new_tokens=12, temperature=0).text
    assert out.stdout.rstrip("\n") == expected


def test_a_chat_reply_from_the_cloud_starts_on_its_own_line(cloud, stories_int8):
    out = _generate(stories_int8, "--cloud-url", cloud, "--route", "cloud", "--cloud-endpoint", "chat")
    assert out.returncode == 0, out.stderr
    # the echoed prompt, then the cloud's reply on the next line: a reply is not a continuation of the prompt
    assert out.stdout.startswith("Once upon a time\n") and len(out.stdout.strip()) > len("Once upon a time")
    cont = _generate(stories_int8, "--cloud-url", cloud, "--route", "cloud", "--cloud-endpoint", "completions")
    assert cont.returncode == 0 and not cont.stdout.startswith("Once upon a time\n")  # a continuation is glued


def test_chat_routed_to_the_cloud_does_not_warn_about_the_local_template(cloud, stories_int8):
    cmd = [sys.executable, "-m", "edgelm.cli", "chat", "--model", str(stories_int8), "-n", "8", "-t", "0",
           "--threads", "1", "--cloud-url", cloud, "--route", "cloud"]
    out = subprocess.run(cmd, input="Hi\n", capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "[cloud]" in out.stderr and "no chat template" not in out.stderr
    local = subprocess.run(cmd[:-4], input="Hi\n", capture_output=True, text=True, timeout=120)
    assert "no chat template" in local.stderr  # the same model answering locally still gets the note


def test_route_local_never_leaves_the_device(stories_int8):
    # An address nothing listens on: a connection attempt would fail loudly, so success proves none was made.
    out = _generate(stories_int8, "--cloud-url", "http://127.0.0.1:9/v1", "--route", "local")
    assert out.returncode == 0, out.stderr
    assert "[local]" in out.stderr


def test_route_cloud_without_url_is_a_clear_error(stories_int8):
    out = _generate(stories_int8, "--route", "cloud")
    assert out.returncode == 1
    assert "--cloud-url" in out.stderr and "Traceback" not in out.stderr
