"""Trade CSV and order-book .data files -> a continuous UTC bar grid with book statistics, streaming.

Book files are replayed by a numba kernel that parses the fixed Bybit-schema JSON lines straight from
large byte chunks (plain or gzip), applies them to the array book and samples statistics on the
exchange-time clock in one compiled loop; any line it rejects goes through an exact per-line path that
names the file and line. Trades are read in chunks and reduced to mergeable per-bar partials, so memory
does not grow with file size. Bars are cached as Parquet keyed by everything that changes them.

Data gaps are never silent: a day missing its Trade or Orderbook file is warned about by name, and every
bar of a stretch with no trades and no book lasting `DataConfig.gap_threshold` (or of a day without its
Trade file, whose prices would only be the last close carried) is marked `is_gap` by `mark_gaps`, which
the live engine calls on its own bar window too.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import logging
import math
import os
import re
import sys
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import orjson
import pandas as pd
from tqdm import tqdm

import orderbook as ob
from config import ConfigError, DataConfig, GlobalConfig, add_config_args, config_from_args, parse_duration, timeframe_seconds

log = logging.getLogger(__name__)

CODE_VERSION = "bars-3"          # bump whenever bar output changes for the same input
CHUNK_BYTES = 4 << 20
TRADE_CHUNK_ROWS = 1_000_000
SAMPLE_BATCH = 200_000
MAX_WARNINGS_PER_FILE = 10
TRADE_COLUMNS = ["timestamp", "symbol", "side", "size", "price", "tickDirection", "trdMatchID",
                 "grossValue", "homeNotional", "foreignNotional"]
BAR_COLUMNS = ["open", "high", "low", "close", "volume", "vol_buy", "vol_sell", "trade_count", "dollar_val",
               "vwap", "taker_buy_ratio", "is_empty"] + ob.BOOK_BAR_COLUMNS + ["is_gap"]
_BOOK_RE = re.compile(r"^(\d{4}-\d{2}-\d{2})_([A-Z0-9]+)_ob(\d+)\.data(\.gz)?$")
_TRADE_RE = re.compile(r"^([A-Z0-9]+?)(\d{4}-\d{2}-\d{2})\.csv(\.gz)?$")


_NO_LIMIT = 1 << 62


class DataError(RuntimeError):
    """Input that cannot be used at all (missing/empty/unreadable folder); the message says what and where."""


@dataclass
class LoadReport:
    """Integrity counters of one load, for warnings and the inspect command."""
    symbol: str = ""
    trade_files: int = 0
    book_files: int = 0
    skipped_files: list[str] = field(default_factory=list)
    trade_rows: int = 0
    bad_trade_rows: int = 0
    out_of_order_trades: int = 0
    book_lines: int = 0
    bad_book_lines: int = 0
    slow_path_lines: int = 0
    book: dict[str, int] = field(default_factory=dict)
    samples: int = 0
    missing_days: dict[str, list[str]] = field(default_factory=dict)
    gaps: list["DataGap"] = field(default_factory=list)


# ------------------------------------------------------------------ files
def _open_binary(path: Path):
    """Open plain or gzip files for streaming binary reads."""
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _symbol_of(path: Path) -> str:
    """Symbol in a Trade or Orderbook file name ('' if the name does not follow the layout)."""
    m = _BOOK_RE.match(path.name)
    if m:
        return m.group(2)
    m = _TRADE_RE.match(path.name)
    return m.group(1) if m else ""


def _date_of(path: Path) -> str:
    """UTC date in a file name ('' if none)."""
    m = re.search(r"\d{4}-\d{2}-\d{2}", path.name)
    return m.group(0) if m else ""


@dataclass
class DataFiles:
    """The files of one data folder, in time order, filtered to one symbol and the requested days."""
    root: Path
    symbol: str
    trades: list[Path]
    books: list[Path]
    skipped: list[str]

    def span(self) -> tuple[str, str]:
        """(first, last) UTC day 'YYYY-MM-DD' of the dated files; ('', '') when none is dated."""
        days = sorted(d for d in map(_date_of, self.trades + self.books) if d)
        return (days[0], days[-1]) if days else ("", "")

    def require_day(self, flag: str, value: str, day: str) -> None:
        """ValueError naming the folder's days when `day` (YYYY-MM-DD, given as `flag value`) lies outside them."""
        first, last = self.span()
        if first and not first <= day <= last:
            raise ValueError(f"{flag} {value}: the data in {self.root} covers {first} to {last} (UTC days)")

    def require_symbol(self, flag: str, symbol: str) -> None:
        """ValueError naming the folder's symbol (its name's prefix, else its files') when `symbol` is another."""
        if symbol and self.symbol and symbol != self.symbol:
            raise ValueError(f"{flag} {symbol}: the data in {self.root} is {self.symbol}")


def list_files(data_dir: str | Path, start: str = "", end: str = "") -> DataFiles:
    """Find Trade/*.csv[.gz] and Orderbook/*.data[.gz]; files for another symbol are skipped with a warning."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist or is not a folder")
    try:
        trades = sorted(p for p in (root / "Trade").glob("*.csv*") if p.name.endswith((".csv", ".csv.gz")))
        books = sorted(p for p in (root / "Orderbook").glob("*.data*") if p.name.endswith((".data", ".data.gz")))
    except OSError as exc:
        raise DataError(f"cannot read data folder {root}: {exc}") from None
    if not trades and not books:
        raise DataError(f"no data in {root}: expected Trade/<SYM><YYYY-MM-DD>.csv[.gz] and/or "
                        "Orderbook/<YYYY-MM-DD>_<SYM>_ob<N>.data[.gz]")
    m = re.match(r"^([A-Z0-9]{2,30})_", root.name)
    names = Counter(s for s in map(_symbol_of, trades + books) if s)
    symbol = m.group(1) if m else (names.most_common(1)[0][0] if names else "")
    skipped: list[str] = []
    keep: dict[str, list[Path]] = {"trades": [], "books": []}
    for kind, paths in (("trades", trades), ("books", books)):
        seen: dict[str, Path] = {}
        for p in paths:
            sym, day = _symbol_of(p), _date_of(p)
            if sym and symbol and sym != symbol:
                log.warning("%s: file is for %s, not %s; skipped", p, sym, symbol)
                skipped.append(str(p))
                continue
            if (start and day and day < start) or (end and day and day > end):
                continue
            stem = p.name[:-3] if p.name.endswith(".gz") else p.name
            if stem in seen:
                log.warning("%s: duplicate of %s; skipped", p, seen[stem])
                skipped.append(str(p))
                continue
            seen[stem] = p
            keep[kind].append(p)
        keep[kind].sort(key=lambda p: (_date_of(p), p.name))
    return DataFiles(root, symbol, keep["trades"], keep["books"], skipped)


def require_data(cfg: GlobalConfig) -> DataFiles:
    """cfg's data folder, checked before any slow work: DataError when it is missing or empty, holds another
    symbol than cfg.symbol, or data.start/data.end lie outside its days (naming what the folder holds)."""
    files = list_files(cfg.data.data_dir)
    try:
        files.require_symbol("symbol", cfg.symbol)
        for flag, day in (("start", cfg.data.start), ("end", cfg.data.end)):
            if day:
                files.require_day(flag, day, day)
    except ValueError as exc:
        raise DataError(str(exc)) from None
    return files


def missing_days(files: DataFiles) -> dict[str, list[str]]:
    """UTC days between the first and the last file's day lacking a file of a kind the folder has.

    Returns {"YYYY-MM-DD": ["Trade", "Orderbook"]} (the kinds missing that day), in day order.
    """
    kinds = {"Trade": {_date_of(p) for p in files.trades}, "Orderbook": {_date_of(p) for p in files.books}}
    kinds = {k: days - {""} for k, days in kinds.items() if days - {""}}
    seen = sorted(set().union(*kinds.values())) if kinds else []
    if not seen:
        return {}
    span = pd.date_range(seen[0], seen[-1], freq="D").strftime("%Y-%m-%d")
    out = {day: [k for k, days in kinds.items() if day not in days] for day in span}
    return {day: lack for day, lack in out.items() if lack}


# ------------------------------------------------------------------ exact per-line path
class BadLine(ValueError):
    """A book line that cannot be used; the message says why."""


def _level_array(levels: object, side: str) -> np.ndarray:
    """Validate [[price, size], ...] (strings or numbers) into float64 (n, 2). Whole-array conversion first;
    a list it cannot take, or any bad value, goes level by level, which names the first bad level."""
    if not isinstance(levels, list):
        raise BadLine(f"field data.{side} is not a list")
    try:
        arr = np.array(levels, dtype=np.float64) if levels else np.empty((0, 2))
    except (TypeError, ValueError):
        arr = None
    if arr is not None and arr.ndim == 2 and arr.shape[1] >= 2:
        arr = np.ascontiguousarray(arr[:, :2])
        if ob.levels_valid(arr):
            return arr
    out = np.empty((len(levels), 2))
    for i, lv in enumerate(levels):
        if not isinstance(lv, list) or len(lv) < 2:
            raise BadLine(f"data.{side}[{i}] is not a [price, size] pair")
        try:
            px, qty = float(lv[0]), float(lv[1])
        except (TypeError, ValueError):
            raise BadLine(f"data.{side}[{i}] has a non-numeric price or size {lv[:2]!r}") from None
        if not (np.isfinite(px) and np.isfinite(qty) and px > 0 and qty >= 0):
            raise BadLine(f"data.{side}[{i}] has an invalid price or size {lv[:2]!r}")
        out[i] = px, qty
    return out


def _ts_window(path: Path, per_second: int) -> tuple[int, int]:
    """Plausible timestamps for a daily file: its UTC day from one day before to two days after (else any)."""
    day = _date_of(path)
    if not day:
        return 0, _NO_LIMIT
    start = int(pd.Timestamp(day, tz="UTC").timestamp())
    return (start - 86400) * per_second, (start + 2 * 86400) * per_second


def parse_book_line(raw: bytes, symbol: str = "", window: tuple[int, int] = (0, _NO_LIMIT)) -> dict:
    """Parse and validate one .data line exactly (orjson + checks); raises BadLine with the reason."""
    try:
        msg = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadLine(f"not valid JSON (corrupt or truncated line): {exc}") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("data"), dict):
        raise BadLine("not a book message (no 'data' object)")
    data = msg["data"]
    if msg.get("type") not in ("snapshot", "delta"):
        raise BadLine(f"field type = {msg.get('type')!r}: expected snapshot or delta")
    for name, value in (("ts", msg.get("ts")), ("data.u", data.get("u"))):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise BadLine(f"field {name} = {value!r}: expected a positive integer")
    if not window[0] <= msg["ts"] < window[1]:
        raise BadLine(f"field ts = {msg['ts']} is far outside the file's day")
    pu = data.get("pu", -1)
    if not isinstance(pu, int) or isinstance(pu, bool):
        raise BadLine(f"field data.pu = {pu!r}: expected an integer")
    if symbol and data.get("s") != symbol:
        raise BadLine(f"field data.s = {data.get('s')!r}: this folder holds {symbol}")
    msg["_bids"] = _level_array(data.get("b", []), "b")
    msg["_asks"] = _level_array(data.get("a", []), "a")
    return msg


# ------------------------------------------------------------------ book replay driver
class _WarnBudget:
    """Counts problems per file and logs the first few with file and line."""

    def __init__(self) -> None:
        self.per_file: Counter = Counter()

    def warn(self, path: Path, line: int, text: str) -> None:
        self.per_file[path] += 1
        if self.per_file[path] <= MAX_WARNINGS_PER_FILE:
            log.warning("%s:%d: %s", path, line, text)
        elif self.per_file[path] == MAX_WARNINGS_PER_FILE + 1:
            log.warning("%s: more problems in this file; only counting from here", path)


class BookReplay:
    """Replays .data[.gz] files through one carried OrderBook, streaming samples (and optional top-of-book)."""

    def __init__(self, symbol: str = "", sample_interval_ms: int = 1000, levels: int = 50,
                 stale_ms: int = ob.DEFAULT_STALE_MS, tob_rows: int = 0, scratch_levels: int = 1 << 15,
                 chunk_bytes: int = CHUNK_BYTES) -> None:
        self.book = ob.OrderBook(capacity=8192, sample_interval_ms=sample_interval_ms, levels=levels,
                                 stale_ms=stale_ms)
        self.sym = np.frombuffer(symbol.encode(), dtype=np.uint8).copy()
        self.symbol = symbol
        self.hdr = np.zeros(6, dtype=np.int64)
        self.scratch = [np.zeros(scratch_levels) for _ in range(4)]
        self.tob = np.zeros((tob_rows, 6))
        self.nt = np.zeros(1, dtype=np.int64)
        self.chunk_bytes = chunk_bytes
        self.window = (0, _NO_LIMIT)
        self.report = LoadReport(symbol=symbol)
        self.warnings = _WarnBudget()

    def run(self, paths: Iterable[Path], on_samples: Callable[[np.ndarray], None] | None = None,
            on_tob: Callable[[np.ndarray], None] | None = None) -> LoadReport:
        """Replay files in order; on_samples/on_tob receive filled batches."""
        for path in paths:
            self._file(path, on_samples, on_tob)
            self.report.book_files += 1
        self._flush(on_samples, on_tob, force=True)
        self.report.book = self.book.counters()
        return self.report

    def _flush(self, on_samples: Callable | None, on_tob: Callable | None, force: bool = False) -> None:
        """Hand filled sample and top-of-book buffers to the callbacks."""
        self.book.flush_samples()
        pending = self.book.pending_samples()
        if pending and (force or pending >= SAMPLE_BATCH):
            batch = self.book.drain_samples()
            self.report.samples += len(batch)
            if on_samples is not None:
                on_samples(batch)
        if self.nt[0] and on_tob is not None:
            on_tob(self.tob[:self.nt[0]].copy())
        self.nt[0] = 0

    def _file(self, path: Path, on_samples: Callable | None, on_tob: Callable | None) -> None:
        """Stream one file in chunks, keeping lines split across chunk boundaries."""
        self.window = _ts_window(path, 1000)
        line = 1
        carry = b""
        try:
            with _open_binary(path) as fh:
                while True:
                    data = fh.read(self.chunk_bytes)
                    final = not data
                    raw = carry + data if carry else data
                    buf = np.frombuffer(raw, dtype=np.uint8)
                    pos, line = self._chunk(path, raw, buf, final, line, on_samples, on_tob)
                    carry = raw[pos:]
                    self._flush(on_samples, on_tob)
                    if final:
                        break
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            self.report.bad_book_lines += 1
            self.warnings.warn(path, line, f"file unreadable from here on ({exc}); earlier lines kept")

    def _chunk(self, path: Path, raw: bytes, buf: np.ndarray, final: bool, line: int,
               on_samples: Callable | None, on_tob: Callable | None) -> tuple[int, int]:
        """Run the kernel over one chunk, handling slow lines, growth and buffer flushes."""
        b = self.book
        pos = 0
        start_line = line
        while True:
            pos, status, line = ob.replay_chunk(buf, pos, final, line, *self.window, self.sym, self.hdr, b.st,
                                                b.prev, b.bp, b.bq,
                                              b.ap, b.aq, *self.scratch, b.samples, b.ns, b.events, b.ne,
                                              self.tob, self.nt)
            self._log_events(path)
            if status == ob.ST_DONE:
                break
            if status == ob.ST_GROW:
                b.grow(2 * b.bp.shape[0])
            elif status == ob.ST_FLUSH:
                self._flush(on_samples, on_tob)
            else:
                nl = raw.find(b"\n", pos)
                nl = len(raw) if nl < 0 else nl
                self._slow_line(path, line, raw[pos:nl], on_tob)
                pos = nl + 1
                line += 1
        self.report.book_lines += line - start_line
        return min(pos, len(raw)), line

    def _slow_line(self, path: Path, line: int, raw: bytes, on_tob: Callable | None) -> None:
        """Exact path for a line the kernel rejected: apply it if valid, else count and warn."""
        self.report.slow_path_lines += 1
        try:
            msg = parse_book_line(raw, self.symbol, self.window)
        except BadLine as exc:
            self.report.bad_book_lines += 1
            self.warnings.warn(path, line, f"bad book line skipped: {exc}")
            return
        if self.tob.shape[0] and self.nt[0] >= self.tob.shape[0]:
            self._flush(None, on_tob)
        res = self.book.apply_arrays(ob.SEQUENCED, msg["type"] == "snapshot", msg["ts"], msg["data"]["u"],
                                     msg["data"].get("pu", -1), msg["_bids"], msg["_asks"], line)
        self._log_events(path)
        if res == ob.APPLIED and self.tob.shape[0]:
            bp, bq, ap, aq = (np.append(x, np.nan)[0] for x in self.book.top(1))
            self.tob[self.nt[0]] = msg["ts"], msg["data"]["u"], bp, bq, ap, aq
            self.nt[0] += 1

    def _log_events(self, path: Path) -> None:
        """Warn (with file and line) about gaps, resets, crossed books and time reversals."""
        for line, code, value in self.book.drain_events():
            self.warnings.warn(path, line, f"{ob.EVENT_NAMES[code]} (u/ts={value})")


# ------------------------------------------------------------------ trades
def _unit_scale(values: np.ndarray) -> np.ndarray:
    """Seconds per unit of each raw epoch timestamp, by magnitude (s, ms, µs, ns)."""
    mag = np.abs(values)
    return np.select([mag < 1e11, mag < 1e14, mag < 1e17], [1.0, 1e-3, 1e-6], 1e-9)


@dataclass
class _TradeFile:
    """Per-file reading state: the unit detected and the last timestamp seen."""
    path: Path
    scale: float = 0.0
    last_ts: float = -np.inf


def _trade_usecols(path: Path) -> list[str]:
    """Columns worth parsing: the ones bars and replay use, plus the last (a truncated row lacks it)."""
    with _open_binary(path) as fh:
        header = fh.readline().decode("utf-8", "replace").strip().split(",")
    wanted = {"timestamp", "symbol", "side", "size", "price", "trdMatchID", header[-1]}
    return [c for c in header if c in wanted]


def _trade_chunks(path: Path, symbol: str, report: LoadReport, budget: _WarnBudget) -> Iterator[pd.DataFrame]:
    """Clean chunks (timestamp s, side, size, price, trdMatchID) of one trade file, bad rows warned and dropped."""
    state = _TradeFile(path)
    first_line = 2
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            reader = pd.read_csv(path, chunksize=TRADE_CHUNK_ROWS, on_bad_lines="warn", low_memory=False,
                                 usecols=_trade_usecols(path), dtype={"symbol": str, "side": str, "trdMatchID": str})
            for chunk in reader:
                for w in caught:
                    report.bad_trade_rows += 1
                    budget.warn(path, 0, f"malformed CSV row skipped: {str(w.message).strip()}")
                caught.clear()
                out = _clean_trades(chunk, state, symbol, first_line, report, budget)
                first_line += len(chunk)
                if len(out):
                    yield out
            for w in caught:
                report.bad_trade_rows += 1
                budget.warn(path, 0, f"malformed CSV row skipped: {str(w.message).strip()}")
    except (OSError, EOFError, gzip.BadGzipFile, pd.errors.ParserError, pd.errors.EmptyDataError,
            UnicodeDecodeError) as exc:
        report.bad_trade_rows += 1
        budget.warn(path, first_line, f"file unreadable from here on ({exc}); earlier rows kept")


def _clean_trades(chunk: pd.DataFrame, state: _TradeFile, symbol: str, first_line: int, report: LoadReport,
                  budget: _WarnBudget) -> pd.DataFrame:
    """Validate one chunk: numeric fields, side, symbol, timestamp unit, complete rows, order."""
    missing = [c for c in ("timestamp", "side", "size", "price") if c not in chunk.columns]
    if missing:
        raise pd.errors.ParserError(f"missing column(s) {', '.join(missing)}; expected the Bybit trade schema")
    lines = np.arange(first_line, first_line + len(chunk))
    ts = pd.to_numeric(chunk["timestamp"], errors="coerce").to_numpy(dtype=float)
    size = pd.to_numeric(chunk["size"], errors="coerce").to_numpy(dtype=float)
    price = pd.to_numeric(chunk["price"], errors="coerce").to_numpy(dtype=float)
    side = chunk["side"].astype(str).to_numpy()
    last_col = chunk.columns[-1]
    problems = {
        "non-numeric or missing timestamp": ~np.isfinite(ts),
        "non-numeric or non-positive price": ~(np.isfinite(price) & (price > 0)),
        "non-numeric or non-positive size": ~(np.isfinite(size) & (size > 0)),
        "side is not Buy/Sell": ~np.isin(side, ["Buy", "Sell"]),
        f"incomplete row (no {last_col}; truncated?)": chunk[last_col].isna().to_numpy(),
    }
    if symbol and "symbol" in chunk.columns:
        problems[f"symbol is not {symbol}"] = (chunk["symbol"].astype(str) != symbol).to_numpy()
    finite = np.isfinite(ts)
    scales = np.where(finite, _unit_scale(np.where(finite, ts, 0.0)), np.nan)
    if state.scale == 0.0 and finite.any():
        state.scale = float(_unit_scale(np.array([np.median(ts[finite])]))[0])
    problems["timestamp unit differs from the file's"] = finite & (scales != state.scale)
    lo, hi = _ts_window(state.path, 1)
    seconds_all = np.where(finite, ts, 0.0) * state.scale
    problems["timestamp far outside the file's day"] = finite & ((seconds_all < lo) | (seconds_all >= hi))
    bad = np.zeros(len(chunk), dtype=bool)
    for reason, mask in problems.items():
        mask = mask & ~bad
        for ln in lines[mask][:MAX_WARNINGS_PER_FILE]:
            budget.warn(state.path, int(ln), f"trade row skipped: {reason}")
        bad |= mask
    report.bad_trade_rows += int(bad.sum())
    good = ~bad
    seconds = ts[good] * state.scale
    if len(seconds):
        steps = np.diff(np.concatenate([[state.last_ts], seconds]))
        back = int((steps < 0).sum())
        if back:
            report.out_of_order_trades += back
            first = lines[good][int(np.argmax(steps < 0))]
            budget.warn(state.path, int(first), f"{back} trade timestamp(s) earlier than the row before; sorted")
        state.last_ts = seconds[-1]
    out = pd.DataFrame({"timestamp": seconds, "side": side[good], "size": size[good], "price": price[good],
                        "trdMatchID": (chunk["trdMatchID"].astype(str).to_numpy()[good]
                                       if "trdMatchID" in chunk.columns else "")})
    report.trade_rows += len(out)
    return out.sort_values("timestamp", kind="stable").reset_index(drop=True)


def iter_trades(data_dir: str | Path, start: str = "", end: str = "") -> Iterator[pd.DataFrame]:
    """Clean trade chunks (timestamp [float s], side, size, price, trdMatchID) in file order, for replay."""
    files = list_files(data_dir, start, end)
    report, budget = LoadReport(symbol=files.symbol), _WarnBudget()
    for path in files.trades:
        yield from _trade_chunks(path, files.symbol, report, budget)


def iter_book_messages(data_dir: str | Path, start: str = "", end: str = "", levels: bool = False) -> Iterator[dict]:
    """Parsed, validated .data messages in time order across files (bad lines counted and warned).
    levels: keep the float (n, 2) arrays of data.b and data.a the validation made, as `_bids` and `_asks`
    (a replay applies them to its book instead of parsing the strings again)."""
    files = list_files(data_dir, start, end)
    budget = _WarnBudget()
    for path in files.books:
        window = _ts_window(path, 1000)
        try:
            with _open_binary(path) as fh:
                for line, raw in enumerate(fh, start=1):
                    if not raw.strip():
                        continue
                    try:
                        msg = parse_book_line(raw, files.symbol, window)
                    except BadLine as exc:
                        budget.warn(path, line, f"bad book line skipped: {exc}")
                        continue
                    if not levels:
                        del msg["_bids"], msg["_asks"]
                    yield msg
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            budget.warn(path, 0, f"file unreadable from here on ({exc}); earlier lines kept")


# ------------------------------------------------------------------ bars
def partial_trade_bars(chunk: pd.DataFrame, bar_us: int) -> pd.DataFrame:
    """Per-bar mergeable partials of one time-sorted trade chunk (contiguous runs, numpy reduceat)."""
    return trade_partials(chunk["timestamp"].to_numpy(), chunk["side"].to_numpy() == "Buy", chunk["size"].to_numpy(),
                          chunk["price"].to_numpy(), bar_us)


def trade_partials(ts_s: np.ndarray, buy: np.ndarray, size: np.ndarray, price: np.ndarray,
                   bar_us: int) -> pd.DataFrame:
    """`partial_trade_bars` of time-sorted trades given as arrays: times (float seconds), taker-buy flags, sizes,
    prices (the live bar close builds no frame of its trades)."""
    ts_us = np.round(ts_s * 1e6).astype(np.int64)
    bar = (ts_us // bar_us) * bar_us
    starts = np.flatnonzero(np.r_[True, bar[1:] != bar[:-1]])
    ends = np.r_[starts[1:], len(bar)] - 1
    vol_buy = np.where(buy, size, 0.0)
    return pd.DataFrame({
        "volume": np.add.reduceat(size, starts), "vol_buy": np.add.reduceat(vol_buy, starts),
        "vol_sell": np.add.reduceat(size - vol_buy, starts), "dollar_val": np.add.reduceat(price * size, starts),
        "trade_count": np.diff(np.r_[starts, len(bar)]), "high": np.maximum.reduceat(price, starts),
        "low": np.minimum.reduceat(price, starts), "open": price[starts], "first_ts": ts_us[starts],
        "close": price[ends], "last_ts": ts_us[ends]}, index=pd.Index(bar[starts], name="bar"), copy=False)


_TRADE_SUMS = ["volume", "vol_buy", "vol_sell", "dollar_val", "trade_count"]
_TRADE_COLS = _TRADE_SUMS + ["high", "low", "open", "close"]


def _merge_trade_bars(parts: list[pd.DataFrame]) -> pd.DataFrame:
    """Merge per-chunk partials: sums add, open from the earliest trade, close from the latest.
    One part with strictly increasing bars is already merged (the live close: one bar, one chunk): returned as
    it is, extra columns included (a column subset is a copy; `_grid` reads only _TRADE_COLS)."""
    if len(parts) == 1 and parts[0].index.is_monotonic_increasing and parts[0].index.is_unique:
        return parts[0]
    frame = pd.concat(parts)
    g = frame.groupby(level=0, sort=True)
    out = g[_TRADE_SUMS].sum()
    out["high"] = g["high"].max()
    out["low"] = g["low"].min()
    out["open"] = frame.sort_values("first_ts", kind="stable").groupby(level=0)["open"].first()
    out["close"] = frame.sort_values("last_ts", kind="stable").groupby(level=0)["close"].last()
    return out


def bar_frame(trade_parts: list[pd.DataFrame], book_parts: list[pd.DataFrame], bar_ms: int,
              span_ms: tuple[int, int] | None = None, prev_close: float = np.nan) -> pd.DataFrame:
    """Bars (BAR_COLUMNS, UTC index = bar open) from per-chunk partials: `partial_trade_bars` of trade
    chunks and `orderbook.partial_book_bars` of book samples. The one bar rule of research and live:
    build_bars calls it over whole files, the live engine over each closed bar's messages.
    span_ms: (first, last) bar open in ms (default: the trades' span); prev_close seeds empty leading bars."""
    trade = _merge_trade_bars(trade_parts) if trade_parts else pd.DataFrame(
        columns=_TRADE_COLS, index=pd.Index([], dtype=np.int64), dtype=float)
    book = ob.finalize_book_bars(ob.merge_partial_book_bars(book_parts))
    return _grid(trade, book, bar_ms, span_ms, prev_close)


def _on_grid(index: np.ndarray, idx_ms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(grid positions, row numbers) of the rows whose bar open (ms) lies on the grid idx_ms."""
    pos = np.searchsorted(idx_ms, index)
    hit = (pos < len(idx_ms)) & (idx_ms[np.minimum(pos, len(idx_ms) - 1)] == index)
    return pos[hit], np.flatnonzero(hit)


def _grid(trade: pd.DataFrame, book: pd.DataFrame, bar_ms: int, span_ms: tuple[int, int] | None = None,
          prev_close: float = np.nan) -> pd.DataFrame:
    """Continuous bar grid over the trade span; empty bars carry the last close; book columns joined.

    is_gap is False here: gaps are runs across bars, marked on a whole frame or window by mark_gaps."""
    first, last = span_ms or (trade.index.min() // 1000, trade.index.max() // 1000)
    idx_ms = np.arange(first, last + bar_ms, bar_ms, dtype=np.int64)
    at, rows = _on_grid(trade.index.to_numpy() // 1000, idx_ms)
    values = ob.float_columns(trade)
    cols: dict[str, np.ndarray] = {}
    for col in _TRADE_COLS:
        cols[col] = np.full(len(idx_ms), np.nan)
        cols[col][at] = values[col][rows]
    empty = np.ones(len(idx_ms), dtype=bool)
    empty[at] = False
    last = np.maximum.accumulate(np.where(np.isnan(cols["close"]), -1, np.arange(len(idx_ms))))   # forward fill
    close = np.where(last >= 0, cols["close"][np.maximum(last, 0)], prev_close)
    for col in ("open", "high", "low"):
        cols[col] = np.where(~empty, cols[col], close)
    cols["close"] = close
    for col in _TRADE_SUMS:
        cols[col] = np.nan_to_num(cols[col], nan=0.0)
    cols["trade_count"] = cols["trade_count"].astype(np.int64)
    vol = cols["volume"]
    with np.errstate(invalid="ignore", divide="ignore"):
        cols["vwap"] = np.where(empty, close, cols["dollar_val"] / vol)
        cols["taker_buy_ratio"] = np.where(empty, 0.5, cols["vol_buy"] / vol)
    cols["is_empty"] = empty
    at, rows = _on_grid(book.index.to_numpy(dtype=np.int64), idx_ms) if len(book) else (idx_ms[:0], idx_ms[:0])
    values = ob.float_columns(book)
    for col in ob.BOOK_BAR_COLUMNS:
        cols[col] = np.full(len(idx_ms), np.nan)
        if len(book):
            cols[col][at] = values[col][rows]
    cols["ob_samples"] = np.nan_to_num(cols["ob_samples"], nan=0.0).astype(np.int64)
    cols["is_gap"] = np.zeros(len(idx_ms), dtype=bool)
    index = pd.DatetimeIndex((idx_ms * 1_000_000).view("datetime64[ns]"), tz="UTC", name="time")
    return pd.DataFrame({c: cols[c] for c in BAR_COLUMNS}, index=index, copy=False)   # the arrays are ours


@dataclass(frozen=True)
class DataGap:
    """A stretch of bars without market data: bar open times [start, end) UTC and how many bars."""
    start: pd.Timestamp
    end: pd.Timestamp
    bars: int

    def __str__(self) -> str:
        minutes = int((self.end - self.start).total_seconds()) // 60
        return (f"{self.start:%Y-%m-%d %H:%M} -> {self.end:%Y-%m-%d %H:%M} UTC "
                f"({minutes // 60}h{minutes % 60:02d}m, {self.bars} bars)")


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and end (exclusive) indices of the runs of True in a bool array."""
    edges = np.diff(np.r_[0, mask.astype(np.int8), 0])
    return np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)


def mark_gaps(bars: pd.DataFrame, bar_seconds: int, gap_threshold: str | float,
              unknown: np.ndarray | None = None) -> list[DataGap]:
    """Set the bool column bars["is_gap"] in place and return the gaps, in time order.

    A bar is a gap bar when it lies in a run of consecutive bars with no trade (is_empty) and no book
    sample (ob_samples == 0) at least `gap_threshold` long (whole bars, at least one), or where the
    optional bool array `unknown` (one per bar, e.g. a day without its Trade file) is True. The whole run
    is marked, so a window that ends inside a run marks it from the bar where it reaches the threshold:
    the live engine calls this on its bar window at every close with (bar seconds, cfg.data.gap_threshold,
    unknown = the window's is_gap so far), the rule the loader applies to files.
    """
    need = max(1, math.ceil(parse_duration(gap_threshold) / bar_seconds))
    quiet = bars["is_empty"].to_numpy(bool) & (bars["ob_samples"].to_numpy() == 0)
    gap = np.zeros(len(bars), dtype=bool) if unknown is None else np.asarray(unknown, dtype=bool).copy()
    for lo, hi in zip(*_runs(quiet)):
        if hi - lo >= need:
            gap[lo:hi] = True
    bars["is_gap"] = gap
    return gaps_in(bars, bar_seconds)


def gaps_in(bars: pd.DataFrame, bar_seconds: int) -> list[DataGap]:
    """The runs of is_gap bars as DataGap records, in time order."""
    step = pd.Timedelta(seconds=bar_seconds)
    return [DataGap(bars.index[lo], bars.index[hi - 1] + step, int(hi - lo))
            for lo, hi in zip(*_runs(bars["is_gap"].to_numpy(bool)))]


def build_bars(files: DataFiles, timeframe: str, levels: int, sample_interval: str,
               stale_after: str = "60s",
               gap_threshold: str = DataConfig.gap_threshold) -> tuple[pd.DataFrame, LoadReport]:
    """Read every file once, streaming, and return (bars, integrity report); data gaps warned and marked."""
    bar_s = timeframe_seconds(timeframe)
    budget = _WarnBudget()
    report = LoadReport(symbol=files.symbol, skipped_files=list(files.skipped))
    parts: list[pd.DataFrame] = []
    for path in tqdm(files.trades, desc="trade files", unit="file", disable=None):
        for chunk in _trade_chunks(path, files.symbol, report, budget):
            parts.append(partial_trade_bars(chunk, bar_s * 1_000_000))
        report.trade_files += 1
    if not parts:
        raise DataError(f"no usable trades in {files.root / 'Trade'} "
                        f"({report.bad_trade_rows} bad rows); bars need trades")
    book_sums = ob.BookBarSums(bar_s * 1000)
    if files.books:
        replay = BookReplay(files.symbol, int(parse_duration(sample_interval) * 1000), levels,
                            int(parse_duration(stale_after) * 1000))
        replay.report = report
        replay.warnings = budget
        replay.run(tqdm(files.books, desc="book files", unit="file", disable=None),
                   on_samples=book_sums.add)
    bars = bar_frame(parts, book_sums.take(), bar_s * 1000)
    report.missing_days = missing_days(files)
    no_trades = [day for day, kinds in report.missing_days.items() if "Trade" in kinds]
    report.gaps = mark_gaps(bars, bar_s, gap_threshold, bars.index.strftime("%Y-%m-%d").isin(no_trades))
    _log_summary(report)
    _log_gaps(report, files.symbol, timeframe, gap_threshold)
    return bars, report


def _log_gaps(report: LoadReport, symbol: str, timeframe: str, gap_threshold: str) -> None:
    """One warning per missing day (naming the files expected) and per data gap (the first few, then a count)."""
    expected = {"Trade": "Trade/{s}{d}.csv[.gz]", "Orderbook": "Orderbook/{d}_{s}_ob<N>.data[.gz]"}
    for day, kinds in report.missing_days.items():
        names = " and ".join(expected[k].format(s=symbol, d=day) for k in kinds)
        log.warning("%s %s: missing %s; %s", symbol, day, names,
                    "the day is a data gap" if "Trade" in kinds else "book features are unknown that day")
    for gap in report.gaps[:MAX_WARNINGS_PER_FILE]:
        log.warning("%s: data gap %s with no trades and no book for >= %s (or no Trade file): %s bars marked "
                    "is_gap, never warm, labelled or traded", symbol, gap, gap_threshold, timeframe)
    if len(report.gaps) > MAX_WARNINGS_PER_FILE:
        log.warning("%s: %d data gaps in all (data_loader.py inspect lists them)", symbol, len(report.gaps))


def _log_summary(report: LoadReport) -> None:
    """One warning line when anything was dropped or broken."""
    problems = {"bad trade rows": report.bad_trade_rows, "bad book lines": report.bad_book_lines,
                "out-of-order trades": report.out_of_order_trades, "skipped files": len(report.skipped_files),
                **{k: v for k, v in report.book.items() if k in ("gaps", "resets", "crossed", "time_reversals")}}
    bad = {k: v for k, v in problems.items() if v}
    if bad:
        log.warning("%s: %s", report.symbol, ", ".join(f"{v} {k}" for k, v in bad.items()))


def _cache_key(files: DataFiles, timeframe: str, d: DataConfig) -> str:
    """Hash of everything that changes the bars: files (size, mtime), settings and the code version."""
    h = hashlib.sha256()
    h.update(f"{CODE_VERSION}|{timeframe}|{d.ob_levels}|{parse_duration(d.book_sample_interval)}|{d.start}|{d.end}|"
             f"{parse_duration(d.gap_threshold)}|{files.symbol}".encode())
    for p in files.trades + files.books:
        st = p.stat()
        h.update(f"|{p.name}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


def load_bars(cfg: GlobalConfig, timeframe: str | None = None) -> pd.DataFrame:
    """Bars for cfg.data (continuous UTC grid, ob_* book columns), from the Parquet cache when it is current."""
    d = cfg.data
    tf = timeframe or d.timeframe
    files = list_files(d.data_dir, d.start, d.end)
    cache = files.root / ".cache" / f"bars_{tf}_{_cache_key(files, tf, d)}.parquet"
    if d.cache and cache.is_file():
        try:
            bars = pd.read_parquet(cache)
        except (OSError, ValueError) as exc:
            log.warning("cache %s unreadable (%s); rebuilding", cache, exc)
        else:
            known = LoadReport(missing_days=missing_days(files), gaps=gaps_in(bars, timeframe_seconds(tf)))
            _log_gaps(known, files.symbol, tf, d.gap_threshold)  # cached bars keep their gaps loud
            return bars
    bars, _ = build_bars(files, tf, d.ob_levels, d.book_sample_interval, gap_threshold=d.gap_threshold)
    bars = clip_days(bars, d.start, d.end)
    if d.cache:
        _write_cache(bars, cache)
    return bars


def clip_days(bars: pd.DataFrame, start: str, end: str) -> pd.DataFrame:
    """Keep the rows of `bars` (any frame indexed by UTC bar times) inside [start 00:00, end+1d) when given."""
    if start:
        bars = bars[bars.index >= pd.Timestamp(start, tz="UTC")]
    if end:
        bars = bars[bars.index < pd.Timestamp(end, tz="UTC") + pd.Timedelta(days=1)]
    return bars


def _write_cache(bars: pd.DataFrame, path: Path) -> None:
    """Write the cache atomically; a read-only data folder only costs a warning."""
    try:
        path.parent.mkdir(exist_ok=True)
        for old in path.parent.glob(path.name.rsplit("_", 1)[0] + "_*.parquet"):
            old.unlink()
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        bars.to_parquet(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("bars not cached at %s: %s", path, exc)


# ------------------------------------------------------------------ CLI
def _inspect(cfg: GlobalConfig, data_dir: str) -> str:
    """Integrity report text: span, counts, gaps/resets/crossed, missing days, data gaps, empty-bar share,
    coverage per day."""
    files = list_files(data_dir, cfg.data.start, cfg.data.end)
    per_sample = parse_duration(cfg.data.book_sample_interval)
    if files.trades:
        bars, rep = build_bars(files, "1m", cfg.data.ob_levels, cfg.data.book_sample_interval,
                               gap_threshold=cfg.data.gap_threshold)
    else:
        replay = BookReplay(files.symbol, int(per_sample * 1000), cfg.data.ob_levels)
        rep = replay.run(files.books)
        bars = None
    b = rep.book
    lines = [f"folder       {files.root}  symbol {files.symbol}",
             f"files        {rep.trade_files} trade, {rep.book_files} book, {len(files.skipped)} skipped",
             f"trades       {rep.trade_rows} rows, {rep.bad_trade_rows} bad, {rep.out_of_order_trades} out of order",
             f"book         {b.get('messages', 0)} messages, {b.get('snapshots', 0)} snapshots, "
             f"{rep.bad_book_lines} bad lines, {b.get('gaps', 0)} gaps, {b.get('resets', 0)} resets, "
             f"{b.get('crossed', 0)} crossed, {b.get('time_reversals', 0)} time reversals, "
             f"{b.get('skipped_invalid', 0)} deltas while invalid",
             f"samples      {rep.samples} valid book samples every {cfg.data.book_sample_interval}"]
    lines += [f"missing      {day}: {', '.join(kinds)} file" for day, kinds in missing_days(files).items()]
    if bars is None:
        return "\n".join(lines + ["no trade files: no bars, span or coverage"])
    day = bars.groupby(bars.index.floor("D"))
    cover = pd.DataFrame({"trades": day["is_empty"].apply(lambda s: 1.0 - s.mean()),
                          "book": day["ob_samples"].sum() / (day.size() * 60 / per_sample)})
    lines[1:1] = [f"span         {bars.index[0]} -> {bars.index[-1] + pd.Timedelta(minutes=1)}"]
    lines += [f"data gaps    {len(rep.gaps)} (>= {cfg.data.gap_threshold} with no trades and no book, or no Trade "
              f"file), {int(bars['is_gap'].sum())} 1m bars"] + [f"  gap        {gap}" for gap in rep.gaps]
    lines += [f"empty 1m bars {bars['is_empty'].mean():.2%}",
              "coverage per UTC day within the span (1m bars with trades, book sample ticks with a valid book):"]
    for ts, row in cover.iterrows():
        lines.append(f"  {ts.date()}  trades {row.trades:7.2%}  book {row.book:7.2%}")
    return "\n".join(lines)


def _tob(cfg: GlobalConfig, data_dir: str, out: str) -> int:
    """Write ts,u,bid,bid_size,ask,ask_size after every applied book message; returns rows written."""
    files = list_files(data_dir, cfg.data.start, cfg.data.end)
    if not files.books:
        raise DataError(f"no Orderbook/*.data[.gz] files in {files.root}")
    replay = BookReplay(files.symbol, 0, cfg.data.ob_levels, tob_rows=1 << 16)
    written = [0]
    with open(out, "w", encoding="utf-8") as fh:
        fh.write("ts,u,bid,bid_size,ask,ask_size\n")

        def write(rows: np.ndarray) -> None:
            frame = pd.DataFrame(rows, columns=["ts", "u", "bid", "bid_size", "ask", "ask_size"])
            frame[["ts", "u"]] = frame[["ts", "u"]].astype(np.int64)
            frame.to_csv(fh, header=False, index=False, float_format="%.10g")
            written[0] += len(frame)

        replay.run(files.books, on_tob=write)
    return written[0]


def main(argv: list[str] | None = None) -> int:
    """CLI: inspect / bars / tob."""
    parser = argparse.ArgumentParser(prog="data_loader.py", description="PurpleSky data loader")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_inspect = sub.add_parser("inspect", help="integrity report of a data folder")
    p_bars = sub.add_parser("bars", help="write bars to .parquet or .csv")
    p_tob = sub.add_parser("tob", help="top of book after every applied book message")
    for p in (p_inspect, p_bars, p_tob):
        p.add_argument("dir", help="data folder holding Trade/ and Orderbook/")
        add_config_args(p, ["--ob-levels", "--book-interval"] if p is not p_bars else
                        ["--timeframe", "--ob-levels", "--book-interval"])
    for p in (p_bars, p_tob):
        p.add_argument("-o", "--out", required=True, help="output file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        cfg = config_from_args(args)
        cfg.data.data_dir = args.dir
        if args.cmd == "inspect":
            print(_inspect(cfg, args.dir))
        elif args.cmd == "bars":
            bars = load_bars(cfg)
            if args.out.endswith(".csv"):
                bars.to_csv(args.out)
            else:
                bars.to_parquet(args.out)
            print(f"{len(bars)} {cfg.data.timeframe} bars -> {args.out}")
        else:
            print(f"{_tob(cfg, args.dir, args.out)} rows -> {args.out}")
    except (DataError, ConfigError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
