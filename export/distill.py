"""``edgelm distill``: make a smaller student from a teacher causal LM.

Two kinds of distillation live here:

* **Logit distillation** (:func:`distill`): the student trains on the corpus with
  ``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE`` (reverse KL as an option, plus an optional
  hidden-state cosine term when the widths match), through the same loop as ``edgelm train``. The student
  shares the teacher's tokenizer. It starts either from K evenly spaced teacher layers plus the teacher's
  embeddings, final norm and head (DistilBERT / DistilGPT2 style), or from a random init of a smaller config.
* **Sequence-level distillation** (:func:`sample_corpus`): sample text from the teacher (batched, KV cache,
  temperature / top-p, on the GPU when present) and write it as a corpus file, to be trained on like any
  other text. A small model trained on much more text than we have (e.g. stories260K) makes a useful
  generator of extra in-domain training text.
"""
from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgelm.errors import TrainingError
from edgelm_export.corpus import load_tokenizer, normalize_layout
from edgelm_export.train import (build_llama, config_defaults, evenly_spaced_layers, resolve_device,
                                 resolve_model_config, train)


def load_causal_lm(src: str | os.PathLike):
    """A causal LM from a local HF folder (or a hub id where the network allows), fp32, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    p = Path(src).expanduser()
    if not p.is_dir() and os.path.sep in str(src):
        raise TrainingError(f"Teacher folder {p} does not exist.", hint="Pass a Hugging Face model folder or hub id.")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(p if p.is_dir() else src), dtype=torch.float32)
    except OSError as exc:
        raise TrainingError(f"Cannot load the teacher {src!r}: {exc}".split("\n")[0],
                            hint="Without network access, pass a local Hugging Face model folder.") from exc
    return model.eval()


def student_from_teacher_layers(teacher, k: int, *, layers: list[int] | None = None):
    """A student with the teacher's config but K layers, copied from evenly spaced teacher layers.

    Embeddings, final norm and LM head are copied too. Works for decoder models whose layers live at
    ``model.model.layers`` (Llama, Mistral, Qwen2, ...).
    """
    import torch

    n = teacher.config.num_hidden_layers
    picked = layers if layers is not None else evenly_spaced_layers(n, k)
    if len(picked) != k or any(not 0 <= i < n for i in picked):
        raise TrainingError(f"Bad layer choice {picked} for a {n}-layer teacher.", hint="Pick K indices in range.")
    cfg = copy.deepcopy(teacher.config)
    cfg.num_hidden_layers = k
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = [cfg.layer_types[i] for i in picked]
    student = type(teacher)(cfg)
    t_layers = teacher.model.layers
    with torch.no_grad():
        student.model.embed_tokens.load_state_dict(teacher.model.embed_tokens.state_dict())
        student.model.norm.load_state_dict(teacher.model.norm.state_dict())
        if not cfg.tie_word_embeddings:
            student.lm_head.load_state_dict(teacher.lm_head.state_dict())
        for dst, src in zip(student.model.layers, picked):
            dst.load_state_dict(t_layers[src].state_dict())
    student.config.edgelm_init_layers = picked  # recorded in config.json: where the weights came from
    return student


def check_same_tokenizer(teacher_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike | None) -> None:
    """Raise TrainingError unless ``tokenizer_dir`` (if given) encodes exactly like the teacher's tokenizer."""
    t_tok = load_tokenizer(teacher_dir)
    if tokenizer_dir is None or Path(tokenizer_dir).resolve() == Path(teacher_dir).resolve():
        return
    s_tok = load_tokenizer(tokenizer_dir)
    if t_tok.tokenizer.get_vocab() != s_tok.tokenizer.get_vocab():
        raise TrainingError(f"The tokenizer in {tokenizer_dir} differs from the teacher's ({teacher_dir}).",
                            hint="Distillation matches next-token distributions, so the student must use the "
                                 "teacher's tokenizer: drop --tokenizer (it defaults to the teacher's).")
    probe = "Once upon a time, a little dog said: \"Hello!\"\n\nThe end. 123"
    if t_tok.encode(probe) != s_tok.encode(probe):
        raise TrainingError(f"The tokenizer in {tokenizer_dir} encodes text differently from the teacher's.",
                            hint="Use the teacher's tokenizer (drop --tokenizer).")


def build_student(teacher, *, student_layers: int | None = None, student_config: Any = None,
                  init: str | None = None, seed: int = 0):
    """The student model: layer init (K layers or a config the teacher's shape allows) or random init."""
    import torch

    if (student_layers is None) == (student_config is None):
        raise TrainingError("Give exactly one of student_layers (layer init) or student_config.",
                            hint="e.g. --student-layers 4, or --student-config student.json")
    if student_layers is not None:
        torch.manual_seed(seed)
        return student_from_teacher_layers(teacher, int(student_layers))
    scfg = resolve_model_config(student_config)
    tcfg = teacher.config
    if "vocab_size" in scfg and scfg["vocab_size"] != tcfg.vocab_size:
        raise TrainingError(f"Student vocab_size {scfg['vocab_size']} != teacher's {tcfg.vocab_size}.",
                            hint="Drop vocab_size from the student config; it must be the teacher's.")
    if (init or "random") == "layers":
        # Layer init from a config: only the depth may differ from the teacher.
        for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads"):
            if key in scfg and scfg[key] != getattr(tcfg, key, None):
                raise TrainingError(f"Layer init needs the student's {key} ({scfg[key]}) to equal the teacher's "
                                    f"({getattr(tcfg, key, None)}).",
                                    hint="Use init = random for a differently shaped student, or drop the key.")
        k = int(scfg.get("num_hidden_layers", tcfg.num_hidden_layers))
        if k > tcfg.num_hidden_layers:
            raise TrainingError(f"The student config asks for {k} layers, more than the teacher's {tcfg.num_hidden_layers}, "
                                "with layer init.", hint="Use fewer layers, or init = random.")
        torch.manual_seed(seed)
        return student_from_teacher_layers(teacher, k)
    scfg.setdefault("max_position_embeddings", tcfg.max_position_embeddings)
    scfg.setdefault("tie_word_embeddings", bool(getattr(tcfg, "tie_word_embeddings", True)))
    eos = tcfg.eos_token_id[0] if isinstance(tcfg.eos_token_id, list) else tcfg.eos_token_id
    return build_llama(scfg, tcfg.vocab_size, bos_id=tcfg.bos_token_id, eos_id=eos,
                       pad_id=getattr(tcfg, "pad_token_id", None), seed=seed)


def distill(cfg, teacher: str | os.PathLike, *, student_layers: int | None = None, student_config: Any = None,
            init: str | None = None, callback=None):
    """Distil ``teacher`` (a HF folder) into a student and train it with ``cfg`` (a TrainConfig).

    ``cfg.tokenizer`` defaults to the teacher's folder and must match it. Returns a TrainResult.
    """
    tdir = Path(teacher).expanduser()
    if not tdir.is_dir():
        raise TrainingError(f"The teacher {tdir} " + ("is a file, not a model folder." if tdir.exists() else
                                                      "does not exist."),
                            hint="Pass --teacher the Hugging Face folder of the model to distil (config.json, "
                                 "weights, tokenizer.json).")
    if not (tdir / "tokenizer.json").is_file():
        raise TrainingError(f"The teacher {tdir} has no tokenizer.json.",
                            hint="Distillation needs the teacher's tokenizer; use a complete HF model folder.")
    check_same_tokenizer(tdir, cfg.tokenizer)
    cfg.tokenizer = str(cfg.tokenizer or tdir)
    t_model = load_causal_lm(tdir)
    student = build_student(t_model, student_layers=student_layers, student_config=student_config, init=init,
                            seed=cfg.seed)
    if student.config.vocab_size != t_model.config.vocab_size:
        raise TrainingError("Student and teacher vocabulary sizes differ.", hint="Use the teacher's vocabulary.")
    init_layers = getattr(student.config, "edgelm_init_layers", None)
    cfg.extra = {**cfg.extra, "teacher": str(tdir), "student_init": init_layers or "random"}
    # Record what the student actually is (cfg.model_config is unused when the student is passed in).
    cfg.model_config = student_config if student_config is not None and init_layers is None else \
        f"teacher layers {init_layers}"
    return train(cfg, model=student, teacher=t_model, callback=callback)


# --- sequence-level distillation --------------------------------------------------------------------------
@dataclass(frozen=True)
class SampleResult:
    out_path: Path
    documents: int
    tokens: int
    bytes: int
    wall_time_s: float
    tokens_per_s: float


def _trim_unfinished(text: str) -> str:
    """Cut a sample that hit the length limit back to its last sentence end (no half sentences in the corpus)."""
    cut = max(text.rfind(c) for c in ".!?\"")
    return text[: cut + 1] if cut > len(text) // 3 else ""


def _sample_batch(model, x, *, max_new_tokens: int, temperature: float, top_p: float, top_k: int,
                  stops: list[int]):
    """New tokens ``[batch, <= max_new_tokens]`` sampled after prompt ``x`` (all rows the same length).

    A lean decode loop with the model's KV cache: every row advances in lockstep, so no padding or
    position bookkeeping is needed; rows that hit a stop token keep going until all have (or the limit),
    and the caller cuts each at its first stop. ``done.all()`` is checked every 16 steps to avoid a
    device sync per token.
    """
    import inspect

    import torch

    # transformers renamed the cache argument (past_key_values -> cache) in 5.2x; support both.
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def cache_of(o):
        c = o.get("cache")
        return c if c is not None else o.get("past_key_values")

    out = model(input_ids=x, use_cache=True)
    past, logits = cache_of(out), out.logits[:, -1]
    stop_t = torch.tensor(stops or [-1], device=x.device)
    done = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    tokens = []
    for step in range(max_new_tokens):
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        if top_k:
            kth = torch.topk(probs, min(top_k, probs.shape[-1]), dim=-1).values[:, -1:]
            probs = torch.where(probs < kth, torch.zeros_like(probs), probs)
        if top_p < 1.0:
            sorted_p, order = torch.sort(probs, dim=-1, descending=True)
            # drop tokens once the mass before them already reaches top_p (the top token always stays)
            drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        nxt = torch.multinomial(probs, 1)
        tokens.append(nxt)
        done |= torch.isin(nxt[:, 0], stop_t)
        if step % 16 == 15 and bool(done.all()):
            break
        out = model(input_ids=nxt, use_cache=True, **{cache_arg: past})
        past, logits = cache_of(out), out.logits[:, -1]
    return torch.cat(tokens, dim=1)


def _sample_prompt(tok, prompt: str | None) -> list[int]:
    """The ids every sample starts from: BOS (plus ``prompt``), or EOS when the tokenizer has no BOS."""
    head = ([tok.bos_id] if tok.bos_id is not None else []) + (tok.encode(prompt) if prompt else [])
    return head or [tok.eos_id]


def _sample_text(row: list[int], tok, *, stops: list[int], prompt: str | None, layout: str) -> tuple[str, int]:
    """One sampled row -> (its document text, "" when nothing usable is left; the tokens it kept).

    The row is cut at its first stop token; a row that never stopped is trimmed to its last sentence end.
    """
    finished = False
    for j, t in enumerate(row):
        if t in stops:
            row, finished = row[:j], True
            break
    text = tok.tokenizer.decode(row, skip_special_tokens=True)
    if prompt:
        text = prompt + text
    if not finished:
        text = _trim_unfinished(text)
    return normalize_layout(text.strip("\n"), layout), len(row)


def sample_corpus(teacher: str | os.PathLike, out_path: str | os.PathLike, *, num_tokens: int,
                  batch_size: int | None = None, max_new_tokens: int | None = None, temperature: float = 1.0,
                  top_p: float = 0.95, top_k: int = 0, layout: str = "blank-line-paragraphs", seed: int = 0,
                  device: str = "auto", max_time_s: float | None = None, prompt: str | None = None,
                  separator: str = "<|endoftext|>", progress: bool = True) -> SampleResult:
    """Sample ``num_tokens`` teacher tokens of text (whole stories) and write them as a corpus file.

    ``tokens`` counts, for each story written, the tokens sampled up to its end token (an unfinished story
    trimmed to its last sentence still counts all it sampled; a story with nothing left is neither written
    nor counted). Writing stops with the story that brings the count to ``num_tokens``, so the file holds
    from ``num_tokens`` to ``num_tokens + max_new_tokens - 1`` of them (fewer only when ``max_time_s`` stops
    it first); the rest of the last batch is dropped.

    Each sample starts from BOS (plus ``prompt`` if given) and runs until EOS/BOS or ``max_new_tokens``
    (default: the teacher's context minus the prompt). Samples are normalised to ``layout`` and written one
    per document, separated by ``separator`` lines, so :func:`edgelm_export.corpus.read_documents` reads them
    back as documents. The file is written to ``out_path + '.tmp'`` and renamed when done; ``max_time_s``
    stops early and keeps what was sampled. Batched generation with a KV cache; CUDA when available.
    """
    import torch

    if num_tokens < 1 or temperature <= 0 or not 0 < top_p <= 1:
        raise TrainingError("num_tokens must be >= 1, temperature > 0 and top_p in (0, 1].",
                            hint="Fix the sampling settings.")
    tdir = Path(teacher).expanduser()
    tok = load_tokenizer(tdir)
    dev = resolve_device(device)
    model = load_causal_lm(tdir).to(dev)
    if batch_size is None:
        batch_size = 1024 if dev.type == "cuda" else 16
    ctx = int(model.config.max_position_embeddings)
    head = _sample_prompt(tok, prompt)
    max_new_tokens = min(ctx - len(head) if max_new_tokens is None else max_new_tokens, ctx - len(head))
    stops = [i for i in (tok.eos_id, tok.bos_id) if i is not None]
    out = Path(out_path).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.manual_seed(seed)
    if dev.type == "cuda":
        torch.cuda.manual_seed_all(seed)
    t0 = time.time()
    n_tok = n_docs = n_bytes = 0
    bar = None
    if progress:
        import sys

        from tqdm.auto import tqdm
        bar = tqdm(total=num_tokens, desc="sampling", unit="tok", unit_scale=True, dynamic_ncols=True, file=sys.stderr)
    with open(tmp, "w", encoding="utf-8") as f, torch.inference_mode():
        while n_tok < num_tokens:
            if max_time_s is not None and time.time() - t0 >= max_time_s:
                break
            x = torch.tensor([head] * batch_size, device=dev)
            new = _sample_batch(model, x, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                top_k=top_k, stops=stops).tolist()
            before = n_tok
            for row in new:
                if n_tok >= num_tokens:   # the rest of the batch is dropped: the count stops at the ask
                    break
                text, kept = _sample_text(row, tok, stops=stops, prompt=prompt, layout=layout)
                if not text.strip():
                    continue
                f.write(text.rstrip("\n") + "\n" + separator + "\n")
                n_tok += kept
                n_docs += 1
                n_bytes += len(text.encode("utf-8"))
            if bar is not None:
                bar.update(n_tok - before)
    if bar is not None:
        bar.close()
    if n_docs == 0:
        tmp.unlink(missing_ok=True)
        raise TrainingError("The teacher produced no usable text.", hint="Check the teacher, or raise max_time_s.")
    os.replace(tmp, out)
    wall = time.time() - t0
    return SampleResult(out, n_docs, n_tok, n_bytes, wall, n_tok / max(wall, 1e-9))


# --- options: the [student] recipe table / `edgelm distill` flags ------------------------------------------
def distill_defaults() -> dict[str, Any]:
    """:func:`edgelm_export.train.config_defaults` plus the distillation-only keys."""
    return config_defaults({"teacher": None, "student_layers": None, "student_config": None, "init": None,
                            "sample_tokens": None, "samples_out": None, "sample_batch_size": None,
                            "sample_temperature": 1.0, "sample_top_p": 0.95})
