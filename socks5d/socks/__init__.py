"""The SOCKS5 protocol: wire format, the handshake state machine, and serving a connection."""
