"""grid.py: the one rounding rule, equal in numba and Decimal, tick for tick, on and off the grid."""
from __future__ import annotations

import math
from decimal import Decimal

import numpy as np
import pytest

import grid
import strategy as st
from config import InstrumentConfig, StrategyConfig
from exchange_client import InstrumentRules

TICKS = ["1", "0.5", "0.25", "0.1", "0.05", "0.01", "0.005", "0.0001", "0.000001", "0.0000001", "2.5"]


def grid_prices(tick: Decimal, rng: np.random.Generator) -> tuple[np.ndarray, list[float]]:
    """Grid indices k and float prices meant to be k·tick, built the ways code builds them."""
    step = float(tick)
    base = int(Decimal(100) / tick)                                  # prices around 100 quote units
    ks = np.concatenate([np.arange(1, 400), base + np.arange(-300, 300)]).astype(np.int64)
    exact = [float(Decimal(int(k)) * tick) for k in ks]
    values, idx = [], []
    for k, x in zip(ks, exact):
        j = int(rng.integers(0, k)) if k > 1 else 0
        a, b = float(Decimal(j) * tick), float(Decimal(int(k) - j) * tick)
        for v in (x, k * step, k / (1.0 / step), a + b, (b + a) - 0.0, np.nextafter(x, math.inf),
                  np.nextafter(x, -math.inf), x * (1 + 4e-16), x * (1 - 4e-16)):
            values.append(float(v))
            idx.append(int(k))
    return np.array(idx), values


@pytest.mark.parametrize("tick", TICKS)
def test_numba_and_decimal_rules_agree_and_keep_grid_prices_on_their_tick(tick):
    rng = np.random.default_rng(len(tick))
    t = Decimal(tick)
    ks, values = grid_prices(t, rng)
    for k, v in zip(ks, values):
        want = Decimal(int(k)) * t
        for direction in (grid.DOWN, grid.NEAREST, grid.UP):
            dec = grid.snap_round_dec(v, t, direction)
            assert dec == want, (tick, v, direction, dec)
            assert grid.snap_round(v, float(t), direction) == float(dec), (tick, v, direction)


@pytest.mark.parametrize("tick", TICKS)
def test_values_between_grid_points_round_in_the_stated_direction(tick):
    t = Decimal(tick)
    step = float(t)
    for k in range(1, 300):
        for frac, nearest in ((0.1, 0), (0.25, 0), (0.4, 0), (0.5, 1), (0.6, 1), (0.75, 1), (0.9, 1)):
            v = float((Decimal(k) + Decimal(str(frac))) * t)
            for direction, n in ((grid.DOWN, k), (grid.UP, k + 1), (grid.NEAREST, k + nearest)):
                dec = grid.snap_round_dec(v, t, direction)
                assert dec == Decimal(n) * t, (tick, v, direction)
                assert grid.snap_round(v, step, direction) == float(dec), (tick, v, direction)


def test_a_hair_off_the_grid_sell_postonly_rests_on_its_own_tick():
    """The old strategy.limit_price returned ticks·tick = 100.57000000000001 for a short at close 100, ATR 0.57,
    offset 1; ExchangeClient then rounded that sell up a whole tick to 100.58."""
    assert 10057 * 0.01 == 100.57000000000001
    params = st.strategy_params(StrategyConfig(limit_offset_atr=1.0), InstrumentConfig(tick_size=0.01))
    assert st.limit_price(100.0, 0.57, st.SHORT, params) == 100.57
    assert st.limit_price(100.0, 0.57, st.LONG, params) == 99.43
    rules = InstrumentRules.from_config("BTCUSDT", InstrumentConfig(tick_size=0.01))
    assert rules.passive_price(10057 * 0.01, "Sell") == Decimal("100.57")
    assert rules.passive_price(100.57000000000001, "Buy") == Decimal("100.57")
    assert rules.passive_price(100.574, "Sell") == Decimal("100.58")
    assert rules.round_qty(0.30000000000000004) == Decimal("0.300")


def test_quantities_round_down_and_decimal_rejects_non_numbers():
    assert grid.snap_round(0.0129999, 0.001, grid.DOWN) == 0.012
    assert grid.snap_round(0.1 + 0.2, 0.1, grid.DOWN) == 0.3
    with pytest.raises(ValueError, match="nan"):
        grid.snap_round_dec(float("nan"), Decimal("0.01"), grid.DOWN)
