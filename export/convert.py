"""`edgelm export SRC --out DIR`: a Hugging Face causal LM -> a verified, quantized, evaluated model folder.

Steps (each refuses early with a typed error, see docs/export.md):
  1. check arguments, SRC, its config.json (architecture) and tokenizer, the output folder and free disk;
  2. load the model with transformers (fp32, eval) and build our own lean ONNX graph (archs/);
  3. verify the fp32 graph against PyTorch (prefill + cached decode steps, and a left-padded batch);
  4. quantize (quantize.py), then measure fp32 vs quantized quality with the runtime (evaluate.py) and refuse
     a model that lost more than ``max_ppl_increase`` perplexity unless ``force``;
  5. write the folder into a temporary directory beside ``out`` and rename it into place, manifest last.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

from edgelm.errors import (
    EdgeLMError,
    ExportError,
    InvalidArgumentError,
    ModelNotFoundError,
    OutOfDiskError,
)

from .assemble import (
    DEFAULT_EVAL_TEXT,
    DEFAULT_MAX_CONTEXT,
    ExportReport,
    VERIFY_RTOL,
    check_disk,
    check_eval_text,
    check_context_length,
    check_output,
    clear_stale_work,
    check_tokenizer,
    choose_variant,
    edgelm_config,
    gate,
    generation_config,
    licence_notes,
    model_card,
    producer,
    read_json_or_empty,
    read_source_config,
    swap_into_place,
    weights_bytes,
    work_dir,
    write_tokenizer,
)

QUANTIZE_CHOICES = ("int8", "int8-block", "int8-gemm", "int4", "int4-fp32", "auto", "none")
KEEP_FP32_CHOICES = ("embeddings", "lm_head")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# --- checks done before any work -------------------------------------------------------------------------------
def _check_arguments(quantize: str, max_ppl_increase: float, keep_fp32: Any, context_length: int | None) -> tuple[str, ...]:
    if quantize not in QUANTIZE_CHOICES:
        raise InvalidArgumentError(f"quantize={quantize!r} is not one of {', '.join(QUANTIZE_CHOICES)}.",
                                   hint="Use --quantize int8 (the default) or --quantize none for fp32.")
    if (not isinstance(max_ppl_increase, (int, float)) or isinstance(max_ppl_increase, bool)
            or not 0 <= max_ppl_increase <= 1):
        raise InvalidArgumentError(
            f"--max-ppl-increase (max_ppl_increase) is a fraction from 0 to 1 (0.05 = 5 %), got {max_ppl_increase!r}"
            + (f", which would allow +{100 * max_ppl_increase:.0f} % perplexity." if isinstance(
                max_ppl_increase, (int, float)) and max_ppl_increase > 1 else "."),
            hint="Pass 0.05 for 5 %, or --force to write a model whatever its perplexity.")
    if isinstance(keep_fp32, str):
        keep_fp32 = [k for k in keep_fp32.split(",") if k.strip()]
    keep = tuple(k.strip() for k in keep_fp32)
    if keep and quantize == "none":
        raise InvalidArgumentError(f"--keep-fp32 {','.join(keep)} does nothing with --quantize none: every weight is "
                                   f"fp32 already.", hint="Drop --keep-fp32, or pick a quantization mode.")
    bad = [k for k in keep if k not in KEEP_FP32_CHOICES]
    if bad:
        raise InvalidArgumentError(f"--keep-fp32 (keep_fp32) entries {bad} are unknown; choose from "
                                   f"{', '.join(KEEP_FP32_CHOICES)}.")
    if context_length is not None and (not isinstance(context_length, int) or context_length < 1):
        raise InvalidArgumentError(f"--context-length (context_length) must be a positive integer, got "
                                   f"{context_length!r}.")
    return keep


def _resolve_source(src: str) -> Path:
    """A local folder, or a hub id downloaded with huggingface_hub (needs network)."""
    path = Path(src).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelNotFoundError(f"{path} is a file; SRC must be a Hugging Face model folder or hub id.",
                                     hint="Pass the folder that holds config.json and the weights.")
        if not os.access(path, os.R_OK | os.X_OK):
            raise ModelNotFoundError(f"{path} is not readable.", hint="Check the folder's permissions.")
        return path
    if _HUB_ID.match(src) and not src.startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download
            return Path(snapshot_download(src, allow_patterns=["*.json", "*.safetensors", "*.bin", "*.model",
                                                               "*.txt", "*.md", "*.jinja", "LICENSE*"]))
        except Exception as exc:  # noqa: BLE001 -- offline, unknown id, gated model: all mean "not available"
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise ModelNotFoundError(f"{src} is not a local folder and could not be downloaded from the Hugging Face "
                                     f"hub ({type(exc).__name__}: {first_line}).",
                                     hint="Check the id and your network, or download the model and pass its folder.")
    raise ModelNotFoundError(f"Source model {src} does not exist.",
                             hint="Pass a local Hugging Face model folder (with config.json) or a hub id like org/name.")


# --- the pipeline --------------------------------------------------------------------------------------------------
def export_model(src: str, out: str, *, quantize: str = "int8", eval_text: str | None = None,
                 max_ppl_increase: float = 0.05, force: bool = False, overwrite: bool = False,
                 progress: bool = True, keep_fp32: Any = (), context_length: int | None = None,
                 threads: int | None = None, via: str | None = None, onnx_file: str | None = None,
                 optimum_python: str | None = None, _gguf: tuple[str, dict[str, Any]] | None = None) -> ExportReport:
    """Export a Hugging Face causal LM folder (or hub id), or a llama.cpp GGUF file, to an edgelm model folder.

    ``quantize``: "int8" (the default: 8-bit weights, each MatMul on the int8 GEMM or block-wise as calibration
    decides), "int8-block", "int8-gemm", "int4", "int4-fp32" (int4 with fp32 activations), "auto" (the smallest
    mode within the gate: int4, int8, int8-block in that order) or "none" (fp32);
    export/quantize.py says what each one is and what it costs.
    ``eval_text``: held-out text for the quality gate (default: a small built-in sample).
    ``max_ppl_increase``: largest allowed relative perplexity increase of the quantized model (0.05 = 5 %);
    a worse model raises QualityGateError unless ``force``. ``keep_fp32``: parts left in fp32
    ("embeddings", "lm_head"). Raises a subclass of EdgeLMError before any work when an input is wrong.
    ``via``: "builder" (our graph), "optimum" (optimum's exporter, run by ``optimum_python``) or "onnx" (the
    folder's ready-made graph, ``onnx_file`` picks one); None picks (export/generic.py, choose_path).
    """
    started = time.perf_counter()
    keep = _check_arguments(quantize, max_ppl_increase, keep_fp32, context_length)
    out_path = Path(out).expanduser()
    if not out_path.name:  # "--out ." (or "/"): the folder's own name, which the work folders beside it carry
        out_path = out_path.resolve()
    out = str(out_path)
    from .gguf import find_gguf, gguf_to_hf_folder
    gguf_file = None if _gguf else find_gguf(src)
    if gguf_file is not None:  # a GGUF: unpack it into a Hugging Face folder beside `out`, export that, remove it
        check_output(out_path, overwrite, gguf_file.parent)
        check_eval_text(Path(eval_text).expanduser() if eval_text else DEFAULT_EVAL_TEXT)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        cleared = clear_stale_work(out_path)
        hf_dir = work_dir(out_path, "gguf")
        try:
            info = gguf_to_hf_folder(gguf_file, hf_dir)
            report = export_model(str(hf_dir), out, quantize=quantize, eval_text=eval_text,
                                  max_ppl_increase=max_ppl_increase, force=force, overwrite=overwrite,
                                  progress=progress, keep_fp32=keep_fp32, context_length=context_length,
                                  threads=threads, _gguf=(src, info))
        finally:
            shutil.rmtree(hf_dir, ignore_errors=True)
        report.notes[:0] = [cleared] if cleared else []
        report.seconds = round(time.perf_counter() - started, 2)
        return report
    src_path = _resolve_source(src)
    from .generic import choose_path, export_generic
    path = choose_path(src_path, read_json_or_empty(src_path / "config.json"), via, onnx_file,
                       weights_bytes(src_path) > 0)
    if path != "builder":  # the generic path: optimum's exporter, or a ready-made ONNX folder
        eval_path = check_eval_text(Path(eval_text).expanduser() if eval_text else DEFAULT_EVAL_TEXT)
        return export_generic(src, src_path, out, via=path, onnx_file=onnx_file, optimum_python_path=optimum_python,
                              quantize=quantize, eval_path=eval_path, max_ppl_increase=float(max_ppl_increase),
                              force=force, overwrite=overwrite, progress=progress, keep=keep,
                              context_length=context_length, threads=threads)
    src_cfg = read_source_config(src_path)
    from .archs import resolve
    arch, builder, model_type = resolve(src_cfg)  # unsupported -> raised here, before any weights are read
    check_tokenizer(src_path)
    max_pos = int(src_cfg.get("max_position_embeddings") or src_cfg.get("n_positions") or 2048)
    check_context_length(context_length, max_pos)
    ctx = context_length or min(max_pos, DEFAULT_MAX_CONTEXT)
    eval_path = check_eval_text(Path(eval_text).expanduser() if eval_text else DEFAULT_EVAL_TEXT)
    check_output(out_path, overwrite, src_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    cleared = clear_stale_work(out_path)  # before the disk check: what it frees counts
    check_disk(out_path.parent, weights_bytes(src_path), quantize)

    work = work_dir(out_path, "export")
    try:
        report = _export(_gguf[0] if _gguf else src, src_path, src_cfg, arch, builder, model_type, out_path, work,
                         quantize=quantize, eval_path=eval_path, max_ppl_increase=float(max_ppl_increase),
                         force=force, progress=progress, keep=keep, context_length=ctx, threads=threads,
                         gguf_info=_gguf[1] if _gguf else None)
    except OSError as exc:
        shutil.rmtree(work, ignore_errors=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT) and not isinstance(exc, EdgeLMError):
            raise OutOfDiskError(f"The disk filled up while writing the export ({exc}); nothing was left behind.",
                                 hint="Free some space or choose an --out on another disk, then rerun.") from exc
        raise
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    report.notes[:0] = [cleared] if cleared else []
    report.seconds = round(time.perf_counter() - started, 2)
    return report


def _export(src: str, src_path: Path, src_cfg: dict[str, Any], arch: str, builder: Any, model_type: str,
            out_path: Path, work: Path, *, quantize: str, eval_path: Path, max_ppl_increase: float, force: bool,
            progress: bool, keep: tuple[str, ...], context_length: int, threads: int | None,
            gguf_info: dict[str, Any] | None = None) -> ExportReport:
    """The export's steps, in order: load, build + verify the fp32 graph, the fp32 folder, quantize, evaluate,
    write. Each step is a function below; this one only sequences them and reports progress."""
    from tqdm.auto import tqdm

    from .quantize import onnx_bytes

    steps = ["load", "build", "verify"] + ([] if quantize == "none" else ["quantize"]) + ["evaluate", "write"]
    bar = tqdm(total=len(steps), desc="export", unit="step", disable=not progress)

    def step(name: str) -> None:
        bar.set_postfix_str(name)

    step("load")
    model = _load_torch_model(src_path, threads, progress)
    bar.update(1)
    step("build")
    fp32_dir, shape = _build_graph(model, builder, model_type, context_length, work)
    bar.update(1)
    step("verify")
    from .verify import verify_against_torch
    max_diff = verify_against_torch(model, fp32_dir / "model.onnx", shape, rtol=VERIFY_RTOL, threads=threads)
    num_params = sum(p.numel() for p in model.parameters())
    del model
    bar.update(1)

    source_info = {"model": src, "path": str(src_path.resolve()), "architecture": arch}
    if gguf_info:  # the unpacked folder is temporary: record the GGUF file itself
        source_info.update(path=gguf_info["path"], gguf=gguf_info)
    fp32_cfg = _write_folder_files(src_path, fp32_dir, src_cfg, arch, model_type, shape, source_info)

    final_dir, quant_info = fp32_dir, {"method": "none", "dtype": "float32", "weights": "fp32 (not quantized)"}
    if quantize != "none":
        step("quantize")
        final_dir, quant_info = choose_variant(fp32_dir, work, fp32_cfg, source_info, quantize, keep, eval_path,
                                          max_ppl_increase=max_ppl_increase, threads=threads, progress=progress)
        bar.update(1)

    step("evaluate")
    metrics = gate(fp32_dir, final_dir, work, fp32_cfg, source_info, quant_info, keep, eval_path,
                        max_ppl_increase=max_ppl_increase, force=force, threads=threads, progress=progress)
    bar.update(1)

    step("write")
    if final_dir is not fp32_dir:
        shutil.rmtree(fp32_dir)  # the fp32 variant was only needed for comparison
    report = ExportReport(out=str(out_path), source=src, architecture=arch, model_type=model_type,
                          quantization=quant_info["method"], context_length=shape.context_length,
                          num_parameters=int(num_params), max_logit_diff=float(max_diff),
                          model_bytes=onnx_bytes(final_dir / "model.onnx"),
                          fp32_model_bytes=quant_info.get("fp32_bytes", onnx_bytes(final_dir / "model.onnx")),
                          metrics=metrics)
    _write_final(report, final_dir, src_path, shape, quant_info, source_info, gguf_info)
    swap_into_place(final_dir, out_path)
    shutil.rmtree(work, ignore_errors=True)
    bar.update(1)
    bar.close()
    return report


def _load_torch_model(src_path: Path, threads: int | None, progress: bool = True) -> Any:
    """The source model with transformers, fp32, in eval mode (``progress=False``: without transformers' own
    "Loading weights" bar, as the CLI's --no-progress)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    if threads:
        torch.set_num_threads(threads)
    bars = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:  # transformers >= 4.56 calls it `dtype`; older ones only know `torch_dtype`
                model, info = AutoModelForCausalLM.from_pretrained(str(src_path), dtype=torch.float32,
                                                                   output_loading_info=True)
            except TypeError:
                model, info = AutoModelForCausalLM.from_pretrained(str(src_path), torch_dtype=torch.float32,
                                                                   output_loading_info=True)
    except Exception as exc:
        raise ExportError(f"transformers could not load {src_path} ({type(exc).__name__}: {exc}).",
                          hint="Check that the weights are complete and match config.json.") from exc
    finally:
        if bars and not progress:
            hf_logging.enable_progress_bar()
    _check_loaded(src_path, info)
    return model.eval()


def _check_loaded(src_path: Path, info: dict[str, Any]) -> None:
    """Refuse a model that transformers completed on its own: a parameter missing from the weight files (or of
    another shape) is *randomly initialised* and loads without an error, and the export's own checks compare
    against that same model, so they pass. (A tied head is not missing: transformers reports only real gaps.)"""
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(str(k[0]) if isinstance(k, (tuple, list)) else str(k)
                        for k in info.get("mismatched_keys") or [])
    if missing or mismatched:
        what = "; ".join(part for part in (
            f"missing: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}" if missing else "",
            f"of another shape than config.json says: {', '.join(mismatched[:5])}"
            f"{' ...' if len(mismatched) > 5 else ''}" if mismatched else "") if part)
        raise ExportError(
            f"The weights in {src_path} do not cover the model its config.json describes ({what}). transformers "
            f"would fill those parameters with random values, and the export would carry them.",
            hint="Re-download or re-save the model (every shard, every tensor), or fix config.json to match it.")


def _build_graph(model: Any, builder: Any, model_type: str, context_length: int, work: Path) -> tuple[Path, Any]:
    """Our fp32 ONNX graph of ``model``, saved as work/fp32/model.onnx; returns (that folder, the graph's shape)."""
    import torch

    from .quantize import save_onnx

    with torch.no_grad():
        graph, shape = builder.build(model, model_type, context_length)
    fp32_dir = work / "fp32"
    fp32_dir.mkdir()
    save_onnx(graph, fp32_dir / "model.onnx")
    return fp32_dir, shape


def _write_folder_files(src_path: Path, fp32_dir: Path, src_cfg: dict[str, Any], arch: str, model_type: str,
                        shape: Any, source_info: dict[str, Any]) -> dict[str, Any]:
    """Tokenizer, config.json, generation_config.json and a provisional manifest (so the runtime can open the fp32
    folder to evaluate it); the same files serve every quantized variant. Returns the config."""
    from edgelm.folder import write_manifest

    tok_cfg = write_tokenizer(src_path, fp32_dir, model_type)
    gen_src = read_json_or_empty(src_path / "generation_config.json")
    cfg = edgelm_config(arch, model_type, shape, src_cfg, gen_src, tok_cfg, "float32")
    (fp32_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    gen = generation_config(src_path, cfg["bos_token_id"], cfg["eos_token_ids"], cfg["pad_token_id"])
    (fp32_dir / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")
    write_manifest(fp32_dir, source=source_info)
    return cfg


def _write_final(report: ExportReport, final_dir: Path, src_path: Path, shape: Any, quant_info: dict[str, Any],
                 source_info: dict[str, Any], gguf_info: dict[str, Any] | None) -> None:
    """The card, the source's licence files, and the final manifest (last: it checksums everything else)."""
    from edgelm.folder import write_manifest

    (final_dir / "README.md").write_text(model_card(report, shape, src_path, quant_info, licence_notes(src_path),
                                                     gguf_info), encoding="utf-8")
    for lic in src_path.glob("LICENSE*"):
        if lic.is_file():
            shutil.copyfile(lic, final_dir / lic.name)
    (final_dir / "edgelm.json").unlink(missing_ok=True)
    write_manifest(final_dir, source=source_info, producer=producer(), quantization=quant_info,
                   verification={"max_abs_logit_diff": report.max_logit_diff, "rtol": VERIFY_RTOL},
                   metrics=report.metrics, num_parameters=report.num_parameters, export={"path": "builder"})
