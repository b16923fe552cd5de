"""Promise 2: a merge, an export, a dataset preparation or a checkpoint interrupted part-way
(SIGKILL at a random moment, or an exception injected into the writer) leaves at its output path
either the previous complete state or nothing, and later commands never take a partial directory
for a valid one."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds

from warm_jax import cli
from warm_jax import merging as mg
from warm_jax import merging_checkpoints as mc
from warm_jax.errors import UserError
from warm_jax.training import checkpoints as ck

from . import common
from .common import ORBAX_TMP

# A read of a damaged checkpoint fails inside Orbax's event loop, whose leftover callbacks later
# hit the closed loop; that noise surfaces as an unraisable-exception warning.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


class Injected(Exception):
    """The fault these tests inject."""


def versioned_tree(v: int) -> dict:
    return {"params": {"a": np.full((64, 64), v, np.float32), "b": np.full((7,), v, np.int32)}}


def assert_consistent_version(path: Path) -> int:
    """The checkpoint at `path` is complete: it loads (fingerprints checked) and every array and
    the metadata come from one and the same save."""
    meta = ck.load_metadata(path)
    tree = common.host(ck.load_params(path))
    v = meta["version"]
    for x in (tree["params"]["a"], tree["params"]["b"]):
        assert (x == v).all(), (v, np.unique(x))
    return v


def visible_entries(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if not p.name.startswith("."))


# ------------------------------------------------------------------------- save_params, killed

SAVE_LOOP = """
import sys
import numpy as np
from warm_jax.training import checkpoints as ck
v = 0
while True:
    v += 1
    tree = {"params": {"a": np.full((64, 64), v, np.float32), "b": np.full((7,), v, np.int32)}}
    ck.save_params(sys.argv[1], tree, {"version": v})
"""


def _kill_overwrite_loop(out: Path, rng: random.Random, log: Path) -> int:
    """Starts a process that overwrites `out` with version 1, 2, ... and SIGKILLs it at a random
    moment once a few versions exist; returns the version found afterwards."""
    proc = common.start([sys.executable, "-c", SAVE_LOOP, str(out)], log)
    before = assert_consistent_version(out) if out.exists() else 0
    delay = rng.uniform(0.0, 0.3)

    def a_few_overwrites_later() -> bool:
        try:
            return json.loads((out / ck.META_FILE).read_text())["version"] >= before + 2
        except (OSError, ValueError, KeyError):
            return False  # between two versions or not written yet: keep polling

    assert common.kill_when(proc, common.delayed(a_few_overwrites_later, delay), timeout=120)
    return assert_consistent_version(out)


@pytest.mark.parametrize("kills", [pytest.param(2), pytest.param(8, marks=pytest.mark.slow)])
def test_save_params_killed_mid_overwrite_leaves_one_complete_version(tmp_path, kills):
    rng = random.Random(kills)
    out = tmp_path / "ckpt"
    seen = [_kill_overwrite_loop(out, rng, tmp_path / "log.txt") for _ in range(kills)]
    assert seen == sorted(seen) and seen[0] >= 2
    # Killed writers may leave hidden temporaries beside it, never anything a loader picks up.
    assert visible_entries(tmp_path) == ["ckpt", "log.txt"]
    ck.save_params(out, versioned_tree(1000), {"version": 1000})
    assert assert_consistent_version(out) == 1000


# ------------------------------------------------------------- save_params, every failure point


class FailAt:
    """Raises Injected at the n-th call of any wrapped file-system function made by our commit
    logic. Orbax's own file operations are left alone: a failure injected there leaves Orbax
    threads waiting minutes for a signal (its limit, not ours); the SIGKILL test above covers
    deaths inside Orbax's writes."""

    def __init__(self, n: int):
        self.n, self.calls = n, 0

    def wrap(self, fn):
        def wrapped(*args, **kwargs):
            if not any(ORBAX_TMP in str(a) for a in args):
                self.calls += 1
                if self.calls == self.n:
                    raise Injected(f"call {self.n}: {getattr(fn, '__name__', fn)}{args[:2]}")
            return fn(*args, **kwargs)

        return wrapped


@pytest.mark.parametrize("exchange", [True, False], ids=["rename-exchange", "two-renames"])
def test_save_params_failing_at_every_file_operation_keeps_a_complete_checkpoint(
    tmp_path, monkeypatch, exchange
):
    """Each rename, removal, temporary-directory creation and metadata write of an overwrite is
    made to fail in turn; the path always holds the old or the new version, whole."""
    out = tmp_path / "ckpt"
    ck.save_params(out, versioned_tree(1), {"version": 1})
    if not exchange:  # the path taken where the OS cannot swap two directories atomically
        monkeypatch.setattr(ck, "_exchange", lambda a, b: False)
    targets = [
        (os, "replace"),
        (os, "rename"),
        (shutil, "rmtree"),
        (ck.tempfile, "mkdtemp"),
        (ck, "_exchange"),
        (Path, "write_text"),
    ]
    real = {(mod, name): getattr(mod, name) for mod, name in targets}
    outcomes = []
    for n in range(1, 100):
        fail = FailAt(n)
        for (mod, name), fn in real.items():
            monkeypatch.setattr(mod, name, fail.wrap(fn))
        try:
            ck.save_params(out, versioned_tree(n + 1), {"version": n + 1})
            failed = False
        except Injected:
            failed = True
        finally:
            for (mod, name), fn in real.items():
                monkeypatch.setattr(mod, name, fn)
        found = assert_consistent_version(out)
        outcomes.append((failed, found))
        if not failed:
            assert found == n + 1
            break
        ck.save_params(out, versioned_tree(1), {"version": 1})  # back to the old version
    assert outcomes[-1][0] is False, "the save never got through all its file operations"
    assert len(outcomes) >= 5, outcomes  # several distinct failure points were exercised
    assert visible_entries(tmp_path) == ["ckpt"]


def test_an_overwrite_interrupted_between_two_renames_is_reported_with_the_old_copy(tmp_path):
    out = tmp_path / "ckpt"
    ck.save_params(out, versioned_tree(1), {"version": 1})
    os.replace(out, tmp_path / ".ckpt.old-12345")  # what a kill between the renames leaves
    with pytest.raises(UserError, match=r"interrupted overwrite .*\.ckpt\.old-12345"):
        ck.load_params(out)


# ------------------------------------------------------------------------------------ merges


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("merge_inputs")
    paths = []
    for i in range(4):
        rng = np.random.default_rng(i)
        tree = {
            "params": {
                f"block_{j}": {"w": rng.standard_normal((8, 4)).astype(np.float32)}
                for j in range(3)
            }
        }
        paths.append(ck.save_params(root / f"m{i}", tree, {"name": f"m{i}"}))
    return paths


def expected_average(paths):
    return mg.average([common.host(ck.load_params(p)) for p in paths])


def test_merge_failing_midway_leaves_nothing_or_the_previous_output(tmp_path, inputs, monkeypatch):
    rng = random.Random(7)
    out = tmp_path / "merged"
    real_read = mc._Reader.read
    reads = len(inputs) * 3  # 4 inputs x 3 chunks (TINY chunk size below)
    chunk_mb = 130 / 2**20

    def failing_after(k):
        count = [0]

        def read(self, *args, **kwargs):
            count[0] += 1
            if count[0] > k:
                raise Injected(f"read {count[0]}")
            return real_read(self, *args, **kwargs)

        return read

    # 1. A first merge dies part-way through its reads: nothing appears.
    monkeypatch.setattr(mc._Reader, "read", failing_after(rng.randrange(1, reads)))
    with pytest.raises(Injected):
        mc.merge_checkpoints("average", inputs, out, chunk_mb=chunk_mb, progress=False)
    assert list(tmp_path.iterdir()) == []
    # 2. It succeeds; an overwrite then dies while writing: the first result stays whole.
    monkeypatch.setattr(mc._Reader, "read", real_read)
    mc.merge_checkpoints("average", inputs[:2], out, chunk_mb=chunk_mb, progress=False)
    first = common.host(ck.load_params(out))
    common.assert_trees_bitwise_equal(first, expected_average(inputs[:2]))

    def dies_writing(tmp, final):
        assert (tmp / ck.PARAMS_ITEM / ck.FINGERPRINTS_FILE).is_file()  # it got that far
        raise Injected("killed before the rename")

    monkeypatch.setattr(ck, "commit_directory", dies_writing)
    with pytest.raises(Injected):
        mc.merge_checkpoints(
            "average", inputs[2:], out, chunk_mb=chunk_mb, overwrite=True, progress=False
        )
    common.assert_trees_bitwise_equal(ck.load_params(out), first)
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]


@pytest.mark.slow
def test_merge_command_killed_at_random_moments(tmp_path, inputs):
    rng = random.Random(11)
    expected = expected_average(inputs)
    for attempt in range(4):
        out = tmp_path / f"merged{attempt}"
        cmd = [sys.executable, "-m", "warm_jax.cli", "merge", "--method", "average",
               "--inputs", *map(str, inputs), "--output", str(out), "--no_progress",
               "--chunk_mb", str(130 / 2**20)]  # fmt: skip
        proc = common.start(cmd, tmp_path / "log.txt")
        delay = rng.uniform(1.0, 8.0)  # from the imports to past the end of the merge
        common.kill_when(proc, common.delayed(lambda: True, delay), timeout=120)
        if out.exists():
            common.assert_trees_bitwise_equal(ck.load_params(out), expected)
        else:  # the output path was never created: a rerun starts from nothing
            subprocess.run(cmd, env=common.env(), check=True, capture_output=True, timeout=300)
            common.assert_trees_bitwise_equal(ck.load_params(out), expected)


# ------------------------------------------------------------------------------------ export


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    import jax

    from warm_jax.data.tokenizer import train_tokenizer
    from warm_jax.experiments import pretrain as pretrain_lib
    from warm_jax.models import transformer as tm

    root = tmp_path_factory.mktemp("model")
    tokenizer = train_tokenizer(["alpha beta gamma delta", "beta gamma"], 16, kind="word")
    config = tm.TransformerConfig(
        vocab_size=64, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8, d_ff=32
    )
    shapes = jax.eval_shape(lambda: tm.init_params(config, jax.random.PRNGKey(0)))
    rng = np.random.default_rng(0)  # random weights without compiling the initialiser
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), shapes)
    ck.save_params(root, params, {"model": config.to_dict()})
    pretrain_lib.save_model_files(root, config, tokenizer)
    return root


def test_export_failing_midway_leaves_nothing_or_the_previous_export(
    tmp_path, model_dir, monkeypatch
):
    import safetensors.numpy

    from warm_jax.experiments import checkpoint_io

    dest = tmp_path / "hf"
    real_save = safetensors.numpy.save_file

    def dies_half_written(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        Path(filename).write_bytes(Path(filename).read_bytes()[:100])  # cut mid-file
        raise Injected("killed while writing the weights")

    monkeypatch.setattr(safetensors.numpy, "save_file", dies_half_written)
    with pytest.raises(Injected):
        checkpoint_io.export_checkpoint(model_dir, f"hf:{dest}")
    assert list(tmp_path.iterdir()) == []

    monkeypatch.setattr(safetensors.numpy, "save_file", real_save)
    checkpoint_io.export_checkpoint(model_dir, f"hf:{dest}")
    (dest / "README.md").write_text("notes kept across exports")
    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(before)

    monkeypatch.setattr(safetensors.numpy, "save_file", dies_half_written)
    with pytest.raises(Injected):
        checkpoint_io.export_checkpoint(model_dir, f"hf:{dest}", dtype="bfloat16")
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]
    # A later successful export replaces the export and keeps the unrelated file.
    monkeypatch.setattr(safetensors.numpy, "save_file", real_save)
    checkpoint_io.export_checkpoint(model_dir, f"hf:{dest}", dtype="bfloat16")
    assert json.loads((dest / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert (dest / "README.md").read_text() == "notes kept across exports"


# ------------------------------------------------------------------------- dataset preparation


def _prepare_argv(tmp_path: Path) -> list[str]:
    return ["data", "prepare", "--dataset", "hh_rlhf/helpful_base",
            "--manual_dir", str(tmp_path / "manual"), "--data_dir", str(tmp_path / "data"),
            "--tokenizer", str(tmp_path / "tok"), "--max_len", "12"]  # fmt: skip


def _hh_inputs(tmp_path: Path) -> None:
    from test_data_fixtures import hh_lines, write_hh

    from warm_jax.data.tokenizer import train_tokenizer

    write_hh(tmp_path / "manual")
    texts = [line[k] for line in hh_lines() for k in ("chosen", "rejected")]
    train_tokenizer(texts, 200, "word").save(tmp_path / "tok")


def test_data_prepare_failing_midway_leaves_no_dataset_a_reader_accepts(
    tmp_path, monkeypatch, capsys
):
    from warm_jax.data import builders, hh_rlhf

    tfds.disable_progress_bar()
    _hh_inputs(tmp_path)
    real = hh_rlhf.HhRlhf._generate_examples
    served = [0]

    def dies_after_some_rows(self, rows):
        for i, row in enumerate(real(self, rows)):
            if i == len(rows) // 2:
                raise Injected("killed mid-split")
            served[0] += 1
            yield row

    monkeypatch.setattr(hh_rlhf.HhRlhf, "_generate_examples", dies_after_some_rows)
    with pytest.raises(Injected):
        cli.main(_prepare_argv(tmp_path))
    assert served[0] > 0  # some records were written before the failure
    version_dir = tmp_path / "data" / "hh_rlhf" / "helpful_base" / "1.0.0"
    assert not (version_dir / "dataset_info.json").exists()
    assert not (version_dir / "summary.json").exists()
    # Readers do not take the leftovers for a dataset: the builder says it is not prepared, and
    # a rerun of the same command regenerates everything from scratch.
    builder = builders.get_builder("hh_rlhf/helpful_base", tmp_path / "data")
    assert not builder.is_prepared()
    monkeypatch.setattr(hh_rlhf.HhRlhf, "_generate_examples", real)
    capsys.readouterr()
    assert cli.main(_prepare_argv(tmp_path)) == 0
    summary = json.loads((version_dir / "summary.json").read_text())
    assert summary["examples"] == {"train": 33, "validation": 4}
    rows = builders.read_split(builders.get_builder("hh_rlhf/helpful_base", tmp_path / "data"),
                               "train")  # fmt: skip
    assert len(rows) == 33 and len({r["id"] for r in rows}) == 33


@pytest.mark.slow
def test_data_prepare_command_killed_at_random_moments(tmp_path):
    from warm_jax.data import builders

    _hh_inputs(tmp_path)
    argv = [sys.executable, "-m", "warm_jax.cli", *_prepare_argv(tmp_path)]
    version_dir = tmp_path / "data" / "hh_rlhf" / "helpful_base" / "1.0.0"
    rng = random.Random(5)
    for _ in range(3):
        proc = common.start(argv, tmp_path / "log.txt")
        common.kill_when(proc, common.delayed(lambda: True, rng.uniform(2.0, 10.0)), timeout=120)
        if (version_dir / "dataset_info.json").exists():  # then it is whole
            builder = builders.get_builder("hh_rlhf/helpful_base", tmp_path / "data")
            assert len(builders.read_split(builder, "train")) == 33
    subprocess.run(argv, env=common.env(), check=True, capture_output=True, timeout=300)
    summary = json.loads((version_dir / "summary.json").read_text())
    assert summary["examples"] == {"train": 33, "validation": 4}


# --------------------------------------------------------------------- training checkpoints


@pytest.mark.slow  # test_disk_full.py runs the same scenario with ENOSPC in the default set
def test_checkpoint_write_failing_in_the_background_keeps_the_previous_step(
    tmp_path, monkeypatch, reference
):
    """The asynchronous write of step 3 fails part-way (after its arrays, in its JSON item);
    the run stops, step 2 stays the latest, nothing half-written is read, and the rerun
    resumes from step 2 to the uninterrupted result."""
    import orbax.checkpoint as ocp

    from . import tiny_train

    real = ocp.JsonCheckpointHandler._save_fn
    calls = []

    def dies_on_step_3(self, item, directory):
        calls.append(str(directory))
        if "3.orbax-checkpoint-tmp" in str(directory):
            raise Injected(f"killed while writing {directory}")
        return real(self, item, directory)

    monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", dies_on_step_3)
    n = reference["num_steps"]
    with pytest.raises(Injected):
        tiny_train.run(tmp_path / "run", n, 1, record=False)
    assert any("3.orbax-checkpoint-tmp" in c for c in calls)
    assert common.finished_steps(tmp_path / "run") == [1, 2]
    assert ck.load_metadata(tmp_path / "run")["step"] == 2

    monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", real)
    resumed = tiny_train.run(tmp_path / "run", n, 4, record=False)
    assert resumed.resumed_from == 2
    assert common.writes_in_flight(tmp_path / "run") == []
    common.assert_trees_bitwise_equal(resumed.params, reference["params"])
    assert common.loss_history(tmp_path / "run") == common.loss_history(reference["workdir"])
