"""Distillation: layer init, tokenizer/shape checks, the KD loss path on a real teacher, sequence-level sampling."""
from __future__ import annotations

import json
import re
import shutil

import pytest

from edgelm.errors import TrainingError

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from conftest import SHARED, STORIES260K, needs_shared  # noqa: E402
from edgelm_export.distill import (build_student, distill, evenly_spaced_layers, load_causal_lm,  # noqa: E402
                                   sample_corpus, student_from_teacher_layers)
from edgelm_export.train import TrainConfig, evaluate  # noqa: E402

pytestmark = [pytest.mark.slow, needs_shared(), pytest.mark.usefixtures("torch_one_thread")]
V1 = SHARED / "corpus" / "tinystories" / "tinystories-v1-train-sample.txt"
EVAL = SHARED / "eval" / "tinystories-v1-valid-a.txt"


@pytest.fixture(scope="module")
def teacher():
    return load_causal_lm(STORIES260K)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    p = tmp_path_factory.mktemp("kd") / "stories.txt"
    text = V1.read_text(encoding="utf-8")[:60_000]
    p.write_text(text[: text.rfind("<|endoftext|>")], encoding="utf-8")
    return p


def test_a_missing_teacher_is_named_as_missing(tmp_path, corpus):
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), corpus=[str(corpus)], max_steps=1, device="cpu")
    with pytest.raises(TrainingError, match="does not exist"):
        distill(cfg, tmp_path / "nope", student_layers=1)
    (tmp_path / "file").write_text("x")
    with pytest.raises(TrainingError, match="is a file"):
        distill(cfg, tmp_path / "file", student_layers=1)


def test_evenly_spaced_layers():
    assert evenly_spaced_layers(12, 4) == [0, 4, 7, 11]
    assert evenly_spaced_layers(5, 3) == [0, 2, 4]
    assert evenly_spaced_layers(5, 5) == [0, 1, 2, 3, 4]
    assert evenly_spaced_layers(6, 1) == [5]
    with pytest.raises(TrainingError, match="more layers"):
        evenly_spaced_layers(5, 6)
    with pytest.raises(TrainingError, match="at least one"):
        evenly_spaced_layers(5, 0)


def test_layer_init_copies_the_picked_teacher_layers(teacher):
    student = student_from_teacher_layers(teacher, 3)
    picked = evenly_spaced_layers(teacher.config.num_hidden_layers, 3)
    assert student.config.num_hidden_layers == 3 and student.config.edgelm_init_layers == picked
    for i, j in enumerate(picked):
        s, t = student.model.layers[i].state_dict(), teacher.model.layers[j].state_dict()
        assert s.keys() == t.keys() and all(torch.equal(s[k], t[k]) for k in s)
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert torch.equal(student.model.norm.weight, teacher.model.norm.weight)
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)
    # Same input, same first-layer activations: the copy is real, not just equal-shaped.
    x = torch.tensor([[1, 300, 301, 302]])
    with torch.no_grad():
        hs = student(input_ids=x, output_hidden_states=True).hidden_states[1]
        ht = teacher(input_ids=x, output_hidden_states=True).hidden_states[1]
    assert torch.allclose(hs, ht, atol=1e-6)


def test_student_shape_checks(teacher):
    with pytest.raises(TrainingError, match="more layers"):
        build_student(teacher, student_layers=teacher.config.num_hidden_layers + 1)
    with pytest.raises(TrainingError, match="hidden_size"):
        build_student(teacher, student_config={"hidden_size": 128, "num_hidden_layers": 2}, init="layers")
    with pytest.raises(TrainingError, match="more than the teacher"):
        build_student(teacher, student_config={"num_hidden_layers": 9}, init="layers")
    with pytest.raises(TrainingError, match="vocab_size"):
        build_student(teacher, student_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                               "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 1000})
    with pytest.raises(TrainingError, match="exactly one"):
        build_student(teacher)
    small = build_student(teacher, student_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                                   "num_attention_heads": 2, "num_key_value_heads": 1})
    assert small.config.vocab_size == teacher.config.vocab_size and small.config.max_position_embeddings == 512


def test_tokenizer_mismatch_is_refused(tmp_path, corpus):
    from edgelm_export.tokenizer import train_tokenizer

    other = tmp_path / "other-tok"
    train_tokenizer([str(corpus)], 512, other)  # same size as the teacher's vocabulary, different tokens
    cfg = TrainConfig(out_dir=str(tmp_path / "s"), corpus=[str(corpus)], tokenizer=str(other), progress=False)
    with pytest.raises(TrainingError, match="differs from the teacher"):
        distill(cfg, STORIES260K, student_layers=2)
    assert not (tmp_path / "s").exists()


def test_teacher_without_tokenizer_is_refused(tmp_path, corpus):
    bare = tmp_path / "bare"
    shutil.copytree(STORIES260K, bare)
    (bare / "tokenizer.json").unlink()
    with pytest.raises(TrainingError, match="no tokenizer.json"):
        distill(TrainConfig(out_dir=str(tmp_path / "s"), corpus=[str(corpus)], progress=False), bare, student_layers=2)


def test_kd_drives_student_toward_teacher(tmp_path, corpus, teacher):
    """Pure KD (alpha=1) from the real stories260K: held-out KL(teacher||student) falls well below its start.

    With the KD term broken (zero, detached, wrong sign) the student gets no signal at all and the KL stays put.
    """
    from edgelm_export.corpus import load_tokenizer, pack_stream, read_eval_text, text_stream

    tok = load_tokenizer(STORIES260K)
    text = read_eval_text(EVAL)[:20_000]
    held = pack_stream(text_stream(text, tok), 64)[:16]
    bpt = len(text.encode()) / len(text_stream(text, tok))
    student_cfg = {"hidden_size": 32, "intermediate_size": 86, "num_hidden_layers": 2, "num_attention_heads": 4,
                   "num_key_value_heads": 2}
    start = evaluate(build_student(teacher, student_config=student_cfg, seed=0), held, bytes_per_token=bpt,
                     teacher=teacher)["eval_kl"]
    cfg = TrainConfig(out_dir=str(tmp_path / "s"), corpus=[str(corpus)], block_size=64, batch_size=8, max_steps=250,
                      warmup_steps=20, lr=1e-2, eval_every=1000, save_every=1000, progress=False, alpha=1.0,
                      temperature=1.0, layout="blank-line-paragraphs", eval_text=str(EVAL), eval_max_tokens=1024)
    res = distill(cfg, STORIES260K, student_config=student_cfg)
    from transformers import AutoModelForCausalLM
    student = AutoModelForCausalLM.from_pretrained(str(tmp_path / "s"))
    end = evaluate(student, held, bytes_per_token=bpt, teacher=teacher)["eval_kl"]
    assert end < 0.5 * start, (start, end)
    assert res.eval["eval_kl"] < 0.5 * start
    summary = json.loads((tmp_path / "s" / "training.json").read_text())
    assert summary["teacher"] is True and summary["extra"]["student_init"] == "random"


def test_layer_init_student_starts_close_and_trains(tmp_path, corpus, teacher):
    """A 3-of-5-layer student starts far closer to the teacher than a random one, and KD+CE training runs."""
    cfg = TrainConfig(out_dir=str(tmp_path / "s"), corpus=[str(corpus)], block_size=64, batch_size=4, max_steps=10,
                      warmup_steps=2, lr=1e-3, eval_every=5, save_every=5, progress=False, alpha=0.5,
                      temperature=2.0, kl="reverse", hidden_weight=0.1, layout="blank-line-paragraphs",
                      eval_max_tokens=512)
    res = distill(cfg, STORIES260K, student_layers=3)
    assert res.steps == 10 and math_finite(res.eval["eval_kl"])
    log = [json.loads(line) for line in (tmp_path / "s" / "train_log.jsonl").read_text().splitlines()]
    assert all("kd" in r and "hidden" in r for r in log if "loss" in r)
    cfg_json = json.loads((tmp_path / "s" / "config.json").read_text())
    assert cfg_json["num_hidden_layers"] == 3 and cfg_json["edgelm_init_layers"] == [0, 2, 4]
    assert (tmp_path / "s" / "tokenizer.json").read_bytes() == (STORIES260K / "tokenizer.json").read_bytes()


def math_finite(x: float) -> bool:
    import math
    return math.isfinite(x)


def test_sequence_level_samples_make_a_corpus(tmp_path):
    from edgelm_export.corpus import read_documents

    out = tmp_path / "samples.txt"
    res = sample_corpus(STORIES260K, out, num_tokens=300, batch_size=4, max_new_tokens=96, seed=1, progress=False,
                        device="cpu")
    assert res.tokens >= 300 and res.documents >= 1 and out.is_file()
    assert not out.with_name(out.name + ".tmp").exists()
    docs = read_documents([out])
    assert len(docs) == res.documents
    for d in docs:  # the eval layout: lines separated by exactly one blank line
        assert re.search(r"[^\n]\n[^\n]", d) is None and "\n\n\n" not in d, d
    assert read_documents([out], layout="blank-line-paragraphs") == [d + "\n\n" for d in docs]
    again = tmp_path / "again.txt"
    sample_corpus(STORIES260K, again, num_tokens=300, batch_size=4, max_new_tokens=96, seed=1, progress=False,
                  device="cpu")
    assert again.read_text() == out.read_text()  # deterministic for a seed
