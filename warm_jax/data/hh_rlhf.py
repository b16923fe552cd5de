"""Anthropic HH-RLHF preference pairs as a TFDS builder (array_record, no TensorFlow).

Each upstream line is `{"chosen": dialogue, "rejected": dialogue}`; both dialogues share every turn
but the last Assistant turn. The prompt is that shared part, ending with "\\n\\nAssistant:"; the
responses are what follows (leading space kept), so `prompt + chosen` is the upstream dialogue.

Point the builder at the files with TFDS's manual_dir:
    warm-jax data prepare --dataset hh_rlhf/helpful_base --manual_dir ../shared/data/hh_rlhf
or in Python:
    b = HhRlhf(config="helpful_base", data_dir=DIR)
    b.download_and_prepare(file_format="array_record",
                           download_config=tfds.download.DownloadConfig(manual_dir=".../hh_rlhf"))
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from typing import Any, ClassVar

import tensorflow_datasets as tfds

from warm_jax.data import readers, sources, splits

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
_URL = "https://github.com/anthropics/hh-rlhf/raw/master/{subset}/test.jsonl.gz"
_SHA256 = {
    "harmless-base": "ebfaaed21162a4de120ae85366075b34425e2a6303fac59b99555002f7016f03",
    "helpful-base": "8be3fc1a13b27901631696f2be6f184c799f1baeaf145f53ac5db24960adc37b",
    "helpful-rejection-sampled": (
        "6186fc698c638dd5c6bbb33e0c115762d6fdfac0a18969ff4901545307f89a54"
    ),
    "helpful-online": "2094b210af6b2a792b1169d2930586c4b4b384d3b8a4a14460702d383c17df7f",
}
DROP_REASONS = ("identical", "unseparable_prompt")


def remote_file(subset: str) -> sources.RemoteFile:
    return sources.RemoteFile(
        url=_URL.format(subset=subset),
        names=(f"{subset}-test.jsonl.gz", f"{subset}/test.jsonl.gz"),
        folder="hh_rlhf",
        sha256=_SHA256.get(subset, ""),
    )


def split_dialogue(chosen: str, rejected: str) -> tuple[str, str, str] | str:
    """(prompt, chosen response, rejected response), or the reason the pair is dropped.

    A pair is separable when both sides contain an Assistant turn, everything before their last
    Assistant turn is identical, and neither final turn contains a further Human turn.
    """
    if chosen == rejected:
        return "identical"
    i, j = chosen.rfind(ASSISTANT), rejected.rfind(ASSISTANT)
    if i < 0 or j < 0 or chosen[:i] != rejected[:j]:
        return "unseparable_prompt"
    cut = i + len(ASSISTANT)
    prompt, a, b = chosen[:cut], chosen[cut:], rejected[j + len(ASSISTANT) :]
    if HUMAN in a or HUMAN in b:
        return "unseparable_prompt"
    return prompt, a, b


@dataclasses.dataclass
class ParsedPairs:
    examples: list[dict[str, str]]
    dropped: dict[str, int]
    raw: int


def parse_file(path: str | os.PathLike, config: str) -> ParsedPairs:
    """All pairs of one upstream file; raises `UserError` (file:line) on the first bad line."""
    examples, dropped, raw = [], dict.fromkeys(DROP_REASONS, 0), 0
    for line, obj in readers.read_jsonl(path):
        readers.require_str_fields(obj, ("chosen", "rejected"), path, line)
        raw += 1
        parts = split_dialogue(obj["chosen"], obj["rejected"])
        if isinstance(parts, str):
            dropped[parts] += 1
            continue
        prompt, chosen, rejected = parts
        examples.append(
            {"id": f"{config}:{line}", "prompt": prompt, "chosen": chosen, "rejected": rejected}
        )
    return ParsedPairs(examples, dropped, raw)


def split_pairs(
    examples: list[dict[str, str]],
) -> dict[str, list[dict[str, str]]]:
    mask = splits.validation_mask([splits.group_key(e["prompt"]) for e in examples])
    return {
        "train": [e for e, v in zip(examples, mask) if not v],
        "validation": [e for e, v in zip(examples, mask) if v],
    }


@dataclasses.dataclass
class HhRlhfConfig(tfds.core.BuilderConfig):
    subset: str = ""  # upstream folder name, e.g. "helpful-base"


_CONFIGS = [
    HhRlhfConfig(
        name=s.replace("-", "_"),
        subset=s,
        description=f"HH-RLHF `{s}` (upstream test file {s}/test.jsonl.gz).",
    )
    for s in ("harmless-base", "helpful-base", "helpful-rejection-sampled", "helpful-online")
]


class HhRlhf(tfds.core.GeneratorBasedBuilder):
    """HH-RLHF chosen/rejected pairs, one config per upstream subset."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "Prompt/response split, seeded train/validation from test."
    }
    BUILDER_CONFIGS: ClassVar[list[tfds.core.BuilderConfig]] = _CONFIGS
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put the upstream files (e.g. helpful-base-test.jsonl.gz, or the repository layout "
        "helpful-base/test.jsonl.gz) in a folder and pass it as manual_dir, e.g. "
        "--manual_dir ../shared/data/hh_rlhf."
    )

    def remote_files(self) -> list[sources.RemoteFile]:
        return [remote_file(self.builder_config.subset)]

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "Anthropic HH-RLHF human preference pairs. Each example: `prompt` (every turn up "
                "to and including the last '\\n\\nAssistant:'), `chosen` and `rejected` final "
                "responses, and `id` = '<config>:<line of the upstream file>'. Pairs whose two "
                "sides are identical, or whose prompt cannot be separated (different earlier "
                "turns, no Assistant turn, a Human turn inside the final response), are dropped "
                "and counted in the metadata (`dropped`). " + splits.describe(unit="prompt")
            ),
            features=tfds.features.FeaturesDict(
                {k: tfds.features.Text() for k in ("id", "prompt", "chosen", "rejected")}
            ),
            homepage="https://github.com/anthropics/hh-rlhf",
            license="MIT",
            metadata=tfds.core.MetadataDict(),
            # Records are written in the order generated (sorted by id), not hash order.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager) -> dict[str, Iterator[tuple[str, Any]]]:
        remote = remote_file(self.builder_config.subset)
        located = sources.locate(dl_manager, f"hh_rlhf/{self.builder_config.name}", remote)
        parsed = parse_file(located.path, self.builder_config.name)
        by_split = split_pairs(parsed.examples)
        splits.check_nonempty(by_split, f"hh_rlhf/{self.builder_config.name}", str(located.path))
        self.info.metadata.update(
            {
                "source": located.metadata(remote.sha256),
                "raw_pairs": parsed.raw,
                "dropped": parsed.dropped,
                "split_seed": splits.SPLIT_SEED,
                "validation_fraction": splits.VALIDATION_FRACTION,
            }
        )
        return {name: self._generate_examples(rows) for name, rows in by_split.items()}

    def _generate_examples(self, rows: list[dict[str, str]]) -> Iterator[tuple[str, Any]]:
        for row in rows:
            yield row["id"], row
