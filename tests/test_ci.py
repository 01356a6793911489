"""CI fails loudly (issue 16): without the shared data .ci/run stops before installing anything, and under CI=true
a skipped test fails the run unless tests/conftest.py's ALLOWED_SKIPS lists it."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import ROOT


def test_ci_fails_without_the_shared_data(tmp_path):
    # A stand-in `python` first on PATH: if the check ever goes, the script fails at its first pip install
    # (and leaves a mark) instead of starting a real CI run from inside the test suite.
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "python").write_text(f"#!/bin/sh\ntouch {tmp_path / 'ran'}\nexit 97\n")
    (stub / "python").chmod(0o755)
    env = {**os.environ, "EDGELM_SHARED": str(tmp_path / "no-shared"), "PATH": f"{stub}:{os.environ['PATH']}"}
    r = subprocess.run(["bash", str(ROOT / ".ci" / "run")], capture_output=True, text=True, env=env, timeout=60,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "shared data not found" in r.stderr and str(tmp_path / "no-shared") in r.stderr
    assert not (tmp_path / "ran").exists()


def _suite_with_project_hooks(folder: Path, allowed: dict[str, str]) -> None:
    """A throwaway test folder whose conftest uses the project's skip hooks, with its own allow-list."""
    (folder / "pytest.ini").write_text("[pytest]\n")
    (folder / "conftest.py").write_text(textwrap.dedent(f"""
        import importlib.util
        spec = importlib.util.spec_from_file_location("edgelm_conftest", {str(ROOT / "tests" / "conftest.py")!r})
        project = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(project)
        project.ALLOWED_SKIPS = {allowed!r}
        pytest_runtest_makereport = project.pytest_runtest_makereport
        pytest_make_collect_report = project.pytest_make_collect_report
        pytest_terminal_summary = project.pytest_terminal_summary
        pytest_sessionfinish = project.pytest_sessionfinish
    """))


def _run_pytest(folder: Path, ci: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci:
        env["CI"] = "true"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", str(folder)],
                          cwd=folder, capture_output=True, text=True, env=env, timeout=120)


def test_under_ci_an_unlisted_skip_fails(tmp_path):
    _suite_with_project_hooks(tmp_path, allowed={"test_suite.py::test_listed": "a reason"})
    (tmp_path / "test_suite.py").write_text(textwrap.dedent("""
        import pytest

        def test_passes():
            pass

        def test_unlisted():
            pytest.skip("shared data not found")

        def test_listed():
            pytest.skip("legitimately absent")

        @pytest.mark.xfail(reason="known")
        def test_xfail():
            assert False
    """))
    (tmp_path / "test_needs_missing.py").write_text("import pytest\npytest.importorskip('no_such_module_xyz')\n")

    r = _run_pytest(tmp_path, ci=True)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert "skipped under CI=true: shared data not found" in out  # the test-level skip: a failure
    assert "1 failed, 1 passed" in out, out
    assert "test_needs_missing.py: skipped under CI=true" in out and "no_such_module_xyz" in out  # a whole file
    assert "SKIPPED" in out and "legitimately absent" in out  # the listed one stays a skip
    assert "xfailed" in out  # an expected failure is not a skip

    # only the listed skip: CI passes
    (tmp_path / "test_needs_missing.py").unlink()
    (tmp_path / "test_suite.py").write_text((tmp_path / "test_suite.py").read_text().replace(
        'pytest.skip("shared data not found")', "pass"))
    r = _run_pytest(tmp_path, ci=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 skipped" in r.stdout


def test_without_ci_a_skip_stays_a_skip(tmp_path):
    _suite_with_project_hooks(tmp_path, allowed={})
    (tmp_path / "test_suite.py").write_text("import pytest\n\ndef test_a():\n    pytest.skip('not here')\n")
    (tmp_path / "test_needs_missing.py").write_text("import pytest\npytest.importorskip('no_such_module_xyz')\n")
    r = _run_pytest(tmp_path, ci=False)  # a developer's machine without the shared data or an extra
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 skipped" in r.stdout and "skipped under CI" not in r.stdout
