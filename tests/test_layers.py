"""Who may import whom (README, "How the code is laid out"): pruning imports none of the others; formats import
pruning only; runtimes import neither; benchmarks import formats and runtimes; only rose_export.py composes
the commands. Checked on the source (every import statement, lazy ones inside functions too) and at run time."""
from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from conftest import ROOT

PACKAGES = ("rose", "export", "runtime", "runtime_bench")
FORBIDDEN = {
    "rose": {"export", "runtime", "runtime_bench", "rose_export"},
    "export": {"runtime", "runtime_bench", "rose_export"},
    "runtime": {"rose", "export", "runtime_bench", "rose_export"},
    "runtime_bench": {"rose_export"},
}


def imported_packages(path) -> set[str]:
    """Top-level names of every absolute import in a file (relative imports stay inside the package)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", PACKAGES)
def test_import_layers_in_the_source(package):
    bad = {f"{f.relative_to(ROOT)} imports {', '.join(sorted(imported_packages(f) & FORBIDDEN[package]))}"
           for f in sorted((ROOT / package).rglob("*.py")) if imported_packages(f) & FORBIDDEN[package]}
    assert not bad, bad


def test_the_checker_sees_lazy_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from export.packed24 import pack24\n    import runtime_bench.cli\n")
    assert imported_packages(probe) == {"export", "runtime_bench"}


@pytest.mark.parametrize("package", ["rose", "export", "runtime"])
def test_import_layers_at_run_time(package):
    """Import every module of the package in a fresh interpreter: none of the forbidden packages gets loaded."""
    modules = sorted(f"{package}.{f.stem}" for f in (ROOT / package).glob("*.py") if f.stem != "__init__")
    code = (f"import importlib, sys\nfor m in {modules!r}:\n    importlib.import_module(m)\n"
            f"print(sorted(p for p in {sorted(FORBIDDEN[package])!r} if p in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]", run.stdout
