"""Property tests of streaming on the real stories260K model: random seeds, temperatures (high ones make the
model emit raw byte tokens, i.e. broken and multi-byte UTF-8) and stop strings (some multi-byte, some taken
from the text so they really fire)."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import edgelm
from conftest import cut_at_stop

PROMPTS = ["Once upon a time", "The café served 😀 crêpes and 中文 tea.", "Lily said, \"Hi!\""]
STOP_ALPHABET = st.sampled_from(list("ae .,\n") + ["é", "😀", "中", " the", "Lily"])


@pytest.fixture(scope="module")
def lm(stories_fp32):
    return edgelm.load(stories_fp32, threads=1)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), seed=st.integers(0, 2**31 - 1), temperature=st.floats(0.0, 2.5),
       prompt=st.sampled_from(PROMPTS), n_stops=st.integers(0, 3))
def test_stream_properties(lm, data, seed, temperature, prompt, n_stops):
    kw = dict(max_new_tokens=40, temperature=temperature, seed=seed, top_k=0, top_p=1.0)
    base = lm.generate(prompt, **kw)
    stops = []
    for _ in range(n_stops):
        if base.text and data.draw(st.booleans(), label="from text"):
            i = data.draw(st.integers(0, len(base.text) - 1), label="start")
            stops.append(base.text[i:i + data.draw(st.integers(1, 5), label="len")])
        else:
            stops.append(data.draw(st.lists(STOP_ALPHABET, min_size=1, max_size=3).map("".join), label="stop"))

    stream = lm.stream(prompt, stop=stops, **kw)
    pieces = list(stream)
    g = lm.generate(prompt, stop=stops, **kw)

    # pieces join to generate's text for the same seed
    assert "".join(pieces) == g.text == stream.generation.text
    # the text is the unstopped text cut where the first stop string completes; nothing of a stop leaks
    expected, stopped = cut_at_stop(base.text, stops)
    assert g.text == expected
    assert (g.finish_reason == "stop") == stopped
    assert not any(s in g.text for s in stops)
    # no piece is empty, and none but the last ends inside a character (which would decode to U+FFFD)
    assert all(pieces)
    assert not any(p.endswith("\ufffd") for p in pieces[:-1])
    # same tokens as the unstopped run, up to where it stopped
    assert g.token_ids == base.token_ids[:len(g.token_ids)]
