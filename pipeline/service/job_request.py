"""What a client asked a job to do, as the job keeps it, and the checks made before it is queued.

Apart from the runner (which brings the job store's database and the webhook client) so that the
ingress, which builds the request and refuses what could never run, needs neither.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from pipeline.audio.urls import UrlGuard
from pipeline.core.errors import FetchFailed, InvalidParameter
from pipeline.service.blobs import StoredAudio
from pipeline.transcription.schemas import ListenParams


@dataclass(frozen=True)
class JobRequest:
    """What a client asked for, as the job keeps it."""

    key_id: str
    params: ListenParams
    url: str | None = None
    # An upload: its bytes, or (above a megabyte) where the ingress stored it as it arrived.
    audio: bytes | bytearray | StoredAudio | None = None
    idempotency_key: str | None = None

    @property
    def digest(self) -> str:
        """Same digest, same request: how a repeated ``Idempotency-Key`` is told from a reused one."""
        if isinstance(self.audio, StoredAudio):
            audio = self.audio.sha256
        else:
            audio = hashlib.sha256(self.audio).hexdigest() if self.audio is not None else None
        fields = {"url": self.url, "audio": audio, "params": self.params.model_dump(mode="json")}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def refuse_unrunnable(request: JobRequest, guard: UrlGuard, can_sign: bool) -> None:
    """Refuse now what would only fail later in the job: a ``callback_url`` without a signing
    secret, or one (or an http(s) audio URL) the SSRF policy forbids. Blocks on DNS."""
    callback = request.params.callback_url
    if callback is not None:
        if not can_sign:
            raise InvalidParameter(
                "callback_url needs a webhook signing secret for this key on the server (HARK_WEBHOOK_SECRET)", param="callback_url"
            )
        try:
            guard.resolve(callback, param="callback_url")  # FORBIDDEN_URL now, not at delivery
        except FetchFailed as exc:
            raise InvalidParameter(f"callback_url: {exc.message}", param="callback_url") from None
    if request.url is not None and request.url.lower().startswith(("http://", "https://")):
        guard.resolve(request.url)
