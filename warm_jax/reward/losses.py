"""The Bradley–Terry reward-model loss and the forward passes that feed it.

A reward model maps a (prompt, response) sequence to a scalar r, read by the scalar head at the
sequence's last real token (`transformer.apply(..., output="reward")`). Under the Bradley–Terry
model the probability that the chosen response y⁺ beats the rejected one y⁻ is

    P(y⁺ ≻ y⁻ | x) = σ(r(x, y⁺) − r(x, y⁻)),

and the reward model is fitted by maximum likelihood on labelled pairs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from warm_jax.models import transformer as tm

Array = jax.Array
PyTree = Any

SIDES = ("chosen", "rejected")


def bradley_terry_loss(
    r_chosen: Array,
    r_rejected: Array,
    margin: Array | float | None = None,
    center_coef: float | Array = 0.0,
    weights: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
    """Mean Bradley–Terry negative log-likelihood of preference pairs, and its metrics.

    Per pair i, with d_i = r⁺_i − r⁻_i:

        ℓ_i = −log σ(d_i − m_i) + c · (r⁺_i + r⁻_i)²,      L = Σ_i w_i ℓ_i / Σ_i w_i

    - `margin` m_i (Llama-2 style): the chosen reward must exceed the rejected one by m_i;
      None means 0.
    - `center_coef` c: reward centering (Eisenstein et al. 2023), which pins the otherwise free
      offset of r near 0 without changing the preference probabilities.
    - `weights` w_i (e.g. a `valid` mask of padded evaluation batches); None means all ones.

    −log σ(z) is computed as softplus(−z), exact for large |z|. Metrics (weighted means):
    `bt_loss` (the NLL term alone), `accuracy` (d > 0, ties count ½), `reward_mean`,
    `reward_std` (over both sides), `margin_mean` (mean of d).
    """
    r_chosen = jnp.asarray(r_chosen, jnp.float32)
    r_rejected = jnp.asarray(r_rejected, jnp.float32)
    w = jnp.ones_like(r_chosen) if weights is None else jnp.asarray(weights, jnp.float32)
    total = jnp.maximum(w.sum(), 1e-12)

    def mean(x: Array) -> Array:
        return (w * x).sum() / total

    diff = r_chosen - r_rejected
    shifted = diff if margin is None else diff - jnp.asarray(margin, jnp.float32)
    nll = jax.nn.softplus(-shifted)
    loss = mean(nll)
    if not (isinstance(center_coef, (int, float)) and center_coef == 0.0):
        loss = loss + jnp.asarray(center_coef, jnp.float32) * mean((r_chosen + r_rejected) ** 2)
    correct = jnp.where(diff > 0, 1.0, jnp.where(diff == 0, 0.5, 0.0))
    reward_mean = mean((r_chosen + r_rejected) / 2)
    second = mean((r_chosen**2 + r_rejected**2) / 2)
    metrics = {
        "bt_loss": mean(nll),
        "accuracy": mean(correct),
        "reward_mean": reward_mean,
        "reward_std": jnp.sqrt(jnp.maximum(second - reward_mean**2, 0.0)),
        "margin_mean": mean(diff),
    }
    return loss, metrics


def rewards(
    params: PyTree,
    config: tm.TransformerConfig,
    tokens: Array,
    segment_ids: Array,
    positions: Array | None = None,
    *,
    dropout_rate: float | Array = 0.0,
    rng: Array | None = None,
) -> Array:
    """r(x, y) for each row [B]: the scalar head at each row's last real token."""
    return tm.apply(
        params,
        config,
        tokens,
        positions=positions,
        segment_ids=segment_ids,
        output="reward",
        dropout_rate=dropout_rate,
        rng=rng,
    )


def pair_inputs(batch: Mapping[str, Array]) -> tuple[Array, Array, Array]:
    """Chosen rows then rejected rows, stacked into one [2B, L] batch (one forward pass)."""

    def both(field: str) -> Array:
        return jnp.concatenate([batch[f"chosen_{field}"], batch[f"rejected_{field}"]], axis=0)

    return both("tokens"), both("segment_ids"), both("positions")


def pair_rewards(
    params: PyTree,
    config: tm.TransformerConfig,
    batch: Mapping[str, Array],
    *,
    dropout_rate: float | Array = 0.0,
    rng: Array | None = None,
) -> tuple[Array, Array]:
    """(r⁺, r⁻), each [B], of a pair batch with `{chosen,rejected}_{tokens,segment_ids,positions}`."""
    tokens, segment_ids, positions = pair_inputs(batch)
    r = rewards(params, config, tokens, segment_ids, positions, dropout_rate=dropout_rate, rng=rng)
    b = batch["chosen_tokens"].shape[0]
    return r[:b], r[b:]


def member_rewards(
    members: Sequence[PyTree],
    config: tm.TransformerConfig,
    tokens: Array,
    segment_ids: Array,
    positions: Array | None = None,
) -> Array:
    """Rewards of each member [M, B] (M forward passes)."""
    return jnp.stack([rewards(p, config, tokens, segment_ids, positions) for p in members])


def ensemble_rewards(
    members: Sequence[PyTree],
    config: tm.TransformerConfig,
    tokens: Array,
    segment_ids: Array,
    positions: Array | None = None,
    weights: Sequence[float] | None = None,
) -> Array:
    """ENS, the prediction ensemble: r_ENS(x, y) = Σ_m w_m r_m(x, y) / Σ_m w_m (uniform by
    default), [B]. Unlike WARM it costs M forward passes."""
    if not members:
        raise ValueError("ensemble_rewards: no members")
    r = member_rewards(members, config, tokens, segment_ids, positions)
    if weights is None:
        return r.mean(axis=0)
    w = jnp.asarray(weights, jnp.float32)
    return (w[:, None] * r).sum(axis=0) / w.sum()


def stop_bias_gradient(params: PyTree) -> PyTree:
    """`params` with the reward head's bias behind `stop_gradient` (its gradient exactly 0)."""
    inner = dict(params["params"])
    head = dict(inner["reward_head"])
    head["bias"] = jax.lax.stop_gradient(head["bias"])
    inner["reward_head"] = head
    return {**params, "params": inner}


def bt_loss_fn(
    config: tm.TransformerConfig,
    *,
    margin_key: str | None = None,
    center_coef: float = 0.0,
):
    """A `loop.LossFn` for one reward model: `loss_fn(params, batch, rng, aux)`.

    `aux` carries the member's own settings as traced values, so every member of a sequential
    run reuses one compiled step and the vmapped run can batch them: `aux["dropout_rate"]`
    (float) and `aux["seed"]` (int, folded into the loop's step key so that each member has its
    own dropout stream, identical in sequential and vmapped training). `aux=None` trains without
    dropout. `margin_key` names a batch field [B] used as the BT margin.

    Without reward centering the head's bias gets no gradient (it cancels in r⁺ − r⁻); its
    float-rounding "gradient" (~1e-9) would otherwise be normalised by Adam into steps of the
    size of the learning rate, a random walk of the reward offset. So it is held fixed.
    """

    def loss_fn(params, batch, rng, aux):
        if not center_coef:
            params = stop_bias_gradient(params)
        dropout_rate, member_rng = 0.0, None
        if aux is not None:
            dropout_rate = aux["dropout_rate"]
            member_rng = jax.random.fold_in(rng, aux["seed"])
        r_chosen, r_rejected = pair_rewards(
            params, config, batch, dropout_rate=dropout_rate, rng=member_rng
        )
        return bradley_terry_loss(
            r_chosen,
            r_rejected,
            margin=None if margin_key is None else batch[margin_key],
            center_coef=center_coef,
            weights=batch.get("valid"),
        )

    return loss_fn
