"""Small raw files in the real upstream formats, written by the data tests into tmp dirs.

Imported by the other `test_data_*` modules (pytest puts `tests/` on sys.path); holds no tests.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

H, A = "\n\nHuman:", "\n\nAssistant:"

# A multi-turn dialogue whose sides differ only in the last Assistant turn.
MULTI_PROMPT = (
    f"{H} What should I cook tonight?{A} What do you have in the fridge?"
    f"{H} Eggs, spinach and some cheese.{A} An omelette would work well."
    f"{H} How do I keep it fluffy?{A}"
)
MULTI_CHOSEN = " Whisk the eggs well and cook them on low heat."
MULTI_REJECTED = " Just microwave it."

SPECIAL_LINES = [
    # line 1: single turn
    {"chosen": f"{H} Hi there{A} Hello! How can I help?", "rejected": f"{H} Hi there{A} Go away."},
    # line 2: multi-turn
    {"chosen": MULTI_PROMPT + MULTI_CHOSEN, "rejected": MULTI_PROMPT + MULTI_REJECTED},
    # line 3: identical sides -> dropped ("identical")
    {"chosen": f"{H} Same?{A} Yes.", "rejected": f"{H} Same?{A} Yes."},
    # line 4: the sides disagree before the last Assistant turn -> dropped ("unseparable_prompt")
    {"chosen": f"{H} Question A{A} Answer", "rejected": f"{H} Question B{A} Answer"},
    # line 5: a Human turn inside the final response -> dropped ("unseparable_prompt")
    {
        "chosen": f"{H} Tell me a joke{A} Why did the chicken{H} cross the road?",
        "rejected": f"{H} Tell me a joke{A} No.",
    },
    # lines 6, 7: two pairs sharing one prompt (must land in the same split)
    {"chosen": f"{H} Shared prompt{A} First good", "rejected": f"{H} Shared prompt{A} First bad"},
    {"chosen": f"{H} Shared prompt{A} Second good", "rejected": f"{H} Shared prompt{A} Second bad"},
]
N_FILLER = 33  # total kept pairs: 2 + 2 + 33 = 37 -> 4 in validation at 10 %


def hh_lines() -> list[dict[str, str]]:
    filler = [
        {
            "chosen": f"{H} Question number {i} about topic {i % 5}?{A} A careful answer {i}.",
            "rejected": f"{H} Question number {i} about topic {i % 5}?{A} A sloppy answer.",
        }
        for i in range(N_FILLER)
    ]
    return SPECIAL_LINES + filler


def write_hh(
    folder: Path, subset: str = "helpful-base", lines: list | None = None, raw: bytes | None = None
) -> Path:
    """Writes `<subset>-test.jsonl.gz` (the ../shared/data naming) into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{subset}-test.jsonl.gz"
    if raw is None:
        text = "".join(
            (ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in (lines or hh_lines())
        )
        raw = gzip.compress(text.encode("utf-8"), mtime=0)
    path.write_bytes(raw)
    return path


def qa_records() -> list[dict]:
    passages = [
        ["Bloom (album)", "Bloom is an album.", "It was released in 2018."],
        ["Troye Sivan", "Troye Sivan is a singer."],
    ]
    records = []
    for q in range(4):
        records.append(
            {
                "question": f"When was album {q} released?",
                "passages": passages,
                "gold": "gold answer",
                "prediction 1": f"Answer one to {q}.",
                "prediction 2": f"Answer two to {q}.",
                "prediction 3": f"Answer three to {q}.",
                "prediction 4": f"Answer four to {q}.",
                "feedback": {"errors": [], "missing-info": [], "corrected-prediction": "x"},
                # 1v2, 1v3, 1v4, 2v3, 2v4, 3v4
                "preference": [1, 2, 0, 1, 2, 0] if q == 0 else [1, 1, 1, 1, 1, 1],
            }
        )
    return records


def write_qa(folder: Path, records: list | None = None, text: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "qa_feedback-dev_feedback.json"
    path.write_text(text if text is not None else json.dumps(records or qa_records(), indent=2))
    return path


SHAKESPEARE = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\n"
    "All:\nResolved. resolved.\n\n\n"
    "First Citizen:\nFirst, you know Caius Marcius is chief enemy to the people.\n"
)


def write_shakespeare(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "input.txt"
    path.write_text(SHAKESPEARE)
    return path
