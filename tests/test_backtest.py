"""backtest.py: agreement with an independent reference simulator, hand-computed fills, invariants, CLI."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

import backtest
import strategy as st
from config import GlobalConfig
from reference_sim import reference_backtest

MAKER, TAKER = 0.0002, 0.00055


# ---------------------------------------------------------------- helpers
def make_cfg(**settings) -> GlobalConfig:
    """Defaults with zero slippage and latency; each setting goes to cfg.venue or cfg.strategy by name."""
    cfg = GlobalConfig()
    base = {"slippage_bps": 0.0, "latency_ms": 0.0}
    for key, value in {**base, **settings}.items():
        setattr(cfg.venue if hasattr(cfg.venue, key) else cfg.strategy, key, value)
    cfg.validate()
    return cfg


def random_market(n_fine: int, seed: int, per_bar: int = 5, start: str = "2026-03-01 20:00"):
    """1m random walk with gaps, rounded to ticks, and its 5m aggregate with ATR and random probabilities."""
    rng = np.random.default_rng(seed)
    vol = 0.0025
    o = np.empty(n_fine)
    c = np.empty(n_fine)
    price = 100.0
    for k in range(n_fine):
        gap = rng.normal(0, 4 * vol) if rng.random() < 0.03 else 0.0
        o[k] = price * math.exp(gap)
        c[k] = o[k] * math.exp(rng.normal(0, vol))
        price = c[k]
    h = np.maximum(o, c) * np.exp(np.abs(rng.normal(0, vol * 0.6, n_fine)))
    lo = np.minimum(o, c) * np.exp(-np.abs(rng.normal(0, vol * 0.6, n_fine)))
    fine_idx = pd.date_range(start, periods=n_fine, freq="1min", tz="UTC")
    fine = pd.DataFrame({"open": o, "high": h, "low": lo, "close": c}, index=fine_idx).round(2)
    coarse = fine.resample("5min").agg({"open": "first", "high": "max", "low": "min", "close": "last"})
    coarse["atr"] = (coarse["high"] - coarse["low"]).rolling(6).mean()
    probs = pd.DataFrame(rng.uniform(0, 1, (len(coarse), 4)), index=coarse.index, columns=backtest.PROB_COLUMNS)
    probs.iloc[rng.random(len(coarse)) < 0.02] = np.nan
    return coarse, probs, fine


def check_invariants(result: backtest.BacktestResult, cfg: GlobalConfig) -> None:
    """What must hold on every run: accounting identity, caps, fee arithmetic, stop and TP prices."""
    s = cfg.venue
    eq = result.equity
    np.testing.assert_allclose(eq["equity"], eq["cash"] + eq["upnl"], rtol=0, atol=1e-7)
    assert eq["positions"].max() <= cfg.strategy.max_positions
    tr = result.trades
    if len(tr):
        entry_rate = np.where(tr["regime"] == "maker", s.maker_fee, s.taker_fee)
        exit_rate = np.where(tr["exit_reason"] == "take_profit", s.maker_fee, s.taker_fee)
        np.testing.assert_allclose(tr["entry_fee"], tr["qty"] * tr["entry_price"] * entry_rate, rtol=1e-12)
        np.testing.assert_allclose(tr["exit_fee"], tr["qty"] * tr["exit_price"] * exit_rate, rtol=1e-12)
        assert (tr["exit_time"] >= tr["entry_time"]).all()
        longs, shorts = tr["side"] == "long", tr["side"] == "short"
        stops = tr["exit_reason"] == "stop_loss"
        assert (tr.loc[stops & longs, "exit_price"] <= tr.loc[stops & longs, "stop_loss"] + 1e-9).all()
        assert (tr.loc[stops & shorts, "exit_price"] >= tr.loc[stops & shorts, "stop_loss"] - 1e-9).all()
        tps = tr["exit_reason"] == "take_profit"
        np.testing.assert_allclose(tr.loc[tps, "exit_price"], tr.loc[tps, "take_profit"], rtol=1e-12)
        notional = tr["qty"] * tr["entry_price"]
        assert (notional >= cfg.instrument.min_notional - 1e-9).all()
    final = eq["equity"].iloc[-1]
    assert final == pytest.approx(s.initial_equity + tr["pnl"].sum(), abs=1e-6)
    assert result.metrics["final_equity"] == pytest.approx(final)


def run_both(coarse, probs, cfg, fine=None):
    result = backtest.run_backtest(coarse, probs, cfg, fine=fine, record_intents=True)
    check_invariants(result, cfg)
    ref_trades, ref_eq, ref_intents, rejected = reference_backtest(coarse, probs, cfg, fine=fine)
    return result, ref_trades, ref_eq, ref_intents, rejected


def assert_same_trades(result, ref_trades):
    core = result.trades.sort_values(["exit_time", "entry_time", "side"]).reset_index(drop=True)
    ref = pd.DataFrame(ref_trades)
    assert len(core) == len(ref), f"core {len(core)} trades, reference {len(ref)}"
    ref["exit_time"] = pd.to_datetime((ref["exit_time"] * 1000).round().astype(np.int64), unit="ms", utc=True)
    ref["entry_time"] = pd.to_datetime((ref["entry_time"] * 1000).round().astype(np.int64), unit="ms", utc=True)
    ref["side"] = np.where(ref["side"] == 1, "long", "short")
    ref = ref.sort_values(["exit_time", "entry_time", "side"]).reset_index(drop=True)
    assert list(core["exit_reason"]) == list(ref["reason"])
    assert list(core["regime"]) == list(ref["regime"])
    assert list(core["side"]) == list(ref["side"])
    assert (core["entry_time"] == ref["entry_time"]).all() and (core["exit_time"] == ref["exit_time"]).all()
    for a, b in (("qty", "qty"), ("entry_price", "entry_price"), ("exit_price", "exit_price"),
                 ("pnl", "pnl"), ("fees", None), ("funding", "funding")):
        expected = ref["entry_fee"] + ref["exit_fee"] if b is None else ref[b]
        np.testing.assert_allclose(core[a], expected, rtol=1e-9, atol=1e-9, err_msg=a)


RANDOM_CASES = {
    "defaults": {},
    "touch_slippage_funding_kill": {"fill_rule": "touch", "slippage_bps": 3.0, "funding_rate_8h": 0.0003,
                                    "daily_loss_limit": 0.015, "max_positions": 2, "risk_per_trade": 0.02},
    "tight_leverage_long_hold": {"max_leverage": 1.0, "max_holding_bars": 400, "time_limit_bars": 3,
                                 "aggressive_threshold": 0.95, "exec_threshold": 0.5, "limit_offset_atr": 0.1},
    "wide_offset_rebate": {"limit_offset_atr": 1.5, "maker_fee": -0.0001, "take_profit_atr": 3.0,
                           "stop_loss_atr": 0.8, "max_positions": 5, "max_holding_bars": 6},
}


@pytest.mark.parametrize("name", list(RANDOM_CASES))
def test_core_agrees_with_reference_trade_for_trade(name):
    coarse, probs, _ = random_market(12000, seed=len(name))
    cfg = make_cfg(**RANDOM_CASES[name])
    result, ref_trades, ref_eq, ref_intents, rejected = run_both(coarse, probs, cfg)
    assert len(ref_trades) > 30
    assert_same_trades(result, ref_trades)
    np.testing.assert_allclose(result.equity["equity"], [r["equity"] for r in ref_eq], rtol=1e-9)
    assert result.counters["rejected_postonly"] == rejected
    assert len(result.intents) == len(ref_intents)
    assert result.counters["intrabar_kills"] > 0      # the reference agrees on intrabar kill-switch flattens too


@pytest.mark.parametrize("latency_ms", [250.0, 130_000.0])
def test_core_agrees_with_reference_using_fine_bars(latency_ms):
    coarse, probs, fine = random_market(15000, seed=11)
    fine = fine.drop(fine.index[600:900])
    cfg = make_cfg(latency_ms=latency_ms, slippage_bps=2.0, daily_loss_limit=0.02, max_holding_bars=24)
    result, ref_trades, ref_eq, _, rejected = run_both(coarse, probs, cfg, fine=fine)
    assert len(ref_trades) > 30
    assert_same_trades(result, ref_trades)
    np.testing.assert_allclose(result.equity["equity"], [r["equity"] for r in ref_eq], rtol=1e-9)
    assert result.counters["rejected_postonly"] == rejected
    assert result.counters["fine_resolved_exits"] > 0 and result.counters["intrabar_kills"] > 0


def _records(slots, resting):
    positions = [st.Position(p.side, p.qty, p.entry, p.tp, p.sl, p.fill_bar) for p in slots if p is not None]
    slot_of = [k for k, p in enumerate(slots) if p is not None]
    orders = [st.RestingOrder(o.side, o.price, o.qty, o.placed, o.tp_dist, o.sl_dist)
              for o in resting.values() if o is not None]
    return positions, orders, slot_of


def test_strategy_decide_and_core_agree_intent_for_intent():
    coarse, probs, fine = random_market(15000, seed=5)
    cfg = make_cfg(daily_loss_limit=0.01, risk_per_trade=0.01, time_limit_bars=4, max_holding_bars=20)
    day = st.DayState()
    decided = []

    def via_strategy(i, t, close, atr, pr, equity, slots, resting, own):
        positions, orders, slot_of = _records(slots, resting)
        bar = st.Bar(index=i, time=float(t), close=close, atr=atr, probs=pr)
        intents = st.decide(bar, positions, orders, equity, day, cfg.strategy, cfg.instrument)
        for it in intents:
            ref = slot_of[it.ref] if it.kind == "exit" else -1
            decided.append((i, it.kind, it.side, ref, it.qty, it.price, it.reason))
        assert [(x.kind, x.side, x.reason) for x in intents] == [(o[0], o[1], o[7]) for o in own]

    reference_backtest(coarse, probs, cfg, fine=fine, check_decide=via_strategy)
    run = backtest.run_backtest(coarse, probs, cfg, fine=fine, record_intents=True)
    core = run.intents
    assert len(core) == len(decided) > 100
    assert set(core["reason"]) >= {"chop", "breakout", "expired", "time"}
    assert run.counters["intrabar_kills"] > 0      # decide then sees the day halted after an intrabar flatten
    for row, d in zip(core.itertuples(), decided):
        assert (row.bar, row.kind, row.side, row.ref if row.kind == "exit" else -1, row.reason) == \
            (d[0], d[1], d[2], d[3], d[6])
        assert row.qty == pytest.approx(d[4], rel=1e-12) and row.price == pytest.approx(d[5], rel=1e-12)


# ---------------------------------------------------------------- hand-computed scenarios
def bars(rows, start="2026-01-05 00:00", freq="5min", atr=1.0):
    """Bars from (open, high, low, close) tuples with a constant ATR."""
    idx = pd.date_range(start, periods=len(rows), freq=freq, tz="UTC")
    df = pd.DataFrame(rows, columns=["open", "high", "low", "close"], index=idx, dtype=float)
    df["atr"] = atr
    return df


def probs_for(frame, **at):
    """Zero probabilities except {bar: {column: value}}."""
    p = pd.DataFrame(0.0, index=frame.index, columns=backtest.PROB_COLUMNS)
    for bar, values in at.items():
        for col, value in values.items():
            p.iloc[int(bar[1:]), p.columns.get_loc(col)] = value
    return p


LONG_LIMIT = {"p_exec_long": 0.9, "p_dir_long": 0.6}
LONG_BREAKOUT = {"p_dir_long": 0.9}
FLAT = (100.0, 100.2, 99.8, 100.0)


def test_gap_through_stop_fills_at_the_open():
    frame = bars([FLAT, (100.0, 100.1, 99.4, 99.8), (97.0, 97.2, 96.8, 97.0), (97.0, 97.1, 96.9, 97.0)])
    cfg = make_cfg()
    r = backtest.run_backtest(frame, probs_for(frame, b0=LONG_LIMIT), cfg)
    check_invariants(r, cfg)
    t = r.trades.iloc[0]
    assert len(r.trades) == 1 and t.exit_reason == "stop_loss" and t.regime == "maker"
    assert t.qty == pytest.approx(50.0) and t.entry_price == pytest.approx(99.5)
    assert t.stop_loss == pytest.approx(97.5) and t.exit_price == pytest.approx(97.0)
    assert t.pnl == pytest.approx(50 * (97.0 - 99.5) - 50 * 99.5 * MAKER - 50 * 97.0 * TAKER)


def test_closed_entry_gate_blocks_the_entry_and_only_at_its_bar():
    frame = bars([FLAT, (100.0, 100.1, 99.4, 99.8), FLAT, FLAT])
    p = probs_for(frame, b0=LONG_BREAKOUT)
    gate = np.array([False, True, True, True])
    assert len(backtest.run_backtest(frame, p, make_cfg()).trades) == 1
    assert len(backtest.run_backtest(frame, p, make_cfg(), entries_allowed=gate).trades) == 0
    later = probs_for(frame, b1=LONG_BREAKOUT)
    assert len(backtest.run_backtest(frame, later, make_cfg(), entries_allowed=gate).trades) == 1
    with pytest.raises(ValueError, match="one flag per bar"):
        backtest.run_backtest(frame, p, make_cfg(), entries_allowed=gate[:3])


def test_same_bar_tp_and_stop_assumes_the_stop_without_finer_bars():
    frame = bars([FLAT, (100.0, 100.1, 99.4, 99.8), (99.6, 101.0, 97.0, 99.0), FLAT])
    r = backtest.run_backtest(frame, probs_for(frame, b0=LONG_LIMIT), make_cfg())
    t = r.trades.iloc[0]
    assert t.exit_reason == "stop_loss" and t.exit_price == pytest.approx(97.5)
    assert t.pnl == pytest.approx(50 * -2.0 - 50 * 99.5 * MAKER - 50 * 97.5 * TAKER)


def test_same_bar_tp_and_stop_resolved_by_finer_bars():
    frame = bars([FLAT, (100.0, 100.1, 99.4, 99.8), (99.6, 101.0, 97.0, 99.0), FLAT])
    minute = pd.date_range(frame.index[2], periods=5, freq="1min", tz="UTC")
    fine = pd.DataFrame([(99.6, 101.0, 99.5, 100.9), (100.9, 100.9, 97.0, 97.2), (97.2, 99, 97.1, 98.0),
                         (98, 99, 98, 99), (99, 99, 99, 99)], index=minute, columns=backtest.PRICE_COLUMNS)
    r = backtest.run_backtest(frame, probs_for(frame, b0=LONG_LIMIT), make_cfg(), fine=fine)
    t = r.trades.iloc[0]
    assert t.exit_reason == "take_profit" and t.exit_price == pytest.approx(100.7)
    assert t.exit_time == minute[0]
    assert t.pnl == pytest.approx(50 * 1.2 - 50 * 99.5 * MAKER - 50 * 100.7 * MAKER)
    assert r.counters["fine_resolved_exits"] == 1


def test_take_profit_needs_a_later_bar_after_the_fill_without_finer_bars():
    frame = bars([FLAT, (100.0, 101.0, 99.4, 100.0), (100.0, 100.8, 99.9, 100.5), FLAT])
    r = backtest.run_backtest(frame, probs_for(frame, b0=LONG_LIMIT), make_cfg())
    t = r.trades.iloc[0]
    assert t.exit_reason == "take_profit" and t.entry_bar == 1 and t.exit_bar == 2


def test_finer_bars_allow_take_profit_on_the_fill_bar_only_after_the_fill():
    frame = bars([FLAT, (100.0, 101.0, 99.4, 100.0), FLAT, FLAT])
    minute = pd.date_range(frame.index[1], periods=5, freq="1min", tz="UTC")
    fine = pd.DataFrame([(100.0, 100.9, 99.9, 100.0), (100.0, 100.0, 99.4, 99.6), (99.6, 101.0, 99.6, 100.9),
                         (100.9, 100.9, 100.0, 100.0), (100, 100, 100, 100)], index=minute,
                        columns=backtest.PRICE_COLUMNS)
    r = backtest.run_backtest(frame, probs_for(frame, b0=LONG_LIMIT), make_cfg(), fine=fine)
    t = r.trades.iloc[0]
    assert t.entry_time == minute[1] and t.exit_time == minute[2] and t.exit_reason == "take_profit"


@pytest.mark.parametrize("next_open,filled", [(100.0, False), (99.9, False), (100.1, True)])
def test_postonly_that_would_cross_is_rejected(next_open, filled):
    frame = bars([FLAT, (next_open, 100.5, 99.5, 100.0), FLAT, FLAT])
    cfg = make_cfg(limit_offset_atr=0.0)
    r = backtest.run_backtest(frame, probs_for(frame, b0=LONG_LIMIT), cfg)
    assert r.counters["rejected_postonly"] == (0 if filled else 1)
    assert len(r.trades) == (1 if filled else 0)
    if filled:
        assert r.trades.iloc[0].entry_price == pytest.approx(100.0) and r.trades.iloc[0].regime == "maker"


def test_trade_through_needs_price_beyond_the_limit_and_touch_does_not():
    frame = bars([FLAT, (100.0, 100.1, 99.5, 99.8), FLAT, FLAT])
    assert len(backtest.run_backtest(frame, probs_for(frame, b0=LONG_LIMIT), make_cfg()).trades) == 0
    touched = backtest.run_backtest(frame, probs_for(frame, b0=LONG_LIMIT), make_cfg(fill_rule="touch"))
    assert len(touched.trades) == 1 and touched.trades.iloc[0].entry_price == pytest.approx(99.5)


def test_breakout_market_entry_fee_slippage_and_end_of_data_close():
    frame = bars([FLAT, (100.2, 100.4, 100.0, 100.3), (100.3, 100.6, 100.1, 100.5)])
    cfg = make_cfg(slippage_bps=1.0)
    r = backtest.run_backtest(frame, probs_for(frame, b0=LONG_BREAKOUT), cfg)
    check_invariants(r, cfg)
    t = r.trades.iloc[0]
    entry = 100.2 * 1.0001
    exit_ = 100.5 * 0.9999
    assert t.regime == "taker" and t.exit_reason == "end_of_data"
    assert t.entry_price == pytest.approx(entry) and t.exit_price == pytest.approx(exit_)
    assert t.take_profit == 112.22 and t.qty == pytest.approx(50.0)   # fill + 1.2·10 ATR = 112.21002, tick away
    assert t.stop_loss == 98.0                             # decision close - 2 ATR: where the exchange stop is attached
    assert t.fees == pytest.approx(50 * entry * TAKER + 50 * exit_ * TAKER)
    assert t.exit_time == frame.index[-1] + pd.Timedelta("5min")
    assert r.equity["upnl"].iloc[-1] == 0.0
    np.testing.assert_allclose(r.bar_returns(), r.equity["equity"] / r.equity["equity"].shift(1, fill_value=10000) - 1)
    assert r.metrics["final_equity"] == pytest.approx(10000 + 50 * (exit_ - entry) - t.fees)


def test_market_latency_uses_the_fine_bar_it_lands_in():
    frame = bars([FLAT, (100.0, 101.0, 99.9, 100.8), FLAT])
    minute = pd.date_range(frame.index[1], periods=5, freq="1min", tz="UTC")
    fine = pd.DataFrame([(100.0, 100.2, 99.9, 100.2), (100.2, 100.5, 100.2, 100.5), (100.5, 100.9, 100.4, 100.8),
                         (100.8, 101.0, 100.7, 100.9), (100.9, 100.9, 100.8, 100.8)], index=minute,
                        columns=backtest.PRICE_COLUMNS)
    r = backtest.run_backtest(frame, probs_for(frame, b0=LONG_BREAKOUT), make_cfg(latency_ms=150_000), fine=fine)
    t = r.trades.iloc[0]
    assert t.entry_price == pytest.approx(100.5) and t.entry_time == minute[2]


def test_leverage_cap_limits_the_size():
    frame = bars([FLAT, (100.0, 100.1, 99.4, 99.8), FLAT], atr=0.01)
    r = backtest.run_backtest(frame, probs_for(frame, b0=LONG_LIMIT), make_cfg())
    t = r.trades.iloc[0]
    assert t.entry_price == pytest.approx(99.99)
    assert t.qty == pytest.approx(math.floor(5 * 10000 / 99.99 * 1000) / 1000)
    assert t.qty * t.entry_price <= 5 * 10000


def test_time_exit_at_next_open_after_max_holding_bars():
    frame = bars([FLAT, (100.0, 100.1, 99.4, 99.8), FLAT, FLAT, (100.1, 100.2, 99.9, 100.0), FLAT])
    r = backtest.run_backtest(frame, probs_for(frame, b0=LONG_LIMIT), make_cfg(max_holding_bars=2))
    t = r.trades.iloc[0]
    assert t.exit_reason == "time" and t.exit_bar == 4 and t.exit_price == pytest.approx(100.1)
    assert t.exit_fee == pytest.approx(50 * 100.1 * TAKER)


def test_resting_entry_expires_after_time_limit():
    frame = bars([FLAT, FLAT, FLAT, (100.0, 100.1, 99.0, 99.8), FLAT])
    assert len(backtest.run_backtest(frame, probs_for(frame, b0=LONG_LIMIT), make_cfg(time_limit_bars=2)).trades) == 0
    assert len(backtest.run_backtest(frame, probs_for(frame, b0=LONG_LIMIT), make_cfg(time_limit_bars=3)).trades) == 1


KILL_ROWS = [FLAT, (100.0, 100.1, 99.4, 99.8), (99.0, 99.1, 98.0, 98.0), (98.1, 98.2, 98.0, 98.1),
             (98.1, 98.2, 98.0, 98.1), (98.1, 98.2, 98.0, 98.1), (98.1, 98.2, 97.0, 97.5), FLAT]
# long 100 @ 99.5 (maker fee 1.99): equity(P) = 10000 - 1.99 + 100 (P - 99.5) meets 99 % of 10000 at P*
KILL_AT = (9_900.0 - (10_000.0 - 100 * 99.5 * MAKER) + 100 * 99.5) / 100


def kill_run(rows, fine=None, slippage_bps=0.0, start="2026-01-05 23:40"):
    frame = bars(rows, start=start)
    cfg = make_cfg(risk_per_trade=0.02, daily_loss_limit=0.01, slippage_bps=slippage_bps)
    p = probs_for(frame, b0=LONG_LIMIT, b3=LONG_LIMIT, b4=LONG_LIMIT)
    r = backtest.run_backtest(frame, p, cfg, fine=fine, record_intents=True)
    check_invariants(r, cfg)
    return frame, r


def test_kill_switch_trigger_price_is_where_mark_to_market_equity_meets_the_limit():
    assert KILL_AT == pytest.approx(98.5199)
    trigger, direction = st.kill_trigger(np.array([1.0]), np.array([100.0]), np.array([99.5]),
                                         10_000.0 - 100 * 99.5 * MAKER, 10_000.0, 0.01)
    assert (trigger, direction) == (pytest.approx(KILL_AT, rel=1e-15), 1)


def test_kill_switch_flattens_inside_the_bar_whose_low_reaches_the_trigger_and_halts_until_the_next_utc_day():
    frame, r = kill_run(KILL_ROWS, slippage_bps=2.0)
    first = r.trades.iloc[0]
    exit_px = KILL_AT * (1 - 0.0002)                                   # the trigger, slippage against us
    assert first.exit_reason == "kill_switch" and first.exit_bar == 2 and first.exit_time == frame.index[2]
    assert first.exit_price == pytest.approx(exit_px, rel=1e-12)
    assert first.pnl == pytest.approx(100 * (exit_px - 99.5) - 100 * 99.5 * MAKER - 100 * exit_px * TAKER)
    assert r.equity["equity"].iloc[2] == pytest.approx(9_900.0 - 100 * KILL_AT * 0.0002 - 100 * exit_px * TAKER)
    assert r.counters["intrabar_kills"] == 1
    assert not (r.intents["reason"] == "kill_switch").any()           # flattened in the bar, not at its close
    placed = r.intents[r.intents["kind"] == "limit"]
    assert list(placed["bar"]) == [0, 4]                               # b3's signal is ignored: halted
    assert frame.index[4] == pd.Timestamp("2026-01-06 00:00", tz="UTC")
    assert len(r.trades) == 2 and r.trades.iloc[1].entry_bar == 6


def test_a_bar_that_stays_above_the_trigger_keeps_the_position():
    _, r = kill_run(KILL_ROWS[:2] + [(99.0, 99.1, 98.53, 98.6)] * 6)
    assert r.counters["intrabar_kills"] == 0
    assert list(r.trades["exit_reason"]) == ["end_of_data"] and r.trades.iloc[0].exit_bar == 7


def test_a_bar_that_opens_beyond_the_trigger_flattens_at_its_open():
    rows = list(KILL_ROWS)
    rows[2] = (98.3, 98.4, 98.0, 98.1)
    _, r = kill_run(rows)
    first = r.trades.iloc[0]
    assert first.exit_reason == "kill_switch" and first.exit_bar == 2 and first.exit_price == pytest.approx(98.3)


def test_finer_bars_place_the_kill_switch_flatten_in_the_minute_that_reaches_the_trigger():
    frame = bars(KILL_ROWS, start="2026-01-05 23:40")
    minute = pd.date_range(frame.index[2], periods=5, freq="1min", tz="UTC")
    fine = pd.DataFrame([(99.0, 99.1, 98.9, 98.9), (98.9, 98.9, 98.6, 98.6), (98.6, 98.6, 98.5, 98.5),
                         (98.5, 98.5, 98.0, 98.0), (98.0, 98.1, 98.0, 98.0)], index=minute,
                        columns=backtest.PRICE_COLUMNS)
    _, r = kill_run(KILL_ROWS, fine=fine)
    first = r.trades.iloc[0]
    assert first.exit_reason == "kill_switch" and first.exit_time == minute[2]
    assert first.exit_price == pytest.approx(KILL_AT, rel=1e-12)


def test_the_stop_fills_first_when_the_bar_reaches_stop_and_trigger():
    rows = list(KILL_ROWS)
    rows[2] = (99.0, 99.1, 97.0, 97.2)                                  # through the trigger and the stop at 97.5
    _, r = kill_run(rows)
    first = r.trades.iloc[0]
    assert first.exit_reason == "stop_loss" and first.exit_bar == 2 and first.exit_price == pytest.approx(97.5)
    assert r.counters["intrabar_kills"] == 1                          # flat and below the limit: halted
    assert list(r.intents.loc[r.intents["kind"] == "limit", "bar"]) == [0, 4]


def test_funding_is_charged_at_the_8h_boundary():
    rows = [FLAT, (100.0, 100.1, 99.4, 99.8), (100.0, 100.1, 99.9, 100.0), (101.0, 101.1, 100.9, 101.0), FLAT]
    frame = bars(rows, start="2026-01-05 06:00", freq="1h")
    cfg = make_cfg(funding_rate_8h=0.0001)
    cfg.data.timeframe = "1h"
    r = backtest.run_backtest(frame, probs_for(frame, b0=LONG_LIMIT), cfg)
    check_invariants(r, cfg)
    t = r.trades.iloc[0]
    assert r.counters["funding_events"] == 1
    assert t.funding == pytest.approx(50 * 100.0 * 0.0001)
    assert t.pnl == pytest.approx(t.gross_pnl - t.fees - 50 * 100.0 * 0.0001)


def test_max_positions_counts_resting_entries():
    frame = bars([FLAT] * 6)
    short_limit = {"p_exec_short": 0.9, "p_dir_short": 0.6}
    p = probs_for(frame, b0=short_limit, b1=LONG_BREAKOUT, b2=LONG_BREAKOUT, b3=LONG_BREAKOUT)
    r = backtest.run_backtest(frame, p, make_cfg(max_positions=2, limit_offset_atr=5.0), record_intents=True)
    assert list(zip(r.intents["bar"], r.intents["kind"], r.intents["side"])) == [(0, "limit", -1), (1, "market", 1)]
    assert r.equity["positions"].max() == 1


def test_breakout_supersedes_the_resting_entry_of_its_side():
    frame = bars([FLAT] * 4)
    p = probs_for(frame, b0=LONG_LIMIT, b1=LONG_BREAKOUT)
    r = backtest.run_backtest(frame, p, make_cfg(limit_offset_atr=5.0), record_intents=True)
    assert list(zip(r.intents["bar"], r.intents["kind"], r.intents["reason"])) == \
        [(0, "limit", "chop"), (1, "cancel", "superseded"), (1, "market", "breakout")]
    assert list(r.trades["regime"]) == ["taker"]


def test_bad_inputs_are_refused_with_clear_messages():
    frame = bars([FLAT, FLAT])
    with pytest.raises(ValueError, match="atr"):
        backtest.run_backtest(frame.drop(columns="atr"), probs_for(frame), make_cfg())
    with pytest.raises(ValueError, match="p_dir_short"):
        backtest.run_backtest(frame, probs_for(frame).drop(columns="p_dir_short"), make_cfg())
    with pytest.raises(ValueError, match="timeframe"):
        backtest.run_backtest(bars([FLAT, FLAT], freq="1min"), probs_for(frame), make_cfg())
    broken = frame.copy()
    broken.iloc[1, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite price"):
        backtest.run_backtest(broken, probs_for(frame), make_cfg())


# ---------------------------------------------------------------- CLI
def _signals_csv(path, coarse, probs):
    df = pd.concat([coarse, probs], axis=1).dropna(subset=["atr"])
    df.index.name = "time"
    df.to_csv(path)


def test_cli_runs_on_a_signals_file_and_writes_outputs(tmp_path, capsys):
    coarse, probs, _ = random_market(3000, seed=3)
    sig = tmp_path / "signals.csv"
    _signals_csv(sig, coarse, probs.fillna(0.0))
    out = tmp_path / "out"
    rep = tmp_path / "report.html"
    code = backtest.main(["--signals", str(sig), "--out", str(out), "--report", str(rep)])
    assert code == 0
    fills = pd.read_csv(out / "trades.csv")
    closed = pd.read_csv(out / "closed_trades.csv")
    assert len(fills) == 2 * len(closed) > 0
    assert set(fills["reason"]) >= {"limit_entry", "stop_loss"}
    equity = pd.read_csv(out / "equity.csv", index_col="time")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["final_equity"] == pytest.approx(equity["equity"].iloc[-1])
    assert metrics["trades"] == len(closed)
    html = rep.read_text()
    assert "Simulation assumptions" in html and "Monthly returns" in html and "plotly" in html
    line = capsys.readouterr().out
    assert f"trades {len(closed)}" in line and "nan" not in line
    assert backtest.sharpe_text(metrics["sharpe"] if metrics["sharpe"] is not None else float("nan")) in line


def test_summary_sharpe_says_why_it_is_missing_instead_of_printing_nan():
    assert backtest.sharpe_text(1.234) == "sharpe 1.23"
    assert backtest.sharpe_text(float("nan")) == "sharpe n/a (under 7 daily returns)"


def test_cli_start_end_keep_whole_days(tmp_path):
    coarse, probs, _ = random_market(3000, seed=4)
    sig = tmp_path / "signals.csv"
    _signals_csv(sig, coarse, probs.fillna(0.0))
    out = tmp_path / "out"
    assert backtest.main(["--signals", str(sig), "--out", str(out), "--start", "2026-03-02",
                          "--end", "2026-03-02"]) == 0
    idx = pd.to_datetime(pd.read_csv(out / "equity.csv")["time"], utc=True)
    assert idx.min() == pd.Timestamp("2026-03-02", tz="UTC") and idx.max() == pd.Timestamp("2026-03-02 23:55",
                                                                                               tz="UTC")


@pytest.mark.parametrize("content,message", [
    ("time,p_exec_long,p_exec_short,p_dir_long\n2026-01-01,0.1,0.2,0.3\n", "p_dir_short"),
    ("time,p_exec_long,p_exec_short,p_dir_long,p_dir_short,open,high,low,close,atr\n"
     "2026-01-01 00:00,0.1,0.2,0.3,0.4,1,1,1,1,0.1\nnot-a-time,0.1,0.2,0.3,0.4,1,1,1,1,0.1\n", "line 3"),
    ("time,p_exec_long,p_exec_short,p_dir_long,p_dir_short,open,high,low,close,atr\n"
     "2026-01-01 00:00,0.1,0.2,1.3,0.4,1,1,1,1,0.1\n", "p_dir_long"),
])
def test_cli_bad_signals_exit_2_without_traceback(tmp_path, capsys, content, message):
    sig = tmp_path / "bad.csv"
    sig.write_text(content)
    assert backtest.main(["--signals", str(sig), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_without_signals_or_config_is_refused(tmp_path, capsys):
    assert backtest.main(["--out", str(tmp_path / "o")]) == 2
    assert "--signals" in capsys.readouterr().err


def test_cli_loads_bars_atr_and_1m_bars_from_a_data_folder(tmp_path, capsys):
    import market_sim
    folder = market_sim.simulate_run(days=1, out=tmp_path, levels=20, book_interval="10s", progress=False).folder
    times = pd.date_range("2026-01-01", periods=288, freq="5min", tz="UTC")
    rng = np.random.default_rng(0)
    sig = pd.DataFrame({"p_exec_long": rng.uniform(0.6, 1.0, 288), "p_exec_short": rng.uniform(0.6, 1.0, 288),
                        "p_dir_long": rng.uniform(0.5, 0.8, 288), "p_dir_short": rng.uniform(0.5, 0.8, 288)},
                       index=times)
    sig.index.name = "time"
    sig.to_csv(tmp_path / "signals.csv")
    out = tmp_path / "out"
    code = backtest.main(["--signals", str(tmp_path / "signals.csv"), "--data-dir", str(folder),
                          "--out", str(out), "--report", str(tmp_path / "r.html")])
    assert code == 0
    closed = pd.read_csv(out / "closed_trades.csv", parse_dates=["entry_time", "exit_time"])
    assert len(closed) > 0
    equity = pd.read_csv(out / "equity.csv")
    assert len(equity) > 250
    fills = pd.concat([closed["entry_time"], closed["exit_time"]])
    assert (fills.dt.minute % 5 != 0).any(), "1m bars were not used inside the 5m bars"
    m = json.loads((out / "metrics.json").read_text())   # the capacity check read the folder's book and volume
    assert 0 < m["depth_share_median"] <= m["depth_share_max"]
    assert ("warning: capacity" in capsys.readouterr().out) == (m["depth_share_median"] > 0.1)


def test_cli_reports_a_missing_data_folder_cleanly(tmp_path, capsys):
    sig = tmp_path / "signals.csv"
    sig.write_text("time,p_exec_long,p_exec_short,p_dir_long,p_dir_short\n2026-01-01 00:00,0.1,0.2,0.3,0.4\n")
    code = backtest.main(["--signals", str(sig), "--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "nowhere" in err and "Traceback" not in err


def btc_market(realdata):
    """Two hours of real Binance BTCUSDT trades as 1m bars with ATR, random probabilities, 10s fine bars,
    and a config that trades them often (1m timeframe, tick 0.01, 15 s latency)."""
    trades = pd.read_csv(realdata / "binance_usdm" / "tardis_BTCUSDT_trades_2020-02-22.csv.gz")
    price = pd.Series(trades["price"].to_numpy(float),
                      index=pd.to_datetime(trades["timestamp"], unit="us", utc=True))
    fine = price.resample("10s").ohlc().ffill()
    fine = fine.loc[fine.index.floor("1min")[0] + pd.Timedelta("1min"):]
    fine = fine.iloc[:len(fine) // 6 * 6]
    coarse = fine.resample("1min").agg({"open": "first", "high": "max", "low": "min", "close": "last"})
    coarse["atr"] = (coarse["high"] - coarse["low"]).rolling(5).mean()
    rng = np.random.default_rng(9)
    probs = pd.DataFrame(rng.uniform(0.3, 1.0, (len(coarse), 4)), index=coarse.index, columns=backtest.PROB_COLUMNS)
    cfg = make_cfg(take_profit_atr=0.8, stop_loss_atr=1.0, max_holding_bars=10, limit_offset_atr=0.2,
                   daily_loss_limit=0.5, latency_ms=15_000, slippage_bps=1.0)
    cfg.data.timeframe = "1m"
    cfg.instrument.tick_size = 0.01
    return coarse, probs, fine, cfg


def test_core_agrees_with_reference_on_real_btcusdt_trades(realdata):
    coarse, probs, fine, cfg = btc_market(realdata)
    for fine_bars in (None, fine):
        result, ref_trades, ref_eq, _, rejected = run_both(coarse, probs, cfg, fine=fine_bars)
        assert len(ref_trades) > 15
        assert_same_trades(result, ref_trades)
        np.testing.assert_allclose(result.equity["equity"], [r["equity"] for r in ref_eq], rtol=1e-9)
        assert result.counters["rejected_postonly"] == rejected


def test_report_monthly_returns_and_candle_thinning():
    import report
    idx = pd.to_datetime(["2026-01-10 00:00", "2026-01-31 23:55", "2026-02-15 00:00", "2026-02-28 23:55"], utc=True)
    table = report.monthly_returns(pd.Series([1_050.0, 1_100.0, 1_000.0, 990.0], index=idx), 1_000.0)
    assert table.loc[2026, 1] == pytest.approx(0.1) and table.loc[2026, 2] == pytest.approx(990 / 1100 - 1)
    assert table.loc[2026].isna().sum() == 10
    year = pd.DataFrame({"open": 1.0, "high": 2.0, "low": 0.5, "close": 1.5},
                        index=pd.date_range("2026-01-01", periods=105_120, freq="5min", tz="UTC"))
    shown = report._display_bars(year)
    assert len(shown) <= report.MAX_CANDLES and shown["high"].max() == 2.0 and shown["low"].min() == 0.5


@pytest.mark.parametrize("fill_rule", ["trade_through", "touch"])
def test_single_signal_outcomes_match_execution_labels(fill_rule):
    import labels
    coarse, _, _ = random_market(2500, seed=21)
    coarse = coarse.dropna(subset=["atr"])
    cfg = make_cfg(fill_rule=fill_rule, daily_loss_limit=0.99, time_limit_bars=4, max_holding_bars=12,
                   take_profit_atr=1.0, stop_loss_atr=1.5, limit_offset_atr=0.3)
    s = cfg.strategy
    cols = [coarse[c].to_numpy() for c in ("open", "high", "low", "close", "atr")]
    seen = set()
    for side, name in ((1, "long"), (-1, "short")):
        lab, _ = labels.execution_labels(*cols, side, s.limit_offset_atr, s.take_profit_atr, s.stop_loss_atr,
                                         s.time_limit_bars, s.max_holding_bars, cfg.venue.maker_fee, fill_rule,
                                         cfg.instrument.tick_size)
        for t in range(0, len(coarse) - 1, 7):
            p = probs_for(coarse, **{f"b{t}": {f"p_exec_{name}": 0.9, f"p_dir_{name}": 0.6}})
            r = backtest.run_backtest(coarse, p, cfg)
            reason = r.trades["exit_reason"].iloc[0] if len(r.trades) else "none"
            if lab[t] == -1:
                assert reason in ("end_of_data", "none"), (t, side, reason)
            else:
                assert (lab[t] == 1) == (reason == "take_profit"), (t, side, lab[t], reason)
            seen.add((int(lab[t]), reason))
    assert {(1, "take_profit"), (0, "stop_loss"), (0, "none")} <= seen
