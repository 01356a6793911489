"""`edgelm info [MODEL]`: a model folder's summary: size, architecture, quantization, metrics, checksum status.

The folder is opened without trusting it: checksums are verified and reported (exit status 1 when a file does
not match), rather than refusing to show anything.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=None, metavar="MODEL",
                        help="model folder (default: $EDGELM_MODEL, else the shipped default model)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--card", action="store_true", help="also print the model card (README.md); the default model's card is always shown")


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"


def _flat(d: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(d, dict):
        out = []
        for k, v in d.items():
            out.extend(_flat(v, f"{prefix}{k}." if not isinstance(v, dict) or v else f"{prefix}{k}"))
        return out
    return [(prefix.rstrip("."), d)]


def summary(path: Path) -> dict[str, Any]:
    """Everything `edgelm info` shows, as a dict (also what --json prints)."""
    from edgelm.errors import ChecksumError, ModelFormatError
    from edgelm.folder import open_folder, verify_files

    folder = open_folder(path, verify=False)
    try:
        verify_files(folder.path, folder.manifest)
        checksums = {"ok": True, "files": len(folder.manifest.get("files", {})), "error": None}
    except (ChecksumError, ModelFormatError) as exc:
        checksums = {"ok": False, "files": len(folder.manifest.get("files", {})), "error": str(exc)}
    cfg = folder.config
    files = [p for p in folder.path.rglob("*") if p.is_file()]
    return {
        "path": str(folder.path),
        "size_bytes": sum(p.stat().st_size for p in files),
        "onnx_bytes": folder.onnx_path.stat().st_size if folder.onnx_path.is_file() else None,
        "architecture": {k: cfg.get(k) for k in ("model_type", "source_architecture", "num_layers", "hidden_size",
                                                 "num_attention_heads", "num_kv_heads", "head_dim", "vocab_size",
                                                 "context_length")},
        "parameters": folder.manifest.get("num_parameters"),
        "dtype": cfg.get("dtype"),
        "quantization": folder.manifest.get("quantization"),
        "source": folder.manifest.get("source"),
        "metrics": folder.manifest.get("metrics") or {},
        "chat_template": bool(folder.tokenizer_config.get("chat_template")),
        "generation_defaults": {k: v for k, v in folder.generation_config.items()
                                if k in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                                         "max_new_tokens")},
        "checksums": checksums,
    }


def run(args: argparse.Namespace) -> int:
    from edgelm.model import resolve_model_path

    info = summary(resolve_model_path(args.model))
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        a = info["architecture"]
        q = info["quantization"] or {}
        src = info["source"] or {}
        lines = [
            f"model       {info['path']}",
            f"size        {_size(info['size_bytes'])} on disk (model.onnx {_size(info['onnx_bytes'] or 0)})",
            f"architecture {a['model_type']} ({a['source_architecture']}): {a['num_layers']} layers, hidden "
            f"{a['hidden_size']}, {a['num_attention_heads']} heads / {a['num_kv_heads']} KV heads of "
            f"{a['head_dim']}, vocab {a['vocab_size']}, context {a['context_length']}",
        ]
        if info["parameters"]:
            lines.append(f"parameters  {info['parameters']:,}")
        qtext = ", ".join(f"{k}={v}" for k, v in _flat(q)) if q else "unknown"
        lines.append(f"weights     {info['dtype']} ({qtext})")
        if src:
            lines.append(f"source      {src.get('model') or src.get('path') or src}")
        lines.append(f"chat        {'chat template' if info['chat_template'] else 'plain fallback (no template)'}")
        if info["generation_defaults"]:
            lines.append("defaults    " + ", ".join(f"{k}={v}" for k, v in info["generation_defaults"].items()))
        metrics = _flat(info["metrics"])
        if metrics:
            lines.append("metrics")
            for k, v in metrics:
                lines.append(f"  {k:<28} {v:.4f}" if isinstance(v, float) else f"  {k:<28} {v}")
        c = info["checksums"]
        lines.append(f"checksums   {'OK' if c['ok'] else 'FAILED'} ({c['files']} files)")
        if not c["ok"]:
            lines.append(f"  {c['error']}")
        print("\n".join(lines))
    # With no MODEL, `edgelm info` is "tell me about the model I get by default": show its card too.
    if args.card or (args.model is None and not args.json):
        card = Path(info["path"]) / "README.md"
        if card.is_file():
            print()
            print(card.read_text(encoding="utf-8", errors="replace"))
    if not info["checksums"]["ok"]:
        print(f"edgelm info: checksum mismatch: {info['checksums']['error']}", file=sys.stderr)
        return 1
    return 0
