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


# Fused attention's time per score element on a GPU: its matmuls (forward 4 d FLOPs, backward 10 d for head dim d)
# plus a fixed cost per element that the head dim does not change (the softmax: an exponential per element, which at
# the 16 per clock per SM of H100's special-function units, 4.2e12/s, is the fitted forward cost to 2 %). Fitted to
# FlashAttention-3's H100 SXM5 BF16 charts (Shah et al. 2024, arXiv 2407.08608, Figs. 5-6, sequence 16k,
# non-causal): forward 497 and 648 TFLOP/s at head dims 64 and 128 (which predict 764 at 256, measured 756),
# backward 474 and 561 at 64 and 128. In units of one head dim's matmul work the fixed cost is 56 forward and 29
# backward; a training step's forward and backward together: 35. The families' attention efficiencies are quoted
# at head dim 128, so in training time per FLOP scales by (d + 35) / d * 128 / (128 + 35): 1.21 at 64, 0.96 at the
# 160 of DeepSeek's MLA (192 for q.k, 128 for values), 0.91 at 256; a forward alone (inference) by the same with
# 56: 1.30 at 64. GPUs only (chips with SMs):
# no TPU chart by head dim is published, and Switch Transformers' TPU v3 table (64-wide heads) fits the
# head-dim-free efficiency (tests/test_estimate.py).
SOFTMAX_HEAD_DIMS = {"train": 35.0, "forward": 56.0}
REFERENCE_HEAD_DIM = 128
FA3_H100_TFLOPS = {"forward": {64: 497.0, 128: 648.0, 256: 756.0}, "backward": {64: 474.0, 128: 561.0}}


def attention_head_factor(qk_dim, v_dim, softmax_head_dims: float = SOFTMAX_HEAD_DIMS["train"]) -> float:
    """Time per attention FLOP at these head dims against the 128-wide heads the efficiencies are quoted at: the
    softmax's fixed cost per score element (``softmax_head_dims`` of matmul work) weighs more on narrow heads."""
    width = (qk_dim + v_dim) / 2.0
    return (width + softmax_head_dims) / width * REFERENCE_HEAD_DIM / (REFERENCE_HEAD_DIM + softmax_head_dims)


def attention_time_s(flops, nbytes, chip: ChipSpec, dtype: str, eff: ComputeEfficiency,
                     head_dims: tuple[int, int] = (REFERENCE_HEAD_DIM, REFERENCE_HEAD_DIM), training: bool = True):
    """Fused attention (scores and values) with (q.k, value) ``head_dims``: its own efficiency, on GPUs scaled by
    ``attention_head_factor`` (a training step's forward and backward, else a forward alone), or HBM-bound."""
    softmax = SOFTMAX_HEAD_DIMS["train" if training else "forward"]
    factor = attention_head_factor(*head_dims, softmax) if chip.sm_count else 1.0
    return maximum(flops * factor / (chip.peak_flop_per_s(dtype) * eff.attention),
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

