"""Direct TensorStore reads of params checkpoints: the same arrays as Orbax's restore, into
aligned flat buffers; layouts it does not read are declined; damage names the array."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from warm_jax.training import checkpoint_arrays as ca
from warm_jax.training import checkpoints as ck


def make_tree(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "params": {
            "embed": {"embedding": rng.standard_normal((7, 5)).astype(jnp.bfloat16)},
            "block_0": {
                "mlp": {"up": rng.standard_normal((5, 3, 2)).astype(jnp.bfloat16)},
                "norm": {"scale": rng.standard_normal(5).astype(np.float32)},
            },
            "bias": np.asarray(rng.standard_normal(), np.float32),  # a scalar
        }
    }


def leaves_with_keys(tree: dict) -> list[tuple[list[str], np.ndarray]]:
    return [([k.key for k in p], x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


@pytest.mark.parametrize("compress", [False, True])
def test_reads_equal_orbax_restore_into_aligned_flat_buffers(tmp_path, compress):
    tree = make_tree(0)
    out = ck.save_params(tmp_path / "m", tree, compress=compress)
    files = ca.ArrayFiles.open(out / ck.PARAMS_ITEM)
    assert files is not None
    restored = {tuple(k): x for k, x in leaves_with_keys(ck.load_params(out))}
    by_dtype: dict = {}
    for keys, x in leaves_with_keys(tree):
        assert files.has(keys)
        by_dtype.setdefault(x.dtype, []).append((keys, x))
    for dtype, items in by_dtype.items():
        layout = ca.FlatLayout([x.shape for _, x in items], dtype)
        flat = layout.empty(ca.aligned_empty((layout.nbytes + 100,), np.uint8))
        views = layout.views(flat)
        files.read_into([k for k, _ in items], views)
        for (keys, x), v in zip(items, views):
            assert v.dtype == x.dtype and v.shape == x.shape
            assert v.ctypes.data % ca.ALIGNMENT == 0
            assert np.shares_memory(v, flat)
            np.testing.assert_array_equal(v, x)
            np.testing.assert_array_equal(v, np.asarray(restored[tuple(keys)]))
        # The gaps between arrays are zeros, so elementwise work over the buffer stays finite.
        mask = np.ones(layout.size, bool)
        for o, (_, x) in zip(layout.offsets, items):
            mask[o : o + x.size] = False
        assert not flat[mask].any()
    assert not files.has(["params", "missing"])


def test_flat_layout_offsets_are_aligned_and_dense():
    layout = ca.FlatLayout([(3,), (), (17, 2), (16,)], jnp.bfloat16)
    step = ca.ALIGNMENT // 2  # elements per alignment unit for 2-byte values
    assert layout.offsets == [0, step, 2 * step, 4 * step]
    assert layout.size == 5 * step and layout.nbytes == 10 * step
    views = layout.views(layout.empty())
    assert [v.shape for v in views] == [(3,), (), (17, 2), (16,)]


def test_buffer_pool_hands_back_the_smallest_fitting_buffer():
    pool = ca.BufferPool()
    a, b = pool.take(100), pool.take(1000)
    assert a.nbytes == 100 and a.ctypes.data % ca.ALIGNMENT == 0
    pool.give([b, a])
    assert pool.take(50) is a
    assert pool.take(50) is b  # the next best fit
    fresh = pool.take(50)  # none left: a new one
    assert fresh is not a and fresh is not b and fresh.nbytes == 50
    pool.give([a])
    assert pool.take(2000).nbytes == 2000  # none big enough


def test_other_layouts_are_declined(tmp_path):
    tree = make_tree(1)
    handler = ocp.PyTreeCheckpointHandler(use_ocdbt=False)  # one directory per array
    with ocp.Checkpointer(handler) as no_ocdbt:
        no_ocdbt.save(tmp_path / "no_ocdbt", args=ocp.args.PyTreeSave(tree))
    assert ca.ArrayFiles.open(tmp_path / "no_ocdbt") is None
    assert ca.ArrayFiles.open(tmp_path / "nothing_here") is None


def test_errors_name_the_array_and_a_damaged_index_is_declined(tmp_path):
    tree = make_tree(2)
    out = ck.save_params(tmp_path / "m", tree)
    params_dir = out / ck.PARAMS_ITEM
    files = ca.ArrayFiles.open(params_dir)
    with pytest.raises(ValueError, match=r"array params\.block_0\.mlp\.up has shape \(5, 3, 2\)"):
        files.read_into([["params", "block_0", "mlp", "up"]], [np.empty((2, 3), jnp.bfloat16)])
    with pytest.raises(ValueError, match=r"array params\.nope: .*NOT_FOUND"):
        files.read_into([["params", "nope"]], [np.empty(3, np.float32)])
    # Truncated OCDBT files (index and data): declined here, so callers read through Orbax,
    # whose errors (and the fingerprints) report the damage.
    for f in params_dir.rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert ca.ArrayFiles.open(params_dir) is None
