"""The batching engine: per-model queues of windows, fair across requests and models, one worker.

Scheduling (what the README promises):
- Across models, the worker serves the model that has used the least inference time so far (a model
  that was idle starts level with the busiest waiting one, not with a credit), so one model's backlog
  cannot starve another.
- Within a model, each request is a flow, and flows take turns (deficit round robin in tokens): a
  batch is led by the oldest window of the flow whose turn it is, and a new request joins the back of
  the ring, so it waits one turn of each waiting request (one batch behind a single big request), not
  for every window of the big request; no request is starved however many others arrive.
- The rest of the batch is filled, within max_batch_size windows and max_batch_tokens padded tokens,
  from the flows' next windows nearest in length to the leader (length grouping) or in served order.
- A batch that fails is re-run flow by flow so that only the request that broke it fails.
One worker thread runs every model, so compute pools never compete for the cores.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from packer.runtime.tasks.padding import BATCH_TOKENS, MAX_BATCH_SIZE, pad
from service.errors import DeadlineExceeded, InferenceFailed, ModelUnavailable, QueueFull
from service.metrics import Metrics

log = logging.getLogger(__name__)

# Outputs with one value per token are cut back to each window's length.
TOKEN_OUTPUTS = ("start_logits", "end_logits")
SCAN_FACTOR = 4  # how many next windows length grouping looks at, in batches

_flow_ids = itertools.count(1)


def new_flow() -> int:
    """A key for one request's windows (fairness is per flow)."""
    return next(_flow_ids)


@dataclass
class WorkItem:
    input_ids: np.ndarray
    attention_mask: np.ndarray
    token_type_ids: np.ndarray | None
    deadline: float
    flow: int = 0
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)

    @property
    def length(self) -> int:
        return len(self.input_ids)


@dataclass
class BatchLimits:
    max_batch_size: int = MAX_BATCH_SIZE
    max_batch_tokens: int = BATCH_TOKENS["cpu"]
    max_wait_ms: float = 2.0
    queue_size: int = 2048
    length_grouping: bool = True
    pad_to_multiple: int = 1  # 8 on CUDA


@dataclass
class _Flow:
    key: int
    deficit: int = 0  # tokens this flow may still lead with (deficit round robin)
    items: deque[WorkItem] = field(default_factory=deque)


class FairQueue:
    """The windows of one model, as flows (one per request) taking turns by deficit round robin.

    No threads, so tests and benchmarks replay it. A turn adds `quantum` tokens to a flow's deficit; a
    flow leads a batch when its deficit covers its oldest window, then goes to the back of the ring.
    Windows taken to fill another flow's batch are charged to their own flow's deficit, so sharing
    stays even in tokens whichever flow led.
    """

    def __init__(self, limits: BatchLimits):
        self.limits = limits
        self._flows: dict[int, _Flow] = {}
        self._ring: deque[_Flow] = deque()  # turn order; a new flow joins at the back
        self.windows = 0
        self.tokens = 0

    def __len__(self) -> int:
        return self.windows

    @property
    def quantum(self) -> int:
        return max(self.limits.max_batch_tokens, 1)

    def add(self, items: list[WorkItem], flow: int | None = None) -> None:
        for it in items:
            key = it.flow if flow is None else flow
            f = self._flows.get(key)
            if f is None:
                f = self._flows[key] = _Flow(key)
                self._ring.append(f)
            f.items.append(it)
            self.windows += 1
            self.tokens += it.length

    def oldest(self) -> float:
        return min(f.items[0].enqueued for f in self._ring)

    def _leader(self) -> _Flow:
        while True:
            f = self._ring[0]
            if f.deficit >= f.items[0].length:
                return f
            # Not enough credit: this turn adds a quantum (enough for any window within the budget).
            f.deficit += max(self.quantum, f.items[0].length)
            if f.deficit >= f.items[0].length:
                return f
            self._ring.rotate(-1)

    def take(self) -> list[WorkItem]:
        """The next batch: the leader's oldest window, then others that fit (see module doc)."""
        limits = self.limits
        lead_flow = self._leader()
        lead = lead_flow.items[0]
        # Candidates in turn order: round r holds each flow's r-th window, the leader's flow first.
        # The leader is its flow's oldest window; the rest may be any window in reach (length grouping).
        room = limits.max_batch_size * SCAN_FACTOR
        order = list(self._ring)
        candidates: list[tuple[_Flow, WorkItem]] = []
        for r in range(min(room, max(len(f.items) for f in order))):
            candidates.extend(
                (f, f.items[r]) for f in order if r < len(f.items) and (r or f is not lead_flow)
            )
            if len(candidates) >= room:
                break
        if limits.length_grouping:
            candidates.sort(key=lambda c: abs(c[1].length - lead.length))  # stable: turn order on ties
        batch, longest = [lead], lead.length
        chosen: dict[int, set[int]] = {lead_flow.key: {id(lead)}}
        for f, it in candidates:
            if len(batch) >= limits.max_batch_size:
                break
            new_longest = max(longest, it.length)
            if new_longest * (len(batch) + 1) > limits.max_batch_tokens:
                if limits.length_grouping:
                    continue
                break
            batch.append(it)
            chosen.setdefault(f.key, set()).add(id(it))
            longest = new_longest
        for key, ids in chosen.items():
            f = self._flows[key]
            size, left = 0, len(ids)
            while left and f.items and id(f.items[0]) in ids:  # usually the taken windows are the oldest
                size += f.items.popleft().length
                left -= 1
            if left:  # length grouping took some from further back: rebuild this flow once
                size += sum(it.length for it in f.items if id(it) in ids)
                f.items = deque(it for it in f.items if id(it) not in ids)
            f.deficit -= size
            self.tokens -= size
            if not f.items:
                del self._flows[key]
                self._ring.remove(f)
        self.windows -= len(batch)
        if self._ring and self._ring[0] is lead_flow:
            self._ring.rotate(-1)  # its turn is used: the next flow leads the next batch
        return batch


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


class _ModelQueue:
    def __init__(self, name: str, runner: Runner, pad_id: int, limits: BatchLimits):
        self.name = name  # the model's name: metric label
        self.retiring = False  # replaced by a reload: drains what it holds, then goes
        self.runner = runner
        self.pad_id = pad_id
        self.queue = FairQueue(limits)
        self.used = 0.0  # inference seconds charged to this model (the fairness clock across models)

    @property
    def limits(self) -> BatchLimits:
        return self.queue.limits


class Batcher:
    def __init__(self, metrics: Metrics):
        self.metrics = metrics
        self._queues: dict[str, _ModelQueue] = {}
        self._cond = threading.Condition()
        self._stopping = False
        self._ran_since_trim = False
        self._thread = threading.Thread(target=self._loop, name="inference-worker", daemon=True)

    def register(
        self, key: str, runner: Runner, pad_id: int, limits: BatchLimits, label: str | None = None
    ) -> None:
        """Add a loaded model under its own key (a reload registers the new model beside the old one)."""
        with self._cond:
            self._queues[key] = _ModelQueue(label or key, runner, pad_id, limits)

    def retire(self, key: str) -> None:
        """The model was replaced or removed: its queued windows still run on it, then it goes."""
        with self._cond:
            model = self._queues.get(key)
            if model is not None:
                model.retiring = True
                if not len(model.queue):
                    del self._queues[key]

    def start(self) -> None:
        self._thread.start()

    def _depth(self, name: str) -> int:
        return sum(len(m.queue) for m in self._queues.values() if m.name == name)

    def depth(self, name: str) -> int:
        """Windows queued for the model `name` (over its current and retiring loads)."""
        with self._cond:
            return self._depth(name)

    def submit(self, key: str, items: list[WorkItem]) -> None:
        """Queue all of a request's windows (one flow), or none of them (429) when they do not fit."""
        with self._cond:
            model = self._queues.get(key)
            if model is None:  # a retired model that has drained: the request raced a reload
                raise ModelUnavailable(
                    "the model was replaced while this request was prepared; retry", {"Retry-After": "1"}
                )
            name = model.name
            if self._stopping:
                raise QueueFull("the server is shutting down", {"Retry-After": "1"})
            queued = len(model.queue)
            if queued + len(items) > model.limits.queue_size:
                raise QueueFull(
                    f"model {name} has {queued} windows queued "
                    f"(limit {model.limits.queue_size}); retry later",
                    {"Retry-After": "1"},
                )
            if not queued:
                # An idle model starts level with the busiest-served waiting one: no credit for idling.
                busy = [m.used for m in self._queues.values() if len(m.queue) and m is not model]
                model.used = max(model.used, min(busy, default=model.used))
            model.queue.add(items)
            self.metrics.queue_depth.labels(name).set(self._depth(name))
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
                waiting = [m for m in self._queues.values() if len(m.queue)]
                if not waiting:
                    if self._stopping:
                        return None
                    if self._ran_since_trim:
                        self._ran_since_trim = False
                        release_free_memory()
                    self._cond.wait()
                    continue
                model = min(waiting, key=lambda m: (m.used, m.queue.oldest()))
                limits, queue = model.limits, model.queue
                waited_ms = (time.monotonic() - queue.oldest()) * 1000
                light = len(queue) < limits.max_batch_size and queue.tokens < limits.max_batch_tokens
                if light and waited_ms < limits.max_wait_ms and not self._stopping:
                    self._cond.wait((limits.max_wait_ms - waited_ms) / 1000)
                    continue
                batch = queue.take()
                if model.retiring and not len(queue):
                    self._queues = {k: m for k, m in self._queues.items() if m is not model}
                self.metrics.queue_depth.labels(model.name).set(self._depth(model.name))
                self._ran_since_trim = True
                return model, batch

    def _loop(self) -> None:
        while (picked := self._next_batch()) is not None:
            model, batch = picked
            start = time.perf_counter()
            try:
                self._run(model, batch)
            except Exception:  # never let the worker die: a broken batch fails only its own requests
                log.exception("batch of model %s failed", model.name)
            with self._cond:
                model.used += time.perf_counter() - start

    def _run(self, model: _ModelQueue, batch: list[WorkItem]) -> None:
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
            self.metrics.queue_wait.labels(model.name).observe(now - it.enqueued)
        if not live:
            return
        try:
            self._infer(model, live)
        except Exception:
            flows = {it.flow for it in live}
            if len(flows) == 1:
                self._fail(model, live)
                return
            # Re-run request by request so that only the request that breaks the batch fails.
            log.warning(
                "a batch of model %s failed; re-running its %d requests one by one", model.name, len(flows)
            )
            self.metrics.batch_reruns.labels(model.name).inc()
            for key in flows:
                part = [it for it in live if it.flow == key]
                try:
                    self._infer(model, part)
                except Exception:
                    self._fail(model, part)

    def _fail(self, model: _ModelQueue, items: list[WorkItem]) -> None:
        log.exception("inference failed for %d windows of model %s", len(items), model.name)
        error = InferenceFailed("inference failed on this request's windows; the server log has the cause")
        for it in items:
            it.future.set_exception(error)

    def _infer(self, model: _ModelQueue, live: list[WorkItem]) -> None:
        ids, mask, types, _ = pad(live, model.pad_id, model.limits.pad_to_multiple)
        real = int(mask.sum())
        labels = model.name
        start = time.perf_counter()
        outputs = model.runner(ids, mask, types)
        self.metrics.inference.labels(labels).observe(time.perf_counter() - start)
        self.metrics.batch_size.labels(labels).observe(len(live))
        self.metrics.batch_tokens.labels(labels).observe(ids.size)
        self.metrics.padding_ratio.labels(labels).observe(1 - real / ids.size)
        for row, it in enumerate(live):
            it.future.set_result(
                {
                    name: (v[row, : it.length] if name in TOKEN_OUTPUTS else v[row])
                    for name, v in outputs.items()
                }
            )
