"""The tiny training run the kill/resume tests kill: importable (the in-process reference) and
runnable as a script (the process that gets killed), so both run the very same code.

    python tiny_train.py WORKDIR NUM_STEPS CHECKPOINT_EVERY [ON_CORRUPT]

Every batch served is appended to WORKDIR/batches.jsonl as (pid, index in the stream, digest),
flushed line by line, so a test can check the data order across kills."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent.parent
BATCH_SIZE = 16
DATA_SEED = 3
# Log lines average 3 steps: a run killed between two lines must resume the same average.
LOG_EVERY = 3


def _configure_jax_like_conftest() -> None:
    """The same devices and compilation cache as the pytest process (tests/conftest.py); the
    XLA flags come in through the inherited environment, so programs compile identically."""
    import tempfile

    import jax

    jax.config.update("jax_num_cpu_devices", 8)
    jax.config.update(
        "jax_compilation_cache_dir",
        os.path.join(tempfile.gettempdir(), f"warm_jax_test_xla_cache_{os.getuid()}"),
    )
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


class RecordingBatches:
    """ArrayBatches that log what they serve (the data-order witness)."""

    def __init__(self, inner, log_path: Path | None):
        self.inner, self.log_path = inner, log_path

    def __iter__(self):
        return self

    def __next__(self):
        index = self.inner.served
        batch = next(self.inner)
        if self.log_path is not None:
            digest = hashlib.sha1(batch["tokens"].tobytes()).hexdigest()[:16]
            with open(self.log_path, "a") as f:
                f.write(json.dumps({"pid": os.getpid(), "index": index, "digest": digest}) + "\n")
        return batch

    def get_state(self):
        return self.inner.get_state()

    def set_state(self, state):
        self.inner.set_state(state)


def run(
    workdir: str | os.PathLike,
    num_steps: int,
    checkpoint_every: int,
    *,
    record: bool = True,
    max_to_keep: int | None = 3,
    config=None,
    **train_kwargs,
):
    if str(TESTS_DIR) not in sys.path:
        sys.path.insert(0, str(TESTS_DIR))
    from helpers import TINY, tiny_loss, tiny_train_kwargs, toy_lm_data

    config = config or TINY
    from warm_jax import sharding as shd
    from warm_jax.training import loop

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    batches = RecordingBatches(
        loop.ArrayBatches(toy_lm_data(), BATCH_SIZE, seed=DATA_SEED),
        workdir / "batches.jsonl" if record else None,
    )
    return loop.train(
        train_kwargs.pop("loss_fn", None) or tiny_loss(config),
        batches,
        workdir=workdir,
        mesh=shd.make_mesh((("data", -1),)),
        num_steps=num_steps,
        checkpoint_every=checkpoint_every,
        max_to_keep=max_to_keep,
        log_every=LOG_EVERY,
        **{**tiny_train_kwargs(config), **train_kwargs},
    )


if __name__ == "__main__":
    _configure_jax_like_conftest()
    workdir, num_steps, every = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    extra = {"on_corrupt_checkpoint": sys.argv[4]} if len(sys.argv) > 4 else {}
    result = run(workdir, num_steps, every, **extra)
    print(f"finished at step {result.step}, resumed from {result.resumed_from}")
