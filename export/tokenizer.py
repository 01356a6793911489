"""``edgelm train-tokenizer``: a byte-level BPE tokenizer trained on a corpus with the `tokenizers` library.

Byte-level means every UTF-8 byte is in the base alphabet, so any text encodes without an unknown token
(``<unk>`` exists only because tools expect the slot). The post-processor puts ``<s>`` (BOS) in front of
every encoded text, the convention the exporter and the runtime scorer follow. The result is a folder that
``AutoTokenizer.from_pretrained``, ``tokenizers.Tokenizer.from_file`` and ``edgelm export`` all read.

Training is deterministic: the same corpus, settings and library version give a byte-identical
tokenizer.json (word counts are exact and BPE ties break on the pair ids, not on hash order).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from edgelm.errors import TrainingError
from edgelm_export.corpus import read_documents

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
# Fixed order, so ids are stable: <unk>=0, <s>=1, </s>=2, <pad>=3 (the Llama convention for the first three).
SPECIAL_TOKENS = (UNK, BOS, EOS, PAD)


@dataclass(frozen=True)
class TokenizerResult:
    out_dir: Path
    vocab_size: int
    num_documents: int
    num_chars: int


def train_tokenizer(corpus: Sequence[str] | str, vocab_size: int, out_dir: str | os.PathLike, *,
                    min_frequency: int = 2, layout: str = "keep", separator: str | None = "<|endoftext|>",
                    text_field: str = "text", straight_quotes: bool = False, model_max_length: int = 512,
                    max_chars: int | None = None, overwrite: bool = True) -> TokenizerResult:
    """Train a byte-level BPE tokenizer on ``corpus`` and save an HF-loadable folder at ``out_dir``.

    ``layout`` / ``straight_quotes`` should match what training will use, so merges are learnt on the text the
    model will see. ``max_chars`` caps the training text (documents are taken in corpus order).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    n_special = len(SPECIAL_TOKENS)
    if not isinstance(vocab_size, int) or vocab_size < 256 + n_special:
        raise TrainingError(f"vocab size must be at least {256 + n_special} (256 bytes + {n_special} specials), got {vocab_size}.",
                            hint="Use e.g. --vocab-size 4096.")
    out = Path(out_dir).expanduser()
    if out.exists() and (out / "tokenizer.json").exists() and not overwrite:
        raise TrainingError(f"{out} already holds a tokenizer.", hint="Pass a new --out folder or remove the old one.")
    docs = read_documents(corpus, separator=separator, text_field=text_field, layout=layout,
                          straight_quotes=straight_quotes)
    if max_chars is not None:
        kept, total = [], 0
        for d in docs:
            if total >= max_chars:
                break
            kept.append(d)
            total += len(d)
        docs = kept
    n_chars = sum(len(d) for d in docs)
    if n_chars < 1000:
        raise TrainingError(f"The corpus has only {n_chars} characters: too little to train a tokenizer.",
                            hint="Add more text to --corpus.")

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B:1",
                                      special_tokens=[(BOS, bos_id)]),
    ])
    save_tokenizer_folder(tok, out, model_max_length=model_max_length)
    return TokenizerResult(out, tok.get_vocab_size(with_added_tokens=True), len(docs), n_chars)


def save_tokenizer_folder(tok, out: Path, *, model_max_length: int = 512) -> None:
    """Write tokenizer.json + tokenizer_config.json + special_tokens_map.json (what AutoTokenizer reads)."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "tokenizer.json.tmp"
    tok.save(str(tmp), pretty=True)
    os.replace(tmp, out / "tokenizer.json")
    specials = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "add_bos_token": True,   # the post-processor already adds it; recorded for the runtime's config
        "add_eos_token": False,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n", encoding="utf-8")


# --- options: the [tokenizer] recipe table / `edgelm train-tokenizer` flags ----------------------------------
DEFAULTS = {"corpus": None, "vocab_size": 4096, "out": None, "min_frequency": 2, "layout": "keep",
            "separator": "<|endoftext|>", "text_field": "text", "straight_quotes": False, "model_max_length": 512,
            "max_chars": None}
