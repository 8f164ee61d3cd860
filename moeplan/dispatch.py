"""Expert-parallel dispatch kernels: how many copies of a token cross each link.

A token routed to ``top_k`` of ``num_experts`` experts, the experts spread evenly over ``n`` ranks on
``nodes`` nodes of ``per_node`` ranks each. Kernels (``KERNELS``):

* ``"nccl"``: an all-to-all of one copy per (token, expert) (Megatron's all-to-all dispatcher):
  the send buffer is ``top_k`` copies; ``collectives`` times it as a plain all_to_all.
* ``"deepep_ll"``: DeepEP's low-latency kernels, one message per (token, expert) straight to the
  expert's rank (IBGDA, no proxy thread): the all-to-all's bytes at the links' large-message efficiency
  after a fixed kernel latency.
* ``"deepep_normal"``: DeepEP's normal kernels send a token once per destination node over the
  network, to the GPU on the sender's rail there, which forwards it over NVLink once per destination
  GPU; inside the sender's own node, once per destination GPU (DeepEP README, "normal kernels";
  DeepSeek-V3 report section 3.2.2).
* ``"hybridep"``: NVIDIA's HybridEP (DeepEP branch hybrid-ep; Megatron-Core's flex dispatcher with backend
  hybridep): the same copies as ``deepep_normal`` (TMA copies inside the NVLink domain, RDMA between
  domains), with its own SM budget and per-SM copy rate.

The normal-style kernels copy on a budget of SMs (``KERNEL_SMS``), each SM spending a fixed time per
(token, expert) copy plus the copy's bytes at its own rate (``SM_COPY``), so a kernel on few SMs runs below
the links on NVLink5 (the HybridEP README's B200 table: DeepEP's dispatch at 16 SMs moves about half of what
it moves at 48, and an FP8 token, half a BF16 one's bytes, takes 70 % of its time). While such a kernel
overlaps compute, its SMs are not computing (``sm_share``).

Routing is uniform: every k-subset of experts equally likely. Node-limited routing (DeepSeek-V3: at most
``max_nodes`` = 4 nodes per token) is modelled as ``max_nodes`` nodes drawn uniformly, then the k
experts uniformly among theirs. Expectations are exact (hypergeometric), so an enumeration of every
routing reproduces them (``linksim.simulate_dispatch``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

KERNELS = ("nccl", "deepep_normal", "deepep_ll", "hybridep")
NORMAL_KERNELS = ("deepep_normal", "hybridep")  # once per remote node, NVLink fan-out, copied on a budget of SMs
# SMs a communication kernel's blocks hold while it runs, by default:
# - nccl: 16 channels (one block each): NCCL's log on an 8-GPU H800 node, "16 coll channels, 16 p2p channels"
#   (NVIDIA/nccl issue #892); NCCL 2.28.3's release notes cap Blackwell at 16 CTAs ("SM overhead is decreased
#   by 50%"). Transformer Engine's tensor-parallel overlap also takes 16 (pytorch/module/base.py, num_sm 16).
# - deepep_normal: 20 (DeepEP V1 deep_ep/buffer.py @567632dd, Buffer.num_sms = 20; Megatron-Core's
#   moe_deepep_num_sms default 20, transformer_config.py @91fcdfe4).
# - deepep_ll: none: hook-based, "does not occupy any SM resource" (DeepEP V1 README @567632dd).
# - hybridep: 32, as NVIDIA-NeMo/Megatron-Bridge's performance recipes set it for every HybridEP run
#   (src/megatron/bridge/perf_recipes/_common.py, _benchmark_common, and scripts/performance/utils/overrides.py
#   @067f987), the runs of its published tables; the library's own default is lower (DeepEP hybrid-ep
#   @94a9f8f6 csrc/hybrid_ep/config.cuh: 24 inside an NVLink domain, 8 across).
KERNEL_SMS = {"nccl": 16, "deepep_normal": 20, "deepep_ll": 0, "hybridep": 32}
# Per SM, the normal-style kernels' fixed time per (token, expert) copy (s) and copy rate (bytes/s), fitted to the
# SM-swept rows of the points SM_COPY_FITTED_TO names (validation.fit_sm_copy): the HybridEP README's B200 table
# (A5), DeepEP's normal kernels at 16-48 SMs (timed through its torch API), HybridEP's kernel-only rows at 16 SMs
# (FP8 and BF16 tokens). No Hopper table sweeps SMs: these B200 figures serve every GPU.
SM_COPY = {"deepep_normal": (2.07e-7, 21.7e9), "hybridep": (6.0e-8, 54e9)}
SM_COPY_FITTED_TO = {"deepep_normal": ("A5",), "hybridep": ("A5",)}
# An FP8-dispatched token carries one fp32 scale per 128 channels (DeepSeek-V3 report 3.3.1, 1 x 128 tiles):
# 4 / 128 bytes per value on top of its one byte.
FP8_SCALE_BYTES_PER_VALUE = 4.0 / 128.0


@dataclass(frozen=True)
class ExpertRouting:
    """What a dispatch kernel needs to know of the routing: experts, experts per token, node limit."""

    num_experts: int
    top_k: int
    max_nodes: int | None = None  # node-limited routing: a token reaches at most this many nodes
    token_bytes: float | None = None  # one copy's bytes; None: the normal kernels' per-copy SM time is left out

    def __post_init__(self) -> None:
        for name in ("num_experts", "top_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"experts.{name}: got {value!r}; expected an integer >= 1")
        if self.top_k > self.num_experts:
            raise ValueError(f"experts.top_k: got {self.top_k}; expected at most num_experts ({self.num_experts})")
        if self.max_nodes is not None and (isinstance(self.max_nodes, bool) or not isinstance(self.max_nodes, int)
                                           or self.max_nodes < 1):
            raise ValueError(f"experts.max_nodes: got {self.max_nodes!r}; expected an integer >= 1 or None")
        if self.token_bytes is not None and (isinstance(self.token_bytes, bool) or not isinstance(
                self.token_bytes, int | float) or not 0 < self.token_bytes < 1e9):
            raise ValueError(f"experts.token_bytes: got {self.token_bytes!r}; expected a positive number or None")


@dataclass(frozen=True)
class Copies:
    """Expected copies of one token per link class, sent by its rank (and, forwarded, by relays)."""

    network: float  # over the sender's NIC: one per remote destination node (deepep_normal)
    nvlink: float  # over a GPU's NVLink egress: local destinations plus forwards, per token of that GPU


def _selected(routing: ExpertRouting, nodes: int, experts_in_unit: float) -> float:
    """P(a given unit holding ``experts_in_unit`` experts receives at least one of a token's k experts)."""
    e, k = routing.num_experts, routing.top_k
    reach = nodes if routing.max_nodes is None else min(routing.max_nodes, nodes)
    pool = e * reach // nodes  # the experts of the nodes a token may reach
    if k > pool:
        raise ValueError(f"experts.max_nodes: {reach} nodes hold {pool} experts; expected at least top_k ({k})")
    return reach / nodes * (1.0 - math.comb(pool - int(experts_in_unit), k) / math.comb(pool, k))


def normal_copies(routing: ExpertRouting, nodes: int, per_node: int) -> Copies:
    """deepep_normal: expected copies per token (module docstring).

    p_node, p_gpu: the chance a given node, GPU, receives the token. Network: (nodes - 1) p_node remote
    nodes. NVLink: a GPU sends its own tokens to (per_node - 1) p_gpu other GPUs of its node, and forwards
    each token relayed to it (p_node from each of the nodes - 1 senders on its rail) to the other selected
    GPUs of its node, (per_node - 1) p_gpu / p_node of them: nodes (per_node - 1) p_gpu in all.
    """
    n = nodes * per_node
    if routing.num_experts % n:
        raise ValueError(f"experts.num_experts: got {routing.num_experts}; expected a multiple of the {n} ranks")
    p_node = _selected(routing, nodes, routing.num_experts / nodes)
    p_gpu = _selected(routing, nodes, routing.num_experts / n)
    return Copies(network=(nodes - 1) * p_node, nvlink=nodes * (per_node - 1) * p_gpu)


def kernel_sms(kernel: str, sms: int | None = None) -> int:
    """SMs ``kernel`` runs on: ``sms`` where given, else its default (``KERNEL_SMS``)."""
    return KERNEL_SMS[kernel] if sms is None else sms


def sm_share(kernel: str, sm_count: int | None, sms: int | None = None) -> float:
    """The fraction of the chip's SMs ``kernel`` holds while it runs; 0 where the chip family states no SM
    count (the TPUs, the CPU host): no share is taken there."""
    if not sm_count:
        return 0.0
    return min(1.0, kernel_sms(kernel, sms) / sm_count)


def sm_copy_s(kernel: str, size, experts: ExpertRouting, sms: int, figures: dict | None = None):
    """The time ``kernel``'s ``sms`` SMs take to copy a send buffer of ``size`` bytes (one copy per (token,
    expert)): per copy a fixed time plus its bytes at the per-SM rate (``figures``, default ``SM_COPY``);
    without the routing's ``token_bytes`` only the bytes; 0 for a kernel without figures (no SM limit)."""
    figures = SM_COPY if figures is None else figures
    if kernel not in figures:
        return 0.0
    fixed_s, rate = figures[kernel]
    copies = size / experts.token_bytes if experts.token_bytes else 0.0
    return (copies * fixed_s + size / rate) / sms
