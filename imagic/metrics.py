"""How good is an edit, measured offline: fidelity to the input and agreement with the target text.

- PSNR and SSIM against the input image, always (no weights needed).
- CLIP score (text-image agreement) and LPIPS (perceptual distance to the input) when the user points to local
  weight files. Nothing is ever downloaded: a missing file is a `MetricsError` that says what to pass.

The paper's figure 9 plots the two against each other as alpha varies (higher alpha: closer to the text, further
from the input); `plot_tradeoff` draws that curve for one edit.

Definitions:
- PSNR = 10 log10(255² / MSE) over all pixels and channels of the 8-bit images (identical images: inf).
- SSIM (Wang et al. 2004, "Image quality assessment: from error visibility to structural similarity", eq. 13):
  11x11 Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03, L = 255, population (co)variances, computed per RGB
  channel on the window positions that fit inside the image, then averaged: the convention of
  `skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)` and of
  pytorch-msssim. (Wang's MATLAB script also converts to grey and downsamples large images first; we do not.)
- CLIP score = 100 * max(cos(image embedding, text embedding), 0), the torchmetrics `CLIPScore` convention.
- LPIPS (Zhang et al. 2018) v0.1: the `lpips` package's network (torchvision AlexNet or VGG16 features, unit-
  normalised per channel, squared differences weighted by learned 1x1 convolutions, spatial mean, sum over five
  layers) with its module names, so its weight files load with a strict `load_state_dict`.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn

from .checkpoint import CheckpointError, PathLike, read_state_dict
from .images import from_pil

log = logging.getLogger(__name__)

ImageLike = Union[Image.Image, np.ndarray]

CLIP_HELP = ("CLIP score needs local weights: --clip-weights FILE (an open_clip checkpoint, with --clip-arch naming "
             "its architecture, e.g. ViT-B-32) or FOLDER (an open_clip model folder with open_clip_config.json); "
             "nothing is downloaded")
LPIPS_HELP = ("LPIPS needs local weights: --lpips-weights FILE (an lpips.LPIPS state dict, or the linear layers "
              "the lpips package ships in lpips/weights/v0.1/alex.pth plus --lpips-backbone with torchvision's "
              "AlexNet/VGG16 weights); nothing is downloaded")


class MetricsError(ValueError):
    """A metric that cannot be computed as asked (missing or unsuitable weight files); one line for the user."""


# --- PSNR and SSIM ----------------------------------------------------------------------------------------------

def _array(img: ImageLike) -> np.ndarray:
    """(H, W, C) uint8 from a PIL image or an array."""
    arr = np.asarray(img.convert("RGB") if isinstance(img, Image.Image) else img)
    if arr.dtype != np.uint8:
        raise ValueError(f"expected 8-bit images, got {arr.dtype}")
    return arr[..., None] if arr.ndim == 2 else arr


def _pair(a: ImageLike, b: ImageLike) -> Tuple[np.ndarray, np.ndarray]:
    x, y = _array(a), _array(b)
    if x.shape != y.shape:
        raise ValueError(f"images differ in size: {x.shape} vs {y.shape}")
    return x, y


def psnr(a: ImageLike, b: ImageLike) -> float:
    """Peak signal-to-noise ratio in dB of two 8-bit images (inf when they are identical)."""
    x, y = _pair(a, b)
    mse = float(np.mean((x.astype(np.float64) - y.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0 ** 2 / mse)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """The normalised 1-D Gaussian; SSIM's 2-D window is its outer product (separable)."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    w = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return w / w.sum()


def ssim(a: ImageLike, b: ImageLike, win_size: int = 11, sigma: float = 1.5, k1: float = 0.01,
         k2: float = 0.03) -> float:
    """Mean structural similarity of two 8-bit images (see the module docstring for the exact convention)."""
    x, y = _pair(a, b)
    if min(x.shape[:2]) < win_size:
        raise ValueError(f"SSIM needs images of at least {win_size}x{win_size} pixels, got {x.shape[:2]}")
    c1, c2 = (k1 * 255.0) ** 2, (k2 * 255.0) ** 2
    t = torch.from_numpy(np.stack([x, y])).permute(0, 3, 1, 2).to(torch.float64)  # (2, C, H, W)
    channels = t.shape[1]
    w = gaussian_window(win_size, sigma)
    kh = w.view(1, 1, -1, 1).repeat(channels, 1, 1, 1)
    kw = w.view(1, 1, 1, -1).repeat(channels, 1, 1, 1)

    def blur(v: torch.Tensor) -> torch.Tensor:  # Gaussian-weighted local mean, valid positions only
        return F.conv2d(F.conv2d(v, kh, groups=channels), kw, groups=channels)

    xx, yy = t[:1], t[1:]
    mx, my = blur(xx), blur(yy)
    vx, vy, cxy = blur(xx * xx) - mx ** 2, blur(yy * yy) - my ** 2, blur(xx * yy) - mx * my
    ssim_map = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return float(ssim_map.mean())


# --- CLIP score -------------------------------------------------------------------------------------------------

def _path(weights: Optional[PathLike], help_text: str) -> Path:
    if weights is None:
        raise MetricsError(help_text)
    path = Path(weights)
    if not path.exists():
        raise MetricsError(f"{path}: no such file. {help_text}")
    return path


def _check_offline(model_cfg: Dict, where: str) -> None:
    """Text towers or tokenizers from Hugging Face would be fetched from the hub: refuse them by name."""
    text_cfg = model_cfg.get("text_cfg", {})
    hub = [k for k in ("hf_model_name", "hf_tokenizer_name") if text_cfg.get(k)]
    if hub:
        raise MetricsError(f"{where}: its text tower needs {', '.join(f'{k}={text_cfg[k]}' for k in hub)} from the "
                           "Hugging Face hub, which is never downloaded here; use an OpenAI-style CLIP architecture")


class ClipScorer:
    """CLIP score of images against texts with an open_clip model loaded from local files only."""

    def __init__(self, model: nn.Module, preprocess, tokenizer, device: torch.device):
        self.model, self.preprocess, self.tokenizer, self.device = model, preprocess, tokenizer, device

    @classmethod
    def from_local(cls, weights: Optional[PathLike], arch: str = "ViT-B-32",
                   device: Union[str, torch.device] = "cpu") -> "ClipScorer":
        """weights: an open_clip checkpoint file (its architecture named by `arch`, e.g. "ViT-B-32", or
        "ViT-B-32-quickgelu" for OpenAI's weights) or a folder holding `open_clip_config.json` and the weights
        (open_clip's `local-dir:` layout, as its model repositories are). The path is checked before open_clip
        sees it: open_clip would try to download anything it does not find as a file."""
        import open_clip

        path = _path(weights, CLIP_HELP)
        if path.is_dir():
            config = path / "open_clip_config.json"
            if not config.is_file():
                raise MetricsError(f"{path}: a CLIP model folder needs open_clip_config.json. {CLIP_HELP}")
            _check_offline(json.loads(config.read_text()).get("model_cfg", {}), str(config))
            name, pretrained = f"local-dir:{path}", None
        else:
            model_cfg = open_clip.get_model_config(arch)
            if model_cfg is None:
                raise MetricsError(f"--clip-arch {arch!r} is not an open_clip architecture "
                                   f"(e.g. ViT-B-32, ViT-B-32-quickgelu, ViT-L-14)")
            _check_offline(model_cfg, f"--clip-arch {arch}")
            name, pretrained = arch, str(path)
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=pretrained, device=torch.device(device), require_pretrained=True)
        except (RuntimeError, ValueError, OSError, KeyError, AssertionError) as e:  # open_clip asserts shapes
            raise MetricsError(f"{path}: cannot load as open_clip {arch if pretrained else 'model folder'} "
                               f"({str(e).splitlines()[0][:300]})") from None
        return cls(model.eval().requires_grad_(False), preprocess, open_clip.get_tokenizer(name),
                   torch.device(device))

    @torch.no_grad()
    def cosine(self, images: Sequence[Image.Image], texts: Sequence[str]) -> torch.Tensor:
        """Cosine similarity of each image's and text's CLIP embedding, (N,)."""
        x = torch.stack([self.preprocess(im.convert("RGB")) for im in images]).to(self.device)
        ids = self.tokenizer(list(texts)).to(self.device)
        fi = F.normalize(self.model.encode_image(x).float(), dim=-1)
        ft = F.normalize(self.model.encode_text(ids).float(), dim=-1)
        return (fi * ft).sum(-1).cpu()

    def __call__(self, images: Sequence[Image.Image], texts: Sequence[str]) -> List[float]:
        """One CLIP score per (image, text) pair: 100 * max(cosine similarity, 0)."""
        return (100.0 * self.cosine(images, texts).clamp_min(0)).tolist()


# --- LPIPS ------------------------------------------------------------------------------------------------------

# Per backbone: the torchvision `features` index where each of the five slices starts (and the end), and the
# channels each slice outputs (lpips/pretrained_networks.py: alexnet, vgg16).
LPIPS_NETS = {"alex": ((0, 2, 5, 8, 10, 12), (64, 192, 384, 256, 256)),
              "vgg": ((0, 4, 9, 16, 23, 30), (64, 128, 256, 512, 512))}
# lpips' ScalingLayer: the ImageNet normalisation expressed for inputs in [-1, 1].
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)


class _ScalingLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) / self.scale


class _NetLinLayer(nn.Module):
    """lpips' per-layer weights: Dropout (inactive in eval) then a 1x1 conv to one channel, no bias."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))


class LPIPS(nn.Module):
    """LPIPS v0.1 distance; inputs (B, 3, H, W) in [-1, 1], output (B,). Keys are those of `lpips.LPIPS`."""

    def __init__(self, net: str = "alex"):
        super().__init__()
        import torchvision

        if net not in LPIPS_NETS:
            raise MetricsError(f"LPIPS backbone must be one of {', '.join(LPIPS_NETS)}, got {net!r}")
        bounds, channels = LPIPS_NETS[net]
        with torch.device("meta"):  # the torchvision module only for its layers; weights come from the file
            features = (torchvision.models.alexnet if net == "alex" else torchvision.models.vgg16)(weights=None)
            features = features.features
        self.net_name = net
        self.scaling_layer = _ScalingLayer()
        self.net = nn.Module()
        for k in range(5):
            block = nn.Sequential()
            for i in range(bounds[k], bounds[k + 1]):
                block.add_module(str(i), features[i])  # torchvision's indices, as lpips keeps them
            setattr(self.net, f"slice{k + 1}", block)
        for k, c in enumerate(channels):
            setattr(self, f"lin{k}", _NetLinLayer(c))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        fx, fy = self.scaling_layer(x), self.scaling_layer(y)
        total = torch.zeros(x.shape[0], device=x.device)
        for k in range(5):
            block = getattr(self.net, f"slice{k + 1}")
            fx, fy = block(fx), block(fy)
            d = (_unit(fx) - _unit(fy)) ** 2
            total = total + getattr(self, f"lin{k}").model(d).mean(dim=(1, 2, 3))
        return total

    @classmethod
    def from_files(cls, weights: Optional[PathLike], net: str = "alex", backbone: Optional[PathLike] = None,
                   device: Union[str, torch.device] = "cpu") -> "LPIPS":
        """weights: a saved `lpips.LPIPS(...).state_dict()` (backbone and linear layers), or the linear layers alone
        (the file the lpips package ships, lpips/weights/v0.1/{alex,vgg}.pth) with `backbone` = torchvision's
        weights for that network (`features.N.*` keys). Files are read safely (`checkpoint.read_state_dict`)."""
        sd = _lpips_state(_path(weights, LPIPS_HELP))
        if not any(k.startswith("net.") for k in sd):
            if backbone is None:
                raise MetricsError(f"{weights}: holds only LPIPS's linear layers; pass the {net} backbone weights "
                                   "too (--lpips-backbone, torchvision's alexnet-owt-7be5be79.pth or "
                                   "vgg16-397923af.pth)")
            sd.update(_backbone_state(_path(backbone, LPIPS_HELP), net))
        model = cls(net)
        try:
            model.load_state_dict(sd, strict=True, assign=True)
        except RuntimeError as e:
            raise MetricsError(f"{weights}: not LPIPS-{net} weights ({' '.join(str(e).split())[:300]}); "
                               "is --lpips-net right?") from None
        return model.to(device).eval().requires_grad_(False)


def _unit(f: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """lpips' normalize_tensor: each position's feature vector divided by its L2 norm (+ eps)."""
    return f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


def _read(path: Path) -> Dict[str, torch.Tensor]:
    try:
        return read_state_dict(path)
    except CheckpointError as e:
        raise MetricsError(str(e)) from None


def _lpips_state(path: Path) -> Dict[str, torch.Tensor]:
    """lpips registers each linear layer twice (lin0 and lins.0, the same module): keep one name. Its scaling
    constants are checked, not loaded."""
    sd = {k: v for k, v in _read(path).items() if not k.startswith("lins.")}
    for name, value in (("shift", LPIPS_SHIFT), ("scale", LPIPS_SCALE)):
        stored = sd.pop(f"scaling_layer.{name}", None)
        if stored is not None and not torch.allclose(stored.flatten().float(), torch.tensor(value), atol=1e-6):
            raise MetricsError(f"{path}: scaling_layer.{name} {stored.flatten().tolist()} is not LPIPS v0.1's")
    return sd


def _backbone_state(path: Path, net: str) -> Dict[str, torch.Tensor]:
    """torchvision's `features.N.*` -> `net.sliceK.N.*` (the slice that holds layer N); the classifier is unused."""
    bounds = LPIPS_NETS[net][0]
    out = {}
    for key, value in _read(path).items():
        parts = key.split(".")
        if parts[0] != "features":
            continue
        k = next(s for s in range(5) if bounds[s] <= int(parts[1]) < bounds[s + 1])
        out[f"net.slice{k + 1}." + ".".join(parts[1:])] = value
    return out


# --- per-edit metrics and the trade-off plot -----------------------------------------------------------------------

class EditMetrics:
    """The metrics of one sample against its input and target text; CLIP/LPIPS only when their models are given."""

    def __init__(self, clip: Optional[ClipScorer] = None, lpips: Optional[LPIPS] = None,
                 device: Union[str, torch.device] = "cpu"):
        self.clip, self.lpips, self.device = clip, lpips, torch.device(device)

    @property
    def names(self) -> List[str]:
        return ["psnr", "ssim"] + (["clip_score"] if self.clip else []) + (["lpips"] if self.lpips else [])

    @torch.no_grad()
    def __call__(self, image: Image.Image, reference: Image.Image, text: str) -> Dict[str, float]:
        out = {"psnr": psnr(image, reference), "ssim": ssim(image, reference)}
        if self.clip is not None:
            out["clip_score"] = self.clip([image], [text])[0]
        if self.lpips is not None:
            x, y = from_pil(image).to(self.device), from_pil(reference).to(self.device)
            out["lpips"] = float(self.lpips(x, y)[0])
        return out


def plot_tradeoff(points: Sequence[Tuple[float, float, float]], title: str = "", width: int = 480,
                  height: int = 360) -> Image.Image:
    """CLIP score (y, agreement with the text) against LPIPS to the input (x, distance from it), one point per
    alpha joined in alpha order: the paper's figure 9 for one edit. points: (alpha, clip_score, lpips)."""
    pts = sorted(points)
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 60, 20, 30, 40
    w, h = width - left - right, height - top - bottom
    draw.rectangle([left, top, left + w, top + h], outline="gray")
    draw.text((left, 8), title or "CLIP score vs LPIPS over alpha", fill="black")
    draw.text((left + w // 2 - 60, height - 18), "LPIPS to the input (lower = closer)", fill="black")
    draw.text((4, top - 14), "CLIP score", fill="black")
    if not pts:
        return img
    xs, ys = [p[2] for p in pts], [p[1] for p in pts]
    x_lo, x_hi, y_lo, y_hi = min(xs), max(xs), min(ys), max(ys)

    def at(lp: float, cs: float) -> Tuple[float, float]:
        return (left + w * ((lp - x_lo) / ((x_hi - x_lo) or 1.0) * 0.9 + 0.05),
                top + h * (1 - ((cs - y_lo) / ((y_hi - y_lo) or 1.0) * 0.9 + 0.05)))

    xy = [at(p[2], p[1]) for p in pts]
    if len(xy) > 1:
        draw.line(xy, fill=(30, 90, 200), width=2)
    for (px, py), alpha in zip(xy, (p[0] for p in pts)):
        draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=(200, 40, 40))
        draw.text((px + 5, py - 12), f"a={alpha:g}", fill="black")
    for lp in sorted({x_lo, x_hi}):
        draw.text((at(lp, y_lo)[0] - 10, top + h + 4), f"{lp:.3f}", fill="black")
    for cs in sorted({y_lo, y_hi}):
        draw.text((4, at(x_lo, cs)[1] - 6), f"{cs:.2f}", fill="black")
    return img
