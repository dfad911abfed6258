"""The ``EmbeddingModel`` deployment: a GGUF embedding model behind ``/v1/embeddings``.

It shares LlamaModel's loading (``Loader``: ModelCache ``ensure``/``heal``, readiness state, public failure
reasons) but not its engine: an embedding context pools per sequence and generates nothing, so there are no slots
and no scheduler (``serve_app.engine.embedding``). Calls run one at a time on one thread; each packs all its
inputs into as few ``llama_decode`` calls as fit.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_app.config import AppArgs, EngineConfig
from serve_app.engine.embedding import Pooling, load_embedding_engine
from serve_app.errors import NotReadyError, ServeError
from serve_app.protocol import EmbedCall, Embeddings, ErrorEvent, ModelInfo

from .loading import Loader, cache_fetch


def embedding_factory(pooling: Pooling, normalize: bool) -> Any:
    """An ``EngineFactory`` for ``Loader`` that makes an embedding engine instead of a batching one."""
    def make(path: str, cfg: EngineConfig, use_gpu: bool, profile: str) -> Any:
        return load_embedding_engine(path, cfg, want_gpu=use_gpu, pooling=pooling, normalize=normalize)
    return make


class EmbeddingService:
    """The logic of the deployment, without Ray: load in the background, then embed calls off the loop."""

    def __init__(self, args: AppArgs, fetch: Any, use_gpu: bool, pooling: Pooling, normalize: bool) -> None:
        self.model_id = args.model_name()
        self.loader = Loader(args, fetch, use_gpu, embedding_factory(pooling, normalize))
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed")
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.loader.run())

    def info(self) -> ModelInfo:
        ld = self.loader
        info = ModelInfo(state=ld.state, model=self.model_id, reason=ld.reason, detail=ld.detail, phases=ld.phases,
                         file=ld.file.model_dump() if ld.file else None)
        if ld.loaded is not None:
            info = info.model_copy(update={"n_ctx_seq": ld.loaded.engine.n_ctx_seq, "plan": ld.loaded.report.plan})
        return info

    async def embed(self, call: EmbedCall) -> Embeddings | ErrorEvent:
        try:
            loaded = self.loader.loaded
            if self.loader.state != "ready" or loaded is None:
                raise NotReadyError(f"the model is {self.loader.state}; retry shortly")
            return await asyncio.get_running_loop().run_in_executor(self._pool, self._embed, loaded, call)
        except ServeError as e:
            return ErrorEvent(e)

    @staticmethod
    def _embed(loaded: Any, call: EmbedCall) -> Embeddings:
        # Client text never turns into control tokens (parse_special off), as for a completion prompt.
        token_lists = [list(x) if isinstance(x, tuple) else loaded.model.tokenize(x, True, False)
                       for x in call.inputs]
        vecs = loaded.engine.embed(token_lists)
        return Embeddings(vectors=[v.astype("<f4").tobytes() for v in vecs],
                          prompt_tokens=sum(len(t) for t in token_lists))

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.loader.close()


@serve.deployment
class EmbeddingModel:
    def __init__(self, cache: DeploymentHandle, args: dict[str, Any], use_gpu: bool, pooling: Pooling,
                 normalize: bool) -> None:
        self.cache = cache
        self.service = EmbeddingService(AppArgs.model_validate(args), cache_fetch(cache), use_gpu, pooling, normalize)
        self.service.start()

    def check_health(self) -> None:
        problem = self.service.loader.health_problem()
        if problem is not None:
            raise RuntimeError(problem)

    def __del__(self) -> None:
        if getattr(self, "service", None) is not None:
            self.service.close()

    async def info(self) -> ModelInfo:
        return self.service.info()

    async def embed(self, call: EmbedCall) -> Embeddings | ErrorEvent:
        return await self.service.embed(call)
