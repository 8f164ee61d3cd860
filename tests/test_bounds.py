"""Every documented bound (moeplan/bounds.py) is enforced, with an error that names the field."""

from __future__ import annotations

import importlib
import re

import numpy as np
import pytest
import yaml

import moeplan as mp
from moeplan import bounds
from moeplan import collectives as C
from tests.conftest import ROOT

MODEL = mp.load_model("st-moe-like-8b").with_(n_layers=4)
TOPO = mp.load_topology("dgx-h100")
E = importlib.import_module("moeplan.estimate")  # the module (mp.estimate is the function)


@pytest.mark.parametrize("name", sorted(bounds.MODEL))
def test_every_model_size_has_an_upper_and_lower_bound(name):
    low, high = bounds.MODEL[name]
    with pytest.raises(ValueError, match=rf"\.{name}: got {high + 1}; expected an integer from"):
        MODEL.with_(**{name: high + 1})
    below = -1 if name == "num_experts" else low - 1  # num_experts=0 is a dense model, as 1 (moe.MoEModel)
    with pytest.raises(ValueError, match=rf"\.{name}: got {below}"):
        MODEL.with_(**{name: below})
    with pytest.raises(ValueError, match=rf"\.{name}: got True"):
        MODEL.with_(**{name: True})


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 0.0, 1e4, "1.25", True])
def test_capacity_factor_is_a_finite_number_in_range_or_none(value):
    with pytest.raises(ValueError, match="capacity_factor"):
        MODEL.with_(capacity_factor=value)


@pytest.mark.parametrize("name", sorted(bounds.LAYOUT))
def test_every_layout_degree_is_bounded(name):
    high = bounds.LAYOUT[name][1]
    with pytest.raises(ValueError, match=rf"layout\.{name}: got {high + 1}"):
        mp.Layout(**{name: high + 1})


@pytest.mark.parametrize("name", ["sequence_parallel", "shard_optimizer"])
def test_layout_flags_are_booleans(name):
    with pytest.raises(ValueError, match=rf"layout\.{name}: got 'no'; expected True or False"):
        mp.Layout(**{name: "no"})


def test_estimate_refuses_wrong_objects_and_sizes():
    layout = mp.Layout(data=8)
    with pytest.raises(ValueError, match="profile: got a int"):
        mp.estimate(MODEL, TOPO, layout, 8 * 2048, profile=42)
    with pytest.raises(ValueError, match="routing: got a str"):
        mp.estimate(MODEL, TOPO, layout, 8 * 2048, routing="uniform")
    with pytest.raises(ValueError, match="layout: got a dict"):
        mp.estimate(MODEL, TOPO, {"data": 8}, 8 * 2048)
    with pytest.raises(ValueError, match="global_batch_tokens"):
        mp.estimate(MODEL, TOPO, layout, 2**40 + 1)
    with pytest.raises(ValueError, match="overlap"):
        mp.estimate(MODEL, TOPO, layout, 8 * 2048, overlap="bogus")


def test_the_final_guard_names_a_non_finite_output(monkeypatch):
    with pytest.raises(ValueError, match=r"estimate \(train\): the inputs give step_time_s = nan"):
        bounds.check_finite_outputs("estimate (train)", {"step_time_s": float("nan")})
    with pytest.raises(ValueError, match="memory_per_device_bytes = -1"):
        bounds.check_finite_outputs("x", {"memory_per_device_bytes": -1.0})
    real = E.plan_costs

    def poisoned(*args, **kwargs):
        costs = dict(real(*args, **kwargs))
        costs["step_time_s"] = float("inf")
        return costs

    monkeypatch.setattr(E, "plan_costs", poisoned)
    with pytest.raises(ValueError, match="step_time_s = inf"):
        mp.estimate(MODEL, TOPO, mp.Layout(data=8), 8 * 2048)


@pytest.mark.parametrize("size", [float("nan"), -1.0, 1e16, np.array([1e6, np.inf])])
def test_collective_sizes_are_finite_and_bounded(size):
    with pytest.raises(ValueError, match="bytes_per_device"):
        mp.collective_time_s(TOPO, "all_to_all", size, devices=8)


def test_collective_arguments_are_checked():
    with pytest.raises(ValueError, match="bytes_per_device: expected at most 10,000,000"):
        mp.collective_time_s(TOPO, "all_reduce", np.zeros(C.MAX_SIZES + 1), devices=8)
    with pytest.raises(ValueError, match="op: got 'allreduce'"):
        mp.collective_time_s(TOPO, "allreduce", 1e6, devices=8)
    with pytest.raises(ValueError, match="topo: got a str"):
        mp.collective_time_s("dgx-h100", "all_reduce", 1e6, devices=8)
    with pytest.raises(ValueError, match="params: got a dict"):
        mp.collective_time_s(TOPO, "all_reduce", 1e6, devices=8, params={})


def _numeric_keys(node, path=()):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _numeric_keys(value, (*path, key))
    elif isinstance(node, int | float) and not isinstance(node, bool):
        yield path


@pytest.mark.parametrize("family", ["dgx-h100", "tpu-v5p"])
def test_every_numeric_key_of_a_family_file_has_a_maximum(tmp_path, family):
    doc = yaml.safe_load((ROOT / "topologies" / f"{family}.yaml").read_text())
    paths = [p for p in _numeric_keys(doc) if p[-1] in bounds.FILE_MAX]
    assert len(paths) >= 10
    for path in paths:
        bad = yaml.safe_load((ROOT / "topologies" / f"{family}.yaml").read_text())
        node = bad
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = bounds.FILE_MAX[path[-1]] * 10 + 10
        file = tmp_path / f"{family}.yaml"
        file.write_text(yaml.safe_dump(bad))
        with pytest.raises(ValueError, match=re.escape(path[-1]) + r".*at most"):
            mp.load_topology(str(file))
    assert not [p for p in _numeric_keys(doc) if p[-1] not in bounds.FILE_MAX], "a numeric key without a maximum"


def test_a_family_of_too_many_devices_is_refused(tmp_path):
    doc = yaml.safe_load((ROOT / "topologies" / "dgx-h100.yaml").read_text())
    doc["switched"]["max_nodes"] = 100_000  # x 8 GPUs
    file = tmp_path / "big.yaml"
    file.write_text(yaml.safe_dump(doc))
    with pytest.raises(ValueError, match="max_nodes: 100000 nodes x 8 devices; expected at most 131,072"):
        mp.load_topology(str(file))


def test_search_arguments_are_bounded():
    space = mp.SearchSpace(num_experts=[8], top_k=[1])
    with pytest.raises(ValueError, match="chunk"):
        mp.search(MODEL, TOPO, space, global_batch_tokens=8 * 2048, chunk=0)
    with pytest.raises(ValueError, match="top"):
        mp.search(MODEL, TOPO, space, global_batch_tokens=8 * 2048, top=0)
    with pytest.raises(ValueError, match="time_budget_s"):
        mp.search(MODEL, TOPO, space, global_batch_tokens=8 * 2048, time_budget_s=float("nan"))
    with pytest.raises(ValueError, match="routing: got a str"):
        mp.search(MODEL, TOPO, space, global_batch_tokens=8 * 2048, routing="zipf")


def test_search_never_returns_a_nan_row():
    class HalfNaN:  # a user law that cannot rate 8-expert models
        name = "half"

        def loss(self, model, tokens):
            return np.where(np.asarray(model.num_experts) == 8, np.nan, 2.0) + 0 * np.asarray(tokens)

    space = mp.SearchSpace(num_experts=[8, 16], top_k=[1])
    result = mp.search(MODEL, TOPO, space, global_batch_tokens=8 * 2048, quality=HalfNaN())
    assert result.table and all(np.isfinite(r["loss"]) and r["num_experts"] == 16 for r in result.table)
    assert all(np.isfinite(c.loss) for c in result.pareto + result.configurations)


@pytest.mark.parametrize("kwargs", [dict(nccl_base_latency_s=-1e-6), dict(node_step_latency_s=float("nan")),
                                    dict(nvls_latency_s=5.0), dict(efficiency={"node": 0.8})])
def test_comm_params_validate(kwargs):
    with pytest.raises(ValueError, match="comm.(efficiency|.*latency_s)"):
        mp.CommParams(**kwargs)


@pytest.mark.parametrize("kwargs", [dict(e_max=float("nan")), dict(e_max=1.5), dict(e_max=0.8, s_half_bytes=-1),
                                    dict(e_max=0.8, shape=float("nan")), dict(e_max=0.8, s_half_bytes=float("inf"))])
def test_efficiency_curves_validate(kwargs):
    with pytest.raises(ValueError, match="efficiency"):
        mp.Efficiency(**kwargs)
