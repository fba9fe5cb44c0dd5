"""The live engine trading scripted probabilities on the paper exchange (real pybit, real WS, lockstep clock):
breakout and maker entries with their exchange-side stops and maker TPs, time exits that cancel the
position's own TP/SL, the kill-switch (flattens, holds after a restart), entries paused by a foreign
position, and every decision seeing the fills pushed inside its bar."""
from __future__ import annotations

import json

import pytest
from pybit.unified_trading import HTTP

import parity

from live_support import START_MS, SYMBOL, busy_probabilities, engine_cmd, exchange, journal, live_config, \
    make_market, run, write_model_dir, write_probabilities

WIDE = ("--set", "strategy.stop_loss_atr=40", "--set", "strategy.take_profit_atr=40",
        "--set", "strategy.max_holding_bars=3")


@pytest.fixture(scope="module")
def market(tmp_path_factory):
    return make_market(tmp_path_factory.mktemp("market"))


def exchange_orders(ex) -> list:
    return ex.call(lambda: list(ex.exchange.engine.orders.values()))


def trades(cwd, **match) -> list[dict]:
    return [r for r in journal(cwd, "trades") if all(r.get(k) == v for k, v in match.items())]


@pytest.fixture(scope="module")
def scripted(market, tmp_path_factory):
    """One run: a breakout long at 03:01, a maker short at 03:06; wide TP/SL so both leave by time exit."""
    cwd = tmp_path_factory.mktemp("scripted")
    model = write_model_dir(cwd)
    probs = write_probabilities(cwd / "p.csv", {"2026-01-01T03:01:00Z": {"p_dir_long": 0.95},
                                                "2026-01-01T03:06:00Z": {"p_exec_short": 0.99, "p_dir_short": 0.6}})
    with exchange(market) as ex:
        rc, out = run(engine_cmd(ex.url, model, market, "--probabilities", str(probs), "--max-bars", "16", *WIDE),
                      cwd)
        orders = exchange_orders(ex)
        final = ex.call(lambda: ex.exchange.state())
    assert rc == 0, out[-3000:]
    return cwd, orders, final


def own_stop(orders, entry) -> object:
    """The position's own stop: a reduce-only conditional market order of the entry's leg with a link id."""
    return next(o for o in orders if o.link_id and o.stop_order_type == "Stop" and o.reduce_only
                and o.position_idx == entry.position_idx)


def test_breakout_market_entry_carries_its_stop_from_the_fill(scripted):
    cwd, orders, _ = scripted
    entry = next(o for o in orders if o.order_type == "Market" and not o.reduce_only and o.link_id)
    assert entry.tpsl_mode == "Partial" and entry.stop_loss > 0, "stopLoss must be attached on create"
    fill = next(r for r in trades(cwd, kind="entry", event="filled") if r["reason"] == "breakout")
    attached = [o for o in orders if o.stop_order_type == "PartialStopLoss" and o.position_idx == 1]
    assert attached and min(o.created for o in attached) <= fill["ts"], \
        "the exchange stop exists from the moment of the (first partial) fill"
    own = own_stop(orders, entry)
    assert own.trigger_price * 0.01 == pytest.approx(fill["sl"], abs=1e-9) and own.qty == entry.cum_qty, \
        "the position's own stop: at its journaled level, whole size"
    assert own.trigger_price == entry.stop_loss, "strategy.py's stop rule: the attached stop's level, not moved"
    assert all(not o.is_open and o.updated == own.created for o in attached), \
        "the attached partial stops are cancelled as soon as the own stop stands (none may close another position)"


def test_maker_entry_fill_gets_a_maker_tp_and_a_stop_moved_to_the_fill(scripted):
    cwd, orders, _ = scripted
    entry = next(o for o in orders if o.tif == "PostOnly" and o.side == "Sell")
    assert entry.status == "Filled"
    fill = next(r for r in trades(cwd, kind="entry", event="filled") if r["side"] == "Sell")
    tp = next(o for o in orders if o.position_idx == 2 and o.order_type == "Limit" and o.reduce_only
              and o.link_id)
    assert tp.side == "Buy" and tp.tif == "GTC" and tp.price * 0.01 == pytest.approx(fill["tp"], abs=1e-9)
    stop = own_stop(orders, entry)
    assert stop.side == "Buy" and stop.trigger_price * 0.01 == pytest.approx(fill["sl"], abs=1e-9), \
        "stop at fill + SL distance"


def test_time_exit_closes_and_cancels_the_positions_own_tp_and_sl(scripted):
    cwd, orders, final = scripted
    exits = trades(cwd, event="time_exit")
    assert len(exits) == 2
    for idx in (1, 2):
        own = [o for o in orders if o.position_idx == idx and o.reduce_only and o.link_id == "" or
               (o.position_idx == idx and o.reduce_only and o.order_type == "Limit")]
        assert own and all(not o.is_open for o in own)
    assert final["open_orders"] == 0 and all(v == 0 for v in final["positions"].values())


def test_kill_switch_flattens_on_unrealised_loss_and_holds_after_restart(market, tmp_path):
    model = write_model_dir(tmp_path)
    probs = write_probabilities(tmp_path / "p.csv", {f"2026-01-01T03:{m:02d}:00Z": {"p_dir_long": 0.95}
                                                     for m in range(1, 12)})
    kill = ("--set", "strategy.daily_loss_limit=0.002")
    with exchange(market) as ex:
        rc, out = run(engine_cmd(ex.url, model, market, "--probabilities", str(probs), "--max-bars", "4", *kill),
                      tmp_path)
        assert rc == 0, out[-3000:]
        assert [e for e in journal(tmp_path, "events") if e["event"] == "kill_switch"]
        assert trades(tmp_path, event="kill_exit")
        state = ex.call(lambda: ex.exchange.state())
        assert all(v == 0 for v in state["positions"].values()) and state["open_orders"] == 0
        entries = len(trades(tmp_path, kind="entry", event="placed"))
        rc, out = run(engine_cmd(ex.url, model, market, "--probabilities", str(probs), "--max-bars", "3", *kill),
                      tmp_path)
    assert rc == 0, out[-3000:]
    assert len(trades(tmp_path, kind="entry", event="placed")) == entries, "halted until the next UTC day"
    assert journal(tmp_path, "signals")[-1]["reason"] == "kill-switch"


def test_foreign_position_pauses_entries(market, tmp_path):
    model = write_model_dir(tmp_path)
    probs = write_probabilities(tmp_path / "p.csv", {"2026-01-01T03:01:00Z": {"p_dir_long": 0.95}})
    with exchange(market) as ex:
        http = HTTP(api_key="paper", api_secret="paper")
        http.endpoint = ex.url
        http.switch_position_mode(category="linear", symbol=SYMBOL, mode=3)
        http.place_order(category="linear", symbol=SYMBOL, side="Sell", orderType="Market", qty="1",
                         positionIdx=2, orderLinkId="manual-1")
        rc, out = run(engine_cmd(ex.url, model, market, "--probabilities", str(probs), "--max-bars", "3"), tmp_path)
    assert rc == 0, out[-3000:]
    assert any(e["event"] == "external" for e in journal(tmp_path, "events"))
    sig = next(s for s in journal(tmp_path, "signals") if s["bar_time"].startswith("2026-01-01T03:01"))
    assert sig["entries_allowed"] is False and sig["reason"].startswith("external")
    assert not trades(tmp_path, kind="entry")


def test_each_decision_sees_the_fills_pushed_inside_its_bar(market, tmp_path):
    """Lockstep advances of 45 s cross 60 s bar ends mid-step, so a public message closes a bar while the
    private pushes of fills inside it may still be in flight. The engine's every intent must equal the parity
    decisions replay of its own journals (each fill applied before the first close after its stamp)."""
    sets = {"strategy.max_holding_bars": "2", "strategy.daily_loss_limit": "0.9"}
    model = write_model_dir(tmp_path, **sets)
    probs = busy_probabilities(tmp_path / "p.csv", minutes=30)
    with exchange(market) as ex:
        rc, out = run(engine_cmd(ex.url, model, market, "--probabilities", str(probs), "--lockstep-step", "45s",
                                 "--max-bars", "24"), tmp_path)
    assert rc == 0, out[-3000:]
    signals, fills = journal(tmp_path, "signals"), trades(tmp_path, event="filled")
    assert sum(f["ts"] % 60_000 != 0 for f in fills) >= 3, "fills stamped inside bars are what is tested"
    replay, _ = parity.replay_decisions(signals, journal(tmp_path, "trades"), live_config(**sets))
    engine = parity.engine_intents(signals)
    assert len(engine) >= 5
    result = parity.compare_intents(engine, replay)
    assert result.mismatches == 0, result.first


def test_drift_halt_pauses_entries_while_psi_exceeds_the_alert_level(market, tmp_path):
    """Training quantiles the live `atr` can never match (PSI far above live.drift_psi_alert): the drift alert
    is journaled and, with --drift-halt, the breakout the probabilities ask for is not entered."""
    model = write_model_dir(tmp_path)
    (model / "features.json").write_text(json.dumps({"quantiles": {"atr": [1e12 + i for i in range(11)]}}))
    probs = write_probabilities(tmp_path / "p.csv", {"2026-01-01T03:01:00Z": {"p_dir_long": 0.95}})
    with exchange(market) as ex:
        rc, out = run(engine_cmd(ex.url, model, market, "--probabilities", str(probs), "--max-bars", "3",
                                 "--drift-halt"), tmp_path)
    assert rc == 0, out[-3000:]
    alert = next(e for e in journal(tmp_path, "events") if e["event"] == "drift")
    assert alert["drift"]["atr"] > live_config().live.drift_psi_alert
    sig = next(s for s in journal(tmp_path, "signals") if s["bar_time"].startswith("2026-01-01T03:01"))
    assert sig["warm"] and sig["entries_allowed"] is False and sig["reason"] == "drift halt"
    assert not trades(tmp_path, kind="entry")


def test_no_drift_is_computed_over_bars_known_only_from_klines(market, tmp_path):
    """The same impossible quantiles, but the window comes from REST klines (no files): its bars' taker split and
    book are placeholders, not the market, so no PSI is computed over them and nothing alerts."""
    model = write_model_dir(tmp_path)
    (model / "features.json").write_text(json.dumps({"quantiles": {"atr": [1e12 + i for i in range(11)]}}))
    probs = write_probabilities(tmp_path / "p.csv", {})
    (tmp_path / "empty").mkdir()
    with exchange(market) as ex:
        rc, out = run(engine_cmd(ex.url, model, tmp_path / "empty", "--probabilities", str(probs), "--max-bars",
                                 "3"), tmp_path)
    assert rc == 0, out[-3000:]
    assert "from klines; warm in" in out
    assert not [e for e in journal(tmp_path, "events") if e["event"] == "drift"]
    assert journal(tmp_path, "equity")[-1]["drift"] == {}


def test_a_feature_within_its_chance_level_does_not_alert(market, tmp_path):
    """The same PSI, but training showed stretches of live.drift_window bars reaching it by chance
    (features.json psi_limits for that window): no drift alert, and --drift-halt lets the entry through."""
    model = write_model_dir(tmp_path)
    window = live_config().live.drift_window
    (model / "features.json").write_text(json.dumps({"quantiles": {"atr": [1e12 + i for i in range(11)]},
                                                     "psi_window": window, "psi_limits": {"atr": 9.0}}))
    probs = write_probabilities(tmp_path / "p.csv", {"2026-01-01T03:01:00Z": {"p_dir_long": 0.95}})
    with exchange(market) as ex:
        rc, out = run(engine_cmd(ex.url, model, market, "--probabilities", str(probs), "--max-bars", "3",
                                 "--drift-halt"), tmp_path)
    assert rc == 0, out[-3000:]
    assert not [e for e in journal(tmp_path, "events") if e["event"] == "drift"]
    equity = journal(tmp_path, "equity")[-1]
    assert equity["drift"]["atr"] > live_config().live.drift_psi_alert and equity["drift_levels"]["atr"] == 9.0
    sig = next(s for s in journal(tmp_path, "signals") if s["bar_time"].startswith("2026-01-01T03:01"))
    assert sig["entries_allowed"] is True


def test_a_stop_the_exchange_refuses_means_an_immediate_reduce_only_market_exit(market, tmp_path):
    """A short is left with its stops cancelled by hand while the engine is away and the market rises past
    its stop-loss. On restart the engine's stop for the uncovered leg is refused by the exchange's own
    trigger-side check (110092 "expect Rising ... trigger_price <= current") and the leg is closed at once
    by a reduce-only market order of the order lifecycle (execution.py): its fill closes the position there,
    so no phantom stays marked to market or gets a later time exit (max_holding_bars=2 on the restart would
    send one at the first close)."""
    model = write_model_dir(tmp_path, **{"strategy.stop_loss_atr": "8", "strategy.take_profit_atr": "40",
                                         "strategy.max_holding_bars": "200"})
    probs = write_probabilities(tmp_path / "p.csv", {"2026-01-01T03:01:00Z": {"p_dir_short": 0.95}})
    with exchange(market) as ex:
        rc, out = run(engine_cmd(ex.url, model, market, "--probabilities", str(probs), "--max-bars", "3"), tmp_path)
        assert rc == 0, out[-3000:]
        sl = trades(tmp_path, kind="entry", event="filled")[0]["sl"]
        http = HTTP(api_key="paper", api_secret="paper")
        http.endpoint = ex.url
        for order in http.get_open_orders(category="linear", symbol=SYMBOL)["result"]["list"]:
            if order["stopOrderType"]:
                http.cancel_order(category="linear", symbol=SYMBOL, orderId=order["orderId"])
        for _ in range(120):
            if float(http.get_tickers(category="linear", symbol=SYMBOL)["result"]["list"][0]["lastPrice"]) > sl:
                break
            ex.advance(60)
        held = ex.call(lambda: ex.exchange.state())["positions"][2]
        assert held < 0, "the short is still open, now beyond its stop"
        rc, out = run(engine_cmd(ex.url, model, market, "--probabilities", str(probs), "--max-bars", "3",
                                 "--set", "strategy.max_holding_bars=2"), tmp_path)
        orders = exchange_orders(ex)
        final = ex.call(lambda: ex.exchange.state())
    assert rc == 0, out[-3000:]
    assert "retCode 110092" in out and "expect Rising" in out, "the exchange itself refused the stop"
    assert any(e["message"].startswith("stop refused for leg-2") for e in journal(tmp_path, "events"))
    (exit_,) = [o for o in orders if o.link_id and o.order_type == "Market" and o.reduce_only and o.side == "Buy"
                and not o.stop_order_type]
    assert exit_.status == "Filled" and ex.exchange.inst.qty(exit_.cum_qty) == pytest.approx(-held)
    assert final["positions"][2] == 0
    (closed,) = [r for r in trades(tmp_path, kind="exit") if r["event"] == "sl"]
    assert closed["reason"] == "stop_refused" and closed["order_link_id"] == exit_.link_id
    lifecycle = json.loads(json.loads((tmp_path / "state" / f"bot_state_{SYMBOL}.json").read_text())["execution"])
    assert not any(lifecycle["slots"]), "the lifecycle holds no phantom of the closed position"
    assert lifecycle["last_equity"] == pytest.approx(final["wallet"], abs=0.01), "equity is the exchange's"
    assert not [r for r in trades(tmp_path, kind="exit", event="placed") if r["reason"] == "time"]


SHORT_WARMUP = {"features.macro_window": "15m", "features.day_window": "15m", "features.vwap_windows": "10m,15m",
                "features.z_window": "10m", "features.ema_spans": "5m,10m,15m", "features.atr_span": "5m",
                "features.rsi_span": "5m", "features.htf_timeframes": "5m", "features.htf_span": "1",
                "features.bb_window": "10m", "features.imbalance_z_window": "10m", "features.intraday_window": "10m",
                "features.slope_lag": "5m", "features.trend_window": "5m"}


def test_warm_up_from_rest_klines_trades_nothing_until_the_logged_warm_bar(market, tmp_path):
    """No history files: the window comes from the exchange's REST klines (00:00-02:59), whose book and
    taker-flow columns are unknown: the book and taker-flow features wait until the last kline bar is out of
    their reach (feature_engine.kline_warmup_bars). The log says how long until warm; every bar before that is
    not warm and enters nothing although the probabilities ask for a breakout on every bar; from that bar on it
    trades."""
    import feature_engine
    cfg = live_config(**SHORT_WARMUP)
    warm = feature_engine.kline_warmup_bars(cfg) - 1   # counted from 03:00, the bar after the last kline bar
    assert 0 < warm < feature_engine.warmup_bars(cfg)
    model = write_model_dir(tmp_path, **SHORT_WARMUP)
    probs = write_probabilities(tmp_path / "p.csv", {f"2026-01-01T03:{m:02d}:00Z": {"p_dir_long": 0.95}
                                                     for m in range(0, 40)})
    (tmp_path / "empty").mkdir()
    with exchange(market) as ex:
        rc, out = run(engine_cmd(ex.url, model, tmp_path / "empty", "--probabilities", str(probs),
                                 "--max-bars", str(warm + 2)), tmp_path)
    assert rc == 0, out[-3000:]
    assert "warm-up: 0 bars from files, 180 from klines" in out
    assert "FutureWarning" not in out   # pandas' deprecations (an all-NA concat) break the warm-up on upgrade
    assert f"warm in {warm} bars ({warm} min)" in out
    signals = journal(tmp_path, "signals")
    first_warm = START_MS + warm * 60_000
    before = [s for s in signals if s["bar_ms"] < first_warm]
    assert len(before) == warm and all(not s["warm"] and s["reason"] == "not warm" for s in before)
    assert not any(r["kind"] == "entry" for s in before for r in s["requests"])
    after = [s for s in signals if s["bar_ms"] >= first_warm]
    assert after[0]["warm"] and any(r["kind"] == "entry" for s in after for r in s["requests"])
