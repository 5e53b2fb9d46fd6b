"""Random checkpoints pruned the way nn_pruning and McCarley gates leave them.

No hub is needed: tests build tiny ones, benchmarks build BERT-base and BERT-large shapes with
the seed models' pruning profiles. Every pruned head / FFN dim keeps a non-zero bias, as real
pruned checkpoints do, so the packer's bias folding is exercised.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from packer.artifact import QA, TASK_ALIASES
from packer.artifact.config import AFTER_PADDING
from packer.build.arch import spec_for
from packer.build.checkpoint import expected_shapes
from packer.runtime.samples import QA_PAIRS, SENTENCES

SPECIALS = {"bert": ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]}


@dataclass
class Shape:
    layers: int
    hidden: int
    heads: int
    intermediate: int
    vocab_size: int = 0  # 0: as many as the tokenizer has
    max_positions: int = 512
    embedding_size: int = 0  # ELECTRA: smaller embeddings projected up (0: hidden // 2)


@dataclass
class PrunePlan:
    """What to zero, per layer index. Head and dim indices refer to the unpruned model."""

    heads: dict[int, list[int]] = field(default_factory=dict)  # Q, K, V rows and W_o columns
    heads_value_only: dict[int, list[int]] = field(default_factory=dict)  # V rows: b_v gets folded
    heads_output_only: dict[int, list[int]] = field(default_factory=dict)  # W_o columns only
    heads_query_only: dict[int, list[int]] = field(default_factory=dict)  # Q rows: uniform, not removable
    ffn: dict[int, list[int]] = field(default_factory=dict)  # W1 rows and W2 columns
    ffn_input_only: dict[int, list[int]] = field(default_factory=dict)  # W1 rows: act(b1) gets folded
    ffn_output_only: dict[int, list[int]] = field(default_factory=dict)  # W2 columns only
    unstructured: float = 0.0  # fraction of the remaining encoder weights zeroed at random


PROFILES = {
    "tiny": Shape(layers=4, hidden=32, heads=4, intermediate=64),
    "bert-base": Shape(layers=12, hidden=768, heads=12, intermediate=3072, vocab_size=30522),
    "bert-large": Shape(layers=24, hidden=1024, heads=16, intermediate=4096, vocab_size=30522),
}


def _words() -> list[str]:
    text = " ".join([q + " " + c for q, c in QA_PAIRS] + SENTENCES).lower()
    return sorted(set(re.findall(r"[a-z]+", text)))


def write_bert_tokenizer(out: Path, vocab_size: int = 0, arch: str = "bert") -> int:
    """WordPiece, saved as the family's own tokenizer class (DistilBERT's drops token type ids)."""
    import transformers

    cls = getattr(transformers, spec_for(arch).hf_family + "TokenizerFast", transformers.BertTokenizerFast)

    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789.,;:!?'\"()-")
    vocab = SPECIALS["bert"] + chars + ["##" + c for c in chars] + [w for w in _words() if len(w) > 1]
    vocab = list(dict.fromkeys(vocab))
    vocab += [f"[unused{i}]" for i in range(max(0, vocab_size - len(vocab)))]
    out.mkdir(parents=True, exist_ok=True)
    vocab_file = out / "vocab.txt"
    vocab_file.write_text("\n".join(vocab) + "\n")
    vocab_ids = {token: i for i, token in enumerate(vocab)}
    cls(vocab=vocab_ids, do_lower_case=True).save_pretrained(str(out))
    return len(vocab)


ROBERTA_SPECIALS = dict(
    bos_token="<s>",
    eos_token="</s>",
    sep_token="</s>",
    cls_token="<s>",
    unk_token="<unk>",
    pad_token="<pad>",
    mask_token="<mask>",
)


def write_sentencepiece_tokenizer(out: Path, vocab_size: int = 0, arch: str = "xlm-roberta") -> int:
    """A SentencePiece (Unigram, Metaspace) tokenizer as XLM-RoBERTa and CamemBERT use."""
    import transformers
    from tokenizers import SentencePieceUnigramTokenizer, processors

    unigram = SentencePieceUnigramTokenizer()
    corpus = [q + " " + c for q, c in QA_PAIRS] + SENTENCES
    unigram.train_from_iterator(
        corpus,
        vocab_size=max(vocab_size, 300),
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
        unk_token="<unk>",
    )
    unigram.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    cls = getattr(transformers, spec_for(arch).hf_family + "TokenizerFast")
    tokenizer = cls(tokenizer_object=unigram, **ROBERTA_SPECIALS)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out))
    return len(tokenizer)


def write_roberta_tokenizer(out: Path, vocab_size: int = 0, arch: str = "roberta") -> int:
    from tokenizers import ByteLevelBPETokenizer, processors
    from transformers import RobertaTokenizerFast

    bpe = ByteLevelBPETokenizer()
    corpus = [q + " " + c for q, c in QA_PAIRS] + SENTENCES
    bpe.train_from_iterator(
        corpus,
        vocab_size=max(vocab_size, 400),
        min_frequency=1,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
    )
    bpe.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    tokenizer = RobertaTokenizerFast(tokenizer_object=bpe, **ROBERTA_SPECIALS)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out))
    return len(tokenizer)


TOKENIZER_WRITERS = {
    "bert": write_bert_tokenizer,
    "distilbert": write_bert_tokenizer,
    "electra": write_bert_tokenizer,
    "roberta": write_roberta_tokenizer,
    "xlm-roberta": write_sentencepiece_tokenizer,
    "camembert": write_sentencepiece_tokenizer,
}


def make_config(arch: str, task: str, shape: Shape, vocab_size: int, num_labels: int = 2) -> dict:
    from transformers import AutoConfig

    spec = spec_for(arch)
    after_padding = spec.positions == AFTER_PADDING
    extra = (
        {"pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2, "type_vocab_size": 1}
        if after_padding
        else {}
    )
    if spec.embedding_projection:
        extra["embedding_size"] = shape.embedding_size or shape.hidden // 2
    canonical = {
        "vocab_size": vocab_size,
        "hidden_size": shape.hidden,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "intermediate_size": shape.intermediate,
        "max_position_embeddings": shape.max_positions + (2 if after_padding else 0),
    }
    # Under the family's own config names (DistilBERT: dim, n_layers, n_heads, hidden_dim).
    native = {spec.config_names.get(name, name): value for name, value in canonical.items()}
    config = AutoConfig.for_model(arch, **native, **extra).to_dict()
    config["architectures"] = [
        spec.hf_family + ("ForQuestionAnswering" if task == QA else "ForSequenceClassification")
    ]
    if task != QA:
        config["id2label"] = {
            str(i): ["negative", "positive", "neutral"][i % 3] + ("" if i < 3 else str(i))
            for i in range(num_labels)
        }
        config["label2id"] = {v: int(k) for k, v in config["id2label"].items()}
    return config


def random_state_dict(config: dict, arch: str, task: str, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = {}
    spec = spec_for(arch)
    for key, shape in expected_shapes(spec.canonical_config(config), spec, task).items():
        if key.endswith(("LayerNorm.weight", "layer_norm.weight")):
            state[key] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif key.endswith(".bias"):
            state[key] = 0.1 * torch.randn(shape, generator=gen)
        else:
            fan_in = shape[-1] if len(shape) == 2 and "embeddings" not in key else 1
            state[key] = torch.randn(shape, generator=gen) * (0.5 if fan_in == 1 else fan_in**-0.5)
    return state


def apply_plan(state: dict[str, torch.Tensor], config: dict, arch: str, plan: PrunePlan, seed: int) -> None:
    spec = spec_for(arch)
    config = spec.canonical_config(config)
    d = config["hidden_size"] // config["num_attention_heads"]

    def head_rows(heads):
        return [h * d + j for h in heads for j in range(d)]

    def zero(key, rows=None, cols=None):
        t = state[key]
        if rows is not None:
            t[rows] = 0.0
        if cols is not None:
            t[:, cols] = 0.0

    for layer in range(config["num_hidden_layers"]):
        w = lambda part: spec.layer(layer, part) + ".weight"  # noqa: B023, E731
        for h_rows in [head_rows(plan.heads.get(layer, []))]:
            for part in ("query", "key", "value"):
                zero(w(part), rows=h_rows)
            zero(w("attn_out"), cols=h_rows)
        zero(w("value"), rows=head_rows(plan.heads_value_only.get(layer, [])))
        zero(w("attn_out"), cols=head_rows(plan.heads_output_only.get(layer, [])))
        zero(w("query"), rows=head_rows(plan.heads_query_only.get(layer, [])))
        dims = plan.ffn.get(layer, [])
        zero(w("ffn_in"), rows=dims)
        zero(w("ffn_out"), cols=dims)
        zero(w("ffn_in"), rows=plan.ffn_input_only.get(layer, []))
        zero(w("ffn_out"), cols=plan.ffn_output_only.get(layer, []))
    if plan.unstructured:
        gen = torch.Generator().manual_seed(seed + 1)
        for layer in range(config["num_hidden_layers"]):
            for part in ("query", "key", "value", "attn_out", "ffn_in", "ffn_out"):
                t = state[spec.layer(layer, part) + ".weight"]
                t[torch.rand(t.shape, generator=gen) < plan.unstructured] = 0.0


def build_checkpoint(
    out: str | Path,
    arch: str = "bert",
    task: str = QA,
    shape: Shape | None = None,
    plan: PrunePlan | None = None,
    seed: int = 0,
    num_labels: int = 2,
    weights_format: str = "safetensors",
    tokenizer_from: str | None = None,
) -> Path:
    """Write a random pruned checkpoint directory (config.json, weights, tokenizer)."""
    out = Path(out)
    task = TASK_ALIASES[task]
    shape = shape or PROFILES["tiny"]
    if tokenizer_from:  # a real tokenizer, so that text tokenizes as it would for a real model
        from transformers import AutoTokenizer

        real = AutoTokenizer.from_pretrained(tokenizer_from)
        real.save_pretrained(str(out))
        vocab_size = len(real)
    else:
        vocab_size = TOKENIZER_WRITERS[arch](out, shape.vocab_size, arch)
    config = make_config(arch, task, shape, max(vocab_size, shape.vocab_size), num_labels)
    state = random_state_dict(config, arch, task, seed)
    apply_plan(state, config, arch, plan or PrunePlan(), seed)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if weights_format == "safetensors":
        from safetensors.torch import save_file

        save_file(state, str(out / "model.safetensors"))
    else:
        torch.save(state, out / "pytorch_model.bin")
    return out


def profile_plan(shape: Shape, heads_removed: int, linear_fraction: float, seed: int = 0) -> PrunePlan:
    """Remove `heads_removed` heads and enough FFN dims that the encoder's linear layers keep
    `linear_fraction` of their weights; more is kept in the middle layers, as the seeds show."""
    gen = torch.Generator().manual_seed(seed)
    L, H, h, inter = shape.layers, shape.heads, shape.hidden, shape.intermediate
    d = h // H
    weight = torch.tensor([1.0 + 0.8 * (1 - abs(2 * i / max(L - 1, 1) - 1)) for i in range(L)])
    # Heads: drop from the outer layers first, in proportion to 1 / weight.
    drop_share = (1 / weight) / (1 / weight).sum()
    drops = torch.floor(drop_share * heads_removed).long().clamp(max=H)
    order = torch.argsort(drop_share, descending=True)
    i = 0
    while int(drops.sum()) < heads_removed:
        layer = order[i % L]
        if drops[layer] < H:
            drops[layer] += 1
        i += 1
    plan = PrunePlan()
    for layer in range(L):
        plan.heads[layer] = sorted(torch.randperm(H, generator=gen)[: int(drops[layer])].tolist())
    kept_heads = L * H - heads_removed
    budget = linear_fraction * L * (4 * h * h + 2 * h * inter) - 4 * h * d * kept_heads
    ffn_total = max(0, round(budget / (2 * h)))
    keep = torch.floor(weight / weight.sum() * ffn_total).long().clamp(max=inter)
    keep[L // 2] += ffn_total - int(keep.sum())
    for layer in range(L):
        plan.ffn[layer] = sorted(torch.randperm(inter, generator=gen)[: inter - int(keep[layer])].tolist())
    return plan


SEED_PROFILES = {
    # The nn_pruning BERT-large SQuAD v2 seed: 155 of 384 heads removed, 25% of linear weights left.
    "bert-large-seed": ("bert-large", 155, 0.25),
    # The BERT-base measurement: 40% of heads and 70% of FFN dims removed.
    "bert-base-40h-70f": ("bert-base", 58, None),
}


def build_profile(
    out: str | Path, profile: str, task: str = QA, seed: int = 0, tokenizer_from: str | None = None
) -> Path:
    if profile == "tiny":
        plan = profile_plan(PROFILES["tiny"], heads_removed=5, linear_fraction=0.5, seed=seed)
        return build_checkpoint(out, task=task, plan=plan, seed=seed, tokenizer_from=tokenizer_from)
    if profile not in SEED_PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose from tiny, {', '.join(SEED_PROFILES)}")
    shape_name, heads_removed, fraction = SEED_PROFILES[profile]
    shape = PROFILES[shape_name]
    if fraction is None:  # 70% of FFN dims removed
        h, inter, L = shape.hidden, shape.intermediate, shape.layers
        kept_heads = L * shape.heads - heads_removed
        fraction = (4 * h * (h // shape.heads) * kept_heads + 2 * h * int(0.3 * inter) * L) / (
            L * (4 * h * h + 2 * h * inter)
        )
    plan = profile_plan(shape, heads_removed, fraction, seed)
    return build_checkpoint(out, task=task, shape=shape, plan=plan, seed=seed, tokenizer_from=tokenizer_from)
