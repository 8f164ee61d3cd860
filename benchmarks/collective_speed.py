"""Speed of the vectorised collective model: 1e5 sizes in one call, per op and topology.

Prints the median wall time of one call and the rate in sizes per second. Target: 1e5 sizes in
under 100 ms.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

import moeplan as mp


def bench(topo, op, sizes, devices=None, repeats=7) -> float:
    mp.collective_time_s(topo, op, sizes, devices)  # warm the caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mp.collective_time_s(topo, op, sizes, devices)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    sizes = np.logspace(3, 11, 100_000)
    cases = [
        (mp.load_topology("tpu-v5p", shape=(8, 8, 8)), "all_to_all", None),
        (mp.load_topology("tpu-v5p", shape=(8, 8, 8)), "all_reduce", None),
        (mp.load_topology("dgx-h100", nodes=16), "all_reduce", None),
        (mp.load_topology("dgx-h100", nodes=16), "all_to_all", None),
        (mp.load_topology("gb200-nvl72", nodes=2), "all_gather", None),
    ]
    print(f"{'topology':24} {'op':12} {'ms / 1e5 sizes':>15} {'sizes / s':>12}")
    for topo, op, devices in cases:
        seconds = bench(topo, op, sizes, devices)
        print(f"{topo.name:24} {op:12} {seconds * 1e3:15.1f} {sizes.size / seconds:12.3g}")


if __name__ == "__main__":
    main()
