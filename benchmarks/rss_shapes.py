"""Resident memory of the runtime by model size: what a Raspberry Pi needs (docs/raspberry-pi.md, "Memory").

    python benchmarks/rss_shapes.py run      # builds the random-weight shapes once, measures each in a fresh process
    python benchmarks/rss_shapes.py docs     # splices benchmarks/results/rss-shapes.md into docs/raspberry-pi.md

Each measurement runs in its own interpreter, at one thread, and reads ``VmRSS`` (what is resident now) at four
points: after ``import edgelm``, after ``edgelm.load``, after a 64-token greedy generation, and after a long one
(as many tokens as the context allows, up to 1,500), plus ``VmHWM`` (the process's peak). Random weights: memory
does not depend on their values. The x86-64 numbers stand in for a Pi's: the same wheels of onnxruntime, numpy
and tokenizers, the same weights; the arm64 smoke (scripts/arm64-smoke) checks that the runtime runs there.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EDGELM_SHARED", ROOT.parent / "shared")).resolve()
MODELS = ROOT / ".cache" / "rss-shapes"
RESULTS = ROOT / "benchmarks" / "results" / "rss-shapes"
DOC = ROOT / "docs" / "raspberry-pi.md"

# name -> Llama config fields (vocabulary of the stories260K tokenizer: 512), or None for the real stories260K.
SHAPES: dict[str, dict | None] = {
    "stories260K (0.26 M)": None,
    "Llama shape, 6 M (d 288, 6 layers)": dict(hidden_size=288, intermediate_size=768, num_hidden_layers=6,
                                               num_attention_heads=6, num_key_value_heads=6),
    "Llama shape, 26 M (d 512, 8 layers)": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                                                num_attention_heads=8, num_key_value_heads=8),
    "Llama shape, 85 M (d 768, 12 layers)": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                                                 num_attention_heads=12, num_key_value_heads=12),
}
LONG = 1500

_PROBE = r"""
import json, sys
def rss(key="VmRSS"):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
out = {}
import edgelm
out["import"] = rss()
lm = edgelm.load(sys.argv[1], threads=1)
out["load"] = rss()
lm.generate([1, 2, 3, 4], max_new_tokens=64, temperature=0, ignore_eos=True)
out["tokens_64"] = rss()
n = min(int(sys.argv[2]), lm.context_length - 8)
lm.generate([1, 2, 3, 4], max_new_tokens=n, temperature=0, ignore_eos=True)
out["tokens_long"], out["long_n"], out["peak"] = rss(), n, rss("VmHWM")
print("RESULT " + json.dumps(out))
"""


def build(name: str, cfg: dict | None) -> Path:
    """The int8 model folder for one shape (exported once, kept under .cache/rss-shapes)."""
    slug = name.split(" (")[0].replace(" ", "-").replace(",", "")
    out = MODELS / slug
    if (out / "edgelm.json").is_file():
        return out
    from edgelm_export.convert import export_model

    src = SHARED / "fixtures" / "stories260K"
    if cfg is not None:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        hf = MODELS / (slug + "-hf")
        model = LlamaForCausalLM(LlamaConfig(vocab_size=512, max_position_embeddings=2048, bos_token_id=1,
                                             eos_token_id=2, tie_word_embeddings=False, **cfg))
        model.save_pretrained(hf)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            (hf / f).write_bytes((src / f).read_bytes())
        src = hf
    export_model(str(src), str(out), quantize="int8", overwrite=True, progress=False, force=True)
    return out


def run() -> dict:
    rows = {}
    for name, cfg in SHAPES.items():
        folder = build(name, cfg)
        p = subprocess.run([sys.executable, "-c", _PROBE, str(folder), str(LONG)], capture_output=True, text=True,
                           env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=900, check=True)
        res = json.loads(next(ln for ln in p.stdout.splitlines() if ln.startswith("RESULT "))[7:])
        res["onnx_bytes"] = sum(f.stat().st_size for f in folder.glob("model.onnx*"))
        rows[name] = res
        print(name, res, flush=True)
    data = {"python": sys.version.split()[0], "machine": os.uname().machine, "rows": rows}
    RESULTS.with_suffix(".json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    RESULTS.with_suffix(".md").write_text(markdown(data), encoding="utf-8")
    return data


def markdown(data: dict) -> str:
    mb = lambda b: f"{b / 1e6:,.0f} MB"  # noqa: E731
    lines = ["| model (parameters) | model.onnx + data | after `import edgelm` | after `load` | after 64 tokens | "
             "after the long generation | peak |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in data["rows"].items():
        lines.append(f"| {name} | {r['onnx_bytes'] / 1e6:,.1f} MB | {mb(r['import'])} | {mb(r['load'])} | "
                     f"{mb(r['tokens_64'])} | {mb(r['tokens_long'])} at {r['long_n']:,} tokens | {mb(r['peak'])} |")
    lines += ["", f"`VmRSS` of one process at one thread, {data['machine']}, Python {data['python']}; written by "
              "`python benchmarks/rss_shapes.py run` ([rss-shapes.json](../benchmarks/results/rss-shapes.json))."]
    return "\n".join(lines) + "\n"


def splice(doc: str, text: str) -> str:
    begin, end = "<!-- results/rss-shapes.md -->", "<!-- end results/rss-shapes.md -->"
    i, j = doc.index(begin) + len(begin), doc.index(end)
    return doc[:i] + "\n" + text.strip() + "\n" + doc[j:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cmd", choices=("run", "docs"))
    args = ap.parse_args()
    if args.cmd == "run":
        run()
    text = RESULTS.with_suffix(".md").read_text(encoding="utf-8")
    DOC.write_text(splice(DOC.read_text(encoding="utf-8"), text), encoding="utf-8")


if __name__ == "__main__":
    main()
