"""The generic path (export/generic.py): optimum's exporter for families the builder lacks, and ready-made ONNX
folders turned into edgelm folders.

Two halves:
  * torch-free (runs wherever the runtime and onnx are installed): a tiny one-layer decoder written here with
    onnx.helper, in another exporter's naming (``past.0.key``, ``present_0_key``, positions taken from the mask
    like ALiBi models, so no ``position_ids`` input), laid out as a published repository does (``onnx/model.onnx``
    + ``onnx/model_q4.onnx``). It is converted in a subprocess where ``import torch`` / ``import transformers``
    fail, and its greedy tokens through the edgelm runtime must equal a cache-free loop over the original graph.
  * optimum (needs a python with optimum-onnx: $EDGELM_OPTIMUM_PYTHON, which .ci/run provides, or this one):
    tiny random GPT-NeoX, OPT, Bloom, Falcon, StableLM and OLMo configs built here; fp32 greedy through the
    runtime equals transformers' ``generate`` token for token, int8 passes the gate, and a folder written by
    optimum's own CLI converts without torch.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import STORIES260K, cached_export

onnx = pytest.importorskip("onnx")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

VOCAB, CTX, C, H, D = 512, 256, 32, 2, 16  # CTX >= the int8 calibration prefill (256 tokens)
NEW_TOKENS = 48


def _needs_tokenizer() -> None:
    if not STORIES260K.is_dir():
        pytest.skip("stories260K tokenizer fixture not available")


# --- a hand-built decoder graph in another exporter's naming -------------------------------------------------------
def _tiny_graph(seed: int = 0) -> onnx.ModelProto:
    """One attention layer + MLP, learned positions from CumSum(mask) - 1 (as ALiBi graphs do, no position_ids),
    cache names past.0.key / present_0_key, so normalize_graph has renaming and position_ids to do."""
    rng = np.random.default_rng(seed)
    w = {name: numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)
         for name, shape, scale in (("emb", (VOCAB, C), 0.5), ("pos", (CTX, C), 0.3), ("wq", (C, C), 0.4),
                                    ("wk", (C, C), 0.4), ("wv", (C, C), 0.4), ("wo", (C, C), 0.3),
                                    ("w1", (C, 4 * C), 0.3), ("w2", (4 * C, C), 0.2), ("lm", (C, VOCAB), 0.3))}
    consts = {"zero": [0], "one": [1], "minus1": [-1], "big": [2**62], "heads": [0, 0, H, D], "merge": [0, 0, C],
              "axes1": [1], "axes12": [1, 2], "axis0": [0], "two": [2]}
    inits = [*w.values(), *(numpy_helper.from_array(np.asarray(v, np.int64), k) for k, v in consts.items()),
             numpy_helper.from_array(np.asarray(1 / np.sqrt(D), np.float32), "scale"),
             numpy_helper.from_array(np.asarray(-1e9, np.float32), "neg")]
    n = helper.make_node
    nodes = [
        n("Gather", ["emb", "input_ids"], ["tok"]),
        n("Shape", ["input_ids"], ["ids_shape"]), n("Gather", ["ids_shape", "one"], ["S"]), n("Neg", ["S"], ["negS"]),
        n("CumSum", ["attention_mask", "one"], ["cum"]), n("Sub", ["cum", "one"], ["pos_all"]),
        n("Slice", ["pos_all", "negS", "big", "axes1"], ["pos_new"]), n("Max", ["pos_new", "zero"], ["pos_ids"]),
        n("Gather", ["pos", "pos_ids"], ["pemb"]), n("Add", ["tok", "pemb"], ["x"]),
    ]
    for t in ("q", "k", "v"):
        nodes += [n("MatMul", ["x", f"w{t}"], [f"{t}_flat"]), n("Reshape", [f"{t}_flat", "heads"], [f"{t}_h"]),
                  n("Transpose", [f"{t}_h"], [f"{t}_new"], perm=[0, 2, 1, 3])]
    nodes += [
        n("Concat", ["past.0.key", "k_new"], ["present_0_key"], axis=2),
        n("Concat", ["past.0.value", "v_new"], ["present_0_value"], axis=2),
        n("Transpose", ["present_0_key"], ["kt"], perm=[0, 1, 3, 2]), n("MatMul", ["q_new", "kt"], ["qk"]),
        n("Mul", ["qk", "scale"], ["scores"]),
        n("Shape", ["present_0_key"], ["k_shape"]), n("Gather", ["k_shape", "two"], ["T"]),
        n("Sub", ["T", "S"], ["P"]), n("Squeeze", ["P"], ["P0"]), n("Squeeze", ["T"], ["T0"]),
        n("Squeeze", ["one"], ["one0"]), n("Squeeze", ["zero"], ["zero0"]),
        n("Range", ["P0", "T0", "one0"], ["rows"]), n("Range", ["zero0", "T0", "one0"], ["cols"]),
        n("Unsqueeze", ["rows", "one"], ["rows2"]), n("Unsqueeze", ["cols", "zero"], ["cols2"]),
        n("LessOrEqual", ["cols2", "rows2"], ["causal"]),
        n("Cast", ["attention_mask"], ["pad_b"], to=TensorProto.BOOL), n("Unsqueeze", ["pad_b", "axes12"], ["pad"]),
        n("And", ["causal", "pad"], ["allowed"]), n("Where", ["allowed", "scores", "neg"], ["masked"]),
        n("Softmax", ["masked"], ["att"], axis=-1), n("MatMul", ["att", "present_0_value"], ["o_h"]),
        n("Transpose", ["o_h"], ["o_t"], perm=[0, 2, 1, 3]), n("Reshape", ["o_t", "merge"], ["o"]),
        n("MatMul", ["o", "wo"], ["o_proj"]), n("Add", ["x", "o_proj"], ["h"]),
        n("MatMul", ["h", "w1"], ["m1"]), n("Tanh", ["m1"], ["m2"]), n("MatMul", ["m2", "w2"], ["m3"]),
        n("Add", ["h", "m3"], ["h2"]), n("MatMul", ["h2", "lm"], ["logits"]),
    ]
    kv = ["batch", H, "past", D]
    kv_out = ["batch", H, "total", D]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
                        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"]),
                        helper.make_tensor_value_info("past.0.key", TensorProto.FLOAT, kv),
                        helper.make_tensor_value_info("past.0.value", TensorProto.FLOAT, kv)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", VOCAB]),
         helper.make_tensor_value_info("present_0_key", TensorProto.FLOAT, kv_out),
         helper.make_tensor_value_info("present_0_value", TensorProto.FLOAT, kv_out)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _greedy_without_cache(graph: Path, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens of the original graph, recomputing the whole sequence every step (empty cache)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    seq = list(prompt)
    empty = np.zeros((1, H, 0, D), np.float32)
    for _ in range(n):
        ids = np.asarray([seq], np.int64)
        logits = sess.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids),
                                       "past.0.key": empty, "past.0.value": empty})[0]
        seq.append(int(logits[0, -1].argmax()))
    return seq[len(prompt):]


@pytest.fixture(scope="module")
def ready_made(tmp_path_factory) -> Path:
    """A published-style folder: config.json, tokenizer, onnx/model.onnx and onnx/model_q4.onnx (int4 of it)."""
    _needs_tokenizer()
    from edgelm_export.quantize import quantize_model

    root = tmp_path_factory.mktemp("ready") / "tiny-onnx"
    (root / "onnx").mkdir(parents=True)
    onnx.save(_tiny_graph(), str(root / "onnx" / "model.onnx"))
    quantize_model(root / "onnx" / "model.onnx", root / "onnx" / "model_q4.onnx", method="int4")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (root / f).write_bytes((STORIES260K / f).read_bytes())
    (root / "config.json").write_text(json.dumps({
        "architectures": ["TinyHandBuiltForCausalLM"], "model_type": "tiny", "vocab_size": VOCAB, "hidden_size": C,
        "num_attention_heads": H, "max_position_embeddings": CTX, "bos_token_id": 1, "eos_token_id": 2}))
    return root


def _export_without_torch(src: Path, out: Path, **kwargs) -> dict:
    """export_model in a fresh interpreter where importing torch or transformers fails; returns the manifest."""
    code = ("import sys, json\n"
            "sys.modules['torch'] = None; sys.modules['transformers'] = None; sys.modules['optimum'] = None\n"
            "from edgelm_export.convert import export_model\n"
            "export_model(sys.argv[1], sys.argv[2], progress=False, threads=1, **json.loads(sys.argv[3]))\n")
    proc = subprocess.run([sys.executable, "-c", code, str(src), str(out), json.dumps(kwargs)],
                          capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads((out / "edgelm.json").read_text())


def test_ready_made_folder_converts_without_torch_and_generates_like_the_original(ready_made, tmp_path):
    import edgelm

    manifest = _export_without_torch(ready_made, tmp_path / "fp32", quantize="none")
    io = manifest["export"]["io"]
    assert manifest["export"]["path"] == "generic (ready-made ONNX)"
    assert manifest["export"]["onnx_file"] == "onnx/model.onnx"  # the fp32 variant is the default
    assert io["renamed"] == {"past.0.key": "past_key_values.0.key", "past.0.value": "past_key_values.0.value",
                             "present_0_key": "present.0.key", "present_0_value": "present.0.value"}
    assert "position_ids" in io and "logits_from" in io and io["last_logprobs"] == "added"
    assert manifest["verification"]["against"] == "cached steps vs one call"
    assert manifest["verification"]["max_abs_logit_diff"] < 1e-4
    cfg = json.loads((tmp_path / "fp32" / "config.json").read_text())
    assert cfg["export_path"] == "generic (ready-made ONNX)" and cfg["onnx"]["kv_cache"] == "concat"
    assert (cfg["num_layers"], cfg["num_kv_heads"], cfg["head_dim"], cfg["vocab_size"]) == (1, H, D, VOCAB)
    assert cfg["context_length"] == CTX and cfg["dtype"] == "float32"
    assert "generic (ready-made ONNX), `onnx/model.onnx`" in (tmp_path / "fp32" / "README.md").read_text()

    lm = edgelm.load(tmp_path / "fp32", threads=1)
    assert lm._has_lp and lm._last_only is not None  # last_logprobs and logits_from were added and are used
    for text in ("Once upon a time", "Lily and Ben"):
        ids = lm.tokenizer.encode(text, add_bos=True)
        gen = lm.generate(ids, max_new_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
        assert gen.token_ids == _greedy_without_cache(ready_made / "onnx" / "model.onnx", ids, NEW_TOKENS)
        # last_logprobs is the log-softmax of the chosen token's logits: check one step by hand
        logits = lm._logits(ids)[-1].astype(np.float64)
        ref = logits[gen.token_ids[0]] - (logits.max() + np.log(np.exp(logits - logits.max()).sum()))
        assert abs(gen.logprobs[0] - ref) < 1e-4


def test_ready_made_folder_quantizes_weight_only_within_the_gate(ready_made, tmp_path):
    manifest = _export_without_torch(ready_made, tmp_path / "int8", quantize="int8")
    m, q = manifest["metrics"], manifest["quantization"]
    assert q["method"] == "int8" and q["matmuls"] == 7  # q, k, v, o, two MLP, LM head: every weight MatMul
    assert m["ppl_increase"] <= m["max_ppl_increase"] and not m["forced"]
    graph = onnx.load(str(tmp_path / "int8" / "model.onnx"), load_external_data=False)
    assert not [n for n in graph.graph.node if n.op_type == "MatMul" and n.input[1] in ("wq", "lm")]


def test_published_quantized_variant_is_kept_as_it_is(ready_made, tmp_path):
    import edgelm

    from edgelm.errors import InvalidArgumentError
    from edgelm_export.convert import export_model

    with pytest.raises(InvalidArgumentError) as info:
        export_model(str(ready_made), str(tmp_path / "x"), onnx_file="onnx/model_q4.onnx", progress=False)
    assert "--quantize none" in str(info.value) and "\n" not in str(info.value)
    manifest = _export_without_torch(ready_made, tmp_path / "q4", quantize="none", onnx_file="onnx/model_q4.onnx")
    assert manifest["export"]["onnx_file"] == "onnx/model_q4.onnx"
    assert json.loads((tmp_path / "q4" / "config.json").read_text())["dtype"] == "int4"
    lm = edgelm.load(tmp_path / "q4", threads=1)
    assert len(lm.generate("Once upon a time", max_new_tokens=8, temperature=0, ignore_eos=True).token_ids) == 8


def test_cli_takes_an_onnx_folder_and_a_variant(ready_made, tmp_path, capsys):
    import argparse

    from edgelm.cli import main
    from edgelm_export.commands import EXPORT

    out = tmp_path / "cli-q4"
    assert main(["export", str(ready_made), "--out", str(out), "--onnx-file", "onnx/model_q4.onnx", "--quantize",
                 "none", "--no-progress", "--threads", "1"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert json.loads((out / "edgelm.json").read_text())["export"]["onnx_file"] == "onnx/model_q4.onnx"
    parser = argparse.ArgumentParser()
    EXPORT.add_arguments(parser)
    args = parser.parse_args(["src", "--out", "x", "--via", "optimum", "--optimum-python", "/usr/bin/python3"])
    assert (args.via, args.optimum_python, args.onnx_file) == ("optimum", "/usr/bin/python3", None)


def test_fp16_logits_are_cast_back_and_the_head_is_still_found(ready_made, tmp_path):
    """Published fp16 variants end in fp16 logits: the runtime gets float32 ones, and logits_from still finds the
    LM head through the Cast."""
    import edgelm
    from edgelm_export.convert import export_model

    graph = _tiny_graph()
    for node in graph.graph.node:
        node.output[:] = ["logits32" if o == "logits" else o for o in node.output]
    graph.graph.node.append(helper.make_node("Cast", ["logits32"], ["logits"], to=TensorProto.FLOAT16))
    graph.graph.output[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    folder = tmp_path / "fp16-logits"
    folder.mkdir()
    onnx.save(graph, str(folder / "model.onnx"))
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (folder / f).write_bytes((ready_made / f).read_bytes())
    export_model(str(folder), str(tmp_path / "out"), quantize="none", progress=False, threads=1)
    io = json.loads((tmp_path / "out" / "edgelm.json").read_text())["export"]["io"]
    assert io["logits"] == "cast to float32" and "logits_from" in io
    lm = edgelm.load(tmp_path / "out", threads=1)
    ids = lm.tokenizer.encode("Once upon a time", add_bos=True)
    assert lm._logits(ids).dtype == np.float32
    want = _greedy_without_cache(ready_made / "onnx" / "model.onnx", ids, 16)
    assert lm.generate(ids, max_new_tokens=16, temperature=0, ignore_eos=True).token_ids == want


def test_onnx_folder_refusals_are_one_line(ready_made, tmp_path):
    from edgelm.errors import EdgeLMError, InvalidArgumentError, UnsupportedArchitectureError
    from edgelm_export.convert import export_model
    from edgelm_export.generic import normalize_graph

    several = tmp_path / "several"
    (several / "onnx").mkdir(parents=True)
    for f in ("model_quantized.onnx", "model_q4.onnx"):
        (several / "onnx" / f).write_bytes((ready_made / "onnx" / "model_q4.onnx").read_bytes())
    with pytest.raises(InvalidArgumentError) as info:
        export_model(str(several), str(tmp_path / "out"), progress=False)
    assert "--onnx-file" in str(info.value) and "onnx/model_q4.onnx" in str(info.value)

    with pytest.raises(InvalidArgumentError):
        export_model(str(ready_made), str(tmp_path / "out"), onnx_file="onnx/nope.onnx", progress=False)
    with pytest.raises(InvalidArgumentError):
        export_model(str(ready_made), str(tmp_path / "out"), onnx_file="onnx/model.onnx", via="builder",
                     progress=False)

    no_cache = _tiny_graph()
    no_cache.graph.input.pop()  # a graph without its whole cache: not the contract
    with pytest.raises(UnsupportedArchitectureError) as info:
        normalize_graph(no_cache)
    assert "past_key_values.0.value" in str(info.value)
    merged = _tiny_graph()
    merged.graph.input.append(helper.make_tensor_value_info("use_cache_branch", TensorProto.BOOL, [1]))
    with pytest.raises(EdgeLMError) as info:
        normalize_graph(merged)
    assert "use_cache_branch" in str(info.value) and "--via optimum" in str(info.value)


def test_missing_optimum_is_refused_with_what_to_do(monkeypatch, tmp_path):
    import importlib.util

    from edgelm.errors import ExportError, InvalidArgumentError
    from edgelm_export import generic

    monkeypatch.delenv(generic.OPTIMUM_PYTHON_ENV, raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ExportError) as info:
        generic.optimum_python()
    assert "--optimum-python" in str(info.value) and "edgelm[optimum]" in str(info.value)
    assert "scripts/optimum-env" in str(info.value)  # what docs/export.md tells a checkout to run
    with pytest.raises(InvalidArgumentError):
        generic.optimum_python(str(tmp_path / "no-python"))


def test_a_family_optimum_lacks_is_refused_from_config_alone(optimum_python, tmp_path):
    from edgelm.errors import UnsupportedArchitectureError
    from edgelm_export.convert import export_model
    from edgelm_export.generic import optimum_supports

    assert optimum_supports(optimum_python, "gpt_neox") and not optimum_supports(optimum_python, "no_such")
    src = tmp_path / "src"
    src.mkdir()  # no weights: the refusal comes before any are needed
    (src / "config.json").write_text(json.dumps({"architectures": ["NoSuchForCausalLM"], "model_type": "no_such"}))
    (src / "tokenizer.json").write_text("{}")
    with pytest.raises(UnsupportedArchitectureError) as info:
        export_model(str(src), str(tmp_path / "out"), progress=False)
    assert "NoSuchForCausalLM" in str(info.value) and "'no_such'" in str(info.value) and "\n" not in str(info.value)


def test_the_path_is_chosen_from_the_family(tmp_path):
    from edgelm_export.generic import choose_path

    llama, neox = {"architectures": ["LlamaForCausalLM"]}, {"architectures": ["GPTNeoXForCausalLM"]}
    assert choose_path(tmp_path, llama, None, None, True) == "builder"
    assert choose_path(tmp_path, neox, None, None, True) == "optimum"
    assert choose_path(tmp_path, llama, "optimum", None, True) == "optimum"
    (tmp_path / "model.onnx").write_bytes(b"")
    assert choose_path(tmp_path, neox, None, None, True) == "onnx"  # a graph is here: no torch needed
    assert choose_path(tmp_path, llama, None, None, True) == "builder"  # the lean graph when we can build it
    assert choose_path(tmp_path, llama, None, None, False) == "onnx"  # no weights: only the graph
    (tmp_path / "model.onnx").unlink()
    (tmp_path / "onnx").mkdir()
    for f in ("model_q4.onnx", "model_fp16.onnx"):  # published variants only: the builder still gets the weights
        (tmp_path / "onnx" / f).write_bytes(b"")
    assert choose_path(tmp_path, llama, None, None, True) == "builder"
    assert choose_path(tmp_path, neox, None, "onnx/model_q4.onnx", True) == "onnx"


def test_builder_refusal_names_via_optimum():
    from edgelm.errors import UnsupportedArchitectureError
    from edgelm_export.archs import resolve

    with pytest.raises(UnsupportedArchitectureError) as info:
        resolve({"architectures": ["GPTNeoXForCausalLM"]})
    assert "--via optimum" in str(info.value) and "\n" not in str(info.value)


# --- through optimum ---------------------------------------------------------------------------------------------
GENERIC_FAMILIES = ("gpt_neox", "opt", "bloom", "falcon", "stablelm", "olmo")


@pytest.fixture(scope="session")
def optimum_python() -> str:
    from edgelm_export.generic import OPTIMUM_PYTHON_ENV, optimum_python

    try:
        return optimum_python()
    except Exception as exc:  # noqa: BLE001
        if os.environ.get("CI"):  # .ci/run makes the environment: its absence there is a failure, not a skip
            pytest.fail(f"CI without an optimum environment (${OPTIMUM_PYTHON_ENV}): {exc}")
        pytest.skip(f"no python with optimum-onnx (set ${OPTIMUM_PYTHON_ENV}): {exc}")


def _family_config(name: str):
    """Tiny random configs; 512 positions so the int8 calibration's 256-token prefill fits."""
    import transformers

    common = {"vocab_size": VOCAB, "bos_token_id": 1, "eos_token_id": 2, "initializer_range": 0.2}
    layers = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    return {
        # partial rotary (a quarter of each head), parallel residual
        "gpt_neox": lambda: transformers.GPTNeoXConfig(**common, **layers, intermediate_size=96,
                                                       max_position_embeddings=512),
        "opt": lambda: transformers.OPTConfig(**common, **layers, ffn_dim=96, max_position_embeddings=512,
                                              word_embed_proj_dim=64, pad_token_id=0),
        "bloom": lambda: transformers.BloomConfig(**common, hidden_size=64, n_layer=2, n_head=4),  # ALiBi
        "falcon": lambda: transformers.FalconConfig(**common, **layers, max_position_embeddings=512),  # multi-query
        "stablelm": lambda: transformers.StableLmConfig(**common, **layers, num_key_value_heads=2,
                                                        intermediate_size=96, max_position_embeddings=512),
        "olmo": lambda: transformers.OlmoConfig(**common, **layers, num_key_value_heads=2, intermediate_size=96,
                                                max_position_embeddings=512),
    }[name]()


@pytest.fixture(scope="module", params=GENERIC_FAMILIES)
def generic_family(request, optimum_python):
    pytest.importorskip("torch")
    from test_export_archs import hf_folder_for, tiny_model_setup

    tiny_model_setup()
    return request.param, hf_folder_for(_family_config(request.param), f"generic-{request.param}")


@pytest.mark.slow
def test_generic_fp32_greedy_equals_transformers_and_int8_passes_the_gate(generic_family):
    import edgelm
    from edgelm_export.evaluate import teacher_forced_agreement
    from test_export_archs import INT8_TEACHER_FORCED_FLOOR, PROMPT_TEXTS, _hf_greedy

    name, src = generic_family
    fp32 = cached_export(f"generic-{src.name}-fp32", src, quantize="none", threads=1)  # picked: not a builder family
    manifest = json.loads((fp32 / "edgelm.json").read_text())
    assert manifest["export"]["path"] == "generic (optimum)"
    assert manifest["verification"]["against"] == "PyTorch"  # left-padded batch included
    assert manifest["verification"]["max_abs_logit_diff"] < 1e-4
    assert "| path | generic (optimum) (optimum-onnx" in (fp32 / "README.md").read_text()
    lm = edgelm.load(fp32, threads=1)
    prompts = [lm.tokenizer.encode(t, add_bos=True) for t in PROMPT_TEXTS]
    ours = [lm.generate(p, max_new_tokens=NEW_TOKENS, temperature=0, ignore_eos=True).token_ids for p in prompts]
    assert ours == _hf_greedy(src, prompts, NEW_TOKENS)

    int8 = cached_export(f"generic-{src.name}-int8", src, quantize="int8", threads=1)
    m = json.loads((int8 / "edgelm.json").read_text())["metrics"]
    assert m["ppl_increase"] <= m["max_ppl_increase"] and not m["forced"]
    q = edgelm.load(int8, threads=1)
    assert json.loads((int8 / "config.json").read_text())["dtype"] == "int8"
    assert teacher_forced_agreement(q, prompts, [o[:16] for o in ours]) >= INT8_TEACHER_FORCED_FLOOR


@pytest.mark.slow
def test_folder_written_by_optimum_cli_converts_without_torch(optimum_python, tmp_path):
    """optimum's own CLI output (model.onnx with past_key_values.*, plus the tokenizer copied beside it) becomes an
    edgelm folder with torch blocked, and generates what the --via optimum export does."""
    pytest.importorskip("torch")
    import edgelm
    from edgelm_export.generic import run_optimum
    from test_export_archs import hf_folder_for, tiny_model_setup

    tiny_model_setup()
    src = hf_folder_for(_family_config("gpt_neox"), "generic-gpt_neox")
    folder = tmp_path / "optimum-neox"
    run_optimum(optimum_python, src, folder, threads=1)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (folder / f).write_bytes((src / f).read_bytes())
    manifest = _export_without_torch(folder, tmp_path / "int4", quantize="int4", force=True)
    assert manifest["export"] == {**manifest["export"], "path": "generic (ready-made ONNX)", "onnx_file": "model.onnx"}
    assert manifest["quantization"]["method"] == "int4" and manifest["quantization"]["block_matmuls"] > 0
    fp32 = cached_export(f"generic-{src.name}-fp32", src, quantize="none", threads=1)
    a, b = edgelm.load(fp32, threads=1), edgelm.load(tmp_path / "int4", threads=1)
    prompt = a.tokenizer.encode("Once upon a time", add_bos=True)
    assert len(b.generate(prompt, max_new_tokens=8, temperature=0, ignore_eos=True).token_ids) == 8
    _export_without_torch(folder, tmp_path / "fp32", quantize="none")
    c = edgelm.load(tmp_path / "fp32", threads=1)
    assert (c.generate(prompt, max_new_tokens=NEW_TOKENS, temperature=0, ignore_eos=True).token_ids
            == a.generate(prompt, max_new_tokens=NEW_TOKENS, temperature=0, ignore_eos=True).token_ids)


def test_a_multimodal_or_encoder_decoder_model_is_refused_before_optimum(tmp_path):
    """`...ForConditionalGeneration` (Gemma 3's multimodal checkpoint, T5, ...) is no decoder-only LM: refused from
    config.json alone, not handed to optimum (whose absence would then be the only thing the user hears of)."""
    from edgelm.errors import UnsupportedArchitectureError
    from edgelm_export.generic import choose_path

    cfg = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3"}
    with pytest.raises(UnsupportedArchitectureError, match="not a text-only causal LM") as info:
        choose_path(tmp_path, cfg, None, None, True)
    assert "ForCausalLM" in (info.value.hint or "")
