"""A candidate as a real JAX training step: a few transformer blocks with GShard/ST-MoE layers on a mesh
of the local devices, every part in its own ``jax.named_scope`` (``trace.PARTS``), run under the profiler.

Scaling rule (``scaled``, printed by ``moeplan validate``): expert count, top-k, capacity factor,
``moe_every``, shared experts and the layout's expert degree are kept; the width becomes at most
``MAX_D_MODEL`` (heads of 64), the expert and dense FFN widths keep their ratio to it, the sequence at
most ``MAX_SEQ`` tokens, the depth ``max(moe_every, 2)`` blocks (at least one MoE layer), the vocabulary
``VOCAB``; data, fsdp and tensor degrees become data parallelism over the devices the expert axis leaves
(tensor and pipeline parallelism are not run), and every device holds ``micro_batch`` sequences. The
estimate it is compared with is ``estimate()`` of that scaled model and layout on ``cpu-host``.

One step: forward and backward of every block, then ``grad_sync`` (a ``psum`` of the gradients over
the axes that replicate each weight), then ``optimizer`` (Adam). Routing, dispatch and combine are
``layer``'s: tokens reach their experts' devices with two ``all_to_all``s over the ``expert`` axis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from moeplan.calibrate.layer import dispatch_combine, expert_ffn, route
from moeplan.layout import Layout
from moeplan.moe import MoEModel, expert_capacity

MAX_D_MODEL, MAX_SEQ, VOCAB, HEAD = 256, 128, 256, 64


@dataclass(frozen=True)
class Scaled:
    """The scaled model and layout a candidate runs as, and the mesh (data, expert) of the local devices."""

    model: MoEModel
    layout: Layout
    data: int
    expert: int
    micro_batch: int


def scaled(model: MoEModel, layout: Layout, devices: int, micro_batch: int = 2) -> Scaled:
    d = min(model.d_model, MAX_D_MODEL) // HEAD * HEAD or HEAD
    ratio = d / model.d_model
    expert = math.gcd(math.gcd(layout.expert, devices), model.num_experts)
    width = max(8, int(round(model.expert_d_ff * ratio / 8)) * 8)
    dense = max(8, int(round((model.d_ff or model.expert_d_ff) * ratio / 8)) * 8)
    small = model.with_(d_model=d, n_heads=d // HEAD, n_kv_heads=d // HEAD, d_head=HEAD, attention="mha", mla=None,
                        seq_len=min(model.seq_len, MAX_SEQ), n_layers=max(model.moe_every, 2), first_dense_layers=0,
                        vocab_size=VOCAB, d_ff=dense, expert_d_ff=width, gated_ffn=False, encoder_decoder=False,
                        tied_embeddings=False, name=f"{model.name}-scaled")
    small_layout = Layout(data=devices, expert=expert, recompute="none", sequence_parallel=False,
                          shard_optimizer=False, micro_batch_size=micro_batch)
    return Scaled(small, small_layout, devices // expert, expert, micro_batch)


def scaling_rule(s: Scaled, model: MoEModel, layout: Layout) -> str:
    m = s.model
    return (f"{model.name} d_model {model.d_model} -> {m.d_model}, expert_d_ff {model.expert_d_ff} -> "
            f"{m.expert_d_ff}, seq {model.seq_len} -> {m.seq_len}, layers {model.n_layers} -> {m.n_layers}, "
            f"vocab -> {m.vocab_size}; E={m.num_experts} k={m.top_k} cf={m.capacity_factor} every={m.moe_every}; "
            f"layout {_layout_text(layout)} -> data={s.data},expert={s.expert} x {s.micro_batch} sequences/device")


def _layout_text(layout: Layout) -> str:
    return ",".join(f"{k}={getattr(layout, k)}" for k in ("data", "fsdp", "expert", "tensor", "pipeline")
                    if getattr(layout, k) != 1) or "data=1"


# ------------------------------------------------------------------ parameters
def init_params(m: MoEModel, key: jax.Array) -> dict:
    keys = iter(jax.random.split(key, 8 * m.n_layers + 4))

    def normal(shape, fan_in):
        return jax.random.normal(next(keys), shape, jnp.float32) * fan_in**-0.5

    d, width = m.d_model, m.n_heads * m.d_head
    blocks = []
    for layer in range(m.n_layers):
        block = {"wqkv": normal((d, 3 * width), d), "wo": normal((width, d), width)}
        if bool(m.is_moe_layer[layer]):
            block["router"] = normal((d, m.num_experts), d)
            block["w_in"] = normal((m.num_experts, d, m.expert_d_ff), d)
            block["w_out"] = normal((m.num_experts, m.expert_d_ff, d), m.expert_d_ff)
            if m.num_shared_experts:
                shared = m.num_shared_experts * m.expert_d_ff
                block["s_in"], block["s_out"] = normal((d, shared), d), normal((shared, d), shared)
        else:
            block["f_in"], block["f_out"] = normal((d, m.d_ff), d), normal((m.d_ff, d), m.d_ff)
        blocks.append(block)
    return {"blocks": blocks, "embed": normal((m.vocab_size, d), 1), "unembed": normal((d, m.vocab_size), d)}


def _specs(params: dict) -> dict:
    """Expert weights split over the expert axis; everything else replicated."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: P("expert") if getattr(path[-1], "key", None) in ("w_in", "w_out") else P(), params)


# ------------------------------------------------------------------ the step
def _norm(x):
    return (x - x.mean(-1, keepdims=True)) * jax.lax.rsqrt(x.var(-1, keepdims=True) + 1e-6)


def _attention(x, block, m: MoEModel):
    with jax.named_scope("attention"):
        b, s, _ = x.shape
        qkv = _norm(x) @ block["wqkv"]
        q, k, v = (t.reshape(b, s, m.n_heads, m.d_head) for t in jnp.split(qkv, 3, axis=-1))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(m.d_head)
        scores = jnp.where(jnp.tril(jnp.ones((s, s), bool)), scores, -1e9)
        out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v).reshape(b, s, -1)
        return x + out @ block["wo"]


def _moe(x, block, m: MoEModel, expert_axis: int):
    b, s, d = x.shape
    groups = x.reshape(b, s, d)  # one routing group per sequence
    cf = m.capacity_factor if m.capacity_factor is not None else m.num_experts / m.top_k  # dropless: room for all
    capacity = expert_capacity(s, m.top_k, cf, m.num_experts)
    with jax.named_scope("router"):
        h = _norm(groups)
        _, _, idx, gates = route(h, block["router"], m.top_k)
        dispatch, combine = dispatch_combine(idx, gates, m.num_experts, capacity)
    with jax.named_scope("dispatch_a2a"):
        expert_in = jnp.einsum("gsec,gsd->egcd", dispatch, h)
        if expert_axis > 1:
            expert_in = jax.lax.all_to_all(expert_in, "expert", split_axis=0, concat_axis=1, tiled=True)
    with jax.named_scope("experts"):
        out = expert_ffn(expert_in, block, gated=False)
        if m.num_shared_experts:
            shared = jax.nn.relu(h @ block["s_in"]) @ block["s_out"]
    with jax.named_scope("combine_a2a"):
        if expert_axis > 1:
            out = jax.lax.all_to_all(out, "expert", split_axis=1, concat_axis=0, tiled=True)
        y = jnp.einsum("gsec,egcd->gsd", combine, out)
    if m.num_shared_experts:
        y = y + shared
    return x + y


def _dense(x, block):
    with jax.named_scope("dense_ffn"):
        return x + jax.nn.relu(_norm(x) @ block["f_in"]) @ block["f_out"]


def _loss(params, tokens, m: MoEModel, expert_axis: int):
    x = params["embed"][tokens]
    for layer, block in enumerate(params["blocks"]):
        x = _attention(x, block, m)
        x = _moe(x, block, m, expert_axis) if bool(m.is_moe_layer[layer]) else _dense(x, block)
    with jax.named_scope("logits"):
        logits = _norm(x) @ params["unembed"]
        target = jnp.roll(tokens, -1, axis=1)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), target[..., None], axis=-1))


def make_step(s: Scaled, mesh: Mesh):
    """The jitted training step ``(params, adam_state, tokens) -> (params, adam_state, loss)``."""
    m, expert_axis = s.model, s.expert

    def local(params, state, tokens):
        loss, grads = jax.value_and_grad(_loss)(params, tokens, m, expert_axis)
        with jax.named_scope("grad_sync"):
            def sync(path, g):
                expert_weight = getattr(path[-1], "key", None) in ("w_in", "w_out")
                axes = ("data",) if expert_weight else ("data", "expert")
                return jax.lax.pmean(g, axes)
            grads = jax.tree_util.tree_map_with_path(sync, grads)
        with jax.named_scope("optimizer"):
            step = state["step"] + 1
            mu = jax.tree_util.tree_map(lambda a, g: 0.9 * a + 0.1 * g, state["mu"], grads)
            nu = jax.tree_util.tree_map(lambda a, g: 0.999 * a + 0.001 * g * g, state["nu"], grads)
            params = jax.tree_util.tree_map(
                lambda p, a, b: p - 1e-3 * (a / (1 - 0.9**step)) / (jnp.sqrt(b / (1 - 0.999**step)) + 1e-8),
                params, mu, nu)
        return params, {"mu": mu, "nu": nu, "step": step}, jax.lax.pmean(loss, ("data", "expert"))

    return local


def build(s: Scaled, devices: list, seed: int = 0):
    """(jitted step, params, state, tokens) on a (data, expert) mesh of ``devices``."""
    mesh = Mesh(np.asarray(devices).reshape(s.data, s.expert), ("data", "expert"))
    params = init_params(s.model, jax.random.PRNGKey(seed))
    pspec = _specs(params)
    state = {"mu": jax.tree_util.tree_map(jnp.zeros_like, params),
             "nu": jax.tree_util.tree_map(jnp.zeros_like, params), "step": jnp.zeros((), jnp.int32)}
    sspec = {"mu": pspec, "nu": pspec, "step": P()}
    batch = P(("data", "expert"))
    fn = jax.shard_map(make_step(s, mesh), mesh=mesh, in_specs=(pspec, sspec, batch),
                       out_specs=(pspec, sspec, P()), check_vma=False)
    step = jax.jit(fn, donate_argnums=(0, 1))
    tokens = jax.random.randint(jax.random.PRNGKey(seed + 1), (s.micro_batch * len(devices), s.model.seq_len), 0,
                                s.model.vocab_size)
    place = jax.tree_util.tree_map(lambda spec: jax.sharding.NamedSharding(mesh, spec), pspec)
    params = jax.device_put(params, place)
    state = jax.device_put(state, {"mu": place, "nu": place, "step": jax.sharding.NamedSharding(mesh, P())})
    tokens = jax.device_put(tokens, jax.sharding.NamedSharding(mesh, batch))
    return step, params, state, tokens
