"""The engine: served models, their batcher registration and limits, reload swaps, and the pool that
tokenizes and post-processes off the event loop. Routers reach it as a dependency; no HTTP here."""

from __future__ import annotations

import asyncio
import logging
from contextlib import suppress
from dataclasses import dataclass, field

from packer.artifact import QA
from packer.runtime.backends.base import default_threads
from service.batching import Batcher, BatchLimits
from service.cpu_pool import ProcessCpuPool, ThreadCpuPool, make_pool
from service.errors import BadRequest, ModelNotFound, NotReady
from service.metrics import Metrics
from service.registry import RegistryError, Reload, ServedModel, load_models, reload_models
from service.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Engine:
    settings: Settings
    metrics: Metrics
    models: dict[str, ServedModel] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # name -> why it is not served
    ready: bool = False
    batcher: Batcher | None = None
    cpu: ThreadCpuPool | ProcessCpuPool | None = None  # tokenization and post-processing
    _reload_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Load every artifact (one that fails is marked failed; the rest serve), then start the worker."""
        self.batcher = Batcher(self.metrics)
        self.models, self.failed = load_models(self.settings)
        if not self.models:
            reasons = "; ".join(self.failed.values())
            raise RegistryError(f"no model could be loaded: {reasons}")
        workers = self.cpu_workers()
        # a worker process holds the windows of requests in flight: as many as the queues hold, and more
        kind = self.cpu_pool_kind(workers)
        restarts = self.metrics.cpu_worker_restarts
        self.cpu = make_pool(kind, workers, max_windows=4 * self.settings.queue_size, on_restart=restarts.inc)
        log.info("tokenization and post-processing: %d %s", workers, kind)
        for model in self.models.values():
            self._serve(model)
        self._mark_failed(self.failed)
        self.batcher.start()
        self.ready = True

    def _on_cuda(self) -> bool:
        return any(m.backend.device == "cuda" for m in self.models.values())

    def cpu_workers(self) -> int:
        if self.settings.cpu_workers:
            return self.settings.cpu_workers
        return min(4, default_threads()) if self._on_cuda() else 1

    def cpu_pool_kind(self, workers: int) -> str:
        """Threads or processes for the CPU side (docs/performance.md has the measured rates of each)."""
        if self.settings.cpu_pool != "auto":
            return self.settings.cpu_pool
        return "processes" if self._on_cuda() and workers > 1 else "threads"

    def stop(self) -> None:
        self.ready = False
        if self.batcher is not None:
            self.batcher.stop(timeout=self.settings.graceful_shutdown_s)
        if self.cpu is not None:
            self.cpu.shutdown()

    @property
    def is_ready(self) -> bool:
        if not self.ready or not self.models:
            return False
        return not (self.settings.require_all_models and self.failed)

    def limits_for(self, model: ServedModel) -> BatchLimits:
        s = self.settings
        return BatchLimits(
            # A backend that runs each window alone gains nothing from batches: schedule windows singly.
            max_batch_size=1 if model.backend.per_window else s.max_batch_size,
            max_batch_tokens=s.batch_tokens_for(model.backend.device),
            max_wait_ms=s.max_wait_ms,
            queue_size=s.queue_size,
            length_grouping=s.length_grouping,
            pad_to_multiple=8 if model.backend.device == "cuda" else 1,
        )

    def _serve(self, model: ServedModel, replacing: ServedModel | None = None) -> None:
        self.cpu.install(model.key, model.tokenizer)
        self.batcher.register(model.key, model.backend.run, model.pad_id, self.limits_for(model), model.name)
        if replacing is not None:
            self._retire(replacing)
        self.metrics.model_info.labels(model.name, model.variant, model.backend.name, str(model.params)).set(
            1
        )
        self.metrics.model_state.labels(model.name).set(1)
        self.metrics.queue_depth.labels(model.name).set(self.batcher.depth(model.name))

    def _retire(self, model: ServedModel) -> None:
        self.batcher.retire(model.key)  # in-flight windows finish on it
        self.cpu.retire(model.key)
        with suppress(KeyError):
            self.metrics.model_info.remove(model.name, model.variant, model.backend.name, str(model.params))

    def _mark_failed(self, failed: dict[str, str]) -> None:
        for name in failed:
            self.metrics.model_load_failures.labels(name).inc()
            if name not in self.models:
                self.metrics.model_state.labels(name).set(0)

    async def reload(self) -> Reload:
        """Load new and changed artifacts; a failure leaves the old model serving."""
        async with self._reload_lock:
            result = await asyncio.to_thread(reload_models, self.settings, self.models, self.failed)
            for name in result.loaded:
                self._serve(result.models[name], self.models.get(name))
            for name in result.removed:
                self._retire(self.models[name])
                with suppress(KeyError):
                    self.metrics.model_state.remove(name)
            self.models = result.models
            self.failed = result.still_failed
            self._mark_failed(result.failed)
            return result

    # -- requests --------------------------------------------------------------------------------

    def require_ready(self) -> Engine:
        if not self.ready:
            raise NotReady("the server is not ready", {"Retry-After": "1"})
        return self

    def model(self, name: str, task: str | None = None) -> ServedModel:
        model = self.models.get(name)
        if model is None:
            if name in self.failed:
                raise ModelNotFound(f"model {name!r} failed to load: {self.failed[name]}")
            raise ModelNotFound(f"no model named {name!r}; GET /v1/models lists the served models")
        if task is not None and model.task != task:
            route = "qa" if model.task == QA else "classify"
            raise BadRequest(f"model {name} does {model.task}; use /v1/models/{name}/{route}")
        return model

    def describe(self) -> list[dict]:
        served = [m.describe() for m in self.models.values()]
        failed = [{"name": name, "state": "failed", "reason": why} for name, why in self.failed.items()]
        return sorted(served + failed, key=lambda m: m["name"])
