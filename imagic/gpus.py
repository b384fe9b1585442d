"""GPUs a plan is held against: their dense peak throughput per precision (vendor figures) and the card sizes.

Peaks are dense (no 2:4 structured sparsity: vendors print the sparse figure, twice the dense one, with an
asterisk) and, for GeForce cards, with fp32 accumulation (their fp16-accumulate figure is twice as high; cuBLAS,
cuDNN and our kernels accumulate in fp32). A plan in fp32 is held against the TF32 tensor-core peak, which
PyTorch uses for convolutions by default (`torch.backends.cudnn.allow_tf32`) but not for matmuls
(`torch.backends.cuda.matmul.allow_tf32` is off): the fastest an fp32 step could run, so still a floor. The T4
(Turing) has neither TF32 nor bf16 tensor cores: fp32 there is its 8.1 TFLOPS of CUDA cores, bf16 has no floor.

Sources (checked with the vendors' documents as quoted by their resellers and spec databases):
- T4: NVIDIA T4 Tensor Core GPU datasheet: mixed precision (FP16/FP32) 65 TFLOPS, single precision 8.1 TFLOPS.
- A10: NVIDIA A10 Tensor Core GPU datasheet: BF16 / FP16 tensor core 125 TF (250 sparse), TF32 62.5 TF, FP32
  31.2 TF.
- RTX 3090: NVIDIA Ampere GA102 GPU Architecture whitepaper, appendix A: peak FP16 and BF16 tensor TFLOPS with
  FP32 accumulate 71 (142 sparse), TF32 35.6, FP32 35.6.
- RTX 4090: NVIDIA Ada GPU Architecture whitepaper: peak FP16 and BF16 tensor TFLOPS with FP32 accumulate 165.2
  (330.4 sparse), TF32 82.6, FP32 82.6.
- A100: NVIDIA A100 Tensor Core GPU datasheet: BF16 / FP16 tensor core 312 TF (624 sparse), TF32 156 TF, FP32
  19.5 TF.
- H100 SXM: NVIDIA H100 Tensor Core GPU datasheet: BF16 / FP16 tensor core 1,979 TF with sparsity (989 dense),
  TF32 989 with sparsity (494.7 dense), FP32 67 TF.
- H200: NVIDIA H200 Tensor Core GPU datasheet: the H100 SXM's compute (BF16 / FP16 989 TF dense, TF32 494.7, FP32
  67) with 141 GB of HBM3e.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Gpu:
    """Dense peaks in TFLOPS; None where the GPU has no tensor cores for that type."""
    name: str
    memory_gib: float
    fp16: float
    bf16: Optional[float]
    tf32: Optional[float]
    fp32: float

    def peak_tflops(self, precision: str) -> Optional[float]:
        """The peak a step in `precision` ("fp32" | "fp16" | "bf16") is held against (see the module docstring)."""
        if precision == "fp32":
            return self.tf32 if self.tf32 is not None else self.fp32
        return self.fp16 if precision == "fp16" else self.bf16


GPUS: Tuple[Gpu, ...] = (
    Gpu("T4", 16, fp16=65.0, bf16=None, tf32=None, fp32=8.1),
    Gpu("A10", 24, fp16=125.0, bf16=125.0, tf32=62.5, fp32=31.2),
    Gpu("RTX 3090", 24, fp16=71.0, bf16=71.0, tf32=35.6, fp32=35.6),
    Gpu("RTX 4090", 24, fp16=165.2, bf16=165.2, tf32=82.6, fp32=82.6),
    Gpu("A100", 80, fp16=312.0, bf16=312.0, tf32=156.0, fp32=19.5),
    Gpu("H100 SXM", 80, fp16=989.4, bf16=989.4, tf32=494.7, fp32=67.0),
    Gpu("H200", 141, fp16=989.4, bf16=989.4, tf32=494.7, fp32=67.0),
)

CARDS_GB: Tuple[int, ...] = (8, 12, 16, 24, 40, 80)

# What a card holds besides PyTorch's tensors: the CUDA context, cuBLAS/cuDNN workspaces and the caching
# allocator's rounding. An estimate (0.3-0.6 GiB is what nvidia-smi typically shows for a PyTorch process before its
# first large tensor), not a measurement of ours; `plan(..., reserve_bytes=...)` replaces it.
CUDA_RESERVE_BYTES = GIB // 2
