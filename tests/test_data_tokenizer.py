"""Tokenizers: deterministic training, fixed special ids, save/load, tokenizer.json and GGUF."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap

import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from warm_jax.data import gguf
from warm_jax.data.tokenizer import Tokenizer, train_tokenizer
from warm_jax.errors import UserError

CORPUS = [
    "the cat sat on the mat",
    "the dog sat on the log",
    "a cat and a dog",
    "Ünïcödé text — with dashes, émojis 🙂 and tabs\tand newlines\n",
] * 5


def test_bpe_special_ids_and_round_trip():
    tok = train_tokenizer(CORPUS, vocab_size=300, kind="bpe")
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    assert [tok.id_to_token(i) for i in range(4)] == ["<pad>", "<bos>", "<eos>", "<unk>"]
    assert tok.vocab_size == 300
    for text in [*CORPUS, "never seen: ʃ∂ƒ © 你好"]:
        ids = tok.encode(text)
        assert min(ids) >= 4  # no special token, no unknown byte
        assert tok.decode(ids) == text
    # Frequent words became single tokens.
    assert len(tok.encode("the")) == 1
    # Literal special-token text in data stays text; padding is skipped by decode.
    ids = tok.encode("say <eos> now")
    assert tok.eos_id not in ids and tok.decode([*ids, 0, 0]) == "say <eos> now"


def test_bpe_needs_room_for_bytes():
    with pytest.raises(ValueError, match="vocab_size >= 260"):
        train_tokenizer(CORPUS, vocab_size=100, kind="bpe")


def test_word_level_is_exact_and_ordered_by_frequency():
    tok = train_tokenizer(["b a c a", "c a b a", "d"], vocab_size=7, kind="word")
    # Counts: a 4, b 2, c 2, d 1 -> a, b, c (ties alphabetical); d does not fit.
    assert [tok.id_to_token(i) for i in range(tok.vocab_size)] == [
        "<pad>",
        "<bos>",
        "<eos>",
        "<unk>",
        "a",
        "b",
        "c",
    ]
    assert tok.encode("a  b\nc d") == [4, 5, 6, 3]
    assert tok.decode([1, 4, 5, 2, 0, 0]) == "<bos> a b <eos>"


def test_training_is_deterministic_across_processes(tmp_path):
    (tmp_path / "corpus.json").write_text(json.dumps(CORPUS))
    script = textwrap.dedent(
        f"""
        import json, sys
        from warm_jax.data.tokenizer import train_tokenizer
        corpus = json.load(open({str(tmp_path / "corpus.json")!r}))
        sys.stdout.write(train_tokenizer(corpus, 320, "bpe").to_json())
        """
    )
    other = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout
    assert other == train_tokenizer(CORPUS, 320, "bpe").to_json()
    assert (
        train_tokenizer(CORPUS, 9, "word").to_json() == train_tokenizer(CORPUS, 9, "word").to_json()
    )


def test_save_and_load(tmp_path):
    tok = train_tokenizer(CORPUS, vocab_size=280)
    path = tok.save(tmp_path / "model")
    assert path == tmp_path / "model" / "tokenizer.json"
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == [
        "tokenizer.json",
        "tokenizer_config.json",
    ]  # no temporary files left behind
    for source in (tmp_path / "model", path):
        again = Tokenizer.load(source)
        assert (again.pad_id, again.bos_id, again.eos_id, again.vocab_size) == (0, 1, 2, 280)
        assert again.encode(CORPUS[3]) == tok.encode(CORPUS[3])


def _foreign_tokenizer() -> tokenizers.Tokenizer:
    vocab = {"<s>": 0, "</s>": 1, "a": 2, "b": 3, "ab": 4, "Ġ": 5, "Ġab": 6}
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b"), ("Ġ", "ab")]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<s>", "</s>"])
    return backend


def test_foreign_tokenizer_json(tmp_path):
    _foreign_tokenizer().save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.from_tokenizer_json(tmp_path / "tokenizer.json")
    # Recognised by name; no pad token -> eos pads.
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 1)
    assert tok.encode("ab ab") == [4, 6]
    # An HF tokenizer_config.json (AddedToken objects allowed) overrides the guess.
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": {"content": "</s>"}, "eos_token": "</s>", "pad_token": "<s>"})
    )
    tok = Tokenizer.load(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 1, 0)


def test_bad_tokenizer_files(tmp_path):
    with pytest.raises(UserError, match="tokenizer file not found"):
        Tokenizer.load(tmp_path / "missing")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match=r"not a readable tokenizer\.json"):
        Tokenizer.load(tmp_path)
    with pytest.raises(UserError, match="SentencePiece"):
        Tokenizer.load(tmp_path / "spm.model")


# --- GGUF: a tiny file written here in the published layout (v3, little-endian) -------------


def _gguf_string(s: str) -> bytes:
    raw = s.encode()
    return struct.pack("<Q", len(raw)) + raw


def _gguf_value(value) -> tuple[int, bytes]:
    if isinstance(value, str):
        return 8, _gguf_string(value)
    if isinstance(value, bool):
        return 7, struct.pack("<?", value)
    if isinstance(value, int):
        return 4, struct.pack("<I", value)
    if isinstance(value, float):
        return 6, struct.pack("<f", value)
    etype = _gguf_value(value[0])[0]
    body = b"".join(_gguf_value(v)[1] for v in value)
    return 9, struct.pack("<IQ", etype, len(value)) + body


def write_gguf(path, metadata: dict) -> None:
    out = [b"GGUF", struct.pack("<IQQ", 3, 0, len(metadata))]
    for key, value in metadata.items():
        vtype, body = _gguf_value(value)
        out += [_gguf_string(key), struct.pack("<I", vtype), body]
    path.write_bytes(b"".join(out))


def test_gguf_tokenizer(tmp_path):
    tokens = ["<|endoftext|>", "<|im_start|>", "a", "b", "ab", "Ġ", "Ġab", "c"]
    write_gguf(
        tmp_path / "m.gguf",
        {
            "general.architecture": "llama",
            "llama.rope.freq_base": 100000.0,
            "tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [3, 3, 1, 1, 1, 1, 1, 1],
            "tokenizer.ggml.merges": ["a b", "Ġ ab"],
            "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.eos_token_id": 0,
            "tokenizer.ggml.add_bos_token": False,
        },
    )
    meta = gguf.read_gguf_metadata(tmp_path / "m.gguf")
    assert meta["__version__"] == 3 and meta["tokenizer.ggml.tokens"] == tokens
    assert (
        meta["llama.rope.freq_base"] == 100000.0 and meta["tokenizer.ggml.add_bos_token"] is False
    )
    tok = Tokenizer.load(tmp_path / "m.gguf")
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 0, 0, 8)
    assert tok.encode("ab abc") == [4, 6, 7]
    assert tok.encode("<|im_start|>ab", parse_special=True) == [1, 4]
    assert tok.encode("<|im_start|>ab")[-1] == 4 and 1 not in tok.encode("<|im_start|>ab")
    # No padding token: eos pads, so decode drops it like padding.
    assert tok.decode([1, 4, 6, 0]) == "<|im_start|>ab ab"


def test_gguf_errors(tmp_path):
    (tmp_path / "bad.gguf").write_bytes(b"GGML" + b"\0" * 20)
    with pytest.raises(UserError, match="not a GGUF file"):
        Tokenizer.load(tmp_path / "bad.gguf")
    write_gguf(tmp_path / "spm.gguf", {"tokenizer.ggml.model": "llama"})
    with pytest.raises(UserError, match="tokenizer model 'llama' is not supported"):
        Tokenizer.load(tmp_path / "spm.gguf")
    raw = (tmp_path / "spm.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(raw[:-3])
    with pytest.raises(UserError, match="truncated GGUF file"):
        gguf.read_gguf_metadata(tmp_path / "cut.gguf")


def test_gguf_pre_tokenizer_types(tmp_path):
    def load(pre):
        write_gguf(
            tmp_path / f"{pre}.gguf",
            {
                "tokenizer.ggml.model": "gpt2",
                "tokenizer.ggml.pre": pre,
                "tokenizer.ggml.tokens": ["</s>", "1", "2", "12", "a", "1a"],
                "tokenizer.ggml.merges": ["1 2", "1 a"],
                "tokenizer.ggml.eos_token_id": 0,
            },
        )
        return Tokenizer.load(tmp_path / f"{pre}.gguf")

    assert load("gpt2").encode("12") == [3]
    assert load("smollm").encode("12") == [1, 2]  # llama.cpp's smollm: one digit per word
    assert load("llama-bpe").encode("1a") == [1, 4]  # llama 3: digits and letters apart
    with pytest.warns(UserWarning, match="pre-tokenizer 'mystery' is not known"):
        assert load("mystery").encode("12") == [3]
