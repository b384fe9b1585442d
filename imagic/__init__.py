"""imagic: Imagic (Kawar et al., CVPR 2023) text-based real image editing on Stable Diffusion, from scratch.

    editor = imagic.Editor.from_checkpoint("v1-5-pruned-emaonly.safetensors", device="cuda", precision="bf16")
    run = editor.fit("dog.png", "a photo of a sitting dog", out="runs/dog")
    editor.sample(run, alpha=[0.9, 1.0, 1.1], seeds=[0, 1]).grid      # or a SampleSettings(...) as the second argument
    print(imagic.plan("sd1", device="cuda", precision="bf16").table())   # memory and time before you run
"""
from .assemble import StableDiffusion
from .config import ModelConfig, TextConfig, UNetConfig, VAEConfig, preset
from .editor import Editor, Run, SampleResult
from .loader import inspect_checkpoint, load_checkpoint
from .plan import Plan, plan
from .recipes import Recipe, recipe
from .schedule import NoiseSchedule
from .settings import FitSettings, RuntimeSettings, SampleSettings

__version__ = "0.1.0"

__all__ = [
    "Editor", "FitSettings", "SampleSettings", "RuntimeSettings", "Run", "SampleResult", "load_checkpoint",
    "inspect_checkpoint", "StableDiffusion",
    "ModelConfig", "UNetConfig", "VAEConfig", "TextConfig", "preset", "NoiseSchedule", "plan", "Plan",
    "recipe", "Recipe", "__version__",
]
