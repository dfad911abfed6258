"""Volume bookkeeping survives concurrency and crashes: manifest read-modify-writes never lose an entry and are
atomic, a lock held by a SIGKILLed process does not block anyone, and orphaned staging directories are removed
while a live download's staging directory is left alone; a manifest our writer would never produce is moved aside
intact, never trusted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from filelock import FileLock

from serve_app.cache.layout import Layout
from serve_app.cache.manifest import FileRecord, Manifest, ManifestData, utc_now
from serve_app.errors import DownloadError

pytestmark = pytest.mark.timeout(60)


def record(name: str) -> FileRecord:
    return FileRecord(repo_id="acme/m", filename=name, revision="main", commit="c" * 40, size=1, sha256="0" * 64,
                      verified_at=utc_now(), path=f"models/acme--m/{'c' * 40}/{name}", mtime_ns=1)


KEY_A = record("a.gguf").key()  # the manifest refuses a key that does not match its record


def test_manifest_is_indented_json_and_roundtrips(tmp_path: Path) -> None:
    layout = Layout(str(tmp_path))
    manifest = Manifest(layout.manifest_path, layout.lock_path("manifest"))
    assert manifest.read() == ManifestData()
    with manifest.update() as data:
        data.files[KEY_A] = record("a.gguf")
    text = Path(layout.manifest_path).read_text()
    assert text.startswith("{\n  ")
    assert json.loads(text)["files"][KEY_A]["sha256"] == "0" * 64
    assert manifest.read().files[KEY_A] == record("a.gguf").model_copy(
        update={"verified_at": data.files[KEY_A].verified_at})
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_concurrent_updates_lose_nothing(tmp_path: Path) -> None:
    layout = Layout(str(tmp_path))

    def writer(i: int) -> None:
        manifest = Manifest(layout.manifest_path, layout.lock_path("manifest"))
        for j in range(10):
            with manifest.update() as data:
                rec = record(f"{i}-{j}.gguf")
                data.files[rec.key()] = rec

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(Manifest(layout.manifest_path, layout.lock_path("manifest")).read().files) == 60


def test_unreadable_manifest_starts_fresh(tmp_path: Path) -> None:
    layout = Layout(str(tmp_path))
    Path(layout.manifest_path).write_text("{ truncated")
    manifest = Manifest(layout.manifest_path, layout.lock_path("manifest"))
    assert manifest.read().files == {}
    with manifest.update() as data:
        data.files[KEY_A] = record("a.gguf")
    assert KEY_A in manifest.read().files


def _hold_lock_in_child(lock_path: str) -> subprocess.Popen[str]:
    code = (
        "import sys, time\nfrom filelock import FileLock\n"
        f"lock = FileLock({lock_path!r}); lock.acquire()\nprint('locked', flush=True)\ntime.sleep(60)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdout.readline().strip() == "locked"
    return child


def test_lock_of_a_killed_process_is_released(tmp_path: Path) -> None:
    layout = Layout(str(tmp_path))
    child = _hold_lock_in_child(layout.lock_path("acme/m@c/x.gguf"))
    try:
        with pytest.raises(DownloadError, match="waiting for another process"):
            with layout.locked("acme/m@c/x.gguf", timeout_s=0.3, what="x"):
                pass
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        t0 = time.monotonic()
        with layout.locked("acme/m@c/x.gguf", timeout_s=5, what="x"):
            pass
        assert time.monotonic() - t0 < 2
    finally:
        child.kill()
        child.wait()


def test_sweep_removes_orphans_but_not_live_staging(tmp_path: Path) -> None:
    layout = Layout(str(tmp_path))
    orphan = layout.new_staging("acme/m@c/orphan.gguf")
    Path(orphan, "orphan.gguf").write_bytes(b"partial")
    live = layout.new_staging("acme/m@c/live.gguf")
    mine = layout.new_staging("acme/m@c/mine.gguf")
    holder = FileLock(layout.lock_path("acme/m@c/live.gguf"))
    holder.acquire()
    try:
        # Another thread's FileLock is a separate flock, exactly like another process's.
        result: list[int] = []
        sweeper = threading.Thread(target=lambda: result.append(layout.sweep_staging("acme/m@c/mine.gguf")))
        sweeper.start()
        sweeper.join()
    finally:
        holder.release()
    assert result == [2]
    assert os.path.isdir(live)
    assert not os.path.exists(orphan) and not os.path.exists(mine)


@pytest.mark.parametrize("damage", ["no_files", "absolute_path", "climbing_commit", "short_commit", "wrong_key",
                                    "bad_sha256", "unknown_field", "wrong_version"])
def test_manifest_schema_refuses_what_our_writer_never_writes(tmp_path: Path, damage: str) -> None:
    layout = Layout(str(tmp_path))
    manifest = Manifest(layout.manifest_path, layout.lock_path("manifest"))
    rec = record("a.gguf").model_dump()
    ref = {"repo_id": "acme/m", "requested": "a.gguf", "revision": "main", "commit": "c" * 40, "files": ["a.gguf"],
           "resolved_at": utc_now()}
    doc = {"version": 1, "files": {KEY_A: rec}, "refs": {"acme/m|a.gguf|main": ref}}
    ManifestData.model_validate(doc)  # the undamaged document is valid
    if damage == "no_files":
        ref["files"] = []
    elif damage == "absolute_path":
        rec["path"] = "/etc/passwd"
    elif damage == "climbing_commit":
        rec["commit"] = ref["commit"] = "../../.."
    elif damage == "short_commit":
        ref["commit"] = "c" * 39
    elif damage == "wrong_key":
        doc["files"] = {"acme/m@" + "d" * 40 + "/a.gguf": rec}
    elif damage == "bad_sha256":
        rec["sha256"] = "Z" * 64
    elif damage == "unknown_field":
        rec["extra"] = 1
    else:
        doc["version"] = 2
    Path(layout.manifest_path).write_text(json.dumps(doc))
    assert manifest.read() == ManifestData()  # nothing to rebuild from: an empty manifest, not a trusted bad one
    aside = [n for n in os.listdir(tmp_path) if n.startswith("manifest.json.corrupt-")]
    assert len(aside) == 1 and json.loads((tmp_path / aside[0]).read_text()) == doc
