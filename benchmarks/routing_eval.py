"""Routing evaluation: answer quality against the share of queries sent to the "cloud".

Setup (all on this machine, nothing leaves it):
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

    python benchmarks/routing_eval.py --n 200 --plot docs/hybrid-routing.png --json docs/hybrid-routing.json
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
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


if __name__ == "__main__":
    sys.exit(main())
