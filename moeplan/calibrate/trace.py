"""Per-part times from a ``jax.profiler`` trace: the parts ``estimate().layers`` reports.

A trace directory (what ``jax.profiler.trace(dir)`` writes: ``plugins/profile/<run>/<host>.trace.json.gz``)
holds one complete event per executed HLO instruction, with its ``hlo_op`` and ``hlo_module``. The
compiled module's HLO text names, for every instruction (and the instructions a fusion calls), the
``op_name`` JAX gave it, which carries the ``jax.named_scope`` path: ``jit(step)/transpose(jvp(experts))
/dot_general``. An instruction belongs to the innermost part whose name appears in its path; the
instructions of no part count as ``other``.

Scope names the parser understands (``PARTS``), so a MaxText or plain-JAX user can name theirs:
``attention``, ``router``, ``dispatch_a2a``, ``experts``, ``combine_a2a``, ``dense_ffn``,
``tp_comm``, ``logits``, ``grad_sync``, ``optimizer``. Reads files only; imports no JAX.
"""

from __future__ import annotations

import gzip
import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

PARTS = ("attention", "router", "dispatch_a2a", "experts", "combine_a2a", "dense_ffn", "tp_comm", "logits",
         "grad_sync", "optimizer")
OTHER = "other"

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = .*$")
_COMPUTATION = re.compile(r"^\s*%?([\w.\-]+) \(.*\) -> .* \{\s*$|^ENTRY\s+%?([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CALLS = re.compile(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)")
_SEGMENT = re.compile(r"[\w]+")


def part_of(op_name: str) -> str | None:
    """The innermost known part in an ``op_name`` path, or None."""
    found = None
    for word in _SEGMENT.findall(op_name):
        if word in PARTS:
            found = word
    return found


def hlo_parts(hlo_text: str) -> dict[str, str]:
    """Instruction name -> part, from a compiled module's HLO text (``compiled.as_text()``). A fusion or call
    takes the part of the instructions it calls when its own metadata names none; where those disagree, the
    part most of them name."""
    own: dict[str, str | None] = {}
    calls: dict[str, list[str]] = {}
    body: dict[str, list[str]] = defaultdict(list)
    computation = None
    for line in hlo_text.splitlines():
        head = _COMPUTATION.match(line)
        if head:
            computation = head.group(1) or head.group(2)
            continue
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        name = match.group(1)
        op = _OP_NAME.search(line)
        own[name] = part_of(op.group(1)) if op else None
        calls[name] = _CALLS.findall(line)
        if computation:
            body[computation].append(name)
    out = {}
    for name, part in own.items():
        if part is None:
            votes: dict[str, int] = defaultdict(int)
            for callee in calls.get(name, []):
                for inner in body.get(callee, []):
                    if own.get(inner):
                        votes[own[inner]] += 1
            part = max(votes, key=votes.get) if votes else None
        if part:
            out[name] = part
    return out


def trace_files(trace_dir: str | Path) -> list[Path]:
    files = sorted(Path(trace_dir).glob("**/*.trace.json.gz"))
    if not files:
        raise ValueError(f"trace: no *.trace.json.gz under {trace_dir}; expected a jax.profiler.trace directory")
    return files


def part_times_s(trace_dir: str | Path, parts: dict[str, str], module: str | None = None) -> dict[str, object]:
    """Seconds per part and step, from the HLO events of each execution (``run_id``) on each device
    (``module``: only that HLO module's events, e.g. ``jit_step``): per part, the median over devices and
    executions.

    A device's time between two of its ops counts to the op that follows: it waited to start it (a
    collective waiting for its peers, a kernel waiting for a core), so an execution's parts add up to its
    span. The median, not the mean, because those waits are bursty where devices share cores (8 XLA CPU
    devices on 2 cores): one descheduled wait lands on whichever part runs next, and the mean carried it
    into that part's time (the same output layer measured 0.7 and 2.2 ms in two traces). Returns
    ``{"parts": {...}, "step_s": median span, "devices": n, "steps": n, "events": n}``; instructions of no
    part are ``other``."""
    runs: dict[tuple, list[tuple[float, float, str]]] = defaultdict(list)
    for path in trace_files(trace_dir):
        with gzip.open(path, "rt") as fh:
            data = json.load(fh)
        for event in data.get("traceEvents", []) if isinstance(data, dict) else data:
            args = event.get("args") or {}
            op = args.get("hlo_op")
            if event.get("ph") != "X" or not op or (module and args.get("hlo_module") != module):
                continue
            device = (path.name, args.get("device_ordinal", event.get("pid")))
            start = float(event.get("ts", 0.0)) * 1e-6
            runs[device + (args.get("run_id"),)].append((start, start + float(event.get("dur", 0.0)) * 1e-6,
                                                         parts.get(op, OTHER)))
    if not runs:
        raise ValueError(f"trace: no HLO events{f' of module {module}' if module else ''} in {trace_dir}")
    per_run: list[dict[str, float]] = []
    spans = []
    for ops in runs.values():
        ops.sort()
        clock, totals = ops[0][0], defaultdict(float)
        for _start, end, part in ops:
            if end > clock:
                totals[part] += end - clock
                clock = end
        per_run.append(totals)
        spans.append(clock - ops[0][0])
    names = sorted({p for totals in per_run for p in totals})
    return {"parts": {p: float(np.median([totals.get(p, 0.0) for totals in per_run])) for p in names},
            "step_s": float(np.median(spans)),
            "devices": len({key[:2] for key in runs}), "steps": len({key[2] for key in runs}),
            "events": sum(len(ops) for ops in runs.values())}
