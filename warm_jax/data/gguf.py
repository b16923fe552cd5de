"""The tokenizer embedded in a GGUF file (llama.cpp's format), read without the `gguf` package.

Only the header and the key/value metadata are parsed (the tensors are left alone), which is all a
tokenizer needs: `tokenizer.ggml.model`, `.tokens`, `.merges`, `.token_type` and the special-token
ids. Byte-level BPE vocabularies (`tokenizer.ggml.model == "gpt2"`: GPT-2, Llama 3, SmolLM,
Qwen...) are supported; SentencePiece ones (`"llama"`) are refused with a clear message.

Format (little-endian): magic "GGUF", uint32 version (2 or 3), uint64 tensor count, uint64
metadata count, then per entry a string key, a uint32 value type and the value; strings are a
uint64 byte length and UTF-8 bytes; arrays are a uint32 element type, a uint64 count, elements.
"""

from __future__ import annotations

import os
import struct
import warnings
from pathlib import Path
from typing import Any, BinaryIO

import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from warm_jax.errors import UserError

MAGIC = b"GGUF"
_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
STRING, ARRAY = 8, 9
# llama.cpp token types.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


# Metadata values nest (arrays of arrays); real files nest one or two levels.
_MAX_NESTING = 8


class _Reader:
    def __init__(self, f: BinaryIO, path: Path):
        self.f, self.path = f, path
        self.size = os.fstat(f.fileno()).st_size

    def read(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        raw = self.f.read(size)
        if len(raw) != size:
            raise UserError(f"{self.path}: truncated GGUF file (at byte {self.f.tell()})")
        return struct.unpack(fmt, raw)[0]

    def string(self) -> str:
        n = self.read("<Q")
        if n > self.size - self.f.tell():  # checked before reading: n may claim exabytes
            raise UserError(f"{self.path}: truncated GGUF file (at byte {self.f.tell()})")
        raw = self.f.read(n)
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int, depth: int = 0) -> Any:
        if vtype in _SCALARS:
            return self.read(_SCALARS[vtype])
        if vtype == STRING:
            return self.string()
        if vtype == ARRAY:
            if depth >= _MAX_NESTING:
                raise UserError(
                    f"{self.path}: GGUF arrays nested too deeply (at byte {self.f.tell()})"
                )
            etype, count = self.read("<I"), self.read("<Q")
            if count > self.size - self.f.tell():  # every element takes at least one byte
                raise UserError(f"{self.path}: truncated GGUF file (at byte {self.f.tell()})")
            return [self.value(etype, depth + 1) for _ in range(count)]
        raise UserError(f"{self.path}: unknown GGUF value type {vtype} (at byte {self.f.tell()})")


def read_gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """All metadata key/values of a GGUF file, plus `__version__` and `__tensor_count__`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        r = _Reader(f, path)
        if f.read(4) != MAGIC:
            raise UserError(f"{path}: not a GGUF file (bad magic)")
        version = r.read("<I")
        if version not in (2, 3):
            raise UserError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
        tensor_count, kv_count = r.read("<Q"), r.read("<Q")
        meta: dict[str, Any] = {"__version__": version, "__tensor_count__": tensor_count}
        for _ in range(kv_count):
            key = r.string()
            meta[key] = r.value(r.read("<I"))
    return meta


# How llama.cpp splits text into words before BPE, per `tokenizer.ggml.pre` (llama-vocab.cpp),
# written as the equivalent Hugging Face pre-tokenizers.
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = _LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")


def _pre_tokenizer(pre: str, path: str | os.PathLike):
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if pre in ("default", "gpt2", "gpt-2"):
        return byte_level
    if pre == "smollm":  # GPT-2 splitting, with every digit on its own
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in ("llama3", "llama-bpe", "llama-v3", "qwen2"):
        regex = _QWEN2_REGEX if pre == "qwen2" else _LLAMA3_REGEX
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(tokenizers.Regex(regex), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    warnings.warn(
        f"{path}: pre-tokenizer {pre!r} is not known here; splitting words like GPT-2, so some "
        "texts may tokenize differently from llama.cpp",
        stacklevel=3,
    )
    return byte_level


def tokenizer_from_gguf(path: str | os.PathLike):
    """The byte-level BPE tokenizer stored in a GGUF file's metadata."""
    from warm_jax.data.tokenizer import Tokenizer

    meta = read_gguf_metadata(path)
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise UserError(
            f"{path}: tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2')"
        )
    tokens: list[str] = meta.get("tokenizer.ggml.tokens") or []
    if not tokens:
        raise UserError(f"{path}: no tokenizer.ggml.tokens in the metadata")
    raw_merges = meta.get("tokenizer.ggml.merges", [])
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    pre = meta.get("tokenizer.ggml.pre", "default")
    for key, value, ok in (
        ("tokens", tokens, isinstance(tokens, list) and all(isinstance(t, str) for t in tokens)),
        (
            "merges",
            raw_merges,
            isinstance(raw_merges, list)
            and all(isinstance(m, str) and " " in m for m in raw_merges),
        ),
        ("token_type", types, isinstance(types, list) and len(types) == len(tokens)),
        ("pre", pre, isinstance(pre, str)),
    ):
        if not ok:
            raise UserError(f"{path}: malformed tokenizer.ggml.{key}: {str(value)[:80]}")
    merges = [tuple(m.split(" ", 1)) for m in raw_merges]
    vocab = {t: i for i, t in enumerate(tokens)}
    try:
        backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges))
    except Exception as e:  # the Rust side raises plain Exceptions (e.g. a merge of unknown tokens)
        raise UserError(f"{path}: the tokenizer in its metadata is invalid: {e}") from None
    backend.pre_tokenizer = _pre_tokenizer(pre, path)
    backend.decoder = decoders.ByteLevel()
    specials = [t for t, ty in zip(tokens, types) if ty in (CONTROL, USER_DEFINED)]
    if specials:
        backend.add_special_tokens(specials)

    def tok(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    wanted = {
        "bos": tok("bos_token_id"),
        "eos": tok("eos_token_id"),
        "pad": tok("padding_token_id"),
        "unk": tok("unknown_token_id"),
    }
    return Tokenizer._from_backend(backend, wanted, origin=str(path))
