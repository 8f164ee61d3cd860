"""The MoE transformer and its counting: parameters, FLOPs, bytes, tokens per expert. No hardware.

Notation (one table for the whole package): B batch (sequences), s sequence length, T tokens,
d d_model, h query heads, kv key/value heads, dh head dim, f dense FFN width, E experts,
k top-k, fe expert FFN width, L layers, V vocabulary. A matmul of [m, n] x [n, p] costs 2 m n p
FLOP. Gated FFNs (SwiGLU/GEGLU) have three d x f matrices, plain ones two.

Per token, forward (the convention moeplan's MFU uses, PaLM appendix B): 2 FLOP per matmul weight
the token touches (active weights) plus attention scores and values, ``4 s h dh`` per layer for
self-attention over the full sequence (no causal discount). Training = 3x forward.

Counting functions use arithmetic only (no branching on sizes), so they also take numpy arrays in
place of scalar fields: the layout search scores many models at once with the same formulas.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields, replace
from functools import cached_property
from pathlib import Path

import numpy as np

from moeplan import bounds
from moeplan.arrays import maximum, where
from moeplan.schema import Section, read_yaml_mapping, resolve_bundled

ATTENTION_KINDS = ("mha", "gqa", "mla")
_HERE = Path(__file__).resolve().parent
# An installed wheel carries the presets in moeplan/_models; a checkout keeps them in models/.
PRESET_DIR = next((p for p in (_HERE / "_models", _HERE.parent / "models") if p.is_dir()), _HERE.parent / "models")


@dataclass(frozen=True)
class MLADims:
    """DeepSeek multi-head latent attention dimensions, as DeepSeek publishes them."""

    q_lora_rank: int  # 0 = no query compression (DeepSeek-V2-Lite)
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int


@dataclass(frozen=True)
class MoEModel:
    """A decoder-only (or encoder-decoder) transformer with MoE FFNs. See the module notation."""

    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    vocab_size: int
    seq_len: int
    d_ff: int  # dense FFN width (dense layers); 0 when every layer is MoE
    num_experts: int
    top_k: int
    expert_d_ff: int
    num_shared_experts: int = 0
    moe_every: int = 1
    first_dense_layers: int = 0
    capacity_factor: float | None = 1.25  # None = dropless
    attention: str = "gqa"
    mla: MLADims | None = None
    encoder_decoder: bool = False
    gated_ffn: bool = True
    tied_embeddings: bool = False
    route_node_limit: int | None = None  # node-limited routing: a token reaches at most this many EP nodes
    # Multi-token prediction modules (DeepSeek-V3, Liu et al. 2024, section 2.2), trained and dropped at inference:
    # each one more transformer layer of the model's last kind (MoE where the model has MoE layers), a projection
    # of [norm(h), norm(emb)] from 2 d_model to d_model, and another pass of the shared output layer and its loss
    mtp_layers: int = 0
    # Sliding-window attention (Mistral, Gemma, gpt-oss): a windowed self-attention layer lets each query attend to
    # at most ``sliding_window`` tokens back (0: every layer attends to the whole sequence); with
    # ``full_attention_every`` = N, one layer in N attends fully after N - 1 windowed ones (Megatron-LM's
    # --window-attn-skip-freq; gpt-oss alternates, N = 2), 0: every self-attention layer is windowed
    sliding_window: int = 0
    full_attention_every: int = 0
    name: str = "custom"
    source: str = ""

    def __post_init__(self) -> None:
        owner = f"model {str(self.name)[:80]!r}"
        if self.num_experts == 0 and not isinstance(self.num_experts, bool):  # a dense model, as num_experts=1
            object.__setattr__(self, "num_experts", 1)
            object.__setattr__(self, "top_k", self.top_k or 1)
            object.__setattr__(self, "expert_d_ff", self.expert_d_ff or self.d_ff)
        for name, (low, high) in bounds.MODEL.items():  # documented ranges (bounds.py)
            bounds.check_int(f"{owner}.{name}", getattr(self, name), low, high)
        if self.top_k > self.num_experts:
            raise ValueError(f"{owner}.top_k: got {self.top_k}; expected at most num_experts ({self.num_experts})")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"{owner}.n_kv_heads: got {self.n_kv_heads}; expected a divisor of n_heads "
                             f"({self.n_heads})")
        if self.capacity_factor is not None:
            bounds.check_number(f"{owner}.capacity_factor (None = dropless)", self.capacity_factor,
                                *bounds.CAPACITY_FACTOR)
        for name in ("encoder_decoder", "gated_ffn", "tied_embeddings"):
            bounds.check_bool(f"{owner}.{name}", getattr(self, name))
        if self.route_node_limit is not None:
            bounds.check_int(f"{owner}.route_node_limit (None = no limit)", self.route_node_limit, 1, 65_536)
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"{owner}.attention: got {self.attention!r}; expected one of {list(ATTENTION_KINDS)}")
        if (self.attention == "mla") != (self.mla is not None):
            raise ValueError(f"{owner}.mla: MLA dimensions are required with attention='mla' and only then")
        if self.encoder_decoder and self.n_layers % 2:
            raise ValueError(f"{owner}.n_layers: got {self.n_layers}; an encoder-decoder needs an even count")
        if self.full_attention_every and not self.sliding_window:
            raise ValueError(f"{owner}.full_attention_every: got {self.full_attention_every} with sliding_window 0; "
                             "expected 0 (no windowed layers to alternate with)")
        if self.sliding_window and self.encoder_decoder:
            raise ValueError(f"{owner}.sliding_window: got {self.sliding_window} for an encoder-decoder; expected 0 "
                             "(windows are modelled for decoder-only self-attention)")
        if self.n_dense_layers > 0 and self.d_ff == 0:
            raise ValueError(f"{owner}.d_ff: 0, but {self.n_dense_layers} layers are dense; expected d_ff >= 1")

    # ------------------------------------------------------------ layer census
    @cached_property
    def is_moe_layer(self) -> np.ndarray:
        """Bool per block (encoder blocks first): MoE every ``moe_every``-th block after the dense ones."""
        per_stack = self.n_layers // 2 if self.encoder_decoder else self.n_layers
        i = np.arange(per_stack)
        stack = (i >= self.first_dense_layers) & ((i + 1 - self.first_dense_layers) % self.moe_every == 0)
        return np.concatenate([stack, stack]) if self.encoder_decoder else stack

    @cached_property
    def n_moe_layers(self) -> int:
        return int(layer_census(self.n_layers, self.moe_every, self.first_dense_layers, self.encoder_decoder))

    @property
    def n_dense_layers(self) -> int:
        return self.n_layers - self.n_moe_layers

    @property
    def n_cross_attention_layers(self) -> int:
        return self.n_layers // 2 if self.encoder_decoder else 0

    def with_(self, **changes) -> MoEModel:
        return replace(self, **changes)

    def reshaped(self, d_model: int | None = None, n_layers: int | None = None) -> MoEModel:
        """The same design at another width and depth: heads (of the same ``d_head``, in the same query to
        key/value ratio) and FFN widths scale with ``d_model``, widths rounded to multiples of 64."""
        d_model = self.d_model if d_model is None else int(d_model)
        n_layers = self.n_layers if n_layers is None else int(n_layers)
        if d_model == self.d_model and n_layers == self.n_layers:
            return self
        if self.attention == "mla":
            raise ValueError(f"model {self.name!r}: reshaping to d_model={d_model} is not supported for MLA "
                             "attention; search the shape of a mha or gqa model")
        if d_model < self.d_head:
            raise ValueError(f"d_model: got {d_model}; expected at least d_head ({self.d_head})")
        ratio = d_model / self.d_model
        group = self.n_heads // self.n_kv_heads
        kv_heads = max(1, round(self.n_heads * ratio / group))

        def width(f: int) -> int:
            return 0 if f == 0 else max(64, 64 * round(f * ratio / 64))

        return replace(self, d_model=d_model, n_layers=n_layers, n_heads=kv_heads * group, n_kv_heads=kv_heads,
                       d_ff=width(self.d_ff), expert_d_ff=width(self.expert_d_ff),
                       name=f"{self.name} (d_model {d_model}, {n_layers} layers)")


def layer_census(n_layers, moe_every, first_dense_layers, encoder_decoder: bool):
    """MoE blocks: floor((blocks per stack - first dense) / moe_every) per stack (arrays welcome)."""
    per_stack = n_layers // 2 if encoder_decoder else n_layers
    per = maximum(per_stack - first_dense_layers, 0) // moe_every
    return per * 2 if encoder_decoder else per


_FIELD_NAMES = tuple(f.name for f in fields(MoEModel))


class ModelView:
    """A model whose MoE fields may be arrays (one entry per search candidate).

    Reads every attribute from ``base`` unless ``overrides`` gives it; ``capacity_factor`` is a float
    array with NaN for dropless. The counting functions of this module accept it like a MoEModel.
    """

    def __init__(self, base: MoEModel, **overrides) -> None:
        self.base = base
        self.overrides = overrides
        values = vars(base)
        self.__dict__.update({name: values[name] for name in _FIELD_NAMES})  # plain attributes: fast reads
        self.__dict__.update(overrides)
        self.n_cross_attention_layers = base.n_cross_attention_layers
        # a number for one model, an array for a grid: NaN = dropless
        self.capacity_factor_array = capacity_array(overrides.get("capacity_factor", base.capacity_factor))

    def __getattr__(self, name: str):
        if name in ("base", "overrides"):
            raise AttributeError(name)
        if name in self.overrides:
            return self.overrides[name]
        return getattr(self.base, name)

    @cached_property
    def n_moe_layers(self):
        return layer_census(self.n_layers, self.moe_every, self.first_dense_layers, self.encoder_decoder)

    @cached_property
    def n_dense_layers(self):
        return self.n_layers - self.n_moe_layers


# ---------------------------------------------------------------- parameters
def attention_params(m: MoEModel) -> float:
    """Weights of one self-attention block (projections only)."""
    if m.attention == "mla":
        a = m.mla
        qk = a.qk_nope_head_dim + a.qk_rope_head_dim
        q = m.d_model * m.n_heads * qk if a.q_lora_rank == 0 else a.q_lora_rank * (m.d_model + m.n_heads * qk)
        kv = m.d_model * (a.kv_lora_rank + a.qk_rope_head_dim) + a.kv_lora_rank * m.n_heads * (
            a.qk_nope_head_dim + a.v_head_dim)
        return q + kv + m.n_heads * a.v_head_dim * m.d_model
    return m.d_model * m.d_head * (2 * m.n_heads + 2 * m.n_kv_heads)


def ffn_params(m: MoEModel, width) -> float:
    return (3 if m.gated_ffn else 2) * m.d_model * width


def router_params(m: MoEModel) -> float:
    return m.d_model * m.num_experts * (m.num_experts > 1)


def expert_params_per_layer(m: MoEModel) -> float:
    """Routed experts of one MoE layer (shared experts count as dense weights; one expert is a dense FFN)."""
    return m.num_experts * ffn_params(m, m.expert_d_ff) * (m.num_experts > 1)


def dense_params_per_moe_layer(m: MoEModel) -> float:
    """Weights of an MoE block that every token uses: attention, router, shared experts; with one expert
    (a dense model, ``num_experts=1``) that expert's FFN too, as Megatron shards it: over tensor x fsdp."""
    return (attention_params(m) + router_params(m) + m.num_shared_experts * ffn_params(m, m.expert_d_ff)
            + ffn_params(m, m.expert_d_ff) * (m.num_experts == 1))


def embedding_params(m: MoEModel) -> float:
    return m.vocab_size * m.d_model * (1 if m.tied_embeddings else 2)


def param_counts(m: MoEModel) -> dict[str, float]:
    """Total and active (per token) parameter counts, by kind."""
    n_moe, n_dense, n_cross = m.n_moe_layers, m.n_dense_layers, m.n_cross_attention_layers
    attn = attention_params(m)
    dense_ffn = ffn_params(m, m.d_ff)
    non_expert = (n_moe * dense_params_per_moe_layer(m) + n_dense * (attn + dense_ffn) + n_cross * attn
                  + embedding_params(m))
    experts = n_moe * expert_params_per_layer(m)
    active_experts = n_moe * m.top_k * ffn_params(m, m.expert_d_ff) * (m.num_experts > 1)  # one: in non_expert
    return {
        "total": non_expert + experts,
        "non_expert": non_expert,
        "expert": experts,
        "active": non_expert + active_experts,
        "embedding": embedding_params(m),
    }


# ---------------------------------------------------------------- FLOPs per token (forward)
def attention_score_flops(m: MoEModel) -> float:
    """QK^T and AV per token per layer, over the full sequence: 2 * 2 * s * h * dh."""
    if m.attention == "mla":
        a = m.mla
        return 2.0 * m.seq_len * m.n_heads * (a.qk_nope_head_dim + a.qk_rope_head_dim + a.v_head_dim)
    return 4.0 * m.seq_len * m.n_heads * m.d_head


def score_head_dims(m: MoEModel) -> tuple[int, int]:
    """The head dims of attention's two matmuls: q.k (MLA: its no-position and rope parts) and values."""
    if m.attention == "mla":
        return m.mla.qk_nope_head_dim + m.mla.qk_rope_head_dim, m.mla.v_head_dim
    return m.d_head, m.d_head


def windowed_fraction(m: MoEModel) -> float:
    """The share of self-attention layers that attend through the sliding window."""
    if not m.sliding_window:
        return 0.0
    return 1.0 - 1.0 / m.full_attention_every if m.full_attention_every else 1.0


def attended_keys(m: MoEModel, context, causal: bool = False):
    """Keys one query attends in a self-attention layer, averaged over the layers: ``context`` where it attends
    fully, at most ``sliding_window`` where windowed. ``causal``: also averaged over the positions of a sequence of
    ``context`` tokens, the query at position i seeing i keys (i, or the window, whichever is fewer): context / 2
    fully, w (1 - w / 2 context) windowed (w < context)."""
    f, w = windowed_fraction(m), m.sliding_window
    context = np.asarray(context, dtype=float)
    if causal:
        full = context / 2.0
        window = np.where(w < context, w * (1.0 - w / (2.0 * np.maximum(context, 1.0))), full)
    else:
        full, window = context, np.minimum(w, context)
    out = (1.0 - f) * full + f * window
    return float(out) if out.ndim == 0 else out


def forward_flops_per_token(m: MoEModel) -> dict[str, float]:
    """Forward FLOPs per token by part (matmuls; norms and softmax are memory-bound, not counted)."""
    n_moe, n_dense, n_cross = m.n_moe_layers, m.n_dense_layers, m.n_cross_attention_layers
    n_attn = m.n_layers + n_cross
    attn_proj = 2.0 * attention_params(m) * n_attn
    # windowed layers' scores over the keys they attend (the full count otherwise: no causal discount)
    scores = attention_score_flops(m) * (m.n_layers * attended_keys(m, m.seq_len) / m.seq_len + n_cross)
    dense_ffn = 2.0 * ffn_params(m, m.d_ff) * n_dense
    router = 2.0 * router_params(m) * n_moe
    shared = 2.0 * m.num_shared_experts * ffn_params(m, m.expert_d_ff) * n_moe
    experts = 2.0 * m.top_k * ffn_params(m, m.expert_d_ff) * n_moe
    logits = 2.0 * m.vocab_size * m.d_model
    # each MTP module: one layer of the last kind, its 2d -> d projection and one more output layer
    last_ffn = where(n_moe > 0, (router + shared + experts) / maximum(n_moe, 1), dense_ffn / maximum(n_dense, 1))
    mtp = m.mtp_layers * ((attn_proj + scores) / n_attn + last_ffn + 2.0 * 2 * m.d_model * m.d_model + logits)
    return {"attention_proj": attn_proj, "attention_scores": scores, "dense_ffn": dense_ffn, "router": router,
            "shared_experts": shared, "experts": experts, "logits": logits, "mtp": mtp}


def model_flops_per_token(m: MoEModel, training: bool = True) -> float:
    """MFU convention: (6 or 2) x active matmul weights + attention scores (3x or 1x)."""
    return (3.0 if training else 1.0) * sum(forward_flops_per_token(m).values())


# ------------------------------------------------------------------ capacity and dropless (their one owner)
# Dropless is None on a MoEModel and in a search space, NaN in the arrays of a grid (capacity_factor_array), and
# DROPLESS_KEY where a capacity factor is a sorting or hashing key (factors are > 0: bounds.CAPACITY_FACTOR).
DROPLESS_KEY = 0.0


def capacity_array(capacity_factor):
    """None (dropless) -> NaN; a number stays a float, a list or array becomes a float array."""
    cf = math.nan if capacity_factor is None else capacity_factor
    return np.asarray(cf, dtype=float) if np.ndim(cf) else float(cf)


def is_dropless(capacity_factor):
    """True where dropless: None, or NaN in a capacity array (elementwise for arrays)."""
    if capacity_factor is None:
        return True
    return capacity_factor != capacity_factor


def capacity_key(capacity_factor):
    """The capacity factor with dropless as DROPLESS_KEY: a total order (dropless first) and hashable rows."""
    if capacity_factor is None:
        return DROPLESS_KEY
    if np.ndim(capacity_factor):
        return np.nan_to_num(np.asarray(capacity_factor, dtype=float), nan=DROPLESS_KEY)
    return DROPLESS_KEY if capacity_factor != capacity_factor else float(capacity_factor)


def capacity_code(capacity_factor):
    """A non-negative integer per capacity factor, for rows of integers (``plan.distinct_rows``): 0 = dropless,
    else 1 + the factor in millionths. ``capacity_of_code`` reads it back."""
    key = capacity_key(capacity_factor)
    return np.where(key == DROPLESS_KEY, 0, np.rint(key * 1e6) + 1).astype(np.int64) if np.ndim(key) else \
        (0 if key == DROPLESS_KEY else int(round(key * 1e6)) + 1)


def capacity_of_code(code) -> float | None:
    return None if code == 0 else (code - 1) / 1e6


def expert_capacity(tokens_per_group, top_k, capacity_factor, num_experts):
    """Slots one expert has in one routing group: ceil(T k cf / E) (GShard, Switch). Numbers give an int,
    arrays an array (NaN where dropless)."""
    if type(tokens_per_group) in (int, float) and type(capacity_factor) in (int, float) \
            and capacity_factor == capacity_factor:  # one number: math, several times cheaper than numpy
        return math.ceil(tokens_per_group * top_k * capacity_factor / num_experts)
    slots = np.ceil(np.asarray(tokens_per_group, dtype=float) * top_k * capacity_factor / num_experts)
    return int(slots) if np.ndim(slots) == 0 else slots


def capacity(tokens_per_group, m: MoEModel, capacity_factor=None):
    """``expert_capacity`` with ``m``'s top-k, experts and (unless given) capacity factor; float or array."""
    cf = m.capacity_factor if capacity_factor is None else capacity_factor
    with np.errstate(invalid="ignore"):
        return np.ceil(np.asarray(tokens_per_group, dtype=float) * m.top_k * cf / m.num_experts)


def kv_cache_bytes_per_token(m: MoEModel, dtype_bytes: float) -> float:
    """KV cache per token summed over the self-attention layers (MLA caches the latent and the rope key)."""
    if m.attention == "mla":
        per_layer = m.mla.kv_lora_rank + m.mla.qk_rope_head_dim
    else:
        per_layer = 2 * m.n_kv_heads * m.d_head
    return per_layer * m.n_layers * dtype_bytes


# ---------------------------------------------------------------- presets and files
def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_model(name: str | os.PathLike[str]) -> MoEModel:
    """A bundled preset (``list_presets()``) or a path to a model ``.yaml``; strict like the topologies."""
    path = resolve_bundled(name, PRESET_DIR, "model")
    return model_from_mapping(read_yaml_mapping(path, "model"), str(path))


_INT_FIELDS = ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_head", "vocab_size", "seq_len", "num_experts",
               "top_k", "expert_d_ff")
_OPTIONAL_INT_FIELDS = ("d_ff", "num_shared_experts", "first_dense_layers", "mtp_layers", "sliding_window",
                        "full_attention_every")


def model_from_mapping(data: dict, file: str = "<mapping>") -> MoEModel:
    sec = Section(data, "", file)
    kwargs: dict = {name: sec.integer(name) for name in _INT_FIELDS}
    for name in _OPTIONAL_INT_FIELDS:
        kwargs[name] = sec.integer(name, optional=True, minimum=0) or 0
    kwargs["moe_every"] = sec.integer("moe_every", optional=True) or 1
    kwargs["capacity_factor"] = sec.number("capacity_factor", optional=True)
    kwargs["attention"] = sec.string("attention", optional=True, choices=ATTENTION_KINDS) or "gqa"
    mla = sec.section("mla", optional=True)
    if mla is not None:
        kwargs["mla"] = MLADims(**{f.name: mla.integer(f.name, minimum=0) for f in fields(MLADims)})
        mla.finish()
    kwargs["encoder_decoder"] = sec.boolean("encoder_decoder", optional=True)
    kwargs["gated_ffn"] = sec.boolean("gated_ffn", optional=True, default=True)
    kwargs["tied_embeddings"] = sec.boolean("tied_embeddings", optional=True)
    kwargs["route_node_limit"] = sec.integer("route_node_limit", optional=True)
    kwargs["name"] = sec.string("name", optional=True) or Path(file).stem
    kwargs["source"] = sec.string("source", optional=True) or ""
    sec.finish()
    try:
        return MoEModel(**kwargs)
    except ValueError as exc:
        raise ValueError(f"{file}: {exc}") from None
