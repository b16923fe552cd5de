"""Shared pieces of the fault-injection tests: subprocesses to kill, polling, comparisons."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

from warm_jax.training import checkpoints as ck

HERE = Path(__file__).resolve().parent
TINY_TRAIN = HERE / "tiny_train.py"
ORBAX_TMP = ".orbax-checkpoint-tmp"


def env() -> dict:
    """The subprocess environment: the pytest process's own (XLA flags included, set by
    tests/conftest.py), so that the killed runs compile exactly what the reference compiles."""
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}


def train_cmd(workdir: Path, num_steps: int, every: int, *extra: str) -> list[str]:
    return [sys.executable, str(TINY_TRAIN), str(workdir), str(num_steps), str(every), *extra]


def run_to_completion(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, env=env(), stdout=out, stderr=subprocess.STDOUT)


def kill_when(
    proc: subprocess.Popen, condition: Callable[[], bool], timeout: float = 240, poll: float = 0.001
) -> bool:
    """SIGKILLs `proc` as soon as `condition()` holds; False if the process ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        if proc.poll() is not None:
            return False
        time.sleep(poll)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    raise AssertionError(f"condition not reached within {timeout} s")


def delayed(condition: Callable[[], bool], delay: float) -> Callable[[], bool]:
    """A kill condition: `delay` seconds after `condition()` first held."""
    reached: list[float] = []

    def check() -> bool:
        if not reached and condition():
            reached.append(time.monotonic())
        return bool(reached) and time.monotonic() - reached[0] >= delay

    return check


def after_step(workdir: Path, step: int, delay: float) -> Callable[[], bool]:
    """A kill condition: `delay` seconds after checkpoint `step` of `workdir` is finished."""
    return delayed(lambda: max(finished_steps(workdir), default=0) >= step, delay)


def finished_steps(workdir: Path) -> list[int]:
    d = workdir / ck.CHECKPOINTS_DIR
    if not d.is_dir():
        return []
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit())


def writes_in_flight(workdir: Path) -> list[str]:
    """Orbax's temporary step directories: a checkpoint being written right now."""
    d = workdir / ck.CHECKPOINTS_DIR
    try:
        return [n for n in os.listdir(d) if ORBAX_TMP in n]
    except FileNotFoundError:
        return []


def host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def assert_trees_bitwise_equal(a, b) -> None:
    a, b = host(a), host(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        assert x.dtype == y.dtype, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def loss_history(workdir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def data_order(workdir: Path) -> tuple[list[str], list[tuple[int, int]]]:
    """(digest of the batch that each training step finally used, the (pid, first index) of each
    process that served batches). A killed process's later batches are overwritten by the resumed
    process's, which restarts the stream at the restored step."""
    rows = [json.loads(line) for line in (workdir / "batches.jsonl").read_text().splitlines()]
    by_index: dict[int, str] = {}
    starts: list[tuple[int, int]] = []
    for r in rows:
        if not starts or starts[-1][0] != r["pid"]:
            starts.append((r["pid"], r["index"]))
        by_index[r["index"]] = r["digest"]
    return [by_index[i] for i in sorted(by_index)], starts


def flip_byte(path: Path, offset: int | None = None, mask: int = 0x10) -> int:
    data = bytearray(path.read_bytes())
    offset = len(data) // 2 if offset is None else offset
    data[offset] ^= mask
    path.write_bytes(bytes(data))
    return offset


def array_data_files(tree_dir: Path) -> list[Path]:
    """The files holding an Orbax tree's array chunks (OCDBT data files)."""
    return sorted(p for p in tree_dir.rglob("*") if p.is_file() and p.parent.name == "d")
