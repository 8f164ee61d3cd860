"""MoE quality: a loss estimate that sees every knob the search turns.

``predict_loss(model, training_tokens)`` is the public entry point. The default law is moeplan's
fitted leverage law (``leverage.py``: a dense scaling law fed with the MoE's dense-equivalent size,
one cited term per knob, coefficients fitted by ``fit.py`` to ``validation/quality.yaml``); the
published laws it builds on live in ``published.py``. A user law is any object with ``name``,
``loss(model, tokens)`` and optionally ``in_range(model, tokens)``; ``model`` may be a
``moe.ModelView`` whose fields are arrays, so the search scores a grid in one call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from moeplan import bounds
from moeplan import moe as M
from moeplan.quality.leverage import FITTED, Coefficients, LeverageLaw
from moeplan.quality.published import (
    DenseLaw,
    FineGrainedMoELaw,
    JointMoELaw,
    active_non_embedding_params,
    granularity,
    non_embedding_params,
)
from moeplan.routing import Routing, routing_stats

SAME_AS_TRAINING = "train"  # eval_capacity_factor: evaluate at the training capacity factor

__all__ = ["Coefficients", "DenseLaw", "FITTED", "FineGrainedMoELaw", "JointMoELaw", "LeverageLaw", "LossEstimate",
           "QualityLaw", "SAME_AS_TRAINING", "active_non_embedding_params", "default_law", "drop_rate", "granularity",
           "law_loss", "non_embedding_params", "predict_loss"]


class QualityLaw(Protocol):
    name: str

    def loss(self, model, tokens) -> np.ndarray: ...


def default_law() -> LeverageLaw:
    return LeverageLaw()


@dataclass(frozen=True)
class LossEstimate:
    """``loss`` in nats per token, ``low``/``high`` its interval, ``in_range`` inside every fitted range
    the law relies on, ``terms`` where the number came from (floats, or arrays for array inputs)."""

    loss: object
    low: object
    high: object
    in_range: object
    terms: dict


def drop_rate(model, group_tokens, capacity_factor, routing: Routing | None = None):
    """Fraction of token-expert assignments dropped in a routing group of ``group_tokens`` tokens
    (``routing.py``, uniform routing by default); 0 when dropless (None or NaN). Arrays welcome."""
    cap = M.capacity(np.asarray(group_tokens), model, np.asarray(M.capacity_array(capacity_factor)))  # NaN: dropless
    e, k, g, cap = np.broadcast_arrays(np.asarray(model.num_experts), np.asarray(model.top_k),
                                       np.asarray(group_tokens), cap)
    out = np.zeros(e.shape)
    for i in np.ndindex(e.shape):
        if not np.isnan(cap[i]):
            out[i] = routing_stats(int(g[i]), int(e[i]), int(k[i]), float(cap[i]), 1, routing, loads=False).drop_rate
    return out if out.ndim else float(out)


def law_loss(law, model, tokens, drop_train=0.0, drop_eval=None):
    """(loss, half_width) of any law: the leverage law's interval is loss -+ half_width, a user law's is a point.

    The half-width depends on the model and the drop rates only (the D term cancels in the MoE gain), so with
    arrays it keeps their smaller shape; the loss broadcasts to the tokens as well."""
    if isinstance(law, LeverageLaw):
        drop_eval = drop_train if drop_eval is None else drop_eval
        terms, dense = law.terms(model, drop_train, drop_eval), law.dense
        n_term = dense.a / np.maximum(terms.n_equivalent, 1.0) ** dense.alpha
        gain = dense.a / np.maximum(terms.n_active, 1.0) ** dense.alpha - n_term
        loss = (dense.c + n_term) + dense.b * np.maximum(np.asarray(tokens, dtype=float), 1.0) ** -dense.beta
        return loss, law.coef.rel_error * np.abs(gain)
    return np.asarray(law.loss(model, tokens), dtype=float), 0.0


def predict_loss(model, training_tokens, *, group_tokens=None, law=None, eval_capacity_factor=SAME_AS_TRAINING,
                 routing: Routing | None = None) -> LossEstimate:
    """Predicted loss of ``model`` trained on ``training_tokens`` tokens.

    ``group_tokens``: tokens routed together (per device and micro-batch in training; default one
    sequence, ``model.seq_len``); with ``model.capacity_factor`` it gives the training drop rate.
    ``eval_capacity_factor``: the capacity at evaluation (a number, None for dropless, or the default
    "train": the training one). Fields and ``training_tokens`` may be arrays (a ``ModelView``)."""
    if not isinstance(model, M.MoEModel | M.ModelView):
        raise ValueError(f"model: got a {type(model).__name__}; expected a moeplan.MoEModel (or a ModelView)")
    if law is not None and not callable(getattr(law, "loss", None)):
        raise ValueError(f"law: got a {type(law).__name__}; expected an object with loss(model, tokens)")
    law = law or default_law()
    try:
        tokens = np.asarray(training_tokens, dtype=float)
    except (TypeError, ValueError):
        raise ValueError(f"training_tokens: got a {type(training_tokens).__name__}; expected a number or an array "
                         "of numbers") from None
    if tokens.size > 10**7 or not np.all(np.isfinite(tokens)) or np.any(tokens <= 0) or np.any(tokens > 1e16):
        raise ValueError(f"training_tokens: got {_short(training_tokens)}; expected finite numbers in (0, 1e16]")
    group = model.seq_len if group_tokens is None else group_tokens
    if np.ndim(group) == 0:
        bounds.check_int("group_tokens", group, 1, bounds.GLOBAL_BATCH_TOKENS[1])
    elif not (np.issubdtype(np.asarray(group).dtype, np.integer) and np.all(np.asarray(group) >= 1)):
        raise ValueError(f"group_tokens: got {_short(group_tokens)}; expected integers >= 1")
    cf_train = getattr(model, "capacity_factor_array", model.capacity_factor)
    if isinstance(eval_capacity_factor, str) and eval_capacity_factor == SAME_AS_TRAINING:
        cf_eval = cf_train
    elif eval_capacity_factor is None:
        cf_eval = None
    else:
        cf_eval = bounds.check_number("eval_capacity_factor ('train', None for dropless, or a number)",
                                      eval_capacity_factor, *bounds.CAPACITY_FACTOR)
    d_train = drop_rate(model, group, cf_train, routing)
    d_eval = drop_rate(model, group, cf_eval, routing)
    loss, half = law_loss(law, model, tokens, d_train, d_eval)
    low, high = loss - half, loss + half
    in_range = law.in_range(model, tokens) if hasattr(law, "in_range") else False
    terms = _terms(law, model, tokens, d_train, d_eval)
    return LossEstimate(_plain(loss), _plain(low), _plain(high), _plain(np.asarray(in_range, bool)), terms)


def _terms(law, model, tokens, d_train, d_eval) -> dict:
    if not isinstance(law, LeverageLaw):
        return {"law": getattr(law, "name", type(law).__name__)}
    t = law.terms(model, d_train, d_eval)
    shared = np.asarray(model.num_shared_experts, float)
    n_moe = np.asarray(model.n_moe_layers, float)
    return {"law": law.name, "dense_law": law.dense.name, "training_tokens": _plain(tokens),
            "active_params": _plain(t.n_active), "dense_equivalent_params": _plain(t.n_equivalent),
            "expert_leverage": _plain(t.expert), "granularity": _plain(t.granularity),
            "shared_expert_share": _plain(shared / (np.asarray(model.top_k, float) + shared)),
            "capacity_retention_train": _plain(t.retention_train), "capacity_retention_eval": _plain(t.retention_eval),
            "drop_rate_train": _plain(d_train), "drop_rate_eval": _plain(d_eval),
            "sparse_layer_fraction": _plain(n_moe / model.n_layers),
            "encoder_decoder": bool(model.encoder_decoder)}


def _plain(x):
    x = np.asarray(x)
    return x.item() if x.ndim == 0 else x





def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
