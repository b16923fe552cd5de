"""WARM members: their diverse settings, and training M of them sequentially or as one program.

Diversity sources (WARM Sec. 3.2, each switchable from gin through `member_specs`):

- seed / data order: member m draws its batches in its own seeded order (`data_seed`) and has its
  own dropout stream (`seed`);
- learning rate and dropout, sampled per member from grids (paper: {1e-5, 4e-5, 1e-4} and
  {0.05, 0.1}); a grid of one value switches the source off;
- Baklava: member m's backbone starts from SFT checkpoint `init_steps[m % len(init_steps)]`
  (the head, from linear probing, stays shared).

Two ways to train, giving the same members (tests/test_reward_members.py):

- **sequential**: `train_member` runs `loop.train` once per member, each in its own workdir —
  also how several jobs (e.g. TPU slices) each train some members in parallel.
- **vmapped**: `train_vmapped` runs one `loop.train` on parameters stacked along a leading
  member axis (logical axis `member`, sharded over the mesh's `member` axis when it has one).
  Batches are [B, M, ...] (member m reads `batch[:, m]`, so the data axes still split dim 0) and
  the loss is Σ_m L_m(φ_m), whose gradient with respect to φ_m is member m's own gradient. The
  optimizer is vmapped too: clipping, Adam moments and the learning rate (kept in each member's
  optimizer state) never mix members.

Both modes freeze the same parameters when `rm/train.trainable_last_layers` or
`rm/train.trainable_pattern` is set: the loop wraps whichever optimizer it is given (these
member optimizers included) so that frozen leaves get no update and no state. Batches are global
(`loop.train(global_batches=True)`): every process draws the same ones, so several JAX processes
train the same members as one.

Member settings reach the loss as traced `aux` values (dropout rate, seed), so sequential members
share one compiled step and the vmapped step batches them. Dropout keys are
`fold_in(step_key, member.seed)` with the loop's step key, which is the same in both modes (same
`train.seed`), so the two modes draw identical dropout masks.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, PartitionSpec

from warm_jax.errors import UserError
from warm_jax.training import loop

PyTree = Any
MEMBER_AXIS = "member"


# --------------------------------------------------------------------------------------------
# Member settings


@dataclasses.dataclass(frozen=True)
class MemberSpec:
    """One member's settings. `init_step` None means the SFT run's latest checkpoint."""

    index: int
    seed: int  # dropout stream
    data_seed: int  # order of the training pairs
    learning_rate: float
    dropout_rate: float
    init_step: int | None = None

    @property
    def name(self) -> str:
        return f"m{self.index}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MemberSpec:
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


@gin.configurable
def member_specs(
    num_members: int,
    seed: int = 0,
    learning_rates: Sequence[float] = (1e-5, 4e-5, 1e-4),
    dropout_rates: Sequence[float] = (0.05, 0.1),
    vary_seed: bool = True,
    vary_data_order: bool = True,
    init_steps: Sequence[int] | None = None,
) -> list[MemberSpec]:
    """The settings of members 0..M-1. Member m's learning rate and dropout are drawn uniformly
    from the grids by `default_rng([seed, m])`, so adding members never changes existing ones
    (members trained by separate jobs agree). `vary_seed` / `vary_data_order` False give every
    member the same dropout stream / data order; `init_steps` turns Baklava on."""
    if num_members < 1:
        raise UserError(f"member_specs.num_members must be >= 1, got {num_members}")
    if not learning_rates or any(lr <= 0 for lr in learning_rates):
        raise UserError(f"member_specs.learning_rates must be positive, got {learning_rates}")
    if not dropout_rates or any(not 0.0 <= d < 1.0 for d in dropout_rates):
        raise UserError(f"member_specs.dropout_rates must be in [0, 1), got {dropout_rates}")
    if init_steps is not None and not init_steps:
        raise UserError("member_specs.init_steps is empty; use None to start every member alike")
    specs = []
    for m in range(num_members):
        rng = np.random.default_rng([seed, m])
        lr = float(learning_rates[int(rng.integers(len(learning_rates)))])
        dropout = float(dropout_rates[int(rng.integers(len(dropout_rates)))])
        specs.append(
            MemberSpec(
                index=m,
                seed=1000 * seed + m if vary_seed else 1000 * seed,
                data_seed=1000 * seed + m if vary_data_order else 1000 * seed,
                learning_rate=lr,
                dropout_rate=dropout,
                init_step=None if init_steps is None else int(init_steps[m % len(init_steps)]),
            )
        )
    return specs


def member_aux(spec: MemberSpec) -> dict[str, np.ndarray]:
    """The loss's traced per-member settings (see `losses.bt_loss_fn`)."""
    return {"dropout_rate": np.float32(spec.dropout_rate), "seed": np.int32(spec.seed)}


def stacked_aux(specs: Sequence[MemberSpec]) -> dict[str, np.ndarray]:
    return {
        "dropout_rate": np.asarray([s.dropout_rate for s in specs], np.float32),
        "seed": np.asarray([s.seed for s in specs], np.int32),
    }


# --------------------------------------------------------------------------------------------
# Optimizers


class MemberLearningRate(NamedTuple):
    """Optimizer state holding a member's own learning rate (a scalar per member when vmapped)."""

    learning_rate: jax.Array


def scale_by_member_learning_rate(learning_rate: float | jax.Array) -> optax.GradientTransformation:
    """Multiplies updates by the learning rate stored in the state (set at `init`)."""

    def init_fn(params):
        del params
        return MemberLearningRate(jnp.asarray(learning_rate, jnp.float32))

    def update_fn(updates, state, params=None):
        del params
        lr = state.learning_rate
        return jax.tree.map(lambda u: u * lr.astype(u.dtype), updates), state

    return optax.GradientTransformation(init_fn, update_fn)


def _unit_optimizer(num_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    # The gin-configured AdamW (clipping, warmup, decay, weight decay) with a peak learning rate
    # of 1: adamw(η·s) = η · adamw(s), the member's η is applied afterwards from the state.
    return loop.make_optimizer(num_steps, learning_rate=1.0)


def member_optimizer(
    num_steps: int, learning_rate: float
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """One member's optimizer for `loop.train(optimizer=...)`: the gin-configured
    `make_optimizer` schedule shape, scaled by this member's learning rate."""
    unit, sched = _unit_optimizer(num_steps)
    tx = optax.chain(unit, scale_by_member_learning_rate(learning_rate))
    return tx, lambda step: learning_rate * sched(step)


def vmapped_optimizer(
    num_steps: int, learning_rates: Sequence[float]
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """`member_optimizer` vmapped over a leading member axis of params, grads and state: member
    m's state (Adam moments, step count, learning rate η_m) is slice m, and global-norm clipping
    is per member. The schedule returned (logged as `learning_rate`) is the multiplier of η_m."""
    unit, sched = _unit_optimizer(num_steps)
    tx = optax.chain(unit, scale_by_member_learning_rate(1.0))
    lrs = np.asarray(learning_rates, np.float32)

    def init_fn(params):
        def one(p, lr):
            return optax.chain(unit, scale_by_member_learning_rate(lr)).init(p)

        return jax.vmap(one)(params, jnp.asarray(lrs))

    def update_fn(updates, state, params=None):
        if params is None:
            return jax.vmap(lambda u, s: tx.update(u, s))(updates, state)
        return jax.vmap(tx.update)(updates, state, params)

    return optax.GradientTransformation(init_fn, update_fn), sched


# --------------------------------------------------------------------------------------------
# Stacking


def stack(trees: Sequence[PyTree]) -> PyTree:
    """Members' parameter trees stacked along a new leading member axis."""
    if not trees:
        raise ValueError("stack: no trees")
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack(tree: PyTree) -> list[PyTree]:
    """The inverse of `stack`."""
    n = jax.tree.leaves(tree)[0].shape[0]
    return [jax.tree.map(lambda x, i=i: x[i], tree) for i in range(n)]


def member_axes(param_axes: PyTree) -> PyTree:
    """Logical axes of stacked parameters: `member` prepended to every PartitionSpec."""
    return jax.tree.map(
        lambda spec: PartitionSpec(MEMBER_AXIS, *spec),
        param_axes,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


class StackedBatches:
    """Batches of M member iterators, stacked along axis 1: [B, M, ...]. Member m's rows are
    exactly what its own iterator would give a sequential run. Checkpointable."""

    def __init__(self, iterators: Sequence[loop.StatefulIterator]):
        if not iterators:
            raise ValueError("StackedBatches: no iterators")
        self.iterators = list(iterators)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        parts = [next(it) for it in self.iterators]
        return {k: np.stack([p[k] for p in parts], axis=1) for k in parts[0]}

    def get_state(self) -> dict:
        return {"members": [it.get_state() for it in self.iterators]}

    def set_state(self, state: Mapping) -> None:
        states = state["members"]
        if len(states) != len(self.iterators):
            raise UserError(
                f"checkpoint holds the data positions of {len(states)} members, not "
                f"{len(self.iterators)}"
            )
        for it, s in zip(self.iterators, states):
            it.set_state(s)


def vmapped_loss_fn(member_loss: loop.LossFn, num_members: int) -> loop.LossFn:
    """The loss of M stacked members: Σ_m L_m(φ_m; batch[:, m]). Summing (not averaging) keeps
    each member's gradient its own. Metrics: each member's as `m<i>/<name>`, and their means."""

    def loss_fn(params, batch, rng, aux):
        def one(p, b, a):
            return member_loss(p, b, rng, a)

        member_losses, metrics = jax.vmap(one, in_axes=(0, 1, 0))(params, batch, aux)
        out = {k: v.mean() for k, v in metrics.items()}
        for k, v in metrics.items():
            for i in range(num_members):
                out[f"m{i}/{k}"] = v[i]
        for i in range(num_members):
            out[f"m{i}/loss"] = member_losses[i]
        return member_losses.sum(), out

    return loss_fn


# --------------------------------------------------------------------------------------------
# Training


def member_batches(arrays: Mapping[str, np.ndarray], batch_size: int, spec: MemberSpec):
    return loop.ArrayBatches(arrays, batch_size, seed=spec.data_seed)


def train_member(
    spec: MemberSpec,
    init_params: PyTree,
    train_arrays: Mapping[str, np.ndarray],
    *,
    loss_fn: loop.LossFn,
    param_axes: PyTree,
    workdir: str | os.PathLike,
    num_steps: int,
    batch_size: int,
    mesh: Mesh | None = None,
    eval_fn: Callable[[PyTree], Mapping[str, float]] | None = None,
    meta: Mapping | None = None,
    progress: bool = False,
) -> loop.TrainResult:
    """Trains one member with `loop.train` in its own workdir (resuming if interrupted)."""
    return loop.train(
        loss_fn,
        member_batches(train_arrays, batch_size, spec),
        workdir=Path(workdir),
        param_axes=param_axes,
        init_params=init_params,  # the loop copies before donating: shared arrays stay valid
        aux=member_aux(spec),
        optimizer=member_optimizer(num_steps, spec.learning_rate),
        eval_fn=eval_fn,
        meta={"member": spec.to_dict(), **(meta or {})},
        mesh=mesh,
        num_steps=num_steps,
        progress=progress,
        description=f"reward model {spec.name}",
        global_batches=True,  # every process draws the same global batches
    )


def train_vmapped(
    specs: Sequence[MemberSpec],
    init_params: Sequence[PyTree],
    train_arrays: Mapping[str, np.ndarray],
    *,
    loss_fn: loop.LossFn,
    param_axes: PyTree,
    workdir: str | os.PathLike,
    num_steps: int,
    batch_size: int,
    mesh: Mesh | None = None,
    eval_fn: Callable[[PyTree], Mapping[str, float]] | None = None,
    meta: Mapping | None = None,
    progress: bool = False,
) -> loop.TrainResult:
    """Trains all members as one jitted program on stacked parameters (module docstring);
    `result.params` is stacked (use `unstack`). `loss_fn` is the single-member loss."""
    if len(specs) != len(init_params):
        raise ValueError(f"{len(specs)} member specs but {len(init_params)} initial parameters")
    m = len(specs)
    return loop.train(
        vmapped_loss_fn(loss_fn, m),
        StackedBatches([member_batches(train_arrays, batch_size, s) for s in specs]),
        workdir=Path(workdir),
        param_axes=member_axes(param_axes),
        init_params=stack(init_params),
        aux=stacked_aux(specs),
        optimizer=vmapped_optimizer(num_steps, [s.learning_rate for s in specs]),
        eval_fn=eval_fn,
        meta={"members": [s.to_dict() for s in specs], **(meta or {})},
        mesh=mesh,
        num_steps=num_steps,
        progress=progress,
        description=f"{m} reward models (vmapped)",
        global_batches=True,  # every process draws the same global batches
    )
