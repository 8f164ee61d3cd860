"""moeplan validate: candidates as real JAX steps on 8 CPU devices under the profiler, split into the
estimate's parts from the trace; resumable; the step-time order of a small search's candidates."""

from __future__ import annotations

import json

import pytest

jax = pytest.importorskip("jax", reason="the 'jax' extra is not installed")

import moeplan as mp  # noqa: E402
from moeplan.calibrate.trace import PARTS, hlo_parts, part_of  # noqa: E402
from moeplan.calibrate.validate import run_candidate, validate  # noqa: E402

SMALL = mp.MoEModel(name="small-moe", d_model=128, n_layers=4, n_heads=2, n_kv_heads=2, d_head=64, vocab_size=256,
                    seq_len=64, d_ff=256, num_experts=8, top_k=2, expert_d_ff=128, moe_every=2,
                    capacity_factor=1.25, attention="mha", gated_ffn=False)


def test_scope_paths_name_their_innermost_part():
    assert part_of("jit(local)/jit(main)/transpose(jvp(experts))/dot_general") == "experts"
    assert part_of("jit(local)/optimizer/grad_sync/psum") == "grad_sync"
    assert part_of("jit(local)/add") is None
    hlo = """HloModule jit_step
%fused_computation (p: f32[4]) -> f32[4] {
  ROOT %m = f32[4]{0} multiply(%p, %p), metadata={op_name="jit(step)/router/mul"}
}
ENTRY %main (a: f32[4]) -> f32[4] {
  ROOT %fusion.1 = f32[4]{0} fusion(%a), kind=kLoop, calls=%fused_computation
}"""
    assert hlo_parts(hlo)["fusion.1"] == "router"  # a fusion takes its callees' part


def test_every_part_is_found_and_the_parts_add_up_to_the_step(tmp_path):
    run = run_candidate(SMALL.with_(seq_len=128), mp.Layout(data=8, expert=4), tmp_path / "trace", steps=3,
                        micro_batch=4)  # steps long enough that Python's dispatch between them is small
    parts = run["measured"]["parts"]
    for part in ("attention", "router", "dispatch_a2a", "experts", "combine_a2a", "dense_ffn", "logits",
                 "grad_sync", "optimizer"):
        assert parts.get(part, 0.0) > 0.0, (part, parts)
    assert set(parts) <= set(PARTS) | {"other"}
    assert run["measured"]["devices"] == 8 and run["measured"]["steps"] == 3
    total = sum(parts.values())
    assert total == pytest.approx(run["wall_s"], rel=0.15), (total, run["wall_s"])
    assert "E=8 k=2" in run["rule"] and "expert=4" in run["rule"]


def test_validate_resumes_and_writes_its_results_atomically(tmp_path, capsys):
    from moeplan.cli import main

    out = tmp_path / "val"
    argv = ["validate", "--model", "st-moe-like-8b", "--layouts", "data=8,expert=8;data=8", "--steps", "1",
            "--out", str(out)]
    model = SMALL.name
    first = validate([(SMALL, mp.Layout(data=8, expert=8)), (SMALL, mp.Layout(data=8))], out, steps=1,
                     micro_batch=1)
    assert len((out / "results.jsonl").read_text().splitlines()) == 2
    with (out / "results.jsonl").open("a") as fh:
        fh.write('{"key": "cut-off')  # an interrupted write: ignored, nothing lost
    said = []
    again = validate([(SMALL, mp.Layout(data=8, expert=8)), (SMALL, mp.Layout(data=8))], out, steps=1,
                     micro_batch=1, say=said.append)
    assert all("measured before, kept" in line for line in said) and len(said) == 2
    assert again["candidates"] == first["candidates"]
    assert json.loads((out / "results.json").read_text())["candidates"][0]["model"] == model
    assert not list(out.glob(".*.tmp"))
    capsys.readouterr()
    assert main(argv + ["--json"]) == 0  # the CLI on a preset, scaled down by the printed rule
    summary = json.loads(capsys.readouterr().out)
    assert summary["kendall_tau"] is not None and len(summary["candidates"]) == 2


def test_validate_six_candidates_of_a_small_search_reports_a_tau(tmp_path):
    topo = mp.load_topology("cpu-host")
    result = mp.search(SMALL, topo, mp.SearchSpace(num_experts=[4, 8, 16], top_k=[1, 2], expert=[1, 8],
                                                   tensor=[1], pipeline=[1], fsdp=[1]),
                       global_batch_tokens=8 * SMALL.seq_len, objective="step_time")
    pairs = [(c.model, c.layout) for c in result.configurations[:6]]
    assert len(pairs) == 6
    summary = validate(pairs, tmp_path / "val", steps=1, micro_batch=1)
    assert -1.0 <= summary["kendall_tau"] <= 1.0
    assert {r["part"] for r in summary["rows"]} >= {"attention", "experts", "optimizer"}
    assert all(r["measured_s"] > 0 for r in summary["rows"] if r["part"] in ("attention", "experts"))


def test_calibrate_from_traces_recorded_here_beats_the_defaults_on_a_held_out_trace(tmp_path):
    import yaml

    from moeplan.calibrate.from_trace import calibrate_from_traces, trace_record
    from moeplan.cli import main

    records, runs = [], []
    for i, (model, layout) in enumerate([(SMALL, mp.Layout(data=8, expert=8)),
                                         (SMALL.with_(num_experts=16), mp.Layout(data=8, expert=4)),
                                         (SMALL.with_(top_k=1), mp.Layout(data=8, expert=2))]):
        run = run_candidate(model, layout, tmp_path / f"t{i}", steps=3, micro_batch=1)
        s = run["scaled"]
        runs.append(s)
        records.append(trace_record(tmp_path / f"t{i}", s.model, s.layout, s.micro_batch * s.model.seq_len * 8))
    topo = mp.load_topology("cpu-host")
    profile = calibrate_from_traces(records[:2], records[2:], topo, tmp_path / "p.yaml")
    errors = profile["errors"]
    print(f"per-part held-out: {errors['before_median_abs']:.1%} -> {errors['after_median_abs']:.1%}")
    assert errors["held_out_parts"] >= 8 and not errors["in_sample"]
    assert errors["after_median_abs"] < errors["before_median_abs"]
    loaded = mp.load_profile(tmp_path / "p.yaml")
    assert loaded.compute.matmul == pytest.approx(profile["fitted"]["compute"]["matmul"])
    assert loaded.part_scales == profile["fitted"]["parts"] and {"optimizer", "grad_sync"} <= set(loaded.part_scales)
    # the CLI on the same traces: the model as a YAML file, each trace @ its layout
    s = runs[0]
    keys = ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_head", "vocab_size", "seq_len", "d_ff", "num_experts",
            "top_k", "expert_d_ff", "moe_every", "capacity_factor", "attention", "gated_ffn")
    (tmp_path / "m.yaml").write_text(yaml.safe_dump({k: getattr(s.model, k) for k in keys}))
    argv = ["calibrate", "--from-trace", f"{tmp_path / 't0'}@data=8,expert=8,recompute=none,micro_batch_size=1,"
            "sequence_parallel=false,shard_optimizer=false", "--model", str(tmp_path / "m.yaml"),
            "--batch-tokens", str(s.model.seq_len * 8), "--out", str(tmp_path / "cli.yaml")]
    assert main(argv) == 0
    assert mp.load_profile(tmp_path / "cli.yaml").errors["in_sample"] is True
    assert main(["calibrate", "--from-trace", str(tmp_path / "t0"), "--model", str(tmp_path / "m.yaml"),
                 "--batch-tokens", "512"]) == 2  # DIR without @LAYOUT: a one-line error
