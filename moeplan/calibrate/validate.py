"""``moeplan validate``: run candidates as real JAX training steps under the profiler, per part predicted
against measured, and how well the predicted order of step times matches the measured one.

Each candidate (a model and layout: a search's top configurations or explicit pairs) is scaled to the
local devices (``step.scaled``, the rule printed), compiled, warmed up, and run ``steps`` times inside
``jax.profiler.trace``; ``trace.part_times_s`` splits each step into the parts ``estimate().layers``
reports. The prediction is ``estimate()`` of the scaled model and layout on the local topology
(``cpu-host`` by default) in fp32 with ``overlap="none"`` (the step runs its gradient sync after the
backward, not under it), with a calibration profile when given. Over the candidates, Kendall's tau
between predicted and measured step times says whether the model orders them as the hardware does.

Every finished candidate is appended to ``<out>/results.jsonl`` (a rerun skips what is there: resume);
the summary is written atomically to ``<out>/results.json``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np

from moeplan.calibrate.trace import OTHER, PARTS, hlo_parts, part_times_s
from moeplan.estimate import ROW_PART, estimate
from moeplan.families import load_topology
from moeplan.layout import Layout
from moeplan.moe import MoEModel
from moeplan.profiles import write_json


def predicted_parts(model: MoEModel, layout: Layout, topo, batch_tokens: int, profile=None) -> dict[str, float]:
    est = estimate(model, topo, layout, batch_tokens, dtype="fp32", profile=profile, overlap="none")
    parts: dict[str, float] = {}
    for row in est.layers:
        part = ROW_PART.get(row.name)
        if part:
            parts[part] = parts.get(part, 0.0) + row.time_s
    return {"parts": parts, "step_s": est.step_time_s}


def run_candidate(model: MoEModel, layout: Layout, trace_dir: Path, steps: int = 3, micro_batch: int = 2,
                  devices: list | None = None) -> dict:
    """Scale, build, profile: measured seconds per part and step, the wall time per step, the scaling rule."""
    import jax

    from moeplan.calibrate.step import build, scaled, scaling_rule

    devices = devices or jax.devices()
    small = scaled(model, layout, len(devices), micro_batch)
    fn, params, state, tokens = build(small, devices)
    compiled = fn.lower(params, state, tokens).compile()
    text = compiled.as_text()
    module = text.split(None, 2)[1].rstrip(",") if text.startswith("HloModule") else None
    params, state, loss = fn(params, state, tokens)  # compile and warm up
    loss.block_until_ready()
    shutil.rmtree(trace_dir, ignore_errors=True)
    with jax.profiler.trace(str(trace_dir)):
        start = time.perf_counter()
        for _ in range(steps):
            params, state, loss = fn(params, state, tokens)
        loss.block_until_ready()
        wall = (time.perf_counter() - start) / steps
    (trace_dir / "hlo").mkdir(parents=True, exist_ok=True)  # beside the trace: calibrate --from-trace reads it
    (trace_dir / "hlo" / f"{module or 'step'}.txt").write_text(text, encoding="utf-8")
    measured = part_times_s(trace_dir, hlo_parts(text), module)
    return {"scaled": small, "rule": scaling_rule(small, model, layout), "measured": measured, "wall_s": wall,
            "loss": float(loss)}


def candidate_key(model: MoEModel, layout: Layout) -> str:
    text = json.dumps([repr(model), repr(layout)], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def validate(pairs: list[tuple[MoEModel, Layout]], out: str | Path = "artifacts/validate", *, steps: int = 3,
             micro_batch: int = 2, profile=None, topology: str = "cpu-host", say=print) -> dict:
    """Profile every (model, layout) pair on the local devices and compare with the estimate (module
    docstring). Returns the summary also written to ``<out>/results.json``."""
    import jax

    if not pairs:
        raise ValueError("validate: no candidates; expected at least one (model, layout) pair")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "results.jsonl"
    done = _read_done(log)
    devices = jax.devices()
    topo = load_topology(topology, devices_per_node=len(devices)) if len(devices) > 1 else load_topology(topology)
    records = []
    for i, (model, layout) in enumerate(pairs):
        key = candidate_key(model, layout)
        if key in done:
            say(f"[{i + 1}/{len(pairs)}] {model.name} {layout}: measured before, kept")
            records.append(done[key])
            continue
        run = run_candidate(model, layout, out / "traces" / key, steps, micro_batch, devices)
        small = run["scaled"]
        batch = small.micro_batch * small.model.seq_len * len(devices)
        predicted = predicted_parts(small.model, small.layout, topo, batch, profile)
        record = {"key": key, "model": model.name, "layout": _layout_dict(layout), "rule": run["rule"],
                  "measured": run["measured"]["parts"], "measured_step_s": run["measured"]["step_s"],
                  "wall_s": run["wall_s"], "predicted": predicted["parts"], "predicted_step_s": predicted["step_s"]}
        with log.open("a", encoding="utf-8") as fh:  # one line per finished candidate: a rerun resumes
            fh.write(json.dumps(record) + "\n")
        records.append(record)
        say(f"[{i + 1}/{len(pairs)}] {run['rule']}: measured {record['measured_step_s'] * 1e3:.1f} ms, "
            f"predicted {record['predicted_step_s'] * 1e3:.1f} ms")
    summary = summarize(records)
    write_json(out / "results.json", summary)
    return summary


def summarize(records: list[dict]) -> dict:
    rows = []
    for r in records:
        for part in sorted(set(r["measured"]) | set(r["predicted"])):
            if part == OTHER:
                continue
            m, p = r["measured"].get(part, 0.0), r["predicted"].get(part, 0.0)
            rows.append({"candidate": r["key"], "model": r["model"], "part": part, "measured_s": m,
                         "predicted_s": p, "error": p / m - 1.0 if m > 0 else None})
    errors = {}
    for part in PARTS:
        values = [abs(row["error"]) for row in rows if row["part"] == part and row["error"] is not None]
        if values:
            errors[part] = float(np.median(values))
    tau = kendall_tau([r["predicted_step_s"] for r in records], [r["measured_step_s"] for r in records])
    return {"candidates": records, "rows": rows, "median_abs_error_by_part": errors,
            "median_abs_error": float(np.median([abs(r["error"]) for r in rows if r["error"] is not None]))
            if rows else None, "kendall_tau": tau}


def kendall_tau(a: list[float], b: list[float]) -> float | None:
    """Kendall's tau-b of two orderings (None under two candidates)."""
    if len(a) < 2:
        return None
    from scipy.stats import kendalltau

    value = kendalltau(a, b).statistic
    return None if value != value else float(value)


def _read_done(log: Path) -> dict[str, dict]:
    done = {}
    if log.exists():
        for line in log.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by an interrupted run: measured again
            if isinstance(record, dict) and "key" in record:
                done[record["key"]] = record
    return done


def _layout_dict(layout: Layout) -> dict:
    return {k: getattr(layout, k) for k in ("data", "fsdp", "expert", "tensor", "pipeline", "micro_batch_size")}
