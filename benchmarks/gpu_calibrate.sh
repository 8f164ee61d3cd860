#!/usr/bin/env bash
# Calibrate moeplan on one GPU (the device machine's image has jax; nothing is downloaded there).
# Usage: bash benchmarks/gpu_calibrate.sh [OUT]   (default profiles/<gpu>.yaml)
# Runs the quick plan on the first GPU JAX sees: under 8 minutes. On a machine without a GPU it
# runs the same code on the CPU (that is how the test suite checks this script).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then PY=.venv/bin/python; fi
kind=$("$PY" - <<'PYEOF'
import jax
d = jax.devices()[0]
print(("gpu-" + d.device_kind.lower().replace(" ", "-")) if d.platform == "gpu" else "cpu-host")
PYEOF
)
out=${1:-profiles/${kind}.yaml}
topology=$([ "$kind" = cpu-host ] && echo cpu-host || echo dgx-h100)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 480 "$PY" -m moeplan.cli calibrate --quick --devices 1 --topology "$topology" --out "$out"
