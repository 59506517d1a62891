"""Fetching a user's `image_url` without letting the user reach what the server can reach.

Every hop (the URL, then each redirect) is resolved here, each resolved address is checked
against the public-internet rule (or the deployment's allow-list), and the connection is
pinned to the checked address: a DNS answer that changes between the check and the connect
(DNS rebinding) cannot move it. The whole fetch has one deadline and one byte cap. Every
failure is the same `FetchRefused` so the error cannot be used to map what is behind a URL;
the real reason goes to the log.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import httpx

log = logging.getLogger(__name__)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

# Cloud metadata endpoints that are not in a reserved range everywhere (AWS's IPv6 one is ULA
# and already private; Alibaba's 100.100.100.200 sits in the shared CGNAT range).
METADATA = (ipaddress.ip_network("100.100.100.200/32"), ipaddress.ip_network("fd00:ec2::254/128"))


class FetchRefused(ValueError):
    """The URL could not be fetched as an image; deliberately says nothing more."""

    def __init__(self, what: str, reason: str):
        super().__init__(f"{what}: could not fetch an image from that URL")
        self.reason = reason  # for the log only


@dataclass(frozen=True)
class FetchPolicy:
    """max_bytes: the body cap (the upload cap); timeout_s: for the whole fetch, redirects
    included; allow: networks a deployment trusts although they are not public (internal
    image stores; the tests' loopback server)."""

    max_bytes: int
    timeout_s: float = 10.0
    max_redirects: int = 3
    allow: tuple[Network, ...] = ()

    @staticmethod
    def parse_allow(entries: list[str] | str | None) -> tuple[Network, ...]:
        if not entries:
            return ()
        if isinstance(entries, str):
            entries = [e for e in entries.replace(",", " ").split() if e]
        return tuple(ipaddress.ip_network(e, strict=False) for e in entries)

    def permits(self, address: Address) -> bool:
        if any(address in net for net in self.allow):
            return True
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return address.is_global and not address.is_multicast and not any(address in net for net in METADATA)


async def resolve(host: str, port: int) -> list[Address]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]


async def _pinned_target(url: str, policy: FetchPolicy) -> tuple[str, str, str]:
    """(URL with the host replaced by a checked address, Host header, TLS server name)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise PermissionError(f"scheme or host not allowed: {parts.scheme!r}")
    if parts.username or parts.password:
        raise PermissionError("credentials in URL")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    addresses = await resolve(parts.hostname, port)
    refused = [a for a in addresses if not policy.permits(a)]
    if refused or not addresses:
        # every answer must pass: a name with one public and one private address is refused
        raise PermissionError(f"{parts.hostname} resolves to {refused or 'nothing'}")
    address = addresses[0]
    netloc = f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=netloc).geturl(), host, parts.hostname


async def _fetch(url: str, policy: FetchPolicy) -> bytes:
    # trust_env=False: no proxy from the environment may carry the request elsewhere
    async with httpx.AsyncClient(follow_redirects=False, trust_env=False, timeout=policy.timeout_s) as client:
        for _ in range(policy.max_redirects + 1):
            target, host, server_name = await _pinned_target(url, policy)
            request = client.build_request("GET", target, headers={"Host": host, "Accept": "image/*"},
                                           extensions={"sni_hostname": server_name})
            response = await client.send(request, stream=True)
            try:
                if response.is_redirect:
                    url = urljoin(url, response.headers["location"])
                    continue
                response.raise_for_status()
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > policy.max_bytes:
                    raise OverflowError(f"declared {declared} bytes")
                body = bytearray()
                async for chunk in response.aiter_raw():  # raw: a gzip bomb is not inflated
                    body += chunk
                    if len(body) > policy.max_bytes:
                        raise OverflowError(f"over {policy.max_bytes} bytes")
                return bytes(body)
            finally:
                await response.aclose()
        raise PermissionError(f"more than {policy.max_redirects} redirects")


async def fetch_image_bytes(url: str, policy: FetchPolicy, what: str = "image") -> bytes:
    """The body at `url` under `policy`, or FetchRefused (one message for every failure)."""
    try:
        async with asyncio.timeout(policy.timeout_s):
            return await _fetch(url, policy)
    except (PermissionError, OverflowError, TimeoutError, OSError, httpx.HTTPError, ValueError) as e:
        log.info("image_url refused: %s: %s", type(e).__name__, e)
        raise FetchRefused(what, f"{type(e).__name__}: {e}") from None
