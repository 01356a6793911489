"""What verifying a small model folder's checksums costs in memory and time: CPython's built-in sha256 against
hashlib's (OpenSSL). Each figure is measured in a fresh interpreter that has already imported numpy, onnxruntime
and tokenizers (as edgelm's runtime has), so the resident-memory delta is what the import adds to a real process.

    python benchmarks/sha256_small_files.py     # results/sha256-small-files.{json,md}
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
NAME = "sha256-small-files"

PROBE = r"""
import json, os, sys, time
import numpy, onnxruntime, tokenizers  # the runtime's own imports come first
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
before = rss()
which = sys.argv[1]
if which == "hashlib":
    import hashlib
    new = hashlib.sha256
else:
    try:
        from _sha2 import sha256 as new
    except ImportError:
        from _sha256 import sha256 as new
after = rss()
data = os.urandom(64 << 20)
times = []
for _ in range(3):
    t0 = time.perf_counter()
    new(data).hexdigest()
    times.append(time.perf_counter() - t0)
print(json.dumps({"import_rss_bytes": after - before, "mb_per_s": 64 / min(times)}))
"""


def main() -> None:
    rows = {}
    for which in ("built-in", "hashlib"):
        runs = [json.loads(subprocess.run([sys.executable, "-c", PROBE, which], capture_output=True, text=True,
                                          check=True).stdout) for _ in range(3)]
        rows[which] = {"import_rss_mib": sorted(r["import_rss_bytes"] for r in runs)[1] / 2**20,
                       "mb_per_s": sorted(r["mb_per_s"] for r in runs)[1]}
    out = {"python": platform.python_version(), "machine": platform.machine(), "loadavg_1min": os.getloadavg()[0],
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "command": "python benchmarks/sha256_small_files.py", "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{NAME}.json").write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    lines = [f"sha256 in a process that has imported numpy, onnxruntime and tokenizers (Python {out['python']}, "
             f"{out['machine']}, {out['date']}, load {out['loadavg_1min']:.2f}; `{out['command']}`; medians of 3 "
             "fresh interpreters).", "",
             "| implementation | resident memory its import adds | hashing speed |", "|---|---:|---:|"]
    for which, r in rows.items():
        lines.append(f"| {which} | {r['import_rss_mib']:.1f} MiB | {r['mb_per_s']:,.0f} MB/s |")
    (RESULTS / f"{NAME}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
