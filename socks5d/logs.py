"""Where log lines go and what they look like: text or JSON, stderr or a file.

Text to stderr has no timestamps (journald adds them); text to a file has them. JSON
is one object per line with the access-log fields as keys, for log shippers. A log file
is reopened on SIGHUP so logrotate can move it away. Stdlib only.
"""

from __future__ import annotations

import json
import logging
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
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(text_format))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _OurHandler)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level.upper())


def reopen_log_files() -> None:
    for handler in logging.getLogger().handlers:
        if isinstance(handler, _FileHandler):
            handler.reopen()
