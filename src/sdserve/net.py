"""Outbound requests to URLs users give us: http(s) only, and no private or loopback addresses."""

from __future__ import annotations

import asyncio
import ipaddress
import socket

import httpx

from sdserve.errors import ValidationFailed
from sdserve.settings import Settings


class BlockedUrl(ValueError):
    """A URL sdserve refuses to fetch; the message says why, for the client."""


def check_url_syntax(url: str) -> httpx.URL:
    try:
        parsed = httpx.URL(url)
        host, port = parsed.host, parsed.port
    except (httpx.InvalidURL, ValueError):  # ValueError: e.g. a host name IDNA cannot decode
        raise BlockedUrl("is not a valid URL") from None
    if parsed.scheme not in ("http", "https"):
        raise BlockedUrl("URL scheme must be http or https")
    if not host or (port is not None and not 0 < port < 65536):
        raise BlockedUrl("is not a valid URL")
    return parsed


_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_IPV4_COMPATIBLE = ipaddress.ip_network(
    "::/96"
)  # deprecated ::a.b.c.d, still routed by some stacks
_IPV4_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")  # SIIT ::ffff:0:a.b.c.d


def _embedded_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 one carries (mapped, compatible, translated, NAT64, 6to4, Teredo).

    Each can reach the IPv4 host it names, so each must be checked as that IPv4 host.
    """
    low = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    found = []
    if address.ipv4_mapped is not None:
        found.append(address.ipv4_mapped)
    if (
        address in _IPV4_COMPATIBLE
        or address in _IPV4_TRANSLATED
        or any(address in net for net in _NAT64)
    ):
        found.append(low)
    if address.sixtofour is not None:
        found.append(address.sixtofour)
    if address.teredo is not None:
        found.extend(address.teredo)
    return found


def is_blocked_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """True for an address that is not a public unicast one, or carries one that is not."""
    candidates = [address]
    if isinstance(address, ipaddress.IPv6Address):
        candidates += _embedded_ipv4(address)
    return any(
        not a.is_global or a.is_multicast or a.is_reserved or a.is_unspecified for a in candidates
    )


def _check_addresses(host: str, infos: list) -> None:
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%")[0])
        if is_blocked_address(address):
            shown = address.ipv4_mapped if getattr(address, "ipv4_mapped", None) else address
            raise BlockedUrl(
                f"points to a private or local address ({host} is {shown}); this server "
                "refuses those (SDSERVE_ALLOW_PRIVATE_URLS=1 allows them)"
            )


def check_public_url(url: str) -> None:
    """Resolve the host and refuse it if any of its addresses is not a public one."""
    parsed = check_url_syntax(url)
    try:
        infos = socket.getaddrinfo(parsed.host, parsed.port or 443, proto=socket.IPPROTO_TCP)
    except OSError:
        raise BlockedUrl(f"host {parsed.host} could not be resolved") from None
    _check_addresses(parsed.host, infos)


async def acheck_public_url(url: str) -> None:
    parsed = check_url_syntax(url)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            parsed.host, parsed.port or 443, proto=socket.IPPROTO_TCP
        )
    except OSError:
        raise BlockedUrl(f"host {parsed.host} could not be resolved") from None
    _check_addresses(parsed.host, infos)


def guard_hooks(allow_private: bool) -> dict:
    """httpx event hooks that check every request, redirects included, for a sync client."""
    if allow_private:
        return {}
    return {"request": [lambda request: check_public_url(str(request.url))]}


def aguard_hooks(allow_private: bool) -> dict:
    """The same for an httpx.AsyncClient."""
    if allow_private:
        return {}

    async def check(request: httpx.Request) -> None:
        await acheck_public_url(str(request.url))

    return {"request": [check]}


# ---- URLs the server calls later: webhooks, a bucket endpoint, a peer server ------------------


def _later_url_problem(url: str) -> httpx.URL:
    parsed = check_url_syntax(url)
    if parsed.userinfo:  # httpx would send them as Basic auth to whatever host the URL names
        raise BlockedUrl("must not contain a user name or password")
    return parsed


def url_field_errors(url: str | None, settings: Settings, field: str) -> dict[str, list[str]]:
    """Submit-time check of a URL the server will call later; {} when it is acceptable."""
    if not url:
        return {}
    try:
        _later_url_problem(url)
        if not settings.allow_private_urls:
            check_public_url(url)
    except BlockedUrl as exc:
        return {field: [f"The {field} {exc}."]}
    return {}


def require_public_url(url: str | None, settings: Settings, field: str) -> None:
    """url_field_errors, raised as a ValidationFailed naming `field`."""
    errors = url_field_errors(url, settings, field)
    if errors:
        raise ValidationFailed(errors)


async def arequire_public_url(url: str | None, settings: Settings, field: str) -> None:
    """The same, resolving the host off the event loop."""
    if not url:
        return
    try:
        _later_url_problem(url)
        if not settings.allow_private_urls:
            await acheck_public_url(url)
    except BlockedUrl as exc:
        raise ValidationFailed({field: [f"The {field} {exc}."]}) from None


def send_time_url(url: str, allow_private: bool) -> str:
    """The URL to call now, checked again (DNS may have changed since submit), credentials dropped."""
    parsed = check_url_syntax(url)
    if parsed.userinfo:
        parsed = parsed.copy_with(username=None, password=None)
    if not allow_private:
        check_public_url(str(parsed))
    return str(parsed)
