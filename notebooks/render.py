"""Render executed notebooks to Markdown under docs/notebooks/, figures as SVG, so a reader on a code host
sees every table and figure. ``make notebooks`` executes each notebook and renders it; the test suite
executes them again and checks the committed copy is current (``masked``: the same text, numbers aside).

The SVG writer draws what the notebooks' plotly figures use: scatter traces (markers and lines) and bars, on
linear or log axes, with the title, axis titles and a legend. It is not a plotly renderer in general.
"""

from __future__ import annotations

import html
import math
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "notebooks"
COLOURS = ["#4c78a8", "#e45756", "#f58518", "#72b7b2", "#54a24b", "#eeca3b", "#b279a2", "#ff9da6", "#9d755d"]
W, H, LEFT, RIGHT, TOP, BOTTOM = 720, 400, 70, 170, 40, 50


def render(nb, stem: str, out: Path = OUT) -> str:
    """The notebook as Markdown (written to ``out/<stem>.md``), its figures as ``out/<stem>_<n>.svg``."""
    out.mkdir(parents=True, exist_ok=True)
    parts, figures = [f"<!-- rendered from notebooks/{stem}.ipynb by notebooks/render.py; do not edit -->\n"], 0
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            parts.append(cell.source + "\n")
            continue
        parts.append(f"```python\n{cell.source}\n```\n")
        for output in _merged_streams(cell.get("outputs", [])):
            text = _text(output)
            if text is not None:
                parts.append(f"```text\n{text.rstrip()}\n```\n")
            figure = output.get("data", {}).get("application/vnd.plotly.v1+json")
            if figure is not None:
                figures += 1
                name = f"{stem}_{figures}.svg"
                (out / name).write_text(svg(figure), encoding="utf-8")
                title = _title(figure.get("layout", {})) or "figure"
                parts.append(f"![{title}]({name})\n")
    markdown = "\n".join(parts)
    (out / f"{stem}.md").write_text(markdown, encoding="utf-8")
    return markdown


def _merged_streams(outputs: list) -> list:
    """Outputs with consecutive pieces of one stream joined: how a kernel splits printed text depends on timing."""
    merged: list = []
    for output in outputs:
        if (output.output_type == "stream" and merged and merged[-1].output_type == "stream"
                and merged[-1].name == output.name):
            merged[-1] = {**merged[-1], "text": merged[-1].text + output.text}
            merged[-1] = type(output)(merged[-1])
        else:
            merged.append(output)
    return merged


def masked(markdown: str) -> str:
    """The text with every number replaced and whitespace collapsed: what must stay the same across runs."""
    return re.sub(r"\s+", " ", re.sub(r"[-+]?\d[\d,._eE+-]*", "#", markdown)).strip()


def _text(output) -> str | None:
    if output.output_type == "stream":
        return output.text
    if output.output_type == "error":
        return "\n".join(output.get("traceback", []))
    data = output.get("data", {})
    if "application/vnd.plotly.v1+json" in data:
        return None
    return data.get("text/plain")


def _title(layout: dict) -> str:
    title = layout.get("title")
    return (title.get("text", "") if isinstance(title, dict) else str(title or "")).replace("<br>", " ")


def _axis_title(axis: dict) -> str:
    title = axis.get("title")
    return title.get("text", "") if isinstance(title, dict) else str(title or "")


def svg(figure: dict) -> str:
    """A static SVG of a plotly figure's scatter and bar traces."""
    layout, traces = figure.get("layout", {}), [t for t in figure.get("data", []) if t.get("type", "scatter")
                                                 in ("scatter", "scattergl", "bar")]
    xs, ys, categories = [], [], []
    for t in traces:
        for x in t.get("x") or []:
            if isinstance(x, str):
                categories.append(x) if x not in categories else None
            elif x is not None:
                xs.append(float(x))
        ys += [float(y) for y in t.get("y") or [] if y is not None and not isinstance(y, str)]
    xlog, ylog = (layout.get(k, {}).get("type") == "log" for k in ("xaxis", "yaxis"))
    barmode_stack = layout.get("barmode") == "stack"
    if barmode_stack:
        ys.append(max((sum(float(v) for v in _ys(t)) for t in traces), default=0.0))
        ys.append(0.0)
    if any(t.get("type") == "bar" for t in traces):
        ys.append(0.0)
    xr = _range(xs or [0.0, 1.0], xlog)
    yr = _range(ys or [0.0, 1.0], ylog)
    px = lambda x: LEFT + (_t(x, xlog) - xr[0]) / (xr[1] - xr[0]) * (W - LEFT - RIGHT)  # noqa: E731
    py = lambda y: H - BOTTOM - (_t(y, ylog) - yr[0]) / (yr[1] - yr[0]) * (H - TOP - BOTTOM)  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
           'font-family="sans-serif" font-size="11">', f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{W / 2:.0f}" y="20" text-anchor="middle" font-size="13">{html.escape(_title(layout))}</text>',
           f'<line x1="{LEFT}" y1="{H - BOTTOM}" x2="{W - RIGHT}" y2="{H - BOTTOM}" stroke="#333"/>',
           f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{H - BOTTOM}" stroke="#333"/>']
    for value, label in _ticks(yr, ylog):
        y = H - BOTTOM - (value - yr[0]) / (yr[1] - yr[0]) * (H - TOP - BOTTOM)
        out.append(f'<text x="{LEFT - 5}" y="{y + 4:.1f}" text-anchor="end">{label}</text>')
    if not categories:
        for value, label in _ticks(xr, xlog):
            x = LEFT + (value - xr[0]) / (xr[1] - xr[0]) * (W - LEFT - RIGHT)
            out.append(f'<text x="{x:.1f}" y="{H - BOTTOM + 15}" text-anchor="middle">{label}</text>')
    out.append(f'<text x="{(LEFT + W - RIGHT) / 2:.0f}" y="{H - 10}" text-anchor="middle">'
               f'{html.escape(_axis_title(layout.get("xaxis", {})))}</text>')
    out.append(f'<text x="15" y="{(TOP + H - BOTTOM) / 2:.0f}" text-anchor="middle" transform="rotate(-90 15 '
               f'{(TOP + H - BOTTOM) / 2:.0f})">{html.escape(_axis_title(layout.get("yaxis", {})))}</text>')
    stack: dict[int, float] = {}
    slot = (W - LEFT - RIGHT) / max(len(categories), 1)
    bars = [t for t in traces if t.get("type") == "bar"]
    for n, t in enumerate(traces):
        colour = _colour(t, n)
        if t.get("type") == "bar":
            for i, (x, y) in enumerate(zip(t.get("x") or [], _ys(t), strict=False)):
                k = categories.index(x) if isinstance(x, str) and x in categories else i
                base = stack.get(k, 0.0) if barmode_stack else 0.0
                width = slot * 0.6 / (1 if barmode_stack else max(len(bars), 1))
                left = LEFT + k * slot + slot * 0.2 + (0 if barmode_stack else bars.index(t) * width)
                top, bottom = py(base + y), py(base)
                out.append(f'<rect x="{left:.1f}" y="{top:.1f}" width="{width:.1f}" height="{max(bottom - top, 0):.1f}"'
                           f' fill="{colour}"/>')
                stack[k] = base + y
            continue
        points = [(px(x), py(y)) for x, y in zip(t.get("x") or [], t.get("y") or [], strict=False)
                  if x is not None and y is not None and not isinstance(x, str) and _ok(x, xlog) and _ok(y, ylog)]
        mode = t.get("mode", "lines+markers")
        if "lines" in mode and len(points) > 1:
            out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="'
                       + " ".join(f"{a:.1f},{b:.1f}" for a, b in points) + '"/>')
        if "markers" in mode:
            out += [f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3" fill="{colour}"/>' for a, b in points]
    for i, label in enumerate(categories):
        out.append(f'<text x="{LEFT + (i + 0.5) * slot:.1f}" y="{H - BOTTOM + 15}" text-anchor="middle">'
                   f'{html.escape(label[:18])}</text>')
    for n, t in enumerate(traces[:16]):
        if t.get("showlegend") is False or not t.get("name"):
            continue
        y = TOP + 14 * n
        out.append(f'<rect x="{W - RIGHT + 10}" y="{y}" width="10" height="10" fill="{_colour(t, n)}"/>')
        out.append(f'<text x="{W - RIGHT + 24}" y="{y + 9}">{html.escape(str(t["name"])[:24])}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _ys(trace) -> list[float]:
    return [float(y) if y is not None else 0.0 for y in trace.get("y") or []]


def _colour(trace: dict, n: int) -> str:
    marker = trace.get("marker") or {}
    colour = marker.get("color") if isinstance(marker.get("color"), str) else None
    line = trace.get("line") or {}
    return colour or (line.get("color") if isinstance(line.get("color"), str) else None) or COLOURS[n % len(COLOURS)]


def _ok(v: float, log: bool) -> bool:
    return math.isfinite(float(v)) and (not log or float(v) > 0)


def _t(v: float, log: bool) -> float:
    return math.log10(v) if log else v


def _range(values: list[float], log: bool) -> tuple[float, float]:
    vals = [_t(v, log) for v in values if _ok(v, log)] or [0.0, 1.0]
    lo, hi = min(vals), max(vals)
    pad = (hi - lo) * 0.05 or 1.0
    return lo - pad, hi + pad


def _ticks(span: tuple[float, float], log: bool) -> list[tuple[float, str]]:
    lo, hi = span
    if log:
        return [(float(e), f"1e{e}") for e in range(math.ceil(lo), math.floor(hi) + 1)]
    step = 10 ** math.floor(math.log10((hi - lo) / 4 or 1.0))
    while (hi - lo) / step > 6:
        step *= 2
    first = math.ceil(lo / step) * step
    return [(first + i * step, f"{first + i * step:.3g}") for i in range(int((hi - first) / step) + 1)]


def main() -> int:
    """Execute every notebook (fresh kernel, working directory notebooks/) and render it."""
    import nbclient
    import nbformat

    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        nbclient.NotebookClient(nb, kernel_name="python3", timeout=300,
                                resources={"metadata": {"path": str(path.parent)}}).execute()
        render(nb, path.stem)
        print(f"rendered {path.name} -> docs/notebooks/{path.stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
