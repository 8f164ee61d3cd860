"""Speed of the layout search: candidates scored per second on one core, and the `make plan` search.

Prints (1) the rate of a large search (cold: routing statistics computed; warm: memoised), and
(2) the wall time of the default plan search. Targets: >= 3e6 candidates/s warm, >= 1e6 cold, plan under 2 s.
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import moeplan as mp  # noqa: E402
from moeplan.cli import main as cli_main  # noqa: E402


def main() -> None:
    model = mp.load_model("mixtral-8x7b").with_(n_layers=8, d_ff=14336)
    topo = mp.load_topology("dgx-h100", nodes=4)
    space = mp.SearchSpace(num_experts=[8, 16, 32, 64], top_k=[1, 2, 4], capacity_factor=[None, 1.0, 1.25, 1.5, 2.0],
                           moe_every=[1, 2, 4], expert_d_ff=[3584, 7168, 14336], micro_batch_size=[1, 2, 4, 8],
                           pipeline=[1, 2, 4, 8], virtual_pipeline=[1, 2], fsdp=[1])
    rates, cpu_rates = [], []
    for run in range(6):  # the first run is cold (routing statistics computed), the others warm (memoised)
        start, cpu = time.perf_counter(), time.process_time()
        result = mp.search(model, topo, space, global_batch_tokens=256 * 4096)
        rates.append(result.evaluated / (time.perf_counter() - start))
        cpu_rates.append(result.evaluated / max(time.process_time() - cpu, 1e-9))
        if run == 0:
            print(f"search cold: {result.evaluated:,} candidates scored ({result.considered:,} considered) at "
                  f"{rates[0]:,.0f} candidates/s")
    warm = sorted(rates[1:])
    print(f"search warm, 5 runs: best {warm[-1]:,.0f}, median {warm[2]:,.0f}, worst {warm[0]:,.0f} candidates/s "
          "(a shared VM: the best run is the machine's rate, the spread its noise)")
    cpu_warm = sorted(cpu_rates[1:])
    print(f"search warm, CPU time (not counting time the VM was descheduled): best {cpu_warm[-1]:,.0f}, "
          f"median {cpu_warm[2]:,.0f} candidates/s")
    start = time.perf_counter()
    cli_main(["plan", "--quiet", "--top", "1"])
    print(f"make plan search (both topologies, printing included): {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()
