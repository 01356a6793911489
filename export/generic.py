"""The generic path: causal LMs our builder does not describe, and ready-made ONNX folders -> edgelm folders.

Two sources end in the same steps:

* ``via="optimum"``: a Hugging Face folder goes through optimum's ONNX exporter (``optimum.exporters.onnx``, task
  ``text-generation-with-past``), run as a **subprocess**. optimum-onnx 0.1.0 (the only release) needs
  ``transformers<4.58`` and imports transformers internals that 5.x removed, so it often lives in an environment
  of its own: its python comes from ``optimum_python=`` / ``--optimum-python`` / ``$EDGELM_OPTIMUM_PYTHON``, else
  this interpreter when it can import optimum (docs/export.md, "The generic path").
* ``via="onnx"``: a folder that already holds a graph (``model.onnx``, or ``onnx/model*.onnx`` as many published
  repositories lay it out; ``onnx_file=`` picks one). No torch is needed on this path.

Then: the graph's I/O is brought to the "concat" contract of docs/model-format.md (:func:`normalize_graph`:
aliases renamed, ``position_ids`` accepted where the family derives positions from the mask, ``logits_from`` and
``last_logprobs`` added behind the LM head when it can be found), the fp32 graph is checked (against PyTorch when
the weights and torch are at hand, else cached decode steps against one whole-sequence call), quantized
weight-only with export/quantize.py, measured by the quality gate, and written with card and manifest, both of
which name the path.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgelm.errors import ExportError, InvalidArgumentError, ModelNotFoundError, UnsupportedArchitectureError

from .archs.common import DecoderShape

OPTIMUM_PYTHON_ENV = "EDGELM_OPTIMUM_PYTHON"
OPTIMUM_TASK = "text-generation-with-past"
VIA_CHOICES = ("builder", "optimum", "onnx")
# Published folders name their variants model.onnx, model_quantized.onnx, model_q4.onnx, model_fp16.onnx, ...:
# the plain fp32 one is preferred when no --onnx-file is given.
ONNX_PLACES = ("model.onnx", "onnx/model.onnx", "decoder_model.onnx", "onnx/decoder_model.onnx")
# Names other exporters give the cache tensors -> ours (docs/model-format.md); layer index and key/value kept.
_ALIASES = (
    (re.compile(r"^past_key_values\.(\d+)\.(key|value)$"), "past_key_values.{}.{}"),
    (re.compile(r"^past\.(\d+)\.(key|value)$"), "past_key_values.{}.{}"),
    (re.compile(r"^past_key_values_(\d+)_(key|value)$"), "past_key_values.{}.{}"),
    (re.compile(r"^present\.(\d+)\.(key|value)$"), "present.{}.{}"),
    (re.compile(r"^present_key_values\.(\d+)\.(key|value)$"), "present.{}.{}"),
    (re.compile(r"^present_(\d+)_(key|value)$"), "present.{}.{}"),
)
# Ops that mean the graph's weights are already quantized (it is then kept as it is: quantize="none").
_QUANT_OPS = {"MatMulNBits": None, "MatMulInteger": "int8", "DynamicQuantizeMatMul": "int8",
              "QLinearMatMul": "int8", "GatherBlockQuantized": None, "DequantizeLinear": "int8"}
_INT64_MAX = np.iinfo(np.int64).max


# --- which path -------------------------------------------------------------------------------------------------
def find_onnx(folder: Path, onnx_file: str | None = None) -> Path | None:
    """The graph file of a ready-made ONNX folder (``onnx_file`` relative to it), or None when it holds none."""
    if onnx_file:
        path = folder / onnx_file
        if not path.is_file():
            raise InvalidArgumentError(f"--onnx-file {onnx_file} is not a file in {folder}.",
                                       hint=_choices_hint(folder))
        return path
    for place in ONNX_PLACES:
        if (folder / place).is_file():
            return folder / place
    found = _onnx_files(folder)
    if len(found) == 1:
        return folder / found[0]
    if found:
        raise InvalidArgumentError(f"{folder} holds several ONNX graphs and no plain model.onnx.",
                                   hint=_choices_hint(folder))
    return None


def _onnx_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in [*folder.glob("*.onnx"), *folder.glob("onnx/*.onnx")])


def _choices_hint(folder: Path) -> str:
    found = _onnx_files(folder)
    return (f"Pick one with --onnx-file: {', '.join(found)}." if found
            else "Pass a folder with model.onnx or onnx/model*.onnx, or a Hugging Face folder without --onnx-file.")


def choose_path(src_path: Path, src_cfg: dict[str, Any] | None, via: str | None, onnx_file: str | None,
                has_weights: bool) -> str:
    """"builder", "optimum" or "onnx" for this source: ``via`` when given; a ready-made graph when asked for
    (``onnx_file``) or when there are no weights or no builder for it; the builder when it describes the family;
    optimum for every other causal LM."""
    if via is not None and via not in VIA_CHOICES:
        raise InvalidArgumentError(f"via={via!r} is not one of {', '.join(VIA_CHOICES)}.",
                                   hint="Use --via builder, --via optimum or --via onnx, or leave it out.")
    if onnx_file and via not in (None, "onnx"):
        raise InvalidArgumentError(f"--onnx-file picks a ready-made graph; it does not go with --via {via}.",
                                   hint="Drop --onnx-file, or use --via onnx.")
    if via:
        return via
    if onnx_file:
        return "onnx"
    from .archs import SUPPORTED

    arch = ((src_cfg or {}).get("architectures") or [None])[0]
    if _onnx_files(src_path) and (not has_weights or arch not in SUPPORTED):  # (find_onnx then picks one)
        return "onnx"
    if isinstance(arch, str) and arch.endswith("ForConditionalGeneration"):  # optimum would be asked for nothing
        raise UnsupportedArchitectureError(
            f"Cannot export {arch}: it is not a text-only causal LM (a multimodal or encoder-decoder model), and "
            f"edgelm exports decoder-only language models.",
            hint="Export a text-only ...ForCausalLM checkpoint of its language model if there is one; `edgelm "
                 "export --list` shows the families.")
    return "builder" if arch in SUPPORTED else "optimum"


def optimum_python(explicit: str | None = None) -> str:
    """The python that runs optimum's exporter: ``explicit``, $EDGELM_OPTIMUM_PYTHON, or this one if it has optimum."""
    chosen = explicit or os.environ.get(OPTIMUM_PYTHON_ENV)
    if chosen:
        exe = shutil.which(chosen) or chosen
        if not (Path(exe).is_file() and os.access(exe, os.X_OK)):
            raise InvalidArgumentError(f"The optimum python {chosen} is not an executable file.",
                                       hint=f"Pass the python of an environment with optimum-onnx (--optimum-python "
                                            f"or ${OPTIMUM_PYTHON_ENV}).")
        return exe
    try:
        found = importlib.util.find_spec("optimum.exporters.onnx") is not None
    except (ImportError, ValueError):  # `optimum` present without its exporters, or a broken install
        found = False
    if found:
        return sys.executable
    raise ExportError("The generic path needs optimum's ONNX exporter, which this environment lacks.",
                      hint=f"In a checkout, `bash scripts/optimum-env` makes that environment once and prints its "
                           f"python: pass it with --optimum-python \"$(bash scripts/optimum-env)\" or "
                           f"${OPTIMUM_PYTHON_ENV}. Otherwise: python -m venv ~/.edgelm-optimum && "
                           f"~/.edgelm-optimum/bin/pip install \"edgelm[optimum]\", and pass "
                           f"~/.edgelm-optimum/bin/python the same way.")


def optimum_supports(python: str, model_type: str) -> bool:
    """Whether optimum (in ``python``'s environment) has a text-generation-with-past ONNX config for ``model_type``:
    asked before any weights are read, so an unsupported model is refused from config.json alone."""
    code = ("import sys, optimum.exporters.onnx.model_configs\n"
            "from optimum.exporters.tasks import TasksManager\n"
            "try:\n    tasks = TasksManager.get_supported_tasks_for_model_type(sys.argv[1], exporter='onnx', "
            "library_name='transformers')\nexcept KeyError:\n    tasks = {}\n"
            f"print({OPTIMUM_TASK!r} in tasks)\n")
    proc = subprocess.run([python, "-c", code, model_type], capture_output=True, text=True)
    return proc.stdout.strip().endswith("True")


def _refuse_generic(arch: str, why: str, hint: str) -> UnsupportedArchitectureError:
    from .archs import SUPPORTED

    return UnsupportedArchitectureError(f"Cannot export {arch}: the builder knows {', '.join(SUPPORTED)}, and {why}.",
                                        hint=hint)


def run_optimum(python: str, src_path: Path, out_dir: Path, *, threads: int | None = None) -> str:
    """optimum's exporter on ``src_path`` into ``out_dir`` (model.onnx + its own config files); returns its version."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")  # the source is local by now
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [python, "-m", "optimum.exporters.onnx", "--model", str(src_path), "--task", OPTIMUM_TASK,
           "--framework", "pt", "--library-name", "transformers", str(out_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0 or not (out_dir / "model.onnx").is_file():
        lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        errors = [ln for ln in lines if re.match(r"^\w*(Error|Exception)\b", ln)]
        last = (errors or lines or ["(no output)"])[-1]
        raise ExportError(f"optimum's exporter could not export {src_path.name} ({last[:300]}).",
                          hint="optimum supports most causal LMs transformers<4.58 can load; check "
                               f"`{python} -m optimum.exporters.onnx --help`, or use a family of "
                               "`edgelm export --list`.")
    ver = subprocess.run([python, "-c", "import importlib.metadata as m; print(', '.join(p + ' ' + m.version(p) for p "
                          "in ('optimum-onnx', 'transformers', 'torch')))"], capture_output=True, text=True, env=env)
    return ver.stdout.strip() or "optimum-onnx"


# --- the graph's I/O -> the "concat" contract ----------------------------------------------------------------------
def _rename(model: Any, old: str, new: str) -> None:
    for node in model.graph.node:
        node.input[:] = [new if n == old else n for n in node.input]
        node.output[:] = [new if n == old else n for n in node.output]
    for vi in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        if vi.name == old:
            vi.name = new
    for init in model.graph.initializer:
        if init.name == old:
            init.name = new


def _constant_names(model: Any) -> set[str]:
    """Tensors that depend on no graph input: initializers, Constant outputs, and what only they feed."""
    const = {t.name for t in model.graph.initializer}
    for node in model.graph.node:  # nodes are topologically sorted
        if node.op_type == "Constant" or (node.input and all(n in const or not n for n in node.input)):
            const.update(node.output)
    return const


def _lm_head(model: Any) -> Any | None:
    """The MatMul that makes the logits (perhaps followed by position-wise ops with constant operands, e.g. a
    bias or a soft-cap), or None. Slicing its activation slices the logits' positions and nothing else."""
    producer = {o: n for n in model.graph.node for o in n.output}
    const = _constant_names(model)
    name = "logits"
    for _ in range(8):
        node = producer.get(name)
        if node is None:
            return None
        if node.op_type in ("MatMul", "MatMulNBits") and node.input[1] in const:
            return node
        data = [n for n in node.input if n and n not in const]
        if node.op_type not in ("Add", "Mul", "Div", "Sub", "Tanh", "Cast", "Softcap") or len(data) != 1:
            return None
        name = data[0]
    return None


def normalize_graph(model: Any) -> dict[str, Any]:
    """Bring ``model``'s I/O to the "concat" contract, in place; returns what was done (for the manifest).

    Raises UnsupportedArchitectureError (one line) for graphs the runtime cannot drive."""
    from onnx import TensorProto, helper, numpy_helper

    done: dict[str, Any] = {"renamed": {}}
    for vi in [*model.graph.input, *model.graph.output]:
        for pattern, fmt in _ALIASES:
            m = pattern.match(vi.name)
            if m and fmt.format(*m.groups()) != vi.name:
                new = fmt.format(*m.groups())
                done["renamed"][vi.name] = new
                _rename(model, vi.name, new)
                break
    inputs = {i.name: i for i in model.graph.input}
    outputs = {o.name: o for o in model.graph.output}
    if "use_cache_branch" in inputs:
        raise UnsupportedArchitectureError(
            "This graph is a merged decoder (a use_cache_branch input); edgelm drives one graph with a cache.",
            hint="Use the folder's decoder_with_past / model.onnx variant, or re-export with `edgelm export "
                 "HF_FOLDER --via optimum`.")
    layers = sorted({int(n.split(".")[1]) for n in inputs if n.startswith("past_key_values.")})
    missing = [n for n in ("input_ids", "logits") if n not in inputs and n not in outputs]
    if not layers or layers != list(range(len(layers))):
        missing.append("past_key_values.{0..N-1}.key/value")
    missing += [f"{io}.{i}.{kv}" for i in layers for kv in ("key", "value")
                for io, names in (("past_key_values", inputs), ("present", outputs)) if f"{io}.{i}.{kv}" not in names]
    if missing:
        raise UnsupportedArchitectureError(
            f"The graph's I/O is not the cache layout of docs/model-format.md: it lacks {', '.join(missing[:4])}.",
            hint="Export a decoder with its cache (optimum's task text-generation-with-past), or use `edgelm export "
                 "HF_FOLDER --via optimum`.")
    if "attention_mask" not in inputs:
        raise UnsupportedArchitectureError("The graph has no attention_mask input (docs/model-format.md needs it).",
                                           hint="Re-export with `edgelm export HF_FOLDER --via optimum`.")
    if "position_ids" not in inputs:
        # Families that take positions from the mask (ALiBi: Bloom, MPT) are exported without it. Declaring it
        # (unused) keeps one contract for every consumer: the runtime, verification, calibration.
        model.graph.input.append(helper.make_tensor_value_info("position_ids", TensorProto.INT64,
                                                               ["batch_size", "sequence_length"]))
        done["position_ids"] = "added (unused: the graph derives positions from the mask)"
    # Slices along the positions axis (from a start to the end) need these two constants.
    model.graph.initializer.extend([numpy_helper.from_array(np.asarray([_INT64_MAX], np.int64), "edgelm/end"),
                                    numpy_helper.from_array(np.asarray([1], np.int64), "edgelm/positions_axis")])
    logits = outputs["logits"]
    if logits.type.tensor_type.elem_type != TensorProto.FLOAT:  # fp16 graphs: the runtime samples in float32
        _rename(model, "logits", "logits_native")
        model.graph.node.append(helper.make_node("Cast", ["logits_native"], ["logits"], to=TensorProto.FLOAT,
                                                 name="edgelm/logits_float32"))
        dims = [d.dim_param or d.dim_value for d in logits.type.tensor_type.shape.dim]
        model.graph.output.remove(logits)
        model.graph.output.insert(0, helper.make_tensor_value_info("logits", TensorProto.FLOAT, dims or None))
        done["logits"] = "cast to float32"
    head = _lm_head(model)
    if "logits_from" not in inputs and head is not None:
        # The same optional input as our builder's (docs/model-format.md): a generation's prefill then computes
        # the LM head for its last position only.
        model.graph.initializer.append(numpy_helper.from_array(np.zeros(1, np.int64), "logits_from"))
        model.graph.input.append(helper.make_tensor_value_info("logits_from", TensorProto.INT64, [1]))
        hidden = head.input[0]
        model.graph.node.insert(list(model.graph.node).index(head), helper.make_node(
            "Slice", [hidden, "logits_from", "edgelm/end", "edgelm/positions_axis"], [f"{hidden}/from"],
            name="edgelm/lm_head_positions"))
        head.input[0] = f"{hidden}/from"
        for o in model.graph.output:  # its positions axis is no longer the input's
            if o.name == "logits" and len(o.type.tensor_type.shape.dim) == 3:
                o.type.tensor_type.shape.dim[1].dim_param = "logits_length"
        done["logits_from"] = f"added before {head.name or head.op_type}"
    if "last_logprobs" not in outputs:
        model.graph.initializer.append(numpy_helper.from_array(np.asarray([-1], np.int64), "edgelm/last"))
        model.graph.node.extend([
            helper.make_node("Slice", ["logits", "edgelm/last", "edgelm/end", "edgelm/positions_axis"],
                             ["edgelm/last_logits"], name="edgelm/last_position"),
            helper.make_node("LogSoftmax", ["edgelm/last_logits"], ["last_logprobs"], axis=-1,
                             name="edgelm/log_softmax")])
        model.graph.output.append(helper.make_tensor_value_info("last_logprobs", TensorProto.FLOAT, None))
        done["last_logprobs"] = "added"
    return done


def graph_shape(model: Any, hf_cfg: dict[str, Any], context_length: int) -> tuple[DecoderShape, str]:
    """(sizes, the cache dtype): sizes from the graph's cache inputs and logits (the truth the runtime meets), the
    rest from config.json."""
    from onnx import TensorProto

    inputs = {i.name: i for i in model.graph.input}
    layers = len([n for n in inputs if n.startswith("past_key_values.") and n.endswith(".key")])
    kv = inputs["past_key_values.0.key"].type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else None for d in kv.shape.dim]
    logits = next(o for o in model.graph.output if o.name in ("logits", "logits_native"))
    ldims = [d.dim_value if d.HasField("dim_value") else None for d in logits.type.tensor_type.shape.dim]

    def cfg(*keys: str) -> int | None:
        for k in keys:
            v = hf_cfg.get(k) or (hf_cfg.get("text_config") or {}).get(k)
            if isinstance(v, int) and v > 0:
                return v
        return None

    heads = cfg("num_attention_heads", "n_head", "num_heads", "n_heads")
    kv_heads = (dims[1] if len(dims) == 4 else None) or cfg("num_key_value_heads", "num_kv_heads") or heads
    hidden = cfg("hidden_size", "n_embd", "d_model")
    head_dim = ((dims[3] if len(dims) == 4 else None) or cfg("head_dim")
                or (hidden // heads if hidden and heads else None))
    vocab = (ldims[-1] if ldims else None) or cfg("vocab_size")
    if not (kv_heads and head_dim and vocab):
        raise ExportError("The graph's cache and logits shapes are symbolic and config.json does not give the head "
                          "count, head size and vocabulary.", hint="Add the model's config.json beside the graph.")
    shape = DecoderShape(num_layers=layers, num_attention_heads=heads or kv_heads, num_kv_heads=kv_heads,
                         head_dim=head_dim, hidden_size=hidden or (heads or kv_heads) * head_dim, vocab_size=vocab,
                         context_length=context_length)
    return shape, ("float16" if kv.elem_type == TensorProto.FLOAT16 else "float32")


def stored_precision(model: Any) -> str | None:
    """"int4" / "int8" / "float16" when the graph's weights are already stored so, else None (fp32)."""
    from onnx import TensorProto, helper

    for node in model.graph.node:
        if node.op_type in _QUANT_OPS:
            bits = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "bits"), 8)
            return _QUANT_OPS[node.op_type] or f"int{bits}"
    big = [t for t in model.graph.initializer if len(t.dims) == 2]
    if big and sum(t.data_type == TensorProto.FLOAT16 for t in big) > len(big) // 2:
        return "float16"
    return None


# --- checks of the fp32 graph -------------------------------------------------------------------------------------
def check_cache(onnx_path: Path, shape: DecoderShape, *, rtol: float, threads: int | None = None,
                kv_dtype: str = "float32", seed: int = 0) -> float:
    """Torch-free check of the cache I/O: a prefill of a few tokens then cached decode steps must give the logits of
    one call over the whole sequence (and ``logits_from=-1`` the last of them). Returns the max |logit diff|."""
    from .verify import OnnxDecoder, _check

    dec = OnnxDecoder(onnx_path, shape, threads)
    dtype = np.float16 if kv_dtype == "float16" else np.float32
    rng = np.random.default_rng(seed)
    seq = rng.integers(0, shape.vocab_size, size=(1, 12))
    empty = [np.zeros((1, shape.num_kv_heads, 0, shape.head_dim), dtype) for _ in range(2 * shape.num_layers)]
    whole, _ = dec.step(seq, np.ones_like(seq), np.arange(12)[None], empty)
    logits, cache = dec.step(seq[:, :8], np.ones((1, 8)), np.arange(8)[None], empty)
    got = [logits]
    for t in range(8, 12):
        logits, cache = dec.step(seq[:, t:t + 1], np.ones((1, t + 1)), np.array([[t]]), cache)
        got.append(logits)
    diffs = [float(np.max(np.abs(np.concatenate(got, axis=1) - whole)))]
    if "logits_from" in {i.name for i in dec.sess.get_inputs()}:
        feeds = {"input_ids": seq, "attention_mask": np.ones_like(seq), "position_ids": np.arange(12)[None],
                 "logits_from": np.array([-1], np.int64)}
        feeds.update({f"past_key_values.{i // 2}.{('key', 'value')[i % 2]}": e for i, e in enumerate(empty)})
        last = dec.sess.run(["logits"], feeds)[0]
        diffs.append(float(np.max(np.abs(last[:, -1] - whole[:, -1]))) if last.shape[1] == 1 else float("inf"))
    worst = max(diffs)
    if not np.isfinite(worst):
        raise ExportError("The graph's logits are not finite, or logits_from=-1 does not select the last position.",
                          hint="Export the model again, or report the graph's origin.")
    return _check(worst, max(1.0, float(np.max(np.abs(whole)))), rtol, "cached decode steps vs one call")


# --- the pipeline -------------------------------------------------------------------------------------------------
def export_generic(src: str, src_path: Path, out: str, *, via: str, onnx_file: str | None = None,
                   optimum_python_path: str | None = None, quantize: str, eval_path: Path, max_ppl_increase: float,
                   force: bool, overwrite: bool, progress: bool, keep: tuple[str, ...],
                   context_length: int | None, threads: int | None) -> Any:
    """Export ``src_path`` by optimum (``via="optimum"``) or from its ready-made graph (``via="onnx"``) to ``out``.
    The arguments have been checked by :func:`edgelm_export.convert.export_model`; returns its ExportReport."""
    from . import assemble as asm

    started = time.perf_counter()
    hf_cfg = asm.read_json_or_empty(src_path / "config.json")
    if via == "optimum":
        asm.read_source_config(src_path)  # refuses a folder without a readable config.json
    graph_file = find_onnx(src_path, onnx_file) if via == "onnx" else None
    if via == "onnx" and graph_file is None:
        raise ModelNotFoundError(f"{src_path} holds no ONNX graph (model.onnx or onnx/model*.onnx).",
                                 hint="Pass a folder with one, or a Hugging Face folder with --via optimum.")
    asm.check_tokenizer(src_path)
    arch = (hf_cfg.get("architectures") or [None])[0] or f"model_type={hf_cfg.get('model_type')}"
    max_pos = int(hf_cfg.get("max_position_embeddings") or hf_cfg.get("n_positions") or hf_cfg.get("seq_length")
                  or (hf_cfg.get("text_config") or {}).get("max_position_embeddings") or 2048)
    asm.check_context_length(context_length, max_pos)
    ctx = context_length or min(max_pos, asm.DEFAULT_MAX_CONTEXT)
    python = None
    if via == "optimum":
        from .archs import SUPPORTED

        try:
            python = optimum_python(optimum_python_path)
        except ExportError as exc:
            if arch in SUPPORTED:  # --via optimum was asked for a builder family
                raise
            raise _refuse_generic(arch, "the generic path (--via optimum) needs optimum-onnx, which this "
                                  "environment lacks", exc.hint or "") from None
        model_type = str(hf_cfg.get("model_type") or "")
        if not optimum_supports(python, model_type):
            raise _refuse_generic(arch, f"optimum has no {OPTIMUM_TASK} export for model_type {model_type!r}",
                                  "`edgelm export --list` shows what is supported; a ready-made ONNX folder of the "
                                  "model (--via onnx) also works.")
    out_path = Path(out).expanduser()
    asm.check_output(out_path, overwrite, src_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    size = asm.weights_bytes(src_path) if via == "optimum" else sum(
        p.stat().st_size for p in graph_file.parent.glob(graph_file.name + "*"))  # type: ignore[union-attr]
    cleared = asm.clear_stale_work(out_path)
    asm.check_disk(out_path.parent, size, quantize)
    work = asm.work_dir(out_path, "export")
    try:
        report = _export(src, src_path, hf_cfg, arch, out_path, work, via=via, graph_file=graph_file, python=python,
                         quantize=quantize, eval_path=eval_path, max_ppl_increase=max_ppl_increase, force=force,
                         progress=progress, keep=keep, ctx=ctx, threads=threads)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report.notes[:0] = [cleared] if cleared else []
    report.seconds = round(time.perf_counter() - started, 2)
    return report


def _export(src: str, src_path: Path, hf_cfg: dict[str, Any], arch: str, out_path: Path, work: Path, *, via: str,
            graph_file: Path | None, python: str | None, quantize: str, eval_path: Path, max_ppl_increase: float,
            force: bool, progress: bool, keep: tuple[str, ...], ctx: int, threads: int | None) -> Any:
    import onnx

    from edgelm.errors import QualityGateError
    from edgelm.folder import write_manifest

    from . import assemble as asm
    from .evaluate import quality_gate
    from .quantize import onnx_bytes, save_onnx

    path_info: dict[str, Any] = {"path": "generic (optimum)" if via == "optimum" else "generic (ready-made ONNX)"}
    if via == "optimum":
        assert python is not None
        path_info["optimum"] = run_optimum(python, src_path, work / "optimum", threads=threads)
        path_info["optimum_python"] = python
        graph_file = work / "optimum" / "model.onnx"
    assert graph_file is not None
    if via == "onnx":
        path_info["onnx_file"] = str(graph_file.relative_to(src_path))
    model = onnx.load(str(graph_file))
    stored = stored_precision(model)
    if stored and quantize != "none":
        raise InvalidArgumentError(
            f"{graph_file.name} is already stored as {stored}; quantizing it again would stack two roundings.",
            hint="Pass --quantize none to keep it as it is, or pick the fp32 graph with --onnx-file.")
    path_info["io"] = normalize_graph(model)
    shape, kv_dtype = graph_shape(model, hf_cfg, ctx)
    graph_params = int(sum(np.prod(t.dims) for t in model.graph.initializer if len(t.dims) >= 2))
    fp32_dir = work / "fp32"
    fp32_dir.mkdir()
    save_onnx(model, fp32_dir / "model.onnx")
    del model

    # Verification: against PyTorch when the weights are here and torch can load them; else the cache check.
    max_diff, how, num_params = _verify(src_path, fp32_dir / "model.onnx", shape, kv_dtype, via=via, threads=threads)
    num_params = num_params or graph_params  # without PyTorch: the graph's weight count (tied copies twice)
    tok_cfg = asm.write_tokenizer(src_path, fp32_dir, hf_cfg.get("model_type") or "generic")
    gen_src = asm.read_json_or_empty(src_path / "generation_config.json")
    model_type = str(hf_cfg.get("model_type") or "generic")
    dtype = stored or "float32"
    fp32_cfg = asm.edgelm_config(arch, model_type, shape, hf_cfg, gen_src, tok_cfg, dtype)
    fp32_cfg["export_path"] = path_info["path"]
    (fp32_dir / "config.json").write_text(json.dumps(fp32_cfg, indent=2) + "\n", encoding="utf-8")
    gen = asm.generation_config(src_path, fp32_cfg["bos_token_id"], fp32_cfg["eos_token_ids"], fp32_cfg["pad_token_id"])
    (fp32_dir / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")
    source_info = {"model": src, "path": str(src_path.resolve()), "architecture": arch}
    write_manifest(fp32_dir, source=source_info)  # provisional: the runtime opens the folder to evaluate it

    final_dir = fp32_dir
    quant_info: dict[str, Any] = {"method": "none", "dtype": dtype, "weights": (
        f"{stored} (as the source graph stores them)" if stored else "fp32 (not quantized)")}
    if quantize != "none":
        final_dir, quant_info = asm.choose_variant(fp32_dir, work, fp32_cfg, source_info, quantize, keep, eval_path,
                                             max_ppl_increase=max_ppl_increase, threads=threads, progress=progress)
    try:
        metrics = quality_gate(fp32_dir, final_dir if quantize != "none" else None, eval_path,
                               max_ppl_increase=max_ppl_increase, force=force, threads=threads, progress=progress)
    except QualityGateError as exc:
        raise asm.with_passing_mode(exc, fp32_dir, work, fp32_cfg, source_info, quant_info["method"], keep, eval_path,
                                    max_ppl_increase=max_ppl_increase, threads=threads) from None
    if quant_info.get("auto"):
        metrics["auto"] = quant_info["auto"]
    if final_dir is not fp32_dir:
        shutil.rmtree(fp32_dir)
    report = asm.ExportReport(out=str(out_path), source=src, architecture=arch, model_type=model_type,
                             quantization=quant_info["method"], context_length=ctx, num_parameters=num_params,
                             max_logit_diff=float(max_diff), model_bytes=onnx_bytes(final_dir / "model.onnx"),
                             fp32_model_bytes=quant_info.get("fp32_bytes", onnx_bytes(final_dir / "model.onnx")),
                             metrics=metrics)
    path_row = path_info["path"] + (f" ({path_info['optimum']})" if via == "optimum" else
                                    f", `{path_info['onnx_file']}`")
    card = asm.model_card(report, shape, src_path, quant_info, asm.licence_notes(src_path), path=path_row)
    card = card.replace("| fp32 ONNX vs PyTorch, max abs logit diff |",
                        f"| fp32 check ({how}), max abs logit diff |", 1)
    (final_dir / "README.md").write_text(card, encoding="utf-8")
    for lic in src_path.glob("LICENSE*"):
        if lic.is_file():
            shutil.copyfile(lic, final_dir / lic.name)
    (final_dir / "edgelm.json").unlink(missing_ok=True)
    write_manifest(final_dir, source=source_info, producer=asm.producer(), quantization=quant_info,
                   verification={"max_abs_logit_diff": float(max_diff), "rtol": asm.VERIFY_RTOL, "against": how},
                   metrics=metrics, num_parameters=num_params, export=path_info)
    asm.swap_into_place(final_dir, out_path)
    return report


def _verify(src_path: Path, onnx_path: Path, shape: DecoderShape, kv_dtype: str, *, via: str,
            threads: int | None) -> tuple[float, str, int]:
    """(max |logit diff|, what it was measured against, parameter count or 0)."""
    from .assemble import VERIFY_RTOL

    if via == "optimum":
        try:
            import torch
            from transformers import AutoModelForCausalLM
        except ImportError:
            torch = None  # type: ignore[assignment]
        if torch is not None:
            from .verify import verify_against_torch
            try:
                model = AutoModelForCausalLM.from_pretrained(str(src_path), dtype=torch.float32).eval()
            except Exception:  # noqa: BLE001 -- this transformers cannot load it (optimum's older one could)
                model = None
            if model is not None:
                if threads:
                    torch.set_num_threads(threads)
                n = int(sum(p.numel() for p in model.parameters()))
                diff = verify_against_torch(model, onnx_path, shape, rtol=VERIFY_RTOL, threads=threads)
                return diff, "PyTorch", n
    diff = check_cache(onnx_path, shape, rtol=VERIFY_RTOL, threads=threads, kv_dtype=kv_dtype)
    return diff, "cached steps vs one call", 0
