"""Timing harness and the micro-benchmarks calibration runs: matmuls, collectives, MoE layers.

``prepare(spec, devices)`` builds one benchmark (jitted function, inputs placed on the devices) and
returns a call that runs it once and blocks until the result is ready; the first call compiles.
``times_s(call)`` warms up and returns the wall time of each of ``repeats`` calls.

A run does not time a benchmark in one go: on a host shared with other work (or with 8 XLA devices
on 2 cores) the speed drifts over seconds, so the median of back-to-back repeats varies from one call
to the next by 14 % (standard deviation; up to 27 % for some of 12 MoE layers, each timed in six calls
of seven repeats). ``run.calibrate`` therefore times every benchmark in several passes over the whole plan and
keeps the median over the passes (``pass_time_s``).
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

from moeplan.calibrate.layer import MoEConfig, expert_parallel_layer, moe_layer


def times_s(call: Callable[[], object], warmup: int = 1, repeats: int = 3) -> list[float]:
    """Seconds of each of ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


def pass_time_s(passes: list[list[float]]) -> float:
    """One time from several passes of repeats: the median over passes of each pass's median."""
    return statistics.median(statistics.median(p) for p in passes)


def prepare(spec: dict, devices: list) -> Callable[[], object]:
    """The benchmark ``spec`` describes (``kind`` matmul, collective or moe_layer), ready to call."""
    if spec["kind"] == "matmul":
        fn, args = _matmul(spec["m"], spec["n"], spec["k"], devices, spec.get("dtype", "float32"))
    elif spec["kind"] == "collective":
        fn, args = _collective(spec["op"], spec["bytes"], devices)
    elif spec["kind"] == "moe_layer":
        fn, args = _moe_layer(spec["groups"], spec["group_size"], spec["d_model"], spec["expert_d_ff"],
                              spec["num_experts"], spec["top_k"], spec["capacity_factor"], devices, spec["backward"])
    else:
        raise ValueError(f"kind: got {spec['kind']!r}; expected matmul, collective or moe_layer")
    return lambda: jax.block_until_ready(fn(*args))


def _matmul(m: int, n: int, k: int, devices: list, dtype: str):
    """One [m, k] x [k, n] matmul on every device at once: what each device achieves while all are busy
    (devices that share a host, or a chip's HBM, are measured as the layer uses them)."""
    mesh = Mesh(np.array(devices), ("x",))
    d = len(devices)
    f = jax.jit(jax.shard_map(lambda x, y: x @ y, mesh=mesh, in_specs=(P("x"), P("x")), out_specs=P("x")))
    a = jax.device_put(jnp.ones((d * m, k), dtype), NamedSharding(mesh, P("x")))
    b = jax.device_put(jnp.ones((d * k, n), dtype), NamedSharding(mesh, P("x")))
    return f, (a, b)


def collective_elements(op: str, nbytes: int, n: int) -> int:
    """float32 elements each device holds for ``op`` of ``nbytes`` (nccl-tests' size convention:
    all_gather counts the whole output, all_reduce the buffer, all_to_all a rank's send buffer)."""
    elems = max(nbytes // 4 // n * n, n)  # divisible by n
    return elems // n if op == "all_gather" else elems


def _collective(op: str, nbytes: int, devices: list):
    n = len(devices)
    mesh = Mesh(np.array(devices), ("x",))
    local = collective_elements(op, nbytes, n)
    if op == "all_gather":
        fn, out_spec = (lambda a: jax.lax.all_gather(a, "x", tiled=True)), P()
    elif op == "all_reduce":
        fn, out_spec = (lambda a: jax.lax.psum(a, "x")), P()
    elif op == "all_to_all":
        fn, out_spec = (lambda a: jax.lax.all_to_all(a, "x", 0, 0, tiled=True)), P("x")
    else:
        raise ValueError(f"op: got {op!r}; expected all_gather, all_reduce or all_to_all")
    f = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=P("x"), out_specs=out_spec, check_vma=False))
    x = jax.device_put(jnp.ones((local * n,), jnp.float32), NamedSharding(mesh, P("x")))
    return f, (x,)


def _moe_layer(groups: int, group_size: int, d_model: int, expert_d_ff: int, num_experts: int, top_k: int,
               capacity_factor: float, devices: list, backward: bool):
    """Whole einsum-dispatch MoE layer (expert parallel over ``devices``).

    Forward: the layer's output and its two auxiliary losses. Forward+backward: what a training step
    runs for the layer inside a network: the output, and for a given upstream gradient of the output
    the gradients of the parameters and of the input (``jax.vjp``; a ``grad`` of ``sum(y)`` would let
    XLA drop the combine einsum, whose output such a loss never needs)."""
    cfg = MoEConfig(d_model, expert_d_ff, num_experts, top_k, capacity_factor)
    # numpy draws, as init_params scales them: jax.random would compile a kernel for every new shape
    rng = np.random.default_rng(0)
    normal = lambda *shape, scale=1.0: (rng.standard_normal(shape) * scale).astype(np.float32)  # noqa: E731
    params = {"router": normal(d_model, num_experts, scale=d_model**-0.5),
              "w_in": normal(num_experts, d_model, expert_d_ff, scale=d_model**-0.5),
              "w_out": normal(num_experts, expert_d_ff, d_model, scale=expert_d_ff**-0.5)}
    x, dy = normal(groups, group_size, d_model), normal(groups, group_size, d_model)
    ep = len(devices)
    if ep > 1:
        mesh = Mesh(np.array(devices), ("expert",))
        layer = expert_parallel_layer(mesh, cfg)
        x, dy = (jax.device_put(a, NamedSharding(mesh, P("expert"))) for a in (x, dy))
        params = {k: jax.device_put(v, NamedSharding(mesh, P() if k == "router" else P("expert")))
                  for k, v in params.items()}
    else:
        layer = jax.jit(lambda xx, pp: moe_layer(xx, pp, cfg))
        x, dy = jnp.asarray(x), jnp.asarray(dy)
        params = {k: jnp.asarray(v) for k, v in params.items()}
    if not backward:
        return layer, (x, params)

    def step(pp, xx, cotangent):
        out, pull = jax.vjp(lambda p, xi: layer(xi, p), pp, xx)
        return out[0], pull((cotangent, jnp.float32(1e-3), jnp.float32(1e-2)))  # z-loss and balance weights

    return jax.jit(step), (params, x, dy)
