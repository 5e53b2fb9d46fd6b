"""SQuAD 1.1 evaluation: the official v1.1 metric's semantics and numbers, and models never answering
"no answer" on it."""

from __future__ import annotations

import json

import pytest

from packer.cli import main
from packer.evaluate import squad1
from tests.conftest import SHARED_DATA

V11 = SHARED_DATA / "squad_v1.1"


def dataset() -> list[dict]:
    context = "The Brooklyn Bridge opened in 1883. John Roebling designed it."
    qas = [
        {"id": "q1", "question": "When did it open?", "answers": [{"text": "1883", "answer_start": 30}]},
        {
            "id": "q2",
            "question": "Who designed it?",
            "answers": [
                {"text": "John Roebling", "answer_start": 36},
                {"text": "Roebling", "answer_start": 41},
            ],
        },
        {
            "id": "q3",
            "question": "What opened?",
            "answers": [{"text": "The Brooklyn Bridge", "answer_start": 0}],
        },
    ]
    return [{"title": "Bridge", "paragraphs": [{"context": context, "qas": qas}]}]


def test_the_v1_metric_semantics():
    # best over the gold answers; articles and punctuation ignored; an unanswered question counts as 0
    metrics = squad1.evaluate(dataset(), {"q1": "in 1883.", "q2": "Roebling"})
    assert metrics["total"] == 3 and metrics["answered"] == 2
    assert metrics["exact_match"] == pytest.approx(100 / 3)  # q2 exact via its second gold answer
    assert metrics["f1"] == pytest.approx(100 * (2 / 3 + 1) / 3)  # q1: P 1/2, R 1 -> F1 2/3
    # an empty prediction is simply wrong (no no-answer credit as in v2)
    assert squad1.evaluate(dataset(), {"q1": "", "q2": "", "q3": ""})["f1"] == 0.0


def test_official_numbers_on_the_reference_predictions(capsys):
    if not V11.is_dir():
        pytest.skip(f"{V11} is absent (../shared/data is not part of the repository)")
    predictions = V11 / "reference_predictions" / "bert-large-ensemble_google.json"
    argv = ["eval", "squad1", "-q", "--data", str(V11 / "dev-v1.1.json"), "--predictions", str(predictions)]
    assert main(argv) == 0
    metrics = json.loads(capsys.readouterr().out)
    # evaluate-v1.1.py on these files: {"exact_match": 86.206..., "f1": 92.196...}
    assert round(metrics["exact_match"], 3) == 86.206 and round(metrics["f1"], 3) == 92.196
    assert metrics["total"] == metrics["answered"] == 10570


def test_a_model_always_answers_on_squad1(bert_qa_packed, tmp_path, capsys):
    data = tmp_path / "v11.json"
    data.write_text(json.dumps({"version": "1.1", "data": dataset()}))
    saved = tmp_path / "pred.json"
    argv = ["eval", "squad1", "-q", "--data", str(data), "--artifact", str(bert_qa_packed)]
    assert main([*argv, "--save-predictions", str(saved), "--max-seq-len", "64"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    predictions = json.loads(saved.read_text())
    assert metrics["answered"] == 3 and all(predictions[q] for q in ("q1", "q2", "q3"))
