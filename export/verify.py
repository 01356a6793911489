"""Check the fp32 ONNX graph against the PyTorch model it was built from.

Three checks, all compared with one full (cache-free) PyTorch forward over the same tokens, so no Hugging Face
cache class is involved:
  * prefill of a prompt, then several cached decode steps (each feeding the ONNX argmax back);
  * a second prompt of another length (catches shape-dependent bugs);
  * a left-padded batch of two (checks the padding mask and per-row position ids), prefill + one decode step.
The largest |logit difference| is returned; above ``rtol * max(1, max |reference logit|)`` an ExportError is
raised (``VERIFY_RTOL`` in convert.py, documented in docs/export.md).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgelm.errors import ExportError


class OnnxDecoder:
    """A bare onnxruntime loop over the concat-KV contract (used only for verification here)."""

    def __init__(self, path: str | Path, shape: Any, threads: int | None = None) -> None:
        import onnxruntime as ort
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or 1
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3  # not the note that logits_from (an input with a default) is not a constant
        self.sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.shape = shape
        # The fused "shared" layout (docs/model-format.md) takes no position_ids and keeps no padding: batch-1
        # checks only (fed here like the concat layout, past and present as separate buffers).
        self.shared = getattr(shape, "kv_cache", "concat") == "shared"

    def empty_cache(self, batch: int) -> list[np.ndarray]:
        s = self.shape
        d = getattr(s, "cache_head_dim", 0) or s.head_dim  # a "shared" graph's heads may be padded
        return [np.zeros((batch, s.num_kv_heads, 0, d), np.float32) for _ in range(2 * s.num_layers)]

    def step(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, cache: list[np.ndarray]):
        feeds = {"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64)}
        if not self.shared:
            feeds["position_ids"] = pos.astype(np.int64)
        for i in range(self.shape.num_layers):
            feeds[f"past_key_values.{i}.key"] = cache[2 * i]
            feeds[f"past_key_values.{i}.value"] = cache[2 * i + 1]
        outs = self.sess.run(None, feeds)
        names = [o.name for o in self.sess.get_outputs()]
        res = dict(zip(names, outs))
        new_cache = []
        for i in range(self.shape.num_layers):
            new_cache += [res[f"present.{i}.key"], res[f"present.{i}.value"]]
        return res["logits"], new_cache


def _torch_logits(model: Any, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray) -> np.ndarray:
    import torch
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                    position_ids=torch.from_numpy(pos), use_cache=False)
    return out.logits.float().numpy()


def verify_against_torch(model: Any, onnx_path: str | Path, shape: Any, *, rtol: float, threads: int | None = None,
                         decode_steps: int = 4, seed: int = 0) -> float:
    """Return the max |logit diff| between the ONNX graph and ``model``; raise ExportError above tolerance."""
    dec = OnnxDecoder(onnx_path, shape, threads)
    rng = np.random.default_rng(seed)
    vocab, ctx = shape.vocab_size, shape.context_length
    worst, worst_ref = 0.0, 1.0
    where = ""

    def compare(got: np.ndarray, ref: np.ndarray, what: str) -> None:
        nonlocal worst, worst_ref, where
        diff = float(np.max(np.abs(got - ref)))
        if not np.isfinite(diff):
            raise ExportError(f"The ONNX graph produced non-finite logits ({what}).",
                              hint="This is an exporter bug; please report it with the model's config.json.")
        worst_ref = max(worst_ref, float(np.max(np.abs(ref))))
        if diff > worst:
            worst, where = diff, what

    # 1-2: single prompts, prefill then cached decode steps
    for n_prompt in (min(7, ctx - decode_steps), min(12, ctx - decode_steps)):
        if n_prompt < 1:
            continue
        seq = rng.integers(0, vocab, size=(1, n_prompt))
        cache = dec.empty_cache(1)
        logits, cache = dec.step(seq, np.ones_like(seq), np.arange(n_prompt)[None], cache)
        got = [logits]
        for _ in range(decode_steps):
            nxt = logits[:, -1:].argmax(-1)
            seq = np.concatenate([seq, nxt], axis=1)
            t = seq.shape[1]
            logits, cache = dec.step(nxt, np.ones_like(seq), np.array([[t - 1]]), cache)
            got.append(logits)
        ref = _torch_logits(model, seq, np.ones_like(seq), np.arange(seq.shape[1])[None])
        compare(np.concatenate(got, axis=1), ref, f"prompt of {n_prompt} tokens + {decode_steps} decode steps")

    # 3: left-padded batch of two (the runtime never pads a "shared" graph: it runs batch 1)
    if dec.shared:
        return _check(worst, worst_ref, rtol, where)
    lens = (min(5, ctx - 1), min(9, ctx - 1))
    width = max(lens)
    ids = rng.integers(0, vocab, size=(2, width))
    mask = np.zeros((2, width), np.int64)
    for b, n in enumerate(lens):
        mask[b, width - n:] = 1
    pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    logits, cache = dec.step(ids, mask, pos, dec.empty_cache(2))
    ref = _torch_logits(model, ids, mask, pos)
    real = mask.astype(bool)
    compare(logits[real], ref[real], "left-padded batch prefill")
    if width < ctx:
        nxt = logits[:, -1:].argmax(-1)
        ids2, mask2 = np.concatenate([ids, nxt], 1), np.concatenate([mask, np.ones((2, 1), np.int64)], 1)
        pos2 = np.clip(np.cumsum(mask2, axis=1) - 1, 0, None)
        logits2, _ = dec.step(nxt, mask2, pos2[:, -1:], cache)
        ref2 = _torch_logits(model, ids2, mask2, pos2)
        compare(logits2[:, -1], ref2[:, -1], "left-padded batch decode step")

    return _check(worst, worst_ref, rtol, where)


def _check(worst: float, worst_ref: float, rtol: float, where: str) -> float:
    limit = rtol * worst_ref
    if worst > limit:
        raise ExportError(f"The fp32 ONNX graph disagrees with PyTorch: max |logit diff| {worst:.3e} > {limit:.3e} "
                          f"({where}).", hint="This is an exporter bug; please report it with the model's config.json.")
    return worst
