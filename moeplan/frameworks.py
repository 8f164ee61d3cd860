"""Framework presets: how a training framework runs a step by default, as the estimate's knobs.

``estimate(..., framework="megatron")`` sets the overlap policy, the expert dispatch kernel and the
attention kernel the way that framework does out of the box; an explicit ``overlap=`` or
``dispatch=`` still wins. Without a framework the estimate uses Megatron-Core's defaults.

Expert permutation (``permute``, ``PERMUTES``): ``"gather"`` sorts or gathers the routed copies into
per-expert groups (memory-bound: Megatron's permute, DeepEP, MaxText's megablox path). ``"einsum"`` builds
them, in layers with a capacity factor, with one-hot dispatch and combine einsums on the matrix unit,
capacity-padded (GShard; MaxText's dropping path, ``sparse_matmul: False``): per sequence of S tokens the
dispatch is an [E C, S] x [S, d] matmul and the combine an [S, E C] x [E C, d] one, C = ceil(S k cf / E)
slots per expert. Dropless layers gather either way; under "einsum" their experts run as MaxText runs them,
megablox's grouped matmul (``MEGABLOX_TILE_ROWS``): it walks the tokens, sorted by expert, in row tiles and
visits a tile once for each expert it holds, so every boundary between experts inside a tile costs one more
tile of work (jax.experimental.pallas.ops.tpu.megablox gmm, make_group_metadata).

Attention kernels: ``"flash"`` (FlashAttention-style: scores never reach HBM, causal blocks skipped)
or ``"unfused"`` (the scores are written to HBM: QK^T, a fused scale-mask-softmax, dropout, then AV,
as Megatron-LM ran before FlashAttention; Korthikanti et al. 2022 section 4.1 sizes these buffers).
"""

from __future__ import annotations

from dataclasses import dataclass

ATTENTION_KERNELS = ("flash", "unfused")
# Pipeline send/receive overlap (under an overlapping policy): "interleaved" only with virtual pipeline stages
# (Megatron-Core: its non-interleaved 1F1B schedule raises 'Non-interleaved pipeline parallelism does not
# support overlapping p2p communication', megatron/core/pipeline_parallel/schedules.py); "always" (XLA's async
# collective-permute between MaxText's stages; DualPipe's bidirectional schedule).
P2P_OVERLAPS = ("interleaved", "always")
PERMUTES = ("gather", "einsum")
MEGABLOX_TILE_ROWS = 512  # MaxText's default row tile (tile_batch_seq, MoEKernels in its configs/types.py)


@dataclass(frozen=True)
class Framework:
    name: str
    overlap: str  # estimate.OVERLAPS
    dispatch: str  # dispatch.KERNELS
    attention: str  # ATTENTION_KERNELS
    source: str
    permute: str = "gather"  # PERMUTES
    master_weights: bool = True  # mixed precision: 16-bit weights and a separate fp32 master copy (Megatron's
    # Float16Module + optimizer); False: the weights themselves stay fp32 and are cast for compute (MaxText)
    p2p_overlap: str = "interleaved"  # P2P_OVERLAPS: when pipeline sends hide behind other micro-batches


FRAMEWORKS = {
    "megatron": Framework(
        "megatron", "dp", "nccl", "flash",
        "Megatron-Core MoE guide: --overlap-grad-reduce and --overlap-param-gather, the alltoall token dispatcher, "
        "Transformer Engine's fused (flash) attention; tensor-parallel and expert all-to-alls on the critical path; "
        "pipeline sends overlap only in the interleaved schedule (schedules.py)"),
    "megatron-2022": Framework(
        "megatron-2022", "none", "nccl", "unfused",
        "Megatron-LM as measured by Korthikanti et al. 2022 (arXiv 2205.05198): scaled-masked-softmax kernel with "
        "the scores in HBM (FlashAttention came later), blocking pipeline send/receive, no overlap of the "
        "data-parallel reduction"),
    "maxtext": Framework(
        "maxtext", "dp", "nccl", "flash",
        "MaxText base.yml: XLA's async collectives overlap the data-parallel and FSDP traffic; splash (flash) "
        "attention on TPU; MoE all-to-alls on the critical path. MoE (docs/reference moe_configuration, "
        "layers/moe.py): dropless layers run megablox grouped matmuls (sparse_matmul: True); a capacity factor "
        "needs the dense path (sparse_matmul: False), whose generate_masks gives each expert a capacity per "
        "sequence and moves tokens by the einsums 'BSM,BSEC->EBCM' and 'EBCM,BSEC->BSM'. Weights: base.yml "
        "weight_dtype float32 (the parameters themselves fp32, cast to the compute dtype; no master copy)",
        permute="einsum", master_weights=False, p2p_overlap="always"),
    "dualpipe": Framework(
        "dualpipe", "full", "deepep_normal", "flash",
        "DeepSeek-V3 report section 3.2.1 (DualPipe overlaps one micro-batch's all-to-all with another's compute) "
        "and DeepEP's normal kernels for training", p2p_overlap="always"),
}


def framework(name: str) -> Framework:
    try:
        return FRAMEWORKS[name]
    except (KeyError, TypeError):
        raise ValueError(f"framework: got {name!r}; expected one of {sorted(FRAMEWORKS)}") from None
