"""The model folder: one directory = one deployable model (see docs/model-format.md).

This module reads and checks folders (runtime side) and writes their manifest (export side), so both
sides agree on one definition of the format.
"""
from __future__ import annotations

import datetime as _dt
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


# Files up to this size are hashed by CPython's own sha256 instead of hashlib's: importing hashlib maps OpenSSL's
# libcrypto into the process (~3.6 MB resident on Linux x86-64, a twentieth of a tiny model's whole footprint),
# while the built-in code is several times slower (benchmarks/results/sha256-small-files.md has both figures).
# Below this size the built-in one costs at most a few tens of milliseconds; larger files take OpenSSL's.
SMALL_FILE_HASH_BYTES = 16 * 2**20


def _sha256_for(size: int) -> Any:
    """A fresh sha256 object for hashing ``size`` bytes (see SMALL_FILE_HASH_BYTES)."""
    if size <= SMALL_FILE_HASH_BYTES:
        for name in ("_sha2", "_sha256"):  # CPython 3.12+, then 3.8-3.11
            try:
                return __import__(name).sha256()
            except (ImportError, AttributeError):
                continue
    import hashlib

    return hashlib.sha256()


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of the file at ``path``."""
    h = _sha256_for(os.path.getsize(path))
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


# JSON files of a folder (config, manifest, tokenizer/generation config) are small; anything bigger than this is
# refused before it is parsed, so a hostile folder cannot make load() parse gigabytes.
MAX_JSON_BYTES = 64 * 2**20


def _unreadable(path: Path, exc: OSError) -> ModelError:
    """A typed error for a file that exists but cannot be read (permissions, a directory in its place, I/O)."""
    why = exc.strerror or type(exc).__name__
    hint = (f"Make it readable by this user (e.g. chmod a+r {path})." if isinstance(exc, PermissionError)
            else "Restore the file or re-export the model folder.")
    return ModelError(f"{path} cannot be read ({why}).", hint=hint)


def read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_JSON_BYTES + 1)
    except FileNotFoundError:
        raise ModelNotFoundError(f"{path} is missing.",
                                 hint="Re-export the model folder or restore the file.") from None
    except OSError as exc:
        raise _unreadable(path, exc) from None
    if len(raw) > MAX_JSON_BYTES:
        raise ModelFormatError(f"{path} is larger than {MAX_JSON_BYTES >> 20} MiB, too large for a JSON file of a "
                               "model folder.", hint="The file is corrupt; re-export the model folder.")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # bad JSON, bad UTF-8, or nesting deeper than the parser goes
        raise ModelFormatError(f"{path} is not valid JSON ({type(exc).__name__}: {str(exc)[:200]}).",
                               hint="The file is corrupt; re-export the model folder or restore the file.") from None
    if not isinstance(data, dict):
        raise ModelFormatError(f"{path} must hold a JSON object.", hint="Re-export the model folder.")
    return data


def _relative_name(name: Any, where: str) -> str:
    """``name`` as a normalized relative POSIX path that stays inside the folder, else ModelFormatError.

    Refuses what is not a plain path below the folder: absolute paths, ``..`` parts, backslashes and drive letters
    (another OS's separators), NUL and empty names. Symlinks are checked separately (:func:`inside`)."""
    from pathlib import PurePosixPath, PureWindowsPath

    ok = isinstance(name, str) and name.strip() and "\x00" not in name and "\\" not in name
    if ok:
        try:
            name.encode("utf-8")  # a lone surrogate (JSON "\ud800") names no file on any filesystem
        except UnicodeEncodeError:
            ok = False
    if ok:
        p = PurePosixPath(name)
        ok = not p.is_absolute() and ".." not in p.parts and not PureWindowsPath(name).drive and p.parts != ()
    if not ok:
        raise ModelFormatError(f"{where} names the file {name!r}, which is not a relative path inside the model "
                               "folder.", hint="The folder is corrupt or hostile: re-export it, or do not use it.")
    return PurePosixPath(name).as_posix()


def inside(root: Path, name: Any, where: str) -> Path:
    """The path of folder file ``name`` (see :func:`_relative_name`), refusing a symlink that leads out of ``root``."""
    rel = _relative_name(name, where)
    p = root / rel
    try:
        real, top = p.resolve(), root.resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # a symlink loop
        raise ModelFormatError(f"{p} cannot be resolved ({exc}).", hint="Remove the broken link.") from None
    # A Hugging Face hub snapshot (.../snapshots/<revision>/) links each file to the same repo's .../blobs/<hash>:
    # that layout is allowed, the blob still has to match the manifest.
    hub_blob = top.parent.name == "snapshots" and real.parent == top.parent.parent / "blobs"
    if real != top and top not in real.parents and not hub_blob:
        raise ModelFormatError(f"{p} (named in {where}) is a link to {real}, outside the model folder.",
                               hint="Copy the file into the folder instead of linking it, then re-export or rewrite "
                                    "the manifest.")
    return p


def onnx_file(config: dict[str, Any], root: Path) -> str:
    """The graph's file name from config.json (``onnx.file``, default model.onnx), checked to stay in the folder."""
    section = config.get("onnx")
    if section is None:
        section = {}
    if not isinstance(section, dict):
        raise ModelFormatError(f"{root / CONFIG} has an 'onnx' entry that is not an object ({section!r}).",
                               hint="Re-export the model folder.")
    return _relative_name(section.get("file", "model.onnx"), f"{root / CONFIG} (onnx.file)")


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
        return self.path / onnx_file(self.config, self.path)

    @property
    def tokenizer_path(self) -> Path:
        return self.path / TOKENIZER

    @property
    def card_path(self) -> Path:
        return self.path / CARD


_NOT_LISTED_HINT = ("Re-export the model folder (its manifest must list every file the runtime reads), or load it "
                    "with verify=False if you trust it as it is.")


def open_folder(path: str | os.PathLike, *, verify: bool = True) -> ModelFolder:
    """Open a model folder, checking the sha256 and size of every file listed in its manifest.

    With ``verify`` every file the runtime goes on to read must be listed there: config.json, tokenizer.json, the
    graph and every external-data file the graph names (a ModelFormatError says which is not). Optional files
    (tokenizer_config.json, generation_config.json) that the manifest does not list are ignored, never read, so a
    file dropped into a verified folder later cannot change how it behaves. Paths never leave the folder.
    """
    root = Path(path).expanduser()
    if root.is_file():
        raise ModelNotFoundError(f"{root} is a file, not a model folder.",
                                 hint="Pass the folder that `edgelm export` wrote; a GGUF file or a Hugging Face model "
                                      f"becomes one with `edgelm export {root} --out DIR`.")
    if not root.is_dir():
        raise ModelNotFoundError(f"No model folder at {root}.",
                                 hint="Pass the folder written by `edgelm export`, or omit it for the default model.")
    if not any((root / name).is_file() for name in (MANIFEST, CONFIG)):
        inside_models = sorted(p.name for p in root.iterdir() if (p / MANIFEST).is_file())[:3]
        raise ModelNotFoundError(f"{root} is not an edgelm model folder (it has no {MANIFEST}).",
                                 hint=(f"It holds model folders: pass one of them, e.g. {root / inside_models[0]}."
                                       if inside_models else "Pass the folder written by `edgelm export SRC --out DIR`."))
    if not (root / TOKENIZER).is_file():
        raise TokenizerError(f"{root / TOKENIZER} is missing: the model folder has no tokenizer.",
                             hint="Re-export the model, or copy tokenizer.json from the source model into the folder.")
    for name in REQUIRED:
        if not (root / name).is_file():
            source = name == MANIFEST and any(root.glob(g) for g in ("*.safetensors", "pytorch_model*.bin", "*.gguf"))
            raise ModelNotFoundError(
                f"{root / name} is missing: this is not a complete edgelm model folder.",
                hint=(f"It looks like a Hugging Face model folder: `edgelm export {root} --out DIR` makes an edgelm "
                      "folder from it." if source else "Re-export it with `edgelm export SRC --out DIR`."))
    manifest = read_json(root / MANIFEST)
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelFormatError(f"{root / MANIFEST} has format_version {version!r}; this edgelm reads {FORMAT_VERSION}.",
                               hint="Upgrade edgelm or re-export the model with this version.")
    _check_manifest_fields(root, manifest)
    listed = verify_files(root, manifest) if verify else None

    def must_be_listed(name: str) -> None:
        if listed is not None and name not in listed:
            raise ModelFormatError(f"{root / name} is not listed in {root / MANIFEST}, so its checksum cannot be "
                                   "verified.", hint=_NOT_LISTED_HINT)

    def optional(name: str) -> dict[str, Any]:
        usable = (root / name).is_file() and (listed is None or name in listed)
        return read_json(root / name) if usable else {}

    for name in (CONFIG, TOKENIZER):
        must_be_listed(name)
    config = read_json(root / CONFIG)
    folder = ModelFolder(root, config, manifest, optional(GENERATION_CONFIG), optional(TOKENIZER_CONFIG))
    graph = onnx_file(config, root)
    onnx_path = inside(root, graph, f"{root / CONFIG} (onnx.file)")
    if not onnx_path.is_file():
        raise ModelNotFoundError(f"{onnx_path} is missing.", hint="Re-export the model folder.")
    must_be_listed(graph)
    check_external_data(root, onnx_path, listed)
    return folder


# The manifest's fields other than the file table, and the JSON types their readers (edgelm info, the hub) expect.
_MANIFEST_FIELDS: dict[str, tuple[type, ...]] = {"files": (dict,), "source": (dict,), "quantization": (dict,),
                                                 "metrics": (dict,), "num_parameters": (int,), "created": (str,)}


def _check_manifest_fields(root: Path, manifest: dict[str, Any]) -> None:
    """Refuse a manifest whose known fields have the wrong JSON type (None / absent is fine): their readers would
    otherwise fail later with a TypeError instead of a message naming the field."""
    for key, types in _MANIFEST_FIELDS.items():
        value = manifest.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, types)):
            raise ModelFormatError(f"{root / MANIFEST} has a malformed {key!r}: {str(value)[:80]} (expected "
                                   f"{' or '.join('an object' if t is dict else t.__name__ for t in types)}).",
                                   hint="Re-export the model folder.")


def check_external_data(root: Path, onnx_path: Path, listed: set[str] | None) -> None:
    """Refuse a graph whose external-data files (which onnxruntime opens by the names written inside the graph)
    lie outside the folder or, when ``listed`` is given, are not among the verified files."""
    for location in sorted(external_data_locations(onnx_path)):
        where = f"{onnx_path} (an external-data location)"
        inside(root, location, where)
        name = _relative_name(location, where)
        if listed is not None and name not in listed:
            raise ModelFormatError(f"{onnx_path} reads its weights from {name}, which {MANIFEST} does not list, so "
                                   "verify=True cannot check them.", hint=_NOT_LISTED_HINT)


# --- the few protobuf fields that can name an external-data file (onnx.proto; field numbers are stable) -----------
# message -> {field number: message type of that (length-delimited) field}; "entry" is StringStringEntryProto.
_ONNX_FIELDS: dict[str, dict[int, str]] = {
    "model": {7: "graph", 20: "training", 25: "function"},
    "training": {1: "graph", 2: "graph"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "function": {7: "node", 11: "attribute"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
    "tensor": {13: "entry"},
}


def external_data_locations(onnx_path: Path) -> set[str]:
    """Every external-data ``location`` named anywhere in the graph file: initializers, Constant/attribute tensors,
    sparse tensors, subgraphs and functions. Reads the protobuf wire format directly (the runtime does not depend
    on the onnx package) and skips tensor payloads without copying them."""
    import mmap

    found: set[str] = set()
    bad = False
    try:
        with open(onnx_path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                bad = True
            else:  # mapped, not read: an older folder keeps its weights in the graph file, and they are skipped
                with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                    view = memoryview(mapped)
                    try:
                        _walk(view, "model", found, 0)
                    except (IndexError, ValueError, UnicodeDecodeError):
                        bad = True
                    finally:
                        view.release()
    except OSError as exc:
        raise _unreadable(onnx_path, exc) from None
    if bad:
        raise ModelFormatError(f"{onnx_path} is not a valid ONNX protobuf.",
                               hint="The graph is corrupt; re-export the model folder.")
    return found


def _varint(buf: memoryview, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _walk(buf: memoryview, kind: str, found: set[str], depth: int) -> None:
    if depth > 64:
        raise ValueError("graph nested too deep")
    fields = _ONNX_FIELDS.get(kind, {})
    key = value = None
    i, n = 0, len(buf)
    while i < n:
        tag, i = _varint(buf, i)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            _, i = _varint(buf, i)
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            size, i = _varint(buf, i)
            if i + size > n:
                raise ValueError("truncated field")
            part = buf[i:i + size]
            i += size
            if kind == "entry":
                if field == 1:
                    key = bytes(part).decode("utf-8")
                elif field == 2:
                    value = bytes(part).decode("utf-8")
            elif field in fields:
                _walk(part, fields[field], found, depth + 1)
        else:
            raise ValueError(f"wire type {wire}")
    if i != n:
        raise ValueError("truncated message")
    if kind == "entry" and key == "location" and value is not None:
        found.add(value)


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


_SHA256 = re.compile(r"[0-9a-f]{64}")


def verify_files(root: Path, manifest: dict[str, Any], *, contained: bool = True) -> set[str]:
    """Check every file the manifest lists against its recorded size and sha256; return the verified names.

    Raises ModelFormatError for a malformed manifest (a file entry that is not ``{"sha256": 64 hex digits,
    "size": int}``, a name that is not a relative path inside the folder, or, with ``contained``, a symlink that
    leads out of it; all checked before any file is opened), ModelError for a file that cannot be read, and
    ChecksumError naming the first file that is missing or differs. ``contained=False`` allows links that leave the
    folder (the Hugging Face hub cache's snapshot folders link into its blob store).
    """
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise ModelFormatError(f"{root / MANIFEST} lists no files (its 'files' must be an object of "
                               "name -> {sha256, size}).", hint="Re-export the model folder.")
    checked: list[tuple[str, Path, int, str]] = []
    for name, meta in files.items():
        where = f"{root / MANIFEST}"
        rel = _relative_name(name, where)
        path = inside(root, name, where) if contained else root / rel
        size = meta.get("size") if isinstance(meta, dict) else None
        digest = meta.get("sha256") if isinstance(meta, dict) else None
        if (isinstance(size, bool) or not isinstance(size, int) or size < 0 or not isinstance(digest, str)
                or not _SHA256.fullmatch(digest)):
            raise ModelFormatError(f"{where} has a malformed entry for {name!r}: {str(meta)[:120]} (each file needs "
                                   '{"sha256": 64 hex digits, "size": bytes as an int}).',
                                   hint="Re-export the model folder.")
        checked.append((rel, path, size, digest))
    hint = ("The file is damaged or was edited after export; re-export or re-download the model (or skip this "
            "check: load(..., verify=False), --no-verify on the command line).")
    for rel, p, expected, want in checked:
        if not p.is_file():
            raise ChecksumError(f"{p} is listed in {MANIFEST} but missing.", path=str(p), hint=hint)
        try:
            size = p.stat().st_size
            if size != expected:
                what = "shorter than recorded (truncated or edited)" if size < expected else "larger than recorded"
                raise ChecksumError(f"{p} is {what}: {size} bytes, expected {expected}.", path=str(p), hint=hint)
            digest = sha256_file(p)
        except OSError as exc:
            raise _unreadable(p, exc) from None
        if digest != want:
            raise ChecksumError(f"{p} does not match its sha256 in {MANIFEST} (got {digest[:12]}..., "
                                f"expected {want[:12]}...).", path=str(p), hint=hint)
    return {rel for rel, *_ in checked}


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
