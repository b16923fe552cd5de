"""FineGrainedRLHF QA-Feedback (dev set) as preference pairs: a TFDS builder.

Each record has a question, its grounding passages, four sampled answers (`prediction 1..4`) and
six human pairwise preferences in the fixed order 1v2, 1v3, 1v4, 2v3, 2v4, 3v4 (1 = first
preferred, 2 = second, 0 = tie). Every strict preference becomes one pair; ties are dropped and
counted. The prompt is the passages, then the question:

    context:
    wikipage: <title>
    text: <sentences joined by spaces>
    ... (one wikipage/text block per passage)
    question: <question>
    answer:

The question comes last because pair encoding truncates prompts from the left: a long prompt
loses its first passages, never the question.

and each response is " " + the answer text. Use manual_dir=../shared/data/finegrained_rlhf.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds

from warm_jax.data import readers, sources, splits
from warm_jax.errors import UserError

COMPARISONS = ((1, 2), (1, 3), (1, 4), (2, 3), (2, 4), (3, 4))
DROP_REASONS = ("tie", "identical")
REMOTE = sources.RemoteFile(
    url=(
        "https://raw.githubusercontent.com/allenai/FineGrainedRLHF/main/"
        "tasks/qa_feedback/data/dev_feedback.json"
    ),
    names=("qa_feedback-dev_feedback.json", "dev_feedback.json", "tasks/qa_feedback/data/dev.json"),
    folder="finegrained_rlhf",
    sha256="f394289ecfdc5a2d1663170254b92d75ad3c53ba36df9f627c70d4c6fc4f3291",
)


def format_prompt(question: str, passages: list[list[str]]) -> str:
    blocks = [f"wikipage: {p[0]}\ntext: {' '.join(s.strip() for s in p[1:])}" for p in passages]
    return "context:\n" + "".join(b + "\n" for b in blocks) + f"question: {question}\nanswer:"


@dataclasses.dataclass
class ParsedPairs:
    examples: list[dict[str, Any]]
    dropped: dict[str, int]
    raw: int  # comparisons seen (6 per record)
    records: int


def _check_record(rec: Any, path: str | os.PathLike, line: int) -> None:
    if not isinstance(rec, dict):
        raise UserError(f"{path}:{line}: expected a JSON object, got {type(rec).__name__}")
    readers.require_str_fields(
        rec, ("question", *(f"prediction {k}" for k in range(1, 5))), path, line
    )
    for field in ("passages", "preference"):
        if field not in rec:
            raise UserError(f"{path}:{line}: missing field {field!r}")
    passages = rec["passages"]
    if not isinstance(passages, list) or not all(
        isinstance(p, list) and p and all(isinstance(s, str) for s in p) for p in passages
    ):
        raise UserError(
            f"{path}:{line}: field 'passages' should be a list of [title, sentence, ...] lists"
        )
    pref = rec["preference"]
    if not (
        isinstance(pref, list)
        and len(pref) == len(COMPARISONS)
        and all(p in (0, 1, 2) and not isinstance(p, bool) for p in pref)
    ):
        raise UserError(
            f"{path}:{line}: field 'preference' should be {len(COMPARISONS)} values in "
            f"{{0, 1, 2}}, got {pref!r}"
        )


def parse_file(path: str | os.PathLike) -> ParsedPairs:
    """All strict-preference pairs; raises `UserError` naming file and line on a bad record."""
    records = readers.read_json_array(path)
    examples, dropped = [], dict.fromkeys(DROP_REASONS, 0)
    for index, (line, rec) in enumerate(records):
        _check_record(rec, path, line)
        prompt = format_prompt(rec["question"], rec["passages"])
        for (a, b), pref in zip(COMPARISONS, rec["preference"]):
            if pref == 0:
                dropped["tie"] += 1
                continue
            win, lose = (a, b) if pref == 1 else (b, a)
            chosen, rejected = rec[f"prediction {win}"], rec[f"prediction {lose}"]
            if chosen == rejected:
                dropped["identical"] += 1
                continue
            examples.append(
                {
                    "id": f"dev:{index}:{a}v{b}",
                    "prompt": prompt,
                    "chosen": " " + chosen,
                    "rejected": " " + rejected,
                    "question": rec["question"],
                    "chosen_answer": win,
                    "rejected_answer": lose,
                }
            )
    return ParsedPairs(examples, dropped, raw=len(COMPARISONS) * len(records), records=len(records))


def split_pairs(examples: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    # Grouped by question: answers to one question never straddle train and validation.
    mask = splits.validation_mask([splits.group_key(e["question"]) for e in examples])
    return {
        "train": [e for e, v in zip(examples, mask) if not v],
        "validation": [e for e, v in zip(examples, mask) if v],
    }


class QaFeedback(tfds.core.GeneratorBasedBuilder):
    """FineGrainedRLHF QA-Feedback human preferences between four answers, as pairs."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "Strict pairwise preferences of the dev set."
    }
    BUILDER_CONFIGS: ClassVar[list[tfds.core.BuilderConfig]] = [
        tfds.core.BuilderConfig(name="dev", description="The 500-question dev_feedback.json.")
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put qa_feedback-dev_feedback.json (or upstream dev_feedback.json) in a folder and pass "
        "it as manual_dir, e.g. --manual_dir ../shared/data/finegrained_rlhf."
    )

    def remote_files(self) -> list[sources.RemoteFile]:
        return [REMOTE]

    def _info(self) -> tfds.core.DatasetInfo:
        text = tfds.features.Text()
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "FineGrainedRLHF QA-Feedback: every strict human preference among the four "
                "answers to a question becomes a (prompt, chosen, rejected) pair; ties are "
                "dropped and counted in the metadata (`dropped`). Prompt = passages, then the question. "
                "`id` = 'dev:<record index>:<a>v<b>'. " + splits.describe(unit="question")
            ),
            features=tfds.features.FeaturesDict(
                {
                    "id": text,
                    "prompt": text,
                    "chosen": text,
                    "rejected": text,
                    "question": text,
                    "chosen_answer": tfds.features.Scalar(dtype=np.int32),
                    "rejected_answer": tfds.features.Scalar(dtype=np.int32),
                }
            ),
            homepage="https://github.com/allenai/FineGrainedRLHF",
            license="Apache-2.0",
            metadata=tfds.core.MetadataDict(),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager) -> dict[str, Iterator[tuple[str, Any]]]:
        located = sources.locate(dl_manager, "qa_feedback/dev", REMOTE)
        parsed = parse_file(located.path)
        self.info.metadata.update(
            {
                "source": located.metadata(REMOTE.sha256),
                "records": parsed.records,
                "raw_pairs": parsed.raw,
                "dropped": parsed.dropped,
                "split_seed": splits.SPLIT_SEED,
                "validation_fraction": splits.VALIDATION_FRACTION,
            }
        )
        by_split = split_pairs(parsed.examples)
        splits.check_nonempty(by_split, "qa_feedback/dev", str(located.path))
        return {name: self._generate_examples(rows) for name, rows in by_split.items()}

    def _generate_examples(self, rows: list[dict[str, Any]]) -> Iterator[tuple[str, Any]]:
        for row in rows:
            yield row["id"], row
