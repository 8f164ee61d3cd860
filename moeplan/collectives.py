"""Time of collectives on a device group: all_to_all, all_reduce, all_gather, reduce_scatter, p2p.

Sizes follow nccl-tests (``bytes_per_device``): all_reduce = the buffer; all_gather = the total
output; reduce_scatter = the total input; all_to_all = the whole send buffer of a rank, its local
part included; p2p = the message. Every function takes a numpy array of sizes and returns times.

Notation: S bytes per device, n ranks, B one-way link bandwidth, e(S) achieved/peak efficiency,
alpha a per-step latency. Every algorithm is ``time = latency terms + wire bytes / (B * e(S))``:

* **Torus (TPU, XLA).** Per axis a bidirectional ring when the group closes the axis into a ring
  (wraparound), else a bidirectional line with half the bandwidth; groups spanning several axes are
  decomposed axis by axis (scaling-book, "How to Scale Your Model", ch. 3): all_gather stage on
  axis a costs ``(n_a - 1) * shard_a / (2B)`` on a ring and ``/B`` on a line, with the shard
  growing stage by stage. all_reduce = reduce_scatter + all_gather. all_to_all is bisection-bound
  under dimension-order routing: ``max_a n_a * S / (8B)`` on rings, ``n_a * S / (4B)`` on lines,
  which is all_gather / 4 on a bidirectional ring for the same shard.
* **TPU multi-slice (ICI inside a slice, DCN between).** A group spanning slices holds the same
  in-slice members L in each of its m slices, as a data-parallel mesh axis over DCN does (MaxText's
  ``dcn_*_parallelism``). XLA reduces hierarchically: all_reduce = reduce_scatter over L (ICI), a
  ring all_reduce of the S/|L| shard over DCN among the m peers of each chip, all_gather over L
  (``2 (m-1)/m * S/|L| / B_dcn`` on the DCN); all_gather gathers the shards over DCN first, then over
  ICI; all_to_all sends the remote part ``(n - |L|)/n * S`` through each chip's own DCN share while
  the in-slice part moves over ICI (scaling-book, "Scaling Across Pods"; MaxText sharding guide).
* **GPU node (NCCL over NVSwitch).** Ring all_gather/reduce_scatter ``(n-1)/n * S / B``, ring
  all_reduce twice that; NVLS (in-switch reduction) all_reduce ``S / B`` with its own efficiency;
  all_to_all direct, each GPU limited by its own NVLink: ``(n-1)/n * S / B``.
* **GPU cluster.** Rings cross each node once per channel and NCCL spreads the channels over the
  node's NICs, so a ring's per-rank bandwidth is ``min(B_nvlink * g / (g - 1), g * B_nic)`` with g
  the group's GPUs per node (each of the g channels enters a node at a different GPU, so a GPU's
  NVLink carries g - 1 of them); NCCL's double binary tree moves 2S per node through the NICs with log-depth
  latency; NVLS-tree reduces inside nodes in the switch. all_to_all: a GPU's remote traffic
  ``(n - g)/n * S`` leaves through its own NIC (NCCL cannot aggregate NICs for all-to-all), its
  local traffic over NVLink, concurrently.

* **Expert dispatch kernels** (``experts=ExpertRouting(...)``, ``algorithm="deepep_normal"``,
  ``"hybridep"`` or ``"deepep_ll"``; see ``dispatch``): the all_to_all's send buffer is one copy per
  (token, expert). DeepEP's normal kernels and HybridEP send a token once per remote node through the NIC
  and fan it out over NVLink, ``max(network copies / B_nic, NVLink copies / B_nvlink)`` per copy's bytes,
  or their SMs' copy time (a fixed time per copy plus its bytes at a per-SM rate) where that is slower; the
  low-latency kernels move the all_to_all's bytes at the links' large-message efficiency (per-token RDMA
  writes from every SM: no chunk-pipeline ramp) after a fixed kernel latency (``ll_kernel_latency_s``).

Without an explicit ``algorithm`` the fastest candidate is taken per size, as NCCL's tuner does
with its own cost model (a dispatch kernel is a software choice: it is taken only when named).
Latencies and efficiencies are ``CommParams`` with cited defaults; a calibration profile passes its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import lru_cache

import numpy as np

from moeplan import bounds
from moeplan.dispatch import (
    KERNELS,
    NORMAL_KERNELS,
    SM_COPY,
    ExpertRouting,
    kernel_sms,
    normal_copies,
    sm_copy_s,
)
from moeplan.topology import SWITCHED, TORUS, Topology

OPS = ("all_to_all", "all_reduce", "all_gather", "reduce_scatter", "p2p")
DISPATCH_KERNELS = tuple(k for k in KERNELS if k != "nccl")  # algorithms an all_to_all takes with experts=


@dataclass(frozen=True)
class Efficiency:
    """Achieved / peak bandwidth as a function of size: ``e_max * (S / (S + s_half)) ** shape``.

    Large messages approach ``e_max`` (protocol overhead); small ones lose bandwidth to pipeline
    fill and fewer channels. ``s_half_bytes = 0`` is a flat curve.
    """

    e_max: float
    s_half_bytes: float = 0.0
    shape: float = 0.5
    source: str = ""

    def __post_init__(self) -> None:
        if not 0.0 < self.e_max <= 1.0:
            raise ValueError(f"efficiency.e_max: got {self.e_max!r}; expected a number in (0, 1]")
        if not (0.0 <= self.s_half_bytes <= 1e15 and 0.0 < self.shape <= 10.0):
            raise ValueError(
                f"efficiency: got s_half_bytes={self.s_half_bytes!r}, shape={self.shape!r}; expected s_half_bytes in "
                "[0, 1e15] and shape in (0, 10]"
            )

    def __call__(self, size_bytes: np.ndarray) -> np.ndarray:
        size = np.maximum(np.asarray(size_bytes, dtype=float), 1.0)
        if self.s_half_bytes == 0.0:
            return np.full_like(size, self.e_max)
        return self.e_max * (size / (size + self.s_half_bytes)) ** self.shape


_NCCL = "NVIDIA/nccl src/graph/tuning.cc (baseLat / hwLat tables, LL protocol, ring and tree)"
# validation.fit_ll_latency over these points (DeepEP V1's low-latency table, EP 8-256 on H800; NCCL EP's
# low-latency mode, EP 8-64 on H100); a test checks.
LL_LATENCY_FITTED_TO = ("DEEPEP-V1-LL", "NCCL-EP-LL")
LL_KERNEL_LATENCY_S = 3.55e-5


def _check_pairs(field_name: str, pairs: dict, keys, limits: dict[str, tuple[float, float]]) -> None:
    """``CommParams.<field_name>``: each of ``keys`` mapped to a pair of numbers, named and bounded by ``limits``."""
    names = tuple(limits)
    for key, pair in pairs.items():
        if key not in keys or not isinstance(pair, tuple) or len(pair) != 2:
            raise ValueError(f"comm.{field_name}: got {key!r}: {pair!r}; expected one of {list(keys)} mapped to "
                             f"({', '.join(names)})")
        for name, value in zip(names, pair, strict=True):
            bounds.check_number(f"comm.{field_name}.{key}.{name}", value, *limits[name])


@dataclass(frozen=True)
class CommParams:
    """Software latencies and efficiency curves of the collective libraries (cited defaults).

    Latencies are NCCL's own LL-protocol figures (its lowest-latency protocol, which it uses for the
    small messages where latency matters); a joint fit of latency and ramp to the nccl-tests sweeps
    C1 and C2 lands on the same 6.6 + 14 x 0.6 = 15 us for an 8-GPU ring all_reduce.
    """

    nccl_base_latency_s: float = 6.6e-6  # ring LL baseLat, per collective
    node_step_latency_s: float = 0.6e-6  # NVLink LL hwLat, per ring step
    net_step_latency_s: float = 2.7e-6  # network LL hwLat, per ring step
    net_tree_step_latency_s: float = 5.0e-6  # network tree LL hwLat, per tree level
    nvls_latency_s: float = 23.0e-6  # NVLS hwLat (Simple, its only protocol), per collective
    xla_base_latency_s: float = 0.0  # TPU: per-hop ICI latency only (scaling-book model)
    # TPU DCN: per DCN ring step (host-mediated: HBM, PCIe, host, NIC). No published figure: an assumption of
    # the order of an Ethernet RDMA round trip through two hosts; a calibration profile replaces it.
    dcn_step_latency_s: float = 25.0e-6
    # DeepEP's low-latency kernels: the fixed cost of one dispatch or combine kernel (FP8 cast, the count
    # signal after the data, the receiver's wait and unpack), fitted to the points LL_LATENCY_FITTED_TO names
    # (validation.fit_ll_latency); left out of them, one network step (the kernels' own floor).
    ll_kernel_latency_s: float = LL_KERNEL_LATENCY_S
    # SMs the normal-style dispatch kernels (deepep_normal, hybridep) run on; None: the kernel's default
    # (dispatch.KERNEL_SMS); and per kernel each SM's (fixed time per copy s, copy rate bytes/s), dispatch.SM_COPY
    # by default (a kernel left out has no SM limit).
    dispatch_sms: int | None = None
    sm_copy: dict[str, tuple[float, float]] = field(default_factory=lambda: dict(SM_COPY))
    efficiency: dict[str, Efficiency] = field(default_factory=lambda: dict(DEFAULT_EFFICIENCY))
    source: str = _NCCL
    # Per-op corrections a calibration fits (empty by default): op -> (latency_s, efficiency); the op then
    # takes latency_s + (the model's time) / efficiency, efficiency relative to the model (may exceed 1).
    ops: dict[str, tuple[float, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("nccl_base_latency_s", "node_step_latency_s", "net_step_latency_s", "net_tree_step_latency_s",
                     "nvls_latency_s", "xla_base_latency_s", "dcn_step_latency_s", "ll_kernel_latency_s"):
            bounds.check_number(f"comm.{name}", getattr(self, name), 0.0, 1.0)
        if self.dispatch_sms is not None and (isinstance(self.dispatch_sms, bool) or not isinstance(
                self.dispatch_sms, int) or not 1 <= self.dispatch_sms <= 4096):
            raise ValueError(f"comm.dispatch_sms: got {self.dispatch_sms!r}; expected an integer in [1, 4096] or None")
        _check_pairs("sm_copy", self.sm_copy, NORMAL_KERNELS, {"fixed_s": (0.0, 1.0), "bytes_per_s": (1.0, 1e15)})
        if not isinstance(self.efficiency, dict) or not all(
                isinstance(k, str) and isinstance(v, Efficiency) for k, v in self.efficiency.items()):
            raise ValueError("comm.efficiency: expected a mapping of fabric name to Efficiency")
        _check_pairs("ops", self.ops, OPS, {"latency_s": (0.0, 1.0), "efficiency": (0.01, 100.0)})

    def __hash__(self) -> int:
        cached = self.__dict__.get("_hash")
        if cached is None:
            cached = hash((self.nccl_base_latency_s, self.node_step_latency_s, self.net_step_latency_s,
                           self.net_tree_step_latency_s, self.nvls_latency_s, self.xla_base_latency_s,
                           self.dcn_step_latency_s, self.ll_kernel_latency_s, tuple(sorted(self.efficiency.items())),
                           tuple(sorted(self.ops.items())), self.dispatch_sms, tuple(sorted(self.sm_copy.items()))))
            object.__setattr__(self, "_hash", cached)
        return cached

    def eff(self, fabric: str) -> Efficiency:
        try:
            return self.efficiency[fabric]
        except KeyError:
            known = sorted(self.efficiency)
            raise ValueError(f"efficiency: no curve for {fabric!r}; expected one of {known}") from None

    def with_efficiency(self, **curves: Efficiency) -> CommParams:
        return replace(self, efficiency={**self.efficiency, **curves})


# The size ramp (s_half, shape) was fitted once, jointly, to the nccl-tests all_reduce sweeps on 8x A100
# (stas00/ml-engineering, validation point C1) and 8x H200 (C2); the same ramp serves every fabric.
# Those two points are in-sample for the validation; every other point is held out.
RAMP = dict(s_half_bytes=1.7e7, shape=0.76)
RAMP_FITTED_TO = ("C1", "C2")  # validation points (validation.fit_ramp refits it; a test checks)
DEFAULT_EFFICIENCY: dict[str, Efficiency] = {
    # NVLink rings: e_max = 370/450 (NCCL maintainer in nccl-tests issue #212: '~20% protocol overhead',
    # ~370 GB/s effective on the 450 GB/s H100 NVLink).
    "node": Efficiency(0.82, **RAMP, source="nccl-tests #212 (e_max); ramp fitted to C1+C2"),
    # NVLS: algbw ~275 GB/s on 450 GB/s NVLink at large sizes (nccl-tests #212, 8x H100) -> 0.61.
    "nvls": Efficiency(0.61, **RAMP, source="nccl-tests #212 (peak NVLS algbw ~275 GB/s on H100); ramp as 'node'"),
    # InfiniBand / RoCE through the NIC: ~90% of line rate (DeepEP V1 internode kernels reach 43-58 GB/s
    # bottleneck bandwidth on 50 GB/s NICs, validation point A1).
    "net": Efficiency(0.90, **RAMP, source="DeepEP V1 README internode rows (~45-50 of 50 GB/s)"),
    # TPU ICI: the scaling-book plans with 9e10 of the 1e11 spec (v5p/v6e) and 4.5e10 of 5e10 (v5e).
    "ici": Efficiency(0.90, 0.0, 0.5, "jax-ml scaling-book (9e10 planning vs 1e11 spec per link)"),
    # TPU DCN: no published sweep; the network curve of the GPU NICs (same Ethernet/RDMA line-rate overhead).
    "dcn": Efficiency(0.90, **RAMP, source="as 'net' (no published TPU DCN sweep)"),
}


DEFAULT_PARAMS = CommParams()

# ------------------------------------------------------------------ group analysis
@dataclass(frozen=True)
class TorusGroup:
    """A sub-grid group of a torus: per level (an evenly spaced run of members along one physical axis; an
    axis holds two levels when a mesh axis sits between two of the group's, e.g. positions 0, 1, 4, 5) its
    member count, stride and ring closure, innermost level first on each axis."""

    sizes: tuple[int, ...]
    wraps: tuple[bool, ...]
    strides: tuple[int, ...]
    link_bw_bytes_per_s: tuple[float, ...]
    hop_latency_s: float
    axes: tuple[int, ...] = ()  # the physical axis of each level


def axis_levels(values: np.ndarray) -> list[tuple[int, int]]:
    """Sorted distinct positions on one axis as nested evenly spaced runs, innermost first, as
    (count, stride): [0, 2, 4, 6] -> [(4, 2)]; [0, 1, 4, 5] -> [(2, 1), (2, 4)]. Raises otherwise."""
    levels = []
    v = np.asarray(values, dtype=np.int64)
    while v.size > 1:
        stride = int(v[1] - v[0])
        run = 1
        while run < v.size and v[run] - v[run - 1] == stride:
            run += 1
        blocks = v.reshape(-1, run) if v.size % run == 0 else None
        if blocks is None or not np.array_equal(blocks - blocks[:, :1], np.broadcast_to(blocks[0] - blocks[0, 0],
                                                                                        blocks.shape)):
            raise ValueError(
                f"devices: the group's positions on a torus axis ({np.asarray(values).tolist()}) are not evenly "
                "spaced runs; expected a sub-grid of the torus (a mesh axis placement)")
        levels.append((run, stride))
        v = blocks[:, 0]
    return levels


@dataclass(frozen=True)
class SwitchedGroup:
    n: int
    nodes: int
    per_node: int  # the most group members on one node


def torus_group(topo: Topology, devices: np.ndarray) -> TorusGroup:
    """Describe a device group as a product of evenly strided axis segments, or raise."""
    return _torus_group(topo, np.asarray(devices, dtype=np.int64).tobytes())


@lru_cache(maxsize=1024)
def _torus_group(topo: Topology, key: bytes) -> TorusGroup:
    devices = np.frombuffer(key, dtype=np.int64)
    coords = topo.coordinates[devices]
    sizes, wraps, strides, bws, axes = [], [], [], [], []
    long_size = max(a.size for a in topo.axes)
    for axis, ax in enumerate(topo.axes):
        for count, stride in axis_levels(np.unique(coords[:, axis])):
            sizes.append(count)
            strides.append(stride)
            closes = ax.wraparound and count * stride == ax.size
            # On a twisted torus a short axis' wraparound lands on another line: its members form a line.
            wraps.append(bool(closes and not (topo.twisted and ax.size < long_size)))
            bws.append(ax.link.bw_bytes_per_s)
            axes.append(axis)
    if math.prod(sizes or [1]) != devices.size:
        raise ValueError(
            f"devices: {devices.size} devices do not fill the sub-grid {sizes} they span; "
            "expected a sub-grid of the torus (a mesh axis placement)"
        )
    latency = topo.axes[0].link.latency_s if topo.axes else 0.0
    return TorusGroup(tuple(sizes), tuple(wraps), tuple(strides), tuple(bws), latency, tuple(axes))


def switched_group(topo: Topology, devices: np.ndarray) -> SwitchedGroup:
    return _switched_group(topo, np.asarray(devices, dtype=np.int64).tobytes())


@lru_cache(maxsize=1024)
def _switched_group(topo: Topology, key: bytes) -> SwitchedGroup:
    devices = np.frombuffer(key, dtype=np.int64)
    nodes_of = topo.coordinates[devices, 0]
    _, counts = np.unique(nodes_of, return_counts=True)
    return SwitchedGroup(int(devices.size), int(counts.size), int(counts.max()))


# ------------------------------------------------------------------ torus algorithms
def _axis_bw(group: TorusGroup, k: int) -> float:
    """Bandwidth of one stage on axis k: two directions on a ring, one on a line (per direction B)."""
    return group.link_bw_bytes_per_s[k] * (2.0 if group.wraps[k] else 1.0)


def torus_all_gather_s(group: TorusGroup, size: np.ndarray, params: CommParams) -> np.ndarray:
    """Level by level, innermost shard first: stage k moves ``(n_k - 1) * shard_k`` per rank. The lines of
    an outer level on an axis interleave with the inner levels' members there and share their links."""
    n = math.prod(group.sizes)
    e = params.eff("ici")(size)
    shard = size / n
    time = np.full_like(size, params.xla_base_latency_s)
    for k, n_k in enumerate(group.sizes):
        sharing = math.prod(c for c, a in zip(group.sizes[:k], group.axes[:k], strict=True) if a == group.axes[k])
        time = time + sharing * (n_k - 1) * shard / (_axis_bw(group, k) * e)
        time = time + (n_k - 1) * group.strides[k] * group.hop_latency_s
        shard = shard * n_k
    return time


def torus_all_to_all_s(group: TorusGroup, size: np.ndarray, params: CommParams) -> np.ndarray:
    """Bisection bound per axis under dimension-order routing: n_k S / 8B (ring), n_k S / 4B (line)
    for even n_k ((n_k^2 - 1) / n_k in place of n_k when odd); latency: the longest route, the sum
    over axes of the farthest hop distance."""
    if not group.sizes:
        return np.zeros_like(size)
    e = params.eff("ici")(size)
    per_axis = []
    for axis in sorted(set(group.axes)):  # an axis of several levels counts as one run of all their members
        on_axis = [k for k, a in enumerate(group.axes) if a == axis]
        n_k = math.prod(group.sizes[k] for k in on_axis)
        per_axis.append((n_k * n_k - n_k % 2) / n_k * size / (4.0 * _axis_bw(group, on_axis[-1]) * e))
    hops = sum(_max_hops(group, k) for k in range(len(group.sizes)))
    return params.xla_base_latency_s + hops * group.hop_latency_s + np.max(per_axis, axis=0)


def _twisted_all_to_all_s(topo: Topology, size: np.ndarray, params: CommParams) -> np.ndarray:
    """Whole twisted slice: bisection bound, N/2 x N/2 pairs of S/N bytes each way across the cut."""
    cut_bw = topo.bisection_bw_bytes_per_s() * params.eff("ici")(size)
    n = topo.num_devices
    return params.xla_base_latency_s + topo.diameter_hops() * topo.axes[0].link.latency_s + n * size / 4.0 / cut_bw


def _max_hops(group: TorusGroup, k: int) -> int:
    n_k = group.sizes[k]
    return (n_k // 2 if group.wraps[k] else n_k - 1) * group.strides[k]


def torus_candidates(topo: Topology, op: str, devices: np.ndarray, size: np.ndarray, params: CommParams):
    if topo.slices > 1 and np.unique(topo.slice_of(devices)).size > 1:
        name = "direct" if op in ("all_to_all", "p2p") else "ring"  # rings in each slice and across slices
        return {name: multislice_time_s(topo, op, devices, size, params)}
    if op == "p2p":
        return {"direct": _torus_p2p_s(topo, devices, size, params)}
    group = torus_group(topo, devices)
    if op == "all_to_all" and topo.twisted and devices.size == topo.num_devices:
        return {"direct": _twisted_all_to_all_s(topo, size, params)}
    if op in ("all_gather", "reduce_scatter"):
        return {"ring": torus_all_gather_s(group, size, params)}
    if op == "all_reduce":  # reduce_scatter then all_gather
        return {"ring": 2.0 * torus_all_gather_s(group, size, params)}
    return {"direct": torus_all_to_all_s(group, size, params)}


def multislice_split(topo: Topology, devices: np.ndarray) -> tuple[np.ndarray, int]:
    """A group spanning slices as (its members in the first slice it touches, slices spanned), or raise
    unless every slice it touches holds the same in-slice members."""
    slices = topo.slice_of(devices)
    local = np.asarray(devices) - slices * topo.devices_per_slice
    spanned = np.unique(slices)
    first = np.sort(local[slices == spanned[0]])
    for s in spanned[1:]:
        if not np.array_equal(np.sort(local[slices == s]), first):
            raise ValueError(
                f"devices: the group holds different members in slice {int(spanned[0])} and slice {int(s)}; expected "
                "the same in-slice members in every slice it spans (a mesh axis over DCN)"
            )
    return first + int(spanned[0]) * topo.devices_per_slice, int(spanned.size)


def _dcn_ring_s(topo: Topology, m: int, shard: np.ndarray, rounds: int, size: np.ndarray,
                params: CommParams) -> np.ndarray:
    """A ring of each chip's m peers across slices: rounds x (m-1) steps of shard/m over its DCN share."""
    bw = topo.dcn.bw_bytes_per_s * params.eff("dcn")(size)
    return rounds * (m - 1) * (params.dcn_step_latency_s + shard / m / bw)


def multislice_time_s(topo: Topology, op: str, devices: np.ndarray, size: np.ndarray,
                      params: CommParams) -> np.ndarray:
    """Hierarchical collectives over ICI and DCN (module docstring)."""
    if op == "p2p":
        bw = topo.dcn.bw_bytes_per_s * params.eff("dcn")(size)
        return params.xla_base_latency_s + params.dcn_step_latency_s + size / bw
    inner, m = multislice_split(topo, devices)
    k = inner.size
    n = k * m
    ici = torus_group(topo, inner) if k > 1 else None
    if op == "all_to_all":  # one concurrent exchange: the busiest link, then the slowest route's latency
        remote = (n - k) / n * size / (topo.dcn.bw_bytes_per_s * params.eff("dcn")(size))
        if ici is None:
            return params.xla_base_latency_s + params.dcn_step_latency_s + remote
        hops_s = sum(_max_hops(ici, a) for a in range(len(ici.sizes))) * ici.hop_latency_s
        local = torus_all_to_all_s(ici, size * k / n, replace(params, xla_base_latency_s=0.0)) - hops_s
        return params.xla_base_latency_s + max(hops_s, params.dcn_step_latency_s) + np.maximum(local, remote)
    inside = np.zeros_like(size) if ici is None else torus_all_gather_s(ici, size, params)
    if op == "all_reduce":  # reduce_scatter in the slice, all_reduce of the shard over DCN, all_gather
        return 2.0 * inside + _dcn_ring_s(topo, m, size / k, 2, size, params)
    return inside + _dcn_ring_s(topo, m, size / k, 1, size, params)  # all_gather / reduce_scatter


def _torus_p2p_s(topo: Topology, devices: np.ndarray, size: np.ndarray, params: CommParams) -> np.ndarray:
    a, b = topo.coordinates[devices[0]], topo.coordinates[devices[1]]
    hops = 0
    for axis, ax in enumerate(topo.axes):
        d = abs(int(a[axis]) - int(b[axis]))
        hops += min(d, ax.size - d) if ax.wraparound else d
    bw = topo.axes[0].link.bw_bytes_per_s
    return params.xla_base_latency_s + hops * topo.axes[0].link.latency_s + size / (bw * params.eff("ici")(size))


# ------------------------------------------------------------------ switched algorithms
NVLINK_EFFICIENCY = 0.82  # e_max of the default "node" curve (NVLink); a family's link_efficiency replaces it


def node_rate(topo: Topology, group: SwitchedGroup, size: np.ndarray, params: CommParams,
              peak: bool = False) -> np.ndarray:
    """Achieved bytes/s one device moves to the others of its node: its switch link, or on a full mesh its
    links to the group's other members there (RCCL spreads channels over all of them); the family's
    measured link efficiency where it states one. ``peak``: the large-message efficiency at every size."""
    node = topo.node
    links = max(group.per_node - 1, 1) if node.mesh else 1
    eff = params.eff("node").e_max if peak else params.eff("node")(size)
    if node.link_efficiency is not None:
        eff = eff * (node.link_efficiency / NVLINK_EFFICIENCY)
    return links * node.link.bw_bytes_per_s * eff


def _ring_bw(topo: Topology, group: SwitchedGroup, size: np.ndarray, params: CommParams) -> np.ndarray:
    """Per-rank bandwidth of a ring: NVLink, or the node's NICs when the ring leaves the node."""
    node_bw = node_rate(topo, group, size, params)
    if group.nodes == 1:
        return node_bw
    # A ring crosses a leaf boundary with one channel per rail: far below an uplink's capacity.
    net_bw = group.per_node * _nic_bw(topo) * params.eff("net")(size)
    if group.per_node == 1:
        return net_bw
    # p channels, each entering a node at a different GPU: a GPU's NVLink carries p-1 of the p channels.
    return np.minimum(node_bw * group.per_node / (group.per_node - 1), net_bw)


def _nic_bw(topo: Topology) -> float:
    """What one GPU can push through its own NIC (the slower of its PCIe link and the NIC)."""
    so = topo.scale_out
    return min(so.pcie.bw_bytes_per_s, so.nic.bw_bytes_per_s)


def _uplink_load_per_bw(topo: Topology, devices: np.ndarray) -> float:
    """all_to_all with S = 1: the worst leaf uplink's bytes over its bandwidth (0 on one leaf).

    Rail r's leaf j carries, up to the spine, what its group members send to members under other
    leaves; its uplink is (nodes on the leaf) x NIC / oversubscription.
    """
    so = topo.scale_out
    nodes = topo.coordinates[devices, 0]
    rails = topo.coordinates[devices, 1]
    leaves = nodes // so.nodes_per_leaf
    if np.unique(leaves).size < 2:
        return 0.0
    n = devices.size
    worst = 0.0
    for leaf in np.unique(leaves):
        nodes_on_leaf = min(so.nodes_per_leaf, topo.num_nodes - leaf * so.nodes_per_leaf)
        uplink = nodes_on_leaf * so.nic.bw_bytes_per_s / so.oversubscription
        outside = np.count_nonzero(leaves != leaf)
        for rail in np.unique(rails[leaves == leaf]):
            senders = np.count_nonzero((leaves == leaf) & (rails == rail))
            worst = max(worst, senders * outside / n / uplink)
    return worst


def _ring_latency_s(group: SwitchedGroup, steps_per_round: int, params: CommParams) -> float:
    """NCCL ring: one round of n-1 steps, of which (nodes - 1) cross the network (at most)."""
    net_steps = min(group.nodes - 1, steps_per_round) if group.nodes > 1 else 0
    return params.node_step_latency_s * (steps_per_round - net_steps) + params.net_step_latency_s * net_steps


def fabric_params(topo: Topology, params: CommParams) -> CommParams:
    """``params`` with the network step latencies of this topology's fabric where it states them (a cloud
    fabric's plugin pays far more per step than InfiniBand: EFA, TCPXO); the library's own are a floor."""
    so = topo.scale_out
    if so is None or so.step_latency_s is None:
        return params
    return _with_fabric(params, so.step_latency_s)


@lru_cache(maxsize=256)
def _with_fabric(params: CommParams, step_latency_s: float) -> CommParams:
    return replace(params, net_step_latency_s=max(params.net_step_latency_s, step_latency_s),
                   net_tree_step_latency_s=max(params.net_tree_step_latency_s, step_latency_s))


def switched_candidates(topo: Topology, op: str, devices: np.ndarray, size: np.ndarray, params: CommParams):
    params = fabric_params(topo, params)
    group = switched_group(topo, devices)
    n = group.n
    base = params.nccl_base_latency_s
    if op == "p2p":
        return {"direct": _switched_p2p_s(topo, group, size, params)}
    if op == "all_to_all":
        step = params.node_step_latency_s if group.nodes == 1 else params.net_step_latency_s
        return {"direct": base + step + _all_to_all_transfer_s(topo, group, devices, size, params)}
    rounds = 2 if op == "all_reduce" else 1
    ring = base + rounds * _ring_latency_s(group, n - 1, params) + rounds * (n - 1) / n * size / _ring_bw(
        topo, group, size, params
    )
    out = {"ring": ring}
    if op != "all_reduce":
        return out
    node_bw = topo.node.link.bw_bytes_per_s
    if group.nodes > 1:
        depth = math.ceil(math.log2(group.nodes))
        up_and_down = depth * params.net_tree_step_latency_s + (group.per_node - 1) * params.node_step_latency_s
        latency = base + 2 * up_and_down
        net = _tree_net_s(topo, group, size, params)
        # inside a node the tree is a chain: each GPU sends the partial sum up and the result down, 2 S
        out["tree"] = latency + np.maximum(net, 2.0 * size / node_rate(topo, group, size, params)) / tree_correction(
            size)
    if topo.node.in_switch_reduction and group.per_node > 1:
        nvls = params.nvls_latency_s + size / (node_bw * _nvls_eff(topo, params, size))
        if group.nodes == 1:
            out["nvls"] = nvls
        else:  # NVLS inside nodes, a tree between them, pipelined: latencies add, bandwidths bound
            depth = math.ceil(math.log2(group.nodes))
            latency = base + params.nvls_latency_s + 2 * depth * params.net_tree_step_latency_s
            net = _tree_net_s(topo, group, size, params)
            out["nvls_tree"] = latency + np.maximum(nvls - params.nvls_latency_s, net) / tree_correction(size)
    return out


HOPPER_NVLS_EFFICIENCY = 0.85  # NCCL src/graph/tuning.cc nvlsEfficiency for sm90, where the "nvls" curve was measured


def _nvls_eff(topo: Topology, params: CommParams, size: np.ndarray) -> np.ndarray:
    """The NVLS curve scaled to the switch generation (NCCL's nvlsEfficiency: Blackwell 0.74 of Hopper's 0.85)."""
    generation = topo.node.nvls_efficiency or HOPPER_NVLS_EFFICIENCY
    return params.eff("nvls")(size) * (generation / HOPPER_NVLS_EFFICIENCY)


# NCCL's measured correction of its tree model: the tree all-reduce reaches this fraction of its modelled
# bandwidth at power-of-two sizes 64 B x 2**i (i = 0..23); 1.0 from 1 GiB up. Simple-protocol row of
# treeCorrectionFactor, NVIDIA/nccl src/graph/tuning.cc ("Trees are not perfectly sticking to the model for
# medium sizes"). Not fitted here: the library's own table, applied to every tree and NVLS-tree bandwidth.
TREE_CORRECTION = np.array([.9, .9, .9, .9, .9, .9, .9, .8, .7, .6, .6, .5, .5, .5, .5, .6, .7, .8, .7, .7, .8, .9,
                            .9, .9, 1.0])


def tree_correction(size: np.ndarray) -> np.ndarray:
    """NCCL's tree bandwidth correction at ``size`` bytes (its table's step at floor(log2(size / 64)))."""
    steps = np.floor(np.log2(np.maximum(np.asarray(size, dtype=float), 64.0) / 64.0)).astype(int)
    return TREE_CORRECTION[np.minimum(steps, TREE_CORRECTION.size - 1)]


def _tree_net_s(topo: Topology, group: SwitchedGroup, size: np.ndarray, params: CommParams) -> np.ndarray:
    """Network time of NCCL's double binary tree all-reduce, spread over a node's rails (one channel each).

    Each tree carries half the data up (reduce) and down (broadcast). With two nodes, each is the root of one
    tree and the only child in the other: it sends S/2 down one and S/2 up the other, S in all. With more, a
    node interior in one tree (two children) sends S/2 up and 2 x S/2 down there, and S/2 up the other: 2 S.
    Links are full duplex, so the time is what the busiest node sends over its per_node NICs."""
    sent = size * (1.0 if group.nodes == 2 else 2.0)
    return sent / (group.per_node * _nic_bw(topo) * params.eff("net")(size))


def dispatch_candidates(topo: Topology, devices: np.ndarray, size: np.ndarray, params: CommParams,
                        experts: ExpertRouting) -> dict[str, np.ndarray]:
    """DeepEP's kernels for a send buffer of ``size`` bytes (one copy per token and expert) per rank."""
    if topo.kind != SWITCHED:
        raise ValueError("algorithm: DeepEP kernels run on GPU clusters; expected a switched topology")
    params = fabric_params(topo, params)
    group = switched_group(topo, devices)
    if group.n != group.nodes * group.per_node:
        raise ValueError(f"devices: {group.n} ranks unevenly spread over {group.nodes} nodes; expected the same "
                         "count on every node for a dispatch kernel")
    per_copy = size / experts.top_k  # one token's bytes
    copies = normal_copies(experts, group.nodes, group.per_node)
    nvlink = copies.nvlink * per_copy / node_rate(topo, group, size, params)
    if group.nodes == 1:
        latency, links = params.node_step_latency_s, nvlink
    else:
        net = copies.network * per_copy / (_nic_bw(topo) * params.eff("net")(size))
        latency, links = params.net_step_latency_s, np.maximum(net, nvlink)
    # the normal-style kernels: the links, or their SMs' copy rate where that is slower (dispatch module docstring)
    normal = {kernel: latency + np.maximum(links, sm_copy_s(kernel, size, experts, kernel_sms(
        kernel, params.dispatch_sms), params.sm_copy)) for kernel in NORMAL_KERNELS}
    # The low-latency kernels move the all_to_all's bytes, one RDMA write per (token, expert) from every SM over
    # one queue pair per local expert (IBGDA): the links run at their large-message efficiency from the first
    # token, without NCCL's chunk-pipeline size ramp (DeepEP V1 legacy.md: 39 GB/s of a 50 GB/s NIC at EP 256
    # with 7.6 MB per rank, where NCCL's ramp would give a third of the line).
    low_latency = _all_to_all_transfer_s(topo, group, devices, size, params, peak=True)
    return {**normal, "deepep_ll": params.ll_kernel_latency_s + low_latency}


def _all_to_all_transfer_s(topo: Topology, group: SwitchedGroup, devices: np.ndarray, size: np.ndarray,
                           params: CommParams, peak: bool = False) -> np.ndarray:
    """Bytes time of an all_to_all: the local part over NVLink, the remote part through each GPU's own NIC and
    the busiest leaf uplink, concurrently; ``peak``: at the links' large-message efficiency at every size."""
    local = size * (group.per_node - 1) / group.n / node_rate(topo, group, size, params, peak=peak)
    if group.nodes == 1:
        return local
    net_eff = params.eff("net").e_max if peak else params.eff("net")(size)
    remote = size * (group.n - group.per_node) / group.n / (_nic_bw(topo) * net_eff)
    uplink = size * _uplink_load_per_bw(topo, devices) / net_eff
    return np.maximum(np.maximum(local, remote), uplink)


def _switched_p2p_s(topo: Topology, group: SwitchedGroup, size: np.ndarray, params: CommParams) -> np.ndarray:
    if group.nodes == 1:
        return params.node_step_latency_s + size / node_rate(topo, group, size, params)
    return params.net_step_latency_s + size / (_nic_bw(topo) * params.eff("net")(size))


# ------------------------------------------------------------------ public entry points
@dataclass(frozen=True)
class CollectiveCost:
    """Per size: the time of the chosen algorithm and its name."""

    time_s: np.ndarray
    algorithm: np.ndarray  # of str


def collective_cost(
    topo: Topology,
    op: str,
    bytes_per_device,
    devices: int | list[int] | np.ndarray | None = None,
    *,
    algorithm: str | None = None,
    params: CommParams | None = None,
    experts: ExpertRouting | None = None,
) -> CollectiveCost:
    """Time and algorithm of a collective for each size (see the module docstring for the model);
    ``experts`` makes the dispatch kernels available to an all_to_all."""
    if op not in OPS:
        raise ValueError(f"op: got {op!r}; expected one of {list(OPS)}")
    size = np.atleast_1d(np.asarray(bytes_per_device, dtype=float))
    if size.size and (not np.all(np.isfinite(size)) or size.min() < 0):
        raise ValueError("bytes_per_device: expected finite sizes >= 0")
    ids = _group_ids(topo, devices)
    params = params or CommParams()
    if op == "p2p" and ids.size != 2:
        raise ValueError(f"devices: p2p takes exactly 2 devices, got {ids.size}")
    if ids.size == 1:
        return CollectiveCost(np.zeros_like(size), np.full(size.shape, "local", dtype=object))
    build = torus_candidates if topo.kind == TORUS else switched_candidates
    assert topo.kind in (TORUS, SWITCHED)
    candidates = build(topo, op, ids, size, params)
    names = list(candidates)
    if experts is not None and op == "all_to_all" and algorithm in DISPATCH_KERNELS:
        candidates.update(dispatch_candidates(topo, ids, size, params, experts))
    elif algorithm in DISPATCH_KERNELS:
        raise ValueError(f"algorithm: {algorithm!r} is an expert dispatch kernel; expected op='all_to_all' and "
                         "experts=ExpertRouting(num_experts, top_k)")
    if algorithm is not None:
        if algorithm not in candidates:
            raise ValueError(f"algorithm: {algorithm!r} not available for {op} on this group; expected one of {names}")
        names = [algorithm]
    latency, efficiency = params.ops.get(op, (0.0, 1.0))  # a calibration's per-op correction
    if size.size == 1:  # the scalar path of estimate(): no stacking
        best_name = min(names, key=lambda a: float(np.asarray(candidates[a]).reshape(-1)[0]))
        value = 0.0 if size[0] == 0 else latency + float(np.asarray(candidates[best_name]).reshape(-1)[0]) / efficiency
        return CollectiveCost(np.array([value]), np.array([best_name], dtype=object))
    times = np.stack([np.broadcast_to(candidates[a], size.shape) for a in names])
    best = np.argmin(times, axis=0)
    chosen = latency + np.take_along_axis(times, best[None], axis=0)[0] / efficiency
    chosen = np.where(size == 0, 0.0, chosen)
    return CollectiveCost(chosen, np.asarray(names, dtype=object)[best])


@lru_cache(maxsize=65536)
def _scalar_time_s(topo: Topology, op: str, nbytes: float, key: bytes, params: CommParams) -> float:
    """Memoised scalar collective time (the same sizes recur across estimates and searches)."""
    ids = np.frombuffer(key, dtype=np.int64)
    return float(collective_cost(topo, op, nbytes, ids, params=params).time_s[0])


def _group_ids(topo: Topology, devices) -> np.ndarray:
    """Validated device ids; explicit groups are checked once and remembered."""
    if devices is None or isinstance(devices, int | np.integer):
        return topo.device_ids(topo.num_devices if devices is None else devices)
    ids = np.asarray(devices)
    if ids.ndim == 1 and ids.size and np.issubdtype(ids.dtype, np.integer):
        return _checked_ids(topo, ids.astype(np.int64).tobytes())
    return topo.device_ids(devices)


@lru_cache(maxsize=4096)
def _checked_ids(topo: Topology, key: bytes) -> np.ndarray:
    ids = topo.device_ids(np.frombuffer(key, dtype=np.int64))
    ids.flags.writeable = False
    return ids


def collective_time_s(
    topo: Topology,
    op: str,
    bytes_per_device,
    devices: int | list[int] | np.ndarray | None = None,
    *,
    algorithm: str | None = None,
    params: CommParams | None = None,
    experts: ExpertRouting | None = None,
):
    """Seconds for ``op`` on ``devices`` (a count = the first N devices, or a list of ids); with
    ``experts``, an all_to_all may name a dispatch kernel as its ``algorithm`` (module docstring).

    A scalar size gives a float; an array (at most MAX_SIZES sizes) gives an array of the same shape.
    """
    _check_call(topo, op, bytes_per_device, params)
    if np.ndim(bytes_per_device) == 0 and algorithm is None and not isinstance(devices, list):
        ids = _group_ids(topo, devices)
        time_s = _scalar_time_s(topo, op, float(bytes_per_device), ids.tobytes(), params or DEFAULT_PARAMS)
    else:
        cost = collective_cost(topo, op, bytes_per_device, devices, algorithm=algorithm, params=params,
                               experts=experts)
        time_s = float(cost.time_s[0]) if np.ndim(bytes_per_device) == 0 else \
            cost.time_s.reshape(np.shape(bytes_per_device))
    bounds.check_finite_outputs(f"collective_time_s({op!r})", {"time_s": time_s})
    return time_s


MAX_SIZES = 10_000_000  # sizes in one call: bounds the arrays of every candidate algorithm


def _check_call(topo, op, bytes_per_device, params) -> None:
    """The arguments' types and ranges (bounds.BYTES_PER_DEVICE), before any work."""
    if not isinstance(topo, Topology):
        raise ValueError(f"topo: got a {type(topo).__name__}; expected a moeplan.Topology (mp.load_topology)")
    if not isinstance(op, str) or op not in OPS:
        raise ValueError(f"op: got {str(op)[:60]!r}; expected one of {list(OPS)}")
    if params is not None and not isinstance(params, CommParams):
        raise ValueError(f"params: got a {type(params).__name__}; expected a CommParams or None")
    low, high = bounds.BYTES_PER_DEVICE
    if type(bytes_per_device) is float or type(bytes_per_device) is int:  # the common scalar: no array made
        if not low <= bytes_per_device <= high:  # False for NaN too
            raise ValueError(f"bytes_per_device: got {bytes_per_device!r}; expected a finite size from {low:g} to "
                             f"{high:g} bytes")
        return
    try:
        size = np.asarray(bytes_per_device, dtype=float)
    except (TypeError, ValueError):
        raise ValueError(f"bytes_per_device: got a {type(bytes_per_device).__name__}; expected a number or an "
                         "array of numbers") from None
    if size.size > MAX_SIZES or not np.all(np.isfinite(size)) or np.any(size < low) or np.any(size > high):
        raise ValueError(f"bytes_per_device: expected at most {MAX_SIZES:,} finite sizes from {low:g} to {high:g} "
                         "bytes")


def bus_bandwidth_factor(op: str, n: int) -> float:
    """nccl-tests busbw = algbw * factor: 2(n-1)/n for all_reduce, (n-1)/n for the others, 1 for p2p."""
    if op == "all_reduce":
        return 2.0 * (n - 1) / n
    if op == "p2p":
        return 1.0
    return (n - 1) / n
