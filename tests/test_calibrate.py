"""The JAX MoE layer against its loop reference, aux losses by hand, capacity drops, expert
parallelism on 8 CPU devices, a small calibration, and a two-process jax.distributed run."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="the 'jax' extra is not installed")
import jax.numpy as jnp  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

import moeplan as mp  # noqa: E402
from moeplan.calibrate import layer as L  # noqa: E402
from tests.conftest import ROOT  # noqa: E402

CFG = L.MoEConfig(d_model=16, expert_d_ff=32, num_experts=8, top_k=2, capacity_factor=1.0, gated=True)


def _inputs(cfg=CFG, groups=8, group_size=16, seed=0):
    params = L.init_params(cfg, jax.random.PRNGKey(seed))
    x = jax.random.normal(jax.random.PRNGKey(seed + 1), (groups, group_size, cfg.d_model))
    return x, params


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("cf", [0.5, 1.0, 2.0])
def test_einsum_dispatch_equals_loop_reference(gated, cf):
    cfg = L.MoEConfig(16, 32, 8, 2, cf, gated)
    x, params = _inputs(cfg)
    y, _, _ = L.moe_layer(x, params, cfg)
    np.testing.assert_allclose(np.asarray(y), L.reference_layer(np.asarray(x), params, cfg), atol=1e-5)


def test_gradients_match_between_einsum_and_dropless_when_nothing_drops():
    cfg = L.MoEConfig(16, 32, 8, 2, capacity_factor=8.0, gated=True)  # capacity = every token: no drops
    x, params = _inputs(cfg)
    loss_e = lambda p: jnp.sum(L.moe_layer(x, p, cfg)[0] ** 2)  # noqa: E731
    loss_d = lambda p: jnp.sum(L.dropless_layer(x, p, cfg)[0] ** 2)  # noqa: E731
    ge, gd = jax.grad(loss_e)(params), jax.grad(loss_d)(params)
    for name in params:
        np.testing.assert_allclose(np.asarray(ge[name]), np.asarray(gd[name]), rtol=1e-4, atol=1e-5)
    dropless = L.MoEConfig(16, 32, 8, 2, None, True)
    np.testing.assert_allclose(np.asarray(L.dropless_layer(x, params, dropless)[0]),
                               L.reference_layer(np.asarray(x), params, dropless), atol=1e-5)


def test_aux_losses_equal_hand_computed_values():
    logits = jnp.array([[[1.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0]]])  # G=1, S=2, E=4
    probs = jax.nn.softmax(logits, -1)
    idx = jnp.array([[[0, 1], [1, 0]]])  # both tokens pick experts 0 and 1
    z, bal = L.aux_losses(logits, probs, idx, 4)
    lse = np.log(np.exp([1, 0, 0, 0]).sum()), np.log(np.exp([0, 2, 0, 0]).sum())
    assert float(z) == pytest.approx((lse[0] ** 2 + lse[1] ** 2) / 2, rel=1e-6)
    f = np.array([0.5, 0.5, 0.0, 0.0])  # 4 assignments, 2 to each of experts 0 and 1
    p = np.asarray(probs).mean(axis=(0, 1))
    assert float(bal) == pytest.approx(4 * np.sum(f * p), rel=1e-6)


def test_capacity_drops_exactly_the_lowest_priority_assignments():
    # 6 tokens all prefer expert 0 first and expert 1 second; capacity = ceil(6 * 2 * 0.5 / 3) = 2
    idx = jnp.array([[[0, 1]] * 6])
    gates = jnp.full((1, 6, 2), 0.5)
    dispatch, combine = L.dispatch_combine(idx, gates, 3, capacity=2)
    d = np.asarray(dispatch)[0]
    assert d[:, 0].sum(axis=1).tolist() == [1, 1, 0, 0, 0, 0]  # first choices of tokens 0, 1 fill expert 0
    assert d[:, 1].sum(axis=1).tolist() == [1, 1, 0, 0, 0, 0]  # second choices in token order fill expert 1
    assert d[0, 0, 0] == 1 and d[1, 0, 1] == 1  # slots in order
    np.testing.assert_allclose(np.asarray(combine), np.asarray(dispatch) * 0.5)


def test_expert_parallel_layer_on_8_devices_equals_single_device():
    assert jax.device_count() >= 8, "conftest sets XLA_FLAGS to 8 host devices"
    mesh = Mesh(np.array(jax.devices()[:8]), ("expert",))
    x, params = _inputs(CFG, groups=8)
    y, z, bal = L.moe_layer(x, params, CFG)
    ye, ze, be = L.expert_parallel_layer(mesh, CFG)(x, params)
    np.testing.assert_allclose(np.asarray(ye), np.asarray(y), atol=1e-5)
    assert float(ze) == pytest.approx(float(z), rel=1e-5) and float(be) == pytest.approx(float(bal), rel=1e-5)
    layer = L.expert_parallel_layer(mesh, CFG)
    g1 = jax.grad(lambda p: jnp.sum(layer(x, p)[0] ** 2))(params)
    g2 = jax.grad(lambda p: jnp.sum(L.moe_layer(x, p, CFG)[0] ** 2))(params)
    for name in params:
        np.testing.assert_allclose(np.asarray(g1[name]), np.asarray(g2[name]), rtol=1e-4, atol=1e-5)


def test_small_calibration_improves_held_out_error_and_resumes(tmp_path, monkeypatch):
    from moeplan.calibrate import run

    full = run.plan_measurements(True, 8)
    collectives = [s for s in full if s[1]["kind"] == "collective" and s[1]["bytes"] != 1 << 18]
    layers = [s for s in full if s[1]["kind"] == "moe_layer" and not s[1]["backward"]]  # 8 train, 6 held out
    tiny = collectives + layers
    monkeypatch.setattr(run, "plan_measurements", lambda quick, devices: tiny)
    out = tmp_path / "cpu.yaml"
    lines = []
    profile = run.calibrate(out, quick=True, devices=8, say=lines.append)
    errors = profile["errors"]
    print(f"held-out median |error|: {errors['before_median_abs']:.1%} before the fit, "
          f"{errors['after_median_abs']:.1%} after")
    # six held-out layer shapes, interleaved with the eight fitted ones and timed in the same passes
    assert errors["held_out_layers"] == 6
    assert errors["after_median_abs"] <= 0.30
    assert errors["train_after_rms_log"] < errors["train_before_rms_log"]
    loaded = mp.load_profile(out)
    _fit_recovers_from_a_wrong_start(loaded)
    assert loaded.device_count == 8 and loaded.compute.kernel_overhead_s >= 0
    assert all(m["passes"] == run.PASSES_QUICK for m in loaded.measurements)
    log = out.with_name("cpu.measurements.jsonl")
    taken = log.read_text().splitlines()
    assert len(taken) == len(tiny) * run.PASSES_QUICK  # one line per benchmark and pass
    # an interrupted run: the last two timings never reached the log, and the last line is torn
    log.write_text("\n".join(taken[:-2]) + '\n{"split": "train", "spe')
    again = []
    resumed = run.calibrate(out, quick=True, devices=8, say=again.append)
    assert again[0] == (f"resuming: skipped 1 unreadable or implausible line(s) of {log} (lines {len(taken) - 1}); "
                        "they are measured again")  # the torn line, reported
    assert again[1].startswith(f"resuming: {len(taken) - 2} of {len(taken)} timings")
    assert len(log.read_text().splitlines()) == len(taken) + 1  # the torn line stays, ignored
    assert resumed["errors"]["held_out_layers"] == 6
    est = mp.estimate(mp.load_model("mixtral-8x7b").with_(n_layers=2), mp.load_topology("cpu-host"),
                      mp.Layout(data=8, expert=8), 8 * 4096, profile=loaded)
    assert est.step_time_s > 0


def _fit_recovers_from_a_wrong_start(profile):
    """On this host the family's generic defaults can land as close to the held-out layers as one pass's
    scatter (a benchmark's per-pass times differ by 1.5-2.5x between passes on 2 shared cores; the held-out
    median before the fit read 5-20 % over runs), so 'better than the defaults' is a coin toss there. What
    the fit must do is learn: started from parameters 5x off, it lands where it lands from the defaults,
    and predicts the held-out layers within 30 % (over runs here: 120-260 % before, the same 5-11 % after)."""
    from dataclasses import replace

    from moeplan.calibrate.fit import errors as relative_errors
    from moeplan.calibrate.fit import fit

    topo = mp.load_topology("cpu-host")
    train = [m for m in profile.measurements if m["split"] == "train"]
    held = [m for m in profile.measurements if m["split"] == "held_out" and m["kind"] == "moe_layer"]
    base = topo.chip.efficiency
    wrong = replace(base, matmul=base.matmul / 5, memory=base.memory / 5, kernel_overhead_s=1e-3)
    before = float(np.median(np.abs(relative_errors(held, topo, wrong, mp.CommParams()))))
    eff, comm, _ = fit(train, topo, wrong, mp.CommParams(), "test")
    after = float(np.median(np.abs(relative_errors(held, topo, eff, comm))))
    print(f"wrong start: {before:.1%} -> {after:.1%} (from defaults {profile.errors['after_median_abs']:.1%})")
    assert before > 0.5
    assert after <= 0.30
    assert after == pytest.approx(profile.errors["after_median_abs"], abs=0.05)


def test_committed_cpu_profile_loads_and_met_its_bar():
    """profiles/cpu-host.yaml comes from a real `moeplan calibrate --quick` on this machine."""
    from moeplan.calibrate.fit import errors as relative_errors

    profile = mp.load_profile(ROOT / "profiles" / "cpu-host.yaml")
    assert profile.device_count == 8 and profile.topology.startswith("cpu-host")
    errors = profile.errors
    assert errors["held_out_layers"] >= 12  # six shapes, forward and forward+backward
    # recomputed from the profile's own measurements with today's model, not read from the file
    topo = mp.load_topology("cpu-host")
    held = [m for m in profile.measurements if m["split"] == "held_out" and m["kind"] == "moe_layer"]
    after = float(np.median(np.abs(relative_errors(held, topo, profile.compute, profile.comm))))
    before = float(np.median(np.abs(relative_errors(held, topo, topo.chip.efficiency, mp.CommParams()))))
    assert len(held) == errors["held_out_layers"]
    assert after <= 0.15  # held-out whole-layer times after the fit
    assert after < before  # ... better than the defaults
    assert after == pytest.approx(errors["after_median_abs"], abs=0.03)  # and what the file says
    assert errors["train_after_rms_log"] < 0.75 * errors["train_before_rms_log"]
    assert {m["kind"] for m in profile.measurements} == {"matmul", "collective", "moe_layer"}
    # each collective op its own latency and efficiency: held-out sizes of every op within 30 % after the fit,
    # where the defaults are several times off (recomputed, as above)
    assert set(profile.comm.ops) == {"all_reduce", "all_gather", "all_to_all"}
    for op in profile.comm.ops:
        sizes = [m for m in profile.measurements if m["split"] == "held_out" and m.get("op") == op]
        assert len(sizes) == 2
        assert np.max(np.abs(relative_errors(sizes, topo, profile.compute, profile.comm))) <= 0.30
        assert np.min(np.abs(relative_errors(sizes, topo, topo.chip.efficiency, mp.CommParams()))) > 1.0


def test_bad_profiles_are_rejected(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("schema_version: 1\ndevice_kind: cpu\n")
    with pytest.raises(ValueError, match="device_count: missing"):
        mp.load_profile(bad)
    with pytest.raises(ValueError, match="expected a .yaml"):
        mp.load_profile(tmp_path / "p.txt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_jax_distributed_calibration(tmp_path):
    """Two processes on loopback, 2 CPU devices each, collectives across processes (gloo)."""
    port = _free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
           "MOEPLAN_CALIBRATE_TINY": "1"}
    out = tmp_path / "two.yaml"
    procs = [subprocess.Popen([sys.executable, "-m", "moeplan.cli", "calibrate", "--quick", "--out", str(out),
                               "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    profile = mp.load_profile(out)
    assert profile.device_count == 4 and profile.versions["processes"] == 2
    assert "held-out median error" in outputs[0] and "held-out" not in outputs[1]


def test_gpu_calibration_script_runs_on_cpu(tmp_path):
    """The GPU script, on this CPU: one device, a profile written (collectives skip on one device)."""
    out = tmp_path / "one.yaml"
    env = {**os.environ, "MOEPLAN_CALIBRATE_TINY": "1", "PYTHON": sys.executable}
    result = subprocess.run(["bash", "benchmarks/gpu_calibrate.sh", str(out)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout + result.stderr
    assert mp.load_profile(out).device_count == 1
