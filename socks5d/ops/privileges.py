"""Dropping root after binding: a daemon started as root (to listen on port 1080 or
below 1024 without capabilities) should serve as an unprivileged user.

Owns: resolving the user and group names, and the setgroups/setgid/setuid sequence with
its check. Under systemd prefer DynamicUser= and AmbientCapabilities= in the unit; this
is for the init scripts and containers that start us as root.

Must not import other socks5d modules. Stdlib only (POSIX).
"""

from __future__ import annotations

import grp
import logging
import os
import pwd

__all__ = ["drop_privileges", "resolve_ids"]

logger = logging.getLogger(__name__)


def _resolve_user(user: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(user)
    except KeyError:
        pass
    if user.isdigit():
        try:
            return pwd.getpwuid(int(user))
        except KeyError:
            pass
    raise ValueError(f"unknown user {user!r} (run_as_user)")


def _resolve_group(group: str) -> int:
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        pass
    if group.isdigit():
        try:
            return grp.getgrgid(int(group)).gr_gid
        except KeyError:
            pass
    raise ValueError(f"unknown group {group!r} (run_as_group)")


def resolve_ids(user: str, group: str | None = None) -> tuple[int, int]:
    """(uid, gid) of `user` and `group` (default: the user's primary group), names or
    numbers; ValueError naming what is unknown."""
    entry = _resolve_user(user)
    return entry.pw_uid, _resolve_group(group) if group else entry.pw_gid


def drop_privileges(user: str, group: str | None = None) -> None:
    """Become `user` (and `group`, default: the user's primary group) for good.

    Does nothing unless we run as root (euid 0) and `user` is non-empty. Names (or
    numeric IDs) are resolved first, so an unknown user or group raises ValueError
    naming it before anything changes. Then, in this order: setgroups([gid]) drops
    root's supplementary groups (which setgid leaves alone), setgid while we may still
    change groups, setuid last (after it nothing else can be changed). Finally it checks
    that setuid(0) fails; if root could be regained, RuntimeError: do not serve.

    Affects the whole process (glibc applies set*id calls to every thread); call it
    before serving, so no request ever runs as root.
    """
    if not user or os.geteuid() != 0:
        if user:
            logger.debug("run_as_user %r ignored: not running as root", user)
        return
    uid, gid = resolve_ids(user, group)
    os.setgroups([gid])
    os.setgid(gid)
    os.setuid(uid)
    if uid != 0:
        try:
            os.setuid(0)
        except PermissionError:
            pass
        else:
            raise RuntimeError(f"could regain root after switching to user {user!r}")
    if (os.getuid(), os.geteuid(), os.getgid(), os.getegid()) != (uid, uid, gid, gid):
        raise RuntimeError(f"switching to user {user!r} / gid {gid} did not take effect")
    logger.info("dropped privileges to user %s (uid %d, gid %d)", user, uid, gid)
