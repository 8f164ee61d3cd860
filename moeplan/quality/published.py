"""A scaling-law loss estimate for MoE models, so the search can trade quality against time.

Default: Krajewski et al. 2024, "Scaling Laws for Fine-Grained Mixture of Experts" (arXiv 2402.07871),
Eq. 9 with the Table 1 MoE fit:

    L(N, D, G) = c + (g / G**gamma + a) / N**alpha + b / D**beta     (nats per token)
    a = 18.1, alpha = 0.115, b = 30.8, beta = 0.147, g = 2.1, gamma = 0.58, c = 0.47

N is the *total* non-embedding parameter count (every expert included, the router excluded), D the
training tokens, G the granularity d_ff / d_expert, here 4 d_model / expert_d_ff (clipped at 1).
The fit holds the expansion rate at E = 64 and covers 129M-3.7B total parameters, 16B-130B tokens
and G in 1..16; everything else is extrapolation, which ``in_range`` reports.

Assumptions moeplan adds (documented, not fitted): the expert count enters only through N (the
law was fitted at E = 64); top-k enters only through compute (the law activates G fine-grained
experts per token at constant active parameters); dropped tokens are tokens not trained on, so
D shrinks by the drop rate; an expert layer every k-th block enters through N (fewer MoE blocks,
fewer parameters). A user law is any object with ``name``, ``loss(model, tokens)`` and
``in_range(model, tokens)``; ``model`` may be a ``moe.ModelView`` with array fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from moeplan import moe as M


class QualityLaw(Protocol):
    name: str

    def loss(self, model, tokens) -> np.ndarray: ...

    def in_range(self, model, tokens) -> np.ndarray: ...


def non_embedding_params(model) -> np.ndarray:
    """Total parameters without embeddings and router (arrays welcome)."""
    counts = M.param_counts(model)
    return counts["total"] - counts["embedding"] - M.router_params(model) * model.n_moe_layers


def granularity(model) -> np.ndarray:
    return np.maximum(4.0 * model.d_model / np.asarray(model.expert_d_ff, dtype=float), 1.0)


@dataclass(frozen=True)
class FineGrainedMoELaw:
    """Krajewski et al. 2024, Eq. 9, Table 1 (MoE, E = 64)."""

    a: float = 18.1
    alpha: float = 0.115
    b: float = 30.8
    beta: float = 0.147
    g: float = 2.1
    gamma: float = 0.58
    c: float = 0.47
    name: str = "Krajewski et al. 2024 (fine-grained MoE, E=64)"

    def loss(self, model, tokens) -> np.ndarray:
        n = np.asarray(non_embedding_params(model), dtype=float)
        d = np.maximum(np.asarray(tokens, dtype=float), 1.0)
        g = granularity(model)
        return self.c + (self.g / g**self.gamma + self.a) / n**self.alpha + self.b / d**self.beta

    def in_range(self, model, tokens) -> np.ndarray:
        n = np.asarray(non_embedding_params(model), dtype=float)
        d = np.asarray(tokens, dtype=float)
        g = granularity(model)
        return (n >= 1.29e8) & (n <= 3.7e9) & (d >= 1.6e10) & (d <= 1.3e11) & (g <= 16)


def default_law() -> FineGrainedMoELaw:
    return FineGrainedMoELaw()
