"""Small shared fixtures for the tests: a tiny model and learnable toy token data."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

from warm_jax.models import transformer as tm
from warm_jax.training import lm

TINY = tm.TransformerConfig(
    vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64
)


def toy_lm_data(n: int = 64, length: int = 16, seed: int = 0) -> dict:
    """Token rows where every odd token is its predecessor + 1: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    toks = rng.integers(1, TINY.vocab_size, (n, length)).astype(np.int32)
    toks[:, 1::2] = toks[:, 0::2] % (TINY.vocab_size - 1) + 1
    return {"tokens": toks, "segment_ids": np.ones_like(toks)}


def tiny_train_kwargs(config=TINY) -> dict:
    return {
        "param_axes": tm.param_logical_axes(config),
        "init_fn": lambda k: tm.init_params(config, k),
        "progress": False,
    }


def tiny_loss(config=TINY):
    return lm.lm_loss_fn(config)


def run_two_processes(script: str, *args: str, drop_env: tuple[str, ...] = ()) -> None:
    """Runs `python -c script PROCESS_ID PORT *args` as processes 0 and 1 of one JAX program
    (a free loopback port for the coordinator) and fails with both logs unless both exit 0."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    for name in drop_env:
        env.pop(name, None)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(i), str(port), *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for i in range(2)
    ]
    logs = [p.communicate(timeout=240)[0].decode(errors="replace") for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
