"""Uploaded audio of async jobs, kept until the job has run: a local directory on one machine,
shared object storage (``s3://bucket/prefix``, any fsspec URL) on a cluster, where the runner that
claims a job may be on another node than the ingress that took the upload."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.core.errors import ServiceUnavailable


class BlobStore:
    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self._fs, self._root = fsspec.core.url_to_fs(self.url)
        self._local = isinstance(self._fs, LocalFileSystem)
        if self._local:
            Path(self._root).mkdir(parents=True, exist_ok=True)

    def put(self, data: bytes) -> str:
        """Store ``data`` durably (fsynced, or acknowledged by the object store); its URL.
        ``SERVICE_UNAVAILABLE`` if the storage cannot take it."""
        path = f"{self._root}/upload-{uuid.uuid4().hex}.bin"
        try:
            if self._local:
                _write_durably(Path(path), data)
            else:
                self._fs.pipe_file(path, data)
        except Exception as exc:  # noqa: BLE001 - whatever the backend, the upload was not kept
            raise ServiceUnavailable(f"The upload could not be stored: {type(exc).__name__}", retry_after=5) from exc
        return self._fs.unstrip_protocol(path)

    @staticmethod
    def get(url: str) -> bytes:
        fs, path = fsspec.core.url_to_fs(url)
        return fs.cat_file(path)

    @staticmethod
    def delete(url: str) -> None:
        fs, path = fsspec.core.url_to_fs(url)
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            pass


def _write_durably(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.rename(path)
