"""What every export path shares (the builder in convert.py, the generic path in generic.py): checks on the
source and the output, the model folder's files (tokenizer, config, generation config, card, manifest), the
quantized variants with their calibration, ``--quantize auto``, and the quality gate with its helpful refusal.

A library module: it imports neither convert.py nor generic.py, so the two paths sit side by side on top of it.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgelm.errors import (
    ExportError,
    InvalidArgumentError,
    ModelNotFoundError,
    OutOfDiskError,
    QualityGateError,
    TokenizerError,
)

# --quantize auto: the first of these within the gate, smallest first (int4 decodes level with int8 at 2 threads
# and 0.87x at 1 on SmolLM2-135M-Instruct since int8's LM head ranks on the GEMM: docs/models.md).
AUTO_ORDER = ("int4", "int8", "int8-block")


# When a mode fails the gate, these are tried (more accurate first) so the error can name one that passes.
FALLBACKS = {"int4": ("int8", "int8-block"), "int8-gemm": ("int8", "int8-block"), "int8": ("int8-block",),
             "int8-block": (), "int4-fp32": ("int8-block", "int8")}
# ... and int4 last, when the source is a GGUF with 4-bit matrices: int4's scale + min blocks reproduce those
# exactly, so it can pass where an 8-bit mode (a second rounding) does not (SmolLM2-135M-Instruct's Q4_1: int4
# +0.27 %, int8-block +0.64 %).
GGUF_4BIT = ("Q4_0", "Q4_1", "Q4_K")


def fallbacks(method: str, source_info: dict[str, Any]) -> tuple[str, ...]:
    """The modes to measure, in order, when ``method`` fails the gate."""
    alts = FALLBACKS.get(method, ())
    types = (source_info.get("gguf") or {}).get("quant_types") or {}
    if not method.startswith("int4") and any(t in types for t in GGUF_4BIT):
        alts += ("int4",)
    return alts


# Below this share of fp32's chat answers, the card and the export summary point at int4-fp32 (issue 12's bar).
CHAT_AGREEMENT_HINT_BELOW = 0.90


def chat_agreement_hint(method: str, metrics: dict[str, Any]) -> str | None:
    """A line for the card and the export summary when a quantized chat model's greedy answers leave fp32's
    (every mode with int8 activations flips near-ties: docs/models.md); None when they do not, or the mode is
    already int4-fp32 (then what is left is the weights' own rounding)."""
    from .quantize import FP32_ACTIVATIONS

    share = metrics.get("chat_prefix_agreement")
    if share is None or share >= CHAT_AGREEMENT_HINT_BELOW or method in FP32_ACTIVATIONS:
        return None
    return (f"Chat answers follow fp32's for {100 * share:.0f} % of their length: int8 activations flip near-ties. "
            "For answers that follow fp32's, export with `--quantize int4-fp32` (fp32 activations; a Q4_0/Q4_1/Q8_0 "
            "GGUF's weights come back exactly; decodes slower).")


DEFAULT_EVAL_TEXT = Path(__file__).resolve().parent / "data" / "eval-sample.txt"


# fp32 ONNX vs PyTorch: max |logit diff| allowed, relative to the largest reference logit (at least 1).
# Measured diffs are ~1e-6..1e-5 (float summation order); 1e-3 catches any real graph bug with a wide margin.
VERIFY_RTOL = 1e-3


# Default context when the source allows more: rotary tables and masks grow with it, and edge devices rarely
# hold longer caches. Pass context_length= to build for more (up to the source's max positions).
DEFAULT_MAX_CONTEXT = 4096


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
    notes: list[str] = field(default_factory=list)  # what the export did besides writing (said after its summary)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- checks on the source and the output, done before any work ----------------------------------------------------
def read_source_config(path: Path) -> dict[str, Any]:
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


def check_tokenizer(path: Path) -> None:
    if not ((path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file()):
        raise TokenizerError(f"{path} has no tokenizer (neither tokenizer.json nor tokenizer.model).",
                             hint="Copy the model's tokenizer files into the folder (tokenizer.save_pretrained).")


def check_eval_text(path: Path) -> Path:
    if path.is_dir():
        raise InvalidArgumentError(f"Evaluation text {path} is a folder.", hint="Pass a UTF-8 text file to --eval-text.")
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


def weights_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir()
               if p.is_file() and p.suffix in (".safetensors", ".bin", ".pt", ".pth"))


def check_output(out: Path, overwrite: bool, src: Path) -> None:
    """Refuse an ``out`` the export must not write: the source folder, a folder that holds the source (replacing
    it would delete the source), an existing folder without ``overwrite``, and with it any existing folder that
    an earlier export did not write (no edgelm.json): ``--overwrite`` replaces a model folder, never a folder of
    other files (``--out ~ --overwrite`` would otherwise delete the home folder)."""
    o, s = out.resolve(), src.resolve()
    if o == s:
        raise InvalidArgumentError(f"--out {out} is the source folder.", hint="Choose a new folder for the export.")
    if o in s.parents:
        raise InvalidArgumentError(f"--out {out} contains the source {src}: writing the export there would replace "
                                   f"the source with it.", hint="Choose a new folder for the export.")
    if out.exists() and not out.is_dir():
        raise ExportError(f"Output path {out} exists and is not a folder.", hint="Remove it or choose another --out.")
    if out.exists() and not overwrite:
        raise ExportError(f"Output folder {out} already exists.",
                          hint="Choose another --out, or pass --overwrite to replace it.")
    if out.exists() and not (out / "edgelm.json").is_file() and any(out.iterdir()):
        raise ExportError(f"Output folder {out} is not an edgelm model folder (no edgelm.json), so --overwrite "
                          f"will not replace it: everything in it would be deleted.",
                          hint="Choose another --out, or empty or remove that folder yourself first.")


def check_context_length(context_length: int | None, max_pos: int) -> None:
    """An asked --context-length the model's position table cannot hold is refused before any work."""
    if context_length is not None and context_length > max_pos:
        raise InvalidArgumentError(f"--context-length {context_length} is longer than the model's {max_pos} "
                                   f"positions.", hint=f"Pass --context-length (context_length) <= {max_pos}.")


def check_disk(parent: Path, src_bytes: int, quantize: str) -> None:
    # Work files: the fp32 graph (~ source size in fp32), plus the quantized copy and its staging folder.
    need = int(src_bytes * {"none": 1.0, "auto": 3.0}.get(quantize, 2.0)) + (64 << 20)
    free = shutil.disk_usage(parent).free
    if free < need:
        raise OutOfDiskError(f"Not enough free disk space in {parent}: about {need >> 20} MiB needed, "
                             f"{free >> 20} MiB free.", hint="Free some space or choose an --out on another disk.")


# --- the folder's files --------------------------------------------------------------------------------------------
def token_ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def write_tokenizer(src: Path, dst: Path, model_type: str) -> dict[str, Any]:
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
        tok_cfg["add_bos_token"] = bool(post_processor_adds_bos(dst / "tokenizer.json"))
    (dst / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return tok_cfg


def post_processor_adds_bos(tokenizer_json: Path) -> bool | None:
    try:
        data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return adds_special_first(data.get("post_processor") or {})


def adds_special_first(pp: dict[str, Any]) -> bool:
    """Does this tokenizers post-processor put a special token before a single text? (Sequence: any member.)"""
    kind = pp.get("type")
    if kind == "Sequence":
        return any(adds_special_first(p) for p in pp.get("processors") or [] if isinstance(p, dict))
    if kind == "TemplateProcessing":
        single = pp.get("single") or []
        return bool(single) and isinstance(single[0], dict) and "SpecialToken" in single[0]
    return kind in ("BertProcessing", "RobertaProcessing")  # [CLS] / <s> first


def generation_config(src: Path, bos: int | None, eos: list[int], pad: int | None) -> dict[str, Any]:
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


def edgelm_config(arch: str, model_type: str, shape: Any, src_cfg: dict[str, Any], gen_src: dict[str, Any],
                   tok_cfg: dict[str, Any], dtype: str) -> dict[str, Any]:
    bos = gen_src.get("bos_token_id", src_cfg.get("bos_token_id"))
    eos = token_ids(gen_src.get("eos_token_id", src_cfg.get("eos_token_id")))
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


def read_json_or_empty(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def licence_notes(src: Path) -> str:
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


def model_card(report: ExportReport, shape: Any, src: Path, quant: dict[str, Any], licence: str,
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
        f"| graph + weights (model.onnx, model.onnx.data) | {report.model_bytes / 1e6:.2f} MB "
        f"(fp32 {report.fp32_model_bytes / 1e6:.2f} MB) |",
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
                          "(share of each fp32 answer before the first differing token)"
                          + (f"; fed fp32's answers one decode step at a time, the quantized model picks fp32's "
                             f"token at {100 * m['chat_step_agreement']:.1f} % of the steps (one near-tie ends an "
                             "answer's shared prefix, but counts once here)" if "chat_step_agreement" in m else "")
                          + "."]
            hint = chat_agreement_hint(quant.get("method", ""), m)
            if hint:
                lines += ["", hint]
        if m.get("auto"):
            lines += ["", "`--quantize auto` tried, smallest first:", "", "| mode | perplexity change | size | within gate |",
                      "| --- | --- | --- | --- |"]
            lines += [f"| {t['method']} | {100 * t['ppl_increase']:+.2f} % | {t['bytes'] / 1e6:.1f} MB | "
                      f"{'yes' if t['passed'] else 'no'} |" for t in m["auto"]]
        lines.append("")
    lines += ["## Licence", "", licence or "The source folder carries no licence notes; check the source model's terms.", ""]
    return "\n".join(lines)


def producer() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version
    out = {}
    for pkg in ("edgelm", "torch", "transformers", "onnx", "onnxruntime"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


# --- the gate, quantized variants, --quantize auto, and a refusal that names a mode that passes -------------------
def gate(fp32_dir: Path, final_dir: Path, work: Path, fp32_cfg: dict[str, Any], source_info: dict[str, Any],
              quant_info: dict[str, Any], keep: tuple[str, ...], eval_path: Path, *, max_ppl_increase: float,
              force: bool, threads: int | None, progress: bool) -> dict[str, Any]:
    """The quality gate; when it refuses, the error names a mode that passes (measured)."""
    from .evaluate import quality_gate

    refused = None
    try:
        metrics = quality_gate(fp32_dir, None if final_dir == fp32_dir else final_dir, eval_path,
                               max_ppl_increase=max_ppl_increase, force=force, threads=threads, progress=progress)
    except QualityGateError as exc:
        # Keep the message only: the exception's traceback holds the gate's frames and so both models it loaded
        # (Gemma 3 270M, fp32 + int4: several GB), which would stay alive while the fallbacks below load and
        # calibrate more (that run was killed for memory at 24 GB before this).
        refused = QualityGateError(exc.message)
    if refused is not None:
        import gc

        gc.collect()
        raise with_passing_mode(refused, fp32_dir, work, fp32_cfg, source_info, quant_info["method"], keep,
                                eval_path, max_ppl_increase=max_ppl_increase, threads=threads) from None
    if quant_info.get("auto"):
        metrics["auto"] = quant_info["auto"]
    # The shipped weights' held-out nats/token: the runtime's router sets its prompt-score threshold relative to it
    # (edgelm.hybrid.reference_nats_per_token, which derives the same number for folders written before this field).
    bpb = metrics.get("quantized_bits_per_byte", metrics.get("fp32_bits_per_byte"))
    if bpb is not None and metrics.get("eval_tokens"):
        metrics["nats_per_token"] = bpb * metrics["eval_bytes"] * math.log(2) / metrics["eval_tokens"]
    return metrics


# Work folders beside --out carry the exporting process's id: ".NAME.edgelm-KIND-PID-random". An export killed
# outright (SIGKILL, the kernel's out-of-memory killer: a 135M GGUF export peaks near 3 GB) cannot remove its own,
# so the next export to the same --out removes those whose process is gone (a live one is another export's).
_WORK = re.compile(r"^\.(?P<name>.+)\.edgelm-(?:export|gguf|old)-(?P<pid>\d+)(?:-.*)?$")


def work_dir(out_path: Path, kind: str) -> Path:
    """A fresh hidden work folder beside ``out_path`` (``kind``: "export" or "gguf")."""
    return Path(tempfile.mkdtemp(prefix=f".{out_path.name}.edgelm-{kind}-{os.getpid()}-", dir=out_path.parent))


def clear_stale_work(out_path: Path) -> str | None:
    """Remove the work folders of earlier exports to ``out_path`` whose process no longer runs; a note saying what
    went (None when nothing did)."""
    gone, size = 0, 0
    try:
        entries = list(out_path.parent.iterdir())
    except OSError:
        return None
    for entry in entries:
        m = _WORK.match(entry.name)
        if not m or m["name"] != out_path.name or not entry.is_dir() or _alive(int(m["pid"])):
            continue
        size += sum(f.stat().st_size for f in entry.rglob("*") if f.is_file() and not f.is_symlink())
        shutil.rmtree(entry, ignore_errors=True)
        gone += 1
    if not gone:
        return None
    return (f"removed {gone} work folder{'s' * (gone > 1)} ({size / 1e6:,.0f} MB) that an interrupted export "
            f"to {out_path} left beside it")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists, but belongs to someone else
        return True
    return True


def swap_into_place(final_dir: Path, out_path: Path) -> None:
    """Rename the finished folder to ``out_path``: a failed export never leaves a half folder there."""
    if out_path.exists():
        old = out_path.with_name(f".{out_path.name}.edgelm-old-{os.getpid()}")  # a killed swap: clear_stale_work
        os.replace(out_path, old)
        os.replace(final_dir, out_path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(final_dir, out_path)


def quantized_variant(fp32_dir: Path, work: Path, fp32_cfg: dict[str, Any], source_info: dict[str, Any], method: str,
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
    write_manifest(q_dir, source=source_info, quantization=info)  # the runtime reads how rows are computed
    return q_dir, info


def int8_plan(fp32_dir: Path, fp32_cfg: dict[str, Any], threads: int | None) -> dict[str, str]:
    """Calibrate the fp32 graph on the built-in calibration tokens and choose each MatMul's int8 kernel."""
    from .evaluate import calibration_ids
    from .quantize import calibrate, plan_int8

    return plan_int8(calibrate(fp32_dir / "model.onnx", fp32_cfg, calibration_ids(fp32_dir, threads), threads=threads))


def choose_variant(fp32_dir: Path, work: Path, fp32_cfg: dict[str, Any], source_info: dict[str, Any], method: str,
              keep: tuple[str, ...], eval_path: Path, *, max_ppl_increase: float, threads: int | None,
              progress: bool) -> tuple[Path, dict[str, Any]]:
    """The quantized folder for ``method``; for "auto", the first of AUTO_ORDER within the gate (all tried are
    recorded in the manifest: info["auto"])."""
    if method != "auto":
        plan = int8_plan(fp32_dir, fp32_cfg, threads) if method == "int8" else None
        return quantized_variant(fp32_dir, work, fp32_cfg, source_info, method, keep, plan, progress)
    from .evaluate import ppl_increase

    tried: list[dict[str, Any]] = []
    plan = None
    for cand in AUTO_ORDER:
        if cand == "int8":
            plan = int8_plan(fp32_dir, fp32_cfg, threads)
        q_dir, info = quantized_variant(fp32_dir, work, fp32_cfg, source_info, cand, keep, plan, progress)
        inc = ppl_increase(fp32_dir, q_dir, eval_path, threads)
        tried.append({"method": cand, "ppl_increase": inc, "bytes": info["bytes"], "passed": inc <= max_ppl_increase})
        if inc <= max_ppl_increase:
            info["auto"] = tried
            return q_dir, info
    # None passed: hand the most accurate one to the gate, which refuses it with the numbers.
    info["auto"] = tried
    return q_dir, info


def with_passing_mode(exc: QualityGateError, fp32_dir: Path, work: Path, fp32_cfg: dict[str, Any],
                       source_info: dict[str, Any], method: str, keep: tuple[str, ...], eval_path: Path, *,
                       max_ppl_increase: float, threads: int | None) -> QualityGateError:
    """The gate refused ``method``: measure the more accurate modes and name the first that passes."""
    from .evaluate import ppl_increase

    tried = []
    for alt in fallbacks(method, source_info):
        plan = int8_plan(fp32_dir, fp32_cfg, threads) if alt == "int8" else None
        q_dir, _ = quantized_variant(fp32_dir, work, fp32_cfg, source_info, alt, keep, plan, False)
        inc = ppl_increase(fp32_dir, q_dir, eval_path, threads)
        tried.append(f"--quantize {alt}: {100 * inc:+.2f} %")
        if inc <= max_ppl_increase:
            return QualityGateError(exc.message, hint=f"Measured on the same text, --quantize {alt} passes "
                                    f"({100 * inc:+.2f} %): rerun with it (or --quantize auto for the smallest mode "
                                    f"that passes). Or raise --max-ppl-increase, or --force to write this one anyway.")
    measured = (" Also measured: " + "; ".join(tried) + ", all over the limit.") if tried else ""
    return QualityGateError(exc.message + measured,
                            hint="Export with --quantize none (fp32), raise --max-ppl-increase, or pass --force to "
                                 "write the quantized model anyway.")
