"""Reward-model maths: the Bradley–Terry loss, rewards / ENS, linear probing, WARM averaging and
selection, accuracies split by the corrupted flag, and clean errors for bad input."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TINY

from warm_jax.errors import UserError
from warm_jax.models import transformer as tm
from warm_jax.reward import evaluation as ev
from warm_jax.reward import losses, probe
from warm_jax.reward import warm as warm_lib


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _toy_pairs(n=8, length=10, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for side in ("chosen", "rejected"):
        tok = rng.integers(1, TINY.vocab_size, (n, length)).astype(np.int32)
        seg = np.ones((n, length), np.int32)
        for i, k in enumerate(rng.integers(3, length + 1, n)):
            tok[i, k:], seg[i, k:] = 0, 0
        out[f"{side}_tokens"] = tok
        out[f"{side}_segment_ids"] = seg
        out[f"{side}_positions"] = (np.arange(length, dtype=np.int32) * seg).astype(np.int32)
    return out


def _random_head_params(seed):
    params = tm.init_params(TINY, jax.random.PRNGKey(seed))
    rng = np.random.default_rng(seed)
    return probe.with_head(params, {"kernel": rng.normal(size=(32, 1)), "bias": rng.normal(size=1)})


def test_bradley_terry_loss_matches_hand_computation():
    rc = np.array([1.0, 0.0, -0.5, 2.0], np.float32)
    rr = np.array([0.0, 0.5, -0.5, -1.0], np.float32)
    loss, m = losses.bradley_terry_loss(rc, rr)
    d = rc - rr
    np.testing.assert_allclose(float(loss), np.mean(-np.log(_sigmoid(d))), rtol=1e-6)
    assert float(m["accuracy"]) == pytest.approx((1 + 0 + 0.5 + 1) / 4)  # a tie counts 1/2
    assert float(m["margin_mean"]) == pytest.approx(d.mean())
    both = np.concatenate([rc, rr])
    assert float(m["reward_mean"]) == pytest.approx(both.mean())
    assert float(m["reward_std"]) == pytest.approx(both.std(), rel=1e-5)

    margin, c, w = np.array([0.5, 0, 1, 0], np.float32), 0.1, np.array([1, 1, 0, 1], np.float32)
    loss, m = losses.bradley_terry_loss(rc, rr, margin=margin, center_coef=c, weights=w)
    per = -np.log(_sigmoid(d - margin)) + c * (rc + rr) ** 2
    np.testing.assert_allclose(float(loss), (w * per).sum() / w.sum(), rtol=1e-6)
    np.testing.assert_allclose(
        float(m["bt_loss"]), (w * -np.log(_sigmoid(d - margin))).sum() / w.sum(), rtol=1e-6
    )
    # Large margins stay finite (softplus form).
    loss, _ = losses.bradley_terry_loss(jnp.array([-200.0]), jnp.array([200.0]))
    assert float(loss) == pytest.approx(400.0)


def test_ensemble_is_the_mean_of_member_rewards_and_pair_rewards_match():
    members = [_random_head_params(s) for s in (0, 1, 2)]
    b = _toy_pairs()
    args = (b["chosen_tokens"], b["chosen_segment_ids"], b["chosen_positions"])
    rewards = jax.jit(losses.rewards, static_argnums=1)
    each = [np.asarray(rewards(p, TINY, *args)) for p in members]
    ens = jax.jit(losses.ensemble_rewards, static_argnums=1)(members, TINY, *args)
    np.testing.assert_allclose(np.asarray(ens), np.mean(each, 0), rtol=1e-5, atol=1e-6)
    weighted = jax.jit(lambda m, *a: losses.ensemble_rewards(m, TINY, *a, weights=[1, 0, 3]))(
        members, *args
    )
    np.testing.assert_allclose(np.asarray(weighted), (each[0] + 3 * each[2]) / 4, rtol=1e-5)
    rc, rr = jax.jit(losses.pair_rewards, static_argnums=1)(members[0], TINY, b)
    np.testing.assert_allclose(np.asarray(rc), each[0], rtol=1e-5, atol=1e-6)
    # ENS accuracy is computed from margins: the margin of the mean is the mean of the margins.
    d = [ev.margins(p, TINY, b, batch_size=3) for p in members]
    np.testing.assert_allclose(d[0], np.asarray(rc - rr), rtol=1e-5, atol=1e-6)


def test_loss_fn_holds_the_bias_fixed_and_applies_member_dropout():
    params = _random_head_params(0)
    b = {k: jnp.asarray(v) for k, v in _toy_pairs().items()}
    loss_fn = losses.bt_loss_fn(TINY)
    key = jax.random.PRNGKey(0)
    for fn, moves in ((loss_fn, False), (losses.bt_loss_fn(TINY, center_coef=1.0), True)):
        grads = jax.jit(jax.grad(lambda p, fn=fn: fn(p, b, key, None)[0]))(params)
        assert (float(jnp.abs(grads["params"]["reward_head"]["bias"]).max()) > 0) == moves

    # Dropout: the member seed changes the masks, rate 0 is the deterministic loss.
    def aux(rate, seed):
        return {"dropout_rate": jnp.float32(rate), "seed": jnp.int32(seed)}

    fn = jax.jit(lambda a: loss_fn(params, b, key, a)[0])
    plain = float(jax.jit(lambda: loss_fn(params, b, key, None)[0])())
    assert float(fn(aux(0.0, 1))) == pytest.approx(plain, rel=1e-6)
    l1, l2 = float(fn(aux(0.5, 1))), float(fn(aux(0.5, 2)))
    assert l1 != l2 and l1 != plain


def test_linear_probe_separates_a_separable_toy():
    rng = np.random.default_rng(0)
    w_true = rng.normal(size=16)
    a, b = rng.normal(size=(400, 16)), rng.normal(size=(400, 16))
    better = a @ w_true > b @ w_true
    chosen = np.where(better[:, None], a, b)
    rejected = np.where(better[:, None], b, a)
    result = probe.fit_probe(chosen, rejected, steps=300, learning_rate=0.05, l2=1e-4)
    assert result.initial_accuracy == 0.5
    assert result.accuracy > 0.97
    # Rewards are centred by the bias.
    r = np.concatenate([chosen, rejected]) @ result.head["kernel"][:, 0] + result.head["bias"][0]
    assert abs(r.mean()) < 1e-4


def test_probe_features_are_what_the_reward_head_reads():
    params = tm.init_params(TINY, jax.random.PRNGKey(1))
    b = _toy_pairs()
    feats = probe.last_token_features(
        params, TINY, b["chosen_tokens"], b["chosen_segment_ids"], b["chosen_positions"], 3
    )
    head = {"kernel": np.random.default_rng(0).normal(size=(32, 1)), "bias": np.array([0.3])}
    r = jax.jit(losses.rewards, static_argnums=1)(
        probe.with_head(params, head),
        TINY,
        b["chosen_tokens"],
        b["chosen_segment_ids"],
        b["chosen_positions"],
    )
    np.testing.assert_allclose(
        np.asarray(r), feats @ head["kernel"][:, 0] + 0.3, rtol=1e-4, atol=1e-5
    )
    # Probing the tiny model on its own toy pairs raises the training accuracy above chance.
    result = probe.linear_probe(params, TINY, b, steps=100, batch_size=4)
    assert result.accuracy > 0.5


def test_warm_is_the_hand_average_of_member_parameters():
    members = [_random_head_params(s) for s in (0, 1, 2)]
    merged = warm_lib.warm_average(members)
    hand = jax.tree.map(lambda *xs: sum(np.asarray(x, np.float64) for x in xs) / 3, *members)
    chex.assert_trees_all_close(jax.device_get(merged), hand, atol=1e-6, rtol=1e-6)
    weighted = warm_lib.warm_average(members[:2], weights=[3, 1])
    hand = jax.tree.map(lambda x, y: 0.75 * np.asarray(x) + 0.25 * np.asarray(y), *members[:2])
    chex.assert_trees_all_close(jax.device_get(weighted), hand, atol=1e-6, rtol=1e-6)


def test_merging_members_of_different_models_is_a_clear_error():
    small = tm.init_params(TINY, jax.random.PRNGKey(0))
    wide = tm.init_params(
        tm.TransformerConfig(**{**TINY.to_dict(), "d_ff": 96}), jax.random.PRNGKey(0)
    )
    with pytest.raises(UserError, match=r"cannot merge reward models: .*mlp/down has shape"):
        warm_lib.warm_average([small, wide], names=["m0", "m1"])
    cfg = TINY.to_dict()
    with pytest.raises(UserError, match="different architectures: a and b differ in d_ff"):
        warm_lib.check_same_model([cfg, {**cfg, "d_ff": 96}], ["t", "t"], ["a", "b"])
    with pytest.raises(UserError, match="different vocabularies"):
        warm_lib.check_same_model([cfg, cfg], ["t1", "t2"], ["a", "b"])
    with pytest.raises(UserError, match="no members"):
        warm_lib.warm_average([])


def test_selection_picks_the_best_members_by_the_given_split():
    scores = [0.61, 0.70, 0.55, 0.70, 0.64]
    assert warm_lib.select_top(scores, 3) == [1, 3, 4]  # ties by index
    with pytest.raises(UserError, match="cannot select 6 of 5"):
        warm_lib.select_top(scores, 6)

    # Greedy soup: member 3 lowers the average's score and is skipped; the others are kept.
    def score_of_average(idx):
        return 0.69 + 0.01 * len(idx) - 0.1 * (3 in idx)

    assert warm_lib.greedy_select(scores, score_of_average) == [1, 4, 0, 2]
    assert warm_lib.greedy_select(scores, score_of_average, max_members=2) == [1, 4]


def test_accuracy_is_split_by_the_corrupted_flag():
    # 6 training pairs, 2 of them with swapped labels; margins against the labels as trained.
    d = np.array([1.0, -2.0, 0.0, 3.0, 0.5, -1.0])
    corrupted = np.array([False, False, False, True, True, False])
    arrays = {"chosen_tokens": np.zeros((6, 4), np.int32), "corrupted": corrupted}
    masks = ev.subset_masks("train", arrays)
    assert set(masks) == {"train", "train_clean", "train_corrupted"}
    assert ev.accuracy(d, masks["train_clean"]) == pytest.approx((1 + 0 + 0.5 + 0) / 4)
    assert ev.accuracy(d, masks["train_corrupted"]) == 1.0
    assert ev.accuracy(d, masks["train"]) == pytest.approx(3.5 / 6)
    # Other splits, or training without corruption, are not split.
    assert set(ev.subset_masks("validation", arrays)) == {"validation"}
    assert set(ev.subset_masks("train", {**arrays, "corrupted": ~np.ones(6, bool)})) == {"train"}


def test_empty_evaluation_split_is_a_clear_error():
    empty = {k: v[:0] for k, v in _toy_pairs().items()}
    with pytest.raises(UserError, match="empty split"):
        ev.margins(tm.init_params(TINY, jax.random.PRNGKey(0)), TINY, empty)
    with pytest.raises(UserError, match="'ood/x' is empty"):
        ev.subset_masks("ood/x", empty)
    with pytest.raises(UserError, match="empty set of pairs"):
        ev.accuracy(np.array([1.0]), np.array([False]))


def test_spread_over_runs():
    def run(ind, ens, warm):
        row = {"ind": {"mean": ind}, "ens": ens, "warm": warm}
        return {"table": {"validation": row, "ood/x": row}}

    agg = ev.aggregate_runs([run(0.6, 0.7, 0.72), run(0.62, 0.68, 0.71)])
    v = agg["table"]["validation"]
    assert agg["runs"] == 2 and v["ens"]["mean"] == pytest.approx(0.69)
    assert v["warm_minus_ens"]["mean"] == pytest.approx(0.025)
    assert v["ind"]["std"] == pytest.approx(np.std([0.6, 0.62], ddof=1))
