"""The broker's only shared state, behind one lock: who holds which device.

Devices owned by a connection, devices let go of that the kernel has not
released yet (still counted against their owner), attaches in progress
(reserved against the limits), and the open connections of each user.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from loopdev import sysfs
from loopdev._broker_grant import Grant
from loopdev._interface import NAME, Refusal
from loopdev.device import LoopDevice


@dataclass(frozen=True)
class Peer:
    """Who is on the other end, from the kernel (not from the client's words)."""

    pid: int
    uid: int
    gid: int
    groups: frozenset[int]


@dataclass(frozen=True)
class Policy:
    """Who may use the broker and how much. Root is always allowed."""

    users: frozenset[int] = frozenset()
    groups: frozenset[int] = frozenset()
    max_per_client: int = 16
    max_devices: int = 256
    allow_block_devices: bool = False

    def allows(self, peer: Peer) -> bool:
        return peer.uid == 0 or peer.uid in self.users or bool(peer.groups & self.groups)

    @property
    def max_connections_per_client(self) -> int:
        # Room for one connection per device (what broker_client makes) and
        # as many again closing or listing; one user cannot hold every slot.
        return 2 * self.max_per_client + 16


MAX_CONNECTIONS = 1024


@dataclass(eq=False)
class Owned:
    """A device a connection attached, and the nodes handed over for it."""

    dev: LoopDevice
    peer: Peer
    conn: int
    read_only: bool
    partscan: bool
    grant: Grant = field(repr=False)


@dataclass(eq=False)  # compared by identity: each is one attachment
class Draining:
    """A device its owner let go of that the kernel has not released yet."""

    uid: int
    name: str
    diskseq: int | None

    def still_bound(self) -> bool:
        if sysfs.backing_file(self.name) is None:
            return False
        if self.diskseq is None:
            return True  # kernels before 5.15: cannot tell a rebinding; count it
        return sysfs.diskseq(self.name) == self.diskseq


class Ledger:
    """Owned and draining devices, reservations and connections, under one lock."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self._lock = threading.Lock()
        self._owned: dict[str, Owned] = {}  # by device name
        self._draining: list[Draining] = []
        self._connections: dict[int, int] = {}  # uid -> open connections
        self._reserved = 0  # attaches in progress, counted against the limits
        self._reserved_by: dict[int, int] = {}

    # --- connections ------------------------------------------------------------------

    def admit(self, peer: Peer) -> Refusal | None:
        """Count a new connection of ``peer``; a refusal when the policy or a limit says no.

        A user outside the policy is never counted: it cannot hold a slot.
        """
        if not self.policy.allows(peer):
            return Refusal(
                f"{NAME}.PermissionDenied",
                message=f"uid {peer.uid} is not allowed to use this loopdev broker",
            )
        with self._lock:
            count = self._connections.get(peer.uid, 0)
            if sum(self._connections.values()) >= MAX_CONNECTIONS:
                limit, message = MAX_CONNECTIONS, "the broker has too many connections"
            elif count >= self.policy.max_connections_per_client:
                limit = self.policy.max_connections_per_client
                message = f"uid {peer.uid} has {limit} connections open"
            else:
                self._connections[peer.uid] = count + 1
                return None
        return _limit("connections", limit, message)

    def leave(self, conn: int, peer: Peer) -> list[tuple[Owned, Draining]]:
        """The connection closed: its devices, let go of, to be released by the caller."""
        with self._lock:
            mine = [o for o in self._owned.values() if o.conn == conn]
            left = [(o, self._let_go(o)) for o in mine]
            self._connections[peer.uid] -= 1
            if not self._connections[peer.uid]:
                del self._connections[peer.uid]
        return left

    def has_devices(self, conn: int) -> bool:
        with self._lock:
            return any(o.conn == conn for o in self._owned.values())

    # --- devices ----------------------------------------------------------------------

    def reserve(self, uid: int) -> None:
        """Count a device for ``uid`` or raise ``LimitReached``."""
        with self._lock:
            self._draining = [d for d in self._draining if d.still_bound()]
            mine = sum(o.peer.uid == uid for o in self._owned.values())
            mine += sum(d.uid == uid for d in self._draining)
            total = len(self._owned) + len(self._draining) + self._reserved
            most = self.policy.max_per_client
            if mine + self._reserved_by.get(uid, 0) >= most:
                raise _limit("per-client", most, f"uid {uid} has {most} devices, its limit")
            most = self.policy.max_devices
            if total >= most:
                raise _limit("total", most, f"the broker serves {most} devices, its limit")
            self._reserved += 1
            self._reserved_by[uid] = self._reserved_by.get(uid, 0) + 1

    def unreserve(self, uid: int) -> None:
        with self._lock:
            self._unreserve(uid)

    def record(self, owned: Owned) -> None:
        """An attach reserved for ``owned.peer.uid`` is done: the device is owned."""
        with self._lock:
            self._owned[owned.dev.name] = owned
            self._unreserve(owned.peer.uid)

    def drop(self, owned: Owned) -> Draining:
        """An attach reserved for ``owned.peer.uid`` failed after the device was bound."""
        with self._lock:
            self._unreserve(owned.peer.uid)
            entry = Draining(owned.peer.uid, owned.dev.name, owned.dev.diskseq)
            self._draining.append(entry)
            return entry

    def take(self, name: str, conn: int) -> tuple[Owned, Draining]:
        """Let go of the device ``name`` of connection ``conn`` (Detach), or NoSuchDevice."""
        with self._lock:
            owned = self._owned.get(name)
            if owned is None or owned.conn != conn:
                raise Refusal(f"{NAME}.NoSuchDevice", name=name)
            return owned, self._let_go(owned)

    def give_back(self, owned: Owned, entry: Draining) -> None:
        """A Detach changed nothing: the device is owned again."""
        with self._lock:
            self._draining.remove(entry)
            self._owned[owned.dev.name] = owned

    def forget(self, entry: Draining) -> None:
        """The kernel released it."""
        with self._lock:
            if entry in self._draining:
                self._draining.remove(entry)

    def revoke_all(self) -> None:
        """The broker is going away with devices still owned (a worker did not finish):
        their nodes must not outlive it usable, whatever happens to the devices."""
        with self._lock:
            for owned in self._owned.values():
                owned.grant.revoke()

    def of_uid(self, uid: int) -> list[Owned]:
        with self._lock:
            return [o for o in self._owned.values() if o.peer.uid == uid]

    def _let_go(self, owned: Owned) -> Draining:
        """Under the lock: from owned to draining, so that it stays counted."""
        self._owned.pop(owned.dev.name, None)
        entry = Draining(owned.peer.uid, owned.dev.name, owned.dev.diskseq)
        self._draining.append(entry)
        return entry

    def _unreserve(self, uid: int) -> None:
        self._reserved -= 1
        self._reserved_by[uid] -= 1
        if not self._reserved_by[uid]:
            del self._reserved_by[uid]


def _limit(kind: str, most: int, message: str) -> Refusal:
    return Refusal(f"{NAME}.LimitReached", limit=kind, max=most, message=message)
