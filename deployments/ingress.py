"""HTTP ingress: routes, auth and admission, then the core's flow, job runner and stream server.

What a request means lives in ``pipeline``: bodies (``service.upload``), options
(``transcription.schemas``), the flow (``transcription.flow``), jobs (``service.runner``), streams
(``streaming.server``). This module adapts FastAPI and the deployment handles to them.
"""

import asyncio
import contextvars
import functools
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, Response, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments import adopt_serve_logging, replica_info
from deployments.handles import HandleAudio, HandleMeter, HandleRecognizer, HandleSpeakers, call, unwrap
from deployments.openai_api import OpenAIRoutes
from deployments.openai_api import router as openai_router
from deployments.readiness import Readiness, app_is_running
from pipeline.audio.urls import UrlGuard
from pipeline.core.errors import HarkError, InvalidParameter, MissingParameter
from pipeline.core.settings import Settings
from pipeline.service.auth import KeyRing
from pipeline.service.job_request import JobRequest, refuse_unrunnable
from pipeline.service.blobs import BlobStore
from pipeline.service.upload import AUDIO_FIELD, HeldUpload, ListenInput, read_listen_input
from pipeline.streaming.limits import StreamLimits
from pipeline.streaming.server import ChannelClosed, StreamParams, StreamServer
from pipeline.transcription.flow import TranscriptionFlow
from pipeline.transcription.schemas import ListenParams
from pipeline.transcription.subtitles import FILE_FORMATS, parse_format, render_body, render_transcript

logger = logging.getLogger("ray.serve")

app = FastAPI(title="Hark", version="0.1.0", description="Self-hosted speech-to-text.")
app.include_router(openai_router)  # /v1/audio/transcriptions, /v1/audio/translations, /v1/models
LISTEN_ROUTE = "/v1/listen"
# The web playground: static files shipped in the package, served without a key (the page asks
# for one and sends it with each API call).
app.mount("/ui", StaticFiles(directory=Path(__file__).parent / "playground", html=True), name="playground")


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
    file: str | None = None  # the answer as a file (format=srt|vtt|text) instead of the JSON body
    file_format: str = "json"

    def response(self) -> Response:
        if self.file is None:
            return JSONResponse(self.body, status_code=self.status, headers=self.headers)
        return Response(self.file, status_code=self.status, headers=self.headers,
                        media_type=FILE_FORMATS[self.file_format])


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
class Ingress(OpenAIRoutes):
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
        # Uploads above a megabyte go there as they arrive, and AudioFetch reads them from there.
        self._blobs = BlobStore(settings.job_blob_url)
        self._flow = TranscriptionFlow(HandleRecognizer(asr, retry), HandleSpeakers(diarization, retry))
        self._streams = StreamServer(self._flow, StreamLimits.from_settings(settings),
                                     final_beam_size=settings.stream_final_beam_size or None)
        self._accounting = accounting
        self._asr = asr
        self._jobs = jobs
        self._background: set[asyncio.Task] = set()
        self._readiness = Readiness(functools.partial(app_is_running, serve.get_replica_context().app_name))
        self._readiness.start()  # Serve runs the constructor on the replica's event loop

    @app.get("/", include_in_schema=False)
    async def home(self) -> RedirectResponse:
        # Relative: under a route prefix, <prefix>/ leads to <prefix>/ui/.
        return RedirectResponse("ui/")

    @app.get("/health")
    async def health(self) -> dict:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready(self) -> JSONResponse:
        """Ready once every deployment of this app has a running replica, as the Serve controller
        says (``deployments.readiness``): never asked of the deployments themselves, since a call
        to ASR waits in its queue behind transcriptions, and a busy service is not an unready one.
        """
        if await self._readiness.ready():
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": "loading"}, status_code=503)

    @app.get("/metrics")
    async def prometheus(self) -> Response:
        text = await self._accounting.metrics_text.remote()
        try:
            # One ASR replica's scheduler, labelled by replica. A busy ASR queue must not hold or
            # fail the service's own metrics: without an answer at once, they go without it.
            text += await asyncio.wait_for(self._asr.metrics_text.remote(), timeout=2)
        except Exception as exc:  # noqa: BLE001 - timeout, back-pressure, a replica restarting
            logger.warning("/metrics: no scheduler figures from ASR: %r", exc)
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    @app.post(LISTEN_ROUTE)
    async def listen(self, request: Request) -> JSONResponse:
        started = time.perf_counter()
        audio_s = 0.0
        try:
            answer = await self._listen(request)
            response = answer.response()
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
    async def job(self, job_id: str, request: Request) -> Response:
        key_id = self._keys.authenticate(request.headers.get("authorization"))
        try:
            fmt = parse_format(request.query_params.get("format"))
            payload = await call(self._jobs.get.remote(job_id, key_id), self._retry)
            if fmt == "json":
                return JSONResponse(payload)
            if payload["status"] != "completed":
                raise InvalidParameter(f"Job {job_id} is {payload['status']}: format={fmt} is served once it has completed",
                                       param="format")
            text = await asyncio.to_thread(render_body, payload["result"], fmt)
            return _Answer(200, {}, file=text, file_format=fmt).response()
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

    async def _read_body(self, request: Request, audio_field: str = AUDIO_FIELD) -> ListenInput:
        """The request's body as options, a URL and audio, within the upload cap (the form's audio
        in ``audio_field``): for /v1/listen and the OpenAI routes alike. Audio above a megabyte is
        in the blob store (a ``StoredAudio``), never whole in this process: hold it in a
        ``HeldUpload``, which deletes it."""
        declared = request.headers.get("content-length")
        return await read_listen_input(
            request.headers.get("content-type"),
            request.stream(),
            content_length=int(declared) if declared and declared.isdigit() else None,
            max_bytes=self._settings.max_file_bytes,
            max_mb=self._settings.max_file_mb,
            audio_field=audio_field,
            blobs=self._blobs,
        )

    async def _transcribe(self, request: Request, key_id: str) -> _Answer:
        source = await self._read_body(request)
        async with HeldUpload(source.audio) as upload:
            return await self._transcribe_input(request, key_id, source, upload)

    async def _transcribe_input(self, request: Request, key_id: str, source: ListenInput, upload: HeldUpload) -> _Answer:
        if source.url is not None and source.audio is not None:
            raise InvalidParameter("Send either a url or an audio file, not both", param="url")
        if source.url is None and source.audio is None:
            raise MissingParameter()
        params = ListenParams.parse({**request.query_params, **source.fields})
        fmt = parse_format(source.fields.get("format", request.query_params.get("format")))
        if fmt in ("srt", "vtt") and not params.timestamps and (await self._flow.capabilities()).word_timestamps:
            # Subtitles are cut by word times; a job keeps them in its result for GET /v1/jobs/{id}?format=.
            params = params.model_copy(update={"timestamps": True})
        await self._flow.check(params)
        if source.url is not None:
            self._guard.check_form(source.url)
        idempotency_key = request.headers.get("idempotency-key")
        if params.callback_url is not None or idempotency_key:
            job = JobRequest(key_id, params, url=source.url, audio=source.audio, idempotency_key=idempotency_key)
            answer = await self._as_job(job, upload)
            if fmt != "json" and answer.status == 200:
                answer.file, answer.file_format = await asyncio.to_thread(render_body, answer.body, fmt), fmt
            return answer
        if source.url is not None:
            audio = await self._audio.from_url(source.url)
        else:
            audio = await self._audio.from_upload(source.audio)
            # AudioFetch has decoded it: an upload in the blob store is deleted now, not after a
            # transcription that can take minutes.
            await upload.drop()
        # The decoded audio is awaited before the ASR call, not chained into it: Serve counts
        # a request against max_queued_requests only when it enters the router, and a chained
        # request enters before its input exists, so a full queue would never refuse it.
        result = await self._flow.run(audio, params, request_id=f"req_{uuid.uuid4().hex}",
                                      meter=HandleMeter(self._accounting, key_id, self._retry))
        answer = _Answer(200, result.body, audio_s=result.transcript.duration_s)
        if fmt != "json":
            answer.file, answer.file_format = await asyncio.to_thread(
                render_transcript, result.transcript, fmt, word_speakers=result.word_speakers, punctuate=params.punctuate,
            ), fmt
        return answer

    async def _as_job(self, job: JobRequest, upload: HeldUpload) -> _Answer:
        """A job: answered 202 at once with a callback_url; else (an Idempotency-Key alone)
        awaited here, so that a repeat of the same request gets the same result."""
        # getaddrinfo blocks: off the event loop.
        await asyncio.to_thread(refuse_unrunnable, job, self._guard, self._settings.webhook_secret_for(job.key_id) is not None)
        upload.hand_over()  # the job runner keeps it with the job, or deletes it
        payload = await call(self._jobs.submit.remote(job), self._retry)
        if job.params.callback_url is not None:
            # A replay answers as the first request was answered; GET /v1/jobs/{id} has the rest.
            return _Answer(202, {"job_id": payload["job_id"], "status": "processing"})
        # The job id in a header, so that GET /v1/jobs/{id} can show this result again.
        return _Answer(200, await call(self._jobs.result.remote(payload["job_id"], job.key_id), self._retry),
                       headers={"Hark-Job-Id": payload["job_id"]})

    @app.websocket("/v1/listen/stream")
    async def stream(self, ws: WebSocket) -> None:
        """Live transcription; see ``pipeline.streaming`` and the README's client example."""
        subprotocols = [p.strip() for p in ws.headers.get("sec-websocket-protocol", "").split(",") if p.strip()]
        # Browsers cannot set headers: they send the pair ("token", KEY) as subprotocols.
        via_protocol = len(subprotocols) == 2 and subprotocols[0].lower() == "token"
        try:
            header = ws.headers.get("authorization") or (f"Token {subprotocols[1]}" if via_protocol else None)
            key_id = self._keys.authenticate(header)
            params = StreamParams.parse(ws.query_params)
            lease = await call(self._accounting.admit.remote(key_id), self._retry)
        except HarkError as err:
            # Refused before the upgrade, with the API's status and body, as Deepgram refuses it:
            # no socket is opened for a client that may not use it, or with options it cannot have.
            await ws.send_denial_response(_error_response(err))
            return
        try:
            await ws.accept(subprotocol="token" if via_protocol else None)
            # Audio received is reserved on the daily quota as it arrives, charged however the
            # stream ends.
            await self._streams.serve(_WebSocketChannel(ws), params,
                                      meter=HandleMeter(self._accounting, key_id, self._retry))
        finally:
            self._detached(self._accounting.release.remote, lease.lease_id, key_id)

    def describe(self) -> dict:
        return replica_info(self._settings)
