"""Where requests are tokenized and logits turned into answers, off the event loop: threads or worker
processes, behind one small interface the handlers call.

Threads (the default on CPU) share the served models' tokenizers. The tokenizers library releases the
GIL while it encodes, but windows assembly and post-processing are Python and numpy calls on small
arrays that hold it: a second thread adds little (docs/performance.md, the CPU side). Worker processes
each hold a copy of every served model's tokenizer (and their own context cache) and scale with cores;
the default with a model on CUDA, where the CPU side is what can limit the GPU.

What crosses the pipe is kept small, since the main process pays for it: a QA request's windows stay in
the worker that made them; the server gets back only what inference reads (token ids and type ids, as
one int32 buffer) and sends back the logits (one float32 buffer each for starts and ends); the same
worker then answers and forgets the windows. A request that ends without answers (refused, timed out,
client gone) tells the worker to forget them; a bound on windows held covers anything missed.

Each worker process is its own single-process executor, so installing a model's tokenizer reaches every
worker, and runs before any request submitted after it (one worker runs its jobs in order). A request
goes to the worker with the fewest jobs outstanding (among equals, the next in turn). A worker that
dies (killed, out of memory) fails only the requests it held, with a 503, and is started again with
every installed tokenizer.
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing
import os
from collections import OrderedDict
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import suppress
from dataclasses import dataclass

import numpy as np

from packer.runtime.tasks import classify, qa
from packer.runtime.tokenizer import TextTokenizer, TokenizerSpec
from service.errors import CpuWorkerLost, ModelUnavailable


@dataclass
class ModelInput:
    """What inference reads of a window (all of it that comes back from a worker process)."""

    input_ids: np.ndarray
    token_type_ids: np.ndarray | None

    @property
    def attention_mask(self) -> np.ndarray:
        return np.ones(len(self.input_ids), dtype=np.int64)

    @property
    def length(self) -> int:
        return len(self.input_ids)


@dataclass
class PackedInputs:
    """A request's windows' model inputs in a few buffers (pickling many small arrays costs more than
    the work it moves)."""

    ids: np.ndarray  # int32, every window's ids one after another
    types: np.ndarray | None  # int32 likewise, or None for models without token types
    lengths: np.ndarray  # int32 per window
    counts: list[int]  # windows per item

    @classmethod
    def of(cls, windows: list[list[qa.Window]]) -> PackedInputs:
        flat = [w for ws in windows for w in ws]
        types = None if flat[0].token_type_ids is None else np.concatenate([w.token_type_ids for w in flat])
        return cls(
            ids=np.concatenate([w.input_ids for w in flat]).astype(np.int32),
            types=None if types is None else types.astype(np.int32),
            lengths=np.fromiter((w.length for w in flat), np.int32, len(flat)),
            counts=[len(ws) for ws in windows],
        )

    def unpack(self) -> list[list[ModelInput]]:
        cut = np.cumsum(self.lengths)[:-1]
        ids = np.split(self.ids.astype(np.int64), cut)
        types = np.split(self.types.astype(np.int64), cut) if self.types is not None else [None] * len(ids)
        flat = iter([ModelInput(i, t) for i, t in zip(ids, types, strict=True)])
        return [list(itertools.islice(flat, n)) for n in self.counts]


@dataclass
class PreparedQA:
    """A request's windows, ready for inference; `answers` needs it back."""

    inputs: list[list]  # per item, per window: input_ids, attention_mask, token_type_ids
    windows: list[list[qa.Window]] | None = None  # threads: the windows themselves
    token: int = 0  # processes: the worker's handle on the windows it holds
    worker: int = -1


def classify_inputs(tokenizer: TextTokenizer, items: list[tuple[str, str | None]], max_seq_len: int):
    return [classify.encode(tokenizer, text, pair, max_seq_len) for text, pair in items]


# -- a worker process's state and entry points ---------------------------------------------------------

_TOKENIZERS: dict[str, TextTokenizer] = {}  # model key -> its tokenizer
_PENDING: OrderedDict[int, tuple[list[str], list[list[qa.Window]]]] = OrderedDict()  # token -> windows
_LIMIT = {"windows": 0, "held": 0}


class TokenizerRetired(LookupError):
    """The model was replaced (its tokenizer retired) before this request's job reached the worker."""


class WindowsDropped(LookupError):
    """The worker no longer holds this request's windows (it was restarted, or held too many)."""


def _configure(max_windows: int) -> None:
    _LIMIT["windows"] = max_windows
    # The workers are the parallelism (one per core given): the tokenizers library's own thread pool in
    # each would put several threads on every core.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _install(key: str, spec: TokenizerSpec) -> None:
    _TOKENIZERS[key] = TextTokenizer.from_spec(spec)


def _retire(key: str) -> None:
    _TOKENIZERS.pop(key, None)


def _tokenizer(key: str) -> TextTokenizer:
    tokenizer = _TOKENIZERS.get(key)
    if tokenizer is None:
        raise TokenizerRetired(key)
    return tokenizer


def _prepare(key: str, token: int, pairs: list[tuple[str, str]], options: qa.QAOptions) -> PackedInputs:
    windows = qa.make_windows_batch(_tokenizer(key), pairs, options)
    _PENDING[token] = ([context for _, context in pairs], windows)
    _LIMIT["held"] += sum(map(len, windows))
    while _LIMIT["held"] > _LIMIT["windows"] and len(_PENDING) > 1:
        _, (_, dropped) = _PENDING.popitem(last=False)
        _LIMIT["held"] -= sum(map(len, dropped))
    return PackedInputs.of(windows)


def _forget(token: int) -> list[list[qa.Window]] | None:
    found = _PENDING.pop(token, None)
    if found is None:
        return None
    _LIMIT["held"] -= sum(map(len, found[1]))
    return found


def _answer(token: int, starts: np.ndarray, ends: np.ndarray, options: qa.QAOptions) -> list[qa.QAResult]:
    found = _forget(token)
    if found is None:
        raise WindowsDropped(token)
    contexts, windows = found
    cut = np.cumsum([w.length for ws in windows for w in ws])[:-1]
    pairs = iter(zip(np.split(starts, cut), np.split(ends, cut), strict=True))
    logits = [list(itertools.islice(pairs, len(ws))) for ws in windows]
    return qa.answer_batch(contexts, windows, logits, options)


def _classify(key: str, items: list[tuple[str, str | None]], max_seq_len: int):
    return classify_inputs(_tokenizer(key), items, max_seq_len)


# -- the pools -----------------------------------------------------------------------------------------


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


class ProcessCpuPool:
    kind = "processes"

    def __init__(self, workers: int, max_windows: int):
        self.workers = workers
        self.max_windows = max_windows  # windows each worker holds for requests in flight
        # spawn: the server has threads (inference, uvicorn) and maybe CUDA, which a fork would copy
        self._context = multiprocessing.get_context("spawn")
        self._executors = [self._start() for _ in range(workers)]
        self._outstanding = [0] * workers
        self._turn = 0
        self._tokens = itertools.count(1)
        self._specs: dict[str, TokenizerSpec] = {}
        started = [executor.submit(_configure, max_windows) for executor in self._executors]
        for future in started:  # all start at once, now, not on the first request
            future.result()

    def _start(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=1, mp_context=self._context)

    def install(self, key: str, tokenizer: TextTokenizer) -> None:
        spec = tokenizer.spec()
        self._specs[key] = spec
        for executor in self._executors:  # not awaited: the worker runs it before any later job
            executor.submit(_install, key, spec)

    def retire(self, key: str) -> None:
        self._specs.pop(key, None)
        for executor in self._executors:
            with suppress(BrokenProcessPool, RuntimeError):  # a dead worker is started again without it
                executor.submit(_retire, key)

    async def prepare_qa(
        self, key: str, tokenizer: TextTokenizer, pairs, options: qa.QAOptions
    ) -> PreparedQA:
        token, worker = next(self._tokens), self._next_worker()
        packed = await self._submit(worker, _prepare, key, token, pairs, options)
        return PreparedQA(inputs=packed.unpack(), token=token, worker=worker)

    async def answer_qa(self, prepared: PreparedQA, contexts: list[str], logits, options: qa.QAOptions):
        inputs = [w for ws in prepared.inputs for w in ws]
        flat = [pair for ls in logits for pair in ls]
        starts = np.concatenate([s[: w.length] for w, (s, _) in zip(inputs, flat, strict=True)])
        ends = np.concatenate([e[: w.length] for w, (_, e) in zip(inputs, flat, strict=True)])
        return await self._submit(prepared.worker, _answer, prepared.token, starts, ends, options)

    def settle(self) -> None:
        """Return once every worker has run what was submitted before (installs: a benchmark's timer
        should not count building tokenizers)."""
        for executor in self._executors:
            executor.submit(_configure, self.max_windows).result()

    def forget(self, prepared: PreparedQA) -> None:
        with suppress(BrokenProcessPool, RuntimeError):
            self._executors[prepared.worker].submit(_forget, prepared.token)

    async def classify_inputs(self, key: str, tokenizer: TextTokenizer, items, max_seq_len: int):
        return await self._submit(self._next_worker(), _classify, key, items, max_seq_len)

    def _next_worker(self) -> int:
        """The fewest jobs outstanding; among equals, the next in turn (sequential requests take turns)."""
        turn = [(self._turn + j) % self.workers for j in range(self.workers)]
        i = min(turn, key=self._outstanding.__getitem__)
        self._turn = (i + 1) % self.workers
        return i

    async def _submit(self, i: int, fn, *args):
        executor = self._executors[i]
        self._outstanding[i] += 1
        try:
            return await asyncio.wrap_future(executor.submit(fn, *args))
        except TokenizerRetired:
            raise ModelUnavailable(
                "the model was replaced while the request was prepared; retry it"
            ) from None
        except WindowsDropped:
            raise CpuWorkerLost(
                "the tokenization worker no longer holds this request's windows (it was restarted, or more "
                "requests were in flight than it holds); retry the request",
                {"Retry-After": "1"},
            ) from None
        except BrokenProcessPool:
            self._restart(i, executor)
            raise CpuWorkerLost(
                "a tokenization worker process died and is being restarted; retry the request",
                {"Retry-After": "1"},
            ) from None
        finally:
            self._outstanding[i] -= 1

    def _restart(self, i: int, broken: ProcessPoolExecutor) -> None:
        if self._executors[i] is not broken:  # another of its requests restarted it already
            return
        self._executors[i] = executor = self._start()
        broken.shutdown(wait=False, cancel_futures=True)
        executor.submit(_configure, self.max_windows)  # queued ahead of any request: one worker, in order
        for key, spec in self._specs.items():
            executor.submit(_install, key, spec)

    def shutdown(self) -> None:
        for executor in self._executors:
            executor.shutdown(wait=False, cancel_futures=True)


def make_pool(kind: str, workers: int, max_windows: int) -> ThreadCpuPool | ProcessCpuPool:
    return ProcessCpuPool(workers, max_windows) if kind == "processes" else ThreadCpuPool(workers)
