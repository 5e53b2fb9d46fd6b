"""The CPU side in worker processes (PRUNE_SERVE_CPU_POOL=processes): the same answers as threads, every
served model's tokenizer in every worker (reload included), and a worker that dies costs only its own
requests a 503 before it is started again. Real servers on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import httpx
import pytest

from packer.runtime.samples import QA_PAIRS, SENTENCES
from tests.serving import Server, poll

LONG = " ".join(c for _, c in QA_PAIRS) * 3  # several windows at max_seq_len 96
ITEMS = [{"question": q, "context": c} for q, c in QA_PAIRS] + [{"question": QA_PAIRS[0][0], "context": LONG}]


def workers_of(srv: Server) -> list[int]:
    """The server's worker processes (multiprocessing's spawned children, not its resource tracker)."""
    children = []
    for task in Path(f"/proc/{srv.proc.pid}/task").iterdir():  # a child belongs to the thread that made it
        try:
            children += (task / "children").read_text().split()
        except OSError:
            continue  # the thread ended
    alive = [p for p in children if Path(f"/proc/{p}").is_dir()]
    return sorted(int(p) for p in alive if "spawn_main" in Path(f"/proc/{p}/cmdline").read_text())


def ask(srv: Server, model: str = "qa") -> httpx.Response:
    body = {"items": ITEMS, "top_k": 3, "max_seq_len": 96, "doc_stride": 32}
    return httpx.post(f"{srv.url}/v1/models/{model}/qa", json=body, timeout=60)


@pytest.fixture(scope="module")
def both(models_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    threads = Server(models_dir, logs / "threads.log", cpu_pool="threads", cpu_workers=1)
    try:
        processes = Server(models_dir, logs / "processes.log", cpu_pool="processes", cpu_workers=2)
    except Exception:
        threads.stop()
        raise
    yield threads, processes
    threads.stop()
    processes.stop()


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads worker processes from /proc")
def test_processes_answer_as_threads_do(both):
    threads, processes = both
    assert len(workers_of(processes)) == 2 and workers_of(threads) == []
    for model in ("qa", "qa-torch"):
        a, b = ask(threads, model), ask(processes, model)
        assert a.status_code == b.status_code == 200, b.text
        assert a.json()["results"] == b.json()["results"]
        assert len(b.json()["results"][-1]["answers"]) == 3
    body = {"items": [{"text": s} for s in SENTENCES], "return_all_scores": True}
    a, b = (httpx.post(f"{s.url}/v1/models/cls/classify", json=body, timeout=60) for s in both)
    assert a.status_code == b.status_code == 200 and a.json()["results"] == b.json()["results"]
    # Refusals raised in a worker arrive as the same 4xx.
    bad = {"question": "why " * 200, "context": "short", "max_seq_len": 96}
    r = httpx.post(f"{processes.url}/v1/models/qa/qa", json=bad, timeout=60)
    assert r.status_code == 422 and "shorten the question" in r.json()["error"]["message"]


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads worker processes from /proc")
def test_a_dead_worker_is_started_again_before_requests_meet_it(both):
    """Killed between requests: replaced as soon as its pipe closes, with every tokenizer; no request
    fails, and the restart is counted for the alert."""
    _, processes = both
    victim = workers_of(processes)[0]
    os.kill(victim, signal.SIGKILL)
    poll(lambda: len(workers_of(processes)) == 2 and victim not in workers_of(processes), 30)
    assert all(ask(processes).status_code == 200 for _ in range(4))  # both workers have the tokenizers
    metrics = httpx.get(f"{processes.url}/metrics", timeout=10).text
    assert "prune_serve_cpu_worker_restarts_total 1.0" in metrics


def test_reloaded_models_reach_every_worker(models_dir, tmp_path):
    root = tmp_path / "models"
    shutil.copytree(models_dir / "qa-torch", root / "m")
    srv = Server(root, tmp_path / "serve.log", cpu_pool="processes", cpu_workers=2, open_admin="true")
    try:
        assert ask(srv, "m").status_code == 200
        shutil.copytree(models_dir / "qa", root / "second")
        shutil.rmtree(root / "m")
        shutil.copytree(models_dir / "qa", root / "m")  # a new version: a new key, the old one retired
        r = httpx.post(srv.url + "/v1/admin/reload", timeout=120)
        assert r.status_code == 200 and sorted(r.json()["loaded"]) == ["m", "second"], r.text
        # Requests spread over both workers (fewest outstanding first): every one has both tokenizers.
        for model in ("m", "second", "m", "second"):
            assert ask(srv, model).status_code == 200
    finally:
        srv.stop()


def test_windows_held_by_a_worker_are_answered_once_forgotten_or_dropped(bert_qa_packed):
    """The pool itself, with real worker processes: answers equal the in-process ones; a request that
    ends without answers is forgotten; beyond the bound the oldest request's windows go (a 503 for it,
    never memory without end)."""
    import asyncio

    import numpy as np

    import packer
    from packer.runtime.tasks import qa
    from service.cpu_pool import ProcessCpuPool
    from service.errors import CpuWorkerLost

    tokenizer = packer.load(bert_qa_packed).tokenizer
    options = qa.QAOptions(top_k=2, max_seq_len=96, doc_stride=32)
    pairs = [(q, c) for q, c in QA_PAIRS] + [(QA_PAIRS[0][0], LONG)]
    contexts = [c for _, c in pairs]
    expected_windows = qa.make_windows_batch(tokenizer, pairs, options)
    windows_per_request = sum(map(len, expected_windows))
    pool = ProcessCpuPool(1, max_windows=2 * windows_per_request)

    def logits_for(inputs, seed=0):
        rng = np.random.default_rng(seed)
        return [[(rng.normal(0, 3, w.length).astype(np.float32),) * 2 for w in ws] for ws in inputs]

    async def scenario():
        first = await pool.prepare_qa("m", tokenizer, pairs, options)
        assert [[w.input_ids.tolist() for w in ws] for ws in first.inputs] == [
            [w.input_ids.tolist() for w in ws] for ws in expected_windows
        ]
        logits = logits_for(first.inputs)
        got = await pool.answer_qa(first, contexts, logits, options)
        assert got == qa.answer_batch(contexts, expected_windows, logits, options)
        with pytest.raises(CpuWorkerLost, match="no longer holds"):  # answered once: then forgotten
            await pool.answer_qa(first, contexts, logits, options)

        gone = await pool.prepare_qa("m", tokenizer, pairs, options)
        pool.forget(gone)  # refused or timed out: nothing will ask
        with pytest.raises(CpuWorkerLost, match="no longer holds"):
            await pool.answer_qa(gone, contexts, logits_for(gone.inputs), options)

        # Three requests in flight, room for two: the oldest is dropped, the others still answer.
        held = [await pool.prepare_qa("m", tokenizer, pairs, options) for _ in range(3)]
        with pytest.raises(CpuWorkerLost):
            await pool.answer_qa(held[0], contexts, logits_for(held[0].inputs), options)
        for p in held[1:]:
            assert len(await pool.answer_qa(p, contexts, logits_for(p.inputs), options)) == len(pairs)

        # Killed while a job is in it: that job fails with a 503 and the worker is replaced.
        job = asyncio.ensure_future(pool.prepare_qa("m", tokenizer, pairs * 20, options))
        await asyncio.sleep(0)  # the job is sent
        victim = pool.pids[0]
        os.kill(victim, signal.SIGKILL)
        with pytest.raises(CpuWorkerLost, match="died"):
            await job
        assert pool.pids[0] != victim and restarts == [1]
        again = await pool.prepare_qa("m", tokenizer, pairs, options)  # the new worker has the tokenizer
        assert len(await pool.answer_qa(again, contexts, logits_for(again.inputs), options)) == len(pairs)

    restarts = []
    pool.on_restart = lambda: restarts.append(len(restarts) + 1)
    pool.install("m", tokenizer)
    try:
        asyncio.run(scenario())
    finally:
        pool.shutdown()


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads worker processes from /proc")
def test_sigterm_stops_the_workers_too(models_dir, tmp_path):
    srv = Server(models_dir, tmp_path / "serve.log", cpu_pool="processes", cpu_workers=2)
    try:
        workers = workers_of(srv)
        assert len(workers) == 2 and ask(srv).status_code == 200
        assert srv.terminate() == 0, srv.log.read_text()
        poll(lambda: not any(Path(f"/proc/{p}").is_dir() for p in workers), 30)  # no orphans left
    finally:
        srv.stop()


def test_jobs_waiting_together_run_as_one_call_and_keep_their_own_results(bert_qa_packed):
    """A worker merges the requests' jobs it finds waiting (service/cpu_worker.py): each request gets
    exactly what it gets alone; a bad request (a question with no room, NaN logits) fails alone."""
    import numpy as np

    import packer
    from packer.runtime.tasks import qa
    from service import cpu_worker

    tokenizer = packer.load(bert_qa_packed).tokenizer
    cpu_worker._TOKENIZERS["m"] = tokenizer
    cpu_worker._LIMIT["windows"] = 10_000
    options = qa.QAOptions(top_k=3, max_seq_len=96, doc_stride=32)
    requests = [[*QA_PAIRS[i:], (QA_PAIRS[i][0], LONG)] for i in range(len(QA_PAIRS))]
    requests.insert(2, [(QA_PAIRS[0][0], "short"), ("why " * 200, "no room for the context")])
    prepares = [(100 + j, "prepare", ("m", 100 + j, pairs, options)) for j, pairs in enumerate(requests)]
    ask_later = [(1, "forget", (999,)), (2, "prepare", ("m", 2, requests[0], qa.QAOptions()))]
    groups = cpu_worker._groups(prepares[:3] + ask_later + prepares[3:])
    assert [len(g) for g in groups] == [3, 1, 1, len(prepares) - 3]  # other options: not merged

    for bad in (False, True):  # the merged calls succeed; then each fails on one request
        chosen = [p for p in prepares if bad or p[0] != 102]
        merged = {job: (error, packed) for job, error, packed in cpu_worker._prepare_many(chosen)}
        if bad:
            error = merged[102][0]
            assert isinstance(error, qa.QAInputError) and "shorten the question" in str(error)
        rng = np.random.default_rng(0)
        answers, expected = [], {}
        for j, pairs in enumerate(requests):
            job = 100 + j
            if j == 2:
                continue
            windows = qa.make_windows_batch(tokenizer, pairs, options)
            packed = merged[job][1]
            assert packed.ids.tolist() == np.concatenate([w.input_ids for ws in windows for w in ws]).tolist()
            starts = rng.normal(0, 3, len(packed.ids)).astype(np.float32)
            ends = rng.normal(0, 3, len(packed.ids)).astype(np.float32)
            if bad and j == 4:
                ends[3] = np.nan
            answers.append((job, "answer", (job, starts, ends, options)))
            if not (bad and j == 4):
                logits = cpu_worker._logits(windows, starts, ends)
                expected[job] = qa.answer_batch([c for _, c in pairs], windows, logits, options)
        answers.append((555, "answer", (555, starts, ends, options)))  # never prepared (or dropped)
        replies = {job: (error, result) for job, error, result in cpu_worker._answer_many(answers)}
        assert isinstance(replies[555][0], cpu_worker.WindowsDropped)
        assert isinstance(replies[104][0], qa.NonFiniteLogits) == bad
        assert {job: result for job, (error, result) in replies.items() if error is None} == expected
        assert not cpu_worker._PENDING  # every request's windows answered or failed, none left held


def test_jobs_reach_a_worker_in_order_and_a_full_pipe_never_blocks_the_server():
    """The server writes small jobs straight into a worker's pipe while little is unread, and queues
    the rest for its sender thread: 1.2 MB posted to a worker that reads nothing never blocks the
    poster (a pipe holds ~200 KB), and everything arrives in the order it was posted."""
    import multiprocessing
    import threading

    from service.cpu_pool import DIRECT_BYTES, _Worker

    server_end, worker_end = multiprocessing.Pipe()
    worker = _Worker(process=None, conn=server_end)
    threading.Thread(target=worker.send_all, daemon=True).start()
    chunk = "x" * 30_000

    def post_all():
        for job in range(1, 41):
            worker.post((job, "prepare", (chunk,)))

    poster = threading.Thread(target=post_all)
    poster.start()
    poster.join(30)
    assert not poster.is_alive(), "posting blocked on a pipe nobody reads"
    assert 0 < worker.unread <= DIRECT_BYTES and worker.queued > 0
    assert [worker_end.recv()[0] for _ in range(40)] == list(range(1, 41))
    worker.read_up_to(40)  # a reply to the last job: everything before it was read
    assert worker.unread == 0
    poll(lambda: worker.queued == 0, 10)
    worker.post((41, "ping", ()))  # nothing queued, nothing unread: written directly again
    assert worker.unread > 0 and worker_end.recv()[0] == 41
    worker.outbox.put(None)


class TwoArgumentError(Exception):
    """Pickles, but cannot be rebuilt from its args (the message alone)."""

    def __init__(self, a, b):
        super().__init__(f"{a}/{b}")


def test_an_exception_that_cannot_travel_back_still_answers_the_job():
    """A worker's error must reach the server, or the request would wait for its deadline: one that
    cannot be rebuilt there arrives as a RuntimeError naming it."""
    import multiprocessing
    import pickle

    from service import cpu_worker

    worker_end, server_end = multiprocessing.Pipe()
    assert cpu_worker._send(worker_end, (7, TwoArgumentError(1, 2), None))
    job, error, result = pickle.loads(server_end.recv_bytes())
    assert job == 7 and result is None
    assert type(error) is RuntimeError and str(error) == "TwoArgumentError: 1/2"
    assert cpu_worker._send(worker_end, (8, ValueError("fine"), None))
    assert type(pickle.loads(server_end.recv_bytes())[1]) is ValueError
