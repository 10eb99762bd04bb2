"""Hark on a multi-node Ray cluster on this machine (tests/multinode_cluster.py: a head and two
worker nodes, each with its own raylet and object store), deployed with ``serve deploy``.

- The nodes run in the environment of a Secret-like env file, sourced before they start (as
  cluster/README.md says for `ray up`); the shell that runs ``serve deploy`` has no ``HARK_*``
  variable, and the app still takes its keys, database and blob store from the nodes.
- The repo's serve_config.yaml is deployed with the test cluster's placement added: the small
  deployments on the head, ASR and Jobs on the workers (one slot each per worker), ASR
  autoscaling quickly. Audio is fetched and decoded on the head and transcribed on a worker.
- Jobs share a real PostgreSQL database and an S3 blob store (moto), as on a real cluster; the
  worker that runs jobs is killed mid-load.
"""

from __future__ import annotations

import json
import logging
import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import S3_BUCKET, WEBHOOK_SECRET, free_port, wait_until
from textnorm import wer

# The cluster and the app start in the first test's setup: minutes on 2 busy cores.
pytestmark = [pytest.mark.multinode, pytest.mark.timeout(900)]
log = logging.getLogger(__name__)  # the measured times: pytest -o log_cli=true --log-cli-level=INFO

ROOT = Path(__file__).parent.parent
KEY = "multinode-key"
START_TIMEOUT_S = 300
# The GCS declares a node dead after 3 missed health checks 1 s apart (Ray's default: 5 checks,
# 3 s apart), so the test waits seconds, not tens of seconds, for Ray to notice the lost node.
NODE_DEATH_DETECTION = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}
ON_HEAD = {"resources": {"head": 0.01}}
# What the test cluster adds to the repo's serve_config.yaml: placement, and ASR autoscaling
# within seconds instead of the half-minute a real load wants.
PLACEMENT = {
    "Ingress": ON_HEAD,
    "AudioFetch": ON_HEAD,
    "Accounting": ON_HEAD,
    "Diarization": ON_HEAD,
    "Jobs": {"num_replicas": 2, "resources": {"jobs_slot": 1}},
    "ASR": {
        "resources": {"asr_slot": 1},
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
                               "upscale_delay_s": 1, "downscale_delay_s": 3, "metrics_interval_s": 0.5,
                               "look_back_period_s": 2},
    },
}
# Not secrets: these go into the config's args, as an operator's would.
APP_SETTINGS = {
    "url_allowlist": ["127.0.0.1/32"],
    # Short, so that the jobs of a lost node run again soon; not shorter: the suite runs beside the
    # whole rest of CI's, its replicas at Ray's worker nice 15 on 2 cores, and CI saw a Jobs replica
    # miss its renewals long enough to lose a 3 s lease and then a 6 s one ("lease lost while
    # running" in its log, with the renewals on a thread of their own).
    "jobs_lease_s": 15.0,
    "asr": {"model": "whisper-tiny.en"},  # the cheaper of the two bundled models
    "webhook_backoff_base_s": 0.2,
    "webhook_backoff_max_s": 1.0,
}


def deploy_config(port: int) -> dict:
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    config["http_options"].update(host="127.0.0.1", port=port)
    [app] = config["applications"]
    app["args"]["settings"].update(APP_SETTINGS)
    for deployment in app["deployments"]:
        extra = dict(PLACEMENT[deployment["name"]])
        resources = extra.pop("resources")
        options = deployment.setdefault("ray_actor_options", {"num_cpus": 0.25})
        options["resources"] = resources
        deployment.update(extra)
    if "Diarization" not in {d["name"] for d in app["deployments"]}:
        app["deployments"].append({"name": "Diarization", "ray_actor_options": {"num_cpus": 0.25, **ON_HEAD}})
    return config


def closest(clips, names: list[str], text: str) -> str:
    """Which of the clips ``names`` a transcript is of (the nearest by word error rate): each
    answer must carry its own audio's words, not another request's."""
    return min(names, key=lambda name: wer(clips[name].text, text))


def without_settings(env: dict) -> dict:
    return {k: v for k, v in env.items() if not k.startswith(("HARK_", "AWS_"))}


class RunningCluster:
    """The helper process that holds the cluster, and the app's address."""

    def __init__(self, workdir: Path, env_file: Path, dashboard_port: int) -> None:
        env = {**without_settings(os.environ), "PYTHONPATH": str(ROOT), "RAY_TMPDIR": str(workdir),
               "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", **NODE_DEATH_DETECTION}
        helper = Path(__file__).parent / "multinode_cluster.py"
        self.log_file = open(workdir / "cluster.log", "w")  # noqa: SIM115 - closed in close()
        # The node environment: the env file sourced before the nodes start (cluster/README.md).
        self.process = subprocess.Popen(
            ["bash", "-c", f'set -a && . "{env_file}" && set +a && exec "{sys.executable}" "{helper}" '
                           f"{dashboard_port} 80"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log_file, text=True, env=env, cwd=workdir,
        )
        self.workdir = workdir
        self.info = self._answer(START_TIMEOUT_S)

    def _answer(self, timeout_s: float) -> dict:
        ready, _, _ = select.select([self.process.stdout], [], [], timeout_s)
        line = self.process.stdout.readline() if ready else ""
        if not line:
            self.process.kill()
            raise AssertionError(f"no answer from the cluster in {timeout_s} s:\n"
                                 f"{(self.workdir / 'cluster.log').read_text()[-4000:]}")
        return json.loads(line)

    def ask(self, command: str) -> dict:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self._answer(60)

    def asr(self) -> tuple[dict, list[str]]:
        """ASR's replica counts by state (from ``serve.status()``) and the nodes of its live replicas."""
        status = self.ask("status")
        counts = status["deployments"].get("ASR", {}).get("replicas", {})
        return counts, sorted(r["node"] for r in status["replicas"] if r["deployment"] == "ASR")

    def close(self) -> None:
        self.process.stdin.close()
        try:
            self.process.wait(timeout=120)
        finally:
            self.log_file.close()


@pytest.fixture(scope="module")
def cluster(postgres, s3_server):
    workdir = Path(tempfile.mkdtemp(prefix="hkmn-"))  # short: Ray's socket paths live under it
    env_file = workdir / "hark.env"
    database_url = postgres.new_database()
    env_file.write_text("\n".join([
        f"HARK_LICENSE_KEYS={KEY}",
        f"HARK_WEBHOOK_SECRET={WEBHOOK_SECRET}",
        f"HARK_DATABASE_URL={database_url}",
        f"HARK_BLOB_URL=s3://{S3_BUCKET}/multinode-uploads",
        f"HARK_DATA_DIR={workdir / 'data'}",
        *(f"{k}={v}" for k, v in os.environ.items() if k.startswith("AWS_")),
    ]) + "\n")
    started = time.monotonic()
    try:
        running = RunningCluster(workdir, env_file, free_port())
        running.database_url = database_url
        log.info(f"multi-node cluster up in {time.monotonic() - started:.1f} s")
        yield running
        running.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def serve_deploy(cluster: RunningCluster, config: dict, path: Path) -> None:
    """``serve deploy`` of ``config`` from a shell without any ``HARK_*`` variable, then wait
    until Serve reports the app running."""
    path.write_text(yaml.safe_dump(config))
    serve = Path(sys.executable).parent / "serve"
    done = subprocess.run([str(serve), "deploy", str(path), "--address", cluster.info["dashboard"]],
                          env=without_settings(os.environ), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr

    def running():
        status = cluster.ask("status")
        assert status["app"] != "DEPLOY_FAILED", status["message"]
        return status["app"] == "RUNNING"

    wait_until(running, 300, interval_s=1, what="the deployed app to run")


def new_versions(cluster) -> Counter:
    """How often Serve's controller deployed a new version of each deployment (its log line
    "Deploying new version of Deployment(name='X', ...)"): an autoscaled deployment changes its
    replicas under load, so which replicas live says nothing of whether it was redeployed."""
    found: Counter = Counter()
    for log_file in cluster.workdir.glob("**/logs/serve/controller_*.log"):
        found.update(re.findall(r"Deploying new version of Deployment\(name='(\w+)'", log_file.read_text()))
    return found


def replica_log_lines(cluster, deployment: str, pattern: str) -> list[str]:
    """The lines of ``deployment``'s replica logs (every node's) that match ``pattern``: what a
    failed check shows of why."""
    return [line for log_file in sorted(cluster.workdir.glob(f"**/logs/serve/replica_*{deployment}*.log"))
            for line in log_file.read_text(errors="replace").splitlines() if re.search(pattern, line)]


def replica_names(status: dict) -> dict[str, set[str]]:
    names: dict[str, set[str]] = {}
    for replica in status["replicas"]:
        names.setdefault(replica["deployment"], set()).add(replica["name"])
    return names


@pytest.fixture(scope="module")
def app(cluster, tmp_path_factory):
    """The app, deployed by ``serve deploy`` from a shell without any ``HARK_*`` variable."""
    port = free_port()
    started = time.monotonic()
    serve_deploy(cluster, deploy_config(port), tmp_path_factory.mktemp("multinode") / "serve_config.yaml")
    base = f"http://127.0.0.1:{port}"
    wait_until(lambda: httpx.get(f"{base}/ready", timeout=10).status_code == 200, 60, what="/ready")
    log.info(f"serve deploy to running in {time.monotonic() - started:.1f} s")
    return base


def test_serve_deploy_builds_the_app_with_the_settings_of_the_nodes(app, clips):
    audio = clips["fox"].path.read_bytes()
    r = httpx.post(f"{app}/v1/listen", files={"audio": audio}, headers={"Authorization": f"Token {KEY}"}, timeout=120)
    assert r.status_code == 200, r.text
    assert wer(clips["fox"].text, r.json()["text"]) < 0.5, r.text
    r = httpx.post(f"{app}/v1/listen", files={"audio": audio}, timeout=30)
    assert r.status_code == 401


def test_requests_cross_nodes_and_asr_scales_up_under_load_and_back_down(app, cluster, clips, media_server):
    status = cluster.ask("status")
    nodes_of = {}
    for replica in status["replicas"]:
        nodes_of.setdefault(replica["deployment"], set()).add(replica["node"])
    # Audio is fetched and decoded on the head; ASR transcribes it on a worker node.
    assert nodes_of["AudioFetch"] == nodes_of["Ingress"] == {"head"}
    assert nodes_of["ASR"] <= {"a", "b"} and nodes_of["Jobs"] == {"a", "b"}
    assert cluster.asr()[0] == {"RUNNING": 1}

    media_server.files["mn-stella.wav"] = clips["stella"].path.read_bytes()
    upload = clips["fox"].path.read_bytes()
    headers = {"Authorization": f"Token {KEY}"}
    seen: list[tuple[dict, list[str]]] = []

    def one(i: int) -> str:
        if i % 2:
            r = httpx.post(f"{app}/v1/listen", json={"url": media_server.url("/files/mn-stella.wav")}, headers=headers,
                           timeout=120)
        else:
            r = httpx.post(f"{app}/v1/listen", files={"audio": upload}, headers=headers, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["text"].lower()

    def scaled_up():
        seen.append(cluster.asr())
        return seen[-1][0].get("RUNNING", 0) == 2

    started = time.monotonic()
    texts = []
    with ThreadPoolExecutor(6) as pool:
        # Load in rounds until Serve reports two running ASR replicas.
        while True:
            texts += list(pool.map(one, range(6)))
            if scaled_up():
                break
            assert time.monotonic() - started < 120, f"ASR never scaled up: {seen}"
    up_s = time.monotonic() - started
    assert seen[-1][1] == ["a", "b"]  # one replica per worker node
    assert [closest(clips, ["fox", "stella"], text) for text in texts] == ["fox", "stella"] * (len(texts) // 2), texts
    wait_until(lambda: (seen.append(cluster.asr()) or seen[-1][0] == {"RUNNING": 1}), 60, interval_s=0.5,
               what="ASR to scale back down")
    log.info(f"ASR scaled up after {up_s:.1f} s of load ({len(texts)} requests), down "
             f"{time.monotonic() - started - up_s:.1f} s after it")


JOB_CLIPS = ["fox", "meeting", "speech", "weather"]


def submit_jobs(app: str, clips, media_server, hook: str, count: int, prefix: str,
                upload_every: int = 0) -> dict[str, str]:
    """``count`` async jobs of the job clips in turn, by URL (every ``upload_every``-th as an
    upload); their clip names by job id."""
    for name in JOB_CLIPS:
        media_server.files[f"{prefix}-{name}.wav"] = clips[name].path.read_bytes()
    expected = {}
    with httpx.Client(base_url=app, headers={"Authorization": f"Token {KEY}"}, timeout=60) as client:
        for i in range(count):
            name = JOB_CLIPS[i % len(JOB_CLIPS)]
            if upload_every and i % upload_every == 0:
                r = client.post("/v1/listen", files={"audio": clips[name].path.read_bytes()}, params={"callback_url": hook})
            else:
                r = client.post("/v1/listen", json={"url": media_server.url(f"/files/{prefix}-{name}.wav")},
                                params={"callback_url": hook})
            assert r.status_code == 202, r.text
            expected[r.json()["job_id"]] = name
    return expected


def delivered_once(store, receiver, clips, expected: dict[str, str], path: str) -> list:
    """Wait until every job is delivered; each completed, with its own clip's words, and was
    delivered exactly once. The jobs as the store has them then."""
    def all_delivered():
        done = [store.get(job_id) for job_id in expected]
        return all(job.delivery_state == "delivered" for job in done) and done

    finished = wait_until(all_delivered, 180, interval_s=0.5, what="every job to complete and be delivered")
    deliveries = [(headers["webhook-id"], payload) for p, headers, payload in receiver.deliveries if p == path]
    assert sorted(webhook_id for webhook_id, _ in deliveries) == sorted(f"msg_{job_id}" for job_id in expected)
    for _, payload in deliveries:
        assert payload["status"] == "completed"
        assert closest(clips, JOB_CLIPS, payload["result"]["text"]) == expected[payload["job_id"]], payload
    assert all(job.state == "completed" for job in finished)
    return finished


def test_an_upgrade_replaces_only_what_changed_and_loses_no_job(app, cluster, clips, media_server, receiver,
                                                              tmp_path):
    """App upgrade in place: ``serve deploy`` of the config with a new version of Jobs (its
    ray_actor_options changed) while jobs run. Serve replaces the Jobs replicas only; ASR and the
    rest go on running; every accepted job completes, runs once and is delivered once."""
    from pipeline.service.jobs import SqlJobStore

    store = SqlJobStore(cluster.database_url)
    expected = submit_jobs(app, clips, media_server, receiver.url("/upgrade"), 8, "up")
    wait_until(lambda: any(store.get(job_id).state == "running" for job_id in expected), 120, interval_s=0.05,
               what="a job to run")
    before = replica_names(cluster.ask("status"))
    versions_before = new_versions(cluster)
    config = deploy_config(int(app.rsplit(":", 1)[1]))
    [jobs_config] = [d for d in config["applications"][0]["deployments"] if d["name"] == "Jobs"]
    jobs_config["ray_actor_options"]["num_cpus"] += 0.01  # a new version of Jobs: its replicas restart
    started = time.monotonic()
    serve_deploy(cluster, config, tmp_path / "upgraded.yaml")

    def upgraded():
        now = replica_names(cluster.ask("status"))
        return len(now.get("Jobs", ())) == 2 and now["Jobs"].isdisjoint(before["Jobs"]) and now

    after = wait_until(upgraded, 120, interval_s=0.5, what="new Jobs replicas")
    upgraded_s = time.monotonic() - started
    # The deployments of a fixed size run on as they were. ASR autoscales under this load (CI saw
    # its one replica swapped by an upscale and a downscale), so of ASR and of all: Serve deployed a
    # new version of Jobs and of nothing else.
    fixed = ("Ingress", "AudioFetch", "Accounting", "Diarization")
    assert {name: after[name] for name in fixed} == {name: before[name] for name in fixed}
    assert new_versions(cluster) - versions_before == Counter(Jobs=1)

    finished = delivered_once(store, receiver, clips, expected, "/upgrade")
    # The old Jobs replicas finished their runs in the drain or handed them back uncounted: no job
    # waited out a lease and ran twice.
    assert [job.run_attempts for job in finished] == [1] * len(expected), "\n".join(replica_log_lines(
        cluster, "Jobs", r"lease lost|died|stopped|failed|renew"))
    log.info(f"upgrade: new Jobs replicas {upgraded_s:.1f} s after serve deploy, no other deployment redeployed; "
             f"{len(expected)} jobs delivered once each, none run twice")


def test_losing_a_worker_node_mid_load_completes_every_job_once(app, cluster, clips, media_server, receiver, postgres):
    import sqlalchemy as sa

    from pipeline.service.db import jobs
    from pipeline.service.jobs import SqlJobStore

    store = SqlJobStore(cluster.database_url)
    started = time.monotonic()
    expected = submit_jobs(app, clips, media_server, receiver.url("/multinode"), 12, "mn", upload_every=3)

    def running_owners():
        with store.engine.connect() as conn:
            rows = conn.execute(sa.select(jobs.c.job_id, jobs.c.lease_owner).where(jobs.c.state == "running")).all()
        return rows if len({owner for _, owner in rows}) == 2 else None

    # Both workers' runners hold jobs: the one on the ASR replica's node is lost.
    submitted_s = time.monotonic() - started
    running = wait_until(running_owners, 120, interval_s=0.05, what="both runners to run jobs")
    busy_s = time.monotonic() - started
    _, asr_nodes = cluster.asr()
    victim = asr_nodes[0]
    survivor = ({"a", "b"} - {victim}).pop()
    assert cluster.ask(f"remove {victim}") == {"removed": victim}
    removed_at = time.monotonic()
    # Runners go on claiming jobs until the node is gone (``remove`` answers once every process of
    # it is dead): what the lost one held then is still "running" under its lease, beside the
    # snapshot above.
    with store.engine.connect() as conn:
        held = {job_id for (job_id,) in conn.execute(sa.select(jobs.c.job_id).where(jobs.c.state == "running"))}
    running_at_removal = {job_id for job_id, _ in running} | held

    finished = delivered_once(store, receiver, clips, expected, "/multinode")
    recovered_s = time.monotonic() - removed_at
    # Only jobs the node's loss reached ran again: those running when it went, and any whose call
    # met one of its replicas before Serve routed around them (the runner logs that death). A job
    # rerun for any other reason (a lease lost by a live runner) fails this.
    reruns = {job.job_id for job in finished if job.run_attempts > 1}
    lines = replica_log_lines(cluster, "Jobs", r"a worker it needed died|lease lost|failed")
    met_the_loss = {job_id for job_id in reruns if any(f"job {job_id}: a worker it needed died" in line
                                                       for line in lines)}
    assert reruns <= running_at_removal | met_the_loss, "\n".join(lines)
    # What is left runs on the surviving worker only.
    status = cluster.ask("status")
    assert {r["node"] for r in status["replicas"] if r["deployment"] in ("ASR", "Jobs")} == {survivor}
    log.info(f"{len(expected)} jobs submitted in {submitted_s:.1f} s, both runners busy at {busy_s:.1f} s; "
             f"node {victim} removed with {len(running_at_removal)} jobs running; all {len(expected)} jobs "
             f"completed and delivered {recovered_s:.1f} s later, {len(reruns)} run again "
             f"({len(reruns - running_at_removal)} of them met a replica of the lost node later)")
