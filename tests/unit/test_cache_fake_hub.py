"""The fake Hub speaks the Hub's protocol as huggingface_hub 2.4 expects it (302 + X-Repo-Commit/X-Linked-*
headers, cross-origin CDN with Range, X-Error-Code errors, never Xet headers) and its faults do exactly what they
say, because every cache test's meaning rests on it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_url

from tests.support.fake_hub import FakeHub

pytestmark = pytest.mark.timeout(30)

REPO = "acme/m"


@pytest.fixture
def fhub() -> Iterator[FakeHub]:
    with FakeHub() as hub:
        yield hub


def test_real_client_reads_metadata(fhub: FakeHub, tmp_path: Path) -> None:
    path = tmp_path / "big.gguf"
    path.write_bytes(os.urandom(300_000))
    sha = fhub.add_file(REPO, "big.gguf", path)  # served from disk
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    info = HfApi(endpoint=fhub.endpoint).model_info(REPO, files_metadata=True, token=False)
    assert info.sha == fhub.commit_of(REPO)
    assert info.siblings and info.siblings[0].lfs and info.siblings[0].lfs.sha256 == sha
    meta = get_hf_file_metadata(hf_hub_url(REPO, "big.gguf", endpoint=fhub.endpoint), token=False)
    assert (meta.etag, meta.size, meta.commit_hash) == (sha, 300_000, fhub.commit_of(REPO))
    assert meta.location.startswith(fhub.cdn_endpoint) and meta.xet_file_data is None


def test_cdn_range_and_headers(fhub: FakeHub) -> None:
    sha = fhub.add_file(REPO, "x.gguf", bytes(range(256)) * 10)
    head = httpx.head(f"{fhub.endpoint}/{REPO}/resolve/main/x.gguf")
    assert head.status_code == 302 and not any(k.lower().startswith("x-xet") for k in head.headers)
    part = httpx.get(f"{fhub.cdn_endpoint}/cdn/{sha}", headers={"Range": "bytes=2550-"})
    assert part.status_code == 206 and part.content == bytes(range(246, 256))
    assert part.headers["Content-Range"] == "bytes 2550-2559/2560"
    assert httpx.get(f"{fhub.cdn_endpoint}/cdn/{sha}", headers={"Range": "bytes=9999-"}).status_code == 416
    assert fhub.body_downloads(sha) == 1  # the 416 sent no body


def test_error_codes(fhub: FakeHub) -> None:
    fhub.add_file(REPO, "x.gguf", b"x")
    fhub.add_file("acme/gated", "x.gguf", b"x", gated=True)
    cases = {
        f"/{'acme/none'}/resolve/main/x.gguf": (401, "RepoNotFound"),
        f"/{REPO}/resolve/main/nope.gguf": (404, "EntryNotFound"),
        f"/{REPO}/resolve/v9/x.gguf": (404, "RevisionNotFound"),
        "/acme/gated/resolve/main/x.gguf": (403, "GatedRepo"),
    }
    for path, (status, code) in cases.items():
        r = httpx.head(fhub.endpoint + path)
        assert (r.status_code, r.headers["X-Error-Code"]) == (status, code)
    authed = httpx.head(fhub.endpoint + "/acme/gated/resolve/main/x.gguf",
                        headers={"Authorization": f"Bearer {fhub.token}"})
    assert authed.status_code == 302


def test_faults_apply_to_the_requested_count(fhub: FakeHub) -> None:
    data = os.urandom(100_000)
    sha = fhub.add_file(REPO, "x.gguf", data)
    url = f"{fhub.cdn_endpoint}/cdn/{sha}"
    fhub.set_fault("corrupt", count=1)
    corrupted = httpx.get(url).content
    assert len(corrupted) == len(data) and corrupted != data
    assert httpx.get(url).content == data
    fhub.set_fault("status", code=503, count=2, path_contains="x.gguf")
    assert [httpx.get(url).status_code for _ in range(3)] == [503, 503, 200]
    fhub.set_fault("drop", after_bytes=1000)
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.get(url)
    fhub.set_fault("wrong_size", delta=7)
    head = httpx.head(f"{fhub.endpoint}/{REPO}/resolve/main/x.gguf")
    assert head.headers["X-Linked-Size"] == str(len(data) + 7)
    fhub.set_fault("stall", seconds=5, after_bytes=10)
    with pytest.raises(httpx.ReadTimeout):
        httpx.get(url, timeout=0.3)
    assert [r["status"] for r in fhub.requests if r["host"] == "cdn"][-1] == 200
