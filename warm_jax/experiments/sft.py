"""`warm-jax sft`: supervised fine-tuning of a pretrained LM on (prompt, response) pairs.

The generic training loop with the next-token loss restricted to the response: each pair is
encoded as `<bos> prompt response <eos>` and only the response tokens and the `<eos>` are
targets, so the model learns to answer and to stop, not to write prompts.

Every `keep_every` steps a checkpoint is kept for good: WARM's Baklava initialises reward models
from several checkpoints of one SFT run (`sft_checkpoint_steps`, `load_model`). The SFT workdir
holds `model.json` and `tokenizer/` like a pretrain one, so anything that loads a pretrained
model (another SFT, a reward model, a policy) loads it the same way.

Validation: the mean response NLL on held-out pairs (during training), and before and after
training, the gold reward of responses sampled for held-out prompts (`sft_eval.json`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
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
from warm_jax.models import transformer as tm
from warm_jax.policy import sampling
from warm_jax.training import checkpoints, lm, loop

PyTree = Any
EVAL_FILE = "sft_eval.json"
TASKS = ("oracle",)


# ----------------------------------------------------------------------------- data


def load_pairs(task: str, n: int, seed: int) -> list[tuple[str, str]]:
    """`n` (prompt, response) demonstrations of `task`, a deterministic function of `seed`."""
    if task == "oracle":
        return oracle_task.sample_sft_pairs(n, seed)
    raise UserError(f"sft.task={task!r}; choose from {list(TASKS)}")


def split_ids(tokenizer: Tokenizer, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """Prompt and response token ids, the response tokenised as it continues the prompt.

    Pretraining saw `prompt + " " + response` as one text; with byte-level BPE a response's first
    word is then a space-prefixed token that `encode(response)` alone would not produce. So the
    joint text is encoded and cut after the prompt's tokens (exact for word-level and byte-level
    BPE); only when the prompt's tokens are not a prefix of it is the response encoded alone.
    """
    p = tokenizer.encode(prompt)
    joint = tokenizer.encode(f"{prompt} {response}")
    if joint[: len(p)] == p:
        return p, joint[len(p) :]
    return p, tokenizer.encode(response)


def encode_sft_pairs(
    pairs: Sequence[tuple[str, str]], tokenizer: Tokenizer, seq_len: int
) -> tuple[dict[str, np.ndarray], int]:
    """Right-padded `[bos] + prompt + response + [eos]` rows and the number of pairs dropped.

    Arrays [n, seq_len] int32: `tokens`; `segment_ids` 1 on real tokens, 0 on padding;
    `positions` 0, 1, ...; `loss_mask` 1 on the response tokens and the eos (the targets).
    A pair that does not fit is dropped rather than cut: a cut response would teach the model
    to stop mid-sentence, and a cut prompt to answer questions it was not asked.
    """
    rows, masks = [], []
    for prompt, response in pairs:
        p, r = split_ids(tokenizer, prompt, response)
        tokens = [tokenizer.bos_id, *p, *r, tokenizer.eos_id]
        if len(tokens) > seq_len:
            continue
        rows.append(tokens)
        masks.append([0] * (1 + len(p)) + [1] * (len(r) + 1))
    n = len(rows)
    out = {
        "tokens": np.full((n, seq_len), tokenizer.pad_id, np.int32),
        "segment_ids": np.zeros((n, seq_len), np.int32),
        "positions": np.zeros((n, seq_len), np.int32),
        "loss_mask": np.zeros((n, seq_len), np.int32),
    }
    for i, (tokens, mask) in enumerate(zip(rows, masks)):
        k = len(tokens)
        out["tokens"][i, :k] = tokens
        out["segment_ids"][i, :k] = 1
        out["positions"][i, :k] = np.arange(k)
        out["loss_mask"][i, :k] = mask
    return out, len(pairs) - n


# ----------------------------------------------------------------------------- models


def _check_model_dir(path: str | os.PathLike | None, what: str) -> Path:
    if not path:
        raise UserError(f"{what} is required: a pretrain (or SFT) workdir")
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"{what}={str(p)!r} does not exist or is not a directory")
    if not (p / pretrain_lib.MODEL_FILE).is_file():
        raise UserError(
            f"{what}={str(p)!r} has no {pretrain_lib.MODEL_FILE}: not a warm_jax model directory "
            "(expected the workdir of `warm-jax pretrain` or `warm-jax sft`)"
        )
    return p


def abstract_params(config: tm.TransformerConfig, mesh: Mesh, rules: Any = None) -> PyTree:
    """The model's parameter tree as ShapeDtypeStructs carrying their shardings on `mesh`."""
    shapes = jax.eval_shape(lambda: tm.init_params(config, jax.random.PRNGKey(0)))
    shardings = shd.tree_shardings(
        tm.param_logical_axes(config), shapes, mesh, rules or shd.logical_rules()
    )
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
    )


def load_model(
    model_dir: str | os.PathLike,
    step: int | None = None,
    mesh: Mesh | None = None,
    what: str = "model directory",
) -> tuple[tm.TransformerConfig, Tokenizer, PyTree]:
    """Config, tokenizer and parameters of a pretrain/SFT workdir, placed with their shardings.

    `step=None` loads the latest checkpoint; else `checkpoints/<step>` (see
    `sft_checkpoint_steps`)."""
    wd = _check_model_dir(model_dir, what)
    config, tokenizer = pretrain_lib.load_model_files(wd)
    path = wd if step is None else wd / checkpoints.CHECKPOINTS_DIR / str(step)
    if step is not None and not path.is_dir():
        raise UserError(
            f"{wd} has no checkpoint at step {step}; it has steps {sft_checkpoint_steps(wd)}"
        )
    params = checkpoints.load_params(path, target=abstract_params(config, mesh or shd.make_mesh()))
    return config, tokenizer, params


def sft_checkpoint_steps(workdir: str | os.PathLike) -> list[int]:
    """The steps of the complete checkpoints kept in a training workdir, ascending.

    For an SFT run: every `keep_every` steps, the last step, and step 1 (Orbax saves the first
    step of a fresh run), so the list also holds a point right next to the pretrained model."""
    root = Path(workdir) / checkpoints.CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    return sorted(
        int(p.name)
        for p in root.iterdir()
        if p.name.isdigit() and (p / checkpoints.PARAMS_ITEM / "_METADATA").exists()
    )


# ----------------------------------------------------------------------------- evaluation


def response_nll_fn(
    config: tm.TransformerConfig, arrays: dict[str, np.ndarray], batch_size: int
) -> Callable[[PyTree], float]:
    """params -> mean NLL per response token (eos included) over all of `arrays`' rows.

    Rows are padded to whole batches with empty rows (segment 0: no targets), so one program
    serves every batch and the mean is over tokens, not over batches of unequal size."""
    n = len(arrays["tokens"])
    pad = -n % batch_size
    padded = {
        k: np.concatenate([v, np.zeros((pad, v.shape[1]), v.dtype)]) for k, v in arrays.items()
    }
    batches = [
        {k: v[i : i + batch_size] for k, v in padded.items()} for i in range(0, n + pad, batch_size)
    ]

    @jax.jit
    def sums(params, batch):
        logits = tm.apply(
            params,
            config,
            batch["tokens"],
            positions=batch["positions"],
            segment_ids=batch["segment_ids"],
        )
        nll, weight = lm.next_token_nll(logits, batch)
        return (nll * weight).sum(), weight.sum()

    def mean_nll(params) -> float:
        totals = np.asarray([jax.device_get(sums(params, b)) for b in batches]).sum(0)
        return float(totals[0] / max(totals[1], 1.0))

    return mean_nll


def gold_eval(
    params: PyTree,
    config: tm.TransformerConfig,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    cfg: sampling.SamplingConfig,
    seed: int,
    num_examples: int = 4,
) -> dict:
    """Samples one response per prompt and scores it with the oracle's gold reward."""
    out = sampling.sample_texts(params, config, tokenizer, prompts, cfg, seed)
    responses, lengths = out.responses, out.lengths
    gold = oracle_task.gold_rewards(list(prompts), responses)
    return {
        "gold_reward_mean": float(gold.mean()),
        "gold_reward_std": float(gold.std()),
        "grammatical_fraction": float(np.mean([oracle_task.is_grammatical(r) for r in responses])),
        "finished_fraction": float(np.mean(out.finished)),
        "mean_length": float(lengths.mean()),
        "examples": [
            {"prompt": p, "response": r, "gold": round(float(g), 3)}
            for p, r, g in list(zip(prompts, responses, gold))[:num_examples]
        ],
    }


# ----------------------------------------------------------------------------- the job


@gin.configurable
def sft(
    workdir: str | os.PathLike,
    init_from: str | os.PathLike | None = None,
    task: str = "oracle",
    num_pairs: int = 20000,
    pairs_seed: int = 1,
    num_eval_pairs: int = 256,
    eval_seed: int = 1001,
    seq_len: int = 64,
    batch_size: int = 32,
    keep_every: int = 100,
    dropout_rate: float = 0.0,
    data_seed: int = 0,
    num_sample_prompts: int = 32,
    sample_temperature: float = 0.9,
    max_new_tokens: int = 40,
    sample_seed: int = 0,
    progress: bool = True,
) -> loop.TrainResult:
    """Fine-tunes the model in `init_from` on `task`'s demonstrations, loss on responses only.

    Resumes if `workdir` holds a checkpoint. Every `keep_every` steps (and the last) is kept.
    Writes `sft_eval.json`: response NLL and gold reward of samples, before and after."""
    if task not in TASKS:
        raise UserError(f"sft.task={task!r}; choose from {list(TASKS)}")
    if keep_every < 1:
        raise UserError(f"sft.keep_every must be >= 1, got {keep_every}")
    if batch_size % jax.process_count():
        raise UserError(
            f"sft.batch_size={batch_size} is not divisible by {jax.process_count()} processes"
        )
    workdir = Path(workdir)
    mesh = shd.make_mesh()
    config, tokenizer, init_params = load_model(init_from, mesh=mesh, what="sft.init_from")
    if seq_len > config.max_len:
        raise UserError(f"sft.seq_len={seq_len} exceeds the model's max_len={config.max_len}")

    train_arrays, dropped = encode_sft_pairs(
        load_pairs(task, num_pairs, pairs_seed), tokenizer, seq_len
    )
    eval_pairs = load_pairs(task, num_eval_pairs, eval_seed)
    eval_arrays, eval_dropped = encode_sft_pairs(eval_pairs, tokenizer, seq_len)
    if len(train_arrays["tokens"]) < batch_size or not len(eval_arrays["tokens"]):
        raise UserError(
            f"sft: {dropped} of {num_pairs} training pairs (and {eval_dropped} of "
            f"{num_eval_pairs} held-out ones) are longer than sft.seq_len={seq_len}; too few fit"
        )
    # Each process feeds its own slice of every global batch (the loop assembles them).
    pi, pc = jax.process_index(), jax.process_count()
    local = {k: v[pi::pc] for k, v in train_arrays.items()}
    batches = loop.ArrayBatches(local, batch_size // pc, seed=data_seed)

    response_nll = response_nll_fn(config, eval_arrays, batch_size)
    sample_prompts = [p for p, _ in eval_pairs[:num_sample_prompts]]
    sample_cfg = sampling.SamplingConfig(
        max_new_tokens=max_new_tokens,
        temperature=sample_temperature,
        eos_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id,
    )

    def report(params) -> dict:
        out = {"response_nll": response_nll(params)}
        if task == "oracle" and sample_prompts:
            out.update(
                gold_eval(params, config, tokenizer, sample_prompts, sample_cfg, sample_seed)
            )
        return out

    initial = report(init_params)
    workdir.mkdir(parents=True, exist_ok=True)
    pretrain_lib.save_model_files(workdir, config, tokenizer)
    with gin.config_scope("sft"):
        result = loop.train(
            lm.lm_loss_fn(config, dropout_rate),
            batches,
            workdir=workdir,
            param_axes=tm.param_logical_axes(config),
            init_params=init_params,
            eval_fn=lambda params: {"response_nll": response_nll(params)},
            meta={
                "model": config.to_dict(),
                "tokenizer": pretrain_lib.TOKENIZER_DIR,
                "task": task,
                "init_from": str(Path(init_from).resolve()),
            },
            mesh=mesh,
            # Baklava needs intermediate checkpoints: keep one every `keep_every` steps, all.
            checkpoint_every=keep_every,
            max_to_keep=None,
            progress=progress,
            description="sft",
        )
    final = report(result.params)
    data_gold = oracle_task.gold_rewards(
        sample_prompts, [r for _, r in eval_pairs[:num_sample_prompts]]
    )
    summary = {
        "init_from": str(Path(init_from).resolve()),
        "steps": result.step,
        "kept_steps": sft_checkpoint_steps(workdir),
        "train_pairs": len(train_arrays["tokens"]),
        "dropped_pairs": dropped,
        "eval_pairs": len(eval_arrays["tokens"]),
        "dropped_eval_pairs": eval_dropped,
        "sampling": {"temperature": sample_temperature, "max_new_tokens": max_new_tokens},
        "demonstrations_gold_reward_mean": float(data_gold.mean()) if len(data_gold) else None,
        "initial": initial,
        "final": final,
    }
    if jax.process_index() == 0:
        loop.save_json(workdir / EVAL_FILE, summary)
    return result


def read_eval(workdir: str | os.PathLike) -> dict | None:
    """The `sft_eval.json` of an SFT workdir, or None if it has none (yet)."""
    p = Path(workdir) / EVAL_FILE
    return json.loads(p.read_text()) if p.is_file() else None


def add_arguments(parser) -> None:
    add_gin_arguments(parser, workdir_default="runs/sft")
    parser.add_argument(
        "--init_from",
        default=None,
        help="the pretrain (or SFT) workdir to start from; overrides the gin value sft.init_from",
    )
    parser.description = (
        "Supervised fine-tuning: the next-token loss on the response tokens of (prompt, response) "
        "demonstrations, starting from a pretrained model. Without --gin_file, uses "
        "experiments/sft_oracle (the built-in task). Every sft.keep_every steps a checkpoint is "
        "kept (WARM's Baklava starts reward models from several). Rerunning with the same "
        "--workdir resumes."
    )


def run(args) -> int:
    from warm_jax import config as cfg

    cfg.parse(
        args.gin_file or ["experiments/sft_oracle"],
        args.gin_bindings,
        extra_modules=["warm_jax.experiments.sft"],
    )
    kwargs = {} if args.init_from is None else {"init_from": args.init_from}
    result = sft(args.workdir, **kwargs)
    print(f"fine-tuned {result.step} steps in {result.workdir}")
    s = read_eval(result.workdir)
    if s:
        for when in ("initial", "final"):
            e = s[when]
            line = f"{when:<8} response NLL {e['response_nll']:.4f}"
            if "gold_reward_mean" in e:
                line += (
                    f"   gold reward {e['gold_reward_mean']:+.3f} ± {e['gold_reward_std']:.2f}"
                    f"   grammatical {e['grammatical_fraction']:.2f}"
                    f"   stops {e['finished_fraction']:.2f}"
                )
            print(line)
        print(f"kept checkpoints: steps {s['kept_steps']}   ({result.workdir / EVAL_FILE})")
    return 0
