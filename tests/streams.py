"""Helpers shared by the relay and loop tests: byte streams, descriptors, worker threads."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import threading
from collections.abc import Callable
from typing import Any

import pytest
from clients import TIMEOUT

from socks5d.core.relay import SPLICE_AVAILABLE

MiB = 1024 * 1024

needs_splice = pytest.mark.skipif(
    not SPLICE_AVAILABLE, reason="os.splice is Linux-only (Python >= 3.10): only copy runs here"
)
needs_proc_fd = pytest.mark.skipif(
    not os.path.isdir("/proc/self/fd"), reason="counts descriptors through /proc/self/fd"
)


def open_fds() -> dict[int, str]:
    """This process's descriptors and what they point at (``pipe:[...]``, ``socket:[...]``)."""
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor, gone by now
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    return fds


def sha256_of_stream(sock: socket.socket) -> tuple[str, int]:
    """Read until EOF; the digest and length of what arrived."""
    digest = hashlib.sha256()
    total = 0
    while chunk := sock.recv(MiB):
        digest.update(chunk)
        total += len(chunk)
    return digest.hexdigest(), total


def send_and_shut(sock: socket.socket, data: bytes) -> None:
    sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)


class Worker(threading.Thread):
    """A daemon thread that keeps its target's return value or exception."""

    def __init__(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        super().__init__(daemon=True)
        self._call = (fn, args, kwargs)
        self.value: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        fn, args, kwargs = self._call
        try:
            self.value = fn(*args, **kwargs)
        except BaseException as exc:
            self.error = exc

    def result(self, timeout: float = TIMEOUT) -> Any:
        self.join(timeout)
        assert not self.is_alive(), f"{self._call[0].__name__} still running after {timeout}s"
        if self.error is not None:
            raise self.error
        return self.value
