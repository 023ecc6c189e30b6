"""Network helpers shared by every process kind. Standard library only."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port the OS considers free on `host` right now.

    Another process may take it before the caller binds it; callers that start
    a server retry on "address already in use".
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
