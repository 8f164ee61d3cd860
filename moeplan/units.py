"""SI constants, dtype widths and the formatters used only at the edges (CLI, report, dashboard).

Inside moeplan every quantity is in bytes, seconds, FLOP, FLOP/s or bytes/s, and the unit is part
of the name (``hbm_bw_bytes_per_s``, ``link_latency_s``). Decimal prefixes (GB = 1e9 B) are used
for rates and capacities as vendors publish them; binary prefixes (GiB = 2**30 B) only where a
source says GiB. Dtype widths are kept in bits and divided by 8.0 where bytes are needed, so a
4-bit type is 0.5 bytes, never 0.
"""

from __future__ import annotations

import math
import re

KILO = 1e3
MEGA = 1e6
GIGA = 1e9
TERA = 1e12
PETA = 1e15

KIB = 2**10
MIB = 2**20
GIB = 2**30

GBIT_PER_S_IN_BYTES_PER_S = 1e9 / 8.0  # 400 Gb/s NIC = 400 * 1.25e8 = 5e10 bytes/s

DTYPE_BITS: dict[str, int] = {
    "fp32": 32,
    "tf32": 32,  # stored in 32 bits; computed at the TF32 tensor-core rate
    "bf16": 16,
    "fp16": 16,
    "fp8": 8,
    "mxfp8": 8,  # 8-bit elements; the shared 8-bit scale per 32 elements is ignored (0.25 bit/element)
    "int8": 8,
    "int4": 4,
    "fp4": 4,
}


def dtype_bytes(dtype: str) -> float:
    """Bytes per element of ``dtype`` (bits / 8.0; a 4-bit type is 0.5)."""
    try:
        return DTYPE_BITS[dtype] / 8.0
    except KeyError:
        raise ValueError(f"dtype: unknown value {dtype!r}; expected one of {sorted(DTYPE_BITS)}") from None


_PREFIXES = [(PETA, "P"), (TERA, "T"), (GIGA, "G"), (MEGA, "M"), (KILO, "k")]


def _fmt_decimal(value: float, unit: str, digits: int = 3) -> str:
    if not math.isfinite(value):
        return f"{value} {unit}"
    for scale, prefix in _PREFIXES:
        if abs(value) >= scale:
            return f"{value / scale:.{digits}g} {prefix}{unit}"
    return f"{value:.{digits}g} {unit}"


def fmt_bytes(num_bytes: float) -> str:
    """Decimal bytes: 3.35e12 -> '3.35 TB'."""
    return _fmt_decimal(num_bytes, "B")


def fmt_gib(num_bytes: float) -> str:
    """Memory held, in binary units as HBM is sized: 8.589935e10 -> '80.0 GiB'."""
    return f"{num_bytes / GIB:,.1f} GiB"


def fmt_rate(bytes_per_s: float) -> str:
    """Decimal bytes per second: 4.5e11 -> '450 GB/s'."""
    return _fmt_decimal(bytes_per_s, "B/s")


def fmt_flops(flop_per_s: float) -> str:
    """FLOP/s: 9.89e14 -> '989 TFLOP/s'."""
    return _fmt_decimal(flop_per_s, "FLOP/s")


def fmt_time(seconds: float) -> str:
    """Seconds with the nearest of s, ms, us, ns: 1.2e-5 -> '12 us'."""
    if not math.isfinite(seconds):
        return f"{seconds} s"
    for scale, unit in [(1.0, "s"), (1e-3, "ms"), (1e-6, "us")]:
        if abs(seconds) >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


_SHAPE_RE = re.compile(r"^\s*\d+(\s*[xX]\s*\d+)*\s*$")


def parse_shape(text: str) -> tuple[int, ...]:
    """'4x4x8' -> (4, 4, 8); a clear ValueError for anything else."""
    if not _SHAPE_RE.match(text):
        raise ValueError(f"shape: {text!r} is not a shape; expected positive integers joined by 'x', e.g. 4x4x8")
    shape = tuple(int(part) for part in re.split(r"[xX]", text))
    if any(n <= 0 for n in shape):
        raise ValueError(f"shape: {text!r} has a non-positive axis; expected every axis >= 1")
    return shape
