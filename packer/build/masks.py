"""McCarley-style gates: read a masks file and apply it to a full-size state dict.

Format (JSON): {"heads": {"<layer>": [g, ...]}, "ffn": {"<layer>": [g, ...]}}, one 0/1 gate per
head and per FFN dim; layers not named keep everything. A gate multiplies the head's output
before the attention output projection, and the FFN activation before the second linear, so
gate 0 removes the whole contribution (bias included): it is applied by zeroing that head's
columns of the attention output weight, or that dim's column of the FFN output weight.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from packer.build.checkpoint import Source
from packer.errors import MasksError


@dataclass
class Masks:
    heads: dict[int, list[int]] = field(default_factory=dict)
    ffn: dict[int, list[int]] = field(default_factory=dict)
    path: str | None = None
    sha256: str | None = None

    def describe(self) -> dict:
        closed_heads = sum(g.count(0) for g in self.heads.values())
        closed_ffn = sum(g.count(0) for g in self.ffn.values())
        return {
            "path": self.path,
            "sha256": self.sha256,
            "heads_off": closed_heads,
            "ffn_dims_off": closed_ffn,
        }


def _gates(section: str, layer_key: str, values) -> list[int]:
    if not isinstance(values, list):
        raise MasksError(f"{section}.{layer_key} must be a list of 0/1 gates, got {type(values).__name__}")
    gates = []
    for i, value in enumerate(values):
        if isinstance(value, bool):
            value = int(value)
        if not isinstance(value, int | float) or value not in (0, 1):
            raise MasksError(
                f"{section}.{layer_key}[{i}] = {value!r}: gates must be 0 or 1 "
                "(threshold continuous gates before packing)"
            )
        gates.append(int(value))
    return gates


def parse_masks(data: object, path: str | None = None, sha256: str | None = None) -> Masks:
    if not isinstance(data, dict) or not set(data) <= {"heads", "ffn"} or not data:
        raise MasksError('a masks file is a JSON object {"heads": {...}, "ffn": {...}}')
    masks = Masks(path=path, sha256=sha256)
    for section in ("heads", "ffn"):
        layers = data.get(section, {})
        if not isinstance(layers, dict):
            raise MasksError(f'"{section}" must map layer index to a list of gates')
        for layer_key, values in layers.items():
            try:
                layer = int(layer_key)
            except ValueError:
                raise MasksError(f"{section}: layer key {layer_key!r} is not an integer") from None
            getattr(masks, section)[layer] = _gates(section, layer_key, values)
    return masks


def read_masks(path: str | Path) -> Masks:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise MasksError(f"cannot read masks file {path}: {exc.strerror}") from exc
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MasksError(f"{path}: not valid JSON ({exc})") from exc
    return parse_masks(data, path=str(path), sha256=hashlib.sha256(raw).hexdigest())


def apply_masks(source: Source, masks: Masks) -> None:
    """Zero the output columns of every closed head and FFN dim, in place."""
    spec, state = source.spec, source.state_dict
    for section, width in (("heads", source.num_heads), ("ffn", source.intermediate_size)):
        for layer, gates in getattr(masks, section).items():
            if not 0 <= layer < source.num_layers:
                raise MasksError(f"{section}.{layer}: the model has layers 0..{source.num_layers - 1}")
            if len(gates) != width:
                raise MasksError(
                    f"{section}.{layer} has {len(gates)} gates, the model has {width} "
                    f"{'heads' if section == 'heads' else 'FFN dims'} per layer"
                )
            closed = torch.tensor([i for i, g in enumerate(gates) if g == 0], dtype=torch.long)
            if closed.numel() == 0:
                continue
            if section == "heads":
                d = source.head_dim
                closed = (closed[:, None] * d + torch.arange(d)[None, :]).reshape(-1)
                key = spec.layer(layer, "attn_out") + ".weight"
            else:
                key = spec.layer(layer, "ffn_out") + ".weight"
            weight = state[key].clone()
            weight[:, closed] = 0.0
            state[key] = weight
