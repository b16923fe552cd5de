"""Orbax checkpoint layout, shared by training, merging and evaluation.

Two kinds of directory hold model weights, and every loader here accepts either:

* a *training checkpoint*: `WORKDIR/checkpoints/<step>/` written by `CheckpointManager`, with
  items `params` (the parameter pytree), `train` (optimizer state, RNG, step), `data` (the data
  iterator position, JSON) and `meta` (model config, operative gin config, JSON);
* a *params checkpoint*: `DIR/params/` (an Orbax pytree) plus `DIR/warm_jax.json` (metadata),
  which is what merges, exports and `save_params` write.

Pointing a loader at a training workdir picks its latest step.

Both kinds also record a *fingerprint* of every array (`params/fingerprints.json`, written once
Orbax has finished that directory, or a `fingerprints` item of a training step), checked whenever
the arrays are read back: Orbax stores array data without checksums, so a flipped bit in a data
file would otherwise load as silently different weights. Checkpoints written before fingerprints
existed load unchecked. Params checkpoints also record their tree's shapes and dtypes
(`params/shapes.json`), which loaders read instead of asking Orbax to open every array.

Params checkpoints store their arrays uncompressed (`save_params(..., compress=False)`): they are
what merges and evaluations read, often many at once, and model weights barely compress (a
SmolLM2-135M-shaped bfloat16 model: 201 MB with zstd, 257 MB without) while decompressing was
half of a merge's reading time (Orbax restore of that model: 0.68 s compressed, 0.33 s not).
Compressed ones, as earlier versions wrote, load the same way (each array's codec is recorded with
it). Training checkpoints keep Orbax's default (compressed).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from warm_jax.errors import UserError

PARAMS_ITEM = "params"
META_FILE = "warm_jax.json"
CHECKPOINTS_DIR = "checkpoints"
FINGERPRINTS_FILE = "fingerprints.json"  # inside params/ in a params checkpoint
SHAPES_FILE = "shapes.json"  # inside params/ in a params checkpoint (nested-dict trees)
FINGERPRINTS_ITEM = "fingerprints"  # an item of a training step
QUARANTINE_DIR = "corrupt_checkpoints"  # where unreadable training steps are moved aside
ORBAX_TMP_MARK = ".orbax-checkpoint-tmp"


class CorruptCheckpointError(UserError):
    """A checkpoint that exists but cannot be trusted: unreadable metadata, data files that fail to
    decode, or arrays that differ from the fingerprints written with them."""


# --------------------------------------------------------------------------------------------
# Fingerprints: sum over elements of (raw bits x (2 i + 1)) mod 2**32, per array. The odd weights
# make every single-bit flip change the sum; position weighting catches swapped blocks. It is
# computed on the devices holding the arrays (one reduction per leaf, replicated result), so it
# costs no host transfer and works for arrays sharded over several processes.


def _unsigned_bits(x: jax.Array) -> jax.Array:
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


@jax.jit
def _device_fingerprint(x: jax.Array) -> jax.Array:
    """One array's fingerprint, on the devices holding it (jitted per shape and dtype: a tree
    has few distinct ones, so this traces far less than one program over the whole tree)."""
    bits = _unsigned_bits(x).reshape(-1)
    weights = jax.lax.iota(jnp.uint32, bits.size) * jnp.uint32(2) + jnp.uint32(1)
    return jnp.sum(bits * weights, dtype=jnp.uint32)


_HOST_WIDTH = 1024


@functools.cache
def _host_weights(width: int) -> np.ndarray:
    return (np.arange(width, dtype=np.uint32) << np.uint32(1)) | np.uint32(1)


def _host_fingerprint(x: np.ndarray, width: int = _HOST_WIDTH) -> int:
    """The same sum on the host. All arithmetic is modulo 2**32, and numpy's uint32 sums and dot
    products wrap the same way. Laid out as rows of `width` (i = r·width + k), the bulk is

        sum_i bits_i (2 i + 1) = 2·width·sum_r r·rowsum_r + sum_k (2 k + 1)·colsum_k,

    two plain reductions over the data (vectorised, no per-element products or widened
    copies: about twice as fast as one weighted dot product per element); the ragged end, at
    offset s, adds sum_i bits_i (2 i + 1) + 2 s sum_i bits_i."""
    x = np.ascontiguousarray(x)
    if x.dtype == np.bool_:
        bits = x.reshape(-1).view(np.uint8)
    else:
        unsigned = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint32}[x.dtype.itemsize]
        bits = x.reshape(-1).view(unsigned)
    weights = _host_weights(width)
    bulk = bits.size - bits.size % width
    total = 0
    if bulk:
        rows = bits[:bulk].reshape(-1, width)
        row_sums = rows.sum(axis=1, dtype=np.uint32)
        total += 2 * width * int(np.dot(np.arange(row_sums.size, dtype=np.uint32), row_sums))
        total += int(np.dot(rows.sum(axis=0, dtype=np.uint32), weights))
    if bulk < bits.size:
        tail = bits[bulk:].astype(np.uint32)
        total += int(np.dot(tail, weights[: tail.size]))
        total += 2 * bulk * int(tail.sum(dtype=np.uint32))
    return total & 0xFFFFFFFF


def _on_host(x: Any) -> bool:
    """Numpy arrays, and jax.Arrays on one CPU device (numpy views them without a copy)."""
    if not isinstance(x, jax.Array):
        return True
    devices = x.sharding.device_set
    return len(devices) == 1 and next(iter(devices)).platform == "cpu"


def _fingerprint_values(leaves: list[Any]) -> list[str]:
    # On the host, numpy's reductions beat XLA:CPU's (which also traces a program per shape).
    values = [
        _host_fingerprint(np.asarray(x)) if _on_host(x) else _device_fingerprint(x) for x in leaves
    ]
    values = jax.device_get(values)
    return [f"{int(v):08x}:{_dtype_name(x)}" for v, x in zip(values, leaves)]


def _dtype_name(x: Any) -> str:
    return np.dtype(x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype).name


def fingerprints(tree: Any) -> dict[str, str]:
    """`{key path: "<8 hex digits>:<dtype>"}` for every array of `tree` (numpy or jax)."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    values = _fingerprint_values([x for _, x in flat])
    return {jax.tree_util.keystr(k): v for (k, _), v in zip(flat, values)}


def verify_fingerprints(tree: Any, expected: Mapping[str, str] | None, where: str) -> None:
    """Raises CorruptCheckpointError naming the first array of `tree` whose fingerprint differs
    from the one saved. Arrays read back in another dtype than saved (a cast) are not checked."""
    if not expected:
        return
    checked = []
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        key = jax.tree_util.keystr(path)
        saved = expected.get(key)
        if saved is not None and not isinstance(saved, str):
            raise CorruptCheckpointError(f"{where}: corrupt fingerprint of array {key}")
        if saved is not None and saved.partition(":")[2] == _dtype_name(x):
            checked.append((key, x, saved))
    found = _fingerprint_values([x for _, x, _ in checked])
    for (key, _, saved), got in zip(checked, found):
        if got != saved:
            raise CorruptCheckpointError(
                f"{where}: array {key} does not match the fingerprint written with it "
                f"(saved {saved}, read {got}): a data file of this checkpoint is damaged"
            )


def _read_fingerprint_file(path: Path) -> dict:
    try:
        saved = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCheckpointError(f"corrupt fingerprint file {path}: {e}") from None
    if not isinstance(saved, dict):
        raise CorruptCheckpointError(f"corrupt fingerprint file {path}: not a JSON object")
    return saved


def saved_fingerprints(params_dir: Path) -> dict[str, str] | None:
    """The fingerprints saved for the Orbax tree at `params_dir` (a params checkpoint's
    `params/`, or the `params` item of a training step), or None if none were."""
    own = params_dir / FINGERPRINTS_FILE
    if own.is_file():
        return _read_fingerprint_file(own)
    item = params_dir.parent / FINGERPRINTS_ITEM / "metadata"
    if item.is_file():
        saved = _read_fingerprint_file(item).get(params_dir.name)
        if saved is not None and not isinstance(saved, dict):
            raise CorruptCheckpointError(f"corrupt fingerprint file {item}")
        return saved
    return None


# --------------------------------------------------------------------------------------------
# Disk-full errors: Orbax reports them as OSError(ENOSPC) from Python writes or as a tensorstore
# ValueError carrying the OS error code in its message.

_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_DISK_FULL_TEXT = ("no space left on device", "disk quota exceeded", "file too large")


def is_disk_full(e: BaseException) -> bool:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _DISK_FULL_ERRNOS:
            return True
        text = str(e).lower()
        if any(t in text for t in _DISK_FULL_TEXT) or "os_error_code='28'" in text:
            return True
        e = e.__cause__ or e.__context__
    return False


def _free_space(path: Path) -> str:
    for p in (path, *path.parents):
        if p.exists():
            try:
                return f"{shutil.disk_usage(p).free / 2**20:.1f} MiB free on that filesystem"
            except OSError:
                break
    return "free space unknown"


def _settle_orbax_writers(timeout: float = 30.0) -> None:
    """Waits (boundedly) for the writer threads of a failed Orbax save. `wait_until_finished`
    returns once the save has failed, while its other writer threads may still be adding files
    to the temporary directory for a moment; removing it before they end races them."""
    try:
        from orbax.checkpoint._src.futures.future import _SignalingThread
    except ImportError:  # another Orbax layout: nothing to wait for by name
        return
    deadline = time.monotonic() + timeout
    for t in threading.enumerate():
        if isinstance(t, _SignalingThread) and t is not threading.current_thread():
            t.join(max(0.0, deadline - time.monotonic()))


def _remove_unfinished(path: Path, attempts: int = 20) -> None:
    """Removes the temporary directory of a failed save. A writer Orbax does not expose as a
    thread (its asyncio tasks) may still create a file or directory there while it is being
    removed (seen on a loaded machine): try again until it stays gone."""
    for _ in range(attempts):
        shutil.rmtree(path, ignore_errors=True)
        time.sleep(0.05)
        if not path.exists():
            return
        _settle_orbax_writers(timeout=1.0)


# --------------------------------------------------------------------------------------------


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
        old = sorted(p.parent.glob(f".{p.name}.old-*")) if p.parent.is_dir() else []
        if old:
            raise UserError(
                f"checkpoint not found: {p}; an interrupted overwrite left the previous copy at "
                f"{old[-1]} (rename it back to use it)"
            )
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


# Orbax learns a tree's shapes by opening every array's tensorstore (~0.25 s for a 272-array
# SmolLM2-135M tree, paid by every load and by every input of a merge). Params checkpoints
# therefore also record them, for trees of nested string-keyed dicts (what models are), as
# {"leaves": [[[key, ...], [dim, ...], dtype], ...]}; others are read through Orbax.


def _shapes_record(tree: Any) -> dict | None:
    leaves = []
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if not all(isinstance(k, jax.tree_util.DictKey) and isinstance(k.key, str) for k in path):
            return None
        leaves.append([[k.key for k in path], [int(d) for d in np.shape(x)], _dtype_name(x)])
    return {"leaves": leaves}


def _shapes_from_record(path: Path) -> Any:
    def corrupt(why: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"corrupt shapes file {path}: {why}")

    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise corrupt(str(e)) from None
    leaves = record.get("leaves") if isinstance(record, dict) else None
    if not isinstance(leaves, list) or not leaves:
        raise corrupt("no 'leaves' list")
    tree: dict = {}
    for i, leaf in enumerate(leaves):
        try:
            keys, shape, dtype = leaf
            struct = jax.ShapeDtypeStruct(tuple(int(d) for d in shape), jnp.dtype(dtype))
            if not keys or not all(isinstance(k, str) for k in keys):
                raise ValueError("keys must be a non-empty list of strings")
            node = tree
            for k in keys[:-1]:
                node = node.setdefault(k, {})
                if not isinstance(node, dict):
                    raise ValueError(f"{keys} clashes with another entry")
            if keys[-1] in node:
                raise ValueError(f"{keys} clashes with another entry")
            node[keys[-1]] = struct
        except (TypeError, ValueError) as e:
            raise corrupt(f"entry {i}: {e}") from None
    return tree


def params_shapes(path: str | os.PathLike) -> Any:
    """The saved parameter tree as `jax.ShapeDtypeStruct` leaves, without reading any weights."""
    params_dir = resolve_params_dir(path)
    if (params_dir / SHAPES_FILE).is_file():
        return _shapes_from_record(params_dir / SHAPES_FILE)
    try:
        meta = ocp.StandardCheckpointer().metadata(params_dir)
    except Exception as e:  # Orbax raises many types on a damaged checkpoint.
        raise CorruptCheckpointError(
            f"unreadable checkpoint metadata in {params_dir}: {e}"
        ) from None
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    if tree is None:  # Orbax only logs a warning when it cannot read the tree's metadata
        raise CorruptCheckpointError(
            f"unreadable checkpoint metadata in {params_dir} (Orbax could not read its tree)"
        )
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
    expected = saved_fingerprints(params_dir)
    try:
        params = ocp.StandardCheckpointer().restore(params_dir, target)
    except Exception as e:
        raise CorruptCheckpointError(f"cannot restore parameters from {params_dir}: {e}") from None
    verify_fingerprints(params, expected, str(params_dir))
    return params


def load_metadata(path: str | os.PathLike) -> dict:
    """The JSON metadata saved with a params checkpoint or a training step ({} if none)."""
    p = Path(path)
    params_dir = resolve_params_dir(p)
    root = params_dir.parent
    for candidate in (root / META_FILE, root / "meta" / "metadata"):
        if candidate.is_file():
            try:
                meta = json.loads(candidate.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise UserError(f"corrupt metadata file {candidate}: {e}") from None
            if not isinstance(meta, dict):
                raise UserError(f"corrupt metadata file {candidate}: not a JSON object")
            return meta
    return {}


def atomic_directory(final: Path) -> Path:
    """A fresh temporary directory beside `final`, to be renamed onto it once complete."""
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))


@functools.cache
def _renameat2() -> Any:
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not Linux, or glibc < 2.28
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn


def _exchange(a: Path, b: Path) -> bool:
    """Swaps two existing paths in one atomic step (Linux RENAME_EXCHANGE); False where the
    system or filesystem cannot."""
    fn = _renameat2()
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))


def commit_directory(tmp: Path, final: Path) -> None:
    """Replaces `final` by `tmp`. There is no instant without a complete copy at `final`: an
    existing one is swapped atomically with the new one where the OS can (Linux), else moved
    aside, then removed only once the new one is in place."""
    if not final.exists():
        os.replace(tmp, final)
        return
    if _exchange(tmp, final):
        shutil.rmtree(tmp, ignore_errors=True)  # now the old copy
        return
    # Unique: an `.old` copy left by an earlier interrupted commit must not block this one.
    old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
    os.rmdir(old)
    os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        os.replace(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)


@functools.cache
def _params_type_handlers() -> Any:
    """Orbax's type handlers, except that numpy arrays are written without a private copy:
    Orbax copies them in case the caller changes them during an asynchronous save, and
    `save_params` returns only once its save is done (a merged SmolLM2-135M: 0.2 s and 270 MB)."""
    th = ocp.type_handlers
    return th.create_type_handler_registry(
        *[
            (ty, th.NumpyHandler(deepcopy_host_arrays=False))
            if ty is np.ndarray
            else (ty, th.get_type_handler(ty))
            for ty in th.supported_types()
        ]
    )


def _params_checkpointer(compress: bool) -> ocp.AsyncCheckpointer:
    """The Orbax checkpointer of params checkpoints. Orbax's StandardCheckpointer always
    compresses (zstd); the PyTree handler under it takes `use_compression`, and writes the same
    layout (StandardCheckpointer restores it)."""
    return ocp.AsyncCheckpointer(
        ocp.PyTreeCheckpointHandler(
            use_compression=compress, type_handler_registry=_params_type_handlers()
        )
    )


def _shared_temporary_directory(final: Path) -> Path:
    """`atomic_directory` for several JAX processes: process 0 creates it, every process gets
    its name (all of them write their shards into it)."""
    from jax.experimental import multihost_utils

    mine = int.from_bytes(os.urandom(4), "little") >> 1 if jax.process_index() == 0 else 0
    token = int(multihost_utils.broadcast_one_to_all(np.int32(mine)))
    tmp = final.parent / f".{final.name}.tmp-{token:08x}"
    if jax.process_index() == 0:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    ocp.multihost.sync_global_processes("warm_jax_save_params_tmp")
    return tmp


def save_params(
    directory: str | os.PathLike,
    params: Any,
    metadata: Mapping | None = None,
    *,
    compress: bool = False,
    known_fingerprints: Mapping[str, str] | None = None,
) -> Path:
    """Writes a params checkpoint; nothing appears at `directory` until it is complete, and an
    existing checkpoint there stays whole until the new one replaces it.

    Arrays are stored uncompressed unless `compress` (see the module's docstring). With several
    JAX processes every process must call this with the same arguments: each writes its own
    shards, and process 0 alone writes the side files and renames the result into place.
    `known_fingerprints`: `fingerprints(params)`, if the caller already has them."""
    final = Path(directory).absolute()
    primary = jax.process_index() == 0
    multi = jax.process_count() > 1
    tmp = _shared_temporary_directory(final) if multi else atomic_directory(final)
    ckptr = _params_checkpointer(compress)
    try:
        ckptr.save(tmp / PARAMS_ITEM, args=ocp.args.PyTreeSave(params))
        fps = known_fingerprints
        if fps is None:
            fps = fingerprints(params)  # while Orbax writes; a collective for sharded arrays
        ckptr.wait_until_finished()
        if primary:
            (tmp / PARAMS_ITEM / FINGERPRINTS_FILE).write_text(json.dumps(dict(fps)))
            shapes = _shapes_record(params)
            if shapes is not None:
                (tmp / PARAMS_ITEM / SHAPES_FILE).write_text(json.dumps(shapes))
            (tmp / META_FILE).write_text(json.dumps(dict(metadata or {}), indent=2, default=str))
            commit_directory(tmp, final)
        if multi:
            ocp.multihost.sync_global_processes("warm_jax_save_params_commit")
    except BaseException as e:
        # Orbax's writer threads may still be adding files to `tmp`: let them end first, or
        # the removal races them and leaves a partial copy (and its disk space) behind.
        with contextlib.suppress(Exception):
            ckptr.wait_until_finished()
        _settle_orbax_writers()
        if primary:
            _remove_unfinished(tmp)
        if isinstance(e, Exception) and is_disk_full(e):
            raise UserError(
                f"cannot write checkpoint {final}: no space left on device ({_free_space(final)}); "
                f"nothing was written there{' and the existing one is unchanged' if final.exists() else ''}"
            ) from e
        raise
    finally:
        with contextlib.suppress(Exception):  # a failed save was raised above
            ckptr.close()
    return final


class TrainCheckpoints:
    """The Orbax CheckpointManager of one training run: params, optimizer state + RNG + step,
    data-iterator position, metadata and array fingerprints, saved asynchronously every `every`
    steps.

    `writer=True` (the training run itself) removes the unfinished temporary directories a killed
    run left behind; observers that only read (`latest_step`) must not, as those may belong to a
    save still in flight."""

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        every: int,
        max_to_keep: int | None = 3,
        writer: bool = False,
    ):
        self.workdir = Path(workdir).absolute()
        self.directory = self.workdir / CHECKPOINTS_DIR
        self._every, self._max_to_keep = every, max_to_keep
        if writer:
            self._discard_unfinished()
        self.manager = self._manager()
        self._in_flight: int | None = None

    def _manager(self) -> ocp.CheckpointManager:
        return ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                save_interval_steps=max(1, self._every),
                max_to_keep=self._max_to_keep,
                enable_async_checkpointing=True,
            ),
        )

    def _discard_unfinished(self) -> None:
        """Removes the temporary step directories of saves that never finished (a killed run, a
        full disk); finished steps are never touched. (Rather than Orbax's own cleanup, which
        raises if anything is still being written there.)"""
        if jax.process_index() != 0 or not self.directory.is_dir():
            return
        unfinished = [p for p in self.directory.iterdir() if ORBAX_TMP_MARK in p.name]
        if unfinished:
            # A save that failed earlier in this process may still have writer threads adding
            # files there: a plain removal would race them and leave a partial copy behind.
            _settle_orbax_writers()
        for p in unfinished:
            _remove_unfinished(p)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def step_dir(self, step: int) -> Path:
        return self.directory / str(step)

    def saved_params_shapes(self, step: int) -> Any:
        return params_shapes(self.step_dir(step) / PARAMS_ITEM)

    def will_save(self, step: int) -> bool:
        """Whether `save(step)` (without force) writes a checkpoint."""
        return self.manager.should_save(step)

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
        if not (force or self.manager.should_save(step)):
            return False
        fps = {PARAMS_ITEM: fingerprints(params), "train": fingerprints(train)}
        with self._disk_full_as_user_error(current=step):
            saved = self.manager.save(
                step,
                args=ocp.args.Composite(
                    params=ocp.args.StandardSave(params),
                    train=ocp.args.StandardSave(train),
                    data=ocp.args.JsonSave(dict(data_state)),
                    meta=ocp.args.JsonSave(json.loads(json.dumps(dict(meta), default=str))),
                    **{FINGERPRINTS_ITEM: ocp.args.JsonSave(fps)},
                ),
                force=force,
            )
        if saved:
            self._in_flight = step
        return saved

    def restore(self, step: int, *, params: Any, train: Any) -> dict:
        """Restores onto the abstract trees given (shapes checked first, shardings applied) and
        checks the arrays against their fingerprints. A step that exists but cannot be read back
        intact raises CorruptCheckpointError."""
        where = str(self.step_dir(step))
        check_same_structure(params, self.saved_params_shapes(step), where=where)
        has_fps = (self.step_dir(step) / FINGERPRINTS_ITEM).is_dir()
        items = {
            "params": ocp.args.StandardRestore(params),
            "train": ocp.args.StandardRestore(train),
            "data": ocp.args.JsonRestore(),
            "meta": ocp.args.JsonRestore(),
            **({FINGERPRINTS_ITEM: ocp.args.JsonRestore()} if has_fps else {}),
        }
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # Orbax, tensorstore and json raise many types on damaged files
            raise CorruptCheckpointError(
                f"cannot restore checkpoint {where}: {type(e).__name__}: {e}"
            ) from None
        fps = restored[FINGERPRINTS_ITEM] if has_fps else {}
        if not isinstance(fps, dict) or not all(isinstance(v, dict) for v in fps.values()):
            raise CorruptCheckpointError(f"{where}: corrupt fingerprints item")
        for item in ("params", "train"):
            verify_fingerprints(restored[item], fps.get(item), f"{where}/{item}")
        for item in ("data", "meta"):
            if not isinstance(restored[item], dict):
                raise CorruptCheckpointError(f"{where}/{item}: expected a JSON object")
        return {k: restored[k] for k in ("params", "train", "data", "meta")}

    def quarantine(self, step: int) -> Path:
        """Moves an unreadable step out of `checkpoints/` (so that loaders stop picking it and the
        run can write that step again) into `corrupt_checkpoints/`; returns where it went."""
        dest_root = self.workdir / QUARANTINE_DIR
        dest = dest_root / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        if jax.process_index() == 0:  # one mover on a shared filesystem
            dest_root.mkdir(parents=True, exist_ok=True)
            n = 1
            while dest.exists():
                dest = dest_root / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}-{n}"
                n += 1
            os.replace(self.step_dir(step), dest)
        if jax.process_count() > 1:
            ocp.multihost.sync_global_processes("warm_jax_quarantine")
        self.manager.reload()
        return dest

    def wait(self) -> None:
        with self._disk_full_as_user_error():
            self.manager.wait_until_finished()
        self._in_flight = None

    def close(self) -> None:
        try:
            self.wait()
        finally:
            # A failed save was raised by wait() just above; close() would raise it again.
            with contextlib.suppress(Exception):
                self.manager.close()

    @contextlib.contextmanager
    def _disk_full_as_user_error(self, current: int | None = None):
        """Turns a disk-full failure of a (possibly earlier, asynchronous) save into a UserError
        that says which save failed and which complete checkpoint remains."""
        try:
            yield
        except Exception as e:
            if not is_disk_full(e):
                raise
            failed, self._in_flight = self._in_flight, None
            with contextlib.suppress(Exception):
                self.manager.wait_until_finished()
            _settle_orbax_writers()
            self._discard_unfinished()  # its disk space is what the user is short of
            try:
                self.manager.reload()
                finished = set(self.manager.all_steps())
            except Exception:
                finished = set()
            if failed is None or failed in finished:  # the earlier save did complete
                failed = current
            latest = max(finished, default=None)
            kept = (
                f"the last complete checkpoint, step {latest}, is intact"
                if latest is not None
                else "no complete checkpoint exists yet"
            )
            what = f"the checkpoint of step {failed}" if failed is not None else "a checkpoint"
            raise UserError(
                f"no space left on device while writing {what} in {self.directory} "
                f"({_free_space(self.directory)}); {kept}, and the unfinished one was deleted. "
                "Free some space and rerun the same command to resume from it."
            ) from e
