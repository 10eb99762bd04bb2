"""URLs given by users: their form checked without a lookup, hosts read as browsers read them,
and the SSRF guard that decides which addresses they may reach.

Apart from ``pipeline.audio.fetch`` (which brings the HTTP and S3 clients) so that the ingress,
which checks ``callback_url`` and audio URLs before a job is queued, needs none of them.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import SplitResult, unquote_to_bytes, urlsplit

import idna

from pipeline.core.errors import FetchFailed, ForbiddenUrl, InvalidParameter

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# (host, port) -> the addresses the host resolves to. Injectable so tests never need real DNS.
Resolver = Callable[[str, int], Sequence[str]]

SUPPORTED_SCHEMES = ("http", "https", "s3")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
# ASCII controls (CR, LF, tab, NUL, DEL): urlsplit drops some of them silently while the string
# keeps them, so what was checked and what an HTTP client is handed would differ.
_CONTROLS = re.compile(r"[\x00-\x1f\x7f]")
# What no host may hold once percent-decoded: the WHATWG URL standard's forbidden domain code points.
_NOT_IN_HOST = re.compile(r"[\x00-\x20\x7f#%/:<>?@\[\\\]^|]")


def shown(text: str, limit: int = 120) -> str:
    """A URL or host quoted in an error message: a hostile one is not echoed back whole."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def normalize_host(host: str) -> str:
    """A URL's host as browsers read it (the WHATWG URL standard): an IP literal as it is; a name
    percent-decoded, mapped to ASCII by IDNA (UTS #46: "Bücher" → "xn--bcher-kva", "①②⑦.0.0.1" →
    "127.0.0.1") and lower-cased. Raises ``ValueError`` for a host that is no name at all."""
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    name = unquote_to_bytes(host).decode("utf-8")  # strict: bytes that are not UTF-8 name nothing
    if not name.isascii():
        name = idna.encode(name, uts46=True).decode("ascii")  # idna's errors are ValueErrors
    if not name or _NOT_IN_HOST.search(name):
        raise ValueError(f"not a host name: {host!r}")
    return name.lower()


def system_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


def is_public_address(ip: IPAddress) -> bool:
    """True for globally routable unicast addresses; False for loopback, private, link-local,
    multicast, reserved, unspecified and shared (CGNAT) space. An IPv6 address that carries an
    IPv4 address its packets are delivered to (mapped, NAT64, 6to4, Teredo) is public only when
    that IPv4 address is."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return is_public_address(ip.ipv4_mapped)
        if ip in _NAT64:  # 64:ff9b::a.b.c.d reaches a.b.c.d through a NAT64 gateway
            return is_public_address(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        # 2002:a.b.c.d::/48 is reached through the 6to4 router at a.b.c.d, which ipaddress
        # still calls global.
        if ip.sixtofour is not None and not is_public_address(ip.sixtofour):
            return False
        if ip.teredo is not None:  # 2001::/32: relayed over UDP to the client, via the server
            server, client = ip.teredo
            return is_public_address(server) and is_public_address(client)
        if ip.is_site_local:  # deprecated fec0::/10, which is_global does not exclude
            return False
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_unspecified)


@dataclass(frozen=True)
class UrlGuard:
    """Decides which addresses URLs given by users may reach."""

    allow_private: bool = False
    allowlist: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    resolver: Resolver = field(default=system_resolver, compare=False)

    @classmethod
    def from_settings(cls, allow_private: bool, allowlist: Sequence[str], resolver: Resolver = system_resolver) -> UrlGuard:
        return cls(allow_private, tuple(ipaddress.ip_network(n, strict=False) for n in allowlist), resolver)

    def allows(self, ip: IPAddress) -> bool:
        return self.allow_private or is_public_address(ip) or any(ip in net for net in self.allowlist)

    @staticmethod
    def check_form(url: str, param: str = "url", schemes: tuple[str, ...] = SUPPORTED_SCHEMES) -> SplitResult:
        """A URL's form (scheme, host, port), checked without any lookup; ``param`` names it in errors."""
        if _CONTROLS.search(url):
            raise InvalidParameter(f"The URL holds control characters (CR, LF, tab, ...): {shown(url)}", param=param)
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - raises for a bad port
        except ValueError:
            raise InvalidParameter(f"Malformed URL: {shown(url)}", param=param) from None
        scheme = parts.scheme.lower()
        if scheme not in schemes:
            raise InvalidParameter(
                f"Unsupported URL scheme {shown(scheme or '(none)')}: use {', '.join(schemes)}", param=param
            )
        if not parts.hostname:
            raise InvalidParameter(f"The URL has no host: {shown(url)}", param=param)
        try:
            normalize_host(parts.hostname)
        except ValueError:
            raise InvalidParameter(f"The URL's host is not a host name: {shown(parts.hostname)}", param=param) from None
        return parts

    def resolve(self, url: str, param: str = "url") -> str:
        """Check an http(s) URL and return the one address to connect to."""
        parts = self.check_form(url, param, schemes=("http", "https"))
        host = normalize_host(parts.hostname)
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
        try:
            literal = ipaddress.ip_address(host)
            candidates = [str(literal)]
        except ValueError:
            try:
                candidates = list(self.resolver(host, port))
            except (OSError, UnicodeError) as exc:
                raise FetchFailed(f"Cannot resolve host {host!r}: {exc}") from None
        if not candidates:
            raise FetchFailed(f"Cannot resolve host {host!r}")
        addresses = [ipaddress.ip_address(c.split("%")[0]) for c in candidates]
        # Every address must pass: otherwise a name with one public and one private record
        # would let a later connection land on the private one.
        refused = [a for a in addresses if not self.allows(a)]
        if refused:
            raise ForbiddenUrl(f"URL host {host!r} resolves to a non-public address, which is not allowed")
        return str(addresses[0])
