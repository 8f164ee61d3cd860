"""Published measurements (``shared/validation/published.yaml``) set against the model.

Each expressible measurement becomes a ``ValidationRow`` with the measured and predicted value
and the relative error *in time* (``t_pred / t_meas - 1``; a bandwidth b converts as 1/b), so
errors of time and bandwidth points read alike. A measurement the model cannot express (no
message size, hardware the bundled families do not describe, a kernel limited by its SM count,
which the model has no term for) is listed in ``skipped`` with the reason, never silently dropped.
"""

from __future__ import annotations

import copy
import itertools
import math
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from moeplan.collectives import (
    DEFAULT_EFFICIENCY,
    LL_LATENCY_FITTED_TO,
    RAMP,
    RAMP_FITTED_TO,
    CommParams,
    bus_bandwidth_factor,
    collective_cost,
)
from moeplan.dispatch import (
    FP8_SCALE_BYTES_PER_VALUE,
    KERNELS,
    NORMAL_KERNELS,
    SM_COPY,
    SM_COPY_FITTED_TO,
    ExpertRouting,
)
from moeplan.families import load_topology
from moeplan.schema import read_yaml_mapping, short_repr
from moeplan.topology import SWITCHED
from moeplan.units import dtype_bytes

# The team's shared copy when it sits beside the checkout, else the snapshot kept in the repository.
_CANDIDATES = [
    Path(__file__).resolve().parents[2] / "shared" / "validation" / "published.yaml",
    Path(__file__).resolve().parents[1] / "validation" / "published.yaml",
]
_FOUND = next((p for p in _CANDIDATES if p.is_file()), _CANDIDATES[-1])
DEFAULT_PATH = Path(os.environ.get("MOEPLAN_PUBLISHED") or _FOUND)
# Measurements the project collected itself (cloud fabrics, newer NVLink generations), each with its source.
COLLECTED_PATH = Path(__file__).resolve().parents[1] / "validation" / "collected.yaml"
# Calculon's validation suite: Korthikanti et al. 2022, Table 5 (Megatron-LM on DGX A100).
KORTHIKANTI_PATH = Path(__file__).resolve().parents[1] / "validation" / "korthikanti2022.yaml"
# Training runs the project collected (Megatron-Bridge performance tables, MaxText and other published runs).
TRAINING_PATH = Path(__file__).resolve().parents[1] / "validation" / "training.yaml"
# Published tables ranking layouts by measured speed (Switch Transformers Table 1: top-k x capacity factor).
RANKINGS_PATH = Path(__file__).resolve().parents[1] / "validation" / "rankings.yaml"

# Published hardware that a bundled family describes at the level the model sees it.
FAMILY_ALIASES = {
    "p6-b200": "dgx-b200",  # AWS 8x B200: same NVLink5/NVSwitch node as DGX B200
    "p5en-h200": "dgx-h200",  # AWS 8x H200, EFA 3.2 Tb/s per node = 50 GB/s per GPU, as DGX H200's NICs
}
ARCH_FAMILIES = {"SM90": "dgx-h100", "SM100": "dgx-b200"}  # DeepEP rows name only the architecture
ALGORITHMS = {"ring": "ring", "nvls": "nvls", "nvlstree": "nvls_tree", "tree": "tree"}
# Calibration inputs: the NVLink efficiency ramp was fitted to this sweep (collectives.DEFAULT_EFFICIENCY).
IN_SAMPLE = set(RAMP_FITTED_TO)


@dataclass(frozen=True)
class ValidationRow:
    point_id: str
    label: str
    metric: str
    measured: float
    predicted: float
    error: float  # relative error in time: t_pred / t_meas - 1
    in_sample: bool
    algorithm: str


def load_points(path: str | os.PathLike[str] | None = None) -> list[dict]:
    """The points of a validation file: a list of mappings, each with a unique string ``id`` and a ``kind``."""
    file = os.fspath(path or DEFAULT_PATH)
    points = read_yaml_mapping(file, "published validation").get("points") or []
    if not isinstance(points, list):
        raise ValueError(f"{file}: points: got {short_repr(points)}; expected a list of mappings")
    seen: set[str] = set()
    for i, point in enumerate(points):
        ok = isinstance(point, dict) and isinstance(point.get("id"), str) and isinstance(point.get("kind"), str)
        if not ok:
            raise ValueError(f"{file}: points[{i}]: got {short_repr(point)}; expected a mapping with string id "
                             "and kind")
        if point["id"] in seen:
            raise ValueError(f"{file}: points[{i}]: id {point['id']!r} appears twice")
        seen.add(point["id"])
    return points


@contextmanager
def _about(point: dict, what: str = ""):
    """Turn a malformed point's KeyError, TypeError, ... into a ValueError that names the point."""
    try:
        yield
    except _Skip:
        raise
    except ValueError as exc:  # the model cannot express a well-formed point: skipped, with the reason
        raise _Skip(f"not expressible: {str(exc)[:200]}") from None
    except (KeyError, TypeError, AttributeError, IndexError, ZeroDivisionError, OverflowError, StopIteration) as exc:
        name = point.get("id", "?") if isinstance(point, dict) else "?"
        text = short_repr(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)[:300]
        raise ValueError(f"published validation: point {name!s:.40}{what}: {type(exc).__name__}: {text}") from None


def _finite(row: ValidationRow) -> ValidationRow:
    if not all(math.isfinite(v) for v in (row.measured, row.predicted, row.error)) or row.measured <= 0:
        raise ValueError(f"published validation: point {row.point_id}: measured {row.measured!r}, predicted "
                         f"{row.predicted!r}; expected finite values > 0")
    return row


def _family(point: dict, row: dict) -> str | None:
    if row.get("arch") in ARCH_FAMILIES:
        return ARCH_FAMILIES[row["arch"]]
    fam = (point.get("hardware") or {}).get("family")
    return FAMILY_ALIASES.get(fam, fam)


def _topology(family: str, nodes: int, ranks: int = 0, step_latency_s: float | None = None):
    """The family at the point's size: nodes of a switched family, or the most cubic slice of ``ranks`` chips
    (at least the family's default slice) of a torus family. ``step_latency_s`` replaces the fabric's."""
    from moeplan.families import load_family

    fam = load_family(family)
    if hasattr(fam.layout, "default_shape"):
        default = math.prod(fam.layout.default_shape)
        return load_topology(family) if ranks <= default else _training_topology(family, ranks)
    topo = load_topology(family, nodes=max(nodes, 1))
    if step_latency_s is not None and topo.scale_out is not None:
        topo = copy.copy(topo)  # a private copy: collectives memoise per topology object
        topo.scale_out = replace(topo.scale_out, step_latency_s=step_latency_s)
    return topo


def collective_rows(points: list[dict], params: CommParams | None = None, step_latency_s: float | None = None
                    ) -> tuple[list[ValidationRow], list[tuple[str, str]]]:
    """Rows for every expressible measurement of the ``collective`` and ``moe_dispatch`` points, predicted with
    ``params`` (the library defaults when None) and, when given, ``step_latency_s`` as every scale-out fabric's
    per-step latency in place of its family file's (for fitting it)."""
    rows: list[ValidationRow] = []
    skipped: list[tuple[str, str]] = []
    for point in points:
        kind = point.get("kind")
        if kind not in ("collective", "moe_dispatch"):
            continue
        measurements = point.get("measurements") or []
        if not measurements:
            skipped.append((point["id"], "relative figures only (A10, A11: see relative_rows)"))
            continue
        handler = _collective_row if kind == "collective" else _dispatch_row
        with _about(point, ".measurements"):
            listed = list(enumerate(measurements))
        for index, row in listed:
            try:
                with _about(point, f".measurements[{index}]"):
                    result = _finite(handler(point, row, index, params, step_latency_s))
            except _Skip as why:
                skipped.append((f"{point['id']}[{index}]", str(why)))
                continue
            rows.append(result)
    return rows, skipped


class _Skip(Exception):
    pass


def _hardware(point: dict, row: dict) -> tuple[str, int]:
    family = _family(point, row)
    if family is None:
        raise _Skip("hardware family not stated")
    try:
        load_topology(family)
    except ValueError:
        raise _Skip(f"hardware {family!r} is not a bundled family") from None
    nodes = row.get("nodes") or (point.get("hardware") or {}).get("nodes") or 1
    return family, int(nodes)


def _collective_row(point: dict, row: dict, index: int, params: CommParams | None = None,
                    step_latency_s: float | None = None) -> ValidationRow:
    if point["id"] == "C9":
        raise _Skip("4 HDR NICs per 8-GPU node: the bundled dgx-a100 has one NIC per GPU")
    size = row.get("bytes")
    if size is None:
        raise _Skip("no message size published")
    family, nodes = _hardware(point, row)
    op = row.get("op") or point.get("op")
    ranks = int(row.get("ranks") or point.get("ranks") or 0)
    algorithm = row["algorithm"] if "algorithm" in row else point.get("algorithm")
    if row.get("nvls_enabled") is False and op == "all_reduce":
        algorithm = "ring"
    topo = _topology(family, nodes, ranks, step_latency_s)
    if ranks > topo.num_devices:
        raise _Skip(f"{ranks} ranks on a {family} of {topo.num_devices} devices")
    cost = collective_cost(topo, op, float(size), ranks, algorithm=ALGORITHMS.get(algorithm), params=params)
    predicted_s = float(cost.time_s[0])
    if row.get("time_s") is not None:
        metric, measured_s = "time_s", float(row["time_s"])
        measured, predicted = measured_s, predicted_s
    elif row.get("algbw_bytes_per_s") is not None:
        metric = "algbw_bytes_per_s"
        measured, predicted = float(row["algbw_bytes_per_s"]), size / predicted_s
        measured_s = size / measured
    else:
        metric = "busbw_bytes_per_s"
        factor = bus_bandwidth_factor(op, ranks)
        measured, predicted = float(row["busbw_bytes_per_s"]), size / predicted_s * factor
        measured_s = size * factor / measured
    label = f"{family} {op} n={ranks} {_fmt_size(size)} {algorithm or 'auto'}"
    return ValidationRow(point["id"], label, metric, measured, predicted, predicted_s / measured_s - 1.0,
                         point["id"] in IN_SAMPLE, str(cost.algorithm[0]))


def _dispatch_row(point: dict, row: dict, index: int, params: CommParams | None = None,
                  step_latency_s: float | None = None) -> ValidationRow:
    sms = row.get("sms")
    kernel = dispatch_kernel(point, row)
    peers = [r for r in point["measurements"] if _same_config(r, row)]
    if kernel not in NORMAL_KERNELS and sms is not None and sms < max(r.get("sms") or 0 for r in peers):
        raise _Skip(f"SM-limited kernel ({sms} SMs) of an implementation the model has no SM budget for (DeepEP V2's "
                    "are not fitted: dispatch.SM_COPY); the most-SM row is used")
    if row.get("measurement") == "torch_api" and any(r.get("measurement") == "kernel_only" for r in
                                                       point["measurements"] if _same_config(r, row, "measurement")):
        raise _Skip("includes framework overhead (torch API); the kernel-only row of the same configuration is used")
    family, nodes = _hardware(point, row)
    work = {**(point.get("workload") or {}), **{k: v for k, v in row.items() if v is not None}}  # a row's own wins
    missing = [k for k in ("ranks", "tokens_per_rank", "hidden", "top_k") if not work.get(k)]
    if missing:
        raise _Skip(f"dispatch workload {', '.join(missing)} not published")
    ranks = int(work["ranks"])
    dtype = row.get("dtype") or work.get(f"{row.get('phase')}_dtype") or "bf16"
    # Send buffer per rank: every token to each of its top-k experts (DeepEP counts per destination).
    size = work["tokens_per_rank"] * _token_bytes(work["hidden"], dtype) * work["top_k"]
    topo = _topology(family, nodes, ranks, step_latency_s)
    if ranks > topo.num_devices:
        raise _Skip(f"{ranks} ranks on a {family} of {topo.num_devices} devices")
    experts = ExpertRouting(_num_experts(work, ranks), int(work["top_k"]),
                            token_bytes=_token_bytes(work["hidden"], dtype)) if kernel else None
    if kernel in NORMAL_KERNELS and sms is not None:
        params = replace(params or CommParams(), dispatch_sms=int(sms))
    cost = collective_cost(topo, "all_to_all", float(size), ranks, params=params, algorithm=kernel, experts=experts)
    t_pred = float(cost.time_s[0])
    label = f"{family} {row['phase']} EP{ranks} x{nodes}n {dtype} {row.get('implementation') or ''} " + (
        f"{sms}SM" if sms else kernel or "")
    in_sample = point["id"] in IN_SAMPLE
    if row.get("time_s") is not None:  # a latency: the measurement itself, whatever bandwidth it also prints
        measured_s = float(row["time_s"])
        return ValidationRow(point["id"], label.strip(), "time_s", measured_s, t_pred, t_pred / measured_s - 1.0,
                             in_sample, str(cost.algorithm[0]))
    definition = row.get("bw_definition", "")
    per_node = ranks // max(nodes, 1)
    if definition.startswith("bottleneck"):  # bytes over the bottleneck link (NVLink, or RDMA between nodes)
        share = (ranks - per_node) / ranks if nodes > 1 else (ranks - 1) / ranks
    else:  # logical / algorithm bandwidth: everything the rank sends, local part included
        share = 1.0
    predicted = size * share / t_pred
    measured = float(row["bw_bytes_per_s"])
    return ValidationRow(point["id"], label.strip(), "bw_bytes_per_s", measured, predicted,
                         measured / predicted - 1.0, in_sample, str(cost.algorithm[0]))


def _token_bytes(hidden: int, dtype: str) -> float:
    """Bytes of one dispatched token: the hidden vector, plus its per-block scales when it is 8-bit."""
    width = dtype_bytes(dtype)
    return hidden * (width + FP8_SCALE_BYTES_PER_VALUE if width == 1 else width)


_LOW_LATENCY = ("low-latency", "low_latency", "low latency")


# A row's implementation, as the HybridEP README's tables name it, measured with a stated SM budget: the kernel.
_IMPLEMENTATIONS = {"deepep": "deepep_normal", "hybridep": "hybridep"}


def dispatch_kernel(point: dict, row: dict) -> str | None:
    """The dispatch kernel a measurement ran: a row's or point's ``kernel`` (one of dispatch.KERNELS), else the
    row's ``implementation`` (DeepEP's normal kernels, HybridEP) where the row states its SM budget, else
    DeepEP's low-latency kernels when the row's implementation or mode, or the point's source or notes, name
    them (and not the normal kernels); None (an NCCL all_to_all) otherwise."""
    named = row.get("kernel") or point.get("kernel")
    if named is not None:
        if named not in KERNELS:
            raise ValueError(f"kernel: got {named!r}; expected one of {list(KERNELS)}")
        return None if named == "nccl" else named
    if row.get("sms") and str(row.get("implementation")).lower() in _IMPLEMENTATIONS:
        return _IMPLEMENTATIONS[str(row["implementation"]).lower()]
    fields = (row.get("implementation"), row.get("mode"), point.get("source"), point.get("notes"))
    text = " ".join(str(v) for v in fields).lower()
    low = any(word in text for word in _LOW_LATENCY) and "normal kernel" not in text
    return "deepep_ll" if low else None


def _num_experts(work: dict, ranks: int) -> int:
    """The workload's expert count: stated, or local experts x ranks, else the fewest that spread evenly over
    the ranks and hold top_k (the low-latency kernels' bytes do not depend on it)."""
    if work.get("num_experts"):
        return int(work["num_experts"])
    if work.get("local_experts"):
        return int(work["local_experts"]) * ranks
    return ranks * math.ceil(int(work["top_k"]) / ranks)


def _same_config(a: dict, b: dict, *ignore: str) -> bool:
    keys = ("phase", "dtype", "implementation", "measurement", "arch", "ranks", "nodes", "nic")
    return all(a.get(k) == b.get(k) for k in keys if k not in ignore)


def _fmt_size(size: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:g}{unit}"
    return f"{size:g}B"


def relative_rows(points: list[dict]) -> list[ValidationRow]:
    """Published ratios the model can reproduce (printed by the benchmark; not asserted: they are
    read off figures or second-hand, see each point's notes). Error = predicted / measured ratio - 1."""
    rows = []
    by_id = {p["id"]: p for p in points}
    for name, rule in (("A11", _twisted_ratio), ("A10", _gshard_ratio)):
        if name in by_id:
            try:
                with _about(by_id[name], ".relative"):
                    rows += rule(by_id[name])
            except _Skip:
                continue  # printed ratios only: a point the model cannot express has none
    return [_finite(r) for r in rows]


def _twisted_ratio(point: dict) -> list[ValidationRow]:
    """TPU v4 twisted vs regular torus, all-to-all throughput."""
    rows = []
    for item in point.get("relative") or []:
        shape = tuple(item["tpu_shape"])
        plain = load_topology("tpu-v4", shape=shape)
        twisted = load_topology("tpu-v4", shape=shape, twisted=True)
        ratio = float(collective_cost(plain, "all_to_all", 1e9).time_s[0] /
                      collective_cost(twisted, "all_to_all", 1e9).time_s[0])
        rows.append(ValidationRow("A11", f"tpu-v4 {'x'.join(map(str, shape))} twisted/regular a2a throughput",
                                  "ratio", item["value"], ratio, ratio / item["value"] - 1, False, "direct"))
    return rows


def _gshard_ratio(point: dict) -> list[ValidationRow]:
    """GShard: all-to-all time from 16 to 2048 TPU v3 cores (8 MB per core)."""
    item = next(r for r in point["relative"] if r["metric"] == "alltoall_time_ratio")
    small = load_topology("tpu-v3", shape=(2, 4))  # 16 cores = 8 chips (slice shape not stated)
    large = load_topology("tpu-v3", shape=(32, 32))  # 2048 cores = the 1024-chip pod
    per_chip = 2 * 8e6
    ratio = float(collective_cost(large, "all_to_all", per_chip).time_s[0] /
                  collective_cost(small, "all_to_all", per_chip).time_s[0])
    return [ValidationRow("A10", "tpu-v3 a2a time 2048 vs 16 cores, 8 MB per core", "ratio",
                          item["value"], ratio, ratio / item["value"] - 1, False, "direct")]


def summarize(rows: list[ValidationRow]) -> dict[str, float]:
    errors = np.abs([r.error for r in rows])
    held = np.abs([r.error for r in rows if not r.in_sample])
    return {
        "points": len(rows),
        "median_abs_error": float(np.median(errors)) if rows else float("nan"),
        "max_abs_error": float(errors.max()) if rows else float("nan"),
        "held_out_points": int(held.size),
        "held_out_median_abs_error": float(np.median(held)) if held.size else float("nan"),
    }


# ------------------------------------------------------------------ training steps
_MODEL_KEYS = ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_head", "vocab_size", "seq_len", "d_ff",
               "num_experts", "top_k", "expert_d_ff", "num_shared_experts", "moe_every", "first_dense_layers",
               "capacity_factor", "attention", "encoder_decoder", "gated_ffn", "route_node_limit", "mtp_layers")
# A recipe's multi-token prediction depth where the model spec does not give it (Megatron's --mtp-num-layers)
_MTP_STATED = re.compile(r"mtp[_-]num[_-]layers\W{0,3}(\d+)", re.I)


def _window(spec: dict) -> dict:
    """A point's sliding window as ``MoEModel`` fields: ``sliding_window`` tokens on one layer in every
    ``sliding_window_every`` (1: all, 2: alternate layers, i.e. one full-attention layer in two)."""
    window, every = int(spec.get("sliding_window") or 0), int(spec.get("sliding_window_every") or 1)
    if not window:
        return {}
    if every not in (1, 2):
        raise _Skip(f"model sliding_window_every: got {every}; expected 1 or 2 (a window on one layer in {every} "
                    "has no full_attention_every)")
    return {"sliding_window": window, "full_attention_every": 0 if every == 1 else 2}


def training_rows(points: list[dict]) -> tuple[list[ValidationRow], list[tuple[str, str]]]:
    """Rows for every ``training_step`` point whose model, layout and batch are published."""
    rows: list[ValidationRow] = []
    skipped: list[tuple[str, str]] = []
    for point in points:
        if point.get("kind") != "training_step":
            continue
        try:
            with _about(point):
                rows.append(_finite(_training_row(point)))
        except _Skip as why:
            skipped.append((point["id"], str(why)))
    return rows, skipped


def _training_row(point: dict) -> ValidationRow:
    from moeplan.estimate import estimate
    from moeplan.moe import MLADims, MoEModel
    from moeplan.routing import Routing

    spec = point.get("model") or {}
    missing = [k for k in ("d_model", "n_layers", "seq_len", "vocab_size", "n_heads") if spec.get(k) is None]
    if missing:
        raise _Skip(f"model {', '.join(missing)} not published")
    if point.get("global_batch_tokens") is None or not point.get("layout"):
        raise _Skip("global batch or layout not published")
    family, _ = _hardware(point, {})
    chips = _chips(point, family)
    kwargs = {k: spec[k] for k in _MODEL_KEYS if spec.get(k) is not None}
    kwargs.setdefault("d_ff", 0)
    kwargs.setdefault("n_kv_heads", kwargs["n_heads"])  # unstated: multi-head attention
    kwargs.setdefault("d_head", kwargs["d_model"] // kwargs["n_heads"])  # unstated: the usual d_model / heads
    if kwargs.get("num_experts", 0) <= 1:  # a dense model: its FFN is its one expert
        kwargs.update(num_experts=1, top_k=1, expert_d_ff=kwargs.get("expert_d_ff") or kwargs["d_ff"])
    unstated = [k for k in ("top_k", "expert_d_ff") if not kwargs.get(k)]
    if unstated:
        raise _Skip(f"model {', '.join(unstated)} not published")
    kwargs["capacity_factor"] = spec.get("capacity_factor")
    if "mtp_layers" not in kwargs and (mtp := _MTP_STATED.search(point.get("notes", ""))):
        kwargs["mtp_layers"] = int(mtp.group(1))
    if spec.get("attention") == "mla":
        kwargs["mla"] = MLADims(**spec["mla"])
    kwargs.update(_window(spec))
    model = MoEModel(name=spec.get("name", point["id"]), **kwargs)
    framework = point_framework(point)
    lay = point["layout"]
    stated = (point.get("hardware") or {}).get("tpu_shape")
    topo = _training_topology(family, chips, int(lay.get("dcn_data") or 0) or None, tuple(stated) if stated else None)
    layout = training_layout(point, chips, framework)
    if layout.recompute in _ON_DEVICE and topo.host_link is None:  # the family states no host link: the same
        layout = replace(layout, recompute=_ON_DEVICE[layout.recompute])  # recompute on the device
    balanced = "force-balance" in point.get("notes", "")
    knobs = point_kernels(point) if topo.kind == SWITCHED else {}  # DeepEP and EP overlap are GPU software
    try:
        est = estimate(model, topo, layout, int(point["global_batch_tokens"]), dtype=point.get("dtype") or "bf16",
                       routing=Routing("balanced" if balanced else "uniform"), framework=framework, **knobs)
    except ValueError as exc:
        raise _Skip(f"not expressible: {exc}") from None
    label = f"{family} x{chips} {model.name} {point.get('dtype')}"
    metric, value, step_s = _published_rate(point, model.seq_len, chips)
    if step_s is not None:  # a step time, or a rate of work per step: compared as a step time
        ratio = est.step_time_s / step_s
        predicted = est.step_time_s if metric == "step_time_s" else value / ratio
        return ValidationRow(point["id"], label, metric, value, predicted, ratio - 1.0, False, "estimate")
    predicted = (est.mfu if metric == "mfu" else est.mfu * topo.chip.peak_bf16_flop_per_s) * _flop_count(point, model)
    return ValidationRow(point["id"], label, metric, value, predicted, value / predicted - 1.0, False, "estimate")


# How a source counts the FLOPs of the rate it publishes (``flop_count``): "full" (the default, moeplan's and
# PaLM's: a causal self-attention's scores counted whole) or "causal" (half of them: Megatron-LM's
# num_floating_point_operations since 2025-03, '/ 2  # causal mask', as at @1d9edcf; MaxText's
# calculate_tflops_training_per_device cites it and does the same).
FLOP_COUNTS = ("full", "causal")


def _flop_count(point: dict, model) -> float:
    """The source's FLOPs per step over moeplan's, for a point published as a FLOP rate or an MFU."""
    from moeplan.moe import forward_flops_per_token, model_flops_per_token

    count = point.get("flop_count") or "full"
    if count not in FLOP_COUNTS:
        raise ValueError(f"flop_count: got {count!r}; expected one of {list(FLOP_COUNTS)}")
    if count == "full" or model.encoder_decoder:
        return 1.0
    scores = 3.0 * forward_flops_per_token(model)["attention_scores"]
    return 1.0 - 0.5 * scores / model_flops_per_token(model)


# Published measures of a training step, in the order they are used.
_RATES = ("step_time_s", "steps_per_s", "tokens_per_s", "tokens_per_s_per_chip", "examples_per_s",
          "mfu", "model_flops_per_s_per_chip")


def _chips(point: dict, family: str) -> int:
    """The point's device count: stated, else its nodes x the family's devices per node, else the product of
    its layout's degrees; skipped when none is published."""
    from moeplan.families import load_family

    hw = point.get("hardware") or {}
    if hw.get("chips"):
        return int(hw["chips"])
    fam = load_family(family)
    if hw.get("nodes") and hasattr(fam.layout, "node"):  # a switched family: nodes of devices_per_node
        return int(hw["nodes"]) * fam.layout.node.devices_per_node
    lay = point.get("layout") or {}
    degrees = [int(lay.get(k) or 1) for k in ("data", "fsdp", "tensor", "pipeline", "context")]
    if lay.get("data") or lay.get("fsdp"):
        return math.prod(degrees)
    raise _Skip("hardware chips (or nodes) not published")


def _published_rate(point: dict, seq_len: int, chips: int) -> tuple[str, float, float | None]:
    """The first published measure of the step (measured, then derived values): its name, its value and the
    measured step time it implies (None for MFU and model FLOP/s, which are compared as rates)."""
    batch = float(point["global_batch_tokens"])
    work = {"steps_per_s": 1.0, "tokens_per_s": batch, "tokens_per_s_per_chip": batch / chips,
            "examples_per_s": batch / seq_len}  # a rate's work per step
    for source in (point.get("measured") or {}, point.get("derived_values") or {}):
        for name in _RATES:
            value = source.get(name)
            if value:
                value = float(value)
                step_s = value if name == "step_time_s" else work[name] / value if name in work else None
                return name, value, step_s
    raise _Skip(f"no step time, throughput or MFU published (expected one of {', '.join(_RATES)})")


def ranking_taus(points: list[dict]) -> dict[str, tuple[float, int]]:
    """Per published table (the ``ranking`` its training_step points share): the Kendall tau between measured
    and predicted speed over its expressible rows, and how many rows that is. Tau-b: tied measurements count
    as neither order."""
    from scipy.stats import kendalltau

    rows, _ = training_rows(points)
    table = {p["id"]: p.get("ranking") for p in points}
    out = {}
    for name in sorted({t for t in table.values() if t}):
        mine = [r for r in rows if table.get(r.point_id) == name]
        measured = [_speed(r.metric, r.measured) for r in mine]
        predicted = [_speed(r.metric, r.predicted) for r in mine]
        tau = kendalltau(measured, predicted).statistic if len(mine) > 1 else float("nan")
        out[name] = (float(tau), len(mine))
    return out


def _speed(metric: str, value: float) -> float:
    """Higher is faster: a step time inverted, a rate (throughput, MFU) as it is."""
    return 1.0 / value if metric == "step_time_s" else value


# An offload policy on a family without a stated host link: the recompute it does, its tensors kept on the device.
_ON_DEVICE = {"offload": "none", "offload_projections": "full", "offload_inputs": "full"}


def point_framework(point: dict) -> str | None:
    """The framework a training point ran on: its ``framework`` field, else "maxtext" where its source is
    MaxText's (or a MaxText recipe), "dualpipe" where its source or notes name DualPipe (DeepSeek-V3's
    schedule), else None (the Megatron-Core defaults)."""
    if point.get("framework"):
        return point["framework"]
    if "maxtext" in str(point.get("source", "")).lower():
        return "maxtext"
    return "dualpipe" if "dualpipe" in _text(point) else None


# Dispatcher names as sources write them (Megatron-Core's --moe-token-dispatcher-type and flex backends).
_DISPATCHERS = {"alltoall": "nccl", "all-to-all": "nccl", "allgather": "nccl", "nccl": "nccl",
                "flex": "deepep_normal", "deepep": "deepep_normal", "hybridep": "hybridep",
                "deepep_normal": "deepep_normal", "deepep_ll": "deepep_ll"}
# Megatron-Core's expert all-to-all overlap with another micro-batch's compute (--overlap-moe-expert-parallel-comm;
# Megatron-Bridge's recipes call it moe_a2a_overlap and state it true or false).
_EP_OVERLAP = ("overlap-moe-expert-parallel-comm", "overlap_moe_expert_parallel_comm", "ep a2a overlap")
_A2A_OVERLAP_STATED = re.compile(r"moe_a2a_overlap\W{0,3}(true|false)")
# A Megatron recipe that recomputes nothing, or only element-wise modules (norms, the expert activation: memory-bound
# reruns of a few activations' bytes, left out), runs as recompute "none"
_NO_RECOMPUTE = re.compile(r"no activation recompute|recompute_granularity None|recompute_modules (finally )?\[\]|"
                           r"recompute_modules \[(?:'(?:layernorm|moe_act)',? ?)+\]", re.I)
# A recipe's gradient and FSDP-gather encodings (Layout.gradient_bytes, Layout.quantized_gather), as sources state them
_BF16_GRADIENTS = re.compile(r"grad_dtype\W{0,3}bfloat16|bf16 mu and grads|--grad-reduce-in-bf16", re.I)
_QUANTIZED_GATHER = re.compile(r"weight_quantization_calibration_method\W{0,3}fixed|--fp8-param-gather|"
                               r"fp8 param gather|enable_fsdp_float8_all_gather", re.I)


def point_kernels(point: dict) -> dict[str, str]:
    """The dispatch kernel and overlap a GPU training point names (estimate keywords; empty: the framework's).
    A stated dispatcher (the point's or its layout's ``dispatch``, ``moe_token_dispatcher_type`` or
    ``moe_flex_dispatcher_backend``) wins; else HybridEP (``hybridep``), then DeepEP (``deepep_normal``), named
    in the source or notes. The all-to-all overlap: a stated ``moe_a2a_overlap``
    (a field, or written true/false in the notes) wins over the flag's name in the text."""
    lay = point.get("layout") or {}
    stated = [str(v).lower() for v in (lay.get("moe_flex_dispatcher_backend"), point.get("dispatch"),
                                        lay.get("dispatch"), lay.get("moe_token_dispatcher_type")) if v]
    knobs = {}
    for name in stated:
        if name not in _DISPATCHERS:
            raise ValueError(f"dispatch: got {name!r}; expected one of {sorted(_DISPATCHERS)}")
    text = _text(point)
    if stated:
        knobs["dispatch"] = _DISPATCHERS[stated[0]]
    elif "hybridep" in text or "hybrid-ep" in text:
        knobs["dispatch"] = "hybridep"
    elif "deepep" in text:
        knobs["dispatch"] = "deepep_normal"
    overlap = lay.get("moe_a2a_overlap", point.get("moe_a2a_overlap"))
    if overlap is None and (match := _A2A_OVERLAP_STATED.search(text)):
        overlap = match.group(1) == "true"
    if overlap is True or (overlap is None and any(flag in text for flag in _EP_OVERLAP)):
        knobs["overlap"] = "full"
    return knobs


def _text(point: dict) -> str:
    return f"{point.get('source', '')} {point.get('notes', '')}".lower()


def training_layout(point: dict, chips: int, framework: str | None):
    """The moeplan Layout of a training point's published parallelism. The sources' data degree counts the
    expert axis too (Megatron folds experts into data). MaxText's mesh axes read as MaxText shards: its expert
    axis splits the batch and the non-expert weights as fsdp does (base.yml logical axis rules put embed and
    activation_batch over it), its tensor axis splits the experts' mlp width too (expert-tensor parallelism),
    and its remat policy comes from the notes (``_maxtext_remat``). A Megatron MoE run that does not state its
    expert-tensor degree has Megatron's default, the tensor-parallel size."""
    from moeplan.layout import Layout

    lay = point["layout"]
    fsdp, tensor, pipeline = (int(lay.get(k) or 1) for k in ("fsdp", "tensor", "pipeline"))
    maxtext = framework == "maxtext"
    context = int(lay.get("context") or lay.get("context_parallel") or lay.get("cp") or 1)  # context parallel size
    if maxtext and fsdp * int(lay.get("expert") or 1) * tensor * pipeline * context <= chips:
        fsdp *= int(lay.get("expert") or 1)  # (a source whose fsdp already spans the expert axis keeps it)
    data = chips // (fsdp * tensor * pipeline * context)
    notes = point.get("notes", "")
    recompute = lay.get("recompute") or ("none" if _NO_RECOMPUTE.search(notes) else _maxtext_remat(notes))
    flags = {k: bool(lay[k]) for k in ("sequence_parallel", "shard_optimizer", "quantized_gather")
             if lay.get(k) is not None}
    if "quantized_gather" not in flags and _QUANTIZED_GATHER.search(notes):
        flags["quantized_gather"] = True
    flags["gradient_bytes"] = int(lay.get("gradient_bytes") or (2 if _BF16_GRADIENTS.search(notes) else 4))
    # unstated, the experts' width splits over the tensor axis where the framework does so by default: MaxText's
    # tensor axis, and Megatron's --expert-tensor-parallel-size (None: the tensor-parallel size)
    megatron = "megatron" in _text(point) and int((point.get("model") or {}).get("num_experts") or 1) > 1
    expert_tensor = int(lay.get("expert_tensor") or lay.get("etp") or (tensor if maxtext or megatron else 1))
    stages = {k: int(lay.get(k) or 0) for k in ("first_stage_layers", "last_stage_layers")}  # 0: an even split
    return Layout(data=data, fsdp=fsdp, tensor=tensor, context=context, pipeline=pipeline,
                  expert=int(lay.get("expert") or 1),
                  expert_tensor=expert_tensor, **stages, virtual_pipeline=int(lay.get("virtual_pipeline") or 1),
                  micro_batch_size=_micro_batch(point, data * fsdp, framework), recompute=recompute, **flags)


def _micro_batch(point: dict, batch_shards: int, framework: str | None) -> int:
    """Sequences per micro-batch on one batch shard: MaxText runs a shard's whole batch at once (no gradient
    accumulation; its per_device_batch_size counts the tensor ranks' share of a shard's sequences); elsewhere
    the source's micro-batch per device."""
    if framework == "maxtext":
        return max(1, int(point["global_batch_tokens"]) // int(point["model"]["seq_len"]) // batch_shards)
    return int(point["layout"].get("micro_batch_per_device") or 1)


def _maxtext_remat(notes: str) -> str:
    """The recompute policy of a MaxText run its notes describe: a custom remat that offloads the projections
    (out_proj, q/k/v) keeps them in host memory and recomputes the rest; one that offloads each layer's input
    only is a full recompute with the inputs in host memory; otherwise Megatron's default, selective."""
    if "remat" not in notes or "offload" not in notes:
        return "selective"
    if "out_proj" in notes or "query_proj" in notes:
        return "offload_projections"
    return "offload_inputs" if "decoder_layer_input" in notes else "full"


def _training_topology(family: str, chips: int, slices: int | None = None, shape: tuple[int, ...] | None = None):
    """The family with ``chips`` devices; a torus family as one slice when one can hold them, else as the
    fewest equal slices over DCN (``slices`` when the source states it, as MaxText's dcn_data_parallelism),
    each of the slice ``shape`` the source states, else the most cubic one."""
    from moeplan.families import load_family

    fam = load_family(family)
    if hasattr(fam.layout, "default_shape"):
        if slices is None:
            slices = next((s for s in range(1, chips + 1) if chips % s == 0 and _has_shape(fam.layout, chips // s)),
                          1)
        if chips % slices:
            raise _Skip(f"{chips} chips do not split into {slices} slices")
        if slices > 1 and fam.layout.dcn is None:
            raise _Skip(f"{family} states no DCN for {slices} slices")
        if shape is not None and math.prod(shape) != chips // slices:
            raise _Skip(f"the stated slice shape {list(shape)} does not hold {chips // slices} chips")
        return load_topology(family, shape=shape or _torus_shape(fam.layout, chips // slices), slices=slices)
    per_node = fam.layout.node.devices_per_node
    nodes = math.ceil(chips / per_node)
    return load_topology(family, nodes=nodes, devices_per_node=chips // nodes)


def _has_shape(fam, chips: int) -> bool:
    try:
        _torus_shape(fam, chips)
    except _Skip:
        return False
    return True


def _torus_shape(fam, chips: int) -> tuple[int, ...]:
    """The most cubic allowed slice shape with ``chips`` chips: the shortest longest axis, then the longest
    shortest one (4x4x8 rather than 2x8x8: short axes close no ring)."""
    best = None
    sizes = fam.allowed_axis_sizes
    for shape in itertools.product(sizes, repeat=len(fam.default_shape)):
        if math.prod(shape) == chips and list(shape) == sorted(shape):
            if best is None or (max(shape), -min(shape)) < (max(best), -min(best)):
                best = shape
    if best is None:
        raise _Skip(f"no slice shape of {chips} chips")
    return best


# ------------------------------------------------------------------ the fitted ramp, and leave-one-source-out
def params_with_ramp(s_half_bytes: float, shape: float) -> CommParams:
    """The library defaults with every curve that shares the fitted size ramp set to (s_half_bytes, shape)."""
    curves = {name: replace(eff, s_half_bytes=s_half_bytes, shape=shape) for name, eff in DEFAULT_EFFICIENCY.items()
              if (eff.s_half_bytes, eff.shape) == (RAMP["s_half_bytes"], RAMP["shape"])}
    return CommParams().with_efficiency(**curves)


def fit_ramp(points: list[dict]) -> tuple[float, float]:
    """The size ramp (s_half_bytes, shape) that minimises the squared log time error over ``points``' rows."""
    from scipy import optimize

    def residuals(theta):
        rows, _ = collective_rows(points, params_with_ramp(math.exp(theta[0]), theta[1]))
        return np.log1p(np.array([r.error for r in rows]))

    start = [math.log(RAMP["s_half_bytes"]), RAMP["shape"]]
    sol = optimize.least_squares(residuals, start, bounds=([math.log(1e3), 0.1], [math.log(1e10), 3.0]))
    return float(math.exp(sol.x[0])), float(sol.x[1])


def leave_one_source_out(points: list[dict]) -> list[ValidationRow]:
    """Every collective and dispatch row, each predicted by constants fitted without its own point: the points
    the ramp was fitted to are refitted on the others; the point the dispatch kernels' per-SM copy figures were
    fitted to (dispatch.SM_COPY_FITTED_TO; no other public point sweeps SMs) is predicted without them (no SM
    limit: every SM budget runs at the links' time); every other point is held out already."""
    fitted = [p for p in points if p["id"] in RAMP_FITTED_TO]
    sm_fitted = {pid: [k for k, ids in SM_COPY_FITTED_TO.items() if pid in ids]
                 for ids in SM_COPY_FITTED_TO.values() for pid in ids}
    rows, _ = collective_rows([p for p in points if p["id"] not in RAMP_FITTED_TO and p["id"] not in sm_fitted])
    for point in fitted:
        rows += collective_rows([point], params_with_ramp(*fit_ramp([p for p in fitted if p is not point])))[0]
    for point in (p for p in points if p["id"] in sm_fitted):
        figures = {k: v for k, v in SM_COPY.items() if k not in sm_fitted[point["id"]]}
        rows += collective_rows([point], CommParams(sm_copy=figures))[0]
    return rows


# ------------------------------------------------------------------ a fabric's per-step latency
SMALL_MESSAGE_BYTES = 64 * 1024  # rows up to this size are latency-bound: what a step latency is fitted to


def fit_step_latency(points: list[dict]) -> float:
    """The scale-out step latency that minimises the squared log time error of ``points``' small-message rows
    (one fabric's points; larger rows are bandwidth-bound and say nothing about it)."""
    from scipy import optimize

    small = [{**p, "measurements": [r for r in p["measurements"] if r.get("bytes", 0) <= SMALL_MESSAGE_BYTES]}
             for p in points]

    def cost(log_s: float) -> float:
        rows, _ = collective_rows(small, step_latency_s=math.exp(log_s))
        return float(np.sum(np.log1p(np.array([r.error for r in rows])) ** 2))

    sol = optimize.minimize_scalar(cost, bounds=(math.log(1e-7), math.log(1e-3)), method="bounded")
    return float(math.exp(sol.x))


# Fabric step latencies fitted to collected points (family -> the points); every other fabric's is published.
STEP_LATENCY_FITTED_TO = {"gcp-a3-mega": ("GCP-A3M-AG", "GCP-A3M-AR")}


def fit_ll_latency(points: list[dict]) -> float:
    """The low-latency kernels' fixed cost (``CommParams.ll_kernel_latency_s``) that minimises the squared log
    time error of ``points``' low-latency dispatch rows; with none, one network step (the kernels' floor)."""
    from scipy import optimize

    low = [p for p in points if p.get("kind") == "moe_dispatch"
           and any(dispatch_kernel(p, r) == "deepep_ll" for r in p.get("measurements") or [])]
    if not low:
        return CommParams().net_step_latency_s

    def cost(log_s: float) -> float:
        rows, _ = collective_rows(low, CommParams(ll_kernel_latency_s=math.exp(log_s)))
        return float(np.sum(np.log1p(np.array([r.error for r in rows if r.algorithm == "deepep_ll"])) ** 2))

    sol = optimize.minimize_scalar(cost, bounds=(math.log(1e-7), math.log(1e-3)), method="bounded")
    return float(math.exp(sol.x))


def collected_leave_one_source_out(points: list[dict]) -> list[ValidationRow]:
    """Rows of the collected points, each fitted point predicted with the constant fitted to it (a fabric's
    step latency, the low-latency kernels' latency) refitted without it; the other points are held out already."""
    fitted = {pid for ids in STEP_LATENCY_FITTED_TO.values() for pid in ids} | set(LL_LATENCY_FITTED_TO)
    rows, _ = collective_rows([p for p in points if p["id"] not in fitted])
    for ids in STEP_LATENCY_FITTED_TO.values():
        group = [p for p in points if p["id"] in ids]
        for point in group:
            rest = [p for p in group if p is not point]
            rows += collective_rows([point], step_latency_s=fit_step_latency(rest) if rest else None)[0]
    group = [p for p in points if p["id"] in LL_LATENCY_FITTED_TO]
    for point in group:
        latency = fit_ll_latency([p for p in group if p is not point])
        rows += collective_rows([point], CommParams(ll_kernel_latency_s=latency))[0]
    return rows


def fit_sm_copy(points: list[dict], kernel: str) -> tuple[float, float]:
    """The per-SM fixed time per copy and copy rate of ``kernel`` (dispatch.SM_COPY) that minimise the squared
    log time error of ``points``' dispatch rows that ran it (``dispatch_kernel``: an implementation with a stated
    SM budget, or a named kernel)."""
    from scipy import optimize

    def cost(x: np.ndarray) -> float:
        params = CommParams(sm_copy={**SM_COPY, kernel: (math.exp(x[0]), math.exp(x[1]))})
        rows = [r for r in collective_rows(points, params)[0] if r.algorithm == kernel]
        return float(np.sum(np.log1p(np.array([r.error for r in rows])) ** 2))

    start = np.log(SM_COPY[kernel])
    sol = optimize.minimize(cost, start, method="Nelder-Mead", options={"xatol": 1e-4, "fatol": 1e-10})
    return float(math.exp(sol.x[0])), float(math.exp(sol.x[1]))
