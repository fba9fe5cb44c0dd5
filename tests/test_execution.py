"""execution.py: the proof that it plus strategy.decide reproduces the backtest core, and every event kind.

The proof replays a backtest bar by bar: this file plays the exchange, feeding the Execution the core's own
fills (from `BacktestResult.trades`) in the core's order of work within a bar (orders sent at the last close,
resting entries, then every position's TP/SL in slot order), and rejecting a PostOnly that would cross at
its arrival price as the exchange does. The intents the Execution decides, the TP/SL it derives from each
fill, its equity at every close and its journal must equal the core's intent log, trades and equity exactly.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as hst

import backtest
import strategy as st
from execution import ExecEvent, Execution, OrderRequest, is_own_order, order_link_id
from test_backtest import btc_market, make_cfg, random_market

SYMBOL = "BTCUSDT"
EXIT_REASON = {"tp": "take_profit", "sl": "stop_loss", "time_exit": "time", "kill_exit": "kill_switch"}


# ---------------------------------------------------------------- the exchange side of the replay
class CoreReplay:
    """Plays the exchange for an Execution from a backtest result: fills are the core's, acks are immediate."""

    def __init__(self, frame: pd.DataFrame, cfg, result: backtest.BacktestResult, fine: pd.DataFrame | None):
        self.ex = Execution(cfg, SYMBOL)
        self.cfg = cfg
        self.journal: list[dict] = []
        self.n_exec = 0
        self.rejected = 0
        tr = result.trades
        sides = np.where(tr["side"] == "long", 1, -1)
        self.trades = {(int(s), int(b)): row for s, b, row in zip(sides, tr["entry_bar"], tr.itertuples())}
        assert len(self.trades) == len(tr), "two trades share a side and entry bar: the replay cannot tell them apart"
        t = backtest._epoch_seconds(frame.index)
        bar_s = t[1] - t[0]
        if fine is not None:
            fine = fine.loc[(fine.index >= frame.index[0]) & (fine.index < frame.index[-1] + pd.Timedelta(seconds=bar_s))]
        ft, fo, fh, fl, fstart, fend, lat = backtest._fine_arrays(fine, t, bar_s, cfg.venue.latency_ms)
        opens = frame["open"].to_numpy(float)
        self.arrival = [fo[min(fstart[i] + lat, fend[i] - 1)] if fend[i] > fstart[i] else opens[i]
                        for i in range(len(t))]
        self.open_ms = [int(x) * 1000 for x in t]
        self.fine = (ft, fh, fl, fstart, fend)
        self.ranges = list(zip(frame["low"].to_numpy(float), frame["high"].to_numpy(float)))
        self.last_fill_s = -1.0
        self.kills = 0

    def send(self, ev: ExecEvent) -> None:
        """Feed one event; it must apply, and its follow-ups are acknowledged at once."""
        res = self.ex.on_event(ev)
        assert res.status == "applied", res.message
        self.journal += res.journal
        for req in res.requests:
            self.ack(req, ev.ts_ms)

    def ack(self, req: OrderRequest, ts_ms: int) -> None:
        self.send(ExecEvent("cancelled" if req.action == "cancel" else "accepted", req.order_link_id, ts_ms))

    def fill(self, link: str, ts, qty: float, price: float, fee: float, maker: bool) -> None:
        self.n_exec += 1
        self.last_fill_s = max(self.last_fill_s, ts.timestamp())
        self.send(ExecEvent("fill", link, int(round(ts.timestamp() * 1000)), exec_id=f"e{self.n_exec}", qty=qty,
                            price=price, fee=fee, is_maker=maker))

    def position(self, position_id: str):
        return next(p for p in self.ex.slots if p is not None and p.position_id == position_id)

    def bar_open(self, i: int, sent: list[OrderRequest]) -> None:
        """Bar i in the core's order: the orders sent at the last close, resting entries, TP/SL by slot, then
        the prices since the bar's last fill go to the intrabar kill-switch."""
        self.last_fill_s = -1.0
        self.act(i, sent, self.open_ms[i])
        self.entries_and_exits(i)
        self.intrabar_kill(i)

    def intrabar_kill(self, i: int) -> None:
        """Feed the Execution the (fine) bar ranges the core watches (from the bar's last fill on) until its
        day halts; the flatten it then asks for fills as the core's kill_switch trades."""
        ft, fh, fl, fstart, fend = self.fine
        if fend[i] > fstart[i]:
            first = fstart[i] if self.last_fill_s < 0 else int(np.searchsorted(ft, round(self.last_fill_s)))
            steps = [(fl[m], fh[m], int(ft[m]) * 1000) for m in range(first, fend[i])]
        else:
            steps = [(*self.ranges[i], self.open_ms[i])]
        for low, high, when_ms in steps:
            if self.ex.day.halted and self.ex.day.day == self.open_ms[i] // 86_400_000:
                return
            requests = self.ex.check_kill(low, high, i, self.open_ms[i] / 1000)
            self.kills += self.ex.day.halted
            self.act(i, requests, when_ms)

    def act(self, i: int, sent: list[OrderRequest], ms: int) -> None:
        """The exchange's answer to requests: cancels confirmed, exits and market entries filled as the core's
        trades, PostOnly entries accepted or rejected at the arrival price."""
        for req in sent:
            if req.action == "cancel":
                self.send(ExecEvent("cancelled", req.order_link_id, ms))
            elif req.kind == "exit":
                pos = self.position(req.position_id)
                row = self.trades[(pos.side, pos.fill_bar)]
                assert row.exit_bar == i and row.exit_reason == req.reason, (i, req)
                self.fill(req.order_link_id, row.exit_time, row.qty, row.exit_price, row.exit_fee, False)
            elif req.order_type == "Market":
                row = self.trades[(st.LONG if req.side == "Buy" else st.SHORT, i)]
                self.fill(req.order_link_id, row.entry_time, row.qty, row.entry_price, row.entry_fee, False)
            else:
                crosses = req.price >= self.arrival[i] if req.side == "Buy" else req.price <= self.arrival[i]
                self.rejected += crosses
                self.send(ExecEvent("rejected" if crosses else "accepted", req.order_link_id, ms,
                                    reason="EC_PostOnlyWillTakeLiquidity" if crosses else ""))

    def entries_and_exits(self, i: int) -> None:
        """Resting entries the core filled in bar i, then its TP/SL fills in slot order."""
        for side in (st.LONG, st.SHORT):
            for order in [o for o in self.ex.orders.values() if o.status == "accepted" and o.request.kind == "entry"
                          and o.request.side == ("Buy" if side == st.LONG else "Sell")]:
                row = self.trades.get((side, i))
                if row is not None and row.regime == "maker":
                    self.fill(order.request.order_link_id, row.entry_time, row.qty, row.entry_price, row.entry_fee, True)
        for pos in [p for p in self.ex.slots if p is not None]:
            row = self.trades[(pos.side, pos.fill_bar)]
            if row.exit_bar == i and row.exit_reason in ("take_profit", "stop_loss"):
                link = pos.tp_link if row.exit_reason == "take_profit" else pos.sl_link
                self.fill(link, row.exit_time, row.qty, row.exit_price, row.exit_fee, row.exit_reason == "take_profit")


def replay(frame: pd.DataFrame, probs: pd.DataFrame, cfg, fine: pd.DataFrame | None = None,
           gate: np.ndarray | None = None,
           restart: bool = False) -> tuple[backtest.BacktestResult, CoreReplay, pd.DataFrame, list[float]]:
    """Run the core, then the Execution + strategy.decide on the core's fills; returns both sides' records.

    restart: after every bar close the Execution is rebuilt from its own JSON state (a restart)."""
    result = backtest.run_backtest(frame, probs, cfg, fine=fine, record_intents=True, entries_allowed=gate)
    rep = CoreReplay(frame, cfg, result, fine)
    t = backtest._epoch_seconds(frame.index)
    cols = {c: frame[c].to_numpy(float) for c in ("close", "atr")}
    p = probs.reindex(frame.index)[backtest.PROB_COLUMNS]
    rows, equity, sent = [], [], []
    for i in range(len(frame)):
        if i > 0:
            rep.bar_open(i, sent)
        if i == len(frame) - 1:
            break
        bar = st.Bar(index=i, time=float(t[i]), close=cols["close"][i], atr=cols["atr"][i], probs=p.iloc[i].to_dict())
        sent = rep.ex.on_bar_close(bar, st.EntryGate(bool(gate[i]) if gate is not None else True, "test gate"))
        if restart:
            text = rep.ex.to_json()
            rep.ex = Execution.from_json(text, cfg)
            assert rep.ex.to_json() == text
        equity.append(rep.ex.equity())
        rows += [{"bar": i, "time": frame.index[i], **it.__dict__} for it in rep.ex.last_intents]
    intents = pd.DataFrame(rows, columns=result.intents.columns)
    return result, rep, intents, equity


def journal_trades(journal: list[dict]) -> pd.DataFrame:
    """Closed trades rebuilt from the Execution's journal (entry 'filled' + the exit fill), core columns."""
    entries = {r["position_id"]: r for r in journal if r["kind"] == "entry" and r["event"] == "filled"}
    rows = []
    for r in journal:
        if r["event"] in EXIT_REASON:
            e = entries[r["position_id"]]
            rows.append({"entry_time": e["ts"], "exit_time": r["ts"], "side": "long" if e["side"] == "Buy" else "short",
                         "qty": r["qty"], "entry_price": e["price"], "exit_price": r["price"], "take_profit": e["tp"],
                         "stop_loss": e["sl"], "exit_reason": EXIT_REASON[r["event"]], "entry_fee": e["fee"],
                         "exit_fee": r["fee"], "pnl": r["pnl"]})
    return pd.DataFrame(rows)


def assert_reproduces(frame, probs, cfg, fine=None, gate=None, min_trades=20, restart=False) -> CoreReplay:
    """The replay's intents, trades, equity and open positions equal the core's; returns the replay."""
    result, rep, intents, equity = replay(frame, probs, cfg, fine, gate, restart)
    assert rep.kills == result.counters["intrabar_kills"]
    pd.testing.assert_frame_equal(intents, result.intents, check_exact=True)
    core = result.trades.loc[result.trades["exit_reason"] != "end_of_data"]
    assert len(core) >= min_trades
    cols = ["side", "qty", "entry_price", "exit_price", "take_profit", "stop_loss", "exit_reason", "entry_fee",
            "exit_fee", "pnl"]
    ms = {c: (core[c].astype("int64") // 1_000_000).to_numpy() for c in ("entry_time", "exit_time")}
    mine = journal_trades(rep.journal).sort_values(["exit_time", "entry_time", "side"], kind="stable")
    core = core.assign(**ms).sort_values(["exit_time", "entry_time", "side"], kind="stable")
    pd.testing.assert_frame_equal(mine[cols + ["entry_time", "exit_time"]].reset_index(drop=True),
                                  core[cols + ["entry_time", "exit_time"]].reset_index(drop=True), check_exact=True)
    assert equity == result.equity["equity"].iloc[:-1].tolist()
    assert rep.rejected == result.counters["rejected_postonly"]
    still_open = result.trades.loc[result.trades["exit_reason"] == "end_of_data"]
    assert sorted((p.qty, p.entry_price) for p in rep.ex.positions()) == \
        sorted(zip(still_open["qty"], still_open["entry_price"]))
    return rep


# ---------------------------------------------------------------- the proof
@pytest.mark.parametrize("seed,settings_", [
    (1, {}),
    (2, {"fill_rule": "touch", "slippage_bps": 3.0, "daily_loss_limit": 0.015, "max_positions": 2,
         "risk_per_trade": 0.02}),
    (3, {"max_leverage": 1.0, "max_holding_bars": 40, "time_limit_bars": 3, "aggressive_threshold": 0.95,
         "exec_threshold": 0.5, "limit_offset_atr": 0.1, "latency_ms": 250.0}),
    (4, {"limit_offset_atr": 1.5, "maker_fee": -0.0001, "take_profit_atr": 3.0, "stop_loss_atr": 0.8,
         "max_positions": 5, "max_holding_bars": 6}),
])
def test_execution_and_decide_reproduce_the_core_on_random_markets(seed, settings_):
    frame, probs, fine = random_market(6000, seed=seed)
    rep = assert_reproduces(frame, probs, make_cfg(**settings_), fine=fine if seed % 2 else None)
    assert rep.kills > 0                      # the intrabar kill-switch fired (seeds 1, 3: inside 1m fine bars)


@settings(max_examples=6, deadline=None)
@given(seed=hst.integers(0, 10_000), gate_rate=hst.sampled_from([0.0, 0.3]), tick=hst.sampled_from([0.01, 0.05]))
def test_execution_reproduces_the_core_for_any_seed_gate_and_tick(seed, gate_rate, tick):
    frame, probs, _ = random_market(2500, seed=seed)
    cfg = make_cfg(daily_loss_limit=0.02, time_limit_bars=4, max_holding_bars=15)
    cfg.instrument.tick_size = tick
    gate = np.random.default_rng(seed).random(len(frame)) >= gate_rate
    assert_reproduces(frame, probs, cfg, gate=gate, min_trades=5)


def test_execution_reproduces_the_core_on_real_btcusdt_trades(realdata):
    frame, probs, fine, cfg = btc_market(realdata)
    for fine_bars in (None, fine):
        assert_reproduces(frame, probs, cfg, fine=fine_bars, min_trades=15)


def test_a_restart_from_the_json_state_at_every_bar_changes_nothing():
    frame, probs, _ = random_market(1000, seed=8)
    rep = assert_reproduces(frame, probs, make_cfg(daily_loss_limit=0.02), min_trades=5, restart=True)
    assert rep.kills > 0 and rep.ex.day.halted        # the halt is in the JSON state and survived every restart


# ---------------------------------------------------------------- every event kind, one by one
DAY = 1_767_225_600          # 2026-01-01 00:00 UTC
CHOP_LONG = {"p_exec_long": 0.9, "p_dir_long": 0.6, "p_exec_short": 0.0, "p_dir_short": 0.0}
BREAKOUT_LONG = {"p_exec_long": 0.0, "p_dir_long": 0.9, "p_exec_short": 0.0, "p_dir_short": 0.0}
QUIET = {"p_exec_long": 0.0, "p_dir_long": 0.0, "p_exec_short": 0.0, "p_dir_short": 0.0}


def close(ex: Execution, i: int, probs=QUIET, price=100.0, gate=None) -> list[OrderRequest]:
    return ex.on_bar_close(st.Bar(index=i, time=DAY + 300 * i, close=price, atr=1.0, probs=probs), gate)


def ms(i: int) -> int:
    return (DAY + 300 * i) * 1000


def filled_long(qty_fraction: float = 1.0):
    """An Execution whose PostOnly long from bar 0 (limit 99.5, qty 50) was accepted and filled in bar 1."""
    ex = Execution(make_cfg(), SYMBOL)
    (entry,) = close(ex, 0, CHOP_LONG)
    assert ex.on_event(ExecEvent("accepted", entry.order_link_id, ms(1))).status == "applied"
    res = ex.on_event(ExecEvent("fill", entry.order_link_id, ms(1) + 5, exec_id="x1", qty=entry.qty * qty_fraction,
                                price=99.5, fee=0.99, is_maker=True))
    return ex, entry, res


def test_entry_request_is_a_postonly_with_its_own_stop_and_a_deterministic_link_id():
    ex = Execution(make_cfg(), SYMBOL)
    (req,) = close(ex, 0, CHOP_LONG)
    assert (req.action, req.kind, req.side, req.order_type, req.time_in_force) == ("create", "entry", "Buy", "Limit",
                                                                                   "PostOnly")
    assert (req.price, req.qty, req.reduce_only, req.position_idx, req.stop_loss) == (99.5, 50.0, False, 1, 97.5)
    assert req.order_link_id == order_link_id(req.intent_key) and len(req.order_link_id) <= 36
    assert is_own_order(req.order_link_id) and req.intent_key == f"{SYMBOL}|{DAY}|entry|Buy"
    again = Execution(make_cfg(), SYMBOL)
    assert close(again, 0, CHOP_LONG) == [req]                         # the same decision is the same order
    assert ex.pending() == [req]                                      # until the exchange answers
    assert ex.resting() == [st.RestingOrder(st.LONG, 99.5, 50.0, 0, 1.2, 2.0)]


def test_market_entry_fill_sets_tp_from_the_fill_and_keeps_the_attached_stop_level():
    ex = Execution(make_cfg(), SYMBOL)
    (req,) = close(ex, 0, BREAKOUT_LONG)
    assert (req.order_type, req.time_in_force, req.price, req.stop_loss) == ("Market", "IOC", None, 98.0)
    res = ex.on_event(ExecEvent("fill", req.order_link_id, ms(1), exec_id="m1", qty=req.qty, price=100.013, fee=1.0))
    tp, sl = res.requests
    assert (tp.action, tp.kind, tp.side, tp.order_type, tp.time_in_force, tp.reduce_only) == \
        ("create", "tp", "Sell", "Limit", "GTC", True)
    assert tp.price == 112.02 and tp.qty == req.qty                    # 100.013 + 12: up, away from the fill
    assert (sl.action, sl.kind, sl.order_type, sl.price, sl.reduce_only, sl.position_idx) == \
        ("create", "sl", "Market", req.stop_loss, True, 1)            # the trigger: the attached stop, not fill - 2
    (pos,) = ex.positions()
    assert (pos.side, pos.qty, pos.entry_price, pos.tp, pos.sl, pos.fill_bar, pos.regime) == \
        (st.LONG, req.qty, 100.013, 112.02, 98.0, 1, "taker")
    (rec,) = res.journal
    assert {k: rec[k] for k in ("event", "kind", "side", "price", "qty", "fee", "tp", "sl", "ts")} == \
        {"event": "filled", "kind": "entry", "side": "Buy", "price": 100.013, "qty": req.qty, "fee": 1.0,
         "tp": 112.02, "sl": 98.0, "ts": ms(1)}
    assert ex.mark(101.013) == 10_000.0 - 1.0 + req.qty * 1.0


def test_take_profit_fill_closes_the_position_books_pnl_and_cancels_the_stop():
    ex, entry, _ = filled_long()
    pos = ex.slots[0]
    res = ex.on_event(ExecEvent("fill", pos.tp_link, ms(3), exec_id="x2", qty=50.0, price=100.7, fee=1.007,
                                is_maker=True))
    assert res.status == "applied" and ex.positions() == []
    (cancel,) = res.requests
    assert (cancel.action, cancel.order_link_id) == ("cancel", pos.sl_link)
    (rec,) = res.journal
    assert rec["event"] == "tp" and rec["pnl"] == pytest.approx(50 * 1.2 - 0.99 - 1.007)
    assert ex.cash == pytest.approx(10_000.0 + 50 * 1.2 - 0.99 - 1.007)
    assert ex.on_event(ExecEvent("cancelled", pos.sl_link, ms(3))).status == "applied"
    assert ex.pending() == []


def test_stop_triggers_then_fills_as_sl():
    ex, _, _ = filled_long()
    pos = ex.slots[0]
    assert ex.on_event(ExecEvent("accepted", pos.sl_link, ms(1) + 6)).status == "applied"
    assert ex.on_event(ExecEvent("triggered", pos.sl_link, ms(4))).status == "applied"
    res = ex.on_event(ExecEvent("fill", pos.sl_link, ms(4) + 1, exec_id="x3", qty=50.0, price=97.49, fee=2.68))
    assert res.journal[0]["event"] == "sl" and res.requests[0].order_link_id == pos.tp_link
    assert ex.positions() == []


def test_time_exit_is_a_reduce_only_market_that_cancels_tp_and_sl_and_is_not_sent_twice():
    ex, _, _ = filled_long()
    pos = ex.slots[0]
    for i in range(1, 48):
        assert close(ex, i) == []
    exit_, c1, c2 = close(ex, 49)
    assert (exit_.kind, exit_.side, exit_.order_type, exit_.reduce_only, exit_.qty, exit_.reason) == \
        ("exit", "Sell", "Market", True, 50.0, "time")
    assert {c1.order_link_id, c2.order_link_id} == {pos.tp_link, pos.sl_link} and c1.action == c2.action == "cancel"
    assert close(ex, 50) == []                        # the exit is under way: no second exit order
    assert ex.last_intents[0].kind == "exit"          # (the strategy still asks for it)
    res = ex.on_event(ExecEvent("fill", exit_.order_link_id, ms(51), exec_id="x4", qty=50.0, price=100.2, fee=2.75))
    assert res.journal[0]["event"] == "time_exit" and res.requests == [] and ex.positions() == []


def test_intrabar_kill_flattens_with_reduce_only_exits_cancels_everything_and_halts_the_day():
    ex, _, _ = filled_long()                        # long 50 @ 99.5, maker fee 0.99; the day started at 10_000
    pos = ex.slots[0]
    (short,) = close(ex, 1, {**QUIET, "p_exec_short": 0.9, "p_dir_short": 0.6})
    trigger = (9_700.0 - (10_000.0 - 0.99) + 50 * 99.5) / 50
    assert st.kill_price(ex.positions(), ex.cash, ex.day, ex.cfg.strategy) == (pytest.approx(trigger), 1)
    assert ex.check_kill(trigger + 0.01, 101.0, 2, DAY + 600) == [] and not ex.day.halted
    exit_, tp_cancel, sl_cancel, entry_cancel = ex.check_kill(trigger, trigger, 2, DAY + 600)
    assert (exit_.action, exit_.kind, exit_.side, exit_.order_type, exit_.reduce_only, exit_.qty, exit_.reason) == \
        ("create", "exit", "Sell", "Market", True, 50.0, "kill_switch")
    assert [(r.action, r.order_link_id) for r in (tp_cancel, sl_cancel, entry_cancel)] == \
        [("cancel", pos.tp_link), ("cancel", pos.sl_link), ("cancel", short.order_link_id)]
    assert ex.day.halted and ex.check_kill(50.0, 50.0, 2, DAY + 660) == []
    assert Execution.from_json(ex.to_json(), make_cfg()).day.halted           # the halt is in the state file
    res = ex.on_event(ExecEvent("fill", exit_.order_link_id, ms(2) + 1, exec_id="k1", qty=50.0, price=trigger,
                                fee=1.0))
    assert res.journal[0]["event"] == "kill_exit" and ex.positions() == []
    assert close(ex, 3, BREAKOUT_LONG) == []                                   # no entries until the next UTC day


def test_a_time_exit_that_does_not_fill_gets_its_stop_back_and_is_retried_under_new_link_ids():
    """A reduce-only IOC market exit cancelled with no (or a partial) fill, e.g. no liquidity on that side: its
    outcome is known, so the rest gets an exchange-side stop at once and the exit is re-attempted at the next
    close under a new orderLinkId (never the first one's), keeping that stop until the exit fills."""
    ex, _, _ = filled_long()
    pos = ex.slots[0]
    for i in range(1, 49):
        close(ex, i)
    exit_, c1, c2 = close(ex, 49)
    for link in (pos.tp_link, pos.sl_link):
        assert ex.on_event(ExecEvent("cancelled", link, ms(50))).status == "applied"
    res = ex.on_event(ExecEvent("cancelled", exit_.order_link_id, ms(50) + 1, reason="EC_NoImmediateQtyToFill"))
    (stop,) = res.requests
    assert (stop.action, stop.kind, stop.side, stop.order_type, stop.price, stop.qty, stop.reduce_only) == \
        ("create", "sl", "Sell", "Market", 97.5, 50.0, True)
    assert stop.order_link_id not in (c2.order_link_id, exit_.order_link_id) and pos.sl_link == stop.order_link_id
    assert ex.on_event(ExecEvent("accepted", stop.order_link_id, ms(50) + 2)).status == "applied"
    (retry,) = close(ex, 50)                                            # the stop stays: no cancel with the retry
    assert (retry.kind, retry.qty, retry.reason, retry.reduce_only) == ("exit", 50.0, "time", True)
    assert retry.order_link_id != exit_.order_link_id and close(ex, 50) == []      # one attempt, one order
    ex.on_event(ExecEvent("fill", retry.order_link_id, ms(51), exec_id="r1", qty=20.0, price=100.1, fee=1.0))
    assert ex.on_event(ExecEvent("cancelled", retry.order_link_id, ms(51) + 1)).requests == []  # stop stands
    (third,) = close(ex, 51)
    assert third.qty == 30.0 and len({exit_.order_link_id, retry.order_link_id, third.order_link_id}) == 3
    res = ex.on_event(ExecEvent("fill", third.order_link_id, ms(52), exec_id="r2", qty=30.0, price=100.2, fee=1.5))
    assert res.journal[0]["event"] == "time_exit" and ex.positions() == []
    assert [(r.action, r.order_link_id) for r in res.requests] == [("cancel", stop.order_link_id)]
    assert ex.cash == pytest.approx(10_000.0 - 0.99 + 20 * 0.6 - 1.0 + 30 * 0.7 - 1.5)


def test_a_kill_exit_that_does_not_fill_is_retried_in_the_same_bar_under_a_new_link_id():
    """The halted day asks decide for no exit again: the lifecycle re-attempts the kill exit itself at the next
    close, which is in the same bar as the first exit (same bar time in the key) yet gets its own orderLinkId."""
    ex, _, _ = filled_long()
    trigger = (9_700.0 - (10_000.0 - 0.99) + 50 * 99.5) / 50
    exit_, _, _ = ex.check_kill(trigger, trigger, 2, DAY + 600)
    (stop,) = ex.on_event(ExecEvent("cancelled", exit_.order_link_id, ms(2) + 1)).requests
    assert stop.kind == "sl" and stop.qty == 50.0
    (retry,) = close(ex, 2, price=trigger)
    assert (retry.kind, retry.reason) == ("exit", "kill_switch") and retry.order_link_id != exit_.order_link_id
    assert retry.intent_key == exit_.intent_key + "|1"
    ex.on_event(ExecEvent("fill", retry.order_link_id, ms(3), exec_id="k2", qty=50.0, price=trigger, fee=1.0))
    assert ex.positions() == [] and close(ex, 3) == []


def test_a_refused_stop_exits_through_the_lifecycle_and_leaves_no_phantom():
    """exit_position(.., "stop_refused"): the engine's immediate market exit of a position whose stop the
    exchange refused is an order of this lifecycle, so its fill closes the position here (equity = cash, no
    later exit is sent for it); a second request while it is under way sends nothing."""
    ex, _, _ = filled_long()
    pos = ex.slots[0]
    assert ex.on_event(ExecEvent("rejected", pos.sl_link, ms(1) + 6, reason="expect Falling")).status == "applied"
    exit_, tp_cancel = ex.exit_position(pos.position_id, "stop_refused")
    assert (exit_.kind, exit_.side, exit_.order_type, exit_.reduce_only, exit_.qty, exit_.reason) == \
        ("exit", "Sell", "Market", True, 50.0, "stop_refused")
    assert exit_.intent_key == pos.entry_key + "|exit|stop_refused" and tp_cancel.order_link_id == pos.tp_link
    assert ex.exit_position(pos.position_id, "stop_refused") == []
    assert ex.on_event(ExecEvent("cancelled", exit_.order_link_id, ms(2))).requests == [], \
        "no stop is put back where the exchange refused it; the exit is retried at the next close"
    (retry,) = close(ex, 2, price=97.0)
    assert retry.reason == "stop_refused" and retry.order_link_id != exit_.order_link_id
    res = ex.on_event(ExecEvent("fill", retry.order_link_id, ms(3), exec_id="s1", qty=50.0, price=97.0, fee=2.0))
    assert res.journal[0]["event"] == "sl" and res.journal[0]["reason"] == "stop_refused" and ex.positions() == []
    assert ex.mark(50.0) == ex.cash == pytest.approx(10_000.0 - 0.99 + 50 * (97.0 - 99.5) - 2.0)
    assert all(close(ex, i) == [] for i in range(3, 60)), "no later exit for a position already closed"
    assert ex.exit_position(pos.position_id, "stop_refused") == []


def test_a_fill_of_the_entrys_attached_stop_closes_the_position_and_cancels_its_tp():
    """The exchange's own stop from the entry's attached stopLoss (no orderLinkId) may fill before the position's
    own stop stands: adopted by its orderId for the position whose stop level and leg it matches, its fill
    closes that position (journaled as sl), cancels the TP and the own stop, and closes nothing else."""
    ex, entry, _ = filled_long()
    pos = ex.slots[0]
    assert ex.adopt_attached_stop("o-9", "Sell", 90.0, 50.0, ms(2)) is None          # another level
    assert ex.adopt_attached_stop("o-9", "Buy", 97.5, 50.0, ms(2)) is None           # the short leg's closing side
    link = ex.adopt_attached_stop("o-9", "Sell", 97.5, 50.0, ms(2))
    assert link and ex.adopt_attached_stop("o-9", "Sell", math.nan, 0.0, ms(2)) == link and link not in \
        [r.order_link_id for r in ex.pending()], "adopted once, never sent"
    res = ex.on_event(ExecEvent("fill", link, ms(2), exec_id="a1", qty=50.0, price=97.4, fee=2.0))
    assert res.status == "applied" and res.journal[0]["event"] == "sl" and ex.positions() == []
    assert {(r.action, r.order_link_id) for r in res.requests} == {("cancel", pos.tp_link), ("cancel", pos.sl_link)}
    assert ex.cash == pytest.approx(10_000.0 - 0.99 + 50 * (97.4 - 99.5) - 2.0)
    assert ex.adopt_attached_stop("o-10", "Sell", 97.5, 50.0, ms(2)) is None         # no open position left to match


def test_a_settled_order_is_forgotten_prune_bars_after_it_settled_not_after_it_was_requested():
    """The stop of a position held 15 bars fills: a re-read of that fill (reconciliation re-reads recent
    executions) stays a duplicate for PRUNE_BARS bars after the fill, though the stop was requested long before;
    only then is the order forgotten (a late event for it is reported unknown, never applied)."""
    from execution import PRUNE_BARS
    ex, _, _ = filled_long()
    pos = ex.slots[0]
    for i in range(1, 15):
        close(ex, i)
    fill = ExecEvent("fill", pos.sl_link, ms(15) - 1, exec_id="s1", qty=pos.qty, price=97.4, fee=1.0)
    assert ex.on_event(fill).status == "applied" and ex.positions() == []
    for i in range(15, 16 + PRUNE_BARS):
        close(ex, i)
        assert ex.on_event(fill).status == "duplicate", f"bar {i}: the fill would be applied again"
    close(ex, 16 + PRUNE_BARS)
    assert ex.on_event(fill).status == "unknown" and pos.sl_link not in ex.orders


def test_an_order_whose_fill_the_next_reconciliation_may_read_again_is_kept_however_long_ago_it_settled():
    """Reconciliations failed for longer than PRUNE_BARS bars: the engine's next re-read still starts before
    the stop's fill (reread_from_ms), so the stop keeps its exec id and the fill read again is a duplicate, not
    a new fill for whatever position is open then; once the re-read window has moved past it, it is pruned."""
    from execution import PRUNE_BARS
    ex, _, _ = filled_long()
    pos = ex.slots[0]
    ex.reread_from_ms = ms(2)
    fill = ExecEvent("fill", pos.sl_link, ms(3) - 1, exec_id="s1", qty=pos.qty, price=97.4, fee=1.0)
    assert ex.on_event(fill).status == "applied"
    for i in range(1, 8 + 3 * PRUNE_BARS):
        close(ex, i)
    assert ex.on_event(fill).status == "duplicate" and pos.sl_link in ex.orders
    ex.reread_from_ms = ms(3)
    close(ex, 8 + 3 * PRUNE_BARS)
    assert ex.on_event(fill).status == "unknown" and pos.sl_link not in ex.orders


def test_a_state_file_written_before_settled_bar_existed_still_loads():
    """Orders in an older state file lack `settled_bar` and `last_fill_ms`: they load with their defaults, and
    pruning counts from the next bar close that sees them settled."""
    ex, entry, _ = filled_long()
    state = json.loads(ex.to_json())
    for order in state["orders"]:
        del order["settled_bar"], order["last_fill_ms"]
    old = Execution.from_json(json.dumps(state), make_cfg())
    order = old.orders[entry.order_link_id]
    assert (order.settled_bar, order.last_fill_ms, order.filled) == (None, -1, entry.qty)
    assert json.loads(old.to_json())["slots"] == state["slots"] and old.seen_exec == ex.seen_exec


def test_a_stop_reported_before_a_position_filled_is_never_adopted_for_it():
    """A re-read execution of an older position's attached stop (its position long closed and forgotten) comes
    with the leg's closing side and, from the execution list, no trigger: it must not be taken for the stop of
    the position open now, whose entry filled after that execution."""
    ex, _, _ = filled_long()
    pos = ex.slots[0]
    assert ex.adopt_attached_stop("o-old", "Sell", math.nan, 0.0, pos.entry_ts_ms - 1) is None
    assert ex.adopt_attached_stop("o-new", "Sell", math.nan, 0.0, pos.entry_ts_ms) is not None


def test_rejected_and_cancelled_entries_stop_resting_and_repeats_are_reported():
    ex = Execution(make_cfg(), SYMBOL)
    (req,) = close(ex, 0, CHOP_LONG)
    res = ex.on_event(ExecEvent("rejected", req.order_link_id, ms(1), reason="EC_PostOnlyWillTakeLiquidity"))
    assert res.status == "applied" and res.journal[0]["event"] == "rejected" and ex.resting() == []
    assert ex.on_event(ExecEvent("rejected", req.order_link_id, ms(1))).status == "duplicate"
    assert ex.on_event(ExecEvent("accepted", req.order_link_id, ms(2))).status == "stale"
    (req2,) = close(ex, 1, CHOP_LONG)
    assert req2.order_link_id != req.order_link_id
    assert ex.on_event(ExecEvent("accepted", req2.order_link_id, ms(2))).status == "applied"
    assert ex.on_event(ExecEvent("cancelled", req2.order_link_id, ms(3))).status == "applied"
    assert ex.resting() == [] and ex.pending() == []
    assert ex.on_event(ExecEvent("expired", req2.order_link_id, ms(4))).status == "stale"


def test_expiry_cancels_the_resting_entry_and_keeps_asking_until_the_exchange_confirms():
    ex = Execution(make_cfg(time_limit_bars=2), SYMBOL)
    (req,) = close(ex, 0, CHOP_LONG)
    ex.on_event(ExecEvent("accepted", req.order_link_id, ms(1)))
    close(ex, 1)
    (cancel,) = close(ex, 2)
    assert (cancel.action, cancel.order_link_id, cancel.reason) == ("cancel", req.order_link_id, "expired")
    assert ex.resting() == [] and [r.action for r in ex.pending()] == ["cancel"]


def test_duplicate_exec_id_is_not_applied_twice():
    ex, entry, _ = filled_long()
    cash = ex.cash
    dup = ex.on_event(ExecEvent("fill", entry.order_link_id, ms(1) + 5, exec_id="x1", qty=1.0, price=99.5, fee=0.99))
    assert dup.status == "duplicate" and "x1" in dup.message and ex.cash == cash and ex.positions()[0].qty == 50.0


def test_fill_larger_than_the_order_or_the_position_is_invalid():
    ex, entry, _ = filled_long(0.5)
    over = ex.on_event(ExecEvent("fill", entry.order_link_id, ms(2), exec_id="x9", qty=26.0, price=99.5))
    assert over.status == "invalid" and "exceeds the order" in over.message and ex.positions()[0].qty == 25.0
    for bad in (0.0, -1.0, math.nan):
        assert ex.on_event(ExecEvent("fill", entry.order_link_id, ms(2), exec_id="y", qty=bad,
                                     price=99.5)).status == "invalid"
    assert ex.on_event(ExecEvent("filled", entry.order_link_id, ms(2))).status == "invalid"


def test_partial_entry_then_cancel_protects_the_filled_part():
    ex, entry, res = filled_long(0.4)
    assert res.requests == [] and res.journal[0]["event"] == "partially_filled" and ex.positions()[0].qty == 20.0
    assert ex.resting()[0].qty == 30.0
    res = ex.on_event(ExecEvent("cancelled", entry.order_link_id, ms(2)))
    tp, sl = res.requests
    assert tp.qty == sl.qty == 20.0 and tp.price == 100.7 and sl.price == 97.5
    late = ex.on_event(ExecEvent("fill", entry.order_link_id, ms(3), exec_id="late", qty=1.0, price=99.5))
    assert late.status == "stale" and ex.positions()[0].qty == 20.0
    early = ex.on_event(ExecEvent("fill", entry.order_link_id, ms(2) - 1, exec_id="early", qty=1.0, price=99.5))
    assert early.status == "applied" and ex.positions()[0].qty == 21.0      # it happened before the cancel


def test_unknown_and_stale_events_are_reported_with_the_link_id():
    ex, entry, _ = filled_long()
    foreign = ex.on_event(ExecEvent("fill", "manual-123", ms(2), exec_id="z", qty=1.0, price=100.0))
    assert foreign.status == "unknown" and "manual-123" in foreign.message and "not placed" in foreign.message
    ours = ex.on_event(ExecEvent("cancelled", order_link_id("somewhere else"), ms(2)))
    assert ours.status == "unknown" and "ours" in ours.message
    stale = ex.on_event(ExecEvent("cancelled", entry.order_link_id, ms(0)))
    assert stale.status == "stale" and entry.order_link_id in stale.message
    assert ex.on_event(ExecEvent("accepted", entry.order_link_id, ms(2))).status == "stale"   # filled already
    assert ex.on_event(ExecEvent("bogus", entry.order_link_id, ms(2))).status == "invalid"


def test_funding_is_shared_by_the_legs_positions_and_counted_in_pnl():
    ex, _, _ = filled_long()
    res = ex.on_event(ExecEvent("funding", "", ms(2), exec_id="f1", fee=0.5, side="Buy"))
    assert res.status == "applied" and ex.cash == pytest.approx(10_000.0 - 0.99 - 0.5)
    assert ex.on_event(ExecEvent("funding", "", ms(2), exec_id="f1", fee=0.5, side="Buy")).status == "duplicate"
    assert ex.on_event(ExecEvent("funding", "", ms(2), exec_id="f2", fee=0.5, side="Sell")).status == "unknown"
    pos = ex.slots[0]
    res = ex.on_event(ExecEvent("fill", pos.tp_link, ms(3), exec_id="x2", qty=50.0, price=100.7, fee=1.0))
    assert res.journal[0]["pnl"] == pytest.approx(60.0 - 0.99 - 1.0 - 0.5)


def test_closed_gate_blocks_the_entry_and_is_passed_to_decide():
    ex = Execution(make_cfg(), SYMBOL)
    assert close(ex, 0, CHOP_LONG, gate=st.EntryGate(False, "spread too wide")) == []
    assert len(close(ex, 1, CHOP_LONG, gate=st.EntryGate())) == 1


def test_state_json_is_strict_and_bad_state_is_refused_with_a_reason():
    ex, _, _ = filled_long()
    text = ex.to_json()
    assert "NaN" not in text and json.loads(text)["day"]["day"] == DAY // 86400
    fresh = Execution(make_cfg(), SYMBOL)
    back = Execution.from_json(fresh.to_json(), make_cfg())
    assert math.isnan(back.day.start_equity) and back.to_json() == fresh.to_json()
    with pytest.raises(ValueError, match="state version"):
        Execution.from_json(text.replace('"version": 1', '"version": 9'), make_cfg())
    with pytest.raises(ValueError, match="not readable"):
        Execution.from_json('{"version": 1, "symbol": "BTCUSDT"}', make_cfg())
