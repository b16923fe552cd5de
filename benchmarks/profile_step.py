"""Where the time of our reward-model train step goes, and what a proposed change would gain.

    .venv/bin/python benchmarks/profile_step.py --shape tiny --pairs 16 --seq-len 256

1. **Op breakdown.** Two steps under `jax.profiler` (a Perfetto trace); every XLA op's time
   is attributed, through the compiled HLO's output shapes, to: the attention core (the
   per-head `[B, kv, ...]` tensors: scores, softmax, probs·V and their gradients), the
   projections and MLP (`[tokens, d]` tensors), the mask, and the rest; each split into
   dots (YNNPACK fusions), copies (layout transposes XLA inserts around the dots) and
   elementwise fusions. Times are summed over the CPU threads (they overlap).
2. **Variants** of the attention, swapped in while tracing (warm_jax/ is not edited): `orig`
   is the model as it is (head-major q/k/v, causal query blocks of `tm.QUERY_BLOCK`);
   `full` / `block32` / `block128` the same with query blocks off / of 32 / of 128;
   `token_major` the implementation before query blocks (q/k/v `[B, T, heads, H]`, full T×T
   scores); `dpa` uses `jax.nn.dot_product_attention(implementation="xla")`;
   `orig+no_ynn` / `orig+onednn` compile the unchanged model with XLA:CPU's YNNPACK dot
   fusions off / oneDNN on. Same parameters, same loss (checked), steps interleaved
   (A B C, C B A, ...) under the same machine load.

Writes `benchmarks/results/profile_<shape>.json`.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import bench_train as BT  # noqa: E402
from benchmarks import common as C  # noqa: E402
from warm_jax.models import transformer as tm  # noqa: E402
from warm_jax.reward import losses  # noqa: E402
from warm_jax.training import loop  # noqa: E402

ORIGINAL = tm.Attention


def _proj_param(module, c, name: str, n: int):
    axes = ("embed", "heads" if n == c.n_heads else "kv_heads", "head_dim")
    init = nn.with_logical_partitioning(tm._dense_init(), axes)
    return module.param(name, init, (c.d_model, n, c.head_dim), c.params_dtype)


def _out_param(module, c):
    init = nn.with_logical_partitioning(tm._dense_init(2), ("heads", "head_dim", "embed"))
    return module.param("o", init, (c.n_heads, c.head_dim, c.d_model), c.params_dtype)


class TokenMajorAttention(ORIGINAL):
    """The attention warm_jax had before query blocks: q/k/v kept [B, T, heads, H] and the
    full T×T scores in one piece (the cached path is unchanged)."""

    @nn.compact
    def __call__(self, x, positions, mask, kv_cache=None, cache_index=None):
        if kv_cache is not None:
            return ORIGINAL.__call__(self, x, positions, mask, kv_cache, cache_index)
        c = self.config
        dt = c.compute_dtype

        def proj(name, n):
            return jnp.einsum("btd,dnh->btnh", x, _proj_param(self, c, name, n).astype(dt))

        q = tm.rope(proj("q", c.n_heads), positions, c.rope_base)
        k = tm.rope(proj("k", c.n_kv_heads), positions, c.rope_base)
        v = proj("v", c.n_kv_heads)
        b, t, _, hd = q.shape
        q = q.reshape(b, t, c.n_kv_heads, c.n_heads // c.n_kv_heads, hd)
        scores = jnp.einsum("btkgh,bskh->bkgts", q, k).astype(jnp.float32) * (hd**-0.5)
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(dt)
        out = jnp.einsum("bkgts,bskh->btkgh", probs, v).reshape(b, t, c.n_heads, hd)
        return jnp.einsum("btnh,nhd->btd", out, _out_param(self, c).astype(dt)), None


class DotProductAttention(ORIGINAL):
    """`jax.nn.dot_product_attention` (XLA implementation) in place of the hand-written core."""

    @nn.compact
    def __call__(self, x, positions, mask, kv_cache=None, cache_index=None):
        if kv_cache is not None:
            return ORIGINAL.__call__(self, x, positions, mask, kv_cache, cache_index)
        c = self.config
        dt = c.compute_dtype

        def proj(name, n):
            return jnp.einsum("btd,dnh->btnh", x, _proj_param(self, c, name, n).astype(dt))

        q = tm.rope(proj("q", c.n_heads), positions, c.rope_base)
        k = tm.rope(proj("k", c.n_kv_heads), positions, c.rope_base)
        v = proj("v", c.n_kv_heads)
        out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, 0], implementation="xla")
        return jnp.einsum("btnh,nhd->btd", out, _out_param(self, c).astype(dt)), None


# name -> (attention class, tm.QUERY_BLOCK while tracing, XLA:CPU compiler options)
VARIANTS = {
    "orig": (ORIGINAL, tm.QUERY_BLOCK, None),
    "full": (ORIGINAL, 0, None),
    "block32": (ORIGINAL, 32, None),
    "block128": (ORIGINAL, 128, None),
    "token_major": (TokenMajorAttention, 0, None),
    "dpa": (DotProductAttention, 0, None),
    # The same model compiled with other XLA:CPU dot backends (per-compilation DebugOptions).
    "orig+no_ynn": (ORIGINAL, tm.QUERY_BLOCK, {"xla_cpu_experimental_ynn_fusion_type": ""}),
    "orig+onednn": (ORIGINAL, tm.QUERY_BLOCK, {"xla_cpu_use_onednn": True}),
}


def trainer(variant: str, cfg, params, batches):
    tx, sched = loop.make_optimizer(
        10**6, schedule="constant", warmup_steps=0, weight_decay=0.0, **BT.OPT
    )
    cls, block, options = VARIANTS[variant]
    default_block = tm.QUERY_BLOCK
    # Both are looked up when the step is traced, which OurTrainer does at construction.
    tm.Attention, tm.QUERY_BLOCK = cls, block
    try:
        return BT.OurTrainer(
            losses.bt_loss_fn(cfg),
            tx,
            sched,
            [BT.fresh_state(params, tx)],
            [batches],
            [None],
            compiler_options=options,
        )
    finally:
        tm.Attention, tm.QUERY_BLOCK = ORIGINAL, default_block


def hlo_shapes(hlo: str) -> dict[str, list[int]]:
    out = {}
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = \w+\[([\d,]*)\]", line)
        if m and m.group(1) not in out:
            out[m.group(1)] = [int(d) for d in m.group(2).split(",") if d]
    return out


def op_breakdown(tr, pairs: int, seq_len: int, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d, create_perfetto_trace=True)
        wall = time.perf_counter()
        tr.run(steps)
        wall = time.perf_counter() - wall
        jax.profiler.stop_trace()
        with gzip.open(next(Path(d).rglob("*.trace.json.gz"))) as fh:
            trace = json.load(fh)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    shapes = hlo_shapes(tr.compiled.as_text())
    rows, tokens = 2 * pairs, 2 * pairs * seq_len
    by_cat: collections.Counter = collections.Counter()
    by_op: collections.Counter = collections.Counter()
    for e in events:
        if e.get("ph") != "X" or e["name"] not in shapes:
            continue
        dims, name = shapes[e["name"]], e["name"]
        if len(dims) >= 4 and dims[0] == rows:
            part = "attention core"
        elif len(dims) == 2 and tokens in dims:
            part = "projections + MLP"
        elif dims == [rows, seq_len, seq_len]:
            part = "mask"
        else:
            part = "other"
        kind = "dot" if name.startswith("ynn") else "copy" if name.startswith("copy") else "elem"
        ms = e["dur"] / 1e3 / steps
        by_cat[part] += ms
        by_cat[f"{part} / {kind}"] += ms
        by_op[f"{name} {dims}"] += ms
    total = sum(v for k, v in by_cat.items() if "/" not in k)
    return {
        "wall_ms_per_step": 1e3 * wall / steps,
        "op_ms_per_step_summed_over_threads": total,
        "by_category_ms": dict(sorted(by_cat.items())),
        "by_category_fraction": {
            k: v / total for k, v in sorted(by_cat.items()) if "/" not in k and total
        },
        "top_ops_ms": dict(by_op.most_common(25)),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=C.SHAPES, default="tiny")
    p.add_argument("--pairs", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=2, help="profiled steps")
    p.add_argument("--repeats", type=int, default=6, help="interleaved timed steps per variant")
    p.add_argument(
        "--variants",
        nargs="+",
        choices=list(VARIANTS),
        default=["orig", "full", "token_major", "dpa"],
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, default=None)
    args = p.parse_args()

    base = C.shape_config(args.shape)
    cfg = C.shape_config(args.shape, max_len=max(args.seq_len, base.max_len))
    params = BT.with_random_head(tm.init_params(cfg, jax.random.PRNGKey(args.seed)), cfg, 0)
    chosen, rejected = BT.random_pairs(cfg, 2, args.pairs, args.seq_len, args.seed)
    batches = [BT.pair_batch(chosen[i], rejected[i]) for i in range(2)]
    load_start = os.getloadavg()

    trainers = {v: trainer(v, cfg, params, batches) for v in args.variants}
    first = {v: tr.one()[0] for v, tr in trainers.items()}
    C.log(f"first-step losses {first}")
    breakdown = op_breakdown(trainers["orig"], args.pairs, args.seq_len, args.steps)
    C.log(json.dumps(breakdown["by_category_fraction"], indent=1))

    times: dict[str, list[float]] = {v: [] for v in trainers}
    names = list(trainers)
    for rep in range(args.repeats):
        for v in names if rep % 2 == 0 else names[::-1]:
            t = time.perf_counter()
            trainers[v].one()
            times[v].append(time.perf_counter() - t)
    med = {v: C.median(ts) for v, ts in times.items()}
    C.log(f"median step seconds {med}")
    result = {
        "shape": args.shape,
        "workload": {"pairs": args.pairs, "seq_len": args.seq_len},
        "load": {"start": list(load_start), "end": list(os.getloadavg())},
        "op_breakdown_orig": breakdown,
        "variants": {
            v: {
                "compile_seconds": trainers[v].compile_seconds,
                "first_step_loss": first[v],
                "step_seconds": times[v],
                "median_step_seconds": med[v],
                "speedup_vs_orig": med["orig"] / med[v] if "orig" in med else None,
                "paired_speedup_vs_orig": C.median([a / b for a, b in zip(times["orig"], times[v])])
                if "orig" in times
                else None,
            }
            for v in trainers
        },
        "command": ".venv/bin/python benchmarks/profile_step.py " + " ".join(sys.argv[1:]),
        "environment": C.environment(None),
    }
    out = args.output or C.RESULTS / f"profile_{args.shape}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    C.log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
