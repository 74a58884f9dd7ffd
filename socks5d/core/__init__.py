"""The socketserver-style core, the event loops and the relay: stdlib only, knows no SOCKS."""
