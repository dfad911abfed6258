"""Prefix affinity: which LlamaModel replica a request goes to when there are several.

Each replica keeps the KV of the conversations it served in its slots, so a chat's next turn is cheap only on the
replica that served the last one. This Ray Serve request router (it runs in the caller, the Ingress) names a
conversation by what every turn of it starts with: the messages up to and including the first user message (for a
raw prompt, its first ``prompt_key_chars`` characters; for token ids, a quarter as many tokens). Rendezvous
hashing of that key over the replicas' ids gives every replica a stable rank for it: the first takes the request,
the others (least loaded first) only when the requests this router has in flight there fill its ``slots`` while
another replica has a free one, or when Serve's figures show it ``imbalance_threshold`` more requests in flight
than the least loaded replica. A request that queues behind full slots waits for a whole generation to end; on a
replica with a free slot it starts at the next engine step, its prefix prefilled again. Without the slot rule a
replica that happened to hold more of a burst's conversations queued requests while the other idled (10/6 splits
of 16 requests over two 8-slot replicas, in bench_scaleout). The slot rule counts this router's own requests,
from ranking to completion: Serve routes a whole burst before it sends the first request, and its queue-length
figure, overwritten by each replica's answer as it comes, both misses requests on their way and keeps counting
finished ones (it showed 6 and 7 in flight on two idle replicas). With several Ingress replicas each counts its
own. Calls that carry no ``GenerateRequest`` (info, tokenize) are spread as Ray's default
does, over two random replicas.

Why not Ray's ``PrefixCacheAffinityRouter``: its public path (``ray.serve.llm``) imports Ray's LLM stack, which
needs the ``ray[llm]`` extra (vLLM, pyarrow); it reads our requests wrongly (``messages`` as a tuple of models
becomes empty text, a division by zero; a raw ``prompt`` is never read because the ``messages`` attribute, None,
is found first, so it raises, as it does for ``tokenize``/``detokenize`` calls); it keeps a prefix tree in a
detached actor with two blocking ``ray.get`` calls per request on the caller's event loop, which relays every
stream; and conversations that share a long system prompt all match the replica that saw it first, so with its
default threshold they never spread. Rendezvous hashing needs no shared state, costs one hash per replica per
request, spreads independent conversations evenly, and moves only the conversations of a replica that leaves.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from typing import Any

from ray.serve.request_router import MultiplexMixin, PendingRequest, ReplicaID, RequestRouter, RunningReplica

from serve_app.protocol import GenerateRequest

ROUTER_CLASS = f"{__name__}.PrefixAffinityRouter"
_SEP_FIELD, _SEP_MSG = "\x1f", "\x1e"  # separators that cannot make two different message lists hash alike
# Serve sends a routed request within milliseconds; a mark this old is a choice Serve did not follow (the replica
# was at max_ongoing_requests and the next rank took it) and no longer counts.
UNSENT_TTL_S = 1.0


def conversation_key(req: GenerateRequest, prompt_key_chars: int) -> bytes:
    """What every turn of ``req``'s conversation starts with (see the module docstring)."""
    if req.messages is not None:
        head: list[str] = []
        for m in req.messages:
            head.append(f"{m.role}{_SEP_FIELD}{m.content}")
            if m.role == "user":
                break
        return ("m" + _SEP_MSG.join(head)).encode("utf-8", "surrogatepass")
    if isinstance(req.prompt, str):
        return ("p" + req.prompt[:prompt_key_chars]).encode("utf-8", "surrogatepass")
    tokens = req.prompt or ()
    return b"t" + b",".join(str(t).encode() for t in tokens[: max(1, prompt_key_chars // 4)])


def request_key(args: Iterable[Any], prompt_key_chars: int) -> bytes | None:
    """The conversation key of the first ``GenerateRequest`` among a call's arguments; None when there is none."""
    for arg in args:
        if isinstance(arg, GenerateRequest):
            return conversation_key(arg, prompt_key_chars)
    return None


def rendezvous_order(key: bytes, replica_ids: Sequence[str]) -> list[int]:
    """Indexes of ``replica_ids`` from the key's first choice to its last (highest random weight first)."""
    def weight(i: int) -> bytes:
        return hashlib.blake2b(key, digest_size=8, key=replica_ids[i].encode()[:64]).digest()
    return sorted(range(len(replica_ids)), key=weight, reverse=True)


def overloaded(loads: Sequence[int | None], threshold: int) -> bool:
    """True when the first replica's known load exceeds the least known load of the others by more than
    ``threshold``. An unknown load (no fresh figure) never counts as overloaded."""
    first, others = loads[0], [x for x in loads[1:] if x is not None]
    return first is not None and bool(others) and first - min(others) > threshold


def full_here(mine: Sequence[int], slots: int | None) -> bool:
    """True when this router's requests in flight at the first replica fill its ``slots`` while another replica
    has a free one (by the same count)."""
    return slots is not None and len(mine) > 1 and mine[0] >= slots > min(mine[1:])


class PrefixAffinityRouter(MultiplexMixin, RequestRouter):
    """Ray Serve request router: conversation affinity by rendezvous hashing; a full replica or one past the
    imbalance threshold yields to the least loaded other. A call that names a model of the on-demand pool first
    goes among the replicas holding it (Ray's multiplex rule: those, then the ones holding fewest models, then
    all), affinity deciding within them."""

    def initialize_state(self, imbalance_threshold: int = 8, prompt_key_chars: int = 256, slots: int | None = None,
                         **_: Any) -> None:
        self.imbalance_threshold = imbalance_threshold
        self.prompt_key_chars = prompt_key_chars
        self.slots = slots  # engine.n_parallel of every replica; None: only the threshold applies
        self._unsent: dict[str, deque[float]] = {}  # replica id -> when requests were ranked to it, not yet sent
        self._sent: Counter[str] = Counter()  # replica id -> requests this router sent there, not completed

    def _mine(self, r: RunningReplica, now: float) -> int:
        """Requests this router has in flight at ``r``: sent and not completed, or ranked there and not yet sent."""
        rid = r.replica_id.unique_id
        marks = self._unsent.get(rid)
        while marks and now - marks[0] > UNSENT_TTL_S:
            marks.popleft()
        return self._sent[rid] + len(marks or ())

    def _ranked_to(self, r: RunningReplica, now: float) -> None:
        self._unsent.setdefault(r.replica_id.unique_id, deque()).append(now)

    def on_send_request(self, replica_id: ReplicaID) -> None:
        """Serve sent a request to the replica: from ranked to sent."""
        super().on_send_request(replica_id)
        marks = self._unsent.get(replica_id.unique_id)
        if marks:
            marks.popleft()
        self._sent[replica_id.unique_id] += 1

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        super().on_request_completed(replica_id, internal_request_id)
        rid = replica_id.unique_id
        if self._sent[rid] > 0:  # requests sent by a path that does not report sending are not counted
            self._sent[rid] -= 1

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if pending_request is not None:
            # Every rank tried and full: wait before the next round, as Ray's default router does.
            pending_request.routing_context.should_backoff = True
        if pending_request is not None and pending_request.metadata.multiplexed_model_id:
            holding = self.apply_multiplex_routing(pending_request=pending_request)
            candidate_replicas = [r for r in candidate_replicas if r.replica_id in holding] or candidate_replicas
        if len(candidate_replicas) < 2:
            return [list(candidate_replicas)]
        key = None
        if pending_request is not None:
            key = request_key([*pending_request.args, *pending_request.kwargs.values()], self.prompt_key_chars)
        if key is None:
            return [random.sample(candidate_replicas, 2)]
        order = rendezvous_order(key, [r.replica_id.unique_id for r in candidate_replicas])
        ranked = [candidate_replicas[i] for i in order]
        now = time.monotonic()
        mine = [self._mine(r, now) for r in ranked]
        loads = [self.replica_queue_len_cache.get(r.replica_id) for r in ranked]
        if full_here(mine, self.slots) or overloaded(loads, self.imbalance_threshold):
            others = sorted(range(1, len(ranked)), key=lambda i: (mine[i], loads[i] or 0))
            self._ranked_to(ranked[others[0]], now)  # Serve takes the first rank unless it is at max_ongoing
            return [*([ranked[i]] for i in others), ranked[:1]]
        self._ranked_to(ranked[0], now)
        return [ranked[:1], ranked[1:]]


def router_config(prefix_affinity: bool, imbalance_threshold: int, prompt_key_chars: int,
                  slots: int | None = None) -> dict[str, Any] | None:
    """LlamaModel's ``request_router_config`` deployment option; None keeps Ray's default router."""
    if not prefix_affinity:
        return None
    kwargs: dict[str, Any] = {"imbalance_threshold": imbalance_threshold, "prompt_key_chars": prompt_key_chars}
    if slots is not None:
        kwargs["slots"] = slots
    return {"request_router_class": ROUTER_CLASS, "request_router_kwargs": kwargs}
