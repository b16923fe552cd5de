"""Merge time and peak memory: `warm-jax merge` vs mergekit, on SmolLM2-135M-shaped weights.

Creates a base model and M random fine-tunes of the SmolLM2-135M shape (Llama: 30 layers,
width 576, MLP 1536, 9 heads / 3 KV heads of 64, vocab 49152, tied embeddings; bfloat16 like
the released weights), saved both as our Orbax params checkpoints and as HF-style safetensors
directories, then times as subprocesses, on the same weights:

* average: `warm-jax merge --method average`  vs  mergekit `linear`;
* SLERP:   `warm-jax merge --method slerp --base` (one angle per tensor)  vs  mergekit `nuslerp`
  with `base_model` (two models per run, so M > 2 chains M - 1 runs with weights (m-1, 1), which
  is WARP's slerp(slerp(θ1..θ_{M-1}), θ_M, 1/M)).

Both sides compute in float32 and write bfloat16 (mergekit: `dtype: float32`,
`out_dtype: bfloat16`). Wall time is end to end (interpreter start, imports, reading, merging,
writing); peak RSS is the child's `ru_maxrss` from `wait4` (for a chain, the largest of its
runs). Inputs are read from a warm page cache. The merged outputs of M = 2 are compared
element-wise. Results (every repeat, medians, ratios, environment) go to a JSON file.

mergekit needs torch; install both in a separate virtualenv (not the project's):
    python3.11 -m venv /tmp/benchvenv
    /tmp/benchvenv/bin/pip install torch==2.13.0 mergekit==0.1.5 transformers==5.24.0
Run from the repository root with the project's environment (writes
benchmarks/results/merge_bench.json):
    .venv/bin/python benchmarks/run.py merge --benchvenv /tmp/benchvenv
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ml_dtypes
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from warm_jax.training import checkpoints as ck  # noqa: E402

BF16 = np.dtype(ml_dtypes.bfloat16)


# --------------------------------------------------------------------------------------------
# The model shape and its two layouts


def smollm2_config(n_layers: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "num_hidden_layers": n_layers,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0,
        "torch_dtype": "bfloat16",
        "bos_token_id": 0,
        "eos_token_id": 0,
    }


def tensor_specs(cfg: dict) -> list[tuple[tuple[str, ...], tuple[int, ...], str, str]]:
    """(our key path, our shape, HF name, how to map ours to HF) for every tensor."""
    d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    h, kv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    specs = [(("params", "embed", "embedding"), (v, d), "model.embed_tokens.weight", "same")]
    for i in range(cfg["num_hidden_layers"]):
        b, hf = ("params", f"block_{i}"), f"model.layers.{i}."
        specs += [
            ((*b, "attn", "q"), (d, h, hd), hf + "self_attn.q_proj.weight", "in_first"),
            ((*b, "attn", "k"), (d, kv, hd), hf + "self_attn.k_proj.weight", "in_first"),
            ((*b, "attn", "v"), (d, kv, hd), hf + "self_attn.v_proj.weight", "in_first"),
            ((*b, "attn", "o"), (h, hd, d), hf + "self_attn.o_proj.weight", "out_last"),
            ((*b, "attn_norm", "scale"), (d,), hf + "input_layernorm.weight", "same"),
            ((*b, "mlp", "gate"), (d, f), hf + "mlp.gate_proj.weight", "in_first"),
            ((*b, "mlp", "up"), (d, f), hf + "mlp.up_proj.weight", "in_first"),
            ((*b, "mlp", "down"), (f, d), hf + "mlp.down_proj.weight", "in_first"),
            ((*b, "mlp_norm", "scale"), (d,), hf + "post_attention_layernorm.weight", "same"),
        ]
    specs.append((("params", "final_norm", "scale"), (d,), "model.norm.weight", "same"))
    return specs


def to_hf(x: np.ndarray, how: str) -> np.ndarray:
    """Our (in, ..., out) kernels as torch Linear weights (out, in)."""
    if how == "same":
        return x
    if how == "in_first":  # (in, *out) -> (prod(out), in)
        return np.ascontiguousarray(x.reshape(x.shape[0], -1).T)
    # "out_last": (*in, out) -> (out, prod(in))
    return np.ascontiguousarray(x.reshape(-1, x.shape[-1]).T)


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """The safetensors format: u64 header length, JSON header, raw little-endian data."""
    names = {BF16: "BF16", np.dtype(np.float32): "F32"}
    header, offset = {}, 0
    for name, t in tensors.items():
        header[name] = {
            "dtype": names[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for t in tensors.values():
            fh.write(t.tobytes())


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    dtypes = {"BF16": BF16, "F32": np.dtype(np.float32)}
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        data = file.read_bytes()
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + n])
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            a, b = meta["data_offsets"]
            buf = data[8 + n + a : 8 + n + b]
            out[name] = np.frombuffer(buf, dtypes[meta["dtype"]]).reshape(meta["shape"])
    return out


def make_models(root: Path, n_models: int, n_layers: int, seed: int) -> dict:
    """base + n_models fine-tunes θ_i = base + δ_i (δ ~ N(0, 0.002²), base ~ N(0, 0.02²))."""
    cfg = smollm2_config(n_layers)
    manifest = {"n_models": n_models, "n_layers": n_layers, "seed": seed, "version": 3}
    stamp = root / "manifest.json"
    specs = tensor_specs(cfg)
    n_params = sum(int(np.prod(s)) for _, s, _, _ in specs)
    info = {"config": cfg, "n_params": n_params, "bytes_per_model": 2 * n_params}
    if stamp.exists() and json.loads(stamp.read_text()) == manifest:
        return info
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    base32 = {}
    for path, shape, _, _ in specs:
        if path[-1] == "scale":
            base32[path] = np.ones(shape, np.float32)
        else:
            base32[path] = 0.02 * rng.standard_normal(shape, np.float32)
    for m in range(n_models + 1):
        name = "base" if m == 0 else f"model_{m}"
        print(f"  writing {name}", file=sys.stderr)
        params: dict = {}
        hf = {}
        for path, shape, hf_name, how in specs:
            x = base32[path]
            if m > 0:
                x = x + 0.002 * rng.standard_normal(shape, np.float32)
            x = x.astype(BF16)
            node = params
            for k in path[:-1]:
                node = node.setdefault(k, {})
            node[path[-1]] = x
            hf[hf_name] = to_hf(x, how)
        ck.save_params(root / "orbax" / name, params, {"model": "smollm2-135m-shape"})
        hf_dir = root / "hf" / name
        hf_dir.mkdir(parents=True)
        write_safetensors(hf_dir / "model.safetensors", hf)
        (hf_dir / "config.json").write_text(json.dumps(cfg, indent=2))
        del params, hf
    stamp.write_text(json.dumps(manifest))
    return info


# --------------------------------------------------------------------------------------------
# Running and measuring


def measure(cmd: list[str], env: dict | None = None) -> dict:
    """Wall seconds, CPU seconds (user + sys) and peak RSS (MiB) of one subprocess, as GNU time
    reports them (time forks the command itself, so this big parent's pages never count)."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as report:
        timed = ["/usr/bin/time", "-o", report.name, "-f", "%e %U %S %M", *cmd]
        proc = subprocess.run(timed, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        if proc.returncode != 0:
            tail = proc.stdout.decode(errors="replace")[-3000:]
            raise RuntimeError(f"{' '.join(cmd[:4])}... exited {proc.returncode}:\n{tail}")
        wall, user, system, rss_kb = report.read().split()[-4:]
    return {
        "seconds": float(wall),
        "cpu_seconds": float(user) + float(system),
        "max_rss_mib": int(rss_kb) / 1024,
    }


def warm_cache(root: Path) -> None:
    for f in root.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass


def ours(method: str, models: list[Path], base: Path | None, out: Path, cache: Path) -> dict:
    cmd = [sys.executable, "-m", "warm_jax.cli", "merge", "--method", method]
    cmd += ["--inputs", *map(str, models), "--output", str(out), "--overwrite", "--no_progress"]
    if base is not None:
        cmd += ["--base", str(base), "--granularity", "leaf"]
    # The persistent JAX compilation cache lives under XDG_CACHE_HOME (see the "cold" runs).
    env = dict(
        os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="3", XDG_CACHE_HOME=str(cache)
    )
    r = measure(cmd, env)
    r["in_process_merge_seconds"] = ck.load_metadata(out)["merge"]["merge_seconds"]
    return r


def mergekit_run(venv: Path, config: dict, out: Path, scratch: Path) -> dict:
    cfg_file = scratch / f"{out.name}.yml"
    cfg_file.write_text(json.dumps(config, indent=2))  # JSON is YAML
    shutil.rmtree(out, ignore_errors=True)
    cmd = [str(venv / "bin" / "mergekit-yaml"), str(cfg_file), str(out)]
    cmd += ["--no-copy-tokenizer", "--no-write-model-card", "--quiet"]
    return measure(cmd)


def mergekit_linear(venv: Path, models: list[Path], out: Path, scratch: Path) -> dict:
    config = {
        "merge_method": "linear",
        "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in models],
        "dtype": "float32",
        "out_dtype": "bfloat16",
    }
    return mergekit_run(venv, config, out, scratch)


def mergekit_nuslerp_chain(
    venv: Path, models: list[Path], base: Path, out: Path, scratch: Path
) -> dict:
    """slerp(slerp(θ1..θ_{M-1}), θ_M, 1/M) as M - 1 nuslerp runs about `base`."""
    total, cpu, peak, current = 0.0, 0.0, 0.0, models[0]
    for m in range(2, len(models) + 1):
        step_out = out if m == len(models) else scratch / f"{out.name}.step{m}"
        config = {
            "merge_method": "nuslerp",
            "base_model": str(base),
            "models": [
                {"model": str(current), "parameters": {"weight": float(m - 1)}},
                {"model": str(models[m - 1]), "parameters": {"weight": 1.0}},
            ],
            "dtype": "float32",
            "out_dtype": "bfloat16",
        }
        r = mergekit_run(venv, config, step_out, scratch)
        total += r["seconds"]
        cpu += r["cpu_seconds"]
        peak = max(peak, r["max_rss_mib"])
        current = step_out
    return {"seconds": total, "cpu_seconds": cpu, "max_rss_mib": peak, "runs": len(models) - 1}


def compare(ours_dir: Path, mk_dir: Path, cfg: dict) -> dict:
    """Element-wise agreement of our merged weights and mergekit's (bfloat16 outputs)."""
    ours_p = ck.load_params(ours_dir)
    theirs = read_safetensors(mk_dir)
    worst, n_diff, n = 0.0, 0, 0
    for path, _, hf_name, how in tensor_specs(cfg):
        node = ours_p
        for k in path:
            node = node[k]
        a = to_hf(np.asarray(node), how).astype(np.float32)
        b = theirs[hf_name].astype(np.float32)
        diff = np.abs(a - b)
        # One bfloat16 ulp at each value: 2^(exponent - 7).
        ulp = np.exp2(np.floor(np.log2(np.maximum(np.abs(b), 1e-30))) - 7)
        worst = max(worst, float(diff.max()))
        n_diff += int((diff > ulp).sum())
        n += a.size
    return {"max_abs_diff": worst, "fraction_over_1_ulp": n_diff / n}


# --------------------------------------------------------------------------------------------


def environment(venv: Path) -> dict:
    def pkg(python: str, name: str) -> str:
        code = f"import importlib.metadata as m; print(m.version('{name}'))"
        r = subprocess.run([python, "-c", code], capture_output=True, text=True)
        return r.stdout.strip() or "missing"

    cpu = "unknown"
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    bench_py = str(venv / "bin" / "python")
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "memory_gib": round(mem, 1),
        "jax": pkg(sys.executable, "jax"),
        "orbax-checkpoint": pkg(sys.executable, "orbax-checkpoint"),
        "torch": pkg(bench_py, "torch"),
        "mergekit": pkg(bench_py, "mergekit"),
        "transformers": pkg(bench_py, "transformers"),
    }


def summarise(runs: list[dict]) -> list[dict]:
    rows = []
    keys = sorted({(r["method"], r["M"]) for r in runs})
    for method, m in keys:
        row = {"method": method, "M": m}
        for tool in ("warm_jax", "mergekit"):
            sel = [r for r in runs if r["method"] == method and r["M"] == m and r["tool"] == tool]
            row["repeats"] = len(sel)
            for key in ("seconds", "cpu_seconds", "max_rss_mib"):
                row[f"{tool}_{key}_median"] = statistics.median(r[key] for r in sel)
        row["speedup_vs_mergekit"] = row["mergekit_seconds_median"] / row["warm_jax_seconds_median"]
        row["cpu_speedup_vs_mergekit"] = (
            row["mergekit_cpu_seconds_median"] / row["warm_jax_cpu_seconds_median"]
        )
        row["rss_ratio_vs_mergekit"] = (
            row["warm_jax_max_rss_mib_median"] / row["mergekit_max_rss_mib_median"]
        )
        rows.append(row)
    return rows


def run_pair(method: str, m: int, data: Path, outs: Path, scratch: Path, venv: Path, cache: Path):
    orbax_models = [data / "orbax" / f"model_{i}" for i in range(1, m + 1)]
    hf_models = [data / "hf" / f"model_{i}" for i in range(1, m + 1)]
    tag = f"{method}_M{m}"
    if method == "average":
        a = ours("average", orbax_models, None, outs / f"ours_{tag}", cache)
        b = mergekit_linear(venv, hf_models, outs / f"mk_{tag}", scratch)
    else:
        a = ours("slerp", orbax_models, data / "orbax" / "base", outs / f"ours_{tag}", cache)
        b = mergekit_nuslerp_chain(
            venv, hf_models, data / "hf" / "base", outs / f"mk_{tag}", scratch
        )
    return tag, a, b


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ms", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--methods", nargs="+", default=["average", "slerp"])
    p.add_argument("--repeats", type=int, default=3, help="repeats of the average runs")
    p.add_argument(
        "--slerp_repeats",
        type=int,
        default=1,
        help="repeats of the SLERP runs (a mergekit nuslerp chain for M = 8 takes minutes)",
    )
    p.add_argument("--layers", type=int, default=30, help="30 is SmolLM2-135M")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/warm_jax_merge_bench"))
    p.add_argument("--benchvenv", type=Path, default=Path("/tmp/benchvenv"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--output",
        type=Path,
        default=REPO / "benchmarks" / "results" / "merge_bench.json",
    )
    args = p.parse_args()
    if not (args.benchvenv / "bin" / "mergekit-yaml").exists():
        print(f"mergekit-yaml not found in {args.benchvenv}; see this file's docstring")
        return 2

    data = args.workdir / "models"
    print("creating models (cached between runs)", file=sys.stderr)
    t0 = time.time()
    info = make_models(data, max(args.ms), args.layers, args.seed)
    print(f"  {time.time() - t0:.1f}s; warming the page cache", file=sys.stderr)
    warm_cache(data)
    scratch = args.workdir / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    outs = args.workdir / "outputs"
    outs.mkdir(parents=True, exist_ok=True)

    cache = args.workdir / "xdg_cache"
    runs: list[dict] = []
    cold: list[dict] = []
    checks: dict = {}
    # First runs with an empty compilation cache: what a user pays once per machine and shapes.
    shutil.rmtree(cache, ignore_errors=True)
    for method in args.methods:
        m = min(args.ms)
        orbax_models = [data / "orbax" / f"model_{i}" for i in range(1, m + 1)]
        base = data / "orbax" / "base" if method == "slerp" else None
        r = ours(method, orbax_models, base, outs / f"ours_cold_{method}", cache)
        cold.append({"tool": "warm_jax", "method": method, "M": m, **r})
        print(f"cold compilation cache {method} M={m}: {r}", file=sys.stderr)

    for rep in range(max(args.repeats, args.slerp_repeats)):
        for m in args.ms:
            for method in args.methods:
                if rep >= (args.slerp_repeats if method == "slerp" else args.repeats):
                    continue
                load_before = os.getloadavg()[0]
                tag, a, b = run_pair(method, m, data, outs, scratch, args.benchvenv, cache)
                load = {
                    "loadavg_1min_before": load_before,
                    "loadavg_1min_after": os.getloadavg()[0],
                }
                for tool, r in (("warm_jax", a), ("mergekit", b)):
                    runs.append(
                        {"tool": tool, "method": method, "M": m, "repeat": rep, **r, **load}
                    )
                print(
                    f"rep {rep} {tag}: ours {a['seconds']:.1f}s {a['max_rss_mib']:.0f}MiB | "
                    f"mergekit {b['seconds']:.1f}s {b['max_rss_mib']:.0f}MiB",
                    file=sys.stderr,
                )
                if rep == 0 and m == min(args.ms):
                    checks[tag] = compare(outs / f"ours_{tag}", outs / f"mk_{tag}", info["config"])
                    print(f"  agreement {tag}: {checks[tag]}", file=sys.stderr)

    loads = [r[k] for r in runs for k in ("loadavg_1min_before", "loadavg_1min_after")]
    result = {
        "benchmark": "merge time and peak RSS, warm-jax merge vs mergekit-yaml",
        "model": {
            "shape": "SmolLM2-135M (Llama, tied embeddings)",
            "layers": args.layers,
            "n_params": info["n_params"],
            "dtype": "bfloat16",
            "mib_per_model": round(info["bytes_per_model"] / 2**20, 1),
        },
        "settings": {
            "warm_jax": "warm-jax merge (CLI subprocess), float32 accumulation, Orbax in/out "
            "(params checkpoints as save_params writes them: uncompressed, with per-array "
            "fingerprints, verified on every read); slerp with --granularity leaf (one angle per "
            "tensor, like nuslerp's flatten)",
            "mergekit": "mergekit-yaml, dtype float32, out_dtype bfloat16, safetensors in/out, "
            "--no-copy-tokenizer --no-write-model-card --quiet; nuslerp M>2 = chain of M-1 runs",
            "timing": "wall and CPU (user+sys) seconds end to end incl. interpreter start and "
            "imports, from GNU time; inputs in warm page cache; peak RSS = GNU time's max RSS "
            "of the child (max over a chain's runs); warm_jax runs use a warm JAX compilation "
            "cache (the first, cold-cache runs are listed under cold_compilation_cache)",
            "repeats": {"average": args.repeats, "slerp": args.slerp_repeats},
            "machine_note": "shared 2-core machine: other jobs may run at the same time, so "
            "ours and mergekit run back to back in each repeat; compare CPU seconds too. Each "
            "run records the 1-minute load average before and after its pair "
            "(loadavg_1min_before/after; 2.0 = both cores busy before our runs add to it)",
        },
        "environment": environment(args.benchvenv),
        "load": {
            "loadavg_1min_min": min(loads, default=None),
            "loadavg_1min_median": statistics.median(loads) if loads else None,
            "loadavg_1min_max": max(loads, default=None),
        },
        "runs": runs,
        "cold_compilation_cache": cold,
        "summary": summarise(runs),
        "agreement_M2": checks,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    for row in result["summary"]:
        print(
            f"{row['method']:8s} M={row['M']}: ours {row['warm_jax_seconds_median']:.1f}s "
            f"(cpu {row['warm_jax_cpu_seconds_median']:.1f}s) "
            f"{row['warm_jax_max_rss_mib_median']:.0f}MiB | mergekit "
            f"{row['mergekit_seconds_median']:.1f}s (cpu {row['mergekit_cpu_seconds_median']:.1f}s) "
            f"{row['mergekit_max_rss_mib_median']:.0f}MiB | speedup "
            f"{row['speedup_vs_mergekit']:.2f}x (cpu {row['cpu_speedup_vs_mergekit']:.2f}x), "
            f"RSS ratio {row['rss_ratio_vs_mergekit']:.2f}"
        )
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
