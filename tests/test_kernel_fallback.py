"""A Triton kernel that cannot run on a user's GPU costs one warning, never the edit (kernels/dispatch.py), and a
config that does not fit the GPU is never launched (kernels/launch.py).

Failures are injected on the CPU: every launch (or only the backward ones) raises the error a real GPU would give:
Triton's CompilationError (an architecture or feature Triton cannot compile for), OutOfResources (more shared
memory than a block may have), a driver/toolchain mismatch (RuntimeError from the driver), KernelDoesNotFit (no
config left after the fit check). Each op must then return its torch path's result, warn once naming the op, the
GPU and the reason, and stay on torch for the rest of the process.
"""
from __future__ import annotations

import ast
import warnings

import pytest
import torch
import torch.nn.functional as F

from imagic import kernels
from imagic.kernels import dispatch, launch
from tests.helpers import rel_err

pytestmark = pytest.mark.skipif(not dispatch.triton_available(), reason="Triton is not installed")
# On a GPU machine the same tests run on CUDA tensors in fp16 (fp32 attention goes to SDPA there by design).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.float16 if DEVICE == "cuda" else torch.float32
TOL = 2e-2 if DTYPE == torch.float16 else 1e-4  # the kernel tests' standards (tests/test_kernels.py)
GPU_NAME = "the CPU (Triton interpreter)" if DEVICE == "cpu" else "(sm_"


def _errors():
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources
    return {
        "compile": CompilationError("def k(): ...", ast.parse("x").body[0], "sm_120 is not supported"),
        "resources": OutOfResources(200_000, 101_376, "shared memory"),
        "driver": RuntimeError("Triton Error [CUDA]: the provided PTX was compiled with an unsupported toolchain"),
        "no-fit": launch.KernelDoesNotFit("_attn_fwd: none of 3 configs fits this GPU (812 spilled registers)"),
    }


EXPECTED_REASON = {"compile": "sm_120 is not supported", "resources": "shared memory",
                   "driver": "unsupported toolchain", "no-fit": "none of 3 configs fits"}


@pytest.fixture
def failing(monkeypatch):
    """failing(error, only=predicate on the kernel name): launches raise `error`; returns the attempted names."""
    attempts = []

    def install(error, only=lambda name: True):
        original = launch.TritonKernel.__call__

        def call(self, *args, **kwargs):
            attempts.append(self.fn.__name__)
            if only(self.fn.__name__):
                raise error
            return original(self, *args, **kwargs)

        monkeypatch.setattr(launch.TritonKernel, "__call__", call)
        return attempts

    kernels.reset_failures()
    yield install
    kernels.reset_failures()


def _ops(x):
    return {"attention": lambda: kernels.attention(x, x, x),
            "group_norm": lambda: kernels.group_norm(x, 2, None, None, silu=True),
            "layer_norm": lambda: kernels.layer_norm(x, None, None),
            "geglu": lambda: kernels.geglu(x)}


def _references(x):
    return {"attention": F.scaled_dot_product_attention(x, x, x),
            "group_norm": kernels.group_norm_reference(x, 2, None, None, silu=True),
            "layer_norm": kernels.layer_norm_reference(x, None, None),
            "geglu": kernels.geglu_reference(x)}


def _kernel_warnings(record):
    return [str(w.message) for w in record if "imagic.kernels" in str(w.message)]


@pytest.mark.parametrize("kind", ["compile", "resources", "driver", "no-fit"])
def test_each_op_falls_back_once_with_one_warning(failing, kind):
    attempts = failing(_errors()[kind])
    x = torch.randn(2, 4, 3, 40, device=DEVICE, dtype=DTYPE)
    with kernels.use_triton(True), warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        first = {op: fn() for op, fn in _ops(x).items()}
        tried = len(attempts)
        second = {op: fn() for op, fn in _ops(x).items()}
    refs = _references(x)
    for op in refs:
        assert torch.equal(first[op], refs[op]) and torch.equal(second[op], refs[op]), op
    messages = _kernel_warnings(record)
    assert len(messages) == 4, messages  # one per op, none for the second round
    for op in refs:
        (m,) = [m for m in messages if f"Triton {op} kernel" in m]
        assert GPU_NAME in m and EXPECTED_REASON[kind] in m and "torch path" in m
    assert set(kernels.failed_ops()) == set(refs)
    assert len(attempts) == tried  # the second round did not even try the kernels


def test_backward_only_failure_keeps_the_forward_and_gives_reference_gradients(failing):
    if DEVICE == "cpu" and not kernels.interpreter_ready():
        pytest.skip("the forward kernels must really run (Triton interpreter)")
    attempts = failing(_errors()["resources"], only=lambda name: "bwd" in name or "backward" in name)
    q, k, v = (torch.randn(1, 2, 19, 40, device=DEVICE, dtype=DTYPE, requires_grad=True) for _ in range(3))
    with kernels.use_triton(True), warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = kernels.attention(q, k, v)
        grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    assert "_attn_fwd" in attempts and any("bwd" in a for a in attempts)
    ref_in = [t.detach().requires_grad_(True) for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*ref_in)
    ref_grads = torch.autograd.grad(ref, ref_in, torch.ones_like(ref))
    assert rel_err(out, ref) < TOL  # the Triton forward against SDPA
    for a, b in zip(grads, ref_grads):
        assert rel_err(a, b) < TOL
    assert len(_kernel_warnings(record)) == 1 and list(kernels.failed_ops()) == ["attention"]


def test_out_of_memory_and_strict_mode_are_not_hidden(failing):
    x = torch.randn(2, 4, 3, 40, device=DEVICE, dtype=DTYPE)
    failing(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    with kernels.use_triton(True), pytest.raises(torch.cuda.OutOfMemoryError):
        kernels.layer_norm(x, None, None)  # the torch path needs the memory too: the user must see it
    failing(_errors()["driver"])
    with kernels.use_triton(True, strict=True), pytest.raises(RuntimeError, match="toolchain"):
        kernels.layer_norm(x, None, None)
    assert kernels.failed_ops() == {}


def test_an_edit_goes_on_when_every_kernel_fails(failing, tmp_path):
    """A whole (tiny) edit with every Triton launch failing gives the torch path's edit, with one warning per op."""
    from PIL import Image

    from imagic.editor import Editor
    from tests.tiny import write_tiny_checkpoint

    editor = Editor.from_checkpoint(write_tiny_checkpoint(tmp_path / "tiny.safetensors"), device=DEVICE,
                                    progress=False)
    image = Image.new("RGB", (32, 32), (200, 30, 20))
    settings = dict(embed_steps=3, embed_lr=2e-2, finetune_steps=3, finetune_lr=1e-2)

    def edit():
        run = editor.fit(image, "a blue square", **settings)
        return run, editor.sample(run, alpha=[1.0], seeds=[0], steps=3).images[(0, 1.0)]

    with kernels.use_triton(False):
        torch_run, torch_image = edit()
    failing(_errors()["resources"])
    with kernels.use_triton(True), warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        run, image_out = edit()
    assert {m.split("Triton ")[1].split(" kernel")[0] for m in _kernel_warnings(record)} <= {
        "attention", "group_norm", "layer_norm", "geglu"}
    # on a GPU the fp32 edit sends attention and GEGLU to torch before any kernel is tried
    assert len(_kernel_warnings(record)) == len(kernels.failed_ops()) >= (3 if DEVICE == "cpu" else 1)
    assert rel_err(run.optimized_embedding, torch_run.optimized_embedding) < 1e-5
    assert (abs(torch.tensor(list(image_out.getdata()), dtype=torch.float)
                - torch.tensor(list(torch_image.getdata()), dtype=torch.float)).max() <= 1)  # 8-bit rounding


# ------------------------------------------------------------------------------- configs that do not fit

class _Loaded:
    """Stands in for a compiled kernel: `run` loads the binary, which may raise OutOfResources."""

    def __init__(self, spills=0, shared_error=False):
        self.n_spills = spills
        self._shared_error = shared_error

    @property
    def run(self):
        if self._shared_error:
            raise _errors()["resources"]
        return lambda *a: None


def test_resource_problem_reads_the_loaded_binary():
    assert launch.resource_problem(_Loaded()) is None
    assert "5 spilled registers" in launch.resource_problem(_Loaded(spills=5))
    assert "shared memory" in launch.resource_problem(_Loaded(shared_error=True))


def _kernel_with_problems(monkeypatch, bad_blocks):
    k = launch.TritonKernel(lambda: None, key=(), interpret={})
    monkeypatch.setattr(k, "_problem", lambda named, meta: "1024 spilled registers" if meta["BLOCK"] in bad_blocks
                        else None)
    return k


def test_autotuning_only_sees_fitting_configs(monkeypatch):
    import triton
    configs = [triton.Config(dict(BLOCK=b), num_warps=4) for b in (64, 128, 256)]
    kept = _kernel_with_problems(monkeypatch, {128, 256})._fitting(configs, {})
    assert [c.kwargs["BLOCK"] for c in kept] == [64]
    with pytest.raises(launch.KernelDoesNotFit, match="none of 3 configs"):
        _kernel_with_problems(monkeypatch, {64, 128, 256})._fitting(configs, {})


def test_a_single_config_that_does_not_fit_is_not_launched(monkeypatch):
    k = _kernel_with_problems(monkeypatch, {1024})
    k._jit = type("Jit", (), {"arg_names": ["X"]})()
    x = torch.empty(4)
    k._check_single((x,), dict(BLOCK=512))
    with pytest.raises(launch.KernelDoesNotFit, match="spilled"):
        k._check_single((x,), dict(BLOCK=1024))


@pytest.mark.parametrize("cc,dtype,launched", [(75, torch.bfloat16, False), (75, torch.float16, True),
                                               (80, torch.bfloat16, True)])
def test_bf16_is_never_launched_before_sm80(cc, dtype, launched):
    """What a T4 would run: recorded on meta tensors for that target, bf16 attention and norms go to torch."""
    x = torch.empty(1, 8, 64, 40, device="meta", dtype=dtype)
    with launch.recording(launch.TARGETS[cc]) as found:
        kernels.attention(x, x, x)
        kernels.layer_norm(x, None, None)
    assert bool(found) == launched
    assert not launch.TARGETS[75].supports(torch.bfloat16) and launch.TARGETS[86].supports(torch.bfloat16)


@pytest.mark.parametrize("cc,expected", [(75, False), (80, True), (86, True), (90, True)])
def test_attention_on_cuda_before_sm80_goes_to_sdpa(monkeypatch, cc, expected):
    """Triton has no tensor-core dots before sm_80 (GpuArch.tensor_core_dots; proven by the T4 compile in
    tests/test_kernel_compile.py), so a T4's attention is SDPA's without trying to compile and warning."""
    import importlib

    from torch._subclasses.fake_tensor import FakeTensorMode

    A = importlib.import_module("imagic.kernels.attention")  # the module; the package exports the function
    monkeypatch.setattr(A, "gpu_arch", lambda device: launch.TARGETS[cc])
    with FakeTensorMode():  # CUDA tensors without a GPU: only their metadata is read
        q = torch.empty(2, 8, 64, 40, device="cuda", dtype=torch.float16)
        assert q.is_cuda
        assert A.supported(q, q, q) is expected
