"""The scale-out benchmark's offered load counts every completion token: with closed-loop users (each sending
its next request when its last one returns) and with waves, every request is sent once and its tokens are added,
however the users' requests interleave. (A ``total += await send()`` counter read ``total`` before the await and
so kept only about one user's tokens in N: 16 users measured ~50 tok/s where the server gave ~800.)"""

from __future__ import annotations

import asyncio
import random

import pytest

from bench.bench_scaleout import offered_load


@pytest.mark.parametrize("closed_loop", [True, False])
@pytest.mark.parametrize("concurrency", [1, 5, 16])
def test_every_request_is_sent_once_and_counted(closed_loop: bool, concurrency: int) -> None:
    rng = random.Random(concurrency)
    sent: list[int] = []
    in_flight = peak = 0

    async def send(i: int) -> int:
        nonlocal in_flight, peak
        sent.append(i)
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(rng.random() / 1000)  # requests return out of order
        in_flight -= 1
        return i + 1

    total = asyncio.run(offered_load(send, concurrency, 37, closed_loop))
    assert sorted(sent) == list(range(37))
    assert total == sum(range(1, 38))
    assert peak == min(concurrency, 37)
