"""Cold-start sources of the model cache (the ModelCache deployment reads them from GGUF_SERVE_BAKED_DIR and
GGUF_SERVE_HF_CACHE_DIRS): a model in a Hugging Face cache (RunPod's cached models) is used only
after its bytes matched the Hub's sha256 (or, with the Hub unreachable, the hash the cache recorded), a corrupt
one is never used and is downloaded instead, and the source cache is never modified; a baked read-only directory
is consulted first, never written, and survives a separate (empty) volume; ``status`` of a model missing from the
volume names the Hugging Face cache that holds it, changing nothing; ``adopt`` answers with its exit code
and one error line. The Hugging Face caches are written by the real ``hf_hub_download`` from the loopback Hub.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import hf_hub_download

from serve_app.cache.cli import main as cli_main
from serve_app.cache.store import ModelStore
from serve_app.config import ModelRef
from serve_app.errors import NotCachedError
from tests.support.fake_hub import FakeHub

pytestmark = pytest.mark.timeout(60)

REPO, FILE = "acme/cold-GGUF", "cold-Q4_K_M.gguf"
DATA = os.urandom(300_000)
REF = ModelRef(repo_id=REPO, filename="*Q4_K_M.gguf")


@pytest.fixture
def model_hub(fhub: FakeHub) -> FakeHub:
    fhub.add_file(REPO, FILE, DATA)
    return fhub


def hf_cache(hub: FakeHub, root: Path) -> Path:
    """A Hugging Face cache holding the model, written by huggingface_hub itself."""
    hf_hub_download(REPO, FILE, cache_dir=str(root), endpoint=hub.endpoint, token=False)
    hub.reset_log()
    return root


def blob_of(cache: Path) -> Path:
    (blob,) = (cache / f"models--{REPO.replace('/', '--')}" / "blobs").iterdir()
    return blob


def tree(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every path under ``root`` with its mode, size and mtime: what "never modified" compares."""
    out = {}
    for d, dirs, files in os.walk(root):
        for n in dirs + files:
            st = os.lstat(os.path.join(d, n))
            out[os.path.relpath(os.path.join(d, n), root)] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


def read_only(root: Path) -> None:
    for d, _, files in os.walk(root):
        for n in files:
            p = os.path.join(d, n)
            if not os.path.islink(p):
                os.chmod(p, 0o444)
        os.chmod(d, 0o555)


def writable(root: Path) -> None:
    for d, _, _ in os.walk(root):
        os.chmod(d, 0o755)


def closed_port_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def store(volume: Path, *, baked: str = "", hf: list[Path] | None = None) -> ModelStore:
    return ModelStore(str(volume), baked_dir=baked, hf_cache_dirs=[str(p) for p in hf or []], progress="none")


def test_hf_cache_file_is_verified_against_the_hub_and_adopted_without_download(
        model_hub: FakeHub, tmp_path: Path) -> None:
    cache = hf_cache(model_hub, tmp_path / "hf")
    read_only(cache)  # a platform cache we may not write
    before = tree(cache)
    try:
        got = store(tmp_path / "vol", hf=[cache]).ensure(REF)
        assert model_hub.body_downloads() == 0
        assert any(r["path"].startswith("/api/models/") for r in model_hub.requests)  # the Hub's sha256 was asked
        assert Path(got.path).read_bytes() == DATA and got.path.startswith(str(tmp_path / "vol"))
        assert tree(cache) == before  # nothing in the source cache changed (hard link or copy alike)
        model_hub.reset_log()
        again = store(tmp_path / "vol", hf=[cache]).ensure(REF)  # warm: the volume's own manifest
        assert again.path == got.path and model_hub.requests == []
    finally:
        writable(cache)


def test_status_names_the_hugging_face_cache_a_missing_model_would_be_adopted_from(
        model_hub: FakeHub, tmp_path: Path) -> None:
    cache = hf_cache(model_hub, tmp_path / "hf")
    st = store(tmp_path / "vol", hf=[cache]).status(REF)
    assert st.state == "missing" and st.adoptable_from == str(cache)
    assert not [p for p in (tmp_path / "vol").rglob("*") if p.is_file() and p.stat().st_size == len(DATA)]
    assert store(tmp_path / "vol2").status(REF).adoptable_from is None  # no such cache configured


def test_copy_mode_gives_the_volume_its_own_inode(model_hub: FakeHub, tmp_path: Path) -> None:
    cache = hf_cache(model_hub, tmp_path / "hf")
    adopted = store(tmp_path / "vol").adopt(REF, [str(cache)], mode="copy")
    assert adopted.state == "present" and adopted.verified_against == "hub"
    final = tmp_path / "vol" / adopted.records[0].path
    assert os.stat(final).st_ino != os.stat(blob_of(cache)).st_ino
    assert stat.S_IMODE(os.stat(final).st_mode) == 0o444


def test_corrupt_hf_cache_file_is_not_used_and_is_downloaded(model_hub: FakeHub, tmp_path: Path) -> None:
    cache = hf_cache(model_hub, tmp_path / "hf")
    blob = blob_of(cache)
    blob.write_bytes(b"X" + DATA[1:])  # same size: only the hash tells
    got = store(tmp_path / "vol", hf=[cache]).ensure(REF)
    assert Path(got.path).read_bytes() == DATA
    assert model_hub.body_downloads() == 1
    assert blob.read_bytes()[:1] == b"X"  # the source cache is not ours to repair


def test_hub_unreachable_uses_the_hash_the_cache_recorded(
        model_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = hf_cache(model_hub, tmp_path / "hf")
    monkeypatch.setenv("HF_ENDPOINT", closed_port_endpoint())
    adopted = store(tmp_path / "vol").adopt(REF, [str(cache)])
    assert adopted.state == "present" and adopted.verified_against == "recorded"

    blob_of(cache).write_bytes(b"X" + DATA[1:])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(NotCachedError):  # corrupt, and nothing may be downloaded: refused, never served
        store(tmp_path / "vol2", hf=[cache]).ensure(REF)


def test_cli_adopt_exit_codes_and_one_line_errors(
        model_hub: FakeHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = hf_cache(model_hub, tmp_path / "hf")
    vol = str(tmp_path / "vol")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    r = subprocess.run([sys.executable, "-m", "serve_app.cache", "adopt", REPO, "*Q4_K_M.gguf", "--from", str(cache),
                        "--cache-dir", vol, "--json"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info["state"] == "present" and info["verified_against"] == "hub" and model_hub.body_downloads() == 0

    cases = [
        (["adopt", REPO, FILE, "--from", str(tmp_path / "nope"), "--cache-dir", vol], 2, "not a directory"),
        (["adopt", "-", FILE, "--from", str(cache), "--cache-dir", vol], 2, "Hub repo id"),
        (["adopt", "acme/other-GGUF", FILE, "--from", str(cache), "--cache-dir", vol], 4, None),
    ]
    for argv, code, text in cases:
        capsys.readouterr()
        assert cli_main(argv) == code, argv
        err = capsys.readouterr().err.strip().splitlines()
        if text:
            assert len(err) == 1 and err[0].startswith("error: ") and text in err[0], err
    blob_of(cache).write_bytes(b"X" + DATA[1:])
    assert cli_main(["adopt", REPO, FILE, "--from", str(cache), "--cache-dir", str(tmp_path / "v3")]) == 3


def test_baked_read_only_dir_is_found_first_never_written_and_not_shadowed(
        model_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    baked = tmp_path / "opt-models"
    store(baked).ensure(REF)  # the image build's pull
    read_only(baked)
    before = tree(baked)
    monkeypatch.setenv("HF_ENDPOINT", closed_port_endpoint())  # a start needs no network
    try:
        volume = tmp_path / "runpod-volume"  # an attached, empty network volume
        s = store(volume, baked=str(baked))
        got = s.ensure(REF)
        assert got.path.startswith(str(baked.resolve())) and Path(got.path).read_bytes() == DATA
        assert s.status(REF).state == "present"
        assert tree(baked) == before
        assert not list((volume / "models").iterdir())
    finally:
        writable(baked)


def test_baked_dir_that_disagrees_with_its_manifest_is_skipped(model_hub: FakeHub, tmp_path: Path) -> None:
    baked = tmp_path / "opt-models"
    got = store(baked).ensure(REF)
    os.chmod(got.path, 0o644)
    with open(got.path, "ab") as f:
        f.write(b"!")
    again = store(tmp_path / "vol", baked=str(baked)).ensure(REF)
    assert again.path.startswith(str(tmp_path / "vol")) and model_hub.body_downloads() == 2


def test_baked_file_that_fails_a_rehash_is_healed_onto_the_volume(model_hub: FakeHub, tmp_path: Path) -> None:
    baked = tmp_path / "opt-models"
    got = store(baked).ensure(REF)
    os.chmod(got.path, 0o644)
    Path(got.path).write_bytes(b"X" + DATA[1:])  # same size: the warm check trusts it, a re-hash does not
    s = store(tmp_path / "vol", baked=str(baked))
    assert s.ensure(REF).path == got.path
    assert s.verify(REF).state == "missing"  # the baked copy is out; the volume has nothing yet
    healed = s.heal(REF)  # what LlamaModel asks for when llama.cpp cannot load the file
    assert healed.path.startswith(str(tmp_path / "vol")) and Path(healed.path).read_bytes() == DATA
    assert s.ensure(REF).path == healed.path


def test_split_gguf_is_adopted_whole_or_not_at_all(fhub: FakeHub, tmp_path: Path) -> None:
    parts = [f"big-Q8_0-{i:05d}-of-00002.gguf" for i in (1, 2)]
    for name in parts:
        fhub.add_file(REPO, name, name.encode() * 1000)
        hf_hub_download(REPO, name, cache_dir=str(tmp_path / "hf"), endpoint=fhub.endpoint, token=False)
    ref = ModelRef(repo_id=REPO, filename="*Q8_0*.gguf")
    adopted = store(tmp_path / "vol").adopt(ref, [str(tmp_path / "hf")])
    assert adopted.state == "present" and [r.filename for r in adopted.records] == parts
    snapshot = next((tmp_path / "hf" / f"models--{REPO.replace('/', '--')}" / "snapshots").iterdir())
    (snapshot / parts[1]).unlink()  # an incomplete split is not in the cache at all
    assert store(tmp_path / "vol2").adopt(ref, [str(tmp_path / "hf")]).state == "missing"


def test_the_model_cache_deployment_takes_its_sources_from_the_environment(
        model_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    from serve_app.cache.deployment import ModelCache
    from serve_app.protocol import raise_if_error

    baked = tmp_path / "opt-models"
    store(baked).ensure(REF)
    cache = hf_cache(model_hub, tmp_path / "hf")
    ref = REF.model_dump()
    monkeypatch.setenv("GGUF_SERVE_BAKED_DIR", str(baked))
    monkeypatch.setenv("GGUF_SERVE_HF_CACHE_DIRS", f"{tmp_path / 'absent'},{cache}")
    got = raise_if_error(asyncio.run(ModelCache.func_or_class(str(tmp_path / "vol")).ensure(ref)))
    assert got.path.startswith(str(baked.resolve()))
    monkeypatch.setenv("GGUF_SERVE_BAKED_DIR", "")
    got = raise_if_error(asyncio.run(ModelCache.func_or_class(str(tmp_path / "vol")).ensure(ref)))
    assert got.path.startswith(str(tmp_path / "vol")) and model_hub.body_downloads() == 0  # adopted
