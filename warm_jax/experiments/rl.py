"""`warm-jax bon`, `warm-jax rl`, `warm-jax warp`: best-of-N, KL-regularised REINFORCE and WARP
on the built-in oracle task, from an SFT workdir, against any reward.

Reward specs (flags `--reward`/`--control`, gin `rl.reward`, `bon.rewards`, …):

* `gold`: the oracle task's gold reward on decoded text (through `jax.pure_callback`);
* `PATH`: one reward model: a training workdir, a step directory or a params checkpoint, whose
  `model.json` and `tokenizer/` are in it or in a parent directory;
* `warm:PATH1,PATH2,…`: WARM, the uniform weight average of those reward models;
* `ens:PATH1,PATH2,…`: ENS, the average of their predictions;
* `none` (control only): no control reward.

A reward model must share the policy's tokenizer (checked before anything runs). All three
subcommands live in this module; `add_arguments` reads which one from the parser's `prog`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gin
import jax
import numpy as np
from jax.sharding import Mesh

from warm_jax import sharding as shd
from warm_jax.cli import add_gin_arguments
from warm_jax.data import oracle_task
from warm_jax.data.tokenizer import Tokenizer
from warm_jax.errors import UserError
from warm_jax.experiments import pretrain as pretrain_lib
from warm_jax.experiments import sft as sft_lib
from warm_jax.models import transformer as tm
from warm_jax.policy import best_of_n as bon_lib
from warm_jax.policy import reinforce, sampling
from warm_jax.policy import rewards as rw_lib
from warm_jax.policy import warp as warp_lib
from warm_jax.training import checkpoints, loop
from warm_jax.training.metrics import read_jsonl

PyTree = Any
TASKS = ("oracle",)
RL_SUMMARY = "rl.json"
BON_SUMMARY = "bon.json"
COMMANDS = ("bon", "rl", "warp")
# Modules registering this job's gin configurables (until they are in config.CONFIGURABLE_MODULES).
EXTRA_MODULES = ("warm_jax.experiments.rl", "warm_jax.policy.reinforce", "warm_jax.policy.warp")


# ----------------------------------------------------------------------------- rewards


def _model_dir_of(path: Path) -> Path:
    """The nearest directory at or above `path` holding model.json (the model's shape)."""
    for d in (path, *path.parents[:4]):
        if (d / pretrain_lib.MODEL_FILE).is_file():
            return d
    raise UserError(
        f"reward model {str(path)!r}: no {pretrain_lib.MODEL_FILE} in it or its parents; give a "
        "training workdir (or a checkpoint inside one) of a warm_jax model"
    )


def load_reward_model(
    path: str | os.PathLike, mesh: Mesh
) -> tuple[tm.TransformerConfig, Tokenizer, PyTree]:
    """Config, tokenizer and parameters of a reward model checkpoint."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"reward model {str(p)!r} does not exist")
    config, tokenizer = pretrain_lib.load_model_files(_model_dir_of(p))
    params = checkpoints.load_params(p, target=sft_lib.abstract_params(config, mesh))
    return config, tokenizer, params


def parse_reward_spec(spec: str) -> tuple[str, list[str]]:
    """'gold' | 'none' | 'PATH' | 'warm:P1,P2' | 'ens:P1,P2' -> (kind, paths)."""
    spec = str(spec).strip()
    if spec in ("gold", "none", ""):
        return (spec or "none"), []
    for kind in ("warm", "ens"):
        if spec.startswith(f"{kind}:"):
            paths = [s.strip() for s in spec[len(kind) + 1 :].split(",") if s.strip()]
            if not paths:
                raise UserError(f"reward spec {spec!r}: {kind}: needs at least one path")
            return kind, paths
    return "single", [spec]


def load_reward(
    spec: str, policy_tokenizer: Tokenizer, mesh: Mesh, what: str = "reward"
) -> rw_lib.Reward | None:
    """A `Reward` from a spec (see the module docstring); None for 'none'. Every reward model's
    tokenizer is checked against the policy's first (UserError on a mismatch)."""
    kind, paths = parse_reward_spec(spec)
    if kind == "none":
        return None
    if kind == "gold":
        return rw_lib.gold_reward(policy_tokenizer)
    # Tokenizers first: a mismatch must stop us before any weights are read.
    configs, toks = [], []
    for p in paths:
        d = _model_dir_of(Path(p))
        config, tok = pretrain_lib.load_model_files(d)
        rw_lib.check_same_tokenizer(policy_tokenizer, tok, f"{what} {p!r}")
        configs.append(config)
        toks.append(tok)
    if any(c != configs[0] for c in configs):
        raise UserError(f"{what} {spec!r}: the reward models have different shapes")
    members = [load_reward_model(p, mesh)[2] for p in paths]
    name = os.path.basename(os.path.normpath(paths[0])) if kind == "single" else spec
    if kind == "single":
        return rw_lib.model_reward(configs[0], members[0], name, toks[0])
    if kind == "warm":
        return rw_lib.warm_reward(configs[0], members, f"WARM M={len(members)}", toks[0])
    return rw_lib.ensemble_reward(configs[0], members, f"ENS M={len(members)}", toks[0])


# ----------------------------------------------------------------------------- shared setup


def _task_prompts(task: str, n: int, seed: int) -> list[str]:
    if task == "oracle":
        return oracle_task.sample_prompts(n, seed)
    raise UserError(f"task={task!r}; choose from {list(TASKS)}")


def _setup(init_from, reward: str, control: str, what: str):
    mesh = shd.make_mesh()
    config, tokenizer, params = sft_lib.load_model(init_from, mesh=mesh, what=f"{what}.init_from")
    r = load_reward(reward, tokenizer, mesh, what=f"{what}.reward")
    if r is None:
        raise UserError(f"{what}.reward='none': a policy needs a reward to optimise")
    c = load_reward(control, tokenizer, mesh, what=f"{what}.control")
    if c is not None and reward == control:
        c = None  # the control *is* the optimised reward: logged once, as `reward`
    return mesh, config, tokenizer, params, r, c


def _prompt_sets(tokenizer, task, num_prompts, prompt_seed, num_eval_prompts, eval_seed):
    train = _task_prompts(task, num_prompts, prompt_seed)
    held_out = _task_prompts(task, num_eval_prompts, eval_seed) if num_eval_prompts else []
    plen = reinforce.prompt_length(tokenizer, train, held_out)
    train_arrays = reinforce.encode_prompts(tokenizer, train, plen)
    eval_arrays = reinforce.encode_prompts(tokenizer, held_out, plen) if held_out else None
    return train_arrays, eval_arrays


def _evaluator(config, rl_cfg, r, c, tokenizer, eval_arrays, eval_samples, eval_seed):
    if eval_arrays is None:
        return None
    return reinforce.Evaluator(
        config,
        rl_cfg,
        r,
        c,
        eval_arrays,
        eos_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id,
        num_samples=eval_samples,
        seed=eval_seed,
    )


@dataclasses.dataclass
class RunSetup:
    """What an RL-style job needs from its settings: the SFT policy (on the mesh), the reward and
    control, the training prompts and the held-out evaluator (None without held-out prompts)."""

    mesh: Mesh
    config: tm.TransformerConfig
    tokenizer: Tokenizer
    sft_params: PyTree
    reward: rw_lib.Reward
    control: rw_lib.Reward | None
    train_prompts: dict[str, np.ndarray]
    evaluator: reinforce.Evaluator | None


def prepare_run(
    init_from,
    reward: str,
    control: str,
    rl_cfg: reinforce.RLConfig,
    *,
    task: str,
    num_prompts: int,
    prompt_seed: int,
    num_eval_prompts: int,
    eval_seed: int,
    eval_samples: int,
    what: str,
) -> RunSetup:
    """Loads the policy and rewards and builds the prompt sets and evaluator of `rl`/`warp`."""
    mesh, config, tokenizer, sft_params, r, c = _setup(init_from, reward, control, what)
    train_arrays, eval_arrays = _prompt_sets(
        tokenizer, task, num_prompts, prompt_seed, num_eval_prompts, eval_seed
    )
    evaluator = _evaluator(config, rl_cfg, r, c, tokenizer, eval_arrays, eval_samples, eval_seed)
    return RunSetup(mesh, config, tokenizer, sft_params, r, c, train_arrays, evaluator)


# ----------------------------------------------------------------------------- rl


def plot_rl(workdir: str | os.PathLike, out_png: str | os.PathLike) -> Path | None:
    """Reward and control reward against step, and against KL to SFT, for one RL run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    traj = warp_lib.trajectory(workdir)
    if not traj.get("train_step"):
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    steps = np.asarray(traj["train_step"])
    w = max(1, len(steps) // 20)
    for m in ("reward", "control_reward"):
        if f"train_{m}" in traj:
            y = warp_lib.moving_average(np.asarray(traj[f"train_{m}"]), w)
            axes[0].plot(steps[w - 1 :], y, label=f"{m} (train, smoothed)")
        if len(traj.get(f"eval_{m}", [])):
            axes[0].plot(traj["eval_step"], traj[f"eval_{m}"], "o", label=f"{m} (held out)")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("reward")
    for m in ("reward", "control_reward"):
        warp_lib.draw_trajectory(axes[1], traj, m, m, "o-")
    axes[1].set_xlabel("KL(π ‖ π_sft)")
    axes[1].set_ylabel("reward")
    rows = read_jsonl(Path(workdir) / "metrics.jsonl")
    for m in ("kl_sft", "kl_anchor", "entropy"):
        pts = [(r["step"], r[m]) for r in rows if m in r]
        if pts:
            axes[2].plot(*zip(*pts), label=m)
    axes[2].set_xlabel("step")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"REINFORCE: {Path(workdir).name}")
    fig.tight_layout()
    out = Path(out_png)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


@gin.configurable
def rl(
    workdir: str | os.PathLike,
    init_from: str | os.PathLike | None = None,
    reward: str = "gold",
    control: str = "gold",
    task: str = "oracle",
    num_prompts: int = 4096,
    prompt_seed: int = 2024,
    num_eval_prompts: int = 64,
    eval_seed: int = 4048,
    eval_samples: int = 2,
    batch_size: int = 16,
    data_seed: int = 0,
    progress: bool = True,
) -> dict:
    """KL-regularised REINFORCE of the SFT policy in `init_from` against `reward` (a spec),
    with `control` logged every step; settings from `rl_config` (gin) and `rl/train.*`.
    Writes the loop's outputs plus `rl.json` (held-out evaluation before/after) and `rl.png`."""
    rl_cfg = reinforce.rl_config()
    if task not in TASKS:
        raise UserError(f"rl.task={task!r}; choose from {list(TASKS)}")
    run = prepare_run(
        init_from,
        reward,
        control,
        rl_cfg,
        task=task,
        num_prompts=num_prompts,
        prompt_seed=prompt_seed,
        num_eval_prompts=num_eval_prompts,
        eval_seed=eval_seed,
        eval_samples=eval_samples,
        what="rl",
    )
    mesh, config, tokenizer, sft_params = run.mesh, run.config, run.tokenizer, run.sft_params
    r, c, train_arrays, evaluator = run.reward, run.control, run.train_prompts, run.evaluator
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    pretrain_lib.save_model_files(workdir, config, tokenizer)
    with gin.config_scope("rl"):
        result = reinforce.train_policy(
            workdir,
            config=config,
            init_params=sft_params,
            sft_params=sft_params,
            reward=r,
            control=c,
            rl=rl_cfg,
            prompts=train_arrays,
            batch_size=batch_size,
            eos_id=tokenizer.eos_id,
            pad_id=tokenizer.pad_id,
            evaluator=evaluator,
            data_seed=data_seed,
            mesh=mesh,
            meta={"init_from": str(Path(init_from).resolve()), "reward_spec": reward},
            progress=progress,
        )
    summary = {
        "init_from": str(Path(init_from).resolve()),
        "reward": r.name,
        "control": None if c is None else c.name,
        "steps": result.step,
        "rl": dataclasses.asdict(rl_cfg),
        "batch_size": batch_size,
    }
    if evaluator is not None:
        summary["initial"] = evaluator(sft_params, sft_params)
        summary["final"] = evaluator(result.params, sft_params)
    if jax.process_index() == 0:
        png = plot_rl(workdir, workdir / "rl.png")
        summary["figure"] = None if png is None else str(png)
        loop.save_json(workdir / RL_SUMMARY, summary)
    return summary


# ----------------------------------------------------------------------------- warp


@gin.configurable
def warp(
    workdir: str | os.PathLike,
    init_from: str | os.PathLike | None = None,
    reward: str = "gold",
    control: str = "gold",
    task: str = "oracle",
    num_prompts: int = 4096,
    prompt_seed: int = 2024,
    num_eval_prompts: int = 64,
    eval_seed: int = 4048,
    eval_samples: int = 2,
    batch_size: int = 16,
    data_seed: int = 0,
    compare_with: Sequence[str] = (),
    progress: bool = True,
) -> dict:
    """WARP from the SFT policy in `init_from`: `warp_config` (gin) iterations of M REINFORCE
    runs (`rl_config`, `warp/train.*`) + SLERP + LITI, then the Pareto front over η, with
    the REINFORCE trajectories of the runs and of the `rl` workdirs in `compare_with`."""
    rl_cfg = reinforce.rl_config()
    warp_cfg = warp_lib.warp_config()
    if task not in TASKS:
        raise UserError(f"warp.task={task!r}; choose from {list(TASKS)}")
    if rl_cfg.anchor != "ema":
        raise UserError("warp: rl_config.anchor must be 'ema' (WARP's EMA anchor)")
    for d in compare_with:
        if not (Path(d) / "metrics.jsonl").is_file():
            raise UserError(f"warp.compare_with: {d!r} is not a training workdir (no metrics)")
    run = prepare_run(
        init_from,
        reward,
        control,
        rl_cfg,
        task=task,
        num_prompts=num_prompts,
        prompt_seed=prompt_seed,
        num_eval_prompts=num_eval_prompts,
        eval_seed=eval_seed,
        eval_samples=eval_samples,
        what="warp",
    )
    mesh, config, tokenizer, sft_params = run.mesh, run.config, run.tokenizer, run.sft_params
    r, c, train_arrays, evaluator = run.reward, run.control, run.train_prompts, run.evaluator
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    pretrain_lib.save_model_files(workdir, config, tokenizer)
    with gin.config_scope("warp"):
        return warp_lib.run_warp(
            workdir,
            config=config,
            sft_params=sft_params,
            reward=r,
            control=c,
            rl=rl_cfg,
            warp=warp_cfg,
            prompts=train_arrays,
            batch_size=batch_size,
            eos_id=tokenizer.eos_id,
            pad_id=tokenizer.pad_id,
            evaluator=evaluator,
            data_seed=data_seed,
            compare_with={Path(d).name: d for d in compare_with},
            mesh=mesh,
            meta={"init_from": str(Path(init_from).resolve()), "reward_spec": reward},
            progress=progress,
        )


# ----------------------------------------------------------------------------- best-of-n


@gin.configurable
def bon(
    workdir: str | os.PathLike,
    init_from: str | os.PathLike | None = None,
    rewards: Sequence[str] = ("gold",),
    control: str = "gold",
    task: str = "oracle",
    num_prompts: int = 32,
    prompt_seed: int = 4048,
    n_max: int = 16,
    temperature: float = 1.0,
    max_new_tokens: int = 32,
    seed: int = 0,
    chunk_rows: int = 256,
    num_examples: int = 3,
) -> dict:
    """Best-of-n of the policy in `init_from` for n = 1, 2, 4, …, `n_max`, selected by each
    proxy of `rewards` (specs) from the same N_max draws per prompt, scored by `control`.
    Writes `bon.json` and `bon.png` (control reward against KL = log n - (n-1)/n)."""
    if task not in TASKS:
        raise UserError(f"bon.task={task!r}; choose from {list(TASKS)}")
    if n_max < 1 or num_prompts < 1:
        raise UserError(f"bon: n_max={n_max} and num_prompts={num_prompts} must be >= 1")
    if not rewards:
        raise UserError("bon.rewards is empty: give at least one proxy reward spec")
    mesh = shd.make_mesh()
    config, tokenizer, params = sft_lib.load_model(init_from, mesh=mesh, what="bon.init_from")
    proxies = {}
    for spec in rewards:
        rw = load_reward(spec, tokenizer, mesh, what="bon.rewards")
        if rw is None:
            raise UserError("bon.rewards: 'none' is not a proxy reward")
        proxies[rw.name if rw.name not in proxies else spec] = rw
    ctl = load_reward(control, tokenizer, mesh, what="bon.control")
    if ctl is None:
        raise UserError("bon.control='none': best-of-n reports a control reward")
    prompts = _task_prompts(task, num_prompts, prompt_seed)
    arrays = reinforce.encode_prompts(tokenizer, prompts)
    if arrays["tokens"].shape[1] + max_new_tokens > config.max_len:
        raise UserError(f"bon: prompts + {max_new_tokens} new tokens exceed max_len")
    cfg = sampling.SamplingConfig(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        eos_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id,
    )
    draws = bon_lib.draw_and_score(
        params, config, arrays, n_max, proxies, ctl, cfg, seed, chunk_rows, tokenizer
    )
    ns = bon_lib.powers_of_two(n_max)
    result = bon_lib.bon_curves(draws["proxy"], draws["control"], ns)
    texts = draws["texts"]
    examples = []
    for j in range(min(num_examples, num_prompts)):
        ex = {"prompt": texts["prompts"][j], "best_of_n_max": {}}
        for name, scores in draws["proxy"].items():
            i = int(np.argmax(scores[j]))
            ex["best_of_n_max"][name] = {
                "response": texts["responses"][j][i],
                "proxy": float(scores[j, i]),
                "control": float(draws["control"][j, i]),
            }
        examples.append(ex)
    summary = {
        "init_from": str(Path(init_from).resolve()),
        "control": ctl.name,
        "num_prompts": num_prompts,
        "n_max": n_max,
        "temperature": temperature,
        "mean_length": float(draws["lengths"].mean()),
        **result,
        "examples": examples,
    }
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        png = bon_lib.plot_bon(
            result, workdir / "bon.png", title=f"best-of-n, control = {ctl.name}"
        )
        summary["figure"] = str(png)
        loop.save_json(workdir / BON_SUMMARY, summary)
    return summary


# ----------------------------------------------------------------------------- CLI


def _command(parser: argparse.ArgumentParser) -> str:
    name = parser.prog.split()[-1]
    if name not in COMMANDS:
        raise ValueError(f"warm_jax.experiments.rl serves {COMMANDS}, not {parser.prog!r}")
    return name


def add_arguments(parser: argparse.ArgumentParser) -> None:
    command = _command(parser)
    add_gin_arguments(parser, workdir_default=f"runs/{command}")
    parser.set_defaults(command=command)
    parser.add_argument(
        "--init_from", default=None, help=f"the SFT workdir of the policy ({command}.init_from)"
    )
    reward_help = (
        "'gold' (the oracle's gold reward), a reward-model workdir, 'warm:P1,P2,...' (weight "
        "average) or 'ens:P1,P2,...' (prediction average)"
    )
    if command == "bon":
        parser.add_argument(
            "--reward",
            action="append",
            default=None,
            help=f"a proxy reward, repeatable (bon.rewards): {reward_help}",
        )
    else:
        parser.add_argument("--reward", default=None, help=f"the optimised reward: {reward_help}")
    parser.add_argument(
        "--control", default=None, help="the control reward logged (a reward spec, or 'none')"
    )
    parser.description = {
        "bon": (
            "Best-of-n of the SFT policy: N_max draws per prompt, scored by each proxy reward "
            "and the control reward; control reward of the proxy's best of n (unbiased "
            "estimator) against KL = log n - (n-1)/n. Default gin: experiments/bon_oracle."
        ),
        "rl": (
            "KL-regularised REINFORCE (RLOO or value baseline; SFT or EMA anchor) against a "
            "reward, control reward logged every step. Default gin: experiments/rl_oracle. "
            "Rerunning with the same --workdir resumes."
        ),
        "warp": (
            "WARP: iterations of M REINFORCE runs with EMA anchors, SLERP of their task "
            "vectors, LITI; then the Pareto front (1-η) θ_sft + η θ_slerp. Default gin: "
            "experiments/warp_oracle. Rerunning with the same --workdir resumes."
        ),
    }[command]


def run(args: argparse.Namespace) -> int:
    from warm_jax import config as cfg

    command = args.command
    cfg.parse(
        args.gin_file or [f"experiments/{command}_oracle"],
        args.gin_bindings,
        extra_modules=EXTRA_MODULES,
    )
    kwargs: dict[str, Any] = {}
    if args.init_from is not None:
        kwargs["init_from"] = args.init_from
    if args.control is not None:
        kwargs["control"] = args.control
    if args.reward is not None:
        kwargs["rewards" if command == "bon" else "reward"] = args.reward
    fn = {"bon": bon, "rl": rl, "warp": warp}[command]
    summary = fn(args.workdir, **kwargs)
    _print_summary(command, summary, args.workdir)
    return 0


def _fmt(e: dict | None) -> str:
    if not e:
        return "-"
    s = f"reward {e['reward']:+.3f}"
    if "control_reward" in e:
        s += f"  control {e['control_reward']:+.3f}"
    return s + f"  KL(sft) {e['kl_sft']:.3f}  length {e['response_length']:.1f}"


def _print_summary(command: str, summary: dict, workdir) -> None:
    if command == "bon":
        for name, c in summary["curves"].items():
            pts = "  ".join(f"n={n}: {v:+.3f}" for n, v in zip(summary["n"], c["control"]))
            print(f"{name:>14}  control reward  {pts}")
        print(f"wrote {Path(workdir) / BON_SUMMARY} and {summary.get('figure')}")
    elif command == "rl":
        print(f"trained {summary['steps']} steps in {workdir}")
        print(f"initial  {_fmt(summary.get('initial'))}")
        print(f"final    {_fmt(summary.get('final'))}")
    else:
        if "sft" in summary:
            print(f"sft              {_fmt(summary['sft'])}")
        for it in summary["iterations"]:
            i = it["iteration"]
            for m, e in enumerate(it.get("run_evals", [])):
                print(f"iter {i} run {m}     {_fmt(e)}")
            print(f"iter {i} slerp      {_fmt(it.get('slerp_eval'))}")
            print(f"iter {i} liti       {_fmt(it.get('liti_eval'))}")
        print(f"wrote {Path(workdir) / warp_lib.SUMMARY_FILE} and {summary.get('figure')}")
