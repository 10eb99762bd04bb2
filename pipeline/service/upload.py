"""Read the body of ``POST /v1/listen``: JSON, a multipart form, or raw audio bytes.

Framework-free: it takes the content type and an async iterator of body chunks, so it reads
as the bytes arrive and stops at the cap instead of buffering a huge body first. Given a
``BlobStore``, audio above ``SPILL_BYTES`` is written there as it arrives, never held whole.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote_to_bytes

import python_multipart
from python_multipart.exceptions import FormParserError

from pipeline.core.errors import FileTooLarge, InvalidParameter
from pipeline.service.blobs import BlobStore, BlobWriter, StoredAudio

MAX_JSON_BYTES = 1_000_000
# Room for the multipart boundaries and the option fields around the file.
FORM_OVERHEAD_BYTES = 1_000_000
# Fields and files of one form, as Starlette's own parser allows (max_fields, max_files): each is a
# callback and a dict entry on the ingress's event loop, and no request needs more than a handful.
MAX_FORM_PARTS = 1000
AUDIO_FIELD = "audio"
PARSE_STEP_BYTES = 1 << 20
# Audio up to this size is held in memory and passed on by value; above it, it goes to the blob
# store a piece at a time. (Passed by value, a 100 MB upload is held in the ingress and written into
# Ray's object store from there, whose pages then count in the ingress's memory for good.)
SPILL_BYTES = 1 << 20


@dataclass(frozen=True)
class ListenInput:
    fields: dict[str, Any] = field(default_factory=dict)  # options found in the body
    url: str | None = None
    audio: bytes | bytearray | StoredAudio | None = None
    # Form fields named "name[]" (sent once per value: OpenAI's timestamp_granularities[]), in order.
    lists: dict[str, list[str]] = field(default_factory=dict)


async def read_listen_input(
    content_type: str | None,
    body: AsyncIterator[bytes],
    *,
    content_length: int | None,
    max_bytes: int,
    max_mb: int,
    audio_field: str = AUDIO_FIELD,
    blobs: BlobStore | None = None,
) -> ListenInput:
    """The body's options, URL and audio; the audio of a form is in ``audio_field`` (``audio`` on
    /v1/listen, ``file`` on the OpenAI routes). With ``blobs``, audio above ``SPILL_BYTES`` comes
    back as a ``StoredAudio`` there, which the caller deletes when it is done with it."""
    media_type = (content_type or "").split(";")[0].strip().lower()
    if media_type == "application/json" or media_type.endswith("+json"):
        return _from_json(await _read_capped(body, MAX_JSON_BYTES, content_length, lambda: _json_too_large()))
    if media_type in ("multipart/form-data", "application/x-www-form-urlencoded"):
        return await _from_form(content_type or "", body, content_length, max_bytes, max_mb, audio_field, blobs)
    too_large = lambda: FileTooLarge(max_mb)  # noqa: E731
    # Raw audio in the body (Deepgram's way: Content-Type audio/*, or none at all).
    if blobs is None or (content_length is not None and content_length <= SPILL_BYTES):
        data = await _read_capped(body, max_bytes, content_length, too_large)
        return ListenInput(audio=data) if data else ListenInput()
    return ListenInput(audio=await _read_spilled(body, max_bytes, content_length, too_large, blobs))


async def _read_spilled(
    body: AsyncIterator[bytes], cap: int, content_length: int | None, error, blobs: BlobStore,
) -> bytearray | StoredAudio | None:
    """The body in memory while it is at most ``SPILL_BYTES``; past that, in the blob store,
    written from a thread a step at a time as it arrives (nothing is left there if it fails)."""
    if content_length is not None and content_length > cap:
        raise error()
    held, total, writer = bytearray(), 0, None
    try:
        async for chunk in body:
            total += len(chunk)
            if total > cap:
                raise error()
            held += chunk
            if len(held) > SPILL_BYTES:  # also the step in which it is written from then on
                writer = writer or await asyncio.to_thread(blobs.writer)
                await asyncio.to_thread(writer.write, held)
                held = bytearray()
        if writer is None:
            return held or None
        if held:
            await asyncio.to_thread(writer.write, held)
        return await asyncio.to_thread(writer.close)
    except BaseException:
        if writer is not None:
            await asyncio.shield(asyncio.to_thread(writer.discard))
        raise


def _json_too_large() -> InvalidParameter:
    return InvalidParameter("JSON body too large: send audio as a multipart upload", param="body")


async def _read_capped(body: AsyncIterator[bytes], cap: int, content_length: int | None, error) -> bytearray:
    """The body in one buffer, filled as it arrives (sized from Content-Length when there is
    one): the body is held once, never as chunks and a joined copy beside them."""
    if content_length is not None and content_length > cap:
        raise error()
    data, total = bytearray(content_length or 0), 0
    async for chunk in body:
        end = total + len(chunk)
        if end > cap:
            raise error()
        data[total:end] = chunk  # in place while within the declared length, appended past it
        total = end
    del data[total:]  # a body shorter than it declared
    return data


def _from_json(raw: bytes) -> ListenInput:
    try:
        payload = json.loads(raw) if raw.strip() else {}
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, a 4300+ digit number, deep nesting
        raise InvalidParameter(f"Malformed JSON body: {exc}", param="body") from None
    if not isinstance(payload, dict):
        raise InvalidParameter("The JSON body must be an object", param="body")
    url = payload.pop("url", None)
    if url is not None and not isinstance(url, str):
        raise InvalidParameter("'url' must be a string", param="url")
    return ListenInput(fields=payload, url=url or None)


async def _from_form(
    content_type: str, body: AsyncIterator[bytes], content_length: int | None, max_bytes: int, max_mb: int,
    audio_field: str = AUDIO_FIELD, blobs: BlobStore | None = None,
) -> ListenInput:
    cap = max_bytes + FORM_OVERHEAD_BYTES
    if content_length is not None and content_length > cap:
        raise FileTooLarge(max_mb)
    urlencoded = content_type.split(";")[0].strip().lower() == "application/x-www-form-urlencoded"
    raw_fields: dict[str, bytes] = {}
    lists: dict[str, list[bytes]] = {}
    files: dict[str, Any] = {}
    parts = 0
    ended = []  # the parser saw the end of the form (for multipart: its closing boundary)

    def name_of(f) -> str:
        nonlocal parts
        parts += 1
        if parts > MAX_FORM_PARTS:
            raise InvalidParameter(f"Too many form fields: at most {MAX_FORM_PARTS}", param="body")
        return _form_decode(f.field_name, urlencoded).decode()  # strict: a name that is not UTF-8 is refused

    def on_field(f) -> None:
        name, value = name_of(f), _form_decode(f.value or b"", urlencoded)
        if name.endswith("[]"):
            lists.setdefault(name, []).append(value)
        else:
            raw_fields[name] = value

    def on_file(f) -> None:
        name = name_of(f)
        if name in files:  # a repeated name: the last part wins, the earlier one is let go now
            files[name].close()
        files[name] = f

    _, params = python_multipart.multipart.parse_options_header(content_type)
    try:
        try:
            parser = python_multipart.FormParser(
                content_type.split(";")[0].strip().lower(),
                on_field,
                on_file,
                on_end=lambda: ended.append(True),
                boundary=params.get(b"boundary"),
                # Files above 1 MiB spool to a temporary file, not memory.
                config={"MAX_MEMORY_FILE_SIZE": 1024 * 1024, "MAX_BODY_SIZE": cap},
            )
            # Parsing and spooling are CPU and disk work: off the event loop, a megabyte at a time.
            total, pending = 0, []
            async for chunk in body:
                total += len(chunk)
                if total > cap:
                    raise FileTooLarge(max_mb)
                pending.append(chunk)
                if sum(map(len, pending)) >= PARSE_STEP_BYTES:
                    await asyncio.to_thread(parser.write, b"".join(pending))
                    pending = []
            await asyncio.to_thread(_finish, parser, b"".join(pending))
        except (FormParserError, ValueError) as exc:
            raise InvalidParameter(f"Malformed form body: {exc}", param="body") from None
        if total and not ended:
            # A part cut off mid-way is never handed over: without this the request would be
            # answered as if it had sent no audio at all. (An empty body is simply no input.)
            raise InvalidParameter("Malformed form body: it ends before its closing boundary", param="body")
        # A part without a filename arrives as a plain field: take its bytes as the audio too.
        audio = raw_fields.pop(audio_field, None)
        if audio_field in files:
            upload = files[audio_field]
            if upload.size > max_bytes:
                raise FileTooLarge(max_mb)
            if blobs is not None and upload.size > SPILL_BYTES:
                audio = await asyncio.to_thread(_store_spooled, upload, blobs)
            else:
                audio = await asyncio.to_thread(_read_spooled, upload)
    finally:
        # Refused or not, no spooled upload outlives the request.
        for upload in files.values():
            upload.close()
    if isinstance(audio, (bytes, bytearray)) and len(audio) > max_bytes:
        raise FileTooLarge(max_mb)
    fields = {name: value.decode("utf-8", "replace") for name, value in raw_fields.items()}
    url = fields.pop("url", None) or None
    return ListenInput(fields=fields, url=url, audio=audio,
                       lists={name: [v.decode("utf-8", "replace") for v in values] for name, values in lists.items()})


def _finish(parser, rest: bytes) -> None:
    if rest:
        parser.write(rest)
    parser.finalize()


def _read_spooled(upload) -> bytearray:
    spool = upload.file_object
    data = bytearray(spool.seek(0, 2))
    spool.seek(0)
    spool.readinto(data)
    return data


def _store_spooled(upload, blobs: BlobStore) -> StoredAudio:
    """A form's file part, spooled by the parser to a temporary file, copied into the blob store a
    step at a time."""
    spool = upload.file_object
    spool.seek(0)
    writer: BlobWriter = blobs.writer()
    try:
        while piece := spool.read(PARSE_STEP_BYTES):
            writer.write(piece)
    except BaseException:
        writer.discard()
        raise
    return writer.close()


def _form_decode(raw: bytes, urlencoded: bool) -> bytes:
    # python-multipart hands url-encoded names and values over as sent: "+" and %XX still in them.
    return unquote_to_bytes(raw.replace(b"+", b" ")) if urlencoded else raw


class HeldUpload:
    """A request's uploaded audio while the request needs it. Leaving the ``async with`` (answered,
    refused or failed) lets go of it, and deletes it from the blob store if it went there; so does
    ``drop`` once it has been decoded. ``hand_over`` gives it to a new owner (an async job) that
    deletes it itself."""

    def __init__(self, audio: bytes | bytearray | StoredAudio | None) -> None:
        self.audio = audio

    async def __aenter__(self) -> "HeldUpload":
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.drop()

    def hand_over(self) -> bytes | bytearray | StoredAudio | None:
        audio, self.audio = self.audio, None
        return audio

    async def drop(self) -> None:
        audio, self.audio = self.audio, None
        if isinstance(audio, StoredAudio):
            # Shielded: a client that hangs up cancels the request, not the clean-up.
            await asyncio.shield(asyncio.to_thread(BlobStore.delete, audio.url))
