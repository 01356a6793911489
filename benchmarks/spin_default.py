"""Does edgelm's spin-wait default (edgelm.model.default_spin) choose the faster setting? Issue 14.

Each measurement is a fresh ``edgelm bench MODEL --threads 2`` process, so the decision is made at load time
exactly as a user's process makes it. Three machine states:

* ``after-run``: quiet, right after another benchmark process (the 1-minute load average still counts it);
* ``after-pause``: quiet, after ``--pause`` seconds of nothing before each default run;
* ``busy-core``: a second process spins on one core throughout (started here, killed in ``finally``, and
  it ends itself after 15 minutes even if this script is killed).

In each state the three configurations (default, spin forced on, spin forced off) run interleaved, ``--rounds``
times per model. For every run the script records the load average at launch and what the old load-average rule
would have chosen (``cpu_count - load1 >= threads - 0.5``); the new default's choice is the ``spin`` field of
the default run's JSON. Writes ``--out``.json and .md.

    python benchmarks/spin_default.py --out benchmarks/results/spin-default
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

THREADS = 2
CONFIGS = {"default": [], "on": ["--spin"], "off": ["--no-spin"]}


def bench(model: str, flags: list[str], repeat: int) -> dict:
    load1 = os.getloadavg()[0]
    env = {k: v for k, v in os.environ.items() if k != "EDGELM_SPIN"}
    out = subprocess.run(["edgelm", "bench", model, "--threads", str(THREADS), "--repeat", str(repeat),
                          "--json", "-", *flags], capture_output=True, text=True, check=True, env=env)
    d = json.loads(out.stdout[out.stdout.index("{"):])
    return {"loadavg_1min": load1, "old_default_spin": (os.cpu_count() or 1) - load1 >= THREADS - 0.5,
            "spin": d["spin"], "decode_tokens_per_s": d["decode_tokens_per_s"]["median"], "load_s": d["load_s"]}


def measure(models: list[str], state: str, rounds: int, repeat: int, pause: float) -> list[dict]:
    runs = []
    for r in range(rounds):
        for model in models:
            for config, flags in CONFIGS.items():
                if state == "after-pause" and config == "default":
                    time.sleep(pause)
                run = {"state": state, "model": os.path.basename(model.rstrip("/")), "config": config, "round": r,
                       **bench(model, flags, repeat)}
                print(json.dumps(run), flush=True)
                runs.append(run)
    return runs


def summarize(runs: list[dict]) -> list[dict]:
    rows = []
    for state in dict.fromkeys(r["state"] for r in runs):
        for model in dict.fromkeys(r["model"] for r in runs):
            sel = [r for r in runs if r["state"] == state and r["model"] == model]
            speed = {c: statistics.median(r["decode_tokens_per_s"] for r in sel if r["config"] == c) for c in CONFIGS}
            dflt = [r for r in sel if r["config"] == "default"]
            # The old default's speed is the forced configuration it would have picked, run in the same state.
            old_choice = [r["old_default_spin"] for r in dflt]
            old_speed = statistics.median(
                statistics.median(r["decode_tokens_per_s"] for r in sel
                                  if r["config"] == ("on" if r2["old_default_spin"] else "off")) for r2 in dflt)
            rows.append({"state": state, "model": model,
                         "loadavg_1min": [round(r["loadavg_1min"], 2) for r in dflt],
                         "old_default_spin": old_choice, "new_default_spin": [r["spin"] for r in dflt],
                         "old_default_tok_s": old_speed, "new_default_tok_s": speed["default"],
                         "spin_on_tok_s": speed["on"], "spin_off_tok_s": speed["off"]})
    return rows


def table(rows: list[dict]) -> str:
    def choice(xs: list[bool]) -> str:
        return "/".join("on" if x else "off" for x in xs)
    lines = ["| state | model | load avg (1 min) at the default runs | old default | new default | "
             "old default tok/s | new default tok/s | spin on | spin off |", "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['state']} | {r['model']} | {', '.join(map(str, r['loadavg_1min']))} | "
                     f"{choice(r['old_default_spin'])} | {choice(r['new_default_spin'])} | "
                     f"{r['old_default_tok_s']:.0f} | {r['new_default_tok_s']:.0f} | {r['spin_on_tok_s']:.0f} | "
                     f"{r['spin_off_tok_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", default=[".cache/bench-models/smollm2-135m-int8", "models/tinystories-edge-int8"])
    ap.add_argument("--rounds", type=int, default=3, help="interleaved runs per configuration (median taken)")
    ap.add_argument("--repeat", type=int, default=3, help="timed generations inside each bench process")
    ap.add_argument("--pause", type=float, default=30.0, help="seconds of quiet before each after-pause default run")
    ap.add_argument("--states", default="after-run,after-pause,busy-core")
    ap.add_argument("--out", default="benchmarks/results/spin-default")
    args = ap.parse_args()

    # What the new default costs at load time: the /proc/stat sample.
    from edgelm.model import idle_cores
    t = time.perf_counter()
    idle_cores()
    sample_s = time.perf_counter() - t

    runs = []
    for state in args.states.split(","):
        busy = None
        try:
            if state == "busy-core":
                # A busy loop that also ends itself after 15 minutes, should this script die before its finally.
                busy = subprocess.Popen([sys.executable, "-c",
                                         "import time\nt = time.time()\nwhile time.time() - t < 900: pass"])
                time.sleep(2)
            runs += measure(args.models, state, args.rounds, args.repeat, args.pause)
        finally:
            if busy is not None:
                busy.kill()
                busy.wait()
    rows = summarize(runs)
    result = {"threads": THREADS, "cpu_count": os.cpu_count(), "idle_sample_s": sample_s,
              "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]), "summary": rows, "runs": runs}
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(f"Spin-wait default, 2 threads, {os.cpu_count()} vCPUs, medians of {args.rounds} interleaved fresh "
                f"processes (`{result['command']}`); the new default's /proc/stat sample took "
                f"{sample_s * 1000:.0f} ms.\n\n" + table(rows))
    print(table(rows))


if __name__ == "__main__":
    main()
