"""`warm-jax pretrain`: next-token pretraining of the project's own LM.

The corpus is the built-in oracle task's (generated from a seed, no files needed) or a plain text
file. The tokenizer is trained on the corpus once and saved in the workdir; the model shape comes
from gin (`gin/models/*.gin`), its vocabulary is sized to the tokenizer's.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import gin
import jax
import numpy as np

from warm_jax import sharding as shd
from warm_jax.cli import add_gin_arguments
from warm_jax.data import oracle_task
from warm_jax.data.pipeline import encode_documents, lm_dataset, make_iterator
from warm_jax.data.tokenizer import Tokenizer, train_tokenizer
from warm_jax.errors import UserError
from warm_jax.models import transformer as tm
from warm_jax.training import lm, loop

TOKENIZER_DIR = "tokenizer"
MODEL_FILE = "model.json"


def load_corpus(corpus: str, num_documents: int, seed: int) -> list[str]:
    """`'oracle'` → documents sampled from the built-in grammar; else a text file whose
    blank-line-separated paragraphs are the documents."""
    if corpus == "oracle":
        return oracle_task.sample_corpus(num_documents, seed)
    path = Path(corpus)
    if not path.is_file():
        raise UserError(f"pretrain.corpus: {corpus!r} is neither 'oracle' nor a readable file")
    docs = [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    if not docs:
        raise UserError(f"pretrain.corpus: {path} holds no text")
    return docs[:num_documents] if num_documents else docs


def sized_config(config: tm.TransformerConfig, vocab_size: int) -> tm.TransformerConfig:
    """The gin model with room for the tokenizer's vocabulary (rounded up to a multiple of 64 so
    the vocabulary axis splits evenly over tensor-parallel meshes)."""
    needed = -(-vocab_size // 64) * 64
    return dataclasses.replace(config, vocab_size=max(config.vocab_size, needed))


def save_model_files(workdir: Path, config: tm.TransformerConfig, tokenizer: Tokenizer) -> None:
    if jax.process_index() != 0:  # identical on every process; one writer avoids races
        return
    tokenizer.save(workdir / TOKENIZER_DIR)
    loop.save_json(workdir / MODEL_FILE, config.to_dict())


def load_model_files(workdir: str | os.PathLike) -> tuple[tm.TransformerConfig, Tokenizer]:
    """The model shape and tokenizer saved next to a run's checkpoints."""
    wd = Path(workdir)
    if not (wd / MODEL_FILE).is_file():
        raise UserError(f"{wd} has no {MODEL_FILE}: not a warm_jax model directory")
    config = tm.TransformerConfig(**json.loads((wd / MODEL_FILE).read_text()))
    return config, Tokenizer.load(wd / TOKENIZER_DIR)


@gin.configurable
def pretrain(
    workdir: str | os.PathLike,
    corpus: str = "oracle",
    num_documents: int = 20000,
    corpus_seed: int = 0,
    tokenizer_kind: str = "word",
    seq_len: int = 64,
    batch_size: int = 32,
    validation_fraction: float = 0.05,
    dropout_rate: float = 0.0,
    data_seed: int = 0,
    progress: bool = True,
) -> loop.TrainResult:
    """Pretrains `model_config()` on the corpus; resumes if `workdir` holds a checkpoint."""
    workdir = Path(workdir)
    mesh = shd.make_mesh()  # a mesh that does not fit stops here, before anything is written
    docs = load_corpus(corpus, num_documents, corpus_seed)
    n_val = max(1, int(len(docs) * validation_fraction))
    train_docs, val_docs = docs[n_val:], docs[:n_val]
    config = tm.model_config()
    if (workdir / TOKENIZER_DIR).exists():
        tokenizer = Tokenizer.load(workdir / TOKENIZER_DIR)
    else:
        tokenizer = train_tokenizer(train_docs, config.vocab_size, kind=tokenizer_kind)
    config = sized_config(config, tokenizer.vocab_size)
    workdir.mkdir(parents=True, exist_ok=True)
    save_model_files(workdir, config, tokenizer)

    ids = {"bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id}
    train_ds = lm_dataset(
        encode_documents(train_docs, tokenizer),
        seq_len,
        batch_size,
        seed=data_seed,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
        **ids,
    )
    val_ds = lm_dataset(
        encode_documents(val_docs, tokenizer), seq_len, batch_size, seed=0, num_epochs=1, **ids
    )
    val_batches = [val_ds[i] for i in range(min(len(val_ds), 8))]
    if not val_batches:
        raise UserError(
            f"pretrain: the validation split ({n_val} documents) fills no batch of {batch_size}"
        )
    loss_fn = lm.lm_loss_fn(config, dropout_rate)
    eval_loss = jax.jit(lambda p, b: loss_fn(p, b, None, None)[0])

    def evaluate(params) -> dict:
        losses = [float(eval_loss(params, b)) for b in val_batches]
        return {"loss": float(np.mean(losses)), "perplexity": float(np.exp(np.mean(losses)))}

    with gin.config_scope("pretrain"):
        return loop.train(
            loss_fn,
            make_iterator(train_ds),
            workdir=workdir,
            param_axes=tm.param_logical_axes(config),
            init_fn=lambda k: tm.init_params(config, k),
            eval_fn=evaluate,
            meta={"model": config.to_dict(), "tokenizer": TOKENIZER_DIR, "corpus": corpus},
            mesh=mesh,
            progress=progress,
            description="pretrain",
        )


def add_arguments(parser) -> None:
    add_gin_arguments(parser, workdir_default="runs/pretrain")
    parser.description = (
        "Pretrain a language model with the next-token loss. Without --gin_file, uses "
        "experiments/pretrain_oracle (the tiny model on the built-in corpus). Rerunning with the "
        "same --workdir resumes from its latest checkpoint."
    )


def run(args) -> int:
    from warm_jax import config as cfg

    cfg.parse(args.gin_file or ["experiments/pretrain_oracle"], args.gin_bindings)
    result = pretrain(args.workdir)
    last = [r for r in result.history if "eval/loss" in r]
    print(f"pretrained {result.step} steps in {result.workdir}")
    if last:
        print(f"validation loss {last[-1]['eval/loss']:.4f}")
    return 0
