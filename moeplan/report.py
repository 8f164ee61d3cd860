"""Plotly figures shared by the CLI's HTML report, the dashboard and the notebooks.

The only module of the package that imports plotly (extra ``report``); nothing in the core imports
it. Files are written atomically (temporary file, then rename).
"""

from __future__ import annotations

import html
import math
import os
from functools import lru_cache
from pathlib import Path

import plotly.graph_objects as go
import plotly.io as pio

from moeplan.estimate import Estimate
from moeplan.profiles import write_atomic
from moeplan.search import Candidate, SearchResult
from moeplan.units import fmt_time

KIND_COLOURS = {"compute": "#4c78a8", "a2a": "#e45756", "comm": "#f58518", "bubble": "#bab0ac",
                "optimizer": "#72b7b2"}


@lru_cache(maxsize=1)
def _white_template() -> dict:
    return pio.templates["plotly_white"].to_plotly_json()


def quick_figure(data: list[dict], layout: dict) -> go.Figure:
    """A figure from plain trace and layout dicts (the white template resolved once), built without plotly's
    per-property checks: 1-2 ms instead of 25-100 ms, what an interactive page redraws on every change. The
    same dicts pass ``go.Figure(fig.to_dict())``'s full check (a test holds every quick figure to it)."""
    return go.Figure(data=data, layout={**layout, "template": _white_template()}, _validate=False)


def describe_layout(c: Candidate) -> str:
    m, lay = c.model, c.layout
    cf = "dropless" if m.capacity_factor is None else f"cf {m.capacity_factor:g}"
    return (f"E={m.num_experts} k={m.top_k} {cf} every {m.moe_every} fe={m.expert_d_ff}<br>"
            f"data {lay.data} fsdp {lay.fsdp} expert {lay.expert} tensor {lay.tensor} pipeline {lay.pipeline}"
            f"x{lay.virtual_pipeline} mbs {lay.micro_batch_size} recompute {lay.recompute}<br>"
            f"loss {c.loss:.4f} ({c.loss_low:.3f}-{c.loss_high:.3f})"
            f"{'' if c.in_range else ' OUT OF RANGE: the quality law extrapolates'}")


def pareto_figure(result: SearchResult, title: str = "") -> go.Figure:
    """Predicted loss against step time: the ranked table, with the Pareto front as a line."""
    fig = go.Figure()
    rows = result.table
    fig.add_trace(go.Scatter(
        x=[r["step_time_s"] for r in rows], y=[r["loss"] for r in rows], mode="markers", name="top layouts",
        marker=dict(size=7, color="#9ecae9"),
        hovertext=[f"E={r['num_experts']} k={r['top_k']} cf={r['capacity_factor']} data {r['data']} "
                   f"expert {r['expert']} tensor {r['tensor']} pipeline {r['pipeline']}" for r in rows],
        hoverinfo="text+x+y"))
    front = result.pareto
    fig.add_trace(go.Scatter(
        x=[c.step_time_s for c in front], y=[c.loss for c in front], mode="lines+markers", name="Pareto front",
        marker=dict(size=9, color="#e45756"), hovertext=[describe_layout(c) for c in front], hoverinfo="text+x+y"))
    fig.update_layout(title=title or "Predicted loss vs step time", xaxis_title="step time (s)",
                      yaxis_title="predicted loss (nats/token)", template="plotly_white", height=450)
    return fig


def breakdown_figure(estimates: dict[str, Estimate], title: str = "") -> go.Figure:
    """Stacked per-part time of each estimate (one bar per label), coloured by kind."""
    names: list[tuple[str, str]] = []
    for est in estimates.values():
        for row in est.layers:
            if row.time_s > 0 and (row.name, row.kind) not in names:
                names.append((row.name, row.kind))
    labels = list(estimates)
    traces = []
    for name, kind in names:
        values = [next((r.time_s for r in est.layers if r.name == name), 0.0) for est in estimates.values()]
        traces.append(dict(type="bar", name=name, x=labels, y=values, marker=dict(color=KIND_COLOURS.get(kind, "#888")),
                           hovertext=[f"{name} ({kind}): {fmt_time(v)}" for v in values], hoverinfo="text"))
    return quick_figure(traces, dict(barmode="stack", title=dict(text=title or "Step time by part"),
                                     yaxis=dict(title=dict(text="seconds per step")), height=450))


def heatmap_figure(result: SearchResult, title: str = "") -> go.Figure:
    heat = result.details["heatmap"]
    z = [[None if (v is None or (isinstance(v, float) and math.isnan(v))) else v for v in row]
         for row in heat["step_time_s"]]
    fig = go.Figure(go.Heatmap(z=z, x=[str(e) for e in heat["num_experts"]], y=heat["capacity_factor"],
                               colorscale="Viridis", colorbar=dict(title="s")))
    fig.update_layout(title=title or "Best step time over experts x capacity factor", xaxis_title="experts",
                      yaxis_title="capacity factor", template="plotly_white", height=400)
    return fig


def validation_figure(summary: dict, title: str = "") -> go.Figure:
    """Predicted against measured seconds, one marker per candidate and part (``moeplan validate``)."""
    fig = go.Figure()
    rows = summary.get("rows", [])
    for part in sorted({r["part"] for r in rows}):
        sel = [r for r in rows if r["part"] == part]
        fig.add_trace(go.Scatter(x=[r["measured_s"] * 1e3 for r in sel], y=[r["predicted_s"] * 1e3 for r in sel],
                                 mode="markers", name=part, text=[r["model"] for r in sel]))
    top = max([max(r["measured_s"], r["predicted_s"]) * 1e3 for r in rows] or [1.0])
    fig.add_trace(go.Scatter(x=[0, top], y=[0, top], mode="lines", name="predicted = measured",
                             line={"dash": "dash", "color": "gray"}))
    tau = summary.get("kendall_tau")
    fig.update_layout(title=title or f"per part, ms (step-time Kendall tau {tau if tau is None else round(tau, 2)})",
                      xaxis_title="measured (ms)", yaxis_title="predicted (ms)", template="plotly_white")
    return fig


def write_html(path: str | os.PathLike[str], sections: list[tuple[str, list[go.Figure], str]],
               title: str = "moeplan report") -> Path:
    """One self-contained HTML file (plotly.js inlined once); written atomically."""
    parts = [f"<html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head>"
             f"<body style='font-family: sans-serif; max-width: 1100px; margin: auto'><h1>{html.escape(title)}</h1>"]
    first = True
    for heading, figures, text in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2><pre>{html.escape(text)}</pre>")
        for fig in figures:
            parts.append(fig.to_html(full_html=False, include_plotlyjs="inline" if first else False))
            first = False
    parts.append("</body></html>")
    return write_atomic(path, "\n".join(parts))
