"""Data loader: bars against independent pandas references, book sampling, bad input, cache, CLI."""
from __future__ import annotations

import gzip
import logging
import os
import re
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import numpy as np
import orjson
import pandas as pd
import pytest

import data_loader as dl
import orderbook as ob
from config import GlobalConfig

ROOT = Path(__file__).resolve().parents[1]
T0 = 1_767_225_600  # 2026-01-01 00:00:00 UTC
HEADER = "timestamp,symbol,side,size,price,tickDirection,trdMatchID,grossValue,homeNotional,foreignNotional"


# ------------------------------------------------------------------ synthetic files
def trade_rows(n: int, seed: int = 1, start: float = T0 + 0.5, span: float = 3 * 3600) -> pd.DataFrame:
    """Random trades with a quiet hole (so some bars are empty)."""
    rng = np.random.default_rng(seed)
    ts = np.sort(start + rng.uniform(0, span, n))
    ts = ts[(ts < start + 3600) | (ts > start + 3600 + 1200)]
    price = np.round(100 + np.cumsum(rng.normal(0, 0.05, len(ts))), 2)
    return pd.DataFrame({"timestamp": np.round(ts, 4), "symbol": "DEMOUSDT",
                         "side": rng.choice(["Buy", "Sell"], len(ts)), "size": np.round(rng.uniform(0.001, 2, len(ts)), 3),
                         "price": price})


def write_trades(path: Path, rows: pd.DataFrame, rpi: bool = False, unit: float = 1.0) -> None:
    """Bybit archive schema (optionally with the RPI column and a different timestamp unit)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [HEADER + (",RPI" if rpi else "")]
    for i, r in enumerate(rows.itertuples(index=False)):
        ts = f"{r.timestamp * unit:.0f}" if unit != 1.0 else f"{r.timestamp:.4f}"
        lines.append(f"{ts},{r.symbol},{r.side},{r.size},{r.price},ZeroPlusTick,id{i},{int(r.size * r.price * 1e8)},"
                     f"{r.size},{r.size * r.price}" + (",0" if rpi else ""))
    text = "\n".join(lines) + "\n"
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)


def book_messages(n: int, seed: int = 2, start_ms: int = T0 * 1000, step_ms: int = 250, u0: int = 1000,
                  symbol: str = "DEMOUSDT") -> list[dict]:
    """A snapshot then random deltas (u consecutive) around 100.00."""
    rng = np.random.default_rng(seed)
    msgs = [{"topic": f"orderbook.50.{symbol}", "type": "snapshot", "ts": start_ms,
             "data": {"s": symbol, "b": [[f"{100 - 0.01 * i:.2f}", "1.5"] for i in range(1, 30)],
                      "a": [[f"{100 + 0.01 * i:.2f}", "2"] for i in range(0, 30)], "u": u0, "seq": 7}, "cts": start_ms}]
    for k in range(1, n):
        bids = [[f"{100 - 0.01 * int(rng.integers(1, 40)):.2f}", str(rng.choice(["0", "0.5", "3.25"]))]
                for _ in range(int(rng.integers(0, 4)))]
        asks = [[f"{100 + 0.01 * int(rng.integers(0, 40)):.2f}", str(rng.choice(["0", "0.5", "3.25"]))]
                for _ in range(int(rng.integers(0, 4)))]
        ts = start_ms + k * step_ms
        msgs.append({"topic": f"orderbook.50.{symbol}", "type": "delta", "ts": ts,
                     "data": {"s": symbol, "b": bids, "a": asks, "u": u0 + k, "seq": 7 + k}, "cts": ts})
    return msgs


def write_book(path: Path, msgs: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = b"".join(orjson.dumps(m) + b"\n" for m in msgs)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def make_folder(root: Path, trades: pd.DataFrame | None = None, msgs: list[dict] | None = None) -> Path:
    folder = root / "DEMOUSDT_Sim"
    write_trades(folder / "Trade" / "DEMOUSDT2026-01-01.csv", trade_rows(3000) if trades is None else trades)
    write_book(folder / "Orderbook" / "2026-01-01_DEMOUSDT_ob50.data", book_messages(4000) if msgs is None else msgs)
    return folder


def config(folder: Path, **data) -> GlobalConfig:
    cfg = GlobalConfig()
    cfg.data.data_dir = str(folder)
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return cfg


# ------------------------------------------------------------------ references
def reference_trade_bars(rows: pd.DataFrame, rule: str) -> pd.DataFrame:
    """Independent pandas resample of the trades."""
    f = rows.assign(time=pd.to_datetime(rows["timestamp"], unit="s", utc=True)).set_index("time")
    f["buy"] = np.where(f["side"] == "Buy", f["size"], 0.0)
    r = f.resample(rule, label="left", closed="left")
    return pd.DataFrame({"open": r["price"].first(), "high": r["price"].max(), "low": r["price"].min(),
                         "close": r["price"].last(), "volume": r["size"].sum(), "vol_buy": r["buy"].sum(),
                         "trade_count": r["price"].count(), "dollar_val": (f["price"] * f["size"]).resample(rule).sum()})


def reference_samples(msgs: list[dict], interval_ms: int, levels: int) -> dict[int, tuple[float, float]]:
    """Dict-book replay: at each tick g, (imbalance, mid) of the book after every message with ts <= g."""
    bids: dict[Decimal, Decimal] = {}
    asks: dict[Decimal, Decimal] = {}
    out = {}
    i = 0
    g = ((msgs[0]["ts"] + interval_ms - 1) // interval_ms) * interval_ms
    while g < msgs[-1]["ts"]:
        while i < len(msgs) and msgs[i]["ts"] <= g:
            m = msgs[i]
            if m["type"] == "snapshot":
                bids, asks = {}, {}
            for side, lv in ((bids, m["data"]["b"]), (asks, m["data"]["a"])):
                for p, q in lv:
                    if Decimal(q) == 0:
                        side.pop(Decimal(p), None)
                    else:
                        side[Decimal(p)] = Decimal(q)
            i += 1
        top_b = sorted(bids.items(), reverse=True)[:levels]
        top_a = sorted(asks.items())[:levels]
        bd = float(sum(q for _, q in top_b))
        ad = float(sum(q for _, q in top_a))
        out[g] = ((bd - ad) / (bd + ad), float(top_b[0][0] + top_a[0][0]) / 2)
        g += interval_ms
    return out


# ------------------------------------------------------------------ bars
def test_bars_match_reference_and_grid_is_continuous(tmp_path: Path) -> None:
    rows = trade_rows(3000)
    folder = make_folder(tmp_path, rows)
    bars = dl.load_bars(config(folder, cache=False), "5m")
    ref = reference_trade_bars(rows, "5min")
    assert list(bars.columns) == dl.BAR_COLUMNS
    assert bars.index.name == "time" and str(bars.index.tz) == "UTC"
    assert (np.diff(bars.index.asi8) == 300 * 10 ** 9).all()
    full = ref[ref["trade_count"] > 0]
    got = bars.loc[full.index]
    for col in ("open", "high", "low", "close", "vol_buy", "trade_count"):
        np.testing.assert_allclose(got[col].to_numpy(float), full[col].to_numpy(float), rtol=1e-12, err_msg=col)
    np.testing.assert_allclose(got["volume"], full["volume"], rtol=1e-9)
    np.testing.assert_allclose(got["vwap"], full["dollar_val"] / full["volume"], rtol=1e-9)
    empty = bars[bars["is_empty"]]
    assert len(empty) >= 3 and (empty["volume"] == 0).all()
    prev_close = bars["close"].shift(1)[bars["is_empty"]]
    assert (empty[["open", "high", "low", "close"]].to_numpy() == prev_close.to_numpy()[:, None]).all()
    assert len(bars) == len(ref)


@pytest.mark.parametrize("tf,rule", [("1m", "1min"), ("15m", "15min"), ("1h", "1h"), ("4h", "4h")])
def test_other_timeframes(tmp_path: Path, tf: str, rule: str) -> None:
    rows = trade_rows(2000, seed=4, span=10 * 3600)
    folder = make_folder(tmp_path, rows)
    bars = dl.load_bars(config(folder, cache=False), tf)
    ref = reference_trade_bars(rows, rule)
    ref = ref[ref["trade_count"] > 0]
    np.testing.assert_allclose(bars.loc[ref.index, "close"], ref["close"])
    np.testing.assert_allclose(bars.loc[ref.index, "volume"], ref["volume"], rtol=1e-9)


def test_trade_on_bar_boundary_belongs_to_next_bar(tmp_path: Path) -> None:
    rows = pd.DataFrame({"timestamp": [T0 + 10.0, T0 + 299.9999, T0 + 300.0], "symbol": "DEMOUSDT",
                         "side": ["Buy", "Sell", "Buy"], "size": [1.0, 2.0, 4.0], "price": [10.0, 11.0, 12.0]})
    bars = dl.load_bars(config(make_folder(tmp_path, rows), cache=False), "5m")
    assert bars["volume"].tolist() == [3.0, 4.0]
    assert bars["close"].tolist() == [11.0, 12.0]
    assert bars["vol_sell"].tolist() == [2.0, 0.0] and bars["taker_buy_ratio"].iloc[0] == pytest.approx(1 / 3)


def test_book_columns_match_dict_reference(tmp_path: Path) -> None:
    msgs = book_messages(4000)
    folder = make_folder(tmp_path, msgs=msgs)
    bars = dl.load_bars(config(folder, cache=False, ob_levels=10, book_sample_interval="1s"), "1m")
    ref = reference_samples(msgs, 1000, 10)
    frame = pd.DataFrame(ref, index=["imbalance", "mid"]).T
    frame["bar"] = (frame.index // 60000) * 60000
    g = frame.groupby("bar")
    got = bars[bars["ob_samples"] > 0]
    keys = pd.to_datetime(g.size().index, unit="ms", utc=True)
    assert got.index.tolist() == keys.tolist()
    assert got["ob_samples"].tolist() == g.size().tolist()
    np.testing.assert_allclose(got["ob_imbalance_mean"], g["imbalance"].mean(), rtol=1e-9)
    np.testing.assert_allclose(got["ob_imbalance_last"], g["imbalance"].last(), rtol=1e-12)
    np.testing.assert_allclose(got["ob_mid_last"], g["mid"].last(), rtol=1e-12)
    assert bars.loc[bars["ob_samples"] == 0, "ob_spread_mean"].isna().all()


def test_book_carries_across_files_and_chunks(tmp_path: Path) -> None:
    msgs = book_messages(3000, step_ms=100)
    one = tmp_path / "one" / "DEMOUSDT_Sim"
    write_book(one / "Orderbook" / "2026-01-01_DEMOUSDT_ob50.data", msgs)
    two = tmp_path / "two" / "DEMOUSDT_Sim"
    write_book(two / "Orderbook" / "2026-01-01_DEMOUSDT_ob50.data.gz", msgs[:1700])
    write_book(two / "Orderbook" / "2026-01-02_DEMOUSDT_ob50.data", msgs[1700:])  # no snapshot: carried book
    results = []
    for folder, chunk in ((one, dl.CHUNK_BYTES), (two, 97)):
        replay = dl.BookReplay("DEMOUSDT", 1000, 20, tob_rows=256, chunk_bytes=chunk)
        samples, tob = [], []
        rep = replay.run(dl.list_files(folder).books, on_samples=samples.append, on_tob=tob.append)
        results.append((np.concatenate(samples), np.concatenate(tob), rep.book))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])
    assert results[0][2] == results[1][2] and results[1][2]["gaps"] == 0 and len(results[0][1]) == 3000


def test_bybit_real_file_replay_matches_reference(realdata: Path, tmp_path: Path) -> None:
    folder = tmp_path / "XRPUSDT_Bybit" / "Orderbook"
    folder.mkdir(parents=True)
    (folder / "2024-12-01_XRPUSDT_ob500.data").write_bytes((realdata / "bybit/2024-12-01_XRPUSDT_ob500.data").read_bytes())
    replay = dl.BookReplay("XRPUSDT", 0, 50)
    rep = replay.run(dl.list_files(folder.parent).books)
    assert rep.slow_path_lines == 0 and rep.book["messages"] == 50
    ref_b: dict[Decimal, Decimal] = {}
    ref_a: dict[Decimal, Decimal] = {}
    for m in dl.iter_book_messages(folder.parent):
        for side, lv in ((ref_b, m["data"]["b"]), (ref_a, m["data"]["a"])):
            for p, q in lv:
                side.pop(Decimal(p), None) if Decimal(q) == 0 else side.__setitem__(Decimal(p), Decimal(q))
    bp, bq, ap, aq = replay.book.top(10 ** 6)
    assert list(zip(bp, bq)) == [(float(p), float(q)) for p, q in sorted(ref_b.items(), reverse=True)]
    assert list(zip(ap, aq)) == [(float(p), float(q)) for p, q in sorted(ref_a.items())]


# ------------------------------------------------------------------ trade file variants
def test_rpi_gzip_and_millisecond_files_read_alike(tmp_path: Path) -> None:
    rows = trade_rows(1500, seed=9)
    plain = tmp_path / "a" / "DEMOUSDT_Sim"
    write_trades(plain / "Trade" / "DEMOUSDT2026-01-01.csv", rows)
    variant = tmp_path / "b" / "DEMOUSDT_Sim"
    write_trades(variant / "Trade" / "DEMOUSDT2026-01-01.csv.gz", rows, rpi=True)
    ms = tmp_path / "c" / "DEMOUSDT_Sim"
    rows_ms = rows.assign(timestamp=np.round(rows["timestamp"] * 1000) / 1000)
    write_trades(ms / "Trade" / "DEMOUSDT2026-01-01.csv", rows_ms, unit=1000.0)
    a = dl.load_bars(config(plain, cache=False), "5m")
    b = dl.load_bars(config(variant, cache=False), "5m")
    c = dl.load_bars(config(ms, cache=False), "5m")
    pd.testing.assert_frame_equal(a, b)
    np.testing.assert_allclose(c["volume"], a["volume"], rtol=1e-9)
    assert c.index.equals(a.index)


def test_unit_detection_not_fooled_by_first_row(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rows = trade_rows(500, seed=5)
    folder = tmp_path / "DEMOUSDT_Sim"
    path = folder / "Trade" / "DEMOUSDT2026-01-01.csv"
    write_trades(path, rows, unit=1000.0)
    lines = path.read_text().splitlines()
    first = lines[1].split(",")
    first[0] = str(int(first[0]) // 1000)          # a seconds value as the first row of a ms file
    lines[1] = ",".join(first)
    path.write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING):
        bars = dl.load_bars(config(folder, cache=False), "5m")
    assert "DEMOUSDT2026-01-01.csv:2: trade row skipped: timestamp unit differs" in caplog.text
    assert int(bars["trade_count"].sum()) == len(rows) - 1
    assert bars.index[0] >= pd.Timestamp("2026-01-01", tz="UTC")


# ------------------------------------------------------------------ bad input
def test_bad_lines_warned_with_file_and_line_good_data_kept(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rows = trade_rows(400, seed=6)
    folder = tmp_path / "DEMOUSDT_Sim"
    tpath = folder / "Trade" / "DEMOUSDT2026-01-01.csv"
    write_trades(tpath, rows)
    t_lines = tpath.read_text().splitlines()
    t_lines[5] = t_lines[5].replace(f",{rows['price'].iloc[4]},", ",12x.5,")
    t_lines[7], t_lines[8] = t_lines[8], t_lines[7]
    tpath.write_text("\n".join(t_lines) + "\n" + t_lines[-1][:25])   # truncated last row
    msgs = book_messages(600)
    bpath = folder / "Orderbook" / "2026-01-01_DEMOUSDT_ob50.data"
    bpath.parent.mkdir()
    raw = [orjson.dumps(m) for m in msgs]
    raw[10] = raw[10][:40] + b"#garbage" + raw[10][40:]
    raw[20] = raw[20].replace(b'"data":{', b'"data":{"b":[["abc","1"]],', 1).replace(b',"b":[', b',"x":[', 1)
    raw[30] = raw[30].replace(b'"DEMOUSDT"', b'"ETHUSDT"')
    bpath.write_bytes(b"\n".join(raw) + b"\n" + raw[-1][:-30])        # truncated last line
    write_book(folder / "Orderbook" / "2026-01-01_ETHUSDT_ob50.data", book_messages(5, symbol="ETHUSDT"))
    with caplog.at_level(logging.WARNING):
        bars, rep = dl.build_bars(dl.list_files(folder), "1m", 10, "1s")
    text = caplog.text
    assert "DEMOUSDT2026-01-01.csv:6: trade row skipped: non-numeric or non-positive price" in text
    assert f"DEMOUSDT2026-01-01.csv:{len(rows) + 2}: trade row skipped" in text
    assert "1 trade timestamp(s) earlier than the row before" in text
    assert "2026-01-01_DEMOUSDT_ob50.data:11: bad book line skipped: not valid JSON" in text
    assert "2026-01-01_DEMOUSDT_ob50.data:21: bad book line skipped: data.b[0] has a non-numeric price" in text
    assert "2026-01-01_DEMOUSDT_ob50.data:31: bad book line skipped: field data.s = 'ETHUSDT'" in text
    assert "2026-01-01_DEMOUSDT_ob50.data:601: bad book line skipped: not valid JSON" in text
    assert "2026-01-01_ETHUSDT_ob50.data: file is for ETHUSDT, not DEMOUSDT; skipped" in text
    assert rep.bad_trade_rows == 2 and rep.trade_rows == len(rows) - 1 and rep.out_of_order_trades == 1
    assert rep.bad_book_lines == 4 and len(rep.skipped_files) == 1
    assert rep.book["messages"] == 597 and rep.book["gaps"] == 1
    assert int(bars["trade_count"].sum()) == len(rows) - 1


def test_empty_or_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(dl.DataError, match="does not exist"):
        dl.load_bars(config(tmp_path / "nope"))
    (tmp_path / "empty" / "Trade").mkdir(parents=True)
    with pytest.raises(dl.DataError, match="no data in"):
        dl.load_bars(config(tmp_path / "empty"))


def test_require_data_names_the_symbol_and_days_the_folder_holds(tmp_path: Path) -> None:
    folder = make_folder(tmp_path)
    write_trades(folder / "Trade" / "DEMOUSDT2026-01-03.csv", trade_rows(50))
    cfg = config(folder, start="2026-01-01", end="2026-01-03")
    assert dl.require_data(cfg).symbol == "DEMOUSDT"
    cfg.symbol = "BTCUSDT"
    with pytest.raises(dl.DataError, match=f"symbol BTCUSDT: the data in {folder} is DEMOUSDT"):
        dl.require_data(cfg)
    for start, end, wrong in (("2026-03-01", "", "start 2026-03-01"), ("", "2026-01-04", "end 2026-01-04"),
                              ("2025-12-31", "2026-01-02", "start 2025-12-31")):
        with pytest.raises(dl.DataError, match=f"{wrong}: the data in .* covers 2026-01-01 to 2026-01-03"):
            dl.require_data(config(folder, start=start, end=end))
    with pytest.raises(dl.DataError, match="does not exist"):
        dl.require_data(config(tmp_path / "nope"))


def test_cli_error_exit_code_without_traceback(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(ROOT / "data_loader.py"), "inspect", str(tmp_path / "missing")],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2
    assert "does not exist" in out.stderr and "Traceback" not in out.stderr


# ------------------------------------------------------------------ cache
def test_cache_used_and_invalidated(tmp_path: Path) -> None:
    folder = make_folder(tmp_path)
    cfg = config(folder)
    first = dl.load_bars(cfg, "5m")
    cached = list((folder / ".cache").glob("*.parquet"))
    assert len(cached) == 1
    pd.testing.assert_frame_equal(dl.load_bars(cfg, "5m"), first, check_freq=False)
    tpath = folder / "Trade" / "DEMOUSDT2026-01-01.csv"
    rows = trade_rows(3000).assign(size=lambda f: f["size"] * 2)
    write_trades(tpath, rows)
    os.utime(tpath, ns=(cached[0].stat().st_mtime_ns, cached[0].stat().st_mtime_ns + 1))
    again = dl.load_bars(cfg, "5m")
    np.testing.assert_allclose(again["volume"], first["volume"] * 2)
    cfg.data.ob_levels = 5
    shallow = dl.load_bars(cfg, "5m")
    assert not np.allclose(shallow["ob_bid_depth_mean"].dropna(), again["ob_bid_depth_mean"].dropna())


# ------------------------------------------------------------------ replay iterators and CLI
def test_iterators_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rows = trade_rows(800, seed=8)
    msgs = book_messages(300)
    folder = make_folder(tmp_path, rows, msgs)
    got = list(dl.iter_book_messages(folder))
    assert [m["data"]["u"] for m in got] == [m["data"]["u"] for m in msgs]
    chunks = list(dl.iter_trades(folder))
    trades = pd.concat(chunks)
    assert list(trades.columns) == ["timestamp", "side", "size", "price", "trdMatchID"]
    np.testing.assert_allclose(trades["timestamp"], rows["timestamp"])
    assert dl.main(["tob", str(folder), "-o", str(tmp_path / "tob.csv")]) == 0
    tob = pd.read_csv(tmp_path / "tob.csv")
    assert list(tob.columns) == ["ts", "u", "bid", "bid_size", "ask", "ask_size"] and len(tob) == 300
    book = ob.OrderBook()
    for m in msgs:
        book.apply_bybit(m)
    assert (tob.iloc[-1]["bid"], tob.iloc[-1]["ask"]) == (book.best_bid(), book.best_ask())
    assert dl.main(["bars", str(folder), "--timeframe", "15m", "-o", str(tmp_path / "bars.csv")]) == 0
    assert len(pd.read_csv(tmp_path / "bars.csv")) == len(reference_trade_bars(rows, "15min"))
    assert dl.main(["inspect", str(folder)]) == 0
    report = capsys.readouterr().out
    assert "symbol DEMOUSDT" in report and f"{len(rows)} rows, 0 bad" in report and "2026-01-01  trades" in report
    assert "300 messages, 1 snapshots, 0 bad lines, 0 gaps" in report
    assert "samples      75 valid book samples every 1s" in report


def test_binance_recording_as_data_file_matches_book_ticker(realdata: Path, tmp_path: Path) -> None:
    """The recorder's path: real Binance diffs written as .data lines (with pu), replayed by the fast kernel."""
    sync = ob.BinanceSync(ob.OrderBook())
    lines: list[bytes] = []
    tickers: list[dict] = []

    def delta(ev: dict) -> bytes:
        return orjson.dumps({"topic": "orderbook.1000.ETHUSDT", "type": "delta", "ts": ev["T"],
                             "data": {"s": "ETHUSDT", "b": ev["b"], "a": ev["a"], "u": ev["u"], "seq": ev["U"],
                                      "pu": ev["pu"]}, "cts": ev["E"]})

    for day in ("20240718", "20240719"):
        with gzip.open(realdata / "binance_usdm" / f"usdm_ethusdt_{day}.gz", "rb") as fh:
            for raw in fh:
                obj = orjson.loads(raw.split(b" ", 1)[1])
                if "lastUpdateId" in obj:
                    lines.append(orjson.dumps({"topic": "orderbook.1000.ETHUSDT", "type": "snapshot", "ts": obj["T"],
                                               "data": {"s": "ETHUSDT", "b": obj["bids"], "a": obj["asks"],
                                                        "u": obj["lastUpdateId"], "seq": obj["lastUpdateId"]}}))
                    lines.extend(delta(ev) for ev in sync.on_snapshot(obj))
                elif obj["data"]["e"] == "depthUpdate":
                    if sync.on_diff(obj["data"]) == "applied":
                        lines.append(delta(obj["data"]))
                elif obj["data"]["e"] == "bookTicker":
                    tickers.append(obj["data"])
    folder = tmp_path / "ETHUSDT_Binance" / "Orderbook"
    folder.mkdir(parents=True)
    (folder / "2024-07-18_ETHUSDT_ob1000.data").write_bytes(b"\n".join(lines) + b"\n")
    replay = dl.BookReplay("ETHUSDT", 1000, 50, tob_rows=4096, chunk_bytes=1 << 16)
    tob: list[np.ndarray] = []
    rep = replay.run(dl.list_files(folder.parent).books, on_tob=tob.append)
    table = np.concatenate(tob)
    rows = {int(r[1]): tuple(r[2:]) for r in table}
    assert rep.slow_path_lines == 0 and rep.book["gaps"] == 0 and len(table) == len(lines)
    compared = [t for t in tickers if int(t["u"]) in rows]
    print(f"ETHUSDT via .data: {len(compared)} bookTicker events compared")
    assert len(compared) > 300
    assert all(rows[int(t["u"])] == (float(t["b"]), float(t["B"]), float(t["a"]), float(t["A"])) for t in compared)


def test_timestamps_far_from_the_files_day_are_rejected(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rows = trade_rows(300, seed=12)
    rows.loc[5, "timestamp"] = 1.0                    # epoch 1970: would stretch the bar grid over decades
    msgs = book_messages(200)
    msgs[50]["ts"] = 9_000_000_000_000                # year 2255: would stop the sampling clock
    folder = make_folder(tmp_path, rows, msgs)
    with caplog.at_level(logging.WARNING):
        bars, rep = dl.build_bars(dl.list_files(folder), "5m", 10, "1s")
    assert "DEMOUSDT2026-01-01.csv:7: trade row skipped: timestamp far outside the file's day" in caplog.text
    assert "2026-01-01_DEMOUSDT_ob50.data:51: bad book line skipped: field ts = 9000000000000" in caplog.text
    assert bars.index[0] >= pd.Timestamp("2026-01-01", tz="UTC") and len(bars) < 40
    assert rep.bad_trade_rows == 1 and rep.bad_book_lines == 1 and rep.book["time_reversals"] == 0


# ------------------------------------------------------------------ data gaps (issue 17, item 4)
def test_missing_day_is_warned_by_name_and_its_bars_are_gaps(missing_day_folder: Path,
                                                            caplog: pytest.LogCaptureFixture,
                                                            capsys: pytest.CaptureFixture) -> None:
    from conftest import MISSING_DAY

    with caplog.at_level(logging.WARNING, logger="data_loader"):
        bars = dl.load_bars(config(missing_day_folder, cache=False), "5m")
    warned = [r.getMessage() for r in caplog.records if MISSING_DAY in r.getMessage()]
    assert any(f"Trade/DEMOUSDT{MISSING_DAY}.csv" in m and f"Orderbook/{MISSING_DAY}_DEMOUSDT" in m for m in warned)
    assert any(f"data gap {MISSING_DAY} 00:00 -> 2026-01-04 00:00 UTC (24h00m, 288 bars)" in m for m in warned)
    day = bars.index.strftime("%Y-%m-%d") == MISSING_DAY
    assert len(bars) == 7 * 288 and list(bars.columns) == dl.BAR_COLUMNS and bars["is_gap"].dtype == bool
    assert bars["is_gap"].to_numpy().tolist() == day.tolist()  # exactly the 288 bars of the day, nothing else
    assert dl.main(["inspect", str(missing_day_folder)]) == 0
    report = capsys.readouterr().out
    assert f"missing      {MISSING_DAY}: Trade, Orderbook file" in report
    assert f"gap        {MISSING_DAY} 00:00 -> 2026-01-04 00:00 UTC (24h00m, 1440 bars)" in report


def quiet_hole_folder(root: Path, hole: tuple[float, float]) -> Path:
    """Three hours of trades and book with neither a trade nor a book message in [hole) (seconds after T0)."""
    rows = trade_rows(3000, span=3 * 3600)
    rows = rows[(rows["timestamp"] < T0 + hole[0]) | (rows["timestamp"] >= T0 + hole[1])]
    msgs = [m for m in book_messages(3 * 3600 // 2, step_ms=2000)
            if not T0 + hole[0] <= m["ts"] / 1000 < T0 + hole[1]]
    return make_folder(root, rows, msgs)


def test_long_quiet_stretch_inside_a_file_is_a_gap_by_the_configured_threshold(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = quiet_hole_folder(tmp_path, (3600, 7200))
    cfg = config(folder)
    with caplog.at_level(logging.WARNING, logger="data_loader"):
        bars = dl.load_bars(cfg, "5m")
    # the book goes stale 60 s after its last message, so the quiet bars are 01:05 .. 01:55 (11 bars, 55 min)
    quiet = (bars.index >= pd.Timestamp("2026-01-01 01:05", tz="UTC")) & (bars.index < pd.Timestamp(
        "2026-01-01 02:00", tz="UTC"))
    assert bars["is_gap"].to_numpy().tolist() == quiet.tolist()
    assert "data gap 2026-01-01 01:05 -> 2026-01-01 02:00 UTC (0h55m, 11 bars) with no trades and no book for " \
           ">= 30m" in caplog.text
    assert "missing" not in caplog.text
    caplog.clear()
    cached = {p: p.stat().st_mtime_ns for p in (folder / ".cache").glob("*.parquet")}
    with caplog.at_level(logging.WARNING, logger="data_loader"):
        pd.testing.assert_frame_equal(dl.load_bars(cfg, "5m"), bars, check_freq=False)
    assert len(cached) == 1 and {p: p.stat().st_mtime_ns for p in cached} == cached   # served, not rebuilt
    assert "data gap 2026-01-01 01:05 -> 2026-01-01 02:00 UTC (0h55m, 11 bars)" in caplog.text  # cached, still loud
    cfg.data.gap_threshold = "1h"   # the cached 30m bars must not be served for another threshold
    assert not dl.load_bars(cfg, "5m")["is_gap"].any()


def test_short_stalls_and_trade_only_holes_are_not_gaps(tmp_path: Path) -> None:
    """A 25-minute stall of both streams, and trades pausing while the book lives, stay ordinary bars."""
    bars = dl.load_bars(config(quiet_hole_folder(tmp_path / "a", (3600, 3600 + 25 * 60)), cache=False), "5m")
    assert bars["is_empty"].sum() >= 4 and (bars["ob_samples"] == 0).sum() >= 4 and not bars["is_gap"].any()
    rows = trade_rows(3000, span=3 * 3600)
    rows = rows[(rows["timestamp"] < T0 + 3600) | (rows["timestamp"] >= T0 + 7200)]
    bars = dl.load_bars(config(make_folder(tmp_path / "b", rows, book_messages(5400, step_ms=2000)), cache=False),
                        "5m")
    assert bars["is_empty"].sum() >= 11 and not bars["is_gap"].any()


def test_mark_gaps_on_a_live_window_marks_a_run_once_it_reaches_the_threshold(tmp_path: Path) -> None:
    bars = dl.load_bars(config(quiet_hole_folder(tmp_path, (3600, 7200)), cache=False), "5m")
    first = bars.index.get_loc(pd.Timestamp("2026-01-01 01:05", tz="UTC"))
    short = bars.iloc[:first + 5].copy()          # 5 quiet bars (25 min) so far: not yet a gap
    assert dl.mark_gaps(short, 300, "30m") == [] and not short["is_gap"].any()
    reached = bars.iloc[:first + 6].copy().drop(columns="is_gap")   # the 6th quiet bar: the whole run is a gap
    gaps = dl.mark_gaps(reached, 300, "30m")
    assert [(g.start, g.bars) for g in gaps] == [(bars.index[first], 6)]
    assert reached["is_gap"].tolist() == bars["is_gap"].iloc[:first + 6].tolist()


@pytest.mark.parametrize("levels, why", [
    ([["1", "2"], ["3", "x"]], "data.b[1] has a non-numeric price or size ['3', 'x']"),
    ([["1", "2"], ["nan", "1"]], "data.b[1] has an invalid price or size ['nan', '1']"),
    ([["1", "2"], ["0", "1"], ["2", "-1"]], "data.b[1] has an invalid price or size ['0', '1']"),
    ([["1", "2"], ["3"]], "data.b[1] is not a [price, size] pair"),
    ([["1", "2"], None], "data.b[1] is not a [price, size] pair")])
def test_a_bad_level_is_named_by_its_index_whatever_the_others(levels, why):
    """The whole-array conversion of a book side falls back to level by level on anything odd, so the
    message still names the first bad level; good sides give exactly float() of each string."""
    with pytest.raises(dl.BadLine, match=re.escape(why)):
        dl._level_array(levels, "b")
    for good in ([["101.25", "0.5"], ["1e2", "0"], [" 99.5 ", "3"], ["1_0", "2"]], [["1", "2"], ["3", "4", "x"]]):
        assert dl._level_array(good, "b").tolist() == [[float(p), float(q)] for p, q, *_ in good]
