"""The CLI: sub-commands print what they promise; bad input is one clear line, exit status 2."""

from __future__ import annotations

import json

import pytest

import moeplan as mp
from moeplan.cli import main


def test_topologies_lists_every_family(capsys):
    assert main(["topologies"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == len(mp.list_topologies()) == 22 and out[0].startswith("amd-mi300x")


def test_show_torus_prints_the_figures(capsys):
    assert main(["show", "tpu-v5p", "--shape", "4x4x8"]) == 0
    out = capsys.readouterr().out
    assert "128 x TPU v5p" in out and "459 TFLOP/s" in out and "bisection      3.2 TB/s" in out


def test_show_json_is_si_numbers(capsys):
    assert main(["show", "dgx-h100", "--nodes", "4", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["num_devices"] == 32
    assert info["bisection_bw_bytes_per_s"] == pytest.approx(8e11)
    assert info["link_bw_bytes_per_s_by_tier"]["nvlink"] == 4.5e11
    assert info["diameter_hops"] == 6


@pytest.mark.parametrize(
    "argv,message",
    [
        (["show", "tpu-v9"], "bundled: ['amd-mi300x'"),
        (["show", "tpu-v5p", "--shape", "3x4x4"], "not offered"),
        (["show", "dgx-h100", "--nodes", "0"], "nodes: got 0"),
    ],
)
def test_bad_input_is_one_line_and_status_2(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_malformed_shape_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["show", "tpu-v5p", "--shape", "4by4"])
    assert info.value.code == 2
    assert "not a shape" in capsys.readouterr().err


def test_collective_prints_nccl_tests_columns(capsys):
    assert main(["collective", "all_reduce", "--topology", "dgx-a100", "--devices", "8", "--bytes", "1e6..1.6e7"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if not ln.startswith("#")]
    assert len(lines) == 5  # 1, 2, 4, 8, 16 MB
    size, time_us, algbw, busbw, algorithm = lines[-1].split()
    assert float(size) == 1.6e7 and algorithm == "ring"
    assert float(busbw) == pytest.approx(float(algbw) * 2 * 7 / 8, rel=1e-3)
    assert float(algbw) == pytest.approx(float(size) / (float(time_us) * 1e-6) / 1e9, rel=1e-3)


def test_collective_json_and_errors(capsys):
    argv = ["collective", "all_to_all", "--topology", "tpu-v5p", "--shape", "4x4x4", "--bytes", "1e6,1e8", "--json"]
    assert main(argv) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["bytes"] for r in rows] == [1e6, 1e8] and rows[1]["time_s"] > rows[0]["time_s"]
    assert main(["collective", "all_reduce", "--topology", "dgx-h100", "--bytes", "1e9..1e6"]) == 2
    assert "not a size list" in capsys.readouterr().err
    assert main(["collective", "all_gather", "--topology", "dgx-h100", "--algorithm", "nvls", "--bytes", "1e6"]) == 2
    assert "not available" in capsys.readouterr().err


def test_collective_times_the_dispatch_kernels(capsys):
    """--experts and --top-k make DeepEP's kernels available to an all_to_all, as collective_cost's experts=."""
    from moeplan.collectives import collective_time_s
    from moeplan.dispatch import ExpertRouting

    argv = ["collective", "all_to_all", "--topology", "hgx-h800", "--nodes", "4", "--bytes", "7569408", "--json",
            "--experts", "256", "--top-k", "8", "--max-nodes", "2"]
    topo = mp.load_topology("hgx-h800", nodes=4)
    for kernel in ("deepep_ll", "deepep_normal", "hybridep"):
        assert main(argv + ["--algorithm", kernel]) == 0
        row = json.loads(capsys.readouterr().out)["rows"][0]
        expected = collective_time_s(topo, "all_to_all", 7569408, algorithm=kernel,
                                     experts=ExpertRouting(256, 8, max_nodes=2))
        assert row["algorithm"] == kernel and row["time_s"] == pytest.approx(expected)
    # one copy's bytes add DeepEP's per-copy SM time: one node of B200, where the SMs, not NVLink5, bind
    node = argv[:3] + ["dgx-b200", "--bytes", "7569408", "--json", "--experts", "64", "--top-k", "8"]
    assert main(node + ["--algorithm", "deepep_normal"]) == 0
    bytes_only = json.loads(capsys.readouterr().out)["rows"][0]["time_s"]
    assert main(node + ["--algorithm", "deepep_normal", "--token-bytes", "7392"]) == 0
    per_copy = json.loads(capsys.readouterr().out)["rows"][0]["time_s"]
    assert per_copy == pytest.approx(collective_time_s(mp.load_topology("dgx-b200"), "all_to_all", 7569408,
                                     algorithm="deepep_normal", experts=ExpertRouting(64, 8, token_bytes=7392)))
    assert per_copy > bytes_only
    assert main(argv[:-6] + ["--top-k", "8", "--algorithm", "deepep_ll"]) == 2
    assert "--experts and --top-k" in capsys.readouterr().err


def test_models_lists_presets(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "deepseek-v3" in out and "671.0B total" in out


def test_estimate_prints_breakdown_and_json(capsys):
    argv = ["estimate", "--topology", "dgx-h100", "--nodes", "2", "--model", "mixtral-8x7b",
            "--layout", "data=16,expert=8", "--batch-tokens", str(64 * 4096)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "dispatch_a2a" in out and "experts" in out and "tokens/s" in out and "MFU" in out
    assert "host memory" not in out
    offload = [a.replace("data=16,expert=8", "data=16,expert=8,recompute=offload") for a in argv]
    assert main(offload) == 0
    assert "GiB per device of offloaded activations" in capsys.readouterr().out
    assert main(argv + ["--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["fits"] in (True, False) and info["step_time_s"] > 0
    assert info["layers"][-1]["name"] == "step" and info["layout"]["expert"] == 8


def test_estimate_errors_are_one_line(capsys):
    base = ["estimate", "--topology", "dgx-h100", "--model", "mixtral-8x7b", "--batch-tokens", "32768"]
    assert main(base + ["--layout", "data=8,expert=3"]) == 2
    assert "layout.expert" in capsys.readouterr().err
    assert main(base + ["--layout", "data=8,colour=2"]) == 2
    assert "expected key=value" in capsys.readouterr().err
    assert main(["estimate", "--topology", "dgx-h100", "--model", "gpt-9", "--batch-tokens", "1"]) == 2
    assert "bundled: ['deepseek-v3'" in capsys.readouterr().err


def test_search_takes_recompute_policies_and_names_the_ones_a_family_cannot_run(tmp_path, capsys):
    argv = ["search", "--model", "st-moe-like-8b", "--batch-tokens", str(64 * 2048), "--experts", "16",
            "--top-k", "1", "--capacity-factor", "1.25", "--moe-every", "2", "--quiet", "--top", "3"]
    table = tmp_path / "t.json"
    assert main(argv + ["--topology", "dgx-h100", "--recompute", "full,offload_inputs", "--json", str(table)]) == 0
    rows = json.loads(table.read_text())["table"]
    assert rows and {r["recompute"] for r in rows} <= {"full", "offload_inputs"}
    assert main(argv + ["--topology", "tpu-v3", "--recompute", "offload"]) == 2
    assert "space.recompute: offload needs a link to host memory" in capsys.readouterr().err
    assert main(argv + ["--topology", "dgx-h100", "--recompute", "sometimes"]) == 2
    assert "space.recompute: got ['sometimes']" in capsys.readouterr().err


def test_search_prints_ranked_table_and_writes_files(tmp_path, capsys):
    argv = ["search", "--topology", "dgx-h100", "--model", "st-moe-like-8b", "--batch-tokens", str(64 * 2048),
            "--experts", "16,32", "--top-k", "1,2", "--capacity-factor", "1.25,dropless", "--moe-every", "2,4",
            "--quiet", "--top", "3", "--csv", str(tmp_path / "t.csv"), "--json", str(tmp_path / "t.json"),
            "--html", str(tmp_path / "r.html")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "configurations scored" in out and "loss" in out
    assert (tmp_path / "t.csv").read_text().splitlines()[0].startswith("num_experts,top_k")
    assert (tmp_path / "r.html").stat().st_mode & 0o044  # readable by others, not mkstemp's 0600
    data = json.loads((tmp_path / "t.json").read_text())
    assert data["evaluated"] > 0 and len(data["table"]) > 0
    page = (tmp_path / "r.html").read_text()
    assert "Pareto front" in page and "plotly" in page.lower()


def test_plan_runs_the_default_search(tmp_path, capsys):
    assert main(["plan", "--quiet", "--top", "2", "--html", str(tmp_path / "plan.html")]) == 0
    out = capsys.readouterr().out
    assert "tpu-v5p:4x4x8" in out and "dgx-h100:4x8" in out and "best layouts side by side" in out
    assert (tmp_path / "plan.html").stat().st_size > 100_000


def test_search_bad_lists_are_argparse_errors(capsys):
    with pytest.raises(SystemExit):
        main(["search", "--topology", "dgx-h100", "--model", "st-moe-like-8b", "--batch-tokens", "1",
              "--experts", "8,x"])
    assert "comma-separated integers" in capsys.readouterr().err


BAD_ARGUMENTS = [  # (argv, what the one-line error names): expected failures, never a traceback
    (["show", "tpu-v9"], "tpu-v9"), (["show", "/etc/passwd"], "passwd"),
    (["show", "dgx-h100", "--nodes", "0"], "nodes"),
    (["show", "dgx-h100", "--nodes", "99999999"], "nodes"), (["show", "tpu-v5p", "--shape", "3x3x3"], "shape"),
    (["show", "tpu-v5p", "--nodes", "2"], "nodes"), (["collective", "all_reduce", "--topology", "dgx-h100",
                                                      "--bytes", "1..1e300", "--factor", "1.0000001"], "bytes"),
    (["collective", "all_reduce", "--topology", "dgx-h100", "--bytes", "nan"], "bytes"),
    (["collective", "all_reduce", "--topology", "dgx-h100", "--bytes", "1e999"], "bytes"),
    (["collective", "all_reduce", "--topology", "dgx-h100", "--bytes", "-5"], "bytes"),
    (["collective", "all_reduce", "--topology", "dgx-h100", "--bytes", "1e20"], "bytes"),
    (["estimate", "--topology", "dgx-h100", "--model", "nope", "--batch-tokens", "1024"], "nope"),
    (["estimate", "--topology", "dgx-h100", "--model", "mixtral-8x7b", "--batch-tokens", "0"], "global_batch_tokens"),
    (["estimate", "--topology", "dgx-h100", "--model", "mixtral-8x7b", "--batch-tokens", str(2**50)],
     "global_batch_tokens"),
    (["estimate", "--topology", "dgx-h100", "--model", "mixtral-8x7b", "--batch-tokens", "65536",
      "--layout", "data=3"], "layout"),
    (["estimate", "--topology", "dgx-h100", "--model", "mixtral-8x7b", "--batch-tokens", "65536",
      "--layout", "bogus"], "layout"),
    (["search", "--topology", "dgx-h100", "--model", "mixtral-8x7b", "--batch-tokens", "65536",
      "--experts", "1000000000"], "num_experts"),
    (["search", "--topology", "dgx-h100", "--model", "mixtral-8x7b", "--batch-tokens", "65536", "--quiet",
      "--experts", "8", "--budget-days", "-1"], "time_budget_s"),
    (["search", "--topology", "dgx-h100", "--model", "mixtral-8x7b", "--batch-tokens", "65536", "--quiet",
      "--experts", "8", "--csv", "/proc/no-such-dir/out.csv"], "no-such-dir"),
    (["search", "--topology", "dgx-h100", "--model", "mixtral-8x7b", "--batch-tokens", "65536", "--quiet",
      "--d-model", "0"], "d_model"),
    (["search", "--topology", "dgx-h100", "--model", "deepseek-v3", "--batch-tokens", "65536", "--quiet",
      "--d-model", "1024"], "MLA"),
]


@pytest.mark.parametrize("argv, names", BAD_ARGUMENTS, ids=[" ".join(a)[:60] for a, _ in BAD_ARGUMENTS])
def test_bad_arguments_give_one_line_and_a_non_zero_status(capsys, argv, names):
    """Run in-process: an exception other than argparse's exit would fail the test (a traceback)."""
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse: usage line and status 2
        code = exc.code
    err = capsys.readouterr().err.strip()
    assert code != 0 and err and "Traceback" not in err
    assert names.lower() in err.lower(), err
    assert len(err.splitlines()) <= 3  # argparse prints usage + error; ours is one line


def test_the_dashboard_server_refuses_uploads_past_the_yaml_readers_limit():
    from moeplan.cli import dashboard_command
    from moeplan.schema import MAX_YAML_BYTES

    cmd = dashboard_command("streamlit", "app/dashboard.py", 8501)
    limit_mb = int(cmd[cmd.index("--server.maxUploadSize") + 1])
    assert limit_mb * 2**20 >= MAX_YAML_BYTES > (limit_mb - 1) * 2**20


def test_collective_and_topology_across_tpu_slices(capsys):
    argv = ["collective", "all_reduce", "--topology", "tpu-v5e", "--shape", "4x4", "--slices", "2", "--bytes", "1e8",
            "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["topology"] == "tpu-v5e:2x[4x4]" and out["ranks"] == 32
    one = ["collective", "all_reduce", "--topology", "tpu-v5e", "--shape", "4x4", "--bytes", "1e8", "--json"]
    assert main(one) == 0
    assert json.loads(capsys.readouterr().out)["rows"][0]["time_s"] < out["rows"][0]["time_s"]
    assert main(["show", "tpu-v5e", "--shape", "4x4", "--slices", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["slices"] == 2
    assert main(["show", "dgx-h100", "--slices", "2"]) == 2
    assert "slices" in capsys.readouterr().err


@pytest.mark.parametrize("family", mp.list_topologies())
def test_collective_runs_on_every_family(family, capsys):
    assert main(["collective", "all_reduce", "--topology", family, "--bytes", "1e6", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert rows[0]["time_s"] > 0
