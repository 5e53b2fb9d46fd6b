"""The artifact: the on-disk contract between packing and serving (standard library only).

OUT/config.json (HF config + "prune_serve" section), model.safetensors, tokenizer.json, the ONNX
variants and pack.json (provenance, structure, equivalence, sha256 of every file).
"""

from packer.artifact.config import PackedConfig, read_packed_config
from packer.artifact.layout import (
    CLASSIFICATION,
    CONFIG,
    MANIFEST,
    QA,
    TASK_ALIASES,
    TOKENIZER,
    VARIANT_FILES,
    WEIGHTS,
    Variant,
    parse_variant,
)
from packer.artifact.manifest import (
    fingerprint,
    read_manifest,
    sha256_file,
    verify_checksums,
    write_manifest,
)
from packer.artifact.writing import atomic_directory, check_out, remove_leftovers

__all__ = [
    "CLASSIFICATION",
    "CONFIG",
    "MANIFEST",
    "QA",
    "TASK_ALIASES",
    "TOKENIZER",
    "VARIANT_FILES",
    "WEIGHTS",
    "PackedConfig",
    "Variant",
    "atomic_directory",
    "check_out",
    "fingerprint",
    "parse_variant",
    "read_manifest",
    "read_packed_config",
    "remove_leftovers",
    "sha256_file",
    "verify_checksums",
    "write_manifest",
]
