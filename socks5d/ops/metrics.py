"""Prometheus metrics: what the daemon counts, and the /metrics endpoint that serves it.

Off unless ``metrics.listen`` (``--metrics-listen``) is set; it needs prometheus_client, the
extra ``socks5d[metrics]``, imported only then. :class:`Metrics` is the connections'
SessionObserver: outcomes are counted where a session concludes (both drivers share it),
tunnel bytes come from the core's TrafficMeter (the tunnels' own counts, read every second
and at the end), refusals at the core's caps from the server's refusal_counted hook.

Nothing on a connection's path touches a metric object (a lock and some bookkeeping per
call, ~3 us): an event stores the session in a dict (open sessions) or appends it to a
deque, and a flusher thread in each process counts those in batches into the metric objects
every FLUSH_INTERVAL (rare events go through :class:`Tallies`); a scrape flushes its own
process first, so in one process it is exact.

One process (threading mode, one worker): the metrics are this process's. Several (forking
mode, a child per connection; ``--workers N``): prometheus_client's multiprocess mode. The
daemon makes a private directory before any metric exists (PROMETHEUS_MULTIPROC_DIR); each
process writes its values to files of its own there (mmap), and a scrape in the first
process adds them up. When a process ends, its gauges' files are dropped
(mark_process_dead) and its counters and histograms are folded into the files of the
process that reaped it, so the directory holds about one set of files per live process, not
one per connection ever served. The directory is removed when the daemon exits.

Imports: prometheus_client (lazily), the core server for the endpoint, socks' session hooks.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import importlib
import logging
import math
import operator
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

from .. import __version__
from ..core.addresses import format_host_port
from ..core.relay import TrafficMeter, set_traffic_meter
from ..core.server import StreamRequestHandler, ThreadingTCPServer
from ..core.shmem import ProcessLocal, RobustLock
from ..policy.rules import exposed_listeners
from ..socks.protocol import Reply
from ..socks.session import Session, SessionObserver
from .config import ConfigError

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'socks5d[metrics]'"

# Session.command -> the `command` label.
COMMAND_LABELS = {"CONNECT": "connect", "BIND": "bind", "UDP_ASSOCIATE": "udp"}
# Session.proto -> the `protocol` label (SOCKS4A is SOCKS4 with a name).
PROTOCOL_LABELS = {"socks5": "socks5", "socks4": "socks4", "socks4a": "socks4"}
# The core's cap names (AcceptAccounting.refused) -> the `limit` label.
CAP_LABELS = {"max_connections": "max_connections", "max_connections_per_ip": "per_ip"}
# Seconds: a handshake is a few round trips; a connect may take up to timeouts.connect.
DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# Seconds between flushes of a process's counts into its metrics (and of the open tunnels'
# bytes): what a scrape of another process sees is at most this old.
FLUSH_INTERVAL = 1.0
# Session.command -> the connections_active label ("-": still in the handshake).
ACTIVE_LABELS = {"CONNECT": "connect", "BIND": "bind", "UDP_ASSOCIATE": "udp", "-": "none"}
_COMMAND = operator.attrgetter("command")
_OUTCOME = operator.attrgetter("proto", "command", "reply")
UDP_LABELS = (("up", "relayed"), ("down", "relayed"), ("up", "dropped"), ("down", "dropped"))
# Dead processes whose files wait to be folded before the reaping process folds them at
# once rather than at its next periodic() call.
FOLD_BATCH = 64


_DENIED = Reply.CONNECTION_NOT_ALLOWED  # RFC 1928 §6 X'02', by a rule


class MetricsUnavailable(ConfigError):
    """prometheus_client is not installed (a config problem: exit code 2)."""


def command_label(command: str) -> str:
    return COMMAND_LABELS.get(command, "none")


def reply_label(reply: Reply | None) -> str:
    """RFC 1928 §6 REP as two hex digits; "none" for a connection closed without one."""
    return "none" if reply is None else f"{reply:02x}"


def rule_label(reason: str) -> str:
    """The denying decision as a label: a rule's index ("rules[3]" -> "3"), "default", or
    the built-in guard ("private_destination", "own_address", "own_listener")."""
    if reason.startswith("rules[") and reason.endswith("]"):
        return reason[6:-1]
    if reason == "default deny":
        return "default"
    return reason.replace(" ", "_")


def load_prometheus() -> Any:
    try:
        return importlib.import_module("prometheus_client")
    except ImportError:
        raise MetricsUnavailable(
            f"metrics.listen needs the prometheus_client library: {INSTALL_HINT}"
        ) from None


def exposure_warning(listen: tuple[str, int]) -> str | None:
    """A warning when other hosts can reach the metrics endpoint."""
    if not exposed_listeners([listen]):
        return None
    return (
        f"metrics.listen {format_host_port(*listen)} is reachable from other hosts: the "
        "metrics reveal traffic volumes and client activity; keep it on loopback or "
        "behind a firewall"
    )


class Metrics(SessionObserver, ProcessLocal):
    """The daemon's metrics, fed as a SessionObserver (see the module docstring).

    ``directory``: the multiprocess directory (several processes), or None (one).
    """

    def __init__(self, directory: str | None = None) -> None:
        prometheus = load_prometheus()
        self.prometheus = prometheus
        self.directory = directory
        self.owner = os.getpid()  # serves scrapes, removes the directory at close()
        self.values = importlib.import_module("prometheus_client.values")
        self.multiprocess = importlib.import_module("prometheus_client.multiprocess")
        if directory is not None:
            # Set here, not only through the environment before the import: whatever
            # imported prometheus_client first, every metric made from now on is mmap'ed.
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
        self._stopped = threading.Event()  # close(): the flusher ends
        self._pending_dead: list[int] = []
        self._last_fold = time.monotonic()
        self.meter = TrafficMeter(self.relayed)
        self.http: ThreadingTCPServer | None = None
        # Folding against scraping, across processes and threads (see fold()).
        self._directory_lock: RobustLock | None = None
        if directory is not None:
            lock_file = os.open(os.path.join(directory, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
            self._lock_file = lock_file  # open while the lock is in use (POSIX rule)
            self._directory_lock = RobustLock(lock_file)
        own = self._make_metrics()
        for label in ACTIVE_LABELS.values():
            # Made here, in the first process, so every command shows, at 0 while idle
            # (a process's gauges vanish with it; this one lives as long as the daemon).
            self.child(self.active, label)
        self.registry = self._scrape_registry(own)
        self._register()

    def _start_process(self) -> None:
        """In a forked child (ProcessLocal): metric objects, tallies, locks and flusher of
        its own, and the endpoint's listening socket closed (the first process's alone).
        The parent's metric objects are left alone: a thread of the parent may have held
        prometheus_client's value lock at the fork, and the parent flushes what it
        tallied itself."""
        if os.getpid() == self.owner:
            return  # not a child: __init__ made all this
        self._make_metrics()
        self._stopped = threading.Event()
        http = self.http
        if http is not None:
            for sock in http.sockets:
                with contextlib.suppress(OSError):
                    sock.close()

    def _make_metrics(self) -> Any:
        """The metric objects (their values: this process's) and what the connection
        path keeps ready for them; the registry they are in."""
        prometheus, values = self.prometheus, self.values
        if self.directory is not None:
            values.ValueClass = values.MultiProcessValue()  # files and a lock of our own
        elif getattr(values.ValueClass, "_multiprocess", False):
            values.ValueClass = values.MutexValue
        own = prometheus.CollectorRegistry(auto_describe=True)
        counter, gauge, histogram = prometheus.Counter, prometheus.Gauge, prometheus.Histogram
        self.connections = counter(
            "socks5d_connections",
            "Connections ended, by protocol, command and reply (RFC 1928 section 6 REP in hex).",
            ["protocol", "command", "reply"],
            registry=own,
        )
        self.active = gauge(
            "socks5d_connections_active",
            "Connections open now, by command (none: still in the handshake).",
            ["command"],
            registry=own,
            multiprocess_mode="livesum",
        )
        self.bytes = counter(
            "socks5d_bytes",
            "Payload bytes relayed (up: client to target, down: target to client), open "
            "tunnels included.",
            ["direction"],
            registry=own,
        )
        self.handshake_seconds = histogram(
            "socks5d_handshake_duration_seconds",
            "From accepting a client to its request (greeting and login included).",
            buckets=DURATION_BUCKETS,
            registry=own,
        )
        self.connect_seconds = histogram(
            "socks5d_connect_duration_seconds",
            "From a CONNECT request to its reply (lookup and connect).",
            buckets=DURATION_BUCKETS,
            registry=own,
        )
        self.auth_failures = counter(
            "socks5d_auth_failures", "RFC 1929 logins refused.", registry=own
        )
        self.rule_denials = counter(
            "socks5d_rule_denials",
            "Requests denied (reply 02), by the rule's index, default, or a built-in guard.",
            ["rule"],
            registry=own,
        )
        self.limit_refusals = counter(
            "socks5d_limit_refusals",
            "Clients refused at a connection limit.",
            ["limit"],
            registry=own,
        )
        self.udp_datagrams = counter(
            "socks5d_udp_datagrams",
            "UDP ASSOCIATE datagrams (up: from the client), relayed or dropped.",
            ["direction", "result"],
            registry=own,
        )
        self._children: dict[tuple[Any, ...], Any] = {}
        # What the connections' path leaves for flush(), per process: the sessions open
        # now (id -> session), and those dispatched, answered and ended since the last
        # flush. A dict store or a deque append per event, atomic under the GIL; the
        # counting is done once a second, in batches (~2 us a connection otherwise).
        self._live: dict[int, Session] = {}
        self._dispatched: collections.deque[Session] = collections.deque()
        self._replied: collections.deque[Session] = collections.deque()
        self._ended: collections.deque[Session] = collections.deque()
        # Rare events (failed logins, refusals) and the tunnels' bytes (from the flusher).
        self.tallies = Tallies()
        self._flush_lock = threading.Lock()  # one flush at a time writes the metric objects
        self._flusher_running = False
        return own

    def _scrape_registry(self, own: Any) -> Any:
        prometheus = self.prometheus
        if self.directory is None:
            registry = own
            prometheus.GCCollector(registry=registry)
        else:
            registry = prometheus.CollectorRegistry(auto_describe=True)
            self.multiprocess.MultiProcessCollector(registry, path=self.directory)
        prometheus.ProcessCollector(registry=registry)
        prometheus.PlatformCollector(registry=registry)
        registry.register(BuildInfo(prometheus))
        return registry

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, kept (and ``metric`` itself with no labels)."""
        key = (metric, *labels)
        try:
            return self._children[key]
        except KeyError:
            made = self._children[key] = metric.labels(*labels) if labels else metric
            return made

    # ---- SessionObserver: on the connections' path, a dict store or a deque append ----

    def begun(self, session: Session) -> None:
        if not self._flusher_running:
            self._start_flusher()
        self._live[id(session)] = session

    def dispatched(self, session: Session) -> None:
        session.dispatched_at = time.monotonic()
        self._dispatched.append(session)  # deque.append: atomic, no lock

    def replied(self, session: Session) -> None:
        if session.command == "CONNECT" and session.dispatched_at:
            session.replied_at = time.monotonic()
            self._replied.append(session)

    def login_failed(self, session: Session) -> None:
        self.tallies.mine()[(self.auth_failures,)] += 1

    def limit_refused(self, limit: str) -> None:
        if not self._flusher_running:
            self._start_flusher()
        self.tallies.mine()[self.limit_refusals, CAP_LABELS.get(limit, limit)] += 1

    def concluded(self, session: Session) -> None:
        self._live.pop(id(session), None)
        self._ended.append(session)

    # ---- the core's reports ----

    def relayed(self, up: int, down: int) -> None:
        """Bytes moved: the TrafficMeter's report (a flush samples it), UDP payload."""
        tally = self.tallies.mine()
        tally[self.bytes, "up"] += up
        tally[self.bytes, "down"] += down

    # ---- into the metric objects ----

    def flush(self) -> None:
        """Put what happened since the last flush into the metric objects (in several
        processes: this process's files): the sessions that came, were answered and
        ended, the open ones by command, the tunnels' bytes, the tallied rare events."""
        self.meter.sample()
        with self._flush_lock:
            self._count_ended(_drain(self._ended))
            self._observe(self.handshake_seconds, _drain(self._dispatched), "started")
            self._observe(self.connect_seconds, _drain(self._replied), "dispatched_at")
            for key, amount in self.tallies.collect().items():
                self.child(key[0], *key[1:]).inc(amount)
            # The sessions open in this process (a livesum gauge adds up the processes).
            open_now = collections.Counter(map(_COMMAND, list(self._live.values())))
            for command, label in ACTIVE_LABELS.items():
                self.child(self.active, label).set(open_now.get(command, 0))

    def _count_ended(self, sessions: list[Session]) -> None:
        outcomes = collections.Counter(map(_OUTCOME, sessions))
        for (proto, command, reply), count in outcomes.items():
            protocol = PROTOCOL_LABELS.get(proto, proto)
            labels = (protocol, command_label(command), reply_label(reply))
            self.child(self.connections, *labels).inc(count)
        if any(reply is _DENIED for _, _, reply in outcomes):
            for session in sessions:
                if session.reply is _DENIED and session.rule != "-":
                    self.child(self.rule_denials, rule_label(session.rule)).inc()
        if any(command == "UDP_ASSOCIATE" for _, command, _ in outcomes):
            for session in sessions:
                if session.datagrams is not None:
                    # UDP payload is not a tunnel's: counted when the association ends.
                    self.relayed(session.up, session.down)
                    for labels, count in zip(UDP_LABELS, session.datagrams, strict=True):
                        if count:
                            self.child(self.udp_datagrams, *labels).inc(count)

    def _observe(self, histogram: Any, sessions: list[Session], since: str) -> None:
        """Observe each session's time from `since` (started: to its request; dispatched_at:
        to its reply), as a batch: sorted, then counted per bucket with bisect."""
        if not sessions:
            return
        until = "dispatched_at" if since == "started" else "replied_at"
        took = sorted(getattr(s, until) - getattr(s, since) for s in sessions)
        # The histogram's own per-bucket values, what observe() adds to (not cumulative).
        counted = 0
        for index, bound in enumerate(DURATION_BUCKETS):
            upto = bisect.bisect_right(took, bound)  # observations <= bound
            if upto > counted:
                histogram._buckets[index].inc(upto - counted)
                counted = upto
        if len(took) > counted:
            histogram._buckets[len(DURATION_BUCKETS)].inc(len(took) - counted)  # +Inf
        histogram._sum.inc(math.fsum(took))

    def _start_flusher(self) -> None:
        """The thread that flushes every FLUSH_INTERVAL, one per process (a forked child
        starts its own with its first event)."""
        with self._flush_lock:
            if self._flusher_running:
                return
            self._flusher_running = True
        threading.Thread(target=self._flush_forever, name="metrics-flush", daemon=True).start()

    def _flush_forever(self) -> None:
        stopped = self._stopped
        while not stopped.wait(FLUSH_INTERVAL):
            try:
                self.flush()
            except Exception:
                logger.exception("metrics: flush failed")

    # ---- several processes ----

    def process_ended(self, pid: int, *, fold_now: bool = False) -> None:
        """A process that may have written metrics ended and is not reaped yet (so its PID
        is not reused): drop its gauges now, fold its files soon (see periodic())."""
        if self.directory is None:
            return
        self.multiprocess.mark_process_dead(pid, self.directory)
        self._pending_dead.append(pid)
        if fold_now or len(self._pending_dead) >= FOLD_BATCH:
            self.fold()

    def periodic(self) -> None:
        """From the serving loop: fold the files of ended processes once a second."""
        if self._pending_dead and time.monotonic() - self._last_fold >= 1.0:
            self.fold()

    def fold(self) -> None:
        """Add the counters and histograms of ended processes to this process's own
        folded files and remove theirs: what a scrape adds up stays the same."""
        dead, self._pending_dead = self._pending_dead, []
        self._last_fold = time.monotonic()
        if not dead or self._directory_lock is None:
            return
        # Against a scrape (which takes it too): it never sees a dead process's values
        # both in its files and folded, or in neither.
        with self._directory_lock:
            for kind in ("counter", "histogram"):
                self._fold_kind(kind, dead)

    def _fold_kind(self, kind: str, dead: list[int]) -> None:
        directory = self.directory
        assert directory is not None
        theirs = [
            path
            for pid in dead
            for name in (f"{kind}_{pid}.db", f"{kind}_folded{pid}.db")
            if os.path.exists(path := os.path.join(directory, name))
        ]
        if not theirs:
            return
        mine = os.path.join(directory, f"{kind}_folded{os.getpid()}.db")
        sources = [*theirs, mine] if os.path.exists(mine) else theirs
        merged = self.multiprocess.MultiProcessCollector.merge(sources, accumulate=False)
        mmap_dict = importlib.import_module("prometheus_client.mmap_dict")
        scratch = mine + ".tmp"  # not *.db: a scrape never reads it half written
        with contextlib.suppress(FileNotFoundError):
            os.unlink(scratch)
        folded = mmap_dict.MmapedDict(scratch)
        try:
            for metric in merged:
                for sample in metric.samples:
                    key = mmap_dict.mmap_key(
                        metric.name,
                        sample.name,
                        list(sample.labels),
                        list(sample.labels.values()),
                        metric.documentation,
                    )
                    folded.write_value(key, sample.value, 0.0)
        finally:
            folded.close()
        os.replace(scratch, mine)
        for path in theirs:
            os.unlink(path)

    # ---- exposition ----

    def exposition(self) -> bytes:
        """The text a scrape returns (Prometheus text format)."""
        self.flush()  # this process's counts, up to now
        if self._directory_lock is None:
            return self.prometheus.generate_latest(self.registry)
        with self._directory_lock:
            return self.prometheus.generate_latest(self.registry)

    def serve(self, listen: tuple[str, int]) -> tuple[str, int]:
        """Start the endpoint in a thread; its bound (host, port). OSError if it cannot."""
        server = MetricsHTTPServer(listen, MetricsHandler, max_connections=8)
        server.metrics = self
        thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
        thread.start()
        self.http = server
        address = server.server_addresses[0]
        return str(address[0]), int(address[1])

    def start(self) -> None:
        """Count tunnels from now on."""
        set_traffic_meter(self.meter)

    def close(self) -> None:
        """Stop serving scrapes and counting; the first process removes the directory."""
        set_traffic_meter(None)
        self._stopped.set()
        if os.getpid() != self.owner:
            return
        if self.http is not None:
            self.http.shutdown()
            self.http.server_close()
            self.http = None
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            os.close(self._lock_file)


Key = tuple[Any, ...]
# The blank line that ends an HTTP request head (RFC 9112 §2.1; a bare LF accepted, §2.2).
_HEAD_END = re.compile(rb"\r?\n\r?\n")


def _drain(queue: collections.deque[Session]) -> list[Session]:
    """What the queue holds now (appends that come meanwhile wait for the next drain)."""
    return [queue.popleft() for _ in range(len(queue))]


class Tallies:
    """Counts kept per thread without a lock: each thread adds to a dict of its own, and
    collect() (the flusher) reads every thread's dict and passes on how much each amount
    changed since it last looked. For the events too rare for the queues (failed logins,
    refusals) and the bytes the flusher samples.

    Reading another thread's dict while it writes is safe under the GIL: list() of its
    items is taken whole, and a value read is either the old or the new one; the rest
    is read next time. A thread that has ended is read one last time and forgotten.
    """

    def __init__(self) -> None:
        self.local = threading.local()  # .tally: the thread's dict, once mine() made it
        self._lock = threading.Lock()  # guards _threads
        # (thread, its amounts, the amounts collect() passed on so far)
        self._threads: list[tuple[threading.Thread, dict[Key, float], dict[Key, float]]] = []

    def mine(self) -> dict[Key, float]:
        """The calling thread's dict of amounts (a missing key reads 0)."""
        try:
            return self.local.tally  # type: ignore[no-any-return]
        except AttributeError:
            tally: dict[Key, float] = collections.defaultdict(int)
            self.local.tally = tally
            with self._lock:
                self._threads.append((threading.current_thread(), tally, {}))
            return tally

    def collect(self) -> dict[Key, float]:
        """What changed since the last collect(), summed over the threads (one caller at
        a time)."""
        with self._lock:
            threads = list(self._threads)
        changed: dict[Key, float] = {}
        ended = []
        for entry in threads:
            thread, tally, passed = entry
            if not thread.is_alive():  # checked first: it wrote its last already
                ended.append(entry)
            for key, amount in list(tally.items()):
                delta = amount - passed.get(key, 0)
                if delta:
                    passed[key] = amount
                    changed[key] = changed.get(key, 0) + delta
        if ended:
            with self._lock:
                self._threads = [e for e in self._threads if not any(e is x for x in ended)]
        return {key: amount for key, amount in changed.items() if amount}


class BuildInfo:
    """socks5d_build_info{version} 1: which release is running."""

    def __init__(self, prometheus: Any) -> None:
        self.family = importlib.import_module("prometheus_client.core").GaugeMetricFamily

    def collect(self) -> Iterator[Any]:
        family = self.family(
            "socks5d_build_info", "The socks5d version running.", labels=["version"]
        )
        family.add_metric([__version__], 1)
        yield family


class MetricsHTTPServer(ThreadingTCPServer):
    """The /metrics endpoint: the core's server (a bounded pool, at most 8 scrapes at once;
    more are closed), serving a handler that reads one short request."""

    metrics: Metrics

    def handle_overload(self, request: Any, client_address: Any) -> None:
        """Past 8 scrapes at once: close, without the core's warning, which would read
        as if the proxy itself refused clients."""
        self.shutdown_request(request)


class MetricsHandler(StreamRequestHandler):
    """GET /metrics (or /): the exposition; anything else a short error. One request per
    connection, its head bounded in size and time."""

    timeout = 10.0
    MAX_LINE = 8192
    MAX_HEADERS = 100
    MAX_HEAD = 16 * 1024  # a scrape's head is a few hundred bytes

    server: MetricsHTTPServer

    def handle(self) -> None:
        try:
            head = self.read_head()
        except (OSError, ValueError):
            return  # slow, cut or oversized: nothing to answer
        if head is None:
            return
        method, target = head
        if method not in ("GET", "HEAD"):
            self.respond(405, b"only GET\n", extra=b"Allow: GET, HEAD\r\n")
        elif target.partition("?")[0] not in ("/metrics", "/"):
            self.respond(404, b"see /metrics\n")
        else:
            try:
                body = self.server.metrics.exposition()
            except Exception:
                logger.exception("metrics: scrape failed")
                self.respond(500, b"scrape failed\n")
                return
            content_type = self.server.metrics.prometheus.CONTENT_TYPE_LATEST
            self.respond(200, body, content_type, head_only=method == "HEAD")

    def read_head(self) -> tuple[str, str] | None:
        """(method, target) of the request, its headers read and ignored; None when the
        request line is not HTTP; ValueError when the head is too long, TimeoutError when
        it is not all there within `timeout` s of the connection's start.

        One deadline for the whole head, not a timeout per read: a client trickling a
        byte every few seconds would otherwise hold one of the 8 slots for as long as it
        liked, and 8 such clients would stop every scrape (slowloris)."""
        head = self.receive_head(time.monotonic() + self.timeout)
        lines = head.split(b"\n")
        if len(lines[0]) > self.MAX_LINE:
            raise ValueError("request line too long")
        parts = lines[0].decode("latin-1").split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return None
        if len(lines) - 1 > self.MAX_HEADERS:  # the request line, then the headers
            raise ValueError("too many headers")
        if any(len(line) > self.MAX_LINE for line in lines):
            raise ValueError("header too long")
        return parts[0], parts[1]

    def receive_head(self, deadline: float) -> bytes:
        """The bytes up to the blank line ending the head (or EOF), read by `deadline`."""
        sock = self.connection
        head = bytearray()
        while _HEAD_END.search(head) is None:
            if len(head) > self.MAX_HEAD:
                raise ValueError("request head too long")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("request head not received in time")
            sock.settimeout(remaining)
            chunk = sock.recv(4096)
            if not chunk:
                break  # EOF: what came is the request
            head += chunk
        sock.settimeout(self.timeout)  # for the answer
        end = _HEAD_END.search(head)
        return bytes(head[: end.start()] if end is not None else head)

    def respond(
        self,
        status: int,
        body: bytes,
        content_type: str = "text/plain; charset=utf-8",
        *,
        extra: bytes = b"",
        head_only: bool = False,
    ) -> None:
        reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed"}.get(status, "Error")
        head = (
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n"
        ).encode() + extra
        with contextlib.suppress(OSError):
            self.wfile.write(head + b"\r\n" + (b"" if head_only else body))


def setup_metrics(listen: tuple[str, int], several_processes: bool) -> Metrics:
    """Metrics counted from now on and served on ``listen`` (a multiprocess directory made
    first when ``several_processes``). MetricsUnavailable without prometheus_client;
    OSError when the address cannot be bound."""
    directory = tempfile.mkdtemp(prefix="socks5d-metrics-") if several_processes else None
    try:
        metrics = Metrics(directory)
        host, port = metrics.serve(listen)
    except BaseException:
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)
        raise
    metrics.start()
    logger.info(
        "metrics on http://%s/metrics%s",
        format_host_port(host, port),
        f" (multiprocess: {directory})" if directory else "",
    )
    warning = exposure_warning(listen)
    if warning:
        logger.warning("%s", warning)
    return metrics
