"""Orbax checkpoint layout, shared by training, merging and evaluation.

Two kinds of directory hold model weights, and every loader here accepts either:

* a *training checkpoint*: `WORKDIR/checkpoints/<step>/` written by `CheckpointManager`, with
  items `params` (the parameter pytree), `train` (optimizer state, RNG, step), `data` (the data
  iterator position, JSON) and `meta` (model config, operative gin config, JSON);
* a *params checkpoint*: `DIR/params/` (an Orbax pytree) plus `DIR/warm_jax.json` (metadata),
  which is what merges, exports and `save_params` write.

Pointing a loader at a training workdir picks its latest step.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from warm_jax.errors import UserError

PARAMS_ITEM = "params"
META_FILE = "warm_jax.json"
CHECKPOINTS_DIR = "checkpoints"


def _is_orbax_tree(path: Path) -> bool:
    return path.is_dir() and (path / "_METADATA").exists()


def _step_dirs(checkpoints: Path) -> list[Path]:
    """Finished step directories (Orbax renames a step into place only once it is complete)."""
    if not checkpoints.is_dir():
        return []
    steps = [p for p in checkpoints.iterdir() if p.is_dir() and p.name.isdigit()]
    return sorted(steps, key=lambda p: int(p.name))


def resolve_params_dir(path: str | os.PathLike) -> Path:
    """The Orbax params tree inside a params checkpoint, a training step, or a training workdir."""
    p = Path(path).absolute()  # Orbax refuses relative paths
    if not p.exists():
        raise UserError(f"checkpoint not found: {p}")
    if _is_orbax_tree(p):
        return p
    if _is_orbax_tree(p / PARAMS_ITEM):
        return p / PARAMS_ITEM
    steps = _step_dirs(p / CHECKPOINTS_DIR)
    if steps and _is_orbax_tree(steps[-1] / PARAMS_ITEM):
        return steps[-1] / PARAMS_ITEM
    raise UserError(
        f"{p} holds no model weights: expected an Orbax params tree, a directory with "
        f"'{PARAMS_ITEM}/', or a training workdir with '{CHECKPOINTS_DIR}/<step>/{PARAMS_ITEM}/'"
    )


def params_shapes(path: str | os.PathLike) -> Any:
    """The saved parameter tree as `jax.ShapeDtypeStruct` leaves, without reading any weights."""
    params_dir = resolve_params_dir(path)
    try:
        meta = ocp.StandardCheckpointer().metadata(params_dir)
    except Exception as e:  # Orbax raises many types on a damaged checkpoint.
        raise UserError(f"unreadable checkpoint metadata in {params_dir}: {e}") from None
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    return jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(tuple(m.shape), np.dtype(m.dtype)),
        tree,
        is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"),
    )


def check_same_structure(expected: Any, found: Any, *, where: str) -> None:
    """Raises a UserError naming the first path where two trees differ in structure/shape/dtype."""
    exp = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
    got = dict(jax.tree_util.tree_flatten_with_path(found)[0])
    exp_keys = {jax.tree_util.keystr(k): v for k, v in exp.items()}
    got_keys = {jax.tree_util.keystr(k): v for k, v in got.items()}
    missing = sorted(set(exp_keys) - set(got_keys))
    extra = sorted(set(got_keys) - set(exp_keys))
    if missing or extra:
        raise UserError(
            f"{where}: parameter tree differs from the model's: "
            + (f"missing {missing[:3]}" if missing else "")
            + (" " if missing and extra else "")
            + (f"unexpected {extra[:3]}" if extra else "")
        )
    for key, e in exp_keys.items():
        g = got_keys[key]
        if tuple(e.shape) != tuple(g.shape):
            raise UserError(
                f"{where}: parameter {key} has shape {tuple(g.shape)} but the model expects "
                f"{tuple(e.shape)} (a checkpoint of another model size?)"
            )


def load_params(path: str | os.PathLike, target: Any | None = None) -> Any:
    """Loads parameters; with `target` (a tree of ShapeDtypeStruct, optionally with shardings)
    the shapes are checked first and the arrays are placed with the target's shardings."""
    params_dir = resolve_params_dir(path)
    if target is None:
        target = params_shapes(params_dir)
    else:
        check_same_structure(target, params_shapes(params_dir), where=str(params_dir))
    try:
        return ocp.StandardCheckpointer().restore(params_dir, target)
    except Exception as e:
        raise UserError(f"cannot restore parameters from {params_dir}: {e}") from None


def load_metadata(path: str | os.PathLike) -> dict:
    """The JSON metadata saved with a params checkpoint or a training step ({} if none)."""
    p = Path(path)
    params_dir = resolve_params_dir(p)
    root = params_dir.parent
    for candidate in (root / META_FILE, root / "meta" / "metadata"):
        if candidate.is_file():
            try:
                return json.loads(candidate.read_text())
            except json.JSONDecodeError as e:
                raise UserError(f"corrupt metadata file {candidate}: {e}") from None
    return {}


def atomic_directory(final: Path) -> Path:
    """A fresh temporary directory beside `final`, to be renamed onto it once complete."""
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))


def commit_directory(tmp: Path, final: Path) -> None:
    """Replaces `final` by `tmp`; the old copy is removed only once the new one is in place."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_params(directory: str | os.PathLike, params: Any, metadata: Mapping | None = None) -> Path:
    """Writes a params checkpoint; nothing appears at `directory` until it is complete."""
    final = Path(directory).absolute()
    tmp = atomic_directory(final)
    try:
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(tmp / PARAMS_ITEM, params)
        ckptr.wait_until_finished()
        (tmp / META_FILE).write_text(json.dumps(dict(metadata or {}), indent=2, default=str))
        commit_directory(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


class TrainCheckpoints:
    """The Orbax CheckpointManager of one training run: params, optimizer state + RNG + step,
    data-iterator position and metadata, saved asynchronously every `every` steps."""

    def __init__(self, workdir: str | os.PathLike, *, every: int, max_to_keep: int | None = 3):
        self.directory = Path(workdir).absolute() / CHECKPOINTS_DIR
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                save_interval_steps=max(1, every),
                max_to_keep=max_to_keep,
                enable_async_checkpointing=True,
            ),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def saved_params_shapes(self, step: int) -> Any:
        return params_shapes(self.directory / str(step) / PARAMS_ITEM)

    def save(
        self,
        step: int,
        *,
        params: Any,
        train: Any,
        data_state: Mapping,
        meta: Mapping,
        force: bool = False,
    ) -> bool:
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(params),
                train=ocp.args.StandardSave(train),
                data=ocp.args.JsonSave(dict(data_state)),
                meta=ocp.args.JsonSave(json.loads(json.dumps(dict(meta), default=str))),
            ),
            force=force,
        )

    def restore(self, step: int, *, params: Any, train: Any) -> dict:
        """Restores onto the abstract trees given (shapes checked first, shardings applied)."""
        check_same_structure(
            params, self.saved_params_shapes(step), where=str(self.directory / str(step))
        )
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(params),
                train=ocp.args.StandardRestore(train),
                data=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return {k: restored[k] for k in ("params", "train", "data", "meta")}

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
