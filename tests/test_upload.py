import asyncio
import json

import httpx
import pytest

from pipeline.core.errors import FileTooLarge, InvalidParameter
from pipeline.service.upload import read_listen_input

MAX = 1_000_000


def _read(content_type, body: bytes, chunk=64 * 1024, declared=True, max_bytes=MAX):
    async def stream():
        for i in range(0, len(body), chunk):
            yield body[i : i + chunk]

    return asyncio.run(
        read_listen_input(content_type, stream(), content_length=len(body) if declared else None, max_bytes=max_bytes, max_mb=1)
    )


def _multipart(files=None, data=None):
    request = httpx.Request("POST", "http://x/", files=files, data=data)
    return request.headers["content-type"], request.read()


def test_json_body():
    got = _read("application/json", json.dumps({"url": "https://a/b.wav", "language": "en"}).encode())
    assert got.url == "https://a/b.wav" and got.audio is None and got.fields == {"language": "en"}


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b'{"url": 5}'])
def test_bad_json(raw):
    with pytest.raises(InvalidParameter):
        _read("application/json", raw)


def test_multipart_file_and_fields():
    ctype, body = _multipart(files={"audio": ("a.bin", b"RIFF" + b"\x01" * 5000)}, data={"timestamps": "true"})
    got = _read(ctype, body, chunk=777)
    assert got.audio == b"RIFF" + b"\x01" * 5000 and got.fields == {"timestamps": "true"} and got.url is None


def test_media_type_is_case_insensitive():
    ctype, body = _multipart(files={"audio": ("a.bin", b"RIFFxxxx")})
    assert _read(ctype.replace("multipart/form-data", "Multipart/Form-Data"), body).audio == b"RIFFxxxx"


def test_multipart_empty_file_is_still_an_upload():
    ctype, body = _multipart(files={"audio": ("a.wav", b"")})
    assert _read(ctype, body).audio == b""


def test_raw_body_is_audio_and_empty_body_is_nothing():
    assert _read("audio/wav", b"RIFFxxxx").audio == b"RIFFxxxx"
    assert _read(None, b"").audio is None


def test_caps_stop_reading():
    consumed = []

    async def endless():
        yield b'--xyz\r\nContent-Disposition: form-data; name="audio"; filename="a.wav"\r\n\r\n'
        while True:
            consumed.append(1)
            yield b"\x00" * 65536

    async def run(ctype):
        return await read_listen_input(ctype, endless(), content_length=None, max_bytes=MAX, max_mb=1)

    for ctype in ("audio/wav", "multipart/form-data; boundary=xyz"):
        consumed.clear()
        with pytest.raises(FileTooLarge):
            asyncio.run(run(ctype))
        # Stopped a chunk past the cap (the form allows 1 MB of room for its fields).
        assert len(consumed) * 65536 <= 2 * MAX + 65536
    with pytest.raises(FileTooLarge):
        _read("audio/wav", b"\x00" * 10, declared=False, max_bytes=5)
    ctype, body = _multipart(files={"audio": ("a.wav", b"\x00" * (MAX + 1))})
    with pytest.raises(FileTooLarge):
        _read(ctype, body)
    # A declared length over the cap is refused before a byte is read.
    with pytest.raises(FileTooLarge):
        asyncio.run(read_listen_input("audio/wav", endless(), content_length=MAX + 1, max_bytes=MAX, max_mb=1))
