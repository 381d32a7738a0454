"""Per-registry token bucket whose rate adapts to throttling (AIMD).

A registry's real quota is unknown and shared with every other client, so the rate is
found by probing: each throttling response halves it, and each success adds back a small
step. This is the congestion control of TCP applied to pull requests.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

# A throttling burst usually rejects many requests sent in the same second. Only the
# first rejection in this window lowers the rate, so one burst halves it once.
_DECREASE_WINDOW_SECONDS = 2.0
# Each success adds this fraction of the maximum rate back (about 40 successes to recover).
_INCREASE_FRACTION = 0.025
# Close to the rate that was last throttled, the increase is this many times smaller, so
# the bucket probes the quota gently instead of hitting it again every few dozen pulls.
_PROBE_SLOWDOWN = 10.0
# "Close" means above this share of the last throttled rate.
_PROBE_THRESHOLD = 0.85


@dataclass
class AdaptiveBucket:
    """Token bucket of pull starts per second, between ``min_rate`` and ``max_rate``."""

    max_rate: float
    burst: int
    min_rate: float
    now: float
    rate: float = 0.0
    tokens: float = 0.0
    _last_decrease: float = float("-inf")
    # The rate at the last throttling response; 0 until the registry throttles.
    throttled_rate: float = 0.0
    throttled_at: deque[float] = field(default_factory=deque)

    def __post_init__(self) -> None:
        self.rate = self.max_rate
        self.tokens = float(self.burst)

    @property
    def capacity(self) -> float:
        # At most one second's worth of tokens at the current rate, so a lowered rate
        # is not undone by a full burst.
        return max(1.0, min(float(self.burst), self.rate))

    def _refill(self, now: float) -> None:
        elapsed = max(0.0, now - self.now)
        self.tokens = min(self.capacity, self.tokens + elapsed * self.rate)
        self.now = max(self.now, now)

    def try_acquire(self, now: float) -> bool:
        self._refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def release(self) -> None:
        """Return a token taken for a start that did not happen."""
        self.tokens = min(self.capacity, self.tokens + 1.0)

    def wait_time(self, now: float) -> float:
        """Seconds until a token is available (0 if one is)."""
        self._refill(now)
        if self.tokens >= 1.0:
            return 0.0
        return (1.0 - self.tokens) / self.rate

    def on_throttled(self, now: float) -> bool:
        """Halve the rate at most once per window; return True if this call lowered it."""
        self._refill(now)
        self.throttled_at.append(now)
        if now - self._last_decrease < _DECREASE_WINDOW_SECONDS:
            return False
        self._last_decrease = now
        self.throttled_rate = self.rate
        before = self.rate
        self.rate = max(self.min_rate, self.rate / 2)
        self.tokens = min(self.tokens, 0.0)
        return self.rate < before

    def on_success(self, now: float) -> None:
        self._refill(now)
        step = self.max_rate * _INCREASE_FRACTION
        if self.throttled_rate and self.rate >= _PROBE_THRESHOLD * self.throttled_rate:
            step /= _PROBE_SLOWDOWN
        self.rate = min(self.max_rate, self.rate + step)

    def cap(self, quota: float) -> None:
        """Keep the maximum rate below an externally known quota (such as ECR's)."""
        self.max_rate = max(self.min_rate, min(self.max_rate, quota))
        self.rate = min(self.rate, self.max_rate)

    def recent_throttles(self, now: float, window: float = 300.0) -> int:
        """Count throttling responses in the last ``window`` seconds."""
        while self.throttled_at and self.throttled_at[0] < now - window:
            self.throttled_at.popleft()
        return len(self.throttled_at)
