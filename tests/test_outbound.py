"""The one errno → RFC 1928 reply table, and connecting through every resolved address."""

from __future__ import annotations

import errno
import socket

import pytest

from socks5d.outbound import ConnectFailed, open_connection, reply_for_error, resolve
from socks5d.protocol import Address, AddressType, Reply


@pytest.mark.parametrize(
    ("exc", "reply"),
    [
        (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), Reply.CONNECTION_REFUSED),
        (OSError(errno.ENETUNREACH, "net"), Reply.NETWORK_UNREACHABLE),
        (OSError(errno.EHOSTUNREACH, "host"), Reply.HOST_UNREACHABLE),
        (TimeoutError("timed out"), Reply.HOST_UNREACHABLE),
        (OSError(errno.ETIMEDOUT, "kernel timeout"), Reply.HOST_UNREACHABLE),
        (socket.gaierror(socket.EAI_NONAME, "no such name"), Reply.HOST_UNREACHABLE),
        (OSError(errno.EACCES, "denied"), Reply.CONNECTION_NOT_ALLOWED),
        (OSError(errno.EAFNOSUPPORT, "family"), Reply.ADDRESS_TYPE_NOT_SUPPORTED),
        (OSError(errno.EIO, "io"), Reply.GENERAL_FAILURE),
        (OSError("no errno"), Reply.GENERAL_FAILURE),
        (ValueError("not an OS error"), Reply.GENERAL_FAILURE),
    ],
)
def test_errno_table(exc, reply):
    assert reply_for_error(exc) is reply


def test_literal_addresses_skip_the_resolver():
    def resolver(host, port):
        raise AssertionError("DNS must not be asked for a literal")

    assert resolve(Address(AddressType.IPV4, "127.0.0.1", 80), resolver) == [
        (socket.AF_INET, ("127.0.0.1", 80))
    ]
    assert resolve(Address(AddressType.IPV6, "::1", 80), resolver) == [
        (socket.AF_INET6, ("::1", 80, 0, 0))
    ]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_every_resolved_address_is_tried_in_turn(echo_target):
    dead = closed_port()

    def resolver(host, port):
        assert (host, port) == ("multi.test", 9)
        return [
            (socket.AF_INET, ("127.0.0.1", dead)),
            (socket.AF_INET, ("127.0.0.1", echo_target.port)),
        ]

    with open_connection(Address(AddressType.DOMAINNAME, "multi.test", 9), 5.0, resolver) as sock:
        assert sock.getpeername() == ("127.0.0.1", echo_target.port)
        sock.sendall(b"ping")
        assert sock.recv(4) == b"ping"


def test_refused_everywhere_reports_05():
    with pytest.raises(ConnectFailed) as caught:
        open_connection(Address(AddressType.IPV4, "127.0.0.1", closed_port()), 5.0)
    assert caught.value.reply is Reply.CONNECTION_REFUSED


def test_dns_failure_reports_04():
    def resolver(host, port):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    with pytest.raises(ConnectFailed) as caught:
        open_connection(Address(AddressType.DOMAINNAME, "nx.invalid", 80), 5.0, resolver)
    assert caught.value.reply is Reply.HOST_UNREACHABLE
    assert "resolve failed" in caught.value.reason


def test_empty_resolution_reports_04():
    with pytest.raises(ConnectFailed) as caught:
        open_connection(Address(AddressType.DOMAINNAME, "x.test", 80), 5.0, lambda h, p: [])
    assert caught.value.reply is Reply.HOST_UNREACHABLE
