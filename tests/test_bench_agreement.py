"""benchmarks/chat_agreement.py's measures: the prefix share and the teacher-forced decode steps it reports."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mod():
    spec = importlib.util.spec_from_file_location("chat_agreement", ROOT / "benchmarks" / "chat_agreement.py")
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m


def test_prefix_share(mod):
    assert mod.prefix_share([1, 2, 3, 4], [1, 2, 3, 4]) == (1.0, None)
    assert mod.prefix_share([1, 2, 3, 4], [1, 2, 3, 4, 9]) == (1.0, None)  # a longer candidate still agrees
    assert mod.prefix_share([1, 2, 3, 4], [1, 2, 7, 4]) == (0.5, 2)
    assert mod.prefix_share([1, 2, 3, 4], [9]) == (0.0, 0)
    assert mod.prefix_share([1, 2, 3, 4], [1, 2]) == (0.5, 2)  # stopped early: the rest is not agreement


def test_teacher_forced_steps_reproduce_greedy_decoding(mod):
    """Fed its own greedy answer step by step, a model chooses that answer at every step; fed another model's
    tokens it still predicts from the forced prefix (the choices are its own, not a copy of the input)."""
    import numpy as np

    import edgelm

    lm = edgelm.load(str(ROOT / "models" / "tinystories-edge-int8"), threads=1)
    ids = lm.tokenizer.encode("Once upon a time, a little fox", add_bos=True)
    ans = list(lm.generate(ids, max_new_tokens=24, temperature=0, ignore_eos=True).token_ids)
    choices, rows = mod.forced_choices(lm, ids, ans)
    assert choices == ans
    assert all(abs(np.exp(r).sum() - 1) < 1e-6 and int(r.argmax()) == c for r, c in zip(rows, choices))
    other = list(reversed(ans))
    forced, _ = mod.forced_choices(lm, ids, other)
    assert forced[0] == ans[0]  # the first choice sees only the prompt
    # later choices follow the forced prefix, so they are neither a copy of it nor the free-running answer
    assert forced != other and forced != ans
