"""Directory commits on filesystems without renameat2(RENAME_EXCHANGE) — gcsfuse bucket mounts
(`/gcs/...`, launch/README.md), FUSE servers without RENAME2, NFS, older kernels. There the swap
fails with EINVAL, ENOSYS or EOPNOTSUPP, and `commit_directory` must fall back to two ordered
renames (old copy aside, new one in, old copy removed) without losing either version."""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

import numpy as np
import pytest

from warm_jax.training import checkpoints as ck

UNSUPPORTED = [errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP]


def failing_renameat2(code: int, calls: list):
    """A stand-in for libc's renameat2 that fails as such a filesystem does (-1, errno set)."""

    def fn(olddirfd, old, newdirfd, new, flags):
        calls.append((os.fsdecode(old), os.fsdecode(new), flags))
        ctypes.set_errno(code)
        return -1

    return fn


def write_version(path: Path, v: int) -> Path:
    path.mkdir(parents=True, exist_ok=True)  # (atomic_directory has created it)
    (path / "weights.bin").write_bytes(bytes([v]) * 1000)
    (path / "sub").mkdir()
    (path / "sub" / "meta.json").write_text(f'{{"version": {v}}}')
    return path


def read_version(path: Path) -> int:
    data = (path / "weights.bin").read_bytes()
    assert data == bytes([data[0]]) * 1000
    assert (path / "sub" / "meta.json").read_text() == f'{{"version": {data[0]}}}'
    return data[0]


@pytest.mark.parametrize("code", UNSUPPORTED, ids=[errno.errorcode[c] for c in UNSUPPORTED])
def test_unsupported_exchange_falls_back_to_ordered_renames(tmp_path, monkeypatch, code):
    final = write_version(tmp_path / "ckpt", 1)
    calls: list = []
    monkeypatch.setattr(ck, "_renameat2", lambda: failing_renameat2(code, calls))
    renames = []
    real_replace = os.replace

    def replace(a, b):
        renames.append((Path(a).name, Path(b).name))
        return real_replace(a, b)

    monkeypatch.setattr(os, "replace", replace)
    tmp = write_version(ck.atomic_directory(final), 2)
    ck.commit_directory(tmp, final)
    # The swap was tried (RENAME_EXCHANGE = 2) and refused ...
    assert calls == [(str(tmp), str(final), 2)]
    # ... so: the old copy aside first, then the new one in (never the other way round).
    assert len(renames) == 2
    (old_from, old_to), (new_from, new_to) = renames
    assert (old_from, new_from, new_to) == ("ckpt", tmp.name, "ckpt")
    assert old_to.startswith(".ckpt.old-")
    assert read_version(final) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # old copy removed


def test_other_exchange_errors_are_not_swallowed(tmp_path, monkeypatch):
    a, b = write_version(tmp_path / "a", 1), write_version(tmp_path / "b", 2)
    monkeypatch.setattr(ck, "_renameat2", lambda: failing_renameat2(errno.EIO, []))
    with pytest.raises(OSError) as e:
        ck._exchange(a, b)
    assert e.value.errno == errno.EIO
    assert (read_version(a), read_version(b)) == (1, 2)


def test_a_failed_second_rename_puts_the_old_copy_back(tmp_path, monkeypatch):
    """The fallback is not atomic: between its two renames nothing is at the path. If the second
    one fails (a bucket error, say), the old copy is renamed back: nothing is lost."""
    final = write_version(tmp_path / "ckpt", 1)
    monkeypatch.setattr(ck, "_renameat2", lambda: failing_renameat2(errno.EINVAL, []))
    tmp = write_version(ck.atomic_directory(final), 2)
    real_replace = os.replace

    def replace(a, b):
        if Path(a) == tmp:
            raise OSError(errno.EMFILE, "too many objects to be renamed", str(a))
        return real_replace(a, b)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="too many objects"):
        ck.commit_directory(tmp, final)
    assert read_version(final) == 1
    assert read_version(tmp) == 2  # the caller (save_params, merge) removes its own temporary
    assert not list(tmp_path.glob(".ckpt.old-*"))


def test_save_params_overwrites_on_such_a_filesystem(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(ck, "_renameat2", lambda: failing_renameat2(errno.EINVAL, calls))
    out = tmp_path / "ckpt"
    for v in (1, 2):
        tree = {"w": np.full((16, 8), v, np.float32), "b": np.arange(5, dtype=np.int32) * v}
        ck.save_params(out, tree, {"version": v})
    assert len(calls) == 1  # the overwrite tried the swap once, then fell back
    loaded = ck.load_params(out)  # fingerprints checked
    np.testing.assert_array_equal(np.asarray(loaded["w"]), np.full((16, 8), 2, np.float32))
    np.testing.assert_array_equal(np.asarray(loaded["b"]), np.arange(5) * 2)
    assert ck.load_metadata(out)["version"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_the_real_call_swaps_or_reports_unsupported(tmp_path):
    """On this machine's filesystem the real renameat2 either swaps the two directories or
    says it cannot (then commit_directory takes the fallback above)."""
    a, b = write_version(tmp_path / "a", 1), write_version(tmp_path / "b", 2)
    if ck._exchange(a, b):
        assert (read_version(a), read_version(b)) == (2, 1)
    else:
        assert (read_version(a), read_version(b)) == (1, 2)
