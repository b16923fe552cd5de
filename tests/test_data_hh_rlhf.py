"""The HH-RLHF builder on small upstream-format files: prompt split, splits, drops, bad input."""

from __future__ import annotations

import gzip
import json
import random
import socket

import pytest
import tensorflow_datasets as tfds
from test_data_fixtures import (
    MULTI_CHOSEN,
    MULTI_PROMPT,
    MULTI_REJECTED,
    N_FILLER,
    hh_lines,
    write_hh,
)

from warm_jax.data import builders, hh_rlhf, splits
from warm_jax.errors import UserError

tfds.disable_progress_bar()


def test_split_dialogue_multi_turn():
    prompt, chosen, rejected = hh_rlhf.split_dialogue(
        MULTI_PROMPT + MULTI_CHOSEN, MULTI_PROMPT + MULTI_REJECTED
    )
    assert prompt == MULTI_PROMPT
    assert prompt.endswith("How do I keep it fluffy?\n\nAssistant:")
    assert prompt.count("\n\nHuman:") == 3 and prompt.count("\n\nAssistant:") == 3
    assert (chosen, rejected) == (MULTI_CHOSEN, MULTI_REJECTED)


@pytest.mark.parametrize(
    ("chosen", "rejected", "reason"),
    [
        ("\n\nHuman: a\n\nAssistant: b", "\n\nHuman: a\n\nAssistant: b", "identical"),
        ("\n\nHuman: a\n\nAssistant: b", "\n\nHuman: X\n\nAssistant: c", "unseparable_prompt"),
        ("\n\nHuman: a only", "\n\nHuman: a\n\nAssistant: c", "unseparable_prompt"),
        (
            "\n\nHuman: a\n\nAssistant: b\n\nHuman: d",
            "\n\nHuman: a\n\nAssistant: c",
            "unseparable_prompt",
        ),
    ],
)
def test_split_dialogue_drops(chosen, rejected, reason):
    assert hh_rlhf.split_dialogue(chosen, rejected) == reason


def _prepare(tmp_path, manual, name="data"):
    return builders.prepare("hh_rlhf/helpful_base", data_dir=tmp_path / name, manual_dir=manual)


def test_builder_pairs_splits_and_drops(tmp_path):
    write_hh(tmp_path / "manual")
    builder = _prepare(tmp_path, tmp_path / "manual")
    meta = builder.info.metadata
    assert meta["raw_pairs"] == len(hh_lines()) == 7 + N_FILLER
    assert meta["dropped"] == {"identical": 1, "unseparable_prompt": 2}
    assert meta["source"]["origin"] == "manual_dir"
    train = builders.read_split(builder, "train")
    val = builders.read_split(builder, "validation")
    assert len(train) + len(val) == 37
    assert len(val) == 4  # round(0.1 * 37), no group larger than one pair was needed
    by_id = {r["id"]: r for r in train + val}
    assert len(by_id) == 37
    multi = by_id["helpful_base:2"]
    assert (multi["prompt"], multi["chosen"], multi["rejected"]) == (
        MULTI_PROMPT,
        MULTI_CHOSEN,
        MULTI_REJECTED,
    )
    assert {"helpful_base:3", "helpful_base:4", "helpful_base:5"}.isdisjoint(by_id)
    # The two pairs of the shared prompt are in the same split.
    val_ids = {r["id"] for r in val}
    assert ("helpful_base:6" in val_ids) == ("helpful_base:7" in val_ids)
    # The description says how the splits were made.
    assert "default_rng(0)" in builder.info.description
    assert "validation" in builder.info.description


def test_splits_are_deterministic_and_independent_of_line_order(tmp_path):
    write_hh(tmp_path / "a")
    shuffled = hh_lines()
    random.Random(1).shuffle(shuffled)
    write_hh(tmp_path / "b", lines=shuffled)
    content = {}
    for name in ("a", "b"):
        builder = _prepare(tmp_path, tmp_path / name, name=f"data_{name}")
        content[name] = {
            split: sorted((r["prompt"], r["chosen"]) for r in builders.read_split(builder, split))
            for split in ("train", "validation")
        }
    assert content["a"] == content["b"]
    # A different seed gives a different (still valid) validation set.
    keys = [splits.group_key(p) for p, _ in content["a"]["train"] + content["a"]["validation"]]
    assert (splits.validation_mask(keys, seed=0) != splits.validation_mask(keys, seed=1)).any()
    assert splits.validation_mask(keys, seed=1).sum() == 4


def test_validation_mask_keeps_groups_together():
    groups = ["a", "a", "a", "b", "c", "d", "e", "f", "g", "h"]
    for seed in range(20):
        mask = splits.validation_mask(groups, fraction=0.3, seed=seed)
        assert len({bool(m) for m in mask[:3]}) == 1
        assert mask.sum() >= 3


def test_upstream_repository_layout_and_shared_root(tmp_path):
    # ../shared/data root (file under hh_rlhf/) and the upstream helpful-base/test.jsonl.gz.
    write_hh(tmp_path / "root" / "hh_rlhf")
    builder = _prepare(tmp_path, tmp_path / "root", name="d1")
    assert builder.info.splits["train"].num_examples == 33
    repo = tmp_path / "repo" / "helpful-base"
    repo.mkdir(parents=True)
    (repo / "test.jsonl.gz").write_bytes((write_hh(tmp_path / "tmp")).read_bytes())
    builder = _prepare(tmp_path, tmp_path / "repo", name="d2")
    assert builder.info.splits["validation"].num_examples == 4


def _assert_nothing_prepared(data_dir):
    version_dir = data_dir / "hh_rlhf" / "helpful_base"
    leftovers = list(version_dir.iterdir()) if version_dir.exists() else []
    assert leftovers == []


def _gz(lines: list[str]) -> bytes:
    return gzip.compress("".join(x + "\n" for x in lines).encode(), mtime=0)


GOOD = json.dumps(
    {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"}
)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (_gz([GOOD, GOOD, '{"chosen": "x", "rejected": ']), r"helpful-base-test\.jsonl\.gz:3: malformed JSON"),
        (_gz([GOOD, json.dumps({"chosen": "x"})]), r"helpful-base-test\.jsonl\.gz:2: missing field 'rejected'"),
        (_gz([json.dumps({"chosen": 1, "rejected": "x"})]), r":1: field 'chosen' should be a string"),
        (_gz([GOOD, "[1, 2]"]), r":2: expected a JSON object"),
        (b"this is not gzip at all", r"helpful-base-test\.jsonl\.gz: unreadable at the start: not a gzip file"),
        (_gz([GOOD] * 200)[:-40], r"helpful-base-test\.jsonl\.gz: unreadable after line \d+: .*ends early"),
    ],
    ids=["malformed-json", "missing-field", "wrong-type", "not-object", "not-gzip", "truncated-gzip"],
)  # fmt: skip
def test_bad_input_names_file_and_line_and_writes_nothing(tmp_path, raw, message):
    write_hh(tmp_path / "manual", raw=raw)
    with pytest.raises(UserError, match=message):
        _prepare(tmp_path, tmp_path / "manual")
    _assert_nothing_prepared(tmp_path / "data")
    assert not (tmp_path / "data" / "hh_rlhf" / "helpful_base" / "1.0.0").exists()


def test_missing_manual_dir_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match=r"manual_dir .*nowhere does not exist"):
        _prepare(tmp_path, tmp_path / "nowhere")
    # Straight through TFDS (no pre-check) the builder says the same.
    builder = builders.get_builder("hh_rlhf/helpful_base", tmp_path / "data")
    config = tfds.download.DownloadConfig(manual_dir=str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match=r"manual_dir .*nowhere does not exist"):
        builder.download_and_prepare(file_format="array_record", download_config=config)
    _assert_nothing_prepared(tmp_path / "data")


def test_manual_dir_without_the_file(tmp_path):
    write_hh(tmp_path / "manual", subset="harmless-base")
    with pytest.raises(UserError, match=r"helpful-base-test\.jsonl\.gz not found in manual_dir"):
        _prepare(tmp_path, tmp_path / "manual")


def test_no_manual_dir_and_no_network_fails_fast(tmp_path, monkeypatch):
    def no_dns(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    with pytest.raises(
        UserError, match=r"cannot download https://github.com/anthropics/.*manual_dir"
    ):
        builders.prepare("hh_rlhf/helpful_base", data_dir=tmp_path / "data")
    _assert_nothing_prepared(tmp_path / "data")


def test_unknown_dataset_and_config():
    with pytest.raises(UserError, match="unknown dataset 'nope'"):
        builders.get_builder("nope/x")
    with pytest.raises(UserError, match="unknown config 'helpful' of hh_rlhf"):
        builders.get_builder("hh_rlhf/helpful")


def test_downloads_the_public_file_without_manual_dir(tmp_path, monkeypatch):
    fixture = write_hh(tmp_path / "remote")
    urls = []

    def fake_download(self, url):
        urls.append(url)
        return fixture

    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: [])
    monkeypatch.setattr(tfds.download.DownloadManager, "download", fake_download)
    builder = builders.prepare("hh_rlhf/helpful_base", data_dir=tmp_path / "data")
    assert urls == ["https://github.com/anthropics/hh-rlhf/raw/master/helpful-base/test.jsonl.gz"]
    source = builder.info.metadata["source"]
    assert source["origin"] == "download" and source["sha256_matches_upstream"] is False
    assert builder.info.splits["train"].num_examples == 33

    def failing_download(self, url):
        raise ConnectionError("connection reset")

    monkeypatch.setattr(tfds.download.DownloadManager, "download", failing_download)
    with pytest.raises(UserError, match=r"downloading https://\S+ failed .*connection reset"):
        builders.prepare("hh_rlhf/helpful_online", data_dir=tmp_path / "data")
