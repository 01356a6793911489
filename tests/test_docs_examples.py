"""Docs that run: every fenced Python and shell example in README.md and docs/*.md is executed.

Each document's examples run in order, in one temporary copy of the files a fresh clone has (`git ls-files`),
with `../shared` beside it (a link to the shared data) and `edgelm` the installed command. Python blocks run in
one subprocess per document with a shared namespace (so a later block may use the `lm` an earlier one loaded);
shell blocks run with bash (`set -euo pipefail`), each with a timeout. `console` blocks run their `$ ` lines.

An example that cannot run here says so right above its fence, with one of the reasons in REASONS:

    <!-- edgelm-docs: skip reason=network (a hub id) -->
    ```bash
    edgelm export org/name --out models/x
    ```

Unmarked examples must run; skipped ones are listed with their reasons at the end of the test run. Every fence
names its language, so an example cannot escape by having none (`text` for output, listings and synopses).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import SHARED

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN = {"python": "python", "bash": "shell", "sh": "shell", "shell": "shell", "console": "console"}
REASONS = {
    "network": "needs the internet (a hub id, a remote endpoint, a download)",
    "gpu": "needs a CUDA GPU",
    "long": "takes longer than this test's budget (a real training run, a large export, a full benchmark)",
    "server": "needs a running server, or starts one that blocks",
    "system": "changes the machine (sudo, apt, systemd, root-only tools) or needs other hardware",
    "install": "installs packages (this test runs against the edgelm already installed)",
    "synopsis": "a signature or usage listing, not code to run",
}
# Documents whose examples export or train models: minutes, not seconds.
SLOW = {"docs/distillation.md", "docs/export.md", "docs/models.md", "README.md"}
SKIP_RE = re.compile(r"<!--\s*edgelm-docs:\s*skip\s+reason=(\w+)(.*?)-->")
BLOCK_TIMEOUT_S = 600
# Commands that change the machine or run for long: an example using one must carry a skip marker (checked
# before anything runs), so a missing marker fails here instead of running them.
GUARDED = re.compile(r"\b(sudo|apt|apt-get|systemctl|journalctl|useradd|debootstrap|chroot)\b|arm64-smoke|\.ci/run|"
                     r"\bpip\b|\bpip3\b|edgelm serve\b|http://|https://")


@dataclass
class Example:
    doc: str          # path relative to the repository root
    line: int         # line of the opening fence
    lang: str
    code: str
    skip: tuple[str, str] | None   # (reason, note)

    @property
    def name(self) -> str:
        return f"{self.doc}:{self.line}"


def _fences(path: Path) -> list[tuple[int, str, str, str]]:
    """(line, language, body, the nearest non-blank line above the fence) for every fenced block."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out, i = [], 0
    while i < len(lines):
        m = re.match(r"^(`{3,})(\S*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        start, fence, lang = i, m.group(1), m.group(2)
        j = i + 1
        while j < len(lines) and not re.match(rf"^{fence}\s*$", lines[j]):
            j += 1
        above = next((lines[k] for k in range(start - 1, -1, -1) if lines[k].strip()), "")
        out.append((start + 1, lang, "\n".join(lines[start + 1:j]) + "\n", above))
        i = j + 1
    return out


def collect(path: Path) -> list[Example]:
    rel = path.relative_to(ROOT).as_posix()
    examples = []
    for line, lang, body, above in _fences(path):
        if lang not in RUN:
            continue
        m = SKIP_RE.search(above)
        skip = (m.group(1), m.group(2).strip()) if m else None
        examples.append(Example(rel, line, RUN[lang], body, skip))
    return examples


def _console_commands(body: str) -> str:
    """The `$ ` lines of a console block (with their backslash continuations); the rest is output."""
    cmds, cont = [], False
    for line in body.splitlines():
        if cont or line.startswith("$ "):
            cmds.append(line if cont else line[2:])
            cont = line.rstrip().endswith("\\")
    return "\n".join(cmds) + "\n"


_DRIVER = r'''
import json, signal, subprocess, sys, time, traceback
examples = json.load(open(sys.argv[1]))
ns = {"__name__": "__main__"}
failed = []

def _alarm(signum, frame):
    raise TimeoutError("example ran past its timeout")

signal.signal(signal.SIGALRM, _alarm)
for ex in examples:
    print(f"\n=== {ex['name']} ({ex['lang']})", flush=True)
    t0 = time.perf_counter()
    ok = True
    if ex["lang"] == "python":
        signal.alarm(ex["timeout"])
        try:
            exec(compile(ex["code"], ex["name"], "exec"), ns)
        except BaseException:
            traceback.print_exc()
            ok = False
        finally:
            signal.alarm(0)
        sys.stdout.flush()
    else:
        try:
            r = subprocess.run(["bash", "-c", "set -euo pipefail\n" + ex["code"]], stdin=subprocess.DEVNULL,
                               timeout=ex["timeout"])
            ok = r.returncode == 0
            if not ok:
                print(f"exit status {r.returncode}")
        except subprocess.TimeoutExpired:
            print(f"ran past {ex['timeout']} s")
            ok = False
    print(f"=== {ex['name']}: {'ok' if ok else 'FAILED'} in {time.perf_counter() - t0:.1f} s", flush=True)
    if not ok:
        failed.append(ex["name"])
print("\nFAILED: " + ", ".join(failed) if failed else "\nall examples ran")
sys.exit(1 if failed else 0)
'''


def _fresh_clone(dest: Path) -> Path:
    """The files a fresh clone has (tracked files, as they are in the working tree), with ../shared beside."""
    repo = dest / "clone"       # not "edgelm": the driver's folder is on sys.path, beside it
    try:
        names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
        files = [n for n in names.decode().split("\0") if n]
    except (OSError, subprocess.CalledProcessError):
        pytest.fail("tests/test_docs_examples.py needs a git checkout (it copies the tracked files)")
    for name in files:
        src, dst = ROOT / name, repo / name
        if not src.is_file():          # deleted in the working tree
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.stat().st_size > 1 << 20:
            os.link(src, dst)          # weights and logs: read by the examples, never written in place
        else:
            shutil.copy2(src, dst)
    (dest / "shared").symlink_to(SHARED, target_is_directory=True)
    return repo


def _env(tmp: Path) -> dict:
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    home = tmp / "home"          # `~/...` in an example lands here, not in the real home folder
    home.mkdir(exist_ok=True)
    env.update(EDGELM_SHARED=str(tmp / "shared"), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", HOME=str(home),
               MPLBACKEND="Agg")
    return env


ALL = [ex for doc in DOCS for ex in collect(doc)]
_SKIPPED = [ex for ex in ALL if ex.skip]


@pytest.fixture(scope="module", autouse=True)
def _list_skipped(request):
    """Name every skipped example, with its reason, in the summary at the end of the run."""
    class _Summary:
        def pytest_terminal_summary(self, terminalreporter):
            terminalreporter.section("docs examples skipped by their marker")
            for ex in _SKIPPED:
                reason, note = ex.skip
                first = ex.code.strip().splitlines()[0][:60]
                terminalreporter.write_line(f"{ex.name} [{first}]: {reason} {note}".rstrip())

    plugin = _Summary()
    if request.config.pluginmanager.get_plugin("edgelm-docs-skipped") is None:
        request.config.pluginmanager.register(plugin, name="edgelm-docs-skipped")
    yield


def _problems(docs: list[Path]) -> dict[str, list[str]]:
    """What is wrong with the fences and markers of `docs` (empty lists when nothing is)."""
    p = {"bare": [], "unknown": [], "stray": [], "unguarded": []}
    for doc in docs:
        rel = doc.relative_to(ROOT).as_posix()
        for line, lang, _body, above in _fences(doc):
            if not lang:
                p["bare"].append(f"{rel}:{line}")
            m = SKIP_RE.search(above)
            if m and m.group(1) not in REASONS:
                p["unknown"].append(f"{rel}:{line} ({m.group(1)})")
            if m and lang not in RUN:
                p["stray"].append(f"{rel}:{line} ({lang or 'no language'})")
        text = doc.read_text(encoding="utf-8")
        # A marker must sit right above a fence; one anywhere else would be a silent no-op.
        for m in SKIP_RE.finditer(text):
            if not text[m.end():].lstrip("\n ").startswith("```"):
                p["stray"].append(f"{rel}:{text[:m.start()].count(chr(10)) + 1} (marker not above a fence)")
        for ex in collect(doc):
            hit = GUARDED.search(ex.code)
            if not ex.skip and hit:
                p["unguarded"].append(f"{ex.name} ({hit.group(0)})")
    return p


def test_every_fence_names_its_language_and_every_skip_a_known_reason():
    p = _problems(DOCS)
    assert not p["unguarded"], "examples that change the machine, install, serve or use the network need a " \
                               f"marker: {p['unguarded']}"
    assert not p["bare"], f"fences without a language (use text for output and listings): {p['bare']}"
    assert not p["unknown"], f"unknown skip reasons (known: {sorted(REASONS)}): {p['unknown']}"
    assert not p["stray"], f"skip markers on something that would not run anyway: {p['stray']}"
    assert len(ALL) - len(_SKIPPED) >= 10, "most examples should run"


def _doc_param(doc: Path):
    rel = doc.relative_to(ROOT).as_posix()
    marks = [pytest.mark.slow] if rel in SLOW else []
    return pytest.param(rel, id=rel, marks=marks)


@pytest.mark.parametrize("doc", [_doc_param(d) for d in DOCS if any(not e.skip for e in collect(d))])
def test_doc_examples_run(doc, tmp_path):
    unguarded = _problems([ROOT / doc])["unguarded"]
    assert not unguarded, f"not run: these need a skip marker first: {unguarded}"   # never run a bare sudo
    examples = [ex for ex in ALL if ex.doc == doc and not ex.skip]
    repo = _fresh_clone(tmp_path)
    payload = [{"name": ex.name, "lang": ex.lang, "timeout": BLOCK_TIMEOUT_S,
                "code": _console_commands(ex.code) if ex.lang == "console" else ex.code} for ex in examples]
    driver = tmp_path / "driver"      # its own folder: the first entry of the examples' sys.path
    driver.mkdir()
    (driver / "examples.json").write_text(json.dumps(payload), encoding="utf-8")
    (driver / "driver.py").write_text(textwrap.dedent(_DRIVER), encoding="utf-8")
    r = subprocess.run([sys.executable, str(driver / "driver.py"), str(driver / "examples.json")], cwd=repo,
                       env=_env(tmp_path), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=BLOCK_TIMEOUT_S * (len(examples) + 1))
    print(r.stdout)                    # shown with -rP / -s: what each example printed and how long it took
    assert r.returncode == 0, f"examples in {doc} failed:\n{r.stdout[-12000:]}"


def test_the_parser_reads_languages_markers_and_console_commands(tmp_path):
    md = tmp_path / "x.md"
    md.write_text("Intro.\n\n<!-- edgelm-docs: skip reason=gpu (needs CUDA) -->\n```python\nimport torch\n```\n\n"
                  "```console\n$ edgelm info \\\n    --card\noutput line\n$ echo hi\nhi\n```\n\n"
                  "````text\n```python\nnot an example\n```\n````\n", encoding="utf-8")
    fences = _fences(md)
    assert [(line, lang) for line, lang, _b, _a in fences] == [(4, "python"), (8, "console"), (16, "text")]
    assert fences[2][2] == "```python\nnot an example\n```\n"          # a longer fence holds a shorter one
    m = SKIP_RE.search(fences[0][3])
    assert (m.group(1), m.group(2).strip()) == ("gpu", "(needs CUDA)")
    assert SKIP_RE.search(fences[1][3]) is None                        # a marker covers only the next fence
    assert _console_commands(fences[1][2]) == "edgelm info \\\n    --card\necho hi\n"
