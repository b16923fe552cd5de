"""`warm-jax quickstart`: WARM and WARP end to end on the built-in oracle task, on a CPU.

The chain (each stage in its own subdirectory of the workdir, with its checkpoints, metrics,
figures and JSON; `summary.json`, `summary.png` and the operative config at the top):

  1. `pretrain/`  the tiny LM on the oracle corpus (generated here: no network, no files);
  2. `sft/`       supervised fine-tuning on demonstrations;
  3. `rm/`        M reward models from the SFT backbone on preference pairs whose responses the
                  SFT policy samples, labelled by a Bradley–Terry draw on the gold reward, a
                  quarter of the labels swapped; then their WARM average;
  4. `rm/eval/`   WARM vs ENS vs the individual members (clean / corrupted training labels, ID,
                  OOD), with interpolation curves;
  5. `bon/`       best-of-n of the SFT policy selected by one member, ENS and WARM, scored gold;
  6. `rl_single/`, `rl_warm/`  REINFORCE at a small KL coefficient against one member and
                  against WARM, the gold reward measured as the control (reward hacking);
  7. `win_rate.json`  the WARM policy against the single-RM policy, judged by the gold reward;
  8. `warp/`      WARP with M policies and I iterations against the same single reward model,
                  and its Pareto front beside the single-RM REINFORCE run.

Stages are cached: a rerun skips finished ones and resumes an interrupted one where its last
checkpoint left it; `--fresh` starts over. Sizes come from `experiments/quickstart.gin`.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import gin
import jax
import numpy as np

from warm_jax.cli import add_gin_arguments
from warm_jax.data import oracle_task
from warm_jax.experiments import pretrain as pretrain_lib
from warm_jax.experiments import reward_models as rm_lib
from warm_jax.experiments import rl as rl_lib
from warm_jax.experiments import sft as sft_lib
from warm_jax.models import transformer as tm
from warm_jax.policy import reinforce, sampling
from warm_jax.policy import warp as warp_lib
from warm_jax.policy import win_rate as wr
from warm_jax.training import checkpoints, loop
from warm_jax.training.metrics import read_jsonl

STAGES = ("pretrain", "sft", "rms", "eval_rm", "bon", "rl", "win_rate", "warp")
SUMMARY_FILE = "summary.json"
WIN_RATE_FILE = "win_rate.json"


def _pretrain_done(workdir: Path) -> bool:
    with gin.config_scope("pretrain"):
        target = gin.query_parameter("pretrain/train.num_steps")
    if not workdir.exists():
        return False
    step = checkpoints.TrainCheckpoints(workdir, every=1).latest_step()
    return step is not None and step >= target


class _Stages:
    """Runs each stage unless its marker file exists, printing one line per stage and keeping
    its wall and CPU seconds (CPU over all threads: on a shared machine, the less noisy one)."""

    def __init__(self, only: Sequence[str]):
        self.only, self.seconds, self.cpu_seconds = set(only), {}, {}

    def __call__(self, i: int, name: str, done: Callable[[], bool], what: str, fn) -> None:
        tag = f"[{i}/{len(STAGES)}] {name}"
        if name not in self.only:
            print(f"{tag}: not requested, skipped")
            return
        if done():
            print(f"{tag}: complete, skipped")
            return
        print(f"{tag}: {what}", flush=True)
        t0, c0 = time.time(), time.process_time()
        fn()
        self.seconds[name] = round(time.time() - t0, 1)
        self.cpu_seconds[name] = round(time.process_time() - c0, 1)


def explained(prompt: str, response: str) -> dict:
    """A response with its gold reward and the penalties that make it up."""
    e = oracle_task.explain_gold(prompt, response)
    parts = {k: round(float(e[k]), 3) for k in e if k.endswith("_penalty") and e[k]}
    return {
        "response": response,
        "gold": round(float(e["gold"]), 3),
        "sentiment": round(float(e["sentiment"]), 3),
        **parts,
    }


def policy_gold_scores(
    workdir: Path, prompts: Sequence[str], samples: int, cfg: sampling.SamplingConfig, seed: int
) -> tuple[np.ndarray, list[str]]:
    """Gold rewards [P, samples] of the final policy in an RL workdir, and its first responses."""
    config, tokenizer, params = sft_lib.load_model(workdir, what="win rate policy")
    cfg = dataclasses.replace(cfg, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    repeated = [p for p in prompts for _ in range(samples)]
    out = sampling.sample_texts(params, config, tokenizer, repeated, cfg, seed)
    gold = oracle_task.gold_rewards(repeated, out.responses)
    return gold.reshape(len(prompts), samples), out.responses[::samples]


@gin.configurable
def quickstart(
    workdir: str,
    rl_member: int = 0,
    win_rate_prompts: int = 128,
    win_rate_samples: int = 4,
    win_rate_seed: int = 777,
    num_examples: int = 6,
    stages: Sequence[str] = STAGES,
    progress: bool = True,
) -> dict:
    """Runs the chain of the module docstring and returns (and writes) the summary.

    rl_member: which reward model the single-RM policy optimises.
    win_rate_*: held-out prompts (seeded apart from every training set), responses per prompt
    and sampling seed of the final comparison. `stages`: a subset of STAGES to run (the rest
    must be complete already for later stages to read them)."""
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ValueError(f"quickstart.stages: unknown {sorted(unknown)}; choose from {STAGES}")
    root = Path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    d = {
        name: root / name
        for name in ("pretrain", "sft", "rm", "bon", "rl_single", "rl_warm", "warp")
    }
    run = _Stages(stages)

    run(
        1,
        "pretrain",
        lambda: _pretrain_done(d["pretrain"]),
        "tiny LM on the oracle corpus",
        lambda: pretrain_lib.pretrain(d["pretrain"], progress=progress),
    )
    run(
        2,
        "sft",
        lambda: sft_lib.read_eval(d["sft"]) is not None,
        "fine-tune on demonstrations",
        lambda: sft_lib.sft(d["sft"], init_from=d["pretrain"], progress=progress),
    )
    warm_dir = d["rm"] / rm_lib.WARM_DIR
    run(
        3,
        "rms",
        lambda: (warm_dir / checkpoints.META_FILE).is_file(),
        "reward models on SFT-policy pairs (corrupted labels), then their WARM average",
        lambda: rm_lib.train_rms(d["rm"], init_from=d["sft"], progress=progress),
    )
    eval_file = d["rm"] / rm_lib.EVAL_DIR / "results.json"
    run(
        4,
        "eval_rm",
        eval_file.is_file,
        "WARM vs ENS vs individual reward models",
        lambda: rm_lib.eval_rm(d["rm"]),
    )

    members = sorted(str(p) for p in (d["rm"] / rm_lib.MEMBERS_DIR).glob("m*"))
    single = str(d["rm"] / rm_lib.MEMBERS_DIR / f"m{rl_member}")
    proxies = [single, f"ens:{','.join(members)}", str(warm_dir)]
    run(
        5,
        "bon",
        (d["bon"] / rl_lib.BON_SUMMARY).is_file,
        "best-of-n of the SFT policy",
        lambda: rl_lib.bon(d["bon"], init_from=d["sft"], rewards=proxies),
    )

    def rl_pair() -> None:
        with gin.config_scope("rl"):
            for key, reward in (("rl_single", single), ("rl_warm", str(warm_dir))):
                if not (d[key] / rl_lib.RL_SUMMARY).is_file():
                    rl_lib.rl(d[key], init_from=d["sft"], reward=reward, progress=progress)

    run(
        6,
        "rl",
        lambda: all((d[k] / rl_lib.RL_SUMMARY).is_file() for k in ("rl_single", "rl_warm")),
        f"REINFORCE against member m{rl_member} and against WARM",
        rl_pair,
    )

    def win_rate_stage() -> None:
        with gin.config_scope("rl"):
            rl_cfg = reinforce.rl_config()
        cfg = sampling.SamplingConfig(
            max_new_tokens=rl_cfg.max_new_tokens, temperature=rl_cfg.temperature, eos_id=None
        )
        prompts = oracle_task.sample_prompts(win_rate_prompts, win_rate_seed)
        gold = {}
        examples = {}
        for key in ("rl_warm", "rl_single", "sft"):
            gold[key], examples[key] = policy_gold_scores(
                d[key], prompts, win_rate_samples, cfg, win_rate_seed
            )
        result = {
            "judge": "gold",
            "prompts_seed": win_rate_seed,
            "samples_per_prompt": win_rate_samples,
            "warm_vs_single": wr.win_rate(gold["rl_warm"], gold["rl_single"]),
            "warm_vs_sft": wr.win_rate(gold["rl_warm"], gold["sft"]),
            "single_vs_sft": wr.win_rate(gold["rl_single"], gold["sft"]),
            "gold_mean": {k: float(v.mean()) for k, v in gold.items()},
            "examples": [
                {"prompt": p, **{k: explained(p, examples[k][i]) for k in examples}}
                for i, p in enumerate(prompts[:num_examples])
            ],
        }
        loop.save_json(root / WIN_RATE_FILE, result)

    run(
        7,
        "win_rate",
        (root / WIN_RATE_FILE).is_file,
        "WARM policy vs single-RM policy, judged by the gold reward",
        win_rate_stage,
    )

    def warp_stage() -> None:
        with gin.config_scope("warp"):
            rl_lib.warp(
                d["warp"],
                init_from=d["sft"],
                reward=single,
                compare_with=[str(d["rl_single"])],
                progress=progress,
            )

    run(
        8,
        "warp",
        lambda: warp_lib.read_summary(d["warp"]) is not None,
        f"WARP (EMA anchors, SLERP, LITI) against member m{rl_member}",
        warp_stage,
    )

    summary = collect(root, d)
    # A rerun skips finished stages: keep the times measured when they ran.
    previous = _read(root / SUMMARY_FILE) or {}
    summary["seconds"] = {**previous.get("seconds", {}), **run.seconds}
    summary["cpu_seconds"] = {**previous.get("cpu_seconds", {}), **run.cpu_seconds}
    if jax.process_index() == 0:
        summary["figure"] = str(plot_summary(summary, d, root / "summary.png"))
        loop.save_json(root / SUMMARY_FILE, summary)
        shutil.copyfile(d["pretrain"] / "operative_config.gin", root / "operative_config.gin")
        (root / "quickstart_config.gin").write_text(gin.config_str())
    return summary


def _read(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def collect(root: Path, d: dict[str, Path]) -> dict:
    """The headline numbers of every finished stage, from the files the stages wrote."""
    s: dict[str, Any] = {"workdir": str(root.resolve()), "devices": [str(x) for x in jax.devices()]}
    if (d["pretrain"] / "metrics.jsonl").is_file():
        hist = read_jsonl(d["pretrain"] / "metrics.jsonl")
        evals = [r["eval/loss"] for r in hist if "eval/loss" in r]
        config, _ = pretrain_lib.load_model_files(d["pretrain"])
        shapes = jax.eval_shape(lambda: tm.init_params(config, jax.random.PRNGKey(0)))
        s["pretrain"] = {
            "parameters": tm.count_params(shapes),
            "validation_loss": evals[-1] if evals else None,
        }
    sft_eval = sft_lib.read_eval(d["sft"])
    if sft_eval:
        s["sft"] = {k: sft_eval[k]["gold_reward_mean"] for k in ("initial", "final")}
        s["sft"]["grammatical"] = sft_eval["final"]["grammatical_fraction"]
    rm_eval = _read(d["rm"] / rm_lib.EVAL_DIR / "results.json")
    if rm_eval:
        s["reward_models"] = {
            sub: {
                "ind_mean": t["ind"]["mean"],
                "ind_std": t["ind"]["std"],
                "ens": t["ens"],
                "warm": t["warm"],
                "n": t["n"],
            }
            for sub, t in rm_eval["table"].items()
        }
    bon = _read(d["bon"] / rl_lib.BON_SUMMARY)
    if bon:
        s["bon"] = {
            "n": bon["n"],
            "kl": bon["kl"],
            "control": {k: v["control"] for k, v in bon["curves"].items()},
        }
    for key in ("rl_single", "rl_warm"):
        r = _read(d[key] / rl_lib.RL_SUMMARY)
        if r:
            traj = warp_lib.trajectory(d[key])
            init = r["initial"]
            # The held-out curves start from the SFT policy's evaluation (step 0).
            s[key] = {
                "reward": r["reward"],
                "initial": {k: init[k] for k in ("reward", "control_reward", "kl_sft")},
                "final": {k: r["final"][k] for k in ("reward", "control_reward", "kl_sft")},
                "eval_steps": [0, *traj.get("eval_step", [])],
                "eval_control": [init["control_reward"], *traj.get("eval_control_reward", [])],
                "eval_proxy": [init["reward"], *traj.get("eval_reward", [])],
                "eval_kl": [init["kl_sft"], *traj.get("eval_kl_sft", [])],
            }
            peak = int(np.argmax(s[key]["eval_control"]))
            s[key]["peak_control"] = {
                "step": s[key]["eval_steps"][peak],
                "control": s[key]["eval_control"][peak],
            }
    win = _read(root / WIN_RATE_FILE)
    if win:
        s["win_rate"] = {k: win[k] for k in ("warm_vs_single", "warm_vs_sft", "single_vs_sft")}
        s["win_rate"]["gold_mean"] = win["gold_mean"]
        s["examples"] = win["examples"]
    w = warp_lib.read_summary(d["warp"])
    if w:
        s["warp"] = {
            "iterations": [
                {
                    "iteration": it["iteration"],
                    "front": [
                        {k: p[k] for k in ("eta", "kl_sft", "reward", "control_reward")}
                        for p in it.get("front", [])
                    ],
                    "task_vector_cosine": it["task_vector_cosine"],
                }
                for it in w["iterations"]
            ],
        }
    return s


def plot_summary(s: dict, d: dict[str, Path], out_png: Path) -> Path:
    """One page: reward-model accuracies, best-of-n, RL gold and proxy reward vs step, WARP."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(18, 9))
    ax = axes[0, 0]
    if "reward_models" in s:
        splits = list(s["reward_models"])
        x = np.arange(len(splits))
        for j, (k, label) in enumerate(
            (("ind_mean", "individual (mean)"), ("ens", "ENS"), ("warm", "WARM"))
        ):
            vals = [s["reward_models"][sp].get(k, np.nan) for sp in splits]
            ax.bar(x + (j - 1) * 0.27, vals, 0.27, label=label)
        ax.set_xticks(x, splits, rotation=20, fontsize=8)
        ax.set_ylabel("pairwise accuracy")
        ax.set_ylim(0, 1)
        ax.set_title("reward models (training labels 25 % corrupted)")
    ax = axes[0, 1]
    if "bon" in s:
        for name, ys in s["bon"]["control"].items():
            ax.plot(s["bon"]["kl"], ys, "o-", label=name)
        ax.set_xlabel("KL = log n - (n-1)/n")
        ax.set_ylabel("gold reward")
        ax.set_title("best-of-n of the SFT policy")
    for col, (metric, ylabel) in enumerate(
        (
            ("eval_control", "gold reward"),
            ("eval_proxy", "proxy reward (each run's own)"),
            ("eval_kl", "KL(π ‖ π_sft)"),
        )
    ):
        ax = axes[1, col]
        for key, label in (("rl_single", "RL vs one RM"), ("rl_warm", "RL vs WARM")):
            r = s.get(key)
            if r and r.get("eval_steps") and r.get(metric):
                ax.plot(r["eval_steps"], r[metric], "o-", label=label)
        ax.set_xlabel("REINFORCE step (held-out prompts)")
        ax.set_ylabel(ylabel)
    ax = axes[0, 2]
    if "warp" in s:
        for it in s["warp"]["iterations"]:
            f = it["front"]
            ax.plot(
                [p["kl_sft"] for p in f],
                [p["control_reward"] for p in f],
                "o-",
                label=f"WARP front, iteration {it['iteration']}",
            )
        for key, label in (("rl_single", "REINFORCE (SFT anchor)"),):
            traj = warp_lib.trajectory(d[key])
            warp_lib.draw_trajectory(ax, traj, "control_reward", label, ":")
        ax.set_xlabel("KL(π ‖ π_sft)")
        ax.set_ylabel("gold reward")
        ax.set_title("WARP: (1-η) θ_sft + η θ_slerp")
    for a in axes.flat:
        a.grid(alpha=0.3)
        if a.get_legend_handles_labels()[0]:  # a stage not run yet leaves its panel empty
            a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def format_summary(s: dict) -> str:
    """The short table printed at the end."""
    lines = []

    def row(stage: str, metric: str, value: str) -> None:
        lines.append(f"{stage:<10}{metric:<50}{value}")

    if "pretrain" in s:
        row("pretrain", "parameters", f"{s['pretrain']['parameters']:,}")
        if s["pretrain"]["validation_loss"] is not None:
            row("", "validation loss", f"{s['pretrain']['validation_loss']:.4f}")
    if "sft" in s:
        row(
            "sft",
            "gold reward of samples, before -> after",
            f"{s['sft']['initial']:+.3f} -> {s['sft']['final']:+.3f}",
        )
    if "reward_models" in s:
        row("rms", "accuracy: individual (mean ± std) / ENS / WARM", "")
        for split, a in s["reward_models"].items():
            row(
                "",
                f"  {split}",
                f"{a['ind_mean']:.3f} ± {a.get('ind_std', 0):.3f} / {a.get('ens', np.nan):.3f} / "
                f"{a.get('warm', np.nan):.3f}",
            )
    if "bon" in s:
        n = s["bon"]["n"][-1]
        row(
            "bon",
            f"gold reward of best-of-{n}",
            "  ".join(f"{k}: {v[-1]:+.3f}" for k, v in s["bon"]["control"].items()),
        )
    for key, label in (("rl_single", "RL vs one RM"), ("rl_warm", "RL vs WARM")):
        if key in s:
            r = s[key]
            row(
                "rl" if key == "rl_single" else "",
                f"{label}: gold start -> peak@step -> end",
                f"{r['initial']['control_reward']:+.3f} -> "
                f"{r['peak_control']['control']:+.3f}@{r['peak_control']['step']} -> "
                f"{r['final']['control_reward']:+.3f}   (proxy {r['initial']['reward']:+.2f} -> "
                f"{r['final']['reward']:+.2f}, KL {r['final']['kl_sft']:.2f})",
            )
    if "win_rate" in s:
        w = s["win_rate"]["warm_vs_single"]
        row(
            "win rate",
            "WARM policy vs one-RM policy (gold judge)",
            f"{w['win_rate']:.3f}  [95 % CI {w['ci_low']:.3f}, {w['ci_high']:.3f}], "
            f"{w['prompts']} prompts",
        )
    if "warp" in s:
        for it in s["warp"]["iterations"]:
            best = max(it["front"], key=lambda p: p["control_reward"])
            row(
                "warp" if it["iteration"] == 1 else "",
                f"iteration {it['iteration']}: best gold on the front (η, KL)",
                f"{best['control_reward']:+.3f} (η={best['eta']:g}, KL {best['kl_sft']:.2f})",
            )
    for ex in s.get("examples", [])[:3]:
        lines.append(f"\n  prompt: {ex['prompt']}")
        for key, label in (("sft", "SFT"), ("rl_single", "one RM"), ("rl_warm", "WARM")):
            e = ex[key]
            why = ", ".join(
                f"{k.replace('_penalty', '')} -{v:.2f}"
                for k, v in e.items()
                if k.endswith("_penalty")
            )
            lines.append(f"    {label:>7}: {e['response'] or '(empty response)'}")
            lines.append(
                f"    {'':>7}  gold {e['gold']:+.2f} (sentiment {e['sentiment']:+.2f}"
                f"{'; ' + why if why else ''})"
            )
    return "\n".join(lines)


# What `--seed S` changes: every source of training randomness (initialisation, data order,
# dropout, sampling during training, the members' drawn learning rates and dropouts, which labels
# are swapped). The task itself (corpus, demonstrations, prompts, held-out and OOD sets) stays
# fixed, so runs with different seeds are comparable; the preference pairs' responses, sampled
# from each run's own SFT policy, follow that policy.
SEED_BINDINGS = (
    "train.seed",
    "pretrain.data_seed",
    "sft.data_seed",
    "member_specs.seed",
    "pair_data.corruption_seed",
    "rl.data_seed",
    "warp.data_seed",
)


def seed_bindings(seed: int) -> list[str]:
    return [f"{name} = {int(seed)}" for name in SEED_BINDINGS]


def add_arguments(parser) -> None:
    add_gin_arguments(parser, workdir_default="runs/quickstart")
    parser.add_argument(
        "--fresh", action="store_true", help="delete the workdir's stages and start over"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed of all training randomness (init, data order, dropout, sampling, member "
        "settings, swapped labels); the task's data stays fixed. Binds "
        + ", ".join(SEED_BINDINGS)
        + " (default: their gin values, all 0)",
    )
    parser.add_argument(
        "--no_compilation_cache",
        action="store_true",
        help="do not use JAX's persistent compilation cache (~/.cache/warm_jax), which lets "
        "later stages and reruns reuse compiled programs",
    )
    parser.description = (
        "Run the default end-to-end job on the built-in oracle task (no network, no data files): "
        "pretrain -> SFT -> M reward models on corrupted preferences -> WARM/ENS/individual "
        "evaluation -> best-of-n -> RL against one RM and against WARM (gold reward measured) "
        "-> win rate -> WARP with its Pareto front. Stages are cached in --workdir; rerunning "
        "skips finished stages. Sizes: experiments/quickstart.gin, overridable with --gin.*."
    )


def run(args) -> int:
    from warm_jax import config as cfg
    from warm_jax.merging_checkpoints import enable_compilation_cache

    seeds = [] if args.seed is None else seed_bindings(args.seed)
    # Explicit --gin.* overrides come last, so they win over --seed.
    cfg.parse(["experiments/quickstart", *args.gin_file], [*seeds, *args.gin_bindings])
    if not args.no_compilation_cache:
        enable_compilation_cache()
    if args.fresh and Path(args.workdir).exists():
        shutil.rmtree(args.workdir)
    t0 = time.time()
    s = quickstart(args.workdir)
    print()
    print(format_summary(s))
    print(f"\nsummary: {s['workdir']}/{SUMMARY_FILE}   figure: {s.get('figure')}")
    print(f"this invocation: {time.time() - t0:.0f} s wall")
    return 0
