"""Shared plumbing of `benchmarks/run.py`: model shapes, the peer process, interleaved repeats,
machine measurements (dense-matmul peak, memory bandwidth), the environment record and the
results file.

A peer (PyTorch / transformers) runs in its own interpreter, `--peer-python`, as a long-lived
subprocess speaking the line protocol of `benchmarks/peers/_proto.py`: one JSON request per line
on its stdin, one JSON reply per line on its stdout. It idles (blocked on stdin) while our side
runs, so ours and the peer never compete for the cores; their repeats alternate (A B, B A, ...)
so that a change of machine load during the run hits both sides alike.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
PEERS = BENCH / "peers"
RESULTS = BENCH / "results"
SHAPES = ("tiny", "small", "smollm2_135m")
DEFAULT_PEER_PYTHON = Path("/tmp/iovenv/bin/python")


def default_peer_python() -> str:
    return str(DEFAULT_PEER_PYTHON) if DEFAULT_PEER_PYTHON.exists() else sys.executable


def log(*args: Any) -> None:
    print(*args, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Model shapes


DTYPES = ("float32", "bfloat16")


def dtype_bytes(dtype: str) -> int:
    return {"float32": 4, "bfloat16": 2}[dtype]


def shape_config(shape: str, **overrides: Any):
    """Our `TransformerConfig` of `gin/models/<shape>.gin`, with `overrides` (e.g. max_len;
    `dtype` sets both the compute and the parameter dtype, as the peer holds its model)."""
    if "dtype" in overrides:
        overrides.setdefault("param_dtype", overrides["dtype"])
    import gin

    from warm_jax import config as wcfg
    from warm_jax.models import transformer as tm

    wcfg.parse([f"models/{shape}.gin"], [])
    cfg = tm.model_config(**overrides)
    gin.clear_config()
    return cfg


def matmul_params(cfg) -> int:
    """Parameters that take part in matrix products per token in the blocks (q, k, v, o, gate,
    up, down): the N of the 6·N·tokens rule. Embedding lookups, norms and the scalar head are
    excluded; a language-model head (tied or not) is added by `lm_head_params`."""
    attn = cfg.d_model * cfg.head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
    mlp = 3 * cfg.d_model * cfg.d_ff
    return cfg.n_layers * (attn + mlp)


def lm_head_params(cfg) -> int:
    return cfg.vocab_size * cfg.d_model


def train_flops_per_token(cfg, seq_len: int, lm_head: bool = False) -> float:
    """Training FLOPs per token, forward + backward (the PaLM appendix-B count):

        6·N + 12·n_layers·n_heads·head_dim·T

    N = `matmul_params` (+ the LM head when it is computed), T the sequence length; the second
    term is QKᵀ and attention-weighted V over the full T×T score matrix (both sides compute it
    masked, not skipped)."""
    n = matmul_params(cfg) + (lm_head_params(cfg) if lm_head else 0)
    return 6.0 * n + 12.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len


def forward_flops(cfg, tokens: int, attended_keys: int, lm_rows: int) -> float:
    """Model FLOPs of one forward pass: 2·N per token (N = `matmul_params`), 4·n_heads·head_dim
    per layer and attended key (QKᵀ and probs·V), and 2·V·d per row projected onto the
    vocabulary. `attended_keys` is summed over the `tokens` queries: causal work, the keys each
    query may see, not the masked slots an implementation also computes."""
    return (
        2.0 * matmul_params(cfg) * tokens
        + 4.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim * attended_keys
        + 2.0 * lm_head_params(cfg) * lm_rows
    )


def causal_keys(length: int, offset: int = 0) -> int:
    """Keys seen by `length` consecutive queries after `offset` earlier tokens, causally."""
    return length * offset + length * (length + 1) // 2


def generate_flops(cfg, batch: int, prompt_len: int, new_tokens: int) -> float:
    """Model FLOPs of sampling `new_tokens` after each of `batch` prompts with a KV cache: the
    prompt's forward pass (vocabulary logits for its last slot), then one token per step, each
    attending to the prompt and the tokens before it. The last new token is never fed back."""
    prefill = forward_flops(cfg, prompt_len, causal_keys(prompt_len), 1)
    steps = new_tokens - 1
    decode = forward_flops(cfg, steps, causal_keys(steps, prompt_len), steps)
    return batch * (prefill + decode)


def reinforce_flops(
    cfg, rows: int, prompt_len: int, new_tokens: int, frozen_policies: int = 2
) -> float:
    """Model FLOPs of one REINFORCE step over `rows` = prompts × samples sequences: sampling,
    then teacher forcing over prompt + response: the policy forward and backward (3 forward
    passes' worth), `frozen_policies` forward passes without gradient (anchor and SFT), all
    projecting only the response's slots onto the vocabulary, and the reward model of the same
    shape (scalar head, no vocabulary)."""
    t = prompt_len + new_tokens
    keys = causal_keys(t)
    policy = forward_flops(cfg, t, keys, new_tokens)
    reward = forward_flops(cfg, t, keys, 0)
    scored = (3 + frozen_policies) * policy + reward
    return generate_flops(cfg, rows, prompt_len, new_tokens) + rows * scored


def flops_summary(formula: str, flops_per_unit: float, rates: dict, peak_gflops: float | None):
    """GFLOP/s of each side (`rates`: side -> units per second) and, given a measured matmul
    peak, its fraction."""
    out = {"formula": formula, "flops_per_unit": flops_per_unit}
    if peak_gflops:
        out["peak_gflops"] = peak_gflops
    for side, rate in rates.items():
        out[f"{side}_gflops"] = rate * flops_per_unit / 1e9
        if peak_gflops:
            out[f"{side}_peak_fraction"] = out[f"{side}_gflops"] / peak_gflops
    return out


def total_params(cfg) -> int:
    """Parameters of the language model (embedding once when tied, norms; no scalar head)."""
    emb = cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
    norms = (2 * cfg.n_layers + 1) * cfg.d_model
    return matmul_params(cfg) + emb + norms


# --------------------------------------------------------------------------------------------
# The peer process


class PeerError(RuntimeError):
    pass


class Peer:
    """A peer script under `python`; `call(op, **kw)` sends one request and returns the reply."""

    def __init__(
        self,
        python: str,
        script: str,
        workdir: Path,
        threads: int | None = None,
        device: str = "cpu",
        dtype: str = "float32",
    ):
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / f"{Path(script).stem}.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 (closed in close())
        env = dict(
            os.environ,
            PYTHONPATH=str(PEERS),
            TRANSFORMERS_VERBOSITY="error",
            HF_HUB_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
            PYTHONUNBUFFERED="1",
        )
        if threads:
            env["BENCH_TORCH_THREADS"] = str(threads)
        env["BENCH_TORCH_DEVICE"], env["BENCH_DTYPE"] = device, dtype
        self.cmd = [python, str(PEERS / script)]
        self.proc = subprocess.Popen(
            self.cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env=env,
            cwd=str(REPO),
        )

    def call(self, op: str, **kwargs: Any) -> dict:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(json.dumps({"op": op, **kwargs}) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            raise PeerError(f"peer {self.cmd} died during {op!r}:\n{self.tail()}")
        reply = json.loads(line)
        if not reply.pop("ok"):
            raise PeerError(f"peer {op!r} failed:\n{reply['error']}")
        return reply

    def tail(self, n: int = 3000) -> str:
        self._log.flush()
        return self.log_path.read_text()[-n:]

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(PeerError):
                self.call("quit")
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._log.close()

    def __enter__(self) -> Peer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# Repeats


def interleave(repeats: int, sides: dict[str, Callable[[], dict]]) -> dict[str, list[dict]]:
    """Runs each side's timed repeat `repeats` times, alternating the order every repeat
    (A B, B A, A B, ...), and returns every repeat of every side (with `repeat`, `order`)."""
    names = list(sides)
    out: dict[str, list[dict]] = {n: [] for n in names}
    for rep in range(repeats):
        order = names if rep % 2 == 0 else names[::-1]
        for i, name in enumerate(order):
            r = sides[name]()
            r.update(repeat=rep, order=i, loadavg_1m=os.getloadavg()[0])
            out[name].append(r)
            log(f"    rep {rep} {name}: " + fmt_repeat(r))
    return out


def fmt_repeat(r: dict) -> str:
    parts = []
    for k in ("value", "seconds"):
        if k in r:
            parts.append(f"{k}={r[k]:.4g}")
    return " ".join(parts)


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def side_summary(repeats: list[dict], unit: str, **extra: Any) -> dict:
    return {
        "unit": unit,
        "median": median([r["value"] for r in repeats]),
        "min": min(r["value"] for r in repeats),
        "max": max(r["value"] for r in repeats),
        **extra,
        "repeats": repeats,
    }


def median_rates(runs: dict[str, list[dict]]) -> dict[str, float]:
    """Each side's median value over its repeats (`interleave`'s result)."""
    return {side: median([r["value"] for r in repeats]) for side, repeats in runs.items()}


def paired_ratio(ours: list[dict], peer: list[dict]) -> dict:
    """Ours/peer per repeat (repeat i of each side ran back to back) and their median."""
    ratios = [a["value"] / b["value"] for a, b in zip(ours, peer)]
    return {
        "speedup": median(ratios),
        "speedup_per_repeat": ratios,
        "ratio_of_medians": median([r["value"] for r in ours]) / median([r["value"] for r in peer]),
    }


# --------------------------------------------------------------------------------------------
# Machine measurements on our side (the peer has the same in `peers/_torch_common.py`)


def jax_matmul_gflops(
    n: int = 2048, reps: int = 3, dtype: str = "float32", compiler_options: dict | None = None
) -> dict:
    """[n, n] @ [n, n] in `dtype` with jit: 2n³ FLOPs per product; one repeat = `reps` products.
    `compiler_options` are per-compilation XLA DebugOptions (e.g. which CPU dot library)."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((n, n), np.float32), dtype)
    b = jnp.asarray(rng.standard_normal((n, n), np.float32), dtype)
    f = jax.jit(lambda x, y: x @ y).lower(a, b).compile(compiler_options=compiler_options)
    f(a, b).block_until_ready()
    t = time.perf_counter()
    for _ in range(reps):
        f(a, b).block_until_ready()
    dt = time.perf_counter() - t
    return {"value": 2.0 * n**3 * reps / dt / 1e9, "seconds": dt, "n": n, "products": reps}


def jax_copy_bandwidth(mib: int = 256, reps: int = 3) -> dict:
    """Read + write bandwidth of an in-place `x + 1` over `mib` MiB (donated buffer), GB/s."""
    import jax
    import jax.numpy as jnp

    x = jnp.zeros((mib * 2**20 // 4,), jnp.float32)
    f = jax.jit(lambda v: v + 1.0, donate_argnums=0)
    x = f(x).block_until_ready()
    t = time.perf_counter()
    for _ in range(reps):
        x = f(x).block_until_ready()
    dt = time.perf_counter() - t
    return {"value": 2.0 * x.nbytes * reps / dt / 1e9, "seconds": dt, "mib": mib}


# --------------------------------------------------------------------------------------------
# Environment and results


def cpu_model() -> str:
    p = Path("/proc/cpuinfo")
    if p.exists():
        for line in p.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    p = Path("/proc/cpuinfo")
    wanted = {"avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "avx512_vnni"}
    if p.exists():
        for line in p.read_text().splitlines():
            if line.startswith("flags"):
                return sorted(wanted & set(line.split(":", 1)[1].split()))
    return []


def environment(peer_env: dict | None) -> dict:
    import importlib.metadata as md

    import jax

    def version(name: str) -> str:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "missing"

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cpu_count": os.cpu_count(),
        "memory_gib": round(mem, 1),
        "device": str(jax.devices()[0]),
        "jax_backend": jax.default_backend(),
        "jax": version("jax"),
        "jaxlib": version("jaxlib"),
        "flax": version("flax"),
        "optax": version("optax"),
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
    }
    if peer_env:
        env["peer"] = peer_env
    return env


def command_line() -> str:
    args = [a for a in sys.argv[1:]]
    return ".venv/bin/python benchmarks/run.py " + " ".join(shlex.quote(a) for a in args)


def write_results(name: str, description: dict, cases: list[dict], output: Path | None) -> Path:
    """Merges `cases` into `benchmarks/results/<name>.json` by case id: a run of some shapes
    replaces those shapes' entries and keeps the others (each case records its own environment,
    load and command)."""
    path = output or RESULTS / f"{name}.json"
    old: dict = {}
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            old = {}
    merged = {c["case"]: c for c in old.get("cases", [])}
    for c in cases:
        merged[c["case"]] = c
    ordered = sorted(merged.values(), key=lambda c: c.get("sort_key", c["case"]))
    result = {
        "benchmark": name,
        **description,
        "summary": [summary_row(c) for c in ordered],
        "cases": ordered,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def summary_row(case: dict) -> dict:
    row = {"case": case["case"]}
    for side in ("ours", "peer"):
        if side in case:
            row[side] = case[side]["median"]
            row["unit"] = case[side]["unit"]
    for k in ("speedup", "target", "met", "peak_fraction", "bound_fraction"):
        if k in case:
            row[k] = case[k]
    row["loadavg"] = [case["load"]["start"][0], case["load"]["end"][0]]
    return row


def run_case(case_id: str, fn: Callable[[], dict]) -> dict:
    """Runs one comparison; wraps its result with the load average at start and end and the
    command that reproduces it."""
    log(f"== {case_id}  (load average {os.getloadavg()})")
    start = os.getloadavg()
    t = time.perf_counter()
    case = fn()
    case = {
        "case": case_id,
        **case,
        "wall_seconds": time.perf_counter() - t,
        "load": {"start": list(start), "end": list(os.getloadavg())},
        "command": command_line(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if case.get("target") is None:
        case.pop("target", None)
    elif "speedup" in case and case.get("met") is None:
        case["met"] = bool(case["speedup"] >= case["target"])
    log(f"   -> {json.dumps(summary_row(case))}")
    return case
