"""edge-serve's classification workers: one `Classifier` per thread, and a hard bound on admitted work.

A :class:`~edge.classifier.Classifier` holds one interpreter and is not thread-safe, so each worker thread
owns one, built before the server accepts a connection (a model that cannot load stops the start, not the
first request). The web handlers run on one event loop; the CPU work (decode, invoke, overlay) runs here.

Admission bounds memory whatever the clients do: a request takes a slot *before* its body is read, and
keeps it until its classification is done, so at most ``workers + queue`` uploads are ever held in memory
at once. A request that finds every slot taken is told to come back later (HTTP 503) instead of queuing
without bound.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")
#: A job gets the worker's own classifier; whatever it returns is the future's result.
Job = Callable[[Any], T]


class Busy(Exception):
    """Every slot is taken: the caller should answer 503 with a Retry-After."""


class WorkerPool:
    """Worker threads, each with its own classifier, behind ``len(classifiers) + queue`` admission slots."""

    def __init__(self, classifiers: Sequence[Any], queue_size: int):
        if not classifiers:
            raise ValueError("a worker pool needs at least one classifier")
        self.workers = len(classifiers)
        self.capacity = self.workers + queue_size
        self._admitted = 0
        self._running = 0
        self._lock = threading.Lock()
        # Admission already bounds what is submitted; the queue's own bound is a second line of defence.
        self._jobs: queue.Queue[tuple[Job, Future] | None] = queue.Queue(maxsize=self.capacity)
        self._threads = [threading.Thread(target=self._work, args=(c,), name=f"edge-serve-worker-{i}", daemon=True)
                         for i, c in enumerate(classifiers)]
        for thread in self._threads:
            thread.start()

    def admit(self) -> Slot:
        """Take a slot for one request, or raise :class:`Busy` when all are taken."""
        with self._lock:
            if self._admitted >= self.capacity:
                raise Busy(f"all {self.capacity} slots are taken ({self.workers} classifying, "
                           f"{self.capacity - self.workers} waiting)")
            self._admitted += 1
        return Slot(self)

    def stats(self) -> dict[str, int]:
        """Workers, slots and how many are in use now: what /healthz reports."""
        with self._lock:
            return {"workers": self.workers, "capacity": self.capacity, "admitted": self._admitted,
                    "classifying": self._running}

    def close(self) -> None:
        """Let the workers finish what they hold, then stop them."""
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join()

    def _leave(self) -> None:
        with self._lock:
            self._admitted -= 1

    def _submit(self, job: Job) -> Future:
        future: Future = Future()
        self._jobs.put_nowait((job, future))
        return future

    def _work(self, classifier: Any) -> None:
        while (item := self._jobs.get()) is not None:
            job, future = item
            if not future.set_running_or_notify_cancel():
                continue
            with self._lock:
                self._running += 1
            try:
                future.set_result(job(classifier))
            except BaseException as exc:  # handed to the request that submitted it, which answers for it
                future.set_exception(exc)
            finally:
                with self._lock:
                    self._running -= 1


class Slot:
    """One admitted request. :meth:`submit` hands the slot to the job, which frees it when done; a request
    that ends before submitting (a bad upload, a client gone) frees it with :meth:`release`."""

    def __init__(self, pool: WorkerPool):
        self._pool = pool
        self._held = True

    def submit(self, job: Job) -> Future:
        """Run ``job(classifier)`` on a worker; the slot is freed when the job ends, however it ends."""
        if not self._held:
            raise RuntimeError("this slot was already released or used")
        future = self._pool._submit(job)
        self._held = False
        future.add_done_callback(lambda _: self._pool._leave())
        return future

    def release(self) -> None:
        """Free the slot if no job holds it (idempotent)."""
        if self._held:
            self._held = False
            self._pool._leave()
