"""A small fake of RunPod's serverless job API on 127.0.0.1, for running the real ``runpod`` worker loop in tests.

It speaks the production wire format of runpod 1.12 (its worker loop, ``runpod.serverless.modules``):

* ``GET /job-take/<worker>?...&job_in_progress=0|1`` -> one queued job ``{"id", "input"}`` or 204;
  ``GET /job-take-batch/<worker>?...&batch_size=N`` -> a list of up to N jobs or 204. Both long-poll briefly.
* ``GET /job-stop/<worker>?...`` -> 204 after a short wait (no stop signals).
* ``POST /job-stream/<worker>/<id>?...&isStream=false`` with body ``{"output": <item>}``: one per yielded item.
* ``POST /job-done/<worker>/<id>?...&isStream=true|false`` with ``{"output": [...]}`` or ``{"error": "..."}``.
  Bodies are JSON text sent as ``application/x-www-form-urlencoded``.

Point the worker at it with ``env()``; every request is recorded in ``takes`` / ``posts``. The helpers at the end
start the real worker process (``python -m serve_app.runpod``) beside the test's Ray cluster.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.support.procs import stop_process_group


@dataclass
class Post:
    kind: str  # "stream" | "done"
    job_id: str
    body: dict[str, Any]
    query: dict[str, str]
    headers: dict[str, str]


@dataclass
class Take:
    path: str
    query: dict[str, str]
    handed_out: list[str] = field(default_factory=list)


class FakeRunPod:
    """Context manager; ``add_job(input)`` queues a job, ``wait_done(id)`` returns its job-done body."""

    def __init__(self, poll_wait_s: float = 0.5) -> None:
        self.poll_wait_s = poll_wait_s
        self.jobs: deque[dict[str, Any]] = deque()
        self.posts: list[Post] = []
        self.takes: list[Take] = []
        self._cond = threading.Condition()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self.base = f"http://127.0.0.1:{self._server.server_address[1]}"

    # ---- lifecycle ---------------------------------------------------------------------------------------

    def __enter__(self) -> FakeRunPod:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def env(self, worker_id: str = "test-worker") -> dict[str, str]:
        """The variables RunPod sets in a serverless container, pointed at this fake."""
        return {
            "RUNPOD_WEBHOOK_GET_JOB": f"{self.base}/job-take/$ID?gpu=test",
            "RUNPOD_WEBHOOK_POST_OUTPUT": f"{self.base}/job-done/$RUNPOD_POD_ID/$ID?gpu=test",
            "RUNPOD_WEBHOOK_POST_STREAM": f"{self.base}/job-stream/$RUNPOD_POD_ID/$ID?gpu=test",
            "RUNPOD_POD_ID": worker_id,
            "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true",
            "RUNPOD_SKIP_GPU_CHECK": "true",
        }

    # ---- test API ----------------------------------------------------------------------------------------

    def add_job(self, job_input: Any, job_id: str | None = None) -> str:
        return self.add_jobs([job_input], [job_id] if job_id else None)[0]

    def add_jobs(self, inputs: list[Any], ids: list[str] | None = None) -> list[str]:
        """Queue several jobs at once, so that one job-take-batch can hand them all out."""
        ids = ids or [f"job-{uuid.uuid4().hex[:12]}" for _ in inputs]
        with self._cond:
            for job_id, job_input in zip(ids, inputs, strict=True):
                self.jobs.append({"id": job_id, "input": job_input})
            self._cond.notify_all()
        return ids

    def wait_done(self, job_id: str, timeout_s: float = 60.0) -> dict[str, Any]:
        """The body of the job-done POST for ``job_id``."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                for p in self.posts:
                    if p.kind == "done" and p.job_id == job_id:
                        return p.body
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"job {job_id} not done after {timeout_s} s")
                self._cond.wait(left)

    def done_post(self, job_id: str) -> Post:
        self.wait_done(job_id)
        with self._cond:
            return next(p for p in self.posts if p.kind == "done" and p.job_id == job_id)

    def stream_outputs(self, job_id: str) -> list[Any]:
        """The ``output`` of every job-stream POST for ``job_id``, in arrival order."""
        with self._cond:
            return [p.body.get("output") for p in self.posts if p.kind == "stream" and p.job_id == job_id]

    def wait_for_poll(self, batch_size: int, timeout_s: float = 30.0) -> None:
        """Wait for a new job-take-batch asking for ``batch_size`` jobs (an idle worker asks for its concurrency)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            start = len(self.takes)
            while not any(t.query.get("batch_size") == str(batch_size) for t in self.takes[start:]):
                left = deadline - time.monotonic()
                if left <= 0:
                    asked = [t.query.get("batch_size", "1") for t in self.takes[start:]]
                    raise TimeoutError(f"no poll for {batch_size} jobs in {timeout_s} s (asked: {asked})")
                self._cond.wait(left)

    def batch_sizes(self) -> list[int]:
        """``batch_size`` of every job-take-batch request so far (the worker's concurrency at that moment)."""
        with self._cond:
            return [int(t.query["batch_size"]) for t in self.takes if "batch_size" in t.query]

    # ---- server ------------------------------------------------------------------------------------------

    def _take(self, path: str, query: dict[str, str], n: int) -> list[dict[str, Any]]:
        deadline = time.monotonic() + self.poll_wait_s
        with self._cond:
            take = Take(path, query)
            self.takes.append(take)  # recorded on arrival, so a test can wait for the next poll's batch size
            self._cond.notify_all()
            while not self.jobs and time.monotonic() < deadline:
                self._cond.wait(deadline - time.monotonic())
            out = [self.jobs.popleft() for _ in range(min(n, len(self.jobs)))]
            take.handed_out = [j["id"] for j in out]
            return out

    def _record(self, post: Post) -> None:
        with self._cond:
            self.posts.append(post)
            self._cond.notify_all()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _reply(self, status: int, payload: Any = None) -> None:
                data = b"" if payload is None else json.dumps(payload).encode()
                self.send_response(status)
                if payload is not None:
                    self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _split(self) -> tuple[list[str], dict[str, str]]:
                url = urlsplit(self.path)
                query = {k: v[-1] for k, v in parse_qs(url.query).items()}
                return [p for p in url.path.split("/") if p], query

            def do_GET(self) -> None:
                parts, query = self._split()
                kind = parts[0] if parts else ""
                if kind == "job-take":
                    jobs = fake._take(self.path, query, 1)
                    if jobs:
                        self._reply(200, jobs[0])
                    else:
                        self._reply(204)
                elif kind == "job-take-batch":
                    jobs = fake._take(self.path, query, int(query.get("batch_size", "1")))
                    if jobs:
                        self._reply(200, jobs)
                    else:
                        self._reply(204)
                elif kind == "job-stop":
                    time.sleep(fake.poll_wait_s)
                    self._reply(204)
                else:
                    self._reply(404, {"error": f"no route {self.path}"})

            def do_POST(self) -> None:
                parts, query = self._split()
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                kind = parts[0] if parts else ""
                if kind not in ("job-stream", "job-done") or len(parts) != 3:
                    self._reply(404, {"error": f"no route {self.path}"})
                    return
                try:
                    body = json.loads(raw.decode("utf-8"))
                except ValueError:
                    body = {"unparsed": raw.decode("utf-8", "replace")}
                fake._record(Post(kind.removeprefix("job-"), parts[2], body, query, dict(self.headers.items())))
                self._reply(200, {})

        return Handler


# ---- the worker process -------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[2]
WORKER_MODULE = "serve_app.runpod"  # the container command is ``python -m serve_app.runpod``


def worker_env(**extra: str) -> dict[str, str]:
    """The environment of a worker joining this test process's Ray cluster (no RunPod variables: local mode)."""
    import ray

    # RAY_AUTH_MODE too: ray.init() set it in this process, a RunPod container does not have it
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RUNPOD_", "RAY_ADDRESS", "RAY_AUTH_MODE", "GGUF_SERVE_"))}
    env.update(RAY_ADDRESS=ray.get_runtime_context().gcs_address, RUNPOD_LOG_LEVEL="INFO", PYTHONUNBUFFERED="1",
               GGUF_SERVE_RUNPOD_READY_TIMEOUT_S="120", **extra)
    return env


def start_worker(log_path: Path, env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log:
        return subprocess.Popen([sys.executable, "-m", WORKER_MODULE, *args], cwd=REPO, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def log_tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:]


def wait_for_local_api(proc: subprocess.Popen[bytes], log_path: Path, port: int) -> str:
    """Wait until the worker's --rp_serve_api server answers (it starts only once the model is ready)."""
    import httpx

    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 150
    while True:
        assert proc.poll() is None, f"worker exited rc={proc.returncode}:\n{log_tail(log_path)}"
        assert time.monotonic() < deadline, f"the local API never came up:\n{log_tail(log_path)}"
        try:
            httpx.get(f"{base}/openapi.json", timeout=2)
            return base
        except httpx.TransportError:
            time.sleep(0.3)


@contextmanager
def local_api_worker(log_path: Path, port: int, **extra_env: str) -> Iterator[str]:
    """A worker joining this process's cluster and serving RunPod's local API (``--rp_serve_api``) on ``port``;
    yields its base URL and stops the worker's process group afterwards."""
    # A container that joins the cluster has no ~/.ray/auth_token of its own: the token comes in RAY_AUTH_TOKEN.
    env = worker_env(HOME=str(log_path.parent), **extra_env)
    token = Path.home() / ".ray" / "auth_token"
    if token.exists():
        env["RAY_AUTH_TOKEN"] = token.read_text().strip()
    proc = start_worker(log_path, env, "--rp_serve_api", "--rp_api_host", "127.0.0.1", "--rp_api_port", str(port))
    try:
        yield wait_for_local_api(proc, log_path, port)
        assert proc.poll() is None, f"the worker died:\n{log_tail(log_path)}"
    finally:
        stop_process_group(proc)
