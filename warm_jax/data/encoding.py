"""Pair encoding for reward models: `<bos> prompt response <eos>`, cut to a maximum length.

A reward model reads its score at the last real token, so the end of the text is what must
survive truncation: the prompt is cut from the left (its oldest turns go first) and the response
is kept whole. Only a response that alone does not fit is cut, from the right, after the whole
prompt is gone; `<eos>` always stays the last real token. Both kinds of cut are counted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np


class TokenizerLike(Protocol):
    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...


@dataclasses.dataclass(frozen=True)
class EncodedSequence:
    tokens: np.ndarray  # int32 [n], n <= max_len, bos ... eos
    prompt_truncated: bool
    response_truncated: bool
    prompt_len: int  # before truncation, in tokens, without specials
    response_len: int


def encode_pair(
    prompt_ids: Sequence[int],
    response_ids: Sequence[int],
    max_len: int,
    *,
    bos_id: int,
    eos_id: int,
) -> EncodedSequence:
    """One side of a pair: `[bos] + prompt[-k:] + response + [eos]` with at most max_len tokens."""
    if max_len < 3:
        raise ValueError(f"max_len must leave room for bos, eos and a token, got {max_len}")
    room = max_len - 2
    response = list(response_ids)
    response_truncated = len(response) > room
    if response_truncated:
        response = response[:room]
    keep = room - len(response)
    prompt = list(prompt_ids)
    prompt_truncated = len(prompt) > keep
    if prompt_truncated:
        prompt = prompt[len(prompt) - keep :] if keep else []
    tokens = np.asarray([bos_id, *prompt, *response, eos_id], dtype=np.int32)
    return EncodedSequence(
        tokens, prompt_truncated, response_truncated, len(prompt_ids), len(response_ids)
    )


@dataclasses.dataclass
class EncodedPairs:
    """Encoded preference pairs, ragged (unpadded) until a row is read.

    `row(i)` gives the fixed-shape arrays a batch is made of; the `corrupted` flags and ids
    travel with the pairs, so that accuracy can later be split by them.
    """

    chosen: list[np.ndarray]
    rejected: list[np.ndarray]
    corrupted: np.ndarray  # bool [N]
    ids: list[str]
    max_len: int
    pad_id: int
    prompt_truncated: np.ndarray  # bool [N]: either side lost prompt tokens
    response_truncated: np.ndarray  # bool [N]: either side lost response tokens
    prompt_lens: np.ndarray  # int32 [N], untruncated
    chosen_lens: np.ndarray  # int32 [N], untruncated response lengths
    rejected_lens: np.ndarray

    def __len__(self) -> int:
        return len(self.chosen)

    def stats(self) -> dict[str, int]:
        return {
            "pairs": len(self),
            "prompt_truncated": int(self.prompt_truncated.sum()),
            "response_truncated": int(self.response_truncated.sum()),
            "corrupted": int(self.corrupted.sum()),
        }

    def row(self, i: int) -> dict[str, np.ndarray]:
        out: dict[str, Any] = {}
        for side, seqs in (("chosen", self.chosen), ("rejected", self.rejected)):
            out.update(padded_fields(side, seqs[i], self.max_len, self.pad_id))
        out["corrupted"] = np.bool_(self.corrupted[i])
        out["index"] = np.int32(i)
        return out

    def swapped(self, indices: np.ndarray) -> EncodedPairs:
        """A copy with chosen and rejected exchanged (and `corrupted` flipped) at `indices`."""
        chosen, rejected = list(self.chosen), list(self.rejected)
        chosen_lens, rejected_lens = self.chosen_lens.copy(), self.rejected_lens.copy()
        corrupted = self.corrupted.copy()
        for i in indices:
            chosen[i], rejected[i] = rejected[i], chosen[i]
            chosen_lens[i], rejected_lens[i] = rejected_lens[i], chosen_lens[i]
            corrupted[i] = not corrupted[i]
        return dataclasses.replace(
            self,
            chosen=chosen,
            rejected=rejected,
            chosen_lens=chosen_lens,
            rejected_lens=rejected_lens,
            corrupted=corrupted,
        )


def padded_fields(side: str, tokens: np.ndarray, max_len: int, pad_id: int) -> dict[str, Any]:
    """Right-padded `{side}_tokens/_segment_ids/_positions` [max_len] and `{side}_last` (scalar)."""
    n = len(tokens)
    padded = np.full(max_len, pad_id, np.int32)
    padded[:n] = tokens
    segment = np.zeros(max_len, np.int32)
    segment[:n] = 1
    positions = np.zeros(max_len, np.int32)
    positions[:n] = np.arange(n, dtype=np.int32)
    return {
        f"{side}_tokens": padded,
        f"{side}_segment_ids": segment,
        f"{side}_positions": positions,
        f"{side}_last": np.int32(n - 1),
    }


def encode_pairs(
    pairs: Sequence[Mapping[str, Any]], tokenizer: TokenizerLike, max_len: int
) -> EncodedPairs:
    """Encodes `{"prompt", "chosen", "rejected"[, "id", "corrupted"]}` records."""
    n = len(pairs)
    prompts = _encode_all(tokenizer, [p["prompt"] for p in pairs])
    chosen_ids = _encode_all(tokenizer, [p["chosen"] for p in pairs])
    rejected_ids = _encode_all(tokenizer, [p["rejected"] for p in pairs])
    chosen, rejected = [], []
    prompt_trunc = np.zeros(n, bool)
    response_trunc = np.zeros(n, bool)
    for i in range(n):
        c = encode_pair(
            prompts[i], chosen_ids[i], max_len, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id
        )
        r = encode_pair(
            prompts[i], rejected_ids[i], max_len, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id
        )
        chosen.append(c.tokens)
        rejected.append(r.tokens)
        prompt_trunc[i] = c.prompt_truncated or r.prompt_truncated
        response_trunc[i] = c.response_truncated or r.response_truncated
    return EncodedPairs(
        chosen=chosen,
        rejected=rejected,
        corrupted=np.array([bool(p.get("corrupted", False)) for p in pairs], dtype=bool),
        ids=[str(p.get("id", i)) for i, p in enumerate(pairs)],
        max_len=max_len,
        pad_id=tokenizer.pad_id,
        prompt_truncated=prompt_trunc,
        response_truncated=response_trunc,
        prompt_lens=np.array([len(x) for x in prompts], np.int32),
        chosen_lens=np.array([len(x) for x in chosen_ids], np.int32),
        rejected_lens=np.array([len(x) for x in rejected_ids], np.int32),
    )


def _encode_all(tokenizer: TokenizerLike, texts: list[str]) -> list[list[int]]:
    batch = getattr(tokenizer, "encode_batch", None)
    return batch(texts) if batch is not None else [tokenizer.encode(t) for t in texts]
