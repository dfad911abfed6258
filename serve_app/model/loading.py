"""Loading: ask ModelCache for the file -> load it into an engine -> ``ready`` | ``failed``; a
file llama.cpp cannot read is re-verified (and re-downloaded) by ModelCache once.

``failed`` comes in two kinds. A permanent failure (repo, revision or file not found, gated repo, a file that
still does not load after healing) leaves the replica healthy and failed: a restart would fail the same way, so
restarting would only hammer the Hub forever. A retryable one (Hub unreachable, a download that gave up) and an
engine that died after loading make ``health_problem`` answer, so Ray Serve replaces the replica.
``reason`` is what the unauthenticated ``/ready`` shows: a code and a fixed phrase, never exception text or paths.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from serve_app.cache.results import CachedFile
from serve_app.config import AppArgs, EngineConfig
from serve_app.engine import Engine, LlamaModelHandle, LoadReport, device_name, load_engine
from serve_app.errors import ModelLoadError, ServeError
from serve_app.protocol import ModelState, raise_if_error

from .prompt import PromptBuilder, load_template

log = logging.getLogger("ray.serve")

# (path, engine config, use_gpu, profile path) -> a running engine over the loaded model.
EngineFactory = Callable[[str, EngineConfig, bool, str], tuple[Engine, LlamaModelHandle, LoadReport]]
# (ModelCache method, model ref) -> the verified file on the volume; raises ServeError.
FetchFile = Callable[[str, dict[str, Any]], Awaitable[CachedFile]]


def cache_fetch(cache: Any) -> FetchFile:
    """The one way a model deployment talks to ModelCache (its handle): ``ensure`` or ``heal`` -> the verified
    file, or the cache's error raised."""
    async def fetch(method: str, ref: dict[str, Any]) -> CachedFile:
        result: CachedFile = raise_if_error(await getattr(cache, method).remote(ref))
        return result
    return fetch


def default_engine_factory(path: str, cfg: EngineConfig, use_gpu: bool,
                           profile: str) -> tuple[Engine, LlamaModelHandle, LoadReport]:
    return load_engine(path, cfg, want_gpu=use_gpu, profile_path=profile)


_PHRASES = {
    "repo_not_found": "the model repository was not found (or is private)",
    "gated_repo": "the model repository is gated: accept its terms on the Hub and set HF_TOKEN",
    "file_not_found": "the model file was not found in the repository",
    "revision_not_found": "the model revision was not found",
    "local_file_not_found": "the local model file was not found",
    "invalid_model_reference": "the model reference in the configuration is invalid",
    "hub_unreachable": "the Hub could not be reached; the replica retries",
    "download_failed": "the model download failed; the replica retries",
    "integrity_error": "the downloaded model file failed verification",
    "not_cached": "offline and the model file is not on the volume",
    "model_load_failed": "llama.cpp could not load the model file",
    "out_of_memory": "not enough memory for the model and its context",
    "engine_dead": "the engine stopped; the replica restarts",
}


_ENGINE_DEAD_REASON = f"engine_dead: {_PHRASES['engine_dead']}"


def public_reason(err: ServeError) -> str:
    """A client-safe reason for ``/ready``: the error's code and a fixed phrase."""
    return f"{err.code}: {_PHRASES.get(err.code, 'the model could not be loaded (see the replica log)')}"


@dataclass
class Loaded:
    engine: Engine
    model: LlamaModelHandle
    report: LoadReport
    prompts: PromptBuilder


class Loader:
    """Loads one model in the background and keeps its readiness state."""

    def __init__(self, args: AppArgs, fetch: FetchFile, use_gpu: bool, engine_factory: EngineFactory) -> None:
        self.args = args
        self.fetch = fetch
        self.use_gpu = use_gpu
        self.engine_factory = engine_factory
        self.state: ModelState = "loading"
        self.reason: str | None = None
        self.detail: str | None = None  # the whole failure, for operators only (never over HTTP)
        self.error: ServeError | None = None  # why it failed, for a caller that waited for the load
        self.restart: str | None = None  # why Ray Serve should replace this replica (log text, never shown)
        self.phases: dict[str, float] = {}
        self.file: CachedFile | None = None
        self.loaded: Loaded | None = None
        self.t0 = time.perf_counter()

    async def run(self) -> None:
        ref = self.args.model.model_dump()
        try:
            t = time.perf_counter()
            self.file = await self.fetch("ensure", ref)
            self.phases["cache_s"] = time.perf_counter() - t
            try:
                self.loaded = await self._load_file(self.file)
            except ModelLoadError as e:
                if type(e) is not ModelLoadError:
                    raise
                log.warning("llama.cpp could not load %s; asking ModelCache to re-verify it", self.file.path)
                self.file = await self.fetch("heal", ref)
                self.loaded = await self._load_file(self.file)
            self.state = "ready"
            self.phases["ready_s"] = time.perf_counter() - self.t0
            log.info("model %s ready in %.2f s (%s)", self.args.model_name(), self.phases["ready_s"], self.phases)
        except ServeError as e:
            self._fail(e, f"{e.code}: {e.message}", restart=e.retryable)
        except Exception as e:  # a bug: restarting may help, and a readable state beats a hung "loading"
            log.exception("model %s failed to load", self.args.model_name())
            self._fail(ServeError("unexpected"), f"{type(e).__name__}: {e}", restart=True)

    def _fail(self, err: ServeError, detail: str, restart: bool) -> None:
        self.state, self.reason, self.detail, self.error = "failed", public_reason(err), detail, err
        self.restart = detail if restart else None
        log.error("model %s failed to load (%s): %s", self.args.model_name(),
                  "the replica will be replaced" if restart else "permanent; not retrying", detail)

    async def _load_file(self, file: CachedFile) -> Loaded:
        path = file.path
        key = hashlib.sha256(f"{file.sha256}|{path}".encode()).hexdigest()[:16]
        device = await asyncio.to_thread(device_name) if self.use_gpu else "cpu"
        profile = os.path.join(self.args.cache_dir, ".engine-profiles", f"{key}-{device}.json")
        t = time.perf_counter()
        made = asyncio.get_running_loop().run_in_executor(
            None, self.engine_factory, path, self.args.engine, self.use_gpu, profile)
        try:
            engine, model, report = await asyncio.shield(made)
        except asyncio.CancelledError:
            # The replica is shutting down mid-load; the load thread cannot be stopped, so free what it makes.
            made.add_done_callback(_free_when_made)
            raise
        self.phases["load_s"] = time.perf_counter() - t
        template = await asyncio.to_thread(load_template, model, self.args.server.chat_template)
        return Loaded(engine, model, report, PromptBuilder(model, template, engine.n_ctx_seq,
                                                             self.args.server.reasoning_format))

    def check_engine(self) -> None:
        """Turn a dead engine into ``failed`` (so ``/ready`` says so at once) and a reason to restart."""
        if self.loaded is not None and self.loaded.engine.dead and self.restart is None:
            self.state, self.reason = "failed", _ENGINE_DEAD_REASON
            self.restart = self.detail = f"engine dead: {self.loaded.engine.dead}"
            log.error("model %s: %s", self.args.model_name(), self.restart)

    def health_problem(self) -> str | None:
        self.check_engine()
        return self.restart

    def close(self) -> None:
        if self.loaded is not None:
            self.loaded.engine.shutdown()
            self.loaded.model.close()
            self.loaded = None


def _free_when_made(made: asyncio.Future[tuple[Engine, LlamaModelHandle, LoadReport]]) -> None:
    if made.cancelled() or made.exception() is not None:
        return
    engine, model, _ = made.result()
    engine.shutdown()
    model.close()
