"""The quality model against validation/quality.yaml: error per source, in-sample and leave-one-source-out.

Run: python benchmarks/validate_quality.py   (about 20 s). Errors are relative errors of within-table
loss differences (each row against its source's reference row); held-out = fitted without that source.
"""

from __future__ import annotations

import numpy as np

from moeplan import quality as Q
from moeplan.quality import fit as F


def main() -> None:
    sources = F.load_sources()
    F.main([])
    law = Q.default_law()
    print("\nper row (committed fit): predicted vs published difference against the reference row, nats")
    for s in sources:
        pred, meas, ids = F.differences(law, s)
        print(f"  {s.name}: {s.citation}")
        for i, p, m in zip(ids, pred, meas, strict=True):
            rel = abs(p - m) / abs(m) if abs(m) > 1e-9 else float("nan")
            print(f"    {i:24} {p:+.4f} {m:+.4f}  {rel:6.1%}")
    print(f"\ninterval half-width: {law.coef.rel_error:.1%} of the predicted MoE gain "
          f"(80th percentile of the held-out errors); median over all rows: "
          f"{np.median(np.concatenate([F.relative_errors(law, s) for s in sources])):.1%} in-sample")


if __name__ == "__main__":
    main()
