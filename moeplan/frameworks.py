"""Framework presets: how a training framework runs a step by default, as the estimate's knobs.

``estimate(..., framework="megatron")`` sets the overlap policy, the expert dispatch kernel and the
attention kernel the way that framework does out of the box; an explicit ``overlap=`` or
``dispatch=`` still wins. Without a framework the estimate uses Megatron-Core's defaults.

Attention kernels: ``"flash"`` (FlashAttention-style: scores never reach HBM, causal blocks skipped)
or ``"unfused"`` (the scores are written to HBM: QK^T, a fused scale-mask-softmax, dropout, then AV,
as Megatron-LM ran before FlashAttention; Korthikanti et al. 2022 section 4.1 sizes these buffers).
"""

from __future__ import annotations

from dataclasses import dataclass

ATTENTION_KERNELS = ("flash", "unfused")


@dataclass(frozen=True)
class Framework:
    name: str
    overlap: str  # estimate.OVERLAPS
    dispatch: str  # dispatch.KERNELS
    attention: str  # ATTENTION_KERNELS
    source: str


FRAMEWORKS = {
    "megatron": Framework(
        "megatron", "dp", "nccl", "flash",
        "Megatron-Core MoE guide: --overlap-grad-reduce and --overlap-param-gather, the alltoall token dispatcher, "
        "Transformer Engine's fused (flash) attention; tensor-parallel and expert all-to-alls on the critical path"),
    "megatron-2022": Framework(
        "megatron-2022", "none", "nccl", "unfused",
        "Megatron-LM as measured by Korthikanti et al. 2022 (arXiv 2205.05198): scaled-masked-softmax kernel with "
        "the scores in HBM (FlashAttention came later), blocking pipeline send/receive, no overlap of the "
        "data-parallel reduction"),
    "maxtext": Framework(
        "maxtext", "dp", "nccl", "flash",
        "MaxText base.yml: XLA's async collectives overlap the data-parallel and FSDP traffic; splash (flash) "
        "attention on TPU; MoE all-to-alls on the critical path"),
    "dualpipe": Framework(
        "dualpipe", "full", "deepep_normal", "flash",
        "DeepSeek-V3 report section 3.2.1 (DualPipe overlaps one micro-batch's all-to-all with another's compute) "
        "and DeepEP's normal kernels for training"),
}


def framework(name: str) -> Framework:
    try:
        return FRAMEWORKS[name]
    except (KeyError, TypeError):
        raise ValueError(f"framework: got {name!r}; expected one of {sorted(FRAMEWORKS)}") from None
