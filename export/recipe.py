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
    from edgelm_export.train import config_from_options, config_defaults, train

    recipe_path = Path(path).expanduser().resolve()
    recipe = load_recipe(recipe_path)
    for section, values in (overrides or {}).items():   # e.g. smaller budgets for a smoke run
        recipe.setdefault(section, {}).update(values)
    build = recipe.get("build", {})
    root = Path(build.get("out") or (Path("build") / recipe_path.stem)).expanduser()
    names = {"build": str(root)}
    names["tokenizer"] = str(Path(_placeholders(recipe.get("tokenizer", {}).get("out", "{build}/tokenizer"), names)))
    names["teacher"] = str(Path(_placeholders(recipe.get("teacher", {}).get("out", "{build}/teacher"), names)))
    samples_table = recipe.get("samples", {})
    names["samples"] = str(Path(_placeholders(samples_table.get("out", "{build}/samples.txt"), names)))
    recipe = _placeholders(recipe, names)
    order = stages or build.get("stages") or [s for s in DEFAULT_ORDER if s in recipe]
    unknown = [s for s in order if s not in BUILD_STAGES]
    if unknown:
        raise TrainingError(f"Unknown build stage(s): {', '.join(unknown)}.", hint=f"Stages: {', '.join(BUILD_STAGES)}.")
    missing = [s for s in order if s not in recipe]
    if missing:
        raise TrainingError(f"Recipe {recipe_path} has no table for stage(s): {', '.join(missing)}.",
                            hint="Add the tables or drop the stages from [build] stages.")
    root.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    t_build = time.time()

    def train_opts(table: dict, section: str, extra: dict | None = None, tokenizer: str | None = None) -> dict:
        defaults = config_defaults(extra)
        unknown = sorted(set(table) - set(defaults))
        if unknown:
            raise TrainingError(f"Recipe table [{section}] has unknown keys: {', '.join(unknown)}.",
                                hint=f"Known keys: {', '.join(sorted(defaults))}.")
        opts = {**defaults, **table}
        opts.setdefault("out", None)
        opts["out"] = opts["out"] or str(root / section)
        opts["tokenizer"] = opts.get("tokenizer") or tokenizer
        opts["corpus"] = _corpus_list(opts.get("corpus"), names["samples"])
        opts["resume"] = True   # a build always continues an interrupted stage
        if not progress:
            opts["no_progress"] = True
        return opts

    for stage in order:
        table = dict(recipe[stage])
        t0 = time.time()
        if stage == "tokenizer":
            from edgelm_export.tokenizer import DEFAULTS, train_tokenizer
            out = Path(table.pop("out", names["tokenizer"]))
            if (out / "tokenizer.json").is_file() and not force:
                log(f"[tokenizer] {out} exists, skipped")
                continue
            opts = {**DEFAULTS, **table}
            unknown = sorted(set(opts) - set(DEFAULTS))
            if unknown:
                raise TrainingError(f"Recipe table [tokenizer] has unknown keys: {', '.join(unknown)}.",
                                    hint=f"Known keys: {', '.join(sorted(DEFAULTS))}.")
            opts.pop("out", None)
            corpus = opts.pop("corpus")
            vocab = opts.pop("vocab_size")
            results[stage] = train_tokenizer(corpus, vocab, out, **opts)
        elif stage == "samples":
            from edgelm_export.distill import sample_corpus
            out = Path(table.pop("out", names["samples"]))
            if out.is_file() and not force:
                log(f"[samples] {out} exists, skipped")
                continue
            src = table.pop("teacher", names["teacher"])
            results[stage] = sample_corpus(src, out, progress=progress, **table)
        elif stage in ("teacher", "scratch"):
            init_from = table.pop("from", None)
            if init_from:  # an existing model serves as the teacher: nothing to train
                names["teacher"] = init_from
                log(f"[{stage}] using {init_from}")
                continue
            opts = train_opts(table, stage, tokenizer=names["tokenizer"])
            if _done(Path(opts["out"]), "training.json") and not force:
                log(f"[{stage}] {opts['out']} is complete, skipped")
                continue
            if force:
                opts["resume"], opts["overwrite"] = False, True
            results[stage] = train(config_from_options(opts))
        elif stage == "student":
            from edgelm_export.distill import distill, distill_defaults
            table.setdefault("teacher", names["teacher"])
            extra = {k: v for k, v in distill_defaults().items() if k not in config_defaults()}
            opts = train_opts(table, stage, extra)   # tokenizer: the teacher's unless the table names one
            if _done(Path(opts["out"]), "training.json") and not force:
                log(f"[student] {opts['out']} is complete, skipped")
                continue
            if force:
                opts["resume"], opts["overwrite"] = False, True
            cfg = config_from_options(opts)
            results[stage] = distill(cfg, opts["teacher"], student_layers=opts.get("student_layers"),
                                     student_config=opts.get("student_config"), init=opts.get("init"))
        elif stage == "export":
            from edgelm_export.convert import export_model
            src = table.pop("model", str(root / "student"))
            out = Path(table.pop("out", str(root / "model")))
            if (out / "edgelm.json").is_file() and not force:
                log(f"[export] {out} exists, skipped")
                continue
            results[stage] = export_model(src, str(out), overwrite=True, progress=progress, **table)
        log(f"[{stage}] done in {time.time() - t0:.0f}s")
    log(f"build finished in {time.time() - t_build:.0f}s -> {root}")
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="the recipe TOML file (e.g. export/recipes/default.toml)")
    parser.add_argument("--stages", nargs="+", choices=BUILD_STAGES, help="run only these stages, in this order")
    parser.add_argument("--force", action="store_true", help="re-run stages even if their output exists")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                        help="override a recipe value, e.g. --set teacher.max_time_s=60 (repeatable)")


def run(args: argparse.Namespace) -> int:
    build_recipe(args.recipe, stages=args.stages, force=args.force, progress=not args.no_progress,
                 overrides=parse_set(args.set), log=lambda msg: print(msg, file=sys.stderr, flush=True))
    return 0
