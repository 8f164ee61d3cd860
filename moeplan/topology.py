"""Topology: a networkx graph of devices and switches, plus what the cost model reads off it.

Vertices: devices are the integers ``0 .. num_devices-1``; switches and NICs are strings
(``"n0/nvswitch"``, ``"n3/nic5"``, ``"rail5/leaf0"``, ``"spine"``). Every edge carries
``bw_bytes_per_s`` (one direction; links are full duplex, so the same figure holds each way),
``latency_s`` and ``tier`` (``"ici0"``.. per torus axis, ``"dcn"``, ``"nvlink"``, ``"mesh"``, ``"pcie"``,
``"nic"``, ``"fabric"``).

Two families of builders:

* ``torus(shape, link, wraparound, twisted, slices, dcn)``: TPU slices. Device id = row-major index of
  its coordinate (last axis fastest), so contiguous ids run along the last axis. Several slices
  (multi-slice) are copies of the slice, slice s holding ids ``s * chips .. (s + 1) * chips - 1``
  with the same coordinates, every chip joined to the data-center network (one ``"dcn"`` switch
  vertex, non-blocking) by its share of its host's NICs.
* ``switched_cluster(...)``: GPU nodes (NVSwitch, NVL72 rack, a CPU host) of ``devices_per_node``
  devices around one switch vertex (or, ``mesh``, joined pairwise: AMD Infinity Fabric), and
  optionally one NIC per device on rail-optimised leaves of a fat-tree (rail r joins NIC r of every
  node; a spine joins the leaves when a rail needs more than one leaf). Device id = node *
  devices_per_node + local index.

Derived figures (bisection by minimum cut, injection bandwidth, diameter) come from the graph;
their closed forms live beside them so tests can hold one against the other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import product

import networkx as nx
import numpy as np

from moeplan.hardware import ChipSpec, LinkSpec

TORUS = "torus"
SWITCHED = "switched"


@dataclass(frozen=True)
class TorusAxis:
    """One physical axis of a torus slice."""

    size: int
    wraparound: bool
    link: LinkSpec


@dataclass(frozen=True)
class ScaleOut:
    """One NIC per device on rail-optimised leaves of a fat-tree."""

    pcie: LinkSpec  # device <-> NIC
    nic: LinkSpec  # NIC <-> leaf switch (the NIC's line rate)
    nodes_per_leaf: int  # downlinks of one leaf (one rail)
    oversubscription: float  # leaf downlink capacity / uplink capacity (1.0 = non-blocking)
    # What the collective library pays per network step on this fabric (NCCL's NET hwLat plus the net plugin's
    # own latency: EFA, TCPXO). None = the library's InfiniBand figures (collectives.CommParams).
    step_latency_s: float | None = None

    def __post_init__(self) -> None:
        if self.nodes_per_leaf < 1:
            raise ValueError(f"scale_out.nodes_per_leaf: expected an integer >= 1, got {self.nodes_per_leaf!r}")
        if not self.oversubscription >= 1.0:
            raise ValueError(f"scale_out.oversubscription: expected a number >= 1, got {self.oversubscription!r}")


@dataclass(frozen=True)
class NodeSpec:
    """Devices of one node around one (aggregated) switch: NVSwitch, an NVL72 spine, host memory."""

    devices_per_node: int
    link: LinkSpec  # device <-> node switch, one direction (e.g. 450 GB/s NVLink4 per H100)
    in_switch_reduction: bool  # NVLS / SHARP-style reduction inside the switch
    # NCCL's NVLS efficiency for the switch generation (src/graph/tuning.cc nvlsEfficiency: Hopper 0.85,
    # Blackwell 0.74); None = Hopper's, on which the library's NVLS curve was measured.
    nvls_efficiency: float | None = None
    # A full mesh (AMD Infinity Fabric): every pair of devices joined by its own ``link``, no switch.
    mesh: bool = False
    # Achieved / peak of the node's links where a measurement states it (MI300X xGMI: TransferBench); None =
    # NVLink's, which the library's "node" curve carries.
    link_efficiency: float | None = None


class Topology:
    """A device graph with the derived figures the cost model needs. Build it with a builder."""

    def __init__(
        self,
        family: str,
        chip: ChipSpec,
        graph: nx.Graph,
        coordinates: np.ndarray,
        kind: str,
        axes: tuple[TorusAxis, ...] = (),
        twisted: bool = False,
        node: NodeSpec | None = None,
        scale_out: ScaleOut | None = None,
        slices: int = 1,
        dcn: LinkSpec | None = None,
    ) -> None:
        self.family = family
        self.chip = chip
        self.graph = graph
        self.coordinates = coordinates
        self.kind = kind
        self.axes = axes
        self.twisted = twisted
        self.node = node
        self.scale_out = scale_out
        self.slices = slices  # torus: slices joined over the data-center network (multi-slice)
        self.dcn = dcn  # one chip's share of its host's DCN NICs, one direction

    @property
    def host_link(self) -> LinkSpec | None:
        """One device's link to host memory (activation offload), one direction: the chip's own (a TPU's PCIe),
        else a switched cluster's device <-> NIC PCIe link; None where the family states neither."""
        if self.chip.host_link is not None:
            return self.chip.host_link
        return self.scale_out.pcie if self.scale_out is not None else None

    # ----------------------------------------------------------------- shape
    @property
    def num_devices(self) -> int:
        return int(self.coordinates.shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        """Torus shape, or (nodes, devices_per_node) for a switched cluster."""
        if self.kind == TORUS:
            return tuple(a.size for a in self.axes)
        return (self.num_nodes, self.node.devices_per_node)

    @property
    def devices_per_slice(self) -> int:
        return self.num_devices // self.slices

    def slice_of(self, devices: np.ndarray) -> np.ndarray:
        """Torus: the slice of each device (0 on a single slice)."""
        return np.asarray(devices) // self.devices_per_slice

    @property
    def num_nodes(self) -> int:
        return 1 if self.kind == TORUS else self.num_devices // self.node.devices_per_node

    @property
    def name(self) -> str:
        if self.kind == TORUS:
            shape = f"{'x'.join(map(str, self.shape))}{'-twisted' if self.twisted else ''}"
            return f"{self.family}:{self.slices}x[{shape}]" if self.slices > 1 else f"{self.family}:{shape}"
        return f"{self.family}:{self.num_nodes}x{self.node.devices_per_node}"

    def __repr__(self) -> str:
        return f"Topology({self.name}, {self.num_devices} x {self.chip.name})"

    def device_ids(self, devices: int | list[int] | np.ndarray) -> np.ndarray:
        """A device group as an int array: a count means the first N devices in topology order."""
        if isinstance(devices, int | np.integer) and not isinstance(devices, bool):
            if not 1 <= devices <= self.num_devices:
                raise ValueError(f"devices: got {devices}; expected a count from 1 to {self.num_devices}")
            return np.arange(int(devices))
        ids = np.asarray(devices)
        if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"devices: got {devices!r}; expected a count or a non-empty list of device ids")
        if ids.min() < 0 or ids.max() >= self.num_devices or np.unique(ids).size != ids.size:
            raise ValueError(f"devices: got {ids.tolist()}; expected distinct ids in [0, {self.num_devices})")
        return ids

    # ------------------------------------------------------- derived figures
    def tier_bandwidths(self) -> dict[str, float]:
        """One-way bandwidth of one link of each tier, bytes/s."""
        out: dict[str, float] = {}
        for _, _, data in self.graph.edges(data=True):
            out.setdefault(data["tier"], data["bw_bytes_per_s"])
        return out

    def injection_bw_bytes_per_s(self) -> float:
        """Largest one-way rate one device can push to all the others at once, from the graph.

        Torus: the sum of a best-connected device's links. Switched: max flow from device 0 to the
        other devices, so a NIC behind a slower PCIe link counts at the PCIe rate.
        """
        if self.kind == TORUS:
            return max(
                (sum(d["bw_bytes_per_s"] for _, _, d in self.graph.edges(dev, data=True))
                 for dev in range(self.num_devices)),
                default=0.0,
            )
        if self.num_devices == 1:
            return 0.0
        flow = self._flow_graph()
        for dev in range(1, self.num_devices):
            flow.add_edge(dev, "__sink__")
        value, _ = nx.maximum_flow(flow, 0, "__sink__")
        return float(value)

    def _flow_graph(self) -> nx.DiGraph:
        """The graph as a directed flow network: each full-duplex link is two arcs of its bandwidth."""
        flow = nx.DiGraph()
        for u, v, d in self.graph.edges(data=True):
            flow.add_edge(u, v, capacity=d["bw_bytes_per_s"])
            flow.add_edge(v, u, capacity=d["bw_bytes_per_s"])
        return flow

    def bisection_partitions(self) -> list[np.ndarray]:
        """Candidate halves (as a boolean mask over devices) for the bisection cut.

        Torus: the half-split along each axis of length >= 2 (for tori the minimum balanced cut is
        one of these). Switched: the first half of the nodes, and, for one node, the first half of
        its devices.
        """
        coords = self.coordinates
        masks = []
        if self.slices > 1:  # the slices are joined by the DCN only: half the slices against the rest
            return [self.slice_of(np.arange(self.num_devices)) < self.slices // 2]
        if self.kind == TORUS:
            for axis, ax in enumerate(self.axes):
                if ax.size >= 2:
                    masks.append(coords[:, axis] < ax.size // 2)
        elif self.num_nodes >= 2:
            masks.append(coords[:, 0] < self.num_nodes // 2)
        elif self.node.devices_per_node >= 2:
            masks.append(coords[:, 1] < self.node.devices_per_node // 2)
        return masks

    def cut_bw_bytes_per_s(self, mask: np.ndarray) -> float:
        """Minimum cut (max flow, one direction) between devices in ``mask`` and the rest.

        Switch and NIC vertices may fall on either side; devices are pinned to theirs.
        """
        side_a = set(np.flatnonzero(mask).tolist())
        if self.graph.number_of_nodes() == self.num_devices:  # no switches: the cut is the crossing edges
            return float(sum(
                d["bw_bytes_per_s"] for u, v, d in self.graph.edges(data=True) if (u in side_a) != (v in side_a)
            ))
        flow = self._flow_graph()
        for dev in range(self.num_devices):
            if dev in side_a:
                flow.add_edge("__source__", dev)  # no capacity attribute = infinite
            else:
                flow.add_edge(dev, "__sink__")
        value, _ = nx.minimum_cut(flow, "__source__", "__sink__")
        return float(value)

    def bisection_bw_bytes_per_s(self) -> float:
        """One-way bandwidth across the narrowest balanced cut, from the graph."""
        masks = self.bisection_partitions()
        return min((self.cut_bw_bytes_per_s(m) for m in masks), default=0.0)

    def bisection_bw_closed_form_bytes_per_s(self) -> float:
        """Closed form of the bisection (tests hold it against the graph's minimum cut).

        Torus, untwisted: cutting axis a crosses 2 links per ring with wraparound, 1 without, and there
        are N / n_a rings: ``min_a (wrap ? 2 : 1) * N / n_a * bw``. A twisted n x n x 2n torus also cuts
        the twisted wraparounds of the short axes when split along the long axis (Camara et al. 2010).
        Switched: one node, half its devices' switch links; several, the flow over each rail's
        two-level tree (``_rail_cut_bytes_per_s``) times the rails.
        """
        n = self.num_devices
        if self.slices > 1:  # every chip of the smaller half sends through its own DCN share
            return self.slices // 2 * self.devices_per_slice * self.dcn.bw_bytes_per_s
        if self.kind == TORUS:
            cuts = []
            for ax in self.axes:
                if ax.size < 2:
                    continue
                crossing = 2 if ax.wraparound and ax.size > 2 else 1
                if ax.wraparound and ax.size == 2:
                    crossing = 2  # the two links of a 2-ring both cross
                cut = crossing * (n // ax.size) * ax.link.bw_bytes_per_s
                if self.twisted and ax.size == max(a.size for a in self.axes):
                    shorts = [a for a in self.axes if a.size < ax.size]
                    cut += sum(n // a.size * a.link.bw_bytes_per_s for a in shorts)
                cuts.append(cut)
            return min(cuts, default=0.0)
        g = self.node.devices_per_node
        if self.num_nodes == 1:  # half the devices' switch links, or on a mesh every link across the halves
            pairs = (g // 2) * (g - g // 2) if self.node.mesh else g // 2
            return pairs * self.node.link.bw_bytes_per_s
        return g * self._rail_cut_bytes_per_s(self.num_nodes // 2)

    def _rail_cut_bytes_per_s(self, nodes_in_a: int) -> float:
        """Max flow across one rail (a two-level tree) from the first ``nodes_in_a`` nodes to the rest.

        On leaf j with a_j nodes of A and b_j of B, min(a_j, b_j) pairs meet at the leaf; the excess
        crosses the spine, limited by the leaf's uplink u_j = n_j * nic / oversubscription.
        """
        so = self.scale_out
        nic = so.nic.bw_bytes_per_s
        per_node = min(so.pcie.bw_bytes_per_s, nic)
        local = up = down = 0.0
        for first in range(0, self.num_nodes, so.nodes_per_leaf):
            n_j = min(so.nodes_per_leaf, self.num_nodes - first)
            a_j = max(0, min(nodes_in_a - first, n_j))
            b_j = n_j - a_j
            uplink = n_j * nic / so.oversubscription
            local += min(a_j, b_j) * per_node
            up += min(max(a_j - b_j, 0) * per_node, uplink)
            down += min(max(b_j - a_j, 0) * per_node, uplink)
        return local + min(up, down)

    def diameter_hops(self) -> int:
        """Largest shortest-path hop count between two devices, from the graph.

        Uses the eccentricity of device 0: every builder here makes device 0 a vertex of largest
        eccentricity (tori and twisted tori are vertex-transitive; a torus without wraparound has
        device 0 at a corner; cluster nodes are all alike).
        """
        lengths = nx.single_source_shortest_path_length(self.graph, 0)
        return max(lengths[d] for d in range(self.num_devices))

    def diameter_closed_form_hops(self) -> int:
        if self.kind == TORUS:
            if self.twisted:
                raise ValueError("diameter_closed_form_hops: no closed form implemented for twisted tori")
            if self.slices > 1:
                return 2  # chip - dcn - chip reaches every chip; no in-slice route is shorter than 1
            return sum(a.size // 2 if a.wraparound else a.size - 1 for a in self.axes)
        g, mesh = self.node.devices_per_node, self.node.mesh
        if self.num_nodes == 1:
            return (1 if mesh else 2) if g > 1 else 0
        if self._num_leaves_per_rail() > 1:
            return 6  # NIC, leaf, spine, leaf, NIC
        return (5 if mesh else 6) if g > 1 else 4  # the hop to the rail's GPU: direct on a mesh

    def _num_leaves_per_rail(self) -> int:
        return math.ceil(self.num_nodes / self.scale_out.nodes_per_leaf) if self.scale_out else 0

    # ----------------------------------------------------------- groups
    def nodes_spanned(self, devices: np.ndarray) -> int:
        """Switched clusters: how many nodes a device group touches."""
        return int(np.unique(self.coordinates[devices, 0]).size) if self.kind == SWITCHED else 1

    def group_tier(self, devices: int | list[int] | np.ndarray) -> str:
        """The slowest tier a group's traffic needs: "node" or "scale_out"; "ici" or "dcn" on a torus."""
        ids = self.device_ids(devices)
        if self.kind == TORUS:
            return "dcn" if np.unique(self.slice_of(ids)).size > 1 else "ici"
        return "node" if self.nodes_spanned(ids) == 1 else "scale_out"

    def place_mesh(self, axes: dict[str, int], devices: np.ndarray | list | None = None) -> DeviceMesh:
        """Map a logical mesh (``{"data": 8, "expert": 16}``, outermost axis first) onto devices.

        Default placement: devices in topology order reshaped to the mesh, so the innermost
        (last) axis varies fastest and lands on the fastest links: inside a node on a GPU cluster,
        along the last physical axis of a torus. ``devices`` overrides it with an explicit array of
        device ids of the mesh's shape (or a flat list, reshaped).
        """
        names = tuple(axes)
        shape = tuple(axes.values())
        for name, size in axes.items():
            if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 1:
                raise ValueError(f"mesh axis {name!r}: got {size!r}; expected an integer >= 1")
        total = math.prod(shape)
        if devices is None:
            if total != self.num_devices:
                raise ValueError(
                    f"mesh {dict(axes)}: {total} devices; expected the product of the axes to equal "
                    f"the {self.num_devices} devices of {self.name}"
                )
            return DeviceMesh(names, np.arange(total).reshape(shape))
        ids = np.asarray(devices)
        if ids.size != total:
            raise ValueError(f"devices: got {ids.size} ids; expected {total} for mesh {dict(axes)}")
        self.device_ids(ids.reshape(-1))
        return DeviceMesh(names, ids.reshape(shape))


@dataclass(frozen=True, eq=False)
class DeviceMesh:
    """A logical mesh: axis names (outermost first) and the device id at every mesh position."""

    axis_names: tuple[str, ...]
    devices: np.ndarray

    @property
    def shape(self) -> dict[str, int]:
        return dict(zip(self.axis_names, self.devices.shape, strict=True))

    def groups(self, axis: str) -> np.ndarray:
        """Device groups along ``axis``: an int array [num_groups, axis_size], one row per group."""
        if axis not in self.axis_names:
            raise ValueError(f"axis: got {axis!r}; expected one of {list(self.axis_names)}")
        k = self.axis_names.index(axis)
        return np.moveaxis(self.devices, k, -1).reshape(-1, self.devices.shape[k])


# --------------------------------------------------------------------- builders
def torus(
    family: str,
    chip: ChipSpec,
    shape: tuple[int, ...],
    link: LinkSpec,
    wraparound: tuple[bool, ...],
    twisted: bool = False,
    slices: int = 1,
    dcn: LinkSpec | None = None,
) -> Topology:
    """A 1D/2D/3D torus; ``wraparound[a]`` closes axis a into a ring; ``slices`` copies of it joined
    by ``dcn`` (each chip's link to the data-center network) for multi-slice.

    ``twisted`` (an n x .. x 2n shape with wraparound everywhere): the wraparound link of every
    short axis (length n) lands n positions further along each long axis (length 2n), the
    prismatic twisted torus of Camara et al. (IEEE TPDS 2010) that TPU v4 offers as "twisted"
    slices. It adds the twisted links to the long-axis cut.
    """
    if len(wraparound) != len(shape):
        raise ValueError(f"wraparound: got {wraparound}; expected one flag per axis of shape {shape}")
    if twisted:
        _check_twistable(shape, wraparound)
    axes = tuple(TorusAxis(size=s, wraparound=w, link=link) for s, w in zip(shape, wraparound, strict=True))
    coords = np.array(list(product(*(range(s) for s in shape))), dtype=np.int64).reshape(-1, len(shape))
    graph = nx.Graph()
    for dev in range(coords.shape[0]):
        graph.add_node(dev, kind="device")
    long_size = max(shape)
    for dev, coord in enumerate(coords):
        for axis, ax in enumerate(axes):
            if ax.size == 1 or (coord[axis] == ax.size - 1 and not ax.wraparound):
                continue
            nxt = coord.copy()
            nxt[axis] = (coord[axis] + 1) % ax.size
            if twisted and coord[axis] == ax.size - 1 and ax.size < long_size:
                for other, oax in enumerate(axes):
                    if oax.size == long_size:
                        nxt[other] = (coord[other] + ax.size) % oax.size
            other_dev = int(np.ravel_multi_index(tuple(nxt), shape))
            _add_link(graph, dev, other_dev, link, f"ici{axis}")
    if slices > 1:
        graph, coords = _join_slices(graph, coords, slices, dcn)
    return Topology(family, chip, graph, coords, TORUS, axes=axes, twisted=twisted, slices=slices, dcn=dcn)


def _join_slices(graph: nx.Graph, coords: np.ndarray, slices: int, dcn: LinkSpec | None):
    """``slices`` copies of a slice's graph (ids offset by the chip count), every chip linked to "dcn"."""
    if dcn is None:
        raise ValueError(f"slices: got {slices}; this family states no data-center network, expected slices = 1")
    chips = coords.shape[0]
    joined = nx.Graph()
    for s in range(slices):
        joined.update(nx.relabel_nodes(graph, {d: d + s * chips for d in range(chips)}))
    joined.add_node("dcn", kind="switch")
    for dev in range(slices * chips):
        _add_link(joined, dev, "dcn", dcn, "dcn")
    return joined, np.tile(coords, (slices, 1))


def _check_twistable(shape: tuple[int, ...], wraparound: tuple[bool, ...]) -> None:
    short = min(shape)
    ok = (
        len(shape) >= 2
        and all(wraparound)
        and set(shape) == {short, 2 * short}
        and short >= 2
    )
    if not ok:
        raise ValueError(
            f"twisted: shape {'x'.join(map(str, shape))} cannot be twisted; expected axes of two lengths n and 2n "
            "(e.g. 4x4x8 or 4x8x8) with wraparound on every axis"
        )


def _add_link(graph: nx.Graph, u: object, v: object, link: LinkSpec, tier: str) -> None:
    """Add a full-duplex link; a second link between the same pair (a 2-ring) adds bandwidth."""
    if graph.has_edge(u, v):
        graph[u][v]["bw_bytes_per_s"] += link.bw_bytes_per_s
        graph[u][v]["links"] += 1
        return
    graph.add_edge(u, v, bw_bytes_per_s=link.bw_bytes_per_s, latency_s=link.latency_s, tier=tier, links=1)


def switched_cluster(
    family: str,
    chip: ChipSpec,
    nodes: int,
    node: NodeSpec,
    scale_out: ScaleOut | None,
) -> Topology:
    """``nodes`` nodes of ``node.devices_per_node`` devices around one switch each; with
    ``scale_out``, one NIC per device, NIC r of every node on rail r's leaves, a spine when a rail
    needs more than one leaf (leaf uplinks = downlink capacity / oversubscription)."""
    if nodes < 1:
        raise ValueError(f"nodes: got {nodes!r}; expected an integer >= 1")
    if nodes > 1 and scale_out is None:
        raise ValueError(f"nodes: got {nodes}; this family has no scale-out network, expected nodes = 1")
    g = node.devices_per_node
    coords = np.array([(n, i) for n in range(nodes) for i in range(g)], dtype=np.int64)
    graph = nx.Graph()
    for dev in range(nodes * g):
        graph.add_node(dev, kind="device")
    for n in range(nodes):
        if node.mesh:
            for i in range(g):
                for j in range(i + 1, g):
                    _add_link(graph, n * g + i, n * g + j, node.link, "mesh")
            continue
        switch = f"n{n}/switch"
        graph.add_node(switch, kind="switch")
        for i in range(g):
            _add_link(graph, n * g + i, switch, node.link, "nvlink")
    if scale_out is not None:
        _add_rails(graph, nodes, g, scale_out)
    return Topology(family, chip, graph, coords, SWITCHED, node=node, scale_out=scale_out)


def _add_rails(graph: nx.Graph, nodes: int, g: int, so: ScaleOut) -> None:
    leaves_per_rail = math.ceil(nodes / so.nodes_per_leaf)
    for n in range(nodes):
        for r in range(g):
            nic = f"n{n}/nic{r}"
            graph.add_node(nic, kind="nic")
            _add_link(graph, n * g + r, nic, so.pcie, "pcie")
            leaf = f"rail{r}/leaf{n // so.nodes_per_leaf}"
            graph.add_node(leaf, kind="switch")
            _add_link(graph, nic, leaf, so.nic, "nic")
    if leaves_per_rail > 1:
        graph.add_node("spine", kind="switch")
        for r in range(g):
            for j in range(leaves_per_rail):
                down = min(so.nodes_per_leaf, nodes - j * so.nodes_per_leaf)
                uplink = LinkSpec("fabric", down * so.nic.bw_bytes_per_s / so.oversubscription, so.nic.latency_s)
                _add_link(graph, f"rail{r}/leaf{j}", "spine", uplink, "fabric")
