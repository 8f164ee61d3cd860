"""Re-render time of the dashboard after one estimate-sized change (Streamlit AppTest).

Target: under 300 ms per change. Prints the median and the slowest of 10 changes on the Estimate page
(each to a batch size not seen before, so the estimate is computed, not served from the cache) and on
the Plan page (a closer look at each recommended configuration in turn: its estimate, figures and exports).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parent.parent / "app" / "dashboard.py")


def _timed(at: AppTest, changes) -> list[float]:
    times = []
    for change in changes:
        change(at)
        start = time.perf_counter()
        at.run()
        times.append(time.perf_counter() - start)
        assert not at.exception
    return times


def _report(what: str, times: list[float]) -> None:
    print(f"{what}: median {statistics.median(times) * 1e3:.0f} ms, max {max(times) * 1e3:.0f} ms over "
          f"{len(times)} changes")


def main() -> None:
    at = AppTest.from_file(APP, default_timeout=300).run()  # the landing page: Plan
    picks = len(at.radio(key="plan_pick").options)
    _report("Plan page, a closer look at another configuration",
            _timed(at, [lambda a, i=i: a.radio(key="plan_pick").set_value(i % picks) for i in range(1, 11)]))
    at.sidebar.radio(key="page").set_value("Estimate").run()
    _report("Estimate page re-render after a change",
            _timed(at, [lambda a, i=i: a.number_input(key="est_batch").set_value((9 + i) * 4096) for i in range(10)]))


if __name__ == "__main__":
    main()
