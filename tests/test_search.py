"""Layout search: vectorised scores equal estimate(), constraints hold, the Pareto front is right,
and the best expert-parallel degree follows the interconnect."""

from __future__ import annotations

import contextlib
import importlib
import json
import math

import numpy as np
import pytest

import moeplan as mp
from moeplan import grid as G
from moeplan.estimate import plan_costs
from moeplan.layout import check_layout
from moeplan.quality import FineGrainedMoELaw, granularity, non_embedding_params

S = importlib.import_module("moeplan.search")  # the module (moeplan.search is also the function's name)

MODEL = mp.load_model("st-moe-like-8b").with_(n_layers=8)
SPACE = S.SearchSpace(num_experts=[16, 32, 64], top_k=[1, 2], capacity_factor=[1.0, 1.25, None], moe_every=[1, 2, 4],
                      expert_d_ff=[2048, 8192], micro_batch_size=[1, 2], recompute=["selective", "full", "offload"])
GBT = 64 * 2048


def test_the_grids_validity_mask_is_every_single_layout_check_point_by_point():
    """grid.valid (the rule table over arrays) against its scalar twin: for every grid point, a Layout that can
    be built and passes check_layout, a model that can be built and whole micro-batches; same verdict."""
    model = MODEL.with_(n_heads=12, n_kv_heads=4, seq_len=2048)
    topo = mp.load_topology("dgx-h100", nodes=2)
    grid = G.build(dict(num_experts=[6, 8, 16], top_k=[1, 8], capacity_factor=[1.25], moe_every=[1, 2],
                        expert_d_ff=[1536, 2048], micro_batch_size=[1, 4], expert=[1, 2, 4, 8, 16],
                        expert_tensor=[1, 2, 3], tensor=[1, 2, 3, 4, 8], context=[1, 2, 3], pipeline=[1, 2, 16],
                        virtual_pipeline=[1, 2], fsdp=[1, 2, 4, 3], recompute=["selective"]))
    shape = G.shape_of(grid)
    mask = G.valid(grid, model, topo, 16 * 2048).reshape(-1)
    agree = kept = 0
    points = np.random.default_rng(1).choice(mask.size, 4000, replace=False)
    for j in points:
        at = np.unravel_index(j, shape)
        r = {k: int(np.broadcast_to(grid[k], shape)[at]) for k in ("data",) + G.KNOBS if k != "capacity_factor"}
        try:
            m = model.with_(num_experts=r["num_experts"], top_k=r["top_k"], moe_every=r["moe_every"],
                            expert_d_ff=r["expert_d_ff"])
            layout = mp.Layout(**{k: r[k] for k in ("data",) + G.LAYOUT_KNOBS[:-1]})
            check_layout(m, topo, layout)
            seqs = 16 // layout.batch_shards
            ok = 16 % layout.batch_shards == 0 and seqs % layout.micro_batch_size == 0 and seqs >= 1
        except ValueError:
            ok = False
        agree += ok == bool(mask[j])
        kept += ok
    assert agree == points.size and 100 < kept < points.size - 100, (agree, kept)


def test_offload_is_valid_exactly_where_the_family_states_a_host_link():
    for family, offload_ok in (("tpu-v3", False), ("tpu-v5p", True), ("dgx-h100", True)):
        topo = mp.load_topology(family)
        space = {k: [getattr(MODEL, k)] for k in G.MODEL_KNOBS} | {k: [1] for k in G.LAYOUT_KNOBS}
        grid = G.build(space | dict(fsdp=[1, topo.num_devices], recompute=["full", "offload"]))
        mask = np.moveaxis(G.valid(grid, MODEL, topo, topo.num_devices * MODEL.seq_len), G.KNOBS.index("recompute"), -1)
        assert mask.shape[-1] == 2 and mask[..., 0].any()
        assert (mask[..., 1] == (mask[..., 0] & offload_ok)).all(), family
        with contextlib.nullcontext() if offload_ok else pytest.raises(ValueError, match="layout.recompute"):
            check_layout(MODEL, topo, mp.Layout(fsdp=topo.num_devices, recompute="offload"))


@pytest.mark.parametrize("topo", [mp.load_topology("dgx-h100", nodes=2), mp.load_topology("tpu-v5p", shape=(2, 2, 4))],
                         ids=["h100x2", "v5p-2x2x4"])
def test_vectorised_scores_equal_scalar_estimate_on_200_random_layouts(topo):
    """The search's grid evaluation (every knob on its own axis) equals estimate() point by point,
    summary and per-part breakdown."""
    grid = G.build(SPACE.resolved(MODEL, topo))
    valid = np.flatnonzero(G.valid(grid, MODEL, topo, GBT))
    with np.errstate(divide="ignore", invalid="ignore"):
        costs = plan_costs(G.plan_of(grid, MODEL), topo, GBT)
    shape = G.shape_of(grid)
    pick = np.random.default_rng(0).choice(valid, size=min(200, valid.size), replace=False)
    assert pick.size == 200
    for j in pick:
        at = np.unravel_index(j, shape)
        record = {k: np.broadcast_to(grid[k], shape)[at] for k in ("data",) + G.KNOBS}
        record.update({k: np.broadcast_to(costs[k], shape)[at] for k in S._SCORES}, loss=0.0)
        c = S._candidate(MODEL, record, topo)
        est = mp.estimate(c.model, topo, c.layout, GBT)
        assert est.step_time_s == pytest.approx(c.step_time_s, rel=1e-9)
        assert est.tokens_per_s == pytest.approx(c.tokens_per_s, rel=1e-9)
        assert est.mfu == pytest.approx(c.mfu, rel=1e-9)
        assert est.memory_per_device_bytes == pytest.approx(c.memory_per_device_bytes, rel=1e-9)
        assert est.drop_rate == pytest.approx(c.drop_rate, rel=1e-9, abs=1e-15)
        for row in est.layers:
            assert row.time_s == pytest.approx(float(np.broadcast_to(costs[row.name], shape)[at]), rel=1e-9, abs=1e-15)


def test_grid_collectives_follow_each_contexts_collective_parameters():
    """The grid path memoises a placement's collective times per (topology, op, group, sizes, CommParams):
    a profile's parameters change them, and the defaults' come back unchanged after."""
    from types import SimpleNamespace

    from moeplan.plan import make_context

    topo = mp.load_topology("dgx-h100", nodes=2)
    grid = G.build(SPACE.resolved(MODEL, topo))
    G.valid(grid, MODEL, topo, GBT)  # sets the data axis
    plan = G.plan_of(grid, MODEL)
    times = []
    for comm in (mp.CommParams(), mp.CommParams(ops={"all_reduce": (1e-3, 1.0)}), mp.CommParams()):
        ctx = make_context(plan, topo, "bf16", SimpleNamespace(comm=comm, compute=None), None)
        times.append(ctx.coll("all_reduce", np.float64(2**20), "replicas"))
    sync = times[0] > 0
    assert sync.any() and (~sync).any()  # one device per replica group somewhere: nothing to sum there
    np.testing.assert_allclose(times[1][sync], times[0][sync] + 1e-3)  # a calibrated per-op latency on top
    assert np.all(times[1][~sync] == 0)
    assert np.array_equal(times[2], times[0])


def test_search_in_pieces_equals_search_in_one():
    """Cutting the grid into pieces (bounded memory) changes nothing: ranking, front, heatmap, counts."""
    topo = mp.load_topology("dgx-h100", nodes=2)
    for objective in ("quality_per_time", "quality", "step_time"):
        whole = mp.search(MODEL, topo, SPACE, global_batch_tokens=GBT, objective=objective, top=50)
        cut = mp.search(MODEL, topo, SPACE, global_batch_tokens=GBT, objective=objective, top=50, chunk=3000)
        assert cut.table == whole.table and cut.evaluated == whole.evaluated and cut.details == whole.details
        assert [(c.layout, c.model) for c in cut.pareto] == [(c.layout, c.model) for c in whole.pareto]
        assert [(c.layout, c.model) for c in cut.configurations] == [(c.layout, c.model) for c in whole.configurations]
    coupled = S.SearchSpace(top_k=[1, 2, 4], num_experts=[16, 32], micro_batch_size=[1, 2], keep_active=True)
    whole = mp.search(MODEL, topo, coupled, global_batch_tokens=GBT, top=50)
    cut = mp.search(MODEL, topo, coupled, global_batch_tokens=GBT, top=50, chunk=500)  # cuts the top_k axis too
    assert cut.table == whole.table and len({r["expert_d_ff"] for r in whole.table}) > 1


def test_search_result_satisfies_constraints_and_reproduces():
    topo = mp.load_topology("dgx-h100", nodes=2)
    limits = S.Constraints(max_drop_rate=0.01, max_step_time_s=5.0)
    result = mp.search(MODEL, topo, SPACE, global_batch_tokens=GBT, objective="step_time", constraints=limits)
    assert result.evaluated > 1000 and result.table
    for row in result.table:
        assert row["fits"] and row["drop_rate"] <= 0.01 and row["step_time_s"] <= 5.0
        assert row["data"] * row["fsdp"] * row["tensor"] * row["pipeline"] == topo.num_devices
    times = [r["step_time_s"] for r in result.table]
    assert times == sorted(times)
    best = result.best
    assert mp.estimate(best.model, topo, best.layout, GBT).step_time_s == pytest.approx(best.step_time_s, rel=1e-9)


@pytest.mark.parametrize("n, digits", [(500, None), (8000, None), (8000, 2)])
def test_pareto_front_is_non_dominated_and_complete(n, digits):
    """Brute force over every pair; 8000 points go through the bucketing pass, rounded ones have ties."""
    rng = np.random.default_rng(3)
    loss, time = rng.random(n), rng.random(n) ** 3
    if digits:
        loss, time = loss.round(digits), time.round(digits)
    keep = rng.random(n) < 0.8
    front = S.pareto_front(loss, time, keep)
    kept = np.flatnonzero(keep)
    dominated = np.zeros(n, bool)
    for block in np.array_split(kept, 8):
        lb, tb = loss[block, None], time[block, None]
        dominated[block] = np.any((loss[kept] <= lb) & (time[kept] <= tb) & ((loss[kept] < lb) | (time[kept] < tb)), 1)
    undominated = [int(i) for i in kept if not dominated[i]]
    # equal points are not dominated by each other: the front keeps the first of each (loss, time)
    first = {}
    for i in undominated:
        first.setdefault((loss[i], time[i]), i)
    assert sorted(front) == sorted(first.values())
    assert [time[i] for i in front] == sorted(time[i] for i in front)
    result = mp.search(MODEL, mp.load_topology("dgx-h100"), SPACE, global_batch_tokens=GBT)
    pts = [(c.loss, c.step_time_s) for c in result.pareto]
    assert all(not (a[0] <= b[0] and a[1] <= b[1] and a != b) for a in pts for b in pts)


def test_expert_parallel_follows_the_interconnect():
    """All-to-all inside one NVLink domain is cheap; across InfiniBand nodes it is not."""
    model = mp.load_model("qwen3-30b-a3b").with_(num_experts=64, n_layers=12)
    space = S.SearchSpace(expert=[1, 2, 4, 8, 16, 32, 64], tensor=[1], pipeline=[1], micro_batch_size=[1],
                          recompute=["selective"])

    def best_by_expert(topo):
        result = mp.search(model, topo, space, global_batch_tokens=64 * 4096 * 4, objective="step_time", top=500)
        best: dict[int, float] = {}
        for row in result.table:
            best.setdefault(row["expert"], row["step_time_s"])
        return best

    rack = best_by_expert(mp.load_topology("gb200-nvl72", nodes=1, devices_per_node=64))
    cluster = best_by_expert(mp.load_topology("dgx-h100", nodes=8))
    assert rack[64] / rack[8] < 1.1  # one NVLink domain: spreading experts wider costs little
    assert cluster[16] / cluster[8] > 1.3  # leaving the node puts the all-to-all on the NICs
    assert min(cluster, key=cluster.get) <= 8


def test_objectives_and_bad_input():
    topo = mp.load_topology("dgx-h100")
    for objective in S.OBJECTIVES:
        result = mp.search(MODEL, topo, SPACE, global_batch_tokens=GBT, objective=objective, top=5)
        assert result.best is not None
    with pytest.raises(ValueError, match="objective"):
        mp.search(MODEL, topo, SPACE, global_batch_tokens=GBT, objective="fastest")
    with pytest.raises(ValueError, match="space.top_k"):
        mp.search(MODEL, topo, S.SearchSpace(top_k=[]), global_batch_tokens=GBT)
    with pytest.raises(ValueError, match="space.recompute"):
        mp.search(MODEL, topo, S.SearchSpace(recompute=["most"]), global_batch_tokens=GBT)
    nothing = mp.search(MODEL, topo, SPACE, global_batch_tokens=GBT, constraints=S.Constraints(max_step_time_s=1e-9))
    assert nothing.best is None and nothing.table == [] and nothing.evaluated > 0


def test_quality_law_matches_the_paper_and_moves_the_right_way():
    law = FineGrainedMoELaw()
    m = MODEL
    n = float(non_embedding_params(m))
    g = float(granularity(m))
    expected = 0.47 + (2.1 / g**0.58 + 18.1) / n**0.115 + 30.8 / 1e11**0.147
    assert float(law.loss(m, 1e11)) == pytest.approx(expected, rel=1e-12)
    assert law.loss(m, 2e11) < law.loss(m, 1e11)  # more tokens
    assert law.loss(m.with_(num_experts=128), 1e11) < law.loss(m, 1e11)  # more parameters
    finer = m.with_(num_experts=128, expert_d_ff=4096)  # same total N, twice the granularity
    assert float(non_embedding_params(finer)) == pytest.approx(n)
    assert law.loss(finer, 1e11) < law.loss(m, 1e11)
    assert bool(law.in_range(mp.load_model("st-moe-like-8b").with_(n_layers=4), 5e10))
    assert not bool(law.in_range(mp.load_model("deepseek-v3"), 1e13))


def test_search_speed_smoke():
    """Not a timing test: the vectorised path handles a large space in one call."""
    result = mp.search(MODEL, mp.load_topology("tpu-v5p", shape=(4, 4, 4)), SPACE, global_batch_tokens=256 * 2048)
    assert result.evaluated > 10_000


def test_grouping_helpers_match_numpy_unique_and_brute_force():
    est = importlib.import_module("moeplan.plan")
    rng = np.random.default_rng(5)
    code = rng.integers(0, 50, 1000)
    first, inverse = est._dense_unique(code)
    uniq, first_np, inverse_np = np.unique(code, return_index=True, return_inverse=True)
    assert first.tolist() == first_np.tolist() and inverse.tolist() == inverse_np.reshape(-1).tolist()
    members = est._members(inverse, len(first))
    assert all(sorted(np.flatnonzero(inverse == j).tolist()) == m.tolist() for j, m in enumerate(members))
    cols = (rng.integers(0, 3, (4, 1, 1)), rng.integers(0, 500, (1, 5, 1)), rng.integers(0, 2, (1, 1, 6)))
    rows, index = est.distinct_rows(cols)
    flat = np.stack([np.broadcast_to(c, (4, 5, 6)).reshape(-1) for c in cols], 1)
    assert index.shape == (4, 5, 6) and np.array_equal(rows[index.reshape(-1)], flat)
    assert len(rows) == len(np.unique(flat, axis=0))
    result = mp.search(MODEL, mp.load_topology("dgx-h100"), SPACE, global_batch_tokens=GBT, top=10_000)
    heat = result.details["heatmap"]
    for i, experts in enumerate(heat["num_experts"]):
        for j, cf in enumerate(heat["capacity_factor"]):
            times = [r["step_time_s"] for r in result.table if r["num_experts"] == experts and
                     ("dropless" if r["capacity_factor"] is None else f"{r['capacity_factor']:g}") == cf]
            if times:
                assert heat["step_time_s"][j][i] == pytest.approx(min(times))


def test_model_shape_knobs_merge_exactly_and_bigger_budgets_pick_bigger_models():
    """Searching d_model x n_layers equals searching each reshaped model alone and taking the best; a larger
    device-hour budget buys a model with at least as many active parameters (compute-optimal design)."""
    base = mp.load_model("st-moe-like-8b")
    topo = mp.load_topology("dgx-h100", nodes=2)
    knobs = dict(num_experts=[32, 64], top_k=[1, 2], moe_every=[2], capacity_factor=[1.25])
    space = S.SearchSpace(**knobs, d_model=[1024, 2048], n_layers=[8, 16], keep_active=True)
    both = mp.search(base, topo, space, global_batch_tokens=GBT, device_hours=2000)
    alone = [mp.search(m, topo, S.SearchSpace(**knobs, keep_active=True), global_batch_tokens=GBT, device_hours=2000)
             for m in space.shapes(base)]
    assert len(space.shapes(base)) == 4 and both.evaluated == sum(r.evaluated for r in alone)
    def key(c):
        return c.model.d_model, c.model.n_layers, c.model.num_experts, c.model.top_k, c.loss, c.step_time_s

    union = [c for r in alone for c in r.configurations]
    assert sorted(map(key, both.configurations)) == sorted(map(key, union))
    lowest = min(union, key=lambda c: c.loss)
    assert both.best.step_time_s == min(c.step_time_s for c in union if c.loss_low <= lowest.loss_high)
    for c in both.configurations:  # keep_active: top_k x expert width is the reshaped model's own
        own = next(m for m in space.shapes(base) if (m.d_model, m.n_layers) == (c.model.d_model, c.model.n_layers))
        assert abs(c.model.top_k * c.model.expert_d_ff - own.top_k * own.expert_d_ff) <= 64 * c.model.top_k
        assert mp.estimate(c.model, topo, c.layout, GBT).step_time_s == pytest.approx(c.step_time_s, rel=1e-9)
    small, large = (mp.search(base, topo, space, global_batch_tokens=GBT, device_hours=h, objective="quality_per_time")
                    for h in (200, 200_000))
    size = [float(mp.quality.active_non_embedding_params(r.best.model)) for r in (small, large)]
    assert size[1] >= size[0] and large.best.loss < small.best.loss
    assert small.details["time_budget_s"] == pytest.approx(200 * 3600 / topo.num_devices)


def test_shape_and_budget_input_errors():
    topo = mp.load_topology("dgx-h100")
    with pytest.raises(ValueError, match="space.d_model"):
        mp.search(MODEL, topo, S.SearchSpace(d_model=[0]), global_batch_tokens=GBT)
    with pytest.raises(ValueError, match="keep_active"):
        mp.search(MODEL, topo, S.SearchSpace(expert_d_ff=[1024], keep_active=True), global_batch_tokens=GBT)
    with pytest.raises(ValueError, match="device_hours"):
        mp.search(MODEL, topo, SPACE, global_batch_tokens=GBT, device_hours=-1)
    with pytest.raises(ValueError, match="MLA"):
        mp.load_model("deepseek-v3").reshaped(d_model=1024)


def test_pieces_are_bounded_whatever_the_axis_lengths_and_cover_the_grid_once():
    """Short axes only (no axis long enough to cut alone): pieces still hold at most ``chunk`` points, and
    their indices partition the grid; no whole-grid index array is needed."""
    single = ("expert_tensor", "context")  # one value each: 3^12 = 531,441 points over the other axes
    grid = G.build({k: [1] if k in single else list(range(1, 4)) if k not in ("capacity_factor", "recompute") else
                    ([1.0, 1.25, None] if k == "capacity_factor" else ["none", "selective", "full"])
                    for k in G.KNOBS})
    points = 3 ** (len(G.KNOBS) - len(single))
    pieces = G.pieces(grid, chunk=1000)
    sizes = [idx.size for _, idx in pieces]
    assert max(sizes) <= 1000 and sum(sizes) == points
    seen = np.concatenate([idx for _, idx in pieces])
    assert np.unique(seen).size == points
    piece, idx = pieces[7]
    shape = G.shape_of(piece)
    assert math.prod(shape) == idx.size
    full = G.shape_of(grid)
    for axis, k in enumerate(G.KNOBS):  # a piece's knob values are the grid's at its indices
        at = np.unravel_index(idx, full)[axis]
        values = np.broadcast_to(grid[k], full).reshape(-1)[idx]
        assert np.array_equal(np.broadcast_to(piece[k], shape).reshape(-1), values, equal_nan=True)
        assert at.size == idx.size


def test_a_grid_past_the_point_budget_is_refused_with_its_size():
    space = S.SearchSpace(num_experts=list(range(1, 65)), top_k=[1, 2, 4, 8], moe_every=[1, 2, 3, 4],
                          capacity_factor=[1.0, 1.25, 1.5, 2.0, None], micro_batch_size=[1, 2, 4, 8, 16])
    with pytest.raises(ValueError, match=r"space: the grid has [\d,]+ points, more than max_points=1,000,000"):
        mp.search(MODEL, mp.load_topology("tpu-v5p", shape=(4, 4, 8)), space, global_batch_tokens=GBT,
                  max_points=1_000_000)


def test_default_space_reaches_deep_pipelines_virtual_stages_and_fsdp_on_gpus():
    model = mp.load_model("mixtral-8x7b")
    topo = mp.load_topology("dgx-h100", nodes=8)
    space = mp.SearchSpace().resolved(model, topo)
    assert max(space["pipeline"]) == 32  # 64 devices, 32 layers
    assert 2 in space["virtual_pipeline"] and max(space["fsdp"]) == 64


@pytest.mark.parametrize("knob,values,message", [
    ("pipeline", [64], "more stages than the model's 32 layers"),
    ("tensor", [3], "does not divide the 64 devices"),
    ("tensor", [64], "does not divide the model's 32 heads"),
    ("expert", [16], "divides none of the expert counts"),
    ("virtual_pipeline", [2], "needs a pipeline of 2 or more"),
    ("recompute", ["full", "offload"], "needs a link to host memory, which tpu-v3 does not state"),
])
def test_space_values_no_layout_can_use_are_errors(knob, values, message):
    model = mp.load_model("mixtral-8x7b")
    topo = mp.load_topology("tpu-v3" if knob == "recompute" else "dgx-h100", nodes=None if knob == "recompute" else 8)
    extra = {"pipeline": [1]} if knob == "virtual_pipeline" else {}
    with pytest.raises(ValueError, match=f"space.{knob}: .*{message}"):
        mp.SearchSpace(**{knob: values}, **extra).resolved(model, topo)


def test_search_and_the_cli_take_a_calibration_profile(capsys):
    from moeplan.cli import main
    from tests.conftest import ROOT

    path = ROOT / "profiles" / "cpu-host.yaml"
    profile = mp.load_profile(path)
    model = mp.MoEModel(name="tiny", d_model=256, n_layers=4, n_heads=4, n_kv_heads=4, d_head=64, vocab_size=1024,
                        seq_len=256, d_ff=512, num_experts=8, top_k=2, expert_d_ff=256, moe_every=2)
    topo = mp.load_topology("cpu-host")
    space = mp.SearchSpace(num_experts=[8], top_k=[2])
    plain = mp.search(model, topo, space, global_batch_tokens=16 * 256)
    fitted = mp.search(model, topo, space, global_batch_tokens=16 * 256, profile=profile)
    best = fitted.best
    again = mp.estimate(best.model, topo, best.layout, 16 * 256, profile=profile)
    assert best.step_time_s == pytest.approx(again.step_time_s, rel=1e-9)
    assert best.step_time_s != pytest.approx(plain.best.step_time_s, rel=1e-3)
    argv = ["estimate", "--topology", "cpu-host", "--model", "st-moe-like-8b", "--batch-tokens", "16384",
            "--layout", "data=8,expert=8", "--json"]
    assert main(argv) == 0
    without = json.loads(capsys.readouterr().out)["step_time_s"]
    assert main(argv + ["--profile", str(path)]) == 0
    assert json.loads(capsys.readouterr().out)["step_time_s"] != pytest.approx(without, rel=1e-3)
