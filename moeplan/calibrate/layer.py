"""A JAX MoE layer faithful to ST-MoE / Switch / GShard, and its loop-over-experts reference.

Shapes (G routing groups of S tokens, model width D, E experts, capacity C, expert width F):

* ``x``          <bf16|f32>[G, S, D]
* router logits  <f32>[G, S, E]  (the router runs in float32, as ST-MoE prescribes)
* ``dispatch``   <f32>[G, S, E, C]  one-hot: token s of group g goes to slot c of expert e
* ``combine``    <f32>[G, S, E, C]  dispatch x gate weight
* expert input   [E, G, C, D]; expert weights w_in <[E, D, F]> (and w_gate when gated), w_out <[E, F, D]>

Routing: each token picks its top-k experts; gates are the router probabilities of the chosen
experts renormalised over the k. Capacity C = ceil(S k cf / E) slots per expert and group; slots are
filled first by every token's first choice (in token order), then by second choices, and so on
(GShard's priority); assignments past capacity are dropped (the token's residual path carries it).
Auxiliary losses: router z-loss mean(logsumexp(logits)^2) (ST-MoE eq. 5) and the load-balancing
loss E * sum_e f_e P_e (Switch eq. 4) with f_e the fraction of assignments to e and P_e the mean
router probability of e. ``dropless_layer`` sorts assignments by expert and runs a grouped
(ragged) matmul: no capacity, nothing dropped. ``expert_parallel_layer`` shards experts over a
mesh axis with ``shard_map`` and moves tokens with two ``all_to_all``s.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from moeplan.moe import expert_capacity


@dataclass(frozen=True)
class MoEConfig:
    d_model: int
    expert_d_ff: int
    num_experts: int
    top_k: int = 2
    capacity_factor: float | None = 1.25  # None: dropless
    gated: bool = False
    dtype: str = "float32"  # compute dtype outside the router

    def capacity(self, group_size: int) -> int:
        return expert_capacity(group_size, self.top_k, self.capacity_factor, self.num_experts)


def init_params(cfg: MoEConfig, key: jax.Array) -> dict[str, jax.Array]:
    k1, k2, k3, k4 = jax.random.split(key, 4)
    scale_in, scale_out = cfg.d_model**-0.5, cfg.expert_d_ff**-0.5
    params = {
        "router": jax.random.normal(k1, (cfg.d_model, cfg.num_experts), jnp.float32) * scale_in,
        "w_in": jax.random.normal(k2, (cfg.num_experts, cfg.d_model, cfg.expert_d_ff), cfg.dtype) * scale_in,
        "w_out": jax.random.normal(k3, (cfg.num_experts, cfg.expert_d_ff, cfg.d_model), cfg.dtype) * scale_out,
    }
    if cfg.gated:
        params["w_gate"] = jax.random.normal(k4, (cfg.num_experts, cfg.d_model, cfg.expert_d_ff), cfg.dtype) * scale_in
    return params


def route(x: jax.Array, router: jax.Array, top_k: int):
    """<f32> logits [G,S,E], probs [G,S,E], top-k expert ids [G,S,k], renormalised gates [G,S,k]."""
    logits = jnp.einsum("gsd,de->gse", x.astype(jnp.float32), router)
    probs = jax.nn.softmax(logits, axis=-1)
    gates, idx = jax.lax.top_k(probs, top_k)
    return logits, probs, idx, gates / jnp.sum(gates, axis=-1, keepdims=True)


def aux_losses(logits: jax.Array, probs: jax.Array, idx: jax.Array, num_experts: int,
               axis: str | None = None) -> tuple[jax.Array, jax.Array]:
    """(router z-loss, load-balancing loss), both scalars; over a mesh ``axis`` the statistics are
    averaged across devices before the product, so the result equals the single-device loss."""
    z_loss = jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2)
    assign = jax.nn.one_hot(idx, num_experts, dtype=jnp.float32)  # [G,S,k,E]
    f = jnp.mean(jnp.sum(assign, axis=2), axis=(0, 1)) / idx.shape[-1]
    p = jnp.mean(probs, axis=(0, 1))
    if axis is not None:
        z_loss, f, p = jax.lax.pmean((z_loss, f, p), axis)
    return z_loss, num_experts * jnp.sum(f * p)


def dispatch_combine(idx: jax.Array, gates: jax.Array, num_experts: int, capacity: int):
    """<f32>[G,S,E,C] dispatch and combine tensors with GShard's priority (choice rank, then order)."""
    g, s, k = idx.shape
    dispatch = jnp.zeros((g, s, num_experts, capacity), jnp.float32)
    combine = jnp.zeros_like(dispatch)
    filled = jnp.zeros((g, num_experts), jnp.int32)
    for j in range(k):
        mask = jax.nn.one_hot(idx[:, :, j], num_experts, dtype=jnp.int32)  # [G,S,E]
        position = jnp.cumsum(mask, axis=1) - 1 + filled[:, None, :]  # slot each token would take
        keep = mask * (position < capacity)
        slot = jax.nn.one_hot(jnp.where(keep > 0, position, capacity), capacity + 1, dtype=jnp.float32)[..., :capacity]
        dispatch = dispatch + slot * keep[..., None]
        combine = combine + slot * (keep * gates[:, :, j:j + 1])[..., None]
        filled = filled + jnp.sum(mask, axis=1)
    return dispatch, combine


def expert_ffn(h: jax.Array, params: dict, gated: bool) -> jax.Array:
    """h <[E, ..., D]> through each expert's two-layer FFN (ReLU, or GELU-gated when ``gated``)."""
    up = jnp.einsum("e...d,edf->e...f", h, params["w_in"])
    act = jax.nn.gelu(jnp.einsum("e...d,edf->e...f", h, params["w_gate"])) * up if gated else jax.nn.relu(up)
    return jnp.einsum("e...f,efd->e...d", act, params["w_out"])


def moe_layer(x: jax.Array, params: dict, cfg: MoEConfig):
    """Einsum-dispatch MoE layer with capacity. Returns (y <[G,S,D]>, z_loss, balance_loss)."""
    logits, probs, idx, gates = route(x, params["router"], cfg.top_k)
    dispatch, combine = dispatch_combine(idx, gates, cfg.num_experts, cfg.capacity(x.shape[1]))
    expert_in = jnp.einsum("gsec,gsd->egcd", dispatch.astype(x.dtype), x)
    expert_out = expert_ffn(expert_in, params, cfg.gated)
    y = jnp.einsum("gsec,egcd->gsd", combine.astype(x.dtype), expert_out)
    return (y, *aux_losses(logits, probs, idx, cfg.num_experts))


def dropless_layer(x: jax.Array, params: dict, cfg: MoEConfig):
    """No capacity: sort the G*S*k assignments by expert, grouped matmul (``lax.ragged_dot``), unsort."""
    g, s, d = x.shape
    logits, probs, idx, gates = route(x, params["router"], cfg.top_k)
    flat_x = x.reshape(g * s, d)
    expert = idx.reshape(-1)
    order = jnp.argsort(expert, stable=True)
    token = order // cfg.top_k
    sizes = jnp.bincount(expert, length=cfg.num_experts).astype(jnp.int32)
    rows = flat_x[token]
    up = jax.lax.ragged_dot(rows, params["w_in"], sizes)
    if cfg.gated:
        act = jax.nn.gelu(jax.lax.ragged_dot(rows, params["w_gate"], sizes)) * up
    else:
        act = jax.nn.relu(up)
    out = jax.lax.ragged_dot(act, params["w_out"], sizes)
    weighted = out * gates.reshape(-1)[order][:, None].astype(out.dtype)
    y = jnp.zeros_like(flat_x).at[token].add(weighted)
    return (y.reshape(g, s, d), *aux_losses(logits, probs, idx, cfg.num_experts))


def reference_layer(x: np.ndarray, params: dict, cfg: MoEConfig) -> np.ndarray:
    """Loop over groups, choices, tokens and experts in plain numpy: the twin of ``moe_layer``."""
    x = np.asarray(x, np.float64)
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    g_count, s_count, _ = x.shape
    y = np.zeros_like(x)
    cap = cfg.capacity(s_count) if cfg.capacity_factor is not None else s_count * cfg.top_k
    for g in range(g_count):
        logits = x[g] @ p["router"]
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        choices = np.argsort(-probs, axis=-1, kind="stable")[:, : cfg.top_k]
        gates = np.take_along_axis(probs, choices, -1)
        gates /= gates.sum(-1, keepdims=True)
        used = np.zeros(cfg.num_experts, int)
        for j in range(cfg.top_k):
            for s in range(s_count):
                e = choices[s, j]
                if used[e] >= cap:
                    continue  # dropped
                used[e] += 1
                h = x[g, s] @ p["w_in"][e]
                act = (_gelu(x[g, s] @ p["w_gate"][e]) * h) if cfg.gated else np.maximum(h, 0.0)
                y[g, s] += gates[s, j] * (act @ p["w_out"][e])
    return y


def _gelu(v: np.ndarray) -> np.ndarray:
    return 0.5 * v * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (v + 0.044715 * v**3)))


def expert_parallel_layer(mesh: Mesh, cfg: MoEConfig, axis: str = "expert"):
    """``moe_layer`` with experts sharded over ``axis``: each device routes its own groups, sends each
    expert's slots to its owner (all_to_all), runs its local experts, and sends results back.

    Inputs: x sharded on the group axis, parameters sharded on the expert axis."""
    n = mesh.shape[axis]
    if cfg.num_experts % n:
        raise ValueError(f"num_experts: {cfg.num_experts}; expected a multiple of the {axis} axis ({n})")

    def local(x, params):
        logits, probs, idx, gates = route(x, params["router"], cfg.top_k)
        dispatch, combine = dispatch_combine(idx, gates, cfg.num_experts, cfg.capacity(x.shape[1]))
        expert_in = jnp.einsum("gsec,gsd->egcd", dispatch.astype(x.dtype), x)  # [E, G_local, C, D]
        expert_in = jax.lax.all_to_all(expert_in, axis, split_axis=0, concat_axis=1, tiled=True)
        expert_out = expert_ffn(expert_in, params, cfg.gated)  # [E_local, G_total, C, D]
        expert_out = jax.lax.all_to_all(expert_out, axis, split_axis=1, concat_axis=0, tiled=True)
        y = jnp.einsum("gsec,egcd->gsd", combine.astype(x.dtype), expert_out)
        z, bal = aux_losses(logits, probs, idx, cfg.num_experts, axis)
        return y, z, bal

    specs = {"router": P(), "w_in": P(axis), "w_out": P(axis)}
    if cfg.gated:
        specs["w_gate"] = P(axis)
    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(axis), specs), out_specs=(P(axis), P(), P())))
