"""The plain-text corpus builder: tinyshakespeare documents and HH chosen dialogues (train only)."""

from __future__ import annotations

import tensorflow_datasets as tfds
from test_data_fixtures import SHAKESPEARE, write_hh, write_shakespeare

from warm_jax.data import builders, text_corpus

tfds.disable_progress_bar()


def test_split_documents():
    docs = text_corpus.split_documents(SHAKESPEARE)
    assert docs == [
        "First Citizen:\nBefore we proceed any further, hear me speak.",
        "All:\nSpeak, speak.",
        "First Citizen:\nYou are all resolved rather to die than to famish?",
        "All:\nResolved. resolved.",
        "First Citizen:\nFirst, you know Caius Marcius is chief enemy to the people.",
    ]


def test_tinyshakespeare(tmp_path):
    write_shakespeare(tmp_path / "m")
    builder = builders.prepare(
        "text_corpus/tinyshakespeare", data_dir=tmp_path / "d", manual_dir=tmp_path / "m"
    )
    train = builders.read_split(builder, "train")
    val = builders.read_split(builder, "validation")
    assert len(val) == 1  # round(0.1 * 5) = 0, but a split is never left empty
    assert sorted(r["text"] for r in train + val) == sorted(
        text_corpus.split_documents(SHAKESPEARE)
    )
    assert {r["id"] for r in train + val} == {f"tinyshakespeare:{i}" for i in range(5)}


def test_hh_chosen_is_the_train_split_only(tmp_path):
    write_hh(tmp_path / "m", subset="helpful-base")
    write_hh(tmp_path / "m", subset="harmless-base")
    corpus = builders.prepare(
        "text_corpus/hh_chosen", data_dir=tmp_path / "d", manual_dir=tmp_path / "m"
    )
    docs = builders.read_split(corpus, "train") + builders.read_split(corpus, "validation")
    pairs = {}
    for config in ("helpful_base", "harmless_base"):
        b = builders.prepare(
            f"hh_rlhf/{config}", data_dir=tmp_path / "d", manual_dir=tmp_path / "m"
        )
        pairs[config] = {s: builders.read_split(b, s) for s in ("train", "validation")}
    train_ids = {r["id"] for c in pairs.values() for r in c["train"]}
    val_ids = {r["id"] for c in pairs.values() for r in c["validation"]}
    assert {d["id"] for d in docs} == train_ids
    assert train_ids.isdisjoint(val_ids) and len(docs) == 2 * 33
    by_id = {r["id"]: r for c in pairs.values() for r in c["train"]}
    for d in docs:
        pair = by_id[d["id"]]
        assert d["text"] == (pair["prompt"] + pair["chosen"]).strip()
