"""estimate(model, topology, layout) -> per-layer breakdown, step time, tokens/s, MFU and memory.

One device's view of one step. A training step runs ``m`` micro-batches through ``p`` pipeline
stages (1F1B, ``v`` virtual stages): time = m x (forward + backward of one micro-batch on the slowest
stage) + the fill and drain, in which every other stage's time passes once, over v ((p - 1) / v stage
times with an even split; the output layer's time is the last stage's alone), plus the exposed
data-parallel gradient sync and FSDP gathers, plus the optimizer. Inside a stage every layer is
computed by roofline (``compute``) and every collective by ``collectives`` on the layout's actual
device groups.

The formulas are written once, over arrays: ``plan_costs`` scores a ``Plan`` (layout degrees and
MoE fields as numpy values that broadcast together) and ``estimate`` is that same function on a plan
of one candidate. The layout search calls ``plan_costs`` on a grid with one axis per knob, so each
intermediate spans only the knobs it depends on (``plan`` module).

A layer is a list of typed ``Part`` records (``layer_kinds``: the same composition for training, prefill
and decode); the overlap policy (``overlap``: "none", "dp" by default, "full" DualPipe-style) is applied in
one place, ``Overlap``, which says what hides behind what.
With an 8-bit ``dtype`` the linear layers run at the fp8 rate while attention, the output layer,
activations and communication stay in bf16, as in Transformer Engine's recipes; every 8-bit GEMM input
made from a bf16 tensor is cast first, a memory-bound pass (``compute.quantize_bytes``: in training the
forward's inputs and the backward's output gradients, each with a transposed copy).

Dispatch kernel (``dispatch``, ``dispatch.KERNELS``): "nccl" (default) is an all-to-all of one copy per
(token, expert); "deepep_normal" and "hybridep" send a token once per remote node and fan it out over
NVLink, at most as fast as their SMs copy; "deepep_ll" sends per expert at the links' large-message
efficiency after a fixed kernel latency. With an 8-bit ``dtype`` these kernels dispatch in fp8 with a
4-byte scale per 128 channels and combine in bf16, as DeepSeek-V3 trains.

Backward = 2x forward compute (2.5x for fused flash attention, which recomputes the scores) and the
same collectives again (two more all-to-alls per MoE layer). Recompute: "selective" recomputes
attention scores, "full" the whole forward with its collectives. MFU = model FLOPs
(moe.model_flops_per_token) / (step time x devices x dense bf16 peak).
Memory (training): weights in ``dtype`` (fp32 for fp32 runs) + fp32 grads + fp32 master weights
and Adam m, v (sharded over data replicas with the distributed optimizer), activations of the
micro-batches in flight, all-to-all buffers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import cache
from typing import Any, NamedTuple

import numpy as np

from moeplan import bounds, frameworks
from moeplan import moe as M
from moeplan.arrays import maximum, minimum, where
from moeplan.collectives import CommParams
from moeplan.compute import attention_time_s
from moeplan.dispatch import FP8_SCALE_BYTES_PER_VALUE, KERNELS
from moeplan.hardware import ComputeEfficiency
from moeplan.layout import OFFLOADED_TENSORS, OFFLOADS, RECOMPUTE, Layout, check_layout, stage_layers
from moeplan.plan import Context, Plan, distinct_rows, make_context
from moeplan.routing import Routing, max_device_load, routing_stats
from moeplan.topology import Topology
from moeplan.units import GIB, dtype_bytes

MODES = ("train", "prefill", "decode")

# HBM kept free of the model's own bytes: the CUDA context, NCCL's and cuBLAS's buffers, the caching allocator's
# fragmentation. An assumption (no source measures it in general), user-settable: estimate/search(hbm_reserve=).
HBM_RESERVE = 0.08


def usable_hbm_bytes(topo: Topology, hbm_reserve: float = HBM_RESERVE) -> float:
    bounds.check_number("hbm_reserve", hbm_reserve, 0.0, 0.9)
    return topo.chip.hbm_capacity_bytes * (1.0 - hbm_reserve)
OVERLAPS = ("none", "dp", "full")

# The measurable part each breakdown row belongs to (what a profiler trace's named scopes time, calibrate.trace):
# a profile's per-part time scales (fitted by ``calibrate --from-trace``) multiply every row of their part.
ROW_PART = {"attention": "attention", "attention_scores": "attention", "attention_tp": "attention",
            "router": "router", "dispatch_a2a": "dispatch_a2a", "experts": "experts", "experts_tp": "experts",
            "combine_a2a": "combine_a2a", "dense_ffn": "dense_ffn", "dense_ffn_tp": "dense_ffn", "logits": "logits",
            "mtp_head": "logits", "grad_sync": "grad_sync", "optimizer": "optimizer", "fsdp_gather": "grad_sync"}
MEASURED_PARTS = tuple(dict.fromkeys(ROW_PART.values()))


def part_scales(profile) -> dict[str, float]:
    """A profile's per-part time scales ({} without a profile, or for one fitted without traces)."""
    return dict(getattr(profile, "part_scales", None) or {})


@dataclass(frozen=True)
class LayerRow:
    """One line of the breakdown: its share of the step on one device."""

    name: str
    kind: str  # compute | a2a | comm | bubble | optimizer
    time_s: float
    flops: float = 0.0  # per device per step
    bytes: float = 0.0  # HBM bytes (compute) or bytes per device handed to the collective (comm)
    count: float = 0.0  # instances per device per step


@dataclass
class Estimate:
    mode: str
    step_time_s: float
    tokens_per_s: float
    mfu: float
    memory_per_device_bytes: float
    memory: dict[str, float]
    fits: bool
    reason: str
    layers: list[LayerRow]
    drop_rate: float
    micro_batches: int
    details: dict[str, float] = field(default_factory=dict)

    def to_rows(self) -> list[dict]:
        """Flat dicts (one per breakdown line, then one summary line) for tables and CSV."""
        rows = [asdict(r) for r in self.layers]
        rows.append({"name": "step", "kind": "total", "time_s": self.step_time_s,
                     "flops": sum(r.flops for r in self.layers), "bytes": self.memory_per_device_bytes, "count": 1.0})
        return rows

    def time_by_kind(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for row in self.layers:
            out[row.kind] = out.get(row.kind, 0.0) + row.time_s
        return out


# ------------------------------------------------------------------ building blocks (arrays)
def _tp_comm(ctx: Context, tokens) -> tuple[np.ndarray, np.ndarray]:
    """Tensor-parallel collectives around one block, per pass: AG + RS with sequence parallelism, else AR.
    With sequence parallelism Megatron gathers the block's input again in the backward pass for the weight
    gradient instead of keeping it (Korthikanti et al. 2022, section 4.2.2): one more AG per backward,
    spread here over the forward and backward passes."""
    nbytes = tokens * ctx.m.d_model * ctx.b * (ctx.plan.tensor > 1)
    if ctx.plan.sequence_parallel:
        gather = ctx.coll("all_gather", nbytes, "tensor")
        return 1.5 * gather + ctx.coll("reduce_scatter", nbytes, "tensor"), 2.5 * nbytes
    return ctx.coll("all_reduce", nbytes, "tensor"), nbytes


def _elementwise_s(ctx: Context, tokens):
    """The memory-bound work around one block: its norm (read, write), then dropout, bias and residual add
    (read the output and the residual, write the sum and a 1-byte mask): 5.5 activations' bytes. With
    sequence parallelism each tensor rank holds 1/t of the tokens; without it every rank repeats them."""
    shards = ctx.plan.tensor if ctx.plan.sequence_parallel else 1
    return ctx.mem(5.5 * tokens * ctx.m.d_model * ctx.b / shards)


def _attention(ctx: Context, tokens, context: float, decode: bool) -> dict[str, np.ndarray]:
    """Projections, norms, TP collectives and scores of one self-attention block. With context parallelism
    (``cp`` > 1) a device's ``tokens`` are its 1/cp of each sequence: its queries meet the keys and values of
    the whole sequence, all-gathered over the context group (their gradients reduce-scattered back), which
    runs under the scores' compute as Megatron's ring overlaps it; what the scores do not cover is exposed."""
    m, t, cp = ctx.m, ctx.plan.tensor, ctx.plan.context
    width = M.attention_params(m) / m.d_model / t  # output features per rank, projections together
    heads = m.n_heads * m.d_head / t  # the output projection's input features
    out = {"proj_s": ctx.mm(tokens, width, m.d_model) + _elementwise_s(ctx, tokens),
           "proj_flops": 2.0 * tokens * width * m.d_model}
    # 8-bit casts: the output projection's input (the q/k/v projection's comes cast from its fused norm); in
    # the backward the gradients of every projection's output
    if ctx.casts:
        out["proj_s"] = out["proj_s"] + ctx.quantize(tokens, heads, width - heads + m.d_model)
    out["tp_s"], out["tp_bytes"] = _tp_comm(ctx, tokens)
    # the keys a query attends, averaged over the layers (sliding-window layers attend at most their window):
    # reported as the full count, as the MFU convention does; run with causal self-attention skipping the masked
    # score blocks (FlashAttention) in training and prefill, half of them where every layer attends fully
    keys = M.attended_keys(m, context)
    run = M.attended_keys(m, context, causal=not (m.encoder_decoder or decode))
    flops = M.attention_score_flops(m) * keys / m.seq_len * tokens / t
    sequences = tokens if decode else tokens * cp / m.seq_len
    nbytes = sequences * (keys if decode else context) * M.kv_cache_bytes_per_token(m, ctx.b) / m.n_layers / t
    nbytes = nbytes + tokens * m.n_heads * m.d_head * 2 * ctx.b / t
    out["scores_s"] = attention_time_s(flops * run / keys, nbytes, ctx.topo.chip, ctx.high, ctx.eff,
                                       M.score_head_dims(m), ctx.training)
    if ctx.attention == "unfused" and not decode:  # QK^T and AV as batched matmuls, the scores through HBM
        heads = m.n_heads / t * sequences
        out["scores_s"] = (ctx.mm(m.seq_len, context, m.d_head, heads, dtype=ctx.high)
                           + ctx.mm(m.seq_len, m.d_head, context, heads, dtype=ctx.high)
                           + ctx.mem(_UNFUSED_SCORE_BYTES / 2 * ctx.b * heads * m.seq_len * context))
    out["scores_flops"] = flops
    kv = sequences * m.seq_len * M.kv_cache_bytes_per_token(m, ctx.b) / m.n_layers / t * (cp > 1) * (not decode)
    gather = ctx.coll("all_gather", kv, "context")
    out["tp_s"] = out["tp_s"] + maximum(gather - out["scores_s"], ctx.nccl_share * gather)  # Overlap's SM share
    out["tp_bytes"] = out["tp_bytes"] + kv
    return out


# Unfused attention, forward, per score element at 2 bytes: QK^T writes it (2), the fused scale-mask-softmax
# reads and writes it (4), dropout reads it and writes it and a 1-byte mask (5), AV reads it (2).
_UNFUSED_SCORE_BYTES = 13.0


def _ffn(ctx: Context, tokens, width, block: bool = True) -> dict[str, np.ndarray]:
    """A dense FFN of ``width``; ``block``: with its block's norm and residual (not a shared expert's)."""
    m, t = ctx.m, ctx.plan.tensor
    up = 2 if m.gated_ffn else 1
    time = ctx.mm(tokens, up * width / t, m.d_model) + ctx.mm(tokens, m.d_model, width / t)
    time = time + ctx.mem(3 * tokens * width / t * ctx.b) + (_elementwise_s(ctx, tokens) if block else 0.0)
    # 8-bit casts: the down projection's input, and the up projection's unless a block's norm emits it cast
    # (Transformer Engine's LayerNormMLP); backward: both projections' output gradients
    if ctx.casts:
        time = time + ctx.quantize(tokens, width / t + (0.0 if block else m.d_model), (up * width / t + m.d_model))
    tp_s, tp_bytes = _tp_comm(ctx, tokens)
    return {"s": time * (width > 0), "flops": 2.0 * tokens * (up + 1) * width / t * m.d_model,
            "tp_s": tp_s * (width > 0), "tp_bytes": tp_bytes * (width > 0)}


def _routing(ctx: Context, group, ep, local):
    """(drop rate, tokens per expert on the busiest device, straggler factor) per candidate: the routing
    statistics of each distinct (tokens routed, expert degree, experts, top-k, capacity, local experts)."""
    m = ctx.m
    cols = (group, ep, m.num_experts, m.top_k, M.capacity_code(m.capacity_factor_array), local)
    if ctx.scalar:  # one candidate
        return _route(ctx.routing, *(float(c) for c in cols))
    rows, inverse = distinct_rows(cols)
    stats = np.array([_route(ctx.routing, *row) for row in rows.tolist()]).reshape(-1, 3)
    return stats[inverse, 0], stats[inverse, 1], stats[inverse, 2]


def _route(routing: Routing, g, e_par, n_exp, k, cf_code, loc) -> tuple[float, float, float]:
    """One row of ``_routing``; ``cf_code``: moe.capacity_code of the capacity factor (0 = dropless)."""
    if g < 1 or loc < 1 or n_exp % e_par or n_exp % loc:
        return 0.0, 0.0, 1.0  # an invalid grid point: masked out by the caller
    cf = M.capacity_of_code(cf_code)
    if cf is not None:
        cap = float(M.expert_capacity(g, k, cf, n_exp))
        drop = routing_stats(g, n_exp, k, cap, 1, routing, loads=False).drop_rate
        return drop, e_par * cap, n_exp * cap / (g * k)  # padded: every group fills its slots
    busiest = max_device_load(int(g * e_par), int(n_exp), int(k), int(loc), routing)
    return 0.0, busiest / loc, busiest / (g * e_par * k / n_exp * loc)


def _moe(ctx: Context, tokens, decode: bool = False) -> dict[str, np.ndarray]:
    """Router, dispatch all-to-all, expert FFNs, combine all-to-all for one MoE layer.

    With expert-tensor parallelism (``etp`` > 1) the ``etp`` devices of a set route together: the tokens each
    receives from the all-to-all are all-gathered inside the set, every device runs its experts' 1/etp of the
    width on all of them, and the partial outputs are reduce-scattered back (per pass: AG + RS)."""
    m, p = ctx.m, ctx.plan
    group = maximum(np.round(tokens / p.tensor), 1)  # tokens this device routes
    ep, etp = p.expert, p.expert_tensor
    local = m.num_experts // ep
    out = {"router_s": ctx.mm(group, m.num_experts, m.d_model, dtype="fp32") + ctx.mem(
        3 * group * m.num_experts * 4 + 4 * group * m.top_k * m.d_model * ctx.b),
        "router_flops": 2.0 * group * m.num_experts * m.d_model}
    drop, per_expert, straggle = _routing(ctx, group * etp, ep, local)  # per_expert: a set's, gathered
    send = group * m.top_k * m.d_model * ctx.b * straggle
    fp8_dispatch = ctx.dispatch != "nccl" and dtype_bytes(ctx.dtype) < 2
    send_in = send * (1.0 + FP8_SCALE_BYTES_PER_VALUE) / ctx.b if fp8_dispatch else send  # fp8 values + scales
    token_in = float(m.d_model) * ((1.0 + FP8_SCALE_BYTES_PER_VALUE) if fp8_dispatch else ctx.b)  # one copy's bytes
    active = local * (1.0 - (1.0 - m.top_k / m.num_experts) ** (group * etp * ep)) if decode else local
    up, width = (2 if m.gated_ffn else 1), m.expert_d_ff / etp
    rows = _grouped_rows(ctx, per_expert, active)
    experts = ctx.mm(rows, up * width, m.d_model, active) + ctx.mm(
        rows, m.d_model, width, active) + ctx.mem(3 * per_expert * active * width * ctx.b)
    # 8-bit casts of the routed copies (the up projection's input) and of the down projection's input;
    # backward: both projections' output gradients
    if ctx.casts:
        experts = experts + ctx.quantize(per_expert * active, m.d_model + width, up * width + m.d_model)
    flops = 2.0 * per_expert * active * (up + 1) * width * m.d_model
    shared = _ffn(ctx, tokens, m.num_shared_experts * m.expert_d_ff, block=False)
    gathered = send * etp * (etp > 1)  # the set's received tokens, all-gathered, and the partial outputs
    etp_s = ctx.coll("all_gather", gathered, "expert_tensor") + ctx.coll("reduce_scatter", gathered, "expert_tensor")
    out.update(experts_s=experts + shared["s"] + _elementwise_s(ctx, tokens), experts_flops=flops + shared["flops"],
               shared_tp_s=shared["tp_s"] + etp_s, shared_tp_bytes=shared["tp_bytes"] + 2.0 * gathered,
               drop=drop, send=send * (ep > 1), send_in=send_in * (ep > 1), gathered=gathered,
               dispatch_s=ctx.dispatch_a2a(send_in * (ep > 1), token_in),
               combine_s=ctx.dispatch_a2a(send * (ep > 1), float(m.d_model) * ctx.b),
               **_permute(ctx, group, send))
    return _one_expert_is_an_ffn(ctx, tokens, out)


def _grouped_rows(ctx: Context, per_expert, active):
    """Rows one expert's matmuls run on. Each expert its own GEMM ("gather": Megatron's grouped GEMM): its
    tokens, padded to the chip's tile by ``matmul_time_s``. MaxText's dropless megablox ("einsum"): the sorted
    tokens in tiles of ``MEGABLOX_TILE_ROWS`` rows, one more tile per boundary between the ``active`` experts,
    shared out over them."""
    if ctx.permute != "einsum":
        return per_expert
    tile = frameworks.MEGABLOX_TILE_ROWS
    visited = (np.ceil(per_expert * active / tile) + maximum(active - 1, 0)) * tile
    return where(M.is_dropless(ctx.m.capacity_factor_array), visited / maximum(active, 1), per_expert)


def _permute(ctx: Context, group, send) -> dict:
    """Grouping the routed copies per expert before the dispatch and back after the combine (frameworks.PERMUTES).
    "gather": read and write every copy once each way (memory-bound). "einsum": per routing group of S tokens
    (a sequence, or what the device holds of one), one-hot matmuls [E C, S] x [S, d] in and [S, E C] x [E C, d]
    out, C = ceil(S k cf / E) (MaxText's dense path, run forward and twice backward like any matmul). Dropless
    layers have no capacity and gather either way."""
    move = ctx.mem(2 * send)
    m = ctx.m
    dropless = M.is_dropless(m.capacity_factor_array)
    if ctx.permute != "einsum" or not np.any(~dropless):
        return {"permute_in_s": move, "permute_out_s": move, "permute_flops": 0.0}
    size = minimum(group, m.seq_len)
    slots = m.num_experts * M.capacity(size, m, where(dropless, 1.0, m.capacity_factor_array))
    count = group / size
    flops = 2.0 * slots * m.d_model * size * count
    return {"permute_in_s": where(dropless, move, ctx.mm(slots, m.d_model, size, count)),
            "permute_out_s": where(dropless, move, ctx.mm(size, m.d_model, slots, count)),
            "permute_flops": where(dropless, 0.0, flops)}


def _one_expert_is_an_ffn(ctx: Context, tokens, out: dict) -> dict:
    """A layer of one expert (a dense model, ``num_experts=1``) is a dense FFN, tensor-parallel as Megatron
    runs it: no router, no permutation, no all-to-all."""
    m = ctx.m
    dense = m.num_experts == 1
    if not np.any(dense):
        return out
    ffn = _ffn(ctx, tokens, (m.top_k + m.num_shared_experts) * m.expert_d_ff)
    swap = {"router_s": 0.0, "router_flops": 0.0, "drop": 0.0, "send": 0.0, "send_in": 0.0, "gathered": 0.0,
            "dispatch_s": 0.0, "combine_s": 0.0, "permute_in_s": 0.0, "permute_out_s": 0.0, "permute_flops": 0.0,
            "experts_s": ffn["s"], "experts_flops": ffn["flops"],
            "shared_tp_s": ffn["tp_s"], "shared_tp_bytes": ffn["tp_bytes"]}
    return {k: where(dense, swap[k], v) if k in swap else v for k, v in out.items()}


# ------------------------------------------------------------------ a layer's parts, and the overlap policy
class Part(NamedTuple):
    """One piece of a layer, per device and micro-batch: forward compute, communication per pass (forward or
    backward), forward FLOPs and the bytes handed to its collectives. Fields broadcast: numbers for one
    estimate, arrays of the grid's shape for a search."""

    name: str
    kind: str  # compute | a2a
    compute_s: Any
    comm_s: Any
    flops: Any
    comm_bytes: Any


def layer_kinds(ctx: Context, tokens, decode: bool = False) -> tuple[list, dict]:
    """What the model's layers are made of, training and inference alike: per layer kind its number in the
    model and its parts (attention; dense FFN; router, dispatch, experts, combine), and the MoE layer's
    figures (drop rate, all-to-all send and gathered bytes)."""
    m = ctx.m
    attn = _attention(ctx, tokens, m.seq_len, decode)
    dense = _ffn(ctx, tokens, m.d_ff)
    moe = _moe(ctx, tokens, decode=decode)
    kinds = [
        (m.n_layers + m.n_cross_attention_layers,
         [Part("attention", "compute", attn["proj_s"], attn["tp_s"], attn["proj_flops"], attn["tp_bytes"]),
          Part("attention_scores", "compute", attn["scores_s"], 0.0, attn["scores_flops"], 0.0)]),
        (m.n_dense_layers,
         [Part("dense_ffn", "compute", dense["s"], dense["tp_s"], dense["flops"], dense["tp_bytes"])]),
        (m.n_moe_layers,
         [Part("router", "compute", moe["router_s"], 0.0, moe["router_flops"], 0.0),
          Part("dispatch_a2a", "a2a", moe["permute_in_s"], moe["dispatch_s"], moe["permute_flops"], moe["send_in"]),
          Part("experts", "compute", moe["experts_s"], moe["shared_tp_s"], moe["experts_flops"],
               moe["shared_tp_bytes"]),
          Part("combine_a2a", "a2a", moe["permute_out_s"], moe["combine_s"], moe["permute_flops"], moe["send"])]),
    ]
    return kinds, moe


def recomputes(policy: str, part: str) -> bool:
    """Whether recompute ``policy`` (layout.RECOMPUTE) runs ``part`` forward once more before its backward.
    "selective": the attention scores (Korthikanti et al. 2022); "full" and "offload_inputs": every part of a
    transformer layer; "offload_projections" (MaxText's custom remat with the layer input and the q/k/v/out
    projections offloaded): every part of a layer but the projections; "none" and "offload" keep what they
    need. The output layer is never rerun (Megatron-Core checkpoints transformer layers, MaxText remats its
    decoder layers)."""
    if part in ("logits", "mtp_head"):
        return False
    if policy == "selective":
        return part == "attention_scores"
    if policy == "offload_projections":
        return part != "attention"
    return policy in ("full", "offload_inputs")


# FlashAttention's backward recomputes the scores from Q and K before its four gradient matmuls: five matmuls to
# the forward's two, 2.5x the forward's FLOPs (Dao-AILab/flash-attention benchmarks/benchmark_flash_attention.py
# counts the backward so, and the kernels' published TFLOP/s, hence the attention efficiencies, use that count).
FLASH_BACKWARD_UNITS = 2.5


def training_passes(recompute, names, attention: str = "flash") -> dict[str, tuple]:
    """Per part name: its (compute, communication) passes in a training step: the forward, the backward (twice
    the compute, the collectives once more; 2.5x for fused flash attention's scores, ``FLASH_BACKWARD_UNITS``)
    and one more forward where ``recompute`` (a RECOMPUTE index, or an array of them) reruns it."""
    out = {}
    for name in names:
        rerun = _reruns(name)  # per policy index: 1.0 where it reruns the part
        again = float(rerun[int(recompute)]) if np.ndim(recompute) == 0 else rerun[recompute]
        backward = FLASH_BACKWARD_UNITS if name == "attention_scores" and attention == "flash" else 2.0
        out[name] = (1.0 + backward + again, 2.0 + again)
    return out


@cache
def _reruns(part: str) -> np.ndarray:
    return np.array([1.0 * recomputes(policy, part) for policy in RECOMPUTE])


def logits_part(ctx: Context, tokens, training: bool) -> Part:
    """The output layer; in training its cross-entropy also reads and writes the fp32 logits (3 passes)."""
    m, t = ctx.m, ctx.plan.tensor
    time = ctx.mm(tokens, m.vocab_size / t, m.d_model, dtype=ctx.high)
    if training:
        time = time + ctx.mem(3 * tokens * m.vocab_size / t * 4)
    return Part("logits", "compute", time, 0.0, 2.0 * tokens * m.vocab_size / t * m.d_model, 0.0)


def _mtp_head_part(ctx: Context, tokens, out: Part) -> Part:
    """One MTP module's head (``MoEModel.mtp_layers``): its 2d -> d projection and another pass of the shared
    output layer ``out`` and its loss; its transformer layer counts with the model's own
    (``_mtp_layers_per_kind``)."""
    m = ctx.m
    proj_s = ctx.mm(tokens, m.d_model, 2 * m.d_model)
    return Part("mtp_head", "compute", out.compute_s + proj_s, 0.0, out.flops + 2.0 * tokens * 2 * m.d_model ** 2,
                0.0)


def _mtp_layers_per_kind(m) -> tuple:
    """Layers each kind of ``layer_kinds`` gains from the MTP modules: one attention and one FFN each, the FFN of
    the model's last kind (MoE where it has MoE layers)."""
    moe = m.n_moe_layers > 0
    return m.mtp_layers * 1.0, m.mtp_layers * (1.0 - moe), m.mtp_layers * (1.0 * moe)


def scaled_parts(parts: list[Part], scales: dict[str, float]) -> list[Part]:
    """Parts with compute and communication times multiplied by their measured part's scale (a profile's)."""
    if not scales:
        return parts
    return [part._replace(compute_s=part.compute_s * scales.get(ROW_PART[part.name], 1.0),
                          comm_s=part.comm_s * scales.get(ROW_PART[part.name], 1.0)) for part in parts]


_A2A_PARTS = ("dispatch_a2a", "combine_a2a")  # the parts whose communication the dispatch kernel runs


@dataclass(frozen=True)
class Overlap:
    """The overlap policy, the one place that says which communication hides behind which compute.

    "none" exposes every communication. "dp" (Megatron-Core's and MaxText's default) hides the gradient sync
    behind the last micro-batch's backward, FSDP gathers behind each micro-batch's compute and pipeline sends
    behind other micro-batches where the framework's schedule overlaps them; tensor-parallel collectives and
    the all-to-alls stay on the critical path.
    "full" is DualPipe's schedule: two micro-batches interleave, so a layer's communication runs under the other
    micro-batch's compute of the whole layer.

    Communication kernels that hide under compute (here, and the context-parallel gathers under the scores)
    hold a share f of the chip's SMs while they run
    (``dispatch_share`` for the expert all-to-alls, ``nccl_share`` for the collectives; dispatch.sm_share), so
    the compute beside them runs on the rest: compute W under communication c takes max(W + f c, c), not
    max(W, c); at least f c of the communication shows."""

    policy: str
    dispatch_share: float = 0.0
    nccl_share: float = 0.0

    def layer(self, parts: list[Part], passes: dict | None = None):
        """One layer of a kind over every pass (``passes``: per part name its compute and communication passes,
        ``training_passes``; one each without), and the fraction of its communication left exposed."""
        one = (1.0, 1.0)
        compute = sum(part.compute_s * (passes or {}).get(part.name, one)[0] for part in parts)
        comms = [part.comm_s * (passes or {}).get(part.name, one)[1] for part in parts]
        comm = sum(comms)
        if self.policy != "full":
            return compute + comm, 1.0
        held = sum(c * (self.dispatch_share if part.name in _A2A_PARTS else self.nccl_share)
                   for c, part in zip(comms, parts, strict=True))
        layer_s = maximum(compute + held, comm)
        return layer_s, where(comm > 0, (layer_s - compute) / maximum(comm, 1e-300), 0.0)

    def pipeline_sends(self, p2p_s, schedule_hides):
        """Exposed pipeline sends: all under "none"; else, where the schedule overlaps them with other
        micro-batches (``schedule_hides``: the framework's interleaved 1F1B, XLA's async permutes), the share of
        their time their SMs take from that compute."""
        return p2p_s if self.policy == "none" else where(schedule_hides, self.nccl_share * p2p_s, p2p_s)

    def offload(self, transfer_s, layer_s):
        """Exposed host transfers of one layer's offloaded activations: out during its forward (a third of the
        layer's time), back during its backward (two thirds), each a side stream under that pass (on the copy
        engines: no SMs held)."""
        if self.policy == "none":
            return 2.0 * transfer_s
        return maximum(0.0, transfer_s - layer_s / 3.0) + maximum(0.0, transfer_s - layer_s * (2.0 / 3.0))

    def data_parallel(self, grad_s, fsdp_s, stage_s, micro_batches):
        """Exposed gradient sync (under the last backward, 2/3 of a stage's time) and FSDP gathers (under
        every micro-batch's compute). Both leave through the device's same links, so together they hide under
        that compute at most once: what exceeds it is exposed, whichever part it is charged to (the gathers)."""
        if self.policy == "none":
            return grad_s, fsdp_s
        f = self.nccl_share  # the SMs the collectives hold: at least f of their time shows (class docstring)
        grad = maximum(f * grad_s, grad_s - stage_s * (2.0 / 3.0))
        if not np.any(fsdp_s):  # no gathers: the sync alone (what follows gives the same, at a grid's cost)
            return grad, fsdp_s
        window = stage_s * micro_batches
        both = maximum(maximum(grad + maximum(0.0, fsdp_s - window), grad_s + fsdp_s - window), f * (grad_s + fsdp_s))
        return grad, both - grad


# ------------------------------------------------------------------ training


def _micro_batches(plan: Plan, gbt: int) -> tuple[np.ndarray, np.ndarray]:
    """Micro-batches per step and a validity mask (whole sequences per shard and micro-batch)."""
    s = plan.model.seq_len
    seqs = gbt // s
    per_shard = seqs // plan.batch_shards
    ok = (gbt % s == 0) & (seqs % plan.batch_shards == 0) & (per_shard % plan.micro_batch_size == 0) & (per_shard > 0)
    return maximum(per_shard // plan.micro_batch_size, 1), ok


def plan_costs(plan: Plan, topo: Topology, global_batch_tokens: int, dtype: str = "bf16", profile=None,
               routing: Routing | None = None, overlap: str = "dp", breakdown: bool = True,
               dispatch: str = "nccl", kernels: frameworks.Framework | None = None,
               hbm_reserve: float = HBM_RESERVE) -> dict:
    """Training cost of every candidate of ``plan``: step time, tokens/s, MFU, memory, drop rate, fits,
    valid, and with ``breakdown`` the per-part times, FLOPs, bytes and counts. Each value has the
    broadcast shape of the fields it depends on (the search broadcasts them over its grid)."""
    ctx = make_context(plan, topo, dtype, profile, routing, dispatch, kernels)
    gbt = global_batch_tokens
    m, p = ctx.m, plan
    mb, valid = _micro_batches(plan, gbt)
    pp, v = p.pipeline, p.virtual_pipeline
    tokens = p.micro_batch_size * m.seq_len / p.context  # per device of a batch shard, per micro-batch
    stages = stage_layers(m.n_layers, pp, v, p.first_stage_layers, p.last_stage_layers)
    kinds, moe = layer_kinds(ctx, tokens)
    scales = part_scales(profile)  # a profile's measured per-part time scales, on every row of their part
    # stages hold the model's mix of layers: each kind's count in an average layer
    kinds = [(count / m.n_layers, scaled_parts(parts, scales)) for count, parts in kinds]
    logits = logits_part(ctx, tokens, training=True)
    last_parts = scaled_parts([logits], scales)
    mtp_head = scaled_parts([_mtp_head_part(ctx, tokens, logits)], scales) if m.mtp_layers else []
    passes = training_passes(p.recompute, [part.name for _, parts in kinds for part in parts] + ["logits"]
                             + [part.name for part in mtp_head], ctx.attention)
    policy = Overlap(overlap, ctx.dispatch_share, ctx.nccl_share)
    out: dict = {}
    # MTP modules (MoEModel.mtp_layers) spread over the stages with the layers, as a pipeline layout balances them
    # (Megatron's --pipeline-model-parallel-layout gives the MTP stage fewer layers): per layer, their share
    kinds = [(count + mtp / m.n_layers, parts) for (count, parts), mtp in zip(kinds, _mtp_layers_per_kind(m),
                                                                            strict=True)]
    layer_s, shares = 0.0, []
    for count, parts in kinds:
        kind_s, exposed = policy.layer(parts, passes)
        layer_s = layer_s + kind_s * count
        shares.append((count, parts, exposed))
    if mtp_head:
        layer_s = layer_s + policy.layer(mtp_head, passes)[0] * (m.mtp_layers / m.n_layers)
        shares.append((m.mtp_layers / m.n_layers, mtp_head, 1.0))
    host = _offload(ctx, tokens)
    offload_s = policy.offload(host["transfer_s"], layer_s) if np.any(host["bytes"]) else 0.0
    layer_s = layer_s + offload_s
    act = tokens * m.d_model * ctx.b / p.tensor
    hides = True if ctx.p2p_overlap == "always" else v > 1
    p2p = policy.pipeline_sends(2.0 * v * ctx.coll("p2p", act * (pp > 1), "pipeline"), hides)
    even = not np.any((p.first_stage_layers > 0) | (p.last_stage_layers > 0))
    pipe = _pipeline(stages, layer_s, policy.layer(last_parts, passes)[0], p2p, pp, v, even)
    stage_s = pipe["slowest_s"]
    if breakdown:  # the slowest stage's layers, and the output layer when that stage is the last
        for count, parts, exposed in shares:
            _layer_rows(out, parts, passes, exposed, count * pipe["slowest_layers"] * mb)
        _layer_rows(out, last_parts, passes, 1.0, pipe["last_is_slowest"] * mb)
        if np.any(host["bytes"]):  # a row only where activations go to host memory
            out["activation_offload"] = offload_s * pipe["slowest_layers"] * mb
            out["activation_offload:bytes"] = 2.0 * host["bytes"] * pipe["slowest_layers"] * mb
            out["activation_offload:count"] = pipe["slowest_layers"] * mb
        out["pipeline_p2p"] = p2p * mb
        out["pipeline_p2p:bytes"] = 2.0 * v * act * mb * (pp > 1)
        out["pipeline_bubble"] = pipe["bubble_s"]

    counts = M.param_counts(m)
    dense_local = counts["non_expert"] / (pp * p.dense_weight_shards)
    expert_local = counts["expert"] / (pp * p.expert_weight_shards)
    sync = _data_parallel(ctx, counts, mb)
    grad_sync, fsdp_gather = policy.data_parallel(sync["grad_s"] * scales.get("grad_sync", 1.0),
                                                  sync["fsdp_s"] * scales.get("grad_sync", 1.0), stage_s, mb)
    optimizer = ctx.mem(30.0 * (dense_local + expert_local)) * scales.get("optimizer", 1.0)
    if breakdown:
        out.update({"grad_sync": grad_sync, "grad_sync:bytes": sync["grad_bytes"], "fsdp_gather": fsdp_gather,
                    "fsdp_gather:bytes": sync["fsdp_bytes"], "optimizer": optimizer,
                    "optimizer:bytes": 30.0 * (dense_local + expert_local)})
    step = stage_s * mb + pipe["bubble_s"] + grad_sync + (fsdp_gather + optimizer)
    out.update(_train_memory(ctx, counts, tokens, mb, moe["send"], moe["gathered"], stages, host["bytes"]))
    out["step_time_s"] = step
    out["tokens_per_s"] = gbt / step
    out["model_flops"] = M.model_flops_per_token(m, True) * gbt
    out["mfu"] = out["model_flops"] / (topo.num_devices * topo.chip.peak_bf16_flop_per_s) / step
    out["drop_rate"] = moe["drop"] * (m.n_moe_layers > 0)
    out["micro_batches"] = mb
    out["valid"] = valid
    out["fits"] = out["memory_per_device_bytes"] <= usable_hbm_bytes(topo, hbm_reserve)
    return out


def _offload(ctx: Context, tokens) -> dict:
    """One average layer's activations moved to host memory, per device, and their transfer one way over the
    device's host link at its rate: the tensors of ``layout.OFFLOADED_TENSORS`` (all a layer stores without
    recompute under "offload")."""
    r = ctx.plan.recompute
    if not np.any(r >= RECOMPUTE.index(OFFLOADS[0])):
        return {"bytes": 0.0, "transfer_s": 0.0}
    per_token = 0.0
    for policy, names in OFFLOADED_TENSORS.items():
        size = _activation_bytes_per_token_layer(ctx) if names is None else _tensor_bytes_per_token(ctx, names)
        per_token = per_token + (r == RECOMPUTE.index(policy)) * size
    bytes_ = tokens / ctx.plan.tensor * per_token
    link = ctx.topo.host_link
    return {"bytes": bytes_, "transfer_s": bytes_ / link.bw_bytes_per_s if link is not None else 0.0 * bytes_}


def _tensor_bytes_per_token(ctx: Context, names) -> float:
    """Bytes per token of a layer's named tensors (MaxText's checkpoint names), before tensor sharding."""
    m = ctx.m
    width = {"decoder_layer_input": m.d_model, "query_proj": m.n_heads * m.d_head,
             "key_proj": m.n_kv_heads * m.d_head, "value_proj": m.n_kv_heads * m.d_head, "out_proj": m.d_model}
    return sum(width[name] for name in names) * ctx.b


def _pipeline(stages, layer_s, logits_s, p2p_s, pp, v, even: bool = False) -> dict:
    """One micro-batch's time on each stage (its layers at the average layer's time, the output layer on the
    last, the sends), and the 1F1B step: m x the slowest stage, plus the fill and drain, in which every other
    stage's time passes once (over v with interleaved virtual stages; (p - 1) / v stage times when even)."""
    first_n, middle_n, last_n = stages
    if even:  # every stage holds the same layers, so the last (the output layer's too) is the slowest
        # (small factors first: layer_s spans the search grid, the stage counts only its pipeline axes)
        last = last_n * layer_s + (logits_s + p2p_s)
        bubble = layer_s * ((pp - 1) * first_n / v) + p2p_s * ((pp - 1) / v)  # (p - 1) / v other stages' time
        return {"slowest_s": last, "bubble_s": bubble, "slowest_layers": last_n, "last_is_slowest": 1.0}
    first, middle, last = first_n * layer_s + p2p_s, middle_n * layer_s + p2p_s, last_n * layer_s + logits_s + p2p_s
    slowest = maximum(maximum(first, middle), last)
    every = where(pp > 1, first + (pp - 2) * middle + last, last)
    last_is_slowest = last >= maximum(first, middle)
    layers = where(last_is_slowest, last_n, where(first >= middle, first_n, middle_n))
    return {"slowest_s": slowest, "bubble_s": (every - slowest) / v, "slowest_layers": layers,
            "last_is_slowest": 1.0 * last_is_slowest}


def _layer_rows(out: dict, parts, passes: dict, exposed, times) -> None:
    """Breakdown rows of one layer kind: compute as it runs, communication as much as stays exposed."""
    for name, kind, compute, comm, flops, comm_bytes in parts:
        compute_passes, comm_passes = passes[name]
        c, k = compute * compute_passes, comm * comm_passes * exposed
        if kind == "a2a":
            out[name] = (c + k) * times
        else:
            out[name] = c * times
            out[f"{name}_tp"] = k * times
        out[f"{name}:flops"] = flops * 3.0 * times
        out[f"{name}:bytes"] = comm_bytes * comm_passes * times
        out[f"{name}:count"] = times


def _data_parallel(ctx: Context, counts: dict, mb) -> dict[str, np.ndarray]:
    """Gradient sync (Layout.gradient_bytes per value) over the data/fsdp, expert-fsdp and expert-data groups;
    FSDP parameter gathers."""
    p = ctx.plan
    dense_stage = counts["non_expert"] / (p.pipeline * p.tensor)  # before FSDP sharding
    grad_bytes = p.gradient_bytes * dense_stage
    has_fsdp, no_fsdp = p.fsdp > 1, p.fsdp == 1
    # the replicas of a dense shard: data x context (weights are whole on every context rank, as on every data rank)
    grad = where(has_fsdp, ctx.coll("reduce_scatter", grad_bytes * has_fsdp, "fsdp")
                 + ctx.coll("all_reduce", grad_bytes / p.fsdp * has_fsdp, "replicas"),
                 ctx.coll("all_reduce", grad_bytes * no_fsdp, "replicas"))
    replicated = p.batch_block > p.expert_weight_shards  # the expert shards have replicas to sum with
    expert_shard = p.gradient_bytes * counts["expert"] / (p.pipeline * p.expert_weight_shards) * replicated
    weights = _fsdp_weight_bytes(ctx, counts)
    expert_grads = p.gradient_bytes * counts["expert"] / (p.pipeline * p.expert_block) * (weights["expert"] > 0)
    grad = grad + ctx.coll("reduce_scatter", expert_grads, "expert_fsdp") + ctx.coll("all_reduce", expert_shard,
                                                                                      "expert_data")
    gather = 2.0 * _fsdp_gather_s(ctx, weights) * mb  # forward and backward
    return {"grad_s": grad, "grad_bytes": grad_bytes + expert_grads + expert_shard, "fsdp_s": gather,
            "fsdp_bytes": 2.0 * (weights["dense"] + weights["expert"]) * mb}


def _fsdp_weight_bytes(ctx: Context, counts: dict) -> dict[str, np.ndarray]:
    """Weights a device gathers for one forward of its pipeline stage under FSDP (ZeRO-3), at the compute
    width (``_gather_width``): its tensor shard of the dense weights over the fsdp group, and its expert group's
    experts over the fsdp ranks that split them further ("expert_fsdp": MaxText's fsdp_shard_on_exp,
    torchtitan's FSDP of the routed experts). Zero where nothing is split beyond the device's own share."""
    p = ctx.plan
    width = _gather_width(ctx)
    dense = counts["non_expert"] / (p.pipeline * p.tensor) * width * (p.fsdp > 1)
    expert = counts["expert"] / (p.pipeline * p.expert_block) * width * (p.expert_weight_shards > p.expert_block)
    return {"dense": dense, "expert": expert}


def _gather_width(ctx: Context) -> float:
    """Bytes per weight value FSDP gathers. Training: the activations' width (16-bit under 8-bit training), or 1
    where the layout gathers 8-bit weights (Layout.quantized_gather) under an 8-bit dtype. Inference: the
    served weights' own width (fp8/int8: 1 byte)."""
    if not ctx.training:
        return float(dtype_bytes(ctx.dtype))
    return 1.0 if ctx.plan.quantized_gather and ctx.casts else ctx.b


def _fsdp_gather_s(ctx: Context, weights: dict) -> np.ndarray:
    """One FSDP all-gather of a stage's weights (``_fsdp_weight_bytes``), dense and experts over their groups."""
    return ctx.coll("all_gather", weights["dense"], "fsdp") + ctx.coll("all_gather", weights["expert"], "expert_fsdp")


def _activation_bytes_per_token_layer(ctx: Context):
    """Stored activations per token per layer (flash attention: no s^2 term), averaged over layer kinds.

    Attention: block input, norm output, q, k, v, attention output (Korthikanti et al. 2022 without the
    score matrix). FFN: input, norm, gate/up/activation (x3 of the width); MoE: the routed copies at
    k x capacity factor, router logits in fp32."""
    m, b = ctx.m, ctx.b
    attn = b * (3 * m.d_model + 2 * m.n_heads * m.d_head + 2 * m.n_kv_heads * m.d_head)
    up = 3 if m.gated_ffn else 2
    dense = b * (2 * m.d_model + up * m.d_ff)
    cf = m.capacity_factor_array
    copies = m.top_k * where(M.is_dropless(cf), 1.0, cf)  # dropless: one copy per choice
    moe = b * (2 * m.d_model + copies * (m.d_model + up * m.expert_d_ff)) + 4 * m.num_experts
    moe = moe + b * m.num_shared_experts * up * m.expert_d_ff
    return attn + (dense * m.n_dense_layers + moe * m.n_moe_layers) / m.n_layers


def _train_memory(ctx: Context, counts: dict, tokens, mb, send, gathered, stages, host) -> dict[str, np.ndarray]:
    """Memory of the device that needs the most. Even split: a stage's average (L / p layers, the embeddings
    spread over the stages, p micro-batches in flight on 1F1B's first stage) and the output layer's fp32 logits.
    Uneven split: the larger of the first stage (its layers, the input embedding, p micro-batches in flight)
    and the last (its layers, the output layer and its logits, one micro-batch in flight). ``host``: one layer's
    activations offloaded to host memory (``_offload``)."""
    m, p = ctx.m, ctx.plan
    pp = p.pipeline
    in_flight = where(pp > 1, minimum(mb, pp) * (1.0 + (pp - 1) / (pp * p.virtual_pipeline)), 1.0)
    parts = (ctx, counts, tokens, send, gathered, host)
    even = _stage_memory(*parts, m.n_layers / pp, in_flight, counts["embedding"] / pp, True)
    uneven = (p.first_stage_layers > 0) | (p.last_stage_layers > 0)
    if not np.any(uneven):
        return even
    first_n, _, last_n = stages
    table = m.vocab_size * m.d_model  # the input embedding on the first stage, the output layer on the last
    first = _stage_memory(*parts, first_n, in_flight, table, False)
    last = _stage_memory(*parts, last_n, 1.0, table, True)
    first_wins = first["memory_per_device_bytes"] >= last["memory_per_device_bytes"]
    return {k: where(uneven, where(first_wins, first[k], last[k]), even[k]) for k in even}


def _stage_memory(ctx: Context, counts: dict, tokens, send, gathered, host, layers, in_flight, embedding,
                  logits: bool) -> dict[str, np.ndarray]:
    """One stage's memory: ``layers`` of the model's mix with ``embedding`` parameters of embedding tables,
    ``in_flight`` micro-batches of activations, and the fp32 logits when it holds the output layer."""
    m, p = ctx.m, ctx.plan
    t = p.tensor
    share = layers / m.n_layers
    params = ((counts["non_expert"] - counts["embedding"]) * share + embedding) / p.dense_weight_shards \
        + counts["expert"] * share / p.expert_weight_shards
    mixed = ctx.dtype != "fp32"
    master = mixed and ctx.master_weights  # 16-bit weights and an fp32 master copy, or the weights in fp32
    optimizer = params * ((4.0 if master else 0.0) + 8.0)  # fp32 master, Adam m and v
    if p.shard_optimizer:  # distributed optimizer (ZeRO-1) over the data-parallel replicas
        optimizer = optimizer / p.data
    mem = {"mem:weights": params * (2.0 if master else 4.0),
           "mem:optimizer_and_grads": params * p.gradient_bytes + optimizer}
    per_token_layer = _activation_bytes_per_token_layer(ctx)
    if ctx.attention == "unfused":  # softmax output, dropout mask and output: 5 a s^2 b per sequence (Korthikanti
        kept = p.recompute == RECOMPUTE.index("none")  # et al. 2022 eq. 1), dropped by selective recompute
        per_token_layer = per_token_layer + kept * 2.5 * ctx.b * m.n_heads * m.seq_len
    full = p.recompute == RECOMPUTE.index("full")
    layer = tokens / t * per_token_layer
    everything = p.recompute == RECOMPUTE.index("offload")
    partly = p.recompute > RECOMPUTE.index("offload")  # the rest recomputed: one layer's worth for its backward
    transit = minimum(2.0, layers * in_flight) * host  # on the device: the layer computing, the one in transit
    stored = where(full, tokens / t * m.d_model * ctx.b * layers * in_flight + layer,
                   where(everything, transit, where(partly, layer + transit, layer * layers * in_flight)))
    mem["mem:activations"] = stored + (tokens * m.vocab_size / t * 4.0 if logits else 0.0)  # fp32 logits
    mem["host:activations"] = host * layers * in_flight
    mem["mem:a2a_buffers"] = a2a_buffer_bytes(send, gathered, training=True)
    mem["mem:fsdp_gathered"] = _fsdp_gathered_bytes(ctx, _gather_width(ctx))
    # the activations last: the other parts leave out some of the search grid's axes, so they add up on smaller
    # arrays and meet the grid once
    mem["memory_per_device_bytes"] = sum(v for k, v in mem.items() if k.startswith("mem:") and k != "mem:activations") \
        + mem["mem:activations"]
    return mem


def a2a_buffer_bytes(send, gathered, training: bool):
    """The all-to-all buffers of one MoE layer: a training step holds dispatch and combine apart, each with its
    send and receive buffer (4 x send) and the expert-tensor set's gathered tokens and partial outputs
    (2 x gathered); a forward alone reuses the dispatch buffers for the combine (2 x send, 1 x gathered)."""
    return (4.0 * send + 2.0 * gathered) if training else (2.0 * send + gathered)


def _fsdp_gathered_bytes(ctx: Context, weight_bytes: float):
    """Weights FSDP (ZeRO-3) gathers for compute: the largest block's, twice (the one computing and the next one
    prefetched), as each device holds them for its tensor shard and its expert group's experts. Zero without
    FSDP sharding (fsdp = 1, and experts not split beyond their expert group)."""
    m, p = ctx.m, ctx.plan
    attn = M.attention_params(m)
    dense_block = where(m.n_dense_layers > 0, (attn + M.ffn_params(m, m.d_ff)) * (p.fsdp > 1) / p.tensor, 0.0)
    experts_sharded = p.expert_weight_shards > p.expert_block
    moe_block = where(m.n_moe_layers > 0, M.dense_params_per_moe_layer(m) * (p.fsdp > 1) / p.tensor
                      + M.expert_params_per_layer(m) * experts_sharded / p.expert_block, 0.0)
    return 2.0 * maximum(dense_block, moe_block) * weight_bytes


# ------------------------------------------------------------------ the scalar API
def estimate(model: M.MoEModel, topo: Topology, layout: Layout, global_batch_tokens: int, dtype: str = "bf16",
             mode: str = "train", profile=None, routing: Routing | None = None, overlap: str | None = None,
             dispatch: str | None = None, framework: str | None = None,
             hbm_reserve: float = HBM_RESERVE) -> Estimate:
    """Estimate one training step, one prefill forward, or one decode step of ``model``.

    ``framework`` (``frameworks.FRAMEWORKS``) sets the overlap policy, dispatch kernel and attention kernel
    as that framework runs them; an explicit ``overlap`` or ``dispatch`` wins. Default: "megatron".
    ``hbm_reserve``: the fraction of HBM kept for workspaces and fragmentation (``fits`` uses the rest)."""
    preset = frameworks.framework(framework or "megatron")
    overlap = preset.overlap if overlap is None else overlap
    dispatch = preset.dispatch if dispatch is None else dispatch
    if mode not in MODES:
        raise ValueError(f"mode: got {mode!r}; expected one of {list(MODES)}")
    if dispatch not in KERNELS:
        raise ValueError(f"dispatch: got {dispatch!r}; expected one of {list(KERNELS)}")
    if overlap not in OVERLAPS:
        raise ValueError(f"overlap: got {overlap!r}; expected one of {list(OVERLAPS)}")
    bounds.check_int("global_batch_tokens", global_batch_tokens, *bounds.GLOBAL_BATCH_TOKENS)
    bounds.check_number("hbm_reserve", hbm_reserve, 0.0, 0.9)
    dtype_bytes(dtype)
    check_inputs(model, topo, layout, profile, routing)
    check_layout(model, topo, layout)
    plan = Plan.from_layout(model, layout)
    if mode != "train" and layout.context > 1:
        raise ValueError(f"layout.context: got {layout.context}; context parallelism is modelled for training; "
                         "expected 1 for prefill and decode")
    if mode != "train":
        return _inference(make_context(plan, topo, dtype, profile, routing, dispatch, preset, training=False), mode,
                          int(global_batch_tokens), hbm_reserve)
    costs = plan_costs(plan, topo, int(global_batch_tokens), dtype, profile, routing, overlap, dispatch=dispatch,
                       kernels=preset, hbm_reserve=hbm_reserve)
    if not costs["valid"]:
        raise ValueError(
            f"global_batch_tokens: {global_batch_tokens} = {global_batch_tokens / model.seq_len:g} sequences of "
            f"{model.seq_len}; expected a whole number of sequences per batch shard ({layout.batch_shards} shards) "
            f"and of micro-batches of {layout.micro_batch_size}")
    return _estimate_from_costs(costs, topo, hbm_reserve)


def check_inputs(model, topo, layout, profile, routing) -> None:
    """Types of the objects ``estimate`` and ``search`` take: the wrong object is an error, never ignored."""
    for name, value, kind in (("model", model, M.MoEModel), ("topology", topo, Topology), ("layout", layout, Layout)):
        if not isinstance(value, kind) and not (name == "layout" and value is None):
            raise ValueError(f"{name}: got a {type(value).__name__}; expected a {kind.__name__}")
    if routing is not None and not isinstance(routing, Routing):
        raise ValueError(f"routing: got a {type(routing).__name__}; expected a moeplan.Routing or None")
    if profile is not None and not (isinstance(getattr(profile, "compute", None), ComputeEfficiency)
                                    and isinstance(getattr(profile, "comm", None), CommParams)):
        raise ValueError(f"profile: got a {type(profile).__name__}; expected a moeplan.Profile (mp.load_profile) "
                         "or None")


_ROWS = [("attention", "compute"), ("attention_tp", "comm"), ("attention_scores", "compute"),
         ("dense_ffn", "compute"), ("dense_ffn_tp", "comm"), ("router", "compute"), ("dispatch_a2a", "a2a"),
         ("experts", "compute"), ("experts_tp", "comm"), ("combine_a2a", "a2a"), ("logits", "compute"),
         ("mtp_head", "compute"), ("activation_offload", "comm"), ("pipeline_p2p", "comm"),
         ("pipeline_bubble", "bubble"), ("grad_sync", "comm"), ("fsdp_gather", "comm"),
         ("optimizer", "optimizer")]


def _estimate_from_costs(costs: dict, topo: Topology, hbm_reserve: float = HBM_RESERVE) -> Estimate:
    """The Estimate of a one-candidate ``plan_costs`` result."""
    get = costs.get
    rows = []
    for name, kind in _ROWS:
        if name in costs and (costs[name] > 0 or not name.endswith("_tp")):
            rows.append(LayerRow(name, kind, float(costs[name]), float(get(f"{name}:flops", 0.0)),
                                 float(get(f"{name}:bytes", 0.0)), float(get(f"{name}:count", 0.0))))
    memory = {k[4:]: float(v) for k, v in costs.items() if k.startswith("mem:")}
    step = float(costs["step_time_s"])
    est = _finish(topo, "train", step, float(costs["model_flops"]), float(costs["tokens_per_s"]) * step, memory,
                  rows, float(costs["drop_rate"]), int(costs["micro_batches"]), hbm_reserve)
    est.details["host_activation_bytes"] = float(costs["host:activations"])  # offloaded, per device
    return est


def _finish(topo: Topology, mode: str, step: float, model_flops: float, tokens: float, memory: dict[str, float],
            rows: list[LayerRow], drop: float, micro_batches: int, hbm_reserve: float = HBM_RESERVE) -> Estimate:
    total_mem = sum(memory.values())
    usable = usable_hbm_bytes(topo, hbm_reserve)
    fits = total_mem <= usable
    reason = "" if fits else (f"needs {total_mem / GIB:.1f} GiB per device "
                              f"({', '.join(f'{k} {v / GIB:.1f}' for k, v in memory.items())}); "
                              f"the chip has {topo.chip.hbm_capacity_bytes / GIB:.1f} GiB, {usable / GIB:.1f} GiB "
                              f"after {hbm_reserve:.0%} kept for workspaces")
    mfu = model_flops / (step * topo.num_devices * topo.chip.peak_bf16_flop_per_s)
    bounds.check_finite_outputs(f"estimate ({mode})", {"step_time_s": step, "tokens_per_s": tokens / step,
                                                       "memory_per_device_bytes": total_mem, "mfu": mfu,
                                                       **{f"{r.name} time_s": r.time_s for r in rows}})
    return Estimate(mode, step, tokens / step, mfu, total_mem, memory, fits, reason, rows, drop, micro_batches,
                    {"model_flops": model_flops})


# ------------------------------------------------------------------ inference
def _inference(ctx: Context, mode: str, gbt: int, hbm_reserve: float = HBM_RESERVE) -> Estimate:
    """prefill: one forward over ``gbt`` tokens. decode: one new token for each of ``gbt`` sequences,
    attending to ``seq_len`` cached tokens. Pipeline stages run one after another (no micro-batches)."""
    m, topo, p = ctx.m, ctx.topo, ctx.plan
    shards = int(p.batch_shards)
    if gbt % shards:
        raise ValueError(f"global_batch_tokens: got {gbt}; expected a positive multiple of the {shards} "
                         "batch shards (data x fsdp)")
    decode = mode == "decode"
    tokens = gbt / shards
    if not decode and tokens % m.seq_len:
        raise ValueError(f"global_batch_tokens: prefill of {gbt} tokens; expected whole sequences of {m.seq_len} "
                         "per batch shard")
    kinds, moe = layer_kinds(ctx, tokens, decode)
    kinds.append((1.0, [logits_part(ctx, tokens, training=False)]))
    scales = part_scales(ctx.profile)
    policy = Overlap("none")  # one forward, nothing to hide behind: each part is its compute + communication
    rows = [LayerRow(part.name, part.kind, float(policy.layer([part])[0] * count), float(part.flops * count),
                     float(part.comm_bytes * count), float(count))
            for count, parts in kinds if count for part in scaled_parts(parts, scales)]
    drop, send, gathered = ((float(moe[k]) for k in ("drop", "send", "gathered")) if m.n_moe_layers
                            else (0.0, 0.0, 0.0))
    pp = int(p.pipeline)
    counts = M.param_counts(m)
    if pp > 1:
        act = tokens * m.d_model * ctx.b
        p2p = (pp - 1) * float(ctx.coll("p2p", act, "pipeline"))
        rows.append(LayerRow("pipeline_p2p", "comm", p2p, 0.0, act * (pp - 1), pp - 1))
    if p.fsdp > 1:  # FSDP weights are gathered for every forward
        weights = _fsdp_weight_bytes(ctx, counts)
        gather = pp * float(_fsdp_gather_s(ctx, weights)) * scales.get("grad_sync", 1.0)
        rows.append(LayerRow("fsdp_gather", "comm", gather, 0.0, float(weights["dense"] + weights["expert"]) * pp,
                             1.0))
    step = sum(r.time_s for r in rows)
    params = float(counts["non_expert"] / (pp * p.dense_weight_shards)
                   + counts["expert"] / (pp * p.expert_weight_shards))
    sequences = tokens if decode else tokens / m.seq_len
    weight_bytes = dtype_bytes(ctx.dtype)  # served weights are stored at the dtype's width (fp8/int8: 1 byte)
    memory = {"weights": params * weight_bytes,
              "kv_cache": sequences * M.attended_keys(m, m.seq_len) * M.kv_cache_bytes_per_token(m, ctx.b)
              / (pp * int(p.tensor)),  # windowed layers keep their window's keys
              "activations": float(tokens * _activation_bytes_per_token_layer(ctx) / p.tensor),
              "a2a_buffers": a2a_buffer_bytes(send, gathered, training=False)}
    flops = M.model_flops_per_token(m.base, training=False) * gbt
    est = _finish(topo, mode, step, flops, gbt, memory, rows, drop, 1, hbm_reserve)
    est.details.update({
        "min_devices_to_hold_weights": float(np.ceil(counts["total"] * weight_bytes / topo.chip.hbm_capacity_bytes)),
        "batch_for_busy_experts": float(np.ceil(m.num_experts / m.top_k)),
        "time_per_token_s": step if decode else step / max(tokens, 1.0),
    })
    return est
