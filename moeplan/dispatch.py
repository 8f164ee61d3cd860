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

Routing is uniform: every k-subset of experts equally likely. Node-limited routing (DeepSeek-V3: at most
``max_nodes`` = 4 nodes per token) is modelled as ``max_nodes`` nodes drawn uniformly, then the k
experts uniformly among theirs. Expectations are exact (hypergeometric), so an enumeration of every
routing reproduces them (``linksim.simulate_dispatch``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

KERNELS = ("nccl", "deepep_normal", "deepep_ll")
# An FP8-dispatched token carries one fp32 scale per 128 channels (DeepSeek-V3 report 3.3.1, 1 x 128 tiles):
# 4 / 128 bytes per value on top of its one byte.
FP8_SCALE_BYTES_PER_VALUE = 4.0 / 128.0


@dataclass(frozen=True)
class ExpertRouting:
    """What a dispatch kernel needs to know of the routing: experts, experts per token, node limit."""

    num_experts: int
    top_k: int
    max_nodes: int | None = None  # node-limited routing: a token reaches at most this many nodes

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
