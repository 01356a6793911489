"""The cloud client against each fault server of the test suite: what it raises or returns, how many requests
reached the server, and how long the call took (docs/hybrid.md's fault matrix).

Uses the same loopback fault servers as tests/test_cloud.py (tests/faults.py), with
``CloudClient(url, timeout=2, backoff=0.05, max_retries=2)``. The outcomes and request counts are deterministic;
the seconds are wall clock (retries sleep a random backoff), so they vary a little from run to run. About 5 s:

    nice -n 10 python benchmarks/fault_matrix.py      # results/fault-matrix.{json,md}
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from edgelm.cloud import CloudClient  # noqa: E402
from edgelm.errors import CloudError, CloudHTTPError  # noqa: E402
from doc_numbers import stamp, write_results  # noqa: E402
from faults import (FaultServer, broken_stream, free_port_refusing, garbage_stream, hang, malformed, ok,  # noqa: E402
                    reset, status)

NAME = "fault-matrix"
MSGS = [{"role": "user", "content": "Tell me a story."}]
SETTINGS = {"timeout": 2, "backoff": 0.05, "max_retries": 2}

# (fault, behaviours of the server or None for a refused connection, streamed?)
FAULTS = [
    ("hang (never answers)", [hang()], False),
    ("TCP reset", [reset()], False),
    ("connection refused", None, False),
    ("500, 500, 500", [status(500)], False),
    ("500, 503, then OK", [status(500), status(503), ok()], False),
    ("429 `Retry-After: 1`, then OK", [status(429, retry_after="1"), ok()], False),
    ("429 without `Retry-After` (always)", [status(429)], False),
    ("429 `Retry-After: 3600`", [status(429, retry_after="3600")], False),
    ("401", [status(401)], False),
    ("malformed JSON", [malformed()], False),
    ("stream cut after 2 pieces", [broken_stream("one two three four", after=2)], True),
    ("stream with a non-JSON event", [garbage_stream(after=1)], True),
]


def _outcome(exc: BaseException | None, reply, pieces: int | None) -> str:
    got = "" if pieces is None else f"{pieces} piece{'s' if pieces != 1 else ''}, then "
    if exc is None:
        return f"answer, {reply.attempts} attempt{'s' if reply.attempts != 1 else ''}"
    name = type(exc).__name__
    if isinstance(exc, CloudHTTPError):
        name += f" {exc.status_code}"
    return got + f"`{name}`"


def run_one(behaviours, streamed: bool) -> dict:
    srv = FaultServer(*behaviours).start() if behaviours is not None else None
    url = srv.url if srv else free_port_refusing()
    exc, reply, pieces = None, None, None
    try:
        with CloudClient(url, model="big", **SETTINGS) as client:
            t0 = time.perf_counter()
            try:
                if streamed:
                    pieces = 0
                    for _ in client.stream(MSGS):
                        pieces += 1
                else:
                    reply = client.chat(MSGS)
            except CloudError as e:
                exc = e
            seconds = time.perf_counter() - t0
    finally:
        if srv:
            srv.stop()
    return {"outcome": _outcome(exc, reply, pieces), "exception": type(exc).__name__ if exc else None,
            "requests_seen": len(srv.requests) if srv else 0, "seconds": round(seconds, 2)}


def markdown(res: dict) -> str:
    lines = [f"`CloudClient(url, timeout=2, backoff=0.05, max_retries=2)` against tests/faults.py's servers; "
             f"`python benchmarks/fault_matrix.py`, {res['when']}, {res['machine']}.", "",
             "| fault | client outcome | requests seen by the server | seconds |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['fault']} | {r['outcome']} | {r['requests_seen']} | {r['seconds']:.2f} |" for r in res["rows"]]
    return "\n".join(lines) + "\n"


def main() -> int:
    rows = [{"fault": name, **run_one(b, s)} for name, b, s in FAULTS]
    res = {**stamp(), "settings": SETTINGS, "rows": rows}
    write_results(NAME, res, markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
