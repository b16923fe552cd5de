"""`warm-jax data list|prepare` through the real CLI entry point."""

from __future__ import annotations

import json

import tensorflow_datasets as tfds
from test_data_fixtures import hh_lines, write_hh

from warm_jax import cli
from warm_jax.data import builders, hh_rlhf
from warm_jax.data.encoding import encode_pairs
from warm_jax.data.tokenizer import Tokenizer, train_tokenizer

tfds.disable_progress_bar()


def test_list(capsys):
    assert cli.main(["data", "list"]) == 0
    out = capsys.readouterr().out
    for name in (
        "hh_rlhf/harmless_base",
        "hh_rlhf/helpful_base",
        "hh_rlhf/helpful_rejection_sampled",
        "hh_rlhf/helpful_online",
        "qa_feedback/dev",
        "text_corpus/tinyshakespeare",
        "text_corpus/hh_chosen",
    ):
        assert name in out


def test_prepare_prints_and_saves_summary(tmp_path, capsys):
    write_hh(tmp_path / "manual")
    texts = [line[k] for line in hh_lines() for k in ("chosen", "rejected")]
    train_tokenizer(texts, 200, "word").save(tmp_path / "tok")
    argv = ["data", "prepare", "--dataset", "hh_rlhf/helpful_base", "--manual_dir",
            str(tmp_path / "manual"), "--data_dir", str(tmp_path / "data"),
            "--tokenizer", str(tmp_path / "tok"), "--max_len", "12"]  # fmt: skip
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    path = tmp_path / "data" / "hh_rlhf" / "helpful_base" / "1.0.0" / "summary.json"
    assert f"summary saved to {path}" in out
    summary = json.loads(path.read_text())
    assert summary["examples"] == {"train": 33, "validation": 4}
    assert summary["metadata"]["dropped"] == {"identical": 1, "unseparable_prompt": 2}
    assert summary["metadata"]["raw_pairs"] == 40
    assert "dropped: identical 1, unseparable_prompt 2" in out
    # Truncation counts agree with encoding the split directly.
    tok = Tokenizer.load(tmp_path / "tok")
    builder = builders.get_builder("hh_rlhf/helpful_base", tmp_path / "data")
    for split in ("train", "validation"):
        enc = encode_pairs(builders.read_split(builder, split), tok, 12)
        stats = summary["splits"][split]
        assert stats["pairs"] == len(enc)
        assert stats["truncated"] == {
            "prompt": int(enc.prompt_truncated.sum()),
            "response": int(enc.response_truncated.sum()),
        }
        assert stats["token_lengths"]["prompt"]["max"] == int(enc.prompt_lens.max())
        assert f"{split}: {len(enc)} pairs" in out
    # Filler prompts are "Question number i about topic j?" = 6 words + "Human:"/"Assistant:".
    assert summary["splits"]["train"]["token_lengths"]["prompt"]["p50"] == 8
    assert summary["splits"]["train"]["truncated"]["prompt"] > 0


def test_prepare_trains_a_tokenizer_when_none_given(tmp_path, capsys):
    write_hh(tmp_path / "manual")
    argv = ["data", "prepare", "--dataset", "hh_rlhf/helpful_base", "--manual_dir",
            str(tmp_path / "manual"), "--data_dir", str(tmp_path / "data"), "--vocab_size", "300"]  # fmt: skip
    assert cli.main(argv) == 0
    version_dir = tmp_path / "data" / "hh_rlhf" / "helpful_base" / "1.0.0"
    summary = json.loads((version_dir / "summary.json").read_text())
    assert summary["tokenizer"]["trained_here"] and summary["tokenizer"]["vocab_size"] == 300
    tok = Tokenizer.load(version_dir / "tokenizer_bpe300")
    assert tok.decode(tok.encode(hh_rlhf.HUMAN)) == hh_rlhf.HUMAN


def test_bad_input_exits_2_with_file_and_line(tmp_path, capsys):
    write_hh(tmp_path / "manual", lines=[*hh_lines()[:4], "{broken"])
    argv = ["data", "prepare", "--dataset", "hh_rlhf/helpful_base", "--manual_dir",
            str(tmp_path / "manual"), "--data_dir", str(tmp_path / "data")]  # fmt: skip
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "helpful-base-test.jsonl.gz:5: malformed JSON" in err
    assert "Traceback" not in err
    assert cli.main([*argv[:5], str(tmp_path / "missing"), *argv[6:]]) == 2
    assert "missing does not exist" in capsys.readouterr().err
    assert cli.main(["data", "prepare", "--dataset", "hh_rlhf/nope"]) == 2
    assert "unknown config 'nope'" in capsys.readouterr().err
