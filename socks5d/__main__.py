"""`python -m socks5d` runs the same command as the `socks5d` script."""

from .ops.cli import main

main()
