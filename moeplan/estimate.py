"""estimate(model, topology, layout) -> per-layer breakdown, step time, tokens/s, MFU and memory.

One device's view of one step. A training step runs ``m`` micro-batches through ``p`` pipeline
stages (1F1B, ``v`` virtual stages): time = (m + (p - 1) / v) x (forward + backward of one
micro-batch on one stage), plus the exposed data-parallel gradient sync and FSDP gathers, plus the
optimizer. Inside a stage every layer is computed by roofline (``compute``) and every collective
by ``collectives`` on the layout's actual device groups.

Overlap policy (``overlap``): "none" exposes every communication; "dp" (default, what Megatron-Core
and MaxText do out of the box) hides the gradient sync behind the last micro-batch's backward and
FSDP gathers behind each micro-batch's compute, while tensor-parallel collectives and the MoE
all-to-alls stay on the critical path; "full" also hides all-to-all and tensor-parallel traffic
behind compute layer by layer (DualPipe-style), so a layer costs max(compute, comm).

Pipeline send/receive is exposed only under "none" (interleaved 1F1B overlaps it otherwise).
With an 8-bit ``dtype`` the linear layers run at the fp8 rate while attention, the output layer,
activations and communication stay in bf16, as in Transformer Engine's recipes.

Backward = 2x forward compute and the same collectives again (two more all-to-alls per MoE
layer). Recompute: "selective" recomputes attention scores, "full" the whole forward with its
collectives. MFU = model FLOPs (moe.model_flops_per_token) / (step time x devices x dense bf16 peak).
Memory (training): weights in ``dtype`` (fp32 for fp32 runs) + fp32 master weights + fp32 grads +
Adam m, v (18 bytes per parameter in mixed precision, 16 in fp32), activations of the micro-batches
in flight, all-to-all buffers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from moeplan import moe as M
from moeplan.collectives import CommParams, collective_time_s
from moeplan.compute import attention_time_s, matmul_time_s, memory_time_s
from moeplan.hardware import ComputeEfficiency
from moeplan.layout import Layout, check_layout, layout_mesh
from moeplan.routing import Routing, routing_stats
from moeplan.topology import Topology
from moeplan.units import dtype_bytes

MODES = ("train", "prefill", "decode")
OVERLAPS = ("none", "dp", "full")


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


@dataclass
class _Ctx:
    model: M.MoEModel
    topo: Topology
    layout: Layout
    dtype: str
    eff: ComputeEfficiency
    comm: CommParams
    routing: Routing
    groups: dict[str, np.ndarray]

    @property
    def b(self) -> float:
        """Bytes per activation / communicated element: 8-bit formats keep activations in bf16."""
        return 2.0 if dtype_bytes(self.dtype) < 2 else dtype_bytes(self.dtype)

    @property
    def high_precision(self) -> str:
        """Dtype of attention and the output layer: bf16 under fp8 training (Transformer Engine recipes)."""
        return "bf16" if dtype_bytes(self.dtype) < 2 else self.dtype

    def coll(self, op: str, nbytes: float, group: str) -> float:
        ids = self.groups[group]
        if ids.size < 2 or nbytes <= 0:
            return 0.0
        return float(collective_time_s(self.topo, op, float(nbytes), ids, params=self.comm))

    def mm(self, m, n, k, count=1.0, dtype: str | None = None) -> float:
        return float(matmul_time_s(m, n, k, self.topo.chip, dtype or self.dtype, self.eff, count))


def estimate(model: M.MoEModel, topo: Topology, layout: Layout, global_batch_tokens: int, dtype: str = "bf16",
             mode: str = "train", profile=None, routing: Routing | None = None, overlap: str = "dp") -> Estimate:
    """Estimate one step (train) or one forward (prefill) or one decode step of ``model``."""
    if mode not in MODES:
        raise ValueError(f"mode: got {mode!r}; expected one of {list(MODES)}")
    if overlap not in OVERLAPS:
        raise ValueError(f"overlap: got {overlap!r}; expected one of {list(OVERLAPS)}")
    dtype_bytes(dtype)
    check_layout(model, topo, layout)
    ctx = _context(model, topo, layout, dtype, profile, routing)
    if mode == "train":
        return _train(ctx, _micro_batches(model, layout, global_batch_tokens), global_batch_tokens, overlap)
    return _inference(ctx, mode, global_batch_tokens)


def _context(model, topo, layout, dtype, profile, routing) -> _Ctx:
    mesh = layout_mesh(topo, layout)
    edp = layout.batch_block // layout.expert_weight_shards  # replicas of one expert shard
    groups = {
        "tensor": mesh.groups("tensor")[0],
        "data": mesh.groups("data")[0],
        "fsdp": mesh.groups("fsdp")[0],
        "pipeline": mesh.groups("pipeline")[0][:2],
        "expert": np.arange(layout.expert),
        "expert_data": np.arange(0, layout.batch_block, layout.expert)[:edp],
    }
    eff = getattr(profile, "compute", None) or topo.chip.efficiency
    comm = getattr(profile, "comm", None) or CommParams()
    return _Ctx(model, topo, layout, dtype, eff, comm, routing or Routing(), groups)


def _micro_batches(model: M.MoEModel, layout: Layout, global_batch_tokens: int) -> int:
    if isinstance(global_batch_tokens, bool) or not isinstance(global_batch_tokens, int | np.integer) \
            or global_batch_tokens < 1:
        raise ValueError(f"global_batch_tokens: got {global_batch_tokens!r}; expected a positive integer")
    seqs, rest = divmod(global_batch_tokens, model.seq_len)
    per_shard, rest2 = divmod(seqs, layout.batch_shards)
    if rest or rest2 or per_shard % layout.micro_batch_size or per_shard == 0:
        raise ValueError(
            f"global_batch_tokens: {global_batch_tokens} = {global_batch_tokens / model.seq_len:g} sequences of "
            f"{model.seq_len}; expected a whole number of sequences per batch shard ({layout.batch_shards} shards) "
            f"and of micro-batches of {layout.micro_batch_size}"
        )
    return per_shard // layout.micro_batch_size


# ------------------------------------------------------------------ one micro-batch, one stage, forward
@dataclass
class _Part:
    compute_s: float = 0.0
    comm_s: float = 0.0
    flops: float = 0.0
    bytes: float = 0.0
    count: float = 0.0

    def add(self, other: _Part, times: float = 1.0) -> None:
        self.compute_s += other.compute_s * times
        self.comm_s += other.comm_s * times
        self.flops += other.flops * times
        self.bytes += other.bytes * times
        self.count += other.count * times


def _tp_comm_s(ctx: _Ctx, tokens: float) -> tuple[float, float]:
    """Tensor-parallel collectives around one block: AG + RS with sequence parallelism, else AR."""
    if ctx.layout.tensor == 1:
        return 0.0, 0.0
    nbytes = tokens * ctx.model.d_model * ctx.b
    if ctx.layout.sequence_parallel:
        return ctx.coll("all_gather", nbytes, "tensor") + ctx.coll("reduce_scatter", nbytes, "tensor"), 2 * nbytes
    return ctx.coll("all_reduce", nbytes, "tensor"), nbytes


def _attention(ctx: _Ctx, tokens: float, context: float) -> tuple[_Part, _Part]:
    """(projections + norms, scores) for one self-attention block on ``tokens`` tokens, each attending to
    ``context`` tokens (seq_len in training and prefill, the cache length in decode)."""
    m, t = ctx.model, ctx.layout.tensor
    width = M.attention_params(m) / m.d_model / t  # output features per rank, all projections together
    proj = _Part(count=1.0)
    proj.compute_s = ctx.mm(tokens, width, m.d_model) + float(memory_time_s(6 * tokens * m.d_model * ctx.b / t,
                                                                             ctx.topo.chip, ctx.eff))
    proj.flops = 2.0 * tokens * width * m.d_model
    proj.comm_s, proj.bytes = _tp_comm_s(ctx, tokens)
    scores = _Part(count=1.0)
    scores.flops = M.attention_score_flops(m) * context / m.seq_len * tokens / t
    sequences = tokens / m.seq_len if context == m.seq_len else tokens  # decode: one token per sequence
    kv_bytes = sequences * context * M.kv_cache_bytes_per_token(m, ctx.b) / m.n_layers / t
    scores.bytes = kv_bytes + tokens * m.n_heads * m.d_head * 2 * ctx.b / t
    # causal self-attention (decoder stacks) skips the masked half of the score blocks in training and
    # prefill (FlashAttention); the FLOPs reported keep the full count, as the MFU convention does
    causal = 0.5 if not m.encoder_decoder and context == m.seq_len and tokens >= m.seq_len else 1.0
    scores.compute_s = float(attention_time_s(scores.flops * causal, scores.bytes, ctx.topo.chip,
                                              ctx.high_precision, ctx.eff))
    return proj, scores


def _ffn(ctx: _Ctx, tokens: float, width: int) -> _Part:
    m, t = ctx.model, ctx.layout.tensor
    up = 2 if m.gated_ffn else 1
    part = _Part(count=1.0)
    part.compute_s = ctx.mm(tokens, up * width / t, m.d_model) + ctx.mm(tokens, m.d_model, width / t)
    part.compute_s += float(memory_time_s(3 * tokens * width / t * ctx.b, ctx.topo.chip, ctx.eff))
    part.flops = 2.0 * tokens * (up + 1) * width / t * m.d_model
    part.comm_s, part.bytes = _tp_comm_s(ctx, tokens)
    return part


@dataclass
class _MoE:
    router: _Part
    dispatch: _Part
    experts: _Part
    combine: _Part
    drop_rate: float
    a2a_bytes: float


def _moe(ctx: _Ctx, tokens: float, decode: bool = False) -> _MoE:
    """Router, dispatch all-to-all, expert FFNs, combine all-to-all for one MoE layer."""
    m, lay = ctx.model, ctx.layout
    group = max(int(round(tokens / lay.tensor)), 1)  # tokens this device routes (sequence-parallel shard)
    ep = lay.expert
    local = m.num_experts // ep
    router = _Part(count=1.0)
    router.compute_s = ctx.mm(group, m.num_experts, m.d_model, dtype="fp32")  # router in float32
    router.compute_s += float(memory_time_s(3 * group * m.num_experts * 4 + 4 * group * m.top_k * m.d_model * ctx.b,
                                            ctx.topo.chip, ctx.eff))
    router.flops = 2.0 * group * m.num_experts * m.d_model
    if m.capacity_factor is not None:
        cap = float(M.capacity(group, m))
        stats = routing_stats(group, m.num_experts, m.top_k, cap, 1, ctx.routing)
        per_expert = ep * cap  # padded: every group fills its slot
        send = m.num_experts * cap * m.d_model * ctx.b
        drop = stats.drop_rate
    else:
        stats = routing_stats(group * ep, m.num_experts, m.top_k, None, local, ctx.routing)
        per_expert = stats.max_device_load / local  # the straggler device sets the pace
        send = group * m.top_k * m.d_model * ctx.b * stats.max_device_load / stats.mean_device_load
        drop = 0.0
    active = local
    if decode:  # only experts that received a token read their weights
        active = local * (1.0 - (1.0 - m.top_k / m.num_experts) ** (group * ep))
    up = 2 if m.gated_ffn else 1
    experts = _Part(count=1.0)
    experts.compute_s = ctx.mm(per_expert, up * m.expert_d_ff, m.d_model, active) + ctx.mm(
        per_expert, m.d_model, m.expert_d_ff, active)
    experts.compute_s += float(memory_time_s(3 * per_expert * active * m.expert_d_ff * ctx.b, ctx.topo.chip, ctx.eff))
    experts.flops = 2.0 * per_expert * active * (up + 1) * m.expert_d_ff * m.d_model
    if m.num_shared_experts:
        experts.add(_ffn(ctx, tokens, m.num_shared_experts * m.expert_d_ff))
        experts.count = 1.0
    dispatch, combine = _Part(count=1.0), _Part(count=1.0)
    if ep > 1:
        dispatch.comm_s = combine.comm_s = ctx.coll("all_to_all", send, "expert")
        dispatch.bytes = combine.bytes = send
    permute = float(memory_time_s(2 * send, ctx.topo.chip, ctx.eff))
    dispatch.compute_s = combine.compute_s = permute
    return _MoE(router, dispatch, experts, combine, drop, send)


# ------------------------------------------------------------------ training
def _train(ctx: _Ctx, micro_batches: int, gbt: int, overlap: str) -> Estimate:
    m, lay, topo = ctx.model, ctx.layout, ctx.topo
    p, v = lay.pipeline, lay.virtual_pipeline
    tokens = lay.micro_batch_size * m.seq_len  # per batch shard and micro-batch
    # share of each layer kind on the slowest stage: ceil(L / (p v)) layers per virtual stage
    stage = math.ceil(m.n_layers / (p * v)) * v / m.n_layers
    n_attn = m.n_layers + m.n_cross_attention_layers
    proj, scores = _attention(ctx, tokens, m.seq_len)
    dense = _ffn(ctx, tokens, m.d_ff) if m.n_dense_layers else _Part()
    moe = _moe(ctx, tokens) if m.n_moe_layers else None
    logits = _Part(count=1.0)
    logits.compute_s = ctx.mm(tokens, m.vocab_size / lay.tensor, m.d_model, dtype=ctx.high_precision) + float(
        memory_time_s(3 * tokens * m.vocab_size / lay.tensor * 4, topo.chip, ctx.eff))
    logits.flops = 2.0 * tokens * m.vocab_size / lay.tensor * m.d_model

    # forward parts of one micro-batch on one stage: (name, kind, part, layers on the stage)
    parts = [("attention", "compute", proj, n_attn * stage), ("attention_scores", "compute", scores, n_attn * stage),
             ("dense_ffn", "compute", dense, m.n_dense_layers * stage)]
    if moe is not None:
        k = m.n_moe_layers * stage
        parts += [("router", "compute", moe.router, k), ("dispatch_a2a", "a2a", moe.dispatch, k),
                  ("experts", "compute", moe.experts, k), ("combine_a2a", "a2a", moe.combine, k)]
    parts.append(("logits", "compute", logits, 1.0))  # the last stage, which is the slowest

    recompute = {"none": 0.0, "selective": 0.0, "full": 1.0}[lay.recompute]
    rows: list[LayerRow] = []
    stage_s = 0.0
    per_mb = micro_batches + (p - 1) / v
    for name, kind, part, count in parts:
        passes = 3.0 + recompute + (1.0 if lay.recompute == "selective" and name == "attention_scores" else 0.0)
        compute = part.compute_s * passes * count
        comm_passes = 2.0 + recompute  # forward, backward (+ recomputed forward)
        comm = part.comm_s * comm_passes * count
        t = compute + comm if overlap != "full" else max(compute, comm)
        stage_s += t
        comm_row = "a2a" if kind == "a2a" else "comm"
        if kind == "a2a":
            rows.append(LayerRow(name, "a2a", t * micro_batches, part.flops * 3 * count * micro_batches,
                                 part.bytes * comm_passes * count * micro_batches, count * micro_batches))
            continue
        rows.append(LayerRow(name, kind, compute * micro_batches if overlap != "full" else t * micro_batches,
                             part.flops * 3 * count * micro_batches, 0.0, count * micro_batches))
        if comm > 0 and overlap != "full":
            rows.append(LayerRow(f"{name}_tp", comm_row, comm * micro_batches, 0.0,
                                 part.bytes * comm_passes * count * micro_batches, count * micro_batches))
    if p > 1:
        act = tokens * m.d_model * ctx.b / lay.tensor
        p2p = 2.0 * float(collective_time_s(topo, "p2p", act, ctx.groups["pipeline"], params=ctx.comm)) * v
        p2p = p2p if overlap == "none" else 0.0  # overlapped with the other micro-batches' compute otherwise
        stage_s += p2p
        rows.append(LayerRow("pipeline_p2p", "comm", p2p * micro_batches, 0.0, 2 * act * v * micro_batches,
                             2 * v * micro_batches))
        rows.append(LayerRow("pipeline_bubble", "bubble", stage_s * (p - 1) / v))
    pipe_s = stage_s * per_mb

    counts = M.param_counts(m)
    dense_local = counts["non_expert"] / (p * lay.dense_weight_shards)
    expert_local = counts["expert"] / (p * lay.expert_weight_shards)
    grad_s, fsdp_s, sync_rows = _data_parallel(ctx, counts, micro_batches)
    last_bwd = stage_s * 2.0 / 3.0
    exposed_grad = grad_s if overlap == "none" else max(0.0, grad_s - last_bwd)
    exposed_fsdp = fsdp_s if overlap == "none" else max(0.0, fsdp_s - stage_s * micro_batches)
    opt_s = float(memory_time_s(30.0 * (dense_local + expert_local), topo.chip, ctx.eff))
    rows += [LayerRow(sync_rows[0], "comm", exposed_grad, 0.0, sync_rows[1]),
             LayerRow("fsdp_gather", "comm", exposed_fsdp, 0.0, sync_rows[2]),
             LayerRow("optimizer", "optimizer", opt_s, 0.0, 30.0 * (dense_local + expert_local))]
    step = pipe_s + exposed_grad + exposed_fsdp + opt_s
    memory = _train_memory(ctx, counts, tokens, micro_batches, moe)
    return _finish(ctx, "train", step, gbt, M.model_flops_per_token(m, True) * gbt, memory, rows,
                   moe.drop_rate if moe else 0.0, micro_batches)


def _data_parallel(ctx: _Ctx, counts: dict, micro_batches: int) -> tuple[float, float, tuple[str, float, float]]:
    """Gradient sync (fp32 grads) over data/fsdp and expert-data groups; FSDP parameter gathers."""
    lay = ctx.layout
    p = lay.pipeline
    dense_stage = counts["non_expert"] / (p * lay.tensor)  # before FSDP sharding
    expert_stage = counts["expert"] / (p * lay.expert)
    grad = 0.0
    grad_bytes = 4.0 * dense_stage
    if lay.fsdp > 1:
        grad += ctx.coll("reduce_scatter", grad_bytes, "fsdp")
        grad += ctx.coll("all_reduce", grad_bytes / lay.fsdp, "data")
    else:
        grad += ctx.coll("all_reduce", grad_bytes, "data")
    expert_shard = 4.0 * counts["expert"] / (p * lay.expert_weight_shards)
    grad += ctx.coll("all_reduce", expert_shard, "expert_data")
    fsdp = 0.0
    gather_bytes = 0.0
    if lay.fsdp > 1:
        gather_bytes = (dense_stage + expert_stage * lay.expert / lay.expert_weight_shards * 0) * ctx.b
        per_mb = 2.0 * ctx.coll("all_gather", dense_stage * ctx.b, "fsdp")  # forward and backward
        fsdp = per_mb * micro_batches
        gather_bytes = 2.0 * dense_stage * ctx.b * micro_batches
    return grad, fsdp, ("grad_sync", grad_bytes + expert_shard, gather_bytes)


def _train_memory(ctx: _Ctx, counts: dict, tokens: float, micro_batches: int, moe: _MoE | None) -> dict[str, float]:
    m, lay = ctx.model, ctx.layout
    p, t = lay.pipeline, lay.tensor
    params = counts["non_expert"] / (p * lay.dense_weight_shards) + counts["expert"] / (p * lay.expert_weight_shards)
    mixed = ctx.dtype != "fp32"
    weights = params * (2.0 if mixed else 4.0)
    grads = params * 4.0
    optimizer = params * ((4.0 if mixed else 0.0) + 8.0)  # fp32 master, Adam m and v
    if lay.shard_optimizer:  # distributed optimizer (ZeRO-1) over the data-parallel replicas
        optimizer /= lay.data
    states = grads + optimizer
    per_token_layer = _activation_bytes_per_token_layer(ctx)
    in_flight = min(micro_batches, p) * (1.0 + (p - 1) / (p * lay.virtual_pipeline)) if p > 1 else 1.0
    layers = m.n_layers / p
    if lay.recompute == "full":
        acts = tokens / t * m.d_model * ctx.b * layers * in_flight + tokens / t * per_token_layer
    else:
        acts = tokens / t * per_token_layer * layers * in_flight
    acts += tokens * m.vocab_size / t * 4.0  # fp32 logits of the last stage
    buffers = 4.0 * moe.a2a_bytes if moe is not None and lay.expert > 1 else 0.0
    return {"weights": weights, "optimizer_and_grads": states, "activations": acts, "a2a_buffers": buffers}


def _activation_bytes_per_token_layer(ctx: _Ctx) -> float:
    """Stored activations per token per layer (flash attention: no s^2 term), averaged over layer kinds.

    Attention: block input, norm output, q, k, v, attention output (Korthikanti et al. 2022 without the
    score matrix). FFN: input, norm, gate/up/activation (x3 of the width); MoE: the routed copies at
    k x capacity factor, router logits in fp32."""
    m = ctx.model
    b = ctx.b
    attn = b * (3 * m.d_model + 2 * m.n_heads * m.d_head + 2 * m.n_kv_heads * m.d_head)
    up = 3 if m.gated_ffn else 2
    dense = b * (2 * m.d_model + up * m.d_ff)
    copies = m.top_k * (m.capacity_factor or 1.0)
    moe = b * (2 * m.d_model + copies * (m.d_model + up * m.expert_d_ff)) + 4 * m.num_experts
    moe += b * m.num_shared_experts * up * m.expert_d_ff
    return attn + (dense * m.n_dense_layers + moe * m.n_moe_layers) / m.n_layers


# ------------------------------------------------------------------ inference
def _inference(ctx: _Ctx, mode: str, gbt: int) -> Estimate:
    """prefill: one forward over ``gbt`` tokens. decode: one new token for each of ``gbt`` sequences,
    attending to ``seq_len`` cached tokens. Pipeline stages run one after another (no micro-batches)."""
    m, lay, topo = ctx.model, ctx.layout, ctx.topo
    if gbt < 1 or gbt % lay.batch_shards:
        raise ValueError(f"global_batch_tokens: got {gbt}; expected a positive multiple of the {lay.batch_shards} "
                         "batch shards (data x fsdp)")
    decode = mode == "decode"
    tokens = gbt / lay.batch_shards  # per batch shard
    if not decode and tokens % m.seq_len:
        raise ValueError(f"global_batch_tokens: prefill of {gbt} tokens; expected whole sequences of {m.seq_len} "
                         "per batch shard")
    seqs = tokens if decode else tokens / m.seq_len
    proj, scores = _attention(ctx, tokens, m.seq_len)
    n_attn = m.n_layers + m.n_cross_attention_layers
    parts = [("attention", "compute", proj, n_attn), ("attention_scores", "compute", scores, n_attn)]
    if m.n_dense_layers:
        parts.append(("dense_ffn", "compute", _ffn(ctx, tokens, m.d_ff), m.n_dense_layers))
    moe = _moe(ctx, tokens, decode=decode) if m.n_moe_layers else None
    if moe is not None:
        k = m.n_moe_layers
        parts += [("router", "compute", moe.router, k), ("dispatch_a2a", "a2a", moe.dispatch, k),
                  ("experts", "compute", moe.experts, k), ("combine_a2a", "a2a", moe.combine, k)]
    logits = _Part(count=1.0)
    last = seqs if decode else tokens
    logits.compute_s = ctx.mm(last, m.vocab_size / lay.tensor, m.d_model, dtype=ctx.high_precision)
    parts.append(("logits", "compute", logits, 1.0))
    rows, step = [], 0.0
    for name, kind, part, count in parts:
        t = (part.compute_s + part.comm_s) * count
        step += t
        rows.append(LayerRow(name, kind, t, part.flops * count, part.bytes * count, count))
    if lay.pipeline > 1:
        act = last * m.d_model * ctx.b
        p2p = (lay.pipeline - 1) * float(collective_time_s(topo, "p2p", act, ctx.groups["pipeline"], params=ctx.comm))
        step += p2p
        rows.append(LayerRow("pipeline_p2p", "comm", p2p, 0.0, act * (lay.pipeline - 1), lay.pipeline - 1))
    counts = M.param_counts(m)
    if lay.fsdp > 1:  # FSDP weights are gathered for every forward
        dense_stage = counts["non_expert"] / (lay.pipeline * lay.tensor) * ctx.b
        gather = lay.pipeline * ctx.coll("all_gather", dense_stage, "fsdp")
        step += gather
        rows.append(LayerRow("fsdp_gather", "comm", gather, 0.0, dense_stage * lay.pipeline, 1.0))
    params = counts["non_expert"] / (lay.pipeline * lay.dense_weight_shards) + counts["expert"] / (
        lay.pipeline * lay.expert_weight_shards)
    kv = seqs * m.seq_len * M.kv_cache_bytes_per_token(m, ctx.b) / (lay.pipeline * lay.tensor)
    memory = {"weights": params * ctx.b, "kv_cache": kv,
              "activations": tokens * _activation_bytes_per_token_layer(ctx) / lay.tensor,
              "a2a_buffers": 2.0 * moe.a2a_bytes if moe is not None else 0.0}
    new_tokens = gbt if decode else gbt
    flops = M.model_flops_per_token(m, training=False) * new_tokens
    est = _finish(ctx, mode, step, new_tokens, flops, memory, rows, moe.drop_rate if moe else 0.0, 1)
    hbm = topo.chip.hbm_capacity_bytes
    est.details.update({
        "min_devices_to_hold_weights": float(math.ceil(counts["total"] * ctx.b / hbm)),
        "batch_for_busy_experts": float(math.ceil(m.num_experts / m.top_k)),
        "time_per_token_s": step if decode else step / max(tokens, 1.0),
    })
    return est


def _finish(ctx: _Ctx, mode: str, step: float, tokens: int, model_flops: float, memory: dict[str, float],
            rows: list[LayerRow], drop: float, micro_batches: int) -> Estimate:
    devices = ctx.topo.num_devices
    total_mem = sum(memory.values())
    hbm = ctx.topo.chip.hbm_capacity_bytes
    fits = total_mem <= hbm
    reason = "" if fits else (f"needs {total_mem / 1e9:.1f} GB per device "
                              f"({', '.join(f'{k} {v / 1e9:.1f}' for k, v in memory.items())}); "
                              f"the chip has {hbm / 1e9:.1f} GB")
    mfu = model_flops / (step * devices * ctx.topo.chip.peak_bf16_flop_per_s)
    return Estimate(mode, step, tokens / step, mfu, total_mem, memory, fits, reason, rows, drop, micro_batches,
                    {"model_flops": model_flops})
