"""Promise 4: a NaN or Inf in the loss or the gradients stops the run with a message naming the
step and the first non-finite gradient, keeping the last good checkpoint; with
`train.skip_nonfinite=True` the bad batch is skipped instead (its update is not applied) and the
`skipped_steps` metric counts it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_loss, toy_lm_data

from warm_jax import sharding as shd
from warm_jax.errors import UserError
from warm_jax.training import checkpoints as ck
from warm_jax.training import loop

from . import common

POISONED_STEP = 3  # 1-based: the 3rd batch served


class PoisonBatches:
    """ArrayBatches plus a `poison` column: all ones in the batch at `poisoned` (0-based stream
    index), zeros elsewhere; `drop` leaves that batch out of the stream altogether."""

    def __init__(self, poisoned: int | None, drop: bool = False):
        self.inner = loop.ArrayBatches(toy_lm_data(), 16, seed=3)
        self.poisoned, self.drop = poisoned, drop

    def __iter__(self):
        return self

    def __next__(self):
        if self.drop and self.inner.served == self.poisoned:
            next(self.inner)
        poison = self.inner.served == self.poisoned
        batch = next(self.inner)
        return {**batch, "poison": np.full(len(batch["tokens"]), poison, np.float32)}

    def get_state(self):
        return self.inner.get_state()

    def set_state(self, state):
        self.inner.set_state(state)


def nan_loss_finite_grads(params, batch, rng, aux):
    loss, metrics = tiny_loss()(params, batch, rng, aux)
    # A constant NaN added to the loss: its gradient is 0, so every gradient stays finite and
    # the parameters would too; only the loss tells.
    return loss + jnp.where(batch["poison"][0] > 0, jnp.nan, 0.0), metrics


def inf_grad_in_one_leaf(params, batch, rng, aux):
    loss, metrics = tiny_loss()(params, batch, rng, aux)
    scale = params["params"]["final_norm"]["scale"]
    # d/dscale of sum(scale) * inf is inf in that one parameter array only.
    return loss + jnp.sum(scale) * jnp.where(batch["poison"][0] > 0, jnp.inf, 0.0), metrics


def finite_loss_nan_grad_in_one_leaf(params, batch, rng, aux):
    loss, metrics = tiny_loss()(params, batch, rng, aux)
    scale = params["params"]["final_norm"]["scale"]
    poison = batch["poison"][0]
    # sqrt(|u|) at u = 0 has a NaN derivative; g - stop_gradient(g) adds exactly 0 to the loss.
    g = jnp.sum(jnp.sqrt(jnp.abs(scale - jax.lax.stop_gradient(scale) + (1.0 - poison))))
    return loss + poison * (g - jax.lax.stop_gradient(g)), metrics


def nan_everywhere(params, batch, rng, aux):
    loss, metrics = tiny_loss()(params, batch, rng, aux)
    return loss * jnp.where(batch["poison"][0] > 0, jnp.nan, 1.0), metrics


def train(workdir, loss_fn, batches, num_steps, checkpoint_every=1, **kw):
    from helpers import tiny_train_kwargs

    return loop.train(
        loss_fn,
        batches,
        workdir=workdir,
        mesh=shd.make_mesh((("data", -1),)),
        num_steps=num_steps,
        checkpoint_every=checkpoint_every,
        log_every=1,
        optimizer=loop.make_optimizer(6),  # one schedule for runs of different lengths
        **{**tiny_train_kwargs(), **kw},
    )


GRAD_OF_SCALE = r"first non-finite gradient: \['params'\]\['final_norm'\]\['scale'\]"


@pytest.mark.parametrize(
    ("loss_fn", "culprit"),
    [
        # The case the loss alone would not catch: before, its update (NaN everywhere after
        # clipping) was applied and saved as a checkpoint, and the run stopped a step later.
        (finite_loss_nan_grad_in_one_leaf, rf"loss \d[^;]*; {GRAD_OF_SCALE}\."),
        pytest.param(inf_grad_in_one_leaf, GRAD_OF_SCALE, marks=pytest.mark.slow),
        pytest.param(
            nan_loss_finite_grads,
            "every gradient is finite: the loss alone is non-finite",
            marks=pytest.mark.slow,
        ),
        pytest.param(
            nan_everywhere,
            r"first non-finite gradient: \['params'\]\['block_0'\].* \(and \d+ more",
            marks=pytest.mark.slow,
        ),
    ],
    ids=["finite-loss-nan-grad", "inf-grad-one-leaf", "nan-loss-finite-grads", "nan-everywhere"],
)
def test_non_finite_step_stops_naming_step_and_leaf_and_keeps_last_good_checkpoint(
    tmp_path, loss_fn, culprit
):
    with pytest.raises(loop.NonFiniteError, match=rf"step {POISONED_STEP}\b.*{culprit}") as err:
        train(tmp_path, loss_fn, PoisonBatches(POISONED_STEP - 1), 6)
    assert isinstance(err.value, UserError) and isinstance(err.value, FloatingPointError)
    assert f"last good checkpoint is step {POISONED_STEP - 1}" in str(err.value)
    assert "train.skip_nonfinite=True" in str(err.value)
    # Nothing of the bad step was saved; the kept checkpoint loads and is finite.
    assert common.finished_steps(tmp_path) == list(range(1, POISONED_STEP))
    kept = common.host(ck.load_params(tmp_path))
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(kept))


def test_skip_nonfinite_equals_the_run_that_never_saw_the_batch(tmp_path):
    with pytest.warns(RuntimeWarning, match=f"step {POISONED_STEP} has a non-finite"):
        skipped = train(
            tmp_path / "skip", nan_everywhere, PoisonBatches(POISONED_STEP - 1), 6,
            checkpoint_every=100, skip_nonfinite=True,
        )  # fmt: skip
    never_saw = train(
        tmp_path / "ref", nan_everywhere, PoisonBatches(POISONED_STEP - 1, drop=True), 5,
        checkpoint_every=100, skip_nonfinite=True,
    )  # fmt: skip
    leaves = jax.tree.leaves(common.host(skipped.params))
    assert all(np.isfinite(x).all() for x in leaves)
    common.assert_trees_bitwise_equal(skipped.params, never_saw.params)
    # The counter metric: 0 before the poisoned step, 1 from it on; its loss is not averaged in.
    rows = {r["step"]: r for r in skipped.history}
    assert [rows[s]["skipped_steps"] for s in range(1, 7)] == [0, 0, 1, 1, 1, 1]
    assert "loss" not in rows[POISONED_STEP]
    assert all(np.isfinite(rows[s]["loss"]) for s in range(1, 7) if s != POISONED_STEP)
    meta = ck.load_metadata(tmp_path / "skip")
    assert meta["skipped_steps"] == 1 and meta["skipped_at"] == [POISONED_STEP]
    # The loss at each later step is the reference's loss one step earlier (same parameters,
    # same batch): the skipped run is the other run shifted by the one skipped batch.
    ref_rows = {r["step"]: r for r in never_saw.history}
    for s in range(POISONED_STEP + 1, 7):
        assert rows[s]["loss"] == ref_rows[s - 1]["loss"]


@pytest.mark.slow
def test_skipped_count_survives_a_resume(tmp_path):
    class Crash(Exception):
        pass

    def crash_at_5(step, params):
        if step == 5:
            raise Crash

    with pytest.raises(Crash), pytest.warns(RuntimeWarning):
        train(tmp_path, nan_everywhere, PoisonBatches(POISONED_STEP - 1), 6,
              skip_nonfinite=True, on_step=crash_at_5)  # fmt: skip
    resumed = train(tmp_path, nan_everywhere, PoisonBatches(POISONED_STEP - 1), 6,
                    skip_nonfinite=True)  # fmt: skip
    assert resumed.resumed_from == 4
    assert [r["skipped_steps"] for r in resumed.history] == [0, 0, 1, 1, 1, 1]
    assert ck.load_metadata(tmp_path)["skipped_at"] == [POISONED_STEP]
