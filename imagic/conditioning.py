"""What the UNet is conditioned on, for every family the loader reads: the text embedding Imagic optimises, the
negative prompt's embedding for classifier-free guidance, SDXL's size/crop conditioning, and the UNet call that
takes them, `(x, t, embedding) -> output`, which the optimisation loops and the sampler use.

SD 1.x / 2.x: the embedding is the text encoder's (B, 77, width) context and the call is the UNet itself. SDXL:
the embedding is both towers' context and the pooled vector, packed into one tensor (imagic.sdxl.pack), and the
call (imagic.sdxl.VectorUNet) unpacks it and appends the size/crop features to make the UNet's `y`.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .assemble import StableDiffusion
from .config import ModelConfig
from .images import Squared
from .samplers import Model
from .sdxl import pack
from .steps import SizeConditioning, unet_call
from .tokenizer import clean


class Conditioning:
    """Text and size conditioning of `model` whose UNet and text encoder are `unet` and `text_encoder` on
    `device` (the Editor's placed copies), for images of `config.image_size` (the Editor's resolution)."""

    def __init__(self, model: StableDiffusion, unet: torch.nn.Module, text_encoder: torch.nn.Module,
                 device: torch.device, config: ModelConfig):
        self.model, self.unet, self.text_encoder, self.device = model, unet, text_encoder, device
        self.config = config
        self.vector_conditioned = model.config.text2 is not None  # SDXL

    @torch.no_grad()
    def encode_text(self, prompts: Union[str, Sequence[str]]) -> Tensor:
        """The embedding, fp32: (B, 77, width); on SDXL (B, 78, 2048), context and pooled packed."""
        ids = self.model.tokenizer(prompts).to(self.device)
        if not self.vector_conditioned:
            return self.text_encoder(ids).float()
        context, pooled = self.text_encoder(ids, self.model.tokenizer2(prompts).to(self.device))
        return pack(context.float(), pooled.float())

    def encode_negative(self, negative_prompt: str) -> Tensor:
        """Classifier-free guidance's unconditional embedding. SDXL uses zeros (context and pooled) for an empty
        negative prompt, as diffusers' SDXL pipeline does (`force_zeros_for_empty_prompt`, the base model's
        setting); SD 1.x / 2.x encode the empty prompt, as they were trained to."""
        e = self.encode_text(negative_prompt)
        return torch.zeros_like(e) if self.vector_conditioned and not clean(negative_prompt) else e

    def sizes(self, image: Optional[Squared] = None) -> Optional[SizeConditioning]:
        """SDXL's size/crop conditioning for an input made square by `images.square_input` (None for SD 1.x /
        2.x): original size = its (h, w), crop = where it was cut, target = the model's size. Without an image
        (txt2img): a native-size image, uncropped, as SDXL's pipeline defaults."""
        if not self.vector_conditioned:
            return None
        size = self.config.image_size
        if image is None:
            return {"original_size": [size, size], "crop_top_left": [0, 0], "target_size": [size, size]}
        return {"original_size": list(image.original_size), "crop_top_left": list(image.crop_top_left),
                "target_size": [size, size]}

    def unet_call(self, sizes: Optional[SizeConditioning] = None) -> Model:
        """The UNet as the loops and the sampler call it (`steps.unet_call`), with these size features on SDXL
        (default: `sizes()`)."""
        return unet_call(self.unet, self.config, sizes or self.sizes(), self.device)
