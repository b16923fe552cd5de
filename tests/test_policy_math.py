"""Policy maths: RLOO, KL estimators, the REINFORCE surrogate, entropy, the best-of-n estimator
(against brute-force enumeration), teacher-forced statistics, the Python reward inside jit, and
clean errors for bad settings."""

import dataclasses
import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TINY

from warm_jax import sharding as shd
from warm_jax.data import oracle_task
from warm_jax.data.tokenizer import train_tokenizer
from warm_jax.errors import UserError
from warm_jax.models import transformer as tm
from warm_jax.policy import best_of_n as bon
from warm_jax.policy import objectives as obj
from warm_jax.policy import reinforce as rf
from warm_jax.policy import rewards, sampling
from warm_jax.policy import warp as wp

TINY1 = dataclasses.replace(TINY, n_layers=1)


def test_rloo_advantages_hand_example():
    r = jnp.array([[1.0, 2.0, 3.0], [0.0, 0.0, 6.0]])
    # Each sample minus the mean of the other two.
    np.testing.assert_allclose(
        obj.rloo_advantages(r), [[1 - 2.5, 2 - 2, 3 - 1.5], [0 - 3, 0 - 3, 6 - 0]]
    )
    # Equal to k/(k-1) (r - mean), and zero-mean per prompt.
    np.testing.assert_allclose(obj.rloo_advantages(r), 1.5 * (r - r.mean(1, keepdims=True)))
    with pytest.raises(ValueError, match="at least 2"):
        obj.rloo_advantages(jnp.ones((3, 1)))


def test_kl_estimators_zero_at_identity_and_by_hand():
    logp = jnp.log(jnp.array([[0.5, 0.2, 0.9]]))
    ref = jnp.log(jnp.array([[0.25, 0.4, 0.1]]))
    mask = jnp.array([[True, True, False]])
    for est in obj.KL_ESTIMATORS:
        np.testing.assert_array_equal(obj.kl_per_token(logp, logp, mask, est), 0.0)
    # k1 = log(π/π_ref): log 2, log 0.5, masked.
    np.testing.assert_allclose(
        obj.kl_per_token(logp, ref, mask), [[math.log(2), math.log(0.5), 0.0]], rtol=1e-6
    )
    # k3 = ρ - 1 - log ρ with ρ = π_ref/π: ρ = 0.5 and 2.
    k3 = [[0.5 - 1 + math.log(2), 2 - 1 - math.log(2), 0.0]]
    np.testing.assert_allclose(obj.kl_per_token(logp, ref, mask, "k3"), k3, rtol=1e-6)
    np.testing.assert_allclose(obj.sequence_kl(logp, ref, mask), [0.0], atol=1e-6)
    np.testing.assert_allclose(obj.kl_regularised_reward(jnp.array([1.0]), 2.0, 0.1), [0.8])


def test_kl_estimate_is_unbiased_for_the_true_kl():
    """Mean of k1 and k3 over samples from π approaches KL(π ‖ π_ref) of two categoricals."""
    p = np.array([0.6, 0.3, 0.1])
    q = np.array([0.2, 0.5, 0.3])
    true_kl = float(np.sum(p * np.log(p / q)))
    y = jax.random.choice(jax.random.PRNGKey(0), 3, (100_000,), p=jnp.asarray(p))
    logp, logq = jnp.log(p)[y][:, None], jnp.log(q)[y][:, None]
    for est in obj.KL_ESTIMATORS:
        assert float(obj.sequence_kl(logp, logq, estimator=est).mean()) == pytest.approx(
            true_kl, abs=8e-3
        )


def test_reinforce_loss_gradient_is_advantage_weighted_score():
    theta = jnp.array([0.3, -0.2])

    def logp_fn(t):  # [B=2, L=2]: log-probs depending linearly on theta
        return jnp.stack([t, 2 * t])

    mask = jnp.array([[True, False], [True, True]])
    adv = jnp.array([1.5, -0.5])
    g = jax.grad(lambda t: obj.reinforce_loss(logp_fn(t), mask, adv))(theta)
    # -1/B Σ_b A_b ∇ Σ_t log π: row 0 keeps t0 only (d/dθ0 = 1), row 1 sums 2θ0 + 2θ1.
    np.testing.assert_allclose(g, -np.array([1.5 * 1 + -0.5 * 2, -0.5 * 2]) / 2)


def test_entropy_of_uniform_and_one_hot():
    np.testing.assert_allclose(obj.token_entropy(jnp.zeros((2, 8))), np.log(8), rtol=1e-6)
    assert float(obj.token_entropy(jnp.array([0.0, -1e9, -1e9]))) == pytest.approx(0, abs=1e-6)


# ----------------------------------------------------------------------------- best-of-n


def _brute_force_bon(proxy: np.ndarray, control: np.ndarray, n: int) -> float:
    """Mean over all n-subsets of the control reward of the proxy's best in the subset (ties:
    the mean control of the tied best)."""
    vals = []
    for subset in itertools.combinations(range(len(proxy)), n):
        best = max(proxy[i] for i in subset)
        vals.append(np.mean([control[i] for i in subset if proxy[i] == best]))
    return float(np.mean(vals))


@pytest.mark.parametrize("ties", [False, True])
def test_best_of_n_estimator_equals_enumeration(ties):
    rng = np.random.default_rng(0)
    for _ in range(5):
        n_draws = 7
        proxy = rng.integers(0, 3, n_draws).astype(float) if ties else rng.normal(size=n_draws)
        control = rng.normal(size=n_draws)
        for n in range(1, n_draws + 1):
            est = bon.best_of_n_expectation(proxy[None], control[None], n)[0]
            assert est == pytest.approx(_brute_force_bon(proxy, control, n), abs=1e-12)
    w = bon.best_of_n_weights(10, 3)
    assert w.sum() == pytest.approx(1.0) and np.all(w[:2] == 0)
    proxy, control = rng.normal(size=(4, 6)), rng.normal(size=(4, 6))
    # n = 1: the plain mean; n = N: the control of the proxy's argmax.
    np.testing.assert_allclose(bon.best_of_n_expectation(proxy, control, 1), control.mean(1))
    best = control[np.arange(4), proxy.argmax(1)]
    np.testing.assert_allclose(bon.best_of_n_expectation(proxy, control, 6), best)


def test_best_of_n_kl_and_curves():
    np.testing.assert_allclose(bon.bon_kl([1, 2, 4]), [0, math.log(2) - 0.5, math.log(4) - 0.75])
    assert bon.powers_of_two(16) == [1, 2, 4, 8, 16]
    assert bon.powers_of_two(12) == [1, 2, 4, 8, 12]
    rng = np.random.default_rng(1)
    control = rng.normal(size=(50, 8))
    res = bon.bon_curves({"oracle": control, "noise": rng.normal(size=(50, 8))}, control, [1, 8])
    # Selecting by the control itself can only help; the n = 1 point is the same for every proxy.
    assert res["curves"]["oracle"]["control"][1] > res["curves"]["oracle"]["control"][0] + 0.5
    assert res["curves"]["oracle"]["control"][0] == pytest.approx(
        res["curves"]["noise"]["control"][0]
    )


# ----------------------------------------------------------------------------- teacher forcing


def test_token_logprobs_match_sequence_logprobs_and_entropy():
    params = tm.init_params(TINY1, jax.random.PRNGKey(0))
    prompt = sampling.left_pad([[1, 5, 9], [1, 7]], bucket=4)
    cfg = sampling.SamplingConfig(max_new_tokens=5, temperature=0.9)

    @jax.jit
    def stats(p):
        seq = sampling.sample(p, TINY1, prompt, 0, cfg).sequences()
        logp, ent = rf.token_logprobs(p, TINY1, seq, 0.9, True)
        ref = sampling.sequence_logprobs(p, TINY1, **seq, temperature=0.9)
        logits = tm.apply(
            p, TINY1, seq["tokens"], positions=seq["positions"], segment_ids=seq["segment_ids"]
        )
        z = logits[:, :-1] / 0.9
        want = -(jax.nn.softmax(z, -1) * jax.nn.log_softmax(z, -1)).sum(-1)
        return logp, ref, ent, want, seq["loss_mask"]

    logp, ref, ent, want, mask = map(np.asarray, stats(params))
    np.testing.assert_allclose(logp, ref, atol=1e-6)
    np.testing.assert_allclose(ent[:, 1:][mask[:, 1:]], want[mask[:, 1:]], rtol=1e-5)
    assert mask.sum() == 10 and np.all(ent[~mask] == 0)


def test_scoring_from_the_prompt_length_projects_fewer_slots_and_gives_the_same_numbers():
    params = tm.init_params(TINY1, jax.random.PRNGKey(0))
    prompt = sampling.left_pad([[1, 5, 9], [1, 7]], bucket=4)
    plen = prompt["tokens"].shape[1]
    seq = sampling.sample(
        params, TINY1, prompt, 0, sampling.SamplingConfig(max_new_tokens=5, temperature=0.9)
    ).sequences()

    @functools.partial(jax.jit, static_argnums=0)
    def both(first, p):
        logp, ent = rf.token_logprobs(p, TINY1, seq, 0.9, True, first=first)
        ref = sampling.sequence_logprobs(p, TINY1, **seq, temperature=0.9, first=first)
        grad = jax.grad(lambda q: rf.token_logprobs(q, TINY1, seq, 0.9, first=first)[0].sum())
        return logp, ent, ref, grad(p)

    full, cut = both(1, params), both(plen, params)
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(cut)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert np.all(np.asarray(cut[0])[:, :plen] == 0) and np.asarray(cut[0]).min() < -1.0
    logits = sampling.teacher_forced_logits(
        params, TINY1, seq["tokens"], seq["segment_ids"], seq["positions"], 0.9, first=plen
    )
    assert logits.shape == (2, 5, TINY1.vocab_size)  # the response's slots only
    with pytest.raises(ValueError, match="first=9"):
        sampling.sequence_logprobs(params, TINY1, **seq, first=9)


# ----------------------------------------------------------------------------- rewards


@pytest.fixture(scope="module")
def word_tokenizer():
    return train_tokenizer(oracle_task.sample_corpus(300, 0), 192, kind="word")


def test_gold_reward_inside_jit_on_a_sharded_batch(word_tokenizer):
    tok = word_tokenizer
    prompts = oracle_task.sample_prompts(8, 3)
    responses = ["the pasta was good .", "it was very very good .", "", "i loved it ."] * 2
    arrays = rf.encode_prompts(tok, prompts)
    plen = arrays["tokens"].shape[1]
    resp = sampling.left_pad([[*tok.encode(r), tok.eos_id] for r in responses], length=8)
    # Right-pad the responses as the sampler writes them.
    lens = resp["segment_ids"].sum(1)
    r_tokens = np.zeros_like(resp["tokens"])
    for i, n in enumerate(lens):
        r_tokens[i, :n] = resp["tokens"][i, -n:]
    samples = sampling.Samples(
        tokens=jnp.asarray(r_tokens),
        logprobs=jnp.zeros(r_tokens.shape),
        lengths=jnp.asarray(lens),
        finished=jnp.ones(8, bool),
        prompt={k: jnp.asarray(v) for k, v in arrays.items()},
    )
    seq = samples.sequences()
    mesh = shd.make_mesh((("data", -1),))
    seq = jax.device_put(seq, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
    gold = rewards.gold_reward(tok)
    got = jax.jit(lambda s: gold.fn(None, s, plen))(seq)
    want = oracle_task.gold_rewards(prompts, responses)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    host = [np.asarray(seq[k]) for k in ("tokens", "segment_ids", "loss_mask")]
    texts = rewards.decode_batch(tok, *host, plen)
    assert texts == (prompts, responses)


def test_tokenizer_mismatch_is_a_user_error(word_tokenizer):
    other = train_tokenizer(oracle_task.sample_corpus(300, 1)[:20], 192, kind="word")
    rewards.check_same_tokenizer(word_tokenizer, word_tokenizer, "rm")
    rewards.check_same_tokenizer(word_tokenizer, None, "rm")
    with pytest.raises(UserError, match="tokenizer's vocabulary"):
        rewards.check_same_tokenizer(word_tokenizer, other, "rm")


# ----------------------------------------------------------------------------- bad settings


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"beta": -0.1}, "beta"),
        ({"mu": 0.0}, "mu"),
        ({"mu": 1.5}, "mu"),
        ({"anchor": "ref"}, "anchor"),
        ({"num_samples": 1}, "RLOO"),
        ({"temperature": 0.0}, "temperature"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_bad_rl_settings_are_user_errors(kwargs, match):
    with pytest.raises(UserError, match=match):
        rf.rl_config(**kwargs)


def test_good_rl_settings_pass():
    assert rf.rl_config(mu=1.0, beta=0.0).mu == 1.0
    assert rf.rl_config(num_samples=1, baseline="value").num_samples == 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"eta": 1.5}, "allow_extrapolation"),
        ({"eta": -0.1}, "allow_extrapolation"),
        ({"front_etas": [0.0, 1.2]}, "allow_extrapolation"),
        ({"lam": 2.0}, "lam"),
        ({"num_policies": 0}, "num_policies"),
        ({"granularity": "block"}, "granularity"),
    ],
)
def test_bad_warp_settings_are_user_errors(kwargs, match):
    with pytest.raises(UserError, match=match):
        wp.warp_config(**kwargs)


def test_extrapolation_allowed_explicitly():
    cfg = wp.warp_config(eta=1.5, front_etas=[0.0, 1.2], allow_extrapolation=True)
    assert cfg.eta == 1.5 and cfg.front_etas == (0.0, 1.2)
