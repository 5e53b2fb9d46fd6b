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
import pickle
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
        # int32 views: batching pads them into int64 matrices (a copy per window here would be wasted)
        ids = np.split(self.ids, cut)
        types = np.split(self.types, cut) if self.types is not None else [None] * len(ids)
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


def prepare(key: str, token: int, pairs: list[tuple[str, str]], options: qa.QAOptions) -> PackedInputs:
    windows = qa.make_windows_batch(_tokenizer(key), pairs, options)
    return _hold(token, [context for _, context in pairs], windows)


def _hold(token: int, contexts: list[str], windows: list[list[qa.Window]]) -> PackedInputs:
    """Keep a request's windows until its logits come back (the oldest go first beyond the bound)."""
    _PENDING[token] = (contexts, windows)
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


def _logits(windows: list[list[qa.Window]], starts: np.ndarray, ends: np.ndarray) -> list[list[tuple]]:
    cut = np.cumsum([w.length for ws in windows for w in ws])[:-1]
    pairs = iter(zip(np.split(starts, cut), np.split(ends, cut), strict=True))
    return [[next(pairs) for _ in ws] for ws in windows]


def answer(token: int, starts: np.ndarray, ends: np.ndarray, options: qa.QAOptions) -> list[qa.QAResult]:
    found = forget(token)
    if found is None:
        raise WindowsDropped(token)
    return _answer_held(found, starts, ends, options)


def _answer_held(found: tuple, starts: np.ndarray, ends: np.ndarray, options: qa.QAOptions):
    contexts, windows = found
    return qa.answer_batch(contexts, windows, _logits(windows, starts, ends), options)


# -- coalescing: jobs of several requests that wait together run as one call --------------------------
# Under load a worker finds several requests' jobs waiting; tokenizing or answering them in one call
# pays the per-call costs (a few dozen numpy calls, the tokenizer's array work) once. Results are each
# request's own: every step works item by item (tests/runtime/test_answer.py checks batch against
# single). If the merged call fails (one request's bad input), each job runs alone, so the failure
# stays with its request.

MAX_COALESCED_ITEMS = 64


def _merge_key(name: str, args: tuple):
    if name == "prepare":
        return ("prepare", args[0], args[3])  # same model, same options
    if name == "answer":
        return ("answer", args[3])
    return None


def _prepare_many(jobs: list[tuple]) -> list[tuple]:
    key, options = jobs[0][2][0], jobs[0][2][3]
    pairs = [pair for _, _, args in jobs for pair in args[2]]
    try:
        windows = qa.make_windows_batch(_tokenizer(key), pairs, options)
    except Exception:
        return [_run_one(job) for job in jobs]
    replies, at = [], 0
    for job, _, (_, token, own, _) in jobs:
        mine, at = windows[at : at + len(own)], at + len(own)
        replies.append((job, None, _hold(token, [context for _, context in own], mine)))
    return replies


def _answer_many(jobs: list[tuple]) -> list[tuple]:
    found = [forget(args[0]) for _, _, args in jobs]
    held = [(job, f) for job, f in zip(jobs, found, strict=True) if f is not None]
    gone = [job for job, f in zip(jobs, found, strict=True) if f is None]
    replies = [(job, WindowsDropped(args[0]), None) for job, _, args in gone]
    contexts = [c for _, (cs, _) in held for c in cs]
    windows = [ws for _, (_, wss) in held for ws in wss]
    logits = [ls for (_, _, args), (_, wss) in held for ls in _logits(wss, args[1], args[2])]
    try:
        results = qa.answer_batch(contexts, windows, logits, jobs[0][2][3]) if held else []
    except Exception:  # answer each alone: the error stays with its request
        for (job, _, args), found_windows in held:
            try:
                replies.append((job, None, _answer_held(found_windows, *args[1:])))
            except Exception as exc:
                replies.append((job, exc, None))
        return replies
    at = 0
    for (job, _, _), (cs, _) in held:
        replies.append((job, None, results[at : at + len(cs)]))
        at += len(cs)
    return replies


def _run_one(message: tuple) -> tuple:
    job, name, args = message
    try:
        return (job, None, JOBS[name](*args))
    except Exception as exc:  # the server maps it to the request's answer
        return (job, exc, None)


def _groups(messages: list[tuple]) -> list[list[tuple]]:
    """Consecutive jobs that can run as one call, in arrival order (installs and forgets stay between)."""
    groups: list[list[tuple]] = []
    for message in messages:
        key = _merge_key(message[1], message[2])
        last = groups[-1] if groups else None
        if key is not None and last and _merge_key(last[0][1], last[0][2]) == key:
            last.append(message)
        else:
            groups.append([message])
    return groups


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
        waiting, items = [message], _items(message)
        while items < MAX_COALESCED_ITEMS:  # whatever else is already here
            try:
                message = inbox.get_nowait()
            except queue.Empty:
                break
            if message is None:
                break
            waiting.append(message)
            items += _items(message)
        for group in _groups(waiting):
            if len(group) == 1:
                replies = [_run_one(group[0])]
            else:
                replies = (_prepare_many if group[0][1] == "prepare" else _answer_many)(group)
            for reply in replies:
                if reply[0] and not _send(conn, reply):  # job 0: fire and forget (install, forget)
                    return
        if message is None:
            return


def _items(message: tuple) -> int:
    name, args = message[1], message[2]
    return len(args[2]) if name == "prepare" else 1


def _send(conn: Connection, reply: tuple) -> bool:
    job, error, _ = reply
    try:
        payload = ForkingPickler.dumps(reply)
        if error is not None:  # an exception must also load on the other side (its own arguments)
            pickle.loads(payload)
    except Exception:
        payload = ForkingPickler.dumps((job, RuntimeError(f"{type(error).__name__}: {error}"), None))
    try:
        conn.send_bytes(payload)
    except OSError:  # the server is gone
        return False
    return True
