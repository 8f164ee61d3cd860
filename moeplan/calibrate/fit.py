"""The model of what calibration measures, and the least-squares fit of its parameters.

Parameters (theta): matmul efficiency, memory efficiency, a fixed per-kernel overhead, the
collective per-step latency and the link efficiency. Predictions use moeplan's own formulas:
``compute.matmul_time_s`` / ``memory_time_s`` for compute, ``collectives.collective_time_s`` for
communication, and for a whole einsum-dispatch MoE layer (per device, G_l = groups / ep local groups
of S tokens, capacity C, E experts, E_l = E / ep local):

    router    matmul(G_l S, E, D) in fp32, plus softmax / top-k / one-hot construction, memory-bound
              over the [G_l, S, E, C] dispatch tensor (3k + 2 passes of 4-byte elements)
    dispatch  G_l matmuls [E C, S] x [S, D]      combine  G_l matmuls [S, E C] x [E C, D]
    experts   E_l x (matmul(ep G_l C, F, D) + matmul(ep G_l C, D, F)) + ReLU over the hidden
    a2a       two all_to_alls of E G_l C D x 4 bytes per device, and the all-reduce of the auxiliary
              losses' statistics (when ep > 1)

forward+backward is what ``bench`` times: a training step's forward and backward for a given output
gradient, parameter and input gradients both (the compiled step runs exactly these matmuls):
router, combine and experts twice more, dispatch once more (its one-hot operand has no gradient),
(k + 1) passes over the routing tensor for the gate gradients, three over the hidden for the ReLU,
two more all_to_alls, an all-reduce of the replicated router's gradient, and a second set of kernel
overheads (see ``_layer_s``). scipy least_squares fits theta on log times of the training
measurements; held-out MoE layer shapes, interleaved with the training ones, give the error.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from scipy.optimize import least_squares

from moeplan.collectives import CommParams, Efficiency, collective_time_s
from moeplan.compute import matmul_time_s, memory_time_s
from moeplan.hardware import ComputeEfficiency
from moeplan.moe import expert_capacity
from moeplan.topology import Topology

# theta = (matmul efficiency, memory efficiency, kernel overhead s, step latency s, link efficiency)
LOWER = np.array([0.01, 0.01, 0.0, 0.0, 0.01])
UPPER = np.array([1.0, 1.0, 1e-2, 1e-2, 1.0])
_LAYER_KERNELS = 10  # router, softmax/top-k, one-hot, dispatch, 2 expert matmuls, activation, combine, 2 a2a


def fitted_section(eff: ComputeEfficiency, comm: CommParams, part_scales: dict[str, float] | None = None) -> dict:
    """The ``fitted`` mapping of a profile file for these parameters (and per-part time scales, when fitted)."""
    out = {"compute": {"matmul": float(eff.matmul), "attention": float(eff.attention), "memory": float(eff.memory),
                       "matmul_tile": int(eff.matmul_tile), "kernel_overhead_s": float(eff.kernel_overhead_s)},
           "comm": {"step_latency_s": float(comm.node_step_latency_s),
                    "link_efficiency": float(comm.eff("node").e_max)}}
    if comm.ops:
        out["comm"]["ops"] = {op: {"latency_s": lat, "efficiency": e} for op, (lat, e) in sorted(comm.ops.items())}
    if part_scales:
        out["parts"] = dict(part_scales)
    return out


def theta_from(eff: ComputeEfficiency, comm: CommParams) -> np.ndarray:
    return np.array([eff.matmul, eff.memory, eff.kernel_overhead_s, comm.node_step_latency_s,
                     comm.eff("node").e_max])


def models_from(theta: np.ndarray, base_eff: ComputeEfficiency, base_comm: CommParams, source: str,
                ops: dict[str, tuple[float, float]] | None = None):
    """(ComputeEfficiency, CommParams) carrying ``theta`` (and per-op collective corrections); other fields
    from the bases."""
    matmul, memory, overhead, latency, link = (float(v) for v in theta)
    eff = replace(base_eff, matmul=matmul, memory=memory, kernel_overhead_s=overhead, source=source)
    node = Efficiency(link, 0.0, 0.5, source)
    comm = replace(base_comm, node_step_latency_s=latency, nccl_base_latency_s=latency, ops=dict(ops or {}))
    return eff, comm.with_efficiency(node=node, nvls=node)


def predict_s(m: dict, topo: Topology, eff: ComputeEfficiency, comm: CommParams) -> float:
    chip = topo.chip
    if m["kind"] == "matmul":
        return float(matmul_time_s(m["m"], m["n"], m["k"], chip, "fp32", eff))
    if m["kind"] == "collective":
        return float(collective_time_s(topo, m["op"], float(m["bytes"]), m["devices"], params=comm))
    return _layer_s(m, topo, eff, comm)


def _layer_s(m: dict, topo: Topology, eff: ComputeEfficiency, comm: CommParams) -> float:
    chip = topo.chip
    ep = m["devices"]
    g_local = m["groups"] // ep
    s, d, f, e, k = m["group_size"], m["d_model"], m["expert_d_ff"], m["num_experts"], m["top_k"]
    cap = expert_capacity(s, k, m["capacity_factor"], e)
    e_local, tokens, rows = e // ep, g_local * s, ep * g_local * cap
    mm = lambda a, b, c, count=1.0: float(matmul_time_s(a, b, c, chip, "fp32", eff, count))  # noqa: E731
    mem = lambda nbytes: float(memory_time_s(nbytes, chip, eff))  # noqa: E731

    def coll(op: str, nbytes: float) -> float:
        return float(collective_time_s(topo, op, float(nbytes), ep, params=comm)) if ep > 1 else 0.0

    slots = tokens * e * cap * 4  # one f32 [G_l, S, E, C] dispatch / combine tensor
    hidden = e_local * rows * f * 4  # the experts' hidden activations
    router = mm(tokens, e, d)
    dispatch = mm(e * cap, d, s, g_local)
    combine = mm(s, d, e * cap, g_local)
    experts = mm(rows, f, d, e_local) + mm(rows, d, f, e_local)
    a2a = coll("all_to_all", e * g_local * cap * d * 4)
    overhead = _LAYER_KERNELS * eff.kernel_overhead_s
    forward = (router + mem((3 * k + 2) * slots) + dispatch + experts + mem(2 * hidden) + combine + 2 * a2a
               + coll("all_reduce", (2 * e + 1) * 4) + overhead)
    if not m["backward"]:
        return forward
    # a training step's backward for a given output gradient: every matmul twice (data and weight
    # gradients) except the dispatch einsum, once (its one-hot operand has no gradient); the gate
    # gradients back through the routing tensors, the ReLU mask, both all_to_alls reversed, and the
    # all-reduce of the replicated router's gradient
    backward = (2 * router + mem((k + 1) * slots) + dispatch + 2 * experts + mem(3 * hidden) + 2 * combine
                + 2 * a2a + coll("all_reduce", d * e * 4) + overhead)
    return forward + backward


def errors(measurements: list[dict], topo: Topology, eff: ComputeEfficiency, comm: CommParams) -> np.ndarray:
    """Relative error (predicted / measured - 1) per measurement."""
    return np.array([predict_s(m, topo, eff, comm) / m["time_s"] - 1.0 for m in measurements])


def fit(train: list[dict], topo: Topology, eff: ComputeEfficiency, comm: CommParams, source: str):
    """Least squares on log(predicted / measured), in three stages: the shared collective parameters on the
    collective benchmarks; each collective op's own latency and efficiency on that op's benchmarks
    (``fit_ops``: one step latency and link efficiency cannot serve ops whose errors differ in sign, as on
    the CPU host, where all-reduce runs faster than the model and all-to-all slower); then the compute
    parameters on the training MoE layers with the collectives held. Standalone matmuls are measured and
    reported, not fitted: XLA runs a lone dot with other kernels than the layer's fused einsums, and on the
    CPU host adding them to the compute stage makes held-out layers slightly worse. Three compute
    parameters are not too many for the layers: fits without the per-kernel overhead, or with only two of
    the three free, predict held-out layers no better. Returns fitted (eff, comm, theta)."""
    theta = np.clip(theta_from(eff, comm), LOWER + 1e-9, UPPER - 1e-9)
    theta[2] = max(theta[2], 1e-5)
    theta[3] = max(theta[3], 1e-6)
    scale = np.array([0.1, 0.1, 1e-4, 1e-5, 0.1])
    collectives = [m for m in train if m["kind"] == "collective"]
    stages = [([3, 4], collectives), ([0, 1, 2], [m for m in train if m["kind"] == "moe_layer"])]
    ops: dict[str, tuple[float, float]] = {}
    for free, subset in stages:
        if not subset:
            continue

        def residuals(values, free=free, subset=subset, ops=ops):
            full = theta.copy()
            full[free] = values
            e, c = models_from(full, eff, comm, source, ops)
            return np.log([max(predict_s(m, topo, e, c), 1e-12) / m["time_s"] for m in subset])

        result = least_squares(residuals, theta[free], bounds=(LOWER[free], UPPER[free]), x_scale=scale[free])
        theta[free] = result.x
        if subset is collectives:  # the shared pair held, each op its own on top
            ops = fit_ops(subset, topo, *models_from(theta, eff, comm, source))
    fitted_eff, fitted_comm = models_from(theta, eff, comm, source, ops)
    return fitted_eff, fitted_comm, theta


def fit_ops(measurements: list[dict], topo: Topology, eff: ComputeEfficiency, comm: CommParams):
    """Per collective op with two or more benchmarks: the (latency_s, efficiency) that the op's time takes
    on top of the model's (``CommParams.ops``), least squares on log(predicted / measured)."""
    out = {}
    for op in sorted({m["op"] for m in measurements}):
        mine = [m for m in measurements if m["op"] == op]
        if len(mine) < 2:
            continue
        model_s = np.array([predict_s(m, topo, eff, comm) for m in mine])
        measured = np.array([m["time_s"] for m in mine])

        def residuals(values, model_s=model_s, measured=measured):
            return np.log((values[0] + model_s / values[1]) / measured)

        result = least_squares(residuals, [1e-5, 1.0], bounds=([0.0, 0.01], [1e-2, 100.0]), x_scale=[1e-4, 1.0])
        out[op] = (float(result.x[0]), float(result.x[1]))
    return out
