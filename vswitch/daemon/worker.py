"""The kernel thread: where the daemon blocks, so the packet loop does not.

Theory of operation
-------------------
Netlink round trips, TAP creation and release, ``nft`` and the state file's fsync block
for milliseconds. They run on one ``KernelWorker`` thread, one job at a time in
submission order: ``submit(fn, args)`` queues ``fn(*args)``; when it returns (or raises)
the result is queued and the eventfd ``fd``, registered in the daemon's control epoll,
becomes readable, which brings the loop back to Python; ``completions()`` (loop thread)
yields the results as ``(ok, value)``. The thread blocks in syscalls without the GIL, and
the daemon lowers the interpreter's switch interval so that the loop gets the GIL back
quickly while the thread runs Python. ``stop`` lets queued jobs finish, then joins.
"""
from __future__ import annotations

import collections
import os
import threading


class KernelWorker:
    def __init__(self):
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._jobs = collections.deque()
        self._cv = threading.Condition()
        self._done = collections.deque()
        self._thread = threading.Thread(target=self._run, name="vswitchd-kernel", daemon=True)
        self._thread.start()

    def submit(self, fn, args=()):
        with self._cv:
            self._jobs.append((fn, args))
            self._cv.notify()

    def _run(self):
        while True:
            with self._cv:
                while not self._jobs:
                    self._cv.wait()
                job = self._jobs.popleft()
            if job is None:
                return
            fn, args = job
            try:
                res = (True, fn(*args))
            except BaseException as exc:   # handed to the operation that submitted it
                res = (False, exc)
            self._done.append(res)
            os.eventfd_write(self.fd, 1)

    def completions(self):
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:
            pass
        while self._done:
            yield self._done.popleft()

    def stop(self, timeout_s: float = 30.0):
        with self._cv:
            self._jobs.append(None)
            self._cv.notify()
        self._thread.join(timeout_s)
        os.close(self.fd)
