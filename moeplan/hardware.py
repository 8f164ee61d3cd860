"""Chip and link specifications: frozen dataclasses with the SI unit in every field name.

A ``ChipSpec`` is one accelerator as the cost model sees it (peak FLOP/s per dtype, HBM size and
bandwidth). A ``LinkSpec`` is one class of link (ICI, NVLink, a NIC): its one-way bandwidth and its
per-hop latency; the bidirectional figure is derived, never stored. Validation lives here so every
constructor (YAML loader, tests, users) gets the same clear errors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from moeplan.units import DTYPE_BITS

_MATMUL_DTYPES = ("fp32", "tf32", "bf16", "fp16", "fp8", "mxfp8", "int8")


def _require_positive(owner: str, field: str, value: float | None, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{owner}.{field}: expected a positive number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{owner}.{field}: expected a positive finite number, got {value!r}")


@dataclass(frozen=True)
class ComputeEfficiency:
    """Achieved / peak for one chip family: the defaults a calibration profile replaces.

    ``matmul``: large dense matmuls at the matmul peak; ``attention``: fused attention kernels;
    ``memory``: streaming HBM traffic; ``matmul_tile``: the matrix-unit tile (rows and columns are
    padded to it, so a matmul of m rows runs at m / (ceil(m / tile) * tile) of the rate).
    """

    matmul: float = 0.75
    attention: float = 0.5
    memory: float = 0.85
    matmul_tile: int = 128
    source: str = "moeplan defaults (no family figures given)"
    kernel_overhead_s: float = 0.0  # fixed cost per kernel (launch, dispatch); calibration fits it

    def __post_init__(self) -> None:
        for name in ("matmul", "attention", "memory"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
                raise ValueError(f"efficiency.{name}: got {value!r}; expected a number in (0, 1]")
        if not (isinstance(self.kernel_overhead_s, int | float) and 0 <= self.kernel_overhead_s < 1):
            raise ValueError(f"efficiency.kernel_overhead_s: got {self.kernel_overhead_s!r}; expected 0 <= s < 1")
        if isinstance(self.matmul_tile, bool) or not isinstance(self.matmul_tile, int) or self.matmul_tile < 1:
            raise ValueError(f"efficiency.matmul_tile: got {self.matmul_tile!r}; expected an integer >= 1")


@dataclass(frozen=True)
class ChipSpec:
    """One accelerator. Peak rates are dense (no structured sparsity), per chip.

    ``peak_fp8_flop_per_s`` is None where the chip has no fp8 matmul unit; fp8 work then runs at
    the bf16 rate. ``peak_fp32_flop_per_s`` is the rate of fp32 matmuls as the framework runs them
    by default (TF32 tensor cores on NVIDIA, bf16 passes on TPU are *not* assumed).
    """

    name: str
    peak_bf16_flop_per_s: float
    peak_fp32_flop_per_s: float
    hbm_capacity_bytes: float
    hbm_bw_bytes_per_s: float
    peak_fp8_flop_per_s: float | None = None
    cores_per_chip: int = 1
    sm_count: int | None = None  # streaming multiprocessors (AMD: compute units); None on chips without them
    source: str = ""
    efficiency: ComputeEfficiency | None = None  # achieved / peak defaults for this family (cited)
    host_link: LinkSpec | None = None  # chip <-> host memory, one direction (activation offload); None: the PCIe
    # link of a switched cluster's scale-out section, or no offload where the family has neither

    def __post_init__(self) -> None:
        owner = f"chip {self.name!r}"
        if self.efficiency is None:
            object.__setattr__(self, "efficiency", ComputeEfficiency())
        for field in ("peak_bf16_flop_per_s", "peak_fp32_flop_per_s", "hbm_capacity_bytes", "hbm_bw_bytes_per_s"):
            _require_positive(owner, field, getattr(self, field))
        _require_positive(owner, "peak_fp8_flop_per_s", self.peak_fp8_flop_per_s, optional=True)
        if not isinstance(self.cores_per_chip, int) or self.cores_per_chip < 1:
            raise ValueError(f"{owner}.cores_per_chip: expected an integer >= 1, got {self.cores_per_chip!r}")
        if self.sm_count is not None and (isinstance(self.sm_count, bool) or not isinstance(self.sm_count, int)
                                          or self.sm_count < 1):
            raise ValueError(f"{owner}.sm_count: expected an integer >= 1 or none, got {self.sm_count!r}")

    def peak_flop_per_s(self, dtype: str) -> float:
        """Dense matmul peak for ``dtype``; fp8 falls back to bf16 where the chip has no fp8 unit."""
        if dtype not in _MATMUL_DTYPES:
            raise ValueError(f"dtype: {dtype!r} has no matmul rate; expected one of {list(_MATMUL_DTYPES)}")
        if dtype in ("fp8", "mxfp8", "int8"):
            return self.peak_fp8_flop_per_s or self.peak_bf16_flop_per_s
        if dtype in ("fp32", "tf32"):
            return self.peak_fp32_flop_per_s
        return self.peak_bf16_flop_per_s

    def ridge_flop_per_byte(self, dtype: str = "bf16") -> float:
        """Arithmetic intensity at which compute and HBM time are equal (the roofline ridge)."""
        return self.peak_flop_per_s(dtype) / self.hbm_bw_bytes_per_s


@dataclass(frozen=True)
class LinkSpec:
    """One class of link. ``bw_bytes_per_s`` is one direction of one logical link between two
    graph vertices (several physical lanes or links bundled, as the source states it)."""

    name: str
    bw_bytes_per_s: float
    latency_s: float
    source: str = ""

    def __post_init__(self) -> None:
        _require_positive(f"link {self.name!r}", "bw_bytes_per_s", self.bw_bytes_per_s)
        if isinstance(self.latency_s, bool) or not isinstance(self.latency_s, int | float):
            raise ValueError(f"link {self.name!r}.latency_s: expected a number >= 0, got {self.latency_s!r}")
        if not math.isfinite(self.latency_s) or self.latency_s < 0:
            raise ValueError(f"link {self.name!r}.latency_s: expected a finite number >= 0, got {self.latency_s!r}")

    @property
    def bidirectional_bw_bytes_per_s(self) -> float:
        return 2.0 * self.bw_bytes_per_s


assert set(_MATMUL_DTYPES) <= set(DTYPE_BITS)
