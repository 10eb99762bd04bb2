"""Per-key limits: requests per minute, concurrent requests, audio hours per UTC day.

Pure logic with an injected clock. One ``LimitBook`` serves every ingress replica (it lives in a
single Ray Serve deployment), so a limit holds whichever replica takes a request. The audio
charged per key and day can also go to a ``UsageLedger`` (the database): a restarted book reads
it back, so a restart does not reset daily quotas. The rolling minute and the concurrency slots
stay in memory: after a restart they start empty, which lets a key briefly exceed them by what
was in flight — never the daily audio quota, which is what costs.
"""

from __future__ import annotations

import math
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from pipeline.core.errors import HarkError, RateLimited
from pipeline.core.keys import key_id
from pipeline.core.settings import KeyLimits

WINDOW_S = 60.0
DAY_S = 86_400.0


class UsageLedger(Protocol):
    """Durable audio seconds per key and UTC day (``pipeline.service.usage.AudioUsageLedger``)."""

    def charged(self, key_id: str, day: int) -> float: ...

    def charge(self, key_id: str, day: int, seconds: float) -> None: ...


@dataclass(frozen=True)
class Lease:
    """An admitted request: holds one concurrency slot until released."""

    lease_id: str
    key_id: str
    headers: dict[str, str]


@dataclass
class _KeyState:
    recent: deque = field(default_factory=deque)  # admission times within the last WINDOW_S
    leases: dict[str, float] = field(default_factory=dict)  # lease id -> expiry time
    reserved: dict[str, tuple[float, float]] = field(default_factory=dict)  # reservation id -> (seconds, expiry)
    day: int = -1
    audio_s: float = 0.0

    @property
    def reserved_s(self) -> float:
        return sum(seconds for seconds, _ in self.reserved.values())


def key_limits(settings) -> tuple[KeyLimits, dict[str, KeyLimits]]:
    """The default limits and every overridden key's (by key id; overrides may name a key or its id)."""
    cfg = settings.limits
    default = KeyLimits(**cfg.model_dump(exclude={"per_key"}))
    per_key = {
        (name if name.startswith("key_") else key_id(name)): default.model_copy(update=override.model_dump(exclude_none=True))
        for name, override in cfg.per_key.items()
    }
    return default, per_key


def book_from_settings(settings, clock: Callable[[], float] | None = None,
                       usage: UsageLedger | None = None) -> "LimitBook":
    """A ``LimitBook`` for ``Settings.limits``."""
    default, per_key = key_limits(settings)
    return LimitBook(default, per_key, clock, usage=usage)


class LimitBook:
    def __init__(
        self,
        default: KeyLimits,
        per_key: dict[str, KeyLimits] | None = None,
        clock: Callable[[], float] | None = None,
        lease_ttl_s: float = 4 * 3600,
        usage: UsageLedger | None = None,
    ) -> None:
        import time

        self._default = default
        self._per_key = dict(per_key or {})
        self._clock = clock or time.time
        # A lease whose release never came (its ingress died) frees itself after this long.
        self._lease_ttl_s = lease_ttl_s
        self._keys: dict[str, _KeyState] = {}
        self._usage = usage
        self.refusals: dict[str, int] = {"requests_per_minute": 0, "concurrent_requests": 0, "audio_hours_per_day": 0}

    def limits_for(self, key_id: str) -> KeyLimits:
        return self._per_key.get(key_id, self._default)

    def _state(self, key_id: str, now: float) -> _KeyState:
        state = self._keys.setdefault(key_id, _KeyState())
        while state.recent and state.recent[0] <= now - WINDOW_S:
            state.recent.popleft()
        for lease_id, expiry in list(state.leases.items()):
            if expiry <= now:
                del state.leases[lease_id]
        for reservation_id, (_, expiry) in list(state.reserved.items()):
            if expiry <= now:
                del state.reserved[reservation_id]
        day = int(now // DAY_S)
        if day != state.day:
            # A new day, or a key first seen since (re)start: what it was charged today so far.
            state.audio_s = self._usage.charged(key_id, day) if self._usage is not None else 0.0
            state.day = day
        return state

    def _headers(self, limits: KeyLimits, state: _KeyState, now: float) -> dict[str, str]:
        if not limits.requests_per_minute:
            return {}
        remaining = max(0, limits.requests_per_minute - len(state.recent))
        reset = math.ceil(state.recent[0] + WINDOW_S - now) if state.recent else 0
        return {
            "X-RateLimit-Limit": str(limits.requests_per_minute),
            "X-RateLimit-Remaining": str(remaining),
            "X-RateLimit-Reset": str(max(0, reset)),
        }

    def _refuse(self, which: str, message: str, retry_after: float, headers: dict[str, str]) -> HarkError:
        self.refusals[which] += 1
        return RateLimited(message, retry_after=max(1, math.ceil(retry_after))).with_headers(headers)

    def admit(self, key_id: str) -> Lease:
        """Count a request and take a concurrency slot, or raise ``RATE_LIMITED``."""
        now = self._clock()
        limits = self.limits_for(key_id)
        state = self._state(key_id, now)
        if limits.requests_per_minute and len(state.recent) >= limits.requests_per_minute:
            wait = state.recent[0] + WINDOW_S - now
            raise self._refuse(
                "requests_per_minute",
                f"Over {limits.requests_per_minute} requests per minute for this key",
                wait,
                self._headers(limits, state, now),
            )
        if limits.concurrent_requests and len(state.leases) >= limits.concurrent_requests:
            raise self._refuse(
                "concurrent_requests",
                f"Over {limits.concurrent_requests} concurrent requests for this key",
                # The real wait is until one of them ends, which nobody knows; 1 s is the shortest
                # honest answer.
                1,
                self._headers(limits, state, now),
            )
        self._check_audio(key_id, limits, state, now, 0.0)
        state.recent.append(now)
        lease = Lease(uuid.uuid4().hex, key_id, self._headers(limits, state, now))
        state.leases[lease.lease_id] = now + self._lease_ttl_s
        return lease

    def _check_audio(self, key_id: str, limits: KeyLimits, state: _KeyState, now: float, seconds: float) -> None:
        quota_s = limits.audio_hours_per_day * 3600
        if not quota_s:
            return
        committed = state.audio_s + state.reserved_s
        if committed >= quota_s or (seconds and committed + seconds > quota_s):
            raise self._refuse(
                "audio_hours_per_day",
                f"Over {limits.audio_hours_per_day:g} audio hours per day for this key",
                (state.day + 1) * DAY_S - now,
                self._headers(limits, state, now),
            )

    # The daily audio quota is a reservation: the decoded duration is reserved before any work,
    # counting every other reservation of the key still running, and settled (charged) after, so
    # N concurrent requests cannot overshoot it together. A reservation whose settle never came
    # (its caller died) lapses like a lease.

    def reserve_audio(self, key_id: str, seconds: float) -> str:
        """Reserve ``seconds`` of today's quota, or raise ``RATE_LIMITED``; returns its id."""
        now = self._clock()
        state = self._state(key_id, now)
        self._check_audio(key_id, self.limits_for(key_id), state, now, seconds)
        reservation_id = uuid.uuid4().hex
        state.reserved[reservation_id] = (seconds, now + self._lease_ttl_s)
        return reservation_id

    def extend_audio(self, key_id: str, reservation_id: str, seconds: float) -> None:
        """Grow a reservation (a stream, as its audio arrives), or raise ``RATE_LIMITED``."""
        now = self._clock()
        state = self._state(key_id, now)
        self._check_audio(key_id, self.limits_for(key_id), state, now, seconds)
        held, _ = state.reserved.get(reservation_id, (0.0, 0.0))
        state.reserved[reservation_id] = (held + seconds, now + self._lease_ttl_s)

    def settle_audio(self, key_id: str, reservation_id: str, seconds: float) -> None:
        """The work is done: charge ``seconds`` (the decoded duration) and drop the reservation."""
        state = self._state(key_id, self._clock())
        state.reserved.pop(reservation_id, None)
        state.audio_s += seconds
        if self._usage is not None:
            self._usage.charge(key_id, state.day, seconds)

    def cancel_audio(self, key_id: str, reservation_id: str) -> None:
        """The work failed: nothing is charged."""
        self._state(key_id, self._clock()).reserved.pop(reservation_id, None)

    def release(self, lease_id: str, key_id: str) -> None:
        state = self._keys.get(key_id)
        if state is not None:
            state.leases.pop(lease_id, None)

    def in_flight(self) -> int:
        """Leases held across all keys: the app's queue depth."""
        now = self._clock()
        return sum(len(self._state(k, now).leases) for k in list(self._keys))

    def usage(self, key_id: str) -> dict[str, float]:
        now = self._clock()
        state = self._state(key_id, now)
        return {"requests_last_minute": len(state.recent), "concurrent": len(state.leases), "audio_s_today": state.audio_s,
                "audio_s_reserved": state.reserved_s}
