"""Our side of `sampling` (see `run.py --help`)."""

from __future__ import annotations

import math
import time
from pathlib import Path

import jax
import numpy as np

from benchmarks import bench_train
from benchmarks import common as C
from warm_jax.io import hf
from warm_jax.models import transformer as tm
from warm_jax.policy import sampling


def sampling_cases(shape: str, peer: C.Peer, args, workdir: Path) -> list[dict]:
    plen, n = args.prompt_len, args.new_tokens
    base = C.shape_config(shape)
    cfg = C.shape_config(shape, max_len=max(plen + n, base.max_len), dtype=args.dtype)
    params = tm.init_params(cfg, jax.random.PRNGKey(args.seed))
    rng = np.random.default_rng(args.seed)
    prompts = rng.integers(1, cfg.vocab_size, (max(args.batches), plen), dtype=np.int32)
    prompt_file = workdir / f"prompts_{shape}.npy"
    np.save(prompt_file, prompts)
    model_dir = workdir / f"policy_{shape}_hf"
    hf.write_hf_dir(model_dir, params, cfg, head="causal-lm")
    peer_setup = peer.call("setup", model_dir=str(model_dir), prompts=str(prompt_file))
    scfg = sampling.SamplingConfig(max_new_tokens=n, temperature=0.0, eos_id=None)

    # The memory-bandwidth bound of batch 1: every new token reads all weights once.
    n_params = C.total_params(cfg)
    weight_bytes = C.dtype_bytes(args.dtype) * n_params
    bw = bench_train.bandwidth_repeats(peer, 2)
    bound = bw["bandwidth_gbs"] * 1e9 / weight_bytes
    peak = bench_train.peak_repeats(peer, args.peak_repeats, args.n, args.dtype)

    cases = []
    for b in args.batches:
        batch = sampling.left_pad(prompts[:b].tolist(), length=plen)

        calls = {"ours": 1, "peer": 1}

        def ours(batch=batch, b=b, calls=calls) -> dict:
            t = time.perf_counter()
            for _ in range(calls["ours"]):
                s = sampling.sample(params, cfg, batch, 0, scfg)
                tokens = np.asarray(s.tokens)
            dt = time.perf_counter() - t
            k = calls["ours"]
            return {"seconds": dt, "calls": k, "value": k * b * n / dt, "tokens": tokens}

        def theirs(b=b, calls=calls) -> dict:
            return peer.call("run", batch=b, new_tokens=n, calls=calls["peer"])

        def case(b=b, ours=ours, theirs=theirs, calls=calls) -> dict:
            first = ours()
            steady = ours()
            compile_s = first["seconds"] - steady["seconds"]
            ours_tokens = first.pop("tokens")
            steady.pop("tokens")
            pw = peer.call("warmup", batch=b, new_tokens=n)
            peer_tokens = np.asarray(pw.pop("tokens"))
            peer_steady = theirs()["seconds"]
            # Short calls are repeated so that a timed repeat lasts >= --min-seconds.
            calls["ours"] = max(1, math.ceil(args.min_seconds / steady["seconds"]))
            calls["peer"] = max(1, math.ceil(args.min_seconds / peer_steady))
            agree = float((ours_tokens == peer_tokens).mean())
            # Rows equal up to their first difference (greedy paths diverge after a near-tie).
            same_prefix = [
                int(np.argmax(r != q)) if (r != q).any() else n
                for r, q in zip(ours_tokens, peer_tokens)
            ]

            def ours_timed() -> dict:
                r = ours()
                r.pop("tokens")
                return r

            runs = C.interleave(args.repeats, {"ours": ours_timed, "peer": theirs})
            out = {
                "sort_key": f"{C.SHAPES.index(shape)}-{b:03d}",
                "shape": shape,
                "batch": b,
                "model": cfg.to_dict(),
                "n_params": n_params,
                "workload": {
                    "prompt_len": plen,
                    "new_tokens": n,
                    "decoding": f"greedy, no EOS, {args.dtype}, KV cache",
                    "dtype": args.dtype,
                    "value": "new tokens per second (calls × batch × new tokens / wall time of "
                    "the generate calls, prefill included)",
                    "calls_per_repeat": dict(calls),
                },
                "ours": C.side_summary(
                    runs["ours"],
                    "tokens/s",
                    compile_seconds=compile_s,
                    first_call_seconds=first["seconds"],
                    what="warm_jax.policy.sampling.sample (jitted prefill + while_loop decode)",
                ),
                "peer": C.side_summary(
                    runs["peer"],
                    "tokens/s",
                    **peer_setup,
                    first_call_seconds=pw["seconds"],
                    what="transformers LlamaForCausalLM.generate(do_sample=False, "
                    "use_cache=True), torch.inference_mode",
                ),
                **C.paired_ratio(runs["ours"], runs["peer"]),
                "target": 2.0 if b in (1, 16) else None,
                "greedy_agreement": {
                    "fraction_equal_tokens": agree,
                    "min_equal_prefix": min(same_prefix),
                    "rows_fully_equal": sum(p == n for p in same_prefix),
                    "rows": b,
                },
            }
            if b == 1:
                out["bandwidth_bound"] = {
                    "weight_bytes": weight_bytes,
                    "bandwidth": bw,
                    "bound_tokens_per_s": bound,
                    "formula": "bandwidth_GB/s · 1e9 / (bytes per weight · parameters incl. "
                    "the tied embedding once)",
                    "note": "weights that fit in the CPU caches (tiny, small) are not bounded "
                    "by DRAM bandwidth",
                }
                out["bound_fraction"] = out["ours"]["median"] / bound
            out["flops"] = C.flops_summary(
                "per new token: generate_flops(batch, prompt_len, new_tokens) / (batch · "
                "new_tokens), benchmarks/common.py: 2·N per token fed (N = matmul_params), "
                "4·n_layers·n_heads·head_dim per causally attended key, 2·V·d per vocabulary row",
                C.generate_flops(cfg, b, plen, n) / (b * n),
                C.median_rates(runs),
                peak["peak_gflops"],
            )
            out["flops"]["peak"] = peak
            if out["target"] is None:
                out.pop("target")
            return out

        cases.append(C.run_case(f"sampling/{shape}/b{b}", case))
    return cases


def describe(name: str) -> dict:
    return {
        "description": "Generation throughput (new tokens/s), greedy, fixed length, fp32 "
        "(or --dtype): "
        "warm_jax.policy.sampling.sample vs transformers generate, same weights and prompts",
    }
