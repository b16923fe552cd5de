"""grain input pipelines: packed language-model batches and preference-pair batches.

Both are `grain.MapDataset`s (random access, so a position in the stream is one integer) built the
same way:

    source -> shuffle(seed) -> repeat(num_epochs) -> cut to whole global batches
           -> shard (every shard_count-th element from shard_index) -> batch(batch_size / shards)

`batch_size` is the *global* batch. Shuffling happens before sharding, so the examples making up
global batch t are the same whatever the number of data-parallel processes. `make_iterator` gives
a grain iterator whose `get_state()` is a small JSON dict (`{"next_index": n}`); restoring it with
`set_state` on a fresh iterator over the same dataset continues exactly. It is a
`grain.DatasetIterator`, so `grain.checkpoint.CheckpointSave/Restore` put it in an Orbax checkpoint.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from warm_jax.data.corruption import corrupted_indices
from warm_jax.data.encoding import EncodedPairs, TokenizerLike, encode_pairs

# --------------------------------------------------------------------------------------------
# Language-model batches


@dataclasses.dataclass(frozen=True)
class PackedRows:
    """Fixed-length rows holding one or more documents each; a grain source (len + getitem)."""

    tokens: np.ndarray  # int32 [R, L]
    segment_ids: np.ndarray  # int32 [R, L]: 0 padding, 1.. the k-th document in the row
    positions: np.ndarray  # int32 [R, L]: position inside its own document, 0 on padding

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return {
            "tokens": self.tokens[i],
            "segment_ids": self.segment_ids[i],
            "positions": self.positions[i],
        }

    def fill_fraction(self) -> float:
        return float((self.segment_ids > 0).mean()) if len(self) else 0.0


def pack_documents(
    docs: Sequence[Sequence[int]],
    seq_len: int,
    *,
    bos_id: int,
    eos_id: int,
    pad_id: int = 0,
    seed: int = 0,
) -> PackedRows:
    """Wraps each document in bos/eos, cuts it into pieces of at most seq_len and packs them.

    A document longer than seq_len becomes pieces overlapping by one token.

    Packing is best-fit decreasing (longest pieces first, each into the fullest row it still fits,
    ties broken by a seeded shuffle), which leaves little padding and is deterministic.
    Each piece is its own segment, positions restarting at 0.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    pieces: list[np.ndarray] = []
    for doc in docs:
        wrapped = np.concatenate([[bos_id], np.asarray(doc, np.int32), [eos_id]]).astype(np.int32)
        # Consecutive pieces share one token, so every next-token transition of the document is
        # inside exactly one piece (a piece boundary would otherwise lose one prediction).
        starts = range(0, max(len(wrapped) - 1, 1), seq_len - 1)
        pieces.extend(wrapped[s : s + seq_len] for s in starts)
    order = np.random.default_rng(seed).permutation(len(pieces))
    order = sorted(order.tolist(), key=lambda k: -len(pieces[k]))  # stable: ties keep the shuffle
    rows: list[list[int]] = []
    # open_rows[c]: rows with exactly c free slots; count[c] mirrors it for a vectorised search.
    open_rows: list[list[int]] = [[] for _ in range(seq_len + 1)]
    count = np.zeros(seq_len + 1, np.int64)
    free: list[int] = []
    for k in order:
        n = len(pieces[k])
        fits = np.flatnonzero(count[n:])
        if len(fits):
            c = n + int(fits[0])
            r = open_rows[c].pop()
            count[c] -= 1
        else:
            r, c = len(rows), seq_len
            rows.append([])
            free.append(seq_len)
        rows[r].append(k)
        free[r] = c - n
        if free[r] > 0:
            open_rows[free[r]].append(r)
            count[free[r]] += 1
    tokens = np.full((len(rows), seq_len), pad_id, np.int32)
    segments = np.zeros((len(rows), seq_len), np.int32)
    positions = np.zeros((len(rows), seq_len), np.int32)
    for r, members in enumerate(rows):
        at = 0
        for s, k in enumerate(members, start=1):
            n = len(pieces[k])
            tokens[r, at : at + n] = pieces[k]
            segments[r, at : at + n] = s
            positions[r, at : at + n] = np.arange(n)
            at += n
    return PackedRows(tokens, segments, positions)


def lm_dataset(
    docs: Sequence[Sequence[int]],
    seq_len: int,
    batch_size: int,
    *,
    seed: int,
    bos_id: int,
    eos_id: int,
    pad_id: int = 0,
    shard_index: int = 0,
    shard_count: int = 1,
    num_epochs: int | None = None,
) -> grain.MapDataset:
    """Packed next-token batches: `tokens`, `segment_ids`, `positions`, int32 [B/shards, L].

    Infinite when num_epochs is None; otherwise only whole global batches are kept, so every
    shard yields the same number of batches.
    """
    rows = pack_documents(docs, seq_len, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, seed=seed)
    if len(rows) == 0:
        raise ValueError("lm_dataset: no documents")
    return _batched(
        grain.MapDataset.source(rows),
        batch_size,
        seed=seed,
        shuffle=True,
        shard_index=shard_index,
        shard_count=shard_count,
        num_epochs=num_epochs,
        drop_remainder=True,
    )


def encode_documents(texts: Sequence[str], tokenizer: TokenizerLike) -> list[np.ndarray]:
    batch = getattr(tokenizer, "encode_batch", None)
    ids = batch(list(texts)) if batch is not None else [tokenizer.encode(t) for t in texts]
    return [np.asarray(x, np.int32) for x in ids]


# --------------------------------------------------------------------------------------------
# Preference-pair batches


def pair_dataset(
    pairs: Sequence[Mapping[str, Any]] | EncodedPairs,
    batch_size: int,
    *,
    tokenizer: TokenizerLike | None = None,
    max_len: int | None = None,
    seed: int = 0,
    shuffle: bool = True,
    shard_index: int = 0,
    shard_count: int = 1,
    num_epochs: int | None = 1,
    drop_remainder: bool = True,
    corruption_fraction: float = 0.0,
    corruption_seed: int = 0,
) -> grain.MapDataset:
    """Batches of encoded preference pairs.

    `pairs` are records `{"prompt", "chosen", "rejected"[, "id", "corrupted"]}` (encoded here with
    `tokenizer` and `max_len`, see `encoding.encode_pair`) or an `EncodedPairs`. Each batch has
    `{chosen,rejected}_{tokens,segment_ids,positions}` int32 [B, L] (right-padded, segment id 1 on
    real tokens), `{chosen,rejected}_last` int32 [B] (index of the last real token, the `<eos>`),
    `corrupted` bool [B], `index` int32 [B] (row in `pairs`: ids are `encoded.ids[index]`) and
    `valid` bool [B].

    corruption_fraction > 0 swaps chosen/rejected on that seeded fraction of the pairs (by their
    index in `pairs`, before shuffling; see `corruption`). For evaluation use shuffle=False,
    num_epochs=1, drop_remainder=False: the last batch is then padded with `valid=False` rows so
    every batch has the same shape.
    """
    if isinstance(pairs, EncodedPairs):
        encoded = pairs
    else:
        if tokenizer is None or max_len is None:
            raise ValueError("pair_dataset: raw pairs need a tokenizer and max_len")
        encoded = encode_pairs(pairs, tokenizer, max_len)
    if corruption_fraction:
        encoded = encoded.swapped(
            corrupted_indices(len(encoded), corruption_fraction, corruption_seed)
        )
    if len(encoded) == 0:
        raise ValueError("pair_dataset: no pairs")
    source = grain.MapDataset.source(_PairRows(encoded))
    return _batched(
        source,
        batch_size,
        seed=seed,
        shuffle=shuffle,
        shard_index=shard_index,
        shard_count=shard_count,
        num_epochs=num_epochs,
        drop_remainder=drop_remainder,
    )


class _PairRows:
    def __init__(self, encoded: EncodedPairs):
        self.encoded = encoded

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = self.encoded.row(i)
        row["valid"] = np.bool_(True)
        return row


# --------------------------------------------------------------------------------------------
# Shared plumbing


def _batched(
    ds: grain.MapDataset,
    batch_size: int,
    *,
    seed: int,
    shuffle: bool,
    shard_index: int,
    shard_count: int,
    num_epochs: int | None,
    drop_remainder: bool,
) -> grain.MapDataset:
    if shard_count < 1 or not 0 <= shard_index < shard_count:
        raise ValueError(f"bad shard {shard_index} of {shard_count}")
    if batch_size < 1 or batch_size % shard_count:
        raise ValueError(
            f"global batch_size {batch_size} must be a positive multiple of shard_count "
            f"{shard_count}"
        )
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    if num_epochs is not None:
        whole = len(ds) // batch_size * batch_size
        if drop_remainder:
            if whole == 0:
                raise ValueError(
                    f"{len(ds)} examples make no whole batch of {batch_size}; lower batch_size"
                )
            ds = ds.slice(slice(0, whole))
        elif whole != len(ds):
            ds = _pad_to(ds, whole + batch_size)
    if shard_count > 1:
        ds = ds.slice(slice(shard_index, None, shard_count))
    return ds.batch(batch_size // shard_count, drop_remainder=True)


def _pad_to(ds: grain.MapDataset, length: int) -> grain.MapDataset:
    """`ds` followed by copies of its first element marked `valid=False` (index -1), up to
    `length`."""
    n = len(ds)
    blank = dict(ds[0])
    blank["valid"] = np.bool_(False)
    if "index" in blank:
        blank["index"] = np.int32(-1)
    return grain.MapDataset.range(length).map(lambda i: ds[i] if i < n else blank)


def make_iterator(ds: grain.MapDataset, *, num_threads: int = 0, prefetch: int = 0):
    """A checkpointable iterator over `ds`: `next()`, `get_state()` (JSON dict), `set_state()`.

    Data here is in memory, so reading threads default to 0 (grain's advice: threads only add
    GIL contention). Raise `num_threads` when reading array_record files directly.
    """
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    return iter(ds.to_iter_dataset(options))
