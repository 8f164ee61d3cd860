"""Hardware families: strict loading of ``topologies/*.yaml`` into builders of ``Topology``.

A family file describes one chip and how chips are joined (a torus of ICI links, or switched
nodes with rail NICs), with the size left as a parameter: ``load_topology("tpu-v5p",
shape=(4, 4, 8))``, ``load_topology("dgx-h100", nodes=16)``. Every section that holds numbers
must carry a ``source``. A name is either a bundled family or a path to a ``.yaml``/``.yml``
file; it is never joined onto the bundled folder, so ``"../../etc/passwd"`` reads nothing.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

from moeplan.bounds import TOPOLOGY_DEVICES
from moeplan.hardware import ChipSpec, ComputeEfficiency, LinkSpec
from moeplan.schema import SchemaError, Section, read_yaml_mapping, resolve_bundled
from moeplan.topology import NodeSpec, ScaleOut, Topology, switched_cluster, torus

SCHEMA_VERSION = 1
_HERE = Path(__file__).resolve().parent
# An installed wheel carries the families in moeplan/_topologies; a checkout keeps them in topologies/.
BUNDLED_DIR = Path(os.environ.get("MOEPLAN_TOPOLOGIES") or next(
    (p for p in (_HERE / "_topologies", _HERE.parent / "topologies") if p.is_dir()), _HERE.parent / "topologies"))


@dataclass(frozen=True)
class TorusFamily:
    default_shape: tuple[int, ...]
    allowed_axis_sizes: tuple[int, ...]
    max_chips: int
    wraparound_multiple_of: int  # wraparound where lengths are multiples of this ...
    wraparound_scope: str  # ... per "axis" (v5e/v6e), or only when every axis is ("slice": whole OCS cubes)
    twisted: bool  # the family offers twisted slices
    link: LinkSpec
    dcn: LinkSpec | None = None  # one chip's share of its host's data-center NICs (multi-slice), one direction


@dataclass(frozen=True)
class SwitchedFamily:
    default_nodes: int
    max_nodes: int
    node: NodeSpec
    scale_out: ScaleOut | None


@dataclass(frozen=True)
class Family:
    name: str
    description: str
    chip: ChipSpec
    layout: TorusFamily | SwitchedFamily
    path: Path


def list_topologies() -> list[str]:
    """Names of the bundled families."""
    return sorted(p.stem for p in BUNDLED_DIR.glob("*.yaml"))


def resolve_family_path(name: str | os.PathLike[str]) -> Path:
    """A bundled family name, or an existing ``.yaml``/``.yml`` path; anything else is an error."""
    return resolve_bundled(name, BUNDLED_DIR, "topology")


def load_family(name: str | os.PathLike[str]) -> Family:
    path = resolve_family_path(name)
    return _load_family_cached(str(path.resolve()), path.stat().st_mtime_ns)


@lru_cache(maxsize=64)
def _load_family_cached(path: str, _mtime_ns: int) -> Family:
    top = Section(read_yaml_mapping(path, "topology"), "", path)
    version = top.integer("schema_version")
    if version != SCHEMA_VERSION:
        raise top.fail("schema_version", version, f"{SCHEMA_VERSION}")
    name = top.string("family")
    description = top.string("description")
    chip = _chip(top.section("chip"))
    if top.has("torus") == top.has("switched"):
        raise SchemaError(f"{path}: top level: expected exactly one of the keys 'torus' or 'switched'")
    layout = _torus_family(top.section("torus")) if top.has("torus") else _switched_family(top.section("switched"))
    top.section("torus", optional=True)
    top.section("switched", optional=True)
    top.finish()
    return Family(name=name, description=description, chip=chip, layout=layout, path=Path(path))


def _sourced(sec: Section) -> str:
    return sec.string("source")


def _chip(sec: Section) -> ChipSpec:
    chip = ChipSpec(
        name=sec.string("name"),
        peak_bf16_flop_per_s=sec.number("peak_bf16_flop_per_s"),
        peak_fp8_flop_per_s=sec.number("peak_fp8_flop_per_s", optional=True),
        peak_fp32_flop_per_s=sec.number("peak_fp32_flop_per_s"),
        hbm_capacity_bytes=sec.number("hbm_capacity_bytes"),
        hbm_bw_bytes_per_s=sec.number("hbm_bw_bytes_per_s"),
        cores_per_chip=sec.integer("cores_per_chip", optional=True) or 1,
        sm_count=sec.integer("sm_count", optional=True),
        source=_sourced(sec),
        efficiency=_efficiency(sec.section("efficiency")),
        host_link=_optional_link(sec.section("host_link", optional=True)),
    )
    sec.finish()
    return chip


def _efficiency(sec: Section) -> ComputeEfficiency:
    eff = ComputeEfficiency(
        matmul=sec.number("matmul"),
        attention=sec.number("attention"),
        memory=sec.number("memory"),
        matmul_tile=sec.integer("matmul_tile"),
        source=_sourced(sec),
    )
    sec.finish()
    return eff


def _link(sec: Section) -> LinkSpec:
    link = LinkSpec(
        name=sec.string("name"),
        bw_bytes_per_s=sec.number("bw_bytes_per_s"),
        latency_s=sec.number("latency_s", minimum=0.0, strict=False),
        source=_sourced(sec),
    )
    sec.finish()
    return link


def _optional_link(sec: Section | None) -> LinkSpec | None:
    return None if sec is None else _link(sec)


def _torus_family(sec: Section) -> TorusFamily:
    default_shape = sec.int_list("default_shape")
    fam = TorusFamily(
        default_shape=default_shape,
        allowed_axis_sizes=sec.int_list("allowed_axis_sizes"),
        max_chips=sec.integer("max_chips"),
        wraparound_multiple_of=sec.integer("wraparound_multiple_of"),
        wraparound_scope=sec.string("wraparound_scope", choices=("axis", "slice")),
        twisted=sec.boolean("twisted"),
        link=_link(sec.section("link")),
        dcn=_optional_link(sec.section("dcn", optional=True)),
    )
    _sourced(sec)
    sec.finish()
    try:
        check_torus_shape(fam, default_shape)
    except ValueError as exc:
        raise SchemaError(f"{sec.file}: {sec.where}.default_shape: {exc}") from None
    return fam


def _switched_family(sec: Section) -> SwitchedFamily:
    node_sec = sec.section("node")
    node = NodeSpec(
        devices_per_node=node_sec.integer("devices_per_node"),
        link=_link(node_sec.section("link")),
        in_switch_reduction=node_sec.boolean("in_switch_reduction"),
        nvls_efficiency=node_sec.number("nvls_efficiency", optional=True),
        mesh=node_sec.boolean("mesh", optional=True),
        link_efficiency=node_sec.number("link_efficiency", optional=True),
    )
    _sourced(node_sec)
    node_sec.finish()
    scale_out = None
    so_sec = sec.section("scale_out", optional=True)
    if so_sec is not None:
        scale_out = ScaleOut(
            pcie=_link(so_sec.section("pcie")),
            nic=_link(so_sec.section("nic")),
            nodes_per_leaf=so_sec.integer("nodes_per_leaf"),
            oversubscription=so_sec.number("oversubscription", minimum=1.0, strict=False),
            step_latency_s=so_sec.number("step_latency_s", optional=True),
        )
        _sourced(so_sec)
        so_sec.finish()
    fam = SwitchedFamily(
        default_nodes=sec.integer("default_nodes"),
        max_nodes=sec.integer("max_nodes"),
        node=node,
        scale_out=scale_out,
    )
    _sourced(sec)
    sec.finish()
    if fam.max_nodes * node.devices_per_node > TOPOLOGY_DEVICES[1]:
        raise SchemaError(f"{sec.file}: {sec.where}.max_nodes: {fam.max_nodes} nodes x {node.devices_per_node} "
                          f"devices; expected at most {TOPOLOGY_DEVICES[1]:,} devices in one topology")
    if fam.default_nodes > fam.max_nodes or (scale_out is None and fam.max_nodes > 1):
        raise SchemaError(
            f"{sec.file}: {sec.where}.max_nodes: got {fam.max_nodes}; expected >= default_nodes "
            f"({fam.default_nodes}) and 1 when there is no scale_out section"
        )
    return fam


def check_torus_shape(fam: TorusFamily, shape: tuple[int, ...]) -> None:
    if len(shape) != len(fam.default_shape):
        raise ValueError(f"shape {shape}: expected {len(fam.default_shape)} axes")
    bad = [s for s in shape if s not in fam.allowed_axis_sizes]
    if bad:
        raise ValueError(
            f"shape {shape}: axis length(s) {bad} not offered; expected each axis in {list(fam.allowed_axis_sizes)}"
        )
    if math.prod(shape) > fam.max_chips:
        raise ValueError(f"shape {shape}: {math.prod(shape)} chips; expected at most {fam.max_chips}")


def default_wraparound(fam: TorusFamily, shape: tuple[int, ...]) -> tuple[bool, ...]:
    """Which axes of a slice are rings: per axis, or all-or-nothing for slices of whole cubes."""
    per_axis = tuple(s > 1 and s % fam.wraparound_multiple_of == 0 for s in shape)
    if fam.wraparound_scope == "axis":
        return per_axis
    whole = all(s % fam.wraparound_multiple_of == 0 for s in shape)
    return tuple(whole and s > 1 for s in shape)


def load_topology(
    name: str | os.PathLike[str],
    *,
    shape: tuple[int, ...] | list[int] | str | None = None,
    nodes: int | None = None,
    twisted: bool = False,
    wraparound: bool | tuple[bool, ...] | None = None,
    devices_per_node: int | None = None,
    slices: int | None = None,
) -> Topology:
    """Build a topology of a bundled family (or a family file) at a size.

    Torus families take ``shape`` (tuple or ``"4x4x8"``), ``twisted``, an optional explicit
    ``wraparound`` (one flag, or one per axis) that overrides the family's rule, and ``slices``
    (multi-slice: that many slices of the shape joined over the family's DCN); switched families
    take ``nodes`` and, to use part of each node (64 of an NVL72 rack's 72 GPUs), ``devices_per_node``.
    Sizes default to the family's default.
    """
    fam = load_family(name)
    where = f"topology {fam.name!r}"
    if isinstance(fam.layout, TorusFamily):
        if devices_per_node is not None:
            raise ValueError(f"{where}: devices_per_node: a torus family takes shape=..., not devices_per_node")
        if nodes is not None:
            raise ValueError(f"{where}: nodes: got {nodes!r}; a torus family takes shape=..., not nodes")
        return _build_torus(fam, shape, twisted, wraparound, 1 if slices is None else slices)
    if shape is not None or twisted or wraparound is not None or slices is not None:
        raise ValueError(f"{where}: shape/twisted/wraparound/slices given; a switched family takes nodes=... only")
    node = fam.layout.node
    if devices_per_node is not None:
        full = node.devices_per_node
        ok = isinstance(devices_per_node, int) and not isinstance(devices_per_node, bool)
        if not ok or not 1 <= devices_per_node <= full:
            raise ValueError(f"{where}: devices_per_node: got {devices_per_node!r}; expected an integer 1..{full}")
        node = replace(node, devices_per_node=devices_per_node)
    nodes = fam.layout.default_nodes if nodes is None else nodes
    if isinstance(nodes, bool) or not isinstance(nodes, int) or not 1 <= nodes <= fam.layout.max_nodes:
        raise ValueError(f"{where}: nodes: got {nodes!r}; expected an integer from 1 to {fam.layout.max_nodes}")
    return switched_cluster(fam.name, fam.chip, nodes, node, fam.layout.scale_out)


def _build_torus(fam: Family, shape, twisted: bool, wraparound, slices: int) -> Topology:
    from moeplan.units import parse_shape

    layout = fam.layout
    if shape is None:
        shape = layout.default_shape
    elif isinstance(shape, str):
        shape = parse_shape(shape)
    shape = tuple(shape)
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in shape):
        raise ValueError(f"topology {fam.name!r}: shape: got {shape!r}; expected integers")
    try:
        check_torus_shape(layout, shape)
    except ValueError as exc:
        raise ValueError(f"topology {fam.name!r}: {exc}") from None
    if twisted and not layout.twisted:
        raise ValueError(f"topology {fam.name!r}: twisted: this family offers no twisted slices")
    if isinstance(slices, bool) or not isinstance(slices, int) or slices < 1:
        raise ValueError(f"topology {fam.name!r}: slices: got {slices!r}; expected an integer >= 1")
    if slices > 1 and layout.dcn is None:
        raise ValueError(f"topology {fam.name!r}: slices: got {slices}; this family states no DCN, expected 1")
    if slices * math.prod(shape) > TOPOLOGY_DEVICES[1]:
        raise ValueError(f"topology {fam.name!r}: slices: {slices} x {math.prod(shape)} chips; expected at most "
                         f"{TOPOLOGY_DEVICES[1]:,} devices in one topology")
    if wraparound is None:
        wraps = default_wraparound(layout, shape)
    elif isinstance(wraparound, bool):
        wraps = tuple(wraparound and s > 1 for s in shape)
    else:
        wraps = tuple(bool(w) for w in wraparound)
    return torus(fam.name, fam.chip, shape, layout.link, wraps, twisted=twisted, slices=slices, dcn=layout.dcn)
