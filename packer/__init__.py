"""prune-serve packer: pruned checkpoints in, dense resized artifacts out."""

__version__ = "0.1.0"

from packer.artifact import LoadedModel, load

__all__ = ["LoadedModel", "__version__", "load"]
