"""Shared fixtures: paths and a writer of family files for loader tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

# JAX (calibration tests) sees 8 CPU devices; set before anything imports jax.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

ROOT = Path(__file__).resolve().parent.parent
TOPOLOGIES = ROOT / "topologies"
SHARED = ROOT.parent / "shared"


def bundled_doc(name: str) -> dict:
    return yaml.safe_load((TOPOLOGIES / f"{name}.yaml").read_text())


@pytest.fixture
def write_family(tmp_path):
    """Write a family document (dict or raw text) to a fresh .yaml file and return its path."""
    counter = iter(range(10**6))

    def write(doc, name: str = "fam") -> Path:
        path = tmp_path / f"{name}-{next(counter)}.yaml"
        path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc, sort_keys=False))
        return path

    return write
