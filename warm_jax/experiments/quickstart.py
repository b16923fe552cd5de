"""`warm-jax quickstart`: the end-to-end default job on the built-in oracle task.

Stages are cached in the workdir: a rerun skips what is complete and resumes what was
interrupted; `--fresh` starts over. Today's chain: pretrain the tiny LM on the oracle corpus,
then sample responses to held-out prompts and score them with the gold reward. Each stage writes
its outputs (checkpoints, metrics, PNG) in its own subdirectory; `summary.json` collects them.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import gin
import jax
import numpy as np

from warm_jax.cli import add_gin_arguments
from warm_jax.data import oracle_task
from warm_jax.experiments import pretrain as pretrain_lib
from warm_jax.models import transformer as tm
from warm_jax.policy import sampling
from warm_jax.training import checkpoints, loop
from warm_jax.training.metrics import read_jsonl


def _stage_done(workdir: Path, num_steps: int) -> bool:
    steps = (
        checkpoints.TrainCheckpoints(workdir, every=1).latest_step() if workdir.exists() else None
    )
    return steps is not None and steps >= num_steps


@gin.configurable
def quickstart(
    workdir: str,
    num_prompts: int = 64,
    prompt_seed: int = 12345,
    max_new_tokens: int = 32,
    temperature: float = 0.9,
    seed: int = 0,
) -> dict:
    """Runs the stages and returns (and writes) the summary."""
    root = Path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    summary: dict = {"workdir": str(root.resolve()), "devices": [str(d) for d in jax.devices()]}

    # Stage 1: pretraining (resumes if interrupted; skipped when complete).
    pt_dir = root / "pretrain"
    with gin.config_scope("pretrain"):
        target_steps = gin.query_parameter("pretrain/train.num_steps")
    t0 = time.time()
    if _stage_done(pt_dir, target_steps):
        print(f"[1/2] pretrain: complete in {pt_dir}, skipped")
    else:
        print(f"[1/2] pretrain: {target_steps} steps -> {pt_dir}")
        pretrain_lib.pretrain(pt_dir)
    history = read_jsonl(pt_dir / "metrics.jsonl")
    evals = [r for r in history if "eval/loss" in r]
    config, tokenizer = pretrain_lib.load_model_files(pt_dir)
    params = checkpoints.load_params(pt_dir)
    summary["pretrain"] = {
        "steps": target_steps,
        "parameters": tm.count_params(params),
        "train_loss": [r for r in history if "loss" in r][-1]["loss"],
        "validation_loss": evals[-1]["eval/loss"] if evals else None,
        "seconds": round(time.time() - t0, 1),
        "loss_curve": str((pt_dir / "loss.png").resolve()),
    }

    # Stage 2: what the pretrained LM says, and what the gold reward thinks of it.
    print(f"[2/2] sample {num_prompts} responses at temperature {temperature} and score them")
    prompts = oracle_task.sample_prompts(num_prompts, prompt_seed)
    batch = sampling.left_pad(
        [[tokenizer.bos_id, *tokenizer.encode(p)] for p in prompts], pad_id=tokenizer.pad_id
    )
    cfg = sampling.SamplingConfig(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        eos_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id,
    )
    out = sampling.sample(params, config, batch, jax.random.PRNGKey(seed), cfg)
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    responses = [
        tokenizer.decode([t for t in row[:n] if t != tokenizer.eos_id])
        for row, n in zip(tokens, lengths)
    ]
    gold = oracle_task.gold_rewards(prompts, responses)
    grammatical = np.mean([oracle_task.is_grammatical(r) for r in responses])
    sft_pairs = oracle_task.sample_sft_pairs(num_prompts, prompt_seed)
    corpus_gold = oracle_task.gold_rewards([p for p, _ in sft_pairs], [r for _, r in sft_pairs])
    summary["samples"] = {
        "gold_reward_mean": float(gold.mean()),
        "gold_reward_std": float(gold.std()),
        "grammatical_fraction": float(grammatical),
        "corpus_gold_reward_mean": float(corpus_gold.mean()),
        "mean_length": float(lengths.mean()),
        "examples": [
            {"prompt": p, "response": r, "gold": round(float(g), 3)}
            for p, r, g in list(zip(prompts, responses, gold))[:8]
        ],
    }
    loop.save_json(root / "summary.json", summary)
    shutil.copyfile(pt_dir / "operative_config.gin", root / "operative_config.gin")
    return summary


def _print_summary(s: dict) -> None:
    pt, sm = s["pretrain"], s["samples"]
    print()
    print(f"{'stage':<12}{'metric':<34}{'value':>12}")
    print(f"{'pretrain':<12}{'parameters':<34}{pt['parameters']:>12,}")
    print(f"{'':<12}{'train loss (last window)':<34}{pt['train_loss']:>12.4f}")
    if pt["validation_loss"] is not None:
        print(f"{'':<12}{'validation loss':<34}{pt['validation_loss']:>12.4f}")
    print(f"{'samples':<12}{'grammatical fraction':<34}{sm['grammatical_fraction']:>12.3f}")
    print(
        f"{'':<12}{'gold reward mean ± std':<34}{sm['gold_reward_mean']:>+7.3f} ± {sm['gold_reward_std']:.2f}"
    )
    print(f"{'':<12}{'gold reward of corpus responses':<34}{sm['corpus_gold_reward_mean']:>+12.3f}")
    print()
    for ex in sm["examples"][:4]:
        print(f"  {ex['prompt']}\n    -> {ex['response']}   [gold {ex['gold']:+.2f}]")
    print(f"\nsummary: {s['workdir']}/summary.json   loss curve: {pt['loss_curve']}")


def add_arguments(parser) -> None:
    add_gin_arguments(parser, workdir_default="runs/quickstart")
    parser.add_argument(
        "--fresh", action="store_true", help="delete the workdir's stages and start over"
    )
    parser.description = (
        "Run the default end-to-end job on the built-in oracle task (no network, no data files): "
        "pretrain the tiny LM, then sample and score responses with the gold reward. Stages are "
        "cached in --workdir; rerunning skips finished stages."
    )


def run(args) -> int:
    from warm_jax import config as cfg

    cfg.parse(["experiments/quickstart", *args.gin_file], args.gin_bindings)
    if args.fresh and Path(args.workdir).exists():
        shutil.rmtree(args.workdir)
    _print_summary(quickstart(args.workdir))
    return 0
