"""The unpacked source checkpoint through transformers, behind the same Backend interface:
what users run today, for benchmarks and accuracy comparisons."""

from __future__ import annotations

import numpy as np
import torch

from packer.runtime.backends.base import default_threads, resolve_device


class SourceBackend:
    device = "cpu"
    dtype = "fp32"
    name = "transformers-cpu-fp32"

    def __init__(
        self,
        src: str,
        task: str | None = None,
        masks: str | None = None,
        threads: int | None = None,
        device: str = "cpu",
    ):
        from packer.build.pack import PackOptions, prepare
        from packer.build.verify import reference_model

        torch.set_num_threads(threads or default_threads())
        prepared = prepare(src, PackOptions(masks=masks, task=task, progress=False))
        self.source = prepared.source
        self.model = reference_model(prepared.source, attn_implementation="sdpa")
        self.device = resolve_device(device, torch.cuda.is_available(), False, "torch")
        if self.device == "cuda":  # the source as a GPU user runs it: fp16
            self.model = self.model.half().to("cuda")
            self.dtype, self.name = "fp16", "transformers-cuda-fp16"

    @torch.inference_mode()
    def run(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        kwargs = {
            "input_ids": torch.from_numpy(input_ids).to(self.device),
            "attention_mask": torch.from_numpy(attention_mask).to(self.device),
        }
        if token_type_ids is not None and int(self.source.config.get("type_vocab_size", 0) or 0) > 1:
            kwargs["token_type_ids"] = torch.from_numpy(token_type_ids).to(self.device)
        out = self.model(**kwargs)
        if getattr(out, "start_logits", None) is not None:
            return {
                "start_logits": out.start_logits.float().cpu().numpy(),
                "end_logits": out.end_logits.float().cpu().numpy(),
            }
        return {"logits": out.logits.float().cpu().numpy()}
