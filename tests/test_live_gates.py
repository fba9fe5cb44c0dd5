"""The engine's entry gates and degraded states, in process and in lockstep with the message stream:
a reconciliation that fails after a private-stream rebuild (keeps running, exits still go out, entries blocked
until one succeeds), the invalid-book / wide-spread / API-error gates (reason journaled, exits still act), and
the --model-dir forms. The engine's real code runs from book and trade messages (the MarketStream's own
message step, LiveBars, features, execution.py) to orders on the in-process matching engine of dry-run
(`SimHTTP` over `matching.MatchingEngine`); only the warm-up window is synthetic, so no server is needed."""
from __future__ import annotations

import json
import os
import signal

import numpy as np
import pandas as pd
import pytest
from pybit.exceptions import FailedRequestError

import data_loader
import exchange_client as exc
import live_trading_v2 as live
import orderbook as ob
from live_support import SYMBOL, write_model_dir, write_probabilities
from matching import Instrument, MatchingEngine

T0 = int(pd.Timestamp("2026-01-01T05:00", tz="UTC").value // 1_000_000)   # first live bar
MIN = 60_000
MID = 100.0


class Venue(live.SimHTTP):
    """The dry-run venue whose calls named in `failing` answer HTTP 503 (an exchange outage of those endpoints)."""

    failing: set[str] = set()

    def __getattr__(self, name: str):
        if name in self.failing:
            def fail(**_params):
                raise FailedRequestError(request=name, message="Service Unavailable", status_code=503, time="",
                                         resp_headers={})
            return fail
        return super().__getattr__(name)


def warm_window(bars: int = 300) -> pd.DataFrame:
    """`bars` complete 1-minute bars ending just before T0 (a random walk around MID; a 0.01 spread)."""
    close = MID + np.cumsum(np.random.default_rng(1).normal(0.0, 0.02, bars))
    idx = pd.DatetimeIndex(pd.to_datetime(T0 - MIN * np.arange(bars, 0, -1), unit="ms", utc=True), name="time")
    f = pd.DataFrame({"open": np.r_[close[0], close[:-1]], "close": close, "volume": 10.0, "vol_buy": 5.0,
                      "vol_sell": 5.0, "trade_count": 20, "dollar_val": 10.0 * close, "vwap": close,
                      "taker_buy_ratio": 0.5, "is_empty": False, "is_gap": False}, index=idx)
    f["high"], f["low"] = np.maximum(f.open, f.close) + 0.02, np.minimum(f.open, f.close) - 0.02
    for col in ob.BOOK_BAR_COLUMNS:
        f[col] = 0.01
    f["ob_mid_last"], f["ob_samples"], f["ob_bid_depth_mean"], f["ob_ask_depth_mean"] = close, 60, 50.0, 50.0
    return f[data_loader.BAR_COLUMNS]


class Harness:
    """An Engine in dry-run after startup (reconciled), fed stream messages by `book`/`trade`/`minute`."""

    def __init__(self, tmp_path, monkeypatch, probs: dict[str, dict[str, float]], *argv: str):
        monkeypatch.chdir(tmp_path)
        model = write_model_dir(tmp_path, **{"strategy.max_holding_bars": "2", "strategy.daily_loss_limit": "0.9"})
        table = write_probabilities(tmp_path / "p.csv", probs)
        setup = live.prepare(live.parse_args(["--symbol", SYMBOL, "--model-dir", str(model), "--probabilities",
                                              str(table), "--set", "live.max_retries=1", *argv]), env={})
        self.engine = e = live.Engine(setup, live.Clock(market=True, lockstep=True))
        e.client = exc.ExchangeClient(setup.cfg, None)
        e.client.rules = exc.InstrumentRules.from_bybit({
            "symbol": SYMBOL, "status": "Trading", "priceFilter": {"tickSize": "0.01"},
            "lotSizeFilter": {"qtyStep": "0.001", "minOrderQty": "0.001", "minNotionalValue": "5"}})
        r = e.client.rules
        e.sim = MatchingEngine(Instrument(SYMBOL, r.tick_size, r.qty_step, r.min_qty, r.min_notional), balance=10_000.0)
        self.venue = Venue(None, e.sim, e.sim_lock)
        self.venue.failing = set()
        e.client.http = self.venue
        e.client.set_position_mode("hedge")
        e._open_market(e.client.endpoints)
        e.private = exc.PrivateStream(e.client.endpoints, exc.Credentials("k", "s"), stale_after=60.0)   # never connected
        e._private_rebuilt()
        e.window = warm_window()
        e._exec = e._load_execution()
        assert e.reconcile("startup")
        self.u = 0

    def book(self, ts: int, bids: list, asks: list) -> None:
        """A book snapshot through the stream's own message step, then the engine's handling of it."""
        self.u += 1
        self.engine.market._on_topic({"topic": self.engine.market.book_topic, "type": "snapshot", "ts": ts,
                                      "cts": ts, "data": {"s": SYMBOL, "b": [[str(p), "50"] for p in bids],
                                                          "a": [[str(p), "50"] for p in asks],
                                                          "u": self.u, "seq": self.u}})
        self.engine._drain(0)

    def trade(self, ts: int, price: float = MID) -> None:
        self.engine._handle(("trades", [{"T": ts, "S": "Buy", "v": "1", "p": str(price), "i": f"t{ts}"}]))

    def minute(self, n: int, bids=(MID - 0.01,), asks=(MID + 0.01,)) -> dict:
        """Bar n (T0 + n minutes): its book and a trade, then a trade stamped at its end closes it (the book as
        the bar left it is the book at the decision); its signal."""
        start = T0 + n * MIN
        self.book(start, list(bids), list(asks))
        self.trade(start + 1000)
        self.trade(start + MIN)
        return self.signals()[-1]

    def signals(self) -> list[dict]:
        return journal(self.engine, "signals")

    def requests(self, sig: dict, kind: str) -> list[dict]:
        return [r for r in sig["requests"] if r["action"] == "create" and r["kind"] == kind]


def journal(engine: live.Engine, name: str) -> list[dict]:
    path = engine.journals.path(name)
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def bar_time(n: int) -> str:
    return pd.Timestamp(T0 + n * MIN, unit="ms", tz="UTC").strftime("%Y-%m-%dT%H:%M:%SZ")


BREAKOUTS = {bar_time(n): {"p_dir_long": 0.95} for n in range(8)}


def long_leg(h: Harness) -> float:
    return h.engine.sim.positions.get(1).size if 1 in h.engine.sim.positions else 0.0


def test_a_failed_reconciliation_after_a_private_rebuild_blocks_entries_but_not_exits(tmp_path, monkeypatch):
    h = Harness(tmp_path, monkeypatch, BREAKOUTS)
    first = h.minute(0)
    assert first["warm"] and first["entries_allowed"] and h.requests(first, "entry")
    h.trade(T0 + MIN + 500)
    assert long_leg(h) > 0, "the breakout entry filled on the simulated venue"
    h.engine.private.rebuilds += 1                      # the private stream was rebuilt: pushes may be lost
    h.venue.failing = {"get_executions"}
    assert h.engine._private_rebuilt() and not h.engine.health.reconciled
    assert not h.engine.reconcile("after a private-stream rebuild")
    failed = journal(h.engine, "events")[-1]
    assert failed["event"] == "reconcile_failed" and "entries blocked" in failed["message"]
    blocked = [h.minute(n) for n in (1, 2, 3)]
    assert all(not s["entries_allowed"] and s["reason"] == "not reconciled" and not h.requests(s, "entry")
               for s in blocked), "no entry while unreconciled although every bar asks for one"
    exits = [r for s in blocked for r in s["requests"] if r["kind"] == "exit"]
    assert exits and all(r["action"] == "create" for r in exits), "the time exit still goes out"
    h.trade(T0 + 4 * MIN + 500)
    assert long_leg(h) == 0, "and closes the position on the venue"
    assert any(r["action"] == "cancel" for s in blocked for r in s["requests"]), "cancels still go out"
    h.venue.failing = set()
    assert h.engine.reconcile("retry") and journal(h.engine, "events")[-1]["event"] == "reconciled"
    again = h.minute(4)
    assert again["entries_allowed"] and h.requests(again, "entry"), "entries resume once reconciled"


def test_a_fill_whose_push_was_lost_is_recovered_by_reconciliation_though_a_later_push_arrived(tmp_path,
                                                                                                 monkeypatch):
    """A stream down while an entry fills loses that fill's push; a later fill's push arrives. Reconciliation
    reads the executions since its previous run, not since the newest push, so the lost fill is applied (once)
    and the leg is not mistaken for an external position (which would pause entries)."""
    h = Harness(tmp_path, monkeypatch, BREAKOUTS)
    feed, lost = h.engine._on_private, []

    def stream_down(topic: str, rows: list) -> None:
        if topic == "execution":
            lost.extend(rows)
        else:
            feed(topic, rows)
    monkeypatch.setattr(h.engine, "_on_private", stream_down)
    h.minute(0)
    h.trade(T0 + MIN + 500)                      # the first entry fills; its execution push is lost
    monkeypatch.setattr(h.engine, "_on_private", feed)
    h.minute(1)
    h.trade(T0 + 2 * MIN + 500)                  # the second entry fills; its push arrives
    leg = live.leg_sizes(h.engine.client.positions())["1"]
    assert lost and leg > sum(float(r["execQty"]) for r in lost) > 0
    assert h.engine.reconcile("periodic")
    assert h.engine.health.external == [], journal(h.engine, "events")[-1]["message"]
    own = sum(p.qty for p in h.engine._exec.positions() if p.side > 0)
    assert own == pytest.approx(leg)
    fills = [r for r in journal(h.engine, "trades") if r["event"] in ("filled", "partially_filled")]
    assert len(fills) == len({(r["order_link_id"], r["qty"], r["price"]) for r in fills}), "each fill once"
    assert h.minute(2)["entries_allowed"]


def test_reconciliation_after_more_than_a_week_reads_every_seven_day_window_up_to_now(tmp_path, monkeypatch):
    """Bybit's execution list answers [startTime, startTime + 7 days] for a startTime alone. The previous
    reconciliation was 8 days ago (a long downtime) and an entry's fill push is lost now: reconciliation reads
    the executions in 7-day windows from then to now, so the fill is applied and the leg is not external."""
    h = Harness(tmp_path, monkeypatch, BREAKOUTS)
    feed = h.engine._on_private
    monkeypatch.setattr(h.engine, "_on_private", lambda topic, rows: topic == "execution" or feed(topic, rows))
    h.minute(0)
    h.trade(T0 + MIN + 500)                      # the entry fills; its execution push is lost
    monkeypatch.setattr(h.engine, "_on_private", feed)
    assert long_leg(h) > 0 and not h.engine._exec.positions()
    h.engine.state["exec_since_ms"] = T0 - 8 * 86_400_000
    windows, paged = [], h.engine.client._paged
    monkeypatch.setattr(h.engine.client, "_paged", lambda method, params: (
        windows.append((params["startTime"], params.get("endTime"))) if method == "get_executions" else None,
        paged(method, params))[1])
    assert h.engine.reconcile("periodic")
    assert h.engine.health.external == [], journal(h.engine, "events")[-1]["message"]
    leg = live.leg_sizes(h.engine.client.positions())["1"]
    assert sum(p.qty for p in h.engine._exec.positions()) == pytest.approx(leg)
    first = windows[:2]
    assert first[0][0] == T0 - 8 * 86_400_000 and first[0][1] == first[1][0] and first[1][1] > T0 + MIN
    assert all(end - start <= 7 * 86_400_000 for start, end in windows)


def test_a_fill_during_the_reconciliation_reads_is_not_taken_for_an_external_position(tmp_path, monkeypatch):
    """The market does not wait for a reconciliation: an own resting entry fills while its REST reads are in
    flight (after the executions were read). The legs are compared with own sizes only once they held still
    around the reads, so the fill is applied and nothing is called external."""
    h = Harness(tmp_path, monkeypatch, {bar_time(0): {"p_exec_long": 0.99, "p_dir_long": 0.6}},
                "--set", "strategy.limit_offset_atr=5")
    h.minute(0)
    resting = [o for o in h.engine.sim.orders.values() if o.is_open and not o.reduce_only and o.link_id]
    assert len(resting) == 1, "a maker entry rests below the market"
    price = float(resting[0].price) * float(h.engine.client.rules.tick_size) - 0.05
    paged = h.engine.client._paged

    def fill_after_reading(method: str, params: dict) -> list[dict]:
        rows = paged(method, params)
        if method == "get_executions" and h.engine.sim.active:
            with h.engine.sim_lock:   # a seller trades through the entry; its push has not arrived yet
                h.engine.sim.on_trade(price, 1e6, "Sell", T0 + MIN + 30_000)
        return rows
    monkeypatch.setattr(h.engine.client, "_paged", fill_after_reading)
    assert h.engine.reconcile("periodic")
    done = journal(h.engine, "events")[-1]
    assert done["event"] == "reconciled" and done["positions"]["1"] > 0, "the entry filled during the reads"
    assert done["external"] == [] and h.engine.health.external == [], done["message"]
    assert [r["qty"] for r in journal(h.engine, "trades") if r["event"] == "filled"] == [done["positions"]["1"]]


@pytest.mark.parametrize("bids, asks, reason", [
    ((MID + 0.02,), (MID + 0.01,), "book invalid (crossed)"),   # best bid above best ask
    ((MID - 0.01,), (), "book invalid (empty ask side)"),
    ((MID - 1.0,), (MID + 1.0,), "wide spread")])               # 2% > live.max_spread_pct
def test_an_unusable_book_closes_entries_and_the_reason_is_journaled(tmp_path, monkeypatch, bids, asks, reason):
    h = Harness(tmp_path, monkeypatch, BREAKOUTS)
    h.minute(0)
    h.trade(T0 + MIN + 500)
    assert long_leg(h) > 0
    gated = [h.minute(n, bids, asks) for n in (1, 2, 3)]
    assert all(not s["entries_allowed"] and s["reason"].startswith(reason) and not h.requests(s, "entry")
               for s in gated), "no entry although every bar asks for one"
    assert any(h.requests(s, "exit") for s in gated), "the time exit still acts"


def test_api_errors_close_entries_but_not_exits_until_a_call_succeeds(tmp_path, monkeypatch):
    h = Harness(tmp_path, monkeypatch, BREAKOUTS, "--set", "live.max_api_errors=1")
    h.minute(0)
    h.trade(T0 + MIN + 500)
    assert long_leg(h) > 0
    h.venue.failing = {"place_order"}
    sig = h.minute(1)
    assert sig["entries_allowed"] and h.requests(sig, "entry") and h.engine.health.api_errors == 1, \
        "a second entry whose outcome is unknown (HTTP 503)"
    h.venue.failing = set()
    gated = [h.minute(n) for n in (2, 3)]
    assert all(not s["entries_allowed"] and s["reason"] == "API errors" and not h.requests(s, "entry")
               for s in gated), "no entry although every bar asks for one"
    assert h.requests(gated[-1], "exit"), "the time exit still acts"
    assert h.engine.health.api_errors == 0, "a call that succeeds clears the count"
    assert h.minute(4)["entries_allowed"]


@pytest.mark.parametrize("keep", [False, True])
def test_sigint_stops_like_sigterm_and_keep_orders_leaves_resting_entries(tmp_path, monkeypatch, keep):
    """A real SIGINT to this process reaches the engine's handler (a stop request, not KeyboardInterrupt); the
    loop ends, state is saved, and the resting maker entry is cancelled unless --keep-orders."""
    h = Harness(tmp_path, monkeypatch, {bar_time(0): {"p_exec_long": 0.99, "p_dir_long": 0.6}},
                "--set", "strategy.limit_offset_atr=5", *(["--keep-orders"] if keep else []))
    h.minute(0)

    def resting() -> list:
        return [o for o in h.engine.sim.orders.values() if o.is_open and not o.reduce_only and o.link_id]
    assert len(resting()) == 1, "a maker entry rests far below the market"
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        signal.signal(signal.SIGINT, lambda *_: None)   # were the engine not to handle SIGINT, nothing would stop
        h.engine._install_signals()
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(1000):
            if h.engine.stop_event.is_set():
                break
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert h.engine.stop_event.is_set()
    h.engine._loop()
    h.engine.setup.state_file.unlink()
    h.engine._shutdown()
    assert len(resting()) == (1 if keep else 0)
    state = json.loads(h.engine.setup.state_file.read_text())
    assert state["version"] == live.STATE_VERSION and json.loads(state["execution"])["orders"]
    assert journal(h.engine, "events")[-1]["event"] == "shutdown"


def test_model_dir_accepts_the_root_the_symbol_folder_and_a_rank_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rank_1 = write_model_dir(tmp_path)
    rank_2 = rank_1.parent / "rank_2"
    rank_2.mkdir()
    (rank_2 / "params.json").write_text((rank_1 / "params.json").read_text())
    for given, chosen in ((tmp_path / "models_v9", rank_1), (tmp_path / "models_v9" / SYMBOL, rank_1),
                          (rank_2, rank_2), ("models_v9", rank_1)):
        setup = live.prepare(live.parse_args(["--symbol", SYMBOL, "--model-dir", str(given)]), env={})
        assert setup.model_dir.resolve() == chosen.resolve(), given


def test_log_features_journals_each_bars_feature_vector(tmp_path, monkeypatch):
    h = Harness(tmp_path, monkeypatch, {}, "--log-features")
    sig = h.minute(0)
    assert sig["features"]["atr"] == sig["atr"] and len(sig["features"]) > 20
    (tmp_path / "plain").mkdir()
    plain = Harness(tmp_path / "plain", monkeypatch, {})
    assert "features" not in plain.minute(0)


def test_a_paper_engines_journal_is_stamped_with_wall_time_until_the_exchange_speaks(tmp_path, monkeypatch):
    """Paper time is the market's: before the first exchange stamp it is unknown (0), so a journal record made
    then (model_loaded) carries the wall clock, never a 1970 time of a few ms; after it, the market's. A record
    with its own ts (a fill's execution time) has its ISO time from that ts, not from the moment it was written."""
    clock = live.Clock(market=True)
    journals = live.Journals(tmp_path, SYMBOL, "paper", clock)
    monkeypatch.setattr(clock, "wall_ms", lambda: T0 + 123)
    monkeypatch.setattr(clock, "monotonic", lambda: clock._seen_mono + 0.025)   # 25 ms after the engine began
    assert clock.exchange_ms() == 0
    assert journals.write("events", {"event": "model_loaded"})["ts"] == T0 + 123
    clock.saw(T0 - MIN)
    assert journals.write("events", {"event": "reconciled"})["ts"] >= T0 - MIN
    assert journals.write("events", {"event": "reconciled"})["ts"] < T0
    fill = journals.write("trades", {"event": "filled", "ts": T0 - 3 * MIN})   # a fill reported late keeps its time
    assert fill["ts"] == T0 - 3 * MIN and fill["time"] == live.iso(T0 - 3 * MIN)
    assert json.loads(journals.path("trades").read_text().splitlines()[-1])["time"] == fill["time"]


def test_the_intrabar_kill_switch_sees_every_price_of_a_trade_push(tmp_path, monkeypatch):
    """One publicTrade push may hold several trades (a sweep): a price inside it beyond the kill trigger halts
    the day even when the push's last price is back above it, as the backtest's adverse-extreme rule would."""
    import strategy
    h = Harness(tmp_path, monkeypatch, BREAKOUTS, "--set", "strategy.daily_loss_limit=0.002",
                "--set", "strategy.max_book_share=0")   # a full-size entry: its trigger lies near the price
    h.minute(0)
    h.minute(1)
    assert long_leg(h) > 0
    e = h.engine
    trigger, direction = strategy.kill_price(e._exec.positions(), e._exec.cash, e._exec.day, e.cfg.strategy)
    assert direction == 1 and trigger < MID
    h.book(T0 + 2 * MIN, [MID - 0.01], [MID + 0.01])
    ts = T0 + 2 * MIN + 5000
    e._handle(("trades", [{"T": ts, "S": "Sell", "v": "0.001", "p": f"{trigger - 0.01:.2f}", "i": "sweep-1"},
                          {"T": ts, "S": "Buy", "v": "0.001", "p": f"{MID:.2f}", "i": "sweep-2"}]))
    halts = [ev for ev in journal(e, "events") if ev["event"] == "kill_switch"]
    assert len(halts) == 1 and f"at {float(f'{trigger - 0.01:.2f}')}" in halts[0]["message"]
    assert e.state["halted_day"] == (T0 + 2 * MIN) // 86_400_000


def test_a_trade_pushed_twice_is_recorded_once(tmp_path, monkeypatch):
    """The same trade id twice (a duplicated push, or a trade in both the REST seed and the first pushes):
    the engine's own recording holds it once and counts the duplicate."""
    h = Harness(tmp_path, monkeypatch, {})
    h.minute(0)
    ts = T0 + MIN + 2000
    h.trade(ts, MID + 0.03)
    h.trade(ts, MID + 0.03)
    h.engine._recorder.flush()
    day = pd.Timestamp(ts, unit="ms", tz="UTC").strftime("%Y-%m-%d")
    rows = pd.read_csv(tmp_path / "data" / f"{SYMBOL}_Bybit" / "Trade" / f"{SYMBOL}{day}.csv", dtype=str)
    assert (rows["trdMatchID"] == f"t{ts}").sum() == 1
    assert h.engine._recorder.integrity.total("duplicate_trades") == 1
