"""socks5d's benchmark harness: run it with ``python bench/run.py`` (see BENCHMARKS.md).

Stdlib only, so it runs against any proxy without installing anything; it never imports
``socks5d`` (it speaks SOCKS5 itself and runs the daemon as a separate command).
"""
