"""Tiny pruned checkpoints, built once per session, and the references they are checked against."""

from __future__ import annotations

import importlib
import os
import shutil
from pathlib import Path

import pytest
import torch

from packer.synth.checkpoints import PrunePlan, build_checkpoint

torch.set_num_threads(min(2, os.cpu_count() or 1))


def missing(what: str) -> None:
    """A tool the suite needs is absent: skip on a developer's machine, fail where CI installed
    everything (.ci/run sets PRUNE_SERVE_REQUIRE_TOOLS), so a broken install never passes as skipped."""
    if os.environ.get("PRUNE_SERVE_REQUIRE_TOOLS") or os.environ.get("CI"):
        pytest.fail(f"{what} (required in CI)")
    pytest.skip(what, allow_module_level=True)


def require_module(name: str, what: str):
    """The module `name` (dotted names give the submodule itself), or missing(what)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        missing(what)


SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

HIDDEN, HEADS, HEAD_DIM, FFN, LAYERS = 32, 4, 8, 64, 4


def every_case_plan() -> PrunePlan:
    """Each way a head or FFN dim can be pruned, one layer losing every head, one every FFN dim."""
    return PrunePlan(
        heads={0: [1], 2: [0, 1, 2, 3]},  # nn_pruning: Q, K, V rows and W_o columns zero
        heads_value_only={1: [2]},  # only V rows zero: b_v must be folded
        heads_output_only={1: [0]},  # only W_o columns zero
        heads_query_only={3: [1]},  # only Q rows zero: uniform attention, NOT removable
        ffn={0: list(range(10)), 3: list(range(FFN))},  # layer 3 loses every FFN dim
        ffn_input_only={1: [3, 4, 5]},  # W1 rows zero, b1 non-zero: act(b1) * W2 must be folded
        ffn_output_only={2: [7, 8]},
    )


# Expected result of every_case_plan, written out by hand.
EXPECTED_HEADS = [3, 2, 0, 4]
EXPECTED_FFN = [54, 61, 62, 0]


def expected_params(task: str, vocab: int, positions: int, type_vocab: int, num_labels: int = 2) -> int:
    h, d = HIDDEN, HEAD_DIM
    total = vocab * h + positions * h + type_vocab * h + 2 * h
    for heads, ffn in zip(EXPECTED_HEADS, EXPECTED_FFN, strict=True):
        width = heads * d
        total += 3 * (h * width + width) + width * h + h + 2 * h  # q, k, v, out weight, out bias, LN
        total += h * ffn + ffn + ffn * h + h + 2 * h  # fc1, fc2 weight, fc2 bias, LN
    if task == "question-answering":
        return total + 2 * h + 2
    return total + h * h + h + num_labels * h + num_labels


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def bert_qa_src(workdir) -> Path:
    return build_checkpoint(workdir / "bert-qa-src", arch="bert", task="qa", plan=every_case_plan(), seed=1)


@pytest.fixture(scope="session")
def roberta_cls_src(workdir) -> Path:
    return build_checkpoint(
        workdir / "roberta-cls-src",
        arch="roberta",
        task="classification",
        plan=every_case_plan(),
        seed=2,
        num_labels=3,
        weights_format="bin",
    )


@pytest.fixture(scope="session")
def bert_qa_packed(workdir, bert_qa_src) -> Path:
    from packer.build.pack import PackOptions, pack

    out = workdir / "bert-qa"
    pack(str(bert_qa_src), out, PackOptions(progress=False))
    return out


@pytest.fixture(scope="session")
def roberta_cls_packed(workdir, roberta_cls_src) -> Path:
    from packer.build.pack import PackOptions, pack

    out = workdir / "roberta-cls"
    pack(str(roberta_cls_src), out, PackOptions(progress=False))
    return out


@pytest.fixture(scope="session")
def bert_onnx(workdir, bert_qa_src):
    out = workdir / "bert-qa-onnx"
    from packer.build.pack import PackOptions, pack

    pack(str(bert_qa_src), out, PackOptions(progress=False, onnx=True, int8="dynamic", fp16=True))
    return out


# Every architecture beyond BERT and RoBERTa, each pruned every way the BERT fixtures are.
MORE_ARCHS = ("distilbert", "electra", "xlm-roberta", "camembert")


@pytest.fixture(scope="session")
def arch_artifact(workdir):
    """(arch, task) -> (source, artifact, manifest): packed with ONNX and int8 on first use."""
    from packer.artifact import TASK_ALIASES
    from packer.build.pack import PackOptions, pack

    cache: dict = {}

    def get(arch: str, task: str):
        key = (arch, TASK_ALIASES[task])
        if key not in cache:
            name = f"{arch}-{'qa' if key[1] == 'question-answering' else 'cls'}"
            src = build_checkpoint(
                workdir / "arch-src" / name,
                arch=arch,
                task=task,
                plan=every_case_plan(),
                seed=7,
                num_labels=3,
            )
            out = workdir / "arch" / name
            manifest = pack(str(src), out, PackOptions(progress=False, onnx=True, int8="dynamic"))
            cache[key] = (src, out, manifest)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def models_dir(workdir, bert_onnx, bert_qa_packed, roberta_cls_src):
    from packer.build.pack import PackOptions, pack

    root = workdir / "served"
    root.mkdir()
    shutil.copytree(bert_onnx, root / "qa")  # has onnx-int8: served by ONNX Runtime
    shutil.copytree(bert_qa_packed, root / "qa-torch")  # torch only
    pack(str(roberta_cls_src), root / "cls", PackOptions(progress=False, onnx=True))
    return root


def hf_model(src: Path):
    """The source through transformers' own loader: full-size, so from_pretrained works."""
    from transformers import AutoConfig, AutoModelForQuestionAnswering, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(src)
    arch = config.architectures[0]
    auto = (
        AutoModelForQuestionAnswering
        if arch.endswith("QuestionAnswering")
        else AutoModelForSequenceClassification
    )
    return auto.from_pretrained(src, attn_implementation="eager").eval()


def gate_hooks(model, masks: dict, head_dim: int, arch: str = "bert") -> None:
    """McCarley semantics in transformers' own model, independently of the packer: scale head outputs
    and FFN activations, found by module name."""
    from packer.build.arch import spec_for

    spec = spec_for(arch)
    for section, part in (("heads", "attn_out"), ("ffn", "ffn_out")):
        for idx, gates in masks.get(section, {}).items():
            scale = torch.tensor(gates, dtype=torch.float32)
            if section == "heads":
                scale = scale.repeat_interleave(head_dim)
            module = model.get_submodule(spec.layer(int(idx), part))
            module.register_forward_pre_hook(lambda m, args, s=scale: (args[0] * s,))


def outputs(model, inputs) -> list[torch.Tensor]:
    with torch.inference_mode():
        out = model(**inputs)
    if getattr(out, "start_logits", None) is not None:
        return [out.start_logits, out.end_logits]
    return [out.logits]


def sample_inputs(tokenizer, task: str, vocab: int, pad: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Random ids with padding, and real text through the tokenizer."""
    from packer.runtime.samples import QA_PAIRS, SENTENCES

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (4, 40), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 25:] = 0
    mask[3, 10:] = 0
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, pad))
    batches = [{"input_ids": ids, "attention_mask": mask}]
    if task == "question-answering":
        q, c = zip(*QA_PAIRS, strict=True)
        batches.append(token_batch(tokenizer, list(q), list(c)))
    else:
        batches.append(token_batch(tokenizer, SENTENCES))
    return batches


def token_batch(tokenizer, texts: list[str], pairs: list[str] | None = None, max_length: int = 512) -> dict:
    """Texts (or pairs) through the artifact's tokenizer, right-padded into torch tensors."""
    from packer.runtime.tasks.classify import encode
    from packer.runtime.tasks.padding import pad

    pairs = pairs or [None] * len(texts)
    encoded = [encode(tokenizer, t, p, max_length) for t, p in zip(texts, pairs, strict=True)]
    ids, mask, types, _ = pad(encoded, tokenizer.pad_token_id)
    batch = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
    if types is not None:
        batch["token_type_ids"] = torch.from_numpy(types)
    return batch


def max_diff(a_model, b_model, batches) -> float:
    worst = 0.0
    for inputs in batches:
        for a, b in zip(outputs(a_model, inputs), outputs(b_model, inputs), strict=True):
            worst = max(worst, (a - b).abs().max().item())
    return worst
