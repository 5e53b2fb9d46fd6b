"""prune-serve packer: pruned checkpoints in, dense resized artifacts out.

Floors, by when their code runs: `artifact` (the on-disk contract, standard library only), `runtime`
(what serving needs: tokenizer, backends, tasks), `build` (reading, proving and packing checkpoints:
torch and transformers), `evaluate` (metrics, benchmarks, load generators) and `synth` (test models).
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `packer.load` is the torch variant's loader: imported on first use, so `import packer` stays light.
    if name in ("load", "LoadedModel"):
        from packer.runtime import loading

        return getattr(loading, name)
    raise AttributeError(f"module 'packer' has no attribute {name!r}")


__all__ = ["LoadedModel", "__version__", "load"]
