"""The job store as a cluster uses it, on SQLite and on a real PostgreSQL (conftest ``job_db_url``):
job runners in separate processes sharing one database, a runner killed mid-job, a database
restart, and the schema's migrations. The runners are the real ``JobRunner``; fakes stand in at
its engine seams only (audio, recognizer, meter: tests/test_flow.py)."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import sqlite3
import time

import fsspec
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from conftest import wait_until
from pipeline.core.settings import Settings
from sqlalchemy import func, select

from pipeline.service.db import jobs, metadata
from pipeline.service.jobs import COMPLETED, SqlJobStore
from pipeline.service.runner import JobRunner
from pipeline.transcription.flow import TranscriptionFlow

HANG = "http://media.test/hang.wav"


def _runner_process(url: str, data_dir: str, lease_s: float, hang: bool, events, stop) -> None:
    """One job runner in its own process, until ``stop``; reports the URLs it fetched (one fetch
    per run of a job), and ``hanging`` once it is stuck inside the job at ``HANG``."""
    from test_flow import FakeAudio, FakeMeter, FakeRecognizer, FakeSpeakers

    async def main() -> None:
        fetched: list[str] = []

        class Audio(FakeAudio):
            async def from_url(self, u: str):
                fetched.append(u)
                if hang and u == HANG:
                    events.put(("hanging", os.getpid()))
                    await asyncio.Event().wait()
                await asyncio.sleep(0.005)  # some work, so that both runners hold jobs at once
                return await super().from_url(u)

        settings = Settings(data_dir=data_dir, jobs_lease_s=lease_s, jobs_concurrency=4, webhook_secret="s",
                            url_allowlist=["127.0.0.1/32"])
        runner = JobRunner(settings, SqlJobStore(url), Audio(), TranscriptionFlow(FakeRecognizer(), FakeSpeakers()),
                           meter_for=lambda key_id: FakeMeter())
        runner.start()
        events.put(("ready", os.getpid()))
        while not stop.is_set():
            await asyncio.sleep(0.05)
        events.put(("fetched", os.getpid(), fetched))

    asyncio.run(main())


def delivered(store: SqlJobStore) -> int:
    with store.engine.connect() as conn:
        return conn.execute(select(func.count()).where(jobs.c.delivery_state == "delivered")).scalar_one()


class Runners:
    """Job runner processes (spawned: nothing inherited from pytest's process but the paths)."""

    def __init__(self, url: str, data_dir) -> None:
        self.ctx = multiprocessing.get_context("spawn")
        self.url, self.data_dir = url, str(data_dir)
        self.events, self.stop = self.ctx.Queue(), self.ctx.Event()
        self.procs: list = []

    def start(self, n: int, *, lease_s: float = 30.0, hang: bool = False) -> list[int]:
        procs = [self.ctx.Process(target=_runner_process, args=(self.url, self.data_dir, lease_s, hang, self.events, self.stop))
                 for _ in range(n)]
        for proc in procs:
            proc.start()
        self.procs += procs
        ready = {self.expect("ready")[1] for _ in procs}
        assert ready == {p.pid for p in procs}
        return [p.pid for p in procs]

    def expect(self, kind: str, timeout_s: float = 60.0) -> tuple:
        event = self.events.get(timeout=timeout_s)
        assert event[0] == kind, event
        return event

    def finish(self) -> dict[int, list[str]]:
        """Stop the live runners; the URLs each fetched, by pid."""
        self.stop.set()
        alive = [p for p in self.procs if p.is_alive()]
        fetched = {event[1]: event[2] for event in (self.expect("fetched") for _ in alive)}
        self.close()
        return fetched

    def close(self) -> None:
        self.stop.set()
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()


def test_two_runner_processes_run_every_job_exactly_once(postgres, tmp_path):
    # What two Jobs replicas on two nodes do: share one store. Before, a second replica had its own
    # SQLite file (random 404s) and webhook delivery was de-duplicated per process only. (On
    # SQLite, test_jobs.py::test_two_processes_never_claim_the_same_job covers two processes.)
    from servers import WebhookReceiver

    job_db_url = postgres.new_database()
    store = SqlJobStore(job_db_url)
    runners = Runners(job_db_url, tmp_path)
    with WebhookReceiver("s") as receiver:
        try:
            pids = runners.start(2)
            urls = [f"http://media.test/{i}.wav" for i in range(100)]
            ids = [store.create(f"key_{i % 3}", {"params": {}, "url": url}, receiver.url("/hook")).job_id
                   for i, url in enumerate(urls)]
            wait_until(lambda: store.counts() == {COMPLETED: 100}, 90, interval_s=0.1, what="100 jobs to complete")
            wait_until(lambda: delivered(store) == 100, 60, what="100 webhooks delivered")
            fetched = runners.finish()
        finally:
            runners.close()
        webhook_ids = [headers["webhook-id"] for _, headers, _ in receiver.deliveries]
    runs = [url for pid in pids for url in fetched[pid]]
    assert sorted(runs) == sorted(urls)  # every job ran, none twice
    assert all(fetched[pid] for pid in pids)  # and both runners took part
    assert {store.get(job_id).run_attempts for job_id in ids} == {1}
    assert sorted(webhook_ids) == sorted(f"msg_{job_id}" for job_id in ids)  # one webhook per job


def test_a_runner_killed_mid_job_is_taken_over_after_its_lease(job_db_url, tmp_path):
    from test_flow import FakeAudio, FakeMeter, FakeRecognizer, FakeSpeakers

    store = SqlJobStore(job_db_url)
    runners = Runners(job_db_url, tmp_path)
    lease_s = 1.0
    try:
        [doomed] = runners.start(1, lease_s=lease_s, hang=True)
        job = store.create("key_a", {"params": {}, "url": HANG}, None)
        assert runners.expect("hanging")[1] == doomed
        os.kill(doomed, signal.SIGKILL)
    finally:
        runners.close()
    assert store.get(job.job_id).state == "running"  # as the dead runner left it
    recognizer, meter = FakeRecognizer(), FakeMeter()
    heir = JobRunner(Settings(data_dir=tmp_path, jobs_lease_s=lease_s), SqlJobStore(job_db_url), FakeAudio(),
                     TranscriptionFlow(recognizer, FakeSpeakers()), meter_for=lambda key_id: meter)

    async def take_over():
        started = time.monotonic()
        heir.start()
        while (current := store.get(job.job_id)).state != COMPLETED:
            assert time.monotonic() - started < 20, "the job was not taken over"
            await asyncio.sleep(0.05)
        return current, time.monotonic() - started

    done, waited_s = asyncio.run(take_over())
    assert done.run_attempts == 2 and done.result["text"] == "Hello there."
    assert len(recognizer.calls) == 1 and meter.log == [("reserve", 2.0), ("settle", 2.0)]  # charged once, by the heir
    assert waited_s < lease_s + 5


def test_a_stopping_runner_finishes_what_it_can_and_hands_the_rest_back_at_once(job_db_url, tmp_path):
    """A replica that Serve stops (an upgrade, a downscale, the app deleted): the job that ends
    within the drain completes; the one that does not, and the one that fails meanwhile (the app
    may be going down around it), go back to the queue uncharged with their runs uncounted, and
    another runner takes them at once, not after their 30 s lease."""
    from test_flow import FakeAudio, FakeMeter, FakeRecognizer, FakeSpeakers

    from pipeline.core.errors import FetchFailed

    store = SqlJobStore(job_db_url)
    quick = store.create("key_a", {"params": {}, "url": "http://media.test/quick.wav"}, None)
    stuck = store.create("key_a", {"params": {}, "url": HANG}, None)
    failing = store.create("key_a", {"params": {}, "url": "http://media.test/gone.wav"}, None)
    started_hanging, stopping = asyncio.Event(), asyncio.Event()

    class Audio(FakeAudio):
        async def from_url(self, url: str):
            if url == HANG:
                started_hanging.set()
                await asyncio.Event().wait()
            if url.endswith("gone.wav"):
                await stopping.wait()
                raise FetchFailed("the fetch replica went away", status=502)
            await asyncio.sleep(0.5)  # still running when the stop comes, done within the drain
            return await super().from_url(url)

    settings = Settings(data_dir=tmp_path, jobs_lease_s=30.0)
    meter = FakeMeter()
    leaving = JobRunner(settings, SqlJobStore(job_db_url), Audio(), TranscriptionFlow(FakeRecognizer(), FakeSpeakers()),
                        meter_for=lambda key_id: meter)

    async def stop_mid_jobs() -> float:
        leaving.start()
        await asyncio.wait_for(started_hanging.wait(), 10)
        while {store.get(job.job_id).state for job in (quick, failing)} != {"running"}:
            await asyncio.sleep(0.01)
        began = time.monotonic()
        stopping.set()
        await leaving.stop(drain_s=2.0)
        return time.monotonic() - began

    stopped_s = asyncio.run(stop_mid_jobs())
    assert 1.5 < stopped_s < 5  # waited out the drain for the stuck job, no longer
    assert store.get(quick.job_id).state == COMPLETED
    for job in (stuck, failing):
        given_back = store.get(job.job_id)
        assert (given_back.state, given_back.run_attempts) == ("queued", 0)
    assert meter.log == [("reserve", 2.0), ("settle", 2.0)]  # the quick job's charge only

    heir = JobRunner(settings, SqlJobStore(job_db_url), FakeAudio(), TranscriptionFlow(FakeRecognizer(), FakeSpeakers()),
                     meter_for=lambda key_id: FakeMeter())

    async def take_over() -> float:
        began = time.monotonic()
        heir.start()
        while {store.get(job.job_id).state for job in (stuck, failing)} != {COMPLETED}:
            assert time.monotonic() - began < 10, "the jobs were not taken over"
            await asyncio.sleep(0.05)
        return time.monotonic() - began

    assert asyncio.run(take_over()) < 5  # at once, not after the 30 s lease
    assert [store.get(job.job_id).run_attempts for job in (stuck, failing)] == [1, 1]


def run_a_long_job(store: SqlJobStore, lease_s: float, tmp_path):
    """One job whose run lasts three leases, run to completion by a real runner over ``store``."""
    from test_flow import FakeAudio, FakeMeter, FakeRecognizer, FakeSpeakers

    class LongAudio(FakeAudio):
        async def from_url(self, url: str):
            await asyncio.sleep(3 * lease_s)
            return await super().from_url(url)

    job = store.create("key_a", {"params": {}, "url": "http://media.test/long.wav"}, None)
    runner = JobRunner(Settings(data_dir=tmp_path, jobs_lease_s=lease_s), store, LongAudio(),
                       TranscriptionFlow(FakeRecognizer(), FakeSpeakers()), meter_for=lambda key_id: FakeMeter())

    async def run() -> None:
        runner.start()
        deadline = time.monotonic() + 20
        while store.get(job.job_id).state != COMPLETED:
            assert time.monotonic() < deadline, "the job did not complete"
            await asyncio.sleep(0.05)
        await runner.stop(drain_s=0)

    asyncio.run(run())
    return job


def test_a_lease_is_renewed_on_time_while_the_other_store_calls_are_slow(tmp_path):
    """A loaded machine or database: claims and delivery polls take longer than a lease. The
    renewals of a running job do not queue behind them (or the lease would run out and another
    runner would run the job again: CI saw it at a 3 s lease)."""
    from pipeline.service.db import sqlite_url

    lease_s, slow_s = 1.0, 1.5

    class SlowStore(SqlJobStore):
        def __init__(self, url: str) -> None:
            super().__init__(url)
            self.held_since: float | None = None  # when the lease was last set
            self.gaps: list[float] = []

        def claim(self, worker, lease_s):
            if self.held_since is not None:  # the job is running: every further claim is slow
                time.sleep(slow_s)
            job = super().claim(worker, lease_s)
            if job is not None:
                self.held_since = time.monotonic()
            return job

        def due_deliveries(self, limit):
            time.sleep(slow_s)
            return super().due_deliveries(limit)

        def renew(self, job_id, worker, lease_s):
            self.gaps.append(time.monotonic() - self.held_since)
            self.held_since = time.monotonic()
            return super().renew(job_id, worker, lease_s)

    store = SlowStore(sqlite_url(tmp_path / "jobs.sqlite3"))
    job = run_a_long_job(store, lease_s, tmp_path)
    assert len(store.gaps) >= 6  # one renewal every lease_s / 3 while the job ran
    assert max(store.gaps) < lease_s, store.gaps
    assert store.get(job.job_id).run_attempts == 1


def test_a_renewal_that_fails_once_does_not_end_the_run(tmp_path):
    """The database fails one lease renewal (a dropped connection): the run goes on, the next
    renewal keeps the lease, and the job completes in its first run."""
    from pipeline.service.db import sqlite_url

    lease_s = 0.6

    class FlakyStore(SqlJobStore):
        renewals = 0

        def renew(self, job_id, worker, lease_s):
            FlakyStore.renewals += 1
            if FlakyStore.renewals == 1:
                raise ConnectionError("server closed the connection unexpectedly")
            return super().renew(job_id, worker, lease_s)

    store = FlakyStore(sqlite_url(tmp_path / "jobs.sqlite3"))
    job = run_a_long_job(store, lease_s, tmp_path)
    assert FlakyStore.renewals >= 3
    assert store.get(job.job_id).run_attempts == 1


def test_a_database_restart_loses_nothing_acknowledged(postgres):
    url = postgres.new_database()
    store = SqlJobStore(url)
    queued = store.create("key_a", {"params": {}, "url": "http://media.test/a.wav"}, "http://hook.test/")
    running = store.claim("w", 30)
    second = store.create("key_a", {"params": {}}, None, idempotency_key="idem", request_hash="h")
    postgres.restart()  # every pooled connection is dead now
    assert store.get(queued.job_id).state == "running" and running.job_id == queued.job_id
    assert store.find_idempotent("key_a", "idem") == (store.get(second.job_id), "h")
    assert store.renew(running.job_id, "w", 30)  # the lease holder carries on
    assert store.finish(running.job_id, "w", result={"text": "ok"})
    assert store.claim("w2", 30).job_id == second.job_id
    assert store.counts() == {"completed": 1, "running": 1}


def test_the_migrations_build_the_schema_the_code_uses(job_db_url):
    store = SqlJobStore(job_db_url)
    SqlJobStore(job_db_url)  # a second replica starting on a migrated database changes nothing
    with store.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []


def test_a_job_store_from_before_migrations_is_adopted_in_order(tmp_path):
    path = tmp_path / "jobs.sqlite3"
    old = sqlite3.connect(path)  # the hand-written schema of the SQLite-only store
    old.executescript(
        "CREATE TABLE jobs (job_id TEXT PRIMARY KEY, key_id TEXT NOT NULL, state TEXT NOT NULL,"
        " request_json TEXT NOT NULL, callback_url TEXT, result_json TEXT, error_json TEXT, created_at REAL NOT NULL,"
        " updated_at REAL NOT NULL, run_attempts INTEGER NOT NULL DEFAULT 0, lease_owner TEXT, lease_expires_at REAL,"
        " not_before REAL NOT NULL DEFAULT 0, delivery_state TEXT NOT NULL, delivery_attempts INTEGER NOT NULL DEFAULT 0,"
        " delivery_next_at REAL, delivery_last_status INTEGER, delivery_last_error TEXT, idempotency_key TEXT,"
        " request_hash TEXT);"
        "CREATE UNIQUE INDEX jobs_idempotency ON jobs (key_id, idempotency_key) WHERE idempotency_key IS NOT NULL;"
        "INSERT INTO jobs (job_id, key_id, state, request_json, created_at, updated_at, delivery_state, idempotency_key)"
        " VALUES ('job_z', 'k', 'queued', '{\"params\": {}}', 1, 1, 'none', 'i1'),"
        "        ('job_a', 'k', 'queued', '{\"params\": {}}', 1, 1, 'none', NULL);"
    )
    old.commit()
    old.close()
    store = SqlJobStore(f"sqlite:///{path}")
    assert store.find_idempotent("k", "i1") is None  # created at t=1: long expired
    assert [store.claim("w", 30).job_id, store.claim("w", 30).job_id] == ["job_z", "job_a"]


@pytest.mark.parametrize("url", ["mysql://x/y", "postgresql://u@127.0.0.1:1/db"])
def test_database_urls(url):
    from pipeline.service.db import database_url

    if url.startswith("mysql"):
        with pytest.raises(ValueError, match="sqlite:/// or postgresql"):
            SqlJobStore(url)
    else:
        assert database_url(url).drivername == "postgresql+psycopg"  # psycopg 3, the driver shipped


@pytest.mark.parametrize("given", ["bytes", "stored"])
@pytest.mark.parametrize("where", ["local", "s3"])
def test_uploaded_audio_is_in_the_blob_store_before_the_202_and_gone_after_the_run(where, given, tmp_path, request):
    # given="stored": an upload above a megabyte, which the ingress wrote to the blob store as it
    # arrived; the job keeps that one, it does not copy it.
    # Before: uploads were files on the Jobs replica's own disk; a runner on another node (or the
    # replica rescheduled elsewhere) could not read them.
    from conftest import S3_BUCKET
    from pipeline.service.job_request import JobRequest
    from pipeline.transcription.schemas import ListenParams
    from test_flow import AUDIO, FakeMeter, FakeRecognizer, FakeSpeakers

    if where == "s3":
        s3 = request.getfixturevalue("s3_server")
        blob_url = f"s3://{S3_BUCKET}/uploads-{tmp_path.name}"

        def stored() -> dict[str, bytes]:
            found = {}
            for o in s3.list_objects_v2(Bucket=S3_BUCKET, Prefix=f"uploads-{tmp_path.name}/").get("Contents", []):
                try:  # deleted by the runner since the listing: gone
                    found[o["Key"]] = s3.get_object(Bucket=S3_BUCKET, Key=o["Key"])["Body"].read()
                except s3.exceptions.NoSuchKey:
                    pass
            return found
    else:
        blob_url = str(tmp_path / "blobs")

        def stored() -> dict[str, bytes]:
            found = {}
            for path in (tmp_path / "blobs").iterdir():
                try:
                    found[path.name] = path.read_bytes()
                except FileNotFoundError:
                    pass
            return found

    upload = b"RIFF" + bytes(range(256)) * 40
    gate, received = asyncio.Event(), []

    class GatedAudio:
        async def from_url(self, url):
            raise AssertionError("an upload is not fetched by URL")

        async def from_bytes(self, data):
            raise AssertionError("a job's upload is read from the blob store by AudioFetch")

        async def from_blob(self, url):
            fs, path = fsspec.core.url_to_fs(url)
            received.append(fs.cat_file(path))
            await gate.wait()
            return AUDIO

    store = SqlJobStore(f"sqlite:///{tmp_path / 'jobs.sqlite3'}")
    runner = JobRunner(Settings(data_dir=tmp_path / "data", blob_url=blob_url), store, GatedAudio(),
                       TranscriptionFlow(FakeRecognizer(), FakeSpeakers()), meter_for=lambda key_id: FakeMeter())

    audio = upload
    if given == "stored":
        from pipeline.service.blobs import BlobStore

        writer = BlobStore(blob_url).writer()
        writer.write(upload)
        audio = writer.close()

    async def scenario():
        accepted = await runner.submit(JobRequest("key_a", ListenParams(), audio=audio))
        kept = await asyncio.to_thread(stored)  # what the client's 202 stands on
        job = store.get(accepted["job_id"])
        while not received:
            await asyncio.sleep(0.02)
        gate.set()
        while store.get(job.job_id).state != COMPLETED:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0)  # the upload is dropped right after the finish is recorded
        for _ in range(100):
            if not await asyncio.to_thread(stored):
                break
            await asyncio.sleep(0.02)
        return kept, job, await asyncio.to_thread(stored)

    kept, job, left = asyncio.run(scenario())
    assert list(kept.values()) == [upload]
    assert job.request["audio_blob"].startswith("s3://" if where == "s3" else "file://")
    if given == "stored":
        assert job.request["audio_blob"] == audio.url
    assert received == [upload] and left == {}
    assert not (tmp_path / "data" / "audio").exists()  # nothing on the local disk


def test_a_stored_upload_that_makes_no_job_is_deleted(tmp_path):
    """The ingress hands an upload it wrote to the blob store over to the runner; when that request
    makes no new job (a replayed or a reused Idempotency-Key, one too long), the runner deletes it."""
    from pipeline.core.errors import InvalidParameter
    from pipeline.service.blobs import BlobStore
    from pipeline.service.job_request import JobRequest
    from pipeline.transcription.schemas import ListenParams
    from test_flow import AUDIO, FakeMeter, FakeRecognizer, FakeSpeakers

    blobs = BlobStore(str(tmp_path / "blobs"))

    def stored(content: bytes):
        writer = blobs.writer()
        writer.write(content)
        return writer.close()

    class Audio:
        async def from_blob(self, url):
            return AUDIO

    store = SqlJobStore(f"sqlite:///{tmp_path / 'jobs.sqlite3'}")
    runner = JobRunner(Settings(data_dir=tmp_path / "data", blob_url=blobs.url), store, Audio(),
                       TranscriptionFlow(FakeRecognizer(), FakeSpeakers()), meter_for=lambda key_id: FakeMeter())

    async def scenario():
        first = await runner.submit(JobRequest("key_a", ListenParams(), audio=stored(b"RIFF-a"), idempotency_key="k1"))
        replay = await runner.submit(JobRequest("key_a", ListenParams(), audio=stored(b"RIFF-a"), idempotency_key="k1"))
        with pytest.raises(InvalidParameter, match="different request"):
            await runner.submit(JobRequest("key_a", ListenParams(), audio=stored(b"RIFF-b"), idempotency_key="k1"))
        with pytest.raises(InvalidParameter, match="longer than 255"):
            await runner.submit(JobRequest("key_a", ListenParams(), audio=stored(b"RIFF-c"), idempotency_key="k" * 256))
        await runner.stop(0)
        return first, replay

    first, replay = asyncio.run(scenario())
    assert replay["job_id"] == first["job_id"]
    # The first job's upload alone, unless the job already ran (its upload is then deleted too).
    left = [p.read_bytes() for p in (tmp_path / "blobs").iterdir()]
    assert left in ([], [b"RIFF-a"])


@pytest.mark.parametrize("where", ["local", "s3"])
def test_left_over_uploads_are_swept_and_those_jobs_need_are_kept(where, tmp_path, request):
    """An ingress that dies mid-request leaves its upload in the blob store (it is otherwise deleted
    once decoded), a runner that dies after a job's end leaves the job's. The runner's sweep deletes
    uploads that no queued or running job needs, once they are older than a cut; nothing else."""
    from conftest import S3_BUCKET
    from pipeline.service.blobs import BlobStore
    from test_flow import FakeMeter, FakeRecognizer, FakeSpeakers

    if where == "s3":
        request.getfixturevalue("s3_server")
        blobs = BlobStore(f"s3://{S3_BUCKET}/sweep-{tmp_path.name}")
    else:
        blobs = BlobStore(str(tmp_path / "blobs"))

    def stored(content: bytes):
        writer = blobs.writer()
        writer.write(content)
        return writer.close()

    class NeverRuns:  # the job stays queued: its upload is needed
        async def from_blob(self, url):
            raise AssertionError("not run in this test")

    store = SqlJobStore(f"sqlite:///{tmp_path / 'jobs.sqlite3'}")
    runner = JobRunner(Settings(data_dir=tmp_path / "data", blob_url=blobs.url), store, NeverRuns(),
                       TranscriptionFlow(FakeRecognizer(), FakeSpeakers()), meter_for=lambda key_id: FakeMeter())
    queued_audio, orphan = stored(b"RIFF-job"), stored(b"RIFF-orphan")
    half_written = blobs.writer()
    half_written.write(b"RIFF-cut-off")  # an upload that never ended: a local ".part" file
    if where == "local":
        half_written._file.flush()

    async def scenario():
        # Not through submit: it would start the runner, which would claim the job.
        await runner._call(store.create, "key_a", {"params": {}, "audio_blob": queued_audio.url}, None)
        kept_while_young = await runner.sweep_uploads(older_than_s=3600)
        swept = await runner.sweep_uploads(older_than_s=-60)  # as if all were written over a minute ago
        return kept_while_young, swept

    kept_while_young, swept = asyncio.run(scenario())
    assert kept_while_young == []
    assert orphan.url in swept and queued_audio.url not in swept
    assert len(swept) == (2 if where == "local" else 1), swept  # S3 shows no object before its upload ends
    fs, _ = fsspec.core.url_to_fs(blobs.url)
    left = [p for p in fs.ls(blobs.url, detail=False, refresh=True) if "upload-" in p]
    assert [p.rsplit("/", 1)[-1] for p in left] == [queued_audio.url.rsplit("/", 1)[-1]]
    half_written.discard()
