"""systemd integration through systemd-python: sd_notify, the watchdog, socket activation, the journal.

Under the journal, `extra={"REQUEST_ID": ..., "SLOT": ...}` of a log call becomes journal fields
(JournalHandler sends record attributes as fields).

Every function is a no-op when not run under systemd (no NOTIFY_SOCKET, no LISTEN_FDS, no JOURNAL_STREAM),
so `nextn serve` behaves the same from a shell.
"""

from __future__ import annotations

import logging
import os
import socket

from systemd import daemon

log = logging.getLogger("nextn.server")


def notify(*lines: str) -> None:
    """Sends READY=1 / STATUS=... / WATCHDOG=1 / STOPPING=1 to NOTIFY_SOCKET when there is one."""
    if os.environ.get("NOTIFY_SOCKET"):
        daemon.notify("\n".join(lines))


def watchdog_interval() -> float | None:
    """Seconds between pings (half of WatchdogSec), or None when the watchdog is off or meant for another pid."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid.isdigit() and int(pid) != os.getpid()):
        return None
    try:
        return max(int(usec) / 2e6, 0.01)
    except ValueError:
        return None


def listen_sockets() -> list[socket.socket]:
    """Sockets passed by socket activation (LISTEN_FDS), as socket objects; [] otherwise."""
    fds = daemon.listen_fds()  # checks LISTEN_PID and unsets the variables so children do not inherit them
    return [socket.socket(fileno=fd) for fd in fds]


def under_systemd() -> bool:
    return bool(os.environ.get("INVOCATION_ID") or os.environ.get("NOTIFY_SOCKET"))


def setup_logging(level: str) -> None:
    root = logging.getLogger("nextn")
    for h in list(root.handlers):
        root.removeHandler(h)
    if os.environ.get("JOURNAL_STREAM"):
        from systemd.journal import JournalHandler

        handler = JournalHandler(SYSLOG_IDENTIFIER="nextn")
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level.upper())
    root.propagate = False


def set_level(level: str) -> None:
    logging.getLogger("nextn").setLevel(level.upper())
