"""addresses.client_key: the key every per-client structure counts under."""

import pytest

from socks5d.addresses import client_key


@pytest.mark.parametrize(
    ("ip", "prefix", "key"),
    [
        ("192.0.2.7", 64, "192.0.2.7"),
        ("::ffff:192.0.2.7", 64, "192.0.2.7"),  # dual-stack listener: the IPv4 client
        ("2001:db8:1:2:aaaa::1", 64, "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:ffff:ffff:ffff", 64, "2001:db8:1:2::/64"),  # same /64
        ("2001:db8:1:3::1", 64, "2001:db8:1:3::/64"),  # next /64: another client
        ("2001:db8:1:2:aaaa::1", 48, "2001:db8:1::/48"),
        ("2001:db8:1:2:aaaa::1", 128, "2001:db8:1:2:aaaa::1"),
        ("[::1]", 64, "::/64"),
        ("fe80::1%eth0", 64, "fe80::/64"),
        ("not-an-address", 64, "not-an-address"),
    ],
)
def test_client_key(ip: str, prefix: int, key: str) -> None:
    assert client_key(ip, prefix) == key
