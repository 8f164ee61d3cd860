"""``moeplan`` command line: parse, call the public API, print. No modelling happens here.

Errors from bad input (``ValueError``) are printed as one line on stderr with exit status 2,
never as a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict

import numpy as np

import moeplan as mp
from moeplan.bounds import BYTES_PER_DEVICE
from moeplan.collectives import OPS, bus_bandwidth_factor, collective_cost
from moeplan.dispatch import KERNELS, ExpertRouting
from moeplan.estimate import MODES, OVERLAPS, estimate
from moeplan.families import load_family
from moeplan.frameworks import FRAMEWORKS
from moeplan.layout import Layout
from moeplan.moe import list_presets, load_model, param_counts
from moeplan.profiles import write_atomic, write_csv, write_json
from moeplan.routing import Routing
from moeplan.search import OBJECTIVES, Constraints, SearchResult, SearchSpace, search
from moeplan.units import GIB, fmt_flops, fmt_gib, fmt_rate, fmt_time, parse_shape


def _shape_arg(text: str) -> tuple[int, ...]:
    try:
        return parse_shape(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_topology_args(parser: argparse.ArgumentParser, positional: bool = True, default: str | None = None) -> None:
    if positional:
        parser.add_argument("topology", help="bundled family name (see 'moeplan topologies') or a .yaml file")
    else:
        parser.add_argument("--topology", required=default is None, default=default,
                            help="bundled family name or a .yaml file" + (f" (default {default})" if default else ""))
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--shape", type=_shape_arg, help="torus slice shape, e.g. 4x4x8")
    size.add_argument("--nodes", type=int, help="number of nodes (GPU clusters)")
    parser.add_argument("--twisted", action="store_true", help="twisted torus (TPU v4/v5p k x k x 2k slices)")
    parser.add_argument("--slices", type=int, help="TPU multi-slice: slices of --shape joined over DCN")


def topology_from_args(args: argparse.Namespace) -> mp.Topology:
    return mp.load_topology(args.topology, shape=args.shape, nodes=args.nodes, twisted=args.twisted,
                            slices=args.slices)


def topology_summary(topo: mp.Topology) -> dict:
    """Plain facts about a topology, as JSON-ready numbers (SI units)."""
    chip = topo.chip
    return {
        "name": topo.name,
        "family": topo.family,
        "kind": topo.kind,
        "shape": list(topo.shape),
        "slices": topo.slices,
        "num_devices": topo.num_devices,
        "chip": chip.name,
        "peak_bf16_flop_per_s": chip.peak_bf16_flop_per_s,
        "peak_fp8_flop_per_s": chip.peak_fp8_flop_per_s,
        "peak_fp32_flop_per_s": chip.peak_fp32_flop_per_s,
        "hbm_capacity_bytes": chip.hbm_capacity_bytes,
        "hbm_bw_bytes_per_s": chip.hbm_bw_bytes_per_s,
        "link_bw_bytes_per_s_by_tier": topo.tier_bandwidths(),
        "wraparound": [a.wraparound for a in topo.axes] if topo.axes else None,
        "injection_bw_bytes_per_s": topo.injection_bw_bytes_per_s(),
        "bisection_bw_bytes_per_s": topo.bisection_bw_bytes_per_s(),
        "diameter_hops": topo.diameter_hops(),
    }


def cmd_topologies(args: argparse.Namespace) -> int:
    for name in mp.list_topologies():
        fam = load_family(name)
        print(f"{name:<13} {fam.chip.name:<28} {fam.description.split(':')[0]}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    topo = topology_from_args(args)
    info = topology_summary(topo)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    many = f", {info['slices']} slices over DCN" if info["slices"] > 1 else ""
    print(f"{info['name']}: {info['num_devices']} x {info['chip']} ({info['kind']}, shape {info['shape']}{many})")
    print(f"  peak bf16      {fmt_flops(info['peak_bf16_flop_per_s'])} per chip")
    if info["peak_fp8_flop_per_s"]:
        print(f"  peak fp8       {fmt_flops(info['peak_fp8_flop_per_s'])} per chip")
    print(f"  HBM            {fmt_gib(info['hbm_capacity_bytes'])} at {fmt_rate(info['hbm_bw_bytes_per_s'])}")
    for tier, bw in info["link_bw_bytes_per_s_by_tier"].items():
        print(f"  link {tier:<9} {fmt_rate(bw)} one way")
    if info["wraparound"] is not None:
        print(f"  wraparound     {info['wraparound']}" + ("  (twisted)" if topo.twisted else ""))
    print(f"  injection      {fmt_rate(info['injection_bw_bytes_per_s'])} one way per device")
    print(f"  bisection      {fmt_rate(info['bisection_bw_bytes_per_s'])} one way")
    print(f"  diameter       {info['diameter_hops']} hops")
    print(f"  total peak     {fmt_flops(info['peak_bf16_flop_per_s'] * topo.num_devices)} bf16")
    return 0


MAX_CLI_SIZES = 100_000  # sizes one `moeplan collective` prints


def parse_sizes(text: str, factor: float = 2.0) -> np.ndarray:
    """'1e6..1e10' (a geometric sweep by ``factor``, both ends included), '1e6,4e6' or '65536'."""
    try:
        if ".." in text:
            lo, hi = (float(x) for x in text.split(".."))
            if not 0 < lo <= hi or factor <= 1:
                raise ValueError
            count = int(np.floor(np.log(hi / lo) / np.log(factor) + 1e-9)) + 1
            if count > MAX_CLI_SIZES:
                raise ValueError(f"bytes: {text!r} by factor {factor:g} is {count:,} sizes; expected at most "
                                 f"{MAX_CLI_SIZES:,} (raise --factor)")
            return lo * factor ** np.arange(count)
        sizes = np.array([float(x) for x in text.split(",")])
    except (ValueError, OverflowError) as exc:
        if str(exc).startswith("bytes:"):
            raise
        raise ValueError(f"bytes: {text[:80]!r} is not a size list; expected e.g. 1e6..1e10, 1e6,4e6 or "
                         "65536") from None
    if np.any(sizes < 0) or not np.all(np.isfinite(sizes)) or np.any(sizes > BYTES_PER_DEVICE[1]):
        raise ValueError(f"bytes: {text[:80]!r}; expected sizes from 0 to {BYTES_PER_DEVICE[1]:g}")
    return sizes


def cmd_collective(args: argparse.Namespace) -> int:
    topo = topology_from_args(args)
    sizes = parse_sizes(args.bytes, args.factor)
    devices = args.devices if args.devices is not None else topo.num_devices
    experts = _expert_routing(args)
    cost = collective_cost(topo, args.op, sizes, devices, algorithm=args.algorithm, experts=experts)
    n = topo.device_ids(devices).size
    factor = bus_bandwidth_factor(args.op, n)
    rows = [
        {"bytes": float(b), "time_s": float(t), "algbw_bytes_per_s": float(b / t) if t > 0 else 0.0,
         "busbw_bytes_per_s": float(b / t * factor) if t > 0 else 0.0, "algorithm": str(a)}
        for b, t, a in zip(sizes, cost.time_s, cost.algorithm, strict=True)
    ]
    if args.json:
        print(json.dumps({"topology": topo.name, "op": args.op, "ranks": n, "rows": rows}, indent=2))
        return 0
    print(f"# {args.op} on {n} ranks of {topo.name} (model; columns as nccl-tests prints them)")
    print(f"# {'size (B)':>14} {'time (us)':>12} {'algbw (GB/s)':>13} {'busbw (GB/s)':>13}  algorithm")
    for r in rows:
        print(f"  {r['bytes']:>14.0f} {r['time_s'] * 1e6:>12.2f} {r['algbw_bytes_per_s'] / 1e9:>13.2f} "
              f"{r['busbw_bytes_per_s'] / 1e9:>13.2f}  {r['algorithm']}")
    return 0


def _expert_routing(args: argparse.Namespace) -> ExpertRouting | None:
    """The routing a dispatch kernel needs (--experts, --top-k, --max-nodes, --token-bytes), or None for a plain
    collective."""
    given = [args.experts, args.top_k, args.max_nodes, args.token_bytes]
    if all(v is None for v in given):
        return None
    if args.experts is None or args.top_k is None:
        raise ValueError("--experts and --top-k: a dispatch kernel needs both (the all_to_all's send buffer is one "
                         "copy per token and expert)")
    return ExpertRouting(args.experts, args.top_k, args.max_nodes, args.token_bytes)


def cmd_models(args: argparse.Namespace) -> int:
    for name in list_presets():
        model = load_model(name)
        counts = param_counts(model)
        print(f"{name:16} {counts['total'] / 1e9:8.1f}B total {counts['active'] / 1e9:7.2f}B active  "
              f"E={model.num_experts} k={model.top_k} moe_every={model.moe_every}")
    return 0


def _plan_args(args: argparse.Namespace) -> tuple[mp.Topology, mp.MoEModel, Layout]:
    """The topology, model and layout an estimate-like command names (default layout: pure data parallelism)."""
    topo = topology_from_args(args)
    model = load_model(args.model)
    return topo, model, Layout.parse(args.layout) if args.layout else Layout(data=topo.num_devices)


def cmd_estimate(args: argparse.Namespace) -> int:
    topo, model, layout = _plan_args(args)
    routing = Routing(args.routing) if args.routing else None
    est = estimate(model, topo, layout, global_batch_tokens=args.batch_tokens, dtype=args.dtype, mode=args.mode,
                   routing=routing, overlap=args.overlap, dispatch=args.dispatch, framework=args.framework,
                   profile=_profile_arg(args))
    if args.json:
        print(json.dumps({"topology": topo.name, "model": model.name, "layout": asdict(layout), "mode": est.mode,
                          "step_time_s": est.step_time_s, "tokens_per_s": est.tokens_per_s, "mfu": est.mfu,
                          "memory_per_device_bytes": est.memory_per_device_bytes, "memory": est.memory,
                          "fits": est.fits, "reason": est.reason, "drop_rate": est.drop_rate,
                          "micro_batches": est.micro_batches, "details": est.details, "layers": est.to_rows(),
                          "cost": _cost_or_none(topo, est.step_time_s, args)},
                         indent=2))
        return 0
    print(f"{model.name} on {topo.name}, {est.mode}, layout {args.layout or f'data={topo.num_devices}'}, "
          f"{args.batch_tokens} tokens, {args.dtype}")
    print(f"  {'part':20} {'kind':10} {'time':>10} {'share':>7}")
    for row in est.layers:
        if row.time_s > 0:
            print(f"  {row.name:20} {row.kind:10} {fmt_time(row.time_s):>10} {row.time_s / est.step_time_s:7.1%}")
    print(f"  step {fmt_time(est.step_time_s)}, {est.tokens_per_s:,.0f} tokens/s, MFU {est.mfu:.1%}, "
          f"{est.micro_batches} micro-batches, drop rate {est.drop_rate:.2%}")
    parts = ", ".join(f"{k} {fmt_gib(v)}" for k, v in est.memory.items())
    print(f"  memory {fmt_gib(est.memory_per_device_bytes)} per device ({parts}) "
          f"of {fmt_gib(topo.chip.hbm_capacity_bytes)}" + ("" if est.fits else "  DOES NOT FIT"))
    for key, value in est.details.items():
        if key == "host_activation_bytes" and value:
            print(f"  host memory: {fmt_gib(value)} per device of offloaded activations")
        elif key not in ("model_flops", "host_activation_bytes"):
            print(f"  {key.replace('_', ' ')}: {value:g}")
    _print_money(topo, est.step_time_s, args.batch_tokens, args.tokens_to_train, args.provider)
    return 0


def _print_money(topo, step_time_s: float, batch_tokens: int, tokens_to_train: float | None,
                 provider: str | None) -> None:
    from moeplan.cost import load_prices, step_cost

    if topo.family not in load_prices().families:
        return
    c = step_cost(topo, step_time_s, batch_tokens, tokens_to_train=tokens_to_train, provider=provider)
    money = (f"${c['usd_per_step']:,.2f} per step, ${c['usd_per_million_tokens']:,.3f} per million tokens at "
             f"${c['price_usd_per_device_hour']:.2f}/device-hour ({c['provider']}, {c['price_date']})"
             if c["usd_per_step"] is not None else f"no list price: {c['no_price']}")
    energy = "" if c["kwh_per_step"] is None else f"; {c['kwh_per_step']:,.3f} kWh per step at PUE {c['pue']:g}"
    print(f"  cost: {money}{energy}")
    if tokens_to_train:
        run = f"${c['run_usd']:,.0f}" if c["run_usd"] is not None else "no price"
        mwh = f", {c['run_mwh']:,.1f} MWh" if c["run_mwh"] is not None else ""
        print(f"  run of {tokens_to_train:g} tokens: {c['run_steps']:,} steps, {c['run_days']:,.1f} days, "
              f"{c['run_device_hours']:,.0f} device-hours, {run}{mwh}")


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. 8,16,32") from None


def _name_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _cf_list(text: str) -> list[float | None]:
    out: list[float | None] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        if part.lower() in ("none", "dropless"):
            out.append(None)
            continue
        try:
            out.append(float(part))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r}: expected a number or 'dropless'") from None
    return out


def _space_from_args(args: argparse.Namespace) -> SearchSpace:
    return SearchSpace(num_experts=args.experts, top_k=args.top_k, capacity_factor=args.capacity_factor,
                       moe_every=args.moe_every, expert_d_ff=args.expert_d_ff, expert=args.expert_degree,
                       tensor=args.tensor, pipeline=args.pipeline, fsdp=args.fsdp,
                       micro_batch_size=args.micro_batch_size, d_model=args.d_model, n_layers=args.n_layers,
                       keep_active=args.keep_active, recompute=args.recompute)


def _print_table(rows: list[dict], top: int) -> None:
    """Ranked rows; the loss column carries its interval and a '*' when the quality law extrapolates."""
    print(f"  {'#':>3} {'d x L':>9} {'E':>4} {'k':>2} {'fe':>6} {'cf':>8} {'every':>5} {'data':>5} {'fsdp':>5} "
          f"{'exp':>4} {'tp':>3} "
          f"{'pp':>3} {'mbs':>3} {'recompute':>9} {'step':>10} {'tokens/s':>12} {'MFU':>6} {'loss (interval)':>22} "
          f"{'mem GiB':>7} {'$/Mtok':>8}")
    for i, r in enumerate(rows[:top], 1):
        cf = "dropless" if r["capacity_factor"] is None else f"{r['capacity_factor']:g}"
        loss = f"{r['loss']:.4f} ({r['loss_low']:.3f}-{r['loss_high']:.3f}){'' if r['in_range'] else '*'}"
        shape = f"{r['d_model']}x{r['n_layers']}"
        print(f"  {i:>3} {shape:>9} {r['num_experts']:>4} {r['top_k']:>2} {r['expert_d_ff']:>6} {cf:>8} "
              f"{r['moe_every']:>5} {r['data']:>5} "
              f"{r['fsdp']:>5} {_experts(r['expert'], r['expert_tensor']):>4} {r['tensor']:>3} {r['pipeline']:>3} "
              f"{r['micro_batch_size']:>3} "
              f"{r['recompute']:>9} {fmt_time(r['step_time_s']):>10} {r['tokens_per_s']:>12,.0f} {r['mfu']:>6.1%} "
              f"{loss:>22} {r['memory_per_device_bytes'] / GIB:>7.1f} {_usd(r.get('usd_per_million_tokens')):>8}")
    if any(not r["in_range"] for r in rows[:top]):
        print("  * outside the quality law's fitted ranges (active size, tokens, activation ratio, granularity): "
              "an extrapolation")


def _configurations(result: SearchResult) -> list[dict]:
    return [c.row() for c in result.configurations]


def _write_table(result: SearchResult, csv_path: str | None, json_path: str | None) -> None:
    if csv_path:
        write_csv(csv_path, result.table)
    if json_path:
        write_json(json_path, {"objective": result.objective, "evaluated": result.evaluated,
                               "considered": result.considered, "details": result.details, "table": result.table})


def cmd_search(args: argparse.Namespace) -> int:
    topo = topology_from_args(args)
    model = load_model(args.model)
    start = time.perf_counter()
    result = search(model, topo, _space_from_args(args), global_batch_tokens=args.batch_tokens,
                    objective=args.objective, dtype=args.dtype, progress=not args.quiet,
                    constraints=Constraints(max_drop_rate=args.max_drop_rate),
                    time_budget_s=args.budget_days * 86400.0, device_hours=args.budget_device_hours,
                    dispatch=args.dispatch, framework=args.framework, profile=_profile_arg(args),
                    budget_usd=args.budget_usd, provider=args.provider)
    seconds = time.perf_counter() - start
    print(f"{model.name} on {topo.name}: {result.evaluated:,} configurations scored in {seconds:.2f} s "
          f"({result.evaluated / max(seconds, 1e-9):,.0f}/s), {result.details['kept']:,} meet the constraints; "
          f"objective {args.objective}")
    if result.best is None:
        print("  no layout meets the constraints (memory, divisibility, drop rate)")
        return 1
    print("  distinct MoE configurations, each with its best layout (loss intervals that overlap are ties, "
          "fastest first):")
    _print_table(_configurations(result), args.top)
    _write_table(result, args.csv, args.json)
    if args.html:
        _html_report(args.html, [(f"{model.name} on {topo.name}", model, topo, result, args.batch_tokens)])
        print(f"  report: {args.html}")
    return 0


DEFAULT_PLANS = [("tpu-v5p", dict(shape=(4, 4, 8))), ("dgx-h100", dict(nodes=4))]


def cmd_plan(args: argparse.Namespace) -> int:
    """The main job on a built-in default: an ST-MoE-like model on a TPU v5p slice and a 4-node H100 cluster."""
    model = load_model(args.model)
    space = SearchSpace(num_experts=[16, 32, 64, 128], top_k=[1, 2], capacity_factor=[1.0, 1.25, 2.0, None],
                        moe_every=[1, 2, 4], micro_batch_size=[1, 2, 4])
    runs = []
    start = time.perf_counter()
    profile = _profile_arg(args)
    for family, size in DEFAULT_PLANS:
        topo = mp.load_topology(family, **size)
        mine = profile if profile is not None and profile.topology.split(":")[0] == family else None
        if profile is not None and mine is None:
            print(f"plan: the profile was measured on {profile.topology}; {topo.name} uses its family's figures")
        result = search(model, topo, space, global_batch_tokens=args.batch_tokens, objective="quality_per_time",
                        progress=not args.quiet, profile=mine)
        runs.append((f"{model.name} on {topo.name}", model, topo, result, args.batch_tokens))
    seconds = time.perf_counter() - start
    total = sum(r[3].evaluated for r in runs)
    print(f"plan: {model.name}, {args.batch_tokens:,} tokens per step, objective quality_per_time "
          f"(loss reachable in 30 days); {total:,} configurations scored in {seconds:.2f} s")
    for title, _, topo, result, _ in runs:
        print(f"\n{title} ({topo.num_devices} x {topo.chip.name}): {result.details['kept']:,} layouts fit")
        if result.best is None:
            print("  nothing fits")
            continue
        print("  distinct MoE configurations, each with its best layout (loss intervals that overlap are ties, "
              "fastest first):")
        _print_table(_configurations(result), args.top)
    _print_side_by_side(runs)
    if args.html:
        _html_report(args.html, runs)
        print(f"\nreport: {args.html}")
    return 0


def _print_side_by_side(runs) -> None:
    best = [(title, result.best) for title, _, _, result, _ in runs if result.best is not None]
    if len(best) < 2:
        return
    print("\nbest layouts side by side")
    keys = [("experts", lambda c: c.model.num_experts), ("top-k", lambda c: c.model.top_k),
            ("capacity", lambda c: "dropless" if c.model.capacity_factor is None else c.model.capacity_factor),
            ("moe every", lambda c: c.model.moe_every), ("data/fsdp", lambda c: f"{c.layout.data}/{c.layout.fsdp}"),
            ("expert/tensor/pipe", lambda c: f"{_experts(c.layout.expert, c.layout.expert_tensor)}/{c.layout.tensor}/"
                                             f"{c.layout.pipeline}"),
            ("step time", lambda c: fmt_time(c.step_time_s)), ("tokens/s", lambda c: f"{c.tokens_per_s:,.0f}"),
            ("MFU", lambda c: f"{c.mfu:.1%}"), ("loss", lambda c: f"{c.loss:.4f}{'' if c.in_range else '*'}")]
    width = max(len(t) for t, _ in best) + 2
    print("  " + " " * 20 + "".join(f"{t[:width - 2]:>{width}}" for t, _ in best))
    for name, get in keys:
        print(f"  {name:20}" + "".join(f"{str(get(c)):>{width}}" for _, c in best))


def _html_report(path: str, runs) -> None:
    from moeplan import report  # plotly lives only there

    sections = []
    for title, _, topo, result, batch in runs:
        if result.best is None:
            continue
        best_est = {f"#{i + 1}": estimate(c.model, topo, c.layout, batch) for i, c in enumerate(result.pareto[:6])}
        money = ("" if result.best.usd_per_million_tokens is None else
                 f"; ${result.best.usd_per_million_tokens:,.3f} per million tokens at "
                 f"${result.details['usd_per_device_hour']:.2f}/device-hour ({result.details['provider']}, "
                 f"{result.details['price_date']})")
        text = (f"{result.evaluated:,} configurations scored; quality law: {result.details['quality_law']}; "
                f"best: {report.describe_layout(result.best).replace('<br>', ' | ')}{money}")
        sections.append((title, [report.pareto_figure(result, f"{title}: loss vs step time"),
                                 report.breakdown_figure(best_est, f"{title}: Pareto layouts, time by part"),
                                 report.heatmap_figure(result, f"{title}: best step time")], text))
    report.write_html(path, sections, "moeplan plan")


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Runs on whatever devices JAX sees; on a CPU host, 8 XLA devices unless XLA_FLAGS says otherwise."""
    if args.from_trace:
        return _calibrate_from_trace(args)
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    try:
        from moeplan.calibrate.run import calibrate, init_distributed
    except ImportError as exc:
        raise ValueError(f"calibrate needs jax: pip install -e '.[jax]' ({exc})") from None
    index = init_distributed(args.coordinator, args.num_processes, args.process_id)
    say = print if index == 0 else (lambda _text: None)
    start = time.perf_counter()
    profile = calibrate(args.out, quick=args.quick, devices=args.devices, topology=args.topology, say=say)
    errors = profile["errors"]
    say(f"profile {args.out}: held-out median error {errors['before_median_abs']:.1%} before the fit, "
        f"{errors['after_median_abs']:.1%} after; {time.perf_counter() - start:.0f} s")
    return 0


def _calibrate_from_trace(args: argparse.Namespace) -> int:
    """Fit a profile to the per-part times of traces the user recorded (DIR@LAYOUT, several allowed)."""
    from moeplan.calibrate.from_trace import calibrate_from_traces, trace_record

    if not args.model or not args.batch_tokens:
        raise ValueError("calibrate --from-trace: expected --model and --batch-tokens (what the traced steps ran)")
    model = load_model(args.model)
    topo = mp.load_topology(args.topology or "cpu-host")

    def records(specs):
        out = []
        for spec in specs or []:
            folder, sep, layout = spec.partition("@")
            if not sep:
                raise ValueError(f"--from-trace: got {spec!r}; expected DIR@LAYOUT, e.g. traces/run1@data=8,expert=8")
            out.append(trace_record(folder, model, Layout.parse(layout), args.batch_tokens))
        return out

    profile = calibrate_from_traces(records(args.from_trace), records(args.held_out), topo, args.out)
    errors = profile["errors"]
    which = "held-out" if args.held_out else "in-sample (no --held-out traces)"
    print(f"profile {args.out}: {which} per-part median |error| {errors['before_median_abs']:.1%} with the "
          f"defaults, {errors['after_median_abs']:.1%} after the fit")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """The plan as a MaxText config fragment, Megatron-Core arguments, or a moeplan plan YAML."""
    import yaml

    from moeplan.export import maxtext_config, megatron_args, plan_document

    topo, model, layout = _plan_args(args)
    estimate(model, topo, layout, global_batch_tokens=args.batch_tokens, dtype=args.dtype,
             framework=args.framework)  # the layout must be one the estimate accepts
    if args.format == "maxtext":
        text = yaml.safe_dump(maxtext_config(model, topo, layout, args.batch_tokens, args.dtype), sort_keys=False)
    elif args.format == "megatron":
        dispatch = args.dispatch or "nccl"
        words = megatron_args(model, topo, layout, args.batch_tokens, args.dtype, dispatch)
        lines = []
        for word in words:  # one flag and its value per line
            if word.startswith("--") or not lines:
                lines.append(word)
            else:
                lines[-1] += f" '{word}'" if "(" in word else f" {word}"
        text = " \\\n".join(lines) + "\n"
    else:
        text = yaml.safe_dump(plan_document(model, topo, layout, args.batch_tokens, args.dtype, args.framework),
                              sort_keys=False)
    if args.out:
        write_atomic(args.out, text)
        print(f"{args.format} export of {model.name} on {topo.name}: {args.out}")
    else:
        print(text, end="")
    return 0


def _cost_or_none(topo, step_time_s: float, args: argparse.Namespace) -> dict | None:
    from moeplan.cost import load_prices, step_cost

    if topo.family not in load_prices().families:
        return None
    return step_cost(topo, step_time_s, args.batch_tokens, tokens_to_train=args.tokens_to_train, provider=args.provider)


def _experts(expert: int, expert_tensor: int) -> str:
    """The expert degree, with the expert-tensor degree when experts are split ("8x2")."""
    return f"{expert}x{expert_tensor}" if expert_tensor > 1 else str(expert)


def _usd(value) -> str:
    return "-" if value is None else f"{value:,.2f}"


def _profile_arg(args: argparse.Namespace):
    """The calibration profile named by --profile, or None."""
    return mp.load_profile(args.profile) if getattr(args, "profile", None) else None


def cmd_validate(args: argparse.Namespace) -> int:
    """Run a search's top candidates (or explicit layouts) as real JAX steps under the profiler here."""
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    try:
        from moeplan.calibrate.validate import validate
    except ImportError as exc:
        raise ValueError(f"validate needs jax: pip install -e '.[jax]' ({exc})") from None
    model = load_model(args.model)
    if args.layouts:
        pairs = [(model, Layout.parse(text)) for text in args.layouts.split(";") if text.strip()]
    else:
        topo = topology_from_args(args)
        result = search(model, topo, SearchSpace(num_experts=sorted({8, 16, 32, model.num_experts}),
                                                 top_k=sorted({1, 2, model.top_k})),
                        global_batch_tokens=args.batch_tokens, objective="quality_per_time")
        pairs = [(c.model, c.layout) for c in result.configurations[:args.top]]
    profile = _profile_arg(args)
    summary = validate(pairs, args.out, steps=args.steps, profile=profile, say=print if not args.json else _quiet)
    if args.html:
        from moeplan.report import validation_figure, write_html

        write_html(args.html, [("Predicted against measured, per part", [validation_figure(summary)], "")])
    if args.json:
        print(json.dumps(summary, indent=2, default=float))
        return 0
    print(f"{'part':14} {'median |error|':>15}")
    for part, error in summary["median_abs_error_by_part"].items():
        print(f"{part:14} {error:15.1%}")
    tau = summary["kendall_tau"]
    print(f"step-time order: Kendall tau {'n/a' if tau is None else f'{tau:.2f}'} over {len(pairs)} candidates; "
          f"results {args.out}/results.json")
    return 0


def _quiet(_text: str) -> None:
    return None


def cmd_dashboard(args: argparse.Namespace) -> int:
    """Start the Streamlit dashboard (extra 'app')."""
    import shutil
    import subprocess
    from pathlib import Path

    app = Path(__file__).resolve().parent.parent / "app" / "dashboard.py"
    exe = shutil.which("streamlit") or str(Path(sys.executable).with_name("streamlit"))
    if not Path(exe).exists() or not app.exists():
        raise ValueError("dashboard: needs the 'app' extra (pip install -e '.[app]') and the app/ folder")
    return subprocess.call(dashboard_command(exe, app, args.port))


def dashboard_command(exe: str, app, port: int) -> list[str]:
    """The streamlit command line: the server refuses uploads past the size the YAML reader accepts."""
    from moeplan.schema import MAX_YAML_BYTES

    return [exe, "run", str(app), "--server.port", str(port), "--server.headless", "true",
            "--browser.gatherUsageStats", "false", "--server.maxUploadSize", str(-(-MAX_YAML_BYTES // 2**20))]


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Callable[[argparse.Namespace], int]]]:
    parser = argparse.ArgumentParser(prog="moeplan", description="Hardware-aware MoE cost model and layout planner")
    parser.add_argument("--version", action="version", version=f"moeplan {mp.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    handlers: dict[str, Callable[[argparse.Namespace], int]] = {}

    sub.add_parser("topologies", help="list the bundled hardware families")
    handlers["topologies"] = cmd_topologies

    show = sub.add_parser("show", help="show a topology: chips, peak, HBM, links, bisection, diameter")
    _add_topology_args(show)
    show.add_argument("--json", action="store_true", help="print JSON (SI units)")
    handlers["show"] = cmd_show

    coll = sub.add_parser("collective", help="time a collective over a size sweep, in nccl-tests' columns")
    coll.add_argument("op", choices=OPS)
    _add_topology_args(coll, positional=False)
    coll.add_argument("--devices", type=int, help="ranks: the first N devices (default: all)")
    coll.add_argument("--bytes", default="1e6..1e10", help="sizes per device: 1e6..1e10, 1e6,4e6 or 65536")
    coll.add_argument("--factor", type=float, default=2.0, help="step of a .. sweep (default 2)")
    coll.add_argument("--algorithm", help="force an algorithm (ring, tree, nvls, nvls_tree, direct; with --experts "
                      "and --top-k the all_to_all's dispatch kernels deepep_normal, hybridep and deepep_ll)")
    coll.add_argument("--experts", type=int, help="dispatch kernels: experts spread over the ranks")
    coll.add_argument("--top-k", dest="top_k", type=int, help="dispatch kernels: experts per token")
    coll.add_argument("--max-nodes", dest="max_nodes", type=int,
                      help="dispatch kernels: node-limited routing, at most this many nodes per token")
    coll.add_argument("--token-bytes", dest="token_bytes", type=float,
                      help="dispatch kernels: one token copy's bytes (DeepEP's and HybridEP's SMs spend a fixed time "
                           "per copy; without it only the bytes count)")
    coll.add_argument("--json", action="store_true")
    handlers["collective"] = cmd_collective

    sub.add_parser("models", help="list the bundled model presets")
    handlers["models"] = cmd_models

    est = sub.add_parser("estimate", help="per-layer time and memory of one model, topology and layout")
    _add_topology_args(est, positional=False)
    est.add_argument("--model", required=True, help="preset name (see 'moeplan models') or a model .yaml")
    est.add_argument("--layout", default="", help="e.g. expert=8,fsdp=16,pipeline=2,micro_batch_size=2 (default: data)")
    est.add_argument("--batch-tokens", type=int, required=True, help="global batch in tokens (decode: sequences)")
    est.add_argument("--mode", choices=MODES, default="train")
    est.add_argument("--dtype", default="bf16", help="bf16, fp8, mxfp8 or fp32")
    est.add_argument("--routing", choices=["balanced", "uniform"], help="routing distribution (default uniform)")
    est.add_argument("--framework", choices=sorted(FRAMEWORKS), help="set overlap, dispatch and attention kernels "
                     "as this framework runs them (default megatron)")
    est.add_argument("--overlap", choices=OVERLAPS, help="communication overlap policy (default: the framework's)")
    est.add_argument("--dispatch", choices=KERNELS,
                     help="expert dispatch kernel: nccl all-to-all, DeepEP normal or low-latency")
    est.add_argument("--profile", help="calibration profile (moeplan calibrate) for compute and collectives")
    est.add_argument("--tokens-to-train", type=float, help="also print the whole run: steps, days, dollars, MWh")
    est.add_argument("--provider", help="price of this provider (moeplan/prices.yaml; default the lowest)")
    est.add_argument("--json", action="store_true")
    handlers["estimate"] = cmd_estimate

    srch = sub.add_parser("search", help="search MoE configurations and layouts, rank them, show the Pareto front")
    _add_topology_args(srch, positional=False)
    srch.add_argument("--model", required=True, help="preset name or a model .yaml")
    srch.add_argument("--batch-tokens", type=int, required=True, help="global batch in tokens")
    srch.add_argument("--objective", choices=OBJECTIVES, default="quality_per_time")
    srch.add_argument("--dtype", default="bf16")
    srch.add_argument("--dispatch", choices=KERNELS, help="expert dispatch kernel (default: the framework's)")
    srch.add_argument("--framework", choices=sorted(FRAMEWORKS), help="framework preset (default megatron)")
    knobs = [("--experts", "experts", _int_list), ("--top-k", "top_k", _int_list),
             ("--capacity-factor", "capacity_factor", _cf_list), ("--moe-every", "moe_every", _int_list),
             ("--expert-d-ff", "expert_d_ff", _int_list), ("--expert-degree", "expert_degree", _int_list),
             ("--tensor", "tensor", _int_list), ("--pipeline", "pipeline", _int_list), ("--fsdp", "fsdp", _int_list),
             ("--micro-batch-size", "micro_batch_size", _int_list), ("--d-model", "d_model", _int_list),
             ("--n-layers", "n_layers", _int_list), ("--recompute", "recompute", _name_list)]
    for flag, dest, kind in knobs:
        srch.add_argument(flag, dest=dest, type=kind, help="comma-separated values to try (default: model/topology)")
    srch.add_argument("--keep-active", action="store_true",
                      help="expert width = the model's top_k x expert_d_ff / top_k: active parameters constant")
    budget = srch.add_mutually_exclusive_group()
    budget.add_argument("--budget-days", type=float, default=30.0,
                        help="training time the loss is reached in (objectives quality, quality_per_time)")
    budget.add_argument("--budget-device-hours", type=float, help="the budget in device-hours instead")
    srch.add_argument("--max-drop-rate", type=float)
    srch.add_argument("--top", type=int, default=10, help="rows to print")
    srch.add_argument("--csv", help="write the ranked table as CSV")
    srch.add_argument("--json", help="write the ranked table as JSON")
    srch.add_argument("--html", help="write the HTML report (needs the 'report' extra: plotly)")
    srch.add_argument("--quiet", action="store_true", help="no progress bar")
    srch.add_argument("--profile", help="calibration profile (moeplan calibrate) for compute and collectives")
    srch.add_argument("--budget-usd", type=float, help="money budget of the run (device-hours at the list price)")
    srch.add_argument("--provider", help="price of this provider (moeplan/prices.yaml; default the lowest)")
    handlers["search"] = cmd_search

    plan = sub.add_parser("plan", help="the default search: an ST-MoE-like model on TPU v5p and on 4 H100 nodes")
    plan.add_argument("--model", default="st-moe-like-8b")
    plan.add_argument("--batch-tokens", type=int, default=512 * 2048)
    plan.add_argument("--top", type=int, default=5)
    plan.add_argument("--html", help="write the HTML report (needs plotly)")
    plan.add_argument("--quiet", action="store_true")
    plan.add_argument("--profile", help="calibration profile; used for the default topology it was measured on")
    handlers["plan"] = cmd_plan

    cal = sub.add_parser("calibrate", help="measure JAX MoE layers and collectives here, fit, write a profile")
    cal.add_argument("--quick", action="store_true", help="fewer shapes (under 3 minutes on a CPU host)")
    cal.add_argument("--devices", type=int, help="use the first N devices JAX sees (default: all)")
    cal.add_argument("--out", default="profiles/cpu-host.yaml", help="profile to write (measurements beside it)")
    cal.add_argument("--topology", help="family the devices belong to (default: cpu-host, or dgx-h100 on GPUs)")
    cal.add_argument("--coordinator", help="jax.distributed coordinator host:port (multi-host)")
    cal.add_argument("--num-processes", type=int, help="processes in a multi-host run")
    cal.add_argument("--process-id", type=int, help="this process's index in a multi-host run")
    cal.add_argument("--from-trace", action="append", metavar="DIR@LAYOUT",
                     help="fit to a profiled step instead of benchmarks: a jax.profiler trace folder with the HLO "
                          "dump beside it (XLA_FLAGS=--xla_dump_to=DIR/hlo), @ the layout it ran; repeatable")
    cal.add_argument("--held-out", action="append", metavar="DIR@LAYOUT", help="traces that report the error only")
    cal.add_argument("--model", help="with --from-trace: the model the traced steps ran (preset or .yaml)")
    cal.add_argument("--batch-tokens", type=int, help="with --from-trace: their global batch in tokens")
    handlers["calibrate"] = cmd_calibrate

    exp = sub.add_parser("export", help="a plan as a MaxText config, Megatron-Core arguments or a moeplan YAML")
    _add_topology_args(exp, positional=False)
    exp.add_argument("--model", required=True, help="preset name or a model .yaml")
    exp.add_argument("--layout", help="e.g. data=16,expert=8,pipeline=2 (default: pure data parallelism)")
    exp.add_argument("--batch-tokens", type=int, required=True, help="global batch in tokens")
    exp.add_argument("--dtype", default="bf16")
    exp.add_argument("--framework", choices=sorted(FRAMEWORKS))
    exp.add_argument("--dispatch", choices=KERNELS, help="Megatron: the token dispatcher (deepep_*, hybridep -> flex)")
    exp.add_argument("--format", choices=("maxtext", "megatron", "moeplan"), required=True)
    exp.add_argument("--out", help="file to write (default: print)")
    handlers["export"] = cmd_export

    val = sub.add_parser("validate", help="run candidates as JAX steps under the profiler here; predicted vs "
                                          "measured per part, and the step-time order (Kendall tau)")
    _add_topology_args(val, positional=False, default="dgx-h100")
    val.add_argument("--model", required=True, help="preset name or a model .yaml")
    val.add_argument("--batch-tokens", type=int, default=2**20, help="global batch of the search (tokens)")
    val.add_argument("--top", type=int, default=6, help="candidates of the search to run")
    val.add_argument("--layouts", help="explicit layouts instead of a search: 'data=8,expert=8;data=4,expert=2'")
    val.add_argument("--steps", type=int, default=3, help="profiled steps per candidate")
    val.add_argument("--profile", help="calibration profile for the predictions")
    val.add_argument("--out", default="artifacts/validate", help="folder for traces and results (resumable)")
    val.add_argument("--html", help="write a plotly report here")
    val.add_argument("--json", action="store_true")
    handlers["validate"] = cmd_validate

    dash = sub.add_parser("dashboard", help="start the Streamlit planning dashboard")
    dash.add_argument("--port", type=int, default=8501)
    handlers["dashboard"] = cmd_dashboard
    return parser, handlers


def main(argv: Sequence[str] | None = None) -> int:
    parser, handlers = build_parser()
    args = parser.parse_args(argv)
    try:
        return handlers[args.command](args)
    except BrokenPipeError:  # output piped into `head`
        sys.stderr.close()
        return 0
    except (ValueError, OverflowError) as exc:  # bad input: one line, never a traceback
        return _fail(args.command, str(exc), 2)
    except OSError as exc:  # a path that cannot be read or written
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        return _fail(args.command, f"{where}{exc.strerror or exc}", 1)
    except ImportError as exc:  # an optional extra that is not installed
        return _fail(args.command, f"{exc}; install the extra that provides it (see the README)", 1)
    except MemoryError:
        return _fail(args.command, "out of memory; try a smaller search space or size", 1)
    except KeyboardInterrupt:
        return _fail(args.command, "interrupted", 130)


def _fail(command: str, message: str, code: int) -> int:
    print(f"moeplan {command}: error: {message[:2000]}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
