"""A real local HTTP server for audio URLs: files, errors, redirects, slow and huge bodies."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

HUGE_BYTES = 150_000_000
_WAV_HEADER = (
    b"RIFF\xff\xff\xff\xffWAVEfmt \x10\x00\x00\x00\x01\x00\x01\x00\x80>\x00\x00\x00}\x00\x00\x02\x00\x10\x00data\xff\xff\xff\xff"
)


class MediaServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {}
        self.hosts_seen: list[str] = []
        self.bytes_sent: dict[str, int] = {}
        self.release = threading.Event()  # set at shutdown so slow handlers end
        self.hold_release = threading.Event()  # set by a test to end the /hold requests
        self.holding = 0  # /hold requests in progress
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    def handle_error(self, request, client_address) -> None:
        # Clients hanging up mid-body is what several tests do on purpose: not worth a traceback.
        import sys

        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def url(self, path: str) -> str:
        return f"{self.base}{path}"

    def __enter__(self) -> "MediaServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: MediaServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def do_HEAD(self) -> None:  # noqa: N802
        # /s3drip/KEY: an S3 endpoint (path-style) whose objects exist and then drip (see _drip).
        if not self.path.startswith("/s3drip/"):
            return self._status(404)
        self.send_response(200)
        self.send_header("Content-Length", str(len(_WAV_HEADER) + 1_000_000))
        self.send_header("ETag", '"0"')
        self.send_header("Last-Modified", "Tue, 01 Dec 2026 00:00:00 GMT")
        self.end_headers()

    def do_GET(self) -> None:  # noqa: N802
        parts = urlsplit(self.path)
        if parts.path.startswith("/s3drip/"):
            return self._drip(in_headers=False, seconds=10)
        query = parse_qs(parts.query)
        self.server.hosts_seen.append(self.headers.get("Host", ""))
        if parts.path.startswith("/files/"):
            data = self.server.files.get(parts.path[len("/files/") :])
            if data is None:
                return self._status(404)
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        elif parts.path.startswith("/status/"):
            self._status(int(parts.path.rsplit("/", 1)[1]))
        elif parts.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", query["to"][0])
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif parts.path == "/slow":
            # Headers never come: the client's read timeout must fire first.
            self.server.release.wait(timeout=20)
            self._status(200)
        elif parts.path.startswith("/slowfile/"):
            self._slow_file(parts.path[len("/slowfile/") :], float(query.get("seconds", ["5"])[0]))
        elif parts.path == "/hold":
            self._hold()
        elif parts.path in ("/drip", "/drip-headers"):
            self._drip(in_headers=parts.path == "/drip-headers", seconds=float(query.get("seconds", ["10"])[0]))
        elif parts.path in ("/huge-declared", "/huge-chunked"):
            self._huge(declared=parts.path == "/huge-declared")
        else:
            self._status(404)

    def _status(self, code: int) -> None:
        body = f"status {code}".encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _slow_file(self, name: str, seconds: float) -> None:
        """A registered file, trickled evenly over ``seconds``."""
        data = self.server.files[name]
        self.server.holding += 1
        try:
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            steps = max(1, int(seconds / 0.1))
            size = -(-len(data) // steps)
            for i in range(0, len(data), size):
                self.wfile.write(data[i : i + size])
                self.wfile.flush()
                if self.server.release.wait(timeout=0.1):
                    break
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            self.server.holding -= 1

    def _hold(self) -> None:
        """Keeps a download alive (a byte every 0.2 s) until the test sets ``hold_release``,
        then hangs up mid-body, so the fetch fails at once."""
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.server.holding += 1
        try:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(_WAV_HEADER), _WAV_HEADER))
            for _ in range(300):  # at most 60 s
                if self.server.hold_release.wait(timeout=0.2) or self.server.release.is_set():
                    break
                self.wfile.write(b"1\r\n\x00\r\n")
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            self.server.holding -= 1
        self.close_connection = True

    def _drip(self, in_headers: bool, seconds: float) -> None:
        """A byte every 0.1 s for ``seconds``, in the body or before the headers end, then a
        hang-up: every read gets a byte long before a read timeout, so only a deadline on the
        whole download ends it early."""
        try:
            if in_headers:
                self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Drip: ")
            else:
                self.send_response(200)
                self.send_header("Content-Length", str(len(_WAV_HEADER) + 1_000_000))
                self.end_headers()
                self.wfile.write(_WAV_HEADER)
            self.wfile.flush()
            for _ in range(int(seconds / 0.1)):
                if self.server.release.wait(timeout=0.1):
                    break
                self.wfile.write(b"a" if in_headers else b"\x00")
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass
        self.close_connection = True

    def _huge(self, declared: bool) -> None:
        """A 150 MB WAV body; counts what the client actually read before hanging up."""
        key = self.path
        self.server.bytes_sent[key] = 0
        self.send_response(200)
        if declared:
            self.send_header("Content-Length", str(HUGE_BYTES))
        else:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        chunk = b"\x00" * (1 << 20)
        sent = 0
        try:
            first = _WAV_HEADER + chunk[len(_WAV_HEADER) :]
            while sent < HUGE_BYTES and not self.server.release.is_set():
                data = first if sent == 0 else chunk
                if declared:
                    self.wfile.write(data)
                else:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                sent += len(data)
                self.server.bytes_sent[key] = sent
            if not declared:
                self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        self.close_connection = True


class WebhookReceiver(ThreadingHTTPServer):
    """Records webhook deliveries and verifies their signatures; can fail the first N."""

    daemon_threads = True

    def __init__(self, secret: str) -> None:
        super().__init__(("127.0.0.1", 0), _ReceiverHandler)
        from pipeline.service.webhooks import webhook_signer

        self.verifier = webhook_signer(secret)
        self.fail_first: dict[str, int] = {}  # path -> how many attempts answer 500 first
        self.attempts: list[tuple[str, dict, str]] = []  # (path, headers, body) of every attempt
        self.deliveries: list[tuple[str, dict, dict]] = []  # accepted: (path, headers, payload)
        self.bad_signatures = 0
        self.huge_bytes_sent = 0  # how much of /huge's endless answer went out before the client hung up
        self.hostile_done = threading.Event()  # /drip or /huge saw the client hang up
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"

    def delivered(self, path: str) -> list[dict]:
        with self._lock:
            return [payload for p, _, payload in self.deliveries if p == path]

    def __enter__(self) -> "WebhookReceiver":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()


class _ReceiverHandler(BaseHTTPRequestHandler):
    server: WebhookReceiver
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:  # noqa: N802
        import json

        body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
        headers = {k.lower(): v for k, v in self.headers.items()}
        server = self.server
        with server._lock:
            server.attempts.append((self.path, headers, body))
            remaining = server.fail_first.get(self.path, 0)
            if remaining:
                server.fail_first[self.path] = remaining - 1
        if remaining:
            return self._answer(500)
        if self.path.startswith(("/drip", "/huge")):
            return self._hostile()
        try:
            payload = server.verifier.verify(body, headers)
        except Exception:
            with server._lock:
                server.bad_signatures += 1
            return self._answer(400)
        with server._lock:
            server.deliveries.append((self.path, headers, payload if isinstance(payload, dict) else json.loads(body)))
        self._answer(204)

    def _answer(self, code: int) -> None:
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _hostile(self) -> None:
        """/drip: the status line one byte every 0.2 s, for up to 60 s; /huge: 200 with an endless
        body (up to 2 GB). Both stop when the client hangs up."""
        import time

        try:
            if self.path.startswith("/drip"):
                deadline = time.monotonic() + 60
                for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 0" + b" " * 10_000:
                    if time.monotonic() > deadline:
                        break
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(0.2)
            else:
                self.send_response(200)
                self.send_header("Content-Length", str(2 * 10**9))
                self.end_headers()
                chunk = b"x" * 65536
                while self.server.huge_bytes_sent < 2 * 10**9:
                    self.wfile.write(chunk)
                    self.server.huge_bytes_sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            self.server.hostile_done.set()
            self.close_connection = True
