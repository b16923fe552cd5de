"""The reward-model train step of two checkouts of warm_jax, timed in alternating processes.

    git worktree add /tmp/warm_jax_before COMMIT
    .venv/bin/python benchmarks/ab_step.py /tmp/warm_jax_before . --shape small --pairs 8

Each round starts one process per checkout (before, after; then after, before; ...), each
compiling `loop.make_train_step(bt_loss_fn)` as `benchmarks/bench_train.py` does and timing
`--steps` steps after one warm-up step, so that a change to the model or the loop is measured
against its parent on the same machine under the same load. The first-step losses of the two
must agree (same parameters and batches). Writes `benchmarks/results/ab_<shape>.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def one_process(checkout: Path, shape: str, pairs: int, seq_len: int, steps: int) -> dict:
    """Runs in a fresh interpreter with `checkout` first on sys.path."""
    import jax

    from benchmarks import bench_train as BT
    from benchmarks import common as C
    from warm_jax.models import transformer as tm
    from warm_jax.reward import losses
    from warm_jax.training import loop

    if not Path(tm.__file__).resolve().is_relative_to(checkout):
        raise RuntimeError(f"imported {tm.__file__}, not from {checkout}")
    base = C.shape_config(shape)
    cfg = C.shape_config(shape, max_len=max(seq_len, base.max_len))
    params = BT.with_random_head(tm.init_params(cfg, jax.random.PRNGKey(0)), cfg, 0)
    chosen, rejected = BT.random_pairs(cfg, 2, pairs, seq_len, 0)
    batches = [BT.pair_batch(chosen[i], rejected[i]) for i in range(2)]
    tx, sched = loop.make_optimizer(
        10**6, schedule="constant", warmup_steps=0, weight_decay=0.0, **BT.OPT
    )
    tr = BT.OurTrainer(
        losses.bt_loss_fn(cfg), tx, sched, [BT.fresh_state(params, tx)], [batches], [None]
    )
    first = tr.one()[0]
    times, cpu = [], []
    for _ in range(steps):
        t, c = time.perf_counter(), time.process_time()
        tr.one()
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return {
        "first_step_loss": first,
        "step_seconds": times,
        "step_cpu_seconds": cpu,
        "compile_seconds": tr.compile_seconds,
    }


def git_head(path: Path) -> str:
    proc = subprocess.run(
        ["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True
    )
    return proc.stdout.strip() or "unknown"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("before", type=Path, help="checkout of the baseline")
    p.add_argument("after", type=Path, help="checkout with the change")
    p.add_argument("--shape", default="tiny", choices=("tiny", "small", "smollm2_135m"))
    p.add_argument("--pairs", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="timed steps per process")
    p.add_argument("--rounds", type=int, default=2, help="processes per checkout")
    p.add_argument("--output", type=Path, default=None)
    p.add_argument("--_child", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args._child is not None:
        out = one_process(args._child, args.shape, args.pairs, args.seq_len, args.steps)
        print(json.dumps(out))
        return 0

    sides = {"before": args.before.resolve(), "after": args.after.resolve()}
    for name, path in sides.items():
        if not (path / "warm_jax" / "models" / "transformer.py").exists():
            p.error(f"{name}={path} is not a warm_jax checkout (no warm_jax/models/transformer.py)")
    runs: dict[str, list[dict]] = {k: [] for k in sides}
    for r in range(args.rounds):
        for name in list(sides) if r % 2 == 0 else list(sides)[::-1]:
            path = sides[name]
            # The child imports warm_jax and benchmarks/ from the checkout under test.
            proc = subprocess.run(
                [sys.executable, __file__, *sys.argv[1:], "--_child", str(path)],
                capture_output=True,
                text=True,
                cwd=str(path),
                env={**os.environ, "PYTHONPATH": str(path)},
            )
            if proc.returncode:
                raise SystemExit(f"{name} ({path}) failed:\n{proc.stderr[-3000:]}")
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            res["round"] = r
            runs[name].append(res)
            wall, cpu = (statistics.median(res[k]) for k in ("step_seconds", "step_cpu_seconds"))
            print(f"round {r} {name}: median step {wall:.3f} s, {cpu:.3f} CPU s", flush=True)

    def median_of(key: str) -> dict[str, float]:
        return {k: statistics.median([t for run in v for t in run[key]]) for k, v in runs.items()}

    med, med_cpu = median_of("step_seconds"), median_of("step_cpu_seconds")
    result = {
        "shape": args.shape,
        "workload": {"pairs": args.pairs, "seq_len": args.seq_len, "steps": args.steps},
        "checkouts": {k: str(v) for k, v in sides.items()},
        "commits": {k: git_head(v) for k, v in sides.items()},
        "runs": runs,
        "median_step_seconds": med,
        "speedup": med["before"] / med["after"],
        # CPU seconds leave out the time the hypervisor gave our vCPUs to others (steal), which
        # moves wall times on a shared VM; a change that only does less work shows in both.
        "median_step_cpu_seconds": med_cpu,
        "cpu_speedup": med_cpu["before"] / med_cpu["after"],
        "first_step_loss_diff": abs(
            runs["before"][0]["first_step_loss"] - runs["after"][0]["first_step_loss"]
        ),
        "command": "benchmarks/ab_step.py " + " ".join(sys.argv[1:]),
    }
    out = args.output or REPO / "benchmarks" / "results" / f"ab_{args.shape}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"speedup {result['speedup']:.2f}x (median step {med['before']:.3f} -> {med['after']:.3f} s)"
        f", CPU time {result['cpu_speedup']:.2f}x"
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
