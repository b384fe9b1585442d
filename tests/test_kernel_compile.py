"""Every Triton kernel compiled for real GPUs on this CPU (benchmarks/kernel_compile.py --subset): sm_80 (A100),
sm_86 (RTX 3090 / A10) and sm_90 (H100), bf16, one launch per kernel at SD1.5's shapes with every candidate
config. Each must compile, not spill, fit the arch's shared memory, and use tensor cores where it has a `tl.dot`;
a deliberately broken variant must be flagged by the same rule. SDXL at 1024² needs no compilation the
SD workloads do not already make, and its head-dim-64 attention at 4096 x 4096 compiles clean on sm_86.

Runs in a subprocess without TRITON_INTERPRET (the suite's process has the interpreter on, which replaces the
compiler). The full table, every launch x config x arch, is benchmarks/results/kernel_compile.md.
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from imagic.kernels import dispatch, launch

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not dispatch.triton_available(), reason="Triton is not installed")


def _python(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _all_kernels() -> set:
    names = set()
    for module in ("attention", "attention_backward", "group_norm", "layer_norm", "geglu"):
        mod = importlib.import_module(f"imagic.kernels.{module}")
        names |= {v.fn.__name__ for v in vars(mod).values() if isinstance(v, launch.TritonKernel)}
    return names


@pytest.fixture(scope="module")
def subset(tmp_path_factory):
    out = tmp_path_factory.mktemp("compile") / "subset.json"
    done = _python("-m", "benchmarks.kernel_compile", "--subset", "--no-table", "--jobs", "2", "--json", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def test_every_kernel_compiles_on_every_arch(subset):
    kernels = _all_kernels()
    assert len(kernels) >= 12
    for arch in ("sm_80", "sm_86", "sm_90"):
        rows = [r for r in subset if r["arch"] == arch]
        assert {r["kernel"] for r in rows} == kernels, arch
        assert all(r["dtype"] in ("bfloat16", "float32") for r in rows)
        assert all(r["error"] is None and r["registers"] > 0 for r in rows), [r["error"] for r in rows]


def test_no_spills_shared_memory_within_limits_tensor_cores_in_dot_kernels(subset):
    bad = [(r["arch"], r["kernel"], r["D"], r["config"], r["problems"]) for r in subset if r["problems"]]
    assert not bad, bad
    dots = [r for r in subset if r["dot"]]
    assert {r["kernel"] for r in dots} == {"_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq"}
    assert all(r["mma"] > 0 for r in dots)
    # sm_90 runs the dots as wgmma (HGMMA), the others as mma.sync (HMMA); nvdisasm tells them apart.


BROKEN = r"""
import json, torch
from benchmarks.cubin import bind, compile_for, problems
from imagic.kernels import launch as L
from imagic.kernels.attention import flash_forward

def recorded(dtype):
    q = torch.empty(1, 8, 4096, 160, device="meta", dtype=dtype)
    with L.recording(L.TARGETS[86]) as found:
        flash_forward(q, q, q, 160 ** -0.5)
    return found[0]

out = {}
# tiles far too big for head dim 160: registers spill, and the k/v stages need more than sm_86's 99 KB
big = bind(recorded(torch.float16), dict(BLOCK_M=256, BLOCK_N=128, num_warps=4, num_stages=3), L.TARGETS[86],
           torch.bfloat16)
out["big"] = problems(compile_for(big), L.TARGETS[86], True)
# fp32 inputs with exact fp32 dots cannot use tensor cores
fp32 = bind(recorded(torch.float32), dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2), L.TARGETS[86],
            torch.bfloat16)
out["fp32"] = problems(compile_for(fp32), L.TARGETS[86], True)
good = bind(recorded(torch.float16), dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2), L.TARGETS[86],
            torch.bfloat16)
out["good"] = problems(compile_for(good), L.TARGETS[86], True)
# the same good config for a T4: Triton lowers tl.dot to FMA loops before sm_80
t4 = bind(recorded(torch.float16), dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2), L.TARGETS[75],
          torch.float16)
out["t4"] = problems(compile_for(t4), L.TARGETS[75], True)
print(json.dumps(out))
"""


def test_the_check_fails_on_broken_variants():
    """The same rule flags a spilling, shared-memory-hungry variant and a dot kernel without tensor cores."""
    done = _python("-c", BROKEN)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert any(p.startswith("spills") for p in found["big"]), found
    assert any("shared memory" in p for p in found["big"]), found
    assert "no tensor-core instruction in a dot kernel" in found["fp32"], found
    assert found["good"] == [], found
    # why attention.supported() sends a T4's attention to SDPA (GpuArch.tensor_core_dots)
    assert "no tensor-core instruction in a dot kernel" in found["t4"], found
    assert not launch.TARGETS[75].tensor_core_dots and launch.TARGETS[80].tensor_core_dots


SDXL = r"""
import json, torch
from benchmarks import kernel_compile as K
from benchmarks.cubin import compile_for, problems
from imagic.kernels import launch as L

arch = L.TARGETS[86]  # the tightest shared memory of the tensor-core targets
work = K.workloads(False)
xl_names = [n for n in work if "SDXL" in n or n == "VAE 1024"]
xl = K.variants(K.record(arch, {n: work[n] for n in xl_names}), arch, [torch.bfloat16])
sd = K.variants(K.record(arch, {n: w for n, w in work.items() if n not in xl_names}), arch, [torch.bfloat16])
attention = [e for e in xl.values() if e["dot"] and e["variant"].constexprs.get("D") == 64
             and "4096x4096" in e["shapes"]]
print(json.dumps({"workloads": xl_names, "new": len(set(xl) - set(sd)), "attention": len(attention),
                  "problems": [problems(compile_for(e["variant"]), arch, True) for e in attention],
                  "shapes": sorted({s for e in xl.values() for s in e["shapes"]})}))
"""


def test_sdxl_launches_are_compilations_the_table_already_checks():
    """Every launch of SDXL's workloads (UNet training, full fine-tuning and sampling at 1024², the VAE at 1024²,
    both text towers) specialises like one of SD's, so the committed table's verdicts cover them; its 4096-token
    attention at head dim 64 (forward and both backward kernels, every candidate config) passes on sm_86."""
    done = _python("-c", SDXL)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(found["workloads"]) == 5, found["workloads"]
    assert found["new"] == 0, found
    assert found["attention"] >= 3 and all(p == [] for p in found["problems"]), found["problems"]
    # SDXL at 1024²: 4096 / 1024 tokens, 77 keys; GEGLU at 640 and 1280; the VAE at 1024²; both towers
    for shape in ("4096x4096", "4096x77", "1024x1024", "1024x77", "4096x5120", "1024x10240", "1x128x1024x1024",
                  "77x768", "77x1280"):
        assert shape in found["shapes"], shape
