"""Recovery: continue training the pruned model with the dense one as teacher (McCarley section 4).

Loss: alpha * KL(teacher || student) at temperature T (T^2-scaled) + (1 - alpha) * the task loss.
AdamW, linear warm-up over the first 10% then linear decay, gradient clipping at 1. Pruned weights are
zero before the first step and set to exactly zero again after every step, so the output packs the
same structure the selection chose.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from packer.build.arch import ArchSpec
from packer.build.prune.importance import model_inputs
from packer.build.prune.losses import distill_loss, outputs_of, task_loss
from packer.build.prune.select import Structure


@dataclass
class Recovery:
    steps: int
    seconds: float
    lr: float
    batch_size: int
    alpha: float
    temperature: float
    first_loss: float | None = None  # mean loss over the first 10% of steps
    last_loss: float | None = None  # and over the last 10%
    losses: list[float] = field(default_factory=list)  # every step's loss

    def to_dict(self) -> dict:
        data = asdict(self)
        data["losses"] = [round(x, 5) for x in self.losses]
        return data


def pruned_slices(model: nn.Module, spec: ArchSpec, structure: Structure, head_dim: int) -> list:
    """(parameter, keep mask) for every tensor a pruned head or FFN dim touches."""
    keep = []
    for i in range(structure.heads.shape[0]):
        rows = structure.heads[i].repeat_interleave(head_dim).bool()
        for part in ("query", "key", "value"):
            module = model.get_submodule(spec.layer(i, part))
            keep += [(module.weight, rows[:, None]), (module.bias, rows)]
        keep.append((model.get_submodule(spec.layer(i, "attn_out")).weight, rows[None, :]))
        dims = structure.ffn[i].bool()
        ffn_in = model.get_submodule(spec.layer(i, "ffn_in"))
        keep += [(ffn_in.weight, dims[:, None]), (ffn_in.bias, dims)]
        keep.append((model.get_submodule(spec.layer(i, "ffn_out")).weight, dims[None, :]))
    return keep


@torch.no_grad()
def apply_zeros(slices: list) -> None:
    for param, mask in slices:
        param.mul_(mask.to(param.device, param.dtype))  # a no-op conversion once recover() prepared them


def recover(
    student: nn.Module,
    teacher: nn.Module,
    slices: list,
    batches: Iterator[dict],
    task: str,
    device: str,
    steps: int | None,
    time_budget: float | None,
    progress: Callable,
    lr: float = 5e-5,
    batch_size: int = 16,
    alpha: float = 0.9,
    temperature: float = 2.0,
) -> Recovery:
    """Train until `steps` or `time_budget` seconds, whichever comes first."""
    if not steps and not time_budget:
        raise ValueError("recovery needs --steps or --time-budget")
    student.to(device).train()
    teacher.to(device).eval()
    # Masks on the parameters' device and dtype once, not at every step.
    slices = [(param, mask.to(param.device, param.dtype)) for param, mask in slices]
    apply_zeros(slices)
    optimizer = torch.optim.AdamW(
        [p for p in student.parameters() if p.requires_grad], lr=lr, weight_decay=0.01
    )
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.startswith("cuda")
        else contextlib.nullcontext()
    )
    start = time.perf_counter()
    losses: list[float] = []
    bar = progress(range(steps) if steps else itertools.count(), "recovery")  # a budget: no total
    for step in bar:
        elapsed = time.perf_counter() - start
        done = max(step / steps if steps else 0.0, elapsed / time_budget if time_budget else 0.0)
        if done >= 1:
            break
        factor = done / 0.1 if done < 0.1 else (1 - done) / 0.9
        for group in optimizer.param_groups:
            group["lr"] = lr * max(factor, 0.0)
        batch = next(batches)
        inputs, mask, labels = (
            model_inputs(batch, device),
            batch["attention_mask"].to(device),
            batch["labels"].to(device),
        )
        with autocast:
            with torch.no_grad():
                target = outputs_of(teacher(**inputs), task, mask)
            logits = outputs_of(student(**inputs), task, mask)
            loss = alpha * distill_loss(logits, target, temperature) + (1 - alpha) * task_loss(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        apply_zeros(slices)
        losses.append(loss.item())
        if hasattr(bar, "set_postfix"):
            left = (time_budget - elapsed) if time_budget else float("nan")
            bar.set_postfix(loss=f"{losses[-1]:.3f}", left=f"{left:.0f}s" if time_budget else "")
    student.eval()
    tenth = max(1, len(losses) // 10)
    return Recovery(
        steps=len(losses),
        seconds=round(time.perf_counter() - start, 1),
        lr=lr,
        batch_size=batch_size,
        alpha=alpha,
        temperature=temperature,
        first_loss=round(sum(losses[:tenth]) / tenth, 5) if losses else None,
        last_loss=round(sum(losses[-tenth:]) / tenth, 5) if losses else None,
        losses=losses,
    )
