"""Re-render time of the dashboard's Estimate page after one input changes (Streamlit AppTest).

Target: under 300 ms per change. Prints the median and the slowest of 10 changes, each to a batch
size not seen before (so the estimate is computed, not served from the cache).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parent.parent / "app" / "dashboard.py")


def main() -> None:
    at = AppTest.from_file(APP, default_timeout=120).run()
    at.sidebar.radio(key="page").set_value("Estimate").run()
    times = []
    for i in range(10):
        at.number_input(key="est_batch").set_value((9 + i) * 4096)
        start = time.perf_counter()
        at.run()
        times.append(time.perf_counter() - start)
        assert not at.exception
    print(f"Estimate page re-render after a change: median {statistics.median(times) * 1e3:.0f} ms, "
          f"max {max(times) * 1e3:.0f} ms over {len(times)} changes")


if __name__ == "__main__":
    main()
