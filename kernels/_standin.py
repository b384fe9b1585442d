"""What `kernels/__init__.py` does when Python imports this folder as the top-level package `kernels` (Python
started in the repository root): put the installed `kernels` distribution in its place, as if the folder were not
on sys.path."""
from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys


def hand_over(init_file: str) -> None:
    """Load the installed top-level `kernels` from sys.path without the repository root into sys.modules (the
    import statement then returns it), or raise ModuleNotFoundError when there is none."""
    sys.modules.pop("kernels._standin", None)  # this helper was loaded as part of the stand-in; forget it
    root = os.path.dirname(os.path.dirname(os.path.abspath(init_file)))
    path = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec("kernels", path)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError("No module named 'kernels' (the repository's kernels/ folder is imagic.kernels, "
                                  "not a top-level package)", name="kernels")
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = module
    spec.loader.exec_module(module)
