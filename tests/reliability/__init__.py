"""The reliability suite: the real `socks5d` command under load, faults and hostile input.

Marked `stress`. Default counts are a CI subset; `SOCKS5D_STRESS=full` runs the full ones
(see support.py and the README's "Reliability suite").
"""
