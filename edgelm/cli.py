"""The ``edgelm`` command line: one subcommand per verb, each with its own ``add_arguments`` and ``run``.

Each entry in ``COMMANDS`` names a module that defines ``add_arguments(parser)`` and ``run(args) -> int``, or
``module:ATTR`` for an object with those two (a module that serves several verbs, like ``edgelm_export.commands``).
Modules are imported only when their subcommand is used, and the build-side modules (``edgelm_export.*``) import
torch only inside ``run``, so ``edgelm generate`` never pays for torch.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Order is the order shown by `edgelm --help`.
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("edgelm.commands.generate", "generate text from a prompt (streams to the terminal)"),
    "chat": ("edgelm.commands.chat", "interactive chat with history"),
    "info": ("edgelm.commands.info", "show a model folder's card, metrics and checksum status"),
    "serve": ("edgelm.commands.serve", "serve a model over an OpenAI-compatible HTTP API"),
    "bench": ("edgelm.commands.bench", "measure load time, time to first token, tokens/s and memory"),
    "list": ("edgelm.commands.list", "list the models in edgelm's cache (loaded by name: --model org/name)"),
    "export": ("edgelm_export.commands:EXPORT", "export a Hugging Face causal LM to an int8 ONNX model folder [export]"),
    "train-tokenizer": ("edgelm_export.commands:TRAIN_TOKENIZER",
                        "train a byte-level BPE tokenizer on a corpus [export]"),
    "train": ("edgelm_export.commands:TRAIN", "train a Llama-architecture model from scratch [export]"),
    "distill": ("edgelm_export.commands:DISTILL", "distil a teacher causal LM into a smaller student [export]"),
    "build-recipe": ("edgelm_export.commands:BUILD_RECIPE",
                     "run a whole build recipe (tokenizer, teacher, student, export) [export]"),
}


def _load(spec: str):
    """``module`` or ``module:ATTR`` -> the object with ``add_arguments`` and ``run``."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:  # the [export]/[server] extra is missing
        missing = exc.name or str(exc)
        extra = "export" if module_name.startswith("edgelm_export") else (
            "server" if module_name.endswith("serve") else "bench" if module_name.endswith("bench") else None)
        hint = f' Install it with: pip install "edgelm[{extra}]"' if extra else ""
        raise SystemExit(f"edgelm: this command needs the package '{missing}', which is not installed.{hint}")
    return getattr(module, attr) if attr else module


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgelm",
        description="Small language models, offline, on CPUs and ARM boards.",
        epilog="Run 'edgelm COMMAND --help' for the options of one command.",
    )
    parser.add_argument("--debug", action="store_true", help="show a full traceback on errors")
    parser.add_argument("--version", action="version", version=f"edgelm {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # Only the chosen subcommand's module is imported; the others get a stub parser for --help listing.
    chosen = next((a for a in (argv or []) if a in COMMANDS), None)
    for name, (spec, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".")
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show a full traceback on errors")
        if name == chosen:
            command = _load(spec)
            command.add_arguments(p)
            p.set_defaults(_run=command.run)
    return parser


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("edgelm")
    except Exception:  # running from a source tree that is not installed
        return "0.1.0"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0 if args.command is None else 2
    from edgelm.errors import EdgeLMError
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except EdgeLMError as exc:
        if args.debug:
            raise
        print(f"edgelm {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        if args.debug:
            raise
        print(f"edgelm {args.command}: error: {exc} (run with --debug for a traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
