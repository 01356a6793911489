"""The quality gate: fp32 vs quantized perplexity, bits per byte and greedy agreement, measured with the runtime.

Measured with ``edgelm.load(folder, verify=False)`` -- the same code users run -- so the numbers in the manifest
are the numbers users get. Definitions (docs/export.md):

* perplexity / bits per byte: ``Model.score(text)`` (sliding window = context, stride = context // 2);
  bits per byte = total negative log-likelihood in bits / UTF-8 bytes of the text.
* ppl_increase = quantized perplexity / fp32 perplexity - 1; the gate refuses ppl_increase > max_ppl_increase.
* greedy agreement: for each of ``AGREEMENT_PROMPTS`` prompts (the first words of lines spread through the
  eval text), both models continue greedily for ``AGREEMENT_TOKENS`` tokens (EOS ignored).
  ``greedy_token_agreement`` = the fraction of positions where the two continuations hold the same token;
  ``greedy_prefix_agreement`` = the mean fraction of tokens before the first divergence.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgelm.errors import ExportError, QualityGateError

AGREEMENT_PROMPTS = 4
AGREEMENT_TOKENS = 32
PROMPT_WORDS = 6


@dataclass
class TextScore:
    perplexity: float
    bits_per_byte: float
    nats_per_token: float
    num_tokens: int
    num_bytes: int


def _load(folder: Path, threads: int | None) -> Any:
    try:
        import edgelm
        return edgelm.load(str(folder), verify=False, threads=threads)
    except (ImportError, AttributeError) as exc:  # the runtime is part of the same package; this is a broken install
        raise ExportError(f"The edgelm runtime could not be loaded to evaluate the export ({exc}).",
                          hint="Reinstall edgelm (pip install -e .).") from exc


def score_text(lm: Any, text: str) -> TextScore:
    s = lm.score(text)
    return TextScore(float(s.perplexity), float(s.bits_per_byte), float(s.nats_per_token), int(s.num_tokens),
                     int(s.num_bytes))


def agreement_prompts(text: str, n: int = AGREEMENT_PROMPTS, words: int = PROMPT_WORDS) -> list[str]:
    """The first ``words`` words of ``n`` non-empty lines spread evenly through ``text``."""
    lines = [ln.strip() for ln in text.splitlines() if len(ln.split()) >= words]
    if not lines:
        return [" ".join(text.split()[:words]) or "Once upon a time"]
    step = max(1, len(lines) // n)
    return [" ".join(lines[i].split()[:words]) for i in range(0, len(lines), step)][:n]


def greedy(lm: Any, prompt_ids: list[int], n: int) -> list[int]:
    return list(lm.generate(list(prompt_ids), max_new_tokens=n, temperature=0, ignore_eos=True).token_ids)


def agreement(a: list[list[int]], b: list[list[int]]) -> tuple[float, float]:
    """(token agreement, prefix agreement) between two lists of continuations, as defined above."""
    same = total = 0
    prefix = []
    for x, y in zip(a, b):
        n = max(len(x), len(y), 1)
        same += sum(1 for p, q in zip(x, y) if p == q)
        total += n
        k = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
        prefix.append(k / n)
    return same / max(total, 1), sum(prefix) / max(len(prefix), 1)


CHAT_PROMPTS = Path(__file__).resolve().parent / "data" / "chat-prompts.txt"
CHAT_TOKENS = 64


def chat_prompts(path: Path = CHAT_PROMPTS) -> list[str]:
    """The built-in varied chat prompts (facts, instructions, arithmetic, rewriting, extraction, code), one a line."""
    return [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]


def chat_agreement(ref: Any, cand: Any, prompts: list[str], max_tokens: int = CHAT_TOKENS
                   ) -> tuple[float, list[dict[str, Any]]]:
    """How far greedy chat answers of ``cand`` follow ``ref``'s: per prompt, the share of ``ref``'s answer (up to
    its EOS or ``max_tokens``) before the first token where they differ; returns (mean share, per-prompt rows with
    both answers). 1.0 means every answer is identical.

    Each row also counts ``steps_agreeing`` of ``steps``: ``cand`` fed ``ref``'s answer one decode step at a time
    (teacher forcing), the steps where its own greedy choice is ``ref``'s token. One early near-tie ends the prefix
    share for the rest of an answer; this counts every decision once (see :func:`chat_step_agreement`)."""
    import numpy as np

    rows = []
    for p in prompts:
        msgs = [{"role": "user", "content": p}]
        a = ref.chat(msgs, max_new_tokens=max_tokens, temperature=0)
        b = cand.chat(msgs, max_new_tokens=max_tokens, temperature=0)
        x, y = list(a.token_ids), list(b.token_ids)
        k = next((i for i, (s, t) in enumerate(zip(x, y)) if s != t), min(len(x), len(y)))
        share = 1.0 if x == y else k / max(len(x), 1)
        prompt_ids = cand._prompt_ids(cand.apply_chat_template(msgs))
        agreeing = sum(int(int(np.argmax(row)) == tok) for row, tok in zip(cand._forced_logits(prompt_ids, x), x))
        rows.append({"prompt": p, "share": share, "steps": len(x), "steps_agreeing": agreeing,
                     "reference": a.text, "candidate": b.text})
    return sum(r["share"] for r in rows) / max(len(rows), 1), rows


def chat_step_agreement(rows: list[dict[str, Any]]) -> float:
    """Over :func:`chat_agreement`'s rows: the share of teacher-forced decode steps where the candidate's greedy
    choice was the reference's token."""
    return sum(r["steps_agreeing"] for r in rows) / max(sum(r["steps"] for r in rows), 1)


CALIBRATION_TEXT = Path(__file__).resolve().parent / "data" / "eval-sample.txt"


def calibration_ids(folder: Path, threads: int | None = None, n: int | None = None) -> list[int]:
    """Tokens the int8 calibration runs through the fp32 graph: two chat turns rendered with the model's own chat
    template (its special tokens and role markers are where real models put their activation outliers), then
    plain text starting as a raw text would (BOS as the model adds it). ``n`` defaults to CALIBRATION_TOKENS, and
    never exceeds the model's context."""
    from .quantize import CALIBRATION_TOKENS

    lm = _load(folder, threads)
    prompts = chat_prompts()
    ids: list[int] = []
    if not lm.chat_template.is_fallback:
        msgs = [{"role": "user", "content": prompts[1]}, {"role": "assistant", "content": "1. Keep a fixed bedtime."},
                {"role": "user", "content": prompts[13]}]
        ids += lm.tokenizer.encode(lm.apply_chat_template(msgs), add_bos=False)
    ids += lm.tokenizer.encode(CALIBRATION_TEXT.read_text(encoding="utf-8"), add_bos=True)
    return ids[: min(n or CALIBRATION_TOKENS, lm.context_length)]  # a prefill longer than the context fails


_FP32_PPL: dict[tuple[str, str], float] = {}


def ppl_increase(fp32_dir: Path, quant_dir: Path, eval_path: Path, threads: int | None = None) -> float:
    """Relative perplexity increase of ``quant_dir`` over ``fp32_dir`` on ``eval_path`` (fp32 scored once)."""
    text = eval_path.read_text(encoding="utf-8")
    key = (str(fp32_dir), str(eval_path))
    if key not in _FP32_PPL:
        _FP32_PPL[key] = score_text(_load(fp32_dir, threads), text).perplexity
    return score_text(_load(quant_dir, threads), text).perplexity / _FP32_PPL[key] - 1.0


def teacher_forced_agreement(cand: Any, prompts: list[list[int]], continuations: list[list[int]]) -> float:
    """Fraction of positions where ``cand``'s greedy next token equals the reference continuation's token, with
    ``cand`` always fed the reference prefix (so one early near-tie does not decide the rest, unlike greedy
    agreement). Costs one prefill per token: meant for small models and tests."""
    same = total = 0
    for ids, cont in zip(prompts, continuations):
        for i, tok in enumerate(cont):
            nxt = greedy(cand, list(ids) + list(cont[:i]), 1)
            same += int(nxt[:1] == [tok])
            total += 1
    return same / max(total, 1)


def quality_gate(fp32_dir: Path, quant_dir: Path | None, eval_path: Path, *, max_ppl_increase: float, force: bool,
                 threads: int | None = None, progress: bool = False) -> dict[str, Any]:
    """Measure the fp32 (and quantized) folders; raise QualityGateError when the quantized one is too much worse."""
    from tqdm.auto import tqdm

    text = eval_path.read_text(encoding="utf-8")
    prompts = agreement_prompts(text)
    jobs = 1 + (2 if quant_dir is not None else 0)
    bar = tqdm(total=jobs, desc="evaluate", unit="step", disable=not progress)
    metrics: dict[str, Any] = {"eval_text": eval_path.name, "eval_bytes": len(text.encode("utf-8"))}

    fp32 = _load(fp32_dir, threads)
    s = score_text(fp32, text)
    metrics.update(fp32_perplexity=s.perplexity, fp32_bits_per_byte=s.bits_per_byte, eval_tokens=s.num_tokens)
    bar.update(1)
    if quant_dir is None:
        bar.close()
        return metrics
    q = _load(quant_dir, threads)
    qs = score_text(q, text)
    bar.update(1)
    prompt_ids = [fp32.tokenizer.encode(p, add_bos=True) for p in prompts]
    ref = [greedy(fp32, ids, AGREEMENT_TOKENS) for ids in prompt_ids]
    got = [greedy(q, ids, AGREEMENT_TOKENS) for ids in prompt_ids]
    tok_agree, prefix_agree = agreement(ref, got)
    if not fp32.chat_template.is_fallback:  # a chat model: how far its greedy answers follow fp32's
        share, rows = chat_agreement(fp32, q, chat_prompts())
        metrics.update(chat_prefix_agreement=share, chat_step_agreement=chat_step_agreement(rows),
                       chat_prompts=len(rows), chat_tokens=CHAT_TOKENS)
    bar.update(1)
    bar.close()
    increase = qs.perplexity / s.perplexity - 1.0
    metrics.update(quantized_perplexity=qs.perplexity, quantized_bits_per_byte=qs.bits_per_byte,
                   ppl_increase=increase, bpb_increase=qs.bits_per_byte - s.bits_per_byte,
                   max_ppl_increase=max_ppl_increase, greedy_token_agreement=tok_agree,
                   greedy_prefix_agreement=prefix_agree, agreement_prompts=len(prompts),
                   agreement_tokens=AGREEMENT_TOKENS, forced=bool(force and increase > max_ppl_increase))
    if increase > max_ppl_increase and not force:
        raise QualityGateError(
            f"The quantized model's perplexity is {qs.perplexity:.4f} vs {s.perplexity:.4f} in fp32 on {eval_path.name} "
            f"(+{100 * increase:.2f} %), more than the allowed {100 * max_ppl_increase:.2f} %; nothing was written.",
            hint="Try --quantize int8-block (the most accurate 8-bit mode) or --quantize auto, raise "
                 "--max-ppl-increase, or pass --force to write it anyway.")
    return metrics


def as_dict(score: TextScore) -> dict[str, Any]:
    return asdict(score)
