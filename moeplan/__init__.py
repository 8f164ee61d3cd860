"""moeplan: a hardware-aware cost simulator and layout planner for Mixture-of-Experts transformers.

The public API is listed in ``__all__`` and documented in docs/DESIGN.md. Importing moeplan pulls in
numpy, scipy, networkx and pyyaml only: jax lives under ``moeplan.calibrate``, plotly in
``moeplan.report`` and streamlit in ``app/``.
"""

from moeplan.collectives import CommParams, Efficiency, collective_cost, collective_time_s
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
