"""Real clients through the proxy: PySocks (the reference client) and curl."""

from __future__ import annotations

import hashlib
import http.server
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator

import pytest
import socks
from clients import TIMEOUT, recv_exactly
from conftest import needs_ipv6, running_proxy

from socks5d.ops.config import User

PAGE = os.urandom(300 * 1024)
PAGE_SHA256 = hashlib.sha256(PAGE).hexdigest()


class PageHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAGE)))
        self.end_headers()
        self.wfile.write(PAGE)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        digest = hashlib.sha256(body).hexdigest().encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(digest)))
        self.end_headers()
        self.wfile.write(digest)

    def log_message(self, *args: object) -> None:
        pass


class V6HTTPServer(http.server.ThreadingHTTPServer):
    address_family = __import__("socket").AF_INET6


@pytest.fixture
def web() -> Iterator[http.server.ThreadingHTTPServer]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), PageHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join(TIMEOUT)


@pytest.fixture
def web6() -> Iterator[http.server.ThreadingHTTPServer]:
    httpd = V6HTTPServer(("::1", 0), PageHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join(TIMEOUT)


def pysocks_socket(proxy, rdns=True, username=None, password=None) -> socks.socksocket:
    sock = socks.socksocket()
    sock.set_proxy(socks.SOCKS5, proxy.host, proxy.port, rdns, username, password)
    sock.settimeout(TIMEOUT)
    return sock


# ---- PySocks ----


@pytest.mark.parametrize("target_host", ["127.0.0.1", "localhost"])
def test_pysocks_connect_echo(proxy, echo_target, target_host):
    with pysocks_socket(proxy) as sock:
        sock.connect((target_host, echo_target.port))
        sock.sendall(b"pysocks says hi")
        assert recv_exactly(sock, 15) == b"pysocks says hi"


@needs_ipv6
def test_pysocks_connect_ipv6(proxy, target_factory):
    target = target_factory(host="::1")
    with pysocks_socket(proxy) as sock:
        sock.connect(("::1", target.port))
        sock.sendall(b"six")
        assert recv_exactly(sock, 3) == b"six"


def test_pysocks_with_password(echo_target):
    with running_proxy(users=(User("alice", "secret"),)) as proxy:
        with pysocks_socket(proxy, username="alice", password="secret") as sock:
            sock.connect(("127.0.0.1", echo_target.port))
            sock.sendall(b"logged in")
            assert recv_exactly(sock, 9) == b"logged in"


def test_pysocks_wrong_password_is_refused(echo_target):
    with running_proxy(users=(User("alice", "secret"),)) as proxy:
        with pysocks_socket(proxy, username="alice", password="nope") as sock:
            with pytest.raises(socks.GeneralProxyError, match="SOCKS5 authentication failed"):
                sock.connect(("127.0.0.1", echo_target.port))


def test_pysocks_refused_target_reports_connection_refused(proxy):
    with pysocks_socket(proxy) as sock, pytest.raises(socks.GeneralProxyError) as caught:
        sock.connect(("127.0.0.1", 1))
    assert "0x05" in str(caught.value) and "Connection refused" in str(caught.value)


def test_pysocks_http_get_through_the_proxy(proxy, web):
    with pysocks_socket(proxy) as sock:
        sock.connect(("localhost", web.server_port))
        sock.sendall(b"GET /page HTTP/1.0\r\nHost: localhost\r\n\r\n")
        response = bytearray()
        while chunk := sock.recv(65536):
            response += chunk
    head, _, body = bytes(response).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200")
    assert hashlib.sha256(body).hexdigest() == PAGE_SHA256


# ---- curl ----

needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")


def curl(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["curl", "--silent", "--show-error", "--max-time", "10", *args],
        input=stdin,
        capture_output=True,
        timeout=30,
        env={k: v for k, v in os.environ.items() if "proxy" not in k.lower()},
    )


@needs_curl
@pytest.mark.parametrize("flag", ["--socks5", "--socks5-hostname"])
def test_curl_fetches_a_page_intact(proxy, web, flag):
    result = curl(flag, f"127.0.0.1:{proxy.port}", f"http://localhost:{web.server_port}/page")
    assert result.returncode == 0, result.stderr
    assert hashlib.sha256(result.stdout).hexdigest() == PAGE_SHA256


@needs_curl
def test_curl_socks5h_url_with_user_and_password(web):
    with running_proxy(users=(User("alice", "s3cret"),)) as proxy:
        result = curl(
            "--proxy",
            f"socks5h://alice:s3cret@127.0.0.1:{proxy.port}",
            f"http://localhost:{web.server_port}/page",
        )
        assert result.returncode == 0, result.stderr
        assert hashlib.sha256(result.stdout).hexdigest() == PAGE_SHA256
        wrong = curl(
            "--proxy",
            f"socks5h://alice:wrong@127.0.0.1:{proxy.port}",
            f"http://localhost:{web.server_port}/page",
        )
        assert wrong.returncode == 97  # CURLE_PROXY: the proxy refused the login
        assert wrong.stdout == b""


@needs_curl
def test_curl_uploads_a_body_intact(threading_proxy, web):
    body = os.urandom(2 * 1024 * 1024)
    result = curl(
        "--socks5-hostname",
        f"127.0.0.1:{threading_proxy.port}",
        "--data-binary",
        "@-",
        "-H",
        "Expect:",  # no 100-continue pause
        f"http://localhost:{web.server_port}/upload",
        stdin=body,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode() == hashlib.sha256(body).hexdigest()


@needs_curl
@needs_ipv6
def test_curl_to_an_ipv6_target(proxy, web6):
    result = curl("--socks5", f"127.0.0.1:{proxy.port}", f"http://[::1]:{web6.server_port}/page")
    assert result.returncode == 0, result.stderr
    assert hashlib.sha256(result.stdout).hexdigest() == PAGE_SHA256


@needs_curl
def test_curl_reports_the_refused_reply(proxy):
    result = curl("--socks5", f"127.0.0.1:{proxy.port}", "http://127.0.0.1:1/")
    assert result.returncode == 97
    assert b"SOCKS5 connection to 127.0.0.1. (5)" in result.stderr  # curl names the reply code
