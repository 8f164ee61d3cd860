"""Candidates as arrays that broadcast together, and collectives looked up once per group placement.

A ``Plan`` holds the layout degrees (and, through its model view, the MoE fields) as numpy values of
any shapes that broadcast against each other: one candidate (Python numbers: ``estimate()``), a list of
candidates (1-D arrays of one length), or a grid (the search: one axis per knob, every field varying
along its own axis only). The formulas in ``estimate`` are plain array arithmetic, so on a grid each
intermediate carries only the axes it depends on: the attention time of a layer is computed once
per (tensor, micro-batch) pair however many expert counts the grid holds, and only the final sums
span the whole grid. Nothing is gathered or expanded.

``Context`` carries what is constant across a plan. Its ``coll`` evaluates a collective once per
distinct device-group placement; ``distinct_rows`` does the same for any per-combination function
(routing statistics). Invalid grid points (a degree that does not divide, a group larger than the
topology) are computed with harmless values and masked out by the caller's validity check.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np

from moeplan import moe as M
from moeplan.collectives import DEFAULT_PARAMS, CommParams, collective_cost, collective_time_s
from moeplan.compute import matmul_time_s, memory_time_s, quantize_bytes
from moeplan.dispatch import ExpertRouting, sm_share
from moeplan.frameworks import FRAMEWORKS, Framework
from moeplan.hardware import ComputeEfficiency
from moeplan.layout import RECOMPUTE, Layout, expert_weight_shards
from moeplan.routing import Routing
from moeplan.topology import Topology
from moeplan.units import dtype_bytes

LAYOUT_FIELDS = ("data", "fsdp", "expert", "expert_tensor", "tensor", "context", "pipeline", "virtual_pipeline",
                 "micro_batch_size")


# ------------------------------------------------------------------ plans
@dataclass
class Plan:
    """Layout degrees per candidate (numpy values that broadcast together) and a model view whose MoE
    fields may be arrays broadcasting with them."""

    model: M.ModelView
    data: np.ndarray
    fsdp: np.ndarray
    expert: np.ndarray
    expert_tensor: np.ndarray
    tensor: np.ndarray
    context: np.ndarray
    pipeline: np.ndarray
    virtual_pipeline: np.ndarray
    micro_batch_size: np.ndarray
    recompute: np.ndarray  # index into layout.RECOMPUTE
    sequence_parallel: bool = True
    shard_optimizer: bool = True
    first_stage_layers: int = 0  # an uneven pipeline split (layout.stage_layers); 0: even
    last_stage_layers: int = 0
    gradient_bytes: float = 4.0  # per gradient value in the sync and in memory (Layout.gradient_bytes)
    quantized_gather: bool = False  # FSDP gathers 8-bit weights under an 8-bit dtype (Layout.quantized_gather)

    @property
    def shape(self) -> tuple[int, ...]:
        """The broadcast shape of every per-candidate field: () for one candidate."""
        values = [getattr(self, f) for f in LAYOUT_FIELDS + ("recompute",)] + list(self.model.overrides.values())
        return np.broadcast_shapes(*(np.shape(v) for v in values))

    @classmethod
    def from_layout(cls, model: M.MoEModel, layout: Layout) -> Plan:
        """One candidate: plain Python integers (the formulas' arithmetic on them is the cheapest)."""
        degrees = {f: int(getattr(layout, f)) for f in LAYOUT_FIELDS}
        return cls(M.ModelView(model), recompute=RECOMPUTE.index(layout.recompute),
                   sequence_parallel=layout.sequence_parallel, shard_optimizer=layout.shard_optimizer,
                   first_stage_layers=layout.first_stage_layers, last_stage_layers=layout.last_stage_layers,
                   gradient_bytes=float(layout.gradient_bytes), quantized_gather=layout.quantized_gather, **degrees)

    @property
    def batch_shards(self) -> np.ndarray:
        return self.data * self.fsdp

    @property
    def batch_block(self) -> np.ndarray:
        return self.data * self.fsdp * self.context * self.tensor

    @property
    def inner(self) -> np.ndarray:
        """Devices inside one fsdp rank: context x tensor."""
        return self.context * self.tensor

    @property
    def expert_block(self) -> np.ndarray:
        """Devices one MoE layer's experts are spread over: the expert degree x the expert-tensor degree."""
        return self.expert * self.expert_tensor

    @cached_property
    def expert_weight_shards(self) -> np.ndarray:
        return expert_weight_shards(self.expert_block, self.inner, self.fsdp)

    @property
    def dense_weight_shards(self) -> np.ndarray:
        return self.fsdp * self.tensor


# ------------------------------------------------------------------ device groups (device 0's) of a layout
def _ids_range(size):
    return np.arange(size)


def _ids_strided(size, stride):
    return np.arange(size) * stride


def _ids_replicas(data, data_stride, context, context_stride):
    """Devices holding the same weight shard: the data replicas and, inside each, the context ranks."""
    return (np.arange(data)[:, None] * data_stride + np.arange(context)[None, :] * context_stride).reshape(-1)


def _ids_pipeline(stages, stride):
    return np.array([0, stride]) if stages > 1 else np.array([0])


def _ids_expert_data(block, expert, inner, fsdp, covered_fsdp):
    """Devices of the batch block holding device 0's expert shard: the first member of an expert group
    (ids multiples of ``expert``) whose fsdp coordinate (ids over ``inner`` = context x tensor) falls in the part
    of fsdp the group covers."""
    ids = np.arange(0, block, expert)
    return ids[(ids // inner) % fsdp < covered_fsdp]


_GROUP_IDS = {"tensor": _ids_range, "expert_tensor": _ids_range, "expert": _ids_strided, "data": _ids_strided,
              "fsdp": _ids_strided, "context": _ids_strided, "replicas": _ids_replicas, "pipeline": _ids_pipeline,
              "expert_data": _ids_expert_data, "expert_fsdp": _ids_strided}


class Context:
    """Everything constant across a plan, plus the grouped collective lookups."""

    def __init__(self, plan: Plan, topo: Topology, dtype: str, eff: ComputeEfficiency, comm: CommParams,
                 routing: Routing, dispatch: str = "nccl", kernels: Framework | None = None,
                 training: bool = True) -> None:
        self.plan, self.topo, self.dtype, self.eff, self.comm, self.routing = plan, topo, dtype, eff, comm, routing
        self.training = training  # a training step (forward and backward), else one inference forward
        self.dispatch = dispatch  # the expert dispatch kernel (dispatch.KERNELS)
        kernels = kernels or FRAMEWORKS["megatron"]  # the framework's kernels and weight storage
        self.attention = kernels.attention  # the attention kernel (frameworks.ATTENTION_KERNELS)
        self.permute = kernels.permute  # how routed copies are grouped per expert (frameworks.PERMUTES)
        self.master_weights = kernels.master_weights  # 16-bit weights with an fp32 master copy, or fp32 weights
        self.p2p_overlap = kernels.p2p_overlap  # when pipeline sends hide (frameworks.P2P_OVERLAPS)
        self.m = plan.model
        bits = dtype_bytes(dtype)
        self.b = 2.0 if bits < 2 else bits  # activations and communication: bf16 under 8-bit training
        self.high = "bf16" if bits < 2 else dtype  # attention and the output layer
        self.casts = bits < 2  # 8-bit GEMMs: their 16-bit inputs are cast first (quantize)
        # The fraction of the chip's SMs a collective (NCCL's channels) and the dispatch kernel hold while they
        # overlap compute (dispatch.sm_share; 0 on chips without SMs)
        self.nccl_share = sm_share("nccl", topo.chip.sm_count)
        self.dispatch_share = sm_share(dispatch, topo.chip.sm_count, getattr(comm, "dispatch_sms", None))
        self._codes: dict = {}
        self._keys: dict = {}  # one candidate: the placement key of each group kind
        self.scalar = plan.shape == ()
        self.profile = None  # the calibration profile, when one is used (make_context)

    def mm(self, m, n, k, count=1.0, dtype: str | None = None):
        return matmul_time_s(m, n, k, self.topo.chip, dtype or self.dtype, self.eff, count)

    def mem(self, nbytes):
        return memory_time_s(nbytes, self.topo.chip, self.eff)

    def quantize(self, rows, forward_features, backward_features):
        """Time to cast a block's 16-bit GEMM inputs to the 8-bit ``dtype`` per unit of forward compute
        (``compute.quantize_bytes``); the blocks add it only where ``casts`` (an 8-bit dtype)."""
        return self.mem(quantize_bytes(rows, forward_features, backward_features, self.training))

    def _group(self, kind: str) -> tuple:
        """The degrees that place device 0's ``kind`` group (``_GROUP_IDS[kind]`` turns them into ids)."""
        p = self.plan
        if kind in ("tensor", "expert_tensor"):
            return (getattr(p, kind),)
        if kind == "expert":  # one device of each expert-tensor set
            return p.expert, p.expert_tensor
        if kind == "data":
            return p.data, p.fsdp * p.inner
        if kind == "fsdp":
            return p.fsdp, p.inner
        if kind == "context":
            return p.context, p.tensor
        if kind == "replicas":
            return p.data, p.fsdp * p.inner, p.context, p.tensor
        if kind == "pipeline":
            return p.pipeline, p.batch_block
        covered = p.fsdp * p.expert_block // np.maximum(p.expert_weight_shards, 1)  # fsdp ranks of one shard
        if kind == "expert_fsdp":  # the fsdp ranks splitting one expert group's experts further, one per shard
            return p.fsdp // np.maximum(covered, 1), covered * p.inner
        return p.batch_block, p.expert_block, p.inner, p.fsdp, covered  # expert_data: a shard's replicas

    def coll(self, op: str, nbytes, kind: str):
        """Collective time per candidate (the broadcast shape of ``nbytes`` and the group's degrees)."""
        if self.scalar and not isinstance(nbytes, np.ndarray):  # one candidate
            key = self._keys.get(kind)
            if key is None:
                key = self._keys[kind] = tuple(int(c) for c in self._group(kind))
            return _coll_one(self.topo, op, float(nbytes), kind, key, self.comm)
        return self._coll_grid(op, nbytes, kind)

    def dispatch_a2a(self, nbytes, token_bytes: float | None = None):
        """The expert all-to-all (dispatch or combine) of ``nbytes`` per device with the context's kernel
        (``token_bytes``: one copy's bytes, for the normal-style kernels' per-copy SM time)."""
        if self.dispatch == "nccl":
            return self.coll("all_to_all", nbytes, "expert")
        m = self.m
        experts, top_k = np.broadcast_arrays(m.num_experts, m.top_k)
        ep, etp = self.plan.expert, self.plan.expert_tensor
        shape = np.broadcast_shapes(np.shape(nbytes), np.shape(experts), np.shape(ep), np.shape(etp))
        size = np.broadcast_to(np.asarray(nbytes, dtype=float), shape)
        out = np.zeros(shape)
        keys = np.stack([np.broadcast_to(a, shape).reshape(-1) for a in (experts, top_k, ep, etp)], axis=1)
        unique, inverse = np.unique(keys, axis=0, return_inverse=True)
        for row, (e, k, ep_one, etp_one) in enumerate(unique):
            sel = inverse.reshape(-1) == row
            ids = _ids(self.topo, "expert", (int(ep_one), int(etp_one)))
            if ids is not None:
                out.reshape(-1)[sel] = _dispatch_s(self.topo, size.reshape(-1)[sel], ids, self.comm, self.dispatch,
                                                   int(e), int(k), m.route_node_limit, token_bytes)
        return float(out) if self.scalar and out.shape == () else out

    def _coll_grid(self, op: str, nbytes, kind: str):
        cols = self._group(kind)
        codes, groups = self._placements(kind, cols)
        shape = np.broadcast_shapes(np.shape(nbytes), codes.shape)
        size = np.broadcast_to(np.asarray(nbytes, dtype=float), shape).reshape(-1)
        codes = np.broadcast_to(codes, shape).reshape(-1)
        out = np.zeros(size.size)
        for key, sel in zip(groups, _members(codes, len(groups)), strict=True):
            if key is not None and sel.size:  # each distinct size once: the grid repeats them across knobs
                sizes, back = np.unique(size[sel], return_inverse=True)
                if sizes.any():  # nothing to send anywhere in the group: zero time
                    times = _coll_sizes(self.topo, op, kind, key, sizes.tobytes(), self.comm)
                    out[sel] = times[back.reshape(-1)]
        return out.reshape(shape)

    def _placements(self, kind: str, cols) -> tuple[np.ndarray, list]:
        """(placement index per grid point of the key's own shape, each placement's key: None where it has
        nothing to communicate), cached."""
        cached = self._codes.get(kind)
        if cached is None:
            keys, codes = distinct_rows(cols)
            groups = [tuple(int(x) for x in key) for key in keys]
            groups = [key if _ids(self.topo, kind, key) is not None else None for key in groups]
            cached = self._codes[kind] = (codes, groups)
        return cached


def _ids(topo: Topology, kind: str, key: tuple[int, ...]) -> np.ndarray | None:
    """Device ids of one placement, or None when there is nothing to communicate (one device, or an
    invalid grid point: a zero degree, a group beyond the topology)."""
    if min(key) < 1:
        return None
    ids = _GROUP_IDS[kind](*key)
    return None if ids.size < 2 or ids[-1] >= topo.num_devices else ids


def _dispatch_s(topo, size, ids, comm, kernel, experts, top_k, node_limit, token_bytes):
    """A dispatch kernel's time, or inf where the routing cannot be spread over this group (no valid layout)."""
    positive = size > 0
    out = np.zeros(size.shape)
    if not positive.any():
        return out
    try:
        routing = ExpertRouting(experts, top_k, node_limit, token_bytes)
        out[positive] = collective_cost(topo, "all_to_all", size[positive], ids, algorithm=kernel, params=comm,
                                        experts=routing).time_s
    except ValueError:
        out[positive] = np.inf
    return out


@lru_cache(maxsize=65536)
def _coll_one(topo: Topology, op: str, nbytes: float, kind: str, key: tuple[int, ...], comm: CommParams) -> float:
    """One candidate's collective (estimate()): memoised, since the same groups and sizes recur."""
    ids = _ids(topo, kind, key)
    return 0.0 if ids is None or nbytes <= 0 else collective_time_s(topo, op, nbytes, ids, params=comm)


@lru_cache(maxsize=4096)
def _coll_sizes(topo: Topology, op: str, kind: str, key: tuple[int, ...], sizes: bytes, comm: CommParams) -> np.ndarray:
    """A placement's collective times for distinct sizes (float64 bytes, ascending): memoised, since a search
    asks for the same groups and sizes in every piece and every search of a model."""
    ids = _ids(topo, kind, key)
    times = collective_cost(topo, op, np.frombuffer(sizes), ids, params=comm).time_s
    times.flags.writeable = False
    return times


def make_context(plan, topo, dtype, profile, routing, dispatch: str = "nccl",
                 kernels: Framework | None = None, training: bool = True) -> Context:
    eff = getattr(profile, "compute", None) or topo.chip.efficiency
    comm = getattr(profile, "comm", None) or DEFAULT_PARAMS
    ctx = Context(plan, topo, dtype, eff, comm, routing or Routing(), dispatch, kernels, training)
    ctx.profile = profile
    return ctx


# ------------------------------------------------------------------ grouping helpers
def distinct_rows(cols) -> tuple[np.ndarray, np.ndarray]:
    """The distinct rows of columns that broadcast together (non-negative integers), and the index of
    each grid point's row, shaped like the broadcast of the columns."""
    arrays = np.broadcast_arrays(*(np.asarray(c) for c in cols))
    shape = arrays[0].shape
    flat = [a.reshape(-1) for a in arrays]
    first, inverse = _distinct(flat)
    return np.stack([f[first] for f in flat], 1), inverse.reshape(shape)


def _members(inverse: np.ndarray, count: int) -> list[np.ndarray]:
    """Indices of each group j (inverse == j) from one stable sort instead of one scan per group."""
    if count == 1:
        return [np.arange(inverse.size)]
    small = inverse.astype(np.int16) if count < (1 << 15) else inverse  # NumPy radix-sorts 16-bit ints
    order = np.argsort(small, kind="stable")
    bounds = np.searchsorted(inverse[order], np.arange(count + 1))
    return [order[bounds[j]:bounds[j + 1]] for j in range(count)]


def _distinct(cols: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Index of a first row of each distinct row (columns of non-negative integers), and each row's
    distinct index: small columns radix directly, large ones are compacted first; no sort."""
    code = np.zeros(cols[0].shape[0], dtype=np.int64)
    for col in cols:
        col = col.astype(np.int64, copy=False)
        top = int(col.max()) + 1 if col.size else 1
        if top > 64:
            first, col = _dense_unique(col)
            top = first.size
        code = code * top + col
    return _dense_unique(code)


def _dense_unique(code: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(index of the first row of each distinct code, each row's distinct index) for non-negative
    integer codes; a lookup table instead of a sort when the codes are small enough."""
    top = int(code.max()) + 1 if code.size else 0
    if top > 4 * code.size + (1 << 20):
        _, first, inverse = np.unique(code, return_index=True, return_inverse=True)
        return first, np.asarray(inverse).reshape(-1)
    rep = np.full(top, -1, dtype=np.int64)
    rep[code[::-1]] = np.arange(code.size - 1, -1, -1)  # last write wins: the first occurrence
    present = rep >= 0
    slot = np.cumsum(present) - 1
    return rep[present], slot[code]
