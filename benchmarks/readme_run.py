"""The README's first example output, from a recorded run instead of a pasted one.

    python benchmarks/readme_run.py run     # run the command, write benchmarks/results/readme-run.json
    python benchmarks/readme_run.py docs    # put that run into README.md's output block

`run` executes the installed `edgelm generate "Once upon a time" -t 0` (greedy, so the text is the same on every
machine; the speed is this machine's), and records stdout, the stats line from stderr, and where it ran.
`docs` rewrites the ```text block right after the README's first command from the results file alone;
tests/test_docs_results.py checks the two agree.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import textwrap
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "readme-run.json"
README = ROOT / "README.md"
COMMAND = ["edgelm", "generate", "Once upon a time", "-t", "0"]
WIDTH = 114          # the README's prose width
SHOWN_LINES = 2      # wrapped lines of the first paragraph shown before "..."


def run() -> dict:
    r = subprocess.run(COMMAND, capture_output=True, text=True, check=True, cwd=ROOT)
    stats = [ln for ln in r.stderr.splitlines() if ln.startswith("[") and "tokens/s" in ln]
    import onnxruntime
    return {"command": COMMAND, "stdout": r.stdout, "stats": stats[-1],
            "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()}, {os.cpu_count()} vCPUs, 1-minute load average "
                       f"{os.getloadavg()[0]:.1f}", "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__}


def render(result: dict) -> str:
    """The README's output block for one recorded run: the start of the story, "...", the stats line."""
    first = result["stdout"].strip().split("\n\n")[0]
    lines = textwrap.wrap(first, WIDTH)[:SHOWN_LINES]
    return "```text\n" + "\n".join(lines) + "\n...\n" + result["stats"] + "\n```"


def splice(readme: str, result: dict) -> str:
    """README with the output block after its first ```bash block replaced by render(result)."""
    m = re.search(r"```bash\n.*?```\n\n(```text\n.*?```)", readme, flags=re.S)
    if not m:
        raise SystemExit("README.md: no ```text block right after the first ```bash block")
    return readme[:m.start(1)] + render(result) + readme[m.end(1):]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["run", "docs"])
    args = ap.parse_args()
    if args.what == "run":
        RESULTS.write_text(json.dumps(run(), indent=1) + "\n", encoding="utf-8")
        print(f"wrote {RESULTS.relative_to(ROOT)}")
    else:
        result = json.loads(RESULTS.read_text(encoding="utf-8"))
        README.write_text(splice(README.read_text(encoding="utf-8"), result), encoding="utf-8")
        print(f"updated {README.relative_to(ROOT)}")


if __name__ == "__main__":
    sys.exit(main())
