"""Triton kernels vs their torch references: the output and every gradient, with the same upstream gradient.

Without CUDA the kernels run under the Triton interpreter on tiny shapes, fp32 and fp16 (the interpreter gets
bf16 silently wrong); with CUDA the same small cases run compiled. The interpreter must be switched on before
anything imports Triton (diffusers does, through torch), so tests/conftest.py has to set it; `test_interpreter_ready`
says so if that did not happen. Interpreter tiles are 16 wide, so these shapes cross several blocks and end in
ragged tails. GPU tests (`pytest -m gpu` on a CUDA machine) add bf16 and Stable Diffusion's real shapes.

Tolerances are max abs error / reference std (`rel_err`): 1e-4 in fp32 (the project's standard). In fp16 the
reference runs in fp32 on the same fp16 inputs, so the error is the kernel's own rounding (the output, and the
probabilities / score gradients that tl.dot consumes in fp16, as in FlashAttention): each rounded by up to u16 =
4.9e-4 relative, they move the output by up to u16 (max|o| + max|v|) ~ 5 u16 for unit Gaussian v, relative to a
std that a softmax over 77 keys shrinks to ~0.2: ~1.2e-2, under TOL's 2e-2 (measured <= 7e-3).
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # effective only if nothing imported Triton yet (running this file alone)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from imagic import kernels  # noqa: E402
from imagic.kernels import dispatch, launch  # noqa: E402
from imagic.kernels.attention import flash_forward  # noqa: E402 (the name `attention` is the function)
from tests.helpers import rel_err  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}  # bf16 rounds 8x coarser than fp16
needs_triton = pytest.mark.skipif(not dispatch.triton_available(), reason="Triton is not installed")


SHADOW_CHECK = r"""
import importlib.metadata, pathlib, sys
root = pathlib.Path.cwd().resolve()
try:
    importlib.metadata.version("kernels")
    installed = True
except importlib.metadata.PackageNotFoundError:
    installed = False
try:
    import kernels
    where = pathlib.Path(kernels.__file__).resolve()
    assert installed and where.parent != root / "kernels", where
except ModuleNotFoundError:
    assert not installed
import imagic.kernels
assert imagic.kernels.attention is not None and pathlib.Path(imagic.kernels.__file__).parent == root / "kernels"
print("ok")
"""


@pytest.mark.parametrize("code", ["from diffusers import UNet2DConditionModel; print('ok')",
                                  "from transformers import CLIPTextModel; print('ok')", SHADOW_CHECK],
                         ids=["diffusers", "transformers", "import-kernels"])
def test_the_repository_root_does_not_shadow_installed_packages(code):
    """Python started in the repository root (as for a notebook there) finds its kernels/ folder as a top-level
    `kernels` first; it must hand over to the installed `kernels` distribution that transformers >= 5.25 imports
    (kernels/_standin.py), or fail as if absent, while `imagic.kernels` keeps working."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


def test_interpreter_ready():
    """Without CUDA the kernel tests need Triton imported under TRITON_INTERPRET=1 (see kernels/dispatch.py)."""
    if DEVICE == "cuda" or not dispatch.triton_available():
        pytest.skip("CUDA present (kernels run compiled) or Triton absent")
    assert kernels.interpreter_ready(), (
        "Triton was imported before TRITON_INTERPRET=1 was set: tests/conftest.py must set it (when CUDA is "
        "unavailable) before any test module imports diffusers/transformers/triton")


@pytest.fixture
def launches(monkeypatch):
    """Counts Triton kernel launches, to tell which side of the dispatch ran."""
    calls = []
    original = launch.TritonKernel.__call__

    def counted(self, *args, **kwargs):
        calls.append(self.fn.__name__)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(launch.TritonKernel, "__call__", counted)
    return calls


@pytest.fixture
def triton_on(monkeypatch, launches):
    """Triton forced on: compiled on CUDA, else the interpreter on CPU tensors. Yields the launch list."""
    if DEVICE == "cpu" and not kernels.interpreter_ready():
        pytest.skip("the Triton interpreter is not active (see test_interpreter_ready)")
    _startup_env(monkeypatch, None)
    kernels.reset_failures()
    with kernels.use_triton(True, strict=True):  # strict: a failing kernel raises, never hides behind torch
        yield launches


def compare(op, reference, inputs, grad_mask=None, tol=None):
    """Run `op` and `reference` (on fp32 copies of the inputs; the reference may compute in float64), compare
    the output and the input gradients for the same random upstream gradient. The message lists every error."""
    grad_mask = grad_mask or [isinstance(t, torch.Tensor) and t.is_floating_point() for t in inputs]
    ours_in = [t.detach().clone().requires_grad_(g) for t, g in zip(inputs, grad_mask)]
    ref_in = [t.detach().float().requires_grad_(g) for t, g in zip(inputs, grad_mask)]
    out = op(*ours_in)
    ref = reference(*ref_in)
    assert out.dtype == inputs[0].dtype and out.shape == ref.shape
    upstream = torch.randn(ref.shape, device=ref.device).to(out.dtype)
    ours_grads = torch.autograd.grad(out, [t for t, m in zip(ours_in, grad_mask) if m], upstream)
    ref_grads = torch.autograd.grad(ref, [t for t, m in zip(ref_in, grad_mask) if m], upstream.to(ref.dtype))
    for ours, theirs, leaf in zip(ours_grads, ref_grads, [t for t, m in zip(ours_in, grad_mask) if m]):
        assert ours.shape == theirs.shape and ours.dtype == leaf.dtype
    errors = [rel_err(out, ref)] + [rel_err(a, b) for a, b in zip(ours_grads, ref_grads)]
    tol = TOL[out.dtype] if tol is None else tol
    assert all(e <= tol for e in errors), f"errors (out, grads...) = {errors}"  # NaN fails too (max() would not)
    return errors


# ------------------------------------------------------------------------------------------- attention

def _qkv(B, H, Lq, Lk, D, dtype=torch.float32, device=DEVICE):
    return [torch.randn(B, H, L, D, device=device).to(dtype) for L in (Lq, Lk, Lk)]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("lq,lk", [(19, 77), (19, 13), (33, 33)], ids=["cross77", "cross13", "self33"])
@pytest.mark.parametrize("head_dim", [40, 64, 80, 160])
def test_attention_matches_reference(triton_on, head_dim, lq, lk, dtype):
    compare(kernels.attention, kernels.attention_reference, _qkv(2, 2, lq, lk, head_dim, dtype))
    assert {"_attn_fwd", "_attn_bwd_delta", "_attn_bwd_dkdv", "_attn_bwd_dq"} <= set(triton_on)


@needs_triton
def test_attention_strided_heads_and_scale(triton_on):
    """q/k/v as the UNet passes them, (B, L, H, D).transpose(1, 2) views, and a non-default softmax scale."""
    B, H, Lq, Lk, D = 2, 3, 21, 18, 40
    q, k, v = (torch.randn(B, L, H, D, device=DEVICE).transpose(1, 2) for L in (Lq, Lk, Lk))
    compare(lambda q, k, v: kernels.attention(q, k, v, scale=0.3),
            lambda q, k, v: kernels.attention_reference(q, k, v, scale=0.3), [q, k, v])


@needs_triton
@pytest.mark.parametrize("grad_mask", [[False, True, True], [True, False, False]], ids=["kv-only", "q-only"])
def test_attention_partial_gradients(triton_on, grad_mask):
    """Only the gradient kernels that are needed run."""
    compare(kernels.attention, kernels.attention_reference, _qkv(1, 2, 19, 13, 40), grad_mask=grad_mask)
    assert ("_attn_bwd_dq" in triton_on) == grad_mask[0]
    assert ("_attn_bwd_dkdv" in triton_on) == grad_mask[1]


@needs_triton
def test_attention_logsumexp(triton_on):
    """The saved statistic is the natural-log logsumexp of the scaled scores, in fp32."""
    q, k, v = _qkv(1, 2, 19, 77, 80, torch.float16)
    scale = 80 ** -0.5
    _, lse = flash_forward(q, k, v, scale)
    ref = torch.logsumexp(q.float() @ k.float().transpose(-1, -2) * scale, dim=-1)
    assert lse.dtype == torch.float32 and lse.shape == ref.shape
    assert (lse - ref).abs().max() < 1e-4


def _attention_fp64(q, k, v):
    """Ground truth for ill-conditioned inputs (attention_reference itself computes in fp32)."""
    q, k, v = q.double(), k.double(), v.double()
    return ((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5).softmax(-1) @ v


@needs_triton
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # dK/dV tile rows past Lk, never
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # stored (see _attn_bwd_dkdv)
def test_attention_extreme_scores(triton_on):
    """A peaked softmax (score std ~16), and rows whose scores are all about -150: there exp2(0 - lse) would
    overflow on padded keys, so their p must be forced to exactly 0 (never exp2(huge) * 0 = NaN).

    Against float64, the bound grows with the scores: s = q.k / sqrt(D) carries an absolute fp32 error of about
    (sqrt(D) + 2) u |s| (the D-term dot product's rounding, random-walk growth, plus the scale and the exp2
    argument), which the softmax's shift invariance does not remove; p's relative error is that error minus its
    p-weighted mean, so outputs and gradients move by up to 2x it times what p weights (v, and dO.v backwards:
    below 4 std for unit Gaussians). At |s| ~ 150 that is 6e-4; the fp32 torch path is itself off by ~7e-5 there, and
    the kernel's error moves with the BLAS kernel numpy's matmul picks (OPENBLAS_CORETYPE)."""
    def tol(q, k):
        d, u = q.shape[-1], torch.finfo(torch.float32).eps / 2
        s_max = float((q @ k.transpose(-1, -2)).abs().max()) / d ** 0.5
        return max(TOL[torch.float32], 8 * (d ** 0.5 + 2) * u * s_max)

    q, k, v = _qkv(1, 1, 19, 13, 40)
    compare(kernels.attention, _attention_fp64, [q * 4, k * 4, v], tol=tol(q * 4, k * 4))
    q, k = q.abs() + 1, -6 * (k.abs() + 1)  # scores = sum_d q_d k_d / sqrt(40) ~ -6 * 1.8 * 1.8 * sqrt(40)
    assert ((q @ k.transpose(-1, -2)) / 40 ** 0.5).max() < -90  # exp2(-lse * log2(e)) > fp32 max
    compare(kernels.attention, _attention_fp64, [q, k, v], tol=tol(q, k))


# --------------------------------------------------------------------------------------------- norms

def _affine(c: int, dtype=torch.float32, device=DEVICE):
    return [(1 + 0.3 * torch.randn(c, device=device)).to(dtype), (0.3 * torch.randn(c, device=device)).to(dtype)]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("silu", [False, True], ids=["plain", "silu"])
@pytest.mark.parametrize("shape,groups", [((2, 6, 5, 7), 3), ((1, 8, 3, 1, 3), 4), ((2, 4, 33), 2)],
                         ids=["2d-odd", "3d", "1d"])
def test_group_norm_matches_reference(triton_on, shape, groups, silu, dtype):
    x = (torch.randn(shape, device=DEVICE) * 2 + 0.5).to(dtype)
    # fp32 parameters with fp16 activations, as under autocast
    compare(lambda x, w, b: kernels.group_norm(x, groups, w, b, 1e-5, silu=silu),
            lambda x, w, b: kernels.group_norm_reference(x, groups, w, b, 1e-5, silu=silu), [x, *_affine(shape[1])])
    assert {"_gn_stats", "_gn_forward", "_gn_bwd_sums", "_gn_bwd_dx"} <= set(triton_on)


@needs_triton
def test_group_norm_without_affine_and_large_mean(triton_on):
    """weight=bias=None, and mean = 300 std: a single-pass E[x^2] - E[x]^2 would cancel (our sums are shifted).
    Checked against float64, since the fp32 reference is itself off by 1e-4 std on such inputs."""
    x = torch.randn(2, 4, 9, 11, device=DEVICE) * 0.1 + 30.0
    compare(lambda x: kernels.group_norm(x, 2, None, None, 1e-6),
            lambda x: F.group_norm(x.double(), 2, None, None, 1e-6), [x])


@needs_triton
def test_group_norm_half_parameters(triton_on):
    """A model stored in fp16: parameters and their gradients in fp16."""
    x = torch.randn(2, 6, 4, 5, device=DEVICE).half()
    compare(lambda x, w, b: kernels.group_norm(x, 3, w, b, silu=True),
            lambda x, w, b: kernels.group_norm_reference(x, 3, w, b, silu=True), [x, *_affine(6, torch.float16)])


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", [(3, 5, 37), (7, 64), (2, 320)], ids=["odd", "pow2", "sd"])
def test_layer_norm_matches_reference(triton_on, shape, dtype):
    x = (torch.randn(shape, device=DEVICE) + 0.5).to(dtype)
    compare(lambda x, w, b: kernels.layer_norm(x, w, b, 1e-6),
            lambda x, w, b: kernels.layer_norm_reference(x, w, b, 1e-6), [x, *_affine(shape[-1])])
    assert {"_ln_forward", "_ln_backward"} <= set(triton_on)


@needs_triton
def test_layer_norm_without_affine(triton_on):
    compare(lambda x: kernels.layer_norm(x, None, None), lambda x: kernels.layer_norm_reference(x, None, None),
            [torch.randn(4, 3, 24, device=DEVICE)])


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", [(2, 5, 74), (3, 80)], ids=["odd", "even"])
def test_geglu_matches_reference(triton_on, shape, dtype):
    compare(kernels.geglu, kernels.geglu_reference, [(torch.randn(shape, device=DEVICE) * 2).to(dtype)])
    assert {"_geglu_forward", "_geglu_backward"} <= set(triton_on)


def test_geglu_reference_is_exact_gelu():
    """The spec itself: erf GELU, not the tanh approximation (the silent-bug list).

    Compared with the float64 formula. The bound follows from fp32's accuracy, not from one CPU's output: gelu(x)
    = x * Phi(x) with Phi = (1 + erf(x / sqrt 2)) / 2; an erf good to a few ulps of 1 (vectorised erf kernels
    differ between CPUs: on Intel Xeons F.gelu and torch.erf disagree by ~1e-3 relative near zero) puts an error
    of a few eps32 * |x| on the product, plus the product's own rounding, a few eps32 * |gelu(x)|. The tanh
    approximation is off by up to ~5e-4 absolute, over 100x that bound, and must fail it.
    """
    h = torch.randn(64, 2000) * 3
    a, gate = h.double().chunk(2, -1)
    exact = a * gate * 0.5 * (1 + torch.erf(gate / math.sqrt(2)))
    eps = torch.finfo(torch.float32).eps
    bound = 8 * eps * (a.abs() * gate.abs() + exact.abs())

    def within(y: torch.Tensor) -> bool:
        return bool(((y.double() - exact).abs() <= bound).all())

    assert within(kernels.geglu_reference(h))
    tanh = h.chunk(2, -1)[0] * F.gelu(h.chunk(2, -1)[1], approximate="tanh")
    assert not within(tanh)


# ------------------------------------------------------------------------------------------ dispatch

def _all_ops(x: torch.Tensor):
    """Every public op on a (2, 4, 3, 40) tensor."""
    return [kernels.attention(x, x, x), kernels.group_norm(x, 2, None, None, silu=True),
            kernels.layer_norm(x, None, None), kernels.geglu(x)]


def _all_references(x: torch.Tensor):
    return [F.scaled_dot_product_attention(x, x, x), kernels.group_norm_reference(x, 2, None, None, silu=True),
            kernels.layer_norm_reference(x, None, None), kernels.geglu_reference(x)]


def _startup_env(monkeypatch, value):
    """IMAGIC_KERNELS set to `value` (None: unset) as if at start-up, when dispatch reads it once."""
    if value is None:
        monkeypatch.delenv("IMAGIC_KERNELS", raising=False)
    else:
        monkeypatch.setenv("IMAGIC_KERNELS", value)
    monkeypatch.setattr(dispatch, "STARTUP_CHOICE", dispatch.environment_choice())


def test_cpu_tensors_use_torch_by_default(monkeypatch, launches):
    """Without CUDA tensors and without forcing, every public op is the torch reference / SDPA."""
    _startup_env(monkeypatch, None)
    x = torch.randn(2, 4, 3, 40)
    for ours, ref in zip(_all_ops(x), _all_references(x)):
        assert torch.equal(ours, ref)
    assert launches == []


@needs_triton
@pytest.mark.parametrize("how", ["context", "env"])
def test_forcing_torch(triton_on, monkeypatch, how):
    """use_triton(False) or IMAGIC_KERNELS=torch gives the reference even where Triton would run."""
    x = torch.randn(2, 4, 3, 40, device=DEVICE)
    with kernels.use_triton(None if how == "env" else False):
        _startup_env(monkeypatch, "torch" if how == "env" else "triton")
        for ours, ref in zip(_all_ops(x), _all_references(x)):
            assert torch.equal(ours, ref)
    assert triton_on == []


@needs_triton
def test_forcing_triton_by_env(triton_on, monkeypatch):
    _startup_env(monkeypatch, "triton")
    x = torch.randn(2, 4, 3, 40, device=DEVICE)
    with kernels.use_triton(None):
        for ours, ref in zip(_all_ops(x), _all_references(x)):
            assert rel_err(ours, ref) < 1e-4
    assert {"_attn_fwd", "_gn_forward", "_ln_forward", "_geglu_forward"} <= set(triton_on)


@needs_triton
def test_unsupported_attention_falls_back_to_sdpa(triton_on):
    """The VAE's single 512-dim head, and mixed dtypes, go to SDPA even when Triton is forced (which refuses
    mixed dtypes just as it would without us)."""
    q, k, v = _qkv(1, 1, 9, 9, 512)
    assert torch.equal(kernels.attention(q, k, v), F.scaled_dot_product_attention(q, k, v))
    q, k, v = _qkv(1, 2, 9, 9, 40)
    with pytest.raises(RuntimeError, match="dtype"):
        kernels.attention(q, k.double(), v.double())
    assert triton_on == []


def test_imports_and_works_without_triton():
    """The package imports and computes with Triton absent (`sys.modules['triton'] = None` blocks the import)."""
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, imagic.kernels as K\n"
            "x = torch.randn(2, 4, 3, 40)\n"
            "assert not K.triton_available() and not K.triton_enabled('attention', x)\n"
            "with K.use_triton(True):\n"
            "    y = [K.attention(x, x, x), K.group_norm(x, 2, None, None, silu=True), K.layer_norm(x, None, None),\n"
            "         K.geglu(x)]\n"
            "assert [t.shape[-1] for t in y] == [40, 40, 40, 20]\n")
    subprocess.run([sys.executable, "-c", code], check=True)


# -------------------------------------------------------------------- GPU: bf16 and real SD shapes
# Stable Diffusion at 512x512 (64x64 latent). SD1.x: 8 heads of dim 40/80/160 at 4096/1024/256/64 tokens;
# SD2.x: heads of dim 64 (5/10/20 heads); cross-attention over 77 text tokens at every level. Batch 1 keeps the
# fp32 reference (which materialises the scores) small.

SD_ATTENTION = [  # (H, Lq, Lk, D)
    (8, 4096, 4096, 40), (8, 1024, 1024, 80), (8, 256, 256, 160), (8, 64, 64, 160),
    (8, 4096, 77, 40), (8, 1024, 77, 80), (8, 256, 77, 160), (8, 64, 77, 160),
    (5, 4096, 4096, 64), (10, 1024, 1024, 64), (20, 256, 256, 64), (20, 64, 77, 64),
]
requires_gpu = pytest.mark.skipif(not (torch.cuda.is_available() and dispatch.triton_available()),
                                  reason="needs CUDA and Triton")


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", SD_ATTENTION, ids=lambda s: "x".join(map(str, s)))
def test_attention_sd_shapes_gpu(triton_on, launches, shape, dtype):
    H, Lq, Lk, D = shape
    compare(kernels.attention, kernels.attention_reference, _qkv(1, H, Lq, Lk, D, dtype, "cuda"))
    assert "_attn_fwd" in launches


@pytest.mark.gpu
@requires_gpu
def test_vae_attention_falls_back_gpu(triton_on, launches):
    q, k, v = _qkv(1, 1, 4096, 4096, 512, torch.float16, "cuda")
    assert rel_err(kernels.attention(q, k, v), kernels.attention_reference(q, k, v)) < TOL[torch.float16]
    assert launches == []


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", [(2, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 8, 8), (1, 128, 256, 256)],
                         ids=["320x64", "640x32", "1280x8", "vae128x256"])
def test_group_norm_sd_shapes_gpu(triton_on, shape, dtype):
    x = torch.randn(shape, device="cuda").to(dtype)
    w, b = _affine(shape[1], device="cuda")
    compare(lambda x, w, b: kernels.group_norm(x, 32, w, b, silu=True),
            lambda x, w, b: kernels.group_norm_reference(x, 32, w, b, silu=True), [x, w, b])


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("rows,dim", [(2 * 4096, 320), (2 * 1024, 640), (2 * 64, 1280), (77, 1024)])
def test_layer_norm_and_geglu_sd_shapes_gpu(triton_on, rows, dim, dtype):
    x = torch.randn(rows, dim, device="cuda").to(dtype)
    w, b = _affine(dim, device="cuda")
    compare(lambda x, w, b: kernels.layer_norm(x, w, b, 1e-6),
            lambda x, w, b: kernels.layer_norm_reference(x, w, b, 1e-6), [x, w, b])
    h = torch.randn(rows, 8 * dim, device="cuda").to(dtype)
    compare(kernels.geglu, kernels.geglu_reference, [h])


def test_tiny_unet_forward_backward_kernels_on_equals_off(triton_on):
    """The whole UNet with every Triton kernel (attention, GroupNorm+SiLU, LayerNorm, GEGLU) vs the torch path."""
    from imagic.config import UNetConfig
    from imagic.unet import UNetModel
    from tests.helpers import randomize_

    cfg = UNetConfig(model_channels=32, channel_mult=(1,), attention_resolutions=(1,), num_res_blocks=1,
                     num_heads=2, context_dim=16)
    unet = randomize_(UNetModel(cfg), seed=3).to(DEVICE)
    x = torch.randn(1, 4, 4, 4, device=DEVICE)
    ctx = torch.randn(1, 5, 16, device=DEVICE)
    t = torch.tensor([500], device=DEVICE)

    def run():
        c = ctx.clone().requires_grad_(True)
        unet.zero_grad(set_to_none=True)
        out = unet(x, t, c)
        out.pow(2).mean().backward()
        return out.detach(), c.grad, unet.input_blocks[1][1].proj_in.weight.grad

    on = run()
    assert len(triton_on) > 0  # the kernels really ran
    with kernels.use_triton(False):
        off = run()
    for a, b in zip(on, off):
        assert rel_err(a, b) < 1e-4
