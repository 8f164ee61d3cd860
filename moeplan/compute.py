"""Roofline time of matmuls and memory-bound ops on one chip, with the family's efficiencies.

time = max(FLOPs / (peak * e_matmul * e_tile), bytes / (HBM bandwidth * e_memory)) + a fixed
per-kernel overhead (zero by default; calibration fits it), where
e_tile = m / (ceil(m / tile) * tile) * n / (ceil(n / tile) * tile) is the tile quantization of the
matrix unit (NVIDIA, "Matrix Multiplication Background" user's guide; the MXU's 128x128 or
256x256 array on TPUs): a grouped expert matmul of 40 tokens on a 128-row tile runs at 31 %.
Efficiencies come from the chip family's file (cited) unless a calibration profile passes its own.
All functions accept numpy arrays.
"""

from __future__ import annotations

from moeplan.arrays import maximum
from moeplan.hardware import ChipSpec, ComputeEfficiency
from moeplan.units import dtype_bytes


def tile_efficiency(rows, cols, tile: int):
    rows, cols = maximum(rows, 1.0), maximum(cols, 1.0)
    return rows / (-(-rows // tile) * tile) * cols / (-(-cols // tile) * tile)


def matmul_time_s(m, n, k, chip: ChipSpec, dtype: str, eff: ComputeEfficiency, count=1.0):
    """``count`` independent [m, k] x [k, n] matmuls (m tokens, n output features)."""
    flops = 2.0 * m * n * k * count
    nbytes = (1.0 * m * k + k * n + m * n) * (dtype_bytes(dtype) * count)
    rate = chip.peak_flop_per_s(dtype) * eff.matmul * tile_efficiency(m, n, eff.matmul_tile)
    return maximum(flops / rate, nbytes / (chip.hbm_bw_bytes_per_s * eff.memory)) + eff.kernel_overhead_s


def attention_time_s(flops, nbytes, chip: ChipSpec, dtype: str, eff: ComputeEfficiency):
    """Fused attention (scores and values): its own efficiency, or HBM-bound."""
    return maximum(flops / (chip.peak_flop_per_s(dtype) * eff.attention),
                   nbytes / (chip.hbm_bw_bytes_per_s * eff.memory))


def memory_time_s(nbytes, chip: ChipSpec, eff: ComputeEfficiency):
    return nbytes / (chip.hbm_bw_bytes_per_s * eff.memory) + eff.kernel_overhead_s

