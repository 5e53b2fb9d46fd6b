"""The packed torch model as a backend: fp32 on CPU, fp16 on CUDA."""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from packer.runtime.backends.base import CudaOptions, default_threads, resolve_device
from packer.runtime.loading import LoadedModel


def sees_cuda() -> bool:
    return torch.cuda.is_available()


def cuda_info() -> dict:
    """torch's CUDA build, cuDNN and GPUs (prune-serve doctor)."""
    return {
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
    }


def computes_on_gpu() -> tuple[bool, str]:
    """A 2x2 matmul on the GPU, checked on the host."""
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]], device="cuda")
    ok = bool(torch.allclose((x @ x).cpu(), torch.tensor([[7.0, 10.0], [15.0, 22.0]])))
    return ok, torch.cuda.get_device_name(0)


# SDPA without cuDNN's attention on CUDA: it builds an execution plan for every new shape (hundreds of
# ms, measured on an H100), and a pruned model's per-layer head counts make each (batch, length) a new
# shape in every layer; the fused efficient/flash kernels need no plan.
GPU_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class TorchBackend:
    def __init__(
        self,
        loaded: LoadedModel,
        device: str = "auto",
        strict: bool = False,
        threads: int | None = None,
        cuda: CudaOptions | None = None,
    ):
        self.device = resolve_device(device, torch.cuda.is_available(), strict, "torch")
        self.dtype = "fp16" if self.device == "cuda" else "fp32"
        self.name = f"torch-{self.device}-{self.dtype}"
        self.batch_invariant = True  # padded rows differ by float rounding only (tested within 1e-5)
        self.per_window = False
        if self.device == "cpu":
            torch.set_num_threads(threads or default_threads())
        model = loaded.model
        self.providers = [self.device]
        if self.device == "cuda":
            cuda = cuda or CudaOptions()
            if cuda.memory_limit_mb:
                total = torch.cuda.get_device_properties(cuda.device_id).total_memory
                fraction = min(1.0, cuda.memory_limit_mb * 1024 * 1024 / total)
                torch.cuda.set_per_process_memory_fraction(fraction, cuda.device_id)
            model = model.half().to("cuda")
        self.model = model.eval()
        self.config = loaded.config

    @torch.inference_mode()
    def run(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        def tensor(a):
            return (
                None
                if a is None
                else torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(self.device)
            )

        if attention_mask.all():  # decided on the host: asking the GPU tensor would sync every call
            attention_mask = None
        with sdpa_kernel(GPU_ATTENTION) if self.device == "cuda" else contextlib.nullcontext():
            out = self.model(tensor(input_ids), tensor(attention_mask), tensor(token_type_ids))
        names = ("start_logits", "end_logits") if out.get("start_logits") is not None else ("logits",)
        return {name: out[name].float().cpu().numpy() for name in names}
