"""The summary `warm-jax data prepare` prints and saves: counts, drops, truncation, token lengths."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from warm_jax.data import builders
from warm_jax.data.encoding import TokenizerLike, encode_pairs

PERCENTILES = (50, 90, 95, 99)


def length_stats(lengths: Sequence[int] | np.ndarray) -> dict[str, float]:
    x = np.asarray(lengths, dtype=np.float64)
    if x.size == 0:
        return {"count": 0}
    out: dict[str, float] = {"count": int(x.size), "mean": round(float(x.mean()), 1)}
    for p in PERCENTILES:
        out[f"p{p}"] = float(np.percentile(x, p))
    out["max"] = int(x.max())
    return out


def _metadata(builder) -> dict[str, Any]:
    try:
        return {k: _plain(v) for k, v in dict(builder.info.metadata or {}).items()}
    except Exception:  # a builder without metadata, or one that fails to load it
        return {}


def _plain(v: Any) -> Any:
    return json.loads(json.dumps(v, default=str))


def summarize(builder, tokenizer: TokenizerLike, max_len: int) -> dict[str, Any]:
    """Counts per split, the builder's metadata (drops, source), truncation and length stats."""
    info = builder.info
    out: dict[str, Any] = {
        "dataset": f"{info.name}/{info.config_name}" if info.config_name else info.name,
        "version": str(info.version),
        "path": str(builder.data_dir),
        "metadata": _metadata(builder),
        "examples": {name: int(s.num_examples) for name, s in info.splits.items()},
        "max_len": max_len,
    }
    per_split: dict[str, Any] = {}
    for split in info.splits:
        rows = builders.read_split(builder, split)
        if rows and {"prompt", "chosen", "rejected"} <= rows[0].keys():
            per_split[split] = _pair_stats(rows, tokenizer, max_len)
        elif rows and "text" in rows[0]:
            per_split[split] = _text_stats(rows, tokenizer, max_len)
    out["splits"] = per_split
    return out


def _pair_stats(rows: list[Mapping[str, Any]], tokenizer: TokenizerLike, max_len: int) -> dict:
    enc = encode_pairs(rows, tokenizer, max_len)
    # Untruncated length of `bos prompt response eos`, the longer of the two sides.
    seq = 2 + enc.prompt_lens + np.maximum(enc.chosen_lens, enc.rejected_lens)
    return {
        "pairs": len(enc),
        "truncated": {
            "prompt": int(enc.prompt_truncated.sum()),
            "response": int(enc.response_truncated.sum()),
        },
        "token_lengths": {
            "prompt": length_stats(enc.prompt_lens),
            "chosen": length_stats(enc.chosen_lens),
            "rejected": length_stats(enc.rejected_lens),
            "sequence": length_stats(seq),
        },
    }


def _text_stats(rows: list[Mapping[str, Any]], tokenizer: TokenizerLike, max_len: int) -> dict:
    texts = [r["text"] for r in rows]
    batch = getattr(tokenizer, "encode_batch", None)
    ids = batch(texts) if batch is not None else [tokenizer.encode(t) for t in texts]
    lengths = np.array([len(x) for x in ids])
    return {
        "documents": len(rows),
        "tokens": int(lengths.sum()),
        "longer_than_max_len": int((lengths + 2 > max_len).sum()),
        "token_lengths": {"document": length_stats(lengths)},
    }


def format_summary(summary: Mapping[str, Any]) -> str:
    """A few human-readable lines (the JSON file has everything)."""
    meta = summary.get("metadata", {})
    lines = [f"{summary['dataset']} {summary['version']}  ({summary['path']})"]
    source = meta.get("source")
    if isinstance(source, Mapping):
        sources = [source] if "path" in source else [v for v in source.values()]
        for src in sources:
            if isinstance(src, Mapping) and "path" in src:
                lines.append(f"  source: {src['path']} ({src.get('origin')})")
    if "raw_pairs" in meta:
        lines.append(f"  raw pairs: {meta['raw_pairs']}")
    if "dropped" in meta:
        dropped = ", ".join(f"{k} {v}" for k, v in meta["dropped"].items())
        lines.append(f"  dropped: {dropped}")
    tok = summary.get("tokenizer", {})
    if tok:
        lines.append(f"  tokenizer: {tok.get('path')} (vocab {tok.get('vocab_size')})")
    for split, stats in summary.get("splits", {}).items():
        lengths = stats["token_lengths"]
        if "pairs" in stats:
            lines.append(
                f"  {split}: {stats['pairs']} pairs; truncated at max_len {summary['max_len']}: "
                f"prompt {stats['truncated']['prompt']}, response {stats['truncated']['response']}"
            )
            for key in ("prompt", "chosen", "rejected", "sequence"):
                s = lengths[key]
                lines.append(
                    f"    {key:9s} tokens p50 {s['p50']:.0f}  p90 {s['p90']:.0f}  "
                    f"p95 {s['p95']:.0f}  p99 {s['p99']:.0f}  max {s['max']}"
                )
        else:
            s = lengths["document"]
            lines.append(
                f"  {split}: {stats['documents']} documents, {stats['tokens']} tokens; "
                f"length p50 {s['p50']:.0f}  p90 {s['p90']:.0f}  p99 {s['p99']:.0f}  "
                f"max {s['max']}; longer than max_len {summary['max_len']}: "
                f"{stats['longer_than_max_len']}"
            )
    for split, n in summary.get("examples", {}).items():
        if split not in summary.get("splits", {}):
            lines.append(f"  {split}: {n} examples")
    return "\n".join(lines)
