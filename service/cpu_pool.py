"""Where requests are tokenized and logits turned into answers, off the event loop: threads or worker
processes, behind one small interface the handlers call.

Threads (the default on CPU) share the served models' tokenizers. Windows assembly, the tokenizer's
fast path and post-processing are Python and numpy calls on small arrays that hold the GIL: a second
thread adds little (docs/performance.md, the CPU side). Worker processes (service/cpu_worker.py) each
hold a copy of every served model's tokenizer (and their own caches) and scale with cores; the default
with a model on CUDA, where the CPU side is what can limit the GPU.

What crosses a pipe is kept small, since the server pays for it: a QA request's windows stay in the
worker that made them; the server gets back only what inference reads (token ids and type ids, as one
int32 buffer) and sends back the logits (one float32 buffer each for starts and ends); the same worker
then answers and forgets the windows. A request that ends without answers (refused, timed out, client
gone) tells the worker to forget them; a bound on windows held covers anything missed.

Each worker is one process with one pipe. The server writes jobs to it (directly, or through a
sender thread when the pipe may be full: see _Worker) and the event loop reads the replies as the pipe
becomes readable (concurrent.futures' process pool passed each job through two threads of its own and
cost the server about twice the CPU per window). A worker runs its jobs in order, so installing a
model's tokenizer reaches it before any later request. A request goes to the worker with the fewest
jobs outstanding (among equals, the next in turn). A worker that dies (killed, out of memory) is
started again with every installed tokenizer as soon as its pipe closes; the requests it held fail
with a 503.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import multiprocessing
import pickle
import queue
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field
from multiprocessing.reduction import ForkingPickler

import numpy as np

from packer.runtime.tasks import qa
from packer.runtime.tokenizer import TextTokenizer, TokenizerSpec
from service import cpu_worker
from service.cpu_worker import PackedInputs, TokenizerRetired, WindowsDropped, classify_inputs
from service.errors import CpuWorkerLost, ModelUnavailable

log = logging.getLogger("prune_serve.cpu")


@dataclass
class PreparedQA:
    """A request's windows, ready for inference; `answers` needs it back."""

    inputs: list[list]  # per item, per window: input_ids, attention_mask, token_type_ids
    windows: list[list[qa.Window]] | None = None  # threads: the windows themselves
    token: int = 0  # processes: the worker's handle on the windows it holds
    worker: int = -1


class ThreadCpuPool:
    kind = "threads"

    def __init__(self, workers: int):
        self.workers = workers
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tokenize")

    def install(self, key: str, tokenizer: TextTokenizer) -> None:
        pass  # threads use the served model's own tokenizer

    def retire(self, key: str) -> None:
        pass

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def prepare_qa(
        self, key: str, tokenizer: TextTokenizer, pairs, options: qa.QAOptions
    ) -> PreparedQA:
        windows = await self._run(qa.make_windows_batch, tokenizer, pairs, options)
        return PreparedQA(inputs=windows, windows=windows)

    async def answer_qa(self, prepared: PreparedQA, contexts: list[str], logits, options: qa.QAOptions):
        return await self._run(qa.answer_batch, contexts, prepared.windows, logits, options)

    def forget(self, prepared: PreparedQA) -> None:
        pass

    def settle(self) -> None:
        pass

    async def classify_inputs(self, key: str, tokenizer: TextTokenizer, items, max_seq_len: int):
        return await self._run(classify_inputs, tokenizer, items, max_seq_len)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False)


class _Lost(Exception):
    """The worker died before replying."""


# Bytes a worker may have written to it directly and not yet read: well inside a socket pair's send
# buffer (~200 KB on Linux), so a direct write never blocks the event loop.
DIRECT_BYTES = 64 * 1024


@dataclass(eq=False)
class _Worker:
    """One worker process and the server's end of its pipe.

    A job is written to the pipe at once, from the thread that posts it, when nothing is queued ahead of
    it and the bytes written but not yet read stay under DIRECT_BYTES (a reply to a job means the worker
    has read everything written before it: it reads in order). Otherwise it waits in the outbox for the
    sender thread, in order: the event loop never waits on a pipe a busy or just-started worker has not
    read (a tokenizer to install is ~1 MB). Writing directly saves the server a thread switch per job.
    """

    process: multiprocessing.Process
    conn: object  # multiprocessing.connection.Connection, the server's end
    pending: dict[int, asyncio.Future] = field(default_factory=dict)  # job -> its reply
    loop: asyncio.AbstractEventLoop | None = None  # the loop reading the replies
    outbox: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    lock: threading.Lock = field(default_factory=threading.Lock)  # guards what follows, and direct writes
    queued: int = 0  # in the outbox or being written by the sender thread
    unread: int = 0  # bytes written directly, not known to be read
    direct: collections.deque = field(default_factory=collections.deque)  # (sequence, bytes) written
    sequence: int = 0  # of every post, in the order they reach the pipe
    sequence_of: dict[int, int] = field(default_factory=dict)  # job -> its sequence

    def post(self, message: tuple) -> None:
        payload = ForkingPickler.dumps(message)
        job = message[0]
        with self.lock:
            self.sequence += 1
            if job:
                self.sequence_of[job] = self.sequence
            if not self.queued and self.unread + len(payload) <= DIRECT_BYTES:
                with suppress(OSError, ValueError):  # closed: the reader sees it and replaces the worker
                    self.conn.send_bytes(payload)
                self.unread += len(payload)
                self.direct.append((self.sequence, len(payload)))
                return
            self.queued += 1
            self.outbox.put(payload)

    def read_up_to(self, job: int) -> None:
        """A reply came for `job`: the worker has read every message written up to it."""
        with self.lock:
            upto = self.sequence_of.pop(job, 0)
            while self.direct and self.direct[0][0] <= upto:
                self.unread -= self.direct.popleft()[1]

    def send_all(self) -> None:
        with suppress(OSError, ValueError):  # the pipe closed: the reader sees it and replaces the worker
            while (payload := self.outbox.get()) is not None:
                self.conn.send_bytes(payload)
                with self.lock:
                    self.queued -= 1


class ProcessCpuPool:
    kind = "processes"

    def __init__(self, workers: int, max_windows: int, on_restart: Callable[[], None] | None = None):
        self.workers = workers
        self.max_windows = max_windows  # windows each worker holds for requests in flight
        self.on_restart = on_restart
        # spawn: the server has threads (inference, uvicorn) and maybe CUDA, which a fork would copy
        self._context = multiprocessing.get_context("spawn")
        self._specs: dict[str, TokenizerSpec] = {}
        self._jobs = itertools.count(1)
        self._tokens = itertools.count(1)
        self._turn = 0
        self._closed = False
        self._workers = [self._start() for _ in range(workers)]
        for worker in self._workers:  # all start at once, now, not on the first request
            self._call(worker, "ping")

    def _start(self) -> _Worker:
        server_end, worker_end = self._context.Pipe()
        process = self._context.Process(
            target=cpu_worker.main, args=(worker_end, self.max_windows), name="prune-serve-cpu", daemon=True
        )
        process.start()
        worker_end.close()  # the worker's end lives in the worker: its death closes the pipe
        worker = _Worker(process, server_end)
        threading.Thread(target=worker.send_all, name="cpu-worker-send", daemon=True).start()
        for key, spec in self._specs.items():
            self._post(worker, "install", key, spec)
        return worker

    @property
    def pids(self) -> list[int]:
        return [w.process.pid for w in self._workers]

    # -- sending and receiving -----------------------------------------------------------------------

    @staticmethod
    def _post(worker: _Worker, name: str, *args, job: int = 0) -> None:
        worker.post((job, name, args))

    def _watch(self, worker: _Worker, loop: asyncio.AbstractEventLoop) -> None:
        """Read `worker`'s replies on `loop` (the pool outlives event loops in benchmarks and tests)."""
        if worker.loop is loop:
            return
        if worker.loop is not None and not worker.loop.is_closed():
            worker.loop.remove_reader(worker.conn.fileno())
        worker.loop = loop
        loop.add_reader(worker.conn.fileno(), self._on_readable, worker)

    def _on_readable(self, worker: _Worker) -> None:
        try:
            while worker.conn.poll():
                self._deliver(worker, *pickle.loads(worker.conn.recv_bytes()))
        except (EOFError, OSError):
            self._replace(worker)

    @staticmethod
    def _deliver(worker: _Worker, job: int, error: Exception | None, result) -> None:
        worker.read_up_to(job)
        future = worker.pending.pop(job, None)
        if future is not None and not future.done():
            future.set_result((error, result))

    def _call(self, worker: _Worker, name: str, *args):
        """Run a job and wait for it outside any event loop (start-up, settle): nothing else in flight."""
        job = next(self._jobs)
        self._post(worker, name, *args, job=job)
        while True:
            reply_job, error, result = pickle.loads(worker.conn.recv_bytes())
            if reply_job == job:
                worker.read_up_to(job)
                if error is not None:
                    raise error
                return result
            self._deliver(worker, reply_job, error, result)

    def _replace(self, worker: _Worker) -> None:
        """A worker's pipe closed: fail what it held, and start another in its place."""
        if worker.loop is not None and not worker.loop.is_closed():
            worker.loop.remove_reader(worker.conn.fileno())
        worker.outbox.put(None)
        worker.conn.close()
        worker.process.join(timeout=0.05)  # reap it
        if worker.process.is_alive():  # its pipe closed, yet it runs: it cannot be reached any more
            worker.process.kill()
        for future in worker.pending.values():
            if not future.done():
                future.set_exception(_Lost())
        worker.pending.clear()
        if self._closed or worker not in self._workers:
            return
        log.warning(
            "tokenization worker %d died (exit %s); starting another",
            worker.process.pid,
            worker.process.exitcode,
        )
        self._workers[self._workers.index(worker)] = self._start()
        if self.on_restart is not None:
            self.on_restart()

    async def _submit(self, i: int, name: str, *args):
        loop = asyncio.get_running_loop()
        for each in self._workers:  # every worker, so that one dying idle is replaced at once
            self._watch(each, loop)
        worker = self._workers[i]
        job = next(self._jobs)
        future = worker.pending[job] = loop.create_future()
        self._post(worker, name, *args, job=job)
        try:
            error, result = await future
        except _Lost:
            raise CpuWorkerLost(
                "a tokenization worker process died and is being restarted; retry the request",
                {"Retry-After": "1"},
            ) from None
        finally:
            worker.pending.pop(job, None)
        if isinstance(error, TokenizerRetired):
            raise ModelUnavailable("the model was replaced while the request was prepared; retry it")
        if isinstance(error, WindowsDropped):
            raise CpuWorkerLost(
                "the tokenization worker no longer holds this request's windows (it was restarted, or more "
                "requests were in flight than it holds); retry the request",
                {"Retry-After": "1"},
            )
        if error is not None:
            raise error
        return result

    # -- the interface -------------------------------------------------------------------------------

    def install(self, key: str, tokenizer: TextTokenizer) -> None:
        spec = tokenizer.spec()
        self._specs[key] = spec
        for worker in self._workers:  # not awaited: the worker runs it before any later job
            self._post(worker, "install", key, spec)

    def retire(self, key: str) -> None:
        self._specs.pop(key, None)
        for worker in self._workers:  # a dead worker is started again without it
            self._post(worker, "retire", key)

    async def prepare_qa(
        self, key: str, tokenizer: TextTokenizer, pairs, options: qa.QAOptions
    ) -> PreparedQA:
        token, worker = next(self._tokens), self._next_worker()
        packed: PackedInputs = await self._submit(worker, "prepare", key, token, pairs, options)
        return PreparedQA(inputs=packed.unpack(), token=token, worker=worker)

    async def answer_qa(self, prepared: PreparedQA, contexts: list[str], logits, options: qa.QAOptions):
        inputs = [w for ws in prepared.inputs for w in ws]
        flat = [pair for ls in logits for pair in ls]
        starts = np.concatenate([s[: w.length] for w, (s, _) in zip(inputs, flat, strict=True)])
        ends = np.concatenate([e[: w.length] for w, (_, e) in zip(inputs, flat, strict=True)])
        return await self._submit(prepared.worker, "answer", prepared.token, starts, ends, options)

    def forget(self, prepared: PreparedQA) -> None:
        self._post(self._workers[prepared.worker], "forget", prepared.token)

    def settle(self) -> None:
        """Return once every worker has run what was submitted before (installs: a benchmark's timer
        should not count building tokenizers). Outside the event loop, with no request in flight."""
        for worker in self._workers:
            self._call(worker, "ping")

    async def classify_inputs(self, key: str, tokenizer: TextTokenizer, items, max_seq_len: int):
        return await self._submit(self._next_worker(), "classify", key, items, max_seq_len)

    def _next_worker(self) -> int:
        """The fewest jobs outstanding; among equals, the next in turn (sequential requests take turns)."""
        turn = [(self._turn + j) % self.workers for j in range(self.workers)]
        i = min(turn, key=lambda j: len(self._workers[j].pending))
        self._turn = (i + 1) % self.workers
        return i

    def shutdown(self) -> None:
        """Close the pipes (each worker ends its loop on end of file) and wait briefly for the workers."""
        self._closed = True
        for worker in self._workers:
            if worker.loop is not None and not worker.loop.is_closed():
                with suppress(Exception):
                    worker.loop.remove_reader(worker.conn.fileno())
            worker.outbox.put(None)
        for worker in self._workers:
            worker.conn.close()
            worker.process.join(timeout=5)
            if worker.process.is_alive():
                worker.process.kill()


def make_pool(
    kind: str, workers: int, max_windows: int, on_restart: Callable[[], None] | None = None
) -> ThreadCpuPool | ProcessCpuPool:
    if kind == "processes":
        return ProcessCpuPool(workers, max_windows, on_restart)
    return ThreadCpuPool(workers)
