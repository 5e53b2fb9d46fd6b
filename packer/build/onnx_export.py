"""ONNX variants of a packed model: fp32 (fused by ONNX Runtime's transformer optimizer), int8, fp16.

The packed attention reshapes with its explicit per-layer head count and runs the eager
MatMul/Softmax pattern, so the optimizer, told to detect heads per layer (num_heads=0), fuses
every layer that has heads. A global head count must never be passed: layers differ.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from packer.artifact import QA, PackedConfig
from packer.errors import PackerError
from packer.runtime.modeling import PackedModel

log = logging.getLogger(__name__)

OPSET = 17


VERBOSE = False  # prune-pack -v: let ONNX Runtime's tools print what they print


@contextmanager
def quiet_onnxruntime_tools() -> Iterator[None]:
    """ORT's optimizer and quantizer log per-layer warnings that are expected for pruned layers, an
    error when no GPU is present, and print a dict of fused operators: shown only with -v."""
    if VERBOSE:
        yield
        return
    logging.disable(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(logging.NOTSET)


def input_names(config: PackedConfig) -> list[str]:
    names = ["input_ids", "attention_mask"]
    if config.type_vocab_size > 1:
        names.append("token_type_ids")
    return names


def output_names(config: PackedConfig) -> list[str]:
    return ["start_logits", "end_logits"] if config.task == QA else ["logits"]


class _Exportable(torch.nn.Module):
    """Plain tensors in and out, in the artifact's input and output order."""

    def __init__(self, model: PackedModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        out = self.model(input_ids, attention_mask, token_type_ids)
        if self.model.config.task == QA:
            return out.start_logits, out.end_logits
        return (out.logits,)


def export(model: PackedModel, path: Path) -> None:
    config = model.config
    names = input_names(config)
    model.set_attention_implementation("eager")
    try:
        example = torch.tensor([[2, 7, 8, 9, 3, 10, 11, 3]]).clamp(max=config.vocab_size - 1).repeat(2, 1)
        example = torch.where(example == config.pad_token_id, torch.ones_like(example) * 3, example)
        args = [example, torch.ones_like(example)]
        if "token_type_ids" in names:
            args.append(torch.zeros_like(example))
        axes = {name: {0: "batch", 1: "sequence"} for name in names + output_names(config)}
        axes.update({name: {0: "batch"} for name in output_names(config) if name == "logits"})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # The TorchScript exporter keeps the MatMul/Reshape pattern ORT's attention fusion matches.
            torch.onnx.export(
                _Exportable(model).eval(),
                tuple(args),
                str(path),
                input_names=names,
                output_names=output_names(config),
                dynamic_axes=axes,
                opset_version=OPSET,
                dynamo=False,
            )
    finally:
        model.set_attention_implementation("sdpa")


@dataclass
class Fusion:
    fused: bool
    attention_nodes: int
    expected_attention_nodes: int
    operators: dict[str, int]
    note: str = ""
    # How the residual + LayerNorm is expressed: "add+layernorm" (CPU graphs), "fused" (fp16/GPU
    # SkipLayerNormalization) or "none" (no fusion ran).
    skip_layer_norm: str = "none"

    def to_dict(self) -> dict:
        return asdict(self)


def optimize(raw: Path, out: Path, config: PackedConfig, for_gpu: bool = False, fp16: bool = False) -> Fusion:
    """Run ORT's transformer optimizer; keep the fused graph only if every layer with heads fused."""
    from onnxruntime.transformers import optimizer

    expected = sum(1 for h in config.num_heads if h > 0)
    try:
        with quiet_onnxruntime_tools():
            model = optimizer.optimize_model(
                str(raw), model_type="bert", num_heads=0, hidden_size=0, use_gpu=for_gpu
            )
        stats = {k: v for k, v in model.get_fused_operator_statistics().items() if v}
        attention = stats.get("Attention", 0) + stats.get("MultiHeadAttention", 0)
    except Exception as exc:  # the optimizer is best effort; the unfused graph is still correct
        model, stats, attention = None, {}, 0
        note = f"optimizer failed: {exc}"
    else:
        note = "" if attention == expected else f"{attention} of {expected} attention layers fused"
    fused = model is not None and attention == expected
    skip_layer_norm = "none"
    # A partly fused graph (ELECTRA: the optimizer cannot match the attention fed by the embedding
    # projection) is kept too: build_variants checks the fp32 graph against torch before anything is
    # written, so a wrong fusion fails the pack rather than serving.
    if model is not None and attention > 0:
        if not fused:
            note += "; the unfused layers run as plain MatMul/Softmax"
            log.warning("ONNX Runtime attention fusion incomplete (%s)", note)
        if fp16:
            model.convert_float_to_float16(keep_io_types=True)
            skip_layer_norm = "fused" if stats.get("SkipLayerNormalization") else "none"
        elif unfuse_skip_layer_norm(model.model):
            skip_layer_norm = "add+layernorm"  # CPU graph: see CPU_DISABLED_OPTIMIZERS
        model.save_model_to_file(str(out))
    else:
        log.warning("ONNX Runtime attention fusion failed (%s): keeping the unfused graph", note)
        import onnx

        graph = onnx.load(str(raw))
        if fp16:
            from onnxruntime.transformers.onnx_model import OnnxModel

            wrapped = OnnxModel(graph)
            wrapped.convert_float_to_float16(keep_io_types=True)
            graph = wrapped.model
        onnx.save(graph, str(out))
    return Fusion(fused, attention, expected, stats, note, skip_layer_norm)


# ONNX Runtime 1.32's CPU kernel for the fused SkipLayerNormalization is ~10x slower than its
# LayerNormalization (334 vs 34 us on 160x1024, 2 threads): CPU graphs keep the residual Add and a plain
# LayerNormalization instead, and CPU sessions must not fuse them back (docs/performance.md).


def unfuse_skip_layer_norm(model) -> int:
    """Rewrite each com.microsoft SkipLayerNormalization of an onnx ModelProto as Add (+ Add bias) +
    LayerNormalization; returns how many were rewritten. Nodes whose mean / inv-std outputs are used
    stay fused (LayerNormalization's optional outputs are not the same tensors)."""
    from onnx import helper

    graph = model.graph
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    nodes, rewritten = [], 0
    for node in graph.node:
        if node.op_type != "SkipLayerNormalization" or node.domain != "com.microsoft":
            nodes.append(node)
            continue
        outputs = list(node.output) + [""] * (4 - len(node.output))
        if (outputs[1] and outputs[1] in used) or (outputs[2] and outputs[2] in used):
            nodes.append(node)
            continue
        inputs = list(node.input) + [""] * (5 - len(node.input))
        x, skip, gamma, beta, bias = inputs[:5]
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-12)
        total = outputs[3] if outputs[3] else f"{node.name}_residual"
        summed = f"{node.name}_sum" if bias else total
        nodes.append(helper.make_node("Add", [x, skip], [summed], name=f"{node.name}_add"))
        if bias:
            nodes.append(helper.make_node("Add", [summed, bias], [total], name=f"{node.name}_add_bias"))
        ln_inputs = [total, gamma] + ([beta] if beta else [])
        nodes.append(
            helper.make_node(
                "LayerNormalization", ln_inputs, [outputs[0]], name=f"{node.name}_ln", axis=-1, epsilon=eps
            )
        )
        rewritten += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return rewritten


def quantize_int8_dynamic(src: Path, dst: Path, per_channel: bool = True) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with quiet_onnxruntime_tools():
        quantize_dynamic(
            str(src),
            str(dst),
            per_channel=per_channel,
            weight_type=QuantType.QInt8,
            # Needed on graphs the transformer optimizer produced (it leaves some types implicit).
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )


class _CalibrationReader:
    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self._feeds = iter(feeds)

    def get_next(self):
        return next(self._feeds, None)


def quantize_int8_static(src: Path, dst: Path, calibration: list[dict[str, np.ndarray]]) -> None:
    """QDQ static quantization calibrated on real text (activations and weights int8)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if not calibration:
        raise PackerError("static int8 quantization needs calibration text (--calibration FILE)")
    with quiet_onnxruntime_tools():
        quantize_static(
            str(src),
            str(dst),
            _CalibrationReader(calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            op_types_to_quantize=["MatMul", "Gemm"],
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT, "ActivationSymmetric": False},
        )


def feeds(batches: Iterable[dict[str, torch.Tensor]], names: list[str]) -> Iterator[dict[str, np.ndarray]]:
    for batch in batches:
        feed = {name: batch[name].numpy().astype(np.int64) for name in names if name in batch}
        if "token_type_ids" in names and "token_type_ids" not in feed:
            feed["token_type_ids"] = np.zeros_like(feed["input_ids"])
        yield feed
