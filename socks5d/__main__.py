"""`python -m socks5d` runs the same command as the `socks5d` script."""

from .cli import main

main()
