"""Reward *functions* as the policy layer sees them: JAX functions of token sequences.

A policy never imports the reward-model package: it takes a `Reward`, i.e. a pure function

    fn(params, seq, prompt_len) -> rewards [B] float32

of parameters (carried in the training step's `aux` tree, so they are arguments of the jitted
step, never baked-in constants), a sequence batch `seq` as `Samples.sequences()` builds it
(`tokens`, `segment_ids`, `positions`, `loss_mask` [B, P + N]: a left-padded prompt of
`prompt_len` slots, then the response, padding after it), and the static prompt length.

* a reward model:  r = RM(x, y), the scalar head at the last real token (`model_reward`);
* WARM:            the same with φ_WARM = 1/M Σ_i φ_i (`warm_reward` averages the weights once);
* ENS:             r = 1/M Σ_i RM_i(x, y), M forward passes (`ensemble_reward`);
* a control reward written in Python on decoded text (the oracle's gold reward) enters through
  `jax.pure_callback` (`text_reward`), so it can be logged, or optimised, inside a jitted step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from warm_jax import merging
from warm_jax.data import oracle_task
from warm_jax.data.tokenizer import Tokenizer
from warm_jax.errors import UserError
from warm_jax.models import transformer as tm

PyTree = Any
Array = jax.Array
# fn(params, seq, prompt_len) -> [B] float32
RewardFn = Callable[[PyTree, dict[str, Array], int], Array]
# text_fn(prompts, responses) -> [B] float (numpy)
TextRewardFn = Callable[[Sequence[str], Sequence[str]], np.ndarray]
# host_fn(tokens, segment_ids, loss_mask, prompt_len) -> [B] float32 (numpy arrays in)
HostRewardFn = Callable[[np.ndarray, np.ndarray, np.ndarray, int], np.ndarray]


@dataclasses.dataclass
class Reward:
    """A reward function, its parameters (None for a parameter-free reward), and a name.

    `tokenizer` is the one the reward reads tokens with (None when it reads any token ids,
    e.g. a hand-written test reward); `check_same_tokenizer` compares it with the policy's.
    `host_fn`, for rewards computed in Python, is the same function on numpy arrays: code that
    scores outside a training step (evaluation, best-of-n) calls it directly, so its compiled
    programs hold no host callback (which would keep them out of the compilation cache)."""

    fn: RewardFn
    params: PyTree = None
    name: str = "reward"
    tokenizer: Tokenizer | None = None
    host_fn: HostRewardFn | None = None

    def score_on_host(self, seq: dict[str, np.ndarray], prompt_len: int) -> np.ndarray:
        """`host_fn` on a host copy of a sequence batch."""
        if self.host_fn is None:
            raise ValueError(f"reward {self.name!r} has no host function")
        keys = ("tokens", "segment_ids", "loss_mask")
        return self.host_fn(*(np.asarray(seq[k]) for k in keys), prompt_len)

    def __call__(self, seq: dict[str, Array], prompt_len: int) -> Array:
        return self.fn(self.params, seq, prompt_len)


# ----------------------------------------------------------------------------- reward models


def _rm_apply(params: PyTree, config: tm.TransformerConfig, seq: dict[str, Array]) -> Array:
    return tm.apply(
        params,
        config,
        seq["tokens"],
        positions=seq["positions"],
        segment_ids=seq["segment_ids"],
        output="reward",
    ).astype(jnp.float32)


def model_reward(
    config: tm.TransformerConfig,
    params: PyTree,
    name: str = "rm",
    tokenizer: Tokenizer | None = None,
) -> Reward:
    """One reward model: r(x, y) = the scalar head read at the sequence's last real token."""

    def fn(p: PyTree, seq: dict[str, Array], prompt_len: int) -> Array:
        del prompt_len
        return _rm_apply(p, config, seq)

    return Reward(fn, params, name, tokenizer)


def warm_reward(
    config: tm.TransformerConfig,
    members: Sequence[PyTree],
    name: str = "warm",
    tokenizer: Tokenizer | None = None,
    weights: Sequence[float] | None = None,
) -> Reward:
    """WARM: one reward model with the weight average φ = Σ_i w_i φ_i / Σ_i w_i (uniform)."""
    return model_reward(config, merging.average(list(members), weights), name, tokenizer)


def ensemble_reward(
    config: tm.TransformerConfig,
    members: Sequence[PyTree],
    name: str = "ens",
    tokenizer: Tokenizer | None = None,
) -> Reward:
    """ENS: the prediction average r(x, y) = 1/M Σ_i r_i(x, y) (M forward passes)."""

    def fn(ps: Sequence[PyTree], seq: dict[str, Array], prompt_len: int) -> Array:
        del prompt_len
        return jnp.mean(jnp.stack([_rm_apply(p, config, seq) for p in ps]), axis=0)

    return Reward(fn, list(members), name, tokenizer)


# ----------------------------------------------------------------------------- text rewards


def decode_batch(
    tokenizer: Tokenizer,
    tokens: np.ndarray,
    segment_ids: np.ndarray,
    loss_mask: np.ndarray,
    prompt_len: int,
) -> tuple[list[str], list[str]]:
    """(prompt texts, response texts) of a sequence batch, special tokens removed."""
    special = {tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id}
    prompts, responses = [], []
    for row, seg, mask in zip(tokens, segment_ids, loss_mask):
        p = [int(t) for t, s in zip(row[:prompt_len], seg[:prompt_len]) if s and t not in special]
        r = [int(t) for t, m in zip(row[prompt_len:], mask[prompt_len:]) if m and t not in special]
        prompts.append(tokenizer.decode(p).strip())
        responses.append(tokenizer.decode(r).strip())
    return prompts, responses


def text_reward(tokenizer: Tokenizer, text_fn: TextRewardFn, name: str = "text") -> Reward:
    """A reward computed in Python on decoded text, callable inside `jax.jit`.

    The batch's tokens go to the host through `jax.pure_callback` (once, even when the batch is
    sharded), are decoded with `tokenizer` and scored by `text_fn(prompts, responses)`."""

    def host(tokens, segment_ids, loss_mask, prompt_len) -> np.ndarray:
        arrays = (np.asarray(tokens), np.asarray(segment_ids), np.asarray(loss_mask))
        prompts, responses = decode_batch(tokenizer, *arrays, int(prompt_len))
        return np.asarray(text_fn(prompts, responses), np.float32).reshape(len(prompts))

    def fn(params: PyTree, seq: dict[str, Array], prompt_len: int) -> Array:
        del params
        b = seq["tokens"].shape[0]
        out = jax.ShapeDtypeStruct((b,), jnp.float32)
        return jax.pure_callback(
            lambda t, s, m: host(t, s, m, prompt_len),
            out,
            seq["tokens"],
            seq["segment_ids"],
            seq["loss_mask"],
            vmap_method="sequential",
        )

    return Reward(fn, None, name, tokenizer, host_fn=host)


def gold_reward(tokenizer: Tokenizer) -> Reward:
    """The built-in oracle task's gold reward (`oracle_task.gold_rewards`) on decoded text."""
    return text_reward(tokenizer, oracle_task.gold_rewards, name="gold")


# ----------------------------------------------------------------------------- checks


def tokenizer_fingerprint(tokenizer: Tokenizer) -> tuple:
    """What two tokenizers must share for token ids to mean the same text: the vocabulary
    (token -> id, added tokens included) and the special-token ids."""
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    return (
        tuple(sorted(vocab.items())),
        (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id),
    )


def check_same_tokenizer(policy: Tokenizer, reward: Tokenizer | None, what: str) -> None:
    """UserError unless `reward` (if given) reads token ids exactly as `policy` writes them."""
    if reward is None:
        return
    pv, ps = tokenizer_fingerprint(policy)
    rv, rs = tokenizer_fingerprint(reward)
    if ps != rs:
        raise UserError(
            f"{what}: its tokenizer's special ids (pad, bos, eos) = {rs} differ from the "
            f"policy's {ps}; a reward model must share the policy's tokenizer"
        )
    if pv != rv:
        pd, rd = dict(pv), dict(rv)
        diff = sorted(set(pd.items()) ^ set(rd.items()))[:3]
        raise UserError(
            f"{what}: its tokenizer's vocabulary ({len(rd)} tokens) differs from the policy's "
            f"({len(pd)} tokens), e.g. {diff}; a reward model must share the policy's tokenizer"
        )
