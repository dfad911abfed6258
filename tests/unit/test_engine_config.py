"""The waiting-queue bound is ``engine.max_queued_requests``; configs written with its old name ``max_queue`` still
load with the same meaning, and unknown engine keys are still refused."""

from __future__ import annotations

import warnings

import pytest
from pydantic import ValidationError

from serve_app.config import AppArgs, EngineConfig


def test_max_queued_requests_is_the_field() -> None:
    cfg = EngineConfig(max_queued_requests=7)
    assert cfg.max_queued_requests == 7
    assert cfg.model_dump()["max_queued_requests"] == 7 and "max_queue" not in cfg.model_dump()
    assert EngineConfig().max_queued_requests == 256


def test_max_queue_is_a_deprecated_alias_that_still_loads() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        args = AppArgs.model_validate({"model": {"filename": "/m.gguf"}, "engine": {"max_queue": 3}})
    assert args.engine.max_queued_requests == 3
    assert args.engine.max_queue == 3
    assert any(issubclass(w.category, DeprecationWarning) for w in caught)
    # What it dumps loads again under the new name.
    assert AppArgs.model_validate(args.model_dump()).engine.max_queued_requests == 3


def test_bad_values_and_unknown_keys_are_still_refused() -> None:
    with pytest.raises(ValidationError):
        EngineConfig(max_queued_requests=-1)
    with pytest.raises(ValidationError):
        EngineConfig.model_validate({"max_queue": -1})
    with pytest.raises(ValidationError):
        EngineConfig.model_validate({"max_queue_size": 3})
