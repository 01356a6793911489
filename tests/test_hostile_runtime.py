"""The runtime against hostile input (issue 15), fuzzed with hypothesis: arguments of every shape and type, text with
odd Unicode (lone surrogates included), chat messages of any JSON shape, and damaged manifests and configs.

The contract: edgelm either answers or raises a typed ``EdgeLMError`` -- never a bare TypeError / ValueError /
KeyError from its insides -- and what it answers is whole (a stream's pieces join to its Generation's text).
Examples are bounded and derandomized, so a run is the same every time and takes seconds.
"""
from __future__ import annotations

import json
import shutil

import pytest

import edgelm
import edgelm_models
from edgelm.errors import EdgeLMError, ModelError
from edgelm.model import FINISH_REASONS

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

DEFAULT = edgelm_models.default_path()
pytestmark = pytest.mark.skipif(not (DEFAULT / "edgelm.json").is_file(), reason="default model not built")
FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# Text with everything Unicode has, surrogates and controls included, plus some that tokenizers find odd.
ANY_CHAR = st.characters(codec=None, categories=None)
TEXT = st.one_of(st.text(ANY_CHAR, max_size=40),
                 st.sampled_from(["", " ", "\x00", "\ud800", "a\udfffb", "\U0001F600" * 5, "\u202e\u200b\ufeff",
                                  "<s></s><|im_end|>", "\r\n\t" * 5, "Once upon a time"]))
JUNK = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True),
                 TEXT, st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(TEXT, st.integers(), max_size=2))
JSON = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=False), TEXT),
                    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(TEXT, inner, max_size=3)),
                    max_leaves=8)


def _setting(good):
    return st.one_of(st.none(), good, JUNK)


SAMPLING = st.fixed_dictionaries({}, optional={
    "max_new_tokens": _setting(st.integers(1, 12)),
    "temperature": _setting(st.floats(0, 2)),
    "top_k": _setting(st.integers(0, 50)),
    "top_p": _setting(st.floats(0, 1)),
    "min_p": _setting(st.floats(0, 1)),
    "repetition_penalty": _setting(st.floats(0.5, 2)),
    "seed": _setting(st.integers(0, 2**32)),
    "stop": _setting(st.lists(TEXT, max_size=3)),
    "truncate": _setting(st.just("left")),
    "ignore_eos": _setting(st.booleans()),
    "lookup": _setting(st.booleans()),
})
PROMPT = st.one_of(TEXT, st.lists(st.integers(-5, 600), max_size=8), JUNK)


@pytest.fixture(scope="module")
def lm():
    return edgelm.load(DEFAULT, threads=1)


def _capped(kwargs):
    """The fuzzed settings, with max_new_tokens kept small when it is a valid int (the point is the arguments)."""
    n = kwargs.get("max_new_tokens")
    if isinstance(n, int) and not isinstance(n, bool) and n > 12:
        kwargs = dict(kwargs, max_new_tokens=12)
    return {**{"max_new_tokens": 8}, **kwargs} if "max_new_tokens" not in kwargs else kwargs


@FUZZ
@given(prompt=PROMPT, kwargs=SAMPLING)
def test_generate_and_stream_answer_or_raise_typed_errors(lm, prompt, kwargs):
    kwargs = _capped(kwargs)
    try:
        g = lm.generate(prompt, **kwargs)
    except EdgeLMError:
        return
    assert g.finish_reason in FINISH_REASONS and g.completion_tokens == len(g.token_ids) == len(g.logprobs)
    assert isinstance(g.text, str)
    g.text.encode("utf-8")  # what comes out is always valid text
    stream = lm.stream(prompt, **kwargs)  # the same arguments were accepted once: they are accepted again
    pieces = list(stream)
    assert "".join(pieces) == stream.generation.text  # nothing lost between the pieces and the result
    if kwargs.get("seed") is not None or kwargs.get("temperature") == 0:
        assert stream.generation.text == g.text or not isinstance(kwargs.get("seed"), int)


MESSAGE = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool"]), "content": TEXT}),
    st.dictionaries(st.sampled_from(["role", "content", "tool_calls", "name", "reasoning_content"]), JSON, max_size=4),
    JSON)


@FUZZ
@given(messages=st.one_of(st.lists(MESSAGE, max_size=4), JSON), tools=st.one_of(st.none(), JSON),
       template_kwargs=st.one_of(st.none(), JSON), kwargs=SAMPLING)
def test_chat_answers_or_raises_typed_errors(lm, messages, tools, template_kwargs, kwargs):
    kwargs = _capped(kwargs)
    try:
        g = lm.chat(messages, tools=tools, chat_template_kwargs=template_kwargs, **kwargs)
    except EdgeLMError:
        return
    assert g.finish_reason in FINISH_REASONS


@FUZZ
@given(text=st.one_of(TEXT, JUNK))
def test_score_and_encode_answer_or_raise_typed_errors(lm, text):
    for call in (lambda: lm.score(text), lambda: lm.encode(text), lambda: lm.tokenizer.decode(lm.encode(text))):
        try:
            call()
        except EdgeLMError:
            pass


# --- damaged folders --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A copy of the default model that each example rewrites (edgelm.json / config.json) and restores."""
    folder = tmp_path_factory.mktemp("hostile") / "model"
    shutil.copytree(DEFAULT, folder)
    return folder


def _set_path(doc, path, value):
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value


def _paths(doc, prefix=()):
    """Every (key path) in a JSON document, containers included."""
    out = []
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for k, v in items:
        out.append(prefix + (k,))
        out.extend(_paths(v, prefix + (k,)))
    return out


def _mutations(original):
    paths = _paths(original)
    one = st.tuples(st.sampled_from(paths), JSON)
    return st.lists(one, min_size=1, max_size=3)


MANIFEST = json.loads((DEFAULT / "edgelm.json").read_text()) if (DEFAULT / "edgelm.json").is_file() else {"x": 1}
CONFIGS = {name: json.loads((DEFAULT / name).read_text()) if (DEFAULT / name).is_file() else {"x": 1}
           for name in ("config.json", "tokenizer_config.json", "generation_config.json")}
CONFIGS["tokenizer_config.json"].setdefault("chat_template", "{{ messages }}")
EXTRA_FILES = st.dictionaries(st.one_of(TEXT, st.sampled_from(["/etc/hostname", "../x", "model.onnx.data/..", "."])),
                              JSON, max_size=2)


def _load_typed(folder, **kwargs):
    try:
        lm = edgelm.load(folder, threads=1, **kwargs)
    except EdgeLMError:
        return None
    return lm


@FUZZ
@given(changes=_mutations(MANIFEST), extra=EXTRA_FILES)
def test_damaged_manifests_give_typed_errors(scratch, changes, extra):
    manifest = json.loads(json.dumps(MANIFEST))
    try:
        for path, value in changes:
            _set_path(manifest, path, value)
    except (KeyError, IndexError, TypeError):  # an earlier change replaced a container on this path
        pass
    if isinstance(manifest.get("files"), dict):
        manifest["files"].update(extra)
    (scratch / "edgelm.json").write_text(json.dumps(manifest))
    try:
        _load_typed(scratch)
        _load_typed(scratch, verify=False)
    finally:
        shutil.copyfile(DEFAULT / "edgelm.json", scratch / "edgelm.json")


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_damaged_configs_give_typed_errors(scratch, name):
    original = CONFIGS[name]

    @FUZZ
    @given(changes=_mutations(original))
    def check(changes):
        config = json.loads(json.dumps(original))
        try:
            for path, value in changes:
                _set_path(config, path, value)
        except (KeyError, IndexError, TypeError):
            pass
        (scratch / name).write_text(json.dumps(config))
        try:
            lm = _load_typed(scratch, verify=False)  # verify=True would stop at the checksum: go past it
            if lm is not None:
                for call in (lambda: lm.generate("Once", max_new_tokens=2),
                             lambda: lm.chat([{"role": "user", "content": "hi"}], max_new_tokens=2)):
                    try:
                        call()
                    except EdgeLMError:
                        pass
        finally:
            if (DEFAULT / name).is_file():
                shutil.copyfile(DEFAULT / name, scratch / name)

    check()


# --- `edgelm info` on a damaged folder: one line, no traceback ----------------------------------------------------
@pytest.mark.parametrize("change", [
    lambda m: m["files"]["config.json"].update(size="12"),
    lambda m: m["files"].update({"config.json": ["a", 1]}),
    lambda m: m.update(files=5),
    lambda m: m.update(source="somewhere", metrics=[1]),
    lambda m: m["files"].update({"/etc/hostname": {"sha256": "0" * 64, "size": 1}}),
])
def test_info_on_a_damaged_folder_prints_one_line(tmp_path, capsys, change):
    from edgelm.cli import main

    folder = tmp_path / "model"
    shutil.copytree(DEFAULT, folder)
    manifest = json.loads((folder / "edgelm.json").read_text())
    change(manifest)
    (folder / "edgelm.json").write_text(json.dumps(manifest))
    code = main(["info", str(folder)])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and "edgelm.json" in err, err


@pytest.mark.parametrize("argv", [["info", ""], ["info", "   "]])
def test_info_on_an_empty_path_prints_one_line(capsys, argv):
    from edgelm.cli import main

    assert main(argv) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "empty" in err


def test_info_on_an_unreadable_file_prints_one_line(tmp_path, capsys, monkeypatch):
    from edgelm.cli import main

    folder = tmp_path / "model"
    shutil.copytree(DEFAULT, folder)
    real_open = open

    def refuse(f, *a, **k):  # as chmod 000 would for a user who is not root
        if str(f) == str(folder / "config.json"):
            raise PermissionError(13, "Permission denied", str(f))
        return real_open(f, *a, **k)

    monkeypatch.setattr("builtins.open", refuse)
    assert main(["info", str(folder)]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "config.json cannot be read" in err, err
    with pytest.raises(ModelError):
        edgelm.load(folder)


# --- hostile chat templates: memory comes back, and one render's budget is its own ---------------------------------
MEMORY_HOGS = [
    "{% set ns = namespace(l=[]) %}{% for i in range(100000) %}{% set ns.l = ns.l + [('x' * 16000000) ~ i] %}"
    "{% endfor %}{{ ns.l|length }}",
    "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
    "{{ ('a ' * 8000000).split()|length }}",
    "{% set s %}{% for i in range(100000) %}{{ 'y' * 1000000 }}{% endfor %}{% endset %}{{ s|length }}",
]


def _rss_mb() -> float:
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/statm"), reason="reads RSS from /proc")
def test_memory_hungry_templates_are_stopped_and_their_memory_returned():
    import gc

    from edgelm.errors import ModelFormatError
    from edgelm.tokenizer import ChatTemplate

    gc.collect()
    start = _rss_mb()
    for src in MEMORY_HOGS * 2:
        with pytest.raises(ModelFormatError, match="stopped"):
            ChatTemplate(src).render([{"role": "user", "content": "hi"}])
    gc.collect()
    assert _rss_mb() - start < 64, f"RSS {start:.0f} -> {_rss_mb():.0f} MB"


def test_a_runaway_template_does_not_stop_another_threads_render():
    import threading

    from edgelm.errors import ModelFormatError
    from edgelm.tokenizer import ChatTemplate

    runaway = ChatTemplate("{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}")
    normal = ChatTemplate("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}")
    results = []

    def renders():
        for _ in range(200):
            results.append(normal.render([{"role": "user", "content": "hi"}] * 20))

    thread = threading.Thread(target=renders)
    thread.start()
    with pytest.raises(ModelFormatError, match="stopped"):
        runaway.render([{"role": "user", "content": "hi"}])
    thread.join()
    assert results == ["<user>hi" * 20] * 200
