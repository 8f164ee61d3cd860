"""Routing statistics against a Monte Carlo simulation of top-k routing."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import special

import moeplan as mp
from moeplan import routing as R
from moeplan.routing import Routing, expected_excess, routing_stats, simulate_routing

CASES = [
    (2048, 64, 2, 64.0, 1, Routing()),  # capacity factor 1.0: real drops
    (1024, 16, 1, 64.0, 1, Routing()),
    (4096, 64, 2, 80.0, 4, Routing("zipf", skew=0.6)),
    (2048, 32, 2, 128.0, 2, Routing("histogram", histogram=tuple(range(1, 33)))),
]


@pytest.mark.parametrize("tokens,experts,k,capacity,per_device,routing", CASES)
def test_drop_rate_and_loads_match_monte_carlo(tokens, experts, k, capacity, per_device, routing):
    exact = routing_stats(tokens, experts, k, capacity, per_device, routing)
    sampled = simulate_routing(tokens, experts, k, capacity, per_device, routing, trials=400, seed=1)
    assert exact.drop_rate == pytest.approx(sampled.drop_rate, rel=0.02, abs=2e-3)
    # loads: q_i = k p_i slightly overstates how often top-k *without replacement* picks a hot expert
    tolerance = 0.02 if routing.kind == "uniform" else 0.05
    assert exact.max_expert_load == pytest.approx(sampled.max_expert_load, rel=tolerance)
    assert exact.max_device_load == pytest.approx(sampled.max_device_load, rel=tolerance)


def test_uniform_capacity_one_drops_a_known_share():
    stats = routing_stats(2048, 64, 2, 64.0, 1)
    # E[max(X - mu, 0)] for X ~ Binomial(2048, 1/32) is about sigma * phi(0) = 7.9 * 0.399 = 3.1 of mu = 64
    assert stats.drop_rate == pytest.approx(3.14 / 64, rel=0.03)


def test_balanced_routing_has_no_straggler_and_dropless_has_no_drops():
    balanced = routing_stats(4096, 64, 2, None, 8, Routing("balanced"))
    assert balanced.max_device_load == balanced.mean_device_load and balanced.drop_rate == 0.0
    uniform = routing_stats(4096, 64, 2, None, 8)
    assert uniform.max_device_load > uniform.mean_device_load and uniform.drop_rate == 0.0


def test_skew_raises_the_straggler():
    flat = routing_stats(4096, 64, 2, None, 8)
    skewed = routing_stats(4096, 64, 2, None, 8, Routing("zipf", skew=1.0))
    assert skewed.max_device_load > 1.5 * flat.max_device_load


@pytest.mark.parametrize(
    "kwargs,message",
    [(dict(kind="random"), "routing.kind"), (dict(kind="zipf"), "skew"), (dict(kind="histogram"), "histogram"),
     (dict(kind="histogram", histogram=(1.0, -2.0)), "histogram")],
)
def test_bad_routing_is_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Routing(**kwargs)
    with pytest.raises(ValueError, match="experts_per_device"):
        routing_stats(100, 10, 2, None, 3)


@pytest.mark.parametrize("trials", [7, 300, 40_000, 2_000_000])
@pytest.mark.parametrize("probs", [np.full(64, 2 / 64), np.minimum((np.arange(16) + 1.0) ** -1.2 / 1.2, 1.0),
                                   np.array([0.5, 0.5])])
def test_expected_max_equals_the_sum_over_every_integer(trials, probs):
    """The trapezoid rule on every (sd/4)-th integer against the plain sum of 1 - prod F_i(x) over every
    integer of mean +- 40 sd (every term below is 1 and every term above 0 to double precision)."""
    mean, sd = trials * probs.max(), np.sqrt(trials * probs.max() + 1.0)
    lo, hi = int(max(0, mean - 40 * sd)), int(min(trials, mean + 40 * sd))
    x = np.arange(lo, hi + 1, dtype=float)
    log_cdf = sum(np.log(np.maximum(special.bdtr(x, trials, p), 1e-300)) for p in probs)
    brute = lo + float(np.sum(1.0 - np.exp(log_cdf)))
    assert R._expected_max(trials, *np.unique(probs, return_counts=True)) == pytest.approx(brute, rel=1e-9)


@pytest.mark.parametrize("routing", [Routing("balanced"), Routing(), Routing("zipf", skew=0.6)], ids=str)
@pytest.mark.parametrize("per_device", [1, 4])
def test_max_device_load_matches_monte_carlo(routing, per_device):
    """The busiest device's load on its own (what dropless routing uses) against the simulation; the
    tolerance of the test above for skewed routing, where q_i = k p_i overstates the hot experts."""
    simulated = simulate_routing(2048, 32, 2, None, per_device, routing, trials=400, seed=1).max_device_load
    tolerance = 0.05 if routing.kind == "zipf" else 0.02
    assert R.max_device_load(2048, 32, 2, per_device, routing) == pytest.approx(simulated, rel=tolerance)


def test_a_capacity_past_the_groups_tokens_drops_nothing():
    """The binomial tail of a capacity above the trials was NaN; nothing can be dropped there."""
    assert routing_stats(2048, 64, 2, 4096.0, 1, loads=False).drop_rate == 0.0
    assert float(expected_excess(16, 0.5, 40.0)) == 0.0
    model = mp.load_model("st-moe-like-8b").with_(n_layers=4, capacity_factor=64.0)
    assert mp.predict_loss(model, 1e9).loss == mp.predict_loss(model.with_(capacity_factor=None), 1e9).loss


def test_large_groups_stay_exact_enough_and_finite():
    """At capacity factor 1 under uniform routing the drop rate falls as 1/sqrt(tokens); the exact binomial
    form cancelled in floating point past ~2^22 tokens (2^27 gave 10x the drop rate, 2^34 NaN)."""
    sizes = [2**20, 2**24, 2**28, 2**32, 2**36]
    drops = [routing_stats(t, 64, 2, float(t * 2 // 64), 1, loads=False).drop_rate for t in sizes]
    ratios = np.array(drops[:-1]) / np.array(drops[1:])
    assert np.all(np.isfinite(drops)) and np.allclose(ratios, 4.0, rtol=0.02)  # x16 tokens, /4 drop rate
    big = routing_stats(2**40, 64, 2, None, 8)
    assert np.isfinite(big.max_device_load) and 1.0 < big.max_device_load / big.mean_device_load < 1.0001
