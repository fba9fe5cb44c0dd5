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


@pytest.mark.parametrize("tick", TICKS + ["0.50", "10", "0.001"])
def test_exchange_wire_strings_equal_decimal_formatting_for_every_grid_index(tick):
    """matching.Instrument prints prices and sizes with integer arithmetic; Decimal is the reference."""
    from matching import Instrument
    t = Decimal(tick)
    inst = Instrument("X", tick_size=t, qty_step=t, min_qty=t, min_notional=Decimal(5))
    decimals = max(0, -t.normalize().as_tuple().exponent)
    for k in [*range(-1200, 1200), 10**9 + 7, -(10**12) - 3, np.int64(123456)]:
        want = f"{Decimal(int(k)) * t:.{decimals}f}"
        assert inst.price_str(k) == want and inst.qty_str(k) == want, (tick, k)
    with pytest.raises(TypeError):
        inst.price_str(3.0)


@pytest.mark.parametrize("tick", ["0.01", "0.5", "0.0001"])
def test_book_levels_print_each_price_and_size_by_the_scalar_rule(tick):
    """Instrument.level_arrays (vectorised) printed by the cached price_strs/qty_strs equals price_str(to_ticks(p))
    and qty_str(floor lots) per level."""
    from matching import Instrument
    t = Decimal(tick)
    inst = Instrument("X", tick_size=t, qty_step=Decimal("0.001"), min_qty=t, min_notional=Decimal(5))
    ks, prices = grid_prices(t, np.random.default_rng(5))
    sizes = np.random.default_rng(6).uniform(0, 50, len(prices)).round(3) * np.where(np.arange(len(prices)) % 3, 1, 1 - 1e-15)
    for _ in range(2):   # the second pass is served from the string cache
        got = [[inst.price_strs(k), inst.qty_strs(q)] for k, q in zip(*inst.level_arrays(np.array(prices), sizes))]
        assert got == [[inst.price_str(inst.to_ticks(p)), inst.qty_str(inst.to_lots_floor(q + 1e-12))]
                       for p, q in zip(prices, sizes)]
