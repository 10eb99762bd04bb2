"""Uploaded audio kept outside memory: a local directory on one machine, shared object storage
(``s3://bucket/prefix``, any fsspec URL) on a cluster, where the replica that reads an upload (the
AudioFetch replica that decodes it, the job runner that claims its job) may be on another node than
the ingress that took it.

Two uses: an upload too large to hold in the ingress is written here as it arrives and deleted when
its request ends; an async job's upload stays here until the job has run.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.core.errors import ServiceUnavailable


# What an object store's client buffers before it sends a part (S3's smallest part): s3fs's own
# default is 50 MiB, held in memory.
PART_BYTES = 5 * 2**20


@dataclass(frozen=True)
class StoredAudio:
    """An upload in the blob store: where it is, its size and its SHA-256 (an async job's digest
    needs it, and it is cheapest while the bytes pass by)."""

    url: str
    size: int
    sha256: str


class BlobWriter:
    """One upload written as it arrives, piece by piece: memory holds a piece, never the upload.
    Blocking I/O: call it from a thread. ``close`` makes it a ``StoredAudio``; ``discard`` (or a
    failed ``close``) leaves nothing behind."""

    def __init__(self, store: "BlobStore") -> None:
        self._store = store
        self._path = store.new_path()
        # Locally under a temporary name until it is whole, so that no reader ever sees part of it;
        # an object store shows an object only once its upload completes.
        self._target = f"{self._path}.part" if store.is_local else self._path
        self._file = store.fs.open(self._target, "wb", block_size=PART_BYTES)
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        try:
            self._file.write(data)
        except Exception as exc:  # noqa: BLE001 - whatever the backend, the upload cannot be kept
            self.discard()
            raise _not_stored(exc) from exc
        self._hash.update(data)
        self.size += len(data)

    def close(self) -> StoredAudio:
        try:
            self._file.close()
            if self._store.is_local:
                os.replace(self._target, self._path)
        except Exception as exc:  # noqa: BLE001
            self.discard()
            raise _not_stored(exc) from exc
        return StoredAudio(self._store.fs.unstrip_protocol(self._path), self.size, self._hash.hexdigest())

    def discard(self) -> None:
        try:
            self._file.close()
        except Exception:  # noqa: BLE001, S110 - an object store's half-written upload: dropped below or never shown
            pass
        for path in (self._target, self._path):
            try:
                self._store.fs.rm_file(path)
            except (FileNotFoundError, OSError):
                pass


class BlobStore:
    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.fs, self._root = fsspec.core.url_to_fs(self.url)
        self.is_local = isinstance(self.fs, LocalFileSystem)
        if self.is_local:
            Path(self._root).mkdir(parents=True, exist_ok=True)

    def new_path(self) -> str:
        return f"{self._root}/upload-{uuid.uuid4().hex}.bin"

    def put(self, data: bytes) -> str:
        """Store ``data`` durably (fsynced, or acknowledged by the object store); its URL.
        ``SERVICE_UNAVAILABLE`` if the storage cannot take it."""
        writer = self.writer()
        writer.write(data)
        url = writer.close().url
        try:
            self.make_durable(url)
        except ServiceUnavailable:
            self.delete(url)
            raise
        return url

    def writer(self) -> BlobWriter:
        """A writer for one upload, stored piece by piece (not yet durable: see ``make_durable``)."""
        try:
            return BlobWriter(self)
        except Exception as exc:  # noqa: BLE001
            raise _not_stored(exc) from exc

    def written_before(self, when: float) -> list[str]:
        """URLs of the uploads here (whole or half-written) last written before ``when`` (a Unix
        time), from one listing."""
        try:
            entries = self.fs.ls(self._root, detail=True, refresh=True)  # an object store's listing, not its cache
        except FileNotFoundError:
            return []
        found = []
        for entry in entries:
            name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
            if entry.get("type") == "file" and name.startswith("upload-") and _modified(entry) < when:
                found.append(self.fs.unstrip_protocol(entry["name"]))
        return found

    @staticmethod
    def make_durable(url: str) -> None:
        """A stored upload survives a crash of this machine from now on: a local file is fsynced
        (an object store acknowledged it when it was written)."""
        fs, path = fsspec.core.url_to_fs(url)
        if isinstance(fs, LocalFileSystem):
            try:
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
                _fsync_dir(Path(path).parent)
            except OSError as exc:
                raise _not_stored(exc) from exc

    @staticmethod
    def delete(url: str) -> None:
        fs, path = fsspec.core.url_to_fs(url)
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            pass


def _modified(entry: dict) -> float:
    """When a listed file was last written: ``mtime`` on a local disk, ``LastModified`` on S3."""
    if "mtime" in entry:
        return float(entry["mtime"])
    return entry["LastModified"].timestamp()


def _not_stored(exc: BaseException) -> ServiceUnavailable:
    return ServiceUnavailable(f"The upload could not be stored: {type(exc).__name__}", retry_after=5)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
