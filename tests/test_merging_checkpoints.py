"""Streaming checkpoint merges and `warm-jax merge`: equality with the in-memory merges,
the JSON record, atomic output, clear errors before any output exists, shardings."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from warm_jax import cli
from warm_jax import merging as mg
from warm_jax import merging_checkpoints as mc
from warm_jax.errors import UserError
from warm_jax.training import checkpoint_arrays as ca
from warm_jax.training import checkpoints as ck

# A read of a damaged checkpoint fails inside Orbax's event loop, whose leftover callbacks
# later hit the closed loop; that noise surfaces as an unraisable-exception warning.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

BF16 = jnp.bfloat16
# Small enough that every merge below runs over several chunks.
TINY_CHUNK_MB = 100 / 2**20


def make_tree(seed: int, dtype=np.float32) -> dict:
    rng = np.random.default_rng(seed)

    def r(*shape):
        return np.asarray(rng.standard_normal(shape), np.float32).astype(dtype)

    blocks = {
        f"block_{i}": {"attn": {"q": r(4, 3)}, "mlp": {"up": r(3, 5)}, "attn_norm": {"scale": r(3)}}
        for i in range(3)
    }
    return {"params": {"embed": {"embedding": r(6, 3)}, **blocks, "final_norm": {"scale": r(3)}}}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict:
    """base + 3 fine-tunes, in float32 and bfloat16."""
    root = tmp_path_factory.mktemp("ckpts")
    out = {}
    for name, dtype in (("f32", np.float32), (BF16.__name__, jnp.dtype(BF16))):
        trees = [make_tree(i, dtype) for i in range(4)]
        paths = []
        for i, t in enumerate(trees):
            p = root / f"{name}_{i}"
            ck.save_params(p, t, {"model": {"d_model": 3}, "name": f"model {i}"})
            paths.append(p)
        out[name] = (paths, trees)
    return out


def load(path: Path) -> dict:
    return jax.tree.map(np.asarray, ck.load_params(path))


def assert_bitwise_equal(x, y):
    assert jax.tree.structure(x) == jax.tree.structure(y)
    for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y)):
        assert np.asarray(a).dtype == np.asarray(b).dtype
        np.testing.assert_array_equal(np.asarray(a, np.float64), np.asarray(b, np.float64))


@pytest.mark.parametrize("dtype", ["f32", "bfloat16"])
@pytest.mark.parametrize("weights", [None, [1.0, 2.0, 5.0]])
def test_streaming_average_equals_in_memory_average(ckpts, tmp_path, dtype, weights):
    paths, trees = ckpts[dtype]
    out = mc.merge_checkpoints(
        "average", paths[1:], tmp_path / "avg", weights=weights, chunk_mb=TINY_CHUNK_MB
    )
    assert_bitwise_equal(load(out), mg.average(trees[1:], weights))
    record = ck.load_metadata(out)["merge"]
    assert record["method"] == "average"
    assert [i["path"] for i in record["inputs"]] == [str(p) for p in paths[1:]]
    w = np.asarray(weights or [1, 1, 1], float)
    np.testing.assert_allclose(record["weights"], w / w.sum())
    assert record["accumulation"] == "float32"
    # The first input's metadata (model config) is carried over for loaders.
    assert ck.load_metadata(out)["model"] == {"d_model": 3}


def _count_host_reads(monkeypatch) -> list:
    calls = []
    real = ca.ArrayFiles.read_into

    def counting(self, keys, outs):
        calls.append(len(keys))
        return real(self, keys, outs)

    monkeypatch.setattr(ca.ArrayFiles, "read_into", counting)
    return calls


@pytest.mark.parametrize("route", ["host, one pass", "host, passes of 2", "orbax", "mixed"])
def test_average_is_the_same_whichever_way_it_is_read_and_folded(
    ckpts, tmp_path, monkeypatch, route
):
    """Inputs read straight through TensorStore (into flat buffers, averaged whole) or through
    Orbax's restore (leaf by leaf), folded all at once or over several passes with a float32
    accumulator: the same bits as the in-memory average."""
    paths, trees = ckpts["bfloat16"]
    inputs, expected = list(paths[:4]), mg.average(trees[:4], [1.0, 2.0, 5.0, 0.5])
    host_reads = _count_host_reads(monkeypatch)
    if route == "host, passes of 2":
        monkeypatch.setattr(mc, "FOLD_MAX", 2)
    if route == "orbax":
        monkeypatch.setattr(ca.ArrayFiles, "open", classmethod(lambda cls, d: None))
    if route == "mixed":  # one input in a layout only Orbax reads: all go through Orbax
        handler = ocp.PyTreeCheckpointHandler(use_ocdbt=False)
        with ocp.Checkpointer(handler) as no_ocdbt:
            no_ocdbt.save(tmp_path / "plain" / ck.PARAMS_ITEM, args=ocp.args.PyTreeSave(trees[3]))
        inputs[3] = tmp_path / "plain"
    out = mc.merge_checkpoints(
        "average",
        inputs,
        tmp_path / "avg",
        weights=[1.0, 2.0, 5.0, 0.5],
        chunk_mb=TINY_CHUNK_MB,
        progress=False,
    )
    assert_bitwise_equal(load(out), expected)
    assert bool(host_reads) == route.startswith("host")
    if host_reads:  # every leaf of every input, read once
        assert sum(host_reads) == 4 * len(jax.tree.leaves(trees[0]))


def test_fold_sizes_keep_the_working_set_of_oversized_chunks():
    """An average merges min(M, FOLD_MAX) inputs per pass; a chunk bigger than asked (one large
    array) merges fewer per pass, so that its working set stays within the budget."""
    mb = 2**20 / 4  # parameters in a float32 MB
    # bfloat16, M = 8, two reads ahead: (8 + 2 + 1) * 2 = 22 bytes per parameter at the full fold.
    ws = mc.AVERAGE_WORKING_SET_MB
    assert mc.default_chunk_mb("average", 8, 2, host=True) == pytest.approx(ws * 4 / 22)
    assert mc.default_chunk_mb("slerp", 8, 2) == mc.DEFAULT_CHUNK_MB["slerp"]
    # A chunk of n parameters merged k < 8 per pass holds (k + 2 + 1) * 2 + 4 bytes each; the
    # budget of a 100 MB chunk is 100 * 22: 110 MB -> 2k + 10 <= 20 -> k = 5; 150 MB -> k = 2.
    sizes = [100 * mb, 50 * mb, 110 * mb, 150 * mb, 200 * mb, 10**12]
    assert mc.fold_sizes(sizes, 100, 8, 2, host=True) == [8, 8, 5, 2, 1, 1]
    # Through Orbax (one read ahead) and with fewer inputs than FOLD_MAX.
    assert mc.fold_sizes([100 * mb], 100, 3, 4, host=False) == [3]


@pytest.mark.parametrize("granularity", ["leaf", "layer"])
def test_streaming_slerp_and_liti_equal_in_memory(ckpts, tmp_path, granularity):
    paths, trees = ckpts["bfloat16"]
    kw = dict(base=paths[0], granularity=granularity, chunk_mb=TINY_CHUNK_MB)
    out = mc.merge_checkpoints("slerp", paths[1:3], tmp_path / "s2", t=0.3, **kw)
    expected2 = mg.slerp(trees[0], trees[1], trees[2], 0.3, granularity=granularity)
    assert_bitwise_equal(load(out), expected2)
    assert ck.load_metadata(out)["merge"]["t"] == 0.3

    out = mc.merge_checkpoints("slerp", paths[1:], tmp_path / "s3", **kw)
    expected3 = mg.slerp_many(trees[0], trees[1:], granularity=granularity)
    assert_bitwise_equal(load(out), expected3)
    assert "1/M" in ck.load_metadata(out)["merge"]["t_rule"]

    out = mc.merge_checkpoints("liti", paths[1:], tmp_path / "l3", eta=0.3, **kw)
    assert_bitwise_equal(load(out), mg.liti(trees[0], expected3, 0.3))
    out = mc.merge_checkpoints("liti", paths[1:2], tmp_path / "l1", eta=0.3, **kw)
    assert_bitwise_equal(load(out), mg.liti(trees[0], trees[1], 0.3))


def test_layer_chunks_never_split_a_block():
    paths = mg.leaf_paths(make_tree(0))
    shapes = jax.tree.leaves(
        jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), make_tree(0))
    )
    groups = mg.leaf_groups(paths, "layer")
    for chunk_bytes in (1, 100, 200, 10**9):
        chunks = mc.plan_chunks(paths, shapes, groups, chunk_bytes)
        assert sorted(i for c in chunks for i in c) == list(range(len(paths)))
        owner = {}
        for k, c in enumerate(chunks):
            for i in c:
                assert owner.setdefault(groups[i], k) == k
    assert len(mc.plan_chunks(paths, shapes, groups, 10**9)) == 1
    assert len(mc.plan_chunks(paths, shapes, groups, 1)) == len(set(groups))


def test_inputs_may_be_training_workdirs_and_step_dirs(ckpts, tmp_path):
    paths, trees = ckpts["f32"]
    tc = ck.TrainCheckpoints(tmp_path / "run", every=1)
    for step, t in ((1, trees[3]), (2, trees[1])):
        tc.save(step, params=t, train={"step": np.int32(step)}, data_state={}, meta={}, force=True)
    tc.wait()
    tc.close()
    step1 = tmp_path / "run" / "checkpoints" / "1"
    out = mc.merge_checkpoints("average", [tmp_path / "run", step1, paths[2]], tmp_path / "o")
    assert_bitwise_equal(load(out), mg.average([trees[1], trees[3], trees[2]]))


def test_sharded_streaming_merge_keeps_shardings(ckpts):
    paths, trees = ckpts["f32"]
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)

    def spec(x):
        return {(4, 3): P("data", None), (6, 3): P("model", None)}.get(x.shape, P())

    shardings = jax.tree.map(lambda x: NamedSharding(mesh, spec(x)), trees[0])
    cps = [mc.open_checkpoint(p) for p in paths]
    spec_ = mc.make_spec("slerp", 3, has_base=True)
    merged = mc.merge_streaming(spec_, cps[1:], cps[0], shardings=shardings, chunk_mb=TINY_CHUNK_MB)
    assert jax.tree.map(lambda x: x.sharding, merged) == shardings
    # Sharded dot products add their partial sums in another order: equal up to rounding.
    expected = mg.slerp_many(trees[0], trees[1:])
    for x, y in zip(jax.tree.leaves(merged), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-6)
    fsdp = mc.fsdp_shardings(cps[0].shapes)
    assert fsdp["params"]["block_0"]["attn"]["q"].spec == P(None, None)  # 4 and 3 % 8 != 0
    assert fsdp["params"]["block_0"]["attn"]["q"].mesh.size == 8


# ---------------------------------------------------------------------------------- errors


def no_output_left(tmp_path: Path, name: str) -> bool:
    return not any(
        p.name.startswith(name) or p.name.startswith(f".{name}") for p in tmp_path.iterdir()
    )


def test_missing_or_mismatched_inputs_fail_before_any_output(ckpts, tmp_path):
    paths, _ = ckpts["f32"]
    with pytest.raises(UserError, match=r"input 2: checkpoint not found: .*nope"):
        mc.merge_checkpoints("average", [paths[1], tmp_path / "nope"], tmp_path / "out")
    other = make_tree(9)
    other["params"]["block_1"]["mlp"]["up"] = np.zeros((3, 6), np.float32)
    ck.save_params(tmp_path / "other", other)
    with pytest.raises(UserError, match=r"params/block_1/mlp/up has shape \(3, 6\)"):
        mc.merge_checkpoints("average", [paths[1], tmp_path / "other"], tmp_path / "out")
    bf16_paths, _ = ckpts["bfloat16"]
    with pytest.raises(UserError, match="dtype"):
        mc.merge_checkpoints("slerp", [paths[1], paths[2]], tmp_path / "out", base=bf16_paths[0])
    assert no_output_left(tmp_path, "out")


@pytest.mark.parametrize("damage", ["manifest", "data"])
def test_partial_checkpoint_fails_before_any_output(ckpts, tmp_path, damage):
    paths, _ = ckpts["f32"]
    broken = tmp_path / "broken"
    shutil.copytree(paths[2], broken)
    params = broken / ck.PARAMS_ITEM
    if damage == "manifest":
        (params / "manifest.ocdbt").unlink()
    else:  # a copy interrupted while copying the array data
        for f in params.rglob("d/*"):
            f.write_bytes(f.read_bytes()[:10])
    with pytest.raises(UserError, match="input 2") as err:
        mc.merge_checkpoints("average", [paths[1], broken], tmp_path / "out")
    assert "broken" in str(err.value)
    assert no_output_left(tmp_path, "out")


def test_existing_output_is_kept_unless_overwrite(ckpts, tmp_path):
    paths, trees = ckpts["f32"]
    out = mc.merge_checkpoints("average", paths[1:3], tmp_path / "out")
    with pytest.raises(UserError, match="already exists"):
        mc.merge_checkpoints("average", paths[2:4], tmp_path / "out")
    assert_bitwise_equal(load(out), mg.average(trees[1:3]))
    mc.merge_checkpoints("average", paths[2:4], tmp_path / "out", overwrite=True)
    assert_bitwise_equal(load(out), mg.average(trees[2:4]))
    with pytest.raises(UserError, match="would overwrite"):
        mc.merge_checkpoints("average", [out, paths[1]], out, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary directory left


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(method="slerp"), "needs --base"),
        (dict(method="liti", base=True), "needs --eta"),
        (dict(method="average", base=True), "takes no --base"),
        (dict(method="average", t=0.5), "not --t"),
        (dict(method="average", weights=[1.0, 2.0]), "2 weights given for 3"),
        (dict(method="average", weights=[1.0, -1.0, 1.0]), "non-negative"),
        (dict(method="slerp", base=True, t=0.5), "exactly 2 inputs"),
        (dict(method="slerp", base=True, weights=[1, 1, 1]), "no --weights"),
        (dict(method="slerp", base=True, eta=0.3), "no --eta"),
        (dict(method="slerp", base=True, granularity="row"), "granularity"),
        (dict(method="ties"), "unknown merge method"),
    ],
)
def test_bad_coefficients_are_user_errors(ckpts, tmp_path, kwargs, message):
    paths, _ = ckpts["f32"]
    kwargs = dict(kwargs)
    method = kwargs.pop("method")
    if kwargs.pop("base", False):
        kwargs["base"] = paths[0]
    with pytest.raises(UserError, match=message):
        mc.merge_checkpoints(method, paths[1:], tmp_path / "out", **kwargs)
    assert no_output_left(tmp_path, "out")


# ---------------------------------------------------------------------------------- CLI


def test_cli_merge(ckpts, tmp_path, capsys):
    paths, trees = ckpts["bfloat16"]
    argv = ["merge", "--method", "liti", "--base", str(paths[0]), "--inputs"]
    argv += [str(p) for p in paths[1:3]] + ["--t", "0.25", "--eta", "0.5", "--granularity", "leaf"]
    # (The persistent compilation cache is process-wide: keep it out of the test session.)
    argv += ["--output", str(tmp_path / "merged"), "--no_progress", "--no_compilation_cache"]
    assert cli.main(argv) == 0
    assert "merged 2 checkpoint(s) with liti" in capsys.readouterr().out
    s = mg.slerp(trees[0], trees[1], trees[2], 0.25, granularity="leaf")
    assert_bitwise_equal(load(tmp_path / "merged"), mg.liti(trees[0], s, 0.5))
    meta = json.loads((tmp_path / "merged" / ck.META_FILE).read_text())
    assert (meta["merge"]["method"], meta["merge"]["t"], meta["merge"]["eta"]) == (
        "liti",
        0.25,
        0.5,
    )
    assert meta["merge"]["base"]["path"] == str(paths[0])

    bad = ["merge", "--method", "average", "--inputs", str(tmp_path / "missing")]
    assert cli.main([*bad, "--output", str(tmp_path / "x"), "--no_compilation_cache"]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------- multi-host

WORKER = """
import sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_num_cpu_devices", 2)
pid, port, root = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
from warm_jax import merging_checkpoints as mc
inputs = [f"{root}/f32_{i}" for i in (1, 2, 3)]
mc.merge_checkpoints("slerp", inputs, f"{root}/out", base=f"{root}/f32_0", chunk_mb=1e-4)
"""


@pytest.mark.slow
def test_two_process_merge_writes_each_process_shards(ckpts):
    """Two JAX processes (2 CPU devices each) merge one checkpoint: each restores, merges and
    writes its own shards; the result equals the single-process merge."""

    paths, trees = ckpts["f32"]
    root = paths[0].parent
    helpers.run_two_processes(WORKER, str(root))
    out = root / "out"
    assert sorted(p.name for p in (out / ck.PARAMS_ITEM).glob("ocdbt.process_*")) == [
        "ocdbt.process_0",
        "ocdbt.process_1",
    ]
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), ck.params_shapes(out)
    )
    got, expected = ck.load_params(out, target), mg.slerp_many(trees[0], trees[1:])
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):  # sharded sums: rounding
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-6)
    assert not [p for p in root.iterdir() if p.name.startswith(".out")]
    shutil.rmtree(out)
