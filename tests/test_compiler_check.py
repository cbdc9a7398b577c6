"""setup.py's compiler check (scripts/compiler_probe.py, issue 17): a compiler that links the C++ runtime
statically into the extension is caught before the build and replaced by the system g++.

The lent GPU image's CXX was `exec g++-real -B/opt/gcc/bin/ -B/opt/gcc/lib/gcc/x86_64-linux-gnu/13/ ... "$@"`,
whose -B directory holds libstdc++.a and no libstdc++.so: nf4q._C got private copies of __cxa_throw and the
personality routine, and every TORCH_CHECK crashed the process. The wrapper here rebuilds that situation."""
import importlib.util
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("compiler_probe", os.path.join(ROOT, "scripts", "compiler_probe.py"))
probe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(probe)

CXX = shutil.which("c++") or shutil.which("g++")
pytestmark = pytest.mark.skipif(CXX is None or not os.path.isfile(
    subprocess.run([CXX or "c++", "-print-file-name=libstdc++.a"], capture_output=True, text=True).stdout.strip()),
    reason="needs a g++ with libstdc++.a")


def wrapper_like_the_gpu_image(tmp_path):
    """A compiler script whose -B directory offers libstdc++.a only."""
    lib = tmp_path / "lib"
    lib.mkdir()
    static = subprocess.run([CXX, "-print-file-name=libstdc++.a"], capture_output=True, text=True).stdout.strip()
    os.symlink(os.path.realpath(static), lib / "libstdc++.a")
    script = tmp_path / "g++"
    script.write_text(f'#!/bin/sh\nexec {CXX} -B{lib}/ "$@"\n')
    script.chmod(0o755)
    return str(script)


def test_the_system_compiler_links_the_runtime_dynamically():
    assert probe.static_cxx_runtime(CXX) == []


def test_a_wrapper_with_only_the_static_runtime_is_detected(tmp_path):
    found = probe.static_cxx_runtime(wrapper_like_the_gpu_image(tmp_path))
    assert any(f.endswith("libstdc++.a") for f in found), found


@pytest.mark.skipif(not os.path.exists("/usr/bin/g++"), reason="the fallback is /usr/bin/g++")
def test_setup_falls_back_to_the_system_compiler(tmp_path, monkeypatch, capsys):
    wrapper = wrapper_like_the_gpu_image(tmp_path)
    built = []
    monkeypatch.setattr(probe, "probe", lambda cxx, *a, **k: (built.append(cxx), ("raises", {}))[1])
    monkeypatch.setenv("CXX", wrapper)
    monkeypatch.delenv("NF4Q_SKIP_CXX_CHECK", raising=False)
    assert probe.choose_compiler(str(tmp_path / "cache")) == "/usr/bin/g++"
    assert built == ["/usr/bin/g++"]  # the wrapper was judged by its link, not by a probe build
    assert "links the C++ runtime statically" in capsys.readouterr().err
    # the verdict is cached per compiler: a second build does not link again
    monkeypatch.setattr(probe, "static_cxx_runtime", lambda *a, **k: pytest.fail("not cached"))
    assert probe.choose_compiler(str(tmp_path / "cache")) == "/usr/bin/g++"


def test_without_a_fallback_the_build_stops_with_what_to_do(tmp_path, monkeypatch):
    wrapper = wrapper_like_the_gpu_image(tmp_path)
    monkeypatch.setattr(probe, "probe", lambda cxx, *a, **k: ("crash (signal 11)", {}))
    monkeypatch.setenv("CXX", wrapper)
    monkeypatch.delenv("NF4Q_SKIP_CXX_CHECK", raising=False)
    with pytest.raises(RuntimeError, match="NF4Q_SKIP_CXX_CHECK"):
        probe.choose_compiler(str(tmp_path / "cache"))
