"""Proof that the packed model computes the same function as the (masked) source.

The reference is transformers' own model class loaded with the normalized source weights, so
the check covers the packer's modeling code as well as its slicing and folding.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from packer.artifact import QA
from packer.artifact.config import AFTER_PADDING
from packer.build.checkpoint import Source
from packer.errors import CheckpointError
from packer.runtime.agreement import argmax_agrees
from packer.runtime.samples import QA_PAIRS, SENTENCES

log = logging.getLogger(__name__)


@dataclass
class Equivalence:
    max_abs_diff: float
    random_max_abs_diff: float
    text_max_abs_diff: float
    random_inputs: int
    text_inputs: int
    tolerance: float
    passed: bool

    def to_dict(self) -> dict:
        return asdict(self)


def reference_model(source: Source, attn_implementation: str = "eager") -> nn.Module:
    """transformers' model for the source, holding the normalized (masked, expanded) weights."""
    from transformers import AutoConfig, AutoModelForQuestionAnswering, AutoModelForSequenceClassification

    kwargs = {k: v for k, v in source.raw_config.items() if k not in ("model_type", "transformers_version")}
    kwargs.pop("dtype", None)
    kwargs.pop("torch_dtype", None)
    config = AutoConfig.for_model(source.spec.model_type, **kwargs)
    auto = AutoModelForQuestionAnswering if source.task == QA else AutoModelForSequenceClassification
    model = auto.from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
    result = model.load_state_dict(source.state_dict, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith(("position_ids", "token_type_ids"))]
    if missing:
        raise CheckpointError(f"the checkpoint lacks tensors the model needs: {', '.join(missing[:5])}")
    return model.eval()


def random_batches(source: Source, seed: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    vocab = int(source.config["vocab_size"])
    pad = int(source.config.get("pad_token_id", 0) or 0)
    max_len = int(source.config["max_position_embeddings"]) - (
        pad + 2 if source.spec.positions == AFTER_PADDING else 0
    )
    batches = []
    for batch, seq in ((2, 24), (3, min(61, max_len))):
        ids = torch.randint(0, vocab, (batch, seq), generator=gen)
        ids[ids == pad] = (pad + 1) % vocab
        lengths = torch.randint(seq // 2, seq + 1, (batch,), generator=gen)
        lengths[0] = seq
        mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
        ids = torch.where(mask.bool(), ids, torch.full_like(ids, pad))
        inputs = {"input_ids": ids, "attention_mask": mask}
        if int(source.config.get("type_vocab_size", 0) or 0) > 1:
            inputs["token_type_ids"] = (torch.arange(seq)[None, :] >= seq // 3).long().expand(
                batch, -1
            ) * mask
        batches.append(inputs)
    return batches


def text_batches(tokenizer, source: Source) -> list[dict[str, torch.Tensor]]:
    max_len = min(384, int(source.config["max_position_embeddings"]) - 2)
    if source.task == QA:
        questions, contexts = zip(*QA_PAIRS, strict=True)
        enc = tokenizer(
            list(questions),
            list(contexts),
            padding=True,
            truncation="only_second",
            max_length=max_len,
            return_tensors="pt",
        )
    else:
        enc = tokenizer(SENTENCES, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    if "token_type_ids" in enc and int(source.config.get("type_vocab_size", 0) or 0) > 1:
        inputs["token_type_ids"] = enc["token_type_ids"]
    return [inputs]


def logits(output) -> list[torch.Tensor]:
    if getattr(output, "start_logits", None) is not None:
        return [output.start_logits, output.end_logits]
    return [output.logits]


@torch.inference_mode()
def max_abs_diff(
    reference: nn.Module, packed: nn.Module, batches: list[dict[str, torch.Tensor]], progress: bool = False
) -> float:
    from tqdm.auto import tqdm

    worst = 0.0
    for inputs in tqdm(batches, desc="verifying", unit="batch", disable=not progress, leave=False):
        for a, b in zip(logits(reference(**inputs)), logits(packed(**inputs)), strict=True):
            diff = (a.float() - b.float()).abs().max().item()
            if diff != diff:  # NaN never passes a tolerance
                return float("inf")
            worst = max(worst, diff)
    return worst


def check_equivalence(
    reference: nn.Module,
    packed: nn.Module,
    tokenizer,
    source: Source,
    tolerance: float,
    seed: int = 0,
    progress: bool = False,
) -> Equivalence:
    random_inputs = random_batches(source, seed)
    text_inputs = text_batches(tokenizer, source)
    random_diff = max_abs_diff(reference, packed, random_inputs, progress)
    text_diff = max_abs_diff(reference, packed, text_inputs, progress)
    worst = max(random_diff, text_diff)
    return Equivalence(
        max_abs_diff=worst,
        random_max_abs_diff=random_diff,
        text_max_abs_diff=text_diff,
        random_inputs=sum(b["input_ids"].shape[0] for b in random_inputs),
        text_inputs=sum(b["input_ids"].shape[0] for b in text_inputs),
        tolerance=tolerance,
        passed=worst <= tolerance,
    )


@dataclass
class Agreement:
    """A lower-precision variant against fp32: where it matters (argmax) and overall (correlation)."""

    argmax_agreement: float
    correlation: float
    max_abs_diff: float
    examples: int

    def to_dict(self) -> dict:
        return asdict(self)


def agreement(
    reference: list[list[np.ndarray]], candidate: list[list[np.ndarray]], masks: list[np.ndarray]
) -> Agreement:
    """Per batch, per output (start/end or logits): compare over attended positions only."""
    agree = total = 0
    ref_values, cand_values = [], []
    worst = 0.0
    for ref_outs, cand_outs, mask in zip(reference, candidate, masks, strict=True):
        for ref, cand in zip(ref_outs, cand_outs, strict=True):
            ref, cand = ref.astype(np.float64), cand.astype(np.float64)
            if ref.ndim == 2 and ref.shape == mask.shape:  # token logits: ignore padding
                ref = np.where(mask > 0, ref, -np.inf)
                cand = np.where(mask > 0, cand, -np.inf)
                valid = mask > 0
                ref_values.append(ref[valid])
                cand_values.append(cand[valid])
                worst = max(worst, float(np.abs(ref[valid] - cand[valid]).max()))
            else:
                ref_values.append(ref.ravel())
                cand_values.append(cand.ravel())
                worst = max(worst, float(np.abs(ref - cand).max()))
            agree += int(argmax_agrees(ref, cand).sum())
            total += ref.shape[0]
    a, b = np.concatenate(ref_values), np.concatenate(cand_values)
    corr = float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else float(np.allclose(a, b))
    examples = sum(m.shape[0] for m in masks)
    return Agreement(round(agree / max(total, 1), 6), round(corr, 6), worst, examples)
