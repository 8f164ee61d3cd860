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
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("moeplan."):
            yield node.module.split(".")[1]
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
            assert dep in ORDER, f"{rel} imports unknown moeplan.{dep}"
            assert ORDER.index(dep) <= ORDER.index(me), f"{rel} imports moeplan.{dep}, which sits above it"


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
