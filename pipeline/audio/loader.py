"""From a URL, uploaded bytes or an upload in the blob store to decoded ``Audio``: fetch within
limits, then decode once."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from pipeline.audio import decode as audio
from pipeline.core.errors import FileTooLarge, ServiceUnavailable
from pipeline.audio.fetch import FetchLimits, S3Allowlist, fetch_http, fetch_s3
from pipeline.audio.urls import Resolver, UrlGuard, system_resolver
from pipeline.core.settings import Settings
from pipeline.core.types import Audio

# An object store client's read-ahead (s3fs's default is 50 MiB, held in memory).
_READ_AHEAD_BYTES = 5 * 2**20


class AudioLoader:
    """Turns what a request names into ``Audio``. Usable from a deployment, Ray Data or a CLI."""

    def __init__(
        self,
        settings: Settings,
        resolver: Resolver = system_resolver,
        s3_filesystem=None,
        *,
        any_s3_object: bool = False,
        pcm16: bool = True,
    ) -> None:
        """``any_s3_object``: for the operator's own work (batch jobs, ``hark transcribe``), whose
        s3:// URLs may read whatever the server's credentials reach; URLs from API callers are
        limited to ``settings.s3_allow``. ``pcm16``: audio as 16-bit PCM (see ``Audio``), half the
        memory; every path that transcribes files (the API, jobs, ``hark batch``, ``hark transcribe``)
        loads it so, so that one file gives one result whichever way it came."""
        self.guard = UrlGuard.from_settings(settings.allow_private_urls, settings.url_allowlist, resolver)
        self.s3_allowlist = None if any_s3_object else S3Allowlist.from_settings(settings.s3_allow)
        self.limits = FetchLimits(
            max_bytes=settings.max_file_bytes,
            max_mb=settings.max_file_mb,
            connect_timeout_s=settings.fetch_connect_timeout_s,
            read_timeout_s=settings.fetch_read_timeout_s,
            total_timeout_s=settings.fetch_total_timeout_s,
            max_redirects=settings.fetch_max_redirects,
        )
        self.max_duration_s = settings.max_duration_s
        self._s3 = s3_filesystem
        self._pcm16 = pcm16

    def from_url(self, url: str) -> Audio:
        scheme = self.guard.check_form(url).scheme.lower()
        with tempfile.TemporaryFile() as spool:
            if scheme == "s3":
                fetch_s3(url, spool, self.limits, self.s3_allowlist, self._s3)
            else:
                fetch_http(url, spool, self.guard, self.limits)
            spool.seek(0)
            return audio.decode(spool, max_duration_s=self.max_duration_s, pcm16=self._pcm16)

    def from_bytes(self, data: bytes | bytearray | memoryview | np.ndarray) -> Audio:
        """The audio in a buffer (an upload's bytes), decoded where it lies."""
        data = memoryview(data).cast("B")
        if len(data) > self.limits.max_bytes:
            raise FileTooLarge(self.limits.max_mb)
        return audio.decode(data, max_duration_s=self.max_duration_s, pcm16=self._pcm16)

    def from_blob(self, url: str) -> Audio:
        """An upload in the blob store (any fsspec URL the service wrote itself, never one from a
        caller): a local file decoded where it lies, an object through a temporary file."""
        fs, path = fsspec.core.url_to_fs(url)
        if isinstance(fs, LocalFileSystem):
            try:
                return self.from_path(path)
            except FileNotFoundError:
                raise ServiceUnavailable(
                    "The upload is not on this node: on a cluster, HARK_BLOB_URL must be storage that every node "
                    "reads (s3://bucket/prefix)"
                ) from None
        with tempfile.TemporaryFile() as spool:
            with fs.open(path, "rb", block_size=_READ_AHEAD_BYTES) as stored:
                shutil.copyfileobj(stored, spool, 1 << 20)
            if spool.tell() > self.limits.max_bytes:
                raise FileTooLarge(self.limits.max_mb)
            spool.seek(0)
            return audio.decode(spool, max_duration_s=self.max_duration_s, pcm16=self._pcm16)

    def from_path(self, path: str | Path) -> Audio:
        if Path(path).stat().st_size > self.limits.max_bytes:
            raise FileTooLarge(self.limits.max_mb)
        return audio.decode(path, max_duration_s=self.max_duration_s, pcm16=self._pcm16)
