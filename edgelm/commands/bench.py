"""``edgelm bench [MODEL]``: load time, time to first token, prefill/decode tokens per second, peak memory.

Threads and spin-waiting default to what ``edgelm generate`` (``edgelm.load``) would choose for the model, so
the numbers are the ones a plain ``generate`` gets."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from edgelm.commands.generate import add_model_arguments, add_threads_argument

    add_model_arguments(parser)
    parser.add_argument("--prompt-tokens", type=int, default=128, help="prompt length in tokens (default 128)")
    parser.add_argument("--new-tokens", type=int, default=128,
                        help="tokens to generate per run; EOS is ignored so every run makes exactly this many "
                             "(default 128)")
    add_threads_argument(parser)  # the same default as generate: bench measures what generate would run
    parser.add_argument("--spin", action=argparse.BooleanOptionalAction, default=None,
                        help="onnxruntime workers spin-wait (faster on idle cores, much slower on busy ones); "
                             "default: decided from the idle cores when the model loads, or $EDGELM_SPIN")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs after one warm-up (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before the timed ones (default 1)")
    parser.add_argument("--json", metavar="FILE", default=None,
                        help="also write the results as JSON to FILE ('-' for standard output only)")
    parser.add_argument("--plot", metavar="FILE.png", default=None,
                        help="also write a PNG plot (needs matplotlib, the [bench] extra)")
    parser.add_argument("--no-verify", action="store_true", help="skip the checksum check when loading")


def run(args: argparse.Namespace) -> int:
    from edgelm.bench import format_table, plot_result, run_bench
    from edgelm.commands.generate import model_argument
    from edgelm.errors import InvalidArgumentError

    if args.plot:  # fail before minutes of benchmarking, not after
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            from edgelm.cli import install_hint
            raise InvalidArgumentError("--plot needs matplotlib, which is not installed.",
                                       hint=f"{install_hint('bench')}; or drop --plot.")
    result = run_bench(model_argument(args), prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                       threads=args.threads, repeat=args.repeat, warmup=args.warmup, verify=not args.no_verify,
                       spin=args.spin)
    if args.json == "-":
        print(result.to_json())
    else:
        print(format_table(result))
        if args.json:
            Path(args.json).write_text(result.to_json() + "\n", encoding="utf-8")
            print(f"\nwrote {args.json}", file=sys.stderr)
    if args.plot:
        print(f"wrote {plot_result(result, args.plot)}", file=sys.stderr)
    return 0
