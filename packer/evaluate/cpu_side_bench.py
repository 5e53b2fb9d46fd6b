"""The service's CPU side alone (no model): tokenization into windows and post-processing of logits
into answers, through the service's own CPU pool (service/cpu_pool.py) with W threads or W worker
processes, requests in flight at once as a busy server has them. Windows/s says whether the CPU side can
feed a GPU (one H100 runs a packed BERT-large at thousands of windows/s).

python -m packer.evaluate.cpu_side_bench --artifact OUT --data dev-v2.0.json [--questions 400]
    [--pools threads,processes] [--workers 1,2] [--rounds 5] [--items 8]

Two workloads: the dataset's order (several questions per paragraph, as users ask about one document:
the context cache tokenizes each paragraph once per worker) and distinct contexts (one question per
paragraph: the cache cannot help). Every round starts with empty caches. Logits are random (fixed
seed), views into one buffer as the inference worker hands over views into a batch's output:
post-processing costs the same whatever their values.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

import numpy as np

from packer.artifact import read_packed_config
from packer.runtime.tasks import qa
from packer.runtime.tokenizer import TextTokenizer, load_tokenizer


def requests_of(data: str, questions: int, items: int, distinct: bool = False) -> list[list[tuple[str, str]]]:
    squad = json.loads(Path(data).read_text())["data"]
    paragraphs = [p for a in squad for p in a["paragraphs"] if p["qas"]]
    if distinct:
        pairs = [(p["qas"][0]["question"], p["context"]) for p in paragraphs]
    else:
        pairs = [(q["question"], p["context"]) for p in paragraphs for q in p["qas"]]
    pairs = pairs[:questions]
    return [pairs[i : i + items] for i in range(0, len(pairs), items)]


# Logits as the inference worker hands them over: views into a batch's output, not fresh arrays (drawing
# random numbers for every window cost the server process ~35 us per window: the benchmark's own cost).
_LOGITS = np.random.default_rng(0).normal(0, 3, 1 << 20).astype(np.float32)


def random_logits(windows: list[list], seed: int) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    rng = np.random.default_rng(seed)
    at = iter(rng.integers(0, len(_LOGITS) // 2, sum(map(len, windows)) * 2).tolist())
    return [
        [(_LOGITS[(a := next(at)) : a + w.length], _LOGITS[(b := next(at)) : b + w.length]) for w in ws]
        for ws in windows
    ]


async def _round(pool, key: str, tokenizer: TextTokenizer, requests, options: qa.QAOptions) -> int:
    in_flight = asyncio.Semaphore(4 * pool.workers)  # a busy server: every worker has work queued

    async def one(seed: int, pairs: list[tuple[str, str]]) -> int:
        async with in_flight:
            prepared = await pool.prepare_qa(key, tokenizer, pairs, options)
            logits = random_logits(prepared.inputs, seed)
            await pool.answer_qa(prepared, [context for _, context in pairs], logits, options)
            return sum(len(ws) for ws in prepared.inputs)

    return sum(await asyncio.gather(*(one(seed, pairs) for seed, pairs in enumerate(requests))))


def measure(artifact: str, requests, kind: str, workers: int, rounds: int, cache_tokens: int) -> dict:
    from service.cpu_pool import make_pool

    config = read_packed_config(Path(artifact))
    options = qa.QAOptions()
    pool = make_pool(kind, workers, max_windows=8192)
    try:
        rates = []
        for r in range(rounds + 1):  # round 0 warms the workers up (imports, first calls); not counted
            tokenizer = load_tokenizer(artifact, config, cache_tokens)  # empty caches
            pool.install(f"round-{r}", tokenizer)
            pool.settle()
            start = time.perf_counter()
            done = asyncio.run(_round(pool, f"round-{r}", tokenizer, requests, options))
            if r:
                rates.append(done / (time.perf_counter() - start))
            pool.retire(f"round-{r}")
    finally:
        pool.shutdown()
    return {
        "windows": done,
        "windows_per_s_median": round(statistics.median(rates)),
        "windows_per_s_min": round(min(rates)),
        "windows_per_s_max": round(max(rates)),
    }


def run(
    artifact: str, data: str, questions: int, items: int, pools: list[str], workers: list[int], rounds: int
):
    from service.settings import Settings

    cache_tokens = Settings().context_cache_tokens
    figures: dict = {"items_per_request": items, "rounds": rounds, "context_cache_tokens": cache_tokens}
    for workload in ("dataset order", "distinct contexts"):
        requests = requests_of(data, questions, items, distinct=workload == "distinct contexts")
        figures[workload] = {"questions": sum(map(len, requests))}
        for kind in pools:
            for w in workers:
                figures[workload][f"{kind}={w}"] = measure(artifact, requests, kind, w, rounds, cache_tokens)
    return figures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", required=True, help="a packed artifact (its tokenizer is used)")
    p.add_argument("--data", required=True, help="SQuAD JSON")
    p.add_argument("--questions", type=int, default=400)
    p.add_argument("--items", type=int, default=8, help="questions per request (default: %(default)s)")
    p.add_argument("--pools", default="threads,processes", help="comma list (default: %(default)s)")
    p.add_argument("--workers", default="1,2", help="comma list of pool sizes (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    workers = [int(w) for w in args.workers.split(",")]
    pools = args.pools.split(",")
    if not set(pools) <= {"threads", "processes"}:
        p.error(f"--pools: threads and/or processes, not {args.pools!r}")
    figures = run(args.artifact, args.data, args.questions, args.items, pools, workers, args.rounds)
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
