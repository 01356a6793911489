"""`import edgelm` stays light: no torch / transformers / optimum / httpx / starlette, ever (checked in a fresh
interpreter, since this test process may have imported them already)."""
from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ["torch", "transformers", "optimum", "httpx", "starlette", "uvicorn", "edgelm_export"]


def loaded_after(code: str) -> set[str]:
    probe = code + f"\nimport sys, json; print(json.dumps(sorted(m for m in {HEAVY + ['onnxruntime']!r} " \
                   "if m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_import_edgelm_is_light():
    # onnxruntime is imported by load(), not by import: the CLI's --help and the server's import stay fast.
    assert loaded_after("import edgelm") == set()


def test_runtime_modules_do_not_pull_heavy_packages():
    code = ("import edgelm, edgelm.model, edgelm.tokenizer, edgelm.sampling, edgelm.folder, edgelm.errors\n"
            "import edgelm.commands.generate, edgelm.commands.chat, edgelm.commands.info")
    assert loaded_after(code) <= {"onnxruntime"}


def test_generating_does_not_pull_heavy_packages(stories_fp32):
    code = (f"import edgelm\nlm = edgelm.load({str(stories_fp32)!r}, threads=1)\n"
            "lm.generate('Once upon a time', max_new_tokens=5)\nlm.score('Tom has a ball.')\n"
            "list(lm.chat_stream([{'role': 'user', 'content': 'Hi'}], max_new_tokens=5))")
    assert loaded_after(code) == {"onnxruntime"}
