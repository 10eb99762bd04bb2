"""Fetch audio from ``http(s)://`` and ``s3://`` URLs into a local file, within limits.

http(s): the host is read as browsers read it (percent-decoded, IDNA-mapped to ASCII; a URL
with control characters or a host that is no name is refused before any lookup;
``pipeline.audio.urls``) and resolved
once, every address is checked by the SSRF guard, and the connection goes to the checked address
(the name travels in ``Host`` and TLS SNI), so a DNS answer cannot change between the check and
the connect. Redirects are followed by hand and each
hop is checked again. Bodies stream to disk and reading stops past the byte cap. The whole
fetch, name lookup included, ends at its deadline on the wall clock.

s3: through s3fs, configured by the standard AWS variables (``AWS_ENDPOINT_URL`` included). The
endpoint is the operator's choice, so it is not subject to the guard.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO
from urllib.parse import urljoin, urlsplit, urlunsplit

import aiohttp
import httpx

from pipeline.audio.urls import UrlGuard, normalize_host, shown
from pipeline.core.errors import FetchFailed, FileTooLarge, ForbiddenUrl, InvalidParameter

_CHUNK = 256 * 1024
_REDIRECTS = {301, 302, 303, 307, 308}
# Name lookups of http(s) fetches, one per fetch in progress (AudioFetch runs 32 at once).
# Bounded: lookups abandoned at their fetch's deadline (a DNS server that never answers) hold
# at most these threads until the system resolver gives up on them.
_LOOKUPS = ThreadPoolExecutor(max_workers=32, thread_name_prefix="fetch-dns")


@dataclass(frozen=True)
class FetchLimits:
    max_bytes: int
    max_mb: int
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 30.0
    total_timeout_s: float = 600.0
    max_redirects: int = 5


class _Sink:
    """Counts bytes into a file and stops at the cap."""

    def __init__(self, out: BinaryIO, limits: FetchLimits) -> None:
        self.out, self.limits, self.written = out, limits, 0

    def write(self, chunk: bytes) -> None:
        self.written += len(chunk)
        if self.written > self.limits.max_bytes:
            raise FileTooLarge(self.limits.max_mb)
        self.out.write(chunk)


def request_to(
    client: httpx.Client | httpx.AsyncClient, ip: str, method: str, url: str, *, headers: dict[str, str],
    content: bytes | None = None,
) -> httpx.Request:
    """A request to ``ip`` (the address the guard checked: no second lookup that could differ),
    carrying the URL's host, in its ASCII form, in Host and TLS SNI. Credentials in the URL stay
    out of Host (httpx sends them as Basic auth)."""
    parts = urlsplit(url)
    host = normalize_host(parts.hostname)
    port = f":{parts.port}" if parts.port is not None else ""
    userinfo = parts.netloc.rpartition("@")[0]
    address = f"[{ip}]" if ":" in ip else ip
    target = urlunsplit(parts._replace(netloc=f"{userinfo}@{address}{port}" if userinfo else f"{address}{port}"))
    return client.build_request(
        method,
        httpx.URL(target),
        headers={**headers, "Host": f"[{host}]{port}" if ":" in host else f"{host}{port}"},
        content=content,
        extensions={"sni_hostname": host},
    )


def fetch_http(url: str, out: BinaryIO, guard: UrlGuard, limits: FetchLimits) -> None:
    """Stream an http(s) URL into ``out``; raises HarkErrors for every refusal or failure.

    Blocking, and never for longer than ``limits.total_timeout_s`` on the wall clock. A read
    timeout cannot promise that (a server sending a byte a second never lets one fire), so the
    download runs on an event loop of its own, where the deadline cancels whatever it is waiting
    on: the name's lookup, the connection, headers or body. Call it from a thread, not from
    inside a running event loop.
    """
    asyncio.run(_fetch_http(url, out, guard, limits))


async def _fetch_http(url: str, out: BinaryIO, guard: UrlGuard, limits: FetchLimits) -> None:
    try:
        async with asyncio.timeout(limits.total_timeout_s):
            await _download(url, out, guard, limits)
    except TimeoutError:
        raise FetchFailed(f"The download did not finish within {limits.total_timeout_s:g} s") from None


async def _download(url: str, out: BinaryIO, guard: UrlGuard, limits: FetchLimits) -> None:
    timeout = httpx.Timeout(
        connect=limits.connect_timeout_s, read=limits.read_timeout_s, write=limits.read_timeout_s, pool=limits.connect_timeout_s
    )
    loop = asyncio.get_running_loop()
    # trust_env=False: a proxy from the environment would connect on our behalf to whatever the
    # name resolves to there, defeating the address check.
    async with httpx.AsyncClient(timeout=timeout, follow_redirects=False, trust_env=False) as client:
        for _ in range(limits.max_redirects + 1):
            parts = urlsplit(url)
            # getaddrinfo cannot be interrupted: it runs on a lookup thread, and one that outlives
            # the deadline is abandoned there to finish on its own.
            ip = await loop.run_in_executor(_LOOKUPS, guard.resolve, url)
            request = request_to(client, ip, "GET", url, headers={"Accept": "audio/*, */*", "Accept-Encoding": "identity"})
            try:
                response = await client.send(request, stream=True)
            except httpx.TimeoutException:
                raise FetchFailed(f"Timed out waiting for {parts.hostname}") from None
            except httpx.HTTPError as exc:
                raise FetchFailed(f"Could not fetch the URL: {exc}") from None
            try:
                if response.status_code in _REDIRECTS:
                    location = response.headers.get("location")
                    if not location:
                        raise FetchFailed("Redirect without a Location header", status=response.status_code)
                    try:
                        url = urljoin(url, location)
                        scheme = urlsplit(url).scheme
                    except ValueError:
                        raise FetchFailed(f"Redirect to a malformed URL: {shown(location)}") from None
                    if scheme not in ("http", "https"):
                        raise ForbiddenUrl("Redirect to a non-http(s) URL is not allowed")
                    try:
                        guard.check_form(url)
                    except InvalidParameter:  # the remote's mistake, not the caller's bad parameter
                        raise FetchFailed(f"Redirect to a malformed URL: {shown(location)}") from None
                    continue
                if response.status_code >= 400:
                    raise FetchFailed(
                        f"The URL answered HTTP {response.status_code}", status=response.status_code
                    )
                declared = response.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > limits.max_bytes:
                    raise FileTooLarge(limits.max_mb)
                sink = _Sink(out, limits)
                try:
                    async for chunk in response.aiter_bytes(_CHUNK):
                        sink.write(chunk)
                except httpx.TimeoutException:
                    raise FetchFailed("Timed out reading from the URL") from None
                except httpx.HTTPError as exc:
                    raise FetchFailed(f"Download failed: {exc}") from None
                return
            finally:
                await response.aclose()
    raise FetchFailed(f"More than {limits.max_redirects} redirects")


@dataclass(frozen=True)
class S3Allowlist:
    """Which ``s3://`` objects URLs given by users may read: whole buckets, or the keys under a
    folder of one (``bucket/calls`` allows ``bucket/calls/a.wav``, not ``bucket/callsign.wav``)."""

    folders: tuple[tuple[str, str], ...] = ()  # (bucket, folder); folder "" = the whole bucket

    @classmethod
    def from_settings(cls, entries: Sequence[str]) -> "S3Allowlist":
        return cls(tuple((bucket, folder.strip("/")) for bucket, _, folder in (e.partition("/") for e in entries)))

    def allows(self, bucket: str, key: str) -> bool:
        # Keys with ".", ".." or empty segments are refused: a server that normalises paths
        # would read them outside the folder.
        if {"", ".", ".."} & set(key.split("/")):
            return False
        return any(bucket == b and (not folder or key.startswith(f"{folder}/")) for b, folder in self.folders)


def _no_such_object() -> FetchFailed:
    # One answer for every object that is missing, denied to the server's credentials or outside
    # the allowlist, so that answers never tell which objects exist.
    return FetchFailed("The object does not exist, or may not be read", status=404)


def fetch_s3(url: str, out: BinaryIO, limits: FetchLimits, allowlist: S3Allowlist | None, filesystem=None) -> None:
    """Stream ``s3://bucket/key`` into ``out`` via s3fs (credentials and endpoint from AWS_*).

    ``allowlist`` limits the objects read; None reads whatever the credentials reach (for the
    operator's own jobs, never for URLs from API callers).
    """
    parts = urlsplit(url)
    if not parts.netloc or not parts.path.strip("/"):
        raise InvalidParameter(f"Not a valid s3 URL (s3://bucket/key): {url}", param="url")
    bucket, key = parts.netloc, parts.path[1:]
    if allowlist is not None and not allowlist.allows(bucket, key):
        raise _no_such_object()
    if filesystem is None:
        import s3fs

        filesystem = s3fs.S3FileSystem(
            config_kwargs={
                "connect_timeout": limits.connect_timeout_s,
                "read_timeout": limits.read_timeout_s,
                "retries": {"max_attempts": 3},
            }
        )
    path = f"{bucket}/{key}"
    # s3fs is asynchronous underneath: the read runs on its event loop under a deadline that
    # cancels whatever it waits on, as for http(s), instead of a check between chunks that an
    # endpoint sending a byte at a time never lets happen.
    future = asyncio.run_coroutine_threadsafe(_fetch_s3(filesystem, path, _Sink(out, limits), limits), filesystem.loop)
    try:
        future.result()
    except (FileNotFoundError, PermissionError):
        raise _no_such_object() from None
    except (OSError, ValueError, aiohttp.ClientError) as exc:
        raise FetchFailed(f"Could not read {url}: {exc}") from None


async def _fetch_s3(filesystem, path: str, sink: _Sink, limits: FetchLimits) -> None:
    try:
        async with asyncio.timeout(limits.total_timeout_s) as deadline:
            info = await filesystem._info(path)
            if info.get("type", "file") != "file":  # a folder: no object of that name
                raise _no_such_object()
            size = info.get("size")
            if size is not None and size > limits.max_bytes:
                raise FileTooLarge(limits.max_mb)
            remote = await filesystem.open_async(path, "rb")
            try:
                while chunk := await remote.read(_CHUNK):
                    sink.write(chunk)  # a local spool file: no wait worth leaving the loop for
            finally:
                await remote.close()
    except TimeoutError:
        if not deadline.expired():  # a connect or read timeout of the client: an OSError like others
            raise
        raise FetchFailed(f"The download did not finish within {limits.total_timeout_s:g} s") from None
