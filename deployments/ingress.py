"""HTTP ingress: auth, limits, request parsing, composition of fetch and ASR, errors as ``API.md``."""

import asyncio
import contextvars
import hashlib
import json
import logging
import time
import uuid

from fastapi import FastAPI, Request, Response, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from ray import serve

from deployments import replica_info
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline.service.auth import KeyRing
from pipeline.core.errors import (
    HarkError,
    InvalidParameter,
    MissingParameter,
    FetchFailed,
    ServiceUnavailable,
    StreamTimeout,
    error_from_body,
)
from deployments.compose import Composer
from pipeline.audio.loader import AudioLoader
from pipeline.transcription.schemas import ListenParams
from pipeline.core.settings import Settings
from pipeline.service.upload import ListenInput, read_listen_input

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


def unwrap(exc: BaseException, retry_after_s: int) -> HarkError:
    """The API error for whatever a handle call raised."""
    if isinstance(exc, RayTaskError) and isinstance(exc.cause, BaseException):
        exc = exc.cause
    if isinstance(exc, HarkError):
        return exc
    if isinstance(exc, BackPressureError):
        return ServiceUnavailable(retry_after=retry_after_s)
    if isinstance(exc, RayActorError):
        return ServiceUnavailable("The worker handling the request stopped; please retry", retry_after=retry_after_s)
    logger.exception("Unexpected error", exc_info=exc)
    return HarkError("Internal error")


def _int_param(query, name: str, default: int, low: int, high: int) -> int:
    raw = query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidParameter(f"{name} must be an integer", param=name) from None
    if not low <= value <= high:
        raise InvalidParameter(f"{name} must be between {low} and {high}", param=name)
    return value


def _bool_param(query, name: str, default: bool) -> bool:
    raw = query.get(name)
    if raw is None:
        return default
    if raw.lower() in ("true", "1", "yes", "on"):
        return True
    if raw.lower() in ("false", "0", "no", "off"):
        return False
    raise InvalidParameter(f"{name} must be true or false", param=name)


def _control(text: str | None) -> str | None:
    """The type of a control message, or None for anything malformed."""
    try:
        kind = json.loads(text or "").get("type")
    except (ValueError, AttributeError):
        return None
    return kind if kind in ("KeepAlive", "CloseStream") else None


async def _ws_error(ws: WebSocket, err: HarkError, close_code: int) -> None:
    try:
        await ws.send_json({"type": "Error", **err.to_body()})
        await ws.close(code=close_code, reason=err.code)
    except Exception:  # the client may already be gone
        pass


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
        self._settings = settings
        self._keys = KeyRing(settings.license_keys)
        if not len(self._keys):
            logger.warning("No license keys configured: every request will be refused (HARK_LICENSE_KEYS)")
        self._url_checker = AudioLoader(settings)
        self._fetch = fetch
        self._asr = asr
        self._composer = Composer(asr, diarization, accounting)
        self._accounting = accounting
        self._jobs = jobs
        self._background: set[asyncio.Task] = set()

    @app.get("/health")
    async def health(self) -> dict:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready(self) -> JSONResponse:
        try:
            await asyncio.wait_for(
                asyncio.gather(self._asr.describe.remote(), self._accounting.describe.remote()), timeout=5
            )
        except Exception:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get("/metrics")
    async def prometheus(self) -> Response:
        text = await self._accounting.metrics_text.remote()
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    @app.post(LISTEN_ROUTE)
    async def listen(self, request: Request) -> JSONResponse:
        started = time.perf_counter()
        outcome: dict = {"audio_s": 0.0}
        try:
            status, body, headers = await self._listen(request, outcome)
            response = JSONResponse(body, status_code=status, headers=headers)
            code = ""
        except BaseException as exc:  # noqa: BLE001 - every failure becomes an API error
            if isinstance(exc, asyncio.CancelledError):
                raise
            err = unwrap(exc, self._settings.retry_after_s)
            response, code = _error_response(err), err.code
        self._detached(
            self._accounting.record.remote,
            LISTEN_ROUTE, response.status_code, code, time.perf_counter() - started, outcome["audio_s"],
        )
        return response

    @app.get("/v1/jobs/{job_id}")
    async def job(self, job_id: str, request: Request) -> JSONResponse:
        key_id = self._keys.authenticate(request.headers.get("authorization"))
        try:
            return JSONResponse(await self._jobs.get.remote(job_id, key_id))
        except BaseException as exc:  # noqa: BLE001
            if isinstance(exc, asyncio.CancelledError):
                raise
            return _error_response(unwrap(exc, self._settings.retry_after_s))

    async def _listen(self, request: Request, outcome: dict) -> tuple[int, dict, dict[str, str]]:
        key_id = self._keys.authenticate(request.headers.get("authorization"))
        # Admission first: a refused request costs nothing, not even reading its body.
        lease = await self._accounting.admit.remote(key_id)
        try:
            status, body = await self._transcribe(request, key_id, outcome)
        finally:
            self._detached(self._accounting.release.remote, lease.lease_id, key_id)
        return status, body, lease.headers

    def _detached(self, method, *args) -> None:
        """Call a handle method outside this request's context.

        When a client hangs up, Serve cancels the request and every handle call made in its
        context, so a release made there would be cancelled too. A task with an empty context
        is not the request's child and runs to the end. (Leases also expire as a last resort.)
        """

        async def call() -> None:
            await method(*args)

        self._background.add(task := asyncio.get_running_loop().create_task(call(), context=contextvars.Context()))
        task.add_done_callback(self._background.discard)

    async def _transcribe(self, request: Request, key_id: str, outcome: dict) -> tuple[int, dict]:
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
        await self._composer.check(params)
        if source.url is not None:
            self._url_checker.check_url(source.url)
        idempotency_key = request.headers.get("idempotency-key")
        if params.callback_url is not None or idempotency_key:
            return await self._as_job(key_id, source, params, idempotency_key, request.query_params)
        if source.url is not None:
            audio = await self._fetch.from_url.remote(source.url)
        else:
            audio = await self._fetch.from_bytes.remote(source.audio)
        # The decoded audio is awaited before the ASR call, not chained into it: Serve counts
        # a request against max_queued_requests only when it enters the router, and a chained
        # request enters before its input exists, so a full queue would never refuse it.
        transcript, body = await self._composer.transcribe(audio, params, key_id, f"req_{uuid.uuid4().hex}")
        outcome["audio_s"] = transcript.duration_s
        return 200, body

    async def _as_job(self, key_id: str, source: ListenInput, params: ListenParams,
                      idempotency_key: str | None, query) -> tuple[int, dict]:
        """A job: answered 202 at once with a callback_url; else (an Idempotency-Key alone)
        awaited here, so that a repeat of the same request gets the same result."""
        if params.callback_url is not None:
            if self._settings.webhook_secret is None:
                raise InvalidParameter(
                    "callback_url needs a webhook signing secret on the server (HARK_WEBHOOK_SECRET)", param="callback_url"
                )
            self._url_checker.check_url(params.callback_url, param="callback_url", schemes=("http", "https"))
            try:
                # FORBIDDEN_URL now, not at delivery. getaddrinfo blocks: off the event loop.
                await asyncio.to_thread(self._url_checker.guard.resolve, params.callback_url)
            except FetchFailed as exc:
                raise InvalidParameter(f"callback_url: {exc.message}", param="callback_url") from None
        if source.url is not None and source.url.lower().startswith(("http://", "https://")):
            # The job fetches later; refuse a forbidden audio URL now rather than in a failed job.
            await asyncio.to_thread(self._url_checker.guard.resolve, source.url)
        fields = params.model_dump(mode="json")
        digest = hashlib.sha256(
            json.dumps(
                {"url": source.url, "audio": hashlib.sha256(source.audio).hexdigest() if source.audio is not None else None,
                 "params": fields},
                sort_keys=True,
            ).encode()
        ).hexdigest()
        payload = None
        if idempotency_key:
            if len(idempotency_key) > 255:
                raise InvalidParameter("Idempotency-Key is longer than 255 characters", param="Idempotency-Key")
            found = await self._jobs.find_idempotent.remote(key_id, idempotency_key)
            if found is not None:
                payload, stored_digest = found
                if stored_digest != digest:
                    raise InvalidParameter("This Idempotency-Key was used with a different request", param="Idempotency-Key")
        if payload is None:
            payload = await self._jobs.submit.remote(
                key_id, fields, source.url, source.audio, params.callback_url, idempotency_key, digest
            )
        if params.callback_url is not None:
            # A replay answers as the first request was answered; GET /v1/jobs/{id} has the rest.
            return 202, {"job_id": payload["job_id"], "status": "processing"}
        while payload["status"] == "processing":
            await asyncio.sleep(0.25)
            payload = await self._jobs.get.remote(payload["job_id"], key_id)
        if payload["status"] == "failed":
            raise error_from_body(payload["error"])
        return 200, payload["result"]

    @app.websocket("/v1/listen/stream")
    async def stream(self, ws: WebSocket) -> None:
        """Live transcription; see ``pipeline.streaming.session`` and the README's client example."""
        subprotocols = [p.strip() for p in ws.headers.get("sec-websocket-protocol", "").split(",") if p.strip()]
        # Browsers cannot set headers: they send the pair ("token", KEY) as subprotocols.
        via_protocol = len(subprotocols) == 2 and subprotocols[0].lower() == "token"
        await ws.accept(subprotocol="token" if via_protocol else None)
        try:
            header = ws.headers.get("authorization") or (f"Token {subprotocols[1]}" if via_protocol else None)
            key_id = self._keys.authenticate(header)
            lease = await self._accounting.admit.remote(key_id)
        except BaseException as exc:  # noqa: BLE001
            err = unwrap(exc, self._settings.retry_after_s)
            await _ws_error(ws, err, close_code=1008 if err.status == 401 else 1013)
            return
        try:
            await self._stream(ws, key_id)
        finally:
            self._detached(self._accounting.release.remote, lease.lease_id, key_id)

    async def _stream(self, ws: WebSocket, key_id: str) -> None:
        from pipeline.streaming.session import StreamingSession, StreamOptions
        from pipeline.streaming.decoders import stream_decoder

        request_id = f"req_{uuid.uuid4().hex}"
        try:
            q = ws.query_params
            params = ListenParams.parse({k: q[k] for k in ("language", "punctuate") if k in q})
            encoding = q.get("encoding", "linear16").lower()
            sample_rate = _int_param(q, "sample_rate", 16000, 8000, 192000)
            channels = _int_param(q, "channels", 1, 1, 8)
            endpointing = q.get("endpointing", "300")
            endpointing_ms = 10**9 if endpointing.lower() == "false" else _int_param(q, "endpointing", 300, 10, 60000)
            interim = _bool_param(q, "interim_results", True)
            try:
                caps = await self._composer.capabilities()
            except Exception as exc:  # noqa: BLE001 - ASR unreachable or its queue full: say so
                await _ws_error(ws, unwrap(exc, self._settings.retry_after_s), close_code=1013)
                return
            caps.refuse_unsupported(language=params.language, streaming=True)
            decoder = stream_decoder(encoding, sample_rate, channels)
        except HarkError as err:
            await _ws_error(ws, err, close_code=1008)
            return
        session = StreamingSession(
            transcribe=lambda audio, opts: self._asr.transcribe.remote(audio, opts),
            options=StreamOptions(language=params.language, punctuate=params.punctuate,
                                  interim_results=interim, endpointing_ms=endpointing_ms),
        )
        try:
            await self._serve_stream(ws, session, decoder, request_id, channels)
        finally:
            await asyncio.to_thread(decoder.close)  # ends a container decoder's thread
            # Audio received counts against the daily quota however the stream ends.
            self._detached(self._accounting.charge_audio.remote, key_id, session.received_s)

    async def _serve_stream(self, ws: WebSocket, session, decoder, request_id: str, channels: int) -> None:
        idle = self._settings.stream_idle_timeout_s
        try:
            while True:
                try:
                    message = await asyncio.wait_for(ws.receive(), timeout=idle)
                except asyncio.TimeoutError:
                    await _ws_error(ws, StreamTimeout(f"No audio or KeepAlive for {idle:g} s"), close_code=1011)
                    return
                if message["type"] == "websocket.disconnect":
                    return
                if message.get("bytes") is not None:
                    for event in await session.feed(decoder.decode(message["bytes"])):
                        await ws.send_json(event)
                    continue
                control = _control(message.get("text"))
                if control is None:
                    await ws.send_json({"type": "Error", "code": "INVALID_PARAMETER", "param": "message",
                                        "error": 'Text frames must be {"type": "KeepAlive"} or {"type": "CloseStream"}'})
                elif control == "CloseStream":
                    break
        except WebSocketDisconnect:
            return
        except BaseException as exc:  # noqa: BLE001
            if isinstance(exc, asyncio.CancelledError):
                raise
            await _ws_error(ws, unwrap(exc, self._settings.retry_after_s), close_code=1011)
            return
        try:
            tail = await asyncio.to_thread(decoder.close)
        except HarkError as err:
            await _ws_error(ws, err, close_code=1003)
            return
        for event in [*await session.feed(tail), *await session.finish()]:
            await ws.send_json(event)
        await ws.send_json({"type": "Metadata", "request_id": request_id, "duration": round(session.received_s, 3),
                            "channels": channels, "language": session.language})
        await ws.close(code=1000)

    def describe(self) -> dict:
        return replica_info(self._settings)
