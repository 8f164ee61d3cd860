"""Graph invariants of the builders, derived figures against closed forms, mesh placement."""

from __future__ import annotations

import itertools

import networkx as nx
import numpy as np
import pytest

import moeplan as mp
from moeplan.hardware import LinkSpec
from moeplan.topology import NodeSpec, ScaleOut, switched_cluster, torus

LINK = LinkSpec("test", 1.0e11, 1e-6)
CHIP = mp.load_topology("tpu-v5p").chip


def _degrees(topo):
    return [topo.graph.degree(d) for d in range(topo.num_devices)]


@pytest.mark.parametrize("name", mp.list_topologies())
def test_every_bundled_family_loads_at_three_sizes(name):
    fam_sizes = {
        "tpu-v3": [None, (8, 8), (32, 32)],
        "tpu-v4": [None, (2, 2, 4), (4, 4, 8)],
        "tpu-v5p": [None, (4, 8, 8), (8, 8, 12)],
        "tpu-v5e": [None, (8, 16), (16, 16)],
        "tpu-v6e": [None, (2, 4), (16, 16)],
        "cpu-host": [None, 1, 1],
        "gb200-nvl72": [None, 2, 4],
        "gb300-nvl72": [None, 2, 4],
        "tpu7x": [None, (4, 8, 8), (8, 8, 12)],
    }
    for size in fam_sizes.get(name, [None, 2, 16]):
        if name.startswith("tpu"):
            topo = mp.load_topology(name, shape=size)
        else:
            topo = mp.load_topology(name, nodes=size)
        assert topo.num_devices == topo.coordinates.shape[0] > 0
        assert topo.chip.peak_bf16_flop_per_s > 0
        assert nx.is_connected(topo.graph)


def test_full_3d_torus_has_degree_six_and_2d_four():
    assert set(_degrees(mp.load_topology("tpu-v5p", shape=(4, 4, 8)))) == {6}
    assert set(_degrees(mp.load_topology("tpu-v4", shape=(4, 4, 8), twisted=True))) == {6}
    assert set(_degrees(mp.load_topology("tpu-v5e", shape=(16, 16)))) == {4}
    assert set(_degrees(mp.load_topology("tpu-v3", shape=(32, 32)))) == {4}


def test_axes_without_wraparound_have_fewer_links():
    sub_cube = mp.load_topology("tpu-v4", shape=(2, 2, 4))  # not whole cubes: a mesh
    assert not any(a.wraparound for a in sub_cube.axes)
    assert max(_degrees(sub_cube)) == 4 and min(_degrees(sub_cube)) == 3
    half = mp.load_topology("tpu-v5e", shape=(8, 16))  # only the 16-long axis wraps
    assert [a.wraparound for a in half.axes] == [False, True]
    assert set(_degrees(half)) == {3, 4}
    mesh = mp.load_topology("tpu-v5p", shape=(4, 4, 4), wraparound=False)
    assert mesh.graph.number_of_edges() == 3 * 4 * 4 * 3


def test_twisted_wraparound_lands_half_the_long_axis_further():
    topo = mp.load_topology("tpu-v4", shape=(4, 4, 8), twisted=True)
    shape = (4, 4, 8)
    dev = int(np.ravel_multi_index((3, 1, 2), shape))  # on the x seam
    twisted_nbr = int(np.ravel_multi_index((0, 1, 6), shape))
    plain_nbr = int(np.ravel_multi_index((0, 1, 2), shape))
    assert topo.graph.has_edge(dev, twisted_nbr) and not topo.graph.has_edge(dev, plain_nbr)
    z_seam = int(np.ravel_multi_index((1, 1, 7), shape))
    assert topo.graph.has_edge(z_seam, int(np.ravel_multi_index((1, 1, 0), shape)))


def test_twisted_needs_an_n_by_2n_shape():
    with pytest.raises(ValueError, match="cannot be twisted"):
        mp.load_topology("tpu-v4", shape=(4, 4, 4), twisted=True)
    with pytest.raises(ValueError, match="no twisted"):
        mp.load_topology("tpu-v5e", shape=(8, 16), twisted=True)


def test_gpus_in_a_node_are_two_hops_apart_through_their_switch():
    topo = mp.load_topology("dgx-h100", nodes=2)
    for a, b in itertools.combinations(range(8), 2):
        paths = list(nx.all_shortest_paths(topo.graph, a, b))
        assert all(len(p) == 3 and p[1] == "n0/switch" for p in paths)


def test_nodes_are_joined_only_through_nics():
    topo = mp.load_topology("dgx-a100", nodes=4)
    no_nics = topo.graph.copy()
    no_nics.remove_nodes_from([v for v, k in topo.graph.nodes(data="kind") if k == "nic"])
    for a, b in [(0, 8), (3, 31), (9, 17)]:
        assert not nx.has_path(no_nics, a, b)
        assert nx.has_path(topo.graph, a, b)
    nics = [v for v in topo.graph.neighbors(5) if topo.graph.nodes[v]["kind"] == "nic"]
    assert nics == ["n0/nic5"]  # one NIC per GPU, on its own rail


TORI = [
    ((8,), (True,)), ((8,), (False,)), ((2, 2), (True, True)), ((4, 4), (True, True)), ((4, 4), (False, False)),
    ((4, 8), (True, False)), ((8, 8), (True, True)), ((3, 5), (True, True)), ((4, 4, 4), (True, True, True)),
    ((2, 2, 4), (False, False, False)),
]


@pytest.mark.parametrize("shape,wrap", TORI)
def test_torus_bisection_and_diameter_match_closed_forms(shape, wrap):
    topo = torus("t", CHIP, shape, LINK, wrap)
    assert topo.bisection_bw_bytes_per_s() == pytest.approx(topo.bisection_bw_closed_form_bytes_per_s())
    assert topo.diameter_hops() == topo.diameter_closed_form_hops()
    assert nx.diameter(topo.graph) == topo.diameter_hops()  # brute force over every pair


@pytest.mark.parametrize("shape", [(4, 8), (4, 4, 8), (2, 4, 4), (4, 8, 8)])
def test_twisted_bisection_matches_closed_form_and_beats_plain(shape):
    twisted = torus("t", CHIP, shape, LINK, (True,) * len(shape), twisted=True)
    plain = torus("t", CHIP, shape, LINK, (True,) * len(shape))
    assert twisted.bisection_bw_bytes_per_s() == pytest.approx(twisted.bisection_bw_closed_form_bytes_per_s())
    assert twisted.bisection_bw_bytes_per_s() > plain.bisection_bw_bytes_per_s()
    assert nx.diameter(twisted.graph) == twisted.diameter_hops() < plain.diameter_hops()


NIC = LinkSpec("nic", 5e10, 1e-6)
PCIE = LinkSpec("pcie", 6.4e10, 5e-7)


@pytest.mark.parametrize(
    "nodes,per_leaf,oversub",
    [(1, 32, 1.0), (2, 32, 1.0), (4, 32, 1.0), (8, 2, 1.0), (8, 2, 2.0), (6, 4, 3.0), (5, 2, 1.5), (3, 2, 2.0)],
)
def test_cluster_bisection_min_cut_equals_closed_form(nodes, per_leaf, oversub):
    node = NodeSpec(4, LinkSpec("nvl", 4.5e11, 3e-7), in_switch_reduction=True)
    topo = switched_cluster("c", CHIP, nodes, node, ScaleOut(PCIE, NIC, per_leaf, oversub))
    assert topo.bisection_bw_bytes_per_s() == pytest.approx(topo.bisection_bw_closed_form_bytes_per_s())
    assert topo.diameter_hops() == topo.diameter_closed_form_hops()


def test_bundled_bisection_and_injection_figures():
    h100 = mp.load_topology("dgx-h100", nodes=4)
    assert h100.bisection_bw_bytes_per_s() == pytest.approx(2 * 8 * 5e10)  # 16 NICs at 400 Gb/s
    assert h100.injection_bw_bytes_per_s() == pytest.approx(4.5e11 + 5e10)  # NVLink + own NIC
    v5p = mp.load_topology("tpu-v5p", shape=(4, 4, 4))
    assert v5p.bisection_bw_bytes_per_s() == pytest.approx(2 * 16 * 1e11)
    assert v5p.injection_bw_bytes_per_s() == pytest.approx(6 * 1e11)
    assert mp.load_topology("gb200-nvl72").bisection_bw_bytes_per_s() == pytest.approx(36 * 9e11)


def test_two_ring_counts_both_links():
    topo = torus("t", CHIP, (2,), LINK, (True,))
    assert topo.graph[0][1]["links"] == 2
    assert topo.bisection_bw_bytes_per_s() == pytest.approx(2 * LINK.bw_bytes_per_s)


def test_mesh_innermost_axis_on_fastest_links():
    topo = mp.load_topology("dgx-h100", nodes=4)
    mesh = topo.place_mesh({"data": 4, "expert": 8})
    for group in mesh.groups("expert"):
        assert topo.group_tier(group) == "node"  # all on NVLink
    for group in mesh.groups("data"):
        assert topo.group_tier(group) == "scale_out"
    flipped = topo.place_mesh({"expert": 4, "data": 8})
    assert all(topo.group_tier(g) == "node" for g in flipped.groups("data"))


def test_mesh_on_torus_follows_the_last_physical_axis():
    topo = mp.load_topology("tpu-v5p", shape=(4, 4, 4))
    mesh = topo.place_mesh({"data": 16, "expert": 4})
    for group in mesh.groups("expert"):
        coords = topo.coordinates[group]
        assert (coords[:, :2] == coords[0, :2]).all()  # one z-ring
        assert sorted(coords[:, 2]) == [0, 1, 2, 3]


def test_mesh_explicit_override_and_errors():
    topo = mp.load_topology("dgx-h100", nodes=2)
    order = np.array([0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15])
    mesh = topo.place_mesh({"expert": 8, "data": 2}, devices=order)
    assert all(topo.group_tier(g) == "scale_out" for g in mesh.groups("data"))
    with pytest.raises(ValueError, match="product of the axes"):
        topo.place_mesh({"data": 3, "expert": 4})
    with pytest.raises(ValueError, match="distinct ids"):
        topo.place_mesh({"data": 2}, devices=[0, 0])
    with pytest.raises(ValueError, match="expected one of"):
        mesh.groups("tensor")


def test_device_ids_count_and_list():
    topo = mp.load_topology("dgx-h100", nodes=2)
    assert topo.device_ids(4).tolist() == [0, 1, 2, 3]
    assert topo.device_ids([0, 8]).tolist() == [0, 8]
    for bad in (0, 17, [16], [1, 1], [], True):
        with pytest.raises(ValueError, match="devices"):
            topo.device_ids(bad)


def test_multislice_joins_copies_of_the_slice_over_dcn():
    topo = mp.load_topology("tpu-v5p", shape=(4, 4, 4), slices=3)
    assert topo.num_devices == 192 and topo.slices == 3 and topo.name == "tpu-v5p:3x[4x4x4]"
    single = mp.load_topology("tpu-v5p", shape=(4, 4, 4))
    assert sum(1 for *_, d in topo.graph.edges(data=True) if d["tier"].startswith("ici")) == 3 * \
        single.graph.number_of_edges()
    assert topo.graph.degree(70) == 7  # six ICI links and one DCN link
    assert topo.bisection_bw_bytes_per_s() == pytest.approx(topo.bisection_bw_closed_form_bytes_per_s())
    assert topo.bisection_bw_closed_form_bytes_per_s() == 64 * 6.25e9  # one slice's chips, each at 50 Gb/s
    assert topo.diameter_hops() == topo.diameter_closed_form_hops() == 2
    assert topo.group_tier([0, 64]) == "dcn" and topo.group_tier([0, 1]) == "ici"


def test_multislice_errors_name_the_field():
    with pytest.raises(ValueError, match="slices"):
        mp.load_topology("dgx-h100", slices=2)
    with pytest.raises(ValueError, match="slices: got 0"):
        mp.load_topology("tpu-v5p", slices=0)
    with pytest.raises(ValueError, match="no DCN"):
        mp.load_topology("tpu-v3", slices=2)
