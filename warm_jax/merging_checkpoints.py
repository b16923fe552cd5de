"""Streaming merges of Orbax checkpoints, and the `warm-jax merge` subcommand.

A merge reads its inputs *chunk by chunk*: the parameter tree is cut into chunks of whole layers
(`chunk_mb` of float32 each) and, for each chunk, the inputs are read one after another and
folded into a float32 accumulator with the in-memory functions of `warm_jax.merging`:

* average: the running weighted mean μ ← μ + c_m (θ_m - μ), c_m = w_m / Σ_{j≤m} w_j, up to
           FOLD_MAX inputs per pass over memory (the same bits as one input per pass);
* slerp:   s ← slerp(θ_base, s, θ_m, t = 1/m) (WARP's iterated SLERP; `t` itself when M = 2;
           one angle per layer or per array, so a chunk never splits a layer);
* liti:    the slerp above (or the single input), then (1 - η) θ_base + η s.

Every merge is local to a layer (one SLERP angle per leaf or per layer), so the chunked result
is bit-identical to the in-memory one, and peak memory is the merged model plus a few chunks,
whatever the number of inputs. Arrays are restored with the shardings given, so on a multi-host
job each process reads, merges and writes only its own shards; in one process without
shardings they are read straight through TensorStore (`training.checkpoint_arrays`) into
aligned host buffers, one flat buffer per chunk and dtype, which an average treats as a single
array.

Nothing appears at the output path until the merged checkpoint is complete: inputs are checked
(existence, completeness, same tree / shapes / dtypes) before any weight is read, the merge
happens in memory, and the result is written to a temporary directory renamed into place.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import ctypes
import dataclasses
import datetime
import functools
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from warm_jax import merging as mg
from warm_jax.errors import UserError
from warm_jax.training import checkpoint_arrays as ca
from warm_jax.training import checkpoints as ck

PyTree = Any
METHODS: tuple[str, ...] = ("average", "slerp", "liti")
# Float32 MB of parameters per chunk for SLERP and LITI, whose working set is the base, two float32
# merges and one input (SmolLM2-135M, bfloat16: 64 MB -> ~0.75 GB peak; 256 MB: ~1.05).
DEFAULT_CHUNK_MB = {"slerp": 64, "liti": 64}
# An average merges up to FOLD_MAX inputs per pass over memory; its chunks are sized so that the
# working set (that many inputs, the next one being read, the float32 accumulator when there is
# more than one pass, the merged output) stays about AVERAGE_WORKING_SET_MB whatever the number
# of inputs (SmolLM2-135M, bfloat16: peak RSS 0.8 GB at M = 2, 0.95 GB at M = 8; 512 MB was no
# faster and peaked 0.1 GB higher).
FOLD_MAX = 8
AVERAGE_WORKING_SET_MB = 384


def read_ahead(host: bool) -> int:
    """Reads in flight (one thread each): two for host reads, whose TensorStore copies and
    numpy fingerprints release the GIL; one through Orbax, whose restores from several threads
    at once are not known to be safe; none with several processes, which keep every collective
    call on the main thread."""
    if jax.process_count() > 1:
        return 0
    return 2 if host else 1


def _average_bytes_per_param(fold: int, n_inputs: int, itemsize: int, ahead: int) -> int:
    # `fold` inputs being merged, `ahead` being read, the output, the accumulator between passes.
    return (fold + ahead + 1) * itemsize + (4 if n_inputs > fold else 0)


def default_chunk_mb(method: str, n_inputs: int, itemsize: int, host: bool = True) -> float:
    """Float32 MB of parameters per chunk when none is given (`itemsize`: the inputs' widest)."""
    if method != "average":
        return DEFAULT_CHUNK_MB[method]
    fold = min(n_inputs, FOLD_MAX)
    per_param = _average_bytes_per_param(fold, n_inputs, itemsize, read_ahead(host))
    return AVERAGE_WORKING_SET_MB * 4 / per_param


def fold_sizes(
    chunk_params: Sequence[int], chunk_mb: float, n_inputs: int, itemsize: int, host: bool = True
) -> list[int]:
    """Inputs merged per pass in each chunk of an average: up to FOLD_MAX, fewer in a chunk
    larger than `chunk_mb` (one big array, e.g. an embedding) so that its working set stays
    within what a chunk of `chunk_mb` at the full fold would hold."""
    ahead = read_ahead(host)
    full = min(n_inputs, FOLD_MAX)
    budget = chunk_mb * 2**20 / 4 * _average_bytes_per_param(full, n_inputs, itemsize, ahead)
    folds = []
    for n in chunk_params:
        fold = full
        while fold > 1 and n * _average_bytes_per_param(fold, n_inputs, itemsize, ahead) > budget:
            fold -= 1
        folds.append(fold)
    return folds


# --------------------------------------------------------------------------------------------
# Inputs


@dataclasses.dataclass(frozen=True, eq=False)
class Checkpoint:
    """One merge input: where it was given, the Orbax params tree it resolves to, its shapes."""

    role: str
    given: str
    params_dir: Path
    shapes: PyTree

    @property
    def label(self) -> str:
        return f"{self.role} ({self.given})"

    @functools.cached_property
    def leaves(self) -> list[tuple[mg.KeyPath, jax.ShapeDtypeStruct]]:
        """(key path, shape) of every parameter, in tree order."""
        return list(zip(mg.leaf_paths(self.shapes), jax.tree.leaves(self.shapes)))

    @functools.cached_property
    def fingerprints(self) -> dict[str, str] | None:
        """The array fingerprints saved with it (None for checkpoints written without them)."""
        try:
            return ck.saved_fingerprints(self.params_dir)
        except UserError as e:
            raise UserError(f"{self.label}: {e}") from None


def _check_complete(params_dir: Path, label: str) -> None:
    """Cheap completeness checks that catch interrupted writes and partial copies up front
    (a truncated data file is still only caught when it is read, before any output exists)."""
    if "orbax-checkpoint-tmp" in str(params_dir):
        raise UserError(f"{label}: {params_dir} is an unfinished Orbax temporary directory")
    process_dirs = sorted(params_dir.glob("ocdbt.process_*"))
    if process_dirs and not (params_dir / "manifest.ocdbt").is_file():
        raise UserError(f"{label}: {params_dir} is incomplete (no manifest.ocdbt)")
    for d in process_dirs:
        if not (d / "manifest.ocdbt").is_file() or not (d / "d").is_dir():
            raise UserError(f"{label}: {params_dir} is incomplete ({d.name} has no data)")


def open_checkpoint(path: str | os.PathLike, role: str = "input") -> Checkpoint:
    """Resolves a params checkpoint, training step or training workdir and reads its shapes."""
    try:
        params_dir = ck.resolve_params_dir(path)
        _check_complete(params_dir, f"{role} {path}")
        shapes = ck.params_shapes(params_dir)
    except UserError as e:
        raise UserError(f"{role}: {e}") from None
    if not jax.tree.leaves(shapes):
        raise UserError(f"{role}: {params_dir} holds no arrays")
    return Checkpoint(role, str(path), params_dir.absolute(), shapes)


def check_inputs(checkpoints: Sequence[Checkpoint]) -> None:
    """Every input must have the first one's parameter tree, shapes and dtypes."""
    try:
        mg.check_compatible(*[c.shapes for c in checkpoints], names=[c.label for c in checkpoints])
    except mg.TreeMismatchError as e:
        raise UserError(f"inputs do not match: {e}") from None
    first = checkpoints[0]
    for p, s in zip(mg.leaf_paths(first.shapes), jax.tree.leaves(first.shapes)):
        if not jax.numpy.issubdtype(s.dtype, jax.numpy.floating):
            raise UserError(
                f"{first.label}: parameter {mg.path_str(p)} has dtype {s.dtype}; "
                "only floating-point parameters can be merged"
            )


# --------------------------------------------------------------------------------------------
# Chunked reading


def _all_dict_keys(tree: PyTree) -> bool:
    return all(
        isinstance(k, jax.tree_util.DictKey)
        for kp, _ in jax.tree_util.tree_flatten_with_path(tree)[0]
        for k in kp
    )


def plan_chunks(
    paths: Sequence[mg.KeyPath],
    shapes: Sequence[jax.ShapeDtypeStruct],
    groups: Sequence[str],
    chunk_bytes: int,
) -> list[list[int]]:
    """Leaf indices of each chunk: whole groups packed greedily up to `chunk_bytes` of float32
    (a group larger than that is a chunk of its own), leaves in tree order within a chunk.

    Largest chunk first: the merged output grows as chunks complete, so the biggest working
    set (often the embedding alone) should meet the smallest output."""
    members: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    chunks: list[list[int]] = []
    current: list[int] = []
    size = 0
    for idx in members.values():
        nbytes = sum(4 * int(np.prod(shapes[i].shape)) for i in idx)
        if current and size + nbytes > chunk_bytes:
            chunks.append(sorted(current))
            current, size = [], 0
        current += idx
        size += nbytes
    if current:
        chunks.append(sorted(current))

    def nbytes(chunk: list[int]) -> int:
        return sum(int(np.prod(shapes[i].shape)) for i in chunk)

    return sorted(chunks, key=nbytes, reverse=True)


@functools.cache
def _libc() -> Any:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim, libc.mallopt  # noqa: B018  (glibc only)
        return libc
    except (OSError, AttributeError):
        return None


def _release_free_memory() -> None:
    """Hands freed heap pages back to the OS. Chunks come and go at the same sizes, and without
    this glibc keeps the freed pages of every thread's arena, so the peak RSS creeps up with the
    number of inputs instead of staying flat."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def tune_malloc(arenas: int = 2, mmap_threshold: int = 512 * 2**20) -> None:
    """Process-wide glibc malloc settings for merges (only the CLI calls this): at most
    `arenas` per-thread arenas (M_ARENA_MAX; the reader threads otherwise each keep their own
    fragmented heap), and blocks up to `mmap_threshold` bytes from the heap (M_MMAP_THRESHOLD;
    by default those over 32 MB get fresh pages from mmap, and TensorStore allocates one such
    buffer per large array read: page faults cost ~0.3 s of an 8-input SmolLM2-135M merge)."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(-8, arenas)  # M_ARENA_MAX in glibc's malloc.h
        libc.mallopt(-3, mmap_threshold)  # M_MMAP_THRESHOLD


def _nested_set(tree: dict, path: mg.KeyPath, value: Any) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


@dataclasses.dataclass(frozen=True, eq=False)
class _HostChunk:
    """One input's leaves of a chunk, read into host memory: per dtype, one flat 64-byte-aligned
    buffer holding every leaf of that dtype (`tree` holds views into them), so that XLA:CPU uses
    them in place and an average can treat each buffer as a single array."""

    tree: dict
    flats: dict[str, np.ndarray]
    layout: dict  # {dtype name: (FlatLayout, leaf indices)}, shared by a chunk's inputs
    buffers: list[np.ndarray]  # the pooled memory under `flats`


def _tree(chunk: PyTree | _HostChunk) -> PyTree:
    """The leaves of a read, whichever way it was read."""
    return chunk.tree if isinstance(chunk, _HostChunk) else chunk


class _Reader:
    """Reads a subset of a checkpoint's leaves.

    With `shardings`, or for checkpoints whose layout `checkpoint_arrays` does not read, through a
    partial Orbax restore, as jax.Arrays with those shardings or host numpy arrays. Otherwise
    (one process, no shardings) straight through TensorStore into the flat host buffers of a
    `_HostChunk`: several times less work per read than Orbax's restore."""

    def __init__(self, shardings: Sequence[jax.sharding.Sharding] | None):
        self._ckptr = ocp.PyTreeCheckpointer()
        self._shardings = shardings
        self._files: dict[Path, ca.ArrayFiles | None] = {}
        self.host = True  # cleared by merges whose inputs cannot all be read into host chunks
        self.pool = ca.BufferPool()
        self._lock = threading.Lock()
        self._layouts: dict[tuple[int, ...], dict[str, tuple[ca.FlatLayout, list[int]]]] = {}

    def reads_host(self, ckpt: Checkpoint) -> bool:
        """Whether `ckpt` can be read into host chunks (see the class docstring)."""
        return self._array_files(ckpt) is not None

    def _array_files(self, ckpt: Checkpoint) -> ca.ArrayFiles | None:
        if self._shardings is not None or jax.process_count() > 1 or not self.host:
            return None
        if ckpt.params_dir not in self._files:
            files = ca.ArrayFiles.open(ckpt.params_dir)
            keys = [list(path) for path, _ in ckpt.leaves]
            self._files[ckpt.params_dir] = files if files and all(map(files.has, keys)) else None
        return self._files[ckpt.params_dir]

    def _layout(self, ckpt: Checkpoint, indices: Sequence[int]) -> dict:
        """{dtype name: (flat layout, leaf indices)} of a chunk; the same for every input."""
        key = tuple(indices)
        with self._lock:
            if key not in self._layouts:
                by_dtype: dict[str, list[int]] = {}
                for i in key:
                    by_dtype.setdefault(np.dtype(ckpt.leaves[i][1].dtype).name, []).append(i)
                self._layouts[key] = {
                    name: (ca.FlatLayout([ckpt.leaves[i][1].shape for i in idx], name), idx)
                    for name, idx in by_dtype.items()
                }
            return self._layouts[key]

    def _args(self, i: int, s: jax.ShapeDtypeStruct) -> ocp.RestoreArgs:
        if self._shardings is None:
            return ocp.RestoreArgs(restore_type=np.ndarray, dtype=s.dtype)
        return ocp.ArrayRestoreArgs(
            sharding=self._shardings[i], global_shape=s.shape, dtype=s.dtype
        )

    def _read_orbax(self, ckpt: Checkpoint, indices: Sequence[int], partial: bool) -> PyTree:
        leaves = ckpt.leaves
        if partial:
            item: dict = {}
            restore_args: dict = {}
            for i in indices:
                path, shape = leaves[i]
                _nested_set(item, path, shape)
                _nested_set(restore_args, path, self._args(i, shape))
        else:
            item = ckpt.shapes
            restore_args = jax.tree.unflatten(
                jax.tree.structure(ckpt.shapes),
                [self._args(i, s) for i, (_, s) in enumerate(leaves)],
            )
        return self._ckptr.restore(
            ckpt.params_dir,
            args=ocp.args.PyTreeRestore(
                item=item, restore_args=restore_args, partial_restore=partial
            ),
        )

    def _read_host(
        self, ckpt: Checkpoint, files: ca.ArrayFiles, indices: Sequence[int]
    ) -> _HostChunk:
        tree: dict = {}
        flats, buffers = {}, []
        chunk_layout = self._layout(ckpt, indices)
        for name, (layout, idx) in chunk_layout.items():
            buffers.append(self.pool.take(layout.nbytes))
            flats[name] = layout.empty(buffers[-1])
            views = layout.views(flats[name])
            files.read_into([list(ckpt.leaves[i][0]) for i in idx], views)
            for i, v in zip(idx, views):
                _nested_set(tree, ckpt.leaves[i][0], v)
        return _HostChunk(tree, flats, chunk_layout, buffers)

    def read(self, ckpt: Checkpoint, indices: Sequence[int], partial: bool) -> PyTree | _HostChunk:
        files = self._array_files(ckpt) if partial else None
        try:
            if files is not None:
                out = self._read_host(ckpt, files, indices)
            else:
                out = self._read_orbax(ckpt, indices, partial)
        except Exception as e:  # Orbax/tensorstore raise many types for damaged files.
            first = mg.path_str(ckpt.leaves[indices[0]][0])
            raise UserError(
                f"cannot read {ckpt.label} (parameters from {first}, {len(indices)} arrays) "
                f"in {ckpt.params_dir}: {type(e).__name__}: {e}"
            ) from None
        # Done here, on the prefetch thread, so that it overlaps with the merge kernels.
        ck.verify_fingerprints(_tree(out), ckpt.fingerprints, f"{ckpt.label} in {ckpt.params_dir}")
        return out


class _Prefetcher:
    """Performs a merge's reads in their known order on `ahead` background threads, that many
    reads ahead, so that reading (TensorStore's copies, Orbax's Python-side work, checking
    fingerprints) overlaps with the merge kernels and, with two threads, with itself: a serial
    merge keeps only one of two cores busy. `ahead=0` reads on the calling thread."""

    def __init__(
        self,
        reader: _Reader,
        jobs: Sequence[tuple[Checkpoint, list[int]]],
        partial: bool,
        ahead: int,
    ):
        self._reader, self._jobs, self._partial = reader, list(jobs), partial
        self._next = 0
        self._ahead = ahead
        self._pending: dict[int, concurrent.futures.Future] = {}
        self._pool = (
            concurrent.futures.ThreadPoolExecutor(ahead, thread_name_prefix="warm_jax-merge-read")
            if ahead > 0
            else None
        )

    def _submit(self, k: int) -> None:
        if self._pool is not None and k < len(self._jobs) and k not in self._pending:
            ckpt, indices = self._jobs[k]
            self._pending[k] = self._pool.submit(self._reader.read, ckpt, indices, self._partial)

    def read(self, ckpt: Checkpoint) -> PyTree:
        k = self._next
        self._next += 1
        expected, indices = self._jobs[k]
        if expected is not ckpt:
            raise RuntimeError(f"read order broken: got {ckpt.label}, planned {expected.label}")
        if self._pool is None:
            return self._reader.read(ckpt, indices, self._partial)
        for j in range(k, k + self._ahead + 1):
            self._submit(j)
        return self._pending.pop(k).result()

    def close(self) -> None:
        if self._pool is not None:
            for f in self._pending.values():
                f.cancel()
            self._pool.shutdown(wait=True)
            self._pending.clear()


def fsdp_shardings(shapes: PyTree, mesh: jax.sharding.Mesh | None = None) -> PyTree:
    """A NamedSharding per leaf that splits its largest axis divisible by the device count over
    all devices (replicated if none is), for multi-host merges given no shardings."""
    if mesh is None:
        mesh = jax.make_mesh(
            (jax.device_count(),), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,)
        )
    n = mesh.size

    def one(s: jax.ShapeDtypeStruct) -> jax.sharding.NamedSharding:
        spec: list[str | None] = [None] * len(s.shape)
        for axis in sorted(range(len(s.shape)), key=lambda a: -s.shape[a]):
            if s.shape[axis] % n == 0:
                spec[axis] = "fsdp"
                break
        return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))

    return jax.tree.map(one, shapes)


# --------------------------------------------------------------------------------------------
# The merge


@dataclasses.dataclass(frozen=True)
class MergeSpec:
    """A validated merge request (coefficients as they will be applied)."""

    method: str
    n_inputs: int
    weights: tuple[float, ...] | None  # normalised, for 'average'
    t: float | None  # for slerp/liti with 2 inputs; None means WARP's 1/m rule
    eta: float | None
    granularity: str
    eps: float


def make_spec(
    method: str,
    n_inputs: int,
    *,
    has_base: bool,
    weights: Sequence[float] | None = None,
    t: float | None = None,
    eta: float | None = None,
    granularity: str = "layer",
    eps: float = mg.DEFAULT_SLERP_EPS,
) -> MergeSpec:
    """Checks that the coefficients fit the method; raises UserError otherwise."""
    if method not in METHODS:
        raise UserError(f"unknown merge method {method!r}; choose from {', '.join(METHODS)}")
    if n_inputs < 1:
        raise UserError("no inputs given")
    if granularity not in mg.GRANULARITIES:
        raise UserError(f"granularity {granularity!r}; choose from {', '.join(mg.GRANULARITIES)}")
    for name, value in (("t", t), ("eta", eta)):
        if value is not None and not np.isfinite(value):
            raise UserError(f"--{name} must be a finite number, got {value}")
        # Beyond [0, 1] is extrapolation: with SLERP's sines (or LITI's lerp) the weights grow
        # without bound and can overflow to inf in the written checkpoint.
        if value is not None and not 0.0 <= value <= 1.0:
            raise UserError(f"--{name} must be in [0, 1] (interpolation), got {value}")
    if not (np.isfinite(eps) and eps >= 0):
        raise UserError(f"eps must be a finite number >= 0, got {eps}")
    if method == "average":
        if has_base:
            raise UserError("average takes no --base (it is a plain weighted mean of the inputs)")
        if t is not None or eta is not None:
            raise UserError("average takes --weights, not --t or --eta")
        try:
            given = None if weights is None else np.asarray(weights, np.float64).reshape(-1)
            # Finite weights whose sum overflows: the same proportions, scaled down.
            if given is not None and np.isfinite(given).all() and np.isinf(given.sum()):
                given = given / given.max()
            w = tuple(float(x) for x in mg.normalize_weights(given, n_inputs))
        except (TypeError, ValueError) as e:
            raise UserError(f"--weights: {e}") from None
        return MergeSpec(method, n_inputs, w, None, None, granularity, eps)
    if not has_base:
        raise UserError(f"{method} needs --base: the initialisation the task vectors start from")
    if weights is not None:
        raise UserError(f"{method} takes no --weights (SLERP of M > 2 inputs uses t = 1/m)")
    if t is not None and n_inputs != 2:
        raise UserError(
            f"--t applies to exactly 2 inputs; {n_inputs} inputs are merged with WARP's rule "
            "slerp(slerp(θ1..θ_{M-1}), θ_M, t=1/M)"
        )
    if method == "slerp":
        if n_inputs < 2:
            raise UserError("slerp needs at least 2 inputs")
        if eta is not None:
            raise UserError("slerp takes no --eta (use --method liti)")
        t2 = (0.5 if t is None else t) if n_inputs == 2 else None
        return MergeSpec(method, n_inputs, None, t2, None, granularity, eps)
    if eta is None:
        raise UserError("liti needs --eta: θ = (1 - eta) θ_base + eta θ_merged")
    t2 = (0.5 if t is None else t) if n_inputs == 2 else None
    return MergeSpec(method, n_inputs, None, t2, float(eta), granularity, eps)


def _average_chunk(
    read: Callable[[Checkpoint], PyTree | _HostChunk],
    inputs: Sequence[Checkpoint],
    coefficients: jax.Array,
    fold: int,
    pool: ca.BufferPool,
) -> PyTree:
    """The running mean of one chunk, `fold` inputs per pass over memory."""
    mean = None
    for start in range(0, len(inputs), fold):
        group = [read(c) for c in inputs[start : start + fold]]
        host = all(isinstance(g, _HostChunk) for g in group)
        # Host chunks are averaged as their flat buffers: one kernel per dtype, not per leaf.
        trees = [g.flats for g in group] if host else [_tree(g) for g in group]
        last = start + fold >= len(inputs)
        mean = mg.running_average_fold(
            mean, trees, coefficients[start : start + fold], dtype=trees[0] if last else None
        )
        if host:  # XLA reads the buffers in place: they are free once the fold is done
            jax.block_until_ready(mean)
            pool.give([b for g in group for b in g.buffers])
    if not host:
        return mean
    tree: dict = {}
    for name, (layout, idx) in group[0].layout.items():
        # On the CPU the merged buffer is viewed, not copied; the views keep it alive.
        for i, v in zip(idx, layout.views(np.asarray(mean[name]))):
            _nested_set(tree, inputs[0].leaves[i][0], v)
    return tree


def _merge_chunk(
    spec: MergeSpec,
    read: Callable[[Checkpoint], PyTree | _HostChunk],
    inputs: Sequence[Checkpoint],
    base: Checkpoint | None,
    group_fn: mg.GroupFn | None,
    coefficients: jax.Array | None,
    fold: int,
    pool: ca.BufferPool,
) -> PyTree:
    """Merges one chunk, reading the inputs one after another (an average merges `fold` of them
    per pass)."""
    if spec.method == "average":
        assert coefficients is not None
        return _average_chunk(read, inputs, coefficients, fold, pool)

    assert base is not None
    kw = dict(granularity=spec.granularity, group_fn=group_fn, eps=spec.eps)
    z = _tree(read(base))
    s = _tree(read(inputs[0]))
    if len(inputs) == 2:
        s = mg.slerp(z, s, _tree(read(inputs[1])), spec.t, **kw)
    elif len(inputs) > 2:
        like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), s)
        for m in range(2, len(inputs) + 1):
            # From m = 3 on, s is our own float32 buffer: let each step overwrite it.
            s = mg.slerp_many_step(z, s, _tree(read(inputs[m - 1])), m, donate=m > 2, **kw)
        s = mg.cast_like(s, like)
    if spec.method == "slerp":
        return s
    return mg.liti(z, s, spec.eta)


def merge_streaming(
    spec: MergeSpec,
    inputs: Sequence[Checkpoint],
    base: Checkpoint | None = None,
    *,
    group_fn: mg.GroupFn | None = None,
    shardings: PyTree | None = None,
    chunk_mb: float | None = None,
    progress: bool | None = None,
    on_chunk: Callable[[PyTree], None] | None = None,
) -> PyTree:
    """Merges checkpoints chunk by chunk and returns the merged tree in memory: jax.Arrays with
    `shardings` if given (or with several processes), otherwise host arrays (numpy arrays, or
    jax.Arrays on the first local device). `on_chunk` is called with each merged chunk (a tree
    of some of the leaves) as soon as it is complete, while the next chunk is being read."""
    from tqdm.auto import tqdm

    everyone = [*([base] if base is not None else []), *inputs]
    check_inputs(everyone)
    shapes = inputs[0].shapes
    paths = mg.leaf_paths(shapes)
    leaves = jax.tree.leaves(shapes)
    if shardings is None and jax.process_count() > 1:
        shardings = fsdp_shardings(shapes)
    flat_shardings = None
    if shardings is not None:
        is_sharding = lambda x: isinstance(x, jax.sharding.Sharding)  # noqa: E731
        sharding_flat = jax.tree_util.tree_flatten_with_path(shardings, is_leaf=is_sharding)[0]
        by_path = {mg.key_path(p): s for p, s in sharding_flat}
        missing = [p for p in paths if p not in by_path]
        if missing or len(by_path) != len(paths):
            where = f" (none for {mg.path_str(missing[0])})" if missing else ""
            raise UserError(f"shardings must hold one Sharding per parameter{where}")
        flat_shardings = [by_path[p] for p in paths]

    groups = (
        mg.leaf_groups(paths, spec.granularity, group_fn)
        if spec.method != "average"
        else [mg.path_str(p) for p in paths]
    )
    # Partial restores address leaves by dict keys; other containers are read whole.
    partial = _all_dict_keys(shapes)
    reader = _Reader(flat_shardings)
    reader.host = partial and all(reader.reads_host(c) for c in everyone)
    itemsize = max(s.dtype.itemsize for s in leaves)
    if chunk_mb is None:
        chunk_mb = default_chunk_mb(spec.method, len(inputs), itemsize, reader.host)
    chunks = (
        plan_chunks(paths, leaves, groups, int(chunk_mb * 2**20))
        if partial
        else [list(range(len(leaves)))]
    )
    chunk_params = [sum(int(np.prod(leaves[i].shape)) for i in c) for c in chunks]
    folds = fold_sizes(chunk_params, chunk_mb, len(inputs), itemsize, reader.host)
    coefficients = (
        mg.running_average_coefficients(spec.weights, len(inputs))
        if spec.method == "average"
        else None
    )
    # Orbax restores from a helper thread are fine in one process; with several processes keep
    # every collective call on the main thread.
    jobs = [(c, chunk) for chunk in chunks for c in everyone]
    reads = _Prefetcher(reader, jobs, partial, read_ahead(reader.host))
    merged: dict = {}
    bar = tqdm(
        total=len(chunks) * len(everyone),
        unit="read",
        desc=f"merge ({spec.method}, {len(inputs)} inputs)",
        disable=(not progress) if progress is not None else None,
        file=sys.stderr,
    )

    def read(c: Checkpoint) -> PyTree:
        out = reads.read(c)
        bar.update(1)
        return out

    try:
        for fold in folds:
            out = _merge_chunk(spec, read, inputs, base, group_fn, coefficients, fold, reader.pool)
            if on_chunk is not None:
                on_chunk(out)
            if not partial:
                return out
            for p, x in zip(mg.leaf_paths(out), jax.tree.leaves(out)):
                _nested_set(merged, p, x)
            del out
            _release_free_memory()
    finally:
        reads.close()
        bar.close()
    return merged


# --------------------------------------------------------------------------------------------
def merge_checkpoints(
    method: str,
    inputs: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    *,
    base: str | os.PathLike | None = None,
    weights: Sequence[float] | None = None,
    t: float | None = None,
    eta: float | None = None,
    granularity: str = "layer",
    group_fn: mg.GroupFn | None = None,
    eps: float = mg.DEFAULT_SLERP_EPS,
    shardings: PyTree | None = None,
    chunk_mb: float | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
) -> Path:
    """Merges Orbax checkpoints into a params checkpoint at `output` (a `params/` tree plus
    `warm_jax.json` recording the inputs, method and coefficients), atomically.

    method 'average': (weighted) mean of `inputs`; 'slerp': SLERP of the task vectors
    `input - base` (t for 2 inputs, WARP's iterated 1/m rule for more); 'liti':
    (1 - eta) base + eta · (the slerp of the inputs, or the single input)."""
    started = time.time()
    output = Path(output)
    spec = make_spec(
        method,
        len(inputs),
        has_base=base is not None,
        weights=weights,
        t=t,
        eta=eta,
        granularity=granularity,
        eps=eps,
    )
    if output.exists() and not overwrite:
        raise UserError(f"output {output} already exists (pass --overwrite to replace it)")
    ckpts = [open_checkpoint(p, f"input {i + 1}") for i, p in enumerate(inputs)]
    base_ckpt = open_checkpoint(base, "base") if base is not None else None
    check_inputs([*([base_ckpt] if base_ckpt else []), *ckpts])
    out_abs = output.absolute()
    for c in [*ckpts, *([base_ckpt] if base_ckpt else [])]:
        if out_abs in (c.params_dir, *c.params_dir.parents[:3]):
            raise UserError(f"output {output} would overwrite {c.label}; choose another path")

    fingerprints: dict[str, str] = {}
    params = merge_streaming(
        spec,
        ckpts,
        base_ckpt,
        group_fn=group_fn,
        shardings=shardings,
        chunk_mb=chunk_mb,
        progress=progress,
        # The main thread mostly waits for reads: fingerprint each chunk then, not at the end.
        on_chunk=lambda tree: fingerprints.update(ck.fingerprints(tree)),
    )

    def describe(c: Checkpoint) -> dict:
        return {"path": c.given, "params_dir": str(c.params_dir)}

    record = {
        "method": spec.method,
        "inputs": [describe(c) for c in ckpts],
        "base": describe(base_ckpt) if base_ckpt else None,
        "weights": list(spec.weights) if spec.weights is not None else None,
        "weights_given": list(map(float, weights)) if weights is not None else None,
        "t": spec.t if spec.method != "average" and spec.n_inputs == 2 else None,
        "t_rule": "slerp(slerp(θ1..θ_{M-1}), θ_M, t=1/M)"
        if spec.method != "average" and spec.n_inputs > 2
        else None,
        "eta": spec.eta,
        "granularity": spec.granularity if spec.method != "average" else None,
        "group_fn": getattr(group_fn, "__qualname__", repr(group_fn)) if group_fn else None,
        "eps": spec.eps if spec.method != "average" else None,
        "accumulation": "float32",
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "merge_seconds": round(time.time() - started, 3),  # reading + merging, not writing
        "versions": {"jax": jax.__version__, "orbax": _orbax_version()},
    }
    # Carry the first input's metadata (model config, gin config) so the merged checkpoint
    # loads like its inputs; the merge record replaces any earlier one.
    first_meta = ck.load_metadata(ckpts[0].params_dir)
    metadata = {k: v for k, v in first_meta.items() if k != "merge"}
    metadata["merge"] = record
    metadata = json.loads(json.dumps(metadata, default=str))
    # With several processes each writes its own shards; process 0 the rest (see save_params).
    return ck.save_params(output, params, metadata, known_fingerprints=fingerprints)


def _orbax_version() -> str:
    try:
        from importlib.metadata import version

        return version("orbax-checkpoint")
    except Exception:
        return "unknown"


# --------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `warm-jax merge`."""
    parser.description = (
        "Merge Orbax checkpoints (params checkpoints, training steps or training workdirs) into "
        "one params checkpoint, streaming: memory stays about two models whatever the number "
        "of inputs. average: WARM's weight average; slerp: WARP's SLERP of task vectors about "
        "--base; liti: (1-eta) base + eta slerp(inputs)."
    )
    parser.add_argument("--method", required=True, choices=METHODS)
    parser.add_argument("--inputs", required=True, nargs="+", metavar="DIR")
    parser.add_argument("--base", metavar="DIR", help="initialisation (slerp, liti)")
    parser.add_argument("--output", required=True, metavar="DIR")
    parser.add_argument(
        "--weights", nargs="+", type=float, metavar="W", help="average: one weight per input"
    )
    parser.add_argument(
        "--t", type=float, help="slerp/liti with 2 inputs: interpolation factor (default 0.5)"
    )
    parser.add_argument("--eta", type=float, help="liti: step towards the merged weights")
    parser.add_argument(
        "--granularity",
        choices=mg.GRANULARITIES,
        default="layer",
        help="SLERP angle per layer (WARP, default), per parameter array, or for the whole tree",
    )
    parser.add_argument(
        "--chunk_mb",
        type=float,
        default=None,
        help="float32 MB of parameters per chunk: memory vs number of reads (default: "
        f"{DEFAULT_CHUNK_MB} for SLERP/LITI; for average, sized to keep ~{AVERAGE_WORKING_SET_MB} "
        f"MB of inputs and accumulators in memory, merging up to {FOLD_MAX} inputs per pass)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--no_compilation_cache",
        action="store_true",
        help="do not use JAX's persistent compilation cache (~/.cache/warm_jax)",
    )


def enable_compilation_cache(directory: str | os.PathLike | None = None) -> Path | None:
    """Turns on JAX's persistent compilation cache (unless one is already configured), so that
    repeated merges skip recompiling their few dozen small kernels (~0.1-0.3 s each on CPU)."""
    if jax.config.jax_compilation_cache_dir:
        return Path(jax.config.jax_compilation_cache_dir)
    if directory is None:
        root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        directory = Path(root) / "warm_jax" / "jax_compilation_cache"
    path = Path(directory)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None  # a read-only home: merge without the cache
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return path


def run(args: argparse.Namespace) -> int:
    """`warm-jax merge`: merge, write, print where."""
    if getattr(args, "gin_bindings", None):
        raise UserError("merge is not configured by gin; it takes no --gin.* overrides")
    if not args.no_compilation_cache:
        enable_compilation_cache()
    tune_malloc()
    path = merge_checkpoints(
        args.method,
        args.inputs,
        args.output,
        base=args.base,
        weights=args.weights,
        t=args.t,
        eta=args.eta,
        granularity=args.granularity,
        chunk_mb=args.chunk_mb,
        overwrite=args.overwrite,
        progress=False if args.no_progress else None,
    )
    print(f"merged {len(args.inputs)} checkpoint(s) with {args.method} into {path}")
    return 0
