"""Layout: how a model is spread over devices (data / fsdp / expert / context / tensor / pipeline), and checks.

devices = data x fsdp x context x tensor x pipeline. Expert parallelism folds into the other axes, as in
Megatron-Core's parallel folding and MaxText's expert axis: ``expert`` divides data x fsdp x
tensor and takes the innermost devices of that block (tensor first, then fsdp, then data), so an
expert group sits on the fastest links. Non-expert layers shard the batch over data x fsdp and
their weights over fsdp x tensor x pipeline; expert weights are sharded over the expert group,
then over whatever part of fsdp the expert group does not already cover.

Expert-tensor parallelism (``expert_tensor``, Megatron-Core's ``--expert-tensor-parallel-size``) splits
each expert's FFN width over ``expert_tensor`` devices, innermost: an expert group is then ``expert``
such sets of ``expert_tensor`` devices (ids strided by ``expert_tensor``), and ``expert x expert_tensor``
divides data x fsdp x tensor. The tokens a set's devices receive are all-gathered inside the set before
the expert FFN and reduce-scattered after it. ``expert_tensor = 1`` (the default, Megatron's for
fine-grained MoE) keeps whole experts on a device.

Pipeline stages split the layers evenly (``ceil(L / (p v))`` per chunk) unless ``first_stage_layers`` or
``last_stage_layers`` is set (Megatron-Core's ``--decoder-first/last-pipeline-num-layers``): those stages
take that many layers and the others share the rest equally; the first stage also holds the input
embedding, the last the output layer.

Context parallelism (``context``, Megatron-Core's ``--context-parallel-size``) splits every sequence over
``context`` devices (each holds seq / context tokens, load-balanced for causal attention); attention
gathers the keys and values of the whole sequence over the context group (reduce-scatters their gradients
in the backward pass), and weights are replicated over it, so gradients are also reduced over it.

The logical mesh, outermost axis first, is (pipeline, data, fsdp, context, tensor): weights shard inside the
replicas, as MaxText's mesh (data outermost, with its DCN part across slices) and PyTorch's hybrid
sharding (shard inside a node, replicate across) place them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from moeplan import bounds
from moeplan.arrays import gcd, maximum, where
from moeplan.moe import MoEModel
from moeplan.topology import Topology

RECOMPUTE = ("none", "selective", "full", "offload", "offload_projections", "offload_inputs")
# The policies that move activations to host memory, with the tensors each moves (MaxText's custom remat names;
# None: every activation a layer stores). What is not moved is recomputed, except under "offload".
OFFLOADED_TENSORS = {"offload": None,
                     "offload_projections": ("decoder_layer_input", "query_proj", "key_proj", "value_proj",
                                             "out_proj"),
                     "offload_inputs": ("decoder_layer_input",)}
OFFLOADS = tuple(OFFLOADED_TENSORS)
assert RECOMPUTE[-len(OFFLOADS):] == OFFLOADS  # _offloads reads an index past the others as an offload
_INT_FIELDS = ("data", "fsdp", "expert", "expert_tensor", "tensor", "context", "pipeline", "virtual_pipeline",
               "micro_batch_size", "first_stage_layers", "last_stage_layers", "gradient_bytes")
_FLAGS = ("sequence_parallel", "shard_optimizer", "quantized_gather")


@dataclass(frozen=True)
class Layout:
    data: int = 1
    fsdp: int = 1
    expert: int = 1
    tensor: int = 1
    pipeline: int = 1
    virtual_pipeline: int = 1
    expert_tensor: int = 1  # devices one expert's FFN width is split over (expert-tensor parallelism)
    context: int = 1  # devices one sequence is split over (context parallelism)
    micro_batch_size: int = 1  # sequences per micro-batch on one batch shard (one data x fsdp rank)
    first_stage_layers: int = 0  # layers on the first pipeline stage (0: an even split)
    last_stage_layers: int = 0  # layers on the last pipeline stage (0: an even split)
    recompute: str = "selective"  # activation recomputation: none | selective (attention) | full | offload |
    # offload_projections | offload_inputs. "offload": nothing recomputed, every stored activation moved to host
    # memory and back (MaxText remat_policy minimal_offloaded, Megatron-Core --cpu-offloading);
    # "offload_projections": the layer input and the q/k/v/out projections in host memory, the rest recomputed;
    # "offload_inputs": a full recompute whose layer inputs wait in host memory (both MaxText's custom remat
    # policy with those tensors set to offload, as its large MoE recipes run)
    sequence_parallel: bool = True  # Megatron SP: norms/dropout sharded over tensor, AG/RS instead of AR
    shard_optimizer: bool = True  # distributed optimizer (ZeRO-1): Adam states split over the data replicas
    # How the data-parallel traffic is encoded. gradient_bytes: per gradient value, in the sync and in memory: 4
    # (fp32, Megatron-Core's default) or 2 (bf16: MaxText's grad_dtype=bfloat16, Megatron-Core's
    # --grad-reduce-in-bf16). quantized_gather: under an 8-bit dtype FSDP gathers 8-bit weights (1 byte each,
    # quantized once on the shard) instead of 16-bit ones: MaxText's quantized all-gather (qwix fp8 with fixed
    # weight calibration), Megatron-Core's --fp8-param-gather, torchao's enable_fsdp_float8_all_gather
    gradient_bytes: int = 4
    quantized_gather: bool = False

    def __post_init__(self) -> None:
        for name in _INT_FIELDS:  # documented ranges (bounds.py)
            bounds.check_int(f"layout.{name}", getattr(self, name), *bounds.LAYOUT[name])
        for name in _FLAGS:
            bounds.check_bool(f"layout.{name}", getattr(self, name))
        if self.gradient_bytes not in (2, 4):
            raise ValueError(f"layout.gradient_bytes: got {self.gradient_bytes}; expected 2 (bf16) or 4 (fp32)")
        if not isinstance(self.recompute, str) or self.recompute not in RECOMPUTE:
            raise ValueError(f"layout.recompute: got {self.recompute!r}; expected one of {list(RECOMPUTE)}")
        _first_broken(SHAPE_RULES, Fields(vars(self), None), None)
        for name in ("first_stage_layers", "last_stage_layers"):
            if getattr(self, name) and (self.pipeline == 1 or self.virtual_pipeline > 1):
                raise ValueError(f"layout.{name}: got {getattr(self, name)}; an uneven split needs pipeline > 1 "
                                 "and virtual_pipeline = 1")

    @property
    def devices(self) -> int:
        return self.data * self.fsdp * self.context * self.tensor * self.pipeline

    @property
    def batch_shards(self) -> int:
        """Ways the batch is split in non-expert layers (data x fsdp)."""
        return self.data * self.fsdp

    @property
    def batch_block(self) -> int:
        return self.data * self.fsdp * self.context * self.tensor

    @property
    def expert_weight_shards(self) -> int:
        """Ways one MoE layer's expert weights are split (pipeline stages aside)."""
        return int(expert_weight_shards(self.expert * self.expert_tensor, self.context * self.tensor, self.fsdp))

    @property
    def dense_weight_shards(self) -> int:
        return self.fsdp * self.tensor

    @classmethod
    def parse(cls, text: str) -> Layout:
        """'expert=8,fsdp=16,recompute=full' -> Layout; unknown keys and bad values are errors."""
        kwargs: dict = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, sep, value = part.partition("=")
            key = key.strip()
            flags = _FLAGS
            if not sep or key not in _INT_FIELDS + ("recompute",) + flags:
                raise ValueError(f"layout: {part!r}; expected key=value with key in "
                                 f"{list(_INT_FIELDS) + ['recompute', *flags]}")
            if key == "recompute":
                kwargs[key] = value.strip()
            elif key in flags:
                if value.strip().lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(f"layout.{key}: got {value!r}; expected true or false")
                kwargs[key] = value.strip().lower() in ("1", "true", "yes")
            else:
                try:
                    kwargs[key] = int(value)
                except ValueError:
                    raise ValueError(f"layout.{key}: got {value!r}; expected an integer") from None
        return cls(**kwargs)


# ------------------------------------------------------------------ validity: one table of rules
@dataclass(frozen=True)
class Rule:
    """One validity rule of a layout, written once over numbers or arrays: ``holds(f, topo)`` is a bool (one
    layout) or a bool array (a search grid), ``f`` reading the layout's degrees and the model's fields;
    ``expected(f, topo)`` is the error a single layout that breaks it gets (the field first)."""

    holds: Callable[[Any, Any], Any]
    expected: Callable[[Any, Any], str]


class Fields:
    """Attributes from ``degrees`` (a layout's fields, or a grid's knob arrays), else from ``model``."""

    def __init__(self, degrees: Mapping, model) -> None:
        self.__dict__.update(degrees)
        self._model = model

    def __getattr__(self, name: str):
        return getattr(self.__dict__["_model"], name)


def _block(f):
    return f.data * f.fsdp * f.context * f.tensor


def _offloads(f):
    """Whether the layout offloads activations: ``recompute`` is a name in a Layout, an index in a grid."""
    r = f.recompute
    if isinstance(r, str):
        return r in OFFLOADS
    return r >= RECOMPUTE.index(OFFLOADS[0])  # the offload policies close the list


# What a layout must satisfy on its own (Layout refuses to exist otherwise).
SHAPE_RULES = (
    Rule(lambda f, _: _block(f) % f.expert == 0,
         lambda f, _: f"layout.expert: got {f.expert}; expected a divisor of data x fsdp x context x tensor = "
                      f"{_block(f)}"),
    Rule(lambda f, _: _block(f) % (f.expert * f.expert_tensor) == 0,
         lambda f, _: f"layout.expert_tensor: got {f.expert_tensor}; expected expert x expert_tensor = "
                      f"{f.expert * f.expert_tensor} to divide data x fsdp x context x tensor = {_block(f)}"),
    Rule(lambda f, _: (f.virtual_pipeline == 1) | (f.pipeline > 1),
         lambda f, _: "layout.virtual_pipeline: expected 1 without pipeline parallelism"),
)

# What a layout must satisfy to run a model on a topology.
MODEL_RULES = (
    Rule(lambda f, topo: f.data * f.fsdp * f.context * f.tensor * f.pipeline == topo.num_devices,
         lambda f, topo: f"layout: data x fsdp x context x tensor x pipeline = {f.data} x {f.fsdp} x {f.context} x "
                         f"{f.tensor} x {f.pipeline} = {f.data * f.fsdp * f.context * f.tensor * f.pipeline} "
                         f"devices; expected the {topo.num_devices} of {topo.name}"),
    Rule(lambda f, _: (f.context == 1) | (f.seq_len % (2 * f.context) == 0),
         lambda f, _: f"layout.context: got {f.context}; expected 2 x context to divide seq_len ({f.seq_len}): each "
                      "device holds two chunks of every sequence, for causal balance"),
    Rule(lambda f, _: f.num_experts % f.expert == 0,
         lambda f, _: f"layout.expert: got {f.expert}; expected a divisor of num_experts ({f.num_experts})"),
    Rule(lambda f, _: (f.n_heads % f.tensor == 0) & ((f.n_kv_heads % f.tensor == 0) | (f.tensor % f.n_kv_heads == 0)),
         lambda f, _: f"layout.tensor: got {f.tensor}; expected a divisor of n_heads ({f.n_heads}) that divides or is "
                      f"divided by n_kv_heads ({f.n_kv_heads})"),
    Rule(lambda f, _: f.pipeline * f.virtual_pipeline <= f.n_layers,
         lambda f, _: f"layout.pipeline: {f.pipeline} x virtual {f.virtual_pipeline} stages; expected at most "
                      f"n_layers ({f.n_layers})"),
    Rule(lambda f, _: f.d_ff % f.tensor == 0,
         lambda f, _: f"layout.tensor: got {f.tensor}; expected a divisor of d_ff ({f.d_ff})"),
    Rule(lambda f, _: f.expert_d_ff % f.tensor == 0,
         lambda f, _: f"layout.tensor: got {f.tensor}; expected a divisor of expert_d_ff ({f.expert_d_ff})"),
    Rule(lambda f, _: (f.expert_tensor == 1) | ((f.num_experts > 1) & (f.expert_d_ff % f.expert_tensor == 0)),
         lambda f, _: f"layout.expert_tensor: got {f.expert_tensor}; expected a divisor of expert_d_ff "
                      f"({f.expert_d_ff}) in a model with routed experts ({f.num_experts})"),
    Rule(lambda f, topo: where(_offloads(f), topo.host_link is not None, True),
         lambda f, topo: f"layout.recompute: got {f.recompute!r}; {topo.family} states no link to host memory (a "
                         "chip host_link or a scale-out PCIe link); expected none, selective or full"),
)


def _first_broken(rules, fields, topo) -> None:
    for rule in rules:
        if not rule.holds(fields, topo):
            raise ValueError(rule.expected(fields, topo))


def rules_hold(rules, fields, topo):
    """Every rule at once: a bool, or a bool array over a grid."""
    ok = True
    for rule in rules:
        ok = ok & rule.holds(fields, topo)
    return ok


def check_layout(model: MoEModel, topo: Topology, layout: Layout) -> None:
    """Raise a ValueError naming the field when the layout cannot run this model on this topology (the first
    of MODEL_RULES it breaks, then the uneven pipeline split)."""
    _first_broken(MODEL_RULES, Fields(vars(layout), model), topo)
    _check_stages(model.n_layers, layout)


def expert_weight_shards(expert, tensor, fsdp):
    """Ways expert weights are split: over the expert group (``expert`` devices: the expert degree times the
    expert-tensor degree), then over the part of fsdp the group does not already cover (it fills the devices
    inside an fsdp rank first, ``tensor``: tensor x context, then fsdp). Integers or integer arrays."""
    cover = where(expert > tensor, expert // gcd(expert, tensor), 1)
    return expert * (fsdp // gcd(fsdp, maximum(cover, 1)))


def _check_stages(n_layers: int, layout: Layout) -> None:
    first, last, p = layout.first_stage_layers, layout.last_stage_layers, layout.pipeline
    if not (first or last):
        return
    others = p - (first > 0) - (last > 0)
    rest = n_layers - first - last
    if rest < others or (others and rest % others) or (not others and rest):
        raise ValueError(f"layout.first_stage_layers / last_stage_layers: {first} and {last} of {n_layers} layers "
                         f"leave {rest} for the other {others} stages; expected an equal whole number (at least 1) "
                         "each")


def stage_layers(n_layers, pipeline, virtual, first, last):
    """Layers on the (first, each middle, last) pipeline stage of a device (every chunk of it with virtual
    stages). Even split: ``ceil(L / (p v))`` per chunk on every stage; with ``first`` or ``last`` set (> 0) those
    stages hold that many and the others share the rest. Integers or integer arrays."""
    even = -(-n_layers // (pipeline * virtual)) * virtual
    has_first, has_last = first > 0, last > 0
    others = pipeline - has_first - has_last
    middle = where(others > 0, (n_layers - first - last) / maximum(others, 1), 0)
    uneven = has_first | has_last
    return (where(uneven, where(has_first, first, middle), even), where(uneven, middle, even),
            where(uneven, where(has_last, last, middle), even))
