"""`warm-jax data`: list the dataset builders, prepare one and summarise it.

    warm-jax data list
    warm-jax data prepare --dataset hh_rlhf/helpful_base --manual_dir ../shared/data/hh_rlhf

`prepare` writes the dataset (array_record) under --data_dir (default: $TFDS_DATA_DIR or
~/tensorflow_datasets), then prints a summary and saves it as `summary.json` beside the dataset.
Token lengths use --tokenizer (a tokenizer.json, a folder holding one, or a .gguf); without it a
byte-level BPE is trained on the train split, deterministically, and saved beside the dataset.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from warm_jax.errors import UserError

DEFAULT_MAX_LEN = 512
DEFAULT_VOCAB = 8192


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    sub.add_parser("list", help="list the dataset builders and their configs")
    prep = sub.add_parser("prepare", help="prepare a dataset and print/save its summary")
    prep.add_argument("--dataset", required=True, help="NAME/CONFIG, e.g. hh_rlhf/helpful_base")
    prep.add_argument(
        "--manual_dir",
        default=None,
        help="folder holding the raw files (e.g. ../shared/data/hh_rlhf); without it the public "
        "files are downloaded",
    )
    prep.add_argument(
        "--data_dir",
        default=None,
        help="TFDS data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)",
    )
    prep.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer.json, a folder holding one, or a .gguf (default: train a BPE here)",
    )
    prep.add_argument("--max_len", type=int, default=DEFAULT_MAX_LEN, help="pair/sequence length")
    prep.add_argument(
        "--vocab_size", type=int, default=DEFAULT_VOCAB, help="vocabulary of the trained BPE"
    )
    prep.add_argument("--force", action="store_true", help="regenerate even if already prepared")


def run(args: argparse.Namespace) -> int:
    if getattr(args, "gin_bindings", None):
        raise UserError("`warm-jax data` takes no --gin.* bindings")
    if args.action == "list":
        return _list()
    if args.action == "prepare":
        return _prepare(args)
    raise UserError("choose an action: `warm-jax data list` or `warm-jax data prepare ...`")


def _list() -> int:
    from warm_jax.data import builders

    for name, description in builders.list_datasets():
        print(f"{name:36s} {description}")
    return 0


def _prepare(args: argparse.Namespace) -> int:
    import tensorflow_datasets as tfds

    from warm_jax.data import builders, summary
    from warm_jax.data.tokenizer import Tokenizer, train_tokenizer

    if args.max_len < 3:
        raise UserError(f"--max_len must be at least 3, got {args.max_len}")
    tfds.disable_progress_bar()
    builder = builders.prepare(
        args.dataset, data_dir=args.data_dir, manual_dir=args.manual_dir, force=args.force
    )
    out_dir = Path(builder.data_dir)
    if args.tokenizer:
        tokenizer = Tokenizer.load(args.tokenizer)
        tok_info = {"path": os.path.abspath(args.tokenizer), "trained_here": False}
    else:
        texts = _training_texts(builders.read_split(builder, "train"))
        tokenizer = train_tokenizer(texts, args.vocab_size, kind="bpe")
        tok_path = tokenizer.save(out_dir / f"tokenizer_bpe{args.vocab_size}")
        tok_info = {"path": str(tok_path), "trained_here": True, "trained_on": "train split"}
    tok_info["vocab_size"] = tokenizer.vocab_size
    result = summary.summarize(builder, tokenizer, args.max_len)
    result["tokenizer"] = tok_info
    path = out_dir / "summary.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)
    print(summary.format_summary(result))
    print(f"summary saved to {path}")
    return 0


def _training_texts(rows: list[dict]) -> list[str]:
    texts = []
    for r in rows:
        if "text" in r:
            texts.append(r["text"])
        else:
            texts.extend(r[k] for k in ("prompt", "chosen", "rejected") if k in r)
    if not texts:
        raise UserError("the train split has no text to train a tokenizer on; pass --tokenizer")
    return texts
