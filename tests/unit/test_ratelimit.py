"""Tests of the adaptive per-registry token bucket (additive increase, multiplicative decrease)."""

from __future__ import annotations

import pytest

from imgcache.ratelimit import AdaptiveBucket


def make_bucket(max_rate: float = 10.0, burst: int = 5, min_rate: float = 0.5, now: float = 0.0) -> AdaptiveBucket:
    return AdaptiveBucket(max_rate=max_rate, burst=burst, min_rate=min_rate, now=now)


def drain(bucket: AdaptiveBucket, now: float, limit: int = 1000) -> int:
    """Acquire tokens at ``now`` until the bucket rejects one, and return how many were acquired."""
    acquired = 0
    while acquired < limit and bucket.try_acquire(now):
        acquired += 1
    return acquired


def test_bucket_starts_at_max_rate() -> None:
    bucket = make_bucket()

    assert bucket.rate == 10.0


def test_bucket_burst_then_empty() -> None:
    bucket = make_bucket(max_rate=10.0, burst=5)

    assert drain(bucket, 0.0) == 5
    assert not bucket.try_acquire(0.0)


@pytest.mark.parametrize(
    ("elapsed", "expected"),
    [
        pytest.param(0.05, 0, id="half-token"),
        pytest.param(0.1, 1, id="one-token"),
        pytest.param(0.35, 3, id="three-and-a-half-tokens"),
        pytest.param(60.0, 5, id="idle-refills-to-burst-only"),
    ],
)
def test_bucket_refill_at_rate(elapsed: float, expected: int) -> None:
    bucket = make_bucket(max_rate=10.0, burst=5)
    drain(bucket, 0.0)

    assert drain(bucket, elapsed) == expected


def test_bucket_starts_per_second_steady() -> None:
    bucket = make_bucket(max_rate=4.0, burst=4)
    drain(bucket, 0.0)

    starts = sum(drain(bucket, step * 0.05) for step in range(1, 201))

    # Ten seconds at 4 per second, after the initial burst.
    assert starts == 40


def test_bucket_burst_limited_to_one_second_of_rate() -> None:
    bucket = make_bucket(max_rate=2.0, burst=20)

    assert drain(bucket, 0.0) == 2


def test_bucket_clock_going_back_adds_nothing() -> None:
    bucket = make_bucket(max_rate=10.0, burst=5, now=100.0)
    drain(bucket, 100.0)

    assert drain(bucket, 50.0) == 0
    assert drain(bucket, 100.25) == 2


def test_bucket_release_returns_token() -> None:
    bucket = make_bucket(max_rate=10.0, burst=5)
    drain(bucket, 0.0)

    bucket.release()

    assert drain(bucket, 0.0) == 1


def test_bucket_release_capped_at_capacity() -> None:
    bucket = make_bucket(max_rate=10.0, burst=5)

    bucket.release()
    bucket.release()

    assert drain(bucket, 0.0) == 5


def test_bucket_throttle_halves_rate() -> None:
    bucket = make_bucket(max_rate=10.0)

    assert bucket.on_throttled(0.0)
    assert bucket.rate == 5.0


def test_bucket_throttle_empties_tokens() -> None:
    bucket = make_bucket(max_rate=10.0, burst=5)

    bucket.on_throttled(0.0)

    assert not bucket.try_acquire(0.0)


@pytest.mark.parametrize(
    ("second_at", "changed", "rate"),
    [
        pytest.param(0.0, False, 5.0, id="same-instant"),
        pytest.param(1.99, False, 5.0, id="inside-window"),
        pytest.param(2.0, True, 2.5, id="window-end"),
        pytest.param(7.0, True, 2.5, id="later"),
    ],
)
def test_bucket_throttle_once_per_window(second_at: float, changed: bool, rate: float) -> None:
    bucket = make_bucket(max_rate=10.0)
    bucket.on_throttled(0.0)

    assert bucket.on_throttled(second_at) is changed
    assert bucket.rate == rate


def test_bucket_throttle_burst_halves_once() -> None:
    bucket = make_bucket(max_rate=16.0, burst=16)

    for step in range(20):
        bucket.on_throttled(10.0 + step * 0.05)

    assert bucket.rate == 8.0


def test_bucket_throttle_floor_at_min_rate() -> None:
    bucket = make_bucket(max_rate=10.0, min_rate=0.5)

    rates = []
    for window in range(10):
        bucket.on_throttled(window * 2.0)
        rates.append(bucket.rate)

    assert rates[:5] == [5.0, 2.5, 1.25, 0.625, 0.5]
    assert min(rates) == 0.5
    assert bucket.rate == 0.5


def test_bucket_min_rate_still_starts() -> None:
    bucket = make_bucket(max_rate=10.0, burst=5, min_rate=0.5)
    for window in range(10):
        bucket.on_throttled(window * 2.0)

    # At 0.5 per second the capacity is one token, so the bucket allows one start every 2 s.
    assert drain(bucket, 18.0) == 0
    assert drain(bucket, 20.0) == 1
    assert drain(bucket, 21.0) == 0
    assert drain(bucket, 22.0) == 1


def test_bucket_success_adds_fraction_of_max() -> None:
    bucket = make_bucket(max_rate=10.0)
    bucket.on_throttled(0.0)

    bucket.on_success(1.0)

    assert bucket.rate == pytest.approx(5.25)


def test_bucket_success_recovers_to_max() -> None:
    bucket = make_bucket(max_rate=10.0)
    bucket.on_throttled(0.0)

    # Fast steps of 0.25 from 5.0 up to 85 % of the throttled rate (8.5).
    for step in range(14):
        bucket.on_success(1.0 + step)
    assert bucket.rate == pytest.approx(8.5)

    # Above that, steps of 0.025 probe the last throttled rate gently.
    bucket.on_success(20.0)
    assert bucket.rate == pytest.approx(8.525)

    for step in range(59):
        bucket.on_success(21.0 + step)
    assert bucket.rate == pytest.approx(10.0)


def test_bucket_success_never_above_max() -> None:
    bucket = make_bucket(max_rate=10.0)

    for step in range(100):
        bucket.on_success(float(step))

    assert bucket.rate == 10.0


def test_bucket_wait_time_zero_with_token() -> None:
    assert make_bucket().wait_time(0.0) == 0.0


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        pytest.param(0.0, 0.1, id="empty"),
        pytest.param(0.04, 0.06, id="partly-refilled"),
        pytest.param(0.1, 0.0, id="refilled"),
    ],
)
def test_bucket_wait_time(now: float, expected: float) -> None:
    bucket = make_bucket(max_rate=10.0, burst=5)
    drain(bucket, 0.0)

    assert bucket.wait_time(now) == pytest.approx(expected)


def test_bucket_wait_time_after_throttle() -> None:
    bucket = make_bucket(max_rate=10.0, burst=5)

    bucket.on_throttled(0.0)

    assert bucket.wait_time(0.0) == pytest.approx(0.2)


def test_bucket_wait_time_then_acquire() -> None:
    bucket = make_bucket(max_rate=3.0, burst=3)
    drain(bucket, 0.0)

    wait = bucket.wait_time(0.0)

    assert not bucket.try_acquire(wait * 0.99)
    assert bucket.try_acquire(wait)


def test_bucket_cap_lowers_max_and_rate() -> None:
    bucket = make_bucket(max_rate=10.0, burst=10)

    bucket.cap(4.0)

    assert bucket.max_rate == 4.0
    assert bucket.rate == 4.0
    assert drain(bucket, 0.0) == 4


def test_bucket_cap_above_max_keeps_max() -> None:
    bucket = make_bucket(max_rate=10.0)

    bucket.cap(50.0)

    assert bucket.max_rate == 10.0
    assert bucket.rate == 10.0


def test_bucket_cap_below_min_uses_min() -> None:
    bucket = make_bucket(max_rate=10.0, min_rate=0.5)

    bucket.cap(0.1)

    assert bucket.max_rate == 0.5
    assert bucket.rate == 0.5


def test_bucket_cap_keeps_lower_rate() -> None:
    bucket = make_bucket(max_rate=10.0)
    bucket.on_throttled(0.0)
    bucket.on_throttled(2.0)

    bucket.cap(4.0)

    assert bucket.rate == 2.5


def test_bucket_cap_limits_recovery() -> None:
    bucket = make_bucket(max_rate=10.0)
    bucket.cap(4.0)
    bucket.on_throttled(0.0)

    for step in range(100):
        bucket.on_success(1.0 + step)

    assert bucket.rate == pytest.approx(4.0)


def test_bucket_recent_throttles_counts_every_response() -> None:
    bucket = make_bucket()

    for step in range(3):
        bucket.on_throttled(float(step) * 0.1)

    assert bucket.recent_throttles(1.0) == 3


def test_bucket_recent_throttles_window() -> None:
    bucket = make_bucket()
    bucket.on_throttled(0.0)
    bucket.on_throttled(200.0)

    assert bucket.recent_throttles(299.0) == 2
    assert bucket.recent_throttles(301.0) == 1
    assert bucket.recent_throttles(200.0 + 301.0) == 0


def test_bucket_throttle_at_floor_reports_no_change() -> None:
    bucket = make_bucket(max_rate=1.0, min_rate=1.0)
    assert bucket.on_throttled(0.0) is False
    assert bucket.rate == 1.0
