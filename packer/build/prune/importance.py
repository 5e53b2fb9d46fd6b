"""How much each head and FFN dim matters: weight magnitude, Gain (Michel et al.), or L0 gates.

- magnitude: product of the norms of a unit's input and output weights; no data (the cheap baseline);
- gain: |d loss / d gate| summed over batches, gates at one (one pass, the task loss);
- l0: hard-concrete gates trained against the dense model's outputs (distillation) under a FLOP
  penalty, every other weight frozen (McCarley section 3); the score is each gate's log-alpha.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from packer.build.prune.gates import Cost, GateHooks, HardConcrete
from packer.build.prune.losses import distill_loss, outputs_of, task_loss


@dataclass
class Importance:
    method: str
    heads: torch.Tensor  # (layers, heads): higher means keep
    ffn: torch.Tensor  # (layers, intermediate)
    steps: int = 0
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def model_inputs(batch: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items() if k != "labels"}


def gain(
    model: nn.Module,
    hooks: GateHooks,
    batches: Iterator[dict],
    steps: int,
    task: str,
    device: str,
    progress: Callable,
) -> Importance:
    start = time.perf_counter()
    model.eval()
    hooks.head = torch.ones_like(hooks.head, device=device, requires_grad=True)
    hooks.ffn = torch.ones_like(hooks.ffn, device=device, requires_grad=True)
    heads, ffn = torch.zeros_like(hooks.head), torch.zeros_like(hooks.ffn)
    losses = []
    for _ in progress(range(steps), "gain"):
        batch = next(batches)
        logits = outputs_of(model(**model_inputs(batch, device)), task, batch["attention_mask"].to(device))
        loss = task_loss(logits, batch["labels"].to(device))
        g_heads, g_ffn = torch.autograd.grad(loss, [hooks.head, hooks.ffn])
        heads += g_heads.abs().detach()
        ffn += g_ffn.abs().detach()
        losses.append(loss.item())
    hooks.head, hooks.ffn = torch.ones_like(heads), torch.ones_like(ffn)
    return Importance("gain", heads.cpu(), ffn.cpu(), steps, losses, time.perf_counter() - start)


def l0(
    model: nn.Module,
    hooks: GateHooks,
    batches: Iterator[dict],
    steps: int,
    task: str,
    device: str,
    cost: Cost,
    target_ratio: float,
    progress: Callable,
    lr: float = 0.05,
    penalty: float = 20.0,
    temperature: float = 2.0,
) -> Importance:
    start = time.perf_counter()
    model.eval()  # no dropout: the gates alone explain the change in outputs
    for p in model.parameters():
        p.requires_grad_(False)
    head_gates = HardConcrete(tuple(hooks.head.shape)).to(device)
    ffn_gates = HardConcrete(tuple(hooks.ffn.shape)).to(device)
    optimizer = torch.optim.Adam([head_gates.log_alpha, ffn_gates.log_alpha], lr=lr)
    target = 1.0 / target_ratio
    losses = []
    bar = progress(range(steps), "l0 gates")
    for _ in bar:
        batch = next(batches)
        inputs, mask = model_inputs(batch, device), batch["attention_mask"].to(device)
        with torch.no_grad():
            hooks.head, hooks.ffn = torch.ones_like(hooks.head), torch.ones_like(hooks.ffn)
            teacher = outputs_of(model(**inputs), task, mask)
        hooks.head, hooks.ffn = head_gates(), ffn_gates()
        student = outputs_of(model(**inputs), task, mask)
        expected = cost.of(head_gates.open_probability(), ffn_gates.open_probability()) / cost.full
        loss = distill_loss(student, teacher, temperature) + penalty * (expected - target).clamp(min=0) ** 2
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{losses[-1]:.3f}", kept=f"{float(expected):.2f}")
    hooks.head, hooks.ffn = torch.ones_like(hooks.head), torch.ones_like(hooks.ffn)
    for p in model.parameters():
        p.requires_grad_(True)
    return Importance(
        "l0",
        head_gates.log_alpha.detach().cpu(),
        ffn_gates.log_alpha.detach().cpu(),
        steps,
        losses,
        time.perf_counter() - start,
    )
