"""Market-data recorder (Binance USD-M, Bybit linear) and Bybit public-archive downloader.

Writes the data contract of DESIGN.md §3: `<out>/<SYM>_<Venue>/Trade/<SYM><day>.csv` and
`<out>/<SYM>_<Venue>/Orderbook/<day>_<SYM>_ob<N>.data` (JSON lines in Bybit's schema; Binance lines add
`data.pu`), a snapshot line at every file start and after every resync, daily rotation on exchange
time, and a per-day integrity sidecar `<out>/<SYM>_<Venue>/integrity/<day>.json`.

Binance books follow the official USD-M procedure through `orderbook.BinanceSync`; Bybit books are
checked with `OrderBook.apply_bybit`. Only what was applied to a valid book is written, so every
order-book file can be replayed offline with the same sequence checks.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import gzip
import logging
import os
import random
import re
import shutil
import signal
import sys
import time
import zipfile
import zlib
from decimal import Decimal
from logging.handlers import RotatingFileHandler
from pathlib import Path
from typing import Any, Callable, Iterator

import aiohttp
import orjson
import requests
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from config import atomic_write_text
from orderbook import BinanceSync, OrderBook

log = logging.getLogger("data_collector")

BINANCE_WS = "wss://fstream.binance.com"
BINANCE_REST = "https://fapi.binance.com"
BYBIT_WS = "wss://stream.bybit.com/v5/public/linear"
BYBIT_TRADE_ARCHIVE = "https://public.bybit.com"
BYBIT_BOOK_ARCHIVE = "https://quote-saver.bycsi.com"
TRADE_HEADER = ("timestamp,symbol,side,size,price,tickDirection,trdMatchID,grossValue,homeNotional,"
                "foreignNotional,RPI\n").encode()
SNAPSHOT_LIMIT = 1000           # REST depth limit the official procedure asks for
BYBIT_DEPTH = 200               # orderbook.200: the deepest 100 ms linear stream
STREAMS_PER_CONNECTION = 200    # well under Binance's 1024-stream cap
ALL_LEVELS = 1 << 62            # top(ALL_LEVELS) = every level the book holds (it grows as needed)
SYMBOL_RE = re.compile(r"^[A-Z0-9]{2,30}$")
OB_ARCHIVE_DEPTH_CHANGE = "2025-08-21"   # Bybit linear archives switched ob500 -> ob200 on this day
COUNTERS = ("messages", "book_messages", "trade_messages", "applied", "stale", "gaps", "resyncs",
            "snapshots", "reconnects", "dropped", "trade_gaps", "backfilled_trades", "duplicate_trades")


# ------------------------------------------------------------------------------------------- settings
@dataclasses.dataclass
class CollectorSettings:
    """Everything a recording session needs; defaults are the production endpoints."""
    symbols: list[str]
    exchange: str = "binance"
    out: Path = Path("data")
    ws_url: str = ""
    rest_url: str = BINANCE_REST
    duration: float = 0.0                  # seconds; 0 = run until stopped
    gzip_closed: bool = False
    status_interval: float = 60.0
    flush_interval: float = 1.0
    max_connection_age: float = 23.5 * 3600.0
    stale_timeout: float = 30.0
    backoff_base: float = 1.0
    backoff_cap: float = 60.0
    queue_size: int = 100_000
    snapshot_spacing: float = 0.6          # seconds between REST calls: weight 20 each stays < 2400/min

    def __post_init__(self) -> None:
        self.symbols = [s.upper() for s in self.symbols]
        bad = [s for s in self.symbols if not SYMBOL_RE.match(s)]
        if not self.symbols or bad:
            raise ValueError(f"invalid symbol(s) {bad or self.symbols}: expected e.g. BTCUSDT")
        if self.exchange not in ("binance", "bybit"):
            raise ValueError(f"--exchange must be binance or bybit, got {self.exchange!r}")
        if not self.ws_url:
            self.ws_url = BINANCE_WS if self.exchange == "binance" else BYBIT_WS
        self.ws_url = self.ws_url.rstrip("/")
        self.rest_url = self.rest_url.rstrip("/")
        self.out = Path(self.out)

    @property
    def venue(self) -> str:
        """Folder suffix naming the data source."""
        return "Binance" if self.exchange == "binance" else "Bybit"


_DAY_MS = 86_400_000
_day_cache: list[Any] = [0, -1, ""]     # [first ms, last ms, name] of the most recent day seen


def utc_day(ms: int | float) -> str:
    """Exchange-time UTC date of a millisecond timestamp (the rotation key); cached per day."""
    if _day_cache[0] <= ms <= _day_cache[1]:
        return _day_cache[2]
    start = int(ms // _DAY_MS) * _DAY_MS
    name = dt.datetime.fromtimestamp(start / 1000.0, dt.timezone.utc).strftime("%Y-%m-%d")
    _day_cache[:] = [start, start + _DAY_MS - 1, name]
    return name


def backoff_delay(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff with jitter in [delay/2, delay] so many clients do not reconnect in step."""
    delay = min(cap, base * (2 ** min(attempt, 30)))
    return delay * random.uniform(0.5, 1.0)


# -------------------------------------------------------------------------------------------- files
class DailyFile:
    """An append-only file per exchange day: flush on demand, flush+fsync when closed."""

    def __init__(self, path_for: Callable[[str], Path], header: bytes = b""):
        self.path_for = path_for
        self.header = header
        self.day: str | None = None
        self.path: Path | None = None
        self.closed: list[Path] = []      # earlier days' files closed by rotation (to gzip)
        self._fh: Any = None

    def open_day(self, day: str) -> bool:
        """Switch to `day`'s file; True when a new file was opened (the caller then writes its head).

        Days only move forward: a record stamped just before midnight that arrives after the switch
        stays in the open file, so a closed (possibly gzipped) day is never reopened."""
        if self.day is not None and day <= self.day:
            return False
        closed = self.close()
        if closed is not None:
            self.closed.append(closed)
        path = self.path_for(day)
        path.parent.mkdir(parents=True, exist_ok=True)
        existing = path.stat().st_size if path.exists() else 0
        self._fh = open(path, "ab")
        if existing == 0:
            self._fh.write(self.header)
        elif not _ends_with_newline(path):
            # A torn last line (power loss) stays one bad line instead of swallowing the next record.
            log.warning("%s: last line is incomplete; it stays isolated and the loader will count it", path)
            self._fh.write(b"\n")
        self.day, self.path = day, path
        return True

    def write(self, data: bytes) -> None:
        """Append bytes to the open day's file."""
        self._fh.write(data)

    def flush(self) -> None:
        """Hand buffered lines to the OS so a crash loses at most one flush interval."""
        if self._fh is not None:
            self._fh.flush()

    def close(self) -> Path | None:
        """Flush, fsync and close; returns the closed path."""
        if self._fh is None:
            return None
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        closed, self._fh, self.day, self.path = self.path, None, None, None
        return closed


def _ends_with_newline(path: Path) -> bool:
    """Whether a non-empty file's last byte is a newline."""
    with open(path, "rb") as fh:
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) == b"\n"


def gzip_file(path: Path) -> Path:
    """Compress a closed day's file to `<path>.gz` atomically (temp, fsync, rename), then remove it."""
    target = path.with_name(path.name + ".gz")
    tmp = path.with_name(path.name + ".gz.part")
    with open(path, "rb") as src, open(tmp, "wb") as raw:
        with gzip.GzipFile(filename=path.name, mode="wb", fileobj=raw, compresslevel=6) as gz:
            shutil.copyfileobj(src, gz, 1 << 20)
        raw.flush()
        os.fsync(raw.fileno())
    os.replace(tmp, target)
    path.unlink()
    return target


# ---------------------------------------------------------------------------------------- integrity
class Integrity:
    """Per-day counters of one symbol, persisted as `<base>/integrity/<day>.json` (sessions accumulate)."""

    def __init__(self, base: Path, symbol: str, venue: str):
        self.dir = base / "integrity"
        self.symbol, self.venue = symbol, venue
        self.days: dict[str, dict[str, Any]] = {}
        self.dirty: set[str] = set()

    def _day(self, day: str) -> dict[str, Any]:
        rec = self.days.get(day)
        if rec is None:
            path = self.dir / f"{day}.json"
            rec = {"symbol": self.symbol, "venue": self.venue, "day": day, **{c: 0 for c in COUNTERS},
                   "sessions": 0}
            if path.exists():
                try:
                    rec.update(orjson.loads(path.read_bytes()))
                except orjson.JSONDecodeError:
                    log.error("%s is not valid JSON; starting its counters again", path)
            rec["sessions"] += 1
            self.days[day] = rec
        return rec

    def bump(self, day: str, counter: str, n: int = 1) -> None:
        """Add n to a counter of an exchange day."""
        self._day(day)[counter] += n
        self.dirty.add(day)

    def total(self, counter: str) -> int:
        """Counter summed over the days seen by this session."""
        return sum(rec[counter] for rec in self.days.values())

    def save(self) -> None:
        """Write changed days atomically."""
        if not self.dirty:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        for day in sorted(self.dirty):
            atomic_write_text(self.dir / f"{day}.json", orjson.dumps(
                self.days[day], option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode())
        self.dirty.clear()


# ------------------------------------------------------------------------------------ symbol writer
def _fmt(x: float) -> str:
    """Shortest string that round-trips a float price or size."""
    return repr(float(x))


def _trade_row(ts_ms: int, symbol: str, side: str, size: str, price: str, tick: str, match_id: str,
               rpi: int) -> bytes:
    """One Trade CSV row in Bybit's archive columns (exact decimal arithmetic for the notionals)."""
    notional = Decimal(price) * Decimal(size)
    gross = notional * 100_000_000
    gross_s = str(gross.quantize(Decimal(1))) if gross == gross.to_integral_value() else str(gross.normalize())
    ts = f"{ts_ms // 1000}.{ts_ms % 1000:03d}"
    return (f"{ts},{symbol},{side},{size},{price},{tick},{match_id},{gross_s},{size},"
            f"{notional.normalize():f},{rpi}\n").encode()


class SymbolRecorder:
    """One symbol's files, book and counters; venue-specific handlers feed it applied messages."""

    def __init__(self, settings: CollectorSettings, symbol: str, levels: int):
        self.settings, self.symbol, self.levels = settings, symbol, levels
        self.base = settings.out / f"{symbol}_{settings.venue}"
        self.topic = f"orderbook.{levels}.{symbol}"
        self.book_file = DailyFile(lambda d: self.base / "Orderbook" / f"{d}_{symbol}_ob{levels}.data")
        self.trade_file = DailyFile(lambda d: self.base / "Trade" / f"{symbol}{d}.csv", TRADE_HEADER)
        self.integrity = Integrity(self.base, symbol, settings.venue)
        self.book = OrderBook()
        self.last_event_ms = 0
        self.last_price: Decimal | None = None
        self.last_tick = "ZeroPlusTick"

    # -- book lines
    def write_book(self, day: str, line: bytes, snapshot: bool, u: int, seq: int, ts: int, cts: int) -> None:
        """Write an applied line; a new day's file starts with a snapshot of the book after this message."""
        self.last_event_ms = max(self.last_event_ms, ts)
        if self.book_file.open_day(day) and not snapshot:
            line = self._snapshot_line(u, seq, ts, cts)
        self.book_file.write(line)

    def _snapshot_line(self, u: int, seq: int, ts: int, cts: int) -> bytes:
        """The current book as a snapshot line (it already includes the message that opened the day)."""
        bp, bq, ap, aq = self.book.top(ALL_LEVELS)
        bids = [[_fmt(p), _fmt(q)] for p, q in zip(bp, bq) if q > 0]
        asks = [[_fmt(p), _fmt(q)] for p, q in zip(ap, aq) if q > 0]
        return orjson.dumps({"topic": self.topic, "type": "snapshot", "ts": ts,
                             "data": {"s": self.symbol, "b": bids, "a": asks, "u": u, "seq": seq},
                             "cts": cts}) + b"\n"

    # -- trades
    def write_trade(self, ts_ms: int, side: str, size: str, price: str, match_id: str, rpi: int,
                    tick: str) -> None:
        """Append one trade row to the day's CSV."""
        day = utc_day(ts_ms)
        self.trade_file.open_day(day)
        self.trade_file.write(_trade_row(ts_ms, self.symbol, side, size, price, tick, match_id, rpi))
        self.integrity.bump(day, "trade_messages")
        self.integrity.bump(day, "messages")

    def take_closed(self) -> list[Path]:
        """Files of finished days closed since the last call."""
        out = self.book_file.closed + self.trade_file.closed
        self.book_file.closed, self.trade_file.closed = [], []
        return out

    def flush(self) -> None:
        """Flush both files to the OS."""
        self.book_file.flush()
        self.trade_file.flush()

    def close(self) -> None:
        """Flush, fsync and close both files and save the sidecars."""
        self.book_file.close()
        self.trade_file.close()
        self.integrity.save()

    def status(self) -> str:
        """One status-line fragment for this symbol."""
        bid, ask = (self.book.best_bid(), self.book.best_ask()) if self.book.valid else (float("nan"),) * 2
        i = self.integrity
        return (f"{self.symbol}: msgs={i.total('messages')} trades={i.total('trade_messages')} "
                f"gaps={i.total('gaps')} resyncs={i.total('resyncs')} reconnects={i.total('reconnects')} "
                f"dropped={i.total('dropped')} book={'ok' if self.book.valid else 'SYNCING'} "
                f"bid={bid} ask={ask}")


# ------------------------------------------------------------------------------------------ Binance
class BinanceSymbol(SymbolRecorder):
    """Binance USD-M: diff-depth through BinanceSync, aggTrade rows with duplicate and gap checks."""

    def __init__(self, settings: CollectorSettings, symbol: str, rest: "BinanceRest"):
        super().__init__(settings, symbol, SNAPSHOT_LIMIT)
        self.rest = rest
        self.sync = BinanceSync(self.book)
        self.snapshot_task: asyncio.Task | None = None
        self.snapshots_applied = 0
        self.last_agg_id: int | None = None
        self.missing: list[tuple[int, int]] = []      # aggTrade id ranges still to fetch
        self.held: list[dict] = []                    # live trades waiting for a backfill to finish
        self.backfill: asyncio.Task | None = None

    def reset(self) -> None:
        """Forget the book after a (re)connect: buffer the new stream and take a fresh snapshot."""
        if self.snapshot_task is not None:
            self.snapshot_task.cancel()
            self.snapshot_task = None
        self.book = OrderBook()
        self.sync = BinanceSync(self.book)

    def on_depth(self, ev: dict) -> None:
        """Feed one depthUpdate through the sync; write it if applied, resync on a gap."""
        day = utc_day(ev["E"])
        self.integrity.bump(day, "messages")
        self.integrity.bump(day, "book_messages")
        result = self.sync.on_diff(ev)
        if result == "applied":
            self.integrity.bump(day, "applied")
            self._write_diff(day, ev)
        elif result == "stale":
            self.integrity.bump(day, "stale")
        elif result == "gap":
            self.integrity.bump(day, "gaps")
            log.warning("%s: depth gap at U=%s u=%s pu=%s; book invalid until a new snapshot",
                        self.symbol, ev.get("U"), ev.get("u"), ev.get("pu"))
        if self.sync.needs_snapshot and self.snapshot_task is None:
            self.snapshot_task = asyncio.get_running_loop().create_task(self._take_snapshot())

    def _write_diff(self, day: str, ev: dict) -> None:
        line = orjson.dumps({"topic": self.topic, "type": "delta", "ts": ev["E"],
                             "data": {"s": self.symbol, "b": ev["b"], "a": ev["a"], "u": ev["u"],
                                      "seq": ev["U"], "pu": ev["pu"]},
                             "cts": ev.get("T", ev["E"])}) + b"\n"
        self.write_book(day, line, False, ev["u"], ev["U"], ev["E"], ev.get("T", ev["E"]))

    async def _take_snapshot(self) -> None:
        """REST snapshot → BinanceSync; repeat (with backoff) until the sync accepts one."""
        attempt = 0
        try:
            while True:
                try:
                    snap = await self.rest.depth(self.symbol, SNAPSHOT_LIMIT)
                except (aiohttp.ClientError, asyncio.TimeoutError, RestError) as exc:
                    delay = backoff_delay(attempt, self.settings.backoff_base, self.settings.backoff_cap)
                    log.warning("%s: snapshot request failed (%s); retrying in %.1fs", self.symbol, exc, delay)
                    attempt += 1
                    await asyncio.sleep(delay)
                    continue
                try:
                    applied = self.sync.on_snapshot(snap)
                except (KeyError, TypeError, ValueError) as exc:
                    attempt += 1
                    log.error("%s: unusable depth snapshot (%s: %s); taking another", self.symbol,
                              type(exc).__name__, exc)
                    await asyncio.sleep(backoff_delay(attempt, self.settings.backoff_base, self.settings.backoff_cap))
                    continue
                if not self.sync.needs_snapshot:
                    self._write_snapshot(snap, applied)
                    return
                attempt += 1
                log.warning("%s: snapshot lastUpdateId=%s does not join the buffered stream; taking another",
                            self.symbol, snap.get("lastUpdateId"))
                await asyncio.sleep(backoff_delay(attempt, self.settings.backoff_base, self.settings.backoff_cap))
        finally:
            if asyncio.current_task() is self.snapshot_task:
                self.snapshot_task = None

    def _write_snapshot(self, snap: dict, applied: list[dict]) -> None:
        """Write the REST snapshot line, then the buffered diffs the sync applied on top of it."""
        lid = int(snap["lastUpdateId"])
        cts = int(snap.get("T") or snap.get("E") or time.time() * 1000)
        ts = max(cts, self.last_event_ms)   # keep file time monotonic: a diff's push time E can exceed T
        day = utc_day(ts)
        self.integrity.bump(day, "snapshots")
        if self.snapshots_applied:
            self.integrity.bump(day, "resyncs")
        self.snapshots_applied += 1
        line = orjson.dumps({"topic": self.topic, "type": "snapshot", "ts": ts,
                             "data": {"s": self.symbol, "b": snap["bids"], "a": snap["asks"],
                                      "u": lid, "seq": lid}, "cts": cts}) + b"\n"
        self.write_book(day, line, True, lid, lid, ts, cts)
        for ev in applied:
            d = utc_day(ev["E"])
            self.integrity.bump(d, "applied")
            self._write_diff(d, ev)
        log.info("%s: book synced at lastUpdateId=%d (%d buffered diffs applied)", self.symbol, lid, len(applied))

    def on_agg_trade(self, ev: dict) -> None:
        """Write one aggTrade; ids are consecutive per symbol, so repeats are dropped and holes backfilled.

        While a backfill runs, live trades are held and then written merged in id order, so the CSV stays
        in exchange order and tick directions stay exact."""
        agg_id = int(ev["a"])
        if self.last_agg_id is not None:
            if agg_id <= self.last_agg_id:
                self.integrity.bump(utc_day(ev["T"]), "duplicate_trades")
                return
            if agg_id > self.last_agg_id + 1:
                missing = agg_id - self.last_agg_id - 1
                self.integrity.bump(utc_day(ev["T"]), "trade_gaps", missing)
                log.warning("%s: %d aggTrades missing before id %d; fetching them over REST",
                            self.symbol, missing, agg_id)
                self.missing.append((self.last_agg_id + 1, agg_id - 1))
                if self.backfill is None:
                    self.backfill = asyncio.get_running_loop().create_task(self._backfill())
        self.last_agg_id = agg_id
        if self.backfill is not None:
            self.held.append(ev)
        else:
            self._emit(ev)

    def _emit(self, ev: dict) -> None:
        """Write one aggTrade row (trades must arrive here in id order)."""
        px = Decimal(ev["p"])
        self.last_tick = tick_direction(self.last_price, self.last_tick, px)
        self.last_price = px
        nq = ev.get("nq")
        rpi = int(nq is not None and Decimal(nq) != Decimal(ev["q"]))
        self.write_trade(int(ev["T"]), "Sell" if ev["m"] else "Buy", ev["q"], ev["p"], str(ev["a"]), rpi,
                         self.last_tick)

    async def _backfill(self) -> None:
        """Fetch every missing id range, then write fetched and held trades merged in id order."""
        fetched: list[dict] = []
        try:
            while self.missing:
                first, last = self.missing.pop(0)
                fetched += await self._fetch_trades(first, last)
        finally:
            for ev in sorted(fetched + self.held, key=lambda e: int(e["a"])):
                self._emit(ev)
            for ev in fetched:
                self.integrity.bump(utc_day(int(ev["T"])), "backfilled_trades")
            self.held, self.backfill = [], None

    async def _fetch_trades(self, first: int, last: int) -> list[dict]:
        """aggTrades first..last (ids inclusive) over REST, retried with backoff; what cannot be had is logged."""
        rows_out: list[dict] = []
        next_id, attempt = first, 0
        while next_id <= last:
            try:
                rows = await self.rest.agg_trades(self.symbol, next_id, min(1000, last - next_id + 1))
            except (aiohttp.ClientError, asyncio.TimeoutError, RestError) as exc:
                attempt += 1
                if attempt > 6:
                    log.error("%s: aggTrades %d..%d could not be fetched (%s); they are missing", self.symbol,
                              next_id, last, exc)
                    break
                await asyncio.sleep(backoff_delay(attempt, self.settings.backoff_base, self.settings.backoff_cap))
                continue
            rows = [r for r in rows if next_id <= int(r["a"]) <= last]
            if not rows:
                log.error("%s: REST has no aggTrades from id %d; %d trades are missing", self.symbol, next_id,
                          last - next_id + 1)
                break
            rows_out += rows
            next_id = int(rows[-1]["a"]) + 1
        return rows_out


def tick_direction(prev: Decimal | None, prev_tick: str, px: Decimal) -> str:
    """Bybit's tickDirection of a trade relative to the previous trade (ZeroPlusTick when unknown)."""
    if prev is None or px == prev:
        return "ZeroMinusTick" if prev is not None and prev_tick in ("MinusTick", "ZeroMinusTick") else "ZeroPlusTick"
    return "PlusTick" if px > prev else "MinusTick"


class RestError(RuntimeError):
    """A REST call answered with a non-200 status."""


class BinanceRest:
    """Throttled REST snapshots (weight 20 each); honours 429/418 Retry-After."""

    def __init__(self, base: str, spacing: float):
        self.base, self.spacing = base, spacing
        self.session: aiohttp.ClientSession | None = None
        self._lock = asyncio.Lock()
        self._next = 0.0

    async def depth(self, symbol: str, limit: int) -> dict:
        """GET /fapi/v1/depth (weight 20 at limit 1000)."""
        return await self._get("/fapi/v1/depth", {"symbol": symbol, "limit": str(limit)})

    async def agg_trades(self, symbol: str, from_id: int, limit: int) -> list[dict]:
        """GET /fapi/v1/aggTrades from an aggregate id (weight 20)."""
        return await self._get("/fapi/v1/aggTrades", {"symbol": symbol, "fromId": str(from_id),
                                                      "limit": str(limit)})

    async def _get(self, path: str, params: dict[str, str]) -> Any:
        """One throttled GET; 429/418 push every later request past Retry-After."""
        if self.session is None:
            self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15))
        async with self._lock:
            wait = self._next - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            self._next = time.monotonic() + self.spacing
            url = f"{self.base}{path}"
            async with self.session.get(url, params=params) as resp:
                body = await resp.read()
                if resp.status in (418, 429):
                    retry = float(resp.headers.get("Retry-After", "60"))
                    self._next = time.monotonic() + retry
                    raise RestError(f"HTTP {resp.status} (rate limit) from {url}; backing off {retry:.0f}s")
                if resp.status != 200:
                    raise RestError(f"HTTP {resp.status} from {url}: {body[:200]!r}")
                return orjson.loads(body)

    async def close(self) -> None:
        """Close the HTTP session."""
        if self.session is not None:
            await self.session.close()


# -------------------------------------------------------------------------------------------- Bybit
class BybitSymbol(SymbolRecorder):
    """Bybit linear: orderbook.N messages checked with OrderBook.apply_bybit, publicTrade rows.

    Also the live engine's recorder: `BybitSymbol(CollectorSettings([sym], "bybit", out), sym, depth)`
    writes the same files from messages it already received (no connection, no CLI)."""

    def __init__(self, settings: CollectorSettings, symbol: str, levels: int = BYBIT_DEPTH):
        super().__init__(settings, symbol, levels)
        self.had_snapshot = False
        self.waiting_snapshot = True

    def reset(self) -> None:
        """After a (re)connect the venue sends a fresh snapshot; ignore deltas until it arrives."""
        self.book = OrderBook()
        self.waiting_snapshot = True

    def on_book(self, msg: dict, raw: bytes) -> bool:
        """Apply and write one book message; False when a gap needs a fresh snapshot."""
        ts = int(msg["ts"])
        day = utc_day(ts)
        data = msg["data"]
        self.integrity.bump(day, "messages")
        self.integrity.bump(day, "book_messages")
        is_snapshot = msg.get("type") == "snapshot" or int(data.get("u", 0)) == 1
        if self.waiting_snapshot and not is_snapshot:
            self.integrity.bump(day, "stale")
            return True
        if not self.book.apply_bybit(msg):
            self.integrity.bump(day, "gaps")
            self.waiting_snapshot = True
            log.warning("%s: book sequence gap at u=%s; resubscribing for a snapshot", self.symbol, data.get("u"))
            return False
        if is_snapshot:
            self.integrity.bump(day, "snapshots")
            if self.had_snapshot:
                self.integrity.bump(day, "resyncs")
            self.had_snapshot, self.waiting_snapshot = True, False
        self.integrity.bump(day, "applied")
        line = raw.rstrip(b"\n") + b"\n"
        self.write_book(day, line, is_snapshot, int(data["u"]), int(data.get("seq", 0)), ts,
                        int(msg.get("cts", ts)))
        return True

    def on_trades(self, msg: dict) -> None:
        """Write each publicTrade entry."""
        for t in msg["data"]:
            px = Decimal(t["p"])
            self.last_tick = t.get("L") or tick_direction(self.last_price, self.last_tick, px)
            self.last_price = px
            rpi = t.get("RPI", 0)
            self.write_trade(int(t["T"]), t["S"], t["v"], t["p"], t["i"], int(rpi in (True, 1, "1", "true")),
                             self.last_tick)


# ------------------------------------------------------------------------------------------ recorder
class Recorder:
    """Connections, reconnects, processing, status, flushing and clean shutdown for one exchange."""

    def __init__(self, settings: CollectorSettings):
        self.s = settings
        self.stop = asyncio.Event()
        self.rest = BinanceRest(settings.rest_url, settings.snapshot_spacing)
        if settings.exchange == "binance":
            self.symbols: dict[str, SymbolRecorder] = {
                sym: BinanceSymbol(settings, sym, self.rest) for sym in settings.symbols}
        else:
            self.symbols = {sym: BybitSymbol(settings, sym) for sym in settings.symbols}
        self.gzip_jobs: list[asyncio.Future] = []
        self.frames = 0

    # -- connections
    def _binance_routes(self) -> list[tuple[str, str, list[str]]]:
        """(route, url, symbols) per connection: depth on /public, aggTrade on /market, ≤200 streams each."""
        routes = []
        syms = list(self.symbols)
        for i in range(0, len(syms), STREAMS_PER_CONNECTION):
            chunk = syms[i:i + STREAMS_PER_CONNECTION]
            depth = "/".join(f"{s.lower()}@depth@100ms" for s in chunk)
            trades = "/".join(f"{s.lower()}@aggTrade" for s in chunk)
            routes.append(("public", f"{self.s.ws_url}/public/stream?streams={depth}", chunk))
            routes.append(("market", f"{self.s.ws_url}/market/stream?streams={trades}", chunk))
        return routes

    async def _connection(self, route: str, url: str, symbols: list[str]) -> None:
        """Keep one connection alive: backoff with jitter on failure, proactive reconnect before 24 h."""
        attempt, connected_before = 0, False
        while not self.stop.is_set():
            queue: asyncio.Queue = asyncio.Queue(self.s.queue_size)
            try:
                async with connect(url, ping_interval=60, ping_timeout=30, max_size=None, max_queue=4096,
                                   open_timeout=15, close_timeout=2) as ws:
                    for sym in symbols:
                        rec = self.symbols[sym]
                        if route in ("public", "bybit"):
                            rec.reset()
                        if connected_before:
                            rec.integrity.bump(utc_day(time.time() * 1000), "reconnects")
                    connected_before = True
                    log.info("connected %s (%d symbols)", url.split("?")[0], len(symbols))
                    helpers = [asyncio.create_task(self._process(queue, route, ws))]
                    if route == "bybit":
                        await self._bybit_subscribe(ws, symbols)
                        helpers.append(asyncio.create_task(self._bybit_ping(ws)))
                    try:
                        received, aged = await self._receive(ws, queue, route, symbols)
                    finally:
                        await queue.put(None)
                        await helpers[0]
                        for task in helpers[1:]:
                            task.cancel()
                    if received:
                        attempt = 0
                    if aged:
                        continue        # planned replacement: reconnect at once
            except (OSError, asyncio.TimeoutError, ConnectionClosed, InvalidHandshake, InvalidURI) as exc:
                log.warning("%s connection failed: %s", route, exc)
            if self.stop.is_set():
                break
            delay = backoff_delay(attempt, self.s.backoff_base, self.s.backoff_cap)
            attempt += 1
            log.info("reconnecting %s in %.2fs", route, delay)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stop.wait(), delay)

    async def _receive(self, ws: ClientConnection, queue: asyncio.Queue, route: str,
                       symbols: list[str]) -> tuple[int, bool]:
        """Move frames to the processing queue until stop, a stale feed, a close or the age limit;
        returns (frames received, whether the age limit ended the connection)."""
        deadline = time.monotonic() + self.s.max_connection_age
        stale = self.s.stale_timeout if route != "market" else None
        received = 0
        stopper = asyncio.ensure_future(self.stop.wait())
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    log.info("%s connection is %.1fh old: reconnecting before the 24 h cut",
                             route, self.s.max_connection_age / 3600)
                    return received, True
                timeout = min(left, stale) if stale else left
                recv = asyncio.ensure_future(ws.recv())
                done, _ = await asyncio.wait({recv, stopper}, timeout=timeout,
                                             return_when=asyncio.FIRST_COMPLETED)
                if stopper in done:
                    recv.cancel()
                    await ws.close()
                    return received, False
                if recv not in done:
                    recv.cancel()
                    if time.monotonic() < deadline:
                        log.warning("%s: no data for %.0fs; reconnecting", route, timeout)
                        return received, False
                    continue
                raw = recv.result()
                received += 1
                if queue.full():
                    self._count_dropped(raw, symbols)
                else:
                    queue.put_nowait(raw)
        except ConnectionClosed as exc:
            log.warning("%s connection closed: %s", route, exc)
            return received, False
        finally:
            stopper.cancel()

    def _count_dropped(self, raw: str | bytes, symbols: list[str]) -> None:
        """Backpressure: a frame the processor could not take is counted for its symbol (gaps then resync)."""
        text = raw if isinstance(raw, str) else raw.decode("utf-8", "replace")
        head = text[:120].upper()
        for sym in symbols:
            if sym in head:
                self.symbols[sym].integrity.bump(utc_day(time.time() * 1000), "dropped")
                return
        self.symbols[symbols[0]].integrity.bump(utc_day(time.time() * 1000), "dropped")

    async def _process(self, queue: asyncio.Queue, route: str, ws: ClientConnection) -> None:
        """Parse and dispatch frames in arrival order; a bad frame is logged and skipped."""
        while True:
            raw = await queue.get()
            if raw is None:
                return
            self.frames += 1
            try:
                msg = orjson.loads(raw)
                if route == "bybit":
                    await self._dispatch_bybit(msg, raw, ws)
                else:
                    self._dispatch_binance(msg)
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                log.error("bad %s frame skipped (%s): %.200r", route, exc, raw)
            except Exception:   # one unexpected frame must not stop the recording; it is logged in full
                log.exception("%s frame could not be processed and was skipped: %.200r", route, raw)
            if self.frames % 512 == 0:
                await asyncio.sleep(0)

    def _dispatch_binance(self, msg: dict) -> None:
        data = msg.get("data", msg)
        kind = data.get("e")
        rec = self.symbols.get(str(data.get("s", "")).upper())
        if rec is None:
            return
        if kind == "depthUpdate":
            rec.on_depth(data)
        elif kind == "aggTrade":
            rec.on_agg_trade(data)

    async def _bybit_subscribe(self, ws: ClientConnection, symbols: list[str]) -> None:
        """Subscribe in frames of at most 10 topics."""
        topics = [t for s in symbols for t in (f"orderbook.{BYBIT_DEPTH}.{s}", f"publicTrade.{s}")]
        for i in range(0, len(topics), 10):
            await ws.send(orjson.dumps({"op": "subscribe", "args": topics[i:i + 10]}).decode())

    async def _dispatch_bybit(self, msg: dict, raw: str | bytes, ws: ClientConnection) -> None:
        topic = msg.get("topic")
        if topic is None:
            if msg.get("success") is False:
                log.error("bybit request failed: %s", msg)
            return
        rec = self.symbols.get(topic.rsplit(".", 1)[-1])
        if rec is None:
            return
        if topic.startswith("orderbook."):
            data = raw if isinstance(raw, bytes) else raw.encode()
            if not rec.on_book(msg, data):
                for op in ("unsubscribe", "subscribe"):
                    await ws.send(orjson.dumps({"op": op, "args": [topic]}).decode())
        elif topic.startswith("publicTrade."):
            rec.on_trades(msg)

    # -- housekeeping
    @staticmethod
    async def _bybit_ping(ws: ClientConnection) -> None:
        """Bybit cuts connections without application pings: send {"op":"ping"} every 20 s."""
        with contextlib.suppress(ConnectionClosed):
            while True:
                await asyncio.sleep(20)
                await ws.send('{"op":"ping"}')

    async def _housekeeping(self) -> None:
        """Flush every flush_interval; status line and sidecars every status_interval; gzip closed days."""
        next_status = time.monotonic() + self.s.status_interval
        while not self.stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stop.wait(), self.s.flush_interval)
            for rec in self.symbols.values():
                rec.flush()
                self._gzip_closed(rec)
            if time.monotonic() >= next_status:
                next_status = time.monotonic() + self.s.status_interval
                log.info("status frames=%d | %s", self.frames,
                         " | ".join(rec.status() for rec in self.symbols.values()))
                for rec in self.symbols.values():
                    rec.integrity.save()

    def _gzip_closed(self, rec: SymbolRecorder) -> None:
        """Compress closed days off the event loop when --gzip is on."""
        closed = rec.take_closed()
        if not self.s.gzip_closed:
            return
        loop = asyncio.get_running_loop()
        for path in closed:
            if path.exists():
                self.gzip_jobs.append(loop.run_in_executor(None, gzip_file, path))

    async def run(self) -> None:
        """Record until stopped (signal, --duration), then close everything cleanly."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self._request_stop, sig)
        if self.s.exchange == "binance":
            routes = self._binance_routes()
        else:
            routes = [("bybit", self.s.ws_url, list(self.symbols))]
        warm = OrderBook()      # compile the book kernels before any frame waits on them
        warm.apply_bybit({"type": "snapshot", "ts": 1, "data": {"b": [["1", "1"]], "a": [["2", "1"]], "u": 1}})
        tasks = [asyncio.create_task(self._connection(r, u, syms)) for r, u, syms in routes]
        tasks.append(asyncio.create_task(self._housekeeping()))
        if self.s.duration > 0:
            loop.call_later(self.s.duration, self._request_stop, None)
        log.info("recording %s from %s into %s", ",".join(self.symbols), self.s.exchange, self.s.out)
        try:
            await self.stop.wait()
            await asyncio.gather(*tasks)
        finally:
            pending = [t for t in (getattr(rec, "backfill", None) for rec in self.symbols.values()) if t]
            if pending:
                log.info("waiting up to 15s for %d trade backfills", len(pending))
                await asyncio.wait(pending, timeout=15)
                for task in pending:        # a cancelled backfill still writes the trades it holds
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
            for rec in self.symbols.values():
                task = getattr(rec, "snapshot_task", None)
                if task is not None:
                    task.cancel()
                rec.close()
                self._gzip_closed(rec)
            await self.rest.close()
            if self.gzip_jobs:
                await asyncio.gather(*self.gzip_jobs)
            log.info("stopped cleanly | %s", " | ".join(rec.status() for rec in self.symbols.values()))

    def _request_stop(self, sig: signal.Signals | None) -> None:
        log.info("stopping (%s)", signal.Signals(sig).name if sig else "duration reached")
        self.stop.set()


def record(settings: CollectorSettings) -> None:
    """Run a recording session to completion."""
    asyncio.run(Recorder(settings).run())


# ---------------------------------------------------------------------------------------- downloader
class DownloadError(RuntimeError):
    """A file could not be fetched or failed its integrity check; the message names URL and reason."""


class ArchiveMissing(DownloadError):
    """The archive has no file for that day (HTTP 404)."""


def _days(start: str, end: str) -> Iterator[str]:
    """Every UTC day from start to end inclusive."""
    try:
        d0, d1 = dt.date.fromisoformat(start), dt.date.fromisoformat(end)
    except ValueError as exc:
        raise DownloadError(f"--start/--end must be YYYY-MM-DD: {exc}") from None
    if d1 < d0:
        raise DownloadError(f"--end {end} is before --start {start}")
    while d0 <= d1:
        yield d0.isoformat()
        d0 += dt.timedelta(days=1)


def _check_gzip(path: Path) -> None:
    """Read a gzip file to the end so its CRC and length trailer are verified."""
    try:
        with gzip.open(path, "rb") as fh:
            while fh.read(1 << 20):
                pass
    except (OSError, EOFError, zlib.error) as exc:
        raise DownloadError(f"{path.name}: corrupt gzip ({exc})") from None


def _check_zip(path: Path) -> None:
    """Verify every member's CRC."""
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise DownloadError(f"{path.name}: corrupt zip ({exc})") from None
    if bad is not None:
        raise DownloadError(f"{path.name}: member {bad} fails its CRC check")


def fetch_file(session: requests.Session, url: str, dest: Path, verify: Callable[[Path], None],
               retries: int = 4, backoff: float = 1.0) -> str:
    """Download url to dest via `<dest>.part`, resuming with HTTP Range; size and integrity checked."""
    if dest.exists():
        return "exists"
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    last_error = ""
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * (2 ** (attempt - 1)) * random.uniform(0.5, 1.0))
        have = part.stat().st_size if part.exists() else 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        try:
            with session.get(url, headers=headers, stream=True, timeout=(10, 60)) as resp:
                if resp.status_code == 404:
                    raise ArchiveMissing(f"not in the archive (HTTP 404): {url}")
                if resp.status_code == 416 and have:
                    total = _content_range_total(resp.headers.get("Content-Range", ""))
                    if total != have:
                        part.unlink()
                        last_error = f"stale partial file ({have} bytes, server has {total})"
                        continue
                elif resp.status_code in (200, 206):
                    if resp.status_code == 206:
                        start, total = _content_range(resp.headers.get("Content-Range", ""))
                        if start != have:
                            raise DownloadError(f"{url}: server resumed at byte {start}, expected {have}")
                        mode = "ab"
                    else:
                        total = int(resp.headers["Content-Length"]) if "Content-Length" in resp.headers else None
                        mode = "wb"
                    with open(part, mode) as fh:
                        for chunk in resp.iter_content(1 << 16):
                            fh.write(chunk)
                        fh.flush()
                        os.fsync(fh.fileno())
                else:
                    raise DownloadError(f"HTTP {resp.status_code} for {url}")
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
            last_error = f"interrupted after {part.stat().st_size if part.exists() else 0} bytes ({exc})"
            log.warning("%s: %s; will resume", url, last_error)
            continue
        size = part.stat().st_size
        if total is not None and size != total:
            last_error = f"size {size} != expected {total}"
            log.warning("%s: %s; will resume", url, last_error)
            continue
        try:
            verify(part)
        except DownloadError:
            part.unlink()
            raise
        os.replace(part, dest)
        return "downloaded"
    raise DownloadError(f"{url}: gave up after {retries + 1} attempts: {last_error}")


def _content_range(header: str) -> tuple[int, int | None]:
    """(first byte, total) from 'bytes a-b/N'."""
    m = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", header.strip())
    if not m:
        raise DownloadError(f"unparseable Content-Range {header!r}")
    return int(m.group(1)), None if m.group(2) == "*" else int(m.group(2))


def _content_range_total(header: str) -> int | None:
    """N from 'bytes */N'."""
    m = re.search(r"/(\d+)$", header.strip())
    return int(m.group(1)) if m else None


def _extract_book(zip_path: Path, dest: Path, compress: bool) -> Path:
    """Extract the archive's single .data member to dest (optionally gzipped), atomically."""
    with zipfile.ZipFile(zip_path) as zf:
        members = [n for n in zf.namelist() if n.endswith(".data")]
        if len(members) != 1:
            raise DownloadError(f"{zip_path.name}: expected one .data member, found {zf.namelist()}")
        target = dest.with_name(dest.name + ".gz") if compress else dest
        tmp = target.with_name(target.name + ".part")
        with zf.open(members[0]) as src, open(tmp, "wb") as raw:
            if compress:
                with gzip.GzipFile(filename=dest.name, mode="wb", fileobj=raw) as gz:
                    shutil.copyfileobj(src, gz, 1 << 20)
            else:
                shutil.copyfileobj(src, raw, 1 << 20)
            raw.flush()
            os.fsync(raw.fileno())
    os.replace(tmp, target)
    return target


@dataclasses.dataclass
class DownloadReport:
    """What a download run did, per file."""
    downloaded: list[str] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)
    missing: list[str] = dataclasses.field(default_factory=list)
    failed: list[str] = dataclasses.field(default_factory=list)


def download(symbols: list[str], start: str, end: str, out: Path = Path("data"),
             archive_url: str = BYBIT_TRADE_ARCHIVE, book_archive_url: str = BYBIT_BOOK_ARCHIVE,
             trades: bool = True, books: bool = True, book_depth: int = 0, compress_books: bool = False,
             retries: int = 4, backoff: float = 1.0) -> DownloadReport:
    """Fetch Bybit linear daily trade and order-book archives into the data-contract layout."""
    report = DownloadReport()
    days = list(_days(start, end))
    with requests.Session() as session:
        for symbol in [s.upper() for s in symbols]:
            if not SYMBOL_RE.match(symbol):
                raise DownloadError(f"invalid symbol {symbol!r}")
            base = Path(out) / f"{symbol}_Bybit"
            for day in days:
                jobs = []
                if trades:
                    jobs.append(("trades", f"{archive_url.rstrip('/')}/trading/{symbol}/{symbol}{day}.csv.gz",
                                 base / "Trade" / f"{symbol}{day}.csv.gz", _check_gzip, None))
                if books:
                    depth = book_depth or (200 if day >= OB_ARCHIVE_DEPTH_CHANGE else 500)
                    name = f"{day}_{symbol}_ob{depth}.data"
                    jobs.append(("orderbook",
                                 f"{book_archive_url.rstrip('/')}/orderbook/linear/{symbol}/{name}.zip",
                                 base / "Orderbook" / ".download" / f"{name}.zip", _check_zip,
                                 base / "Orderbook" / name))
                for kind, url, dest, verify, extract_to in jobs:
                    label = f"{symbol} {day} {kind}"
                    if extract_to is not None and (extract_to.exists() or
                                                   extract_to.with_name(extract_to.name + ".gz").exists()):
                        report.skipped.append(label)
                        continue
                    try:
                        status = fetch_file(session, url, dest, verify, retries, backoff)
                        if extract_to is not None:
                            _extract_book(dest, extract_to, compress_books)
                            dest.unlink()
                    except ArchiveMissing as exc:
                        log.warning("%s: %s", label, exc)
                        report.missing.append(label)
                        continue
                    except DownloadError as exc:
                        log.error("%s: %s", label, exc)
                        report.failed.append(f"{label}: {exc}")
                        continue
                    (report.skipped if status == "exists" else report.downloaded).append(label)
                    log.info("%s: %s", label, status)
    return report


# ------------------------------------------------------------------------------------------------ CLI
def _setup_logging(log_file: str) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(RotatingFileHandler(log_file, maxBytes=20_000_000, backupCount=5))
    logging.basicConfig(level=logging.INFO, handlers=handlers,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _record_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="data_collector.py", description="Record trades and order books "
                                "(Binance USD-M or Bybit linear) into the data contract layout. "
                                "Use 'data_collector.py download ...' for Bybit archives.")
    p.add_argument("symbols", nargs="+", help="symbols, e.g. BTCUSDT ETHUSDT (one connection per route)")
    p.add_argument("--exchange", choices=["binance", "bybit"], default="binance")
    p.add_argument("--out", default="data", help="data folder (default data)")
    p.add_argument("--ws-url", default="", help=f"stream base (default {BINANCE_WS}; bybit {BYBIT_WS})")
    p.add_argument("--rest-url", default=BINANCE_REST, help="Binance REST base for depth snapshots")
    p.add_argument("--duration", type=float, default=0.0, help="stop cleanly after SECONDS (0 = run until Ctrl-C)")
    p.add_argument("--gzip", action="store_true", help="gzip each day's files once the day is closed")
    p.add_argument("--status-interval", type=float, default=60.0, help="seconds between status lines")
    p.add_argument("--flush-interval", type=float, default=1.0, help="seconds between file flushes")
    p.add_argument("--max-connection-age", type=float, default=23.5 * 3600,
                   help="seconds before a proactive reconnect (Binance cuts at 24 h)")
    p.add_argument("--stale-timeout", type=float, default=30.0, help="reconnect when the book feed is silent this long")
    p.add_argument("--backoff-base", type=float, default=1.0, help="first reconnect delay in seconds")
    p.add_argument("--log-file", default="logs/data_collector.log", help="rotating log file ('' = none)")
    return p


def _download_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="data_collector.py download",
                                description="Download Bybit public daily trade and order-book archives.")
    p.add_argument("symbols", nargs="+")
    p.add_argument("--exchange", choices=["bybit"], default="bybit")
    p.add_argument("--start", required=True, help="first UTC day YYYY-MM-DD")
    p.add_argument("--end", required=True, help="last UTC day YYYY-MM-DD (inclusive)")
    p.add_argument("--out", default="data")
    p.add_argument("--archive-url", default=BYBIT_TRADE_ARCHIVE, help="trade archive base")
    p.add_argument("--book-archive-url", default=BYBIT_BOOK_ARCHIVE, help="order-book archive base")
    p.add_argument("--no-trades", action="store_true")
    p.add_argument("--no-orderbook", action="store_true")
    p.add_argument("--book-depth", type=int, default=0, choices=[0, 200, 500],
                   help="order-book archive depth (0 = 500 before 2025-08-21, 200 after)")
    p.add_argument("--gzip", action="store_true", help="store extracted order-book files gzipped")
    p.add_argument("--log-file", default="", help="log file ('' = console only)")
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry: record (default) or download."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["download"]:
        args = _download_parser().parse_args(argv[1:])
        _setup_logging(args.log_file)
        try:
            rep = download(args.symbols, args.start, args.end, Path(args.out), args.archive_url,
                           args.book_archive_url, not args.no_trades, not args.no_orderbook, args.book_depth,
                           args.gzip)
        except DownloadError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"downloaded {len(rep.downloaded)}, already present {len(rep.skipped)}, "
              f"missing in archive {len(rep.missing)}, failed {len(rep.failed)}")
        for item in rep.missing:
            print(f"  missing: {item}")
        for item in rep.failed:
            print(f"  FAILED: {item}")
        return 1 if rep.failed else 0
    args = _record_parser().parse_args(argv)
    _setup_logging(args.log_file)
    try:
        settings = CollectorSettings(symbols=args.symbols, exchange=args.exchange, out=Path(args.out),
                                     ws_url=args.ws_url, rest_url=args.rest_url, duration=args.duration,
                                     gzip_closed=args.gzip, status_interval=args.status_interval,
                                     flush_interval=args.flush_interval,
                                     max_connection_age=args.max_connection_age,
                                     stale_timeout=args.stale_timeout, backoff_base=args.backoff_base)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    record(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
