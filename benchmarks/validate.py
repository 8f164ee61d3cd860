"""Accuracy benchmark: every published measurement the model can express, with its error.

Prints id, what was measured, measured, predicted and the relative error in time per point,
then the summary (median and worst, all points and held-out points only) and what was skipped
and why. Not a test: tests/test_collectives.py asserts the bounds.
"""

from __future__ import annotations

import statistics
import sys

from moeplan.collectives import LL_KERNEL_LATENCY_S, LL_LATENCY_FITTED_TO, RAMP_FITTED_TO
from moeplan.dispatch import SM_COPY_FITTED_TO
from moeplan.validation import (
    COLLECTED_PATH,
    KORTHIKANTI_PATH,
    RANKINGS_PATH,
    STEP_LATENCY_FITTED_TO,
    TRAINING_PATH,
    collected_leave_one_source_out,
    collective_rows,
    leave_one_source_out,
    load_points,
    ranking_taus,
    relative_rows,
    summarize,
    training_rows,
)


def main() -> int:
    points = load_points()
    rows, skipped = collective_rows(points)
    print(f"{'id':5} {'measurement':58} {'metric':18} {'measured':>10} {'predicted':>10} {'error':>7}  algorithm")
    for r in rows:
        tag = "*" if r.in_sample else " "
        print(f"{r.point_id:4}{tag} {r.label:58} {r.metric:18} {r.measured:10.3g} {r.predicted:10.3g} "
              f"{r.error:+7.1%}  {r.algorithm}")
    s = summarize(rows)
    print(f"\ncollective + moe_dispatch: {s['points']} points, median |error| {s['median_abs_error']:.1%}, "
          f"worst {s['max_abs_error']:.1%}; held out ({s['held_out_points']} points, * = calibration input): "
          f"median {s['held_out_median_abs_error']:.1%}")
    loso = summarize(leave_one_source_out(points))
    sm_points = sorted({pid for ids in SM_COPY_FITTED_TO.values() for pid in ids})
    print(f"leave-one-source-out (the size ramp refitted without each of its points {', '.join(RAMP_FITTED_TO)}; "
          f"the dispatch kernels' per-SM copy figures, fitted to {', '.join(sm_points)}, left out for it): "
          f"median |error| {loso['median_abs_error']:.1%}, worst {loso['max_abs_error']:.1%}; in-sample "
          f"{s['median_abs_error']:.1%}")
    collected = load_points(COLLECTED_PATH)
    c_rows, c_skipped = collective_rows(collected)
    print(f"\ncollected by the project ({COLLECTED_PATH.name}: cloud fabrics, newer NVLink generations):")
    for r in c_rows:
        print(f"{r.point_id:16} {r.label:52} {r.metric:18} {r.measured:10.3g} {r.predicted:10.3g} {r.error:+7.1%}  "
              f"{r.algorithm}")
    c, c_loso = summarize(c_rows), summarize(collected_leave_one_source_out(collected))
    fits = "; ".join(f"{family} from {' and '.join(ids)}" for family, ids in STEP_LATENCY_FITTED_TO.items())
    fits += (f"; DeepEP low-latency kernel latency {LL_KERNEL_LATENCY_S * 1e6:.1f} us from "
             f"{', '.join(LL_LATENCY_FITTED_TO)}")
    print(f"collected: {c['points']} points, median |error| {c['median_abs_error']:.1%} in-sample, "
          f"{c_loso['median_abs_error']:.1%} leave-one-source-out (fitted: {fits}); "
          f"worst {c_loso['max_abs_error']:.1%}")
    both = summarize(leave_one_source_out(points) + collected_leave_one_source_out(collected))
    print(f"public + collected, leave-one-source-out: {both['points']} points, median |error| "
          f"{both['median_abs_error']:.1%}")
    skipped = skipped + c_skipped
    print("\nrelative (published ratios; figure-read or second-hand, not asserted):")
    for r in relative_rows(points):
        print(f"  {r.point_id:4} {r.label:58} measured {r.measured:6.3g}  predicted {r.predicted:6.3g}  {r.error:+.0%}")
    train, train_skipped = training_rows(points)
    print("\ntraining steps (estimate() against published runs):")
    for r in train:
        print(f"  {r.point_id:20} {r.label:52} {r.metric:12} {r.measured:10.4g} {r.predicted:10.4g} {r.error:+7.1%}")
    t = summarize(train)
    print(f"training_step: {t['points']} points, median |error| {t['median_abs_error']:.1%}, "
          f"worst {t['max_abs_error']:.1%}; leave-one-source-out the same: no constant of the step model is fitted "
          "to a training point (efficiencies come from datasheets and kernel papers)")
    skipped = skipped + train_skipped
    collected_train, collected_skipped = training_rows(load_points(TRAINING_PATH))
    print(f"\ntraining runs collected by the project ({TRAINING_PATH.name}):")
    for r in collected_train:
        print(f"  {r.point_id:36} {r.label:52} {r.metric:12} {r.measured:10.4g} {r.predicted:10.4g} {r.error:+7.1%}")
    ct = summarize(collected_train)
    fast = sum(r.error < 0 for r in collected_train)
    print(f"collected training: {ct['points']} points, median |error| {ct['median_abs_error']:.1%}, worst "
          f"{ct['max_abs_error']:.1%}, {fast} of them too fast; held out (nothing fitted), so leave-one-source-out "
          "is the same")
    by_family: dict[str, list[float]] = {}
    for r in train + collected_train:
        by_family.setdefault(r.label.split()[0], []).append(abs(r.error))
    print("  median |error| per family, published and collected: " + ", ".join(
        f"{fam} {statistics.median(errs):.0%} ({len(errs)})" for fam, errs in sorted(by_family.items())))
    skipped = skipped + collected_skipped
    ranked = load_points(RANKINGS_PATH)
    rank_rows, rank_skipped = training_rows(ranked)
    print("\nlayout rankings (published speed tables; Kendall tau between measured and predicted order):")
    for r in rank_rows:
        print(f"  {r.point_id:32} {r.metric:16} measured {r.measured:9.4g}  predicted {r.predicted:9.4g}  "
              f"{r.error:+7.1%}")
    for name, (tau, count) in ranking_taus(ranked).items():
        print(f"  {name}: Kendall tau {tau:.2f} over {count} rows, median |error| "
              f"{summarize(rank_rows)['median_abs_error']:.1%}; nothing fitted to them")
    skipped = skipped + rank_skipped
    suite, suite_skipped = training_rows(load_points(KORTHIKANTI_PATH))
    print("\nCalculon's validation suite (Korthikanti et al. 2022, Table 5; framework='megatron-2022'):")
    for r in suite:
        print(f"  {r.point_id:26} measured {r.measured:7.2f} s  predicted {r.predicted:7.2f} s  {r.error:+7.1%}")
    mean = sum(abs(r.error) for r in suite) / max(len(suite), 1)
    print(f"suite: {len(suite)} points, mean |error| {mean:.1%} (Calculon's own: 3.7 %), held out (nothing fitted)")
    skipped = skipped + suite_skipped
    print(f"skipped {len(skipped)}:")
    for ident, reason in skipped:
        print(f"  {ident:8} {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
