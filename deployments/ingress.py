"""HTTP ingress: routes, auth and admission, then the core's flow, job runner and stream server.

What a request means lives in ``pipeline``: bodies (``service.upload``), options
(``transcription.schemas``), the flow (``transcription.flow``), jobs (``service.runner``), streams
(``streaming.server``). This module adapts FastAPI and the deployment handles to them.
"""

import asyncio
import contextvars
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request, Response, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments import adopt_serve_logging, replica_info
from deployments.handles import HandleAudio, HandleMeter, HandleRecognizer, HandleSpeakers, call, unwrap
from pipeline.audio.fetch import UrlGuard
from pipeline.core.errors import HarkError, InvalidParameter, MissingParameter
from pipeline.core.settings import Settings
from pipeline.service.auth import KeyRing
from pipeline.service.runner import JobRequest, refuse_unrunnable
from pipeline.service.upload import read_listen_input
from pipeline.streaming.limits import StreamLimits
from pipeline.streaming.server import ChannelClosed, StreamServer
from pipeline.transcription.flow import TranscriptionFlow
from pipeline.transcription.schemas import ListenParams

logger = logging.getLogger("ray.serve")

app = FastAPI(title="Hark", version="0.1.0", description="Self-hosted speech-to-text.")
LISTEN_ROUTE = "/v1/listen"


def _error_response(err: HarkError) -> JSONResponse:
    return JSONResponse(err.to_body(), status_code=err.status, headers=err.headers())


@app.exception_handler(HarkError)
async def _hark_error(request: Request, err: HarkError) -> JSONResponse:
    return _error_response(err)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED"}.get(exc.status_code, "HTTP_ERROR")
    return JSONResponse({"error": str(exc.detail), "code": code}, status_code=exc.status_code)


@dataclass
class _Answer:
    status: int
    body: dict
    headers: dict[str, str] = field(default_factory=dict)
    audio_s: float = 0.0  # decoded audio transcribed, for the metrics


class _WebSocketChannel:
    """Starlette's WebSocket as the core's ``Channel``."""

    def __init__(self, ws: WebSocket) -> None:
        self._ws = ws

    async def receive(self) -> dict[str, Any]:
        try:
            message = await self._ws.receive()
        except WebSocketDisconnect:
            raise ChannelClosed from None
        if message["type"] == "websocket.disconnect":
            raise ChannelClosed
        return message

    async def send_json(self, message: dict[str, Any]) -> None:
        try:
            await self._ws.send_json(message)
        except WebSocketDisconnect:
            raise ChannelClosed from None

    async def close(self, code: int, reason: str = "") -> None:
        await self._ws.close(code=code, reason=reason)


@serve.deployment(
    name="Ingress",
    max_ongoing_requests=200,
    ray_actor_options={"num_cpus": 0.1},
)
@serve.ingress(app)
class Ingress:
    def __init__(
        self,
        settings: Settings,
        fetch: DeploymentHandle,
        asr: DeploymentHandle,
        diarization: DeploymentHandle,
        accounting: DeploymentHandle,
        jobs: DeploymentHandle,
    ) -> None:
        adopt_serve_logging()
        self._settings = settings
        self._keys = KeyRing(settings.license_keys)
        if not len(self._keys):
            logger.warning("No license keys configured: every request will be refused (HARK_LICENSE_KEYS)")
        self._retry = retry = settings.retry_after_s
        self._guard = UrlGuard.from_settings(settings.allow_private_urls, settings.url_allowlist)
        self._audio = HandleAudio(fetch, retry)
        self._flow = TranscriptionFlow(HandleRecognizer(asr, retry), HandleSpeakers(diarization, retry))
        self._streams = StreamServer(self._flow, StreamLimits.from_settings(settings))
        self._accounting = accounting
        self._asr = asr
        self._jobs = jobs
        self._background: set[asyncio.Task] = set()

    @app.get("/health")
    async def health(self) -> dict:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready(self) -> JSONResponse:
        """Ready once every deployment of this app has a running replica, i.e. one whose
        constructor (which loads its model) has returned and which passes its health checks.

        Asked of the Serve controller, never of the deployments themselves: a call to ASR waits
        in its queue behind transcriptions, and a busy service is not an unready one.
        """
        app_name = serve.get_replica_context().app_name
        try:
            # serve.status() blocks on a call to the controller: off the event loop.
            status = await asyncio.wait_for(asyncio.to_thread(serve.status), timeout=5)
            deployments = status.applications[app_name].deployments
        except Exception as exc:  # noqa: BLE001 - no answer from the controller is no readiness
            logger.warning("/ready: no status from the Serve controller: %r", exc)
            return JSONResponse({"status": "loading"}, status_code=503)
        if deployments and all(d.replica_states.get("RUNNING", 0) > 0 for d in deployments.values()):
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": "loading"}, status_code=503)

    @app.get("/metrics")
    async def prometheus(self) -> Response:
        text = await self._accounting.metrics_text.remote()
        text += await self._asr.metrics_text.remote()  # one ASR replica's scheduler, labelled by replica
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    @app.post(LISTEN_ROUTE)
    async def listen(self, request: Request) -> JSONResponse:
        started = time.perf_counter()
        audio_s = 0.0
        try:
            answer = await self._listen(request)
            response = JSONResponse(answer.body, status_code=answer.status, headers=answer.headers)
            code, audio_s = "", answer.audio_s
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure becomes an API error
            err = unwrap(exc, self._retry)
            response, code = _error_response(err), err.code
        self._detached(
            self._accounting.record.remote, LISTEN_ROUTE, response.status_code, code, time.perf_counter() - started, audio_s,
        )
        return response

    @app.get("/v1/jobs/{job_id}")
    async def job(self, job_id: str, request: Request) -> JSONResponse:
        key_id = self._keys.authenticate(request.headers.get("authorization"))
        try:
            return JSONResponse(await call(self._jobs.get.remote(job_id, key_id), self._retry))
        except HarkError as err:
            return _error_response(err)

    async def _listen(self, request: Request) -> _Answer:
        key_id = self._keys.authenticate(request.headers.get("authorization"))
        # Admission first: a refused request costs nothing, not even reading its body.
        lease = await self._accounting.admit.remote(key_id)
        try:
            answer = await self._transcribe(request, key_id)
        finally:
            self._detached(self._accounting.release.remote, lease.lease_id, key_id)
        answer.headers.update(lease.headers)
        return answer

    def _detached(self, method, *args) -> None:
        """Call a handle method outside this request's context.

        When a client hangs up, Serve cancels the request and every handle call made in its
        context, so a release made there would be cancelled too. A task with an empty context
        is not the request's child and runs to the end. (Leases also expire as a last resort.)
        """

        async def run() -> None:
            await method(*args)

        self._background.add(task := asyncio.get_running_loop().create_task(run(), context=contextvars.Context()))
        task.add_done_callback(self._background.discard)

    async def _transcribe(self, request: Request, key_id: str) -> _Answer:
        declared = request.headers.get("content-length")
        source = await read_listen_input(
            request.headers.get("content-type"),
            request.stream(),
            content_length=int(declared) if declared and declared.isdigit() else None,
            max_bytes=self._settings.max_file_bytes,
            max_mb=self._settings.max_file_mb,
        )
        if source.url is not None and source.audio is not None:
            raise InvalidParameter("Send either a url or an audio file, not both", param="url")
        if source.url is None and source.audio is None:
            raise MissingParameter()
        params = ListenParams.parse({**request.query_params, **source.fields})
        await self._flow.check(params)
        if source.url is not None:
            self._guard.check_form(source.url)
        idempotency_key = request.headers.get("idempotency-key")
        if params.callback_url is not None or idempotency_key:
            job = JobRequest(key_id, params, url=source.url, audio=source.audio, idempotency_key=idempotency_key)
            return await self._as_job(job)
        if source.url is not None:
            audio = await self._audio.from_url(source.url)
        else:
            audio = await self._audio.from_bytes(source.audio)
        # The decoded audio is awaited before the ASR call, not chained into it: Serve counts
        # a request against max_queued_requests only when it enters the router, and a chained
        # request enters before its input exists, so a full queue would never refuse it.
        result = await self._flow.run(audio, params, request_id=f"req_{uuid.uuid4().hex}",
                                      meter=HandleMeter(self._accounting, key_id, self._retry))
        return _Answer(200, result.body, audio_s=result.transcript.duration_s)

    async def _as_job(self, job: JobRequest) -> _Answer:
        """A job: answered 202 at once with a callback_url; else (an Idempotency-Key alone)
        awaited here, so that a repeat of the same request gets the same result."""
        # getaddrinfo blocks: off the event loop.
        await asyncio.to_thread(refuse_unrunnable, job, self._guard, self._settings.webhook_secret_for(job.key_id) is not None)
        payload = await call(self._jobs.submit.remote(job), self._retry)
        if job.params.callback_url is not None:
            # A replay answers as the first request was answered; GET /v1/jobs/{id} has the rest.
            return _Answer(202, {"job_id": payload["job_id"], "status": "processing"})
        return _Answer(200, await call(self._jobs.result.remote(payload["job_id"], job.key_id), self._retry))

    @app.websocket("/v1/listen/stream")
    async def stream(self, ws: WebSocket) -> None:
        """Live transcription; see ``pipeline.streaming`` and the README's client example."""
        subprotocols = [p.strip() for p in ws.headers.get("sec-websocket-protocol", "").split(",") if p.strip()]
        # Browsers cannot set headers: they send the pair ("token", KEY) as subprotocols.
        via_protocol = len(subprotocols) == 2 and subprotocols[0].lower() == "token"
        try:
            header = ws.headers.get("authorization") or (f"Token {subprotocols[1]}" if via_protocol else None)
            key_id = self._keys.authenticate(header)
            lease = await call(self._accounting.admit.remote(key_id), self._retry)
        except HarkError as err:
            # Refused before the upgrade, with the API's status and body, as Deepgram refuses it:
            # no socket is opened for a client that may not use it.
            await ws.send_denial_response(_error_response(err))
            return
        try:
            await ws.accept(subprotocol="token" if via_protocol else None)
            # Audio received is reserved on the daily quota as it arrives, charged however the
            # stream ends.
            await self._streams.serve(_WebSocketChannel(ws), ws.query_params,
                                      meter=HandleMeter(self._accounting, key_id, self._retry))
        finally:
            self._detached(self._accounting.release.remote, lease.lease_id, key_id)

    def describe(self) -> dict:
        return replica_info(self._settings)
