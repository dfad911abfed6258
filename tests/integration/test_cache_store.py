"""ModelStore against a loopback Hub with the real huggingface_hub client: a pulled file is exactly the Hub's
bytes at the recorded commit; a warm pull, status or offline pull makes zero requests; patterns, split GGUFs,
tags/commits and local paths resolve to the right files; nothing can be written or read outside the volume.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from serve_app.cache import ModelStore
from serve_app.config import DownloadConfig, ModelRef
from serve_app.errors import (
    IntegrityError,
    InvalidModelReferenceError,
    LocalFileNotFoundError,
    NotCachedError,
)
from tests.support.fake_hub import FakeHub

pytestmark = pytest.mark.timeout(60)

REPO = "acme/tiny-GGUF"
FAST = DownloadConfig(max_attempts=3, backoff_base_s=0.01, backoff_max_s=0.05, timeout_s=20, read_timeout_s=2,
                      lock_timeout_s=20)




@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(str(tmp_path / "vol"), FAST, progress="none")


def staged(store: ModelStore) -> list[str]:
    return os.listdir(store.layout.staging_root)


def test_clean_pull_publishes_verified_file_and_manifest(fhub: FakeHub, store: ModelStore) -> None:
    data = os.urandom(1_500_000)
    sha = fhub.add_file(REPO, "tiny-Q4_K_M.gguf", data)
    fhub.add_file(REPO, "README.md", b"# readme\n")
    commit = fhub.commit_of(REPO)
    got = store.ensure(ModelRef(repo_id=REPO, filename="tiny-Q4_K_M.gguf"))
    assert got.commit == commit and got.sha256 == sha and got.size == len(data)
    assert got.path == os.path.join(store.layout.root, "models", "acme--tiny-GGUF", commit, "tiny-Q4_K_M.gguf")
    assert got.parts == [got.path] and Path(got.path).read_bytes() == data
    manifest = json.loads(Path(store.layout.manifest_path).read_text())
    entry = manifest["files"][f"{REPO}@{commit}/tiny-Q4_K_M.gguf"]
    assert {k: entry[k] for k in ("repo_id", "filename", "revision", "commit", "size", "sha256")} == {
        "repo_id": REPO, "filename": "tiny-Q4_K_M.gguf", "revision": "main", "commit": commit, "size": len(data),
        "sha256": sha}
    assert entry["verified_at"].endswith("Z") and entry["path"].startswith("models/")
    assert staged(store) == []
    # One metadata call, one HEAD, one body GET; the CDN never sees the (absent) token.
    assert [(r["host"], r["method"]) for r in fhub.requests] == [("hub", "GET"), ("hub", "HEAD"), ("cdn", "GET")]


def test_warm_pull_and_status_make_zero_requests(fhub: FakeHub, store: ModelStore) -> None:
    fhub.add_file(REPO, "tiny-Q4_K_M.gguf", os.urandom(300_000))
    ref = ModelRef(repo_id=REPO, filename="*Q4_K_M.gguf")
    first = store.ensure(ref)
    fhub.reset_log()
    assert store.ensure(ref) == first
    assert store.status(ref).state == "present"
    # A fresh store (another replica / process) on the same volume is just as warm.
    other = ModelStore(store.layout.root, FAST, progress="none")
    assert other.ensure(ref).path == first.path
    pinned = ModelRef(repo_id=REPO, filename="tiny-Q4_K_M.gguf", revision=first.commit or "")
    assert other.ensure(pinned).path == first.path
    assert fhub.requests == []


def test_branch_is_pinned_until_refresh(fhub: FakeHub, store: ModelStore) -> None:
    fhub.add_file(REPO, "m.gguf", b"v1" * 100_000)
    ref = ModelRef(repo_id=REPO, filename="m.gguf")
    old = store.ensure(ref)
    new_sha = fhub.add_file(REPO, "m.gguf", b"v2" * 100_000, commit="b" * 40)
    assert store.ensure(ref).commit == old.commit
    fresh = store.ensure(ref, refresh=True)
    assert (fresh.commit, fresh.sha256) == ("b" * 40, new_sha)
    assert store.ensure(ref).commit == "b" * 40  # the refreshed resolution is what the manifest pins now
    assert Path(old.path).read_bytes() == b"v1" * 100_000  # the old commit's file is untouched


def test_tag_and_commit_revisions(fhub: FakeHub, store: ModelStore) -> None:
    sha = fhub.add_file(REPO, "m.gguf", os.urandom(200_000))
    commit = fhub.add_tag(REPO, "v1.0")
    by_tag = store.ensure(ModelRef(repo_id=REPO, filename="m.gguf", revision="v1.0"))
    by_commit = store.ensure(ModelRef(repo_id=REPO, filename="m.gguf", revision=commit))
    assert by_tag.commit == by_commit.commit == commit and by_tag.sha256 == sha
    assert fhub.body_downloads() == 1


def test_offline_serves_cached_with_zero_requests(fhub: FakeHub, store: ModelStore,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    fhub.add_file(REPO, "m.gguf", os.urandom(200_000))
    ref = ModelRef(repo_id=REPO, filename="m.gguf")
    got = store.ensure(ref)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fhub.reset_log()
    assert store.ensure(ref) == got
    with pytest.raises(NotCachedError) as info:
        store.ensure(ModelRef(repo_id=REPO, filename="other.gguf"))
    assert "\n" not in info.value.message and "HF_HUB_OFFLINE" in info.value.message
    assert store.status(ModelRef(repo_id=REPO, filename="other.gguf")).state == "missing"
    assert fhub.requests == []


def test_quant_pattern_resolution(fhub: FakeHub, store: ModelStore) -> None:
    for quant in ("Q4_K_M", "Q8_0"):
        fhub.add_file(REPO, f"tiny-{quant}.gguf", quant.encode() * 10_000)
    got = store.ensure(ModelRef(repo_id=REPO, filename="*Q8_0.gguf"))
    assert got.filename == "tiny-Q8_0.gguf" and Path(got.path).read_bytes() == b"Q8_0" * 10_000
    with pytest.raises(InvalidModelReferenceError, match="tiny-Q4_K_M.gguf, tiny-Q8_0.gguf"):
        store.ensure(ModelRef(repo_id=REPO, filename="*.gguf"))


def test_split_gguf_parts_verified_side_by_side(fhub: FakeHub, store: ModelStore) -> None:
    names = [f"big-Q4_K_M-{i:05d}-of-00003.gguf" for i in (1, 2, 3)]
    blobs = {n: os.urandom(150_000 + i) for i, n in enumerate(names)}
    for n, b in blobs.items():
        fhub.add_file(REPO, n, b)
    got = store.ensure(ModelRef(repo_id=REPO, filename="*Q4_K_M*.gguf"))
    assert [os.path.basename(p) for p in got.parts] == names and got.path == got.parts[0]
    assert len({os.path.dirname(p) for p in got.parts}) == 1
    assert all(Path(p).read_bytes() == blobs[os.path.basename(p)] for p in got.parts)
    assert got.size == sum(len(b) for b in blobs.values())
    # Corrupt part 2 on disk: status sees it, ensure re-fetches only that part.
    with open(got.parts[1], "r+b") as f:
        f.write(b"\xff\xff")
    ref = ModelRef(repo_id=REPO, filename=names[0])
    assert store.status(ref).state == "corrupt"
    store.ensure(ModelRef(repo_id=REPO, filename="*Q4_K_M*.gguf"))
    sha2 = hashlib.sha256(blobs[names[1]]).hexdigest()
    assert fhub.body_downloads(sha2) == 2 and fhub.body_downloads() == 4
    assert [c.filename for c in store.list()] == [names[0]]


def test_local_path_is_hashed_and_recorded(tmp_path: Path, store: ModelStore) -> None:
    path = tmp_path / "local.gguf"
    path.write_bytes(b"local" * 1000)
    ref = ModelRef(repo_id=None, filename=str(path))
    got = store.ensure(ref)
    assert (got.path, got.sha256, got.commit) == (str(path), hashlib.sha256(b"local" * 1000).hexdigest(), None)
    assert str(path) in json.loads(Path(store.layout.manifest_path).read_text())["files"]
    path.write_bytes(b"changed")
    assert store.status(ref).sha256 == hashlib.sha256(b"changed").hexdigest()
    store.invalidate(ref)
    assert path.exists()  # the user's file is never deleted
    with pytest.raises(LocalFileNotFoundError):
        store.ensure(ModelRef(repo_id=None, filename=str(tmp_path / "absent.gguf")))
    assert store.status(ModelRef(repo_id=None, filename=str(tmp_path / "absent.gguf"))).state == "missing"


def test_local_split_needs_every_part(tmp_path: Path, store: ModelStore) -> None:
    for i in (1, 2):
        (tmp_path / f"s-{i:05d}-of-00002.gguf").write_bytes(b"p%d" % i)
    got = store.ensure(ModelRef(repo_id=None, filename=str(tmp_path / "s-00001-of-00002.gguf")))
    assert len(got.parts) == 2
    (tmp_path / "s-00002-of-00002.gguf").unlink()
    with pytest.raises(LocalFileNotFoundError, match="s-00002-of-00002.gguf"):
        store.ensure(ModelRef(repo_id=None, filename=str(tmp_path / "s-00001-of-00002.gguf")))


def test_invalidate_and_list(fhub: FakeHub, store: ModelStore) -> None:
    fhub.add_file(REPO, "a.gguf", b"a" * 1000)
    fhub.add_file(REPO, "b.gguf", b"b" * 1000)
    a = store.ensure(ModelRef(repo_id=REPO, filename="a.gguf"))
    store.ensure(ModelRef(repo_id=REPO, filename="b.gguf"))
    assert sorted(c.filename for c in store.list()) == ["a.gguf", "b.gguf"]
    store.invalidate(ModelRef(repo_id=REPO, filename="a.gguf"))
    assert not os.path.exists(a.path)
    assert [c.filename for c in store.list()] == ["b.gguf"]
    assert store.status(ModelRef(repo_id=REPO, filename="a.gguf")).state == "missing"


@pytest.mark.parametrize("filename", ["../x.gguf", "/etc/passwd", "a/../../x.gguf", "a\\b.gguf"])
def test_traversal_filenames_refused_before_any_request(fhub: FakeHub, store: ModelStore, filename: str) -> None:
    with pytest.raises(InvalidModelReferenceError):
        store.ensure(ModelRef(repo_id=REPO, filename=filename))
    with pytest.raises(InvalidModelReferenceError):
        store.ensure(ModelRef(repo_id="../etc", filename="x.gguf"))
    assert fhub.requests == []


def test_symlinked_targets_are_refused(fhub: FakeHub, store: ModelStore, tmp_path: Path) -> None:
    fhub.add_file(REPO, "m.gguf", b"m" * 1000)
    ref = ModelRef(repo_id=REPO, filename="m.gguf")
    got = store.ensure(ref)
    secret = tmp_path / "secret"
    secret.write_bytes(b"s" * 1000)
    os.unlink(got.path)
    os.symlink(secret, got.path)
    assert store.status(ref).state == "corrupt"
    with pytest.raises(IntegrityError, match="symlink"):
        store.ensure(ref)
    store.invalidate(ref)  # removes the link itself, never what it points to
    assert secret.read_bytes() == b"s" * 1000 and not os.path.lexists(got.path)
    # A symlinked directory inside the volume is refused too.
    repo_dir = os.path.dirname(os.path.dirname(got.path))
    os.rename(repo_dir, repo_dir + ".bak") if os.path.exists(repo_dir) else None
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", repo_dir)
    with pytest.raises(IntegrityError):
        store.ensure(ref)
    assert os.listdir(tmp_path / "elsewhere") == []
