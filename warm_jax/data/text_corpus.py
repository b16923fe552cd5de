"""Plain-text corpora for pretraining the tiny LM, as a TFDS builder (`{"id", "text"}` examples).

Configs:
- `tinyshakespeare`: karpathy's input.txt cut into documents at blank lines (one speech each);
  manual_dir=../shared/data/tinyshakespeare.
- `hh_chosen`: the chosen dialogues of HH-RLHF `harmless_base` and `helpful_base`, **train split
  only** (the same split as the `hh_rlhf` builder). Pretraining on validation or out-of-distribution
  pairs' chosen sides would leak their labels into the reward models' starting point, so those are
  left out; manual_dir=../shared/data/hh_rlhf.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

import tensorflow_datasets as tfds

from warm_jax.data import hh_rlhf, readers, sources, splits

SHAKESPEARE = sources.RemoteFile(
    url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
    names=("input.txt", "tinyshakespeare.txt"),
    folder="tinyshakespeare",
    sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
)
HH_SUBSETS = ("harmless-base", "helpful-base")


def split_documents(text: str) -> list[str]:
    """Blank-line separated blocks, stripped, empty ones skipped."""
    return [d.strip() for d in text.replace("\r\n", "\n").split("\n\n") if d.strip()]


class TextCorpus(tfds.core.GeneratorBasedBuilder):
    """Plain text documents for language-model pretraining."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "tinyshakespeare and HH chosen dialogues."}
    BUILDER_CONFIGS: ClassVar[list[tfds.core.BuilderConfig]] = [
        tfds.core.BuilderConfig(
            name="tinyshakespeare", description="tinyshakespeare, one speech each."
        ),
        tfds.core.BuilderConfig(
            name="hh_chosen",
            description="Chosen dialogues of HH-RLHF harmless/helpful base, train split only.",
        ),
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "tinyshakespeare: a folder holding input.txt (--manual_dir ../shared/data/tinyshakespeare)."
        " hh_chosen: the HH-RLHF folder (--manual_dir ../shared/data/hh_rlhf)."
    )

    def remote_files(self) -> list[sources.RemoteFile]:
        if self.builder_config.name == "tinyshakespeare":
            return [SHAKESPEARE]
        return [hh_rlhf.remote_file(s) for s in HH_SUBSETS]

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "Plain-text documents for pretraining. tinyshakespeare: input.txt split at blank "
                "lines, id 'tinyshakespeare:<index>'. hh_chosen: chosen dialogues of the "
                "hh_rlhf harmless_base and helpful_base *train* splits (validation pairs are "
                "excluded to keep their labels out of pretraining), id as in hh_rlhf. "
                + splits.describe(unit="document text (tinyshakespeare) or prompt (hh_chosen)")
            ),
            features=tfds.features.FeaturesDict(
                {"id": tfds.features.Text(), "text": tfds.features.Text()}
            ),
            metadata=tfds.core.MetadataDict(),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager) -> dict[str, Iterator[tuple[str, Any]]]:
        name = self.builder_config.name
        if name == "tinyshakespeare":
            by_split = self._shakespeare(dl_manager)
        else:
            by_split = self._hh_chosen(dl_manager)
        splits.check_nonempty(by_split, f"text_corpus/{name}", "the input")
        self.info.metadata.update(
            {"split_seed": splits.SPLIT_SEED, "validation_fraction": splits.VALIDATION_FRACTION}
        )
        return {split: self._generate_examples(rows) for split, rows in by_split.items()}

    def _shakespeare(self, dl_manager) -> dict[str, list[dict[str, str]]]:
        located = sources.locate(dl_manager, "text_corpus/tinyshakespeare", SHAKESPEARE)
        docs = split_documents(readers.read_text(located.path))
        rows = [{"id": f"tinyshakespeare:{i}", "text": d} for i, d in enumerate(docs)]
        # Grouped by text: a line repeated in the play never sits on both sides.
        mask = splits.validation_mask([splits.group_key(r["text"]) for r in rows])
        self.info.metadata["source"] = located.metadata(SHAKESPEARE.sha256)
        return {
            "train": [r for r, v in zip(rows, mask) if not v],
            "validation": [r for r, v in zip(rows, mask) if v],
        }

    def _hh_chosen(self, dl_manager) -> dict[str, list[dict[str, str]]]:
        train, prompts, src = [], [], {}
        for subset in HH_SUBSETS:
            remote = hh_rlhf.remote_file(subset)
            located = sources.locate(dl_manager, "text_corpus/hh_chosen", remote)
            config = subset.replace("-", "_")
            parsed = hh_rlhf.parse_file(located.path, config)
            src[config] = located.metadata(remote.sha256)
            by_split = hh_rlhf.split_pairs(parsed.examples)
            # The pair's train split is this corpus; its own train/validation split (for LM
            # perplexity) is made inside it, again grouped by prompt.
            for e in by_split["train"]:
                train.append({"id": e["id"], "text": (e["prompt"] + e["chosen"]).strip()})
                prompts.append(e["prompt"])
        self.info.metadata["source"] = src
        mask = splits.validation_mask([splits.group_key(p) for p in prompts])
        validation = [r for r, v in zip(train, mask) if v]
        train = [r for r, v in zip(train, mask) if not v]
        return {"train": train, "validation": validation}

    def _generate_examples(self, rows: list[dict[str, str]]) -> Iterator[tuple[str, Any]]:
        for row in rows:
            yield row["id"], row
