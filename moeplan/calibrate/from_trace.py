"""``moeplan calibrate --from-trace``: a profile fitted to per-part times of profiled training steps.

Input: trace directories of steps the user ran (``jax.profiler.trace(DIR)``, with the compiled HLO text
beside it: ``XLA_FLAGS=--xla_dump_to=DIR/hlo`` writes it, ``moeplan validate`` saves it), each with the
model, layout and global batch (tokens) it ran. The step's module is the dumped module with the most
events in the trace; its time is split into parts (``trace.part_times_s``, scope names in
``trace.PARTS``). The fit is ``fit``'s parameters (matmul and memory efficiency, per-kernel overhead,
collective step latency and link efficiency), least squares on log(predicted / measured) over every
part of every training trace, where the prediction is ``estimate()`` of the same model and layout
(fp32, no overlap; ``validate.predicted_parts``). Held-out traces give the error before and after.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import least_squares

from moeplan.calibrate.fit import LOWER, UPPER, fitted_section, models_from, theta_from
from moeplan.calibrate.trace import OTHER, hlo_parts, part_times_s
from moeplan.calibrate.validate import predicted_parts
from moeplan.collectives import CommParams
from moeplan.layout import Layout
from moeplan.moe import MoEModel

_MODULE = re.compile(r"^HloModule\s+([\w.\-]+)", re.M)


@dataclass(frozen=True)
class _Params:  # what estimate() reads of a profile
    compute: object
    comm: CommParams


def trace_record(trace_dir: str | Path, model: MoEModel, layout: Layout, batch_tokens: int) -> dict:
    """Measured seconds per part and step of the trace's training step, with what it ran."""
    texts = {}
    for path in sorted(Path(trace_dir).glob("**/*.txt")):
        text = path.read_text(encoding="utf-8", errors="replace")
        match = _MODULE.search(text)
        if match:
            texts[match.group(1)] = text
    if not texts:
        raise ValueError(f"trace: no HLO text (a file starting 'HloModule') under {trace_dir}; expected the "
                         "compiled module beside the trace (XLA_FLAGS=--xla_dump_to=DIR/hlo)")
    best = None
    for module, text in texts.items():
        try:
            measured = part_times_s(trace_dir, hlo_parts(text), module)
        except ValueError:
            continue  # a module with no events in this trace
        if best is None or measured["events"] > best["events"]:
            best = measured
    if best is None:
        raise ValueError(f"trace: none of the dumped modules {sorted(texts)} ran in the trace under {trace_dir}")
    parts = {p: t for p, t in best["parts"].items() if p != OTHER and t > 0}
    return {"model": model, "layout": layout, "batch_tokens": int(batch_tokens), "measured": parts,
            "step_s": best["step_s"], "trace": str(trace_dir)}


def part_errors(records: list[dict], topo, eff, comm) -> np.ndarray:
    """predicted / measured - 1 for every part of every record."""
    out = []
    for r in records:
        predicted = predicted_parts(r["model"], r["layout"], topo, r["batch_tokens"], _Params(eff, comm))["parts"]
        out += [predicted.get(part, 0.0) / seconds - 1.0 for part, seconds in sorted(r["measured"].items())]
    return np.array(out)


def fit_parts(train: list[dict], topo, eff, comm, source: str):
    """(ComputeEfficiency, CommParams, theta) minimising the squared log error over the training parts."""
    theta = np.clip(theta_from(eff, comm), LOWER + 1e-9, UPPER - 1e-9)
    theta[2], theta[3] = max(theta[2], 1e-6), max(theta[3], 1e-6)

    def residuals(values):
        e, c = models_from(values, eff, comm, source)
        return np.log(np.maximum(part_errors(train, topo, e, c) + 1.0, 1e-9))

    result = least_squares(residuals, theta, bounds=(LOWER, UPPER), x_scale=np.array([0.1, 0.1, 1e-4, 1e-5, 0.1]))
    fitted_eff, fitted_comm = models_from(result.x, eff, comm, source)
    return fitted_eff, fitted_comm, result.x


def calibrate_from_traces(train: list[dict], held_out: list[dict], topo, out: str | Path | None = None) -> dict:
    """Fit to ``train`` records (``trace_record``), report the held-out per-part error before and after,
    and write the profile to ``out`` when given. Returns the profile mapping."""
    from moeplan.profiles import write_yaml

    if not train:
        raise ValueError("calibrate --from-trace: no training traces; expected at least one")
    base_eff, base_comm = topo.chip.efficiency, CommParams()
    source = f"fitted to {len(train)} profiled steps (calibrate --from-trace), {dt.date.today().isoformat()}"
    eff, comm, _ = fit_parts(train, topo, base_eff, base_comm, source)
    check = held_out or train
    before, after = part_errors(check, topo, base_eff, base_comm), part_errors(check, topo, eff, comm)
    profile = {
        "schema_version": 1, "device_kind": topo.chip.name, "device_count": topo.num_devices, "topology": topo.name,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "versions": {"source": "trace"},
        "fitted": fitted_section(eff, comm),
        "errors": {"held_out_layers": len(check) if held_out else 0,
                   "before_median_abs": float(np.median(np.abs(before))),
                   "after_median_abs": float(np.median(np.abs(after))),
                   "held_out_parts": int(before.size), "in_sample": not held_out},
        "measurements": [{"split": split, "kind": "trace", "trace": r["trace"], "model": r["model"].name,
                          "layout": repr(r["layout"]), "batch_tokens": r["batch_tokens"], "parts": r["measured"],
                          "time_s": r["step_s"]}
                         for split, records in (("train", train), ("held_out", held_out)) for r in records],
    }
    if out is not None:
        write_yaml(out, profile)
    return profile
