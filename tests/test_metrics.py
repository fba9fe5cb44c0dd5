"""metrics.py: each statistic against its definition computed by hand or with the standard library."""
from __future__ import annotations

import json
import math
import statistics
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

import metrics


def days(values, start="2026-01-01"):
    return pd.Series(values, index=pd.date_range(start, periods=len(values), freq="D", tz="UTC"), dtype=float)


def trades_frame(pnls, regimes=None, sides=None, hours=None):
    n = len(pnls)
    entry = pd.date_range("2026-01-01", periods=n, freq="D", tz="UTC")
    return pd.DataFrame({
        "pnl": pnls, "fees": [1.0] * n, "funding": [0.0] * n, "qty": [2.0] * n,
        "entry_price": [100.0] * n, "exit_price": [101.0] * n,
        "regime": regimes or ["maker"] * n, "side": sides or ["long"] * n,
        "entry_time": entry, "exit_time": entry + pd.to_timedelta(hours or [1.0] * n, unit="h"),
        "exit_reason": ["take_profit" if p > 0 else "stop_loss" for p in pnls]})


def test_sharpe_matches_its_definition_with_365_days():
    r = [0.01, -0.02, 0.015, 0.003, -0.001]
    expected = statistics.mean(r) / statistics.stdev(r) * math.sqrt(365)
    assert metrics.sharpe(pd.Series(r)) == pytest.approx(expected)
    assert math.isnan(metrics.sharpe([0.01])) and math.isnan(metrics.sharpe([0.01, 0.01]))


def test_sortino_uses_downside_deviation_over_all_days():
    r = [0.01, -0.02, 0.015, 0.003, -0.001]
    downside = math.sqrt((0.02 ** 2 + 0.001 ** 2) / 5)
    assert metrics.sortino(r) == pytest.approx(statistics.mean(r) / downside * math.sqrt(365))
    assert math.isnan(metrics.sortino([0.01, 0.02]))


def test_daily_returns_use_each_days_last_mark_and_the_initial_equity():
    idx = pd.to_datetime(["2026-01-01 10:00", "2026-01-01 23:55", "2026-01-02 05:00", "2026-01-02 23:55"], utc=True)
    eq = pd.Series([900.0, 1100.0, 1000.0, 990.0], index=idx)
    r = metrics.daily_returns(eq, 1000.0)
    assert list(r.round(12)) == [0.1, round(990 / 1100 - 1, 12)]


def test_bar_returns_start_from_initial_equity():
    eq = days([101.0, 99.99, 102.0])
    r = metrics.bar_returns(eq, 100.0)
    np.testing.assert_allclose(r, [0.01, 99.99 / 101 - 1, 102 / 99.99 - 1])


def test_max_drawdown_depth_and_longest_time_under_water():
    dd, duration = metrics.max_drawdown(days([100, 120, 90, 95, 130, 100]))
    assert dd == pytest.approx(90 / 120 - 1)
    assert duration == pd.Timedelta(days=3)
    dd, duration = metrics.max_drawdown(days([100, 101, 102]))
    assert dd == 0.0 and duration == pd.Timedelta(0)
    _, duration = metrics.max_drawdown(days([100, 90, 95, 96, 97]))
    assert duration == pd.Timedelta(days=4)


def test_cagr_and_calmar():
    assert metrics.cagr(100.0, 200.0, 365.0) == pytest.approx(1.0)
    assert metrics.cagr(100.0, 121.0, 730.0) == pytest.approx(0.1)
    assert math.isnan(metrics.cagr(100.0, 130.0, 0.5))  # 11 hours never annualise
    assert metrics.cagr(100.0, -5.0, 10.0) == -1.0
    assert metrics.calmar(0.3, -0.15) == pytest.approx(2.0)
    assert math.isnan(metrics.calmar(0.3, 0.0))


def test_trade_stats():
    s = metrics.trade_stats(trades_frame([10.0, -5.0, 20.0, -5.0], hours=[1, 2, 3, 6]))
    assert s["trades"] == 4 and s["win_rate"] == 0.5
    assert s["profit_factor"] == pytest.approx(3.0) and s["expectancy"] == pytest.approx(5.0)
    assert s["avg_win"] == 15.0 and s["avg_loss"] == -5.0 and s["fees"] == 4.0
    assert s["avg_holding_hours"] == pytest.approx(3.0)
    empty = metrics.trade_stats(trades_frame([]))
    assert empty["trades"] == 0 and math.isnan(empty["win_rate"]) and math.isnan(empty["profit_factor"])
    assert math.isnan(metrics.trade_stats(trades_frame([1.0, 2.0]))["profit_factor"])


def test_turnover_counts_both_legs():
    assert metrics.turnover(trades_frame([1.0, -1.0])) == pytest.approx(2 * 2.0 * (100 + 101))


def test_compute_metrics_overall_and_splits():
    idx = pd.date_range("2026-01-01", periods=8 * 288, freq="5min", tz="UTC")
    equity = pd.DataFrame({"equity": np.linspace(10_000, 11_000, len(idx)), "positions": [1, 0] * (len(idx) // 2),
                           "exposure": 0.5}, index=idx)
    trades = trades_frame([30.0, -10.0, 50.0], regimes=["maker", "taker", "taker"], sides=["long", "short", "long"])
    result = SimpleNamespace(equity=equity, trades=trades, initial_equity=10_000.0,
                             counters={"rejected_postonly": 2})
    m = metrics.compute_metrics(result)
    assert m["total_return"] == pytest.approx(0.1) and m["final_equity"] == pytest.approx(11_000)
    assert m["days"] == pytest.approx(8.0) and m["max_drawdown"] == 0.0
    assert m["exposure"] == pytest.approx(0.5) and m["avg_leverage"] == pytest.approx(0.5)
    assert m["maker_trades"] == 1 and m["taker_trades"] == 2 and m["taker_profit_factor"] == pytest.approx(5.0)
    assert m["long_net_pnl"] == 80.0 and m["short_win_rate"] == 0.0
    assert m["exit_reasons"] == {"take_profit": 2, "stop_loss": 1}
    assert m["count_rejected_postonly"] == 2
    daily = metrics.daily_returns(equity["equity"], 10_000.0)
    assert m["sharpe"] == pytest.approx(metrics.sharpe(daily)) and np.isfinite(m["sharpe"])
    short = SimpleNamespace(equity=equity.iloc[: 4 * 288], trades=trades, initial_equity=10_000.0)
    assert math.isnan(metrics.compute_metrics(short)["sharpe"])  # 4 daily returns make no Sharpe ratio


def test_to_json_writes_undefined_values_as_null():
    text = metrics.to_json({"a": math.nan, "b": 1.5, "c": {"d": math.inf}})
    assert json.loads(text) == {"a": None, "b": 1.5, "c": {"d": None}}


def liquidity_case(scale=1.0):
    """Three 1m bars and three trades whose shares are worked out by hand below."""
    bars = pd.DataFrame({"volume": [10.0, 20.0, 0.0], "ob_ask_depth_mean": [100.0, 50.0, 80.0],
                         "ob_bid_depth_mean": [200.0, 40.0, 10.0]},
                        index=pd.date_range("2026-01-01", periods=3, freq="min", tz="UTC"))
    t0 = pd.Timestamp("2026-01-01", tz="UTC")
    trades = pd.DataFrame({"side": ["long", "short", "long"], "qty": [5.0 * scale, 8.0 * scale, 4.0 * scale],
                           "entry_time": [t0 + pd.Timedelta(seconds=30), t0 + pd.Timedelta(minutes=1),
                                          t0 + pd.Timedelta(seconds=130)]})
    return trades, bars


def test_liquidity_share_takes_the_book_side_a_market_entry_takes_at_its_entry_bar():
    trades, bars = liquidity_case()
    m = metrics.liquidity_share(trades, bars)
    # long 5 vs asks 100 (bar 0); short 8 vs bids 40 (bar 1, entered at its open); long 4 vs asks 80 (bar 2)
    assert m["depth_share_median"] == pytest.approx(0.05) and m["depth_share_max"] == pytest.approx(0.2)
    assert m["trades_over_depth_share"] == 1
    assert m["volume_share_median"] == pytest.approx(0.5)   # 5/10, 8/20, 4/0 (no volume: unbounded)
    assert metrics.liquidity_warning({**m, "trades": 3}) == ""


def test_liquidity_warning_names_the_shares_when_the_median_order_is_a_real_share_of_the_book():
    trades, bars = liquidity_case(scale=4.0)
    text = metrics.liquidity_warning({**metrics.liquidity_share(trades, bars), "trades": 3})
    assert "median order was 20% of the book depth" in text and "max 80%" in text and "3 of 3 trades" in text


def test_liquidity_share_is_nan_without_book_columns_or_trades():
    trades, bars = liquidity_case()
    assert math.isnan(metrics.liquidity_share(trades, bars[["volume"]])["depth_share_median"])
    assert metrics.liquidity_share(trades.iloc[:0], bars)["trades_over_depth_share"] == 0
    bars.loc[bars.index[1], "ob_bid_depth_mean"] = np.nan   # bar 1 had no book sample: its trade is left out
    m = metrics.liquidity_share(trades, bars)
    assert m["depth_share_max"] == pytest.approx(0.05) and m["trades_over_depth_share"] == 0
