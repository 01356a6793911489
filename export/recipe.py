"""Recipes: one TOML file describes a whole build, so a model is reproducible from the corpus.

A recipe has one table per stage. ``edgelm train-tokenizer|train|distill --recipe FILE`` take their defaults
from the matching table (``[tokenizer]``, ``[teacher]`` or ``[student]``; ``--section`` picks another) and
command-line flags override them (:func:`edgelm_export.commands.resolve_options`). ``edgelm build-recipe FILE``
runs the stages in order::

    tokenizer -> teacher -> samples (sequence-level distillation text) -> student -> export

and skips every stage whose output is already complete, so an interrupted build picks up where it stopped
(and a stage that was interrupted mid-training resumes from its last checkpoint). ``{build}/build-record.json``
says what each stage was built from; a rerun whose settings differ is refused (:class:`StaleStageError`)
rather than served the old outputs.

Paths in a recipe may use ``{shared}`` (the shared data folder: $EDGELM_SHARED, else ../shared beside the
repository, else ./shared) and ``{recipe_dir}``; relative paths are taken from the current directory.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import time
from dataclasses import dataclass, field
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


def _corpus_list(corpus: Any, samples: str, will_sample: bool) -> list[str]:
    """The corpus as a list; ``{samples}`` is dropped when no samples stage writes it (e.g. stage disabled)."""
    items = [corpus] if isinstance(corpus, str) else list(corpus or [])
    return [c for c in items if c != samples or will_sample or Path(c).is_file()]


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

    Each stage's settings (and the digests of the earlier stages it consumed) are recorded in
    ``{build}/build-record.json`` before it runs. When a stage's output exists but was built (or started) from
    other settings, :class:`StaleStageError` names the changed keys and every later stage that depends on it,
    before anything runs; ``force`` (with ``stages`` to pick those) rebuilds them.
    """
    recipe_path = Path(path).expanduser().resolve()
    recipe = load_recipe(recipe_path)
    for section, values in (overrides or {}).items():   # e.g. smaller budgets for a smoke run
        recipe.setdefault(section, {}).update(values)
    build = _plan(recipe, recipe_path, stages, force=force, progress=progress, log=log)
    # Every stage is prepared (options resolved and checked) before any runs, so a typo in the last table, or a
    # changed setting anywhere, is reported before hours of training rather than after.
    steps = [step for stage in build.order if (step := _PREPARE[stage](build, stage, dict(build.recipe[stage])))]
    record = _Record(build.root / RECORD_NAME)
    _check_record(steps, record, build, os.fspath(path))
    results: dict[str, Any] = {}
    t_build = time.time()
    for step in steps:
        if step.complete and not build.force:
            log(f"[{step.stage}] {step.out} is complete, skipped")
            continue
        record.put(step)   # before running: a stage stopped midway is resumed only with these same settings
        t0 = time.time()
        results[step.stage] = step.run()
        log(f"[{step.stage}] done in {time.time() - t0:.0f}s")
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


# --- what each stage was built from ----------------------------------------------------------------------
RECORD_NAME = "build-record.json"
# Options that change how a stage runs, not what it builds: a rerun that differs only in these reuses the stage.
RUN_ONLY_KEYS = frozenset({"out", "resume", "overwrite", "no_progress", "progress", "num_threads", "threads",
                           "compile", "save_every", "log_every", "optimum_python"})


class StaleStageError(TrainingError):
    """A stage's output exists but was built (or started) from other settings than the recipe now gives.

    ``changes`` maps each such stage to its changed keys (``"max_steps: 40 -> 80"``, or ``"consumed teacher"``
    when an earlier stage it reads is the one that changed); ``rebuild`` lists the stages to rebuild, in order.
    """

    def __init__(self, message: str, *, changes: dict[str, list[str]], rebuild: list[str], hint: str):
        self.changes, self.rebuild = changes, rebuild
        super().__init__(message, hint=hint)


@dataclass
class _Step:
    """A prepared stage: where it writes, what determines that output (``settings``, with the values the
    library would default to filled in), whether the output is complete, and how to build it."""

    stage: str
    out: Path
    settings: dict[str, Any]
    complete: bool
    run: Callable[[], Any]
    defaults: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, str] = field(default_factory=dict)   # earlier stage -> the digest of what it built
    digest: str = ""


def _settings(options: dict[str, Any]) -> dict[str, Any]:
    """The options that determine a stage's output, as JSON values (tuples become lists, paths strings)."""
    return json.loads(json.dumps({k: v for k, v in options.items() if k not in RUN_ONLY_KEYS}, default=str))


def _digest(settings: dict[str, Any], inputs: dict[str, str]) -> str:
    text = json.dumps({"settings": settings, "inputs": inputs}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _paths_in(value: Any) -> set[str]:
    """Every string in a settings value, as an absolute path (how one stage names another's output)."""
    if isinstance(value, str):
        return {os.path.abspath(os.path.expanduser(value))}
    if isinstance(value, (list, tuple)):
        return set().union(*map(_paths_in, value)) if value else set()
    if isinstance(value, dict):
        return _paths_in(list(value.values()))
    return set()


class _Record:
    """``{build}/build-record.json``: per stage, the output it wrote, its settings, what it consumed, its digest."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.stages: dict[str, dict[str, Any]] = json.loads(path.read_text(encoding="utf-8"))["stages"]
        except FileNotFoundError:
            self.stages = {}
        except (ValueError, KeyError, TypeError) as exc:
            raise TrainingError(f"The build record {path} is damaged ({exc}).",
                                hint="Delete it, and rebuild with --force (it is what tells a finished stage "
                                     "from one built with other settings).") from exc

    def get(self, step: _Step) -> dict[str, Any] | None:
        """The record of ``step``'s output (None when this stage last wrote somewhere else, or never)."""
        rec = self.stages.get(step.stage)
        return rec if rec and rec.get("out") == str(step.out) else None

    def put(self, step: _Step) -> None:
        self.stages[step.stage] = {"out": str(step.out), "digest": step.digest, "inputs": step.inputs,
                                   "settings": step.settings}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"version": 1, "stages": self.stages}, indent=1, sort_keys=True) + "\n",
                       encoding="utf-8")
        os.replace(tmp, self.path)


def _changed_keys(old: dict[str, Any], new: dict[str, Any], defaults: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every key whose value differs. A key the record lacks counts as unchanged when
    its value now is the library default (a key added by a newer edgelm does not invalidate old builds)."""
    out = []
    for key in sorted(set(old) | set(new)):
        if key not in old and key in defaults and new.get(key) == defaults[key]:
            continue
        if old.get(key, "(unset)") != new.get(key, "(unset)"):
            out.append(f"{key}: {old.get(key, '(unset)')!r} -> {new.get(key, '(unset)')!r}")
    return out


def _check_record(steps: list[_Step], record: _Record, build: _Build, recipe: str) -> None:
    """Fill in each step's inputs and digest; raise StaleStageError when an existing output (complete, or
    started and resumable) was built from other settings or from other earlier outputs than it would be now.

    A stage's digest hashes its settings and the digests of the stages it reads, so a change propagates: a
    teacher trained for more steps makes the samples, the student and the export built from it stale too.
    An output without a record (built by hand, or by an edgelm that kept none) is used as it is.
    """
    # Who made each path: this run's stages, else the recorded ones (a stage left out by --stages is read as
    # it was built).
    made_by: dict[str, _Step | tuple[str, str]] = {
        os.path.abspath(rec["out"]): (stage, rec.get("digest", "")) for stage, rec in record.stages.items()}
    made_by.update({os.path.abspath(step.out): step for step in steps})
    changes: dict[str, list[str]] = {}
    for step in steps:
        ups = [made_by[p] for p in sorted(_paths_in(step.settings)) if p in made_by and made_by[p] is not step]
        step.inputs = dict(up if isinstance(up, tuple) else (up.stage, up.digest) for up in ups)
        step.digest = _digest(step.settings, step.inputs)
        rec = record.get(step)
        if rec is None:
            continue   # never built here
        why = _changed_keys(rec.get("settings", {}), step.settings, step.defaults)
        why += [f"consumed {up}" for up, d in step.inputs.items() if rec.get("inputs", {}).get(up) != d]
        if not why:
            step.digest = rec.get("digest", step.digest)   # unchanged: downstream compares against the record
        elif step.out.exists() and not build.force:   # (a removed output, or a forced stage, is simply built)
            changes[step.stage] = why
    if not changes:
        return
    rebuild: list[str] = []   # the changed stages and every later one that reads one of them
    for step in steps:
        if step.stage in changes or any(up in rebuild for up in step.inputs):
            rebuild.append(step.stage)
    # ... and the unfinished stages they read (e.g. a teacher folder that was deleted), which --stages would
    # otherwise leave out
    unfinished = {s.stage for s in steps if not s.complete}
    for step in reversed(steps):
        if step.stage in rebuild:
            rebuild += [up for up in step.inputs if up in unfinished and up not in rebuild]
    rebuild = [s.stage for s in steps if s.stage in rebuild]
    lines = "; ".join(f"[{stage}] {', '.join(why)}" for stage, why in changes.items())
    raise StaleStageError(
        f"{Path(recipe).name}: stage(s) {', '.join(changes)} in {build.root} were built from other settings "
        f"than the recipe now gives ({lines}). Nothing was run.",
        changes=changes, rebuild=rebuild,
        hint=f"To rebuild them (their outputs are replaced): edgelm build-recipe {recipe} "
             f"--force --stages {' '.join(rebuild)} (with the same --set options), or use a new build folder "
             f"(--set build.out=DIR), or go back to the settings they were built with.")


# --- the stages ----------------------------------------------------------------------------------------------
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
    opts["corpus"] = _corpus_list(opts.get("corpus"), b.names["samples"], "samples" in b.order)
    opts["resume"] = True   # a build always continues an interrupted stage
    if not b.progress:
        opts["no_progress"] = True
    if b.force:
        opts["resume"], opts["overwrite"] = False, True
    return opts


def _kwdefaults(fn: Callable) -> dict[str, Any]:
    return {k: p.default for k, p in inspect.signature(fn).parameters.items() if p.default is not p.empty}


# Each stage: (build, stage name, its table) -> a prepared _Step, or None when there is nothing to build.
def _tokenizer_stage(b: _Build, stage: str, table: dict) -> _Step:
    out = Path(table.pop("out", b.names["tokenizer"]))
    opts = {**TOKENIZER_DEFAULTS, **table}
    _check_keys(opts, "tokenizer", TOKENIZER_DEFAULTS)
    opts.pop("out", None)

    def run():
        kw = dict(opts)
        return train_tokenizer(kw.pop("corpus"), kw.pop("vocab_size"), out, **kw)

    return _Step(stage, out, _settings(opts), (out / "tokenizer.json").is_file(), run,
                 defaults=_settings(TOKENIZER_DEFAULTS))


def _samples_stage(b: _Build, stage: str, table: dict) -> _Step:
    out = Path(table.pop("out", b.names["samples"]))
    src = table.pop("teacher", b.names["teacher"])
    defaults = {k: v for k, v in _kwdefaults(sample_corpus).items() if k not in RUN_ONLY_KEYS}
    _check_keys(table, "samples", {**defaults, "num_tokens": None})
    return _Step(stage, out, _settings({**defaults, **table, "teacher": src}), out.is_file(),
                 lambda: sample_corpus(src, out, progress=b.progress, **table), defaults=_settings(defaults))


def _train_stage(b: _Build, stage: str, table: dict) -> _Step | None:
    """``teacher`` or ``scratch``: train from scratch, or (``from = DIR``) take an existing model as the teacher."""
    init_from = table.pop("from", None)
    if init_from:  # an existing model serves as the teacher: nothing to train
        b.names["teacher"] = init_from
        b.log(f"[{stage}] using {init_from}")
        return None
    opts = _train_options(b, table, stage, tokenizer=b.names["tokenizer"])
    out = Path(opts["out"])
    return _Step(stage, out, _settings(opts), (out / "training.json").is_file(),
                 lambda: train(config_from_options(opts)), defaults=_settings(config_defaults()))


def _student_stage(b: _Build, stage: str, table: dict) -> _Step:
    table.setdefault("teacher", b.names["teacher"])
    extra = {k: v for k, v in distill_defaults().items() if k not in config_defaults()}
    opts = _train_options(b, table, stage, extra)   # tokenizer: the teacher's unless the table names one
    out = Path(opts["out"])

    def run():
        return distill(config_from_options(opts), opts["teacher"], student_layers=opts.get("student_layers"),
                       student_config=opts.get("student_config"), init=opts.get("init"))

    return _Step(stage, out, _settings(opts), (out / "training.json").is_file(), run,
                 defaults=_settings(config_defaults(extra)))


def _export_stage(b: _Build, stage: str, table: dict) -> _Step:
    from edgelm_export.convert import export_model   # the exporter is heavy and no training stage needs it

    src = table.pop("model", str(b.root / "student"))
    out = Path(table.pop("out", str(b.root / "model")))
    defaults = {k: v for k, v in _kwdefaults(export_model).items()
                if not k.startswith("_") and k not in ("overwrite", "progress")}   # the stage sets those two
    _check_keys(table, "export", defaults)
    settings = _settings({**defaults, **table, "model": src})
    return _Step(stage, out, settings, (out / "edgelm.json").is_file(),
                 lambda: export_model(src, str(out), overwrite=True, progress=b.progress, **table),
                 defaults=_settings(defaults))


_PREPARE: dict[str, Callable[[_Build, str, dict], _Step | None]] = {
    "tokenizer": _tokenizer_stage, "samples": _samples_stage, "teacher": _train_stage, "scratch": _train_stage,
    "student": _student_stage, "export": _export_stage,
}
