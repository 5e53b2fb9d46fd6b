"""Run prune-serve as in an environment where torch, transformers and the build code are not installed.

`python tests/without_torch.py [prune-serve args]`: any import of a blocked package fails as it would
there, and is recorded; at exit the modules that were loaded and the attempts go to $IMPORT_REPORT.
"""

import atexit
import importlib.abc
import json
import os
import runpy
import sys

BLOCKED = ("torch", "transformers", "packer.build", "packer.evaluate", "packer.synth")
attempts: list[str] = []


class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            attempts.append(name)
            raise ModuleNotFoundError(
                f"No module named {name!r} (blocked by tests/without_torch.py)", name=name
            )
        return None


def report() -> None:
    with open(os.environ["IMPORT_REPORT"], "w") as f:
        json.dump({"modules": sorted(sys.modules), "attempts": attempts}, f)


sys.meta_path.insert(0, Block())
atexit.register(report)
sys.argv = ["prune-serve", *sys.argv[1:]]
runpy.run_module("service.cli", run_name="__main__")
