"""Win rate of one policy against another, judged by a reward on the same prompts.

Each policy draws S responses per prompt. For prompt p the win rate is the fraction of the S x S
response pairs (a_j, b_k) where a's reward is higher, ties counting one half; the overall win
rate is the mean over prompts. Responses to one prompt are not independent of each other, so the
confidence interval is clustered by prompt: a normal interval on the per-prompt win rates
(prompts are the independent units), clipped to [0, 1].
"""

from __future__ import annotations

import math

import numpy as np


def per_prompt_win_rates(scores_a: np.ndarray, scores_b: np.ndarray) -> np.ndarray:
    """[P] win rates of a over b from [P, S_a] and [P, S_b] reward arrays."""
    a = np.asarray(scores_a, np.float64)
    b = np.asarray(scores_b, np.float64)
    if a.ndim == 1:
        a = a[:, None]
    if b.ndim == 1:
        b = b[:, None]
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[0] or a.shape[0] == 0:
        raise ValueError(
            f"win rate needs [prompts, samples] arrays over the same prompts, got shapes "
            f"{np.shape(scores_a)} and {np.shape(scores_b)}"
        )
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("win rate: non-finite rewards")
    diff = a[:, :, None] - b[:, None, :]
    return ((diff > 0) + 0.5 * (diff == 0)).mean(axis=(1, 2))


def win_rate(scores_a: np.ndarray, scores_b: np.ndarray, z: float = 1.96) -> dict[str, float]:
    """Win rate of a over b with a prompt-clustered normal confidence interval (default 95 %).

    Returns `win_rate`, `ci_low`, `ci_high`, `sem`, `prompts`, `tie_rate`."""
    w = per_prompt_win_rates(scores_a, scores_b)
    a = np.asarray(scores_a, np.float64).reshape(len(w), -1)
    b = np.asarray(scores_b, np.float64).reshape(len(w), -1)
    ties = float((a[:, :, None] == b[:, None, :]).mean())
    mean = float(w.mean())
    sem = float(w.std(ddof=1) / math.sqrt(len(w))) if len(w) > 1 else float("nan")
    return {
        "win_rate": mean,
        "ci_low": max(0.0, mean - z * sem),
        "ci_high": min(1.0, mean + z * sem),
        "sem": sem,
        "prompts": len(w),
        "tie_rate": ties,
    }
