"""A chosen plan as something that runs: a MaxText config fragment, Megatron-Core arguments, and a moeplan
YAML that reproduces the estimate.

* ``maxtext_config``: the mesh as ``ici_*`` / ``dcn_*`` parallelism (data across TPU slices over DCN,
  the rest inside a slice, context as ``ici_context_parallelism``), ``per_device_batch_size``, the MoE
  fields (``num_experts``, ``num_experts_per_tok``, ``capacity_factor``, -1 for dropless with ``sparse_matmul``), the
  ``remat_policy`` (recompute "full" -> "full", "selective" -> "save_qkv_proj": projections kept,
  attention recomputed, "none" -> "minimal", "offload" -> "minimal_offloaded": the matmul outputs in host
  memory, "offload_projections" and "offload_inputs" -> "custom" with their ``layout.OFFLOADED_TENSORS`` set
  to "offload") and the model's shape (``base_*`` keys of MaxText's
  ``base.yml``).
* ``megatron_args``: Megatron-Core's command line: tensor, pipeline, virtual, expert, expert-tensor
  and context parallel sizes, an uneven pipeline split (first and last stage layers), micro and
  global batch (sequences), router top-k, capacity factor (omitted for dropless), recompute
  granularity (recompute "offload" as ``--cpu-offloading`` of every layer's activations but the last's),
  sequence parallelism, distributed optimizer, the token dispatcher (``flex`` for DeepEP and HybridEP) and the model's
  shape.
* ``plan_document`` / ``load_plan``: model, topology, layout, batch, dtype and framework as YAML;
  ``estimate_plan`` of the loaded document gives the same estimate.

Every export parses back (``parse_maxtext``, ``parse_megatron``) to the layout it came from; tests hold
them to it.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import fields

from moeplan.estimate import estimate
from moeplan.families import load_topology
from moeplan.layout import OFFLOADED_TENSORS, Layout
from moeplan.moe import MoEModel, model_from_mapping
from moeplan.schema import read_yaml_mapping
from moeplan.topology import TORUS, Topology

FORMATS = ("maxtext", "megatron", "moeplan")
_REMAT = {"full": "full", "selective": "save_qkv_proj", "none": "minimal", "offload": "minimal_offloaded"}
_TENSORS = ("decoder_layer_input", "query_proj", "key_proj", "value_proj", "out_proj")  # a custom policy's


def _sequences(model: MoEModel, global_batch_tokens: int) -> int:
    if global_batch_tokens % model.seq_len:
        raise ValueError(f"global_batch_tokens: {global_batch_tokens}; expected whole sequences of {model.seq_len}")
    return global_batch_tokens // model.seq_len


def maxtext_config(model: MoEModel, topo: Topology, layout: Layout, global_batch_tokens: int,
                   dtype: str = "bf16") -> dict:
    """MaxText keys for this plan (a fragment to merge into a model config)."""
    slices = topo.slices if topo.kind == TORUS else 1
    dcn_data = slices if layout.data % slices == 0 else 1
    if slices > 1 and dcn_data == 1:
        raise ValueError(f"layout.data: {layout.data} does not split over the {slices} slices; MaxText puts the "
                         "data axis across DCN, expected a multiple of the slice count")
    if layout.first_stage_layers or layout.last_stage_layers:
        raise ValueError("layout.first_stage_layers / last_stage_layers: MaxText splits layers evenly over pipeline "
                         "stages; expected 0 (an even split) for a MaxText export")
    per_device = _sequences(model, global_batch_tokens) / topo.num_devices
    dense_data = layout.data // dcn_data
    out = {
        "dcn_data_parallelism": dcn_data, "ici_data_parallelism": dense_data, "ici_fsdp_parallelism": layout.fsdp,
        "ici_tensor_parallelism": layout.tensor, "ici_context_parallelism": layout.context,
        "ici_pipeline_parallelism": layout.pipeline,
        "ici_expert_parallelism": 1,  # experts fold into data/fsdp: expert_shard below
        "expert_shard_attention_option": "fsdp",
        "per_device_batch_size": per_device, "max_target_length": model.seq_len,
        "num_pipeline_microbatches": layout.pipeline * max(1, int(per_device * topo.num_devices
                                                                  // (layout.batch_shards * layout.pipeline)))
        if layout.pipeline > 1 else 1,
        "remat_policy": _REMAT.get(layout.recompute, "custom"),
        "base_emb_dim": model.d_model, "base_num_decoder_layers": model.n_layers, "base_num_query_heads": model.n_heads,
        "base_num_kv_heads": model.n_kv_heads, "head_dim": model.d_head, "vocab_size": model.vocab_size,
        "base_mlp_dim": model.d_ff or model.expert_d_ff, "base_moe_mlp_dim": model.expert_d_ff,
        "num_experts": model.num_experts, "num_experts_per_tok": model.top_k,
        "capacity_factor": -1.0 if model.capacity_factor is None else float(model.capacity_factor),
        "sparse_matmul": model.capacity_factor is None, "interleave_moe_layer_step": model.moe_every,
        "first_num_dense_layers": model.first_dense_layers, "shared_experts": model.num_shared_experts,
        "dtype": "bfloat16" if dtype in ("bf16", "fp8", "mxfp8") else "float32",
        "moeplan_expert_degree": layout.expert, "moeplan_expert_tensor_degree": layout.expert_tensor,
    }
    if model.sliding_window:  # which layers are windowed is the decoder block's own pattern in MaxText
        out["sliding_window_size"] = model.sliding_window
    if _REMAT.get(layout.recompute, "custom") == "custom":  # the rest of the named tensors are rematerialised
        out.update({name: "offload" if name in OFFLOADED_TENSORS[layout.recompute] else "remat" for name in _TENSORS})
    out["grad_dtype"] = "bfloat16" if layout.gradient_bytes == 2 else "float32"
    if dtype in ("fp8", "mxfp8"):
        out["quantization"] = "fp8"
        if layout.quantized_gather:  # qwix quantizes fixed-calibrated weights on their shard, then gathers them
            out.update(use_qwix_quantization=True, quantization="fp8_full",
                       weight_quantization_calibration_method="fixed,-224,224")
    return out


def parse_maxtext(config: dict) -> Layout:
    """The layout a MaxText fragment from ``maxtext_config`` describes."""
    return Layout(data=int(config["dcn_data_parallelism"]) * int(config["ici_data_parallelism"]),
                  fsdp=int(config["ici_fsdp_parallelism"]), tensor=int(config["ici_tensor_parallelism"]),
                  context=int(config.get("ici_context_parallelism", 1)),
                  pipeline=int(config["ici_pipeline_parallelism"]), expert=int(config["moeplan_expert_degree"]),
                  expert_tensor=int(config.get("moeplan_expert_tensor_degree", 1)),
                  recompute=_recompute_of(config),
                  gradient_bytes=2 if config.get("grad_dtype") == "bfloat16" else 4,
                  quantized_gather=str(config.get("weight_quantization_calibration_method", "")).startswith("fixed"))


def _recompute_of(config: dict) -> str:
    if config["remat_policy"] != "custom":
        return {v: k for k, v in _REMAT.items()}[config["remat_policy"]]
    offloaded = tuple(name for name in _TENSORS if config.get(name) == "offload")
    return next((policy for policy, names in OFFLOADED_TENSORS.items() if names == offloaded), None) or \
        _unexpressed("remat_policy", f"custom with {', '.join(offloaded) or 'nothing'} offloaded")


def _unexpressed(field: str, what: str):
    raise ValueError(f"{field}: {what} has no moeplan recompute policy")


def megatron_args(model: MoEModel, topo: Topology, layout: Layout, global_batch_tokens: int, dtype: str = "bf16",
                  dispatch: str = "nccl") -> list[str]:
    """Megatron-Core ``pretrain_gpt.py`` arguments for this plan."""
    if layout.fsdp > 1 and layout.data > 1:
        raise ValueError("layout.fsdp: Megatron-Core shards over the whole data-parallel group (torch FSDP2); "
                         "expected data=1 with fsdp, or fsdp=1")
    sequences = _sequences(model, global_batch_tokens)
    args = ["--tensor-model-parallel-size", layout.tensor, "--pipeline-model-parallel-size", layout.pipeline,
            "--context-parallel-size", layout.context, "--expert-model-parallel-size", layout.expert,
            "--expert-tensor-parallel-size", layout.expert_tensor, "--micro-batch-size", layout.micro_batch_size,
            "--global-batch-size", sequences, "--seq-length", model.seq_len, "--max-position-embeddings",
            model.seq_len, "--num-layers", model.n_layers, "--hidden-size", model.d_model, "--num-attention-heads",
            model.n_heads, "--kv-channels", model.d_head, "--ffn-hidden-size", model.d_ff or model.expert_d_ff]
    for flag, layers in (("--decoder-first-pipeline-num-layers", layout.first_stage_layers),
                         ("--decoder-last-pipeline-num-layers", layout.last_stage_layers)):
        if layers:
            args += [flag, layers]
    if layout.pipeline > 1 and layout.virtual_pipeline > 1:
        args += ["--num-layers-per-virtual-pipeline-stage", model.n_layers // (layout.pipeline
                                                                             * layout.virtual_pipeline)]
    if model.n_kv_heads != model.n_heads:
        args += ["--group-query-attention", "--num-query-groups", model.n_kv_heads]
    if model.mtp_layers:
        args += ["--mtp-num-layers", model.mtp_layers]
    if model.sliding_window:  # (left, right) tokens; one full-attention layer after N - 1 windowed ones
        args += ["--window-size", f"{model.sliding_window},0"]
        if model.full_attention_every:
            args += ["--window-attn-skip-freq", model.full_attention_every]
    if model.num_experts > 1:
        args += ["--num-experts", model.num_experts, "--moe-router-topk", model.top_k, "--moe-ffn-hidden-size",
                 model.expert_d_ff, "--moe-token-dispatcher-type", "alltoall" if dispatch == "nccl" else "flex",
                 "--moe-layer-freq", f"([0]*{model.first_dense_layers}+([1]+[0]*"
                 f"{model.moe_every - 1})*{-(-(model.n_layers - model.first_dense_layers) // model.moe_every)})"
                 f"[:{model.n_layers}]"]
        if model.capacity_factor is not None:
            args += ["--moe-expert-capacity-factor", model.capacity_factor, "--moe-token-drop-policy", "probs"]
        if model.num_shared_experts:
            args += ["--moe-shared-expert-intermediate-size", model.num_shared_experts * model.expert_d_ff]
        if dispatch.startswith("deepep"):
            args += ["--moe-enable-deepep"]
        elif dispatch == "hybridep":  # Megatron-Core's flex dispatcher with the HybridEP backend
            args += ["--moe-flex-dispatcher-backend", "hybridep"]
    if layout.recompute in ("offload_projections", "offload_inputs"):
        _unexpressed("layout.recompute", f"{layout.recompute!r} (MaxText's custom remat) in Megatron-Core")
    if layout.recompute == "offload":  # the last layer's activations are used at once: Megatron keeps them
        args += ["--cpu-offloading", "--cpu-offloading-num-layers", model.n_layers // layout.pipeline - 1]
    elif layout.recompute != "none":
        args += ["--recompute-granularity", layout.recompute]
        if layout.recompute == "full":
            args += ["--recompute-method", "uniform", "--recompute-num-layers", 1]
    if layout.sequence_parallel and layout.tensor > 1:
        args += ["--sequence-parallel"]
    if layout.shard_optimizer:
        args += ["--use-distributed-optimizer"]
    if layout.fsdp > 1:
        args += ["--use-torch-fsdp2"]
    if layout.gradient_bytes == 2:
        args += ["--grad-reduce-in-bf16"]
    if layout.quantized_gather and dtype in ("fp8", "mxfp8"):
        args += ["--fp8-param-gather"]
    if dtype in ("fp8", "mxfp8"):
        args += ["--bf16", "--fp8-format", "hybrid" if dtype == "fp8" else "e4m3", "--fp8-recipe",
                 "tensorwise" if dtype == "fp8" else "mxfp8"]
    elif dtype == "bf16":
        args += ["--bf16"]
    return [str(a) for a in args]


def parse_megatron(args: list[str], devices: int) -> Layout:
    """The layout Megatron arguments from ``megatron_args`` describe on ``devices`` GPUs."""
    parser = argparse.ArgumentParser(add_help=False)
    for name in ("tensor-model-parallel-size", "pipeline-model-parallel-size", "expert-model-parallel-size",
                 "context-parallel-size",
                 "expert-tensor-parallel-size", "micro-batch-size", "num-layers",
                 "num-layers-per-virtual-pipeline-stage", "decoder-first-pipeline-num-layers",
                 "decoder-last-pipeline-num-layers"):
        parser.add_argument(f"--{name}", type=int)
    parser.add_argument("--recompute-granularity", default="none")
    for flag in ("sequence-parallel", "use-distributed-optimizer", "use-torch-fsdp2", "cpu-offloading",
                 "grad-reduce-in-bf16", "fp8-param-gather"):
        parser.add_argument(f"--{flag}", action="store_true")
    known, _ = parser.parse_known_args(args)
    t, p, cp = known.tensor_model_parallel_size, known.pipeline_model_parallel_size, known.context_parallel_size or 1
    replicas = devices // (t * p * cp)
    fsdp = replicas if known.use_torch_fsdp2 else 1
    virtual = known.num_layers // (p * known.num_layers_per_virtual_pipeline_stage) \
        if known.num_layers_per_virtual_pipeline_stage else 1
    return Layout(data=replicas // fsdp, fsdp=fsdp, tensor=t, context=cp, pipeline=p, virtual_pipeline=virtual,
                  expert=known.expert_model_parallel_size, expert_tensor=known.expert_tensor_parallel_size or 1,
                  first_stage_layers=known.decoder_first_pipeline_num_layers or 0,
                  last_stage_layers=known.decoder_last_pipeline_num_layers or 0,
                  micro_batch_size=known.micro_batch_size,
                  recompute="offload" if known.cpu_offloading else known.recompute_granularity,
                  sequence_parallel=known.sequence_parallel or t == 1,
                  shard_optimizer=known.use_distributed_optimizer, gradient_bytes=2 if known.grad_reduce_in_bf16 else 4,
                  quantized_gather=known.fp8_param_gather)


def plan_document(model: MoEModel, topo: Topology, layout: Layout, global_batch_tokens: int, dtype: str = "bf16",
                  framework: str | None = None) -> dict:
    """A moeplan YAML mapping that ``load_plan`` turns back into the same estimate's inputs."""
    spec = {f.name: getattr(model, f.name) for f in fields(MoEModel) if f.name not in ("mla",)}
    if model.mla is not None:
        spec["mla"] = {f.name: getattr(model.mla, f.name) for f in fields(model.mla)}
    size = {"shape": list(topo.shape), "slices": topo.slices} if topo.kind == TORUS else {
        "nodes": topo.num_nodes, "devices_per_node": topo.node.devices_per_node}
    return {"schema_version": 1, "model": spec, "topology": {"family": topo.family, **size},
            "layout": {f.name: getattr(layout, f.name) for f in fields(Layout)},
            "global_batch_tokens": int(global_batch_tokens), "dtype": dtype, "framework": framework or "megatron"}


def load_plan(path: str | os.PathLike[str]) -> dict:
    """(model, topology, layout, global_batch_tokens, dtype, framework) of a plan YAML, as a dict."""
    data = read_yaml_mapping(path, "plan")
    for key in ("model", "topology", "layout", "global_batch_tokens"):
        if key not in data:
            raise ValueError(f"{path}: {key}: missing; expected a moeplan plan (moeplan export --format moeplan)")
    model = model_from_mapping({k: v for k, v in data["model"].items() if v is not None}, str(path))
    where = dict(data["topology"])
    family = where.pop("family")
    if "shape" in where:
        topo = load_topology(family, shape=tuple(where["shape"]), slices=where.get("slices", 1))
    else:
        topo = load_topology(family, nodes=where["nodes"], devices_per_node=where.get("devices_per_node"))
    return {"model": model, "topology": topo, "layout": Layout(**data["layout"]),
            "global_batch_tokens": int(data["global_batch_tokens"]), "dtype": data.get("dtype", "bf16"),
            "framework": data.get("framework")}


def estimate_plan(plan: dict):
    return estimate(plan["model"], plan["topology"], plan["layout"], plan["global_batch_tokens"],
                    dtype=plan["dtype"], framework=plan["framework"])
