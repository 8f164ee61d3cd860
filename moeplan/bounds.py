"""The plausible range of every size the public API takes, and the one check that enforces them.

Sizes past these bounds are not models anyone trains; they are typos or hostile input, and they would
make one estimate or one search take unbounded memory (1e9 experts is 15 GB of routing statistics).
docs/model.md lists the same table. Ranges are inclusive.
"""

from __future__ import annotations

import math

import numpy as np

MODEL = {  # MoEModel fields
    "d_model": (1, 65_536), "n_layers": (1, 1_024), "n_heads": (1, 4_096), "n_kv_heads": (1, 4_096),
    "d_head": (1, 4_096), "vocab_size": (1, 4_194_304), "seq_len": (1, 16_777_216), "d_ff": (0, 1_048_576),
    "num_experts": (1, 65_536), "top_k": (1, 1_024), "expert_d_ff": (1, 1_048_576),
    "num_shared_experts": (0, 1_024), "moe_every": (1, 1_024), "first_dense_layers": (0, 1_024),
    "mtp_layers": (0, 64), "sliding_window": (0, 16_777_216), "full_attention_every": (0, 1_024),
}
CAPACITY_FACTOR = (1e-3, 1e3)
LAYOUT = {"data": (1, 1_048_576), "fsdp": (1, 1_048_576), "expert": (1, 65_536), "expert_tensor": (1, 4_096),
          "tensor": (1, 4_096), "context": (1, 4_096),
          "pipeline": (1, 1_024), "virtual_pipeline": (1, 1_024), "micro_batch_size": (1, 1_048_576),
          "first_stage_layers": (0, 1_024), "last_stage_layers": (0, 1_024), "gradient_bytes": (2, 4)}
GLOBAL_BATCH_TOKENS = (1, 2**40)  # about 1.1e12 tokens in one step
BYTES_PER_DEVICE = (0.0, 1e15)  # one collective's buffer
TOPOLOGY_DEVICES = (1, 131_072)  # accelerators in one topology
SEARCH_POINTS = 50_000_000  # default cap on one search's grid (points), settable per call

# The largest value each numeric key of a YAML file (topology family, model, profile) may hold; the loader
# (schema.Section) enforces it with the key's own lower bound. One chip, link or fitted constant each.
FILE_MAX = {
    "peak_bf16_flop_per_s": 1e18, "peak_fp8_flop_per_s": 1e18, "peak_fp32_flop_per_s": 1e18,  # FLOP/s per chip
    "hbm_capacity_bytes": 1e13, "hbm_bw_bytes_per_s": 1e15, "cores_per_chip": 64, "matmul_tile": 4_096,
    "sm_count": 4_096,
    "matmul": 1.0, "attention": 1.0, "memory": 1.0, "link_efficiency": 1.0,  # efficiencies: fractions of peak
    "nvls_efficiency": 1.0,
    "bw_bytes_per_s": 1e14, "latency_s": 1.0, "step_latency_s": 1.0, "kernel_overhead_s": 1.0,
    "oversubscription": 100.0, "devices_per_node": 1_024, "nodes_per_leaf": TOPOLOGY_DEVICES[1],
    "default_nodes": TOPOLOGY_DEVICES[1], "max_nodes": TOPOLOGY_DEVICES[1], "max_chips": TOPOLOGY_DEVICES[1],
    "wraparound_multiple_of": 1_024, "device_count": TOPOLOGY_DEVICES[1], "schema_version": 1_000,
    **{k: float(high) for k, (_, high) in MODEL.items()}, "capacity_factor": CAPACITY_FACTOR[1],
}


def check_int(where: str, value, low: int, high: int) -> int:
    """``value`` as an int in [low, high] (bools refused), or a ValueError naming ``where``."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | np.integer) or not low <= value <= high:
        raise ValueError(f"{where}: got {_short(value)}; expected an integer from {low:,} to {high:,}")
    return int(value)


def check_number(where: str, value, low: float, high: float) -> float:
    """``value`` as a finite float in [low, high] (bools refused), or a ValueError naming ``where``."""
    ok = isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool | np.bool_)
    if not ok or not math.isfinite(float(value)) or not low <= float(value) <= high:
        raise ValueError(f"{where}: got {_short(value)}; expected a finite number from {low:g} to {high:g}")
    return float(value)


def check_bool(where: str, value) -> bool:
    if not isinstance(value, bool | np.bool_):
        raise ValueError(f"{where}: got {_short(value)}; expected True or False")
    return bool(value)


def check_finite_outputs(where: str, values: dict) -> None:
    """The final guard: every output finite and >= 0, or a ValueError naming the output and the inputs."""
    for name, value in values.items():
        if type(value) is float and 0.0 <= value < math.inf:  # the common scalar: no array made
            continue
        v = np.asarray(value, dtype=float)
        if not np.all(np.isfinite(v)) or np.any(v < 0):
            raise ValueError(f"{where}: the inputs give {name} = {_short(value)}, which is not a finite number "
                             ">= 0; check the sizes and hardware numbers given")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."
