"""Checksums of small model files use CPython's built-in sha256, so a tiny model never maps OpenSSL (hashlib)."""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgelm import folder

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("size", [0, 1, 1 << 20, 3 * (1 << 20) + 7])
def test_both_paths_give_hashlibs_digest(tmp_path, monkeypatch, size):
    path = tmp_path / "blob"
    path.write_bytes(bytes((i * 7 + 3) % 256 for i in range(size)))
    want = hashlib.sha256(path.read_bytes()).hexdigest()
    assert folder.sha256_file(path) == want  # the built-in path (small)
    monkeypatch.setattr(folder, "SMALL_FILE_HASH_BYTES", -1)
    assert folder.sha256_file(path) == want  # hashlib's path


def test_loading_a_small_model_does_not_import_hashlib_and_still_verifies(tmp_path):
    code = ("import sys, edgelm\n"
            "lm = edgelm.load(threads=1)\n"
            "print(lm.generate('Once upon a time', max_new_tokens=4, temperature=0).completion_tokens)\n"
            "print(sorted(m for m in ('hashlib', '_hashlib') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    lines = out.stdout.strip().splitlines()
    assert int(lines[-2]) == 4
    assert lines[-1] == "[]"
    # and a tampered small file is still caught (the built-in sha256 does the checking)
    dst = tmp_path / "model"
    src = ROOT / "models" / "tinystories-edge-int8"
    import shutil

    shutil.copytree(src, dst)
    manifest = json.loads((dst / "edgelm.json").read_text())
    name = next(n for n in manifest["files"] if n.endswith(".json") and n != "edgelm.json")
    p = dst / name
    data = p.read_bytes()
    i = data.index(b"a")
    p.write_bytes(data[:i] + b"b" + data[i + 1:])  # same size: only the checksum can tell
    code = ("import sys, edgelm\n"
            "try:\n"
            f"    edgelm.load({str(dst)!r})\n"
            "except edgelm.errors.ChecksumError as e:\n"
            "    print('ChecksumError', 'hashlib' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert out.stdout.strip() == "ChecksumError False"
