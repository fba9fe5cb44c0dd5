"""market_sim: deterministic, schema-exact files; a valid book; stylised facts; alpha as the only edge."""
from __future__ import annotations

import gzip
import json
import math
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import data_loader
import feature_engine
from config import ConfigError, GlobalConfig, InstrumentConfig
from market_sim import simulate

ROOT = Path(__file__).resolve().parents[1]
PRICE = re.compile(r"\d+\.\d{2}")
SIZE = re.compile(r"0|\d+\.\d{3}")
TRADE_COLUMNS = ["timestamp", "symbol", "side", "size", "price", "tickDirection", "trdMatchID", "grossValue",
                 "homeNotional", "foreignNotional", "RPI"]
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@dataclass
class Replay:
    """What the reference rebuild of a run's book files saw."""
    ts: np.ndarray          # ms of each message
    best_bid: np.ndarray    # ticks
    best_ask: np.ndarray
    deletes: int
    max_level_ratio: float  # largest level size ever sent / median size sent (walls)
    depth_by_distance: np.ndarray  # mean size per tick of distance from the touch, over snapshots


def _open(path: Path):
    return gzip.open(path, "rt", encoding="ascii") if path.suffix == ".gz" else open(path, encoding="ascii")


def _ticks(text: str) -> int:
    assert PRICE.fullmatch(text), f"price {text!r} is not a 2-decimal string"
    return int(text.replace(".", ""))


def _lots(text: str) -> int:
    assert SIZE.fullmatch(text), f"size {text!r} is not a 3-decimal string (or '0')"
    return int(text.replace(".", ""))


def replay_book(folder: Path, symbol: str, levels: int, interval_ms: int) -> Replay:
    """Strictly parse every line and rebuild the book with dicts, checking the exchange's invariants."""
    files = sorted((folder / "Orderbook").glob(f"*_{symbol}_ob{levels}.data*"))
    assert files, "no order-book files written"
    bids: dict[int, int] = {}
    asks: dict[int, int] = {}
    rows, last_u, deletes, sizes, profile = [], None, 0, [], []
    for path in files:
        day_ms = int(pd.Timestamp(path.name[:10], tz="UTC").timestamp() * 1000)
        with _open(path) as fh:
            for n, line in enumerate(fh):
                where = f"{path.name}:{n + 1}"
                msg = json.loads(line)
                assert list(msg) == ["topic", "type", "ts", "data", "cts"], where
                assert msg["topic"] == f"orderbook.{levels}.{symbol}", where
                assert msg["type"] == ("snapshot" if n == 0 else "delta"), f"{where}: snapshot only at file start"
                ts, data = msg["ts"], msg["data"]
                assert isinstance(ts, int) and day_ms <= ts < day_ms + 86_400_000 and ts % interval_ms == 0, where
                assert isinstance(msg["cts"], int) and ts - 100 < msg["cts"] <= ts, where
                assert list(data) == ["s", "b", "a", "u", "seq"] and data["s"] == symbol, where
                assert last_u is None or data["u"] == last_u + 1, f"{where}: u {data['u']} after {last_u}"
                last_u = data["u"]
                b = [(_ticks(p), _lots(q)) for p, q in data["b"]]
                a = [(_ticks(p), _lots(q)) for p, q in data["a"]]
                if msg["type"] == "snapshot":
                    assert all(q > 0 for _, q in b + a), f"{where}: zero size in a snapshot"
                    bids, asks = dict(b), dict(a)
                else:
                    assert b or a, f"{where}: empty delta"
                    for side, book in ((b, bids), (a, asks)):
                        for px, q in side:
                            assert book.get(px, 0) != q, f"{where}: delta repeats an unchanged level {px}"
                            if q == 0:
                                deletes += 1
                                del book[px]
                            else:
                                book[px] = q
                bb, ba = max(bids), min(asks)
                assert ba - bb >= 1, f"{where}: crossed or locked book {bb} / {ba}"
                assert len(bids) <= levels and len(asks) <= levels, f"{where}: more than {levels} levels"
                rows.append((ts, bb, ba))
                sizes.extend(q for _, q in b + a if q)
                if msg["type"] == "snapshot":
                    dist = np.zeros(levels)
                    for px, q in bids.items():
                        dist[bb - px] += q
                    for px, q in asks.items():
                        dist[px - ba] += q
                    profile.append(dist / 2)
    arr = np.array(rows, dtype=np.int64)
    return Replay(arr[:, 0], arr[:, 1], arr[:, 2], deletes, max(sizes) / float(np.median(sizes)),
                  np.mean(profile, axis=0))


def read_trades(folder: Path, symbol: str) -> pd.DataFrame:
    """All trade files of a run, checked against the archive header."""
    frames = []
    for path in sorted((folder / "Trade").glob(f"{symbol}*.csv*")):
        with _open(path) as fh:
            assert fh.readline().rstrip("\n").split(",") == TRADE_COLUMNS, path.name
        frames.append(pd.read_csv(path, dtype={"price": str, "size": str, "grossValue": np.int64}))
    return pd.concat(frames, ignore_index=True)


def mid_series(rep: Replay) -> pd.Series:
    """Mid price at each book message, on the exchange clock."""
    return pd.Series((rep.best_bid + rep.best_ask) / 200.0, index=pd.to_datetime(rep.ts, unit="ms", utc=True))


# ---------------------------------------------------------------- determinism and CLI
def _digest(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_writes_identical_files_and_another_seed_does_not(tmp_path: Path) -> None:
    kwargs = dict(days=2, book_interval="10s", levels=50, alpha=1.0)
    one = _digest(simulate(seed=11, out=tmp_path / "a", **kwargs))
    two = _digest(simulate(seed=11, out=tmp_path / "b", **kwargs))
    other = _digest(simulate(seed=12, out=tmp_path / "c", **kwargs))
    assert one == two
    assert len(one) == 6        # 2 trade files, 2 book files, instrument.json, simulation.json
    changed = [k for k in one if one[k] != other[k]]
    assert any(k.startswith("Orderbook") for k in changed) and any(k.startswith("Trade") for k in changed)


def test_cli_writes_gzip_files_and_rejects_bad_interval(tmp_path: Path) -> None:
    cmd = [sys.executable, str(ROOT / "market_sim.py"), "--symbol", "TESTUSDT", "--days", "1", "--seed", "3",
           "--book-interval", "30s", "--levels", "20", "--out", str(tmp_path), "--gzip"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    folder = tmp_path / "TESTUSDT_Sim"
    assert "TESTUSDT_Sim" in done.stdout
    assert [p.name for p in (folder / "Trade").iterdir()] == ["TESTUSDT2026-01-01.csv.gz"]
    assert [p.name for p in (folder / "Orderbook").iterdir()] == ["2026-01-01_TESTUSDT_ob20.data.gz"]
    bad = subprocess.run(cmd[:-1] + ["--book-interval", "7s"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "book_interval" in bad.stderr


def test_bad_arguments_name_the_field(tmp_path: Path) -> None:
    for kwargs, field in [({"days": 0}, "days"), ({"levels": 2}, "levels"), ({"alpha": -1.0}, "alpha"),
                          ({"start": "2026-13-01"}, "start"), ({"symbol": "demo"}, "symbol")]:
        with pytest.raises(ConfigError, match=field):
            simulate(out=tmp_path, book_interval="30s", **kwargs)


def test_rerun_replaces_an_earlier_run_instead_of_mixing(tmp_path: Path) -> None:
    simulate(days=2, out=tmp_path, book_interval="30s", levels=20, gzip=True)
    folder = simulate(days=1, out=tmp_path, book_interval="30s", levels=20)
    assert sorted(p.name for p in (folder / "Trade").iterdir()) == ["DEMOUSDT2026-01-01.csv"]
    assert sorted(p.name for p in (folder / "Orderbook").iterdir()) == ["2026-01-01_DEMOUSDT_ob20.data"]


# ---------------------------------------------------------------- file validity
def test_a_shallow_book_never_exceeds_its_levels(tmp_path: Path) -> None:
    folder = simulate(days=1, seed=9, out=tmp_path, book_interval="30s", levels=10)
    rep = replay_book(folder, "DEMOUSDT", 10, 30_000)      # asserts <= 10 levels per side after every message
    assert len(rep.ts) > 2000 and rep.max_level_ratio > 10  # walls are placed inside the window too


@pytest.fixture(scope="module")
def two_days(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Replay, pd.DataFrame]:
    folder = simulate(symbol="SIMUSDT", days=2, seed=5, alpha=1.0, out=tmp_path_factory.mktemp("sim"),
                      book_interval="5s", levels=50, gzip=True, start="2026-03-01")
    return folder, replay_book(folder, "SIMUSDT", 50, 5000), read_trades(folder, "SIMUSDT")


def test_book_files_rebuild_a_valid_book(two_days: tuple[Path, Replay, pd.DataFrame]) -> None:
    folder, rep, _ = two_days
    assert sorted(p.name for p in (folder / "Orderbook").iterdir()) == [
        "2026-03-01_SIMUSDT_ob50.data.gz", "2026-03-02_SIMUSDT_ob50.data.gz"]   # u runs on across the two
    spread = rep.best_ask - rep.best_bid
    assert spread.min() >= 1 and 1.2 < spread.mean() < 6          # a few ticks, never crossed
    assert rep.deletes > 1000                                      # levels vanish...
    assert rep.max_level_ratio > 10                                # ...and walls stand out
    near, far = rep.depth_by_distance[:5].mean(), rep.depth_by_distance[30:].mean()
    assert far > 1.5 * near                                        # depth grows away from the touch
    assert len(rep.ts) > 0.9 * 2 * 17_280                          # something changes at almost every step


def test_instrument_json_matches_config_defaults(two_days: tuple[Path, Replay, pd.DataFrame]) -> None:
    folder, _, _ = two_days
    inst, cfg = json.loads((folder / "instrument.json").read_text()), InstrumentConfig()
    assert inst == {"symbol": "SIMUSDT", "tickSize": "0.01", "qtyStep": "0.001", "minOrderQty": "0.001",
                    "minNotionalValue": "5"}
    assert (float(inst["tickSize"]), float(inst["qtyStep"]), float(inst["minOrderQty"]),
            float(inst["minNotionalValue"])) == (cfg.tick_size, cfg.qty_step, cfg.min_qty, cfg.min_notional)


def test_trades_follow_the_archive_format_and_hit_the_touch(two_days: tuple[Path, Replay, pd.DataFrame]) -> None:
    _, rep, tr = two_days
    assert len(tr) > 40_000 and tr["timestamp"].is_monotonic_increasing
    gaps = np.diff(tr["timestamp"].to_numpy())
    assert gaps.std() / gaps.mean() > 1.2            # market orders cluster (a Poisson stream gives 1)
    assert set(tr["side"]) == {"Buy", "Sell"} and set(tr["symbol"]) == {"SIMUSDT"}
    assert tr["trdMatchID"].map(lambda s: bool(UUID.fullmatch(s))).all() and tr["trdMatchID"].is_unique
    ticks = tr["price"].map(_ticks).to_numpy()
    lots = tr["size"].map(_lots).to_numpy()
    assert lots.min() >= 1
    np.testing.assert_array_equal(tr["grossValue"].to_numpy(), ticks * lots * 1000)
    np.testing.assert_allclose(tr["foreignNotional"], ticks * lots / 1e5, rtol=1e-12)
    np.testing.assert_allclose(tr["homeNotional"], lots / 1e3, rtol=1e-12)
    # tick direction follows the price path
    step = np.diff(ticks)
    direction = tr["tickDirection"].to_numpy()[1:]
    assert (direction[step > 0] == "PlusTick").all() and (direction[step < 0] == "MinusTick").all()
    assert np.isin(direction[step == 0], ["ZeroPlusTick", "ZeroMinusTick"]).all()
    # a taker buy lifts the best ask, a sell hits the best bid, of the book last published before it
    ms = np.floor(tr["timestamp"].to_numpy() * 1000).astype(np.int64)
    i = np.searchsorted(rep.ts, ms, side="right") - 1
    assert (i >= 0).all()
    buy = tr["side"].to_numpy() == "Buy"
    np.testing.assert_array_equal(ticks[buy], rep.best_ask[i[buy]])
    np.testing.assert_array_equal(ticks[~buy], rep.best_bid[i[~buy]])


# ---------------------------------------------------------------- stylised facts
def test_returns_are_fat_tailed_and_volatility_clusters(two_days: tuple[Path, Replay, pd.DataFrame]) -> None:
    _, rep, _ = two_days
    r = np.log(mid_series(rep).resample("1min").last()).diff().dropna()
    se = 1 / math.sqrt(len(r))
    assert r.kurt() > 1.0                                          # excess kurtosis at 1m
    assert r.abs().autocorr(1) > 5 * se and r.abs().autocorr(10) > 3 * se


# ---------------------------------------------------------------- alpha: the planted edge and the control
def _robust_t(x: pd.Series, y: pd.Series) -> float:
    """Heteroskedasticity-robust (White) t-statistic of the slope of y on x (H0: x does not predict y)."""
    ok = x.notna() & y.notna()
    xv = x[ok].to_numpy() - x[ok].mean()
    yv = y[ok].to_numpy() - y[ok].mean()
    beta = (xv @ yv) / (xv @ xv)
    resid = yv - beta * xv
    return float(beta / (math.sqrt(np.sum(xv ** 2 * resid ** 2)) / (xv @ xv)))


def _feature_t_stats(alpha: float, out: Path) -> dict[str, float]:
    """t-stats of every model feature against the next 15 minutes' mid return (non-overlapping)."""
    folder = simulate(days=8, seed=3, alpha=alpha, out=out, book_interval="30s", levels=60)
    cfg = GlobalConfig()
    cfg.data.data_dir = str(folder)
    cfg.data.cache = False
    cfg.data.book_sample_interval = "30s"
    bars = data_loader.load_bars(cfg)
    feats = feature_engine.compute_features(bars, cfg)
    mid = np.log(bars["ob_mid_last"])
    fwd = (mid.shift(-3) - mid).iloc[::3]
    return {name: _robust_t(feats[name].iloc[::3], fwd) for name in feature_engine.feature_names(cfg)}


# Bonferroni bound: two-sided 1% family-wise over ~60 features
T_BOUND = 3.8


def test_alpha_zero_leaves_every_feature_unpredictive(tmp_path: Path) -> None:
    t = _feature_t_stats(0.0, tmp_path)
    assert len(t) > 40 and all(math.isfinite(v) for v in t.values())
    assert max(abs(v) for v in t.values()) < T_BOUND, sorted(t.items(), key=lambda kv: -abs(kv[1]))[:5]


def test_alpha_one_makes_flow_and_book_features_predictive(tmp_path: Path) -> None:
    t = _feature_t_stats(1.0, tmp_path)
    assert min(t["micro_pressure"], t["taker_buy_ratio"], t["taker_buy_z"]) > T_BOUND, t
    assert sum(abs(v) > T_BOUND for v in t.values()) >= 10, t


# ---------------------------------------------------------------- the project's loader reads the files
def test_files_load_through_data_loader_without_integrity_problems(two_days: tuple[Path, Replay, pd.DataFrame]
                                                                   ) -> None:
    folder, rep, tr = two_days
    bars, report = data_loader.build_bars(data_loader.list_files(folder), "5m", 50, "5s")
    assert len(bars) == 576 and not bars["is_empty"].any() and (bars["ob_samples"] > 0).all()
    assert (report.trade_rows, report.bad_trade_rows, report.out_of_order_trades) == (len(tr), 0, 0)
    assert (report.book_lines, report.bad_book_lines) == (len(rep.ts), 0)
    assert all(report.book.get(k, 0) == 0 for k in ("gaps", "resets", "crossed", "time_reversals")), report.book
    assert int(bars["trade_count"].sum()) == len(tr)
    # the loader's last mid of each bar is the reference replay's mid at that bar's last book message (the final
    # bar aside: a streaming sampler cannot close the clock tick of the very last message)
    ref = mid_series(rep).resample("5min").last()
    np.testing.assert_allclose(bars["ob_mid_last"].to_numpy()[:-1], ref.to_numpy()[:-1], rtol=0, atol=1e-9)


def test_breakouts_thin_the_book_and_are_led_by_taker_flow(two_days: tuple[Path, Replay, pd.DataFrame]) -> None:
    folder, _, _ = two_days
    bars, _ = data_loader.build_bars(data_loader.list_files(folder), "5m", 50, "5s")
    bar_range = np.log(bars["high"] / bars["low"])
    depth = np.log(bars["ob_bid_depth_mean"] + bars["ob_ask_depth_mean"])
    assert np.corrcoef(depth, bar_range)[0, 1] < -0.15                      # fast markets have thinner books...
    assert np.corrcoef(bars["ob_spread_mean"], bar_range)[0, 1] > 0.2       # ...wider spreads...
    assert np.corrcoef(bars["trade_count"], bar_range)[0, 1] > 0.2          # ...and more market orders
    # with alpha=1 the taker flow of the last 15 minutes points the way of the largest next-30-minute moves
    fwd = np.log(bars["close"]).diff(6).shift(-6)
    flow = (bars["vol_buy"] - bars["vol_sell"]).rolling(3).sum()
    big = fwd.abs() > fwd.abs().quantile(0.9)
    assert big.sum() > 40 and (np.sign(flow[big]) == np.sign(fwd[big])).mean() > 0.7
