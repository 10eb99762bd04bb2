"""OpenAI's audio API on the ingress: ``POST /v1/audio/transcriptions``, ``POST /v1/audio/translations``
and ``GET /v1/models``, for the tools that speak it (the ``openai`` SDKs, Open WebUI, LiteLLM, ...).

The same keys, admission, quota, metrics, audio fetch and ``TranscriptionFlow`` as ``/v1/listen``
(the ``Ingress`` class mixes ``OpenAIRoutes`` in and includes ``router``); what the form means and
what the answer looks like live in ``pipeline.transcription.openai_format``. Errors are answered in
OpenAI's shape with ``/v1/listen``'s statuses and ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from deployments.handles import HandleMeter, call, unwrap
from pipeline.core.errors import HarkError, InvalidParameter, MissingParameter
from pipeline.service.upload import HeldUpload, ListenInput
from pipeline.transcription import openai_format
from pipeline.transcription.openai_format import OpenAIParams, Task

router = APIRouter()
TRANSCRIPTIONS_ROUTE = "/v1/audio/transcriptions"
TRANSLATIONS_ROUTE = "/v1/audio/translations"
# GET /v1/models reports this as every model's creation time: the models ship with the package.
_CREATED = int(time.time())


def openai_error(err: HarkError) -> JSONResponse:
    return JSONResponse(openai_format.error_body(err), status_code=err.status, headers=err.headers())


class OpenAIRoutes:
    """Routes of the ``Ingress`` deployment (which supplies ``_keys``, ``_accounting``, ``_flow``,
    ``_audio``, ``_settings``, ``_retry`` and ``_detached``)."""

    @router.post(TRANSCRIPTIONS_ROUTE)
    async def openai_transcriptions(self, request: Request) -> Response:
        return await self._openai_request(request, "transcribe", TRANSCRIPTIONS_ROUTE)

    @router.post(TRANSLATIONS_ROUTE)
    async def openai_translations(self, request: Request) -> Response:
        return await self._openai_request(request, "translate", TRANSLATIONS_ROUTE)

    @router.get("/v1/models")
    async def openai_models(self, request: Request) -> Response:
        try:
            self._keys.authenticate(request.headers.get("authorization"))
        except HarkError as err:
            return openai_error(err)
        return JSONResponse(openai_format.models_list(self._settings.asr.model, _CREATED))

    @router.get("/v1/models/{model_id:path}")
    async def openai_model(self, model_id: str, request: Request) -> Response:
        try:
            self._keys.authenticate(request.headers.get("authorization"))
            openai_format.check_model(model_id, self._settings.asr.model)
        except HarkError as err:
            return openai_error(err)
        return JSONResponse(openai_format.model_object(model_id, _CREATED))

    async def _openai_request(self, request: Request, task: Task, route: str) -> Response:
        started = time.perf_counter()
        audio_s, code = 0.0, ""
        try:
            key_id = self._keys.authenticate(request.headers.get("authorization"))
            # Admission first, as on /v1/listen: a refused request costs nothing.
            lease = await call(self._accounting.admit.remote(key_id), self._retry)
            try:
                response, audio_s = await self._openai_transcribe(request, key_id, task)
            finally:
                self._detached(self._accounting.release.remote, lease.lease_id, key_id)
            response.headers.update(lease.headers)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure becomes an API error
            err = unwrap(exc, self._retry)
            response, code = openai_error(err), err.code
        self._detached(self._accounting.record.remote, route, response.status_code, code,
                       time.perf_counter() - started, audio_s)
        return response

    async def _openai_transcribe(self, request: Request, key_id: str, task: Task) -> tuple[Response, float]:
        source = await self._read_body(request, audio_field="file")
        async with HeldUpload(source.audio) as upload:
            return await self._openai_transcribe_input(source, upload, key_id, task)

    async def _openai_transcribe_input(self, source: ListenInput, upload: HeldUpload, key_id: str,
                                       task: Task) -> tuple[Response, float]:
        params = OpenAIParams.parse(source.fields, source.lists, task)
        openai_format.check_model(params.model, self._settings.asr.model)
        if source.audio is None:
            raise MissingParameter("Missing required parameter: 'file'")
        caps = await self._flow.capabilities()
        if "word" in params.timestamp_granularities and not caps.word_timestamps:
            raise InvalidParameter(f"The {caps.engine} engine cannot time words", param="timestamp_granularities")
        listen = params.listen_params(word_times=caps.word_timestamps)
        await self._flow.check(listen, task=task)
        audio = await self._audio.from_upload(source.audio)
        await upload.drop()  # decoded: not held while it is transcribed
        result = await self._flow.run(audio, listen, request_id=f"req_{uuid.uuid4().hex}",
                                      meter=HandleMeter(self._accounting, key_id, self._retry),
                                      asr_options=params.asr_options(listen, task))
        audio_s = result.transcript.duration_s
        if params.stream:
            events = openai_format.stream_events(result.transcript, params, result.word_speakers)
            return StreamingResponse(_sse(events), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"}), audio_s
        rendered = await asyncio.to_thread(openai_format.render, result.transcript, params, task, result.word_speakers)
        if rendered.body is not None:
            return JSONResponse(rendered.body), audio_s
        return Response(rendered.text, media_type=rendered.media_type), audio_s


async def _sse(events):
    for event in events:
        yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
