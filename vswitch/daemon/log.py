"""The daemon's structured log.

Theory of operation: every event is one line of JSON (``ts`` in UTC with milliseconds,
``level``, ``event``, then the event's fields) written to stderr and, with
``--log-file``, appended to that file (line-buffered). Events less severe than
``--log-level`` are not written anywhere. The file names pods and addresses, so it is
created (and, if it exists, set) mode 0600, owned by the daemon's user; with
``--log-group`` it belongs to that group, mode 0640. ``reopen`` (the daemon calls it on
SIGHUP) opens the path again, so a rotated (renamed) file is closed and a new one is
created with the same mode; if the open fails (say, no fd left) the old file is kept and
the failure logged. A write that fails is dropped: the log never stops the daemon. Every
part of the daemon gets the same ``Log`` and calls it like a function,
``log("attached", container_id=..., ...)``.
"""
from __future__ import annotations

import datetime
import grp
import json
import os
import sys

LOG_LEVELS = ("debug", "info", "warning", "error")
_RANK = {name: i for i, name in enumerate(LOG_LEVELS)}


def _gid(group: str) -> int:
    """A group name or number -> gid; KeyError naming it if unknown."""
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise KeyError(f"--log-group {group!r}: no such group; accepted: a group name or number") from None


class Log:
    """Structured log lines: one JSON object per line (ts, level, event, fields)."""

    def __init__(self, path: str | None = None, level: str = "info", group: str | None = None):
        if level not in _RANK:
            raise ValueError(f"log level {level!r}; accepted: {', '.join(LOG_LEVELS)}")
        self.min_rank = _RANK[level]
        self.path = path
        self.gid = _gid(group) if group is not None else None
        self.mode = 0o640 if self.gid is not None else 0o600
        self.file = self._open() if path else None

    def _open(self):
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, self.mode)
        try:
            if self.gid is not None:
                os.fchown(fd, -1, self.gid)
            os.fchmod(fd, self.mode)    # also an existing file: it names pods and addresses
            return os.fdopen(fd, "a", buffering=1)
        except BaseException:
            os.close(fd)
            raise

    def reopen(self):
        """Log rotation: write to a file opened anew at the path (SIGHUP)."""
        if not self.path:
            return
        try:
            new = self._open()
        except OSError as exc:
            self("log_reopen_failed", level="error", path=self.path, error=exc.strerror)
            return
        old, self.file = self.file, new
        if old is not None:
            try:
                old.close()
            except OSError:
                pass
        self("log_reopened", path=self.path)

    def __call__(self, event: str, level: str = "info", **fields):
        if _RANK.get(level, len(LOG_LEVELS)) < self.min_rank:
            return
        rec = {"ts": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
               "level": level, "event": event, **fields}
        line = json.dumps(rec, default=str) + "\n"
        for f in (sys.stderr, self.file):
            if f is None:
                continue
            try:
                f.write(line)
                f.flush()
            except (OSError, ValueError):
                pass
