"""The one training loop. Pretraining, SFT and reward-model training differ only in the loss
function (and data) they pass; everything else — sharded state creation, the jitted step with
gradient accumulation, Orbax checkpoints with exact resume, evaluation, metrics — lives here."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from tqdm.auto import tqdm

from warm_jax import sharding as shd
from warm_jax.errors import UserError
from warm_jax.training.checkpoints import (
    CorruptCheckpointError,
    TrainCheckpoints,
    check_same_structure,
    load_metadata,
)
from warm_jax.training.metrics import MetricsWriter, plot_curves, read_jsonl

PyTree = Any
# loss_fn(params, batch, rng, aux) -> (scalar loss, dict of scalar metrics)
LossFn = Callable[[PyTree, Mapping[str, jax.Array], jax.Array, PyTree], tuple[jax.Array, dict]]
ON_CORRUPT = ("error", "fallback")
# How many skipped step numbers the checkpoint metadata lists (the count is always kept).
_SKIPPED_LISTED = 100


class NonFiniteError(UserError, FloatingPointError):
    """A training step produced a non-finite loss or gradient (a UserError, so the command line
    reports it as a message rather than a traceback)."""


class StatefulIterator(Protocol):
    """A batch iterator whose position can be saved in a checkpoint and restored exactly."""

    def __next__(self) -> Mapping[str, np.ndarray]: ...
    def get_state(self) -> Mapping: ...
    def set_state(self, state: Mapping) -> None: ...


@gin.configurable
def make_optimizer(
    num_steps: int,
    learning_rate: float = 3e-4,
    warmup_steps: int = 0,
    schedule: str = "cosine",
    end_lr_fraction: float = 0.1,
    weight_decay: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.95,
    eps: float = 1e-8,
    clip_norm: float | None = 1.0,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with warmup then cosine/linear/constant decay, after global-norm clipping."""
    if learning_rate <= 0:
        raise UserError(f"make_optimizer.learning_rate must be > 0, got {learning_rate}")
    warmup_steps = min(warmup_steps, max(num_steps - 1, 0))
    decay_steps = max(num_steps - warmup_steps, 1)
    end = learning_rate * end_lr_fraction
    decays = {
        "cosine": lambda: optax.cosine_decay_schedule(learning_rate, decay_steps, end_lr_fraction),
        "linear": lambda: optax.linear_schedule(learning_rate, end, decay_steps),
        "constant": lambda: optax.constant_schedule(learning_rate),
    }
    if schedule not in decays:
        raise UserError(f"make_optimizer.schedule={schedule!r}; choose from {sorted(decays)}")
    sched = decays[schedule]()
    if warmup_steps:
        sched = optax.join_schedules(
            [optax.linear_schedule(0.0, learning_rate, warmup_steps), sched], [warmup_steps]
        )
    parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    parts.append(optax.adamw(sched, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    return optax.chain(*parts), sched


# --------------------------------------------------------------------------------------------
# Training only some parameters


def param_path(path: tuple) -> str:
    """A parameter's path as 'params/block_3/attn/q' (what `train.trainable_pattern` matches)."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


_BLOCK = re.compile(r"(?:^|/)block_(\d+)(?:/|$)")
_EMBED = re.compile(r"(?:^|/)embed(?:/|$)")


@dataclasses.dataclass(frozen=True)
class Trainable:
    """Which parameters a run trains (`train.trainable_last_layers`, `train.trainable_pattern`);
    both None: all of them.

    - `last_layers=K`: the last K transformer blocks (`block_<i>`, i >= n_layers - K) and every
      parameter outside the blocks except the input embedding: the final norm, the LM head and
      the reward head. With tied embeddings (SmolLM2, Gemma) the embedding is also the output
      head; it stays frozen too (add it with `pattern='embed'`): training it would need the
      backward pass through every block, which is what freezing saves.
    - `pattern`: a regular expression searched in each path ('params/block_3/attn/q', see
      `param_path`); matching leaves are trained.
    - Both: the union.

    Frozen leaves get no update, no optimizer state and no gradient (it is stopped before the
    backward pass, which then skips the frozen blocks)."""

    last_layers: int | None = None
    pattern: str | None = None

    @property
    def everything(self) -> bool:
        return self.last_layers is None and self.pattern is None

    def to_dict(self) -> dict:
        return {"last_layers": self.last_layers, "pattern": self.pattern}

    def mask(self, params: PyTree) -> PyTree:
        """A tree of Python bools (True: trained) with `params`' structure. A spec that cannot
        apply to these parameters is a UserError naming the gin parameter."""
        leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
        paths = [param_path(p) for p, _ in leaves]
        if self.everything:
            return jax.tree_util.tree_unflatten(treedef, [True] * len(paths))
        chosen = [False] * len(paths)
        if self.last_layers is not None:
            k = self.last_layers
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise UserError(
                    f"train.trainable_last_layers must be a whole number >= 1 (None trains every "
                    f"parameter), got {k!r}"
                )
            blocks = [_BLOCK.search(p) for p in paths]
            n = 1 + max((int(b.group(1)) for b in blocks if b), default=-1)
            if n == 0:
                raise UserError(
                    f"train.trainable_last_layers={k}: these parameters have no transformer "
                    f"blocks (no 'block_<i>' in any path, e.g. {paths[0]!r}); use "
                    "train.trainable_pattern"
                )
            if k > n:
                raise UserError(
                    f"train.trainable_last_layers={k} but the model has {n} transformer blocks "
                    f"(block_0 ... block_{n - 1})"
                )
            for i, (p, b) in enumerate(zip(paths, blocks)):
                chosen[i] = int(b.group(1)) >= n - k if b else not _EMBED.search(p)
        if self.pattern is not None:
            try:
                rx = re.compile(self.pattern)
            except re.error as e:
                raise UserError(
                    f"train.trainable_pattern={self.pattern!r} is not a regular expression: {e}"
                ) from None
            hits = [bool(rx.search(p)) for p in paths]
            if not any(hits):
                raise UserError(
                    f"train.trainable_pattern={self.pattern!r} matches no parameter; paths look "
                    f"like {paths[0]!r} ... {paths[-1]!r}"
                )
            chosen = [a or b for a, b in zip(chosen, hits)]
        return jax.tree_util.tree_unflatten(treedef, chosen)


def partly_frozen(tx: optax.GradientTransformation, mask: PyTree) -> optax.GradientTransformation:
    """`tx` on the leaves where `mask` is True; zero updates and no state for the others
    (`optax.set_to_zero`). Inside `tx`, gradient clipping's global norm and weight decay see the
    trained leaves only."""
    labels = jax.tree.map(lambda t: "train" if t else "frozen", mask)
    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def stop_frozen_gradients(loss_fn: LossFn, mask: PyTree) -> LossFn:
    """`loss_fn` with the gradients of the frozen leaves (mask False) stopped: they are exact
    zeros, and the backward pass does not go through what only they need."""

    def masked(params, batch, rng, aux):
        params = jax.tree.map(lambda p, t: p if t else jax.lax.stop_gradient(p), params, mask)
        return loss_fn(params, batch, rng, aux)

    return masked


@dataclasses.dataclass
class TrainResult:
    params: PyTree
    step: int
    history: list[dict]
    workdir: Path
    resumed_from: int | None
    aux: PyTree = None


def _tree_add(a, b):
    return jax.tree.map(jnp.add, a, b)


def make_train_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    sched: optax.Schedule,
    accum_steps: int,
    aux_update: Callable[[PyTree, PyTree], PyTree] | None = None,
    skip_nonfinite: bool = False,
) -> Callable:
    """state, batch, aux -> (state, metrics, health). With accum_steps > 1 the batch is cut into
    micro-batches (strided, so each stays split over the data axes) whose gradients are averaged.
    With `aux_update`, the auxiliary tree lives in the state (`state["aux"]`, checkpointed) and is
    updated after every optimizer step as `aux_update(aux, new_params)` (e.g. an EMA anchor).

    `health` holds `finite` (loss and gradient norm finite) and `grads_finite` (one flag per
    parameter leaf, to name the culprit). With `skip_nonfinite`, a non-finite step leaves
    everything but the step counter as it was: parameters, optimizer state (its update count
    included), RNG and aux, i.e. exactly the run that never saw that batch. (Not
    `optax.apply_if_finite`: it adds its own optimizer state, so the switch could not be turned
    on for a resumed run, and it looks at the gradients only, not the loss.)"""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def grads_of(params, batch, rng, aux):
        if accum_steps == 1:
            (loss, metrics), grads = grad_fn(params, batch, rng, aux)
            return loss, metrics, grads

        def split(x):
            x = x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:])
            return jnp.moveaxis(x, 1, 0)

        micro = jax.tree.map(split, batch)

        def body(carry, xs):
            i, mb = xs
            (loss, metrics), grads = grad_fn(params, mb, jax.random.fold_in(rng, i), aux)
            return _tree_add(carry, (loss, metrics, grads)), None

        first = jax.tree.map(lambda x: x[0], micro)
        shapes = jax.eval_shape(lambda: grad_fn(params, first, rng, aux))
        (loss_s, metrics_s), grads_s = shapes
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (loss_s, metrics_s, grads_s))
        total, _ = jax.lax.scan(body, zeros, (jnp.arange(accum_steps), micro))
        return jax.tree.map(lambda x: x / accum_steps, total)

    def step(state, batch, aux):
        if aux_update is not None:
            aux = state["aux"]
        rng, step_rng = jax.random.split(state["rng"])
        loss, metrics, grads = grads_of(state["params"], batch, step_rng, aux)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        grad_norm = optax.global_norm(grads)
        metrics = {
            **metrics,
            "loss": loss,
            "grad_norm": grad_norm,
            "learning_rate": sched(state["step"]),
        }
        new_state = {
            "step": state["step"] + 1,
            "params": params,
            "opt_state": opt_state,
            "rng": rng,
        }
        if aux_update is not None:
            new_state["aux"] = aux_update(aux, params)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        if skip_nonfinite:
            new_state = {
                k: v
                if k == "step"
                else jax.tree.map(lambda a, b: jnp.where(finite, a, b), v, state[k])
                for k, v in new_state.items()
            }
        health = {
            "finite": finite,
            "grads_finite": jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]),
        }
        return new_state, metrics, health

    return step


def _abstract(tree: PyTree) -> PyTree:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _put_batch(batch: Mapping, shardings: PyTree, global_batches: bool = False) -> dict:
    """The global batch arrays. By default every process gives its own slice (the processes'
    slices, in process order, make the global batch); with `global_batches` every process gives
    the whole global batch and keeps the rows its devices hold (one process: the same)."""
    if global_batches:

        def put(x, sharding):
            x = np.asarray(x)
            return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

        return jax.tree.map(put, dict(batch), shardings)
    return jax.tree.map(
        lambda x, s: jax.make_array_from_process_local_data(s, np.asarray(x)),
        dict(batch),
        shardings,
    )


def _nonfinite_message(
    step: int, metrics: Mapping, health: Mapping, leaf_names: list[str], ckpts: TrainCheckpoints
) -> str:
    loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
    flags = np.asarray(jax.device_get(health["grads_finite"]))
    bad = [leaf_names[i] for i in np.flatnonzero(~flags)]
    if bad:
        culprit = f"first non-finite gradient: {bad[0]}"
        if len(bad) > 1:
            culprit += f" (and {len(bad) - 1} more of {len(leaf_names)} parameter arrays)"
    elif not np.isfinite(loss):
        culprit = "every gradient is finite: the loss alone is non-finite"
    else:
        culprit = "every gradient is finite, but their global norm overflows"
    try:
        ckpts.wait()  # so that the step reported below is one that is complete on disk
        latest = ckpts.latest_step()
    except UserError:
        latest = None
    kept = (
        f"the last good checkpoint is step {latest} in {ckpts.directory}"
        if latest is not None
        else "no checkpoint was written yet"
    )
    return (
        f"non-finite training step {step}: loss {loss}, gradient norm {grad_norm}; {culprit}. "
        f"Nothing of this step was saved; {kept}. Set train.skip_nonfinite=True to skip such "
        "batches instead."
    )


def _window_state(window: list[Mapping]) -> list[dict]:
    """The metrics of the steps since the last log line, for the checkpoint: a run resumed
    between two log lines then averages the same steps (in the same dtype) as one never
    stopped, and its metrics file reads the same."""
    return [
        {k: [float(v), np.asarray(v).dtype.name] for k, v in row.items()}
        for row in jax.device_get(window)
    ]


def _restore_window(saved: list) -> list[dict]:
    return [{k: np.asarray(v, dtype) for k, (v, dtype) in row.items()} for row in saved]


def _intact_latest(
    ckpts: TrainCheckpoints, shapes: PyTree, where: str, on_corrupt: str, below: int | None = None
) -> int | None:
    """The newest step (below `below`) whose parameter tree can be read and matches the model.
    A step whose metadata is unreadable is an error, or with on_corrupt='fallback' is moved aside
    with a warning and the next older one is tried. A tree of another model is always an error."""
    for step in reversed(ckpts.all_steps()):
        if below is not None and step >= below:
            continue
        try:
            saved = ckpts.saved_params_shapes(step)
        except CorruptCheckpointError as e:
            _fall_back_or_raise(ckpts, step, e, on_corrupt)
            continue
        check_same_structure(shapes, saved, where=where)
        return step
    return None


def _check_same_trainable(ckpts: TrainCheckpoints, step: int, trainable: Trainable) -> None:
    """A checkpoint's optimizer state has one tree per choice of trained parameters: resuming
    with another choice is a clear error rather than a failed (or 'corrupt') restore."""
    try:
        saved = load_metadata(ckpts.step_dir(step)).get("trainable")
    except UserError:
        return  # unreadable metadata: the restore reports it (and may fall back)
    before = Trainable(**{k: saved.get(k) for k in ("last_layers", "pattern")}) if saved else None
    before = before or Trainable()
    if before != trainable:

        def show(t: Trainable) -> str:
            if t.everything:
                return "every parameter trained"
            return (
                f"train.trainable_last_layers={t.last_layers}, "
                f"train.trainable_pattern={t.pattern!r}"
            )

        raise UserError(
            f"{ckpts.step_dir(step)} was written with {show(before)}, this run has "
            f"{show(trainable)}; use the same setting to resume, or a fresh workdir"
        )


def _fall_back_or_raise(
    ckpts: TrainCheckpoints, step: int, error: CorruptCheckpointError, on_corrupt: str
) -> None:
    older = [s for s in ckpts.all_steps() if s < step]
    if on_corrupt != "fallback":
        hint = (
            f" An older checkpoint exists (step {older[-1]}): set "
            "train.on_corrupt_checkpoint='fallback' to resume from it."
            if older
            else ""
        )
        raise CorruptCheckpointError(f"{error}.{hint}") from None
    moved = ckpts.quarantine(step)
    warnings.warn(
        f"train: checkpoint step {step} is unreadable and was skipped ({error}); moved to {moved}; "
        + (f"falling back to step {older[-1]}" if older else "no older checkpoint is left"),
        RuntimeWarning,
        stacklevel=3,
    )


@gin.configurable(
    allowlist=[
        "num_steps",
        "accum_steps",
        "checkpoint_every",
        "max_to_keep",
        "eval_every",
        "log_every",
        "seed",
        "progress",
        "skip_nonfinite",
        "on_corrupt_checkpoint",
        "trainable_last_layers",
        "trainable_pattern",
    ]
)
def train(
    loss_fn: LossFn,
    batches: StatefulIterator,
    *,
    workdir: str | os.PathLike,
    param_axes: PyTree,
    init_fn: Callable[[jax.Array], PyTree] | None = None,
    init_params: PyTree | None = None,
    aux: PyTree = None,
    aux_update: Callable[[PyTree, PyTree], PyTree] | None = None,
    optimizer: tuple[optax.GradientTransformation, optax.Schedule] | None = None,
    eval_fn: Callable[[PyTree], Mapping[str, float]] | None = None,
    meta: Mapping | None = None,
    mesh: Mesh | None = None,
    rules: Any = None,
    num_steps: int = 100,
    accum_steps: int = 1,
    checkpoint_every: int = 50,
    max_to_keep: int | None = 3,
    eval_every: int = 0,
    log_every: int = 10,
    seed: int = 0,
    progress: bool = True,
    skip_nonfinite: bool = False,
    on_corrupt_checkpoint: str = "error",
    trainable_last_layers: int | None = None,
    trainable_pattern: str | None = None,
    on_step: Callable[[int, PyTree], None] | None = None,
    description: str = "train",
    global_batches: bool = False,
) -> TrainResult:
    """Trains `params` to minimise `loss_fn` for `num_steps`, resuming from the workdir's latest
    checkpoint when there is one. Exactly one of `init_fn` (fresh parameters from a key, created
    directly with their shardings) and `init_params` (e.g. loaded from a checkpoint) is given.

    `aux` is passed to `loss_fn` unchanged (frozen inputs: a reward model, a reference policy);
    with `aux_update` it becomes trained state instead (see `make_train_step`). `optimizer`
    replaces the gin-configured `make_optimizer` (e.g. one vmapped over ensemble members).

    A step with a non-finite loss or gradient stops the run (NonFiniteError naming the step and
    the first non-finite gradient; nothing of that step is saved), or with `skip_nonfinite` is
    skipped: its update is not applied and the `skipped_steps` metric counts it.
    `on_corrupt_checkpoint`: what to do when the latest checkpoint cannot be read back intact:
    'error' (stop, the default) or 'fallback' (move it to `corrupt_checkpoints/`, warn, and resume
    from the newest intact one).

    `batches` yields each process's slice of every global batch, or with `global_batches` the
    whole global batch on every process (the same on all of them: an iterator seeded alike).

    `trainable_last_layers` / `trainable_pattern` train only some parameters (see `Trainable`):
    the optimizer, whichever it is (`optimizer` included: e.g. the vmapped reward members'), is
    wrapped by `partly_frozen`, and the frozen leaves' gradients are stopped. A checkpoint
    written with another choice cannot be resumed (its optimizer state has another shape)."""
    if (init_fn is None) == (init_params is None):
        raise ValueError("train: give exactly one of init_fn and init_params")
    for name, value in (("num_steps", num_steps), ("accum_steps", accum_steps)):
        if value < 1:
            raise UserError(f"train.{name} must be >= 1, got {value}")
    if on_corrupt_checkpoint not in ON_CORRUPT:
        raise UserError(
            f"train.on_corrupt_checkpoint={on_corrupt_checkpoint!r}; choose from {list(ON_CORRUPT)}"
        )
    workdir = Path(workdir)
    mesh = mesh or shd.make_mesh()
    rules = rules or shd.logical_rules()
    tx, sched = optimizer if optimizer is not None else make_optimizer(num_steps)

    init_rng, state_rng = jax.random.split(jax.random.PRNGKey(seed))
    shapes = jax.eval_shape(init_fn, init_rng) if init_fn is not None else init_params
    param_shardings = shd.tree_shardings(param_axes, shapes, mesh, rules)
    trainable = Trainable(trainable_last_layers, trainable_pattern)
    mask = None if trainable.everything else trainable.mask(shapes)
    if mask is not None:
        tx = partly_frozen(tx, mask)
        loss_fn = stop_frozen_gradients(loss_fn, mask)

    ckpts = TrainCheckpoints(workdir, every=checkpoint_every, max_to_keep=max_to_keep, writer=True)
    # Before any array is created: a workdir of another model stops here, untouched.
    latest = _intact_latest(ckpts, shapes, str(workdir), on_corrupt_checkpoint)
    if latest is not None:
        _check_same_trainable(ckpts, latest, trainable)

    with jax.set_mesh(mesh):
        if init_fn is not None:
            params = jax.jit(init_fn, out_shardings=param_shardings)(init_rng)
        else:
            # Copied: the state is donated every step, and the caller may still hold (or have
            # put in `aux`) the very buffers it passed.
            params = jax.device_put(init_params, param_shardings)
            params = jax.jit(lambda t: jax.tree.map(jnp.copy, t), out_shardings=param_shardings)(
                params
            )
        opt_state = jax.jit(tx.init)(params)
    repl = shd.replicated(mesh)
    state = {
        "step": jax.device_put(jnp.zeros((), jnp.int32), repl),
        "params": params,
        "opt_state": opt_state,
        "rng": jax.device_put(state_rng, repl),
    }
    if aux_update is not None:
        # Arrays already placed on this mesh keep their sharding; others are replicated.
        # The state is donated every step: copy so the caller's arrays (often the very
        # buffers of the initial parameters, for an anchor) stay valid.
        placed = jax.tree.map(
            lambda x: (
                x
                if getattr(getattr(x, "sharding", None), "mesh", None) == mesh
                else jax.device_put(x, repl)
            ),
            aux,
        )
        state["aux"] = jax.jit(lambda t: jax.tree.map(jnp.copy, t))(placed)
    train_keys = ("step", "opt_state", "rng") + (("aux",) if aux_update is not None else ())
    state_shardings = jax.tree.map(lambda x: x.sharding, state)

    start = 0
    skipped: list[int] = []
    num_skipped = 0
    window: list[dict] = []  # metrics of the steps since the last log line
    abstract = _abstract(state)
    while latest is not None:
        try:
            restored = ckpts.restore(
                latest,
                params=abstract["params"],
                train={k: abstract[k] for k in train_keys},
            )
        except CorruptCheckpointError as e:
            _fall_back_or_raise(ckpts, latest, e, on_corrupt_checkpoint)
            latest = _intact_latest(ckpts, shapes, str(workdir), on_corrupt_checkpoint, latest)
            continue
        state = {"params": restored["params"], **restored["train"]}
        batches.set_state(restored["data"])
        start = int(state["step"])
        skipped = list(restored["meta"].get("skipped_at", []))
        num_skipped = int(restored["meta"].get("skipped_steps", 0))
        window = _restore_window(restored["meta"].get("log_window", []))
        break
    if latest is None and ckpts.all_steps():
        raise CorruptCheckpointError(
            f"{ckpts.directory}: no intact checkpoint left (the unreadable ones were moved to "
            f"{workdir / 'corrupt_checkpoints'}); remove {ckpts.directory} to start over"
        )

    workdir.mkdir(parents=True, exist_ok=True)
    lead = jax.process_index() == 0  # one process writes the run's side files
    if lead:
        (workdir / "operative_config.gin").write_text(gin.config_str())
    writer = MetricsWriter(workdir, start_step=start, enabled=lead)
    step_fn = jax.jit(
        make_train_step(loss_fn, tx, sched, accum_steps, aux_update, skip_nonfinite),
        in_shardings=(state_shardings, None, None),
        out_shardings=(state_shardings, repl, repl),
        donate_argnums=(0,),
    )
    leaf_names = [
        jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(shapes)[0]
    ]
    meta = {"description": description, "gin": gin.config_str(), **(meta or {})}
    if mask is not None:
        sizes = [int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)]
        flags = jax.tree.leaves(mask)
        meta["trainable"] = {
            **trainable.to_dict(),
            "trained_parameters": sum(n for n, t in zip(sizes, flags) if t),
            "total_parameters": sum(sizes),
        }
    batch_shardings = None
    bar = tqdm(
        total=num_steps, initial=start, desc=description, disable=not progress, dynamic_ncols=True
    )
    try:
        for step in range(start + 1, num_steps + 1):
            batch = next(batches)
            if batch_shardings is None:
                size = len(next(iter(batch.values())))
                shd.check_batch_divisible(size, mesh, rules, "batch size")
                if size % accum_steps:
                    raise UserError(
                        f"batch size {size} is not divisible by train.accum_steps={accum_steps}"
                    )
                shd.check_batch_divisible(size // accum_steps, mesh, rules, "micro-batch size")
                batch_shardings = shd.batch_shardings(batch, mesh, rules)
            with jax.set_mesh(mesh):
                state, metrics, health = step_fn(
                    state,
                    _put_batch(batch, batch_shardings, global_batches),
                    None if aux_update else aux,
                )
            if bool(health["finite"]):
                window.append(metrics)
            elif skip_nonfinite:
                num_skipped += 1
                skipped = [*skipped, step][-_SKIPPED_LISTED:]
                warnings.warn(
                    f"train: step {step} has a non-finite loss or gradient; its update was "
                    f"skipped ({num_skipped} skipped so far)",
                    RuntimeWarning,
                    stacklevel=2,
                )
            else:
                raise NonFiniteError(_nonfinite_message(step, metrics, health, leaf_names, ckpts))
            if on_step is not None:
                on_step(step, state["params"])
            if step % log_every == 0 or step == num_steps:
                host = jax.device_get(window)
                row = {k: float(np.mean([m[k] for m in host])) for k in host[0]} if host else {}
                if skip_nonfinite:
                    row["skipped_steps"] = num_skipped
                window = []
                writer.write(step, row)
                if "loss" in row:
                    bar.set_postfix(loss=f"{row['loss']:.4f}")
            if eval_fn is not None and (
                (eval_every and step % eval_every == 0) or step == num_steps
            ):
                writer.write(step, {f"eval/{k}": v for k, v in eval_fn(state["params"]).items()})
            force = step == num_steps
            if force or ckpts.will_save(step):
                extra = {"log_window": _window_state(window)} if window else {}
                if skip_nonfinite or num_skipped:
                    extra.update(skipped_steps=num_skipped, skipped_at=skipped)
                ckpts.save(
                    step,
                    params=state["params"],
                    train={k: state[k] for k in train_keys},
                    data_state=batches.get_state(),
                    meta={**meta, "step": step, **extra},
                    force=force,
                )
            bar.update(1)
        ckpts.wait()
    finally:
        bar.close()
        writer.close()
        ckpts.close()
    if lead:
        (workdir / "operative_config.gin").write_text(
            gin.operative_config_str() or gin.config_str()
        )
        plot_curves(workdir / "metrics.jsonl", workdir / "loss.png", title=description)
    return TrainResult(
        params=state["params"],
        step=int(state["step"]),
        history=read_jsonl(workdir / "metrics.jsonl"),
        workdir=workdir,
        resumed_from=latest,
        aux=state.get("aux", aux),
    )


class ArrayBatches(Iterator):
    """Batches drawn from in-memory arrays with a seeded per-epoch permutation; its state is the
    number of batches served, so resuming continues the exact same order. (The data layer's
    grain pipelines provide the same protocol for datasets on disk.)"""

    def __init__(self, arrays: Mapping[str, np.ndarray], batch_size: int, seed: int = 0):
        self.arrays = {k: np.asarray(v) for k, v in arrays.items()}
        sizes = {len(v) for v in self.arrays.values()}
        if len(sizes) != 1:
            raise ValueError(
                f"arrays have different lengths: { {k: len(v) for k, v in arrays.items()} }"
            )
        self.n = sizes.pop()
        if batch_size > self.n:
            raise UserError(f"batch size {batch_size} exceeds the {self.n} examples available")
        self.batch_size, self.seed, self.served = batch_size, seed, 0

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def __next__(self) -> dict[str, np.ndarray]:
        per_epoch = self.n // self.batch_size
        epoch, i = divmod(self.served, per_epoch)
        idx = self._order(epoch)[i * self.batch_size : (i + 1) * self.batch_size]
        self.served += 1
        return {k: v[idx] for k, v in self.arrays.items()}

    def get_state(self) -> dict:
        return {"served": self.served, "seed": self.seed}

    def set_state(self, state: Mapping) -> None:
        self.served = int(state["served"])


def save_json(path: str | os.PathLike, obj: Any) -> None:
    """Writes JSON atomically (temp file, then rename)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, p)
