"""Recipes: one TOML file describes a whole build, so a model is reproducible from the corpus.

A recipe has one table per stage. ``edgelm train-tokenizer|train|distill --recipe FILE`` take their defaults
from the matching table (``[tokenizer]``, ``[teacher]`` or ``[student]``; ``--section`` picks another) and
command-line flags override them. ``edgelm build-recipe FILE`` runs the stages in order::

    tokenizer -> teacher -> samples (sequence-level distillation text) -> student -> export

and skips every stage whose output is already complete, so an interrupted build picks up where it stopped
(and a stage that was interrupted mid-training resumes from its last checkpoint).

Paths in a recipe may use ``{shared}`` (the shared data folder: $EDGELM_SHARED, else ../shared beside the
repository, else ./shared) and ``{recipe_dir}``; relative paths are taken from the current directory.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from edgelm.errors import TrainingError

STAGES = ("tokenizer", "teacher", "samples", "student", "export")


def _toml_load(path: Path) -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise TrainingError(f"Recipe {path} does not exist.", hint="Check the path, e.g. export/recipes/default.toml.")
    except tomllib.TOMLDecodeError as exc:
        raise TrainingError(f"Recipe {path} is not valid TOML: {exc}.", hint="Fix the file's syntax.") from exc


def shared_dir() -> Path:
    """The shared data folder: $EDGELM_SHARED, else ../shared beside the repo, else ./shared."""
    env = os.environ.get("EDGELM_SHARED")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[1]
    for cand in (repo.parent / "shared", repo / "shared", Path.cwd() / "shared"):
        if cand.is_dir():
            return cand
    return repo.parent / "shared"


def _expand(value: Any, recipe_dir: Path) -> Any:
    if isinstance(value, str):
        return value.replace("{shared}", str(shared_dir())).replace("{recipe_dir}", str(recipe_dir))
    if isinstance(value, list):
        return [_expand(v, recipe_dir) for v in value]
    if isinstance(value, dict):
        return {k: _expand(v, recipe_dir) for k, v in value.items()}
    return value


def load_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """Read a recipe and expand ``{shared}`` / ``{recipe_dir}`` in every string. Keys use underscores."""
    p = Path(path).expanduser().resolve()
    data = _toml_load(p)

    def norm(d: Any) -> Any:
        return {k.replace("-", "_"): norm(v) for k, v in d.items()} if isinstance(d, dict) else d

    return _expand(norm(data), p.parent)


def resolve_options(args: argparse.Namespace, section: str, defaults: dict[str, Any]) -> dict[str, Any]:
    """defaults <- recipe[section] <- command-line flags that were given (not None).

    Unknown keys in the recipe table are an error (a typo would otherwise be silently ignored).
    """
    opts = dict(defaults)
    recipe_path = getattr(args, "recipe", None)
    if recipe_path:
        recipe = load_recipe(recipe_path)
        section = getattr(args, "section", None) or section
        table = recipe.get(section)
        if table is None:
            raise TrainingError(f"Recipe {recipe_path} has no [{section}] table.",
                                hint=f"Add one, or pass --section NAME (tables: {', '.join(recipe)}).")
        unknown = sorted(set(table) - set(defaults))
        if unknown:
            raise TrainingError(f"Recipe table [{section}] has unknown keys: {', '.join(unknown)}.",
                                hint=f"Known keys: {', '.join(sorted(defaults))}.")
        opts.update(table)
    for key in defaults:
        value = getattr(args, key, None)
        if value is not None:
            opts[key] = value
    return opts
