"""Deterministic, seeded train/validation splits of datasets published with a test split only.

Examples are split by *group* (all pairs of one prompt, all answers to one question), so that no
prompt is in both splits. The assignment depends only on the set of group keys, the seed and the
fraction, not on the order of the input file.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Sequence

import numpy as np

from warm_jax.errors import UserError

SPLIT_SEED = 0
VALIDATION_FRACTION = 0.1


def group_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def validation_mask(
    groups: Sequence[str], fraction: float = VALIDATION_FRACTION, seed: int = SPLIT_SEED
) -> np.ndarray:
    """Boolean mask, True for examples assigned to validation.

    Distinct group keys are sorted, permuted by `np.random.default_rng(seed)`, and taken into
    validation in that order until validation holds at least round(fraction * n) examples
    (at least one when fraction > 0 and n >= 2, so that no split is empty).
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    sizes = collections.Counter(groups)
    keys = sorted(sizes)
    order = np.random.default_rng(seed).permutation(len(keys))
    target = round(fraction * len(groups))
    if fraction > 0 and len(groups) >= 2:
        target = max(target, 1)
    chosen, count = set(), 0
    for k in order:
        if count >= target:
            break
        chosen.add(keys[k])
        count += sizes[keys[k]]
    return np.array([g in chosen for g in groups], dtype=bool)


def check_nonempty(by_split: dict[str, list], dataset: str, source: str) -> None:
    """TFDS cannot write an empty split; say why instead of failing inside its writer."""
    for name, rows in by_split.items():
        if not rows:
            total = sum(len(r) for r in by_split.values())
            raise UserError(
                f"{dataset}: {source} gives {total} usable example(s), too few to fill the "
                f"{name!r} split"
            )


def describe(fraction: float = VALIDATION_FRACTION, seed: int = SPLIT_SEED, unit: str = "") -> str:
    return (
        f"Upstream publishes a test split only; `train` and `validation` are made from it here. "
        f"Examples are grouped by {unit or 'prompt'} (no group is in both splits); the distinct "
        f"groups' SHA-256 keys are sorted, permuted with numpy.random.default_rng({seed}), and "
        f"taken into `validation` in that order until it holds round({fraction} * n) examples (at least 1); "
        f"the rest is `train`. The result does not depend on the order of the input file."
    )
