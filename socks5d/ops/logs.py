"""Where log lines go and what they look like: text or JSON, stderr or a file.

Text to stderr has no timestamps (journald adds them); text to a file has them. JSON
is one object per line with the access-log fields as keys, for log shippers. A log file
is reopened on SIGHUP so logrotate can move it away; one that cannot be reopened (the
daemon dropped root since it opened it) keeps the descriptor it has. Stdlib only.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import sys
import time
from typing import Any

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


class _StderrHandler(_OurHandler, logging.StreamHandler):  # type: ignore[type-arg, unused-ignore]
    pass


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
        handler = _StderrHandler(sys.stderr)
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
