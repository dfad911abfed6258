"""LlamaModel's logic without Ray or a model: readiness (loading -> ready | failed, heal once, a dead engine),
prompt building and its limits (checked before any engine work), one generate path for chat and completions,
client-safe ``/ready`` reasons, and blocking prompt work kept off the event loop. The engine and the model are
small fakes behind the same surface as ``serve_app.engine``; the real ones are covered by the integration tests."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from serve_app.cache.results import CachedFile
from serve_app.config import AppArgs, EngineConfig
from serve_app.engine import EngineRequest, EngineStats
from serve_app.errors import (
    ContextOverflowError,
    EngineDeadError,
    GatedRepoError,
    HubUnreachableError,
    InvalidRequestError,
    LocalFileNotFoundError,
    ModelLoadError,
    NotReadyError,
    QueueFullError,
    RepoNotFoundError,
    RevisionNotFoundError,
)
from serve_app.model.service import ModelService
from serve_app.protocol import (
    Delta,
    DetokenizeCall,
    Done,
    ErrorEvent,
    GenerateRequest,
    Message,
    SamplingParams,
    Text,
    Timings,
    TokenizeCall,
    Tokens,
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


def test_loads_in_the_background_then_serves_chat_and_completion_on_one_path() -> None:
    async def main() -> None:
        h = Harness()
        assert (await h.service.info()).state == "loading"
        svc = await h.ready()
        info = await svc.info()
        assert info.state == "ready" and info.reason is None and info.n_ctx_seq == 64 and info.plan == {"n_ctx": 256}
        assert h.fetches == ["ensure"] and h.loads == ["/tmp/volume/blobs/m.gguf"]
        evs = await events(svc, chat(("user", "hi")))
        assert [type(e) for e in evs] == [Delta, Done]
        assert "".join(e.text for e in evs if isinstance(e, Delta)) == "hello there"
        prompt_text = h.vocab.detokenize(h.engine.submitted[0].prompt)
        assert prompt_text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        done = await svc.complete(GenerateRequest(label="r2", prompt="abc"))
        assert isinstance(done, Done) and done.text == "hello there"
        assert h.engine.submitted[1].prompt == [1, 3 + ord("a"), 3 + ord("b"), 3 + ord("c")]
        assert h.engine.submitted[1].stream is False

    run(main())


def test_not_ready_while_loading() -> None:
    async def main() -> None:
        h = Harness()
        out = await svc_complete(h.service, GenerateRequest(label="r", prompt="x"))
        assert isinstance(out, ErrorEvent) and isinstance(out.error, NotReadyError)
        tok = await h.service.tokenize(TokenizeCall(text="x"))
        assert isinstance(tok, ErrorEvent) and isinstance(tok.error, NotReadyError)

    run(main())


async def svc_complete(svc: ModelService, req: GenerateRequest) -> Any:
    return await svc.complete(req)


@pytest.mark.parametrize("req, code", [
    (GenerateRequest(label="r", prompt="x" * 63), "context_length_exceeded"),  # 63 + BOS = n_ctx_seq
    (GenerateRequest(label="r", prompt=(5,) * 64), "context_length_exceeded"),
    (GenerateRequest(label="r", prompt=()), "context_length_exceeded"),
    (GenerateRequest(label="r", prompt=(VOCAB + 1,)), "context_length_exceeded"),
])
def test_prompt_limits_refuse_before_any_engine_work(req: GenerateRequest, code: str) -> None:
    async def main() -> None:
        h = Harness(n_ctx_seq=64)
        svc = await h.ready()
        out = await svc.complete(req)
        assert isinstance(out, ErrorEvent) and out.error.code == code, out
        assert h.engine.submitted == []
        ok = await svc.complete(GenerateRequest(label="r", prompt="x" * 62))
        assert isinstance(ok, Done)

    run(main())


def test_chat_too_long_for_the_context_is_refused() -> None:
    async def main() -> None:
        svc = await Harness(n_ctx_seq=32).ready()
        out = await svc.complete(chat(("user", "y" * 40)))
        assert isinstance(out, ErrorEvent) and isinstance(out.error, ContextOverflowError)

    run(main())


def test_fallback_template_end_marker_is_a_stop_string_for_chats_only() -> None:
    async def main() -> None:
        h = Harness()
        svc = await h.ready()
        await svc.complete(chat(("user", "hi"), stop=("###",)))
        await svc.complete(GenerateRequest(label="r", prompt="hi"))
        assert h.engine.submitted[0].params.stop == ("###", "<|im_end|>")
        assert h.engine.submitted[1].params.stop == ()

    run(main())


def test_gemma_without_a_template_gets_gemma_turns() -> None:
    async def main() -> None:
        h = Harness(arch="gemma3", n_ctx_seq=256)
        svc = await h.ready()
        await svc.complete(chat(("system", "be brief"), ("user", "hi")))
        text = h.vocab.detokenize(h.engine.submitted[0].prompt)
        assert text == "<s><start_of_turn>user\nbe brief\n\nhi<end_of_turn>\n<start_of_turn>model\n"
        assert h.engine.submitted[0].params.stop == ("<end_of_turn>",)
        assert h.engine.submitted[0].prompt[0] != 1  # the template wrote the BOS text: no second BOS added

    run(main())


def test_gguf_template_that_does_not_compile_falls_back() -> None:
    async def main() -> None:
        h = Harness(template="{% for %}")
        svc = await h.ready()
        assert (await svc.info()).state == "ready"
        assert svc.loader.loaded is not None and svc.loader.loaded.prompts.template.is_fallback

    run(main())


def test_template_error_is_a_400_naming_the_configured_template() -> None:
    async def main() -> None:
        h = Harness(args={"server": {"chat_template": "{{ messages[5]['content'] }}"}})
        svc = await h.ready()
        out = await svc.complete(chat(("user", "hi")))
        assert isinstance(out, ErrorEvent) and out.error.status == 400
        assert "server.chat_template" in out.error.message
        assert (await svc.info()).state == "ready" and svc.health_problem() is None

    run(main())


def test_unloadable_file_is_healed_once() -> None:
    async def main() -> None:
        h = Harness(load_errors=[ModelLoadError("bad magic")])
        svc = await h.ready()
        assert svc.loader.state == "ready" and h.fetches == ["ensure", "heal"] and len(h.loads) == 2

    run(main())


def test_file_still_unloadable_after_healing_fails_without_restarts() -> None:
    async def main() -> None:
        h = Harness(load_errors=[ModelLoadError("bad"), ModelLoadError("bad")])
        svc = await h.ready()
        assert svc.loader.state == "failed" and svc.loader.reason.startswith("model_load_failed: ")
        assert h.fetches == ["ensure", "heal"] and svc.health_problem() is None

    run(main())


@pytest.mark.parametrize("err", [RepoNotFoundError("repo x"), GatedRepoError("gated"),
                                 RevisionNotFoundError("rev"), LocalFileNotFoundError("no file")])
def test_permanent_source_errors_fail_once_and_keep_the_replica(err: Exception) -> None:
    async def main() -> None:
        h = Harness(fetch_errors=[err])
        svc = await h.ready()
        info = await svc.info()
        assert info.state == "failed" and info.reason.startswith(f"{err.code}: ")  # type: ignore[attr-defined]
        assert svc.health_problem() is None  # a restart would fail the same way: no restart loop
        assert h.fetches == ["ensure"] and h.loads == []

    run(main())


def test_retryable_source_error_asks_for_a_restart() -> None:
    async def main() -> None:
        svc = await Harness(fetch_errors=[HubUnreachableError("timeout")]).ready()
        assert svc.loader.state == "failed" and svc.health_problem() is not None

    run(main())


def test_ready_reason_has_no_paths_or_exception_text() -> None:
    async def main() -> None:
        secret = "/home/alice/private-models/secret.gguf"
        svc = await Harness(fetch_errors=[LocalFileNotFoundError(f"Local model file {secret!r} does not exist")]).ready()
        reason = (await svc.info()).reason or ""
        assert reason.startswith("local_file_not_found: ") and "/" not in reason and "secret" not in reason
        svc2 = await Harness(load_errors=[RuntimeError(f"boom at {secret}")]).ready()
        reason2 = (await svc2.info()).reason or ""
        assert svc2.loader.state == "failed" and "boom" not in reason2 and "/" not in reason2
        assert svc2.health_problem() is not None  # unexpected errors: let Ray Serve try a fresh replica

    run(main())


def test_dead_engine_means_failed_and_unhealthy() -> None:
    async def main() -> None:
        h = Harness()
        svc = await h.ready()
        assert svc.health_problem() is None
        h.engine.dead = "RuntimeError: CUDA error at /src/ggml.c:123"
        info = await svc.info()
        assert info.state == "failed" and info.reason == "engine_dead: the engine stopped; the replica restarts"
        assert svc.health_problem() is not None
        out = await svc.complete(GenerateRequest(label="r", prompt="x"))
        assert isinstance(out, ErrorEvent) and isinstance(out.error, EngineDeadError)

    run(main())


def test_tokenize_and_detokenize_run_off_the_event_loop() -> None:
    async def main() -> None:
        h = Harness()
        svc = await h.ready()
        tok = await svc.tokenize(TokenizeCall(text="abc", add_special=False))
        assert tok == Tokens(tokens=(3 + 97, 3 + 98, 3 + 99))
        assert await svc.detokenize(DetokenizeCall(tokens=tok.tokens)) == Text(content="abc")
        bad = await svc.detokenize(DetokenizeCall(tokens=(VOCAB,)))
        assert isinstance(bad, ErrorEvent) and bad.error.param == "tokens"
        chat_tokens = await svc.tokenize(TokenizeCall(messages=(Message(role="user", content="x"),)))
        assert isinstance(chat_tokens, Tokens)
        await svc.complete(chat(("user", "hi")))
        assert h.vocab.threads and threading.current_thread().name not in h.vocab.threads
        assert all(name.startswith("prompt") for name in h.vocab.threads)

    run(main())


def test_batched_admission_enters_together_and_falls_back_one_by_one() -> None:
    async def main() -> None:
        from serve_app.engine import RequestStream

        h = Harness(queue=2)
        svc = await h.ready()
        streams = [RequestStream(f"r{i}", [5, 6], SamplingParams()) for i in range(2)]
        assert svc.submit_together(streams) == [None, None] and h.engine.commands == 1
        more = [RequestStream(f"s{i}", [5, 6], SamplingParams()) for i in range(2)]
        h.engine.submitted.clear()
        h.engine.queue = 1
        out = svc.submit_together(more)
        assert out[0] is None and isinstance(out[1], QueueFullError)

    run(main())


def test_one_bad_request_in_an_admission_batch_fails_alone() -> None:
    async def main() -> None:
        from serve_app.engine import RequestStream

        h = Harness()
        svc = await h.ready()
        real_submit = h.engine.submit

        def picky(reqs: list[EngineRequest]) -> None:  # as the real engine: checks every request before any
            if any(r.label == "bad" for r in reqs):
                raise InvalidRequestError("not this one", param="prompt")
            real_submit(reqs)

        h.engine.submit = picky  # type: ignore[method-assign]
        streams = [RequestStream(label, [5, 6], SamplingParams()) for label in ("good", "bad", "fine")]
        out = svc.submit_together(streams)
        assert out[0] is None and isinstance(out[1], InvalidRequestError) and out[2] is None
        assert [r.label for r in h.engine.submitted] == ["good", "fine"]

    run(main())


def test_close_shuts_the_engine_and_frees_the_model() -> None:
    async def main() -> None:
        h = Harness()
        svc = await h.ready()
        svc.close()
        assert h.engine.dead == "shut down" and h.vocab.closed

    run(main())
