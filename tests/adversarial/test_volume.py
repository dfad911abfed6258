"""Whatever the volume or its manifest holds, the model cache never reads, returns or deletes anything outside
``cache_dir``; a damaged manifest is kept aside for inspection and rebuilt from what can still be verified (offline
too); a permanent Hub error costs one request and comes back typed and not retryable; a failed download publishes
nothing.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from serve_app.cache import ModelStore
from serve_app.cache.cli import main as cli_main
from serve_app.config import DownloadConfig, ModelRef
from serve_app.errors import (
    DownloadError,
    GatedRepoError,
    IntegrityError,
    ModelSourceError,
    NotCachedError,
    RemoteFileNotFoundError,
    RepoNotFoundError,
    RevisionNotFoundError,
)
from tests.support.fake_hub import FakeHub

pytestmark = pytest.mark.timeout(60)

REPO = "acme/tiny-GGUF"
FILE = "m.gguf"
REF = ModelRef(repo_id=REPO, filename=FILE)
DATA = b"model-bytes-" * 10_000
FAST = DownloadConfig(max_attempts=3, backoff_base_s=0.01, backoff_max_s=0.05, timeout_s=20, read_timeout_s=2,
                      lock_timeout_s=20)


def make_store(tmp_path: Path, **overrides: float) -> ModelStore:
    return ModelStore(str(tmp_path / "vol"), FAST.model_copy(update=overrides), progress="none")


def manifest(store: ModelStore) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(Path(store.layout.manifest_path).read_text())
    return doc


def write_manifest(store: ModelStore, doc: dict[str, Any]) -> None:
    Path(store.layout.manifest_path).write_text(json.dumps(doc))


def quarantined(store: ModelStore) -> list[Path]:
    return sorted(Path(store.layout.root).glob("manifest.json.corrupt-*"))


def published(store: ModelStore) -> list[str]:
    return [f for _, _, fs in os.walk(os.path.join(store.layout.root, "models")) for f in fs]


def planted_record(commit: str, path: str, victim: Path) -> dict[str, Any]:
    import hashlib

    st = victim.stat()
    return {"repo_id": REPO, "filename": FILE, "revision": "main", "commit": commit, "size": st.st_size,
            "sha256": hashlib.sha256(victim.read_bytes()).hexdigest(), "verified_at": "2026-01-01T00:00:00Z",
            "path": path, "mtime_ns": st.st_mtime_ns}


def planted_manifest(commit: str, path: str, victim: Path) -> dict[str, Any]:
    return {"version": 1,
            "files": {f"{REPO}@{commit}/{FILE}": planted_record(commit, path, victim)},
            "refs": {f"{REPO}|{FILE}|main": {"repo_id": REPO, "requested": FILE, "revision": "main", "commit": commit,
                                              "files": [FILE], "resolved_at": "2026-01-01T00:00:00Z"}}}


# ---- A: nothing outside the volume is deleted or read -----------------------------------------------------------


def test_rm_never_deletes_through_a_symlinked_repo_folder(fhub: FakeHub, tmp_path: Path) -> None:
    fhub.add_file(REPO, FILE, DATA)
    store = make_store(tmp_path)
    got = store.ensure(REF)
    repo_dir = Path(got.path).parent.parent
    outside = tmp_path / "outside"
    shutil.move(repo_dir, outside)  # the repo's folder now lives outside the volume...
    os.symlink(outside, repo_dir)  # ...and the volume links to it
    victim = outside / str(got.commit) / FILE
    assert cli_main(["rm", REPO, FILE, "--cache-dir", str(tmp_path / "vol")]) == 0
    assert victim.read_bytes() == DATA
    assert store.manifest.read().files == {}  # the records are gone all the same


def test_rm_with_a_manifest_commit_that_climbs_out_deletes_nothing_outside(fhub: FakeHub, tmp_path: Path) -> None:
    victim = tmp_path / FILE  # where vol/models/acme--tiny-GGUF/../../../m.gguf lands
    victim.write_bytes(b"precious")
    store = make_store(tmp_path)
    (tmp_path / "vol" / "models" / "acme--tiny-GGUF").mkdir()  # the repo was pulled before
    commit = "../../.."
    write_manifest(store, planted_manifest(commit, f"models/acme--tiny-GGUF/{commit}/{FILE}", victim))
    cli_main(["rm", REPO, FILE, "--cache-dir", str(tmp_path / "vol")])
    assert victim.read_bytes() == b"precious"


def test_a_symlinked_staging_dir_never_turns_the_orphan_sweep_into_a_delete_elsewhere(fhub: FakeHub,
                                                                                      tmp_path: Path) -> None:
    fhub.add_file(REPO, FILE, DATA)
    outside = tmp_path / "outside"
    (outside / "keep.me").mkdir(parents=True)
    (outside / "keep.me" / "data").write_bytes(b"precious")
    (tmp_path / "vol").mkdir()
    os.symlink(outside, tmp_path / "vol" / ".staging")
    with pytest.raises(IntegrityError, match="symlink"):
        make_store(tmp_path).ensure(REF)
    assert (outside / "keep.me" / "data").read_bytes() == b"precious"


@pytest.mark.parametrize("how", ["absolute", "climbing"])
def test_a_manifest_path_outside_the_volume_is_never_returned(fhub: FakeHub, tmp_path: Path, how: str) -> None:
    fhub.add_file(REPO, FILE, DATA)
    commit = fhub.commit_of(REPO)
    victim = tmp_path / "secret.gguf"
    victim.write_bytes(b"not a model")
    store = make_store(tmp_path)
    path = str(victim) if how == "absolute" else f"models/acme--tiny-GGUF/{commit}/../../../secret.gguf"
    write_manifest(store, planted_manifest(commit, path, victim))
    got = store.ensure(REF)
    assert got.path.startswith(store.layout.root + os.sep) and Path(got.path).read_bytes() == DATA
    assert store.status(REF).path == got.path
    assert victim.read_bytes() == b"not a model"


# ---- B: the manifest is validated, quarantined and rebuilt -------------------------------------------------------


def test_a_ref_without_files_is_quarantined_and_rebuilt_without_refetching(fhub: FakeHub, tmp_path: Path) -> None:
    fhub.add_file(REPO, FILE, DATA)
    store = make_store(tmp_path)
    got = store.ensure(REF)
    doc = manifest(store)
    for ref in doc["refs"].values():
        ref["files"] = []
    write_manifest(store, doc)
    assert store.ensure(REF).path == got.path
    assert store.status(REF).state == "present"
    assert len(quarantined(store)) == 1 and fhub.body_downloads() == 1


def test_a_corrupt_manifest_is_kept_aside_logged_and_rebuilt(fhub: FakeHub, tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="serve_app.cache")
    fhub.add_file(REPO, FILE, DATA)
    store = make_store(tmp_path)
    got = store.ensure(REF)
    Path(store.layout.manifest_path).write_bytes(b'{"version": 1, "files": {')
    fhub.reset_log()
    assert store.status(REF).state == "present"
    kept = quarantined(store)
    assert len(kept) == 1 and kept[0].read_bytes() == b'{"version": 1, "files": {'
    assert any(kept[0].name in r.getMessage() for r in caplog.records)
    assert store.ensure(REF).path == got.path and fhub.body_downloads() == 0
    assert manifest(store)["files"]  # the rebuilt manifest is on disk, not only in memory


@pytest.mark.parametrize("loss", ["deleted", "garbage"])
def test_offline_with_a_lost_manifest_serves_only_verified_files(fhub: FakeHub, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch, loss: str) -> None:
    fhub.add_file(REPO, FILE, DATA)
    store = make_store(tmp_path)
    got = store.ensure(REF)

    def lose() -> None:
        if loss == "deleted":
            os.unlink(store.layout.manifest_path)
        else:
            Path(store.layout.manifest_path).write_text("garbage")

    lose()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fhub.reset_log()
    assert store.ensure(REF).path == got.path
    assert fhub.requests == []
    # Bytes that no longer match what was verified are not adopted offline.
    os.chmod(got.path, 0o644)
    Path(got.path).write_bytes(DATA[:-1] + b"!")
    lose()
    with pytest.raises(NotCachedError):
        store.ensure(REF)
    assert fhub.requests == []


# ---- C: permanent Hub errors: one request, typed, not retryable --------------------------------------------------

PERMANENT: dict[str, tuple[dict[str, Any], type[ModelSourceError], int]] = {
    "repo_not_found": ({"repo_id": "acme/nope"}, RepoNotFoundError, 1),
    "gated": ({"repo_id": "acme/gated"}, GatedRepoError, 1),
    "revision_not_found": ({"revision": "v9"}, RevisionNotFoundError, 1),
    "file_not_in_listing": ({"filename": "other.gguf"}, RemoteFileNotFoundError, 1),
    "resolve_404": ({"fault": ("/resolve/", 404)}, RemoteFileNotFoundError, 2),
    "cdn_404": ({"fault": ("/cdn/", 404)}, RemoteFileNotFoundError, 3),
    "cdn_410": ({"fault": ("/cdn/", 410)}, ModelSourceError, 3),
}


@pytest.mark.parametrize("case", sorted(PERMANENT))
def test_permanent_hub_errors_are_never_retried(fhub: FakeHub, tmp_path: Path, case: str) -> None:
    fhub.add_file(REPO, FILE, DATA)
    fhub.add_file("acme/gated", FILE, DATA, gated=True)
    spec, error, expected_requests = PERMANENT[case]
    if "fault" in spec:
        where, code = spec["fault"]
        fhub.set_fault("status", code=code, count=-1, path_contains=where)
    ref = REF.model_copy(update={k: v for k, v in spec.items() if k != "fault"})
    fhub.reset_log()
    with pytest.raises(error) as info:
        make_store(tmp_path).ensure(ref)
    assert not info.value.retryable and not isinstance(info.value, DownloadError)
    paths = [(r["method"], r["path"]) for r in fhub.requests]
    assert len(paths) == expected_requests and len(set(paths)) == len(paths)


# ---- D: a failed download publishes nothing ---------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["corrupt", "drop", "stall"])
def test_a_failed_download_publishes_nothing(fhub: FakeHub, tmp_path: Path, fault: str) -> None:
    fhub.add_file(REPO, FILE, DATA)
    fhub.set_fault(fault, count=-1, seconds=5, after_bytes=30_000)
    store = make_store(tmp_path, max_attempts=2, read_timeout_s=0.3)
    with pytest.raises((DownloadError, IntegrityError)):
        store.ensure(REF)
    assert published(store) == [] and os.listdir(store.layout.staging_root) == []
    assert store.manifest.read().files == {} and store.status(REF).state == "missing"
