"""Chat templates render exactly as transformers renders them.

Real templates of the families people run (tests/data/chat_templates, sources in its README) are rendered on the
same conversations by edgelm's ChatTemplate and by transformers' ``apply_chat_template(..., tokenize=False)``, at
test time, and the strings must be equal: system/user/assistant turns, non-ASCII and HTML in content, tools as JSON
schema, tool calls and results, fixed and frozen dates, with and without the generation prompt. Where transformers
refuses a conversation (the template raises), edgelm must refuse it too. The rest checks the sandbox's features and
limits on small templates, message validation, and that Model's chat methods hand tools and template variables on.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
from pathlib import Path

import pytest

import edgelm.tokenizer as tokmod
from edgelm.errors import InvalidArgumentError, ModelFormatError
from edgelm.tokenizer import ChatTemplate, validate_messages

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"
# The special tokens each model's tokenizer_config.json declares (Qwen2.5 has no BOS token).
SPECIAL_TOKENS = {
    "chatml_smollm2": ("<|im_start|>", "<|im_end|>"),
    "llama3_1": ("<|begin_of_text|>", "<|eot_id|>"),
    "llama3_2": ("<|begin_of_text|>", "<|eot_id|>"),
    "qwen2_5": (None, "<|im_end|>"),
    "phi3_5": ("<s>", "<|endoftext|>"),
    "mistral_nemo": ("<s>", "</s>"),
    "gemma2": ("<bos>", "<eos>"),
}
FROZEN_NOW = datetime.datetime(2025, 3, 5, 14, 30, 7)

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Météo <b>now</b> for a city & its \"region\"",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "ville, e.g. Zürich"},
            "unit": {"type": "string", "enum": ["c", "f"]}}, "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "search", "description": "Search the web.",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]},
        "return": {"type": "string"}}},
]
SYSTEM = {"role": "system", "content": "Tu es un assistant <b>utile</b>. "}
USER = {"role": "user", "content": "  Héllo <b>bold</b> 😀, what's 2 < 3?\n"}
ASSISTANT = {"role": "assistant", "content": "Oui: 2 < 3 & \"ça\" marche.  "}
USER2 = {"role": "user", "content": "Et le temps à Zürich ?"}
CALL = {"id": "abc123XYZ", "type": "function",
        "function": {"name": "get_weather", "arguments": {"city": "Zürich", "unit": "c"}}}
CALL_TURNS = [USER2, {"role": "assistant", "tool_calls": [CALL]},
              {"role": "tool", "tool_call_id": "abc123XYZ", "name": "get_weather", "content": "21 °C <sunny>"}]

# name -> (messages, extra apply_chat_template arguments)
CASES = {
    "system_user": ([SYSTEM, USER], {}),
    "multi_turn": ([SYSTEM, USER, ASSISTANT, USER2], {}),
    "no_system": ([USER, ASSISTANT, USER2], {}),
    "ends_with_assistant": ([USER, ASSISTANT], {}),
    "tools": ([SYSTEM, USER2], {"tools": TOOLS}),
    "tools_no_system": ([USER2], {"tools": TOOLS}),
    "tool_call": (CALL_TURNS, {"tools": TOOLS}),
    "tool_call_content_none": ([USER2, {"role": "assistant", "content": None, "tool_calls": [CALL]},
                                {**CALL_TURNS[2], "content": "21"}, {"role": "assistant", "content": "21 °C."}],
                               {"tools": TOOLS}),
    "tool_dict_result": ([USER2, CALL_TURNS[1], {**CALL_TURNS[2], "content": {"temp": 21, "sky": "<sunny>"}}],
                         {"tools": TOOLS}),
    "date_string": ([SYSTEM, USER], {"date_string": "03 Feb 2025"}),
    "date_string_tools": ([SYSTEM, USER], {"date_string": "03 Feb 2025", "tools": TOOLS[:1]}),
    "tools_in_system": ([SYSTEM, USER], {"tools": TOOLS, "tools_in_user_message": False}),
}


def _template(family: str) -> str:
    return (TEMPLATES / f"{family}.jinja").read_text(encoding="utf-8")


@pytest.fixture
def frozen_time(monkeypatch):
    """strftime_now returns FROZEN_NOW in both renderers."""
    transformers = pytest.importorskip("transformers")
    import transformers.utils.chat_template_utils as ctu

    class Frozen(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return FROZEN_NOW

    assert hasattr(ctu, "datetime"), "transformers no longer formats strftime_now with its module's datetime"
    monkeypatch.setattr(ctu, "datetime", Frozen)
    monkeypatch.setattr(tokmod, "_now", lambda: FROZEN_NOW)
    return transformers


def hf_tokenizer(template: str, bos: str | None = "<s>", eos: str | None = "</s>"):
    """A transformers fast tokenizer around a tiny word-level ``tokenizers`` model: only its chat template and
    special tokens matter here."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    specials = [t for t in (bos, eos) if t]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(["<unk>", *specials])}, unk_token="<unk>"))
    kwargs = {k: v for k, v in (("bos_token", bos), ("eos_token", eos)) if v}
    return PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=template, **kwargs)


def both(template: str, messages, *, bos="<s>", eos="</s>", add_generation_prompt=True, **kwargs):
    """(transformers' rendering or the exception it raised, edgelm's rendering or the exception it raised)."""
    hf = hf_tokenizer(template, bos, eos)
    try:
        want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs)
    except Exception as exc:  # noqa: BLE001 - the template's own refusal (or any failure) is the expectation
        want = exc
    try:
        got = ChatTemplate(template, bos_token=bos or "", eos_token=eos or "").render(
            messages, add_generation_prompt=add_generation_prompt, **kwargs)
    except Exception as exc:  # noqa: BLE001
        got = exc
    return want, got


def test_every_fixture_template_is_covered():
    assert sorted(p.stem for p in TEMPLATES.glob("*.jinja")) == sorted(SPECIAL_TOKENS)


@pytest.mark.parametrize("family", sorted(SPECIAL_TOKENS))
def test_real_templates_render_like_transformers(family, frozen_time):
    template, (bos, eos) = _template(family), SPECIAL_TOKENS[family]
    rendered = 0
    for name, (messages, kwargs) in CASES.items():
        snapshot = json.dumps(messages, sort_keys=True)
        for agp in (True, False):
            want, got = both(template, messages, bos=bos, eos=eos, add_generation_prompt=agp, **kwargs)
            where = f"{family} / {name} / add_generation_prompt={agp}"
            if isinstance(want, Exception):
                # transformers refused: the template raised (raise_exception) or failed on this message shape
                assert isinstance(got, InvalidArgumentError), f"{where}: transformers raised {want!r}, edgelm {got!r}"
                continue
            assert not isinstance(got, Exception), f"{where}: edgelm raised {got!r}"
            assert got == want, f"{where}:\n--- transformers\n{want}\n--- edgelm\n{got}"
            rendered += 1
        assert json.dumps(messages, sort_keys=True) == snapshot, "rendering changed the caller's messages"
    # Every family renders several conversations both ways (so the comparison above is not all refusals).
    assert rendered >= 4, f"{family}: only {rendered} renderings to compare"


def test_dates_tools_and_tool_calls_reach_the_prompt(frozen_time):
    """The comparison above is only as good as its cases: check they exercise what they are named for."""
    tpl = ChatTemplate(_template("llama3_2"), bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    assert f"Today Date: {FROZEN_NOW:%d %b %Y}\n" in tpl.render([USER])  # strftime_now, frozen
    assert "Today Date: 03 Feb 2025\n" in tpl.render([USER], date_string="03 Feb 2025")
    with_tools = tpl.render([USER2], tools=TOOLS)
    assert json.dumps(TOOLS[0], indent=4, ensure_ascii=False) in with_tools  # tojson(indent=4), "é" and "<b>" kept
    qwen = ChatTemplate(_template("qwen2_5"), eos_token="<|im_end|>").render(CALL_TURNS, tools=TOOLS)
    assert '{"name": "get_weather", "arguments": {"city": "Zürich", "unit": "c"}}' in qwen
    assert "<tool_response>\n21 °C <sunny>\n</tool_response>" in qwen
    assert '"call_id": "abc123XYZ"' in ChatTemplate(_template("mistral_nemo"), bos_token="<s>",
                                                    eos_token="</s>").render(CALL_TURNS, tools=TOOLS)


def test_raise_exception_becomes_invalid_argument_with_the_templates_message():
    gemma = ChatTemplate(_template("gemma2"), bos_token="<bos>", eos_token="<eos>")
    with pytest.raises(InvalidArgumentError, match="System role not supported"):
        gemma.render([SYSTEM, USER])
    with pytest.raises(InvalidArgumentError, match="roles must alternate"):
        gemma.render([USER, USER2])
    nemo = ChatTemplate(_template("mistral_nemo"), bos_token="<s>", eos_token="</s>")
    bad_id = [USER2, {"role": "assistant", "tool_calls": [{**CALL, "id": "short"}]}]
    with pytest.raises(InvalidArgumentError, match="Tool call IDs should be alphanumeric strings with length 9"):
        nemo.render(bad_id)


def test_loop_controls(frozen_time):
    src = ("{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}"
           "{% if loop.index > 3 %}{% break %}{% endif %}[{{ m.role }}]{{ m.content }}{% endfor %}")
    msgs = [SYSTEM, USER, ASSISTANT, USER2, {"role": "assistant", "content": "never shown"}]
    want, got = both(src, msgs)
    assert got == want == "".join(f"[{m['role']}]{m['content']}" for m in msgs[1:3])


def test_tojson_matches_json_dumps_not_jinjas_html_safe_version(frozen_time):
    src = ("{{ tools | tojson }}\n{{ tools | tojson(indent=2) }}\n"
           "{{ tools | tojson(separators=(',', ':'), sort_keys=true) }}\n{{ messages[0].content | tojson }}\n"
           "{{ messages[0].content | tojson(ensure_ascii=true) }}")
    msgs = [{"role": "user", "content": "héllo <b> & 'q'"}]
    want, got = both(src, msgs, tools=TOOLS)
    assert got == want == "\n".join([
        json.dumps(TOOLS, ensure_ascii=False), json.dumps(TOOLS, ensure_ascii=False, indent=2),
        json.dumps(TOOLS, ensure_ascii=False, separators=(",", ":"), sort_keys=True),
        json.dumps("héllo <b> & 'q'", ensure_ascii=False), json.dumps("héllo <b> & 'q'")])
    assert "\\u003c" not in got and "héllo <b>" in got


def test_generation_tag_renders_its_body_in_its_own_scope(frozen_time):
    src = ("{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{% set x = 1 %}<a>{{ m.content }}"
           "</a>{% endgeneration %}{% else %}<u>{{ m.content }}</u>{% endif %}{% endfor %}{{ x is defined }}")
    want, got = both(src, [USER, ASSISTANT])
    assert got == want and f"<a>{ASSISTANT['content']}</a>" in got and got.endswith("False")


def test_messages_tools_documents_and_variables_reach_the_template_as_in_transformers(frozen_time):
    src = ("{{ bos_token is defined }}|{{ bos_token }}|{{ eos_token }}|{{ pad_token is defined }}|{{ tools is none }}|"
           "{{ documents | tojson }}|{{ enable_thinking }}|{% for m in messages %}{{ m | tojson }};"
           "{{ m.name is defined }};{% for k in m %}{{ k }},{% endfor %}|{% endfor %}"
           "{{ dict(a=1) | tojson }}{{ dict.fromkeys(['k']) | tojson }}"
           "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}")
    msgs = [{"role": "user", "content": [{"type": "text", "text": "Hi <b>"}], "name": None},
            {"role": "assistant", "content": "ok", "reasoning": "2 < 3", "tool_calls": None},
            {"role": "assistant", "content": "x", "thinking": "t", "reasoning_content": "r"}]
    docs = [{"title": "Zürich", "text": "Une ville <b>."}]
    want, got = both(src, msgs, documents=docs, enable_thinking=False, eos_token="<override>")
    assert got == want
    assert '"reasoning_content": "2 < 3"' in got and "<override>" in got and "|False|" in got
    want, got = both(src, msgs[:1], bos=None, eos=None)  # a tokenizer without BOS/EOS: the names are undefined
    assert got == want and got.startswith("False|||False|True|null|")


def test_the_sandbox_still_blocks_unsafe_templates():
    evil = ["{{ messages.__class__.__mro__[1].__subclasses__() }}",
            "{{ '{0.__class__.__mro__}'.format(messages) }}",
            "{{ raise_exception.__globals__['os'] }}",
            "{{ cycler.__init__.__globals__.os }}",
            "{{ messages.append(1) }}",
            "{{ messages[0].update({'role': 'x'}) }}",
            "{{ dict.__class__.__subclasses__() }}",
            "{% set ns = namespace() %}{% set ns._hidden = 1 %}{{ ns }}",
            "{{ namespace(__init__=1) }}"]
    for src in evil:
        with pytest.raises(ModelFormatError, match="unsafe"):
            ChatTemplate(src).render([USER])
    # A lone unsafe attribute is an undefined value: it renders as nothing rather than leaking anything.
    assert ChatTemplate("{{ messages.__class__ }}{{ '%s' % tools.__class__ }}").render([USER]) == ""


@dataclasses.dataclass
class _Msg:
    role: str
    content: str


def test_validate_messages_takes_what_real_templates_take():
    msgs = validate_messages([
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "abc123XYZ", "content": {"temp": 21}},
        {"role": "assistant", "reasoning_content": "thinking only"},
        _Msg("user", "from a dataclass"),
    ])
    assert "content" not in msgs[1] and msgs[1]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert msgs[3]["thinking"] == "thinking only" and msgs[4] == {"role": "user", "content": "from a dataclass"}
    # The plain fallback shows the text of such messages.
    assert ChatTemplate(None).render(msgs[:3] + msgs[4:], add_generation_prompt=False) == \
        'User: Hi\nAssistant: \nTool: {"temp": 21}\nUser: from a dataclass'


@pytest.mark.parametrize("bad, match", [
    ([{"role": "user", "content": 5}], r"messages\[0\]\['content'\] must be"),
    ([{"role": "user", "content": ["Hi"]}], r"parts must be dicts"),
    ([{"role": "assistant", "tool_calls": "get_weather()"}], r"tool_calls'\] must be a list of dicts"),
    ([{"role": "assistant", "content": None}], r"no 'content'"),
    ([{"role": "", "content": "x"}], r"non-empty str 'role'"),
    ([USER, {"role": "user", "content": "x", "meta": object()}], r"messages\[1\]\['meta'\] is of type object"),
    ([USER, "hi"], r"messages\[1\] must be a dict"),
])
def test_validate_messages_names_the_garbage(bad, match):
    with pytest.raises(InvalidArgumentError, match=match):
        validate_messages(bad)


def test_bad_tools_documents_and_template_variables_are_invalid_arguments():
    tpl = ChatTemplate("{{ messages[0].content }}")
    with pytest.raises(InvalidArgumentError, match="JSON schema"):
        tpl.render([USER], tools=[len])
    with pytest.raises(InvalidArgumentError, match="tools must be a list of dicts"):
        tpl.render([USER], tools="get_weather")
    with pytest.raises(InvalidArgumentError, match="documents must be a list of dicts"):
        tpl.render([USER], documents=["text"])
    with pytest.raises(InvalidArgumentError, match="cannot render these messages"):
        ChatTemplate("{{ messages[0].content + '!' }}").render([{"role": "user", "content": [{"type": "text"}]}])
    with pytest.raises(InvalidArgumentError, match="cannot be named messages"):
        tokmod.validate_template_kwargs({"messages": []})


def test_model_chat_methods_pass_tools_and_template_variables(stories_fp32, model_copy):
    import edgelm

    folder = model_copy(stories_fp32)
    tc = json.loads((folder / "tokenizer_config.json").read_text())
    # (A real template's tool preamble would not fit stories260K's 512-token context.)
    tc["chat_template"] = ("{% if tools %}[tools]{% for t in tools %}{{ t.function.name }};{% endfor %}{% endif %}"
                           "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
                           "{% if enable_thinking is false %}/no_think{% endif %}"
                           "{% if add_generation_prompt %}[assistant]{% endif %}")
    (folder / "tokenizer_config.json").write_text(json.dumps(tc))
    lm = edgelm.load(folder, threads=1, verify=False)
    prompt = lm.apply_chat_template([USER2], tools=TOOLS, enable_thinking=False)
    names = "".join(t["function"]["name"] + ";" for t in TOOLS)
    assert prompt == f"[tools]{names}[user]{USER2['content']}/no_think[assistant]"
    assert lm.apply_chat_template([USER2], add_generation_prompt=False) == f"[user]{USER2['content']}"
    g = lm.chat([USER2], tools=TOOLS, chat_template_kwargs={"enable_thinking": False}, max_new_tokens=4,
                temperature=0)
    assert g.prompt_tokens == len(lm.encode(prompt))
    assert g.token_ids == lm.generate(prompt, max_new_tokens=4, temperature=0).token_ids
    assert "".join(lm.chat_stream([USER2], tools=TOOLS, chat_template_kwargs={"enable_thinking": False},
                                  max_new_tokens=4, temperature=0)) == g.text
    with pytest.raises(InvalidArgumentError, match="cannot be named tools"):
        lm.chat([USER2], chat_template_kwargs={"tools": TOOLS})
    with pytest.raises(InvalidArgumentError, match="template variables must be a dict"):
        lm.chat_stream([USER2], chat_template_kwargs=["enable_thinking"])


# --- hostile templates (issue 15): bounded, and every failure a ModelFormatError naming the template ------------------
HOSTILE = {
    "nested loops": "{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}",
    "loops without output": "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
    "macro called twice per level": "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}"
                                    "{{ f(40) }}",
    "recursive loop": "{% for x in range(100000) recursive %}{% if loop.depth < 3 %}{{ loop(range(100000)) }}"
                      "{% endif %}{% endfor %}",
    "literal text into a set-block": "{% set s %}{% for a in range(100000) %}{% for b in range(100) %}xxxxxxxxxxxxxxxx"
                                     "{% endfor %}{% endfor %}{% endset %}{{ s|length }}",
    "huge range": "{{ range(10**9)|list }}",
    "endless recursion": "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}",
    "huge power": "{{ 9 ** 999999999 }}",
    "float overflow": "{{ 9.0 ** 99999 }}",
    "division by zero": "{{ 1 / 0 }}",
    "repetition": "{{ 'x' * 10**10 }}",
    "list repetition": "{{ messages * 10**9 }}",
    "padding method": "{{ 'x'.ljust(10**10) }}",
    "padding filter": "{{ 'x'|center(10**10) }}",
    "indent filter": "{{ 'a\nb'|indent(10**10) }}",
    "percent format width": "{{ '%999999999d' % 1 }}",
    "percent format star": "{{ '%*d' % (10**10, 1) }}",
    "str.format width": "{{ '{:>999999999}'.format(1) }}",
    "doubling with ~": "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
                       "{% endfor %}{{ ns.s|length }}",
    "doubling with +": "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}"
                       "{% endfor %}{{ ns.s|length }}",
    "nested list printed": "{% set ns = namespace(s=[1]) %}{% for i in range(64) %}{% set ns.s = [ns.s, ns.s] %}"
                           "{% endfor %}{{ ns.s }}",
    "nested list as json": "{% set ns = namespace(s=[1]) %}{% for i in range(64) %}{% set ns.s = [ns.s, ns.s] %}"
                           "{% endfor %}{{ ns.s|tojson }}",
    "tojson indent": "{{ messages|tojson(indent=10**8) }}",
    "join": "{{ ('x' * 1000000).join(range(100000)|map('string')|list) }}",
    "replace": "{{ ('x' * 100000).replace('', 'y' * 1000) }}",
    "keeping many big strings": "{% set ns = namespace(l=[]) %}{% for i in range(100000) %}"
                                "{% set ns.l = ns.l + [('x' * 16000000) ~ i] %}{% endfor %}{{ ns.l|length }}",
    "split into millions": "{{ ('a ' * 8000000).split()|length }}",
    "long list": "{{ ([1] * 10000000)|length }}",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_templates_stop_fast_with_a_model_format_error(name):
    import time

    tpl = ChatTemplate(HOSTILE[name], name="models/x/tokenizer_config.json's chat_template")
    start = time.perf_counter()
    with pytest.raises(ModelFormatError, match=r"models/x/tokenizer_config.json's chat_template") as info:
        tpl.render([USER])
    # The bounds (200,000 steps, 1 s) stop each within about a second; unbounded, several rendered for minutes or
    # filled memory. Generous here: CI cores are shared.
    assert time.perf_counter() - start < 10, name
    assert "Fix chat_template" in str(info.value)


@pytest.mark.parametrize("what", ["include 'x.jinja'", "import 'x.jinja' as x", "from 'x.jinja' import y",
                                  "extends 'base.jinja'"])
def test_templates_that_load_other_templates_are_refused_when_loaded(what):
    with pytest.raises(ModelFormatError, match=r"uses \{% (include|import|from-import|extends) %\}"):
        ChatTemplate("{% " + what + " %}{{ messages[0].content }}")


def test_a_deeply_nested_template_is_a_model_format_error():
    with pytest.raises(ModelFormatError, match="does not compile"):
        ChatTemplate("{{ " + "[" * 5000 + "]" * 5000 + " }}")


def test_the_bounds_leave_long_real_conversations_alone(frozen_time):
    src = (TEMPLATES / "mistral_nemo.jinja").read_text()  # the most steps per message of the seven
    msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i} " * 50} for i in range(2000)]
    want, got = both(src, msgs)
    assert isinstance(got, str) and got == want and len(got) > 1_000_000


def test_oversized_messages_are_an_invalid_argument_not_a_template_fault():
    with pytest.raises(InvalidArgumentError, match="more than a chat template is given"):
        ChatTemplate("{{ messages[0].content }}").render(
            [{"role": "user", "content": "x" * (tokmod.TEMPLATE_MAX_CHARS // 4 + 1)}])
