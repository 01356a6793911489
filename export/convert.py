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

import argparse
import errno
import json
import os
import re
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgelm.errors import (
    EdgeLMError,
    ExportError,
    InvalidArgumentError,
    ModelNotFoundError,
    OutOfDiskError,
    QualityGateError,
    TokenizerError,
)

QUANTIZE_CHOICES = ("int8", "int8-block", "int8-gemm", "int4", "auto", "none")
# --quantize auto: the first of these (fastest decode first, measured in docs/models.md) within the gate.
AUTO_ORDER = ("int4", "int8", "int8-block")
# When a mode fails the gate, these are tried (more accurate first) so the error can name one that passes.
FALLBACKS = {"int4": ("int8", "int8-block"), "int8-gemm": ("int8", "int8-block"), "int8": ("int8-block",),
             "int8-block": ()}
KEEP_FP32_CHOICES = ("embeddings", "lm_head")
DEFAULT_EVAL_TEXT = Path(__file__).resolve().parent / "data" / "eval-sample.txt"
# fp32 ONNX vs PyTorch: max |logit diff| allowed, relative to the largest reference logit (at least 1).
# Measured diffs are ~1e-6..1e-5 (float summation order); 1e-3 catches any real graph bug with a wide margin.
VERIFY_RTOL = 1e-3
# Default context when the source allows more: rotary tables and masks grow with it, and edge devices rarely
# hold longer caches. Pass context_length= to build for more (up to the source's max positions).
DEFAULT_MAX_CONTEXT = 4096
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class ExportReport:
    """What an export produced and measured."""

    out: str
    source: str
    architecture: str
    model_type: str
    quantization: str
    context_length: int
    num_parameters: int
    max_logit_diff: float                # fp32 ONNX vs PyTorch, over all verification steps
    model_bytes: int                     # size of model.onnx in the folder
    fp32_model_bytes: int
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- checks done before any work -------------------------------------------------------------------------------
def _check_arguments(quantize: str, max_ppl_increase: float, keep_fp32: Any, context_length: int | None) -> tuple[str, ...]:
    if quantize not in QUANTIZE_CHOICES:
        raise InvalidArgumentError(f"quantize={quantize!r} is not one of {', '.join(QUANTIZE_CHOICES)}.",
                                   hint="Use --quantize int8 (the default) or --quantize none for fp32.")
    if not isinstance(max_ppl_increase, (int, float)) or max_ppl_increase < 0:
        raise InvalidArgumentError(f"max_ppl_increase must be a number >= 0 (a fraction: 0.05 = 5 %), got {max_ppl_increase!r}.")
    if isinstance(keep_fp32, str):
        keep_fp32 = [k for k in keep_fp32.split(",") if k.strip()]
    keep = tuple(k.strip() for k in keep_fp32)
    bad = [k for k in keep if k not in KEEP_FP32_CHOICES]
    if bad:
        raise InvalidArgumentError(f"keep_fp32 entries {bad} are unknown; choose from {', '.join(KEEP_FP32_CHOICES)}.")
    if context_length is not None and (not isinstance(context_length, int) or context_length < 1):
        raise InvalidArgumentError(f"context_length must be a positive integer, got {context_length!r}.")
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


def _read_source_config(path: Path) -> dict[str, Any]:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise ModelNotFoundError(f"{cfg_path} is missing: {path} is not a Hugging Face model folder.",
                                 hint="Pass the folder written by save_pretrained (config.json + weights + tokenizer).")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExportError(f"{cfg_path} cannot be read ({exc}).", hint="Restore or re-download the source model.")
    if not isinstance(cfg, dict):
        raise ExportError(f"{cfg_path} does not hold a JSON object.", hint="Restore or re-download the source model.")
    return cfg


def _check_tokenizer(path: Path) -> None:
    if not ((path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file()):
        raise TokenizerError(f"{path} has no tokenizer (neither tokenizer.json nor tokenizer.model).",
                             hint="Copy the model's tokenizer files into the folder (tokenizer.save_pretrained).")


def _check_eval_text(path: Path) -> Path:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InvalidArgumentError(f"Evaluation text {path} does not exist.", hint="Pass an existing --eval-text FILE.")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidArgumentError(f"Evaluation text {path} cannot be read as UTF-8 ({exc}).",
                                   hint="Pass a UTF-8 text file to --eval-text.")
    if len(text.split()) < 20:
        raise InvalidArgumentError(f"Evaluation text {path} is too short to measure anything (under 20 words).",
                                   hint="Pass a few kilobytes of held-out text in the model's language.")
    return path


def _weights_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir()
               if p.is_file() and p.suffix in (".safetensors", ".bin", ".pt", ".pth"))


def _check_output(out: Path, overwrite: bool, src: Path) -> None:
    if out.resolve() == src.resolve():
        raise InvalidArgumentError(f"--out {out} is the source folder.", hint="Choose a new folder for the export.")
    if out.exists() and not overwrite:
        raise ExportError(f"Output folder {out} already exists.",
                          hint="Choose another --out, or pass --overwrite to replace it.")
    if out.exists() and not out.is_dir():
        raise ExportError(f"Output path {out} exists and is not a folder.", hint="Remove it or choose another --out.")


def _check_disk(parent: Path, src_bytes: int, quantize: str) -> None:
    # Work files: the fp32 graph (~ source size in fp32), plus the quantized copy and its staging folder.
    need = int(src_bytes * {"none": 1.0, "auto": 3.0}.get(quantize, 2.0)) + (64 << 20)
    free = shutil.disk_usage(parent).free
    if free < need:
        raise OutOfDiskError(f"Not enough free disk space in {parent}: about {need >> 20} MiB needed, "
                             f"{free >> 20} MiB free.", hint="Free some space or choose an --out on another disk.")


# --- the folder files ----------------------------------------------------------------------------------------------
def _token_ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def _write_tokenizer(src: Path, dst: Path, model_type: str) -> dict[str, Any]:
    """Copy (or produce) tokenizer.json and tokenizer_config.json; return the tokenizer config."""
    if (src / "tokenizer.json").is_file():
        shutil.copyfile(src / "tokenizer.json", dst / "tokenizer.json")
    else:  # only a SentencePiece tokenizer.model: let transformers convert it to a fast tokenizer
        from transformers import AutoTokenizer
        try:
            tok = AutoTokenizer.from_pretrained(str(src), use_fast=True)
            tok.backend_tokenizer.save(str(dst / "tokenizer.json"))
        except Exception as exc:
            raise TokenizerError(f"Could not convert {src / 'tokenizer.model'} to tokenizer.json ({exc}).",
                                 hint="Install sentencepiece and protobuf, or provide tokenizer.json.") from exc
    tok_cfg: dict[str, Any] = {}
    if (src / "tokenizer_config.json").is_file():
        try:
            tok_cfg = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise TokenizerError(f"{src / 'tokenizer_config.json'} cannot be read ({exc}).",
                                 hint="Restore the file or remove it.") from exc
    # Newer transformers keep the chat template in its own file; the runtime reads it from tokenizer_config.json.
    if "chat_template" not in tok_cfg and (src / "chat_template.jinja").is_file():
        tok_cfg["chat_template"] = (src / "chat_template.jinja").read_text(encoding="utf-8")
    tok_cfg.pop("auto_map", None)  # points at remote code the runtime never runs
    if "add_bos_token" not in tok_cfg:
        # The source's truth when its config is silent: what its tokenizer.json's post-processor does. (Never the
        # other way round: SmolLM2 sets no flag and adds no BOS; guessing "yes" put <|im_start|> before every text.)
        tok_cfg["add_bos_token"] = bool(_post_processor_adds_bos(dst / "tokenizer.json"))
    (dst / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return tok_cfg


def _post_processor_adds_bos(tokenizer_json: Path) -> bool | None:
    try:
        data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return _adds_special_first(data.get("post_processor") or {})


def _adds_special_first(pp: dict[str, Any]) -> bool:
    """Does this tokenizers post-processor put a special token before a single text? (Sequence: any member.)"""
    kind = pp.get("type")
    if kind == "Sequence":
        return any(_adds_special_first(p) for p in pp.get("processors") or [] if isinstance(p, dict))
    if kind == "TemplateProcessing":
        single = pp.get("single") or []
        return bool(single) and isinstance(single[0], dict) and "SpecialToken" in single[0]
    return kind in ("BertProcessing", "RobertaProcessing")  # [CLS] / <s> first


def _generation_config(src: Path, bos: int | None, eos: list[int], pad: int | None) -> dict[str, Any]:
    """Our sampling defaults, overridden by the source's own when it asks for sampling."""
    gen: dict[str, Any] = {"temperature": 0.8, "top_p": 0.95, "top_k": 50, "repetition_penalty": 1.0,
                           "max_new_tokens": 128}
    src_gen: dict[str, Any] = {}
    if (src / "generation_config.json").is_file():
        try:
            src_gen = json.loads((src / "generation_config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            src_gen = {}
    if src_gen.get("do_sample"):
        for k in ("temperature", "top_p", "top_k", "repetition_penalty"):
            if src_gen.get(k) is not None:
                gen[k] = src_gen[k]
    gen.update({"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad})
    return gen


def _edgelm_config(arch: str, model_type: str, shape: Any, src_cfg: dict[str, Any], gen_src: dict[str, Any],
                   tok_cfg: dict[str, Any], dtype: str) -> dict[str, Any]:
    bos = gen_src.get("bos_token_id", src_cfg.get("bos_token_id"))
    eos = _token_ids(gen_src.get("eos_token_id", src_cfg.get("eos_token_id")))
    pad = gen_src.get("pad_token_id", src_cfg.get("pad_token_id"))
    kv_cache = getattr(shape, "kv_cache", "concat")
    inputs = {"input_ids": "int64", "attention_mask": "int64"}
    if kv_cache == "concat":  # the fused "shared" graph derives positions from the mask
        inputs["position_ids"] = "int64"
    inputs["logits_from"] = "int64"  # optional: it has a default (docs/model-format.md)
    outputs = {"logits": "float32"}
    for i in range(shape.num_layers):
        inputs[f"past_key_values.{i}.key"] = inputs[f"past_key_values.{i}.value"] = "float32"
        outputs[f"present.{i}.key"] = outputs[f"present.{i}.value"] = "float32"
    outputs["last_logprobs"] = "float32"
    return {
        "format": "edgelm/1", "model_type": model_type, "source_architecture": arch,
        "num_layers": shape.num_layers, "num_attention_heads": shape.num_attention_heads,
        "num_kv_heads": shape.num_kv_heads, "head_dim": shape.head_dim, "hidden_size": shape.hidden_size,
        "vocab_size": shape.vocab_size, "context_length": shape.context_length,
        "bos_token_id": None if bos is None else int(bos), "eos_token_ids": eos,
        "pad_token_id": None if pad is None else int(pad),
        "add_bos_token": bool(tok_cfg.get("add_bos_token", False)), "dtype": dtype,
        "onnx": {"file": "model.onnx", "kv_cache": kv_cache, "inputs": inputs, "outputs": outputs,
                 # the oldest onnxruntime that runs the graph as built (windowed fused graphs); the runtime checks it
                 **({"min_onnxruntime": shape.min_onnxruntime} if getattr(shape, "min_onnxruntime", None) else {})},
    }


def _read_json_or_empty(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _licence_notes(src: Path) -> str:
    """Licence lines carried from the source card: YAML front matter `license:` and any licence section."""
    readme = src / "README.md"
    if not readme.is_file():
        return ""
    text = readme.read_text(encoding="utf-8", errors="replace")
    notes = []
    m = re.search(r"^license:\s*(\S+)", text, re.MULTILINE)
    if m:
        notes.append(f"Source licence (from its model card): `{m.group(1)}`.")
    idx = max(text.find("MIT License"), text.lower().find("## licen"), text.find("Apache License"))
    if idx >= 0:
        notes.append("Licence text carried from the source model card:\n\n" + text[idx:].strip())
    elif "licen" in text.lower() and not notes:
        notes.append("The source model card mentions licence terms; see it before redistributing this model.")
    return "\n\n".join(notes)


def _model_card(report: ExportReport, shape: Any, src: Path, quant: dict[str, Any], licence: str,
                gguf: dict[str, Any] | None = None, path: str = "builder (export/archs/)") -> str:
    m = report.metrics
    lines = [
        f"# {Path(report.out).name}", "",
        f"Exported by `edgelm export` from `{report.source}` ({report.architecture}).", "",
    ]
    if gguf:
        types = ", ".join(f"{t} x{n}" for t, n in gguf["quant_types"].items())
        lines += [f"Source: the GGUF file `{gguf['file']}` (llama.cpp architecture `{gguf['architecture']}`, tensors "
                  f"{types}, sha256 `{gguf['sha256']}`), dequantized to fp32 by export/gguf.py.", ""]
    lines += [
        "| | |", "| --- | --- |",
        f"| path | {path} |",
        f"| family | {report.model_type} |", f"| parameters | {report.num_parameters:,} |",
        f"| layers | {shape.num_layers} |", f"| hidden size | {shape.hidden_size} |",
        f"| attention heads / KV heads | {shape.num_attention_heads} / {shape.num_kv_heads} |",
        f"| head size | {shape.head_dim} |", f"| vocabulary | {shape.vocab_size} |",
        f"| context length | {shape.context_length} |",
        f"| weights | {quant.get('weights', 'fp32')} |",
        f"| model.onnx | {report.model_bytes / 1e6:.2f} MB (fp32 graph {report.fp32_model_bytes / 1e6:.2f} MB) |",
        f"| fp32 ONNX vs PyTorch, max abs logit diff | {report.max_logit_diff:.2e} |", "",
    ]
    if m:
        measured = f"Measured on `{m.get('eval_text', '?')}` ({m.get('eval_bytes', '?')} bytes) with the edgelm runtime."
        lines += ["## Quality at export", "", measured, "",
                  "| model | perplexity | bits per byte |", "| --- | --- | --- |"]
        for tag in ("fp32", "quantized"):
            if f"{tag}_perplexity" in m:
                lines.append(f"| {tag} | {m[f'{tag}_perplexity']:.4f} | {m[f'{tag}_bits_per_byte']:.4f} |")
        if "ppl_increase" in m:
            summary = (f"Perplexity increase: {100 * m['ppl_increase']:.2f} % (gate: {100 * m['max_ppl_increase']:.1f} %"
                       f"{', forced' if m.get('forced') else ''}). Greedy agreement with fp32 over "
                       f"{m.get('agreement_prompts')} prompts x {m.get('agreement_tokens')} tokens: "
                       f"{100 * m.get('greedy_token_agreement', 0):.1f} % of tokens, "
                       f"{100 * m.get('greedy_prefix_agreement', 0):.1f} % before the first divergence.")
            lines += ["", summary]
        if "chat_prefix_agreement" in m:
            lines += ["", f"Greedy chat answers to {m['chat_prompts']} built-in prompts (up to {m['chat_tokens']} tokens) "
                          f"follow fp32's for {100 * m['chat_prefix_agreement']:.1f} % of their length on average "
                          "(share of each fp32 answer before the first differing token)."]
        if m.get("auto"):
            lines += ["", "`--quantize auto` tried, fastest first:", "", "| mode | perplexity change | size | within gate |",
                      "| --- | --- | --- | --- |"]
            lines += [f"| {t['method']} | {100 * t['ppl_increase']:+.2f} % | {t['bytes'] / 1e6:.1f} MB | "
                      f"{'yes' if t['passed'] else 'no'} |" for t in m["auto"]]
        lines.append("")
    lines += ["## Licence", "", licence or "The source folder carries no licence notes; check the source model's terms.", ""]
    return "\n".join(lines)


def _producer() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version
    out = {}
    for pkg in ("edgelm", "torch", "transformers", "onnx", "onnxruntime"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


# --- the pipeline --------------------------------------------------------------------------------------------------
def export_model(src: str, out: str, *, quantize: str = "int8", eval_text: str | None = None,
                 max_ppl_increase: float = 0.05, force: bool = False, overwrite: bool = False,
                 progress: bool = True, keep_fp32: Any = (), context_length: int | None = None,
                 threads: int | None = None, via: str | None = None, onnx_file: str | None = None,
                 optimum_python: str | None = None, _gguf: tuple[str, dict[str, Any]] | None = None) -> ExportReport:
    """Export a Hugging Face causal LM folder (or hub id), or a llama.cpp GGUF file, to an edgelm model folder.

    ``quantize``: "int8" (the default: 8-bit weights, each MatMul on the int8 GEMM or block-wise as calibration
    decides), "int8-block", "int8-gemm", "int4", "auto" (the fastest mode within the gate) or "none" (fp32);
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
    from .gguf import find_gguf, gguf_to_hf_folder
    gguf_file = None if _gguf else find_gguf(src)
    if gguf_file is not None:  # a GGUF: unpack it into a Hugging Face folder beside `out`, export that, remove it
        _check_output(Path(out).expanduser(), overwrite, gguf_file.parent)
        _check_eval_text(Path(eval_text).expanduser() if eval_text else DEFAULT_EVAL_TEXT)
        Path(out).expanduser().parent.mkdir(parents=True, exist_ok=True)
        hf_dir = Path(tempfile.mkdtemp(prefix=f".{Path(out).name}.edgelm-gguf-", dir=Path(out).expanduser().parent))
        try:
            info = gguf_to_hf_folder(gguf_file, hf_dir)
            report = export_model(str(hf_dir), out, quantize=quantize, eval_text=eval_text,
                                  max_ppl_increase=max_ppl_increase, force=force, overwrite=overwrite,
                                  progress=progress, keep_fp32=keep_fp32, context_length=context_length,
                                  threads=threads, _gguf=(src, info))
        finally:
            shutil.rmtree(hf_dir, ignore_errors=True)
        report.seconds = round(time.perf_counter() - started, 2)
        return report
    src_path = _resolve_source(src)
    from .generic import choose_path, export_generic
    path = choose_path(src_path, _read_json_or_empty(src_path / "config.json"), via, onnx_file,
                       _weights_bytes(src_path) > 0)
    if path != "builder":  # the generic path: optimum's exporter, or a ready-made ONNX folder
        eval_path = _check_eval_text(Path(eval_text).expanduser() if eval_text else DEFAULT_EVAL_TEXT)
        return export_generic(src, src_path, out, via=path, onnx_file=onnx_file, optimum_python_path=optimum_python,
                              quantize=quantize, eval_path=eval_path, max_ppl_increase=float(max_ppl_increase),
                              force=force, overwrite=overwrite, progress=progress, keep=keep,
                              context_length=context_length, threads=threads)
    src_cfg = _read_source_config(src_path)
    from .archs import resolve
    arch, builder, model_type = resolve(src_cfg)  # unsupported -> raised here, before any weights are read
    _check_tokenizer(src_path)
    max_pos = int(src_cfg.get("max_position_embeddings") or src_cfg.get("n_positions") or 2048)
    if context_length is not None and context_length > max_pos:
        raise InvalidArgumentError(f"context_length={context_length} is longer than the model's {max_pos} positions.",
                                   hint=f"Pass context_length <= {max_pos}.")
    ctx = context_length or min(max_pos, DEFAULT_MAX_CONTEXT)
    eval_path = _check_eval_text(Path(eval_text).expanduser() if eval_text else DEFAULT_EVAL_TEXT)
    out_path = Path(out).expanduser()
    _check_output(out_path, overwrite, src_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    _check_disk(out_path.parent, _weights_bytes(src_path), quantize)

    work = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.edgelm-export-", dir=out_path.parent))
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
    model = _load_torch_model(src_path, threads)
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
        final_dir, quant_info = _quantize(fp32_dir, work, fp32_cfg, source_info, quantize, keep, eval_path,
                                          max_ppl_increase=max_ppl_increase, threads=threads, progress=progress)
        bar.update(1)

    step("evaluate")
    metrics = _evaluate(fp32_dir, final_dir, work, fp32_cfg, source_info, quant_info, keep, eval_path,
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
    _swap_into_place(final_dir, out_path)
    shutil.rmtree(work, ignore_errors=True)
    bar.update(1)
    bar.close()
    return report


def _load_torch_model(src_path: Path, threads: int | None) -> Any:
    """The source model with transformers, fp32, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    if threads:
        torch.set_num_threads(threads)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:  # transformers >= 4.56 calls it `dtype`; older ones only know `torch_dtype`
                model = AutoModelForCausalLM.from_pretrained(str(src_path), dtype=torch.float32)
            except TypeError:
                model = AutoModelForCausalLM.from_pretrained(str(src_path), torch_dtype=torch.float32)
    except Exception as exc:
        raise ExportError(f"transformers could not load {src_path} ({type(exc).__name__}: {exc}).",
                          hint="Check that the weights are complete and match config.json.") from exc
    return model.eval()


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

    tok_cfg = _write_tokenizer(src_path, fp32_dir, model_type)
    gen_src = _read_json_or_empty(src_path / "generation_config.json")
    cfg = _edgelm_config(arch, model_type, shape, src_cfg, gen_src, tok_cfg, "float32")
    (fp32_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    gen = _generation_config(src_path, cfg["bos_token_id"], cfg["eos_token_ids"], cfg["pad_token_id"])
    (fp32_dir / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")
    write_manifest(fp32_dir, source=source_info)
    return cfg


def _evaluate(fp32_dir: Path, final_dir: Path, work: Path, fp32_cfg: dict[str, Any], source_info: dict[str, Any],
              quant_info: dict[str, Any], keep: tuple[str, ...], eval_path: Path, *, max_ppl_increase: float,
              force: bool, threads: int | None, progress: bool) -> dict[str, Any]:
    """The quality gate; when it refuses, the error names a mode that passes (measured)."""
    from .evaluate import quality_gate

    try:
        metrics = quality_gate(fp32_dir, None if final_dir == fp32_dir else final_dir, eval_path,
                               max_ppl_increase=max_ppl_increase, force=force, threads=threads, progress=progress)
    except QualityGateError as exc:
        raise _with_passing_mode(exc, fp32_dir, work, fp32_cfg, source_info, quant_info["method"], keep, eval_path,
                                 max_ppl_increase=max_ppl_increase, threads=threads) from None
    if quant_info.get("auto"):
        metrics["auto"] = quant_info["auto"]
    return metrics


def _write_final(report: ExportReport, final_dir: Path, src_path: Path, shape: Any, quant_info: dict[str, Any],
                 source_info: dict[str, Any], gguf_info: dict[str, Any] | None) -> None:
    """The card, the source's licence files, and the final manifest (last: it checksums everything else)."""
    from edgelm.folder import write_manifest

    (final_dir / "README.md").write_text(_model_card(report, shape, src_path, quant_info, _licence_notes(src_path),
                                                     gguf_info), encoding="utf-8")
    for lic in src_path.glob("LICENSE*"):
        if lic.is_file():
            shutil.copyfile(lic, final_dir / lic.name)
    (final_dir / "edgelm.json").unlink(missing_ok=True)
    write_manifest(final_dir, source=source_info, producer=_producer(), quantization=quant_info,
                   verification={"max_abs_logit_diff": report.max_logit_diff, "rtol": VERIFY_RTOL},
                   metrics=report.metrics, num_parameters=report.num_parameters, export={"path": "builder"})


def _swap_into_place(final_dir: Path, out_path: Path) -> None:
    """Rename the finished folder to ``out_path``: a failed export never leaves a half folder there."""
    if out_path.exists():
        old = out_path.with_name(f".{out_path.name}.edgelm-old-{os.getpid()}")
        os.replace(out_path, old)
        os.replace(final_dir, out_path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(final_dir, out_path)


# --- quantization: one variant, calibration, --quantize auto, and a gate that names a mode that passes -----------
def _variant(fp32_dir: Path, work: Path, fp32_cfg: dict[str, Any], source_info: dict[str, Any], method: str,
             keep: tuple[str, ...], plan: dict[str, str] | None, progress: bool) -> tuple[Path, dict[str, Any]]:
    """Quantize the fp32 folder's graph with ``method`` into work/METHOD, a folder the runtime can open."""
    from edgelm.folder import write_manifest

    from .quantize import quantize_model

    q_dir = work / method
    shutil.rmtree(q_dir, ignore_errors=True)
    q_dir.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copyfile(fp32_dir / name, q_dir / name)
    info = quantize_model(fp32_dir / "model.onnx", q_dir / "model.onnx", method=method, keep_fp32=keep,
                          plan=plan, progress=progress)
    (q_dir / "config.json").write_text(json.dumps(dict(fp32_cfg, dtype=info["dtype"]), indent=2) + "\n",
                                       encoding="utf-8")
    write_manifest(q_dir, source=source_info)
    return q_dir, info


def _int8_plan(fp32_dir: Path, fp32_cfg: dict[str, Any], threads: int | None) -> dict[str, str]:
    """Calibrate the fp32 graph on the built-in calibration tokens and choose each MatMul's int8 kernel."""
    from .evaluate import calibration_ids
    from .quantize import calibrate, plan_int8

    return plan_int8(calibrate(fp32_dir / "model.onnx", fp32_cfg, calibration_ids(fp32_dir, threads), threads=threads))


def _quantize(fp32_dir: Path, work: Path, fp32_cfg: dict[str, Any], source_info: dict[str, Any], method: str,
              keep: tuple[str, ...], eval_path: Path, *, max_ppl_increase: float, threads: int | None,
              progress: bool) -> tuple[Path, dict[str, Any]]:
    """The quantized folder for ``method``; for "auto", the first of AUTO_ORDER within the gate (all tried are
    recorded in the manifest: info["auto"])."""
    if method != "auto":
        plan = _int8_plan(fp32_dir, fp32_cfg, threads) if method == "int8" else None
        return _variant(fp32_dir, work, fp32_cfg, source_info, method, keep, plan, progress)
    from .evaluate import ppl_increase

    tried: list[dict[str, Any]] = []
    plan = None
    for cand in AUTO_ORDER:
        if cand == "int8":
            plan = _int8_plan(fp32_dir, fp32_cfg, threads)
        q_dir, info = _variant(fp32_dir, work, fp32_cfg, source_info, cand, keep, plan, progress)
        inc = ppl_increase(fp32_dir, q_dir, eval_path, threads)
        tried.append({"method": cand, "ppl_increase": inc, "bytes": info["bytes"], "passed": inc <= max_ppl_increase})
        if inc <= max_ppl_increase:
            info["auto"] = tried
            return q_dir, info
    # None passed: hand the most accurate one to the gate, which refuses it with the numbers.
    info["auto"] = tried
    return q_dir, info


def _with_passing_mode(exc: QualityGateError, fp32_dir: Path, work: Path, fp32_cfg: dict[str, Any],
                       source_info: dict[str, Any], method: str, keep: tuple[str, ...], eval_path: Path, *,
                       max_ppl_increase: float, threads: int | None) -> QualityGateError:
    """The gate refused ``method``: measure the more accurate modes and name the first that passes."""
    from .evaluate import ppl_increase

    tried = []
    for alt in FALLBACKS.get(method, ()):
        plan = _int8_plan(fp32_dir, fp32_cfg, threads) if alt == "int8" else None
        q_dir, _ = _variant(fp32_dir, work, fp32_cfg, source_info, alt, keep, plan, False)
        inc = ppl_increase(fp32_dir, q_dir, eval_path, threads)
        tried.append(f"--quantize {alt}: {100 * inc:+.2f} %")
        if inc <= max_ppl_increase:
            return QualityGateError(exc.message, hint=f"Measured on the same text, --quantize {alt} passes "
                                    f"({100 * inc:+.2f} %): rerun with it (or --quantize auto for the fastest mode "
                                    f"that passes). Or raise --max-ppl-increase, or --force to write this one anyway.")
    measured = (" Also measured: " + "; ".join(tried) + ", all over the limit.") if tried else ""
    return QualityGateError(exc.message + measured,
                            hint="Export with --quantize none (fp32), raise --max-ppl-increase, or pass --force to "
                                 "write the quantized model anyway.")


# --- CLI -----------------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC", nargs="?",
                        help="a local Hugging Face model folder, or a hub id (needs network)")
    parser.add_argument("--out", metavar="DIR", help="the model folder to write (required)")
    parser.add_argument("--list", action="store_true",
                        help="print the supported architecture families (builder, KV cache layout, what was verified)")
    parser.set_defaults(_export_parser=parser)  # run() reports a missing SRC / --out as argparse would
    parser.add_argument("--quantize", choices=QUANTIZE_CHOICES, default="int8",
                        help="weight format: int8 (default) = 8-bit, each matrix on the int8 GEMM where calibration "
                             "shows its activations allow it, else block-wise; int8-block = block-wise 8-bit everywhere "
                             "(most accurate); int8-gemm = int8 GEMMs everywhere (fastest prefill, breaks on models "
                             "with activation outliers); int4 = 4-bit blocks with zero points (smallest); auto = the "
                             "fastest of int4, int8, int8-block within --max-ppl-increase; none = fp32")
    parser.add_argument("--eval-text", metavar="FILE", help="held-out text for the quality gate (default: built-in sample)")
    parser.add_argument("--max-ppl-increase", type=float, default=0.05, metavar="FRACTION",
                        help="refuse a quantized model whose perplexity is more than this much worse (default 0.05 = 5%%)")
    parser.add_argument("--force", action="store_true", help="write the model even if it fails the quality gate")
    parser.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")
    parser.add_argument("--keep-fp32", default="", metavar="PARTS",
                        help="comma-separated parts to leave in fp32: embeddings,lm_head")
    parser.add_argument("--context-length", type=int, metavar="N",
                        help=f"positions to build for (default: the model's, at most {DEFAULT_MAX_CONTEXT})")
    parser.add_argument("--threads", type=int, metavar="N", help="CPU threads for verification and evaluation")
    parser.add_argument("--via", choices=("builder", "optimum", "onnx"),
                        help="force the path: builder (our lean graph, families of --list), optimum (optimum's "
                             "exporter, any causal LM it knows), onnx (SRC's ready-made graph); default: the builder "
                             "when it knows the family, a ready-made graph when SRC has one, else optimum")
    parser.add_argument("--onnx-file", metavar="FILE",
                        help="the graph of a ready-made ONNX folder to use, relative to SRC (e.g. onnx/model_q4.onnx)")
    parser.add_argument("--optimum-python", metavar="PYTHON",
                        help="the python of an environment with optimum-onnx, for --via optimum "
                             "(default: $EDGELM_OPTIMUM_PYTHON, else this python when it has optimum)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    if args.list:
        from .archs import family_table
        print(family_table())
        return 0
    missing = [name for name, value in (("SRC", args.src), ("--out", args.out)) if not value]
    if missing:
        args._export_parser.error(f"the following arguments are required: {', '.join(missing)} (or --list)")
    report = export_model(args.src, args.out, quantize=args.quantize, eval_text=args.eval_text,
                          max_ppl_increase=args.max_ppl_increase, force=args.force, overwrite=args.overwrite,
                          progress=not args.no_progress, keep_fp32=args.keep_fp32,
                          context_length=args.context_length, threads=args.threads, via=args.via,
                          onnx_file=args.onnx_file, optimum_python=args.optimum_python)
    m = report.metrics
    print(f"wrote {report.out}: {report.model_type} ({report.num_parameters:,} parameters), {report.quantization}, "
          f"model.onnx {report.model_bytes / 1e6:.2f} MB, fp32-vs-PyTorch max logit diff {report.max_logit_diff:.1e}")
    if "quantized_perplexity" in m:
        print(f"perplexity fp32 {m['fp32_perplexity']:.4f} -> {report.quantization} {m['quantized_perplexity']:.4f} "
              f"({100 * m['ppl_increase']:+.2f} %), bits/byte {m['fp32_bits_per_byte']:.4f} -> "
              f"{m['quantized_bits_per_byte']:.4f}, greedy agreement {100 * m['greedy_token_agreement']:.1f} %"
              + (f", chat answers {100 * m['chat_prefix_agreement']:.1f} %" if "chat_prefix_agreement" in m else ""))
        for t in m.get("auto") or []:
            print(f"  auto tried {t['method']}: {100 * t['ppl_increase']:+.2f} % "
                  f"({'within' if t['passed'] else 'over'} the gate)")
    elif "fp32_perplexity" in m:
        print(f"perplexity {m['fp32_perplexity']:.4f}, bits/byte {m['fp32_bits_per_byte']:.4f}")
    return 0
