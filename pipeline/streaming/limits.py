"""What one live stream may send: frame size, pace, length, idle time.

Plain accounting, no I/O: the stream server asks a ``StreamBudget`` before it decodes a frame and
before it hands the decoded audio on, and ends the stream on the error it raises.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.core.errors import AudioTooLong, InvalidParameter, RateLimited
from pipeline.core.settings import Settings


class FrameTooLarge(InvalidParameter):
    """A binary frame over the size cap (the stream is closed with 1009, Message Too Big)."""

    def __init__(self, max_frame_kib: int) -> None:
        super().__init__(f"Binary frames must be at most {max_frame_kib} KiB: send audio in smaller slices",
                         param="message")


@dataclass(frozen=True)
class StreamLimits:
    idle_timeout_s: float = 10.0  # no audio and no KeepAlive this long ends the stream
    max_frame_kib: int = 1024  # largest binary frame, in KiB
    max_speed_x: float = 4.0  # sustained pace, as a multiple of real time
    burst_s: float = 10.0  # audio that may come at once, beyond the pace
    max_duration_s: float = 7200.0  # longest stream, in seconds of audio
    quota_step_s: float = 5.0  # the daily audio quota is reserved ahead in steps this long
    # Audio received but not yet transcribed: beyond this the server cannot keep up with the
    # stream, and says so (503) rather than holding ever more of it.
    max_backlog_s: float = 120.0

    @classmethod
    def from_settings(cls, settings: Settings) -> "StreamLimits":
        return cls(
            idle_timeout_s=settings.stream_idle_timeout_s,
            max_frame_kib=settings.stream_max_frame_kib,
            max_speed_x=settings.stream_max_speed_x,
            burst_s=settings.stream_burst_s,
            max_duration_s=settings.stream_max_duration_s,
            max_backlog_s=settings.stream_max_backlog_s,
        )

    @property
    def max_frame_bytes(self) -> int:
        return self.max_frame_kib * 1024

    @property
    def decoder_backlog_bytes(self) -> int:
        """Encoded bytes a container decoder may hold undecoded: a few frames."""
        return 4 * self.max_frame_bytes


class StreamBudget:
    """The pace and length of one stream.

    Pace is a token bucket of audio seconds: it holds ``burst_s`` and refills at ``max_speed_x``
    seconds per second, so a client may start late or catch up after a stall (the burst), and
    keep up any pace up to ``max_speed_x`` times real time, but not beyond it.
    """

    def __init__(self, limits: StreamLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self._limits, self._clock = limits, clock
        self._tokens_s = limits.burst_s
        self._refilled_at = clock()
        self.received_s = 0.0  # audio accepted so far

    def check_frame(self, size_bytes: int) -> None:
        """Before decoding: ``FrameTooLarge`` for a frame over the cap."""
        if size_bytes > self._limits.max_frame_bytes:
            raise FrameTooLarge(self._limits.max_frame_kib)

    def allowance_s(self) -> float:
        """Audio that ``take`` would accept now."""
        self._refill()
        return min(self._tokens_s, self._limits.max_duration_s - self.received_s)

    def take(self, duration_s: float) -> None:
        """Count ``duration_s`` of decoded audio, or refuse it: ``AUDIO_TOO_LONG`` past the
        stream's length cap, ``RATE_LIMITED`` (with the wait that would make it fit) past its pace."""
        limits = self._limits
        if self.received_s + duration_s > limits.max_duration_s:
            raise AudioTooLong(int(limits.max_duration_s))
        self._refill()
        if duration_s > self._tokens_s:
            wait_s = (duration_s - self._tokens_s) / limits.max_speed_x
            raise RateLimited(
                f"Audio is arriving faster than {limits.max_speed_x:g}x real time "
                f"(beyond a burst of {limits.burst_s:g} s): send it at the pace it is spoken",
                retry_after=max(1, math.ceil(wait_s)),
            )
        self._tokens_s -= duration_s
        self.received_s += duration_s

    def _refill(self) -> None:
        now = self._clock()
        gained_s = (now - self._refilled_at) * self._limits.max_speed_x
        self._tokens_s = min(self._limits.burst_s, self._tokens_s + gained_s)
        self._refilled_at = now
