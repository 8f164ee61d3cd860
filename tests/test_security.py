"""Hostile inputs: YAML bombs, deep nesting, duplicate keys, special files, huge values, broken logs."""

from __future__ import annotations

import json
import os
import signal
import stat
import time
from contextlib import contextmanager

import pytest
import yaml

import moeplan as mp
from moeplan.profiles import profile_from_upload, read_jsonl, write_atomic
from moeplan.schema import MAX_YAML_BYTES, SchemaError, parse_yaml_mapping, read_yaml_mapping
from tests.conftest import ROOT

BOMB = "\n".join(  # billion laughs: 90 aliases (under the cap), 10**9 nodes once expanded
    [f"a: &a [{', '.join(['lol'] * 10)}]"]
    + [f"{k}: &{k} [{', '.join([f'*{p}'] * 10)}]" for p, k in zip("abcdefgh", "bcdefghi", strict=True)]
)
DEEP = "a: " + "[" * 5000 + "]" * 5000 + "\n"


@contextmanager
def within(seconds: float):
    """Fail (instead of hanging the suite) if the block blocks, and check that it was quick."""

    def alarm(*_):
        raise TimeoutError("blocked")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(10)
    start = time.perf_counter()
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert time.perf_counter() - start < seconds


@pytest.mark.parametrize("text,message", [(BOMB, "aliases are expanded"), (DEEP, "nesting deeper than 64")],
                         ids=["billion-laughs", "5000-deep"])
def test_bombs_are_refused_quickly(tmp_path, text, message):
    assert len(BOMB) < 1200
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    with within(1.0), pytest.raises(SchemaError, match=message) as info:
        read_yaml_mapping(path, "topology")
    assert str(path) in str(info.value) and len(str(info.value)) < 1000
    with within(1.0), pytest.raises(SchemaError, match=message):
        parse_yaml_mapping(text.encode(), "upload", "profile")


def test_too_many_aliases_and_self_containing_aliases_are_refused():
    many = "a: &a 1\nb: [" + ", ".join(["*a"] * 101) + "]\n"
    with pytest.raises(SchemaError, match="more than 100 aliases"):
        parse_yaml_mapping(many, "doc", "test")
    with within(1.0), pytest.raises(SchemaError, match="contains itself"):
        parse_yaml_mapping("a: &a [1, *a]\n", "doc", "test")


def test_duplicate_keys_are_refused_naming_the_key_and_both_lines():
    with pytest.raises(SchemaError, match=r"duplicate key 'chip' \(lines 2 and 4\)"):
        parse_yaml_mapping("family: x\nchip: 1\nname: y\nchip: 2\n", "doc.yaml", "topology")
    with pytest.raises(SchemaError, match=r"duplicate key 'b' \(lines 2 and 3\)"):
        parse_yaml_mapping("a:\n  b: 1\n  b: 2\n", "doc.yaml", "topology")
    merged = parse_yaml_mapping("base: &b {x: 1, y: 2}\nuse:\n  <<: *b\n  y: 3\n", "doc.yaml", "topology")
    assert merged["use"] == {"x": 1, "y": 3}  # a merge key's values may be overridden


def test_special_files_are_refused_without_blocking(tmp_path):
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    zero = tmp_path / "zero.yaml"
    zero.symlink_to("/dev/zero")
    folder = tmp_path / "folder.yaml"
    folder.mkdir()
    for path in (fifo, zero, folder):
        with within(1.0), pytest.raises(SchemaError, match="not a regular file") as info:
            read_yaml_mapping(path, "profile")
        assert str(path) in str(info.value)
        with within(1.0), pytest.raises(ValueError):
            mp.load_profile(path)


def test_oversized_and_non_utf8_files_are_refused(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_bytes(b"#" * (MAX_YAML_BYTES + 1))
    with within(1.0), pytest.raises(SchemaError, match="larger than"):
        read_yaml_mapping(big, "topology")
    with pytest.raises(SchemaError, match="larger than"):
        parse_yaml_mapping(b"#" * (MAX_YAML_BYTES + 1), "upload", "profile")
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"family: caf\xe9\n")
    with pytest.raises(SchemaError, match="not UTF-8"):
        read_yaml_mapping(latin, "topology")


def test_long_values_are_truncated_in_error_messages(tmp_path):
    huge = "x" * 200_000
    cases = [
        f"schema_version: {huge}\n",  # Section.fail
        f"{huge}: 1\n{huge}: 2\n",  # a duplicate key
        f"!!{huge} {{}}\n",  # an unknown tag, in PyYAML's own message
        "schema_version: 1\n" + "".join(f"k{i}_{huge[:1000]}: 1\n" for i in range(50)),  # unknown keys
    ]
    for i, text in enumerate(cases):
        path = tmp_path / f"long{i}.yaml"
        path.write_text(text)
        with pytest.raises(ValueError) as info:
            mp.load_profile(path)
        assert len(str(info.value)) < 1000, (i, len(str(info.value)))
    with pytest.raises(ValueError) as info:
        mp.load_topology(huge)
    assert len(str(info.value)) < 1000


def test_read_jsonl_skips_and_reports_bad_lines(tmp_path):
    log = tmp_path / "m.jsonl"
    good = {"split": "train", "spec": {"kind": "matmul"}, "pass": 0, "times_s": [0.001, 0.002]}
    lines = [json.dumps(good).encode(), b'{"time_s": 0.5, "note": "caf\xe9"}', json.dumps({"time_s": -1}).encode(),
             b"", b'{"time_s": NaN}', json.dumps({"times_s": [0.1, float("inf")]}).encode(), b"[1, 2]",
             json.dumps({"time_s": 0.25}).encode(), b'{"spec": {"kind": "mat']
    log.write_bytes(b"\n".join(lines))
    bad: list[int] = []
    assert read_jsonl(log, bad) == [good, {"time_s": 0.25}]
    assert bad == [2, 3, 5, 6, 7, 9]
    assert read_jsonl(log) == [good, {"time_s": 0.25}]
    assert read_jsonl(tmp_path / "missing.jsonl") == []


def test_write_atomic_keeps_the_mode_and_refuses_symlinks(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    target.chmod(0o600)
    write_atomic(target, "new")
    assert target.read_text() == "new" and stat.S_IMODE(target.stat().st_mode) == 0o600
    elsewhere = tmp_path / "elsewhere.txt"
    elsewhere.write_text("keep")
    link = tmp_path / "link.json"
    link.symlink_to(elsewhere)
    with pytest.raises(ValueError, match="link.json"):
        write_atomic(link, "overwrite")
    assert elsewhere.read_text() == "keep" and link.is_symlink()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    umask = os.umask(0o022)
    try:
        fresh = write_atomic(tmp_path / "fresh.json", "x")
    finally:
        os.umask(umask)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o644


def test_an_uploaded_profile_may_only_name_a_bundled_topology(tmp_path):
    doc = yaml.safe_load((ROOT / "profiles" / "cpu-host.yaml").read_text())
    assert profile_from_upload("p.yaml", yaml.safe_dump(doc).encode()).bundled_topology_name() == "cpu-host"
    family = tmp_path / "mine.yaml"
    family.write_text((ROOT / "topologies" / "cpu-host.yaml").read_text())
    for topology in ("/etc/passwd.yaml", str(family), "../topologies/cpu-host", "tpu-v9:1x8"):
        data = yaml.safe_dump({**doc, "topology": topology}).encode()
        with pytest.raises(ValueError, match="expected a bundled family"):
            profile_from_upload("p.yaml", data)
        with pytest.raises(ValueError, match="expected a bundled family"):
            mp.Profile({**doc, "topology": topology}).bundled_topology_name()
    with pytest.raises(SchemaError, match="malformed YAML"):
        profile_from_upload("p.yaml", b"!!python/object/apply:os.system ['true']")
    with pytest.raises(SchemaError, match="aliases are expanded"):
        profile_from_upload("p.yaml", BOMB.encode())
    with pytest.raises(SchemaError, match="measurements"):
        profile_from_upload("p.yaml", yaml.safe_dump({**doc, "measurements": ["x"]}).encode())


def test_a_poisoned_measurement_log_resumes_and_reports_the_bad_lines(tmp_path):
    """Resume keeps the good timings and skips (and says so) undecodable, implausible or malformed lines."""
    from moeplan.calibrate.run import _resume
    from moeplan.profiles import read_jsonl

    log = tmp_path / "p.measurements.jsonl"
    good = {"split": "fit", "spec": {"kind": "matmul", "m": 8}, "pass": 0, "times_s": [0.001, 0.0011]}
    lines = [json.dumps(good).encode(), b"\xff\xfe not utf-8", json.dumps({**good, "times_s": [-1.0]}).encode(),
             json.dumps({**good, "pass": 1, "times_s": [1e9]}).encode(), json.dumps({**good, "pass": "x"}).encode(),
             json.dumps({**good, "spec": [1, 2]}).encode(), b'{"torn": ']
    log.write_bytes(b"\n".join(lines))
    said: list[str] = []
    done = _resume(read_jsonl, log, said.append)
    assert list(done.values()) == [{0: [0.001, 0.0011]}]
    assert len(said) == 1 and "skipped 6" in said[0] and "lines 2, 3, 4, 7" in said[0]
