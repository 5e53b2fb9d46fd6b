"""Overload soak: open-loop load at a multiple of the measured capacity; nothing may hang or be lost.

python -m packer.evaluate.soak --artifact OUT --data dev-v2.0.json [--factor 2] [--seconds 60]

Every request must end in 200, 429 (queue full) or 504 (deadline); admitted requests must finish
within the deadline; the server's RSS must come back to its baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@dataclass
class OpenLoop:
    statuses: Counter
    latencies: list[float]  # of the 200s
    lost: list[str]  # requests that hung past the client timeout or lost their connection
    offered_rate: float
    sent: int
    send_seconds: float

    @property
    def achieved_rate(self) -> float:
        return self.sent / self.send_seconds if self.send_seconds else 0.0


async def open_loop(
    url: str, path: str, bodies: list[dict], rate: float, seconds: float, client_timeout: float
) -> OpenLoop:
    """Send at `rate` per second for `seconds` of wall time, whatever the answers, then wait for the
    outstanding ones (each bounded by `client_timeout`).

    The loop stops at its time bound even when the client cannot keep up: missed send times are
    skipped, not caught up, and the achieved rate is reported beside the offered one, so a client
    that saturates the cores shows up as achieved < offered instead of running on for ever."""
    statuses: Counter = Counter()
    latencies: list[float] = []
    lost: list[str] = []
    limits = httpx.Limits(max_connections=1024, max_keepalive_connections=256)
    async with httpx.AsyncClient(base_url=url, timeout=client_timeout, limits=limits) as client:

        async def one(body):
            start = time.perf_counter()
            try:
                r = await client.post(path, json=body)
            except Exception as exc:  # a hang (client timeout) or a dropped connection: lost
                lost.append(type(exc).__name__)
                return
            statuses[r.status_code] += 1
            if r.status_code == 200:
                latencies.append(time.perf_counter() - start)

        tasks = []
        start = time.perf_counter()
        tick = 0
        while (now := time.perf_counter() - start) < seconds:
            due = int(now * rate)  # send times that have come; ones missed while busy are skipped
            if due >= tick:
                tasks.append(asyncio.create_task(one(bodies[len(tasks) % len(bodies)])))
                tick = due + 1
            await asyncio.sleep(max(0.0, tick / rate - (time.perf_counter() - start)))
        send_seconds = time.perf_counter() - start
        await asyncio.gather(*tasks)
    return OpenLoop(statuses, latencies, lost, rate, len(tasks), send_seconds)


def main(argv: list[str] | None = None) -> int:
    from packer.evaluate.service_bench import load, load_questions, start

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", required=True)
    p.add_argument("--data", required=True, help="SQuAD v2 dev JSON")
    p.add_argument("--factor", type=float, default=2.0, help="load as a multiple of the measured capacity")
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--timeout", type=float, default=5.0, help="PRUNE_SERVE_REQUEST_TIMEOUT_S")
    p.add_argument("--json")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="extra server settings")
    args = p.parse_args(argv)

    artifact = Path(args.artifact).resolve()
    models = Path(tempfile.mkdtemp(prefix="prune-serve-soak-"))
    (models / artifact.name).symlink_to(artifact)
    url, path = "http://127.0.0.1:18081", f"/v1/models/{artifact.name}/qa"
    env = {
        "PRUNE_SERVE_MODELS_DIR": str(models),
        "PRUNE_SERVE_REQUEST_TIMEOUT_S": str(args.timeout),
        "PRUNE_SERVE_QUEUE_SIZE": "256",
        **dict(e.split("=", 1) for e in args.env),
    }
    bodies = load_questions(Path(args.data), 512)
    proc = start(
        [sys.executable, "-m", "service.cli", "--port", "18081", "--log-level", "warning"], env, url, "/ready"
    )
    try:
        capacity, _ = asyncio.run(load(url, path, bodies[:128], 16))
        baseline = rss_mb(proc.pid)
        rate = args.factor * capacity
        run = asyncio.run(open_loop(url, path, bodies, rate, args.seconds, args.timeout * 3))
        statuses, latencies, lost = run.statuses, run.latencies, run.lost
        peak = rss_mb(proc.pid)
        time.sleep(5)
        after = rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(60)
        shutil.rmtree(models, ignore_errors=True)
    lat = np.array(latencies) * 1000 if latencies else np.array([0.0])
    figures = {
        "capacity_qps": capacity,
        "offered_qps": rate,
        "achieved_send_qps": run.achieved_rate,
        "seconds": args.seconds,
        "sent": run.sent,
        "statuses": dict(statuses),
        "lost": len(lost),
        "admitted_p50_ms": float(np.percentile(lat, 50)),
        "admitted_p99_ms": float(np.percentile(lat, 99)),
        "admitted_max_ms": float(lat.max()),
        "deadline_ms": args.timeout * 1000,
        "rss_mb": {"baseline": baseline, "peak": peak, "after": after},
        "threads": os.cpu_count(),
    }
    print(json.dumps(figures, indent=2))
    if run.achieved_rate < 0.9 * rate:
        print(
            f"warning: the client sent {run.achieved_rate:.1f}/s of the {rate:.1f}/s offered: it, not the "
            "server, was the limit; use a lower --factor or a load generator such as wrk",
            file=sys.stderr,
        )
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    ok = not lost and set(statuses) <= {200, 429, 504} and lat.max() <= args.timeout * 1000 + 500
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
