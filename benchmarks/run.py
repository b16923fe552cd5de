"""Benchmarks of warm_jax against real peers: `benchmarks/run.py NAME [options]`.

Each NAME runs one comparison and writes `benchmarks/results/NAME.json`: the environment
(versions of jax/torch/transformers, CPU model and core count, device), `os.getloadavg()` at
the start and end of every case, every repeat of both sides, medians, compile/warm-up times
(never inside a timed repeat) and the speedup = ours / peer, the median of the per-repeat
ratios of interleaved repeats (A B, B A, ...: both sides see the same machine load).

The peers (PyTorch, transformers) are not dependencies of warm_jax: they run in another
interpreter, `--peer-python` (the `bench` extra of setup.py pins their versions), as a
subprocess driven by a small script in `benchmarks/peers/`. On a machine shared with other
jobs, also run the peer with `--peer-threads 1` (see BENCHMARKS.md). Run from the repository
root:

    .venv/bin/python benchmarks/run.py rm_train --shapes tiny small
    .venv/bin/python benchmarks/report.py     # the tables of BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import common as C  # noqa: E402

NAMES = {
    "merge": "merge time and peak memory, `warm-jax merge` vs mergekit, SmolLM2-135M-shaped "
    "weights (delegates to benchmarks/merge_bench.py; needs --benchvenv with mergekit). "
    "Options after `merge` are passed to merge_bench.py.",
    "rm_train": "reward-model training throughput (pairs/s), Bradley–Terry loss, fp32 (or --dtype): our "
    "jitted train step (loop.make_train_step + reward.losses.bt_loss_fn, AdamW + clipping) vs "
    "transformers LlamaForSequenceClassification of the same shape, same initial weights (our "
    "export) and batches, BT loss + torch AdamW in a plain loop. Also the achieved model "
    "FLOP/s as a fraction of this machine's measured matmul peak in that dtype (same run). "
    "Targets: 135M >= 1.0x and >= 80 percent of peak; tiny/small >= 2x.",
    "members": "M reward-model members trained at once (vmapped, members.train_vmapped's "
    "step) vs one after another (members.train_member's step), member-steps/s, M = 2, 4, 8. "
    "Both sides are ours; 'peer' = sequential. Target: >= 1.5x for tiny.",
    "sampling": "generation throughput (new tokens/s) at batch 1, 16, 64: warm_jax.policy."
    "sampling.sample (KV cache, greedy, fixed length) vs transformers generate(use_cache=True, "
    "greedy, no EOS) with the same weights (our export via warm_jax.io.hf); greedy tokens are "
    "compared. Also the memory-bandwidth bound of batch 1 (weight bytes / measured "
    "bandwidth). Target: >= 2x at batch 1 and 16.",
    "reinforce": "one KL-regularised REINFORCE step (sample k responses per prompt, score "
    "with a reward model, RLOO, policy-gradient update, EMA anchor): warm_jax.policy."
    "reinforce.make_loss_fn in loop.make_train_step (as train_policy builds it) vs the same "
    "step in PyTorch/transformers. Target: >= 2x on tiny/small.",
    "matmul_peak": "this machine's dense fp32 matmul rate (GFLOP/s) in JAX and in PyTorch, "
    "and the memory bandwidth, interleaved in one run; beside them the same product with "
    "XLA:CPU's other dot libraries (Eigen, oneDNN) and in bfloat16 on both sides.",
}
ACCELERATOR = """
On an accelerator (the issue's item 6): `--dtype bfloat16 --peer-device cuda` runs both sides
there in bfloat16 (ours on JAX's default device), with the matmul peak in bfloat16 (`--n 8192`
for a peak that fills the chip) and each result file named apart with --output; BENCHMARKS.md
has the commands."""


def per_shape(default: dict, cast=int):
    """`--pairs tiny=16 small=8` style options: shape=value pairs over a default dict."""

    def parse(items: list[str]) -> dict:
        out = dict(default)
        for item in items:
            k, _, v = item.partition("=")
            if k not in C.SHAPES or not v:
                raise argparse.ArgumentTypeError(f"expected SHAPE=VALUE, SHAPE in {C.SHAPES}")
            out[k] = cast(v)
        return out

    return parse


def add_common(p: argparse.ArgumentParser, peer: bool = True, repeats: int = 3) -> None:
    p.add_argument("--repeats", type=int, default=repeats, help="timed repeats per side")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--output", type=Path, default=None, help="default: benchmarks/results/NAME.json"
    )
    p.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="scratch for exported weights and data (default: a temporary directory)",
    )
    if peer:
        p.add_argument(
            "--peer-python",
            default=C.default_peer_python(),
            help="interpreter with torch + transformers (pip install -e '.[bench]' in a "
            "separate venv); default /tmp/iovenv/bin/python if present, else this one",
        )
        p.add_argument(
            "--peer-threads",
            type=int,
            default=None,
            help="torch.set_num_threads in the peer (default: torch's own, one per core)",
        )
        p.add_argument(
            "--peer-device",
            default="cpu",
            help="torch device of the peer's models and data, e.g. cuda (ours runs on JAX's "
            "default device: the accelerator where jaxlib has one)",
        )
        p.add_argument(
            "--dtype",
            choices=C.DTYPES,
            default="float32",
            help="weights and compute on both sides (and the matmul peak's dtype); "
            "bfloat16 is the accelerator setting",
        )


def add_peak(p: argparse.ArgumentParser, repeats: int) -> None:
    """The matmul peak measured in the same run: the denominator of model FLOP utilisation."""
    p.add_argument("--peak-repeats", type=int, default=repeats, help="matmul-peak repeats per side")
    p.add_argument("--n", type=int, default=2048, help="matmul-peak matrix size")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=ACCELERATOR,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="name", required=True, metavar="NAME")

    sub.add_parser("merge", help=NAMES["merge"], add_help=False)

    s = sub.add_parser("matmul_peak", help=NAMES["matmul_peak"], description=NAMES["matmul_peak"])
    add_common(s, repeats=5)
    s.add_argument("--n", type=int, default=2048, help="matrix size")

    s = sub.add_parser("rm_train", help=NAMES["rm_train"], description=NAMES["rm_train"])
    add_common(s)
    s.add_argument("--shapes", nargs="+", choices=C.SHAPES, default=list(C.SHAPES))
    s.add_argument("--seq-len", type=int, default=256)
    s.add_argument(
        "--pairs",
        nargs="*",
        type=str,
        default=[],
        help="pairs per step, SHAPE=N (default tiny=16 small=8 smollm2_135m=2)",
    )
    s.add_argument(
        "--steps",
        nargs="*",
        type=str,
        default=[],
        help="steps per timed repeat, SHAPE=N (default tiny=8 small=2 smollm2_135m=1)",
    )
    s.add_argument("--warmup-steps", type=int, default=1)
    add_peak(s, 2)
    s.add_argument(
        "--no-fused-adamw",
        dest="fused_adamw",
        action="store_false",
        help="peer: torch AdamW's for-loop implementation instead of fused=True",
    )

    s = sub.add_parser("members", help=NAMES["members"], description=NAMES["members"])
    add_common(s, peer=False)
    s.add_argument("--shapes", nargs="+", choices=C.SHAPES[:2], default=["tiny", "small"])
    s.add_argument("--ms", type=int, nargs="+", default=[2, 4, 8])
    s.add_argument(
        "--pairs",
        nargs="*",
        default=[],
        help="pairs per member-step, SHAPE=N (default tiny=32 small=4; tiny: warm_oracle.gin)",
    )
    s.add_argument("--seq-len", nargs="*", default=[], help="SHAPE=N (default tiny=64 small=128)")
    s.add_argument(
        "--steps", nargs="*", default=[], help="steps per timed repeat, SHAPE=N (tiny=5 small=1)"
    )
    s.add_argument("--warmup-steps", type=int, default=1)

    s = sub.add_parser("sampling", help=NAMES["sampling"], description=NAMES["sampling"])
    add_common(s)
    s.add_argument("--shapes", nargs="+", choices=C.SHAPES, default=list(C.SHAPES))
    s.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    s.add_argument("--prompt-len", type=int, default=32)
    s.add_argument("--new-tokens", type=int, default=32)
    s.add_argument(
        "--min-seconds",
        type=float,
        default=1.0,
        help="a timed repeat repeats the generate call until it lasts about this long",
    )
    add_peak(s, 1)

    s = sub.add_parser("reinforce", help=NAMES["reinforce"], description=NAMES["reinforce"])
    add_common(s)
    s.add_argument("--shapes", nargs="+", choices=C.SHAPES, default=["tiny", "small"])
    s.add_argument("--prompts", type=int, default=16, help="prompts per step")
    s.add_argument("--samples", type=int, default=4, help="k responses per prompt")
    s.add_argument("--prompt-len", type=int, default=16)
    s.add_argument("--new-tokens", type=int, default=32)
    s.add_argument(
        "--steps", nargs="*", default=[], help="steps per timed repeat, SHAPE=N (tiny=2 small=1)"
    )
    s.add_argument("--warmup-steps", type=int, default=1)
    add_peak(s, 1)
    s.add_argument(
        "--no-fused-adamw",
        dest="fused_adamw",
        action="store_false",
        help="peer: torch AdamW's for-loop implementation instead of fused=True",
    )
    return p


def run_merge(rest: list[str]) -> int:
    if any(a in ("-h", "--help") for a in rest):
        print(NAMES["merge"] + "\n\nmerge_bench.py's options:")
    if not any(a.startswith("--output") for a in rest):
        rest = [*rest, "--output", str(C.RESULTS / "merge_bench.json")]
    cmd = [sys.executable, str(C.BENCH / "merge_bench.py"), *rest]
    return subprocess.call(cmd, cwd=str(REPO))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "merge":
        return run_merge(argv[1:])
    args = parser().parse_args(argv)
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix=f"warm_jax_bench_{args.name}_")
        args.workdir = Path(tmp.name)
    args.workdir.mkdir(parents=True, exist_ok=True)
    try:
        return dispatch(args)
    finally:
        if tmp is not None:
            tmp.cleanup()


def dispatch(args) -> int:
    import jax

    C.log(f"jax {jax.__version__} on {jax.devices()}; load average {os.getloadavg()}")
    cases: list[dict] = []
    name = args.name
    if name in ("matmul_peak", "rm_train", "members"):
        from benchmarks import bench_train as B
    elif name == "sampling":
        from benchmarks import bench_sampling as B
    else:
        from benchmarks import bench_reinforce as B

    peer = None
    peer_env = None
    if getattr(args, "peer_python", None):
        script = {
            "matmul_peak": "torch_rm.py",
            "rm_train": "torch_rm.py",
            "sampling": "torch_sampling.py",
            "reinforce": "torch_reinforce.py",
        }[name]
        peer = C.Peer(
            args.peer_python,
            script,
            args.workdir,
            args.peer_threads,
            device=args.peer_device,
            dtype=args.dtype,
        )
        peer_env = peer.call("env")
        C.log(f"peer: {args.peer_python} {peer_env}")
    try:
        if name == "matmul_peak":
            cases.append(C.run_case("matmul_peak", lambda: B.matmul_peak_case(peer, args)))
        elif name == "rm_train":
            args.pairs = per_shape({"tiny": 16, "small": 8, "smollm2_135m": 2})(args.pairs)
            args.steps = per_shape({"tiny": 8, "small": 2, "smollm2_135m": 1})(args.steps)
            args.targets = {"tiny": 2.0, "small": 2.0, "smollm2_135m": 1.0}
            for shape in args.shapes:
                cases.append(
                    C.run_case(
                        f"rm_train/{shape}",
                        lambda s=shape: B.rm_train_case(s, peer, args, args.workdir),
                    )
                )
        elif name == "members":
            args.pairs = per_shape({"tiny": 32, "small": 4})(args.pairs)
            args.seq_len = per_shape({"tiny": 64, "small": 128})(args.seq_len)
            args.steps = per_shape({"tiny": 5, "small": 1})(args.steps)
            args.targets = {"tiny": 1.5}
            for shape in args.shapes:
                for m in args.ms:
                    cases.append(
                        C.run_case(
                            f"members/{shape}/M{m}",
                            lambda s=shape, m=m: B.members_case(s, m, args),
                        )
                    )
        elif name == "sampling":
            for shape in args.shapes:
                cases.extend(B.sampling_cases(shape, peer, args, args.workdir))
        else:
            args.steps = per_shape({"tiny": 2, "small": 1, "smollm2_135m": 1})(args.steps)
            for shape in args.shapes:
                cases.append(
                    C.run_case(
                        f"reinforce/{shape}",
                        lambda s=shape: B.reinforce_case(s, peer, args, args.workdir),
                    )
                )
    finally:
        if peer is not None:
            peer.close()
    env = C.environment(peer_env)
    for c in cases:
        c["environment"] = env
    path = C.write_results(name, B.describe(name), cases, args.output)
    C.log(f"wrote {path}")
    for c in cases:
        print(C.summary_row(c))
    return 0


if __name__ == "__main__":
    sys.exit(main())
