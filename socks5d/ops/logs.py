"""Where log lines go and what they look like: text or JSON, stderr or a file.

Text to stderr has no timestamps (journald adds them); text to a file has them. JSON
is one object per line with the access-log fields as keys, for log shippers. A log file
is reopened on SIGHUP so logrotate can move it away; one that cannot be reopened (the
daemon dropped root since it opened it) keeps the descriptor it has. Stdlib only.

Logging never stops the proxy: a line for stderr is written at once when stderr can take
it, else kept (up to BACKLOG_BYTES) for a writer thread, and dropped, counted and
reported later beyond that. Stderr is a pipe or a socket (journald, a terminal, a parent
that may not read it); one nobody drains must not freeze every connection that logs.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import select
import stat
import sys
import threading
import time
from typing import Any

from ..core.shmem import ProcessLocal

TEXT_FORMAT = "%(levelname)s %(message)s"
TEXT_FILE_FORMAT = "%(asctime)s %(levelname)s %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record; an access record's fields are merged in."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": _utc_iso(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        access = getattr(record, "access", None)
        if access is not None:
            entry.update(access.as_dict())
        else:
            entry["message"] = record.getMessage()
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, separators=(",", ":"), ensure_ascii=False)


def _utc_iso(created: float) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    return f"{seconds}.{int(created % 1 * 1000):03d}Z"


class _OurHandler(logging.Handler):
    """Marks the handlers configure_logging installed, so a reload replaces only them."""


class _StderrHandler(ProcessLocal, _OurHandler):
    """Writes each line to a descriptor (stderr) without ever blocking the caller.

    A line is written at once when the descriptor is writable and nothing is waiting
    (one poll and one write: the common case, in the caller's thread). Otherwise it
    joins a backlog that a writer thread drains, blocking on the descriptor in the
    caller's stead. Past BACKLOG_BYTES new lines are dropped and counted, and a line
    saying how many follows once the output moves again. Lines never interleave: the
    writer waits for direct writes in flight, and nobody writes directly while it works.
    A forked process (a worker, a forking-mode child) starts with an empty backlog.
    """

    BACKLOG_BYTES = 4 * 1024 * 1024
    # A pipe that polls writable takes a write of up to PIPE_BUF bytes whole, at once.
    DIRECT_MAX = select.PIPE_BUF

    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = fd
        # A regular file always polls writable: no need to ask for each line.
        try:
            self.always_writable = stat.S_ISREG(os.fstat(fd).st_mode)
        except OSError:
            self.always_writable = False
        self.closed = False
        self._register()  # ProcessLocal: _start_process() now and in a forked child

    def _start_process(self) -> None:
        """The state a process starts with (again in a forked child: its parent's
        backlog is the parent's to write, and its writer thread did not fork)."""
        self.state = threading.Lock()  # guards everything below
        self.changed = threading.Condition(self.state)
        self.backlog: collections.deque[bytes] = collections.deque()
        self.backlog_bytes = 0
        self.dropped = 0
        self.direct = 0  # direct writes in flight
        self.writing = False  # the writer thread is in a write
        self.writer: threading.Thread | None = None
        self.stuck = False  # the last flush() gave up waiting: close() does not wait

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = (self.format(record) + "\n").encode("utf-8", "backslashreplace")
        except Exception:
            self.handleError(record)
            return
        state = self.state
        with state:
            direct = not (self.backlog or self.writing) and len(line) <= self.DIRECT_MAX
            if direct:
                self.direct += 1
        if direct:
            writable = self.always_writable or _writable_now(self.fd)
            if writable:
                _write_all(self.fd, line)
            with state:
                self.direct -= 1
                if self.backlog and not self.direct:
                    self.changed.notify_all()  # the writer waits for direct writes
            if writable:
                return
        with state:
            if self.backlog_bytes + len(line) > self.BACKLOG_BYTES:
                self.dropped += 1
                return
            self.backlog.append(line)
            self.backlog_bytes += len(line)
            if self.writer is None:
                self.writer = threading.Thread(target=self._drain, name="log writer", daemon=True)
                self.writer.start()
            self.changed.notify_all()

    def _drain(self) -> None:
        while True:
            with self.state:
                while not self.backlog or self.direct:
                    if self.closed and not self.backlog:
                        self.writer = None
                        return
                    if not self.changed.wait(timeout=60.0) and not self.backlog:
                        self.writer = None  # idle: the next backlog starts another
                        return
                chunk = b"".join(self.backlog)
                self.backlog.clear()
                self.backlog_bytes = 0
                dropped, self.dropped = self.dropped, 0
                self.writing = True
            try:
                _write_all(self.fd, chunk)
                if dropped:
                    _write_all(self.fd, self._dropped_line(dropped))
            finally:
                with self.state:
                    self.writing = False
                    self.changed.notify_all()

    def _dropped_line(self, count: int) -> bytes:
        record = logging.makeLogRecord(
            {
                "name": __name__,
                "levelno": logging.WARNING,
                "levelname": "WARNING",
                "msg": "log output was blocked: %d line(s) dropped",
                "args": (count,),
            }
        )
        return (self.format(record) + "\n").encode("utf-8", "backslashreplace")

    def flush(self, timeout: float = 1.0) -> None:
        """Wait up to `timeout` s for the backlog to be written, never longer: the output
        may be blocked for good, and the daemon must still stop within its grace."""
        deadline = time.monotonic() + timeout
        with self.state:
            while self.backlog or self.writing:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.writer is None:
                    self.stuck = remaining <= 0
                    return
                self.changed.wait(remaining)

    def close(self) -> None:
        if not self.stuck:  # logging.shutdown() flushes first: one wait is enough
            self.flush()
        with self.state:
            self.closed = True
            self.changed.notify_all()
        super().close()


def _writable_now(fd: int) -> bool:
    """Whether a short write to `fd` completes without waiting (a closed or broken
    descriptor counts as writable: the write fails at once)."""
    poller = select.poll()  # not select(): any descriptor number, no FD_SETSIZE limit
    poller.register(fd, select.POLLOUT)
    try:
        return bool(poller.poll(0))
    except OSError:
        return True


def _write_all(fd: int, data: bytes) -> None:
    """Write all of `data`, waiting while the descriptor is full: also when someone
    sharing it (a shell, another program on the terminal) made it O_NONBLOCK, where a
    write fails with EAGAIN instead of waiting, and the lines would be lost."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except InterruptedError:
            continue
        except BlockingIOError:
            _wait_writable(fd)
        except OSError:
            return  # stderr closed or broken: nothing to tell it with


def _wait_writable(fd: int) -> None:
    """Block until `fd` takes a write (a caller that must not wait never gets here: it
    writes directly only what polled writable, PIPE_BUF bytes at most)."""
    poller = select.poll()  # not select(): no FD_SETSIZE limit, so never a busy loop
    poller.register(fd, select.POLLOUT)
    with contextlib.suppress(OSError):  # the write then says what is wrong
        poller.poll(1000)


class _FileHandler(_OurHandler, logging.FileHandler):
    def reopen(self) -> None:
        """Close and open the path again: after logrotate moved it, a new file starts."""
        self.acquire()
        try:
            if self.stream:
                self.stream.close()
            self.stream = self._open()
        finally:
            self.release()


def configure_logging(level: str, fmt: str = "text", file: str | None = None) -> None:
    """(Re)install our handler on the root logger: stderr, or `file` when given.

    Raises OSError when the file cannot be opened (the caller reports it).
    """
    handler: logging.Handler
    if file:
        handler = _FileHandler(file, encoding="utf-8")
        text_format = TEXT_FILE_FORMAT
    else:
        handler = _StderrHandler(sys.stderr.fileno())
        text_format = TEXT_FORMAT
    handler.setFormatter(_formatter(fmt, text_format))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _OurHandler)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level.upper())


def reconfigure_logging(level: str, fmt: str = "text", file: str | None = None) -> OSError | None:
    """configure_logging() for a reload, which must not fail for want of a log file.

    When `file` cannot be opened (after dropping root, a file only root may open), the
    handler in place stays, with the new level and format, and the error is returned for
    the caller to report.
    """
    try:
        configure_logging(level, fmt, file)
    except OSError as exc:
        root = logging.getLogger()
        for handler in root.handlers:
            if isinstance(handler, _OurHandler):
                in_file = isinstance(handler, _FileHandler)
                handler.setFormatter(_formatter(fmt, TEXT_FILE_FORMAT if in_file else TEXT_FORMAT))
        root.setLevel(level.upper())
        return exc
    return None


def hand_log_files_to(uid: int) -> list[str]:
    """Make `uid` the owner of the log files we opened as root, so that after dropping
    root to that user a reload can still reopen them. Returns their paths.

    Only a file that is plainly ours changes owner: a regular file owned by root, named
    by its path itself (not through a symlink) and by no other hard link, so a link
    planted where the log goes cannot hand `uid` some other file of root's. Group and
    mode stay as they are.
    """
    given: list[str] = []
    for handler in logging.getLogger().handlers:
        if not isinstance(handler, _FileHandler) or handler.stream is None or uid == 0:
            continue
        fd = handler.stream.fileno()
        opened = os.fstat(fd)
        try:
            named = os.lstat(handler.baseFilename)
        except OSError:
            continue
        if (
            stat.S_ISREG(named.st_mode)
            and (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)
            and opened.st_nlink == 1
            and opened.st_uid == 0
        ):
            os.fchown(fd, uid, -1)
            given.append(handler.baseFilename)
    return given


def _formatter(fmt: str, text_format: str) -> logging.Formatter:
    return JsonFormatter() if fmt == "json" else logging.Formatter(text_format)


def reopen_log_files() -> None:
    for handler in logging.getLogger().handlers:
        if isinstance(handler, _FileHandler):
            handler.reopen()
