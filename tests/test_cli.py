"""The CLI: sub-commands print what they promise; bad input is one clear line, exit status 2."""

from __future__ import annotations

import json

import pytest

from moeplan.cli import main


def test_topologies_lists_every_family(capsys):
    assert main(["topologies"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 12 and out[0].startswith("cpu-host")


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
        (["show", "tpu-v9"], "bundled families"),
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
