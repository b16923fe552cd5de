"""Next-token loss, the loss of pretraining and (with a response mask) SFT."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from warm_jax.models import transformer as tm


def next_token_nll(
    logits: jax.Array, batch: Mapping[str, jax.Array]
) -> tuple[jax.Array, jax.Array]:
    """Per-token negative log-likelihood −log p(x_{t+1} | x_{≤t}) and its weight mask.

    A target counts when it continues the same non-padding segment as its context, and (if the
    batch has `loss_mask`, e.g. response tokens in SFT) when the mask is set on the target."""
    tokens, seg = batch["tokens"], batch["segment_ids"]
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    targets = tokens[:, 1:]
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    weight = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] != 0)
    if "loss_mask" in batch:
        weight = weight & (batch["loss_mask"][:, 1:] != 0)
    return nll, weight.astype(jnp.float32)


def lm_loss_fn(config: tm.TransformerConfig, dropout_rate: float = 0.0):
    """LossFn for the training loop: mean next-token NLL over counted targets."""

    def loss_fn(params, batch, rng, aux):
        del aux
        logits = tm.apply(
            params,
            config,
            batch["tokens"],
            positions=batch.get("positions"),
            segment_ids=batch["segment_ids"],
            dropout_rate=dropout_rate,
            rng=rng if dropout_rate else None,
        )
        nll, weight = next_token_nll(logits, batch)
        n = jnp.maximum(weight.sum(), 1.0)
        loss = (nll * weight).sum() / n
        return loss, {"perplexity": jnp.exp(loss), "tokens": weight.sum()}

    return loss_fn
