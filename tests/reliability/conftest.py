"""The uninterrupted tiny training run that the kill, corruption and disk-full tests compare
against (computed once per session, in this process)."""

from __future__ import annotations

import pytest

from . import common, tiny_train

NUM_STEPS = 8


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> dict:
    """8 steps of the tiny model, checkpoints at steps 4 and 8; same code, devices and XLA
    flags as the subprocesses that get killed."""
    wd = tmp_path_factory.mktemp("reference")
    result = tiny_train.run(wd, NUM_STEPS, 4)
    return {"workdir": wd, "params": common.host(result.params), "num_steps": NUM_STEPS}
