"""Evaluation of reward models: individual members (ind), ENS and WARM, on every split.

Everything is computed from *margins* d = r(x, y⁺) − r(x, y⁻) per pair, with accuracy

    acc = (1/N) Σ_i [d_i > 0] + ½ [d_i = 0].

Each member's margins are computed once per split; ENS of any subset S of members is then free,
because the margin of the mean reward is the mean of the margins: d_ENS = (1/|S|) Σ_{m∈S} d_m.
WARM needs one forward pass of the averaged weights per subset (and per λ on a curve).

Training accuracy is measured against the labels the members were trained on: with corrupted
labels, `train_corrupted` is the accuracy on the *swapped* labels (how much of the noise a model
memorised — WARM Obs. 3 expects WA ≪ ENS there) and `train_clean` on the others.

The interpolation curves (WARM Fig. 3/4) put, for λ ∈ [0, 1], the weight interpolation
WA(λ) = acc((1−λ)φ_a + λφ_b), the prediction interpolation ENS(λ) = acc((1−λ)d_a + λd_b) and the
diagonal (1−λ)acc_a + λacc_b side by side; linear mode connectivity (Obs. 1) is WA ≥ diagonal.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from warm_jax import merging
from warm_jax.errors import UserError
from warm_jax.models import transformer as tm
from warm_jax.reward import losses
from warm_jax.reward import warm as warm_lib
from warm_jax.reward.data import PAIR_FIELDS

PyTree = Any
Arrays = Mapping[str, np.ndarray]


# --------------------------------------------------------------------------------------------
# Margins and accuracy


@functools.lru_cache(maxsize=32)
def _margin_fn(config: tm.TransformerConfig):
    @jax.jit
    def fn(params, batch):
        r_chosen, r_rejected = losses.pair_rewards(params, config, batch)
        return r_chosen - r_rejected

    return fn


def margins(
    params: PyTree, config: tm.TransformerConfig, arrays: Arrays, batch_size: int = 64
) -> np.ndarray:
    """d_i = r(x_i, y⁺_i) − r(x_i, y⁻_i) for every pair of `arrays` (float32 [N]). The last batch
    is padded with copies of row 0, so one compiled program serves every split."""
    n = len(arrays["chosen_tokens"])
    if n == 0:
        raise UserError("cannot evaluate on an empty split (no pairs)")
    fn = _margin_fn(config)
    pad = -n % batch_size
    idx = np.concatenate([np.arange(n), np.zeros(pad, np.int64)])
    out = []
    for start in range(0, n + pad, batch_size):
        rows = idx[start : start + batch_size]
        batch = {k: arrays[k][rows] for k in PAIR_FIELDS}
        out.append(np.asarray(fn(params, batch)))
    return np.concatenate(out)[:n].astype(np.float32)


def accuracy(d: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Fraction of pairs with d > 0 (ties count ½), over the pairs where `mask` is True."""
    d = np.asarray(d, np.float64)
    if mask is not None:
        d = d[np.asarray(mask, bool)]
    if d.size == 0:
        raise UserError("accuracy of an empty set of pairs")
    return float(np.mean(np.where(d > 0, 1.0, np.where(d == 0, 0.5, 0.0))))


def subset_masks(split: str, arrays: Arrays) -> dict[str, np.ndarray]:
    """The evaluation subsets of a split: itself, and for training pairs with corrupted labels
    also `train_clean` and `train_corrupted` (split by the `corrupted` flag)."""
    n = len(arrays["chosen_tokens"])
    if n == 0:
        raise UserError(f"evaluation split {split!r} is empty")
    out = {split: np.ones(n, bool)}
    corrupted = np.asarray(arrays.get("corrupted", np.zeros(n, bool)), bool)
    if split == "train" and corrupted.any():
        out["train_clean"] = ~corrupted
        out["train_corrupted"] = corrupted
    return out


def binomial_se(p: float, n: int) -> float:
    """Standard error of an accuracy p measured on n pairs: √(p(1−p)/n)."""
    return math.sqrt(max(p * (1 - p), 0.0) / max(n, 1))


def _stats(values: Sequence[float]) -> dict[str, float]:
    v = np.asarray(values, np.float64)
    return {
        "mean": float(v.mean()),
        "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
        "min": float(v.min()),
        "max": float(v.max()),
        "n": len(v),
    }


# --------------------------------------------------------------------------------------------
# The full evaluation


def evaluate_members(
    members: Sequence[PyTree],
    names: Sequence[str],
    config: tm.TransformerConfig,
    splits: Mapping[str, Arrays],
    *,
    selected: Sequence[int] | None = None,
    lmc_pairs: Sequence[tuple[int, int]] = ((0, 1),),
    lambdas: Sequence[float] = tuple(np.linspace(0.0, 1.0, 11)),
    m_values: Sequence[int] | None = None,
    subsets_per_m: int = 5,
    seed: int = 0,
    batch_size: int = 64,
    member_margins: Mapping[str, np.ndarray] | None = None,
    warm_params: PyTree | None = None,
) -> dict:
    """Accuracies of ind / ENS / WARM on every split and subset, interpolation curves between
    member pairs, and accuracy vs the number M of averaged members. Returns a JSON-able dict:

    - `table[subset]`: `ind` (mean/std/min/max over members), `ens` and `warm` (of `selected`,
      default all), `n` pairs, `se` (binomial standard error of WARM's accuracy);
    - `members[name][subset]`: each member's accuracy;
    - `lmc`: `lambdas`, `pairs`, and per subset `wa`, `ens`, `diag` curves (one per pair) with
      their mean and std over pairs;
    - `accuracy_vs_m`: for M in `m_values`, WARM and ENS accuracies of `subsets_per_m` random
      M-subsets (seeded; every member for M = 1, one subset for M = K), mean and std.

    `member_margins` (split → [K, N]) and `warm_params` may be passed when already computed.
    """
    k = len(members)
    if k == 0:
        raise UserError("no reward models to evaluate")
    if not splits:
        raise UserError("no evaluation splits")
    masks = {}
    for split, arrays in splits.items():
        masks[split] = subset_masks(split, arrays)
    selected = list(range(k)) if selected is None else list(selected)
    if not selected or any(not 0 <= i < k for i in selected):
        raise UserError(f"bad member selection {selected} of {k} members")

    def all_margins(params) -> dict[str, np.ndarray]:
        return {s: margins(params, config, a, batch_size) for s, a in splits.items()}

    if member_margins is None:
        per = [all_margins(p) for p in members]
        member_margins = {s: np.stack([m[s] for m in per]) for s in splits}

    def accs(d_by_split: Mapping[str, np.ndarray]) -> dict[str, float]:
        return {
            sub: accuracy(d_by_split[split], mask)
            for split in splits
            for sub, mask in masks[split].items()
        }

    subsets = [sub for split in splits for sub in masks[split]]
    sizes = {sub: int(mask.sum()) for split in splits for sub, mask in masks[split].items()}
    member_accs = [accs({s: member_margins[s][i] for s in splits}) for i in range(k)]
    if warm_params is None:
        warm_params = warm_lib.warm_average([members[i] for i in selected])
    warm_accs = accs(all_margins(warm_params))
    ens_accs = accs({s: member_margins[s][selected].mean(0) for s in splits})
    table = {
        sub: {
            "ind": _stats([member_accs[i][sub] for i in range(k)]),
            "ens": ens_accs[sub],
            "warm": warm_accs[sub],
            "n": sizes[sub],
            "se": binomial_se(warm_accs[sub], sizes[sub]),
        }
        for sub in subsets
    }

    # Interpolation curves between member pairs.
    lam = [float(x) for x in lambdas]
    pairs = [(int(a), int(b)) for a, b in lmc_pairs if a < k and b < k and a != b]
    lmc: dict[str, Any] = {"lambdas": lam, "pairs": [[a, b] for a, b in pairs], "curves": {}}
    curves = {sub: {"wa": [], "ens": [], "diag": []} for sub in subsets}
    interp = jax.jit(merging.lerp)
    for a, b in pairs:
        wa_points = []
        for t in lam:
            if t == 0.0:
                wa_points.append(member_accs[a])
            elif t == 1.0:
                wa_points.append(member_accs[b])
            else:
                wa_points.append(accs(all_margins(interp(members[a], members[b], jnp.float32(t)))))
        ens_points = [
            accs({s: (1 - t) * member_margins[s][a] + t * member_margins[s][b] for s in splits})
            for t in lam
        ]
        for sub in subsets:
            curves[sub]["wa"].append([p[sub] for p in wa_points])
            curves[sub]["ens"].append([p[sub] for p in ens_points])
            curves[sub]["diag"].append(
                [(1 - t) * member_accs[a][sub] + t * member_accs[b][sub] for t in lam]
            )
    for sub, c in curves.items():
        lmc["curves"][sub] = {
            **c,
            **{
                f"{key}_{stat}": (
                    np.mean(c[key], 0) if stat == "mean" else np.std(c[key], 0)
                ).tolist()
                for key in ("wa", "ens", "diag")
                for stat in ("mean", "std")
                if c[key]
            },
        }

    # Accuracy as the number of averaged members grows.
    m_values = list(range(1, k + 1)) if m_values is None else [m for m in m_values if 1 <= m <= k]
    rng = np.random.default_rng(seed)
    vs_m: dict[str, Any] = {"m": m_values, "subsets": {}, "curves": {}}
    per_m: dict[int, list[tuple[dict, dict]]] = {}
    for m in m_values:
        combos = list(itertools.combinations(range(k), m))
        # Single members cost no forward pass (their margins are cached): use them all.
        if m > 1 and len(combos) > subsets_per_m:
            picks = rng.choice(len(combos), subsets_per_m, replace=False)
            combos = [combos[i] for i in sorted(picks)]
        vs_m["subsets"][str(m)] = [list(c) for c in combos]
        results = []
        for combo in combos:
            idx = list(combo)
            ens = accs({s: member_margins[s][idx].mean(0) for s in splits})
            if m == 1:
                wa = member_accs[idx[0]]
            elif sorted(idx) == sorted(selected):
                wa = warm_accs
            else:
                wa = accs(all_margins(warm_lib.warm_average([members[i] for i in idx])))
            results.append((wa, ens))
        per_m[m] = results
    for sub in subsets:
        entry = {}
        for key, pos in (("warm", 0), ("ens", 1)):
            vals = [[r[pos][sub] for r in per_m[m]] for m in m_values]
            entry[f"{key}_mean"] = [float(np.mean(v)) for v in vals]
            entry[f"{key}_std"] = [float(np.std(v, ddof=1)) if len(v) > 1 else 0.0 for v in vals]
        vs_m["curves"][sub] = entry

    return {
        "subsets": subsets,
        "sizes": sizes,
        "selected": [names[i] for i in selected],
        "table": table,
        "members": {names[i]: member_accs[i] for i in range(k)},
        "lmc": lmc,
        "accuracy_vs_m": vs_m,
    }


def aggregate_runs(runs: Sequence[Mapping[str, Any]]) -> dict:
    """Spread over independent runs (e.g. train-rms workdirs with different `member_specs.seed`):
    for each subset present in every run, the mean and std over runs of ind (each run's member
    mean), ENS and WARM, and of WARM − ENS."""
    if not runs:
        raise UserError("no runs to aggregate")
    subsets = [s for s in runs[0]["table"] if all(s in r["table"] for r in runs)]
    out: dict[str, Any] = {"runs": len(runs), "table": {}}
    for sub in subsets:
        rows = [r["table"][sub] for r in runs]
        series = {
            "ind": [row["ind"]["mean"] for row in rows],
            "ens": [row["ens"] for row in rows],
            "warm": [row["warm"] for row in rows],
            "warm_minus_ens": [row["warm"] - row["ens"] for row in rows],
        }
        out["table"][sub] = {k: _stats(v) for k, v in series.items()}
    return out


def format_table(results: Mapping[str, Any], markdown: bool = False) -> str:
    """The accuracy table in percent: ind as mean ± std over members (and their range), ENS and
    WARM of the selected members, WARM's binomial standard error. Aligned text or markdown."""
    head = ["subset", "pairs", "ind (mean ± std)", "ind range", "ENS", "WARM", "WARM s.e."]
    rows = []
    for sub, r in results["table"].items():
        ind = r["ind"]
        rows.append(
            [
                sub,
                str(r["n"]),
                f"{100 * ind['mean']:.1f} ± {100 * ind['std']:.1f}",
                f"{100 * ind['min']:.1f}–{100 * ind['max']:.1f}",
                f"{100 * r['ens']:.1f}",
                f"{100 * r['warm']:.1f}",
                f"{100 * r['se']:.1f}",
            ]
        )
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join([*lines, *("| " + " | ".join(r) + " |" for r in rows)])
    widths = [max(len(x[i]) for x in [head, *rows]) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join(fmt.format(*r) for r in [head, *rows])


# --------------------------------------------------------------------------------------------
# Plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike) -> Path:
    out = Path(path)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, out)
    return out


def plot_lmc(results: Mapping[str, Any], path: str | os.PathLike, title: str = "") -> Path | None:
    """WARM Fig. 3/4: accuracy vs λ, WA vs ENS vs diagonal, one panel per subset (mean ± std
    over member pairs)."""
    lmc = results["lmc"]
    if not lmc["pairs"]:
        return None
    plt = _pyplot()
    subs = list(lmc["curves"])
    cols = min(len(subs), 3)
    rows = -(-len(subs) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    lam = np.asarray(lmc["lambdas"])
    styles = {"wa": ("WA (weights)", "C0", "-"), "ens": ("ENS (predictions)", "C1", "--")}
    styles["diag"] = ("diagonal", "0.5", ":")
    for ax, sub in zip(axes.flat, subs):
        c = lmc["curves"][sub]
        for key, (label, color, ls) in styles.items():
            mean, std = np.asarray(c[f"{key}_mean"]), np.asarray(c[f"{key}_std"])
            ax.plot(lam, 100 * mean, ls, color=color, label=label, marker="o", ms=3)
            if len(lmc["pairs"]) > 1:
                ax.fill_between(
                    lam, 100 * (mean - std), 100 * (mean + std), color=color, alpha=0.15
                )
        ax.set_title(sub)
        ax.set_xlabel("λ")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(subs) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(title or f"interpolation between members ({len(lmc['pairs'])} pairs)")
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out


def plot_accuracy_vs_m(
    results: Mapping[str, Any], path: str | os.PathLike, title: str = ""
) -> Path:
    """Accuracy of WARM and ENS as the number M of members grows (mean ± std over subsets)."""
    plt = _pyplot()
    vs = results["accuracy_vs_m"]
    subs = list(vs["curves"])
    cols = min(len(subs), 3)
    rows = -(-len(subs) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    ms = np.asarray(vs["m"])
    for ax, sub in zip(axes.flat, subs):
        c = vs["curves"][sub]
        for key, label, color in (("warm", "WARM", "C0"), ("ens", "ENS", "C1")):
            mean, std = np.asarray(c[f"{key}_mean"]), np.asarray(c[f"{key}_std"])
            ax.errorbar(
                ms,
                100 * mean,
                yerr=100 * std,
                label=label,
                color=color,
                marker="o",
                ms=3,
                capsize=3,
            )
        ax.set_title(sub)
        ax.set_xlabel("M (members averaged)")
        ax.set_ylabel("accuracy (%)")
        ax.set_xticks(ms)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(subs) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(title or "accuracy vs number of members")
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out
