"""Tokenizers: trained by the project (byte-level BPE or word-level) or loaded from a checkpoint.

Everything goes through the Hugging Face `tokenizers` library so that one class serves the tiny
models' own tokenizer and the tokenizer of a pretrained checkpoint (`tokenizer.json`, or the one
embedded in a GGUF file, see `warm_jax.data.gguf`).

The project's own tokenizers reserve fixed ids for the special tokens: `<pad>`=0, `<bos>`=1,
`<eos>`=2, `<unk>`=3. A loaded tokenizer keeps its own ids; its special tokens are read from a
`tokenizer_config.json` beside it (Hugging Face layout) or recognised by their usual names.
"""

from __future__ import annotations

import collections
import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from warm_jax.errors import UserError

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
KINDS = ("bpe", "word")

# Names under which pretrained vocabularies spell their special tokens, most specific first.
_KNOWN_SPECIALS = {
    "bos": (
        "<bos>",
        "<s>",
        "<|begin_of_text|>",
        "<|startoftext|>",
        "<|endoftext|>",
        "<|im_start|>",
    ),
    "eos": ("<eos>", "</s>", "<|end_of_text|>", "<|eot_id|>", "<|endoftext|>", "<|im_end|>"),
    "pad": ("<pad>", "[PAD]", "<|pad|>", "<|finetune_right_pad_id|>"),
    "unk": ("<unk>", "[UNK]", "<|unk|>"),
}


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the ids of the special tokens the models rely on.

    `encode` never adds special tokens: callers wrap documents in `bos_id`/`eos_id` themselves
    (the packing and pair-encoding code do), so the same text always maps to the same ids.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        pad_id: int,
        bos_id: int,
        eos_id: int,
        unk_id: int | None = None,
    ):
        self.backend = backend
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = pad_id, bos_id, eos_id, unk_id
        # Raw data may contain the literal text "<eos>": it must not become the control token.
        backend.encode_special_tokens = True
        self._parsing: tokenizers.Tokenizer | None = None

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, parse_special: bool = False) -> list[int]:
        """Token ids of `text`, nothing added. Special-token text ("<eos>", "<|im_start|>") is
        encoded as plain text unless parse_special=True (for chat templates you wrote yourself).
        """
        backend = self._parsing_backend() if parse_special else self.backend
        return backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def _parsing_backend(self) -> tokenizers.Tokenizer:
        if self._parsing is None:
            self._parsing = tokenizers.Tokenizer.from_str(self.backend.to_str())
            self._parsing.encode_special_tokens = False
        return self._parsing

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids if int(i) != self.pad_id]
        return self.backend.decode(ids, skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(i)

    def to_json(self) -> str:
        return self.backend.to_str()

    def special_tokens(self) -> dict[str, str | None]:
        def name(i: int | None) -> str | None:
            return None if i is None else self.backend.id_to_token(i)

        return {
            "pad_token": name(self.pad_id),
            "bos_token": name(self.bos_id),
            "eos_token": name(self.eos_id),
            "unk_token": name(self.unk_id),
        }

    def save(self, directory: str | os.PathLike) -> Path:
        """Writes `tokenizer.json` (and `tokenizer_config.json`) into `directory`, atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        _atomic_write(directory / CONFIG_FILE, json.dumps(self.special_tokens(), indent=2) + "\n")
        _atomic_write(directory / TOKENIZER_FILE, self.to_json())
        return directory / TOKENIZER_FILE

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Loads from a directory holding `tokenizer.json`, a `tokenizer.json`, or a `.gguf` file."""
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if path.suffix == ".gguf":
            from warm_jax.data.gguf import tokenizer_from_gguf

            return tokenizer_from_gguf(path)
        if path.suffix == ".model":
            raise UserError(
                f"{path}: SentencePiece models are not supported directly (sentencepiece is not a "
                "dependency); convert it to a tokenizer.json (e.g. with transformers' "
                "`AutoTokenizer.from_pretrained(...).save_pretrained(dir)`) and load that"
            )
        return cls.from_tokenizer_json(path)

    @classmethod
    def from_tokenizer_json(
        cls,
        path: str | os.PathLike,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
    ) -> Tokenizer:
        """A Hugging Face `tokenizer.json`; special tokens from arguments, config, or by name."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"tokenizer file not found: {path}")
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises plain Exceptions with a parse message
            raise UserError(f"{path}: not a readable tokenizer.json: {e}") from None
        config = _read_config(path.parent / CONFIG_FILE)
        wanted = {
            "bos": bos_token or config.get("bos_token"),
            "eos": eos_token or config.get("eos_token"),
            "pad": pad_token or config.get("pad_token"),
            "unk": config.get("unk_token"),
        }
        return cls._from_backend(backend, wanted, origin=str(path))

    @classmethod
    def _from_backend(
        cls, backend: tokenizers.Tokenizer, wanted: dict[str, str | None], origin: str
    ) -> Tokenizer:
        ids: dict[str, int | None] = {}
        for role, token in wanted.items():
            candidates = (token,) if token else _KNOWN_SPECIALS[role]
            ids[role] = next(
                (i for t in candidates if (i := backend.token_to_id(t)) is not None), None
            )
            if token and ids[role] is None:
                raise UserError(f"{origin}: {role} token {token!r} is not in the vocabulary")
        if ids["eos"] is None:
            raise UserError(
                f"{origin}: cannot tell which token ends a sequence; write a {CONFIG_FILE} "
                'beside it with "eos_token" (and "bos_token", "pad_token")'
            )
        eos = ids["eos"]
        # Vocabularies without a pad (Llama) or bos token reuse eos: padding is masked by
        # segment ids anyway, and a start token only has to be consistent.
        return cls(
            backend,
            pad_id=eos if ids["pad"] is None else ids["pad"],
            bos_id=eos if ids["bos"] is None else ids["bos"],
            eos_id=eos,
            unk_id=ids["unk"],
        )

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, pad={self.pad_id}, bos={self.bos_id}, "
            f"eos={self.eos_id})"
        )


def train_tokenizer(texts: Iterable[str], vocab_size: int, kind: str = "bpe") -> Tokenizer:
    """Trains a tokenizer on `texts`; the same texts in the same order give the same tokenizer.

    kind="bpe": byte-level BPE (any text round-trips; needs vocab_size >= 4 + 256 bytes).
    kind="word": one id per whitespace-separated word, the `vocab_size - 4` most frequent ones
    (ties broken alphabetically); exact for a closed-vocabulary synthetic language.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {KINDS}")
    texts = list(texts)
    backend = _train_bpe(texts, vocab_size) if kind == "bpe" else _train_word(texts, vocab_size)
    return Tokenizer(backend, pad_id=0, bos_id=1, eos_id=2, unk_id=3)


def _train_bpe(texts: list[str], vocab_size: int) -> tokenizers.Tokenizer:
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(SPECIAL_TOKENS) + len(alphabet):
        raise ValueError(
            f"a byte-level BPE needs vocab_size >= {len(SPECIAL_TOKENS) + len(alphabet)}, "
            f"got {vocab_size}"
        )
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        # Every byte in the vocabulary, seen in training or not, so no text is ever unknown.
        initial_alphabet=alphabet,
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return backend


def _train_word(texts: list[str], vocab_size: int) -> tokenizers.Tokenizer:
    if vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must exceed {len(SPECIAL_TOKENS)}, got {vocab_size}")
    # Counted here rather than by the library's trainer so that ties are broken by a rule
    # we control (count, then the word itself), not by hash order.
    counts = collections.Counter(w for t in texts for w in t.split())
    for s in SPECIAL_TOKENS:
        counts.pop(s, None)
    words = sorted(counts, key=lambda w: (-counts[w], w))[: vocab_size - len(SPECIAL_TOKENS)]
    vocab = {t: i for i, t in enumerate((*SPECIAL_TOKENS, *words))}
    backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return backend


def _read_config(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not valid UTF-8 ({e.reason})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    out = {}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = raw.get(key)
        if isinstance(value, dict):  # Hugging Face also writes AddedToken objects here
            value = value.get("content")
        if isinstance(value, str):
            out[key] = value
    return out


def _atomic_write(path: Path, text: str) -> None:
    """Write-then-rename, so a reader never sees a half-written file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
