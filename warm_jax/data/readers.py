"""Reading raw upstream files with errors that name the file and the line.

Builders parse their whole input through these functions before TFDS writes a single record, so a
bad line stops the run with one `UserError` and no partial dataset.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import zlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from warm_jax.errors import UserError

# Python's JSON decoder recurses once per nesting level; no real record nests this deep.
_TOO_DEEP = "JSON nested too deeply to be a record"


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_text(path: str | os.PathLike) -> str:
    """A whole UTF-8 text file (gzip-compressed if its name ends in .gz)."""
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise UserError(f"{path}: cannot read: {_describe(e)}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not valid UTF-8 ({e.reason})") from None


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yields (1-based line number, object) for each non-blank line of a (gzipped) JSONL file."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    line_no = 0
    try:
        with opener(path, "rb") as f:
            for line_no, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                try:
                    obj = json.loads(raw)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{line_no}: malformed JSON: {e.msg}") from None
                except UnicodeDecodeError as e:
                    raise UserError(f"{path}:{line_no}: not valid UTF-8 ({e.reason})") from None
                except RecursionError:
                    raise UserError(f"{path}:{line_no}: {_TOO_DEEP}") from None
                if not isinstance(obj, dict):
                    raise UserError(
                        f"{path}:{line_no}: expected a JSON object, got {type(obj).__name__}"
                    )
                yield line_no, obj
    except (OSError, EOFError, zlib.error) as e:
        where = f"after line {line_no}" if line_no else "at the start"
        raise UserError(f"{path}: unreadable {where}: {_describe(e)}") from None


def read_json_array(path: str | os.PathLike) -> list[tuple[int, Any]]:
    """The elements of a top-level JSON array, each with the line its text starts on.

    Decoding element by element (rather than `json.load`) is what lets a later "missing field"
    error point at the record's line in a 3 MB single-document file.
    """
    path = Path(path)
    text = read_text(path)
    decoder = json.JSONDecoder()
    n = len(text)

    def skip_ws(i: int) -> int:
        while i < n and text[i] in " \t\r\n":
            i += 1
        return i

    def fail(i: int, msg: str) -> UserError:
        return UserError(f"{path}:{text.count(chr(10), 0, i) + 1}: malformed JSON: {msg}")

    i = skip_ws(0)
    if i >= n or text[i] != "[":
        raise fail(i, "expected a top-level JSON array")
    i = skip_ws(i + 1)
    out: list[tuple[int, Any]] = []
    line, counted_to = 1, 0
    if i < n and text[i] == "]":
        return out
    while True:
        try:
            obj, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: malformed JSON: {e.msg}") from None
        except RecursionError:
            raise fail(i, _TOO_DEEP) from None
        line += text.count("\n", counted_to, i)
        counted_to = i
        out.append((line, obj))
        i = skip_ws(end)
        if i < n and text[i] == ",":
            i = skip_ws(i + 1)
        elif i < n and text[i] == "]":
            break
        else:
            raise fail(i, "expected ',' or ']' after an array element")
    if skip_ws(i + 1) != n:
        raise fail(skip_ws(i + 1), "extra data after the top-level array")
    return out


def require_str_fields(
    obj: Mapping[str, Any], fields: Sequence[str], path: str | os.PathLike, line: int
) -> None:
    """Raises a `UserError` naming file, line and field if a field is missing or not a string."""
    for field in fields:
        if field not in obj:
            raise UserError(f"{path}:{line}: missing field {field!r}")
        if not isinstance(obj[field], str):
            raise UserError(
                f"{path}:{line}: field {field!r} should be a string, "
                f"got {type(obj[field]).__name__}"
            )


def _describe(e: BaseException) -> str:
    if isinstance(e, EOFError):
        return "the compressed stream ends early (truncated download?)"
    if isinstance(e, gzip.BadGzipFile):
        return f"not a gzip file ({e})"
    if isinstance(e, FileNotFoundError):
        return "no such file"
    return f"{type(e).__name__}: {e}"
