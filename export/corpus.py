"""Training data: read a corpus into documents, normalise its layout, tokenise, pack into blocks.

The pieces, in the order the trainer uses them:

* :func:`read_documents` turns files (plain text, JSONL, a folder of them, or ``hf:NAME`` for a Hugging
  Face dataset when the network allows) into a list of documents.
* :func:`normalize_layout` rewrites a document into one layout. Layout matters for bits/byte: the eval file
  puts a blank line after every non-empty line, while the v1 training sample uses single newlines inside a
  story and the v2 sample uses single newlines and ``<|endoftext|>`` lines. A model trained on one layout
  pays for the other's newlines on every paragraph.
* :func:`split_heldout` carves a deterministic held-out set off the documents (or the caller passes an
  eval text file instead).
* :func:`pack_documents` tokenises documents and packs them into fixed-length blocks, BOS at each
  document start (when the tokenizer has one) and EOS between documents.
* :class:`BlockSampler` yields batches of block indices in a shuffled order that is a pure function of
  (seed, epoch), so a run can resume from (epoch, index) and see exactly the batches it would have seen.

Only numpy and ``tokenizers`` are needed here; torch is imported by the trainer.
"""
from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from edgelm.errors import TrainingError

LAYOUTS = ("keep", "blank-line-paragraphs", "single-newline")
DEFAULT_SEPARATOR = "<|endoftext|>"
TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")

# Curly quotes and dashes that some corpora use and the TinyStories eval text does not.
_QUOTES = str.maketrans({"\u201c": '"', "\u201d": '"', "\u2018": "'", "\u2019": "'", "\u2014": "-", "\u2013": "-",
                         "\u2026": "..."})


# --- reading ---------------------------------------------------------------------------------------
def _expand(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Files named directly, plus every text/JSONL file under named folders (sorted, so order is stable)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise TrainingError("No corpus given.", hint="Pass --corpus FILE [FILE ...] (text, JSONL or a folder).")
    out: list[str] = []
    for p in paths:
        s = str(p)
        if s.startswith("hf:"):
            out.append(s)
            continue
        path = Path(s).expanduser()
        if path.is_dir():
            found = sorted(str(f) for f in path.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES + JSONL_SUFFIXES)
            if not found:
                raise TrainingError(f"Corpus folder {path} holds no .txt or .jsonl files.",
                                    hint="Point --corpus at text files, JSONL files or a folder containing them.")
            out.extend(found)
        elif path.is_file():
            out.append(str(path))
        else:
            raise TrainingError(f"Corpus file {path} does not exist.", hint="Check the path given to --corpus.")
    return out


def _read_text(path: str) -> str:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise TrainingError(f"Cannot read corpus file {path}: {exc.strerror or exc}.",
                            hint="Check the file's permissions.") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TrainingError(f"Corpus file {path} is not UTF-8 (bad byte at offset {exc.start}).",
                            hint="Convert it first, e.g. `iconv -f latin1 -t utf-8 FILE > FILE.utf8`.") from exc
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    if not text.strip():
        raise TrainingError(f"Corpus file {path} is empty.", hint="Remove it from --corpus or give it some text.")
    return text


def looks_hard_wrapped(text: str) -> bool:
    """True for files whose paragraphs are wrapped at ~70-80 columns (Project Gutenberg style).

    TinyStories puts a whole paragraph on one line (median ~150 characters); Gutenberg texts wrap at
    ~70, so nearly every line is short. Wrapped lines must be joined before a layout is applied, or the
    layout would turn every wrapped line into a paragraph.
    """
    lines = [ln for ln in text.split("\n") if ln.strip()]
    if len(lines) < 20:
        return False
    # Wrapped text has almost no line longer than the wrap width; one-paragraph-per-line text has many.
    short = sum(len(ln) <= 80 for ln in lines) / len(lines)
    return short >= 0.95


def split_text(text: str, separator: str | None = DEFAULT_SEPARATOR, *, unwrap: bool = False) -> list[str]:
    """Split one file's text into documents.

    If ``separator`` occurs on a line of its own, documents are what lies between those lines (single
    newlines inside stay). Otherwise documents are separated by blank lines. With ``unwrap`` the lines of
    each blank-line paragraph are joined with spaces first.
    """
    if separator and separator in text:
        parts = re.split(r"(?:^|\n)[ \t]*" + re.escape(separator) + r"[ \t]*(?:\n|$)", text)
    else:
        parts = re.split(r"\n[ \t]*\n+", text)
    docs = []
    for part in parts:
        part = part.strip("\n")
        if not part.strip():
            continue
        if unwrap:
            paras = [" ".join(ln.strip() for ln in p.split("\n") if ln.strip()) for p in re.split(r"\n[ \t]*\n+", part)]
            part = "\n".join(p for p in paras if p)
        docs.append(part)
    return docs


def _read_jsonl(path: str, text_field: str) -> list[str]:
    text = _read_text(path)
    docs = []
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TrainingError(f"{path}:{n} is not valid JSON ({exc.msg}).",
                                hint="JSONL corpora need one JSON object per line.") from exc
        if not isinstance(row, dict) or text_field not in row:
            raise TrainingError(f"{path}:{n} has no {text_field!r} field.",
                                hint="Pass --text-field NAME to choose the field that holds the text.")
        value = row[text_field]
        if isinstance(value, str) and value.strip():
            docs.append(value.replace("\r\n", "\n").strip("\n"))
    if not docs:
        raise TrainingError(f"Corpus file {path} holds no documents in field {text_field!r}.",
                            hint="Check --text-field and the file's contents.")
    return docs


def _read_hf_dataset(spec: str, text_field: str) -> list[str]:
    """``hf:NAME`` or ``hf:NAME:SPLIT``. Needs the `datasets` package and a network (or a warm cache)."""
    name, _, split = spec[3:].partition(":")
    try:
        import datasets  # noqa: PLC0415 - optional dependency
    except ImportError as exc:
        raise TrainingError(f"Corpus {spec} needs the `datasets` package, which is not installed.",
                            hint="pip install datasets, or download the data and pass it as text/JSONL files.") from exc
    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as exc:  # network down, unknown name, ...: all mean "cannot get it here"
        raise TrainingError(f"Cannot load the Hugging Face dataset {name!r}: {type(exc).__name__}: {exc}",
                            hint="Without network access, export the data to text or JSONL files and pass those.") from exc
    if text_field not in ds.column_names:
        raise TrainingError(f"Dataset {name!r} has no column {text_field!r} (columns: {ds.column_names}).",
                            hint="Pass --text-field NAME.")
    return [t.replace("\r\n", "\n").strip("\n") for t in ds[text_field] if isinstance(t, str) and t.strip()]


def read_documents(paths: Sequence[str | os.PathLike] | str, *, separator: str | None = DEFAULT_SEPARATOR,
                   text_field: str = "text", layout: str = "keep", unwrap: bool | str = "auto",
                   straight_quotes: bool = False) -> list[str]:
    """Read every corpus input into a list of documents, each normalised to ``layout``.

    ``unwrap="auto"`` joins hard-wrapped lines in files that look wrapped (see :func:`looks_hard_wrapped`).
    Raises TrainingError for missing, empty or non-UTF-8 inputs before any work is done.
    """
    if layout not in LAYOUTS:
        raise TrainingError(f"Unknown layout {layout!r}.", hint=f"Use one of: {', '.join(LAYOUTS)}.")
    docs: list[str] = []
    for path in _expand(paths):
        if path.startswith("hf:"):
            file_docs = _read_hf_dataset(path, text_field)
        elif path.lower().endswith(JSONL_SUFFIXES):
            file_docs = _read_jsonl(path, text_field)
        else:
            text = _read_text(path)
            wrap = looks_hard_wrapped(text) if unwrap == "auto" else bool(unwrap)
            file_docs = split_text(text, separator, unwrap=wrap)
        docs.extend(normalize_layout(d, layout, straight_quotes=straight_quotes) for d in file_docs)
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise TrainingError("The corpus holds no text.", hint="Check the files passed to --corpus.")
    return docs


def normalize_layout(doc: str, layout: str = "keep", *, straight_quotes: bool = False) -> str:
    """Rewrite one document's line structure.

    * ``keep``: as read.
    * ``blank-line-paragraphs``: every non-empty line followed by one blank line (the TinyStories eval layout),
      including after the last line, so documents concatenate into the same layout.
    * ``single-newline``: non-empty lines joined by single newlines.
    """
    if straight_quotes:
        doc = doc.translate(_QUOTES)
    if layout == "keep":
        return doc
    lines = [ln for ln in doc.split("\n") if ln.strip()]
    if layout == "blank-line-paragraphs":
        return "".join(ln + "\n\n" for ln in lines)
    if layout == "single-newline":
        return "\n".join(lines)
    raise TrainingError(f"Unknown layout {layout!r}.", hint=f"Use one of: {', '.join(LAYOUTS)}.")


def split_heldout(docs: list[str], *, fraction: float = 0.01, seed: int = 0, min_docs: int = 1,
                  max_docs: int | None = 2000) -> tuple[list[str], list[str]]:
    """Deterministically move a fraction of the documents to a held-out list: (train, heldout).

    The choice depends only on ``seed`` and the document list, never on hash randomisation.
    """
    if not 0 <= fraction < 1:
        raise TrainingError(f"eval fraction must be in [0, 1), got {fraction}.", hint="Use e.g. 0.01.")
    if fraction == 0:
        return list(docs), []
    n = max(min_docs, int(round(len(docs) * fraction)))
    if max_docs is not None:
        n = min(n, max_docs)
    if n >= len(docs):
        raise TrainingError(f"The corpus has {len(docs)} documents: too few to hold {n} out for evaluation.",
                            hint="Add text, lower --eval-fraction, or pass --eval-text FILE.")
    idx = list(range(len(docs)))
    random.Random(seed).shuffle(idx)
    held = set(idx[:n])
    return [d for i, d in enumerate(docs) if i not in held], [d for i, d in enumerate(docs) if i in held]


# --- tokenising and packing --------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenizerInfo:
    """A `tokenizers.Tokenizer` plus the special ids the packer needs."""

    tokenizer: object  # tokenizers.Tokenizer
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    path: Path

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without any special tokens."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]


def _token_name(value) -> str | None:
    if isinstance(value, dict):  # {"content": "<s>", ...} in older tokenizer_config files
        return value.get("content")
    return value if isinstance(value, str) else None


def load_tokenizer(path: str | os.PathLike) -> TokenizerInfo:
    """Load ``tokenizer.json`` from a folder (or the file itself) and find BOS/EOS/PAD ids.

    Special tokens come from tokenizer_config.json / special_tokens_map.json, then config.json's ids, then
    the conventional names (``<s>``, ``</s>``, ``<pad>``, ``<|endoftext|>``).
    """
    from tokenizers import Tokenizer

    p = Path(path).expanduser()
    file = p / "tokenizer.json" if p.is_dir() else p
    if not file.is_file():
        raise TrainingError(f"No tokenizer.json at {p}.",
                            hint="Train one with `edgelm train-tokenizer` or point at a Hugging Face model folder.")
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as exc:
        raise TrainingError(f"{file} is not a valid tokenizers file: {exc}", hint="Re-create the tokenizer.") from exc
    folder = file.parent
    names: dict[str, str | None] = {}
    for meta in ("special_tokens_map.json", "tokenizer_config.json"):
        if (folder / meta).is_file():
            try:
                cfg = json.loads((folder / meta).read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                continue
            for key in ("bos", "eos", "pad"):
                name = _token_name(cfg.get(f"{key}_token"))
                if name:
                    names[key] = name
    ids: dict[str, int | None] = {}
    for key, fallbacks in (("bos", ("<s>", "<|begin_of_text|>")), ("eos", ("</s>", "<|endoftext|>", "<|end_of_text|>")),
                           ("pad", ("<pad>",))):
        tid = tok.token_to_id(names[key]) if names.get(key) else None
        if tid is None and (folder / "config.json").is_file():
            try:
                cfg_id = json.loads((folder / "config.json").read_text(encoding="utf-8")).get(f"{key}_token_id")
                tid = cfg_id[0] if isinstance(cfg_id, list) and cfg_id else cfg_id
            except (OSError, json.JSONDecodeError):
                tid = None
        for name in fallbacks:
            if tid is None:
                tid = tok.token_to_id(name)
        ids[key] = tid
    return TokenizerInfo(tok, ids["bos"], ids["eos"], ids["pad"], folder)


def tokenize_documents(docs: list[str], tok: TokenizerInfo, *, add_bos: bool = True, add_eos: bool = True,
                       chunk: int = 2048) -> np.ndarray:
    """One flat int32 stream: [BOS] doc [EOS] [BOS] doc [EOS] ... (specials only where the tokenizer has them)."""
    pieces: list[np.ndarray] = []
    bos = [tok.bos_id] if add_bos and tok.bos_id is not None else []
    eos = [tok.eos_id] if add_eos and tok.eos_id is not None else []
    for start in range(0, len(docs), chunk):
        for ids in tok.encode_batch(docs[start:start + chunk]):
            pieces.append(np.asarray(bos + ids + eos, dtype=np.int32))
    if not pieces:
        return np.zeros(0, dtype=np.int32)
    return np.concatenate(pieces)


def pack_stream(stream: np.ndarray, block_size: int, *, what: str = "corpus") -> np.ndarray:
    """Cut a token stream into ``[n_blocks, block_size]`` (the tail that does not fill a block is dropped)."""
    if block_size < 2:
        raise TrainingError(f"block size must be at least 2, got {block_size}.", hint="Use e.g. --block-size 256.")
    n = len(stream) // block_size
    if n == 0:
        raise TrainingError(f"The {what} is too small: {len(stream)} tokens, less than one block of {block_size}.",
                            hint="Add more text or lower --block-size.")
    return stream[: n * block_size].reshape(n, block_size)


def pack_documents(docs: list[str], tok: TokenizerInfo, block_size: int, *, separator: str = "eos",
                   what: str = "corpus") -> np.ndarray:
    """Tokenise and pack documents into blocks.

    ``separator="eos"`` puts BOS before and EOS after every document. ``separator="text"`` joins documents as
    plain text (only the layout's own newlines between them) with a single BOS at the start, which mimics an
    eval file that is one long stream of stories.
    """
    if separator == "eos":
        stream = tokenize_documents(docs, tok)
    elif separator == "text":
        ids = tok.encode_batch(docs)
        head = [tok.bos_id] if tok.bos_id is not None else []
        stream = np.asarray(head + [t for d in ids for t in d], dtype=np.int32)
    else:
        raise TrainingError(f"Unknown document separator {separator!r}.", hint="Use 'eos' or 'text'.")
    return pack_stream(stream, block_size, what=what)


def text_stream(text: str, tok: TokenizerInfo) -> np.ndarray:
    """A whole text (e.g. the eval file) as one stream with BOS at the start only, like the reference scorer."""
    head = [tok.bos_id] if tok.bos_id is not None else []
    return np.asarray(head + tok.encode(text), dtype=np.int32)


def read_eval_text(path: str | os.PathLike) -> str:
    """Read an eval text file as-is (its layout is the thing being measured, so it is not normalised)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise TrainingError(f"Eval text {p} does not exist.", hint="Check the path given to --eval-text.")
    return _read_text(str(p))


# --- batches ------------------------------------------------------------------------------------------
@dataclass
class BlockSampler:
    """Batches of block indices, shuffled per epoch with a permutation that depends only on (seed, epoch).

    The position (epoch, index) is all the state there is, so saving and restoring it resumes the exact
    sequence of batches. A batch never straddles two epochs: the tail of an epoch that does not fill a
    batch is skipped (it comes first in a later epoch's permutation often enough).
    """

    n_blocks: int
    batch_size: int
    seed: int = 0
    epoch: int = 0
    index: int = 0
    _perm: np.ndarray | None = field(default=None, repr=False)
    _perm_epoch: int = field(default=-1, repr=False)

    def __post_init__(self):
        if self.n_blocks < self.batch_size:
            raise TrainingError(f"The corpus packs into {self.n_blocks} blocks, fewer than one batch of {self.batch_size}.",
                                hint="Add text, or lower --batch-size / --block-size.")

    def permutation(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_blocks)
            self._perm_epoch = epoch
        return self._perm

    def next_batch(self) -> np.ndarray:
        if self.index + self.batch_size > self.n_blocks:
            self.epoch += 1
            self.index = 0
        batch = self.permutation(self.epoch)[self.index:self.index + self.batch_size]
        self.index += self.batch_size
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "n_blocks": self.n_blocks,
                "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        if state.get("n_blocks") != self.n_blocks or state.get("batch_size") != self.batch_size:
            raise TrainingError("The checkpoint was made with different data (block count or batch size differ).",
                                hint="Resume with the same corpus, tokenizer, block size and batch size, or start fresh.")
        self.epoch, self.index, self.seed = int(state["epoch"]), int(state["index"]), int(state["seed"])

    @property
    def epochs_done(self) -> float:
        return self.epoch + self.index / self.n_blocks


def iter_texts(paths: Iterable[str]) -> Iterable[str]:
    """Stream raw text of several files (used for tokenizer training without holding everything twice)."""
    for p in _expand(list(paths)):
        yield _read_text(p)
