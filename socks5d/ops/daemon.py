"""Assembly and lifecycle: build the server from a Config, run it, react to signals.

SIGTERM/SIGINT stop accepting at once, let open tunnels finish for up to
timeouts.shutdown_grace, cut the rest and exit 0 (a second signal cuts at once);
SIGHUP re-reads the config file, validates it whole, and swaps users, rules, limits and
logging without dropping established tunnels (a bad file is rejected, the old config
stays). Signal handlers only set flags and wake the loop; the work happens in the
serving thread. With workers, only the supervising parent reads the file: it applies
what it accepted to itself (a worker started later inherits it) and publishes it to the
workers, which never read the file themselves.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import logging
import os
import pickle
import resource
import signal
import socket
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from ..core.addresses import client_ip, format_address
from ..core.eventloop import EventLoopPool
from ..core.loopserver import EventLoopTCPServer
from ..core.server import BaseServer, ForkingTCPServer, reap_child
from ..core.shmem import SharedBytes
from ..policy.auth import is_default_hash
from ..policy.capacity import ConnectionLimits, process_limits, resolve_limits
from ..policy.limits import UserSlots
from ..policy.rules import behind_balancer, exposure_problem
from ..policy.throttle import CheckGate, FailedLoginBackoff
from ..socks.fastpath import begin_fast_handshake
from ..socks.handler import HandlerContext, HandlerSettings, Socks5Handler
from ..socks.session import NO_OBSERVER
from . import systemd
from .config import Config, ConfigError, apply_overrides, load_config
from .logs import configure_logging, hand_log_files_to, reconfigure_logging
from .metrics import Metrics, setup_metrics
from .privileges import drop_privileges, resolve_ids

logger = logging.getLogger("socks5d")


class SocksServerMixIn(BaseServer):
    """What the daemon adds to a core server: its handlers' context, a periodic hook
    (reload, systemd status) run by the serving loop, and its metrics (None: off)."""

    context: HandlerContext = HandlerContext()
    periodic: Callable[[], None] | None = None
    metrics: Metrics | None = None

    def service_actions(self) -> None:
        super().service_actions()
        if self.periodic is not None:
            self.periodic()

    def refusal_counted(self, cap: str) -> None:
        self.context.observer.limit_refused(cap)


class ThreadingSocksServer(SocksServerMixIn, EventLoopTCPServer):
    """Event loops (relay_threads) and a pool of handler threads."""


class ForkingSocksServer(SocksServerMixIn, ForkingTCPServer):
    """One process per client; children see the settings current when they forked."""

    def finish_request(
        self, request: socket.socket, client_address: Any, handover: object = None
    ) -> None:
        """In the child: serve the client, then flush its metrics (it leaves by
        os._exit, and its flusher thread goes with it)."""
        try:
            super().finish_request(request, client_address, handover)
        finally:
            if self.metrics is not None:
                self.metrics.flush()

    def child_exited(self, pid: int, code: int) -> None:
        give_back_slots(self.context.user_slots, pid, code)
        if self.metrics is not None:
            self.metrics.process_ended(pid)


SocksServer = ThreadingSocksServer | ForkingSocksServer

SERVER_CLASSES: dict[str, type[SocksServer]] = {
    "threading": ThreadingSocksServer,
    "forking": ForkingSocksServer,
}


def attach_event_loops(server: ThreadingSocksServer, count: int) -> EventLoopPool:
    """Give a threading server `count` event loops that accept, run the common handshake
    (fastpath) and relay; the serving loop then only waits for shutdown()."""
    pool = EventLoopPool(count, name="relay-loop")
    server.serve_in_loops(pool, begin_fast_handshake)
    return pool


def make_context(
    server: SocksServer, settings: Callable[[], HandlerSettings], parallel_checks: int
) -> HandlerContext:
    """The context of `server`'s handlers: fresh state that outlives reloads (made before
    any fork, so every process shares it), the server's count, its event loops and its
    metrics."""
    return HandlerContext(
        settings=settings,
        login_backoff=FailedLoginBackoff(),
        check_gate=CheckGate(parallel_checks),
        user_slots=UserSlots(),
        active_count=lambda: server.active_count,
        relay_in_loop=server.relay_in_loop if isinstance(server, ThreadingSocksServer) else None,
        readdress=server.readdress_request,
        observer=server.metrics or NO_OBSERVER,
    )


def trusted_balancer(settings: HandlerSettings) -> Callable[[Any], bool] | None:
    """With server.proxy_protocol on, the test of a peer in server.proxy_trusted: its
    connections are not capped per address at accept, each counts under the client its
    header names (readdress_request), where max_connections_per_ip applies."""
    if settings.proxy_protocol is None:
        return None
    return lambda client_address: settings.trusts_balancer(client_ip(client_address))


def give_back_slots(slots: UserSlots | None, pid: int, code: int) -> int:
    """Process `pid` ended (not reaped yet): free the per-user slots it still held
    (killed mid-tunnel). `code`: exit status, or minus the signal that killed it."""
    if slots is None:
        return 0
    given_back = slots.reconcile(pid)
    if given_back:
        logger.warning(
            "process %d %s holding %d per-user slot(s); given back",
            pid,
            _exit_text(code),
            given_back,
        )
    return given_back


def nothing_in_flight(server: SocksServer, quiet: float) -> Callable[[], bool]:
    """For the graceful stop: true once every open connection is an established tunnel
    in an event loop and none has moved a byte for `quiet` seconds. Idle keep-alive
    tunnels (a browser holds them for minutes) would only be cut at the end of the grace
    period; a transfer in flight keeps the stop waiting. Handshakes, and tunnels relayed
    elsewhere (forking mode, handler threads), always get the whole grace period."""

    def check() -> bool:
        pool = server.loops if isinstance(server, ThreadingSocksServer) else None
        if pool is None or server.active_count > pool.tunnel_count:
            return False
        return time.monotonic() - pool.last_activity() >= quiet

    return check


def apply_logging(config: Config) -> None:
    """Install the config's log level, format and file (OSError if the file won't open)."""
    configure_logging(config.logging.level, config.logging.format, config.logging.file or None)


def raise_open_file_limit() -> tuple[int, int]:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit: each tunnel holds two
    descriptors, and the soft default (often 1024) is far below what a proxy needs."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            logger.warning("cannot raise the open-file limit from %d to %d: %s", soft, hard, exc)
    return soft, hard


def warn_about_passwords(config: Config) -> None:
    """Plaintext passwords, and hashes whose check time sets their user apart."""
    for index, user in enumerate(config.users):
        if user.password is not None:
            logger.warning(
                "users[%d] (%s) has a plaintext password in %s; store password_hash "
                "instead (socks5d hash-password)",
                index,
                user.name,
                config.source,
            )
        elif user.password_hash and not is_default_hash(user.password_hash):
            logger.warning(
                "users[%d] (%s) has a password_hash with other costs than the default "
                "scrypt: a wrong password for it takes a different time than for an "
                "unknown user, which tells that the name exists; rehash it with "
                "socks5d hash-password",
                index,
                user.name,
            )


def connection_limits(
    config: Config, listening: Any, *, raised_open_files: bool = False
) -> ConnectionLimits:
    """The caps `config` gives servers bound to `listening` (bound or adopted addresses:
    what clients can reach), with this process's resource limits (`raised_open_files`:
    as they will be once raise_open_file_limit() has run)."""
    threading_mode = config.server.mode == "threading"
    return resolve_limits(
        config.limits,
        mode=config.server.mode,
        relay_threads=config.server.relay_threads if threading_mode else 0,
        listening=[(str(address[0]), int(address[1])) for address in listening],
        process=process_limits(raised=raised_open_files),
        behind_balancer=behind_balancer(config),
    )


def changed_fields(old: Any, new: Any) -> list[str]:
    """The names of the fields in which two instances of one config dataclass differ."""
    return [
        field.name
        for field in dataclasses.fields(old)
        if getattr(old, field.name) != getattr(new, field.name)
    ]


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
        # What new connections begin under (the handlers' context.settings()).
        self.handler_settings = HandlerSettings()
        self.reload_requested = False
        self.stopping = False
        self.stop_requested = False
        # Workers mode: the accepted config as the parent published it, and the
        # generation this process serves (a forked worker inherits the parent's).
        self.published: SharedBytes | None = None
        self.generation = 0
        self.is_worker = False
        self.metrics: Metrics | None = None

    def bind(self) -> SocksServer:
        """Create and bind the listening server, ready to serve.

        Raises OSError (EADDRINUSE...), ConfigError (an open proxy refused, a malformed
        password hash), ValueError (an unknown run_as_user, an unusable systemd socket).
        """
        config = self.config
        server_class = SERVER_CLASSES[config.server.mode]
        # systemd socket activation: adopt the passed sockets instead of binding.
        adopted = systemd.listen_fds()
        if adopted:
            logger.info(
                "adopted %d socket(s) from systemd; the configured listen addresses are ignored",
                len(adopted),
            )
        else:
            # Refuse an open proxy before it has listened at all, not just before serving.
            problem = exposure_problem(config, config.server.listen_addresses)
            if problem:
                raise ConfigError(problem)
        server = server_class(
            list(config.server.listen_addresses),
            Socks5Handler,
            backlog=config.server.backlog,
            listen_sockets=adopted or None,  # the caps come from _apply(), below
        )
        try:
            problem = exposure_problem(config, server.server_addresses)
            if problem:
                raise ConfigError(problem)
            server.metrics = self.metrics = self._start_metrics(config)
            # Before any fork (forking mode, workers): every process shares its state.
            server.context = make_context(
                server, lambda: self.handler_settings, config.auth.parallel_checks
            )
            self._apply(server, config)
            warn_about_passwords(config)
            # Last: with root gone, nothing more may need to open a privileged resource.
            if config.server.run_as_user:
                self._hand_log_files_over(config)
                drop_privileges(config.server.run_as_user, config.server.run_as_group or None)
        except BaseException:
            server.server_close()
            self.close_metrics()
            raise
        server.periodic = self._periodic
        self.server = server
        return server

    @staticmethod
    def _start_metrics(config: Config) -> Metrics | None:
        """The metrics endpoint, when metrics.listen asks for one. Raises ConfigError
        (the metrics library missing) or RuntimeError (the address cannot be bound)."""
        listen = config.metrics.address
        if listen is None:
            return None
        several = config.server.mode == "forking" or config.server.workers > 1
        try:
            return setup_metrics(listen, several)
        except OSError as exc:
            where = format_address(listen)
            raise RuntimeError(
                f"metrics.listen: cannot listen on {where}: {exc.strerror or exc}"
            ) from None

    def close_metrics(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None

    def _apply(self, server: SocksServer, config: Config) -> None:
        """Put a validated config into effect for new connections."""
        limits = config.limits
        self.handler_settings = HandlerSettings.from_config(config, server.server_addresses)
        caps = connection_limits(config, server.server_addresses)
        server.max_connections = caps.max_connections
        server.max_connections_per_ip = caps.max_connections_per_ip
        server.ipv6_client_prefix = limits.ipv6_client_prefix
        if isinstance(server, ThreadingSocksServer):
            # Forking mode cannot move a slot (the parent holds it, the child reads the
            # header): there the balancer's address stays capped as a whole.
            server.per_client_exempt = trusted_balancer(self.handler_settings)
        logger.info("%s", caps.describe())
        if caps.warning:
            logger.warning("%s", caps.warning)
        context = server.context
        if context.user_slots is not None:
            context.user_slots.limit = limits.max_connections_per_user or None
        if context.login_backoff is not None:
            context.login_backoff.delay = config.auth.failure_delay
            context.login_backoff.max_delay = config.auth.failure_delay_max
            context.login_backoff.window = config.auth.failure_window
            context.login_backoff.ipv6_prefix = limits.ipv6_client_prefix
        if context.check_gate is not None:
            context.check_gate.limit = config.auth.parallel_checks

    @staticmethod
    def _hand_log_files_over(config: Config) -> None:
        """Started as root, about to drop to run_as_user: give that user the log file we
        opened, so a reload (which reopens it, for logrotate) still can."""
        if os.geteuid() != 0:
            return
        uid, _gid = resolve_ids(config.server.run_as_user, config.server.run_as_group or None)
        for path in hand_log_files_to(uid):
            logger.info("log file %s now belongs to %s, who reopens it on reload", path, uid)

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; returns the process exit code."""
        server = self.server or self.bind()
        # Handlers before the "listening" line: whoever reads it may signal us at once.
        # They stay installed after the stop: a late SIGTERM while the process exits
        # must not turn a clean exit into death by signal.
        self._install_signal_handlers()
        if self.config.server.workers <= 1:
            self._start_event_loops(server)  # before "listening": all set up by then
        for address in server.server_addresses:
            where = format_address(address)
            logger.info("listening on %s (%s)", where, self.config.server.mode)
        try:
            if self.config.server.workers > 1:
                return Supervisor(self, self.config.server.workers).run()
            return self.serve(notify=True)
        finally:
            self.close_metrics()  # in the first process only: a worker leaves by os._exit

    def serve(self, notify: bool) -> int:
        """The accept loop of this process, then the graceful stop."""
        server = self.server or self.bind()
        previous = self._install_signal_handlers()
        self._start_event_loops(server)
        if notify:
            systemd.ready(self._status_text(server))  # systemd: READY=1 + STATUS=
        try:
            server.serve_forever(poll_interval=0.5)
        finally:
            if notify:
                systemd.stopping()  # systemd: STOPPING=1 (the loop ends only to stop)
            try:
                self._close(server)  # still under our handlers: a second signal cuts short
            finally:
                self._restore_signal_handlers(previous)
                if self.metrics is not None:  # before a worker leaves: what it counted
                    self.metrics.flush()
                    self.metrics.fold()
        return 0

    def _start_event_loops(self, server: SocksServer) -> None:
        """Threading mode: the relay threads, in the process that serves (after a fork)."""
        relay_threads = self.config.server.relay_threads
        if isinstance(server, ThreadingSocksServer) and relay_threads and server.loops is None:
            attach_event_loops(server, relay_threads)

    def _close(self, server: SocksServer) -> None:
        """Graceful stop: refuse new clients now, let open ones finish, cut the rest."""
        server.stop_listening()
        grace = self.config.timeouts.shutdown_grace
        active = server.active_count
        quiet = nothing_in_flight(server, grace / 2)
        if active and grace > 0:
            logger.info("stopping: waiting up to %.1f s for %d open connection(s)", grace, active)
            active = server.wait_for_idle(grace, cancelled=lambda: self.stop_requested or quiet())
        if active and not self.stop_requested and quiet():
            server.abort_active_requests()
            logger.info(
                "stopping: no tunnel moved a byte for %.1f s; closed %d idle one(s)",
                grace / 2,
                active,
            )
        elif active:
            server.abort_active_requests()
            logger.warning("stopping: cut %d connection(s) still open", active)
        # Threading mode: the event loops close with it and end the tunnels still there
        # (cut above, or the wait was cancelled).
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
        if self.stopping:
            self.stop_requested = True  # a second signal: cut the grace period short
        self.stopping = True
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
        if self.metrics is not None:
            self.metrics.periodic()

    # ---- systemd notifications (STATUS= with live counters) ----

    # Seconds between STATUS= checks; a line is sent only when the text changed.
    STATUS_INTERVAL = 2.0
    _status_checked_at = float("-inf")
    _status_sent = ""

    def _status_text(self, server: SocksServer) -> str:
        active = server.active_count
        served = server.accounting.admitted_total
        where = ", ".join(format_address(address) for address in server.server_addresses)
        return (
            f"{active} active connection{'' if active == 1 else 's'}, "
            f"{served} served, listening on {where}"
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
        """Re-read the config file; keep the old config if the new one is bad.

        A worker does not read the file: it takes what the parent accepted.
        """
        if self.server is None:
            return False
        if self.is_worker:
            return self._adopt_published()
        fresh = self._read_fresh_config(self.server)
        if fresh is None:
            return False
        warn_about_passwords(fresh)
        self._put_into_effect(fresh)
        if self.published is not None:
            self.generation = self.published.publish(pickle.dumps(fresh))
        logger.info(
            "reloaded %s (%d user(s), %d rule(s))", fresh.source, len(fresh.users), len(fresh.rules)
        )
        return True

    def _read_fresh_config(self, server: SocksServer) -> Config | None:
        """The config file as it is now, validated whole; None (and an error) if bad."""
        try:
            fresh = load_config(self.config_path) if self.config_path else Config()
            fresh = apply_overrides(fresh, **self.overrides)
            changed = changed_fields(self.config.server, fresh.server)
            if changed:
                logger.warning(
                    "reload: [server] changes need a restart, kept as they were: %s",
                    ", ".join(changed),
                )
            if fresh.metrics != self.config.metrics:
                logger.warning("reload: [metrics] changes need a restart, kept as they were")
            # The whole [server] and [metrics] sections stay as they are until a restart.
            fresh = dataclasses.replace(
                fresh, server=self.config.server, metrics=self.config.metrics
            )
            problem = exposure_problem(fresh, server.server_addresses)
            if problem:
                raise ConfigError(problem)
            HandlerSettings.from_config(fresh, server.server_addresses)  # validates hashes
        except ConfigError as exc:
            logger.error("reload rejected, keeping the running config: %s", exc)
            return None
        return fresh

    def _put_into_effect(self, fresh: Config) -> None:
        """Apply a validated config: logging (reopening the file, for logrotate), then
        users, rules and limits for new connections."""
        assert self.server is not None
        problem = reconfigure_logging(
            fresh.logging.level, fresh.logging.format, fresh.logging.file or None
        )
        if problem is not None:
            logger.warning(
                "reload: cannot open log file %s (%s); still writing to the one already open",
                fresh.logging.file,
                problem.strerror or problem,
            )
        self._apply(self.server, fresh)
        self.config = fresh

    def _adopt_published(self) -> bool:
        """A worker: put into effect the config the parent accepted last, if newer."""
        if self.published is None:
            return False
        try:
            generation, data = self.published.read()
            if generation <= self.generation:
                return False
            self._put_into_effect(pickle.loads(data))  # written by our parent only
        except Exception:  # a worker that cannot follow is still better serving the old one
            logger.exception("worker %d: cannot take the reloaded config", os.getpid())
            return False
        self.generation = generation
        logger.info("worker %d: reload %d in effect", os.getpid(), generation)
        return True


class Supervisor:
    """`server.workers` processes serving the same listening sockets, watched over.

    The parent binds, forks the workers and then only waits for signals: SIGTERM/SIGINT
    are passed on to every worker (each drains itself); SIGHUP reloads the parent, which
    publishes the accepted config and then tells every worker to take it (a rejected
    reload changes nothing anywhere). A worker that dies is logged and replaced (at most
    once a second per slot) by a fork of the parent, so it serves the last accepted
    config, and the per-user slots it held are given back. Limits count per worker; the
    login back-off and per-user slots live in shared memory and count for all of them.

    The parent is a child subreaper (Linux): a forking worker's children that outlive
    it become the parent's to reap, and their slots too are given back when they end.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)
    RESTART_INTERVAL = 1.0

    def __init__(self, daemon: Daemon, count: int) -> None:
        self.daemon = daemon
        self.count = count
        self.workers: dict[int, float] = {}  # pid -> start time
        self.stopping = False

    def run(self) -> int:
        # Blocked, the signals queue up for sigwaitinfo(): no handler runs between checks.
        previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, self.SIGNALS)
        self.daemon.published = SharedBytes()  # before any fork: the workers share it
        become_subreaper()
        try:
            for _ in range(self.count):
                self.start_worker(previous_mask)
            logger.info("started %d worker processes", self.count)
            systemd.ready(f"{self.count} workers")
            if self.daemon.stopping:  # a stop signal came before the signals were blocked
                self.on_signal(signal.SIGTERM, previous_mask)
            while self.workers:
                info = signal.sigwaitinfo(self.SIGNALS)
                self.on_signal(info.si_signo, previous_mask)
        finally:
            for pid in list(self.workers):  # only on an error of our own: leave nothing
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                self.reap(block=True)
            signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
        if self.daemon.server is not None:
            self.daemon.server.server_close()
        logger.info("stopped")
        return 0

    def start_worker(self, previous_mask: Any) -> None:
        pid = os.fork()
        if pid:
            self.workers[pid] = time.monotonic()
            return
        code = 1
        try:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
            os.environ.pop("NOTIFY_SOCKET", None)  # only the parent speaks to systemd
            self.daemon.is_worker = True
            assert self.daemon.server is not None
            self.daemon.server.reinit_after_fork()
            code = self.daemon.serve(notify=False)
        except BaseException:
            logger.exception("worker %d failed", os.getpid())
        finally:
            logging.shutdown()
            os._exit(code)

    def on_signal(self, signo: int, previous_mask: Any) -> None:
        if signo == signal.SIGCHLD:
            self.reap(block=False, previous_mask=previous_mask)
            return
        if signo in (signal.SIGTERM, signal.SIGINT):
            if not self.stopping:
                logger.info("stopping %d worker(s)", len(self.workers))
                systemd.stopping()
            self.stopping = True
        elif signo == signal.SIGHUP:
            systemd.reloading()
            accepted = self.daemon.reload()
            if accepted:
                self.signal_workers(signo)
            systemd.ready(f"{len(self.workers)} workers")
            return
        self.signal_workers(signo)

    def signal_workers(self, signo: int) -> None:
        for pid in list(self.workers):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signo)
        if self.stopping and self.daemon.server is not None:
            # The workers close their copies of the listening sockets as they start to
            # drain; ours would keep them open, and the kernel would go on completing
            # handshakes that no one accepts until the drain ends and they are reset.
            self.daemon.server.stop_listening()

    def process_ended(self, slots: UserSlots | None, pid: int, code: int) -> None:
        """A worker (or an orphan of a forking one) ended, not reaped yet: give back its
        per-user slots, drop and fold its metrics."""
        give_back_slots(slots, pid, code)
        if self.daemon.metrics is not None:
            self.daemon.metrics.process_ended(pid, fold_now=True)

    def reap(self, block: bool, previous_mask: Any = None) -> None:
        server = self.daemon.server
        slots = server.context.user_slots if server else None
        while self.workers:
            try:
                # Slots are given back before another process can be given the PID.
                ended = reap_child(functools.partial(self.process_ended, slots), block=block)
            except ChildProcessError:
                self.workers.clear()
                return
            if ended is None:
                return
            pid, code = ended
            started = self.workers.pop(pid, None)
            if started is None or self.stopping or previous_mask is None:
                continue
            logger.error("worker %d exited (%s); starting a new one", pid, _exit_text(code))
            # A worker that dies at once would otherwise be restarted in a tight loop.
            time.sleep(max(0.0, self.RESTART_INTERVAL - (time.monotonic() - started)))
            self.start_worker(previous_mask)


PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>


def become_subreaper() -> bool:
    """Linux: orphaned descendants are re-parented to this process instead of init, so
    it reaps them (and learns which PIDs are gone). False where that is not possible."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _exit_text(code: int) -> str:
    return f"killed by signal {-code}" if code < 0 else f"exit code {code}"
