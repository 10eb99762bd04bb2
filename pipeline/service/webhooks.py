"""Webhook delivery, signed the Standard Webhooks way, to callback URLs that pass the SSRF guard."""

from __future__ import annotations

import asyncio
import datetime
import functools
import json
import ssl
from concurrent.futures import Executor
import random
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

import httpx
from standardwebhooks import Webhook

from pipeline.core.errors import HarkError
from pipeline.audio.fetch import request_to
from pipeline.audio.urls import UrlGuard

# Besides 2xx (done) and 5xx (retry), these mean "try again later" too.
_RETRYABLE_4XX = {408, 429}


def webhook_signer(secret: str) -> Webhook:
    """``whsec_<base64>`` keys with the decoded bytes (as the Standard Webhooks libraries do);
    any other string keys with its UTF-8 bytes."""
    return Webhook(secret if secret.startswith("whsec_") else secret.encode())


@dataclass(frozen=True)
class Attempt:
    delivered: bool
    retry: bool  # worth trying again
    status: int | None = None
    error: str | None = None
    retry_after_s: float | None = None  # what the receiver asked for


def backoff_s(attempt: int, base_s: float, max_s: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with jitter: attempt 1 waits ~base, then doubling, capped."""
    ceiling = min(max_s, base_s * 2 ** max(0, attempt - 1))
    return (rng or random).uniform(ceiling / 2, ceiling)


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    if value.strip().isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - datetime.datetime.now(datetime.timezone.utc)).total_seconds())


@functools.cache
def _tls() -> ssl.SSLContext:
    """httpx's default TLS context, built once. Building it loads the CA bundle: 25-250 ms of CPU
    that every delivery used to spend on the runner's event loop (100 webhooks stalled two runners'
    claims and lease renewals for ~24 s)."""
    return httpx.create_ssl_context(trust_env=False)


async def deliver(url: str, payload: dict, msg_id: str, signer: Webhook, guard: UrlGuard, timeout_s: float,
                  resolver: Executor | None = None) -> Attempt:
    """One delivery attempt, over within ``timeout_s`` on the wall clock whatever the receiver does
    (DNS included: it runs on ``resolver``, a bounded pool). The answer's body is never read: only
    the status line and headers matter, so a receiver that drips or sends gigabytes costs nothing."""
    body = json.dumps(payload, separators=(",", ":"))
    now = datetime.datetime.now(datetime.timezone.utc)
    headers = {
        "Content-Type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": signer.sign(msg_id, now, body),
        "User-Agent": "Hark-Webhooks/1",
    }
    try:
        async with asyncio.timeout(timeout_s):
            ip = await asyncio.get_running_loop().run_in_executor(resolver, guard.resolve, url, "callback_url")
            async with httpx.AsyncClient(timeout=timeout_s, follow_redirects=False, trust_env=False,
                                         verify=_tls()) as client:
                request = request_to(client, ip, "POST", url, headers=headers, content=body.encode())
                response = await client.send(request, stream=True)
                await response.aclose()  # unread: the connection is dropped, not drained
    except TimeoutError:
        return Attempt(False, retry=True, error=f"No answer within {timeout_s:g} s")
    except HarkError as exc:  # refused by the guard, or the name does not resolve
        return Attempt(False, retry=exc.code == "FETCH_FAILED", error=exc.message)
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        return Attempt(False, retry=not isinstance(exc, httpx.InvalidURL), error=f"{type(exc).__name__}: {exc}")
    status = response.status_code
    if 200 <= status < 300:
        return Attempt(True, retry=False, status=status)
    retry = status >= 500 or status in _RETRYABLE_4XX
    return Attempt(False, retry=retry, status=status, error=f"HTTP {status}",
                   retry_after_s=_retry_after(response.headers.get("retry-after")))
