"""Our side of `reinforce` (see `run.py --help`)."""

from __future__ import annotations

import time
from pathlib import Path

import jax
import numpy as np

from benchmarks import bench_train
from benchmarks import common as C
from warm_jax.io import hf
from warm_jax.models import transformer as tm
from warm_jax.policy import reinforce, rewards
from warm_jax.training import loop

RL = {"beta": 0.1, "anchor": "ema", "mu": 0.01, "baseline": "rloo", "temperature": 0.9}
OPT = {"learning_rate": 1e-6, "b1": 0.9, "b2": 0.95, "eps": 1e-8, "clip_norm": 1.0}


def reinforce_case(shape: str, peer: C.Peer, args, workdir: Path) -> dict:
    plen, n, k, bsz = args.prompt_len, args.new_tokens, args.samples, args.prompts
    base = C.shape_config(shape)
    cfg = C.shape_config(shape, max_len=max(plen + n, base.max_len), dtype=args.dtype)
    key = jax.random.PRNGKey(args.seed)
    policy = tm.init_params(cfg, key)
    rm = bench_train.with_random_head(
        tm.init_params(cfg, jax.random.fold_in(key, 1)), cfg, args.seed
    )
    steps = args.steps[shape]
    n_batches = steps + args.warmup_steps
    rng = np.random.default_rng(args.seed)
    prompts = rng.integers(1, cfg.vocab_size, (n_batches, bsz, plen), dtype=np.int32)
    prompt_file = workdir / f"rl_prompts_{shape}.npy"
    np.save(prompt_file, prompts)
    policy_dir, rm_dir = workdir / f"rl_policy_{shape}_hf", workdir / f"rl_rm_{shape}_hf"
    hf.write_hf_dir(policy_dir, policy, cfg, head="causal-lm")
    hf.write_hf_dir(rm_dir, rm, cfg, head="reward")

    C.log("  peer setup")
    peer_setup = peer.call(
        "setup",
        policy_dir=str(policy_dir),
        rm_dir=str(rm_dir),
        prompts=str(prompt_file),
        samples=k,
        new_tokens=n,
        temperature=RL["temperature"],
        beta=RL["beta"],
        mu=RL["mu"],
        learning_rate=OPT["learning_rate"],
        betas=[OPT["b1"], OPT["b2"]],
        eps=OPT["eps"],
        clip_norm=OPT["clip_norm"],
        fused=args.fused_adamw,
        warmup_steps=args.warmup_steps,
        seed=args.seed,
    )

    # As reinforce.train_policy builds its step (loop.train jits make_train_step).
    C.log("  ours: compile")
    rl = reinforce.RLConfig(num_samples=k, max_new_tokens=n, **RL).validate()
    reward = rewards.model_reward(cfg, rm)
    loss_fn = reinforce.make_loss_fn(cfg, rl, reward, None, eos_id=None, pad_id=0)
    tx, sched = loop.make_optimizer(
        10**6, schedule="constant", warmup_steps=0, weight_decay=0.0, **OPT
    )
    step = jax.jit(
        loop.make_train_step(loss_fn, tx, sched, 1, reinforce.ema_aux_update(rl.mu)),
        donate_argnums=(0,),
    )
    state = bench_train.fresh_state(policy, tx)
    state["aux"] = bench_train.copy_tree({"anchor": policy, "sft": policy, "reward": rm})
    batches = [{k_: v for k_, v in zip(reinforce.PROMPT_KEYS, prompt_arrays(p))} for p in prompts]
    t = time.perf_counter()
    compiled = step.lower(state, batches[0], None).compile()
    compile_s = time.perf_counter() - t
    counter = {"i": 0}

    def one() -> dict:
        nonlocal state
        b = batches[counter["i"] % len(batches)]
        counter["i"] += 1
        state, metrics, *health = compiled(state, b, None)
        bench_train.read_back(metrics, health)  # what the loop reads back every step
        host = jax.device_get(metrics)
        return {
            key_: float(host[key_])
            for key_ in ("loss", "reward", "kl_anchor", "kl_sft", "entropy", "grad_norm")
        }

    t = time.perf_counter()
    warm = [one() for _ in range(args.warmup_steps)]
    warmup_s = time.perf_counter() - t

    def ours() -> dict:
        t = time.perf_counter()
        ms = [one() for _ in range(steps)]
        dt = time.perf_counter() - t
        return {"seconds": dt, "steps": steps, "value": steps / dt, "metrics": ms}

    def theirs() -> dict:
        return peer.call("run", steps=steps)

    peak = bench_train.peak_repeats(peer, args.peak_repeats, args.n, args.dtype)
    runs = C.interleave(args.repeats, {"ours": ours, "peer": theirs})
    frozen = 1 if RL["anchor"] == "sft" else 2  # the anchor, and SFT unless it is the anchor
    rates = C.median_rates(runs)
    flops = C.flops_summary(
        "per step: reinforce_flops (benchmarks/common.py): sampling prompts × k responses, then "
        f"over prompt + response the policy forward + backward (3 passes) and {frozen} frozen "
        "policies' forward passes, vocabulary projections on response slots only, and the "
        "reward model's forward pass",
        C.reinforce_flops(cfg, bsz * k, plen, n, frozen),
        rates,
        peak["peak_gflops"],
    )
    return {
        "sort_key": f"{C.SHAPES.index(shape)}",
        "shape": shape,
        "model": cfg.to_dict(),
        "workload": {
            "prompts_per_step": bsz,
            "samples_per_prompt": k,
            "prompt_len": plen,
            "new_tokens": n,
            "steps_per_repeat": steps,
            "rl": RL,
            "optimizer": {**OPT, "weight_decay": 0.0, "schedule": "constant"},
            "reward_model": "same shape as the policy, its own random init and head",
            "dtype": args.dtype,
        },
        "ours": C.side_summary(
            runs["ours"],
            "steps/s",
            compile_seconds=compile_s,
            warmup_seconds=warmup_s,
            warmup_metrics=warm,
            what="loop.make_train_step(reinforce.make_loss_fn, aux_update=ema_aux_update) "
            "jitted, state donated (as reinforce.train_policy)",
        ),
        "peer": C.side_summary(
            runs["peer"],
            "steps/s",
            **peer_setup,
            what="transformers generate(do_sample) + teacher-forced log-probs (policy with "
            "grad; anchor, sft, reward model without) + RLOO + AdamW + EMA, plain PyTorch",
        ),
        **C.paired_ratio(runs["ours"], runs["peer"]),
        "target": 2.0,
        "ms_per_step": {side: 1e3 / rate for side, rate in rates.items()},
        "flops": {**flops, "peak": peak},
    }


def prompt_arrays(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Full-length prompts as `left_pad` lays them out: tokens, segment ids, positions."""
    b, p = tokens.shape
    ones = np.ones((b, p), np.int32)
    pos = np.broadcast_to(np.arange(p, dtype=np.int32), (b, p)).copy()
    return tokens.astype(np.int32), ones, pos


def describe(name: str) -> dict:
    return {
        "description": "One KL-regularised REINFORCE step (k samples per prompt, reward model, "
        "RLOO, EMA anchor), fp32 (or --dtype), steps/s: warm_jax's jitted step vs the same step in "
        "PyTorch/transformers",
    }
