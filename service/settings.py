"""Every setting of the service, in one object (environment variables PRUNE_SERVE_*)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from packer.artifact import Variant
from packer.runtime.backends.base import CudaOptions
from packer.runtime.tasks.padding import BATCH_TOKENS, MAX_BATCH_SIZE, batch_tokens


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PRUNE_SERVE_", extra="ignore")

    models_dir: Path = Field(Path("models"), description="artifacts, one directory per model (its name)")
    variant: str = Field("auto", description="auto | torch | onnx | onnx-int8 | onnx-fp16")
    model_variants: str = Field("", description="per-model override: 'name=variant,name2=variant'")
    device: str = Field("auto", description="auto | cpu | cuda")
    strict_device: bool = Field(False, description="fail instead of falling back to cpu when cuda is missing")
    threads: int | None = Field(None, ge=1, description="compute threads of the one inference worker")
    ort_memory_arena: bool = Field(
        True, description="ONNX Runtime's CPU memory arena (faster; keeps its high-water mark after bursts)"
    )
    ort_spinning: bool = Field(
        True, description="let ONNX Runtime's idle threads spin (faster alone, slower beside tokenization)"
    )

    int8_batching: str = Field(
        "per-window",
        description="per-window: dynamic int8 runs one window at a time, so answers never depend on the "
        "batch (as fast on CPU); batched: padded batches, NOT batch-invariant (/v1/models says so)",
    )
    cuda_memory_limit_mb: int = Field(
        0, ge=0, description="GPU memory one model may take (ORT arena limit; torch memory fraction); 0: none"
    )
    cuda_arena_extend_strategy: str = Field(
        "kSameAsRequested",
        description="ORT CUDA arena growth: kSameAsRequested (grows by what a run needs) or kNextPowerOfTwo",
    )
    cuda_arena_shrinkage: bool = Field(
        False, description="give unused ORT CUDA arena memory back after each run (a little slower)"
    )
    cpu_workers: int = Field(
        0,
        ge=0,
        le=64,
        description="threads or processes (cpu_pool) that tokenize requests and turn logits into answers, "
        "beside the inference worker; 0: 1 when every model runs on the CPU (inference has the cores), "
        "up to 4 when one runs on CUDA",
    )
    cpu_pool: Literal["auto", "threads", "processes"] = Field(
        "auto",
        description="threads share the models' tokenizers but hold the GIL in windows assembly and "
        "post-processing (a second thread adds little); processes scale with cores, each with its own "
        "tokenizers and context cache (memory x workers); auto: processes when a model runs on CUDA and "
        "there is more than one worker, else threads",
    )
    context_cache_tokens: int = Field(
        1_000_000,
        ge=0,
        description="tokens of recent QA contexts kept encoded per model (~60 bytes each with the text; "
        "many questions about one document tokenize it once); 0: none (a cached context answers ~0.3 ms "
        "sooner per window, which a client could time to learn that someone sent it recently)",
    )
    max_batch_size: int = Field(MAX_BATCH_SIZE, ge=1, description="windows per batch")
    max_batch_tokens: int = Field(
        0,
        ge=0,
        description="padded tokens per batch (batch x longest window); 0: "
        f"{BATCH_TOKENS['cpu']} on CPU, where batching long windows gains nothing and padding costs, "
        f"{BATCH_TOKENS['cuda']} on CUDA",
    )
    max_wait_ms: float = Field(2.0, ge=0, description="wait for more windows, only when the queue is light")
    queue_size: int = Field(2048, ge=1, description="windows waiting, per model; beyond it requests get 429")
    max_windows_per_request: int = Field(
        1024, ge=1, description="windows one request may make (long contexts split into many); beyond it 413"
    )
    length_grouping: bool = Field(True, description="batch windows of similar length together")
    request_timeout_s: float = Field(30.0, gt=0, description="deadline of a request; past it, 504")

    max_items: int = Field(64, ge=1, description="questions or texts per request")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="request bodies larger than this get 413")
    max_context_chars: int = Field(100_000, ge=1, description="characters per context or text")

    api_key: SecretStr | None = Field(
        None, description="when set, every route but /health and /ready needs it; empty counts as unset"
    )
    open_admin: bool = Field(
        False, description="serve admin routes (reload) without an API key; loud warning; off by default"
    )
    metrics_require_key: bool = Field(
        True,
        description="with an API key set, /metrics needs it too; false opens it (for an in-cluster scraper)",
    )
    cors_origins: list[str] = Field(default_factory=list, description="allowed CORS origins; none by default")
    graceful_shutdown_s: float = Field(
        30.0, ge=0, description="how long SIGTERM waits for in-flight requests"
    )
    read_timeout_s: float = Field(
        10.0,
        gt=0,
        description="a request's headers and body must arrive within this, or the connection closes",
    )
    keep_alive_s: float = Field(5.0, gt=0, description="idle keep-alive connections close after this")
    max_connections: int = Field(
        1024, ge=1, description="concurrent connections; beyond it 503 (keep below the descriptor limit)"
    )
    access_log: bool = Field(
        False, description="one JSON line per request: method, route, status, duration, request id, model"
    )
    require_all_models: bool = Field(
        False, description="/ready only when every model loaded; otherwise when at least one serves"
    )

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_no_key(cls, value):
        # docker compose's ${PRUNE_SERVE_API_KEY:-} passes an empty string: that must not be a key.
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        return value

    @field_validator("variant")
    @classmethod
    def _variant(cls, value: str) -> str:
        allowed = {"auto", *Variant}
        if value not in allowed:
            raise ValueError(f"must be one of {', '.join(sorted(allowed))}")
        return value

    @field_validator("int8_batching")
    @classmethod
    def _int8_batching(cls, value: str) -> str:
        if value not in ("per-window", "batched"):
            raise ValueError("must be per-window or batched")
        return value

    @field_validator("cuda_arena_extend_strategy")
    @classmethod
    def _arena(cls, value: str) -> str:
        if value not in ("kSameAsRequested", "kNextPowerOfTwo"):
            raise ValueError("must be kSameAsRequested or kNextPowerOfTwo")
        return value

    def cuda_options(self) -> CudaOptions:
        return CudaOptions(
            memory_limit_mb=self.cuda_memory_limit_mb,
            arena_extend_strategy=self.cuda_arena_extend_strategy,
            arena_shrinkage=self.cuda_arena_shrinkage,
        )

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value not in ("auto", "cpu", "cuda"):
            raise ValueError("must be auto, cpu or cuda")
        return value

    def batch_tokens_for(self, device: str) -> int:
        if self.max_batch_tokens:
            return self.max_batch_tokens
        return batch_tokens(device)

    def variant_for(self, name: str) -> str:
        for pair in filter(None, (p.strip() for p in self.model_variants.split(","))):
            model, _, variant = pair.partition("=")
            if model.strip() == name:
                return variant.strip()
        return self.variant
