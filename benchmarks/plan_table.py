"""The README's memory and time table: planned peak on the GPU and compute-bound time floor of
a whole edit, for SD1.5 at 512² and SD2.1-v at 768² in each precision and SDXL base at 1024² in fp16 and bf16,
LoRA and full fine-tuning, gradient checkpointing off and on, with the editor's defaults (1000
embedding steps, 500 LoRA / 1500 full steps, 5 alphas x 2 seeds at 50 DDIM steps, our Triton kernels). No GPU
and no weights needed: `imagic.plan` runs the real models on meta tensors.

    python benchmarks/plan_table.py          # about 2 minutes on 2 CPU cores

Planned vs measured peaks on a GPU are `benchmarks/gpu.sh`'s part (owed while no GPU machine is available).
"""
from __future__ import annotations

import itertools
from typing import List

from common import write_table

from imagic.gpus import GIB
from imagic.plan import plan

ALL_PRECISIONS = ("fp32", "fp16", "bf16")
FAMILIES = (("sd1", 512, "SD1.5 512²", ALL_PRECISIONS), ("sd2-v", 768, "SD2.1-v 768²", ALL_PRECISIONS),
            ("sdxl", 1024, "SDXL 1024²", ("fp16", "bf16")))
FLOOR_GPUS = ("A100", "H100 SXM", "RTX 4090", "T4")


def _minutes(seconds) -> str:
    return "n/a" if seconds is None else f"{seconds / 60:.1f}"


def rows() -> List[List[str]]:
    out = []
    settings = [(f, precision, finetune, checkpointing) for f in FAMILIES
                for precision, finetune, checkpointing in itertools.product(f[3], ("lora", "full"), (False, True))]
    for (family, resolution, label, _), precision, finetune, checkpointing in settings:
        p = plan(family, device="cuda", precision=precision, finetune=finetune, resolution=resolution,
                 gradient_checkpointing=checkpointing, seeds=2, alphas=5, kernels="triton")
        worst = max(p.stages, key=lambda s: p.stages[s].device_bytes)
        out.append([label, precision, finetune, "on" if checkpointing else "off",
                    f"{(p.device_bytes + p.reserve_bytes) / GIB:.1f}", worst,
                    *[_minutes(p.time_floor(g)) for g in FLOOR_GPUS]])
    return out


def main() -> None:
    header = ["model", "precision", "fine-tuning", "checkpointing", "planned peak GiB", "peak stage",
              *[f"floor {g} min" for g in FLOOR_GPUS]]
    notes = [
        "Planned peak: the most any stage has on the GPU (its weights, trainable tensors with gradients and Adam "
        "state, activations, and what the editor holds beside it) plus 0.5 GiB for the CUDA context "
        "(`imagic.plan`, `imagic plan --json` for the split). Time floor: the whole edit's FLOPs at the GPU's "
        "dense tensor-core peak (`imagic/gpus.py`: vendor figures; fp32 at TF32; n/a: no bf16 tensor cores on a "
        "T4). Real edits take longer: attention, norms and the optimiser are not at peak.",
        "For comparison: the diffusers community Imagic pipeline is reported to allocate 24-38 GB and to run 7-10 "
        "minutes on an RTX 3090 (fp32, full fine-tuning); a fork fits 11 GB on a T4 with fp16 and 8-bit Adam; the "
        "paper reports about 7 minutes on one A100 (Imagen-based; SD ports differ).",
    ]
    write_table("plan_table", "Planned GPU memory and time floor of one Imagic edit", header, rows(), notes)


if __name__ == "__main__":
    main()
