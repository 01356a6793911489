"""Training data and tokenizer training: readers, layouts, splits, packing, resumable order, bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest

from edgelm.errors import TrainingError

pytest.importorskip("tokenizers")

from edgelm_export import corpus  # noqa: E402
from edgelm_export.tokenizer import train_tokenizer  # noqa: E402

STORY_A = "Tom had a red ball.\nHe liked to play with it.\nThe end."
STORY_B = "Sue saw a big cat.\nThe cat was happy."


def _words_corpus(n_docs: int = 60) -> str:
    # Varied enough to learn a few hundred merges, small enough to be instant.
    names = ["Tom", "Sue", "Lily", "Ben", "Max", "Anna"]
    things = ["ball", "cat", "tree", "kite", "boat", "cake", "dog", "hat"]
    docs = []
    for i in range(n_docs):
        n, t = names[i % len(names)], things[(i * 7) % len(things)]
        docs.append(f"Once upon a time, {n} found a {t}.\n{n} was very happy and played with the {t} all day.\n"
                    f"\"Look at my {t}!\" said {n}. Story number {i}.")
    return "\n<|endoftext|>\n".join(docs) + "\n"


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("corpus") / "stories.txt"
    p.write_text(_words_corpus(), encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, corpus_file):
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer([str(corpus_file)], 300, out)
    return out


# --- readers and layouts ---------------------------------------------------------------------------------------
def test_split_on_separator_keeps_single_newlines_inside_documents():
    text = f"{STORY_A}\n<|endoftext|>\n{STORY_B}\n<|endoftext|>\n"
    assert corpus.split_text(text) == [STORY_A, STORY_B]


def test_split_on_blank_lines_without_separator():
    assert corpus.split_text(f"{STORY_A}\n\n\n{STORY_B}\n") == [STORY_A, STORY_B]


def test_blank_line_layout_matches_the_eval_file_convention():
    out = corpus.normalize_layout(STORY_A, "blank-line-paragraphs")
    assert out == "Tom had a red ball.\n\nHe liked to play with it.\n\nThe end.\n\n"
    # Idempotent, and concatenated documents stay in the same layout.
    assert corpus.normalize_layout(out, "blank-line-paragraphs") == out
    both = out + corpus.normalize_layout(STORY_B, "blank-line-paragraphs")
    assert all(block.count("\n") == 0 for block in both.strip("\n").split("\n\n"))
    assert corpus.normalize_layout(out, "single-newline") == STORY_A


def test_straight_quotes():
    assert corpus.normalize_layout("\u201cHi,\u201d she said. It\u2019s", straight_quotes=True) == "\"Hi,\" she said. It's"


def test_hard_wrapped_text_is_unwrapped_before_layout(tmp_path):
    para = ("The old king had three sons, and the youngest of them was\nthe kindest, though his brothers "
            "laughed at him every\nday for it.\n\n")
    p = tmp_path / "wrapped.txt"
    p.write_text(para * 30, encoding="utf-8")
    docs = corpus.read_documents([p], layout="blank-line-paragraphs")
    assert len(docs) == 30
    assert docs[0].count("\n\n") == 1 and "was the kindest" in docs[0]


def test_read_jsonl_and_folders(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": STORY_A}) + "\n\n" + json.dumps({"text": STORY_B}) + "\n")
    (tmp_path / "b.txt").write_text("Hello there.\n")
    docs = corpus.read_documents([tmp_path])
    assert docs == [STORY_A, STORY_B, "Hello there."]


@pytest.mark.parametrize("content, match", [
    (None, "does not exist"),
    (b"", "is empty"),
    (b"  \n\n", "is empty"),
    (b"caf\xe9 au lait\n", "not UTF-8"),
])
def test_bad_corpus_files(tmp_path, content, match):
    p = tmp_path / "bad.txt"
    if content is not None:
        p.write_bytes(content)
    with pytest.raises(TrainingError, match=match):
        corpus.read_documents([p])


def test_bad_jsonl(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok"}\n{not json}\n')
    with pytest.raises(TrainingError, match="not valid JSON"):
        corpus.read_documents([p])
    p.write_text('{"body": "ok"}\n')
    with pytest.raises(TrainingError, match="text-field"):
        corpus.read_documents([p])


def test_empty_folder_and_no_corpus(tmp_path):
    with pytest.raises(TrainingError, match="no .txt"):
        corpus.read_documents([tmp_path])
    with pytest.raises(TrainingError, match="No corpus"):
        corpus.read_documents([])


def test_hf_dataset_without_network_fails_clearly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(TrainingError, match="datasets|Hugging Face dataset"):
        corpus.read_documents(["hf:roneneldan/TinyStories"])


# --- held-out split -------------------------------------------------------------------------------------------
def test_heldout_split_is_deterministic_and_disjoint():
    docs = [f"doc {i}" for i in range(200)]
    tr1, ho1 = corpus.split_heldout(docs, fraction=0.05, seed=3)
    tr2, ho2 = corpus.split_heldout(docs, fraction=0.05, seed=3)
    _, ho3 = corpus.split_heldout(docs, fraction=0.05, seed=4)
    assert (tr1, ho1) == (tr2, ho2)
    assert len(ho1) == 10 and not set(tr1) & set(ho1) and sorted(tr1 + ho1) == sorted(docs)
    assert ho1 != ho3
    with pytest.raises(TrainingError, match="too few"):
        corpus.split_heldout(["only one"], fraction=0.5)


# --- tokenizer ------------------------------------------------------------------------------------------------
def test_tokenizer_training_is_deterministic(tmp_path, corpus_file, tok_dir):
    again = tmp_path / "again"
    train_tokenizer([str(corpus_file)], 300, again)
    assert (again / "tokenizer.json").read_bytes() == (tok_dir / "tokenizer.json").read_bytes()
    other = tmp_path / "other"
    train_tokenizer([str(corpus_file)], 290, other)
    assert (other / "tokenizer.json").read_bytes() != (tok_dir / "tokenizer.json").read_bytes()


def test_tokenizer_folder_loads_everywhere(tok_dir):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    assert tok.get_vocab_size() == 300
    text = "Once upon a time, Tom found a kite.\n\nCaf\u00e9 \U0001F600"
    enc = tok.encode(text)
    assert enc.ids[0] == tok.token_to_id("<s>") and "<unk>" not in enc.tokens[1:]
    assert tok.decode(enc.ids, skip_special_tokens=True) == text
    info = corpus.load_tokenizer(tok_dir)
    assert (info.bos_id, info.eos_id, info.pad_id) == (1, 2, 3)
    transformers = pytest.importorskip("transformers")
    at = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    assert at.bos_token == "<s>" and at.eos_token == "</s>" and at.pad_token == "<pad>" and at.unk_token == "<unk>"
    assert at(text).input_ids == enc.ids


def test_tokenizer_bad_input(tmp_path, corpus_file):
    with pytest.raises(TrainingError, match="at least"):
        train_tokenizer([str(corpus_file)], 100, tmp_path / "t")
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("hi there\n")
    with pytest.raises(TrainingError, match="too little"):
        train_tokenizer([str(tiny)], 300, tmp_path / "t")


# --- packing and batch order ---------------------------------------------------------------------------------
def test_packing_puts_bos_and_eos_around_documents(tok_dir):
    tok = corpus.load_tokenizer(tok_dir)
    docs = [STORY_A, STORY_B] * 10
    stream = corpus.tokenize_documents(docs, tok)
    expected = []
    for d in docs:
        expected += [tok.bos_id] + tok.encode(d) + [tok.eos_id]
    assert stream.tolist() == expected
    blocks = corpus.pack_documents(docs, tok, 16)
    assert blocks.shape[1] == 16 and blocks.size == (len(expected) // 16) * 16
    assert blocks.reshape(-1).tolist() == expected[: blocks.size]
    joined = corpus.pack_documents(docs, tok, 16, separator="text").reshape(-1).tolist()
    assert joined[0] == tok.bos_id and tok.eos_id not in joined and joined.count(tok.bos_id) == 1


def test_too_small_corpus_for_one_block(tok_dir):
    tok = corpus.load_tokenizer(tok_dir)
    with pytest.raises(TrainingError, match="too small"):
        corpus.pack_documents([STORY_A], tok, 4096)


def test_block_order_is_shuffled_per_epoch_and_resumable():
    s = corpus.BlockSampler(10, 3, seed=7)
    seen = [s.next_batch().tolist() for _ in range(7)]
    # Each epoch yields 3 full batches from one permutation; epochs differ.
    assert sorted(sum(seen[:3], [])) == sorted(set(sum(seen[:3], [])))
    assert s.epoch == 2 and seen[:3] != seen[3:6]
    # Resume at (epoch, index) from a saved state: same batches as carrying on.
    r = corpus.BlockSampler(10, 3, seed=7)
    for _ in range(4):
        r.next_batch()
    state = r.state_dict()
    fresh = corpus.BlockSampler(10, 3, seed=7)
    fresh.load_state_dict(state)
    assert [fresh.next_batch().tolist() for _ in range(3)] == seen[4:7]
    with pytest.raises(TrainingError, match="different data"):
        corpus.BlockSampler(11, 3, seed=7).load_state_dict(state)
    with pytest.raises(TrainingError, match="fewer than one batch"):
        corpus.BlockSampler(2, 3)


def test_eval_text_stream_has_one_bos(tok_dir, tmp_path):
    tok = corpus.load_tokenizer(tok_dir)
    p = tmp_path / "eval.txt"
    p.write_text("Tom ran.\n\nSue sat.\n\n")
    ids = corpus.text_stream(corpus.read_eval_text(p), tok)
    assert ids[0] == tok.bos_id and list(ids).count(tok.bos_id) == 1
    assert np.asarray(tok.encode("Tom ran.\n\nSue sat.\n\n")).tolist() == ids[1:].tolist()
