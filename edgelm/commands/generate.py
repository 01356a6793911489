"""`edgelm generate PROMPT`: stream a continuation to stdout, a one-line summary to stderr."""
from __future__ import annotations

import argparse
import sys


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by `generate` and `chat` (None = the model's generation_config.json default)."""
    parser.add_argument("--model", "-m", metavar="DIR", default=None,
                        help="model folder (default: $EDGELM_MODEL, else the shipped default model)")
    parser.add_argument("--max-new-tokens", "-n", type=int, default=None, metavar="N",
                        help="most tokens to generate (default: the model's generation_config, else 128)")
    parser.add_argument("--temperature", "-t", type=float, default=None, help="0 = greedy; higher = more random")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1]")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the K best tokens (0 = off)")
    parser.add_argument("--min-p", type=float, default=None, help="drop tokens below this fraction of the best")
    parser.add_argument("--repetition-penalty", type=float, default=None, help="> 1 discourages repeats")
    parser.add_argument("--seed", type=int, default=None, help="random seed, for reproducible sampling")
    parser.add_argument("--lookup", action="store_true",
                        help="prompt lookup: verify tokens copied from the prompt several per model call (greedy "
                             "only, -t 0; ignored when sampling). Faster when the answer repeats its input")
    # One value per flag: with nargs="+" a `--stop .` before the prompt would swallow the prompt as a second stop.
    parser.add_argument("--stop", action="append", default=None, metavar="TEXT",
                        help="stop before this text; repeat the flag for several (--stop . --stop '\\n'); "
                             "escapes like \\n are understood")
    add_threads_argument(parser)
    parser.add_argument("--spin", action=argparse.BooleanOptionalAction, default=None,
                        help="onnxruntime workers spin-wait (faster on idle cores, much slower on busy ones); "
                             "default: decided from the idle cores when the model loads, or $EDGELM_SPIN")
    parser.add_argument("--no-verify", action="store_true", help="skip the checksum check of the model files")
    from edgelm.hybrid import add_cli_arguments   # --cloud-url / --cloud-model / --route (no httpx until used)
    add_cli_arguments(parser)


THREADS_HELP = ("onnxruntime threads (default: 1 for a model under 64 MiB of weights, where a second thread costs "
                "more than it saves; else one per physical core)")


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    """--threads with the runtime's default (edgelm.load's), shared by generate, chat and bench."""
    parser.add_argument("--threads", type=int, default=None, metavar="N", help=THREADS_HELP)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """MODEL for commands that take it as a positional (``edgelm info MODEL``), plus ``--model/-m`` as generate and
    chat take it; :func:`model_argument` reads the one given."""
    help_text = "model folder or name (default: $EDGELM_MODEL, else the shipped default model)"
    parser.add_argument("model", nargs="?", default=None, metavar="MODEL", help=help_text)
    parser.add_argument("--model", "-m", dest="model_option", default=None, metavar="MODEL",
                        help="the same as MODEL, for symmetry with generate and chat")


def model_argument(args: argparse.Namespace) -> str | None:
    """The model named by MODEL or --model (InvalidArgumentError when both name different ones)."""
    positional, option = args.model, args.model_option
    if positional is not None and option is not None and positional != option:
        from edgelm.errors import InvalidArgumentError
        raise InvalidArgumentError(f"two models given: {positional!r} and --model {option!r}.",
                                   hint="Name the model once, as MODEL or with --model.")
    return option if option is not None else positional


def cli_context_error(exc):
    """The runtime's ContextLengthError in the command line's words (--truncate-left, not truncate='left')."""
    from edgelm.errors import ContextLengthError
    room = exc.max_new_tokens < exc.context_length
    p, n, ctx = exc.prompt_tokens, exc.max_new_tokens, exc.context_length
    if not exc.max_new_tokens_given:  # -n not given: the prompt alone fills the context
        return ContextLengthError(f"The prompt has {p} tokens and the model's context holds {ctx}: no room for "
                                  "an answer.", hint="Shorten the prompt, or pass --truncate-left to drop its start.",
                                  prompt_tokens=p, max_new_tokens=n, context_length=ctx, max_new_tokens_given=False)
    hint = "Shorten the prompt, lower --max-new-tokens (-n)" + (
        ", or pass --truncate-left to drop the start of the prompt." if room else ".")
    return ContextLengthError(f"The prompt has {p} tokens and --max-new-tokens is {n}: {p + n} > the model's "
                              f"context of {ctx} tokens.", hint=hint, prompt_tokens=p, max_new_tokens=n,
                              context_length=ctx)


def unescape(text: str) -> str:
    """Turn the two-character sequences \\n, \\t and \\\\ typed on a command line into the characters."""
    return text.replace("\\\\", "\0").replace("\\n", "\n").replace("\\t", "\t").replace("\0", "\\")


def sampling_kwargs(args: argparse.Namespace) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                stop=[unescape(s) for s in args.stop] if args.stop else None, lookup=args.lookup)


def load_model(args: argparse.Namespace):
    import edgelm

    from edgelm.hybrid import from_cli_args
    if getattr(args, "cloud_url", None) and getattr(args, "route", "auto") != "local":
        from edgelm.cli import require
        require("httpx")  # the hand-off could never happen: say so now, not after the local answer
    return from_cli_args(edgelm.load(args.model, threads=args.threads, spin=args.spin,
                                     verify=not args.no_verify), args)


def stats_line(gen) -> str:
    ttft_ms = gen.time_to_first_token_s * 1000
    first = f"{ttft_ms:.0f} ms" if ttft_ms >= 10 else f"{ttft_ms:.1f} ms"
    # a decode speed needs at least two tokens: the first one comes from the prefill
    speed = f"{gen.decode_tokens_per_s:.1f} tokens/s" if gen.completion_tokens > 1 else "no decode steps"
    return (f"[{gen.prompt_tokens} prompt + {gen.completion_tokens} generated tokens, first token {first}, {speed}, "
            f"finish: {gen.finish_reason}{_lookup_stats(gen)}]")


def _lookup_stats(gen) -> str:
    drafted = getattr(gen, "drafted_tokens", 0)
    return f", lookup: {gen.accepted_tokens}/{drafted} drafts accepted" if drafted else ""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", metavar="PROMPT", help="text to continue ('-' reads it from stdin)")
    add_sampling_arguments(parser)
    parser.add_argument("--truncate-left", action="store_true",
                        help="drop the start of a prompt that does not fit instead of failing")
    parser.add_argument("--no-echo", action="store_true", help="print only the generated text, not the prompt")
    parser.add_argument("--quiet", "-q", action="store_true", help="no statistics line on stderr")
    parser.epilog = 'example: edgelm generate "Once upon a time" -n 60 (the shipped model; --model DIR for another)'


def decode_input(data: bytes, where: str = "stdin") -> str:
    """Bytes read from ``where`` as UTF-8 text, or an InvalidArgumentError saying where the first bad byte is."""
    from edgelm.errors import InvalidArgumentError
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidArgumentError(f"The text on {where} is not UTF-8: byte 0x{data[exc.start]:02x} at offset "
                                   f"{exc.start}.", hint="Convert it to UTF-8 first (e.g. `iconv -f latin1 -t utf-8`)."
                                   ) from None


def run(args: argparse.Namespace) -> int:
    prompt = decode_input(sys.stdin.buffer.read()) if args.prompt == "-" else args.prompt
    from edgelm.errors import ContextLengthError

    lm = load_model(args)
    # stream() checks every argument before generating, so a bad option fails before any output.
    try:
        stream = lm.stream(prompt, truncate="left" if args.truncate_left else None, **sampling_kwargs(args))
    except ContextLengthError as exc:
        raise cli_context_error(exc) from None
    out = sys.stdout
    if not args.no_echo:
        out.write(prompt)
        out.flush()
    first = True
    for piece in stream:
        if first and not args.no_echo and getattr(stream, "cloud_endpoint", None) == "chat":
            out.write("\n")  # the cloud's chat endpoint replies to the prompt rather than continuing it
        first = False
        out.write(piece)
        out.flush()
    out.write("\n")
    out.flush()
    gen = stream.generation
    if not args.quiet and gen is not None:
        print(stats_line(gen), file=sys.stderr)
    local = getattr(lm, "local", lm)
    if gen is not None and not gen.text.strip() and gen.finish_reason == "eos" \
            and not local.chat_template.is_fallback:
        print("edgelm generate: note: the model ended its text at once; it is a chat model, which answers "
              "questions given as chat messages: try `edgelm chat` (or Model.chat)", file=sys.stderr)
    print_source(stream)
    return 0


def print_source(stream) -> None:
    """With --cloud-url, say where the answer came from and why (nothing for a plain local model)."""
    from edgelm.hybrid import describe
    line = describe(stream)
    if line:
        print(line, file=sys.stderr)
