"""Async jobs through the real app: 202, signed webhooks, retries, ownership, restarts."""

import concurrent.futures

import httpx
import pytest

from conftest import API_KEYS, KEY_WEBHOOK_SECRET, WEBHOOK_SECRET, app_args, wait_until

pytestmark = pytest.mark.serve


def job_state(api, job_id, key=API_KEYS[0]):
    return api.get(f"/v1/jobs/{job_id}", headers={"Authorization": f"Token {key}"}).json()


def submit(api, receiver, hook_path, **kwargs):
    kwargs.setdefault("params", {})
    kwargs["params"] = {**kwargs["params"], "callback_url": receiver.url(hook_path)}
    r = api.post("/v1/listen", **kwargs)
    assert r.status_code == 202, r.text
    body = r.json()
    assert set(body) == {"job_id", "status"} and body["status"] == "processing" and body["job_id"].startswith("job_")
    return body["job_id"]


def test_job_is_delivered_signed_and_visible_to_its_owner_only(api, receiver, clips):
    job_id = submit(api, receiver, "/hook/basic", files={"audio": clips["beckett"].path.read_bytes()}, params={"timestamps": "true"})
    [payload] = wait_until(lambda: receiver.delivered("/hook/basic"), 120, what="the webhook")
    assert payload["job_id"] == job_id and payload["status"] == "completed"
    assert payload["result"]["text"].startswith("Ever tried") and payload["result"]["words"]
    assert receiver.bad_signatures == 0
    state = wait_until(lambda: (s := job_state(api, job_id))["delivery"]["state"] == "delivered" and s, 30, what="delivered")
    assert state["status"] == "completed" and state["result"] == payload["result"]
    assert state["delivery"]["attempts"] == 1
    other = api.get(f"/v1/jobs/{job_id}", headers={"Authorization": f"Token {API_KEYS[1]}"})
    assert other.status_code == 404 and other.json()["code"] == "NOT_FOUND"
    assert api.get("/v1/jobs/job_doesnotexist").status_code == 404
    assert httpx.get(f"{api.base_url}/v1/jobs/{job_id}").status_code == 401


def test_a_key_with_its_own_secret_signs_with_it_and_no_secret_leaks(api, serve_app, clips):
    import base64
    import json
    from pathlib import Path

    import ray
    from ray import serve
    from standardwebhooks import WebhookVerificationError

    from pipeline.service.webhooks import webhook_signer
    from servers import WebhookReceiver

    second = {"Authorization": f"Token {API_KEYS[1]}"}
    with WebhookReceiver(KEY_WEBHOOK_SECRET) as own:
        r = api.post("/v1/listen", files={"audio": clips["fox"].path.read_bytes()},
                     params={"callback_url": own.url("/own")}, headers=second)
        assert r.status_code == 202, r.text
        wait_until(lambda: own.delivered("/own"), 120, what="the webhook")
        assert own.bad_signatures == 0
        _, headers, body = own.attempts[-1]
    with pytest.raises(WebhookVerificationError):  # the global secret cannot forge key 2's deliveries
        webhook_signer(WEBHOOK_SECRET).verify(body, headers)

    # No secret anywhere the service shows or writes: error bodies, metrics, describe(), logs.
    secrets = [WEBHOOK_SECRET, KEY_WEBHOOK_SECRET, *API_KEYS]
    secrets += [base64.b64decode(s.removeprefix("whsec_")).decode() for s in (WEBHOOK_SECRET, KEY_WEBHOOK_SECRET)]
    seen = [api.post("/v1/listen", json={"url": "http://127.0.0.2/a.wav"}, params={"callback_url": "ftp://x/"}).text,
            api.post("/v1/listen", content=b"not audio", headers={**second, "Content-Type": "audio/wav"}).text,
            httpx.get(f"{serve_app}/metrics").text]
    for name in ("Ingress", "AudioFetch", "ASR", "Diarization", "Accounting", "Jobs"):
        seen.append(json.dumps(serve.get_deployment_handle(name, app_name="hark").describe.remote().result(timeout_s=30)))
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    files = [p for p in logs.rglob("*") if p.is_file()]
    assert any("Jobs" in p.name for p in files)  # the replicas' logs are there to be read
    seen += [p.read_text(errors="replace") for p in files]
    leaked = [(s, i) for s in secrets for i, text in enumerate(seen) if s in text]
    assert leaked == []


def test_receiver_failing_twice_gets_it_once_with_one_webhook_id(api, receiver, clips):
    receiver.fail_first["/hook/flaky"] = 2
    job_id = submit(api, receiver, "/hook/flaky", files={"audio": clips["fox"].path.read_bytes()})
    wait_until(lambda: receiver.delivered("/hook/flaky"), 120, what="the webhook")
    attempts = [h for p, h, _ in receiver.attempts if p == "/hook/flaky"]
    assert len(attempts) == 3 and len({h["webhook-id"] for h in attempts}) == 1
    assert attempts[0]["webhook-id"] == f"msg_{job_id}"
    assert len(receiver.delivered("/hook/flaky")) == 1
    state = wait_until(lambda: (s := job_state(api, job_id))["delivery"]["state"] == "delivered" and s, 30, what="delivered")
    assert state["delivery"]["attempts"] == 3


def test_unreachable_receiver_leaves_the_job_completed_with_delivery_failed(api, clips):
    r = api.post("/v1/listen", files={"audio": clips["fox"].path.read_bytes()}, params={"callback_url": "http://127.0.0.1:9/hook"})
    assert r.status_code == 202
    job_id = r.json()["job_id"]
    state = wait_until(lambda: (s := job_state(api, job_id))["delivery"]["state"] == "failed" and s, 120, what="delivery to give up")
    assert state["status"] == "completed" and state["result"]["text"]
    assert state["delivery"]["attempts"] == 4  # webhook_max_attempts of the test app


def test_failed_transcription_is_a_failed_job(api, receiver, media_server):
    job_id = submit(api, receiver, "/hook/failed", json={"url": media_server.url("/status/404")})
    [payload] = wait_until(lambda: receiver.delivered("/hook/failed"), 60, what="the webhook")
    assert payload == {"job_id": job_id, "status": "failed", "error": payload["error"]}
    assert payload["error"]["code"] == "FETCH_FAILED" and payload["error"]["status"] == 404
    assert job_state(api, job_id)["status"] == "failed"


def test_callback_urls_are_checked_up_front(api, clips):
    audio = clips["fox"].path.read_bytes()
    r = api.post("/v1/listen", files={"audio": audio}, params={"callback_url": "http://127.0.0.2:8080/hook"})
    assert r.status_code == 403 and r.json()["code"] == "FORBIDDEN_URL"
    r = api.post("/v1/listen", files={"audio": audio}, params={"callback_url": "s3://bucket/hook"})
    assert r.status_code == 400 and r.json()["param"] == "callback_url"
    # The audio URL of a job passes the guard before the 202, not later in a failed job.
    r = api.post("/v1/listen", json={"url": "http://127.0.0.2:8080/a.wav", "callback_url": "http://127.0.0.1:9/hook"})
    assert r.status_code == 403 and r.json()["code"] == "FORBIDDEN_URL"


def test_twenty_concurrent_jobs_all_delivered_once(api, receiver, clips):
    audio = clips["fox"].path.read_bytes()
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        job_ids = list(pool.map(lambda i: submit(api, receiver, f"/hook/many/{i}", files={"audio": audio}), range(20)))
    assert len(set(job_ids)) == 20

    def all_delivered():
        return all(receiver.delivered(f"/hook/many/{i}") for i in range(20))

    wait_until(all_delivered, 300, interval_s=1, what="20 deliveries")
    for i, job_id in enumerate(job_ids):
        [payload] = receiver.delivered(f"/hook/many/{i}")
        assert payload["job_id"] == job_id and payload["status"] == "completed"
        assert "quick brown fox" in payload["result"]["text"].lower()


def test_idempotency_key_returns_the_same_job_without_running_twice(api, receiver, clips):
    audio = clips["meeting"].path.read_bytes()
    headers = {"Idempotency-Key": "idem-async-1"}
    first = submit(api, receiver, "/hook/idem", files={"audio": audio}, headers=headers)
    second = submit(api, receiver, "/hook/idem", files={"audio": audio}, headers=headers)
    assert first == second
    wait_until(lambda: receiver.delivered("/hook/idem"), 120, what="the webhook")
    # A replay after completion answers as the first answer did (submit() checks the 202 body).
    assert submit(api, receiver, "/hook/idem", files={"audio": audio}, headers=headers) == first
    r = api.post("/v1/listen", files={"audio": clips["fox"].path.read_bytes()}, headers=headers,
                 params={"callback_url": receiver.url("/hook/idem")})
    assert r.status_code == 400 and r.json()["param"] == "Idempotency-Key"  # same key, other body
    # Synchronous requests too: the second answer is the first one, not a new transcription.
    sync_headers = {"Idempotency-Key": "idem-sync-1"}
    a = api.post("/v1/listen", files={"audio": audio}, headers=sync_headers)
    b = api.post("/v1/listen", files={"audio": audio}, headers=sync_headers)
    assert a.status_code == b.status_code == 200
    assert a.json() == b.json() and a.json()["request_id"].startswith("req_")
    assert len(receiver.delivered("/hook/idem")) == 1


def _jobs_replicas() -> set[str]:
    """The actor names of the Jobs deployment's live replicas (from the GCS: the suite's Ray
    runs no dashboard, so no state API)."""
    import ray

    return {actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)
            if actor["namespace"] == "serve" and actor["name"].startswith("SERVE_REPLICA::hark#Jobs#")}


def _delivered_once(api, receiver, job_id, path) -> dict:
    """The job's one webhook, once its delivery is final: completed, delivered by one attempt."""
    [payload] = wait_until(lambda: receiver.delivered(path), 180, what="the webhook")
    state = wait_until(lambda: (s := job_state(api, job_id))["delivery"]["state"] == "delivered" and s, 30, what="delivered")
    assert payload["job_id"] == job_id and payload["status"] == "completed"
    assert payload["result"]["text"].startswith("Ever tried")
    assert state["status"] == "completed" and state["delivery"]["attempts"] == 1
    assert len([p for p, _, _ in receiver.attempts if p == path]) == 1
    return payload


def test_a_killed_jobs_replica_loses_no_job(api, receiver, media_server, clips):
    """Replica death: the Jobs replica running a job is killed (no shutdown, as an OOM kill or a
    crash ends it); Serve starts another, which takes the job over when its lease runs out."""
    import ray

    media_server.files["killed.wav"] = clips["beckett"].path.read_bytes()
    before = media_server.holding
    job_id = submit(api, receiver, "/hook/killed", json={"url": media_server.url("/slowfile/killed.wav?seconds=4")})
    wait_until(lambda: media_server.holding > before, 30, what="the job to start downloading")
    [victim] = _jobs_replicas()
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    _delivered_once(api, receiver, job_id, "/hook/killed")
    assert victim not in _jobs_replicas()


def test_job_survives_a_restart_of_the_application(api, receiver, media_server, clips, data_dir):
    """The app is torn down while the job downloads; the new app picks the job up and delivers.
    (A RayService upgrade replaces the whole cluster so; ``serve deploy`` of a changed config
    to a running app is tests/test_multinode.py's upgrade test.)"""
    from ray import serve

    from deployments.app import build_app

    media_server.files["restart.wav"] = clips["beckett"].path.read_bytes()
    before = media_server.holding
    job_id = submit(api, receiver, "/hook/restart", json={"url": media_server.url("/slowfile/restart.wav?seconds=4")})
    wait_until(lambda: media_server.holding > before, 30, what="the job to start downloading")
    serve.delete("hark")
    serve.run(build_app(app_args(data_dir)), name="hark", route_prefix="/")
    wait_until(lambda: httpx.get(f"{api.base_url}/ready", timeout=10).status_code == 200, 120, what="/ready after restart")
    [payload] = wait_until(lambda: receiver.delivered("/hook/restart"), 180, what="the webhook after restart")
    assert payload["job_id"] == job_id and payload["status"] == "completed"
    assert payload["result"]["text"].startswith("Ever tried")
    state = job_state(api, job_id)
    assert state["status"] == "completed"
