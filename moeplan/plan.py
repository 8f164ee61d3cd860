"""Candidates as arrays, and evaluating formulas once per distinct combination of the knobs they read.

A ``Plan`` holds one entry per candidate layout / MoE configuration (structure of arrays). ``Context``
carries what is constant across a plan and looks collectives up once per distinct device-group
placement; ``on_distinct`` runs a per-layer formula once per distinct combination of the fields it
depends on and expands the result to every candidate. ``estimate`` writes the formulas; this module
only decides how often they run.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from moeplan import moe as M
from moeplan.collectives import DEFAULT_PARAMS, CommParams, collective_time_s
from moeplan.compute import matmul_time_s, memory_time_s
from moeplan.hardware import ComputeEfficiency
from moeplan.layout import RECOMPUTE, Layout, expert_weight_shards
from moeplan.routing import Routing
from moeplan.topology import Topology
from moeplan.units import dtype_bytes

_LAYOUT_FIELDS = ("data", "fsdp", "expert", "tensor", "pipeline", "virtual_pipeline", "micro_batch_size")

# ------------------------------------------------------------------ plans (structure of arrays)
@dataclass
class Plan:
    """Candidates as arrays: a model view (MoE fields may be arrays) and layout degrees per candidate."""

    model: M.ModelView
    data: np.ndarray
    fsdp: np.ndarray
    expert: np.ndarray
    tensor: np.ndarray
    pipeline: np.ndarray
    virtual_pipeline: np.ndarray
    micro_batch_size: np.ndarray
    recompute: np.ndarray  # index into layout.RECOMPUTE
    sequence_parallel: bool = True
    shard_optimizer: bool = True

    @property
    def size(self) -> int:
        return int(self.data.size)

    def take(self, idx: np.ndarray) -> Plan:
        """The candidates at ``idx`` (model fields that are per-candidate arrays are taken too)."""
        n = self.size
        over = {k: (np.asarray(v)[idx] if np.ndim(v) and np.size(v) == n else v)
                for k, v in self.model.overrides.items()}
        fields_ = {f: getattr(self, f)[idx] for f in _LAYOUT_FIELDS + ("recompute",)}
        return Plan(M.ModelView(self.model.base, **over), sequence_parallel=self.sequence_parallel,
                    shard_optimizer=self.shard_optimizer, **fields_)

    @classmethod
    def from_layout(cls, model: M.MoEModel, layout: Layout) -> Plan:
        arrays = {f: np.array([getattr(layout, f)], dtype=np.int64) for f in _LAYOUT_FIELDS}
        return cls(M.ModelView(model), recompute=np.array([RECOMPUTE.index(layout.recompute)]),
                   sequence_parallel=layout.sequence_parallel, shard_optimizer=layout.shard_optimizer, **arrays)

    @property
    def batch_shards(self) -> np.ndarray:
        return self.data * self.fsdp

    @property
    def batch_block(self) -> np.ndarray:
        return self.data * self.fsdp * self.tensor

    @cached_property
    def expert_weight_shards(self) -> np.ndarray:
        return expert_weight_shards(self.expert, self.tensor, self.data, self.fsdp)

    @property
    def dense_weight_shards(self) -> np.ndarray:
        return self.fsdp * self.tensor


class Context:
    """Everything constant across a plan's candidates, plus the grouped collective lookups."""

    def __init__(self, plan: Plan, topo: Topology, dtype: str, eff: ComputeEfficiency, comm: CommParams,
                 routing: Routing) -> None:
        self.plan, self.topo, self.dtype, self.eff, self.comm, self.routing = plan, topo, dtype, eff, comm, routing
        self.m = plan.model
        bits = dtype_bytes(dtype)
        self.b = 2.0 if bits < 2 else bits  # activations and communication: bf16 under 8-bit training
        self.high = "bf16" if bits < 2 else dtype  # attention and the output layer
        self.n = plan.size
        self._ids_cache: dict = {}
        self._placement_cache: dict = {}

    def mm(self, m, n, k, count=1.0, dtype: str | None = None) -> np.ndarray:
        return matmul_time_s(m, n, k, self.topo.chip, dtype or self.dtype, self.eff, count)

    def mem(self, nbytes) -> np.ndarray:
        return memory_time_s(nbytes, self.topo.chip, self.eff)

    def _group(self, kind: str) -> tuple[np.ndarray, callable]:
        p = self.plan
        dt = p.data * p.tensor
        if kind == "tensor":
            return p.tensor[:, None], lambda k: np.arange(k[0])
        if kind == "expert":
            return p.expert[:, None], lambda k: np.arange(k[0])
        if kind == "data":
            return np.stack([p.data, p.tensor], 1), lambda k: np.arange(k[0]) * k[1]
        if kind == "fsdp":
            return np.stack([p.fsdp, dt], 1), lambda k: np.arange(k[0]) * k[1]
        if kind == "pipeline":
            return np.stack([p.pipeline, p.fsdp * dt], 1), lambda k: np.array([0, k[1]]) if k[0] > 1 else np.array([0])
        edp = p.batch_block // p.expert_weight_shards  # expert_data: replicas of one expert shard
        return np.stack([p.batch_block, p.expert, edp], 1), lambda k: np.arange(0, k[0], k[1])[: k[2]]

    def _coll_one(self, op: str, nbytes: float, kind: str) -> float:
        """The single-candidate path of ``coll`` (estimate()): plain Python on the group key."""
        if nbytes <= 0:
            return 0.0
        key = tuple(int(x) for x in self._group_key_one(kind))
        ids = self._ids_cache.get((kind, key))
        if ids is None:
            ids = self._ids_cache[(kind, key)] = self._group(kind)[1](key)
        if ids.size < 2:
            return 0.0
        return float(collective_time_s(self.topo, op, nbytes, ids, params=self.comm))

    def _group_key_one(self, kind: str) -> list[int]:
        p = self.plan
        d, f, t, e = int(p.data[0]), int(p.fsdp[0]), int(p.tensor[0]), int(p.expert[0])
        return {"tensor": [t], "expert": [e], "data": [d, t], "fsdp": [f, d * t],
                "pipeline": [int(p.pipeline[0]), f * d * t],
                "expert_data": [d * f * t, e, d * f * t // int(p.expert_weight_shards[0])]}[kind]

    def coll(self, op: str, nbytes, kind: str) -> np.ndarray:
        """Collective time per candidate, computed once per distinct group placement."""
        if self.n == 1:
            return np.array([self._coll_one(op, float(np.ravel(nbytes)[0]), kind)])
        nbytes = np.broadcast_to(np.asarray(nbytes, dtype=float), (self.n,))
        out = np.zeros(self.n)
        if not nbytes.any():
            return out
        for ids, sel in self._placements(kind):
            out[sel] = collective_time_s(self.topo, op, nbytes[sel], ids, params=self.comm)
        return np.where(nbytes > 0, out, 0.0)

    def _placements(self, kind: str) -> list[tuple[np.ndarray, np.ndarray]]:
        """(device ids, candidate indices) per distinct group placement of ``kind``, computed once."""
        cached = self._placement_cache.get(kind)
        if cached is None:
            cols, ids_of = self._group(kind)
            keys, inverse = unique_rows(cols)
            cached = [(ids_of(keys[j]), sel) for j, sel in enumerate(_members(inverse, len(keys)))]
            cached = self._placement_cache[kind] = [(ids, sel) for ids, sel in cached if ids.size >= 2]
        return cached


def make_context(plan, topo, dtype, profile, routing) -> Context:
    eff = getattr(profile, "compute", None) or topo.chip.efficiency
    comm = getattr(profile, "comm", None) or DEFAULT_PARAMS
    return Context(plan, topo, dtype, eff, comm, routing or Routing())


def _members(inverse: np.ndarray, count: int) -> list[np.ndarray]:
    """Indices of each group j (inverse == j) from one stable sort instead of one scan per group."""
    small = inverse.astype(np.int16) if count < (1 << 15) else inverse  # NumPy radix-sorts 16-bit ints
    order = np.argsort(small, kind="stable")
    bounds = np.searchsorted(inverse[order], np.arange(count + 1))
    return [order[bounds[j]:bounds[j + 1]] for j in range(count)]


def unique_rows(cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """np.unique(cols, axis=0, return_inverse=True) for small non-negative integer columns, fast:
    each row is packed into one int64 (mixed radix) before the 1-D unique."""
    cols = np.asarray(cols)
    if cols.shape[0] == 1:
        return cols, np.zeros(1, dtype=np.int64)
    ints = np.rint(cols).astype(np.int64)
    if ints.min() < 0 or not np.array_equal(ints, cols):
        uniq, inverse = np.unique(cols, axis=0, return_inverse=True)
        return uniq, np.asarray(inverse).reshape(-1)
    code = np.zeros(ints.shape[0], dtype=np.int64)
    for j in range(ints.shape[1]):
        code = code * (int(ints[:, j].max()) + 1) + ints[:, j]
    first, inverse = _dense_unique(code)
    return cols[first], inverse


_MODEL_ARRAYS = ("num_experts", "top_k", "capacity_factor", "moe_every", "expert_d_ff")


def on_distinct(ctx: Context, keys: tuple[str, ...], fn) -> dict[str, np.ndarray]:
    """Run ``fn`` once per distinct combination of ``keys`` (plan or model fields) and expand the
    result to every candidate. ``fn`` must depend on no other per-candidate field; the
    vectorised-vs-scalar test would catch one that does."""
    if ctx.n == 1:
        return fn(ctx)
    cols = []
    for k in keys:
        if k == "capacity_factor":  # float, NaN = dropless: exact to 6 decimals as integers
            cf = ctx.m.capacity_factor_array
            value = np.where(np.isnan(cf), 0, np.rint(np.nan_to_num(cf) * 1e6) + 1).astype(np.int64)
        else:
            value = np.asarray(getattr(ctx.m, k) if k in _MODEL_ARRAYS else getattr(ctx.plan, k))
        cols.append(np.broadcast_to(value, (ctx.n,)))
    first, inverse = _distinct(cols)
    sub = Context(ctx.plan.take(first), ctx.topo, ctx.dtype, ctx.eff, ctx.comm, ctx.routing)
    out = fn(sub)
    return {k: (np.asarray(v)[inverse] if np.ndim(v) else v) for k, v in out.items()}


def _distinct(cols: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Index of a first row of each distinct row (columns of non-negative integers), and each row's
    distinct index: small columns radix directly, large ones are compacted first; no sort."""
    code = np.zeros(cols[0].shape[0], dtype=np.int64)
    for col in cols:
        top = int(col.max()) + 1
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
