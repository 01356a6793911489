"""The model folder: one directory = one deployable model (see docs/model-format.md).

This module reads and checks folders (runtime side) and writes their manifest (export side), so both
sides agree on one definition of the format.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgelm.errors import ChecksumError, ModelError, ModelFormatError, ModelNotFoundError, TokenizerError

FORMAT_VERSION = 1
MANIFEST = "edgelm.json"
CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
GENERATION_CONFIG = "generation_config.json"
CARD = "README.md"
# Files every folder must have besides the ONNX graph named in config.json.
REQUIRED = (CONFIG, TOKENIZER, MANIFEST)

_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ModelNotFoundError(f"{path} is missing.", hint="Re-export the model folder or restore the file.")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFormatError(f"{path} is not valid JSON ({exc}).",
                               hint="The file is corrupt; re-export the model folder or restore the file.")
    if not isinstance(data, dict):
        raise ModelFormatError(f"{path} must hold a JSON object.", hint="Re-export the model folder.")
    return data


@dataclass(frozen=True)
class ModelFolder:
    """A model folder that has been opened (and, unless ``verify=False``, checked against its manifest)."""

    path: Path
    config: dict[str, Any]
    manifest: dict[str, Any]
    generation_config: dict[str, Any]
    tokenizer_config: dict[str, Any]

    @property
    def onnx_path(self) -> Path:
        return self.path / self.config.get("onnx", {}).get("file", "model.onnx")

    @property
    def tokenizer_path(self) -> Path:
        return self.path / TOKENIZER

    @property
    def card_path(self) -> Path:
        return self.path / CARD


def open_folder(path: str | os.PathLike, *, verify: bool = True) -> ModelFolder:
    """Open a model folder, checking the sha256 and size of every file listed in its manifest."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ModelNotFoundError(f"No model folder at {root}.",
                                 hint="Pass the folder written by `edgelm export`, or omit it for the default model.")
    if not (root / TOKENIZER).is_file():
        raise TokenizerError(f"{root / TOKENIZER} is missing: the model folder has no tokenizer.",
                             hint="Re-export the model, or copy tokenizer.json from the source model into the folder.")
    for name in REQUIRED:
        if not (root / name).is_file():
            raise ModelNotFoundError(f"{root / name} is missing: this is not a complete edgelm model folder.",
                                     hint="Re-export it with `edgelm export SRC --out DIR`.")
    manifest = read_json(root / MANIFEST)
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelFormatError(f"{root / MANIFEST} has format_version {version!r}; this edgelm reads {FORMAT_VERSION}.",
                               hint="Upgrade edgelm or re-export the model with this version.")
    if verify:
        verify_files(root, manifest)
    config = read_json(root / CONFIG)
    gen = read_json(root / GENERATION_CONFIG) if (root / GENERATION_CONFIG).is_file() else {}
    tok_cfg = read_json(root / TOKENIZER_CONFIG) if (root / TOKENIZER_CONFIG).is_file() else {}
    folder = ModelFolder(root, config, manifest, gen, tok_cfg)
    if not folder.onnx_path.is_file():
        raise ModelNotFoundError(f"{folder.onnx_path} is missing.", hint="Re-export the model folder.")
    return folder


def _release(version: str) -> tuple[int, ...]:
    """The leading numbers of a version string: "1.24.1+cu12" -> (1, 24, 1), "1.25.0.dev2" -> (1, 25, 0)."""
    m = re.match(r"\d+(?:\.\d+)*", version.strip())
    if not m:
        raise ValueError(version)
    return tuple(int(x) for x in m.group(0).split("."))


def check_onnxruntime(folder: ModelFolder, installed: str) -> None:
    """Refuse a folder whose config.json asks for a newer onnxruntime than ``installed``.

    Some graphs load on an older onnxruntime but compute something else there (a fused graph with sliding
    windows: before 1.24 the kernel's window attribute let each query see one key more), so the version is checked
    up front instead of trusting the session to fail.
    """
    need = (folder.config.get("onnx") or {}).get("min_onnxruntime")
    if need is None:
        return
    try:
        need_v = _release(str(need)) if isinstance(need, str) else None
    except ValueError:
        need_v = None
    if need_v is None:
        raise ModelFormatError(f"{folder.path / CONFIG} has onnx.min_onnxruntime {need!r}, not a version string.",
                               hint="Re-export the model folder.")
    try:
        have_v = _release(installed)
    except ValueError:
        return  # an unparseable local build: nothing to compare against, let it run
    if have_v < need_v:
        raise ModelError(f"{folder.path} needs onnxruntime >= {need}; onnxruntime {installed} is installed (its "
                         "fused attention would compute this graph's sliding windows differently).",
                         hint=f'Upgrade it: pip install -U "onnxruntime>={need}".')


def verify_files(root: Path, manifest: dict[str, Any]) -> None:
    """Raise ChecksumError naming the first file whose size or sha256 differs from the manifest."""
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise ModelFormatError(f"{root / MANIFEST} lists no files.", hint="Re-export the model folder.")
    hint = "The file is corrupt or was changed; re-export or re-download the model (or load with verify=False)."
    for name, meta in files.items():
        p = root / name
        if not p.is_file():
            raise ChecksumError(f"{p} is listed in {MANIFEST} but missing.", path=str(p), hint=hint)
        size = p.stat().st_size
        if size != meta.get("size"):
            what = "truncated" if size < meta.get("size", 0) else "larger than recorded"
            raise ChecksumError(f"{p} is {what}: {size} bytes, expected {meta.get('size')}.", path=str(p), hint=hint)
        digest = sha256_file(p)
        if digest != meta.get("sha256"):
            raise ChecksumError(f"{p} does not match its sha256 in {MANIFEST} (got {digest[:12]}..., "
                                f"expected {str(meta.get('sha256'))[:12]}...).", path=str(p), hint=hint)


def file_table(root: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file in the folder (recursively), except the manifest itself."""
    table = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            table[p.relative_to(root).as_posix()] = {"sha256": sha256_file(p), "size": p.stat().st_size}
    return table


def write_manifest(root: str | os.PathLike, **fields: Any) -> dict[str, Any]:
    """Write ``edgelm.json`` last, after every other file is in place, so the checksums cover them all.

    ``fields`` are merged in (source, producer, quantization, metrics, ...).
    """
    root = Path(root)
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
    }
    manifest.update(fields)
    manifest["files"] = file_table(root)
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, root / MANIFEST)
    return manifest
