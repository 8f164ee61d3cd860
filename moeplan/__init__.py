"""moeplan: a hardware-aware cost simulator and layout planner for Mixture-of-Experts transformers.

The public API is listed in ``__all__`` and documented in docs/DESIGN.md. Importing moeplan pulls in
numpy, scipy, networkx and pyyaml only: jax lives under ``moeplan.calibrate``, plotly in
``moeplan.report`` and streamlit in ``app/``.
"""

from moeplan.collectives import CommParams, Efficiency, collective_cost, collective_time_s
from moeplan.cost import load_prices, step_cost
from moeplan.estimate import Estimate, LayerRow, estimate
from moeplan.families import list_topologies, load_topology
from moeplan.hardware import ChipSpec, LinkSpec
from moeplan.layout import Layout
from moeplan.moe import MLADims, MoEModel, list_presets, load_model, param_counts
from moeplan.profiles import Profile, load_profile
from moeplan.quality import LossEstimate, predict_loss
from moeplan.routing import Routing
from moeplan.schema import SchemaError
from moeplan.search import Constraints, SearchResult, SearchSpace, search
from moeplan.topology import DeviceMesh, Topology

__version__ = "0.1.0"


def validate(candidates, out="artifacts/validate", *, top: int = 6, steps: int = 3, profile=None,
             topology: str = "cpu-host") -> dict:
    """Run candidates as real JAX training steps on the local devices under the profiler and compare each
    part with its estimate (``moeplan.calibrate.validate``; needs the 'jax' extra). ``candidates``: a
    ``SearchResult`` (its first ``top`` configurations) or a list of ``(MoEModel, Layout)`` pairs. Returns the
    summary written to ``<out>/results.json``: per candidate and part measured and predicted seconds, the
    median |error| per part, and Kendall's tau of the step-time order."""
    from moeplan.calibrate.validate import validate as run

    if isinstance(candidates, SearchResult):
        candidates = [(c.model, c.layout) for c in candidates.configurations[:top]]
    return run(list(candidates), out, steps=steps, profile=profile, topology=topology)

__all__ = [
    "ChipSpec",
    "Estimate",
    "LayerRow",
    "Layout",
    "MLADims",
    "MoEModel",
    "Routing",
    "Profile",
    "load_profile",
    "LossEstimate",
    "predict_loss",
    "Constraints",
    "SearchResult",
    "SearchSpace",
    "search",
    "validate",
    "step_cost",
    "load_prices",
    "estimate",
    "list_presets",
    "load_model",
    "param_counts",
    "CommParams",
    "Efficiency",
    "collective_cost",
    "collective_time_s",
    "DeviceMesh",
    "LinkSpec",
    "SchemaError",
    "Topology",
    "list_topologies",
    "load_topology",
]
