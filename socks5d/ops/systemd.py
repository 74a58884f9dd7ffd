"""systemd integration without libsystemd: sd_notify(3) and sd_listen_fds(3).

Owns: the notification datagram socket ($NOTIFY_SOCKET) and the sockets systemd passes
for socket activation ($LISTEN_PID, $LISTEN_FDS). Both protocols are stable and tiny,
so we speak them directly rather than depend on a C library or a PyPI package.

Everything here is a no-op outside systemd: notify() returns False when $NOTIFY_SOCKET
is unset, listen_fds() returns [] when no sockets were passed to this process.

Must not import other socks5d modules: the daemon calls in, not the other way round.
Stdlib only.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

__all__ = [
    "SD_LISTEN_FDS_START",
    "enabled",
    "listen_fds",
    "notify",
    "ready",
    "reloading",
    "status",
    "stopping",
]

logger = logging.getLogger(__name__)

# sd_listen_fds(3): passed descriptors start right after stdin, stdout and stderr.
SD_LISTEN_FDS_START = 3

# One datagram socket, opened on first use and reopened after a failure. RLock: a
# notify() from a signal handler that interrupted another notify() in the same thread
# must not deadlock (the daemon does not do that, but a library should not care).
_lock = threading.RLock()
_socket: socket.socket | None = None


def enabled() -> bool:
    """Whether a service manager listens for notifications ($NOTIFY_SOCKET is set)."""
    return bool(os.environ.get("NOTIFY_SOCKET"))


def _socket_address(path: str) -> bytes:
    # sd_notify(3): "@" at the start names a socket in the abstract namespace, which
    # the kernel spells with a leading NUL byte.
    if path.startswith("@"):
        return b"\0" + os.fsencode(path[1:])
    return os.fsencode(path)


def _close_socket() -> None:
    global _socket
    if _socket is not None:
        _socket.close()
        _socket = None


def notify(message: str) -> bool:
    """Send one sd_notify message ("READY=1", "STATUS=...", several joined by newlines).

    Returns True if the datagram was sent, False if $NOTIFY_SOCKET is unset or sending
    failed. Never raises: the service must run on whether or not anyone listens (send
    errors are logged at DEBUG). After a failure the socket is reopened on the next call.
    """
    global _socket
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if not path.startswith(("/", "@")):
        logger.debug("sd_notify: ignoring NOTIFY_SOCKET=%r: not a path or @name", path)
        return False
    data = message.encode("utf-8")
    with _lock:
        try:
            if _socket is None:
                # Close-on-exec by default (PEP 446): exec'd programs do not inherit it.
                _socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            # One datagram, one message: a short send cannot happen on SOCK_DGRAM.
            _socket.sendto(data, _socket_address(path))
        except OSError as exc:
            logger.debug("sd_notify to %s failed: %s", path, exc)
            _close_socket()
            return False
    return True


def _one_line(text: str) -> str:
    # A newline would start another KEY=value assignment in the same message.
    return " ".join(text.splitlines())


def ready(status_text: str | None = None) -> bool:
    """READY=1: startup (or a reload) is complete; with a STATUS= line if given."""
    if status_text is None:
        return notify("READY=1")
    return notify(f"READY=1\nSTATUS={_one_line(status_text)}")


def reloading() -> bool:
    """RELOADING=1 with MONOTONIC_USEC=, as systemd >= 253 expects for Type=notify-reload.

    The timestamp lets systemd tell this reload from an earlier one; older versions
    ignore it. Follow with ready() once the reload has been handled.
    """
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")


def stopping() -> bool:
    """STOPPING=1: shutdown has begun."""
    return notify("STOPPING=1")


def status(text: str) -> bool:
    """STATUS=...: one line shown by `systemctl status`."""
    return notify(f"STATUS={_one_line(text)}")


def listen_fds() -> list[socket.socket]:
    """The sockets systemd passed to this process (socket activation), else [].

    Follows sd_listen_fds(3): only when $LISTEN_PID is our PID (the variables may have
    been meant for a parent and leaked to us, in which case they are left alone) are
    descriptors 3 .. 3+$LISTEN_FDS-1 wrapped as socket objects (family and type read
    from the descriptor), made non-blocking and close-on-exec. $LISTEN_PID, $LISTEN_FDS
    and $LISTEN_FDNAMES are then removed from os.environ so that children we start do
    not mistake them for their own. Call it once: a second call returns [].

    A descriptor that is not a socket raises OSError naming it: the unit is broken.
    """
    pid_text = os.environ.get("LISTEN_PID")
    if not pid_text:
        return []
    try:
        pid = int(pid_text)
    except ValueError:
        logger.warning("ignoring LISTEN_PID=%r: not a number", pid_text)
        return []
    if pid != os.getpid():
        return []
    count_text = os.environ.get("LISTEN_FDS", "")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    try:
        count = int(count_text)
    except ValueError:
        logger.warning("ignoring LISTEN_FDS=%r: not a number", count_text)
        return []
    sockets: list[socket.socket] = []
    try:
        for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
            # systemd leaves them inheritable; we must not leak them into exec'd programs.
            try:
                os.set_inheritable(fd, False)
                sock = socket.socket(fileno=fd)
            except OSError as exc:
                message = f"LISTEN_FDS: descriptor {fd} is not a usable socket ({exc.strerror})"
                raise OSError(exc.errno, message) from exc
            sockets.append(sock)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets
