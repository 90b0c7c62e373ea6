"""Worker threads for the broker's connections; a few wait for the next one.

Starting a thread costs more than a whole List request: a worker that
finished a connection waits a while (``idle_seconds``) for another, up to
``max_idle`` of them.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

Job = TypeVar("Job")


class Pool(Generic[Job]):
    """Runs ``work(job)`` for each submitted job, each in a thread of its own."""

    def __init__(
        self, work: Callable[[Job], None], max_idle: int = 16, idle_seconds: float = 60.0
    ) -> None:
        self._work = work
        self._max_idle = max_idle
        self._idle_seconds = idle_seconds
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._idle = 0  # workers waiting on _jobs, not yet claimed
        self._stopping = False

    def submit(self, job: Job) -> None:
        """Run ``job`` in an idle worker or a new thread; RuntimeError if none can start."""
        with self._lock:
            idle = self._idle > 0
            if idle:
                self._idle -= 1  # claimed: that worker takes the next job
        if idle:
            self._jobs.put(job)
            return
        thread = threading.Thread(target=self._worker, args=(job,), daemon=True)
        with self._lock:  # listed before it starts, so that stop() waits for it
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        try:
            thread.start()
        except RuntimeError:
            with self._lock:
                self._threads.remove(thread)
            raise

    def stop(self, timeout: float) -> None:
        """Let idle workers go and wait up to ``timeout`` for the busy ones."""
        with self._lock:
            self._stopping = True
            threads = list(self._threads)
            for _ in range(self._idle):
                self._jobs.put(None)
            self._idle = 0
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _worker(self, job: Job | None) -> None:
        while job is not None:
            self._work(job)
            with self._lock:
                if self._stopping or self._idle >= self._max_idle:
                    return
                self._idle += 1
            try:
                job = self._jobs.get(timeout=self._idle_seconds)
            except queue.Empty:
                with self._lock:
                    if self._idle > 0:  # not claimed: leave
                        self._idle -= 1
                        return
                job = self._jobs.get()  # claimed while we timed out: the job is coming
