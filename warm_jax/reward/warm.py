"""WARM: the uniform weight average of reward models, and which members to average.

    φ_WARM = (1/M) Σ_{i=1..M} φ_i

Members must be fine-tunings of one shared pre-trained model (same architecture, same vocabulary,
ideally the same SFT backbone): only then are they linearly mode connected and is the average a
good model. `check_mergeable` refuses anything else with a message naming the difference.

Selection (WARM Sec. 5: the paper trains 10 RMs, ranks them by OOD accuracy, averages the top M):
`select_top` keeps the best M of K by a score; `greedy_select` is the greedy soup of Wortsman et
al. (2022) — add members in decreasing order of their own score, keep each one only if the
average's score does not drop.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from warm_jax import merging
from warm_jax.errors import UserError

PyTree = Any
SELECTIONS = ("all", "top", "greedy")


def check_same_model(
    configs: Sequence[Mapping[str, Any]],
    vocabularies: Sequence[str],
    names: Sequence[str],
) -> None:
    """Raises a UserError unless every member has the same model config and tokenizer
    (`vocabularies`: any fingerprint of the tokenizer, e.g. a hash of its JSON)."""
    for cfg, vocab, name in zip(configs[1:], vocabularies[1:], names[1:]):
        if dict(cfg) != dict(configs[0]):
            diff = sorted(k for k in set(cfg) | set(configs[0]) if cfg.get(k) != configs[0].get(k))
            detail = ", ".join(f"{k}: {configs[0].get(k)!r} vs {cfg.get(k)!r}" for k in diff[:4])
            raise UserError(
                f"cannot merge reward models of different architectures: {names[0]} and {name} "
                f"differ in {detail}"
            )
        if vocab != vocabularies[0]:
            raise UserError(
                f"cannot merge reward models with different vocabularies: the tokenizers of "
                f"{names[0]} and {name} differ"
            )


def check_mergeable(members: Sequence[PyTree], names: Sequence[str] | None = None) -> None:
    """Raises a UserError naming the first parameter where the members' trees differ."""
    names = list(names) if names is not None else [f"member {i}" for i in range(len(members))]
    try:
        merging.check_compatible(*members, names=names)
    except merging.TreeMismatchError as e:
        raise UserError(f"cannot merge reward models: {e}") from None


def warm_average(
    members: Sequence[PyTree],
    weights: Sequence[float] | None = None,
    names: Sequence[str] | None = None,
) -> PyTree:
    """φ_WARM = Σ_i w_i φ_i / Σ_i w_i (uniform by default), accumulated in float32."""
    if not members:
        raise UserError("WARM: no members to average")
    check_mergeable(members, names)
    return merging.average(list(members), weights)


def select_top(scores: Sequence[float], num: int) -> list[int]:
    """Indices of the `num` highest scores, best first (ties: lower index first)."""
    scores = np.asarray(scores, np.float64)
    if not 1 <= num <= len(scores):
        raise UserError(f"cannot select {num} of {len(scores)} members")
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return order[:num]


def greedy_select(
    scores: Sequence[float],
    score_of_average: Callable[[list[int]], float],
    max_members: int | None = None,
) -> list[int]:
    """Greedy soup: members ranked by their own score; each is added if the score of the
    weight average with it is ≥ the score without it. Returns the kept indices, best first."""
    ranked = select_top(scores, len(scores))
    kept = [ranked[0]]
    best = float(scores[ranked[0]])
    for i in ranked[1:]:
        if max_members is not None and len(kept) >= max_members:
            break
        s = float(score_of_average([*kept, i]))
        if s >= best:
            kept.append(i)
            best = s
    return kept
