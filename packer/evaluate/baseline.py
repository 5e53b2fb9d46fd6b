"""What users write today, for the benchmark: a plain FastAPI app that runs the unpacked source
model with transformers once per request (no batching across requests), then the standard SQuAD
post-processing. transformers 5 has no question-answering pipeline, so this is written out plainly.

Run: PRUNE_SERVE_BASELINE_SOURCE=DIR uvicorn packer.evaluate.baseline:app
"""

from __future__ import annotations

import os

import numpy as np
import torch
from fastapi import FastAPI
from pydantic import BaseModel
from transformers import AutoModelForQuestionAnswering, AutoTokenizer

from packer.runtime.tasks import qa

SOURCE = os.environ.get("PRUNE_SERVE_BASELINE_SOURCE", "")
torch.set_num_threads(int(os.environ.get("PRUNE_SERVE_THREADS", os.cpu_count() or 1)))
tokenizer = AutoTokenizer.from_pretrained(SOURCE) if SOURCE else None
model = AutoModelForQuestionAnswering.from_pretrained(SOURCE).eval() if SOURCE else None
app = FastAPI()


class Question(BaseModel):
    question: str
    context: str


@app.post("/qa")
def answer(body: Question) -> dict:
    options = qa.QAOptions()
    windows = qa.make_windows(tokenizer, body.question, body.context, options)
    longest = max(w.length for w in windows)
    ids = torch.zeros((len(windows), longest), dtype=torch.long)
    mask = torch.zeros_like(ids)
    types = torch.zeros_like(ids)
    for row, w in enumerate(windows):
        ids[row, : w.length] = torch.from_numpy(w.input_ids)
        mask[row, : w.length] = 1
        if w.token_type_ids is not None:
            types[row, : w.length] = torch.from_numpy(w.token_type_ids)
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask, token_type_ids=types)
    logits = [(np.asarray(s), np.asarray(e)) for s, e in zip(out.start_logits, out.end_logits, strict=True)]
    result = qa.answer(body.context, windows, logits, options)
    best = result.answers[0]
    return {"answer": best.answer, "score": best.score, "start": best.start, "end": best.end}
