"""Layout search: every combination of MoE configuration and parallelism scored at once, as arrays.

A ``SearchSpace`` lists the values to try for each knob (None = the model's own value, or a default
drawn from the topology). Candidates are the Cartesian product, filtered by divisibility (vectorised
``layout.check_layout``), scored by ``estimate.plan_costs`` (the same formulas ``estimate()`` uses, on
arrays), given a loss estimate by a ``quality`` law, filtered by ``Constraints`` and ranked by the
objective. The Pareto front is over (predicted loss, step time). Pure: no I/O here.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import numpy as np

from moeplan import moe as M
from moeplan.estimate import plan_costs
from moeplan.layout import RECOMPUTE, Layout
from moeplan.plan import Plan
from moeplan.quality import QualityLaw, default_law
from moeplan.routing import Routing
from moeplan.topology import SWITCHED, Topology

OBJECTIVES = ("step_time", "tokens_per_s", "cost_per_token", "quality", "quality_per_time")
_MODEL_KNOBS = ("num_experts", "top_k", "capacity_factor", "moe_every", "expert_d_ff")
_LAYOUT_KNOBS = ("expert", "tensor", "pipeline", "fsdp", "virtual_pipeline", "micro_batch_size", "recompute")


@dataclass
class SearchSpace:
    """Values to try per knob; None takes the model's value (MoE knobs) or a topology default."""

    num_experts: list[int] | None = None
    top_k: list[int] | None = None
    capacity_factor: list[float | None] | None = None  # None inside the list = dropless
    moe_every: list[int] | None = None
    expert_d_ff: list[int] | None = None
    expert: list[int] | None = None
    tensor: list[int] | None = None
    pipeline: list[int] | None = None
    fsdp: list[int] | None = None
    virtual_pipeline: list[int] | None = None
    micro_batch_size: list[int] | None = None
    recompute: list[str] | None = None

    def resolved(self, model: M.MoEModel, topo: Topology) -> dict[str, list]:
        n = topo.num_devices
        powers = [2**i for i in range(int(math.log2(n)) + 1) if n % 2**i == 0]
        per_node = topo.node.devices_per_node if topo.kind == SWITCHED else 8
        defaults = {
            "num_experts": [model.num_experts], "top_k": [model.top_k], "capacity_factor": [model.capacity_factor],
            "moe_every": [model.moe_every], "expert_d_ff": [model.expert_d_ff],
            "expert": [p for p in powers if p <= model.num_experts * 4],
            "tensor": [p for p in powers if p <= min(per_node, 8)],
            "pipeline": [p for p in powers if p <= 8],
            "fsdp": [1] if topo.kind == SWITCHED else powers,
            "virtual_pipeline": [1], "micro_batch_size": [1, 2, 4], "recompute": ["selective", "full"],
        }
        out = {}
        for f in fields(self):
            values = getattr(self, f.name)
            values = defaults[f.name] if values is None else list(values)
            if not values:
                raise ValueError(f"space.{f.name}: got an empty list; expected at least one value")
            out[f.name] = values
        for knob in ("recompute",):
            bad = [v for v in out[knob] if v not in RECOMPUTE]
            if bad:
                raise ValueError(f"space.recompute: got {bad}; expected values from {list(RECOMPUTE)}")
        return out


@dataclass
class Constraints:
    require_fit: bool = True
    max_drop_rate: float | None = None
    max_step_time_s: float | None = None
    min_tokens_per_s: float | None = None


@dataclass
class Candidate:
    model: M.MoEModel
    layout: Layout
    step_time_s: float
    tokens_per_s: float
    loss: float
    memory_per_device_bytes: float
    fits: bool
    drop_rate: float
    mfu: float
    cost_per_token_device_s: float


@dataclass
class SearchResult:
    best: Candidate | None
    pareto: list[Candidate]
    table: list[dict]  # ranked, best first; one flat row per kept candidate
    evaluated: int  # candidate configurations scored
    considered: int  # before divisibility filtering
    objective: str
    details: dict = field(default_factory=dict)


def _grid(space: dict[str, list]) -> dict[str, np.ndarray]:
    """Cartesian product of the knobs as flat arrays (capacity factor None -> NaN, recompute -> index)."""
    knobs = list(_MODEL_KNOBS + _LAYOUT_KNOBS)
    axes = []
    for k in knobs:
        values = space[k]
        if k == "capacity_factor":
            values = [np.nan if v is None else float(v) for v in values]
        elif k == "recompute":
            values = [RECOMPUTE.index(v) for v in values]
        axes.append(np.asarray(values))
    mesh = np.meshgrid(*axes, indexing="ij")
    return {k: a.reshape(-1) for k, a in zip(knobs, mesh, strict=True)}


def _valid(g: dict[str, np.ndarray], model: M.MoEModel, topo: Topology, gbt: int) -> np.ndarray:
    """Vectorised layout.check_layout plus batch divisibility."""
    n = topo.num_devices
    rest = g["fsdp"] * g["tensor"] * g["pipeline"]
    data = np.where(n % rest == 0, n // np.maximum(rest, 1), 0)
    g["data"] = data
    block = data * g["fsdp"] * g["tensor"]
    seqs = gbt // model.seq_len
    shards = np.maximum(data * g["fsdp"], 1)
    ok = (data >= 1) & (g["num_experts"] % g["expert"] == 0) & (block % g["expert"] == 0)
    ok &= (g["top_k"] <= g["num_experts"]) & (model.n_heads % g["tensor"] == 0)
    ok &= (model.n_kv_heads % g["tensor"] == 0) | (g["tensor"] % model.n_kv_heads == 0)
    ok &= (g["expert_d_ff"] % g["tensor"] == 0) & ((model.d_ff % g["tensor"] == 0) | (model.d_ff == 0))
    ok &= g["pipeline"] * g["virtual_pipeline"] <= model.n_layers
    ok &= (g["virtual_pipeline"] == 1) | (g["pipeline"] > 1)
    moe_layers = M.layer_census(model.n_layers, g["moe_every"], model.first_dense_layers, model.encoder_decoder)
    ok &= (model.d_ff > 0) | (moe_layers == model.n_layers)  # dense blocks need a dense FFN width
    ok &= (gbt % model.seq_len == 0) & (seqs % shards == 0)
    ok &= ((seqs // shards) % g["micro_batch_size"] == 0) & (seqs // shards >= g["micro_batch_size"])
    return ok


def _plan(g: dict[str, np.ndarray], sel: np.ndarray, model: M.MoEModel) -> Plan:
    view = M.ModelView(model, **{k: g[k][sel] for k in ("num_experts", "top_k", "moe_every", "expert_d_ff")},
                       capacity_factor=g["capacity_factor"][sel])
    return Plan(view, data=g["data"][sel], fsdp=g["fsdp"][sel], expert=g["expert"][sel], tensor=g["tensor"][sel],
                pipeline=g["pipeline"][sel], virtual_pipeline=g["virtual_pipeline"][sel],
                micro_batch_size=g["micro_batch_size"][sel], recompute=g["recompute"][sel])


def search(model: M.MoEModel, topo: Topology, space: SearchSpace | None = None, *, global_batch_tokens: int,
           objective: str = "quality_per_time", constraints: Constraints | None = None, dtype: str = "bf16",
           routing: Routing | None = None, overlap: str = "dp", quality: QualityLaw | None = None,
           time_budget_s: float = 30 * 86400.0, top: int = 100, chunk: int = 200_000,
           progress: Callable[[int, int], None] | bool = False) -> SearchResult:
    """Score every candidate of ``space`` and rank by ``objective`` (see the module docstring).

    ``quality_per_time`` ranks by the loss reachable in ``time_budget_s`` of training at the
    candidate's throughput; ``quality`` by the loss at a fixed ``time_budget_s`` x the *best*
    throughput (so only the model changes); ``cost_per_token`` by device-seconds per token.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective: got {objective!r}; expected one of {list(OBJECTIVES)}")
    constraints = constraints or Constraints()
    law = quality or default_law()
    resolved = (space or SearchSpace()).resolved(model, topo)
    grid = _grid(resolved)
    considered = grid["expert"].size
    ok = _valid(grid, model, topo, global_batch_tokens)
    index = np.flatnonzero(ok)
    report = _progress(progress)
    parts = []
    for start in range(0, index.size, chunk):
        sel = index[start:start + chunk]
        costs = plan_costs(_plan(grid, sel, model), topo, global_batch_tokens, dtype, None, routing, overlap)
        parts.append((sel, costs))
        report(min(start + chunk, index.size), index.size)
    keys = ("step_time_s", "tokens_per_s", "mfu", "memory_per_device_bytes", "drop_rate", "fits")
    scored = {k: np.concatenate([np.broadcast_to(c[k], s.shape) for s, c in parts]) if parts else np.zeros(0)
              for k in keys}
    sel = np.concatenate([s for s, _ in parts]) if parts else np.zeros(0, dtype=np.int64)
    view = M.ModelView(model, **{k: grid[k][sel] for k in ("num_experts", "top_k", "moe_every", "expert_d_ff")},
                       capacity_factor=grid["capacity_factor"][sel])
    tokens_trained = scored["tokens_per_s"] * time_budget_s * (1.0 - scored["drop_rate"])
    if objective == "quality" and tokens_trained.size:
        tokens_trained = np.full_like(tokens_trained, tokens_trained.max())
    loss = law.loss(view, tokens_trained) if sel.size else np.zeros(0)
    keep = _constraints(scored, constraints)
    score = _objective(objective, scored, loss, topo)
    ranked = np.argsort(score, kind="stable")
    order = ranked[keep[ranked]][:top]
    candidates = [_candidate(model, grid, sel, scored, loss, topo, i) for i in order]
    fastest = by_time(scored["step_time_s"], loss, keep)
    front = pareto_front(loss, scored["step_time_s"], keep, order=fastest)
    pareto = [_candidate(model, grid, sel, scored, loss, topo, i) for i in front]
    table = [_row(c) for c in candidates]
    heat = _heatmap(resolved, grid, sel, scored["step_time_s"], fastest)
    return SearchResult(candidates[0] if candidates else None, pareto, table, int(sel.size), int(considered), objective,
                        {"kept": int(keep.sum()), "quality_law": law.name, "time_budget_s": time_budget_s,
                         "heatmap": heat, "global_batch_tokens": global_batch_tokens})


def _heatmap(space: dict[str, list], grid, sel, step, by_time: np.ndarray) -> dict:
    """Best kept step time per (num_experts, capacity_factor); NaN where nothing was kept.
    ``by_time``: the kept candidates, fastest first."""
    experts = sorted(set(space["num_experts"]))
    cfs = sorted({0.0 if c is None else float(c) for c in space["capacity_factor"]})
    e_of = np.searchsorted(experts, grid["num_experts"][sel])
    c_of = np.searchsorted(cfs, np.nan_to_num(grid["capacity_factor"][sel], nan=0.0))
    cell = c_of * len(experts) + e_of
    best = np.full(len(cfs) * len(experts), np.nan)
    slowest_first = by_time[::-1]  # the fastest of each cell is written last
    best[cell[slowest_first]] = step[slowest_first]
    table = best.reshape(len(cfs), len(experts))
    labels = ["dropless" if c == 0.0 else f"{c:g}" for c in cfs]
    return {"num_experts": experts, "capacity_factor": labels, "step_time_s": table.tolist()}


def _constraints(s: dict[str, np.ndarray], c: Constraints) -> np.ndarray:
    keep = np.isfinite(s["step_time_s"])
    if c.require_fit:
        keep &= s["fits"].astype(bool)
    if c.max_drop_rate is not None:
        keep &= s["drop_rate"] <= c.max_drop_rate
    if c.max_step_time_s is not None:
        keep &= s["step_time_s"] <= c.max_step_time_s
    if c.min_tokens_per_s is not None:
        keep &= s["tokens_per_s"] >= c.min_tokens_per_s
    return keep


def _objective(name: str, s: dict[str, np.ndarray], loss: np.ndarray, topo: Topology) -> np.ndarray:
    if name == "step_time":
        return s["step_time_s"]
    if name == "tokens_per_s":
        return -s["tokens_per_s"]
    if name == "cost_per_token":
        return topo.num_devices / s["tokens_per_s"]
    return loss + 1e-12 * s["step_time_s"]  # quality, quality_per_time: ties go to the faster layout


def by_time(time_s: np.ndarray, loss: np.ndarray, keep: np.ndarray | None = None) -> np.ndarray:
    """Indices of the kept points, fastest first, equal times by lower loss."""
    idx = np.flatnonzero(np.ones(time_s.size, bool) if keep is None else keep)
    order = idx[np.argsort(time_s[idx], kind="stable")]
    t = time_s[order]
    if np.any(t[1:] == t[:-1]):  # ties in time: the lower loss must come first
        order = idx[np.lexsort((loss[idx], time_s[idx]))]
    return order


def pareto_front(loss: np.ndarray, time_s: np.ndarray, keep: np.ndarray | None = None,
                 order: np.ndarray | None = None) -> list[int]:
    """Indices of the non-dominated (loss, time) points among ``keep``, fastest first.

    A point is dominated when another is no worse in both and better in one. Sort by time (then
    loss) and keep each point whose loss beats every faster point's. ``order`` = ``by_time(...)``
    when the caller has it already.
    """
    order = by_time(time_s, loss, keep) if order is None else order
    ranked = loss[order]
    faster_best = np.concatenate([[math.inf], np.minimum.accumulate(ranked)[:-1]])
    return [int(i) for i in order[ranked < faster_best]]


def _candidate(model, grid, sel, scored, loss, topo, i) -> Candidate:
    j = sel[i]
    cf = grid["capacity_factor"][j]
    m = model.with_(num_experts=int(grid["num_experts"][j]), top_k=int(grid["top_k"][j]),
                    moe_every=int(grid["moe_every"][j]), expert_d_ff=int(grid["expert_d_ff"][j]),
                    capacity_factor=None if np.isnan(cf) else float(cf))
    layout = Layout(data=int(grid["data"][j]), fsdp=int(grid["fsdp"][j]), expert=int(grid["expert"][j]),
                    tensor=int(grid["tensor"][j]), pipeline=int(grid["pipeline"][j]),
                    virtual_pipeline=int(grid["virtual_pipeline"][j]),
                    micro_batch_size=int(grid["micro_batch_size"][j]), recompute=RECOMPUTE[int(grid["recompute"][j])])
    tps = float(scored["tokens_per_s"][i])
    return Candidate(m, layout, float(scored["step_time_s"][i]), tps, float(loss[i]),
                     float(scored["memory_per_device_bytes"][i]), bool(scored["fits"][i]),
                     float(scored["drop_rate"][i]), float(scored["mfu"][i]), topo.num_devices / tps)


def _row(c: Candidate) -> dict:
    row = {k: getattr(c.model, k) for k in _MODEL_KNOBS}
    row.update({k: getattr(c.layout, k) for k in ("data",) + _LAYOUT_KNOBS})
    row.update(step_time_s=c.step_time_s, tokens_per_s=c.tokens_per_s, loss=c.loss, mfu=c.mfu,
               memory_per_device_bytes=c.memory_per_device_bytes, fits=c.fits, drop_rate=c.drop_rate,
               cost_per_token_device_s=c.cost_per_token_device_s)
    return row


def _progress(progress) -> Callable[[int, int], None]:
    if callable(progress):
        return progress
    if not progress:
        return lambda done, total: None

    def bar(done: int, total: int) -> None:
        width = 30
        filled = width * done // max(total, 1)
        sys.stderr.write(f"\r  scoring [{'#' * filled}{'.' * (width - filled)}] {done:,}/{total:,}")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return bar

