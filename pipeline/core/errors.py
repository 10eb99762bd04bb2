"""The one error hierarchy of Hark.

Each class carries the API ``code``, the HTTP ``status`` and the extra fields that ``API.md``
promises. Constructors take plain values only, and ``__reduce__`` rebuilds an error from them, so
an error raised in one Ray replica arrives intact in another.
"""

from __future__ import annotations

from typing import Any, ClassVar

SUPPORTED_FORMATS: tuple[str, ...] = ("wav", "mp3", "flac", "ogg", "m4a")


class HarkError(Exception):
    """Base class: an error with a stable API code and HTTP status."""

    code: ClassVar[str] = "INTERNAL_ERROR"
    status: ClassVar[int] = 500

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.extra = extra
        self.extra_headers: dict[str, str] = {}

    def with_headers(self, headers: dict[str, str]) -> "HarkError":
        """Attach informative response headers (e.g. X-RateLimit-*); returns self."""
        self.extra_headers = dict(headers)
        return self

    def __reduce__(self):
        return (_rebuild, (type(self), self.message, self.extra, self.extra_headers))

    def to_body(self) -> dict[str, Any]:
        """The JSON body of ``API.md``: ``{"error", "code", ...extra}``."""
        return {"error": self.message, "code": self.code, **self.extra}

    def headers(self) -> dict[str, str]:
        return dict(self.extra_headers)


def _rebuild(cls: type[HarkError], message: str, extra: dict[str, Any], headers: dict[str, str]) -> HarkError:
    err = cls.__new__(cls)
    HarkError.__init__(err, message, **extra)
    return err.with_headers(headers)


class MissingParameter(HarkError):
    code = "MISSING_PARAMETER"
    status = 400

    def __init__(self, message: str = "Missing required parameter: url or audio file") -> None:
        super().__init__(message)


class InvalidParameter(HarkError):
    code = "INVALID_PARAMETER"
    status = 400

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message, param=param)


class UnsupportedFormat(HarkError):
    code = "UNSUPPORTED_FORMAT"
    status = 400

    def __init__(self, message: str = "Unsupported audio format") -> None:
        super().__init__(message, supported_formats=list(SUPPORTED_FORMATS))


class InvalidAudio(HarkError):
    code = "INVALID_AUDIO"
    status = 400


class Unauthorized(HarkError):
    code = "UNAUTHORIZED"
    status = 401

    def __init__(self, message: str = "Missing or invalid license key") -> None:
        super().__init__(message)


class ForbiddenUrl(HarkError):
    code = "FORBIDDEN_URL"
    status = 403


class NotFound(HarkError):
    code = "NOT_FOUND"
    status = 404


class FileTooLarge(HarkError):
    code = "FILE_TOO_LARGE"
    status = 422

    def __init__(self, max_size_mb: int) -> None:
        super().__init__(f"File exceeds the limit of {max_size_mb} MB", max_size_mb=max_size_mb)


class AudioTooLong(HarkError):
    code = "AUDIO_TOO_LONG"
    status = 422

    def __init__(self, max_duration_s: int) -> None:
        super().__init__(
            f"Audio exceeds the limit of {max_duration_s} seconds", max_duration_s=max_duration_s
        )


class FetchFailed(HarkError):
    code = "FETCH_FAILED"
    status = 422

    def __init__(self, message: str, status: int | None = None) -> None:
        # ``status`` is the remote's HTTP status (or the S3 equivalent), when there was one.
        if status is None:
            super().__init__(message)
        else:
            super().__init__(message, status=status)


class StreamTimeout(HarkError):
    """A live stream sent neither audio nor KeepAlive for too long."""

    code = "TIMEOUT"
    status = 408


class RateLimited(HarkError):
    code = "RATE_LIMITED"
    status = 429

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message, retry_after=retry_after)

    def headers(self) -> dict[str, str]:
        return {**self.extra_headers, "Retry-After": str(self.extra["retry_after"])}


class ServiceUnavailable(HarkError):
    code = "SERVICE_UNAVAILABLE"
    status = 503

    def __init__(self, message: str = "No ASR workers available", retry_after: int = 30) -> None:
        super().__init__(message, retry_after=retry_after)

    def headers(self) -> dict[str, str]:
        return {**self.extra_headers, "Retry-After": str(self.extra["retry_after"])}


def error_from_body(body: dict[str, Any]) -> HarkError:
    """Rebuild an error from its API body (as stored with a failed job)."""
    by_code = {cls.code: cls for cls in HarkError.__subclasses__()}
    cls = by_code.get(body.get("code", ""), HarkError)
    extra = {k: v for k, v in body.items() if k not in ("error", "code")}
    return _rebuild(cls, body.get("error", "Error"), extra, {})


class WorkerLost(ServiceUnavailable):
    """The worker running the request died (it was not merely busy): the same answer to a client,
    but a job runner counts it against the job's runs."""

    def __init__(self, message: str = "The worker handling the request stopped; please retry", retry_after: int = 30) -> None:
        super().__init__(message, retry_after=retry_after)
