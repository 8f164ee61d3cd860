"""The long fuzz run: N inputs per target (default 10,000) through every loader, API entry point and the CLI.

Counts per target: clear ValueErrors, other exceptions (by type and the line that raised them), wrong
results (an AssertionError from the target's checks: non-finite or negative outputs, a refused file
accepted), inputs over 10 s, the slowest input, and the peak RSS of the process.

    python benchmarks/fuzz.py [N] [target-name-substring]
"""

from __future__ import annotations

import resource
import signal
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

from hypothesis import HealthCheck, given, settings

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.fuzz_targets import TARGETS  # noqa: E402

LIMIT_S = 10


class _Hang(Exception):
    pass


def _alarm(signum, frame):
    raise _Hang()


def fuzz(target, n: int) -> dict:
    counts: Counter = Counter()
    sites: Counter = Counter()
    slowest = 0.0

    @settings(max_examples=n, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(target.inputs)
    def one(value):
        nonlocal slowest
        start = time.perf_counter()
        signal.alarm(LIMIT_S)
        try:
            target.run(value)
            counts["accepted"] += 1
        except ValueError:
            counts["value_error"] += 1
        except _Hang:
            counts["hang"] += 1
            sites[f"hang: {repr(value)[:120]}"] += 1
        except AssertionError as exc:
            counts["wrong_result"] += 1
            sites[f"wrong: {str(exc)[:100]} {repr(value)[:100]}"] += 1
        except Exception as exc:  # noqa: BLE001 - counting them is the point
            counts["other"] += 1
            frame = traceback.extract_tb(exc.__traceback__)[-1]
            sites[f"{type(exc).__name__} at {Path(frame.filename).name}:{frame.lineno}"] += 1
        finally:
            signal.alarm(0)
        slowest = max(slowest, time.perf_counter() - start)

    one()
    return {"counts": counts, "sites": sites, "slowest_s": slowest}


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    only = sys.argv[2] if len(sys.argv) > 2 else ""
    signal.signal(signal.SIGALRM, _alarm)
    for target in TARGETS:
        if only.lower() not in target.name.lower():
            continue
        start = time.perf_counter()
        result = fuzz(target, n)
        c = result["counts"]
        rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
        print(f"{target.name:20} {sum(c.values()):>6} inputs: {c['value_error']:>6} ValueError, {c['accepted']:>6} "
              f"accepted, {c['other']} other exceptions, {c['wrong_result']} wrong results, {c['hang']} over "
              f"{LIMIT_S} s; slowest {result['slowest_s']:.2f} s; {time.perf_counter() - start:.0f} s; "
              f"peak RSS so far {rss_gb:.2f} GB", flush=True)
        for site, count in result["sites"].most_common(8):
            print(f"    {count:>5}  {site}")


if __name__ == "__main__":
    main()
