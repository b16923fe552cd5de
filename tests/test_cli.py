"""The `warm-jax` command line: help texts, gin flags, and clean errors for bad input."""

import subprocess
import sys

import gin
import pytest

from warm_jax import cli
from warm_jax import config as cfg
from warm_jax.errors import UserError


def test_help_lists_subcommands_and_shipped_gin_files(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("quickstart", "pretrain", "merge", "data"):
        assert name in out
    for gin_file in ("models/tiny.gin", "models/small.gin", "models/smollm2_135m.gin"):
        assert gin_file in out


def test_subcommand_help_explains_and_lists_gin_files():
    proc = subprocess.run(
        [sys.executable, "-m", "warm_jax.cli", "pretrain", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0
    assert "--gin_file" in proc.stdout and "--workdir" in proc.stdout
    assert "experiments/pretrain_oracle.gin" in proc.stdout


def test_unknown_subcommand_is_an_error(capsys):
    assert cli.main(["pretrian"]) == 2
    assert "unknown subcommand 'pretrian'" in capsys.readouterr().err


def test_gin_bindings_are_split_from_flags():
    rest, bindings = cli.split_gin_bindings(
        ["--workdir", "w", "--gin.train.num_steps=5", "--gin.model_config.d_model", "32"]
    )
    assert rest == ["--workdir", "w"]
    assert bindings == ["train.num_steps = 5", "model_config.d_model = 32"]
    with pytest.raises(UserError, match="without a value"):
        cli.split_gin_bindings(["--gin.train.num_steps"])


def test_gin_overrides_reach_the_configured_functions():
    cfg.parse(["models/tiny"], ["model_config.d_model = 40", "pretrain/train.num_steps = 7"])
    from warm_jax.models import transformer as tm

    assert tm.model_config().d_model == 40
    assert gin.query_parameter("pretrain/train.num_steps") == 7


def test_unknown_gin_parameter_names_the_culprit(tmp_path):
    bad = tmp_path / "bad.gin"
    bad.write_text("model_config.d_model = 32\ntrain.num_stepz = 3\n")
    with pytest.raises(UserError, match="num_stepz"):
        cfg.parse([str(bad)], [])
        # Unknown parameters of a **kwargs-free function are rejected at parse time.
    with pytest.raises(UserError, match="no_such_function"):
        cfg.parse([], ["no_such_function.x = 1"])
    with pytest.raises(UserError, match="gin file not found: 'models/huge'"):
        cfg.parse(["models/huge"], [])


def test_cli_reports_bad_gin_without_traceback(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "warm_jax.cli",
            "pretrain",
            "--workdir",
            str(tmp_path / "w"),
            "--gin.train.num_stepz=3",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "warm-jax pretrain: error:" in proc.stderr and "num_stepz" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "w").exists()


def test_mesh_that_does_not_fit_is_reported_before_training(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "warm_jax.cli",
            "pretrain",
            "--workdir",
            str(tmp_path / "w"),
            "--gin.make_mesh.axes=(('data', 3),)",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "needs 3 devices, but 1 are available" in proc.stderr
    assert not list((tmp_path / "w").glob("checkpoints/*"))
