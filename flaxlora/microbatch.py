"""Micro-batching: jobs submitted from many threads run together in one call on one worker thread.

    batcher = MicroBatcher(run, max_queue=64, max_rows=128, max_wait_s=0.005)
    future = batcher.submit(job, rows=3)      # any thread; raises QueueFull when max_queue jobs wait
    result = future.result()                  # run(...)'s answer for this job
    batcher.close()                           # no new jobs; the queued ones are run, then the worker ends

The worker owns the device: it takes the oldest job, then every job that arrives within
``max_wait_s`` of it while the rows stay within ``max_rows``, and calls ``run(jobs) -> results``
(one result per job, in order) once for all of them. Results travel in
:class:`concurrent.futures.Future`s; an exception of ``run`` is every one of its jobs' answer.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any


class QueueFull(Exception):
    """``max_queue`` jobs are waiting: the caller should come back later."""


class Closed(Exception):
    """The batcher no longer takes jobs (it is shutting down)."""


class MicroBatcher:
    """See the module doc. ``max_queue``: jobs waiting at most; ``max_rows``: rows per call at most
    (a larger job runs alone); ``max_wait_s``: how long the oldest job waits for company."""

    def __init__(self, run: Callable[[Sequence[Any]], Sequence[Any]], max_queue: int, max_rows: int,
                 max_wait_s: float):
        if max_queue < 1 or max_rows < 1 or max_wait_s < 0:
            raise ValueError(f"max_queue and max_rows must be >= 1 and max_wait_s >= 0, got {max_queue}, {max_rows}, "
                             f"{max_wait_s}")
        self._run, self.max_rows, self.max_wait_s = run, max_rows, max_wait_s
        self._queue: queue.Queue = queue.Queue(max_queue)
        self._lock = threading.Lock()  # submit's check-and-put against close
        self._closed = False
        self._held: tuple | None = None  # a job taken that did not fit the last call: first in the next
        self._worker = threading.Thread(target=self._work, name="microbatch-worker", daemon=True)
        self._worker.start()

    def submit(self, job: Any, rows: int = 1) -> Future:
        """Queues ``job`` (``rows`` of work); its Future holds ``run``'s result for it.

        Raises QueueFull when the queue is full, Closed after :meth:`close`."""
        future: Future = Future()
        with self._lock:
            if self._closed:
                raise Closed("shutting down")
            try:
                self._queue.put_nowait((job, rows, future, time.monotonic()))
            except queue.Full:
                raise QueueFull(f"{self._queue.maxsize} jobs are waiting") from None
        return future

    def close(self, timeout: float | None = None) -> None:
        """Takes no new jobs, runs the queued ones and waits (up to ``timeout`` s) for the worker."""
        with self._lock:
            self._closed = True
        self._worker.join(timeout)

    def _next(self, timeout: float) -> tuple | None:
        if self._held is not None:
            job, self._held = self._held, None
            return job
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def _work(self) -> None:
        while True:
            first = self._next(0.05)
            if first is None:
                with self._lock:
                    if self._closed and self._queue.empty():
                        return
                continue
            batch, rows = [first], first[1]
            deadline = first[3] + self.max_wait_s  # counted from its arrival: a job that waited waits no more
            while rows < self.max_rows:
                remaining = 0.0 if self._closed else deadline - time.monotonic()
                job = self._next(min(max(remaining, 0.0), 0.01))  # a close ends the wait within 10 ms
                if job is None:
                    if remaining <= 0.01:
                        break
                    continue
                if rows + job[1] > self.max_rows:
                    self._held = job
                    break
                batch.append(job)
                rows += job[1]
            self._call([(job, future) for job, _, future, _ in batch])

    def _call(self, batch: list[tuple[Any, Future]]) -> None:
        batch = [(job, future) for job, future in batch if future.set_running_or_notify_cancel()]
        if not batch:
            return
        try:
            results = self._run([job for job, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"run returned {len(results)} results for {len(batch)} jobs")
        except Exception as err:  # every job of the call gets the error; the worker goes on
            for _, future in batch:
                future.set_exception(err)
            return
        for (_, future), result in zip(batch, results):
            future.set_result(result)
