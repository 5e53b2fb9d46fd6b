"""ONNX Runtime as a backend: CPU provider, or CUDA provider with IO binding."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from packer.artifact import VARIANT_FILES, Variant
from packer.runtime.backends.base import (
    BackendError,
    CudaOptions,
    default_threads,
    resolve_device,
    run_per_window,
)

log = logging.getLogger(__name__)

DTYPES = {Variant.ONNX: "fp32", Variant.ONNX_INT8: "int8", Variant.ONNX_FP16: "fp16"}


def sees_cuda() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


class OrtBackend:
    def __init__(
        self,
        artifact: Path,
        variant: str = Variant.ONNX,
        device: str = "auto",
        strict: bool = False,
        threads: int | None = None,
        spinning: bool = True,
        memory_arena: bool = True,
        per_window: bool = False,
        cuda: CudaOptions | None = None,
    ):
        import onnxruntime as ort

        from packer.runtime.ort_session import session

        if variant not in DTYPES:
            raise BackendError(f"variant {variant!r} is not an ONNX variant ({', '.join(DTYPES)})")
        cuda_listed = "CUDAExecutionProvider" in ort.get_available_providers()
        if variant == Variant.ONNX_INT8 and device == "auto":
            device = "cpu"
        # Refused whatever the machine has: the pairing is wrong, not the hardware.
        if variant == Variant.ONNX_INT8 and device == "cuda":
            raise BackendError(
                "onnx-int8 is dynamically quantized, which ONNX Runtime's CUDA provider does not run; "
                "serve onnx-fp16 or torch on cuda, or onnx-int8 on cpu"
            )
        self.device = resolve_device(device, cuda_listed, strict, "onnxruntime")
        self.dtype = DTYPES[variant]
        self.name = f"ort-{self.device}-{self.dtype}"
        cuda = cuda or CudaOptions()
        providers = None
        if self.device == "cuda":
            providers = [("CUDAExecutionProvider", cuda.provider_options()), "CPUExecutionProvider"]
        self.session = session(
            Path(artifact) / VARIANT_FILES[variant],
            threads or default_threads(),
            providers,
            spinning,
            memory_arena,
        )
        # The provider list is a wish: ORT falls back to the CPU silently when CUDA cannot start (missing
        # libraries, a driver too old). What the session really uses decides the device.
        self.providers = self.session.get_providers()
        if self.device == "cuda" and self.providers[0] != "CUDAExecutionProvider":
            message = (
                f"ONNX Runtime could not start its CUDA provider for {variant} (the session uses "
                f"{', '.join(self.providers)}); check the CUDA and cuDNN libraries against the driver "
                "(prune-serve doctor)"
            )
            if strict:
                raise BackendError(message)
            log.warning("%s: running on cpu", message)
            self.device = "cpu"
            self.name = f"ort-cpu-{self.dtype}"
        self.run_options = None
        if self.device == "cuda" and cuda.arena_shrinkage:
            # Give the arena's unused GPU memory back after each run (costs a little time per run).
            self.run_options = ort.RunOptions()
            self.run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "gpu:0")
        # Dynamic int8 takes one activation scale per tensor over the whole padded batch, so a window's
        # logits would depend on its neighbours: run each window alone (as fast on CPU; docs/performance.md).
        self.per_window = per_window
        self.batch_invariant = per_window or variant != Variant.ONNX_INT8
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def _feed(self, input_ids, attention_mask, token_type_ids) -> dict[str, np.ndarray]:
        arrays = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        feed = {}
        for name in self.inputs:
            value = arrays.get(name)
            if value is None:
                value = np.zeros_like(input_ids)
            feed[name] = np.ascontiguousarray(value, dtype=np.int64)
        return feed

    def run(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        if self.per_window and input_ids.shape[0] > 1:
            return run_per_window(self._run, input_ids, attention_mask, token_type_ids)
        return self._run(input_ids, attention_mask, token_type_ids)

    def _run(self, input_ids, attention_mask, token_type_ids) -> dict[str, np.ndarray]:
        feed = self._feed(input_ids, attention_mask, token_type_ids)
        if self.device == "cuda":
            binding = self.session.io_binding()
            for name, value in feed.items():
                binding.bind_cpu_input(name, value)
            for name in self.outputs:
                binding.bind_output(name, "cuda")
            self.session.run_with_iobinding(binding, self.run_options)
            values = binding.copy_outputs_to_cpu()
        else:
            values = self.session.run(self.outputs, feed, self.run_options)
        return {name: np.asarray(v, dtype=np.float32) for name, v in zip(self.outputs, values, strict=True)}
