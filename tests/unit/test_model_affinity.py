"""Invariant: the replica-affinity key is the same for every turn of a conversation and differs between
conversations; rendezvous order is stable and moves only a leaving replica's keys; a replica loses affinity only
when it has no free slot while another has one, or is more than the threshold busier than the least loaded one;
the builder turns affinity on by default with ``engine.n_parallel`` as the slot count and the threshold, and off
leaves Ray's default router; a call naming a pooled model goes only among the replicas holding it (held nowhere:
the one holding fewest models), affinity choosing among those."""

from __future__ import annotations

from collections import Counter
from typing import Any

from serve_app.builder import llama_model_options
from serve_app.config import AppArgs
from serve_app.model.affinity import (
    ROUTER_CLASS,
    conversation_key,
    full_here,
    overloaded,
    rendezvous_order,
    request_key,
)
from serve_app.protocol import GenerateRequest, Message, TokenizeCall

SYSTEM = Message(role="system", content="You are terse. " * 50)


def chat(*turns: str) -> GenerateRequest:
    msgs = [SYSTEM]
    for i, text in enumerate(turns):
        msgs.append(Message(role="user" if i % 2 == 0 else "assistant", content=text))
    return GenerateRequest(label="r", messages=tuple(msgs))


def test_every_turn_of_a_conversation_has_one_key_and_conversations_differ() -> None:
    first = conversation_key(chat("hello"), 256)
    assert conversation_key(chat("hello", "hi!", "how are you?"), 256) == first
    assert conversation_key(chat("hello", "hi!", "and now?", "fine", "bye"), 256) == first
    assert conversation_key(chat("goodbye"), 256) != first
    # The role is part of the key: the same text as another role is another conversation.
    other = GenerateRequest(label="r", messages=(SYSTEM, Message(role="assistant", content="hello")))
    assert conversation_key(other, 256) != first


def test_raw_prompts_key_on_their_first_characters() -> None:
    a = GenerateRequest(label="r", prompt="x" * 300 + "turn one")
    b = GenerateRequest(label="r", prompt="x" * 300 + "turn one, answer, turn two")
    assert conversation_key(a, 256) == conversation_key(b, 256)
    assert conversation_key(a, 400) != conversation_key(b, 400)
    toks = GenerateRequest(label="r", prompt=tuple(range(100)))
    assert conversation_key(toks, 256) == conversation_key(GenerateRequest(label="r", prompt=tuple(range(64))), 256)


def test_calls_without_a_generate_request_have_no_key() -> None:
    assert request_key([TokenizeCall(text="hi")], 256) is None
    assert request_key([], 256) is None
    assert request_key(["x", chat("hi")], 256) == conversation_key(chat("hi"), 256)


def test_rendezvous_order_is_stable_spreads_and_moves_only_a_leaving_replicas_keys() -> None:
    ids = ["a1", "b2", "c3"]
    keys = [conversation_key(chat(f"user {i}"), 256) for i in range(300)]
    firsts = [ids[rendezvous_order(k, ids)[0]] for k in keys]
    assert firsts == [ids[rendezvous_order(k, list(ids))[0]] for k in keys]
    assert min(Counter(firsts).values()) > 60  # about 100 each
    survivors = ["a1", "c3"]
    for k, first in zip(keys, firsts, strict=True):
        now = survivors[rendezvous_order(k, survivors)[0]]
        if first != "b2":
            assert now == first


def test_affinity_yields_only_past_the_threshold() -> None:
    assert not overloaded([5, 1], 4)
    assert overloaded([6, 1], 4)
    assert overloaded([9, 3, 1], 4)
    assert not overloaded([None, 0], 0)   # unknown load: keep affinity
    assert not overloaded([9, None], 0)   # nothing known to compare with
    assert not overloaded([3], 0)


def test_a_full_replica_yields_to_one_with_a_free_slot() -> None:
    # Two 8-slot replicas: the 9th request of a conversation-heavy replica would queue; the other has room.
    assert full_here([8, 6], slots=8)
    assert full_here([8, 7, 9], slots=8)
    assert not full_here([7, 0], slots=8)  # a free slot at home: stay, whatever the others do
    assert not full_here([9, 8], slots=8)  # nobody has a free slot: the queue at home is as good
    assert not full_here([8], slots=8)
    assert not full_here([8, 6], slots=None)  # no slot count given: the threshold alone


def test_builder_sets_the_router_by_default_and_off_keeps_rays() -> None:
    base = {"model": {"repo_id": "a/b", "filename": "m.gguf"}, "engine": {"n_parallel": 6}}
    opts = llama_model_options(AppArgs.model_validate(base), use_gpu=False)
    cfg = opts["request_router_config"]
    assert cfg["request_router_class"] == ROUTER_CLASS
    assert cfg["request_router_kwargs"] == {"imbalance_threshold": 6, "prompt_key_chars": 256, "slots": 6}
    tuned = AppArgs.model_validate({**base, "routing": {"imbalance_threshold": 2, "prompt_key_chars": 64}})
    kwargs = llama_model_options(tuned, use_gpu=False)["request_router_config"]["request_router_kwargs"]
    assert kwargs == {"imbalance_threshold": 2, "prompt_key_chars": 64, "slots": 6}
    off = AppArgs.model_validate({**base, "routing": {"prefix_affinity": False}})
    assert "request_router_config" not in llama_model_options(off, use_gpu=False)


def test_ray_accepts_the_router_config() -> None:
    from ray.serve.config import RequestRouterConfig

    from serve_app.model.affinity import PrefixAffinityRouter, router_config

    cfg = RequestRouterConfig(**router_config(True, 4, 256))  # imports the class by its path, as Serve does
    assert cfg.get_request_router_class() is not None
    assert cfg.request_router_class == ROUTER_CLASS and PrefixAffinityRouter.__name__ in ROUTER_CLASS


class FakeReplica:
    """What ``choose_replicas`` reads of a replica: its id (and Serve's queue-length cache, keyed by it)."""

    def __init__(self, unique_id: str, models: frozenset[str] = frozenset()) -> None:
        from ray.serve._private.common import DeploymentID
        from ray.serve.request_router import ReplicaID

        self.replica_id = ReplicaID(unique_id, DeploymentID(name="LlamaModel", app_name="llm"))
        self.max_ongoing_requests = 100
        self.multiplexed_model_ids = models  # the pooled models it holds (max_models_per_replica)


def pending(req: Any, ctx: Any = None, model: str = "") -> Any:
    """What ``choose_replicas`` reads of a pending request: its arguments, routing context and model id."""
    from types import SimpleNamespace

    return SimpleNamespace(args=[req] if req is not None else [], kwargs={},
                           routing_context=ctx or SimpleNamespace(should_backoff=False),
                           metadata=SimpleNamespace(multiplexed_model_id=model))


def test_router_ranks_the_conversations_replica_first_and_yields_past_the_threshold() -> None:
    import asyncio

    from ray.serve._private.common import DeploymentHandleSource, DeploymentID

    from serve_app.model.affinity import PrefixAffinityRouter

    async def scenario() -> None:
        router = PrefixAffinityRouter(DeploymentID(name="LlamaModel", app_name="llm"), DeploymentHandleSource.UNKNOWN)
        router.initialize_state(imbalance_threshold=2, prompt_key_chars=256, slots=8)
        reps = [FakeReplica(x) for x in ("aa", "bb", "cc")]
        req = pending(chat("hello"))
        ranks = await router.choose_replicas(reps, req)
        assert req.routing_context.should_backoff  # all full: back off, as Ray's default router does
        home = ranks[0][0]
        assert len(ranks[0]) == 1 and set(ranks[1]) == set(reps) - {home}
        later = pending(chat("hello", "hi", "more"), req.routing_context)
        assert (await router.choose_replicas(reps, later))[0] == [home]
        for _ in range(2):
            router.on_send_request(home.replica_id)  # Serve sent both: they are in its figures, no longer unsent
        for r in reps:
            router.replica_queue_len_cache.update(r.replica_id, 4 if r is home else 2)
        assert (await router.choose_replicas(reps, req))[0] == [home]  # 2 more in flight: within the threshold
        router.on_send_request(home.replica_id)
        router.replica_queue_len_cache.update(home.replica_id, 5)
        ranks = await router.choose_replicas(reps, req)  # 3 more: the others first (one rank each), home last
        assert {r for rank in ranks[:-1] for r in rank} == set(reps) - {home} and ranks[-1] == [home]
        router.on_send_request(ranks[0][0].replica_id)
        info = pending(None, req.routing_context)
        assert len((await router.choose_replicas(reps, info))[0]) == 2  # no conversation: two at random
    asyncio.run(scenario())


def test_a_pooled_models_requests_go_to_the_replica_holding_it_whatever_the_conversation() -> None:
    import asyncio
    from types import SimpleNamespace

    from ray.serve._private.common import DeploymentHandleSource, DeploymentID

    from serve_app.model.affinity import PrefixAffinityRouter

    def ctx() -> SimpleNamespace:
        return SimpleNamespace(should_backoff=False, multiplexed_start_matching_time=None,
                               tried_first_multiplexed_models=False, tried_fewest_multiplexed_models=False)

    async def scenario() -> None:
        router = PrefixAffinityRouter(DeploymentID(name="LlamaModel", app_name="llm"), DeploymentHandleSource.UNKNOWN)
        router.initialize_state(imbalance_threshold=2, prompt_key_chars=256)
        aa, bb, cc = (FakeReplica("aa", frozenset({"alpha"})), FakeReplica("bb", frozenset({"beta", "alpha"})),
                      FakeReplica("cc"))
        router.update_replicas([aa, bb, cc])
        for i in range(20):
            ranks = await router.choose_replicas([aa, bb, cc], pending(chat(f"user {i}"), ctx(), "beta"))
            assert ranks[0] == [bb]
        # Held by two: affinity decides between those two only.
        firsts = set()
        for i in range(20):
            ranks = await router.choose_replicas([aa, bb, cc], pending(chat(f"user {i}"), ctx(), "alpha"))
            assert cc not in [r for rank in ranks for r in rank]
            firsts.add(ranks[0][0].replica_id.unique_id)
        assert firsts == {"aa", "bb"}
        # Held nowhere: the replica holding the fewest models loads it.
        assert (await router.choose_replicas([aa, bb, cc], pending(chat("x"), ctx(), "gamma")))[0] == [cc]
    asyncio.run(scenario())


def test_a_burst_routed_before_any_send_fills_home_then_spills() -> None:
    """Serve routes every request of a burst before it sends the first (its queue-length figures count a request
    once sent), so the router counts what it ranked and Serve has not sent: 12 requests of one conversation on two
    idle 8-slot replicas give home 8 and the other 4, not 12 and 0."""
    import asyncio

    from ray.serve._private.common import DeploymentHandleSource, DeploymentID

    from serve_app.model.affinity import PrefixAffinityRouter

    async def scenario() -> None:
        router = PrefixAffinityRouter(DeploymentID(name="LlamaModel", app_name="llm"), DeploymentHandleSource.UNKNOWN,
                                      use_replica_queue_len_cache=True)  # as Serve builds it
        router.initialize_state(imbalance_threshold=8, prompt_key_chars=256, slots=8)
        reps = [FakeReplica(x) for x in ("aa", "bb")]
        for r in reps:
            router.replica_queue_len_cache.update(r.replica_id, 0)
        firsts = []
        for _ in range(12):
            req = pending(chat("one conversation"))
            firsts.append((await router.choose_replicas(reps, req))[0][0].replica_id.unique_id)
        assert sorted(Counter(firsts).values()) == [4, 8], firsts
        for rid in firsts:  # Serve sends them: ranked becomes sent, nothing is counted twice
            router.on_send_request(next(r.replica_id for r in reps if r.replica_id.unique_id == rid))
        assert all(not marks for marks in router._unsent.values())
        assert sorted(router._sent.values()) == [4, 8]
        home = next(r for r in reps if firsts.count(r.replica_id.unique_id) == 8)
        # Serve's figure, overwritten by a replica's answer, may say anything; the router's own count stays 8.
        router.on_new_queue_len_info(home.replica_id, 1)
        spilled = await router.choose_replicas(reps, req)
        assert spilled[0] != [home] and spilled[-1] == [home]
        router._unsent.clear()
        for _ in range(8):
            router.on_request_completed(home.replica_id, "done")
        router.on_new_queue_len_info(home.replica_id, 7)  # a stale figure of an idle replica: below the threshold
        assert (await router.choose_replicas(reps, req))[0] == [home]  # room at home again
    asyncio.run(scenario())
