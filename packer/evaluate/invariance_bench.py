"""Same input, same answer: SQuAD v2 questions asked alone, then in one `items` request beside a
20k-character context, through a real prune-serve; counts changed answers / is_impossible.

python -m packer.evaluate.invariance_bench --models-dir DIR --model QA_MODEL --data dev-v2.0.json
    [--articles Rhine,Warsaw,...] [--questions 48]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx

from packer.evaluate.fairness_bench import free_port
from packer.evaluate.service_bench import wait_ready


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models-dir", required=True, help="artifacts to serve")
    p.add_argument("--model", required=True, help="the QA model's name")
    p.add_argument("--data", required=True, help="SQuAD v2 JSON")
    p.add_argument("--articles", help="comma-separated titles to take the questions from (e.g. held-out)")
    p.add_argument("--questions", type=int, default=48, help="how many (default: %(default)s)")
    args = p.parse_args(argv)

    squad = json.loads(Path(args.data).read_text())
    chosen = set(args.articles.split(",")) if args.articles else None
    asked = [
        (qa["question"], para["context"])
        for article in squad["data"]
        if chosen is None or article["title"] in chosen
        for para in article["paragraphs"]
        for qa in para["qas"]
    ][: args.questions]
    other = " ".join(
        para["context"]
        for article in squad["data"]
        if chosen is None or article["title"] not in chosen
        for para in article["paragraphs"]
    )[-20_000:]
    port = free_port()
    env = dict(os.environ, PRUNE_SERVE_MODELS_DIR=args.models_dir, PRUNE_SERVE_DEVICE="cpu")
    cmd = [sys.executable, "-m", "service.cli", "--port", str(port), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env)
    url, path = f"http://127.0.0.1:{port}", f"/v1/models/{args.model}/qa"

    def key(result: dict) -> tuple[str, bool]:
        return (result["answers"][0]["answer"] if result["answers"] else "", result["is_impossible"])

    try:
        wait_ready(url, proc)
        changed, worst = 0, 0.0
        with httpx.Client(base_url=url, timeout=120) as http:
            alone = [
                http.post(path, json={"question": q, "context": c}).json()["results"][0] for q, c in asked
            ]
            for i in range(0, len(asked), 8):
                items = [{"question": "What is it about?", "context": other}]
                items += [{"question": q, "context": c} for q, c in asked[i : i + 8]]
                mixed = http.post(path, json={"items": items}).json()["results"][1:]
                for a, b in zip(alone[i : i + 8], mixed, strict=True):
                    changed += key(a) != key(b)
                    worst = max(worst, abs(a["null_score_diff"] - b["null_score_diff"]))
    finally:
        proc.terminate()
        proc.wait(60)
    print(
        f"{changed}/{len(asked)} changed their top answer or is_impossible beside a 20k-character context; "
        f"max |change of null_score_diff| {worst:.3g}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
