"""Imagic (Kawar et al., CVPR 2023): text-based real image editing, on any checkpoint `load_checkpoint` reads.

    e_tgt = text_encoder(tokenize(target_text))                              (Sec. 3.1, "text embedding")
    stage 1  e_opt = argmin_e  L(x0, e; theta)      Adam from e_tgt, model frozen             (eq. 2)
    stage 2  theta' = argmin_theta L(x0, e_opt; theta)   e_opt frozen; LoRA or all weights  (eq. 3)
    stage 3  e = alpha * e_tgt + (1 - alpha) * e_opt, then DDIM + classifier-free guidance with theta'   (eq. 4)

where L is the denoising loss of `steps.denoising_loss`. alpha = 0 reproduces the input; the paper finds
0.6-0.8 best for Imagen, public SD ports use 0.9-1.5.

This module is the user-facing Editor: model placement and precision (`RuntimeSettings`), image and text
encoding, the run directory (stages skipped when done, resumed when interrupted), stage 3 and saved samples. The
stage 1-2 loops and the stage-2 weights are `imagic.fitting`; every step is `imagic.steps`; the settings of an
edit are `imagic.settings` (`FitSettings`, `SampleSettings`), given as an object or as keywords.

Usage:
    editor = Editor.from_checkpoint("v1-5-pruned-emaonly.safetensors", device="cuda", precision="bf16")
    run = editor.fit("dog.png", "a photo of a sitting dog", out="runs/dog")
    result = editor.sample(run, alpha=[0.8, 0.9, 1.0], seeds=[0, 1])     # or editor.sample(run, SampleSettings(...))
    result.grid            # PIL image, rows = seeds, columns = alphas
"""
from __future__ import annotations

import functools
import hashlib
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, ContextManager, Dict, List, Optional, Sequence, Tuple, TypeVar, Union

import torch
from PIL import Image
from torch import Tensor

from . import memory_check, kernels
from .assemble import StableDiffusion
from .conditioning import Conditioning, SizeConditioning
from .fileio import load_safetensors, read_json, sha256_file
from .fitting import finetune_unet, finetuned_state, finetuned_weights, load_finetuned, optimize_embedding, \
    save_finetuned
from .images import Squared, from_pil, make_grid, open_image, square_input, to_pil
from .loader import load_checkpoint
from .plan import Plan, plan
from .results import Run, SampleResult
from .rundir import RunDir, RunError, library_versions, run_dir
from .samplers import Model, initial_latents, sdedit_start
from .schedule import NoiseSchedule
from .settings import SDEDIT_STRENGTH, FitSettings, RuntimeSettings, SampleSettings, settings_with
from .steps import OnDevice, denoiser, interpolate, sample_ddim, trainable
from .tokenizer import clean
from .training import NumericalError, StepCallback, out_of_memory, peak_memory
from .vae import decode_latents, encode_latents

log = logging.getLogger(__name__)

ImageLike = Union[str, Path, Image.Image, Tensor]
F = TypeVar("F", bound=Callable[..., Any])
# What makes two fits the same edit: a run directory holding another is refused.
IDENTITY = ("target_text", "settings", "input_sha256", "checkpoint_sha256", "size_conditioning")


def _kernels(method: F) -> F:
    """Run `method` under the editor's kernel setting (`kernels.use_setting`): entered here, once per call."""
    @functools.wraps(method)
    def run(self: "Editor", *args: Any, **kwargs: Any) -> Any:
        with kernels.use_setting(self.runtime.kernels):
            return method(self, *args, **kwargs)
    return run  # type: ignore[return-value]


class Editor:
    """Holds a loaded model and runs the three Imagic stages on it. `runtime` (or its fields as keywords:
    device, precision, kernels, gradient_checkpointing, resolution) says where and how."""

    def __init__(self, model: StableDiffusion, runtime: Optional[RuntimeSettings] = None, progress: bool = True,
                 **settings: Any):
        self.runtime = settings_with(RuntimeSettings, runtime, settings)
        if model.vae is None or model.text_encoder is None:
            raise ValueError("Imagic needs the UNet, the VAE and the text encoder; this checkpoint lacks one")
        self.model = model
        self.device = self.runtime.torch_device()
        self.progress = progress
        resolution = self.runtime.resolution
        self.config = model.config.at_resolution(resolution) if resolution else model.config
        self.schedule = NoiseSchedule.from_config(model.config)
        # Frozen weights in the working precision; the VAE stays fp32 (fp16 SD VAE decodes can NaN).
        self.unet = model.unet.to(self.device, self.runtime.dtype).requires_grad_(False)
        self.text_encoder = model.text_encoder.to(self.device, self.runtime.dtype).requires_grad_(False)
        self.vae = model.vae.to(self.device).requires_grad_(False)
        self.unet.set_gradient_checkpointing(self.runtime.gradient_checkpointing)
        self.on_device = OnDevice(self.device, self.runtime.precision)
        self.conditioning = Conditioning(model, self.unet, self.text_encoder, self.device, self.config)

    @classmethod
    def from_checkpoint(cls, path: Union[str, Path], config: Any = None, runtime: Optional[RuntimeSettings] = None,
                        use_ema: bool = False, progress: bool = True, **settings: Any) -> "Editor":
        """Load a checkpoint (see `load_checkpoint`) straight into the runtime's device and precision."""
        runtime = settings_with(RuntimeSettings, runtime, settings)
        model = load_checkpoint(path, config=config, dtype=runtime.dtype, device=runtime.torch_device(),
                                use_ema=use_ema)
        return cls(model, runtime, progress=progress)

    @functools.cached_property
    def checkpoint_sha256(self) -> Optional[str]:
        """The checkpoint file's sha256 (None for a folder or a model built in memory), read once per editor."""
        path = self.model.path
        return sha256_file(path) if path and path.is_file() else None

    # --- encoders -------------------------------------------------------------------------------------------
    @_kernels
    def encode_text(self, prompts: Union[str, Sequence[str]]) -> Tensor:
        """The embedding Imagic optimises, fp32: (B, 77, width); on SDXL (B, 78, 2048), both towers' context and
        the pooled vector packed (imagic.conditioning)."""
        return self.conditioning.encode_text(prompts)

    def _squared(self, image: ImageLike, how: str) -> Squared:
        """Any path / PIL image / tensor in [-1, 1], opened once, made square at the editor's resolution."""
        if isinstance(image, Tensor):
            pil = to_pil(image.detach().cpu().reshape(-1, *image.shape[-3:])[:1])[0]
        else:
            pil = image.convert("RGB") if isinstance(image, Image.Image) else open_image(image)
        return square_input(pil, self.config.image_size, how)

    def prepare_image(self, image: ImageLike, square: str = FitSettings.square) -> Image.Image:
        """Any path / PIL image / tensor in [-1, 1] -> a square RGB PIL image at the editor's resolution."""
        return self._squared(image, square).image

    def size_conditioning(self, image: Optional[ImageLike] = None,
                          square: str = FitSettings.square) -> Optional[SizeConditioning]:
        """SDXL's original size / crop / target size for `image` as `prepare_image` makes it square (None on
        SD 1.x / 2.x; without an image, a native-size uncropped one)."""
        return self.conditioning.sizes(None if image is None else self._squared(image, square))

    @_kernels
    @torch.no_grad()
    def encode_image(self, image: Image.Image) -> Tensor:
        """Latent x0 of the image: the posterior mean (deterministic; SD's posterior std is ~1e-3 of its mean)."""
        x = from_pil(image).to(self.device)
        return encode_latents(self.vae, x, self.config.scale_factor, sample=False).float()

    @_kernels
    @torch.no_grad()
    def decode(self, latents: Tensor) -> List[Image.Image]:
        """One latent at a time, so an image does not depend on what else is decoded with it: CPU BLAS chooses its
        blocking by the batch size (on the built-in model, decoding 10 latents at once left 4 of the 10 images one
        pixel value off by 1 against decoding each alone), and the decoder's activations, sampling's largest at 512²,
        are one image's."""
        return [to_pil(decode_latents(self.vae, z[None].float(), self.config.scale_factor).float().cpu())[0]
                for z in latents]

    # --- stages 1 and 2 ---------------------------------------------------------------------------------------
    def plan(self, **settings: Any) -> Plan:
        """Memory and compute of an edit on this editor's model, device, precision and kernels (`imagic.plan`;
        sampling runs one image at a time here, so its batch is 1 and its steps are per image)."""
        defaults = dict(device=self.device.type, precision=self.runtime.precision,
                        kernels=kernels.resolve(self.runtime.kernels),
                        gradient_checkpointing=self.runtime.gradient_checkpointing, seeds=1, alphas=1)
        return plan(self.config, **{**defaults, **settings})

    def _check_memory(self, stages: Sequence[str], **settings: Any) -> None:
        if memory_check.device_memory(self.device) is not None:  # a GPU: plan (seconds) and compare with its memory
            memory_check.check(self.plan(**settings), stages, self.device, lambda o: self.plan(**{**settings, **o}))

    @_kernels
    def fit(self, image: ImageLike, target_text: str, out: Union[str, Path, None] = None,
            settings: Optional[FitSettings] = None, callback: Optional[StepCallback] = None, force: bool = False,
            **keywords: Any) -> Run:
        """Stages 1 and 2 with `settings` (or FitSettings' fields as keywords). With `out`, everything goes to that
        run directory and an existing one is resumed: finished stages are skipped and an interrupted stage
        continues from its last saved step. On a GPU the plan is checked against its free memory first
        (memory_check.NotEnoughMemory); `force=True` skips that."""
        s = settings_with(FitSettings, settings, keywords).resolved()
        if not target_text or not clean(target_text):
            raise ValueError("the target text is empty (or nothing but spaces and control characters)")
        if not force:
            self._check_memory(("stage1", "stage2", "vae_encode"), finetune=s.finetune, lora_rank=s.lora_rank)
        source = self._squared(image, s.square)
        with run_dir(out) as rd:
            return self._fit(source, target_text, s, rd, callback)

    def _run_args(self, target_text: str, s: FitSettings, image: Image.Image,
                  sizes: Optional[SizeConditioning]) -> Dict[str, Any]:
        path = self.model.path
        return {"target_text": target_text, "settings": asdict(s),
                "input_sha256": hashlib.sha256(image.tobytes()).hexdigest(), "size_conditioning": sizes,
                "checkpoint": str(path) if path else None, "checkpoint_sha256": self.checkpoint_sha256,
                "model_config": self.config.to_dict(), "precision": self.runtime.precision,
                "device": str(self.device), "versions": library_versions()}

    def _fit(self, source: Squared, target_text: str, s: FitSettings, rd: RunDir,
             callback: Optional[StepCallback]) -> Run:
        sizes = self.conditioning.sizes(source)
        x0 = self.encode_image(source.image)
        e_tgt = self.encode_text(target_text)
        rd.record(lambda: self._run_args(target_text, s, source.image, sizes), IDENTITY, source.image, target_text,
                  e_tgt)
        model = self.conditioning.unet_call(sizes)
        e_opt, losses1 = self._stage1(model, x0, e_tgt, s, rd, callback)
        finetuned, losses2 = self._stage2(model, x0, e_opt, s, rd, callback)
        rd.save_loss_plot({"stage 1 (embedding)": losses1, f"stage 2 ({s.finetune})": losses2})
        return Run(target_text=target_text, settings=s, target_embedding=e_tgt.cpu(), optimized_embedding=e_opt.cpu(),
                   finetuned=finetuned, input_image=source.image, losses={"stage1": losses1, "stage2": losses2},
                   directory=rd.root, size_conditioning=sizes)

    def _stage1(self, model: Model, x0: Tensor, e_tgt: Tensor, s: FitSettings, rd: RunDir,
                callback: Optional[StepCallback]) -> Tuple[Tensor, List[float]]:
        """Stage 1 in the run directory: skipped when done, resumed when interrupted, recorded when finished."""
        done = rd.optimized()
        if done is not None:
            log.info("stage 1 already done: %s", rd.root)
            return done.to(self.device), rd.read_losses(1)
        e_opt, state = optimize_embedding(model, self.schedule, x0, e_tgt, s, self.on_device,
                                          resume_path=rd.resume_from(1), callback=callback, progress=self.progress,
                                          on_save=lambda st: rd.write_losses(1, st.losses))
        rd.finish_embedding(e_opt, state.losses, f"{s.embed_steps} steps, final loss {_last(state.losses)}, "
                                                 f"peak memory {peak_memory(self.device)}")
        return e_opt, state.losses

    def _stage2(self, model: Model, x0: Tensor, e_opt: Tensor, s: FitSettings, rd: RunDir,
                callback: Optional[StepCallback]) -> Tuple[Dict[str, Tensor], List[float]]:
        """Stage 2 (LoRA adapters or every UNet weight) in the run directory, like `_stage1`."""
        done = rd.finished_weights(s.finetune)
        if done is not None:
            log.info("stage 2 already done: %s", done)
            return load_finetuned(self.unet, s.finetune, done, self.config.unet), rd.read_losses(2)
        with trainable(self.unet, s) as params:
            state = finetune_unet(model, self.schedule, x0, e_opt, params, s, self.on_device,
                                  resume_path=rd.resume_from(2), callback=callback, progress=self.progress,
                                  on_save=lambda st: rd.write_losses(2, st.losses))
            finetuned = finetuned_state(self.unet, s.finetune)
            rd.finish_weights(s.finetune, lambda path: save_finetuned(self.unet, s.finetune, path, self.config.unet,
                                                                      self.checkpoint_sha256),
                              state.losses, f"{s.finetune}, {s.finetune_steps} steps, final loss "
                                            f"{_last(state.losses)}, peak memory {peak_memory(self.device)}")
        return finetuned, state.losses

    def finetuned_model(self, run: Run) -> ContextManager[None]:
        """Inside the block `self.unet` is the run's fine-tuned model; the base model comes back afterwards."""
        return finetuned_weights(self.unet, run.settings.finetune, run.finetuned, self.device)

    def load_run(self, directory: Union[str, Path]) -> Run:
        """A finished run from its directory (stage 3 only needs these files)."""
        rd = RunDir(directory)
        if not rd.args.exists():
            raise RunError(f"{rd.root}: not a run directory (no args.json)")
        args = read_json(rd.args)
        s = FitSettings(**args["settings"])
        missing = [p.name for p in (rd.target_embedding, rd.optimized_embedding, rd.finetuned(s.finetune))
                   if not p.exists()]
        if missing:
            raise RunError(f"{rd.root}: the run is not finished (missing {', '.join(missing)}); "
                           "run `imagic train` on it again to resume")
        with Image.open(rd.input_image) as im:
            pil = im.convert("RGB")
        trained = (args.get("model_config") or {}).get("image_size")
        if trained and trained != self.config.image_size:
            log.warning("%s was trained at %spx; this editor samples at %spx (Editor(resolution=...))",
                        rd.root, trained, self.config.image_size)
        return Run(target_text=args["target_text"], settings=s,
                   target_embedding=load_safetensors(rd.target_embedding)[0]["embedding"],
                   optimized_embedding=load_safetensors(rd.optimized_embedding)[0]["embedding"],
                   finetuned=load_finetuned(self.unet, s.finetune, rd.finetuned(s.finetune), self.config.unet),
                   input_image=pil, losses={"stage1": rd.read_losses(1), "stage2": rd.read_losses(2)},
                   directory=rd.root, size_conditioning=args.get("size_conditioning"))

    # --- stage 3 ------------------------------------------------------------------------------------------
    @_kernels
    def sample_latents(self, context: Tensor, s: SampleSettings, start: Optional[Tensor] = None,
                       strength: float = 1.0, sizes: Optional[SizeConditioning] = None) -> Tensor:
        """DDIM with classifier-free guidance from `context`, one latent per seed of `s` (initial noise from a CPU
        generator, so CPU and GPU runs start alike). With `start`, SDEdit from that latent at `strength`.
        `sizes`: SDXL's size/crop conditioning (`size_conditioning`; default: a native-size image)."""
        uncond = self.conditioning.encode_negative(s.negative_prompt).to(self.device)
        model = denoiser(self.conditioning.unet_call(sizes), self.runtime.dtype)
        shape = (1, self.config.unet.in_channels, self.config.latent_size, self.config.latent_size)
        out = []
        for seed in s.seeds:
            gen = torch.Generator().manual_seed(seed)
            latents, start_step = initial_latents(shape, seed, self.device), 0
            if start is not None:  # SDEdit: noise the input's latent to the strength's timestep
                latents, start_step = sdedit_start(self.schedule, start, strength, s.steps, latents)
            out.append(sample_ddim(model, self.schedule, latents, context.to(self.device), uncond, s.steps,
                                   s.guidance_scale, s.ddim_eta, self.on_device, generator=gen,
                                   progress=self.progress, start_step=start_step))
            if not torch.isfinite(out[-1]).all():
                raise NumericalError(f"stage 3: sampling seed {seed}: the latents have inf or nan values "
                                     "(try --precision fp32 or bf16)")
        return torch.cat(out)

    def _images(self, context: Tensor, s: SampleSettings, start: Optional[Tensor] = None, strength: float = 1.0,
                sizes: Optional[SizeConditioning] = None) -> List[Image.Image]:
        try:
            return self.decode(self.sample_latents(context, s, start, strength, sizes))
        except torch.cuda.OutOfMemoryError as e:  # already one image at a time: only a smaller footprint helps
            raise out_of_memory("stage 3: sampling", e, "a trained run is kept; sample again with --precision bf16 "
                                "or fp16 to need less") from None

    @_kernels
    def sample(self, run: Run, settings: Optional[SampleSettings] = None, save: bool = True, force: bool = False,
               **keywords: Any) -> SampleResult:
        """Stage 3 with `settings` (or SampleSettings' fields as keywords): for each alpha,
        e = alpha * e_tgt + (1 - alpha) * e_opt (paper eq. 4), sampled with the fine-tuned model. Saves samples and
        the grid into the run directory when there is one. On a GPU the plan is checked against its free memory
        first unless `force`."""
        s = settings_with(SampleSettings, settings, keywords)
        if not force:
            self._check_memory(("sample", "vae_decode"), finetune=run.settings.finetune,
                               lora_rank=run.settings.lora_rank)
        images: Dict[Tuple[int, float], Image.Image] = {}
        with self.finetuned_model(run):
            for a in s.alpha:
                e = interpolate(run.target_embedding, run.optimized_embedding, a)
                for seed, img in zip(s.seeds, self._images(e, s, sizes=run.size_conditioning)):
                    images[(seed, a)] = img
        grid = make_grid([[images[(sd, a)] for a in s.alpha] for sd in s.seeds],
                         row_labels=[f"seed {sd}" for sd in s.seeds], col_labels=[f"alpha {a:g}" for a in s.alpha])
        result = SampleResult(images=images, grid=grid, seeds=list(s.seeds), alphas=list(s.alpha))
        recorded = {"target_text": run.target_text, "guidance_scale": s.guidance_scale, "steps": s.steps,
                    "ddim_eta": s.ddim_eta, "negative_prompt": s.negative_prompt, "finetune": run.settings.finetune}
        with run_dir(run.directory if save else None) as rd:  # a concurrent fit or sample is refused
            result.paths, result.grid_path = rd.save_samples(images, grid, recorded)
        return result

    # --- sanity checks of a checkpoint ---------------------------------------------------------------------------
    @_kernels
    def txt2img(self, prompt: str, settings: Optional[SampleSettings] = None, **keywords: Any) -> List[Image.Image]:
        """One image per seed of `settings` (or SampleSettings' fields as keywords; alpha plays no part)."""
        return self._images(self.encode_text(prompt), settings_with(SampleSettings, settings, keywords))

    @_kernels
    def img2img(self, image: ImageLike, prompt: str, strength: float = SDEDIT_STRENGTH,
                settings: Optional[SampleSettings] = None, square: str = FitSettings.square,
                **keywords: Any) -> List[Image.Image]:
        """SDEdit (Meng et al. 2022): noise the input to `strength`, then denoise towards the prompt."""
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        source = self._squared(image, square)
        return self._images(self.encode_text(prompt), settings_with(SampleSettings, settings, keywords),
                            start=self.encode_image(source.image), strength=strength,
                            sizes=self.conditioning.sizes(source))


def _last(values: Sequence[float]) -> str:
    return str(values[-1]) if values else "n/a"
