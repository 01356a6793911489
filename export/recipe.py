"""Recipes: one TOML file describes a whole build, so a model is reproducible from the corpus.

A recipe has one table per stage. ``edgelm train-tokenizer|train|distill --recipe FILE`` take their defaults
from the matching table (``[tokenizer]``, ``[teacher]`` or ``[student]``; ``--section`` picks another) and
command-line flags override them (:func:`edgelm_export.commands.resolve_options`). ``edgelm build-recipe FILE``
runs the stages in order::

    tokenizer -> teacher -> samples (sequence-level distillation text) -> student -> export

and skips every stage whose output is already complete, so an interrupted build picks up where it stopped
(and a stage that was interrupted mid-training resumes from its last checkpoint).

Paths in a recipe may use ``{shared}`` (the shared data folder: $EDGELM_SHARED, else ../shared beside the
repository, else ./shared) and ``{recipe_dir}``; relative paths are taken from the current directory.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from edgelm.errors import TrainingError
from edgelm_export.distill import distill, distill_defaults, sample_corpus
from edgelm_export.tokenizer import DEFAULTS as TOKENIZER_DEFAULTS
from edgelm_export.tokenizer import train_tokenizer
from edgelm_export.train import config_defaults, config_from_options, train

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


# --- build-recipe ----------------------------------------------------------------------------------------
BUILD_STAGES = ("tokenizer", "samples", "teacher", "student", "scratch", "export")
DEFAULT_ORDER = ("tokenizer", "teacher", "samples", "student", "scratch", "export")


def _done(path: Path, marker: str) -> bool:
    return (path / marker).is_file() if path.suffix == "" else path.is_file()


def _placeholders(value: Any, mapping: dict[str, str]) -> Any:
    if isinstance(value, str):
        for k, v in mapping.items():
            value = value.replace("{" + k + "}", v)
        return value
    if isinstance(value, list):
        return [_placeholders(v, mapping) for v in value]
    if isinstance(value, dict):
        return {k: _placeholders(v, mapping) for k, v in value.items()}
    return value


def _corpus_list(corpus: Any, samples: str) -> list[str]:
    """The corpus as a list; ``{samples}`` is dropped when no samples stage wrote it (e.g. stage disabled)."""
    items = [corpus] if isinstance(corpus, str) else list(corpus or [])
    return [c for c in items if c != samples or Path(c).is_file()]


def parse_set(items: list[str] | None) -> dict[str, dict[str, Any]]:
    """``["teacher.max_time_s=60", "samples.num_tokens=1e6"]`` -> {"teacher": {"max_time_s": 60}, ...}.

    Values are parsed as TOML values (numbers, booleans, quoted strings, arrays); anything else is a string.
    """
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    out: dict[str, dict[str, Any]] = {}
    for item in items or []:
        key, eq, raw = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not eq or not dot or not name:
            raise TrainingError(f"Bad --set {item!r}.", hint="Use --set SECTION.KEY=VALUE, e.g. teacher.max_time_s=60")
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()
        out.setdefault(section, {})[name.replace("-", "_")] = value
    return out


def build_recipe(path: str | os.PathLike, *, stages: list[str] | None = None, force: bool = False,
                 progress: bool = True, overrides: dict[str, dict[str, Any]] | None = None,
                 log=print) -> dict[str, Any]:
    """Run a recipe's stages in order, skipping those whose outputs are complete. Returns per-stage results.

    ``[build]`` sets ``out`` (the build folder, default ``build/<recipe name>``) and optionally ``stages`` (the
    order; default tokenizer, teacher, samples, student, scratch, export — stages without a table are skipped).
    Every string may use ``{build}`` (the build folder), ``{samples}`` (the samples file), ``{teacher}``,
    ``{tokenizer}``, ``{shared}`` and ``{recipe_dir}``. Training stages resume from their checkpoints, so
    re-running an interrupted build continues it. ``force`` re-runs stages even when their output exists.
    """
    recipe_path = Path(path).expanduser().resolve()
    recipe = load_recipe(recipe_path)
    for section, values in (overrides or {}).items():   # e.g. smaller budgets for a smoke run
        recipe.setdefault(section, {}).update(values)
    build = _plan(recipe, recipe_path, stages, force=force, progress=progress, log=log)
    build.root.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    t_build = time.time()
    for stage in build.order:
        t0 = time.time()
        result = _STAGE_RUNNERS[stage](build, stage, dict(build.recipe[stage]))
        if result is None:   # skipped: its output is complete, or an existing model stands in for it
            continue
        results[stage] = result
        log(f"[{stage}] done in {time.time() - t0:.0f}s")
    log(f"build finished in {time.time() - t_build:.0f}s -> {build.root}")
    return results


@dataclass
class _Build:
    """One build: its folder, the recipe with the placeholders filled in, the stage order, the paths stages hand
    over to each other (``names``: build, tokenizer, teacher, samples), and how to run."""

    root: Path
    recipe: dict[str, Any]
    order: list[str]
    names: dict[str, str]
    force: bool
    progress: bool
    log: Callable[[str], None]


def _plan(recipe: dict[str, Any], recipe_path: Path, stages: list[str] | None, **how: Any) -> _Build:
    """Name the build's outputs, fill the placeholders in, and check the stage order."""
    build = recipe.get("build", {})
    root = Path(build.get("out") or (Path("build") / recipe_path.stem)).expanduser()
    names = {"build": str(root)}
    names["tokenizer"] = str(Path(_placeholders(recipe.get("tokenizer", {}).get("out", "{build}/tokenizer"), names)))
    names["teacher"] = str(Path(_placeholders(recipe.get("teacher", {}).get("out", "{build}/teacher"), names)))
    names["samples"] = str(Path(_placeholders(recipe.get("samples", {}).get("out", "{build}/samples.txt"), names)))
    recipe = _placeholders(recipe, names)
    order = stages or build.get("stages") or [s for s in DEFAULT_ORDER if s in recipe]
    unknown = [s for s in order if s not in BUILD_STAGES]
    if unknown:
        raise TrainingError(f"Unknown build stage(s): {', '.join(unknown)}.", hint=f"Stages: {', '.join(BUILD_STAGES)}.")
    missing = [s for s in order if s not in recipe]
    if missing:
        raise TrainingError(f"Recipe {recipe_path} has no table for stage(s): {', '.join(missing)}.",
                            hint="Add the tables or drop the stages from [build] stages.")
    return _Build(root, recipe, order, names, **how)


def _check_keys(table: dict, section: str, known: dict) -> None:
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise TrainingError(f"Recipe table [{section}] has unknown keys: {', '.join(unknown)}.",
                            hint=f"Known keys: {', '.join(sorted(known))}.")


def _train_options(b: _Build, table: dict, section: str, extra: dict | None = None,
                   tokenizer: str | None = None) -> dict:
    """A training stage's options: defaults <- its table, writing to ``{build}/<section>`` unless it says where,
    on the build's corpus and tokenizer, always resuming an interrupted run (restarting it with ``force``)."""
    defaults = config_defaults(extra)
    _check_keys(table, section, defaults)
    opts = {**defaults, **table}
    opts.setdefault("out", None)
    opts["out"] = opts["out"] or str(b.root / section)
    opts["tokenizer"] = opts.get("tokenizer") or tokenizer
    opts["corpus"] = _corpus_list(opts.get("corpus"), b.names["samples"])
    opts["resume"] = True   # a build always continues an interrupted stage
    if not b.progress:
        opts["no_progress"] = True
    if b.force:
        opts["resume"], opts["overwrite"] = False, True
    return opts


# Each stage: (build, stage name, its table) -> its result, or None when skipped.
def _tokenizer_stage(b: _Build, stage: str, table: dict):
    out = Path(table.pop("out", b.names["tokenizer"]))
    if (out / "tokenizer.json").is_file() and not b.force:
        b.log(f"[tokenizer] {out} exists, skipped")
        return None
    opts = {**TOKENIZER_DEFAULTS, **table}
    _check_keys(opts, "tokenizer", TOKENIZER_DEFAULTS)
    opts.pop("out", None)
    corpus = opts.pop("corpus")
    vocab = opts.pop("vocab_size")
    return train_tokenizer(corpus, vocab, out, **opts)


def _samples_stage(b: _Build, stage: str, table: dict):
    out = Path(table.pop("out", b.names["samples"]))
    if out.is_file() and not b.force:
        b.log(f"[samples] {out} exists, skipped")
        return None
    src = table.pop("teacher", b.names["teacher"])
    return sample_corpus(src, out, progress=b.progress, **table)


def _train_stage(b: _Build, stage: str, table: dict):
    """``teacher`` or ``scratch``: train from scratch, or (``from = DIR``) take an existing model as the teacher."""
    init_from = table.pop("from", None)
    if init_from:  # an existing model serves as the teacher: nothing to train
        b.names["teacher"] = init_from
        b.log(f"[{stage}] using {init_from}")
        return None
    opts = _train_options(b, table, stage, tokenizer=b.names["tokenizer"])
    if _done(Path(opts["out"]), "training.json") and not b.force:
        b.log(f"[{stage}] {opts['out']} is complete, skipped")
        return None
    return train(config_from_options(opts))


def _student_stage(b: _Build, stage: str, table: dict):
    table.setdefault("teacher", b.names["teacher"])
    extra = {k: v for k, v in distill_defaults().items() if k not in config_defaults()}
    opts = _train_options(b, table, stage, extra)   # tokenizer: the teacher's unless the table names one
    if _done(Path(opts["out"]), "training.json") and not b.force:
        b.log(f"[student] {opts['out']} is complete, skipped")
        return None
    return distill(config_from_options(opts), opts["teacher"], student_layers=opts.get("student_layers"),
                   student_config=opts.get("student_config"), init=opts.get("init"))


def _export_stage(b: _Build, stage: str, table: dict):
    from edgelm_export.convert import export_model   # the exporter is heavy and no training stage needs it

    src = table.pop("model", str(b.root / "student"))
    out = Path(table.pop("out", str(b.root / "model")))
    if (out / "edgelm.json").is_file() and not b.force:
        b.log(f"[export] {out} exists, skipped")
        return None
    return export_model(src, str(out), overwrite=True, progress=b.progress, **table)


_STAGE_RUNNERS: dict[str, Callable[[_Build, str, dict], Any]] = {
    "tokenizer": _tokenizer_stage, "samples": _samples_stage, "teacher": _train_stage, "scratch": _train_stage,
    "student": _student_stage, "export": _export_stage,
}
