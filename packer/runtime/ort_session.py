"""ONNX Runtime sessions for packed graphs: threads, spinning, arena, and the optimizers kept off."""

from __future__ import annotations

from pathlib import Path

from packer.errors import ArtifactError

# ONNX Runtime 1.32's SkipLayerNormalization CPU kernel is ~10x slower than LayerNormalization: CPU
# graphs are exported with Add + LayerNormalization, and sessions on the CPU provider must not fuse
# them back (its extended optimization level would).
CPU_DISABLED_OPTIMIZERS = ["SkipLayerNormFusion"]


def session(
    path: Path,
    threads: int | None = None,
    providers: list[str] | None = None,
    spinning: bool = True,
    memory_arena: bool = True,
    profile_prefix: str | None = None,
):
    import onnxruntime as ort

    if not path.is_file():
        raise ArtifactError(f"{path}: missing")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if profile_prefix:  # ORT's profiler: one JSON trace per session (prune-pack bench --profile)
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    if not memory_arena:  # buffers go back to the allocator after each run instead of a growing arena
        options.enable_cpu_mem_arena = False
    if not spinning:  # idle compute threads yield the cores (to tokenization and HTTP) instead of spinning
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = providers or ["CPUExecutionProvider"]
    # On the CPU provider, keep ORT from fusing Add + LayerNormalization back into the slow kernel.
    disabled = CPU_DISABLED_OPTIMIZERS if providers[0] == "CPUExecutionProvider" else None
    try:
        return ort.InferenceSession(str(path), options, providers=providers, disabled_optimizers=disabled)
    except Exception as exc:
        raise ArtifactError(f"{path}: ONNX Runtime cannot load it ({str(exc).splitlines()[0]})") from exc
