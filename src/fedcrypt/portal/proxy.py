"""Believe ``X-Forwarded-For``/``-Proto`` only from explicitly trusted reverse proxies."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def _ip(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    value = value.strip()
    if value.startswith("[") and "]" in value:  # [v6]:port
        value = value[1 : value.index("]")]
    elif value.count(":") == 1:  # v4:port
        value = value.split(":", 1)[0]
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        return None


class TrustedProxies:
    """The reverse proxies whose forwarding headers the portal believes.

    Parameters
    ----------
    networks : iterable of str
        IP addresses or CIDR networks (``--forwarded-allow-ips``). Empty: trust nobody.

    Raises
    ------
    ValueError
        If an entry is not an address or network.
    """

    def __init__(self, networks: Iterable[str]) -> None:
        self.networks: tuple[IPNetwork, ...] = tuple(
            ipaddress.ip_network(n.strip(), strict=False) for n in networks
        )

    def trusts(self, host: str | None) -> bool:
        """Whether ``host`` (a TCP peer or a forwarded hop) is a trusted proxy."""
        if not host or not self.networks:
            return False
        ip = _ip(host)
        return ip is not None and any(ip in net for net in self.networks)

    def client(self, peer: str | None, forwarded_for: str | None) -> str | None:
        """The client's address: the TCP ``peer``, or from a trusted proxy's header.

        ``X-Forwarded-For`` is read right to left (each proxy appends the address it
        saw): the first hop that is not a trusted proxy is the client. The header is
        ignored unless ``peer`` is trusted; a hop that is not an IP address ends the
        walk at the last trusted hop.
        """
        if not forwarded_for or not self.trusts(peer):
            return peer
        current = peer
        for hop in reversed([h for h in forwarded_for.split(",") if h.strip()]):
            ip = _ip(hop)
            if ip is None:
                return current
            current = str(ip)
            if not self.trusts(current):
                return current
        return current


class ForwardedHeadersMiddleware:
    """Replace the ASGI ``client`` and ``scheme`` from a trusted proxy's headers.

    Uvicorn's own proxy handling (which trusts 127.0.0.1 by default) is turned off by
    ``fedcrypt portal serve``; this middleware is the only place forwarding headers are
    read, and only from ``--forwarded-allow-ips``.
    """

    def __init__(self, app: ASGIApp, *, proxies: TrustedProxies) -> None:
        self.app = app
        self.proxies = proxies

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Rewrite the scope of an HTTP request sent through a trusted proxy."""
        if scope["type"] == "http" and self.proxies.networks:
            client = scope.get("client")
            peer = client[0] if client else None
            if self.proxies.trusts(peer):
                xff: list[str] = []
                proto: str | None = None
                for name, value in scope.get("headers", []):
                    if name == b"x-forwarded-for":
                        xff.append(value.decode("latin-1"))
                    elif name == b"x-forwarded-proto":
                        proto = value.decode("latin-1").strip().lower()
                if xff:
                    host = self.proxies.client(peer, ",".join(xff))
                    if host is not None and host != peer:
                        scope = {**scope, "client": (host, 0)}
                if proto in ("http", "https"):
                    scope = {**scope, "scheme": proto}
        await self.app(scope, receive, send)
