"""Routing evaluation, two experiments.

``python benchmarks/routing_eval.py mixed`` (the default; see :func:`mixed_main`): a real mixed workload. Local =
the shipped story model, cloud = SmolLM2-135M-Instruct exported by edgelm and served by ``edgelm serve`` on
127.0.0.1; in-domain story openings and out-of-domain questions (benchmarks/routing_prompts.py) with automatic
correctness checks; every policy's accuracy, share of stories kept local and cloud calls, and accuracy vs cloud
share per signal. ``python benchmarks/routing_eval.py docs`` splices the results table into docs/hybrid.md.

``python benchmarks/routing_eval.py pair``: answer quality against the share of queries sent to the "cloud" on a
pair of story models (a hard-in-domain workload). Setup (all on this machine, nothing leaves it):
  local = a small model folder (default: stories260K int8, exported on the fly by the test fixtures' cache)
  cloud = a larger model folder served by `edgelm serve` (BackgroundServer) on 127.0.0.1 and reached through
          CloudClient + the /completions endpoint, exactly as a real deployment would reach a remote model.

For each held-out prompt (openings of TinyStories validation stories: the first 1-3 sentences of every
paragraph that begins "Once upon a time", so lengths vary) both sides answer once. Quality of an answer =
the cloud model's mean log-likelihood per token of the answer given the prompt (nats/token, higher = better;
computed as score(prompt + answer) - score(prompt) with the cloud model loaded here). Then, for every share s
of queries sent to the cloud, the mean quality of the routed answers is computed for:
  uncertainty  - cascade: the s least confident local answers (lowest mean token logprob) go to the cloud
  prompt-score - before generating: the s prompts the local model finds least likely (nats/token)
  length       - the s longest prompts (tokens)
  random       - the exact expectation over random subsets of that size
  oracle       - the s prompts where the cloud answer gains the most (an upper bound no router can see)
Finally the real Router is calibrated on a separate calibration split to --check-share and run end to end
through Hybrid on the test split, to show that the simulated curve is what the router actually does.

Caveat, stated in docs/hybrid.md: the judge is the cloud model itself, which favours its own (greedy)
answers; with a "cloud" that is the same network as the local one (the default stand-in pair) the gaps are
small by construction. Re-run with --local/--cloud set to the real small/large pair.

    python benchmarks/routing_eval.py pair --n 200 --plot docs/hybrid-routing.png --json docs/hybrid-routing.json

"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EDGELM_SHARED", ROOT.parent / "shared"))
EVAL = SHARED / "eval" / "tinystories-v1-valid-a.txt"
SHARES = [i / 10 for i in range(11)]


def story_openings(path: Path, n: int, skip: int = 0) -> list[str]:
    """First 1-3 sentences (cycling, for length variety) of paragraphs that open a story."""
    paras = [p.strip() for p in path.read_text(encoding="utf-8").split("\n") if p.startswith("Once upon a time")]
    out = []
    for i, p in enumerate(paras[skip:skip + n]):
        sentences = re.findall(r"[^.!?]+[.!?]+[\"']?", p)
        k = 1 + (i % 3)
        out.append(" ".join(s.strip() for s in sentences[:k]) if sentences else p)
    return out


def default_folders() -> tuple[Path, Path]:
    """stories260K int8 (local) and fp32 (cloud), exported through the test fixtures' cache."""
    sys.path.insert(0, str(ROOT / "tests"))
    import conftest  # noqa: E402  (the cached exporter the test-suite uses)
    local = conftest.cached_export("stories260k-int8", conftest.STORIES260K, quantize="int8")
    cloud = conftest.cached_export("stories260k-fp32", conftest.STORIES260K, quantize="none")
    return local, cloud


def weak_local(seconds: float) -> Path:
    """A deliberately weaker local model: the project's trainer (`edgelm train`) runs a ~0.1M-parameter
    Llama ("tiny" preset, stories260K's tokenizer) for `seconds` on the TinyStories train sample, then the
    exporter makes it an int8 folder. Cached under .cache/routing-eval/. Stand-in until the real pair exists."""
    sys.path.insert(0, str(ROOT / "tests"))
    import conftest  # noqa: E402
    out = ROOT / ".cache" / "routing-eval" / f"weak-local-v2-{int(seconds)}s"
    folder = out.with_name(out.name + "-int8")
    if (folder / "edgelm.json").is_file():
        return folder
    import torch
    from edgelm_export.train import TrainConfig, train
    from edgelm_export.convert import export_model
    torch.set_num_threads(1)
    corpus = SHARED / "corpus" / "tinystories" / "tinystories-v1-train-sample.txt"
    cfg = TrainConfig(out_dir=str(out), corpus=[str(corpus)], tokenizer=str(conftest.STORIES260K),
                      model_config="tiny", layout="blank-line-paragraphs", block_size=128,
                      batch_size=16, max_steps=100000, max_time_s=seconds, warmup_steps=50, lr=3e-3,
                      eval_every=100000, save_every=100000, device="cpu", num_threads=1, progress=False,
                      overwrite=True)
    result = train(cfg)
    print(f"weak local: {result.params} params, {result.steps} steps, eval {result.eval}", file=sys.stderr)
    export_model(str(out), str(folder), overwrite=True, progress=False, quantize="int8")
    return folder


def answer_quality(judge, prompt: str, answer: str) -> float:
    """Judge's mean log-likelihood per answer token given the prompt (nats/token)."""
    if not answer.strip():
        return float("nan")
    full = judge.score(prompt + answer)
    base = judge.score(prompt)
    n = full.num_tokens - base.num_tokens
    return (full.total_logprob - base.total_logprob) / max(n, 1)


def curve(order: list[int], q_local: list[float], q_cloud: list[float]) -> list[float]:
    """Mean quality when the first k of `order` go to the cloud, for k at each share."""
    n = len(q_local)
    out = []
    for s in SHARES:
        k = round(s * n)
        chosen = set(order[:k])
        out.append(sum(q_cloud[i] if i in chosen else q_local[i] for i in range(n)) / n)
    return out


def pair_main(argv: list[str] | None = None) -> int:
    """The story-pair evaluation (quality of story continuations vs share; see the module docstring)."""
    ap = argparse.ArgumentParser(prog="routing_eval.py pair", description="story pair: quality vs cloud share")
    ap.add_argument("--local", type=Path, help="small model folder (default: stories260K int8)")
    ap.add_argument("--cloud", type=Path, help="large model folder to serve as the cloud (default: stories260K fp32)")
    ap.add_argument("--weak-local", type=float, metavar="SECONDS", default=None,
                    help="instead of stories260K int8, train a weaker local model for SECONDS (see weak_local)")
    ap.add_argument("--n", type=int, default=200, help="test prompts")
    ap.add_argument("--n-calib", type=int, default=100, help="calibration prompts (disjoint from the test ones)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy on both sides")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check-share", type=float, default=0.3, help="share for the end-to-end Router check")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", action="store_true", help="include every prompt and both answers in the JSON")
    ap.add_argument("--plot", type=Path, default=None, help="write a PNG (needs matplotlib)")
    ap.add_argument("--json", type=Path, default=None, help="write the numbers as JSON")
    args = ap.parse_args(argv)

    import edgelm
    from edgelm.cloud import CloudClient
    from edgelm.hybrid import Hybrid, Router
    from edgelm.server import BackgroundServer

    local_dir, cloud_dir = default_folders()
    if args.weak_local:
        local_dir = weak_local(args.weak_local)
    local_dir, cloud_dir = args.local or local_dir, args.cloud or cloud_dir
    local = edgelm.load(local_dir, threads=args.threads)
    judge = edgelm.load(cloud_dir, threads=args.threads)  # scores answers; the same folder is served below
    calib = story_openings(EVAL, args.n_calib)
    test = story_openings(EVAL, args.n, skip=args.n_calib)
    gen_kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    print(f"local {local_dir.name}, cloud {cloud_dir.name}; {len(test)} test + {len(calib)} calibration prompts; "
          f"{gen_kw}", file=sys.stderr)

    t0 = time.perf_counter()
    with BackgroundServer(edgelm.load(cloud_dir, threads=args.threads), workers=1) as srv:
        cloud = CloudClient(srv.url + "/v1", timeout=120)
        rows = []
        for i, p in enumerate(test):
            seed = args.seed + i
            g = local.generate(p, seed=seed, **gen_kw)
            c = cloud.complete(p, max_tokens=args.max_new_tokens, temperature=args.temperature, seed=seed)
            rows.append({"prompt": p, "prompt_tokens": len(local.encode(p)), "local_conf": g.mean_logprob,
                         "prompt_nats": local.score(p).nats_per_token, "local": g.text, "cloud": c.text,
                         "q_local": answer_quality(judge, p, g.text), "q_cloud": answer_quality(judge, p, c.text)})
        # End to end: calibrate the real Router on the calibration split, then route the test split.
        router = Router()
        hy = Hybrid(local, cloud, router, cloud_endpoint="completions")
        report = router.calibrate(calib, args.check_share, **gen_kw, seed=args.seed)
        routed = [hy.generate(p, seed=args.seed + i, **gen_kw) for i, p in enumerate(test)]
    elapsed = time.perf_counter() - t0

    rows = [r for r in rows if not (math.isnan(r["q_local"]) or math.isnan(r["q_cloud"]))]
    n = len(rows)
    ql = [r["q_local"] for r in rows]
    qc = [r["q_cloud"] for r in rows]
    idx = list(range(n))
    curves = {
        "uncertainty": curve(sorted(idx, key=lambda i: rows[i]["local_conf"]), ql, qc),
        "prompt-score": curve(sorted(idx, key=lambda i: -rows[i]["prompt_nats"]), ql, qc),
        "length": curve(sorted(idx, key=lambda i: -rows[i]["prompt_tokens"]), ql, qc),
        "random": [(1 - s) * sum(ql) / n + s * sum(qc) / n for s in SHARES],
        "oracle": curve(sorted(idx, key=lambda i: -(qc[i] - ql[i])), ql, qc),
    }
    # How much of the local->cloud gap each router recovers, averaged over the interior shares 10..90 %.
    lo, hi = curves["random"][0], curves["random"][-1]
    gap = hi - lo

    def recovered(name: str) -> float:
        # Undefined when both sides are about equally good (e.g. the same network twice).
        vals = [(curves[name][j] - lo) / gap for j in range(1, len(SHARES) - 1)] if abs(gap) > 0.02 else []
        return sum(vals) / len(vals) if vals else float("nan")

    by_text = {r["prompt"]: r for r in rows}
    e2e = [h for p, h in zip(test, routed) if p in by_text]
    e2e_q = [answer_quality(judge, p, h.text) for p, h in zip(test, routed) if p in by_text]
    e2e_share = sum(h.source == "cloud" for h in e2e) / len(e2e)
    e2e_quality = sum(q for q in e2e_q if not math.isnan(q)) / max(1, sum(not math.isnan(q) for q in e2e_q))
    identical = sum(r["local"] == r["cloud"] for r in rows)
    result = {
        "local": str(local_dir.name), "cloud": str(cloud_dir.name), "n": n, "generate": gen_kw,
        "identical_answers": identical, "shares": SHARES, "curves": curves,
        "mean_gap_recovered": {k: recovered(k) for k in curves},
        # Mean quality difference to random routing over the shares 10..90 % (nats/token; > 0 = better).
        "mean_advantage_over_random": {k: sum(curves[k][j] - curves["random"][j] for j in range(1, len(SHARES) - 1))
                                       / (len(SHARES) - 2) for k in curves},
        "end_to_end": {"target_share": args.check_share, "calibrated_threshold": report.threshold,
                       "calibration_share": report.cloud_share, "test_share": e2e_share,
                       "test_quality": e2e_quality,
                       "simulated_quality_at_that_share": curve(sorted(idx, key=lambda i: rows[i]["local_conf"]),
                                                                ql, qc)[round(args.check_share * 10)]},
        "seconds": elapsed,
        "rows": None if not args.rows else [{k: r[k] for k in ("prompt", "prompt_tokens", "local_conf", "prompt_nats", "q_local", "q_cloud",
                                    "local", "cloud")} for r in rows],
    }
    print(f"\n{n} prompts; local answers identical to cloud answers: {identical}; {elapsed:.0f} s")
    print("share  " + "  ".join(f"{k:>12}" for k in curves))
    for j, s in enumerate(SHARES):
        print(f"{s:5.0%}  " + "  ".join(f"{curves[k][j]:12.4f}" for k in curves))
    print("mean advantage over random at 10-90 % (nats/token): " +
          ", ".join(f"{k} {v:+.4f}" for k, v in result["mean_advantage_over_random"].items()))
    print("mean share of the local->cloud gap recovered at 10-90 %: " +
          ", ".join(f"{k} {v:.2f}" for k, v in result["mean_gap_recovered"].items()))
    e = result["end_to_end"]
    print(f"end to end: Router calibrated to {e['target_share']:.0%} (threshold {e['calibrated_threshold']:.3f}) "
          f"sent {e['test_share']:.1%} of the test prompts; quality {e['test_quality']:.4f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    if args.plot:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib is not installed; no plot (pip install matplotlib)", file=sys.stderr)
            return 0
        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
        styles = {"uncertainty": "o-", "prompt-score": "s-", "length": "^-", "random": "--", "oracle": ":"}
        for k, ys in curves.items():
            ax.plot([s * 100 for s in SHARES], ys, styles[k], label=k, markersize=4)
        ax.plot([e["test_share"] * 100], [e["test_quality"]], "k*", markersize=10, label="Router end to end")
        ax.set_xlabel("queries sent to the cloud (%)")
        ax.set_ylabel("answer quality: cloud model's mean log-lik. (nats/token)")
        ax.set_title(f"local {local_dir.name[:22]} vs cloud {cloud_dir.name[:22]}, n={n}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.plot)
        print(f"wrote {args.plot}")
    return 0


# --- the mixed workload (issue 17) ---------------------------------------------------------------------------
RESULTS = ROOT / "benchmarks" / "results"
MIXED_JSON = RESULTS / "routing-mixed.json"
MIXED_MD = RESULTS / "routing-mixed.md"
MIXED_PNG = ROOT / "docs" / "hybrid-routing-mixed.png"
DOC = ROOT / "docs" / "hybrid.md"
SMOLLM2 = ROOT / ".cache" / "bench-models" / "smollm2-135m-int8"  # `python benchmarks/real_models.py prepare`


class Served:
    """``edgelm serve MODEL`` in a child process on 127.0.0.1 (a free port), as a user would run it."""

    def __init__(self, folder: Path, threads: int):
        import socket
        import subprocess

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        cmd = [sys.executable, "-m", "edgelm.cli", "serve", str(folder), "--host", "127.0.0.1", "--port",
               str(self.port), "--workers", "1", "--threads", str(threads), "--log-level", "warning"]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> "Served":
        import urllib.request

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"edgelm serve exited with {self.proc.returncode}")
            try:
                urllib.request.urlopen(self.url + "/models", timeout=2).read()
                return self
            except OSError:
                time.sleep(0.5)
        self.proc.terminate()
        raise SystemExit("edgelm serve did not come up within 120 s")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def auroc(neg: list[float], pos: list[float]) -> float:
    """P(a positive's value > a negative's), ties counted half."""
    return sum((p > n) + 0.5 * (p == n) for n in neg for p in pos) / (len(neg) * len(pos))


def mixed_main(argv: list[str] | None = None) -> int:
    """Local story model + served SmolLM2-135M-Instruct on story openings and questions; writes the results."""
    ap = argparse.ArgumentParser(prog="routing_eval.py mixed", description=mixed_main.__doc__)
    ap.add_argument("--local", type=Path, default=None, help="local model folder (default: the shipped model)")
    ap.add_argument("--cloud", type=Path, default=SMOLLM2, help="cloud model folder, served by `edgelm serve`")
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for routing-mixed.json/.md")
    ap.add_argument("--plot", type=Path, default=MIXED_PNG)
    args = ap.parse_args(argv)
    if not (args.cloud / "edgelm.json").is_file():
        raise SystemExit(f"no cloud model at {args.cloud}: run `nice -n 10 python benchmarks/real_models.py prepare "
                         "--modes int8` first (SmolLM2-135M-Instruct, int8)")

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import routing_prompts as rp

    import edgelm
    from edgelm.cloud import CloudClient
    from edgelm.hybrid import (AUTO_CONFIDENCE_FACTOR, AUTO_PROMPT_FACTOR, MIN_SCORED_TOKENS, Hybrid, Router,
                               looks_like_request, reference_nats_per_token)

    local = edgelm.load(args.local, threads=args.threads)
    ref = reference_nats_per_token(local)
    greedy = dict(max_new_tokens=args.max_new_tokens, temperature=0.0)
    cal_s, test_s = rp.split(rp.STORIES)
    cal_q, test_q = rp.split(rp.QUESTIONS)
    t0 = time.perf_counter()
    with Served(args.cloud, args.threads) as srv:
        cloud = CloudClient(srv.url, timeout=120)

        def measure(prompt: str, kind: str, keywords=()) -> dict:
            s = local.score(prompt)
            g = local.generate(prompt, **greedy)
            endpoint = "chat" if looks_like_request(prompt) else "completions"
            c = (cloud.chat([{"role": "user", "content": prompt}], max_tokens=args.max_new_tokens, temperature=0.0)
                 if endpoint == "chat" else cloud.complete(prompt, max_tokens=args.max_new_tokens, temperature=0.0))
            row = {"kind": kind, "prompt": prompt, "prompt_nats": s.nats_per_token, "scored_tokens": s.num_tokens,
                   "prompt_tokens": len(local.encode(prompt)), "mean_logprob": g.mean_logprob,
                   "min_logprob": min(g.logprobs) if g.logprobs else float("nan"), "local": g.text,
                   "cloud": c.text, "endpoint": endpoint}
            if kind == "question":
                row.update(keywords=list(keywords), local_ok=rp.correct(g.text, keywords),
                           cloud_ok=rp.correct(c.text, keywords))
            return row

        test = [measure(p, "story") for p in test_s] + [measure(q, "question", k) for q, k in test_q]
        calib = [measure(p, "story") for p in cal_s] + [measure(q, "question", k) for q, k in cal_q]
        fresh = [measure(p, "story") for p in rp.FRESH_STORIES] + [measure(q, "question", k)
                                                                  for q, k in rp.FRESH_QUESTIONS]
        # What the old default endpoint did to stories: the same openings sent as a chat message.
        as_chat = [cloud.chat([{"role": "user", "content": p}], max_tokens=args.max_new_tokens, temperature=0.0).text
                   for p in test_s[:3]]

        # End to end through Hybrid: the default policy (no options), and labelled calibration on the calib split.
        def run(hy, rows=test) -> list:
            return [hy.generate(r["prompt"], **greedy) for r in rows]

        default_results = run(Hybrid(local, cloud))
        fresh_results = run(Hybrid(local, cloud), fresh)
        labelled = {}
        for signal in ("prompt-score", "uncertainty"):
            router = Router(max_prompt_nats=None, min_confidence=None)
            hy = Hybrid(local, cloud, router)
            report = router.calibrate(local_prompts=cal_s, cloud_prompts=[q for q, _ in cal_q], signal=signal,
                                      **greedy)
            labelled[signal] = (report, run(hy))
    elapsed = time.perf_counter() - t0

    stories = [r for r in test if r["kind"] == "story"]
    questions = [r for r in test if r["kind"] == "question"]
    nq, ns = len(questions), len(stories)
    cloud_right = sum(r["cloud_ok"] for r in questions)

    def summary(name: str, sent: list[bool], note: str = "", end_to_end: bool = False, rows=test) -> dict:
        """Accuracy etc. of routing `sent` (one flag per row of `rows`: True = the cloud answered)."""
        qs = [r for r in rows if r["kind"] == "question"]
        ceiling = sum(r["cloud_ok"] for r in qs)
        right = sum((r["cloud_ok"] if s else r["local_ok"]) for r, s in zip(rows, sent) if r["kind"] == "question")
        story_cloud = sum(s for r, s in zip(rows, sent) if r["kind"] == "story")
        q_cloud = sum(s for r, s in zip(rows, sent) if r["kind"] == "question")
        return {"policy": name, "right": right, "of": len(qs), "of_all_cloud": right / ceiling if ceiling else None,
                "stories_to_cloud": story_cloud / (len(rows) - len(qs)), "questions_to_cloud": q_cloud / len(qs),
                "cloud_calls": sum(sent), "note": note, "end_to_end": end_to_end}

    def by_threshold(values: list[float], thr: float, higher_to_cloud: bool, min_tokens: bool = False) -> list[bool]:
        out = []
        for r, v in zip(test, values):
            judged = not (min_tokens and r["scored_tokens"] < MIN_SCORED_TOKENS) and not math.isnan(v)
            out.append(judged and (v > thr if higher_to_cloud else v < thr))
        return out

    def share_threshold(cal_values: list[float], share: float, higher_to_cloud: bool) -> float:
        """The threshold Router.calibrate's share mode places on the calibration split (midpoint rule)."""
        keyed = sorted(((v if higher_to_cloud else -v) for v in cal_values if not math.isnan(v)), reverse=True)
        k = round(share * len(cal_values))
        t = (keyed[k - 1] + keyed[k]) / 2
        return t if higher_to_cloud else -t

    nats = [r["prompt_nats"] for r in test]
    mean_lp = [r["mean_logprob"] for r in test]
    policies = [
        summary("all local", [False] * len(test)),
        summary("all cloud (the ceiling)", [True] * len(test)),
        {**summary("random 50 %", [False] * len(test)), "right": (sum(r["local_ok"] for r in questions) +
                                                               cloud_right) / 2,
         "of_all_cloud": (sum(r["local_ok"] for r in questions) + cloud_right) / 2 / cloud_right,
         "stories_to_cloud": 0.5, "questions_to_cloud": 0.5, "cloud_calls": len(test) / 2, "note": "expectation"},
        summary("**`Hybrid(local, cloud)`, no options (default policy)**", [r.source != "local" for r in default_results],
                f"prompt score > {AUTO_PROMPT_FACTOR:g} x held-out {ref:.3f} = {AUTO_PROMPT_FACTOR * ref:.3f} "
                f"nats/token; cascade mean logprob < {-AUTO_CONFIDENCE_FACTOR * ref:.3f}", end_to_end=True),
    ]
    for signal, (report, results) in labelled.items():
        policies.append(summary(f"labelled calibration, {signal}", [r.source != "local" for r in results],
                                f"threshold {report.threshold:.3f}; calibration split: AUROC {report.auroc:.3f}, "
                                f"margin {report.margin:+.3f}", end_to_end=True))
    cal_nats = [r["prompt_nats"] if r["scored_tokens"] >= MIN_SCORED_TOKENS else float("nan") for r in calib]
    cal_lp = [r["mean_logprob"] for r in calib]
    policies += [
        summary("default policy on the 40 fresh prompts", [r.source != "local" for r in fresh_results],
                "written after the factors were fixed", end_to_end=True, rows=fresh),
        summary("uncertainty, `min_confidence=-2.0` (the old docs' example)", by_threshold(mean_lp, -2.0, False)),
        summary("uncertainty calibrated to a 50 % share", by_threshold(mean_lp, t := share_threshold(cal_lp, 0.5, False),
                                                                       False), f"threshold {t:.3f}"),
        summary("prompt score `max_prompt_nats=4.0`", by_threshold(nats, 4.0, True, True)),
        summary("prompt score calibrated to a 50 % share", by_threshold(nats, t := share_threshold(cal_nats, 0.5, True),
                                                                        True, True), f"threshold {t:.3f}"),
    ]

    # Accuracy on the questions against the share of all test prompts sent, sending the k most cloud-ward.
    order = {
        "prompt-score": sorted(range(len(test)), key=lambda i: -nats[i]),
        "uncertainty (mean logprob)": sorted(range(len(test)), key=lambda i: mean_lp[i]),
        "uncertainty (min logprob)": sorted(range(len(test)), key=lambda i: test[i]["min_logprob"]),
        "length": sorted(range(len(test)), key=lambda i: -test[i]["prompt_tokens"]),
    }
    curves = {}
    for name, idx in order.items():
        pts = []
        for k in range(len(test) + 1):
            sent = set(idx[:k])
            right = sum((r["cloud_ok"] if i in sent else r["local_ok"]) for i, r in enumerate(test)
                        if r["kind"] == "question")
            pts.append([k / len(test), right / nq])
        curves[name] = pts
    local_right = sum(r["local_ok"] for r in questions)
    curves["random"] = [[k / len(test), (local_right + k / len(test) * (cloud_right - local_right)) / nq]
                        for k in range(len(test) + 1)]
    is_q = [r["kind"] == "question" for r in test]
    separation = {name: auroc([v for v, q in zip(vals, is_q) if not q], [v for v, q in zip(vals, is_q) if q])
                  for name, vals in (("prompt-score", nats), ("uncertainty (mean logprob)", [-v for v in mean_lp]),
                                     ("uncertainty (min logprob)", [-r["min_logprob"] for r in test]),
                                     ("length", [r["prompt_tokens"] for r in test]))}
    rng = {k: [round(min(r[f] for r in rows), 3), round(max(r[f] for r in rows), 3)]
           for k, rows in (("story", stories), ("question", questions)) for f in ("prompt_nats",)}
    examples_idx = [0, 1, 20, 50, 59] + [60, 61, 72, 100, 119]
    examples = [{"prompt": test[i]["prompt"], "kind": test[i]["kind"], "source": default_results[i].source,
                 "reason": default_results[i].reason, "endpoint": default_results[i].cloud_endpoint,
                 "answer": default_results[i].text.strip()[:120],
                 "right": None if test[i]["kind"] == "story" else rp.correct(default_results[i].text,
                                                                             test[i]["keywords"])}
                for i in examples_idx]
    dflt = policies[3]
    lab = policies[4]
    result = {
        "local": str((args.local or local.path).name), "cloud": args.cloud.name, "reference_nats_per_token": ref,
        "generate": greedy, "test": {"stories": ns, "questions": nq}, "calibration": {"stories": len(cal_s),
                                                                                      "questions": len(cal_q)},
        "policies": policies, "auroc_test": separation, "prompt_nats_range": rng,
        "goals": {"default": {"of_all_cloud": dflt["of_all_cloud"], "stories_to_cloud": dflt["stories_to_cloud"],
                              "met": dflt["of_all_cloud"] >= 0.9 and dflt["stories_to_cloud"] <= 0.10},
                  "labelled": {"of_all_cloud": lab["of_all_cloud"], "stories_to_cloud": lab["stories_to_cloud"],
                               "met": lab["of_all_cloud"] >= 0.95 and lab["stories_to_cloud"] <= 0.05},
                  "default_fresh": {"of_all_cloud": policies[6]["of_all_cloud"],
                                    "stories_to_cloud": policies[6]["stories_to_cloud"]}},
        "labelled_reports": {k: str(v[0]) for k, v in labelled.items()},
        "examples": examples, "story_via_chat": [{"prompt": p, "chat": a.strip()[:160], "completions": r["cloud"].strip()[:160]}
                                                 for p, a, r in zip(test_s, as_chat, test)],
        "curves": curves, "seconds": round(elapsed, 1), "rows": test, "fresh_rows": fresh,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / MIXED_JSON.name).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    (args.out / MIXED_MD.name).write_text(mixed_markdown(result), encoding="utf-8")
    print(mixed_markdown(result))
    if args.plot:
        plot_mixed(result, args.plot)
    return 0


def mixed_markdown(res: dict) -> str:
    """The results table and the default policy's decisions, as spliced into docs/hybrid.md."""
    t, c = res["test"], res["calibration"]
    lines = [f"Local `{res['local']}` (held-out {res['reference_nats_per_token']:.3f} nats/token), cloud "
             f"`{res['cloud']}` behind `edgelm serve` on 127.0.0.1; {t['stories']} story openings + {t['questions']} "
             f"questions (test split; calibration split {c['stories']} + {c['questions']}), greedy, "
             f"{res['generate']['max_new_tokens']} new tokens.", "",
             "| policy | questions answered right | of all-cloud | stories sent to the cloud | questions sent | "
             "cloud calls | notes |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for p in res["policies"]:
        right = f"{p['right']:g} / {p['of']}"
        share = "–" if p["of_all_cloud"] is None else f"{100 * p['of_all_cloud']:.0f} %"
        note = p["note"] + ("; end to end through `Hybrid`" if p["end_to_end"] else "")
        lines.append(f"| {p['policy']} | {right} | {share} | {100 * p['stories_to_cloud']:.1f} % | "
                     f"{100 * p['questions_to_cloud']:.1f} % | {p['cloud_calls']:g} | {note.strip('; ')} |")
    g = res["goals"]
    lines += ["", "Goals: default policy ≥ 90 % of all-cloud accuracy with ≤ 10 % of stories sent: "
              f"{100 * g['default']['of_all_cloud']:.0f} % with {100 * g['default']['stories_to_cloud']:.1f} % "
              f"(**{'met' if g['default']['met'] else 'missed'}**); labelled calibration ≥ 95 % with ≤ 5 %: "
              f"{100 * g['labelled']['of_all_cloud']:.0f} % with {100 * g['labelled']['stories_to_cloud']:.1f} % "
              f"(**{'met' if g['labelled']['met'] else 'missed'}**). On the 40 fresh prompts, written after the "
              f"default factors were fixed: {100 * g['default_fresh']['of_all_cloud']:.0f} % with "
              f"{100 * g['default_fresh']['stories_to_cloud']:.1f} %.", "",
              "Separation of stories from questions on the test split (AUROC, 1.0 = perfect): " +
              ", ".join(f"{k} {v:.3f}" for k, v in res["auroc_test"].items()) + ". Prompt nats/token: stories "
              f"{res['prompt_nats_range']['story'][0]}–{res['prompt_nats_range']['story'][1]}, questions "
              f"{res['prompt_nats_range']['question'][0]}–{res['prompt_nats_range']['question'][1]}.", "",
              "The default policy's decisions on ten of the test prompts:", "",
              "| prompt | went to | reason | answer (start) |", "| --- | --- | --- | --- |"]
    for e in res["examples"]:
        where = e["source"] + (f" (`/{'chat/' if e['endpoint'] == 'chat' else ''}completions`)" if e["endpoint"] else "")
        mark = "" if e["right"] is None else (" ✓" if e["right"] else " ✗")
        ans = e["answer"].replace("\n", " ").replace("|", "\\|")[:90]
        lines.append(f"| {e['prompt']} | {where} | {e['reason']} | {ans}{mark} |")
    return "\n".join(lines) + "\n"


def plot_mixed(res: dict, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed; no plot", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(6.6, 4.4), dpi=110)
    styles = {"prompt-score": "-", "uncertainty (mean logprob)": "-", "uncertainty (min logprob)": "-.",
              "length": ":", "random": "--"}
    for name, pts in res["curves"].items():
        ax.plot([100 * x for x, _ in pts], [100 * y for _, y in pts], styles.get(name, "-"), label=name)
    marks = {"default policy": ("k*", 3), "labelled, prompt score": ("rD", 4), "labelled, uncertainty": ("bs", 5)}
    for label, (style, i) in marks.items():
        p = res["policies"][i]
        share = p["cloud_calls"] / (res["test"]["stories"] + res["test"]["questions"])
        ax.plot([100 * share], [100 * p["right"] / p["of"]], style, markersize=9, label=label)
    ax.set_xlabel("test prompts sent to the cloud (%); half of them are questions")
    ax.set_ylabel("questions answered right (%)")
    ax.set_title(f"local {res['local']} vs cloud {res['cloud']}, greedy", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    print(f"wrote {path}")


def splice(doc: str, name: str, text: str) -> str:
    """Replace what lies between <!-- results/NAME --> and <!-- end results/NAME --> in ``doc`` with ``text``."""
    begin, end = f"<!-- results/{name} -->", f"<!-- end results/{name} -->"
    i, j = doc.index(begin) + len(begin), doc.index(end)
    return doc[:i] + "\n" + text.strip() + "\n" + doc[j:]


def docs() -> None:
    """Splice benchmarks/results/routing-mixed.md into docs/hybrid.md."""
    DOC.write_text(splice(DOC.read_text(encoding="utf-8"), MIXED_MD.name, MIXED_MD.read_text(encoding="utf-8")),
                   encoding="utf-8")


if __name__ == "__main__":
    argv = sys.argv[1:]
    cmd = argv.pop(0) if argv and argv[0] in ("mixed", "pair", "docs") else "mixed"
    if cmd == "docs":
        docs()
        sys.exit(0)
    sys.exit(mixed_main(argv) if cmd == "mixed" else pair_main(argv))
