"""`edgelm chat`: an interactive chat with history. `/reset` forgets the conversation, `/exit` (or EOF) quits.

Reads from stdin, so it also works piped (`printf 'Hi\n' | edgelm chat`). Ctrl-C while the model answers stops
that answer and returns to the prompt; Ctrl-C at the prompt quits.
"""
from __future__ import annotations

import argparse
import sys

from edgelm.commands.generate import (add_sampling_arguments, cli_context_error, decode_input, load_model,
                                     print_source, sampling_kwargs, stats_line)

HELP = "commands: /reset (forget the conversation), /exit (quit), /help"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_sampling_arguments(parser)
    parser.add_argument("--system", default=None, metavar="TEXT", help="a system message to start the conversation")
    parser.add_argument("--stats", action="store_true", help="print token counts and speed after each answer")
    parser.epilog = HELP


def _read(prompt: str, interactive: bool) -> str | None:
    """One line of input, or None at end of input."""
    if interactive:
        try:
            return input(prompt)
        except EOFError:
            return None
    line = sys.stdin.buffer.readline()
    return None if not line else decode_input(line).rstrip("\r\n")


def fit_history(lm, messages: list[dict], max_new_tokens: int | None) -> tuple[list[dict], int]:
    """:func:`edgelm.model.fit_messages` (oldest exchanges first, then the start of the newest message; the
    template and system message are never cut), with its error in the command line's words."""
    from edgelm.errors import ContextLengthError
    from edgelm.model import fit_messages

    try:
        return fit_messages(getattr(lm, "local", lm), messages, max_new_tokens, lm.apply_chat_template)
    except ContextLengthError as exc:
        system = bool(messages) and messages[0].get("role") == "system"
        what = "the chat template and --system message" if system else "the chat template"
        raise ContextLengthError(
            f"{what} take {exc.prompt_tokens} tokens and --max-new-tokens is {exc.max_new_tokens}: no room for your "
            f"message in the model's context of {exc.context_length} tokens.",
            hint="Lower --max-new-tokens (-n)" + (" or shorten --system." if system else "."),
            prompt_tokens=exc.prompt_tokens, max_new_tokens=exc.max_new_tokens,
            context_length=exc.context_length) from None


def no_template_note(lm) -> str | None:
    """One line for a model without a chat template (a base / story model): it continues the transcript rather
    than answering, and nothing else would tell the user why the replies read like stories."""
    local = getattr(lm, "local", lm)  # a Hybrid's local model
    if not local.chat_template.is_fallback:
        return None
    return (f"edgelm chat: note: {local.path.name} has no chat template, so it continues the conversation as "
            f"text instead of answering; for an assistant use an instruct model, e.g. "
            f"--model HuggingFaceTB/SmolLM2-135M-Instruct (docs/models.md)")


def run(args: argparse.Namespace) -> int:
    from edgelm.errors import ContextLengthError

    lm = load_model(args)
    kwargs = sampling_kwargs(args)
    interactive = sys.stdin.isatty()
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    if interactive:
        print(f"edgelm chat with {lm.path.name}. {HELP}", file=sys.stderr)
    # with --route cloud every answer comes from the cloud's chat endpoint: the local template does not matter
    note = None if getattr(args, "route", None) == "cloud" else no_template_note(lm)
    if note:
        print(note, file=sys.stderr)
    while True:
        try:
            line = _read("> ", interactive)
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return 0
        if line is None:
            if interactive:
                print(file=sys.stderr)
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            history = history[:1] if history and history[0]["role"] == "system" else []
            print("(conversation cleared)", file=sys.stderr)
            continue
        if text == "/help":
            print(HELP, file=sys.stderr)
            continue
        history.append({"role": "user", "content": line})
        # Raises ContextLengthError (in the command line's words) only when no message could ever fit: the
        # template and system message, or --max-new-tokens, fill the context.
        history, dropped = fit_history(lm, history, kwargs["max_new_tokens"])
        if dropped:
            print(f"edgelm chat: note: your message does not fit the model's context of {lm.context_length} tokens "
                  f"with room for the answer: its first {dropped} tokens were dropped", file=sys.stderr)
        try:
            stream = lm.chat_stream(history, **kwargs)
        except ContextLengthError as exc:
            raise cli_context_error(exc) from None
        parts: list[str] = []
        try:
            for piece in stream:
                parts.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            stream.close()
            sys.stdout.write(" [interrupted]")
        sys.stdout.write("\n")
        sys.stdout.flush()
        history.append({"role": "assistant", "content": "".join(parts).strip()})
        if args.stats and stream.generation is not None:
            print(stats_line(stream.generation), file=sys.stderr)
        print_source(stream)
