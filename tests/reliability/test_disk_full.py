"""Promise 6: a checkpoint or a merge written to a filesystem that runs out of space fails with a
clear message (a UserError saying so), frees what it had written, and keeps the previous
checkpoint usable. Exercised two ways: ENOSPC injected into the Python write path (runs
anywhere), and a real, tiny tmpfs (where this process may mount one, e.g. as root)."""

from __future__ import annotations

import builtins
import contextlib
import errno
import io
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from warm_jax import merging_checkpoints as mc
from warm_jax.errors import UserError
from warm_jax.training import checkpoints as ck

from . import common, tiny_train

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def tree(v: float, n: int = 64) -> dict:
    return {"params": {"w": np.full((n, n), v, np.float32), "b": np.full((n,), v, np.float32)}}


@contextlib.contextmanager
def disk_full_under(root: Path, monkeypatch):
    """Every file opened for writing under `root` fails as on a full disk."""
    real_open = builtins.open
    prefix = str(root)

    def full_open(file, mode="r", *args, **kwargs):
        writing = not isinstance(file, int) and any(c in mode for c in "wax+")
        if writing and os.fspath(file).startswith(prefix):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(file))
        return real_open(file, mode, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(builtins, "open", full_open)
        m.setattr(io, "open", full_open)
        yield


def noise(n: int) -> dict:
    """Incompressible: training checkpoints are compressed, where a constant array of any size
    takes a few bytes."""
    rng = np.random.default_rng(n)
    return {"params": {"w": rng.standard_normal((n, n)).astype(np.float32)}}


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# ------------------------------------------------------------------------- injected ENOSPC


def test_params_checkpoint_on_a_full_disk_keeps_the_previous_one(tmp_path, monkeypatch):
    out = ck.save_params(tmp_path / "ckpt", tree(1.0), {"version": 1})
    with (
        disk_full_under(tmp_path, monkeypatch),
        pytest.raises(UserError, match=rf"cannot write checkpoint {out}: no space left on device"),
    ):
        ck.save_params(out, tree(2.0), {"version": 2})
    assert leftovers(tmp_path) == []  # the partial copy was removed, its space freed
    common.assert_trees_bitwise_equal(ck.load_params(out), tree(1.0))
    assert ck.load_metadata(out) == {"version": 1}


def test_merge_onto_a_full_disk_keeps_the_previous_output(tmp_path, monkeypatch):
    inputs = [ck.save_params(tmp_path / f"in{i}", tree(float(i))) for i in range(3)]
    out = mc.merge_checkpoints("average", inputs[:2], tmp_path / "out" / "merged", progress=False)
    with (
        disk_full_under(tmp_path / "out", monkeypatch),
        pytest.raises(UserError, match="no space left on device"),
    ):
        mc.merge_checkpoints("average", inputs[1:], out, overwrite=True, progress=False)
    common.assert_trees_bitwise_equal(ck.load_params(out), tree(0.5))
    assert leftovers(out.parent) == []


def test_training_checkpoint_on_a_full_disk_stops_cleanly_and_resumes(
    tmp_path, monkeypatch, reference
):
    """The disk fills while the asynchronous save of step 3 writes its JSON items: the run stops
    with a message naming step 3 and the intact step 2, the unfinished step is deleted, and once
    space is back the same command resumes from step 2 to the uninterrupted result."""
    import orbax.checkpoint as ocp

    real = ocp.JsonCheckpointHandler._save_fn
    run = tmp_path / "run"

    def full_from_step_3(self, item, directory):
        if "3.orbax-checkpoint-tmp" in str(directory):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
        return real(self, item, directory)

    monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", full_from_step_3)
    with pytest.raises(
        UserError,
        match=r"no space left on device while writing the checkpoint of step 3 .*"
        r"the last complete checkpoint, step 2, is intact",
    ):
        tiny_train.run(run, reference["num_steps"], 1, record=False)
    assert common.finished_steps(run) == [1, 2]
    assert common.writes_in_flight(run) == []  # its space handed back
    monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", real)
    resumed = tiny_train.run(run, reference["num_steps"], 4, record=False)
    assert resumed.resumed_from == 2
    common.assert_trees_bitwise_equal(resumed.params, reference["params"])
    # Step 2 lies inside a log window (lines every 3 steps): the line at step 3 still averages
    # steps 1-3, as in the run that never stopped.
    assert common.loss_history(run) == common.loss_history(reference["workdir"])


def test_cli_reports_a_full_disk_as_a_message(tmp_path, monkeypatch, capsys):
    from warm_jax import cli

    inputs = [ck.save_params(tmp_path / f"in{i}", tree(float(i))) for i in range(2)]
    argv = ["merge", "--method", "average", "--inputs", *map(str, inputs),
            "--output", str(tmp_path / "out" / "m"), "--no_progress"]  # fmt: skip
    with disk_full_under(tmp_path / "out", monkeypatch):
        assert cli.main(argv) == 2
    assert "warm-jax merge: error: cannot write checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "out" / "m").exists() and leftovers(tmp_path / "out") == []


# -------------------------------------------------------------------------- a real tmpfs


@contextlib.contextmanager
def tmpfs(path: Path, size_kb: int):
    path.mkdir(parents=True, exist_ok=True)
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mount.stderr.strip()}); ENOSPC is injected above")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def resize(path: Path, size_kb: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size_kb}k", str(path)], check=True)


def test_params_checkpoint_on_a_really_full_tmpfs(tmp_path):
    with tmpfs(tmp_path / "disk", 600) as disk:
        out = ck.save_params(disk / "ckpt", tree(1.0), {"version": 1})  # ~20 KB: fits
        used = shutil.disk_usage(disk).used
        with pytest.raises(UserError, match="no space left on device") as err:
            ck.save_params(out, noise(512), {"version": 2})  # 1 MB of noise: does not
        assert "the existing one is unchanged" in str(err.value)
        assert leftovers(disk) == [] and shutil.disk_usage(disk).used <= used
        common.assert_trees_bitwise_equal(ck.load_params(out), tree(1.0))
        # Once there is room the same save goes through.
        resize(disk, 8192)
        ck.save_params(out, noise(512), {"version": 2})
        common.assert_trees_bitwise_equal(ck.load_params(out), noise(512))


@pytest.mark.slow
def test_training_on_a_really_full_tmpfs_stops_cleanly_then_resumes(tmp_path, reference):
    # Room for about three steps as a filesystem counts them (whole blocks; a step is written
    # once per process and then merged, so its peak is larger than what it keeps).
    step = reference["workdir"] / "checkpoints" / "4"
    one_step = sum(f.stat().st_blocks * 512 for f in step.rglob("*") if f.is_file())
    with tmpfs(tmp_path / "disk", (3 * one_step) // 1024 + 256) as disk:
        run = disk / "run"
        with pytest.raises(UserError, match=r"no space left on device while writing") as err:
            tiny_train.run(run, reference["num_steps"], 1, record=False, max_to_keep=None)
        kept = common.finished_steps(run)
        assert kept and f"step {kept[-1]}, is intact" in str(err.value)
        assert common.writes_in_flight(run) == []
        ck.load_params(run)  # the last complete step loads (fingerprints checked)
        resize(disk, 64 * 1024)
        resumed = tiny_train.run(run, reference["num_steps"], 4, record=False)
        assert resumed.resumed_from == kept[-1]
        assert common.writes_in_flight(run) == []
        common.assert_trees_bitwise_equal(resumed.params, reference["params"])
