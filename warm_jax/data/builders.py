"""The project's TFDS builders by name, and preparing / reading them without TensorFlow.

Datasets are named "builder/config" (`hh_rlhf/helpful_base`); a bare builder name means its first
config. Data is written as array_record and read back as random-access data sources
(`as_data_source`), which is what grain consumes; `as_dataset()` would need TensorFlow.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds

from warm_jax.errors import UserError

# name -> module defining the builder class (imported on demand; TFDS import is not free).
_MODULES = {
    "hh_rlhf": ("warm_jax.data.hh_rlhf", "HhRlhf"),
    "qa_feedback": ("warm_jax.data.qa_feedback", "QaFeedback"),
    "text_corpus": ("warm_jax.data.text_corpus", "TextCorpus"),
}
# Builders defined elsewhere in the project that register with TFDS on import.
_OPTIONAL_MODULES = ("warm_jax.data.oracle_builder",)


def builder_classes() -> dict[str, type[tfds.core.DatasetBuilder]]:
    classes = {}
    for name, (module, cls) in _MODULES.items():
        classes[name] = getattr(importlib.import_module(module), cls)
    for module in _OPTIONAL_MODULES:
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        for obj in vars(mod).values():
            if (
                isinstance(obj, type)
                and issubclass(obj, tfds.core.DatasetBuilder)
                and obj.__module__ == mod.__name__
                and not getattr(obj, "__abstractmethods__", None)
            ):
                classes.setdefault(obj.name, obj)
    return classes


def parse_name(dataset: str) -> tuple[str, str | None]:
    name, _, config = dataset.partition("/")
    return name, (config or None)


def get_builder(
    dataset: str, data_dir: str | os.PathLike | None = None
) -> tfds.core.DatasetBuilder:
    """The builder for "name/config"; unknown names and configs are a `UserError`."""
    name, config = parse_name(dataset)
    classes = builder_classes()
    if name not in classes:
        raise UserError(f"unknown dataset {name!r}; known: {', '.join(sorted(classes))}")
    cls = classes[name]
    configs = [c.name for c in (cls.BUILDER_CONFIGS or [])]
    if config is not None and config not in configs:
        raise UserError(
            f"unknown config {config!r} of {name}; known: {', '.join(configs) or '(none)'}"
        )
    kwargs: dict[str, Any] = {"data_dir": None if data_dir is None else os.fspath(data_dir)}
    if configs:
        kwargs["config"] = config or configs[0]
    return cls(**kwargs)


def prepare(
    dataset: str,
    *,
    data_dir: str | os.PathLike | None = None,
    manual_dir: str | os.PathLike | None = None,
    force: bool = False,
) -> tfds.core.DatasetBuilder:
    """Prepares (once; `force` regenerates) and returns the builder, ready for `read_split`.

    The manual_dir is checked before TFDS starts, so a wrong path fails with nothing written.
    """
    builder = get_builder(dataset, data_dir)
    # (Not `builder.is_prepared()`: on a fresh data_dir it logs a misleading absl warning.)
    prepared = (Path(builder.data_dir) / "dataset_info.json").is_file()
    if manual_dir is not None and (force or not prepared):
        from warm_jax.data import sources

        remotes = getattr(builder, "remote_files", None)
        sources.check_manual_dir(manual_dir, dataset, remotes() if remotes else ())
    mode = (
        tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS
        if force
        else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
    )
    config = tfds.download.DownloadConfig(
        manual_dir=None if manual_dir is None else os.fspath(manual_dir), download_mode=mode
    )
    builder.download_and_prepare(file_format="array_record", download_config=config)
    return builder


def read_split(builder: tfds.core.DatasetBuilder, split: str) -> list[dict[str, Any]]:
    """All examples of a split (TFDS split syntax allowed: "train[:10%]"), text as `str`."""
    source = builder.as_data_source(split)
    return [decode_example(source[i]) for i in range(len(source))]


def decode_example(example: dict[str, Any]) -> dict[str, Any]:
    """TFDS hands text features back as bytes; everything downstream wants `str`."""
    return {k: v.decode("utf-8") if isinstance(v, bytes) else v for k, v in example.items()}


def load(
    dataset: str,
    split: str,
    *,
    data_dir: str | os.PathLike | None = None,
    manual_dir: str | os.PathLike | None = None,
) -> list[dict[str, Any]]:
    """Prepares `dataset` if needed and returns one split as a list of dicts."""
    return read_split(prepare(dataset, data_dir=data_dir, manual_dir=manual_dir), split)


def list_datasets() -> list[tuple[str, str]]:
    """("name/config", description) for every known builder config."""
    out = []
    for name, cls in sorted(builder_classes().items()):
        configs: Sequence[Any] = cls.BUILDER_CONFIGS or []
        if not configs:
            out.append((name, (cls.__doc__ or "").strip().splitlines()[0]))
        for c in configs:
            out.append((f"{name}/{c.name}", c.description or ""))
    return out
