"""The strict family loader: bundled files, sources, malformed files, paths, fuzzing."""

from __future__ import annotations

import copy
import math

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import moeplan as mp
from moeplan.families import load_family
from tests.conftest import TOPOLOGIES, bundled_doc

REQUIRED_FAMILIES = {
    "tpu-v3", "tpu-v4", "tpu-v5e", "tpu-v5p", "tpu-v6e", "dgx-a100", "dgx-h100", "dgx-h200",
    "hgx-h800", "dgx-b200", "gb200-nvl72", "cpu-host", "aws-p5", "aws-p5en", "gcp-a3-mega", "gcp-a4",
    "gb300-nvl72", "hgx-b300", "tpu7x", "amd-mi300x", "amd-mi325x", "amd-mi355x",
}


def test_bundled_names_are_exactly_the_required_families():
    assert set(mp.list_topologies()) == REQUIRED_FAMILIES


def _sections_with_numbers(node, path=""):
    if isinstance(node, dict):
        if any(isinstance(v, int | float) and not isinstance(v, bool) for v in node.values()):
            yield path, node
        for key, value in node.items():
            yield from _sections_with_numbers(value, f"{path}.{key}")


@pytest.mark.parametrize("name", sorted(REQUIRED_FAMILIES))
def test_every_number_in_a_family_file_has_a_source(name):
    doc = bundled_doc(name)
    sections = list(_sections_with_numbers(doc))
    assert sections
    for path, section in sections:
        if path == "":  # schema_version only
            continue
        assert isinstance(section.get("source"), str) and len(section["source"]) > 20, path


def test_published_chip_numbers():
    """A few datasheet figures, so an edit that breaks a unit (GB vs GiB, bidi vs one-way) is caught."""
    h100 = mp.load_topology("dgx-h100").chip
    assert h100.peak_bf16_flop_per_s == 9.89e14 and h100.hbm_bw_bytes_per_s == 3.35e12
    assert h100.peak_flop_per_s("fp8") == 1.979e15
    a100 = mp.load_topology("dgx-a100").chip
    assert a100.peak_flop_per_s("fp8") == a100.peak_bf16_flop_per_s  # no fp8 unit: bf16 rate
    v5p = mp.load_topology("tpu-v5p")
    assert v5p.chip.hbm_capacity_bytes == 95 * 2**30
    assert v5p.tier_bandwidths()["ici0"] == 1e11
    # multiprocessors (the share a communication kernel holds): every GPU family states them, no TPU does
    assert (h100.sm_count, a100.sm_count, mp.load_topology("gb300-nvl72").chip.sm_count) == (132, 108, 160)
    for name in mp.list_topologies():
        chip = mp.load_topology(name).chip
        assert (chip.sm_count is None) == (name.startswith("tpu") or name == "cpu-host"), name


# ------------------------------------------------------------------ malformed files
def _mutate(doc, path, value):
    doc = copy.deepcopy(doc)
    *parents, last = path
    node = doc
    for key in parents:
        node = node[key]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return doc


_DELETE = object()
V5P = bundled_doc("tpu-v5p")
H100 = bundled_doc("dgx-h100")

MALFORMED = [
    ("unknown top-level key", V5P, ("colour",), "blue", r"unknown key\(s\) \['colour'\]"),
    ("missing chip", V5P, ("chip",), _DELETE, "chip: missing required key"),
    ("missing hbm bw", V5P, ("chip", "hbm_bw_bytes_per_s"), _DELETE, "chip.hbm_bw_bytes_per_s: missing"),
    ("negative bandwidth", V5P, ("torus", "link", "bw_bytes_per_s"), -1e11, "torus.link.bw_bytes_per_s: got -1"),
    ("zero HBM", H100, ("chip", "hbm_capacity_bytes"), 0, "chip.hbm_capacity_bytes: got 0"),
    ("text for a number", H100, ("chip", "peak_bf16_flop_per_s"), "fast", "peak_bf16_flop_per_s: got 'fast'"),
    ("bool for a number", H100, ("chip", "hbm_bw_bytes_per_s"), True, "hbm_bw_bytes_per_s: got True"),
    ("infinite number", H100, ("chip", "hbm_bw_bytes_per_s"), math.inf, "hbm_bw_bytes_per_s: got inf"),
    ("schema version", V5P, ("schema_version",), 2, "schema_version: got 2"),
    ("both layouts", V5P, ("switched",), H100["switched"], "exactly one of"),
    ("shape not offered", V5P, ("torus", "default_shape"), [3, 4, 4], r"default_shape: .*\[3\] not offered"),
    ("unknown link key", H100, ("switched", "node", "link", "speed"), 1,
     r"switched.node.link: unknown key\(s\) \['speed'\]"),
    ("missing source", H100, ("switched", "scale_out", "nic", "source"), _DELETE, "scale_out.nic.source: missing"),
    ("zero leaf size", H100, ("switched", "scale_out", "nodes_per_leaf"), 0, "nodes_per_leaf: got 0"),
    ("oversubscription < 1", H100, ("switched", "scale_out", "oversubscription"), 0.5, "oversubscription: got 0.5"),
    ("default above max", H100, ("switched", "default_nodes"), 1000, "max_nodes"),
    ("string boolean", V5P, ("torus", "twisted"), "yes", "twisted: got 'yes'; expected true or false"),
    ("float devices", H100, ("switched", "node", "devices_per_node"), 8.5, "devices_per_node: got 8.5"),
    ("bad scope", V5P, ("torus", "wraparound_scope"), "cube", "wraparound_scope: got 'cube'"),
    ("empty name", V5P, ("chip", "name"), "", "chip.name: got ''"),
    ("fractional SMs", H100, ("chip", "sm_count"), 13.5, "chip.sm_count: got 13.5"),
]


@pytest.mark.parametrize("label,doc,path,value,message", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_family_is_rejected_with_file_key_and_value(write_family, label, doc, path, value, message):
    path_written = write_family(_mutate(doc, path, value))
    with pytest.raises(ValueError, match=message) as info:
        load_family(path_written)
    assert str(path_written) in str(info.value)


@pytest.mark.parametrize(
    "text,message",
    [
        ("chip: [unclosed", "malformed YAML"),
        ("- a\n- b\n", "expected a mapping at the top"),
        ("", "expected a mapping at the top"),
        ("!!python/object:os.system {}", "malformed YAML"),  # safe_load refuses arbitrary tags
    ],
)
def test_unparseable_files_are_rejected(write_family, text, message):
    with pytest.raises(ValueError, match=message):
        load_family(write_family(text))


def test_exponent_without_sign_is_read_as_a_number(write_family):
    text = (TOPOLOGIES / "dgx-h100.yaml").read_text().replace("3.35e+12", "3.35e12")
    assert "3.35e12" in text
    assert yaml.safe_load(text)["chip"]["hbm_bw_bytes_per_s"] == "3.35e12"  # PyYAML keeps it a string
    chip = load_family(write_family(text)).chip
    assert chip.hbm_bw_bytes_per_s == 3.35e12 and isinstance(chip.hbm_bw_bytes_per_s, float)


def test_names_are_never_resolved_as_paths_under_the_bundled_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("../../etc/passwd", "/etc/passwd", "tpu-v5p.yaml", "../topologies/tpu-v5p", "tpu-v9"):
        with pytest.raises(ValueError, match="bundled: \\['amd-mi300x'"):
            mp.load_topology(name)


def test_a_user_family_file_loads_by_path(write_family):
    path = write_family(_mutate(H100, ("family",), "my-cluster"))
    topo = mp.load_topology(str(path), nodes=2)
    assert topo.family == "my-cluster" and topo.num_devices == 16


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(name="tpu-v5p", nodes=2), "takes shape"),
        (dict(name="dgx-h100", shape=(4, 4)), "takes nodes"),
        (dict(name="dgx-h100", nodes=0), "nodes: got 0"),
        (dict(name="dgx-h100", nodes=10_000), "expected an integer from 1 to 256"),
        (dict(name="tpu-v5p", shape=(4, 4)), "expected 3 axes"),
        (dict(name="tpu-v5p", shape=(16, 16, 32)), "not offered"),
        (dict(name="tpu-v5p", shape="4x4x-8"), "not a shape"),
        (dict(name="cpu-host", nodes=2), "from 1 to 1"),
    ],
)
def test_impossible_sizes_are_rejected(kwargs, message):
    name = kwargs.pop("name")
    with pytest.raises(ValueError, match=message):
        mp.load_topology(name, **kwargs)


# ------------------------------------------------------------------ fuzzing
def _paths(node, prefix=()):
    if isinstance(node, dict):
        for key, value in node.items():
            yield prefix + (key,)
            yield from _paths(value, prefix + (key,))


LEAVES = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 40), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8), st.lists(st.integers(-2, 20), max_size=4),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
    st.sampled_from(["3.35e12", "1e-6", "-5e10", "nan", ".inf", "4x4"]),
)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    base=st.sampled_from(["tpu-v5p", "tpu-v5e", "dgx-h100", "cpu-host", "gb200-nvl72"]),
    edits=st.lists(st.tuples(st.integers(0, 10**6), st.one_of(st.just(_DELETE), LEAVES)), min_size=1, max_size=3),
)
def test_fuzzed_family_documents_raise_only_value_error(write_family, base, edits):
    doc = bundled_doc(base)
    for index, value in edits:
        paths = list(_paths(doc))
        doc = _mutate(doc, paths[index % len(paths)], value)
    path = write_family(doc)
    try:
        topo = mp.load_topology(str(path))
    except ValueError:
        return
    assert topo.num_devices >= 1


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(base=st.sampled_from(["tpu-v4", "dgx-a100"]), cut=st.integers(0, 4000), junk=st.text(max_size=12))
def test_fuzzed_family_text_raises_only_value_error(write_family, base, cut, junk):
    text = (TOPOLOGIES / f"{base}.yaml").read_text()
    cut %= len(text)
    try:
        mp.load_topology(str(write_family(text[:cut] + junk + text[cut + len(junk):])))
    except ValueError:
        pass
