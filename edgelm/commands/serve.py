"""`edgelm serve [MODEL | --model MODEL]`: serve a model over an OpenAI-compatible HTTP API (the [server] extra)."""
from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys


def _server_module():
    """``edgelm.server``, or exit with one line naming the [server] extra when starlette or uvicorn is missing
    (also for ``--help``: the options' defaults come from the server module)."""
    from edgelm.cli import missing_extra_message, require

    try:
        require("starlette")
        require("uvicorn")
        from edgelm import server
    except ModuleNotFoundError as exc:
        line = missing_extra_message(exc.name or "")
        if line is None:
            raise
        raise SystemExit(f"edgelm serve: error: {line}") from None
    return server


def _names(value: str) -> list[str]:
    """A comma-separated flag value -> its non-empty items."""
    return [item.strip() for item in value.split(",") if item.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    server = _server_module()

    parser.add_argument("model", nargs="?", default=None,
                        help="model folder to serve (default: the shipped default model); or use --model")
    parser.add_argument("--model", "-m", dest="model_option", default=None, metavar="MODEL",
                        help="the same as the positional MODEL, like generate and chat take it")
    parser.add_argument("--host", default=server.DEFAULT_HOST,
                        help="address to listen on (default: %(default)s, this machine only; use 0.0.0.0 to "
                             "accept other machines, ideally with --api-key)")
    parser.add_argument("--port", type=int, default=server.DEFAULT_PORT,
                        help="port to listen on, 0 picks a free one (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=server.DEFAULT_WORKERS,
                        help="generation threads sharing the model (default: %(default)s)")
    parser.add_argument("--max-queue", type=int, default=server.DEFAULT_MAX_QUEUE,
                        help="requests that may wait for a worker before the server answers 503 "
                             "(default: %(default)s)")
    parser.add_argument("--max-body-bytes", type=int, default=server.DEFAULT_MAX_BODY_BYTES,
                        help="largest accepted request body in bytes (default: %(default)s)")
    limits = parser.add_argument_group("limits (docs/server.md); the defaults suit a local server")
    limits.add_argument("--allowed-hosts", type=_names, action="extend", default=[], metavar="NAMES",
                        help="host names clients may use in the Host header besides localhost, IP addresses and "
                             "--host (comma-separated, repeatable; '*' turns the check off). Guards against DNS "
                             "rebinding")
    limits.add_argument("--cors-origins", type=_names, action="extend", default=[], metavar="ORIGINS",
                        help="web origins (e.g. http://localhost:3000) whose pages may call the server "
                             "(comma-separated, repeatable; '*' any). Default: none, every request carrying "
                             "another Origin gets 403")
    limits.add_argument("--chars-per-token", type=int, default=server.DEFAULT_CHARS_PER_TOKEN, metavar="N",
                        help="a prompt longer than the context times N characters is refused before it is "
                             "tokenized (default: %(default)s, or the longest token of the vocabulary if less)")
    limits.add_argument("--max-connections", type=int, default=server.DEFAULT_MAX_CONNECTIONS, metavar="N",
                        help="open connections at most; more get 503 (default: %(default)s)")
    for name, default, what in (
            ("header", server.DEFAULT_HEADER_TIMEOUT, "a request head must arrive within, from connecting or from "
                                                      "the previous response"),
            ("body", server.DEFAULT_BODY_TIMEOUT, "a request body must arrive within (408 after)"),
            ("keep-alive", server.DEFAULT_KEEP_ALIVE_TIMEOUT, "an idle connection is closed after"),
            ("send", server.DEFAULT_SEND_TIMEOUT, "a client that stops reading a response is dropped after")):
        limits.add_argument(f"--{name}-timeout", type=float, default=default, metavar="S",
                            help=f"seconds {what} (default: %(default)g)")
    parser.add_argument("--api-key", default=None,
                        help=f"require 'Authorization: Bearer KEY' on /v1/* (default: ${server.API_KEY_ENV} when "
                             f"set; prefer the environment variable, command lines are visible to other users)")
    parser.add_argument("--threads", type=int, default=None,
                        help="onnxruntime intra-op threads per generation (default: the runtime's choice)")
    parser.add_argument("--spin", action=argparse.BooleanOptionalAction, default=None,
                        help="onnxruntime workers spin-wait (faster on idle cores, much slower on busy ones); "
                             "default: decided from the idle cores when the model loads, or $EDGELM_SPIN")
    parser.add_argument("--lookup", action=argparse.BooleanOptionalAction, default=server.DEFAULT_LOOKUP,
                        help="prompt-lookup decoding for greedy requests (docs/lookup.md; default: on for models where "
                             "it gives exactly plain greedy's tokens -- fp32, int4-fp32 -- off for int8)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="server log level (default: %(default)s)")


def server_spin(workers: int, spin: bool | None) -> bool | None:
    """``--spin/--no-spin`` if given; else no spinning with several workers (parallel generations already keep
    the cores busy, and spinning pools then steal time from each other: up to 5x slower decode measured under
    load, docs/performance.md); else None, the runtime's default (idle cores when the model loads)."""
    if spin is not None:
        return spin
    return False if workers > 1 else None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    import edgelm
    from edgelm import server
    from edgelm.errors import InvalidArgumentError

    for name in ("workers", "max_queue", "max_body_bytes", "chars_per_token", "max_connections"):
        value = getattr(args, name)
        if value < 1:
            raise InvalidArgumentError(f"--{name.replace('_', '-')} must be at least 1, got {value}.")
    for name in ("header_timeout", "body_timeout", "keep_alive_timeout", "send_timeout"):
        value = getattr(args, name)
        if not value > 0 or value == float("inf"):
            raise InvalidArgumentError(f"--{name.replace('_', '-')} must be a positive number of seconds, got "
                                       f"{value}.")
    if args.model and args.model_option and args.model != args.model_option:
        raise InvalidArgumentError(f"two models given ({args.model!r} and --model {args.model_option!r}); "
                                   f"edgelm serve serves one. Give it once.")
    model_path = args.model_option or args.model
    if not 0 <= args.port <= 65535:
        raise InvalidArgumentError(f"--port must be in 0..65535, got {args.port}.")
    api_key = args.api_key or os.environ.get(server.API_KEY_ENV) or None

    level = getattr(logging, args.log_level.upper())
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("edgelm").setLevel(level)
    if not _is_loopback(args.host) and api_key is None:
        print(f"edgelm serve: warning: listening on {args.host} without an API key; anyone who can reach this "
              f"machine can use the model. Set ${server.API_KEY_ENV} or --api-key.", file=sys.stderr)

    model = edgelm.load(model_path, threads=args.threads, spin=server_spin(args.workers, args.spin))
    server.serve(model, host=args.host, port=args.port, workers=args.workers, api_key=api_key,
                 max_queue=args.max_queue, max_body_bytes=args.max_body_bytes, log_level=args.log_level,
                 lookup=args.lookup, allowed_hosts=args.allowed_hosts, cors_origins=args.cors_origins,
                 chars_per_token=args.chars_per_token, max_connections=args.max_connections,
                 header_timeout=args.header_timeout, body_timeout=args.body_timeout,
                 keep_alive_timeout=args.keep_alive_timeout, send_timeout=args.send_timeout)
    print("edgelm serve: stopped", file=sys.stderr)
    return 0
