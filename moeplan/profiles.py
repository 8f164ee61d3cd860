"""Result and profile files: written atomically (temporary file in the same folder, then rename),
so an interrupted run never leaves half a file. The calibration profile format lives here too."""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path


def write_atomic(path: str | os.PathLike[str], text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_json(path: str | os.PathLike[str], data) -> Path:
    return write_atomic(path, json.dumps(data, indent=2, default=_jsonable) + "\n")


def write_csv(path: str | os.PathLike[str], rows: list[dict]) -> Path:
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return write_atomic(path, buf.getvalue())


def _jsonable(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


# ------------------------------------------------------------------ calibration profiles
PROFILE_SCHEMA_VERSION = 1


class Profile:
    """A calibration profile: where it was measured, what, the fitted parameters and the errors.

    ``compute`` (hardware.ComputeEfficiency) and ``comm`` (collectives.CommParams) are what
    ``estimate(..., profile=...)`` uses in place of the family's defaults."""

    def __init__(self, data: dict, path: str = "<profile>") -> None:
        from moeplan.collectives import CommParams, Efficiency
        from moeplan.hardware import ComputeEfficiency
        from moeplan.schema import Section

        top = Section(data, "", path)
        version = top.integer("schema_version")
        if version != PROFILE_SCHEMA_VERSION:
            raise top.fail("schema_version", version, str(PROFILE_SCHEMA_VERSION))
        self.device_kind = top.string("device_kind")
        self.device_count = top.integer("device_count")
        self.topology = top.string("topology")
        self.created = top.string("created")
        self.versions = top.section("versions").data
        fitted = top.section("fitted")
        c = fitted.section("compute")
        self.compute = ComputeEfficiency(
            matmul=c.number("matmul"), attention=c.number("attention"), memory=c.number("memory"),
            matmul_tile=c.integer("matmul_tile"), kernel_overhead_s=c.number("kernel_overhead_s", minimum=0.0,
                                                                                  strict=False),
            source=f"calibration profile {path}")
        c.finish()
        k = fitted.section("comm")
        latency = k.number("step_latency_s", minimum=0.0, strict=False)
        link = Efficiency(k.number("link_efficiency"), 0.0, 0.5, f"calibration profile {path}")
        k.finish()
        fitted.finish()
        self.comm = CommParams(nccl_base_latency_s=latency, node_step_latency_s=latency).with_efficiency(
            node=link, nvls=link)
        self.errors = top.section("errors").data
        self.measurements = top.data.get("measurements") or []
        top._seen.add("measurements")
        top.finish()
        self.data = data
        self.path = path


def load_profile(path: str | os.PathLike[str]) -> Profile:
    """Read and validate a profile file (``profiles/<device-kind>.yaml``)."""
    from moeplan.schema import SchemaError, read_yaml_mapping

    if Path(path).suffix not in (".yaml", ".yml"):
        raise SchemaError(f"profile: {path}: expected a .yaml file")
    return Profile(read_yaml_mapping(path, "profile"), str(path))


def write_yaml(path: str | os.PathLike[str], data: dict) -> Path:
    import yaml

    return write_atomic(path, yaml.safe_dump(data, sort_keys=False, width=110))


def append_jsonl(path: str | os.PathLike[str], record: dict) -> None:
    """Append one measurement as a line and flush it to disk: an interrupted run keeps it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torn = False  # a run that died mid-write left a last line without its newline: start a fresh line
    if path.exists() and path.stat().st_size:
        with open(path, "rb") as fh:
            fh.seek(-1, os.SEEK_END)
            torn = fh.read(1) != b"\n"
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(("\n" if torn else "") + json.dumps(record, default=_jsonable) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_jsonl(path: str | os.PathLike[str]) -> list[dict]:
    """Records of a measurement log; a torn last line (the run died mid-write) is ignored."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
