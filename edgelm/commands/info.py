"""`edgelm info [MODEL]`: a model folder's short summary (architecture, size, quality, source, checksum status);
``--card`` prints its model card, ``--json`` every field.

The folder is opened without trusting it: checksums are verified and reported (exit status 1 when a file does
not match), rather than refusing to show anything.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from edgelm.commands.generate import add_model_arguments

    add_model_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print every field as JSON")
    parser.add_argument("--card", action="store_true",
                        help="print the model card (the folder's README.md: how it was built, quality, speed)")


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"


def summary(path: Path) -> dict[str, Any]:
    """Everything `edgelm info` shows, as a dict (also what --json prints).

    A folder whose files no longer match its manifest is still summarised from what can be read (the manifest,
    and config.json / tokenizer_config.json / generation_config.json where they still parse), with the checksum
    failure; a folder whose files all match but cannot be opened raises the reason."""
    from edgelm.errors import ChecksumError, EdgeLMError, ModelFormatError
    from edgelm.folder import CONFIG, GENERATION_CONFIG, MANIFEST, TOKENIZER_CONFIG, open_folder, read_json, verify_files

    root = Path(path).expanduser()
    if not (root / MANIFEST).is_file():
        open_folder(root, verify=False)  # raises what is wrong (no folder, not a model folder, ...)
    manifest = read_json(root / MANIFEST)
    listed = len(manifest.get("files") or {}) if isinstance(manifest.get("files"), dict) else 0
    try:
        verify_files(root, manifest)
        checksums = {"ok": True, "files": listed, "error": None}
    except (ChecksumError, ModelFormatError) as exc:
        checksums = {"ok": False, "files": listed, "error": str(exc)}

    def readable(name: str) -> dict[str, Any]:
        try:
            return read_json(root / name) if (root / name).is_file() else {}
        except EdgeLMError:
            return {}

    try:
        folder = open_folder(root, verify=False)
        cfg, gen, tok, onnx_path = folder.config, folder.generation_config, folder.tokenizer_config, folder.onnx_path
    except EdgeLMError:
        if checksums["ok"]:
            raise
        cfg, gen, tok, onnx_path = readable(CONFIG), readable(GENERATION_CONFIG), readable(TOKENIZER_CONFIG), None
    files = [p for p in root.rglob("*") if p.is_file()]
    return {
        "path": str(root),
        "size_bytes": sum(p.stat().st_size for p in files),
        "onnx_bytes": onnx_path.stat().st_size if onnx_path is not None and onnx_path.is_file() else None,
        "architecture": {k: cfg.get(k) for k in ("model_type", "source_architecture", "num_layers", "hidden_size",
                                                 "num_attention_heads", "num_kv_heads", "head_dim", "vocab_size",
                                                 "context_length")},
        "parameters": manifest.get("num_parameters"),
        "dtype": cfg.get("dtype"),
        "quantization": manifest.get("quantization"),
        "source": manifest.get("source"),
        "metrics": manifest.get("metrics") or {},
        "chat_template": bool(tok.get("chat_template")),
        "generation_defaults": {k: v for k, v in gen.items()
                                if k in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                                         "max_new_tokens")},
        "checksums": checksums,
    }


def _source(manifest: dict[str, Any]) -> str | None:
    """Where the model came from, without the build machine's paths: a hub id as given, a local file or folder
    by its name, a recipe build by its recipe."""
    recipe = (manifest.get("build") or {}).get("recipe")
    if recipe:
        return f"built by the recipe {Path(recipe).name}"
    source = manifest.get("source") or {}
    src = source.get("model")
    if not src:
        return None
    if re.fullmatch(r"[\w.-]+/[\w.-]+", src) and not src.startswith("."):
        return src  # org/name as passed to `edgelm export`
    return f"{Path(src).name} (a local {'GGUF file' if source.get('gguf') else 'folder'})"


def _quality(metrics: dict[str, Any]) -> str | None:
    bpb = metrics.get("quantized_bits_per_byte", metrics.get("fp32_bits_per_byte"))
    if not isinstance(bpb, (int, float)):
        return None
    line = f"{bpb:.3f} bits/byte"
    if metrics.get("eval_text"):
        line += f" on {Path(str(metrics['eval_text'])).name}"
    if "quantized_bits_per_byte" in metrics and isinstance(metrics.get("fp32_bits_per_byte"), (int, float)):
        line += f" (fp32 {metrics['fp32_bits_per_byte']:.3f})"
    return line


def summary_lines(info: dict[str, Any], manifest: dict[str, Any]) -> list[str]:
    """The short human summary: one line per topic, no nested dumps."""
    a = info["architecture"]
    method = (info["quantization"] or {}).get("method")
    rows = [
        ("model", info["path"]),
        ("architecture", f"{a['model_type']} ({a['source_architecture']}): {a['num_layers']} layers, hidden "
                         f"{a['hidden_size']}, {a['num_attention_heads']} heads / {a['num_kv_heads']} KV heads of "
                         f"{a['head_dim']}, vocab {a['vocab_size']}, context {a['context_length']}"
         if a["model_type"] else "unreadable (config.json is damaged or missing)"),
        ("parameters", f"{info['parameters']:,}" if info["parameters"] else None),
        ("weights", f"{info['dtype']}{f' ({method})' if method and method != info['dtype'] else ''}, "
                    f"{_size(info['size_bytes'])} on disk"),
        ("quality", _quality(info["metrics"])),
        ("source", _source(manifest)),
        ("chat", "chat template" if info["chat_template"] else
         "no chat template: `edgelm chat` continues the text rather than answering"),
        ("defaults", ", ".join(f"{k}={v}" for k, v in info["generation_defaults"].items()) or None),
        ("checksums", f"OK ({info['checksums']['files']} files)" if info["checksums"]["ok"] else
         f"FAILED (of {info['checksums']['files']} files listed; the first that does not match:)"),
    ]
    lines = [f"{k:<13}{v}" for k, v in rows if v is not None]
    if not info["checksums"]["ok"]:
        lines.append(f"  {info['checksums']['error']}")
    lines.append("(--card: the model card; --json: every field)")
    return lines


def run(args: argparse.Namespace) -> int:
    from edgelm.commands.generate import model_argument
    from edgelm.folder import MANIFEST, read_json
    from edgelm.model import resolve_model_path

    path = resolve_model_path(model_argument(args))
    info = summary(path)
    if args.json:
        print(json.dumps(info, indent=2))
    elif args.card:
        card = Path(info["path"]) / "README.md"
        if not card.is_file():
            print(f"edgelm info: {info['path']} has no model card (README.md)", file=sys.stderr)
            return 1
        print(card.read_text(encoding="utf-8", errors="replace").rstrip("\n"))
    else:
        print("\n".join(summary_lines(info, read_json(Path(info["path"]) / MANIFEST))))
    if not info["checksums"]["ok"]:
        print(f"edgelm info: checksum mismatch: {info['checksums']['error']}", file=sys.stderr)
        return 1
    return 0
