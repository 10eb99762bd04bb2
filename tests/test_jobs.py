"""The job store and webhook signing, without Ray."""

import asyncio
import base64
import time
import multiprocessing
import random

import pytest
from standardwebhooks import Webhook

from pipeline.core.errors import FetchFailed, error_from_body
from pipeline.audio.urls import UrlGuard
from pipeline.service.jobs import COMPLETED, DELIVERED, DELIVERY_FAILED, FAILED, PENDING, QUEUED, RUNNING, SqlJobStore
from pipeline.service.webhooks import backoff_s, deliver, webhook_signer
from servers import WebhookReceiver


class Clock:
    def __init__(self):
        self.t = 1_000.0

    def __call__(self):
        return self.t


@pytest.fixture()
def store(job_db_url):
    """A fresh store on SQLite and on PostgreSQL (conftest's ``job_db_url``), on a clock the test moves."""
    clock = Clock()
    store = SqlJobStore(job_db_url, clock=clock)
    yield store, clock
    store.close()


def test_lifecycle_and_leases(store):
    store, clock = store
    job = store.create("key_a", {"url": "http://x/a.wav", "params": {}}, "http://hook/")
    assert job.state == QUEUED and job.api_status == "processing" and job.delivery_state == PENDING
    assert job.payload() == {"job_id": job.job_id, "status": "processing"}
    claimed = store.claim("w1", lease_s=10)
    assert claimed.job_id == job.job_id and claimed.state == RUNNING and claimed.run_attempts == 1
    assert store.claim("w2", lease_s=10) is None  # leased
    clock.t += 5
    assert store.renew(job.job_id, "w1", 10)
    clock.t += 9
    assert store.claim("w2", lease_s=10) is None  # renewed lease still good
    clock.t += 2
    taken = store.claim("w2", lease_s=10)  # w1 went silent: taken over
    assert taken.run_attempts == 2
    assert not store.finish(job.job_id, "w1", result={"text": "late"})  # the old runner cannot finish it
    assert store.finish(job.job_id, "w2", result={"text": "hi"})
    done = store.get(job.job_id)
    assert done.state == COMPLETED and done.payload() == {"job_id": job.job_id, "status": "completed", "result": {"text": "hi"}}
    clock.t += 100
    assert store.claim("w3", lease_s=10) is None  # finished jobs never run again
    assert [j.job_id for j in store.due_deliveries(10)] == [job.job_id]


def test_failures_requeue_and_delivery_states(store):
    store, clock = store
    job = store.create("key_a", {"params": {}}, "http://hook/")
    store.claim("w", 10)
    assert store.requeue(job.job_id, "w", delay_s=5)
    assert store.claim("w", 10) is None
    clock.t += 5
    again = store.claim("w", 10)
    assert again.job_id == job.job_id and again.run_attempts == 2
    assert store.requeue(job.job_id, "w", delay_s=0, count_attempt=False)  # busy: the run is given back
    assert store.claim("w", 10).run_attempts == 2
    store.finish(job.job_id, "w", error={"error": "gone", "code": "FETCH_FAILED", "status": 404})
    failed = store.get(job.job_id)
    assert failed.state == FAILED and failed.payload()["error"]["code"] == "FETCH_FAILED"
    assert isinstance(error_from_body(failed.error), FetchFailed)
    store.delivery_result(job.job_id, delivered=False, status=500, error="HTTP 500", next_at=clock.t + 60)
    assert store.due_deliveries(10) == []
    clock.t += 60
    store.delivery_result(job.job_id, delivered=False, status=None, error="refused", next_at=None)
    j = store.get(job.job_id)
    assert (j.delivery_state, j.delivery_attempts, j.delivery_last_error) == (DELIVERY_FAILED, 2, "refused")
    other = store.create("key_a", {"params": {}}, "http://hook/")
    store.claim("w", 10)
    store.finish(other.job_id, "w", result={})
    store.delivery_result(other.job_id, delivered=True, status=204, error=None, next_at=None)
    assert store.get(other.job_id).delivery_state == DELIVERED
    assert store.counts() == {COMPLETED: 1, FAILED: 1}


def test_idempotency_window(store):
    store, clock = store
    job = store.create("key_a", {"params": {}}, None, idempotency_key="abc", request_hash="h1")
    assert store.find_idempotent("key_a", "abc") == (store.get(job.job_id), "h1")
    assert store.find_idempotent("key_b", "abc") is None  # keys are per license key
    clock.t += 24 * 3600 + 1
    assert store.find_idempotent("key_a", "abc") is None
    store.forget_idempotency()
    store.create("key_a", {"params": {}}, None, idempotency_key="abc", request_hash="h2")


def _claim_all(url: str) -> list[str]:
    store = SqlJobStore(url)
    got = []
    while (job := store.claim(f"w{multiprocessing.current_process().pid}", 60)) is not None:
        got.append(job.job_id)
    return got


def test_two_processes_never_claim_the_same_job(tmp_path):
    # SQLite's BEGIN IMMEDIATE across processes; on PostgreSQL, test_job_db.py's two runner
    # processes show the same with SKIP LOCKED (100 jobs, run end to end).
    job_db_url = f"sqlite:///{tmp_path / 'jobs.sqlite3'}"
    store = SqlJobStore(job_db_url)
    ids = {store.create("k", {"params": {}}, None).job_id for _ in range(60)}
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        a, b = pool.map(_claim_all, [job_db_url] * 2)
    assert not set(a) & set(b) and set(a) | set(b) == ids and len(a) + len(b) == 60


def test_backoff_grows_with_jitter_and_cap():
    rng = random.Random(1)
    waits = [backoff_s(n, 2, 60, rng) for n in range(1, 9)]
    assert 1 <= waits[0] <= 2 and 4 <= waits[2] <= 8 and all(30 <= w <= 60 for w in waits[5:])


@pytest.mark.parametrize("secret", ["whsec_" + base64.b64encode(b"0123456789abcdef0123").decode(), "plain-secret"])
def test_deliveries_are_signed_the_standard_webhooks_way(secret):
    guard = UrlGuard.from_settings(False, ["127.0.0.1/32"])
    with WebhookReceiver(secret) as receiver:
        receiver.fail_first["/flaky"] = 1
        first = asyncio.run(deliver(receiver.url("/flaky"), {"job_id": "job_1", "status": "completed"}, "msg_job_1", webhook_signer(secret), guard, 5))
        assert (first.delivered, first.retry, first.status) == (False, True, 500)
        ok = asyncio.run(deliver(receiver.url("/flaky"), {"job_id": "job_1", "status": "completed"}, "msg_job_1", webhook_signer(secret), guard, 5))
        assert ok.delivered and ok.status == 204
        assert receiver.bad_signatures == 0
        [(_, headers, payload)] = receiver.deliveries
        assert payload == {"job_id": "job_1", "status": "completed"} and headers["webhook-id"] == "msg_job_1"
        assert headers["webhook-signature"].startswith("v1,")
        # Independent check with the library, keyed as the issue says.
        key = secret if secret.startswith("whsec_") else secret.encode()
        Webhook(key).verify(receiver.attempts[-1][2], receiver.attempts[-1][1])
        wrong = asyncio.run(deliver(receiver.url("/x"), {}, "msg_2", webhook_signer("other-secret"), guard, 5))
        assert (wrong.delivered, wrong.retry, wrong.status) == (False, False, 400)
    refused = asyncio.run(deliver("http://127.0.0.2:9/hook", {}, "msg_3", webhook_signer(secret), guard, 5))
    assert not refused.delivered and not refused.retry  # the guard refuses: nothing was sent
    unreachable = asyncio.run(deliver("http://127.0.0.1:9/hook", {}, "msg_4", webhook_signer(secret), guard, 2))
    assert not unreachable.delivered and unreachable.retry


def test_a_dripping_or_endless_receiver_cannot_hold_a_delivery():
    # Before: a receiver sending one byte every 0.2 s held deliver() (timeout 1 s) for minutes, and
    # an endless 200 body was read whole into memory (2 GB in 33 s).
    guard = UrlGuard.from_settings(False, ["127.0.0.1/32"])
    signer = webhook_signer("s")
    with WebhookReceiver("s") as receiver:
        started = time.monotonic()
        drip = asyncio.run(deliver(receiver.url("/drip"), {}, "msg_1", signer, guard, 1.0))
        assert time.monotonic() - started < 3
        assert (drip.delivered, drip.retry, drip.error) == (False, True, "No answer within 1 s")
        receiver.hostile_done.clear()
        huge = asyncio.run(deliver(receiver.url("/huge"), {}, "msg_2", signer, guard, 5.0))
        assert (huge.delivered, huge.status) == (True, 200)
        assert receiver.hostile_done.wait(10)
        assert receiver.huge_bytes_sent < 50 * 2**20  # the body was dropped, not read


def test_an_expired_idempotency_key_may_be_reused_before_the_sweep(store):
    store, clock = store
    first = store.create("key_a", {"params": {}}, None, idempotency_key="abc", request_hash="h1")
    clock.t += 24 * 3600 + 1
    # No forget_idempotency() sweep has run yet: the old row still holds the key.
    again = store.create("key_a", {"params": {}}, None, idempotency_key="abc", request_hash="h2")
    assert again.job_id != first.job_id
    assert store.find_idempotent("key_a", "abc") == (store.get(again.job_id), "h2")


def test_a_key_may_not_queue_more_than_its_job_limit(store):
    from pipeline.core.errors import RateLimited

    store, clock = store
    for _ in range(3):
        store.create("key_a", {"params": {}}, None, max_active=3)
    with pytest.raises(RateLimited) as refused:
        store.create("key_a", {"params": {}}, None, max_active=3)
    assert refused.value.status == 429 and "3 queued or running jobs" in refused.value.message
    store.create("key_b", {"params": {}}, None, max_active=3)  # other keys are not affected
    job = store.claim("w", 10)
    store.finish(job.job_id, "w", result={})  # a finished job no longer counts
    store.create("key_a", {"params": {}}, None, max_active=3)
    store.create("key_a", {"params": {}}, None, max_active=0)  # 0 = unlimited


def test_claims_are_fair_across_keys(store):
    store, clock = store
    flood = [store.create("key_flood", {"params": {}}, None).job_id for _ in range(50)]
    clock.t += 1
    late = [store.create(k, {"params": {}}, None).job_id for k in ("key_b", "key_c")]
    claimed = [store.claim("w", 60) for _ in range(6)]
    # A free runner slot goes to the key with the fewest jobs running; within a key, oldest first.
    assert [j.key_id for j in claimed] == ["key_flood", "key_b", "key_c", "key_flood", "key_flood", "key_flood"]
    assert [j.job_id for j in claimed if j.key_id == "key_flood"] == flood[:4]
    assert [j.job_id for j in claimed if j.key_id != "key_flood"] == late


def test_one_runner_of_many_takes_each_delivery_attempt(store):
    store, clock = store
    job = store.create("key_a", {"params": {}}, "http://hook/")
    store.claim("w", 10)
    store.finish(job.job_id, "w", result={})
    [due] = store.due_deliveries(10)
    assert store.claim_delivery(due.job_id, due.delivery_attempts, hold_s=40)
    assert not store.claim_delivery(due.job_id, due.delivery_attempts, hold_s=40)  # another runner: not twice
    assert store.due_deliveries(10) == []  # held while the attempt is under way
    store.delivery_result(job.job_id, delivered=False, status=500, error="HTTP 500", next_at=clock.t + 1)
    clock.t += 1
    [again] = store.due_deliveries(10)
    assert not store.claim_delivery(again.job_id, due.delivery_attempts, hold_s=40)  # a stale read
    assert store.claim_delivery(again.job_id, again.delivery_attempts, hold_s=40)
    clock.t += 40
    assert [j.job_id for j in store.due_deliveries(10)] == [job.job_id]  # a runner that died mid-attempt: retried
