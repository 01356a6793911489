"""Weight quantization of an exported graph.

Methods (``edgelm export --quantize``):

* ``int8`` (default) -- 8-bit weights, each MatMul's kernel chosen by calibration (:func:`calibrate`): the int8
  GEMM ``DynamicQuantizeMatMul`` (int8 weights with one scale per output column; activations quantized to uint8
  with ONE scale per call, then a VNNI GEMM: the fastest prefill, and the LM head's fastest decode) where that
  per-call activation scale costs at most ``GEMM_MAX_RATIO`` times the block kernel's error, else ``int8-block``'s. Real
  pretrained models put huge activations on a few tokens and channels (SmolLM2-135M-Instruct's down_proj inputs
  reach 3,171 where 0.1 is typical); one scale per call then wipes out every other value, and an all-GEMM int8
  cost +90 % perplexity there (scored one call per 4,096-token window; +18 % in 512-token calls). Small TinyStories-style models keep most matrices on the GEMM. A MatMul whose input
  comes straight from a norm (or any per-channel Mul) can also be *smoothed* first (:func:`smooth_scales`): each
  input channel divided by s_k in the norm's weight and row k of W multiplied by s_k, exact in fp32 and free at
  run time, which moves the outlier channels' range into the weights; calibration uses it where only that brings
  the GEMM within the rule (SmolLM2-135M-Instruct: all 60 qkv and gate_up matrices). A head tied to the embedding
  table (our graphs, from most small models) whose own GEMM fails the rule, if it has at least
  GEMM_RANK_MIN_WEIGHTS weights, ranks the vocabulary on the GEMM, smoothed into the final norm where that lowers
  its error, and its best GEMM_RESCORE_TOP tokens are rescored exactly from the table (stored with a scale per
  block of 32): the head is the largest matrix and the GEMM its fastest kernel in a one-token
  step, and the rescoring keeps greedy choices from the ranking's rounding (SmolLM2-135M-Instruct: decode +9 % at
  1 thread, chat answers 52 -> 55 % of fp32's, perplexity +0.55 -> +0.65 %; benchmarks/int8_head.py).
* ``int8-gemm`` -- every weight MatMul on ``DynamicQuantizeMatMul`` (the default before calibration): only for models
  whose activations have no outliers; the quality gate tells.
* ``int8-block`` -- ``MatMulNBits`` with bits=8, symmetric, one fp32 scale per block of ``BLOCK_SIZE`` input
  features, ``accuracy_level`` 4 (activations quantized per block inside the kernel): the most accurate int8,
  a little faster decode on very small models, 2-2.5x slower prefill.
* ``int4`` -- "scale + min" 4-bit blocks of ``INT4_BLOCK``: each block of a column is w ~= d * q + m, q in 0..15,
  with a float offset m (llama.cpp's Q4_1 layout; :func:`quantize_offset_blocks`), the LM head at 8 bits (tied
  to the table: ranked at int8 activations, its best RESCORE_TOP tokens rescored exactly, as in ``int4-fp32``). The
  kernel stays the fast one: ``MatMulNBits`` with the nearest integer zero point z = round(-m / d) computes
  d * (q - z), and the graph adds the fraction it misses, sum_b (m_b + z_b d_b) * (sum of x over block b), as a
  small MatMul of the activations' block sums (1/32 of the weights' count; :func:`_offset_nodes`). Integer zero
  points alone (the former int4, ``offsets=False``) round m / d to an integer, a second rounding of every weight
  of a Q4_1 source (SmolLM2-135M-Instruct: +23.9 % perplexity), and MatMulNBits' own float zero points run ~100x
  slower in onnxruntime 1.32.
* ``int4-fp32`` -- ``int4``'s matrices with fp32 activations (``accuracy_level`` 0), the embedding table with a
  scale per block of 32, and an 8-bit LM head whose greedy choice is an fp32-activation head's: tied to the table,
  it ranks on the fast kernel and its best RESCORE_TOP tokens are scored again exactly from the table
  (:func:`_rescored_head_nodes`); untied, it runs as two exact 4-bit halves at level 0 (:func:`_split_int8_node`).
  From a Q4_1 GGUF with a Q8_0 table every weight is the source's own value and greedy answers are the fp32
  export's (SmolLM2-135M-Instruct: all 22 chat prompts identical, where int8 keeps 52 % of their leading tokens).
  The price is decode speed (the level-0 kernel de-quantizes as it goes) and multi-token calls, which de-quantize
  each matrix whole (prefill and prompt lookup's verifications): docs/models.md has the numbers.

The token embedding table (a Gather, not a MatMul; found by the graph's structure, whatever the exporter named it:
:func:`embedding_tables`) is stored int8 with one scale per row and de-quantized for the gathered rows only,
unless ``keep_fp32`` names "embeddings". ``keep_fp32`` "lm_head" leaves the output projection fp32. Our graphs
always carry the LM head as its own [hidden, vocab] initializer (never Transpose(embedding)), so tied models do not
fall into the de-quantize-the-whole-table-per-token trap; a table another node also reads is left fp32.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

BLOCK_SIZE = {8: 32, 4: 32}
# MatMulNBits accuracy_level: 0 = fp32 compute on de-quantized weights; 4 = activations quantized to int8 per
# block inside the kernel (VNNI dot products). For bits=8, level 0 took a slow de-quantize-everything path in
# onnxruntime 1.32 (~60x slower decode); level 4 is the fast kernel. Measured: docs/export.md.
ACCURACY_LEVEL = 4
LM_HEAD_WEIGHT = "lm_head.weight"
# Ops an embedding's indices may pass through on their way from the graph input ``input_ids`` (data input 0, the
# values unchanged): optimum's OPT graph reshapes them, other exporters cast them to int32 or add a batch axis.
EMBEDDING_INDEX_OPS = ("Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity")


def quantize_blocks(w: np.ndarray, bits: int, block: int, *, asymmetric: bool = False
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Block-wise quantization of a MatMul weight ``w`` [K, N] into MatMulNBits' layout.

    Returns (B uint8 [N, n_blocks, block * bits / 8], scales float32 [N * n_blocks], zero points or None).
    Symmetric (``asymmetric=False``): no zero points are stored, so MatMulNBits uses 2**(bits-1) (128 / 8) and
    w ~= (q - 2**(bits-1)) * scale with q - 2**(bits-1) in -qmax..qmax. Asymmetric: each block maps its own
    [min, max] (widened to hold 0) onto 0..2**bits-1 with a zero point, w ~= (q - zero) * scale; zero points are
    uint8 [N, ceil(n_blocks * bits / 8)], two per byte for 4 bits (the first block in the low nibble). For 4 bits
    that is the difference between using 15 levels of a lopsided block and wasting half of them.
    K is zero-padded up to a multiple of ``block``.
    """
    k, n = w.shape
    n_blocks = -(-k // block)
    pad = n_blocks * block - k
    wt = np.ascontiguousarray(w.T.astype(np.float32))  # [N, K]
    if pad:
        wt = np.concatenate([wt, np.zeros((n, pad), np.float32)], axis=1)
    wb = wt.reshape(n, n_blocks, block)
    zeros = None
    if asymmetric:
        levels = 2 ** bits - 1
        lo = np.minimum(wb.min(axis=-1, keepdims=True), 0.0)
        hi = np.maximum(wb.max(axis=-1, keepdims=True), 0.0)
        scale = np.where(hi > lo, (hi - lo) / levels, 1.0).astype(np.float32)
        zp = np.clip(np.rint(-lo / scale), 0, levels)
        q = np.clip(np.rint(wb / scale) + zp, 0, levels).astype(np.uint8)
        zeros = _pack_zeros(zp.reshape(n, n_blocks), bits)
    else:
        qmax = 2 ** (bits - 1) - 1  # 127 / 7: symmetric, so -qmax..qmax
        amax = np.abs(wb).max(axis=-1, keepdims=True)
        scale = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
        q = (np.clip(np.rint(wb / scale), -qmax, qmax).astype(np.int32) + 2 ** (bits - 1)).astype(np.uint8)
    if bits == 4:  # two values per byte, the first in the low nibble
        q = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    return np.ascontiguousarray(q), scale.reshape(-1), zeros


# The offset fit's search (:func:`quantize_offset_blocks`): each block's range shrunk by these factors about its
# centre, and grids of 1..3 levels fewer anchored at its min or at its max (a K-quant's sub-block need not use
# every level), each refitted by least squares. The plain min/max fit is always a candidate, so a block already on
# a full 2**bits-level grid (a Q4_1 source) keeps its exact fit.
OFFSET_SHRINKS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.7)
OFFSET_FEWER_LEVELS = (1, 2, 3)


def _fit_offset(wb: np.ndarray, levels: int, search: bool, real: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per block (last axis of ``wb``): (d, m, q) with w ~= d * q + m, q in 0..levels, minimising the block's
    squared error over the search's candidates; ``real`` (broadcast against ``wb``) is 0 at the padding, which
    the fit ignores."""
    lo = wb.min(axis=-1, keepdims=True)
    hi = wb.max(axis=-1, keepdims=True)
    span = hi - lo
    live = span > 0

    def assign(d: np.ndarray, m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        q = np.clip(np.rint((wb - m) / d), 0, levels)
        return q, (real * np.square(d * q + m - wb)).sum(axis=-1, keepdims=True)

    def step(width: np.ndarray) -> np.ndarray:
        return np.where(live, width, 1.0).astype(np.float32)

    d, m = step(span / levels), lo.astype(np.float32)
    q, err = assign(d, m)
    if not search:
        return _constant_blocks(d, m, q, live, lo)
    n = real.sum(axis=-1, keepdims=True)
    starts = [(step(f * span / levels), lo + (1.0 - f) * span / 2) for f in OFFSET_SHRINKS]
    for j in OFFSET_FEWER_LEVELS:
        cd = step(span / (levels - j))
        starts += [(cd, lo), (cd, hi - levels * cd)]
    for cd, cm in starts:
        cq, _ = assign(cd, cm.astype(np.float32))
        # least squares for (d, m) given those levels: w ~= d * q + m
        sq, sw = (real * cq).sum(-1, keepdims=True), (real * wb).sum(-1, keepdims=True)
        den = n * (real * np.square(cq)).sum(-1, keepdims=True) - sq * sq
        fd = np.where(den > 0, (n * (real * cq * wb).sum(-1, keepdims=True) - sq * sw) / np.where(den > 0, den, 1),
                      cd)
        fd = np.where(fd > 0, fd, cd).astype(np.float32)
        fm = ((sw - fd * sq) / n).astype(np.float32)
        cq, cerr = assign(fd, fm)
        better = cerr < err
        d, m, q, err = (np.where(better, fd, d), np.where(better, fm, m), np.where(better, cq, q),
                        np.where(better, cerr, err))
    return _constant_blocks(d, m, q, live, lo)


def _constant_blocks(d: np.ndarray, m: np.ndarray, q: np.ndarray, live: np.ndarray, lo: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A block holding one value (an all-zero column) gets step 0 and that value as its offset: a step of 1 would
    make the kernel's term and the offset's cancel out in large numbers that round."""
    return np.where(live, d, 0.0).astype(np.float32), np.where(live, m, lo).astype(np.float32), np.where(live, q, 0)


def quantize_offset_blocks(w: np.ndarray, bits: int, block: int, *, search: bool = True, zero_points: bool = True
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Block-wise "scale + min" quantization of ``w`` [K, N]: each block of ``block`` input features of a column is
    w ~= d * q + m with q in 0..2**bits-1 and a float offset m (llama.cpp's Q4_1 layout), chosen by the block's
    min/max refined by a small least-squares search (:data:`OFFSET_SHRINKS`). A weight on such a grid already
    (a Q4_1 GGUF, dequantized) is reproduced exactly; integer zero points alone could not, since m/d is no integer.

    Returns (B, scales, offsets, zero points): B, scales and zero points in MatMulNBits' layout (as
    :func:`quantize_blocks`), so the kernel computes d * (q - z); offsets float32 [n_blocks, N] hold m + z * d, the
    part the graph adds back as sum_b offsets[b] * (sum of x over block b) (:func:`_offset_nodes`). With
    ``zero_points`` each block's z is round(-m / d), the integer zero point nearest its float one, which leaves the
    offset term only the fraction, |m + z d| <= d / 2 for a block that straddles 0. Why that matters: the kernel
    multiplies its weights by activations rounded to int8 per block, while the offset term sees the exact
    activations, so a large offset adds its own error where an outlier coarsens a block's rounding (SmolLM2: z = 8
    for every block, no zero points, flipped "What is the capital of France?" to French gibberish). Without
    ``zero_points`` (None returned) z is 2**(bits-1), MatMulNBits' default. K is zero-padded to a multiple of
    ``block``; the padded features contribute nothing (their x is 0 in the block sums too)."""
    k, n = w.shape
    n_blocks = -(-k // block)
    pad = n_blocks * block - k
    wt = np.ascontiguousarray(w.T.astype(np.float32))  # [N, K]
    if pad:  # repeat the last real value: padding that widened the last block's range would coarsen its step
        wt = np.concatenate([wt, np.repeat(wt[:, k - 1:k], pad, axis=1)], axis=1)
    wb = wt.reshape(n, n_blocks, block)
    real = (np.arange(n_blocks * block) < k).astype(np.float32).reshape(1, n_blocks, block)
    levels = 2 ** bits - 1
    d, m, q = _fit_offset(wb, levels, search, real)
    q = q.astype(np.uint8)
    if bits == 4:
        q = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    zeros = None
    if zero_points:
        z = np.where(d > 0, np.clip(np.rint(-m / np.where(d > 0, d, 1.0)), 0, levels), 0).astype(np.float32)
        zeros = _pack_zeros(z.reshape(n, n_blocks), bits)
    else:
        z = np.float32(2 ** (bits - 1))
    offsets = (m + z * d).reshape(n, n_blocks).T.astype(np.float32)
    return np.ascontiguousarray(q), d.reshape(-1).astype(np.float32), np.ascontiguousarray(offsets), zeros


def dequantize_offset_blocks(b: np.ndarray, scales: np.ndarray, offsets: np.ndarray, bits: int, k: int,
                             zeros: np.ndarray | None = None) -> np.ndarray:
    """Inverse of :func:`quantize_offset_blocks`: w [K, N]."""
    block = b.shape[2] * 8 // bits
    return dequantize_blocks(b, scales, bits, k, zeros) + np.repeat(offsets, block, axis=0)[:k]


def _pack_zeros(zp: np.ndarray, bits: int) -> np.ndarray:
    """Zero points [N, n_blocks] in MatMulNBits' layout: uint8 [N * ceil(n_blocks * bits / 8)], two per byte for 4
    bits (the first block in the low nibble)."""
    zp = zp.astype(np.uint8)
    if bits == 4:
        if zp.shape[1] % 2:
            zp = np.concatenate([zp, np.zeros((zp.shape[0], 1), np.uint8)], axis=1)
        zp = zp[:, 0::2] | (zp[:, 1::2] << 4)
    return np.ascontiguousarray(zp.reshape(-1))


def dequantize_blocks(b: np.ndarray, scales: np.ndarray, bits: int, k: int, zeros: np.ndarray | None = None
                      ) -> np.ndarray:
    """Inverse of :func:`quantize_blocks` (used by tests and the error report): returns w [K, N]."""
    n, n_blocks, _ = b.shape
    if bits == 4:
        q = np.stack([b & 0x0F, b >> 4], axis=-1).reshape(n, n_blocks, -1)
    else:
        q = b
    if zeros is None:
        zp = np.full((n, n_blocks, 1), 2 ** (bits - 1), np.float32)
    else:
        z = zeros.reshape(n, -1)
        if bits == 4:
            z = np.stack([z & 0x0F, z >> 4], axis=-1).reshape(n, -1)
        zp = z[:, :n_blocks].reshape(n, n_blocks, 1).astype(np.float32)
    w = (q.astype(np.float32) - zp) * scales.reshape(n, n_blocks, 1)
    return w.reshape(n, -1)[:, :k].T


def save_onnx(model: Any, path: str | os.PathLike) -> int:
    """Save ``model`` as ``path`` (the graph) plus ``path``.data (every weight above 1 KiB); returns bytes written.

    Why a side file even for small models: onnxruntime then reads the weights straight into its tensors, without
    first holding the whole graph as one protobuf message. Measured on the SmolLM2-135M shape (int8, 164 MB):
    resident memory after creating the session 272 -> 193 MB, its peak 299 -> 220 MB. (It also lifts protobuf's
    2 GB limit.)"""
    import onnx

    path = Path(path)
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)  # onnx appends to an existing file
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)
    if data.is_file():  # onnx creates it owner-only (0600); give it the graph file's permissions
        data.chmod(path.stat().st_mode & 0o777)
    return onnx_bytes(path)


def onnx_bytes(path: str | os.PathLike) -> int:
    """Size of a graph file plus its external weight file, if it has one."""
    path = Path(path)
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)


def _initializers(model: Any) -> dict[str, Any]:
    return {t.name: t for t in model.graph.initializer}


def _consumers(model: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            counts[name] = counts.get(name, 0) + 1
    return counts


def lm_head_weight(model: Any) -> str | None:
    """The LM head's weight initializer: ``lm_head.weight`` in our builder's graphs; in other exporters' graphs
    (optimum names it after a node) the weight MatMul with the widest output, if it is a vocabulary projection
    (far wider than its input). Found by shape so --keep-fp32 lm_head and int4's 8-bit head hold on every path."""
    inits = _initializers(model)
    found = [(int(inits[w].dims[1]), int(inits[w].dims[0]), w) for _, _, w in weight_matmuls(model)]
    if any(w == LM_HEAD_WEIGHT for _, _, w in found):
        return LM_HEAD_WEIGHT
    if not found:
        return None
    n, k, w = max(found)
    return w if n >= 4 * k else None


def _replace_matmuls(model: Any, keep: Iterable[str], make: Any, desc: str, progress: bool = False) -> int:
    """Swap every MatMul with a 2-D initializer weight (used by that node only) for a quantized node, in place.

    ``make(node, w_name, w)`` (w the fp32 [K, N] array) returns (new initializers, the new node or a list of new
    nodes in order), or None to leave the node as it is. "lm_head" in ``keep`` leaves the LM head alone. Returns how many MatMuls were replaced."""
    from onnx import numpy_helper
    from tqdm.auto import tqdm

    keep = set(keep)
    head = lm_head_weight(model) if "lm_head" in keep else None
    inits = _initializers(model)
    uses = _consumers(model)
    new_nodes, drop = [], set()
    for node in tqdm(list(model.graph.node), desc=desc, unit="node", disable=not progress, leave=False):
        w_name = node.input[1] if node.op_type == "MatMul" and len(node.input) == 2 else None
        w = inits.get(w_name) if w_name else None
        if (w is None or len(w.dims) != 2 or uses.get(w_name, 0) != 1
                or w_name == head):
            new_nodes.append(node)
            continue
        made = make(node, w_name, numpy_helper.to_array(w))
        if made is None:
            new_nodes.append(node)
            continue
        tensors, replacement = made
        model.graph.initializer.extend(tensors)
        new_nodes.extend(replacement if isinstance(replacement, list) else [replacement])
        drop.add(w_name)
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    _drop_initializers(model, drop)
    return len(drop)


def _nbits_node(node: Any, w_name: str, w: np.ndarray, bits: int, block: int, asymmetric: bool,
                level: int = ACCURACY_LEVEL) -> tuple[list, Any]:
    """MatMul -> MatMulNBits (weight-only ``bits``, blocks of ``block`` input features, ``accuracy_level``
    ``level``)."""
    from onnx import helper, numpy_helper

    k, n = w.shape
    b, scales, zeros = quantize_blocks(w, bits, block, asymmetric=asymmetric)
    b_name, s_name = f"{w_name}.q{bits}", f"{w_name}.scales"
    tensors = [numpy_helper.from_array(b, b_name), numpy_helper.from_array(scales, s_name)]
    inputs = [node.input[0], b_name, s_name]
    if zeros is not None:
        z_name = f"{w_name}.zeros"
        tensors.append(numpy_helper.from_array(zeros, z_name))
        inputs.append(z_name)
    return tensors, helper.make_node("MatMulNBits", inputs, list(node.output), name=node.name, domain="com.microsoft",
                                     K=k, N=n, bits=bits, block_size=block, accuracy_level=level)


class _BlockSums:
    """The offset path's block sums of each activation, made once per (activation, block) and shared by every
    MatMul that reads it (an optimum-style graph's separate q/k/v or gate/up projections)."""

    def __init__(self, rank3: bool) -> None:
        self.rank3 = rank3  # activations are [batch, seq, K] (a decoder whose input_ids are [batch, seq])
        self.made: dict[tuple[str, int], str] = {}
        self.indicators: set[str] = set()

    def __call__(self, x: str, k: int, block: int) -> tuple[str, list, list]:
        """(the sums' name, new initializers, new nodes): x [..., K] -> [..., ceil(K / block)]."""
        from onnx import helper, numpy_helper

        key = (x, block)
        if key in self.made:
            return self.made[key], [], []
        name = self.made[key] = f"{x}/block_sums{block}"
        n_blocks = -(-k // block)
        if self.rank3 and k % block == 0:
            # a free Reshape and a ReduceSum: [B, S, K] -> [B, S, K/block, block] -> [B, S, K/block]
            shape, axes = f"{name}/shape", f"{name}/axes"
            tensors = [numpy_helper.from_array(np.array([0, 0, n_blocks, block], np.int64), shape),
                       numpy_helper.from_array(np.array([-1], np.int64), axes)]
            return name, tensors, [helper.make_node("Reshape", [x, shape], [f"{name}/blocks"], name=f"{name}/reshape"),
                                   helper.make_node("ReduceSum", [f"{name}/blocks", axes], [name], name=name,
                                                    keepdims=0)]
        # any rank, any K: x @ E with E[k, b] = 1 where feature k lies in block b (one E per shape, shared)
        ones = f"block_indicator.{k}x{block}"
        tensors = []
        if ones not in self.indicators:
            e = np.zeros((k, n_blocks), np.float32)
            e[np.arange(k), np.arange(k) // block] = 1.0
            tensors.append(numpy_helper.from_array(e, ones))
            self.indicators.add(ones)
        return name, tensors, [helper.make_node("MatMul", [x, ones], [name], name=name)]


# 4-bit offsets are stored fp16 and cast to fp32 in the graph (onnxruntime folds the Cast into an fp32 initializer
# when the session loads: half the file bytes, the same compute). With zero points the offset is only the fraction
# m + z d (at most d / 2 in a block that straddles 0), so fp16 moves it by at most ~d / 4096, and a Q4_1 source's
# (fp16 d and m) is exact; 8-bit offsets (no zero points, m + 128 d) could move by 1/8 of a step, so they stay fp32.
OFFSET_FP16_BITS = (4,)
# Which widths pair their offsets with integer zero points (quantize_offset_blocks). 4 bits: measured (SmolLM2
# +0.27 % with, +0.40 % without). 8 bits keeps MatMulNBits' symmetric kernel (its offsets are not used by default).
OFFSET_ZERO_POINT_BITS = (4,)


def _offset_nodes(node: Any, w_name: str, w: np.ndarray, bits: int, block: int, sums: _BlockSums,
                  search: bool = True, level: int = ACCURACY_LEVEL) -> tuple[list, list]:
    """MatMul -> MatMulNBits without zero points (the fast kernel) plus the float offsets of
    :func:`quantize_offset_blocks`: y = MatMulNBits(x) + (block sums of x) @ offsets [n_blocks, N]. The second
    term is 1/block of the weights' count (1 byte per 16 weights in fp16 at blocks of 32) and a small MatMul."""
    from onnx import TensorProto, helper, numpy_helper

    k, n = w.shape
    b, scales, offsets, zeros = quantize_offset_blocks(w, bits, block, search=search,
                                                       zero_points=bits in OFFSET_ZERO_POINT_BITS)
    b_name, s_name, o_name = f"{w_name}.q{bits}", f"{w_name}.scales", f"{w_name}.offsets"
    fp16 = bits in OFFSET_FP16_BITS and np.abs(offsets).max(initial=0.0) < 6e4
    tensors = [numpy_helper.from_array(b, b_name), numpy_helper.from_array(scales, s_name),
               numpy_helper.from_array(offsets.astype(np.float16) if fp16 else offsets, o_name)]
    kernel_inputs = [node.input[0], b_name, s_name]
    if zeros is not None:
        tensors.append(numpy_helper.from_array(zeros, f"{w_name}.zeros"))
        kernel_inputs.append(f"{w_name}.zeros")
    x, y = node.input[0], node.output[0]
    base = node.name or y  # other exporters may leave nodes unnamed; the new nodes' names must still be unique
    sum_name, sum_tensors, sum_nodes = sums(x, k, block)
    nodes = list(sum_nodes)
    if fp16:
        nodes.append(helper.make_node("Cast", [o_name], [f"{o_name}/fp32"], name=f"{base}/offsets_fp32",
                                      to=TensorProto.FLOAT))
        o_name = f"{o_name}/fp32"
    nodes += [
        helper.make_node("MatMulNBits", kernel_inputs, [f"{y}/grid"], name=node.name, domain="com.microsoft",
                         K=k, N=n, bits=bits, block_size=block, accuracy_level=level),
        helper.make_node("MatMul", [sum_name, o_name], [f"{y}/offset"], name=f"{base}/offset"),
        helper.make_node("Add", [f"{y}/grid", f"{y}/offset"], [y], name=f"{base}/add_offset")]
    return tensors + sum_tensors, nodes


def _split_int8_node(node: Any, w_name: str, w: np.ndarray, level: int) -> tuple[list, list] | None:
    """MatMul -> symmetric 8-bit blocks of 32 (exactly ``int8-block``'s values: a Q8_0 source's are reproduced
    bit for bit) computed by ONE 4-bit MatMulNBits at accuracy level ``level``; None when K is not a whole number
    of blocks.

    Why: onnxruntime 1.32 runs bits=8 at accuracy level 0 (fp32 activations) on a de-quantize-everything path
    (~60x slower decode), while its 4-bit level-0 kernel is a real one. Each 8-bit value s (-127..127) is
    16 * hi + lo with lo = s mod 16 in 0..15 and hi in -8..7, two 4-bit values; the weight becomes [W_hi; W_lo]
    ([2K, N]: hi blocks with scale 16 d and zero point 8, lo blocks with scale d and zero point 0) and the input
    [x, x], so one call sums d * (16 hi + lo) * x = d * s * x over 2K rows. Exact in the weights; fp32 rounding of
    the sums only (max logit difference ~2e-6 on SmolLM2-135M-Instruct's head)."""
    from onnx import helper, numpy_helper

    block = BLOCK_SIZE[8]
    k, n = w.shape
    if k % block:
        return None
    b, scales, _ = quantize_blocks(w, 8, block)              # b = s + 128, uint8 [N, K / 32, 32]
    s = b.astype(np.int16) - 128
    lo = s & 15                                              # two's complement: s = 16 * (s >> 4) + (s & 15)
    hi = (s - lo) // 16
    q = np.concatenate([hi + 8, lo], axis=1).astype(np.uint8)  # [N, 2K / 32, 32]: hi blocks, then lo blocks
    q = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    d = scales.reshape(n, k // block)
    split_scales = np.concatenate([16 * d, d], axis=1).astype(np.float32).reshape(-1)
    zeros = _pack_zeros(np.concatenate([np.full_like(d, 8), np.zeros_like(d)], axis=1), 4)
    b_name, s_name, z_name = f"{w_name}.q8_split", f"{w_name}.split_scales", f"{w_name}.split_zeros"
    x, y = node.input[0], node.output[0]
    base = node.name or y
    tensors = [numpy_helper.from_array(q, b_name), numpy_helper.from_array(split_scales, s_name),
               numpy_helper.from_array(zeros, z_name)]
    return tensors, [
        helper.make_node("Concat", [x, x], [f"{y}/x_twice"], name=f"{base}/x_twice", axis=-1),
        helper.make_node("MatMulNBits", [f"{y}/x_twice", b_name, s_name, z_name], [y], name=node.name,
                         domain="com.microsoft", K=2 * k, N=n, bits=4, block_size=block, accuracy_level=level)]


# A tied LM head (SmolLM2 and most small models) decides greedy tokens in two steps in int4 and int4-fp32: the
# head on the fast kernel (RANK_BITS-bit blocks, int8 activations per block) ranks the vocabulary, then its
# RESCORE_TOP best tokens per position are scored again exactly (their rows of the block-scaled 8-bit table times
# the fp32 hidden state). Greedy decoding picks what an fp32-activation head picks unless that token is not among
# the ranked best. SmolLM2-135M-Instruct, 22 chat prompts (benchmarks/rescored_head.py, results/rescored-head-
# smollm2.md): int4-fp32 keeps 22 of 22 answers with the best 8 rescored; int4 goes from 54 % to 71 % of fp32's
# leading tokens at the same speed. A 4-bit ranking head (half the bytes of the largest matrix) decoded 2-16 %
# faster, but its tail logits, which perplexity reads, cost +1.3 to +1.8 points with the best 32-64 rescored;
# rescoring 256 (+0.5) put score() at 2.4 GB ([positions, top, hidden] rows per call). So the ranking stays 8-bit.
RANK_BITS = 8
RESCORE_TOP = 8
# The kernel each method ranks with: "block" (MatMulNBits at RANK_BITS) or "gemm" (DynamicQuantizeMatMul, int8 per
# output column, one activation scale per call). int8 ranks on the GEMM: the head is the largest matrix, its GEMM
# is the fastest 8-bit kernel in a one-row decode step, and the rescoring makes the greedy choice exact again
# whatever the ranking's activation rounding (benchmarks/int8_head.py).
RANK_KERNEL = {"int8": "gemm"}
# How many tokens a GEMM ranking has rescored: its tail logits (which perplexity and sampling read) are noisier than
# an 8-bit block head's, so more of the likely tokens are made exact. SmolLM2-135M-Instruct int8, alice-20k: +0.81 %
# perplexity with the best 8 rescored, +0.71 % with 16, +0.65 % with 32 (plain 8-bit block head +0.55 %, the same
# 512-token score calls); a decode step pays the same.
GEMM_RESCORE_TOP = 32
# ...and only a head this large (weights) ranks on the GEMM: what the GEMM saves over the block kernel grows with
# the head (SmolLM2's 28M weights: 0.43 ms a step), while the rescoring's dozen small nodes cost the same for any
# head, a large share of a step as short as stories260K's 0.1 ms (-10 % decode there: benchmarks/int8_head.py small).
# A smaller head keeps the calibrated plan's kernel.
GEMM_RANK_MIN_WEIGHTS = 2**22


def _rescored_head_nodes(model: Any, node: Any, w_name: str, w: np.ndarray, table: str, x_rank: int | None,
                         rank: str = "block", smooth: np.ndarray | None = None, tie_scale: float = 1.0
                         ) -> tuple[list, list]:
    """The LM head on the fast kernel (RANK_BITS-bit blocks, int8 activations per block) ranks the vocabulary;
    its RESCORE_TOP best per position are then scored exactly: their rows of the block-scaled embedding table
    ``table`` (the same Q8_0 values as the head's, since the head is tied to it; :func:`_quantize_embeddings`
    names them ``table``.q8 / ``table``.block_scales) times the fp32 hidden state, scattered over the ranked
    logits. Greedy decoding then picks what an fp32-activation 8-bit head picks unless that token is not among
    the ranked best; the other logits keep the ranking head's values."""
    from onnx import TensorProto, helper, numpy_helper

    top = GEMM_RESCORE_TOP if rank == "gemm" else RESCORE_TOP
    if rank == "gemm":
        tensors, ranked = _gemm_node(node, w_name, w if smooth is None else w * smooth[:, None])
    else:
        tensors, ranked = _nbits_node(node, w_name, w, RANK_BITS, BLOCK_SIZE[RANK_BITS], RANK_BITS < 8,
                                      ACCURACY_LEVEL)
    x, y = node.input[0], node.output[0]
    base = node.name or y
    r = f"{base}/rescore"
    ranked.output[0] = f"{r}/ranked"
    k_name, last = f"{r}/k", f"{r}/last_axis"
    tensors += [numpy_helper.from_array(np.array([top], np.int64), k_name),
                numpy_helper.from_array(np.array([-1], np.int64), last)]
    # The rescoring's hidden state: times s where the input was divided by s (smoothing, for the ranking GEMM), and
    # over the table's scale where the table is the head times a scalar (Gemma's folded sqrt(hidden)).
    unsmooth = None
    if smooth is not None or tie_scale != 1.0:
        unsmooth = (np.ones(w.shape[0], np.float64) if smooth is None else smooth.astype(np.float64)) / tie_scale
        tensors.append(numpy_helper.from_array(unsmooth.astype(np.float32), f"{r}/unsmooth"))
    # the gathered rows [*x.shape[:-1], top, K / 32, 32] -> [*x.shape[:-1], top, K]
    rows_shape, shape_nodes = _rows_shape(model, r, None if x_rank is None else x_rank, w.shape[0], f"{r}/top")
    return tensors, [
        ranked,
        helper.make_node("TopK", [f"{r}/ranked", k_name], [f"{r}/top_logits", f"{r}/top"], name=f"{r}/top",
                         axis=-1, largest=1, sorted=0),
        helper.make_node("Gather", [f"{table}.q8", f"{r}/top"], [f"{r}/q_rows"], name=f"{r}/q_rows", axis=0),
        helper.make_node("Cast", [f"{r}/q_rows"], [f"{r}/f_rows"], name=f"{r}/cast", to=TensorProto.FLOAT),
        helper.make_node("Gather", [f"{table}.block_scales", f"{r}/top"], [f"{r}/scales"], name=f"{r}/scales",
                         axis=0),
        helper.make_node("Mul", [f"{r}/f_rows", f"{r}/scales"], [f"{r}/blocks"], name=f"{r}/dequant"),
        *shape_nodes,
        helper.make_node("Reshape", [f"{r}/blocks", rows_shape], [f"{r}/rows"], name=f"{r}/rows"),
        *([] if unsmooth is None else [
            helper.make_node("Mul", [x, f"{r}/unsmooth"], [f"{r}/x"], name=f"{r}/unsmooth")]),
        helper.make_node("Unsqueeze", [x if unsmooth is None else f"{r}/x", last], [f"{r}/hidden"],
                         name=f"{r}/hidden"),
        helper.make_node("MatMul", [f"{r}/rows", f"{r}/hidden"], [f"{r}/exact1"], name=f"{r}/exact"),
        helper.make_node("Squeeze", [f"{r}/exact1", last], [f"{r}/exact"], name=f"{r}/squeeze"),
        helper.make_node("ScatterElements", [f"{r}/ranked", f"{r}/top", f"{r}/exact"], [y], name=f"{r}/scatter",
                         axis=-1)]


def quantize_columns(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel int8 of a MatMul weight ``w`` [K, N]: (q int8 [K, N], scales float32 [N]),
    w ~= q * scale. -127..127, so the int8 range is symmetric and no zero point is stored."""
    w = np.asarray(w, dtype=np.float32)
    amax = np.abs(w).max(axis=0)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return np.ascontiguousarray(q), scale


def _gemm_node(node: Any, w_name: str, w: np.ndarray) -> tuple[list, Any]:
    """MatMul -> DynamicQuantizeMatMul (int8 weights with one scale per output column; the op quantizes the
    activations to uint8 on each call, one scale for the whole call)."""
    from onnx import helper, numpy_helper

    q, scales = quantize_columns(w)
    q_name, s_name = f"{w_name}.q8c", f"{w_name}.col_scales"
    return ([numpy_helper.from_array(q, q_name), numpy_helper.from_array(scales, s_name)],
            helper.make_node("DynamicQuantizeMatMul", [node.input[0], q_name, s_name], list(node.output),
                             name=node.name, domain="com.microsoft"))


def embedding_tables(model: Any, vocab_size: int | None = None) -> dict[str, list[Any]]:
    """The token embedding tables, found by structure rather than by name (our builder says ``embed_tokens.weight``,
    optimum ``model.embed_tokens.weight``, ``transformer.wte.weight``, ``gpt_neox.embed_in.weight``, others
    ``onnx::Gather_...``): table name -> its Gather nodes. A table is a 2-D float32 initializer [vocab, hidden] read
    by Gathers on axis 0 only, whose indices come from the graph input ``input_ids`` directly or through
    :data:`EMBEDDING_INDEX_OPS`. So a position table (indices from ``position_ids`` or the mask) or a Gather on an
    activation never qualifies, nor a table something else also reads (a tied head's Transpose): quantizing it would
    leave that reader without its fp32 table. The table's rows must equal ``vocab_size``: by default the static last
    dimension of the ``logits`` output, else the LM head's width (:func:`lm_head_weight`, while it is still a
    MatMul); a graph that tells neither has no table taken (it keeps fp32, as a graph with no decoder's outputs
    should: an id lookup there need not be the token embedding)."""
    from onnx import TensorProto

    inits = _initializers(model)
    producer = {out: node for node in model.graph.node for out in node.output}
    if vocab_size is None:
        logits = next((o for o in model.graph.output if o.name == "logits"), None)
        dims = logits.type.tensor_type.shape.dim if logits is not None else []
        vocab_size = (dims[-1].dim_value or None) if dims else None
        head = lm_head_weight(model) if vocab_size is None else None
        vocab_size = vocab_size or (int(inits[head].dims[1]) if head else None)

    def from_input_ids(name: str) -> bool:
        for _ in range(len(producer) + 1):  # (a bound: a malformed graph with a cycle must not hang the export)
            node = producer.get(name)
            if node is None:
                return name == "input_ids"
            if node.op_type not in EMBEDDING_INDEX_OPS:
                return False
            name = node.input[0]
        return False

    readers: dict[str, list[Any]] = {}
    for node in model.graph.node:
        for name in node.input:
            if name in inits:
                readers.setdefault(name, []).append(node)
    found = {}
    for name, nodes in readers.items():
        t = inits[name]
        # (hidden > 1: a quantized graph's [vocab, 1] row scales are gathered by input_ids too)
        if (len(t.dims) == 2 and t.dims[1] > 1 and t.data_type == TensorProto.FLOAT
                and t.dims[0] == vocab_size
                and all(n.op_type == "Gather" and n.input[0] == name != n.input[1] and not _attr(n, "axis")
                        and from_input_ids(n.input[1]) for n in nodes)):
            found[name] = nodes
    return found


def _input_rank(model: Any, name: str) -> int | None:
    """The rank of graph input ``name`` when the graph declares it, else None."""
    for i in model.graph.input:
        if i.name == name and i.type.tensor_type.HasField("shape"):
            return len(i.type.tensor_type.shape.dim)
    return None


def _rows_shape(model: Any, name: str, lead: int | None, width: int, dynamic_of: str) -> tuple[str, list]:
    """A Reshape target [*lead dims, width]. With ``lead`` known it is a constant (0 keeps an input dimension), so
    onnxruntime still infers every downstream shape and plans its buffers (a shape computed in the graph made a
    128-token prefill of SmolLM2 peak ~90 MB higher: every later tensor's size unknown until run time). Unknown:
    Shape(``dynamic_of``) + [width], computed per call. Returns (the shape's name, the nodes to add)."""
    from onnx import helper, numpy_helper

    if lead is not None:
        const = f"reshape_to.{lead}x0.{width}"
        if const not in {t.name for t in model.graph.initializer}:
            model.graph.initializer.append(numpy_helper.from_array(np.array([0] * lead + [width], np.int64), const))
        return const, []
    width_name = f"reshape_to.width.{width}"
    if width_name not in {t.name for t in model.graph.initializer}:
        model.graph.initializer.append(numpy_helper.from_array(np.array([width], np.int64), width_name))
    return f"{name}/rows_shape", [
        helper.make_node("Shape", [dynamic_of], [f"{name}/lead_shape"], name=f"{name}/lead_shape"),
        helper.make_node("Concat", [f"{name}/lead_shape", width_name], [f"{name}/rows_shape"],
                         name=f"{name}/rows_shape", axis=0)]


def _quantize_embeddings(model: Any, vocab_size: int | None = None, block: int | None = None) -> list[str]:
    """int8 embedding rows, for every table :func:`embedding_tables` finds: with ``block`` None one scale per row,
    Gather(q) -> Cast -> Mul(Gather(scale)); with ``block`` one scale per ``block`` values of a row (a GGUF's Q8_0
    table comes back exactly; 1/``block`` more bytes of scales), the gathered rows [..., K / block, block] scaled
    and reshaped to [..., K]. Returns the tables done; a table whose width is not a whole number of blocks keeps
    one scale per row."""
    from onnx import TensorProto, helper, numpy_helper

    inits = _initializers(model)
    tables = embedding_tables(model, vocab_size)
    replaced: dict[str, list[Any]] = {}  # by the Gather's output (unique in a valid graph)
    for table, gathers in tables.items():
        arr = numpy_helper.to_array(inits[table])
        width = arr.shape[1]
        blocked = block is not None and width % block == 0
        if blocked:
            arr = arr.reshape(arr.shape[0], width // block, block)
        amax = np.abs(arr).max(axis=-1, keepdims=True)
        scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
        q = np.clip(np.rint(arr / scale), -127, 127).astype(np.int8)
        q_name, s_name = f"{table}.q8", f"{table}.{'block' if blocked else 'row'}_scales"
        model.graph.initializer.extend([numpy_helper.from_array(q, q_name), numpy_helper.from_array(scale, s_name)])
        for node in gathers:
            ids, out = node.input[1], node.output[0]
            base = node.name or out  # other exporters may leave nodes unnamed; the new names must still be unique
            scaled = f"{out}/blocks" if blocked else out
            replaced[out] = [
                helper.make_node("Gather", [q_name, ids], [f"{out}/q_rows"], name=f"{base}/q_rows", axis=0),
                helper.make_node("Cast", [f"{out}/q_rows"], [f"{out}/rows"], name=f"{base}/cast", to=TensorProto.FLOAT),
                helper.make_node("Gather", [s_name, ids], [f"{out}/scales"], name=f"{base}/scales", axis=0),
                helper.make_node("Mul", [f"{out}/rows", f"{out}/scales"], [scaled], name=f"{base}/dequant")]
            if blocked:  # [*ids.shape, K / block, block] -> [*ids.shape, K], whatever the ids' rank
                shape, nodes = _rows_shape(model, out, _input_rank(model, ids), width, ids)
                replaced[out] += nodes + [helper.make_node("Reshape", [scaled, shape], [out], name=f"{base}/rows")]
    new_nodes = []
    for node in model.graph.node:
        new_nodes += replaced.get(node.output[0], [node]) if node.output else [node]
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    _drop_initializers(model, set(tables))
    return list(tables)


def _tied_table(model: Any, head: str) -> tuple[str, float] | None:
    """(name, c) of the token embedding table (:func:`embedding_tables`) whose values are the LM head's, transposed
    (a tied head our builder stores as its own [hidden, vocab] initializer), times c (1.0, or Gemma's embedding
    scale sqrt(hidden) folded into the table: :func:`_tie_scale`), if its width is whole blocks of 32: the
    block-scaled table then holds the head's 8-bit values times c, so the head's best tokens can be rescored from
    it. None otherwise."""
    from onnx import numpy_helper

    inits = _initializers(model)
    tables = embedding_tables(model)
    if len(tables) != 1 or head not in inits:
        return None
    (name,) = tables
    table, w = inits[name], inits[head]
    if list(table.dims) != list(w.dims)[::-1] or table.dims[1] % BLOCK_SIZE[8]:
        return None
    c = _tie_scale(numpy_helper.to_array(table), numpy_helper.to_array(w))
    return None if c is None else (name, c)


def _tie_scale(table: np.ndarray, w: np.ndarray) -> float | None:
    """c with table == c * w.T (to fp32 rounding; exactly 1.0 for a plain tie), or None if there is none. Compared
    a block of rows at a time: Gemma 3's table is 262,144 x 640."""
    flat = int(np.abs(w).argmax())
    i, j = divmod(flat, w.shape[1])
    if w[i, j] == 0:
        return None
    c = float(table[j, i]) / float(w[i, j])
    if not (np.isfinite(c) and c > 0):
        return None
    for a in range(0, table.shape[0], 16384):
        rows = table[a:a + 16384]
        if c == 1.0:
            if not np.array_equal(rows, w[:, a:a + 16384].T):
                return None
        elif not np.allclose(rows, np.float32(c) * w[:, a:a + 16384].T, rtol=1e-5, atol=1e-6 * abs(c * w[i, j])):
            return None
    return c


def _drop_initializers(model: Any, names: set[str]) -> None:
    keep = [t for t in model.graph.initializer if t.name not in names]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


METHODS = ("int8", "int8-block", "int8-gemm", "int4", "int4-fp32")
# Methods whose kernels keep activations fp32 (MatMulNBits accuracy level 0) and whose tables are stored so that a
# GGUF's Q4_1 / Q8_0 values come back exactly (embeddings with a scale per block of 32; the 8-bit LM head rescored
# or split, RESCORE_TOP): nothing that decides a greedy token is rounded that the source did not round. On SmolLM2-135M-Instruct all 22 greedy chat
# answers are fp32's; each part taken away alone (benchmarks/fp32_activations.py): per-row embedding scales 89.9 %
# of fp32's answers, int8 activations in the head 84.5 %, in one kind of 4-bit matrix 64.5-95.5 %, in all of them
# 71.2 %: any int8 rounding of activations flips some of the near-ties that decide greedy answers.
FP32_ACTIVATIONS = ("int4-fp32",)
# Methods whose tied LM head ranks cheaply and rescores its best tokens exactly (RANK_BITS, RESCORE_TOP).
RESCORED_HEADS = ("int8", "int4", "int4-fp32")
# int8's per-matrix rule: a MatMul keeps the int8 GEMM (DynamicQuantizeMatMul) only where it costs little more than
# the block-wise kernel: its calibrated output error (one activation scale per call, per-column weights) at most
# this many times the error of block-wise 8-bit weights with per-block activations on the same tokens (calibrate).
# Outlier-free (Gaussian-like) activations put the ratio near 1.8 (tests/test_quantize.py); any outlier pushes it
# past 2.5. Measured (docs/models.md): stories260K keeps 5 of its 21 matrices on the GEMM, SmolLM2-135M-Instruct
# none (its best ratio is 2.5; outlier-fed matrices reach 50-100x). An absolute limit of 2 % per row left 6 SmolLM2
# matrices on the GEMM at +0.74 % perplexity, yet those six alone turned "What is the capital of France?" into
# gibberish; all 121 on the GEMM cost +90 % (one score call per 4,096-token window; +18 % in 512-token calls).
GEMM_MAX_RATIO = 2.0
INT4_BLOCK = 32
# Which methods store their block-wise matrices as "scale + min" blocks with float offsets (quantize_offset_blocks)
# by default. int4: on SmolLM2-135M-Instruct (a Q4_1 source) +0.27 % perplexity with offsets, +23.9 % with
# integer zero points (docs/models.md).
OFFSETS = {"int4": True, "int4-fp32": True}
CALIBRATION_TOKENS = 256


def weight_matmuls(model: Any) -> list[tuple[str, str, str]]:
    """(node name, activation input, weight initializer) of every MatMul with a 2-D initializer weight."""
    inits = _initializers(model)
    return [(n.name, n.input[0], n.input[1]) for n in model.graph.node
            if n.op_type == "MatMul" and len(n.input) == 2 and n.input[1] in inits
            and len(inits[n.input[1]].dims) == 2]


def _per_call_uint8(x: np.ndarray) -> np.ndarray:
    """What DynamicQuantizeLinear does to ``x`` (one asymmetric uint8 scale for the whole tensor), de-quantized."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = (hi - lo) / 255.0 or 1.0
    zero = np.rint(-lo / scale)
    return (np.clip(np.rint(x / scale) + zero, 0, 255) - zero) * scale


def calibrate(src: str | os.PathLike, config: dict[str, Any], token_ids: list[int], *,
              threads: int | None = None) -> dict[str, dict[str, Any]]:
    """Relative output errors of the two int8 kernels for every weight MatMul of the fp32 graph at ``src``:
    {node: {"gemm": error, "block": error}}, plus for the MatMuls that can be smoothed (:func:`smoothable`) the
    GEMM's error after the best smoothing of :data:`SMOOTH_ALPHAS` ("smooth") and its scales ("smooth_scales",
    float32 [K]).

    Runs one prefill of ``token_ids`` (batch 1, empty cache) with every MatMul's activation input exposed, then
    compares ``x @ W`` with what each kernel computes: "gemm" per-call uint8 activations times per-column int8
    weights (DynamicQuantizeMatMul), "block" per-block int8 activations times block-wise int8 weights
    (MatMulNBits, accuracy level 4); the error is the mean over rows (tokens) of ||error_row|| / ||ref_row||.
    A prefill is the worst case the GEMM sees: one activation scale for all its rows, so a single outlier token
    (real models have them: SmolLM2's down_proj inputs reach 3,171 where the typical value is 0.1) flattens
    every other row."""
    import tempfile

    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    src = Path(src)
    # The graph only: the weights stay in model.onnx.data, and each is read on its own below, so calibration
    # never holds a second copy of the model in memory.
    model = onnx.load(str(src), load_external_data=False)
    nodes = weight_matmuls(model)
    head = lm_head_weight(model)
    inits = _initializers(model)
    foldable = smoothable(model)
    for _, x, _ in nodes:
        model.graph.output.append(helper.make_tensor_value_info(x, TensorProto.FLOAT, None))
    # onnxruntime reads external data only from the graph's own folder (symbolic links that leave it are refused),
    # so the probe graph goes beside the original; a read-only folder gets a temporary copy of the weights instead.
    probe_dir = src.parent
    try:
        fd, probe = tempfile.mkstemp(prefix=".edgelm-calibrate-", suffix=".onnx", dir=probe_dir)
        os.close(fd)
    except OSError:
        probe_dir = Path(tempfile.mkdtemp(prefix="edgelm-calibrate-"))
        probe = str(probe_dir / src.name)
        data = src.with_name(src.name + ".data")
        if data.is_file():
            shutil.copyfile(data, probe_dir / data.name)
    try:
        path = Path(probe)
        onnx.save_model(model, str(path))
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or 1
        opts.log_severity_level = 3
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        ids = np.asarray([token_ids], np.int64)
        feeds: dict[str, np.ndarray] = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        for inp in sess.get_inputs():
            if inp.name == "position_ids":
                feeds[inp.name] = np.arange(ids.shape[1], dtype=np.int64)[None]
            elif inp.name.startswith("past_key_values."):
                width = inp.shape[3] if isinstance(inp.shape[3], int) else config["head_dim"]
                feeds[inp.name] = np.zeros((1, int(config["num_kv_heads"]), 0, width), np.float32)
        acts = sess.run([x for _, x, _ in nodes], feeds)
        del sess
    finally:
        Path(probe).unlink(missing_ok=True)
        if probe_dir != src.parent:
            shutil.rmtree(probe_dir, ignore_errors=True)
    errors = {}
    for (name, _, w_name), x in zip(nodes, acts):
        x = x.reshape(-1, x.shape[-1]).astype(np.float32)
        w = numpy_helper.to_array(inits[w_name], base_dir=str(src.parent))
        ref = x @ w
        q, scales = quantize_columns(w)
        gemm = _per_call_uint8(x) @ (q.astype(np.float32) * scales)
        b, bscales, _ = quantize_blocks(w, 8, BLOCK_SIZE[8])
        block = _per_block_int8(x, BLOCK_SIZE[8]) @ dequantize_blocks(b, bscales, 8, w.shape[0])
        errors[name] = {"gemm": _row_error(gemm, ref), "block": _row_error(block, ref), "head": w_name == head}
        if name in foldable:
            tried = []
            for alpha in SMOOTH_ALPHAS:
                s = smooth_scales(x, w, alpha)
                qs, ss = quantize_columns(w * s[:, None])
                tried.append((_row_error(_per_call_uint8(x / s) @ (qs.astype(np.float32) * ss), ref), s))
            err, s = min(tried, key=lambda t: t[0])
            errors[name].update(smooth=err, smooth_scales=s)
    return errors


# SmoothQuant's migration strength: s_k = max|x_k|^alpha / max|W_k|^(1 - alpha). Calibration tries each and keeps
# the one with the smallest GEMM error per MatMul (SmolLM2-135M-Instruct's best alphas spread over all four).
SMOOTH_ALPHAS = (0.5, 0.65, 0.8, 0.9)
# Ops whose weight (and bias) inputs scale their output per channel, by input index: dividing them by s divides the
# output channel k by s_k. (A Mul by a [K] initializer counts too: see smoothable.)
_NORM_WEIGHTS = {"SimplifiedLayerNormalization": (1,), "SkipSimplifiedLayerNormalization": (2,),
                 "LayerNormalization": (1, 2), "SkipLayerNormalization": (2, 3)}


def smooth_scales(x: np.ndarray, w: np.ndarray, alpha: float) -> np.ndarray:
    """Per-input-channel scales s [K] (float32) that balance the activations' range against the weights' (x [T, K]
    calibration activations, w [K, N]): x / s is flatter, so one uint8 scale per call keeps more of each row, and
    diag(s) W absorbs the range, where per-column int8 weights cope better. Channels never seen active keep 1."""
    ax = np.abs(x).max(axis=0).astype(np.float64)
    aw = np.abs(w).max(axis=1).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = ax ** alpha / aw ** (1.0 - alpha)
    return np.where(np.isfinite(s) & (s > 0), s, 1.0).astype(np.float32)


def smoothable(model: Any) -> dict[str, list[str]]:
    """Weight MatMuls whose input channels can be rescaled for free: node name -> the initializers (the norm's
    weight and bias, or a Mul's [K] constant) to divide by s. Only where the MatMul's input is output 0 of a
    per-channel op (a norm in _NORM_WEIGHTS, or a Mul by a [K] initializer) that nothing else reads, and those
    initializers belong to that op alone -- so folding 1 / s into them changes this MatMul's input and nothing else."""
    inits = _initializers(model)
    uses = _consumers(model)
    producer = {node.output[0]: node for node in model.graph.node if node.output}
    out: dict[str, list[str]] = {}
    for name, x, w_name in weight_matmuls(model):
        k = inits[w_name].dims[0]
        node = producer.get(x)
        if node is not None and uses.get(x) == 1 and _row_slice(node, inits):
            x = node.input[0]  # an LM head's Slice of the positions it scores (logits_from): channels untouched
            node = producer.get(x)
        if node is None or uses.get(x) != 1:
            continue
        if node.op_type in _NORM_WEIGHTS:
            names = [node.input[i] for i in _NORM_WEIGHTS[node.op_type] if i < len(node.input) and node.input[i]]
        elif node.op_type == "Mul" and len(node.input) == 2:
            names = [i for i in node.input if i in inits]
            names = names if len(names) == 1 else []
        else:
            continue
        if names and all(n in inits and uses.get(n) == 1 and list(inits[n].dims) == [k] for n in names):
            out[name] = names
    return out


def _row_slice(node: Any, inits: dict[str, Any]) -> bool:
    """A Slice whose constant axes are all before the last one (rows or positions, never channels)."""
    from onnx import numpy_helper

    if node.op_type != "Slice" or len(node.input) < 4 or node.input[3] not in inits:
        return False
    axes = numpy_helper.to_array(inits[node.input[3]]).reshape(-1)
    return len(axes) > 0 and all(0 <= int(a) < 2 for a in axes)  # [batch, positions, channels] graphs


def _fold_smoothing(model: Any, smooth: dict[str, np.ndarray], skip_weights: Iterable[str] = ()) -> None:
    """Apply a plan's smoothing in place: divide each node's norm weights by s, multiply its W's rows by s (except
    the weights named in ``skip_weights``: a rescored head scales its own copy, its tied table stays as it is)."""
    from onnx import numpy_helper

    foldable = smoothable(model)
    inits = _initializers(model)
    weight = {name: w for name, _, w in weight_matmuls(model)}
    for name, s in smooth.items():
        if name not in foldable:
            raise ValueError(f"{name}: its input cannot be smoothed (see smoothable)")
        s = np.asarray(s, np.float32)
        for t in foldable[name]:
            inits[t].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(inits[t]) / s, t))
        w = weight[name]
        if w not in skip_weights:
            inits[w].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(inits[w]) * s[:, None], w))


def _per_block_int8(x: np.ndarray, block: int) -> np.ndarray:
    """What MatMulNBits at accuracy level 4 does to its activations: symmetric int8 per block of ``block``."""
    k = x.shape[-1]
    pad = -k % block
    xb = np.pad(x, ((0, 0), (0, pad))).reshape(x.shape[0], -1, block)
    amax = np.abs(xb).max(axis=-1, keepdims=True)
    scale = np.where(amax > 0, amax / 127.0, 1.0)
    return (np.clip(np.rint(xb / scale), -127, 127) * scale).reshape(x.shape[0], -1)[:, :k]


def _row_error(got: np.ndarray, ref: np.ndarray) -> float:
    """Mean over rows (tokens) of ||got_row - ref_row|| / ||ref_row||. Per row, then averaged: a norm over the
    whole output would be dominated by an outlier row itself and hide that every other row lost its precision."""
    rel = np.linalg.norm(got - ref, axis=1) / np.maximum(np.linalg.norm(ref, axis=1), 1e-30)
    return float(rel.mean())


class Int8Plan(dict):
    """:func:`plan_int8`'s answer: node -> "gemm" | "block" like any plan, plus ``smooth``: node -> the scales
    :func:`quantize_model` folds in before quantizing (the GEMM nodes that pass the rule only when smoothed)."""

    def __init__(self, kinds: dict[str, str], smooth: dict[str, np.ndarray] | None = None,
                 head_smooth: dict[str, np.ndarray] | None = None) -> None:
        super().__init__(kinds)
        self.smooth = dict(smooth or {})
        # the LM head's smoothing for a GEMM that only ranks (RANK_KERNEL): where it lowers the GEMM's error
        self.head_smooth = dict(head_smooth or {})


def plan_int8(errors: dict[str, dict[str, Any]], max_ratio: float = GEMM_MAX_RATIO) -> Int8Plan:
    """Per node: "gemm" (DynamicQuantizeMatMul) when its calibrated error is at most ``max_ratio`` times the
    block-wise kernel's on the same activations, else "block" -- unless smoothing brings the GEMM within the rule:
    then "gemm", smoothed. Smoothing only rescues; a GEMM that passes as it is stays unsmoothed (on stories260K,
    whose 12 GEMM matrices all pass plain, smoothing them too lowered their calibrated error yet cost perplexity:
    +0.32 % instead of -0.11 % on the built-in sample)."""
    kinds, smooth, head_smooth = {}, {}, {}
    for name, e in errors.items():
        limit = max_ratio * e["block"]
        kinds[name] = "gemm" if e["gemm"] <= limit or e.get("smooth", float("inf")) <= limit else "block"
        if e["gemm"] > limit and kinds[name] == "gemm":
            smooth[name] = e["smooth_scales"]
        if e.get("head") and e.get("smooth", float("inf")) < e["gemm"]:
            head_smooth[name] = e["smooth_scales"]
    return Int8Plan(kinds, smooth, head_smooth)


def _attr(node: Any, name: str) -> Any:
    from onnx import helper

    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), None)


def quantize_model(src: str | os.PathLike, dst: str | os.PathLike, *, method: str = "int8",
                   keep_fp32: Iterable[str] = (), plan: dict[str, str] | None = None,
                   int4_block: int = INT4_BLOCK, offsets: bool | None = None, search: bool = True,
                   progress: bool = False) -> dict[str, Any]:
    """Quantize the fp32 graph at ``src`` into ``dst`` (``method`` one of :data:`METHODS`); returns the settings
    for the manifest.

    ``plan`` (for "int8"): node name -> "gemm" | "block", from :func:`plan_int8` over :func:`calibrate`; nodes it
    does not name get "block" (the safe choice). Without a plan, "int8" means every MatMul is block-wise.
    ``offsets``: the method's block-wise matrices as "scale + min" blocks with float offsets
    (:func:`quantize_offset_blocks`, ``search`` refining each block's fit) instead of integer zero points (int4) or
    symmetric blocks (8 bits); None takes :data:`OFFSETS`'s default for the method."""
    import onnx
    from onnx import helper

    if method not in METHODS:
        raise ValueError(f"unknown quantization method {method!r}")
    keep = tuple(keep_fp32)
    src, dst = Path(src), Path(dst)
    info: dict[str, Any] = {"method": method, "keep_fp32": list(keep), "fp32_bytes": onnx_bytes(src)}
    model = onnx.load(str(src))
    head = lm_head_weight(model)
    # a head tied to the token table (int4, int4-fp32, int8): the table is block-scaled; the head ranks and is
    # rescored (decided before any smoothing scales the head's weight away from the table's values)
    head_node = next((name for name, _, w in weight_matmuls(model) if w == head), None)
    rank_kernel = RANK_KERNEL.get(method, "block")
    rescored = (method in RESCORED_HEADS and head_node is not None and not {"embeddings", "lm_head"} & set(keep)
                and (plan or {}).get(head_node) not in ("gemm", "fp32")  # a head whose own GEMM passes stays plain
                and (rank_kernel != "gemm" or int(np.prod(_initializers(model)[head].dims)) >= GEMM_RANK_MIN_WEIGHTS))
    tied, tie_scale = (_tied_table(model, head) if rescored else None) or (None, 1.0)
    smooth = dict(getattr(plan, "smooth", {})) if method == "int8" else {}
    head_smooth = getattr(plan, "head_smooth", {}).get(head_node) if tied and rank_kernel == "gemm" else None
    if smooth:
        _fold_smoothing(model, smooth)
    if head_smooth is not None:  # the norm before the head absorbs 1 / s; the ranking GEMM's own weights take s
        _fold_smoothing(model, {head_node: head_smooth}, skip_weights={head})
    if method.startswith("int4"):
        bits, block, asym = 4, int4_block, True
    else:
        bits, block, asym = 8, BLOCK_SIZE[8], False
    offsets = OFFSETS.get(method, False) if offsets is None else offsets
    ids = next((i for i in model.graph.input if i.name == "input_ids"), None)
    sums = _BlockSums(rank3=ids is not None and len(ids.type.tensor_type.shape.dim) == 2)
    if method == "int8-gemm":
        kinds = {name: "gemm" for name, _, _ in weight_matmuls(model)}
    elif method == "int8":
        kinds = {name: (plan or {}).get(name, "block") for name, _, _ in weight_matmuls(model)}
    else:
        kinds = dict(plan or {})

    level = 0 if method in FP32_ACTIVATIONS else ACCURACY_LEVEL

    def make(node: Any, w_name: str, w: np.ndarray) -> tuple[list, Any] | None:
        kind = kinds.get(node.name)
        if kind == "fp32":
            return None
        if tied and w_name == head:
            return _rescored_head_nodes(model, node, w_name, w, tied, 3 if sums.rank3 else None, rank_kernel,
                                        head_smooth, tie_scale)
        if kind == "gemm":
            return _gemm_node(node, w_name, w)
        if bits != 8 and (kind == "block8" or (kind is None and w_name == head)):
            # int4 keeps the LM head at 8 bits unless the plan says otherwise: its error lands on the logits
            # directly (SmolLM2-135M-Instruct: +33 % perplexity with a 4-bit head, +24 % with an 8-bit one).
            if level == 0:  # bits=8 has no fast fp32-activation kernel: the same values as two 4-bit halves
                return _split_int8_node(node, w_name, w, level)  # None (left fp32) if K is not whole blocks
            return _nbits_node(node, w_name, w, 8, BLOCK_SIZE[8], False)
        if offsets and w_name != head:
            # never the LM head: its offset term would be a [K/32, vocab] MatMul per token, and a GGUF's head
            # (Q8_0, symmetric) is reproduced exactly by symmetric 8-bit blocks, not by 255-level offset ones
            return _offset_nodes(node, w_name, w, bits, block, sums, search, level)
        return _nbits_node(node, w_name, w, bits, block, asym, level)

    info["matmuls"] = _replace_matmuls(model, keep, make, f"quantize {method}", progress)
    n_gemm = sum(1 for n in model.graph.node if n.op_type == "DynamicQuantizeMatMul")
    ranking = {n.name: n.op_type for n in model.graph.node
               if n.op_type in ("MatMulNBits", "DynamicQuantizeMatMul") and n.output[0].endswith("/rescore/ranked")}
    n_block = sum(1 for n in model.graph.node if n.op_type == "MatMulNBits" and n.name not in ranking
                  and _attr(n, "bits") == bits and not n.input[1].endswith(".q8_split"))
    n_block8 = sum(1 for n in model.graph.node if n.op_type == "MatMulNBits" and bits != 8 and n.name not in ranking
                   and (_attr(n, "bits") == 8 or n.input[1].endswith(".q8_split")))
    n_int8 = n_block8 + sum(1 for op in ranking.values() if op == "MatMulNBits" and RANK_BITS == 8)
    info.update(dtype=f"int{bits}", gemm_matmuls=n_gemm, block_matmuls=n_block)
    if n_block:
        info.update(block_size=block, accuracy_level=level)
    parts = []
    gemm_ranking = sum(1 for op in ranking.values() if op == "DynamicQuantizeMatMul")
    if n_gemm - gemm_ranking:
        parts.append(f"{n_gemm - gemm_ranking} MatMuls int8 per output channel with int8 activations per call "
                     "(DynamicQuantizeMatMul"
                     + (f"; {len(smooth)} of them smoothed into the norm before them)" if smooth else ")"))
    n_offset = sum(1 for n in model.graph.node if n.op_type == "Add" and n.name.endswith("/add_offset"))
    if n_block:
        acts = "activations fp32" if level == 0 else "activations int8 per block"
        kernel = f", blocks of {block} (MatMulNBits; {acts}, accuracy level {level})"
        if n_offset:
            parts.append(f"{n_offset} MatMuls int{bits} as scale + float offset per block (MatMulNBits"
                         f"{' with zero points' if bits == 4 else ''} plus block sums @ offsets){kernel}")
        if n_block > n_offset:
            parts.append(f"{n_block - n_offset} MatMuls int{bits} "
                         f"{'asymmetric (zero points)' if asym and not offsets else 'symmetric'}{kernel}")
        info.update(offsets=bool(offsets), offset_matmuls=n_offset)
    if n_block8:
        split = " as two 4-bit halves over [x, x], activations fp32" if level == 0 else ""
        parts.append(f"{n_block8} MatMuls int8 symmetric, blocks of {BLOCK_SIZE[8]} (MatMulNBits{split})")
    if n_int8:
        info["int8_matmuls"] = n_int8
    if ranking:
        ranked_on = ("int8 per output column (DynamicQuantizeMatMul, activations int8 per call"
                     + ("; smoothed into the final norm)" if head_smooth is not None else ")") if gemm_ranking else
                     f"{RANK_BITS} bits (MatMulNBits, blocks of {BLOCK_SIZE[RANK_BITS]}, activations int8 per block)")
        top = GEMM_RESCORE_TOP if gemm_ranking else RESCORE_TOP
        parts.append(f"the LM head ranks the vocabulary at {ranked_on}; its best {top} tokens per "
                     "position rescored exactly (fp32 activations) from the 8-bit embedding table it is tied to")
        info.update(rescored_top=top, rank_kernel="gemm" if gemm_ranking else "block",
                    rank_smoothed=head_smooth is not None)
        if not gemm_ranking:
            info["rank_bits"] = RANK_BITS
    info["weights"] = "; ".join(parts) or "fp32"
    if method == "int8":
        info["gemm_max_ratio"] = GEMM_MAX_RATIO
        info["block_nodes"] = sorted(name for name, kind in kinds.items() if kind != "gemm" and name not in ranking)
        info["smoothed_nodes"] = sorted(smooth)
    # row scales cost int4-fp32 10 points of agreement; a rescored head reads the block-scaled rows
    exact_tables = BLOCK_SIZE[8] if level == 0 or tied else None
    info["embeddings"] = [] if "embeddings" in keep else _quantize_embeddings(model, block=exact_tables)
    if tied and tied not in info["embeddings"]:  # cannot happen for a table _tied_table accepted; never ship it
        raise RuntimeError(f"the rescored LM head reads {tied}.q8, which was not written")
    if info["embeddings"] and exact_tables:
        info["embedding_block_size"] = exact_tables
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    save_onnx(model, dst)
    info["bytes"] = onnx_bytes(dst)
    return info
