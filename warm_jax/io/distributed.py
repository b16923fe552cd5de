"""Multi-process JAX from environment variables, read once when `warm-jax` starts.

A launcher (`launch/local.py`, `launch/tpu.py`) sets the variables and runs the same `warm-jax`
command in every process; `initialize_from_env()`, called first thing in `warm_jax.cli.main`,
turns them into `jax.distributed.initialize` before any JAX backend exists (JAX refuses to
initialize afterwards). Without the variables it does nothing: single-process runs are unchanged.

    WARM_JAX_DISTRIBUTED   "local" (explicit coordinator, below) or "auto" (TPU VMs, Slurm,
                           Open MPI: JAX finds the cluster itself)
    WARM_JAX_COORDINATOR   host:port of process 0's coordination service (local)
    WARM_JAX_NUM_PROCESSES number of processes (local)
    WARM_JAX_PROCESS_ID    this process's index, 0-based (local)
    WARM_JAX_CPU_DEVICES   optional: CPU devices per process (`jax_num_cpu_devices`)

On CPU, cross-process collectives need an implementation: gloo, as checked with JAX 0.10.2.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from warm_jax.errors import UserError

MODE = "WARM_JAX_DISTRIBUTED"
COORDINATOR = "WARM_JAX_COORDINATOR"
NUM_PROCESSES = "WARM_JAX_NUM_PROCESSES"
PROCESS_ID = "WARM_JAX_PROCESS_ID"
CPU_DEVICES = "WARM_JAX_CPU_DEVICES"
MODES = ("local", "auto")

_initialized = False


def local_env(coordinator: str, num_processes: int, process_id: int) -> dict[str, str]:
    """The variables that make one of `num_processes` local processes join the others."""
    return {
        MODE: "local",
        COORDINATOR: coordinator,
        NUM_PROCESSES: str(num_processes),
        PROCESS_ID: str(process_id),
    }


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except KeyError:
        raise UserError(f"{MODE}=local needs {name}") from None
    except ValueError:
        raise UserError(f"{name}={env[name]!r} is not an integer") from None


def initialize_from_env(env: Mapping[str, str] | None = None) -> bool:
    """Initializes multi-process JAX if the environment asks for it; True if it did.

    Idempotent: a second call in the same process does nothing."""
    global _initialized
    env = os.environ if env is None else env
    mode = env.get(MODE, "").strip().lower()
    if not mode or _initialized:
        return False
    if mode not in MODES:
        raise UserError(f"{MODE}={mode!r}; choose from {list(MODES)}")
    import jax

    if env.get(CPU_DEVICES):
        jax.config.update("jax_num_cpu_devices", _int(env, CPU_DEVICES))
    if mode == "auto":
        jax.distributed.initialize()
    else:
        num, pid = _int(env, NUM_PROCESSES), _int(env, PROCESS_ID)
        if not 0 <= pid < num:
            raise UserError(f"{PROCESS_ID}={pid} is outside 0..{num - 1}")
        coordinator = env.get(COORDINATOR)
        if not coordinator:
            raise UserError(f"{MODE}=local needs {COORDINATOR}=host:port")
        # Cross-process collectives on CPU need an implementation; harmless on accelerators.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=coordinator, num_processes=num, process_id=pid
        )
    _initialized = True
    return True
