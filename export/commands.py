"""The command lines of the build side: ``edgelm export``, ``train-tokenizer``, ``train``, ``distill`` and
``build-recipe``.

Each verb is a :class:`Verb` (``add_arguments(parser)`` + ``run(args) -> int``) that ``edgelm/cli.py`` names as
``edgelm_export.commands:ATTR``. Flags, recipe defaults and printing live here; the work lives in the library
modules, which never import this one, so they form one acyclic stack::

    corpus <- tokenizer;  corpus <- train <- distill;  tokenizer, train, distill <- recipe;  all of them <- commands

Every training flag defaults to None, so :func:`resolve_options` can tell a flag that was given (it beats the
recipe) from one that was not (the recipe's value, else the library default, stands).
"""
from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from edgelm.errors import TrainingError
from edgelm_export.assemble import DEFAULT_MAX_CONTEXT as EXPORT_MAX_CONTEXT
from edgelm_export.assemble import chat_agreement_hint
from edgelm_export.convert import QUANTIZE_CHOICES as EXPORT_QUANTIZE_CHOICES
from edgelm_export.distill import distill, distill_defaults, sample_corpus
from edgelm_export.recipe import BUILD_STAGES, build_recipe, load_recipe, parse_set
from edgelm_export.tokenizer import DEFAULTS as TOKENIZER_DEFAULTS
from edgelm_export.tokenizer import train_tokenizer
from edgelm_export.train import PRESETS, config_defaults, config_from_options, train


@dataclass(frozen=True)
class Verb:
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def resolve_options(args: argparse.Namespace, section: str, defaults: dict[str, Any]) -> dict[str, Any]:
    """defaults <- recipe[section] <- command-line flags that were given (not None).

    Unknown keys in the recipe table are an error (a typo would otherwise be silently ignored).
    """
    opts = dict(defaults)
    recipe_path = getattr(args, "recipe", None)
    if recipe_path:
        recipe = load_recipe(recipe_path)
        section = getattr(args, "section", None) or section
        table = recipe.get(section)
        if table is None:
            raise TrainingError(f"Recipe {recipe_path} has no [{section}] table.",
                                hint=f"Add one, or pass --section NAME (tables: {', '.join(recipe)}).")
        unknown = sorted(set(table) - set(defaults))
        if unknown:
            raise TrainingError(f"Recipe table [{section}] has unknown keys: {', '.join(unknown)}.",
                                hint=f"Known keys: {', '.join(sorted(defaults))}.")
        opts.update(table)
    for key in defaults:
        value = getattr(args, key, None)
        if value is not None:
            opts[key] = value
    return opts


# (flag, type, help): "flag" is a store_true switch, "list" takes one or more values.
TRAIN_OPTIONS: list[tuple[str, Any, str]] = [
    ("--corpus", "list", "text / JSONL files or folders (or hf:NAME with network)"),
    ("--tokenizer", str, "folder with tokenizer.json"),
    ("--eval-text", str, "held-out text file (else --eval-fraction of the corpus)"),
    ("--eval-fraction", float, "fraction of documents held out when no --eval-text (default 0.01)"),
    ("--eval-max-tokens", int, "held-out tokens evaluated each time (default 65536)"),
    ("--layout", str, "keep | blank-line-paragraphs | single-newline (default keep)"),
    ("--separator", str, "document separator line in text files (default <|endoftext|>)"),
    ("--text-field", str, "JSONL field with the text (default text)"),
    ("--straight-quotes", "flag", "map curly quotes/dashes to ASCII"),
    ("--doc-join", str, "eos (BOS doc EOS) | text (one stream) (default eos)"),
    ("--block-size", int, "tokens per training block (default 256)"),
    ("--batch-size", int, "blocks per micro-batch (default 32)"),
    ("--grad-accum", int, "micro-batches per optimizer step (default 1)"),
    ("--max-steps", int, "optimizer steps (default 1000)"),
    ("--max-time-s", float, "wall-clock budget in seconds (stops cleanly, LR anneals to it)"),
    ("--lr", float, "peak learning rate (default 1e-3)"),
    ("--min-lr-ratio", float, "final LR as a fraction of the peak (default 0.1)"),
    ("--warmup-steps", int, "linear warmup steps (default 100)"),
    ("--weight-decay", float, "AdamW weight decay (default 0.1)"),
    ("--grad-clip", float, "gradient-norm clip, 0 = off (default 1.0)"),
    ("--dropout", float, "attention + residual dropout (default 0)"),
    ("--seed", int, "random seed (default 0)"),
    ("--eval-every", int, "evaluate every M steps (default 200)"),
    ("--save-every", int, "checkpoint every N steps (default 200)"),
    ("--log-every", int, "log every K steps (default 10)"),
    ("--device", str, "auto | cpu | cuda | cuda:N (default auto)"),
    ("--amp", str, "auto (bf16 on CUDA) | bf16 | fp16 | none"),
    ("--compile", "flag", "use torch.compile"),
    ("--num-threads", int, "torch CPU threads"),
    ("--no-progress", "flag", "no progress bar"),
    ("--resume", "flag", "continue from OUT/checkpoints"),
    ("--overwrite", "flag", "discard an earlier run in OUT"),
]

DISTILL_OPTIONS: list[tuple[str, Any, str]] = [
    ("--teacher", str, "teacher HF model folder (its tokenizer is the student's)"),
    ("--student-layers", int, "layer init: K evenly spaced teacher layers + embeddings/norm/head"),
    ("--student-config", str, "student config JSON or preset name (random init unless --init layers)"),
    ("--init", str, "random | layers (with --student-config)"),
    ("--alpha", float, "weight of the KD term; 1-alpha goes to cross-entropy (default 0.5)"),
    ("--temperature", float, "softmax temperature T for the KD term (default 2.0)"),
    ("--kl", str, "forward (KL(teacher||student), default) | reverse"),
    ("--hidden-weight", float, "weight of the hidden-state cosine loss (needs equal widths; default 0)"),
    ("--sample-tokens", int, "sequence-level KD: sample this many teacher tokens to --samples-out, no training"),
    ("--samples-out", str, "corpus file written by --sample-tokens"),
    ("--sample-batch-size", int, "sequences sampled in parallel (default 1024 on CUDA, 16 on CPU)"),
    ("--sample-temperature", float, "sampling temperature (default 1.0)"),
    ("--sample-top-p", float, "nucleus sampling p (default 0.95)"),
]


def add_options(parser: argparse.ArgumentParser, options: list[tuple[str, Any, str]]) -> None:
    for flag, kind, help_text in options:
        if kind == "flag":
            parser.add_argument(flag, action="store_true", default=None, help=help_text)
        elif kind == "list":
            parser.add_argument(flag, nargs="+", default=None, help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=None, help=help_text)


def _eval_summary(ev: dict[str, float]) -> str:
    return f"; held-out loss {ev['eval_loss']:.4f}, ppl {ev['eval_ppl']:.2f}, ~{ev['eval_bpb']:.4f} bits/byte"


# --- edgelm train-tokenizer ------------------------------------------------------------------------------
def _tokenizer_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", help="a TOML recipe; its [tokenizer] table gives defaults (flags override)")
    parser.add_argument("--corpus", nargs="+", help="text / JSONL files or folders")
    parser.add_argument("--vocab-size", type=int, help="vocabulary size including specials (default 4096)")
    parser.add_argument("--out", help="output folder")
    parser.add_argument("--min-frequency", type=int, help="minimum pair count for a merge (default 2)")
    parser.add_argument("--layout", choices=("keep", "blank-line-paragraphs", "single-newline"),
                        help="rewrite documents into this layout first (default keep)")
    parser.add_argument("--separator", help="document separator line in text files (default <|endoftext|>)")
    parser.add_argument("--text-field", help="JSONL field holding the text (default text)")
    parser.add_argument("--straight-quotes", action="store_true", default=None, help="map curly quotes to ASCII")
    parser.add_argument("--model-max-length", type=int, help="recorded in tokenizer_config.json (default 512)")
    parser.add_argument("--max-chars", type=int, help="use at most this many characters of the corpus")


def _run_tokenizer(args: argparse.Namespace) -> int:
    opts = resolve_options(args, "tokenizer", TOKENIZER_DEFAULTS)
    if not opts["corpus"] or not opts["out"]:
        raise TrainingError("train-tokenizer needs --corpus and --out (or a recipe that sets them).",
                            hint="e.g. edgelm train-tokenizer --corpus data.txt --vocab-size 4096 --out tok/")
    res = train_tokenizer(opts["corpus"], opts["vocab_size"], opts["out"], min_frequency=opts["min_frequency"],
                          layout=opts["layout"], separator=opts["separator"], text_field=opts["text_field"],
                          straight_quotes=bool(opts["straight_quotes"]), model_max_length=opts["model_max_length"],
                          max_chars=opts["max_chars"])
    print(f"tokenizer: vocab {res.vocab_size}, trained on {res.num_documents} documents "
          f"({res.num_chars:,} characters) -> {res.out_dir}")
    return 0


# --- edgelm train ----------------------------------------------------------------------------------------
def _train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", help="TOML recipe; its [teacher] table (or --section) gives defaults")
    parser.add_argument("--section", help="recipe table to read (default teacher)")
    parser.add_argument("--out", help="output folder (HF model folder + checkpoints/ + train_log.jsonl)")
    parser.add_argument("--preset", help=f"model shape: {', '.join(PRESETS)}")
    parser.add_argument("--config", help="model config JSON (LlamaConfig fields) instead of --preset")
    add_options(parser, TRAIN_OPTIONS)


def _run_train(args: argparse.Namespace) -> int:
    opts = resolve_options(args, "teacher", config_defaults())
    if not opts.get("out") or not opts.get("corpus"):
        raise TrainingError("train needs --out and --corpus (or a recipe that sets them).",
                            hint="e.g. edgelm train --preset small --tokenizer tok/ --corpus data.txt --out model/")
    res = train(config_from_options(opts))
    print(f"trained {res.params:,} params for {res.steps} steps ({res.tokens:,} tokens, {res.wall_time_s:.0f}s, "
          f"{res.tokens_per_s:,.0f} tok/s, stopped: {res.stopped})"
          + (_eval_summary(res.eval) if res.eval else "") + f" -> {res.out_dir}")
    return 0


# --- edgelm distill --------------------------------------------------------------------------------------
def _distill_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", help="TOML recipe; its [student] table (or --section) gives defaults")
    parser.add_argument("--section", help="recipe table to read (default student)")
    parser.add_argument("--out", help="output folder (HF model folder + checkpoints/ + train_log.jsonl)")
    add_options(parser, DISTILL_OPTIONS)
    add_options(parser, TRAIN_OPTIONS)


def _run_distill(args: argparse.Namespace) -> int:
    opts = resolve_options(args, "student", distill_defaults())
    if not opts.get("teacher"):
        raise TrainingError("distill needs --teacher DIR.", hint="e.g. edgelm distill --teacher teacher/ --student-layers 2 ...")
    if opts.get("sample_tokens"):
        return _run_sampling(opts)
    if not opts.get("out") or not opts.get("corpus"):
        raise TrainingError("distill needs --out and --corpus (or a recipe that sets them).",
                            hint="e.g. edgelm distill --teacher t/ --student-layers 2 --corpus data.txt --out s/")
    res = distill(config_from_options(opts), opts["teacher"], student_layers=opts.get("student_layers"),
                  student_config=opts.get("student_config"), init=opts.get("init"))
    ev = res.eval
    print(f"distilled into {res.params:,} params: {res.steps} steps ({res.tokens:,} tokens, {res.wall_time_s:.0f}s, "
          f"{res.tokens_per_s:,.0f} tok/s, stopped: {res.stopped})"
          + (_eval_summary(ev) + f", KL to teacher {ev.get('eval_kl', float('nan')):.4f}" if ev else "")
          + f" -> {res.out_dir}")
    return 0


def _run_sampling(opts: dict[str, Any]) -> int:
    """``distill --sample-tokens N``: sequence-level distillation, teacher samples written as a corpus file."""
    if not opts.get("samples_out"):
        raise TrainingError("--sample-tokens needs --samples-out FILE.", hint="Name the corpus file to write.")
    res = sample_corpus(opts["teacher"], opts["samples_out"], num_tokens=opts["sample_tokens"],
                        batch_size=opts["sample_batch_size"], temperature=opts["sample_temperature"],
                        top_p=opts["sample_top_p"], layout=opts["layout"] if opts["layout"] != "keep" else
                        "blank-line-paragraphs", seed=opts["seed"], device=opts["device"],
                        max_time_s=opts["max_time_s"], progress=not opts.get("no_progress"))
    print(f"sampled {res.documents} documents, {res.tokens:,} tokens ({res.bytes:,} bytes) in "
          f"{res.wall_time_s:.0f}s ({res.tokens_per_s:,.0f} tok/s) -> {res.out_path}")
    return 0


# --- edgelm build-recipe ---------------------------------------------------------------------------------
def _recipe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="the recipe TOML file (e.g. export/recipes/default.toml)")
    parser.add_argument("--stages", nargs="+", choices=BUILD_STAGES, help="run only these stages, in this order")
    parser.add_argument("--force", action="store_true", help="re-run stages even if their output exists")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                        help="override a recipe value, e.g. --set teacher.max_time_s=60 (repeatable)")


def _run_recipe(args: argparse.Namespace) -> int:
    build_recipe(args.recipe, stages=args.stages, force=args.force, progress=not args.no_progress,
                 overrides=parse_set(args.set), log=lambda msg: print(msg, file=sys.stderr, flush=True))
    return 0


# --- edgelm export ---------------------------------------------------------------------------------------------
def _export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC", nargs="?",
                        help="a local Hugging Face model folder, or a hub id (needs network)")
    parser.add_argument("--out", metavar="DIR", help="the model folder to write (required)")
    parser.add_argument("--list", action="store_true",
                        help="print the supported architecture families (builder, KV cache layout, what was verified)")
    parser.set_defaults(_export_parser=parser)  # run() reports a missing SRC / --out as argparse would
    parser.add_argument("--quantize", choices=EXPORT_QUANTIZE_CHOICES, default="int8",
                        help="weight format: int8 (default) = 8-bit, each matrix on the int8 GEMM where calibration "
                             "shows its activations allow it, else block-wise; int8-block = block-wise 8-bit everywhere "
                             "(most accurate); int8-gemm = int8 GEMMs everywhere (fastest prefill, breaks on models "
                             "with activation outliers); int4 = 4-bit blocks with zero points (smallest); int4-fp32 = int4 with "
                             "fp32 activations (slower decode; a Q4_1/Q8_0 GGUF then answers exactly as fp32); auto = the "
                             "first of int4, int8, int8-block (smallest first) within --max-ppl-increase; none = fp32")
    parser.add_argument("--eval-text", metavar="FILE", help="held-out text for the quality gate (default: built-in sample)")
    parser.add_argument("--max-ppl-increase", type=float, default=0.05, metavar="FRACTION",
                        help="refuse a quantized model whose perplexity is more than this much worse (default 0.05 = 5%%)")
    parser.add_argument("--force", action="store_true", help="write the model even if it fails the quality gate")
    parser.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")
    parser.add_argument("--keep-fp32", default="", metavar="PARTS",
                        help="comma-separated parts to leave in fp32: embeddings,lm_head")
    parser.add_argument("--context-length", type=int, metavar="N",
                        help=f"positions to build for (default: the model's, at most {EXPORT_MAX_CONTEXT})")
    parser.add_argument("--threads", type=int, metavar="N", help="CPU threads for verification and evaluation")
    parser.add_argument("--via", choices=("builder", "optimum", "onnx"),
                        help="force the path: builder (our lean graph, families of --list), optimum (optimum's "
                             "exporter, any causal LM it knows), onnx (SRC's ready-made graph); default: the builder "
                             "when it knows the family, a ready-made graph when SRC has one, else optimum")
    parser.add_argument("--onnx-file", metavar="FILE",
                        help="the graph of a ready-made ONNX folder to use, relative to SRC (e.g. onnx/model_q4.onnx)")
    parser.add_argument("--optimum-python", metavar="PYTHON",
                        help="the python of an environment with optimum-onnx, for --via optimum "
                             "(default: $EDGELM_OPTIMUM_PYTHON, else this python when it has optimum)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


@contextlib.contextmanager
def _terminate_cleanly() -> Iterator[None]:
    """While exporting, turn SIGTERM (``kill``, a service manager, a container stopping) into SystemExit(143).

    The exporter removes its temporary ``.OUT.edgelm-export-*`` / ``-gguf-*`` folders when an exception unwinds
    through it, as it does for Ctrl-C's KeyboardInterrupt; SIGTERM's default action ends the process on the spot and
    left them behind. The previous handler is put back afterwards (only the main thread can set one)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame: Any) -> None:
        print("\nedgelm export: terminated; removing the temporary files", file=sys.stderr, flush=True)
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_export(args: argparse.Namespace) -> int:
    from edgelm_export.convert import export_model

    if args.list:
        from edgelm_export.archs import family_table
        print(family_table())
        return 0
    missing = [name for name, value in (("SRC", args.src), ("--out", args.out)) if not value]
    if missing:
        args._export_parser.error(f"the following arguments are required: {', '.join(missing)} (or --list)")
    with _terminate_cleanly():
        report = export_model(args.src, args.out, quantize=args.quantize, eval_text=args.eval_text,
                              max_ppl_increase=args.max_ppl_increase, force=args.force, overwrite=args.overwrite,
                              progress=not args.no_progress, keep_fp32=args.keep_fp32,
                              context_length=args.context_length, threads=args.threads, via=args.via,
                              onnx_file=args.onnx_file, optimum_python=args.optimum_python)
    m = report.metrics
    print(f"wrote {report.out}: {report.model_type} ({report.num_parameters:,} parameters), {report.quantization}, "
          f"graph + weights {report.model_bytes / 1e6:.2f} MB, fp32-vs-PyTorch max logit diff "
          f"{report.max_logit_diff:.1e}")
    if "quantized_perplexity" in m:
        print(f"perplexity fp32 {m['fp32_perplexity']:.4f} -> {report.quantization} {m['quantized_perplexity']:.4f} "
              f"({100 * m['ppl_increase']:+.2f} %), bits/byte {m['fp32_bits_per_byte']:.4f} -> "
              f"{m['quantized_bits_per_byte']:.4f}, greedy agreement {100 * m['greedy_token_agreement']:.1f} %"
              + (f", chat answers {100 * m['chat_prefix_agreement']:.1f} %" if "chat_prefix_agreement" in m else "")
              + (f" ({100 * m['chat_step_agreement']:.1f} % of single steps)" if "chat_step_agreement" in m else ""))
        for t in m.get("auto") or []:
            print(f"  auto tried {t['method']}: {100 * t['ppl_increase']:+.2f} % "
                  f"({'within' if t['passed'] else 'over'} the gate)")
        if m.get("forced"):
            print(f"written with --force: {100 * m['ppl_increase']:+.2f} % is over the gate's "
                  f"{100 * m['max_ppl_increase']:.2f} % (the card and edgelm.json say so too)")
        hint = chat_agreement_hint(report.quantization, m)
        if hint:
            print(hint)
    elif "fp32_perplexity" in m:
        print(f"perplexity {m['fp32_perplexity']:.4f}, bits/byte {m['fp32_bits_per_byte']:.4f}")
    for note in report.notes:
        print(f"note: {note}")
    return 0


TRAIN_TOKENIZER = Verb(_tokenizer_arguments, _run_tokenizer)
TRAIN = Verb(_train_arguments, _run_train)
DISTILL = Verb(_distill_arguments, _run_distill)
BUILD_RECIPE = Verb(_recipe_arguments, _run_recipe)
EXPORT = Verb(_export_arguments, _run_export)
