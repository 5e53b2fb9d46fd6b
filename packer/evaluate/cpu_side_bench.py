"""The service's CPU side alone (no model): tokenization into windows and post-processing of logits
into answers, as the request handlers run them, in a pool of W threads. Windows/s says whether the CPU
side can feed a GPU (one H100 runs a packed BERT-large at thousands of windows/s).

python -m packer.evaluate.cpu_side_bench --artifact OUT --data dev-v2.0.json [--questions 400]
    [--workers 1,2] [--rounds 5] [--items 8]

Two workloads: the dataset's order (several questions per paragraph, as users ask about one document:
the service's context cache tokenizes each paragraph once) and distinct contexts (one question per
paragraph: the cache cannot help). Every round starts with an empty cache. Logits are random (fixed
seed): post-processing costs the same whatever their values.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from packer.artifact import read_packed_config
from packer.runtime.tasks import qa
from packer.runtime.tokenizer import load_tokenizer


def requests_of(data: str, questions: int, items: int, distinct: bool = False) -> list[list[tuple[str, str]]]:
    squad = json.loads(Path(data).read_text())["data"]
    paragraphs = [p for a in squad for p in a["paragraphs"] if p["qas"]]
    if distinct:
        pairs = [(p["qas"][0]["question"], p["context"]) for p in paragraphs]
    else:
        pairs = [(q["question"], p["context"]) for p in paragraphs for q in p["qas"]]
    pairs = pairs[:questions]
    return [pairs[i : i + items] for i in range(0, len(pairs), items)]


def serve_request(tokenizer, pairs: list[tuple[str, str]], options: qa.QAOptions, seed: int) -> int:
    """What one request costs the handlers: batched windows, then answers from logits."""
    windows = qa.make_windows_batch(tokenizer, pairs, options)
    rng = np.random.default_rng(seed)
    logits = [[(rng.normal(0, 3, w.length).astype(np.float32),) * 2 for w in ws] for ws in windows]
    qa.answer_batch([context for _, context in pairs], windows, logits, options)
    return sum(len(ws) for ws in windows)


def run(artifact: str, data: str, questions: int, items: int, workers: list[int], rounds: int) -> dict:
    from service.settings import Settings

    config = read_packed_config(Path(artifact))
    cache_tokens = Settings().context_cache_tokens
    options = qa.QAOptions()
    figures: dict = {"items_per_request": items, "rounds": rounds, "context_cache_tokens": cache_tokens}
    for workload in ("dataset order", "distinct contexts"):
        requests = requests_of(data, questions, items, distinct=workload == "distinct contexts")
        figures[workload] = {"questions": sum(map(len, requests))}
        for w in workers:
            rates = []
            with ThreadPoolExecutor(w) as pool:
                for _ in range(rounds):
                    tokenizer = load_tokenizer(artifact, config, cache_tokens)  # an empty cache
                    start = time.perf_counter()
                    work = [(tokenizer, pairs, options, seed) for seed, pairs in enumerate(requests)]
                    done = sum(pool.map(lambda job: serve_request(*job), work))
                    rates.append(done / (time.perf_counter() - start))
            figures[workload][f"workers={w}"] = {
                "windows": done,
                "windows_per_s_median": round(statistics.median(rates)),
                "windows_per_s_min": round(min(rates)),
                "windows_per_s_max": round(max(rates)),
            }
    return figures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", required=True, help="a packed artifact (its tokenizer is used)")
    p.add_argument("--data", required=True, help="SQuAD JSON")
    p.add_argument("--questions", type=int, default=400)
    p.add_argument("--items", type=int, default=8, help="questions per request (default: %(default)s)")
    p.add_argument("--workers", default="1,2", help="comma list of pool sizes (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    workers = [int(w) for w in args.workers.split(",")]
    print(
        json.dumps(run(args.artifact, args.data, args.questions, args.items, workers, args.rounds), indent=2)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
