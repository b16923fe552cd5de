"""WARM members: sequential and vmapped training give the same members for the same seeds (with
dropout, different learning rates, the member axis sharded over the mesh), and member settings."""

import json

import chex
import jax
import numpy as np
import pytest
from helpers import TINY

from warm_jax import sharding as shd
from warm_jax.errors import UserError
from warm_jax.models import transformer as tm
from warm_jax.reward import losses, probe
from warm_jax.reward import members as mb
from warm_jax.training import checkpoints, loop


def _toy_pairs(n=48, length=12, seed=0):
    """Chosen rows use the upper half of the vocabulary, rejected the lower: learnable."""
    rng = np.random.default_rng(seed)
    out = {}
    for side, lo in (("chosen", TINY.vocab_size // 2), ("rejected", 1)):
        tok = rng.integers(lo, lo + TINY.vocab_size // 2 - 1, (n, length)).astype(np.int32)
        seg = np.ones((n, length), np.int32)
        for i, k in enumerate(rng.integers(4, length + 1, n)):
            tok[i, k:], seg[i, k:] = 0, 0
        out[f"{side}_tokens"] = tok
        out[f"{side}_segment_ids"] = seg
        out[f"{side}_positions"] = (np.arange(length, dtype=np.int32) * seg).astype(np.int32)
    return out


def test_sequential_and_vmapped_members_are_the_same(tmp_path):
    specs = [
        mb.MemberSpec(0, seed=0, data_seed=10, learning_rate=1e-3, dropout_rate=0.1),
        mb.MemberSpec(1, seed=1, data_seed=11, learning_rate=3e-3, dropout_rate=0.05),
    ]
    head = {"kernel": np.random.default_rng(0).normal(size=(32, 1)) * 0.3, "bias": np.zeros(1)}
    # Different backbones per member, as with Baklava; one shared head.
    inits = [
        probe.with_head(tm.init_params(TINY, jax.random.PRNGKey(s.index)), head) for s in specs
    ]
    data = _toy_pairs()
    common = {
        "loss_fn": losses.bt_loss_fn(TINY),
        "param_axes": tm.param_logical_axes(TINY),
        "num_steps": 5,
        "batch_size": 16,
    }
    seq = [
        mb.train_member(
            s,
            p,
            data,
            workdir=tmp_path / f"m{s.index}",
            mesh=shd.make_mesh((("data", -1),)),
            **common,
        )
        for s, p in zip(specs, inits)
    ]
    # The member axis is sharded over a 2-way `member` mesh axis.
    mesh = shd.make_mesh((("member", 2), ("data", -1)))
    vm = mb.train_vmapped(specs, inits, data, workdir=tmp_path / "vm", mesh=mesh, **common)
    leaf = vm.params["params"]["block_0"]["mlp"]["up"]
    assert leaf.sharding.spec[0] == "member"
    for s, v, init in zip(seq, mb.unstack(vm.params), inits):
        moved = max(
            float(np.abs(a - b).max())
            for a, b in zip(jax.tree.leaves(jax.device_get(s.params)), jax.tree.leaves(init))
        )
        assert moved > 1e-3  # the members did train
        # Vmapped and sequential programs sum in different orders; Adam divides by the running
        # gradient scale, so where a gradient entry is near zero a 1e-7 difference can become a
        # visible share of a step (seen on some CPUs: 1-2 entries of 2048 off by 2e-5 to 1.2e-4,
        # varying between runs). So: nearly every entry agrees to 1e-5, none by a third of
        # one step of the larger learning rate (3e-3).
        diffs = np.concatenate(
            [
                np.abs(np.asarray(a) - np.asarray(b)).ravel()
                for a, b in zip(
                    jax.tree.leaves(jax.device_get(v)), jax.tree.leaves(jax.device_get(s.params))
                )
            ]
        )
        assert (diffs > 1e-5).mean() < 1e-3, (diffs > 1e-5).sum()
        assert diffs.max() < 1e-3, diffs.max()
    # The members differ from each other (lr, data order, dropout stream, init).
    a, b = (jax.device_get(s.params["params"]["reward_head"]["kernel"]) for s in seq)
    assert np.abs(a - b).max() > 1e-4
    # Per-member metrics, and a learning rate per member in the optimizer state.
    last = vm.history[-1]
    assert {"m0/accuracy", "m1/accuracy", "m0/bt_loss", "accuracy"} <= set(last)
    for s, r in zip(seq, ("m0", "m1")):
        assert last[f"{r}/bt_loss"] == pytest.approx(s.history[-1]["bt_loss"], rel=1e-4)
    # Each member's checkpoint restores through the generic loader.
    loaded = checkpoints.load_params(tmp_path / "m1")
    chex.assert_trees_all_close(jax.device_get(loaded), jax.device_get(seq[1].params))


def test_vmapped_optimizer_keeps_members_apart():
    """Clipping and learning rates are per member: member 1's huge gradient does not shrink
    member 0's step, and each step scales with its own learning rate."""
    tx, _ = mb.vmapped_optimizer(10, [1e-2, 1e-3])
    params = {"w": np.zeros((2, 3), np.float32)}
    grads = {"w": np.array([[1.0, 0.0, 0.0], [1e4, 0.0, 0.0]], np.float32)}
    state = tx.init(params)
    assert np.allclose(np.asarray(state[-1].learning_rate), [1e-2, 1e-3])
    updates, _ = tx.update(grads, state, params)
    one, _ = mb.member_optimizer(10, 1e-2)
    single, _ = one.update(
        {"w": grads["w"][0]}, one.init({"w": params["w"][0]}), {"w": params["w"][0]}
    )
    np.testing.assert_allclose(np.asarray(updates["w"][0]), np.asarray(single["w"]), rtol=1e-6)
    # Adam's first step has size ≈ lr · schedule(0) per coordinate, whatever the gradient.
    ratio = float(updates["w"][0, 0] / updates["w"][1, 0])
    assert ratio == pytest.approx(10.0, rel=1e-4)


def test_member_specs_are_sampled_per_member_and_switchable():
    specs = mb.member_specs(6, seed=3, learning_rates=(1e-5, 4e-5, 1e-4), dropout_rates=(0.05, 0.1))
    assert {s.learning_rate for s in specs} <= {1e-5, 4e-5, 1e-4}
    assert len({(s.learning_rate, s.dropout_rate) for s in specs}) > 1
    assert len({s.data_seed for s in specs}) == 6 and len({s.seed for s in specs}) == 6
    # Adding members does not change the existing ones (separate jobs agree).
    assert mb.member_specs(3, seed=3)[:3] == mb.member_specs(8, seed=3)[:3]
    same = mb.member_specs(
        4,
        learning_rates=(1e-4,),
        dropout_rates=(0.1,),
        vary_seed=False,
        vary_data_order=False,
        init_steps=(100, 200),
    )
    assert {(s.learning_rate, s.dropout_rate, s.seed, s.data_seed) for s in same} == {
        (1e-4, 0.1, 0, 0)
    }
    assert [s.init_step for s in same] == [100, 200, 100, 200]
    assert mb.MemberSpec.from_dict(json.loads(json.dumps(same[1].to_dict()))) == same[1]
    with pytest.raises(UserError, match="learning_rates"):
        mb.member_specs(2, learning_rates=())
    with pytest.raises(UserError, match="dropout_rates"):
        mb.member_specs(2, dropout_rates=(1.5,))


def test_stacked_batches_give_each_member_its_own_order_and_resume():
    data = {"x": np.arange(20)}
    specs = [mb.MemberSpec(i, i, 100 + i, 1e-3, 0.0) for i in range(3)]
    stacked = mb.StackedBatches([mb.member_batches(data, 4, s) for s in specs])
    first = [next(stacked)["x"] for _ in range(3)]
    assert first[0].shape == (4, 3)
    own = loop.ArrayBatches(data, 4, seed=101)
    np.testing.assert_array_equal([next(own)["x"] for _ in range(3)], [b[:, 1] for b in first])
    state = json.loads(json.dumps(stacked.get_state()))
    nxt = next(stacked)["x"]
    again = mb.StackedBatches([mb.member_batches(data, 4, s) for s in specs])
    again.set_state(state)
    np.testing.assert_array_equal(next(again)["x"], nxt)
    with pytest.raises(UserError, match="2 members, not 3"):
        again.set_state({"members": state["members"][:2]})
