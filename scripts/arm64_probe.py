#!/usr/bin/env python3
"""Greedy-decode probe and cross-platform comparison for the arm64 smoke test (scripts/arm64-smoke).

Two modes, both using only the runtime's dependencies (edgelm, onnxruntime, numpy) and the standard library,
because ``probe`` runs inside the emulated arm64 root where torch does not exist:

``probe``    load a model folder, greedy-generate from a prompt with ``edgelm``, then replay the same tokens
             through the raw ONNX graph (prefill + one-token decode steps, the graph contract in
             docs/model-format.md) and record the top-2 logits at every step. Writes one JSON document.
``compare``  read the x86-64 and the arm64 JSON documents, find the first position where the greedy tokens
             differ and report the logit margin (top-1 minus top-2) that each platform saw there.

The replay is what gives a margin: ``Generation`` only carries the chosen tokens' log-probabilities, and a
divergence matters only if the two best tokens were far apart (a real numeric bug) rather than a near tie
that int8 kernels on different CPUs may legitimately break differently.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# Modules that must never be present in the runtime-only environment.
HEAVY = ("torch", "transformers", "optimum", "edgelm_export")


@dataclass
class Step:
    """The raw graph's view of one greedy step: the two best tokens and the margin of the chosen one."""

    chosen: int
    top1: int
    top1_logit: float
    top2: int
    top2_logit: float
    chosen_margin: float  # logit(chosen) - max logit over the other tokens; < 0 if the graph prefers another


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("edgelm", "onnxruntime", "numpy", "tokenizers", "jinja2"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "missing"
    return out


def _heavy_installed() -> list[str]:
    import importlib.util

    # edgelm_export ships in the same wheel and is importable; what must be absent is what it needs.
    return [m for m in HEAVY if m != "edgelm_export" and importlib.util.find_spec(m) is not None]


def replay_top2(onnx_path: Path, config: dict[str, Any], prompt_ids: list[int], token_ids: list[int],
                threads: int) -> list[Step]:
    """Feed ``prompt_ids`` then each of ``token_ids`` (teacher forcing) through the raw graph, one decode step
    per token as the runtime does, and return the top-2 logits before each token of ``token_ids``."""
    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # not the note that logits_from (an input with a default) is not a constant
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    types = config.get("onnx", {}).get("inputs", {})
    layers, kv_heads, head_dim = config["num_layers"], config["num_kv_heads"], config["head_dim"]
    past = {}
    for i in range(layers):
        for kind in ("key", "value"):
            name = f"past_key_values.{i}.{kind}"
            # the graph's own cache width: a "shared" graph pads heads to a multiple of 16 (docs/model-format.md)
            width = next((i.shape[3] for i in sess.get_inputs() if i.name == name and isinstance(i.shape[3], int)),
                         head_dim)
            past[name] = np.zeros((1, kv_heads, 0, width), dtype=np.dtype(types.get(name, "float32")))
    out_names = [o.name for o in sess.get_outputs()]

    steps: list[Step] = []
    pending = list(prompt_ids)
    past_len = 0
    for k, chosen in enumerate(token_ids):
        feed: dict[str, Any] = {"input_ids": np.array([pending], dtype=np.int64)}
        if "attention_mask" in names:
            feed["attention_mask"] = np.ones((1, past_len + len(pending)), dtype=np.int64)
        if "position_ids" in names:
            feed["position_ids"] = np.arange(past_len, past_len + len(pending), dtype=np.int64)[None, :]
        feed.update({n: v for n, v in past.items() if n in names})
        result = dict(zip(out_names, sess.run(out_names, feed)))
        logits = result["logits"][0, -1].astype(np.float64)
        order = np.argsort(-logits, kind="stable")
        others = np.delete(logits, chosen)
        steps.append(Step(chosen=int(chosen), top1=int(order[0]), top1_logit=float(logits[order[0]]),
                          top2=int(order[1]), top2_logit=float(logits[order[1]]),
                          chosen_margin=float(logits[chosen] - others.max())))
        for n in past:
            past[n] = result[n.replace("past_key_values", "present")]
        past_len += len(pending)
        pending = [int(chosen)]
    return steps


def probe(model: str, prompt: str, max_new_tokens: int, threads: int) -> dict[str, Any]:
    """Greedy-generate with the runtime and replay through the raw graph; everything as a JSON-able dict."""
    t0 = time.perf_counter()
    import edgelm

    import_s = time.perf_counter() - t0
    leaked = [m for m in HEAVY if m in sys.modules]  # `import edgelm` must not pull these in
    t0 = time.perf_counter()
    lm = edgelm.load(None if model == "default" else model, threads=threads)
    load_s = time.perf_counter() - t0
    prompt_ids = lm.tokenizer.encode(prompt)
    # Token ids in, so both platforms decode from exactly the same prompt ids. ignore_eos: a fixed length
    # makes the tokens/s figure comparable between runs.
    gen = lm.generate(prompt_ids, max_new_tokens=max_new_tokens, temperature=0, ignore_eos=True)
    # The same generation again: greedy decoding must be repeatable on one machine.
    again = lm.generate(prompt_ids, max_new_tokens=max_new_tokens, temperature=0, ignore_eos=True)
    folder = Path(lm.path)  # the folder load() resolved ($EDGELM_MODEL or the shipped one for "default")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    onnx_path = folder / config.get("onnx", {}).get("file", "model.onnx")
    t0 = time.perf_counter()
    steps = replay_top2(onnx_path, config, list(prompt_ids), list(gen.token_ids), threads)
    replay_s = time.perf_counter() - t0
    return {
        "machine": platform.machine(),
        "byteorder": sys.byteorder,
        "versions": _versions(),
        "heavy_installed": _heavy_installed(),
        "heavy_imported_by_edgelm": leaked,
        "model": str(folder),
        "dtype": config.get("dtype"),
        "threads": threads,
        "prompt": prompt,
        "prompt_ids": list(prompt_ids),
        "token_ids": list(gen.token_ids),
        "text": gen.text,
        "repeatable": list(again.token_ids) == list(gen.token_ids),
        "replay_agrees": [s.top1 for s in steps] == list(gen.token_ids),
        "steps": [asdict(s) for s in steps],
        "timings": {
            "import_s": round(import_s, 3),
            "load_s": round(load_s, 3),
            "time_to_first_token_s": gen.time_to_first_token_s,
            "decode_tokens_per_s": gen.decode_tokens_per_s,
            "decode_tokens_per_s_second_run": again.decode_tokens_per_s,
            "total_time_s": gen.total_time_s,
            "replay_s": round(replay_s, 3),
        },
    }


@dataclass
class Comparison:
    """How the arm64 greedy tokens relate to the x86-64 ones."""

    identical: bool
    compared_tokens: int
    first_divergence: int | None          # index into the generated tokens, None when identical
    reference_token: int | None          # x86-64's token there
    other_token: int | None              # arm64's token there
    reference_margin: float | None       # x86-64's top-1 minus top-2 logit at the divergence
    other_margin: float | None           # arm64's top-1 minus top-2 logit at the divergence
    max_top1_logit_delta: float          # largest |top-1 logit difference| over the common prefix
    near_tie: bool | None                # divergence within tie_margin on both platforms

    def summary(self) -> str:
        if self.identical:
            return (f"greedy tokens identical on both platforms ({self.compared_tokens} tokens; "
                    f"max |top-1 logit delta| {self.max_top1_logit_delta:.2e})")
        kind = "a near tie" if self.near_tie else "NOT a near tie"
        return (f"first divergence at generated token {self.first_divergence}: x86-64 chose {self.reference_token} "
                f"(margin {self.reference_margin:.4f}), arm64 chose {self.other_token} "
                f"(margin {self.other_margin:.4f}); {kind}; max |top-1 logit delta| before it "
                f"{self.max_top1_logit_delta:.2e}")


def compare(reference: dict[str, Any], other: dict[str, Any], tie_margin: float = 0.1) -> Comparison:
    """Compare two probe documents (reference = x86-64, other = arm64) token by token."""
    if reference["prompt_ids"] != other["prompt_ids"]:
        raise ValueError("the two probes tokenized the prompt differently: "
                         f"{reference['prompt_ids']} vs {other['prompt_ids']}")
    a, b = reference["token_ids"], other["token_ids"]
    n = min(len(a), len(b))
    first = next((k for k in range(n) if a[k] != b[k]), None)
    if first is None and len(a) != len(b):
        first = n
    prefix = n if first is None else first
    deltas = [abs(reference["steps"][k]["top1_logit"] - other["steps"][k]["top1_logit"]) for k in range(prefix)]
    max_delta = max(deltas, default=0.0)
    if first is None:
        return Comparison(True, n, None, None, None, None, None, max_delta, None)

    def margin(doc: dict[str, Any]) -> float | None:
        steps = doc["steps"]
        if first >= len(steps):
            return None
        return steps[first]["top1_logit"] - steps[first]["top2_logit"]

    ref_m, oth_m = margin(reference), margin(other)
    near = ref_m is not None and oth_m is not None and ref_m <= tie_margin and oth_m <= tie_margin
    return Comparison(False, n, first, a[first] if first < len(a) else None, b[first] if first < len(b) else None,
                      ref_m, oth_m, max_delta, near)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("probe", help="greedy-generate and replay; write JSON")
    p.add_argument("--model", default="default", help="model folder, or 'default' for the shipped model")
    p.add_argument("--prompt", default="Once upon a time")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True, help="where to write the JSON document")
    c = sub.add_parser("compare", help="compare an x86-64 and an arm64 probe document")
    c.add_argument("reference", help="x86-64 probe JSON")
    c.add_argument("other", help="arm64 probe JSON")
    c.add_argument("--tie-margin", type=float, default=0.1,
                   help="a divergence where both platforms' top-1/top-2 margins are below this is a near tie")
    c.add_argument("--out", help="write the comparison as JSON here")
    args = ap.parse_args(argv)

    if args.mode == "probe":
        doc = probe(args.model, args.prompt, args.max_new_tokens, args.threads)
        Path(args.out).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
        t = doc["timings"]
        print(f"[{doc['machine']}] {len(doc['token_ids'])} tokens, decode {t['decode_tokens_per_s']:.1f} tok/s, "
              f"ttft {t['time_to_first_token_s']:.3f} s, load {t['load_s']:.2f} s, repeatable={doc['repeatable']}, "
              f"replay_agrees={doc['replay_agrees']}, heavy installed={doc['heavy_installed'] or 'none'}")
        print(f"[{doc['machine']}] text: {doc['text']!r}")
        return 0 if doc["repeatable"] and not doc["heavy_imported_by_edgelm"] else 1

    ref = json.loads(Path(args.reference).read_text(encoding="utf-8"))
    oth = json.loads(Path(args.other).read_text(encoding="utf-8"))
    result = compare(ref, oth, args.tie_margin)
    print(result.summary())
    if args.out:
        Path(args.out).write_text(json.dumps(asdict(result), indent=1) + "\n", encoding="utf-8")
    # Identical, or a near tie that different int8 kernels may break either way: pass. Anything else is a bug.
    return 0 if result.identical or result.near_tie else 1


if __name__ == "__main__":
    sys.exit(main())
