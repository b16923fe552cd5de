"""Training only some parameters (`train.trainable_last_layers`, `train.trainable_pattern`):
frozen leaves never move and hold no optimizer state, trained leaves move exactly as in a run
whose frozen gradients are stopped by hand, with weight decay, clipping, vmapped reward members,
FSDP sharding and resume; a spec that cannot apply is a clear error naming the gin parameter."""

import chex
import gin
import jax
import numpy as np
import optax
import pytest
from helpers import TINY, tiny_loss, tiny_train_kwargs, toy_lm_data

from warm_jax import sharding as shd
from warm_jax.errors import UserError
from warm_jax.models import transformer as tm
from warm_jax.reward import losses, probe
from warm_jax.reward import members as mb
from warm_jax.training import loop

INIT = tm.init_params(TINY, jax.random.PRNGKey(0))
# TINY has blocks 0 and 1: the last block, the final norm and both heads are trained.
FROZEN = {"params/embed/embedding"} | {
    loop.param_path(p)
    for p, _ in jax.tree_util.tree_flatten_with_path(INIT)[0]
    if "block_0" in loop.param_path(p)
}


def _paths(tree) -> dict:
    return {
        loop.param_path(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def _train(workdir, loss_fn=None, mesh=None, **kw):
    kw = {"num_steps": 4, "checkpoint_every": 2, "log_every": 1, **kw}
    return loop.train(
        loss_fn or tiny_loss(),
        loop.ArrayBatches(toy_lm_data(), 16, seed=3),
        workdir=workdir,
        init_params=INIT,
        mesh=mesh or shd.make_mesh((("data", -1),)),
        **{k: v for k, v in tiny_train_kwargs().items() if k != "init_fn"},
        **kw,
    )


def _bind_optimizer():
    # Weight decay on, and a clipping threshold far below the gradient norm, so both act.
    gin.bind_parameter("make_optimizer.learning_rate", 1e-2)
    gin.bind_parameter("make_optimizer.weight_decay", 0.1)
    gin.bind_parameter("make_optimizer.clip_norm", 0.05)


def test_mask_of_last_layers_and_of_a_pattern():
    mask = _paths(loop.Trainable(last_layers=1).mask(INIT))
    assert {p for p, t in mask.items() if not t} == FROZEN
    assert mask["params/final_norm/scale"] and mask["params/reward_head/kernel"]
    both = _paths(loop.Trainable(last_layers=1, pattern=r"^params/embed/").mask(INIT))
    assert {p for p, t in both.items() if not t} == FROZEN - {"params/embed/embedding"}
    only = _paths(loop.Trainable(pattern=r"reward_head").mask(INIT))
    assert {p for p, t in only.items() if t} == {
        "params/reward_head/kernel",
        "params/reward_head/bias",
    }
    assert all(_paths(loop.Trainable().mask(INIT)).values())


def test_frozen_leaves_stay_put_and_trained_ones_match_stopped_gradients(tmp_path):
    _bind_optimizer()
    masked = _train(tmp_path / "masked", trainable_last_layers=1)
    got, start = _paths(jax.device_get(masked.params)), _paths(INIT)
    for p in FROZEN:
        np.testing.assert_array_equal(got[p], start[p], err_msg=p)  # bit-identical
    for p in set(got) - FROZEN - {"params/reward_head/kernel", "params/reward_head/bias"}:
        assert np.abs(got[p] - start[p]).max() > 1e-4, p  # trained (the LM loss ignores the
        # reward head: its gradient is zero and only weight decay, on zeros, touches it)

    # Reference, built by hand: the frozen leaves' gradients stopped in the loss, weight decay
    # masked to the trained leaves, clipping over every gradient (the frozen ones are zero: the
    # masked run's clipping over the trained leaves only is the same number).
    def stopped(params, batch, rng, aux):
        params = jax.tree_util.tree_map_with_path(
            lambda path, x: jax.lax.stop_gradient(x) if loop.param_path(path) in FROZEN else x,
            params,
        )
        return tiny_loss()(params, batch, rng, aux)

    _, sched = loop.make_optimizer(4, learning_rate=1e-2)
    decayed = jax.tree_util.tree_map_with_path(lambda p, _: loop.param_path(p) not in FROZEN, INIT)
    tx = optax.chain(
        optax.clip_by_global_norm(0.05),
        optax.adamw(sched, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, mask=decayed),
    )
    gin.clear_config()
    ref_run = _train(tmp_path / "ref", loss_fn=stopped, optimizer=(tx, sched))
    ref = _paths(jax.device_get(ref_run.params))
    for p in got:
        np.testing.assert_array_equal(got[p], ref[p], err_msg=p)
    # The logged gradient norm is that of the trained leaves (the frozen ones' are zero).
    np.testing.assert_allclose(
        [r["grad_norm"] for r in masked.history if "grad_norm" in r],
        [r["grad_norm"] for r in ref_run.history if "grad_norm" in r],
        rtol=1e-6,
    )


def test_frozen_leaves_hold_no_optimizer_state():
    tx, _ = loop.make_optimizer(10, weight_decay=0.1)
    mask = loop.Trainable(last_layers=1).mask(INIT)
    sizes = {p: x.size for p, x in _paths(INIT).items()}
    trained = sum(n for p, n in sizes.items() if p not in FROZEN)

    def state_size(t):
        return sum(x.size for x in jax.tree.leaves(jax.eval_shape(t.init, INIT)))

    scalars = state_size(tx) - 2 * sum(sizes.values())  # step counts and the like
    assert state_size(loop.partly_frozen(tx, mask)) == 2 * trained + scalars


def test_fsdp_sharded_masked_run_matches_one_data_axis(tmp_path):
    # (Default optimizer: with the test above's tiny clipping threshold, Adam turns rounding
    # differences of near-zero gradients into whole steps, and the comparison means little.)
    data = _train(tmp_path / "data", trainable_last_layers=1)
    fsdp = _train(tmp_path / "fsdp", trainable_last_layers=1, mesh=shd.make_mesh((("fsdp", -1),)))
    chex.assert_trees_all_close(
        jax.device_get(fsdp.params), jax.device_get(data.params), atol=1e-5, rtol=1e-5
    )
    start = _paths(INIT)
    for p, x in _paths(jax.device_get(fsdp.params)).items():
        if p in FROZEN:
            np.testing.assert_array_equal(x, start[p], err_msg=p)


def test_masked_run_resumes_exactly_and_refuses_another_mask(tmp_path):
    ref = _train(tmp_path / "ref", trainable_last_layers=1)

    class Crash(Exception):
        pass

    def crash_at_3(step, params):
        if step == 3:
            raise Crash

    with pytest.raises(Crash):
        _train(tmp_path / "run", trainable_last_layers=1, on_step=crash_at_3)
    with pytest.raises(UserError, match=r"train\.trainable_last_layers=1.*every parameter"):
        _train(tmp_path / "run")  # the optimizer state saved has the masked shape
    with pytest.raises(UserError, match=r"trainable_last_layers=1.*trainable_last_layers=2"):
        _train(tmp_path / "run", trainable_last_layers=2)
    resumed = _train(tmp_path / "run", trainable_last_layers=1)
    assert resumed.resumed_from == 2
    chex.assert_trees_all_equal(jax.device_get(resumed.params), jax.device_get(ref.params))


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"trainable_last_layers": 3}, r"train\.trainable_last_layers=3 but the model has 2 "),
        ({"trainable_last_layers": 0}, r"train\.trainable_last_layers must be .* >= 1"),
        ({"trainable_pattern": "attn/qq"}, r"train\.trainable_pattern='attn/qq' matches no"),
        ({"trainable_pattern": "block_("}, r"train\.trainable_pattern='block_\(' is not a reg"),
    ],
)
def test_a_spec_that_cannot_apply_is_a_clear_error_before_anything_is_written(
    tmp_path, setting, message
):
    with pytest.raises(UserError, match=message):
        _train(tmp_path / "w", **setting)
    assert not (tmp_path / "w").exists()
    # The same through gin, as the command line sets it.
    for k, v in setting.items():
        gin.bind_parameter(f"train.{k}", v)
    with pytest.raises(UserError, match=message):
        _train(tmp_path / "w")


def test_vmapped_and_sequential_members_freeze_the_same_leaves(tmp_path):
    """The mask wraps whichever optimizer the loop is given: the members' vmapped one (per
    member clipping and learning rate) and the sequential one agree, and frozen leaves stay."""
    gin.bind_parameter("train.trainable_last_layers", 1)
    specs = [
        mb.MemberSpec(0, seed=0, data_seed=10, learning_rate=1e-3, dropout_rate=0.1),
        mb.MemberSpec(1, seed=1, data_seed=11, learning_rate=3e-3, dropout_rate=0.05),
    ]
    head = {"kernel": np.random.default_rng(0).normal(size=(32, 1)) * 0.3, "bias": np.zeros(1)}
    inits = [
        probe.with_head(tm.init_params(TINY, jax.random.PRNGKey(s.index)), head) for s in specs
    ]
    rng = np.random.default_rng(0)
    n, length = 48, 12
    data = {}
    for side, lo in (("chosen", TINY.vocab_size // 2), ("rejected", 1)):
        data[f"{side}_tokens"] = rng.integers(lo, lo + 31, (n, length)).astype(np.int32)
        data[f"{side}_segment_ids"] = np.ones((n, length), np.int32)
        data[f"{side}_positions"] = np.tile(np.arange(length, dtype=np.int32), (n, 1))
    common = {
        "loss_fn": losses.bt_loss_fn(TINY),
        "param_axes": tm.param_logical_axes(TINY),
        "num_steps": 3,
        "batch_size": 16,
        "mesh": shd.make_mesh((("data", -1),)),
    }
    seq = [
        mb.train_member(s, p, data, workdir=tmp_path / f"m{s.index}", **common)
        for s, p in zip(specs, inits)
    ]
    vm = mb.train_vmapped(specs, inits, data, workdir=tmp_path / "vm", **common)
    for s, v, init in zip(seq, mb.unstack(vm.params), inits):
        got, start = _paths(jax.device_get(v)), _paths(init)
        for p in FROZEN:
            np.testing.assert_array_equal(got[p], start[p], err_msg=p)
        assert np.abs(got["params/block_1/mlp/up"] - start["params/block_1/mlp/up"]).max() > 1e-4
        # Not bit-exact (vmapped and single programs sum in other orders), and Adam's first
        # steps are about lr · sign(g): a coordinate whose gradient is near zero can differ by
        # a good part of a step (measured: one of 2048 entries by 3e-5, the rest within 1e-6).
        chex.assert_trees_all_close(jax.device_get(v), jax.device_get(s.params), atol=1e-4)
        diffs = np.concatenate(
            [
                np.abs(a - b).ravel()
                for a, b in zip(
                    jax.tree.leaves(got), jax.tree.leaves(_paths(jax.device_get(s.params)))
                )
            ]
        )
        assert np.mean(diffs < 1e-6) > 0.99
