"""imagic: Imagic (Kawar et al., CVPR 2023) text-based real image editing on Stable Diffusion, from scratch."""
from .config import ModelConfig, UNetConfig, VAEConfig, TextConfig, preset

__version__ = "0.1.0"

__all__ = ["ModelConfig", "UNetConfig", "VAEConfig", "TextConfig", "preset", "__version__"]
