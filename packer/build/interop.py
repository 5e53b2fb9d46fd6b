"""The artifact as transformers sees it: config.json and the custom-code files beside the weights.

config.json names its own `model_type` (prune_serve) and, through `auto_map`, the classes in
modeling_prune_serve.py, so `AutoModelFor...from_pretrained(ARTIFACT, trust_remote_code=True)` builds
the packed model and loads the packed weights. Without trust_remote_code transformers refuses the
unknown model type with a message naming the flag: it can never pair the source's class with weights
whose names it does not know (which used to "succeed" with freshly initialised weights).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from packer.artifact import QA, PackedConfig

CODE_FILES = ("modeling_prune_serve.py", "modeling.py")  # the wrapper and the model it imports
RUNTIME = Path(__file__).resolve().parent.parent / "runtime"


def transformers_config(config: PackedConfig, source_config: dict) -> dict:
    head = "QuestionAnswering" if config.task == QA else "SequenceClassification"
    cls = f"PruneServeFor{head}"
    out = {
        "model_type": "prune_serve",
        "architectures": [cls],
        "auto_map": {
            "AutoConfig": "modeling_prune_serve.PruneServeConfig",
            f"AutoModelFor{head}": f"modeling_prune_serve.{cls}",
        },
        "source_model_type": config.arch,
        "source_architectures": source_config.get("architectures"),
        "pad_token_id": config.pad_token_id,
        "prune_serve": config.section(),
    }
    if config.task != QA:
        out["id2label"] = {str(k): v for k, v in config.id2label.items()}
        out["label2id"] = {v: k for k, v in config.id2label.items()}
    return out


def copy_code(directory: Path) -> None:
    for name in CODE_FILES:
        shutil.copyfile(RUNTIME / name, directory / name)
