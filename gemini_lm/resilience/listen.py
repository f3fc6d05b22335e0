"""A TCPStore server bound to the address it is given, not to every interface.

torch's TCPStore server listens on all interfaces (`::`) whatever host it is handed, so a
store meant for this host would be reachable from the network: anyone there could write
rendezvous keys or read them. We bind the listening socket ourselves to `host` (loopback
unless the user named another address) and hand it over with `master_listen_fd`.
"""
from __future__ import annotations

import datetime
import socket

import torch.distributed as dist


def serve_store(host: str, port: int, timeout: datetime.timedelta) -> dist.TCPStore:
    """Host a TCPStore on host:port (0: any free port, read it from `.port`)."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as torch's own: restart past TIME_WAIT
        sock.bind((host, port))
        sock.listen(socket.SOMAXCONN)
        port = sock.getsockname()[1]
    except BaseException:
        sock.close()
        raise
    return dist.TCPStore(host, port, is_master=True, wait_for_workers=False, timeout=timeout,
                         master_listen_fd=sock.detach())   # the store owns the descriptor from here
