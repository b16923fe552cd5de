"""Linear probing of the scalar reward head on frozen features (WARM, Sec. 3 / App. B).

Every WARM member starts from the same SFT backbone and the *same* head, fitted once on frozen
features: with h(x, y) the final-normed hidden state at the sequence's last real token (exactly
what the reward head reads) and r = wᵀh + b, the probe minimises the logistic Bradley–Terry loss

    L(w) = (1/N) Σ_i log(1 + exp(−wᵀ(h⁺_i − h⁻_i))) + (λ/2) |w|²

over the training pairs. The bias cancels in r⁺ − r⁻; it is set afterwards so that the mean
reward over the training responses is 0 (centered rewards, the same preferences).

A shared, already useful head means the fine-tuned members differ only where their diverse
settings take them, and that fine-tuning does not begin by distorting the features to fit a random
head (Kumar et al. 2022, "LP-FT") — both help the members stay linearly mode connected.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from warm_jax.models import transformer as tm
from warm_jax.reward import losses

PyTree = Any
HEAD = "reward_head"


def head_of(params: PyTree) -> dict:
    """The reward head's parameters `{"kernel": [D, 1], "bias": [1]}`."""
    return params["params"][HEAD]


def with_head(params: PyTree, head: Mapping) -> PyTree:
    """`params` with its reward head replaced (a shallow copy; the backbone is shared)."""
    inner = dict(params["params"])
    old = inner[HEAD]
    inner[HEAD] = {
        k: jnp.asarray(head[k], dtype=old[k].dtype).reshape(old[k].shape)
        for k in ("kernel", "bias")
    }
    return {**params, "params": inner}


def last_token_features(
    params: PyTree,
    config: tm.TransformerConfig,
    tokens: np.ndarray,
    segment_ids: np.ndarray,
    positions: np.ndarray,
    batch_size: int = 64,
) -> np.ndarray:
    """h(x, y) [N, D] float32: the final-normed hidden state at each row's last real token."""

    @jax.jit
    def feats(params, tok, seg, pos):
        h = tm.apply(params, config, tok, positions=pos, segment_ids=seg, output="hidden")
        idx = tm.last_token_index(seg)
        return jnp.take_along_axis(h, idx[:, None, None], axis=1)[:, 0].astype(jnp.float32)

    n = len(tokens)
    pad = -n % batch_size
    arrays = [
        np.concatenate([a, np.zeros((pad, a.shape[1]), a.dtype)])
        for a in (tokens, segment_ids, positions)
    ]
    out = [
        np.asarray(feats(params, *(a[i : i + batch_size] for a in arrays)))
        for i in range(0, n + pad, batch_size)
    ]
    return np.concatenate(out)[:n]


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    head: dict[str, np.ndarray]  # kernel [D, 1], bias [1]
    accuracy: float  # training accuracy of the probe
    loss: float  # final BT loss (without the L2 term)
    initial_accuracy: float  # of the head before probing (0.5 for the zero-initialised head)


def fit_probe(
    chosen_features: np.ndarray,
    rejected_features: np.ndarray,
    *,
    steps: int = 300,
    learning_rate: float = 0.05,
    l2: float = 1e-3,
    initial_kernel: np.ndarray | None = None,
) -> ProbeResult:
    """Fits w by full-batch Adam on the regularised logistic BT loss (module docstring); the
    loss is convex, so a few hundred steps from w = 0 reach its minimum to plotting accuracy."""
    hp = jnp.asarray(chosen_features, jnp.float32)
    hm = jnp.asarray(rejected_features, jnp.float32)
    if hp.shape != hm.shape or hp.ndim != 2 or len(hp) == 0:
        raise ValueError(f"fit_probe: features of shape {hp.shape} and {hm.shape}")
    d = hp.shape[1]
    w0 = jnp.zeros((d,), jnp.float32) if initial_kernel is None else jnp.ravel(initial_kernel)
    diff = hp - hm
    tx = optax.adam(learning_rate)

    def objective(w):
        loss, _ = losses.bradley_terry_loss(diff @ w, jnp.zeros(len(diff)))
        return loss + 0.5 * l2 * jnp.sum(w * w)

    @jax.jit
    def run(w):
        def body(carry, _):
            w, state = carry
            g = jax.grad(objective)(w)
            updates, state = tx.update(g, state, w)
            return (optax.apply_updates(w, updates), state), None

        (w, _), _ = jax.lax.scan(body, (w, tx.init(w)), None, length=steps)
        return w

    w = run(w0)
    _, metrics = losses.bradley_terry_loss(diff @ w, jnp.zeros(len(diff)))
    _, before = losses.bradley_terry_loss(diff @ w0, jnp.zeros(len(diff)))
    # Centre the rewards: b = −mean over all training responses of wᵀh.
    bias = -float(jnp.concatenate([hp @ w, hm @ w]).mean())
    return ProbeResult(
        head={
            "kernel": np.asarray(w, np.float32)[:, None],
            "bias": np.asarray([bias], np.float32),
        },
        accuracy=float(metrics["accuracy"]),
        loss=float(metrics["bt_loss"]),
        initial_accuracy=float(before["accuracy"]),
    )


def linear_probe(
    params: PyTree,
    config: tm.TransformerConfig,
    pairs: Mapping[str, np.ndarray],
    *,
    steps: int = 300,
    learning_rate: float = 0.05,
    l2: float = 1e-3,
    batch_size: int = 64,
) -> ProbeResult:
    """Fits the reward head of `params` on the frozen features of `pairs` (dense pair arrays
    `{chosen,rejected}_{tokens,segment_ids,positions}` [N, L])."""
    feats = {
        side: last_token_features(
            params,
            config,
            pairs[f"{side}_tokens"],
            pairs[f"{side}_segment_ids"],
            pairs[f"{side}_positions"],
            batch_size,
        )
        for side in losses.SIDES
    }
    return fit_probe(
        feats["chosen"], feats["rejected"], steps=steps, learning_rate=learning_rate, l2=l2
    )
