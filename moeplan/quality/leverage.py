"""moeplan's MoE quality model: a dense scaling law fed with the MoE's dense-equivalent parameter count.

An MoE layer is worth a dense FFN ``leverage`` times the size of what a token activates in it:

    N_eq = N_base + n_moe * (k + s) * P_e * leverage
    leverage = 1 + (rho_hat**p * gran(G) - 1) * (1 - drop_train)**kappa_train * (1 - drop_eval)**kappa_eval
    loss = L_dense(N_eq, D)

with one term per knob:

* **experts and top-k** through the activation ratio rho = (E + s) / (k + s) (Tian et al. 2025, arXiv
  2507.17702, §2.1: A = 1 / rho, shared experts included), saturated with Clark et al. 2022's transform
  (Eq. 1; start 2.0732 and saturation 290.45 from Ludziejewski et al. 2025, Table 3, not refitted), so
  more experts help with diminishing returns; top-k also multiplies the activated width (k + s) P_e, its
  compute, so a higher k buys (k + s)^(1 - p) at fixed E: a gain, but less than the compute it costs;
* **granularity** G = 8 d_model^2 / P_e (Krajewski et al. 2024's d_ff / d_expert with d_ff = 4 d_model,
  counted in weights so a gated expert of width f is 1.5 f wide), through ln gran = g1 ln G - g2 (ln G)^2:
  finer experts help, then stop helping past G* = exp(g1 / 2 g2) (Tian et al. 2025 §3.2: U-shaped);
* **shared experts** through rho and the activated width (Tian's A counts them);
* **sparse-layer fraction** (``moe_every``, ``first_dense_layers``): only MoE layers carry leverage, each
  independently of how many others do. No controlled ablation is published; this additivity is an
  assumption, checked only across Switch (every 2nd block) and ST-MoE (every 4th) in the fit data;
* **capacity factor**, in training and in evaluation, through the fraction of token-expert assignments
  dropped (``routing.py``): the layer retains (1 - drop)**kappa of its MoE gain (ST-MoE Table 8's
  retention of the gain against capacity);
* **encoder-decoder**: both stacks' parameters count in N (the dense law is a decoder-only fit; only
  differences within one architecture are fitted);
* **training tokens** through the dense law's D term.

The free coefficients (p, g1, g2, kappa_train, kappa_eval) are fitted with scipy by
``moeplan.quality.fit`` to ``validation/quality.yaml``; ``fitted.yaml`` beside this file holds the
result (``FITTED``), and a test refits and checks it. The interval half-width is ``rel_error`` times the
predicted MoE gain (the loss of the same model with every MoE layer's leverage at 1, less the loss),
``rel_error`` being the 80th percentile of the fit's leave-one-source-out relative errors on within-table
differences.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from moeplan import moe as M
from moeplan.quality.published import DenseLaw, active_non_embedding_params, clark_saturation
from moeplan.schema import Section, read_yaml_mapping

RHO_START = 2.0732  # Ludziejewski et al. 2025, Table 3, E_start (Clark's transform)
RHO_MAX = 290.4521  # Ludziejewski et al. 2025, Table 3, E_max: where more experts stop paying


@dataclass(frozen=True)
class Coefficients:
    """The fitted constants (see the module docstring); ``fit_points`` names the data they came from."""

    p: float
    rho_max: float
    g1: float
    g2: float
    kappa_train: float
    kappa_eval: float
    rel_error: float
    fit_points: str = ""


COEFFICIENTS_PATH = Path(__file__).resolve().parent / "fitted.yaml"


def coefficients_to_yaml(c: Coefficients) -> str:
    lines = ["# Written by `python -m moeplan.quality.fit --write` from validation/quality.yaml; a test refits.",
             *(f"{f.name}: {getattr(c, f.name)!r}" if f.name != "fit_points" else f"fit_points: {c.fit_points!r}"
               for f in fields(Coefficients))]
    return "\n".join(lines) + "\n"


def load_coefficients(path=COEFFICIENTS_PATH) -> Coefficients:
    sec = Section(read_yaml_mapping(path, "quality coefficients"), "", str(path))
    values = {f.name: sec.number(f.name, minimum=-10.0) for f in fields(Coefficients) if f.name != "fit_points"}
    values["fit_points"] = sec.string("fit_points")
    sec.finish()
    return Coefficients(**values)


FITTED = load_coefficients()

# Where the fit's data lie: outside, in_range is False (the number is an extrapolation).
RANGES = {"active_params": (5e7, 1.5e10), "tokens": (1e9, 1e12), "activation_ratio": (1 / 256, 1.0),
          "granularity": (0.85, 21.5)}


def expert_weights(model):
    """P_e: weights of one routed expert."""
    return M.ffn_params(model, model.expert_d_ff)


def granularity(model):
    """G = 8 d_model^2 / P_e: 1 for a plain 4 d_model FFN expert (or a gated 8/3 d_model one)."""
    return 8.0 * np.asarray(model.d_model, float) ** 2 / expert_weights(model)


def activation_ratio(model):
    """rho = (E + s) / (k + s): total over activated experts (Tian's 1 / A)."""
    s = np.asarray(model.num_shared_experts, float)
    return (np.asarray(model.num_experts, float) + s) / (np.asarray(model.top_k, float) + s)


@dataclass(frozen=True)
class Terms:
    """The factors of one prediction (arrays welcome)."""

    n_active: object  # active non-embedding parameters
    n_base: object  # of those, outside the MoE layers' experts
    moe_active: object  # activated expert weights over all MoE layers ((k + s) P_e per layer)
    expert: object  # rho_hat**p
    granularity: object
    retention_train: object
    retention_eval: object

    @property
    def leverage(self):
        """What one activated expert weight is worth in dense weights: 1 + the MoE gain retained."""
        return 1.0 + (self.expert * self.granularity - 1.0) * self.retention_train * self.retention_eval

    @property
    def n_equivalent(self):
        return self.n_base + self.moe_active * self.leverage


@dataclass(frozen=True)
class LeverageLaw:
    """The fitted MoE quality model (module docstring); ``dense`` supplies L(N, D)."""

    coef: Coefficients = FITTED
    dense: DenseLaw = field(default_factory=DenseLaw)
    name: str = "moeplan leverage law (fitted to validation/quality.yaml)"

    def terms(self, model, drop_train=0.0, drop_eval=0.0) -> Terms:
        c = self.coef
        n_act = np.asarray(active_non_embedding_params(model), float)
        moe_active = (np.asarray(model.n_moe_layers, float) * (np.asarray(model.top_k, float)
                      + np.asarray(model.num_shared_experts, float)) * expert_weights(model))
        rho = activation_ratio(model)
        sparse = rho > 1.0
        expert = (clark_saturation(rho, RHO_START, c.rho_max) / RHO_START) ** c.p
        ln_g = np.log(granularity(model))
        gran = np.where(sparse, np.exp(c.g1 * ln_g - c.g2 * ln_g**2), 1.0)
        if drop_eval is drop_train:  # one array for both (the search): one power, reported as the training term
            keep_t = (1.0 - np.clip(np.asarray(drop_train, float), 0.0, 1.0)) ** (c.kappa_train + c.kappa_eval)
            keep_e = 1.0
        else:
            keep_t = (1.0 - np.clip(np.asarray(drop_train, float), 0.0, 1.0)) ** c.kappa_train
            keep_e = (1.0 - np.clip(np.asarray(drop_eval, float), 0.0, 1.0)) ** c.kappa_eval
        return Terms(n_act, n_act - moe_active, moe_active, expert, gran, keep_t, keep_e)

    def loss_from_terms(self, t: Terms, tokens):
        return self.dense.loss_from_params(np.maximum(t.n_equivalent, 1.0), tokens)

    def loss(self, model, tokens, drop_train=0.0, drop_eval=None):
        drop_eval = drop_train if drop_eval is None else drop_eval
        return self.loss_from_terms(self.terms(model, drop_train, drop_eval), tokens)

    def in_range(self, model, tokens):
        checks = {"active_params": active_non_embedding_params(model), "tokens": tokens,
                  "activation_ratio": 1.0 / activation_ratio(model), "granularity": granularity(model)}
        ok = True
        for key, value in checks.items():
            lo, hi = RANGES[key]
            value = np.asarray(value, float)
            ok = ok & (value >= lo * (1 - 1e-9)) & (value <= hi * (1 + 1e-9))
        return ok
