"""The ``LlamaModel`` deployment: gets its file from ModelCache, owns one batching engine, reports readiness.

The constructor returns at once and loading runs in the background, so the ingress can answer "loading" on its
readiness route while weights are read (seed process 2: loading -> ready | failed).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_app.cache import CachedFile
from serve_app.chat_template import ChatTemplate
from serve_app.config import AppArgs
from serve_app.engine import (
    Engine,
    LlamaModelHandle,
    LoadReport,
    RequestStream,
    device_name,
    gpu_memory,
    load_engine,
)
from serve_app.errors import (
    InvalidRequestError,
    ModelLoadError,
    NotReadyError,
    QueueFullError,
    ServeError,
)
from serve_app.metrics import ModelMetrics
from serve_app.protocol import (
    Delta,
    DetokenizeCall,
    Done,
    ErrorEvent,
    Event,
    GenerateRequest,
    Message,
    ModelInfo,
    Text,
    TokenizeCall,
    Tokens,
    raise_if_error,
)

log = logging.getLogger("ray.serve")


@serve.deployment(
    ray_actor_options={"num_cpus": 1, "num_gpus": 1},
    max_ongoing_requests=256,
    health_check_period_s=10,
    graceful_shutdown_timeout_s=30,
)
class LlamaModel:
    def __init__(self, cache: DeploymentHandle, args: dict[str, Any], use_gpu: bool) -> None:
        self.args = AppArgs.model_validate(args)
        self.cache = cache
        self.use_gpu = use_gpu
        self.model_id = self.args.model_name()
        self.state = "loading"
        self.reason: str | None = None  # why not ready: short and client-safe; details go to the log
        self.engine: Engine | None = None
        self.model: LlamaModelHandle | None = None
        self.template: ChatTemplate | None = None
        self.report: LoadReport | None = None
        self.phases: dict[str, float] = {}
        self.file: CachedFile | None = None
        self._t0 = time.perf_counter()
        self._first_token_logged = False
        self._batch_admission = False
        self.metrics = ModelMetrics()
        self._gauges_task = asyncio.get_running_loop().create_task(self._report_gauges())
        # Ray runs the constructor on the replica's event loop thread, so the load task lives on that loop.
        self._load_task = asyncio.get_running_loop().create_task(self._load())

    # ---- loading -------------------------------------------------------------------------------------------

    async def _load(self) -> None:
        ref = self.args.model.model_dump()
        try:
            t = time.perf_counter()
            self.file = raise_if_error(await self.cache.ensure.remote(ref))
            self.phases["cache_s"] = time.perf_counter() - t
            try:
                await self._load_file(self.file.path)
            except ModelLoadError as e:
                if type(e) is not ModelLoadError:
                    raise
                # llama.cpp could not read the file: have the cache re-verify (and re-download) it once.
                log.warning("llama.cpp could not load %s; asking ModelCache to re-verify it", self.file.path)
                self.file = raise_if_error(await self.cache.heal.remote(ref))
                await self._load_file(self.file.path)
            self.state = "ready"
            self.phases["ready_s"] = time.perf_counter() - self._t0
            for k, v in self.phases.items():
                self.metrics.phase.set(v, tags={"phase": k})
            log.info("model %s ready in %.2f s (%s)", self.model_id, self.phases["ready_s"], self.phases)
        except ServeError as e:
            self.state, self.reason = "failed", f"{e.code}: {e.message}"
            log.error("model %s failed to load: %s", self.model_id, e.message)
        except Exception:  # anything unexpected still leaves a readable state, not a hung "loading"
            self.state, self.reason = "failed", "load_failed: unexpected error (see the replica log)"
            log.exception("model %s failed to load", self.model_id)

    async def _load_file(self, path: str) -> None:
        assert self.file is not None
        key = hashlib.sha256(f"{self.file.sha256}|{path}".encode()).hexdigest()[:16]
        device = await asyncio.to_thread(device_name) if self.use_gpu else "cpu"
        profile = os.path.join(self.args.cache_dir, ".engine-profiles", f"{key}-{device}.json")
        t = time.perf_counter()
        self.engine, self.model, self.report = await asyncio.to_thread(
            load_engine, path, self.args.engine, want_gpu=self.use_gpu, profile_path=profile)
        self.phases["load_s"] = time.perf_counter() - t
        src = self.args.server.chat_template or self.model.chat_template()
        bos, eos = self.model.token_text(self.model.bos), self.model.token_text(self.model.eos)
        try:
            self.template = ChatTemplate(src, bos, eos)
        except InvalidRequestError as e:  # a GGUF whose template does not even compile still serves
            log.warning("%s; using the ChatML fallback template", e.message)
            self.template = ChatTemplate(None, bos, eos)

    # ---- Ray Serve hooks -----------------------------------------------------------------------------------

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """``batching`` from the config, live (a ``user_config`` change does not restart the replica)."""
        if "max_batch_size" in user_config:
            self._admit.set_max_batch_size(int(user_config["max_batch_size"]))
        if "batch_wait_timeout_s" in user_config:
            wait = float(user_config["batch_wait_timeout_s"])
            self._admit.set_batch_wait_timeout_s(wait)
            # With no window to wait for, the Ray batch hop adds only latency (~2.7 ms of queue time measured
            # here): the engine already admits everything that arrived during a step together.
            self._batch_admission = wait > 0

    def check_health(self) -> None:
        if self.engine is not None and self.engine.dead:
            raise RuntimeError(f"engine dead: {self.engine.dead}")
        if self.state == "failed":
            raise RuntimeError(f"model failed to load: {self.reason}")

    def __del__(self) -> None:
        # Ray calls this after draining in-flight requests (graceful_shutdown_timeout_s bounds the wait).
        if getattr(self, "engine", None) is not None:
            self.engine.shutdown()
        if getattr(self, "model", None) is not None:
            self.model.close()

    # ---- API used by the ingress ---------------------------------------------------------------------------

    async def info(self) -> ModelInfo:
        info = ModelInfo(state=self.state, model=self.model_id, reason=self.reason, phases=self.phases,
                         file=self.file.model_dump() if self.file else None,
                         gpu_memory=gpu_memory() if self.use_gpu else None)
        if self.engine is not None:
            st = self.engine.stats()
            info = info.model_copy(update=dict(
                n_ctx_seq=self.engine.n_ctx_seq, slots_total=st.slots_total, slots_busy=st.slots_busy,
                waiting=st.waiting, kv_cells_used=st.kv_cells_used, kv_cells_total=st.kv_cells_total,
                tokens_generated=st.tokens_generated, tokens_prompt=st.tokens_prompt, preemptions=st.preemptions,
                plan=self.report.plan if self.report else None))
        return info

    async def generate(self, req: GenerateRequest) -> AsyncIterator[Event]:
        """The events of one request: ``Delta`` ... then ``Done`` or ``ErrorEvent`` (errors are values: they
        cross Ray without traceback wrapping). With ``req.stream`` False the text comes as one ``Delta``."""
        try:
            stream = await self._start(req)
        except ServeError as e:
            yield ErrorEvent(e)
            return
        try:
            async for ev in stream.events():
                if isinstance(ev, Done):
                    self._observe(ev)
                yield ev
        finally:
            stream.close()

    async def complete(self, req: GenerateRequest) -> Done | ErrorEvent:
        """Non-streaming: ``Done`` with the whole ``text``, or ``ErrorEvent``."""
        parts: list[str] = []
        async for ev in self.generate(req.model_copy(update={"stream": False})):
            if isinstance(ev, Delta):
                parts.append(ev.text)
            elif isinstance(ev, Done):
                ev.text = "".join(parts)
                return ev
            else:
                return ev
        return ErrorEvent(ServeError("generation ended without a result"))

    async def tokenize(self, call: TokenizeCall) -> Tokens | ErrorEvent:
        try:
            model = self._ready_model()
            if call.messages is not None:
                tokens = self._chat_tokens(call.messages)
            else:
                tokens = model.tokenize(call.text or "", call.add_special, True)
            return Tokens(tokens=tuple(tokens))
        except ServeError as e:
            return ErrorEvent(e)

    async def detokenize(self, call: DetokenizeCall) -> Text | ErrorEvent:
        try:
            model = self._ready_model()
            if any(not model.valid_token(t) for t in call.tokens):
                raise InvalidRequestError("token ids must be within the vocabulary", param="tokens")
            return Text(content=model.detokenize(list(call.tokens), special=True))
        except ServeError as e:
            return ErrorEvent(e)

    # ---- internals -----------------------------------------------------------------------------------------

    def _observe(self, done: Done) -> None:
        self.metrics.observe_finish(done)
        if not self._first_token_logged and done.usage.completion_tokens:
            # Cold start ends with the first token served, not with the weights loaded (seed process 6).
            self._first_token_logged = True
            self.phases["first_token_s"] = time.perf_counter() - self._t0
            self.metrics.phase.set(self.phases["first_token_s"], tags={"phase": "first_token_s"})
            log.info("first token served %.2f s after the replica started", self.phases["first_token_s"])

    async def _report_gauges(self) -> None:
        while True:
            try:
                if self.engine is not None:
                    st = self.engine.stats()
                    self.metrics.queue_depth.set(st.waiting)
                    self.metrics.slots_busy.set(st.slots_busy)
                    self.metrics.slots_free.set(st.slots_total - st.slots_busy)
                    self.metrics.kv_used.set(st.kv_cells_used)
                    self.metrics.kv_ratio.set(st.kv_cells_used / max(1, st.kv_cells_total))
                if self.use_gpu:
                    mem = await asyncio.to_thread(gpu_memory)
                    if mem:
                        self.metrics.gpu_used.set(mem["used_bytes"])
                        self.metrics.gpu_total.set(mem["total_bytes"])
            except Exception:  # metrics must never take the replica down
                log.debug("gauge update failed", exc_info=True)
            await asyncio.sleep(1.0)

    def _ready_model(self) -> LlamaModelHandle:
        if self.state != "ready" or self.model is None:
            raise NotReadyError(f"the model is {self.state}; retry shortly")
        return self.model

    def _chat_tokens(self, messages: tuple[Message, ...]) -> list[int]:
        model = self._ready_model()
        assert self.template is not None
        text = self.template.render([m.model_dump() for m in messages], add_generation_prompt=True)
        # Templates usually write the BOS text themselves; adding another would double it.
        bos_text = self.template.bos_token
        add_special = model.add_bos and not (bos_text and text.startswith(bos_text))
        return model.tokenize(text, add_special=add_special, parse_special=True)

    def _prompt_tokens(self, req: GenerateRequest) -> list[int]:
        if req.messages is not None:
            return self._chat_tokens(req.messages)
        if isinstance(req.prompt, tuple):
            return list(req.prompt)
        return self._ready_model().tokenize(req.prompt or "", add_special=True, parse_special=False)

    async def _start(self, req: GenerateRequest) -> RequestStream:
        if self.state != "ready" or self.engine is None:
            raise NotReadyError(f"the model is {self.state}; retry shortly")
        tokens = self._prompt_tokens(req)
        self.engine.check_prompt(len(tokens))
        rs = RequestStream(req.label, tokens, req.params, stream=req.stream)
        if self._batch_admission:
            err = await self._admit(rs)
            if err is not None:
                raise err
        else:
            self.engine.submit([rs.request])
        rs.bind(self.engine)
        return rs

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def _admit(self, streams: list[RequestStream]) -> list[ServeError | None]:
        """Ray Serve dynamic batching at admission (used when ``batch_wait_timeout_s`` > 0): requests arriving
        within the window enter the engine in one command, so they are admitted in the same step and their prompts
        prefill in one llama batch instead of the first one starting alone. It returns once they are admitted:
        generation itself is continuous (the engine), so a short request never waits for a long one."""
        assert self.engine is not None
        try:
            self.engine.submit([s.request for s in streams])
            return [None] * len(streams)
        except QueueFullError:
            out: list[ServeError | None] = []
            for s in streams:
                try:
                    self.engine.submit([s.request])
                    out.append(None)
                except ServeError as e:
                    out.append(e)
            return out
        except ServeError as e:
            return [e] * len(streams)
