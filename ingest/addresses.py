"""Listen addresses, parsed and resolved rather than matched as strings.

The loopback rule (no authentication only on loopback) is decided on the IP
addresses a listen setting names: a literal is parsed with `ipaddress`, a host
name is resolved with getaddrinfo and every address it resolves to must be a
loopback address. The service then binds exactly those addresses, so what was
checked is what is bound (a name cannot resolve differently a moment later).
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Callable, Sequence
from typing import Any

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
GetAddrInfo = Callable[..., Sequence[tuple[Any, ...]]]

# Hosts that mean "every interface": never loopback, never resolved.
WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::", "*"})


class AddressError(ValueError):
    """A listen address that cannot be parsed, resolved or used."""


def split_host_port(listen: str) -> tuple[str, int]:
    """'HOST:PORT' or '[IPV6]:PORT' -> (host without brackets, port)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise AddressError("must be HOST:PORT (port 0..65535)")
    if host.startswith("[") or host.endswith("]"):
        if not (host.startswith("[") and host.endswith("]")) or len(host) < 3:
            raise AddressError("must be HOST:PORT, with an IPv6 address in brackets: [::1]:50051")
        host = host[1:-1]
    elif ":" in host:
        raise AddressError("an IPv6 address must be in brackets, for example [::1]:50051")
    return host, int(port)


def join_host_port(host: str | IPAddress, port: int) -> str:
    text = str(host)
    return f"[{text}]:{port}" if ":" in text else f"{text}:{port}"


def is_loopback(ip: IPAddress) -> bool:
    """127.0.0.0/8 and ::1; also ::ffff:127.x.y.z (an IPv4 loopback address in IPv6 form)."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def resolve(
    host: str, port: int = 0, getaddrinfo: GetAddrInfo = socket.getaddrinfo
) -> tuple[IPAddress, ...]:
    """Every IP address `host` stands for, in getaddrinfo's order, without repeats.

    A wildcard host stands for the unspecified address (0.0.0.0 or ::).
    """
    if host in WILDCARD_HOSTS:
        return (ipaddress.ip_address("::" if host == "::" else "0.0.0.0"),)
    try:
        return (ipaddress.ip_address(host),)
    except ValueError:
        pass
    try:
        infos = getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise AddressError(f"cannot resolve {host!r}: {exc}") from None
    found: list[IPAddress] = []
    for family, *_, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        # a scoped IPv6 address comes back as 'fe80::1%eth0'; the scope does not matter here
        ip = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if ip not in found:
            found.append(ip)
    if not found:
        raise AddressError(f"{host!r} resolves to no IP address")
    return tuple(found)


def loopback_binds(listen: str, getaddrinfo: GetAddrInfo = socket.getaddrinfo) -> tuple[str, ...]:
    """The HOST:PORT literals to bind when every address `listen` names is loopback.

    Raises AddressError naming the first address that is not (or why the
    name could not be resolved).
    """
    host, port = split_host_port(listen)
    addresses = resolve(host, port, getaddrinfo)
    for ip in addresses:
        if ip.is_unspecified:
            raise AddressError(f"{listen} listens on every interface ({ip}), not on loopback")
        if not is_loopback(ip):
            shown = "" if str(ip) == host else f" ({host!r} resolves to {ip})"
            raise AddressError(f"{ip} is not a loopback address{shown}")
    return tuple(join_host_port(ip, port) for ip in addresses)


def port_free(address: str, reuse_port: bool = False) -> bool:
    """Whether a server could listen on the literal IP HOST:PORT now.

    SO_REUSEADDR as a server sets it (a closed socket in TIME_WAIT does not
    count); SO_REUSEPORT only with `reuse_port`, so a port someone listens on
    counts as taken unless both sides asked to share it.
    """
    host, port = split_host_port(address)
    ip = ipaddress.ip_address(host)
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port and hasattr(socket, "SO_REUSEPORT"):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False
            raise AddressError(f"cannot listen on {address}: {exc.strerror}") from None
    return True
