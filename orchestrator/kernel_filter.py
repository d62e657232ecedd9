"""Dropping an address's new connections in the kernel: a classic BPF socket filter on the
listening sockets that drops the SYNs from a list of source addresses (Linux only).

A filter on a TCP listener runs on each incoming segment before the listener sees it, so a
dropped SYN is a connection that never exists: no accept, no answer, no close. Sockets
accepted from the listener inherit the filter it had then; that filter drops only the
listed sources, so it never touches a connection from anyone else, and a connection from a
listed address was either accepted before it was listed (it carries the earlier filter)
or was never accepted.

The program, for IPv4 (``a``) and IPv6 (``b``) sources::

        ldb  [net + 0]           ; version and header length
        rsh  #4
        jeq  #4, 0, 1
        ja   v4                  ; (or accept, no IPv4 source listed)
        jeq  #6, 0, 1
        ja   v6                  ; (or accept)
    accept:
        ret  #0xffffffff
    v4: ld   [net + 12]          ; the source address
        jeq  #a1, 0, 1
        ret  #0                  ; listed: dropped
        ...
        ret  #0xffffffff
    v6: ld   [net + 8]           ; the source address, a word at a time
        jeq  #b1.0, 0, 7
        ...                      ; words 1, 2 and 3 likewise
        ret  #0
        ...
        ret  #0xffffffff

An IPv4-mapped IPv6 address (``::ffff:a.b.c.d``, the peer a dual-stack listener reports
for an IPv4 client) is an IPv4 source on the wire, and is listed as one.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import socket
import struct
import sys
from collections.abc import Iterable, Sequence
from typing import Any, Final

# Linux's values (asm-generic/socket.h); Python's socket module does not name them.
SO_ATTACH_FILTER: Final = 26
SO_DETACH_FILTER: Final = 27
SUPPORTED: Final = sys.platform.startswith("linux")

# Addresses one program lists at most: the longest program (all IPv6) stays ~2,300
# instructions, under the kernel's 4,096, and each segment of a connection accepted
# meanwhile is checked against it. Beyond it an address is refused by the 429 gate only.
MAX_DROPPED: Final = 256

# Classic BPF opcodes (linux/filter.h).
BPF_LD: Final = 0x00
BPF_ALU: Final = 0x04
BPF_JMP: Final = 0x05
BPF_RET: Final = 0x06
BPF_W: Final = 0x00
BPF_B: Final = 0x10
BPF_ABS: Final = 0x20
BPF_RSH: Final = 0x70
BPF_JA: Final = 0x00
BPF_JEQ: Final = 0x10
BPF_K: Final = 0x00
# Negative offsets that address the network header whatever the socket sees at offset 0.
SKF_NET_OFF: Final = -0x100000
ACCEPT: Final = 0xFFFFFFFF
DROP: Final = 0

_INSN: Final = struct.Struct("=HBBI")  # struct sock_filter: code, jt, jf, k

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class TooManyAddresses(ValueError):
    """More addresses than one program lists (``MAX_DROPPED``)."""


def source_address(address: str) -> Address:
    """The source address as the filter sees it: an IPv4-mapped IPv6 address as IPv4."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _insn(code: int, k: int = 0, jt: int = 0, jf: int = 0) -> tuple[int, int, int, int]:
    return (code, jt, jf, k & 0xFFFFFFFF)


def _load(offset: int, size: int = BPF_W) -> tuple[int, int, int, int]:
    return _insn(BPF_LD | size | BPF_ABS, SKF_NET_OFF + offset)


def drop_program(addresses: Iterable[str]) -> bytes:
    """The filter dropping segments whose source is one of ``addresses`` (a ``struct
    sock_filter`` array, native byte order), or ``b""`` for none (detach instead).

    Raises ``TooManyAddresses`` beyond ``MAX_DROPPED``, ``ValueError`` for a non-IP one.
    """
    sources = sorted({source_address(a) for a in addresses}, key=lambda ip: (ip.version, ip))
    if not sources:
        return b""
    if len(sources) > MAX_DROPPED:
        raise TooManyAddresses(f"{len(sources)} addresses; a filter lists {MAX_DROPPED}")
    v4 = [int(ip) for ip in sources if ip.version == 4]
    v6 = [ip.packed for ip in sources if ip.version == 6]
    accept = _insn(BPF_RET | BPF_K, ACCEPT)
    v4_block: list[tuple[int, int, int, int]] = []
    if v4:
        v4_block.append(_load(12))
        for value in v4:
            v4_block += [_insn(BPF_JMP | BPF_JEQ | BPF_K, value, 0, 1), _insn(BPF_RET | BPF_K)]
        v4_block.append(accept)
    v6_block: list[tuple[int, int, int, int]] = []
    for packed in v6:
        words = struct.unpack("!4I", packed)
        for i, word in enumerate(words):
            # A mismatch skips the rest of this address's block (and its "drop").
            v6_block += [_load(8 + 4 * i), _insn(BPF_JMP | BPF_JEQ | BPF_K, word, 0, 7 - 2 * i)]
        v6_block.append(_insn(BPF_RET | BPF_K, DROP))
    if v6_block:
        v6_block.append(accept)
    head_len = 7
    v4_at = head_len if v4_block else 6  # 6: the "accept" below
    v6_at = head_len + len(v4_block) if v6_block else 6
    program = [
        _load(0, BPF_B),
        _insn(BPF_ALU | BPF_RSH | BPF_K, 4),
        _insn(BPF_JMP | BPF_JEQ | BPF_K, 4, 0, 1),
        _insn(BPF_JMP | BPF_JA, v4_at - 4),  # ja's offset counts from the next instruction
        _insn(BPF_JMP | BPF_JEQ | BPF_K, 6, 0, 1),
        _insn(BPF_JMP | BPF_JA, v6_at - 6),
        accept,
        *v4_block,
        *v6_block,
    ]
    return b"".join(_INSN.pack(*insn) for insn in program)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def attach(sock: Any, program: bytes) -> None:
    """Put ``program`` on ``sock`` (a socket or an event loop's socket wrapper), replacing
    the filter it had at once; ``b""``: take any filter off. Raises ``OSError``."""
    if not program:
        with contextlib.suppress(FileNotFoundError):  # ENOENT: it had none
            sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)
        return
    # The kernel copies the program during the call: the buffer may go right after.
    code = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // _INSN.size, ctypes.addressof(code))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, bytes(fprog))


def ip_listeners(sockets: Iterable[Any]) -> list[Any]:
    """The IPv4 and IPv6 ones of ``sockets`` (a Unix socket has no source address)."""
    return [s for s in sockets if s.family in (socket.AF_INET, socket.AF_INET6)]


class ListenerFilter:
    """One drop list on a set of listening sockets, rebuilt whole on each change."""

    def __init__(self, sockets: Sequence[Any]) -> None:
        self.sockets = ip_listeners(sockets)
        self.program = b""

    def apply(self, addresses: Iterable[str]) -> None:
        """Drop SYNs from exactly ``addresses`` on every socket. Raises ``OSError`` (the
        kernel refused) or ``TooManyAddresses``."""
        program = drop_program(addresses)
        if program == self.program:
            return
        for sock in self.sockets:
            attach(sock, program)
        self.program = program
