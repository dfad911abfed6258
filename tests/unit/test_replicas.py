"""Invariant: the figures of a set of LlamaModel replicas are the whole set's: capacity and load are summed
(so the RunPod worker's concurrency counts every replica's slots), the set is ``ready`` when any replica can
serve, ``loading`` while any is on its way, and ``failed`` only when none is either, with that replica's reason."""

from __future__ import annotations

import pytest

from serve_app.protocol import ModelInfo
from serve_app.replicas import SUMMED, combine
from serve_app.runpod.handler import concurrency_target


def info(state: str, slots: int = 0, busy: int = 0, waiting: int = 0, **kw: object) -> ModelInfo:
    return ModelInfo.model_validate({"state": state, "model": "m", "slots_total": slots, "slots_busy": busy,
                                     "waiting": waiting, **kw})


def test_capacity_and_load_are_summed() -> None:
    both = combine([info("ready", 4, 1, 0, kv_cells_total=100), info("ready", 4, 2, 1, kv_cells_total=100)])
    assert (both.state, both.slots_total, both.slots_busy, both.waiting, both.kv_cells_total) == \
        ("ready", 8, 3, 1, 200)
    assert set(SUMMED) <= set(ModelInfo.model_fields)


def test_concurrency_comes_from_every_replica() -> None:
    both = combine([info("ready", 1), info("ready", 1)])
    assert concurrency_target(both.model_dump(), 0, None) == 2


@pytest.mark.parametrize(("states", "expected"), [
    (["loading", "ready"], "ready"),
    (["failed", "ready"], "ready"),
    (["failed", "loading"], "loading"),
    (["failed", "failed"], "failed"),
])
def test_state_of_the_set(states: list[str], expected: str) -> None:
    out = combine([info(s, reason="r" if s == "failed" else None) for s in states])
    assert out.state == expected
    assert (out.reason == "r") == (expected == "failed")


def test_no_replica_is_not_a_set() -> None:
    with pytest.raises(ValueError):
        combine([])


class _Method:
    def __init__(self, value: ModelInfo) -> None:
        self.value = value

    def remote(self) -> object:
        async def answer() -> ModelInfo:
            return self.value
        return answer()


class _Model:
    """A handle whose ``info`` call reaches one replica."""

    def __init__(self, value: ModelInfo) -> None:
        self.info = _Method(value)


class _Replicas:
    def __init__(self, infos: dict[str, ModelInfo] | None) -> None:
        self._infos = infos

    async def infos(self) -> dict[str, ModelInfo]:
        if self._infos is None:
            raise ConnectionError("no controller")
        return self._infos


def test_the_service_reports_every_replica_and_falls_back_to_one() -> None:
    import asyncio

    from serve_app.ingress.models import ModelTable, Served
    from serve_app.ingress.openai import OpenAIService

    def service_with(replicas: _Replicas) -> OpenAIService:
        model = _Model(info("ready", 1))
        served = Served("m", "chat", model, replicas)  # type: ignore[arg-type]
        return OpenAIService(model, "m", 16, table=ModelTable([served]))

    service = service_with(_Replicas({"a": info("ready", 1, 1), "b": info("loading")}))
    stats = asyncio.run(service.stats())
    assert (stats["state"], stats["slots_total"], stats["slots_busy"]) == ("ready", 1, 1)
    assert [r["replica"] for r in stats["replicas"]] == ["a", "b"] and "detail" not in stats["replicas"][0]
    service = service_with(_Replicas(None))
    assert asyncio.run(service.info()).slots_total == 1  # the one replica a handle call reaches
    assert asyncio.run(service.stats())["replicas"] == []
