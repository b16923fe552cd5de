"""The maths of policy optimisation, as small pure functions (jittable, no orchestration).

Notation: a prompt x, a response y = (y_1..y_n) sampled from the policy π_θ at temperature T,
per-token log-probabilities log π(y_t | x, y_<t) laid out [B, L] with a boolean mask that is True
on response tokens (the layout of `Samples.sequences()` and `sequence_logprobs`).

* KL estimate (per token, "k1"):   k_t = log π_θ(y_t|·) - log π_ref(y_t|·)
  summed over the response it is an unbiased Monte-Carlo estimate of KL(π_θ(·|x) ‖ π_ref(·|x))
  when y ~ π_θ. "k3" (Schulman's) k_t = r - 1 - log r with r = π_ref/π_θ is non-negative per
  token and unbiased for the per-token KL at the sampled prefix.
* KL-regularised reward (WARP):     r_β(x, y) = r(x, y) - β Σ_t k_t        (k_t: k1 to the anchor)
* RLOO advantage, k samples/prompt: A_i = r_i - 1/(k-1) Σ_{j≠i} r_j = k/(k-1) (r_i - mean_j r_j)
* REINFORCE loss:                   L(θ) = -1/B Σ_b A_b Σ_t log π_θ(y_bt | ·)
  whose gradient -E[A ∇ log π_θ(y|x)] is the policy gradient (A is a constant: stop-gradient).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array
KL_ESTIMATORS = ("k1", "k3")


def rloo_advantages(rewards: Array) -> Array:
    """Leave-one-out advantages of k samples per prompt, `rewards` [P, k] -> [P, k]:

        A_i = r_i - (Σ_j r_j - r_i) / (k - 1)

    Each sample's baseline is the mean reward of the *other* samples of its prompt, so the
    baseline is independent of the sample and the policy gradient stays unbiased. Needs k ≥ 2.
    """
    k = rewards.shape[-1]
    if k < 2:
        raise ValueError(f"RLOO needs at least 2 samples per prompt, got k={k}")
    total = jnp.sum(rewards, axis=-1, keepdims=True)
    return rewards - (total - rewards) / (k - 1)


def kl_per_token(
    logp: Array, logp_ref: Array, mask: Array | None = None, estimator: str = "k1"
) -> Array:
    """Per-token KL estimates [B, L] of π ‖ π_ref at tokens sampled from π (0 where masked out).

    k1: log π - log π_ref (the log-ratio; may be negative per token).
    k3: ρ - 1 - log ρ with ρ = π_ref / π (≥ 0; same expectation under π).
    """
    log_ratio = logp - logp_ref
    if estimator == "k1":
        kl = log_ratio
    elif estimator == "k3":
        kl = jnp.expm1(-log_ratio) + log_ratio
    else:
        raise ValueError(f"KL estimator {estimator!r}; choose from {KL_ESTIMATORS}")
    return kl if mask is None else jnp.where(mask, kl, 0.0)


def sequence_kl(
    logp: Array, logp_ref: Array, mask: Array | None = None, estimator: str = "k1"
) -> Array:
    """KL(π(·|x) ‖ π_ref(·|x)) estimated from one sampled response per row: Σ_t k_t, [B]."""
    return jnp.sum(kl_per_token(logp, logp_ref, mask, estimator), axis=-1)


def kl_regularised_reward(reward: Array, kl: Array, beta: float | Array) -> Array:
    """WARP's r_β(x, y) = r(x, y) - β · KL-estimate(π_θ ‖ π_anchor), per sequence."""
    return reward - beta * kl


def reinforce_loss(logp: Array, mask: Array, advantages: Array) -> Array:
    """REINFORCE surrogate L = -1/B Σ_b A_b Σ_t mask_bt log π_θ(y_bt | ·).

    `logp` [B, L] carries the gradient; `advantages` [B] are treated as constants."""
    seq_logp = jnp.sum(jnp.where(mask, logp, 0.0), axis=-1)
    return -jnp.mean(jax.lax.stop_gradient(advantages) * seq_logp)


def value_loss(values: Array, returns: Array) -> Array:
    """Squared error of a learned baseline, 1/2 · mean_b (V(x_b) - R_b)^2 (R constant)."""
    return 0.5 * jnp.mean(jnp.square(values - jax.lax.stop_gradient(returns)))


def token_entropy(logits: Array) -> Array:
    """Entropy of softmax(logits) along the last axis: H = logsumexp(z) - Σ_v p_v z_v."""
    logits = logits.astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    probs = jnp.exp(logits - logz[..., None])
    return logz - jnp.sum(probs * logits, axis=-1)


def masked_mean(x: Array, mask: Array) -> Array:
    """Mean of x over entries where mask is True (0 when there are none)."""
    m = mask.astype(jnp.float32)
    return jnp.sum(jnp.where(mask, x, 0.0)) / jnp.maximum(jnp.sum(m), 1.0)
