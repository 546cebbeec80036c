"""Outbound requests to URLs users give us: http(s) only, and no private or loopback addresses."""

from __future__ import annotations

import asyncio
import ipaddress
import socket

import httpx


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


def _check_addresses(host: str, infos: list) -> None:
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%")[0])
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        if not address.is_global or address.is_multicast:
            raise BlockedUrl(
                f"points to a private or local address ({host} is {address}); this server "
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
