"""The link's state machines, sans-IO (times fed in), and the Channel driver on a fake transport."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

from cake.errors import WorkerLost
from cake.wire.channel import Channel
from cake.wire.liveness import LinkClock, LinkPhase, LivenessSettings, Lost, Phase, SendPing
from cake.wire.protocol import Forward, Message, Ping, Pong, Result
from cake.wire.transport import LinkError

SETTINGS = LivenessSettings(
    heartbeat_interval=1.0, heartbeat_timeout=3.0, deadline_floor=5.0, deadline_factor=10.0
)


# --- LinkClock: heartbeat ---------------------------------------------------------------------


def test_quiet_link_is_pinged_after_the_interval_and_lost_without_an_answer() -> None:
    clock = LinkClock(SETTINGS, now=100.0)
    assert clock.tick(100.5) == []
    assert clock.next_tick() == 101.0
    assert clock.tick(101.0) == [SendPing(1)]
    assert clock.tick(102.0) == []  # one ping at a time
    assert clock.next_tick() == 104.0  # the ping's answer is due by then
    (lost,) = clock.tick(104.0)
    assert isinstance(lost, Lost) and "heartbeat" in lost.reason


def test_any_frame_answers_the_ping_and_restarts_the_interval() -> None:
    clock = LinkClock(SETTINGS, now=0.0)
    assert clock.tick(1.0) == [SendPing(1)]
    clock.heard(2.5)  # a Pong, or any other frame
    assert clock.tick(3.4) == []
    assert clock.next_tick() == 3.5
    assert clock.tick(3.5) == [SendPing(2)]


# --- LinkClock: deadlines ---------------------------------------------------------------------


def test_no_deadline_before_the_first_reply_only_the_heartbeat() -> None:
    clock = LinkClock(SETTINGS, now=0.0)
    clock.request_sent(1, positions=4000, now=0.0)  # a long first prefill
    for t in (0.5, 50.0, 500.0):
        clock.heard(t)  # pongs keep coming: the worker is alive, just busy
        assert not any(isinstance(a, Lost) for a in clock.tick(t))


def test_deadline_follows_what_the_stage_normally_takes() -> None:
    clock = LinkClock(SETTINGS, now=0.0)
    clock.request_sent(1, positions=1, now=0.0)
    clock.reply_received(1, now=0.2)  # a decode step takes 0.2 s here
    assert clock.expected_s(1) == pytest.approx(0.2)
    clock.request_sent(2, positions=1, now=10.0)
    deadline = 10.0 + SETTINGS.deadline_floor + SETTINGS.deadline_factor * 0.2  # 17.0
    assert clock.next_tick() <= deadline
    clock.heard(16.9)
    assert clock.tick(16.9) == []
    clock.heard(17.0)  # pongs still come, but the request is far overdue: compute is hung
    (lost,) = clock.tick(17.0)
    assert isinstance(lost, Lost) and "request 2" in lost.reason


def test_long_requests_teach_a_per_position_rate_and_queued_work_counts() -> None:
    clock = LinkClock(SETTINGS, now=0.0)
    clock.request_sent(1, positions=1, now=0.0)
    clock.reply_received(1, now=0.1)
    clock.request_sent(2, positions=500, now=1.0)
    clock.reply_received(2, now=6.0)  # 10 ms per position
    assert clock.expected_s(1) == pytest.approx(0.1)  # a step: its own time, not the rate's
    assert clock.expected_s(1000) == pytest.approx(10.0)
    clock.request_sent(3, positions=1000, now=10.0)
    clock.request_sent(4, positions=1, now=10.0)  # waits behind request 3 on the worker
    clock.heard(10.0 + 5.0 + 10.0 * 10.0)  # request 3's deadline (115) is not 4's
    actions = clock.tick(115.0)
    assert [type(a) for a in actions] == [Lost] and "request 3" in actions[0].reason
    clock.request_dropped(3)
    assert clock.tick(115.0) == []  # 4's deadline is 10 + 5 + 10 * 10.01


def test_queued_work_follows_sends_replies_and_drops() -> None:
    """The positions in flight that a new request waits behind, kept as a running total, are
    what summing the requests still in flight gives, whatever came back or was dropped."""
    clock = LinkClock(SETTINGS, now=0.0)
    clock.request_sent(0, positions=100, now=0.0)
    clock.reply_received(0, now=1.0)  # 10 ms per position, no step time yet
    rng = random.Random(0)
    in_flight: dict[int, int] = {}
    for request_id in range(1, 300):
        now = 2.0 + request_id
        if in_flight and rng.random() < 0.4:
            done = rng.choice(list(in_flight))
            del in_flight[done]
            if rng.random() < 0.5:
                clock.request_dropped(done)
            else:
                clock.reply_received(done, now=now)
        positions = rng.choice([1, 1, 1, 64, 500])
        deadline = clock.request_sent(request_id, positions, now=now)
        assert deadline is not None
        expected = clock.expected_s(positions + sum(in_flight.values()))
        assert deadline == pytest.approx(now + 5.0 + 10.0 * expected)
        in_flight[request_id] = positions


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="heartbeat_timeout"):
        LivenessSettings(heartbeat_timeout=0)
    assert LivenessSettings.for_heartbeat_timeout(2.0).heartbeat_interval == 0.5


# --- LinkPhase: connected -> lost -> replaying -> connected ------------------------------------


def test_phases_of_a_worker_lost_and_replayed() -> None:
    phase = LinkPhase()
    assert phase.phase is Phase.NEW
    assert phase.connected() == 1 and phase.phase is Phase.CONNECTED
    phase.session_current("a")
    phase.session_current("b")
    assert not phase.needs_replay("a")
    phase.lost(last_heard=7.0, reason="gone")
    assert (phase.phase, phase.lost_since) == (Phase.LOST, 7.0)
    phase.lost(last_heard=9.0, reason="again")  # already lost: the first loss counts
    assert phase.lost_since == 7.0
    assert phase.connected() == 2 and phase.phase is Phase.REPLAYING
    assert phase.needs_replay("a") and phase.needs_replay("b")
    assert not phase.needs_replay("new")  # a session unknown to the worker has nothing to replay
    phase.session_current("a")
    assert phase.phase is Phase.REPLAYING  # b is still stale
    phase.session_closed("b")
    assert phase.phase is Phase.CONNECTED
    assert phase.lost_since is None


def test_reconnecting_with_no_open_session_is_connected_at_once() -> None:
    phase = LinkPhase()
    phase.connected()
    phase.lost(0.0, "x")
    phase.connected()
    assert phase.phase is Phase.CONNECTED


# --- Channel on a fake transport -------------------------------------------------------------


class FakeLink:
    """Link's interface over two queues; `peer_*` is the worker's end."""

    def __init__(self, name: str = "fake") -> None:
        self.peer = name
        self.to_peer: asyncio.Queue[Message] = asyncio.Queue()
        self.from_peer: asyncio.Queue[Message | Exception] = asyncio.Queue()
        self.closed = False

    async def send(self, message: Message) -> None:
        if self.closed:
            raise LinkError(f"{self.peer}: closed")
        await self.to_peer.put(message)

    async def recv(self, timeout: float | None = None) -> Message:
        item = await self.from_peer.get()
        if isinstance(item, Exception):
            raise item
        return item

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.from_peer.put_nowait(LinkError(f"{self.peer}: connection closed"))

    def abort(self) -> None:
        self.close()

    async def wait_closed(self) -> None:
        self.close()

    def reply(self, message: Message) -> None:
        self.from_peer.put_nowait(message)


def forward(request_id: int) -> Forward:
    return Forward(id=request_id, session="s", start_pos=0, blocks=(0,), hidden=torch.ones(1, 1, 2))


FAST = LivenessSettings(heartbeat_interval=0.05, heartbeat_timeout=0.2)


def test_channel_routes_replies_by_id_out_of_order() -> None:
    async def run() -> None:
        link = FakeLink()
        channel = Channel(link, "worker w", FAST)  # type: ignore[arg-type]
        first = asyncio.create_task(channel.request(forward, positions=1))
        second = asyncio.create_task(channel.request(forward, positions=1))
        sent = [await link.to_peer.get(), await link.to_peer.get()]
        link.reply(Result(id=sent[1].id, hidden=torch.full((1, 1, 2), 2.0)))
        link.reply(Result(id=sent[0].id, hidden=torch.full((1, 1, 2), 1.0)))
        assert (await first).hidden[0, 0, 0] == 1.0
        assert (await second).hidden[0, 0, 0] == 2.0
        assert channel.in_flight == 0
        await channel.close()

    asyncio.run(run())


def test_a_silent_peer_is_pinged_then_lost_and_its_requests_fail() -> None:
    async def run() -> None:
        link, lost = FakeLink(), []
        channel = Channel(link, "worker w", FAST, on_lost=lost.append)  # type: ignore[arg-type]
        pending = asyncio.create_task(channel.request(forward, positions=1))
        assert isinstance(await link.to_peer.get(), Forward)
        assert isinstance(await link.to_peer.get(), Ping)  # nothing heard for the interval
        with pytest.raises(WorkerLost, match="worker w: no answer to a heartbeat"):
            await pending
        assert lost == [channel] and not channel.alive and link.closed
        with pytest.raises(WorkerLost):
            await channel.request(forward, positions=1)

    asyncio.run(run())


def test_pongs_keep_a_busy_peer_alive() -> None:
    async def run() -> None:
        link = FakeLink()
        channel = Channel(link, "worker w", FAST)  # type: ignore[arg-type]
        pending = asyncio.create_task(channel.request(forward, positions=1))
        request = await link.to_peer.get()
        for _ in range(6):  # 6 pings answered: well past the heartbeat timeout in all
            ping = await link.to_peer.get()
            assert isinstance(ping, Ping)
            link.reply(Pong(id=ping.id))
        link.reply(Result(id=request.id, hidden=torch.ones(1, 1, 2)))
        assert isinstance(await pending, Result)
        assert channel.alive
        await channel.close()

    asyncio.run(run())


def test_an_old_channel_never_fails_a_new_channels_requests() -> None:
    """Each connection has its own pending map: the old reader's failure stays its own."""

    async def run() -> None:
        old_link, new_link = FakeLink("old"), FakeLink("new")
        old = Channel(old_link, "worker w", FAST)  # type: ignore[arg-type]
        new = Channel(new_link, "worker w", FAST)  # type: ignore[arg-type]
        waiting_old = asyncio.create_task(old.request(forward, positions=1))
        waiting_new = asyncio.create_task(new.request(forward, positions=1))
        await old_link.to_peer.get()
        request = await new_link.to_peer.get()
        old_link.from_peer.put_nowait(LinkError("old: connection lost"))  # the old reader fails
        with pytest.raises(WorkerLost, match="old: connection lost"):
            await waiting_old
        # Same request id on the new link: answered there, untouched by the old one's end.
        new_link.reply(Result(id=request.id, hidden=torch.ones(1, 1, 2)))
        assert isinstance(await waiting_new, Result)
        await new.close()

    asyncio.run(run())


def test_a_cancelled_request_leaves_no_trace() -> None:
    async def run() -> None:
        link = FakeLink()
        channel = Channel(link, "worker w", FAST)  # type: ignore[arg-type]
        task = asyncio.create_task(channel.request(forward, positions=1))
        await link.to_peer.get()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert channel.in_flight == 0 and channel.alive
        await channel.close()

    asyncio.run(run())
