"""Label corruption: exact seeded fraction, per-example flags, purity, grain transform."""

from __future__ import annotations

import copy

import grain
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from warm_jax.data.corruption import corrupt_dataset, corrupt_labels, corrupted_indices


def _pairs(n):
    return [
        {"id": f"p{i}", "prompt": f"q{i}", "chosen": f"good{i}", "rejected": f"bad{i}",
         "chosen_answer": 1, "rejected_answer": 2}
        for i in range(n)
    ]  # fmt: skip


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 300), fraction=st.floats(0, 1), seed=st.integers(0, 2**32 - 1))
def test_exactly_round_fraction_n(n, fraction, seed):
    idx = corrupted_indices(n, fraction, seed)
    assert len(idx) == round(fraction * n) == len(set(idx.tolist()))
    assert (np.diff(idx) > 0).all() and (idx < max(n, 1)).all()
    np.testing.assert_array_equal(idx, corrupted_indices(n, fraction, seed))


def test_swaps_and_flags_quarter_of_pairs():
    pairs = _pairs(100)
    before = copy.deepcopy(pairs)
    out = corrupt_labels(pairs, 0.25, seed=3)
    assert pairs == before  # pure
    flags = [p["corrupted"] for p in out]
    assert sum(flags) == 25
    for i, (orig, new) in enumerate(zip(pairs, out)):
        assert new["prompt"] == orig["prompt"] and new["id"] == orig["id"]
        if new["corrupted"]:
            assert (new["chosen"], new["rejected"]) == (f"bad{i}", f"good{i}")
            assert (new["chosen_answer"], new["rejected_answer"]) == (2, 1)
        else:
            assert (new["chosen"], new["rejected"]) == (f"good{i}", f"bad{i}")
    assert [p["corrupted"] for p in corrupt_labels(pairs, 0.25, seed=3)] == flags
    assert [p["corrupted"] for p in corrupt_labels(pairs, 0.25, seed=4)] != flags
    # Corrupting a corrupted set flips some labels back: the flag says "label is wrong".
    twice = corrupt_labels(out, 1.0, seed=0)
    assert [p["corrupted"] for p in twice] == [not f for f in flags]


def test_grain_transform_matches_list_version():
    pairs = _pairs(40)
    ds = corrupt_dataset(grain.MapDataset.source(pairs), 0.25, seed=11)
    assert list(ds) == corrupt_labels(pairs, 0.25, seed=11)


def test_bad_fraction():
    with pytest.raises(ValueError, match="fraction"):
        corrupted_indices(10, 1.5, 0)
