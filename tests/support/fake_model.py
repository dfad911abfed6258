"""Fakes behind the same surface as ``serve_app.engine`` and ModelCache, for unit tests of LlamaModel's logic
without Ray or a model: a vocabulary, an engine that answers on the submitting thread, and a harness that builds
a ``ModelService`` over them."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from serve_app.cache.results import CachedFile
from serve_app.config import AppArgs, EngineConfig
from serve_app.engine import EngineRequest, EngineStats
from serve_app.errors import (
    EngineDeadError,
    QueueFullError,
)
from serve_app.model.service import ModelService
from serve_app.protocol import (
    Delta,
    Done,
    GenerateRequest,
    Message,
    SamplingParams,
    Timings,
    Usage,
)

VOCAB = 300


class FakeVocab:
    """One token per character (code point mod 256, shifted past BOS/EOS); records the threads it runs on."""

    bos, eos, add_bos = 1, 2, True

    def __init__(self, template: str | None = None, arch: str = "llama") -> None:
        self.template, self.arch = template, arch
        self.threads: set[str] = set()
        self.closed = False

    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        self.threads.add(threading.current_thread().name)
        return ([self.bos] if add_special else []) + [3 + ord(c) % 256 for c in text]

    def detokenize(self, tokens: list[int], special: bool = False) -> str:
        self.threads.add(threading.current_thread().name)
        return "".join(chr(t - 3) for t in tokens if t >= 3)

    def token_text(self, token: int) -> str:
        return {1: "<s>", 2: "</s>"}.get(token, "")

    def valid_token(self, token: int) -> bool:
        return 0 <= token < VOCAB

    def chat_template(self) -> str | None:
        return self.template

    def meta(self, key: str) -> str | None:
        return self.arch if key == "general.architecture" else None

    def close(self) -> None:
        self.closed = True


class FakeEngine:
    """Answers each request with one Delta per word of ``reply`` and Done, on the submitting thread."""

    def __init__(self, n_ctx_seq: int = 64, reply: str = "hello there", queue: int = 100) -> None:
        self.n_ctx_seq = n_ctx_seq
        self.reply = reply
        self.queue = queue
        self.dead: str | None = None
        self.submitted: list[EngineRequest] = []
        self.commands = 0

    def submit(self, reqs: list[EngineRequest]) -> None:
        if self.dead:
            raise EngineDeadError("the engine stopped")
        if len(self.submitted) + len(reqs) > self.queue:
            raise QueueFullError("full")
        self.commands += 1
        for r in reqs:
            self.submitted.append(r)
            words = self.reply.split(" ")
            for i, w in enumerate(words):
                r.emit(Delta(w if i == 0 else " " + w, 1))
            r.emit(Done("stop", Usage(prompt_tokens=len(r.prompt), completion_tokens=len(words),
                                      total_tokens=len(r.prompt) + len(words)), Timings()))
            if r.flush is not None:
                r.flush()

    def cancel(self, request_id: str) -> None:
        pass

    def stats(self) -> EngineStats:
        return EngineStats(slots_total=4, slots_busy=0, waiting=0, kv_cells_used=0, kv_cells_total=256, steps=0,
                           tokens_generated=0, tokens_prompt=0, dead=self.dead)

    def shutdown(self) -> None:
        self.dead = self.dead or "shut down"


class FakeReport:
    plan: dict[str, Any] = {"n_ctx": 256}


class Harness:
    """A ModelService over a fake cache (``fetch``), engine and vocabulary."""

    def __init__(self, *, fetch_errors: list[Exception] | None = None, load_errors: list[Exception] | None = None,
                 args: dict[str, Any] | None = None, **engine_kw: Any) -> None:
        self.vocab = FakeVocab(**{k: engine_kw.pop(k) for k in ("template", "arch") if k in engine_kw})
        self.engine = FakeEngine(**engine_kw)
        self.fetch_errors = list(fetch_errors or [])
        self.load_errors = list(load_errors or [])
        self.fetches: list[str] = []
        self.loads: list[str] = []
        base = {"model": {"repo_id": "acme/m-GGUF", "filename": "m.gguf"}, "cache_dir": "/tmp/volume"}
        self.service = ModelService(AppArgs.model_validate({**base, **(args or {})}), self.fetch, False,
                                    engine_factory=self.factory)

    async def fetch(self, method: str, ref: dict[str, Any]) -> CachedFile:
        self.fetches.append(method)
        if self.fetch_errors:
            raise self.fetch_errors.pop(0)
        return CachedFile(repo_id="acme/m", filename="m.gguf", revision="main", commit="c" * 40,
                          path="/tmp/volume/blobs/m.gguf", size=1, sha256="ab" * 32, verified_at="now",
                          parts=["/tmp/volume/blobs/m.gguf"])

    def factory(self, path: str, cfg: EngineConfig, use_gpu: bool, profile: str) -> tuple[Any, Any, Any]:
        self.loads.append(path)
        if self.load_errors:
            raise self.load_errors.pop(0)
        return self.engine, self.vocab, FakeReport()

    async def ready(self) -> ModelService:
        self.service.start()
        for _ in range(200):
            if self.service.loader.state != "loading":
                break
            await asyncio.sleep(0.01)
        return self.service


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def chat(*msgs: tuple[str, str], **params: Any) -> GenerateRequest:
    return GenerateRequest(label="r1", messages=tuple(Message(role=r, content=c) for r, c in msgs),
                           params=SamplingParams(**params))


async def events(svc: ModelService, req: GenerateRequest) -> list[Any]:
    return [ev async for ev in svc.generate(req)]
