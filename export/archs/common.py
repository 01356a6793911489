"""Shared pieces of the hand-written decoder graphs (see docs/export.md for why we build graphs ourselves).

The two builders (decoder.py for every rotary family, gpt2.py) walk a Hugging Face module tree and call the
helpers here, so the I/O contract of docs/model-format.md (``kv_cache: "concat"``) lives in exactly one place:

    input_ids [B, S] int64, attention_mask [B, P+S] int64, position_ids [B, S] int64,
    past_key_values.{i}.key/.value [B, Hkv, P, D] float32, optional logits_from [1] int64 (default 0)
    -> logits [B, S - logits_from or -logits_from, V] float32, present.{i}.key/.value [B, Hkv, P+S, D] float32,
       last_logprobs [B, 1, V] float32 (log-softmax of the last position)

The attention of this "concat" graph uses only standard ONNX ops (opset 17), so it works for any head size;
onnxruntime's own optimiser fuses the RMSNorm / MatMul+Add patterns at load time. onnxruntime contrib ops
(com.microsoft, in every CPU build) are used where they pay: FastGelu for GELU-tanh,
SkipSimplifiedLayerNormalization for the residual Add + RMSNorm pairs of the RMSNorm families, and
GroupQueryAttention with a "shared" cache buffer wherever it reproduces the model (the end of this module;
docs/model-format.md).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
# A large finite negative number for masked attention scores: finite so a fully masked row (a left-pad query)
# gives a uniform softmax instead of NaN; large enough that exp() of it is exactly 0 in fp32.
MASK_VALUE = -1e9


@dataclass
class DecoderShape:
    """The numbers the runtime needs to drive the graph (they go into the folder's config.json)."""

    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    context_length: int
    # The cache layout of the built graph (docs/model-format.md): "concat" (standard ops, any head size) or
    # "shared" (onnxruntime's fused GroupQueryAttention over one preallocated buffer per layer).
    kv_cache: str = "concat"
    # Head width of the cache tensors in a "shared" graph (head_dim padded to a multiple of 16); 0 = head_dim.
    cache_head_dim: int = 0
    # The oldest onnxruntime that runs this graph as built (None: any the runtime supports). A "shared" graph with
    # sliding windows needs GQA_WINDOW_ONNXRUNTIME: older kernels read the window attribute one key wider, so the
    # folder must say so and the runtime refuse an older onnxruntime.
    min_onnxruntime: str | None = None


class GraphBuilder:
    """A tiny append-only helper around onnx.helper: unique names, initializers, node lists."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._names: set[str] = set()
        self._consts: dict[tuple, str] = {}

    def _unique(self, base: str) -> str:
        name, i = base, 1
        while name in self._names:
            name = f"{base}_{i}"
            i += 1
        self._names.add(name)
        return name

    def weight(self, name: str, array: Any, dtype=np.float32) -> str:
        """Add an initializer (a weight); torch tensors are converted to contiguous numpy arrays."""
        if hasattr(array, "detach"):
            array = array.detach().cpu().numpy()
        arr = np.ascontiguousarray(np.asarray(array, dtype=dtype))
        name = self._unique(name)
        self.initializers.append(numpy_helper.from_array(arr, name))
        return name

    def const(self, values: Sequence | np.ndarray | float, dtype=np.int64) -> str:
        """A small constant, shared between all nodes that use the same value."""
        arr = np.asarray(values, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.weight(f"const_{len(self._consts)}", arr, dtype)
        return self._consts[key]

    def op(self, op_type: str, inputs: Sequence[str], *, name: str | None = None, outputs: int = 1,
           domain: str = "", output_name: str | None = None, **attrs) -> Any:
        """Append one node and return its output name (or a list when ``outputs > 1``).

        ``output_name`` gives the (single) output a fixed name, e.g. a graph output of the I/O contract."""
        base = self._unique(name or op_type.lower())
        outs = [base] if outputs == 1 else [self._unique(f"{base}_out{i}") for i in range(outputs)]
        if output_name is not None:
            self._names.add(output_name)
            outs = [output_name]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=base, domain=domain or None, **attrs))
        return outs[0] if outputs == 1 else outs

    def add_input(self, name: str, elem_type: int, shape: Sequence) -> str:
        self._names.add(name)
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    def add_output(self, name: str, elem_type: int, shape: Sequence) -> None:
        """Declare a graph output; the node producing it was created with ``output_name=name``."""
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))

    def model(self, graph_name: str, doc: str = "") -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, graph_name, self.inputs, self.outputs, self.initializers,
                                  doc_string=doc)
        opsets = [helper.make_opsetid("", OPSET)]
        if any(n.domain == "com.microsoft" for n in self.nodes):  # onnxruntime's contrib ops (fused attention)
            opsets.append(helper.make_opsetid("com.microsoft", 1))
        model = helper.make_model(graph, opset_imports=opsets, producer_name="edgelm-export")
        model.ir_version = 8  # readable by every onnxruntime >= 1.14
        return model


# --- graph I/O and masks -------------------------------------------------------------------------------------
@dataclass
class DecoderIO:
    """Names of the shared per-step values that every layer uses."""

    input_ids: str
    attention_mask: str
    position_ids: str
    past: list[tuple[str, str]]
    bias: dict[Any, str] = field(default_factory=dict)  # (sliding window or None, n_rep) -> additive mask


def declare_io(gb: GraphBuilder, shape: DecoderShape) -> DecoderIO:
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    ids = gb.add_input("input_ids", i64, ["batch", "seq"])
    mask = gb.add_input("attention_mask", i64, ["batch", "total"])
    pos = gb.add_input("position_ids", i64, ["batch", "seq"])
    past = []
    for i in range(shape.num_layers):
        k = gb.add_input(f"past_key_values.{i}.key", f32, ["batch", shape.num_kv_heads, "past", shape.head_dim])
        v = gb.add_input(f"past_key_values.{i}.value", f32, ["batch", shape.num_kv_heads, "past", shape.head_dim])
        past.append((k, v))
    return DecoderIO(ids, mask, pos, past)


def attention_bias(gb: GraphBuilder, io: DecoderIO, sliding_window: int | None = None, n_rep: int = 1) -> str:
    """Additive mask [B, 1, n_rep*S, T] (0 = may attend, MASK_VALUE = may not), built once per graph.

    New token j sits at slot P + j (P = T - S past slots). It may see slot t when t <= P + j (causal),
    attention_mask[b, t] == 1 (not padding) and, with a sliding window W, t > P + j - W (Hugging Face's rule).
    With grouped-query attention the [S, T] mask is tiled n_rep times along the rows, matching the grouped
    score layout of :func:`attention` (row r*S + j = query j of the r-th head sharing a KV head).
    """
    key = (sliding_window, n_rep)
    if key in io.bias:
        return io.bias[key]
    if n_rep > 1:
        base = attention_bias(gb, io, sliding_window, 1)
        io.bias[key] = gb.op("Tile", [base, gb.const([1, 1, n_rep, 1])], name=f"attn_bias_x{n_rep}")
        return io.bias[key]
    total = gb.op("Gather", [gb.op("Shape", [io.attention_mask]), gb.const(1)], name="total_len")
    seq = gb.op("Gather", [gb.op("Shape", [io.input_ids]), gb.const(1)], name="seq_len")
    past = gb.op("Sub", [total, seq], name="past_len")
    rows = gb.op("Unsqueeze", [gb.op("Range", [past, total, gb.const(1)], name="q_slots"), gb.const([1])])  # [S,1]
    cols = gb.op("Range", [gb.const(0), total, gb.const(1)], name="kv_slots")  # [T]
    allowed = gb.op("LessOrEqual", [cols, rows], name="causal")  # [S, T]
    if sliding_window is not None:
        lower = gb.op("Sub", [rows, gb.const(sliding_window)])
        allowed = gb.op("And", [allowed, gb.op("Greater", [cols, lower])], name="sliding")
    pad = gb.op("Equal", [io.attention_mask, gb.const(1)], name="not_padding")  # [B, T]
    pad = gb.op("Unsqueeze", [pad, gb.const([1, 2])])  # [B, 1, 1, T]
    allowed = gb.op("And", [pad, allowed])  # [B, 1, S, T]
    bias = gb.op("Where", [allowed, gb.const(0.0, np.float32), gb.const(MASK_VALUE, np.float32)],
                 name="attn_bias" if sliding_window is None else f"attn_bias_sw{sliding_window}")
    io.bias[key] = bias
    return bias


# --- building blocks -------------------------------------------------------------------------------------------
def linear(gb: GraphBuilder, x: str, weight_in_out: Any, bias: Any | None, name: str) -> str:
    """x @ W (+ b). ``weight_in_out`` is [in, out] (an nn.Linear weight transposed, or a GPT-2 Conv1D weight)."""
    y = gb.op("MatMul", [x, gb.weight(f"{name}.weight", weight_in_out)], name=f"{name}/MatMul")
    if bias is not None:
        y = gb.op("Add", [y, gb.weight(f"{name}.bias", bias)], name=f"{name}/Add")
    return y


def rms_norm(gb: GraphBuilder, x: str, weight: Any, eps: float, name: str) -> str:
    """x / sqrt(mean(x^2) + eps) * w, spelled the way onnxruntime's SimplifiedLayerNorm fusion expects."""
    sq = gb.op("Pow", [x, gb.const(2.0, np.float32)], name=f"{name}/Pow")
    mean = gb.op("ReduceMean", [sq], name=f"{name}/ReduceMean", axes=[-1], keepdims=1)
    std = gb.op("Sqrt", [gb.op("Add", [mean, gb.const(eps, np.float32)], name=f"{name}/AddEps")], name=f"{name}/Sqrt")
    y = gb.op("Div", [x, std], name=f"{name}/Div")
    return gb.op("Mul", [y, gb.weight(f"{name}.weight", weight)], name=f"{name}/Mul")


def skip_rms_norm(gb: GraphBuilder, x: str, residual: str, weight: Any, eps: float, name: str) -> tuple[str, str]:
    """(rms_norm(residual + x), residual + x) as one SkipSimplifiedLayerNormalization (com.microsoft) node.

    onnxruntime fuses the plain RMSNorm pattern by itself but not the residual Add in front of it; spelling the
    pair as one node saves a kernel launch per norm on every decode step."""
    normed, total = gb.op("SkipSimplifiedLayerNormalization", [x, residual, gb.weight(f"{name}.weight", weight)],
                          outputs=4, domain="com.microsoft", name=f"{name}/SkipSimplifiedLayerNorm",
                          epsilon=float(eps))[::3]
    node = gb.nodes[-1]
    node.output[1] = node.output[2] = ""  # mean and inv_std_var are not needed
    return normed, total


def layer_norm(gb: GraphBuilder, x: str, weight: Any, bias: Any, eps: float, name: str) -> str:
    return gb.op("LayerNormalization", [x, gb.weight(f"{name}.weight", weight), gb.weight(f"{name}.bias", bias)],
                 name=name, axis=-1, epsilon=float(eps))


def silu(gb: GraphBuilder, x: str, name: str) -> str:
    return gb.op("Mul", [x, gb.op("Sigmoid", [x], name=f"{name}/Sigmoid")], name=f"{name}/Mul")


def gelu_tanh(gb: GraphBuilder, x: str, name: str) -> str:
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) -- GPT-2's "gelu_new", Gemma's "gelu_pytorch_tanh" -- as one
    FastGelu (com.microsoft, in every CPU build). Spelled out in standard ops it stays 9 nodes: onnxruntime 1.32's
    load-time optimiser fused none of the usual spellings (Mul or Pow cube, either operand order) when we tried."""
    return gb.op("FastGelu", [x], domain="com.microsoft", name=f"{name}/FastGelu")


@dataclass
class Rotary:
    """Rotary tables gathered once per graph by position_ids -> [B, S, 1, D], and rotate_half as a matrix."""

    cos: str
    sin: str
    rotate_half: str


def rotary_tables(gb: GraphBuilder, io: DecoderIO, cos: np.ndarray, sin: np.ndarray, head_dim: int) -> Rotary:
    """``cos``/``sin`` [ctx, rot_dim] from the model's rotary module; rot_dim < head_dim is partial rotary.

    The tables are widened to head_dim (cos 1, sin 0 on the pass-through features) and rotate_half becomes a
    constant [D, D] signed permutation R (x @ R = cat(-x2, x1) on the rotary features, 0 elsewhere), so
    rotary is 4 nodes for q and k together: x * cos + (x @ R) * sin.
    """
    ctx, rot_dim = cos.shape
    half = rot_dim // 2
    cos_full = np.ones((ctx, head_dim), np.float32)
    sin_full = np.zeros((ctx, head_dim), np.float32)
    cos_full[:, :rot_dim], sin_full[:, :rot_dim] = cos, sin
    r = np.zeros((head_dim, head_dim), np.float32)
    for i in range(half):
        r[i + half, i] = -1.0  # out[i] = -x[i + half]
        r[i, i + half] = 1.0   # out[i + half] = x[i]
    cos_t, sin_t = gb.weight("rotary.cos", cos_full), gb.weight("rotary.sin", sin_full)
    c = gb.op("Unsqueeze", [gb.op("Gather", [cos_t, io.position_ids], axis=0), gb.const([2])], name="rotary/cos")
    s = gb.op("Unsqueeze", [gb.op("Gather", [sin_t, io.position_ids], axis=0), gb.const([2])], name="rotary/sin")
    return Rotary(c, s, gb.weight("rotary.rotate_half", r))


def fold_query_scale(w: np.ndarray, b: np.ndarray | None, q_width: int, scale: float
                     ) -> tuple[np.ndarray, np.ndarray | None]:
    """Multiply the query columns of a fused [in, q|k|v] projection by the attention scale at build time.

    Rotary is linear, so scaling q before it equals scaling the scores after q.k: one Mul per layer saved."""
    w = np.array(w, dtype=np.float32, copy=True)
    w[:, :q_width] *= scale
    if b is not None:
        b = np.array(b, dtype=np.float32, copy=True)
        b[:q_width] *= scale
    return w, b


@dataclass
class HeadNorm:
    """RMSNorm over each query and key head before rotary (Qwen3, Gemma 3): one [Hq + Hkv, D] weight for the
    q heads then the k heads (the query part may carry the attention scale, see :func:`head_norm_weight`)."""

    weight: np.ndarray
    eps: float


def head_norm_op(gb: GraphBuilder, x: str, norm: HeadNorm, name: str) -> str:
    """RMSNorm over the last axis of heads [..., H, D] with one weight row per head: a weight-free RMSNorm
    (onnxruntime fuses it into one SimplifiedLayerNormalization; with a [H, D] weight it fuses nothing and
    stays 6 nodes) times the [H, D] weight."""
    y = rms_norm(gb, x, np.ones(norm.weight.shape[-1], np.float32), norm.eps, name)
    return gb.op("Mul", [y, gb.weight(f"{name}.head_weight", norm.weight)], name=f"{name}/head_weight")


def head_norm_weight(q_weight: np.ndarray, k_weight: np.ndarray, hq: int, hkv: int, scale: float) -> np.ndarray:
    """[Hq + Hkv, D]: the q norm's weight times the attention scale on the query rows, the k norm's below.

    The scale cannot be folded into the q projection (the norm would undo it); after the norm it is a plain
    factor that rotary (linear) carries through to the scores."""
    q = np.asarray(q_weight, np.float32) * np.float32(scale)
    return np.concatenate([np.broadcast_to(q, (hq, q.shape[-1])),
                           np.broadcast_to(np.asarray(k_weight, np.float32), (hkv, q.shape[-1]))]).copy()


def soft_cap(gb: GraphBuilder, x: str, cap: float | None, name: str, output_name: str | None = None) -> str:
    """cap * tanh(x / cap) (Gemma's logit soft-capping); ``x`` unchanged when ``cap`` is None."""
    if not cap:
        return x
    t = gb.op("Tanh", [gb.op("Div", [x, gb.const(float(cap), np.float32)], name=f"{name}/Div")], name=f"{name}/Tanh")
    return gb.op("Mul", [t, gb.const(float(cap), np.float32)], name=f"{name}/Mul", output_name=output_name)


def attention(gb: GraphBuilder, io: DecoderIO, shape: DecoderShape, layer: int, qkv: str, *, rotary: Rotary | None,
              bias: str, head_norm: HeadNorm | None = None, softcap: float | None = None) -> str:
    """Multi-head attention with a concat KV cache, from the fused projection qkv = [B, S, (Hq + 2 Hkv) D]
    whose query part is already scaled (:func:`fold_query_scale`, or the ``head_norm`` weight).

    Grouped-query attention without copying the cache: the Hq query heads are regrouped as [B, Hkv, n_rep*S, D]
    (query head h uses KV head h // n_rep, as in Hugging Face's repeat_kv), so each KV head is read once and
    ``bias`` comes pre-tiled to that layout. ``rotary`` None is a layer without position embedding (SmolLM3's
    NoPE layers); ``softcap`` caps the scores before the mask. Returns the attention output [B, S, Hq*D] (before
    the output projection) and produces the present.{layer}.key/value outputs.
    """
    hq, hkv, d = shape.num_attention_heads, shape.num_kv_heads, shape.head_dim
    n_rep = hq // hkv
    p = f"layers.{layer}.attn"
    heads = gb.op("Reshape", [qkv, gb.const([0, 0, hq + 2 * hkv, d])], name=f"{p}/heads")  # [B, S, Ht, D]
    qk, v = gb.op("Split", [heads, gb.const([hq + hkv, hkv])], outputs=2, axis=2, name=f"{p}/split_v")
    if head_norm is not None:
        qk = head_norm_op(gb, qk, head_norm, f"{p}.qk_norm")
    if rotary is not None:  # q and k together; keys are cached after rotary
        rot = gb.op("MatMul", [qk, rotary.rotate_half], name=f"{p}/rotate_half")
        qk = gb.op("Add", [gb.op("Mul", [qk, rotary.cos], name=f"{p}/rope_cos"),
                           gb.op("Mul", [rot, rotary.sin], name=f"{p}/rope_sin")], name=f"{p}/rope")
    q, k = gb.op("Split", [qk, gb.const([hq, hkv])], outputs=2, axis=2, name=f"{p}/split_qk")
    q = gb.op("Transpose", [q], perm=[0, 2, 1, 3], name=f"{p}/q_transpose")  # [B, Hq, S, D]
    k = gb.op("Transpose", [k], perm=[0, 2, 1, 3], name=f"{p}/k_transpose")
    v = gb.op("Transpose", [v], perm=[0, 2, 1, 3], name=f"{p}/v_transpose")
    past_k, past_v = io.past[layer]
    k = gb.op("Concat", [past_k, k], axis=2, name=f"{p}/k_cache", output_name=f"present.{layer}.key")
    v = gb.op("Concat", [past_v, v], axis=2, name=f"{p}/v_cache", output_name=f"present.{layer}.value")
    gb.add_output(k, TensorProto.FLOAT, ["batch", hkv, "total", d])
    gb.add_output(v, TensorProto.FLOAT, ["batch", hkv, "total", d])

    if n_rep > 1:
        q = gb.op("Reshape", [q, gb.const([0, hkv, -1, d])], name=f"{p}/q_group")  # [B, Hkv, n_rep*S, D]
    kt = gb.op("Transpose", [k], perm=[0, 1, 3, 2], name=f"{p}/k_t")  # fused into the MatMul by onnxruntime
    scores = soft_cap(gb, gb.op("MatMul", [q, kt], name=f"{p}/qk"), softcap, f"{p}/softcap")  # [B, Hkv, n_rep*S, T]
    probs = gb.op("Softmax", [gb.op("Add", [scores, bias], name=f"{p}/mask")], axis=-1, name=f"{p}/softmax")
    ctx = gb.op("MatMul", [probs, v], name=f"{p}/pv")  # [B, Hkv, n_rep*S, D]
    if n_rep > 1:
        ctx = gb.op("Reshape", [ctx, gb.const([0, hq, -1, d])], name=f"{p}/ctx_ungroup")
    ctx = gb.op("Transpose", [ctx], perm=[0, 2, 1, 3], name=f"{p}/ctx_transpose")  # [B, S, Hq, D]
    return gb.op("Reshape", [ctx, gb.const([0, 0, hq * d])], name=f"{p}/ctx_merge")


def lm_head_and_logits(gb: GraphBuilder, x: str, weight_out_in: Any, bias: Any | None, shape: DecoderShape,
                       softcap: float | None = None) -> None:
    """The LM head is always its own [hidden, vocab] initializer, even with tied embeddings; ``softcap`` is
    Gemma's final logit soft-capping (cap * tanh(logits / cap)).

    Why: a tied head spelled as Transpose(embedding) makes quantizers keep it fp32 and transpose the whole table
    on every token (shared/notes/performance.md measured ~3x slower decode on a 135M model).
    """
    w = weight_out_in.detach().cpu().numpy().T if hasattr(weight_out_in, "detach") else np.asarray(weight_out_in).T
    # `logits_from` [1] int64, an input with a default (an initializer of the same name): the first position
    # that gets logits, negative counting from the end. Default 0, every position (scoring, verification); the
    # runtime feeds -1 for a generation's prefill, which then skips the LM head for all but the last prompt
    # position (SmolLM2-135M shape, 128-token prompt: 128 x 576 x 49,152 multiply-adds and a 25 MB output).
    start = gb.add_input("logits_from", TensorProto.INT64, [1])
    gb.initializers.append(numpy_helper.from_array(np.zeros(1, np.int64), start))
    x = gb.op("Slice", [x, start, gb.const([np.iinfo(np.int64).max]), gb.const([1])], name="lm_head/positions")
    last = None if (bias is not None or softcap) else "logits"
    y = gb.op("MatMul", [x, gb.weight("lm_head.weight", w)], name="lm_head/MatMul", output_name=last)
    if bias is not None:
        last = None if softcap else "logits"
        y = gb.op("Add", [y, gb.weight("lm_head.bias", bias)], name="lm_head/Add", output_name=last)
    if softcap:
        soft_cap(gb, y, softcap, "lm_head/softcap", output_name="logits")
    gb.add_output("logits", TensorProto.FLOAT, ["batch", "seq", shape.vocab_size])
    # `last_logprobs` [B, 1, V]: log-softmax of the last position's logits. The decode loop reads the chosen
    # token's log-probability from it instead of a log-sum-exp over the vocabulary in numpy, which after a step
    # has streamed the weights through the caches reads cold memory: 85 -> 15 microseconds of Python per token
    # on a 49,152-token vocabulary, for ~7 microseconds more inside onnxruntime.
    last = gb.op("Slice", ["logits", gb.const([-1]), gb.const([np.iinfo(np.int64).max]), gb.const([1])],
                 name="lm_head/last_position")
    gb.op("LogSoftmax", [last], axis=-1, name="lm_head/log_softmax", output_name="last_logprobs")
    gb.add_output("last_logprobs", TensorProto.FLOAT, ["batch", 1, shape.vocab_size])


def t(weight: Any) -> np.ndarray:
    """An nn.Linear weight [out, in] as a MatMul operand [in, out]."""
    return weight.detach().cpu().numpy().T


def cat_linear(mods: Sequence[Any]) -> tuple[np.ndarray, np.ndarray | None]:
    """Fuse several nn.Linear layers that read the same input into one [in, sum(out)] MatMul (+ bias)."""
    w = np.concatenate([t(m.weight) for m in mods], axis=1)
    biases = [m.bias for m in mods]
    if all(b is None for b in biases):
        return w, None
    b = np.concatenate([np.zeros(m.weight.shape[0], np.float32) if m.bias is None else m.bias.detach().cpu().numpy()
                        for m in mods])
    return w, b


# --- the "shared" layout: onnxruntime's fused GroupQueryAttention ----------------------------------------------
# onnxruntime's CPU GroupQueryAttention kernel (com.microsoft domain) does rotary, the causal mask, grouped
# heads and the cache update in one node, and when a layer's past and present are the same buffer (the runtime
# binds one preallocated [B, Hkv, context, D] OrtValue to both) it writes the new keys/values in place: no
# per-step Concat copy of the cache and no allocation. Measured numbers: docs/export.md.
GQA_HEAD_MULTIPLE = 16  # the CPU kernel refuses other head sizes ("head_size shall be a multiple of 16")


# GroupQueryAttention's local_window_size changed meaning in onnxruntime 1.24 (measured on the CPU kernel with
# one node against Hugging Face's rule, keys p - W + 1 .. p for a query at p): 1.20.1 and 1.23.2 let a query see
# local_window_size + 1 keys (so W - 1 would be needed), 1.24.1, 1.25.1, 1.26.0 and 1.32.0 exactly
# local_window_size keys (W). Graphs are built for the newer meaning and need at least this version.
GQA_WINDOW_ONNXRUNTIME = "1.24"


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split("+")[0].split(".")[:2])


def gqa_windows_supported() -> bool:
    """Whether the onnxruntime installed here (which verifies the export) has the window meaning we build for."""
    import onnxruntime

    return _version(onnxruntime.__version__) >= _version(GQA_WINDOW_ONNXRUNTIME)


def shared_kv_supported(shape: DecoderShape, cos: np.ndarray | None, sin: np.ndarray | None,
                        windows: Sequence[int | None]) -> bool:
    """Whether the fused graph reproduces this model exactly; otherwise the plain "concat" graph is built.

    Needs rotary in Hugging Face's non-interleaved layout (the table's halves repeat: cat(freqs, freqs), which
    GroupQueryAttention's half-width caches assume), full or partial (``cos`` None: a layer without rotary).
    Any head size works: heads are padded to a multiple of 16 (:func:`cache_head_layout`). Sliding windows are
    the kernel's ``local_window_size`` = W: a query at position p then sees keys p - W + 1 .. p,
    Hugging Face's rule (measured equal at prefill, chunked prefill and decode, with separate and with shared
    buffers), on onnxruntime >= GQA_WINDOW_ONNXRUNTIME only; with an older one here, windowed models get "concat".
    """
    if shape.num_attention_heads % shape.num_kv_heads:
        return False
    if any(w is not None for w in windows) and not (all(w is None or w >= 1 for w in windows)
                                                   and gqa_windows_supported()):
        return False
    if cos is None:
        return True
    rot = cos.shape[1]
    if rot % 2 or rot > shape.head_dim:
        return False
    half = rot // 2
    return bool(np.array_equal(cos[:, :half], cos[:, half:]) and np.array_equal(sin[:, :half], sin[:, half:]))


def cache_head_layout(head_dim: int, rot_dim: int) -> tuple[int, np.ndarray]:
    """(width, slot): where each of a head's ``head_dim`` features sits in the fused kernel's head of ``width``.

    The kernel needs a head size that is a multiple of 16 and rotates feature i with feature i + width/2 over the
    first rotary_dim/2 pairs (rotary_dim a multiple of 16 too). Padding a head with zero features changes no dot
    product, so a head of 8 (stories260K) or a partial-rotary head is laid out in a width-16k head: the rotated
    halves x1 / x2 go to slots 0.. and width/2.., the pass-through features fill the remaining slots, whose rotary
    table entries are cos 1 / sin 0. With a head size that is already a multiple of 16 and full rotary, this is
    the identity and nothing is padded.
    """
    width = -(-head_dim // GQA_HEAD_MULTIPLE) * GQA_HEAD_MULTIPLE
    half, r = width // 2, rot_dim // 2
    slot = np.empty(head_dim, np.int64)
    slot[:r] = np.arange(r)
    slot[r:rot_dim] = half + np.arange(r)
    free = [i for i in range(width) if not (i < r or half <= i < half + r)]
    slot[rot_dim:] = free[:head_dim - rot_dim]
    return width, slot


def spread_heads(w: Any, n_heads: int, head_dim: int, width: int, slot: np.ndarray, axis: int) -> np.ndarray:
    """Re-lay the per-head features along ``axis`` of ``w`` (n_heads * head_dim long) into heads of ``width``
    at ``slot`` (:func:`cache_head_layout`), zeros elsewhere: for the q/k/v columns and the o_proj rows."""
    w = np.moveaxis(np.asarray(w, dtype=np.float32), axis, 0)
    rest = w.shape[1:]
    out = np.zeros((n_heads, width, *rest), np.float32)
    out[:, slot] = w.reshape(n_heads, head_dim, *rest)
    return np.ascontiguousarray(np.moveaxis(out.reshape(n_heads * width, *rest), 0, axis))


@dataclass
class SharedKV:
    """Per-graph values every fused attention node reads."""

    seqlens_k: str      # [B] int32: valid cache slots after this call, minus one
    total_len: str      # scalar int32: past + new slots


def declare_io_shared(gb: GraphBuilder, shape: DecoderShape) -> DecoderIO:
    """Inputs of the "shared" layout: no position_ids (positions follow from the mask), caches of buffer length.

    ``past_key_values.{i}.*`` are [B, Hkv, buffer, D]: the runtime binds the same buffer (buffer = context
    length) as the ``present.{i}.*`` output, and the graph reads the first past slots and writes the new ones.
    """
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    ids = gb.add_input("input_ids", i64, ["batch", "seq"])
    mask = gb.add_input("attention_mask", i64, ["batch", "total"])
    past = []
    d = shape.cache_head_dim or shape.head_dim
    for i in range(shape.num_layers):
        k = gb.add_input(f"past_key_values.{i}.key", f32, ["batch", shape.num_kv_heads, "buffer", d])
        v = gb.add_input(f"past_key_values.{i}.value", f32, ["batch", shape.num_kv_heads, "buffer", d])
        past.append((k, v))
    return DecoderIO(ids, mask, "", past)


def shared_kv_inputs(gb: GraphBuilder, io: DecoderIO) -> SharedKV:
    """seqlens_k / total_sequence_length from the attention mask (its length is the valid slots after the call)."""
    ones = gb.op("ReduceSum", [io.attention_mask, gb.const([1])], keepdims=0, name="kv_valid")
    seqlens = gb.op("Cast", [gb.op("Sub", [ones, gb.const(1)])], to=TensorProto.INT32, name="seqlens_k")
    total = gb.op("Gather", [gb.op("Shape", [io.attention_mask]), gb.const(1)], name="total_len")
    total = gb.op("Cast", [total], to=TensorProto.INT32, name="total_sequence_length")
    return SharedKV(seqlens, total)


def rotary_caches(gb: GraphBuilder, cos: np.ndarray, sin: np.ndarray, width: int) -> tuple[str, str]:
    """The kernel's rotary caches [ctx, width/2] for heads of ``width`` laid out by :func:`cache_head_layout`
    (cos 1 / sin 0 on pass-through and padding pairs)."""
    r = cos.shape[1] // 2
    cos_cache = np.ones((cos.shape[0], width // 2), np.float32)
    sin_cache = np.zeros((cos.shape[0], width // 2), np.float32)
    cos_cache[:, :r], sin_cache[:, :r] = cos[:, :r], sin[:, :r]
    return gb.weight("rotary.cos_cache", cos_cache), gb.weight("rotary.sin_cache", sin_cache)


def padded_head_norm(norm: HeadNorm, head_dim: int, width: int, slot: np.ndarray) -> HeadNorm:
    """The per-head RMSNorm of :class:`HeadNorm` over heads zero-padded to ``width`` (:func:`cache_head_layout`).

    The norm's mean runs over all ``width`` features, the zeros included, so sum/width replaces sum/head_dim:
    x / sqrt(sum/head_dim + eps) = sqrt(head_dim/width) * x / sqrt(sum/width + eps * head_dim/width). The
    weight takes the factor (and zeros on the padding slots, which stay zero) and eps is rescaled."""
    if width == head_dim and (slot == np.arange(head_dim)).all():
        return norm
    w = np.zeros((norm.weight.shape[0], width), np.float32)
    w[:, slot] = norm.weight * np.float32(np.sqrt(head_dim / width))
    return HeadNorm(w, norm.eps * head_dim / width)


def attention_shared(gb: GraphBuilder, io: DecoderIO, shape: DecoderShape, layer: int, qkv: str, kv: SharedKV, *,
                     rotary: tuple[str, str] | None, window: int | None = None, head_norm: HeadNorm | None = None,
                     softcap: float | None = None) -> str:
    """One GroupQueryAttention node over the packed projection qkv = [B, S, (Hq + 2 Hkv) W] in the padded head
    layout of :func:`cache_head_layout` (query part already scaled, so scale=1); ``rotary`` (the caches of
    :func:`rotary_caches`, None for a layer without rotary) is applied inside, keys are cached after rotary as
    in the concat layout. ``window`` is the layer's sliding window, ``softcap`` caps the scores, ``head_norm``
    (padded by :func:`padded_head_norm`) is applied to the q and k heads in front of the node (onnxruntime's CPU
    kernel does not implement its own q/k norm inputs). Returns [B, S, Hq W] for the (row-padded) output
    projection."""
    hq, hkv, d = shape.num_attention_heads, shape.num_kv_heads, shape.cache_head_dim or shape.head_dim
    p = f"layers.{layer}.attn"
    if head_norm is not None:
        heads = gb.op("Reshape", [qkv, gb.const([0, 0, hq + 2 * hkv, d])], name=f"{p}/heads")
        qk, v = gb.op("Split", [heads, gb.const([hq + hkv, hkv])], outputs=2, axis=2, name=f"{p}/split_v")
        qk = head_norm_op(gb, qk, head_norm, f"{p}.qk_norm")
        qkv = gb.op("Reshape", [gb.op("Concat", [qk, v], axis=2, name=f"{p}/qkv_normed"),
                                gb.const([0, 0, (hq + 2 * hkv) * d])], name=f"{p}/packed")
    past_k, past_v = io.past[layer]
    cos, sin = rotary if rotary is not None else ("", "")
    # local_window_size = sliding_window: Hugging Face's rule on onnxruntime >= GQA_WINDOW_ONNXRUNTIME
    attrs = {"local_window_size": int(window)} if window is not None else {}
    if softcap:
        attrs["softcap"] = float(softcap)
    inputs = [qkv, "", "", past_k, past_v, kv.seqlens_k, kv.total_len, cos, sin]
    while not inputs[-1]:  # (optional trailing inputs are left out, not named "")
        inputs.pop()
    out = gb.op("GroupQueryAttention", inputs, outputs=3, domain="com.microsoft", name=f"{p}/GroupQueryAttention",
                num_heads=hq, kv_num_heads=hkv, scale=1.0, do_rotary=int(rotary is not None),
                rotary_interleaved=0, **attrs)[0]
    # Rename the cache outputs to the contract's names.
    node = gb.nodes[-1]
    node.output[1], node.output[2] = f"present.{layer}.key", f"present.{layer}.value"
    gb._names.update(node.output[1:])
    gb.add_output(f"present.{layer}.key", TensorProto.FLOAT, ["batch", hkv, "buffer", d])
    gb.add_output(f"present.{layer}.value", TensorProto.FLOAT, ["batch", hkv, "buffer", d])
    return out
