"""Imagic (Kawar et al., CVPR 2023): text-based real image editing, on any checkpoint `load_checkpoint` reads.

    e_tgt = text_encoder(tokenize(target_text))                              (Sec. 3.1, "text embedding")
    stage 1  e_opt = argmin_e  L(x0, e; theta)      Adam from e_tgt, model frozen             (eq. 2)
    stage 2  theta' = argmin_theta L(x0, e_opt; theta)   e_opt frozen; LoRA or all weights  (eq. 3)
    stage 3  e = alpha * e_tgt + (1 - alpha) * e_opt, then DDIM + classifier-free guidance with theta'   (eq. 4)

where L is the denoising loss of `training.denoising_loss`. alpha = 0 reproduces the input; the paper finds
0.6-0.8 best for Imagen, public SD ports use 0.9-1.5.

This module is the user-facing Editor: model placement and precision, image and text encoding, the run directory
(stages skipped when done, resumed when interrupted), stage 3 and saved samples. The stage 1-2 optimisation and
the stage-2 weights are `imagic.fitting`.

Usage:
    editor = Editor.from_checkpoint("v1-5-pruned-emaonly.safetensors", device="cuda", precision="bf16")
    run = editor.fit("dog.png", "a photo of a sitting dog", out="runs/dog")
    result = editor.sample(run, alpha=[0.8, 0.9, 1.0], seeds=[0, 1])
    result.grid            # PIL image, rows = seeds, columns = alphas
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
from dataclasses import asdict
from pathlib import Path
from typing import ContextManager, Dict, List, Optional, Sequence, Tuple, Union

import torch
from PIL import Image
from torch import Tensor

from . import fit_check
from .assemble import StableDiffusion
from .fileio import load_safetensors, read_json, save_safetensors, sha256_file
from .fitting import (FitSettings, finetune_unet, finetuned_state, finetuned_weights, load_finetuned,
                      optimize_embedding, save_finetuned, trainable)
from .conditioning import Conditioning, SizeConditioning
from .results import Run, SampleResult
from .images import from_pil, make_grid, open_image, save_png, square, to_pil
from .loader import load_checkpoint
from .plan import Plan, plan
from .rundir import RunDir, RunError, library_versions, plot_losses
from .samplers import Model, initial_latents, sample_ddim, sdedit_start
from .schedule import NoiseSchedule
from .tokenizer import clean
from .training import PRECISIONS, NumericalError, StepCallback, autocast, out_of_memory, peak_memory
from .vae import decode_latents, encode_latents

log = logging.getLogger(__name__)

ImageLike = Union[str, Path, Image.Image, Tensor]


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Editor:
    """Holds a loaded model and runs the three Imagic stages on it."""

    def __init__(self, model: StableDiffusion, device: Union[str, torch.device, None] = None,
                 precision: str = "fp32", gradient_checkpointing: bool = False, progress: bool = True,
                 resolution: Optional[int] = None):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if model.vae is None or model.text_encoder is None:
            raise ValueError("Imagic needs the UNet, the VAE and the text encoder; this checkpoint lacks one")
        self.model = model
        self.device = torch.device(device) if device is not None else _default_device()
        self.precision = precision
        self.progress = progress
        # resolution: pixels of the square images it edits and makes (default: the model's native size)
        self.config = model.config.at_resolution(resolution) if resolution else model.config
        self.schedule = NoiseSchedule.from_config(model.config)
        # Frozen weights in the working precision; the VAE stays fp32 (fp16 SD VAE decodes can NaN).
        dtype = PRECISIONS[precision]
        self.unet = model.unet.to(self.device, dtype).requires_grad_(False)
        self.text_encoder = model.text_encoder.to(self.device, dtype).requires_grad_(False)
        self.vae = model.vae.to(self.device).requires_grad_(False)
        self.unet.set_gradient_checkpointing(gradient_checkpointing)
        self.gradient_checkpointing = gradient_checkpointing
        self.conditioning = Conditioning(model, self.unet, self.text_encoder, self.device, self.config)

    @classmethod
    def from_checkpoint(cls, path: Union[str, Path], config=None, device: Union[str, torch.device, None] = None,
                        precision: str = "fp32", use_ema: bool = False, **kwargs) -> "Editor":
        """Load a checkpoint (see `load_checkpoint`) and wrap it in an Editor."""
        dev = torch.device(device) if device is not None else _default_device()
        model = load_checkpoint(path, config=config, dtype=PRECISIONS.get(precision, torch.float32), device=dev,
                                use_ema=use_ema)
        return cls(model, device=dev, precision=precision, **kwargs)

    # --- encoders -------------------------------------------------------------------------------------------
    def encode_text(self, prompts: Union[str, Sequence[str]]) -> Tensor:
        """The embedding Imagic optimises, fp32: (B, 77, width); on SDXL (B, 78, 2048), both towers' context and
        the pooled vector packed (imagic.conditioning)."""
        return self.conditioning.encode_text(prompts)

    def _open(self, image: ImageLike) -> Image.Image:
        if isinstance(image, Tensor):
            return to_pil(image.detach().cpu().reshape(-1, *image.shape[-3:])[:1])[0]
        return image.convert("RGB") if isinstance(image, Image.Image) else open_image(image)

    def prepare_image(self, image: ImageLike, fit: str = "crop") -> Image.Image:
        """Any path / PIL image / tensor in [-1, 1] -> a square RGB PIL image at the model's native resolution."""
        return square(self._open(image), self.config.image_size, fit)  # type: ignore[arg-type]

    def size_conditioning(self, image: Optional[ImageLike] = None, fit: str = "crop") -> Optional[SizeConditioning]:
        """SDXL's original size / crop / target size for `image` as `prepare_image` makes it square (None on
        SD 1.x / 2.x; without an image, a native-size uncropped one)."""
        return self.conditioning.sizes(None if image is None else self._open(image).size, fit)

    @torch.no_grad()
    def encode_image(self, image: Image.Image) -> Tensor:
        """Latent x0 of the image: the posterior mean (deterministic; SD's posterior std is ~1e-3 of its mean)."""
        x = from_pil(image).to(self.device)
        return encode_latents(self.vae, x, self.config.scale_factor, sample=False).float()

    @torch.no_grad()
    def decode(self, latents: Tensor) -> List[Image.Image]:
        """One latent at a time, so an image does not depend on what else is decoded with it: CPU BLAS chooses its
        blocking by the batch size (on the built-in model, decoding 10 latents at once left 4 of the 10 images one
        pixel value off by 1 against decoding each alone), and the decoder's activations, sampling's largest at 512²,
        are one image's."""
        return [to_pil(decode_latents(self.vae, z[None].float(), self.config.scale_factor).float().cpu())[0]
                for z in latents]

    # --- stages 1 and 2 ---------------------------------------------------------------------------------------
    def plan(self, **settings) -> Plan:
        """Memory and compute of an edit on this editor's model, device, precision and kernels (`imagic.plan`;
        sampling runs one image at a time here, so its batch is 1 and its steps are per image)."""
        defaults = dict(device=self.device.type, precision=self.precision, kernels=fit_check.kernels_setting(),
                        gradient_checkpointing=self.gradient_checkpointing, seeds=1, alphas=1)
        return plan(self.config, **{**defaults, **settings})

    def _check_memory(self, stages: Sequence[str], **settings) -> None:
        if fit_check.device_memory(self.device) is not None:  # a GPU: plan (seconds) and compare with its memory
            fit_check.check(self.plan(**settings), stages, self.device, lambda o: self.plan(**{**settings, **o}))

    def fit(self, image: ImageLike, target_text: str, out: Union[str, Path, None] = None,
            callback: Optional[StepCallback] = None, force: bool = False, **settings) -> Run:
        """Stages 1 and 2. With `out`, everything goes to that run directory and an existing one is resumed:
        finished stages are skipped and an interrupted stage continues from its last saved step. On a GPU the
        plan is checked against its free memory first (fit_check.WontFit); `force=True` skips that."""
        s = FitSettings(**settings)
        if not target_text or not clean(target_text):
            raise ValueError("the target text is empty (or nothing but spaces and control characters)")
        if not force:
            self._check_memory(("stage1", "stage2", "vae_encode"), finetune=s.finetune, lora_rank=s.lora_rank)
        pil, sizes = self.prepare_image(image, s.fit), self.size_conditioning(image, s.fit)
        rd = RunDir(out) if out is not None else None
        with rd if rd is not None else contextlib.nullcontext():
            return self._fit(pil, sizes, target_text, s, rd, callback)

    def _run_args(self, target_text: str, s: FitSettings, image_sha: str,
                  sizes: Optional[SizeConditioning]) -> Dict:
        path = self.model.path
        return {"target_text": target_text, "settings": asdict(s), "input_sha256": image_sha,
                "size_conditioning": sizes,
                "checkpoint": str(path) if path else None,
                "checkpoint_sha256": sha256_file(path) if path and path.is_file() else None,
                "model_config": self.config.to_dict(), "precision": self.precision, "device": str(self.device),
                "versions": library_versions()}

    def _fit(self, pil: Image.Image, sizes: Optional[SizeConditioning], target_text: str, s: FitSettings,
             rd: Optional[RunDir], callback: Optional[StepCallback]) -> Run:
        image_sha = hashlib.sha256(pil.tobytes()).hexdigest()
        if rd is not None:
            rd.check_or_write_args(self._run_args(target_text, s, image_sha, sizes),
                                   identity=("target_text", "settings", "input_sha256", "checkpoint_sha256",
                                             "size_conditioning"))
            if not rd.input_image.exists():
                save_png(pil, rd.input_image, {"target_text": target_text})
        x0 = self.encode_image(pil)
        e_tgt = self.encode_text(target_text)
        if rd is not None and not rd.target_embedding.exists():
            save_safetensors(rd.target_embedding, {"embedding": e_tgt})
        model = self.conditioning.unet_call(sizes)
        e_opt, losses1 = self._stage1(model, x0, e_tgt, s, rd, callback)
        finetuned, losses2 = self._stage2(model, x0, e_opt, s, rd, callback)
        if rd is not None:
            rd.loss_plot.parent.mkdir(parents=True, exist_ok=True)
            save_png(plot_losses({"stage 1 (embedding)": losses1, f"stage 2 ({s.finetune})": losses2}),
                     rd.loss_plot)
        return Run(target_text=target_text, settings=s, target_embedding=e_tgt.cpu(), optimized_embedding=e_opt.cpu(),
                   finetuned=finetuned, input_image=pil, losses={"stage1": losses1, "stage2": losses2},
                   directory=rd.root if rd else None, size_conditioning=sizes)

    def _stage1(self, model: Model, x0: Tensor, e_tgt: Tensor, s: FitSettings, rd: Optional[RunDir],
                callback: Optional[StepCallback]) -> Tuple[Tensor, List[float]]:
        """Stage 1 in the run directory: skipped when done, resumed when interrupted, recorded when finished."""
        if rd is not None and rd.optimized_embedding.exists():
            log.info("stage 1 already done: %s", rd.optimized_embedding)
            rd.resume_state(1).unlink(missing_ok=True)  # left behind if a kill came between the two writes
            return load_safetensors(rd.optimized_embedding)[0]["embedding"].to(self.device), rd.read_losses(1)
        e_opt, state = optimize_embedding(
            model, self.schedule, x0, e_tgt, s, self.precision, resume_path=rd.resume_state(1) if rd else None,
            callback=callback, progress=self.progress,
            on_save=(lambda st: rd.write_losses(1, st.losses)) if rd else None)
        if rd is not None:
            save_safetensors(rd.optimized_embedding, {"embedding": e_opt})  # marks stage 1 as done
            rd.write_losses(1, state.losses)
            rd.resume_state(1).unlink(missing_ok=True)
            rd.log(f"stage 1 done: {s.embed_steps} steps, final loss {state.losses[-1] if state.losses else 'n/a'}, "
                   f"peak memory {peak_memory(self.device)}")
        return e_opt, state.losses

    def _stage2(self, model: Model, x0: Tensor, e_opt: Tensor, s: FitSettings, rd: Optional[RunDir],
                callback: Optional[StepCallback]) -> Tuple[Dict[str, Tensor], List[float]]:
        """Stage 2 (LoRA adapters or every UNet weight) in the run directory, like `_stage1`."""
        if rd is not None and rd.finetuned(s.finetune).exists():
            log.info("stage 2 already done: %s", rd.finetuned(s.finetune))
            rd.resume_state(2).unlink(missing_ok=True)
            return self._read_finetuned(rd, s.finetune), rd.read_losses(2)
        with trainable(self.unet, s, self.precision) as params:
            state = finetune_unet(
                model, self.schedule, x0, e_opt, params, s, self.precision,
                resume_path=rd.resume_state(2) if rd else None, callback=callback, progress=self.progress,
                on_save=(lambda st: rd.write_losses(2, st.losses)) if rd else None)
            finetuned = finetuned_state(self.unet, s.finetune)
            if rd is not None:
                save_finetuned(self.unet, s.finetune, rd.finetuned(s.finetune), self.config.unet,
                               read_json(rd.args).get("checkpoint_sha256"))
        if rd is not None:
            rd.write_losses(2, state.losses)
            rd.resume_state(2).unlink(missing_ok=True)
            rd.log(f"stage 2 done: {s.finetune}, {s.finetune_steps} steps, final loss "
                   f"{state.losses[-1] if state.losses else 'n/a'}, peak memory {peak_memory(self.device)}")
        return finetuned, state.losses

    def _read_finetuned(self, rd: RunDir, mode: str) -> Dict[str, Tensor]:
        return load_finetuned(self.unet, mode, rd.finetuned(mode), self.config.unet)

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
                   finetuned=self._read_finetuned(rd, s.finetune), input_image=pil,
                   losses={"stage1": rd.read_losses(1), "stage2": rd.read_losses(2)}, directory=rd.root,
                   size_conditioning=args.get("size_conditioning"))

    # --- stage 3 ------------------------------------------------------------------------------------------
    def sample_latents(self, context: Tensor, seeds: Sequence[int], guidance_scale: float = 7.5, steps: int = 50,
                       ddim_eta: float = 0.0, negative_prompt: str = "", start: Optional[Tensor] = None,
                       strength: float = 1.0, sizes: Optional[SizeConditioning] = None) -> Tensor:
        """DDIM with classifier-free guidance from `context`, one latent per seed (initial noise from a CPU
        generator, so CPU and GPU runs start alike). With `start`, SDEdit from that latent at `strength`.
        `sizes`: SDXL's size/crop conditioning (`size_conditioning`; default: a native-size image)."""
        uncond = self.conditioning.encode_negative(negative_prompt)
        denoiser = self._denoiser(self.conditioning.unet_call(sizes))
        shape = (1, self.config.unet.in_channels, self.config.latent_size, self.config.latent_size)
        out = []
        for seed in seeds:
            gen = torch.Generator().manual_seed(seed)
            latents, start_step = initial_latents(shape, seed, self.device), 0
            if start is not None:  # SDEdit: noise the input's latent to the strength's timestep
                latents, start_step = sdedit_start(self.schedule, start, strength, steps, latents)
            with autocast(self.device, self.precision):
                out.append(sample_ddim(denoiser, self.schedule, latents, context.to(self.device),
                                       uncond.to(self.device), steps=steps, guidance_scale=guidance_scale,
                                       ddim_eta=ddim_eta, generator=gen, progress=self.progress,
                                       start_step=start_step))
            if not torch.isfinite(out[-1]).all():
                raise NumericalError(f"stage 3: sampling seed {seed}: the latents have inf or nan values "
                                     "(try --precision fp32 or bf16)")
        return torch.cat(out)

    def _sample(self, context: Tensor, seeds: Sequence[int], guidance_scale: float, steps: int, ddim_eta: float,
                negative_prompt: str, start: Optional[Tensor] = None, strength: float = 1.0,
                sizes: Optional[SizeConditioning] = None) -> List[Image.Image]:
        try:
            return self.decode(self.sample_latents(context, seeds, guidance_scale, steps, ddim_eta, negative_prompt,
                                                   start, strength, sizes))
        except torch.cuda.OutOfMemoryError as e:  # already one image at a time: only a smaller footprint helps
            raise out_of_memory("stage 3: sampling", e, "a trained run is kept; sample again with --precision bf16 "
                                "or fp16 to need less") from None

    def _denoiser(self, model: Model) -> Model:
        """`model` in the working precision, returning fp32."""
        dtype = PRECISIONS[self.precision]
        return lambda x, t, context: model(x.to(dtype), t, context.to(dtype)).float()

    def sample(self, run: Run, alpha: Union[float, Sequence[float]] = (0.6, 0.7, 0.8, 0.9, 1.0),
               seeds: Union[int, Sequence[int]] = (0,), guidance_scale: float = 7.5, steps: int = 50,
               ddim_eta: float = 0.0, negative_prompt: str = "", save: bool = True,
               force: bool = False) -> SampleResult:
        """Stage 3: for each alpha, e = alpha * e_tgt + (1 - alpha) * e_opt (paper eq. 4), sampled with the
        fine-tuned model. Saves samples and the grid into the run directory when there is one. On a GPU the plan
        is checked against its free memory first unless `force`."""
        if not force:
            self._check_memory(("sample", "vae_decode"), finetune=run.settings.finetune,
                               lora_rank=run.settings.lora_rank)
        alphas = [float(alpha)] if isinstance(alpha, (int, float)) else [float(a) for a in alpha]
        seed_list = [int(seeds)] if isinstance(seeds, int) else [int(x) for x in seeds]
        images: Dict[Tuple[int, float], Image.Image] = {}
        with self.finetuned_model(run):
            for a in alphas:
                e = a * run.target_embedding + (1 - a) * run.optimized_embedding
                for seed, img in zip(seed_list, self._sample(e, seed_list, guidance_scale, steps, ddim_eta,
                                                             negative_prompt, sizes=run.size_conditioning)):
                    images[(seed, a)] = img
        grid = make_grid([[images[(sd, a)] for a in alphas] for sd in seed_list],
                         row_labels=[f"seed {sd}" for sd in seed_list], col_labels=[f"alpha {a:g}" for a in alphas])
        result = SampleResult(images=images, grid=grid, seeds=seed_list, alphas=alphas)
        if save and run.directory is not None:
            settings = {"target_text": run.target_text, "guidance_scale": guidance_scale, "steps": steps,
                        "ddim_eta": ddim_eta, "negative_prompt": negative_prompt, "finetune": run.settings.finetune}
            with RunDir(run.directory) as rd:  # a concurrent fit or sample is refused
                result.paths, result.grid_path = rd.save_samples(images, grid, settings)
        return result

    # --- sanity checks of a checkpoint ---------------------------------------------------------------------------
    def txt2img(self, prompt: str, seeds: Union[int, Sequence[int]] = (0,), guidance_scale: float = 7.5,
                steps: int = 50, ddim_eta: float = 0.0, negative_prompt: str = "") -> List[Image.Image]:
        seed_list = [int(seeds)] if isinstance(seeds, int) else list(seeds)
        return self._sample(self.encode_text(prompt), seed_list, guidance_scale, steps, ddim_eta, negative_prompt)

    def img2img(self, image: ImageLike, prompt: str, strength: float = 0.75, seeds: Union[int, Sequence[int]] = (0,),
                guidance_scale: float = 7.5, steps: int = 50, ddim_eta: float = 0.0, negative_prompt: str = "",
                fit: str = "crop") -> List[Image.Image]:
        """SDEdit (Meng et al. 2022): noise the input to `strength`, then denoise towards the prompt."""
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        seed_list = [int(seeds)] if isinstance(seeds, int) else list(seeds)
        x0 = self.encode_image(self.prepare_image(image, fit))
        return self._sample(self.encode_text(prompt), seed_list, guidance_scale, steps, ddim_eta, negative_prompt,
                            start=x0, strength=strength, sizes=self.size_conditioning(image, fit))

