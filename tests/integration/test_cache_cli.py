"""The CLI contract and cross-process behaviour on a shared volume: ``--json`` puts one JSON object on the last
stdout line, exit codes say present/corrupt/missing/error, a failure is exactly one readable stderr line without
a traceback, two processes pulling one file download it once, and a SIGKILLed pull leaves nothing behind that
blocks or pollutes the next one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.fake_hub import FakeHub

pytestmark = pytest.mark.timeout(60)

REPO = "acme/tiny-GGUF"
FILE = "tiny-Q4_K_M.gguf"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def fhub() -> Iterator[FakeHub]:
    with FakeHub() as hub:
        hub.add_file(REPO, FILE, os.urandom(800_000))
        hub.add_file(REPO, "tiny-Q8_0.gguf", b"q8" * 1000)
        yield hub


def env_for(hub: FakeHub, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(HF_ENDPOINT=hub.endpoint, HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_XET="1", **extra)
    return env


def cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "serve_app.cache", *args]


def cli(hub: FakeHub, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd(*args), env=env_for(hub, **extra), capture_output=True, text=True, timeout=45,
                          cwd=ROOT)


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def assert_one_line_error(proc: subprocess.CompletedProcess[str], code: int = 1) -> str:
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_pull_status_verify_rm_list_json_contract(fhub: FakeHub, tmp_path: Path) -> None:
    vol = str(tmp_path / "vol")
    pulled = cli(fhub, "pull", REPO, "*Q4_K_M.gguf", "--cache-dir", vol, "--json")
    assert pulled.returncode == 0, pulled.stderr
    info = last_json(pulled.stdout)
    assert info["state"] == "present" and info["revision"] == "main" and info["commit"] == fhub.commit_of(REPO)
    assert os.path.getsize(info["path"]) == info["size"] == 800_000 and len(info["sha256"]) == 64
    for sub in ("status", "verify"):
        proc = cli(fhub, sub, REPO, "*Q4_K_M.gguf", "--cache-dir", vol, "--json")
        assert proc.returncode == 0 and last_json(proc.stdout)["state"] == "present"
    listed = cli(fhub, "list", "--cache-dir", vol, "--json")
    assert [f["filename"] for f in last_json(listed.stdout)["files"]] == [FILE]
    with open(info["path"], "r+b") as f:
        f.write(b"\x00corrupt")
    for sub in ("status", "verify"):
        proc = cli(fhub, sub, REPO, "*Q4_K_M.gguf", "--cache-dir", vol, "--json")
        assert proc.returncode == 3 and last_json(proc.stdout)["state"] == "corrupt"
    assert cli(fhub, "rm", REPO, "*Q4_K_M.gguf", "--cache-dir", vol).returncode == 0
    gone = cli(fhub, "status", REPO, FILE, "--cache-dir", vol, "--json")
    assert gone.returncode == 4 and last_json(gone.stdout)["state"] == "missing"


def test_errors_are_one_readable_line(fhub: FakeHub, tmp_path: Path) -> None:
    vol = str(tmp_path / "vol")
    proc = cli(fhub, "pull", "acme/nope", FILE, "--cache-dir", vol, "--json")
    assert "repo_not_found" in assert_one_line_error(proc)
    assert last_json(proc.stdout)["error"]["code"] == "repo_not_found"
    line = assert_one_line_error(cli(fhub, "pull", REPO, "nope.gguf", "--cache-dir", vol))
    assert "tiny-Q4_K_M.gguf, tiny-Q8_0.gguf" in line
    assert_one_line_error(cli(fhub, "pull", REPO, "../x.gguf", "--cache-dir", vol))
    assert_one_line_error(cli(fhub, "pull", REPO, FILE, "--cache-dir", vol, "--revision", "nope"))
    assert_one_line_error(cli(fhub, "pull", REPO, FILE, "--cache-dir", vol, "--max-attempts", "0"), code=2)
    offline = cli(fhub, "pull", REPO, FILE, "--cache-dir", vol, HF_HUB_OFFLINE="1")
    assert "not_cached" in assert_one_line_error(offline)
    usage = cli(fhub, "pull", REPO, FILE)  # no --cache-dir (optional only with --config): one usage line, exit 2
    assert usage.returncode == 2 and "Traceback" not in usage.stderr
    assert usage.stderr.strip().splitlines()[-1].endswith("--cache-dir is required")


def test_unreachable_hub_one_line(tmp_path: Path) -> None:
    hub = FakeHub().start()
    hub.stop()
    line = assert_one_line_error(cli(hub, "pull", REPO, FILE, "--cache-dir", str(tmp_path), "--max-attempts", "2"))
    assert hub.endpoint in line and "HF_ENDPOINT" in line and "HF_HUB_OFFLINE=1" in line


def test_offline_pull_of_cached_file_makes_no_requests(fhub: FakeHub, tmp_path: Path) -> None:
    vol = str(tmp_path / "vol")
    assert cli(fhub, "pull", REPO, FILE, "--cache-dir", vol).returncode == 0
    fhub.reset_log()
    proc = cli(fhub, "pull", REPO, FILE, "--cache-dir", vol, "--json", HF_HUB_OFFLINE="1")
    assert proc.returncode == 0 and last_json(proc.stdout)["state"] == "present"
    assert fhub.requests == []


def test_two_processes_download_once(fhub: FakeHub, tmp_path: Path) -> None:
    vol = str(tmp_path / "vol")
    fhub.set_fault("stall", count=1, seconds=2.0, after_bytes=200_000)  # keep the winner busy
    args = ("-v", "pull", REPO, FILE, "--cache-dir", vol, "--json")
    procs = [subprocess.Popen(cmd(*args), env=env_for(fhub), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=ROOT) for _ in range(2)]
    outs = [p.communicate(timeout=45) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert len({last_json(out)["sha256"] for out, _ in outs}) == 1
    assert fhub.body_downloads() == 1
    assert any("waiting for another process" in err for _, err in outs)


def test_sigkill_mid_download_leaves_nothing_behind(fhub: FakeHub, tmp_path: Path) -> None:
    vol = tmp_path / "vol"
    fhub.set_fault("stall", count=1, seconds=30, after_bytes=300_000)
    victim = subprocess.Popen(cmd("pull", REPO, FILE, "--cache-dir", str(vol)), env=env_for(fhub),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    deadline = time.monotonic() + 20
    while fhub.body_downloads() == 0 or not any((vol / ".staging").glob("*/*")):
        assert time.monotonic() < deadline and victim.poll() is None
        time.sleep(0.05)
    time.sleep(0.2)  # let it write what arrived before the stall
    victim.send_signal(signal.SIGKILL)
    victim.wait(10)
    assert list((vol / ".staging").iterdir())  # the orphan exists...
    proc = cli(fhub, "pull", REPO, FILE, "--cache-dir", str(vol), "--json")
    assert proc.returncode == 0, proc.stderr
    assert os.path.getsize(last_json(proc.stdout)["path"]) == 800_000
    assert list((vol / ".staging").iterdir()) == []  # ...and the next pull removed it
    assert fhub.body_downloads() == 2
