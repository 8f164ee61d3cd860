"""Import hygiene: the core pulls in no heavy framework, and imports flow down the house order."""

from __future__ import annotations

import ast
import subprocess
import sys

from tests.conftest import ROOT

# The house order of docs/DESIGN.md: a module may import only modules listed before it.
ORDER = [
    "units", "bounds", "arrays", "schema", "hardware", "topology", "families", "dispatch", "frameworks", "collectives",
    "linksim", "moe", "routing", "cost",
    "layout", "compute", "plan", "estimate", "grid", "quality", "search", "export", "validation", "profiles",
    "calibrate", "report", "cli", "__main__",
]


def test_import_moeplan_loads_no_jax_streamlit_or_plotly():
    code = (
        "import sys, moeplan; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'streamlit', 'plotly')); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def _moeplan_imports(path):
    """The moeplan modules a file imports: ``from moeplan.x import y``, ``from moeplan import x`` (x a module;
    a name the package re-exports counts as the package itself), ``import moeplan.x``; relative imports too."""
    tree = ast.parse(path.read_text())
    package = path.relative_to(ROOT / "moeplan").parts[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: resolve against the file's package
                base = ["moeplan", *package][: len(package) + 2 - node.level]
                module = ".".join(base + ([module] if module else []))
            if module == "moeplan":
                for alias in node.names:
                    yield alias.name if (ROOT / "moeplan" / f"{alias.name}.py").exists() or \
                        (ROOT / "moeplan" / alias.name).is_dir() else "__init__"
            elif module.startswith("moeplan."):
                yield module.split(".")[1]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("moeplan."):
                    yield alias.name.split(".")[1]


def test_imports_flow_down_the_house_order():
    package = ROOT / "moeplan"
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package)
        if rel.name == "__init__.py" and len(rel.parts) == 1:
            continue
        me = rel.parts[0].removesuffix(".py")
        assert me in ORDER, f"{rel}: module not placed in the house order list"
        for dep in _moeplan_imports(path):
            assert dep != "__init__", f"{rel} imports a name from the package root; import it from its module"
            assert dep in ORDER, f"{rel} imports unknown moeplan.{dep}"
            assert ORDER.index(dep) <= ORDER.index(me), f"{rel} imports moeplan.{dep}, which sits above it"


def test_the_import_walk_sees_every_form(tmp_path, monkeypatch):
    """``from moeplan import x`` and relative imports count like ``from moeplan.x import y``."""
    fake = ROOT / "moeplan" / "units.py"
    monkeypatch.setattr(fake.__class__, "read_text", lambda self, *a, **k: (
        "from moeplan import estimate, moe as M\nfrom moeplan.plan import Plan\nimport moeplan.search\n"
        "from . import grid\nfrom .layout import Layout\nfrom moeplan import Estimate\n"))
    assert list(_moeplan_imports(fake)) == ["estimate", "moe", "plan", "search", "grid", "layout", "__init__"]


def test_heavy_frameworks_only_in_their_places():
    allowed = {"jax": ("calibrate",), "jaxlib": ("calibrate",), "plotly": ("report",), "streamlit": ()}
    for path in sorted((ROOT / "moeplan").rglob("*.py")):
        top = path.relative_to(ROOT / "moeplan").parts[0].removesuffix(".py")
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                root = name.split(".")[0]
                if root in allowed:
                    assert top in allowed[root], f"{path} imports {root}"
