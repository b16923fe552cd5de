"""Meshes, parameter placement and sharded numerics on 8 emulated CPU devices."""

import chex
import jax
import pytest
from helpers import TINY, tiny_loss, tiny_train_kwargs, toy_lm_data
from jax.sharding import PartitionSpec as P

from warm_jax import sharding as shd
from warm_jax.errors import UserError
from warm_jax.models import transformer as tm
from warm_jax.training import loop

MESHES = {
    "data": (("data", -1),),
    "fsdp": (("fsdp", -1),),
    "tensor": (("data", 2), ("model", 4)),
    "fsdp+tensor": (("fsdp", 4), ("model", 2)),
}


def _specs(mesh_axes):
    mesh = shd.make_mesh(mesh_axes)
    shapes = jax.eval_shape(lambda k: tm.init_params(TINY, k), jax.random.PRNGKey(0))
    sh = shd.tree_shardings(tm.param_logical_axes(TINY), shapes, mesh, shd.logical_rules())
    return jax.tree.map(lambda s: s.spec, sh)["params"]


def test_mesh_construction_and_errors():
    mesh = shd.make_mesh((("data", 2), ("fsdp", -1), ("model", 1)))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "model": 1}
    with pytest.raises(UserError, match="needs 6 devices, but 8"):
        shd.make_mesh((("data", 3), ("model", 2)))
    with pytest.raises(UserError, match="at most one axis may be -1"):
        shd.make_mesh((("data", -1), ("model", -1)))
    with pytest.raises(UserError, match="cannot be split"):
        shd.make_mesh((("data", -1), ("model", 3)))


def test_parameter_placement_per_layout():
    data = _specs(MESHES["data"])
    assert all(s == P(None, None, None) or set(s) == {None} for s in jax.tree.leaves(data))
    fsdp = _specs(MESHES["fsdp"])
    assert fsdp["block_0"]["attn"]["q"] == P("fsdp", None, None)
    assert fsdp["block_0"]["mlp"]["down"] == P(None, "fsdp")
    assert fsdp["embed"]["embedding"] == P(None, "fsdp")
    tp = _specs(MESHES["tensor"])
    assert tp["block_0"]["attn"]["q"] == P(None, "model", None)
    assert tp["block_0"]["attn"]["o"] == P("model", None, None)
    assert tp["block_0"]["mlp"]["gate"] == P(None, "model")
    assert tp["embed"]["embedding"] == P("model", None)
    # 2 KV heads cannot be split 4 ways: replicated rather than failing.
    assert tp["block_0"]["attn"]["k"] == P(None, None, None)
    both = _specs(MESHES["fsdp+tensor"])
    assert both["block_0"]["mlp"]["gate"] == P("fsdp", "model")
    assert both["block_0"]["attn"]["k"] == P("fsdp", "model", None)


@pytest.mark.parametrize("layout", sorted(MESHES))
def test_sharded_forward_equals_unsharded(layout):
    params = tm.init_params(TINY, jax.random.PRNGKey(0))
    toks = jax.random.randint(jax.random.PRNGKey(1), (8, 12), 0, TINY.vocab_size)
    ref = tm.apply(params, TINY, toks)
    mesh = shd.make_mesh(MESHES[layout])
    rules = shd.logical_rules()
    sh = shd.tree_shardings(tm.param_logical_axes(TINY), params, mesh, rules)
    sparams = jax.device_put(params, sh)
    stoks = jax.device_put(toks, shd.batch_shardings(toks, mesh, rules))
    out = jax.jit(lambda p, t: tm.apply(p, TINY, t))(sparams, stoks)
    chex.assert_trees_all_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["data", "fsdp", "tensor"])
def test_sharded_training_equals_single_device(tmp_path, layout):
    def run(mesh, wd):
        return loop.train(
            tiny_loss(),
            loop.ArrayBatches(toy_lm_data(), 16, seed=0),
            workdir=wd,
            mesh=mesh,
            num_steps=3,
            checkpoint_every=100,
            **tiny_train_kwargs(),
        )

    single = run(shd.make_mesh((("data", 1),), devices=jax.devices()[:1]), tmp_path / "one")
    sharded = run(shd.make_mesh(MESHES[layout]), tmp_path / layout)
    gate = sharded.params["params"]["block_0"]["mlp"]["gate"]
    expected = _specs(MESHES[layout])["block_0"]["mlp"]["gate"]
    assert gate.sharding.spec == expected  # created and kept sharded through training
    chex.assert_trees_all_close(
        jax.device_get(sharded.params), jax.device_get(single.params), atol=1e-5, rtol=1e-4
    )
