"""Compressed storage for unstructured-sparse weights (Prune-OFA style): CSR tensors in safetensors.

A matrix at or below the density threshold is stored as three tensors, `NAME.__csr_values`,
`NAME.__csr_col` (int16 where the width allows) and `NAME.__csr_crow`, with its shape in the file's
metadata. Zeros are detected bitwise, so -0.0 is kept and the round trip is bit-identical.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

META_KEY = "prune_serve.sparse"
SUFFIXES = (".__csr_values", ".__csr_col", ".__csr_crow")


def _bit_nonzero(t: torch.Tensor) -> torch.Tensor:
    view = {4: torch.int32, 2: torch.int16, 8: torch.int64}[t.element_size()]
    return t.contiguous().view(view) != 0


def to_csr(t: torch.Tensor) -> dict[str, torch.Tensor]:
    nonzero = _bit_nonzero(t)
    rows, cols = t.shape
    crow = torch.zeros(rows + 1, dtype=torch.int64)
    crow[1:] = torch.cumsum(nonzero.sum(dim=1), dim=0)
    col = nonzero.nonzero()[:, 1]
    return {
        "values": t[nonzero].contiguous(),
        "col": col.to(torch.int16 if cols <= torch.iinfo(torch.int16).max else torch.int32),
        "crow": crow.to(torch.int32 if int(crow[-1]) <= torch.iinfo(torch.int32).max else torch.int64),
    }


def from_csr(values: torch.Tensor, col: torch.Tensor, crow: torch.Tensor, shape: list[int]) -> torch.Tensor:
    dense = torch.zeros(shape, dtype=values.dtype)
    rows = torch.repeat_interleave(torch.arange(shape[0]), crow[1:].long() - crow[:-1].long())
    dense[rows, col.long()] = values
    return dense


def save(tensors: dict[str, torch.Tensor], file: Path, sparse: bool, threshold: float = 0.5) -> dict:
    from safetensors.torch import save_file

    stored: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}
    dense_bytes = 0
    for name, t in tensors.items():
        dense_bytes += t.numel() * t.element_size()
        if sparse and t.ndim == 2 and t.numel() and float(_bit_nonzero(t).float().mean()) <= threshold:
            parts = to_csr(t)
            for suffix, key in zip(SUFFIXES, ("values", "col", "crow"), strict=True):
                stored[name + suffix] = parts[key]
            shapes[name] = list(t.shape)
        else:
            stored[name] = t.contiguous()
    save_file(stored, str(file), metadata={META_KEY: json.dumps(shapes)} if shapes else None)
    return {
        "sparse_storage": sparse,
        "sparse_tensors": len(shapes),
        "dense_bytes": dense_bytes,
        "stored_bytes": file.stat().st_size,
    }


def load(file: Path) -> dict[str, torch.Tensor]:
    """Dense tensors back, whichever way they were stored."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        shapes = json.loads((f.metadata() or {}).get(META_KEY, "{}"))
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is no dict
    for name, shape in shapes.items():
        try:
            parts = [tensors.pop(name + suffix) for suffix in SUFFIXES]
        except KeyError as exc:
            raise ValueError(f"sparse tensor {name}: missing part {exc.args[0]}") from None
        tensors[name] = from_csr(*parts, shape)
    return tensors
