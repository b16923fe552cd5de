"""A real `warm-jax pretrain` process killed with SIGKILL resumes to the uninterrupted result."""

import os
import signal
import subprocess
import sys
import time

import chex
import jax

from warm_jax.training import checkpoints

FLAGS = [
    "--gin.pretrain.num_documents=400",
    "--gin.pretrain.batch_size=8",
    "--gin.pretrain.seq_len=32",
    "--gin.model_config.d_model=32",
    "--gin.model_config.n_layers=1",
    "--gin.model_config.head_dim=8",
    "--gin.model_config.d_ff=64",
    "--gin.pretrain/train.num_steps=60",
    "--gin.pretrain/train.checkpoint_every=5",
    "--gin.pretrain/train.eval_every=0",
    "--gin.pretrain/train.progress=False",
]


def _cmd(workdir):
    return [sys.executable, "-m", "warm_jax.cli", "pretrain", "--workdir", str(workdir), *FLAGS]


def _env():
    return {**os.environ, "XLA_FLAGS": "--xla_backend_optimization_level=0"}


def test_sigkill_then_same_command_reaches_the_uninterrupted_parameters(tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    subprocess.run(_cmd(ref), check=True, env=_env(), capture_output=True, timeout=300)

    proc = subprocess.Popen(
        _cmd(run), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 240
    ckpt_dir = run / "checkpoints"
    while time.time() < deadline:
        steps = (
            [int(p.name) for p in ckpt_dir.glob("*") if p.name.isdigit()]
            if ckpt_dir.exists()
            else []
        )
        if steps and max(steps) >= 15:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = checkpoints.TrainCheckpoints(run, every=5).latest_step()
    assert killed_at is not None and killed_at < 60, killed_at

    subprocess.run(_cmd(run), check=True, env=_env(), capture_output=True, timeout=300)
    chex.assert_trees_all_equal(
        jax.device_get(checkpoints.load_params(run)), jax.device_get(checkpoints.load_params(ref))
    )
