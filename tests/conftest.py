import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import settings


def _search_the_repository_last() -> None:
    """The repository's kernels/ folder (installed as imagic.kernels) is a top-level `kernels` package to anything
    that searches the repository root first, as `python -m pytest` does. transformers >= 5.25 depends on the
    `kernels` distribution and imports it with `import transformers` (via diffusers too): finding ours instead
    fails every reference test. So the root goes to the end of sys.path, where `tests.*` still resolves and
    installed packages win. Runs before any test module imports transformers (this file is loaded first)."""
    root = Path(__file__).resolve().parents[1]
    at_root = [p for p in sys.path if Path(p or ".").resolve() == root]
    if at_root:
        sys.path[:] = [p for p in sys.path if p not in at_root] + [str(root)]


_search_the_repository_last()

# CI runs the property-based tests on a fixed example stream (no flaky landings); locally they explore new examples.
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")

# Triton reads TRITON_INTERPRET when first imported (diffusers imports it via torch); the CPU kernel tests need it.
# Our ops still pick torch on CPU unless a test forces Triton (kernels.use_triton(True)).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The tests run tiny models: one thread is fastest for them, and two threads on two busy cores (helpers, CI
# neighbours) were measured up to 50x slower.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
