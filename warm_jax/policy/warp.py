"""WARP (Weight Averaged Rewarded Policies, Algorithm 1), on top of `reinforce.train_policy`.

For iteration i = 1..I, starting from θ_init^1 = θ_sft:

1. M REINFORCE runs from θ_init^i with EMA anchors (anchor initialised at θ_init^i), differing
   only in prompt order (`data_seed`), giving θ_1..θ_M;
2. SLERP of their task vectors δ_m = θ_m - θ_init^i, one angle per layer by default:
   M = 2: θ_slerp = θ_init + sin((1-λ)Ω)/sin Ω · δ_1 + sin(λΩ)/sin Ω · δ_2,
   M > 2: slerp(slerp(θ_1..θ_{M-1}), θ_M, 1/M);
3. LITI: θ_init^{i+1} = (1-η) θ_init^i + η θ_slerp^i.

The Pareto front of iteration i is (1-η') θ_sft + η' θ_slerp^i over a grid of η', evaluated for
reward and KL(π ‖ π_sft) by Monte Carlo on held-out prompts. The M runs here are sequential
processes of the one training loop, each resumable in its own workdir `iter{i}/run{m}`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import gin
import jax
import numpy as np
from jax.sharding import Mesh

from warm_jax import merging
from warm_jax.errors import UserError
from warm_jax.models import transformer as tm
from warm_jax.policy import reinforce
from warm_jax.policy.reinforce import Evaluator, RLConfig
from warm_jax.policy.rewards import Reward
from warm_jax.training import checkpoints, loop
from warm_jax.training.metrics import read_jsonl

PyTree = Any
SUMMARY_FILE = "warp.json"
FRONT_PNG = "pareto.png"


@dataclasses.dataclass(frozen=True)
class WarpConfig:
    """WARP's outer loop. Paper defaults: M=2, λ=0.5, η=0.3, I up to 5, layer-wise SLERP."""

    num_iterations: int = 2  # I
    num_policies: int = 2  # M
    lam: float = 0.5  # SLERP coefficient for M = 2 (M > 2 merges uniformly)
    eta: float = 0.3  # LITI: θ_init ← (1-η) θ_init + η θ_slerp
    granularity: str = "layer"  # one SLERP angle per 'layer', 'leaf' or the whole 'tree'
    allow_extrapolation: bool = False  # let η (and the front's grid) leave [0, 1]
    front_etas: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)

    def validate(self) -> WarpConfig:
        """Raises UserError naming the first bad setting; returns self."""
        if self.num_iterations < 1:
            raise UserError(f"warp_config.num_iterations={self.num_iterations} must be >= 1")
        if self.num_policies < 1:
            raise UserError(f"warp_config.num_policies={self.num_policies} must be >= 1")
        if not 0.0 <= self.lam <= 1.0:
            raise UserError(f"warp_config.lam={self.lam} must be in [0, 1]")
        if self.granularity not in merging.GRANULARITIES:
            raise UserError(
                f"warp_config.granularity={self.granularity!r}; choose from "
                f"{list(merging.GRANULARITIES)}"
            )
        for name, values in (("eta", [self.eta]), ("front_etas", list(self.front_etas))):
            for v in values:
                if not np.isfinite(v):
                    raise UserError(f"warp_config.{name} holds a non-finite value {v}")
                if not self.allow_extrapolation and not 0.0 <= v <= 1.0:
                    raise UserError(
                        f"warp_config.{name}: η={v} is outside [0, 1]; set "
                        "warp_config.allow_extrapolation=True to extrapolate on purpose"
                    )
        return self


@gin.configurable
def warp_config(**overrides: Any) -> WarpConfig:
    """WARP's settings, configured in gin as `warp_config.NAME = VALUE` (validated)."""
    if "front_etas" in overrides:
        overrides["front_etas"] = tuple(float(x) for x in overrides["front_etas"])
    try:
        cfg = WarpConfig(**overrides)
    except TypeError as e:
        raise UserError(f"warp_config: {e}") from None
    return cfg.validate()


# ----------------------------------------------------------------------------- the merge


def merge_policies(
    init: PyTree, runs: Sequence[PyTree], lam: float = 0.5, granularity: str = "layer"
) -> PyTree:
    """θ_slerp: SLERP of the runs' task vectors about `init` (M = 2: at λ; M > 2: iterated,
    uniform; M = 1: the run itself)."""
    runs = list(runs)
    if len(runs) == 2:
        return merging.slerp(init, runs[0], runs[1], lam, granularity=granularity)
    return merging.slerp_many(init, runs, granularity=granularity)


def warp_iteration(init: PyTree, runs: Sequence[PyTree], cfg: WarpConfig) -> tuple[PyTree, PyTree]:
    """(θ_slerp, θ_init_next = liti(θ_init, θ_slerp, η)) from one iteration's M runs."""
    merged = merge_policies(init, runs, cfg.lam, cfg.granularity)
    return merged, merging.liti(init, merged, cfg.eta)


def pareto_front(
    evaluator: Evaluator, sft: PyTree, merged: PyTree, etas: Sequence[float]
) -> list[dict]:
    """Reward, control reward and KL to SFT of (1-η) θ_sft + η θ_merged for each η."""
    return [{"eta": float(eta), **evaluator(merging.lerp(sft, merged, eta), sft)} for eta in etas]


# ----------------------------------------------------------------------------- trajectories


def moving_average(x: np.ndarray, window: int) -> np.ndarray:
    """Mean over a sliding window (length len(x) - window + 1; x itself if too short)."""
    if len(x) < window or window <= 1:
        return x
    kernel = np.ones(window) / window
    return np.convolve(x, kernel, mode="valid")


def trajectory(workdir: str | os.PathLike) -> dict[str, list[float]]:
    """A REINFORCE run's path in the (KL to SFT, reward) plane from its metrics.jsonl: the
    held-out evaluations (`eval/…`) and the per-step training metrics."""
    path = Path(workdir) / "metrics.jsonl"
    rows = read_jsonl(path) if path.is_file() else []
    out: dict[str, list[float]] = {}
    for prefix, key in (("eval/", "eval"), ("", "train")):
        sel = [r for r in rows if f"{prefix}kl_sft" in r and f"{prefix}reward" in r]
        out[f"{key}_step"] = [r["step"] for r in sel]
        for m in ("kl_sft", "reward", "control_reward"):
            if all(f"{prefix}{m}" in r for r in sel) and sel:
                out[f"{key}_{m}"] = [float(r[f"{prefix}{m}"]) for r in sel]
    return out


def draw_trajectory(ax, traj: Mapping, metric: str, label, style: str, color=None) -> None:
    """Plots a `trajectory` as `metric` against KL to SFT: its held-out evaluations if it has
    several, else its per-step training metrics, smoothed."""
    src = "eval" if len(traj.get("eval_kl_sft", [])) > 1 else "train"
    if f"{src}_{metric}" not in traj:
        return
    kl, y = np.asarray(traj[f"{src}_kl_sft"]), np.asarray(traj[f"{src}_{metric}"])
    if src == "train":  # per-step training metrics are noisy: a moving average
        w = max(1, len(kl) // 20)
        kl, y = moving_average(kl, w), moving_average(y, w)
    ax.plot(kl, y, style, color=color, alpha=0.6, label=label)


def plot_front(summary: Mapping[str, Any], out_png: str | os.PathLike) -> Path:
    """Reward (and control reward) against KL to SFT: each iteration's LITI front over η, the
    REINFORCE runs' trajectories, and any comparison runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ["reward"] + (["control_reward"] if summary.get("has_control") else [])
    fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4.5), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for it in summary["iterations"]:
            for m, traj in enumerate(it["trajectories"]):
                label = "REINFORCE (EMA anchor) runs" if it["iteration"] == 1 and m == 0 else None
                draw_trajectory(ax, traj, metric, label, "--", color="grey")
        for name, traj in summary.get("compare", {}).items():
            draw_trajectory(ax, traj, metric, name, ":")
        for it in summary["iterations"]:
            front = it["front"]
            kl = [p["kl_sft"] for p in front]
            y = [p[metric] for p in front]
            ax.plot(kl, y, "o-", label=f"LITI front, iteration {it['iteration']}")
            for p in front:
                ax.annotate(f"{p['eta']:g}", (p["kl_sft"], p[metric]), fontsize=7, alpha=0.7)
        ax.set_xlabel("KL(π ‖ π_sft)")
        ax.set_ylabel(metric.replace("_", " "))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("WARP: (1-η) θ_sft + η θ_slerp^i against REINFORCE")
    fig.tight_layout()
    out = Path(out_png)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


# ----------------------------------------------------------------------------- the job


def _abstract(tree: PyTree) -> PyTree:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def run_warp(
    workdir: str | os.PathLike,
    *,
    config: tm.TransformerConfig,
    sft_params: PyTree,
    reward: Reward,
    rl: RLConfig,
    warp: WarpConfig,
    prompts: Mapping[str, np.ndarray],
    batch_size: int,
    eos_id: int | None,
    pad_id: int,
    control: Reward | None = None,
    evaluator: Evaluator | None = None,
    data_seed: int = 0,
    compare_with: Mapping[str, str | os.PathLike] | None = None,
    mesh: Mesh | None = None,
    meta: Mapping | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Runs WARP's I iterations (resumable: finished runs and iterations are reused) and writes
    every iteration's `slerp/` and `liti/` params checkpoints, `warp.json` and `pareto.png`.

    Returns the summary: per iteration the runs' trajectories and final evaluations, the
    evaluations of θ_slerp and θ_liti, and the Pareto front over `warp.front_etas`."""
    warp.validate()
    rl.validate()
    if rl.anchor != "ema":
        raise UserError(f"WARP trains with EMA anchors: rl_config.anchor is {rl.anchor!r}")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    target = _abstract(sft_params)
    init = sft_params
    summary: dict[str, Any] = {
        "warp": dataclasses.asdict(warp),
        "rl": dataclasses.asdict(rl),
        "reward": reward.name,
        "control": None if control is None else control.name,
        "has_control": control is not None,
        "iterations": [],
        **(meta or {}),
    }
    if evaluator is not None:
        summary["sft"] = evaluator(sft_params, sft_params)
    for i in range(1, warp.num_iterations + 1):
        it_dir = workdir / f"iter{i}"
        run_dirs = [it_dir / f"run{m}" for m in range(warp.num_policies)]
        it_meta = {"iteration": i, "warp": dataclasses.asdict(warp), **(meta or {})}
        if (it_dir / "liti").is_dir() and (it_dir / "slerp").is_dir():
            _check_same_merge(it_dir / "liti", warp)
            merged = checkpoints.load_params(it_dir / "slerp", target=target)
            nxt = checkpoints.load_params(it_dir / "liti", target=target)
            runs = [checkpoints.load_params(d, target=target) for d in run_dirs]
        else:
            runs = []
            for m, run_dir in enumerate(run_dirs):
                res = reinforce.train_policy(
                    run_dir,
                    config=config,
                    init_params=init,
                    sft_params=sft_params,
                    reward=reward,
                    control=control,
                    rl=rl,
                    prompts=prompts,
                    batch_size=batch_size,
                    eos_id=eos_id,
                    pad_id=pad_id,
                    evaluator=evaluator,
                    # Runs differ only in the order of the prompts (WARP's diversity).
                    data_seed=data_seed + (i - 1) * warp.num_policies + m,
                    mesh=mesh,
                    meta={**it_meta, "run": m},
                    progress=progress,
                    description=f"warp iter {i} run {m}",
                )
                runs.append(res.params)
            merged, nxt = warp_iteration(init, runs, warp)
            checkpoints.save_params(it_dir / "slerp", merged, {**it_meta, "what": "slerp"})
            checkpoints.save_params(it_dir / "liti", nxt, {**it_meta, "what": "liti"})
        record: dict[str, Any] = {
            "iteration": i,
            "runs": [str(d) for d in run_dirs],
            "slerp": str(it_dir / "slerp"),
            "liti": str(it_dir / "liti"),
            "trajectories": [trajectory(d) for d in run_dirs],
            "task_vector_cosine": _task_cosines(init, runs, warp.granularity),
        }
        if evaluator is not None:
            record["run_evals"] = [evaluator(p, sft_params) for p in runs]
            record["slerp_eval"] = evaluator(merged, sft_params)
            record["liti_eval"] = evaluator(nxt, sft_params)
            record["front"] = pareto_front(evaluator, sft_params, merged, warp.front_etas)
        summary["iterations"].append(record)
        init = nxt
    summary["compare"] = {k: trajectory(v) for k, v in (compare_with or {}).items()}
    summary["final"] = str(workdir / f"iter{warp.num_iterations}" / "liti")
    if jax.process_index() == 0:
        if evaluator is not None:
            summary["figure"] = str(plot_front(summary, workdir / FRONT_PNG))
        loop.save_json(workdir / SUMMARY_FILE, summary)
    return summary


# The settings an iteration's slerp/ and liti/ checkpoints were computed with; num_iterations
# and front_etas may change between runs (to extend a run, or to evaluate another grid).
_MERGE_SETTINGS = ("num_policies", "lam", "eta", "granularity")


def _check_same_merge(liti_dir: Path, warp: WarpConfig) -> None:
    """Resuming must not reuse merges that the current settings would not have produced (and
    the later iterations that started from them)."""
    saved = checkpoints.load_metadata(liti_dir).get("warp") or {}
    now = dataclasses.asdict(warp)
    changed = [
        f"warp_config.{k} was {saved[k]!r}, is now {now[k]!r}"
        for k in _MERGE_SETTINGS
        if k in saved and saved[k] != now[k]
    ]
    if changed:
        raise UserError(
            f"{liti_dir} was written with other WARP settings ({'; '.join(changed)}); resume "
            "with the same settings, or use a fresh workdir"
        )


def _task_cosines(init: PyTree, runs: Sequence[PyTree], granularity: str) -> dict[str, float]:
    """Cosine between the first two runs' task vectors per layer (≈ 0 in WARP's Fig. 11);
    None for a layer that did not move (e.g. an unused head)."""
    if len(runs) < 2:
        return {}
    cos = merging.cosine(runs[0], runs[1], base=init, granularity=granularity)
    return {k: (float(v) if np.isfinite(v) else None) for k, v in cos.items()}


def read_summary(workdir: str | os.PathLike) -> dict | None:
    p = Path(workdir) / SUMMARY_FILE
    return json.loads(p.read_text()) if p.is_file() else None
