"""When is a worker lost? Sans-IO: times and events in, decisions out (no asyncio, no sockets).

Two small state machines, each tested by feeding it events and clock readings:

* :class:`LinkClock`, one per connection: the deadline of every request in flight and the
  heartbeat. A request's deadline is what the stage normally takes for that many positions
  (learnt from its own replies) times a factor, plus a floor; before the first reply there is
  nothing to learn from and only the heartbeat guards it. On a link with nothing heard for
  ``heartbeat_interval`` (idle, or a long request) it asks for a ping; a ping unanswered for
  ``heartbeat_timeout`` means the peer is gone (a frozen process, a powered-off or partitioned
  host) even though the socket looks open. The worker answers pings from its event loop while
  its compute thread works, so a long prefill is not mistaken for a stall.

* :class:`LinkPhase`, one per worker: ``connected -> lost -> replaying -> connected``. Lost
  until a new connection is up; replaying while sessions that were open on the old connection
  rebuild their caches on the new one; connected again once none is left.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

# A decode step's request is "small"; longer ones (prefill, replay chunks) teach the per-position
# rate. The two are kept apart because a step's time is mostly the round trip, not positions.
SMALL_REQUEST = 16  # positions
_SMOOTHING = 0.2  # weight of the newest observation in the running estimates


@dataclass(frozen=True)
class LivenessSettings:
    heartbeat_interval: float = 2.0  # s of silence on a link before we ping
    heartbeat_timeout: float = 10.0  # s an unanswered ping may take before the link is lost
    deadline_floor: float = 30.0  # s added to every request's expected time
    deadline_factor: float = 10.0  # expected time x this, so a busy worker is not a lost one

    def __post_init__(self) -> None:
        for name in ("heartbeat_interval", "heartbeat_timeout", "deadline_floor"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.deadline_factor < 1:
            raise ValueError(f"deadline_factor must be >= 1, got {self.deadline_factor}")

    @classmethod
    def for_heartbeat_timeout(cls, timeout: float) -> LivenessSettings:
        """Settings whose pings come often enough for a `timeout`-second detection."""
        return cls(heartbeat_interval=max(timeout / 4, 0.05), heartbeat_timeout=timeout)


@dataclass(frozen=True)
class SendPing:
    """The driver should send Ping(id) now."""

    id: int


@dataclass(frozen=True)
class Lost:
    """The link is to be treated as lost; `reason` says why, for the log and the error."""

    reason: str


Action = SendPing | Lost


@dataclass
class _InFlight:
    sent_at: float
    positions: int
    deadline: float | None  # None: no estimate yet, the heartbeat alone guards it


@dataclass
class LinkClock:
    """Deadlines and heartbeat of one connection (see the module docstring)."""

    settings: LivenessSettings
    now: float  # the time the connection came up
    last_heard: float = field(init=False)
    step_s: float | None = field(default=None, init=False)  # typical small request
    per_position_s: float | None = field(default=None, init=False)  # typical long request rate
    _in_flight: dict[int, _InFlight] = field(default_factory=dict, init=False)
    # Positions of the requests in flight, kept as they come and go: each send reads it, and a
    # sum over every request in flight would cost O(in flight) per decode step.
    _queued_positions: int = field(default=0, init=False)
    _ping: tuple[int, float] | None = field(default=None, init=False)  # (id, sent at)
    _ping_ids: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.last_heard = self.now

    # -- events ---------------------------------------------------------------------------

    def request_sent(self, request_id: int, positions: int, now: float) -> float | None:
        """Start the clock of a request; returns its deadline (None: the heartbeat's alone)."""
        # Ours waits behind those in flight.
        expected = self.expected_s(positions + self._queued_positions)
        deadline = (
            None
            if expected is None
            else now + self.settings.deadline_floor + self.settings.deadline_factor * expected
        )
        self._forget(request_id)  # an id sent again replaces its first send
        self._in_flight[request_id] = _InFlight(now, positions, deadline)
        self._queued_positions += positions
        return deadline

    def reply_received(self, request_id: int, now: float) -> None:
        """A Result or an error for `request_id` (unknown ids are ignored)."""
        self.heard(now)
        request = self._forget(request_id)
        if request is None:
            return
        took = max(now - request.sent_at, 0.0)
        if request.positions <= SMALL_REQUEST:
            self.step_s = _blend(self.step_s, took)
        else:
            self.per_position_s = _blend(self.per_position_s, took / request.positions)

    def request_dropped(self, request_id: int) -> None:
        """The request will get no reply worth waiting for (its sender gave up)."""
        self._forget(request_id)

    def _forget(self, request_id: int) -> _InFlight | None:
        request = self._in_flight.pop(request_id, None)
        if request is not None:
            self._queued_positions -= request.positions
        return request

    def heard(self, now: float) -> None:
        """Any frame from the peer: it is alive. Answers an outstanding ping too."""
        self.last_heard = max(self.last_heard, now)
        self._ping = None

    # -- decisions ------------------------------------------------------------------------

    def expected_s(self, positions: int) -> float | None:
        """What `positions` positions normally take on this link, or None before any reply."""
        if self.step_s is None and self.per_position_s is None:
            return None
        if self.per_position_s is None:  # only steps seen: a step per position over-estimates
            return (self.step_s or 0.0) * max(positions, 1)
        by_rate = self.per_position_s * positions
        return by_rate if self.step_s is None else max(self.step_s, by_rate)

    def tick(self, now: float) -> list[Action]:
        """What to do at `now`: a Lost ends the link (nothing after it matters)."""
        if self._ping is not None and now - self._ping[1] >= self.settings.heartbeat_timeout:
            silent = now - self.last_heard
            return [Lost(f"no answer to a heartbeat for {silent:.1f}s (the host may be frozen)")]
        for request_id, request in self._in_flight.items():
            if request.deadline is not None and now >= request.deadline:
                return [
                    Lost(
                        f"request {request_id} ({request.positions} positions) took more than "
                        f"{request.deadline - request.sent_at:.1f}s, far beyond the usual"
                    )
                ]
        if self._ping is None and now - self.last_heard >= self.settings.heartbeat_interval:
            self._ping_ids += 1
            self._ping = (self._ping_ids, now)
            return [SendPing(self._ping_ids)]
        return []

    def next_tick(self) -> float:
        """The time of the next decision, if nothing is heard before then."""
        if self._ping is not None:
            wake = self._ping[1] + self.settings.heartbeat_timeout
        else:
            wake = self.last_heard + self.settings.heartbeat_interval
        deadlines = [r.deadline for r in self._in_flight.values() if r.deadline is not None]
        return min([wake, *deadlines])


def _blend(old: float | None, new: float) -> float:
    return new if old is None else (1 - _SMOOTHING) * old + _SMOOTHING * new


class Phase(enum.Enum):
    NEW = "not connected yet"
    CONNECTED = "connected"
    LOST = "lost"
    REPLAYING = "replaying"


class LinkPhase:
    """connected -> lost -> replaying -> connected, for one worker (see module docstring).

    `epoch` counts connections: a session whose caches were built on an older epoch must be
    replayed before it runs on this one. Sessions are any hashable key (stage, session id).
    """

    def __init__(self) -> None:
        self.phase = Phase.NEW
        self.epoch = 0
        self.lost_since: float | None = None  # when the worker was last heard, once lost
        self.reason = ""
        self._open: dict[object, int] = {}  # session -> epoch its caches belong to

    def connected(self) -> int:
        """A new connection is up; returns its epoch."""
        self.epoch += 1
        self.lost_since = None
        self.phase = Phase.REPLAYING if self._open else Phase.CONNECTED
        return self.epoch

    def lost(self, last_heard: float, reason: str) -> None:
        """The connection of the current epoch failed; `last_heard` starts the retry clock."""
        if self.phase is Phase.LOST:
            return
        self.phase, self.lost_since, self.reason = Phase.LOST, last_heard, reason

    def needs_replay(self, session: object) -> bool:
        epoch = self._open.get(session)
        return epoch is not None and epoch != self.epoch

    def session_current(self, session: object) -> None:
        """`session`'s caches exist on the current connection (new, or just replayed)."""
        self._open[session] = self.epoch
        self._settle()

    def session_closed(self, session: object) -> None:
        self._open.pop(session, None)
        self._settle()

    def _settle(self) -> None:
        if self.phase is Phase.REPLAYING and not any(
            epoch != self.epoch for epoch in self._open.values()
        ):
            self.phase = Phase.CONNECTED
