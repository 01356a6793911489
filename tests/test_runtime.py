"""The runtime on real exported models (stories260K): generate / stream / chat / score, and every error path."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import edgelm
from conftest import EVAL_TEXT
from edgelm.errors import (ChecksumError, ContextLengthError, InvalidArgumentError, ModelFormatError,
                           ModelNotFoundError, TokenizerError)
from edgelm.folder import write_manifest

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def lm(stories_fp32):
    return edgelm.load(stories_fp32, threads=1)


def no_cache_greedy(lm, prompt_ids, n):
    """Greedy decoding the slow, obviously-correct way: a full forward pass over everything, every step."""
    ids, lps = list(prompt_ids), []
    for _ in range(n):
        logits = lm._logits(ids)[-1].astype(np.float64)
        nxt = int(np.argmax(logits))
        lps.append(float(logits[nxt] - (logits.max() + np.log(np.exp(logits - logits.max()).sum()))))
        ids.append(nxt)
    return ids[len(prompt_ids):], lps


def test_greedy_matches_recomputation_without_cache(lm):
    g = lm.generate(PROMPT, max_new_tokens=40, temperature=0)
    tokens, lps = no_cache_greedy(lm, lm.encode(PROMPT), 40)
    assert g.token_ids == tokens
    np.testing.assert_allclose(g.logprobs, lps, atol=1e-4)
    assert g.finish_reason == "length" and g.completion_tokens == 40
    assert g.prompt_tokens == len(lm.encode(PROMPT))
    assert g.text == lm.tokenizer.decode(lm.encode(PROMPT) + g.token_ids)[len(PROMPT):]
    assert g.mean_logprob == pytest.approx(sum(lps) / 40, abs=1e-4)
    assert g.time_to_first_token_s > 0 and g.decode_tokens_per_s > 0 and g.total_time_s >= g.time_to_first_token_s
    # greedy is deterministic, and the seed does not matter
    assert lm.generate(PROMPT, max_new_tokens=40, temperature=0, seed=5).token_ids == g.token_ids


@pytest.mark.slow
def test_greedy_matches_pytorch(lm, shared_dir):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.set_num_threads(1)
    src = shared_dir / "fixtures" / "stories260K"
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(src)).eval()
    ids = lm.encode(PROMPT)
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=30, do_sample=False, eos_token_id=None)
    assert lm.generate(ids, max_new_tokens=30, temperature=0).token_ids == out[0, len(ids):].tolist()


def test_token_id_prompt_is_used_as_is(lm):
    ids = lm.encode(PROMPT)
    assert lm.generate(ids, max_new_tokens=10, temperature=0).token_ids == \
        lm.generate(PROMPT, max_new_tokens=10, temperature=0).token_ids
    # without BOS the model sees something else: ids really are used as given
    g = lm.generate(ids[1:], max_new_tokens=10, temperature=0)
    assert g.prompt_tokens == len(ids) - 1


def test_seeded_sampling_is_reproducible(lm):
    kw = dict(max_new_tokens=40, temperature=1.0, top_k=0, top_p=1.0)
    a = lm.generate(PROMPT, seed=1, **kw)
    assert lm.generate(PROMPT, seed=1, **kw).token_ids == a.token_ids
    others = {tuple(lm.generate(PROMPT, seed=s, **kw).token_ids) for s in (2, 3, 4)}
    assert len(others | {tuple(a.token_ids)}) > 1


def test_logprobs_are_under_the_unmodified_distribution(lm):
    # Sampling with a low temperature and top-k must still report log p under the model itself.
    g = lm.generate(PROMPT, max_new_tokens=8, temperature=0.3, top_k=3, seed=0)
    ids = lm.encode(PROMPT)
    for tok, lp in zip(g.token_ids, g.logprobs):
        logits = lm._logits(ids)[-1].astype(np.float64)
        assert lp == pytest.approx(logits[tok] - np.log(np.exp(logits).sum()), abs=1e-4)
        ids.append(tok)


def test_stop_string_cuts_text_and_sets_finish_reason(lm):
    full = lm.generate(PROMPT, max_new_tokens=60, temperature=0)
    stop = full.text[20:24]
    g = lm.generate(PROMPT, max_new_tokens=60, temperature=0, stop=["zzzz-not-there", stop])
    assert g.finish_reason == "stop"
    assert g.text == full.text[:full.text.find(stop)]
    assert stop not in g.text
    assert g.token_ids == full.token_ids[:len(g.token_ids)] and len(g.token_ids) < 60


def test_eos_finish_reason(lm, stories_fp32, model_copy):
    # stories260K ends stories with BOS, not EOS; make the greedy path's 6th token an EOS id to test the rule.
    full = lm.generate(PROMPT, max_new_tokens=30, temperature=0)
    eos_id = full.token_ids[5]
    first = full.token_ids.index(eos_id)
    folder = model_copy(stories_fp32)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["eos_token_ids"] = [eos_id]
    (folder / "config.json").write_text(json.dumps(cfg))
    write_manifest(folder, **{k: v for k, v in json.loads((folder / "edgelm.json").read_text()).items()
                              if k not in ("files", "format_version", "created")})
    m = edgelm.load(folder, threads=1)
    g = m.generate(PROMPT, max_new_tokens=30, temperature=0)
    assert g.finish_reason == "eos"
    assert g.token_ids == full.token_ids[:first + 1]  # the EOS token is reported ...
    assert g.text == m.tokenizer.decode(m.encode(PROMPT) + full.token_ids[:first])[len(PROMPT):]  # ... not shown
    assert len(g.logprobs) == len(g.token_ids)
    ignored = m.generate(PROMPT, max_new_tokens=30, temperature=0, ignore_eos=True)
    assert ignored.finish_reason == "length" and ignored.token_ids == full.token_ids


@pytest.mark.parametrize("kw", [
    dict(max_new_tokens=50, temperature=0),
    dict(max_new_tokens=50, temperature=1.3, seed=11),
    dict(max_new_tokens=50, temperature=0.9, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.2, seed=3),
    dict(max_new_tokens=80, temperature=0, stop=[" the", "."]),
])
def test_stream_joins_to_generate(lm, kw):
    g = lm.generate(PROMPT, **kw)
    s = lm.stream(PROMPT, **kw)
    pieces = list(s)
    assert "".join(pieces) == g.text
    assert s.generation is not None and s.generation.token_ids == g.token_ids
    assert s.generation.finish_reason == g.finish_reason
    assert all(pieces)


def test_stream_checks_arguments_before_the_first_piece(lm):
    with pytest.raises(InvalidArgumentError):
        lm.stream(PROMPT, temperature=-1)  # raised by the call itself, not by next()


def test_chat_fallback_template(lm):
    msgs = [{"role": "user", "content": "Tell me a story about a cat."}]
    prompt = lm.apply_chat_template(msgs)
    assert prompt == "User: Tell me a story about a cat.\nAssistant:"
    g = lm.chat(msgs, max_new_tokens=60, temperature=0)
    ref = lm.generate(prompt, max_new_tokens=60, temperature=0, stop="\nUser:")
    assert g.text == ref.text and "\nUser:" not in g.text
    assert "".join(lm.chat_stream(msgs, max_new_tokens=60, temperature=0)) == g.text


def test_chat_uses_the_model_template(stories_fp32, model_copy):
    folder = model_copy(stories_fp32)
    tc = json.loads((folder / "tokenizer_config.json").read_text())
    tc["chat_template"] = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                           "{% if add_generation_prompt %}[assistant]{% endif %}")
    (folder / "tokenizer_config.json").write_text(json.dumps(tc))
    m = edgelm.load(folder, threads=1, verify=False)
    msgs = [{"role": "user", "content": "Hi"}]
    assert m.apply_chat_template(msgs) == "<s>[user] Hi\n[assistant]"
    g = m.chat(msgs, max_new_tokens=10, temperature=0)
    assert g.prompt_tokens == len(m.encode("<s>[user] Hi\n[assistant]"))
    assert m.encode("<s>[user] Hi\n[assistant]").count(m.tokenizer.bos_token_id) == 1
    assert g.token_ids == m.generate("[user] Hi\n[assistant]", max_new_tokens=10, temperature=0).token_ids


def test_score_short_text_equals_direct_sum(lm):
    text = "Tom has a red ball. He likes to play with it."
    s = lm.score(text)
    ids = lm.encode(text)
    logits = lm._logits(ids)[:-1].astype(np.float64)
    lse = np.log(np.exp(logits).sum(axis=1))
    direct = float(sum(logits[i, ids[i + 1]] - lse[i] for i in range(len(ids) - 1)))
    assert s.num_tokens == len(ids) - 1 and s.num_bytes == len(text.encode())
    assert s.total_logprob == pytest.approx(direct, abs=1e-3)
    assert s.bits_per_byte == pytest.approx(-direct / math.log(2) / s.num_bytes, rel=1e-6)
    assert s.perplexity == pytest.approx(math.exp(-direct / s.num_tokens), rel=1e-6)


def test_score_windows_cover_every_token_once(lm):
    text = EVAL_TEXT.read_text(encoding="utf-8")[:6000] if EVAL_TEXT.is_file() else "The dog ran. " * 500
    s = lm.score(text)
    assert s.num_tokens == len(lm.encode(text)) - 1
    assert len(lm.encode(text)) > lm.context_length * 2  # several windows really were used


def _score_in_calls(lm, monkeypatch, text, rows_per_call):
    """lm.score(text) with SCORE_CALL_ROWS = rows_per_call; returns (the Score, each call's number of rows)."""
    import edgelm.model as m

    monkeypatch.setattr(m, "SCORE_CALL_ROWS", rows_per_call)
    rows = []
    original = m._logprobs_into

    def spy(logits, targets, out, at):
        rows.append(len(logits))
        return original(logits, targets, out, at)

    monkeypatch.setattr(m, "_logprobs_into", spy)
    try:
        return lm.score(text), rows
    finally:
        monkeypatch.setattr(m, "_logprobs_into", original)


def test_score_runs_long_windows_in_calls_over_the_cache(lm, monkeypatch):
    """Where the cache stays in place ("shared"), a window is scored in calls of at most SCORE_CALL_ROWS tokens:
    no call's logits hold more rows, and on a graph whose rows do not depend on their call (fp32 here) the
    log-probabilities are those of one call over the window. Generation afterwards is unchanged (the pooled
    buffers rebind)."""
    assert lm.kv_cache == "shared"
    text = "The dog ran to the park and back. " * 40
    before = lm.generate("Once upon a time", max_new_tokens=12, temperature=0).token_ids
    whole, whole_rows = _score_in_calls(lm, monkeypatch, text, 10**9)
    chunked, rows = _score_in_calls(lm, monkeypatch, text, 48)
    n = len(lm.encode(text))
    assert n > lm.context_length  # two windows: the second one's first calls only fill the cache
    assert max(whole_rows) > 48 and max(rows) == 48 and sum(rows) == n - 1
    assert chunked.num_tokens == whole.num_tokens == n - 1
    assert chunked.total_logprob == pytest.approx(whole.total_logprob, rel=1e-6)
    assert lm.generate("Once upon a time", max_new_tokens=12, temperature=0).token_ids == before


def test_an_int8_gemm_graph_scores_in_calls_too(stories_int8, monkeypatch):
    """The default int8 of stories260K keeps int8 GEMMs (one activation scale per call), so calls of 48 rows
    give slightly different numbers from one call over the window (those of a 48-token prefill), and its memory
    is bounded the same way."""
    int8 = edgelm.load(stories_int8)
    assert int8.folder.manifest["quantization"]["gemm_matmuls"] > 0 and int8.kv_cache == "shared"
    text = "The dog ran to the park and back. " * 40
    whole, _ = _score_in_calls(int8, monkeypatch, text, 10**9)
    chunked, rows = _score_in_calls(int8, monkeypatch, text, 48)
    assert max(rows) == 48 and chunked.num_tokens == whole.num_tokens
    assert chunked.total_logprob != whole.total_logprob
    assert chunked.total_logprob == pytest.approx(whole.total_logprob, rel=0.02)


def _prefill_calls(lm, monkeypatch, prompt_ids, rows_per_call, new_tokens=8):
    """Greedy generation with PREFILL_CALL_ROWS = rows_per_call; returns (the Generation, the attention-mask length
    of each model call, which is where each call ends)."""
    import edgelm.model as m

    monkeypatch.setattr(m, "PREFILL_CALL_ROWS", rows_per_call)
    ends = []
    original = lm._mask
    monkeypatch.setattr(lm, "_mask", lambda n: (ends.append(n), original(n))[1])
    try:
        return lm.generate(prompt_ids, max_new_tokens=new_tokens, temperature=0), ends
    finally:
        monkeypatch.setattr(lm, "_mask", original)


@pytest.mark.parametrize("prompt_len", [100, 96, 16, 17])
def test_a_long_prompt_prefills_in_calls_over_the_cache(lm, monkeypatch, prompt_len):
    """A prompt longer than PREFILL_CALL_ROWS runs in calls of at most that many tokens (the last one holds the
    rest, at least one token); on an fp32 graph the answer and its log-probabilities are those of one call."""
    assert lm.kv_cache == "shared"
    ids = (lm.encode("The dog ran to the park and back. " * 20))[:prompt_len]
    assert len(ids) == prompt_len
    whole, whole_ends = _prefill_calls(lm, monkeypatch, ids, 10**9)
    chunked, ends = _prefill_calls(lm, monkeypatch, ids, 16)
    calls = -(-prompt_len // 16)
    assert whole_ends[0] == prompt_len and len(whole_ends) == 1 + 7
    assert ends[:calls] == [min(16 * (i + 1), prompt_len) for i in range(calls)] and len(ends) == calls + 7
    assert chunked.token_ids == whole.token_ids and chunked.prompt_tokens == prompt_len
    np.testing.assert_allclose(chunked.logprobs, whole.logprobs, atol=1e-5)


def test_lookup_and_sampling_run_after_a_prefill_in_calls(lm, monkeypatch):
    """After a prefill in calls the bindings are a one-token step's again: prompt lookup's verifications and a
    sampled generation give what they give after a one-call prefill (fp32: the same tokens)."""
    import edgelm.model as m

    ids = lm.encode("The dog ran to the park and back. " * 20)[:100]
    got = {}
    for rows in (10**9, 16):
        plain, _ = _prefill_calls(lm, monkeypatch, ids, rows, new_tokens=30)
        monkeypatch.setattr(m, "PREFILL_CALL_ROWS", rows)
        looked = lm.generate(ids, max_new_tokens=30, temperature=0, lookup=True)
        assert looked.drafted_tokens > 0 and looked.accepted_tokens > 0  # the repeated text is drafted
        got[rows] = (plain.token_ids, looked.token_ids,
                     lm.generate(ids, max_new_tokens=30, temperature=0.8, seed=3).token_ids)
    assert got[16] == got[10**9]
    assert got[16][0] == got[16][1]  # lookup's tokens are plain greedy's on fp32


def test_an_int8_gemm_graph_prefills_in_calls_too(stories_int8, monkeypatch):
    """The default int8's prefill is bounded the same way. Its GEMMs' activation scale then covers one call, so
    the last position's logits move a little (those of a 32-token call), and only a little."""
    import edgelm.model as m

    int8 = edgelm.load(stories_int8)
    assert int8.folder.manifest["quantization"]["gemm_matmuls"] > 0 and int8.kv_cache == "shared"
    ids = int8.encode("The dog ran to the park and back. " * 20)[:100]
    g, ends = _prefill_calls(int8, monkeypatch, ids, 32)
    assert ends[:4] == [32, 64, 96, 100] and len(g.token_ids) == 8
    arr = np.asarray([ids], np.int64)
    last = {}
    for rows in (32, 10**9):
        monkeypatch.setattr(m, "PREFILL_CALL_ROWS", rows)
        cache = int8._shared_cache()
        last[rows] = cache.prefill(arr)[0].copy()
        int8._release(cache)
    assert not np.array_equal(last[32], last[10**9])
    assert np.abs(last[32] - last[10**9]).max() < 0.05 * np.ptp(last[10**9])


def test_score_windows_shrink_to_the_logits_budget(lm, monkeypatch):
    """A large vocabulary is scored in windows whose logits fit SCORE_LOGITS_BYTES; every token still once."""
    import edgelm.model as m

    text = "The dog ran to the park and back. " * 60
    calls = []
    original = m.Model._target_logprobs

    def spy(self, ids, skip):
        calls.append(len(ids))
        return original(self, ids, skip)

    monkeypatch.setattr(m.Model, "_target_logprobs", spy)
    full = lm.score(text)
    assert max(calls) == min(lm.context_length, len(lm.encode(text)))
    calls.clear()
    window = 64
    monkeypatch.setattr(m, "SCORE_LOGITS_BYTES", 4 * lm.vocab_size * window)
    small = lm.score(text)
    assert max(calls) == window and len(calls) > 2
    assert small.num_tokens == full.num_tokens == len(lm.encode(text)) - 1
    # less context per token, so a slightly different (but close) perplexity
    assert small.perplexity == pytest.approx(full.perplexity, rel=0.25)


@pytest.mark.slow
def test_bits_per_byte_matches_the_reference(lm, shared_dir):
    text = (shared_dir / "eval" / "tinystories-v1-valid-a.txt").read_text(encoding="utf-8")
    s = lm.score(text)
    # tools/bpb_reference.py (fp32 PyTorch, same windows) gives 1.0236 on this file.
    assert s.bits_per_byte == pytest.approx(1.0236, abs=0.001)


# --- errors ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [
    dict(temperature=-0.5), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1), dict(min_p=1.0), dict(min_p=-0.1),
    dict(repetition_penalty=0), dict(max_new_tokens=0), dict(max_new_tokens=-3), dict(stop=5), dict(stop=[1]),
    dict(stop=[""]), dict(truncate="right"), dict(seed="x"), dict(ignore_eos="yes"),
])
def test_bad_arguments(lm, kw):
    with pytest.raises(InvalidArgumentError):
        lm.generate(PROMPT, **kw)


@pytest.mark.parametrize("prompt", ["", [], None, 42, [1, "a"], [1, 10**6], [-1]])
def test_bad_prompts(lm, prompt):
    with pytest.raises(InvalidArgumentError, match="prompt"):
        lm.generate(prompt)


def test_a_numpy_array_of_ids_is_a_prompt(lm):
    import numpy as np

    ids = lm.encode(PROMPT)
    want = lm.generate(ids, max_new_tokens=6, temperature=0).token_ids
    assert lm.generate(np.asarray(ids, dtype=np.int64), max_new_tokens=6, temperature=0).token_ids == want
    assert lm.generate(tuple(ids), max_new_tokens=6, temperature=0).token_ids == want


def test_unknown_options_are_named_for_the_method_called(lm):
    msgs = [{"role": "user", "content": "Hi"}]
    with pytest.raises(InvalidArgumentError, match=r"Model\.chat\(\) got an unexpected option 'max_tokens'") as info:
        lm.chat(msgs, max_tokens=5)
    assert "Did you mean max_new_tokens?" in info.value.hint
    with pytest.raises(InvalidArgumentError, match=r"Model\.stream\(\) got an unexpected option 'temprature'") as info:
        lm.stream(PROMPT, temprature=0)
    assert "Did you mean temperature?" in info.value.hint
    with pytest.raises(InvalidArgumentError, match=r"Model\.chat_stream\(\).*'bogus'"):
        lm.chat_stream(msgs, bogus=1)


def test_prompt_too_long(lm):
    ids = [1] + [261] * 500
    with pytest.raises(ContextLengthError) as info:
        lm.generate(ids, max_new_tokens=20)
    e = info.value
    assert (e.prompt_tokens, e.max_new_tokens, e.context_length) == (501, 20, 512)
    assert "501" in str(e) and "512" in str(e) and "truncate" in str(e)
    g = lm.generate(ids, max_new_tokens=20, truncate="left", temperature=0)
    assert g.prompt_tokens == 512 - 20 and g.completion_tokens == 20
    with pytest.raises(ContextLengthError):
        lm.generate(PROMPT, max_new_tokens=512, truncate="left")


def test_default_max_new_tokens_is_capped_to_the_context(lm):
    ids = [1] + [261] * 450
    g = lm.generate(ids, temperature=0)  # generation_config's 128 would not fit; the default is capped
    assert g.completion_tokens == 512 - 451 and g.finish_reason == "length"
    with pytest.raises(ContextLengthError) as info:
        lm.generate([1] + [261] * 511, temperature=0)  # no room at all
    # the message is about the prompt: it names no max_new_tokens the caller never set
    assert not info.value.max_new_tokens_given and "was not given" in str(info.value)
    assert "lower max_new_tokens" not in str(info.value) and "truncate='left'" in str(info.value)
    with pytest.raises(ContextLengthError):
        lm.generate(ids, max_new_tokens=128)  # explicit values are never changed


def test_chat_truncate_left_fits_the_messages_not_the_rendered_text(lm):
    from edgelm.model import fit_messages

    long = "the cat sat on the mat " * 60
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": long},
            {"role": "assistant", "content": long}, {"role": "user", "content": "And then? " + long * 2}]
    with pytest.raises(ContextLengthError):
        lm.chat(msgs, max_new_tokens=20)
    fitted, dropped = fit_messages(lm, msgs, 20)
    # the oldest exchange went whole, the newest message lost its start, the system message stayed
    assert fitted[0] == msgs[0] and len(fitted) == 2 and dropped > 0
    assert msgs[3]["content"].endswith(fitted[1]["content"].lstrip())
    g = lm.chat(msgs, max_new_tokens=20, truncate="left", temperature=0)
    assert g.prompt_tokens == len(lm.encode(lm.apply_chat_template(fitted))) <= lm.context_length - 20
    assert g.token_ids == lm.chat(fitted, max_new_tokens=20, temperature=0).token_ids
    assert "".join(lm.chat_stream(msgs, max_new_tokens=20, truncate="left", temperature=0)) == g.text
    with pytest.raises(InvalidArgumentError, match="max_new_tokens"):
        lm.chat(msgs, max_new_tokens=-1, truncate="left")
    with pytest.raises(ContextLengthError, match="system message"):  # no room even for an empty message
        lm.chat([{"role": "system", "content": long * 3}, {"role": "user", "content": "Hi"}], max_new_tokens=20,
                truncate="left")


def test_hybrid_chat_truncate_left_fits_the_local_messages_like_model_chat(lm, monkeypatch):
    """Hybrid.chat(truncate="left") gives the local model the fitted messages, as Model.chat does -- also when the
    conversation went to the cloud for its length and the cloud was down -- instead of the rendered conversation
    cut from the left (which loses the system message first)."""
    pytest.importorskip("httpx")
    from edgelm.cloud import CloudClient
    from edgelm.hybrid import Hybrid
    from edgelm.model import fit_messages

    long = "the cat sat on the mat " * 60
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": long},
            {"role": "assistant", "content": long}, {"role": "user", "content": "And then? " + long * 2}]
    want = lm.chat(msgs, max_new_tokens=20, truncate="left", temperature=0)
    fitted_prompt = lm.apply_chat_template(fit_messages(lm, msgs, 20)[0])
    seen: list[str] = []  # every prompt the local model is asked to continue
    for verb in ("generate", "stream"):
        monkeypatch.setattr(lm, verb, lambda p, _f=getattr(lm, verb), **kw: (seen.append(p), _f(p, **kw))[1])
    r = Hybrid(lm).chat(msgs, max_new_tokens=20, truncate="left", temperature=0)  # no cloud: local
    assert r.source == "local" and r.generation.token_ids == want.token_ids
    down = Hybrid(lm, CloudClient("http://127.0.0.1:9/v1", timeout=2))  # loopback, nothing listens
    r = down.chat(msgs, max_new_tokens=20, truncate="left", temperature=0)
    assert r.signal == "context" and r.source == "local" and r.fallback  # sent out whole, answered here
    assert r.generation.token_ids == want.token_ids and r.generation.prompt_tokens == want.prompt_tokens
    s = down.chat_stream(msgs, max_new_tokens=20, truncate="left", temperature=0)
    assert "".join(s) == want.text
    # the system message and the template's header reached the local model every time
    assert seen == [fitted_prompt] * 3 and fitted_prompt.startswith(lm.apply_chat_template(msgs[:1], add_generation_prompt=False))
    # the template and system message alone leave no room for the message: the query still goes out, and the
    # fallback answers from the rendered prompt cut from the left (the caller always gets an answer)
    huge = [{"role": "system", "content": long * 3}, {"role": "user", "content": "Hi"}]
    r = down.chat(huge, max_new_tokens=20, truncate="left", temperature=0)
    assert r.signal == "context" and r.source == "local" and r.fallback
    assert r.generation.prompt_tokens == lm.context_length - 20


def test_truncate_left_keeps_bos(lm):
    ids = [1] + list(range(300, 340)) * 12  # 481 tokens
    g = lm.generate(ids, max_new_tokens=40, truncate="left", temperature=0)
    kept = [1] + ids[len(ids) - (512 - 40) + 1:]
    assert g.token_ids == lm.generate(kept, max_new_tokens=40, temperature=0).token_ids


def test_truncated_onnx(stories_fp32, model_copy):
    folder = model_copy(stories_fp32)
    data = (folder / "model.onnx").read_bytes()
    (folder / "model.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(ChecksumError, match="model.onnx") as info:
        edgelm.load(folder)
    assert info.value.path.endswith("model.onnx") and "truncated" in str(info.value)
    with pytest.raises(ModelFormatError, match="model.onnx"):
        edgelm.load(folder, verify=False)


def test_flipped_byte(stories_fp32, model_copy):
    folder = model_copy(stories_fp32)
    data = bytearray((folder / "model.onnx").read_bytes())
    data[len(data) // 3] ^= 0x40
    (folder / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="model.onnx.*sha256"):
        edgelm.load(folder)


def test_missing_tokenizer(stories_fp32, model_copy):
    folder = model_copy(stories_fp32)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        edgelm.load(folder)


def test_a_folder_that_is_not_a_model_says_so(stories_fp32, tmp_path):
    parent = tmp_path / "models"
    parent.mkdir()
    (parent / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="not an edgelm model folder") as info:
        edgelm.load(parent / "empty")
    assert "tokenizer" not in str(info.value)
    shutil.copytree(stories_fp32, parent / "stories")
    with pytest.raises(ModelNotFoundError, match="not an edgelm model folder") as info:
        edgelm.load(parent)  # the parent of model folders, a common slip
    assert info.value.hint and str(parent / "stories") in info.value.hint
    with pytest.raises(ModelNotFoundError, match="is a file") as info:
        edgelm.load(parent / "stories" / "model.onnx")
    assert "edgelm export" in info.value.hint
    hf = parent / "hf"  # a Hugging Face model folder passed where an edgelm folder is expected
    hf.mkdir()
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        (hf / name).write_text("{}")
    with pytest.raises(ModelNotFoundError, match="edgelm.json is missing") as info:
        edgelm.load(hf)
    assert f"edgelm export {hf} --out DIR" in info.value.hint


def test_missing_config(stories_fp32, model_copy):
    folder = model_copy(stories_fp32)
    (folder / "config.json").unlink()
    with pytest.raises(ModelNotFoundError, match="config.json"):
        edgelm.load(folder)


def test_broken_config(stories_fp32, model_copy):
    folder = model_copy(stories_fp32)
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["num_layers"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ChecksumError, match="config.json"):
        edgelm.load(folder)
    with pytest.raises(ModelFormatError, match="num_layers"):
        edgelm.load(folder, verify=False)


def test_default_model_and_env_override(stories_fp32, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGELM_MODEL", str(tmp_path / "nope"))
    with pytest.raises(ModelNotFoundError):
        edgelm.load()
    monkeypatch.setenv("EDGELM_MODEL", str(stories_fp32))
    assert edgelm.load(threads=1).path == stories_fp32
    monkeypatch.delenv("EDGELM_MODEL")
    import edgelm_models

    if not edgelm_models.default_path().is_dir():
        with pytest.raises(ModelNotFoundError, match="EDGELM_MODEL"):
            edgelm.load()


@pytest.mark.parametrize("threads", [0, -1, 1.5, True])
def test_bad_threads(stories_fp32, threads):
    with pytest.raises(InvalidArgumentError, match="threads"):
        edgelm.load(stories_fp32, threads=threads)


def test_spin_default_follows_idle_cores_and_env(monkeypatch):
    from edgelm import model as m

    monkeypatch.delenv(m.ENV_SPIN, raising=False)
    monkeypatch.setattr(m, "_read_cpu_times", lambda: None)  # no /proc/stat: the load average decides
    monkeypatch.setattr(m.os, "cpu_count", lambda: 4)
    monkeypatch.setattr(m.os, "getloadavg", lambda: (0.2, 0.0, 0.0))
    assert m.default_spin(2) is True and m.default_spin(4) is True
    assert m.default_spin(1) is False  # no workers to spin
    monkeypatch.setattr(m.os, "getloadavg", lambda: (3.0, 0.0, 0.0))  # one core idle
    assert m.default_spin(2) is False
    monkeypatch.setenv(m.ENV_SPIN, "1")
    assert m.default_spin(2) is True and m.default_spin(1) is True
    monkeypatch.setattr(m.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    monkeypatch.setenv(m.ENV_SPIN, "off")
    assert m.default_spin(2) is False
    monkeypatch.setenv(m.ENV_SPIN, "banana")  # a typo is an error, not the default in disguise
    with pytest.raises(InvalidArgumentError, match="EDGELM_SPIN is 'banana'"):
        m.default_spin(2)


def test_spin_reaches_onnxruntime(stories_int8, monkeypatch):
    monkeypatch.delenv("EDGELM_SPIN", raising=False)
    for spin in (True, False):
        lm = edgelm.load(stories_int8, threads=2, spin=spin)
        opts = lm._session.get_session_options()
        assert lm.spin is spin and opts.get_session_config_entry("session.intra_op.allow_spinning") == str(int(spin))
        assert f"spin={spin}" in repr(lm)
    with pytest.raises(InvalidArgumentError, match="spin"):
        edgelm.load(stories_int8, spin="yes")


def test_threads_default_is_physical_cores_except_for_small_models(stories_fp32):
    from edgelm.model import SINGLE_THREAD_BELOW_BYTES, default_threads, physical_cores

    n = physical_cores()
    assert 1 <= n <= (os.cpu_count() or 1)
    assert default_threads(SINGLE_THREAD_BELOW_BYTES) == n
    assert default_threads(SINGLE_THREAD_BELOW_BYTES - 1) == 1
    assert sum(p.stat().st_size for p in stories_fp32.glob("model.onnx*")) < SINGLE_THREAD_BELOW_BYTES
    assert edgelm.load(stories_fp32).threads == 1  # a 260K-parameter model: one thread is faster
    assert edgelm.load(stories_fp32, threads=2).threads == 2


def test_import_and_load_are_fast(stories_fp32):
    code = ("import time; t = time.perf_counter(); import edgelm; "
            f"lm = edgelm.load({str(stories_fp32)!r}, threads=1); print(time.perf_counter() - t)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    # target 0.5 s; the bound is loose because the test machine is shared
    assert float(out.stdout) < 3.0


def test_int8_model_generates(stories_int8, lm):
    m = edgelm.load(stories_int8, threads=1)
    assert m.config["dtype"] != "float32"
    g = m.generate(PROMPT, max_new_tokens=30, temperature=0)
    ref = lm.generate(PROMPT, max_new_tokens=30, temperature=0)
    assert g.completion_tokens == 30
    agree = sum(a == b for a, b in zip(g.token_ids, ref.token_ids))
    assert agree >= 10  # int8 tracks fp32 closely at first; the exporter's tests own the exact agreement numbers


def test_exported_tokenizer_matches_the_source(lm, shared_dir):
    # The exporter must carry the tokenizer over unchanged in behaviour (the AutoTokenizer comparison itself
    # is in test_tokenizer.py, on the source folder).
    from edgelm.tokenizer import Tokenizer

    src = shared_dir / "fixtures" / "stories260K"
    source = Tokenizer(src / "tokenizer.json", tokenizer_config=json.loads((src / "tokenizer_config.json").read_text()))
    text = EVAL_TEXT.read_text(encoding="utf-8")[:20000] if EVAL_TEXT.is_file() else "Once upon a time"
    for s in [text, "Hello 😀 wörld", " leading space", "<s>twice"]:
        assert lm.encode(s) == source.encode(s)


def test_greedy_never_imports_numpy_random(stories_int8):
    """numpy.random is 6 MB of resident memory: greedy decoding and scoring do without it; sampling loads it."""
    code = ("import sys, edgelm; lm = edgelm.load(sys.argv[1]); "
            "lm.generate('Once upon a time', max_new_tokens=4, temperature=0); lm.score('Once upon a time'); "
            "a = 'numpy.random' in sys.modules; "
            "g1 = lm.generate('Once upon a time', max_new_tokens=6, temperature=0.9, seed=5).token_ids; "
            "g2 = lm.generate('Once upon a time', max_new_tokens=6, temperature=0.9, seed=5).token_ids; "
            "print(a, 'numpy.random' in sys.modules, g1 == g2)")
    out = subprocess.run([sys.executable, "-c", code, str(stories_int8)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True", "True"]


# --- hostile model folders and arguments (issue 15) ---------------------------------------------------------------
# These use copies of the shipped default model: it has external weights (model.onnx.data) and a chat template.
import edgelm_models  # noqa: E402
from edgelm.errors import EdgeLMError, ModelError  # noqa: E402

DEFAULT = edgelm_models.default_path()
needs_default = pytest.mark.skipif(not (DEFAULT / "edgelm.json").is_file(), reason="default model not built")


def _edit_manifest(folder, change):
    manifest = json.loads((folder / "edgelm.json").read_text())
    change(manifest)
    (folder / "edgelm.json").write_text(json.dumps(manifest))


@needs_default
@pytest.mark.parametrize("name, match", [
    ("model.onnx.data", r"reads its weights from model.onnx.data, which edgelm.json does not list"),
    ("model.onnx", r"model.onnx is not listed in"),
    ("config.json", r"config.json is not listed in"),
    ("tokenizer.json", r"tokenizer.json is not listed in"),
])
def test_verify_covers_every_file_the_runtime_reads(model_copy, name, match):
    folder = model_copy(DEFAULT)
    _edit_manifest(folder, lambda m: m["files"].pop(name))
    with pytest.raises(ModelFormatError, match=match) as info:
        edgelm.load(folder)
    assert "verify=False" in str(info.value)  # says what to do
    assert edgelm.load(folder, verify=False).generate("Once", max_new_tokens=2).completion_tokens >= 1


@needs_default
def test_unlisted_optional_files_are_ignored_never_read(model_copy, monkeypatch):
    folder = model_copy(DEFAULT)
    _edit_manifest(folder, lambda m: [m["files"].pop(n) for n in ("tokenizer_config.json", "generation_config.json")])
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": "PLANTED {{ messages[0].content }}"}))
    (folder / "generation_config.json").write_text(json.dumps({"temperature": 0.0123}))
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda f, *a, **k: opened.append(str(f)) or real_open(f, *a, **k))
    lm = edgelm.load(folder)
    monkeypatch.undo()
    assert not [f for f in opened if f.endswith(("tokenizer_config.json", "generation_config.json"))], opened
    assert not lm.apply_chat_template([{"role": "user", "content": "hi"}]).startswith("PLANTED")
    assert lm.generation_config == {}
    # Without verification the folder is taken as it is.
    lm = edgelm.load(folder, verify=False)
    assert lm.apply_chat_template([{"role": "user", "content": "hi"}]).startswith("PLANTED hi")


@needs_default
@pytest.mark.parametrize("name", ["/etc/hostname", "../outside.txt", "sub/../../outside.txt", "C:/x", "a\\..\\b",
                                  "", "link-out"])
def test_manifest_paths_outside_the_folder_are_refused_before_anything_is_opened(model_copy, monkeypatch, tmp_path,
                                                                                 name):
    folder = model_copy(DEFAULT)
    outside = tmp_path / "outside.txt"
    outside.write_text("secret")
    (folder / "link-out").symlink_to(outside)
    _edit_manifest(folder, lambda m: m["files"].update({name: {"sha256": "0" * 64, "size": 6}}))
    hashed = []
    monkeypatch.setattr("edgelm.folder.sha256_file", lambda p: hashed.append(p) or "0" * 64)
    with pytest.raises(ModelFormatError, match="not a relative path inside|outside the model folder"):
        edgelm.load(folder)
    assert hashed == []  # refused while reading the manifest, before any file was hashed


@needs_default
def test_a_link_inside_the_folder_is_fine(model_copy):
    from edgelm.folder import write_manifest

    folder = model_copy(DEFAULT)
    (folder / "LICENSE-stories260K.txt").rename(folder / "licence.txt")
    (folder / "LICENSE-stories260K.txt").symlink_to("licence.txt")
    write_manifest(folder, **{k: v for k, v in json.loads((folder / "edgelm.json").read_text()).items()
                              if k not in ("files", "format_version", "created")})
    assert edgelm.load(folder).path == folder


@needs_default
def test_a_hugging_face_hub_snapshot_with_links_into_its_blobs_loads(tmp_path):
    # huggingface_hub's cache: snapshots/<revision>/<file> -> ../../blobs/<hash>. Allowed; any other way out is not.
    snapshot, blobs = tmp_path / "models--org--name" / "snapshots" / "abc123", tmp_path / "models--org--name" / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for f in DEFAULT.iterdir():
        shutil.copyfile(f, blobs / f"hash-{f.name}")
        (snapshot / f.name).symlink_to(f"../../blobs/hash-{f.name}")
    assert edgelm.load(snapshot).generate("Once", max_new_tokens=2).completion_tokens >= 1
    (tmp_path / "elsewhere.json").write_bytes((DEFAULT / "config.json").read_bytes())
    (snapshot / "config.json").unlink()
    (snapshot / "config.json").symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(ModelFormatError, match="outside the model folder"):
        edgelm.load(snapshot)


@needs_default
@pytest.mark.parametrize("location", ["../model.onnx.data", "/tmp/edgelm-outside.data", "sub/../../model.onnx.data"])
def test_external_data_outside_the_folder_is_refused(model_copy, location):
    onnx = pytest.importorskip("onnx")
    from edgelm.folder import external_data_locations, write_manifest

    folder = model_copy(DEFAULT)
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    moved = 0
    for tensor in graph.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
                moved += 1
    assert moved
    onnx.save(graph, str(folder / "model.onnx"))
    assert external_data_locations(folder / "model.onnx") == {location}
    fields = {k: v for k, v in json.loads((folder / "edgelm.json").read_text()).items()
              if k not in ("files", "format_version", "created")}
    write_manifest(folder, **fields)  # checksums all match: only the location is wrong
    for verify in (True, False):
        with pytest.raises(ModelFormatError, match="not a relative path inside"):
            edgelm.load(folder, verify=verify)


@needs_default
def test_external_data_locations_are_read_without_the_onnx_package():
    from edgelm.folder import external_data_locations

    assert external_data_locations(DEFAULT / "model.onnx") == {"model.onnx.data"}


@needs_default
@pytest.mark.parametrize("change, match", [
    (lambda m: m["files"]["config.json"].update(size="12"), r"malformed entry for 'config.json'"),
    (lambda m: m["files"]["config.json"].update(size=-1), r"malformed entry for 'config.json'"),
    (lambda m: m["files"]["config.json"].update(size=True), r"malformed entry for 'config.json'"),
    (lambda m: m["files"]["config.json"].update(sha256=123), r"malformed entry for 'config.json'"),
    (lambda m: m["files"].update({"config.json": ["a", 1]}), r"malformed entry for 'config.json'"),
    (lambda m: m.update(files=[{"config.json": {}}]), r"malformed 'files'"),
    (lambda m: m.update(files={}), r"lists no files"),
    (lambda m: m.update(source="somewhere"), r"malformed 'source'"),
    (lambda m: m.update(num_parameters="5M"), r"malformed 'num_parameters'"),
])
def test_malformed_manifests_are_typed_errors(model_copy, change, match):
    folder = model_copy(DEFAULT)
    _edit_manifest(folder, change)
    with pytest.raises(ModelFormatError, match=match):
        edgelm.load(folder)


@needs_default
@pytest.mark.parametrize("name", ["config.json", "model.onnx.data", "edgelm.json"])
def test_unreadable_files_are_typed_errors(model_copy, monkeypatch, name):
    folder = model_copy(DEFAULT)
    if os.geteuid() != 0:
        os.chmod(folder / name, 0)
    else:  # root reads anything: make open() refuse that one file as the kernel would
        real_open = open

        def refuse(f, *a, **k):
            if str(f) == str(folder / name):
                raise PermissionError(13, "Permission denied", str(f))
            return real_open(f, *a, **k)
        monkeypatch.setattr("builtins.open", refuse)
    with pytest.raises(ModelError, match=rf"{name} cannot be read \(Permission denied\)") as info:
        edgelm.load(folder)
    assert "chmod" in str(info.value)


@pytest.mark.parametrize("path, match", [(123, "must be a str or os.PathLike, got int"), ("", "empty"),
                                         ("   ", "empty"), (b"models", "got bytes"), (["x"], "got list")])
def test_bad_model_paths(path, match, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # "" once meant the current directory
    with pytest.raises(InvalidArgumentError, match=match):
        edgelm.load(path)


@needs_default
def test_lone_surrogates_are_invalid_arguments_everywhere():
    lm = edgelm.load(DEFAULT)
    bad = "Once \ud800 upon"
    calls = [lambda: lm.generate(bad), lambda: lm.stream(bad), lambda: lm.score(bad), lambda: lm.encode(bad),
             lambda: lm.tokenizer.encode(bad), lambda: lm.generate("Once", stop=["\udfff"]),
             lambda: lm.chat([{"role": "user", "content": bad}]),
             lambda: lm.chat_stream([{"role": "user", "content": [{"type": "text", "text": bad}]}]),
             lambda: lm.chat([{"role": "user", "content": "hi"}], tools=[{"name": bad}])]
    for call in calls:
        with pytest.raises(InvalidArgumentError, match="lone surrogate"):
            call()
    assert lm.generate("Once \U0001F600 upon", max_new_tokens=2).completion_tokens >= 1  # a real pair is fine


@needs_default
def test_the_kv_buffer_pool_is_capped_after_many_suspended_streams():
    from edgelm.model import KV_POOL_MAX

    lm = edgelm.load(DEFAULT)
    assert lm.kv_cache == "shared" and lm.kv_pool_max == KV_POOL_MAX
    streams = [lm.stream("Once upon a time", max_new_tokens=8, temperature=0) for _ in range(3 * KV_POOL_MAX)]
    firsts = [next(s) for s in streams]  # all suspended mid-generation, each holding a buffer set
    assert len(lm._kv_pool) == 0
    texts = [first + "".join(s) for first, s in zip(firsts, streams)]  # finished: every one gives its set back
    assert len(lm._kv_pool) == KV_POOL_MAX
    want = lm.generate("Once upon a time", max_new_tokens=8, temperature=0).text
    assert texts == [want] * len(streams)  # reused or not, nothing was lost or mixed up
    more = [lm.stream("Once", max_new_tokens=4) for _ in range(5)]
    for s in more:
        next(s)
    for s in more:
        s.close()  # closed early: the same cap
    assert len(lm._kv_pool) == KV_POOL_MAX
    lm.kv_pool_max = 1
    for s in [lm.stream("Once", max_new_tokens=2) for _ in range(3)]:
        list(s)
    assert len(lm._kv_pool) <= KV_POOL_MAX
