"""Assembly and lifecycle: build the server from a Config, run it, react to signals.

SIGTERM/SIGINT stop the accept loop, close open tunnels and exit 0; SIGHUP re-reads the
config file and swaps the handler settings without dropping established tunnels. Signal
handlers only set flags and wake the loop; the work happens in the serving thread.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import sys
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from . import systemd
from .config import Config, ConfigError, apply_overrides, load_config
from .handler import HandlerSettings, Socks5Handler
from .privileges import drop_privileges
from .server import ForkingTCPServer, ThreadingTCPServer

logger = logging.getLogger("socks5d")

LOG_FORMAT = "%(levelname)s %(message)s"


class SocksServerMixIn:
    """What the daemon adds to a core server: the handler settings and a periodic hook."""

    settings: HandlerSettings = HandlerSettings()
    periodic: Callable[[], None] | None = None

    def service_actions(self) -> None:
        super().service_actions()  # type: ignore[misc]
        if self.periodic is not None:
            self.periodic()

    # ---- systemd STATUS= counter ----
    # Connections handed to a handler since start. Counted in the serving thread (the
    # only one that calls process_request), so it needs no lock and works in forking mode.
    served: int = 0

    def process_request(self, request: Any, client_address: Any) -> None:
        self.served += 1
        super().process_request(request, client_address)  # type: ignore[misc]

    def handle_overload(self, request: Any, client_address: Any) -> None:
        self.served -= 1  # refused at max_connections: counted above, not served
        super().handle_overload(request, client_address)  # type: ignore[misc]

    # ---- end systemd STATUS= counter ----


class ThreadingSocksServer(SocksServerMixIn, ThreadingTCPServer):
    """One thread per client."""


class ForkingSocksServer(SocksServerMixIn, ForkingTCPServer):
    """One process per client; children see the settings current when they forked."""


SocksServer = ThreadingSocksServer | ForkingSocksServer

SERVER_CLASSES: dict[str, type[SocksServer]] = {
    "threading": ThreadingSocksServer,
    "forking": ForkingSocksServer,
}


def configure_logging(level: str) -> None:
    """Plain lines to stderr; journald adds the timestamps."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        root.addHandler(handler)
    root.setLevel(level.upper())


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Daemon:
    """Owns one listening server and its lifecycle."""

    def __init__(
        self,
        config: Config,
        config_path: str | None = None,
        overrides: dict[str, Any] | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.overrides = overrides or {}
        self.server: SocksServer | None = None
        self.reload_requested = False

    def bind(self) -> SocksServer:
        """Create and bind the listening server (raises OSError, e.g. EADDRINUSE)."""
        server_class = SERVER_CLASSES[self.config.server.mode]
        # ---- systemd socket activation: adopt passed sockets instead of binding ----
        adopted = systemd.listen_fds()
        if adopted:
            logger.info(
                "adopted %d socket(s) from systemd; the configured listen addresses are ignored",
                len(adopted),
            )
        # ---- end socket activation ----
        server = server_class(
            list(self.config.server.listen_addresses),
            Socks5Handler,
            backlog=self.config.server.backlog,
            max_connections=self.config.limits.max_connections,
            listen_sockets=adopted or None,
        )
        # ---- drop root once the sockets are bound (run_as_user / run_as_group) ----
        run_as_user = getattr(self.config.server, "run_as_user", "")
        run_as_group = getattr(self.config.server, "run_as_group", "")
        if run_as_user:
            try:
                drop_privileges(run_as_user, run_as_group or None)
            except BaseException:
                server.server_close()
                raise
        # ---- end privilege drop ----
        server.settings = HandlerSettings.from_config(self.config)
        server.periodic = self._periodic
        self.server = server
        return server

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; returns the process exit code."""
        server = self.server or self.bind()
        previous = self._install_signal_handlers()
        for address in server.server_addresses:
            where = format_address(*address[:2])
            logger.info("listening on %s (%s)", where, self.config.server.mode)
        systemd.ready(self._status_text(server))  # systemd: READY=1 + STATUS=
        try:
            server.serve_forever(poll_interval=0.5)
        finally:
            systemd.stopping()  # systemd: STOPPING=1 (the loop ends only to stop)
            self._restore_signal_handlers(previous)
            self._close(server)
        return 0

    def _close(self, server: SocksServer) -> None:
        active = getattr(server, "active_count", 0)
        if active:
            logger.info("stopping: closing %d open connection(s)", active)
        server.abort_active_requests()
        server.server_close()
        logger.info("stopped")

    # ---- signals ----

    def _install_signal_handlers(self) -> dict[int, Any]:
        previous: dict[int, Any] = {}
        for signum, handler in (
            (signal.SIGTERM, self._on_stop),
            (signal.SIGINT, self._on_stop),
            (signal.SIGHUP, self._on_reload),
        ):
            previous[signum] = signal.signal(signum, handler)
        return previous

    @staticmethod
    def _restore_signal_handlers(previous: dict[int, Any]) -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    def _on_stop(self, signum: int, frame: FrameType | None) -> None:
        if self.server is not None:
            self.server.shutdown()

    def _on_reload(self, signum: int, frame: FrameType | None) -> None:
        self.reload_requested = True

    def _periodic(self) -> None:
        if self.reload_requested:
            self.reload_requested = False
            # systemd: RELOADING=1 before the reload, READY=1 after it, applied or rejected.
            systemd.reloading()
            try:
                self.reload()
            finally:
                systemd.ready(self._status_text(self.server) if self.server else None)
        self._notify_status()

    # ---- systemd notifications (STATUS= with live counters) ----

    # Seconds between STATUS= checks; a line is sent only when the text changed.
    STATUS_INTERVAL = 2.0
    _status_checked_at = float("-inf")
    _status_sent = ""

    def _status_text(self, server: SocksServer) -> str:
        active = getattr(server, "active_count", 0)
        where = ", ".join(format_address(*address[:2]) for address in server.server_addresses)
        return (
            f"{active} active connection{'' if active == 1 else 's'}, "
            f"{server.served} served, listening on {where}"
        )

    def _notify_status(self) -> None:
        if self.server is None or not systemd.enabled():
            return
        now = time.monotonic()
        if now - self._status_checked_at < self.STATUS_INTERVAL:
            return
        self._status_checked_at = now
        text = self._status_text(self.server)
        if text != self._status_sent and systemd.status(text):
            self._status_sent = text

    # ---- end systemd notifications ----

    # ---- reload ----

    def reload(self) -> bool:
        """Re-read the config file; keep the old config if the new one is bad."""
        if self.server is None:
            return False
        try:
            fresh = load_config(self.config_path) if self.config_path else Config()
            fresh = apply_overrides(fresh, **self.overrides)
        except ConfigError as exc:
            logger.error("reload rejected, keeping the running config: %s", exc)
            return False
        if dataclasses.astuple(fresh.server) != dataclasses.astuple(self.config.server):
            logger.warning("reload: [server] changes (listen address, mode) need a restart")
        self.server.settings = HandlerSettings.from_config(fresh)
        self.server.max_connections = fresh.limits.max_connections
        configure_logging(fresh.logging.level)
        self.config = dataclasses.replace(fresh, server=self.config.server)
        logger.info("reloaded %s (%d user(s))", self.config.source, len(fresh.users))
        return True
