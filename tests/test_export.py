"""Runnable configs: MaxText and Megatron-Core exports parse back to the layout, a moeplan plan file
reproduces the estimate."""

from __future__ import annotations

import pytest
import yaml

import moeplan as mp
from moeplan.export import (
    estimate_plan,
    load_plan,
    maxtext_config,
    megatron_args,
    parse_maxtext,
    parse_megatron,
    plan_document,
)

KEYS = ("data", "fsdp", "tensor", "pipeline", "expert", "expert_tensor", "context", "recompute",
        "first_stage_layers", "last_stage_layers", "gradient_bytes", "quantized_gather")


def _same(a: mp.Layout, b: mp.Layout, keys=KEYS):
    return {k: getattr(a, k) for k in keys} == {k: getattr(b, k) for k in keys}


@pytest.mark.parametrize("layout", [mp.Layout(fsdp=128, expert=8), mp.Layout(data=8, fsdp=16, expert=4,
                                                                                recompute="full"),
                                    mp.Layout(data=32, fsdp=4, recompute="none"),
                                    mp.Layout(data=16, fsdp=8, expert=8, expert_tensor=2),
                                    mp.Layout(data=8, fsdp=8, context=2, expert=8),
                                    mp.Layout(fsdp=128, expert=8, recompute="offload"),
                                    mp.Layout(fsdp=128, expert=8, recompute="offload_projections"),
                                    mp.Layout(fsdp=128, expert=8, recompute="offload_inputs"),
                                    mp.Layout(fsdp=128, recompute="full", gradient_bytes=2)])
def test_maxtext_fragment_parses_back_to_the_layout(layout):
    model = mp.load_model("st-moe-like-8b")
    topo = mp.load_topology("tpu-v5p", shape=(4, 4, 8))
    text = yaml.safe_dump(maxtext_config(model, topo, layout, 256 * model.seq_len))
    config = yaml.safe_load(text)
    assert _same(parse_maxtext(config), layout)
    assert config["num_experts"] == 64 and config["num_experts_per_tok"] == 2 and config["capacity_factor"] == 1.25
    assert config["per_device_batch_size"] == 2.0
    assert (config.get("query_proj") == "offload") == (layout.recompute == "offload_projections")
    if layout.recompute == "offload_projections":  # a custom policy moeplan cannot express is refused
        with pytest.raises(ValueError, match="remat_policy: custom with decoder_layer_input, key_proj"):
            parse_maxtext(dict(config, query_proj="remat"))


def test_quantized_gathers_export_as_maxtext_qwix_fixed_calibration_and_megatron_fp8_param_gather():
    model = mp.load_model("st-moe-like-8b")
    topo = mp.load_topology("tpu-v5p", shape=(4, 4, 8))
    layout = mp.Layout(fsdp=128, recompute="full", gradient_bytes=2, quantized_gather=True)
    config = maxtext_config(model, topo, layout, 256 * model.seq_len, dtype="fp8")
    assert config["weight_quantization_calibration_method"].startswith("fixed") and config["grad_dtype"] == "bfloat16"
    assert _same(parse_maxtext(config), layout)
    assert "weight_quantization_calibration_method" not in maxtext_config(model, topo, layout, 256 * model.seq_len)
    gpus = mp.load_topology("dgx-h100", nodes=16)
    mtp = megatron_args(model.with_(mtp_layers=1), gpus, mp.Layout(data=128), 512 * model.seq_len)
    assert mtp[mtp.index("--mtp-num-layers") + 1] == "1" and "--mtp-num-layers" not in megatron_args(
        model, gpus, mp.Layout(data=128), 512 * model.seq_len)
    args = megatron_args(model, gpus, mp.Layout(fsdp=128, quantized_gather=True), 512 * model.seq_len, dtype="fp8")
    assert "--fp8-param-gather" in args and parse_megatron(args, 128).quantized_gather
    with pytest.raises(ValueError, match="layout.gradient_bytes: got 3"):
        mp.Layout(gradient_bytes=3)
    assert mp.Layout.parse("fsdp=8,quantized_gather=true,gradient_bytes=2") == mp.Layout(
        fsdp=8, quantized_gather=True, gradient_bytes=2)


def test_maxtext_puts_data_across_slices_over_dcn():
    model = mp.load_model("st-moe-like-8b")
    topo = mp.load_topology("tpu-v5p", shape=(4, 4, 8), slices=2)
    config = maxtext_config(model, topo, mp.Layout(data=2, fsdp=128, expert=8), 256 * model.seq_len)
    assert config["dcn_data_parallelism"] == 2 and config["ici_data_parallelism"] == 1
    assert config["ici_fsdp_parallelism"] == 128
    with pytest.raises(ValueError, match="slice count"):
        maxtext_config(model, topo, mp.Layout(data=1, fsdp=256), 256 * model.seq_len)


@pytest.mark.parametrize("layout,dispatch", [(mp.Layout(data=16, expert=8, pipeline=4, virtual_pipeline=2), "nccl"),
                                             (mp.Layout(data=8, tensor=2, expert=8, pipeline=4, recompute="full"),
                                              "deepep_normal"),
                                             (mp.Layout(data=16, tensor=1, expert=4, expert_tensor=2, pipeline=4,
                                                        first_stage_layers=7, last_stage_layers=9), "nccl"),
                                             (mp.Layout(data=4, tensor=2, context=4, expert=8, pipeline=2),
                                              "nccl"),
                                             (mp.Layout(data=32, tensor=2, expert=8, recompute="offload"), "nccl"),
                                             (mp.Layout(data=32, tensor=2, expert=8, gradient_bytes=2,
                                                        quantized_gather=True), "nccl"),
                                             (mp.Layout(data=8, expert=8, pipeline=8), "hybridep")])
def test_megatron_arguments_parse_back_to_the_layout(layout, dispatch):
    model = mp.load_model("mixtral-8x7b")
    topo = mp.load_topology("dgx-h100", nodes=8)
    args = megatron_args(model, topo, layout, 512 * model.seq_len, dtype="fp8", dispatch=dispatch)
    assert _same(parse_megatron(args, topo.num_devices), layout, KEYS + ("virtual_pipeline", "micro_batch_size"))
    assert args[args.index("--moe-router-topk") + 1] == "2" and args[args.index("--global-batch-size") + 1] == "512"
    assert ("--moe-token-dispatcher-type" in args) and ("flex" in args) == (dispatch != "nccl")
    assert ("hybridep" in args) == (dispatch == "hybridep")
    assert "--fp8-format" in args
    if layout.recompute == "offload":  # every layer's activations to host but the last one's
        assert args[args.index("--cpu-offloading-num-layers") + 1] == str(model.n_layers - 1)
        assert "--recompute-granularity" not in args
    with pytest.raises(ValueError, match="layout.recompute: 'offload_projections'"):
        megatron_args(model, topo, mp.Layout(data=64, expert=8, recompute="offload_projections"), 512 * model.seq_len)


def test_a_plan_file_reproduces_the_estimate(tmp_path):
    model = mp.load_model("deepseek-v3")
    topo = mp.load_topology("dgx-h100", nodes=32)
    layout = mp.Layout(data=64, expert=64, pipeline=4)
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan_document(model, topo, layout, 4096 * 1024, "fp8", "dualpipe")))
    plan = load_plan(path)
    assert plan["model"] == model and plan["topology"].name == topo.name and plan["layout"] == layout
    want = mp.estimate(model, topo, layout, 4096 * 1024, dtype="fp8", framework="dualpipe")
    assert estimate_plan(plan).step_time_s == want.step_time_s
    bad = tmp_path / "bad.yaml"
    bad.write_text("schema_version: 1\nmodel: {}\n")
    with pytest.raises(ValueError, match="topology: missing"):
        load_plan(bad)


def test_the_cli_exports_each_format(tmp_path, capsys):
    from moeplan.cli import main

    base = ["export", "--topology", "dgx-h100", "--nodes", "8", "--model", "mixtral-8x7b", "--layout",
            "data=16,expert=8,pipeline=4", "--batch-tokens", str(512 * 4096)]
    assert main(base + ["--format", "megatron"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "--pipeline-model-parallel-size 4 \\" in lines and lines[-1] == "--bf16"
    assert main(base + ["--format", "maxtext"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["ici_data_parallelism"] == 16
    assert main(base + ["--format", "moeplan", "--out", str(tmp_path / "p.yaml")]) == 0
    plan = load_plan(tmp_path / "p.yaml")
    assert plan["layout"] == mp.Layout(data=16, expert=8, pipeline=4)
    assert main(base[:-2] + ["--batch-tokens", "100", "--format", "maxtext"]) == 2  # not whole sequences


def test_a_sliding_window_exports_to_megatron_and_maxtext_and_round_trips(tmp_path):
    """gpt-oss's window: Megatron-LM's --window-size (left, right) and --window-attn-skip-freq, MaxText's
    sliding_window_size; the moeplan plan file keeps both fields."""
    model = mp.load_model("gpt-oss-120b")
    topo = mp.load_topology("dgx-h100", nodes=8)
    layout = mp.Layout(data=64, expert=64)
    args = megatron_args(model, topo, layout, 1280 * model.seq_len)
    assert args[args.index("--window-size") + 1] == "128,0" and args[args.index("--window-attn-skip-freq") + 1] == "2"
    tpu = mp.load_topology("tpu-v5p", shape=(4, 4, 4))
    assert maxtext_config(model, tpu, mp.Layout(fsdp=64), 64 * model.seq_len)["sliding_window_size"] == 128
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan_document(model, topo, layout, 1280 * model.seq_len)))
    plan = load_plan(path)
    assert (plan["model"].sliding_window, plan["model"].full_attention_every) == (128, 2)
    assert estimate_plan(plan).step_time_s == pytest.approx(
        mp.estimate(model, topo, layout, 1280 * model.seq_len).step_time_s)
