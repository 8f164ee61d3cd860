"""Money and energy of a step and of a run: list prices per device-hour and board power per chip.

The figures live in ``moeplan/prices.yaml`` (each with its source and date; a user's file replaces it:
``load_prices(path)`` or the ``MOEPLAN_PRICES`` environment variable). For a step of ``t`` seconds on
``n`` devices:

* dollars = t x n x price per device-hour / 3600, per step; per million tokens = that / tokens x 1e6;
* energy = t x n x board power x PUE, in kWh (board power is the chip's rated TDP/TBP: an upper bound
  on what a step draws; the PUE adds the data center's cooling and power delivery);
* a run of ``tokens_to_train`` tokens takes ``ceil(tokens / batch)`` steps.

A family without a list price (not sold by the hour, or no public price) says why; its money figures
are None, its energy is still computed.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from moeplan.schema import Section, read_yaml_mapping
from moeplan.topology import Topology

PRICES_PATH = Path(__file__).resolve().parent / "prices.yaml"


@dataclass(frozen=True)
class Price:
    provider: str
    usd_per_device_hour: float
    date: str
    source: str


@dataclass(frozen=True)
class FamilyCost:
    family: str
    board_power_w: float | None
    power_source: str
    prices: tuple[Price, ...]
    no_price: str = ""  # why there is no price, when there is none

    def price(self, provider: str | None = None) -> Price | None:
        """The named provider's price, or the lowest listed."""
        if provider is not None:
            match = [p for p in self.prices if p.provider == provider]
            if not match:
                raise ValueError(f"provider: got {provider!r} for {self.family}; expected one of "
                                 f"{[p.provider for p in self.prices]}")
            return match[0]
        return min(self.prices, key=lambda p: p.usd_per_device_hour, default=None)


@dataclass(frozen=True)
class Prices:
    families: dict[str, FamilyCost]
    pue: float
    pue_source: str
    path: str

    def of(self, family: str) -> FamilyCost:
        try:
            return self.families[family]
        except KeyError:
            raise ValueError(f"prices: no entry for family {family!r} in {self.path}; expected one of "
                             f"{sorted(self.families)}") from None


def load_prices(path: str | os.PathLike[str] | None = None) -> Prices:
    """The bundled price file, ``MOEPLAN_PRICES``, or ``path``; strict like the topologies; read once per
    version of the file (every search looks its price up)."""
    path = Path(path or os.environ.get("MOEPLAN_PRICES") or PRICES_PATH)
    try:
        mtime = path.stat().st_mtime_ns
    except OSError:
        mtime = -1  # the reader names the missing file
    return _load_prices(str(path), mtime)


@lru_cache(maxsize=16)
def _load_prices(name: str, _mtime_ns: int) -> Prices:
    path = Path(name)
    top = Section(read_yaml_mapping(path, "prices"), "", str(path))
    top.integer("schema_version")
    pue = top.section("pue")
    pue_value, pue_source = pue.number("value", minimum=1.0, strict=False), pue.string("source")
    pue.finish()
    fams = top.section("families")
    out = {}
    for name in list(fams.data):
        sec = fams.section(name)
        prices = []
        for i, item in enumerate(sec.data.get("prices") or []):
            p = Section(item, f"{sec.where}.prices[{i}]", str(path))
            prices.append(Price(p.string("provider"), p.number("usd_per_device_hour"), str(p.string("date")),
                                p.string("source")))
            p.finish()
        sec._seen.add("prices")
        out[name] = FamilyCost(name, sec.number("board_power_w", optional=True), sec.string("power_source"),
                               tuple(prices), sec.string("no_price", optional=True) or "")
        if not prices and not out[name].no_price:
            raise ValueError(f"{path}: families.{name}: no prices; expected a list of prices or a no_price reason")
        sec.finish()
    top.finish()
    return Prices(out, pue_value, pue_source, str(path))


def step_cost(topo: Topology, step_time_s: float, global_batch_tokens: int, *, tokens_to_train: float | None = None,
              provider: str | None = None, prices: Prices | None = None) -> dict:
    """Dollars and kWh per step, per million tokens and per run (module docstring)."""
    prices = prices or load_prices()
    fam = prices.of(topo.family)
    price = fam.price(provider)
    device_hours = step_time_s * topo.num_devices / 3600.0
    usd = None if price is None else device_hours * price.usd_per_device_hour
    kwh = None if fam.board_power_w is None else device_hours * fam.board_power_w * prices.pue / 1000.0
    out = {"device_hours_per_step": device_hours, "usd_per_step": usd,
           "usd_per_million_tokens": None if usd is None else usd / global_batch_tokens * 1e6,
           "kwh_per_step": kwh, "kwh_per_million_tokens": None if kwh is None else kwh / global_batch_tokens * 1e6,
           "provider": None if price is None else price.provider,
           "price_usd_per_device_hour": None if price is None else price.usd_per_device_hour,
           "price_date": None if price is None else price.date, "no_price": fam.no_price, "pue": prices.pue}
    if tokens_to_train is not None:
        steps = math.ceil(tokens_to_train / global_batch_tokens)
        out.update(run_steps=steps, run_days=steps * step_time_s / 86400.0,
                   run_device_hours=steps * device_hours, run_usd=None if usd is None else steps * usd,
                   run_mwh=None if kwh is None else steps * kwh / 1000.0)
    return out


def usd_to_device_hours(usd: float, family: str, provider: str | None = None, prices: Prices | None = None) -> float:
    """A money budget as device-hours at the family's price."""
    prices = prices or load_prices()
    price = prices.of(family).price(provider)
    if price is None:
        raise ValueError(f"budget_usd: {family} has no list price ({prices.of(family).no_price}); give device-hours")
    return usd / price.usd_per_device_hour
