"""Money and energy: hand computations, every bundled family priced or saying why, search's money budget."""

from __future__ import annotations

import math

import pytest

import moeplan as mp
from moeplan.cost import load_prices, step_cost, usd_to_device_hours

PRICES = """schema_version: 1
pue: {value: 1.1, source: "test"}
families:
  dgx-h100:
    board_power_w: 700
    power_source: "test"
    prices:
    - {provider: a, usd_per_device_hour: 3.0, date: "2025-01", source: "test"}
    - {provider: b, usd_per_device_hour: 2.0, date: "2025-01", source: "test"}
  tpu-v5p:
    board_power_w: null
    power_source: "not published"
    no_price: "test reason"
"""


@pytest.fixture
def prices(tmp_path):
    path = tmp_path / "prices.yaml"
    path.write_text(PRICES)
    return load_prices(path)


def test_money_and_energy_equal_hand_computations(prices):
    topo = mp.load_topology("dgx-h100", nodes=2)  # 16 GPUs
    c = step_cost(topo, 10.0, 4_000_000, tokens_to_train=1e9, prices=prices)
    assert c["provider"] == "b"  # the lowest price by default
    assert c["usd_per_step"] == pytest.approx(10 * 16 * 2.0 / 3600)
    assert c["usd_per_million_tokens"] == pytest.approx(10 * 16 * 2.0 / 3600 / 4.0)
    assert c["kwh_per_step"] == pytest.approx(10 * 16 * 700 * 1.1 / 3.6e6)
    assert c["run_steps"] == 250 and c["run_usd"] == pytest.approx(250 * 10 * 16 * 2.0 / 3600)
    assert c["run_mwh"] == pytest.approx(250 * 10 * 16 * 700 * 1.1 / 3.6e9)
    assert step_cost(topo, 10.0, 4_000_000, provider="a", prices=prices)["usd_per_step"] == pytest.approx(
        10 * 16 * 3.0 / 3600)
    tpu = step_cost(mp.load_topology("tpu-v5p"), 1.0, 1000, prices=prices)
    assert tpu["usd_per_step"] is None and tpu["no_price"] == "test reason" and tpu["kwh_per_step"] is None
    assert usd_to_device_hours(100.0, "dgx-h100", prices=prices) == pytest.approx(50.0)
    with pytest.raises(ValueError, match="provider: got 'c'"):
        step_cost(topo, 1.0, 1000, provider="c", prices=prices)


def test_every_bundled_family_has_a_price_or_says_why():
    prices = load_prices()
    assert set(prices.families) == set(mp.list_topologies())
    assert 1.0 <= prices.pue <= 2.0 and prices.pue_source
    for name, fam in prices.families.items():
        assert fam.prices or fam.no_price, name
        for p in fam.prices:
            assert 0 < p.usd_per_device_hour < 100 and p.source and p.date, (name, p)
        assert fam.power_source


def test_search_takes_a_money_budget_and_ranks_by_cost():
    model = mp.load_model("qwen3-30b-a3b")
    topo = mp.load_topology("dgx-h100", nodes=2)
    price = load_prices().of("dgx-h100").price()
    space = mp.SearchSpace(num_experts=[64, 128], top_k=[8])
    by_money = mp.search(model, topo, space, global_batch_tokens=2**21, budget_usd=1e6)
    by_hours = mp.search(model, topo, space, global_batch_tokens=2**21,
                         device_hours=1e6 / price.usd_per_device_hour)
    assert by_money.best.loss == pytest.approx(by_hours.best.loss)
    cheapest = mp.search(model, topo, space, global_batch_tokens=2**21, objective="cost")
    best = cheapest.best
    assert best.usd_per_million_tokens == pytest.approx(
        best.cost_per_token_device_s * price.usd_per_device_hour / 3600 * 1e6)
    assert math.isclose(best.usd_per_million_tokens, min(c.usd_per_million_tokens for c in cheapest.configurations))
    with pytest.raises(ValueError, match="not both"):
        mp.search(model, topo, space, global_batch_tokens=2**21, budget_usd=1.0, device_hours=1.0)


def test_bad_price_files_name_the_field(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(PRICES.replace("usd_per_device_hour: 3.0", "usd_per_device_hour: -3"))
    with pytest.raises(ValueError, match="usd_per_device_hour"):
        load_prices(path)
    path.write_text(PRICES.replace('    no_price: "test reason"\n', ""))
    with pytest.raises(ValueError, match="no_price"):
        load_prices(path)
