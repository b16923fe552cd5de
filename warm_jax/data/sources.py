"""Where a builder's raw file comes from: the user's `manual_dir` first, else the public URL.

Policy (the same for every builder here):
1. If a `manual_dir` was given (`DownloadConfig(manual_dir=...)`, `--manual_dir`), the file is read
   from it and nothing is downloaded; a missing directory or file is a `UserError`.
2. Otherwise a file already in TFDS's default manual dir (`<data_dir>/downloads/manual`) is used.
3. Otherwise the public URL is downloaded (and cached by TFDS). Without network this fails at
   once (a DNS check runs first, because TFDS would otherwise retry for minutes) with a message
   that says which `manual_dir` to pass.

Files are looked up under several names: the name in ../shared/data (`helpful-base-test.jsonl.gz`),
the upstream repository layout (`helpful-base/test.jsonl.gz`), each also inside a sub-folder named
after the dataset, so pointing `manual_dir` at ../shared/data or at ../shared/data/hh_rlhf works.
"""

from __future__ import annotations

import dataclasses
import socket
import urllib.parse
from collections.abc import Sequence
from pathlib import Path

from warm_jax.data.readers import sha256_file
from warm_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class RemoteFile:
    url: str
    names: tuple[str, ...]  # relative paths accepted inside manual_dir, preferred first
    folder: str = ""  # sub-folder of a shared data root that may hold them (e.g. "hh_rlhf")
    sha256: str = ""  # of the published file, recorded in the dataset metadata if it differs


@dataclasses.dataclass(frozen=True)
class LocatedFile:
    path: Path
    origin: str  # "manual_dir" or "download"
    sha256: str

    def metadata(self, expected: str) -> dict[str, str | bool]:
        return {
            "path": str(self.path),
            "origin": self.origin,
            "sha256": self.sha256,
            "sha256_matches_upstream": (self.sha256 == expected) if expected else True,
        }


def candidates(root: Path, remote: RemoteFile) -> list[Path]:
    dirs = [root, root / remote.folder] if remote.folder else [root]
    return [d / name for d in dirs for name in remote.names]


def check_manual_dir(manual_dir: str | Path, dataset: str, remotes: Sequence[RemoteFile]) -> None:
    """Fails before any preparation starts if `manual_dir` lacks a needed file."""
    root = Path(manual_dir).expanduser()
    if not root.is_dir():
        raise UserError(f"{dataset}: manual_dir {root} does not exist or is not a directory")
    for remote in remotes:
        if not any(p.is_file() for p in candidates(root, remote)):
            raise UserError(_missing_message(dataset, root, remote))


def locate(dl_manager, dataset: str, remote: RemoteFile) -> LocatedFile:
    """The raw file for `remote`, following the module's policy."""
    manual = getattr(dl_manager, "_manual_dir", None)
    default_manual = Path(dl_manager.download_dir) / "manual"
    if manual is not None and Path(manual) != default_manual:
        root = Path(manual).expanduser()
        if not root.is_dir():
            raise UserError(f"{dataset}: manual_dir {root} does not exist or is not a directory")
        for path in candidates(root, remote):
            if path.is_file():
                return LocatedFile(path, "manual_dir", sha256_file(path))
        raise UserError(_missing_message(dataset, root, remote))
    for path in candidates(default_manual, remote):
        if path.is_file():
            return LocatedFile(path, "manual_dir", sha256_file(path))
    host = urllib.parse.urlparse(remote.url).hostname or ""
    try:
        socket.getaddrinfo(host, 443)
    except OSError as e:
        raise UserError(
            f"{dataset}: cannot download {remote.url} ({e}); no manual_dir was given. "
            f"Get the file by hand and pass its folder as manual_dir (--manual_dir DIR), "
            f"e.g. ../shared/data/{remote.folder or ''}"
        ) from None
    try:
        path = Path(dl_manager.download(remote.url))
    except Exception as e:  # requests/etils raise a zoo of types; all mean the same here
        raise UserError(
            f"{dataset}: downloading {remote.url} failed ({type(e).__name__}: {e}); "
            f"pass a folder holding {remote.names[0]} as manual_dir instead"
        ) from None
    return LocatedFile(path, "download", sha256_file(path))


def _missing_message(dataset: str, root: Path, remote: RemoteFile) -> str:
    tried = ", ".join(str(p) for p in candidates(root, remote))
    return f"{dataset}: {remote.names[0]} not found in manual_dir {root} (looked for {tried})"
