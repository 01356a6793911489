"""Soak / load test for `edgelm serve`: requests/s, latency percentiles and server memory over a bounded run.

Starts `edgelm serve MODEL --port 0` as a child process (so its RSS is the server's alone), drives it with
CLIENTS concurrent HTTP clients for DURATION seconds (or MAX_REQUESTS requests, whichever comes first), and
prints a JSON report and a markdown table. Everything is bounded: the run stops at the deadline even if
the server misbehaves, and the server is always stopped.

    python benchmarks/serve_load.py MODEL_FOLDER --duration 30 --clients 16 --json out.json

Requests cycle through completions, chat completions and streamed chat completions (time to first token
is measured on the streamed ones) with greedy decoding and `max_tokens` fixed by --max-tokens.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil

PROMPTS = ["Once upon a time", "The little dog ran to the park and", "Lily had a red ball.", "One day, a bird",
           "Tom and his mom went to the store."]


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    idx = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[idx]


def _drain(stream) -> None:
    for _ in stream:
        pass


def start_server(model: str, workers: int, max_queue: int, threads: int | None) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "edgelm.cli", "serve", model, "--port", "0", "--workers", str(workers),
           "--max-queue", str(max_queue), "--log-level", "warning"]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                raise SystemExit(f"serve_load: the server exited with {proc.returncode} before printing its URL")
            continue
        m = re.search(r"(http://[^\s]+?)/v1", line)
        if m:
            # Keep draining its output so the pipe never fills and blocks the server.
            threading.Thread(target=_drain, args=(proc.stdout,), daemon=True).start()
            return proc, m.group(1)
    proc.kill()
    raise SystemExit("serve_load: the server did not print its URL within 120 s")


def run_load(url: str, *, clients: int, duration: float, max_requests: int, max_tokens: int,
             timeout: float) -> dict:
    lock = threading.Lock()
    latencies: list[float] = []
    ttfts: list[float] = []
    errors: dict[str, int] = {}
    counters = {"sent": 0, "ok": 0, "completion_tokens": 0}
    deadline = time.monotonic() + duration

    def take_ticket() -> int | None:
        with lock:
            if counters["sent"] >= max_requests or time.monotonic() >= deadline:
                return None
            counters["sent"] += 1
            return counters["sent"]

    def client(c: int) -> None:
        with httpx.Client(base_url=url, timeout=timeout) as http:
            while (n := take_ticket()) is not None:
                prompt = PROMPTS[n % len(PROMPTS)]
                mode = n % 3
                t0 = time.perf_counter()
                ttft = None
                try:
                    if mode == 0:
                        r = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens,
                                                               "temperature": 0})
                        tokens = r.json()["usage"]["completion_tokens"] if r.status_code == 200 else 0
                    elif mode == 1:
                        r = http.post("/v1/chat/completions", json={
                            "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                            "temperature": 0})
                        tokens = r.json()["usage"]["completion_tokens"] if r.status_code == 200 else 0
                    else:
                        tokens, done = 0, False
                        with http.stream("POST", "/v1/chat/completions", json={
                                "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                                "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}) as r:
                            for line in r.iter_lines():
                                if not line.startswith("data: "):
                                    continue
                                if line == "data: [DONE]":
                                    done = True
                                    break
                                chunk = json.loads(line[6:])
                                if ttft is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                                    ttft = time.perf_counter() - t0
                                if chunk.get("usage"):
                                    tokens = chunk["usage"]["completion_tokens"]
                        if r.status_code == 200 and not done:
                            raise RuntimeError("stream ended without [DONE]")
                    status = r.status_code
                except Exception as exc:  # noqa: BLE001 - counted, the run goes on
                    status = type(exc).__name__
                dt = time.perf_counter() - t0
                with lock:
                    if status == 200:
                        counters["ok"] += 1
                        counters["completion_tokens"] += tokens
                        latencies.append(dt)
                        if ttft is not None:
                            ttfts.append(ttft)
                    else:
                        errors[str(status)] = errors.get(str(status), 0) + 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(duration + timeout + 10)
    elapsed = time.perf_counter() - t0
    latencies.sort()
    ttfts.sort()
    return {
        "requests": counters["sent"], "ok": counters["ok"], "errors": errors, "elapsed_s": round(elapsed, 3),
        "requests_per_s": round(counters["ok"] / elapsed, 2),
        "completion_tokens_per_s": round(counters["completion_tokens"] / elapsed, 1),
        "latency_ms": {k: round(_percentile(latencies, q) * 1000, 1)
                       for k, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))},
        "stream_ttft_ms": {k: round(_percentile(ttfts, q) * 1000, 1) for k, q in (("p50", 0.5), ("p95", 0.95))},
    }


def markdown(report: dict) -> str:
    r = report
    rows = [
        ("requests (ok / sent)", f"{r['ok']} / {r['requests']}"),
        ("errors", ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "none"),
        ("duration", f"{r['elapsed_s']:.1f} s"),
        ("requests/s", f"{r['requests_per_s']:.1f}"),
        ("completion tokens/s", f"{r['completion_tokens_per_s']:.0f}"),
        ("latency p50 / p95 / p99", "{p50:.0f} / {p95:.0f} / {p99:.0f} ms".format(**r["latency_ms"])),
        ("stream time to first token p50 / p95", "{p50:.0f} / {p95:.0f} ms".format(**r["stream_ttft_ms"])),
        ("server RSS before / after / peak", f"{r['rss_mb']['before']:.1f} / {r['rss_mb']['after']:.1f} / "
                                              f"{r['rss_mb']['peak']:.1f} MB"),
    ]
    cfg = r["config"]
    head = (f"`{Path(cfg['model']).name}`, {cfg['clients']} clients, {cfg['workers']} workers, "
            f"max_tokens {cfg['max_tokens']}\n\n")
    return head + "| metric | value |\n| --- | --- |\n" + "\n".join(f"| {a} | {b} |" for a, b in rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="model folder to serve")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of load (default %(default)s)")
    ap.add_argument("--max-requests", type=int, default=100_000, help="stop after this many requests")
    ap.add_argument("--clients", type=int, default=16, help="concurrent clients (default %(default)s)")
    ap.add_argument("--workers", type=int, default=2, help="server generation workers (default %(default)s)")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime threads per generation (default %(default)s)")
    ap.add_argument("--max-tokens", type=int, default=32, help="max_tokens per request (default %(default)s)")
    ap.add_argument("--timeout", type=float, default=60.0, help="per-request timeout in seconds")
    ap.add_argument("--json", type=Path, default=None, help="also write the JSON report here")
    args = ap.parse_args(argv)

    proc, url = start_server(args.model, args.workers, max(args.clients * 2, 8), args.threads)
    server = psutil.Process(proc.pid)
    peak = [0]
    stop_sampling = threading.Event()

    def sample_rss() -> None:
        while not stop_sampling.wait(0.25):
            try:
                peak[0] = max(peak[0], server.memory_info().rss)
            except psutil.Error:
                return

    try:
        # Warm up (first requests pay for lazy initialisation), then measure RSS before the load.
        with httpx.Client(base_url=url, timeout=args.timeout) as http:
            for p in PROMPTS:
                http.post("/v1/completions", json={"prompt": p, "max_tokens": args.max_tokens, "temperature": 0})
        rss_before = server.memory_info().rss
        peak[0] = rss_before
        sampler = threading.Thread(target=sample_rss, daemon=True)
        sampler.start()
        report = run_load(url, clients=args.clients, duration=args.duration, max_requests=args.max_requests,
                          max_tokens=args.max_tokens, timeout=args.timeout)
        stop_sampling.set()
        rss_after = server.memory_info().rss
    finally:
        stop_sampling.set()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    mb = 1 << 20
    report["rss_mb"] = {"before": round(rss_before / mb, 1), "after": round(rss_after / mb, 1),
                        "peak": round(max(peak[0], rss_after) / mb, 1)}
    report["config"] = {"model": args.model, "clients": args.clients, "workers": args.workers,
                        "threads": args.threads, "max_tokens": args.max_tokens, "duration_s": args.duration,
                        "cpu_count": os.cpu_count()}
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    print()
    print(markdown(report))
    return 0 if not report["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
