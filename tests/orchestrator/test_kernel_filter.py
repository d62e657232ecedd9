"""The classic BPF program that drops listed source addresses: its bytes for known lists,
its bounds, and, on Linux, what the kernel does with it on a real listener (clients bound
to their own loopback addresses: all of 127/8 is loopback on Linux)."""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Iterator

import pytest

from orchestrator.kernel_filter import (
    MAX_DROPPED,
    SUPPORTED,
    ListenerFilter,
    TooManyAddresses,
    drop_program,
)

linux_only = pytest.mark.skipif(not SUPPORTED, reason="SO_ATTACH_FILTER is Linux's")

NET = 0xFFF00000  # SKF_NET_OFF (-0x100000) as the unsigned 32-bit k
ACCEPT = 0xFFFFFFFF
# A dropped SYN is sent again after 1 s (and dropped again): not connected by then is a
# drop. A connect that is not dropped completes at once; it is given far longer.
DROPPED_CONNECT_S = 0.3
CONNECT_DEADLINE_S = 10.0


def insns(program: bytes) -> list[tuple[int, int, int, int]]:
    return [struct.unpack("=HBBI", program[i : i + 8]) for i in range(0, len(program), 8)]


HEAD_V4_ONLY = [
    (0x30, 0, 0, NET),  # ldb [net]
    (0x74, 0, 0, 4),  # rsh #4
    (0x15, 0, 1, 4),  # jeq #4
    (0x05, 0, 0, 3),  # ja v4 (index 7)
    (0x15, 0, 1, 6),  # jeq #6
    (0x05, 0, 0, 0),  # ja accept: no IPv6 source listed
    (0x06, 0, 0, ACCEPT),
]


def test_one_ipv4_address_compiles_to_a_known_program() -> None:
    """127.0.0.2: the version dispatch, one compare, drop on a match, accept otherwise."""
    assert insns(drop_program(["127.0.0.2"])) == [
        *HEAD_V4_ONLY,
        (0x20, 0, 0, NET + 12),  # ld [net + 12]: the source address
        (0x15, 0, 1, 0x7F000002),
        (0x06, 0, 0, 0),
        (0x06, 0, 0, ACCEPT),
    ]


def test_an_ipv6_address_is_compared_a_word_at_a_time() -> None:
    """::1 as four words of the source at net + 8..20, a mismatch skipping to accept."""
    program = insns(drop_program(["::1"]))
    assert program[3] == (0x05, 0, 0, 2)  # IPv4: straight to accept
    assert program[5] == (0x05, 0, 0, 1)  # IPv6: the block right after accept
    assert program[7:] == [
        (0x20, 0, 0, NET + 8),
        (0x15, 0, 7, 0),
        (0x20, 0, 0, NET + 12),
        (0x15, 0, 5, 0),
        (0x20, 0, 0, NET + 16),
        (0x15, 0, 3, 0),
        (0x20, 0, 0, NET + 20),
        (0x15, 0, 1, 1),
        (0x06, 0, 0, 0),
        (0x06, 0, 0, ACCEPT),
    ]


def test_an_ipv4_mapped_address_is_listed_as_the_ipv4_source_it_is_on_the_wire() -> None:
    """A dual-stack listener reports ::ffff:a.b.c.d; the segment's source is IPv4."""
    assert drop_program(["::ffff:127.0.0.2"]) == drop_program(["127.0.0.2"])


def test_the_list_is_deduplicated_and_ordered() -> None:
    """The same set gives the same program, so an unchanged list is not re-attached."""
    assert drop_program(["10.0.0.2", "10.0.0.1", "10.0.0.2"]) == drop_program(
        ["10.0.0.1", "10.0.0.2"]
    )


def test_an_empty_list_is_no_program() -> None:
    """Nothing listed: no program (the caller detaches the filter instead)."""
    assert drop_program([]) == b""


def test_the_list_is_bounded() -> None:
    """MAX_DROPPED addresses fit the kernel's 4,096 instructions even all IPv6; one more
    is refused."""
    v6 = [f"2001:db8::{i:x}" for i in range(MAX_DROPPED)]
    assert len(drop_program(v6)) // 8 <= 4096
    v4 = [f"10.0.{i // 256}.{i % 256}" for i in range(MAX_DROPPED + 1)]
    with pytest.raises(TooManyAddresses):
        drop_program(v4)


def test_a_name_is_not_an_address() -> None:
    with pytest.raises(ValueError):
        drop_program(["unknown"])


@contextlib.contextmanager
def listener(family: socket.AddressFamily = socket.AF_INET) -> Iterator[socket.socket]:
    sock = socket.socket(family, socket.SOCK_STREAM)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", 0))
    else:
        sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    try:
        yield sock
    finally:
        sock.close()


def _connects(port: int, source: str, target: str, timeout_s: float) -> bool:
    family = socket.AF_INET6 if ":" in source else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as client:
        client.bind((source, 0))
        client.settimeout(timeout_s)
        try:
            client.connect((target, port))
        except TimeoutError:
            return False
        return True


def connects(port: int, source: str, target: str = "127.0.0.1") -> bool:
    return _connects(port, source, target, CONNECT_DEADLINE_S)


def dropped(port: int, source: str, target: str = "127.0.0.1") -> bool:
    return not _connects(port, source, target, DROPPED_CONNECT_S)


@linux_only
def test_the_kernel_drops_the_listed_source_and_no_other() -> None:
    """With 127.0.0.2 listed its connect never completes; 127.0.0.1 and 127.0.0.3 connect."""
    with listener() as sock:
        port = sock.getsockname()[1]
        ListenerFilter([sock]).apply(["127.0.0.2"])
        assert connects(port, "127.0.0.1")
        assert dropped(port, "127.0.0.2")
        assert connects(port, "127.0.0.3")


@linux_only
def test_an_empty_list_detaches_the_filter() -> None:
    """Applying no address takes the filter off: the dropped source connects again."""
    with listener() as sock:
        port = sock.getsockname()[1]
        filtered = ListenerFilter([sock])
        filtered.apply(["127.0.0.2"])
        assert dropped(port, "127.0.0.2")
        filtered.apply([])
        assert filtered.program == b""
        assert connects(port, "127.0.0.2")


@linux_only
def test_a_dual_stack_listener_drops_ipv4_and_ipv6_sources() -> None:
    """On an IPv6 listener taking IPv4 too: the IPv4 source (listed as reported, mapped)
    and ::1 are dropped, other IPv4 sources connect."""
    with listener(socket.AF_INET6) as sock:
        port = sock.getsockname()[1]
        filtered = ListenerFilter([sock])
        filtered.apply(["::ffff:127.0.0.2"])
        assert dropped(port, "127.0.0.2")
        assert connects(port, "127.0.0.1")
        assert connects(port, "::1", "::1")
        filtered.apply(["::1"])
        assert dropped(port, "::1", "::1")
        assert connects(port, "127.0.0.2")


@linux_only
def test_accepted_connections_keep_working_when_their_source_is_listed_later() -> None:
    """A connection accepted before its source was listed carries the earlier filter: it
    still exchanges data; only new connections from that source are dropped."""
    with listener() as sock:
        port = sock.getsockname()[1]
        filtered = ListenerFilter([sock])
        filtered.apply(["127.0.0.9"])  # a filter is inherited at accept
        with socket.create_connection(
            ("127.0.0.1", port), timeout=5, source_address=("127.0.0.2", 0)
        ) as client:
            served, _ = sock.accept()
            with served:
                filtered.apply(["127.0.0.2", "127.0.0.9"])
                client.sendall(b"ping")
                served.settimeout(5)
                assert served.recv(4) == b"ping"
                served.sendall(b"pong")
                assert client.recv(4) == b"pong"
        assert dropped(port, "127.0.0.2")


def test_a_unix_socket_is_left_alone() -> None:
    """A Unix listener has no source address to filter on: it gets no program."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unix:
        assert ListenerFilter([unix]).sockets == []
