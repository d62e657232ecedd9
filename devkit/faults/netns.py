"""Network namespaces for fault tests: one bridge in the root namespace, one netns per worker.

``NetLab`` creates a Linux bridge holding ``10.231.<n>.1/24`` (the orchestrator listens on
that address) and, per ``add()``, a namespace joined to the bridge by a veth pair, with
``10.231.<n>.<10+i>``. Only addresses of the lab's own subnet are ever used, and the
subnet is one no interface on this machine holds yet. Every name carries a random suffix
so concurrent runs on one machine never meet. ``close()`` deletes whatever was created,
and is safe to call twice, after a partial setup, or from a ``finally``.

Faults on one namespace's link:
- ``cut`` / ``heal``: the host side of the veth goes down / up (a partition: packets in
  either direction are lost, connections time out or are refused by the kernel);
- ``degrade(delay_ms, loss_pct)`` / ``clear``: ``tc qdisc netem`` on both ends, when the
  kernel has ``sch_netem`` (``netem_available()``); some kernels lack it, and the tests
  then shape the traffic in user space instead (``devkit.faults.proxy``).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field

SUBNET_PREFIX = "10.231"
COMMAND_TIMEOUT_S = 15.0
REQUIRE_ENV = "STREAMHERD_REQUIRE_NETNS"


class NetnsError(RuntimeError):
    """An ``ip``/``tc`` command failed; the message carries the command and its stderr."""


def _run(args: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        list(args), capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False
    )
    if check and result.returncode != 0:
        raise NetnsError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def required() -> bool:
    return os.environ.get(REQUIRE_ENV, "") not in ("", "0", "false")


def unavailable_reason() -> str | None:
    """Why namespaces cannot be used here (not root, no ``ip``), or None if they can."""
    name = f"shp-{secrets.token_hex(3)}"
    try:
        result = _run(["ip", "netns", "add", name], check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"cannot run ip netns: {exc!r}"
    if result.returncode != 0:
        return f"ip netns add is not permitted here: {result.stderr.strip()}"
    _run(["ip", "netns", "del", name], check=False)
    return None


def netem_available() -> bool:
    """Does this kernel have ``sch_netem``? Probed on a throw-away veth pair."""
    host, peer = f"shq-{secrets.token_hex(3)}", f"shr-{secrets.token_hex(3)}"
    try:
        if _run(
            ["ip", "link", "add", host, "type", "veth", "peer", "name", peer], check=False
        ).returncode:
            return False
        return (
            _run(
                ["tc", "qdisc", "add", "dev", host, "root", "netem", "delay", "1ms"], check=False
            ).returncode
            == 0
        )
    except (OSError, subprocess.SubprocessError):
        return False
    finally:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            _run(["ip", "link", "del", host], check=False)


def _used_subnets() -> set[int]:
    used: set[int] = set()
    out = _run(["ip", "-4", "-o", "addr", "show"], check=False).stdout
    for line in out.splitlines():
        for word in line.split():
            if word.startswith(f"{SUBNET_PREFIX}."):
                with contextlib.suppress(ValueError, IndexError):
                    used.add(int(word.split(".")[2]))
    return used


@dataclass
class Namespace:
    """One worker's namespace: its name, its address, the host end of its veth."""

    name: str
    address: str
    host_if: str
    peer_if: str
    degraded: bool = False

    def exec_prefix(self) -> list[str]:
        """Prepend to a command line to run it inside the namespace."""
        return ["ip", "netns", "exec", self.name]


@dataclass
class NetLab:
    """A bridge with the orchestrator's address and a namespace per worker (see module doc)."""

    subnet: int = -1
    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    namespaces: list[Namespace] = field(default_factory=list)
    bridge: str = ""
    _bridge_made: bool = False

    @property
    def host_address(self) -> str:
        return f"{SUBNET_PREFIX}.{self.subnet}.1"

    def open(self) -> NetLab:
        if self.subnet < 0:
            used = _used_subnets()
            free = [n for n in range(10, 250) if n not in used]
            if not free:
                raise NetnsError(f"no free {SUBNET_PREFIX}.x.0/24 subnet")
            self.subnet = free[int.from_bytes(secrets.token_bytes(2), "big") % len(free)]
        self.bridge = f"shb-{self.tag}"
        _run(["ip", "link", "add", "name", self.bridge, "type", "bridge"])
        self._bridge_made = True
        _run(["ip", "addr", "add", f"{self.host_address}/24", "dev", self.bridge])
        _run(["ip", "link", "set", self.bridge, "up"])
        return self

    def add(self) -> Namespace:
        index = len(self.namespaces)
        ns = Namespace(
            name=f"shn-{self.tag}-{index}",
            address=f"{SUBNET_PREFIX}.{self.subnet}.{10 + index}",
            host_if=f"shh{index}-{self.tag}",
            peer_if=f"shp{index}-{self.tag}",
        )
        _run(["ip", "netns", "add", ns.name])
        self.namespaces.append(ns)
        _run(["ip", "link", "add", ns.host_if, "type", "veth", "peer", "name", ns.peer_if])
        _run(["ip", "link", "set", ns.host_if, "master", self.bridge])
        _run(["ip", "link", "set", ns.host_if, "up"])
        _run(["ip", "link", "set", ns.peer_if, "netns", ns.name])
        inside = ns.exec_prefix()
        _run([*inside, "ip", "addr", "add", f"{ns.address}/24", "dev", ns.peer_if])
        _run([*inside, "ip", "link", "set", ns.peer_if, "up"])
        _run([*inside, "ip", "link", "set", "lo", "up"])
        return ns

    # --- faults ----------------------------------------------------------------------

    def cut(self, ns: Namespace) -> None:
        """Partition: nothing passes between the namespace and the bridge."""
        _run(["ip", "link", "set", ns.host_if, "down"])

    def heal(self, ns: Namespace) -> None:
        _run(["ip", "link", "set", ns.host_if, "up"])

    def degrade(self, ns: Namespace, *, delay_ms: int, loss_pct: float) -> None:
        """netem delay and loss on both ends of the namespace's link (needs sch_netem)."""
        spec = ["netem", "delay", f"{delay_ms}ms", "loss", f"{loss_pct}%"]
        _run(["tc", "qdisc", "replace", "dev", ns.host_if, "root", *spec])
        _run([*ns.exec_prefix(), "tc", "qdisc", "replace", "dev", ns.peer_if, "root", *spec])
        ns.degraded = True

    def clear(self, ns: Namespace) -> None:
        if not ns.degraded:
            return
        _run(["tc", "qdisc", "del", "dev", ns.host_if, "root"], check=False)
        _run([*ns.exec_prefix(), "tc", "qdisc", "del", "dev", ns.peer_if, "root"], check=False)
        ns.degraded = False

    # --- clean-up --------------------------------------------------------------------

    def close(self) -> list[str]:
        """Delete every namespace, veth and the bridge; the errors met (never raises)."""
        errors: list[str] = []
        for ns in reversed(self.namespaces):
            # Deleting the namespace deletes the veth pair with it.
            for args in (["ip", "netns", "del", ns.name], ["ip", "link", "del", ns.host_if]):
                with contextlib.suppress(OSError, subprocess.SubprocessError):
                    _run(args, check=False)
        self.namespaces.clear()
        if self._bridge_made:
            try:
                _run(["ip", "link", "del", self.bridge])
            except (NetnsError, OSError, subprocess.SubprocessError) as exc:
                errors.append(str(exc))
            self._bridge_made = False
        leftovers = [
            line
            for line in _run(["ip", "netns", "list"], check=False).stdout.splitlines()
            if f"shn-{self.tag}-" in line
        ]
        errors.extend(f"namespace left behind: {line}" for line in leftovers)
        return errors

    def __enter__(self) -> NetLab:
        try:
            return self.open()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *_exc: object) -> None:
        self.close()
