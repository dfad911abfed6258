"""The served models, by name: which handle answers a request's ``model``, and what kind of model it is.

The first entry is the default (a request without ``model``). Unknown names are a 404 that lists what is served;
``base:adapter`` names are refused with a 400 that says why (LoRA adapters are not applied per request: see the
README); a route asking a model for what it does not do (chat from an embedding model, embeddings from a chat
model) is a 400 naming the models that can.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from serve_app.errors import InvalidRequestError, ModelNotFoundError
from serve_app.replicas import Replicas

Kind = Literal["chat", "embedding"]
_ROUTE_OF = {"chat": "/v1/chat/completions and /v1/completions", "embedding": "/v1/embeddings"}


@dataclass(frozen=True)
class Served:
    name: str
    kind: Kind
    handle: Any
    replicas: Replicas | None = None  # every replica of its deployment (None: only the one a call reaches)
    group: str = ""  # what /stats and readiness report it under: its name, or its pool's deployment


class ModelTable:
    def __init__(self, served: list[Served]) -> None:
        if not served:
            raise ValueError("at least one model must be served")
        self.served = served
        self.by_name = {s.name: s for s in served}
        self.default = served[0]

    def groups(self) -> list[tuple[str, Served]]:
        """One model per deployment, with the name its state is reported under: models of an on-demand pool
        share their replicas, which report once for all of them."""
        out: dict[str, Served] = {}
        for s in self.served:
            out.setdefault(s.group or s.name, s)
        return list(out.items())


    def names(self) -> list[str]:
        return [s.name for s in self.served]

    def pick(self, name: str | None, kind: Kind) -> Served:
        """The model a request names (the default when it names none), checked to do ``kind``."""
        if not name:
            found = self.default if self.default.kind == kind else next(
                (s for s in self.served if s.kind == kind), self.default)
        else:
            found = self.by_name.get(name)  # type: ignore[assignment]
            if found is None:
                raise self._unknown(name)
        if found.kind != kind:
            able = [s.name for s in self.served if s.kind == kind]
            raise InvalidRequestError(
                f"model '{found.name}' is {'an embedding' if found.kind == 'embedding' else 'a chat'} model and "
                f"does not serve {_ROUTE_OF[kind]}; "
                + (f"models that do: {', '.join(able)}" if able else "no model here does"), param="model")
        return found

    def _unknown(self, name: str) -> Exception:
        base, sep, adapter = name.partition(":")
        if sep and base in self.by_name:
            return InvalidRequestError(
                f"'{name}': LoRA adapters by request are not supported (llama.cpp applies an adapter to a whole "
                f"context, so one batch cannot mix adapters); served models: {', '.join(self.names())}",
                param="model")
        return ModelNotFoundError(f"model '{name}' is not served here; available: {', '.join(self.names())}",
                                  param="model")
