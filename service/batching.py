"""The batching engine: bounded per-model queues of windows, batches under a token budget, one worker.

Windows, not requests, are queued, so one long context cannot hold short questions back. A batch
always takes the oldest window (no starvation) and then the windows closest to it in length
(less padding), up to max_batch_size windows and max_batch_tokens padded tokens. The worker waits
max_wait_ms for more only when the queue is light. One worker thread runs every model, so
compute pools never compete for the cores.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from packer.tasks.padding import pad
from service.errors import DeadlineExceeded, InferenceFailed, QueueFull
from service.metrics import Metrics

log = logging.getLogger(__name__)

# Outputs with one value per token are cut back to each window's length.
TOKEN_OUTPUTS = ("start_logits", "end_logits")
SCAN_FACTOR = 4  # how far into the queue length grouping looks, in batches


@dataclass
class WorkItem:
    input_ids: np.ndarray
    attention_mask: np.ndarray
    token_type_ids: np.ndarray | None
    deadline: float
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)

    @property
    def length(self) -> int:
        return len(self.input_ids)


@dataclass
class BatchLimits:
    max_batch_size: int = 32
    max_batch_tokens: int = 8192
    max_wait_ms: float = 2.0
    queue_size: int = 2048
    length_grouping: bool = True


def release_free_memory() -> None:
    """Hand freed heap back to the OS when the queue goes idle (glibc keeps it otherwise, so RSS stays
    at its high-water mark after a burst)."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None
Runner = Callable[[np.ndarray, np.ndarray, np.ndarray | None], dict[str, np.ndarray]]


def select(queue: deque[WorkItem], limits: BatchLimits) -> list[WorkItem]:
    """The oldest window, then those nearest to it in length, within the batch limits."""
    oldest = queue[0]
    candidates = [queue[i] for i in range(min(len(queue), limits.max_batch_size * SCAN_FACTOR))]
    if limits.length_grouping:
        rest = sorted(candidates[1:], key=lambda it: abs(it.length - oldest.length))
        candidates = [oldest, *rest]
    batch: list[WorkItem] = []
    longest = 0
    for it in candidates:
        new_longest = max(longest, it.length)
        if batch and (
            len(batch) >= limits.max_batch_size or new_longest * (len(batch) + 1) > limits.max_batch_tokens
        ):
            if limits.length_grouping:
                continue
            break
        batch.append(it)
        longest = new_longest
    return batch


class _ModelQueue:
    def __init__(self, name: str, runner: Runner, pad_id: int, limits: BatchLimits):
        self.name = name
        self.runner = runner
        self.pad_id = pad_id
        self.limits = limits
        self.items: deque[WorkItem] = deque()
        self.tokens = 0  # sum of the queued windows' lengths, kept up to date instead of re-summed


class Batcher:
    def __init__(self, metrics: Metrics):
        self.metrics = metrics
        self._queues: dict[str, _ModelQueue] = {}
        self._cond = threading.Condition()
        self._stopping = False
        self._ran_since_trim = False
        self._thread = threading.Thread(target=self._loop, name="inference-worker", daemon=True)

    def register(self, name: str, runner: Runner, pad_id: int, limits: BatchLimits) -> None:
        """Add a model, or swap in a reloaded one: windows already queued stay and run on the new runner."""
        with self._cond:
            queue = self._queues.get(name)
            if queue is None:
                self._queues[name] = _ModelQueue(name, runner, pad_id, limits)
            else:
                queue.runner, queue.pad_id, queue.limits = runner, pad_id, limits

    def start(self) -> None:
        self._thread.start()

    def depth(self, name: str) -> int:
        with self._cond:
            return len(self._queues[name].items)

    def submit(self, name: str, items: list[WorkItem]) -> None:
        """Queue all of a request's windows, or none of them (429) when they do not fit."""
        with self._cond:
            queue = self._queues[name]
            if self._stopping:
                raise QueueFull("the server is shutting down", {"Retry-After": "1"})
            if len(queue.items) + len(items) > queue.limits.queue_size:
                raise QueueFull(
                    f"model {name} has {len(queue.items)} windows queued (limit {queue.limits.queue_size}); "
                    "retry later",
                    {"Retry-After": "1"},
                )
            queue.items.extend(items)
            queue.tokens += sum(it.length for it in items)
            self.metrics.queue_depth.labels(name).set(len(queue.items))
            self._cond.notify()

    def stop(self, timeout: float | None = None) -> None:
        """Finish what is queued, then stop the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- worker --------------------------------------------------------------------------------

    def _next_batch(self) -> tuple[_ModelQueue, list[WorkItem]] | None:
        with self._cond:
            while True:
                waiting = [q for q in self._queues.values() if q.items]
                if not waiting:
                    if self._stopping:
                        return None
                    if self._ran_since_trim:
                        self._ran_since_trim = False
                        release_free_memory()
                    self._cond.wait()
                    continue
                queue = min(waiting, key=lambda q: q.items[0].enqueued)
                limits = queue.limits
                waited_ms = (time.monotonic() - queue.items[0].enqueued) * 1000
                light = len(queue.items) < limits.max_batch_size and queue.tokens < limits.max_batch_tokens
                if light and waited_ms < limits.max_wait_ms and not self._stopping:
                    self._cond.wait((limits.max_wait_ms - waited_ms) / 1000)
                    continue
                batch = select(queue.items, limits)
                chosen = {id(it) for it in batch}
                queue.items = deque(it for it in queue.items if id(it) not in chosen)
                queue.tokens -= sum(it.length for it in batch)
                self.metrics.queue_depth.labels(queue.name).set(len(queue.items))
                self._ran_since_trim = True
                return queue, batch

    def _loop(self) -> None:
        while (picked := self._next_batch()) is not None:
            queue, batch = picked
            try:
                self._run(queue, batch)
            except Exception:  # never let the worker die: a broken batch fails only its own requests
                log.exception("batch of model %s failed", queue.name)

    def _run(self, queue: _ModelQueue, batch: list[WorkItem]) -> None:
        now = time.monotonic()
        live = []
        for it in batch:
            if not it.future.set_running_or_notify_cancel():
                continue  # the client went away
            if now > it.deadline:
                # Counted once per request by the HTTP layer's error handler, not here per window.
                it.future.set_exception(DeadlineExceeded("the request's deadline passed while it was queued"))
                continue
            live.append(it)
            self.metrics.queue_wait.labels(queue.name).observe(now - it.enqueued)
        if not live:
            return
        ids, mask, types, _ = pad(live, queue.pad_id)
        real = int(mask.sum())
        labels = queue.name
        self.metrics.batch_size.labels(labels).observe(len(live))
        self.metrics.batch_tokens.labels(labels).observe(ids.size)
        self.metrics.padding_ratio.labels(labels).observe(1 - real / ids.size)
        start = time.perf_counter()
        try:
            outputs = queue.runner(ids, mask, types)
        except Exception as exc:
            log.exception("inference failed for a batch of %d windows of model %s", len(live), queue.name)
            error = InferenceFailed(f"inference failed for this batch: {type(exc).__name__}: {exc}")
            for it in live:
                it.future.set_exception(error)
            return
        self.metrics.inference.labels(labels).observe(time.perf_counter() - start)
        for row, it in enumerate(live):
            it.future.set_result(
                {
                    name: (v[row, : it.length] if name in TOKEN_OUTPUTS else v[row])
                    for name, v in outputs.items()
                }
            )
