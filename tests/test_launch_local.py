"""`launch/local.py`: one `warm-jax` job as several JAX processes on this CPU (gloo collectives).

The same short training run, as 2 processes of 1 device each and as 1 process, must end with
the same parameters: data order is fixed by the global batch (shuffled before sharding), and
the processes' gradients are reduced across processes inside the jitted step.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np
import pytest

from warm_jax.errors import UserError
from warm_jax.io import distributed
from warm_jax.training import checkpoints

ROOT = Path(__file__).resolve().parent.parent
LAUNCHER = ROOT / "launch" / "local.py"

PRETRAIN = [
    "warm-jax",
    "pretrain",
    "--gin.pretrain.num_documents=400",
    "--gin.pretrain.batch_size=8",
    "--gin.pretrain.seq_len=32",
    "--gin.pretrain.progress=False",
    "--gin.model_config.n_layers=1",
    "--gin.pretrain/train.num_steps=4",
    "--gin.pretrain/train.checkpoint_every=4",
    "--gin.pretrain/train.eval_every=0",
    "--gin.pretrain/train.log_every=2",
]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # The test process runs on 8 emulated devices; the launched ones must not inherit that.
    env.pop("JAX_NUM_CPU_DEVICES", None)
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
    env["JAX_COMPILATION_CACHE_DIR"] = os.path.join(
        tempfile.gettempdir(), f"warm_jax_test_xla_cache_{os.getuid()}"
    )
    return env


def launch(num_processes: int, workdir: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            *(sys.executable, str(LAUNCHER), "--num_processes", str(num_processes), *extra),
            *("--", *PRETRAIN, "--workdir", str(workdir)),
        ],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )


def _host_params(workdir: Path):
    """The final parameters, restored onto this process's first device whatever the saved
    topology (a checkpoint of 2 processes is read by 1)."""
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shapes = checkpoints.params_shapes(workdir)
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), shapes)
    return jax.tree.map(np.asarray, checkpoints.load_params(workdir, target=target))


def test_two_processes_train_like_one(tmp_path):
    two = launch(2, tmp_path / "two", "--log_dir", str(tmp_path / "logs"))
    assert two.returncode == 0, two.stdout[-3000:]
    # Both processes ran and joined one cluster.
    for i in (0, 1):
        assert f"[{i}] pretrained 4 steps" in two.stdout
        assert "pretrained 4 steps" in (tmp_path / "logs" / f"process_{i}.log").read_text()
    one = launch(1, tmp_path / "one")
    assert one.returncode == 0, one.stdout[-3000:]

    a, b = _host_params(tmp_path / "one"), _host_params(tmp_path / "two")
    diffs = jax.tree.leaves(jax.tree.map(lambda x, y: float(np.abs(x - y).max()), a, b))
    moved = jax.tree.leaves(jax.tree.map(lambda x: float(np.abs(x).max()), a))
    assert max(diffs) < 1e-5, max(diffs)
    assert max(moved) > 0.1  # the comparison is about trained weights, not zeros


FAIL = (
    "import os, sys, time\nif os.environ['WARM_JAX_PROCESS_ID'] == '1': sys.exit(3)\ntime.sleep(60)"
)


def test_a_failing_process_stops_the_launch(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(LAUNCHER), "--num_processes", "2", "--", sys.executable, "-c", FAIL],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 3
    assert "process 1 exited with status 3" in proc.stdout


def test_environment_contract():
    env = distributed.local_env("127.0.0.1:1234", 4, 2)
    assert env == {
        "WARM_JAX_DISTRIBUTED": "local",
        "WARM_JAX_COORDINATOR": "127.0.0.1:1234",
        "WARM_JAX_NUM_PROCESSES": "4",
        "WARM_JAX_PROCESS_ID": "2",
    }
    assert distributed.initialize_from_env({}) is False  # nothing asked: single process
    with pytest.raises(UserError, match="outside"):
        distributed.initialize_from_env(distributed.local_env("127.0.0.1:1", 2, 5))
    with pytest.raises(UserError, match="choose from"):
        distributed.initialize_from_env({"WARM_JAX_DISTRIBUTED": "slurmish"})
