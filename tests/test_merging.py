"""warm_jax.merging: closed-form values, invariances, guards, jit and shardings."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from warm_jax import merging as mg

BF16 = jnp.bfloat16
SETTINGS = settings(max_examples=25, deadline=None)


def tree(seed: int, dtype=jnp.float32, scale: float = 1.0) -> dict:
    """A small transformer-shaped parameter tree (few distinct shapes keep compiles cached)."""
    rng = np.random.default_rng(seed)

    def r(*shape):
        return jnp.asarray(scale * rng.standard_normal(shape), dtype)

    blocks = {
        f"block_{i}": {"attn": {"q": r(4, 3)}, "mlp": {"up": r(3, 5)}, "attn_norm": {"scale": r(3)}}
        for i in range(2)
    }
    return {"params": {"embed": {"embedding": r(6, 3)}, **blocks, "final_norm": {"scale": r(3)}}}


def vec_tree(*vecs) -> dict:
    """Trees of 1-D leaves, for hand-computed examples."""
    return {
        "params": {f"block_{i}": {"w": jnp.asarray(v, jnp.float32)} for i, v in enumerate(vecs)}
    }


def assert_bitwise_equal(x, y):
    chex.assert_trees_all_equal_structs(x, y)
    for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a, np.float64), np.asarray(b, np.float64))


# ---------------------------------------------------------------------------------- average


def test_average_hand_computed_uniform_and_weighted():
    a, b, c = vec_tree([1.0, 2.0]), vec_tree([3.0, 4.0]), vec_tree([5.0, 9.0])
    out = mg.average([a, b, c])
    np.testing.assert_allclose(out["params"]["block_0"]["w"], [3.0, 5.0], rtol=1e-7)
    out = mg.average([a, b, c], weights=[1, 1, 2])  # (1+3+10)/4, (2+4+18)/4
    np.testing.assert_allclose(out["params"]["block_0"]["w"], [3.5, 6.0], rtol=1e-7)


@SETTINGS
@given(m=st.integers(1, 5), seed=st.integers(0, 100), bf16=st.booleans())
def test_average_of_identical_trees_is_the_tree_exactly(m, seed, bf16):
    t = tree(seed, BF16 if bf16 else jnp.float32)
    assert_bitwise_equal(mg.average([t] * m), t)
    assert_bitwise_equal(mg.average([t] * m, weights=np.arange(1, m + 1)), t)


@SETTINGS
@given(seed=st.integers(0, 1000), perm=st.permutations(range(4)))
def test_average_is_invariant_to_input_order(seed, perm):
    trees = [tree(seed + i) for i in range(4)]
    w = [0.1, 0.2, 0.3, 0.4]
    ref = mg.average(trees, w)
    out = mg.average([trees[i] for i in perm], [w[i] for i in perm])
    chex.assert_trees_all_close(out, ref, rtol=1e-6, atol=1e-6)


def test_average_weights_are_normalised():
    trees = [tree(i) for i in range(3)]
    w = np.array([0.5, 1.0, 2.5])
    chex.assert_trees_all_close(mg.average(trees, w), mg.average(trees, 10 * w), atol=1e-6)
    expected = jax.tree.map(lambda *xs: sum(wi * x for wi, x in zip(w / w.sum(), xs)), *trees)
    chex.assert_trees_all_close(mg.average(trees, w), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mg.normalize_weights(w, 3), w / 4.0)
    # A zero weight drops its input entirely, even in first position.
    chex.assert_trees_all_close(mg.average(trees, [0, 1, 1]), mg.average(trees[1:]), atol=1e-6)


@pytest.mark.parametrize("weights", [[1, -1, 1], [0, 0, 0], [1, 2], [1, float("nan"), 1]])
def test_average_rejects_bad_weights(weights):
    with pytest.raises(ValueError, match="weight"):
        mg.average([tree(i) for i in range(3)], weights)


def test_average_accumulates_bfloat16_in_float32():
    # mean(1, 1+2^-7, 1+2^-7) = 1.0052 rounds to 1+2^-7 in bfloat16; summing in bfloat16 instead
    # rounds 1 + (1+2^-7) = 2.0078 to 2 and ends at exactly 1.0.
    vals = [1.0, 1.0078125, 1.0078125]
    trees = [{"w": jnp.full((4,), v, BF16)} for v in vals]
    out = mg.average(trees)["w"]
    assert out.dtype == BF16
    np.testing.assert_array_equal(np.asarray(out, np.float32), 1.0078125)
    naive = (trees[0]["w"] + trees[1]["w"] + trees[2]["w"]) / 3
    assert float(naive[0]) == 1.0  # what bfloat16 accumulation would have given


@pytest.mark.parametrize("dtype", [jnp.float32, BF16])
def test_running_average_fold_is_bitwise_the_updates_one_by_one(dtype):
    """Folding several inputs per pass (what streaming merges do) gives the same bits as one
    `running_average_update` per input, however the inputs are grouped, and casts at the end."""
    trees = [tree(s, dtype, scale=10.0**s) for s in range(5)]  # magnitudes that round differently
    weights = [3.0, 0.5, 1.0, 7.0, 2.0]
    c = mg.running_average_coefficients(weights, 5)
    mean = mg.upcast(trees[0])
    for m in range(1, 5):
        mean = mg.running_average_update(mean, trees[m], c[m])
    expected = mg.cast_like(mean, trees[0])
    assert_bitwise_equal(expected, mg.average(trees, weights))
    for groups in ([5], [2, 3], [1, 1, 3], [4, 1]):
        out, start = None, 0
        for n in groups:
            last = start + n == 5
            out = mg.running_average_fold(
                out,
                trees[start : start + n],
                c[start : start + n],
                dtype=trees[0] if last else None,
            )
            if not last:
                assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(out))
            start += n
        assert_bitwise_equal(out, expected)
    # The float32 mean equals the updates' before the cast, too.
    assert_bitwise_equal(mg.running_average_fold(None, trees, c), mean)
    with pytest.raises(ValueError, match="no inputs"):
        mg.running_average_fold(None, [], c[:0])
    with pytest.raises(mg.TreeMismatchError):
        mg.running_average_fold(None, [trees[0], {"w": trees[1]}], c[:2])


# ---------------------------------------------------------------------------------- lerp etc.


def test_lerp_liti_ema_hand_computed_and_dtype_preserved():
    a, b = vec_tree([0.0, 10.0]), vec_tree([4.0, 20.0])
    np.testing.assert_allclose(mg.lerp(a, b, 0.25)["params"]["block_0"]["w"], [1.0, 12.5])
    np.testing.assert_allclose(mg.liti(a, b, 0.3)["params"]["block_0"]["w"], [1.2, 13.0], 1e-6)
    np.testing.assert_allclose(mg.ema_update(a, b, 0.01)["params"]["block_0"]["w"], [0.04, 10.1])
    x, y = tree(0, BF16), tree(1, BF16)
    for fn in (mg.lerp, mg.liti, mg.ema_update):
        out = fn(x, y, 0.3)
        assert all(leaf.dtype == BF16 for leaf in jax.tree.leaves(out))
    assert_bitwise_equal(mg.lerp(x, y, 0.0), x)
    assert_bitwise_equal(mg.lerp(x, y, 1.0), y)


def test_task_vector_and_its_inverse():
    base, p = tree(0), tree(1)
    delta = mg.task_vector(p, base)
    expected = jax.tree.map(lambda a, b: a - b, p, base)
    chex.assert_trees_all_close(delta, expected, rtol=1e-6)
    chex.assert_trees_all_close(mg.apply_task_vector(base, delta), p, rtol=1e-6, atol=1e-6)
    half = mg.apply_task_vector(base, delta, 0.5)
    chex.assert_trees_all_close(half, mg.lerp(base, p, 0.5), rtol=1e-5, atol=1e-6)
    # bfloat16 weights, float32 task vector: the difference is kept exactly.
    bb, pb = tree(0, BF16), tree(1, BF16)
    d32 = mg.task_vector(pb, bb, dtype=jnp.float32)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(d32))
    assert_bitwise_equal(mg.apply_task_vector(bb, d32), pb)


# ---------------------------------------------------------------------------------- slerp


@pytest.mark.parametrize("dtype", [jnp.float32, BF16])
@pytest.mark.parametrize("granularity", ["leaf", "layer", "tree"])
def test_slerp_endpoints_are_exact(dtype, granularity):
    base, a, b = tree(0, dtype, 100.0), tree(1, dtype), tree(2, dtype)
    assert_bitwise_equal(mg.slerp(base, a, b, 0.0, granularity=granularity), a)
    assert_bitwise_equal(mg.slerp(base, a, b, 1.0, granularity=granularity), b)


@SETTINGS
@given(
    t=st.floats(0.0, 1.0), seed=st.integers(0, 1000), granularity=st.sampled_from(["leaf", "layer"])
)
def test_slerp_symmetry(t, seed, granularity):
    base, a, b = tree(seed), tree(seed + 1), tree(seed + 2)
    left = mg.slerp(base, a, b, t, granularity=granularity)
    right = mg.slerp(base, b, a, 1.0 - t, granularity=granularity)
    chex.assert_trees_all_close(left, right, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 0.8, 1.0])
def test_slerp_closed_form_on_the_unit_circle(t):
    # δa = e1, δb = (cos φ, sin φ): the SLERP is (cos tφ, sin tφ), at any base.
    phi = 1.2
    base = vec_tree([3.0, -2.0])
    a = vec_tree([4.0, -2.0])
    b = vec_tree([3.0 + math.cos(phi), -2.0 + math.sin(phi)])
    out = mg.slerp(base, a, b, t)["params"]["block_0"]["w"]
    np.testing.assert_allclose(out, [3.0 + math.cos(t * phi), -2.0 + math.sin(t * phi)], atol=1e-6)


@SETTINGS
@given(t=st.floats(0.0, 1.0), norm=st.floats(0.01, 100.0))
def test_slerp_keeps_the_norm_of_orthogonal_equal_norm_task_vectors(t, norm):
    base = {"w": jnp.asarray([0.5, 0.5, 0.5, 0.5])}
    a = {"w": base["w"] + norm * jnp.asarray([1.0, 1.0, 0.0, 0.0]) / math.sqrt(2)}
    b = {"w": base["w"] + norm * jnp.asarray([0.0, 0.0, 1.0, -1.0]) / math.sqrt(2)}
    delta = mg.slerp(base, a, b, t)["w"] - base["w"]
    np.testing.assert_allclose(float(jnp.linalg.norm(delta)), norm, rtol=1e-5)
    lerp_norm = float(jnp.linalg.norm(mg.lerp(a, b, t)["w"] - base["w"]))
    assert lerp_norm <= norm * (1 + 1e-5)  # LERP cuts the chord; SLERP follows the arc


@pytest.mark.parametrize("c", [2.0, 0.5, -1.0, -3.0])
@pytest.mark.parametrize("t", [0.25, 0.5, 0.9])
def test_slerp_equals_lerp_for_collinear_task_vectors(c, t):
    base, a = tree(0), tree(1)
    b = jax.tree.map(lambda z, x: z + c * (x - z), base, a)
    out = mg.slerp(base, a, b, t, granularity="leaf")
    chex.assert_trees_all_close(out, mg.lerp(a, b, t), rtol=1e-5, atol=1e-5)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(out))


@pytest.mark.parametrize("granularity", ["leaf", "layer", "tree"])
def test_slerp_zero_task_vectors_fall_back_to_lerp_without_nan(granularity):
    base, b = tree(0), tree(1)
    out = mg.slerp(base, base, b, 0.3, granularity=granularity)  # δa = 0
    chex.assert_trees_all_close(out, mg.lerp(base, b, 0.3), rtol=1e-6, atol=1e-6)
    out = mg.slerp(base, base, base, 0.3, granularity=granularity)  # both zero
    assert_bitwise_equal(out, base)
    grads = jax.grad(lambda t: sum(jnp.sum(x) for x in jax.tree.leaves(mg.slerp(base, base, b, t))))
    assert np.isfinite(float(grads(0.3)))


def test_layer_granularity_uses_one_angle_per_block():
    # block_0 has two leaves: one with orthogonal task vectors, one with identical ones.
    base = {"params": {"block_0": {"u": jnp.zeros(2), "v": jnp.zeros(2)}}}
    a = {"params": {"block_0": {"u": jnp.asarray([1.0, 0.0]), "v": jnp.asarray([1.0, 0.0])}}}
    b = {"params": {"block_0": {"u": jnp.asarray([0.0, 1.0]), "v": jnp.asarray([1.0, 0.0])}}}
    leaf = mg.slerp(base, a, b, 0.5, granularity="leaf")["params"]["block_0"]
    np.testing.assert_allclose(leaf["u"], [math.sqrt(0.5)] * 2, rtol=1e-6)
    np.testing.assert_allclose(leaf["v"], [1.0, 0.0], rtol=1e-6)
    # Concatenated: cos Ω = 1/2, Ω = 60°, both weights sin 30° / sin 60° = 1/√3.
    layer = mg.slerp(base, a, b, 0.5, granularity="layer")["params"]["block_0"]
    k = 1 / math.sqrt(3)
    np.testing.assert_allclose(layer["u"], [k, k], rtol=1e-6)
    np.testing.assert_allclose(layer["v"], [2 * k, 0.0], rtol=1e-6)


def test_default_groups_and_custom_group_fn():
    t = tree(0)
    paths = mg.leaf_paths(t)
    groups = dict(zip(map(mg.path_str, paths), mg.leaf_groups(paths, "layer")))
    assert groups["params/block_1/attn/q"] == "params/block_1"
    assert groups["params/block_1/attn_norm/scale"] == "params/block_1"
    assert groups["params/embed/embedding"] == "params/embed"
    assert groups["params/final_norm/scale"] == "params/final_norm"
    assert mg.default_group_fn(("w",)) == "w"
    assert mg.default_group_fn(("params", "block_12x", "w")) == "params/block_12x"
    assert set(mg.leaf_groups(paths, "tree")) == {"tree"}
    # A custom group_fn putting everything in one group equals granularity="tree".
    base, a, b = tree(0), tree(1), tree(2)
    one = mg.slerp(base, a, b, 0.4, granularity="layer", group_fn=lambda p: "all")
    chex.assert_trees_all_close(one, mg.slerp(base, a, b, 0.4, granularity="tree"), rtol=1e-6)


def test_slerp_many():
    base = {"w": jnp.zeros(3)}
    e = [{"w": jnp.asarray(v, jnp.float32)} for v in np.eye(3)]
    assert mg.slerp_many(base, e[:1]) is e[0]
    assert_bitwise_equal(mg.slerp_many(base, e[:2]), mg.slerp(base, e[0], e[1], 0.5))
    # slerp(slerp(e1, e2, 1/2), e3, 1/3) = sin(π/3) (e1+e2)/√2 + sin(π/6) e3 (all orthogonal).
    out = mg.slerp_many(base, e)["w"]
    k = math.sin(math.pi / 3) / math.sqrt(2)
    np.testing.assert_allclose(out, [k, k, 0.5], rtol=1e-6)
    trees = [tree(i, BF16) for i in range(4)]
    many = mg.slerp_many(trees[0], trees[1:])
    nested = mg.slerp(trees[0], mg.slerp(trees[0], trees[1], trees[2], 0.5), trees[3], 1 / 3)
    chex.assert_trees_all_close(
        jax.tree.map(lambda x: x.astype(jnp.float32), many),
        jax.tree.map(lambda x: x.astype(jnp.float32), nested),
        atol=0.05,
    )
    assert all(x.dtype == BF16 for x in jax.tree.leaves(many))


# ---------------------------------------------------------------------------------- checks


def test_mismatches_name_the_first_differing_path():
    a = tree(0)
    missing = jax.tree.map(lambda x: x, a)
    del missing["params"]["block_1"]["mlp"]
    with pytest.raises(mg.TreeMismatchError, match=r"no parameter params/block_1/mlp/up"):
        mg.average([a, missing])
    wrong_shape = jax.tree.map(lambda x: x, a)
    wrong_shape["params"]["block_0"]["attn"]["q"] = jnp.zeros((4, 4))
    with pytest.raises(mg.TreeMismatchError, match=r"params/block_0/attn/q has shape \(4, 4\)"):
        mg.slerp(a, a, wrong_shape, 0.5)
    with pytest.raises(mg.TreeMismatchError, match=r"params/block_0/attn/q has dtype bfloat16"):
        mg.lerp(a, jax.tree.map(lambda x: x.astype(BF16), a), 0.5)
    with pytest.raises(mg.TreeMismatchError, match=r"absent from"):
        mg.ema_update(missing, a, 0.1)
    with pytest.raises(TypeError, match="params/step"):
        mg.average([{"params": {"step": jnp.zeros(2, jnp.int32)}}] * 2)


# ---------------------------------------------------------------------------------- diagnostics


def test_cosine_angle_norms_per_leaf_and_layer():
    base = vec_tree([0.0, 0.0], [1.0, 1.0])
    a = vec_tree([3.0, 4.0], [2.0, 1.0])  # task vectors (3,4) and (1,0)
    b = vec_tree([4.0, -3.0], [2.0, 1.0])  # (4,-3) and (1,0)
    cos = mg.cosine(a, b, base=base)
    np.testing.assert_allclose(cos["params/block_0/w"], 0.0, atol=1e-7)
    np.testing.assert_allclose(cos["params/block_1/w"], 1.0)
    ang = mg.angle(a, b, base=base, degrees=True)
    np.testing.assert_allclose(ang["params/block_0/w"], 90.0, rtol=1e-6)
    n = mg.norms(a, base=base, granularity="tree")
    np.testing.assert_allclose(n["tree"], math.sqrt(26.0), rtol=1e-6)
    n = mg.norms(a, granularity="layer")
    np.testing.assert_allclose(n["params/block_0"], 5.0)
    # Concatenated task vectors (3,4,1,0), (4,-3,1,0): cos = 1/26.
    np.testing.assert_allclose(mg.cosine(a, b, base=base, granularity="tree")["tree"], 1 / 26)
    assert np.isnan(float(mg.cosine(base, a, base=base)["params/block_0/w"]))


def test_interpolation_curve():
    a, b = vec_tree([1.0, 1.0]), vec_tree([3.0, 5.0])

    def metric(p):
        w = p["params"]["block_0"]["w"]
        return {"sum": jnp.sum(w), "norm": jnp.linalg.norm(w)}

    lam, vals = mg.interpolation_curve(a, b, metric, num=5)
    np.testing.assert_allclose(lam, [0, 0.25, 0.5, 0.75, 1])
    np.testing.assert_allclose(vals["sum"], 2 + 6 * lam, rtol=1e-6)
    base = vec_tree([0.0, 0.0])
    a, b = vec_tree([1.0, 0.0]), vec_tree([0.0, 1.0])
    lam, vals = mg.interpolation_curve(
        a,
        b,
        lambda p: jnp.linalg.norm(p["params"]["block_0"]["w"]),
        [0.2, 0.7],
        method="slerp",
        base=base,
    )
    np.testing.assert_allclose(vals, [1.0, 1.0], rtol=1e-6)


# ---------------------------------------------------------------------------------- jit, shardings


def test_functions_are_jittable_and_match_eager():
    base, a, b = tree(0), tree(1), tree(2)
    w = jnp.asarray([1.0, 3.0])
    chex.assert_trees_all_close(jax.jit(mg.average)([a, b], w), mg.average([a, b], w), rtol=1e-6)
    jslerp = jax.jit(mg.slerp, static_argnames=("granularity", "group_fn", "eps"))
    for t in (0.0, 0.4, 1.0):
        chex.assert_trees_all_close(jslerp(base, a, b, t), mg.slerp(base, a, b, t), rtol=1e-6)
    assert_bitwise_equal(jslerp(base, a, b, 0.0), a)
    chex.assert_trees_all_close(jax.jit(mg.liti)(a, b, 0.3), mg.liti(a, b, 0.3), rtol=1e-6)
    chex.assert_trees_all_close(jax.jit(mg.ema_update)(a, b, 0.01), mg.ema_update(a, b, 0.01))


def test_jitted_merges_keep_shardings_on_8_devices():
    assert jax.device_count() == 8
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    specs = {
        "params": {
            "block_0": {"mlp": {"up": P("data", "model")}, "norm": {"scale": P("model")}},
            "embed": {"embedding": P(None, "data")},
        }
    }
    rng = np.random.default_rng(0)

    def make():
        raw = {
            "params": {
                "block_0": {
                    "mlp": {"up": rng.standard_normal((8, 4))},
                    "norm": {"scale": rng.standard_normal(4)},
                },
                "embed": {"embedding": rng.standard_normal((6, 8))},
            }
        }
        return jax.tree.map(
            lambda x, s: jax.device_put(jnp.asarray(x, jnp.float32), NamedSharding(mesh, s)),
            raw,
            specs,
        )

    base, a, b = make(), make(), make()
    expected = jax.tree.map(lambda x: x.sharding, a)
    results = {
        "average": jax.jit(mg.average)([a, b, base]),
        "lerp": jax.jit(mg.lerp)(a, b, 0.3),
        "liti": jax.jit(mg.liti)(a, b, 0.3),
        "ema_update": jax.jit(mg.ema_update)(a, b, 0.01),
        "slerp": jax.jit(mg.slerp)(base, a, b, 0.3),
        "slerp_leaf": jax.jit(lambda z, x, y: mg.slerp(z, x, y, 0.3, granularity="leaf"))(
            base, a, b
        ),
        "eager_slerp": mg.slerp(base, a, b, 0.3),
    }
    for name, out in results.items():
        got = jax.tree.map(lambda x: x.sharding, out)
        assert got == expected, name
    unsharded = jax.tree.map(np.asarray, (base, a, b))
    chex.assert_trees_all_close(results["slerp"], mg.slerp(*unsharded, 0.3), rtol=1e-5, atol=1e-6)
