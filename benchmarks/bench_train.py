"""Our side of `rm_train`, `members` and `matmul_peak` (see `run.py --help`)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common as C
from warm_jax.io import hf
from warm_jax.models import transformer as tm
from warm_jax.reward import losses
from warm_jax.reward import members as mem
from warm_jax.training import loop

PAIR_FIELDS = ("tokens", "segment_ids", "positions")
# The optimizer of both sides: AdamW, constant learning rate, global-norm clipping at 1.
OPT = {"learning_rate": 1e-5, "b1": 0.9, "b2": 0.95, "eps": 1e-8, "clip_norm": 1.0}


def pair_batch(chosen: np.ndarray, rejected: np.ndarray) -> dict[str, np.ndarray]:
    """A BT batch of full-length rows (no padding): what `reward.data` yields."""
    b, length = chosen.shape
    ones = np.ones((b, length), np.int32)
    pos = np.broadcast_to(np.arange(length, dtype=np.int32), (b, length)).copy()
    out = {}
    for side, tokens in (("chosen", chosen), ("rejected", rejected)):
        out[f"{side}_tokens"] = tokens.astype(np.int32)
        out[f"{side}_segment_ids"] = ones
        out[f"{side}_positions"] = pos
    return out


def random_pairs(cfg, n_batches: int, pairs: int, seq_len: int, seed: int):
    """Token ids in [1, vocab): id 0 is the peer's padding id and never appears."""
    rng = np.random.default_rng(seed)
    shape = (n_batches, pairs, seq_len)
    return (
        rng.integers(1, cfg.vocab_size, shape, dtype=np.int32),
        rng.integers(1, cfg.vocab_size, shape, dtype=np.int32),
    )


def with_random_head(params, cfg, seed: int):
    """Our init has a zero reward head (every reward 0, loss log 2); a random one makes the
    first-step losses of both sides a real check that they compute the same function."""
    head = dict(params["params"]["reward_head"])
    key = jax.random.PRNGKey(seed + 1)
    kernel = jax.random.normal(key, head["kernel"].shape) * cfg.d_model**-0.5
    head["kernel"] = kernel.astype(head["kernel"].dtype)
    return {"params": {**params["params"], "reward_head": head}}


def copy_tree(t):
    return jax.tree.map(jnp.copy, t)


class OurTrainer:
    """`loop.make_train_step` of a loss, jitted as `loop.train` jits it (state donated), compiled
    ahead of time so that compilation is timed apart; every step reads the loss back to the host
    as the loop does."""

    def __init__(
        self,
        loss_fn,
        tx,
        sched,
        states: list[dict],
        batches: list,
        aux: list,
        compiler_options: dict | None = None,
    ):
        self.step = jax.jit(loop.make_train_step(loss_fn, tx, sched, 1), donate_argnums=(0,))
        self.states, self.batches, self.aux = states, batches, aux
        t = time.perf_counter()
        lowered = self.step.lower(states[0], batches[0][0], aux[0])
        self.compiled = lowered.compile(compiler_options=compiler_options)
        self.compile_seconds = time.perf_counter() - t
        self.i = 0

    def one(self) -> list[float]:
        """One step of every state (a sequential run's members take turns)."""
        out = []
        for m in range(len(self.states)):
            b = self.batches[m][self.i % len(self.batches[m])]
            self.states[m], metrics, *health = self.compiled(self.states[m], b, self.aux[m])
            out.append(read_back(metrics, health))
        self.i += 1
        return out

    def run(self, steps: int) -> tuple[float, list[float]]:
        t = time.perf_counter()
        losses_ = [self.one() for _ in range(steps)]
        return time.perf_counter() - t, [x[0] for x in losses_]


def read_back(metrics: dict, health: list) -> float:
    """What `loop.train` reads back every step: the loss (and, where the step returns it, the
    finiteness flag)."""
    if health:
        bool(health[0]["finite"])
    return float(metrics["loss"])


def fresh_state(params, tx, seed: int = 1) -> dict:
    params = copy_tree(params)
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "opt_state": jax.jit(tx.init)(params),
        "rng": jax.random.PRNGKey(seed),
    }


# --------------------------------------------------------------------------------------------
# matmul_peak


def peak_repeats(peer: C.Peer | None, repeats: int, n: int, dtype: str = "float32") -> dict:
    sides = {"jax": lambda: C.jax_matmul_gflops(n, dtype=dtype)}
    if peer is not None:
        sides["torch"] = lambda: peer.call("matmul", n=n, dtype=dtype)
    runs = C.interleave(repeats, sides)
    out = {k: C.side_summary(v, "GFLOP/s") for k, v in runs.items()}
    out["peak_gflops"] = max(s["median"] for s in out.values())
    out["definition"] = (
        f"median over {repeats} repeats of 3 {dtype} [{n},{n}]@[{n},{n}] products (2n³ FLOPs "
        "each); the machine peak is the larger of the two frameworks' medians"
    )
    return out


def bandwidth_repeats(peer: C.Peer | None, repeats: int, mib: int = 256) -> dict:
    sides = {"jax": lambda: C.jax_copy_bandwidth(mib)}
    if peer is not None:
        sides["torch"] = lambda: peer.call("bandwidth", mib=mib)
    runs = C.interleave(repeats, sides)
    out = {k: C.side_summary(v, "GB/s") for k, v in runs.items()}
    out["bandwidth_gbs"] = max(s["median"] for s in out.values())
    out["definition"] = (
        f"in-place x + 1 over {mib} MiB fp32 (read + write = 2 bytes moved per byte), "
        "median of 3 passes per repeat; the larger of the two frameworks' medians"
    )
    return out


# The same product run other ways, beside the peak: the dot library XLA:CPU uses (YNNPACK by
# default; Eigen with it off; oneDNN through its graph fusion) and bfloat16, which oneDNN (torch)
# can run on AMX tiles where the host has them.
_ONEDNN_DOTS = {
    "xla_cpu_use_onednn": True,
    "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_DOT",
}
CPU_MATMUL_VARIANTS = {
    "jax_fp32_eigen": {"compiler_options": {"xla_cpu_experimental_ynn_fusion_type": ""}},
    "jax_fp32_onednn": {"compiler_options": _ONEDNN_DOTS},
    "jax_bf16": {"dtype": "bfloat16"},
}


def matmul_variant_repeats(peer: C.Peer | None, repeats: int, n: int) -> dict:
    sides = {"jax_fp32": lambda: C.jax_matmul_gflops(n)}
    if jax.default_backend() == "cpu":
        for name, kw in CPU_MATMUL_VARIANTS.items():
            sides[name] = lambda kw=kw: C.jax_matmul_gflops(n, **kw)
    if peer is not None:
        sides["torch_fp32"] = lambda: peer.call("matmul", n=n)
        sides["torch_bf16"] = lambda: peer.call("matmul", n=n, dtype="bfloat16")
    runs = C.interleave(repeats, sides)
    out = {k: C.side_summary(v, "GFLOP/s") for k, v in runs.items()}
    out["definition"] = (
        f"median over {repeats} repeats of 3 [{n},{n}]@[{n},{n}] products per side, interleaved;"
        " jax_fp32_eigen: XLA option xla_cpu_experimental_ynn_fusion_type='' (YNNPACK dots off);"
        " jax_fp32_onednn: xla_cpu_use_onednn with the oneDNN 'dot' graph fusion"
    )
    return out


def matmul_peak_case(peer: C.Peer, args) -> dict:
    peak = peak_repeats(peer, args.repeats, args.n, args.dtype)
    bw = bandwidth_repeats(peer, args.repeats)
    ratio = C.paired_ratio(peak["jax"]["repeats"], peak["torch"]["repeats"])
    return {
        "variants": matmul_variant_repeats(peer, args.repeats, args.n),
        "sort_key": "0",
        "ours": peak["jax"],
        "peer": peak["torch"],
        **ratio,
        "peak_gflops": peak["peak_gflops"],
        "definition": peak["definition"],
        "bandwidth": bw,
    }


# --------------------------------------------------------------------------------------------
# rm_train


def rm_train_case(shape: str, peer: C.Peer, args, workdir: Path) -> dict:
    seq_len, pairs, steps = args.seq_len, args.pairs[shape], args.steps[shape]
    base = C.shape_config(shape)
    cfg = C.shape_config(shape, max_len=max(seq_len, base.max_len), dtype=args.dtype)
    n_batches = steps + args.warmup_steps
    chosen, rejected = random_pairs(cfg, n_batches, pairs, seq_len, args.seed)
    params = with_random_head(tm.init_params(cfg, jax.random.PRNGKey(args.seed)), cfg, args.seed)

    data = workdir / f"rm_{shape}.npz"
    np.savez(data, chosen=chosen, rejected=rejected)
    model_dir = workdir / f"rm_{shape}_hf"
    hf.write_hf_dir(model_dir, params, cfg, head="reward")
    C.log("  peer setup")
    peer_setup = peer.call(
        "setup",
        model_dir=str(model_dir),
        data=str(data),
        learning_rate=OPT["learning_rate"],
        betas=[OPT["b1"], OPT["b2"]],
        eps=OPT["eps"],
        clip_norm=OPT["clip_norm"],
        fused=args.fused_adamw,
        warmup_steps=args.warmup_steps,
    )

    C.log("  ours: compile")
    tx, sched = loop.make_optimizer(
        10**6, schedule="constant", warmup_steps=0, weight_decay=0.0, **OPT
    )
    batches = [pair_batch(chosen[i], rejected[i]) for i in range(n_batches)]
    trainer = OurTrainer(
        losses.bt_loss_fn(cfg), tx, sched, [fresh_state(params, tx)], [batches], [None]
    )
    t = time.perf_counter()
    warm_losses = [trainer.one()[0] for _ in range(args.warmup_steps)]
    warmup_s = time.perf_counter() - t

    def ours() -> dict:
        dt, ls = trainer.run(steps)
        return {"seconds": dt, "steps": steps, "value": steps * pairs / dt, "losses": ls}

    def theirs() -> dict:
        return peer.call("run", steps=steps)

    peak = peak_repeats(peer, args.peak_repeats, args.n, args.dtype)
    runs = C.interleave(args.repeats, {"ours": ours, "peer": theirs})
    peak_end = peak_repeats(peer, args.peak_repeats, args.n, args.dtype)
    peak_gflops = max(peak["peak_gflops"], peak_end["peak_gflops"])

    flops_token = C.train_flops_per_token(cfg, seq_len)
    tokens_pair = 2 * seq_len
    ratio = C.paired_ratio(runs["ours"], runs["peer"])
    out = {
        "sort_key": f"{C.SHAPES.index(shape)}",
        "shape": shape,
        "model": cfg.to_dict(),
        "n_params": tm.count_params(params),
        "matmul_params": C.matmul_params(cfg),
        "workload": {
            "pairs_per_step": pairs,
            "seq_len": seq_len,
            "tokens_per_step": pairs * tokens_pair,
            "steps_per_repeat": steps,
            "warmup_steps": args.warmup_steps,
            "optimizer": {**OPT, "weight_decay": 0.0, "schedule": "constant"},
            "dtype": args.dtype,
        },
        "ours": C.side_summary(
            runs["ours"],
            "pairs/s",
            compile_seconds=trainer.compile_seconds,
            warmup_seconds=warmup_s,
            warmup_losses=warm_losses,
            what="warm_jax.training.loop.make_train_step(bt_loss_fn) jitted, state donated",
        ),
        "peer": C.side_summary(
            runs["peer"],
            "pairs/s",
            **peer_setup,
            what=(
                "transformers LlamaForSequenceClassification, BT loss, backward, "
                f"clip_grad_norm_, torch.optim.AdamW(fused={args.fused_adamw})"
            ),
        ),
        **ratio,
        "target": args.targets.get(shape),
        "first_step_loss_diff": abs(warm_losses[0] - peer_setup["warmup_losses"][0]),
        "flops": {
            **C.flops_summary(
                "per pair: 2·T × (6·N + 12·n_layers·n_heads·head_dim·T), N = matmul_params "
                "(q,k,v,o,gate,up,down; no embedding lookup, no LM head)",
                flops_token * tokens_pair,
                C.median_rates(runs),
                peak_gflops,
            ),
            "flops_per_step": flops_token * pairs * tokens_pair,
            "peak_start": peak,
            "peak_end": peak_end,
        },
    }
    out["peak_fraction"] = out["flops"]["ours_peak_fraction"]
    if shape == "smollm2_135m":
        out["peak_fraction_target"] = 0.8
        out["met"] = bool(out["speedup"] >= (out["target"] or 0) and out["peak_fraction"] >= 0.8)
    return out


# --------------------------------------------------------------------------------------------
# members


def members_case(shape: str, m: int, args) -> dict:
    pairs, seq_len, steps = args.pairs[shape], args.seq_len[shape], args.steps[shape]
    base = C.shape_config(shape)
    cfg = C.shape_config(shape, max_len=max(seq_len, base.max_len))
    specs = mem.member_specs(m, seed=args.seed)
    params = tm.init_params(cfg, jax.random.PRNGKey(args.seed))
    n_batches = 4
    data = [random_pairs(cfg, n_batches, pairs, seq_len, args.seed + i) for i in range(m)]
    member_batches = [[pair_batch(c[i], r[i]) for i in range(n_batches)] for c, r in data]
    loss_fn = losses.bt_loss_fn(cfg)
    num_steps = 10**6

    C.log("  sequential: compile")
    tx0, sched0 = mem.member_optimizer(num_steps, specs[0].learning_rate)
    states = [
        fresh_state(params, mem.member_optimizer(num_steps, s.learning_rate)[0]) for s in specs
    ]
    seq = OurTrainer(
        loss_fn,
        tx0,
        sched0,
        states,
        member_batches,
        [mem.member_aux(s) for s in specs],
    )
    C.log("  vmapped: compile")
    txv, schedv = mem.vmapped_optimizer(num_steps, [s.learning_rate for s in specs])
    stacked = [
        {k: np.stack([mb[i][k] for mb in member_batches], axis=1) for k in member_batches[0][0]}
        for i in range(n_batches)
    ]
    vm = OurTrainer(
        mem.vmapped_loss_fn(loss_fn, m),
        txv,
        schedv,
        [fresh_state(mem.stack([params] * m), txv)],
        [stacked],
        [mem.stacked_aux(specs)],
    )
    t = time.perf_counter()
    for _ in range(args.warmup_steps):
        seq.one()
    seq_warm = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(args.warmup_steps):
        vm.one()
    vm_warm = time.perf_counter() - t

    def sequential() -> dict:
        dt, _ = seq.run(steps)
        return {"seconds": dt, "steps": steps, "value": steps * m / dt}

    def vmapped() -> dict:
        dt, _ = vm.run(steps)
        return {"seconds": dt, "steps": steps, "value": steps * m / dt}

    runs = C.interleave(args.repeats, {"ours": vmapped, "peer": sequential})
    return {
        "sort_key": f"{C.SHAPES.index(shape)}-{m:02d}",
        "shape": shape,
        "members": m,
        "model": cfg.to_dict(),
        "workload": {
            "pairs_per_member_step": pairs,
            "seq_len": seq_len,
            "steps_per_repeat": steps,
            "member_specs": [s.to_dict() for s in specs],
        },
        "ours": C.side_summary(
            runs["ours"],
            "member-steps/s",
            compile_seconds=vm.compile_seconds,
            warmup_seconds=vm_warm,
            what="vmapped: one step of M stacked members (members.vmapped_loss_fn, "
            "vmapped_optimizer), as members.train_vmapped",
        ),
        "peer": C.side_summary(
            runs["peer"],
            "member-steps/s",
            compile_seconds=seq.compile_seconds,
            warmup_seconds=seq_warm,
            what="sequential: M members one after another, one shared compiled step "
            "(member_optimizer, member_aux), as members.train_member",
        ),
        **C.paired_ratio(runs["ours"], runs["peer"]),
        "target": args.targets.get(shape),
        "ms_per_member_step": {
            "vmapped": 1e3 / C.median([r["value"] for r in runs["ours"]]),
            "sequential": 1e3 / C.median([r["value"] for r in runs["peer"]]),
        },
    }


def describe(name: str) -> dict[str, Any]:
    return {
        "rm_train": {
            "description": "Reward-model training throughput (pairs/s), Bradley–Terry loss, "
            "fp32 (or --dtype): warm_jax's jitted train step vs transformers LlamaForSequenceClassification "
            "+ torch AdamW in a plain loop, same shapes, initial weights and batches",
        },
        "members": {
            "description": "Training M reward-model members at once (vmapped, as "
            "members.train_vmapped) vs one after another (as members.train_member): "
            "member-steps per second; 'ours' = vmapped, 'peer' = sequential",
        },
        "matmul_peak": {
            "description": "Dense fp32 matmul rate (GFLOP/s) of JAX/XLA and PyTorch on this "
            "machine, and memory bandwidth, interleaved in one run",
        },
    }[name]
