"""The verifier computes exactly hashlib's sha256 (any size, across chunk boundaries), never follows a symlink
inside the volume, and a path under the cache dir can never resolve outside it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from serve_app.cache.integrity import StreamHasher, contained_path, hash_file, regular_file_stat
from serve_app.errors import IntegrityError


@pytest.mark.parametrize("size", [0, 1, 4095, 65536, 65537, 3 * 65536 + 7])
def test_hash_file_matches_hashlib(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    digest = hash_file(str(path), chunk_size=65536)
    assert digest.sha256 == hashlib.sha256(data).hexdigest()
    assert digest.size == size
    assert digest.mtime_ns == path.stat().st_mtime_ns


def test_git_blob_sha1_matches_git(tmp_path: Path) -> None:
    data = b"hello\n"
    path = tmp_path / "f"
    path.write_bytes(data)
    # `git hash-object` of "hello\n"
    assert hash_file(str(path), git=True).git_sha1 == "ce013625030ba8dba906f756967f9e9ca394464a"
    hasher = StreamHasher(len(data))
    hasher.update(data)
    assert hasher.git_sha1 == "ce013625030ba8dba906f756967f9e9ca394464a"


def test_hash_file_refuses_symlinks_unless_asked(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_bytes(b"x")
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(IntegrityError):
        hash_file(str(link))
    assert hash_file(str(link), follow_symlinks=True).sha256 == hashlib.sha256(b"x").hexdigest()
    with pytest.raises(IntegrityError):
        regular_file_stat(str(link))
    assert regular_file_stat(str(tmp_path / "absent")) is None


def test_contained_path_refuses_escapes_and_symlinks(tmp_path: Path) -> None:
    root = os.path.realpath(tmp_path / "vol")
    os.makedirs(os.path.join(root, "models"))
    assert contained_path(root, "models/a--b/c/x.gguf") == os.path.join(root, "models/a--b/c/x.gguf")
    for bad in ("../x", "models/../../x", "/etc/passwd", "."):
        with pytest.raises(IntegrityError):
            contained_path(root, bad)
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, os.path.join(root, "models", "evil"))
    with pytest.raises(IntegrityError):
        contained_path(root, "models/evil/x.gguf")
