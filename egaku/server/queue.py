"""One worker thread per loaded model, fed by a bounded FIFO queue.

Why a single worker per pipeline: LoRAs are loaded into the shared pipeline for the duration of a call
and torch already uses every core for one generation, so running two generations on one pipeline at once
is both unsafe and no faster. Requests beyond ``max_waiting`` are refused at once (HTTP 429) instead of
piling up. A cancelled job leaves the queue immediately; a running one stops at its next denoising step.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

log = logging.getLogger("egaku.server")


class QueueFull(Exception):
    """The model's queue holds ``max_waiting`` jobs already."""


class JobCancelled(Exception):
    """Raised inside a running job (from its progress callback) once its client went away."""


class Job:
    """A unit of work: ``run(on_step)`` is called on the worker thread; ``on_step(done, total)`` reports
    progress and raises ``JobCancelled`` once the job is cancelled."""

    _ids = itertools.count()

    def __init__(self, run: Callable[[Callable[[int, int], None]], Any], job_id: str | None = None):
        self.run = run
        self.id = job_id or f"job-{next(self._ids)}"
        self.state = "queued"  # queued -> running -> done | failed | cancelled
        self.step = 0
        self.total = 0
        self.result: Any = None
        self.error: BaseException | None = None
        self.cancelled = threading.Event()
        self.finished = threading.Event()
        self._callbacks: list[Callable[[], None]] = []
        self._lock = threading.Lock()

    def on_step(self, done: int, total: int) -> None:
        self.step, self.total = done, total
        if self.cancelled.is_set():
            raise JobCancelled(self.id)

    def add_done_callback(self, fn: Callable[[], None]) -> None:
        with self._lock:
            if not self.finished.is_set():
                self._callbacks.append(fn)
                return
        fn()

    def _finish(self, state: str) -> None:
        with self._lock:
            self.state = state
            self.finished.set()
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            fn()


class ModelWorker:
    """Runs the jobs of one model, in order, on one daemon thread."""

    def __init__(self, name: str, max_waiting: int):
        if max_waiting < 1:
            raise ValueError(f"max_waiting must be at least 1, got {max_waiting}")
        self.name = name
        self.max_waiting = max_waiting
        self.running: Job | None = None
        self.completed = 0
        self._waiting: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name=f"egaku-worker-{name}", daemon=True)
        self._thread.start()

    def submit(self, run: Callable[[Callable[[int, int], None]], Any], job_id: str | None = None) -> Job:
        job = Job(run, job_id)
        with self._cond:
            if self._stop:
                raise RuntimeError("the worker is shut down")
            if len(self._waiting) >= self.max_waiting:
                raise QueueFull(self.name)
            self._waiting.append(job)
            self._cond.notify()
        return job

    def cancel(self, job: Job) -> None:
        """Take a waiting job out of the queue now; ask a running one to stop at its next step."""
        job.cancelled.set()
        with self._cond:
            try:
                self._waiting.remove(job)
            except ValueError:
                return  # running (stops at its next step) or already finished
        job._finish("cancelled")

    def position(self, job: Job) -> int:
        """0 while running, 1.. while waiting, -1 when no longer queued."""
        with self._cond:
            if self.running is job:
                return 0
            try:
                return self._waiting.index(job) + 1
            except ValueError:
                return -1

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {"waiting": len(self._waiting), "running": int(self.running is not None),
                    "max_waiting": self.max_waiting, "completed": self.completed}

    def close(self, timeout: float | None = 10.0) -> None:
        with self._cond:
            self._stop = True
            pending = list(self._waiting)
            self._waiting.clear()
            if self.running is not None:
                self.running.cancelled.set()
            self._cond.notify_all()
        for job in pending:
            job.cancelled.set()
            job._finish("cancelled")
        self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                job = self._waiting.popleft()
                self.running = job
                job.state = "running"
            state = "done"
            try:
                job.result = job.run(job.on_step)
            except JobCancelled:
                state = "cancelled"
            except BaseException as exc:  # noqa: BLE001 - handed to the request that owns the job
                job.error = exc
                state = "failed"
            with self._cond:
                self.running = None
                self.completed += 1
            job._finish(state)
