#!/usr/bin/env python3
"""Run one `warm-jax` command as N cooperating JAX processes on this machine.

    python launch/local.py --num_processes 2 -- warm-jax pretrain --workdir runs/p2 ...

Process 0 hosts the coordination service on 127.0.0.1 (a free port unless --port is given); each
process gets the environment of `warm_jax.io.distributed.local_env`, so `warm-jax` calls
`jax.distributed.initialize` (CPU collectives through gloo) before anything else. Together they
form one JAX program: `jax.devices()` lists every process's devices, and the training loop
assembles each global batch from the processes' slices (`jax.make_array_from_process_local_data`).

Output lines are prefixed with the process index. If one process fails, the others are stopped
and its exit status is returned. This is how multi-host code paths are tested on one CPU; the
same command runs on a TPU pod slice with `launch/tpu.py`.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

# The launcher runs as a script from any directory; make the source tree importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from warm_jax.io.distributed import CPU_DEVICES, local_env

# `warm-jax ARGS` runs as this, so the processes join the cluster whichever version of
# `warm_jax.cli` is installed (initialize_from_env is idempotent if the CLI also calls it).
_ENTRY = (
    "import sys\n"
    "from warm_jax.io.distributed import initialize_from_env\n"
    "initialize_from_env()\n"
    "from warm_jax.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def free_port() -> int:
    """A TCP port nobody listens on right now (the coordinator binds it moments later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command_line(command: list[str]) -> list[str]:
    """`warm-jax ...` through this interpreter (no PATH lookup); anything else as given."""
    if command and command[0] in ("warm-jax", "warm_jax"):
        return [sys.executable, "-c", _ENTRY, *command[1:]]
    return command


def process_env(
    base: dict[str, str],
    *,
    coordinator: str,
    num_processes: int,
    process_id: int,
    devices_per_process: int | None,
    platform: str | None,
) -> dict[str, str]:
    env = dict(base)
    env.update(local_env(coordinator, num_processes, process_id))
    if devices_per_process:
        env[CPU_DEVICES] = str(devices_per_process)
    if platform:
        env["JAX_PLATFORMS"] = platform
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _pump(stream, prefix: str, sink, log) -> None:
    for line in iter(stream.readline, ""):
        if sink is not None:
            sink.write(prefix + line)
            sink.flush()
        if log is not None:
            log.write(line)
            log.flush()
    stream.close()


def launch(
    command: list[str],
    *,
    num_processes: int,
    port: int | None = None,
    devices_per_process: int | None = None,
    platform: str | None = "cpu",
    log_dir: str | None = None,
    show: str = "all",
    timeout: float | None = None,
) -> int:
    """Runs `command` in `num_processes` processes; returns the first non-zero exit status
    (others are then terminated), or 0 when all succeed."""
    if num_processes < 1:
        raise SystemExit(f"--num_processes must be >= 1, got {num_processes}")
    if not command:
        raise SystemExit("no command given: launch/local.py --num_processes N -- warm-jax ...")
    coordinator = f"127.0.0.1:{port or free_port()}"
    argv = command_line(command)
    logs_path = Path(log_dir) if log_dir else None
    if logs_path:
        logs_path.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen] = []
    pumps: list[threading.Thread] = []
    logs = []
    try:
        for i in range(num_processes):
            env = process_env(
                dict(os.environ),
                coordinator=coordinator,
                num_processes=num_processes,
                process_id=i,
                devices_per_process=devices_per_process,
                platform=platform,
            )
            p = subprocess.Popen(
                argv,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                text=True,
                bufsize=1,
            )
            procs.append(p)
            log = open(logs_path / f"process_{i}.log", "w") if logs_path else None  # noqa: SIM115
            logs.append(log)
            sink = sys.stdout if (show == "all" or i == 0) else None
            t = threading.Thread(target=_pump, args=(p.stdout, f"[{i}] ", sink, log), daemon=True)
            t.start()
            pumps.append(t)
        return _wait(procs, timeout)
    except KeyboardInterrupt:
        _stop(procs)
        return 130
    finally:
        _stop(procs)
        for t in pumps:
            t.join(timeout=5)
        for log in logs:
            if log is not None:
                log.close()


def _wait(procs: list[subprocess.Popen], timeout: float | None) -> int:
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        codes = [p.poll() for p in procs]
        failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
        if failed:
            i, code = failed[0]
            print(f"[launch] process {i} exited with status {code}; stopping the others")
            return code
        if all(c == 0 for c in codes):
            return 0
        if deadline is not None and time.monotonic() > deadline:
            print("[launch] timed out; stopping all processes")
            return 124
        time.sleep(0.1)


def _stop(procs: list[subprocess.Popen]) -> None:
    """Stops the processes this launcher started (only those), politely first."""
    alive = [p for p in procs if p.poll() is None]
    for p in alive:
        p.send_signal(signal.SIGTERM)
    for p in alive:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        split = argv.index("--")
        own, command = argv[:split], argv[split + 1 :]
    else:
        own, command = argv, []
    parser = argparse.ArgumentParser(
        prog="launch/local.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="%(prog)s --num_processes N [options] -- warm-jax SUBCOMMAND ...",
    )
    parser.add_argument("--num_processes", type=int, required=True)
    parser.add_argument("--port", type=int, default=None, help="coordinator port (default: free)")
    parser.add_argument(
        "--devices_per_process",
        type=int,
        default=None,
        help="CPU devices per process (jax_num_cpu_devices); default 1",
    )
    parser.add_argument(
        "--platform",
        default="cpu",
        help="JAX_PLATFORMS for the processes ('' leaves it unset); default cpu",
    )
    parser.add_argument("--log_dir", default=None, help="also write process_<i>.log files here")
    parser.add_argument(
        "--show", choices=["all", "first"], default="all", help="whose output to print"
    )
    parser.add_argument("--timeout", type=float, default=None, help="seconds before giving up")
    args = parser.parse_args(own)
    return launch(
        command,
        num_processes=args.num_processes,
        port=args.port,
        devices_per_process=args.devices_per_process,
        platform=args.platform or None,
        log_dir=args.log_dir,
        show=args.show,
        timeout=args.timeout,
    )


if __name__ == "__main__":
    sys.exit(main())
