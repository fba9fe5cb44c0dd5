"""Order book: exact rebuilds of real Binance and Bybit recordings, sequence rules, statistics, sampling."""
from __future__ import annotations

import gzip
import random
from decimal import Decimal
from pathlib import Path

import numpy as np
import orjson
import pandas as pd
import pytest

import orderbook as ob
from orderbook import BinanceSync, OrderBook

XRP_FILE = "bybit/2024-12-01_XRPUSDT_ob500.data"


# ------------------------------------------------------------------ reference book (obviously correct)
class DictBook:
    """Reference: Decimal price -> Decimal size per side, sorted only when read."""

    def __init__(self) -> None:
        self.bids: dict[Decimal, Decimal] = {}
        self.asks: dict[Decimal, Decimal] = {}

    def apply(self, msg: dict) -> None:
        if msg["type"] == "snapshot":
            self.bids, self.asks = {}, {}
        for side, levels in ((self.bids, msg["data"]["b"]), (self.asks, msg["data"]["a"])):
            for price, size in levels:
                if Decimal(size) == 0:
                    side.pop(Decimal(price), None)
                else:
                    side[Decimal(price)] = Decimal(size)

    def levels(self) -> tuple[list, list]:
        bids = sorted(self.bids.items(), reverse=True)
        asks = sorted(self.asks.items())
        return [(float(p), float(q)) for p, q in bids], [(float(p), float(q)) for p, q in asks]


def book_levels(book: OrderBook) -> tuple[list, list]:
    """Every level of the array book, best first."""
    bp, bq, ap, aq = book.top(10 ** 9)
    return list(zip(bp.tolist(), bq.tolist())), list(zip(ap.tolist(), aq.tolist()))


# ------------------------------------------------------------------ real data
class RecordingBook(OrderBook):
    """The real book, remembering its top of book after every diff it applies (keyed by the diff's u)."""

    def __init__(self) -> None:
        super().__init__()
        self.tops: dict[int, tuple[float, float, float, float]] = {}

    def apply_delta(self, bids, asks, u: int, seq: int = 0, ts: int = 0) -> None:
        super().apply_delta(bids, asks, u, seq, ts)
        bp, bq, ap, aq = self.top(1)
        self.tops[int(u)] = (bp[0], bq[0], ap[0], aq[0])


def _binance_replay(paths: list[Path]) -> tuple[int, int, dict]:
    """Rebuild from REST snapshot + diffs; compare with every bookTicker whose u is an applied diff's u."""
    book = RecordingBook()
    sync = BinanceSync(book)
    tickers: list[dict] = []
    statuses: dict[str, int] = {}
    for path in paths:
        with gzip.open(path, "rb") as fh:
            for line in fh:
                obj = orjson.loads(line.split(b" ", 1)[1])
                if "lastUpdateId" in obj:
                    statuses["from_buffer"] = len(sync.on_snapshot(obj))
                    continue
                data = obj["data"]
                if data["e"] == "depthUpdate":
                    res = sync.on_diff(data)
                    statuses[res] = statuses.get(res, 0) + 1
                elif data["e"] == "bookTicker":
                    tickers.append(data)
    compared = mismatched = 0
    for t in tickers:
        top = book.tops.get(int(t["u"]))
        if top is None:
            continue
        compared += 1
        if top != (float(t["b"]), float(t["B"]), float(t["a"]), float(t["A"])):
            mismatched += 1
    return compared, mismatched, statuses


@pytest.mark.parametrize("symbol", ["btcusdt", "ethusdt"])
def test_binance_rebuild_matches_book_ticker(realdata: Path, symbol: str) -> None:
    folder = realdata / "binance_usdm"
    compared, mismatched, statuses = _binance_replay([folder / f"usdm_{symbol}_20240718.gz",
                                                      folder / f"usdm_{symbol}_20240719.gz"])
    print(f"{symbol}: {compared} bookTicker events compared (best bid/ask price and size), "
          f"{mismatched} mismatched; diff statuses {statuses}")
    assert statuses.get("gap", 0) == 0
    assert statuses["buffered"] > 0 and statuses["from_buffer"] > 0
    assert compared > 300
    assert mismatched == 0


def test_bybit_archive_rebuild_every_level(realdata: Path) -> None:
    ref = DictBook()
    book = OrderBook(capacity=16)
    lines = (realdata / XRP_FILE).read_bytes().splitlines()
    for raw in lines:
        msg = orjson.loads(raw)
        assert book.apply_bybit(msg)
        ref.apply(msg)
        assert book_levels(book) == ref.levels()
    assert book.messages == 50 and book.gaps == 0 and book.valid
    bids, asks = ref.levels()
    assert len(bids) == 500 and len(asks) == 500


# ------------------------------------------------------------------ sequence rules
def _msg(kind: str, u: int, bids=(), asks=(), ts: int = 1000, pu: int | None = None) -> dict:
    data = {"s": "TEST", "b": [[str(p), str(q)] for p, q in bids], "a": [[str(p), str(q)] for p, q in asks], "u": u}
    if pu is not None:
        data["pu"] = pu
    return {"topic": "orderbook.50.TEST", "type": kind, "ts": ts, "data": data}


def test_gap_invalidates_until_next_snapshot() -> None:
    book = OrderBook()
    assert book.apply_bybit(_msg("snapshot", 10, [(100, 1)], [(101, 1)]))
    assert book.apply_bybit(_msg("delta", 11, [(100, 2)]))
    assert not book.apply_bybit(_msg("delta", 13, [(100, 3)]))
    assert book.gaps == 1 and not book.valid
    assert not book.apply_bybit(_msg("delta", 14, [(100, 4)]))
    assert book.top(1)[1][0] == 2.0
    assert book.apply_bybit(_msg("snapshot", 20, [(99, 5)], [(102, 6)]))
    assert book.valid and book.best_bid() == 99.0 and book.best_ask() == 102.0
    assert book.counters()["skipped_invalid"] == 1


def test_u1_resets_and_duplicate_is_stale() -> None:
    book = OrderBook()
    book.apply_bybit(_msg("snapshot", 5, [(100, 1)], [(101, 1)]))
    assert not book.apply_bybit(_msg("delta", 5, [(100, 9)]))
    assert book.counters()["stale"] == 1 and book.valid and book.top(1)[1][0] == 1.0
    assert not book.apply_bybit(_msg("delta", 1, [(100, 2)]))
    assert book.resets == 1 and not book.valid and np.isnan(book.best_bid())
    assert book.apply_bybit(_msg("snapshot", 1, [(50, 1)], [(51, 1)]))
    assert book.resets == 2 and book.valid and book.best_bid() == 50.0


def test_pu_chain_for_binance_sourced_files() -> None:
    book = OrderBook()
    book.apply_bybit(_msg("snapshot", 100, [(10, 1)], [(11, 1)]))
    assert not book.apply_bybit(_msg("delta", 99, [(10, 5)], pu=90))
    assert book.apply_bybit(_msg("delta", 130, [(10, 2)], pu=95))
    assert book.apply_bybit(_msg("delta", 170, [(10, 3)], pu=130))
    assert not book.apply_bybit(_msg("delta", 200, [(10, 4)], pu=171))
    assert book.gaps == 1 and not book.valid


def test_crossed_book_counted_and_not_valid() -> None:
    book = OrderBook()
    book.apply_bybit(_msg("snapshot", 1, [(100, 1)], [(101, 1)]))
    book.apply_bybit(_msg("delta", 2, [(101.5, 1)]))
    assert book.crossed == 1 and not book.valid
    book.apply_bybit(_msg("delta", 3, [(101.5, 2)]))
    assert book.crossed == 1
    book.apply_bybit(_msg("delta", 4, [(101.5, 0)]))
    assert book.valid


def test_random_updates_match_reference() -> None:
    """Many inserts/deletes (tombstones, compaction, reuse) against the dict reference."""
    rng = random.Random(3)
    book, ref = OrderBook(capacity=8), DictBook()
    snap = _msg("snapshot", 1, [(1000 - i, 1) for i in range(50)], [(1001 + i, 1) for i in range(50)])
    book.apply_bybit(snap)
    ref.apply(snap)
    for u in range(2, 3000):
        bids = [(Decimal(rng.randint(800, 1000)) / 1, Decimal(rng.choice([0, 0, 1, 2.5]))) for _ in range(rng.randint(0, 20))]
        asks = [(Decimal(rng.randint(1001, 1200)) / 1, Decimal(rng.choice([0, 0, 1, 2.5]))) for _ in range(rng.randint(0, 20))]
        m = _msg("delta", u, bids, asks)
        book.apply_bybit(m)
        ref.apply(m)
        if u % 97 == 0:
            assert book_levels(book) == ref.levels()
    assert book_levels(book) == ref.levels()


# ------------------------------------------------------------------ Binance sync procedure
def _diff(U: int, u: int, pu: int, bids=(), asks=()) -> dict:
    return {"e": "depthUpdate", "U": U, "u": u, "pu": pu, "T": 1,
            "b": [[str(p), str(q)] for p, q in bids], "a": [[str(p), str(q)] for p, q in asks]}


def test_binance_sync_procedure() -> None:
    sync = BinanceSync(OrderBook())
    assert sync.needs_snapshot
    assert sync.on_diff(_diff(90, 95, 89, [(10, 7)])) == "buffered"
    assert sync.on_diff(_diff(96, 105, 95, [(10, 2)])) == "buffered"
    assert sync.on_diff(_diff(106, 110, 105, [(9, 3)])) == "buffered"
    applied = sync.on_snapshot({"lastUpdateId": 100, "bids": [["10", "1"]], "asks": [["11", "1"]]})
    assert [e["u"] for e in applied] == [105, 110]
    assert not sync.needs_snapshot
    assert sync.book.top(2)[1].tolist() == [2.0, 3.0]
    assert sync.on_diff(_diff(111, 120, 110, asks=[(11, 4)])) == "applied"
    assert sync.on_diff(_diff(125, 130, 121)) == "gap"
    assert sync.needs_snapshot and not sync.book.valid
    assert sync.on_diff(_diff(131, 140, 130)) == "buffered"
    assert sync.on_snapshot({"lastUpdateId": 135, "bids": [["10", "1"]], "asks": [["11", "1"]]})[0]["u"] == 140
    assert sync.book.valid


def test_binance_snapshot_too_old_needs_another() -> None:
    sync = BinanceSync(OrderBook())
    sync.on_diff(_diff(200, 210, 199))
    assert sync.on_snapshot({"lastUpdateId": 150, "bids": [["10", "1"]], "asks": [["11", "1"]]}) == []
    assert sync.needs_snapshot and sync.buffer and not sync.book.valid
    assert sync.on_diff(_diff(211, 220, 210)) == "buffered"
    assert [e["u"] for e in sync.on_snapshot({"lastUpdateId": 205, "bids": [], "asks": []})] == [210, 220]
    assert sync.book.valid


# ------------------------------------------------------------------ statistics and sampling
def test_stats_definitions() -> None:
    book = OrderBook()
    book.apply_snapshot([[100, 2], [99, 3], [98, 5]], [[101, 1], [102, 4]], u=1)
    s = book.stats(2)
    assert (s.best_bid, s.best_ask, s.bid_size, s.ask_size) == (100, 101, 2, 1)
    assert s.spread == 1 and s.mid == 100.5
    assert s.micro == pytest.approx((101 * 2 + 100 * 1) / 3)
    assert s.micro_dev == pytest.approx(s.micro - 100.5)
    assert (s.bid_depth, s.ask_depth) == (5, 5)
    assert s.imbalance == 0
    assert s.bid_slope == pytest.approx((100 - 99) / 5) and s.ask_slope == pytest.approx((102 - 101) / 5)
    assert s.bid_integrity == pytest.approx(2 / 5) and s.ask_integrity == pytest.approx(1 / 5)
    assert book.stats(3).bid_depth == 10


def test_sampling_clock_and_ofi() -> None:
    book = OrderBook(sample_interval_ms=1000, levels=5, stale_ms=5000)
    book.apply_bybit(_msg("snapshot", 1, [(100, 2)], [(101, 1)], ts=500))
    book.apply_bybit(_msg("delta", 2, [(100, 5)], ts=1000))     # in force at the 1000 tick
    book.apply_bybit(_msg("delta", 3, [(100.5, 1)], ts=2500))   # bid improves
    book.apply_bybit(_msg("delta", 4, [], [(101, 0), (102, 3)], ts=20000))
    s = book.drain_samples()
    cols = {c: i for i, c in enumerate(ob.SAMPLE_COLUMNS)}
    t = s[:, cols["t_ms"]].tolist()
    assert t == [1000, 2000, 3000, 4000, 5000, 6000, 7000]  # stale after 5 s without messages
    assert s[0, cols["bid_size"]] == 5 and s[2, cols["best_bid"]] == 100.5
    ofi = s[:, cols["ofi"]]
    assert ofi[0] == 0 and ofi[1] == 0
    assert ofi[2] == pytest.approx(1.0)
    book.advance(25000)
    tail = book.drain_samples()
    assert tail[:, 0].tolist() == [20000, 21000, 22000, 23000, 24000]
    assert tail[0, cols["best_ask"]] == 102 and tail[0, cols["ofi"]] == 0


def test_no_samples_while_invalid() -> None:
    book = OrderBook(sample_interval_ms=100, levels=5)
    book.apply_bybit(_msg("snapshot", 1, [(100, 2)], [(101, 1)], ts=0))
    book.apply_bybit(_msg("delta", 3, [(100, 1)], ts=250))
    book.apply_bybit(_msg("snapshot", 9, [(100, 1)], [(101, 1)], ts=600))
    book.apply_bybit(_msg("delta", 10, [(100, 4)], ts=800))
    assert book.drain_samples()[:, 0].tolist() == [0, 100, 200, 600, 700]


def test_aggregate_book_samples() -> None:
    cols = {c: i for i, c in enumerate(ob.SAMPLE_COLUMNS)}
    s = np.zeros((4, len(ob.SAMPLE_COLUMNS)))
    s[:, cols["t_ms"]] = [0, 1000, 60000, 61000]
    s[:, cols["micro_dev"]] = [1.0, 3.0, 2.0, 2.0]
    s[:, cols["imbalance"]] = [0.1, 0.2, 0.3, 0.4]
    s[:, cols["ofi"]] = [1, 2, 3, 4]
    s[:, cols["mid"]] = [10, 11, 12, 13]
    bars = ob.aggregate_book_samples(s, 60)
    assert bars.index.tolist() == [0, 60000]
    assert bars["ob_micro_dev_mean"].tolist() == [2.0, 2.0]
    assert bars["ob_micro_dev_std"].tolist() == [1.0, 0.0]
    assert bars["ob_imbalance_last"].tolist() == [0.2, 0.4]
    assert bars["ob_ofi_sum"].tolist() == [3, 7] and bars["ob_samples"].tolist() == [2, 2]
    assert bars["ob_mid_last"].tolist() == [11, 13]
    halves = ob.merge_partial_book_bars([ob.partial_book_bars(s[2:], 60000), ob.partial_book_bars(s[:2], 60000)])
    assert ob.finalize_book_bars(halves).equals(bars)


def test_book_bar_sums_equal_one_pass_whatever_the_chunking() -> None:
    """Bars reduced by BookBarSums from a stream cut anywhere equal the one-pass aggregation bit for bit
    (summing per-chunk partials instead differs in the last bits: float sums are not associative)."""
    rng = np.random.default_rng(3)
    scale = 10.0 ** rng.integers(-8, 8, len(ob.SAMPLE_COLUMNS) - 1)
    s = np.column_stack([np.arange(300) * 1000.0, rng.normal(size=(300, len(ob.SAMPLE_COLUMNS) - 1)) * scale])
    want = ob.aggregate_book_samples(s, 60)
    for cut in range(1, 300, 7):
        sums = ob.BookBarSums(60000)
        sums.add(s[:cut])
        sums.add(s[cut:])
        assert ob.finalize_book_bars(ob.merge_partial_book_bars(sums.take())).equals(want), cut


def test_deep_random_book_matches_reference_with_stats() -> None:
    """Inserts and deletes all through a deep book (free-slot reuse, re-spreading, growth) stay exact."""
    rng = random.Random(11)
    book, ref = OrderBook(capacity=8), DictBook()
    snap = _msg("snapshot", 1, [(Decimal(5000 - i) / 10, 1) for i in range(0, 4000, 3)],
                [(Decimal(5001 + i) / 10, 1) for i in range(0, 4000, 3)])
    book.apply_bybit(snap)
    ref.apply(snap)
    for u in range(2, 1500):
        bids = [(Decimal(rng.randint(1000, 5000)) / 10, rng.choice(["0", "0", "0.5", "7"])) for _ in range(30)]
        asks = [(Decimal(rng.randint(5001, 9000)) / 10, rng.choice(["0", "0", "0.5", "7"])) for _ in range(30)]
        m = _msg("delta", u, bids, asks)
        book.apply_bybit(m)
        ref.apply(m)
        if u % 150 == 0:
            bids_ref, asks_ref = ref.levels()
            assert book_levels(book) == (bids_ref, asks_ref)
            s = book.stats(50)
            assert s.bid_depth == pytest.approx(sum(q for _, q in bids_ref[:50]), rel=1e-12)
            assert s.ask_slope == pytest.approx((asks_ref[49][0] - asks_ref[0][0]) / s.ask_depth, rel=1e-12)
    assert book.valid and book.gaps == 0


def test_time_reversal_counted_and_clock_holds() -> None:
    book = OrderBook(sample_interval_ms=1000, levels=5)
    book.apply_bybit(_msg("snapshot", 1, [(100, 1)], [(101, 1)], ts=1000))
    book.apply_bybit(_msg("delta", 2, [(100, 2)], ts=3500))
    assert book.apply_bybit(_msg("delta", 3, [(100, 3)], ts=2000))
    book.apply_bybit(_msg("delta", 4, [(100, 4)], ts=4200))
    assert book.counters()["time_reversals"] == 1
    s = book.drain_samples()
    assert s[:, 0].tolist() == [1000, 2000, 3000, 4000] and s[-1, 3] == 3.0
    assert book.drain_events()[-1][1] == ob.EV_TIME_REVERSAL


def pandas_book_bars(samples: np.ndarray, bar_ms: int) -> pd.DataFrame:
    """Reference: the per-bar reduction written with pandas groupby (sum skips NaN, last = last non-NaN)."""
    frame = pd.DataFrame(samples, columns=list(ob.SAMPLE_COLUMNS))
    frame["bar"] = (frame["t_ms"].to_numpy().astype(np.int64) // bar_ms) * bar_ms
    frame["micro_dev_sq"] = frame["micro_dev"] ** 2
    sums = ["spread", "micro_dev", "imbalance", "bid_depth", "ask_depth", "bid_slope", "ask_slope",
            "bid_integrity", "ask_integrity", "micro_dev_sq", "ofi"]
    grouped = frame.groupby("bar", sort=True)
    out = grouped[sums].sum().add_prefix("sum_")
    out["n"] = grouped.size()
    return out.join(grouped[["t_ms", "micro_dev", "imbalance", "mid"]].last().add_prefix("last_"))


def test_compiled_bar_reduction_equals_pandas_groupby_bit_for_bit() -> None:
    """partial_book_bars (numba, on the live bar path) keeps pandas' compensated sums, NaN and inf rules."""
    rng = np.random.default_rng(11)
    for trial in range(60):
        n = int(rng.integers(1, 2000))
        s = rng.standard_normal((n, ob.N_SAMPLE_COLS)) * 10 ** rng.uniform(-8, 8, ob.N_SAMPLE_COLS)
        s[:, 0] = np.sort(rng.integers(0, 10 * 60_000, n)).astype(float) + 1.7e12
        holes = rng.random(s.shape) < 0.1 * (trial % 3)
        holes[:, 0] = False
        s[holes] = np.nan
        if trial % 5 == 0:
            s[rng.integers(0, n), ob.SAMPLE_COLUMNS.index("ofi")] = np.inf
        pd.testing.assert_frame_equal(ob.partial_book_bars(s, 60_000), pandas_book_bars(s, 60_000), check_exact=True)


@pytest.mark.parametrize("level", [["nan", "1"], ["1", "nan"], ["inf", "1"], ["-inf", "1"], ["1", "inf"], ["0", "1"],
                                   ["-2", "1"], ["1", "-1"], ["nan", "nan"]])
def test_a_level_without_a_finite_positive_price_or_a_finite_size_is_refused_and_the_book_kept(level) -> None:
    book = OrderBook()
    assert book.apply_bybit(_msg("snapshot", 1, [(100, 1)], [(101, 2)]))
    with pytest.raises(ValueError, match="finite prices"):
        book.apply_bybit(_msg("delta", 2, [("99", "1"), tuple(level)]))
    assert book_levels(book) == ([(100.0, 1.0)], [(101.0, 2.0)]) and book.last_u == 1
