"""Timing harness and the micro-benchmarks calibration runs: matmuls, collectives, MoE layers.

Every timing: jit, warm up, then the median of ``repeats`` calls, each ended by
``block_until_ready``. Each benchmark returns one measurement: a flat dict with ``kind``, the
shape, and ``time_s``. ``key(m)`` identifies a measurement so an interrupted run can resume.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from moeplan.calibrate.layer import MoEConfig, expert_parallel_layer, init_params, moe_layer


def median_time_s(fn: Callable, *args, warmup: int = 2, repeats: int = 5) -> float:
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def key(m: dict) -> str:
    return "|".join(f"{k}={m[k]}" for k in sorted(m) if k not in ("time_s", "split"))


def bench_matmul(m: int, n: int, k: int, devices: list, dtype: str = "float32", repeats: int = 5) -> dict:
    """One [m, k] x [k, n] matmul on every device at once: what each device achieves while all are busy
    (devices that share a host, or a chip's HBM, are measured as the layer uses them)."""
    mesh = Mesh(np.array(devices), ("x",))
    d = len(devices)
    f = jax.jit(jax.shard_map(lambda x, y: x @ y, mesh=mesh, in_specs=(P("x"), P("x")), out_specs=P("x")))
    a = jax.device_put(jnp.ones((d * m, k), dtype), NamedSharding(mesh, P("x")))
    b = jax.device_put(jnp.ones((d * k, n), dtype), NamedSharding(mesh, P("x")))
    return {"kind": "matmul", "m": m, "n": n, "k": k, "dtype": dtype, "devices": d,
            "time_s": median_time_s(f, a, b, repeats=repeats)}


def bench_collective(op: str, nbytes: int, devices: list, repeats: int = 5) -> dict:
    """``op`` over ``devices`` with nccl-tests' size convention (bytes per device as nccl-tests counts)."""
    n = len(devices)
    mesh = Mesh(np.array(devices), ("x",))
    elems = max(nbytes // 4 // n * n, n)  # float32, divisible by n
    if op == "all_gather":  # bytes = total output: each rank holds 1/n
        local, fn = elems // n, lambda a: jax.lax.all_gather(a, "x", tiled=True)
        out_spec = P()
    elif op == "all_reduce":
        local, fn = elems, lambda a: jax.lax.psum(a, "x")
        out_spec = P()
    elif op == "all_to_all":  # bytes = the whole send buffer of a rank
        local, fn = elems, lambda a: jax.lax.all_to_all(a, "x", 0, 0, tiled=True)
        out_spec = P("x")
    else:
        raise ValueError(f"op: got {op!r}; expected all_gather, all_reduce or all_to_all")
    f = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=P("x"), out_specs=out_spec, check_vma=False))
    x = jax.device_put(jnp.ones((local * n,), jnp.float32), NamedSharding(mesh, P("x")))
    per_device = local * n * 4 if op == "all_gather" else local * 4
    return {"kind": "collective", "op": op, "devices": n, "bytes": int(per_device),
            "time_s": median_time_s(f, x, repeats=repeats)}


def bench_moe_layer(groups: int, group_size: int, d_model: int, expert_d_ff: int, num_experts: int, top_k: int,
                    capacity_factor: float, devices: list, backward: bool, repeats: int = 7) -> dict:
    """Whole einsum-dispatch MoE layer (expert parallel over ``devices``), forward or forward+backward."""
    cfg = MoEConfig(d_model, expert_d_ff, num_experts, top_k, capacity_factor)
    params = init_params(cfg, jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (groups, group_size, d_model), jnp.float32)
    ep = len(devices)
    if ep > 1:
        mesh = Mesh(np.array(devices), ("expert",))
        layer = expert_parallel_layer(mesh, cfg)
        x = jax.device_put(x, NamedSharding(mesh, P("expert")))
        params = {k: jax.device_put(v, NamedSharding(mesh, P() if k == "router" else P("expert")))
                  for k, v in params.items()}
    else:
        layer = jax.jit(lambda xx, pp: moe_layer(xx, pp, cfg))
    if backward:
        def loss(pp, xx):
            y, z, bal = layer(xx, pp)
            return jnp.sum(y) + 1e-3 * z + 1e-2 * bal
        fn = jax.jit(jax.grad(loss))
        timed = median_time_s(fn, params, x, repeats=repeats)
    else:
        timed = median_time_s(layer, x, params, repeats=repeats)
    return {"kind": "moe_layer", "groups": groups, "group_size": group_size, "d_model": d_model,
            "expert_d_ff": expert_d_ff, "num_experts": num_experts, "top_k": top_k,
            "capacity_factor": capacity_factor, "devices": ep, "backward": backward, "time_s": timed}
