"""strategy.decide: each regime, thresholds at their boundaries, caps, expiry, time exits, kill-switch, sizing."""
from __future__ import annotations

import math

import numpy as np
import pytest

import strategy as st
from config import InstrumentConfig, StrategyConfig

DAY0 = 1_767_225_600.0  # 2026-01-01 00:00 UTC


def cfg(**kw) -> StrategyConfig:
    return StrategyConfig(**kw)


def decide(probs, positions=(), resting=(), equity=10_000.0, close=100.0, atr=1.0, index=10, time=DAY0 + 3600,
           day=None, strategy=None, instrument=None, gate=None, bid_depth=math.nan, ask_depth=math.nan):
    day = day if day is not None else st.DayState()
    bar = st.Bar(index=index, time=time, close=close, atr=atr, probs=probs, bid_depth=bid_depth, ask_depth=ask_depth)
    return st.decide(bar, list(positions), list(resting), equity, day, strategy or cfg(),
                     instrument or InstrumentConfig(), gate)


def kinds(intents):
    return [(i.kind, i.side, i.reason) for i in intents]


def probs(el=0.0, es=0.0, dl=0.0, ds=0.0):
    return {"p_exec_long": el, "p_exec_short": es, "p_dir_long": dl, "p_dir_short": ds}


def pos(side=1, fill_bar=9, qty=1.0):
    return st.Position(side=side, qty=qty, entry_price=100.0, tp=101.2, sl=98.0, fill_bar=fill_bar)


def order(side=1, placed=9, qty=1.0, price=99.5):
    return st.RestingOrder(side=side, price=price, qty=qty, placed_bar=placed, tp_dist=1.2, sl_dist=2.0)


# ------------------------------------------------------------ regimes and thresholds
@pytest.mark.parametrize("p,expected", [
    (probs(dl=0.87), [("market", 1, "breakout")]),
    (probs(dl=0.8699999), []),
    (probs(ds=0.87), [("market", -1, "breakout")]),
    (probs(el=0.6, dl=0.5), [("limit", 1, "chop")]),
    (probs(el=0.5999999, dl=0.5), []),
    (probs(el=0.6, dl=0.4999999), []),
    (probs(es=0.6, ds=0.5), [("limit", -1, "chop")]),
    (probs(el=0.9, dl=0.9), [("market", 1, "breakout")]),
    (probs(el=0.9, dl=0.6, es=0.9, ds=0.6), [("limit", 1, "chop"), ("limit", -1, "chop")]),
    (probs(el=math.nan, dl=math.nan), []),
])
def test_regimes_at_their_threshold_boundaries(p, expected):
    assert kinds(decide(p)) == expected


def test_breakout_sets_wide_take_profit_and_normal_stop():
    (it,) = decide(probs(dl=0.9), strategy=cfg(take_profit_atr=1.5, aggressive_tp_mult=4.0, stop_loss_atr=2.5),
                   atr=2.0)
    assert it.tp_dist == pytest.approx(1.5 * 4.0 * 2.0) and it.sl_dist == pytest.approx(2.5 * 2.0)


@pytest.mark.parametrize("side,expected", [(1, 99.41), (-1, 100.59)])
def test_limit_price_is_offset_from_close_and_rounded_away_from_market(side, expected):
    p = probs(el=0.9, dl=0.6) if side == 1 else probs(es=0.9, ds=0.6)
    (it,) = decide(p, close=100.003, atr=1.17, strategy=cfg(limit_offset_atr=0.5))
    assert it.price == pytest.approx(expected) and it.tp_dist == pytest.approx(1.2 * 1.17)


def test_no_entries_without_a_usable_atr():
    assert decide(probs(dl=0.95), atr=math.nan) == []
    assert decide(probs(el=0.9, dl=0.6), atr=0.0) == []


# ------------------------------------------------------------ caps, expiry, exits
def test_max_positions_counts_positions_and_resting_entries():
    full = [pos(1, 9), pos(-1, 9)]
    assert kinds(decide(probs(el=0.9, dl=0.6), positions=full, resting=[order(-1)])) == []
    assert kinds(decide(probs(el=0.9, dl=0.6), positions=full)) == [("limit", 1, "chop")]
    assert kinds(decide(probs(dl=0.95, ds=0.95), positions=full)) == [("market", 1, "breakout")]


def test_one_resting_entry_per_side():
    assert kinds(decide(probs(el=0.9, dl=0.6), resting=[order(1)])) == []
    with pytest.raises(ValueError, match="one per side"):
        decide(probs(), resting=[order(1), order(1)])


def test_breakout_cancels_its_sides_resting_entry_and_may_take_its_slot():
    out = decide(probs(dl=0.95), positions=[pos(1), pos(-1)], resting=[order(1)])
    assert kinds(out) == [("cancel", 1, "superseded"), ("market", 1, "breakout")]
    out = decide(probs(dl=0.95), positions=[pos(1), pos(-1), pos(1)], resting=[order(1)],
                 strategy=cfg(max_positions=3))
    assert kinds(out) == []


@pytest.mark.parametrize("placed,expired", [(10 - 12, True), (10 - 11, False)])
def test_resting_entry_expires_after_time_limit_bars(placed, expired):
    out = decide(probs(), resting=[order(1, placed=placed)], strategy=cfg(time_limit_bars=12))
    assert kinds(out) == ([("cancel", 1, "expired")] if expired else [])


def test_expired_order_frees_its_slot_for_a_new_entry_on_the_same_bar():
    out = decide(probs(el=0.9, dl=0.6), resting=[order(1, placed=-2)], positions=[pos(), pos()])
    assert kinds(out) == [("cancel", 1, "expired"), ("limit", 1, "chop")]


MAX_HOLD = StrategyConfig().max_holding_bars


@pytest.mark.parametrize("fill_bar,exits", [(10 - MAX_HOLD, True), (10 - MAX_HOLD + 1, False)])
def test_time_exit_after_max_holding_bars(fill_bar, exits):
    out = decide(probs(), positions=[pos(1, fill_bar), pos(-1, 9)])
    assert kinds(out) == ([("exit", 1, "time")] if exits else [])
    if exits:
        assert out[0].ref == 0 and out[0].qty == 1.0


# ------------------------------------------------------------ kill-switch
def test_kill_switch_flattens_cancels_and_halts_until_next_utc_day():
    day = st.DayState()
    assert decide(probs(), equity=10_000.0, day=day, time=DAY0) == []
    assert day.start_equity == 10_000.0 and not day.halted
    assert decide(probs(), equity=9_700.01, day=day, time=DAY0 + 300) == []
    out = decide(probs(dl=0.95), positions=[pos(1), pos(-1)], resting=[order(1)], equity=9_700.0, day=day,
                 time=DAY0 + 600)
    assert kinds(out) == [("exit", 1, "kill_switch"), ("exit", -1, "kill_switch"), ("cancel", 1, "kill_switch")]
    assert day.halted
    assert decide(probs(dl=0.95), equity=9_800.0, day=day, time=DAY0 + 86_400 - 300) == []
    out = decide(probs(dl=0.95), equity=9_800.0, day=day, time=DAY0 + 86_400)
    assert kinds(out) == [("market", 1, "breakout")]
    assert day.start_equity == 9_800.0 and not day.halted


def test_kill_switch_day_start_is_the_equity_at_the_previous_days_last_close():
    day = st.DayState()
    decide(probs(), equity=10_000.0, day=day, time=DAY0)
    decide(probs(), equity=12_000.0, day=day, time=DAY0 + 86_400 - 300)
    decide(probs(), equity=11_700.0, day=day, time=DAY0 + 86_400)
    assert day.start_equity == 12_000.0 and not day.halted
    assert kinds(decide(probs(), equity=11_639.0, day=day, time=DAY0 + 86_400 + 300)) == []
    assert day.halted


# ------------------------------------------------------------ sizing
def test_size_risks_the_budget_at_the_stop():
    (it,) = decide(probs(dl=0.95), atr=2.0, strategy=cfg(risk_per_trade=0.01, stop_loss_atr=2.0))
    assert it.qty == pytest.approx(10_000 * 0.01 / 4.0)


def test_size_is_capped_by_leverage_including_what_is_already_held():
    held = [pos(1, 9, qty=300.0)]
    (it,) = decide(probs(dl=0.95), positions=held, atr=0.05, strategy=cfg(max_leverage=5.0))
    assert it.qty == pytest.approx((5 * 10_000 - 300 * 100.0) / 100.0)
    assert decide(probs(dl=0.95), positions=[pos(1, 9, qty=500.0)], atr=0.05) == []


def test_size_rounds_down_to_the_quantity_step():
    (it,) = decide(probs(dl=0.95), atr=1.7, instrument=InstrumentConfig(qty_step=0.1, min_qty=0.1))
    assert it.qty == pytest.approx(29.4)


def test_size_is_capped_by_the_book_a_market_entry_takes_and_a_postonly_entry_joins():
    book = dict(bid_depth=1000.0, ask_depth=200.0)   # uncapped size: 10_000 * 0.01 / 2 = 50
    (it,) = decide(probs(dl=0.95), **book)                      # a market buy takes the asks
    assert it.kind == "market" and it.qty == pytest.approx(0.1 * 200.0)
    (it,) = decide(probs(ds=0.95), **book)                      # a market sell takes the bids: 100 > 50
    assert it.kind == "market" and it.qty == pytest.approx(50.0)
    (it,) = decide(probs(es=0.7, ds=0.6), **book)               # a PostOnly sell joins the asks
    assert it.kind == "limit" and it.qty == pytest.approx(0.1 * 200.0)
    (it,) = decide(probs(el=0.7, dl=0.6), **book, strategy=cfg(max_book_share=0.02))   # joins the bids
    assert it.kind == "limit" and it.qty == pytest.approx(0.02 * 1000.0)


def test_no_book_cap_without_a_book_sample_or_with_share_zero_and_no_entry_into_an_empty_side():
    assert decide(probs(dl=0.95))[0].qty == pytest.approx(50.0)                            # depth unknown
    assert decide(probs(dl=0.95), ask_depth=1.0, strategy=cfg(max_book_share=0.0))[0].qty == pytest.approx(50.0)
    assert decide(probs(dl=0.95), bid_depth=1000.0, ask_depth=0.0) == []


def test_orders_below_min_quantity_or_min_notional_are_skipped():
    small = dict(equity=100.0, atr=1.0, close=5.0, strategy=cfg(risk_per_trade=0.01))
    assert decide(probs(dl=0.95), **small, instrument=InstrumentConfig(min_qty=0.001, min_notional=5.0)) == []
    out = decide(probs(dl=0.95), **small, instrument=InstrumentConfig(min_qty=0.001, min_notional=0.0))
    assert out[0].qty == pytest.approx(0.5)
    assert decide(probs(dl=0.95), **small, instrument=InstrumentConfig(min_qty=0.6, min_notional=0.0)) == []


def test_no_size_with_non_positive_equity():
    params = st.strategy_params(cfg(), InstrumentConfig())
    assert st.position_size(0.0, 100.0, 2.0, 0.0, params, math.nan) == 0.0
    assert st.position_size(10_000.0, 100.0, 2.0, 0.0, params, math.nan) == pytest.approx(50.0)


# ------------------------------------------------------------ idle pre-check (lets the backtester skip decide_core)
def test_is_idle_only_when_decide_core_would_do_nothing():
    """Random walks of day, equity (through kill-switch halts) and probabilities on an empty book."""
    params = st.strategy_params(cfg(), InstrumentConfig())
    rng = np.random.default_rng(3)
    empty, rest, out = np.zeros(3), np.zeros(2), np.zeros((8, st.N_INTENT_COLS))
    state = st.new_day_state()
    day, equity, idle_seen, halted_idle_seen = 0, 10_000.0, 0, 0
    for bar in range(20_000):
        day += rng.random() < 0.01
        if rng.random() < 0.05:
            equity *= rng.choice([0.9, 0.99, 1.02])
        p = np.where(rng.random(4) < 0.8, rng.choice([0.0, 0.49, 0.5, 0.59, 0.6, 0.86, 0.87, math.nan], 4), 0.0)
        idle = st.is_idle(day, equity, *p, state, params)
        before = state.copy()
        n = st.decide_core(bar, day, 100.0, 1.0, 50.0, 50.0, *p, equity, state, empty, empty, empty, rest, rest, rest,
                           params, out, True)
        if idle:
            assert n == 0 and np.array_equal(state, before, equal_nan=True), (bar, p)
            idle_seen += 1
            halted_idle_seen += state[st.D_HALTED] == 1.0
    assert idle_seen > 5_000 and halted_idle_seen > 100


def test_is_idle_is_false_on_a_new_day_a_new_equity_or_any_entry_signal():
    params = st.strategy_params(cfg(), InstrumentConfig())
    state = st.new_day_state()
    st.decide_core(0, 5, 100.0, 1.0, math.nan, math.nan, 0.0, 0.0, 0.0, 0.0, 10_000.0, state, np.zeros(3),
                   np.zeros(3), np.zeros(3), np.zeros(2), np.zeros(2), np.zeros(2), params,
                   np.zeros((8, st.N_INTENT_COLS)), True)
    assert st.is_idle(5, 10_000.0, 0.0, 0.0, 0.0, 0.0, state, params)
    assert not st.is_idle(6, 10_000.0, 0.0, 0.0, 0.0, 0.0, state, params)
    assert not st.is_idle(5, 9_999.0, 0.0, 0.0, 0.0, 0.0, state, params)
    for p in ([0.0, 0.0, 0.87, 0.0], [0.0, 0.0, 0.0, 0.87], [0.6, 0.0, 0.5, 0.0], [0.0, 0.6, 0.0, 0.5]):
        assert not st.is_idle(5, 10_000.0, *p, state, params), p
    for p in ([0.59, 0.59, 0.86, 0.86], [1.0, 1.0, 0.49, 0.49]):
        assert st.is_idle(5, 10_000.0, *p, state, params), p


# ------------------------------------------------------------ entry gate
def test_closed_entry_gate_blocks_entries_but_not_exits_or_expiries():
    closed = st.EntryGate(allowed=False, reason="spread 0.5% > max_spread_pct")
    signal = probs(el=0.9, dl=0.9, es=0.9, ds=0.6)
    assert kinds(decide(signal, gate=st.EntryGate())) == [("market", 1, "breakout"), ("limit", -1, "chop")]
    assert decide(signal, gate=closed) == []
    out = decide(signal, positions=[pos(fill_bar=-100)], resting=[order(-1, placed=-100, price=100.5)], gate=closed)
    assert kinds(out) == [("exit", 1, "time"), ("cancel", -1, "expired")]


def test_closed_entry_gate_still_lets_the_kill_switch_flatten():
    day = st.DayState()
    decide(probs(), equity=10_000.0, day=day)
    out = decide(probs(dl=0.9), positions=[pos()], equity=9_000.0, day=day, gate=st.EntryGate(False, "stale data"))
    assert kinds(out) == [("exit", 1, "kill_switch")] and day.halted


# ------------------------------------------------------------ intrabar kill-switch trigger
def equity_at(price, sides, qtys, entries, cash):
    return cash + sum(s * q * (price - e) for s, q, e in zip(sides, qtys, entries))


@pytest.mark.parametrize("sides,qtys,entries,direction", [
    ([1], [2.0], [100.0], 1),                              # long: breached at or below the trigger
    ([-1], [2.0], [100.0], -1),                            # short: at or above
    ([1, -1], [3.0, 1.0], [100.0, 104.0], 1),              # hedge, both legs, net long 2
    ([1, -1, -1], [1.0, 2.0, 0.5], [100.0, 96.0, 90.0], -1),   # hedge, net short 1.5
])
def test_kill_trigger_is_the_price_where_equity_meets_the_limit(sides, qtys, entries, direction):
    cash, start, loss = 9_950.0, 10_000.0, 0.03
    trigger, way = st.kill_trigger(np.array(sides, float), np.array(qtys), np.array(entries), cash, start, loss)
    assert way == direction
    assert equity_at(trigger, sides, qtys, entries, cash) == pytest.approx(0.97 * start, rel=1e-12)
    worse, better = trigger - direction * 0.01, trigger + direction * 0.01
    assert equity_at(worse, sides, qtys, entries, cash) < 0.97 * start < equity_at(better, sides, qtys, entries, cash)
    assert st.kill_crossed(worse, worse, trigger, way) and not st.kill_crossed(better, better, trigger, way)


def test_kill_trigger_with_no_net_quantity_fires_only_when_already_breached():
    hedged = (np.array([1.0, -1.0, 1.0]), np.array([1.5, 1.5, 0.0]), np.array([100.0, 90.0, 50.0]))
    assert st.kill_trigger(*hedged, 9_720.0, 10_000.0, 0.03)[1] == 0          # equity 9_705 at any price
    assert st.kill_trigger(*hedged, 9_700.0, 10_000.0, 0.03) == (math.inf, 1)  # 9_685: any price breaches
    flat = (np.zeros(2), np.zeros(2), np.zeros(2))
    assert st.kill_trigger(*flat, 9_700.01, 10_000.0, 0.03)[1] == 0
    assert st.kill_crossed(1e9, 1e9, *st.kill_trigger(*flat, 9_700.0, 10_000.0, 0.03))
    assert not st.kill_crossed(1.0, 1e9, math.nan, 0)


def test_intrabar_kill_uses_the_bar_close_rules_day_and_halts_until_the_next_utc_day():
    day = st.DayState()
    held = [st.Position(side=1, qty=100.0, entry_price=100.0, tp=110.0, sl=90.0, fill_bar=0)]
    assert not st.intrabar_kill(50.0, 50.0, DAY0, held, 10_000.0, day, cfg())           # no day started yet
    decide(probs(), equity=10_000.0, day=day, time=DAY0)
    assert st.kill_price(held, 10_000.0, day, cfg()) == (pytest.approx(97.0), 1)
    assert not st.intrabar_kill(97.01, 99.0, DAY0 + 60, held, 10_000.0, day, cfg())
    assert st.intrabar_kill(97.0, 99.0, DAY0 + 120, held, 10_000.0, day, cfg()) and day.halted
    assert not st.intrabar_kill(50.0, 50.0, DAY0 + 180, held, 10_000.0, day, cfg())     # halted: once a day
    assert decide(probs(dl=0.95), equity=9_700.0, day=day, time=DAY0 + 300) == []
    decide(probs(), equity=9_700.0, day=day, time=DAY0 + 86_100)
    assert st.intrabar_kill(96.0, 96.0, DAY0 + 86_400, held, 9_700.0, day, cfg())       # new day: start 9_700
    assert day.day == DAY0 // 86_400 + 1 and day.start_equity == 9_700.0 and day.halted
