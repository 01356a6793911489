"""A bounded load test: 200 requests from 20 concurrent clients against the real stories260K export.

Every response is checked against the text the Model gives directly for the same greedy settings, so a
lost, duplicated, cross-wired or truncated response fails the test, not only an error status.
"""
from __future__ import annotations

import threading
import time

import pytest

from conftest import needs_shared

pytestmark = [needs_shared()]

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

CLIENTS = 20
PER_CLIENT = 10
MAX_TOKENS = 16
TIME_LIMIT_S = 120  # a hard bound; on a 2-core dev box this finishes in a few seconds
PROMPTS = ["Once upon a time", "The little dog", "Lily and Tom went to the park.", "One day, a bird",
           "The sun was hot and"]


@pytest.mark.slow
def test_200_requests_from_20_clients(stories_int8):
    import edgelm
    from edgelm.server import BackgroundServer

    lm = edgelm.load(stories_int8, threads=1)
    expected = {p: lm.generate(p, max_new_tokens=MAX_TOKENS, temperature=0).text for p in PROMPTS}
    expected_chat = {p: lm.chat([{"role": "user", "content": p}], max_new_tokens=MAX_TOKENS, temperature=0).text
                     for p in PROMPTS}

    failures: list[str] = []
    latencies: list[float] = []
    lock = threading.Lock()
    deadline = time.monotonic() + TIME_LIMIT_S

    with BackgroundServer(lm, workers=2, max_queue=CLIENTS * 2) as srv:
        barrier = threading.Barrier(CLIENTS)

        def client(c: int) -> None:
            with httpx.Client(base_url=srv.url, timeout=60) as http:
                barrier.wait(timeout=30)
                for i in range(PER_CLIENT):
                    if time.monotonic() > deadline:
                        with lock:
                            failures.append(f"client {c}: out of time")
                        return
                    prompt = PROMPTS[(c + i) % len(PROMPTS)]
                    mode = (c + i) % 3  # completions, chat, streamed chat
                    t0 = time.perf_counter()
                    try:
                        if mode == 0:
                            r = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": MAX_TOKENS,
                                                                   "temperature": 0})
                            text = r.json()["choices"][0]["text"] if r.status_code == 200 else None
                            want = expected[prompt]
                        elif mode == 1:
                            r = http.post("/v1/chat/completions", json={
                                "messages": [{"role": "user", "content": prompt}], "max_tokens": MAX_TOKENS,
                                "temperature": 0})
                            text = r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else None
                            want = expected_chat[prompt]
                        else:
                            import json
                            parts, done = [], False
                            with http.stream("POST", "/v1/chat/completions", json={
                                    "messages": [{"role": "user", "content": prompt}], "max_tokens": MAX_TOKENS,
                                    "temperature": 0, "stream": True}) as r:
                                for line in r.iter_lines():
                                    if line == "data: [DONE]":
                                        done = True
                                    elif line.startswith("data: "):
                                        delta = json.loads(line[6:])["choices"][0]["delta"]
                                        parts.append(delta.get("content") or "")
                            text = "".join(parts) if r.status_code == 200 and done else None
                            want = expected_chat[prompt]
                    except Exception as exc:  # noqa: BLE001 - collected and reported below
                        with lock:
                            failures.append(f"client {c} request {i}: {exc!r}")
                        continue
                    with lock:
                        latencies.append(time.perf_counter() - t0)
                        if r.status_code != 200 or text != want:
                            failures.append(f"client {c} request {i}: {r.status_code} {text!r} != {want!r}")

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(c,)) for c in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIME_LIMIT_S + 30)
        elapsed = time.perf_counter() - t0
        stats = srv.state.engine.stats()

    assert not failures, failures[:5]
    assert len(latencies) == CLIENTS * PER_CLIENT
    assert stats["completed"] == CLIENTS * PER_CLIENT and stats["cancelled"] == 0
    latencies.sort()
    print(f"\n{len(latencies)} requests in {elapsed:.2f} s: {len(latencies) / elapsed:.1f} req/s, "
          f"p50 {latencies[len(latencies) // 2] * 1000:.0f} ms, p95 {latencies[int(len(latencies) * 0.95)] * 1000:.0f} ms")
    assert elapsed < TIME_LIMIT_S
