"""Params checkpoints: atomic writes, shape checks, and loaders that accept any layout."""

import chex
import helpers
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
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


def _orbax_shapes(params_dir):
    meta = ocp.StandardCheckpointer().metadata(params_dir).item_metadata.tree
    return jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(tuple(m.shape), np.dtype(m.dtype)),
        meta,
        is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"),
    )


def test_shapes_record_equals_orbax_metadata_and_is_checked(tmp_path):
    out = ck.save_params(tmp_path / "m", _tree())
    record = out / ck.PARAMS_ITEM / ck.SHAPES_FILE
    assert record.is_file()
    from_record = ck.params_shapes(out)
    chex.assert_trees_all_equal_structs(from_record, _orbax_shapes(out / ck.PARAMS_ITEM))
    assert jax.tree.map(lambda s: (s.shape, s.dtype), from_record) == jax.tree.map(
        lambda s: (s.shape, s.dtype), _orbax_shapes(out / ck.PARAMS_ITEM)
    )
    assert from_record["params"]["b"].dtype == jnp.bfloat16
    # A damaged record is named, not trusted.
    for text, why in [
        ("{", "corrupt shapes file"),
        ('{"leaves": [[["params", "w"], [2, "x"], "float32"]]}', r"entry 0: invalid literal"),
        ('{"leaves": [[["p"], [2], "float32"], [["p", "w"], [2], "float32"]]}', "clashes"),
        ('{"leaves": [[["p"], [2], "no_such_dtype"]]}', "entry 0"),
    ]:
        record.write_text(text)
        with pytest.raises(ck.CorruptCheckpointError, match=f"{record}.*{why}|{why}.*{record}"):
            ck.load_params(out)
    # Checkpoints without a record (earlier versions) read their shapes through Orbax.
    record.unlink()
    assert ck.params_shapes(out) == from_record
    chex.assert_trees_all_equal(ck.load_params(out), _tree())


def test_trees_other_than_nested_dicts_get_no_shapes_record(tmp_path):
    tree = {"params": [np.arange(3.0), np.ones((2, 2), np.float32)]}
    out = ck.save_params(tmp_path / "m", tree)
    assert not (out / ck.PARAMS_ITEM / ck.SHAPES_FILE).exists()
    assert ck.params_shapes(out)["params"][1].shape == (2, 2)


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


def _reference_fingerprint(x: np.ndarray) -> int:
    """The definition, in Python integers: sum over elements of raw bits x (2 i + 1), mod 2**32."""
    x = np.ascontiguousarray(x).reshape(-1)
    unsigned = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint32}[x.dtype.itemsize]
    bits = x.astype(np.uint8) if x.dtype == np.bool_ else x.view(unsigned)
    return sum(int(b) * (2 * i + 1) for i, b in enumerate(bits.tolist())) % 2**32


@pytest.mark.parametrize(
    "dtype", [np.float32, jnp.bfloat16, np.float16, np.int32, np.uint8, np.bool_]
)
def test_host_and_device_fingerprints_agree_with_the_definition(dtype):
    """Host (numpy, row and column sums with wrap-around) and device (jitted) fingerprints of the same array
    are the same number, the one the definition gives, across chunk boundaries; so checkpoints
    fingerprinted by either path verify with the other."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((37, 29)) * 1000).astype(np.float32)
    x = (x > 0) if dtype is np.bool_ else x.astype(dtype)
    want = _reference_fingerprint(x)
    for width in (7, 64, 1 << 20):  # many rows and a ragged end; one ragged end only
        assert ck._host_fingerprint(x, width=width) == want
    assert int(ck._device_fingerprint(jnp.asarray(x))) == want
    # Large values: the uint32 products and sums wrap around, as they do on the device.
    big = np.full(3000, np.uint32(0xFFFFFFFF))
    assert ck._host_fingerprint(big, width=1000) == _reference_fingerprint(big)
    assert ck._host_fingerprint(big, width=7) == _reference_fingerprint(big)
    assert int(ck._device_fingerprint(jnp.asarray(big))) == _reference_fingerprint(big)
    # Numpy and single-CPU-device arrays are fingerprinted on the host, arrays over several
    # devices by the jitted reduction; all give the same strings.
    mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
    spread = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    assert ck._on_host(x) and ck._on_host(jnp.asarray(x)) and not ck._on_host(spread)
    fps = ck.fingerprints({"a": x, "b": {"c": jnp.asarray(x)}, "d": spread})
    assert fps["['a']"] == fps["['b']['c']"] == fps["['d']"] == f"{want:08x}:{np.dtype(dtype).name}"


def _data_bytes(params_dir) -> int:
    return sum(f.stat().st_size for f in params_dir.rglob("*") if f.parent.name == "d")


def test_params_are_written_uncompressed_and_compressed_ones_still_load(tmp_path):
    """Zeros make compression visible: 1 MiB of them takes ~1 MiB uncompressed, a few hundred
    bytes with zstd (how earlier versions wrote params checkpoints). Both load, verified."""
    tree = {"params": {"zeros": np.zeros((512, 512), np.float32), "w": np.arange(12.0)}}
    plain = ck.save_params(tmp_path / "plain", tree)
    packed = ck.save_params(tmp_path / "packed", tree, compress=True)
    assert _data_bytes(plain / ck.PARAMS_ITEM) >= 512 * 512 * 4
    assert _data_bytes(packed / ck.PARAMS_ITEM) < 64 * 1024
    for out in (plain, packed):
        assert ck.saved_fingerprints(out / ck.PARAMS_ITEM) == ck.fingerprints(tree)
        chex.assert_trees_all_equal(jax.tree.map(np.asarray, ck.load_params(out)), tree)
    # As the StandardCheckpointer of earlier versions wrote them (compressed, no fingerprints).
    with ocp.StandardCheckpointer() as old:
        old.save(tmp_path / "old" / ck.PARAMS_ITEM, tree)
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, ck.load_params(tmp_path / "old")), tree)


# ---------------------------------------------------------------------------------- multi-host

SAVE_WORKER = """
import sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_num_cpu_devices", 2)
pid, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from warm_jax.training import checkpoints as ck
mesh = jax.make_mesh((4,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
for scale in (1.0, 2.0):  # a fresh write, then an overwrite
    full = scale * np.arange(8 * 6, dtype=np.float32).reshape(8, 6)
    w = jax.make_array_from_callback(full.shape, NamedSharding(mesh, P("x")), lambda i: full[i])
    tree = {"params": {"w": w, "b": np.full(3, scale, np.float32)}}
    ck.save_params(out, tree, {"writer": jax.process_index(), "scale": scale})
"""


def test_two_processes_save_one_params_checkpoint(tmp_path):
    """Two JAX processes (2 CPU devices each) save a tree holding an array sharded over all 4
    devices, twice (a write, then an overwrite): they share one temporary directory, each writes
    its own shards, and only process 0 writes the side files and renames the result into place."""

    out = tmp_path / "out"
    helpers.run_two_processes(SAVE_WORKER, str(out), drop_env=("JAX_NUM_CPU_DEVICES",))
    assert sorted(p.name for p in (out / ck.PARAMS_ITEM).glob("ocdbt.process_*")) == [
        "ocdbt.process_0",
        "ocdbt.process_1",
    ]
    assert ck.load_metadata(out) == {"writer": 0, "scale": 2.0}
    want = {
        "params": {
            "w": 2.0 * np.arange(8 * 6, dtype=np.float32).reshape(8, 6),
            "b": np.full(3, 2.0, np.float32),
        }
    }
    assert ck.saved_fingerprints(out / ck.PARAMS_ITEM) == ck.fingerprints(want)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), ck.params_shapes(out)
    )
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, ck.load_params(out, target)), want)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary or old copy left
