"""Every ``--quantize`` mode and every ``--keep-fp32`` choice on stories260K (real weights): what docs/export.md quotes.

    nice -n 10 python benchmarks/stories260k_modes.py run    # ~2 min on 2 cores: results/stories260k-modes.{json,md}
    python benchmarks/stories260k_modes.py docs              # splices results/stories260k-modes.md into docs/export.md

``run`` exports ``$EDGELM_SHARED/fixtures/stories260K`` (default ``../shared``) once per mode (none, int8, int8-block,
int8-gemm, int4, int4-fp32) and once per ``--keep-fp32`` choice of the default int8, into a temporary folder, with
``force=True`` so that a mode the 5 % gate refuses is still measured (its manifest then says ``forced``, which is
what the table calls refused). Size, verification diff, perplexity, bits/byte and greedy agreement are read from
each export's ``ExportReport`` and ``edgelm.json`` as the exporter wrote them (the gate's built-in sample); nothing
here re-implements them. Two things the export does not measure are added: every folder scored on
``$EDGELM_SHARED/eval/tinystories-v1-valid-a.txt`` with ``Model.score`` (the held-out text the stories260K reference
bits/byte is published for), and greedy continuations compared with PyTorch's fp32 model (the prompts and lengths of
tests/test_export_stories260k.py). All of it is deterministic on one machine: rerun it after any exporter change.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EDGELM_SHARED", ROOT.parent / "shared")).resolve()
SRC = SHARED / "fixtures" / "stories260K"
HELD_OUT = SHARED / "eval" / "tinystories-v1-valid-a.txt"
RESULTS = ROOT / "benchmarks" / "results" / "stories260k-modes"
DOC = ROOT / "docs" / "export.md"

MODES = ("none", "int8", "int8-block", "int8-gemm", "int4", "int4-fp32")
KEEP_FP32 = ((), ("embeddings",), ("lm_head",), ("embeddings", "lm_head"))  # each with the default int8
# Greedy against PyTorch: the same prompts and length as tests/test_export_stories260k.py.
PROMPTS = ("Once upon a time", "Tom and Lily went to the", "The little dog was sad because", "One day, a girl named")
NEW_TOKENS = 32


def torch_continuations() -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids, PyTorch fp32 greedy continuation) per prompt, EOS ignored."""
    import torch
    import transformers

    torch.set_num_threads(1)
    tok = transformers.AutoTokenizer.from_pretrained(str(SRC))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(SRC), dtype=torch.float32).eval()
    cfg = transformers.GenerationConfig(do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                        eos_token_id=None, pad_token_id=0)
    prompts, conts = [], []
    with torch.no_grad():
        for text in PROMPTS:
            ids = tok(text)["input_ids"]
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 generation_config=cfg)
            prompts.append(ids)
            conts.append(out[0, len(ids):].tolist())
    return prompts, conts


def optimized_nodes(folder: Path) -> int:
    """Nodes left after onnxruntime's load-time optimisation at the runtime's level (ORT_ENABLE_ALL): what a
    decode step runs."""
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.log_severity_level = 1, 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(folder / "optimized.onnx")
    ort.InferenceSession(str(folder / "model.onnx"), so, providers=["CPUExecutionProvider"])
    return len(onnx.load(so.optimized_model_filepath, load_external_data=False).graph.node)


def measure(folder: Path, report: Any, reference: tuple[list[list[int]], list[list[int]]], held_out: str) -> dict:
    """One export's row: what its report and manifest say, plus the held-out score and the PyTorch comparison."""
    import onnx

    import edgelm
    from edgelm_export.evaluate import agreement, greedy, teacher_forced_agreement

    manifest = json.loads((folder / "edgelm.json").read_text(encoding="utf-8"))
    files = {name: (folder / name).stat().st_size for name in ("model.onnx", "model.onnx.data")
             if (folder / name).is_file()}
    assert report.model_bytes == sum(files.values()), (report.model_bytes, files)  # graph + weights, as reported
    q = manifest["quantization"]
    lm = edgelm.load(str(folder))
    score = lm.score(held_out)
    prompts, refs = reference
    got = [greedy(lm, ids, NEW_TOKENS) for ids in prompts]
    token_agree, prefix_agree = agreement(refs, got)
    return {
        "quantize": report.quantization, "keep_fp32": q.get("keep_fp32", []), "bytes": report.model_bytes,
        "files": files, "fp32_bytes": report.fp32_model_bytes,
        "nodes": len(onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.node),
        "nodes_optimized": optimized_nodes(folder),
        "matmuls": {**{k: q[k] for k in ("matmuls", "gemm_matmuls", "block_matmuls") if k in q},
                    "smoothed": len(q.get("smoothed_nodes", []))},
        "max_abs_logit_diff": manifest["verification"]["max_abs_logit_diff"],
        "metrics": manifest["metrics"], "refused": bool(manifest["metrics"].get("forced")), "notes": report.notes,
        "held_out": {"text": HELD_OUT.name, "perplexity": score.perplexity, "bits_per_byte": score.bits_per_byte,
                     "tokens": score.num_tokens},
        "vs_pytorch": {"identical_tokens": sum(a == b for r, g in zip(refs, got) for a, b in zip(r, g)),
                       "tokens": sum(len(r) for r in refs), "token_agreement": token_agree,
                       "prefix_agreement": prefix_agree,
                       "teacher_forced_agreement": teacher_forced_agreement(lm, prompts, refs)},
    }


def uncommitted_code_used(status: list[str]) -> list[str]:
    """The files with uncommitted changes (``git status --porcelain`` lines) that this run imported: the results
    say which code made them even when other work is in progress in the tree."""
    import sys

    loaded = {Path(f).resolve() for m in list(sys.modules.values()) if (f := getattr(m, "__file__", None))}
    loaded.discard(Path(__file__).resolve())
    return sorted(p for line in status if (p := line[3:].strip()) and (ROOT / p).resolve() in loaded)


def run() -> dict:
    from edgelm_export.convert import export_model

    reference = torch_continuations()
    held_out = HELD_OUT.read_text(encoding="utf-8")
    jobs = [(m, ()) for m in MODES] + [("int8", k) for k in KEEP_FP32 if k]
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="stories260k-modes-") as tmp:
        for mode, keep in jobs:
            name = mode + "".join(f"+{k}" for k in keep)
            out = Path(tmp) / name.replace("+", "-")
            report = export_model(str(SRC), str(out), quantize=mode, keep_fp32=keep, force=True, progress=False)
            rows[name] = measure(out, report, reference, held_out)
            m = rows[name]["metrics"]
            print(f"{name}: {rows[name]['bytes'] / 1e6:.2f} MB, ppl {_own(m, 'perplexity'):.4f}"
                  f"{' (refused by the gate)' if rows[name]['refused'] else ''}", flush=True)
    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()  # noqa: E731
    import onnxruntime

    data = {"source": str(SRC), "held_out_text": str(HELD_OUT), "commit": git("rev-parse", "--short", "HEAD"),
            "uncommitted_code_used": uncommitted_code_used(git("status", "--porcelain").splitlines()),
            "onnxruntime": onnxruntime.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "pytorch_greedy": {"prompts": list(PROMPTS), "new_tokens": NEW_TOKENS}, "rows": rows}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    RESULTS.with_suffix(".md").write_text(markdown(data), encoding="utf-8")
    return data


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def _own(m: dict, key: str) -> float:
    """An export's own metric: the quantized model's, or the fp32 one's for ``--quantize none``."""
    return m.get(f"quantized_{key}", m[f"fp32_{key}"])


def _ppl(m: dict) -> str:
    change = f" ({100 * m['ppl_increase']:+.2f} %)" if "ppl_increase" in m else ""
    return f"{_own(m, 'perplexity'):.4f}{change}"


def markdown(data: dict) -> str:
    rows = data["rows"]
    modes = [r for r in rows.values() if not r["keep_fp32"]]
    fp32 = next(r for r in modes if r["quantize"] == "none")
    head = ["`none` (fp32)" if r["quantize"] == "none" else f"`{r['quantize']}`" + (" (default)" if r["quantize"] ==
            "int8" else "") for r in modes]

    def held_ppl(r: dict) -> str:
        h, base = r["held_out"]["perplexity"], fp32["held_out"]["perplexity"]
        return f"{h:.4f}" if r is fp32 else f"{h:.4f} ({100 * (h / base - 1):+.2f} %)"

    def vs_torch(r: dict) -> str:
        v = r["vs_pytorch"]
        if v["identical_tokens"] == v["tokens"]:
            return f"identical ({v['tokens']} of {v['tokens']} tokens)"
        return f"{_pct(v['prefix_agreement'])} prefix, {_pct(v['teacher_forced_agreement'])} teacher-forced"

    def gemm(r: dict) -> str:
        mm = r["matmuls"]
        if "gemm_matmuls" not in mm:
            return "—"
        smoothed = f" ({mm['smoothed']} smoothed)" if mm["smoothed"] else ""
        return f"{mm['gemm_matmuls']}{smoothed} / {mm['block_matmuls']}"

    table = [
        ("model.onnx + model.onnx.data", lambda r: f"{r['bytes'] / 1e6:.2f} MB"),
        ("graph nodes, stored / after onnxruntime's load-time optimisation",
         lambda r: f"{r['nodes']} / {r['nodes_optimized']}"),
        ("weight MatMuls on the int8 GEMM / block-wise", gemm),
        ("fp32 graph vs PyTorch, max abs logit diff", lambda r: f"{r['max_abs_logit_diff']:.2e}"),
        ("perplexity on the built-in sample (change)", lambda r: _ppl(r["metrics"])),
        ("bits/byte on the built-in sample", lambda r: f"{_own(r['metrics'], 'bits_per_byte'):.4f}"),
        ("the 5 % gate", lambda r: "—" if r is fp32 else ("**refused** (measured with force)" if r["refused"]
                                                             else "passes")),
        ("greedy vs fp32 ONNX in the gate (token / prefix agreement)", lambda r: "—" if r is fp32 else
         f"{_pct(r['metrics']['greedy_token_agreement'])} / {_pct(r['metrics']['greedy_prefix_agreement'])}"),
        (f"perplexity on {data['rows']['none']['held_out']['text']} (change)", held_ppl),
        (f"bits/byte on {data['rows']['none']['held_out']['text']}", lambda r: f"{r['held_out']['bits_per_byte']:.4f}"),
        (f"greedy vs PyTorch fp32, {len(data['pytorch_greedy']['prompts'])} prompts x "
         f"{data['pytorch_greedy']['new_tokens']} tokens", vs_torch),
    ]
    lines = ["| | " + " | ".join(head) + " |", "| --- |" + " --- |" * len(modes)]
    lines += [f"| {label} | " + " | ".join(cell(r) for r in modes) + " |" for label, cell in table]
    lines += ["", "`--keep-fp32` with the default int8 (the same built-in sample; fp32 perplexity "
              f"{fp32['metrics']['fp32_perplexity']:.4f}):", "",
              "| `--keep-fp32` | model.onnx + model.onnx.data | perplexity (change) | bits/byte | "
              "greedy vs fp32 ONNX (token / prefix) |", "| --- | --- | --- | --- | --- |"]
    for r in rows.values():
        if r["quantize"] != "int8":
            continue
        m = r["metrics"]
        lines.append(f"| {','.join(r['keep_fp32']) or '(none, default)'} | {r['bytes'] / 1e6:.2f} MB | {_ppl(m)} | "
                     f"{m['quantized_bits_per_byte']:.4f} | {_pct(m['greedy_token_agreement'])} / "
                     f"{_pct(m['greedy_prefix_agreement'])} |")
    dirty = "".join(f" + uncommitted {p}" for p in data["uncommitted_code_used"])
    lines += ["", f"stories260K, edgelm {data['commit']}{dirty}, onnxruntime {data['onnxruntime']}, {data['date']}; "
              "one `export_model(..., quantize=Q, keep_fp32=K, force=True)` per column or row, each read back from "
              "its `ExportReport` and `edgelm.json`; written by `python benchmarks/stories260k_modes.py run` "
              "([stories260k-modes.json](../benchmarks/results/stories260k-modes.json))."]
    return "\n".join(lines) + "\n"


def docs() -> None:
    from real_models import splice  # benchmarks/ is on sys.path when this file runs as a script

    text = RESULTS.with_suffix(".md").read_text(encoding="utf-8")
    DOC.write_text(splice(DOC.read_text(encoding="utf-8"), RESULTS.name + ".md", text), encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cmd", choices=("run", "docs"), help="run: measure, write results/; docs: splice them in")
    {"run": run, "docs": docs}[ap.parse_args().cmd]()


if __name__ == "__main__":
    main()
