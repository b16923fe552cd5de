"""Win rates: hand-computed values, ties, the prompt-clustered interval, bad input."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from warm_jax.policy import win_rate as wr


def test_hand_computed_per_prompt_win_rates():
    a = np.array([[1.0, 3.0], [0.0, 0.0]])
    b = np.array([[2.0, 2.0], [0.0, 1.0]])
    # prompt 0: (1>2 no, 1>2 no, 3>2 yes, 3>2 yes) = 0.5; prompt 1: (tie, lose, tie, lose) = 0.25
    np.testing.assert_allclose(wr.per_prompt_win_rates(a, b), [0.5, 0.25])
    r = wr.win_rate(a, b)
    assert r["win_rate"] == pytest.approx(0.375)
    assert r["tie_rate"] == pytest.approx(2 / 8)
    sem = np.std([0.5, 0.25], ddof=1) / np.sqrt(2)
    assert r["sem"] == pytest.approx(sem)
    assert r["ci_low"] == pytest.approx(0.375 - 1.96 * sem)
    assert r["prompts"] == 2


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 12), st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_antisymmetry_and_bounds(p, s, seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 3, (p, s)).astype(float)  # small integers: many ties
    b = rng.integers(0, 3, (p, s)).astype(float)
    ab, ba = wr.win_rate(a, b), wr.win_rate(b, a)
    assert ab["win_rate"] + ba["win_rate"] == pytest.approx(1.0)
    assert 0.0 <= ab["ci_low"] <= ab["win_rate"] <= ab["ci_high"] <= 1.0
    assert wr.win_rate(a, a)["win_rate"] == pytest.approx(0.5)


def test_a_better_policy_wins_with_an_interval_above_one_half():
    rng = np.random.default_rng(0)
    a = rng.normal(0.5, 1.0, (200, 4))
    b = rng.normal(0.0, 1.0, (200, 4))
    r = wr.win_rate(a, b)
    assert r["ci_low"] > 0.5


@pytest.mark.parametrize(
    "a, b",
    [
        (np.zeros((3, 2)), np.zeros((4, 2))),
        (np.zeros((0, 2)), np.zeros((0, 2))),
        (np.array([[np.nan]]), np.array([[0.0]])),
    ],
)
def test_bad_input_is_a_clear_error(a, b):
    with pytest.raises(ValueError, match="win rate"):
        wr.win_rate(a, b)
