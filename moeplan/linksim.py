"""Brute-force twin of ``collectives``: route every flow over the graph and count bytes per link.

Slow and literal on purpose. A collective is a list of sequential phases; each phase is a set of
flows (a chain of devices that forwards a block, or a point-to-point transfer). Every hop of every
flow is routed over the topology graph and its bytes are added to each directed link it crosses.
A phase takes ``max over links of load / (bandwidth * efficiency)`` plus its latency; the
collective is the sum of its phases. Tests hold the closed forms of ``collectives`` against it.

Routing: on a torus, dimension-order (axis 0 first), the short way round a ring, a tie split half
each way; between TPU slices, through the chips' DCN links; in a switched cluster, inside a node
through its switch, across nodes from the sender's own NIC on its rail to the same rail of the
receiving node, then over NVLink to the receiver (PXN) when it sits on another rail.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, replace
from itertools import combinations

import networkx as nx
import numpy as np

from moeplan.collectives import (
    HOPPER_NVLS_EFFICIENCY,
    NVLINK_EFFICIENCY,
    CommParams,
    axis_levels,
    fabric_params,
    multislice_split,
    switched_group,
    torus_group,
)
from moeplan.dispatch import NORMAL_KERNELS, ExpertRouting, kernel_sms, sm_copy_s
from moeplan.topology import TORUS, Topology

Route = list[tuple[object, object, float]]  # (u, v, fraction of the flow on this directed link)


@dataclass
class LinkSimResult:
    time_s: float
    link_bytes: dict[tuple[object, object], float]  # summed over phases


class _Phase:
    def __init__(self) -> None:
        self.load: dict[tuple[object, object], float] = defaultdict(float)
        self.latency_s = 0.0


def simulate(
    topo: Topology,
    op: str,
    size_bytes: float,
    devices: int | list[int] | np.ndarray | None = None,
    algorithm: str = "ring",
    params: CommParams | None = None,
) -> LinkSimResult:
    """Route the flows of ``op`` (``algorithm`` "ring", "direct" or "nvls") and time it link by link."""
    params = params or CommParams()
    if topo.twisted:
        raise ValueError("linksim: twisted tori have no dimension-order routing here; use the closed form")
    ids = topo.device_ids(topo.num_devices if devices is None else devices)
    if topo.slices > 1 and np.unique(topo.slice_of(ids)).size > 1:
        phases = _multislice_phases(topo, op, float(size_bytes), ids, params)
    else:
        builder = _torus_phases if topo.kind == TORUS else _switched_phases
        phases = builder(topo, op, float(size_bytes), ids, algorithm)
    total: dict[tuple[object, object], float] = defaultdict(float)
    time = 0.0
    for phase in phases:
        worst = 0.0
        for (u, v), load in phase.load.items():
            total[(u, v)] += load
            edge = topo.graph[u][v]
            worst = max(worst, load / (edge["bw_bytes_per_s"] * _link_eff(topo, edge["tier"], algorithm, params,
                                                                           size_bytes)))
        time += worst + phase.latency_s
    time += _library_latency_s(topo, op, ids, algorithm, params)
    return LinkSimResult(time, dict(total))


def _fabric(tier: str, algorithm: str) -> str:
    if tier.startswith("ici") or tier == "dcn":
        return tier[:3]
    if tier in ("nvlink", "mesh"):
        return "nvls" if algorithm == "nvls" else "node"
    return "net"


def _link_eff(topo: Topology, tier: str, algorithm: str, params: CommParams, size: float,
              peak: bool = False) -> float:
    """A link's achieved / peak: its fabric's curve, scaled as collectives scales it per generation
    (NVLS efficiency of the switch, a measured node-link efficiency); ``peak``: the curve's large-message end."""
    fabric = _fabric(tier, algorithm)
    eff = params.eff(fabric).e_max if peak else params.eff(fabric)(np.array([size]))[0]
    if fabric == "nvls":
        eff *= (topo.node.nvls_efficiency or HOPPER_NVLS_EFFICIENCY) / HOPPER_NVLS_EFFICIENCY
    if fabric == "node" and topo.node.link_efficiency is not None:
        eff *= topo.node.link_efficiency / NVLINK_EFFICIENCY
    return eff


# ------------------------------------------------------------------ torus
def _torus_route(topo: Topology, src: int, dst: int) -> Route:
    """Dimension-order route; on a ring with the two ways equally short, half the bytes each way."""
    base = src - src % topo.devices_per_slice  # the slice's first id (multi-slice: a copy of the slice)
    if dst - dst % topo.devices_per_slice != base:
        return [(src, "dcn", 1.0), ("dcn", dst, 1.0)]
    routes: list[tuple[list[int], float]] = [([src], 1.0)]
    shape = topo.shape
    for axis, ax in enumerate(topo.axes):
        target = topo.coordinates[dst, axis]
        new_routes = []
        for path, frac in routes:
            here = topo.coordinates[path[-1]].copy()
            delta = int(target - here[axis])
            options = [(np.sign(delta), abs(delta))] if delta else [(0, 0)]
            if ax.wraparound and delta:
                fwd = delta % ax.size
                back = ax.size - fwd
                options = [(1, fwd)] if fwd < back else [(-1, back)] if back < fwd else [(1, fwd), (-1, back)]
            for direction, steps in options:
                walk = list(path)
                coord = here.copy()
                for _ in range(steps):
                    coord[axis] = (coord[axis] + direction) % ax.size
                    walk.append(base + int(np.ravel_multi_index(tuple(coord), shape)))
                new_routes.append((walk, frac / len(options)))
        routes = new_routes
    return [(u, v, frac) for path, frac in routes for u, v in zip(path, path[1:], strict=False)]


def _torus_phases(topo: Topology, op: str, size: float, ids: np.ndarray, algorithm: str) -> list[_Phase]:
    torus_group(topo, ids)  # raises unless the group is a sub-grid, as the closed form requires
    n = ids.size
    if op == "p2p":
        return [_unicast_phase(topo, [(ids[0], ids[1], size)], _torus_route, topo.axes[0].link.latency_s)]
    if op == "all_to_all":
        flows = [(int(a), int(b), size / n) for a in ids for b in ids if a != b]
        phase = _unicast_phase(topo, flows, _torus_route, topo.axes[0].link.latency_s)
        return [phase]
    stages = _axis_stages(topo, ids)
    gather = []
    shard = size / n
    for lines, wrap in stages:
        gather.append(_gather_phase(topo, lines, wrap, shard))
        shard *= len(lines[0])
    if op in ("all_gather", "reduce_scatter"):
        return gather
    return gather + gather  # all_reduce = reduce_scatter (mirror of all_gather) + all_gather


def _axis_stages(topo: Topology, ids: np.ndarray) -> list[tuple[list[list[int]], bool]]:
    """For each axis the group spans: its lines of members (sorted along the axis) and whether the graph
    closes them into rings (decided from the links, not borrowed from ``collectives``)."""
    coords = topo.coordinates[ids]
    stages = []
    for axis in range(len(topo.axes)):
        positions = np.unique(coords[:, axis])
        levels = axis_levels(positions)
        # each member's digit per level: its index among the positions, unravelled innermost level fastest
        digits = np.array(np.unravel_index(np.searchsorted(positions, coords[:, axis]),
                                           [c for c, _ in reversed(levels)]))[::-1] if levels else None
        others = [a for a in range(len(topo.axes)) if a != axis]
        for j in range(len(levels)):
            lines: dict[tuple, list[tuple[int, int]]] = defaultdict(list)
            for i, (dev, c) in enumerate(zip(ids, coords, strict=True)):
                key = tuple(c[others]) + tuple(np.delete(digits[:, i], j))
                lines[key].append((int(c[axis]), int(dev)))
            ordered = [[d for _, d in sorted(members)] for members in lines.values()]
            stages.append((ordered, _closes_ring(topo, ordered[0], axis)))
    return stages


def _closes_ring(topo: Topology, line: list[int], axis: int) -> bool:
    """Whether the graph closes a line of members into a ring: once the chain member to member has used
    its links along the axis, a path as short as one chain step still leads from the last member back to
    the first over the axis' remaining links (a doubled link of a 2-ring counts twice)."""
    tier = f"ici{axis}"
    axis_graph = nx.Graph()
    for u, v, d in topo.graph.edges(data=True):
        if d["tier"] == tier:
            axis_graph.add_edge(u, v, links=d["links"])
    step = nx.shortest_path_length(axis_graph, line[0], line[1])
    for a, b in zip(line, line[1:], strict=False):
        path = nx.shortest_path(axis_graph, a, b)
        for u, v in zip(path, path[1:], strict=False):
            axis_graph[u][v]["links"] -= 1
    free = nx.Graph((u, v) for u, v, d in axis_graph.edges(data=True) if d["links"] > 0)
    if line[-1] not in free or line[0] not in free or not nx.has_path(free, line[-1], line[0]):
        return False
    return nx.shortest_path_length(free, line[-1], line[0]) == step


def _gather_phase(topo: Topology, lines: list[list[int]], wrap: bool, shard: float) -> _Phase:
    """Bidirectional ring (wrap) or line all-gather: every block forwarded member to member."""
    phase = _Phase()
    for line in lines:
        m = len(line)
        for i in range(m):
            if wrap:
                clockwise = [line[(i + s) % m] for s in range(m)]
                counter = [line[(i - s) % m] for s in range(m)]
                chains = [(clockwise, shard / 2), (counter, shard / 2)]
            else:
                chains = [(line[i::-1], shard), (line[i:], shard)]
            for chain, block in chains:
                hops = 0
                for a, b in zip(chain, chain[1:], strict=False):
                    for u, v, frac in _torus_route(topo, a, b):
                        phase.load[(u, v)] += block * frac
                        hops += frac
                phase.latency_s = max(phase.latency_s, hops * topo.axes[0].link.latency_s)
    # a ring's block travels m-1 hops each way in one pipelined pass: latency is one chain, not two
    return phase


def _unicast_phase(topo: Topology, flows, router, hop_latency_s: float) -> _Phase:
    phase = _Phase()
    for src, dst, nbytes in flows:
        route = router(topo, int(src), int(dst))
        for u, v, frac in route:
            phase.load[(u, v)] += nbytes * frac
        phase.latency_s = max(phase.latency_s, _longest(route, int(src)) * hop_latency_s)
    return phase


def _longest(route: Route, src: int) -> int:
    """Hop count of the longest path in a (possibly split) route."""
    starts = sum(1 for u, _, _ in route if u == src)
    return round(len(route) / max(starts, 1)) if route else 0


def _multislice_phases(topo: Topology, op: str, size: float, ids: np.ndarray, params: CommParams) -> list[_Phase]:
    """A group across slices: all_to_all and p2p as flows routed through DCN where they leave a slice; the
    others as XLA runs them, the slices' ICI stages concurrently and a ring of each chip's peers over DCN."""
    hop = topo.axes[0].link.latency_s
    if op in ("p2p", "all_to_all"):
        pairs = [(ids[0], ids[1], size)] if op == "p2p" else [
            (int(a), int(b), size / ids.size) for a in ids for b in ids if a != b]
        phase = _unicast_phase(topo, pairs, _torus_route, hop)
        if any(topo.slice_of(a) != topo.slice_of(b) for a, b, _ in pairs):
            phase.latency_s = max(phase.latency_s - 2 * hop, params.dcn_step_latency_s)
        return [phase]
    inner, m = multislice_split(topo, ids)
    slices = np.unique(topo.slice_of(ids))
    k = inner.size
    stages = [_axis_stages(topo, inner + (s - slices[0]) * topo.devices_per_slice) for s in slices] if k > 1 else []
    inside = []
    shard = size / k
    for per_slice in zip(*stages, strict=True):  # stage by stage (the shard growing), every slice at once
        phase = _Phase()
        for lines, wrap in per_slice:
            part = _gather_phase(topo, lines, wrap, shard)
            for edge, load in part.load.items():
                phase.load[edge] += load
            phase.latency_s = max(phase.latency_s, part.latency_s)
        inside.append(phase)
        shard *= len(per_slice[0][0][0])
    rounds = 2 if op == "all_reduce" else 1
    dcn = _Phase()
    for member in inner:
        ring = [int(member) + (s - slices[0]) * topo.devices_per_slice for s in slices]
        for a, b in zip(ring, ring[1:] + ring[:1], strict=True):
            for u, v, frac in _torus_route(topo, a, b):
                dcn.load[(u, v)] += rounds * (m - 1) / m * size / k * frac
    dcn.latency_s = rounds * (m - 1) * params.dcn_step_latency_s
    return inside + [dcn] + inside if op == "all_reduce" else inside + [dcn]


# ------------------------------------------------------------------ switched
def _switched_route(topo: Topology, src: int, dst: int) -> Route:
    g = topo.node.devices_per_node
    (ns, ls), nd = topo.coordinates[src], topo.coordinates[dst, 0]
    if ns == nd:
        return [(src, dst, 1.0)] if topo.node.mesh else [(src, f"n{ns}/switch", 1.0), (f"n{ns}/switch", dst, 1.0)]
    path: list[object] = [src, f"n{ns}/nic{ls}"]
    so = topo.scale_out
    leaf_s, leaf_d = f"rail{ls}/leaf{ns // so.nodes_per_leaf}", f"rail{ls}/leaf{nd // so.nodes_per_leaf}"
    path += [leaf_s] if leaf_s == leaf_d else [leaf_s, "spine", leaf_d]
    relay = int(nd * g + ls)
    path += [f"n{nd}/nic{ls}", relay]
    if relay != dst:
        path += [dst] if topo.node.mesh else [f"n{nd}/switch", dst]
    return [(u, v, 1.0) for u, v in zip(path, path[1:], strict=False)]


def _switched_phases(topo: Topology, op: str, size: float, ids: np.ndarray, algorithm: str) -> list[_Phase]:
    n = ids.size
    if op == "p2p":
        return [_unicast_phase(topo, [(ids[0], ids[1], size)], _switched_route, 0.0)]
    if op == "all_to_all":
        flows = [(int(a), int(b), size / n) for a in ids for b in ids if a != b]
        return [_unicast_phase(topo, flows, _switched_route, 0.0)]
    if algorithm == "nvls":
        phase = _Phase()
        for dev in ids:
            switch = f"n{topo.coordinates[dev, 0]}/switch"
            phase.load[(int(dev), switch)] += size  # every GPU's buffer reduced in the switch
            phase.load[(switch, int(dev))] += size  # and the result multicast back
        return [phase]
    rounds = 2 if op == "all_reduce" else 1
    if topo.node.mesh and switched_group(topo, ids).nodes == 1:  # channels over every link: each block direct
        flows = [(int(a), int(b), size / n) for a in ids for b in ids if a != b]
        return [_unicast_phase(topo, flows, _switched_route, 0.0) for _ in range(rounds)]
    phase = _Phase()
    channels = _ring_channels(topo, ids)
    per_edge = (n - 1) / n * size / len(channels) * rounds  # every ring edge forwards (n-1) blocks per round
    for ring in channels:
        for a, b in zip(ring, ring[1:] + ring[:1], strict=True):
            for u, v, frac in _switched_route(topo, a, b):
                phase.load[(u, v)] += per_edge * frac
    return [phase]


def simulate_dispatch(
    topo: Topology,
    devices: int | list[int] | np.ndarray,
    bytes_per_token: float,
    experts: ExpertRouting,
    kernel: str = "deepep_normal",
    params: CommParams | None = None,
) -> LinkSimResult:
    """Every rank sends one token along every routing the model deems equally likely (each reachable node set,
    then each k-subset of its experts), copy by copy over the graph: ``deepep_normal`` once per remote node to
    the GPU on the sender's rail there, which forwards it over NVLink to the other selected GPUs of its node
    (``hybridep`` the same); ``deepep_ll`` once per (token, expert) straight to the expert's rank. The
    normal-style kernels take at least the send buffer over their SMs' copy rate (``dispatch``)."""
    params = fabric_params(topo, params or CommParams())
    ids = topo.device_ids(devices)
    owner = np.repeat(ids, experts.num_experts // ids.size)
    node_of = {int(d): int(topo.coordinates[d, 0]) for d in ids}
    nodes = sorted(set(node_of.values()))
    tokens = _all_routings(experts, nodes, {n: [e for e in range(experts.num_experts) if node_of[int(owner[e])] == n]
                                            for n in nodes})
    phase = _Phase()
    for src in (int(d) for d in ids):
        for token in tokens:
            for a, b in _token_hops(topo, src, sorted({int(owner[e]) for e in token}), node_of, kernel, token, owner):
                for u, v, frac in _switched_route(topo, a, b):
                    phase.load[(u, v)] += bytes_per_token * frac
    size = len(tokens) * experts.top_k * bytes_per_token  # the send buffer one rank would hand an all_to_all
    worst = 0.0
    low_latency = kernel == "deepep_ll"  # per-token RDMA writes: the links' large-message efficiency
    for (u, v), load in phase.load.items():
        edge = topo.graph[u][v]
        eff = _link_eff(topo, edge["tier"], "direct", params, size, peak=low_latency)
        worst = max(worst, load / (edge["bw_bytes_per_s"] * eff))
    if low_latency:
        return LinkSimResult(worst + params.ll_kernel_latency_s, dict(phase.load))
    step = params.node_step_latency_s if len(nodes) == 1 else params.net_step_latency_s
    routing = experts if experts.token_bytes else replace(experts, token_bytes=bytes_per_token)
    copy_s = sm_copy_s(kernel, size, routing, kernel_sms(kernel, params.dispatch_sms), params.sm_copy)
    return LinkSimResult(max(worst, copy_s) + step, dict(phase.load))


def _all_routings(experts: ExpertRouting, nodes: list[int], experts_on: dict[int, list[int]]) -> list[tuple]:
    reach = len(nodes) if experts.max_nodes is None else min(experts.max_nodes, len(nodes))
    out = []
    for chosen in combinations(nodes, reach):
        pool = [e for n in chosen for e in experts_on[n]]
        out.extend(combinations(pool, experts.top_k))
    return out


def _token_hops(topo: Topology, src: int, targets: list[int], node_of: dict, kernel: str, token, owner):
    """(from, to) device pairs one token's copies take."""
    if kernel == "deepep_ll":
        return [(src, int(owner[e])) for e in token if int(owner[e]) != src]
    if kernel not in NORMAL_KERNELS:
        raise ValueError(f"kernel: got {kernel!r}; expected 'deepep_normal', 'hybridep' or 'deepep_ll'")
    g = topo.node.devices_per_node
    hops = []
    for node in sorted({node_of[d] for d in targets}):
        here = [d for d in targets if node_of[d] == node]
        relay = src if node == node_of[src] else node * g + src % g  # the GPU on the sender's rail there
        if relay != src:
            hops.append((src, relay))
        hops.extend((relay, d) for d in here if d != relay)
    return hops


def _ring_channels(topo: Topology, ids: np.ndarray) -> list[list[int]]:
    """NCCL-style channels: one ring per GPU of a node; in node j the ring of channel c enters at the
    member (c - j) mod p and leaves from the member before it, so each node uses each NIC once."""
    by_node: dict[int, list[int]] = defaultdict(list)
    for dev in sorted(int(d) for d in ids):
        by_node[int(topo.coordinates[dev, 0])].append(dev)
    nodes = sorted(by_node)
    p = max(len(v) for v in by_node.values())
    if len(nodes) == 1:
        return [by_node[nodes[0]]]
    rings = []
    for c in range(p):
        ring: list[int] = []
        for j, node in enumerate(nodes):
            members = by_node[node]
            entry = (c - j) % len(members)
            ring += members[entry:] + members[:entry]
        rings.append(ring)
    return rings


def _library_latency_s(topo: Topology, op: str, ids: np.ndarray, algorithm: str, params: CommParams) -> float:
    """NCCL's per-collective and per-step latencies (the torus phases carry their own hop latency)."""
    if topo.kind == TORUS or ids.size < 2:
        return params.xla_base_latency_s if topo.kind == TORUS else 0.0
    params = fabric_params(topo, params)
    group = switched_group(topo, ids)
    if op == "p2p":
        return params.node_step_latency_s if group.nodes == 1 else params.net_step_latency_s
    if op == "all_to_all":
        step = params.node_step_latency_s if group.nodes == 1 else params.net_step_latency_s
        return params.nccl_base_latency_s + step
    if algorithm == "nvls":
        return params.nvls_latency_s
    rounds = 2 if op == "all_reduce" else 1
    steps = ids.size - 1
    net_steps = min(group.nodes - 1, steps) if group.nodes > 1 else 0
    per_round = params.node_step_latency_s * (steps - net_steps) + params.net_step_latency_s * net_steps
    return params.nccl_base_latency_s + rounds * per_round


assert math.isfinite(CommParams().nccl_base_latency_s)
