"""``moeplan calibrate --from-trace``: a profile fitted to per-part times of profiled training steps.

Input: trace directories of steps the user ran (``jax.profiler.trace(DIR)``, with the compiled HLO text
beside it: ``XLA_FLAGS=--xla_dump_to=DIR/hlo`` writes it, ``moeplan validate`` saves it), each with the
model, layout and global batch (tokens) it ran. The step's module is the dumped module with the most
events in the trace; its time is split into parts (``trace.part_times_s``, scope names in
``trace.PARTS``). The fit is one time scale per part (``estimate.MEASURED_PARTS``: attention, router,
dispatch and combine all-to-all, experts, dense FFN, logits, gradient sync, optimizer), the geometric mean
of measured / predicted over the training traces, where the prediction is ``estimate()`` of the same model
and layout (fp32, no overlap; ``validate.predicted_parts``); ``estimate(..., profile=...)`` multiplies each
part's rows by its scale. Per part, not one efficiency for all: a few shared parameters cannot follow
parts whose errors differ in sign and size (on a host whose devices share cores the optimizer runs from
cache, 4-5x faster than the memory figure says, while the all-to-alls wait for the slowest device), and
fitting them to two traces moves the held-out error either way. Held-out traces give the error before
and after.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moeplan.calibrate.fit import fitted_section
from moeplan.calibrate.trace import OTHER, hlo_parts, part_times_s
from moeplan.calibrate.validate import predicted_parts
from moeplan.collectives import CommParams
from moeplan.estimate import MEASURED_PARTS
from moeplan.layout import Layout
from moeplan.moe import MoEModel

_MODULE = re.compile(r"^HloModule\s+([\w.\-]+)", re.M)


@dataclass(frozen=True)
class _Params:  # what estimate() reads of a profile
    compute: object
    comm: CommParams
    part_scales: dict | None = None


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


def part_errors(records: list[dict], topo, eff, comm, scales: dict | None = None) -> np.ndarray:
    """predicted / measured - 1 for every part of every record."""
    out = []
    for r in records:
        predicted = _predicted(r, topo, _Params(eff, comm, scales))
        out += [predicted.get(part, 0.0) / seconds - 1.0 for part, seconds in sorted(r["measured"].items())]
    return np.array(out)


def fit_part_scales(train: list[dict], topo, eff, comm) -> dict[str, float]:
    """Each measured part's time scale: the geometric mean of measured / predicted over ``train``."""
    logs: dict[str, list[float]] = {}
    for r in train:
        predicted = _predicted(r, topo, _Params(eff, comm))
        for part, seconds in r["measured"].items():
            if part in MEASURED_PARTS and predicted.get(part, 0.0) > 0.0:
                logs.setdefault(part, []).append(float(np.log(seconds / predicted[part])))
    return {part: float(np.clip(np.exp(np.mean(v)), 1e-3, 1e3)) for part, v in sorted(logs.items())}


def _predicted(record: dict, topo, params: _Params) -> dict[str, float]:
    return predicted_parts(record["model"], record["layout"], topo, record["batch_tokens"], params)["parts"]


def calibrate_from_traces(train: list[dict], held_out: list[dict], topo, out: str | Path | None = None) -> dict:
    """Fit to ``train`` records (``trace_record``), report the held-out per-part error before and after,
    and write the profile to ``out`` when given. Returns the profile mapping."""
    from moeplan.profiles import write_yaml

    if not train:
        raise ValueError("calibrate --from-trace: no training traces; expected at least one")
    eff, comm = topo.chip.efficiency, CommParams()
    scales = fit_part_scales(train, topo, eff, comm)
    check = held_out or train
    before, after = part_errors(check, topo, eff, comm), part_errors(check, topo, eff, comm, scales)
    profile = {
        "schema_version": 1, "device_kind": topo.chip.name, "device_count": topo.num_devices, "topology": topo.name,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "versions": {"source": "trace"},
        "fitted": fitted_section(eff, comm, scales),
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
