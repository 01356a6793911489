"""Named chat templates: tokenizer_config.json's ``chat_template`` as a list of {"name", "template"} entries.

transformers' rule (``get_chat_template``): when ``tools`` is given (not None, so an empty list counts), the
template named "tool_use" renders if the model has one, else "default". Here a copy of the shipped default model
gets "default", "tool_use" and "rag" templates, and every way a prompt reaches a template -- Model.apply_chat_template,
chat, chat_stream, Hybrid.chat and the server's chat endpoint -- must render the same string transformers'
``AutoTokenizer.from_pretrained(folder).apply_chat_template(..., tokenize=False)`` renders from the same folder.
"""
from __future__ import annotations

import json
import shutil

import pytest

import edgelm
import edgelm_models
from edgelm.errors import ModelFormatError
from edgelm.folder import MANIFEST, write_manifest
from edgelm.tokenizer import ChatTemplate

# Each template writes a different header, so which one rendered is plain in the prompt; the tool_use one is much
# longer (it lists the tools as JSON), so the prompt's token count tells the templates apart too.
DEFAULT = ("{{ bos_token }}[default]{% for m in messages %}\n{{ m.role }}: {{ m.content }}{% endfor %}"
           "{% if add_generation_prompt %}\nassistant:{% endif %}")
TOOL_USE = ("{{ bos_token }}[tool_use] You may call these functions:"
            "{% for t in tools or [] %}\n{{ t | tojson }}{% endfor %}"
            "{% for m in messages %}\n{{ m.role }}: {{ m.content }}{% endfor %}"
            "{% if add_generation_prompt %}\nassistant:{% endif %}")
RAG = ("{{ bos_token }}[rag]{% for d in documents or [] %}\n<doc>{{ d.text }}</doc>{% endfor %}"
       "{% for m in messages %}\n{{ m.role }}: {{ m.content }}{% endfor %}"
       "{% if add_generation_prompt %}\nassistant:{% endif %}")
NAMED = [{"name": "default", "template": DEFAULT}, {"name": "tool_use", "template": TOOL_USE},
         {"name": "rag", "template": RAG}]

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city, now.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
DOCS = [{"title": "Cats", "text": "Cats sleep a lot."}]
MESSAGES = [{"role": "user", "content": "Is it sunny in Paris?"}]
GREEDY = dict(max_new_tokens=8, temperature=0)


def _named_folder(dst, named) -> str:
    """A copy of the shipped default model whose tokenizer_config.json carries ``named``, manifest rewritten."""
    shutil.copytree(edgelm_models.default_path(), dst)
    cfg_path = dst / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["chat_template"] = named
    cfg_path.write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    manifest = json.loads((dst / MANIFEST).read_text(encoding="utf-8"))
    write_manifest(dst, **{k: v for k, v in manifest.items() if k not in ("format_version", "created", "files")})
    return str(dst)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return _named_folder(tmp_path_factory.mktemp("named") / "model", NAMED)


@pytest.fixture(scope="module")
def lm(folder):
    return edgelm.load(folder, threads=1)  # verify=True: the rewritten manifest covers the new config


@pytest.fixture(scope="module")
def hf(folder):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(folder)


def _hf_prompt(hf, **kwargs) -> str:
    return hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True, **kwargs)


@pytest.mark.parametrize("kwargs, header", [
    ({}, "[default]"),
    ({"tools": TOOLS}, "[tool_use]"),
    ({"tools": []}, "[tool_use]"),         # given, though empty: transformers checks `tools is not None`
    ({"documents": DOCS}, "[default]"),     # "rag" is never picked by itself, only by name
    ({"tools": TOOLS, "documents": DOCS}, "[tool_use]"),
], ids=["none", "tools", "empty-tools", "documents", "tools-and-documents"])
def test_the_template_transformers_picks_renders(lm, hf, kwargs, header):
    want = _hf_prompt(hf, **kwargs)
    assert header in want  # the expectation comes from transformers; this only says which one that was
    assert lm.apply_chat_template(MESSAGES, **kwargs) == want


def test_chat_and_chat_stream_use_the_tool_use_template(lm, hf):
    tool_prompt, plain_prompt = _hf_prompt(hf, tools=TOOLS), _hf_prompt(hf)
    for tools, prompt in ((TOOLS, tool_prompt), (None, plain_prompt)):
        ref = lm.generate(prompt, **GREEDY)
        got = lm.chat(MESSAGES, tools=tools, **GREEDY)
        assert (got.text, got.prompt_tokens) == (ref.text, ref.prompt_tokens) == (ref.text, len(lm.encode(prompt)))
        stream = lm.chat_stream(MESSAGES, tools=tools, **GREEDY)
        assert "".join(stream) == ref.text and stream.generation.prompt_tokens == ref.prompt_tokens
    assert len(lm.encode(tool_prompt)) > len(lm.encode(plain_prompt)) + 20  # the two really differ


def test_hybrid_local_chat_uses_the_tool_use_template(lm, hf):
    from edgelm.hybrid import Hybrid

    hy = Hybrid(lm)  # no cloud: every answer is local
    assert hy.apply_chat_template(MESSAGES, tools=TOOLS) == _hf_prompt(hf, tools=TOOLS)
    r = hy.chat(MESSAGES, tools=TOOLS, **GREEDY)
    assert r.source == "local" and r.generation.prompt_tokens == len(lm.encode(_hf_prompt(hf, tools=TOOLS)))


def test_server_chat_with_tools_uses_the_tool_use_template(lm, hf):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("starlette")
    pytest.importorskip("uvicorn")
    from edgelm.server import BackgroundServer

    with BackgroundServer(lm, workers=1) as srv:  # loopback only (the default host)
        model_id = next(iter(srv.state.models))
        for extra, prompt in (({"tools": TOOLS}, _hf_prompt(hf, tools=TOOLS)), ({}, _hf_prompt(hf))):
            body = {"model": model_id, "messages": MESSAGES, "max_tokens": 8, "temperature": 0, **extra}
            r = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=60)
            assert r.status_code == 200, r.text
            ref = lm.generate(prompt, **GREEDY)
            assert r.json()["usage"]["prompt_tokens"] == ref.prompt_tokens
            assert r.json()["choices"][0]["message"]["content"] == ref.text


def test_named_forms_without_a_default_or_a_tool_use_template():
    msgs = [{"role": "user", "content": "hi"}]
    # Only a tool_use template: it is also the one used without tools (edgelm uses the first named template
    # where transformers, lacking "default", would refuse).
    only = ChatTemplate.from_tokenizer_config({"chat_template": [{"name": "tool_use", "template": TOOL_USE}]})
    assert only.render(msgs).startswith("[tool_use]") and only.render(msgs, tools=TOOLS).startswith("[tool_use]")
    # No tool_use template: tools are given to the default one.
    plain = ChatTemplate.from_tokenizer_config({"chat_template": [{"name": "rag", "template": RAG},
                                                                  {"name": "default", "template": DEFAULT}]})
    assert plain.render(msgs, tools=TOOLS).startswith("[default]")
    # A single (unnamed) template is used for everything.
    single = ChatTemplate.from_tokenizer_config({"chat_template": TOOL_USE.replace("[tool_use]", "[single]")})
    assert single.render(msgs).startswith("[single]") and single.render(msgs, tools=TOOLS).startswith("[single]")
    # A blank tool_use entry is no template: the default renders.
    blank = ChatTemplate.from_tokenizer_config({"chat_template": [{"name": "default", "template": DEFAULT},
                                                                  {"name": "tool_use", "template": "  "}]})
    assert blank.render(msgs, tools=TOOLS).startswith("[default]")


def test_a_broken_tool_use_template_is_refused_at_load(tmp_path):
    folder = _named_folder(tmp_path / "model", [{"name": "default", "template": DEFAULT},
                                                {"name": "tool_use", "template": "{% for %}"}])
    with pytest.raises(ModelFormatError, match="tool_use"):
        edgelm.load(folder, threads=1)
