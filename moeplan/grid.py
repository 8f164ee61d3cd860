"""The search grid: one axis per knob, its validity mask, and its cutting into pieces of bounded size.

Each knob's values lie along its own axis, so arrays broadcast to the Cartesian product without ever
materialising it; a value that depends on one knob (the expert width under ``keep_active``) lies along
that knob's axis. Pieces hold at most ``chunk`` points whatever the axis lengths, each with the global flat
index of its points; no array spans the whole grid.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from moeplan import moe as M
from moeplan.layout import MODEL_RULES, RECOMPUTE, SHAPE_RULES, Fields, rules_hold
from moeplan.plan import Plan
from moeplan.topology import Topology

MODEL_KNOBS = ("num_experts", "top_k", "capacity_factor", "moe_every", "expert_d_ff")
LAYOUT_KNOBS = ("expert", "expert_tensor", "tensor", "context", "pipeline", "fsdp", "virtual_pipeline",
                "micro_batch_size", "recompute")
# The axes of the search grid, in order. The model knobs come last: a layer's times vary along all of them, so
# the arrays the step assembles have long contiguous inner runs where they broadcast against the layout's
# pipeline and micro-batch terms (numpy's broadcast loop pays per inner run: a layer-shaped array times a
# pipeline-shaped one took 2.5 ms with the model knobs first and 0.4 ms with them last, on the benchmark grid).
KNOBS = LAYOUT_KNOBS + MODEL_KNOBS


def build(space: dict[str, list], active_width: int | None = None) -> dict[str, np.ndarray]:
    """One axis per knob, in ``KNOBS`` order: each knob's values lie along its own axis (capacity factor
    None -> NaN, recompute -> index), so the knobs broadcast to the Cartesian product. With ``active_width``
    (top_k x expert width to keep), the expert width follows the top_k axis instead of having its own."""
    grid = {}
    for axis, k in enumerate(KNOBS):
        values = space[k]
        if k == "capacity_factor":
            values = [M.capacity_array(v) for v in values]  # None (dropless) -> NaN
        elif k == "recompute":
            values = [RECOMPUTE.index(v) for v in values]
        shape = [1] * len(KNOBS)
        shape[axis] = len(values)
        grid[k] = np.asarray(values).reshape(shape)
    if active_width is not None:
        grid["expert_d_ff"] = np.maximum(64, 64 * np.round(active_width / grid["top_k"] / 64)).astype(np.int64)
    return grid


def shape_of(grid: dict[str, np.ndarray]) -> tuple[int, ...]:
    return tuple(max(grid[k].shape[axis] for k in KNOBS) for axis in range(len(KNOBS)))


def valid(g: dict[str, np.ndarray], model: M.MoEModel, topo: Topology, gbt: int) -> np.ndarray:
    """The layout rules (``layout.SHAPE_RULES`` and ``MODEL_RULES``, the ones ``Layout`` and ``check_layout``
    apply to one layout) over the grid, the model's own (top-k, a dense width for dense blocks) and batch
    divisibility; sets ``g["data"]``."""
    n = topo.num_devices
    rest = g["fsdp"] * g["context"] * g["tensor"] * g["pipeline"]
    data = np.where(n % rest == 0, n // np.maximum(rest, 1), 0)
    g["data"] = data
    fields = Fields(g, model)
    ok = (data >= 1) & rules_hold(SHAPE_RULES + MODEL_RULES, fields, topo)
    ok = ok & (g["top_k"] <= g["num_experts"])
    moe_layers = M.layer_census(model.n_layers, g["moe_every"], model.first_dense_layers, model.encoder_decoder)
    ok = ok & ((model.d_ff > 0) | (moe_layers == model.n_layers))  # dense blocks need a dense FFN width
    seqs = gbt // model.seq_len
    shards = np.maximum(data * g["fsdp"], 1)
    ok = ok & (gbt % model.seq_len == 0) & (seqs % shards == 0)
    ok = ok & ((seqs // shards) % g["micro_batch_size"] == 0) & (seqs // shards >= g["micro_batch_size"])
    return np.broadcast_to(ok, shape_of(g))


def plan_of(g: dict[str, np.ndarray], model: M.MoEModel) -> Plan:
    view = M.ModelView(model, **{k: g[k] for k in MODEL_KNOBS})
    return Plan(view, **{k: g[k] for k in ("data",) + LAYOUT_KNOBS})


def pieces(grid: dict[str, np.ndarray], chunk: int) -> list[tuple[dict[str, np.ndarray], np.ndarray]]:
    """The grid cut into pieces of at most ``chunk`` points (memory stays bounded whatever the axis lengths),
    each with the global flat index of its points (for ties and the merge). The axis with the most points
    per part is split further until a piece fits; no array spans the whole grid."""
    shape = shape_of(grid)
    parts = [1] * len(shape)
    while math.prod(-(-n // p) for n, p in zip(shape, parts, strict=True)) > chunk:
        axis = max(range(len(shape)), key=lambda a: -(-shape[a] // parts[a]))
        if -(-shape[axis] // parts[axis]) == 1:
            break  # every axis already cut to single values
        parts[axis] += 1
    ranges = [np.array_split(np.arange(n), p) for n, p in zip(shape, parts, strict=True)]
    pieces = []
    for combo in itertools.product(*ranges):
        piece = {k: _take_axes(v, combo) for k, v in grid.items()}
        pieces.append((piece, _flat_index(combo, shape)))
    return pieces


def _flat_index(combo, shape: tuple[int, ...]) -> np.ndarray:
    """Global C-order flat indices of the points of the sub-grid ``combo`` (one index range per axis), built
    axis by axis: memory and time in the piece's size, not the grid's."""
    whole = len(shape)  # the trailing axes a piece covers completely form one contiguous block of indices
    while whole > 0 and combo[whole - 1].size == shape[whole - 1]:
        whole -= 1
    index = np.zeros(1, dtype=np.int64)
    for idx, n in zip(combo[:whole], shape[:whole], strict=True):
        index = (index[:, None] * n + idx[None, :]).reshape(-1)
    block = math.prod(shape[whole:])
    return (index[:, None] * block + np.arange(block, dtype=np.int64)[None, :]).reshape(-1)


def _take_axes(values: np.ndarray, combo) -> np.ndarray:
    """``values`` restricted to the index ranges ``combo`` on the axes along which it varies."""
    for axis, idx in enumerate(combo):
        if values.shape[axis] > 1 and idx.size < values.shape[axis]:
            values = np.take(values, idx, axis=axis)
    return values
