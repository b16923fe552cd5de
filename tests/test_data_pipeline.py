"""grain pipelines: packing, shuffling, sharding, exact resume, and pair batches."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from warm_jax.data import encoding, pipeline
from warm_jax.data.tokenizer import train_tokenizer

BOS, EOS = 1, 2


def _docs(n: int = 40, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [list(rng.integers(10, 100, size=rng.integers(0, 30))) for _ in range(n)]


def _segments(rows: pipeline.PackedRows):
    """(tokens, positions) of every segment of every row."""
    for r in range(len(rows)):
        seg = rows.segment_ids[r]
        for s in range(1, seg.max() + 1):
            sel = seg == s
            assert np.flatnonzero(sel).tolist() == list(
                range(np.argmax(sel), np.argmax(sel) + sel.sum())
            )  # contiguous
            yield rows.tokens[r][sel], rows.positions[r][sel]


def test_packing_keeps_every_document_once():
    docs = _docs()
    rows = pipeline.pack_documents(docs, 32, bos_id=BOS, eos_id=EOS, seed=3)
    got = sorted(tuple(t.tolist()) for t, _ in _segments(rows))
    assert got == sorted(tuple([BOS, *d, EOS]) for d in docs)  # all fit in 32: one piece each
    for t, pos in _segments(rows):
        assert pos.tolist() == list(range(len(t)))
    # Padding is pad_id with segment 0 and position 0; rows are well filled.
    pad = rows.segment_ids == 0
    assert (rows.tokens[pad] == 0).all() and (rows.positions[pad] == 0).all()
    total = sum(len(d) + 2 for d in docs)
    assert len(rows) == -(-total // 32) or rows.fill_fraction() > 0.9


def test_long_documents_are_cut_with_one_token_overlap():
    doc = list(range(10, 30))  # wrapped: 22 tokens
    rows = pipeline.pack_documents([doc], 8, bos_id=BOS, eos_id=EOS)
    pieces = sorted((t.tolist() for t, _ in _segments(rows)), key=lambda p: p[0] != BOS)
    wrapped = [BOS, *doc, EOS]
    transitions = [t for p in pieces for t in itertools.pairwise(p)]
    assert sorted(transitions) == sorted(itertools.pairwise(wrapped))  # each exactly once
    assert all(len(p) <= 8 for p in pieces)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_lm_dataset_batches_epochs_and_seed():
    docs = _docs(60)
    rows = pipeline.pack_documents(docs, 16, bos_id=BOS, eos_id=EOS, seed=0)
    ds = pipeline.lm_dataset(docs, 16, 4, seed=0, bos_id=BOS, eos_id=EOS, num_epochs=1)
    batches = list(ds)
    assert len(batches) == len(rows) // 4
    b = batches[0]
    assert {k: (v.shape, v.dtype) for k, v in b.items()} == {
        k: ((4, 16), np.dtype(np.int32)) for k in ("tokens", "segment_ids", "positions")
    }
    # One epoch visits distinct rows (a permutation, cut to whole batches).
    seen = {tuple(t) for batch in batches for t in batch["tokens"].tolist()}
    assert len(seen) == len(batches) * 4
    same = list(pipeline.lm_dataset(docs, 16, 4, seed=0, bos_id=BOS, eos_id=EOS, num_epochs=1))
    _same(batches, same)
    other = list(pipeline.lm_dataset(docs, 16, 4, seed=1, bos_id=BOS, eos_id=EOS, num_epochs=1))
    assert any((x["tokens"] != y["tokens"]).any() for x, y in zip(batches, other))
    infinite = pipeline.lm_dataset(docs, 16, 4, seed=0, bos_id=BOS, eos_id=EOS)
    assert len(infinite) > 10**15


def test_sharding_splits_each_global_batch():
    docs = _docs(60)
    kw = dict(seed=5, bos_id=BOS, eos_id=EOS, num_epochs=2)
    full = list(pipeline.lm_dataset(docs, 16, 8, **kw))
    shards = [
        list(pipeline.lm_dataset(docs, 16, 8, shard_index=i, shard_count=2, **kw)) for i in range(2)
    ]
    assert len(shards[0]) == len(shards[1]) == len(full)
    for g, a, b in zip(full, shards[0], shards[1]):
        assert a["tokens"].shape == (4, 16)
        # The global batch is the same whatever the number of processes.
        assert sorted(map(tuple, g["tokens"].tolist())) == sorted(
            map(tuple, np.concatenate([a["tokens"], b["tokens"]]).tolist())
        )
    with pytest.raises(ValueError, match="multiple of shard_count"):
        pipeline.lm_dataset(docs, 16, 7, shard_index=0, shard_count=2, **kw)


def test_resume_continues_exactly_across_epochs():
    docs = _docs(30)
    make = lambda: pipeline.lm_dataset(docs, 16, 4, seed=2, bos_id=BOS, eos_id=EOS)  # noqa: E731
    it = pipeline.make_iterator(make())
    _take(it, 7)  # past the end of the first epoch
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    expected = _take(it, 9)
    fresh = pipeline.make_iterator(make())
    fresh.set_state(state)
    _same(_take(fresh, 9), expected)
    # And a fresh iterator without restored state starts over.
    _same(_take(pipeline.make_iterator(make()), 1), _take(pipeline.make_iterator(make()), 1))


# --- pairs -----------------------------------------------------------------------------------


def test_encode_pair_truncates_prompt_from_the_left():
    enc = encoding.encode_pair([10, 11, 12, 13, 14], [20, 21], 7, bos_id=BOS, eos_id=EOS)
    assert enc.tokens.tolist() == [BOS, 12, 13, 14, 20, 21, EOS]  # the newest prompt tokens stay
    enc = encoding.encode_pair([10, 11, 12, 13, 14], [20, 21], 6, bos_id=BOS, eos_id=EOS)
    assert enc.tokens.tolist() == [BOS, 13, 14, 20, 21, EOS]
    assert enc.prompt_truncated and not enc.response_truncated
    enc = encoding.encode_pair([10, 11], [20, 21, 22, 23, 24, 25], 5, bos_id=BOS, eos_id=EOS)
    assert enc.tokens.tolist() == [BOS, 20, 21, 22, EOS]  # no room for prompt; response cut
    assert enc.prompt_truncated and enc.response_truncated
    enc = encoding.encode_pair([10], [20], 8, bos_id=BOS, eos_id=EOS)
    assert enc.tokens.tolist() == [BOS, 10, 20, EOS]
    assert not enc.prompt_truncated and not enc.response_truncated


PAIRS = [
    {"id": f"p{i}", "prompt": "w1 w2 w3 w4 w5 " * (i % 3), "chosen": "good " * (1 + i % 4), "rejected": "bad"}
    for i in range(10)
]  # fmt: skip


@pytest.fixture(scope="module")
def word_tok():
    return train_tokenizer(
        [p[k] for p in PAIRS for k in ("prompt", "chosen", "rejected")], 16, "word"
    )


def test_pair_batches(word_tok):
    max_len = 12
    ds = pipeline.pair_dataset(PAIRS, 4, tokenizer=word_tok, max_len=max_len, shuffle=False)
    batches = list(ds)
    assert len(batches) == 2  # 10 pairs, whole batches only
    b = batches[0]
    for side in ("chosen", "rejected"):
        for f in ("tokens", "segment_ids", "positions"):
            assert b[f"{side}_{f}"].shape == (4, max_len) and b[f"{side}_{f}"].dtype == np.int32
    assert b["index"].tolist() == [0, 1, 2, 3] and b["valid"].all() and not b["corrupted"].any()
    good, bad = word_tok.encode("good")[0], word_tok.encode("bad")[0]
    w = [word_tok.encode(f"w{k}")[0] for k in range(1, 6)]
    # Pair 2: prompt of 10 words + 3 "good": 15 tokens with bos/eos -> the 3 oldest prompt words go.
    row = b["chosen_tokens"][2]
    assert row.tolist() == [BOS, w[3], w[4], *w, good, good, good, EOS]
    assert b["chosen_last"][2] == 11 and b["chosen_segment_ids"][2].sum() == 12
    assert b["rejected_tokens"][2].tolist() == [BOS, *w[1:], *w, bad, EOS]  # 13 -> 12 tokens
    # Pair 0: no prompt: right padding after eos.
    assert b["chosen_tokens"][0].tolist() == [BOS, good, EOS] + [0] * 9
    assert b["chosen_segment_ids"][0].tolist() == [1, 1, 1] + [0] * 9
    assert b["chosen_positions"][0].tolist() == [0, 1, 2] + [0] * 9
    assert b["chosen_last"][0] == 2


def test_truncation_counts_and_eval_padding(word_tok):
    enc = encoding.encode_pairs(PAIRS, word_tok, 12)
    # Prompt cut iff 2 + prompt + longer response > 12: i % 3 == 2 (10 words) always.
    assert enc.stats() == {
        "pairs": 10,
        "prompt_truncated": 3,
        "response_truncated": 0,
        "corrupted": 0,
    }
    ds = pipeline.pair_dataset(enc, 4, shuffle=False, drop_remainder=False)
    batches = list(ds)
    assert len(batches) == 3
    assert batches[-1]["valid"].tolist() == [True, True, False, False]
    assert batches[-1]["index"].tolist() == [8, 9, -1, -1]
    assert [enc.ids[i] for i in batches[1]["index"]] == ["p4", "p5", "p6", "p7"]


def test_pair_corruption_flags(word_tok):
    ds = pipeline.pair_dataset(
        PAIRS, 2, tokenizer=word_tok, max_len=16, shuffle=True, seed=1,
        corruption_fraction=0.3, corruption_seed=7,
    )  # fmt: skip
    rows = [
        (int(i), bool(c), ct.tolist(), rt.tolist())
        for b in ds
        for i, c, ct, rt in zip(
            b["index"], b["corrupted"], b["chosen_tokens"], b["rejected_tokens"]
        )
    ]
    assert len(rows) == 10 and sum(c for _, c, _, _ in rows) == 3
    clean = {i: (ct, rt) for i, _, ct, rt in _rows_of(word_tok)}
    for i, corrupted, ct, rt in rows:
        assert (ct, rt) == ((clean[i][1], clean[i][0]) if corrupted else clean[i])


def _rows_of(word_tok):
    for b in pipeline.pair_dataset(PAIRS, 2, tokenizer=word_tok, max_len=16, shuffle=False):
        for i, c, ct, rt in zip(
            b["index"], b["corrupted"], b["chosen_tokens"], b["rejected_tokens"]
        ):
            yield int(i), bool(c), ct.tolist(), rt.tolist()
