"""`edgelm list`: the models in edgelm's cache (those loaded by name, ``--model org/name``), with size and source."""
from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object per model instead of a table")
    parser.epilog = "models get here by name: edgelm generate --model org/name ... (see docs/runtime.md)"


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def run(args: argparse.Namespace) -> int:
    from edgelm.hub import cached_models, models_dir

    models = cached_models()
    if args.json:
        for m in models:
            print(json.dumps({"name": m.name, "path": str(m.path), "bytes": m.bytes, "source": m.source,
                              "revision": m.revision, "quantization": m.quantization}))
        return 0
    if not models:
        print(f"no models in edgelm's cache ({models_dir()}); load one by name to add it, e.g. "
              "edgelm generate --model org/name \"Hello\"")
        return 0
    rows = [(m.name, _megabytes(m.bytes), m.describe()) for m in models]
    widths = [max(len(r[i]) for r in rows + [("NAME", "SIZE", "SOURCE")]) for i in range(2)]
    print(f"{'NAME':<{widths[0]}}  {'SIZE':>{widths[1]}}  SOURCE")
    for name, size, source in rows:
        print(f"{name:<{widths[0]}}  {size:>{widths[1]}}  {source}")
    print(f"({len(models)} in {models_dir()}; delete a folder there to remove it)")
    return 0
