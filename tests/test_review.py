"""Adversarial review of the PROXY protocol, SOCKS4/4a, upstream chaining, the metrics
endpoint and the stderr log handler: each test performs one attack that worked (or was
suspected to) and checks it no longer does."""

from __future__ import annotations

import select
import socket

import pytest
from test_logs_blocked import small_pipe  # noqa: F401  (a fixture)

TIMEOUT = 10.0


# ---- metrics endpoint ----


def test_metrics_slowloris_trickling_a_head_is_cut_off_by_one_deadline(monkeypatch):
    """A client trickling its request head a byte at a time, each byte inside the
    per-read timeout, held a slot for as long as it liked: 8 of them stopped every
    scrape. The head must now arrive within one deadline."""
    pytest.importorskip("prometheus_client")
    from socks5d.ops.metrics import Metrics, MetricsHandler

    monkeypatch.setattr(MetricsHandler, "timeout", 1.0)
    metrics = Metrics()
    host, port = metrics.serve(("127.0.0.1", 0))
    try:
        with socket.create_connection((host, port), timeout=TIMEOUT) as sock:
            closed = False
            trickle = b"GET /metrics HTTP/1.1\r\nX-Slow: " + b"a" * 60
            for byte in trickle:  # 0.25 s apart: 15 s in all, well past the 1 s deadline
                try:
                    sock.sendall(bytes((byte,)))
                except OSError:
                    closed = True
                    break
                readable, _, _ = select.select([sock], [], [], 0.25)
                if readable:
                    try:
                        closed = sock.recv(1) == b""
                    except OSError:
                        closed = True
                    break
            assert closed, "the endpoint kept a trickling client past its head deadline"
        # and the endpoint still answers a prompt client
        with socket.create_connection((host, port), timeout=TIMEOUT) as sock:
            sock.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
            response = b""
            while chunk := sock.recv(65536):
                response += chunk
        assert response.startswith(b"HTTP/1.1 200 OK")
        assert b"socks5d_build_info" in response
    finally:
        metrics.close()


# ---- upstream chaining ----


@pytest.mark.parametrize(
    ("rules", "host"),
    [
        # a deny rule for a network, evaded by spelling an address in it as a name
        ('[[rules]]\naction = "deny"\nto = ["10.0.0.0/8"]\n', "10.1.2.3"),
        # the private-destination guard, evaded the same way (and in inet_aton spellings)
        ("", "127.0.0.1"),
        ("", "127.1"),
        ("", "2130706433"),
        ("", "::1"),
    ],
)
def test_an_ip_literal_sent_as_a_domain_name_is_checked_before_a_parent_gets_it(
    target_factory, caplog, rules, host
):
    """A SOCKS5 DOMAINNAME holding an IP address (in any spelling the resolver takes)
    routed to a parent that resolves names went to the parent unchecked: the `to`
    networks and the private-destination guard were skipped, and the parent connected
    to the address on our behalf."""
    import logging

    from test_upstream import HttpParent, name, one_request, upstream_toml

    from socks5d.socks.protocol import Reply

    caplog.set_level(logging.INFO, logger="socks5d.access")
    parent = HttpParent(target_factory, b"HTTP/1.1 200 OK\r\n\r\n")
    toml = (
        '[access]\nprivate_destinations = "deny"\n'
        + upstream_toml(f"http://127.0.0.1:{parent.port}", via_default=False)
        + '[[rules]]\naction = "allow"\nto = ["*.example"]\nvia = "corp"\n'
        + rules
        + '[[rules]]\naction = "allow"\nvia = "corp"\n'
    )
    got, session = one_request(toml, name(host, 80), caplog)
    assert got == Reply.CONNECTION_NOT_ALLOWED
    assert parent.heads == []
    assert session.via == "-" or session.via is None


# ---- stderr log handler ----


def test_a_non_blocking_stderr_loses_no_lines(small_pipe):  # noqa: F811
    """stderr shared with a process that made it O_NONBLOCK (a shell or node on the
    same terminal or pipe): the writer thread's write failed with EAGAIN and the whole
    backlog chunk was thrown away silently, neither written nor counted as dropped."""
    import os
    import threading

    from test_logs_blocked import drain, record

    from socks5d.ops.logs import _StderrHandler

    read_end, write_end = small_pipe
    os.set_blocking(write_end, False)
    handler = _StderrHandler(write_end)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(drain(read_end)))
    reader.start()  # a lagging reader: the pipe fills and writes meet EAGAIN
    for i in range(400):  # ~66 KB: 16 times what the pipe holds, well within the backlog
        handler.emit(record(i))
    handler.flush(timeout=TIMEOUT)
    handler.close()
    os.close(write_end)
    reader.join(TIMEOUT)
    assert [int(line.split()[1]) for line in lines] == list(range(400))


@pytest.mark.parametrize(
    "host",
    [
        b"x.example:80 HTTP/1.1\r\nHost: evil.example\r\n\r\nGET / HTTP/1.1\r\nX: y",
        b"x.example\r\nProxy-Authorization: Basic AAAA",
        b"x.example HTTP/1.0",
        b"x.example\nX: y",
    ],
)
def test_a_name_that_would_inject_into_an_http_parents_connect_line_never_reaches_it(
    target_factory, caplog, host
):
    """Checked, not vulnerable: a SOCKS5 DOMAINNAME carrying CR, LF or spaces (header
    or request smuggling into `CONNECT host:port HTTP/1.1`) is refused by the request
    parser with 04 before any parent is contacted."""
    import logging

    from test_upstream import HttpParent, front, upstream_toml

    from socks5d.socks.protocol import Reply

    caplog.set_level(logging.INFO, logger="socks5d.access")
    parent = HttpParent(target_factory, b"HTTP/1.1 200 OK\r\n\r\n")
    with front(upstream_toml(f"http://127.0.0.1:{parent.port}")) as proxy:
        with socket.create_connection(proxy.address, timeout=TIMEOUT) as sock:
            sock.sendall(b"\x05\x01\x00")
            assert sock.recv(2) == b"\x05\x00"
            sock.sendall(b"\x05\x01\x00\x03" + bytes((len(host),)) + host + b"\x00\x50")
            reply = b""
            while len(reply) < 2 and (chunk := sock.recv(16)):
                reply += chunk
    assert reply[:2] == bytes((5, Reply.HOST_UNREACHABLE))
    assert parent.heads == []


@pytest.mark.parametrize(
    "url",
    [
        "http://user:s3cret@ho\uff03st:80",  # NFKC: urlsplit's message quotes the netloc
        "socks5h://user:s3cret\u2100@host:1080",
        "http://user:s3cret@[::1:80",
    ],
)
def test_a_bad_upstream_url_never_prints_its_password(url):
    """urlsplit's ValueError for a netloc that changes under NFKC normalization quotes
    the netloc, credentials included; it went into the ConfigError on stderr as it was."""
    import tomllib

    from socks5d.ops.config import ConfigError, parse_config

    toml = f'[[upstreams]]\nname = "corp"\nurl = "{url}"\n'
    with pytest.raises(ConfigError) as raised:
        parse_config(tomllib.loads(toml), "test.toml")
    message = str(raised.value)
    assert "upstreams[0].url" in message
    assert "s3cret" not in message
