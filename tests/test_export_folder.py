"""What the exporter writes besides the graph: tokenizer files, chat template, generation defaults, licence."""
from __future__ import annotations

import io
import json

import pytest
from conftest import SHARED, STORIES260K

pytestmark = pytest.mark.slow
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}<|assistant|>"


def _tiny_llama(dst):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(dst))


def test_sentencepiece_only_source_gets_a_tokenizer_json(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    from edgelm_export.convert import export_model

    import edgelm

    corpus = SHARED / "corpus" / "tinystories" / "tinystories-v1-train-sample.txt"
    if not corpus.is_file():
        pytest.skip("shared corpus not available")
    lines = corpus.read_text(encoding="utf-8")[:200_000].splitlines()
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=512, model_type="bpe",
                                   byte_fallback=True, bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2)
    src = tmp_path / "src"
    _tiny_llama(src)
    (src / "tokenizer.model").write_bytes(buf.getvalue())
    (src / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "bos_token": "<s>", "eos_token": "</s>",
         "unk_token": "<unk>"}))
    assert not (src / "tokenizer.json").exists()

    export_model(str(src), str(tmp_path / "out"), quantize="none", progress=False)
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    ref = transformers.AutoTokenizer.from_pretrained(str(src))
    lm = edgelm.load(tmp_path / "out")
    for text in ("Once upon a time, Lily saw a dog.", "Tom said: \"It is mine!\" 123 ünïcode"):
        assert lm.tokenizer.encode(text, add_bos=True) == ref(text)["input_ids"]


def test_chat_template_generation_defaults_and_licence_travel(tmp_path):
    if not STORIES260K.is_dir():
        pytest.skip("stories260K tokenizer fixture not available")
    from edgelm_export.convert import export_model

    import edgelm

    src = tmp_path / "src"
    _tiny_llama(src)
    (src / "tokenizer.json").write_bytes((STORIES260K / "tokenizer.json").read_bytes())
    (src / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "auto_map": {"x": "y"}}))
    (src / "chat_template.jinja").write_text(TEMPLATE)
    (src / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "bos_token_id": 1, "eos_token_id": [2, 3]}))
    (src / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny\n")
    (src / "LICENSE").write_text("Apache License 2.0 (test copy)")

    out = tmp_path / "out"
    report = export_model(str(src), str(out), quantize="none", progress=False, context_length=32)
    assert report.context_length == 32
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_cfg["chat_template"] == TEMPLATE and "auto_map" not in tok_cfg
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["temperature"] == 0.6 and gen["top_p"] == 0.9 and gen["eos_token_id"] == [2, 3]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["eos_token_ids"] == [2, 3] and cfg["context_length"] == 32 and cfg["add_bos_token"] is True
    assert (out / "LICENSE").read_text() == "Apache License 2.0 (test copy)"
    assert "apache-2.0" in (out / "README.md").read_text()
    manifest = json.loads((out / "edgelm.json").read_text())
    assert "LICENSE" in manifest["files"] and manifest["source"]["architecture"] == "LlamaForCausalLM"

    lm = edgelm.load(out)
    assert lm.apply_chat_template([{"role": "user", "content": "hi"}]).startswith("<|user|>hi")


def test_weights_live_beside_the_graph(tmp_path):
    # model.onnx holds the graph, model.onnx.data the weights (less memory at load; no 2 GB protobuf limit).
    if not STORIES260K.is_dir():
        pytest.skip("stories260K fixture not available")
    from edgelm_export.convert import export_model

    import edgelm

    out = tmp_path / "out"
    report = export_model(str(STORIES260K), str(out), quantize="int8", progress=False)
    assert (out / "model.onnx.data").is_file() and (out / "model.onnx").stat().st_size < 100_000
    # as readable as the graph (onnx writes the data file owner-only)
    assert (out / "model.onnx.data").stat().st_mode & 0o777 == (out / "model.onnx").stat().st_mode & 0o777
    assert report.model_bytes == (out / "model.onnx").stat().st_size + (out / "model.onnx.data").stat().st_size
    manifest = json.loads((out / "edgelm.json").read_text())
    assert "model.onnx.data" in manifest["files"] and manifest["metrics"]["ppl_increase"] < 0.05
    # Every file the runtime reads is listed, so verify=True covers it (issue 15): the graph's external data too.
    from edgelm.folder import external_data_locations
    assert external_data_locations(out / "model.onnx") == {"model.onnx.data"}
    assert {p.name for p in out.iterdir()} - {"edgelm.json"} == set(manifest["files"])
    lm = edgelm.load(out)
    assert lm.generate("Once upon a time", max_new_tokens=8, temperature=0).completion_tokens == 8


def test_progress_false_shows_no_bars_and_leaves_them_as_found(tmp_path, capfd):
    """export_model(progress=False) from Python is as quiet as the CLI's --no-progress (transformers' own "Loading
    weights" bar included), and gives transformers' bars back to the caller afterwards."""
    from transformers.utils import logging as hf_logging

    from edgelm_export.convert import export_model

    if not STORIES260K.is_dir():
        pytest.skip("stories260K fixture not available")
    hf_logging.enable_progress_bar()
    export_model(str(STORIES260K), str(tmp_path / "out"), quantize="none", progress=False, threads=1)
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "it/s" not in err, err
    assert hf_logging.is_progress_bar_enabled()


def test_keep_fp32_with_no_quantization_is_refused(tmp_path):
    from edgelm.errors import InvalidArgumentError
    from edgelm_export.convert import export_model

    with pytest.raises(InvalidArgumentError, match="does nothing with --quantize none"):
        export_model(str(STORIES260K), str(tmp_path / "out"), quantize="none", keep_fp32="lm_head", progress=False)
    assert not (tmp_path / "out").exists()
