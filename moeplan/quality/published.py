"""Published scaling laws, as small classes: the pieces the fitted MoE quality model is built from.

Every coefficient below is the paper's own (table and equation cited); nothing here is fitted by moeplan.
Losses are nats per token. ``N`` is a non-embedding parameter count unless a class says otherwise.
Arrays are welcome everywhere (the search scores a grid of models at once).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moeplan import moe as M


def non_embedding_params(model) -> np.ndarray:
    """Total parameters without embeddings and router (arrays welcome)."""
    counts = M.param_counts(model)
    return counts["total"] - counts["embedding"] - M.router_params(model) * model.n_moe_layers


def active_non_embedding_params(model) -> np.ndarray:
    """Parameters one token uses, without embeddings and router (arrays welcome)."""
    counts = M.param_counts(model)
    return counts["active"] - counts["embedding"] - M.router_params(model) * model.n_moe_layers


def granularity(model) -> np.ndarray:
    """Krajewski et al. 2024's G = d_ff / d_expert with the standard d_ff = 4 d_model, clipped at 1 (the
    definition their law uses). A gated expert of width f holds as many weights as a plain one of 1.5 f."""
    return np.maximum(4.0 * model.d_model / np.asarray(model.expert_d_ff, dtype=float), 1.0)


def clark_saturation(x, start: float, maximum: float):
    """Clark et al. 2022 Eq. 1 (also Ludziejewski et al. 2025 Eq. 4): the saturating transform
    1 / x_hat = 1 / (x - 1 + (1 / start - 1 / maximum)^-1) + 1 / maximum. x_hat(1) = start and
    x_hat grows like x - 1 + start for small x and saturates at ``maximum``."""
    x = np.asarray(x, dtype=float)
    return 1.0 / (1.0 / (x - 1.0 + 1.0 / (1.0 / start - 1.0 / maximum)) + 1.0 / maximum)


@dataclass(frozen=True)
class DenseLaw:
    """Chinchilla form L = c + a / N**alpha + b / D**beta for dense transformers.

    Default coefficients: Krajewski et al. 2024 (arXiv 2402.07871) Table 1, "Dense" row, fitted on C4
    with the GPT-2 tokenizer, N non-embedding parameters (the same runs as their MoE fit).
    """

    a: float = 16.3
    alpha: float = 0.126
    b: float = 26.7
    beta: float = 0.127
    c: float = 0.47
    name: str = "Krajewski et al. 2024, Table 1, dense"

    def loss_from_params(self, n, tokens):
        n = np.asarray(n, dtype=float)
        d = np.maximum(np.asarray(tokens, dtype=float), 1.0)
        return self.c + self.a / n**self.alpha + self.b / d**self.beta


@dataclass(frozen=True)
class FineGrainedMoELaw:
    """Krajewski et al. 2024, Eq. 9, Table 1 (MoE, E = 64):

        L(N, D, G) = c + (g / G**gamma + a) / N**alpha + b / D**beta

    N total non-embedding parameters, D training tokens, G granularity. Fitted at E = 64, every block
    MoE, expert-choice routing, 129M-3.7B parameters, 16B-130B tokens, G in 1..16. Kept as a published
    reference and as an example of a user law (``name``, ``loss(model, tokens)``, ``in_range``)."""

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


@dataclass(frozen=True)
class JointMoELaw:
    """Ludziejewski et al. 2025, "Joint MoE Scaling Laws" (arXiv 2502.05172), Eq. 6 with Table 3:

        L = a E^delta N_act^(alpha + gamma ln E) + b E^omega D^(beta + zeta ln E) + c,  E -> E_hat (Eq. 4)

    N_act active parameters *with* embeddings (App. A.1), top-1 Switch layers in every block, E in 1..32.
    Used by moeplan's data set for the shape of the returns from more experts at fixed active size."""

    a: float = 35.91
    alpha: float = -0.1889
    delta: float = -0.2285
    gamma: float = 0.0098
    b: float = 35.98
    beta: float = -0.1775
    omega: float = 0.5529
    zeta: float = -0.0259
    e_start: float = 2.0732
    e_max: float = 290.4521
    c: float = 1.3637

    def loss(self, active_params, tokens, experts):
        e = clark_saturation(experts, self.e_start, self.e_max)
        ln_e = np.log(e)
        return (self.a * e**self.delta * np.asarray(active_params, float) ** (self.alpha + self.gamma * ln_e)
                + self.b * e**self.omega * np.asarray(tokens, float) ** (self.beta + self.zeta * ln_e) + self.c)
