"""How the default int8 should run SmolLM2's tied LM head: block-wise (as before), or ranked on the int8 GEMM and
its best tokens rescored exactly.

    python benchmarks/int8_head.py run     # results/int8-head-smollm2.{json,md} (~20 min on 2 cores)
    python benchmarks/int8_head.py table
    python benchmarks/int8_head.py small   # results/int8-head-small.json: the rescoring's cost on a tiny head

The head is the largest matrix of SmolLM2-135M-Instruct (49,152 x 576), read in full every decode step. The
calibrated int8 plan keeps it block-wise (MatMulNBits, 8-bit): as a plain GEMM its per-call activation scale
costs 4.9x the block kernel's error. A GEMM that only *ranks* the vocabulary does not decide greedy tokens: the
ranked best are rescored exactly from the block-scaled embedding table (export/quantize.py
_rescored_head_nodes), as int4 does with its 8-bit ranking. Variants, each built from the fp32 export by the
product's ``quantize_model`` with the same calibrated plan (only the head differs):

* the head block-wise, not rescored (the int8 before this benchmark);
* ranked on the GEMM, best 8 rescored; the same with the GEMM smoothed into the final norm; smoothed, best 32
  (what ``--quantize int8`` ships: GEMM_RESCORE_TOP).

Per variant: perplexity change vs the fp32 export on alice-20k as ``score()`` computes it now (512-token calls
over the cache) and from one call per 4,096-token window (score() before, ``one_call``), the 22 greedy chat
answers against fp32's, peak RSS of one ``score()``, and decode tokens/s at 1 and 2 threads (``edgelm bench``,
fresh processes, interleaved rounds, medians).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import chat_agreement as ca  # noqa: E402
from rescored_head import fp32_references, measure, speed_rounds, write_results, write_smollm2_results  # noqa: E402

WORK = ca.MODELS / "int8-head"
NAME = "int8-head-smollm2"
# (label, ranked on the GEMM and rescored?, smoothed?, rescored top)
VARIANTS = [
    ("head block-wise, not rescored (before)", False, False, 0),
    ("GEMM ranking, best 8 rescored", True, False, 8),
    ("GEMM ranking smoothed, best 8 rescored", True, True, 8),
    ("GEMM ranking smoothed, best 32 rescored (shipped)", True, True, 32),
]
ONE_CALL = """
import sys, edgelm
import edgelm.model as m
from edgelm_export.evaluate import score_text
m.SCORE_CALL_ROWS = 10**9
print(score_text(edgelm.load(sys.argv[1], threads=2, verify=False), open(sys.argv[2], encoding="utf-8").read()).perplexity)
"""


def _dir(rescored: bool, smoothed: bool, top: int) -> Path:
    return WORK / (f"gemm{'-smooth' if smoothed else ''}-t{top}" if rescored else "block")


def build(plan, rescored: bool, smoothed: bool, top: int) -> Path:
    from edgelm_export import quantize as q

    dst = _dir(rescored, smoothed, top)
    if (dst / "edgelm.json").is_file():
        return dst
    src = ca.fp32_dir()
    ca._copy_side_files(src, dst)
    saved = q.RESCORED_HEADS, q.GEMM_RESCORE_TOP
    q.RESCORED_HEADS = tuple(m for m in saved[0] if rescored or m != "int8")
    q.GEMM_RESCORE_TOP = top or saved[1]
    try:
        p = q.Int8Plan(dict(plan), plan.smooth, plan.head_smooth if smoothed else {})
        info = q.quantize_model(src / "model.onnx", dst / "model.onnx", method="int8", plan=p)
    finally:
        q.RESCORED_HEADS, q.GEMM_RESCORE_TOP = saved
    ca._finish(dst, json.loads((src / "config.json").read_text()), info["dtype"], info)  # as an export writes it
    return dst


def run(threads: int, rounds: int = 3) -> None:
    from edgelm_export.assemble import int8_plan

    src = ca.fp32_dir()
    plan = int8_plan(src, json.loads((src / "config.json").read_text()), threads)
    paths = [build(plan, r, s, t) for _, r, s, t in VARIANTS]
    refs, fp32_rows = fp32_references(threads)
    text = ca.MODELS / "alice-20k.txt"
    fp32_one = float(subprocess.run([sys.executable, "-c", ONE_CALL, str(src), str(text)], check=True,
                                    capture_output=True, text=True).stdout.split()[-1])
    rows = []
    for (label, rescored, smoothed, top), path in zip(VARIANTS, paths):
        row = measure(label, path, refs, fp32_rows, threads)
        one = float(subprocess.run([sys.executable, "-c", ONE_CALL, str(path), str(text)], check=True,
                                   capture_output=True, text=True).stdout.split()[-1])
        row.update(rescored=rescored, smoothed=smoothed, rescore_top=top or None,
                   ppl_increase_one_call=one / fp32_one - 1)
        rows.append(row)
        print(f"{ca._line(row)}, ppl {100 * row['ppl_increase']:+.2f} % (one call {100 * row['ppl_increase_one_call']:+.2f} %), "
              f"score RSS {row['score_peak_rss'] / 2**20:.0f} MiB", flush=True)
    loads = speed_rounds(rows, paths, rounds)
    write_smollm2_results(NAME, "python benchmarks/int8_head.py run", refs, threads, loads, rows)
    table()


def table() -> None:
    data = json.loads((ca.RESULTS / f"{NAME}.json").read_text(encoding="utf-8"))
    loads = data["loadavg_1min_during_speed"]
    lines = [f"SmolLM2-135M-Instruct's tied LM head in the default int8: {data['prompts']} chat prompts x up to "
             f"{data['tokens']} tokens ({data['threads']} threads), perplexity on alice-20k, onnxruntime "
             f"{data['onnxruntime']}, commit {data['commit']}, {data['date']} (load during the speed rounds "
             f"{min(loads):.2f}-{max(loads):.2f}); `{data['command']}`.", "",
             "| variant | chat prefix agreement | answers identical | perplexity change (512-token calls) "
             "| perplexity change (one call per window) | score() peak RSS | decode tok/s 1 thr | decode tok/s 2 thr |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in data["rows"]:
        lines.append(f"| {r['candidate']} | {100 * r['prefix_agreement']:.1f} % | {r['identical_answers']} / "
                     f"{len(r['per_prompt'])} | {100 * r['ppl_increase']:+.2f} % | "
                     f"{100 * r['ppl_increase_one_call']:+.2f} % | {r['score_peak_rss'] / 2**20:.0f} MiB | "
                     f"{r['decode_tps_1']['median']:.1f} | {r['decode_tps_2']['median']:.1f} |")
    ca.write_table(NAME, lines)


def small(rounds: int = 3) -> None:
    """Why a small head keeps its kernel (GEMM_RANK_MIN_WEIGHTS): stories260K (a 512 x 64 head, a 0.1 ms step)
    with its head forced block-wise, against the same head GEMM-ranked and rescored; results/int8-head-small.json."""
    from edgelm_export import quantize as q
    from edgelm_export.assemble import int8_plan

    src = ca.MODELS / "stories260K" / "edgelm-fp32"  # benchmarks/compare.py prepare builds it
    cfg = json.loads((src / "config.json").read_text())
    plan = int8_plan(src, cfg, 1)
    plan["lm_head/MatMul"] = "block"  # its own GEMM passes calibration there; forced, to price the rescoring
    rows, paths = [], []
    for label, minimum in (("head block-wise", q.GEMM_RANK_MIN_WEIGHTS), ("head GEMM-ranked, rescored", 0)):
        dst = WORK / f"stories260K-{'rescored' if minimum == 0 else 'block'}"
        ca._copy_side_files(src, dst)
        saved, q.GEMM_RANK_MIN_WEIGHTS = q.GEMM_RANK_MIN_WEIGHTS, minimum
        try:
            info = q.quantize_model(src / "model.onnx", dst / "model.onnx", method="int8", plan=plan)
        finally:
            q.GEMM_RANK_MIN_WEIGHTS = saved
        ca._finish(dst, cfg, info["dtype"], info)
        rows.append({"candidate": label, "weights": info["weights"]})
        paths.append(dst)
    loads = speed_rounds(rows, paths, rounds)
    write_results("int8-head-small", {"model": "stories260K (head forced block-wise by the plan)",
                                      "command": "python benchmarks/int8_head.py small",
                                      "loadavg_1min_during_speed": loads, "rows": rows})
    for r in rows:
        print(f"{r['candidate']}: {r['decode_tps_1']['median']:.0f} / {r['decode_tps_2']['median']:.0f} tok/s at 1 / 2 threads")


def main() -> None:
    if sys.argv[1:] == ["small"]:
        small()
    else:
        ca.cli(__doc__, run, table)


if __name__ == "__main__":
    main()
