"""Notice that a process of a ring group went away while MLX waits on it.

MLX's ring backend (0.32) gives each peer socket a worker thread. After ten failed transfers
that thread fails the transfers it holds ("[ring] connection to a peer was lost") and ends.
A transfer queued after that is never completed: a collective that starts once a peer is gone
waits forever, and the exception the others raise never comes. A sharded server's compiled
decode step queues the next step's collectives ahead, so rank 0 hung in about half the runs of
``tests/test_serve_sharded.py``'s dying rank (session 18; the eager step reached the exception
first in five of five).

:class:`PeerWatch` looks at the group's own sockets instead. It keeps duplicates of the
process's TCP connections at the addresses of ``MLX_HOSTFILE``, taken right after the group
formed, and peeks at them: a connection the peer closed reads as end-of-file without
consuming anything the backend has yet to read.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
import time
from typing import Callable, Iterable, List, Optional

HOSTFILE_ENV = "MLX_HOSTFILE"
POLL_SECONDS = 0.5
# Seconds a lost peer leaves the process's own error path (MLX's ring raises after ten failed
# transfers, within milliseconds) before the process answers and leaves without it.
PEER_LOST_GRACE = 2.0


def hostfile_addresses(path: Optional[str] = None) -> set:
    """The ``(ip, port)`` addresses of the ring hostfile (``[["ip:port", ...], ...]``, one list
    per rank), or an empty set where there is none or it cannot be read (the watch then stays
    off)."""
    path = path if path is not None else os.environ.get(HOSTFILE_ENV)
    if not path:
        return set()
    try:
        with open(path, encoding="utf-8") as f:
            ranks = json.load(f)
        addresses = set()
        for rank in ranks:
            for address in rank:
                host, port = str(address).rsplit(":", 1)
                addresses.add((host, int(port)))
                addresses.update(_resolved(host, int(port)))
        return addresses
    except (OSError, ValueError, TypeError, AttributeError):
        return set()


def _resolved(host: str, port: int) -> set:
    """``host``'s addresses where it is a name (the ring resolves hostfile names the same way);
    sockets report numeric addresses."""
    try:
        return {(info[4][0], port) for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)}
    except (OSError, UnicodeError):
        return set()


def _open_fds() -> Iterable[int]:
    for folder in ("/dev/fd", "/proc/self/fd"):
        try:
            return sorted(int(name) for name in os.listdir(folder) if name.isdigit())
        except OSError:
            continue
    return ()


def peer_connections(addresses: set) -> List[socket.socket]:
    """Duplicates of this process's connected TCP sockets with one end at one of ``addresses``
    (a rank connects to the next one's address and accepts the previous one's on its own)."""
    found = []
    for fd in _open_fds():
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            dup = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        try:
            keep = dup.type == socket.SOCK_STREAM and dup.family in (socket.AF_INET, socket.AF_INET6) \
                and (tuple(dup.getpeername()[:2]) in addresses or tuple(dup.getsockname()[:2]) in addresses)
        except OSError:  # not connected (a listening socket, say)
            keep = False
        if keep:
            found.append(dup)
        else:
            dup.close()  # the duplicate only: the original stays open
    return found


def group_connections() -> List[socket.socket]:
    """:func:`peer_connections` at ``MLX_HOSTFILE``'s addresses: call it right after the group
    formed, before anything else of this process opens a connection."""
    return peer_connections(hostfile_addresses())


def closed_by_peer(connection: socket.socket) -> Optional[str]:
    """Why ``connection`` is finished (its peer closed it, or it failed), or None while it lives.
    Peeks at one byte without waiting: what the group's backend reads is left in place."""
    try:
        data = connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError as e:
        return f"its connection failed: {e.strerror or e}"
    return "its connection closed" if data == b"" else None


class PeerWatch:
    """Calls ``on_lost(why)`` once, from its own thread, when a connection of the group ends."""

    def __init__(self, connections: List[socket.socket], on_lost: Callable[[str], None],
                 interval: float = POLL_SECONDS):
        self.connections = connections
        self.on_lost = on_lost
        self.interval = interval
        self._thread = threading.Thread(target=self._run, name="gemma4-mlx-peer-watch", daemon=True)

    def start(self) -> "PeerWatch":
        if self.connections:  # none: a backend other than the ring, or no hostfile
            self._thread.start()
        return self

    def _run(self) -> None:  # a daemon: it ends with the process, or once it has told
        while True:
            time.sleep(self.interval)
            for connection in self.connections:
                why = closed_by_peer(connection)
                if why is not None:
                    self.on_lost(why)
                    return
