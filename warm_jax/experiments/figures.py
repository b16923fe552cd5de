"""`warm-jax figures NAME`: regenerate each figure of the WARM and WARP papers at our scale.

Every figure writes `<workdir>/<NAME>/<NAME>.png` and `<NAME>.json`: every number plotted, the
seeds, the sub-runs it read, and the full gin config it ran under (also `<NAME>/config.gin`).
Its scale (steps, seeds, M values, β / λ / η grids) comes from `gin/figures/<NAME>.gin`, so the
same script runs at paper scale with another gin file (`gin/figures/paper_scale.gin`).

Shared inputs come from a quickstart workdir, the *base* (`figures.base`): its `pretrain/`,
`sft/` and `rm/` (reward models `rm/members/m*`, their average `rm/warm`, `rm/eval/`). Missing
stages are run into the base by `quickstart(stages=...)`, with the settings of
`experiments/quickstart.gin` (which every figure gin file includes).

Sub-runs are cached in `<workdir>/shared/`, named by the settings that make them differ
(reward, anchor, β, seed, steps), so figures share them: `warm_win_rate` compares the policies
`warm_rl` trained; `warp_slerp_lerp`, `warp_liti` and `warp_m` merge the same pool of
EMA-anchored REINFORCE runs (run m differs only by its prompt order, `data_seed = m`: exactly
WARP's first iteration); `warp_anchor`'s EMA run at WARP's β is the pool's run 0. Finished
sub-runs are reused (their `rl.json`, `eval/results.json`, `bon.json`, `warp.json` say so, and
their settings are checked against the current ones: a mismatch stops with an error rather than
mixing settings), interrupted ones resume from their checkpoints. Policy sub-runs also reuse the
base's own `rl_single/` and `rl_warm/` when their settings match.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import re
import shutil
import textwrap
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import gin
import numpy as np

from warm_jax.cli import add_gin_arguments
from warm_jax.errors import UserError

FIGURES_DIR = "figures"
SHARED = "shared"

# ----------------------------------------------------------------------------- the registry


@dataclasses.dataclass(frozen=True)
class Figure:
    name: str
    fn: Callable[[Context], dict]
    what: str  # one line: what is plotted
    claim: str  # one line: what the paper claims
    eval_rm: bool = False  # needs the base's rm/eval (eval_rm stage)


REGISTRY: dict[str, Figure] = {}


def _register(what: str, claim: str, eval_rm: bool = False):
    def deco(fn):
        REGISTRY[fn.__name__] = Figure(fn.__name__, fn, what, claim, eval_rm)
        return fn

    return deco


# ----------------------------------------------------------------------------- gin helpers

_UNBOUND = object()


@contextlib.contextmanager
def bindings(values: Mapping[str, Any]) -> Iterator[None]:
    """Temporarily binds gin parameters (`scope/configurable.param` -> value), restoring the
    previous bindings on exit (so one figure's sub-runs can vary β, a seed or a step count)."""
    saved = {}
    for key, value in values.items():
        try:
            saved[key] = gin.query_parameter(key)
        except ValueError:
            saved[key] = _UNBOUND
        gin.bind_parameter(key, value)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is _UNBOUND:
                # gin has no public "unbind": drop the binding we added.
                pbk = gin.config.ParsedBindingKey.parse(key)
                gin.config._CONFIG.get(pbk.config_key, {}).pop(pbk.arg_name, None)
            else:
                gin.bind_parameter(key, old)


def effective(fn: Callable, *scopes: str) -> dict[str, Any]:
    """The arguments a gin-configurable `fn` gets when called (from nested `scopes`): its
    signature defaults updated by the gin bindings."""
    params = inspect.signature(inspect.unwrap(fn)).parameters
    out = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
    with contextlib.ExitStack() as stack:
        for s in scopes:
            stack.enter_context(gin.config_scope(s))
        out.update(gin.get_bindings(fn))
    return out


def _tag(x: float) -> str:
    return re.sub(r"[^0-9a-zA-Z.+-]", "_", f"{x:g}")


def _read(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


# ----------------------------------------------------------------------------- the context


@dataclasses.dataclass
class Context:
    """Where a figure reads its base and writes its sub-runs, and what it used."""

    name: str
    out: Path
    shared: Path
    base: Path
    progress: bool = True
    runs: list[str] = dataclasses.field(default_factory=list)
    _evaluators: dict = dataclasses.field(default_factory=dict)

    @property
    def sft(self) -> Path:
        return self.base / "sft"

    @property
    def rm(self) -> Path:
        return self.base / "rm"

    def use(self, path: Path) -> Path:
        if str(path) not in self.runs:
            self.runs.append(str(path))
        return path

    def members(self) -> list[Path]:
        from warm_jax.experiments import reward_models as rm_lib

        spec = rm_lib.read_json(self.rm / rm_lib.RM_FILE, "base reward models")
        return [rm_lib.member_dir(self.rm, m["index"]) for m in spec["members"]]


def ensure_base(ctx: Context, with_eval: bool = False) -> None:
    """Runs the quickstart's pretrain / SFT / reward-model (/ evaluation) stages into the base
    unless they are complete there."""
    from warm_jax.experiments import quickstart as qs
    from warm_jax.experiments import reward_models as rm_lib
    from warm_jax.experiments import sft as sft_lib
    from warm_jax.training import checkpoints

    stages = []
    if sft_lib.read_eval(ctx.sft) is None:
        stages += ["pretrain", "sft"]
    if not (ctx.rm / rm_lib.WARM_DIR / checkpoints.META_FILE).is_file():
        stages += ["rms"]
    if with_eval and not (ctx.rm / rm_lib.EVAL_DIR / "results.json").is_file():
        stages += ["eval_rm"]
    if stages:
        print(f"[{ctx.name}] base {ctx.base}: running quickstart stages {stages}", flush=True)
        qs.quickstart(str(ctx.base), stages=tuple(stages), progress=ctx.progress)


# ----------------------------------------------------------------------------- reward models


def rm_set(ctx: Context, seed: int) -> Path:
    """The base's reward models if `member_specs(seed=seed)` gives their settings, else a set
    of as many members trained with that seed in `shared/rm/seed<seed>` (same data, same
    linear-probed head: both copied from the base), with its WARM average."""
    from warm_jax.experiments import reward_models as rm_lib
    from warm_jax.reward import data as rdata
    from warm_jax.reward import members as mb
    from warm_jax.training import checkpoints

    spec = rm_lib.read_json(ctx.rm / rm_lib.RM_FILE, "base reward models")
    num = len(spec["members"])
    with bindings({"member_specs.seed": seed}):
        specs = [s.to_dict() for s in mb.member_specs(num)]
    if specs == spec["members"]:
        return ctx.use(ctx.rm)
    d = ctx.shared / "rm" / f"seed{seed}"
    if not (d / rm_lib.WARM_DIR / checkpoints.META_FILE).is_file():
        d.mkdir(parents=True, exist_ok=True)
        if rdata.pair_data().to_dict() == spec["data"]:
            responses = ctx.rm / rm_lib.POLICY_RESPONSES_FILE
            if responses.is_file() and not (d / responses.name).is_file():
                shutil.copyfile(responses, d / responses.name)
            if (ctx.rm / rm_lib.PROBE_DIR).is_dir() and not (d / rm_lib.PROBE_DIR).is_dir():
                shutil.copytree(ctx.rm / rm_lib.PROBE_DIR, d / rm_lib.PROBE_DIR)
        print(f"[{ctx.name}] reward models, member_specs.seed={seed}: {d}", flush=True)
        with bindings({"member_specs.seed": seed}):
            rm_lib.train_rms(d, init_from=ctx.sft, num_members=num, progress=ctx.progress)
    return ctx.use(d)


def rm_results(ctx: Context, rm_dir: Path) -> dict:
    """`eval_rm` results of a reward-model workdir, evaluated now if missing or evaluated on
    another λ grid than `eval_rm.num_lambdas`."""
    from warm_jax.experiments import reward_models as rm_lib

    num = effective(rm_lib.eval_rm)["num_lambdas"]
    res = _read(rm_dir / rm_lib.EVAL_DIR / "results.json")
    if res is None or len(res["lmc"]["lambdas"]) != num:
        print(f"[{ctx.name}] evaluating the reward models of {rm_dir}", flush=True)
        res = rm_lib.eval_rm(rm_dir)
    return res


def lmc_summary(results: Mapping[int, Mapping[str, Any]]) -> dict:
    """WARM Fig. 3/4 numbers from `eval_rm` results by seed: per subset the WA / ENS / diagonal
    curves of every member pair, each seed's mean over its pairs, and mean ± std over seeds;
    the endpoint members' accuracies (a curve's λ = 0 and λ = 1 points)."""
    seeds = list(results)
    lam = results[seeds[0]]["lmc"]["lambdas"]
    for s in seeds:
        if not np.allclose(results[s]["lmc"]["lambdas"], lam):
            raise UserError(f"seed {s}: evaluated on another λ grid; rerun eval-rm")
        if not results[s]["lmc"]["pairs"]:
            raise UserError(f"seed {s}: no member pairs to interpolate (need >= 2 members)")
    subsets = [
        sub for sub in results[seeds[0]]["lmc"]["curves"] if all(
            sub in results[s]["lmc"]["curves"] for s in seeds
        )
    ]  # fmt: skip
    out: dict[str, Any] = {"lambdas": lam, "seeds": seeds, "subsets": subsets, "curves": {}}
    out["per_seed"] = {
        str(s): {
            "pairs": r["lmc"]["pairs"],
            "member_names": list(r["members"]),
            "members": r["members"],
        }
        for s, r in results.items()
    }
    for sub in subsets:
        entry: dict[str, Any] = {}
        for key in ("wa", "ens", "diag"):
            per_seed = [np.mean(results[s]["lmc"]["curves"][sub][key], 0) for s in seeds]
            entry[f"{key}_pairs"] = {str(s): results[s]["lmc"]["curves"][sub][key] for s in seeds}
            entry[f"{key}_seeds"] = [c.tolist() for c in per_seed]
            entry[f"{key}_mean"] = np.mean(per_seed, 0).tolist()
            entry[f"{key}_std"] = (
                np.std(per_seed, 0, ddof=1) if len(seeds) > 1 else np.zeros(len(lam))
            ).tolist()
        out["curves"][sub] = entry
    return out


def corruption_summary(results: Mapping[int, Mapping[str, Any]]) -> dict:
    """WARM Obs. 3 numbers from `eval_rm` results by seed: for every subset the accuracy of
    ind (each seed's member mean), ENS and WARM, per seed and mean ± std over seeds, and
    accuracy vs M on the corrupted training pairs."""
    from warm_jax.reward import evaluation as ev

    seeds = list(results)
    runs = [results[s] for s in seeds]
    agg = ev.aggregate_runs(runs)
    if "train_corrupted" not in agg["table"]:
        raise UserError(
            "the reward models were trained on clean labels (no train_corrupted subset): "
            "set pair_data.corruption (e.g. 0.25, experiments/warm_oracle_corrupted)"
        )
    out: dict[str, Any] = {"seeds": seeds, "subsets": list(agg["table"]), "table": {}}
    for sub, row in agg["table"].items():
        out["table"][sub] = {
            k: {
                "mean": row[k]["mean"],
                "std": row[k]["std"],
                "seeds": [
                    (r["table"][sub]["ind"]["mean"] if k == "ind" else r["table"][sub][k])
                    for r in runs
                ],
            }
            for k in ("ind", "ens", "warm")
        }
        out["table"][sub]["n"] = [r["table"][sub]["n"] for r in runs]
    ms = runs[0]["accuracy_vs_m"]["m"]
    vs_m = {}
    for key in ("warm", "ens"):
        per = [r["accuracy_vs_m"]["curves"]["train_corrupted"][f"{key}_mean"] for r in runs]
        n = min(len(p) for p in per)
        per = [p[:n] for p in per]
        vs_m[f"{key}_seeds"] = per
        vs_m[f"{key}_mean"] = np.mean(per, 0).tolist()
        vs_m[f"{key}_std"] = (np.std(per, 0, ddof=1) if len(per) > 1 else np.zeros(n)).tolist()
    vs_m["m"] = ms[: len(vs_m["warm_mean"])]
    out["corrupted_vs_m"] = vs_m
    return out


# ----------------------------------------------------------------------------- policies


def _rl_json(d: Path) -> dict | None:
    from warm_jax.experiments import rl as rl_lib

    return _read(d / rl_lib.RL_SUMMARY)


def _matches(summary: Mapping, expected: Mapping) -> list[str]:
    return [k for k, v in expected.items() if summary.get(k) != v]


def policy_run(
    ctx: Context,
    *,
    scope: str,
    key: str,
    reward: str,
    reward_name: str,
    overrides: Mapping[str, Any] | None = None,
    data_seed: int = 0,
    train_seed: int | None = None,
    candidates: Sequence[Path] = (),
) -> Path:
    """A REINFORCE run (`rl_lib.rl`) of the base's SFT policy against `reward`, with the RL
    settings of gin scope `scope` ('rl': the quickstart's RL, 'warp': WARP's runs), modified by
    `overrides` (`configurable.param` -> value, bound in that scope). Its directory in
    `shared/rl/` is named by the settings that make runs differ; a finished run there (or in
    `candidates`, only for default seeds) with the same settings is reused."""
    from warm_jax.experiments import rl as rl_lib
    from warm_jax.policy import reinforce

    binds = {f"{scope}/{k}": v for k, v in (overrides or {}).items()}
    # Keep every checkpoint: win rates and merges read intermediate steps.
    binds[f"{scope}/train.max_to_keep"] = None
    if train_seed is not None:
        binds[f"{scope}/train.seed"] = train_seed
    with bindings(binds), gin.config_scope(scope):
        rl_cfg = reinforce.rl_config()
        steps = effective(_train_fn(), "rl")["num_steps"]
        batch_size = effective(rl_lib.rl)["batch_size"]
    name = f"{scope}_{key}_{rl_cfg.anchor}_b{_tag(rl_cfg.beta)}_s{data_seed}"
    if train_seed:
        name += f"_t{train_seed}"
    name += f"_n{steps}"
    d = ctx.shared / "rl" / name
    expected = {
        "rl": json.loads(json.dumps(dataclasses.asdict(rl_cfg))),
        "steps": steps,
        "reward": reward_name,
        "init_from": str(ctx.sft.resolve()),
        "batch_size": batch_size,
    }
    done = _rl_json(d)
    if done is not None:
        bad = _matches(done, expected)
        if bad:
            raise UserError(
                f"{d} holds a run with other settings ({', '.join(bad)}): remove it or use "
                "another --workdir"
            )
        return ctx.use(d)
    if data_seed == 0 and not train_seed:
        for c in candidates:
            s = _rl_json(c)
            if s is not None and not _matches(s, expected):
                print(f"[{ctx.name}] reusing {c} for {name}", flush=True)
                return ctx.use(c)
    print(f"[{ctx.name}] REINFORCE {name} ({steps} steps) against {reward_name}", flush=True)
    with bindings(binds), gin.config_scope(scope):
        rl_lib.rl(d, init_from=ctx.sft, reward=reward, data_seed=data_seed, progress=ctx.progress)
    return ctx.use(d)


def _train_fn():
    from warm_jax.training import loop

    return loop.train


def trajectory(run_dir: Path) -> dict[str, list[float]]:
    """A run's held-out evaluations (step, KL to SFT, proxy and gold reward), starting with its
    initial evaluation (the SFT policy, KL 0) from rl.json."""
    from warm_jax.policy import warp as warp_lib

    t = warp_lib.trajectory(run_dir)
    out = {
        "step": list(t.get("eval_step", [])),
        "kl_sft": list(t.get("eval_kl_sft", [])),
        "reward": list(t.get("eval_reward", [])),
        "control_reward": list(t.get("eval_control_reward", [])),
    }
    init = (_rl_json(run_dir) or {}).get("initial")
    if init and (not out["step"] or out["step"][0] != 0):
        out["step"].insert(0, 0)
        for k in ("kl_sft", "reward", "control_reward"):
            if k in init and (out[k] or len(out["step"]) == 1):
                out[k].insert(0, float(init[k]))
    return out


def curves_over_seeds(trajs: Sequence[Mapping[str, list[float]]]) -> dict[str, Any]:
    """Mean and std over seeds of trajectories on their common evaluation steps."""
    steps = sorted(set.intersection(*(set(t["step"]) for t in trajs)))
    out: dict[str, Any] = {"step": steps}
    for k in ("kl_sft", "reward", "control_reward"):
        rows = []
        for t in trajs:
            if not t.get(k):
                break
            at = dict(zip(t["step"], t[k]))
            rows.append([at[s] for s in steps])
        if len(rows) == len(trajs) and rows:
            a = np.asarray(rows)
            out[f"{k}_mean"] = a.mean(0).tolist()
            out[f"{k}_std"] = (a.std(0, ddof=1) if len(a) > 1 else np.zeros(len(steps))).tolist()
    return out


def peak(curve: Mapping[str, Any], key: str = "control_reward_mean") -> dict[str, float]:
    """The evaluation step where `key` is highest, its value, and the last value."""
    y = curve.get(key) or []
    if not y:
        return {}
    i = int(np.argmax(y))
    return {"step": curve["step"][i], "value": y[i], "final": y[-1]}


def warm_spec(ctx: Context, m: int, member: int = 0) -> tuple[str, str, str, list[Path]]:
    """(reward spec, its name as rl.json records it, a short key, candidate runs of the base)
    for WARM of the first m members (m = 1: member `member` alone)."""
    from warm_jax.experiments import reward_models as rm_lib

    members = ctx.members()
    if not 1 <= m <= len(members):
        raise UserError(f"M={m}: the base has {len(members)} reward models ({ctx.rm})")
    if m == 1:
        p = members[member]
        return str(p), p.name, p.name, [ctx.base / "rl_single"]
    chosen = members[:m]
    if [p.name for p in chosen] == rm_lib.read_warm_members(ctx.rm):
        return str(ctx.rm / rm_lib.WARM_DIR), rm_lib.WARM_DIR, f"warm{m}", [ctx.base / "rl_warm"]
    return f"warm:{','.join(map(str, chosen))}", f"WARM M={m}", f"warm{m}", []


def warp_reward(ctx: Context, reward: str) -> tuple[str, str, str]:
    """(spec, name, key) of the reward WARP's runs optimise: 'warm' (the base's WARM average),
    'gold', 'm<i>' (one member) or a path."""
    from warm_jax.experiments import reward_models as rm_lib

    if reward == "warm":
        return str(ctx.rm / rm_lib.WARM_DIR), rm_lib.WARM_DIR, "warm"
    if reward == "gold":
        return "gold", "gold", "gold"
    if re.fullmatch(r"m\d+", reward):
        return str(ctx.rm / rm_lib.MEMBERS_DIR / reward), reward, reward
    p = Path(reward)
    return str(p), p.name, re.sub(r"\W", "_", p.name)


class PolicyEval:
    """The held-out Evaluator of `rl_lib.rl` in a gin scope (same prompts, samples and seeds as
    the runs' own evaluations), the SFT parameters, and loading of runs' checkpoints."""

    def __init__(self, ctx: Context, scope: str, reward: str):
        from warm_jax.experiments import rl as rl_lib
        from warm_jax.policy import reinforce

        with gin.config_scope(scope):
            rl_cfg = reinforce.rl_config()
            kw = effective(rl_lib.rl)
        run = rl_lib.prepare_run(
            ctx.sft,
            reward,
            kw["control"],
            rl_cfg,
            task=kw["task"],
            num_prompts=kw["num_prompts"],
            prompt_seed=kw["prompt_seed"],
            num_eval_prompts=kw["num_eval_prompts"],
            eval_seed=kw["eval_seed"],
            eval_samples=kw["eval_samples"],
            what="figures",
        )
        if run.evaluator is None:
            raise UserError("rl.num_eval_prompts = 0: the figures need held-out evaluations")
        self.mesh, self.config, self.sft = run.mesh, run.config, run.sft_params
        self.evaluator = run.evaluator

    def __call__(self, params) -> dict[str, float]:
        return self.evaluator(params, self.sft)

    def load(self, run_dir: Path, step: int | None = None):
        from warm_jax.experiments import sft as sft_lib

        return sft_lib.load_model(run_dir, step=step, mesh=self.mesh)[2]


def policy_eval(ctx: Context, scope: str, reward: str) -> PolicyEval:
    key = (scope, reward)
    if key not in ctx._evaluators:
        ctx._evaluators[key] = PolicyEval(ctx, scope, reward)
    return ctx._evaluators[key]


def warp_pool(ctx: Context, num: int, reward: str) -> list[Path]:
    """Runs 0..num-1 of WARP's first iteration: REINFORCE from SFT with the EMA anchor and
    WARP's settings (gin scope 'warp'), run m with prompt order `data_seed = m`."""
    spec, name, key = warp_reward(ctx, reward)
    return [
        policy_run(ctx, scope="warp", key=key, reward=spec, reward_name=name, data_seed=m)
        for m in range(num)
    ]


def front(pe: PolicyEval, merged, etas: Sequence[float]) -> list[dict]:
    """WARP's front: (1-η) θ_sft + η θ_merged for each η."""
    from warm_jax.policy import warp as warp_lib

    return warp_lib.pareto_front(pe.evaluator, pe.sft, merged, etas)


def interpolation_curves(pe: PolicyEval, a, b, lambdas: Sequence[float], granularity: str):
    """Evaluations along SLERP (task vectors about θ_sft) and LERP between policies a and b."""
    from warm_jax import merging

    out = {"lambdas": [float(x) for x in lambdas], "slerp": [], "lerp": []}
    for lam in lambdas:
        s = merging.slerp(pe.sft, a, b, float(lam), granularity=granularity)
        out["slerp"].append(pe(s))
        out["lerp"].append(pe(merging.lerp(a, b, float(lam))))
    return out


def win_rates(gold: Mapping[str, Mapping[int, np.ndarray]], pairs) -> dict[str, list[dict]]:
    """Win rates (gold judge) with confidence intervals at every step, for each (a, b) pair
    of policies in `pairs`: gold[policy][step] is a [prompts, samples] array."""
    from warm_jax.policy import win_rate as wr

    out = {}
    for a, b in pairs:
        steps = sorted(set(gold[a]) & set(gold[b]))
        out[f"{a}_vs_{b}"] = [{"step": s, **wr.win_rate(gold[a][s], gold[b][s])} for s in steps]
    return out


# ----------------------------------------------------------------------------- plotting


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(fig, axes, path: Path, title: str) -> None:
    for ax in np.ravel(axes):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)


def _band(ax, x, mean, std, label, color=None, style="o-"):
    x, mean, std = map(np.asarray, (x, mean, std))
    (line,) = ax.plot(x, mean, style, label=label, color=color, ms=3)
    if np.any(std > 0):
        ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.15)


# ----------------------------------------------------------------------------- WARM figures


@_register(
    "accuracy along (1-λ)φ1+λφ2 (WA), (1-λ)r1+λr2 (ENS) and the diagonal, per subset",
    "WARM Fig. 3/4: WA ≥ diagonal (linear mode connectivity); WA ≈ ENS ID, WA ≥ ENS OOD; "
    "with corrupted labels WA fits the corrupted pairs less",
    eval_rm=True,
)
@gin.configurable
def warm_lmc(ctx: Context, seeds: Sequence[int] = (0, 1)) -> dict:
    results = {int(s): rm_results(ctx, rm_set(ctx, int(s))) for s in seeds}
    data = lmc_summary(results)
    subs = data["subsets"]
    plt = _plt()
    cols = min(3, len(subs))
    rows = -(-len(subs) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.5 * rows), squeeze=False)
    styles = (("wa", "WA (weights)", "C0", "o-"), ("ens", "ENS (predictions)", "C1", "s--"))
    styles += (("diag", "diagonal", "0.5", ":"),)
    for ax, sub in zip(axes.flat, subs):
        c = data["curves"][sub]
        for key, label, color, style in styles:
            _band(ax, data["lambdas"], c[f"{key}_mean"], c[f"{key}_std"], label, color, style)
        ax.set_title(sub)
        ax.set_xlabel("λ")
        ax.set_ylabel("accuracy")
    for ax in list(axes.flat)[len(subs) :]:
        ax.axis("off")
    _finish(fig, axes, ctx.out / f"{ctx.name}.png", f"interpolating reward models, seeds {seeds}")
    return {"seeds": list(results), "data": data}


@_register(
    "accuracy of ind / ENS / WARM on corrupted vs clean training pairs, validation and OOD",
    "WARM Obs. 3: WARM memorises the corrupted labels less than ENS and ind, ≤ ENS on clean "
    "train, ⪆ ENS on ID validation, ≥ ENS OOD",
    eval_rm=True,
)
@gin.configurable
def warm_corruption(ctx: Context, seeds: Sequence[int] = (0, 1)) -> dict:
    results = {int(s): rm_results(ctx, rm_set(ctx, int(s))) for s in seeds}
    data = corruption_summary(results)
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2), gridspec_kw={"width_ratios": [2.2, 1]})
    subs = data["subsets"]
    x = np.arange(len(subs))
    for j, (k, label) in enumerate(
        (("ind", "ind (member mean)"), ("ens", "ENS"), ("warm", "WARM"))
    ):
        mean = [data["table"][s][k]["mean"] for s in subs]
        std = [data["table"][s][k]["std"] for s in subs]
        axes[0].bar(x + (j - 1) * 0.27, mean, 0.27, yerr=std, capsize=3, label=label)
        for i, s in enumerate(subs):
            pts = data["table"][s][k]["seeds"]
            axes[0].plot([x[i] + (j - 1) * 0.27] * len(pts), pts, "k.", ms=3)
    axes[0].set_xticks(x, subs, rotation=15, fontsize=8)
    axes[0].set_ylabel("accuracy (train_corrupted: on the swapped labels)")
    axes[0].set_ylim(0, 1)
    vs = data["corrupted_vs_m"]
    _band(axes[1], vs["m"], vs["warm_mean"], vs["warm_std"], "WARM", "C2")
    _band(axes[1], vs["m"], vs["ens_mean"], vs["ens_std"], "ENS", "C1", "s--")
    axes[1].set_xlabel("M (members)")
    axes[1].set_xticks(vs["m"])
    axes[1].set_ylabel("accuracy on the corrupted training pairs")
    _finish(
        fig, axes, ctx.out / f"{ctx.name}.png", f"label corruption: memorisation, seeds {seeds}"
    )
    return {"seeds": list(results), "data": data}


def bon_summary(by_seed: Mapping[int, Mapping[str, Any]], labels: Mapping[str, str]) -> dict:
    """WARM Fig. 6 numbers from `bon.json` by seed: per curve label (`labels`: bon curve name
    -> label, 'ind' labels averaged over members within a seed) the gold-reward gain over
    n = 1, mean ± std over seeds, and the gain over the mean individual member."""
    seeds = list(by_seed)
    first = by_seed[seeds[0]]
    out: dict[str, Any] = {"n": first["n"], "kl": first["kl"], "seeds": seeds, "curves": {}}
    groups: dict[str, list[str]] = {}
    for name, label in labels.items():
        groups.setdefault(label, []).append(name)
    per_label: dict[str, np.ndarray] = {}
    for label, names in groups.items():
        rows = [np.mean([by_seed[s]["curves"][n]["control_gain"] for n in names], 0) for s in seeds]
        a = np.asarray(rows)
        per_label[label] = a
        out["curves"][label] = {
            "members": names,
            "gain_seeds": a.tolist(),
            "gain_mean": a.mean(0).tolist(),
            "gain_std": (a.std(0, ddof=1) if len(a) > 1 else np.zeros(a.shape[1])).tolist(),
            "control_mean": np.mean(
                [[by_seed[s]["curves"][n]["control"] for n in names] for s in seeds], (0, 1)
            ).tolist(),
        }
        if len(names) > 1:
            out["curves"][label]["each_member_gain"] = {
                n: np.mean([by_seed[s]["curves"][n]["control_gain"] for s in seeds], 0).tolist()
                for n in names
            }
    if "ind" in per_label:
        for label, a in per_label.items():
            out["curves"][label]["gain_over_ind_mean"] = (a - per_label["ind"]).mean(0).tolist()
    return out


@_register(
    "best-of-n of the SFT policy: gold-reward gain vs KL = log n - (n-1)/n, selected by ind, "
    "ENS M=2, WARM M=2 and WARM with more members",
    "WARM Fig. 6: gain WARM M=6 > WARM M=2 > ENS M=2 > ind, clean and corrupted labels",
)
@gin.configurable
def warm_bon(
    ctx: Context, m_values: Sequence[int] = (2, 4), ens_m: int = 2, seeds: Sequence[int] = (0, 1)
) -> dict:
    from warm_jax.experiments import rl as rl_lib

    members = ctx.members()
    if max(*m_values, ens_m) > len(members):
        raise UserError(
            f"warm_bon: M up to {max(*m_values, ens_m)} but the base has {len(members)} reward "
            "models (train_rms.num_members)"
        )
    specs: dict[str, str] = {str(p): p.name for p in members}
    labels = {p.name: "ind" for p in members}
    ens = f"ens:{','.join(map(str, members[:ens_m]))}"
    specs[ens] = f"ENS M={ens_m}"
    labels[f"ENS M={ens_m}"] = f"ENS M={ens_m}"
    for m in m_values:
        if m == 1:
            continue  # M = 1 is the first individual member, drawn with the others
        specs[f"warm:{','.join(map(str, members[:m]))}"] = f"WARM M={m}"
        labels[f"WARM M={m}"] = f"WARM M={m}"
    kw = effective(rl_lib.bon)
    by_seed = {}
    for s in seeds:
        d = ctx.shared / "bon" / f"seed{s}_n{kw['n_max']}_p{kw['num_prompts']}"
        got = _read(d / rl_lib.BON_SUMMARY)
        if got is None or set(got["curves"]) != set(specs.values()):
            print(f"[{ctx.name}] best-of-{kw['n_max']}, seed {s}: {d}", flush=True)
            got = rl_lib.bon(d, init_from=ctx.sft, rewards=list(specs), seed=int(s))
        by_seed[int(s)] = got
        ctx.use(d)
    data = bon_summary(by_seed, labels)
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for label, c in data["curves"].items():
        _band(axes[0], data["kl"], c["gain_mean"], c["gain_std"], label)
        for g in c.get("each_member_gain", {}).values():
            axes[0].plot(data["kl"], g, "-", color="0.7", lw=0.8)
        axes[1].plot(data["kl"], c["gain_over_ind_mean"], "o-", label=label, ms=3)
    axes[0].set_ylabel("gold reward gain over n = 1")
    axes[1].set_ylabel("gold reward gain minus ind's")
    for ax in axes:
        ax.set_xlabel("KL = log n - (n-1)/n")
    _finish(fig, axes, ctx.out / f"{ctx.name}.png", f"best-of-n, seeds {list(seeds)}")
    return {"seeds": list(by_seed), "data": data}


def _warm_rl_runs(ctx, m_values, seeds, member, num_steps, checkpoint_every) -> dict:
    overrides: dict[str, Any] = {}
    if num_steps:
        overrides["train.num_steps"] = int(num_steps)
    if checkpoint_every:
        overrides["train.checkpoint_every"] = int(checkpoint_every)
    runs: dict[int, dict[int, Path]] = {}
    for m in m_values:
        spec, name, key, candidates = warm_spec(ctx, int(m), member)
        runs[int(m)] = {
            int(s): policy_run(
                ctx,
                scope="rl",
                key=key,
                reward=spec,
                reward_name=name,
                overrides=overrides,
                data_seed=int(s),
                train_seed=int(s),
                candidates=candidates,
            )
            for s in seeds
        }
    return runs


@_register(
    "REINFORCE against WARM with M = 1 (one member), 2, 6: gold and proxy reward vs steps",
    "WARM Fig. 8: gold reward rises then collapses with one RM (reward hacking); more "
    "members delay the collapse",
)
@gin.configurable
def warm_rl(
    ctx: Context,
    m_values: Sequence[int] = (1, 2, 4),
    seeds: Sequence[int] = (0,),
    member: int = 0,
    num_steps: int | None = None,
    checkpoint_every: int | None = None,
) -> dict:
    runs = _warm_rl_runs(ctx, m_values, seeds, member, num_steps, checkpoint_every)
    data: dict[str, Any] = {"curves": {}, "runs": {}}
    for m, by_seed in runs.items():
        trajs = [trajectory(d) for d in by_seed.values()]
        c = curves_over_seeds(trajs)
        c["peak_control"] = peak(c)
        data["curves"][f"M={m}"] = c
        data["runs"][f"M={m}"] = {str(s): str(d) for s, d in by_seed.items()}
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for label, c in data["curves"].items():
        name = label if label != "M=1" else f"M=1 (member m{member})"
        _band(axes[0], c["step"], c["control_reward_mean"], c["control_reward_std"], name)
        _band(axes[1], c["step"], c["reward_mean"], c["reward_std"], name)
        axes[2].plot(c["kl_sft_mean"], c["control_reward_mean"], "o-", label=name, ms=3)
    axes[0].set_ylabel("gold (control) reward")
    axes[1].set_ylabel("proxy reward (each run's own)")
    for ax in axes[:2]:
        ax.set_xlabel("REINFORCE step")
    axes[2].set_xlabel("KL(π ‖ π_sft)")
    axes[2].set_ylabel("gold (control) reward")
    _finish(fig, axes, ctx.out / f"{ctx.name}.png", f"RL against WARM, seeds {list(seeds)}")
    return {"seeds": list(seeds), "data": data}


def policy_gold(
    model_dir: Path, step: int | None, prompts: list[str], samples: int, seed: int, mesh
) -> np.ndarray:
    """Gold rewards [prompts, samples] of the policy in `model_dir` at a checkpoint step (None:
    its latest), sampled with the quickstart's RL sampling settings and a fixed seed."""
    from warm_jax.data import oracle_task
    from warm_jax.experiments import sft as sft_lib
    from warm_jax.policy import reinforce, sampling

    with gin.config_scope("rl"):
        rl_cfg = reinforce.rl_config()
    config, tokenizer, params = sft_lib.load_model(model_dir, step=step, mesh=mesh)
    cfg = rl_cfg.sampling_config(tokenizer.eos_id, tokenizer.pad_id)
    repeated = [p for p in prompts for _ in range(samples)]
    out = sampling.sample_texts(params, config, tokenizer, repeated, cfg, seed)
    return oracle_task.gold_rewards(repeated, out.responses).reshape(len(prompts), samples)


@_register(
    "win rate (gold judge) of the WARM-M policy against the M=1 policy at every kept "
    "checkpoint, with 95 % confidence intervals",
    "WARM Fig. 9: the WARM M=6 policy wins 79.4 % against the policy trained on one RM",
)
@gin.configurable
def warm_win_rate(
    ctx: Context,
    m: int | None = None,
    num_prompts: int = 128,
    samples: int = 4,
    prompts_seed: int = 777,
    sample_seed: int = 777,
) -> dict:
    from warm_jax import sharding as shd
    from warm_jax.data import oracle_task
    from warm_jax.experiments import sft as sft_lib

    kw = effective(warm_rl)
    m = int(m or max(kw["m_values"]))
    seed = int(kw["seeds"][0])
    runs = _warm_rl_runs(
        ctx, (1, m), (seed,), kw["member"], kw["num_steps"], kw["checkpoint_every"]
    )
    single, warm = runs[1][seed], runs[m][seed]
    steps = sorted(
        set(sft_lib.sft_checkpoint_steps(single)) & set(sft_lib.sft_checkpoint_steps(warm))
    )
    if not steps:
        raise UserError(f"{single} and {warm} share no kept checkpoint step")
    mesh = shd.make_mesh()
    prompts = oracle_task.sample_prompts(num_prompts, prompts_seed)
    gold: dict[str, dict[int, np.ndarray]] = {"warm": {}, "single": {}, "sft": {}}
    sft_gold = policy_gold(ctx.sft, None, prompts, samples, sample_seed, mesh)
    for s in steps:
        print(f"[{ctx.name}] sampling both policies at step {s}", flush=True)
        gold["warm"][s] = policy_gold(warm, s, prompts, samples, sample_seed, mesh)
        gold["single"][s] = policy_gold(single, s, prompts, samples, sample_seed, mesh)
        gold["sft"][s] = sft_gold
    rates = win_rates(gold, [("warm", "single"), ("warm", "sft"), ("single", "sft")])
    data = {
        "m": m,
        "steps": steps,
        "judge": "gold",
        "prompts_seed": prompts_seed,
        "sample_seed": sample_seed,
        "samples_per_prompt": samples,
        "win_rates": rates,
        "gold_mean": {
            k: {str(s): float(v.mean()) for s, v in by.items()} for k, by in gold.items()
        },
        "runs": {"M=1": str(single), f"M={m}": str(warm)},
    }
    plt = _plt()
    fig, ax = plt.subplots(1, 1, figsize=(7, 4.2))
    labels = {
        "warm_vs_single": f"WARM M={m} vs M=1",
        "warm_vs_sft": f"WARM M={m} vs SFT",
        "single_vs_sft": "M=1 vs SFT",
    }
    for k, pts in rates.items():
        x = np.asarray([p["step"] for p in pts], float)
        y = np.asarray([p["win_rate"] for p in pts])
        err = np.stack([y - [p["ci_low"] for p in pts], [p["ci_high"] for p in pts] - y])
        ax.errorbar(x, y, yerr=err, fmt="o-", capsize=3, label=labels[k], ms=3)
    ax.axhline(0.5, color="0.5", ls=":")
    ax.set_xlabel("REINFORCE step (kept checkpoints)")
    ax.set_ylabel("win rate, gold judge (95 % CI)")
    ax.set_ylim(0, 1)
    _finish(fig, ax, ctx.out / f"{ctx.name}.png", f"win rates, {num_prompts} prompts")
    return {"seeds": {"rl": seed, "prompts": prompts_seed, "samples": sample_seed}, "data": data}


# ----------------------------------------------------------------------------- WARP figures


@_register(
    "REINFORCE with the SFT anchor vs the EMA anchor: gold and proxy reward vs KL to SFT, "
    "for several β",
    "WARP Fig. 3a/b: the EMA anchor reaches higher reward at a given KL than the SFT anchor",
)
@gin.configurable
def warp_anchor(
    ctx: Context,
    betas: Sequence[float] = (0.01, 0.1),
    anchors: Sequence[str] = ("sft", "ema"),
    reward: str = "warm",
    seed: int = 0,
    num_steps: int | None = None,
) -> dict:
    spec, name, key = warp_reward(ctx, reward)
    data: dict[str, Any] = {"reward": name, "trajectories": {}, "runs": {}}
    for anchor in anchors:
        for beta in betas:
            overrides: dict[str, Any] = {"rl_config.anchor": anchor, "rl_config.beta": float(beta)}
            if num_steps:
                overrides["train.num_steps"] = int(num_steps)
            d = policy_run(
                ctx,
                scope="warp",
                key=key,
                reward=spec,
                reward_name=name,
                overrides=overrides,
                data_seed=int(seed),
            )
            label = f"{anchor} anchor, β={beta:g}"
            data["trajectories"][label] = trajectory(d)
            data["runs"][label] = str(d)
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    for j, beta in enumerate(betas):
        for anchor in anchors:
            t = data["trajectories"][f"{anchor} anchor, β={beta:g}"]
            style = "o-" if anchor == "ema" else "s--"
            for ax, k in zip(axes, ("control_reward", "reward")):
                if t[k]:
                    ax.plot(t["kl_sft"], t[k], style, color=f"C{j}", ms=3,
                            label=f"{anchor.upper()} anchor, β={beta:g}")  # fmt: skip
    axes[0].set_ylabel("gold (control) reward")
    axes[1].set_ylabel(f"proxy reward ({name})")
    for ax in axes:
        ax.set_xlabel("KL(π ‖ π_sft)")
    _finish(fig, axes, ctx.out / f"{ctx.name}.png", "REINFORCE: EMA vs SFT anchor")
    return {"seeds": {"data_seed": seed}, "data": data}


def _warp_settings() -> Any:
    from warm_jax.policy import warp as warp_lib

    return warp_lib.warp_config()


@_register(
    "reward, gold reward and KL to SFT vs λ along SLERP (task vectors) and LERP between two "
    "REINFORCE policies from the same init",
    "WARP Fig. 3c/8: reward is convex in λ and SLERP > LERP in reward; LERP has lower KL",
)
@gin.configurable
def warp_slerp_lerp(
    ctx: Context,
    lambdas: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    steps: Sequence[int | None] = (None,),
    reward: str = "warm",
) -> dict:
    cfg = _warp_settings()
    spec, name, _ = warp_reward(ctx, reward)
    a_dir, b_dir = warp_pool(ctx, 2, reward)
    pe = policy_eval(ctx, "warp", spec)
    data: dict[str, Any] = {"reward": name, "granularity": cfg.granularity, "curves": {}}
    for step in steps:
        a, b = pe.load(a_dir, step), pe.load(b_dir, step)
        label = "final" if step is None else f"step {step}"
        print(f"[{ctx.name}] SLERP and LERP of two policies ({label})", flush=True)
        curves = interpolation_curves(pe, a, b, lambdas, cfg.granularity)
        curves["endpoints"] = [pe(a), pe(b)]
        data["curves"][label] = curves
    data["runs"] = [str(a_dir), str(b_dir)]
    plt = _plt()
    metrics = [("reward", f"proxy reward ({name})"), ("kl_sft", "KL(π ‖ π_sft)")]
    if "control_reward" in next(iter(data["curves"].values()))["slerp"][0]:
        metrics.insert(1, ("control_reward", "gold (control) reward"))
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4.2))
    for j, (label, c) in enumerate(data["curves"].items()):
        for ax, (k, ylabel) in zip(axes, metrics):
            for how, style in (("slerp", "o-"), ("lerp", "s--")):
                # ± one standard error of the Monte Carlo evaluation (shaded).
                mean = [p[k] for p in c[how]]
                sem = [p.get(f"{k}_sem", 0.0) for p in c[how]]
                color = f"C{2 * j + (how == 'lerp')}"
                _band(ax, c["lambdas"], mean, sem, f"{how.upper()} ({label})", color, style)
            ax.set_ylabel(ylabel)
            ax.set_xlabel("λ")
    _finish(fig, axes, ctx.out / f"{ctx.name}.png", "SLERP vs LERP between two policies")
    return {"seeds": {"data_seeds": [0, 1]}, "data": data}


def _front_plot(ctx, fronts: Mapping[str, list[dict]], trajs: Mapping[str, Mapping], title):
    plt = _plt()
    has_control = all("control_reward" in f[0] for f in fronts.values())
    metrics = ["reward"] + (["control_reward"] if has_control else [])
    fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4.4), squeeze=False)
    for ax, k in zip(axes[0], metrics):
        for i, (label, t) in enumerate(trajs.items()):
            if t.get(k):
                lab = label if len(trajs) <= 3 else ("REINFORCE runs" if i == 0 else None)
                ax.plot(t["kl_sft"], t[k], ":", color=f"C{7 + i % 3}", alpha=0.7, label=lab)
        for label, f in fronts.items():
            ax.plot([p["kl_sft"] for p in f], [p[k] for p in f], "o-", label=label, ms=3)
            for p in f:
                ax.annotate(f"{p['eta']:g}", (p["kl_sft"], p[k]), fontsize=6, alpha=0.6)
        ax.set_xlabel("KL(π ‖ π_sft)")
        ax.set_ylabel("proxy reward" if k == "reward" else "gold (control) reward")
    _finish(fig, axes, ctx.out / f"{ctx.name}.png", title)


@_register(
    "the LITI front (1-η) θ_sft + η θ_slerp over η against the REINFORCE trajectories",
    "WARP Fig. 4a: the η sweep traces a KL-reward front above REINFORCE's trajectories",
)
@gin.configurable
def warp_liti(
    ctx: Context,
    etas: Sequence[float] = (0.0, 0.1, 0.3, 0.5, 0.8, 1.0),
    reward: str = "warm",
    betas: Sequence[float] = (),
) -> dict:
    from warm_jax.policy import reinforce
    from warm_jax.policy import warp as warp_lib

    cfg = _warp_settings()
    spec, name, key = warp_reward(ctx, reward)
    pool = warp_pool(ctx, cfg.num_policies, reward)
    pe = policy_eval(ctx, "warp", spec)
    merged = warp_lib.merge_policies(pe.sft, [pe.load(d) for d in pool], cfg.lam, cfg.granularity)
    print(f"[{ctx.name}] LITI front of M={cfg.num_policies}, η in {list(etas)}", flush=True)
    fr = front(pe, merged, etas)
    trajs = {}
    with gin.config_scope("warp"):
        beta0 = _tag(reinforce.rl_config().beta)
    for m, d in enumerate(pool):
        trajs[f"REINFORCE run {m} (EMA anchor, β={beta0})"] = trajectory(d)
    for beta in betas:
        d = policy_run(
            ctx,
            scope="warp",
            key=key,
            reward=spec,
            reward_name=name,
            overrides={"rl_config.beta": float(beta)},
        )
        trajs[f"REINFORCE (EMA anchor, β={beta:g})"] = trajectory(d)
    fronts = {f"LITI front, M={cfg.num_policies}": fr}
    _front_plot(ctx, fronts, trajs, "WARP: LITI front vs REINFORCE")
    return {
        "seeds": {"data_seeds": list(range(cfg.num_policies))},
        "data": {"reward": name, "front": fr, "trajectories": trajs, "runs": list(map(str, pool))},
    }


@_register(
    "the SLERP front (1-η) θ_sft + η slerp(θ_1..θ_M) for several numbers M of policies",
    "WARP Fig. 4b: merging more policies pushes the KL-reward front up",
)
@gin.configurable
def warp_m(
    ctx: Context,
    m_values: Sequence[int] = (2, 4),
    etas: Sequence[float] = (0.0, 0.3, 0.6, 1.0),
    reward: str = "warm",
) -> dict:
    from warm_jax.policy import warp as warp_lib

    cfg = _warp_settings()
    spec, name, _ = warp_reward(ctx, reward)
    pool = warp_pool(ctx, max(m_values), reward)
    pe = policy_eval(ctx, "warp", spec)
    params = [pe.load(d) for d in pool]
    fronts = {}
    for m in m_values:
        print(f"[{ctx.name}] front of M={m}", flush=True)
        merged = warp_lib.merge_policies(pe.sft, params[:m], cfg.lam, cfg.granularity)
        fronts[f"M={m}"] = front(pe, merged, etas)
    trajs = {f"REINFORCE run {i}": trajectory(d) for i, d in enumerate(pool)}
    _front_plot(ctx, fronts, trajs, "WARP: more policies M")
    return {
        "seeds": {"data_seeds": list(range(max(m_values)))},
        "data": {
            "reward": name,
            "fronts": fronts,
            "trajectories": trajs,
            "runs": list(map(str, pool)),
        },
    }


@_register(
    "WARP's front (1-η) θ_sft + η θ_slerp^i after each iteration i = 1..I",
    "WARP Fig. 4c: iterating (LITI init for the next iteration) pushes the front up, with "
    "diminishing returns",
)
@gin.configurable
def warp_iterations(
    ctx: Context,
    num_iterations: int = 3,
    etas: Sequence[float] = (0.0, 0.3, 0.6, 1.0),
    reward: str = "warm",
) -> dict:
    from warm_jax.experiments import rl as rl_lib
    from warm_jax.policy import reinforce
    from warm_jax.policy import warp as warp_lib

    spec, name, key = warp_reward(ctx, reward)
    binds = {
        "warp_config.num_iterations": int(num_iterations),
        "warp_config.front_etas": tuple(float(e) for e in etas),
    }
    with bindings(binds):
        cfg = _warp_settings()
        with gin.config_scope("warp"):
            rl_cfg = json.loads(json.dumps(dataclasses.asdict(reinforce.rl_config())))
        d = ctx.shared / "warp" / f"{key}_M{cfg.num_policies}_I{num_iterations}"
        summary = warp_lib.read_summary(d)
        if summary is not None and (summary["rl"] != rl_cfg or summary.get("reward") != name):
            raise UserError(
                f"{d} holds a WARP run with other RL settings or reward: remove it or use "
                "another --workdir"
            )
        want = json.loads(json.dumps(dataclasses.asdict(cfg)))
        if summary is not None and summary["warp"] != want:
            free = ("num_iterations", "front_etas")  # warp() extends / re-evaluates these
            if any(summary["warp"][k] != v for k, v in want.items() if k not in free):
                raise UserError(f"{d} holds a WARP run with other warp_config settings")
            summary = None
        if summary is None:
            print(f"[{ctx.name}] WARP, {num_iterations} iterations: {d}", flush=True)
            with gin.config_scope("warp"):
                summary = rl_lib.warp(d, init_from=ctx.sft, reward=spec, progress=ctx.progress)
    ctx.use(d)
    fronts = {f"iteration {it['iteration']}": it["front"] for it in summary["iterations"]}
    trajs = {}
    for it in summary["iterations"]:
        for m, t in enumerate(it["trajectories"]):
            trajs[f"iteration {it['iteration']} run {m}"] = {
                "kl_sft": t.get("eval_kl_sft", []),
                "reward": t.get("eval_reward", []),
                "control_reward": t.get("eval_control_reward", []),
            }
    _front_plot(ctx, fronts, trajs, f"WARP: {num_iterations} iterations")
    data = {
        "reward": name,
        "fronts": fronts,
        "liti": [it.get("liti_eval") for it in summary["iterations"]],
        "slerp": [it.get("slerp_eval") for it in summary["iterations"]],
        "task_vector_cosine": [it["task_vector_cosine"] for it in summary["iterations"]],
        "warp": summary["warp"],
        "run": str(d),
    }
    return {"seeds": {"data_seeds": "data_seed + (i-1)·M + m"}, "data": data}


# ----------------------------------------------------------------------------- running


@gin.configurable
def figures(
    name: str,
    workdir: str,
    base: str = "runs/quickstart",
    shared: str | None = None,
    progress: bool = True,
) -> dict:
    """Regenerates figure `name` into `<workdir>/<name>/`, reading (or first running) the
    quickstart stages in `base`; sub-runs are cached in `shared` (default `<workdir>/shared`)."""
    if name not in REGISTRY:
        raise UserError(f"unknown figure {name!r}; choose from {', '.join(REGISTRY)}")
    fig = REGISTRY[name]
    root = Path(workdir)
    ctx = Context(
        name=name,
        out=root / name,
        shared=Path(shared) if shared else root / SHARED,
        base=Path(base),
        progress=progress,
    )
    ctx.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    ensure_base(ctx, with_eval=fig.eval_rm)
    result = fig.fn(ctx)
    config = gin.config_str()
    record = {
        "figure": name,
        "what": fig.what,
        "paper_claim": fig.claim,
        "base": str(ctx.base.resolve()),
        "seeds": result["seeds"],
        "data": result["data"],
        "sub_runs": ctx.runs,
        "png": str(ctx.out / f"{name}.png"),
        "seconds": round(time.time() - t0, 1),
        "gin_config": config,
    }
    from warm_jax.training import loop

    loop.save_json(ctx.out / f"{name}.json", record)
    (ctx.out / "config.gin").write_text(config)
    return record


# ----------------------------------------------------------------------------- CLI


def listing(width: int = 100) -> str:
    """Each figure with one line on what it shows and one on what the paper claims."""
    lines = []
    for f in REGISTRY.values():
        lines += textwrap.wrap(
            f"{f.name:<16} {f.what}", width, initial_indent="  ", subsequent_indent=" " * 19
        )
        lines += textwrap.wrap(
            f"paper: {f.claim}", width, initial_indent=" " * 19, subsequent_indent=" " * 26
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_gin_arguments(parser, workdir_default="runs/figures")
    parser.add_argument("name", nargs="?", help="the figure to regenerate (see the list above)")
    parser.add_argument("--list", action="store_true", help="list the figures and exit")
    intro = (
        "Regenerate a figure of the WARM / WARP papers at our scale: WORKDIR/NAME/NAME.png and "
        "NAME.json (every number plotted, the seeds, the gin config). Settings: "
        "gin/figures/NAME.gin (which includes experiments/quickstart.gin); the shared inputs "
        "(pretrain, SFT, reward models) come from the quickstart workdir figures.base "
        "(default runs/quickstart), run there first if missing. Sub-runs are cached in "
        "WORKDIR/shared and reused by every figure. Paper scale: --gin_file figures/paper_scale."
    )
    parser.description = textwrap.fill(intro, 100) + "\n\nFigures:\n" + listing()


def _print(record: Mapping[str, Any]) -> None:
    print(f"{record['figure']}: {record['what']}")
    print(f"paper: {record['paper_claim']}")
    print(f"wrote {record['png']} and {Path(record['png']).with_suffix('.json')} "
          f"({record['seconds']:.0f} s)")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from warm_jax import config as cfg

    if args.list or not args.name:
        print(listing())
        return 0
    if args.name not in REGISTRY:
        raise UserError(f"unknown figure {args.name!r}; choose from {', '.join(REGISTRY)}")
    cfg.parse(
        [f"figures/{args.name}", *args.gin_file],
        args.gin_bindings,
        extra_modules=("warm_jax.experiments.figures",),
    )
    record = figures(args.name, args.workdir)
    _print(record)
    return 0
