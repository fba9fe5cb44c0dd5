"""parity.py: each layer finds the change that belongs to it, the signals journal feeds backtest.py, and the
replay's child processes never outlive it. Engine journals here are written in the DESIGN §3 format from
research outputs (the engine's own end-to-end run needs live_trading_v2.py)."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import backtest
import data_loader
import feature_engine
import parity
from config import GlobalConfig
from live_trading_v2 import LOCKSTEP_PERIOD_BARS
from small_model import train_small_model
from test_backtest import random_market
from test_feature_engine import make_bars, small_cfg

TICK = 0.01


# ---------------------------------------------------------------- engine journals written as the engine does
def _num(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else float(x)


def signal_records(frame: pd.DataFrame, probs: pd.DataFrame, intents: pd.DataFrame | None = None,
                   bars: pd.DataFrame | None = None) -> list[dict]:
    """signals_<SYM>.jsonl records (one per bar), through a JSON round trip like the real file."""
    recs = []
    by_bar = {} if intents is None else dict(tuple(intents.groupby("time")))
    for when, row in frame.iterrows():
        p = probs.loc[when]
        rec = {"ts": int(when.value // 1_000_000), "bar_time": when.isoformat(), "symbol": "TESTUSDT",
               "mode": "paper", **{c: _num(row[c]) for c in ("open", "high", "low", "close", "atr")},
               "volume": _num(row.get("volume", 0.0)), "warm": bool(p.notna().all()),
               **{c: _num(p[c]) for c in parity.PROB_COLUMNS}, "entries_allowed": True, "intents": []}
        if when in by_bar:
            rec["intents"] = [{"kind": i.kind, "side": int(i.side), "price": _num(i.price), "qty": i.qty,
                               "tp_dist": _num(i.tp_dist), "sl_dist": _num(i.sl_dist), "reason": i.reason}
                              for i in by_bar[when].itertuples()]
        if bars is not None:
            rec["bar"] = {c: (bool(v) if isinstance(v, (bool, np.bool_)) else _num(v))
                          for c, v in bars.loc[when].items()}
        recs.append(json.loads(json.dumps(rec)))
    return recs


def trade_records(trades: pd.DataFrame) -> list[dict]:
    """trades_<SYM>.jsonl records as execution.py journals them: the entry placed, then filled in two
    executions (partially_filled, filled), and the exit fill (tp / sl / time_exit)."""
    recs = []
    for k, t in trades.iterrows():
        side, back = ("Buy", "Sell") if t["side"] == "long" else ("Sell", "Buy")
        pid = f"pos-{k}"
        entry = {"kind": "entry", "side": side, "fee": 0.0, "position_id": pid, "order_link_id": f"{pid}-entry",
                 "ts": int(t["entry_time"].value // 1_000_000), "reason": "chop"}
        recs += [{**entry, "event": "placed", "qty": t["qty"], "price": t["entry_price"]},
                 {**entry, "event": "partially_filled", "qty": t["qty"] / 4, "price": t["entry_price"],
                  "fee": t["entry_fee"] / 4},
                 {**entry, "event": "filled", "qty": t["qty"] * 3 / 4, "price": t["entry_price"],
                  "fee": t["entry_fee"] * 3 / 4}]
        kind = {"take_profit": "tp", "stop_loss": "sl"}.get(t["exit_reason"], "exit")
        recs.append({"event": {"tp": "tp", "sl": "sl"}.get(kind, "time_exit"), "kind": kind, "side": back,
                     "qty": t["qty"], "price": t["exit_price"], "fee": t["exit_fee"], "position_id": pid,
                     "ts": int(t["exit_time"].value // 1_000_000), "order_link_id": f"{pid}-{kind}",
                     "reason": t["exit_reason"]})
    return sorted(recs, key=lambda r: r["ts"])


@pytest.fixture(scope="module")
def market() -> tuple[pd.DataFrame, pd.DataFrame, GlobalConfig, backtest.BacktestResult]:
    """5m random market with random probabilities and its backtest (intents recorded)."""
    coarse, probs, _ = random_market(3000, seed=4)
    cfg = GlobalConfig()
    cfg.strategy.exec_threshold, cfg.strategy.direction_threshold = 0.5, 0.4
    cfg.strategy.daily_loss_limit = 0.05          # at 3 % an intrabar kill halts the last day: nothing left open
    result = backtest.run_backtest(coarse, probs, cfg, record_intents=True)
    assert len(result.trades) >= 20 and (result.intents["kind"] == "limit").sum() >= 5
    return coarse, probs, cfg, result


# ---------------------------------------------------------------- layer 1
def test_bars_layer_passes_equal_bars_and_names_the_first_changed_column() -> None:
    ref = make_bars(120, seed=3)
    recs = signal_records(ref.assign(atr=1.0), pd.DataFrame(0.1, index=ref.index, columns=parity.PROB_COLUMNS),
                          bars=ref)
    mine = parity.engine_bars(recs, data_loader.BAR_COLUMNS[:12] + [c for c in ref.columns
                                                                     if c.startswith("ob_")])
    same = parity.compare_bars(mine, ref)
    assert same.ok and same.compared == 120
    recs[50]["bar"]["ob_imbalance_mean"] += 1e-12       # a book statistic off in its last bits
    recs[70]["bar"]["volume"] += 0.001
    changed = parity.compare_bars(parity.engine_bars(recs, list(ref.columns)), ref)
    assert changed.mismatches == 2
    assert changed.first["bar"] == str(ref.index[50]) and changed.first["column"] == "ob_imbalance_mean"
    early = parity.compare_bars(parity.engine_bars(recs, list(ref.columns)), ref.iloc[1:])
    assert early.first == {"bar": str(ref.index[0]), "column": "*", "engine": "bar", "reference": "missing"}
    skipped = parity.compare_bars(parity.engine_bars(recs[:30] + recs[31:], list(ref.columns)), ref)
    assert skipped.details["bars_the_engine_skipped"] == 1
    assert skipped.first == {"bar": str(ref.index[30]), "column": "*", "engine": "missing", "reference": "bar"}


def test_bars_layer_leaves_out_only_the_book_columns_of_the_bar_the_data_ends_in() -> None:
    """The files end inside their last bar, so data_loader samples its book only up to the last recorded message
    while the engine's close samples it up to the bar's end: that bar's ob_* columns are not compared, every
    other column is, and every earlier bar's book columns are."""
    ref = make_bars(60, seed=5)
    recs = signal_records(ref.assign(atr=1.0), pd.DataFrame(0.1, index=ref.index, columns=parity.PROB_COLUMNS),
                          bars=ref)
    recs[-1]["bar"]["ob_samples"] += 1
    recs[-1]["bar"]["ob_spread_mean"] *= 60 / 59
    last = parity.compare_bars(parity.engine_bars(recs, list(ref.columns)), ref)
    assert last.ok and last.details["data_ends_in"] == str(ref.index[-1])
    later = ref.iloc[-1:].set_axis(ref.index[-1:] + (ref.index[1] - ref.index[0]))   # the data goes on
    more = parity.compare_bars(parity.engine_bars(recs, list(ref.columns)), pd.concat([ref, later]))
    assert more.mismatches == 1 and more.first["bar"] == str(ref.index[-1]) and more.details["data_ends_in"] is None
    recs[-1]["bar"]["close"] += 0.5
    moved = parity.compare_bars(parity.engine_bars(recs, list(ref.columns)), ref)
    assert moved.mismatches == 1 and moved.first["column"] == "close"


# ---------------------------------------------------------------- layer 2
@pytest.fixture(scope="module")
def model(tmp_path_factory) -> tuple[pd.DataFrame, GlobalConfig, object, Path]:
    """A small trained model on 5m bars with a short feature warm-up."""
    cfg = small_cfg()
    cfg.data.timeframe = "5m"
    bars = make_bars(700, seed=8)
    folder = tmp_path_factory.mktemp("rank_1")
    return bars, cfg, train_small_model(bars, cfg, folder), folder


def engine_feature_records(bars: pd.DataFrame, cfg: GlobalConfig, bundle, window: int, last: int,
                           short_at: int = -1) -> list[dict]:
    """What the engine logs for the last `last` bars, each computed on its `window`-bar window (one bar less
    at position short_at: the deliberate change)."""
    names = feature_engine.feature_names(cfg)
    recs = []
    for k in range(len(bars) - last, len(bars)):
        w = bars.iloc[k + 1 - window + (1 if k == len(bars) - last + short_at else 0):k + 1]
        f = feature_engine.compute_features(w, cfg).iloc[[-1]]
        p = bundle.predict(f[names]).iloc[0]
        recs.append(json.loads(json.dumps({
            "bar_time": bars.index[k].isoformat(), "warm": True, **{c: float(p[c]) for c in p.index},
            "features": {c: _num(float(f[c].iloc[0])) for c in names + ["atr"]}})))
    return recs


def test_features_layer_holds_on_the_engine_window_and_catches_one_bar_less(model) -> None:
    bars, cfg, bundle, _ = model
    window = feature_engine.warmup_bars(cfg) + 20
    good = parity.engine_features(engine_feature_records(bars, cfg, bundle, window, 12), window)
    result = parity.features_layer(good, bars, cfg, bundle)
    assert result.ok and result.compared == 12
    assert good[parity.PROB_COLUMNS].std().max() > 0     # the model is not a constant
    deviation = result.details["largest_full_history_deviation"]
    assert 0 < max(deviation.values()) < 1e-2               # later-started EWMs differ, within their tolerance
    assert result.details["largest_full_history_prob_deviation"] < 1e-2
    bad = parity.engine_features(engine_feature_records(bars, cfg, bundle, window, 12, short_at=5), window)
    caught = parity.features_layer(bad, bars, cfg, bundle)
    assert caught.mismatches == 1 and caught.first["bar"] == str(bars.index[len(bars) - 12 + 5])


# ---------------------------------------------------------------- layer 3
def test_decisions_layer_catches_a_limit_price_rounded_the_other_way(market) -> None:
    coarse, probs, cfg, result = market
    recs = signal_records(coarse, probs, result.intents)
    mine = parity.engine_intents(recs)
    assert parity.compare_intents(mine, result.intents).ok
    k = next(n for n, r in enumerate(recs) if any(i["kind"] == "limit" for i in r["intents"]))
    limit = next(i for i in recs[k]["intents"] if i["kind"] == "limit")
    raw = coarse["close"].iloc[k] - limit["side"] * cfg.strategy.limit_offset_atr * coarse["atr"].iloc[k]
    limit["price"] = round(raw / TICK) * TICK + (TICK if round(raw / TICK) * TICK == limit["price"] else 0.0)
    caught = parity.compare_intents(parity.engine_intents(recs), result.intents)
    assert caught.mismatches == 1
    assert caught.first["bar"] == str(coarse.index[k]) and caught.first["fields_differing"] == ["price"]
    del recs[k]["intents"][0]
    assert not parity.compare_intents(parity.engine_intents(recs), result.intents).ok


# ---------------------------------------------------------------- layer 4
def test_live_fills_become_the_backtest_trades(market) -> None:
    _, _, _, result = market
    live = parity.live_trades(trade_records(result.trades))
    bt = result.trades.sort_values("entry_time", kind="stable").reset_index(drop=True)
    assert len(live) == len(bt)
    for col in ("qty", "entry_price", "exit_price", "fees", "pnl"):
        np.testing.assert_allclose(live[col], bt[col], rtol=1e-12)
    entry_only = [r for r in trade_records(bt.iloc[:1]) if r["kind"] == "entry"]
    held = parity.live_trades(entry_only)
    assert list(held["exit_reason"]) == [parity.OPEN] and held["qty"].iloc[0] == bt["qty"].iloc[0]


def test_backtest_vs_live_reports_the_first_differently_settled_fill_within_tolerance(market) -> None:
    coarse, probs, cfg, result = market
    bt = result.trades.sort_values("entry_time", kind="stable").reset_index(drop=True)
    closed = bt[bt["exit_reason"] != "end_of_data"]          # still open in a live engine when the data ends
    assert len(closed) < len(bt)
    recs = trade_records(closed)
    k = 7
    exit_rec = next(r for r in recs if r["position_id"] == f"pos-{k}" and r["kind"] != "entry")
    exit_rec["price"] *= 1.0 + 3e-4 * (1 if bt.at[k, "side"] == "long" else -1)   # a better exit: 3 bps
    live = parity.live_trades(recs)
    eq = result.equity["equity"]
    args = (parity.engine_intents(signal_records(coarse, probs, result.intents)), result.intents, live, bt, eq,
            result.equity, 10000.0, 300, pd.Timedelta(minutes=65))
    ok = parity.backtest_vs_live(*args, parity.Tolerance())
    assert ok.ok, ok.first
    fill = ok.details["first_fill_divergence"]
    assert fill["index"] == k and fill["bar"] == str(bt.at[k, "entry_time"].floor("300s"))
    assert fill["backtest_state"]["equity"] == pytest.approx(eq.loc[:bt.at[k, "entry_time"]].iloc[-1])
    assert ok.details["trades_matched"] == len(closed) and ok.details["backtest_open_at_end"] == len(bt) - len(closed)
    assert ok.details["largest"]["price_bps"] == pytest.approx(3.0, rel=1e-6)
    assert (f"all equal; fills first settled differently at {fill['bar']}; trades {len(closed)} live / "
            f"{len(closed)} backtest, {len(closed)} matched") in ok.summary()   # what the counts hide
    strict = parity.backtest_vs_live(*args, parity.Tolerance(price_bps=2.0))
    assert strict.mismatches == 1 and strict.first["what"] == "beyond tolerance"
    silent = parity.backtest_vs_live(args[0], args[1], parity.live_trades([]), *args[3:], parity.Tolerance())
    assert silent.details["trades_matched"] == 0 and silent.first["checks"]["unmatched_share"] == 1.0
    early = parity.engine_intents(signal_records(coarse, probs, result.intents))
    first_bar = early["time"].iloc[0]
    early.loc[0, "qty"] += 0.001                              # an intent differs before any fill did
    moved = parity.backtest_vs_live(early, *args[1:], parity.Tolerance())
    assert moved.first["what"] == "intents differ before any fill did" and moved.first["bar"] == str(first_bar)
    assert f"first differ at {first_bar}, before any fill did" in moved.summary()
    late = parity.engine_intents(signal_records(coarse, probs, result.intents))
    after = int(np.flatnonzero(late["time"] > pd.Timestamp(fill["bar"]))[0])
    late.loc[after, "qty"] += 0.001                           # after the fills diverged: reported, not a mismatch
    later = parity.backtest_vs_live(late, *args[1:], parity.Tolerance())
    assert later.ok and (f"equal up to {fill['bar']}, where the fills first settled differently (the first intent "
                         f"difference follows at {late['time'].iloc[after]})") in later.summary()


# ---------------------------------------------------------------- signals -> backtest.py --signals
def test_signals_journal_converts_straight_into_backtest_signals_input(market, tmp_path) -> None:
    coarse, probs, cfg, _ = market
    first_warm = int(np.argmax(probs.notna().all(axis=1).to_numpy() & coarse["atr"].notna().to_numpy()))
    cold = probs.copy()
    cold.iloc[:first_warm + 5] = np.nan                      # the engine's warm-up bars: not warm, no signal
    path = tmp_path / "signals_TESTUSDT.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in signal_records(coarse, cold)))
    rows = parity.signals_to_backtest_csv(path, tmp_path / "signals.csv")
    assert rows == len(coarse) - first_warm - 5
    out = tmp_path / "bt"
    args = ["--signals", str(tmp_path / "signals.csv"), "--timeframe", "5m", "--out", str(out),
            "--set", "strategy.exec_threshold=0.5", "--set", "strategy.direction_threshold=0.4",
            "--set", f"strategy.daily_loss_limit={cfg.strategy.daily_loss_limit}"]
    assert backtest.main(args) == 0
    cfg.data.timeframe = "5m"
    span = coarse.index[first_warm + 5:]
    direct = backtest.run_backtest(coarse.loc[span], cold.loc[span].fillna(0.0), cfg).trades
    written = pd.read_csv(out / "closed_trades.csv")
    assert len(written) == len(direct) > 10
    np.testing.assert_allclose(written["pnl"], direct["pnl"], rtol=1e-9)


def test_a_torn_signals_line_is_named(tmp_path) -> None:
    path = tmp_path / "signals_X.jsonl"
    path.write_text('{"bar_time": "2026-01-01T00:00:00+00:00"}\n{"bar_time": "2026-01-01T00:05\n')
    with pytest.raises(parity.ParityError, match=r"signals_X.jsonl: line 2: not JSON"):
        parity.signals_to_backtest_csv(path, tmp_path / "out.csv")


# ---------------------------------------------------------------- orchestration
def test_a_missing_model_is_refused_before_anything_starts(tmp_path, capsys) -> None:
    code = parity.main(["--model-dir", str(tmp_path / "nope"), "--data-dir", str(tmp_path), "--start",
                        "2026-01-02", "--end", "2026-01-02", "--out", str(tmp_path / "out")])
    assert code == 2 and "no params.json" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_span_outside_the_data_is_refused_naming_the_days_it_covers(tmp_path) -> None:
    """A --start before the first file (the engine would begin at the data's first message) or an --end after
    the last is refused with the folder's days; a timed --end at the midnight after the last day is inside."""
    from paper_market import write_market
    folder = write_market(tmp_path, [100.0] * 10)
    first = last = "2026-01-01"   # paper_market's one day
    with pytest.raises(ValueError, match=f"--start 2020-01-01: the data in .* covers {first} to {last}"):
        parity.check_span(folder, "2020-01-01", last)
    after = "2026-01-02"
    with pytest.raises(ValueError, match=f"--end {after}: the data in .* covers {first} to {last}"):
        parity.check_span(folder, first, after)
    parity.check_span(folder, f"{first}T00:00", f"{after}T00:00")


def test_a_child_is_stopped_with_its_whole_process_group(tmp_path) -> None:
    """The paper exchange on a free port: ready when it prints its URL, gone (group and all) after stop."""
    from paper_market import write_market
    import signal
    folder = write_market(tmp_path, [100.0 + 0.01 * i for i in range(120)])
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)      # as in a parity run started in the background
    try:
        child = parity.Child("paper_exchange", ["--data-dir", str(folder), "--lockstep", "--port", "0"],
                             tmp_path / "px.log", tmp_path)
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        url = child.wait_for(r"listening on (http://127\.0\.0\.1:\d+)", 120).group(1)
        assert url.startswith("http://127.0.0.1:")
    finally:
        child.stop()
    assert child.proc.returncode != -signal.SIGKILL, "asked to stop (SIGINT), not killed"
    with pytest.raises(ProcessLookupError):
        os.killpg(child.proc.pid, 0)
    broken = parity.Child("paper_exchange", ["--data-dir", str(tmp_path / "missing"), "--port", "0"],
                          tmp_path / "bad.log", tmp_path)
    with pytest.raises(parity.ParityError, match="paper_exchange exited with 2 before it was ready"):
        broken.wait_for(r"listening on", 120)
    broken.stop()


def maker_entry_at_bar_0() -> tuple:
    """(cfg, 3 bar times, bars, probabilities, the Execution that decided, its maker entry at bar 0) on 5m bars."""
    import execution
    cfg = GlobalConfig()
    cfg.symbol, cfg.data.timeframe = "TESTUSDT", "5m"
    times = pd.date_range("2026-03-02", periods=3, freq="5min", tz="UTC")
    frame = pd.DataFrame({"open": 100.0, "high": 100.2, "low": 99.6, "close": 100.0, "atr": 0.5}, index=times)
    probs = pd.DataFrame({"p_exec_long": 0.9, "p_exec_short": 0.0, "p_dir_long": 0.6, "p_dir_short": 0.0},
                         index=times)
    live = execution.Execution(cfg, cfg.symbol)
    entry = next(r for r in live.on_bar_close(st_bar(signal_records(frame, probs)[0], 300)) if r.kind == "entry")
    return cfg, times, frame, probs, live, entry


def test_decisions_replay_applies_exactly_the_events_journaled_before_each_decision() -> None:
    """A maker entry decided at bar 0 fills inside bar 1. Each signals record names how many trades-journal
    records were written before its decision (`trades_lines`); the replay applies exactly those, whatever their
    stamps: with the fill journaled before bar 1's decision, bar 1's close sees the position (and, with no
    resting order left, places a new entry); with the same fill journaled after it, the entry still rests."""
    cfg, times, frame, probs, _, entry = maker_entry_at_bar_0()
    close1_ms = int(times[1].value // 1_000_000) + 300_000
    base = {"order_link_id": entry.order_link_id, "kind": "entry", "side": "Buy", "position_id": entry.position_id}
    journal = [{**base, "event": "placed", "ts": close1_ms - 300_000},
               {**base, "event": "accepted", "ts": close1_ms - 300_000},
               {**base, "event": "rejected", "order_link_id": "ps-follow-up", "ts": close1_ms + 5_000},
               {**base, "event": "filled", "ts": close1_ms, "qty": entry.qty, "price": entry.price, "fee": 0.01}]

    def replay(lines: list[int]) -> pd.DataFrame:
        signals = signal_records(frame, probs)
        for rec, n in zip(signals, lines):
            rec["trades_lines"] = n
        return parity.replay_decisions(signals, journal, cfg)[0]

    inside = replay([0, 4, 4])
    assert inside.attrs["event_statuses"] == {"applied": 2, "unknown": 1}
    assert list(inside["time"]) == [times[0], times[1]] and set(inside["kind"]) == {"limit"}
    assert [len(inside.attrs["states"][str(t)]["positions"]) for t in times] == [0, 1, 1]
    after = replay([0, 3, 4])
    assert list(after["time"]) == [times[0], times[2]]
    assert after.attrs["states"][str(times[1])]["resting"][0]["price"] == entry.price
    caught = parity.compare_intents(after, inside)
    assert caught.first["index"] == 1 and caught.first["bar"] == str(times[1])
    signals = signal_records(frame, probs)
    with pytest.raises(parity.ParityError, match="signals record 1 .* has no trades_lines"):
        parity.replay_decisions(signals, journal, cfg)


def test_decisions_replay_closes_a_position_the_engine_exited_because_its_stop_was_refused() -> None:
    """The engine, not a bar close, asks the lifecycle for a market exit when the exchange refuses a position's
    stop (Execution.exit_position, reason stop_refused). The replay asks the same when it reads that "placed"
    record, so the exit's fills close the position there too (they were "unknown" before, and the replay kept
    a position the engine no longer had: every later bar then differed)."""
    import execution
    cfg, times, frame, probs, live, entry = maker_entry_at_bar_0()
    signals = signal_records(frame, probs)
    close1_ms = int(times[1].value // 1_000_000) + 300_000
    base = {"order_link_id": entry.order_link_id, "kind": "entry", "side": "Buy", "position_id": entry.position_id}
    journal = [{**base, "event": "placed", "ts": close1_ms - 300_000},
               {**base, "event": "accepted", "ts": close1_ms - 300_000},
               {**base, "event": "filled", "ts": close1_ms - 1, "qty": entry.qty, "price": entry.price, "fee": 0.01}]
    for rec in journal[1:]:
        live.on_event(parity.exec_event(execution, rec))
    out = live.exit_position(entry.position_id, "stop_refused")[0]
    exit_base = {"order_link_id": out.order_link_id, "kind": "exit", "side": "Sell", "position_id": entry.position_id,
                 "reason": "stop_refused"}
    journal += [{**exit_base, "event": "placed", "ts": close1_ms + 1_000},
                {**exit_base, "event": "sl", "ts": close1_ms + 2_000, "qty": entry.qty, "price": 99.5, "fee": 0.02}]
    for rec, n in zip(signals, [0, 3, 5]):
        rec["trades_lines"] = n
    intents = parity.replay_decisions(signals, journal, cfg)[0]
    assert intents.attrs["event_statuses"] == {"applied": 3}
    assert [len(intents.attrs["states"][str(t)]["positions"]) for t in times] == [0, 1, 0]


def st_bar(rec: dict, bar_s: int):
    """The strategy.Bar the engine builds from a signals record (epoch-grid index)."""
    import strategy
    when = pd.Timestamp(rec["bar_time"])
    return strategy.Bar(index=int(when.timestamp()) // bar_s, time=when.timestamp(), close=rec["close"],
                        atr=rec["atr"], probs={c: rec[c] for c in parity.PROB_COLUMNS})


def test_parity_json_counts_every_layer_even_a_run_without_trades(tmp_path) -> None:
    """parity.json and the HTML report from layer results: counts per layer, the first difference, and
    zero trades shown as zero, not left out."""
    import argparse
    times = pd.date_range("2026-03-02", periods=3, freq="5min", tz="UTC")
    empty = pd.DataFrame(columns=["time"] + parity.INTENT_FIELDS)
    no_trades = pd.DataFrame(columns=["side", "entry_time", "exit_time", "qty", "entry_price", "exit_price",
                                      "fees", "pnl", "exit_reason"])
    equity = pd.DataFrame({"equity": 10000.0}, index=times)
    layers = [parity.LayerResult("bars", 3, 1, {"bar": str(times[1]), "column": "volume"}),
              parity.LayerResult("features", 3, 0), parity.LayerResult("decisions", 0, 0),
              parity.backtest_vs_live(empty, empty, no_trades, no_trades, equity["equity"], equity, 10000.0, 300,
                                      pd.Timedelta(minutes=65), parity.Tolerance())]
    args = argparse.Namespace(start="2026-03-02", end="2026-03-02", model_dir=tmp_path, data_dir=tmp_path, speed=0.0)
    parity.write_outputs(tmp_path, args, layers, equity["equity"], equity, parity.Tolerance(), 1.0)
    out = json.loads((tmp_path / "parity.json").read_text())
    assert out["ok"] is False and out["layers"]["bars"]["first"]["column"] == "volume"
    assert out["layers"]["bars"]["compared"] == 3 and out["layers"]["decisions"]["compared"] == 0
    assert out["clock"] == "lockstep"
    four = out["layers"]["backtest_vs_live"]
    assert four["ok"] and four["trades_live"] == 0 and four["trades_backtest"] == 0
    assert "PARITY BROKEN: bars" in (tmp_path / "parity_report.html").read_text()


# ---------------------------------------------------------------- end to end: the real command
E2E_START, E2E_END = "2026-01-02", "2026-01-03"     # two whole UTC days of 5m bars (--end is inclusive)
E2E_SETS = {"data.timeframe": "5m", "features.ema_spans": "15m,30m,60m", "features.atr_span": "30m",
            "features.rsi_span": "30m", "features.htf_timeframes": "15m,1h", "features.z_window": "1h",
            "features.vwap_windows": "1h,2h", "features.macro_window": "4h", "features.day_window": "2h"}


def busy_settings(bars: pd.DataFrame, cfg: GlobalConfig, bundle, start: str, end: str) -> dict:
    """Thresholds at quantiles of the model's own probabilities over [start, end], so it trades whatever it
    learnt; short holds, one position, small orders against the simulated book, no latency (lockstep has none)."""
    feats = feature_engine.compute_features(bars, cfg)
    probs = bundle.predict_where(feats[bundle.feature_names], feats["is_warm"].to_numpy(bool)).loc[start:end]
    p_exec, p_dir = probs.filter(like="p_exec").stack(), probs.filter(like="p_dir").stack()
    return {"strategy.exec_threshold": p_exec.quantile(0.5), "strategy.direction_threshold": p_dir.quantile(0.3),
            "strategy.aggressive_threshold": p_dir.quantile(0.7), "strategy.max_holding_bars": 2,
            "strategy.time_limit_bars": 2, "strategy.max_positions": 1, "strategy.daily_loss_limit": 0.9,
            "strategy.risk_per_trade": 0.00002, "live.window_bars": 1, "venue.latency_ms": 0}


def test_the_parity_command_holds_every_layer_over_two_days_on_a_small_model(tmp_path) -> None:
    """`parity.py` as run by hand (child processes: the lockstep paper exchange replaying a simulated market and
    the engine trading it with a small trained model, then the backtest of the span) over two whole days of 5m
    bars: layers 1-3 equal, layer 4 within the stated tolerance, parity.json counting bars, intents and trades.
    The span crosses midnight, where a new day's files start with a book snapshot and the day's kill-switch
    baseline rolls, and the data goes on a day past it (the last bar's book is whole). Thresholds are quantiles
    of the model's own probabilities, so it trades whatever the model learnt; orders are small against the
    simulated book so the two fill models stay comparable. The market trades at 0.4x the default rate, so two
    days of every message fit the suite's time."""
    import market_sim
    from live_support import SYMBOL, live_config
    folder = market_sim.simulate_run(symbol=SYMBOL, days=4, seed=5, out=tmp_path, book_interval="30s", levels=20,
                                     progress=False, params=market_sim.MarketParams(hawkes_mu=0.1)).folder
    cfg = live_config(**E2E_SETS)
    cfg.data.data_dir = str(folder)
    bars = data_loader.load_bars(cfg)
    model = tmp_path / "models_v9" / SYMBOL / "rank_1"
    bundle = train_small_model(bars.loc[bars.index < pd.Timestamp(E2E_START, tz="UTC")], cfg, model)
    sets = {**busy_settings(bars, cfg, bundle, E2E_START, E2E_END), **E2E_SETS}
    out = tmp_path / "parity_out"
    args = ["--model-dir", str(model), "--data-dir", str(folder), "--start", E2E_START, "--end", E2E_END,
            "--out", str(out), "--timeout", "1200", *sum((["--set", f"{k}={v}"] for k, v in sets.items()), [])]
    code = parity.main(args)
    summary = json.loads((out / "parity.json").read_text())
    layers = summary["layers"]
    assert code == 0, {k: v["first"] for k, v in layers.items()}
    assert summary["ok"] and all(layer["mismatches"] == 0 for layer in layers.values())
    assert layers["bars"]["compared"] == 576 and layers["bars"]["span"] == ["2026-01-02 00:00:00+00:00",
                                                                              "2026-01-03 23:55:00+00:00"]
    assert layers["features"]["compared"] == 576
    assert layers["decisions"]["compared"] >= 100 and layers["decisions"]["replayed_events"].get("applied", 0) > 0
    four = layers["backtest_vs_live"]
    assert four["trades_live"] >= 20 and four["trades_backtest"] >= 20 and four["trades_matched"] >= 20
    tol = parity.Tolerance()
    assert four["largest"]["price_bps"] <= tol.price_bps and four["largest"]["pnl_bps"] <= tol.pnl_bps
    assert four["largest"]["unmatched_share"] <= tol.unmatched_share
    html = (out / "parity_report.html").read_text()
    assert html.count("PARITY HOLDS") == 1
    assert all(f"<td>{name}</td>" in html for name in layers)   # the layers table names its rows
    assert f"trades {four['trades_live']} live / {four['trades_backtest']} backtest" in html
    events = parity.read_jsonl(out / "live" / "logs" / f"events_{SYMBOL}.jsonl")
    assert not [e["message"] for e in events if "without a stop" in e["message"]], "the stop guard saw a covered leg bare"
    periodic = [e for e in events if e["event"] == "reconciled" and e["message"].startswith("periodic")]
    every = LOCKSTEP_PERIOD_BARS   # on market time: every 5 bars (6 when a step stopped inside a bar)
    assert 576 // (every + 1) <= len(periodic) <= 576 // every and not [e for e in events if e["event"] == "external"]


def test_the_real_time_paced_replay_runs_the_timing_path_and_keeps_the_replayable_layers(tmp_path) -> None:
    """--speed N: the exchange's clock waits for the engine's startup reconciliation, then runs at N market
    seconds per wall second while the engine keeps its own clock (the timing path). Bars and fills may then
    depend on the machine; the layers computed from the engine's own window and journals cannot: every bar of
    the span is closed, and features and decisions hold."""
    import market_sim
    from live_support import SYMBOL, live_config
    folder = market_sim.simulate_run(symbol=SYMBOL, days=2, seed=6, out=tmp_path, book_interval="30s", levels=20,
                                     progress=False, params=market_sim.MarketParams(hawkes_mu=0.1)).folder
    cfg = live_config()
    cfg.data.data_dir = str(folder)
    bars = data_loader.load_bars(cfg)
    model = tmp_path / "models_v9" / SYMBOL / "rank_1"
    bundle = train_small_model(bars.loc[bars.index < pd.Timestamp("2026-01-02", tz="UTC")], cfg, model)
    sets = busy_settings(bars, cfg, bundle, "2026-01-02T00:00", "2026-01-02T00:11")
    out = tmp_path / "parity_out"
    code = parity.main(["--model-dir", str(model), "--data-dir", str(folder), "--start", "2026-01-02T00:00",
                        "--end", "2026-01-02T00:12", "--out", str(out), "--speed", "60", "--timeout", "600",
                        *sum((["--set", f"{k}={v}"] for k, v in sets.items()), [])])
    summary = json.loads((out / "parity.json").read_text())
    layers = summary["layers"]
    assert code in (0, 1) and summary["clock"] == "speed 60"
    assert layers["bars"]["compared"] == 12 and layers["bars"]["bars_the_engine_skipped"] == 0
    assert layers["features"]["ok"] and layers["features"]["compared"] == 12
    assert layers["decisions"]["ok"] and layers["decisions"]["compared"] > 0, layers["decisions"]["first"]
    with pytest.raises(SystemExit) as refused:
        parity.main(["--model-dir", str(model), "--data-dir", str(folder), "--start", "2026-01-02", "--end",
                     "2026-01-02", "--speed", "-1"])
    assert refused.value.code == 2
