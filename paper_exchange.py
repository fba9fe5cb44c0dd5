"""A local Bybit-V5-compatible exchange: market replay and an aiohttp REST + WS server over `matching.py`.

The real `pybit` client talks to it unchanged (HTTP endpoint and WS URL overridden), so tests and paper
trading run the exact code paths the live bot uses, without the internet. Layers:

* `matching.MatchingEngine` — pure and synchronous: accounts, orders, positions, fills, fees, TP/SL,
  conditional orders, instrument rules and Bybit error codes, driven by book/trade events (its own room,
  shared with the live engine's dry-run mode; its fill assumptions are stated there).
* `MarketReplay` — feeds recorded or synthetic files (data contract) through `orderbook.OrderBook` into
  the engine on a controllable clock (`advance(seconds)`; speed 1x .. as fast as possible).
* `PaperExchange` — the aiohttp app: signed REST (`/v5/...`), public and private WS on one port, rate
  limits, and a fault-injection API (`faults` + `/__admin/...`) for tests.

Fees, fill rule and funding come from VenueConfig. Server time (`/v5/market/time`, signatures, rate
limits) is the wall clock; market data, orders and fills carry market time: the recorded times, or with
`--rebase-time` the data shifted (whole minutes) to start now. WS orderbook `u` counts per depth topic.
"""
from __future__ import annotations

import argparse
import asyncio
import copy
import datetime
import hashlib
import heapq
import hmac
import itertools
import json
import logging
import math
import re
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import orjson
from aiohttp import WSMsgType, web
from numba import njit

from config import ConfigError, VenueConfig, add_config_args, config_from_args
from matching import (FUNDING_INTERVAL_MS, MAX_LEVERAGE, PRICE_LIMIT_RATIO, ExchangeError, MatchingEngine,
                      RateLimited, _int, load_instrument, money)

log = logging.getLogger("paper_exchange")

KLINE_INTERVALS: dict[str, int] = {"1": 60, "3": 180, "5": 300, "15": 900, "30": 1800, "60": 3600,
                                   "120": 7200, "240": 14400, "360": 21600, "720": 43200, "D": 86400}
BOOK_DEPTHS = (1, 50, 200, 1000)
MAX_OUTBOX = 100_000
ORDER_LIMIT_PER_S = 10
CANDLE_DAYS = 8                 # days of 1-minute candles kept for the kline endpoint
DEFAULT_LIMIT_PER_S = 50
PUSH_BATCH = 8                  # streaming advance: messages applied between turns of the event loop
READ_AHEAD_MS = 120_000         # between admin advances: market ms of recorded messages read before their turn
READ_AHEAD_BATCH = 2            # messages read between turns of the event loop (a REST request waits for one)
ORDER_PATHS = {"/v5/order/create", "/v5/order/amend", "/v5/order/cancel", "/v5/order/cancel-all",
               "/v5/position/set-leverage", "/v5/position/trading-stop"}


# ---------------------------------------------------------------- market replay
@dataclass
class TradePrint:
    """One replayed public trade."""
    ts_ms: int
    price: float
    size: float
    side: str
    trade_id: str


def trade_ms(chunk: Any) -> np.ndarray:
    """Stream stamps (whole ms, int64) of a data_loader.iter_trades chunk. The files keep 0.1 ms (Bybit's public
    history: 4 decimals of a second); the stream's `T` is whole ms, so the stamp is truncated, never rounded
    up: a trade at 59.9996 s stays in the bar that data_loader puts it in (the 1e-3 ms guards against 0.645 s
    reading as 644.9999 ms)."""
    return np.floor(chunk["timestamp"].to_numpy(dtype=float) * 1000.0 + 1e-3).astype("int64")


def trade_prints(chunks: Iterable[Any]) -> Iterator[TradePrint]:
    """Rows of data_loader.iter_trades chunks (timestamp s, side, size, price, trdMatchID) as TradePrints."""
    for chunk in chunks:
        for t, side, size, price, tid in zip(trade_ms(chunk), chunk["side"], chunk["size"], chunk["price"],
                                             chunk["trdMatchID"]):
            yield TradePrint(int(t), float(price), float(size), str(side), str(tid))


def split_trades(chunks: Iterable[Any], before_ms: int) -> tuple[list[Any], Iterator[Any]]:
    """(the chunk parts stamped before `before_ms`, an iterator over the rest), reading only as far as needed."""
    chunks = iter(chunks)
    early: list[Any] = []
    for chunk in chunks:
        cut = int(np.searchsorted(trade_ms(chunk), before_ms))   # files are in time order
        if cut:
            early.append(chunk.iloc[:cut])
        if cut < len(chunk):
            return early, itertools.chain([chunk.iloc[cut:]], chunks)
    return early, iter(())


def _book_ts(msg: dict) -> int:
    return int(msg.get("ts") or msg.get("cts") or 0)


class MarketReplay:
    """Market time and data for the exchange: merges book messages and trades by time into the engine.

    `advance(seconds)` moves market time forward, applying every message up to it (tests run hours in
    seconds this way); it also keeps what the market-data endpoints serve: recent trades, 1-minute
    candles, 24h statistics, and the trades not yet pushed to `publicTrade` subscribers.
    `rebase_to_ms` shifts every timestamp by whole minutes so the data starts at that time (paper trading
    at 1x with a live engine that compares exchange times with its clock); by default times are as recorded.
    """

    def __init__(self, engine: MatchingEngine, book_messages: Iterable[dict], trades: Iterable[Any],
                 book: Any = None, rebase_to_ms: int | None = None, start_ms: int | None = None):
        if book is None:
            from orderbook import OrderBook
            book = OrderBook()
        self.engine = engine
        self.book = book
        self.book_ahead: Any = None   # from the first read_ahead on: the book messages applied as they are read
        self.ahead_depths: set[int] = set()   # depths whose top levels are taken on the book ahead
        self.book_top: dict[int, tuple[np.ndarray, ...]] = {}   # those levels, after the last book message applied
        self._ahead: deque[tuple] = deque()   # events read out of the files before their turn
        self._read_error: Exception | None = None   # met reading ahead; raised when the replay reaches it
        self.now_ms = 0
        self.book_u = 0
        self.book_seq = 0
        self.book_ts = 0
        self.book_cts = 0
        self.recent: deque[TradePrint] = deque(maxlen=1000)
        self.unpushed: list[TradePrint] = []
        self.minutes: dict[int, list[float]] = {}
        self.exhausted = False
        self.book_updates = 0   # book lines applied
        self.book_lines = 0     # book lines seen (applied or refused): the book cannot have changed without one
        early, trades = split_trades(trades, start_ms) if start_ms is not None else ([], trades)
        streams = (((_book_ts(m), 0, i, m) for i, m in enumerate(book_messages)),
                   ((t.ts_ms, 1, i, t) for i, t in enumerate(trade_prints(trades))))
        self._events = heapq.merge(*streams, key=lambda e: (e[0], e[1], e[2]))
        self._next: tuple | None = self._read()
        if self._next is None and not early:
            raise ValueError("market replay has no book messages and no trades")
        first = start_ms if early else self._next[0] if start_ms is None else max(self._next[0], start_ms)
        self.offset_ms = 0 if rebase_to_ms is None else (rebase_to_ms - first) // 60000 * 60000
        self.now_ms = first + self.offset_ms
        self.start_ms = self.now_ms
        for chunk in early:
            self._on_early_trades(chunk)
        if self._next is None:
            self.exhausted = True
            log.info("market replay holds nothing from its start on")
        self._apply_until(self.now_ms if start_ms is None else self.now_ms - 1)  # messages at start are replayed
        self.now_ms = self.start_ms
        self.unpushed = []

    @classmethod
    def from_dir(cls, engine: MatchingEngine, data_dir: str | Path, rebase_to_ms: int | None = None,
                 start_ms: int | None = None) -> "MarketReplay":
        """Replay a data folder (Trade/ and Orderbook/) through the shared loader.

        start_ms: the replay begins there; what comes before it is applied silently (book state, candles and
        recent trades for warm-up), never pushed: the book from the opening snapshot of start's UTC day file
        (every day file opens with one, so earlier days cannot change it), trades from CANDLE_DAYS before.
        With rebase_to_ms that moment becomes rebase_to_ms."""
        import data_loader
        book_from = trades_from = ""
        if start_ms is not None:
            day = datetime.datetime.fromtimestamp(start_ms / 1000, datetime.timezone.utc)
            book_from = day.strftime("%Y-%m-%d")
            trades_from = (day - datetime.timedelta(days=CANDLE_DAYS)).strftime("%Y-%m-%d")
            log.info("replay from %s: book from the %s file's opening snapshot, candles from the trades of %s on "
                     "(or the first file after it)", day.isoformat(), book_from, trades_from)
        return cls(engine, data_loader.iter_book_messages(data_dir, book_from, levels=True),
                   data_loader.iter_trades(data_dir, trades_from), rebase_to_ms=rebase_to_ms, start_ms=start_ms)

    def _read(self) -> tuple | None:
        """The next event out of the files (a read error met ahead of its turn is raised now, in its turn).
        While reading ahead, a book message is applied to `book_ahead` at once and keeps the top levels of
        `ahead_depths` after it (`_top`): the replay's own book, fed the same messages in the same order, holds
        exactly those levels once it has applied that message."""
        if self._read_error is not None:
            err, self._read_error = self._read_error, None
            raise err
        event = next(self._events, None)
        if event is not None and event[1] == 0 and self.book_ahead is not None:
            self._apply_ahead(event[3])
        return event

    def _apply_ahead(self, msg: dict) -> None:
        if self.book_ahead.apply_bybit(msg, (msg["_bids"], msg["_asks"]) if "_bids" in msg else None) \
                and self.book_ahead.valid:
            msg["_top"] = {n: self.book_ahead.top(n) for n in self.ahead_depths}

    def read_ahead(self, until_ms: int, limit: int) -> int:
        """Read up to `limit` more events stamped up to market ms `until_ms` before their turn (the exchange does
        this while its lockstep client decides); returns how many. What an advance applies is the same either
        way: only the reading and the book ahead's work move. The book ahead starts as a copy of the replay's
        book (with the event read but not applied yet), so replays that never read ahead pay nothing for it."""
        if self.book_ahead is None:
            self.book_ahead = copy.deepcopy(self.book)
            if self._next is not None and self._next[1] == 0:
                self._apply_ahead(self._next[3])
        count = 0
        while count < limit and self._read_error is None:
            last = self._ahead[-1] if self._ahead else self._next
            if last is None or last[0] + self.offset_ms > until_ms:
                break
            try:
                event = self._read()
            except Exception as err:   # a broken file: the advance that reaches it fails, as without reading ahead
                self._read_error = err
                break
            if event is None:
                break
            self._ahead.append(event)
            count += 1
        return count

    def next_ms(self) -> int | None:
        """Market time of the next recorded message (None at the end of the data)."""
        return None if self._next is None else self._next[0] + self.offset_ms

    def apply_next(self) -> int:
        """Apply exactly one recorded message (book line or trade), moving market time to it; 0 at the end."""
        nxt = self.next_ms()
        if nxt is None:
            return 0
        self._apply_one()
        self.now_ms = max(self.now_ms, nxt)
        self.engine.now_ms = max(self.engine.now_ms, self.now_ms)
        return 1

    def advance(self, seconds: float) -> int:
        """Move market time forward by `seconds`, applying every message up to it; returns messages applied."""
        return self._apply_until(self.now_ms + int(round(seconds * 1000)))

    def _apply_until(self, target_ms: int) -> int:
        count = 0
        while self._next is not None and self._next[0] + self.offset_ms <= target_ms:
            self._apply_one()
            count += 1
        self.now_ms = max(self.now_ms, target_ms)
        self.engine.now_ms = max(self.engine.now_ms, self.now_ms)
        return count

    def _apply_one(self) -> None:
        ts, kind, _, item = self._next
        off = self.offset_ms
        ts += off
        self.engine.now_ms = max(self.engine.now_ms, ts)
        if kind == 0:
            if off:
                item = {**item, "ts": ts, "cts": int(item.get("cts") or item["ts"]) + off}
            self._on_book(item, ts)
        else:
            self._on_trade(TradePrint(ts, item.price, item.size, item.side, item.trade_id) if off else item)
        try:
            self._next = self._ahead.popleft() if self._ahead else self._read()
        except Exception:
            self._next, self.exhausted = None, True   # this advance fails; the applied event is never applied again
            log.error("market replay stopped at %d: reading the data failed", ts)
            raise
        if self._next is None and not self.exhausted:
            self.exhausted = True
            log.info("market replay reached the end of its data at %d", ts)

    def _on_book(self, msg: dict, ts: int) -> None:
        self.book_lines += 1
        if self.book.apply_bybit(msg, (msg["_bids"], msg["_asks"]) if "_bids" in msg else None):
            data = msg["data"]
            self.book_u, self.book_seq = int(data["u"]), int(data.get("seq", 0))
            self.book_ts, self.book_cts = ts, int(msg.get("cts") or ts)
            self.book_updates += 1
            self.book_top = msg.get("_top", {})
            self.engine.on_book(self.book, ts)

    def _on_trade(self, t: TradePrint) -> None:
        self.recent.append(t)
        self.unpushed.append(t)
        self._merge_minute(t.ts_ms // 60000 * 60000, [t.price, t.price, t.price, t.price, t.size, t.price * t.size])
        self.engine.on_trade(t.price, t.size, t.side, t.ts_ms)

    def _on_early_trades(self, chunk: Any) -> None:
        """Trades before the start, at once: candles (sums in time order within each minute, as `_on_trade`),
        recent trades, the last price. Nothing rests or waits for a trigger yet, so no trade can fill."""
        if self.engine.active:
            raise RuntimeError("trades before the start are applied at once only while no order rests")
        ts = trade_ms(chunk) + self.offset_ms
        price, size = chunk["price"].to_numpy(dtype=float), chunk["size"].to_numpy(dtype=float)
        minute = ts // 60000 * 60000
        starts = np.flatnonzero(np.r_[True, minute[1:] != minute[:-1]])
        ends = np.r_[starts[1:], len(ts)]
        for a, b in zip(starts.tolist(), ends.tolist()):
            part = [price[a], price[a:b].max(), price[a:b].min(), price[b - 1], 0.0, 0.0]
            for p, q in zip(price[a:b].tolist(), size[a:b].tolist()):
                part[4] += q
                part[5] += p * q
            self._merge_minute(int(minute[a]), part)
        self.recent.extend(TradePrint(t.ts_ms + self.offset_ms, t.price, t.size, t.side, t.trade_id)
                           for t in trade_prints([chunk.iloc[-self.recent.maxlen:]]))
        last = self.recent[-1]
        self.engine.on_trade(last.price, last.size, last.side, last.ts_ms)

    def _merge_minute(self, minute: int, part: list[float]) -> None:
        """Add trades' [open, high, low, close, volume, turnover] of one minute (later than those it holds)."""
        bar = self.minutes.get(minute)
        if bar is None:
            self.minutes[minute] = part
            return
        bar[1], bar[2], bar[3] = max(bar[1], part[1]), min(bar[2], part[2]), part[3]
        bar[4] += part[4]
        bar[5] += part[5]

    def candles(self, interval_s: int, start_ms: int = 0, end_ms: int = 0, limit: int = 200) -> list[list[float]]:
        """[start_ms, o, h, l, c, volume, turnover] newest first; empty intervals are flat at the last close."""
        if not self.minutes:
            return []
        step = interval_s * 1000
        first_min = min(self.minutes)
        hi_bucket = min(end_ms or self.now_ms, self.now_ms) // step * step
        lo_bucket = max(start_ms // step * step, first_min // step * step, hi_bucket - (limit - 1) * step)
        out: list[list[float]] = []
        prev_close = self._close_before(lo_bucket)
        for bucket in range(lo_bucket, hi_bucket + 1, step):
            bar = None
            for minute in range(bucket, bucket + step, 60000):
                mb = self.minutes.get(minute)
                if mb is None:
                    continue
                if bar is None:
                    bar = [float(bucket), mb[0], mb[1], mb[2], mb[3], mb[4], mb[5]]
                else:
                    bar[2] = max(bar[2], mb[1])
                    bar[3] = min(bar[3], mb[2])
                    bar[4] = mb[3]
                    bar[5] += mb[4]
                    bar[6] += mb[5]
            if bar is None:
                if prev_close is None:
                    continue
                bar = [float(bucket), prev_close, prev_close, prev_close, prev_close, 0.0, 0.0]
            prev_close = bar[4]
            out.append(bar)
        out.reverse()
        return out[:limit]

    def _close_before(self, ms: int) -> float | None:
        earlier = [m for m in self.minutes if m < ms]
        return self.minutes[max(earlier)][3] if earlier else None

    def stats_24h(self) -> dict[str, float]:
        """High, low, volume, turnover and reference prices over the last 24 h and 1 h of market time."""
        day_ago, hour_ago = self.now_ms - 86_400_000, self.now_ms - 3_600_000
        rows = [(m, b) for m, b in self.minutes.items() if m >= day_ago // 60000 * 60000]
        last = self.recent[-1].price if self.recent else 0.0
        if not rows:
            return {"high": last, "low": last, "volume": 0.0, "turnover": 0.0, "prev24h": last, "prev1h": last}
        rows.sort()
        hour = [b for m, b in rows if m >= hour_ago // 60000 * 60000]
        return {"high": max(b[1] for _, b in rows), "low": min(b[2] for _, b in rows),
                "volume": sum(b[4] for _, b in rows), "turnover": sum(b[5] for _, b in rows),
                "prev24h": rows[0][1][0], "prev1h": hour[0][0] if hour else last}

    def prune(self) -> None:
        """Keep at most CANDLE_DAYS of 1-minute candles in memory (minutes are made in time order, so the
        oldest are first: each advance drops what fell out, without rebuilding 11,520 minutes)."""
        horizon = self.now_ms - CANDLE_DAYS * 86_400_000
        while self.minutes and (first := next(iter(self.minutes))) < horizon:
            del self.minutes[first]


# ---------------------------------------------------------------- server
@dataclass
class Faults:
    """Injected faults; counters are consumed one request or push at a time (pushes: only those of
    `push_topic` when it is set). `mute_pushes` keeps connections open and answering pings but sends no
    data: the silent-stream case a client's staleness watchdog must catch. `refuse_mode_switch` answers
    every /v5/position/switch-mode with a refusal, as for an account whose mode cannot be changed."""
    http_5xx: int = 0
    http_status: int = 500
    rate_limit_burst: int = 0
    lose_acks: int = 0
    ack_delay_s: float = 0.0
    time_skew_ms: int = 0
    duplicate_pushes: int = 0
    reorder_pushes: int = 0
    push_topic: str = ""
    http_path: str = ""         # when set, http_5xx hits only requests whose path starts with it
    book_reset: bool = False
    mute_pushes: bool = False
    refuse_mode_switch: bool = False   # an account whose position mode cannot be changed
    invalid_utf8_pushes: int = 0       # public pushes sent as text frames whose last byte is 0xff (not UTF-8)


@dataclass(eq=False)
class Conn:
    """One WS connection: its channel, auth state, and topics (pending ones wait for the subscribe ack)."""
    ws: web.WebSocketResponse
    request: web.Request
    private: bool
    conn_id: str = field(default_factory=lambda: uuid.uuid4().hex[:20])
    authed: bool = False
    topics: set[str] = field(default_factory=set)
    pending: set[str] = field(default_factory=set)
    outbox: asyncio.Queue = field(default_factory=asyncio.Queue)
    sent: int = 0    # data frames (topic pushes) queued to this connection


Levels = tuple[np.ndarray, np.ndarray]   # one book side: (ticks, lots) int64, best first, each tick once
NO_LEVELS: Levels = (np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64))


@njit(cache=True)
def unique_levels(ticks: np.ndarray, lots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One level per tick (`Instrument.level_arrays` of a book side, best first, so equal ticks adjoin): two
    prices that round to one tick keep the first one's place and the last one's size, as a {ticks: lots} dict
    built in book order would."""
    out_t = np.empty(len(ticks), dtype=np.int64)
    out_q = np.empty(len(ticks), dtype=np.int64)
    n = 0
    for i in range(len(ticks)):
        if n and out_t[n - 1] == ticks[i]:
            out_q[n - 1] = lots[i]
        else:
            out_t[n], out_q[n] = ticks[i], lots[i]
            n += 1
    return out_t[:n], out_q[:n]


@njit(cache=True)
def level_changes(old_t: np.ndarray, old_q: np.ndarray, new_t: np.ndarray, new_q: np.ndarray,
                  sign: int) -> tuple[np.ndarray, np.ndarray]:
    """What a Bybit orderbook delta carries for one side, as positions: the new levels not sent before or sent
    with another size (new book order), and the sent levels now gone (old order). Both sides best first, each
    tick once; sign: -1 where ticks fall best first (bids), +1 where they rise (asks). One merge pass."""
    changed = np.empty(len(new_t), dtype=np.int64)
    gone = np.empty(len(old_t), dtype=np.int64)
    i = j = nc = ng = 0
    while i < len(new_t) or j < len(old_t):
        if j == len(old_t) or (i < len(new_t) and sign * new_t[i] < sign * old_t[j]):
            changed[nc] = i
            nc += 1
            i += 1
        elif i == len(new_t) or sign * new_t[i] > sign * old_t[j]:
            gone[ng] = j
            ng += 1
            j += 1
        else:
            if new_q[i] != old_q[j]:
                changed[nc] = i
                nc += 1
            i += 1
            j += 1
    return changed[:nc], gone[:ng]


def load_kernels() -> None:
    """Run the publishing kernels once (numba's on-disk cache, or a compile on a fresh checkout) before the first
    advance rather than inside it."""
    t, q = unique_levels(np.ones(1, dtype=np.int64), np.ones(1, dtype=np.int64))
    level_changes(t, q, t, q, 1)


@dataclass
class BookTopic:
    """Per-depth orderbook stream state: last levels sent per side and the update id."""
    depth: int
    u: int = 0
    bids: Levels = NO_LEVELS
    asks: Levels = NO_LEVELS


DEFAULT_PERMISSIONS: dict[str, list[str]] = {
    "ContractTrade": ["Order", "Position"], "Spot": [], "Wallet": [], "Options": [], "Derivatives": [],
    "CopyTrading": [], "BlockTrade": [], "Exchange": [], "NFT": [], "Affiliate": []}


def _envelope(result: Any, now_ms: int, code: int = 0, msg: str = "OK") -> dict:
    """Bybit's REST envelope (HTTP 200 even for business errors)."""
    return {"retCode": code, "retMsg": msg, "result": result if result is not None else {}, "retExtInfo": {},
            "time": now_ms}


class PaperExchange:
    """The aiohttp app (REST + WS on one 127.0.0.1 port) over a MatchingEngine and a MarketReplay."""

    def __init__(self, engine: MatchingEngine, replay: MarketReplay, api_key: str = "paper",
                 api_secret: str = "paper", speed: float = 0.0, tick_s: float = 0.05,
                 subscribe_delay_s: float = 0.05, per_message: bool = False):
        self.engine = engine
        self.replay = replay
        self.inst = engine.inst
        self.api_key = api_key
        self.api_secret = api_secret
        self.speed = speed
        self.per_message = per_message
        self.last_push_ts: dict[str, int] = {}
        self._book_updates_sent = 0
        self._book_lines_sent = 0
        self.tick_s = tick_s
        self.subscribe_delay_s = subscribe_delay_s
        self.rate_window_s = 1.0
        self.rate_limits = True
        self.faults = Faults()
        self.permissions: dict[str, list[str]] = json.loads(json.dumps(DEFAULT_PERMISSIONS))
        self.conns: set[Conn] = set()
        self.book_topics: dict[int, BookTopic] = {}
        self.ticker_sent: dict[str, str] = {}
        self.kline_sent: dict[str, tuple[int, str]] = {}
        self.held: dict[str, str] = {}
        self.hits: dict[tuple[str, str], deque[float]] = {}
        self.url = ""
        self._market_lock = asyncio.Lock()   # held by a streaming advance: REST waits for its end
        self._advanced = asyncio.Event()      # set after each admin advance: time to read ahead
        self._runner: web.AppRunner | None = None
        self._task: asyncio.Task | None = None
        self._reader: asyncio.Task | None = None
        self.app = self._build_app()

    # ------------------------------------------------------------ lifecycle
    def _build_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v5/public/{channel}", self._ws_public)
        app.router.add_get("/v5/private", self._ws_private)
        app.router.add_route("*", "/__admin/{action}", self._admin)
        app.router.add_route("*", "/v5/{tail:.*}", self._rest)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Bind (127.0.0.1 only by default) and start the replay clock; returns the base URL."""
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        self.url = f"http://{host}:{self._runner.addresses[0][1]}"
        self._task = asyncio.get_running_loop().create_task(self._run_clock())
        self._reader = asyncio.get_running_loop().create_task(self._read_ahead())
        return self.url

    async def stop(self) -> None:
        for task in (self._task, self._reader):
            if task is not None:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
                except Exception:   # already logged by the loop; the connections are closed all the same
                    log.exception("a background task of the exchange had failed")
        for conn in list(self.conns):
            try:
                await asyncio.wait_for(conn.ws.close(), 1.0)
            except asyncio.TimeoutError:
                log.warning("WS client %s did not answer the close frame; dropping it", conn.conn_id)
        if self._runner is not None:
            await self._runner.cleanup()

    async def _run_clock(self) -> None:
        """Advance market time with the wall clock × speed (speed=inf: as fast as possible; 0: manual)."""
        loop = asyncio.get_running_loop()
        last = loop.time()
        while True:
            if math.isinf(self.speed):
                await asyncio.sleep(0)
                self.advance(5.0)
                if self.replay.exhausted:
                    await asyncio.sleep(self.tick_s)
                continue
            await asyncio.sleep(self.tick_s)
            now = loop.time()
            if self.speed > 0:
                self.advance((now - last) * self.speed)
            last = now

    async def _read_ahead(self) -> None:
        """After each admin advance, while the lockstep client decides and the exchange would wait, read the next
        READ_AHEAD_MS of recorded messages out of the files (parsing, the book ahead and its top levels), a few
        at a time so a REST request waits at most for one batch (two messages, though one of them may open the
        next file or trade chunk); an advance stops it (`_market_lock`)."""
        while True:
            await self._advanced.wait()
            self._advanced.clear()
            until = self.replay.now_ms + READ_AHEAD_MS
            while not self._market_lock.locked() and self.replay.read_ahead(until, READ_AHEAD_BATCH):
                await asyncio.sleep(0)

    def advance(self, seconds: float, until_ms: int | None = None, stop_at_private: bool = False) -> None:
        """Move market time forward by `seconds` (or to market ms `until_ms`), pushing market data at most every
        market second while clients listen (per_message: every recorded book message and trade as its own push,
        in recorded order). stop_at_private (per_message): stop right after the first message that made a
        private event (a fill, a triggered stop), so a lockstep client reacts to it at that market time, as it
        would in real time, and then advances again."""
        for _ in self._advance_steps(seconds, until_ms, stop_at_private):
            pass

    async def advance_streaming(self, seconds: float, until_ms: int | None = None,
                                stop_at_private: bool = False) -> None:
        """`advance`, letting the pushes leave every PUSH_BATCH messages while the next ones are applied: a
        lockstep client handles them as they come (its process runs on the other core) instead of after the
        whole step, and the event loop turns once per batch rather than once per message. REST requests wait
        for the step's end (`_market_lock`), so market state still changes only in recorded order."""
        async with self._market_lock:
            for n, _ in enumerate(self._advance_steps(seconds, until_ms, stop_at_private), start=1):
                if n % PUSH_BATCH == 0:
                    await asyncio.sleep(0)
            await asyncio.sleep(0)   # the last batch leaves before the answer, as the earlier ones did

    def _advance_steps(self, seconds: float, until_ms: int | None, stop_at_private: bool) -> Iterator[None]:
        """The steps of `advance`: yields after each publish."""
        target = until_ms if until_ms is not None else self.replay.now_ms + int(round(seconds * 1000))
        if self.per_message and self.conns:
            while (nxt := self.replay.next_ms()) is not None and nxt <= target:
                self.replay.apply_next()
                if self.publish() and stop_at_private:
                    return
                yield
            self.replay.advance((target - self.replay.now_ms) / 1000.0)
            self.publish()
            self.replay.prune()
            return
        seconds = max(0.0, (target - self.replay.now_ms) / 1000.0)
        step = 1.0 if self.conns else seconds
        remaining = seconds
        while remaining > 1e-9:
            chunk = min(step, remaining)
            self.replay.advance(chunk)
            remaining -= chunk
            self.publish()
            yield
        self.replay.prune()

    def server_ms(self) -> int:
        """The exchange's wall clock, with any injected skew."""
        return int(time.time() * 1000) + self.faults.time_skew_ms

    # ------------------------------------------------------------ REST
    async def _rest(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        route = ROUTES.get(path)
        if route is None or route[0] != request.method:
            return web.Response(status=404, text="Not Found")
        method, handler_name, signed = route
        if self.faults.http_5xx > 0 and path.startswith(self.faults.http_path):
            self.faults.http_5xx -= 1
            return web.Response(status=self.faults.http_status, text="Internal Server Error")
        body = await request.read()
        async with self._market_lock:   # not in the middle of a streaming advance
            headers: dict[str, str] = {}
            try:
                if signed:
                    self._authenticate(request, body)
                    headers = self._rate_limit(path)
                params = self._params(request, body)
                result = getattr(self, handler_name)(params)
                payload = _envelope(result, self.server_ms())
            except RateLimited as exc:
                payload = _envelope({}, self.server_ms(), exc.code, exc.msg)
                headers = self._limit_headers(path, 0, exc.reset_ms)
            except ExchangeError as exc:
                payload = _envelope({}, self.server_ms(), exc.code, exc.msg)
            self.publish()
        if path in ACK_PATHS:
            if self.faults.lose_acks > 0:
                self.faults.lose_acks -= 1
                log.info("fault: dropping the ack of %s", path)
                if request.transport is not None:
                    request.transport.abort()
                return web.Response(status=200)
            if self.faults.ack_delay_s > 0:
                await asyncio.sleep(self.faults.ack_delay_s)
        return web.json_response(payload, headers=headers, dumps=json.dumps)

    def _params(self, request: web.Request, body: bytes) -> dict:
        if request.method == "GET":
            return dict(request.query)
        if not body:
            return {}
        try:
            params = json.loads(body)
        except json.JSONDecodeError:
            raise ExchangeError(10001, "params error: request body is not JSON") from None
        if not isinstance(params, dict):
            raise ExchangeError(10001, "params error: request body must be a JSON object")
        return params

    def _authenticate(self, request: web.Request, body: bytes) -> None:
        """Bybit V5 HMAC: sign(ts + key + recv_window + raw query|body), and the timestamp window."""
        key = request.headers.get("X-BAPI-API-KEY", "")
        sign = request.headers.get("X-BAPI-SIGN", "")
        ts_text = request.headers.get("X-BAPI-TIMESTAMP", "")
        window_text = request.headers.get("X-BAPI-RECV-WINDOW", "5000")
        if not key or key != self.api_key:
            raise ExchangeError(10003, "API key is invalid.")
        try:
            ts, window = int(ts_text), int(window_text)
        except ValueError:
            raise ExchangeError(10001, "params error: X-BAPI-TIMESTAMP / X-BAPI-RECV-WINDOW invalid") from None
        now = self.server_ms()
        if not (now - window <= ts < now + 1000):
            raise ExchangeError(10002, "invalid request, please check your server timestamp or recv_window param. "
                                       f"req_timestamp[{ts}],server_timestamp[{now}],recv_window[{window}]")
        if request.method == "GET":
            payload = request.raw_path.partition("?")[2]
        else:
            payload = body.decode("utf-8", errors="replace")
        origin = f"{ts_text}{key}{window_text}{payload}"
        expected = hmac.new(self.api_secret.encode(), origin.encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, sign.lower()):
            raise ExchangeError(10004, f"error sign! origin_string[{origin}]")

    def _rate_limit(self, path: str) -> dict[str, str]:
        """Per-key, per-endpoint rolling limits per `rate_window_s` (Bybit: 1 s); an injected burst answers 10006.
        `rate_limits` False (lockstep: minutes of market time pass in milliseconds of wall time, so a wall-clock
        limit would only add sleeps that change nothing) keeps the injected bursts only."""
        limit = ORDER_LIMIT_PER_S if path in ORDER_PATHS else DEFAULT_LIMIT_PER_S
        now = time.time()
        hits = self.hits.setdefault((self.api_key, path), deque())
        while hits and hits[0] <= now - self.rate_window_s:
            hits.popleft()
        if self.faults.rate_limit_burst > 0:
            self.faults.rate_limit_burst -= 1
            raise RateLimited(self.server_ms() + 200)
        if not self.rate_limits:
            return self._limit_headers(path, limit, self.server_ms() + int(self.rate_window_s * 1000))
        if len(hits) >= limit:
            reset = int((hits[0] + self.rate_window_s) * 1000) + self.faults.time_skew_ms + 1
            raise RateLimited(max(reset, self.server_ms() + 1))
        hits.append(now)
        reset = int((hits[0] + self.rate_window_s) * 1000) + self.faults.time_skew_ms
        return self._limit_headers(path, limit - len(hits), reset)

    def _limit_headers(self, path: str, remaining: int, reset_ms: int) -> dict[str, str]:
        limit = ORDER_LIMIT_PER_S if path in ORDER_PATHS else DEFAULT_LIMIT_PER_S
        return {"X-Bapi-Limit": str(limit), "X-Bapi-Limit-Status": str(max(remaining, 0)),
                "X-Bapi-Limit-Reset-Timestamp": str(reset_ms)}

    # ------------------------------------------------------------ REST handlers: market
    def h_time(self, p: dict) -> dict:
        now_ns = time.time_ns() + self.faults.time_skew_ms * 1_000_000
        return {"timeSecond": str(now_ns // 1_000_000_000), "timeNano": str(now_ns)}

    def _check_market(self, p: dict, need_symbol: bool = True) -> None:
        if (p.get("category") or "") != "linear":
            raise ExchangeError(10001, "params error: category only supports linear")
        if need_symbol and not p.get("symbol"):
            raise ExchangeError(10001, "params error: symbol is required")
        if p.get("symbol") and p["symbol"] != self.inst.symbol:
            raise ExchangeError(10001, "params error: symbol invalid")

    def h_instruments(self, p: dict) -> dict:
        self._check_market(p, need_symbol=False)
        i = self.inst
        item = {"symbol": i.symbol, "contractType": "LinearPerpetual", "status": "Trading",
                "baseCoin": i.symbol[:-4] if i.symbol.endswith("USDT") else i.symbol, "quoteCoin": "USDT",
                "launchTime": "0", "deliveryTime": "0", "deliveryFeeRate": "", "priceScale": str(i.price_decimals),
                "leverageFilter": {"minLeverage": "1", "maxLeverage": money(MAX_LEVERAGE), "leverageStep": "0.01"},
                "priceFilter": {"minPrice": str(i.tick_size), "maxPrice": str(i.tick_size * 10**9),
                                "tickSize": str(i.tick_size)},
                "lotSizeFilter": {"maxOrderQty": str(i.max_qty), "minOrderQty": str(i.min_qty),
                                  "qtyStep": str(i.qty_step), "postOnlyMaxOrderQty": str(i.max_qty),
                                  "maxMktOrderQty": str(i.max_mkt_qty), "minNotionalValue": str(i.min_notional)},
                "unifiedMarginTrade": True, "fundingInterval": 480, "settleCoin": "USDT", "copyTrading": "none",
                "upperFundingRate": "0.005", "lowerFundingRate": "-0.005", "isPreListing": False,
                "preListingInfo": None, "riskParameters": {"priceLimitRatioX": money(PRICE_LIMIT_RATIO),
                                                     "priceLimitRatioY": money(PRICE_LIMIT_RATIO)}}
        return {"category": "linear", "list": [item], "nextPageCursor": ""}

    def h_kline(self, p: dict) -> dict:
        self._check_market(p)
        interval = str(p.get("interval", ""))
        if interval not in KLINE_INTERVALS:
            raise ExchangeError(10001, f"params error: interval {interval!r} not supported "
                                       f"(one of {', '.join(KLINE_INTERVALS)})")
        limit = min(max(_int(p, "limit", 200), 1), 1000)
        rows = self.replay.candles(KLINE_INTERVALS[interval], _int(p, "start", 0), _int(p, "end", 0), limit)
        ip = self.inst.price_str
        to = self.inst.to_ticks
        out = [[str(int(r[0])), ip(to(r[1])), ip(to(r[2])), ip(to(r[3])), ip(to(r[4])),
                self.inst.qty_str(round(r[5] / float(self.inst.qty_step))), money(r[6])] for r in rows]
        return {"symbol": self.inst.symbol, "category": "linear", "list": out}

    def _levels_str(self, n: int) -> tuple[list[list[str]], list[list[str]]]:
        book = self.replay.book
        if not book.valid:
            return [], []
        bp, bq, ap, aq = book.top(n)
        return self._wire(*self.inst.level_arrays(bp, bq)), self._wire(*self.inst.level_arrays(ap, aq))

    def h_orderbook(self, p: dict) -> dict:
        self._check_market(p)
        limit = min(max(_int(p, "limit", 25), 1), 1000)
        bids, asks = self._levels_str(limit)
        r = self.replay
        return {"s": self.inst.symbol, "b": bids, "a": asks, "ts": r.book_ts, "u": r.book_u, "seq": r.book_seq,
                "cts": r.book_cts}

    def h_recent_trades(self, p: dict) -> dict:
        self._check_market(p)
        limit = min(max(_int(p, "limit", 500), 1), 1000)
        trades = list(self.replay.recent)[-limit:]
        trades.reverse()
        rows = [{"execId": t.trade_id, "symbol": self.inst.symbol, "price": self.inst.price_str(self.inst.to_ticks(t.price)),
                 "size": self.inst.qty_str(self.inst.to_lots_floor(t.size + 1e-12)), "side": t.side,
                 "time": str(t.ts_ms), "isBlockTrade": False, "isRPITrade": False, "seq": str(self.replay.book_seq)}
                for t in trades]
        return {"category": "linear", "list": rows}

    def _ticker(self) -> dict:
        bid, ask = self.engine.best()
        bp, bq, ap, aq = self.replay.book.top(1) if self.replay.book.valid else ([], [], [], [])
        ip = self.inst.price_str
        last = self.engine.last_price or self.inst.to_ticks(self.engine.mark() or 0.0)
        st = self.replay.stats_24h()
        prev24 = st["prev24h"] or self.inst.px(last)
        mark = self.engine.mark()
        return {"symbol": self.inst.symbol, "lastPrice": ip(last), "indexPrice": money(mark), "markPrice": money(mark),
                "prevPrice24h": money(prev24), "price24hPcnt": money((self.inst.px(last) / prev24 - 1) if prev24 else 0),
                "highPrice24h": money(st["high"]), "lowPrice24h": money(st["low"]), "prevPrice1h": money(st["prev1h"]),
                "openInterest": "0", "openInterestValue": "0", "turnover24h": money(st["turnover"]),
                "volume24h": money(st["volume"]), "fundingRate": money(self.engine.funding_rate),
                "nextFundingTime": str((self.replay.now_ms // FUNDING_INTERVAL_MS + 1) * FUNDING_INTERVAL_MS),
                "predictedDeliveryPrice": "", "basisRate": "", "deliveryFeeRate": "", "deliveryTime": "0",
                "ask1Size": self.inst.qty_str(self.inst.to_lots_floor(float(aq[0]) + 1e-12)) if len(aq) else "0",
                "bid1Price": ip(bid) if bid else "0",
                "ask1Price": ip(ask) if ask else "0",
                "bid1Size": self.inst.qty_str(self.inst.to_lots_floor(float(bq[0]) + 1e-12)) if len(bq) else "0",
                "basis": "", "tickDirection": "ZeroPlusTick"}

    def h_tickers(self, p: dict) -> dict:
        self._check_market(p, need_symbol=False)
        return {"category": "linear", "list": [self._ticker()]}

    # ------------------------------------------------------------ REST handlers: trading and account
    def h_create(self, p: dict) -> dict:
        return self.engine.place_order(p)

    def h_amend(self, p: dict) -> dict:
        return self.engine.amend_order(p)

    def h_cancel(self, p: dict) -> dict:
        return self.engine.cancel_order(p)

    def h_cancel_all(self, p: dict) -> dict:
        return self.engine.cancel_all(p)

    def h_realtime(self, p: dict) -> dict:
        return self.engine.open_orders(p)

    def h_history(self, p: dict) -> dict:
        return self.engine.order_history(p)

    def h_positions(self, p: dict) -> dict:
        return self.engine.position_list(p)

    def h_leverage(self, p: dict) -> dict:
        return self.engine.set_leverage(p)

    def h_switch_mode(self, p: dict) -> dict:
        if self.faults.refuse_mode_switch:
            raise ExchangeError(10001, "params error: position mode cannot be switched for this account")
        return self.engine.switch_mode(p)

    def h_trading_stop(self, p: dict) -> dict:
        return self.engine.trading_stop(p)

    def h_wallet(self, p: dict) -> dict:
        return self.engine.wallet_balance(p)

    def h_executions(self, p: dict) -> dict:
        return self.engine.execution_list(p)

    def h_closed_pnl(self, p: dict) -> dict:
        return self.engine.closed_pnl_list(p)

    def h_fee_rate(self, p: dict) -> dict:
        return {"list": [{"symbol": self.inst.symbol, "takerFeeRate": money(self.engine.taker_fee),
                          "makerFeeRate": money(self.engine.maker_fee)}]}

    def h_query_api(self, p: dict) -> dict:
        """/v5/user/query-api: the key's permissions (a test can grant Withdraw to check a client refuses)."""
        read_only = 0 if self.permissions.get("ContractTrade") else 1
        return {"id": "1", "note": "paper", "apiKey": self.api_key, "readOnly": read_only, "secret": "",
                "permissions": self.permissions, "ips": ["*"], "type": 1, "deadlineDay": -1, "expiredAt": "",
                "createdAt": "", "unified": 0, "uta": 1, "userID": 1, "inviterID": 0, "vipLevel": "No VIP",
                "mktMakerLevel": "0", "affiliateID": 0, "rsaPublicKey": "", "isMaster": True,
                "parentUid": "0", "kycLevel": "LEVEL_DEFAULT", "kycRegion": ""}

    # ------------------------------------------------------------ WS
    async def _ws_public(self, request: web.Request) -> web.StreamResponse:
        if request.match_info["channel"] != "linear":
            return web.Response(status=404, text="only /v5/public/linear is served")
        return await self._ws(request, private=False)

    async def _ws_private(self, request: web.Request) -> web.StreamResponse:
        return await self._ws(request, private=True)

    async def _ws(self, request: web.Request, private: bool) -> web.StreamResponse:
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        conn = Conn(ws=ws, request=request, private=private)
        self.conns.add(conn)
        writer = asyncio.get_running_loop().create_task(self._writer(conn))
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                try:
                    frame = json.loads(msg.data)
                    if not isinstance(frame, dict):
                        raise ValueError("not an object")
                except ValueError:
                    self._send(conn, {"success": False, "ret_msg": "invalid JSON", "conn_id": conn.conn_id,
                                            "op": ""})
                    continue
                self._on_frame(conn, frame)
        finally:
            self.conns.discard(conn)
            writer.cancel()
        return ws

    async def _writer(self, conn: Conn) -> None:
        """The one task writing to a connection, so frames leave in exactly the order they were queued."""
        while True:
            text = await conn.outbox.get()
            if conn.ws.closed:
                return
            try:
                if self.faults.invalid_utf8_pushes > 0 and not conn.private and text.startswith('{"topic"'):
                    self.faults.invalid_utf8_pushes -= 1
                    await conn.ws.send_frame(text.encode()[:-1] + b"\xff", web.WSMsgType.TEXT)
                else:
                    await conn.ws.send_str(text)
            except (ConnectionResetError, RuntimeError):
                self.conns.discard(conn)
                return

    def _send(self, conn: Conn, obj: dict | str) -> None:
        """Queue a frame; a client that falls too far behind is disconnected, as Bybit does."""
        if conn.outbox.qsize() >= MAX_OUTBOX:
            log.warning("WS client %s is %d frames behind: disconnecting it", conn.conn_id, MAX_OUTBOX)
            self.conns.discard(conn)
            if conn.request.transport is not None:
                conn.request.transport.abort()
            return
        conn.outbox.put_nowait(obj if isinstance(obj, str) else json.dumps(obj))

    def _on_frame(self, conn: Conn, frame: dict) -> None:
        op = frame.get("op")
        req_id = str(frame.get("req_id", ""))
        if op == "ping":
            if conn.private:
                self._send(conn, {"req_id": req_id, "op": "pong", "args": [str(self.server_ms())],
                                        "conn_id": conn.conn_id})
            else:
                self._send(conn, {"success": True, "ret_msg": "pong", "conn_id": conn.conn_id,
                                        "req_id": req_id, "op": "ping"})
        elif op == "auth" and conn.private:
            self._send(conn, self._auth_ws(conn, frame.get("args") or []))
        elif op in ("subscribe", "unsubscribe"):
            asyncio.get_running_loop().create_task(self._subscribe(conn, op, req_id, list(frame.get("args") or [])))
        else:
            self._send(conn, {"success": False, "ret_msg": f"error:handler not found,op:{op}",
                                    "conn_id": conn.conn_id, "req_id": req_id, "op": op or ""})

    def _auth_ws(self, conn: Conn, args: list) -> dict:
        """Private WS auth: args [key, expires_ms, hex hmac(secret, 'GET/realtime' + expires)]."""
        reply = {"success": False, "ret_msg": "", "op": "auth", "conn_id": conn.conn_id}
        if len(args) != 3:
            reply["ret_msg"] = "Params Error"
            return reply
        key, expires, sign = str(args[0]), str(args[1]), str(args[2])
        expected = hmac.new(self.api_secret.encode(), f"GET/realtime{expires}".encode(), hashlib.sha256).hexdigest()
        if key != self.api_key:
            reply["ret_msg"] = "Invalid apikey"
        elif not expires.isdigit() or int(expires) <= self.server_ms():
            reply["ret_msg"] = "Params Error"
        elif not hmac.compare_digest(expected, sign):
            reply["ret_msg"] = "Signature verification failed"
        else:
            conn.authed = True
            reply["success"] = True
        return reply

    def _valid_topic(self, conn: Conn, topic: str) -> bool:
        sym = self.inst.symbol
        if conn.private:
            return topic in ("order", "execution", "position", "wallet", "order.linear", "execution.linear",
                             "position.linear")
        parts = topic.split(".")
        if len(parts) == 3 and parts[0] == "orderbook":
            return parts[1].isdigit() and int(parts[1]) in BOOK_DEPTHS and parts[2] == sym
        if len(parts) == 3 and parts[0] == "kline":
            return parts[1] in KLINE_INTERVALS and parts[2] == sym
        return topic in (f"publicTrade.{sym}", f"tickers.{sym}")

    async def _subscribe(self, conn: Conn, op: str, req_id: str, topics: list[str]) -> None:
        """Ack after a delay (pybit stores its callback only after sending), then snapshots, then go live."""
        bad = [t for t in topics if not self._valid_topic(conn, t)]
        if op == "subscribe":
            if not bad and not (conn.private and not conn.authed):
                conn.pending.update(topics)
            await asyncio.sleep(self.subscribe_delay_s)
        ack: dict[str, Any] = {"success": not bad, "ret_msg": "", "conn_id": conn.conn_id, "req_id": req_id,
                               "op": op}
        if conn.private and not conn.authed:
            ack.update(success=False, ret_msg="Request not authorized")
        elif bad:
            ack["ret_msg"] = f"error:handler not found,topic:{','.join(bad)}"
        self._send(conn, ack)
        if not ack["success"]:
            return
        if op == "unsubscribe":
            conn.topics.difference_update(topics)
            return
        for topic in topics:
            first = self._first_push(topic)
            if first is not None:
                self._send(conn, first)
            conn.pending.discard(topic)
            conn.topics.add(topic)

    def _first_push(self, topic: str) -> dict | None:
        """What a new subscriber gets first: the orderbook snapshot (current u) or the full ticker."""
        if topic.startswith("orderbook."):
            state = self._book_topic(int(topic.split(".")[1]))
            return self._book_msg(topic, state, "snapshot", self._wire(*state.bids), self._wire(*state.asks))
        if topic.startswith("tickers."):
            ticker = self._ticker()
            return {"topic": topic, "type": "snapshot", "data": ticker, "cs": self.replay.book_seq,
                    "ts": self.replay.now_ms}
        return None

    def _book_topic(self, depth: int) -> BookTopic:
        state = self.book_topics.get(depth)
        if state is None:
            state = BookTopic(depth)
            self.replay.ahead_depths.add(depth)
            state.bids, state.asks = self._level_ints(depth)
            state.u = 1
            self.book_topics[depth] = state
        return state

    def _level_ints(self, n: int) -> tuple[Levels, Levels]:
        """The top n levels per side in ticks and lots, best first (what the wire strings print, compared as ints)."""
        book = self.replay.book
        if not book.valid:
            return NO_LEVELS, NO_LEVELS
        top = self.replay.book_top.get(n)
        bp, bq, ap, aq = top if top is not None else book.top(n)
        return unique_levels(*self.inst.level_arrays(bp, bq)), unique_levels(*self.inst.level_arrays(ap, aq))

    def _wire(self, ticks: np.ndarray, lots: np.ndarray) -> list[list[str]]:
        """Levels as Bybit's [[price, size], ...] strings."""
        ps, qs = self.inst.price_strs, self.inst.qty_strs
        return [[ps(t), qs(q)] for t, q in zip(ticks.tolist(), lots.tolist())]

    def _delta(self, old: Levels, new: Levels, sign: int) -> list[list[str]]:
        """One side of an orderbook delta: changed levels, then the gone ones with size "0"."""
        changed, gone = level_changes(*old, *new, sign)
        ps = self.inst.price_strs
        return self._wire(new[0][changed], new[1][changed]) + [[ps(t), "0"] for t in old[0][gone].tolist()]

    def _book_msg(self, topic: str, state: BookTopic, kind: str, bids: list, asks: list) -> dict:
        return {"topic": topic, "type": kind, "ts": self.replay.book_ts or self.replay.now_ms,
                "data": {"s": self.inst.symbol, "b": bids, "a": asks, "u": state.u, "seq": self.replay.book_seq},
                "cts": self.replay.book_cts or self.replay.now_ms}

    # ------------------------------------------------------------ publishing
    def publish(self) -> int:
        """Push engine events and market data to subscribers (schedules sends; never blocks); returns the number
        of private events the matching engine had made."""
        events = self.engine.drain()
        trades, self.replay.unpushed = self.replay.unpushed, []
        if not self.conns or self.faults.mute_pushes:
            return len(events)
        frames: list[tuple[Conn, str]] = []
        for topic, record in events:
            for name in (topic, f"{topic}.linear"):  # echo the exact topic each client subscribed to
                listeners = [c for c in self.conns if c.private and c.authed and name in c.topics]
                if listeners:
                    msg = json.dumps({"id": uuid.uuid4().hex, "topic": name, "creationTime": self.engine.now_ms
                                      or self.server_ms(), "data": [record]})
                    for out in self._apply_push_faults(name, msg):
                        frames.extend((conn, out) for conn in listeners)
        for topic, msg, ts in self._market_frames(trades):
            sent = self._apply_push_faults(topic, msg)
            if sent:   # a held-back push counts once it is really sent (lockstep clients wait for it)
                latest = ts if sent == [msg] else max(int(json.loads(out).get("ts") or 0) for out in sent)
                self.last_push_ts[topic] = max(self.last_push_ts.get(topic, 0), latest)
            for out in sent:
                for conn in self.conns:
                    if not conn.private and topic in conn.topics:
                        frames.append((conn, out))
        for conn, msg in frames:
            conn.sent += 1
            self._send(conn, msg)
        return len(events)

    def _subscribed(self) -> set[str]:
        topics: set[str] = set()
        for conn in self.conns:
            if not conn.private:
                topics |= conn.topics | conn.pending
        return topics

    def _market_frames(self, trades: list[TradePrint]) -> list[tuple[str, str, int]]:
        """The public pushes due now as (topic, frame, market ms): trades, book deltas per depth, tickers,
        candles. In per-message mode a recorded book line that changes nothing still gets its (empty) delta."""
        subscribed = self._subscribed()
        out: list[tuple[str, str, int]] = []
        sym = self.inst.symbol
        topic = f"publicTrade.{sym}"
        if trades and topic in subscribed:
            for i in range(0, len(trades), 1024):
                rows = [{"T": t.ts_ms, "s": sym, "S": t.side, "v": self.inst.qty_str(self.inst.to_lots_floor(t.size + 1e-12)),
                         "p": self.inst.price_str(self.inst.to_ticks(t.price)), "L": "ZeroPlusTick", "i": t.trade_id,
                         "BT": False, "RPI": False, "seq": self.replay.book_seq} for t in trades[i:i + 1024]]
                frame = {"topic": topic, "type": "snapshot", "ts": rows[-1]["T"], "data": rows}
                out.append((topic, orjson.dumps(frame).decode(), rows[-1]["T"]))
        reset = self.faults.book_reset
        self.faults.book_reset = False
        force = self.per_message and self.replay.book_updates != self._book_updates_sent
        self._book_updates_sent = self.replay.book_updates
        moved = reset or self.replay.book_lines != self._book_lines_sent   # else every topic holds the book now
        self._book_lines_sent = self.replay.book_lines
        for depth in BOOK_DEPTHS:
            topic = f"orderbook.{depth}.{sym}"
            if moved and (topic in subscribed or depth in self.book_topics):
                msg = self._book_update(topic, depth, reset, force)
                if msg is not None:
                    out.append((topic, orjson.dumps(msg).decode(), msg["ts"]))
        topic = f"tickers.{sym}"
        if topic in subscribed:
            ticker = self._ticker()
            key = json.dumps([ticker["lastPrice"], ticker["bid1Price"], ticker["ask1Price"], ticker["bid1Size"],
                              ticker["ask1Size"]])
            if self.ticker_sent.get(topic) != key:
                self.ticker_sent[topic] = key
                out.append((topic, json.dumps({"topic": topic, "type": "delta", "data": ticker,
                                               "cs": self.replay.book_seq, "ts": self.replay.now_ms}),
                            self.replay.now_ms))
        for interval, secs in KLINE_INTERVALS.items():
            topic = f"kline.{interval}.{sym}"
            if topic in subscribed:
                out.extend((topic, m, self.replay.now_ms) for m in self._kline_frames(topic, interval, secs))
        return out

    def _book_update(self, topic: str, depth: int, reset: bool, force: bool = False) -> dict | None:
        """The delta (depth 1: snapshot) between the last levels sent and the book now; u=1 on a reset;
        force: an empty delta rather than nothing when the levels did not change."""
        state = self._book_topic(depth)
        new_b, new_a = self._level_ints(depth)
        if reset:
            state.u, state.bids, state.asks = 1, new_b, new_a
            return self._book_msg(topic, state, "snapshot", self._wire(*new_b), self._wire(*new_a))
        if depth == 1:
            same = all(np.array_equal(x, y) for x, y in zip(new_b + new_a, state.bids + state.asks))
            if same and not force:
                return None
            state.u += 1
            state.bids, state.asks = new_b, new_a
            return self._book_msg(topic, state, "snapshot", self._wire(*new_b), self._wire(*new_a))
        db, da = self._delta(state.bids, new_b, -1), self._delta(state.asks, new_a, 1)
        if not db and not da and not force:
            return None
        state.u += 1
        state.bids, state.asks = new_b, new_a
        return self._book_msg(topic, state, "delta", db, da)

    def _kline_frames(self, topic: str, interval: str, secs: int) -> list[str]:
        """The current candle when it changed, and the closed one (confirm=true) when a new one starts."""
        rows = self.replay.candles(secs, limit=2)
        if not rows:
            return []
        ip, to = self.inst.price_str, self.inst.to_ticks
        step = secs * 1000

        def item(r: list[float], confirm: bool) -> dict:
            return {"start": int(r[0]), "end": int(r[0]) + step - 1, "interval": interval, "open": ip(to(r[1])),
                    "close": ip(to(r[4])), "high": ip(to(r[2])), "low": ip(to(r[3])),
                    "volume": self.inst.qty_str(round(r[5] / float(self.inst.qty_step))), "turnover": money(r[6]),
                    "confirm": confirm, "timestamp": self.replay.now_ms}

        current = rows[0]
        sent = self.kline_sent.get(topic)
        frames = []
        if sent is not None and sent[0] < int(current[0]) and len(rows) > 1 and int(rows[1][0]) == sent[0]:
            frames.append(item(rows[1], True))
        key = json.dumps(current)
        if sent is None or sent[1] != key:
            frames.append(item(current, False))
        self.kline_sent[topic] = (int(current[0]), key)
        return [json.dumps({"topic": topic, "data": [f], "ts": self.replay.now_ms, "type": "snapshot"})
                for f in frames]

    def _apply_push_faults(self, topic: str, msg: str) -> list[str]:
        """Duplicate a push, or hold one back and deliver it after the next (out of order)."""
        held = self.held.pop(topic, None)
        if self.faults.push_topic and topic != self.faults.push_topic:
            return [msg] + ([held] if held is not None else [])
        if self.faults.reorder_pushes > 0 and held is None:
            self.faults.reorder_pushes -= 1
            self.held[topic] = msg
            return []
        frames = [msg] + ([held] if held is not None else [])
        if self.faults.duplicate_pushes > 0:
            self.faults.duplicate_pushes -= 1
            frames.insert(1, msg)
        return frames

    async def drop_ws(self, channel: str = "all", how: str = "abort") -> int:
        """Fault: kill WS connections ('public'|'private'|'all'), by TCP abort or a clean close frame."""
        victims = [c for c in self.conns if channel == "all" or c.private == (channel == "private")]
        for conn in victims:
            self.conns.discard(conn)
            if how == "abort":
                transport = conn.request.transport
                if transport is not None:
                    transport.abort()
            else:
                await conn.ws.close(code=1000)
        return len(victims)

    # ------------------------------------------------------------ admin
    async def _admin(self, request: web.Request) -> web.StreamResponse:
        """Test control on the same port: advance, speed (start or change a paced clock), fault, drop_ws,
        permissions, state."""
        action = request.match_info["action"]
        try:
            body = await request.json() if request.can_read_body else {}
        except ValueError:
            return web.json_response({"error": "body must be JSON"}, status=400)
        if action == "advance":
            step = _advance_args(body)
            if isinstance(step, str):
                return web.json_response({"error": step}, status=400)
            await self.advance_streaming(step[0], until_ms=step[1],
                                         stop_at_private=bool(body.get("stop_at_private", False)))
            self._advanced.set()
        elif action == "speed":
            speed = _non_negative(body.get("speed"))
            if speed is None:
                return web.json_response({"error": "speed must be a finite number >= 0 (market seconds per wall "
                                                   f"second), got {body.get('speed')!r}"}, status=400)
            self.speed = speed
        elif action == "fault":
            for key, value in body.items():
                if not hasattr(self.faults, key):
                    return web.json_response({"error": f"unknown fault {key!r}"}, status=400)
                setattr(self.faults, key, type(getattr(self.faults, key))(value))
        elif action == "drop_ws":
            await self.drop_ws(body.get("channel", "all"), body.get("how", "abort"))
        elif action == "permissions":
            self.permissions.update(body)
        elif action != "state":
            return web.json_response({"error": f"unknown action {action!r}"}, status=404)
        return web.json_response(self.state())

    def state(self) -> dict:
        """A summary for tests and operators; `last_push_ts` (public topic -> market ms of its last push) and
        `private_sent` (data frames queued to the newest private connection) let a lockstep client wait
        until it has received everything an advance produced."""
        private = [c.sent for c in self.conns if c.private]
        return {"market_ms": self.replay.now_ms, "exhausted": self.replay.exhausted,
                "next_ms": self.replay.next_ms(), "last_push_ts": dict(self.last_push_ts),
                "private_sent": max(private, default=0),
                "equity": self.engine.equity(), "wallet": self.engine.wallet,
                "open_orders": sum(o.is_open for o in self.engine.orders.values()),
                "positions": {i: self.inst.qty(p.size) for i, p in self.engine.positions.items()},
                "connections": len(self.conns)}


def _non_negative(value: Any) -> float | None:
    """A finite number >= 0 from a JSON field (number or numeric string), else None."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number >= 0 else None


def _advance_args(body: dict) -> tuple[float, int | None] | str:
    """(seconds, until_ms) of an admin advance, or the message naming the bad field."""
    seconds = _non_negative(body.get("seconds", 0))
    if seconds is None:
        return f"advance: seconds must be a finite number >= 0, got {body.get('seconds')!r}"
    until = body.get("until_ms")
    if until is None:
        return seconds, None
    if isinstance(until, bool) or not re.fullmatch(r"-?\d+", str(until)) or isinstance(until, float):
        return f"advance: until_ms must be an integer market time in ms, got {until!r}"
    return seconds, int(until)


ROUTES: dict[str, tuple[str, str, bool]] = {
    "/v5/market/time": ("GET", "h_time", False),
    "/v5/market/instruments-info": ("GET", "h_instruments", False),
    "/v5/market/kline": ("GET", "h_kline", False),
    "/v5/market/orderbook": ("GET", "h_orderbook", False),
    "/v5/market/recent-trade": ("GET", "h_recent_trades", False),
    "/v5/market/tickers": ("GET", "h_tickers", False),
    "/v5/order/create": ("POST", "h_create", True),
    "/v5/order/amend": ("POST", "h_amend", True),
    "/v5/order/cancel": ("POST", "h_cancel", True),
    "/v5/order/cancel-all": ("POST", "h_cancel_all", True),
    "/v5/order/realtime": ("GET", "h_realtime", True),
    "/v5/order/history": ("GET", "h_history", True),
    "/v5/position/list": ("GET", "h_positions", True),
    "/v5/position/set-leverage": ("POST", "h_leverage", True),
    "/v5/position/switch-mode": ("POST", "h_switch_mode", True),
    "/v5/position/trading-stop": ("POST", "h_trading_stop", True),
    "/v5/position/closed-pnl": ("GET", "h_closed_pnl", True),
    "/v5/account/wallet-balance": ("GET", "h_wallet", True),
    "/v5/account/fee-rate": ("GET", "h_fee_rate", True),
    "/v5/execution/list": ("GET", "h_executions", True),
    "/v5/user/query-api": ("GET", "h_query_api", True),
}
ACK_PATHS = {"/v5/order/create", "/v5/order/amend", "/v5/order/cancel", "/v5/order/cancel-all"}


# ---------------------------------------------------------------- running
def build_exchange(data_dir: str | Path, balance: float = 10000.0, speed: float = 0.0, api_key: str = "paper",
                   api_secret: str = "paper", symbol: str | None = None, venue: VenueConfig | None = None,
                   leverage: float = 10.0, rebase_time: bool = False, start: str = "",
                   per_message: bool = False) -> PaperExchange:
    """An exchange replaying a data folder, with the instrument rules and fees of the config
    (start: 'YYYY-MM-DD[THH:MM]' UTC where the replay begins; rebase_time: shift the data so it starts now,
    see MarketReplay; per_message: push every recorded message, see PaperExchange.advance)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data folder {data_dir} does not exist")
    import data_loader
    try:
        files = data_loader.list_files(data_dir)
    except data_loader.DataError as err:
        raise ValueError(str(err)) from None
    files.require_symbol("--symbol", symbol or "")
    if start:
        files.require_day("--start", start, start[:10])
    costs = venue or VenueConfig()
    sym = symbol or data_dir.name.split("_")[0]
    inst = load_instrument(data_dir, sym)
    engine = MatchingEngine(inst, balance=balance, maker_fee=costs.maker_fee, taker_fee=costs.taker_fee,
                            fill_rule=costs.fill_rule, leverage=leverage, funding_rate=costs.funding_rate_8h)
    replay = MarketReplay.from_dir(engine, data_dir, int(time.time() * 1000) if rebase_time else None,
                                   parse_start(start) if start else None)
    load_kernels()
    return PaperExchange(engine, replay, api_key=api_key, api_secret=api_secret, speed=speed,
                         per_message=per_message)


def parse_start(text: str) -> int:
    """'YYYY-MM-DD' or 'YYYY-MM-DDTHH:MM' (UTC) as epoch ms; ValueError names the expected form."""
    for fmt in ("%Y-%m-%dT%H:%M", "%Y-%m-%d"):
        try:
            moment = datetime.datetime.strptime(text, fmt).replace(tzinfo=datetime.timezone.utc)
        except ValueError:
            continue
        return int(moment.timestamp() * 1000)
    raise ValueError(f"--start {text!r}: expected YYYY-MM-DD or YYYY-MM-DDTHH:MM (UTC)")


class ExchangeThread:
    """Run a PaperExchange on its own event loop in a background thread (sync callers such as pybit tests)."""

    def __init__(self, exchange: PaperExchange, host: str = "127.0.0.1", port: int = 0):
        self.exchange = exchange
        self.host, self.port = host, port
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="paper-exchange", daemon=True)
        self.url = ""

    def __enter__(self) -> "ExchangeThread":
        self.thread.start()
        self.url = asyncio.run_coroutine_threadsafe(self.exchange.start(self.host, self.port), self.loop).result(10)
        return self

    def __exit__(self, *exc: Any) -> None:
        asyncio.run_coroutine_threadsafe(self.exchange.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    @property
    def ws_public(self) -> str:
        """pybit PUBLIC_WSS template for this server."""
        return self.url.replace("http://", "ws://") + "/v5/public/{CHANNEL_TYPE}"

    @property
    def ws_private(self) -> str:
        return self.url.replace("http://", "ws://") + "/v5/private"

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run fn(*args) on the exchange's loop (coroutine functions are awaited) and return its result."""
        async def run() -> Any:
            result = fn(*args)
            return await result if asyncio.iscoroutine(result) else result
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(60)

    def advance(self, seconds: float) -> None:
        self.call(self.exchange.advance, seconds)


def _speed(text: str) -> float:
    if text.lower() in ("max", "inf", "fast"):
        return math.inf
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError("speed must be >= 0 (0 = manual clock, 'max' = as fast as possible)")
    return value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Local Bybit-V5-compatible paper exchange (REST + WS, 127.0.0.1).")
    add_config_args(parser, ["--data-dir"])
    parser.add_argument("--port", type=int, default=8765, help="port on 127.0.0.1 (0 = any free port)")
    parser.add_argument("--speed", type=_speed, default=1.0,
                        help="market seconds per wall second; 'max' = as fast as possible; 0 = frozen")
    parser.add_argument("--balance", type=float, default=10000.0, help="starting USDT wallet balance")
    parser.add_argument("--api-key", default="paper", help="the API key the exchange accepts")
    parser.add_argument("--api-secret", default="paper", help="the API secret the exchange accepts")
    parser.add_argument("--symbol", default=None, help="symbol (default: from instrument.json or the folder name)")
    parser.add_argument("--leverage", type=float, default=10.0, help="initial leverage")
    parser.add_argument("--rebase-time", action="store_true",
                        help="shift market timestamps (whole minutes) so the data (or --start) is now; use with --speed 1")
    parser.add_argument("--start", default="", help="YYYY-MM-DD[THH:MM] UTC: the replay begins there (the book "
                                                    "from that day file's opening snapshot, candles and recent "
                                                    "trades from the 8 days before; nothing earlier is pushed)")
    parser.add_argument("--publish", choices=("per-second", "per-message"), default="per-second",
                        help="push book/trades at most once per market second, or every recorded message")
    parser.add_argument("--lockstep", action="store_true",
                        help="market time moves only on POST /__admin/advance (the client acknowledges by "
                             "advancing when it has processed what it was sent); implies --speed 0 --publish per-message "
                             "and no wall-clock rate limits (injected 10006 bursts still answer)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = config_from_args(args)
        exchange = build_exchange(cfg.data.data_dir, balance=args.balance, speed=0.0 if args.lockstep else args.speed,
                                  api_key=args.api_key,
                                  api_secret=args.api_secret, symbol=args.symbol, venue=cfg.venue,
                                  leverage=args.leverage, rebase_time=args.rebase_time, start=args.start,
                                  per_message=args.lockstep or args.publish == "per-message")
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        parser.error(str(exc))
    exchange.rate_limits = not args.lockstep

    async def serve() -> None:
        url = await exchange.start("127.0.0.1", args.port)
        print(f"paper exchange listening on {url} (WS {url.replace('http', 'ws')}/v5/public/linear, "
              f"/v5/private)", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await exchange.stop()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass
    except OSError as err:   # the port is taken (or not ours to bind)
        parser.error(f"cannot listen on 127.0.0.1:{args.port}: {err.strerror or err}")


if __name__ == "__main__":
    main()
