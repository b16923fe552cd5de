"""TFDS builder `oracle_task`: the synthetic review language of `oracle_task.py` as datasets.

Configs (each with `train` and `validation` splits, generated from a fixed seed, no download):

- `corpus`: {"text"} pretraining documents (`oracle_task.sample_corpus`).
- `sft`: {"prompt", "response", "gold"} SFT demonstrations and their gold rewards.
- `prefs`: {"prompt", "response_a", "response_b", "gold_a", "gold_b", "a_preferred"} two SFT-
  distribution responses to one prompt with a clean Bradley–Terry label (corruption, if wanted,
  is applied downstream so that clean and corrupted runs share one dataset).

Prepared as array_record, so it needs no TensorFlow: read it with `builder.as_data_source(split)`
(random access, what grain consumes), never `as_dataset`::

    builder = prepare_oracle_task("sft", data_dir="~/tensorflow_datasets")
    source = builder.as_data_source("train")
    source[0]  # {"prompt": b"how was the pasta ?", "response": b"...", "gold": 0.8}
"""

from __future__ import annotations

import dataclasses
import inspect
import os

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core import utils as tfds_utils

from warm_jax.data import oracle_task

_KINDS = ("corpus", "sft", "prefs")
# Validation streams use seeds far from the training ones so the two splits are independent draws;
# `prefs` is offset from `sft` so that preference pairs are not the SFT demonstrations themselves.
_VALIDATION_SEED_OFFSET = 1_000_003
_KIND_SEED_OFFSET = {"corpus": 0, "sft": 0, "prefs": 500_009}


@dataclasses.dataclass
class OracleTaskConfig(tfds.core.BuilderConfig):
    """A config: `kind` (corpus / sft / prefs; defaults to `name`), sizes, seed.

    TFDS refuses a custom config named like a built-in one, so a custom size of, say, the SFT set
    is `OracleTaskConfig(name="sft_small", kind="sft", num_train=1000)`. `beta` is the
    Bradley–Terry inverse temperature of the `prefs` labels.
    """

    kind: str = ""
    num_train: int = 50_000
    num_validation: int = 2_000
    seed: int = 0
    beta: float = 5.0


class OracleTask(tfds.core.GeneratorBasedBuilder):
    """The built-in synthetic task: a tiny review grammar with a gold reward (see oracle_task)."""

    name = "oracle_task"
    # Bump whenever the grammar, the samplers or the gold reward change, so caches are rebuilt.
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}  # noqa: RUF012 (TFDS reads a class dict)
    BUILDER_CONFIGS = [  # noqa: RUF012 (TFDS reads a class list)
        OracleTaskConfig(name="corpus", description="Pretraining documents.", num_train=50_000),
        OracleTaskConfig(name="sft", description="Prompt/response demonstrations.", num_train=20_000),
        OracleTaskConfig(name="prefs", description="Gold-labelled preference pairs.", num_train=20_000),
    ]  # fmt: skip
    DEFAULT_CONFIG_NAME = "sft"

    @tfds_utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path | None:
        # TFDS 4.9.10's default resolves the package through `importlib_resources`, which it only
        # installs on Python < 3.9, so it crashes for packages installed in editable mode.
        return epath.Path(inspect.getfile(cls))

    def _info(self) -> tfds.core.DatasetInfo:
        kind = self._kind
        if kind not in _KINDS:
            raise ValueError(f"oracle_task config kind must be one of {_KINDS}, got {kind!r}")
        text = tfds.features.Text
        gold = tfds.features.Scalar(dtype=np.float32)
        features = {
            "corpus": {"text": text()},
            "sft": {"prompt": text(), "response": text(), "gold": gold},
            "prefs": {
                "prompt": text(),
                "response_a": text(),
                "response_b": text(),
                "gold_a": gold,
                "gold_b": gold,
                "a_preferred": tfds.features.Scalar(dtype=np.bool_),
            },
        }[kind]
        return self.dataset_info_from_configs(
            description=oracle_task.__doc__,
            features=tfds.features.FeaturesDict(features),
            # The order is the sampling order: keeping it makes runs reproducible from the seed.
            disable_shuffling=True,
        )

    @property
    def _kind(self) -> str:
        return self.builder_config.kind or self.builder_config.name

    def _split_generators(self, dl_manager):
        del dl_manager  # everything is generated locally
        cfg = self.builder_config
        seed = cfg.seed + _KIND_SEED_OFFSET[self._kind]
        return {
            "train": self._generate_examples(cfg.num_train, seed),
            "validation": self._generate_examples(
                cfg.num_validation, seed + _VALIDATION_SEED_OFFSET
            ),
        }

    def _generate_examples(self, n: int, seed: int):
        kind = self._kind
        if kind == "corpus":
            for i, text in enumerate(oracle_task.sample_corpus(n, seed)):
                yield i, {"text": text}
            return
        prompts = oracle_task.sample_prompts(n, seed)
        responses = oracle_task.sample_responses(prompts, seed)
        gold = oracle_task.gold_rewards(prompts, responses)
        if kind == "sft":
            for i, (p, r, g) in enumerate(zip(prompts, responses, gold)):
                yield i, {"prompt": p, "response": r, "gold": g}
            return
        others = oracle_task.sample_responses(prompts, seed + 1)
        gold_b = oracle_task.gold_rewards(prompts, others)
        labels = oracle_task.bradley_terry_labels(gold, gold_b, seed, beta=self.builder_config.beta)
        for i in range(n):
            yield (
                i,
                {
                    "prompt": prompts[i],
                    "response_a": responses[i],
                    "response_b": others[i],
                    "gold_a": gold[i],
                    "gold_b": gold_b[i],
                    "a_preferred": labels[i],
                },
            )


def prepare_oracle_task(
    config: str | OracleTaskConfig = "sft", data_dir: str | os.PathLike | None = None
) -> OracleTask:
    """Builds (once; later calls reuse the files) and returns the builder, as array_record."""
    builder = OracleTask(config=config, data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
    return builder
