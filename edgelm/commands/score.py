"""`edgelm score FILE...`: how well a model predicts a text -- perplexity, bits per byte, nats per token.

The same numbers as ``Model.score`` (windows of the context with a stride of half of it, every token after the
first scored once) and as the exporter's quality gate, so a user can check a model folder on their own text, or
compare two exports of one model (one run each, e.g. `edgelm score notes.txt -m out/int8` and `-m out/int4`).
"""
from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from edgelm.commands.generate import add_threads_argument

    parser.add_argument("files", nargs="+", metavar="FILE", help="UTF-8 text files to score ('-' reads stdin)")
    parser.add_argument("--model", "-m", metavar="DIR", default=None,
                        help="model folder or name (default: $EDGELM_MODEL, else the shipped default model)")
    add_threads_argument(parser)
    parser.add_argument("--no-verify", action="store_true", help="skip the checksum check of the model files")
    parser.add_argument("--json", action="store_true", help="one JSON object per file instead of a line")
    parser.epilog = "lower is better for all three numbers; bits per byte compares models with different tokenizers"


def _read(name: str) -> str:
    from pathlib import Path

    from edgelm.commands.generate import decode_input
    from edgelm.errors import InvalidArgumentError

    if name == "-":
        return decode_input(sys.stdin.buffer.read())
    path = Path(name).expanduser()
    if not path.is_file():
        raise InvalidArgumentError(f"No file at {path}.", hint="Pass a text file, or - to read stdin.")
    return decode_input(path.read_bytes(), where=str(path))


def run(args: argparse.Namespace) -> int:
    import edgelm

    texts = [(name, _read(name)) for name in args.files]  # every file is read (and checked) before the model loads
    lm = edgelm.load(args.model, threads=args.threads, verify=not args.no_verify)
    for name, text in texts:
        s = lm.score(text)
        if args.json:
            print(json.dumps({"file": name, "model": str(lm.path), "tokens": s.num_tokens, "bytes": s.num_bytes,
                              "perplexity": s.perplexity, "bits_per_byte": s.bits_per_byte,
                              "nats_per_token": s.nats_per_token, "total_logprob": s.total_logprob}))
        else:
            print(f"{name}: perplexity {s.perplexity:.3f}, {s.bits_per_byte:.4f} bits/byte, {s.nats_per_token:.4f} "
                  f"nats/token ({s.num_tokens:,} tokens scored, {s.num_bytes:,} bytes)")
    return 0
