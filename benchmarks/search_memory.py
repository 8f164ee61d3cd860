"""Peak memory of the search: the default `make plan` search and a grid of about 10^8 points.

Each runs in a fresh process (peak RSS is per process) and prints points, seconds and peak RSS. The grid is
scored in pieces of at most `chunk` points (1,000,000 by default), so memory should not grow with it.

    python benchmarks/search_memory.py
"""

from __future__ import annotations

import subprocess
import sys

PLAN = """
from moeplan.cli import main
main(["plan", "--quiet", "--top", "1"])
"""

BIG = """
import moeplan as mp
model = mp.load_model("mixtral-8x7b").with_(n_layers=8, d_ff=14336)
topo = mp.load_topology("dgx-h100", nodes=16)
space = mp.SearchSpace(num_experts=[8, 12, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256], top_k=[1, 2, 3, 4, 6, 8],
                       capacity_factor=[None, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0], moe_every=[1, 2, 3, 4, 6],
                       expert_d_ff=[1792, 3584, 7168, 14336], fsdp=[1, 2, 4, 8], micro_batch_size=[1, 2, 4, 8],
                       pipeline=[1, 2, 4, 8], virtual_pipeline=[1, 2], recompute=["none", "selective", "full"])
result = mp.search(model, topo, space, global_batch_tokens=1024 * 4096, max_points=200_000_000)
print(f"grid of {result.considered:,} points, {result.evaluated:,} valid", flush=True)
"""

MEASURE = """
import resource, time
start = time.perf_counter()
exec(compile({code!r}, "<bench>", "exec"))
peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux
print(f"{{time.perf_counter() - start:.1f}} s, peak RSS {{peak_gib:.2f}} GiB")
"""


def main() -> None:
    for label, code in (("make plan search", PLAN), ("10^8-point grid", BIG)):
        out = subprocess.run([sys.executable, "-c", MEASURE.format(code=code)], capture_output=True, text=True)
        lines = [ln for ln in out.stdout.splitlines() if "grid of" in ln or "peak RSS" in ln]
        print(f"{label}: {' | '.join(lines) or out.stderr.strip()[-500:]}", flush=True)


if __name__ == "__main__":
    main()
