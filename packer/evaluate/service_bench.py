"""Service benchmark on real SQuAD v2 questions, measured in one run, each part alone on the cores.

(a) service throughput / bare backend throughput at the same batch shapes
(b) service throughput / a plain FastAPI app running the unpacked source once per request
(c) p50 / p95 / p99 latency at 1, 8 and 32 concurrent clients
(d) padding ratio with and without length grouping

python -m packer.evaluate.service_bench --source SRC --artifact OUT --data dev-v2.0.json
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

import httpx
import numpy as np


def load_questions(path: Path, n: int, seed: int = 0) -> list[dict]:
    data = json.loads(path.read_text())
    pairs = [
        {"question": qa["question"], "context": p["context"]}
        for article in data["data"]
        for p in article["paragraphs"]
        for qa in p["qas"]
    ]
    rng = np.random.default_rng(seed)
    return [pairs[i] for i in rng.choice(len(pairs), size=min(n, len(pairs)), replace=False)]


def wait_ready(
    url: str, proc: subprocess.Popen, log=None, path: str = "/ready", timeout: float = 180
) -> None:
    """Until `path` answers; a server that exits first is an error with the end of its `log` file."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            said = []
            if log is not None:
                log.seek(0)
                said = log.read().decode(errors="replace").strip().splitlines()[-5:]
            raise RuntimeError(f"server exited with {proc.returncode}: " + " | ".join(said))
        try:
            if httpx.get(url + path, timeout=1).status_code < 500:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not get ready")


def start(cmd: list[str], env: dict, url: str, ready_path: str) -> subprocess.Popen:
    # stderr to a file, not a pipe: a server that logs a lot must never block on a full pipe
    log = tempfile.TemporaryFile()  # noqa: SIM115 - read if the server dies, closed with the process
    proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=log)
    wait_ready(url, proc, log, ready_path)
    return proc


async def load(url: str, path: str, questions: list[dict], clients: int) -> tuple[float, list[float]]:
    """Send every question once with `clients` concurrent clients; returns (questions/s, latencies)."""
    todo = deque(questions)
    latencies: list[float] = []

    async def client(http: httpx.AsyncClient):
        while todo:
            body = todo.popleft()
            start = time.perf_counter()
            r = await http.post(path, json=body)
            r.raise_for_status()
            latencies.append(time.perf_counter() - start)

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*[client(http) for _ in range(clients)])
        elapsed = time.perf_counter() - start
    return len(questions) / elapsed, latencies


def padding_ratio(url: str) -> float:
    text = httpx.get(url + "/metrics").text
    values = {}
    for line in text.splitlines():
        for key in ("prune_serve_padding_ratio_sum", "prune_serve_padding_ratio_count"):
            if line.startswith(key + "{"):
                values[key] = values.get(key, 0.0) + float(line.split()[-1])
    return values["prune_serve_padding_ratio_sum"] / max(values["prune_serve_padding_ratio_count"], 1)


def bare_backend(
    artifact: Path, questions: list[dict], threads: int, limits, clients: int, device: str = "cpu"
) -> float:
    """The backend alone on the batch shapes the service forms for `clients` closed-loop clients.

    The batches are replayed from the same policy (service.batching.FairQueue, one flow per question)
    over a queue that holds the windows of `clients` outstanding questions, refilled as questions
    complete, as the service's is.
    """
    from packer.artifact import read_packed_config
    from packer.runtime.backends import choose_variant, open_backend, present_variants
    from packer.runtime.tasks import qa
    from packer.runtime.tasks.padding import pad
    from packer.runtime.tokenizer import load_tokenizer
    from service.batching import FairQueue, WorkItem

    variant = choose_variant("auto", present_variants(artifact), device)
    backend = open_backend(artifact, variant, device=device, threads=threads)
    if backend.per_window:  # as the service does
        limits = dataclasses.replace(limits, max_batch_size=1)
    tokenizer = load_tokenizer(artifact, read_packed_config(artifact))
    pad_id = tokenizer.pad_token_id or 0
    per_question = [
        qa.make_windows(tokenizer, q["question"], q["context"], qa.QAOptions()) for q in questions
    ]
    pending = deque(range(len(per_question)))
    queue = FairQueue(limits)
    left: dict[int, int] = {}

    def admit() -> None:
        while pending and len(left) < clients:
            q = pending.popleft()
            left[q] = len(per_question[q])
            queue.add(
                [WorkItem(w.input_ids, w.attention_mask, w.token_type_ids, 1e18, q) for w in per_question[q]]
            )

    admit()
    shapes = []
    while len(queue):
        batch = queue.take()
        shapes.append(pad(batch, pad_id)[:3])
        for it in batch:
            left[it.flow] -= 1
            if not left[it.flow]:
                del left[it.flow]
        admit()
    backend.run(*shapes[0])  # warm
    start = time.perf_counter()
    for ids, mask, types in shapes:
        backend.run(ids, mask, types)
    return len(questions) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True, help="the unpacked source checkpoint (baseline)")
    p.add_argument("--artifact", required=True, help="its packed artifact")
    p.add_argument("--data", required=True, help="SQuAD v2 dev JSON")
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--baseline-requests", type=int, default=64, help="0 skips the plain FastAPI baseline")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--json", help="write the figures here too")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"], help="where to serve")
    args = p.parse_args(argv)

    from service.batching import BatchLimits
    from service.settings import Settings

    settings = Settings()
    limits = BatchLimits(
        settings.max_batch_size,
        settings.batch_tokens_for(args.device),
        settings.max_wait_ms,
        settings.queue_size,
        True,
    )
    questions = load_questions(Path(args.data), args.requests)
    figures: dict = {"threads": args.threads, "requests": len(questions), "device": args.device}
    artifact = Path(args.artifact).resolve()
    models = Path(tempfile.mkdtemp(prefix="prune-serve-bench-"))
    (models / artifact.name).symlink_to(artifact)
    port = 18080
    url = f"http://127.0.0.1:{port}"
    serve_env = {
        "PRUNE_SERVE_MODELS_DIR": str(models),
        "PRUNE_SERVE_THREADS": str(args.threads),
        "PRUNE_SERVE_DEVICE": args.device,
    }
    name = artifact.name
    try:
        figures["bare_backend_qps"] = bare_backend(
            artifact, questions, args.threads, limits, clients=32, device=args.device
        )

        for grouping in ("true", "false"):
            proc = start(
                [sys.executable, "-m", "service.cli", "--port", str(port), "--log-level", "warning"],
                {**serve_env, "PRUNE_SERVE_LENGTH_GROUPING": grouping},
                url,
                "/ready",
            )
            try:
                qps, _ = asyncio.run(load(url, f"/v1/models/{name}/qa", questions, 32))
                key = "grouped" if grouping == "true" else "fifo"
                figures[f"service_qps_32_clients_{key}"] = qps
                figures[f"padding_ratio_{key}"] = padding_ratio(url)
                if grouping == "true":
                    for clients in (1, 8, 32):
                        subset = questions[: max(32, min(len(questions), clients * 8))]
                        qps_c, lat = asyncio.run(load(url, f"/v1/models/{name}/qa", subset, clients))
                        ms = np.percentile(np.array(lat) * 1000, [50, 95, 99])
                        figures[f"latency_ms_{clients}_clients"] = {
                            "p50": ms[0],
                            "p95": ms[1],
                            "p99": ms[2],
                            "qps": qps_c,
                        }
            finally:
                proc.terminate()
                proc.wait(60)

        if args.baseline_requests > 0:
            figures["baseline_qps_32_clients"] = baseline(args, url, port, questions)
    finally:
        shutil.rmtree(models, ignore_errors=True)
    report(figures, args)
    return 0


def baseline(args: argparse.Namespace, url: str, port: int, questions: list[dict]) -> float:
    """A plain FastAPI app running the unpacked source once per request (on the CPU)."""
    proc = start(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "packer.evaluate.baseline:app",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        {"PRUNE_SERVE_BASELINE_SOURCE": args.source, "PRUNE_SERVE_THREADS": str(args.threads)},
        url,
        "/docs",
    )
    try:
        return asyncio.run(load(url, "/qa", questions[: args.baseline_requests], 32))[0]
    finally:
        proc.terminate()
        proc.wait(60)


def report(figures: dict, args: argparse.Namespace) -> None:
    service_qps = figures["service_qps_32_clients_grouped"]
    figures["a_service_over_bare_backend"] = service_qps / figures["bare_backend_qps"]
    print(f"requests: {figures['requests']} SQuAD v2 dev questions, {args.threads} threads, {args.device}")
    print(
        f"(a) service {service_qps:.1f} q/s / bare backend {figures['bare_backend_qps']:.1f} q/s = "
        f"{figures['a_service_over_bare_backend']:.0%}"
    )
    if "baseline_qps_32_clients" in figures:
        figures["b_service_over_baseline"] = service_qps / figures["baseline_qps_32_clients"]
        print(
            f"(b) service {service_qps:.1f} q/s / plain FastAPI + transformers source "
            f"{figures['baseline_qps_32_clients']:.1f} q/s = {figures['b_service_over_baseline']:.2f}x"
        )
    for clients in (1, 8, 32):
        lat = figures[f"latency_ms_{clients}_clients"]
        print(
            f"(c) {clients:>2} clients: p50 {lat['p50']:.0f} ms, p95 {lat['p95']:.0f} ms, "
            f"p99 {lat['p99']:.0f} ms, {lat['qps']:.1f} q/s"
        )
    print(
        f"(d) padding ratio: length grouping {figures['padding_ratio_grouped']:.1%}, "
        f"FIFO {figures['padding_ratio_fifo']:.1%} "
        f"(32 clients; FIFO {figures['service_qps_32_clients_fifo']:.1f} q/s)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2, default=float) + "\n")


if __name__ == "__main__":
    sys.exit(main())
