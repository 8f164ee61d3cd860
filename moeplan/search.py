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
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from moeplan import bounds
from moeplan import grid as G
from moeplan import moe as M
from moeplan.cost import load_prices, usd_to_device_hours
from moeplan.dispatch import KERNELS
from moeplan.estimate import HBM_RESERVE, check_inputs, plan_costs
from moeplan.frameworks import framework as framework_preset
from moeplan.layout import OFFLOADS, RECOMPUTE, Layout
from moeplan.quality import QualityLaw, default_law, law_loss
from moeplan.routing import Routing
from moeplan.topology import SWITCHED, Topology

OBJECTIVES = ("step_time", "tokens_per_s", "cost_per_token", "cost", "quality", "quality_per_time")


@dataclass
class SearchSpace:
    """Values to try per knob; None takes the model's value (MoE knobs) or a topology default."""

    num_experts: list[int] | None = None
    top_k: list[int] | None = None
    capacity_factor: list[float | None] | None = None  # None inside the list = dropless
    moe_every: list[int] | None = None
    expert_d_ff: list[int] | None = None
    expert: list[int] | None = None
    expert_tensor: list[int] | None = None  # expert-tensor parallel degrees (default [1]: whole experts)
    tensor: list[int] | None = None
    context: list[int] | None = None  # context parallel degrees (default [1])
    pipeline: list[int] | None = None
    fsdp: list[int] | None = None
    virtual_pipeline: list[int] | None = None
    micro_batch_size: list[int] | None = None
    recompute: list[str] | None = None
    d_model: list[int] | None = None  # model shape knobs (the model reshaped: heads and widths scale)
    n_layers: list[int] | None = None
    keep_active: bool = False  # expert width = the model's top_k x expert_d_ff / top_k: active size constant

    def shapes(self, model: M.MoEModel) -> list[M.MoEModel]:
        """The model at every (d_model, n_layers) of the space; [model] when neither is given."""
        for name in ("d_model", "n_layers"):
            values = getattr(self, name)
            if values is not None and (not values or any(isinstance(v, bool) or int(v) != v or v < 1
                                                         for v in values)):
                raise ValueError(f"space.{name}: got {values!r}; expected a non-empty list of integers >= 1")
        return [model.reshaped(int(d), int(n)) for d in (self.d_model or [model.d_model])
                for n in (self.n_layers or [model.n_layers])]

    def resolved(self, model: M.MoEModel, topo: Topology) -> dict[str, list]:
        n = topo.num_devices
        powers = [2**i for i in range(int(math.log2(n)) + 1) if n % 2**i == 0]
        per_node = topo.node.devices_per_node if topo.kind == SWITCHED else 8
        defaults = {
            "num_experts": [model.num_experts], "top_k": [model.top_k], "capacity_factor": [model.capacity_factor],
            "moe_every": [model.moe_every], "expert_d_ff": [model.expert_d_ff],
            "expert": [p for p in powers if p <= model.num_experts * 4], "expert_tensor": [1],
            "tensor": [p for p in powers if p <= min(per_node, 8)], "context": [1],
            "pipeline": [p for p in powers if p <= min(model.n_layers, 64)],
            # GPUs: no FSDP, hybrid sharding inside a node, FSDP over every device (PyTorch FSDP/HSDP, Megatron's
            # distributed optimizer); TPUs: every power of two (MaxText's ici_fsdp_parallelism)
            "fsdp": sorted({1, min(per_node, n), n}) if topo.kind == SWITCHED else powers,
            "virtual_pipeline": [1, 2], "micro_batch_size": [1, 2, 4], "recompute": ["selective", "full"],
        }
        if self.keep_active and self.expert_d_ff is not None:
            raise ValueError("space.expert_d_ff: give either expert widths or keep_active=True, not both")
        out = {}
        for name in G.KNOBS:
            values = getattr(self, name)
            values = defaults[name] if values is None else list(values)
            if not values:
                raise ValueError(f"space.{name}: got an empty list; expected at least one value")
            out[name] = values
        for knob in ("recompute",):
            bad = [v for v in out[knob] if not isinstance(v, str) or v not in RECOMPUTE]
            if bad:
                raise ValueError(f"space.recompute: got {bad}; expected values from {list(RECOMPUTE)}")
        for knob, values in out.items():  # the documented ranges (bounds.py), as MoEModel and Layout check them
            for v in values:
                if knob == "capacity_factor":
                    if v is not None:
                        bounds.check_number("space.capacity_factor (None = dropless)", v, *bounds.CAPACITY_FACTOR)
                elif knob != "recompute":
                    bounds.check_int(f"space.{knob}", v, *(bounds.MODEL.get(knob) or bounds.LAYOUT[knob]))
        self._reject_inapplicable(out, model, n, topo)
        return out

    def _reject_inapplicable(self, out: dict[str, list], model: M.MoEModel, devices: int, topo: Topology) -> None:
        """A value the user gave that no candidate can use is an error naming it, never silently dropped."""
        reasons = {
            "tensor": lambda v: devices % v and f"does not divide the {devices} devices" or model.n_heads % v and (
                f"does not divide the model's {model.n_heads} heads"),
            "pipeline": lambda v: devices % v and f"does not divide the {devices} devices" or v > model.n_layers and (
                f"is more stages than the model's {model.n_layers} layers"),
            "fsdp": lambda v: devices % v and f"does not divide the {devices} devices",
            "context": lambda v: devices % v and f"does not divide the {devices} devices" or v > 1 and (
                model.seq_len % (2 * v)) and f"leaves no two equal chunks per device of seq_len {model.seq_len}",
            "expert_tensor": lambda v: devices % v and f"does not divide the {devices} devices" or v > 1 and all(
                w % v for w in out["expert_d_ff"]) and f"divides none of the expert widths {out['expert_d_ff']}",
            "expert": lambda v: devices % v and f"does not divide the {devices} devices" or all(
                e % v for e in out["num_experts"]) and f"divides none of the expert counts {out['num_experts']}",
            "virtual_pipeline": lambda v: v > 1 and max(out["pipeline"]) == 1 and "needs a pipeline of 2 or more",
            "recompute": lambda v: v in OFFLOADS and topo.host_link is None and (
                f"needs a link to host memory, which {topo.family} does not state"),
        }
        for knob, why in reasons.items():
            if getattr(self, knob) is None:
                continue  # defaults are chosen to apply
            for v in out[knob]:
                reason = why(v)
                if reason:
                    raise ValueError(f"space.{knob}: {v} {reason}; expected values some layout can use")


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
    loss_low: float = math.nan  # the loss interval (equal to loss for a user law without one)
    loss_high: float = math.nan
    in_range: bool = False  # inside every fitted range the quality law relies on
    usd_per_million_tokens: float | None = None  # at the family's list price (cost.load_prices), when it has one

    def row(self) -> dict:
        """One flat row (model knobs and shape, layout, scores): the ranked table's, the CLI's and the CSV's."""
        row = {k: getattr(self.model, k) for k in (*G.MODEL_KNOBS, "d_model", "n_layers")}
        row.update({k: getattr(self.layout, k) for k in ("data",) + G.LAYOUT_KNOBS})
        row.update(step_time_s=self.step_time_s, tokens_per_s=self.tokens_per_s, loss=self.loss, mfu=self.mfu,
                   memory_per_device_bytes=self.memory_per_device_bytes, fits=self.fits, drop_rate=self.drop_rate,
                   cost_per_token_device_s=self.cost_per_token_device_s, loss_low=self.loss_low,
                   loss_high=self.loss_high, in_range=self.in_range, usd_per_million_tokens=self.usd_per_million_tokens)
        return row


@dataclass
class SearchResult:
    best: Candidate | None
    pareto: list[Candidate]
    table: list[dict]  # ranked, best first; one flat row per kept candidate
    evaluated: int  # candidate configurations scored
    considered: int  # before divisibility filtering
    objective: str
    details: dict = field(default_factory=dict)
    configurations: list[Candidate] = field(default_factory=list)  # distinct MoE configurations, ranked, each
    # with its best layout


@dataclass
class _Scored:
    """One piece of the grid, scored: full-grid arrays flattened, and the piece's knobs."""

    grid: dict[str, np.ndarray]
    index: np.ndarray  # global flat index per point
    ok: np.ndarray
    keep: np.ndarray
    values: dict[str, np.ndarray]
    tokens_trained: np.ndarray
    drop_rate: np.ndarray  # as the cost model gives it: broadcasts to the grid, over the axes it depends on
    model_no: int = 0  # which model shape of the search this piece belongs to

    def pick(self, i: np.ndarray, quality: dict[str, np.ndarray], score: np.ndarray) -> list[dict]:
        """Records (knobs, scores, quality, global index) of the points ``i`` of this piece; ``quality``
        holds arrays that broadcast to the piece's grid."""
        shape = G.shape_of(self.grid)
        where = np.unravel_index(i, shape)
        at = {k: np.broadcast_to(v, shape)[where] for k, v in (*self.grid.items(), *quality.items())
              if k != "in_range"}
        half = at.pop("half_width")
        at["in_range"] = quality["in_range"](at, i)  # the law's ranges, checked at the picked points only
        return [{"index": int(self.index[j]), "model_no": self.model_no, "score": float(score[j]),
                 "loss": float(at["loss"][n]),
                 "loss_low": float(at["loss"][n] - half[n]), "loss_high": float(at["loss"][n] + half[n]),
                 "in_range": bool(at["in_range"][n]), **{k: at[k][n] for k in ("data",) + G.KNOBS},
                 **{k: v[j] for k, v in self.values.items()}}
                for n, j in enumerate(i.tolist())]


def _score_piece(piece, index, model, topo, gbt, constraints, dtype, routing, overlap, budget_s,
                 model_no: int = 0, dispatch: str = "nccl", kernels=None,
                 hbm_reserve: float = HBM_RESERVE, profile=None) -> _Scored:
    grid = dict(piece)
    ok = G.valid(grid, model, topo, gbt)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        costs = plan_costs(G.plan_of(grid, model), topo, gbt, dtype, profile, routing, overlap, breakdown=False,
                           dispatch=dispatch, kernels=kernels, hbm_reserve=hbm_reserve)
    shape = ok.shape
    values = {k: np.broadcast_to(costs[k], shape).reshape(-1) for k in _SCORES}
    ok = (ok & costs["valid"]).reshape(-1)
    keep = ok & _constraints(values, constraints)
    tokens_trained = values["tokens_per_s"] * budget_s  # dropped tokens cost quality through the law's retention
    return _Scored(grid, index, ok, keep, values, tokens_trained, np.asarray(costs["drop_rate"], dtype=float),
                   model_no)


_SCORES = ("step_time_s", "tokens_per_s", "mfu", "memory_per_device_bytes", "drop_rate", "fits")


def search(model: M.MoEModel, topo: Topology, space: SearchSpace | None = None, *, global_batch_tokens: int,
           objective: str = "quality_per_time", constraints: Constraints | None = None, dtype: str = "bf16",
           routing: Routing | None = None, overlap: str | None = None, quality: QualityLaw | None = None,
           time_budget_s: float = 30 * 86400.0, device_hours: float | None = None, top: int = 100,
           chunk: int = 1_000_000, max_points: int = bounds.SEARCH_POINTS,
           progress: Callable[[int, int], None] | bool = False, dispatch: str | None = None,
           framework: str | None = None, hbm_reserve: float = HBM_RESERVE, profile=None,
           budget_usd: float | None = None, provider: str | None = None) -> SearchResult:
    """Score every candidate of ``space`` and rank by ``objective`` (see the module docstring).

    ``quality_per_time`` is the compute-optimal objective: the lowest loss reachable within the budget,
    ``time_budget_s`` of training (or ``device_hours`` over this topology's devices) at the candidate's
    throughput; with ``space.d_model`` / ``space.n_layers`` it also picks the model's shape. ``quality``
    ranks by the loss at a fixed budget x the *best* throughput (so only the model changes);
    ``cost_per_token`` by device-seconds per token, ``cost`` by dollars per token at the family's list price
    (``provider``'s, else the lowest; candidates carry ``usd_per_million_tokens``); ``budget_usd`` is a money
    budget, turned into device-hours at that price. The grid is scored in pieces of about ``chunk``
    points; each piece keeps its best ``top``, its Pareto front and its heatmap cells, and the pieces
    merge exactly (also across model shapes). ``framework``, ``overlap``, ``dispatch`` and ``profile`` (a
    calibration profile: its compute efficiencies and collective parameters) as in ``estimate``.
    """
    preset = framework_preset(framework or "megatron")
    bounds.check_number("hbm_reserve", hbm_reserve, 0.0, 0.9)
    overlap = preset.overlap if overlap is None else overlap
    dispatch = preset.dispatch if dispatch is None else dispatch
    if objective not in OBJECTIVES:
        raise ValueError(f"objective: got {objective!r}; expected one of {list(OBJECTIVES)}")
    if dispatch not in KERNELS:
        raise ValueError(f"dispatch: got {dispatch!r}; expected one of {list(KERNELS)}")
    check_inputs(model, topo, None, profile, routing)
    money = _price(topo, provider)
    if budget_usd is not None:
        if device_hours is not None:
            raise ValueError("budget_usd: give a money budget or device_hours, not both")
        bounds.check_number("budget_usd", budget_usd, 1e-6, 1e15)
        device_hours = usd_to_device_hours(budget_usd, topo.family, provider)
    budget_s = _budget_s(time_budget_s, device_hours, topo)
    law = quality or default_law()
    space = space or SearchSpace()
    models = space.shapes(model)
    grids = []
    for m in models:
        resolved = space.resolved(m, topo)
        grids.append(G.build(resolved, m.top_k * m.expert_d_ff if space.keep_active else None))
    offsets = np.cumsum([0] + [math.prod(G.shape_of(g)) for g in grids])
    bounds.check_int("chunk", chunk, 1, 100_000_000)
    bounds.check_int("top", top, 1, 1_000_000)
    if offsets[-1] > bounds.check_int("max_points", max_points, 1, 10**12):
        raise ValueError(f"space: the grid has {int(offsets[-1]):,} points, more than max_points={max_points:,}; "
                         "try fewer values per knob, or raise max_points (memory grows with the points kept)")
    pieces = [(no, piece, index + offsets[no]) for no, g in enumerate(grids) for piece, index in G.pieces(g, chunk)]
    report = _progress(progress)

    def score(no, piece, index) -> _Scored:
        return _score_piece(piece, index, models[no], topo, global_batch_tokens, constraints or Constraints(), dtype,
                            routing, overlap, budget_s, no, dispatch, preset, hbm_reserve, profile)

    only = [score(*pieces[0])] if len(pieces) == 1 else []  # one piece: scored once for both passes
    fixed = None  # objective "quality": every candidate trains the tokens of the best throughput
    if objective == "quality":
        fixed = max((float(s.tokens_trained[s.keep].max()) for s in only or (score(*p) for p in pieces)
                     if s.keep.any()), default=1.0)
    merged = _Merged(resolved, top)
    for piece in pieces:
        s = only[0] if only else score(*piece)
        tokens = s.tokens_trained if fixed is None else np.full(s.tokens_trained.shape, fixed)
        shape = G.shape_of(s.grid)
        quality = _quality(law, models[s.model_no], s, tokens, shape)
        loss = quality["loss"].reshape(-1)
        s.keep &= np.isfinite(loss)  # a loss the law cannot give is no candidate (never a NaN row)
        merged.add(s, quality, np.where(s.keep, _objective(objective, s.values, loss, topo), np.inf))
        report(merged.points, int(offsets[-1]))
    return merged.result(models, topo, objective, {"quality_law": law.name, "time_budget_s": budget_s,
                                                   "global_batch_tokens": global_batch_tokens, **money})


def _price(topo: Topology, provider: str | None) -> dict:
    """The family's list price for the details (nothing for a family the price file does not know)."""
    prices = load_prices()
    if topo.family not in prices.families:
        return {}
    price = prices.of(topo.family).price(provider)
    return {} if price is None else {"usd_per_device_hour": price.usd_per_device_hour, "provider": price.provider,
                                     "price_date": price.date}


def _budget_s(time_budget_s: float, device_hours: float | None, topo: Topology) -> float:
    """Training seconds in the budget: ``device_hours`` shared by the topology's devices, or ``time_budget_s``."""
    if device_hours is not None:
        if isinstance(device_hours, bool) or not (isinstance(device_hours, int | float) and 0 < device_hours < 1e12):
            raise ValueError(f"device_hours: got {device_hours!r}; expected a number of hours in (0, 1e12)")
        return device_hours * 3600.0 / topo.num_devices
    if isinstance(time_budget_s, bool) or not (isinstance(time_budget_s, int | float) and 0 < time_budget_s < 1e12):
        raise ValueError(f"time_budget_s: got {time_budget_s!r}; expected seconds in (0, 1e12)")
    return float(time_budget_s)


def _quality(law, model: M.MoEModel, s: _Scored, tokens: np.ndarray, shape) -> dict:
    """Loss (full grid) and its interval's half-width (on the axes it depends on), with the candidate's own
    training drop rate; ``in_range`` is a function checking the law's ranges at picked points only."""
    view = M.ModelView(model, **{k: s.grid[k] for k in G.MODEL_KNOBS})
    loss, half = law_loss(law, view, tokens.reshape(shape), s.drop_rate)

    def in_range(at: dict[str, np.ndarray], points: np.ndarray) -> np.ndarray:
        if not hasattr(law, "in_range"):
            return np.zeros(points.size, dtype=bool)
        picked = M.ModelView(model, **{k: at[k] for k in G.MODEL_KNOBS})
        return np.broadcast_to(np.asarray(law.in_range(picked, tokens[points]), dtype=bool), points.shape)

    return {"loss": np.broadcast_to(loss, shape), "half_width": np.asarray(half, dtype=float), "in_range": in_range}


class _Merged:
    """What the pieces of a search keep, merged: the best ``top`` by (score, grid index), the union of
    the pieces' Pareto fronts, the fastest kept time per heatmap cell, and the counts."""

    def __init__(self, resolved: dict[str, list], top: int) -> None:
        self.top = top
        self.experts = sorted(set(resolved["num_experts"]))
        self.cfs = sorted({M.capacity_key(c) for c in resolved["capacity_factor"]})
        self.heat = np.full((len(self.cfs), len(self.experts)), np.inf)
        self.ranked: list[dict] = []
        self.front: list[dict] = []
        self.configs: dict[tuple, dict] = {}  # best record per distinct MoE configuration
        self.points = self.evaluated = self.kept = 0

    def add(self, s: _Scored, quality: dict[str, np.ndarray], score: np.ndarray) -> None:
        ranked = self.ranked + s.pick(_smallest(score, self.top), quality, score)
        self.ranked = sorted(ranked, key=lambda r: (r["score"], r["index"]))[:self.top]
        front = np.asarray(pareto_front(quality["loss"].reshape(-1), s.values["step_time_s"], s.keep),
                           dtype=np.int64)
        self.front += s.pick(front, quality, score)
        for r in s.pick(_best_per_configuration(score, G.shape_of(s.grid), self.top), quality, score):
            key = (r["model_no"],) + tuple(-1.0 if r[k] != r[k] else float(r[k]) for k in G.MODEL_KNOBS)  # NaN: -1
            old = self.configs.get(key)
            if old is None or (r["score"], r["index"]) < (old["score"], old["index"]):
                self.configs[key] = r
        _heat_cells(s, self.experts, self.cfs, self.heat)
        self.points += s.index.size
        self.evaluated += int(s.ok.sum())
        self.kept += int(s.keep.sum())

    def result(self, models: list[M.MoEModel], topo: Topology, objective: str, details: dict) -> SearchResult:
        front = sorted(self.front, key=lambda r: r["index"])  # equal points: the first in the grid wins
        on_front = pareto_front(np.array([r["loss"] for r in front]), np.array([r["step_time_s"] for r in front]))
        ranked = _ties_by_time(self.ranked) if objective in ("quality", "quality_per_time") else self.ranked
        made: dict[int, Candidate] = {}  # one Candidate per grid point, shared by the table, front and configurations

        price = details.get("usd_per_device_hour")

        def candidate(r: dict) -> Candidate:
            if r["index"] not in made:
                c = made[r["index"]] = _candidate(models[r["model_no"]], r, topo)
                if price is not None:
                    c.usd_per_million_tokens = c.cost_per_token_device_s * price / 3600.0 * 1e6
            return made[r["index"]]

        candidates = [candidate(r) for r in ranked]
        configs = sorted(self.configs.values(), key=lambda r: (r["score"], r["index"]))[:self.top]
        configs = _ties_by_time(configs) if objective in ("quality", "quality_per_time") else configs
        heatmap = {"num_experts": self.experts,
                   "capacity_factor": ["dropless" if c == M.DROPLESS_KEY else f"{c:g}" for c in self.cfs],
                   "step_time_s": np.where(np.isinf(self.heat), np.nan, self.heat).tolist()}
        pareto = [candidate(front[i]) for i in on_front]
        distinct = [candidate(r) for r in configs]  # the best is the first one
        return SearchResult(distinct[0] if distinct else None, pareto, [c.row() for c in candidates],
                            self.evaluated, self.points, objective, {"kept": self.kept, "heatmap": heatmap, **details},
                            distinct)


def _best_per_configuration(score: np.ndarray, shape: tuple[int, ...], top: int) -> np.ndarray:
    """Flat indices of the best point of each MoE configuration (the trailing model axes) of a piece, for the
    ``top`` configurations whose best is best. A configuration outside a piece's ``top`` has ``top`` others
    beating it there, so it cannot be among the ``top`` of the merge: the merge stays exact."""
    n_models = math.prod(shape[-len(G.MODEL_KNOBS):])
    per = score.reshape(-1, n_models)
    best = per.argmin(axis=0)
    chosen = _smallest(per[best, np.arange(n_models)], top)
    return best[chosen] * n_models + chosen


def _ties_by_time(records: list[dict]) -> list[dict]:
    """Quality ranking with ties: the records whose loss interval overlaps the best remaining one's are tied,
    and go fastest first; then the next best remaining, and so on."""
    rest = sorted(records, key=lambda r: (r["loss"], r["index"]))
    out = []
    while rest:
        top = rest[0]["loss_high"]
        tied = [r for r in rest if r["loss_low"] <= top]
        out += sorted(tied, key=lambda r: (r["step_time_s"], r["loss"], r["index"]))
        rest = [r for r in rest if r["loss_low"] > top]
    return out


def _smallest(score: np.ndarray, top: int) -> np.ndarray:
    """Indices of the ``top`` smallest finite scores, by (score, index): a partition, not a sort."""
    count = min(top, int(np.count_nonzero(np.isfinite(score))))
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    threshold = np.partition(score, count - 1)[count - 1]
    less = np.flatnonzero(score < threshold)
    idx = np.concatenate([less, np.flatnonzero(score == threshold)[: count - less.size]])
    return idx[np.lexsort((idx, score[idx]))]


def _heat_cells(s: _Scored, experts: list, cfs: list, heat: np.ndarray) -> None:
    """Lower ``heat`` [capacity factor, experts] to the fastest kept step time of each cell of this piece."""
    shape = G.shape_of(s.grid)
    step = np.where(s.keep, s.values["step_time_s"], np.inf).reshape(shape)
    best = step.min(axis=tuple(a for a in range(len(shape)) if G.KNOBS[a] not in ("num_experts", "capacity_factor")))
    e_at = np.searchsorted(experts, s.grid["num_experts"].reshape(-1))
    c_at = np.searchsorted(cfs, M.capacity_key(s.grid["capacity_factor"].reshape(-1)))
    np.fmin.at(heat, (c_at[None, :], e_at[:, None]), best)


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
    if name in ("cost_per_token", "cost"):  # device-seconds, or dollars, per token: one order on one topology
        return topo.num_devices / s["tokens_per_s"]
    return loss + 1e-12 * s["step_time_s"]  # quality, quality_per_time: ties go to the faster layout


def pareto_front(loss: np.ndarray, time_s: np.ndarray, keep: np.ndarray | None = None) -> list[int]:
    """Indices of the non-dominated (loss, time) points among ``keep``, fastest first.

    A point is dominated when another is no worse in both and better in one. Sort by time (then
    loss, then index) and keep each point whose loss beats every faster point's; equal points keep
    the first. A bucketing pass first drops points a strictly faster bucket already beats, so only a
    few points are sorted.
    """
    idx = np.flatnonzero(np.ones(time_s.size, bool) if keep is None else keep)
    idx = _beaten_by_a_faster_bucket(loss, time_s, idx)
    order = idx[np.lexsort((loss[idx], time_s[idx]))]
    ranked = loss[order]
    faster_best = np.concatenate([[math.inf], np.minimum.accumulate(ranked)[:-1]])
    return [int(i) for i in order[ranked < faster_best]]


def _beaten_by_a_faster_bucket(loss: np.ndarray, time_s: np.ndarray, idx: np.ndarray, buckets: int = 1024):
    """``idx`` less the points whose loss some point of a faster time bucket matches or beats: buckets are
    monotone in time, so that point is strictly faster and dominates. The front is unchanged."""
    if idx.size <= 4 * buckets:
        return idx
    t, lo = time_s[idx], time_s[idx].min()
    span = t.max() - lo
    if not span > 0:
        return idx
    bucket = np.minimum(((t - lo) * (buckets / span)).astype(np.int64), buckets - 1)
    best = np.full(buckets, np.inf)
    np.fmin.at(best, bucket, loss[idx])
    faster = np.concatenate([[np.inf], np.minimum.accumulate(best)[:-1]])
    return idx[loss[idx] < faster[bucket]]


@lru_cache(maxsize=4096)
def _configured(model: M.MoEModel, experts: int, top_k: int, moe_every: int, expert_d_ff: int, cf: float | None):
    """The model with one configuration's knobs (memoised: a ranked table holds few configurations)."""
    return model.with_(num_experts=experts, top_k=top_k, moe_every=moe_every, expert_d_ff=expert_d_ff,
                       capacity_factor=cf)


def _candidate(model: M.MoEModel, r: dict, topo: Topology) -> Candidate:
    cf = float(r["capacity_factor"])
    m = _configured(model, int(r["num_experts"]), int(r["top_k"]), int(r["moe_every"]), int(r["expert_d_ff"]),
                    None if M.is_dropless(cf) else cf)
    layout = Layout(**{k: int(r[k]) for k in ("data",) + G.LAYOUT_KNOBS[:-1]}, recompute=RECOMPUTE[int(r["recompute"])])
    tps = float(r["tokens_per_s"])
    return Candidate(m, layout, float(r["step_time_s"]), tps, r["loss"], float(r["memory_per_device_bytes"]),
                     bool(r["fits"]), float(r["drop_rate"]), float(r["mfu"]), topo.num_devices / tps,
                     float(r.get("loss_low", r["loss"])), float(r.get("loss_high", r["loss"])),
                     bool(r.get("in_range", False)))


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

