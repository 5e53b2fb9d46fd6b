"""One tokenization worker process (service/cpu_pool.py's ProcessCpuPool): its state, its jobs and the
loop that runs them.

State: every served model's tokenizer (installed and retired by the server), and the windows of the QA
requests in flight, kept here between tokenization and answering so that only token ids and logits
cross the pipe; a bound on the windows held drops the oldest request's first.

The loop: a thread reads messages off the pipe as they come (so the server's sends never wait on this
process's work), the main thread runs them in order and writes each reply back pickled whole, or the
job's exception (or, if that cannot be pickled, a RuntimeError saying what it was).
"""

from __future__ import annotations

import itertools
import os
import queue
import signal
import threading
from collections import OrderedDict
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler

import numpy as np

from packer.runtime.tasks import classify, qa
from packer.runtime.tokenizer import TextTokenizer, TokenizerSpec

_TOKENIZERS: dict[str, TextTokenizer] = {}  # model key -> its tokenizer
_PENDING: OrderedDict[int, tuple[list[str], list[list[qa.Window]]]] = OrderedDict()  # token -> windows
_LIMIT = {"windows": 0, "held": 0}


class TokenizerRetired(LookupError):
    """The model was replaced (its tokenizer retired) before this request's job reached the worker."""


class WindowsDropped(LookupError):
    """The worker no longer holds this request's windows (it was restarted, or held too many)."""


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


def classify_inputs(tokenizer: TextTokenizer, items: list[tuple[str, str | None]], max_seq_len: int):
    return [classify.encode(tokenizer, text, pair, max_seq_len) for text, pair in items]


def install(key: str, spec: TokenizerSpec) -> None:
    _TOKENIZERS[key] = TextTokenizer.from_spec(spec)


def retire(key: str) -> None:
    _TOKENIZERS.pop(key, None)


def _tokenizer(key: str) -> TextTokenizer:
    tokenizer = _TOKENIZERS.get(key)
    if tokenizer is None:
        raise TokenizerRetired(key)
    return tokenizer


def prepare(key: str, token: int, pairs: list[tuple[str, str]], options: qa.QAOptions):
    windows = qa.make_windows_batch(_tokenizer(key), pairs, options)
    _PENDING[token] = ([context for _, context in pairs], windows)
    _LIMIT["held"] += sum(map(len, windows))
    while _LIMIT["held"] > _LIMIT["windows"] and len(_PENDING) > 1:
        _, (_, dropped) = _PENDING.popitem(last=False)
        _LIMIT["held"] -= sum(map(len, dropped))
    return PackedInputs.of(windows)


def forget(token: int) -> tuple[list[str], list[list[qa.Window]]] | None:
    found = _PENDING.pop(token, None)
    if found is None:
        return None
    _LIMIT["held"] -= sum(map(len, found[1]))
    return found


def answer(token: int, starts: np.ndarray, ends: np.ndarray, options: qa.QAOptions) -> list[qa.QAResult]:
    found = forget(token)
    if found is None:
        raise WindowsDropped(token)
    contexts, windows = found
    lengths = [w.length for ws in windows for w in ws]
    cut = np.cumsum(lengths)[:-1]
    pairs = iter(zip(np.split(starts, cut), np.split(ends, cut), strict=True))
    logits = [[next(pairs) for _ in ws] for ws in windows]
    return qa.answer_batch(contexts, windows, logits, options)


def classify_job(key: str, items: list[tuple[str, str | None]], max_seq_len: int):
    return classify_inputs(_tokenizer(key), items, max_seq_len)


JOBS = {
    "install": install,
    "retire": retire,
    "prepare": prepare,
    "forget": forget,
    "answer": answer,
    "classify": classify_job,
    "ping": lambda: os.getpid(),
}


def main(conn: Connection, max_windows: int) -> None:
    """The worker process: run the jobs that arrive until the server closes its end of the pipe."""
    _LIMIT["windows"] = max_windows
    # The workers are the parallelism (one per core given): the tokenizers library's own thread pool in
    # each would put several threads on every core.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the server stops us
    inbox: queue.SimpleQueue = queue.SimpleQueue()

    def receive() -> None:
        try:
            while True:
                inbox.put(conn.recv())
        except (EOFError, OSError):
            inbox.put(None)

    threading.Thread(target=receive, name="receive", daemon=True).start()
    while (message := inbox.get()) is not None:
        job, name, args = message
        try:
            reply = (job, None, JOBS[name](*args))
        except Exception as exc:  # the server maps it to the request's answer
            reply = (job, exc, None)
        if not job:  # fire and forget (install, retire, forget)
            continue
        try:
            payload = ForkingPickler.dumps(reply)
        except Exception as exc:
            payload = ForkingPickler.dumps((job, RuntimeError(f"{type(reply[1]).__name__}: {exc}"), None))
        try:
            conn.send_bytes(payload)
        except OSError:  # the server is gone
            break
