"""Preference-pair splits for reward models: training pairs, ID validation, OOD test sets.

Two tasks, one result type (`PairSplits`: encoded pairs per split, `corrupted` flags kept):

**oracle** (built in, seconds on a CPU). For a prompt of `oracle_task`, two responses drawn from
the SFT distribution (`sample_responses` with two seeds) are labelled by a Bradley–Terry draw on
the gold reward, P(a ≻ b) = σ(β (g_a − g_b)). Train and validation pairs are exactly the records
of the `oracle_task/prefs` TFDS builder (same seeds), generated in memory. Two OOD sets model a
policy that has drifted away from the SFT distribution, the shift WARM is about:

- `drifted`: *both* responses are SFT responses edited the way an RL policy drifts against a
  proxy: a sentence repeated, off-topic praise appended, a list of adjectives appended, another
  whole review appended (longer), or the final period dropped (an unfinished sentence) — one or
  two edits each, none for a fifth of the responses. The gold reward's penalties (repetition,
  off-topic, length, unparsed) now matter as much as sentiment, which training pairs rarely show.
- `hacked`: an SFT response against one of `oracle_task.hacked_responses` (repetition, negated
  praise, word salad, adjective lists, off-topic praise, rambling): texts a proxy that "counts
  positive words" overrates and the gold reward punishes.

**hh_rlhf** (real data, read from the jsonl.gz files in ../shared/data/hh_rlhf, never copied).
Train on `helpful-base` pairs (base-model responses; the train part of the project's seeded
split), validate on its validation part (ID), test OOD on `helpful-rejection-sampled` and
`helpful-online` (responses of policies optimised against a preference model). Dialogue turns are
separated by one newline instead of a blank line (`normalize_dialogue`), as in the pretraining
corpus written by `write_hh_corpus` (the pretrainer splits documents at blank lines).

Label corruption (WARM Sec. 4.2: 25 % of training labels swapped) applies to the training split
only, with `corrupted` flags that the evaluation uses to split training accuracy.
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import gin
import numpy as np

from warm_jax.data import hh_rlhf, oracle_task
from warm_jax.data.corruption import corrupted_indices
from warm_jax.data.encoding import EncodedPairs, TokenizerLike, encode_pairs, padded_fields
from warm_jax.errors import UserError

TASKS = ("oracle", "hh_rlhf")
ORACLE_OOD = ("drifted", "hacked")
HH_OOD = ("helpful-rejection-sampled", "helpful-online")
RESPONSE_SOURCES = ("grammar", "policy")
# (prompts, seed) -> one response per prompt: how "policy" pairs get their responses.
Responder = Callable[[list[str], int], list[str]]
# The seeds of the `oracle_task/prefs` builder (oracle_builder.py), so that our pairs are its records.
_PREFS_SEED_OFFSET = 500_009
_VALIDATION_SEED_OFFSET = 1_000_003
_OOD_SEED_OFFSET = {"drifted": 2_000_029, "hacked": 3_000_017}
PAIR_FIELDS = tuple(
    f"{side}_{f}" for side in ("chosen", "rejected") for f in ("tokens", "segment_ids", "positions")
)


@dataclasses.dataclass(frozen=True)
class PairDataConfig:
    """Which pairs a reward-model experiment uses (saved with it, so evaluation rebuilds them).

    task: "oracle" or "hh_rlhf". max_len: tokens per side (`<bos> prompt response <eos>`).
    responses (oracle): "grammar" draws train/validation responses from the task's SFT
    distribution; "policy" samples them from the reward models' own SFT policy at
    `policy_temperature` (the paper's setting), then labels them with the gold reward.
    corruption: fraction of training labels swapped (seeded by corruption_seed).
    ood: names of the OOD sets (oracle: "drifted", "hacked"; hh_rlhf: upstream subsets).
    oracle: num_train / num_validation / num_ood pairs, seed, beta (BT inverse temperature).
    hh_rlhf: data_dir holding the jsonl.gz files, train_subset.
    max_train_pairs / max_eval_pairs: optional seeded subsets (None keeps everything).
    """

    task: str = "oracle"
    max_len: int = 64
    corruption: float = 0.0
    corruption_seed: int = 0
    ood: tuple[str, ...] = ORACLE_OOD
    num_train: int = 2000
    num_validation: int = 500
    num_ood: int = 500
    seed: int = 0
    beta: float = 5.0
    data_dir: str = "../shared/data/hh_rlhf"
    train_subset: str = "helpful-base"
    max_train_pairs: int | None = None
    max_eval_pairs: int | None = None
    responses: str = "grammar"
    policy_temperature: float = 1.0

    def __post_init__(self):
        if self.task not in TASKS:
            raise UserError(f"pair_data.task={self.task!r}; choose from {list(TASKS)}")
        if self.responses not in RESPONSE_SOURCES:
            raise UserError(
                f"pair_data.responses={self.responses!r}; choose from {list(RESPONSE_SOURCES)}"
            )
        if self.responses == "policy" and self.task != "oracle":
            raise UserError("pair_data.responses='policy' needs the oracle task (a gold labeller)")
        if not 0.0 <= self.corruption <= 1.0:
            raise UserError(f"pair_data.corruption must be in [0, 1], got {self.corruption}")
        object.__setattr__(self, "ood", tuple(self.ood))
        known = ORACLE_OOD if self.task == "oracle" else None
        if known is not None and set(self.ood) - set(known):
            raise UserError(
                f"pair_data.ood={list(self.ood)}: the oracle task has OOD sets {list(known)}"
            )

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["ood"] = list(self.ood)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PairDataConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: (tuple(v) if k == "ood" else v) for k, v in d.items() if k in fields})


@gin.configurable
def pair_data(**overrides: Any) -> PairDataConfig:
    """The pair data of a reward-model experiment, configured as `pair_data.NAME = VALUE`."""
    return PairDataConfig(**overrides)


@dataclasses.dataclass
class PairSplits:
    """Encoded pairs per split: `train` (corrupted flags set), `validation`, and `ood[name]`."""

    train: EncodedPairs
    validation: EncodedPairs
    ood: dict[str, EncodedPairs]

    def eval_splits(self) -> dict[str, EncodedPairs]:
        """Every split by evaluation name: train, validation, ood/<name>."""
        return {
            "train": self.train,
            "validation": self.validation,
            **{f"ood/{k}": v for k, v in self.ood.items()},
        }

    def stats(self) -> dict[str, dict[str, int]]:
        return {k: v.stats() for k, v in self.eval_splits().items()}


# --------------------------------------------------------------------------------------------
# The oracle task


def _gold_labelled(
    prompts: Sequence[str], a: Sequence[str], b: Sequence[str], seed: int, beta: float, tag: str
) -> list[dict[str, Any]]:
    gold_a = oracle_task.gold_rewards(prompts, a)
    gold_b = oracle_task.gold_rewards(prompts, b)
    a_wins = oracle_task.bradley_terry_labels(gold_a, gold_b, seed, beta=beta)
    out = []
    for i, (p, x, y, w) in enumerate(zip(prompts, a, b, a_wins)):
        chosen, rejected = (x, y) if w else (y, x)
        gold_c, gold_r = (gold_a[i], gold_b[i]) if w else (gold_b[i], gold_a[i])
        out.append(
            {
                "id": f"{tag}:{i}",
                "prompt": p,
                "chosen": chosen,
                "rejected": rejected,
                "gold_chosen": float(gold_c),
                "gold_rejected": float(gold_r),
            }
        )
    return out


def _split_sentences(words: list[str]) -> list[list[str]]:
    out, cur = [], []
    for w in words:
        cur.append(w)
        if w == ".":
            out.append(cur)
            cur = []
    if cur:
        out.append(cur)
    return out


DRIFTS = ("repeat", "off_topic", "praise_list", "extend", "truncate")


def drift_response(rng: random.Random, prompt: str, response: str) -> str:
    """One or two drift edits of an SFT response (see the module docstring), or none (20 %)."""
    topic = oracle_task.prompt_topic(prompt) or rng.choice(oracle_task.TOPICS)
    words = response.split()
    if rng.random() < 0.2:
        return response
    positive = [w for w, v in oracle_task.ADJECTIVES.items() if v >= 0.5]
    for kind in rng.sample(DRIFTS, rng.choice((1, 2))):
        if kind == "repeat":
            sentences = [s for s in _split_sentences(words) if s[-1] == "."]
            if sentences:
                words = words + rng.choice(sentences)
        elif kind == "off_topic":
            other = rng.choice([t for t in oracle_task.TOPICS if t != topic])
            words = [*words, "the", other, "was", rng.choice(positive), "."]
        elif kind == "praise_list":
            adjs = rng.sample(positive, 3)
            words = [*words, "it", "was", adjs[0], "and", adjs[1], "and", adjs[2], "."]
        elif kind == "extend":
            extra = oracle_task.sample_responses([prompt], rng.randrange(1 << 30))[0]
            words = words + extra.split()
        elif kind == "truncate" and words and words[-1] == ".":
            words = words[:-1]
    return " ".join(words)


def oracle_pair_records(
    n: int, seed: int, source: str = "sft", beta: float = 5.0, responder: Responder | None = None
) -> list[dict[str, Any]]:
    """`n` gold-labelled pairs: `{"id", "prompt", "chosen", "rejected", "gold_chosen",
    "gold_rejected"}`. source "sft" gives the `oracle_task/prefs` builder's records for `seed`
    (or, with `responder`, two of its responses per prompt, drawn with seeds `seed`, `seed + 1`);
    "drifted" and "hacked" the OOD pairs of the module docstring."""
    prompts = oracle_task.sample_prompts(n, seed)
    if source == "sft":
        respond = responder or oracle_task.sample_responses
        a = respond(prompts, seed)
        b = respond(prompts, seed + 1)
    elif source == "drifted":
        rng = random.Random(f"drift/{seed}")
        a = [
            drift_response(rng, p, r)
            for p, r in zip(prompts, oracle_task.sample_responses(prompts, seed))
        ]
        b = [
            drift_response(rng, p, r)
            for p, r in zip(prompts, oracle_task.sample_responses(prompts, seed + 1))
        ]
    elif source == "hacked":
        rng = random.Random(f"hacked/{seed}")
        sft = oracle_task.sample_responses(prompts, seed)
        a, b = [], []
        for p, r in zip(prompts, sft):
            hacks = oracle_task.hacked_responses(oracle_task.prompt_topic(p) or "pasta")
            h = hacks[rng.choice(sorted(hacks))]
            # Random sides, so that "a" carries no signal of its own.
            x, y = (r, h) if rng.random() < 0.5 else (h, r)
            a.append(x)
            b.append(y)
    else:
        raise ValueError(f"unknown oracle pair source {source!r}")
    return _gold_labelled(prompts, a, b, seed, beta, tag=f"{source}/{seed}")


# --------------------------------------------------------------------------------------------
# HH-RLHF


def collapse_blank_lines(text: str) -> str:
    """Every run of newlines becomes one: blank lines separate the pretrainer's documents."""
    return re.sub(r"\n{2,}", "\n", text)


def normalize_dialogue(text: str) -> str:
    """Turns separated by one newline instead of a blank line (the pretrainer's document
    separator), leading newlines dropped: "Human: ...\\nAssistant: ..."."""
    return collapse_blank_lines(text).lstrip("\n")


def hh_file(data_dir: str | os.PathLike, subset: str) -> Path:
    """The upstream jsonl.gz of `subset` inside `data_dir` (shared-data or upstream layout)."""
    root = Path(data_dir).expanduser()
    tried = []
    for name in hh_rlhf.remote_file(subset).names:
        for candidate in (root / name, root / "hh_rlhf" / name):
            if candidate.is_file():
                return candidate
            tried.append(str(candidate))
    raise UserError(f"HH-RLHF subset {subset!r} not found; looked for {tried}")


def hh_split_records(data_dir: str | os.PathLike, subset: str) -> dict[str, list[dict[str, str]]]:
    """The project's seeded train/validation split of one HH-RLHF subset (as the TFDS builder),
    dialogue text normalised: `{"train": [...], "validation": [...]}`, and "all"."""
    config = subset.replace("-", "_")
    parsed = hh_rlhf.parse_file(hh_file(data_dir, subset), config)
    by_split = hh_rlhf.split_pairs(parsed.examples)
    out = {}
    for name, rows in (*by_split.items(), ("all", parsed.examples)):
        out[name] = [
            {
                "id": r["id"],
                "prompt": normalize_dialogue(r["prompt"]),
                "chosen": collapse_blank_lines(r["chosen"]),
                "rejected": collapse_blank_lines(r["rejected"]),
            }
            for r in rows
        ]
    return out


def write_hh_corpus(
    path: str | os.PathLike,
    data_dir: str | os.PathLike = "../shared/data/hh_rlhf",
    subsets: Sequence[str] = ("helpful-base", "harmless-base"),
) -> int:
    """Writes the chosen dialogues of the *train* split of `subsets` as a text file for
    `warm-jax pretrain --gin.pretrain.corpus=PATH` (one dialogue per blank-line separated
    paragraph, normalised). Validation and OOD pairs stay out of pretraining. Returns the count."""
    docs = []
    for subset in subsets:
        for r in hh_split_records(data_dir, subset)["train"]:
            docs.append((r["prompt"] + r["chosen"]).strip())
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    os.replace(tmp, p)
    return len(docs)


# --------------------------------------------------------------------------------------------
# Splits


def _subset(records: list[dict], cap: int | None, seed: int) -> list[dict]:
    if cap is None or len(records) <= cap:
        return records
    keep = np.sort(np.random.default_rng(seed).choice(len(records), cap, replace=False))
    return [records[i] for i in keep]


def split_records(
    config: PairDataConfig, responder: Responder | None = None
) -> dict[str, list[dict[str, Any]]]:
    """The raw records of every split: "train", "validation", "ood/<name>". `responder` is
    required when `config.responses == "policy"` (it draws the train/validation responses)."""
    c = config
    if c.responses == "policy" and responder is None:
        raise UserError("pair_data.responses='policy' needs the SFT policy to sample from")
    if c.task == "oracle":
        base = c.seed + _PREFS_SEED_OFFSET
        r = responder if c.responses == "policy" else None
        out = {
            "train": oracle_pair_records(c.num_train, base, "sft", c.beta, r),
            "validation": oracle_pair_records(
                c.num_validation, base + _VALIDATION_SEED_OFFSET, "sft", c.beta, r
            ),
        }
        for name in c.ood:
            out[f"ood/{name}"] = oracle_pair_records(
                c.num_ood, base + _OOD_SEED_OFFSET[name], name, c.beta
            )
    else:
        base = hh_split_records(c.data_dir, c.train_subset)
        out = {"train": base["train"], "validation": base["validation"]}
        for name in c.ood:
            if name == c.train_subset:
                raise UserError(f"pair_data.ood names the training subset {name!r}")
            out[f"ood/{name}"] = hh_split_records(c.data_dir, name)["all"]
    out["train"] = _subset(out["train"], c.max_train_pairs, c.seed)
    for k in out:
        if k != "train":
            out[k] = _subset(out[k], c.max_eval_pairs, c.seed + 1)
    for k, v in out.items():
        if not v:
            raise UserError(f"pair data split {k!r} is empty ({c.task})")
    return out


def build_splits(
    config: PairDataConfig, tokenizer: TokenizerLike, responder: Responder | None = None
) -> PairSplits:
    """Encodes every split with `tokenizer` (see `encoding.encode_pair`) and corrupts the
    training labels."""
    records = split_records(config, responder)
    enc = {k: encode_pairs(v, tokenizer, config.max_len) for k, v in records.items()}
    train = enc.pop("train")
    if config.corruption:
        train = train.swapped(
            corrupted_indices(len(train), config.corruption, config.corruption_seed)
        )
    validation = enc.pop("validation")
    return PairSplits(
        train=train, validation=validation, ood={k[len("ood/") :]: v for k, v in enc.items()}
    )


def to_arrays(
    encoded: EncodedPairs, indices: Sequence[int] | np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Dense arrays of (a subset of) encoded pairs: the six `PAIR_FIELDS` int32 [N, max_len],
    `corrupted` bool [N], `valid` bool [N] (all True) and `index` int32 [N]."""
    idx = np.arange(len(encoded)) if indices is None else np.asarray(indices, np.int64)
    n, length = len(idx), encoded.max_len
    out = {f: np.zeros((n, length), np.int32) for f in PAIR_FIELDS}
    for j, i in enumerate(idx):
        for side, seqs in (("chosen", encoded.chosen), ("rejected", encoded.rejected)):
            row = padded_fields(side, seqs[i], length, encoded.pad_id)
            for f in ("tokens", "segment_ids", "positions"):
                out[f"{side}_{f}"][j] = row[f"{side}_{f}"]
    out["corrupted"] = np.asarray(encoded.corrupted, bool)[idx]
    out["valid"] = np.ones(n, bool)
    out["index"] = idx.astype(np.int32)
    return out


def training_arrays(encoded: EncodedPairs) -> dict[str, np.ndarray]:
    """What a training batch needs: the six pair fields only (nothing else is sent to devices)."""
    arrays = to_arrays(encoded)
    return {k: arrays[k] for k in PAIR_FIELDS}
