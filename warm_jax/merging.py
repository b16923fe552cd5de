"""Weight-space merging of parameter pytrees: the maths of WARM and WARP.

Every function takes plain pytrees (nested dicts of arrays, as flax.linen produces), is
traceable under `jax.jit`, and computes leaf by leaf with elementwise operations plus scalar
reductions, so sharded leaves stay sharded the way they came in. Arithmetic runs in float32 (or
wider, for float64 leaves) and every result leaf is cast back to its input's dtype, so bfloat16
checkpoints are merged without bfloat16 rounding piling up.

Equations (θ are weight vectors, δ = θ - θ_base task vectors):

* WARM weight average      φ = Σ_i w_i φ_i / Σ_i w_i
* LERP                     lerp(a, b, t) = (1 - t) a + t b
* SLERP of task vectors    θ = θ_base + sin((1-t)Ω)/sin Ω · δ_a + sin(tΩ)/sin Ω · δ_b,
                           cos Ω = <δ_a, δ_b> / (|δ_a| |δ_b|), one Ω per leaf or per layer
* WARP, M > 2              slerp_M(θ_1..θ_M) = slerp(slerp_{M-1}(θ_1..θ_{M-1}), θ_M, t = 1/M)
* LITI                     θ_init ← (1 - η) θ_init + η θ_slerp
* EMA anchor               θ_ema ← (1 - μ) θ_ema + μ θ

Inputs are checked first: every tree must have the same structure, shapes and dtypes, and a
`TreeMismatchError` names the first path where they differ.

This module imports jax and numpy only (the layering rule of the package): checkpoints, the CLI
and streaming merges live in `warm_jax.merging_checkpoints`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
KeyPath = tuple[str, ...]
GroupFn = Callable[[KeyPath], str]
Granularity = Literal["leaf", "layer", "tree"]

GRANULARITIES: tuple[str, ...] = ("leaf", "layer", "tree")
# Below this sin Ω the two task vectors are treated as collinear (Ω < 0.06° or Ω > 179.94°):
# float32 cannot resolve smaller angles from a dot product anyway (arccos(1 - 2^-24) = 3.5e-4),
# and at that angle SLERP and LERP coefficients agree to ~1e-7.
DEFAULT_SLERP_EPS = 1e-3


class TreeMismatchError(ValueError):
    """Two pytrees that should match differ in structure, shape or dtype (message names where)."""


# --------------------------------------------------------------------------------------------
# Paths, groups, validation


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def key_path(path: Sequence[Any]) -> KeyPath:
    """A jax key path as a tuple of plain strings, e.g. ('params', 'block_0', 'mlp', 'up')."""
    return tuple(_key_name(k) for k in path)


def path_str(path: KeyPath) -> str:
    """The display form of a key path: components joined by '/'."""
    return "/".join(path) if path else "<root>"


def leaf_paths(tree: PyTree) -> list[KeyPath]:
    """The key path of every leaf, in `jax.tree.leaves` order."""
    return [key_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


_BLOCK_RE = re.compile(r"block_\d+")


def default_group_fn(path: KeyPath) -> str:
    """The layer a parameter belongs to, for `granularity="layer"`.

    A leaf under a component named `block_<i>` belongs to that transformer block (the path up to
    and including `block_<i>`); any other leaf belongs to the module that owns it (its parent
    path, e.g. 'params/embed' or 'params/final_norm'), or is its own group at the root.
    """
    for i, name in enumerate(path):
        if _BLOCK_RE.fullmatch(name):
            return path_str(path[: i + 1])
    return path_str(path[:-1]) if len(path) > 1 else path_str(path)


def leaf_groups(
    paths: Sequence[KeyPath],
    granularity: Granularity = "layer",
    group_fn: GroupFn | None = None,
) -> list[str]:
    """The group name of each leaf: its own path ('leaf'), its layer ('layer'), or 'tree'."""
    if granularity == "leaf":
        return [path_str(p) for p in paths]
    if granularity == "tree":
        return ["tree"] * len(paths)
    if granularity == "layer":
        fn = group_fn or default_group_fn
        return [str(fn(p)) for p in paths]
    raise ValueError(f"granularity={granularity!r}; choose from {GRANULARITIES}")


def _segments(groups: Sequence[str]) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """Group index per leaf (hashable, so it can be a static jit argument) and group names."""
    index: dict[str, int] = {}
    ids = tuple(index.setdefault(g, len(index)) for g in groups)
    return ids, tuple(index)


def _dtype(x: Any) -> np.dtype:
    dt = getattr(x, "dtype", None)
    return np.dtype(dt) if dt is not None else np.dtype(jnp.result_type(x))


def check_compatible(
    *trees: PyTree, names: Sequence[str] | None = None, check_dtypes: bool = True
) -> None:
    """Raises `TreeMismatchError` naming the first path where `trees` differ in structure,
    shape or (with `check_dtypes`) dtype. Leaves may be arrays, tracers or ShapeDtypeStructs."""
    if len(trees) < 2:
        return
    names = list(names) if names is not None else [f"tree {i}" for i in range(len(trees))]
    ref_flat, ref_def = jax.tree_util.tree_flatten_with_path(trees[0])
    ref = [(path_str(key_path(p)), x) for p, x in ref_flat]
    for name, tree in zip(names[1:], trees[1:]):
        flat, tdef = jax.tree_util.tree_flatten_with_path(tree)
        got = [(path_str(key_path(p)), x) for p, x in flat]
        if tdef != ref_def:
            got_paths = {p for p, _ in got}
            ref_paths = {p for p, _ in ref}
            for p, _ in ref:
                if p not in got_paths:
                    raise TreeMismatchError(f"{name} has no parameter {p} (present in {names[0]})")
            for p, _ in got:
                if p not in ref_paths:
                    raise TreeMismatchError(f"{name} has a parameter {p} absent from {names[0]}")
            raise TreeMismatchError(
                f"{name} and {names[0]} hold the same parameters in different containers: "
                f"{tdef} vs {ref_def}"
            )
        for (p, x), (_, y) in zip(ref, got):
            if tuple(np.shape(x)) != tuple(np.shape(y)):
                raise TreeMismatchError(
                    f"{name}: parameter {p} has shape {tuple(np.shape(y))}, "
                    f"{names[0]} has {tuple(np.shape(x))}"
                )
            if check_dtypes and _dtype(x) != _dtype(y):
                raise TreeMismatchError(
                    f"{name}: parameter {p} has dtype {_dtype(y)}, {names[0]} has {_dtype(x)}"
                )


def _check_floating(tree: PyTree, name: str) -> None:
    for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if not jnp.issubdtype(_dtype(x), jnp.floating):
            raise TypeError(
                f"{name}: parameter {path_str(key_path(p))} has dtype {_dtype(x)}; "
                "only floating-point leaves can be merged"
            )


def _prepare(trees: Sequence[PyTree], names: Sequence[str]) -> tuple[list[list[Any]], Any]:
    """Validates `trees` and returns their leaf lists and the common treedef."""
    check_compatible(*trees, names=names)
    _check_floating(trees[0], names[0])
    leaves = [jax.tree.leaves(t) for t in trees]
    return leaves, jax.tree.structure(trees[0])


def accumulation_dtype(dtype: Any) -> np.dtype:
    """float32 for half-precision and float32 leaves; wider floats keep their width."""
    return np.dtype(jnp.promote_types(dtype, jnp.float32))


# --------------------------------------------------------------------------------------------
# Jitted kernels, one parameter array at a time. Compiled once per (shape, dtype, sharding), so a
# transformer's dozen distinct shapes cost a dozen small compilations, not one per layer; inside
# a caller's `jax.jit` they simply inline. The public functions and the streaming checkpoint
# merges call the same kernels, so a merge done chunk by chunk is bit-identical to one in memory.


def _up(x: jax.Array) -> jax.Array:
    return x.astype(accumulation_dtype(x.dtype))


_upcast_leaf = jax.jit(_up)


@functools.partial(jax.jit, static_argnames="dtype")
def _cast_leaf(x: jax.Array, dtype: str) -> jax.Array:
    return x.astype(dtype)


def _mean_update_leaf(mean: jax.Array, x: jax.Array, c: jax.Array) -> jax.Array:
    return mean + c.astype(mean.dtype) * (x.astype(mean.dtype) - mean)


_mean_update_jit = jax.jit(_mean_update_leaf)
# Donating the accumulator lets XLA update it in place: one model-sized buffer, not two.
_mean_update_donated = jax.jit(_mean_update_leaf, donate_argnums=0)


def _mean_fold_leaf(
    mean: jax.Array | None, xs: tuple[jax.Array, ...], cs: jax.Array, dtype: str | None
) -> jax.Array:
    # The same operations as `_mean_update_leaf` one input after another, in one fused loop:
    # the accumulator stays in registers instead of making a round trip through memory per input.
    if mean is None:
        mean, xs, cs = _up(xs[0]), xs[1:], cs[1:]
    for i, x in enumerate(xs):
        mean = _mean_update_leaf(mean, x, cs[i])
    return mean if dtype is None else mean.astype(dtype)


_mean_fold_start = jax.jit(functools.partial(_mean_fold_leaf, None), static_argnames="dtype")
_mean_fold_donated = jax.jit(_mean_fold_leaf, static_argnames="dtype", donate_argnums=0)


@jax.jit
def _lerp_leaf(a: jax.Array, b: jax.Array, t: jax.Array) -> jax.Array:
    tt = t.astype(accumulation_dtype(a.dtype))
    return ((1 - tt) * _up(a) + tt * _up(b)).astype(a.dtype)


@functools.partial(jax.jit, static_argnames="dtype")
def _sub_leaf(a: jax.Array, b: jax.Array, dtype: str) -> jax.Array:
    return (_up(a) - _up(b)).astype(dtype)


@jax.jit
def _add_scaled_leaf(base: jax.Array, delta: jax.Array, scale: jax.Array) -> jax.Array:
    acc = jnp.promote_types(accumulation_dtype(base.dtype), delta.dtype)
    return (base.astype(acc) + scale.astype(acc) * delta.astype(acc)).astype(base.dtype)


def _dots(x: jax.Array, y: jax.Array) -> jax.Array:
    # One variadic reduction reads x and y once with the products fused in. Three separate
    # sums (or jnp.vdot) make XLA:CPU materialise float32 temporaries and run 3-15x slower.
    axes = tuple(range(x.ndim))
    zero = jnp.zeros((), x.dtype)
    sums = jax.lax.reduce(
        (x * y, x * x, y * y),
        (zero, zero, zero),
        lambda p, q: (p[0] + q[0], p[1] + q[1], p[2] + q[2]),
        axes,
    )
    return jnp.stack(sums)


@jax.jit
def _pair_stats_leaf(x: jax.Array, y: jax.Array) -> jax.Array:
    """[<x, y>, |x|², |y|²] accumulated in float32 (or wider)."""
    return _dots(_up(x), _up(y))


@jax.jit
def _task_stats_leaf(base: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """[<δa, δb>, |δa|², |δb|²] of the task vectors δ = θ - base."""
    return _dots(_up(a) - _up(base), _up(b) - _up(base))


def _group_sums(stats: Sequence[jax.Array], segments: Sequence[int], n: int) -> list[jax.Array]:
    # Concatenating a group's leaves and taking one dot product equals summing the leaves' dot
    # products; summing avoids materialising the concatenation. The sums run in leaf order, so a
    # group gets the same bits whether it is merged alone (streaming) or within the whole tree.
    sums: list[Any] = [None] * n
    for st, g in zip(stats, segments):
        sums[g] = st if sums[g] is None else sums[g] + st
    return sums


def slerp_coefficients(
    dot: jax.Array, sq_norm_a: jax.Array, sq_norm_b: jax.Array, t: jax.Array, eps: float
) -> tuple[jax.Array, jax.Array]:
    """The SLERP weights (c_a, c_b) of two vectors from their dot product and squared norms:

        cos Ω = <a, b> / (|a| |b|),   c_a = sin((1-t)Ω) / sin Ω,   c_b = sin(tΩ) / sin Ω,

    falling back to LERP weights (1 - t, t) where a norm is zero, sin Ω < eps (nearly collinear
    or opposite vectors), or anything is not finite, so that no NaN can come out."""
    norm = jnp.sqrt(sq_norm_a) * jnp.sqrt(sq_norm_b)
    has_norm = norm > 0
    cos = jnp.clip(dot / jnp.where(has_norm, norm, 1), -1.0, 1.0)
    omega = jnp.arccos(cos)
    sin = jnp.sin(omega)
    # NaN compares False, so non-finite statistics also take the LERP branch.
    use_slerp = has_norm & (sin > eps)
    safe_sin = jnp.where(use_slerp, sin, 1)
    t = jnp.asarray(t, omega.dtype)
    c_a = jnp.where(use_slerp, jnp.sin((1 - t) * omega) / safe_sin, 1 - t)
    c_b = jnp.where(use_slerp, jnp.sin(t * omega) / safe_sin, t)
    return c_a, c_b


@functools.partial(jax.jit, static_argnames="eps")
def _slerp_coefficients_jit(stats: jax.Array, t: jax.Array, eps: float) -> jax.Array:
    return jnp.stack(slerp_coefficients(stats[0], stats[1], stats[2], t, eps))


def _slerp_apply(
    base: jax.Array, a: jax.Array, b: jax.Array, coef: jax.Array, t: jax.Array, dtype: str
) -> jax.Array:
    z = _up(base)
    da, db = _up(a) - z, _up(b) - z
    acc = da.dtype
    merged = (z + coef[0].astype(acc) * da + coef[1].astype(acc) * db).astype(dtype)
    # The endpoints are returned bit for bit: base + (a - base) need not round back to a.
    return jnp.where(t == 0, a.astype(dtype), jnp.where(t == 1, b.astype(dtype), merged))


_slerp_apply_leaf = jax.jit(_slerp_apply, static_argnames="dtype")
# For slerp_many's float32 running merge: the new merge may overwrite the previous one.
_slerp_apply_leaf_donated = jax.jit(_slerp_apply, static_argnames="dtype", donate_argnums=1)


def _slerp_leaves(
    base: list[jax.Array],
    a: list[jax.Array],
    b: list[jax.Array],
    t: jax.Array,
    segments: tuple[int, ...],
    num_groups: int,
    eps: float,
    dtypes: Sequence[str],
    donate_a: bool = False,
) -> list[jax.Array]:
    stats = [_task_stats_leaf(z, x, y) for z, x, y in zip(base, a, b)]
    sums = _group_sums(stats, segments, num_groups)
    coefs = [_slerp_coefficients_jit(st, t, eps) for st in sums]
    out = []
    for z, x, y, g, d in zip(base, a, b, segments, dtypes):
        reuse = donate_a and np.dtype(x.dtype) == np.dtype(d)
        fn = _slerp_apply_leaf_donated if reuse else _slerp_apply_leaf
        out.append(fn(z, x, y, coefs[g], t, d))
    return out


# --------------------------------------------------------------------------------------------
# Public merging functions


def _scalar(x: Any) -> jax.Array:
    return jnp.asarray(x, jnp.float32) if not isinstance(x, jax.Array) else x


def upcast(tree: PyTree) -> PyTree:
    """Each leaf in its accumulation dtype (float32 for bfloat16, float16 and float32 leaves)."""
    _check_floating(tree, "tree")
    return jax.tree.map(_upcast_leaf, tree)


def cast_like(tree: PyTree, like: PyTree) -> PyTree:
    """Each leaf of `tree` cast to the dtype of the matching leaf of `like` (arrays or
    ShapeDtypeStructs), e.g. a float32 accumulator back to the checkpoint's bfloat16."""
    check_compatible(like, tree, names=["like", "tree"], check_dtypes=False)
    return jax.tree.map(lambda x, ref: _cast_leaf(x, str(_dtype(ref))), tree, like)


def task_vector(params: PyTree, base: PyTree, *, dtype: Any | None = None) -> PyTree:
    """The task vector δ = θ - θ_base, computed in float32 and returned in `dtype` (default: each
    leaf's own dtype; pass `jnp.float32` to keep the exact difference of bfloat16 weights)."""
    (p, b), treedef = _prepare([params, base], ["params", "base"])
    out = [
        _sub_leaf(x, y, str(np.dtype(dtype) if dtype is not None else _dtype(x)))
        for x, y in zip(p, b)
    ]
    return jax.tree.unflatten(treedef, out)


def apply_task_vector(base: PyTree, delta: PyTree, scale: float | jax.Array = 1.0) -> PyTree:
    """The inverse of `task_vector`: θ = θ_base + scale · δ, in `base`'s dtypes.

    `delta` may be stored in another floating dtype than `base` (e.g. float32 task vectors of
    bfloat16 weights); structure and shapes must match."""
    check_compatible(base, delta, names=["base", "delta"], check_dtypes=False)
    _check_floating(base, "base")
    _check_floating(delta, "delta")
    treedef = jax.tree.structure(base)
    scale = _scalar(scale)
    out = [
        _add_scaled_leaf(x, d, scale) for x, d in zip(jax.tree.leaves(base), jax.tree.leaves(delta))
    ]
    return jax.tree.unflatten(treedef, out)


def normalize_weights(weights: Sequence[float] | np.ndarray | None, n: int) -> np.ndarray:
    """Concrete averaging weights as float64 summing to 1 (uniform when None).

    Weights must be finite and non-negative with a positive sum."""
    if n < 1:
        raise ValueError("nothing to average: no trees given")
    if weights is None:
        return np.full(n, 1.0 / n)
    w = np.asarray(weights, np.float64).reshape(-1)
    if w.shape != (n,):
        raise ValueError(f"{w.size} weights given for {n} trees")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"weights must be finite, non-negative and not all zero; got {list(w)}")
    return w / w.sum()


def _is_traced(x: Any) -> bool:
    try:
        np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return True
    return False


def running_average_coefficients(
    weights: Sequence[float] | np.ndarray | jax.Array | None, n: int
) -> jax.Array:
    """The step sizes c_m = w_m / Σ_{j≤m} w_j of the running weighted mean (see
    `running_average_update`); c_0 = 1. Traced weights are accepted (no validity checks)."""
    if _is_traced(weights):
        w = jnp.reshape(weights, (n,)).astype(jnp.float32)
        cum = jnp.cumsum(w)
        return jnp.where(cum > 0, w / jnp.where(cum > 0, cum, 1), 1.0)
    w = normalize_weights(None if weights is None else np.asarray(weights), n)
    cum = np.cumsum(w)
    # Leading zero weights: take the input as a placeholder; the first positive weight gets
    # c = 1 and overwrites it.
    c = np.where(cum > 0, w / np.where(cum > 0, cum, 1), 1.0)
    c[0] = 1.0
    return jnp.asarray(c, jnp.float32)


def running_average_update(
    mean: PyTree, params: PyTree, coefficient: float | jax.Array, *, donate: bool = False
) -> PyTree:
    """One step of a running weighted mean, in `mean`'s (accumulation) dtype:

        μ_m = μ_{m-1} + c_m (θ_m - μ_{m-1}),   c_m = w_m / Σ_{j≤m} w_j,

    which after M steps equals Σ w_m θ_m / Σ w_m. Unlike a running sum, the mean of identical
    inputs is exactly the input. `donate=True` lets XLA overwrite `mean` in place (the caller
    must not use it afterwards); `params` may have a narrower dtype than `mean`."""
    check_compatible(mean, params, names=["mean", "params"], check_dtypes=False)
    fn = _mean_update_donated if donate else _mean_update_jit
    c = _scalar(coefficient)
    out = [fn(m, x, c) for m, x in zip(jax.tree.leaves(mean), jax.tree.leaves(params))]
    return jax.tree.unflatten(jax.tree.structure(mean), out)


def running_average_fold(
    mean: PyTree | None,
    params: Sequence[PyTree],
    coefficients: jax.Array,
    *,
    dtype: PyTree | None = None,
) -> PyTree:
    """`running_average_update` for several inputs at once, bit-identical to applying it once
    per input, but one pass over memory instead of one per input.

    `mean=None` starts a new mean (`coefficients[0]` is then ignored: μ_1 = θ_1 in float32);
    otherwise `mean` is overwritten in place (donated). `coefficients[i]` is c_m of `params[i]`.
    With `dtype` (a tree of arrays or ShapeDtypeStructs) the result is cast to its leaves' dtypes
    in the same pass, which ends the mean; without, it stays in the accumulation dtype."""
    params = list(params)
    if not params:
        raise ValueError("running_average_fold of no inputs")
    ref = params[0] if mean is None else mean
    for i, p in enumerate(params):
        check_compatible(ref, p, names=["mean", f"params[{i}]"], check_dtypes=False)
    treedef = jax.tree.structure(ref)
    cs = jnp.asarray(coefficients, jnp.float32).reshape(len(params))
    columns = list(zip(*[jax.tree.leaves(p) for p in params]))
    dtypes = (
        [str(_dtype(d)) for d in jax.tree.leaves(dtype)]
        if dtype is not None
        else [None] * len(columns)
    )
    if mean is None:
        out = [_mean_fold_start(xs, cs, dtype=d) for xs, d in zip(columns, dtypes)]
    else:
        out = [
            _mean_fold_donated(m, xs, cs, dtype=d)
            for m, xs, d in zip(jax.tree.leaves(mean), columns, dtypes)
        ]
    return jax.tree.unflatten(treedef, out)


def average(
    trees: Sequence[PyTree], weights: Sequence[float] | np.ndarray | jax.Array | None = None
) -> PyTree:
    """WARM's weight average φ = Σ_i w_i φ_i / Σ_i w_i (uniform weights by default).

    Weights are normalised to sum to 1. Accumulation is in float32 (even for bfloat16 leaves),
    as a running mean; each result leaf has its input's dtype."""
    trees = list(trees)
    if not trees:
        raise ValueError("average of no trees")
    names = [f"trees[{i}]" for i in range(len(trees))]
    leaves, treedef = _prepare(trees, names)
    coefs = running_average_coefficients(weights, len(trees))
    # The streaming merges' kernel: all inputs of a leaf in one pass (see running_average_fold).
    out = [
        _mean_fold_start(tuple(column), coefs, dtype=str(_dtype(column[0])))
        for column in zip(*leaves)
    ]
    return jax.tree.unflatten(treedef, out)


def lerp(a: PyTree, b: PyTree, t: float | jax.Array) -> PyTree:
    """Linear interpolation (1 - t) a + t b, computed in float32, in the inputs' dtype."""
    (la, lb), treedef = _prepare([a, b], ["a", "b"])
    t = _scalar(t)
    return jax.tree.unflatten(treedef, [_lerp_leaf(x, y, t) for x, y in zip(la, lb)])


def slerp(
    base: PyTree,
    a: PyTree,
    b: PyTree,
    t: float | jax.Array = 0.5,
    *,
    granularity: Granularity = "layer",
    group_fn: GroupFn | None = None,
    eps: float = DEFAULT_SLERP_EPS,
) -> PyTree:
    """Spherical interpolation of the task vectors δ_a = a - base and δ_b = b - base (WARP):

        θ = base + sin((1-t)Ω)/sin Ω · δ_a + sin(tΩ)/sin Ω · δ_b,   cos Ω = <δ_a,δ_b>/(|δ_a||δ_b|)

    with one angle Ω per parameter array (`granularity="leaf"`), per layer ("layer": the group of
    a leaf is `group_fn(key_path)`, by default its `block_<i>` or its owning module; a group's
    leaves are treated as one concatenated vector), or for the whole tree ("tree").

    Groups whose task vectors have zero norm or are nearly collinear (sin Ω < eps) use LERP
    weights instead, so no NaN appears; t = 0 and t = 1 return `a` and `b` exactly. Orthogonal
    task vectors of equal norm keep that norm along the arc."""
    (lz, la, lb), treedef = _prepare([base, a, b], ["base", "a", "b"])
    segments, groups = _segments(leaf_groups(leaf_paths(base), granularity, group_fn))
    dtypes = [str(_dtype(x)) for x in la]
    out = _slerp_leaves(lz, la, lb, _scalar(t), segments, len(groups), float(eps), dtypes)
    return jax.tree.unflatten(treedef, out)


def slerp_many(
    base: PyTree,
    trees: Sequence[PyTree],
    *,
    granularity: Granularity = "layer",
    group_fn: GroupFn | None = None,
    eps: float = DEFAULT_SLERP_EPS,
) -> PyTree:
    """WARP's merge of M ≥ 1 policies about `base`, by iterated SLERP of task vectors:

        s_1 = θ_1,   s_m = slerp(base, s_{m-1}, θ_m, t = 1/m)   (m = 2..M),

    i.e. slerp(slerp(θ_1..θ_{M-1}), θ_M, 1/M). M = 2 is `slerp(base, θ_1, θ_2, 0.5)`; for M > 2
    the intermediate merges stay in float32 (`slerp_many_step`) and the result has the inputs'
    dtypes."""
    trees = list(trees)
    if not trees:
        raise ValueError("slerp_many of no trees")
    names = ["base"] + [f"trees[{i}]" for i in range(len(trees))]
    _prepare([base, *trees], names)
    kw = dict(granularity=granularity, group_fn=group_fn, eps=eps)
    if len(trees) == 1:
        return trees[0]
    if len(trees) == 2:
        return slerp(base, trees[0], trees[1], 0.5, **kw)
    s = trees[0]
    for m in range(2, len(trees) + 1):
        s = slerp_many_step(base, s, trees[m - 1], m, **kw)
    return cast_like(s, trees[0])


def slerp_many_step(
    base: PyTree,
    merged: PyTree,
    params: PyTree,
    m: int,
    *,
    granularity: Granularity = "layer",
    group_fn: GroupFn | None = None,
    eps: float = DEFAULT_SLERP_EPS,
    donate: bool = False,
) -> PyTree:
    """One step of `slerp_many`: s_m = slerp(base, s_{m-1}, θ_m, t = 1/m), returned in float32
    (the accumulation dtype) so that rounding does not pile up over the M - 1 steps.

    `merged` is s_{m-1}: θ_1 itself for m = 2, or a previous step's float32 result; `base` and
    `params` must share dtypes. Streaming merges fold checkpoints with this, one at a time.
    `donate=True` lets a float32 `merged` be overwritten in place (do not use it afterwards)."""
    if m < 2:
        raise ValueError(f"slerp_many_step starts at m = 2, got m = {m}")
    check_compatible(base, params, names=["base", "params"])
    check_compatible(base, merged, names=["base", "merged"], check_dtypes=False)
    _check_floating(base, "base")
    _check_floating(merged, "merged")
    lz, ls, lx = (jax.tree.leaves(x) for x in (base, merged, params))
    segments, groups = _segments(leaf_groups(leaf_paths(base), granularity, group_fn))
    dtypes = [str(accumulation_dtype(_dtype(x))) for x in lx]
    t = _scalar(1.0 / m)
    out = _slerp_leaves(lz, ls, lx, t, segments, len(groups), float(eps), dtypes, donate)
    return jax.tree.unflatten(jax.tree.structure(base), out)


def liti(init: PyTree, merged: PyTree, eta: float | jax.Array) -> PyTree:
    """WARP's linear interpolation towards initialisation: (1 - η) θ_init + η θ_merged."""
    (li, lm), treedef = _prepare([init, merged], ["init", "merged"])
    eta = _scalar(eta)
    return jax.tree.unflatten(treedef, [_lerp_leaf(x, y, eta) for x, y in zip(li, lm)])


def ema_update(ema: PyTree, params: PyTree, mu: float | jax.Array) -> PyTree:
    """WARP's EMA anchor update: θ_ema ← (1 - μ) θ_ema + μ θ."""
    (le, lp), treedef = _prepare([ema, params], ["ema", "params"])
    mu = _scalar(mu)
    return jax.tree.unflatten(treedef, [_lerp_leaf(x, y, mu) for x, y in zip(le, lp)])


# --------------------------------------------------------------------------------------------
# Diagnostics


def _grouped_stats(
    a: PyTree,
    b: PyTree,
    base: PyTree | None,
    granularity: Granularity,
    group_fn: GroupFn | None,
) -> tuple[jax.Array, tuple[str, ...]]:
    trees, names = [a, b], ["a", "b"]
    if base is not None:
        trees, names = [base, a, b], ["base", "a", "b"]
    leaves, _ = _prepare(trees, names)
    segments, groups = _segments(leaf_groups(leaf_paths(a), granularity, group_fn))
    la, lb = leaves[-2], leaves[-1]
    if base is None:
        stats = [_pair_stats_leaf(x, y) for x, y in zip(la, lb)]
    else:
        stats = [_task_stats_leaf(z, x, y) for z, x, y in zip(leaves[0], la, lb)]
    return jnp.stack(_group_sums(stats, segments, len(groups))), groups


def norms(
    tree: PyTree,
    *,
    base: PyTree | None = None,
    granularity: Granularity = "leaf",
    group_fn: GroupFn | None = None,
) -> dict[str, jax.Array]:
    """L2 norm |θ| per leaf / layer / tree, or of the task vector |θ - base| when `base` is given."""
    stats, groups = _grouped_stats(tree, tree, base, granularity, group_fn)
    return {g: jnp.sqrt(stats[i, 1]) for i, g in enumerate(groups)}


def cosine(
    a: PyTree,
    b: PyTree,
    *,
    base: PyTree | None = None,
    granularity: Granularity = "leaf",
    group_fn: GroupFn | None = None,
) -> dict[str, jax.Array]:
    """cos = <x, y> / (|x| |y|) per leaf / layer / tree between `a` and `b`, or between their
    task vectors a - base and b - base when `base` is given (WARP Fig. 11). A group where either
    vector is zero has no direction: its cosine is NaN."""
    stats, groups = _grouped_stats(a, b, base, granularity, group_fn)
    cos = stats[:, 0] / (jnp.sqrt(stats[:, 1]) * jnp.sqrt(stats[:, 2]))
    cos = jnp.clip(cos, -1.0, 1.0)
    return {g: cos[i] for i, g in enumerate(groups)}


def angle(
    a: PyTree,
    b: PyTree,
    *,
    base: PyTree | None = None,
    granularity: Granularity = "leaf",
    group_fn: GroupFn | None = None,
    degrees: bool = False,
) -> dict[str, jax.Array]:
    """Ω = arccos(cos) per leaf / layer / tree (radians, or degrees), as in `cosine`."""
    cos = cosine(a, b, base=base, granularity=granularity, group_fn=group_fn)
    conv = (180.0 / np.pi) if degrees else 1.0
    return {g: jnp.arccos(c) * conv for g, c in cos.items()}


def interpolation_curve(
    a: PyTree,
    b: PyTree,
    metric: Callable[[PyTree], Any],
    lambdas: Sequence[float] | np.ndarray | None = None,
    *,
    num: int = 11,
    method: Literal["lerp", "slerp"] = "lerp",
    base: PyTree | None = None,
    granularity: Granularity = "layer",
    group_fn: GroupFn | None = None,
) -> tuple[np.ndarray, Any]:
    """Evaluates `metric(θ_λ)` along θ_λ = lerp(a, b, λ) (linear mode connectivity, WARM Fig. 3)
    or θ_λ = slerp(base, a, b, λ) (WARP Fig. 3c) for λ in `lambdas` (default: `num` points on
    [0, 1]). Returns the λ grid and the metric values stacked along a first axis (a metric
    returning a pytree of scalars gives that pytree of arrays)."""
    grid = np.linspace(0.0, 1.0, num) if lambdas is None else np.asarray(lambdas, np.float64)
    if method == "lerp":
        check_compatible(a, b, names=["a", "b"])
        interp = jax.jit(lerp)

        def point(lam: float) -> PyTree:
            return interp(a, b, jnp.float32(lam))

    elif method == "slerp":
        if base is None:
            raise ValueError("method='slerp' needs `base` (the task vectors' origin)")
        check_compatible(base, a, b, names=["base", "a", "b"])
        interp = jax.jit(
            functools.partial(slerp, granularity=granularity, group_fn=group_fn),
        )

        def point(lam: float) -> PyTree:
            return interp(base, a, b, jnp.float32(lam))

    else:
        raise ValueError(f"method={method!r}; choose 'lerp' or 'slerp'")
    values = [metric(point(float(lam))) for lam in grid]
    stacked = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *values)
    return grid, stacked
