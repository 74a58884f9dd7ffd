"""socks5d: a SOCKS5 proxy daemon (RFC 1928, RFC 1929) on a synchronous server core."""

__version__ = "0.1.0"
