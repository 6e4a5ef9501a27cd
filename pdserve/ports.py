"""The ports `pdserve up` listens on: picking free ones, refusing taken ones before anything starts,
and telling whether the server answering on a port is the process we started (not another one).
"""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path


class PortTaken(Exception):
    """Someone already listens on a port we need."""


def free_port(host: str = "127.0.0.1", taken: set[int] | None = None) -> int:
    """A port nobody listens on now (and not in `taken`, which it joins)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if taken is None or port not in taken:
            if taken is not None:
                taken.add(port)
            return port


def check_free(host: str, port: int, what: str) -> None:
    """Raise PortTaken unless a server could listen on host:port now (as uvicorn binds: SO_REUSEADDR,
    so a port left in TIME_WAIT by a server that just stopped counts as free)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # as uvicorn picks it
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            s.listen(1)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise PortTaken(f"{what}: port {port} on {host} is taken by another process") from None
            raise PortTaken(f"{what}: cannot listen on {host}:{port}: {e.strerror or e}") from None


def _listening_inodes(port: int) -> set[str]:
    """The socket inodes listening on `port` (any address), from /proc/net/tcp and tcp6."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(inode)
    return inodes


def listens_on(pid: int, port: int) -> bool:
    """Does process `pid` hold the socket listening on `port`? True where /proc cannot tell (not Linux),
    so elsewhere only the earlier `check_free` guards against answering for another server."""
    fd_dir = Path(f"/proc/{pid}/fd")
    if not Path("/proc/net/tcp").exists():
        return True
    wanted = {f"socket:[{inode}]" for inode in _listening_inodes(port)}
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(fd_dir / fd) in wanted:
                return True
        except OSError:
            continue
    return False
