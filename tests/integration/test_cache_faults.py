"""Under network faults, Hub errors and on-disk corruption, a file that does not match the Hub's size and sha256 is
never visible at its final path nor returned; transient faults are retried within max_attempts and the deadline;
every failure is a typed error with a one-line message that names the cause and never contains the token.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import pytest

from serve_app.cache import ModelStore
from serve_app.config import DownloadConfig, ModelRef
from serve_app.errors import (
    DownloadError,
    GatedRepoError,
    HubUnreachableError,
    IntegrityError,
    RemoteFileNotFoundError,
    RepoNotFoundError,
    RevisionNotFoundError,
)
from tests.support.fake_hub import FakeHub

pytestmark = pytest.mark.timeout(60)

REPO = "acme/tiny-GGUF"
FILE = "tiny-Q4_K_M.gguf"
REF = ModelRef(repo_id=REPO, filename=FILE)
FAST = DownloadConfig(max_attempts=3, backoff_base_s=0.01, backoff_max_s=0.05, timeout_s=20, read_timeout_s=2,
                      lock_timeout_s=20)




@pytest.fixture
def data(fhub: FakeHub) -> bytes:
    blob = os.urandom(1_200_000)
    fhub.add_file(REPO, FILE, blob)
    fhub.add_file(REPO, "tiny-Q8_0.gguf", b"q8")
    return blob


def make_store(tmp_path: Path, **overrides: float) -> ModelStore:
    return ModelStore(str(tmp_path / "vol"), FAST.model_copy(update=overrides), progress="none")


def assert_nothing_published(store: ModelStore) -> None:
    published = [f for _, _, fs in os.walk(os.path.join(store.layout.root, "models")) for f in fs]
    assert published == [] and os.listdir(store.layout.staging_root) == []
    assert store.manifest.read().files == {}


def test_corrupted_body_is_never_published_and_recovers(fhub: FakeHub, data: bytes, tmp_path: Path) -> None:
    store = make_store(tmp_path)
    fhub.set_fault("corrupt", count=1)
    got = store.ensure(REF)
    assert Path(got.path).read_bytes() == data and fhub.body_downloads() == 2


def test_persistently_corrupted_body_fails_cleanly(fhub: FakeHub, data: bytes, tmp_path: Path) -> None:
    store = make_store(tmp_path)
    fhub.set_fault("corrupt", count=-1)
    with pytest.raises(IntegrityError, match="failed verification after 3 attempts") as info:
        store.ensure(REF)
    assert "\n" not in info.value.message
    assert fhub.body_downloads() == 3
    assert_nothing_published(store)
    fhub.clear_faults()
    assert Path(store.ensure(REF).path).read_bytes() == data


def test_dropped_connections_resume_with_range(fhub: FakeHub, data: bytes, tmp_path: Path) -> None:
    store = make_store(tmp_path)
    fhub.set_fault("drop", count=2, after_bytes=400_000)
    got = store.ensure(REF)
    assert Path(got.path).read_bytes() == data
    ranges = [r["headers"].get("range") for r in fhub.requests if r["host"] == "cdn"]
    assert ranges[0] is None and all(r and r.startswith("bytes=") for r in ranges[1:]) and len(ranges) == 3


@pytest.mark.parametrize("where", ["/api/models", "/resolve/", "/cdn/"])
def test_503s_are_retried(fhub: FakeHub, data: bytes, tmp_path: Path, where: str) -> None:
    store = make_store(tmp_path)
    fhub.set_fault("status", code=503, count=2, path_contains=where)
    assert Path(store.ensure(REF).path).read_bytes() == data


def test_persistent_503_exhausts_attempts(fhub: FakeHub, data: bytes, tmp_path: Path) -> None:
    store = make_store(tmp_path)
    fhub.set_fault("status", code=503, count=-1, path_contains="/cdn/")
    with pytest.raises(DownloadError, match="after 3 attempts"):
        store.ensure(REF)
    assert_nothing_published(store)


def test_stall_beyond_read_timeout_fails_the_attempt(fhub: FakeHub, data: bytes, tmp_path: Path) -> None:
    store = make_store(tmp_path, read_timeout_s=0.3, max_attempts=2)
    fhub.set_fault("stall", count=-1, seconds=10, after_bytes=100_000)
    t0 = time.monotonic()
    with pytest.raises(DownloadError, match="after 2 attempts"):
        store.ensure(REF)
    assert time.monotonic() - t0 < 3
    assert_nothing_published(store)
    fhub.clear_faults()
    fhub.set_fault("stall", count=1, seconds=10, after_bytes=100_000)
    assert Path(store.ensure(REF).path).read_bytes() == data


def test_deadline_bounds_everything(fhub: FakeHub, data: bytes, tmp_path: Path) -> None:
    store = make_store(tmp_path, read_timeout_s=5, timeout_s=1, max_attempts=5)
    fhub.set_fault("stall", count=-1, seconds=10, after_bytes=100_000)
    t0 = time.monotonic()
    with pytest.raises(DownloadError):
        store.ensure(REF)
    assert time.monotonic() - t0 < 2.5


@pytest.mark.parametrize("where", ["resolve", "api"])
def test_wrong_advertised_size(fhub: FakeHub, data: bytes, tmp_path: Path, where: str) -> None:
    store = make_store(tmp_path)
    fhub.set_fault("wrong_size", count=-1, where=where, delta=100)
    with pytest.raises(IntegrityError, match="bytes") as info:
        store.ensure(REF)
    assert "nothing was published" in info.value.message
    assert fhub.body_downloads() == 0 and store.manifest.read().files == {}
    fhub.clear_faults()
    fhub.set_fault("wrong_size", count=1, where="cdn", delta=1000)  # short body: retried like a drop
    assert Path(store.ensure(REF).path).read_bytes() == data


def test_not_found_errors(fhub: FakeHub, data: bytes, tmp_path: Path) -> None:
    store = make_store(tmp_path)
    with pytest.raises(RepoNotFoundError, match="acme/nope"):
        store.ensure(ModelRef(repo_id="acme/nope", filename=FILE))
    with pytest.raises(RemoteFileNotFoundError) as info:
        store.ensure(ModelRef(repo_id=REPO, filename="tiny-Q2_K.gguf"))
    assert "tiny-Q4_K_M.gguf, tiny-Q8_0.gguf" in info.value.message
    with pytest.raises(RevisionNotFoundError, match="v9"):
        store.ensure(ModelRef(repo_id=REPO, filename=FILE, revision="v9"))
    assert fhub.body_downloads() == 0


def test_unreachable_hub_message(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    hub = FakeHub().start()
    endpoint = hub.endpoint
    hub.stop()  # nothing listens there now
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    with pytest.raises(HubUnreachableError) as info:
        make_store(tmp_path).ensure(REF)
    message = info.value.message
    assert endpoint in message and "HF_ENDPOINT" in message and "HF_HUB_OFFLINE=1" in message
    assert "\n" not in message


def test_gated_repo_needs_token_which_never_leaks(fhub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    fhub.add_file("acme/gated", FILE, b"g" * 5000, gated=True)
    ref = ModelRef(repo_id="acme/gated", filename=FILE)
    store = make_store(tmp_path)
    with pytest.raises(GatedRepoError, match="HF_TOKEN"):
        store.ensure(ref)
    monkeypatch.setenv("HF_TOKEN", "hf_wrong_token_value")
    with pytest.raises(GatedRepoError) as info:
        store.ensure(ref)
    assert "hf_wrong_token_value" not in info.value.message
    monkeypatch.setenv("HF_TOKEN", fhub.token)
    assert Path(store.ensure(ref).path).read_bytes() == b"g" * 5000
    auth = {(r["host"], r["method"]): r["auth"] for r in fhub.requests if r["status"] < 400}
    assert auth[("hub", "HEAD")] is True and auth[("cdn", "GET")] is False
    assert not [r for r in caplog.records if fhub.token in r.getMessage() or "hf_wrong" in r.getMessage()]


def test_disk_corruption_detected_and_repaired(fhub: FakeHub, data: bytes, tmp_path: Path) -> None:
    store = make_store(tmp_path)
    got = store.ensure(REF)
    with open(got.path, "r+b") as f:
        f.seek(1000)
        f.write(b"\x00\x01\x02")
    assert store.status(REF).state == "corrupt"
    assert store.verify(REF).state == "corrupt"
    assert Path(store.ensure(REF).path).read_bytes() == data and fhub.body_downloads() == 2
    assert store.verify(REF).state == "present"


def test_same_mtime_corruption_needs_verify_then_heal(fhub: FakeHub, data: bytes, tmp_path: Path) -> None:
    store = make_store(tmp_path)
    got = store.ensure(REF)
    st = os.stat(got.path)
    with open(got.path, "r+b") as f:
        f.write(b"\xde\xad")
    os.utime(got.path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert store.status(REF).state == "present"  # the documented cost of a stat-only warm check
    assert store.verify(REF).state == "corrupt"
    assert store.status(REF).state == "corrupt"  # verify's finding sticks until repaired
    healed = store.heal(REF)
    assert Path(healed.path).read_bytes() == data and store.status(REF).state == "present"


def test_touched_but_intact_file_is_rehashed_not_refetched(fhub: FakeHub, data: bytes, tmp_path: Path) -> None:
    store = make_store(tmp_path)
    got = store.ensure(REF)
    os.utime(got.path, ns=(1, 1))
    assert store.status(REF).state == "present"
    store.ensure(REF)
    assert fhub.body_downloads() == 1


def test_concurrent_threads_download_once(fhub: FakeHub, data: bytes, tmp_path: Path) -> None:
    fhub.set_fault("stall", count=1, seconds=0.5, after_bytes=100_000)
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(make_store(tmp_path).ensure(REF).path))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and len(results) == 3 and fhub.body_downloads() == 1


def test_heal_refetches_only_bad_parts_at_the_pinned_commit(fhub: FakeHub, tmp_path: Path) -> None:
    names = [f"big-{i:05d}-of-00002.gguf" for i in (1, 2)]
    blobs = {n: os.urandom(100_000) for n in names}
    for n, b in blobs.items():
        fhub.add_file(REPO, n, b)
    store = make_store(tmp_path)
    ref = ModelRef(repo_id=REPO, filename=names[0])
    got = store.ensure(ref)
    fhub.add_file(REPO, names[0], b"new upstream", commit="b" * 40)  # main moves on; heal must not follow
    st = os.stat(got.parts[1])
    with open(got.parts[1], "r+b") as f:
        f.write(b"\x00\x00")
    os.utime(got.parts[1], ns=(st.st_atime_ns, st.st_mtime_ns))
    healed = store.heal(ref)
    assert healed.commit == got.commit and [Path(p).read_bytes() for p in healed.parts] == list(blobs.values())
    assert fhub.body_downloads() == 3  # two parts once, the bad part once more
