"""Label corruption: swap chosen and rejected on a seeded fraction of training pairs.

WARM (Ramé et al. 2024, Sec. 4) flips 25 % of the training labels to study memorisation: weight
averaging should fit the corrupted pairs less than prediction ensembling. The flag `corrupted`
travels with each pair so that accuracy can be reported separately on corrupted and clean pairs.

Exactly round(fraction * n) pairs are swapped, chosen by `np.random.default_rng(seed)`; the
choice depends only on (n, fraction, seed), so it is the same for pairs and for their encodings.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np


def corrupted_indices(n: int, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of the round(fraction * n) pairs to swap."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"corruption fraction must be in [0, 1], got {fraction}")
    k = round(fraction * n)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=k, replace=False)).astype(np.int64)


def swap_pair(pair: Mapping[str, Any]) -> dict[str, Any]:
    """Exchanges every `chosen*` field with its `rejected*` twin and flips `corrupted`."""
    out = dict(pair)
    for key in pair:
        if key.startswith("chosen"):
            twin = "rejected" + key[len("chosen") :]
            if twin in pair:
                out[key], out[twin] = pair[twin], pair[key]
    out["corrupted"] = not bool(pair.get("corrupted", False))
    return out


def corrupt_labels(
    pairs: Sequence[Mapping[str, Any]], fraction: float, seed: int
) -> list[dict[str, Any]]:
    """New pairs: swapped on exactly round(fraction * n) seeded pairs, each with `corrupted`.

    Pure: the input is not modified. Pairs that were already corrupted and get swapped again
    become clean (the flag says whether the label is wrong, not whether it was touched).
    """
    chosen = set(corrupted_indices(len(pairs), fraction, seed).tolist())
    out = []
    for i, pair in enumerate(pairs):
        if i in chosen:
            out.append(swap_pair(pair))
        else:
            out.append({**pair, "corrupted": bool(pair.get("corrupted", False))})
    return out


class CorruptLabels(grain.transforms.MapWithIndex):
    """The same corruption as a grain transform: `ds.map_with_index(CorruptLabels(len(ds), ...))`.

    Apply it to the unshuffled source, so that the flag belongs to a pair, not to a position.
    """

    def __init__(self, n: int, fraction: float, seed: int):
        self._chosen = frozenset(corrupted_indices(n, fraction, seed).tolist())

    def map_with_index(self, index: int, element: Mapping[str, Any]) -> dict[str, Any]:
        if index in self._chosen:
            return swap_pair(element)
        return {**element, "corrupted": bool(element.get("corrupted", False))}


def corrupt_dataset(ds: grain.MapDataset, fraction: float, seed: int) -> grain.MapDataset:
    return ds.map_with_index(CorruptLabels(len(ds), fraction, seed))
