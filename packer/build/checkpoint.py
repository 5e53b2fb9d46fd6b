"""Read a source checkpoint: a local directory or a hub id, its config, weights and tokenizer.

The state dict is read directly from the weight files (never AutoModel.from_pretrained, which
cannot express resized layers) and normalized to a full-size, fp32 HF layout: old
`config.pruned_heads` checkpoints are expanded back with zeroed heads so that every later step
(structure, resize, the reference model in verify) sees one layout.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from packer.artifact import sha256_file
from packer.build.arch import ArchSpec, detect_task, spec_for
from packer.errors import CheckpointError

log = logging.getLogger(__name__)

WEIGHT_PATTERNS = ["*.json", "*.safetensors", "pytorch_model*.bin", "*.txt", "*.model", "merges.txt"]
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model")


@dataclass
class Source:
    """A checkpoint read into memory, normalized to the full-size HF layout in fp32.

    `config` is config.json with the canonical values under BERT's names (arch.CANONICAL_CONFIG);
    `raw_config` is config.json as its family's own code reads it."""

    ref: str
    path: Path
    config: dict
    state_dict: dict[str, torch.Tensor]
    spec: ArchSpec
    task: str
    weight_files: list[dict] = field(default_factory=list)
    expanded_pruned_heads: dict[int, list[int]] = field(default_factory=dict)
    raw_config: dict = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    @property
    def num_heads(self) -> int:
        return int(self.config["num_attention_heads"])

    @property
    def hidden_size(self) -> int:
        return int(self.config["hidden_size"])

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def intermediate_size(self) -> int:
        return int(self.config["intermediate_size"])


def resolve(src: str, revision: str | None = None) -> Path:
    """A local directory as is; anything else is a hub id downloaded with huggingface_hub."""
    path = Path(src).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{src} is a file; pass the checkpoint directory (with config.json)")
    if src.startswith((".", "/", "~")) or src.count("/") > 1:
        raise CheckpointError(f"{src}: no such directory")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(src, revision=revision, allow_patterns=WEIGHT_PATTERNS))
    except Exception as exc:  # network, auth, unknown repo: all reported the same way
        raise CheckpointError(
            f"{src} is not a local directory and could not be downloaded from the Hugging Face hub "
            f"({type(exc).__name__}). Without the hub: pass a local checkpoint directory, set "
            "HF_HUB_OFFLINE=1 to use what is already in the hub cache, or make a pruned checkpoint with "
            "`prune-pack synth DIR --profile bert-large-seed` and pack DIR"
        ) from exc


def read_config(path: Path) -> dict:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path}: no config.json; a checkpoint directory needs the HF config")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_file}: not valid JSON ({exc})") from exc


def _weight_files(path: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError) as exc:
                raise CheckpointError(f"{index}: not a valid shard index ({exc})") from exc
            missing = [s for s in shards if not (path / s).is_file()]
            if missing:
                raise CheckpointError(f"{index} names shards that are missing: {', '.join(missing)}")
            return [path / s for s in shards]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            return [path / name]
    raise CheckpointError(
        f"{path}: no weights found; expected model.safetensors, pytorch_model.bin or a sharded index"
    )


def _read_weight_file(file: Path, progress: bool) -> dict[str, torch.Tensor]:
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(file), framework="pt") as f:
                names = list(f.keys())
                bar = tqdm(
                    names, desc=f"reading {file.name}", unit="tensor", disable=not progress, leave=False
                )
                return {k: f.get_tensor(k) for k in bar}
        except Exception as exc:
            raise CheckpointError(f"{file}: cannot be read as safetensors ({exc})") from exc
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{file}: cannot be read as a torch state dict ({exc})") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: holds a {type(state).__name__}, expected a state dict")
    return state


def read_state_dict(path: Path, progress: bool = True) -> tuple[dict[str, torch.Tensor], list[dict]]:
    files = _weight_files(path)
    state: dict[str, torch.Tensor] = {}
    described = []
    for file in files:
        state.update(_read_weight_file(file, progress))
        described.append({"file": file.name, "sha256": sha256_file(file), "bytes": file.stat().st_size})
    return state, described


def _normalize_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """TF-converted checkpoints name LayerNorm parameters gamma/beta; everything else is fp32."""
    out = {}
    for key, tensor in state.items():
        if key.endswith(".gamma"):
            key = key[: -len("gamma")] + "weight"
        elif key.endswith(".beta"):
            key = key[: -len("beta")] + "bias"
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"weights entry {key} is a {type(tensor).__name__}, not a tensor")
        out[key] = tensor.float() if tensor.is_floating_point() else tensor
    return out


def expected_shapes(config: dict, spec: ArchSpec, task: str) -> dict[str, tuple[int, ...]]:
    """Every tensor the packer reads, with the shape the config implies."""
    hidden = int(config["hidden_size"])
    inter = int(config["intermediate_size"])
    width = int(config["embedding_size"])
    shapes: dict[str, tuple[int, ...]] = {
        spec.embedding("word") + ".weight": (int(config["vocab_size"]), width),
        spec.embedding("position") + ".weight": (int(config["max_position_embeddings"]), width),
        spec.embedding("norm") + ".weight": (width,),
        spec.embedding("norm") + ".bias": (width,),
    }
    if int(config.get("type_vocab_size", 0) or 0) > 0:
        shapes[spec.embedding("token_type") + ".weight"] = (int(config["type_vocab_size"]), width)
    projection = spec.projection(config)
    if projection:
        shapes[projection + ".weight"] = (hidden, width)
        shapes[projection + ".bias"] = (hidden,)
    for i in range(int(config["num_hidden_layers"])):
        for part in ("query", "key", "value"):
            shapes[spec.layer(i, part) + ".weight"] = (hidden, hidden)
            shapes[spec.layer(i, part) + ".bias"] = (hidden,)
        shapes[spec.layer(i, "attn_out") + ".weight"] = (hidden, hidden)
        shapes[spec.layer(i, "ffn_in") + ".weight"] = (inter, hidden)
        shapes[spec.layer(i, "ffn_in") + ".bias"] = (inter,)
        shapes[spec.layer(i, "ffn_out") + ".weight"] = (hidden, inter)
        for part in ("attn_out", "ffn_out", "attn_norm", "ffn_norm"):
            shapes[spec.layer(i, part) + ".bias"] = (hidden,)
        for part in ("attn_norm", "ffn_norm"):
            shapes[spec.layer(i, part) + ".weight"] = (hidden,)
    heads = spec.head_keys(task)
    if "qa_outputs" in heads:
        shapes["qa_outputs.weight"] = (2, hidden)
        shapes["qa_outputs.bias"] = (2,)
    else:
        labels = num_labels(config)
        shapes[heads["pooler"] + ".weight"] = (hidden, hidden)
        shapes[heads["pooler"] + ".bias"] = (hidden,)
        shapes[heads["classifier"] + ".weight"] = (labels, hidden)
        shapes[heads["classifier"] + ".bias"] = (labels,)
    return shapes


def num_labels(config: dict) -> int:
    if config.get("id2label"):
        return len(config["id2label"])
    return int(config.get("num_labels", 2))


def _fmt(shape) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def check_tensors(state: dict[str, torch.Tensor], config: dict, spec: ArchSpec, task: str) -> None:
    for key, shape in expected_shapes(config, spec, task).items():
        if key not in state:
            raise CheckpointError(f"missing tensor {key} (a {task} {spec.model_type} checkpoint needs it)")
        tensor = state[key]
        if tuple(tensor.shape) != shape:
            raise CheckpointError(
                f"{key} has shape {_fmt(tensor.shape)}, expected {_fmt(shape)} from config.json"
            )
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"{key} holds NaN or infinite values")


def _check_config(config: dict, spec: ArchSpec, path: Path) -> None:
    required = ["hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size"]
    missing = [spec.config_names.get(k, k) for k in required if k not in config]
    if missing:
        raise CheckpointError(f"{path}/config.json lacks {', '.join(missing)}")
    if int(config["hidden_size"]) % int(config["num_attention_heads"]):
        raise CheckpointError(
            f"config.json: hidden_size {config['hidden_size']} is not a multiple of "
            f"num_attention_heads {config['num_attention_heads']}"
        )
    kind = config.get("position_embedding_type", "absolute")
    if kind != "absolute":
        raise CheckpointError(
            f"config.json: position_embedding_type {kind!r} is not supported (only absolute)"
        )
    if config.get("is_decoder") or config.get("add_cross_attention"):
        raise CheckpointError("config.json: decoder / cross-attention BERT models are not supported")


def expand_pruned_heads(state: dict[str, torch.Tensor], config: dict, spec: ArchSpec) -> dict[int, list[int]]:
    """Undo HF `prune_heads`: re-insert pruned heads as zeros (their V rows and output columns).

    The expanded model computes exactly what the pruned one did, in the layout HF's current
    modeling code (which has no prune_heads) can load.
    """
    pruned = {int(k): sorted(set(int(h) for h in v)) for k, v in (config.get("pruned_heads") or {}).items()}
    num_heads = int(config["num_attention_heads"])
    head_dim = int(config["hidden_size"]) // num_heads
    for layer, heads in pruned.items():
        if not heads:
            continue
        if layer >= int(config["num_hidden_layers"]) or any(h < 0 or h >= num_heads for h in heads):
            raise CheckpointError(f"config.json pruned_heads[{layer}] = {heads} is out of range")
        kept = [h for h in range(num_heads) if h not in heads]
        rows = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in kept]) if kept else None
        for part in ("query", "key", "value"):
            for suffix in ("weight", "bias"):
                key = f"{spec.layer(layer, part)}.{suffix}"
                small = state[key]
                if small.shape[0] != len(kept) * head_dim:
                    raise CheckpointError(
                        f"{key} has {small.shape[0]} rows; config.json pruned_heads[{layer}] leaves "
                        f"{len(kept)} heads of {head_dim}, i.e. {len(kept) * head_dim} rows"
                    )
                full = small.new_zeros((num_heads * head_dim, *small.shape[1:]))
                if rows is not None:
                    full[rows] = small
                state[key] = full
        key = f"{spec.layer(layer, 'attn_out')}.weight"
        small = state[key]
        if small.shape[1] != len(kept) * head_dim:
            raise CheckpointError(
                f"{key} has {small.shape[1]} columns; pruned_heads[{layer}] implies {len(kept) * head_dim}"
            )
        full = small.new_zeros((small.shape[0], num_heads * head_dim))
        if rows is not None:
            full[:, rows] = small
        state[key] = full
    return {k: v for k, v in pruned.items() if v}


def read_source(
    src: str, task: str | None = None, revision: str | None = None, progress: bool = True
) -> Source:
    path = resolve(src, revision)
    raw_config = read_config(path)
    spec = spec_for(raw_config.get("model_type"))
    config = spec.canonical_config(raw_config)
    _check_config(config, spec, path)
    raw_state, files = read_state_dict(path, progress=progress)
    state = _normalize_keys(raw_state)
    resolved_task = detect_task(config, state, task)
    expanded = expand_pruned_heads(state, config, spec)
    config = {k: v for k, v in config.items() if k != "pruned_heads"}
    check_tensors(state, config, spec, resolved_task)
    if expanded:
        log.info("expanded config.pruned_heads back to full size: %s", expanded)
    return Source(
        ref=src,
        path=path,
        config=config,
        state_dict=state,
        spec=spec,
        task=resolved_task,
        weight_files=files,
        expanded_pruned_heads=expanded,
        raw_config={k: v for k, v in raw_config.items() if k != "pruned_heads"},
    )


def has_tokenizer(path: Path) -> bool:
    return any((path / name).is_file() for name in TOKENIZER_FILES)
