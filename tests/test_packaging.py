"""What `pip install .` puts in site-packages: nf4q and peft_layers (and the nf4q._C extension), no top-level
benchmarks/tests packages. The wheel is built from a copy of the tree by setup.py itself with the extension
left out of the build (compiling it takes minutes and is what CI's install step does anyway); the extension's
declaration is recorded and checked instead."""
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# setup.py runs as usual, except that setup() is called without compiling ext_modules (their names are recorded)
_BUILD = """
import json, sys, setuptools
orig = setuptools.setup
def setup(**kw):
    json.dump([e.name for e in kw.get("ext_modules", [])] + ["|"] + sorted(kw.get("extras_require", {})),
              open("ext.json", "w"))
    return orig(**{**kw, "ext_modules": []})
setuptools.setup = setup
sys.argv = ["setup.py", "-q", "bdist_wheel", "-d", sys.argv[1]]
exec(compile(open("setup.py").read(), "setup.py", "exec"), {"__name__": "__main__", "__file__": "setup.py"})
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout (the tree is copied from `git ls-files`)")
    src = tmp_path_factory.mktemp("src")
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                           check=True, capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        if (ROOT / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, src / rel)
    out = tmp_path_factory.mktemp("dist")
    env = {"USE_CUDA": "0", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", _BUILD, str(out)], cwd=src, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (whl,) = out.glob("nf4q-*.whl")
    ext, _, extras = " ".join(json.loads((src / "ext.json").read_text())).partition("|")
    with zipfile.ZipFile(whl) as z:
        names = z.namelist()
        (ep,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        return names, ext.split(), extras.split(), z.read(ep).decode()


def test_wheel_holds_nf4q_and_peft_layers_only(wheel):
    names = wheel[0]
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"nf4q", "peft_layers"}
    for must in ("nf4q/__init__.py", "nf4q/loading.py", "nf4q/cli/__init__.py", "nf4q/optim/__init__.py",
                 "peft_layers/__init__.py"):
        assert must in names
    assert not any(n.startswith(("benchmarks/", "tests/", "csrc/")) or "/benchmarks/" in n for n in names)


def test_entry_point_extension_and_extras(wheel):
    names, ext, extras, entry_points = wheel
    assert ext == ["nf4q._C"]  # built by the install, left out of this test's build
    assert "nf4q = nf4q.cli:main" in entry_points.replace("nf4q=nf4q", "nf4q = nf4q")
    assert {"test", "demo", "plot"} <= set(extras)
