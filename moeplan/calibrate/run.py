"""``moeplan calibrate``: measure on the local devices, fit, write a profile, report the errors.

Every benchmark of the plan is compiled once and timed in several passes over the whole plan
(``PASSES_QUICK`` / ``PASSES_FULL``); a measurement's time is the median over its passes. Each pass
of each benchmark is appended to ``<out>.measurements.jsonl`` as it is taken; a rerun skips what is
already there (resume). With several processes (``jax.distributed``: coordinator address,
process count and id from flags or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID),
every process runs the same benchmarks on the global devices and only process 0 writes files.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

PASSES_QUICK, PASSES_FULL = 5, 7  # passes over the plan: every benchmark is timed once in each


def plan_measurements(quick: bool, devices: int) -> list[tuple[str, dict]]:
    """(split, benchmark arguments); split is "train" (fitted) or "held_out" (error only). Every other
    MoE layer shape, in rough order of time, is held out (6 of 14 in a quick run, forward and forward+backward).

    MOEPLAN_CALIBRATE_TINY=1 keeps a handful (the multi-process test)."""
    full = _plan(quick, devices)
    if os.environ.get("MOEPLAN_CALIBRATE_TINY"):
        layers = [s for s in full if s[1]["kind"] == "moe_layer"]
        return full[:3] + [s for s in full if s[1]["kind"] == "collective"][:3] + layers[:4]
    return full


def _plan(quick: bool, devices: int) -> list[tuple[str, dict]]:
    mats = [(256, 256, 256), (512, 512, 512), (1024, 512, 256), (128, 1024, 512)]
    if not quick:
        mats += [(1024, 1024, 1024), (256, 2048, 512), (2048, 256, 256), (64, 512, 512)]
    sizes = [1 << 14, 1 << 18, 1 << 22] if quick else [1 << 12, 1 << 14, 1 << 16, 1 << 18, 1 << 20, 1 << 22, 1 << 24]
    ops = ["all_reduce", "all_gather", "all_to_all"]
    n = devices * max(1, 8 // devices)  # groups and experts: a multiple of the devices, at least 8
    # groups, group size, d_model, expert width, experts, top-k, capacity factor; roughly in order of time on
    # the CPU host, and every other one held out, so held-out shapes sit inside the training range
    layers = [
        (n, 128, 64, 128, n, 2, 1.25), (n * 2, 128, 64, 256, n * 2, 1, 1.25),
        (n, 256, 64, 128, n, 1, 2.0), (n, 128, 256, 128, n, 1, 2.0),
        (n * 2, 128, 128, 256, n * 2, 1, 2.0), (n * 2, 256, 64, 128, n, 1, 1.0),
        (n, 256, 128, 256, n, 2, 1.25), (n, 128, 256, 512, n * 2, 2, 1.25),
        (n, 256, 256, 512, n * 2, 1, 1.0), (n * 2, 256, 128, 512, n, 1, 1.25),
        (n, 512, 64, 256, n, 2, 1.0), (n * 2, 128, 256, 128, n, 2, 2.0),
        (n, 256, 256, 512, n, 2, 1.25), (n, 512, 128, 256, n, 2, 1.25),
    ]
    if not quick:
        layers += [(n * 2, 256, 64, 512, n * 2, 2, 2.0), (n, 1024, 128, 256, n, 2, 1.25),
                   (n * 2, 512, 256, 256, n * 2, 2, 1.5)]
    out = [("train", {"kind": "matmul", "m": m, "n": n, "k": k}) for m, n, k in mats]
    if devices > 1:  # sizes between the fitted ones are held out: each op's own latency and efficiency are fitted
        out += [("train", {"kind": "collective", "op": op, "bytes": b, "devices": devices}) for op in ops
                for b in sizes]
        out += [("held_out", {"kind": "collective", "op": op, "bytes": b, "devices": devices}) for op in ops
                for b in (1 << 16, 1 << 20) if b not in sizes]
    last = len(layers) - 1
    for i, (g, s, d, f, e, k, cf) in enumerate(layers):
        held = i % 2 == 1 and i != last  # the smallest and the largest shape are fitted
        for backward in (False, True):
            out.append(("held_out" if held else "train",
                        {"kind": "moe_layer", "groups": g, "group_size": s, "d_model": d, "expert_d_ff": f,
                         "num_experts": e, "top_k": k, "capacity_factor": cf, "devices": devices,
                         "backward": backward}))
    return out


def _identity(spec: dict, devices: int) -> dict:
    """What a measurement records besides its time: the spec, with the bytes a collective really moves."""
    from moeplan.calibrate import bench

    if spec["kind"] == "matmul":
        return {"kind": "matmul", "m": spec["m"], "n": spec["n"], "k": spec["k"], "dtype": "float32",
                "devices": devices}
    if spec["kind"] == "collective":
        local = bench.collective_elements(spec["op"], spec["bytes"], devices)
        moved = local * devices * 4 if spec["op"] == "all_gather" else local * 4
        return {"kind": "collective", "op": spec["op"], "devices": devices, "bytes": int(moved)}
    return {**spec, "devices": devices}


def _resume(read_jsonl, log: Path, say) -> dict[str, dict[int, list[float]]]:
    """The timings a previous run logged, per benchmark and pass. Lines that cannot be decoded, or hold
    implausible times or a malformed benchmark, are skipped and reported: they are measured again."""
    bad: list[int] = []
    done: dict[str, dict[int, list[float]]] = {}
    for r in read_jsonl(log, bad):
        if "times_s" not in r and "pass" not in r:
            continue  # another kind of record
        p, spec = r.get("pass"), r.get("spec")
        if not (isinstance(p, int) and not isinstance(p, bool) and 0 <= p < 1000 and isinstance(spec, dict)
                and isinstance(r.get("times_s"), list)):
            bad.append(-1)
            continue
        try:
            done.setdefault(_spec_key(spec), {})[p] = r["times_s"]
        except (TypeError, ValueError):
            bad.append(-1)
    if bad:
        lines = [n for n in bad if n > 0]
        say(f"resuming: skipped {len(bad)} unreadable or implausible line(s) of {log}"
            + (f" (lines {', '.join(map(str, lines[:10]))}{', ...' if len(lines) > 10 else ''})" if lines else "")
            + "; they are measured again")
    return done


def _spec_key(spec: dict) -> str:
    return "|".join(f"{k}={spec[k]}" for k in sorted(spec))


def init_distributed(coordinator: str | None, num_processes: int | None, process_id: int | None) -> int:
    """Start jax.distributed when asked (flags or JAX_* variables); returns this process's index."""
    import jax

    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if not coordinator:
        return 0
    num_processes = num_processes or int(os.environ.get("JAX_NUM_PROCESSES", "1"))
    process_id = process_id if process_id is not None else int(os.environ.get("JAX_PROCESS_ID", "0"))
    # CPU collectives across processes go through gloo (the setting only concerns CPU devices, and must
    # be made before the backend starts, so nothing may touch jax.devices() before initialize())
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    return jax.process_index()


def calibrate(out: str | os.PathLike[str], quick: bool = False, devices: int | None = None,
              topology: str | None = None, say: Callable[[str], None] = print, passes: int | None = None,
              repeats: int = 3) -> dict:
    """Run (or resume) the measurements, fit, write the profile; return the profile mapping.

    Every benchmark is compiled once and timed in ``passes`` passes over the whole plan (``repeats``
    calls each, after one warm-up), so training and held-out measurements share the host's slow
    drifts instead of each catching its own; a measurement's time is the median over its passes."""
    import jax

    from moeplan.calibrate.fit import errors, fit, fitted_section, theta_from
    from moeplan.collectives import CommParams
    from moeplan.families import load_topology
    from moeplan.profiles import append_jsonl, read_jsonl, write_yaml

    all_devices = jax.devices()
    n = devices or len(all_devices)
    if not 1 <= n <= len(all_devices):
        raise ValueError(f"devices: got {n}; JAX sees {len(all_devices)} devices here")
    chosen = all_devices[:n]
    kind = chosen[0].platform
    topo_name = topology or ("cpu-host" if kind == "cpu" else "dgx-h100")
    topo = load_topology(topo_name) if n <= _node_size(topo_name) else load_topology(
        topo_name, nodes=-(-n // _node_size(topo_name)))
    writer = jax.process_index() == 0
    out = Path(out)
    log = out.with_name(out.stem + ".measurements.jsonl")
    plan = plan_measurements(quick, n)
    passes = passes or (PASSES_QUICK if quick else PASSES_FULL)
    done = _resume(read_jsonl, log, say)
    taken = sum(p < passes for _, spec in plan for p in done.get(_spec_key(spec), {}))
    if taken:
        say(f"resuming: {taken} of {len(plan) * passes} timings already in {log}")
    from moeplan.calibrate import bench

    calls: dict[str, Callable] = {}  # compiled once, timed in every pass
    for p in range(passes):
        start = time.perf_counter()
        todo = [(i, split, spec) for i, (split, spec) in enumerate(plan, 1) if p not in done.get(_spec_key(spec), {})]
        for i, split, spec in todo:
            key = _spec_key(spec)
            if key not in calls:
                calls[key] = bench.prepare(spec, chosen)
            times = bench.times_s(calls[key], repeats=repeats)
            if writer:
                append_jsonl(log, {"split": split, "spec": spec, "pass": p, "times_s": times})
            done.setdefault(key, {})[p] = times
            if p == 0:
                say(f"  [{i:>3}/{len(plan)}] {key}: {statistics.median(times) * 1e3:.3f} ms")
        if todo and p > 0:
            say(f"  pass {p + 1}/{passes}: {len(todo)} timings, {time.perf_counter() - start:.1f} s")
    records = [{"split": split, "spec": spec,
                "measured": {**_identity(spec, n), "time_s": bench.pass_time_s(list(done[_spec_key(spec)].values())),
                             "passes": len(done[_spec_key(spec)])}}
               for split, spec in plan]
    train = [_as_model_input(r) for r in records if r["split"] == "train"]
    held = [_as_model_input(r) for r in records if r["split"] == "held_out" and r["spec"]["kind"] == "moe_layer"]
    held_ops = [_as_model_input(r) for r in records if r["split"] == "held_out" and r["spec"]["kind"] == "collective"]
    base_eff, base_comm = topo.chip.efficiency, CommParams()
    before = errors(held, topo, base_eff, base_comm)
    source = f"calibrated on {n} x {kind} ({platform.node()}), {dt.date.today().isoformat()}"
    eff, comm, theta = fit(train, topo, base_eff, base_comm, source)
    after = errors(held, topo, eff, comm)
    fitted = [m for m in train if m["kind"] != "matmul"]  # what the least squares saw
    train_before, train_after = errors(fitted, topo, base_eff, base_comm), errors(fitted, topo, eff, comm)
    profile = {
        "schema_version": 1, "device_kind": str(getattr(chosen[0], "device_kind", kind)), "device_count": n,
        "topology": topo.name, "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "versions": {"jax": jax.__version__, "jaxlib": _jaxlib_version(), "python": platform.python_version(),
                     "processes": jax.process_count()},
        "fitted": fitted_section(eff, comm),
        "errors": {"held_out_layers": len(held), "before_median_abs": _median_abs(before),
                   "after_median_abs": _median_abs(after),
                   "after_max_abs": float(np.max(np.abs(after))) if held else 0.0,
                   "train_before_rms_log": _rms_log(train_before), "train_after_rms_log": _rms_log(train_after),
                   "matmul_after_median_abs": _median_abs(errors([m for m in train if m["kind"] == "matmul"], topo,
                                                                 eff, comm)),
                   "initial_parameters": [float(v) for v in theta_from(base_eff, base_comm)],
                   **_by_op(held_ops, topo, (base_eff, base_comm), (eff, comm))},
        "measurements": [{"split": r["split"], **r["measured"]} for r in records],
    }
    if writer:
        write_yaml(out, profile)
    _report(held, topo, eff, comm, before, after, say)
    by_op = profile["errors"]
    for op, error in by_op.get("collective_after_max_abs_by_op", {}).items():
        say(f"held-out {op}: largest |error| {error:.1%} after the fit "
            f"(before {by_op['collective_before_max_abs_by_op'][op]:.1%})")
    return profile


def _by_op(held_ops: list[dict], topo, before: tuple, after: tuple) -> dict:
    """Held-out collective benchmarks: per op, the largest |error| before and after the fit."""
    from moeplan.calibrate.fit import errors

    out: dict = {"collective_held_out": len(held_ops)}
    for name, (eff, comm) in (("before", before), ("after", after)):
        out[f"collective_{name}_max_abs_by_op"] = {
            op: float(np.max(np.abs(errors([m for m in held_ops if m["op"] == op], topo, eff, comm))))
            for op in sorted({m["op"] for m in held_ops})}
    return out


def _report(held, topo, eff, comm, before, after, say) -> None:
    from moeplan.calibrate.fit import predict_s

    say(f"held-out MoE layers: predicted vs measured (median |error| before fit {_median_abs(before):.1%}, "
        f"after {_median_abs(after):.1%})")
    for m, b, a in zip(held, before, after, strict=True):
        label = (f"G={m['groups']} S={m['group_size']} D={m['d_model']} F={m['expert_d_ff']} E={m['num_experts']} "
                 f"k={m['top_k']} cf={m['capacity_factor']} {'fwd+bwd' if m['backward'] else 'fwd'}")
        predicted = predict_s(m, topo, eff, comm)
        say(f"  {label:60} measured {m['time_s'] * 1e3:8.2f} ms  predicted {predicted * 1e3:8.2f} ms"
            f"  error {a:+.1%} (before {b:+.1%})")


def _as_model_input(record: dict) -> dict:
    return {**record["spec"], **record["measured"]}


def _rms_log(errors) -> float:
    return float(np.sqrt(np.mean(np.log1p(np.asarray(errors)) ** 2))) if len(errors) else 0.0


def _median_abs(values) -> float:
    return float(statistics.median(np.abs(values))) if len(values) else 0.0


def _node_size(family: str) -> int:
    from moeplan.families import load_family

    layout = load_family(family).layout
    return layout.node.devices_per_node if hasattr(layout, "node") else 10**9


def _jaxlib_version() -> str:
    try:
        import jaxlib

        return jaxlib.__version__
    except Exception:  # pragma: no cover - jaxlib always ships with jax
        return "unknown"
