#!/usr/bin/env bash
# The GPU checks and benchmarks in one short run, for a machine with an NVIDIA GPU:
#   1. the kernel tests compiled on CUDA (the CPU suite runs them under the Triton interpreter), then the
#      `gpu`-marked ones: bf16 and fp16 at SD1.5 / SD2 real shapes;
#   2. benchmarks/kernel_ops.py (bf16 and fp16), unet_step.py and imagic_step.py on CUDA in bf16;
#   3. benchmarks/imagic_edit.py: one whole edit per variant (ours triton / ours torch / the diffusers community
#      pipeline), at reduced step counts that fit the step timeout, extrapolated to the paper's in the table. The
#      community part needs .whl/imagic_stable_diffusion.py (diffusers' file, not committed: benchmarks/README.md).
# Results: tables in benchmarks/results/ and a copy plus the log under $OUT (default benchmarks/results/gpu).
#
# Needs torch, triton, einops, pillow, safetensors, pyyaml, tqdm, and for the comparisons diffusers + open_clip_torch
# (+ transformers and accelerate for the community Imagic pipeline)
# (+ pytest, pytest-timeout, hypothesis). On a machine that lacks some, put their wheels in .whl/ (they are installed
# with --no-deps into /tmp/site). Nothing is downloaded.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
LOG="$OUT/gpu_log.txt"
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# The package maps kernels/ to imagic.kernels, so it must be installed (editable, offline, no dependencies).
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . || { echo "cannot install imagic"; exit 1; }

run() {  # run one step, keep going on failure, log everything
    echo "=== $*" | tee -a "$LOG"
    timeout "${STEP_TIMEOUT:-420}" "$@" 2>&1 | tee -a "$LOG"
    echo "=== exit ${PIPESTATUS[0]}: $*" | tee -a "$LOG"
}

{ nvidia-smi; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } \
    2>&1 | tee -a "$LOG"
run python3 -m pytest -q -p no:cacheprovider -m "gpu or not gpu" tests/test_kernels.py tests/test_kernel_fallback.py
run python3 -m pytest -q -p no:cacheprovider tests/test_unet.py tests/test_editor.py -x
run python3 benchmarks/kernel_ops.py --dtype bf16
run python3 benchmarks/kernel_ops.py --dtype fp16
run python3 benchmarks/unet_step.py --device cuda --dtype bf16 --sizes 64 --repeats 5
run python3 benchmarks/imagic_step.py --device cuda --dtype bf16
run python3 benchmarks/imagic_edit.py --device cuda --embed-steps 200 --finetune-steps 200 --steps 25
cp benchmarks/results/kernels_*.md benchmarks/results/unet_step_cuda*.md benchmarks/results/imagic_step_cuda*.md \
    benchmarks/results/imagic_edit_cuda*.md "$OUT"/ 2>/dev/null
echo "results in $OUT" | tee -a "$LOG"
