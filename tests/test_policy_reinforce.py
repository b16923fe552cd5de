"""REINFORCE inside the generic training loop (8 emulated devices): a reward that favours one
token raises that token's probability, every step logs its metrics, the EMA anchor equals the
hand-rolled EMA, and one WARP iteration equals liti(init, slerp(init, a, b, 1/2), η)."""

import dataclasses

import chex
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TINY

from warm_jax import merging
from warm_jax import sharding as shd
from warm_jax.errors import UserError
from warm_jax.models import transformer as tm
from warm_jax.policy import reinforce as rf
from warm_jax.policy import sampling
from warm_jax.policy import warp as wp
from warm_jax.policy.rewards import Reward

# One block: half the compilation time of the shared two-block TINY, same maths.
TINY1 = dataclasses.replace(TINY, n_layers=1)
TARGET = 7  # the token the reward favours
MU = 0.25
STEPS = 8
RL = rf.RLConfig(beta=0.01, anchor="ema", mu=MU, num_samples=4, temperature=1.0, max_new_tokens=6)
LOGGED = {
    "reward",
    "kl_sft",
    "kl_anchor",
    "entropy",
    "response_length",
    "grad_norm",
    "loss",
    "logprob_gap",
    "control_reward",
}


def _favour_target(params, seq, prompt_len):
    """Fraction of response tokens equal to TARGET: a JAX reward with no parameters."""
    del params
    mask = seq["loss_mask"][:, prompt_len:]
    hits = jnp.where(mask, seq["tokens"][:, prompt_len:] == TARGET, False)
    return hits.sum(-1) / jnp.maximum(mask.sum(-1), 1)


def _share_of_nines(params, seq, prompt_len):
    """A control reward: the fraction of response tokens equal to 9."""
    del params
    mask = seq["loss_mask"][:, prompt_len:]
    return jnp.where(mask, seq["tokens"][:, prompt_len:] == 9, False).sum(-1) / mask.sum(-1)


REWARD = Reward(_favour_target, None, "favour-7")
CONTROL = Reward(_share_of_nines, None, "nines")


def _prompts(n: int = 32) -> dict:
    return sampling.left_pad([[1, 2 + i % 50, 2 + (7 * i) % 50] for i in range(n)], length=4)


def _bind_optimizer():
    gin.bind_parameter("make_optimizer.learning_rate", 1e-2)
    gin.bind_parameter("make_optimizer.schedule", "constant")


def _train(workdir, init, *, on_step=None, num_steps=STEPS, data_seed=0, rl=RL):
    return rf.train_policy(
        workdir,
        config=TINY1,
        init_params=init,
        sft_params=init,
        reward=REWARD,
        control=CONTROL,
        rl=rl,
        prompts=_prompts(),
        batch_size=8,
        eos_id=None,
        pad_id=0,
        data_seed=data_seed,
        mesh=shd.make_mesh((("data", -1),)),
        progress=False,
        on_step=on_step,
    )


def _target_prob(params) -> float:
    """Mean probability (T = 1) of TARGET as the first response token, over the prompts."""
    p = _prompts()
    seg, pos = p["segment_ids"], p["positions"]
    logits = jax.jit(lambda w: tm.apply(w, TINY1, p["tokens"], positions=pos, segment_ids=seg))(
        params
    )[:, -1]
    return float(jax.nn.softmax(logits, -1)[:, TARGET].mean())


@pytest.fixture(scope="module")
def init_params():
    return tm.init_params(TINY1, jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def run(tmp_path_factory, init_params):
    gin.clear_config()
    _bind_optimizer()
    gin.bind_parameter("train.log_every", 1)
    gin.bind_parameter("train.num_steps", STEPS)
    seen = []
    res = _train(
        tmp_path_factory.mktemp("rl"),
        init_params,
        on_step=lambda step, p: seen.append(jax.device_get(p)),
    )
    gin.clear_config()
    return res, seen


def test_reward_favouring_a_token_raises_its_probability(run, init_params):
    res, _ = run
    before, after = _target_prob(init_params), _target_prob(res.params)
    rewards = [r["reward"] for r in res.history if "reward" in r]
    # Measured: p(7) 0.016 -> ~0.2 and the reward (share of 7s) 0.02 -> ~0.2 in 8 steps.
    assert after > 3 * before, (before, after)
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.05, rewards


def test_every_step_logs_the_rl_metrics(run):
    res, _ = run
    rows = [r for r in res.history if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r in rows:
        assert set(r) >= LOGGED, set(r)
        # The gradient's log-probabilities are the sampler's (on-policy).
        assert r["logprob_gap"] < 1e-4
    assert rows[0]["kl_sft"] == pytest.approx(0.0, abs=1e-6)  # step 1: π = π_sft = π_anchor
    assert rows[-1]["kl_sft"] > rows[-1]["kl_anchor"] > 0  # the anchor trails the policy


def test_ema_anchor_equals_hand_rolled_ema(run, init_params):
    res, seen = run
    assert len(seen) == STEPS
    ema = jax.device_get(init_params)
    for p in seen:
        ema = jax.tree.map(lambda e, x: (1 - MU) * e + MU * x, ema, p)
    chex.assert_trees_all_close(jax.device_get(res.aux["anchor"]), ema, rtol=1e-5, atol=1e-7)
    # The SFT params in aux stay untouched.
    chex.assert_trees_all_equal(jax.device_get(res.aux["sft"]), jax.device_get(init_params))


def test_warp_iteration_is_liti_of_slerp_and_resumes(tmp_path, init_params):
    _bind_optimizer()
    gin.bind_parameter("warp/train.num_steps", 3)
    cfg = wp.WarpConfig(num_iterations=1, num_policies=2, eta=0.3)
    kwargs = dict(
        config=TINY1,
        sft_params=init_params,
        reward=REWARD,
        control=CONTROL,
        rl=RL,
        warp=cfg,
        prompts=_prompts(),
        batch_size=8,
        eos_id=None,
        pad_id=0,
        mesh=shd.make_mesh((("data", -1),)),
        progress=False,
    )
    with gin.config_scope("warp"):
        summary = wp.run_warp(tmp_path, **kwargs)
    from warm_jax.training import checkpoints

    load = checkpoints.load_params
    a, b = load(tmp_path / "iter1/run0"), load(tmp_path / "iter1/run1")
    # Only the prompt order differs, and that is enough to give different policies.
    assert not np.allclose(a["params"]["embed"]["embedding"], b["params"]["embed"]["embedding"])
    init = jax.device_get(init_params)
    want_slerp = merging.slerp(init, a, b, 0.5, granularity="layer")
    want = merging.liti(init, want_slerp, 0.3)
    chex.assert_trees_all_equal(load(tmp_path / "iter1/slerp"), jax.device_get(want_slerp))
    chex.assert_trees_all_equal(load(tmp_path / "iter1/liti"), jax.device_get(want))
    cos = summary["iterations"][0]["task_vector_cosine"]
    assert cos["params/block_0"] is not None and -1 <= cos["params/block_0"] <= 1
    assert cos["params/reward_head"] is None  # unused by the LM: it never moves
    # A rerun finds the iteration complete and trains nothing.
    with gin.config_scope("warp"):
        again = wp.run_warp(tmp_path, **kwargs)
    assert again["iterations"][0]["liti"] == summary["iterations"][0]["liti"]
    # Another η would make other merges: reusing these would be silently wrong.
    changed = {**kwargs, "warp": dataclasses.replace(cfg, eta=0.5, front_etas=(0.0, 1.0))}
    wrong_eta = r"iter1/liti .*warp_config\.eta was 0\.3, is now 0\.5"
    with gin.config_scope("warp"), pytest.raises(UserError, match=wrong_eta):
        wp.run_warp(tmp_path, **changed)
