"""The repo's own ``serve_config.yaml``, with only the public args overridden, runs under ``serve run`` and answers
a chat completion, and the Ray dashboard lists its deployments healthy; without Hub access the preflight fails fast
with one readable line. The cluster ``serve run`` uses is this test's own (``ray start --head`` on free ports, in its
own temp dir, stopped afterwards), so another Ray on the machine holding Ray's default ports cannot disturb it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from tests.conftest import TEST_FILE, TEST_REPO, free_port
from tests.support.procs import stop_process_group

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.timeout(300)


def overridden_config(tmp_path: Path, cache_dir: Path) -> Path:
    doc = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    args = doc["applications"][0]["args"]
    args["model"].update(repo_id=TEST_REPO, filename=TEST_FILE, revision="main")
    args["cache_dir"] = str(cache_dir)
    args["accelerator"] = "auto"
    out = tmp_path / "serve_config.yaml"
    out.write_text(yaml.safe_dump(doc))
    return out


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(HF_HUB_DISABLE_TELEMETRY="1", RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(REPO), **extra)
    return env


@contextmanager
def own_ray_head(env: dict[str, str], log_path: Path) -> Iterator[tuple[str, int]]:
    """A Ray head for this test alone: every port Ray would otherwise default (GCS 6379, dashboard 8265, client
    server 10001, dashboard agent 52365) is a free one, in a short temp dir (Unix socket paths are limited).
    ``--block`` keeps it in our process group, so stopping the group stops it (never ``ray stop``, which would
    stop every Ray of this user). Yields the GCS address and the dashboard port."""
    gcs, dashboard = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats", "--num-cpus", "4",
           "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
           "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
           "--temp-dir", temp_dir]
    with log_path.open("w") as log:
        head = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 120
        while "Ray runtime started" not in log_path.read_text():
            assert head.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.5)
        yield f"127.0.0.1:{gcs}", dashboard
    finally:
        stop_process_group(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_serve_run_repo_config(hub, tmp_path: Path) -> None:
    cfg = overridden_config(tmp_path, tmp_path / "volume")
    port = yaml.safe_load(cfg.read_text())["http_options"]["port"]
    # RAY_AUTH_MODE=token: Ray 2.60 uses the token (~/.ray/auth_token) for an explicit address only when told to
    env = clean_env(HF_ENDPOINT=hub.endpoint, RAY_AUTH_MODE="token")
    with own_ray_head(env, tmp_path / "ray.log") as (address, dashboard):
        serve_run_and_check(cfg, port, dashboard, ["--address", address], env, tmp_path / "serve.log")


def serve_run_and_check(cfg: Path, port: int, dashboard: int, args: list[str], env: dict[str, str],
                        log_path: Path) -> None:
    log = log_path.open("w")
    proc = subprocess.Popen([str(BIN / "serve"), "run", *args, str(cfg)], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        t0 = time.time()
        ready = None
        while time.time() - t0 < 180 and proc.poll() is None:
            try:
                r = httpx.get(f"{base}/ready", timeout=5)
                if r.status_code == 200:
                    ready = r.json()
                    break
                assert r.status_code in (404, 503), r.text  # 404 until the app is deployed, 503 while loading
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        assert ready is not None, log_path.read_text()[-3000:]
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none")
        out = client.chat.completions.create(model=ready["model"], messages=[{"role": "user", "content": "hi"}],
                                             max_tokens=5, temperature=0)
        assert out.choices[0].message.content is not None and out.usage.completion_tokens >= 1
        print(f"serve run: ready after {time.time() - t0:.1f} s")
        check_dashboard_lists_healthy_deployments(dashboard)
    finally:
        stop_process_group(proc)


def check_dashboard_lists_healthy_deployments(dashboard: int) -> None:
    """The Ray dashboard's Serve API (what the dashboard UI shows) lists the three deployments, healthy. Ray 2.60
    turns token auth on by default: the token is in ~/.ray/auth_token."""
    token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    headers = {"Authorization": f"Bearer {token_file.read_text().strip()}"} if token_file.exists() else {}
    deadline = time.time() + 60
    while True:
        r = httpx.get(f"http://127.0.0.1:{dashboard}/api/serve/applications/", headers=headers, timeout=10)
        deps = r.json()["applications"]["llm"]["deployments"] if r.status_code == 200 else {}
        if deps and all(d["status"] == "HEALTHY" for d in deps.values()) or time.time() > deadline:
            break
        time.sleep(1)
    assert r.status_code == 200, r.text
    assert {name: d["status"] for name, d in deps.items()} == {
        "ModelCache": "HEALTHY", "LlamaModel": "HEALTHY", "Ingress": "HEALTHY"}


def test_preflight_fails_fast_without_hub(tmp_path: Path) -> None:
    cfg = overridden_config(tmp_path, tmp_path / "volume")
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "serve_app.preflight", str(cfg)], cwd=REPO, capture_output=True,
                       text=True, env=clean_env(HF_ENDPOINT=dead), timeout=120)
    elapsed = time.time() - t0
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]  # retry progress lines may come first; the verdict is one line
    assert last.startswith("error:") and "unreachable" in last and "HF_ENDPOINT" in last, r.stderr
    assert "Traceback" not in r.stderr
    assert elapsed < 60, elapsed
    assert not (tmp_path / "volume").exists() or not any((tmp_path / "volume").rglob("*.gguf"))
