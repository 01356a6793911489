"""Models by name: ``edgelm.load("org/name")`` and ``--model org/name``.

A name that is not a local folder resolves, in this order, to

1. edgelm's cache: ``$EDGELM_CACHE/models/org--name`` (default ``$XDG_CACHE_HOME/edgelm``, else
   ``~/.cache/edgelm``), a plain model folder written by step 2 or 3 on an earlier call;
2. a **published edgelm folder** on the Hugging Face hub (the repo has ``edgelm.json``): the files its manifest
   lists are fetched with huggingface_hub (its progress bars; its cache, so ``HF_HUB_OFFLINE=1`` works from a
   cache filled earlier), checked against the manifest's sha256 and sizes, and only then put in edgelm's cache;
3. any other Hugging Face causal LM, **exported on first use** into edgelm's cache with the ``[export]`` extra's
   own ``export_model`` (the same pipeline as ``edgelm export org/name``: int8, verified, quality-gated).

huggingface_hub is optional: it is imported only when a name misses edgelm's cache, so ``import edgelm`` and a
cache hit need neither it nor a network. Anything that cannot be had raises ``ModelNotFoundError`` whose one line
says what is missing and how to get it.
"""
from __future__ import annotations

import datetime as _dt
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from edgelm.errors import ChecksumError, ModelFormatError, ModelNotFoundError
from edgelm.folder import MANIFEST, read_json, verify_files

ENV_CACHE = "EDGELM_CACHE"
# Written into each cached folder (not listed in its manifest, so checksums are unaffected): where it came from.
SOURCE_FILE = ".edgelm-source.json"
# A Hugging Face repo id: owner/name, letters, digits, '-', '_', '.'; the hub itself refuses '--' and '..'.
_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_INSTALL_HUB = ('Install it: pip install "edgelm[hub]" (in a source checkout: pip install ".[hub]") for published '
                'edgelm folders, or the [export] extra for any model: pip install "edgelm[export]" (in a source '
                'checkout: pip install ".[export]"); or pass a model folder.')


def is_model_name(text: str) -> bool:
    """Whether ``text`` reads as a hub name ``org/name`` (the caller has already found no local path by it)."""
    return bool(_NAME.match(text)) and ".." not in text and "--" not in text


def cache_root() -> Path:
    """edgelm's cache: ``$EDGELM_CACHE``, else ``$XDG_CACHE_HOME/edgelm``, else ``~/.cache/edgelm``."""
    env = os.environ.get(ENV_CACHE)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "edgelm"


def models_dir() -> Path:
    return cache_root() / "models"


def cache_path(name: str) -> Path:
    """The cache folder for ``org/name``: ``models/org--name`` (the hub's own spelling of a repo on disk)."""
    return models_dir() / name.replace("/", "--")


def resolve(name: str, *, progress: bool = True) -> Path:
    """The model folder for the hub name ``name``: cached, downloaded or exported (module docstring)."""
    target = cache_path(name)
    if (target / MANIFEST).is_file():
        return target
    if target.is_dir():  # no manifest: a folder damaged by hand (complete ones only ever appear by rename)
        shutil.rmtree(target)
    hf = _import_hub()
    if hf is None:
        raise ModelNotFoundError(f"{name} is not a local folder nor in edgelm's cache ({target}), and fetching it "
                                 "from the Hugging Face hub needs huggingface_hub, which is not installed.",
                                 hint=_INSTALL_HUB)
    manifest_file = _published_manifest(hf, name, target)
    if manifest_file is not None:
        return _install_published(hf, name, Path(manifest_file), target)
    if not _export_extra_installed():
        from edgelm.cli import install_hint
        raise ModelNotFoundError(f"{name} on the Hugging Face hub is not a published edgelm folder (it has no "
                                 f"{MANIFEST}), and exporting it on first use needs the [export] extra, which is not "
                                 "installed.", hint=f"{install_hint('export')}; or run `edgelm export {name} --out DIR` "
                                                    "where it is installed and pass DIR.")
    return _export_into_cache(name, target, progress)


# --- the hub ---------------------------------------------------------------------------------------------------
def _import_hub() -> Any:
    try:
        import huggingface_hub
        import huggingface_hub.constants  # a lazy package: the submodule is not an attribute until imported
    except ImportError:
        return None
    return huggingface_hub


def _offline(hf: Any) -> bool:
    """HF_HUB_OFFLINE as the hub reads it, and as the environment says now (the hub reads it once, at import)."""
    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return env.strip().upper() in {"1", "ON", "YES", "TRUE"} or bool(hf.constants.HF_HUB_OFFLINE)


def _published_manifest(hf: Any, name: str, target: Path) -> str | None:
    """The path of the repo's edgelm.json (fetched or cached), or None when the repo is a plain Hugging Face model.

    Raises ModelNotFoundError when the repo does not exist, or cannot be reached and is not in the hub's cache."""
    # huggingface_hub.utils re-exports these in every release since 0.1x (huggingface_hub.errors is newer).
    from huggingface_hub.utils import (EntryNotFoundError, GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                       RepositoryNotFoundError)

    offline = _offline(hf)
    try:
        return hf.hf_hub_download(name, MANIFEST, local_files_only=offline)
    except GatedRepoError:
        raise ModelNotFoundError(f"{name} is a gated repo on the Hugging Face hub.",
                                 hint="Accept its terms on the hub and log in (`hf auth login`), then retry.") from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(f"{name} is neither a local folder nor a repo on the Hugging Face hub.",
                                 hint="Check the name (org/name), log in for a private repo (`hf auth login`), or "
                                      "pass a model folder.") from None
    except LocalEntryNotFoundError as exc:  # offline, or the hub did not answer, and edgelm.json is not cached
        if isinstance(hf.try_to_load_from_cache(name, "config.json"), str):
            return None  # a plain model downloaded earlier: it can be exported without the network
        cause = f" ({_first_line(exc.__cause__)})" if exc.__cause__ else ""
        why = "HF_HUB_OFFLINE is set" if offline else f"the hub could not be reached{cause}"
        raise ModelNotFoundError(f"{name} is not a local folder, not in edgelm's cache ({target}) nor in the Hugging "
                                 f"Face cache, and {why}.",
                                 hint=("Go online once and retry (unset HF_HUB_OFFLINE) to fetch it, " if offline else
                                       "Retry when online to fetch it, ")
                                      + f"or run `edgelm export {name} --out DIR` on a connected machine and pass DIR.")
    except EntryNotFoundError:  # the repo exists and has no edgelm.json (RemoteEntryNotFoundError)
        return None
    except HfHubHTTPError as exc:
        raise ModelNotFoundError(f"The Hugging Face hub refused {name} ({_first_line(exc)}).",
                                 hint="Retry later, or pass a model folder.") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0].rstrip(".") if text else type(exc).__name__


def _manifest_files(manifest: dict[str, Any], where: str) -> list[str]:
    """The files a (downloaded, so untrusted) manifest lists, refusing names that would land outside the folder."""
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise ModelFormatError(f"{where} lists no files.", hint="The published folder is broken; tell its owner.")
    for rel in files:
        p = PurePosixPath(rel)
        if p.is_absolute() or ".." in p.parts or "\\" in rel or rel == MANIFEST:
            raise ModelFormatError(f"{where} lists the file name {rel!r}, which is not a plain path inside the folder.",
                                   hint="The published folder is broken or hostile; do not use it.")
    return sorted(files)


def _install_published(hf: Any, name: str, manifest_file: Path, target: Path) -> Path:
    """Fetch every file the manifest lists (from the same revision), verify them, then move them into the cache."""
    manifest = read_json(manifest_file)
    files = _manifest_files(manifest, f"{MANIFEST} of {name}")
    revision = manifest_file.parent.name  # .../snapshots/<commit>/edgelm.json
    try:
        snapshot = Path(hf.snapshot_download(name, revision=revision, allow_patterns=[MANIFEST, *files],
                                             local_files_only=_offline(hf)))
    except OSError as exc:  # the hub's errors (connection, HTTP, not cached offline) are all OSErrors
        raise ModelNotFoundError(f"Downloading {name}'s files failed ({type(exc).__name__}: {_first_line(exc)}).",
                                 hint="Retry when online (unset HF_HUB_OFFLINE); finished files are kept.") from None
    tmp = _staging_dir(target)
    try:
        for rel in [MANIFEST, *files]:
            if (snapshot / rel).is_file():  # a missing one is reported by verify_files, below
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                _link_or_copy((snapshot / rel).resolve(), tmp / rel)
        try:  # the staged files are the hub's blobs (hard links), so an error is about the hub cache's file
            verify_files(tmp, manifest)
        except ChecksumError as exc:
            raise ChecksumError(f"{name}: {exc.message.replace(str(tmp), str(snapshot))}",
                                path=exc.path and exc.path.replace(str(tmp), str(snapshot)),
                                hint=f"Delete the Hugging Face cache entry ({snapshot.parent.parent}) and retry to "
                                     "download it again; nothing was added to edgelm's cache.") from None
        _write_source(tmp, name=name, kind="published", revision=revision)
        return _move_into_place(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link to the hub cache's blob where the filesystem allows it (no second copy of the weights)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


# --- export on first use ---------------------------------------------------------------------------------------
def _export_extra_installed() -> bool:
    return all(importlib.util.find_spec(m) is not None
               for m in ("edgelm_export", "torch", "transformers", "onnx", "gguf"))


def resolve_gguf(path: Path, *, progress: bool = True) -> Path:
    """The model folder for a llama.cpp GGUF file: edgelm's cache (``models/gguf--STEM-KEY``, KEY from the file's
    absolute path, size and modification time, so an edited or replaced file is exported afresh), else exported
    there once with the ``[export]`` extra (``edgelm export FILE.gguf``'s pipeline: int8, verified, gated)."""
    import zlib

    st = path.stat()
    key = zlib.crc32(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()) & 0xFFFFFFFF
    target = models_dir() / f"gguf--{path.stem}-{key:08x}"
    if (target / MANIFEST).is_file():
        return target
    if target.is_dir():  # an export that did not finish
        shutil.rmtree(target)
    if not _export_extra_installed():
        from edgelm.cli import install_hint
        raise ModelNotFoundError(f"{path} is a GGUF file; edgelm runs ONNX model folders, and exporting it on first "
                                 "use needs the [export] extra, which is not installed.",
                                 hint=f"{install_hint('export')}; or run `edgelm export {path} --out DIR` where it "
                                      "is installed and pass DIR.")
    return _export_into_cache(str(path), target, progress, what="a GGUF file")


def _export_into_cache(name: str, target: Path, progress: bool, what: str = "not a published edgelm folder") -> Path:
    from edgelm_export.convert import export_model

    if progress:
        print(f"edgelm: {name} is {what}; exporting it once into {target}", file=sys.stderr, flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    report = export_model(name, str(target), progress=progress)
    source = read_json(target / MANIFEST).get("source") or {}
    snapshot = Path(str(source.get("path", "")))
    _write_source(target, name=name, kind="exported", quantization=report.quantization,
                  revision=snapshot.name if snapshot.parent.name == "snapshots" else None)
    return target


# --- the cache -------------------------------------------------------------------------------------------------
def _staging_dir(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.edgelm-fetch-", dir=target.parent))


def _move_into_place(tmp: Path, target: Path) -> Path:
    try:
        os.rename(tmp, target)
    except OSError:
        if not (target / MANIFEST).is_file():  # not another process that got there first
            raise
    return target


def _write_source(folder: Path, **fields: Any) -> None:
    fields["added"] = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
    (folder / SOURCE_FILE).write_text(json.dumps(fields, indent=2) + "\n", encoding="utf-8")


@dataclass(frozen=True)
class CachedModel:
    """One model in edgelm's cache (``edgelm list``)."""

    name: str
    path: Path
    bytes: int
    source: str  # "published" (downloaded edgelm folder), "exported" (on first use), or "unknown"
    revision: str | None
    quantization: str | None

    def describe(self) -> str:
        rev = f"@{self.revision[:10]}" if self.revision else ""
        if self.source == "published":
            return f"downloaded edgelm folder {self.name}{rev}"
        if self.source == "exported":
            return f"exported from {self.name}{rev}" + (f" ({self.quantization})" if self.quantization else "")
        return "unknown (not added by edgelm)"


def cached_models() -> list[CachedModel]:
    """Every complete model folder in edgelm's cache, by name."""
    root = models_dir()
    out = []
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        if folder.name.startswith(".") or not (folder / MANIFEST).is_file():
            continue  # a download or export in progress, or something else
        try:
            info = json.loads((folder / SOURCE_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            info = {}
        info = info if isinstance(info, dict) else {}
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.name != SOURCE_FILE)
        out.append(CachedModel(name=str(info.get("name") or folder.name.replace("--", "/", 1)), path=folder,
                               bytes=size, source=str(info.get("kind") or "unknown"), revision=info.get("revision"),
                               quantization=info.get("quantization")))
    return out
