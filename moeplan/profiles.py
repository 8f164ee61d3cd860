"""Result and profile files: written atomically (temporary file in the same folder, then rename),
so an interrupted run never leaves half a file. The calibration profile format lives here too."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import stat
import tempfile
from pathlib import Path


def write_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and a rename. An existing file keeps its mode; a new
    one gets the usual permissions (0666 less the umask). A symbolic link is refused, never written through."""
    path = Path(path)
    if path.is_symlink():
        raise ValueError(f"{path}: is a symbolic link; refusing to write through it")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = stat.S_IMODE(os.lstat(path).st_mode)
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)  # mkstemp makes 0600
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
        ops = _comm_ops(k)
        k.finish()
        self.part_scales = _part_scales(fitted)
        fitted.finish()
        self.comm = CommParams(nccl_base_latency_s=latency, node_step_latency_s=latency, ops=ops).with_efficiency(
            node=link, nvls=link)
        self.errors = top.section("errors").data
        self.measurements = top.data.get("measurements") or []
        if not isinstance(self.measurements, list) or not all(isinstance(m, dict) for m in self.measurements):
            raise top.fail("measurements", self.measurements, "a list of mappings")
        top._seen.add("measurements")
        top.finish()
        self.data = data
        self.path = path

    def bundled_topology_name(self) -> str:
        """The bundled family that ``topology`` names (the part before ':', as in ``cpu-host:1x8``).

        A profile is data from elsewhere: a path or any other name is a ValueError, so loading a profile never
        makes this process read a file the profile names."""
        from moeplan.families import list_topologies
        from moeplan.schema import short_repr

        name, bundled = self.topology.split(":")[0], list_topologies()
        if name not in bundled:
            raise ValueError(f"{self.path}: topology: got {short_repr(self.topology)}; "
                             f"expected a bundled family, one of {bundled}")
        return name


def _optional_mapping(sec, key: str, names, expected_name: str, expected: str) -> dict:
    """``sec[key]``: absent -> {}; else a mapping whose keys are among ``names`` (errors name the key)."""
    raw = sec.data.get(key)
    sec._seen.add(key)
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise sec.fail(key, raw, expected)
    for name in raw:
        if name not in names:
            raise sec.fail(key, name, expected_name)
    return raw


def _number_in(sec, where: str, value, low: float, high: float, expected: str = "") -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise sec.fail(where, value, expected or f"a number in [{low}, {high}]")
    return float(value)


def _comm_ops(comm) -> dict[str, tuple[float, float]]:
    """``fitted.comm.ops``: per collective op, its own latency_s and efficiency (collectives.CommParams.ops)."""
    from moeplan.collectives import OPS

    raw = _optional_mapping(comm, "ops", OPS, f"an op of {list(OPS)} mapped to latency_s and efficiency",
                            "a mapping of collective op to {latency_s, efficiency}")
    out = {}
    for op, pair in raw.items():
        if not isinstance(pair, dict) or set(pair) != {"latency_s", "efficiency"}:
            raise comm.fail("ops", op, f"an op of {list(OPS)} mapped to latency_s and efficiency")
        out[op] = (_number_in(comm, f"ops.{op}.latency_s", pair["latency_s"], 0.0, 1.0),
                   _number_in(comm, f"ops.{op}.efficiency", pair["efficiency"], 0.01, 100.0))
    return out


def _part_scales(fitted) -> dict[str, float]:
    """``fitted.parts``: per-part time scales (measured / predicted), each a part of ``estimate.MEASURED_PARTS``."""
    from moeplan.estimate import MEASURED_PARTS

    raw = _optional_mapping(fitted, "parts", MEASURED_PARTS, f"a part among {list(MEASURED_PARTS)}",
                            "a mapping of part name to time scale")
    return {name: _number_in(fitted, f"parts.{name}", value, 1e-3, 1e3, "a time scale in [0.001, 1000]")
            for name, value in raw.items()}


def load_profile(path: str | os.PathLike[str]) -> Profile:
    """Read and validate a profile file (``profiles/<device-kind>.yaml``)."""
    from moeplan.schema import SchemaError, read_yaml_mapping

    if Path(path).suffix not in (".yaml", ".yml"):
        raise SchemaError(f"profile: {path}: expected a .yaml file")
    return Profile(read_yaml_mapping(path, "profile"), str(path))


def profile_from_upload(name: str, data: bytes) -> Profile:
    """A profile from uploaded bytes: the bounded YAML reader that files go through, and a bundled topology."""
    from moeplan.schema import parse_yaml_mapping

    source = f"upload {name[:100]!r}"
    profile = Profile(parse_yaml_mapping(data, source, "profile"), source)
    profile.bundled_topology_name()
    return profile


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


def read_jsonl(path: str | os.PathLike[str], bad: list[int] | None = None) -> list[dict]:
    """The records (JSON objects) of a measurement log, one a line.

    A line that is not UTF-8, not a JSON object, or has a ``time_s`` (or an entry of ``times_s``, a non-empty
    list) that is not a number from 0 to MAX_MEASURED_S is skipped; a torn last line, left by a run that died
    mid-write, is one such. The skipped lines' 1-based numbers are appended to ``bad`` when a list is given.
    Blank lines are skipped silently."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        record = _jsonl_record(line)
        if record is not None:
            records.append(record)
        elif bad is not None:
            bad.append(number)
    return records


def _jsonl_record(line: bytes) -> dict | None:
    """One log line as a record, or None if it is not UTF-8 JSON with valid times."""
    try:
        record = json.loads(line.decode("utf-8"))
    except (ValueError, RecursionError):  # not UTF-8, not JSON, an integer too long, nesting too deep
        return None
    if not isinstance(record, dict):
        return None
    times = [record["time_s"]] if "time_s" in record else []
    if "times_s" in record:
        if not isinstance(record["times_s"], list) or not record["times_s"]:
            return None
        times += record["times_s"]
    return record if all(_valid_time(t) for t in times) else None


MAX_MEASURED_S = 3600.0  # one timed call longer than an hour is a corrupted record, not a measurement


def _valid_time(t) -> bool:
    return isinstance(t, int | float) and not isinstance(t, bool) and math.isfinite(t) and 0 <= t <= MAX_MEASURED_S
