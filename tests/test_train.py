"""The training loop: learning, exact resume, checkpoint safety, time budget, HF output, CLI, scorer."""
from __future__ import annotations

import contextlib
import errno
import json
import math
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from edgelm.errors import InvalidArgumentError, OutOfDiskError, TrainingError

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from conftest import SHARED, STORIES260K, needs_shared  # noqa: E402
from edgelm_export.tokenizer import train_tokenizer  # noqa: E402
from edgelm_export.train import TrainConfig, load_checkpoint, score_bits_per_byte, train  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("torch_one_thread")]
V1 = SHARED / "corpus" / "tinystories" / "tinystories-v1-train-sample.txt"
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            max_position_embeddings=64)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 100 KB TinyStories slice and a 320-token tokenizer trained on it."""
    if not V1.is_file():
        pytest.skip(f"shared corpus not found at {V1}")
    root = tmp_path_factory.mktemp("train")
    corpus = root / "stories.txt"
    text = V1.read_text(encoding="utf-8")[:100_000]
    corpus.write_text(text[: text.rfind("<|endoftext|>")], encoding="utf-8")
    tok = root / "tok"
    train_tokenizer([str(corpus)], 320, tok, layout="blank-line-paragraphs")
    return root, corpus, tok


def _cfg(setup, out, **kw) -> TrainConfig:
    root, corpus, tok = setup
    base = dict(out_dir=str(out), corpus=[str(corpus)], tokenizer=str(tok), model_config=TINY, block_size=32,
                batch_size=4, max_steps=20, warmup_steps=3, eval_every=5, save_every=5, log_every=5, lr=3e-3,
                progress=False, layout="blank-line-paragraphs", eval_max_tokens=1024)
    base.update(kw)
    return TrainConfig(**base)


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(folder / "model.safetensors"))


def test_training_learns_and_writes_an_hf_folder(setup, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    res = train(_cfg(setup, tmp_path / "m", max_steps=60, eval_every=60))
    log = [json.loads(line) for line in (tmp_path / "m" / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses[-1] < losses[0] - 1.0, losses
    assert res.steps == 60 and res.stopped == "max_steps" and res.tokens == 60 * 4 * 32
    assert set(res.eval) >= {"eval_loss", "eval_ppl", "eval_bpb"} and math.isfinite(res.eval["eval_bpb"])
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "m" / name).is_file(), name
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"))
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "m"))
    assert model.config.num_hidden_layers == 2 and tok.bos_token_id == model.config.bos_token_id == 1
    assert res.params == sum(p.numel() for p in model.parameters())  # tied embeddings counted once


def test_resume_equals_uninterrupted_run(setup, tmp_path):
    """A run killed at step 13 (checkpoint at 10) and resumed ends with the same weights as one never stopped."""
    kw = dict(dropout=0.1, max_steps=20)
    train(_cfg(setup, tmp_path / "a", **kw))

    def crash(step, record):
        if step == 13:
            raise RuntimeError("simulated kill")

    with pytest.raises(RuntimeError, match="simulated kill"):
        train(_cfg(setup, tmp_path / "b", **kw), callback=crash)
    state = load_checkpoint(tmp_path / "b" / "checkpoints")
    assert state["step"] == 10  # lost at most save_every steps
    with pytest.raises(TrainingError, match="--resume"):
        train(_cfg(setup, tmp_path / "b", **kw))
    res = train(_cfg(setup, tmp_path / "b", resume=True, **kw))
    assert res.steps == 20
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k


def test_resume_of_a_finished_run_changes_nothing(setup, tmp_path):
    train(_cfg(setup, tmp_path / "m", max_steps=5))
    before = _weights(tmp_path / "m")
    res = train(_cfg(setup, tmp_path / "m", max_steps=5, resume=True))
    assert res.stopped == "already-done" and res.steps == 5
    after = _weights(tmp_path / "m")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_disk_full_while_checkpointing_keeps_earlier_checkpoints(setup, tmp_path, monkeypatch):
    out = tmp_path / "m"
    real_save = torch.save
    calls = {"n": 0}

    def save_then_fill_disk(obj, f, *a, **kw):
        calls["n"] += 1
        if calls["n"] >= 3:  # the third checkpoint hits a full disk halfway through writing
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", save_then_fill_disk)
    with pytest.raises(OutOfDiskError, match="disk is full"):
        train(_cfg(setup, out, max_steps=20))
    monkeypatch.setattr(torch, "save", real_save)
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.pt", "prev.pt"]  # no temp file left behind
    assert load_checkpoint(ckpts)["step"] == 10
    assert torch.load(ckpts / "prev.pt", weights_only=False)["step"] == 5
    res = train(_cfg(setup, out, max_steps=20, resume=True))
    assert res.steps == 20


def test_damaged_last_checkpoint_falls_back_to_previous(setup, tmp_path):
    out = tmp_path / "m"
    train(_cfg(setup, out, max_steps=10))
    last = out / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:100])  # truncated (e.g. killed by the OOM killer while copying)
    assert load_checkpoint(out / "checkpoints")["step"] == 5


def test_time_budget_stops_cleanly_with_a_final_save(setup, tmp_path):
    res = train(_cfg(setup, tmp_path / "m", max_steps=100_000, max_time_s=2.0, eval_every=1000, save_every=1000))
    assert res.stopped == "time" and 0 < res.steps < 100_000
    assert (tmp_path / "m" / "model.safetensors").is_file()
    assert load_checkpoint(tmp_path / "m" / "checkpoints")["step"] == res.steps
    summary = json.loads((tmp_path / "m" / "training.json").read_text())
    assert summary["stopped"] == "time" and summary["steps"] == res.steps


def test_bad_arguments_fail_before_work(setup, tmp_path):
    with pytest.raises(InvalidArgumentError, match="batch_size"):
        train(_cfg(setup, tmp_path / "m", batch_size=0))
    with pytest.raises(InvalidArgumentError, match="kl"):
        train(_cfg(setup, tmp_path / "m", kl="sideways"))
    with pytest.raises(TrainingError, match="exceeds the model's context"):
        train(_cfg(setup, tmp_path / "m", block_size=128))
    with pytest.raises(TrainingError, match="too small"):
        train(_cfg(setup, tmp_path / "m", block_size=64, model_config={**TINY, "max_position_embeddings": 1 << 20},
                   corpus=[str(_small_file(tmp_path))], eval_fraction=0))
    with pytest.raises(TrainingError, match="Unknown model config"):
        train(_cfg(setup, tmp_path / "m", model_config="no-such-preset"))
    assert not (tmp_path / "m" / "checkpoints").exists()


def _small_file(tmp_path: Path) -> Path:
    p = tmp_path / "small.txt"
    p.write_text("Tom ran home.\n")
    return p


def test_cli_train(setup, tmp_path):
    from edgelm.cli import main

    root, corpus, tok = setup
    cfg_file = tmp_path / "tiny.json"
    cfg_file.write_text(json.dumps(TINY))
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[teacher]\nblock_size = 32\nbatch_size = 4\nmax_steps = 50\nlayout = "blank-line-paragraphs"\n'
                      f'tokenizer = "{tok}"\n')
    rc = main(["train", "--recipe", str(recipe), "--config", str(cfg_file), "--corpus", str(corpus),
               "--out", str(tmp_path / "m"), "--max-steps", "4", "--no-progress", "--eval-every", "2"])
    assert rc == 0
    summary = json.loads((tmp_path / "m" / "training.json").read_text())
    assert summary["steps"] == 4 and summary["config"]["block_size"] == 32  # flag beat recipe; recipe beat default
    bad = tmp_path / "bad.toml"
    bad.write_text("[teacher]\nblock_sise = 3\n")
    assert main(["train", "--recipe", str(bad), "--out", str(tmp_path / "x"), "--corpus", str(corpus)]) == 1


@needs_shared()
def test_score_bits_per_byte_matches_the_reference_scorer():
    """The batched scorer gives the reference tool's number on the real stories260K model."""
    from transformers import AutoModelForCausalLM

    ref_tool = SHARED / "tools" / "bpb_reference.py"
    eval_file = SHARED / "eval" / "tinystories-v1-valid-a.txt"
    n_chars = 6000  # a few windows of 512 tokens, so the stride logic is exercised
    out = subprocess.run([sys.executable, str(ref_tool), str(STORIES260K), str(eval_file), str(n_chars)],
                         capture_output=True, text=True, check=True, env={"OMP_NUM_THREADS": "1", "PATH": ""}).stdout
    expected = float(out.strip().split("bits/byte=")[1])
    model = AutoModelForCausalLM.from_pretrained(str(STORIES260K))
    text = eval_file.read_text(encoding="utf-8")[:n_chars]
    got = score_bits_per_byte(model, STORIES260K, text, batch_size=4)
    assert abs(got["bits_per_byte"] - expected) < 2e-4, (got, expected)


# --- Ctrl-C and resume bookkeeping -------------------------------------------------------------------------
INTERRUPTED = dict(dropout=0.1, max_steps=20)  # interrupted in step 13; checkpoints every 5 steps


@pytest.fixture(scope="module")
def uninterrupted(setup, tmp_path_factory):
    """fn(teacher) -> the weights of the run never stopped (made once per teacher)."""
    made: dict = {}

    def weights(teacher=None):
        if id(teacher) not in made:
            out = tmp_path_factory.mktemp("uninterrupted") / "m"
            train(_cfg(setup, out, **INTERRUPTED), teacher=teacher)
            made[id(teacher)] = _weights(out)
        return made[id(teacher)]
    return weights


@pytest.fixture(scope="module")
def tiny_teacher(setup):
    """A random teacher on the test tokenizer: distillation runs the same loop as training."""
    from edgelm_export.corpus import load_tokenizer
    from edgelm_export.train import build_llama

    tok = load_tokenizer(setup[2])
    return build_llama(dict(TINY), tok.vocab_size, bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id, seed=7)


@contextlib.contextmanager
def _inside_step(step: int, where: str, action):
    """Call ``action`` inside optimizer step ``step`` (1-based): "batch", just after its batch is drawn; "update",
    just after optimizer.step() returned, before the loop counts the step."""
    from edgelm_export.corpus import BlockSampler

    calls = {"n": 0}

    def count():
        calls["n"] += 1
        if calls["n"] == step:
            action()

    if where == "batch":
        real = BlockSampler.next_batch

        def next_batch(self):
            batch = real(self)
            count()
            return batch

        BlockSampler.next_batch = next_batch
        try:
            yield
        finally:
            BlockSampler.next_batch = real
    else:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        handle = register_optimizer_step_post_hook(lambda opt, args, kwargs: count())
        try:
            yield
        finally:
            handle.remove()


def _ctrl_c():
    signal.raise_signal(signal.SIGINT)  # delivered to this (the main) thread before raise_signal returns


def _ctrl_c_twice():
    _ctrl_c()
    _ctrl_c()


def _raise():
    raise KeyboardInterrupt  # what Ctrl-C does where the loop's handler is not installed


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("action, where, teacher, saved_at", [
    (_ctrl_c, "batch", False, 13), (_ctrl_c, "update", False, 13), (_ctrl_c, "update", True, 13),
    (_ctrl_c_twice, "batch", False, 10), (_raise, "batch", False, 10), (_raise, "update", False, 10),
], ids=["ctrl-c-after-batch", "ctrl-c-after-update", "ctrl-c-after-update-distill", "ctrl-c-twice",
        "raised-after-batch", "raised-after-update"])
def test_interrupt_inside_a_step_resumes_bit_for_bit(setup, tmp_path, capsys, uninterrupted, tiny_teacher, action,
                                                     where, teacher, saved_at):
    """A Ctrl-C inside step 13 lets the step finish and checkpoints it; a second Ctrl-C (or a KeyboardInterrupt raised
    where no handler defers it) stops at once and keeps step 10's checkpoint. Either way no half-done step is saved,
    and the resumed run ends with exactly the weights of one never stopped."""
    teacher = tiny_teacher if teacher else None
    out = tmp_path / "b"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with _inside_step(13, where, action), pytest.raises(KeyboardInterrupt):
        train(_cfg(setup, out, **INTERRUPTED), teacher=teacher)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the run's handler is gone
    assert load_checkpoint(out / "checkpoints")["step"] == saved_at
    err = capsys.readouterr().err
    assert (f"checkpoint saved at step {saved_at}" if saved_at == 13 else
            f"no checkpoint written; --resume continues from step {saved_at}'s checkpoint") in err, err
    res = train(_cfg(setup, out, resume=True, **INTERRUPTED), teacher=teacher)
    assert res.steps == 20
    assert _same_weights(uninterrupted(teacher), _weights(out)), "the resumed run's weights differ"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_resume_from_a_damaged_last_checkpoint_says_so(setup, tmp_path, capsys):
    out = tmp_path / "m"
    train(_cfg(setup, out, max_steps=10))
    last = out / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:100])  # truncated
    res = train(_cfg(setup, out, max_steps=10, resume=True))
    assert res.steps == 10
    assert "last.pt" in (err := capsys.readouterr().err) and "resuming from prev.pt (step 5)" in err, err
    resume = [r for r in _log(out) if r.get("event") == "resume"]
    assert len(resume) == 1 and resume[0]["checkpoint"] == "prev.pt" and resume[0]["step"] == 5
    assert resume[0]["damaged"][0].startswith("last.pt: ")


def test_resume_without_a_checkpoint_says_so(setup, tmp_path, capsys):
    out = tmp_path / "m"
    res = train(_cfg(setup, out, max_steps=3, resume=True))
    assert res.steps == 3
    assert f"no checkpoint in {out / 'checkpoints'}; starting from step 0" in capsys.readouterr().err
    events = [r["event"] for r in _log(out) if "event" in r]
    assert events == ["resume", "start", "end"]
    assert _log(out)[0] == {"event": "resume", "step": 0, "checkpoint": None}


def test_resumed_log_lists_each_step_once(setup, tmp_path):
    """A run killed at step 13 logged steps 11-13 (and half a line) past its checkpoint at 10: the resumed log drops
    them, says so in its "resume" record, and lists every step once."""
    out = tmp_path / "m"

    def crash(step, record):
        if step == 13:
            raise RuntimeError("simulated kill")

    with pytest.raises(RuntimeError, match="simulated kill"):
        train(_cfg(setup, out, log_every=1), callback=crash)
    with open(out / "train_log.jsonl", "a") as f:
        f.write('{"step": 14, "lr": 0.00')  # killed while writing a line
    train(_cfg(setup, out, log_every=1, resume=True))
    log = _log(out)  # every line parses
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 21))
    assert [r["step"] for r in log if "eval_loss" in r] == [5, 10, 15, 20]
    resume = [r for r in log if r.get("event") == "resume"]
    assert resume == [{"event": "resume", "step": 10, "checkpoint": "last.pt", "dropped_records": 3,
                       "dropped_steps": [11, 13], "unreadable_lines": 1}]
    assert log.index(resume[0]) == next(i for i, r in enumerate(log) if r.get("step") == 10 and "eval_loss" in r) + 1


def test_training_off_the_main_thread_leaves_sigint_alone(setup, tmp_path):
    """Signal handlers can only be set from the main thread: elsewhere the loop runs without one."""
    done: dict = {}
    worker = threading.Thread(target=lambda: done.update(res=train(_cfg(setup, tmp_path / "m", max_steps=3))))
    worker.start()
    worker.join()
    assert done["res"].steps == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
