"""The QA-Feedback builder: strict preferences become pairs, ties are counted, bad records named."""

from __future__ import annotations

import json

import pytest
import tensorflow_datasets as tfds
from test_data_fixtures import qa_records, write_qa

from warm_jax.data import builders, qa_feedback
from warm_jax.errors import UserError

tfds.disable_progress_bar()


def test_pairs_from_preferences(tmp_path):
    path = write_qa(tmp_path)
    parsed = qa_feedback.parse_file(path)
    # Record 0: [1, 2, 0, 1, 2, 0] -> 4 pairs, 2 ties; records 1-3: six pairs each.
    assert parsed.records == 4 and parsed.raw == 24
    assert parsed.dropped == {"tie": 2, "identical": 0}
    assert len(parsed.examples) == 4 + 3 * 6
    first = [e for e in parsed.examples if e["id"].startswith("dev:0:")]
    got = [(e["id"], e["chosen_answer"], e["rejected_answer"]) for e in first]
    assert got == [
        ("dev:0:1v2", 1, 2),  # preference 1: the first of the pair wins
        ("dev:0:1v3", 3, 1),  # preference 2: the second wins
        ("dev:0:2v3", 2, 3),
        ("dev:0:2v4", 4, 2),
    ]
    assert (
        first[1]["chosen"] == " Answer three to 0." and first[1]["rejected"] == " Answer one to 0."
    )


def test_prompt_has_passages_then_question():
    rec = qa_records()[0]
    prompt = qa_feedback.format_prompt(rec["question"], rec["passages"])
    assert prompt == (
        "context:\n"
        "wikipage: Bloom (album)\ntext: Bloom is an album. It was released in 2018.\n"
        "wikipage: Troye Sivan\ntext: Troye Sivan is a singer.\n"
        "question: When was album 0 released?\nanswer:"
    )


def test_builder_splits_by_question(tmp_path):
    write_qa(tmp_path / "manual")
    builder = builders.prepare(
        "qa_feedback/dev", data_dir=tmp_path / "d", manual_dir=tmp_path / "manual"
    )
    assert builder.info.metadata["dropped"] == {"tie": 2, "identical": 0}
    train = builders.read_split(builder, "train")
    val = builders.read_split(builder, "validation")
    assert len(train) + len(val) == 22
    # round(0.1 * 22) = 2 pairs wanted; a whole question (4 or 6 pairs) goes to validation.
    assert len(val) in (4, 6)
    assert {r["question"] for r in train}.isdisjoint({r["question"] for r in val})
    row = next(r for r in train + val if r["id"] == "dev:1:3v4")
    assert row["chosen_answer"] == 3 and row["rejected_answer"] == 4
    assert row["prompt"].endswith("question: When was album 1 released?\nanswer:")


def _line_of(text: str, needle: str) -> int:
    return text[: text.index(needle)].count("\n") + 1


def test_missing_field_names_the_record_line(tmp_path):
    records = qa_records()
    del records[2]["preference"]
    text = json.dumps(records, indent=2)
    path = write_qa(tmp_path / "m", text=text)
    line = _line_of(text, '"question": "When was album 2') - 1  # the record's opening brace
    with pytest.raises(UserError, match=rf"{path.name}:{line}: missing field 'preference'"):
        qa_feedback.parse_file(path)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: r.update(preference=[1, 2, 3, 0, 0, 0]), r":\d+: field 'preference' should be 6 values"),
        (lambda r: r.update(passages="nope"), r":\d+: field 'passages' should be a list"),
        (lambda r: r.pop("prediction 4"), r":\d+: missing field 'prediction 4'"),
    ],
)  # fmt: skip
def test_invalid_records(tmp_path, mutate, message):
    records = qa_records()
    mutate(records[1])
    path = write_qa(tmp_path / "m", records=records)
    with pytest.raises(UserError, match=message):
        qa_feedback.parse_file(path)


def test_malformed_json_line_and_no_partial_dataset(tmp_path):
    text = json.dumps(qa_records(), indent=2)
    broken = text.replace('"gold": "gold answer",', '"gold": "gold answer"', 3)
    line = _line_of(broken, '"gold": "gold answer"\n') + 1
    write_qa(tmp_path / "m", text=broken)
    with pytest.raises(UserError, match=rf"qa_feedback-dev_feedback\.json:{line}: malformed JSON"):
        builders.prepare("qa_feedback/dev", data_dir=tmp_path / "d", manual_dir=tmp_path / "m")
    assert not (tmp_path / "d" / "qa_feedback" / "dev" / "1.0.0").exists()
