"""Instructions per 64-wide K step in the main loop of the swapped NF4 GEMM (csrc/cuda/swap_gemm.cu), read from the
built extension's machine code (SASS) with cuobjdump, so it needs no GPU.

That kernel is bound by instruction issue, not by memory (ncu on the H200: 0.62 instructions issued per scheduler
cycle; notes/cuda.md), so its speed follows this count: ncu counted 191 executed per step before the table lookups
became one PRMT each; this script counts 129 (static, 16 tokens, double quant) after. tests/test_sass_budget.py
keeps it from growing back.

    python scripts/sass_budget.py [path/to/nf4q/_C.so]   # one line per kernel instantiation

A step ends where the warp releases its stage: its arrive on the stage's "empty" mbarrier (SYNCS.ARRIVE.TRANS64.A1T0,
one per step); the count is static (both sides of a branch count) and its median over the unrolled loop is the
figure. `serialized` says whether ptxas made each wgmma wait for the previous one (warning C7512, register
pressure): more than one warpgroup arrive per step.
"""
import glob
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile

CUBIN = "swap_gemm.sm_90a.cubin"


def find_cuobjdump():
    """cuobjdump from the CUDA toolkit, or the copy triton ships; None when neither is there."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.access(path, os.X_OK) else None


def kernels(so, tool):
    """{mangled kernel name: [SASS instructions]} of the swapped kernel's cubin, {} when the .so has none."""
    listing = subprocess.run([tool, "-lelf", so], capture_output=True, text=True).stdout
    if CUBIN not in listing:
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([tool, "-xelf", CUBIN, so], cwd=tmp, capture_output=True, check=True)
        sass = subprocess.run([tool, "-sass", os.path.join(tmp, CUBIN)], capture_output=True, text=True,
                              check=True).stdout
    out = {}
    for part in sass.split("Function : ")[1:]:
        name = part.split()[0]
        out[name] = [re.sub(r"^\s*/\*[0-9a-f]+\*/\s*", "", line).split(";")[0].strip()
                     for line in part.splitlines() if re.match(r"\s*/\*[0-9a-f]{4}\*/", line)]
    return out


def step_count(instructions):
    """(median instructions per step, serialized wgmma?) over the steps between stage releases; None without two."""
    marks = [i for i, ins in enumerate(instructions) if "SYNCS.ARRIVE.TRANS64.A1T0" in ins]
    steps = [instructions[a + 1:b + 1] for a, b in zip(marks, marks[1:])]
    if not steps:
        return None
    arrives = statistics.median(sum("WARPGROUP.ARRIVE" in ins for ins in step) for step in steps)
    return statistics.median(len(step) for step in steps), arrives > 1


def budget(so):
    """{(dtype, tokens per tile, double quant, weights per launch): step_count()}, {} without the tool or the
    cubin."""
    tool = find_cuobjdump()
    if tool is None:
        return {}
    result = {}
    for name, ins in kernels(so, tool).items():
        m = re.search(r"swap_gemm_kernelI(13__nv_bfloat16|6__half)Li(\d+)ELb([01])ELi(\d)E", name)
        if m:
            dtype = "bf16" if "bfloat16" in m.group(1) else "fp16"
            result[(dtype, int(m.group(2)), m.group(3) == "1", int(m.group(4)))] = step_count(ins)
    return result


def main():
    if len(sys.argv) > 1:
        so = sys.argv[1]
    else:
        import nf4q
        so = glob.glob(os.path.join(os.path.dirname(nf4q.__file__), "_C*.so"))[0]
    counts = budget(so)
    if not counts:
        sys.exit(f"no cuobjdump, or no {CUBIN} in {so} (built without CUDA or without sm_90a)")
    for (dtype, tn, dq, g), (n, serialized) in sorted(counts.items()):
        print(f"swap_gemm_kernel {dtype} TN={tn:3d} double_quant={int(dq)} weights={g}: {n:g} instructions per step"
              + (", wgmma serialized" if serialized else ""))


if __name__ == "__main__":
    main()
