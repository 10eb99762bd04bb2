import pytest

from pipeline.service.auth import key_id
from pipeline.core.errors import RateLimited
from pipeline.service.limits import KeyLimits, LimitBook, book_from_settings
from pipeline.core.settings import Settings


class Clock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_requests_per_minute_is_a_rolling_window():
    clock = Clock()
    book = LimitBook(KeyLimits(requests_per_minute=3, concurrent_requests=0), clock=clock)
    leases = []
    for i in range(3):
        leases.append(book.admit("k"))
        clock.t += 10
    assert leases[0].headers == {"X-RateLimit-Limit": "3", "X-RateLimit-Remaining": "2", "X-RateLimit-Reset": "60"}
    with pytest.raises(RateLimited) as info:
        book.admit("k")
    # The first admission (at t0) leaves the window at t0 + 60; now is t0 + 30.
    assert info.value.extra["retry_after"] == 30
    assert info.value.headers()["Retry-After"] == "30"
    assert info.value.headers()["X-RateLimit-Remaining"] == "0"
    clock.t += 30
    book.admit("k")  # the window moved on
    assert book.admit("other").key_id == "other"  # keys are independent
    assert book.refusals["requests_per_minute"] == 1


def test_concurrency_slots_are_released():
    book = LimitBook(KeyLimits(requests_per_minute=0, concurrent_requests=2), clock=Clock())
    a, b = book.admit("k"), book.admit("k")
    with pytest.raises(RateLimited) as info:
        book.admit("k")
    assert info.value.extra["retry_after"] == 1
    book.release(a.lease_id, "k")
    book.release(a.lease_id, "k")  # twice is harmless
    c = book.admit("k")
    assert book.usage("k")["concurrent"] == 2 and c.lease_id != b.lease_id


def test_forgotten_leases_expire():
    clock = Clock()
    book = LimitBook(KeyLimits(concurrent_requests=1), clock=clock, lease_ttl_s=100)
    book.admit("k")
    with pytest.raises(RateLimited):
        book.admit("k")
    clock.t += 101
    book.admit("k")


def test_daily_audio_quota_counts_transcribed_seconds_and_resets_at_utc_midnight():
    clock = Clock(86_400 * 100 + 3600)  # 01:00 UTC
    book = LimitBook(KeyLimits(audio_hours_per_day=0.01), clock=clock)  # 36 s a day
    book.settle_audio("k", book.reserve_audio("k", 20), 20)
    with pytest.raises(RateLimited) as info:
        book.reserve_audio("k", 20)  # would end at 40 s > 36 s
    assert info.value.extra["retry_after"] == 23 * 3600
    book.settle_audio("k", book.reserve_audio("k", 16), 16)
    with pytest.raises(RateLimited):
        book.admit("k")  # quota spent: refused before anything is read
    clock.t = 86_400 * 101 + 1
    book.admit("k")
    assert book.refusals["audio_hours_per_day"] == 2


def test_zero_means_unlimited_and_per_key_overrides():
    settings = Settings(limits={"requests_per_minute": 1, "per_key": {"vip": {"requests_per_minute": 0}, key_id("x"): {"concurrent_requests": 1}}})
    book = book_from_settings(settings, clock=Clock())
    for _ in range(100):
        book.release(book.admit(key_id("vip")).lease_id, key_id("vip"))
    assert book.limits_for(key_id("x")) == KeyLimits(requests_per_minute=1, concurrent_requests=1)
    book.admit("plain")
    with pytest.raises(RateLimited):
        book.admit("plain")


def test_a_misspelt_per_key_override_is_refused():
    # Typed overrides: a typo used to be silently ignored, leaving the key on the defaults.
    with pytest.raises(ValueError, match="requests_per_minit"):
        Settings(limits={"per_key": {"vip": {"requests_per_minit": 600}}})


def test_concurrent_requests_cannot_overshoot_the_audio_quota_together():
    # Reservations: N requests checked before any is charged used to pass together.
    book = LimitBook(KeyLimits(audio_hours_per_day=0.01, concurrent_requests=0), clock=Clock())  # 36 s
    first = book.reserve_audio("k", 20)
    with pytest.raises(RateLimited):
        book.reserve_audio("k", 20)  # 20 s already reserved by a request still running
    second = book.reserve_audio("k", 16)
    book.settle_audio("k", first, 19.5)  # the decoded duration is what is charged
    book.cancel_audio("k", second)  # a failed request is not charged
    assert book.usage("k")["audio_s_today"] == 19.5 and book.usage("k")["audio_s_reserved"] == 0
    book.reserve_audio("k", 16)


def test_a_stream_extends_its_reservation_until_the_quota_runs_out():
    book = LimitBook(KeyLimits(audio_hours_per_day=0.01, concurrent_requests=0), clock=Clock())  # 36 s
    other = book.reserve_audio("k", 10)
    stream = book.reserve_audio("k", 0)
    for _ in range(5):
        book.extend_audio("k", stream, 5)  # 10 + 25 = 35 s
    with pytest.raises(RateLimited):
        book.extend_audio("k", stream, 5)
    book.settle_audio("k", stream, 25)
    book.cancel_audio("k", other)
    assert book.usage("k")["audio_s_today"] == 25


def test_forgotten_reservations_expire():
    clock = Clock()
    book = LimitBook(KeyLimits(audio_hours_per_day=0.01), clock=clock, lease_ttl_s=60)
    book.reserve_audio("k", 30)  # its settle never comes (the replica died)
    clock.t += 61
    book.reserve_audio("k", 30)


def test_the_daily_audio_quota_survives_a_restart_of_the_book(job_db_url):
    # Before: the quota lived only in the Accounting replica's memory; a restart reset every key's day.
    from pipeline.service.usage import AudioUsageLedger

    clock = Clock(86_400 * 100 + 3600)
    limits = KeyLimits(audio_hours_per_day=0.01, concurrent_requests=0)  # 36 s a day
    book = LimitBook(limits, clock=clock, usage=AudioUsageLedger(job_db_url))
    book.settle_audio("k", book.reserve_audio("k", 20), 20)
    book.settle_audio("k", book.reserve_audio("k", 10), 10)
    restarted = LimitBook(limits, clock=clock, usage=AudioUsageLedger(job_db_url))
    assert restarted.usage("k")["audio_s_today"] == 30
    with pytest.raises(RateLimited):
        restarted.reserve_audio("k", 10)  # 30 + 10 > 36
    assert restarted.usage("other")["audio_s_today"] == 0  # per key
    clock.t += 86_400
    restarted.reserve_audio("k", 30)  # a new UTC day


def test_a_second_accounting_replica_is_refused():
    from deployments.app import build_app

    for options in ({"num_replicas": 2}, {"autoscaling_config": {"min_replicas": 1, "max_replicas": 3}}):
        with pytest.raises(ValueError, match="exactly one replica"):
            build_app({"deployment_options": {"Accounting": options}})
