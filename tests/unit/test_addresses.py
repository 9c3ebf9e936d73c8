"""The loopback rule decides on resolved IP addresses, never on how the host is spelled.

Resolution is tested with getaddrinfo results injected at the boundary (a
name that resolves to 0.0.0.0, to several addresses, to nothing), plus the
real resolver for 'localhost'.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Sequence
from typing import Any

import pytest

from ingest import addresses
from ingest.addresses import AddressError
from ingest.config import Config
from ingest.server import StartError, bind_addresses


def fake_resolver(table: dict[str, list[str]]) -> addresses.GetAddrInfo:
    """A getaddrinfo that knows only `table` (name -> IP literals)."""

    def getaddrinfo(host: str, port: int, *args: Any, **kwargs: Any) -> Sequence[tuple[Any, ...]]:
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        out = []
        for ip in table[host]:
            if ":" in ip:
                out.append((socket.AF_INET6, socket.SOCK_STREAM, 6, "", (ip, port, 0, 0)))
            else:
                out.append((socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)))
        return out

    return getaddrinfo


NAMES = fake_resolver(
    {
        "wildcard.test": ["0.0.0.0"],
        "127.0.0.1.wildcard.test": ["0.0.0.0"],
        "localhost": ["0.0.0.0"],
        "wildcard6.test": ["::"],
        "public.test": ["192.0.2.7"],
        "mixed.test": ["127.0.0.1", "192.0.2.7"],
        "both.test": ["127.0.0.1", "::1"],
        "loop2.test": ["127.0.0.2"],
        "mapped.test": ["::ffff:127.0.0.1"],
        "mapped-public.test": ["::ffff:192.0.2.7"],
        "empty.test": [],
        "scoped.test": ["fe80::1%eth0"],
    }
)


@pytest.mark.parametrize(
    "listen,binds",
    [
        ("127.0.0.1:50051", ("127.0.0.1:50051",)),
        ("127.8.9.10:1", ("127.8.9.10:1",)),
        ("[::1]:7000", ("[::1]:7000",)),
        ("loop2.test:7000", ("127.0.0.2:7000",)),
        ("both.test:7000", ("127.0.0.1:7000", "[::1]:7000")),
        ("mapped.test:7000", ("[::ffff:7f00:1]:7000",)),
        ("[::ffff:127.0.0.1]:0", ("[::ffff:7f00:1]:0",)),
    ],
)
def test_loopback_addresses_are_bound_as_resolved(listen: str, binds: tuple[str, ...]) -> None:
    assert addresses.loopback_binds(listen, NAMES) == binds


@pytest.mark.parametrize(
    "listen,needle",
    [
        ("0.0.0.0:50051", "every interface"),
        ("[::]:50051", "every interface"),
        (":50051", "every interface"),
        ("[::0]:50051", "every interface"),
        ("wildcard.test:50051", "every interface"),
        ("wildcard6.test:50051", "every interface"),
        ("public.test:50051", "'public.test' resolves to 192.0.2.7"),
        ("mixed.test:50051", "192.0.2.7 is not a loopback address"),
        ("mapped-public.test:1", "not a loopback"),
        ("scoped.test:1", "fe80::1 is not a loopback"),
        ("192.0.2.7:1", "192.0.2.7 is not a loopback address"),
        ("[::2]:1", "not a loopback"),
        ("nosuchhost.test:1", "cannot resolve 'nosuchhost.test'"),
        ("empty.test:1", "resolves to no IP address"),
        ("127.0.0.1.evil.test:1", "cannot resolve"),
        ("localhost.public.test:1", "cannot resolve"),
    ],
)
def test_anything_else_is_refused(listen: str, needle: str) -> None:
    with pytest.raises(AddressError, match=needle):
        addresses.loopback_binds(listen, NAMES)


@pytest.mark.parametrize(
    "listen", ["nowhere", "127.0.0.1:", "127.0.0.1:http", "::1:50051", "[::1:5", "h:70000"]
)
def test_malformed_addresses(listen: str) -> None:
    with pytest.raises(AddressError):
        addresses.split_host_port(listen)


def test_the_real_resolver_for_localhost() -> None:
    binds = addresses.loopback_binds("localhost:7000")
    assert binds and all(b.endswith(":7000") for b in binds)
    assert all(addresses.is_loopback(addresses.resolve(b.rpartition(":")[0].strip("[]"))[0])
               for b in binds)  # fmt: skip


def test_the_service_refuses_a_name_for_every_interface() -> None:
    # The old string match let through any name spelled like loopback
    # ('localhost', '127.…'), whatever it resolved to.
    for name in ("wildcard.test", "127.0.0.1.wildcard.test", "localhost"):
        cfg = Config(listen=f"{name}:50051")
        with pytest.raises(StartError, match=f"refusing to listen on {re.escape(name)}:50051"):
            bind_addresses(cfg, NAMES)
    assert bind_addresses(Config(listen="both.test:5"), NAMES) == ("127.0.0.1:5", "[::1]:5")


def test_the_opt_in_binds_the_setting_as_written() -> None:
    cfg = Config(listen="wildcard.test:50051", allow_unauthenticated_non_loopback=True)
    assert bind_addresses(cfg, NAMES) == ("wildcard.test:50051",)


def test_port_free_sees_a_listener_and_reuse_port_needs_both_sides() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert not addresses.port_free(f"127.0.0.1:{port}")
        assert not addresses.port_free(f"127.0.0.1:{port}", reuse_port=True)
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert not addresses.port_free(f"127.0.0.1:{port}")
        assert addresses.port_free(f"127.0.0.1:{port}", reuse_port=True)
    assert addresses.port_free(f"127.0.0.1:{port}")
