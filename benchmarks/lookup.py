"""Prompt lookup (``lookup=True``) against plain greedy decoding: decode tokens/s on input-grounded tasks and on
free generation, acceptance, and whether the tokens stayed identical.

    python benchmarks/lookup.py [MODEL_DIR ...] [--reps 5] [--threads N] [--out benchmarks/results/lookup]

Without MODEL_DIR: the shipped default model, plus SmolLM2-135M-Instruct int8 where its export exists
(``$EDGELM_SMOLLM2``, default the int8 folder benchmarks/real_models.py exports). A model with a chat template gets the
tasks as chat messages; a base model (the TinyStories default) gets them as plain continuations. A 5.5M-parameter
story model does none of these tasks (it does not even retell a story it was given: it writes a new one), and it
ends its stories after 20-40 tokens, too short to time; so for base models EOS is ignored and every run decodes
``--max-new-tokens`` tokens: their numbers measure what lookup costs and gains on text that rarely repeats its
input.

Method (docs/lookup.md): per task, one warm-up of each mode, then ``--reps`` pairs of generations with the order
of the pair alternating, so drift in the machine's load hits both modes alike. With chat models EOS ends a
generation, as in real use. Reported per task: the median decode tokens/s of each mode, the median of the per-pair speed-ups with their
min and max (the noise), drafted / accepted draft tokens, tokens per model call, and whether lookup's tokens were
identical to plain decoding's (int8 graphs may differ at near-ties: edgelm/lookup.py). The load average before
and after each model is recorded: the development machine is shared.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# the default int8 export of SmolLM2-135M-Instruct that benchmarks/real_models.py writes
SMOLLM2 = Path(os.environ.get("EDGELM_SMOLLM2",
                              Path(__file__).resolve().parents[1] / ".cache" / "bench-models" / "smollm2-135m-int8"))
RESULTS = Path(__file__).resolve().parent / "results"

# Original texts written for this benchmark.
PASSAGE = ("On Tuesday the 4th of March, Maria Lopez drove from Porto to Braga to meet her cousin Daniel at the old "
           "train station. Daniel had restored a blue 1972 bicycle for her, and together they rode along the river "
           "until the rain started. They sheltered in a bakery run by Mr. Oliveira, who told them that the station "
           "would close for repairs in June. Maria promised to come back before then with her daughter Ines, and "
           "Daniel agreed to keep the bicycle in his garage until the summer.")
TYPOS = ("The comittee met on Monday to dicsuss the new library. Most members agreed that the bulding should open "
         "earlier in the morning, so that students can study before there classes. The treasurer warned that the "
         "budget for heating was already to small, and asked for a seperate vote on the opening hours. The vote "
         "will take place next week, after the comittee has recieved the final cost estimate.")
CODE = '''def calc(items, tax_rate):
    total = 0
    for item in items:
        total += item.price * item.quantity
    total = total * (1 + tax_rate)
    return round(total, 2)


def report(items, tax_rate):
    value = calc(items, tax_rate)
    print(f"{len(items)} items, total {value}")
    return value
'''
STORY = ("Lily had a small red boat. Every morning she took it to the pond near her house. One day the wind blew the "
         "boat far away, and Lily was sad. Her friend Tom saw the boat stuck in the reeds. He waded into the water "
         "and brought it back. Lily smiled and said thank you. After that, Lily and Tom sailed the boat together.")

# name -> (kind, chat request, continuation prompt for base models)
TASKS: dict[str, tuple[str, str, str]] = {
    "extract": ("grounded",
                f"List every person, place and date mentioned in the text below, one per line.\n\n{PASSAGE}",
                f"{STORY}\n\nThe names in the story are"),
    "rewrite": ("grounded",
                f"Correct the spelling mistakes in the text below and return the whole corrected text.\n\n{TYPOS}",
                f"{STORY}\n\nTell the same story again, word for word.\n\n{STORY[:40]}"),
    "summarise": ("grounded",
                  f"Summarise the text below in three sentences.\n\n{PASSAGE}",
                  f"{STORY}\n\nThe story in a few sentences:"),
    "code-edit": ("grounded",
                  f"Rename the function calc to compute_total everywhere in this code and return the complete "
                  f"updated code.\n\n```python\n{CODE}```",
                  f"{CODE}\n\n# The same code, with calc renamed to compute_total:\n"),
    "free-story": ("free", "Write a short story about a robot who learns to paint.", "Once upon a time"),
    "free-tips": ("free", "Give me five tips for sleeping better, with a sentence about each.",
                  "One day, a little dog named Max"),
}


def _load_avg() -> float:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return float("nan")


def _run(lm, task: str, chat: bool, lookup: bool, max_new: int):
    """One generation; returns it with ``.cpu_s``: the process's CPU seconds for it (every onnxruntime thread)."""
    _, request, continuation = TASKS[task]
    kw = dict(max_new_tokens=max_new, temperature=0, lookup=lookup)
    t = time.process_time()
    if chat:
        g = lm.chat([{"role": "user", "content": request}], **kw)
    else:
        g = lm.generate(continuation, ignore_eos=True, **kw)
    g.cpu_s = time.process_time() - t
    return g


def _weights(lm) -> str:
    """config.json's dtype, or what the graph's MatMuls really are (a folder written by an experimental export may
    say float32 over int8 GEMMs)."""
    try:
        import onnx
    except ImportError:
        return str(lm.config.get("dtype"))
    from collections import Counter

    ops = Counter(n.op_type for n in onnx.load(str(lm.folder.onnx_path), load_external_data=False).graph.node)
    quantized = [f"{op} x{ops[op]}" for op in ("DynamicQuantizeMatMul", "MatMulNBits", "MatMulInteger") if ops[op]]
    return f"{lm.config.get('dtype')}: {', '.join(quantized)}" if quantized else str(lm.config.get("dtype"))


def bench_model(path: Path, reps: int, threads: int | None, max_new: int, tasks: list[str]) -> dict:
    import edgelm

    lm = edgelm.load(path, threads=threads)
    chat = not lm.chat_template.is_fallback
    out = {"path": str(path), "dtype": _weights(lm), "kv_cache": lm.kv_cache, "threads": lm.threads,
           "spin": lm.spin, "prompts": "chat" if chat else "continuation", "load_avg_start": _load_avg(),
           "tasks": {}}
    print(f"{path.name}: {lm.config.get('dtype')}, {lm.kv_cache}, threads={lm.threads}, "
          f"{'chat' if chat else 'continuation'} prompts", file=sys.stderr)
    for task in tasks:
        _run(lm, task, chat, False, max_new)  # warm-up of both modes
        _run(lm, task, chat, True, max_new)
        # CPU time is what other processes on a shared machine disturb least: the prefill's (the same in both
        # modes, from one-token generations) is subtracted to get CPU seconds per decoded token.
        prefill_cpu = statistics.median(_run(lm, task, chat, False, 1).cpu_s for _ in range(3))
        runs: dict[bool, list] = {False: [], True: []}
        for rep in range(reps):
            for lookup in ((False, True) if rep % 2 == 0 else (True, False)):
                runs[lookup].append(_run(lm, task, chat, lookup, max_new))
        plain, fast = runs[False], runs[True]
        ratios = [f.decode_tokens_per_s / p.decode_tokens_per_s for p, f in zip(plain, fast)]
        cpu_tok = {k: [(g.cpu_s - prefill_cpu) / max(1, g.completion_tokens - 1) for g in v] for k, v in runs.items()}
        cpu_ratios = [p / f for p, f in zip(cpu_tok[False], cpu_tok[True])]
        ref, got = plain[0].token_ids, fast[0].token_ids
        first = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), None)
        if first is None and len(ref) != len(got):
            first = min(len(ref), len(got))
        g = fast[0]
        calls = g.completion_tokens - 1 - g.accepted_tokens  # model calls after the prefill
        row = {
            "kind": TASKS[task][0], "completion_tokens_plain": plain[0].completion_tokens,
            "completion_tokens_lookup": g.completion_tokens,
            "plain_tok_s": [round(p.decode_tokens_per_s, 1) for p in plain],
            "lookup_tok_s": [round(f.decode_tokens_per_s, 1) for f in fast],
            "median_plain_tok_s": round(statistics.median(p.decode_tokens_per_s for p in plain), 1),
            "median_lookup_tok_s": round(statistics.median(f.decode_tokens_per_s for f in fast), 1),
            "speedup": round(statistics.median(ratios), 3), "speedup_min": round(min(ratios), 3),
            "speedup_max": round(max(ratios), 3),
            "cpu_ms_per_token_plain": round(1000 * statistics.median(cpu_tok[False]), 3),
            "cpu_ms_per_token_lookup": round(1000 * statistics.median(cpu_tok[True]), 3),
            "cpu_speedup": round(statistics.median(cpu_ratios), 3), "cpu_speedup_min": round(min(cpu_ratios), 3),
            "cpu_speedup_max": round(max(cpu_ratios), 3), "drafted": g.drafted_tokens, "accepted": g.accepted_tokens,
            "tokens_per_call": round((g.completion_tokens - 1) / calls, 2) if calls > 0 else None,
            "identical_to_plain": first is None, "first_divergence": first,
            "text_lookup": g.text[:400], "text_plain": plain[0].text[:400] if first is not None else None,
        }
        out["tasks"][task] = row
        print(f"  {task:11s} plain {row['median_plain_tok_s']:8.1f} lookup {row['median_lookup_tok_s']:8.1f} tok/s "
              f"x{row['speedup']:.2f} [{row['speedup_min']:.2f}-{row['speedup_max']:.2f}] CPU x{row['cpu_speedup']:.2f} "
              f"[{row['cpu_speedup_min']:.2f}-{row['cpu_speedup_max']:.2f}] accepted "
              f"{g.accepted_tokens}/{g.drafted_tokens}, {g.completion_tokens} tokens, "
              f"{'identical' if first is None else f'differs from token {first}'}", file=sys.stderr)
    out["load_avg_end"] = _load_avg()
    # What lookup measured a verification to cost on this graph (edgelm.lookup.CallCosts, kept per pooled cache):
    # the estimate that decided when drafting paid, in one-token steps, for 1..16 drafts.
    from edgelm.lookup import _COSTS

    costs = [c for c in map(_COSTS.get, getattr(lm, "_kv_pool", ())) if c is not None]
    if costs:
        c = max(costs, key=lambda c: c.timed_steps)
        out["step_ms"] = round(1000 * c.step_s, 2)
        out["verify_cost_steps"] = {k: round(c.cost(k), 2) for k in (1, 2, 4, 8, 16)}
    for kind in ("grounded", "free"):
        for key in ("speedup", "cpu_speedup"):
            s = [r[key] for r in out["tasks"].values() if r["kind"] == kind]
            if s:
                out[f"geomean_{key}_{kind}"] = round(math.exp(sum(map(math.log, s)) / len(s)), 3)
    return out


def markdown(results: dict) -> str:
    nan = float("nan")
    lines = ["# Prompt lookup vs plain greedy decoding", "",
             f"{results['machine']}. Interleaved pairs (plain, lookup) per task, median decode tokens/s (wall "
             f"clock); the speed-up is the median of the per-pair ratios, [min-max] across pairs. CPU speed-up: the "
             f"same from CPU seconds per decoded token (prefill subtracted), which other jobs on a shared machine "
             f"disturb less. Written by `benchmarks/lookup.py`.", ""]
    for name, m in results["models"].items():
        lines += [f"## {name} ({m['dtype']}, {m['kv_cache']} cache, {m['threads']} thread(s), {m['prompts']} prompts)",
                  "", f"{m['reps']} pairs per task, {m['date']}. "
                      f"Load average {m['load_avg_start']} at the start, {m['load_avg_end']} at the end. Geometric "
                      f"mean speed-up (wall / CPU): input-grounded x{m.get('geomean_speedup_grounded', nan):.2f} / "
                      f"x{m.get('geomean_cpu_speedup_grounded', nan):.2f}, free generation "
                      f"x{m.get('geomean_speedup_free', nan):.2f} / x{m.get('geomean_cpu_speedup_free', nan):.2f}." +
                      (" A base model: each task is a continuation of its text with EOS ignored, and the model does "
                       "not really do the task (benchmarks/lookup.py)." if m["prompts"] == "continuation" else "") +
                      (f" Lookup's estimate of a verification's cost, in one-token steps of {m['step_ms']} ms: " +
                       ", ".join(f"{v} for {k} draft{'s' * (int(k) > 1)}" for k, v in m["verify_cost_steps"].items()) +
                       "." if "verify_cost_steps" in m else ""), "",
                  "| task | kind | tokens | plain tok/s | lookup tok/s | speed-up [min-max] | CPU speed-up [min-max] | "
                  "drafts accepted | tokens per call | same tokens as plain |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for task, r in m["tasks"].items():
            same = "yes" if r["identical_to_plain"] else f"no (from token {r['first_divergence']})"
            lines.append(f"| {task} | {r['kind']} | {r['completion_tokens_lookup']} | {r['median_plain_tok_s']:.1f} | "
                         f"{r['median_lookup_tok_s']:.1f} | x{r['speedup']:.2f} [{r['speedup_min']:.2f}-"
                         f"{r['speedup_max']:.2f}] | x{r['cpu_speedup']:.2f} [{r['cpu_speedup_min']:.2f}-"
                         f"{r['cpu_speedup_max']:.2f}] | {r['accepted']}/{r['drafted']} | {r['tokens_per_call']} | "
                         f"{same} |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", type=Path)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="default: the runtime's choice per model")
    ap.add_argument("--max-new-tokens", type=int, default=200)
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--out", type=Path, default=RESULTS / "lookup", help="writes OUT.json and OUT.md")
    ap.add_argument("--name", default=None, help="results key for a single model (default: its folder name)")
    ap.add_argument("--merge", action="store_true",
                    help="keep the other models already in OUT.json (re-measure or add only these)")
    args = ap.parse_args()
    models = args.models
    if not models:
        import edgelm_models

        models = [edgelm_models.default_path()] + ([SMOLLM2] if (SMOLLM2 / "edgelm.json").is_file() else [])
    from edgelm import lookup

    results = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python "
                   f"{platform.python_version()}, {sys.platform}",
        "max_new_tokens": args.max_new_tokens,
        "lookup_settings": {"max_ngram": lookup.MAX_NGRAM, "k_start": lookup.K_START, "k_max": lookup.K_MAX,
                            "max_pause": lookup.MAX_PAUSE},
        "models": {},
    }
    if args.merge and args.out.with_suffix(".json").is_file():
        results["models"] = json.loads(args.out.with_suffix(".json").read_text())["models"]
    for path in models:
        row = bench_model(path, args.reps, args.threads, args.max_new_tokens, args.tasks)
        name = args.name if args.name and len(models) == 1 else path.name
        results["models"][name] = {"date": results["date"], "reps": args.reps, **row}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    args.out.with_suffix(".md").write_text(markdown(results))
    print(f"wrote {args.out.with_suffix('.json')} and .md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
