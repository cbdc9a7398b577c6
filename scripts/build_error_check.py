"""Does the whole nf4q extension, built with a given toolchain, raise on bad input or crash? (issue 17)

scripts/compiler_probe.py builds a one-op extension; this builds the real one, in scratch copies of the tree, once
per toolchain variant (in parallel), then calls ops with bad arguments in child processes (CPU, and CUDA when
there is a GPU) and reports "raises" or "crash (signal N)" per variant, with what the .so links and exports.

    python scripts/build_error_check.py

Variants: the environment as it is (setup.py's compiler check on: what `pip install .` does), then with that check
off (NF4Q_SKIP_CXX_CHECK=1), and when CXX is not the system compiler: its CXX with the system nvcc host compiler,
and the system CXX with its CC as nvcc host (which of the compile and the link step matters).
"""
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compiler_probe as probe  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COPY = ["csrc", "nf4q", "setup.py", "pyproject.toml", "scripts", "README.md", "CMakeLists.txt", "constraints.txt"]

BAD_CALLS = {  # name: python code that must raise ValueError/TypeError/RuntimeError
    "cpu gemm_4bit, wrong K": "w = nf4q.quantize(torch.randn(64, 128)); "
                              "torch.ops.nf4q.gemm_4bit(torch.randn(3, 100), *w.op_args(), None)",
    "cpu dequantize, bad dtype": "w = nf4q.quantize(torch.randn(64, 128)); w.dequantize(torch.int32)",
    "cuda gemm_4bit, wrong K": "w = nf4q.quantize(torch.randn(64, 128)).cuda(); "
                               "torch.ops.nf4q.gemm_4bit(torch.randn(3, 100, device='cuda'), *w.op_args(), None)",
    "cuda autograd, wrong K": "w = nf4q.Linear4bit.from_linear(torch.nn.Linear(128, 64)).cuda(); "
                              "w(torch.randn(3, 100, device='cuda', requires_grad=True)).sum().backward()",
}
CHILD = """
import sys, torch
sys.path.insert(0, sys.argv[1])
import nf4q
assert nf4q.__file__.startswith(sys.argv[1]), nf4q.__file__
try:
    {code}
except (ValueError, TypeError, RuntimeError) as e:
    sys.exit(0)
sys.exit(3)
"""


def variants():
    cc, cxx = os.environ.get("CC"), os.environ.get("CXX")
    out = {"environment as is": {}, "environment as is, NF4Q_SKIP_CXX_CHECK=1": {"NF4Q_SKIP_CXX_CHECK": "1"}}
    if cxx and not os.path.realpath(shutil.which(cxx) or cxx).startswith("/usr/bin/"):
        off = {"NF4Q_SKIP_CXX_CHECK": "1"}
        out[f"CXX={cxx}, nvcc host /usr/bin/gcc"] = {"CXX": cxx, "CC": "/usr/bin/gcc", **off}
        out[f"CXX=/usr/bin/g++, nvcc host {cc or 'default'}"] = {"CXX": "/usr/bin/g++", "CC": cc, **off}
    return out


def build(label, env_over):
    d = tempfile.mkdtemp(prefix="nf4q-build-check-")
    for name in COPY:
        src = os.path.join(ROOT, name)
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(d, name), ignore=shutil.ignore_patterns("*.so", "__pycache__"))
        elif os.path.exists(src):
            shutil.copy(src, d)
    env = dict(os.environ, MAX_JOBS=os.environ.get("MAX_JOBS", "4"))
    for k, v in env_over.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    r = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=d, env=env, capture_output=True,
                       text=True)
    return label, d, r


def main():
    import torch

    print("CC =", os.environ.get("CC"), " CXX =", os.environ.get("CXX"), " PATH gcc/g++ =", shutil.which("gcc"),
          shutil.which("g++"))
    for tool in ("c++", os.environ.get("CXX") or "c++"):
        p = shutil.which(tool)
        if p:
            kind = subprocess.run(["file", "-L", p], capture_output=True, text=True).stdout.strip()
            print(f"{tool} -> {os.path.realpath(p)}: {kind[:200]}")
            if kind.find("script") >= 0:
                with open(p) as f:
                    body = [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]
                print("  script:", " | ".join(body)[:1500])
            for flags in (["-fopenmp"], []):
                static = probe.static_cxx_runtime(p, flags)
                print(f"  static C++ runtime with -shared {' '.join(flags)}:", static or "none")
            for lib in ("libstdc++.so", "libstdc++.a"):
                print(f"  -print-file-name={lib}:", subprocess.run([p, f"-print-file-name={lib}"], capture_output=True,
                                                                    text=True).stdout.strip())
    with ThreadPoolExecutor(4) as pool:
        builds = list(pool.map(lambda kv: build(*kv), variants().items()))
    for label, d, r in builds:
        print(f"\n=== {label}: build exit {r.returncode}")
        for ln in r.stderr.splitlines():
            if ln.startswith("nf4q:"):
                print("   ", ln[:400])
        if r.returncode != 0:
            print(r.stderr[-3000:])
            shutil.rmtree(d, ignore_errors=True)
            continue
        so = [os.path.join(d, "nf4q", f) for f in os.listdir(os.path.join(d, "nf4q")) if f.startswith("_C")][0]
        for tool, lines in probe.so_facts(so, ("readelf", "nm")).items():
            for ln in lines:
                print(f"    {tool}: {ln}")
        for name, code in BAD_CALLS.items():
            if name.startswith("cuda") and not torch.cuda.is_available():
                continue
            c = subprocess.run([sys.executable, "-c", CHILD.format(code=code), d], capture_output=True, text=True)
            status = {0: "raises"}.get(c.returncode, f"crash (signal {-c.returncode})" if c.returncode < 0
                                       else f"exit {c.returncode}: {c.stderr[-400:]}")
            print(f"  {name}: {status}")
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
