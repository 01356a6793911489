"""``edgelm train``: one training loop for training from scratch and for distillation.

:func:`train` trains a Llama-architecture model (``transformers.LlamaForCausalLM``) on packed blocks of a
corpus. With ``teacher=None`` the loss is ordinary next-token cross-entropy; with a teacher
(``edgelm distill``) it is ``alpha * T^2 * KL + (1 - alpha) * CE`` (+ an optional hidden-state cosine term).

What the loop guarantees:

* **Exact resume.** A checkpoint holds the model, AdamW state, step, elapsed time, data position
  (epoch, index) and every RNG state, so ``resume=True`` continues bit-for-bit as if never stopped (on the
  same device and library versions). Checkpoints go to ``OUT/checkpoints/last.pt`` every ``save_every`` steps
  and at the end, written to a temporary file and renamed over the old one; the one before is kept as
  ``prev.pt``. A full disk raises OutOfDiskError and leaves both intact.
* **Ctrl-C keeps whole steps.** While the loop runs (in the main thread), the first Ctrl-C only asks it to
  stop: the step in progress finishes, then a checkpoint of that state is written and KeyboardInterrupt
  raised. A checkpoint taken halfway through a step (its batch drawn, or its update applied before the step
  counter moved) would make the resumed run skip a batch or apply an update twice. A second Ctrl-C, or a
  KeyboardInterrupt from elsewhere, stops at once and writes no checkpoint unless it lands between steps;
  ``--resume`` then continues from the last ``save_every`` one, still exactly.
* **An unambiguous log.** ``train_log.jsonl`` gets a "resume" record on every resume, saying which
  checkpoint it came from (``prev.pt`` when ``last.pt`` is damaged, none when there was none; both also said
  on stderr), and loses the records of steps after that checkpoint's: the killed run's work past it is
  redone, and keeping both would list those steps twice.
* **Time budgets.** ``max_time_s`` stops the run cleanly (final eval and save) when the wall-clock budget is
  spent, counted across resumes. The learning rate follows warmup + cosine over *progress*, which is
  ``step / max_steps`` or, when a time budget is set, whichever of that and ``elapsed / max_time_s`` is
  further along: a time-limited run still anneals its learning rate to the end instead of being cut off
  at a high one. (Resume stays exact for step-limited runs; time-limited runs depend on the clock.)
* **Devices.** ``device="auto"`` picks CUDA when present; bf16 autocast is used on CUDA only (on the
  development CPUs bf16 is slower than fp32); ``compile=True`` wraps the model in ``torch.compile``.

The output folder is a standard Hugging Face model folder (config.json, model.safetensors, tokenizer
files, generation_config.json) that ``edgelm export`` reads without flags. The command line (flags, recipe
defaults, printing) is in :mod:`edgelm_export.commands`.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgelm.errors import InvalidArgumentError, OutOfDiskError, TrainingError
from edgelm_export.corpus import (BlockSampler, load_tokenizer, pack_documents, pack_stream, read_documents,
                                  read_eval_text, split_heldout, text_stream)

# Llama shapes by name. head_dim is a multiple of 16 from "small" up (onnxruntime-genai's CPU attention
# kernel needs that); the "tiny" preset is for tests only.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256),
    # ~1.3M parameters with a 4096 vocabulary
    "small": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512),
    # ~5.4M parameters with a 4096 vocabulary: the edge student (int8 ~6 MB)
    "edge-5m": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=6, num_attention_heads=8,
                    num_key_value_heads=4, max_position_embeddings=512),
    # ~15M: a student for boards with more room
    "edge-15m": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=6,
                     num_key_value_heads=3, max_position_embeddings=512),
    # ~30M: a teacher for a GPU run
    "teacher-30m": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                        num_key_value_heads=4, max_position_embeddings=512),
    # ~60M: a bigger GPU teacher
    "teacher-60m": dict(hidden_size=640, intermediate_size=1728, num_hidden_layers=12, num_attention_heads=10,
                        num_key_value_heads=5, max_position_embeddings=512),
}

CHECKPOINT_DIR = "checkpoints"
LOG_FILE = "train_log.jsonl"
RESULT_FILE = "training.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


@dataclass
class TrainConfig:
    """Everything a run needs. Defaults suit a small CPU run; recipes override them."""

    out_dir: str
    corpus: list[str]
    tokenizer: str | None = None          # folder with tokenizer.json (defaults to the teacher's folder)
    model_config: Any = "small"          # preset name, path to a config JSON, or a dict of LlamaConfig fields
    eval_text: str | None = None          # held-out text file (its layout is kept); else a split of the corpus
    eval_fraction: float = 0.01
    eval_max_tokens: int = 65536          # cap on held-out tokens evaluated every eval_every steps
    layout: str = "keep"                  # see edgelm_export.corpus.LAYOUTS
    separator: str | None = "<|endoftext|>"
    text_field: str = "text"
    straight_quotes: bool = False
    doc_join: str = "eos"                 # "eos": BOS doc EOS per document; "text": one stream, BOS once
    block_size: int = 256
    batch_size: int = 32
    grad_accum: int = 1
    max_steps: int = 1000
    max_time_s: float | None = None
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    dropout: float = 0.0
    seed: int = 0
    eval_every: int = 200
    save_every: int = 200
    log_every: int = 10
    device: str = "auto"
    amp: str = "auto"                     # auto (bf16 on CUDA) | bf16 | fp16 | none
    compile: bool = False
    num_threads: int | None = None
    progress: bool = True
    resume: bool = False
    overwrite: bool = False
    # distillation (used when a teacher is passed to train())
    alpha: float = 0.5
    temperature: float = 2.0
    kl: str = "forward"                   # forward: KL(teacher || student); reverse: KL(student || teacher)
    hidden_weight: float = 0.0
    hidden_map: list[int] | None = None   # student layer i <-> teacher layer hidden_map[i]
    extra: dict[str, Any] = field(default_factory=dict)   # recorded in training.json, not interpreted


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    tokens: int
    wall_time_s: float
    params: int
    stopped: str                          # "max_steps" | "time" | "already-done"
    eval: dict[str, float]
    tokens_per_s: float


# --- small helpers -----------------------------------------------------------------------------------------
def count_params(model) -> int:
    """Unique parameters (tied embeddings counted once)."""
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def resolve_model_config(spec: Any) -> dict[str, Any]:
    """A preset name, a path to a JSON file, or a dict -> a dict of LlamaConfig fields."""
    if isinstance(spec, dict):
        return dict(spec)
    if isinstance(spec, str) and spec in PRESETS:
        return dict(PRESETS[spec])
    if isinstance(spec, (str, os.PathLike)) and Path(spec).is_file():
        try:
            return json.loads(Path(spec).read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise TrainingError(f"Model config {spec} is not valid JSON: {exc}.", hint="Fix the file.") from exc
    raise TrainingError(f"Unknown model config {spec!r}.",
                        hint=f"Use a preset ({', '.join(PRESETS)}), a config JSON file, or a dict.")


def build_llama(config: dict[str, Any], vocab_size: int, *, bos_id: int | None, eos_id: int | None,
                pad_id: int | None, seed: int = 0):
    """A randomly initialised LlamaForCausalLM (tied embeddings unless the config says otherwise)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = {k: v for k, v in config.items() if k not in ("architectures", "model_type", "transformers_version",
                                                             "torch_dtype", "dtype")}
    fields.setdefault("tie_word_embeddings", True)
    fields.setdefault("rms_norm_eps", 1e-5)
    fields.setdefault("rope_theta", 10000.0)
    fields["vocab_size"] = int(fields.get("vocab_size") or vocab_size)
    if fields["vocab_size"] < vocab_size:
        raise TrainingError(f"Model vocab_size {fields['vocab_size']} is smaller than the tokenizer's {vocab_size}.",
                            hint="Drop vocab_size from the model config (it defaults to the tokenizer's).")
    fields.update(bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id)
    if fields["hidden_size"] % fields["num_attention_heads"]:
        raise TrainingError("hidden_size must be a multiple of num_attention_heads.", hint="Fix the model config.")
    cfg = LlamaConfig(**fields)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    return model


def resolve_device(name: str):
    """"auto" (CUDA when present, else CPU) or a torch device name; refuses CUDA without a GPU."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError("device 'cuda' was asked for but no CUDA GPU is available.", hint="Use --device auto or cpu.")
    return dev


def _amp_dtype(amp: str, device):
    import torch

    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]


def _autocast(device, dtype):
    import contextlib

    import torch

    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def add_residual_dropout(model, p: float) -> None:
    """Dropout on each block's attention and MLP outputs (GPT-2 style residual dropout).

    LlamaConfig only has attention-probability dropout; on a few MB of text the residual kind is what
    stops a model memorising. Done with forward hooks, so the saved model and its config are unchanged.
    """
    import torch.nn.functional as F

    if p <= 0:
        return

    def hook(module, inputs, output):
        return F.dropout(output, p=p, training=module.training)

    for layer in model.model.layers:
        layer.mlp.register_forward_hook(hook)
        layer.self_attn.o_proj.register_forward_hook(hook)


def lr_at(cfg: TrainConfig, step: int, progress: float) -> float:
    """Linear warmup over ``warmup_steps``, then cosine from lr to lr * min_lr_ratio over progress in [0, 1]."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    p = min(max(progress, 0.0), 1.0)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def kd_loss(student_logits, teacher_logits, temperature: float, kind: str = "forward"):
    """T^2-scaled KL between temperature-softened distributions, averaged over positions (fp32)."""
    import torch.nn.functional as F

    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if kind == "forward":
        kl = (t.exp() * (t - s)).sum(-1)
    elif kind == "reverse":
        kl = (s.exp() * (s - t)).sum(-1)
    else:
        raise TrainingError(f"Unknown KL direction {kind!r}.", hint="Use 'forward' or 'reverse'.")
    return kl.mean() * temperature ** 2


def hidden_cosine_loss(student_hidden, teacher_hidden, hidden_map: list[int]):
    """Mean (1 - cosine) between student layer i's output and teacher layer hidden_map[i]'s output."""
    import torch.nn.functional as F

    losses = [1 - F.cosine_similarity(student_hidden[i + 1].float(), teacher_hidden[j + 1].float(), dim=-1).mean()
              for i, j in enumerate(hidden_map)]
    return sum(losses) / len(losses)


def evenly_spaced_layers(n_teacher: int, k: int) -> list[int]:
    """K teacher layer indices spread evenly from the first to the last (k=1 -> the last layer).

    >>> evenly_spaced_layers(12, 4)
    [0, 4, 7, 11]
    """
    if k < 1:
        raise TrainingError(f"The student needs at least one layer, got {k}.", hint="Use --student-layers 1 or more.")
    if k > n_teacher:
        raise TrainingError(f"The student cannot have more layers ({k}) than the teacher ({n_teacher}) with layer init.",
                            hint=f"Use --student-layers {n_teacher} or fewer, or --student-config with random init.")
    if k == 1:
        return [n_teacher - 1]
    return [int(i * (n_teacher - 1) / (k - 1) + 0.5) for i in range(k)]


# --- evaluation -----------------------------------------------------------------------------------------
def evaluate(model, blocks, *, bytes_per_token: float, batch_size: int = 16, device=None, amp_dtype=None,
             teacher=None) -> dict[str, float]:
    """Mean next-token loss on held-out blocks -> loss, ppl, bits/byte (and KL(teacher||student) at T=1).

    Blocks are scored independently (the first token of each block has no context), so bits/byte here is
    slightly pessimistic next to the sliding-window scorer :func:`score_bits_per_byte`.
    """
    import torch
    import torch.nn.functional as F

    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll, kl_sum, n = 0.0, 0.0, 0
    with torch.no_grad():
        for start in range(0, len(blocks), batch_size):
            x = torch.as_tensor(blocks[start:start + batch_size], device=device).long()
            with _autocast(device, amp_dtype):
                logits = model(input_ids=x).logits[:, :-1]
                t_logits = teacher(input_ids=x).logits[:, :-1] if teacher is not None else None
            tgt = x[:, 1:]
            nll += F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="sum").item()
            if t_logits is not None:
                kl_sum += kd_loss(logits, t_logits, 1.0).item() * tgt.numel()
            n += tgt.numel()
    if was_training:
        model.train()
    loss = nll / max(n, 1)
    out = {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50)), "eval_bpb": loss / math.log(2) / bytes_per_token,
           "eval_tokens": n}
    if teacher is not None:
        out["eval_kl"] = kl_sum / max(n, 1)
    return out


def score_bits_per_byte(model, tok, text: str, *, window: int | None = None, stride: int | None = None,
                        batch_size: int = 16, device=None) -> dict[str, float]:
    """Bits per UTF-8 byte of ``text`` the way shared/tools/bpb_reference.py measures it.

    BOS once at the start, windows of the model's context (``window``) with a stride of half of it, every
    token scored once. ``tok`` is a :class:`edgelm_export.corpus.TokenizerInfo` (or a folder path). Runs in
    fp32, batched. Use it on the final model to check the number `edgelm export` will report.
    """
    import torch

    if isinstance(tok, (str, os.PathLike)):
        tok = load_tokenizer(tok)
    device = device or next(model.parameters()).device
    ids = text_stream(text, tok)
    win = int(window or model.config.max_position_embeddings)
    stride = int(stride or win // 2)
    starts = []
    for start in range(0, len(ids) - 1, stride):
        starts.append(start)
        if start + win >= len(ids):
            break
    was_training = model.training
    model.eval()
    nll, n = 0.0, 0
    with torch.no_grad():
        full = [s for s in starts if s + win <= len(ids)]
        tail = [s for s in starts if s + win > len(ids)]
        groups = [full[i:i + batch_size] for i in range(0, len(full), batch_size)] + [[s] for s in tail]
        for group in groups:
            length = min(win, len(ids) - group[0])
            x = torch.as_tensor(np.stack([ids[s:s + length] for s in group]), device=device).long()
            logp = torch.log_softmax(model(input_ids=x).logits[:, :-1].float(), dim=-1)
            lp = logp.gather(2, x[:, 1:, None])[..., 0]
            for row, s in enumerate(group):
                skip = 0 if s == 0 else win - stride - 1
                nll -= lp[row, skip:].sum().item()
                n += lp.shape[1] - skip
    if was_training:
        model.train()
    nbytes = len(text.encode("utf-8"))
    return {"bits_per_byte": nll / math.log(2) / nbytes, "nats_per_token": nll / max(n, 1), "tokens": n,
            "bytes": nbytes}


# --- checkpoints --------------------------------------------------------------------------------------
def _is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def save_checkpoint(ckpt_dir: Path, state: dict) -> Path:
    """Write ``last.pt`` atomically, keeping the previous one as ``prev.pt``. Disk full -> OutOfDiskError."""
    import torch

    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tmp = ckpt_dir / "last.pt.tmp"
    last, prev = ckpt_dir / "last.pt", ckpt_dir / "prev.pt"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
    except Exception as exc:
        tmp.unlink(missing_ok=True)
        if _is_disk_full(exc) or _is_disk_full(exc.__cause__ or exc.__context__ or exc):
            raise OutOfDiskError(f"The disk is full: could not write a checkpoint in {ckpt_dir}.",
                                 hint=f"Free space and rerun with --resume; {last.name} / {prev.name} are intact.") from exc
        raise
    if last.exists():
        os.replace(last, prev)
    os.replace(tmp, last)
    return last


def load_checkpoint(ckpt_dir: Path) -> dict | None:
    """The newest readable checkpoint (``last.pt``, else ``prev.pt`` if last is damaged), or None."""
    return _read_checkpoint(ckpt_dir)[0]


def _read_checkpoint(ckpt_dir: Path) -> tuple[dict | None, str | None, list[str]]:
    """(the newest readable checkpoint or None, the file it came from, "name: why" for each newer unreadable one)."""
    import torch

    errors = []
    for name in ("last.pt", "prev.pt"):
        p = ckpt_dir / name
        if not p.is_file():
            continue
        try:
            # weights_only: a checkpoint is data, so unpickling it must not be able to run code (a .pt file copied
            # from elsewhere could). Older checkpoints kept numpy's RNG state as an array: allowed by name.
            with torch.serialization.safe_globals(_numpy_globals()):
                return torch.load(p, map_location="cpu", weights_only=True), name, errors
        except Exception as exc:  # truncated / corrupt / not plain data: fall back to the one before
            errors.append(f"{name}: {str(exc)[:200]}")
    if errors:
        raise TrainingError(f"No readable checkpoint in {ckpt_dir} ({'; '.join(errors)}).",
                            hint="Start again without --resume (or with a new --out).")
    return None, None, []


def _trim_log(path: Path, step: int) -> dict[str, Any]:
    """Drop from the log the records of steps after ``step`` and unreadable lines (a line half-written when the
    process was killed); rewritten atomically. -> what was dropped, as fields of the "resume" record.

    The log is written more often than checkpoints, so a killed run has logged steps its last checkpoint does
    not hold; the resumed run does them again, and keeping the old records would list those steps twice.
    """
    if not path.is_file():
        return {}
    kept, dropped, unreadable = [], [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            unreadable += bool(line.strip())
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] > step:
            dropped.append(rec["step"])
        else:
            kept.append(line)
    if not dropped and not unreadable:
        return {}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)
    out: dict[str, Any] = {}
    if dropped:
        out.update(dropped_records=len(dropped), dropped_steps=[min(dropped), max(dropped)])
    if unreadable:
        out["unreadable_lines"] = unreadable
    return out


def _numpy_globals() -> list:
    """What unpickling a numpy array of numpy's RNG state (checkpoints before plain lists) needs, and no more."""
    try:
        from numpy._core.multiarray import _reconstruct  # numpy 2
    except ImportError:  # numpy 1
        from numpy.core.multiarray import _reconstruct
    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def _rng_state(device) -> dict:
    import torch

    # numpy's state as plain values (its key array as a list), so the checkpoint loads with weights_only=True.
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, keys.tolist(), int(pos), int(has_gauss), float(cached)),
             "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device) -> None:
    import torch

    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# --- the HF output folder ----------------------------------------------------------------------------
def save_hf_folder(model, tok_dir: Path | None, out: Path, *, tok=None, extra_files: dict[str, str] | None = None) -> None:
    """config.json + model.safetensors + tokenizer files + generation_config.json, each replaced atomically."""
    tmp = out / ".save.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir(parents=True)
        model.save_pretrained(str(tmp), safe_serialization=True)
        if tok_dir is not None:
            for name in TOKENIZER_FILES:
                if (Path(tok_dir) / name).is_file():
                    shutil.copyfile(Path(tok_dir) / name, tmp / name)
        gen = {"bos_token_id": model.config.bos_token_id, "eos_token_id": model.config.eos_token_id,
               "pad_token_id": model.config.pad_token_id, "do_sample": True, "temperature": 0.8, "top_p": 0.95,
               "max_new_tokens": 256}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        for f in sorted(tmp.iterdir()):
            os.replace(f, out / f.name)
    except OSError as exc:
        if _is_disk_full(exc):
            raise OutOfDiskError(f"The disk is full: could not save the model to {out}.",
                                 hint="Free space and rerun with --resume; the checkpoints are intact.") from exc
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --- the loop ------------------------------------------------------------------------------------------------
def _validate(cfg: TrainConfig) -> None:
    def bad(msg, hint):
        raise InvalidArgumentError(msg, hint=hint)

    for name in ("block_size", "batch_size", "grad_accum", "max_steps", "eval_every", "save_every", "log_every"):
        if not isinstance(getattr(cfg, name), int) or getattr(cfg, name) < 1:
            bad(f"{name} must be a positive integer, got {getattr(cfg, name)!r}.", f"Fix --{name.replace('_', '-')}.")
    if cfg.lr <= 0 or not 0 <= cfg.min_lr_ratio <= 1:
        bad("lr must be > 0 and min_lr_ratio in [0, 1].", "Fix --lr / --min-lr-ratio.")
    if not 0 <= cfg.dropout < 1:
        bad(f"dropout must be in [0, 1), got {cfg.dropout}.", "Fix --dropout.")
    if not 0 <= cfg.alpha <= 1 or cfg.temperature <= 0:
        bad("alpha must be in [0, 1] and temperature > 0.", "Fix --alpha / --temperature.")
    if cfg.kl not in ("forward", "reverse"):
        bad(f"kl must be 'forward' or 'reverse', got {cfg.kl!r}.", "Fix --kl.")
    if cfg.amp not in ("auto", "bf16", "fp16", "none"):
        bad(f"amp must be auto, bf16, fp16 or none, got {cfg.amp!r}.", "Fix --amp.")
    if cfg.max_time_s is not None and cfg.max_time_s <= 0:
        bad("max_time_s must be positive.", "Fix --max-time-s.")


def prepare_data(cfg: TrainConfig, tok) -> tuple[np.ndarray, np.ndarray, float]:
    """(train blocks, held-out blocks, held-out bytes per token) for a config."""
    docs = read_documents(cfg.corpus, separator=cfg.separator, text_field=cfg.text_field, layout=cfg.layout,
                          straight_quotes=cfg.straight_quotes)
    if cfg.eval_text:
        text = read_eval_text(cfg.eval_text)
        stream = text_stream(text, tok)
        nbytes = len(text.encode("utf-8"))
        train_docs = docs
    else:
        train_docs, held = split_heldout(docs, fraction=cfg.eval_fraction, seed=cfg.seed)
        stream = np.concatenate([text_stream(d, tok) for d in held]) if held else np.zeros(0, np.int32)
        nbytes = sum(len(d.encode("utf-8")) for d in held)
    train_blocks = pack_documents(train_docs, tok, cfg.block_size, separator=cfg.doc_join, what="training corpus")
    bytes_per_token = nbytes / max(len(stream), 1)
    heldout = pack_stream(stream[: max(cfg.eval_max_tokens, cfg.block_size)], cfg.block_size, what="held-out text") \
        if len(stream) else np.zeros((0, cfg.block_size), np.int32)
    return train_blocks, heldout, bytes_per_token


def _claim_out_dir(cfg: TrainConfig) -> tuple[Path, bool]:
    """(the output folder, whether it holds checkpoints). An earlier run there is refused unless resumed, or
    removed (checkpoints and log) with ``overwrite``."""
    out = Path(cfg.out_dir).expanduser()
    ckpt_dir = out / CHECKPOINT_DIR
    has_ckpt = (ckpt_dir / "last.pt").is_file() or (ckpt_dir / "prev.pt").is_file()
    if has_ckpt and not cfg.resume:
        if not cfg.overwrite:
            raise TrainingError(f"{out} already holds a training run (checkpoints/).",
                                hint="Pass --resume to continue it, --overwrite to start over, or a new --out.")
        shutil.rmtree(ckpt_dir)
        (out / LOG_FILE).unlink(missing_ok=True)
    return out, has_ckpt


def _setup_device(cfg: TrainConfig):
    """(device, autocast dtype or None), with torch's thread count and TF32 set for the run."""
    import torch

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = resolve_device(cfg.device)
    amp_dtype = _amp_dtype(cfg.amp, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device, amp_dtype


def _seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _prepare_student(cfg: TrainConfig, tok, model):
    """The model to train: ``model`` or a fresh one from ``cfg.model_config``, checked against the tokenizer and
    block size."""
    if model is None:
        model = build_llama(resolve_model_config(cfg.model_config), tok.vocab_size, bos_id=tok.bos_id,
                            eos_id=tok.eos_id, pad_id=tok.pad_id, seed=cfg.seed)
    if model.config.vocab_size < tok.vocab_size:
        raise TrainingError(f"The model's vocab_size ({model.config.vocab_size}) is smaller than the tokenizer's "
                            f"({tok.vocab_size}).", hint="Use the tokenizer the model was made for.")
    if cfg.block_size > model.config.max_position_embeddings:
        raise TrainingError(f"block_size {cfg.block_size} exceeds the model's context "
                            f"({model.config.max_position_embeddings}).", hint="Lower --block-size.")
    return model


def _prepare_teacher(cfg: TrainConfig, model, teacher, device) -> list[int] | None:
    """Check the teacher against the student, freeze it on ``device``, and return the hidden-state layer map
    (``cfg.hidden_map``, else evenly spaced teacher layers when the hidden-state loss is on)."""
    if teacher is None:
        return cfg.hidden_map
    if teacher.config.vocab_size != model.config.vocab_size:
        raise TrainingError(f"Teacher vocab_size {teacher.config.vocab_size} != student's {model.config.vocab_size}.",
                            hint="The student must use the teacher's tokenizer and vocabulary size.")
    teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    hidden_map = cfg.hidden_map
    if cfg.hidden_weight > 0:
        if teacher.config.hidden_size != model.config.hidden_size:
            raise TrainingError("hidden_weight > 0 needs a student as wide as the teacher.",
                                hint="Set --hidden-weight 0 or use a student with the teacher's hidden_size.")
        if hidden_map is None:
            hidden_map = evenly_spaced_layers(teacher.config.num_hidden_layers, model.config.num_hidden_layers)
    return hidden_map


def _make_optimizer(cfg: TrainConfig, model, device):
    """AdamW with weight decay on matrices only (not on norms or biases); fused on CUDA."""
    import torch

    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim < 2]
    opt_kwargs = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **opt_kwargs)


def train(cfg: TrainConfig, *, model=None, teacher=None, callback: Callable[[int, dict], None] | None = None) -> TrainResult:
    """Train (or distil into) a Llama model as ``cfg`` says and save an HF folder at ``cfg.out_dir``.

    ``model``: a ready student (e.g. initialised from teacher layers); None builds one from
    ``cfg.model_config``. ``teacher``: a causal LM sharing the tokenizer, or None for plain training.
    ``callback(step, record)`` runs after every optimizer step (used by tests to simulate a crash).
    Returns a :class:`TrainResult`; raises TrainingError / InvalidArgumentError / OutOfDiskError.
    """
    _validate(cfg)
    out, has_ckpt = _claim_out_dir(cfg)
    device, amp_dtype = _setup_device(cfg)
    if not cfg.tokenizer:
        raise TrainingError("No tokenizer given.", hint="Pass --tokenizer DIR (a folder with tokenizer.json).")
    tok = load_tokenizer(Path(cfg.tokenizer))
    train_blocks, heldout, bytes_per_token = prepare_data(cfg, tok)
    sampler = BlockSampler(len(train_blocks), cfg.batch_size, seed=cfg.seed)

    # Seed everything before the model is built so a fresh run is reproducible.
    _seed_everything(cfg.seed)
    model = _prepare_student(cfg, tok, model)
    hidden_map = _prepare_teacher(cfg, model, teacher, device)
    model.config.attention_dropout = cfg.dropout
    add_residual_dropout(model, cfg.dropout)
    model.to(device)
    model.train()

    run = _Run(cfg, model, teacher, hidden_map, _make_optimizer(cfg, model, device), sampler, device, amp_dtype,
               heldout, bytes_per_token, out)
    if cfg.resume:
        run.restore(has_ckpt)
    return run.execute(train_blocks, tok.path, callback)


@dataclass
class _Run:
    """One training run: what the loop works on, how far it has got, and where it writes (log, checkpoints).

    Everything in a checkpoint is here, so :meth:`checkpoint` and :meth:`restore` are each other's inverse.
    """

    cfg: TrainConfig
    model: Any
    teacher: Any
    hidden_map: list[int] | None
    optimizer: Any
    sampler: Any                 # edgelm_export.corpus.BlockSampler
    device: Any
    amp_dtype: Any
    heldout: np.ndarray
    bytes_per_token: float
    out: Path
    step: int = 0
    tokens_seen: int = 0
    elapsed_before: float = 0.0  # seconds spent by the runs this one resumes
    last_eval: dict = field(default_factory=dict)
    t0: float = 0.0              # when this process's part of the run started
    fwd: Any = None              # the model as called in the loop (compiled or not)
    log: Any = None              # the open train_log.jsonl
    pending: list = field(default_factory=list)  # records for the log, written once it is open
    saved_step: int | None = None  # the step of the newest checkpoint on disk
    in_step: bool = False        # between drawing a step's batch and counting the step: no checkpoint then
    stop_asked: bool = False     # a Ctrl-C waits for the step in progress to finish

    @property
    def ckpt_dir(self) -> Path:
        return self.out / CHECKPOINT_DIR

    def restore(self, has_ckpt: bool) -> None:
        """Continue from the newest checkpoint: weights, optimizer, data position, counters and RNG states.

        Queues a "resume" record and drops the log's records of later steps (:func:`_trim_log`). A damaged
        ``last.pt`` (resumed from ``prev.pt``) and a folder with no checkpoint (started from step 0) are also
        said on stderr.
        """
        state, name, damaged = _read_checkpoint(self.ckpt_dir) if has_ckpt else (None, None, [])
        if state is not None:
            self._load(state)
            if damaged:
                self.say(f"{'; '.join(damaged)}: unreadable, so resuming from {name} (step {self.step}).")
        else:
            self.say(f"--resume: no checkpoint in {self.ckpt_dir}; starting from step 0.")
        record = {"event": "resume", "step": self.step, "checkpoint": name}
        if damaged:
            record["damaged"] = damaged
        self.pending.append({**record, **_trim_log(self.out / LOG_FILE, self.step)})

    def _load(self, state: dict) -> None:
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as exc:
            raise TrainingError(f"The checkpoint in {self.ckpt_dir} does not fit this model: {str(exc)[:200]}",
                                hint="Resume with the same model config, or start over with --overwrite.") from exc
        self.optimizer.load_state_dict(state["optimizer"])
        self.sampler.load_state_dict(state["sampler"])
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.elapsed_before, self.last_eval = state["elapsed_s"], state.get("eval", {})
        _set_rng_state(state["rng"], self.device)
        self.saved_step = self.step

    def checkpoint(self) -> None:
        save_checkpoint(self.ckpt_dir, {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "sampler": self.sampler.state_dict(), "step": self.step, "tokens_seen": self.tokens_seen,
            "elapsed_s": self.elapsed_before + (time.time() - self.t0), "eval": self.last_eval,
            "rng": _rng_state(self.device), "model_config": self.model.config.to_dict(),
            "train_config": dataclasses.asdict(self.cfg),
        })
        self.saved_step = self.step

    def say(self, msg: str, *, new_line: bool = False) -> None:
        """A line on stderr, progress bar or not: what the user must know about the run (resume, Ctrl-C).
        ``new_line`` starts it below whatever the terminal shows (a progress bar, "^C")."""
        try:
            print(f"{chr(10) if new_line else ''}{'distill' if self.teacher is not None else 'train'}: {msg}",
                  file=sys.stderr, flush=True)
        except (RuntimeError, OSError, ValueError):  # e.g. from the SIGINT handler while stderr is mid-write
            pass

    def write_log(self, record: dict) -> None:
        self.log.write(json.dumps(record) + "\n")
        self.log.flush()

    def run_eval(self) -> dict:
        if not len(self.heldout):
            return {}
        res = evaluate(self.fwd, self.heldout, bytes_per_token=self.bytes_per_token,
                       batch_size=max(1, self.cfg.batch_size), device=self.device, amp_dtype=self.amp_dtype,
                       teacher=self.teacher)
        self.write_log({"step": self.step, **res})
        return res

    def execute(self, train_blocks: np.ndarray, tok_dir: Path, callback) -> TrainResult:
        """Step to ``max_steps`` or the time budget, then evaluate, checkpoint and save the HF folder."""
        import torch

        cfg = self.cfg
        self.fwd = torch.compile(self.model) if cfg.compile else self.model
        params = count_params(self.model)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log = open(self.out / LOG_FILE, "a", encoding="utf-8")
        for record in self.pending:
            self.write_log(record)
        bar = self._progress_bar()
        self.t0 = time.time()
        if self.step == 0:
            self.write_log({"event": "start", "params": params, "device": str(self.device),
                            "amp": str(self.amp_dtype), "train_blocks": int(len(train_blocks)),
                            "block_size": cfg.block_size, "heldout_tokens": int(self.heldout.size),
                            "teacher": self.teacher is not None})
        already_done = self.step >= cfg.max_steps
        train_tensor = torch.from_numpy(train_blocks.astype(np.int64))
        if self.device.type == "cuda":
            train_tensor = train_tensor.to(self.device)
        try:
            with self._ctrl_c_between_steps():
                stopped = self._loop(train_tensor, bar, callback)
        except KeyboardInterrupt:
            self._save_on_interrupt()
            self.log.close()
            if bar is not None:
                bar.close()
            raise
        if bar is not None:
            bar.close()
        run_time = time.time() - self.t0
        if not already_done:
            self.last_eval = self.run_eval() or self.last_eval
        self.checkpoint()
        return self._finish(params, "already-done" if already_done else stopped, run_time, tok_dir)

    @contextmanager
    def _ctrl_c_between_steps(self):
        """While the loop runs, the first Ctrl-C sets ``stop_asked``, which the loop turns into a
        KeyboardInterrupt at the next step boundary; a second one raises at once (nobody waits on a slow step).

        Installed only from the main thread over Python's default handler (a caller's own handler, or
        SIG_IGN, is left alone) and restored afterwards. A Ctrl-C during the last step stops the run before
        its final eval: the checkpoint then holds every step and ``--resume`` finishes it.
        """
        if (threading.current_thread() is not threading.main_thread()
                or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
            yield
            return

        def on_sigint(signum, frame):
            if self.stop_asked:
                raise KeyboardInterrupt
            self.stop_asked = True
            self.say("Ctrl-C: stopping after the step in progress, then saving a checkpoint "
                     "(press Ctrl-C again to stop at once, without one).", new_line=True)

        previous = signal.signal(signal.SIGINT, on_sigint)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)
        if self.stop_asked:
            raise KeyboardInterrupt

    def _save_on_interrupt(self) -> None:
        """On KeyboardInterrupt: checkpoint the state after the last whole step, unless the interrupt landed
        inside one (a second Ctrl-C, or one raised elsewhere), whose half-done state must not be saved."""
        saved = not self.in_step and self.step > 0
        if saved:
            self.checkpoint()
            self.say(f"interrupted: checkpoint saved at step {self.step}; --resume continues from it.")
        else:
            since = f"step {self.saved_step}'s checkpoint" if self.saved_step else "step 0 (no checkpoint yet)"
            self.say(f"interrupted {'inside a step' if self.in_step else 'before the first step'}: no checkpoint "
                     f"written; --resume continues from {since}.")
        self.write_log({"event": "interrupt", "step": self.step, "saved": saved})

    def _progress_bar(self):
        if not self.cfg.progress:
            return None
        from tqdm.auto import tqdm
        return tqdm(total=self.cfg.max_steps, initial=self.step, desc="distill" if self.teacher is not None else "train",
                    unit="step", dynamic_ncols=True, file=sys.stderr)

    def _loop(self, train_tensor, bar, callback) -> str:
        """Optimizer steps with logging, evals and checkpoints -> why it stopped ("max_steps" or "time")."""
        cfg = self.cfg
        t_window, tok_window = time.time(), 0
        while self.step < cfg.max_steps:
            if self.stop_asked:  # a Ctrl-C came during the last step: stop here, where a checkpoint is exact
                raise KeyboardInterrupt
            elapsed = self.elapsed_before + (time.time() - self.t0)
            if cfg.max_time_s is not None and elapsed >= cfg.max_time_s:
                return "time"
            progress = self.step / cfg.max_steps
            if cfg.max_time_s is not None:
                progress = max(progress, elapsed / cfg.max_time_s)
            lr = lr_at(cfg, self.step, progress)
            n_tok = cfg.grad_accum * cfg.batch_size * cfg.block_size
            self.in_step = True
            parts, grad_norm = self._optimizer_step(train_tensor, lr)
            self.step += 1
            self.tokens_seen += n_tok
            self.in_step = False
            tok_window += n_tok
            record = {"step": self.step, "lr": lr, **parts, "grad_norm": grad_norm, "tokens": self.tokens_seen,
                      "epoch": round(self.sampler.epochs_done, 4)}
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                now = time.time()
                record["tokens_per_s"] = tok_window / max(now - t_window, 1e-9)
                record["elapsed_s"] = self.elapsed_before + now - self.t0
                t_window, tok_window = now, 0
                self.write_log(record)
                if bar is not None:
                    bar.set_postfix(self._postfix(parts, record), refresh=False)
            if self.step % cfg.eval_every == 0 and self.step < cfg.max_steps:
                self.last_eval = self.run_eval()
            if self.step % cfg.save_every == 0 and self.step < cfg.max_steps:
                self.checkpoint()
            if bar is not None:
                bar.update(1)
            if callback is not None:
                callback(self.step, record)
        return "max_steps"

    def _optimizer_step(self, train_tensor, lr: float) -> tuple[dict[str, float], float]:
        """One AdamW step at ``lr`` over ``grad_accum`` micro-batches -> (mean loss terms, gradient norm)."""
        import torch

        cfg = self.cfg
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        parts: dict[str, float] = {}
        for _ in range(cfg.grad_accum):
            idx = torch.from_numpy(self.sampler.next_batch().astype(np.int64))
            x = train_tensor[idx.to(train_tensor.device)].to(self.device, non_blocking=True)
            loss, ce = self._loss(x, parts)
            (loss / cfg.grad_accum).backward()
            parts["loss"] = parts.get("loss", 0.0) + loss.item() / cfg.grad_accum
            parts["ce"] = parts.get("ce", 0.0) + ce.item() / cfg.grad_accum
        if not math.isfinite(parts["loss"]):
            raise TrainingError(f"The loss became {parts['loss']} at step {self.step}.",
                                hint="Lower --lr, raise --warmup-steps, or check the data; resume from the last checkpoint.")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip).item() \
            if cfg.grad_clip > 0 else float("nan")
        self.optimizer.step()
        return parts, grad_norm

    def _loss(self, x, parts: dict[str, float]):
        """(loss, cross-entropy) of one micro-batch. With a teacher the loss is the distillation mix, and its
        KD (and hidden-state) terms are added to ``parts``, averaged over the micro-batches."""
        import torch
        import torch.nn.functional as F

        cfg, teacher = self.cfg, self.teacher
        need_hidden = teacher is not None and cfg.hidden_weight > 0
        with _autocast(self.device, self.amp_dtype):
            out_s = self.fwd(input_ids=x, output_hidden_states=need_hidden)
            logits = out_s.logits[:, :-1]
            ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
            loss = ce
            if teacher is not None:
                with torch.no_grad():
                    out_t = teacher(input_ids=x, output_hidden_states=need_hidden)
                kd = kd_loss(logits, out_t.logits[:, :-1], cfg.temperature, cfg.kl)
                loss = cfg.alpha * kd + (1 - cfg.alpha) * ce
                parts["kd"] = parts.get("kd", 0.0) + kd.item() / cfg.grad_accum
                if need_hidden:
                    hl = hidden_cosine_loss(out_s.hidden_states, out_t.hidden_states, self.hidden_map)
                    loss = loss + cfg.hidden_weight * hl
                    parts["hidden"] = parts.get("hidden", 0.0) + hl.item() / cfg.grad_accum
        return loss, ce

    def _postfix(self, parts: dict[str, float], record: dict) -> dict[str, str]:
        post = {"loss": f"{parts['loss']:.3f}", "tok/s": f"{record['tokens_per_s']:,.0f}"}
        if self.last_eval:
            post["eval_ppl"] = f"{self.last_eval['eval_ppl']:.2f}"
        if self.cfg.max_time_s is not None:
            post["left"] = f"{max(0, self.cfg.max_time_s - record['elapsed_s']):.0f}s"
        return post

    def _finish(self, params: int, stopped: str, run_time: float, tok_dir: Path) -> TrainResult:
        """Save the HF folder with training.json, close the log, and return the result."""
        cfg = self.cfg
        wall = self.elapsed_before + run_time
        tps = (self.tokens_seen / wall) if wall > 0 else 0.0
        result = TrainResult(self.out, self.step, self.tokens_seen, wall, params, stopped, self.last_eval, tps)
        summary = {"steps": self.step, "tokens": self.tokens_seen, "wall_time_s": round(wall, 2), "params": params,
                   "stopped": stopped, "eval": self.last_eval, "tokens_per_s": round(tps, 1),
                   "device": str(self.device), "teacher": self.teacher is not None,
                   "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "extra"}, "extra": cfg.extra}
        save_hf_folder(self.model, tok_dir, self.out,
                       extra_files={RESULT_FILE: json.dumps(summary, indent=2, default=str) + "\n"})
        self.write_log({"event": "end", "step": self.step, "stopped": stopped, "wall_time_s": wall})
        self.log.close()
        return result


# --- options: a TrainConfig as flat keys (recipe tables, command-line flags) ------------------------
def config_defaults(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """TrainConfig's defaults as a dict keyed like the CLI options (plus recipe-only keys)."""
    d = {f.name: (f.default if f.default is not dataclasses.MISSING else None)
         for f in dataclasses.fields(TrainConfig) if f.name not in ("extra", "progress", "hidden_map")}
    d.update({"out": None, "corpus": None, "no_progress": None, "preset": None, "config": None})
    d.pop("out_dir")
    d.update(extra or {})
    return d


def config_from_options(opts: dict[str, Any], **overrides: Any) -> TrainConfig:
    """Build a TrainConfig from resolved CLI/recipe options (keys as in :func:`config_defaults`)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    kw = {k: v for k, v in opts.items() if k in names and v is not None}
    kw["out_dir"] = opts.get("out")
    kw["progress"] = not opts.get("no_progress")
    if opts.get("config"):
        kw["model_config"] = opts["config"]
    elif opts.get("preset"):
        kw["model_config"] = opts["preset"]
    if isinstance(kw.get("corpus"), str):
        kw["corpus"] = [kw["corpus"]]
    kw.update(overrides)
    return TrainConfig(**kw)
