"""Layering: nf4q's core never reaches up into peft_layers, the benchmarks or its own command line (nf4q/cli/)."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UPWARD = ("peft_layers", "benchmarks")


def core_modules():
    """Every module of the nf4q package except the application wing (nf4q/cli/ and the `python -m nf4q` stub)."""
    pkg = ROOT / "nf4q"
    return sorted(p for p in pkg.rglob("*.py")
                  if "cli" not in p.relative_to(pkg).parts[:1] and p.name != "__main__.py")


def imported_names(path):
    """The absolute module names a file imports (top level or inside functions); relative imports resolved."""
    tree = ast.parse(path.read_text(), str(path))
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
                names += [mod] + [f"{mod}.{a.name}" for a in node.names]
            else:
                names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return names


def test_core_list_is_the_library():
    names = {p.relative_to(ROOT).as_posix() for p in core_modules()}
    assert {"nf4q/__init__.py", "nf4q/linear.py", "nf4q/tensor.py", "nf4q/_ops.py"} <= names
    assert not any(n.startswith("nf4q/cli/") for n in names)


@pytest.mark.parametrize("path", core_modules(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_core_module_imports_nothing_above_it(path):
    bad = [n for n in imported_names(path)
           if n.split(".")[0] in UPWARD or n == "nf4q.cli" or n.startswith("nf4q.cli.")]
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}: the core may not depend on the layers above it"


def test_the_import_check_sees_relative_and_nested_imports(tmp_path, monkeypatch):
    """The checker itself: a function-level relative import of the CLI and an absolute peft_layers import."""
    pkg = tmp_path / "nf4q"
    pkg.mkdir()
    f = pkg / "x.py"
    f.write_text("def g():\n    from .cli import demo\n    import peft_layers.lora\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    names = imported_names(f)
    assert "nf4q.cli" in names and "peft_layers.lora" in names


def test_import_nf4q_loads_no_upper_layer():
    code = ("import sys, nf4q, nf4q.optim\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('peft_layers', 'benchmarks')\n"
            "             or m == 'nf4q.cli' or m.startswith('nf4q.cli.'))\n"
            "print(bad)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"import nf4q loaded {out.stdout.strip()}"


def test_python_m_nf4q_is_the_cli():
    out = subprocess.run([sys.executable, "-m", "nf4q", "--version"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("nf4q ")
