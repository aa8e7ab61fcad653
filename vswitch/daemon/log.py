"""The daemon's structured log.

Theory of operation: every event is one line of JSON (``ts`` in UTC with milliseconds,
``level``, ``event``, then the event's fields) written to stderr and, with
``--log-file``, appended to that file (line-buffered). A write that fails is dropped: the
log never stops the daemon. Every part of the daemon gets the same ``Log`` and calls it
like a function, ``log("attached", container_id=..., ...)``.
"""
from __future__ import annotations

import datetime
import json
import sys


class Log:
    """Structured log lines: one JSON object per line (ts, level, event, fields)."""

    def __init__(self, path: str | None = None):
        self.files = [sys.stderr]
        if path:
            self.files.append(open(path, "a", buffering=1))

    def __call__(self, event: str, level: str = "info", **fields):
        rec = {"ts": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
               "level": level, "event": event, **fields}
        line = json.dumps(rec, default=str) + "\n"
        for f in self.files:
            try:
                f.write(line)
                f.flush()
            except (OSError, ValueError):
                pass
