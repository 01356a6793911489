"""The README's two top commands stay true: CI runs the README's test command verbatim."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_ci_runs_the_readme_test_command():
    blocks = _bash_blocks((ROOT / "README.md").read_text())
    assert len(blocks) >= 2
    run_cmd, test_cmd = blocks[0], blocks[1]
    assert "edgelm generate" in run_cmd and "pip install" in run_cmd
    assert "pytest" in test_cmd
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd in ci.splitlines()


def test_readme_names_only_existing_docs():
    text = (ROOT / "README.md").read_text()
    for link in re.findall(r"\]\(([^)#]+)\)", text):
        assert (ROOT / link).exists(), link


# --- install advice that works off this machine (issue 16) ----------------------------------------------------------
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_the_readme_makes_a_virtual_environment_before_installing():
    """Debian's and Ubuntu's Python refuse `pip install` outside a venv (PEP 668)."""
    first = _bash_blocks((ROOT / "README.md").read_text())[0].splitlines()
    venv = next(i for i, line in enumerate(first) if re.search(r"python3? -m venv (\S+)", line))
    assert ". .venv/bin/activate" in first[venv] or "source .venv/bin/activate" in first[venv]
    assert venv < next(i for i, line in enumerate(first) if "pip install" in line)


def test_every_extra_install_gives_the_checkout_form_too():
    """`pip install "edgelm[X]"` needs edgelm on a package index; from a checkout it is `pip install ".[X]"`:
    wherever the docs give the first, the second is within two lines of it."""
    missing = []
    for doc in DOCS:
        lines = doc.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            for extra in re.findall(r'pip install "edgelm\[([\w,-]+)\]"', line):
                near = "\n".join(lines[i:i + 3])
                if f'".[{extra}]"' not in near:
                    missing.append(f"{doc.relative_to(ROOT)}:{i + 1}: [{extra}]")
    assert not missing, missing


def test_torch_advice_points_to_the_cpu_wheel():
    """`pip install torch` from the default index is the CUDA build (GBs of libraries): the docs name the CPU index."""
    bad = [f"{doc.relative_to(ROOT)}:{i + 1}" for doc in DOCS
           for i, line in enumerate(doc.read_text(encoding="utf-8").splitlines())
           if re.search(r"pip install [^`]*\btorch\b(==|\s|`|$)", line)
           and "download.pytorch.org/whl/cpu" not in line]
    assert not bad, bad
