"""Head-of-line benchmark: a short request's latency while a ~1 MB request is being answered.

A real prune-serve on loopback; one request of 64 items x 14.5k characters of SQuAD contexts (~936 KB,
~750 windows at the defaults) is sent, and 1.5, 4 and 8 s later a one-window question to the same model
and a classification to another model. Two rounds; prints median and range of the short latencies.

python -m packer.evaluate.fairness_bench --models-dir DIR --qa MODEL --classify MODEL --data dev-v2.0.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from packer.evaluate.service_bench import wait_ready

TINY_QA = {"question": "Who wrote it?", "context": "Ada Lovelace wrote the first program."}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def big_body(data: Path, items: int = 64, chars: int = 14_500) -> dict:
    squad = json.loads(data.read_text())
    text = " ".join(p["context"] for a in squad["data"] for p in a["paragraphs"])
    return {
        "items": [
            {"question": "What happened?", "context": text[i * chars : (i + 1) * chars]} for i in range(items)
        ]
    }


async def rounds(url: str, qa: str, classify: str, body: dict, count: int) -> dict[str, list[float]]:
    latencies: dict[str, list[float]] = {"qa": [], "classify": []}
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        for _ in range(count):
            t0 = time.perf_counter()
            big = asyncio.ensure_future(http.post(f"/v1/models/{qa}/qa", json=body))

            async def short(delay: float, kind: str, t0: float = t0) -> None:
                await asyncio.sleep(max(0.0, t0 + delay - time.perf_counter()))
                start = time.perf_counter()
                if kind == "qa":
                    r = await http.post(f"/v1/models/{qa}/qa", json=TINY_QA)
                else:
                    r = await http.post(f"/v1/models/{classify}/classify", json={"text": "a moving film"})
                r.raise_for_status()
                latencies[kind].append(time.perf_counter() - start)

            await asyncio.gather(*[short(d, k) for d in (1.5, 4.0, 8.0) for k in ("qa", "classify")])
            reply = await big
            print(f"big request: {reply.status_code} after {time.perf_counter() - t0:.1f} s")
    return latencies


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models-dir", required=True, help="artifacts to serve")
    p.add_argument("--qa", required=True, help="the QA model's name (gets the big request)")
    p.add_argument("--classify", required=True, help="a classification model's name")
    p.add_argument("--data", required=True, help="SQuAD JSON whose contexts make the big request")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)

    body = big_body(Path(args.data))
    print(f"big request: {len(json.dumps(body))} bytes, {len(body['items'])} items")
    port = free_port()
    env = dict(os.environ, PRUNE_SERVE_MODELS_DIR=args.models_dir, PRUNE_SERVE_MAX_WINDOWS_PER_REQUEST="2000")
    cmd = [sys.executable, "-m", "service.cli", "--port", str(port), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc)
        latencies = asyncio.run(rounds(url, args.qa, args.classify, body, args.rounds))
    finally:
        proc.terminate()
        proc.wait(60)
    for kind, values in latencies.items():
        v = np.array(values)
        print(
            f"short {kind} behind the big request: median {np.median(v):.2f} s "
            f"[{v.min():.2f}-{v.max():.2f}] over {len(v)}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
