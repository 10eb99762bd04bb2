"""Fetching through the SSRF guard against a real local server and moto's S3 server.

Only loopback is ever contacted: names are mapped to loopback addresses by an injected resolver,
and non-loopback addresses appear only in pure checks that open no connection.
"""

import ipaddress
import io
import threading
import time

import numpy as np
import pytest

from conftest import S3_BUCKET
from media import encode, wav_bytes
from pipeline.core.errors import FetchFailed, FileTooLarge, ForbiddenUrl, InvalidParameter
from pipeline.audio.urls import UrlGuard, is_public_address
from pipeline.audio.loader import AudioLoader
from pipeline.core.settings import Settings
from servers import HUGE_BYTES

TONE = wav_bytes(0.1 * np.sin(np.arange(16000) / 10).astype(np.float32))


def loader(resolver=None, **overrides) -> AudioLoader:
    settings = Settings(**{"url_allowlist": ["127.0.0.1/32"], "s3_allow": [S3_BUCKET], "fetch_read_timeout_s": 1.0, **overrides})
    return AudioLoader(settings, resolver=resolver) if resolver else AudioLoader(settings)


def fake_dns(table):
    def resolve(host, port):
        if host not in table:
            raise OSError(f"unknown host {host}")
        return table[host]

    return resolve


@pytest.mark.parametrize(
    "address, public",
    [
        ("8.8.8.8", True), ("2606:4700::1111", True),
        ("127.0.0.1", False), ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.1.1", False),
        ("169.254.169.254", False), ("100.64.0.1", False), ("0.0.0.0", False), ("224.0.0.1", False),
        ("240.0.0.1", False), ("::1", False), ("fe80::1", False), ("fc00::1", False), ("ff02::1", False),
        ("::ffff:127.0.0.1", False), ("::ffff:10.0.0.1", False), ("::ffff:8.8.8.8", True),
        ("fec0::1", False), ("64:ff9b::a00:1", False), ("64:ff9b::808:808", True),
        # Regression (review finding 9): 6to4 and Teredo addresses carry an IPv4 address, which is
        # where their packets go; ipaddress calls every 6to4 address global.
        ("2002:7f00:1::1", False), ("2002:a00:1::1", False), ("2002:a9fe:a9fe::1", False), ("2002:808:808::1", True),
        # Teredo: server 65.54.227.120, client (bits inverted) 10.0.0.1 / 8.8.8.8; server 10.0.0.1.
        ("2001:0:4136:e378:8000:63bf:f5ff:fffe", False), ("2001:0:a00:1:8000:63bf:f7f7:f7f7", False),
        ("2001:0:4136:e378:8000:63bf:f7f7:f7f7", True),
        # IPv4-compatible (deprecated), IPv4-translated (SIIT), local-use NAT64: refused whatever they embed.
        ("::7f00:1", False), ("::808:808", False), ("::ffff:0:a00:1", False), ("64:ff9b:1::a00:1", False),
    ],
)
def test_address_classification(address, public):
    assert is_public_address(ipaddress.ip_address(address)) is public


def test_guard_checks_every_resolved_address_without_connecting():
    guard = UrlGuard.from_settings(False, [], fake_dns({"mixed.test": ["8.8.8.8", "10.0.0.1"], "public.test": ["8.8.4.4"]}))
    assert guard.resolve("https://public.test/a.wav") == "8.8.4.4"
    with pytest.raises(ForbiddenUrl):
        guard.resolve("http://mixed.test/a.wav")
    with pytest.raises(ForbiddenUrl):
        guard.resolve("http://[::1]:8000/a.wav")
    assert UrlGuard.from_settings(True, [], fake_dns({})).resolve("http://10.0.0.1/") == "10.0.0.1"
    assert UrlGuard.from_settings(False, ["10.0.0.0/8"], fake_dns({})).resolve("http://10.0.0.1/") == "10.0.0.1"
    with pytest.raises(FetchFailed):
        guard.resolve("http://unknown.test/a.wav")


def test_guard_refuses_names_resolving_to_embedded_private_ipv4():
    # Only an injected resolver: no packet is ever sent to these addresses.
    guard = UrlGuard.from_settings(False, [], fake_dns({
        "sixtofour.test": ["2002:7f00:1::1"], "teredo.test": ["2001:0:4136:e378:8000:63bf:f5ff:fffe"],
        "public6to4.test": ["2002:808:808::1"],
    }))
    for host in ("sixtofour.test", "teredo.test"):
        with pytest.raises(ForbiddenUrl):
            guard.resolve(f"http://{host}/a.wav")
    with pytest.raises(ForbiddenUrl):
        guard.resolve("http://[2002:a9fe:a9fe::1]/latest/meta-data/")  # 169.254.169.254 inside
    assert guard.resolve("http://public6to4.test/a.wav") == "2002:808:808::1"


def test_fetch_connects_to_the_checked_address_with_the_original_host(media_server):
    media_server.files["tone.wav"] = TONE
    port = media_server.server_address[1]
    audio = loader(fake_dns({"media.test": ["127.0.0.1"]})).from_url(f"http://media.test:{port}/files/tone.wav")
    assert audio.duration_s == pytest.approx(1.0)
    assert media_server.hosts_seen[-1] == f"media.test:{port}"


def test_private_targets_refused_by_default(media_server):
    media_server.files["tone.wav"] = TONE
    strict = loader(url_allowlist=[])
    with pytest.raises(ForbiddenUrl):
        strict.from_url(media_server.url("/files/tone.wav"))
    with pytest.raises(ForbiddenUrl):
        loader(fake_dns({"sneaky.test": ["127.0.0.1"]}), url_allowlist=[]).from_url("http://sneaky.test/x.wav")
    assert loader(url_allowlist=[], allow_private_urls=True).from_url(media_server.url("/files/tone.wav")).duration_s == pytest.approx(1.0)


def test_redirects_are_followed_and_rechecked(media_server):
    media_server.files["tone.wav"] = TONE
    port = media_server.server_address[1]
    ok = media_server.url(f"/redirect?to=http://127.0.0.1:{port}/files/tone.wav")
    assert loader().from_url(ok).duration_s == pytest.approx(1.0)
    # 127.0.0.2 is loopback but outside the allowlist: the hop is refused before any connection.
    seen = len(media_server.hosts_seen)
    with pytest.raises(ForbiddenUrl):
        loader().from_url(media_server.url(f"/redirect?to=http://127.0.0.2:{port}/files/tone.wav"))
    with pytest.raises(ForbiddenUrl):
        loader(fake_dns({"inside.test": ["127.0.0.3"], "127.0.0.1": ["127.0.0.1"]})).from_url(
            media_server.url(f"/redirect?to=http://inside.test:{port}/files/tone.wav")
        )
    assert len(media_server.hosts_seen) == seen + 2  # only the two redirecting requests arrived
    with pytest.raises(ForbiddenUrl):
        loader().from_url(media_server.url("/redirect?to=file:///etc/passwd"))


def test_redirect_loops_end(media_server):
    loop = media_server.url("/redirect?to=/redirect?to=/redirect?to=/files/none")
    with pytest.raises(FetchFailed):
        loader(fetch_max_redirects=1).from_url(loop)


@pytest.mark.parametrize("code", [403, 404, 500, 503])
def test_remote_errors_become_fetch_failed_with_status(media_server, code):
    with pytest.raises(FetchFailed) as info:
        loader().from_url(media_server.url(f"/status/{code}"))
    assert info.value.to_body()["status"] == code


def test_timeouts_and_refused_connections(media_server):
    with pytest.raises(FetchFailed, match="[Tt]imed out"):
        loader(fetch_read_timeout_s=0.5).from_url(media_server.url("/slow"))
    with pytest.raises(FetchFailed):
        loader().from_url("http://127.0.0.1:9/nothing-listens-here.wav")


@pytest.mark.parametrize("path", ["/drip", "/drip-headers"])
def test_slow_drip_ends_at_the_total_deadline(media_server, path):
    # Regression (review finding 7): the deadline was checked only between 256 KiB chunks, so a
    # server sending a byte every 0.1 s held a fetch thread for as long as it liked.
    started = time.monotonic()
    with pytest.raises(FetchFailed, match="did not finish within 1 s"):
        loader(fetch_total_timeout_s=1.0, fetch_read_timeout_s=5.0).from_url(media_server.url(f"{path}?seconds=10"))
    assert time.monotonic() - started < 3.0


def test_slow_s3_endpoint_ends_at_the_total_deadline(media_server):
    # Regression (review finding 7, left over): s3:// reads checked the deadline only between
    # 256 KiB chunks, so an endpoint sending a byte every 0.1 s held the fetch for 10 s.
    import s3fs

    from pipeline.audio.fetch import FetchLimits, fetch_s3

    endpoint = media_server.url("/").rstrip("/")
    filesystem = s3fs.S3FileSystem(key="k", secret="s", endpoint_url=endpoint, skip_instance_cache=True,
                                   config_kwargs={"read_timeout": 5, "retries": {"max_attempts": 1}})
    limits = FetchLimits(max_bytes=10_000_000, max_mb=10, read_timeout_s=5.0, total_timeout_s=1.0)
    started = time.monotonic()
    with pytest.raises(FetchFailed, match="did not finish within 1 s"):
        fetch_s3("s3://s3drip/a.wav", io.BytesIO(), limits, allowlist=None, filesystem=filesystem)
    assert time.monotonic() - started < 3.0


def test_slow_dns_ends_at_the_total_deadline(media_server):
    # Regression (review finding 7): name resolution had no timeout at all.
    answered = threading.Event()

    def silent_dns(host, port):  # a DNS server that does not answer (for 10 s)
        answered.wait(timeout=10)
        return ["127.0.0.1"]

    port = media_server.server_address[1]
    started = time.monotonic()
    try:
        with pytest.raises(FetchFailed, match="did not finish within 1 s"):
            loader(silent_dns, fetch_total_timeout_s=1.0).from_url(f"http://silent-dns.test:{port}/files/tone.wav")
        assert time.monotonic() - started < 3.0
    finally:
        answered.set()


def test_huge_bodies_are_cut_off(media_server):
    with pytest.raises(FileTooLarge) as info:
        loader().from_url(media_server.url("/huge-declared"))
    assert info.value.to_body()["max_size_mb"] == 100
    with pytest.raises(FileTooLarge):
        loader().from_url(media_server.url("/huge-chunked"))
    # The chunked body was read up to the cap and no further (socket buffers hold a few MB).
    sent = media_server.bytes_sent["/huge-chunked"]
    assert 100_000_000 < sent < 110_000_000 < HUGE_BYTES


def test_bad_urls():
    for url in ("ftp://host/a.wav", "file:///etc/passwd", "no-scheme", "http://", "s3://bucket-only", "http://[::1", "http://h:99999/"):
        with pytest.raises(InvalidParameter):
            loader().from_url(url)


FLAC_TONE = encode(np.frombuffer(TONE[44:], dtype="<i2").astype(np.float32) / 32768, "flac")


def test_s3_objects(s3_server, clips):
    s3_server.put_object(Bucket=S3_BUCKET, Key="dir/tone.flac", Body=FLAC_TONE)
    audio = loader().from_url(f"s3://{S3_BUCKET}/dir/tone.flac")
    assert audio.source_format == "flac" and audio.duration_s == pytest.approx(1.0)
    with pytest.raises(FetchFailed) as info:
        loader().from_url(f"s3://{S3_BUCKET}/dir/missing.wav")
    assert info.value.to_body()["status"] == 404
    with pytest.raises(FetchFailed):
        loader().from_url("s3://no-such-bucket/a.wav")
    s3_server.put_object(Bucket=S3_BUCKET, Key="big.wav", Body=b"\x00" * 1_500_000)
    with pytest.raises(FileTooLarge):
        loader(max_file_mb=1).from_url(f"s3://{S3_BUCKET}/big.wav")


# Regression (review finding 10): any key holder could read any object the server's credentials
# reach, and 404, 403 and "not audio" told which objects exist.
def test_s3_urls_reach_only_allowed_buckets_and_folders(s3_server):
    for key in ("calls/tone.flac", "callsign/tone.flac", "private/tone.flac"):
        s3_server.put_object(Bucket=S3_BUCKET, Key=key, Body=FLAC_TONE)
    scoped = loader(s3_allow=[f"{S3_BUCKET}/calls"])
    assert scoped.from_url(f"s3://{S3_BUCKET}/calls/tone.flac").duration_s == pytest.approx(1.0)
    for key in ("private/tone.flac", "callsign/tone.flac", "calls/../private/tone.flac", "calls/./tone.flac"):
        with pytest.raises(FetchFailed):
            scoped.from_url(f"s3://{S3_BUCKET}/{key}")
    for url in (f"s3://{S3_BUCKET.upper()}/calls/tone.flac", f"s3://user@{S3_BUCKET}/calls/tone.flac"):
        with pytest.raises(FetchFailed):
            scoped.from_url(url)
    with pytest.raises(FetchFailed):  # nothing allowed: s3 URLs are refused
        loader(s3_allow=[]).from_url(f"s3://{S3_BUCKET}/calls/tone.flac")


class _DeniedS3:
    """An S3 filesystem whose credentials may read nothing (moto grants everything), with the
    async side of s3fs that the fetch uses: its event loop, ``_info`` and ``open_async``."""

    def __init__(self) -> None:
        import fsspec.asyn

        self.loop = fsspec.asyn.get_loop()

    async def _info(self, path):
        raise PermissionError(f"Access Denied: {path}")

    async def open_async(self, path, *args, **kwargs):
        raise PermissionError(f"Access Denied: {path}")


def test_refused_missing_and_denied_s3_objects_answer_alike(s3_server):
    s3_server.put_object(Bucket=S3_BUCKET, Key="private/notes.txt", Body=b"not audio")
    s3_server.put_object(Bucket=S3_BUCKET, Key="calls/folder/tone.flac", Body=FLAC_TONE)
    scoped = loader(s3_allow=[f"{S3_BUCKET}/calls", "hark-no-such-bucket"])
    bodies = []
    for url in (
        f"s3://{S3_BUCKET}/private/notes.txt",  # exists, not audio, outside the allowlist
        f"s3://{S3_BUCKET}/private/missing.wav",  # outside and missing
        f"s3://{S3_BUCKET}/calls/missing.wav",  # allowed, missing
        f"s3://{S3_BUCKET}/calls/folder",  # allowed, a folder rather than an object
        "s3://hark-no-such-bucket/a.wav",  # allowed bucket that does not exist
        "s3://other-bucket/a.wav",  # another bucket
    ):
        with pytest.raises(FetchFailed) as info:
            scoped.from_url(url)
        bodies.append(info.value.to_body())
    denied = AudioLoader(Settings(s3_allow=["locked"]), s3_filesystem=_DeniedS3())
    with pytest.raises(FetchFailed) as info:
        denied.from_url("s3://locked/a.wav")
    bodies.append(info.value.to_body())
    assert bodies[0]["code"] == "FETCH_FAILED" and bodies[0]["status"] == 404
    assert all(body == bodies[0] for body in bodies), bodies


def test_operator_batch_jobs_read_any_s3_object(s3_server):
    from hark.batch import decode_row

    s3_server.put_object(Bucket=S3_BUCKET, Key="private/tone.flac", Body=FLAC_TONE)
    row = decode_row({"uri": f"s3://{S3_BUCKET}/private/tone.flac", "options": {}}, Settings(s3_allow=[]))
    assert row["error"] == "" and len(row["pcm"]) == 16000 * 2  # 1 s of 16-bit PCM


# ---- the bad-input corpus (review: hardening, last part) ---------------------------------------

@pytest.mark.parametrize("param", ["url", "callback_url"])
def test_urls_with_control_characters_are_refused(param):
    """Regression: a CR/LF in a URL was dropped by urlsplit but kept in the string: an audio URL
    then failed inside httpx (500 INTERNAL_ERROR) and a callback_url was accepted as given."""
    guard = UrlGuard.from_settings(False, ["127.0.0.1/32"], fake_dns({}))
    for url in ("http://127.0.0.1/hook\r\nX-Injected: 1", "http://127.0.0.1/a\tb", "http://127.0.0.1/a\x00b", "http://127.0.0.1/\x7f"):
        with pytest.raises(InvalidParameter) as info:
            guard.resolve(url, param=param)
        assert info.value.extra == {"param": param}
    # A space in a path is sloppy but unambiguous: it is percent-encoded on the way out.
    assert guard.resolve("http://127.0.0.1/my file.wav", param=param) == "127.0.0.1"


def recording_dns(table):
    asked: list[str] = []
    lookup = fake_dns(table)

    def resolve(host, port):
        asked.append(host)
        return lookup(host, port)

    return resolve, asked


def test_hosts_are_read_as_browsers_read_them():
    """Regression: percent-encoded and odd hosts went to DNS as written ("%31%32%37.0.0.2",
    "media server"), where browsers (the WHATWG URL standard) read 127.0.0.2 or refuse the URL."""
    resolver, asked = recording_dns({"example.test": ["8.8.8.8"], "xn--bcher-kva.test": ["8.8.4.4"]})
    guard = UrlGuard.from_settings(False, [], resolver)
    for url in ("http://%31%32%37.0.0.2/a.wav", "http://①②⑦.0.0.2/a.wav", "http://127%2e0.0.2/a.wav"):
        with pytest.raises(ForbiddenUrl):
            guard.resolve(url)
    for url in ("http://media%20server/a.wav", "http://a%2fb/a.wav", "http://%ff/a.wav", "http://a\u3000b/a.wav"):
        with pytest.raises(InvalidParameter):
            guard.resolve(url)
    assert asked == []  # none of these was a name to look up
    assert guard.resolve("http://EX%41MPLE.test/a.wav") == "8.8.8.8"
    assert guard.resolve("http://Bücher.test/a.wav") == "8.8.4.4"
    assert asked == ["example.test", "xn--bcher-kva.test"]


def test_idn_and_encoded_hosts_are_fetched_by_their_ascii_name(media_server):
    """Regression: a URL whose host is not ASCII (here one that maps to 127.0.0.1) failed inside
    httpx with a 500; it is fetched, and the Host header carries the host's ASCII form."""
    media_server.files["tone.wav"] = TONE
    port = media_server.server_address[1]
    assert loader().from_url(f"http://①②⑦.0.0.1:{port}/files/tone.wav").duration_s == pytest.approx(1.0)
    assert media_server.hosts_seen[-1] == f"127.0.0.1:{port}"
    idn = loader(fake_dns({"xn--bcher-kva.test": ["127.0.0.1"]}))
    assert idn.from_url(f"http://user:pw@bücher.test:{port}/files/tone.wav").duration_s == pytest.approx(1.0)
    assert media_server.hosts_seen[-1] == f"xn--bcher-kva.test:{port}"  # no credentials either
