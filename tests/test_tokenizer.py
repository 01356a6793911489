"""Tokenizer wrapper, streaming detokenization, stop strings and chat templates, on the real stories260K
tokenizer (SentencePiece-style BPE with byte fallback: the hard case for streaming)."""
from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from conftest import STORIES260K, cut_at_stop, needs_shared
from edgelm.errors import InvalidArgumentError, ModelFormatError, TokenizerError
from edgelm.tokenizer import (ChatTemplate, StopMatcher, StreamingDetokenizer, Tokenizer, chat_template_source,
                              validate_stop)

pytestmark = needs_shared()

# Text that exercises multi-byte UTF-8 (2-, 3- and 4-byte characters become byte-fallback tokens here).
ALPHABET = st.sampled_from(list("abc xyz,.!\n") +
                           ["é", "ö", "ß", "€", "中", "日", "😀", "🦊", "\u200d", "  "])
TEXT = st.lists(ALPHABET, min_size=1, max_size=40).map("".join)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    cfg = json.loads((STORIES260K / "tokenizer_config.json").read_text())
    return Tokenizer(STORIES260K / "tokenizer.json", tokenizer_config=cfg)


def test_bos_once(tok):
    ids = tok.encode("Once upon a time")
    assert ids[0] == tok.bos_token_id == 1 and ids.count(1) == 1
    assert tok.encode("Once upon a time", add_bos=False) == ids[1:]
    # A prompt that already spells the BOS token (as chat templates do) does not get a second one.
    assert tok.encode("<s>Once upon a time") == ids
    assert tok.eos_token_ids == (2,)


def test_bos_added_when_post_processor_does_not(tok, tmp_path):
    data = json.loads((STORIES260K / "tokenizer.json").read_text())
    data["post_processor"] = None
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data))
    with_bos = Tokenizer(path, bos_token_id=1, add_bos_token=True)
    without = Tokenizer(path, bos_token_id=1, add_bos_token=False)
    plain = tok.encode("The cat sat.", add_bos=False)
    assert with_bos.encode("The cat sat.") == [1] + plain
    assert without.encode("The cat sat.") == plain
    assert with_bos.encode("<s>The cat sat.") == [1] + plain


def test_matches_transformers_autotokenizer(tok, shared_dir):
    transformers = pytest.importorskip("transformers")
    auto = transformers.AutoTokenizer.from_pretrained(str(STORIES260K))
    text = (shared_dir / "eval" / "tinystories-v1-valid-a.txt").read_text(encoding="utf-8")[:30000]
    samples = ["Once upon a time", "Hello 😀 wörld", "a\n\nb  c", "日本語", "Tom said, \"No!\"", text]
    for s in samples:
        assert tok.encode(s) == auto(s).input_ids, s[:40]
        ids = tok.encode(s)
        assert tok.decode(ids) == auto.decode(ids, skip_special_tokens=True)


def test_missing_or_broken_tokenizer_file(tmp_path):
    with pytest.raises(TokenizerError, match="missing"):
        Tokenizer(tmp_path / "tokenizer.json")
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot be read"):
        Tokenizer(bad)


def stream_pieces(tok, ids, context=()):
    d = StreamingDetokenizer(tok, context)
    pieces = [d.push(i) for i in ids]
    return pieces, d.flush()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXT)
def test_streaming_pieces_join_to_decode_and_never_split_a_character(tok, text):
    ids = tok.encode(text, add_bos=True)
    pieces, tail = stream_pieces(tok, ids)
    assert "".join(pieces) + tail == tok.decode(ids)
    for p in pieces + [tail]:
        assert "\ufffd" not in p  # a split multi-byte character would decode to U+FFFD
    # each piece is valid UTF-8 on its own (round-trips through bytes)
    for p in pieces:
        assert p.encode("utf-8").decode("utf-8") == p


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=TEXT, completion=TEXT)
def test_streaming_after_a_prompt_keeps_leading_spaces(tok, prompt, completion):
    p = tok.encode(prompt)
    c = tok.encode(completion, add_bos=False)
    full, head = tok.decode(p + c), tok.decode(p)
    assume(full.startswith(head))
    pieces, tail = stream_pieces(tok, c, context=p)
    assert "".join(pieces) + tail == full[len(head):]


def test_streaming_holds_back_an_incomplete_character(tok):
    ids = tok.encode("😀", add_bos=False)
    assert len(ids) > 2  # byte fallback: one token per byte
    pieces, tail = stream_pieces(tok, ids)
    assert pieces[:-1] == [""] * (len(pieces) - 1) and pieces[-1].endswith("😀") and tail == ""
    # cut off mid-character: flush still returns something (a replacement character), never raises
    pieces, tail = stream_pieces(tok, ids[:-1])
    assert "".join(pieces) == "" and tail.endswith("\ufffd")


@settings(max_examples=300, deadline=None)
@given(data=st.data(), text=TEXT, n_stops=st.integers(1, 3))
def test_stop_matcher_cuts_at_first_stop_and_never_leaks(data, text, n_stops):
    stops = []
    for _ in range(n_stops):
        if text and data.draw(st.booleans()):  # a stop that occurs in the text
            i = data.draw(st.integers(0, len(text) - 1))
            j = data.draw(st.integers(i + 1, min(len(text), i + 6)))
            stops.append(text[i:j])
        else:
            stops.append(data.draw(TEXT))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=10)))
    chunks = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
    m = StopMatcher(stops)
    shown, stopped = "", False
    for chunk in chunks:
        safe, stopped = m.feed(chunk)
        shown += safe
        # nothing shown so far contains (or could be the start of a match ending beyond) a stop string
        assert not any(s in shown for s in stops)
        if stopped:
            break
    if not stopped:
        shown += m.flush()
    expected, should_stop = cut_at_stop(text, stops)
    assert (shown, stopped) == (expected, should_stop)


def test_validate_stop():
    assert validate_stop(None) == ()
    assert validate_stop("\n") == ("\n",)
    assert validate_stop(["a", "b"]) == ("a", "b")
    for bad in (3, ["a", 3], [""], {"a"}, b"x"):
        with pytest.raises(InvalidArgumentError, match="stop"):
            validate_stop(bad)


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Tell a story"}]


def test_fallback_chat_format():
    t = ChatTemplate(None)
    assert t.is_fallback
    assert t.render(MESSAGES) == "System: Be brief.\nUser: Hi\nAssistant: Hello.\nUser: Tell a story\nAssistant:"
    assert t.render(MESSAGES[:2], add_generation_prompt=False) == "System: Be brief.\nUser: Hi"


def test_jinja_chat_template_renders_in_a_sandbox():
    src = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
           "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    t = ChatTemplate(src, bos_token="<s>", eos_token="</s>")
    out = t.render(MESSAGES[1:2])
    assert out == "<s><|user|>\nHi</s>\n<|assistant|>\n"
    evil = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(ModelFormatError, match="unsafe"):
        evil.render(MESSAGES)
    strict = ChatTemplate("{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}"
                          "{% endif %}ok")
    assert strict.render(MESSAGES[1:]) == "ok"
    with pytest.raises(InvalidArgumentError, match="first must be user"):
        strict.render(MESSAGES)
    with pytest.raises(ModelFormatError, match="does not compile"):
        ChatTemplate("{% for %}")


def test_chat_template_source_forms():
    assert chat_template_source({}) is None
    assert chat_template_source({"chat_template": "x"}) == "x"
    assert chat_template_source({"chat_template": [{"name": "tool_use", "template": "t"},
                                                   {"name": "default", "template": "d"}]}) == "d"


@pytest.mark.parametrize("bad", [[], "hi", [{"role": "user"}], [{"role": 1, "content": "x"}], [None]])
def test_bad_messages(bad):
    with pytest.raises(InvalidArgumentError, match="messages"):
        ChatTemplate(None).render(bad)


def test_streaming_a_long_text_restarts_its_window_without_changing_the_text(tok):
    # Hundreds of tokens, multi-byte characters split over byte tokens at every offset: the decode window
    # restarts many times (edgelm.tokenizer._WINDOW) and the pieces must still join to the full decode.
    from edgelm.tokenizer import _WINDOW

    text = "".join(f"Tom saw {i} 😀 ducks, ö中 and a \u00e9clair.\n" for i in range(12))
    ids = tok.encode(text, add_bos=False)
    assert len(ids) > 10 * _WINDOW
    pieces, tail = stream_pieces(tok, ids)
    assert "".join(pieces) + tail == tok.decode(ids)
    assert all("\ufffd" not in p for p in pieces)
