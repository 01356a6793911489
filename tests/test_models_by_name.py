"""Models by name (edgelm/hub.py): ``edgelm.load("org/name")`` and ``--model org/name``, never on the network.

Every test runs with ``HF_HUB_OFFLINE=1`` against a Hugging Face cache the test lays out itself (the hub's own
``models--org--name/{blobs,snapshots/<commit>,refs/main}`` layout) holding (a) a published edgelm folder, the
shipped default model, and (b) a plain Hugging Face model with random weights, exported on first use. huggingface_hub
reads its cache location and offline switch once, at import, so in-process tests set them on
``huggingface_hub.constants`` as well as in the environment; the CLI tests run a fresh interpreter that reads the
environment alone.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import edgelm
from edgelm import hub
from edgelm.errors import ChecksumError, ModelNotFoundError

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "models" / "tinystories-edge-int8"
PUBLISHED = "edge-org/tiny-edge"       # a published edgelm folder (has edgelm.json)
TAMPERED = "edge-org/tampered-edge"    # the same, with one file changed after publishing
PLAIN = "hf-org/tiny-llama"            # a plain Hugging Face model: exported on first use
PROMPT = "Once upon a time"


def lay_out_repo(hub_cache: Path, repo: str, files: dict[str, bytes]) -> str:
    """Put ``files`` in ``hub_cache`` as huggingface_hub would after downloading ``repo``; returns the commit."""
    commit = hashlib.sha1(repo.encode() + b"".join(files[k] for k in sorted(files))).hexdigest()
    repo_dir = hub_cache / f"models--{repo.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / commit
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    for rel, data in files.items():
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return commit


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory) -> dict:
    """A Hugging Face cache with the published and the tampered edgelm folders (read-only for the tests)."""
    pytest.importorskip("huggingface_hub")
    hf_home = tmp_path_factory.mktemp("hf-home")
    hub_cache = hf_home / "hub"
    published = folder_bytes(DEFAULT_MODEL)
    tampered = dict(published)
    tokenizer = bytearray(tampered["tokenizer.json"])
    tokenizer[len(tokenizer) // 2] ^= 0x20  # same size, other bytes: only the sha256 can tell
    tampered["tokenizer.json"] = bytes(tokenizer)
    return {"home": hf_home, "hub": hub_cache, "published": lay_out_repo(hub_cache, PUBLISHED, published),
            "tampered": lay_out_repo(hub_cache, TAMPERED, tampered)}


def offline_env(hf: dict, edgelm_cache: Path) -> dict[str, str]:
    return {"HF_HOME": str(hf["home"]), "HF_HUB_CACHE": str(hf["hub"]), "HF_HUB_OFFLINE": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1", "EDGELM_CACHE": str(edgelm_cache)}


@pytest.fixture
def offline(hf_cache, tmp_path, monkeypatch) -> dict:
    """This test's edgelm cache (empty) and the module's Hugging Face cache, offline."""
    import huggingface_hub.constants

    for key, value in offline_env(hf_cache, tmp_path / "edgelm-cache").items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hf_cache["hub"]))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return hf_cache


def greedy_ids(lm, n: int = 12) -> list[int]:
    return lm.generate(PROMPT, max_new_tokens=n, temperature=0, ignore_eos=True).token_ids


def source_record(folder: Path) -> dict:
    return json.loads((folder / hub.SOURCE_FILE).read_text())


# --- names and paths -------------------------------------------------------------------------------------------
def test_what_counts_as_a_name():
    for name in ("org/name", "HuggingFaceTB/SmolLM2-135M-Instruct", "a/b.c_d-e"):
        assert hub.is_model_name(name), name
    for not_name in ("name", "org/name/extra", "./org/name", "/abs/path", "~/x", "org/../x", "org--x/y", "org/",
                     "models/my model", "C:/x"):
        assert not hub.is_model_name(not_name), not_name


def test_cache_location_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("EDGELM_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub.cache_path("org/name") == tmp_path / "xdg" / "edgelm" / "models" / "org--name"
    monkeypatch.setenv("EDGELM_CACHE", str(tmp_path / "mine"))
    assert hub.cache_path("org/name") == tmp_path / "mine" / "models" / "org--name"


def test_a_local_folder_wins_over_the_name(tmp_path, monkeypatch):
    local = tmp_path / "edge-org" / "tiny-edge"
    shutil.copytree(DEFAULT_MODEL, local)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EDGELM_CACHE", str(tmp_path / "edgelm-cache"))
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # resolving it by name would fail loudly
    lm = edgelm.load(PUBLISHED, threads=1)
    assert lm.path.resolve() == local.resolve()
    assert not (tmp_path / "edgelm-cache").exists()


def test_a_mistyped_path_under_a_local_folder_never_goes_to_the_hub(tmp_path, monkeypatch):
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # resolving it by name would fail loudly
    monkeypatch.setattr(hub, "resolve", lambda *a, **k: pytest.fail("a local path was sent to the hub"))
    with pytest.raises(edgelm.errors.ModelNotFoundError, match="No model folder at models/tinystories-edge-int9"):
        edgelm.load("models/tinystories-edge-int9", threads=1)


# --- a published edgelm folder ---------------------------------------------------------------------------------
def test_published_folder_is_fetched_verified_and_cached(offline):
    lm = edgelm.load(PUBLISHED, threads=1)
    cached = hub.cache_path(PUBLISHED)
    assert lm.path == cached
    # Byte for byte the published folder, plus the record of where it came from.
    assert folder_bytes(cached) == {**folder_bytes(DEFAULT_MODEL), hub.SOURCE_FILE: (cached / hub.SOURCE_FILE).read_bytes()}
    assert source_record(cached) | {"added": None} == {"name": PUBLISHED, "kind": "published",
                                                       "revision": offline["published"], "added": None}
    assert greedy_ids(lm) == greedy_ids(edgelm.load(DEFAULT_MODEL, threads=1))


def test_cache_hit_needs_neither_the_hub_nor_its_cache(offline, monkeypatch):
    first = edgelm.load(PUBLISHED, threads=1)
    expected = greedy_ids(first)
    manifest_mtime = (first.path / "edgelm.json").stat().st_mtime_ns
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)    # import huggingface_hub now raises ImportError
    monkeypatch.setattr(hub, "_published_manifest", None)        # and any path that reaches the hub would crash
    again = edgelm.load(PUBLISHED, threads=1)
    assert again.path == first.path and greedy_ids(again) == expected
    assert (again.path / "edgelm.json").stat().st_mtime_ns == manifest_mtime


def test_checksum_failure_names_the_file_and_caches_nothing(offline):
    with pytest.raises(ChecksumError) as info:
        edgelm.load(TAMPERED, threads=1)
    err = info.value
    assert Path(err.path).name == "tokenizer.json" and "models--edge-org--tampered-edge" in err.path
    assert "sha256" in err.message and TAMPERED in err.message
    assert "models--edge-org--tampered-edge" in err.hint and "\n" not in str(err)
    assert not hub.cache_path(TAMPERED).exists() and hub.cached_models() == []


def test_a_cached_folder_changed_later_fails_its_checksum(offline):
    cached = edgelm.load(PUBLISHED, threads=1).path
    target = cached / "config.json"
    data = target.read_bytes().replace(b'"num_layers": 6', b'"num_layers": 5')
    target.unlink()  # a new file: the cached one is a hard link to the hub cache's blob, which must stay intact
    target.write_bytes(data)
    with pytest.raises(ChecksumError, match="config.json"):
        edgelm.load(PUBLISHED, threads=1)


# --- what cannot be had ----------------------------------------------------------------------------------------
def test_offline_miss_is_one_line_saying_what_and_how(offline):
    with pytest.raises(ModelNotFoundError) as info:
        edgelm.load("edge-org/not-downloaded")
    text = str(info.value)
    assert "\n" not in text
    for needed in ("edge-org/not-downloaded", str(hub.cache_path("edge-org/not-downloaded")), "HF_HUB_OFFLINE",
                   "edgelm export edge-org/not-downloaded --out DIR"):
        assert needed in text, needed


def test_without_huggingface_hub_the_message_says_what_to_install(offline, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(ModelNotFoundError, match=r'pip install "edgelm\[hub\]"'):
        edgelm.load(PUBLISHED)
    assert not hub.cache_path(PUBLISHED).exists()


def test_a_plain_model_without_the_export_extra_says_so(offline, tmp_path, monkeypatch):
    import huggingface_hub.constants

    hub_cache = tmp_path / "hub"
    lay_out_repo(hub_cache, PLAIN, {"config.json": b'{"model_type": "llama"}'})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(hub, "_export_extra_installed", lambda: False)
    with pytest.raises(ModelNotFoundError) as info:
        edgelm.load(PLAIN)
    assert 'pip install "edgelm[export]"' in str(info.value) and "no edgelm.json" in str(info.value)


# --- edgelm list and the CLI -----------------------------------------------------------------------------------
def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgelm.cli", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env}, cwd=ROOT)


def test_cli_model_by_name_then_list(hf_cache, tmp_path):
    env = offline_env(hf_cache, tmp_path / "edgelm-cache")
    empty = run_cli(env, "list")
    assert empty.returncode == 0 and "no models" in empty.stdout

    out = run_cli(env, "generate", PROMPT, "--model", PUBLISHED, "-n", "12", "-t", "0", "--no-echo", "-q",
                  "--threads", "1")
    assert out.returncode == 0, out.stderr
    lm = edgelm.load(DEFAULT_MODEL, threads=1)
    assert out.stdout == lm.generate(PROMPT, max_new_tokens=12, temperature=0).text + "\n"

    listed = run_cli(env, "list")
    assert listed.returncode == 0, listed.stderr
    header, row = listed.stdout.splitlines()[:2]
    assert header.split() == ["NAME", "SIZE", "SOURCE"]
    size = sum(len(b) for b in folder_bytes(DEFAULT_MODEL).values())
    assert row.split()[:3] == [PUBLISHED, f"{size / 1e6:.1f}", "MB"]
    assert f"downloaded edgelm folder {PUBLISHED}@{hf_cache['published'][:10]}" in row
    record = json.loads(run_cli(env, "list", "--json").stdout)
    assert record["name"] == PUBLISHED and record["source"] == "published"
    assert record["bytes"] == size and Path(record["path"]) == tmp_path / "edgelm-cache" / "models" / "edge-org--tiny-edge"

    missing = run_cli(env, "generate", PROMPT, "--model", "edge-org/not-downloaded")
    assert missing.returncode == 1 and missing.stdout == ""
    assert len(missing.stderr.splitlines()) == 1 and "HF_HUB_OFFLINE" in missing.stderr


# --- export on first use ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_plain_model_is_exported_on_first_use(offline, tmp_path, monkeypatch, torch_one_thread):
    transformers = pytest.importorskip("transformers")
    import huggingface_hub.constants
    import torch

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=4096, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                   bos_token_id=1, eos_token_id=2)
    src = tmp_path / "plain"
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(src))
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the shipped model's tokenizer: 4096 tokens
        shutil.copyfile(DEFAULT_MODEL / name, src / name)
    hub_cache = tmp_path / "hub"
    lay_out_repo(hub_cache, PUBLISHED, folder_bytes(DEFAULT_MODEL))
    commit = lay_out_repo(hub_cache, PLAIN, folder_bytes(src))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache))

    lm = edgelm.load(PLAIN, threads=1)
    assert lm.path == hub.cache_path(PLAIN)
    manifest = json.loads((lm.path / "edgelm.json").read_text())
    assert manifest["source"]["model"] == PLAIN and manifest["quantization"]["method"] != "none"
    assert source_record(lm.path)["kind"] == "exported" and source_record(lm.path)["revision"] == commit
    assert len(greedy_ids(lm, 8)) == 8 and lm.config["num_layers"] == 1

    # The export's own check held: the int8 graph's first greedy token matches PyTorch's on the same prompt.
    model = transformers.LlamaForCausalLM.from_pretrained(str(src)).eval()
    ids = lm.tokenizer.encode(PROMPT)
    with torch.no_grad():
        torch_next = int(model(torch.tensor([ids])).logits[0, -1].argmax())
    assert lm.generate(ids, max_new_tokens=1, temperature=0, ignore_eos=True).token_ids == [torch_next]

    # Second use: the cache, no second export.
    import edgelm_export.convert

    monkeypatch.setattr(edgelm_export.convert, "export_model", None)
    assert edgelm.load(PLAIN, threads=1).path == lm.path

    edgelm.load(PUBLISHED, threads=1)
    rows = {m.name: m for m in hub.cached_models()}
    assert set(rows) == {PLAIN, PUBLISHED}
    assert rows[PLAIN].describe() == f"exported from {PLAIN}@{commit[:10]} ({manifest['quantization']['method']})"
    assert rows[PLAIN].bytes == sum(f["size"] for f in manifest["files"].values()) + (lm.path / "edgelm.json").stat().st_size
