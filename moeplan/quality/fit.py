"""Fit the leverage law's free coefficients to validation/quality.yaml, and judge it leave-one-source-out.

Only differences within a source are compared (row minus the source's reference row; for a leverage
source, row minus the same model with every MoE layer's leverage at 1). Residuals are scaled by each
source's RMS difference and by 1/sqrt(rows), so every source weighs the same whatever its size.
``python -m moeplan.quality.fit`` prints the fit; ``--write`` stores it in ``fitted.yaml``.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from scipy import optimize

from moeplan import moe as M
from moeplan.quality.leverage import COEFFICIENTS_PATH, RHO_MAX, Coefficients, LeverageLaw, coefficients_to_yaml
from moeplan.quality.published import active_non_embedding_params
from moeplan.schema import SchemaError, Section, read_yaml_mapping

DATA_PATH = Path(__file__).resolve().parents[2] / "validation" / "quality.yaml"
METRICS = ("loss", "neg_log_perplexity", "leverage")
_FREE = ("p", "g1", "g2", "kappa_train", "kappa_eval")
_BOUNDS = ([0.05, 0.0, 0.0, 0.0, 0.0], [1.5, 2.0, 1.0, 20.0, 20.0])


@dataclass(frozen=True)
class Row:
    id: str
    model: M.MoEModel
    value: float
    drop_train: float
    drop_eval: float


@dataclass(frozen=True)
class Source:
    name: str
    citation: str
    metric: str
    tokens: float
    reference: str | None
    rows: tuple[Row, ...]


def load_sources(path=DATA_PATH, routing=None) -> list[Source]:
    """The sources of the quality data file, each row a model with its drop rates computed once."""
    from moeplan.quality import drop_rate  # the package's own helper (routing.py underneath)

    file = str(path)
    top = Section(read_yaml_mapping(path, "quality data"), "", file)
    sources_sec = top.section("sources")
    out = []
    for name in list(sources_sec.data):
        s = sources_sec.section(name)
        metric = s.string("metric", choices=METRICS)
        tokens = s.number("tokens")
        group = s.integer("group_tokens")
        base = s.section("base").data
        for key in ("citation", "tag", "note"):
            s.string(key, optional=True)
        reference = s.string("reference", optional=metric == "leverage")
        rows = []
        for i, raw in enumerate(s.data.get("rows") or []):
            r = Section(raw, f"sources.{name}.rows[{i}]", file)
            model = M.model_from_mapping({**base, **(r.section("model", optional=True) or Section({}, "", file)).data,
                                          "name": f"{name}/{r.string('id')}"}, file)
            cf_eval = r.number("eval_capacity_factor", optional=True)
            r.integer("table", optional=True)  # a row from another table of the same paper
            value = r.number("value", minimum=-1e9)
            d_t = drop_rate(model, group, model.capacity_factor, routing)
            d_e = d_t if cf_eval is None else drop_rate(model, group, cf_eval, routing)
            rows.append(Row(r.string("id"), model, value, float(d_t), float(d_e)))
            r.finish()
        s._seen.add("rows")
        s.finish()
        if metric != "leverage" and reference not in {r.id for r in rows}:
            raise SchemaError(f"{file}: sources.{name}.reference: {reference!r} is not a row id")
        out.append(Source(name, s.data.get("citation", ""), metric, tokens, reference, tuple(rows)))
    return out


def _loss(metric: str, value: float) -> float:
    return -value if metric == "neg_log_perplexity" else value


def differences(law: LeverageLaw, src: Source) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(predicted, measured) loss differences of the source's rows against its reference, and the row ids."""
    pred, meas, ids = [], [], []
    if src.metric == "leverage":
        for r in src.rows:
            n_act = float(active_non_embedding_params(r.model))
            base = law.dense.loss_from_params(n_act, src.tokens)
            meas.append(float(law.dense.loss_from_params(n_act * r.value, src.tokens)) - base)
            pred.append(float(law.loss(r.model, src.tokens, r.drop_train, r.drop_eval)) - base)
            ids.append(r.id)
        return np.array(pred), np.array(meas), ids
    ref = next(r for r in src.rows if r.id == src.reference)
    ref_pred = float(law.loss(ref.model, src.tokens, ref.drop_train, ref.drop_eval))
    for r in src.rows:
        if r is ref:
            continue
        pred.append(float(law.loss(r.model, src.tokens, r.drop_train, r.drop_eval)) - ref_pred)
        meas.append(_loss(src.metric, r.value) - _loss(src.metric, ref.value))
        ids.append(r.id)
    return np.array(pred), np.array(meas), ids


def _law(theta, rel_error: float = 0.0, fit_points: str = "") -> LeverageLaw:
    p, g1, g2, kt, ke = (float(t) for t in theta)
    return LeverageLaw(Coefficients(p, RHO_MAX, g1, g2, kt, ke, rel_error, fit_points))


def fit(sources: list[Source]) -> LeverageLaw:
    """Least squares (scipy, soft-L1 loss) over the sources' within-source differences."""
    scales = []
    for s in sources:
        _, meas, _ = differences(LeverageLaw(), s)
        scales.append(float(np.sqrt(np.mean(meas**2))) * math.sqrt(meas.size))

    def residuals(theta):
        law = _law(theta)
        return np.concatenate([(lambda pm: (pm[0] - pm[1]) / scale)(differences(law, s)[:2])
                               for s, scale in zip(sources, scales, strict=True)])

    start = [0.6, 0.3, 0.05, 1.0, 1.0]
    sol = optimize.least_squares(residuals, start, bounds=_BOUNDS, loss="soft_l1", f_scale=0.3)
    return _law(sol.x, fit_points=", ".join(s.name for s in sources))


def relative_errors(law: LeverageLaw, src: Source) -> np.ndarray:
    pred, meas, _ = differences(law, src)
    ok = np.abs(meas) > 1e-9
    return np.abs(pred[ok] - meas[ok]) / np.abs(meas[ok])


def leave_one_source_out(sources: list[Source]) -> dict[str, np.ndarray]:
    """Relative errors of each source's differences under the law fitted to all the other sources."""
    return {s.name: relative_errors(fit([o for o in sources if o is not s]), s) for s in sources}


def fit_with_interval(sources: list[Source]) -> tuple[LeverageLaw, dict[str, np.ndarray]]:
    """The fit on every source, its interval width from the held-out (LOSO) errors, and those errors."""
    held_out = leave_one_source_out(sources)
    rel = float(np.percentile(np.concatenate(list(held_out.values())), 80))
    law = fit(sources)
    return replace(law, coef=replace(law.coef, rel_error=rel)), held_out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="fit moeplan's quality law to validation/quality.yaml")
    ap.add_argument("--data", default=str(DATA_PATH))
    ap.add_argument("--write", action="store_true", help=f"store the fit in {COEFFICIENTS_PATH.name}")
    args = ap.parse_args(argv)
    sources = load_sources(args.data)
    law, held_out = fit_with_interval(sources)
    c = law.coef
    print("fitted: " + ", ".join(f"{k}={getattr(c, k):.4g}" for k in _FREE) + f", rel_error={c.rel_error:.3f}")
    print(f"{'source':28} {'rows':>4} {'in-sample median':>17} {'held-out median':>16}")
    for s in sources:
        print(f"{s.name:28} {len(held_out[s.name]):>4} {np.median(relative_errors(law, s)):>17.1%} "
              f"{np.median(held_out[s.name]):>16.1%}")
    every_in = np.concatenate([relative_errors(law, s) for s in sources])
    every_out = np.concatenate(list(held_out.values()))
    print(f"{'all':28} {every_out.size:>4} {np.median(every_in):>17.1%} {np.median(every_out):>16.1%}")
    if args.write:
        COEFFICIENTS_PATH.write_text(coefficients_to_yaml(c))
        print(f"wrote {COEFFICIENTS_PATH}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
