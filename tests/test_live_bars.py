"""Live bars equal data_loader's: a simulated day replayed message by message through the paper exchange's
per-message publish mode into the engine (real pybit WS), column for column and bit for bit; the engine's
own recording reads back into the same bars; late trades are counted, never lost."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

import data_loader
from live_support import START, START_MS, SYMBOL, engine_cmd, exchange, journal, make_market, run, live_config, \
    write_model_dir, write_probabilities


def signal_only(cwd, market, *extra: str, data=None, start: str = START, advance: float = 0.0) -> str:
    """A --signal-only engine (flat scripted probabilities, warm-up from `data`, default `market`) against a
    per-message paper exchange replaying `market` from `start` (`advance` s later); its log, after a clean exit."""
    model = write_model_dir(cwd)
    probs = write_probabilities(cwd / "p.csv", {})
    with exchange(market, start=start) as ex:
        if advance:
            ex.advance(advance)
        rc, out = run(engine_cmd(ex.url, model, data or market, "--signal-only", "--probabilities", str(probs),
                                 *extra), cwd)
    assert rc == 0, out[-3000:]
    return out


@pytest.fixture(scope="module")
def market(tmp_path_factory):
    return make_market(tmp_path_factory.mktemp("market"))


@pytest.fixture(scope="module")
def replayed(market, tmp_path_factory):
    """25 bars of the simulated day replayed message by message into a --signal-only engine."""
    cwd = tmp_path_factory.mktemp("replayed")
    signal_only(cwd, market, "--max-bars", "25")
    return cwd


def loader_bars(folder) -> pd.DataFrame:
    cfg = live_config()
    cfg.data.data_dir, cfg.data.cache = str(folder), False
    return data_loader.load_bars(cfg)


def assert_bars_equal(signals: list[dict], want: pd.DataFrame) -> None:
    """Each journaled bar equals data_loader's row, column for column, bit for bit (NaN as null)."""
    for rec in signals:
        row = want.loc[pd.Timestamp(rec["bar_ms"], unit="ms", tz="UTC")]
        for col in data_loader.BAR_COLUMNS:
            got, exp = rec["bar"][col], row[col]
            if isinstance(exp, (float, np.floating)) and (exp != exp):
                assert got is None, (rec["bar_time"], col, got)
            elif isinstance(exp, (bool, np.bool_)):
                assert got == bool(exp), (rec["bar_time"], col)
            else:
                assert float(got) == float(exp), (rec["bar_time"], col, got, exp)


def test_bars_replayed_message_by_message_equal_data_loader(market, replayed):
    signals = journal(replayed, "signals")
    assert len(signals) == 25
    assert signals[0]["bar_ms"] == START_MS
    assert_bars_equal(signals, loader_bars(market))
    assert sum(r["bar"]["trade_count"] for r in signals) > 100


def test_the_engines_own_recording_reads_back_into_the_bars_it_built(replayed):
    """What the engine received, written by the collector's writer under data/<SYM>_Bybit, is read by
    data_loader into the same bars the engine journaled."""
    folder = replayed / "data" / f"{SYMBOL}_Bybit"
    assert {"Orderbook", "Trade"} <= {p.parent.name for p in folder.rglob("*") if p.is_file()}
    assert_bars_equal(journal(replayed, "signals"), loader_bars(folder))


def test_late_trades_are_counted_per_bar_and_never_lost(market, tmp_path):
    """Every trade push held back and delivered after the next one: those that land after their bar closed are
    counted per bar in the signals journal (and in total in the heartbeat), so each bar's trades equal
    data_loader's count once the late ones are added back."""
    import json
    model = write_model_dir(tmp_path)
    probs = write_probabilities(tmp_path / "p.csv", {})
    with exchange(market) as ex:
        ex.call(lambda: (setattr(ex.exchange.faults, "push_topic", f"publicTrade.{SYMBOL}"),
                         setattr(ex.exchange.faults, "reorder_pushes", 10 ** 9)))
        rc, out = run(engine_cmd(ex.url, model, market, "--signal-only", "--probabilities", str(probs),
                                 "--max-bars", "8"), tmp_path)
    assert rc == 0, out[-3000:]
    signals = journal(tmp_path, "signals")
    late: dict[int, int] = {}
    for rec in signals:
        for when, n in rec["late_trades"].items():
            ms = int(pd.Timestamp(when).value // 1_000_000)
            late[ms] = late.get(ms, 0) + n
    total = signals[-1]["late_trades_total"]
    assert total == sum(late.values()) > 0 and "late trade" in out
    beat = json.loads((tmp_path / "state" / f"heartbeat_{SYMBOL}.json").read_text())
    assert beat["late_trades"] >= total
    want = loader_bars(market)
    for rec in signals[:-2]:   # a bar's late trades arrive with the next trade push, before two more bars close
        expected = int(want.loc[pd.Timestamp(rec["bar_ms"], unit="ms", tz="UTC"), "trade_count"])
        assert rec["bar"]["trade_count"] + late.get(rec["bar_ms"], 0) == expected, rec["bar_time"]


def binance_as_bybit(realdata, symbol: str, topic: str):
    """The real Binance USD-M recording (README: 8 minutes across two files, unbroken pu chain) as the Bybit v5
    messages a live stream delivers, in recorded order: the REST snapshot and the diffs it joins (sequenced
    by orderbook.BinanceSync, as the collector does) become orderbook snapshot/delta messages with pu, each
    trade a publicTrade row (m=true: the seller was the taker)."""
    import gzip
    import orjson
    import orderbook as ob
    sync = ob.BinanceSync(ob.OrderBook())

    def delta(ev: dict) -> dict:
        return {"topic": topic, "type": "delta", "ts": ev["E"], "cts": ev["T"],
                "data": {"s": symbol, "b": ev["b"], "a": ev["a"], "u": ev["u"], "seq": ev["U"], "pu": ev["pu"]}}

    for day in ("20240718", "20240719"):
        with gzip.open(realdata / "binance_usdm" / f"usdm_{symbol.lower()}_{day}.gz", "rb") as fh:
            for raw in fh:
                obj = orjson.loads(raw.split(b" ", 1)[1])
                if "lastUpdateId" in obj:
                    yield {"topic": topic, "type": "snapshot", "ts": obj["T"], "cts": obj["T"],
                           "data": {"s": symbol, "b": obj["bids"], "a": obj["asks"], "u": obj["lastUpdateId"],
                                    "seq": obj["lastUpdateId"]}}
                    yield from (delta(ev) for ev in sync.on_snapshot(obj))
                elif obj["data"]["e"] == "depthUpdate":
                    if sync.on_diff(obj["data"]) == "applied":
                        yield delta(obj["data"])
                elif obj["data"]["e"] == "trade":
                    ev = obj["data"]
                    yield {"topic": f"publicTrade.{symbol}", "type": "snapshot", "ts": ev["E"],
                           "data": [{"T": ev["T"], "s": symbol, "S": "Sell" if ev["m"] else "Buy", "v": ev["q"],
                                     "p": ev["p"], "i": str(ev["t"]), "L": "ZeroPlusTick", "BT": False}]}


def test_real_binance_recording_through_the_live_path_equals_data_loader_on_its_recording(realdata, tmp_path,
                                                                                          monkeypatch):
    """The engine's own market path (MarketStream book handling, the event queue, LiveBars, the collector's
    writer) fed the real recording message by message; data_loader on the files it wrote gives the same
    bars, column for column."""
    import json
    import exchange_client as exc
    import live_trading_v2 as live
    monkeypatch.chdir(tmp_path)
    cfg = live_config()
    cfg.symbol = "BTCUSDT"
    folder = tmp_path / "models_v9" / "BTCUSDT" / "rank_1"
    folder.mkdir(parents=True)
    (folder / "params.json").write_text(json.dumps({"edge": True, "config": cfg.to_dict()}))
    setup = live.prepare(live.parse_args(["--symbol", "BTCUSDT", "--model-dir", str(folder), "--signal-only",
                                          "--probabilities", str(write_probabilities(tmp_path / "p.csv", {}))]),
                         env={})
    engine = live.Engine(setup)
    engine._open_market(exc.resolve_endpoints(setup.cfg.live, None))
    end = int(pd.Timestamp("2024-07-19T00:03", tz="UTC").value // 1_000_000)   # 23:57 -> 00:03, across midnight
    for msg in binance_as_bybit(realdata, "BTCUSDT", engine.market.book_topic):
        if int(msg["ts"]) >= end:
            break
        engine.market._on_topic(msg)
        engine._drain(timeout=0)
    for bar in engine._bars.close_until(end):
        engine.on_bar(bar)
    engine._recorder.close()
    signals = journal(tmp_path, "signals", "BTCUSDT")
    recorded = loader_bars(tmp_path / "data" / "BTCUSDT_Bybit")
    assert [s["bar_time"][11:16] for s in signals] == ["23:57", "23:58", "23:59", "00:00", "00:01", "00:02"]
    assert sum(s["bar"]["trade_count"] for s in signals) > 3000
    assert sum(s["bar"]["ob_samples"] for s in signals[1:]) > 250, "book columns come from the real book"
    assert_bars_equal(signals, recorded)


def test_recent_trades_complete_the_bar_in_progress_when_the_engine_starts(market, tmp_path):
    """Started 30 s into the 03:00 bar: REST recent trades give the trades the stream missed, so that bar's
    trade columns equal data_loader's; its book columns began late, so it is not warm."""
    out = signal_only(tmp_path, market, "--max-bars", "2", advance=30)
    first = journal(tmp_path, "signals")[0]
    assert first["bar_ms"] == START_MS and not first["warm"]
    want = loader_bars(market).loc[pd.Timestamp(START_MS, unit="ms", tz="UTC")]
    for col in ("open", "high", "low", "close", "volume", "vol_buy", "vol_sell", "trade_count", "dollar_val",
                "vwap", "taker_buy_ratio"):
        assert float(first["bar"][col]) == float(want[col]), col
    assert want["trade_count"] > 0 and "recent trades since" in out


def test_a_first_live_bar_without_trades_carries_the_warm_up_close(market, tmp_path):
    """No trade in the first live bar (a quiet minute of an illiquid symbol): the bar is flat at the last
    close of the warm-up window, as data_loader makes it, instead of NaN prices that stop the engine."""
    quiet = tmp_path / market.name
    shutil.copytree(market, quiet)
    day = quiet / "Trade" / f"{SYMBOL}2026-01-01.csv"
    trades = pd.read_csv(day, dtype=str)
    ts = trades["timestamp"].astype(float) * 1000
    trades[(ts < START_MS) | (ts >= START_MS + 60_000)].to_csv(day, index=False)
    signal_only(tmp_path, quiet, "--max-bars", "2")
    signals = journal(tmp_path, "signals")
    want = loader_bars(quiet)
    assert signals[0]["bar"]["trade_count"] == 0 and signals[1]["bar"]["trade_count"] > 0
    assert signals[0]["bar"]["open"] == want["close"].loc[:pd.Timestamp(START_MS - 60_000, unit="ms", tz="UTC")].iloc[-1]
    assert_bars_equal(signals, want)


def test_lockstep_refuses_to_start_before_the_streams_listen(market, tmp_path):
    """A lockstep replay whose public stream is not subscribed in time would lose the pushes of its first step
    (bars without their trades): the engine stops with the startup exit code and says which stream and why."""
    model = write_model_dir(tmp_path)
    probs = write_probabilities(tmp_path / "p.csv", {})
    with exchange(market) as ex:
        ex.exchange.subscribe_delay_s = 30.0
        rc, out = run(engine_cmd(ex.url, model, market, "--signal-only", "--probabilities", str(probs),
                                 "--max-bars", "2", "--set", "live.streams_ready_within=1s"), tmp_path)
    assert rc == 3, out[-3000:]
    assert "lockstep: public and private stream subscriptions not confirmed within 1 s" in out
    assert not journal(tmp_path, "signals")


def test_a_start_inside_a_bar_waits_only_for_the_book_features(market, tmp_path):
    """A watchdog restart lands inside a bar: recent trades make its trade columns whole, its book began late.
    Entries wait feature_engine.book_warmup_bars bars (the reach of the book features), not the longest
    warm-up of all features (3.2 days of 1m bars with the default windows)."""
    import feature_engine
    cfg = live_config()
    wait = feature_engine.book_warmup_bars(cfg)
    assert wait < feature_engine.warmup_bars(cfg)
    signal_only(tmp_path, market, "--max-bars", str(wait + 2), advance=30)
    warm = [s["warm"] for s in journal(tmp_path, "signals")]
    assert warm == [False] * wait + [True, True]


def test_the_book_kernels_are_loaded_before_the_streams_start(market):
    """After orderbook.load_kernels (the engine's warm-up), the stream's own work on recorded messages (apply,
    sample,
    top, stats, bar reduction) compiles or loads no further kernel: none is left for the stream thread."""
    import subprocess
    import sys
    from live_support import ROOT
    probe = f"""
import numba, data_loader, orderbook as ob
kernels = lambda: {{n: len(f.signatures) for n, f in vars(ob).items() if isinstance(f, numba.core.registry.CPUDispatcher)}}
ob.load_kernels(50, 60_000)
warmed = kernels()
book = ob.OrderBook(capacity=4096, sample_interval_ms=1000, levels=50)
for i, msg in zip(range(40), data_loader.iter_book_messages({str(market)!r})):
    book.apply_bybit(msg)
    book.advance(msg["ts"])
book.flush_samples()
ob.partial_book_bars(book.drain_samples(), 60_000)
book.top(1 << 62), book.stats(50)
assert kernels() == warmed, (warmed, kernels())
assert all(warmed[k] for k in ("on_message", "advance_clock", "book_stats", "_reduce_bars")), warmed
"""
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]



def truncated_before(market, root, end_ms: int):
    """A copy of the market's files holding only what was recorded before end_ms."""
    folder = root / market.name
    shutil.copytree(market, folder)
    for path in (folder / "Orderbook").iterdir():
        lines = path.read_text().splitlines(keepends=True)
        path.write_text("".join(line for line in lines if json.loads(line)["ts"] < end_ms))
    for path in (folder / "Trade").iterdir():
        trades = pd.read_csv(path, dtype=str)
        trades[trades["timestamp"].astype(float) * 1000 < end_ms].to_csv(path, index=False)
    return folder


def test_a_restart_does_not_trust_the_bar_the_last_run_stopped_in(market, tmp_path):
    """Run 1 stops 20 s into the 03:03 bar: its own recording holds that bar in part. Run 2 starts at 03:04 with
    research files only up to 03:00, so its warm-up reads 03:00-03:03 from the recording: the three bars run 1
    closed are whole and used; 03:03 is not (the state says where the recording is whole), so it comes from
    REST klines, instead of a short bar taken as the truth, and the book and taker-flow features wait for it
    (feature_engine.kline_warmup_bars), not every feature."""
    files = truncated_before(market, tmp_path / "files", START_MS)
    signal_only(tmp_path, market, "--lockstep-step", "40s", "--max-bars", "3", data=files)
    assert [s["bar_time"][11:16] for s in journal(tmp_path, "signals")] == ["03:00", "03:01", "03:02"]
    state = json.loads((tmp_path / "state" / f"bot_state_{SYMBOL}.json").read_text())
    assert state["recorded_until_ms"] == START_MS + 3 * 60_000
    out = signal_only(tmp_path, market, "--max-bars", "1", data=files, start="2026-01-01T03:04")
    import feature_engine
    wait = feature_engine.kline_warmup_bars(live_config()) - 1   # from 03:04, the bar after the kline bar
    assert f"warm-up: 183 bars from files, 1 from klines; warm in {wait} bars" in out, out[-3000:]   # 180 + 3
    assert wait + 1 < feature_engine.warmup_bars(live_config()) and not journal(tmp_path, "signals")[-1]["warm"]


def test_a_restart_soon_after_a_start_inside_a_bar_still_waits_for_that_bar(market, tmp_path):
    """Run 1 starts 30 s into 03:00 (its book from then on) and stops at 03:03:00; run 2 starts at once.
    Its warm-up reads 03:00-03:02 from run 1's recording, 03:00's book columns partial: the book features wait
    until that bar is out of their reach, as run 1 did, instead of being warm at once."""
    import feature_engine
    files = truncated_before(market, tmp_path / "files", START_MS)
    signal_only(tmp_path, market, "--lockstep-step", "30s", "--max-bars", "3", data=files, advance=30)
    wait = feature_engine.book_warmup_bars(live_config())
    state = json.loads((tmp_path / "state" / f"bot_state_{SYMBOL}.json").read_text())
    assert state["partial_bar"] == [START_MS, wait] and state["recorded_until_ms"] == START_MS + 3 * 60_000
    out = signal_only(tmp_path, market, "--max-bars", "1", data=files, start="2026-01-01T03:03")
    assert f"warm-up: 183 bars from files, 0 from klines; warm in {wait - 3} bars" in out, out[-3000:]


def test_history_shorter_than_the_warm_up_is_logged_as_the_wait_it_is(market, tmp_path):
    """A start one hour into the recorded data: 60 bars of files, the features need 135. The warm-up log says
    'warm in 75 bars', not 'warm now', and the 75th bar after the start is the first warm one."""
    import feature_engine
    need = feature_engine.warmup_bars(live_config())
    out = signal_only(tmp_path, market, "--max-bars", str(need - 60 + 2), start="2026-01-01T01:00")
    assert f"warm-up: 60 bars from files, 0 from klines; warm in {need - 60} bars" in out, out[-3000:]
    signals = journal(tmp_path, "signals")
    assert [s["warm"] for s in signals] == [False] * (need - 60) + [True, True]
    assert f"bar {signals[need - 60]['bar_time']}: warm: features and model in use" in out   # the moment it changes
