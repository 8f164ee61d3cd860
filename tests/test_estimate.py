"""estimate(): memory by hand, physics directions, impossible layouts, inference, published runs."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest

import moeplan as mp
from moeplan.hardware import LinkSpec
from moeplan.topology import NodeSpec, ScaleOut, switched_cluster
from moeplan.validation import load_points, training_rows

DENSE_LIKE = dict(d_model=1024, n_layers=8, n_heads=16, n_kv_heads=16, d_head=64, vocab_size=32000, seq_len=1024,
                  d_ff=4096, num_experts=8, top_k=1, expert_d_ff=4096, moe_every=1000, capacity_factor=1.0)


def test_dense_model_memory_equals_a_hand_count():
    model = mp.MoEModel(**DENSE_LIKE)  # moe_every > n_layers: no MoE layer at all
    assert model.n_moe_layers == 0
    topo = mp.load_topology("dgx-h100")
    layout = mp.Layout(data=8, micro_batch_size=1, recompute="full", shard_optimizer=False)
    est = mp.estimate(model, topo, layout, global_batch_tokens=8 * 1024)
    params = 8 * (4 * 1024 * 1024 + 3 * 1024 * 4096) + 2 * 32000 * 1024
    assert mp.param_counts(model)["total"] == params
    assert est.memory["weights"] == pytest.approx(2 * params)  # bf16
    assert est.memory["optimizer_and_grads"] == pytest.approx(16 * params)  # fp32 grads, master, Adam m and v
    # full recompute keeps each layer's input (bf16) plus one layer's activations and the fp32 logits
    tokens = 1024
    per_layer = 2 * (3 * 1024 + 2 * 16 * 64 + 2 * 16 * 64) + 2 * (2 * 1024 + 3 * 4096)
    expected = tokens * 1024 * 2 * 8 + tokens * per_layer + tokens * 32000 * 4
    assert est.memory["activations"] == pytest.approx(expected)
    sharded = mp.estimate(model, topo, mp.Layout(data=8, recompute="full"), global_batch_tokens=8 * 1024)
    assert sharded.memory["optimizer_and_grads"] == pytest.approx(4 * params + 12 * params / 8)


def test_maxtext_keeps_fp32_weights_where_megatron_keeps_bf16_and_an_fp32_master():
    """Per parameter, unsharded: Megatron 2 (bf16 weights) + 4 (fp32 grads) + 4 (master) + 8 (Adam) = 18 bytes;
    MaxText (weight_dtype float32) 4 + 4 + 8 = 16; fp32 training is 4 + 4 + 8 either way."""
    model = mp.MoEModel(**DENSE_LIKE)
    params = mp.param_counts(model)["total"]
    topo = mp.load_topology("dgx-h100")
    layout = mp.Layout(data=8, recompute="full", shard_optimizer=False)
    mem = {(fw, dtype): mp.estimate(model, topo, layout, 8 * 1024, dtype=dtype, framework=fw).memory
           for fw in ("megatron", "maxtext") for dtype in ("bf16", "fp32")}
    assert mem["megatron", "bf16"]["weights"] == pytest.approx(2 * params)
    assert mem["megatron", "bf16"]["optimizer_and_grads"] == pytest.approx(16 * params)
    assert mem["maxtext", "bf16"]["weights"] == pytest.approx(4 * params)
    assert mem["maxtext", "bf16"]["optimizer_and_grads"] == pytest.approx(12 * params)
    for part in ("weights", "optimizer_and_grads"):
        assert mem["maxtext", "fp32"][part] == pytest.approx(mem["megatron", "fp32"][part])


def _mixtral_small():
    return mp.load_model("mixtral-8x7b").with_(n_layers=8)


def test_dropless_straggler_is_never_faster_than_balanced():
    topo = mp.load_topology("dgx-h100")
    layout = mp.Layout(data=8, expert=8)
    model = _mixtral_small()
    balanced = mp.estimate(model, topo, layout, 8 * 4096, routing=mp.Routing("balanced"))
    uniform = mp.estimate(model, topo, layout, 8 * 4096)
    skewed = mp.estimate(model, topo, layout, 8 * 4096, routing=mp.Routing("zipf", skew=1.0))
    assert balanced.step_time_s <= uniform.step_time_s <= skewed.step_time_s
    assert skewed.step_time_s > 1.2 * balanced.step_time_s


def _cluster(scale: float):
    node = NodeSpec(8, LinkSpec("nvl", 4.5e11 * scale, 3e-7), in_switch_reduction=True)
    so = ScaleOut(LinkSpec("pcie", 6.4e10 * scale, 5e-7), LinkSpec("nic", 5e10 * scale, 8.5e-7), 32, 1.0)
    return switched_cluster("c", mp.load_topology("dgx-h100").chip, 4, node, so)


@pytest.mark.parametrize("layout", [mp.Layout(data=32, expert=8), mp.Layout(data=8, tensor=4, expert=8),
                                    mp.Layout(data=4, fsdp=4, pipeline=2, expert=8, micro_batch_size=1)])
def test_more_link_bandwidth_is_never_slower(layout):
    model = _mixtral_small()
    times = [mp.estimate(model, _cluster(s), layout, 64 * 4096).step_time_s for s in (0.5, 1.0, 2.0, 8.0)]
    assert all(b <= a * (1 + 1e-12) for a, b in zip(times, times[1:], strict=False))
    assert times[0] > times[-1]


def test_capacity_factor_pads_compute_and_drops_tokens():
    topo = mp.load_topology("tpu-v5p", shape=(2, 2, 2))
    model = mp.load_model("switch-base-128").with_(n_layers=4)
    layout = mp.Layout(data=8, expert=8, micro_batch_size=4)
    tight = mp.estimate(model, topo, layout, 8 * 4 * 512, mode="train", routing=None)
    loose = mp.estimate(model.with_(capacity_factor=2.0), topo, layout, 8 * 4 * 512)
    assert loose.drop_rate < tight.drop_rate
    experts = {e: next(r.time_s for r in est.layers if r.name == "experts") for e, est in (("t", tight), ("l", loose))}
    assert experts["l"] > experts["t"]


@pytest.mark.parametrize(
    "layout,message",
    [
        (dict(data=8, expert=3), "layout.expert"),  # 8 experts over 3
        (dict(data=4), "devices"),  # 4 of 8 devices
        (dict(data=2, tensor=4, expert=8), None),  # fine
        (dict(data=1, tensor=8, expert=8), "n_kv_heads"),  # mixtral: 8 kv heads / 8 is fine, heads 32 / 8 fine
        (dict(data=8, micro_batch_size=3), "global_batch_tokens"),
        (dict(data=8, expert=8, expert_tensor=2), "layout.expert_tensor"),  # 16 devices of experts on 8
        (dict(data=8, expert=4, expert_tensor=3), "layout.expert_tensor"),
    ],
)
def test_impossible_layouts_are_named(layout, message):
    model = mp.load_model("mixtral-8x7b").with_(n_layers=8)
    topo = mp.load_topology("dgx-h100")
    if message is None or message == "n_kv_heads":
        est = mp.estimate(model, topo, mp.Layout(**layout), 8 * 4096)
        assert est.step_time_s > 0
        return
    with pytest.raises(ValueError, match=message):
        mp.estimate(model, topo, mp.Layout(**layout), 8 * 4096)


def test_heads_must_divide_by_tensor_and_too_big_models_do_not_fit():
    topo = mp.load_topology("dgx-h100")
    model = mp.load_model("qwen3-30b-a3b").with_(n_heads=36, n_kv_heads=4)
    with pytest.raises(ValueError, match="layout.tensor"):
        mp.estimate(model, topo, mp.Layout(data=1, tensor=8), 4096)
    big = mp.estimate(mp.load_model("deepseek-v3"), topo, mp.Layout(data=8, expert=8), 8 * 4096)
    assert not big.fits and "per device" in big.reason and big.memory_per_device_bytes > 80e9


def test_breakdown_adds_up_and_rows_are_flat():
    est = mp.estimate(_mixtral_small(), mp.load_topology("dgx-h100", nodes=2),
                      mp.Layout(data=8, pipeline=2, expert=8, micro_batch_size=1), 64 * 4096)
    assert sum(r.time_s for r in est.layers if r.kind != "bubble") + next(
        r.time_s for r in est.layers if r.kind == "bubble") == pytest.approx(est.step_time_s, rel=1e-9)
    names = {r.name for r in est.layers}
    assert {"attention", "router", "dispatch_a2a", "experts", "combine_a2a", "pipeline_bubble", "grad_sync"} <= names
    rows = est.to_rows()
    assert rows[-1]["name"] == "step" and all(set(r) >= {"name", "kind", "time_s", "flops", "bytes"} for r in rows)
    assert est.tokens_per_s == pytest.approx(64 * 4096 / est.step_time_s)


def test_expert_parallel_across_nodes_costs_all_to_all_time():
    model = _mixtral_small()
    topo = mp.load_topology("dgx-h100", nodes=2)
    inside = mp.estimate(model, topo, mp.Layout(data=16, expert=8), 16 * 4096)
    a2a_inside = inside.time_by_kind()["a2a"]
    dense_expert = model.with_(num_experts=16)
    across = mp.estimate(dense_expert, topo, mp.Layout(data=16, expert=16), 16 * 4096)
    assert across.time_by_kind()["a2a"] > 3 * a2a_inside  # NIC vs NVLink


def test_decode_is_bound_by_weights_and_reports_inference_figures():
    model = mp.load_model("mixtral-8x7b")
    topo = mp.load_topology("dgx-h100")
    layout = mp.Layout(data=1, tensor=8)
    small = mp.estimate(model, topo, layout, 1, mode="decode")
    big = mp.estimate(model, topo, layout, 64, mode="decode")
    assert big.step_time_s < 4 * small.step_time_s  # 64x the tokens for far less than 64x the time
    assert big.tokens_per_s > 10 * small.tokens_per_s
    assert small.details["min_devices_to_hold_weights"] == 2  # 93 GB of bf16 weights, 80 GB per H100
    assert small.details["batch_for_busy_experts"] == 4  # 8 experts / top-2
    prefill = mp.estimate(model, topo, layout, 8 * 4096, mode="prefill")
    assert prefill.tokens_per_s > 50 * big.tokens_per_s
    assert big.memory["kv_cache"] == pytest.approx(64 * 4096 * 2 * 8 * 128 * 32 * 2 / 8)


def test_bad_arguments():
    model, topo = _mixtral_small(), mp.load_topology("dgx-h100")
    for kwargs, message in [(dict(mode="serve"), "mode"), (dict(overlap="some"), "overlap"),
                            (dict(dtype="fp12"), "dtype"), (dict(global_batch_tokens=0), "global_batch_tokens")]:
        args = dict(global_batch_tokens=8 * 4096) | kwargs
        with pytest.raises(ValueError, match=message):
            mp.estimate(model, topo, mp.Layout(data=8), **args)
    with pytest.raises(ValueError, match="layout.recompute"):
        mp.Layout(recompute="some")
    with pytest.raises(ValueError, match="layout.data"):
        mp.Layout.parse("data=two")
    assert mp.Layout.parse("data=4,expert=2,recompute=full").recompute == "full"


# Published runs the model misses by more than POINT_BOUND, each with what is known of why.
KNOWN_LIMITATIONS = {
    "G7-h100-25.11": "virtual pipeline 24 over 48 layers (one layer per chunk) and 32 micro-batches: per-chunk and "
                     "kernel-launch overheads the model has no term for; the same model on the same GPUs without "
                     "pipelining (G7-h100-26.04.01) is within 9 %",
    "G10-b200-26.04.01": "too fast by 39 % with the experts inside the node; the same configuration on GB200 "
                         "(G10-gb200-26.08) is within 8 %: not explained (the mxfp8 casts are modelled and add 5 %, "
                         "the exposed sends of its non-interleaved pipeline 1.5 %; the GB200 recipe captures "
                         "attention and the router in CUDA graphs, the B200 one does not: launch overheads)",
    "G11-h100-26.04.01": "too fast by 40 %, where the same model on B200 without pipelining (G11-b200-26.04.01) is "
                         "23 % fast: not explained (candidates: gpt-oss's attention sinks in an unfused kernel; the "
                         "exposed sends of its 4 non-interleaved stages across nodes are modelled and add 1 %)",
}
POINT_BOUND = 0.25


def test_published_training_steps_one_by_one():
    """Every training_step point of shared/validation/published.yaml whose model, layout and batch are
    published: each within 25 % on step time (or MFU where only MFU is published), or a known limitation
    with its reason; the median within 12 %. Nothing in the step model is fitted to these points, so the
    held-out (leave-one-source-out) error is this error."""
    rows, skipped = training_rows(load_points())
    assert len(rows) >= 13, skipped
    for r in rows:
        if r.point_id in KNOWN_LIMITATIONS:
            assert abs(r.error) > POINT_BOUND, f"{r.point_id} is within bounds now: drop it from KNOWN_LIMITATIONS"
        else:
            assert abs(r.error) <= POINT_BOUND, (r.point_id, round(r.error, 3))
    assert np.median(np.abs([r.error for r in rows])) <= 0.12


# What the repository's snapshot of the published set may add to the team's shared copy: the project's readings of a
# point (its framework, its recompute policy), never a point or a measurement of its own.
SNAPSHOT_ANNOTATIONS = {("framework",), ("layout", "recompute")}


def test_the_repository_snapshot_holds_the_shared_published_points():
    """Tests read the team's shared published.yaml when it sits beside the checkout and the repository's snapshot
    otherwise (CI): both must hold the same points with the same measurements, so a shared update the snapshot
    lacks, or a snapshot edit beyond the annotations, shows here instead of as a silent local/CI difference."""
    from moeplan.validation import _CANDIDATES

    shared, snapshot = _CANDIDATES
    if not shared.is_file():
        pytest.skip("no shared copy beside this checkout (CI): the snapshot is what the tests read")
    ours = {p["id"]: p for p in load_points(snapshot)}
    theirs = {p["id"]: p for p in load_points(shared)}
    assert ours.keys() == theirs.keys()
    for pid, point in theirs.items():
        mine = ours[pid]
        for key in set(point) | set(mine):
            if isinstance(point.get(key), dict) and isinstance(mine.get(key), dict):
                for sub in set(point[key]) | set(mine[key]):
                    if point[key].get(sub) != mine[key].get(sub):
                        assert (key, sub) in SNAPSHOT_ANNOTATIONS and point[key].get(sub) is None, (pid, key, sub)
            elif point.get(key) != mine.get(key):
                assert (key,) in SNAPSHOT_ANNOTATIONS and point.get(key) is None, (pid, key)


# Collected runs (validation/training.yaml) the model misses by more than POINT_BOUND, with what is known of why.
_GPT_OSS = ("gpt-oss-120b is too fast by 32-58 % on every Blackwell system and by 41 % on H100 (G11): not explained. "
            "Its 64-wide heads are costed (the softmax's fixed cost per score element, 1.21x per attention FLOP) and "
            "its window (128 tokens on alternate layers) shrinks the scores, both small; candidates: its attention "
            "sinks and clamped, biased expert activation (unfused element-wise work on a 2880-wide expert)")
_GB200 = ("GB200 measures below DGX B200 on the same software (Qwen3-30B-A3B, 26.04.01: 26112 against 27136 "
          "tokens/s/GPU) though its datasheet peak is 11 % higher; the model takes the datasheet peak")
_QWEN3_30B = ("Qwen3-30B-A3B (d_model 2048, 128 experts of 768, top-8) without recompute on 8 DGX B200: 30 % too fast; "
              "the many small router, permute and grouped-GEMM kernels of its 48 MoE layers carry fixed per-kernel "
              "and host costs the model has no term for (its B300 and GB300 runs, HybridEP's per-copy SM time "
              "counted, are within 21 %)")
KNOWN_COLLECTED_LIMITATIONS = {
    "MB-gptoss120b-gb300-bf16-26.04.01": _GPT_OSS, "MB-gptoss120b-gb200-bf16-26.04.01": _GPT_OSS,
    "MB-gptoss120b-b300-bf16-26.04.01": _GPT_OSS, "MB-gptoss120b-gb300-mxfp8-26.08": _GPT_OSS,
    "MB-gptoss120b-gb200-mxfp8-26.08": _GPT_OSS,
    "MB-qwen3-30b-gb200-mxfp8-26.04.01": _GB200,
    "MB-llama3-8b-gb200-mxfp8-25.11": _GB200,
    "MB-qwen3-30b-b200-mxfp8-26.04.01": _QWEN3_30B,
}


# The other collected runs (ids TB-: MaxText and tpu-recipes on TPU v5e/v5p/v6e/tpu7x, torchtitan, Megatron-LM's
# DeepSeek-V3 GB200 write-up, Megatron-MoE-ModelZoo; DSV3-: DeepSeek-V3's own report on 2048 H800) are held to this
# wider bound: the model is too fast on 21 of their 26 runs, by 15-63 % on large MoE runs (tpu7x: 17-66 %), within
# 10 % on the dense ones. A cost of MoE
# training the model lacks on every platform (candidates: grouped-matmul efficiency below the dense rate, host and
# kernel-boundary costs of the permute, router and dispatch kernels); not fitted away.
OTHER_SOURCES_BOUND = 0.70


def test_collected_training_runs_one_by_one():
    """Every run of validation/training.yaml (nothing fitted to them) converts. The Megatron-Bridge table rows (MB-)
    are each within 25 % or a known limitation with its reason, their median within 20 %; the rest within
    OTHER_SOURCES_BOUND; the median of all within 25 %. Per family: benchmarks/validate.py."""
    from moeplan.validation import TRAINING_PATH

    rows, skipped = training_rows(load_points(TRAINING_PATH))
    assert not skipped and len(rows) >= 62
    bridge = [r for r in rows if r.point_id.startswith("MB-")]
    for r in bridge:
        if r.point_id in KNOWN_COLLECTED_LIMITATIONS:
            assert abs(r.error) > POINT_BOUND, f"{r.point_id} is within bounds now: drop it from the limitations"
        else:
            assert abs(r.error) <= POINT_BOUND, (r.point_id, round(r.error, 3))
    assert len(bridge) >= 36 and np.median(np.abs([r.error for r in bridge])) <= 0.20
    for r in rows:
        assert abs(r.error) <= OTHER_SOURCES_BOUND, (r.point_id, round(r.error, 3))
    assert np.median(np.abs([r.error for r in rows])) <= 0.25


def test_fsdp_holds_the_largest_blocks_gathered_weights_twice():
    """ZeRO-3: the block computing and the one prefetched are held whole (per tensor shard and expert group);
    pure FSDP of a large MoE gathers every expert of a layer, and that alone can overflow HBM."""
    model = mp.load_model("deepseek-v3")
    topo = mp.load_topology("tpu-v5p", shape=(8, 8, 16))
    pure = mp.estimate(model, topo, mp.Layout(fsdp=1024, expert=1, recompute="full"), 1024 * 4096)
    moe = (mp.moe.dense_params_per_moe_layer(model) + mp.moe.expert_params_per_layer(model)) * 2.0  # bf16 weights
    assert pure.memory["fsdp_gathered"] == pytest.approx(2 * moe, rel=1e-12)
    split = mp.estimate(model, topo, mp.Layout(fsdp=1024, expert=256, recompute="full"), 1024 * 4096)
    assert split.memory["fsdp_gathered"] < pure.memory["fsdp_gathered"] / 10  # experts stay in their group
    no_fsdp = mp.estimate(mp.load_model("mixtral-8x7b").with_(n_layers=4), mp.load_topology("dgx-h100"),
                          mp.Layout(data=8), 8 * 4096)
    assert no_fsdp.memory["fsdp_gathered"] == 0.0
    assert pure.memory_per_device_bytes == pytest.approx(sum(pure.memory.values()))  # it counts toward the fit


def test_fsdp_gathers_the_experts_it_splits_and_reduce_scatters_their_gradients():
    """What memory holds gathered, the step moves: under pure FSDP (MaxText's fsdp_shard_on_exp, expert=1) every
    forward and backward gathers the stage's experts with its dense weights, and their fp32 gradients are
    reduce-scattered; with the experts kept whole in their expert group only the dense weights move."""
    model = mp.load_model("mixtral-8x7b").with_(n_layers=4)
    topo = mp.load_topology("dgx-h100", nodes=2)
    counts = mp.moe.param_counts(model)
    tokens = 16 * model.seq_len * 2  # two micro-batches of one sequence per device

    def moved(est, name):
        return next(r.bytes for r in est.layers if r.name == name)

    pure = mp.estimate(model, topo, mp.Layout(fsdp=16, expert=1, micro_batch_size=1), tokens)
    assert moved(pure, "fsdp_gather") == pytest.approx(2 * 2 * 2.0 * (counts["non_expert"] + counts["expert"]))
    assert moved(pure, "grad_sync") == pytest.approx(4.0 * (counts["non_expert"] + counts["expert"]))
    grouped = mp.estimate(model, topo, mp.Layout(data=2, fsdp=8, expert=8, micro_batch_size=1), tokens)
    assert moved(grouped, "fsdp_gather") == pytest.approx(2 * 2 * 2.0 * counts["non_expert"])
    # an expert group of 8 inside fsdp 16: the other half of fsdp splits each device's expert in two
    halved = mp.estimate(model, topo, mp.Layout(fsdp=16, expert=8, micro_batch_size=1), tokens)
    assert moved(halved, "fsdp_gather") == pytest.approx(2 * 2 * 2.0 * (counts["non_expert"] + counts["expert"] / 8))
    # the gathers cost time: the pure layout's exceed the grouped one's by the experts' share
    def raw(layout):
        from moeplan.estimate import _data_parallel
        from moeplan.plan import Plan, make_context
        ctx = make_context(Plan.from_layout(model, layout), topo, "bf16", None, None)
        return _data_parallel(ctx, counts, 2)
    assert raw(mp.Layout(fsdp=16, expert=1))["fsdp_s"] > 5 * raw(mp.Layout(data=2, fsdp=8, expert=8))["fsdp_s"]



def test_mtp_modules_add_a_layer_and_an_output_head_by_hand():
    """DeepSeek-V3's multi-token prediction (MoEModel.mtp_layers): each module is one more layer of the model's
    last kind and a head (its 2d -> d projection, another pass of the output layer and its loss). Without
    pipelining every layer part runs (L + 1) / L times as often, and the head's row is its forward times the
    three passes of an output layer (never recomputed); the model FLOPs grow by the same work."""
    from moeplan.compute import matmul_time_s

    model = mp.load_model("mixtral-8x7b").with_(n_layers=4)
    topo, layout = mp.load_topology("dgx-h100"), mp.Layout(data=8, expert=8, micro_batch_size=1)
    tokens = 8 * model.seq_len * 2  # two micro-batches
    base = {r.name: r for r in mp.estimate(model, topo, layout, tokens).layers}
    mtp = mp.estimate(model.with_(mtp_layers=1), topo, layout, tokens)
    rows = {r.name: r for r in mtp.layers}
    for name in ("attention", "attention_scores", "router", "dispatch_a2a", "experts", "combine_a2a"):
        assert rows[name].time_s == pytest.approx(base[name].time_s * 5 / 4, rel=1e-9), name
        assert rows[name].count == pytest.approx(base[name].count * 5 / 4, rel=1e-9), name
    per_device = model.seq_len  # one sequence per micro-batch
    head = base["logits"].time_s / 2 / 3 + matmul_time_s(per_device, model.d_model, 2 * model.d_model, topo.chip,
                                                        "bf16", topo.chip.efficiency)
    assert rows["mtp_head"].time_s == pytest.approx(3 * head * 2, rel=1e-9)  # 3 passes, 2 micro-batches
    assert rows["logits"].time_s == pytest.approx(base["logits"].time_s, rel=1e-12)
    assert mtp.step_time_s == pytest.approx(sum(r.time_s for r in mtp.layers), rel=1e-12)
    flops = mp.moe.forward_flops_per_token(model)
    extra = ((flops["attention_proj"] + flops["attention_scores"]) / 4 + (flops["router"] + flops["experts"]) / 4
             + 4.0 * model.d_model ** 2 + flops["logits"])
    assert mp.moe.model_flops_per_token(model.with_(mtp_layers=1)) == pytest.approx(
        mp.moe.model_flops_per_token(model) + 3 * extra, rel=1e-12)
    with pytest.raises(ValueError, match="mtp_layers"):
        model.with_(mtp_layers=-1)


def test_the_converter_reads_a_recipes_mtp_depth(monkeypatch):
    """A training point whose recipe states mtp_num_layers (Megatron's --mtp-num-layers) converts to a model with
    that many MTP modules; one that states none has none."""
    import sys

    from moeplan.validation import TRAINING_PATH, _training_row

    seen = []

    def capture(model, *args, **kwargs):
        seen.append(model.mtp_layers)
        raise ValueError("captured")

    monkeypatch.setattr(sys.modules["moeplan.estimate"], "estimate", capture)
    points = {p["id"]: p for p in load_points(TRAINING_PATH)}
    for pid in ("MB-dsv3-b200-mxfp8-26.04.01", "MB-dsv3-gb200-bf16-25.11"):  # MTP 1; 'w/o MTP'
        with pytest.raises(Exception, match="captured"):
            _training_row(points[pid])
    assert seen == [1, 0]


def test_bf16_gradients_and_8_bit_gathers_halve_what_they_move():
    """Layout.gradient_bytes=2 (MaxText's grad_dtype=bfloat16) halves the gradient sync and the gradients in
    memory; Layout.quantized_gather (MaxText's QAG, Megatron's --fp8-param-gather) gathers 1-byte weights under
    fp8 and changes nothing under bf16; an fp8 server gathers its 1-byte weights either way."""
    model = mp.load_model("mixtral-8x7b").with_(n_layers=4)
    topo = mp.load_topology("dgx-h100", nodes=2)
    counts = mp.moe.param_counts(model)
    tokens = 16 * model.seq_len * 2
    full = counts["non_expert"] + counts["expert"]

    def run(dtype="bf16", **knobs):
        est = mp.estimate(model, topo, mp.Layout(fsdp=16, micro_batch_size=1, **knobs), tokens, dtype=dtype)
        return {r.name: r.bytes for r in est.layers}, est.memory

    (base, base_mem), (half, half_mem) = run(), run(gradient_bytes=2)
    assert base["grad_sync"] == pytest.approx(4.0 * full) and half["grad_sync"] == pytest.approx(2.0 * full)
    assert base_mem["optimizer_and_grads"] - half_mem["optimizer_and_grads"] == pytest.approx(2.0 * full / 16)
    assert run(quantized_gather=True)[0]["fsdp_gather"] == pytest.approx(base["fsdp_gather"])  # bf16: no effect
    fp8, qag = run("fp8")[0], run("fp8", quantized_gather=True)[0]
    assert fp8["fsdp_gather"] == pytest.approx(2 * 2 * 2.0 * full) and qag["fsdp_gather"] == pytest.approx(2 * 2 * full)
    served = mp.estimate(model, topo, mp.Layout(fsdp=16), 16 * model.seq_len, dtype="fp8", mode="prefill")
    assert next(r.bytes for r in served.layers if r.name == "fsdp_gather") == pytest.approx(1.0 * full)


def test_served_fp8_weights_take_one_byte_each():
    """Inference memory and devices-to-hold-weights count fp8 weights at 1 byte (activations stay bf16)."""
    model, topo = mp.load_model("deepseek-v3"), mp.load_topology("dgx-h100", nodes=4)
    layout = mp.Layout(data=4, tensor=8, expert=32)
    bf16, fp8 = (mp.estimate(model, topo, layout, 64, mode="decode", dtype=d) for d in ("bf16", "fp8"))
    assert fp8.memory["weights"] == pytest.approx(bf16.memory["weights"] / 2)
    total = mp.param_counts(model)["total"]
    assert fp8.details["min_devices_to_hold_weights"] == np.ceil(total * 1.0 / topo.chip.hbm_capacity_bytes)
    assert fp8.memory["kv_cache"] == pytest.approx(bf16.memory["kv_cache"])  # the cache stays at bf16


def test_full_overlap_hides_a_dispatch_that_fits_under_the_other_micro_batchs_compute():
    """DualPipe: a layer's communication runs under the other micro-batch's compute of the whole layer.
    Hand-computed: forward compute 1 + 0.1 + 3 + 0.1 = 4.2 s, x3 passes = 12.6 s; communication 0.2 + 2 + 2 =
    4.2 s, x2 passes = 8.4 s. "full": max(12.6, 8.4) = 12.6 (all hidden); "dp": 12.6 + 8.4 = 21.0."""
    from moeplan.estimate import Overlap, Part, training_passes

    parts = [Part("attention", "compute", 1.0, 0.2, 0.0, 0.0), Part("dispatch_a2a", "a2a", 0.1, 2.0, 0.0, 0.0),
             Part("experts", "compute", 3.0, 0.0, 0.0, 0.0), Part("combine_a2a", "a2a", 0.1, 2.0, 0.0, 0.0)]
    passes = training_passes(mp.layout.RECOMPUTE.index("none"), [part.name for part in parts])
    assert passes["attention"] == (3.0, 2.0)
    assert Overlap("full").layer(parts, passes) == (pytest.approx(12.6), 0.0)
    assert Overlap("dp").layer(parts, passes)[0] == pytest.approx(21.0)
    heavy = [part._replace(comm_s=part.comm_s * 3) for part in parts]  # 25.2 s of communication
    layer, exposed = Overlap("full").layer(heavy, passes)
    assert layer == pytest.approx(25.2) and exposed == pytest.approx((25.2 - 12.6) / 25.2)
    # the rest of the policy: sends and the gradient sync hide unless "none"; FSDP gathers under every micro-batch
    assert Overlap("none").pipeline_sends(0.5, True) == 0.5 and Overlap("dp").pipeline_sends(0.5, True) == 0.0
    assert Overlap("dp").pipeline_sends(0.5, False) == 0.5  # a schedule that does not overlap them
    assert Overlap("none").data_parallel(3.0, 2.0, 1.5, 4) == (3.0, 2.0)
    # the sync and the gathers share the links: 3 + 7 s under 4 x 1.5 s of compute leaves 4 s, 2 s of it the sync's
    assert Overlap("dp").data_parallel(3.0, 7.0, 1.5, 4) == (pytest.approx(2.0), pytest.approx(2.0))
    # each alone would hide (1 s under 1 s of backward, 5.5 s under 6 s), together 0.5 s is exposed
    assert Overlap("dp").data_parallel(1.0, 5.5, 1.5, 4) == (pytest.approx(0.0), pytest.approx(0.5))
    model = mp.load_model("mixtral-8x7b").with_(n_layers=4)
    topo, layout = mp.load_topology("dgx-h100", nodes=2), mp.Layout(data=16, expert=8)
    full, dp = (mp.estimate(model, topo, layout, 16 * 4096, overlap=o) for o in ("full", "dp"))
    assert full.step_time_s < dp.step_time_s
    assert full.step_time_s == pytest.approx(sum(r.time_s for r in full.layers))  # rows add up to the step


def test_communication_that_hides_holds_its_sms():
    """A communication kernel under compute holds its SMs, so compute W beside communication c takes
    max(W + f c, c). Hand-computed on the parts above: the all-to-alls (share 0.2) carry 8 s over the passes,
    the attention's collective (share 0.1) 0.4 s: 12.6 + 1.6 + 0.04 = 14.24 s; the gradient sync shows at least
    its share; a GPU's shares are its kernels' SMs over its SMs, a TPU's none."""
    from moeplan.estimate import Overlap, Part, training_passes
    from moeplan.plan import Plan, make_context

    parts = [Part("attention", "compute", 1.0, 0.2, 0.0, 0.0), Part("dispatch_a2a", "a2a", 0.1, 2.0, 0.0, 0.0),
             Part("experts", "compute", 3.0, 0.0, 0.0, 0.0), Part("combine_a2a", "a2a", 0.1, 2.0, 0.0, 0.0)]
    passes = training_passes(mp.layout.RECOMPUTE.index("none"), [part.name for part in parts])
    layer, exposed = Overlap("full", 0.2, 0.1).layer(parts, passes)
    assert layer == pytest.approx(14.24) and exposed == pytest.approx(1.64 / 8.4)
    heavy = [part._replace(comm_s=part.comm_s * 3) for part in parts]  # 25.2 s: the compute fits beside it
    assert Overlap("full", 0.2, 0.1).layer(heavy, passes)[0] == pytest.approx(25.2)
    assert Overlap("dp", 0.2, 0.1).layer(parts, passes)[0] == pytest.approx(21.0)  # nothing hides: no change
    assert Overlap("dp", 0.0, 0.12).data_parallel(1.0, 0.0, 3.0, 1) == (pytest.approx(0.12), 0.0)
    grad, fsdp = Overlap("dp", 0.0, 0.1).data_parallel(1.0, 2.0, 3.0, 4)  # 3 s under 12 s: 0.3 s shows
    assert grad == pytest.approx(0.1) and fsdp == pytest.approx(0.2)
    assert Overlap("dp", 0.0, 0.1).pipeline_sends(0.5, True) == pytest.approx(0.05)  # hidden sends hold SMs too
    assert Overlap("dp", 0.0, 0.1).pipeline_sends(0.5, False) == 0.5
    model = mp.load_model("mixtral-8x7b").with_(n_layers=4)
    for family, kernel, share in (("dgx-h100", "deepep_normal", 20 / 132), ("gb200-nvl72", "hybridep", 32 / 148),
                                  ("tpu-v5p", "nccl", 0.0)):
        topo = mp.load_topology(family)
        ctx = make_context(Plan.from_layout(model, mp.Layout(data=topo.num_devices, expert=4)), topo, "bf16", None,
                           None, kernel)
        assert ctx.dispatch_share == pytest.approx(share)
        assert ctx.nccl_share == pytest.approx(16 / topo.chip.sm_count if topo.chip.sm_count else 0.0)


def test_multislice_data_parallelism_crosses_dcn_and_fsdp_stays_in_the_slice():
    """The mesh is (pipeline, data, fsdp, tensor): on two slices, data=2 puts the replicas across DCN and
    the weight gathers inside a slice, as MaxText's dcn_data_parallelism does; fsdp over DCN is slower."""
    model = mp.load_model("st-moe-32b")
    topo = mp.load_topology("tpu-v5p", shape=(4, 4, 4), slices=2)
    over_dcn = mp.estimate(model, topo, mp.Layout(data=2, fsdp=64, expert=8), 2**21)
    gathers_over_dcn = mp.estimate(model, topo, mp.Layout(fsdp=128, expert=8), 2**21)
    one = mp.estimate(model, mp.load_topology("tpu-v5p", shape=(4, 4, 4)), mp.Layout(fsdp=64, expert=8), 2**20)

    def part(est, name):
        return sum(r.time_s for r in est.layers if r.name == name)

    assert part(over_dcn, "fsdp_gather") == pytest.approx(part(one, "fsdp_gather"), rel=1e-9)
    assert part(gathers_over_dcn, "fsdp_gather") > 1.3 * part(over_dcn, "fsdp_gather")  # a DCN step per gather
    assert part(over_dcn, "grad_sync") > part(one, "grad_sync")  # the gradient shards' all_reduce over DCN


@pytest.mark.parametrize("tensor,fsdp,data,expert", [(1, 4, 2, 2), (2, 4, 2, 4), (2, 2, 4, 16), (4, 2, 2, 2),
                                                     (1, 8, 1, 8), (2, 8, 2, 4)])
def test_expert_data_group_holds_the_replicas_of_one_expert_shard(tensor, fsdp, data, expert):
    """Brute force over the (data, fsdp, tensor) block: the devices holding device 0's expert shard are the
    first of their expert group and sit in the part of fsdp the group covers; the group placement agrees."""
    from moeplan.plan import Context, Plan

    layout = mp.Layout(data=data, fsdp=fsdp, tensor=tensor, expert=expert)
    block = layout.batch_block
    shards = layout.expert_weight_shards
    rest = shards // expert  # fsdp shards of the expert weights beyond the group
    shard_of = {}
    for dev in range(block):
        f = (dev // tensor) % fsdp
        shard_of[dev] = (dev % expert, f // (fsdp // rest))
    replicas = sorted(d for d in range(block) if shard_of[d] == shard_of[0])
    plan = Plan.from_layout(mp.load_model("st-moe-like-8b"), layout)
    ctx = Context(plan, mp.load_topology("cpu-host"), "bf16", None, None, None)
    from moeplan.plan import _GROUP_IDS
    ids = _GROUP_IDS["expert_data"](*ctx._group("expert_data"))
    assert ids.tolist() == replicas
    assert len(replicas) == block // shards
    # the FSDP gather of device 0's experts: one device per fsdp shard of its expert slot (the first holding it)
    holders = [min(d for d in range(block) if shard_of[d] == (0, s)) for s in range(rest)]
    gather = _GROUP_IDS["expert_fsdp"](*ctx._group("expert_fsdp"))
    assert gather.tolist() == holders


def test_a_dense_model_is_a_tensor_parallel_ffn_by_hand():
    """num_experts=1: no router, permutation or all-to-all; the FFN is the dense roofline, split over tensor
    with its two sequence-parallel collectives, and its weights shard over tensor like attention's."""
    from moeplan.compute import matmul_time_s, memory_time_s

    topo = mp.load_topology("dgx-a100")
    dense = mp.MoEModel(name="dense", d_model=4096, n_layers=8, n_heads=32, n_kv_heads=32, d_head=128,
                        vocab_size=32000, seq_len=2048, d_ff=0, num_experts=1, top_k=1, expert_d_ff=16384,
                        capacity_factor=None, attention="mha", gated_ffn=False)
    layout = mp.Layout(data=2, tensor=4, recompute="none")
    est = mp.estimate(dense, topo, layout, 8 * 2048, dtype="bf16")
    rows = {r.name: r for r in est.layers}
    assert rows["router"].time_s == rows["dispatch_a2a"].time_s == rows["combine_a2a"].time_s == 0.0
    tokens, chip, eff = 2048, topo.chip, topo.chip.efficiency
    per_pass = (matmul_time_s(tokens, 16384 / 4, 4096, chip, "bf16", eff)
                + matmul_time_s(tokens, 4096, 16384 / 4, chip, "bf16", eff)
                + memory_time_s(3 * tokens * 16384 / 4 * 2, chip, eff)
                + memory_time_s(5.5 * tokens * 4096 * 2 / 4, chip, eff))  # norm, dropout, residual (SP: 1/t)
    micro_batches = 4  # 8 sequences over 2 replicas, one per micro-batch
    assert rows["experts"].time_s == pytest.approx(3 * per_pass * 8 * micro_batches, rel=1e-9)
    assert rows["experts_tp"].time_s == pytest.approx(rows["attention_tp"].time_s, rel=1e-9)  # AG + RS each
    counts = mp.param_counts(dense)
    assert counts["expert"] == 0 and counts["active"] == counts["total"]
    # num_experts=0 (and no expert width) says the same: a dense model of d_ff
    zero = dense.with_(num_experts=0, top_k=0, d_ff=16384, expert_d_ff=0)
    assert (zero.num_experts, zero.top_k, zero.expert_d_ff) == (1, 1, 16384)
    assert mp.estimate(zero, topo, layout, 8 * 2048, dtype="bf16").step_time_s == pytest.approx(est.step_time_s)


def test_calculon_suite_within_its_own_error():
    """Calculon's validation suite (Korthikanti et al. 2022, Table 5: Megatron-LM on DGX A100, 22B to 1T),
    framework='megatron-2022': mean |error| at most Calculon's own 3.7 %, every point within 8 %."""
    from moeplan.validation import KORTHIKANTI_PATH, load_points, training_rows

    rows, skipped = training_rows(load_points(KORTHIKANTI_PATH))
    assert len(rows) == 8 and not skipped
    for r in rows:
        assert abs(r.error) <= 0.08, (r.point_id, r.error)
    assert sum(abs(r.error) for r in rows) / len(rows) <= 0.037


def test_framework_presets_set_the_knobs_and_explicit_arguments_win():
    model = mp.load_model("qwen3-30b-a3b")
    topo = mp.load_topology("dgx-h100", nodes=2)
    layout = mp.Layout(data=16, expert=16)
    base = mp.estimate(model, topo, layout, 2**21)
    assert base.step_time_s == mp.estimate(model, topo, layout, 2**21, framework="megatron").step_time_s
    dual = mp.estimate(model, topo, layout, 2**21, framework="dualpipe")
    same = mp.estimate(model, topo, layout, 2**21, overlap="full", dispatch="deepep_normal")
    assert dual.step_time_s == same.step_time_s < base.step_time_s
    mine = mp.estimate(model, topo, layout, 2**21, framework="dualpipe", overlap="dp", dispatch="nccl")
    assert mine.step_time_s == base.step_time_s
    old = mp.estimate(model, topo, layout, 2**21, framework="megatron-2022")
    scores = {e: next(r.time_s for r in est.layers if r.name == "attention_scores") for e, est in
              (("flash", base), ("unfused", old))}
    assert scores["unfused"] > 2 * scores["flash"]  # the s^2 scores through HBM
    with pytest.raises(ValueError, match="framework: got 'jax'"):
        mp.estimate(model, topo, layout, 2**21, framework="jax")


def test_maxtext_moves_tokens_by_one_hot_einsums_where_a_capacity_factor_is_set():
    """MaxText's dense path (capacity factor set): per sequence of S tokens the dispatch is an [E C, S] x [S, d]
    matmul and the combine its transpose, C = ceil(S k cf / E); dropless layers gather as Megatron's do."""
    model = mp.load_model("mixtral-8x7b").with_(n_layers=4, capacity_factor=1.25)
    topo = mp.load_topology("tpu-v5p", shape=(2, 2, 4))
    layout = mp.Layout(fsdp=16, expert=8)
    tokens = 16 * model.seq_len  # one sequence per device
    rows = {fw: {r.name: r for r in mp.estimate(model, topo, layout, tokens, framework=fw).layers}
            for fw in ("megatron", "maxtext")}
    slots = model.num_experts * -(-model.seq_len * model.top_k * 1.25 // model.num_experts)  # E C = 10240
    flops = 3 * 2.0 * slots * model.seq_len * model.d_model * model.n_moe_layers  # forward and twice backward
    for part in ("dispatch_a2a", "combine_a2a"):
        gather, einsum = rows["megatron"][part], rows["maxtext"][part]
        assert gather.flops == 0 and einsum.flops == pytest.approx(flops)
        assert einsum.time_s - gather.time_s > flops / topo.chip.peak_flop_per_s("bf16")
    dropless = model.with_(capacity_factor=None)  # gathered either way (its experts run megablox: another test)
    same = [{r.name: r.time_s for r in mp.estimate(dropless, topo, layout, tokens, framework=fw).layers}
            for fw in ("megatron", "maxtext")]
    assert same[0]["dispatch_a2a"] == same[1]["dispatch_a2a"] and same[0]["combine_a2a"] == same[1]["combine_a2a"]


def test_megablox_visits_a_row_tile_once_per_expert_it_holds():
    """MaxText's dropless experts: the sorted tokens in 512-row tiles, one more tile per boundary between
    experts. 128 experts of 256 rows: (32768 / 512 + 127) tiles of 512 rows = 764 rows per expert, where each
    expert's own GEMM (Megatron) runs its 256. Layers with a capacity factor run dense einsums instead."""
    from types import SimpleNamespace

    from moeplan.estimate import _grouped_rows

    def ctx(permute, cf):
        return SimpleNamespace(permute=permute, m=SimpleNamespace(capacity_factor_array=cf))

    assert _grouped_rows(ctx("einsum", np.nan), 256.0, 128) == pytest.approx((64 + 127) * 512 / 128)
    assert _grouped_rows(ctx("gather", np.nan), 256.0, 128) == 256.0
    assert _grouped_rows(ctx("einsum", 1.25), 256.0, 128) == 256.0
    model = mp.load_model("qwen3-30b-a3b").with_(n_layers=4)
    topo = mp.load_topology("tpu-v5p", shape=(2, 2, 4))
    experts = {fw: next(r for r in mp.estimate(model, topo, mp.Layout(fsdp=16), 16 * model.seq_len,
                                               framework=fw).layers if r.name == "experts")
               for fw in ("megatron", "maxtext")}
    assert experts["maxtext"].time_s > 1.5 * experts["megatron"].time_s
    assert experts["maxtext"].flops == experts["megatron"].flops  # the same useful work


def test_maxtext_points_read_their_mesh_as_maxtext_shards_it():
    """The validation converter: MaxText's expert axis shards batch and non-expert weights like fsdp, its tensor
    axis the experts' width, a shard's batch runs in one micro-batch, and the remat policy comes from the notes."""
    from moeplan.validation import point_framework, training_layout

    point = {"source": "AI-Hypercomputer/maxtext benchmarks/...", "global_batch_tokens": 512 * 8192,
             "model": {"seq_len": 8192}, "notes": "remat custom with offload of decoder_layer_input/out_proj/q/k/v",
             "layout": {"fsdp": 16, "expert": 8, "tensor": 2, "micro_batch_per_device": 2}}
    assert point_framework(point) == "maxtext"
    layout = training_layout(point, 256, "maxtext")
    assert (layout.data, layout.fsdp, layout.expert, layout.tensor, layout.expert_tensor) == (1, 128, 8, 2, 2)
    assert layout.micro_batch_size == 4 and layout.recompute == "offload_projections"  # 512 sequences / 128
    megatron = training_layout(dict(point, source="NVIDIA Megatron-Bridge", notes=""), 256, None)
    assert (megatron.data, megatron.fsdp, megatron.expert_tensor, megatron.recompute) == (8, 16, 1, "selective")
    assert megatron.micro_batch_size == 2
    only_inputs = dict(point, notes="remat custom with decoder_layer_input offload")
    assert training_layout(only_inputs, 256, "maxtext").recompute == "offload_inputs"
    spanning = dict(point, layout={"fsdp": 128, "expert": 8, "tensor": 2})  # fsdp already spans the expert axis
    assert (training_layout(spanning, 256, "maxtext").fsdp, training_layout(spanning, 256, "maxtext").data) == (128, 1)
    # the recipe's own words: what it recomputes, its gradient width, whether FSDP gathers 8-bit weights
    def read(notes):
        return training_layout(dict(point, source="NVIDIA Megatron-Bridge", notes=notes), 256, None)
    # Megatron's --expert-tensor-parallel-size defaults to the tensor-parallel size for an MoE model
    moe_point = dict(point, source="NVIDIA Megatron-Bridge", notes="", model={"seq_len": 8192, "num_experts": 64})
    assert training_layout(moe_point, 256, None).expert_tensor == 2
    stated = dict(moe_point, layout={**point["layout"], "expert_tensor": 1})
    assert training_layout(stated, 256, None).expert_tensor == 1
    assert training_layout(dict(moe_point, source="torchtitan"), 256, None).expert_tensor == 1
    assert read("EP8; no activation recompute.").recompute == "none"
    assert read("recompute_modules ['layernorm', 'moe_act'] (selective)").recompute == "none"  # element-wise only
    assert read("recompute_modules ['mla_up_proj'] (selective)").recompute == "selective"
    assert read("adamw, grad_dtype=bfloat16").gradient_bytes == 2 and read("adamw").gradient_bytes == 4
    assert read("weight_quantization_calibration_method fixed,-224,224").quantized_gather
    assert not read("quantization fp8_full").quantized_gather


def test_an_offloading_point_on_a_family_without_a_host_link_is_estimated_not_skipped():
    """TPU7x states no host link: a MaxText point that offloads is estimated with its tensors on the device."""
    from moeplan.validation import training_rows

    point = {"id": "X1", "kind": "training_step", "source": "AI-Hypercomputer/maxtext recipe",
             "hardware": {"family": "tpu7x", "chips": 64},
             "model": {"d_model": 2048, "n_layers": 8, "n_heads": 16, "n_kv_heads": 4, "d_head": 128,
                       "vocab_size": 32000, "seq_len": 4096, "num_experts": 16, "top_k": 2, "expert_d_ff": 1024},
             "layout": {"fsdp": 64}, "global_batch_tokens": 64 * 4096, "dtype": "bf16",
             "measured": {"step_time_s": 1.0}, "notes": "remat custom with offload of decoder_layer_input/out_proj"}
    rows, skipped = training_rows([point])
    assert [r.point_id for r in rows] == ["X1"] and not skipped


def test_offloaded_activations_live_in_host_memory_and_cost_their_transfers():
    """recompute="offload": nothing recomputed; a layer's activations go to host memory in its forward and come
    back in its backward over the host link; the device holds two layers' worth (the one computing, the one in
    transit). Without overlap both transfers are exposed; under a fast enough link none is."""
    model = mp.load_model("mixtral-8x7b").with_(n_layers=8)
    topo = mp.load_topology("dgx-h100")
    tokens, layers = 8 * 2 * model.seq_len, model.n_layers  # two micro-batches per device
    est = {(r, o): mp.estimate(model, topo, mp.Layout(data=8, expert=8, recompute=r), tokens, overlap=o)
           for r in ("none", "offload") for o in ("none", "dp")}
    host = est["offload", "none"].details["host_activation_bytes"]
    per_layer = host / layers
    assert host > 0 and est["none", "none"].details["host_activation_bytes"] == 0
    saved = est["none", "none"].memory["activations"] - est["offload", "none"].memory["activations"]
    assert saved == pytest.approx(per_layer * (layers - 2))
    extra = est["offload", "none"].step_time_s - est["none", "none"].step_time_s
    assert extra == pytest.approx(2 * 2 * host / topo.host_link.bw_bytes_per_s)  # two micro-batches, out and back
    row = next(r for r in est["offload", "dp"].layers if r.name == "activation_offload")
    assert row.bytes == pytest.approx(2 * 2 * host) and 0 < row.time_s < extra
    fast = copy.copy(topo)
    fast.chip = dataclasses.replace(topo.chip, host_link=LinkSpec("fast", 1e15, 0.0, "a test link"))
    hidden = mp.estimate(model, fast, mp.Layout(data=8, expert=8, recompute="offload"), tokens)
    assert hidden.step_time_s == pytest.approx(est["none", "dp"].step_time_s)
    v3 = mp.load_topology("tpu-v3")
    with pytest.raises(ValueError, match="layout.recompute: got 'offload'; tpu-v3 states no link to host memory"):
        mp.estimate(model, v3, mp.Layout(data=v3.num_devices, recompute="offload"), v3.num_devices * model.seq_len)


def test_offloading_the_projections_recomputes_all_but_them():
    """recompute="offload_projections" (MaxText's custom remat, layer input and q/k/v/out projections to host):
    against "full", the projections and their collectives run one pass fewer, the rest alike (the output layer
    is never rerun); the host holds the layer input, q, k, v and the output projection of every layer.
    "offload_inputs" is a full recompute with the layer inputs in host memory."""
    model = mp.load_model("mixtral-8x7b").with_(n_layers=8)
    topo = mp.load_topology("tpu-v5p", shape=(2, 2, 4))
    tokens = 16 * model.seq_len
    layout = dict(fsdp=8, tensor=2, expert=8)
    est = {r: mp.estimate(model, topo, mp.Layout(**layout, recompute=r), tokens, overlap="none")
           for r in ("full", "offload_projections", "offload_inputs")}
    rows = {r: {row.name: row.time_s for row in e.layers} for r, e in est.items()}
    for part, ratio in (("attention", 3 / 4), ("attention_tp", 2 / 3), ("logits", 1.0), ("experts", 1.0),
                        ("attention_scores", 1.0), ("dispatch_a2a", 1.0)):
        assert rows["offload_projections"][part] == pytest.approx(rows["full"][part] * ratio), part
        assert rows["offload_inputs"][part] == pytest.approx(rows["full"][part]), part
    b, t, d = 2, 2, model.d_model
    per_layer = model.seq_len / t * (2 * d + (model.n_heads + 2 * model.n_kv_heads) * model.d_head) * b
    assert est["offload_projections"].details["host_activation_bytes"] == pytest.approx(model.n_layers * per_layer)
    assert rows["offload_projections"]["activation_offload"] == pytest.approx(
        2 * model.n_layers * per_layer / topo.host_link.bw_bytes_per_s * est["full"].micro_batches)
    kept_inputs = model.n_layers * model.seq_len / t * d * b  # what full recompute keeps on the device
    assert est["full"].memory["activations"] - est["offload_projections"].memory["activations"] == \
        pytest.approx(kept_inputs - 2 * per_layer)
    inputs = est["offload_inputs"].details["host_activation_bytes"]
    assert inputs == pytest.approx(kept_inputs)
    assert est["full"].memory["activations"] - est["offload_inputs"].memory["activations"] == \
        pytest.approx(kept_inputs - 2 * kept_inputs / model.n_layers)


def test_unfused_attention_keeps_its_scores_unless_recomputed():
    model = mp.load_model("st-moe-like-8b")
    topo = mp.load_topology("dgx-h100")
    mem = {}
    for recompute in ("none", "selective"):
        for fw in ("megatron", "megatron-2022"):
            est = mp.estimate(model, topo, mp.Layout(data=8, recompute=recompute), 8 * model.seq_len, framework=fw)
            mem[recompute, fw] = est.memory["activations"]
    layers, heads, s = model.n_layers, model.n_heads, model.seq_len
    # Korthikanti et al. eq. 1: 5 a s^2 bytes per sequence and layer at 2-byte activations, one sequence here
    assert mem["none", "megatron-2022"] - mem["none", "megatron"] == pytest.approx(5 * heads * s * s * layers)
    assert mem["selective", "megatron-2022"] == mem["selective", "megatron"]


def test_hbm_is_binary_and_a_reserve_is_kept_for_workspaces():
    """Datasheet 'GB' of HBM are GiB (dies come in 2^n Gbit); fits keeps hbm_reserve (default 8 %) free."""
    topo = mp.load_topology("dgx-h100")
    assert topo.chip.hbm_capacity_bytes == pytest.approx(80 * 2**30, rel=1e-6)
    model = mp.load_model("qwen3-30b-a3b")
    est = mp.estimate(model, topo, mp.Layout(data=8, expert=8), 8 * model.seq_len)
    used = est.memory_per_device_bytes / topo.chip.hbm_capacity_bytes
    assert 0.2 < used < 0.85 and est.fits
    tight = 1.0 - used + 0.01  # a reserve that leaves just too little
    assert mp.estimate(model, topo, mp.Layout(data=8, expert=8), 8 * model.seq_len, hbm_reserve=tight).fits is False
    loose = mp.estimate(model, topo, mp.Layout(data=8, expert=8), 8 * model.seq_len, hbm_reserve=max(tight - 0.02, 0))
    assert loose.fits is True
    assert "GiB" in mp.estimate(model, topo, mp.Layout(data=8, expert=8), 8 * model.seq_len, hbm_reserve=tight).reason
    with pytest.raises(ValueError, match="hbm_reserve"):
        mp.estimate(model, topo, mp.Layout(data=8, expert=8), 8 * model.seq_len, hbm_reserve=1.5)


def test_expert_tensor_parallelism_by_hand():
    """Experts split in halves over pairs (expert=4, expert_tensor=2) do the FLOPs and hold the weights of whole
    experts over 8 (expert=8); the pair all-gathers what it received and reduce-scatters the partial outputs,
    each pass: the experts' communication row is those two collectives on devices (0, 1), by hand."""
    from moeplan.collectives import collective_time_s

    model = mp.load_model("mixtral-8x7b").with_(n_layers=4, capacity_factor=1.0)  # capacities come out whole
    topo = mp.load_topology("dgx-h100")
    gbt = 16 * model.seq_len
    whole = mp.estimate(model, topo, mp.Layout(data=8, expert=8), gbt)
    split = mp.estimate(model, topo, mp.Layout(data=8, expert=4, expert_tensor=2), gbt)
    rows = {r.name: r for r in split.layers}
    assert rows["experts"].flops == pytest.approx({r.name: r for r in whole.layers}["experts"].flops, rel=1e-12)
    assert split.memory["weights"] == pytest.approx(whole.memory["weights"], rel=1e-12)
    passes, count = 2.0, rows["dispatch_a2a"].count  # selective recompute: forward + backward
    received = rows["dispatch_a2a"].bytes / (passes * count)  # one device's all-to-all buffer
    pair = collective_time_s(topo, "all_gather", 2 * received, [0, 1]) + collective_time_s(
        topo, "reduce_scatter", 2 * received, [0, 1])
    assert rows["experts_tp"].time_s == pytest.approx(count * passes * pair, rel=1e-9)
    assert split.memory["a2a_buffers"] == pytest.approx(4 * received + 2 * 2 * received, rel=1e-12)
    assert "experts_tp" not in {r.name for r in whole.layers}


def test_expert_groups_step_over_expert_tensor_sets():
    """With expert_tensor=2 the all-to-all joins one device of each pair: on 2 nodes of 8, expert=8 spans both
    nodes (ids 0, 2, ..., 14) where expert=8 alone stays in one; the search scores the same layouts."""
    from moeplan.plan import _GROUP_IDS, Context, Plan

    model = mp.load_model("mixtral-8x7b").with_(n_layers=4)
    topo = mp.load_topology("dgx-h100", nodes=2)
    layout = mp.Layout(data=16, expert=8, expert_tensor=2)
    ctx = Context(Plan.from_layout(model, layout), topo, "bf16", None, None, None)
    assert _GROUP_IDS["expert"](*ctx._group("expert")).tolist() == list(range(0, 16, 2))
    assert _GROUP_IDS["expert_tensor"](*ctx._group("expert_tensor")).tolist() == [0, 1]
    gbt = 32 * model.seq_len
    space = mp.SearchSpace(expert=[4, 8], expert_tensor=[1, 2], tensor=[1], pipeline=[1], fsdp=[1],
                           virtual_pipeline=[1], micro_batch_size=[1], recompute=["selective"])
    result = mp.search(model, topo, space, global_batch_tokens=gbt, objective="step_time", top=10)
    assert {(r["expert"], r["expert_tensor"]) for r in result.table} == {(4, 1), (8, 1), (4, 2), (8, 2)}
    for r in result.table:
        est = mp.estimate(model, topo, mp.Layout(data=16, expert=r["expert"], expert_tensor=r["expert_tensor"]), gbt)
        assert r["step_time_s"] == pytest.approx(est.step_time_s, rel=1e-9)
    with pytest.raises(ValueError, match="space.expert_tensor"):
        mp.search(model, topo, mp.SearchSpace(expert_tensor=[3]), global_batch_tokens=gbt)


def test_pipeline_step_is_the_slowest_stage_per_micro_batch_plus_every_other_stage_once():
    """1F1B with stages of unequal time, by hand: m x the slowest, plus the rest once (over v interleaved)."""
    from moeplan.estimate import _pipeline

    pipe = _pipeline((1, 3, 2), layer_s=1.0, logits_s=0.5, p2p_s=0.0, pp=4, v=1)
    assert pipe["slowest_s"] == 3.0 and pipe["slowest_layers"] == 3 and pipe["last_is_slowest"] == 0.0
    assert pipe["bubble_s"] == pytest.approx(1 + 3 + 2.5)  # first + the other middle + last
    even = _pipeline((2, 2, 2), layer_s=1.0, logits_s=0.5, p2p_s=0.25, pp=4, v=2)
    assert even["slowest_s"] == 2.75 and even["last_is_slowest"] == 1.0
    assert even["bubble_s"] == pytest.approx(3 * 2.25 / 2)  # (p - 1) / v stages, the output layer not among them
    single = _pipeline((8, 8, 8), layer_s=1.0, logits_s=0.5, p2p_s=0.0, pp=1, v=1)
    assert single["slowest_s"] == 8.5 and single["bubble_s"] == 0.0


def test_uneven_pipeline_split_moves_layers_off_the_output_stage():
    """A large vocabulary makes the last stage (its layers and the output layer) the slowest; giving it fewer
    layers (Megatron's --decoder-last-pipeline-num-layers) balances the stages and shortens the step. The
    breakdown still adds up, the first stage's memory holds its extra layer, and bad splits are named."""
    model = mp.load_model("mixtral-8x7b").with_(n_layers=8, vocab_size=128_000)
    topo = mp.load_topology("dgx-h100", nodes=2)
    gbt = 64 * model.seq_len
    even = mp.estimate(model, topo, mp.Layout(data=4, pipeline=4, expert=4), gbt)
    split = mp.estimate(model, topo, mp.Layout(data=4, pipeline=4, expert=4, first_stage_layers=3,
                                               last_stage_layers=1), gbt)
    assert split.step_time_s < even.step_time_s
    rows = {r.name: r for r in split.layers}
    assert sum(r.time_s for r in split.layers) == pytest.approx(split.step_time_s, rel=1e-9)
    assert rows["attention"].count == pytest.approx(3 * split.micro_batches)  # the first stage is now slowest
    assert rows["logits"].time_s == 0.0
    assert split.memory["activations"] > even.memory["activations"]
    with pytest.raises(ValueError, match="last_stage_layers"):
        mp.estimate(model, topo, mp.Layout(data=4, pipeline=4, expert=4, first_stage_layers=1,
                                           last_stage_layers=2), gbt)  # 5 layers over 2 stages
    with pytest.raises(ValueError, match="first_stage_layers"):
        mp.Layout(data=8, first_stage_layers=2)  # no pipeline


def test_per_part_time_scales_of_a_profile_multiply_their_rows():
    """A profile's ``fitted.parts`` scales every breakdown row of its part (training and inference); an
    unknown part or a non-positive scale is named."""
    import copy

    import yaml

    from tests.conftest import ROOT

    data = yaml.safe_load((ROOT / "profiles" / "cpu-host.yaml").read_text())
    scaled = copy.deepcopy(data)
    scaled["fitted"]["parts"] = {"optimizer": 0.25, "dispatch_a2a": 2.0, "attention": 1.5, "grad_sync": 0.5}
    plain, with_parts = mp.Profile(data), mp.Profile(scaled)
    assert with_parts.part_scales == scaled["fitted"]["parts"] and plain.part_scales == {}
    model = mp.load_model("st-moe-like-8b").with_(n_layers=4)
    topo = mp.load_topology("dgx-h100", nodes=2)
    layout = mp.Layout(data=16, expert=16)
    for mode, batch in (("train", 64 * model.seq_len), ("prefill", 16 * model.seq_len)):
        a = {r.name: r.time_s for r in mp.estimate(model, topo, layout, batch, mode=mode, profile=plain).layers}
        b = {r.name: r.time_s for r in mp.estimate(model, topo, layout, batch, mode=mode, profile=with_parts).layers}
        for name, scale in (("dispatch_a2a", 2.0), ("attention", 1.5), ("attention_scores", 1.5), ("experts", 1.0)):
            assert b[name] == pytest.approx(scale * a[name], rel=1e-9), (mode, name)
        if mode == "train":
            assert b["optimizer"] == pytest.approx(0.25 * a["optimizer"], rel=1e-9)
            assert b["grad_sync"] == pytest.approx(0.5 * a["grad_sync"], rel=1e-9)
    for parts, message in (({"optimiser": 1.0}, "a part among"), ({"router": 0.0}, "time scale")):
        scaled["fitted"]["parts"] = parts
        with pytest.raises(ValueError, match=message):
            mp.Profile(scaled)


def test_context_parallelism_by_hand():
    """context=2: each device holds half of every sequence, so per step it does the attention work of data=16 on
    half the tokens per micro-batch; the whole sequence's keys and values are gathered over the pair (the
    attention's communication bytes), and gradients are all-reduced over data x context, one group (by hand)."""
    from moeplan.collectives import collective_time_s
    from moeplan.estimate import plan_costs
    from moeplan.plan import _GROUP_IDS, Context, Plan

    model = mp.load_model("mixtral-8x7b").with_(n_layers=4)
    topo = mp.load_topology("dgx-h100", nodes=2)
    gbt = 16 * model.seq_len
    plain = mp.estimate(model, topo, mp.Layout(data=16, expert=8), gbt, overlap="none")
    split = mp.estimate(model, topo, mp.Layout(data=8, context=2, expert=8), gbt, overlap="none")
    a, b = ({r.name: r for r in e.layers} for e in (plain, split))
    assert b["attention_scores"].flops == pytest.approx(a["attention_scores"].flops, rel=1e-12)
    assert b["attention"].flops == pytest.approx(a["attention"].flops, rel=1e-12)
    assert split.memory["activations"] < plain.memory["activations"]  # half of each sequence per device
    kv = model.seq_len * 2 * model.n_kv_heads * model.d_head * 2  # bf16 keys and values of one sequence
    passes, count = 2.0, b["attention"].count
    plan = Plan.from_layout(model, mp.Layout(data=8, context=2, expert=8))
    costs = plan_costs(plan, topo, gbt, overlap="none")  # the gather runs under the scores: no exposed row
    assert costs["attention:bytes"] == pytest.approx(passes * count * kv, rel=1e-12)  # no tensor parallelism
    ctx = Context(plan, topo, "bf16", None, None, None)
    assert _GROUP_IDS["context"](*ctx._group("context")).tolist() == [0, 1]
    assert _GROUP_IDS["data"](*ctx._group("data")).tolist() == list(range(0, 16, 2))
    dense = 4.0 * mp.param_counts(model)["non_expert"]
    expert = 4.0 * mp.param_counts(model)["expert"] / 8
    replicas = list(range(0, 16, 8))  # the expert group (0..7) repeats every 8 devices
    by_hand = (collective_time_s(topo, "all_reduce", dense, list(range(16)))  # the data x context replicas
               + collective_time_s(topo, "all_reduce", expert, replicas))
    assert b["grad_sync"].time_s == pytest.approx(by_hand, rel=1e-9)
    with pytest.raises(ValueError, match="layout.context"):
        mp.estimate(model.with_(seq_len=4098), topo, mp.Layout(data=4, context=4, expert=8), 4 * 4098)
    with pytest.raises(ValueError, match="layout.context"):
        mp.estimate(model, topo, mp.Layout(data=8, context=2, expert=8), gbt, mode="prefill")
    space = mp.SearchSpace(expert=[8], context=[1, 2], tensor=[1], pipeline=[1], fsdp=[1], virtual_pipeline=[1],
                           micro_batch_size=[1], recompute=["selective"])
    result = mp.search(model, topo, space, global_batch_tokens=gbt, objective="step_time", overlap="none")
    assert {r["context"] for r in result.table} == {1, 2}
    for r in result.table:
        layout = mp.Layout(data=r["data"], context=r["context"], expert=8)
        assert r["step_time_s"] == pytest.approx(mp.estimate(model, topo, layout, gbt, overlap="none").step_time_s,
                                                 rel=1e-9)


def test_a_training_point_publishing_only_a_throughput_is_compared_as_a_step_time():
    """The same measured step, published as a step time, steps/s, tokens/s, tokens/s per chip or sequences/s,
    gives the same error; MFU and model FLOP/s per chip are compared as rates; with none, the skip names them."""
    from moeplan.validation import training_rows

    step, chips, seq, batch = 2.0, 64, 4096, 64 * 4096
    base = {"kind": "training_step", "source": "a run", "hardware": {"family": "dgx-h100", "chips": chips},
            "model": {"d_model": 2048, "n_layers": 8, "n_heads": 16, "n_kv_heads": 4, "d_head": 128,
                      "vocab_size": 32000, "seq_len": seq, "num_experts": 16, "top_k": 2, "expert_d_ff": 1024},
            "layout": {"data": 8, "expert": 8}, "global_batch_tokens": batch, "dtype": "bf16"}
    published = {"step_time_s": step, "steps_per_s": 1 / step, "tokens_per_s": batch / step,
                 "tokens_per_s_per_chip": batch / step / chips, "examples_per_s": batch / seq / step}
    points = [{**base, "id": name, "measured": {name: value}} for name, value in published.items()]
    rows, skipped = training_rows(points + [{**base, "id": "none", "measured": {"mfu": None}}])
    assert [r.metric for r in rows] == list(published)
    assert all(r.error == pytest.approx(rows[0].error, rel=1e-12) for r in rows)
    assert rows[2].predicted == pytest.approx(batch / rows[0].predicted)  # tokens/s at the predicted step
    assert "tokens_per_s_per_chip" in dict(skipped)["none"]
    mfu_row = training_rows([{**base, "id": "m", "measured": {"mfu": 0.3}}])[0][0]
    flops_row = training_rows([{**base, "id": "f", "measured": {"model_flops_per_s_per_chip": 0.3 * 9.89e14}}])[0][0]
    assert flops_row.error == pytest.approx(mfu_row.error, rel=1e-9)


def test_switch_transformers_speed_table_keeps_its_order():
    """Switch Transformers Table 1 (128 experts, top-1 and top-2 at capacity factors 1.0/1.25/2.0, and T5-Base/
    Large, on 32 TPU v3 cores): the predicted speeds order the nine rows as measured (Kendall tau >= 0.8), each
    within 25 % but dense T5-Base (26 %: Mesh TensorFlow's 2020 einsum attention is costed as a fused flash
    kernel, whose backward recomputes the scores). Nothing in the model is fitted to them."""
    from moeplan.validation import RANKINGS_PATH, ranking_taus

    points = load_points(RANKINGS_PATH)
    rows, skipped = training_rows(points)
    assert not skipped and len(rows) == 9
    tau, count = ranking_taus(points)["switch-table1"]
    assert count == 9 and tau >= 0.8
    for r in rows:
        assert abs(r.error) <= (0.30 if r.point_id == "SWITCH-T1-t5-base" else 0.25), (r.point_id, r.error)
    by = {r.point_id.removeprefix("SWITCH-T1-"): r.predicted for r in rows}
    # fewer expert slots are faster: top-1 over top-2, and a lower capacity factor, at every setting
    for cf in ("1.0", "1.25", "2.0"):
        assert by[f"switch-base-{cf}"] > by[f"moe-base-{cf}"]
    assert by["switch-base-1.0"] > by["switch-base-1.25"] > by["switch-base-2.0"]
    assert by["moe-base-1.0"] > by["moe-base-1.25"] > by["moe-base-2.0"]


def test_a_training_point_names_its_dispatcher_and_schedule():
    """A GPU point that names DeepEP (or states a flex dispatcher) is estimated with DeepEP's normal kernels, one
    naming HybridEP with HybridEP's, one naming Megatron's EP all-to-all overlap with overlap="full", one naming
    DualPipe with that framework; a stated all-to-all dispatcher keeps NCCL; an unknown one is skipped with the
    field named; on a TPU the words change nothing."""
    from moeplan.validation import point_framework, point_kernels, training_rows

    base = {"kind": "training_step", "source": "a run", "hardware": {"family": "dgx-h100", "chips": 32},
            "model": {"d_model": 2048, "n_layers": 8, "n_heads": 16, "n_kv_heads": 4, "d_head": 128,
                      "vocab_size": 32000, "seq_len": 4096, "num_experts": 64, "top_k": 6, "expert_d_ff": 1024},
            "layout": {"data": 32, "expert": 32}, "global_batch_tokens": 64 * 4096, "dtype": "bf16",
            "measured": {"step_time_s": 1.0}}
    variants = {"nccl": {}, "deepep": {"notes": "Megatron-Core with DeepEP (flex dispatcher)"},
                "hybrid": {"layout": {**base["layout"], "moe_token_dispatcher_type": "flex",
                                      "moe_flex_dispatcher_backend": "hybridep"}},
                "overlap": {"notes": "DeepEP, --overlap-moe-expert-parallel-comm"},
                "stated": {"notes": "DeepEP available", "layout": {**base["layout"], "dispatch": "alltoall"}},
                "bad": {"layout": {**base["layout"], "moe_token_dispatcher_type": "carrier-pigeon"}}}
    points = [{**base, "id": name, **extra} for name, extra in variants.items()]
    assert point_kernels(points[1]) == {"dispatch": "deepep_normal"}
    assert point_kernels(points[2]) == {"dispatch": "hybridep"} == point_kernels({**base, "notes": "HybridEP"})
    assert point_kernels(points[3]) == {"dispatch": "deepep_normal", "overlap": "full"}
    assert point_kernels(points[4]) == {"dispatch": "nccl"}
    # Megatron-Bridge's moe_a2a_overlap, stated either way in the notes or as a field
    assert point_kernels({**base, "notes": "hybridep; moe_a2a_overlap: true"})["overlap"] == "full"
    assert "overlap" not in point_kernels({**base, "notes": "moe_a2a_overlap=False, ep a2a overlap off"})
    assert "overlap" not in point_kernels({**base, "layout": {"moe_a2a_overlap": False}, "notes": "ep a2a overlap"})
    assert point_kernels({**base, "layout": {"moe_a2a_overlap": True}}) == {"overlap": "full"}
    assert point_framework({**base, "notes": "DualPipe over 16 pipeline stages"}) == "dualpipe"
    rows, skipped = training_rows(points)
    step = {r.point_id: r.predicted for r in rows}
    assert max(step["deepep"], step["hybrid"]) < step["nccl"] == step["stated"]  # one copy per remote node
    assert step["overlap"] < step["deepep"]
    assert "dispatch" in dict(skipped)["bad"] and "carrier-pigeon" in dict(skipped)["bad"]
    tpu = {**base, "id": "tpu", "hardware": {"family": "tpu-v5p", "chips": 32}, "notes": "DeepEP"}
    assert [r.point_id for r in training_rows([tpu])[0]] == ["tpu"]


def test_megatron_pipeline_sends_hide_only_in_the_interleaved_schedule(monkeypatch):
    """Megatron-Core's non-interleaved 1F1B refuses to overlap p2p communication: its sends are exposed, once per
    micro-batch in the steady state and once per other stage in the fill (the step grows by (m + p - 1) x the
    sends of one micro-batch); with virtual stages, or under XLA's async permutes, they hide, all but the share of
    their time their SMs take from the compute."""
    from dataclasses import replace

    from moeplan import frameworks

    monkeypatch.setitem(frameworks.FRAMEWORKS, "megatron-hidden-p2p",
                        replace(frameworks.FRAMEWORKS["megatron"], p2p_overlap="always"))
    model = mp.load_model("mixtral-8x7b").with_(n_layers=8)
    topo = mp.load_topology("dgx-h100", nodes=4)
    tokens, pp = 64 * 4096, 4
    plain = mp.Layout(data=8, expert=8, pipeline=pp)
    exposed = mp.estimate(model, topo, plain, tokens, framework="megatron")
    hidden = mp.estimate(model, topo, plain, tokens, framework="megatron-hidden-p2p")
    sends = next(r for r in exposed.layers if r.name == "pipeline_p2p")
    micro_batches = tokens // model.seq_len // 8
    per_micro_batch = sends.time_s / micro_batches
    share = 16 / 132  # hidden, the sends still hold NCCL's 16 channels of the H100's 132 SMs (Overlap)
    assert per_micro_batch > 0
    assert next(r for r in hidden.layers if r.name == "pipeline_p2p").time_s == pytest.approx(share * sends.time_s)
    assert exposed.step_time_s - hidden.step_time_s == pytest.approx(
        (1 - share) * (micro_batches + pp - 1) * per_micro_batch)
    interleaved = mp.estimate(model, topo, replace(plain, virtual_pipeline=2), tokens, framework="megatron")
    p2p = next(r for r in interleaved.layers if r.name == "pipeline_p2p")
    assert p2p.time_s == pytest.approx(2 * share * sends.time_s)  # twice the sends (two virtual stages), hidden


def test_a_training_point_without_a_chip_count_takes_it_from_its_nodes_or_layout():
    """chips missing: nodes x the family's devices per node, else the product of the layout's degrees; with
    neither, the point is skipped with the reason, never raised."""
    from moeplan.validation import training_rows

    base = {"kind": "training_step", "source": "a run",
            "model": {"d_model": 2048, "n_layers": 8, "n_heads": 16, "n_kv_heads": 4, "d_head": 128,
                      "vocab_size": 32000, "seq_len": 4096, "num_experts": 16, "top_k": 2, "expert_d_ff": 1024},
            "layout": {"data": 16, "expert": 8}, "global_batch_tokens": 64 * 4096, "dtype": "bf16",
            "measured": {"step_time_s": 1.0}}
    points = [{**base, "id": "chips", "hardware": {"family": "dgx-h100", "chips": 16}},
              {**base, "id": "nodes", "hardware": {"family": "dgx-h100", "chips": None, "nodes": 2}},
              {**base, "id": "layout", "hardware": {"family": "dgx-h100"}},
              {**base, "id": "none", "hardware": {"family": "dgx-h100"}, "layout": {"expert": 8}}]
    rows, skipped = training_rows(points)
    step = {r.point_id: r.predicted for r in rows}
    assert step["chips"] == step["nodes"] == step["layout"]
    assert "chips" in dict(skipped)["none"]
    # unstated attention shape: multi-head of d_model / n_heads; unstated routing: skipped, named
    mha = {k: v for k, v in base["model"].items() if k not in ("n_kv_heads", "d_head")}
    implicit = {**points[0], "id": "mha", "model": {**mha, "n_kv_heads": None}}
    explicit = {**points[0], "id": "mha16", "model": {**mha, "n_kv_heads": 16, "d_head": 128}}
    no_k = {**points[0], "id": "no_k", "model": {**base["model"], "top_k": None}}
    dense = {**points[0], "id": "dense", "model": {**mha, "num_experts": None, "top_k": None, "d_ff": 8192,
                                                       "expert_d_ff": None}, "layout": {"data": 16}}
    rows, skipped = training_rows([implicit, explicit, no_k, dense])
    step = {r.point_id: r.predicted for r in rows}
    assert step["mha"] == step["mha16"] and "dense" in step
    assert "top_k" in dict(skipped)["no_k"]


def test_fp8_training_pays_for_casting_its_gemm_inputs(monkeypatch):
    """With an 8-bit dtype every expert GEMM input made from bf16 is cast first: per routed copy the forward
    casts d_model (up projection) + d_ff (down projection) values, the backward the output gradients 2 d_ff
    + d_model, 4 bytes moved per value (read 2, write the copy and its transpose). bf16 is unaffected."""
    from moeplan import compute

    model = mp.MoEModel(name="casts", d_model=1024, n_layers=2, n_heads=8, n_kv_heads=8, d_head=128, d_ff=0,
                        vocab_size=1024, seq_len=1024, num_experts=8, top_k=2, expert_d_ff=512, capacity_factor=None)
    topo = mp.load_topology("dgx-h100")
    layout = mp.Layout(data=8, expert=8, micro_batch_size=1)
    args = (model, topo, layout, 8 * 1024)
    routing = mp.Routing("balanced")

    def experts_s(dtype):
        est = mp.estimate(*args, dtype=dtype, routing=routing)
        return next(r.time_s for r in est.layers if r.name == "experts")

    with_casts, bf16 = experts_s("fp8"), experts_s("bf16")
    monkeypatch.setitem(compute.QUANTIZE_BYTES_PER_ELEMENT, "train", 0.0)
    without, bf16_again = experts_s("fp8"), experts_s("bf16")
    assert bf16_again == bf16
    copies = 1024 * 2  # per device and micro-batch: 1024 tokens x top-2, dropless, balanced over the 8 devices
    values = copies * ((1024 + 512) + (2 * 512 + 1024))
    eff = topo.chip.efficiency
    expected = 4.0 * values / (topo.chip.hbm_bw_bytes_per_s * eff.memory)  # one forward and backward
    layers = model.n_moe_layers  # one micro-batch per device
    assert with_casts - without == pytest.approx(expected * layers, rel=1e-9)


def test_fp8_prefill_casts_only_the_forward_inputs(monkeypatch):
    """Inference casts each 8-bit GEMM input once, no transpose and no gradients: 3 bytes per value."""
    from moeplan import compute

    model = mp.MoEModel(name="casts", d_model=1024, n_layers=2, n_heads=8, n_kv_heads=8, d_head=128, d_ff=0,
                        vocab_size=1024, seq_len=1024, num_experts=8, top_k=2, expert_d_ff=512, capacity_factor=None)
    topo = mp.load_topology("dgx-h100")

    def experts_s():
        est = mp.estimate(model, topo, mp.Layout(data=8, expert=8), 8 * 1024, mode="prefill", dtype="fp8",
                          routing=mp.Routing("balanced"))
        return next(r.time_s for r in est.layers if r.name == "experts")

    with_casts = experts_s()
    monkeypatch.setitem(compute.QUANTIZE_BYTES_PER_ELEMENT, "infer", 0.0)
    values = 1024 * 2 * (1024 + 512)  # routed copies x (up projection's input + down projection's input)
    expected = 3.0 * values / (topo.chip.hbm_bw_bytes_per_s * topo.chip.efficiency.memory) * model.n_moe_layers
    assert with_casts - experts_s() == pytest.approx(expected, rel=1e-9)


def test_a_training_points_context_parallel_degree_is_read_under_each_name():
    """Sources write the context-parallel degree as context, context_parallel (the published schema) or cp; the
    data degree is what is left of the devices."""
    from moeplan.validation import training_layout

    point = {"model": {"seq_len": 8192}, "global_batch_tokens": 64 * 8192,
             "layout": {"data": 8, "tensor": 8, "pipeline": 8, "micro_batch_per_device": 1}}
    for key in ("context", "context_parallel", "cp"):
        lay = training_layout({**point, "layout": {**point["layout"], key: 2}}, 1024, None)
        assert (lay.context, lay.data) == (2, 8)
    assert training_layout(point, 1024, None).data == 16


def test_flash_attention_backward_recomputes_the_scores():
    """Fused flash attention's backward runs five matmuls to the forward's two (2.5x); an unfused kernel's backward
    is twice its forward like every other part, and the collectives count is unchanged either way."""
    from moeplan.estimate import FLASH_BACKWARD_UNITS, training_passes

    none = mp.layout.RECOMPUTE.index("none")
    flash = training_passes(none, ["attention_scores", "experts"], "flash")
    unfused = training_passes(none, ["attention_scores", "experts"], "unfused")
    assert FLASH_BACKWARD_UNITS == 2.5
    assert flash["attention_scores"] == (3.5, 2.0) and unfused["attention_scores"] == (3.0, 2.0)
    assert flash["experts"] == unfused["experts"] == (3.0, 2.0)
    assert training_passes(mp.layout.RECOMPUTE.index("full"), ["attention_scores"])["attention_scores"] == (4.5, 3.0)


def test_attention_head_factor_reproduces_flashattention3():
    """The softmax's fixed cost per score element, fitted to FlashAttention-3's H100 charts (Shah et al. 2024,
    Figs. 5-6): the forward fitted at head dims 64 and 128 predicts 256 within 2 % (measured 756 TFLOP/s); the
    training figure (35 head dims) is the forward's and backward's together, the inference one (56) the forward's,
    within 1 %."""
    from moeplan.compute import FA3_H100_TFLOPS, SOFTMAX_HEAD_DIMS, attention_head_factor

    def fit(points, flops_per_dim):  # per score element: seconds = fixed + slope * d
        (d1, r1), (d2, r2) = list(points.items())[:2]
        t1, t2 = flops_per_dim * d1 / (r1 * 1e12), flops_per_dim * d2 / (r2 * 1e12)
        slope = (t2 - t1) / (d2 - d1)
        return t1 - slope * d1, slope

    fwd, bwd = fit(FA3_H100_TFLOPS["forward"], 4.0), fit(FA3_H100_TFLOPS["backward"], 10.0)
    predicted_256 = 4.0 * 256 / (fwd[0] + fwd[1] * 256) / 1e12
    assert predicted_256 == pytest.approx(FA3_H100_TFLOPS["forward"][256], rel=0.02)
    assert SOFTMAX_HEAD_DIMS["train"] == pytest.approx((fwd[0] + bwd[0]) / (fwd[1] + bwd[1]), rel=0.01)
    assert SOFTMAX_HEAD_DIMS["forward"] == pytest.approx(fwd[0] / fwd[1], rel=0.01)
    assert attention_head_factor(128, 128) == pytest.approx(1.0)
    assert attention_head_factor(64, 64) == pytest.approx(99 / 64 * 128 / 163)
    assert attention_head_factor(192, 128) == pytest.approx(195 / 160 * 128 / 163)  # DeepSeek's MLA


def test_narrow_heads_slow_a_gpus_scores_not_a_tpus():
    """The estimate's attention scores follow ``attention_head_factor`` on a GPU: the same score FLOPs in 64-wide
    heads take 1.21x in training, 1.30x in a prefill; a TPU keeps the head-dim-free efficiency; the projections do
    not change."""
    def rows(family, d_head):
        model = mp.MoEModel(d_model=4096, n_layers=2, n_heads=4096 // d_head, n_kv_heads=4096 // d_head,
                            d_head=d_head, vocab_size=32000, seq_len=8192, d_ff=0, num_experts=8, top_k=2,
                            expert_d_ff=4096)
        topo = mp.load_topology(family)
        est = mp.estimate(model, topo, mp.Layout(data=topo.num_devices), 8192 * topo.num_devices * 2)
        return {r.name: r.time_s for r in est.layers}

    for family, ratio in (("dgx-h100", 99 / 64 * 128 / 163), ("tpu-v5p", 1.0)):
        narrow, wide = rows(family, 64), rows(family, 128)
        assert narrow["attention_scores"] / wide["attention_scores"] == pytest.approx(ratio, rel=1e-6)
        assert narrow["attention"] == pytest.approx(wide["attention"], rel=1e-6)
    topo = mp.load_topology("dgx-h100")
    model = mp.MoEModel(d_model=4096, n_layers=2, n_heads=64, n_kv_heads=64, d_head=64, vocab_size=32000,
                        seq_len=8192, d_ff=0, num_experts=8, top_k=2, expert_d_ff=4096)
    wide = dataclasses.replace(model, n_heads=32, n_kv_heads=32, d_head=128)
    prefill = [{r.name: r.time_s for r in mp.estimate(m, topo, mp.Layout(data=8), 8 * 8192, mode="prefill").layers}
               for m in (model, wide)]
    assert prefill[0]["attention_scores"] / prefill[1]["attention_scores"] == pytest.approx(120 / 64 * 128 / 184)


def test_a_sliding_window_shrinks_the_scores_and_the_kv_cache():
    """gpt-oss's pattern (window 128 on alternate layers) at a 4096 sequence: the training scores take the
    causal keys ``attended_keys`` counts against a full layer's s / 2, their reported FLOPs the window's keys,
    and a served model caches only the window on its windowed layers; projections are unchanged."""
    topo = mp.load_topology("dgx-h100")
    plain = mp.MoEModel(d_model=4096, n_layers=4, n_heads=32, n_kv_heads=8, d_head=128, vocab_size=32000,
                        seq_len=4096, d_ff=0, num_experts=8, top_k=2, expert_d_ff=4096)
    windowed = dataclasses.replace(plain, sliding_window=128, full_attention_every=2)
    s = plain.seq_len

    def run(model, mode):
        est = mp.estimate(model, topo, mp.Layout(data=8), 8 * s * (2 if mode == "train" else 1), mode=mode)
        return {r.name: r for r in est.layers}, est.memory

    (train_w, _), (train_p, _) = run(windowed, "train"), run(plain, "train")
    keys = mp.moe.attended_keys(windowed, s, causal=True)
    assert train_w["attention_scores"].time_s / train_p["attention_scores"].time_s == pytest.approx(keys / (s / 2))
    assert train_w["attention_scores"].flops / train_p["attention_scores"].flops == pytest.approx((128 + s) / 2 / s)
    assert train_w["attention"].time_s == pytest.approx(train_p["attention"].time_s)
    (_, served_w), (_, served_p) = run(windowed, "prefill"), run(plain, "prefill")
    assert served_w["kv_cache"] / served_p["kv_cache"] == pytest.approx((128 + s) / 2 / s)


def test_a_rate_published_under_a_causal_flop_count_is_compared_under_it():
    """Megatron-LM (since 2025-03) and MaxText count half of a causal self-attention's score FLOPs; a point that
    says so (``flop_count: causal``) has its predicted FLOP rate scaled by that count over moeplan's full one: at
    131072 tokens of Qwen3-235B the scores are most of the FLOPs, so the factor is far below 1; an unknown count
    is an error that names the field."""
    from moeplan.validation import TRAINING_PATH, _flop_count

    point = next(p for p in load_points(TRAINING_PATH) if p["id"] == "TB-h100-qwen3-235b-mcore-128k-cp8")
    assert point["flop_count"] == "causal"
    spec = {k: v for k, v in point["model"].items() if k in ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_head",
                                                            "vocab_size", "seq_len", "num_experts", "top_k",
                                                            "expert_d_ff")}
    model = mp.MoEModel(**spec, d_ff=0, capacity_factor=None)
    scores = 3.0 * mp.moe.forward_flops_per_token(model)["attention_scores"]
    assert _flop_count(point, model) == pytest.approx(1.0 - 0.5 * scores / mp.moe.model_flops_per_token(model))
    assert 0.5 < _flop_count(point, model) < 0.6
    assert _flop_count({**point, "flop_count": "full"}, model) == 1.0 == _flop_count({}, model)
    with pytest.raises(ValueError, match="flop_count"):
        _flop_count({**point, "flop_count": "palm"}, model)
    row = next(r for r in training_rows([point])[0])
    assert abs(row.error) < 0.15  # compared under the full count it read 42 % too fast
