"""The wheel ships what it should and nothing else (issue 16): the runtime, the build side, the default model, the
license and py.typed; not a user's own exports under models/, not dev scripts.

Built from a copy of the project's files (those git tracks or would track), so the build neither writes into the
working tree nor picks up what happens to lie in it, with a user's export planted under models/ as docs/export.md's
``--out models/...`` would leave one.
"""
from __future__ import annotations

import email
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT

DEFAULT_MODEL = "tinystories-edge-int8"


def _project_files() -> list[str]:
    """The files a fresh clone has (tracked, plus new files not ignored), relative to ROOT."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, check=True).stdout.decode()
    return [f for f in out.split("\0") if f and (ROOT / f).is_file()]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> tuple[list[str], email.message.Message, str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout to know the project's files")
    src = tmp_path_factory.mktemp("src")
    for rel in _project_files():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, src / rel)
    mine = src / "models" / "my-model"  # a user's export, where docs/export.md's example puts it
    mine.mkdir()
    (mine / "edgelm.json").write_text("{}")
    (mine / "model.onnx").write_bytes(b"\0" * 64)
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-v", str(src),
                        "-w", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    (whl,) = out.glob("edgelm-*.whl")
    with zipfile.ZipFile(whl) as z:
        names = z.namelist()
        meta = email.message_from_bytes(z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))))
    return names, meta, r.stdout + r.stderr


def test_only_the_default_model_ships(wheel):
    names, _, _ = wheel
    shipped = {n.split("/", 2)[1] for n in names if n.startswith("edgelm_models/") and n.count("/") >= 2}
    assert shipped == {DEFAULT_MODEL}  # not models/my-model
    folder = ROOT / "models" / DEFAULT_MODEL
    expected = {f"edgelm_models/{DEFAULT_MODEL}/{p.name}" for p in folder.iterdir() if p.is_file()}
    assert expected and expected <= set(names)  # the whole default model: graph, weights, tokenizer, card
    assert "edgelm_models/__init__.py" in names


def test_no_dev_scripts_and_no_module_beside_a_data_folder(wheel):
    names, _, _ = wheel
    assert not [n for n in names if "bench_quantize" in n]
    assert "edgelm_export/data.py" not in names  # export/data/ is a folder of text files; the module is corpus.py
    assert {"edgelm_export/corpus.py", "edgelm_export/data/eval-sample.txt", "edgelm_export/data/chat-prompts.txt"} \
        <= set(names)
    assert "edgelm/cli.py" in names and "edgelm/__main__.py" in names and "edgelm/commands/generate.py" in names


def test_the_build_does_not_warn_about_the_layout(wheel):
    _, _, log = wheel
    assert "is absent from the `packages` configuration" not in log  # a data folder taken for a package


def test_license_and_typing_marker(wheel):
    names, meta, _ = wheel
    assert "edgelm/py.typed" in names
    licenses = [n for n in names if ".dist-info/licenses/" in n]
    assert any(n.endswith("/LICENSE") for n in licenses), names
    assert meta["License-Expression"] == "Apache-2.0"
    assert "Apache License" in (ROOT / "LICENSE").read_text() and "Version 2.0" in (ROOT / "LICENSE").read_text()
    urls = meta.get_all("Project-URL") or []
    assert not [u for u in urls if "example.invalid" in u]  # a real documentation address or none
