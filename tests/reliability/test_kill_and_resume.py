"""Promise 1: a training run SIGKILLed at any moment — including while Orbax is writing a
checkpoint asynchronously — and restarted with the same command ends with the parameters,
metrics history and data order of a run that was never killed. (tests/test_kill_resume.py covers
one kill of `warm-jax pretrain` after a finished checkpoint; this covers kills inside the write,
several seeded random kills, and a WARM job killed between its stages.)"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from warm_jax.training import checkpoints as ck

from . import common
from .conftest import NUM_STEPS


def assert_same_as_reference(run: Path, reference: dict) -> None:
    common.assert_trees_bitwise_equal(ck.load_params(run), reference["params"])
    assert ck.load_metadata(run)["step"] == NUM_STEPS
    assert common.loss_history(run) == common.loss_history(reference["workdir"])
    order, _ = common.data_order(run)
    assert order == common.data_order(reference["workdir"])[0]
    assert len(order) == NUM_STEPS


def test_sigkill_during_async_checkpoint_write_then_rerun_matches(tmp_path, reference):
    """The kill lands while a step directory is still Orbax's temporary one; the rerun ignores
    and removes it, resumes from the last finished step and ends bit-identical."""
    run = tmp_path / "run"
    cmd = common.train_cmd(run, NUM_STEPS, 1)  # a write in flight nearly all the time
    landed = None
    for _attempt in range(3):  # a write that completes between poll and kill does not count
        proc = common.start(cmd, tmp_path / "log.txt")

        def writing_step_3_or_later() -> bool:
            return any(int(n.split(".")[0]) >= 3 for n in common.writes_in_flight(run))

        assert common.kill_when(proc, writing_step_3_or_later), (tmp_path / "log.txt").read_text()
        in_flight = common.writes_in_flight(run)
        if in_flight:
            landed = (in_flight, common.finished_steps(run))
            break
    assert landed is not None, "no kill landed inside a checkpoint write in 3 attempts"
    _, finished = landed
    assert finished and max(finished) < NUM_STEPS
    killed_at = max(finished)
    # A loader given the workdir reads the last finished step, never the half-written one.
    assert ck.load_metadata(run)["step"] == killed_at

    common.run_to_completion(cmd)
    assert common.writes_in_flight(run) == []  # the rerun cleaned up the unfinished write
    assert_same_as_reference(run, reference)
    # The rerun restarted the data stream exactly where the restored checkpoint left it.
    _, starts = common.data_order(run)
    assert starts[0][1] == 0 and starts[-1][1] == killed_at


@pytest.mark.slow
def test_several_seeded_random_kills_then_rerun_matches(tmp_path, reference):
    rng = random.Random(20240607)
    run = tmp_path / "run"
    cmd = common.train_cmd(run, NUM_STEPS, 1)
    kills = 0
    for _ in range(3):
        done = max(common.finished_steps(run), default=0)
        if done >= NUM_STEPS - 1:
            break
        target = rng.randint(done + 1, NUM_STEPS - 1)
        delay = rng.uniform(0.0, 0.4)  # a random moment inside the step, not only at a boundary
        proc = common.start(cmd, tmp_path / "log.txt")
        kills += common.kill_when(proc, common.after_step(run, target, delay))
    assert kills >= 2
    assert max(common.finished_steps(run)) < NUM_STEPS
    common.run_to_completion(cmd)
    assert_same_as_reference(run, reference)
    _, starts = common.data_order(run)
    assert len(starts) == kills + 1  # every process resumed where the previous one stopped


# ------------------------------------------------------------------------- WARM between stages

TINY_MODEL = {
    "vocab_size": 192,
    "d_model": 32,
    "n_layers": 2,
    "n_heads": 4,
    "n_kv_heads": 2,
    "head_dim": 8,
    "d_ff": 64,
    "max_len": 64,
}
RMS_FLAGS = [
    "--gin.train_rms.num_members=2",
    "--gin.train_rms.num_steps=6",
    "--gin.train_rms.batch_size=16",
    "--gin.train_rms.probe_steps=5",
    "--gin.train_rms.progress=False",
    "--gin.train_rms.max_validation_pairs=16",
    "--gin.pair_data.num_train=48",
    "--gin.pair_data.num_validation=16",
    "--gin.pair_data.num_ood=16",
    "--gin.pair_data.max_len=48",
    "--gin.member_specs.learning_rates=(1e-3, 3e-3)",
    "--gin.member_specs.dropout_rates=(0.0, 0.1)",
    "--gin.rm/train.checkpoint_every=1",
    "--gin.rm/train.max_to_keep=None",  # every step kept: a redone step would show
]


def _sft_dir(root: Path) -> Path:
    from warm_jax.data import oracle_task
    from warm_jax.data.tokenizer import train_tokenizer
    from warm_jax.experiments import pretrain as pretrain_lib
    from warm_jax.models import transformer as tm

    tokenizer = train_tokenizer(oracle_task.sample_corpus(300, 0), 192, kind="word")
    config = pretrain_lib.sized_config(tm.TransformerConfig(**TINY_MODEL), tokenizer.vocab_size)
    params = tm.init_params(config, jax.random.PRNGKey(1))
    ck.save_params(root / "checkpoints" / "1", params, {"step": 1})
    pretrain_lib.save_model_files(root, config, tokenizer)
    return root


def _rms_cmd(workdir: Path, sft: Path) -> list[str]:
    return [
        sys.executable, "-m", "warm_jax.cli", "train-rms", "--workdir", str(workdir),
        "--init_from", str(sft), *RMS_FLAGS,
    ]  # fmt: skip


def _snapshot(path: Path) -> dict[str, int]:
    return {str(p.relative_to(path)): p.stat().st_mtime_ns for p in path.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_train_rms_killed_between_members_resumes_at_the_member_it_was_in(tmp_path):
    sft = _sft_dir(tmp_path / "sft")
    ref, run = tmp_path / "ref", tmp_path / "run"
    common.run_to_completion(_rms_cmd(ref, sft), timeout=600)

    proc = common.start(_rms_cmd(run, sft), tmp_path / "log.txt")
    m0_done = run / "members" / "m0" / "hparams.json"
    m1_ckpts = run / "members" / "m1"

    def inside_second_member() -> bool:
        return m0_done.is_file() and len(common.finished_steps(m1_ckpts)) >= 2

    assert common.kill_when(proc, inside_second_member, timeout=600)
    assert not (run / "warm").exists()
    m1_steps = common.finished_steps(m1_ckpts)
    assert 2 <= max(m1_steps) < 6 and not (m1_ckpts / "hparams.json").exists()
    probe_and_m0 = {**_snapshot(run / "probe"), **_snapshot(run / "members" / "m0")}
    m1_before = {s: _snapshot(m1_ckpts / "checkpoints" / str(s)) for s in m1_steps}

    proc = subprocess.run(_rms_cmd(run, sft), env=common.env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The finished stages were not redone: their files are untouched.
    assert {**_snapshot(run / "probe"), **_snapshot(run / "members" / "m0")} == probe_and_m0
    # m1 resumed from its last checkpoint: the steps it had finished were not written again.
    assert {s: _snapshot(m1_ckpts / "checkpoints" / str(s)) for s in m1_steps} == m1_before
    assert common.finished_steps(m1_ckpts) == list(range(1, 7))
    for name in ("members/m0", "members/m1", "warm"):
        common.assert_trees_bitwise_equal(ck.load_params(run / name), ck.load_params(ref / name))
    for i in (0, 1):
        a = json.loads((run / f"members/m{i}/hparams.json").read_text())
        b = json.loads((ref / f"members/m{i}/hparams.json").read_text())
        assert a["validation_accuracy"] == b["validation_accuracy"]
        assert a["train_metrics"] == b["train_metrics"]
    assert ck.load_metadata(run / "warm")["members"] == ["m0", "m1"]
