"""REINFORCE with KL regularisation, one RL step = one jitted step of the generic training loop.

Each step (`make_loss_fn`), for a batch of B left-padded prompts:

1. samples k responses per prompt from the current policy at temperature T, under
   `stop_gradient` (the sampler's prefill + `while_loop` decode, inlined in the step's program);
2. scores them with the reward function, r(x, y) (a reward model, WARM, ENS, or a Python control
   reward through `pure_callback`);
3. recomputes log π_θ(y_t | ·) by teacher forcing, under gradient, and log π_anchor and log π_sft
   (all at temperature T: the distribution that was sampled);
4. forms r_β = r - β Σ_t (log π_θ - log π_anchor) and the baseline: RLOO (the mean r_β of the
   prompt's other k-1 samples) or a learned value head V(x) (the policy's scalar head on frozen
   prompt features, trained by squared error, as in WARM);
5. returns the REINFORCE loss -1/(Bk) Σ A · Σ_t log π_θ(y_t|·) (+ the value loss) and metrics.

The anchor is the SFT policy (frozen: `anchor="sft"`) or, for WARP, an exponential moving
average of the policy, θ_ema ← (1-μ) θ_ema + μ θ after every step (`anchor="ema"`), kept in the
loop's checkpointed `aux` state. Every step logs proxy reward, control reward, KL to SFT, KL to
the anchor, entropy, response length and (from the loop) the gradient norm.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from warm_jax import merging
from warm_jax import sharding as shd
from warm_jax.data.tokenizer import Tokenizer
from warm_jax.errors import UserError
from warm_jax.models import transformer as tm
from warm_jax.policy import objectives as obj
from warm_jax.policy import sampling
from warm_jax.policy.rewards import Reward
from warm_jax.training import loop

PyTree = Any
Array = jax.Array
PROMPT_KEYS = ("tokens", "segment_ids", "positions")
ANCHORS = ("sft", "ema")
BASELINES = ("rloo", "value")


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """Settings of a KL-regularised REINFORCE run (hashable: part of the compiled program).

    Paper defaults (WARP): beta=0.1, anchor='ema', mu=0.01, temperature=0.9, batch 128 prompts,
    Adam lr 1e-6. WARM's RL: anchor='sft', beta=0.003 (clean labels) / 0.01, baseline='value'.
    """

    beta: float = 0.1  # KL coefficient β in r_β = r - β KL(π_θ ‖ π_anchor)
    anchor: str = "ema"  # 'sft' (frozen) or 'ema' (WARP)
    mu: float = 0.01  # EMA rate μ: θ_ema ← (1-μ) θ_ema + μ θ
    num_samples: int = 4  # k responses per prompt
    baseline: str = "rloo"  # 'rloo' or 'value'
    value_coef: float = 0.1  # weight of the value loss (baseline='value')
    kl_estimator: str = "k1"  # per-token KL estimate inside r_β (see objectives)
    temperature: float = 0.9
    max_new_tokens: int = 32
    top_k: int = 0
    top_p: float = 1.0

    def validate(self) -> RLConfig:
        """Raises UserError naming the first bad setting; returns self."""
        if not np.isfinite(self.beta) or self.beta < 0:
            raise UserError(f"rl_config.beta={self.beta} must be >= 0 (the KL coefficient)")
        if self.anchor not in ANCHORS:
            raise UserError(f"rl_config.anchor={self.anchor!r}; choose from {list(ANCHORS)}")
        if not 0.0 < self.mu <= 1.0:
            raise UserError(f"rl_config.mu={self.mu} must be in (0, 1] (the EMA anchor's rate)")
        if self.baseline not in BASELINES:
            raise UserError(f"rl_config.baseline={self.baseline!r}; choose from {list(BASELINES)}")
        if self.baseline == "rloo" and self.num_samples < 2:
            raise UserError(
                f"rl_config.num_samples={self.num_samples}: the RLOO baseline needs >= 2 samples "
                "per prompt (or use baseline='value')"
            )
        if self.num_samples < 1:
            raise UserError(f"rl_config.num_samples={self.num_samples} must be >= 1")
        if self.value_coef < 0:
            raise UserError(f"rl_config.value_coef={self.value_coef} must be >= 0")
        if self.kl_estimator not in obj.KL_ESTIMATORS:
            raise UserError(
                f"rl_config.kl_estimator={self.kl_estimator!r}; choose from {obj.KL_ESTIMATORS}"
            )
        if not self.temperature > 0:
            raise UserError(
                f"rl_config.temperature={self.temperature} must be > 0: REINFORCE samples"
            )
        if self.max_new_tokens < 1:
            raise UserError(f"rl_config.max_new_tokens={self.max_new_tokens} must be >= 1")
        return self

    def sampling_config(self, eos_id: int | None, pad_id: int) -> sampling.SamplingConfig:
        return sampling.SamplingConfig(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            eos_id=eos_id,
            pad_id=pad_id,
        )


@gin.configurable
def rl_config(**overrides: Any) -> RLConfig:
    """The RL settings, configured in gin as `rl_config.NAME = VALUE` (validated)."""
    try:
        cfg = RLConfig(**overrides)
    except TypeError as e:
        raise UserError(f"rl_config: {e}") from None
    return cfg.validate()


# ----------------------------------------------------------------------------- prompts


def encode_prompts(
    tokenizer: Tokenizer, prompts: Sequence[str], length: int | None = None
) -> dict[str, np.ndarray]:
    """`[bos] + prompt` token rows, left-padded to `length` (default: the 16-bucket of the
    longest), as `left_pad` arrays [n, P]: the layout the SFT model was trained on."""
    rows = [[tokenizer.bos_id, *tokenizer.encode(p)] for p in prompts]
    return sampling.left_pad(rows, pad_id=tokenizer.pad_id, length=length)


def prompt_length(tokenizer: Tokenizer, *prompt_sets: Sequence[str]) -> int:
    """One padded prompt length for all sets (one compiled program serves them all)."""
    longest = max(len(tokenizer.encode(p)) + 1 for ps in prompt_sets for p in ps)
    return sampling.bucket_length(longest)


# ----------------------------------------------------------------------------- the step


def token_logprobs(
    params: PyTree,
    config: tm.TransformerConfig,
    seq: Mapping[str, Array],
    temperature: float,
    with_entropy: bool = False,
    first: int = 1,
) -> tuple[Array, Array | None]:
    """`sampling.sequence_logprobs` (same numbers) and, from the same forward pass, the entropy
    H(π_T(·|y_<t)) of every scored position [B, L] (0 where `loss_mask` is False or before
    `first`)."""
    tokens = seq["tokens"]
    logits = sampling.teacher_forced_logits(
        params, config, tokens, seq["segment_ids"], seq["positions"], temperature, first
    )
    mask = seq["loss_mask"]
    logp = sampling.scored_logprobs(logits, tokens, mask, first)
    if not with_entropy:
        return logp, None
    ent = obj.token_entropy(jax.lax.stop_gradient(logits))
    return logp, jnp.where(mask, jnp.pad(ent, ((0, 0), (first, 0))), 0.0)


def prompt_values(params: PyTree, config: tm.TransformerConfig, prompt: Mapping[str, Array]):
    """The value baseline V(x) = w·h(x) + b: the policy's scalar head on the (stop-gradient)
    final hidden state of the prompt's last token, so the value loss trains the head alone and
    never pulls the language model's features."""
    hidden = tm.apply(
        params,
        config,
        prompt["tokens"],
        positions=prompt["positions"],
        segment_ids=prompt["segment_ids"],
        output="hidden",
    )
    last = jax.lax.stop_gradient(hidden[:, -1].astype(jnp.float32))  # left-padded: last slot
    head = params["params"]["reward_head"]
    return last @ head["kernel"][:, 0].astype(jnp.float32) + head["bias"][0].astype(jnp.float32)


def rollout_stats(
    params: PyTree,
    config: tm.TransformerConfig,
    sft_params: PyTree,
    seq: Mapping[str, Array],
    temperature: float,
    first: int = 1,
) -> dict[str, Array]:
    """Per-sequence KL to SFT (k1) and mean token entropy of responses, without gradient
    (`first`: the prompt length, before which nothing is scored)."""
    logp, ent = token_logprobs(params, config, seq, temperature, with_entropy=True, first=first)
    logp_sft = sampling.sequence_logprobs(
        sft_params, config, **seq, temperature=temperature, first=first
    )
    mask = seq["loss_mask"]
    n = jnp.maximum(mask.sum(-1), 1)
    return {"kl_sft": obj.sequence_kl(logp, logp_sft, mask), "entropy": ent.sum(-1) / n}


def make_loss_fn(
    config: tm.TransformerConfig,
    rl: RLConfig,
    reward: Reward,
    control: Reward | None,
    eos_id: int | None,
    pad_id: int,
) -> loop.LossFn:
    """The loop's `loss_fn(params, prompt_batch, rng, aux)` for one REINFORCE step.

    `aux` holds `anchor` (π_anchor's params), `sft` (π_sft's, for logging KL to SFT), and the
    reward's and control reward's params under `reward` / `control` when they have any."""
    scfg = rl.sampling_config(eos_id, pad_id)
    temp = scfg.logprob_temperature
    k = rl.num_samples

    def loss_fn(params, batch, rng, aux):
        prompt = {key: jnp.repeat(batch[key], k, axis=0) for key in PROMPT_KEYS}
        plen = prompt["tokens"].shape[1]
        samples = sampling.sample(jax.lax.stop_gradient(params), config, prompt, rng, scfg)
        seq = samples.sequences()
        mask = seq["loss_mask"]

        # Only response tokens are scored: the passes project no prompt slot onto the vocabulary.
        logp, ent = token_logprobs(params, config, seq, temp, with_entropy=True, first=plen)
        logp_const = jax.lax.stop_gradient(logp)
        logp_anchor = sampling.sequence_logprobs(
            aux["anchor"], config, **seq, temperature=temp, first=plen
        )
        kl_anchor = obj.sequence_kl(logp_const, logp_anchor, mask, rl.kl_estimator)
        kl_anchor_k1 = obj.sequence_kl(logp_const, logp_anchor, mask)
        if rl.anchor == "sft":
            kl_sft = kl_anchor_k1
        else:
            logp_sft = sampling.sequence_logprobs(
                aux["sft"], config, **seq, temperature=temp, first=plen
            )
            kl_sft = obj.sequence_kl(logp_const, logp_sft, mask)

        r = jax.lax.stop_gradient(reward.fn(aux.get("reward"), seq, plen))
        r_beta = obj.kl_regularised_reward(r, kl_anchor, rl.beta)
        metrics = {}
        if rl.baseline == "rloo":
            adv = obj.rloo_advantages(r_beta.reshape(-1, k)).reshape(-1)
            loss = obj.reinforce_loss(logp, mask, adv)
        else:
            values = jnp.repeat(prompt_values(params, config, batch), k, axis=0)
            adv = r_beta - jax.lax.stop_gradient(values)
            v_loss = obj.value_loss(values, r_beta)
            loss = obj.reinforce_loss(logp, mask, adv) + rl.value_coef * v_loss
            metrics["value_loss"] = v_loss

        n_tokens = jnp.maximum(mask.sum(), 1)
        # Teacher forcing must reproduce the sampler's numbers; a gap means off-policy maths.
        gap = jnp.where(mask[:, plen:], logp_const[:, plen:] - samples.logprobs, 0.0)
        metrics.update(
            reward=r.mean(),
            reward_std=r.std(),
            kl_regularised_reward=r_beta.mean(),
            kl_sft=kl_sft.mean(),
            kl_anchor=kl_anchor_k1.mean(),
            entropy=ent.sum() / n_tokens,
            response_length=samples.lengths.mean(),
            finished=samples.finished.mean(),
            advantage_std=adv.std(),
            logprob_gap=jnp.max(jnp.abs(gap)),
        )
        if control is not None:
            c = jax.lax.stop_gradient(control.fn(aux.get("control"), seq, plen))
            metrics["control_reward"] = c.mean()
        return loss, metrics

    return loss_fn


def ema_aux_update(mu: float) -> Callable[[PyTree, PyTree], PyTree]:
    """`aux_update` for the loop: the EMA anchor θ_ema ← (1-μ) θ_ema + μ θ after every step."""

    def update(aux: PyTree, params: PyTree) -> PyTree:
        return {**aux, "anchor": merging.ema_update(aux["anchor"], params, mu)}

    return update


# ----------------------------------------------------------------------------- evaluation


class Evaluator:
    """Reward, control reward and KL to SFT of a policy on fixed prompts, by Monte Carlo.

    `num_samples` responses per prompt at the RL temperature, with a fixed seed: every policy
    evaluated (checkpoints, merges, the LITI η grid) sees the same random numbers, so
    differences between them are not sampling noise. One jitted program, weights as arguments.
    Each metric comes with its standard error over responses (`NAME_sem`).
    """

    def __init__(
        self,
        config: tm.TransformerConfig,
        rl: RLConfig,
        reward: Reward,
        control: Reward | None,
        prompts: Mapping[str, np.ndarray],
        *,
        eos_id: int | None,
        pad_id: int,
        num_samples: int = 2,
        batch_size: int = 64,
        seed: int = 0,
    ):
        self.reward, self.control = reward, control
        reps = {k: np.repeat(np.asarray(prompts[k]), num_samples, axis=0) for k in PROMPT_KEYS}
        n = len(reps["tokens"])
        bs = min(batch_size, n)
        pad = -n % bs
        self.n = n
        self.batches = [
            {k: np.concatenate([v, v[:pad]])[i : i + bs] for k, v in reps.items()}
            for i in range(0, n + pad, bs)
        ]
        self.seed = seed
        scfg = rl.sampling_config(eos_id, pad_id)
        temp = scfg.logprob_temperature

        # Python rewards are scored on the host after the program (see `Reward.host_fn`).
        named = [(k, r) for k, r in (("reward", reward), ("control_reward", control))]
        named = [(k, r) for k, r in named if r is not None]
        self._host = [(k, r) for k, r in named if r.host_fn is not None]
        in_jit = [(k, r) for k, r in named if r.host_fn is None]

        def batch_stats(params, sft_params, reward_params, prompt, rng):
            s = sampling.sample(params, config, prompt, rng, scfg)
            seq = s.sequences()
            plen = prompt["tokens"].shape[1]
            out = rollout_stats(params, config, sft_params, seq, temp, first=plen)
            for key, r in in_jit:
                out[key] = r.fn(reward_params[key], seq, plen)
            out["response_length"] = s.lengths.astype(jnp.float32)
            if self._host:
                out["_seq"] = {k: seq[k] for k in ("tokens", "segment_ids", "loss_mask")}
            return out

        self._stats = jax.jit(batch_stats)
        self._reward_params = {k: r.params for k, r in in_jit}

    def __call__(self, params: PyTree, sft_params: PyTree) -> dict[str, float]:
        rows: dict[str, list[np.ndarray]] = {}
        for i, b in enumerate(self.batches):
            rng = jax.random.fold_in(jax.random.PRNGKey(self.seed), i)
            out = jax.device_get(self._stats(params, sft_params, self._reward_params, b, rng))
            seq = out.pop("_seq", None)
            for key, r in self._host:
                out[key] = r.score_on_host(seq, b["tokens"].shape[1])
            for k, v in out.items():
                rows.setdefault(k, []).append(np.asarray(v))
        res = {}
        for k, v in rows.items():
            x = np.concatenate(v)[: self.n]
            res[k] = float(x.mean())
            res[f"{k}_sem"] = float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else 0.0
        return res


# ----------------------------------------------------------------------------- a run


def train_policy(
    workdir: str | os.PathLike,
    *,
    config: tm.TransformerConfig,
    init_params: PyTree,
    sft_params: PyTree,
    reward: Reward,
    rl: RLConfig,
    prompts: Mapping[str, np.ndarray],
    batch_size: int,
    eos_id: int | None,
    pad_id: int,
    control: Reward | None = None,
    anchor_params: PyTree | None = None,
    evaluator: Evaluator | None = None,
    data_seed: int = 0,
    mesh: Mesh | None = None,
    meta: Mapping | None = None,
    progress: bool = True,
    on_step: Callable[[int, PyTree], None] | None = None,
    description: str = "rl",
) -> loop.TrainResult:
    """KL-regularised REINFORCE from `init_params` for `train.num_steps` steps (gin), resumable.

    `prompts`: left-padded prompt arrays [n, P] (`encode_prompts`), served in a seeded order
    (`data_seed`: WARP's runs differ only in it), `batch_size` prompts × k samples per step.
    The anchor starts at `anchor_params` (default `init_params`); with `rl.anchor='sft'` it is
    `sft_params`, frozen. An `evaluator` adds held-out `eval/…` metrics every
    `train.eval_every` steps and at the end. The caller checks tokenizers
    (`check_same_tokenizer`) before calling.
    """
    rl.validate()
    n, plen = np.shape(prompts["tokens"])
    if batch_size < 1 or n < batch_size:
        raise UserError(f"{n} prompts cannot fill a batch of batch_size={batch_size}")
    if plen + rl.max_new_tokens > config.max_len:
        raise UserError(
            f"prompts of {plen} tokens + {rl.max_new_tokens} new tokens exceed the model's "
            f"max_len={config.max_len}"
        )
    pi, pc = jax.process_index(), jax.process_count()
    if batch_size % pc:
        raise UserError(f"batch_size={batch_size} is not divisible by {pc} processes")
    # Each process feeds its own slice of every global batch (the loop assembles them).
    batches = loop.ArrayBatches(
        {k: np.asarray(prompts[k])[pi::pc] for k in PROMPT_KEYS}, batch_size // pc, seed=data_seed
    )

    if rl.anchor == "sft":
        anchor = sft_params
    else:
        anchor = init_params if anchor_params is None else anchor_params
    aux = {"anchor": anchor, "sft": sft_params}
    if reward.params is not None:
        aux["reward"] = reward.params
    if control is not None and control.params is not None:
        aux["control"] = control.params

    eval_fn = None
    if evaluator is not None:

        def eval_fn(params):
            return evaluator(params, sft_params)

    return loop.train(
        make_loss_fn(config, rl, reward, control, eos_id, pad_id),
        batches,
        workdir=Path(workdir),
        param_axes=tm.param_logical_axes(config),
        init_params=init_params,  # the loop copies before donating; aux shares these arrays
        aux=aux,
        aux_update=ema_aux_update(rl.mu) if rl.anchor == "ema" else None,
        eval_fn=eval_fn,
        meta={
            "model": config.to_dict(),
            "rl": dataclasses.asdict(rl),
            "reward": reward.name,
            "control": None if control is None else control.name,
            "data_seed": data_seed,
            **(meta or {}),
        },
        mesh=mesh or shd.make_mesh(),
        progress=progress,
        on_step=on_step,
        description=description,
    )
