"""Does a C++ compiler build torch extensions whose errors raise, or crash? (issue 17)

Root cause seen on the lent H200 image: its CXX, `/opt/gcc/bin/g++`, runs `g++-real -B/opt/gcc/lib/gcc/.../13/`,
and that directory has libstdc++.a but no libstdc++.so, so `-lstdc++` linked the C++ runtime statically into
nf4q._C. static_cxx_runtime() sees that in the linker's --trace. (The one-op probe below raised even so; the
full extension crashed on every TORCH_CHECK: scripts/build_error_check.py.)

An extension's TORCH_CHECK throws a c10::Error inside our .so that torch's own code (built by another compiler)
catches and turns into a Python RuntimeError. When the compiler brings its own unwinder / C++ runtime (a
wrapper that links libgcc or libstdc++ statically, or points RPATH at its own newer copies), the throw and the
catch run on two different runtimes and the process dies with SIGSEGV instead.

    python scripts/compiler_probe.py [CXX ...]   # default: $CXX (or c++) and /usr/bin/g++; prints a report
setup.py loads this file by path and calls choose_compiler() before building.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

PROBE = r"""
#include <Python.h>
#include <torch/library.h>
extern "C" PyObject* PyInit_nf4q_probe(void) {
  static struct PyModuleDef d = {PyModuleDef_HEAD_INIT, "nf4q_probe", nullptr, -1, nullptr};
  return PyModule_Create(&d);
}
static at::Tensor fail(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 99, "nf4q probe: the expected error");
  return x;
}
TORCH_LIBRARY(nf4q_probe, m) { m.def("fail(Tensor x) -> Tensor", &fail); }
"""

# Run in a child: build the probe with $CXX and call the op; exit 0 when it raised RuntimeError.
CHILD = r"""
import os, sys, torch
from torch.utils import cpp_extension
build = sys.argv[1]
cpp_extension.load("nf4q_probe", [os.path.join(build, "probe.cpp")], build_directory=build,
                   extra_ldflags=sys.argv[2:], verbose=False)
try:
    torch.ops.nf4q_probe.fail(torch.zeros(1))
except RuntimeError as e:
    sys.exit(0 if "expected error" in str(e) else 3)
sys.exit(4)
"""


def runtime_libs(cxx):
    """The libstdc++ / libgcc_s a compiler links against (-print-file-name), resolved."""
    out = {}
    for lib in ("libstdc++.so.6", "libgcc_s.so.1"):
        try:
            p = subprocess.run([cxx, f"-print-file-name={lib}"], capture_output=True, text=True,
                               timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            p = ""
        out[lib] = os.path.realpath(p) if os.path.isabs(p) else None
    return out


def toolchain_facts(cxx):
    """What else can make a compiler's exceptions unsafe in torch's process: a libstdc++.so that is a linker
    script pulling in a static part (RHEL gcc-toolset's libstdc++_nonshared.a carries private copies of runtime
    pieces), a default C++ ABI other than torch's, how it was configured."""
    facts = {}
    try:
        so = subprocess.run([cxx, "-print-file-name=libstdc++.so"], capture_output=True, text=True,
                            timeout=30).stdout.strip()
        if os.path.isfile(so) and os.path.getsize(so) < 4096:
            with open(so, errors="replace") as f:
                text = f.read()
            if "GROUP" in text or "INPUT" in text:
                facts["libstdc++.so is a linker script"] = " ".join(text.split())[-300:]
        macros = subprocess.run([cxx, "-x", "c++", "-E", "-dM", "-"], input="#include <string>\n", capture_output=True,
                                text=True, timeout=60).stdout
        abi = [ln.split()[-1] for ln in macros.splitlines() if ln.startswith("#define _GLIBCXX_USE_CXX11_ABI ")]
        facts["default _GLIBCXX_USE_CXX11_ABI"] = abi[0] if abi else "?"
        info = subprocess.run([cxx, "-v", "-E", "-x", "c++", os.devnull], capture_output=True, text=True,
                              timeout=30).stderr.splitlines()
        facts["configured with"] = [ln[:600] for ln in info if ln.startswith("Configured with")]
        facts["collect/ld"] = [ln[:200] for ln in info if "COLLECT_GCC=" in ln or "COLLECT_LTO" in ln]
    except (OSError, subprocess.SubprocessError) as e:
        facts["error"] = str(e)
    return facts


def loaded_libs():
    """The libstdc++ / libgcc_s this process (with torch imported) has mapped."""
    import torch  # noqa: F401

    out = {"libstdc++.so.6": None, "libgcc_s.so.1": None}
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split()[-1]
                for lib in out:
                    if os.path.basename(path).startswith(lib.split(".so")[0] + ".so"):
                        out[lib] = os.path.realpath(path)
    except OSError:
        pass
    return out


def static_cxx_runtime(cxx, flags=("-fopenmp",)):
    """The static C++ runtime archives (libstdc++.a, libsupc++.a, ...) that `cxx` puts into a shared object linked
    the way nf4q's is (-shared plus `flags`), from the linker's --trace; empty when the runtime stays a shared
    library. A wrapper that links it statically (e.g. its -B directory holds libstdc++.a but no libstdc++.so)
    gives the extension a private copy of __cxa_throw and the personality routine: measured on the lent H200
    image, every TORCH_CHECK in such an nf4q._C crashes the process with SIGSEGV."""
    d = tempfile.mkdtemp(prefix="nf4q-link-")
    try:
        src = os.path.join(d, "t.cpp")
        with open(src, "w") as f:
            f.write('#include <stdexcept>\nvoid nf4q_t(int x) { if (x) throw std::runtime_error("x"); }\n')
        r = subprocess.run([*cxx.split(), "-shared", "-fPIC", *flags, src, "-o", os.path.join(d, "t.so"),
                            "-Wl,--trace"], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.SubprocessError):
        return []
    finally:
        shutil.rmtree(d, ignore_errors=True)
    found = set()
    for line in (r.stdout + r.stderr).splitlines():
        for lib in ("libstdc++.a", "libsupc++.a", "libstdc++_nonshared.a"):
            if lib in line:
                found.add(line.strip().split(")")[0].lstrip("("))
    return sorted(found)


# What a built shared object links and exports, per tool: every ldd line, readelf -d's NEEDED/RPATH/RUNPATH, and
# nm -D's defined C++-runtime symbols (a private __cxa_throw or personality routine means a static runtime).
SO_FACTS = {"ldd": (["ldd"], None), "readelf": (["readelf", "-d"], ("NEEDED", "PATH")),
            "nm": (["nm", "-D", "--defined-only"], ("Unwind", "__cxa_throw", "personality", "__gcc_"))}


def so_facts(so, tools):
    """{tool: [lines]} for the tools (keys of SO_FACTS) found on this machine."""
    out = {}
    for tool in tools:
        cmd, keep = SO_FACTS[tool]
        if shutil.which(cmd[0]):
            text = subprocess.run([*cmd, so], capture_output=True, text=True).stdout
            out[tool] = [ln.strip() for ln in text.splitlines() if keep is None or any(k in ln for k in keep)]
    return out


def probe(cxx, extra_ldflags=(), keep=None):
    """Build and call the probe with `cxx`: (status, details). status: "raises", "crash (signal N)",
    "build failed", or "wrong error"."""
    build = keep or tempfile.mkdtemp(prefix="nf4q-probe-")
    with open(os.path.join(build, "probe.cpp"), "w") as f:
        f.write(PROBE)
    env = dict(os.environ, CXX=cxx)
    r = subprocess.run([sys.executable, "-c", CHILD, build, *extra_ldflags], env=env, capture_output=True, text=True,
                       timeout=900)
    so = os.path.join(build, "nf4q_probe.so")
    details = {"returncode": r.returncode, "stderr_tail": r.stderr[-1500:]}
    if os.path.exists(so):
        details.update(so_facts(so, ("ldd", "readelf")))
    if keep is None:
        shutil.rmtree(build, ignore_errors=True)
    if r.returncode == 0:
        return "raises", details
    if r.returncode < 0:
        return f"crash (signal {-r.returncode})", details
    return ("build failed" if not os.path.exists(so) else "wrong error"), details


def choose_compiler(cache_dir):
    """The CXX setup.py should build with. Checks $CXX (once per compiler and torch version, cached in
    cache_dir) when it is not the system compiler under /usr/bin: a link that pulls in a static C++ runtime
    fails it outright, else a probe build must raise; on failure falls back to /usr/bin/g++ when that one
    raises properly, else stops the build with what to do.
    NF4Q_SKIP_CXX_CHECK=1 skips all of it."""
    cxx = os.environ.get("CXX", "c++")
    path = shutil.which(cxx.split()[0]) or cxx
    if os.environ.get("NF4Q_SKIP_CXX_CHECK") == "1" or os.path.realpath(path).startswith("/usr/bin/"):
        return cxx
    mine, loaded = runtime_libs(cxx), loaded_libs()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    import torch

    key = json.dumps([os.path.realpath(path), version, torch.__version__, os.environ.get("LDFLAGS", "")])
    cache = os.path.join(cache_dir, "compiler_probe.json")
    try:
        with open(cache) as f:
            known = json.load(f)
    except (OSError, ValueError):
        known = {}
    if key not in known:
        print(f"nf4q: CXX={cxx} links {mine}, torch runs on {loaded}: checking that its errors raise ...",
              file=sys.stderr)
        static = static_cxx_runtime(cxx)
        known[key] = f"links the C++ runtime statically: {', '.join(static)}" if static else probe(cxx)[0]
        os.makedirs(cache_dir, exist_ok=True)
        with open(cache, "w") as f:
            json.dump(known, f)
    if known[key] == "raises":
        return cxx
    fallback = "/usr/bin/g++"
    if os.path.exists(fallback) and probe(fallback)[0] == "raises":
        print(f"nf4q: WARNING: an extension built with CXX={cxx} turns every error into a crash ({known[key]}); "
              f"building with {fallback} instead (set NF4Q_SKIP_CXX_CHECK=1 to force CXX)", file=sys.stderr)
        return fallback
    raise RuntimeError(f"nf4q: an extension built with CXX={cxx} turns every error into a crash ({known[key]}), and "
                       f"no working fallback compiler was found: set CXX to the compiler torch was built with "
                       f"(the distribution's g++), or NF4Q_SKIP_CXX_CHECK=1 to build anyway")


def main(argv):
    compilers = argv or [os.environ.get("CXX", "c++"), "/usr/bin/g++"]
    import torch

    print("torch process has loaded:", json.dumps(loaded_libs(), indent=1))
    print("torch", torch.__version__, "built with _GLIBCXX_USE_CXX11_ABI =", int(torch._C._GLIBCXX_USE_CXX11_ABI))
    for cxx in compilers:
        ver = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
        print(f"\n=== {cxx}: {ver}")
        print("links against:", json.dumps(runtime_libs(cxx), indent=1))
        print("toolchain:", json.dumps(toolchain_facts(cxx), indent=1))
        for flags in (("-fopenmp",), ()):
            static = static_cxx_runtime(cxx, flags)
            print(f"static C++ runtime linked with -shared {' '.join(flags)}:", static or "none")
        variants = [()]
        if not os.path.realpath(shutil.which(cxx) or cxx).startswith("/usr/bin/"):
            variants.append(("-shared-libgcc",))  # if only this one raises: the wrapper links libgcc statically
        for flags in variants:
            status, details = probe(cxx, flags)
            print(f"--- extra link flags {list(flags)}: {status}")
            for k in ("ldd", "readelf"):
                for ln in details.get(k, []):
                    print(f"    {k}: {ln}")
            if status != "raises":
                print("    stderr:", details["stderr_tail"].replace("\n", "\n    "))


if __name__ == "__main__":
    main(sys.argv[1:])
