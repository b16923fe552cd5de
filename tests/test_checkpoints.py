"""Params checkpoints: atomic writes, shape checks, and loaders that accept any layout."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from warm_jax.errors import UserError
from warm_jax.training import checkpoints as ck


def _tree(scale=1.0):
    return {
        "params": {
            "block_0": {"w": jnp.arange(6.0).reshape(2, 3) * scale},
            "b": jnp.ones(4, jnp.bfloat16),
        }
    }


def test_save_and_load_params_round_trip(tmp_path):
    out = ck.save_params(tmp_path / "m", _tree(), {"method": "test", "n": 2})
    assert sorted(p.name for p in out.iterdir()) == ["params", "warm_jax.json"]
    loaded = ck.load_params(out)
    chex.assert_trees_all_equal(loaded, _tree())
    assert loaded["params"]["b"].dtype == jnp.bfloat16
    assert ck.load_metadata(out) == {"method": "test", "n": 2}
    shapes = ck.params_shapes(out)
    assert shapes["params"]["block_0"]["w"].shape == (2, 3)


def test_overwrite_replaces_atomically_and_leaves_no_temporaries(tmp_path):
    ck.save_params(tmp_path / "m", _tree(1.0))
    ck.save_params(tmp_path / "m", _tree(2.0))
    np.testing.assert_array_equal(
        ck.load_params(tmp_path / "m")["params"]["block_0"]["w"][1, 2], 10.0
    )
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_failed_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    ck.save_params(tmp_path / "m", _tree(1.0))

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "commit_directory", boom)
    with pytest.raises(OSError, match="disk full"):
        ck.save_params(tmp_path / "m", _tree(3.0))
    np.testing.assert_array_equal(
        ck.load_params(tmp_path / "m")["params"]["block_0"]["w"][1, 2], 5.0
    )
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_shape_mismatch_names_the_parameter(tmp_path):
    ck.save_params(tmp_path / "m", _tree())
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _tree())
    target["params"]["block_0"]["w"] = jax.ShapeDtypeStruct((3, 3), jnp.float32)
    with pytest.raises(UserError, match=r"\['params'\]\['block_0'\]\['w'\] has shape \(2, 3\)"):
        ck.load_params(tmp_path / "m", target)
    del target["params"]["b"]
    with pytest.raises(UserError, match="unexpected"):
        ck.load_params(tmp_path / "m", target)


def test_missing_or_foreign_directories_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match="checkpoint not found"):
        ck.load_params(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no model weights"):
        ck.load_params(tmp_path / "empty")


def test_relative_paths_work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ck.save_params("rel/m", _tree())
    chex.assert_trees_all_equal(ck.load_params("rel/m"), _tree())
