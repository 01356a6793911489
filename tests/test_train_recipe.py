"""build-recipe: stages run in order, hand over to each other, skip when done, resume an interrupted stage."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from edgelm.errors import TrainingError

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from conftest import SHARED, needs_shared  # noqa: E402
from edgelm_export.recipe import build_recipe, load_recipe, parse_set  # noqa: E402

pytestmark = [pytest.mark.slow, needs_shared()]

RECIPE = """
[build]
out = "{out}"
stages = ["tokenizer", "teacher", "samples", "student", "scratch"]

[tokenizer]
corpus = ["{corpus}"]
vocab_size = 300
layout = "blank-line-paragraphs"

[teacher]
config = {{ hidden_size = 32, intermediate_size = 64, num_hidden_layers = 2, num_attention_heads = 2, num_key_value_heads = 1, max_position_embeddings = 64 }}
corpus = ["{corpus}"]
layout = "blank-line-paragraphs"
block_size = 32
batch_size = 4
max_steps = 12
warmup_steps = 2
eval_every = 6
save_every = 6
num_threads = 1

[samples]
teacher = "{{teacher}}"
num_tokens = 200
batch_size = 4
max_new_tokens = 48
device = "cpu"

[student]
student_layers = 1
corpus = ["{corpus}", "{{samples}}"]
layout = "blank-line-paragraphs"
block_size = 32
batch_size = 4
max_steps = 8
warmup_steps = 2
eval_every = 4
save_every = 4
num_threads = 1

[scratch]
config = {{ hidden_size = 32, intermediate_size = 64, num_hidden_layers = 1, num_attention_heads = 2, num_key_value_heads = 1, max_position_embeddings = 64 }}
corpus = ["{corpus}", "{{samples}}"]
layout = "blank-line-paragraphs"
block_size = 32
batch_size = 4
max_steps = 8
warmup_steps = 2
eval_every = 4
save_every = 4
num_threads = 1
"""


@pytest.fixture
def recipe(tmp_path):
    text = (SHARED / "corpus" / "tinystories" / "tinystories-v1-train-sample.txt").read_text(encoding="utf-8")[:60_000]
    corpus = tmp_path / "stories.txt"
    corpus.write_text(text[: text.rfind("<|endoftext|>")], encoding="utf-8")
    path = tmp_path / "r.toml"
    path.write_text(RECIPE.format(out=tmp_path / "build", corpus=corpus), encoding="utf-8")
    return path


def test_build_runs_stages_then_skips_and_resumes(recipe, tmp_path):
    logs: list[str] = []
    res = build_recipe(recipe, progress=False, log=logs.append)
    b = tmp_path / "build"
    assert set(res) == {"tokenizer", "teacher", "samples", "student", "scratch"}
    assert res["teacher"].steps == 12 and res["student"].steps == 8 and res["scratch"].steps == 8
    # Hand-over: the student distils the teacher just trained and shares its tokenizer; samples joined the corpus.
    summary = json.loads((b / "student" / "training.json").read_text())
    assert summary["extra"]["teacher"] == str(b / "teacher")
    assert str(b / "samples.txt") in summary["config"]["corpus"]
    assert (b / "student" / "tokenizer.json").read_bytes() == (b / "tokenizer" / "tokenizer.json").read_bytes()
    assert json.loads((b / "student" / "config.json").read_text())["num_hidden_layers"] == 1

    # Everything done: a re-run trains nothing.
    logs.clear()
    assert build_recipe(recipe, progress=False, log=logs.append) == {}
    assert sum("skipped" in line for line in logs) == 5

    # A stage killed after its last checkpoint (no training.json yet) resumes instead of starting over.
    (b / "student" / "training.json").unlink()
    res = build_recipe(recipe, progress=False, log=logs.append)
    assert set(res) == {"student"} and res["student"].stopped == "already-done" and res["student"].steps == 8


def test_same_recipe_same_seed_same_bytes(recipe, tmp_path):
    """Two builds of one recipe (in two folders) give byte-identical tokenizers, samples and weights, and the same
    loss curves: a model is a pure function of its recipe and corpus on one machine."""
    timing = {"tokens_per_s", "elapsed_s", "wall_time_s"}

    def outputs(build: Path) -> dict[str, object]:
        got: dict[str, object] = {"tokenizer": (build / "tokenizer" / "tokenizer.json").read_bytes(),
                                  "samples": (build / "samples.txt").read_bytes()}
        for stage in ("teacher", "student", "scratch"):
            got[stage] = (build / stage / "model.safetensors").read_bytes()
            got[stage + " log"] = [{k: v for k, v in json.loads(line).items() if k not in timing}
                                   for line in (build / stage / "train_log.jsonl").read_text().splitlines()]
        return got

    build_recipe(recipe, progress=False, log=lambda m: None)
    build_recipe(recipe, progress=False, log=lambda m: None, overrides={"build": {"out": str(tmp_path / "again")}})
    first, second = outputs(tmp_path / "build"), outputs(tmp_path / "again")
    # the logs hold training and held-out losses, not only start/end events
    assert any("loss" in r for r in first["student log"]) and any("eval_loss" in r for r in first["student log"])
    for key in first:
        assert first[key] == second[key], f"{key} differs between two builds of the same recipe"


def test_overrides_and_bad_recipes(recipe, tmp_path):
    assert parse_set(["teacher.max_time_s=60", "samples.top_p=0.9", "build.out=x/y", "a.b=[1, 2]"]) == {
        "teacher": {"max_time_s": 60}, "samples": {"top_p": 0.9}, "build": {"out": "x/y"}, "a": {"b": [1, 2]}}
    with pytest.raises(TrainingError, match="SECTION.KEY=VALUE"):
        parse_set(["nodot=1"])
    res = build_recipe(recipe, stages=["tokenizer"], progress=False, log=lambda m: None,
                       overrides={"tokenizer": {"vocab_size": 290}})
    assert res["tokenizer"].vocab_size == 290
    with pytest.raises(TrainingError, match="Unknown build stage"):
        build_recipe(recipe, stages=["bake"], log=lambda m: None)
    bad = tmp_path / "bad.toml"
    bad.write_text("[teacher\n")
    with pytest.raises(TrainingError, match="not valid TOML"):
        load_recipe(bad)
    with pytest.raises(TrainingError, match="does not exist"):
        load_recipe(tmp_path / "missing.toml")
    with pytest.raises(TrainingError, match="unknown keys: epochs"):
        build_recipe(recipe, stages=["teacher"], overrides={"teacher": {"epochs": 3}}, log=lambda m: None)
    # every table is checked before any stage runs: a typo in the export table stops the teacher from training
    with pytest.raises(TrainingError, match="unknown keys: quantise"):
        build_recipe(recipe, stages=["teacher", "export"], overrides={"export": {"quantise": "int4"}},
                     log=lambda m: None)
    assert not (tmp_path / "build" / "teacher").exists()


def test_cli_distill_sampling_mode(tmp_path):
    from edgelm.cli import main

    out = tmp_path / "s.txt"
    rc = main(["distill", "--teacher", str(SHARED / "fixtures" / "stories260K"), "--sample-tokens", "64",
               "--samples-out", str(out), "--sample-batch-size", "2", "--device", "cpu", "--no-progress"])
    assert rc == 0 and out.read_text().count("<|endoftext|>") >= 1
    assert main(["distill", "--teacher", str(SHARED / "fixtures" / "stories260K"), "--sample-tokens", "5"]) == 1


def test_changed_settings_are_refused_run_only_options_are_not(recipe, tmp_path, torch_one_thread):
    """A rerun with a changed setting names the stage, the key and every stage built from it, and runs nothing;
    an unchanged rerun (or one that changes only how a stage runs) skips; --force --stages rebuilds the named ones."""
    from edgelm_export.recipe import StaleStageError

    order = ["tokenizer", "teacher", "samples", "student"]
    b = tmp_path / "build"

    def run(**kw):
        logs: list[str] = []
        return build_recipe(recipe, stages=kw.pop("stages", order), progress=False, log=logs.append, **kw), logs

    run()
    record = json.loads((b / "build-record.json").read_text())["stages"]
    assert record["teacher"]["settings"]["max_steps"] == 12 and set(record["student"]["inputs"]) == {"teacher", "samples"}
    res, logs = run(overrides={"teacher": {"num_threads": 2, "save_every": 3}, "student": {"log_every": 1}})
    assert res == {} and logs[:-1] == [f"[{s}] {p} is complete, skipped" for s, p in
                                       [("tokenizer", b / "tokenizer"), ("teacher", b / "teacher"),
                                        ("samples", b / "samples.txt"), ("student", b / "student")]]

    with pytest.raises(StaleStageError, match=r"max_steps: 12 -> 16") as err:
        run(overrides={"teacher": {"max_steps": 16}})
    assert err.value.rebuild == ["teacher", "samples", "student"]   # the tokenizer is not built from the teacher
    assert err.value.changes["samples"] == ["consumed teacher"]
    assert "--force --stages teacher samples student" in str(err.value)
    assert json.loads((b / "teacher" / "training.json").read_text())["steps"] == 12   # nothing ran

    # A change in the last stage names only that stage; so does a stage stopped midway (it is not resumed
    # from checkpoints made with the old settings).
    (b / "student" / "training.json").unlink()
    with pytest.raises(StaleStageError) as err:
        run(overrides={"student": {"alpha": 0.9}})
    assert err.value.rebuild == ["student"] and err.value.changes == {"student": ["alpha: 0.5 -> 0.9"]}

    # A deleted teacher is rebuilt as a matter of course, so the stale samples' hint names it too.
    (b / "student" / "training.json").write_text(json.dumps({"steps": 8}))   # (the student counts as done)
    shutil.move(b / "teacher", tmp_path / "teacher-aside")
    with pytest.raises(StaleStageError) as err2:
        run(overrides={"samples": {"top_p": 0.5}})
    assert err2.value.rebuild == ["teacher", "samples", "student"] and set(err2.value.changes) == {"samples", "student"}
    shutil.move(tmp_path / "teacher-aside", b / "teacher")
    (b / "student" / "training.json").unlink()

    res, _ = run(stages=err.value.rebuild, force=True, overrides={"student": {"alpha": 0.9}})
    assert set(res) == {"student"} and res["student"].steps == 8
    assert json.loads((b / "student" / "training.json").read_text())["config"]["alpha"] == 0.9
    assert run(overrides={"student": {"alpha": 0.9}})[0] == {}   # the new settings are now the recorded ones
    with pytest.raises(StaleStageError, match="alpha: 0.9 -> 0.5"):
        run()


def test_samples_stop_at_the_asked_token_count(tmp_path, torch_one_thread):
    """sample_corpus writes whole stories until the ask is reached: at least num_tokens, and less than one
    story (max_new_tokens) more; the rest of the last batch is dropped, not counted."""
    from edgelm_export.corpus import read_documents
    from edgelm_export.distill import sample_corpus

    out = tmp_path / "s.txt"
    res = sample_corpus(SHARED / "fixtures" / "stories260K", out, num_tokens=64, batch_size=8, max_new_tokens=48,
                        seed=0, device="cpu", progress=False)
    assert 64 <= res.tokens <= 64 + 48 - 1
    assert len(read_documents([out])) == res.documents < 8
