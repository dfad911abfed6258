"""Session fixtures: tiny GGUF models, a loopback Hub, and one Ray instance for the whole run.

Nothing here reaches the internet: HF_ENDPOINT always points at a FakeHub on 127.0.0.1.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_DISABLE_XET", "1")

from tests.support.fake_hub import FakeHub  # noqa: E402
from tests.support.gguf_factory import ModelSpec, write_gguf  # noqa: E402

TEST_REPO = "acme/tiny-chat-GGUF"
TEST_FILE = "tiny-chat-F16.gguf"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def fhub(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """A fresh loopback Hub for one test, with HF_ENDPOINT pointing at it and no token or offline mode."""
    with FakeHub() as h:
        monkeypatch.setenv("HF_ENDPOINT", h.endpoint)
        for var in ("HF_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            monkeypatch.delenv(var, raising=False)
        yield h


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(write_gguf(tmp_path_factory.mktemp("models") / TEST_FILE, ModelSpec()))


@pytest.fixture(scope="session")
def hub(tiny_model: Path) -> Iterator[FakeHub]:
    with FakeHub() as h:
        h.add_file(TEST_REPO, TEST_FILE, tiny_model)
        h.add_file(TEST_REPO, "README.md", b"# tiny chat model for tests\n")
        yield h


@pytest.fixture(scope="session")
def ray_session(hub: FakeHub) -> Iterator[str]:
    """Ray + Serve for the session; yields the HTTP base URL. Replicas inherit the environment at ``ray.init``,
    so HF_ENDPOINT must point at the loopback Hub before it."""
    import ray
    from ray import serve

    os.environ["HF_ENDPOINT"] = hub.endpoint
    port = free_port()
    # Logical CPUs above the 2 physical cores: light replicas ask for 0 CPU, LlamaModel for 1, and the second
    # test app must still fit (and the multi-model app's three model deployments). llama.cpp's threads are what
    # actually use the cores.
    os.environ["GGUF_TEST_METRICS_PORT"] = str(free_port())
    ray.init(num_cpus=7, include_dashboard=False, log_to_driver=False, configure_logging=False,
             _metrics_export_port=int(os.environ["GGUF_TEST_METRICS_PORT"]),
             _system_config={"metrics_report_interval_ms": 1000})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


def wait_ready(base: str, timeout: float = 120) -> dict:
    import time

    import httpx

    deadline = time.time() + timeout
    last: dict = {}
    while time.time() < deadline:
        r = httpx.get(f"{base}/ready", timeout=10)
        last = r.json()
        if r.status_code == 200:
            return last
        assert last["status"] in ("loading", "unavailable"), last  # unavailable: the replica is restarting
        time.sleep(0.2)
    raise AssertionError(f"not ready: {last}")


LLM_APP_ARGS = {
    "model": {"repo_id": TEST_REPO, "filename": TEST_FILE},
    "accelerator": "auto",
    "engine": {"n_parallel": 4, "n_ctx_per_slot": 512, "max_queue": 8},
}


@pytest.fixture(scope="session")
def llm_app(ray_session: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The application ``llm`` (the real graph on the tiny model, pulled from the loopback Hub), deployed once per
    session and ready; yields its HTTP base URL. Tests that need other settings deploy their own app."""
    from ray import serve

    from serve_app.builder import build_app

    args = {**LLM_APP_ARGS, "cache_dir": str(tmp_path_factory.mktemp("volume"))}
    serve.run(build_app(args), name="llm", route_prefix="/")
    wait_ready(ray_session)
    return ray_session
