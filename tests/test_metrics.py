"""Edit metrics: PSNR/SSIM against numpy implementations of their formulas written here from the definitions (and
scikit-image's when installed), LPIPS against the `lpips` package (when installed) and a step-by-step torchvision
reference, CLIP score through open_clip from local files only, and the messages when weights are missing."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torchvision
from PIL import Image

from imagic.fileio import save_safetensors
from imagic.metrics import (
    ClipScorer, EditMetrics, LPIPS, MetricsError, plot_tradeoff, psnr, ssim)
from tests.helpers import randomize_, rel_err


def images(seed: int = 0, size: int = 40, noise: float = 20.0):
    """A smooth image and a noisy copy (uint8, H x W x 3)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    base = np.stack([128 + 100 * np.sin(xx / 5.0), 128 + 80 * np.cos(yy / 7.0), (xx + yy) * 2.0], -1)
    a = np.clip(base, 0, 255).astype(np.uint8)
    b = np.clip(base + rng.normal(0, noise, base.shape), 0, 255).astype(np.uint8)
    return a, b


# --- PSNR and SSIM ----------------------------------------------------------------------------------------------

def ssim_numpy(a: np.ndarray, b: np.ndarray) -> float:
    """Wang et al. 2004 eq. 13 with an 11x11 Gaussian window (sigma 1.5) at every position where the window fits,
    written with explicit windows (no convolution) from the paper's definitions of mu, sigma and sigma_xy."""
    r = np.arange(11) - 5.0
    w = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * 1.5 ** 2))
    w /= w.sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    values = []
    for ch in range(a.shape[2]):
        x = np.lib.stride_tricks.sliding_window_view(a[..., ch].astype(np.float64), (11, 11))
        y = np.lib.stride_tricks.sliding_window_view(b[..., ch].astype(np.float64), (11, 11))
        mx, my = (x * w).sum((-1, -2)), (y * w).sum((-1, -2))
        sx = (w * (x - mx[..., None, None]) ** 2).sum((-1, -2))
        sy = (w * (y - my[..., None, None]) ** 2).sum((-1, -2))
        sxy = (w * (x - mx[..., None, None]) * (y - my[..., None, None])).sum((-1, -2))
        values.append(((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (sx + sy + c2)))
    return float(np.mean(values))


def test_psnr_matches_numpy_formula_and_skimage():
    a, b = images()
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    # Not ==: psnr takes math.log10 (libm), np.log10 is numpy's SIMD loop (SVML on AVX-512 builds), 1 ulp apart on
    # ~6% of inputs there; x10 adds a rounding: 2 ulps, within 4 eps64.
    assert psnr(a, b) == pytest.approx(10 * np.log10(255 ** 2 / mse), rel=4 * np.finfo(np.float64).eps, abs=0)
    assert psnr(Image.fromarray(a), Image.fromarray(b)) == psnr(a, b)
    assert psnr(a, a) == math.inf
    skm = pytest.importorskip("skimage.metrics")
    assert abs(psnr(a, b) - skm.peak_signal_noise_ratio(a, b, data_range=255)) < 1e-9


def test_ssim_matches_the_papers_formula():
    for noise in (5.0, 40.0):
        a, b = images(noise=noise)
        assert abs(ssim(a, b) - ssim_numpy(a, b)) < 1e-10


def test_ssim_matches_skimage():
    skm = pytest.importorskip("skimage.metrics")
    a, b = images(noise=30.0)
    ref = skm.structural_similarity(a, b, channel_axis=-1, gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False, data_range=255)
    assert abs(ssim(a, b) - ref) < 1e-9, (ssim(a, b), ref)


def test_ssim_properties():
    a, b = images(noise=10.0)
    _, c = images(noise=60.0)
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    assert ssim(a, b) == pytest.approx(ssim(b, a), abs=1e-12)
    assert 1.0 > ssim(a, b) > ssim(a, c) > -1.0
    # Two flat images: variances and covariance vanish, so SSIM is the luminance term alone (derived by hand).
    x, y = np.full((16, 16, 3), 100, np.uint8), np.full((16, 16, 3), 150, np.uint8)
    c1 = (0.01 * 255) ** 2
    assert ssim(x, y) == pytest.approx((2 * 100 * 150 + c1) / (100 ** 2 + 150 ** 2 + c1), rel=1e-12)
    # Inverting the contrast makes the structure term negative.
    assert ssim(a, 255 - a) < 0
    with pytest.raises(ValueError, match="at least 11"):
        ssim(a[:8, :8], b[:8, :8])


# --- LPIPS ------------------------------------------------------------------------------------------------------

def random_lpips_file(path: Path, net: str = "alex") -> Path:
    """A random-weight LPIPS (backbone and linear layers) saved the way lpips' state dict names it."""
    model = LPIPS(net)
    model.to_empty(device="cpu")
    randomize_(model, seed=3)
    with torch.no_grad():  # LPIPS's learned weights are non-negative
        for k in range(5):
            w = getattr(model, f"lin{k}").model[1].weight
            w.copy_(w.abs())
    save_safetensors(path, model.state_dict())
    return path


def lpips_by_hand(state: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The LPIPS recipe step by step on torchvision's own AlexNet: ReLU outputs 1, 4, 7, 9, 11 of `features`."""
    alex = torchvision.models.alexnet(weights=None).features.eval()
    alex.load_state_dict({k.split(".", 2)[2]: v for k, v in state.items() if k.startswith("net.")})
    shift = torch.tensor([-.030, -.088, -.188]).view(1, 3, 1, 1)
    scale = torch.tensor([.458, .448, .450]).view(1, 3, 1, 1)
    taps = []
    for inp in (x, y):
        h, outs = (inp - shift) / scale, []
        for i, layer in enumerate(alex):
            h = layer(h)
            if i in (1, 4, 7, 9, 11):
                outs.append(h.clone())
        taps.append(outs)
    total = torch.zeros(x.shape[0])
    for k, (fx, fy) in enumerate(zip(*taps)):
        nx = fx / (fx.norm(dim=1, keepdim=True) + 1e-10)
        ny = fy / (fy.norm(dim=1, keepdim=True) + 1e-10)
        total += ((nx - ny) ** 2 * state[f"lin{k}.model.1.weight"].view(1, -1, 1, 1)).sum(1).mean((1, 2))
    return total


def pair_of_batches():
    g = torch.Generator().manual_seed(4)
    x = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    return x, (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(-1, 1)


def test_lpips_random_weights_from_a_local_file(tmp_path):
    from imagic.fileio import load_safetensors

    path = random_lpips_file(tmp_path / "lpips.safetensors")
    model = LPIPS.from_files(path)
    x, y = pair_of_batches()
    with torch.no_grad():
        d = model(x, y)
        assert d.shape == (2,) and (d > 0).all()
        assert torch.equal(model(x, x), torch.zeros(2))
        assert rel_err(model(y, x), d) < 1e-6
        assert rel_err(d, lpips_by_hand(load_safetensors(path)[0], x, y)) < 1e-5


def test_lpips_matches_the_lpips_package(tmp_path):
    """Reference: `lpips.LPIPS` with its shipped (trained) linear layers and a random AlexNet (pnet_rand: no
    torchvision download). Both file layouts: its full state dict, and the shipped linear-layer file + backbone."""
    lpips = pytest.importorskip("lpips")
    ref = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False).eval()
    torch.save(ref.state_dict(), tmp_path / "lpips_alex.pth")
    x, y = pair_of_batches()
    with torch.no_grad():
        expected = ref(x, y).flatten()
        assert rel_err(LPIPS.from_files(tmp_path / "lpips_alex.pth")(x, y), expected) < 1e-4

        shipped = Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth"
        backbone = {f"features.{k.split('.', 2)[2]}": v for k, v in ref.state_dict().items()
                    if k.startswith("net.")}
        torch.save(backbone, tmp_path / "alexnet.pth")
        split = LPIPS.from_files(shipped, backbone=tmp_path / "alexnet.pth")
        assert rel_err(split(x, y), expected) < 1e-4


@pytest.mark.slow
def test_lpips_vgg_matches_the_lpips_package(tmp_path):
    lpips = pytest.importorskip("lpips")
    ref = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval()
    torch.save(ref.state_dict(), tmp_path / "lpips_vgg.pth")
    x, y = pair_of_batches()
    with torch.no_grad():
        assert rel_err(LPIPS.from_files(tmp_path / "lpips_vgg.pth", net="vgg")(x, y), ref(x, y).flatten()) < 1e-4


def test_lpips_messages(tmp_path):
    with pytest.raises(MetricsError, match="--lpips-weights"):
        LPIPS.from_files(None)
    with pytest.raises(MetricsError, match="no such file"):
        LPIPS.from_files(tmp_path / "missing.pth")
    lin_only = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate((64, 192, 384, 256, 256))}
    save_safetensors(tmp_path / "lin.safetensors", lin_only)
    with pytest.raises(MetricsError, match="--lpips-backbone"):
        LPIPS.from_files(tmp_path / "lin.safetensors")
    path = random_lpips_file(tmp_path / "alex.safetensors")
    with pytest.raises(MetricsError, match="--lpips-net"):
        LPIPS.from_files(path, net="vgg")


# --- CLIP score -------------------------------------------------------------------------------------------------

TINY_CLIP = {"embed_dim": 32,
             "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}


def tiny_clip():
    torch.manual_seed(0)
    return randomize_(open_clip.create_model("local-dir:" + str(_config_dir()), load_weights=False), seed=2).eval()


def _config_dir() -> Path:
    import tempfile

    d = Path(tempfile.mkdtemp())
    (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP, "preprocess_cfg": {}}))
    return d


def direct_cosines(model, imgs, texts) -> torch.Tensor:
    """The definition, through open_clip's own API."""
    name = "local-dir:" + str(_config_dir())
    _, _, preprocess = open_clip.create_model_and_transforms(name, load_weights=False)
    with torch.no_grad():
        fi = model.encode_image(torch.stack([preprocess(i) for i in imgs]))
        ft = model.encode_text(open_clip.get_tokenizer(name)(texts))
        return torch.nn.functional.cosine_similarity(fi, ft)


def check_scorer(scorer: ClipScorer, model) -> None:
    imgs, texts = clip_inputs()
    cos = direct_cosines(model, imgs, texts)
    assert cos.abs().min() > 1e-3  # random weights: the comparison must not be between zeros
    assert torch.allclose(scorer.cosine(imgs, texts), cos, atol=1e-5)
    assert scorer(imgs, texts) == pytest.approx((100 * cos.clamp_min(0)).tolist(), abs=1e-3)


def clip_inputs():
    a, b = images(size=48)
    return [Image.fromarray(a), Image.fromarray(b)], ["a red square", "a photo of a dog"]


def test_clip_score_from_a_local_folder(tmp_path):
    model = tiny_clip()
    folder = tmp_path / "clip"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP}))
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    check_scorer(ClipScorer.from_local(folder), model)


def test_clip_score_from_a_file_and_an_architecture_name(tmp_path):
    """`--clip-weights FILE --clip-arch NAME`: the architecture must be one open_clip knows; a tiny one is
    registered through open_clip's own `add_model_config`."""
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "imagic-test-tiny-clip.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(tmp_path / "cfg")
    model = tiny_clip()
    save_safetensors(tmp_path / "clip.safetensors", model.state_dict())
    check_scorer(ClipScorer.from_local(tmp_path / "clip.safetensors", arch="imagic-test-tiny-clip"), model)
    with pytest.raises(MetricsError, match="cannot load"):
        ClipScorer.from_local(tmp_path / "clip.safetensors", arch="RN50")


def test_clip_messages_never_download(tmp_path):
    with pytest.raises(MetricsError, match="--clip-weights"):
        ClipScorer.from_local(None)
    # "openai" is an open_clip download tag, not a file: refused before open_clip could fetch anything.
    with pytest.raises(MetricsError, match="no such file"):
        ClipScorer.from_local("openai", arch="ViT-B-32")
    with pytest.raises(MetricsError, match="open_clip_config.json"):
        ClipScorer.from_local(tmp_path)
    with pytest.raises(MetricsError, match="not an open_clip architecture"):
        (tmp_path / "w.bin").write_bytes(b"x")
        ClipScorer.from_local(tmp_path / "w.bin", arch="no-such-arch")
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": {**TINY_CLIP, "text_cfg": {"hf_model_name": "xlm-roberta-base"}}}))
    with pytest.raises(MetricsError, match="Hugging Face hub"):
        ClipScorer.from_local(hub)


# --- together -----------------------------------------------------------------------------------------------------

def test_edit_metrics_and_tradeoff_plot(tmp_path):
    a, b = images(size=32)
    plain = EditMetrics()
    assert plain.names == ["psnr", "ssim"]
    m = plain(Image.fromarray(b), Image.fromarray(a), "text")
    assert m == {"psnr": psnr(b, a), "ssim": ssim(b, a)}
    full = EditMetrics(lpips=LPIPS.from_files(random_lpips_file(tmp_path / "l.safetensors")))
    assert full.names == ["psnr", "ssim", "lpips"]
    assert full(Image.fromarray(b), Image.fromarray(a), "text")["lpips"] > 0
    img = plot_tradeoff([(1.0, 30.0, 0.4), (0.6, 22.0, 0.1), (0.8, 27.0, 0.25)], title="edit 3")
    assert img.size == (480, 360)
    assert len(set(img.getdata())) > 3  # something was drawn
    assert plot_tradeoff([(0.9, 25.0, 0.2)]).size == (480, 360)
