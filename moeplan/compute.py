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


# Bytes moved per element to cast a 16-bit GEMM input to 8 bits: read it (2) and write the 8-bit copy (1); a
# training step writes a second, transposed copy (1) because the backward's weight-gradient GEMM needs the
# operand along the other axis: Hopper's FP8 tensor cores take only the TN layout, and MXFP8's 1x32 scaling
# blocks run along the reduction axis (Transformer Engine user guide, "Using FP8 with Transformer Engine" and
# its MXFP8 section: row-wise and column-wise copies). The scales (one per tensor, or one byte per 32 values)
# are left out.
QUANTIZE_BYTES_PER_ELEMENT = {"train": 4.0, "infer": 3.0}


def quantize_bytes(rows, forward_features, backward_features, training: bool):
    """Bytes one GEMM-bearing block moves to quantize its 8-bit GEMM inputs, per unit of forward compute:
    the forward casts its inputs (``rows`` x ``forward_features``); in training the backward also casts the
    output gradients (``rows`` x ``backward_features``), and the total is spread over the three forward
    units a training step counts (forward once, backward twice), so ``training_passes`` charges it once."""
    if not training:
        return QUANTIZE_BYTES_PER_ELEMENT["infer"] * rows * forward_features
    return QUANTIZE_BYTES_PER_ELEMENT["train"] * rows * (forward_features + backward_features) / 3.0

