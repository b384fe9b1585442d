import os

import pytest
import torch

# Triton reads TRITON_INTERPRET when first imported (diffusers imports it via torch); the CPU kernel tests need it.
# Our ops still pick torch on CPU unless a test forces Triton (kernels.use_triton(True)).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Two CPU cores in CI: keep torch from oversubscribing them.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
