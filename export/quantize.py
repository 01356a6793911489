"""Weight quantization of an exported graph.

Methods (``edgelm export --quantize``):

* ``int8`` (default) -- every weight MatMul becomes onnxruntime's ``DynamicQuantizeMatMul``: int8 weights,
  symmetric, one fp32 scale per output column; the op quantizes its activations to uint8 (one scale per call)
  and runs an int8 GEMM (VNNI where the CPU has it). One byte per weight and no per-block scales, so a decode
  step reads the least; and prefill runs at int8-GEMM speed. Measured against ``int8-block`` on a 2-vCPU EPYC, 1
  thread (docs/performance.md): SmolLM2-135M shape decode 115 -> 167 tokens/s and time to first token (128-token
  prompt) 156 -> 65 ms; the 5.5M default model decodes ~5 % slower (the per-call activation quantization is a
  larger share of a tiny step) and prefills 2x faster. Quality cost on the default model: +0.32 % perplexity
  (block-wise: +0.05 %).
* ``int8-block`` -- ``MatMulNBits`` with bits=8, symmetric, one fp32 scale per block of ``BLOCK_SIZE`` input
  features, ``accuracy_level`` 4 (activations quantized per block inside the kernel): the most accurate int8,
  a little faster decode on very small models, 2-2.5x slower prefill.
* ``int4`` -- MatMulNBits with bits=4 and blocks of 32 (smallest file, largest quality loss).

The token embedding table (a Gather, not a MatMul) is stored int8 with one scale per row and de-quantized
for the gathered rows only, unless ``keep_fp32`` names "embeddings". ``keep_fp32`` "lm_head" leaves the output
projection fp32. Our graphs always carry the LM head as its own [hidden, vocab] initializer (never
Transpose(embedding)), so tied models do not fall into the de-quantize-the-whole-table-per-token trap.
"""
from __future__ import annotations

import os
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
EMBEDDING_WEIGHTS = ("embed_tokens.weight", "wte.weight")


def quantize_blocks(w: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric block-wise quantization of a MatMul weight ``w`` [K, N] into MatMulNBits' layout.

    Returns (B uint8 [N, n_blocks, block * bits / 8], scales float32 [N * n_blocks]). No zero points are
    stored: MatMulNBits then uses 2**(bits-1) (128 for int8, 8 for int4), i.e. w ~= (q - 2**(bits-1)) * scale.
    K is zero-padded up to a multiple of ``block``.
    """
    k, n = w.shape
    n_blocks = -(-k // block)
    pad = n_blocks * block - k
    wt = np.ascontiguousarray(w.T.astype(np.float32))  # [N, K]
    if pad:
        wt = np.concatenate([wt, np.zeros((n, pad), np.float32)], axis=1)
    wb = wt.reshape(n, n_blocks, block)
    qmax = 2 ** (bits - 1) - 1  # 127 / 7: symmetric, so -qmax..qmax
    amax = np.abs(wb).max(axis=-1, keepdims=True)
    scale = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
    q = np.clip(np.rint(wb / scale), -qmax, qmax).astype(np.int32) + 2 ** (bits - 1)
    q = q.astype(np.uint8)
    if bits == 4:  # two values per byte, the first in the low nibble
        q = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    return np.ascontiguousarray(q), scale.reshape(-1)


def dequantize_blocks(b: np.ndarray, scales: np.ndarray, bits: int, k: int) -> np.ndarray:
    """Inverse of :func:`quantize_blocks` (used by tests and the error report): returns w [K, N]."""
    n, n_blocks, _ = b.shape
    if bits == 4:
        q = np.stack([b & 0x0F, b >> 4], axis=-1).reshape(n, n_blocks, -1)
    else:
        q = b
    w = (q.astype(np.float32) - 2 ** (bits - 1)) * scales.reshape(n, n_blocks, 1)
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


def _replace_matmuls(model: Any, keep: Iterable[str], make: Any, desc: str, progress: bool = False) -> int:
    """Swap every MatMul with a 2-D initializer weight (used by that node only) for a quantized node, in place.

    ``make(node, w_name, w)`` (w the fp32 [K, N] array) returns (new initializers, new node). "lm_head" in ``keep``
    leaves the LM head alone. Returns how many MatMuls were replaced."""
    from onnx import numpy_helper
    from tqdm.auto import tqdm

    keep = set(keep)
    inits = _initializers(model)
    uses = _consumers(model)
    new_nodes, drop = [], set()
    for node in tqdm(list(model.graph.node), desc=desc, unit="node", disable=not progress, leave=False):
        w_name = node.input[1] if node.op_type == "MatMul" and len(node.input) == 2 else None
        w = inits.get(w_name) if w_name else None
        if (w is None or len(w.dims) != 2 or uses.get(w_name, 0) != 1
                or ("lm_head" in keep and w_name == LM_HEAD_WEIGHT)):
            new_nodes.append(node)
            continue
        tensors, replacement = make(node, w_name, numpy_helper.to_array(w))
        model.graph.initializer.extend(tensors)
        new_nodes.append(replacement)
        drop.add(w_name)
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    _drop_initializers(model, drop)
    return len(drop)


def _block_wise(model: Any, bits: int, keep: Iterable[str], progress: bool = False) -> dict[str, Any]:
    """MatMul -> MatMulNBits (``bits``, blocks of BLOCK_SIZE[bits]); returns what was done."""
    from onnx import helper, numpy_helper

    block = BLOCK_SIZE[bits]

    def make(node: Any, w_name: str, w: np.ndarray) -> tuple[list, Any]:
        k, n = w.shape
        b, scales = quantize_blocks(w, bits, block)
        b_name, s_name = f"{w_name}.q{bits}", f"{w_name}.scales"
        return ([numpy_helper.from_array(b, b_name), numpy_helper.from_array(scales, s_name)],
                helper.make_node("MatMulNBits", [node.input[0], b_name, s_name], list(node.output), name=node.name,
                                 domain="com.microsoft", K=k, N=n, bits=bits, block_size=block,
                                 accuracy_level=ACCURACY_LEVEL))

    done = _replace_matmuls(model, keep, make, f"quantize int{bits}", progress)
    return {"matmuls": done, "block_size": block, "accuracy_level": ACCURACY_LEVEL}


def quantize_columns(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel int8 of a MatMul weight ``w`` [K, N]: (q int8 [K, N], scales float32 [N]),
    w ~= q * scale. -127..127, so the int8 range is symmetric and no zero point is stored."""
    w = np.asarray(w, dtype=np.float32)
    amax = np.abs(w).max(axis=0)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return np.ascontiguousarray(q), scale


def _per_channel(model: Any, keep: Iterable[str], progress: bool = False) -> dict[str, Any]:
    """MatMul -> DynamicQuantizeMatMul (int8 weights with one scale per output column; the op quantizes the
    activations to uint8 on each call); returns what was done."""
    from onnx import helper, numpy_helper

    def make(node: Any, w_name: str, w: np.ndarray) -> tuple[list, Any]:
        q, scales = quantize_columns(w)
        q_name, s_name = f"{w_name}.q8c", f"{w_name}.col_scales"
        return ([numpy_helper.from_array(q, q_name), numpy_helper.from_array(scales, s_name)],
                helper.make_node("DynamicQuantizeMatMul", [node.input[0], q_name, s_name], list(node.output),
                                 name=node.name, domain="com.microsoft"))

    return {"matmuls": _replace_matmuls(model, keep, make, "quantize int8", progress)}


def _quantize_embeddings(model: Any) -> list[str]:
    """int8 embedding rows with a per-row scale: Gather(q) -> Cast -> Mul(Gather(scale)). Returns tables done."""
    from onnx import TensorProto, helper, numpy_helper

    inits = _initializers(model)
    new_nodes, drop, done = [], set(), []
    for node in model.graph.node:
        table = node.input[0] if node.op_type == "Gather" else None
        if table not in EMBEDDING_WEIGHTS or table not in inits:
            new_nodes.append(node)
            continue
        arr = numpy_helper.to_array(inits[table])
        amax = np.abs(arr).max(axis=1, keepdims=True)
        scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
        q = np.clip(np.rint(arr / scale), -127, 127).astype(np.int8)
        q_name, s_name = f"{table}.q8", f"{table}.row_scales"
        model.graph.initializer.extend([numpy_helper.from_array(q, q_name), numpy_helper.from_array(scale, s_name)])
        ids, out = node.input[1], node.output[0]
        rows = helper.make_node("Gather", [q_name, ids], [f"{out}/q_rows"], name=f"{node.name}/q_rows", axis=0)
        cast = helper.make_node("Cast", [f"{out}/q_rows"], [f"{out}/rows"], name=f"{node.name}/cast", to=TensorProto.FLOAT)
        sc = helper.make_node("Gather", [s_name, ids], [f"{out}/scales"], name=f"{node.name}/scales", axis=0)
        mul = helper.make_node("Mul", [f"{out}/rows", f"{out}/scales"], [out], name=f"{node.name}/dequant")
        new_nodes += [rows, cast, sc, mul]
        drop.add(table)
        done.append(table)
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    _drop_initializers(model, drop)
    return done


def _drop_initializers(model: Any, names: set[str]) -> None:
    keep = [t for t in model.graph.initializer if t.name not in names]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


METHODS = ("int8", "int8-block", "int4")


def quantize_model(src: str | os.PathLike, dst: str | os.PathLike, *, method: str = "int8",
                   keep_fp32: Iterable[str] = (), progress: bool = False) -> dict[str, Any]:
    """Quantize the fp32 graph at ``src`` into ``dst`` (``method`` one of :data:`METHODS`); returns the settings
    for the manifest."""
    import onnx
    from onnx import helper

    if method not in METHODS:
        raise ValueError(f"unknown quantization method {method!r}")
    keep = tuple(keep_fp32)
    src, dst = Path(src), Path(dst)
    info: dict[str, Any] = {"method": method, "keep_fp32": list(keep), "fp32_bytes": onnx_bytes(src)}
    model = onnx.load(str(src))
    if method == "int8":
        info.update(_per_channel(model, keep, progress), dtype="int8",
                    weights="int8 symmetric, one scale per output channel; activations int8 per call "
                            "(DynamicQuantizeMatMul)")
    else:
        bits = 8 if method == "int8-block" else 4
        info.update(_block_wise(model, bits, keep, progress), dtype=f"int{bits}")
        info["weights"] = (f"int{bits} symmetric, blocks of {info['block_size']} (MatMulNBits); activations int8 "
                           f"per block (accuracy level {ACCURACY_LEVEL})")
    info["embeddings"] = [] if "embeddings" in keep else _quantize_embeddings(model)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    save_onnx(model, dst)
    info["bytes"] = onnx_bytes(dst)
    return info
