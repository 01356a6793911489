"""The ``edgelm`` command line: one subcommand per verb, each with its own ``add_arguments`` and ``run``.

Each entry in ``COMMANDS`` names a module that defines ``add_arguments(parser)`` and ``run(args) -> int``, or
``module:ATTR`` for an object with those two (a module that serves several verbs, like ``edgelm_export.commands``).
Modules are imported only when their subcommand is used, and the build-side modules (``edgelm_export.*``) import
torch only inside ``run``, so ``edgelm generate`` never pays for torch.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys

# name -> (module, one-line help). Order is the order shown by `edgelm --help`.
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("edgelm.commands.generate", "generate text from a prompt (streams to the terminal)"),
    "chat": ("edgelm.commands.chat", "interactive chat with history"),
    "info": ("edgelm.commands.info", "show a model folder's card, metrics and checksum status"),
    "serve": ("edgelm.commands.serve", "serve a model over an OpenAI-compatible HTTP API"),
    "score": ("edgelm.commands.score", "perplexity and bits per byte of a text under a model"),
    "bench": ("edgelm.commands.bench", "measure load time, time to first token, tokens/s and memory"),
    "list": ("edgelm.commands.list", "list the models in edgelm's cache (loaded by name: --model org/name)"),
    "export": ("edgelm_export.commands:EXPORT",
               "export a Hugging Face causal LM or a GGUF file to an ONNX model folder (int8 by default) [export]"),
    "train-tokenizer": ("edgelm_export.commands:TRAIN_TOKENIZER",
                        "train a byte-level BPE tokenizer on a corpus [export]"),
    "train": ("edgelm_export.commands:TRAIN", "train a Llama-architecture model from scratch [export]"),
    "distill": ("edgelm_export.commands:DISTILL", "distil a teacher causal LM into a smaller student [export]"),
    "build-recipe": ("edgelm_export.commands:BUILD_RECIPE",
                     "run a whole build recipe (tokenizer, teacher, student, export) [export]"),
}


# extra -> the modules it brings that edgelm imports. A ModuleNotFoundError for one of them, at import or while a
# command runs, becomes one line naming the extra and how to install it (see missing_extra_message).
EXTRAS: dict[str, tuple[str, ...]] = {
    "export": ("torch", "transformers", "onnx", "gguf", "safetensors", "sentencepiece", "tqdm", "tomli"),
    "server": ("starlette", "uvicorn"),
    "cloud": ("httpx",),
    "bench": ("matplotlib", "psutil"),
}


def extra_for(module: str) -> str | None:
    """The extra that installs ``module`` (a dotted name; its top-level package decides), or None."""
    top = module.split(".")[0]
    return next((extra for extra, mods in EXTRAS.items() if top in mods), None)


def install_hint(extra: str) -> str:
    """How to install an extra, in both forms: from a package index and from a source checkout."""
    hint = f'Install it with: pip install "edgelm[{extra}]" (in a source checkout: pip install ".[{extra}]")'
    if extra == "export":  # torch from the default index is the CUDA build, gigabytes a CPU-only machine never uses
        hint += ("; on a CPU-only machine get torch first: "
                 "pip install torch --index-url https://download.pytorch.org/whl/cpu")
    return hint


def require(module: str) -> None:
    """Raise ModuleNotFoundError (which main() turns into the install line) unless ``module`` can be imported.
    For checks before any work or output, where the import itself would only come later."""
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        raise ModuleNotFoundError(f"No module named {module!r}", name=module)


def missing_extra_message(module: str) -> str | None:
    """One line for a missing module that an extra provides; None for anything else (a real bug)."""
    extra = extra_for(module)
    if extra is None:
        return None
    return (f"this command needs {module.split('.')[0]}, which is not installed; it comes with the [{extra}] "
            f"extra. {install_hint(extra)}")


def _load(spec: str):
    """``module`` or ``module:ATTR`` -> the object with ``add_arguments`` and ``run``."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:  # the [export]/[server] extra is missing
        missing = exc.name or str(exc)
        line = missing_extra_message(missing) or f"this command needs the package {missing!r}, which is not installed."
        raise SystemExit(f"edgelm: {line}")
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
        if name == chosen:  # main() reports an unknown option with this command's own usage
            parser.set_defaults(**{f"_parser_{name}": p})
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


def _quiet_progress() -> None:
    """``--no-progress``: also silence the bars of transformers / huggingface_hub ("Loading weights", downloads).
    They read HF_HUB_DISABLE_PROGRESS_BARS when imported; one already imported is switched off directly."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].utils.disable_progress_bars()


def _closed_stdout() -> int:
    """The reader went away (``edgelm info | head``): stop quietly, as a command killed by SIGPIPE would.
    stdout is pointed at /dev/null so the interpreter's final flush does not fail a second time."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a real file (tests capturing it): nothing to flush into
        pass
    return 141  # 128 + SIGPIPE, what a shell reports for a writer killed by a closed pipe


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # said by the command's own parser, so the usage line shown is that command's (exits 2)
        getattr(args, f"_parser_{args.command}", parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0 if args.command is None else 2
    if getattr(args, "no_progress", False):
        _quiet_progress()
    from edgelm.errors import EdgeLMError
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return _closed_stdout()
    except EdgeLMError as exc:
        if args.debug:
            raise
        print(f"edgelm {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as exc:  # an extra's module imported while the command runs
        line = missing_extra_message(exc.name or "")
        if args.debug or line is None:
            raise
        print(f"edgelm {args.command}: error: {line}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        if args.debug:
            raise
        print(f"edgelm {args.command}: error: {exc} (run with --debug for a traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
