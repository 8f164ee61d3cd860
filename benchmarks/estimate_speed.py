"""Speed of one scalar estimate(): median over varied layouts and batches (no repeated inputs).

Target: one estimate() under 1 ms median on this machine. Wall time on a shared VM swings with the
host's load, so the process CPU time is printed too.
"""

from __future__ import annotations

import statistics
import time

import moeplan as mp


def main() -> None:
    cases = [
        (mp.load_model("mixtral-8x7b"), mp.load_topology("dgx-h100", nodes=8),
         [mp.Layout(data=16, expert=8, pipeline=4, virtual_pipeline=8), mp.Layout(data=64, expert=8),
          mp.Layout(data=16, tensor=4, expert=8)]),
        (mp.load_model("deepseek-v3"), mp.load_topology("tpu-v5p", shape=(8, 8, 8)),
         [mp.Layout(fsdp=64, data=8, expert=64), mp.Layout(fsdp=128, data=4, expert=256)]),
        (mp.load_model("qwen3-30b-a3b"), mp.load_topology("gb200-nvl72"),
         [mp.Layout(data=72, expert=8), mp.Layout(data=36, tensor=2, expert=8)]),
    ]
    for model, topo, layouts in cases:
        times, cpu = [], []
        for batch in range(1, 41):
            for layout in layouts:
                tokens = batch * layout.batch_shards * model.seq_len
                start, start_cpu = time.perf_counter(), time.process_time()
                mp.estimate(model, topo, layout, tokens)
                times.append(time.perf_counter() - start)
                cpu.append(time.process_time() - start_cpu)
        median_ms = statistics.median(times) * 1e3
        p90_ms = sorted(times)[int(0.9 * len(times))] * 1e3
        print(f"{'':14}    CPU time (not counting time the VM was descheduled): median "
              f"{statistics.median(cpu) * 1e3:.3f} ms")
        print(f"{model.name:14} on {topo.name:18} {len(times):4} estimates: "
              f"median {median_ms:.3f} ms, p90 {p90_ms:.3f} ms")


if __name__ == "__main__":
    main()
