"""imagic: a from-scratch, readable and fast implementation of Imagic on Stable Diffusion checkpoints.

`kernels/` is installed as `imagic.kernels` (never as a bare top-level `kernels`, a name another popular
package owns)."""
from setuptools import find_packages, setup

setup(
    name="imagic",
    version="0.1.0",
    description="Imagic (Kawar et al., CVPR 2023) text-based real image editing on Stable Diffusion, from scratch",
    python_requires=">=3.10",
    packages=find_packages(include=["imagic", "imagic.*"]) + ["imagic.kernels"],
    package_dir={"imagic": "imagic", "imagic.kernels": "kernels"},
    install_requires=[
        "torch>=2.1",
        "open_clip_torch>=2.20",
        "einops>=0.6",
        "pillow>=9.1",
        "numpy>=1.23",
        "safetensors>=0.3",
        "tqdm>=4.60",
        "pyyaml>=6.0",
    ],
    extras_require={
        "triton": ["triton>=2.1"],
        "test": [
            "pytest>=7",
            "pytest-timeout>=2",
            "hypothesis>=6",
            "diffusers>=0.30",
            "transformers>=4.40",
            "peft>=0.17",  # diffusers' LoRA loaders need it (kohya interop test)
            "lpips>=0.1.4",  # reference LPIPS
            "scikit-image>=0.22",  # reference SSIM
        ],
    },
    entry_points={"console_scripts": ["imagic=imagic.cli:main"]},
)
