"""The task loss and the distillation loss, for QA (start/end over positions) and classification."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from packer.artifact import QA


def outputs_of(output, task: str, mask: torch.Tensor) -> list[torch.Tensor]:
    """Start and end logits with padding masked out (QA), or the class logits."""
    if task != QA:
        return [output.logits.float()]
    pad = ~mask.bool()
    return [
        output.start_logits.float().masked_fill(pad, -1e4),
        output.end_logits.float().masked_fill(pad, -1e4),
    ]


def task_loss(logits: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against the gold start and end (QA) or class."""
    return sum(F.cross_entropy(x, labels[:, i]) for i, x in enumerate(logits)) / len(logits)


def distill_loss(
    student: list[torch.Tensor], teacher: list[torch.Tensor], temperature: float
) -> torch.Tensor:
    """KL(teacher || student) on softened distributions, scaled by T^2 (Hinton et al.)."""
    t = temperature
    total = sum(
        F.kl_div(
            F.log_softmax(s / t, dim=-1), F.log_softmax(q / t, dim=-1), log_target=True, reduction="batchmean"
        )
        for s, q in zip(student, teacher, strict=True)
    )
    return total * t * t / len(student)
