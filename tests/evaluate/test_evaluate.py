"""The SQuAD v2 metric against the official script, eval paths (in process, over HTTP, source), report."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest

from packer.cli import main
from packer.evaluate import squad
from packer.runtime.samples import QA_PAIRS
from tests.conftest import SHARED_DATA
from tests.serving import Server

SQUAD = SHARED_DATA / "squad_v2"
needs_squad = pytest.mark.skipif(
    not (SQUAD / "dev-v2.0.json").is_file(), reason=f"SQuAD v2 dev not present at {SQUAD} (see SOURCES.md)"
)
REFERENCES = ["bert-large-single_google.json", "nlnet-single_msra.json", "bidaf-selfatt-elmo-single.json"]


def official(pred_file, na_file=None) -> dict:
    cmd = [sys.executable, str(SQUAD / "evaluate-v2.0.py"), str(SQUAD / "dev-v2.0.json"), str(pred_file)]
    if na_file:
        cmd += ["-n", str(na_file)]
    return json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)


@needs_squad
@pytest.mark.parametrize("reference", REFERENCES)
def test_metric_equals_the_official_script(reference, tmp_path, capsys):
    pred_file = SQUAD / "reference_predictions" / reference
    out = tmp_path / "metrics.json"
    assert (
        main(
            [
                "eval",
                "squad2",
                "-q",
                "--data",
                str(SQUAD / "dev-v2.0.json"),
                "--predictions",
                str(pred_file),
                "--output",
                str(out),
            ]
        )
        == 0
    )
    ours = json.loads(out.read_text())
    assert ours == official(pred_file)
    assert list(ours) == list(official(pred_file))
    if reference.startswith("bert-large"):
        assert round(ours["exact"], 3) == 78.742 and round(ours["f1"], 3) == 81.775
    # With null scores the best thresholds are searched the SQuAD v2 way.
    preds = json.loads(pred_file.read_text())
    rng = random.Random(reference)
    na = {qid: (rng.random() * 3 if answer else rng.random() * 3 + 1) for qid, answer in preds.items()}
    (tmp_path / "na.json").write_text(json.dumps(na))
    data = json.loads((SQUAD / "dev-v2.0.json").read_text())["data"]
    assert squad.evaluate(data, preds, na) == official(pred_file, tmp_path / "na.json")


def test_normalization_and_f1():
    assert squad.normalize_answer("The  Quick, brown fox!") == "quick brown fox"
    assert squad.exact("an apple", "Apple.") == 1
    assert squad.f1("the cat sat", "cat sat down") == pytest.approx(0.8)
    assert squad.f1("", "") == 1.0 and squad.f1("", "something") == 0.0


def test_best_threshold_on_a_toy_set():
    data = [
        {
            "title": "t",
            "paragraphs": [
                {
                    "context": "x",
                    "qas": [
                        {"id": "a", "answers": [{"text": "yes", "answer_start": 0}]},
                        {"id": "b", "answers": []},
                    ],
                }
            ],
        }
    ]
    metrics = squad.evaluate(data, {"a": "yes", "b": "no"}, {"a": 0.2, "b": 0.7})
    assert metrics["exact"] == 50.0  # threshold 1.0 keeps both answers: b is wrong
    assert metrics["best_exact"] == 100.0 and metrics["best_exact_thresh"] == 0.2
    assert metrics["HasAns_total"] == 1 and metrics["NoAns_total"] == 1


def squad_file(tmp_path, n_questions=12):
    """A small SQuAD-format file from the built-in texts (no dataset needed)."""
    qas = []
    for i in range(n_questions):
        q, c = QA_PAIRS[i % len(QA_PAIRS)]
        qas.append(
            {
                "context": c,
                "qas": [
                    {
                        "question": q,
                        "id": f"q{i}",
                        "answers": (
                            [{"text": c.split()[3], "answer_start": c.index(c.split()[3])}] if i % 3 else []
                        ),
                    }
                ],
            }
        )
    path = tmp_path / "mini-squad.json"
    path.write_text(json.dumps({"version": "v2.0", "data": [{"title": "Mini", "paragraphs": qas}]}))
    return path


def eval_json(capsys, argv) -> dict:
    assert main(argv) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_service_and_in_process_give_the_same_predictions(models_dir, tmp_path, capsys):
    data = SQUAD / "dev-v2.0.json" if (SQUAD / "dev-v2.0.json").is_file() else squad_file(tmp_path, 50)
    common = ["--data", str(data), "--limit", "50", "--max-seq-len", "128", "--doc-stride", "32"]
    local = eval_json(
        capsys,
        [
            "eval",
            "squad2",
            "-q",
            *common,
            "--artifact",
            str(models_dir / "qa-torch"),
            "--save-predictions",
            str(tmp_path / "local.json"),
        ],
    )
    srv = Server(models_dir, tmp_path / "serve.log")
    try:
        remote = eval_json(
            capsys,
            [
                "eval",
                "squad2",
                "-q",
                *common,
                "--url",
                srv.url,
                "--model",
                "qa-torch",
                "--save-predictions",
                str(tmp_path / "remote.json"),
            ],
        )
    finally:
        srv.stop()
    assert json.loads((tmp_path / "local.json").read_text()) == json.loads(
        (tmp_path / "remote.json").read_text()
    )
    local_na = json.loads((tmp_path / "local.na_probs.json").read_text())
    remote_na = json.loads((tmp_path / "remote.na_probs.json").read_text())
    assert local_na.keys() == remote_na.keys() and len(local_na) == 50
    assert max(abs(local_na[k] - remote_na[k]) for k in local_na) < 1e-4
    assert local["total"] == remote["total"] == 50
    assert local["f1"] == pytest.approx(remote["f1"])


def test_report_table_and_chart(bert_qa_src, bert_onnx, tmp_path, capsys):
    data = squad_file(tmp_path)
    out = tmp_path / "report"
    assert (
        main(
            [
                "report",
                "squad2",
                "-q",
                "--data",
                str(data),
                "--source",
                str(bert_qa_src),
                "--artifact",
                str(bert_onnx),
                "--variants",
                "torch,onnx-int8",
                "--out",
                str(out),
                "--threads",
                "1",
                "--max-seq-len",
                "128",
                "--doc-stride",
                "32",
            ]
        )
        == 0
    )
    table = (out / "report.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [r.split("|")[1].strip() for r in rows] == [
        "source",
        "bert-qa-onnx torch",
        "bert-qa-onnx onnx-int8",
    ]
    assert "transformers-cpu-fp32" in rows[0] and "ort-cpu-int8" in rows[2]
    assert "1.00x" in rows[0] and "Machine:" in table
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    data_rows = json.loads((out / "report.json").read_text())
    assert data_rows[1]["params"] < data_rows[0]["params"]


def test_report_flags_a_collapsed_model_that_f1_ranks_best(tmp_path):
    """The issue's case: a pruned model answering "no answer" everywhere gains F1 on a set that is half
    unanswerable; the table and chart must say its HasAns F1 collapsed."""
    from packer.evaluate.report import Row, render_chart, render_markdown

    source = Row(
        "source", "transformers-cpu-fp32", 45.65, 42.6, 50.3, 10.0, 100, 22_000_000, 90_000_000, 50.1, 41.5
    )
    healthy = Row(
        "pruned torch",
        "torch-cpu-fp32",
        44.9,
        41.0,
        49.1,
        6.0,
        100,
        15_000_000,
        60_000_000,
        47.8,
        42.3,
        "pruned",
        "torch",
    )
    broken = Row(
        "gated onnx-int8",
        "ort-cpu-int8",
        47.3,
        47.3,
        47.3,
        3.0,
        100,
        11_000_000,
        12_000_000,
        0.0,
        100.0,
        "gated",
        "onnx-int8",
    )
    table = render_markdown([source, healthy, broken], "squad2", "settings")
    lines = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    assert "HasAns collapsed" in lines["gated onnx-int8"] and "HasAns collapsed" not in lines["pruned torch"]
    assert "| 0.00 | 100.00 |" in lines["gated onnx-int8"]  # HasAns F1 and NoAns shown beside F1
    assert "**Warning:** HasAns F1 collapsed" in table and "gated onnx-int8" in table.split("**Warning:**")[1]
    chart = render_chart([source, healthy, broken], "squad2", tmp_path / "r.png", "settings", "title")
    assert chart.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.skipif(
    not (SHARED_DATA / "models" / "minilm-l6-sst2").is_dir(), reason="real SST-2 model absent"
)
def test_sst2_real_model_reference_accuracy(capsys):
    metrics = eval_json(
        capsys,
        [
            "eval",
            "sst2",
            "-q",
            "--data",
            str(SHARED_DATA / "sst2" / "dev.tsv"),
            "--source",
            str(SHARED_DATA / "models" / "minilm-l6-sst2"),
            "--rows",
            "601-872",
        ],
    )
    assert metrics["total"] == 272 and round(metrics["accuracy"], 2) == 84.19


def test_eval_needs_exactly_one_target(tmp_path, capsys):
    data = squad_file(tmp_path)
    assert main(["eval", "squad2", "-q", "--data", str(data)]) == 2
    assert "exactly one of" in capsys.readouterr().err
    assert main(["eval", "squad2", "-q", "--data", str(data), "--url", "http://127.0.0.1:9"]) == 2
    assert "--model" in capsys.readouterr().err


def test_cpu_side_benchmark_counts_the_same_windows_in_threads_and_processes(bert_qa_packed, tmp_path):
    from packer.evaluate import cpu_side_bench
    from packer.runtime.samples import QA_PAIRS

    paragraphs = [{"context": c, "qas": [{"question": q, "id": str(i)}]} for i, (q, c) in enumerate(QA_PAIRS)]
    data = tmp_path / "squad.json"
    data.write_text(json.dumps({"data": [{"title": "t", "paragraphs": paragraphs * 3}]}))
    figures = cpu_side_bench.run(str(bert_qa_packed), str(data), 100, 4, ["threads", "processes"], [1, 2], 1)
    for workload in ("dataset order", "distinct contexts"):
        runs = [v for k, v in figures[workload].items() if "=" in k]
        assert len(runs) == 4 and len({r["windows"] for r in runs}) == 1 and runs[0]["windows"] >= 4
        assert all(
            0 < r["windows_per_s_min"] <= r["windows_per_s_median"] <= r["windows_per_s_max"] for r in runs
        )
