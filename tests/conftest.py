import os

import pytest
import torch
from hypothesis import settings

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
