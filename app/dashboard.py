"""moeplan planning dashboard (Streamlit). Run: `moeplan dashboard` or `make dashboard`.

Five pages on the public API. Plan (the landing page): a model, one or more hardware options, tokens to
train and a time or money budget in; the recommended configurations, the Pareto front, a comparison
across the options, and for a chosen row its breakdown, timeline, memory and runnable exports out.
Topology, Estimate, Search and Calibration go into each part. Nothing imports this file; it is the only
place that imports streamlit. Heavy results are cached with st.cache_data. Invalid input is shown as an
error beside the form, never as a traceback.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import math
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import streamlit as st
import yaml

import moeplan as mp
from moeplan import report
from moeplan.cost import load_prices, step_cost
from moeplan.export import maxtext_config, megatron_args
from moeplan.families import load_family
from moeplan.frameworks import FRAMEWORKS
from moeplan.layout import OFFLOADS, RECOMPUTE
from moeplan.moe import model_from_mapping
from moeplan.profiles import profile_from_upload
from moeplan.schema import MAX_YAML_BYTES, parse_yaml_mapping

ROOT = Path(__file__).resolve().parent.parent
PAGES = ("Plan", "Topology", "Estimate", "Search", "Calibration")
OPS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all")
MAX_UPLOAD_BYTES = MAX_YAML_BYTES  # the upload label shows it; profile_from_upload enforces it


# ------------------------------------------------------------------ cached API calls
@st.cache_resource(show_spinner=False)
def topology(name: str, size: str):
    if mp.load_topology(name).kind == "torus":
        return mp.load_topology(name, shape=size or None)
    return mp.load_topology(name, nodes=int(size) if size else None)


@st.cache_data(show_spinner=False)
def collective_curves(name: str, size: str, devices: int) -> dict:
    topo = topology(name, size)
    sizes = np.logspace(3, 10, 29)
    return {op: mp.collective_time_s(topo, op, sizes, devices).tolist() for op in OPS} | {"bytes": sizes.tolist()}


@st.cache_data(show_spinner=False)
def run_estimate(name: str, size: str, model_fields: dict, layout_fields: dict, batch: int, mode: str, dtype: str,
                 framework: str | None = None):
    model = mp.MoEModel(**model_fields)
    return mp.estimate(model, topology(name, size), mp.Layout(**layout_fields), batch, dtype=dtype, mode=mode,
                       framework=framework)


def model_fields(model: mp.MoEModel) -> dict:
    return {f.name: getattr(model, f.name) for f in dataclasses.fields(model)}


# ------------------------------------------------------------------ widgets
def topology_picker(key: str) -> tuple[str, str]:
    names = mp.list_topologies()
    name = st.selectbox("Hardware family", names, index=names.index("dgx-h100"), key=f"{key}_family")
    torus = mp.load_topology(name).kind == "torus"
    default = "x".join(map(str, mp.load_topology(name).shape)) if torus else "1"
    label = "Slice shape (e.g. 4x4x8)" if torus else "Nodes"
    size = st.text_input(label, value=default, key=f"{key}_size_{name}")
    return name, size.strip()


# ------------------------------------------------------------------ Plan (the landing page)
PLAN_SPACE = dict(top_k=[1, 2], capacity_factor=[1.0, 1.25, None], moe_every=[1, 2], micro_batch_size=[1, 2])
HARDWARE_DEFAULTS = (("tpu-v5p", "4x4x4"), ("dgx-h100", "8"), ("gb200-nvl72", "1"))
SHOWN = 8  # configurations offered for a closer look


def sizes_offered(name: str) -> list[str]:
    """The sizes a family offers (slice shapes from its allowed axis lengths, or node counts), smallest first."""
    fam = load_family(name).layout
    if hasattr(fam, "max_nodes"):
        nodes = sorted({n for n in (1, 2, 4, 8, 16, 32, 64, 128, 256) if n <= fam.max_nodes} | {fam.default_nodes})
        return [str(n) for n in nodes]
    axes = len(fam.default_shape)
    shapes = {tuple(sorted(c)) for c in itertools.combinations_with_replacement(fam.allowed_axis_sizes, axes)
              if math.prod(c) <= min(fam.max_chips, 4096)}
    return ["x".join(map(str, s)) for s in sorted(shapes, key=lambda s: (math.prod(s), s))]


def hardware_option(i: int) -> tuple[str, str]:
    names = mp.list_topologies()
    family, size = HARDWARE_DEFAULTS[i % len(HARDWARE_DEFAULTS)]
    c = st.columns(2)
    name = c[0].selectbox(f"Hardware {i + 1}", names, index=names.index(family), key=f"plan_hw{i}")
    offered, topo = sizes_offered(name), mp.load_topology(name)
    torus = topo.kind == "torus"
    default = size if size in offered else "x".join(map(str, topo.shape)) if torus else offered[0]
    size = c[1].selectbox(f"Hardware {i + 1} {'slice shape' if torus else 'nodes'}", offered,
                          index=offered.index(default) if default in offered else 0, key=f"plan_size{i}_{name}")
    return name, size


def plan_model() -> dict | None:
    upload = st.file_uploader(f"Model YAML (optional, at most {MAX_UPLOAD_BYTES // 2**20} MiB)",
                              type=["yaml", "yml"], key="plan_up")
    if upload is None:
        return model_editor("plan")
    try:
        return model_fields(model_from_mapping(parse_yaml_mapping(upload.getvalue(), upload.name[:100], "model"),
                                               upload.name[:100]))
    except ValueError as exc:
        st.error(f"Invalid model: {exc}")
        return None


@st.cache_resource(show_spinner=False, max_entries=32)  # shared, never copied: the results are only read
def run_plan(fields: dict, options: tuple, batch: int, tokens: float, budget: tuple[str, float]) -> list[dict]:
    """Per hardware option: its search (objective quality_per_time within the budget) or why it has none."""
    model = mp.MoEModel(**fields)
    space = mp.SearchSpace(num_experts=sorted({8, 16, 32, 64, model.num_experts}), **PLAN_SPACE)
    out = []
    for name, size in options:
        topo = topology(name, size)
        kind, amount = budget
        try:
            result = mp.search(model, topo, space, global_batch_tokens=batch, objective="quality_per_time",
                               **({"time_budget_s": amount * 86400.0} if kind == "days" else {"budget_usd": amount}))
        except ValueError as exc:
            out.append({"option": f"{name} {size}", "name": name, "size": size, "error": str(exc)})
            continue
        rows = [_plan_row(name, size, topo, c, batch, tokens) for c in result.configurations[:SHOWN]]
        out.append({"option": f"{name} {size}", "name": name, "size": size, "result": result, "rows": rows})
    return out


def _plan_row(name: str, size: str, topo, c, batch: int, tokens: float) -> dict:
    money = step_cost(topo, c.step_time_s, batch, tokens_to_train=tokens) if topo.family in load_prices().families \
        else {}
    cf = "dropless" if c.model.capacity_factor is None else f"{c.model.capacity_factor:g}"
    lay = c.layout
    return {"hardware": f"{name} {size}", "devices": topo.num_devices, "experts": c.model.num_experts,
            "top_k": c.model.top_k, "capacity": cf, "moe_every": c.model.moe_every,
            "layout": f"data {lay.data} fsdp {lay.fsdp} expert {lay.expert} tensor {lay.tensor} pipeline "
                      f"{lay.pipeline} mbs {lay.micro_batch_size} {lay.recompute}",
            "loss": round(c.loss, 4), "step_s": c.step_time_s, "tokens/s": round(c.tokens_per_s),
            "MFU": round(c.mfu, 3), "days": tokens / c.tokens_per_s / 86400.0,
            "run $": money.get("run_usd"), "$/Mtok": money.get("usd_per_million_tokens"),
            "MWh": money.get("run_mwh")}


def page_plan() -> None:
    st.header("Plan")
    fields = plan_model()
    count = int(st.number_input("Hardware options", 1, 3, 2, key="plan_count"))
    options = tuple(hardware_option(i) for i in range(count))
    c = st.columns(4)
    tokens = float(c[0].number_input("Tokens to train", 1e6, 1e15, 1e11, format="%.3g", key="plan_tokens"))
    batch = int(c[1].number_input("Global batch (tokens)", 4096, 1 << 34, 256 * 4096, key="plan_batch"))
    kind = c[2].radio("Budget", ("days", "dollars"), horizontal=True, key="plan_budget_kind")
    amount = float(c[3].number_input(f"Budget ({kind})", 0.01, 1e12, 30.0 if kind == "days" else 1e6,
                                     key=f"plan_budget_{kind}"))
    if fields is None:
        return
    try:
        with st.spinner("Searching each hardware option..."):
            plans = run_plan(fields, options, batch, tokens, (kind, amount))
    except ValueError as exc:
        st.error(str(exc))
        return
    for p in plans:
        if "error" in p:
            st.warning(f"{p['option']}: {p['error']}")
    found = [p for p in plans if p.get("rows")]
    if not found:
        st.warning("No configuration fits on any option: try more devices, a larger budget or a smaller model.")
        return
    st.session_state["last_search"] = {  # the plan's candidates, for the Calibration page to run here
        "label": f"{fields['name']} on {', '.join(p['option'] for p in found)} (the plan)",
        "pairs": [(c.model, c.layout) for p in found for c in p["result"].configurations[:SHOWN]][:MAX_VALIDATED]}
    st.subheader("Across the hardware options: the best configuration of each")
    st.dataframe([p["rows"][0] for p in found], key="plan_compare")
    st.plotly_chart(plan_front_figure(found, kind), key="plan_front")
    st.subheader("Recommended configurations")
    st.dataframe([r for p in found for r in p["rows"]], key="plan_rows")
    closer_look(found, batch)


@st.fragment
def closer_look(found: list[dict], batch: int) -> None:
    """The chosen row in detail; a fragment: choosing another row reruns this part alone."""
    rows = [r for p in found for r in p["rows"]]
    labels = [f"{i + 1}. {r['hardware']}: E={r['experts']} k={r['top_k']} {r['capacity']} every {r['moe_every']}, "
              f"{r['layout']}" for i, r in enumerate(rows)]
    pick = st.radio("Look closer at", range(len(rows)), format_func=lambda i: labels[i], key="plan_pick")
    chosen = [(p, c) for p in found for c in p["result"].configurations[:SHOWN]][pick]
    row = rows[pick]
    st.subheader(f"Row {pick + 1}: {row['hardware']}, {row['experts']} experts, top-{row['top_k']}")
    plan_details(chosen[0], chosen[1], batch)


def plan_front_figure(found: list[dict], kind: str) -> go.Figure:
    """Loss against days to train (or run dollars) per hardware option, its non-dominated points joined."""
    fig = go.Figure()
    x_key = "days" if kind == "days" else "run $"
    for p in found:
        points = sorted((r[x_key], r["loss"]) for r in p["rows"] if r[x_key] is not None)
        front = [pt for i, pt in enumerate(points) if all(pt[1] < q[1] for q in points[:i])]
        fig.add_trace(go.Scatter(x=[a for a, _ in points], y=[b for _, b in points], mode="markers",
                                 name=p["option"], marker=dict(size=8)))
        fig.add_trace(go.Scatter(x=[a for a, _ in front], y=[b for _, b in front], mode="lines",
                                 name=f"{p['option']} front", showlegend=False))
    fig.update_layout(title=f"Predicted loss vs {'days to train' if kind == 'days' else 'dollars to train'}",
                      xaxis_title="days" if kind == "days" else "US$", yaxis_title="predicted loss (nats/token)",
                      template="plotly_white", height=420)
    return fig


@st.cache_resource(show_spinner=False, max_entries=64)  # shared, never copied: the figures are only read
def plan_estimate(name: str, size: str, model_fields_: dict, layout_fields: dict, batch: int, option: str):
    """A configuration's estimate and its three figures (breakdown, memory against HBM, timeline)."""
    topo = topology(name, size)
    est = mp.estimate(mp.MoEModel(**model_fields_), topo, mp.Layout(**layout_fields), batch)
    return est, (report.breakdown_figure({option: est}, "Step time by part"), memory_figure(est, topo),
                 timeline_figure(est))


def plan_details(plan: dict, candidate, batch: int) -> None:
    """The chosen configuration: its estimate by part, one layer's timeline, memory against HBM, exports."""
    topo = topology(plan["name"], plan["size"])
    est, (bars, memory, timeline) = plan_estimate(plan["name"], plan["size"], model_fields(candidate.model),
                                                  dataclasses.asdict(candidate.layout), batch, plan["option"])
    m = st.columns(4)
    m[0].metric("Step time", f"{est.step_time_s * 1e3:,.1f} ms")
    m[1].metric("Tokens/s", f"{est.tokens_per_s:,.0f}")
    m[2].metric("MFU", f"{est.mfu:.1%}")
    m[3].metric("Memory / device", f"{est.memory_per_device_bytes / 2**30:,.1f} GiB")
    c = st.columns(2)
    c[0].plotly_chart(bars, key="plan_bars")
    c[1].plotly_chart(memory, key="plan_mem")
    st.plotly_chart(timeline, key="plan_timeline")
    exports = st.columns(2)
    for col, label, make, file in ((exports[0], "MaxText config", _maxtext_text, "maxtext.yml"),
                                   (exports[1], "Megatron arguments", _megatron_text, "megatron_args.txt")):
        try:
            text = make(candidate, topo, batch)
        except ValueError as exc:
            col.info(f"{label}: {exc}")
            continue
        col.download_button(f"Download {label}", text, file, "text/plain", key=f"dl_{file}")


def _maxtext_text(candidate, topo, batch: int) -> str:
    return yaml.safe_dump(maxtext_config(candidate.model, topo, candidate.layout, batch), sort_keys=False)


def _megatron_text(candidate, topo, batch: int) -> str:
    return " ".join(megatron_args(candidate.model, topo, candidate.layout, batch)) + "\n"


def memory_figure(est, topo) -> go.Figure:
    """The memory stack per device against the chip's HBM."""
    hbm = topo.chip.hbm_capacity_bytes / 2**30
    bars = [dict(type="bar", x=["per device"], y=[v / 2**30], name=k) for k, v in est.memory.items()]
    line = dict(type="scatter", x=["per device"], y=[hbm], mode="markers+text", text=["HBM"], name="HBM",
                textposition="top center", marker=dict(symbol="line-ew-open", size=60, color="#333"))
    return report.quick_figure(bars + [line], dict(barmode="stack", title=dict(text="Memory per device (GiB)"),
                                                   height=450))


def timeline_figure(est) -> go.Figure:
    """One layer of each kind, part after part on one micro-batch's time line: compute and communication."""
    traces, start = [], 0.0
    for row in est.layers:
        if row.count <= 0 or row.time_s <= 0 or row.kind in ("bubble", "optimizer"):
            continue
        width = row.time_s / row.count
        traces.append(dict(type="bar", y=["compute" if row.kind == "compute" else "communication"], x=[width],
                           base=[start], orientation="h", name=row.name,
                           marker=dict(color=report.KIND_COLOURS.get(row.kind, "#888")),
                           hovertext=f"{row.name}: {width * 1e3:.3f} ms", hoverinfo="text"))
        start += width
    return report.quick_figure(traces, dict(title=dict(text="One layer of each kind, one micro-batch (forward + "
                                                            "backward)"), barmode="overlay",
                                            xaxis=dict(title=dict(text="seconds")), height=260))


def page_topology() -> None:
    st.header("Topology")
    name, size = topology_picker("topo")
    try:
        topo = topology(name, size)
    except ValueError as exc:
        st.error(str(exc))
        return
    chip = topo.chip
    cols = st.columns(4)
    cols[0].metric("Devices", topo.num_devices)
    cols[1].metric("Peak bf16 / chip", f"{chip.peak_bf16_flop_per_s / 1e12:,.0f} TFLOP/s")
    cols[2].metric("HBM", f"{chip.hbm_capacity_bytes / 2**30:,.0f} GiB")
    cols[3].metric("Bisection", f"{topo.bisection_bw_bytes_per_s() / 1e9:,.0f} GB/s")
    st.table({"tier": list(topo.tier_bandwidths()), "one-way GB/s": [f"{v / 1e9:,.1f}" for v in
                                                                      topo.tier_bandwidths().values()]})
    st.plotly_chart(graph_figure(topo), key="graph")
    devices = st.slider("Devices in the collective", 2, topo.num_devices, topo.num_devices, key="topo_devices")
    try:
        curves = collective_curves(name, size, devices)
    except ValueError as exc:
        st.error(str(exc))
        return
    fig = go.Figure()
    for op in OPS:
        factor = 2 * (devices - 1) / devices if op == "all_reduce" else (devices - 1) / devices
        busbw = [b / t * factor / 1e9 for b, t in zip(curves["bytes"], curves[op], strict=True)]
        fig.add_trace(go.Scatter(x=curves["bytes"], y=busbw, name=op, mode="lines+markers"))
    fig.update_layout(title=f"Bus bandwidth vs size on {devices} devices (nccl-tests convention)",
                      xaxis_type="log", xaxis_title="bytes per device", yaxis_title="busbw (GB/s)",
                      template="plotly_white", height=420)
    st.plotly_chart(fig, key="busbw")


def graph_figure(topo) -> go.Figure:
    """Tori as grids (slices side by side along the last axis), clusters as nodes with their switch."""
    coords = topo.coordinates
    if topo.kind == "torus":
        shape = topo.shape + (1,) * (3 - len(topo.shape))
        c3 = np.pad(coords, ((0, 0), (0, 3 - coords.shape[1])))
        xy = np.stack([c3[:, 0] + c3[:, 2] * (shape[0] + 1), c3[:, 1]], 1).astype(float)
    else:
        xy = np.stack([coords[:, 1], -coords[:, 0] * 2.0], 1).astype(float)
    pos = {d: xy[d] for d in range(topo.num_devices)}
    for v, kind in topo.graph.nodes(data="kind"):
        if kind != "device":
            nbrs = [pos[u] for u in topo.graph.neighbors(v) if u in pos]
            if nbrs:
                pos[v] = np.mean(nbrs, axis=0) + np.array([0.0, 0.8 if kind == "switch" else 0.4])
    ex, ey = [], []
    for u, v in topo.graph.edges():
        if u in pos and v in pos:
            ex += [pos[u][0], pos[v][0], None]
            ey += [pos[u][1], pos[v][1], None]
    fig = go.Figure(go.Scatter(x=ex, y=ey, mode="lines", line=dict(color="#bbb", width=1), hoverinfo="skip"))
    fig.add_trace(go.Scatter(x=xy[:, 0], y=xy[:, 1], mode="markers", marker=dict(size=8, color="#4c78a8"),
                             text=[f"device {d} {tuple(coords[d])}" for d in range(topo.num_devices)],
                             hoverinfo="text", name="devices"))
    fig.update_layout(title=f"{topo.name}: {topo.num_devices} devices", showlegend=False, height=420,
                      template="plotly_white", xaxis_visible=False, yaxis_visible=False)
    return fig


def model_editor(key: str) -> dict | None:
    presets = mp.list_presets()
    preset = st.selectbox("Model preset", presets, index=presets.index("mixtral-8x7b"), key=f"{key}_preset")
    base = model_fields(mp.load_model(preset))
    with st.expander("Edit the model"):
        c1, c2, c3 = st.columns(3)
        base["n_layers"] = c1.number_input("Layers", 1, 512, base["n_layers"], key=f"{key}_layers_{preset}")
        base["num_experts"] = c2.number_input("Experts", 1, 4096, base["num_experts"], key=f"{key}_experts_{preset}")
        base["top_k"] = c3.number_input("Top-k", 1, 64, base["top_k"], key=f"{key}_topk_{preset}")
        cf = c1.text_input("Capacity factor (blank = dropless)", "" if base["capacity_factor"] is None else
                           str(base["capacity_factor"]), key=f"{key}_cf_{preset}")
        base["moe_every"] = c2.number_input("MoE every k blocks", 1, 64, base["moe_every"], key=f"{key}_every_{preset}")
        base["expert_d_ff"] = c3.number_input("Expert width", 1, 1 << 20, base["expert_d_ff"],
                                              key=f"{key}_fe_{preset}")
        try:
            base["capacity_factor"] = float(cf) if cf.strip() else None
        except ValueError:
            st.error(f"Capacity factor: {cf!r} is not a number")
            return None
    return base


@st.cache_data(show_spinner=False)
def fitting_layout(name: str, size: str, fields: dict, batch: int) -> dict:
    """The fastest layout that fits this model at this size (the model's own MoE knobs), as widget defaults;
    pure data parallelism when none fits."""
    topo = topology(name, size)
    model = mp.MoEModel(**fields)
    try:
        best = mp.search(model, topo, mp.SearchSpace(virtual_pipeline=[1], recompute=["selective"]),
                         global_batch_tokens=batch, objective="step_time", top=1).best
    except ValueError:
        best = None
    layout = best.layout if best is not None else mp.Layout(data=topo.num_devices)
    return {k: getattr(layout, k) for k in ("fsdp", "expert", "tensor", "pipeline", "micro_batch_size")}


def layout_widgets(name: str, size: str, fields: dict, batch: int) -> dict | None:
    """Layout degrees offered as divisors of the device count (data is what they leave), defaulting to a
    layout that fits; None (the reason shown) when the choices leave no whole data degree."""
    devices = topology(name, size).num_devices
    divisors = [d for d in range(1, devices + 1) if devices % d == 0]
    default = fitting_layout(name, size, fields, batch)
    c = st.columns(6)
    layout = {}
    for i, k in enumerate(("fsdp", "expert", "tensor", "pipeline")):
        layout[k] = c[i].selectbox(k, divisors, index=divisors.index(default[k]) if default[k] in divisors else 0,
                                   key=f"est_{k}_{name}_{size}")
    layout["micro_batch_size"] = int(c[4].number_input("micro_batch_size", 1, 4096, default["micro_batch_size"],
                                                       key=f"est_mbs_{name}_{size}"))
    rest = layout["fsdp"] * layout["tensor"] * layout["pipeline"]
    if devices % rest:
        st.error(f"fsdp x tensor x pipeline = {rest} does not divide the {devices} devices")
        return None
    layout["data"] = devices // rest
    c[5].metric("data (the rest)", layout["data"])
    # offloading activations needs a link to host memory; families without one are offered the rest
    host = topology(name, size).host_link is not None
    policies = [r for r in RECOMPUTE if host or r not in OFFLOADS]
    layout["recompute"] = st.selectbox("recompute", policies, index=policies.index("selective"),
                                       key=f"est_recompute_{name}_{size}",
                                       help="offload*: activations in host memory (MaxText remat policies, "
                                            "Megatron-Core --cpu-offloading)")
    return layout


def page_estimate() -> None:
    st.header("Estimate")
    name, size = topology_picker("est")
    fields = model_editor("est")
    c2 = st.columns(4)
    batch = int(c2[0].number_input("Global batch (tokens; decode: sequences)", 1, 1 << 32, 64 * 4096,
                                   key="est_batch"))
    mode = c2[1].selectbox("Mode", ("train", "prefill", "decode"), key="est_mode")
    dtype = c2[2].selectbox("dtype", ("bf16", "fp8", "fp32"), key="est_dtype")
    framework = c2[3].selectbox("Framework", sorted(FRAMEWORKS), index=sorted(FRAMEWORKS).index("megatron"),
                                key="est_framework", help="overlap, dispatch kernel, attention kernel and "
                                                          "MoE kernels as the framework runs them")
    if fields is None:
        return
    try:
        layout = layout_widgets(name, size, fields, batch if mode == "train" else 64 * 4096)
        if layout is None:
            return
        est = run_estimate(name, size, fields, layout, batch, mode, dtype, framework)
    except ValueError as exc:
        st.error(str(exc))
        return
    m = st.columns(4)
    m[0].metric("Step time", f"{est.step_time_s * 1e3:,.1f} ms")
    m[1].metric("Tokens/s", f"{est.tokens_per_s:,.0f}")
    m[2].metric("MFU", f"{est.mfu:.1%}")
    m[3].metric("Memory / device", f"{est.memory_per_device_bytes / 2**30:,.1f} GiB")
    if not est.fits:
        st.warning(f"Does not fit: {est.reason}")
    if est.details.get("host_activation_bytes"):
        st.caption(f"Host memory: {est.details['host_activation_bytes'] / 2**30:,.1f} GiB per device of "
                   "offloaded activations")
    hbm = topology(name, size).chip.hbm_capacity_bytes
    mem = go.Figure([go.Bar(x=list(est.memory), y=[v / 2**30 for v in est.memory.values()], name="memory")])
    mem.add_hline(y=hbm / 2**30, line_dash="dash", annotation_text="HBM")
    mem.update_layout(title="Memory per device (GiB)", template="plotly_white", height=320)
    st.plotly_chart(report.breakdown_figure({f"{mode}": est}, "Time by part"), key="est_bars")
    st.plotly_chart(mem, key="est_mem")
    st.dataframe(est.to_rows(), key="est_table")


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


@st.cache_data(show_spinner=False)
def run_search(name: str, size: str, fields: dict, space: dict, batch: int, objective: str, max_drop: float):
    model = mp.MoEModel(**fields)
    return mp.search(model, topology(name, size), mp.SearchSpace(**space), global_batch_tokens=batch,
                     objective=objective, constraints=mp.Constraints(max_drop_rate=max_drop))


_CONFIG_COLUMNS = ("num_experts", "top_k", "capacity_factor", "moe_every", "expert_d_ff", "data", "fsdp", "expert",
                   "tensor", "pipeline", "step_time_s", "loss", "loss_low", "loss_high", "in_range")


def page_search() -> None:
    st.header("Search")
    name, size = topology_picker("srch")
    fields = model_editor("srch")
    c = st.columns(4)
    experts = c[0].text_input("Experts to try", "8,16,32", key="srch_experts")
    top_k = c[1].text_input("Top-k", "1,2", key="srch_topk")
    cfs = c[2].text_input("Capacity factors (dropless = none)", "1.0,1.25,none", key="srch_cf")
    every = c[3].text_input("MoE every", "1,2", key="srch_every")
    c2 = st.columns(3)
    batch = int(c2[0].number_input("Global batch (tokens)", 1, 1 << 34, 64 * 4096, key="srch_batch"))
    objective = c2[1].selectbox("Objective", ("quality_per_time", "step_time", "tokens_per_s", "cost_per_token",
                                              "quality"), key="srch_obj")
    max_drop = float(c2[2].number_input("Max drop rate", 0.0, 1.0, 0.05, key="srch_drop"))
    if fields is None:
        return
    try:
        space = {"num_experts": _int_list(experts), "top_k": _int_list(top_k), "moe_every": _int_list(every),
                 "capacity_factor": [None if v.strip().lower() in ("none", "dropless") else float(v)
                                     for v in cfs.split(",") if v.strip()]}
        fields = {**fields, "num_experts": space["num_experts"][0], "top_k": space["top_k"][0]}
        with st.spinner("Scoring layouts..."):
            bar = st.progress(0.0, text="scoring")
            result = run_search(name, size, fields, space, batch, objective, max_drop)
            bar.progress(1.0, text=f"{result.evaluated:,} configurations scored")
    except (ValueError, IndexError) as exc:
        st.error(str(exc) or "Every list needs at least one value")
        return
    if result.best is None:
        st.warning("No layout meets the constraints (memory, divisibility, drop rate).")
        return
    st.session_state["last_search"] = {  # what the Calibration page can run on this machine
        "label": f"{fields['name']} on {name} {size}, {objective}",
        "pairs": [(c.model, c.layout) for c in result.configurations[:MAX_VALIDATED]]}
    st.plotly_chart(report.pareto_figure(result), key="pareto")
    st.plotly_chart(report.heatmap_figure(result), key="heat")
    st.subheader("Distinct MoE configurations, each with its best layout")
    configs = [{k: v for k, v in r.items() if k in _CONFIG_COLUMNS} for r in (c.row() for c in result.configurations)]
    if any(not r["in_range"] for r in configs):
        st.warning("Rows with in_range = False lie outside the quality law's fitted ranges: their loss is an "
                   "extrapolation.")
    st.dataframe(configs, key="configs")
    st.dataframe(result.table, key="ranked")
    rank = int(st.number_input("Show the breakdown of rank", 1, len(result.table), 1, key="srch_rank"))
    row = result.table[rank - 1]
    model = mp.MoEModel(**{**fields, **{k: row[k] for k in ("num_experts", "top_k", "capacity_factor", "moe_every",
                                                            "expert_d_ff")}})
    layout = mp.Layout(**{k: row[k] for k in ("data", "fsdp", "expert", "tensor", "pipeline", "virtual_pipeline",
                                              "micro_batch_size", "recompute")})
    est = mp.estimate(model, topology(name, size), layout, batch)
    st.plotly_chart(report.breakdown_figure({f"rank {rank}": est}), key="srch_bars")
    buf = io.StringIO()
    if result.table:
        import csv

        writer = csv.DictWriter(buf, fieldnames=list(result.table[0]))
        writer.writeheader()
        writer.writerows(result.table)
    st.download_button("Download CSV", buf.getvalue(), "search.csv", "text/csv", key="dl_csv")
    st.download_button("Download JSON", json.dumps(result.table, default=str, indent=1), "search.json",
                       "application/json", key="dl_json")


def calibration_profile():
    """The chosen or uploaded profile and its bundled topology; None (the reason shown) if there is none.

    Uploads go through the same bounded YAML reader as files, and a profile may only name a bundled
    topology: whatever it says, the server reads no file it names."""
    files = sorted(p.name for p in (ROOT / "profiles").glob("*.yaml"))
    choice = st.selectbox("Profile in profiles/", files, key="cal_file") if files else None
    upload = st.file_uploader(f"...or upload a profile (.yaml, at most {MAX_UPLOAD_BYTES // 2**20} MiB)",
                              type=["yaml", "yml"], key="cal_up")
    try:
        if upload is not None:
            profile = profile_from_upload(upload.name, upload.getvalue())
        elif choice:
            profile = mp.load_profile(ROOT / "profiles" / choice)
        else:
            st.info("No profile yet: run `moeplan calibrate --quick`.")
            return None
        return profile, mp.load_topology(profile.bundled_topology_name())
    except ValueError as exc:
        st.error(f"Invalid profile: {exc}")
        return None


def calibration_figure(profile, topo) -> go.Figure:
    from moeplan.calibrate.fit import predict_s  # numpy/scipy only: no jax here

    rows = [m for m in profile.measurements if m.get("kind") in ("matmul", "collective", "moe_layer")]
    fig = go.Figure()
    for label, eff, comm in (("before fit", topo.chip.efficiency, mp.CommParams()),
                             ("after fit", profile.compute, profile.comm)):
        pred = [predict_s(m, topo, eff, comm) * 1e3 for m in rows]
        fig.add_trace(go.Scatter(x=[m["time_s"] * 1e3 for m in rows], y=pred, mode="markers", name=label,
                                 text=[f"{m['kind']} ({m.get('split', '')})" for m in rows], hoverinfo="text+x+y"))
    top = max([m["time_s"] * 1e3 for m in rows] or [1.0])
    fig.add_trace(go.Scatter(x=[0, top], y=[0, top], mode="lines", name="measured = predicted",
                             line=dict(dash="dash", color="#888")))
    fig.update_layout(title="Predicted vs measured (ms)", xaxis_title="measured (ms)", yaxis_title="predicted (ms)",
                      template="plotly_white", height=450, xaxis_type="log", yaxis_type="log")
    return fig


def page_calibration() -> None:
    st.header("Calibration")
    loaded = calibration_profile()
    if loaded is None:
        return
    profile, topo = loaded
    errors = profile.errors
    try:
        before, after = (f"{errors.get(k, float('nan')):.1%}" for k in ("before_median_abs", "after_median_abs"))
        fig = calibration_figure(profile, topo)
    except (ValueError, KeyError, TypeError, AttributeError, ArithmeticError) as exc:
        st.error(f"Invalid profile: cannot plot its measurements: {type(exc).__name__}: {str(exc)[:300]}")
        return
    c = st.columns(3)
    c[0].metric("Devices", f"{profile.device_count} x {profile.device_kind}")
    c[1].metric("Held-out error before fit", before)
    c[2].metric("Held-out error after fit", after)
    st.plotly_chart(fig, key="cal_scatter")
    st.json({"fitted": profile.data.get("fitted"), "errors": errors, "versions": profile.versions}, expanded=False)
    validate_here(profile)
    validation_results()


MAX_VALIDATED = 6  # a search's configurations the Calibration page offers to run


@st.fragment
def validate_here(profile) -> None:
    """The last search's top configurations run on this machine (``moeplan validate``), the chosen profile
    in the predictions; the result stays in the session and is shown like an uploaded results.json."""
    st.subheader("Validate the current search on this machine")
    last = st.session_state.get("last_search")
    if last is None:
        st.caption("Run a search on the Search page: its top configurations can then be run here as real JAX "
                   "training steps under the profiler, each part measured against its estimate.")
        return
    pairs = last["pairs"]
    c = st.columns(3)
    count = int(c[0].number_input("Candidates", 1, len(pairs), min(3, len(pairs)), key="valh_count"))
    steps = int(c[1].number_input("Profiled steps", 1, 10, 1, key="valh_steps"))
    with_profile = c[2].checkbox("Predict with this profile", True, key="valh_profile")
    st.caption(f"From the search of {last['label']}: widths are scaled down to what this machine holds (the "
               "rule is printed per candidate); a rerun of the same candidates resumes.")
    if st.button(f"Run {count} candidate(s) here", key="valh_run"):
        summary = _run_validation(pairs[:count], steps, profile if with_profile else None)
        if summary is not None:
            st.session_state["validated_here"] = summary
    summary = st.session_state.get("validated_here")
    if summary is not None:
        show_validation(summary, "valh")
        st.dataframe([{"model": r["model"], "scaled to": r["rule"], "measured ms": r["measured_step_s"] * 1e3,
                       "predicted ms": r["predicted_step_s"] * 1e3} for r in summary["candidates"]],
                     key="valh_candidates")


def _run_validation(pairs: list, steps: int, profile) -> dict | None:
    import hashlib
    import os

    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")  # as the CLI, before jax
    try:
        from moeplan.calibrate.validate import validate
    except ImportError as exc:
        st.info(f"Validation runs JAX: install the 'jax' extra (pip install -e '.[jax]'). ({exc})")
        return None
    key = hashlib.sha256(repr((pairs, steps)).encode()).hexdigest()[:12]
    bar = st.progress(0.0, text="compiling the first candidate")
    said: list[str] = []

    def say(text: str) -> None:
        said.append(text)
        bar.progress(min(len(said) / len(pairs), 1.0), text=text)

    topology = profile.bundled_topology_name() if profile is not None else "cpu-host"
    try:
        return validate(pairs, ROOT / "artifacts" / "dashboard-validate" / key, steps=steps, profile=profile,
                        topology=topology, say=say)
    except (ValueError, RuntimeError) as exc:
        st.error(f"Validation failed: {type(exc).__name__}: {str(exc)[:400]}")
        return None


def _validation_summary(data: bytes) -> dict:
    """A ``moeplan validate`` results.json, checked: rows of part, model, measured and predicted seconds."""
    if len(data) > MAX_UPLOAD_BYTES:
        raise ValueError(f"the file has {len(data):,} bytes; expected at most {MAX_UPLOAD_BYTES:,}")
    try:
        summary = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    rows = summary.get("rows") if isinstance(summary, dict) else None
    if not isinstance(rows, list) or not rows or not all(
            isinstance(r, dict) and isinstance(r.get("part"), str) and isinstance(r.get("model"), str)
            and all(isinstance(r.get(k), int | float) and r[k] >= 0 for k in ("measured_s", "predicted_s"))
            for r in rows):
        raise ValueError("expected a mapping with 'rows': [{part, model, measured_s, predicted_s}, ...] as "
                         "moeplan validate writes to results.json")
    tau = summary.get("kendall_tau")
    if tau is not None and not isinstance(tau, int | float):
        raise ValueError(f"kendall_tau: got {tau!r}; expected a number or null")
    return summary


def validation_results() -> None:
    """Per-part predicted vs measured of a ``moeplan validate`` run (its results.json, uploaded)."""
    st.subheader("Validated candidates (moeplan validate)")
    upload = st.file_uploader("results.json of a `moeplan validate` run", type=["json"], key="val_up")
    if upload is None:
        st.caption("Run `moeplan validate --top 6` (or `mp.validate(...)`) here or on your accelerators, then "
                   "upload its results.json to compare every part's predicted and measured time.")
        return
    try:
        summary = _validation_summary(upload.getvalue())
    except ValueError as exc:
        st.error(f"Invalid results: {exc}")
        return
    show_validation(summary, "val")


def show_validation(summary: dict, key: str) -> None:
    """A validation summary: Kendall tau of the step-time order, predicted vs measured per part, errors."""
    tau = summary.get("kendall_tau")
    c = st.columns(2)
    c[0].metric("Step-time order, Kendall tau", "n/a" if tau is None else f"{tau:.2f}")
    c[1].metric("Candidates", len({r["model"] + str(r.get("candidate", "")) for r in summary["rows"]}))
    st.plotly_chart(report.validation_figure(summary), key=f"{key}_scatter")
    by_part = summary.get("median_abs_error_by_part") or {}
    if isinstance(by_part, dict) and by_part:
        st.dataframe([{"part": k, "median |error|": v} for k, v in by_part.items()], key=f"{key}_parts")


def main() -> None:
    st.set_page_config(page_title="moeplan", layout="wide")
    st.sidebar.title("moeplan")
    page = st.sidebar.radio("Page", PAGES, key="page")
    {"Plan": page_plan, "Topology": page_topology, "Estimate": page_estimate, "Search": page_search,
     "Calibration": page_calibration}[page]()


main()
