"""The live engine: streams -> bars -> features -> models -> strategy (via execution.py) -> exchange.

A thin I/O shell around the research code. Modes come only from flags (DESIGN §3):

    python live_trading_v2.py --symbol BTCUSDT                                  # dry-run (default)
    python live_trading_v2.py --symbol BTCUSDT --paper http://127.0.0.1:8099    # paper_exchange.py
    python live_trading_v2.py --symbol BTCUSDT --keys-file keys.json --testnet  # or --demo
    python live_trading_v2.py --symbol BTCUSDT --keys-file keys.json --live     # real money

What happens, in order: arguments, keys file, model folder and state file are checked before any network
access (exit 2); startup checks (clock, key permissions, instrument, hedge mode; exit 3); warm-up from
`--data-dir`, the engine's own recordings and REST klines (book and taker-flow columns missing there, so
nothing trades until enough real bars passed); the public stream and (not dry-run) the private stream;
reconciliation with the exchange (exit 4 when it cannot complete at startup); then the loop. Bars close
on exchange time (a later-stamped message, or the exchange clock past the boundary plus
`live.bar_close_grace`) and are built by `data_loader.bar_frame` from the same book-sampling kernel as
research, so live bars equal `data_loader`'s. Each closed bar: `feature_engine.compute_features` on the
window, `ModelBundle` probabilities (or a `--probabilities` file), `execution.Execution.on_bar_close`
(the only decider: `strategy.decide` inside), orders through `exchange_client` (hedge mode,
deterministic orderLinkId, stopLoss attached on create with tpslMode=Partial). Journals and heartbeat
follow DESIGN §3. Every clock read and random draw goes through `Clock`. Exit codes: 0 clean stop,
2 bad arguments/config/keys/model/state, 3 startup checks refused, 4 reconciliation failed, else crash.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime as dt
import json
import logging
import math
import os
import queue
import random
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from logging.handlers import RotatingFileHandler
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import orjson
import pandas as pd

import data_loader
import exchange_client as exc
import execution
import feature_engine
import orderbook as ob
from config import (ConfigError, GlobalConfig, LiveSettings, add_config_args, atomic_write_text, config_from_args,
                    parse_duration, timeframe_seconds)
from data_collector import utc_day
from models import psi
from watchdog import acquire_lock   # stdlib-only: one OS lock for the watchdog and the engine

log = logging.getLogger("live_trading_v2")

EXIT_OK, EXIT_CONFIG, EXIT_STARTUP, EXIT_RECONCILE = 0, 2, 3, 4
EXIT_UNREACHABLE = 5   # the exchange could not be reached at startup: a crash to the watchdog (restart, backoff)
EXIT_CRASH = 1         # an exception escaped: the interpreter exits 1
STATE_VERSION = 1
HEARTBEAT_S = 5.0               # state/heartbeat_<SYM>.json rewrite period (contract: at least every 10 s)
WARM_MARGIN_BARS = 50           # feature window beyond the model's warm-up
BYBIT_DEPTHS = (1, 50, 200, 500)
RECENT_TRADES_LIMIT = 1000      # Bybit V5 GET /v5/market/recent-trade: linear limit 1-1000
KLINE_PAGE = 1000               # Bybit V5 GET /v5/market/kline: limit 1-1000 per page
PROB_COLUMNS = ("p_exec_long", "p_exec_short", "p_dir_long", "p_dir_short")
LOCKSTEP_PERIOD_BARS = 5        # lockstep: the periodic jobs at most once every 5 bars (see Engine._every)
EXEC_OVERLAP_MS = 60_000        # reconciliation re-reads executions this far before the previous one (clock skew).
                                # Invariant: the lifecycle keeps every order with an event in the span the next
                                # re-read covers (Execution.reread_from_ms), so a re-read fill is never taken for new
RECONCILE_READS = 3             # tries at reading the legs still around the orders and executions


class Refusal(Exception):
    """A reason not to run, with the exit code the watchdog contract gives it."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------- clock and randomness
class Clock:
    """The one source of time and random draws on the live path (tests inject their own).

    `exchange_ms()` is the engine's estimate of exchange time: the local clock plus the measured offset,
    never behind the latest exchange stamp seen; in paper mode it is the market clock alone (the latest
    stamp seen, moving on with the wall clock between messages unless the clock is in lockstep)."""

    def __init__(self, seed: int = 0, market: bool = False, lockstep: bool = False):
        self.random = random.Random(seed)
        self.market = market
        self.lockstep = lockstep
        self.offset_ms = 0.0
        self.seen_ms = 0
        self._seen_mono = self.monotonic()

    def wall_ms(self) -> int:
        return int(time.time() * 1000)

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def saw(self, ts_ms: int) -> None:
        """An exchange timestamp arrived (message, response, advance)."""
        if ts_ms > self.seen_ms:
            self.seen_ms = int(ts_ms)
            self._seen_mono = self.monotonic()

    def exchange_ms(self) -> int:
        """Exchange time in ms; in paper mode 0 until the first exchange stamp (unknown, not 1970)."""
        if self.market:
            if self.lockstep or not self.seen_ms:
                return self.seen_ms
            return self.seen_ms + int((self.monotonic() - self._seen_mono) * 1000)
        return max(self.seen_ms, int(self.wall_ms() + self.offset_ms))

    def schedule_s(self) -> float:
        """Seconds on the clock the periodic jobs (reconciliation, stop guard, equity record) run on: market
        time in lockstep, so a replay does the same work at the same market moments however loaded the machine
        is (30 s of market time pass in milliseconds there); the monotonic clock otherwise (a --speed N replay
        is the timing path, and a wall-clock schedule keeps its REST reads within the venue's limits)."""
        return self.seen_ms / 1000.0 if self.lockstep else self.monotonic()


def iso(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000.0, dt.timezone.utc).isoformat(timespec="milliseconds")


# ---------------------------------------------------------------- journals (DESIGN §3 live files)
def _json_default(x: Any) -> Any:
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, (np.bool_,)):
        return bool(x)
    return str(x)


def _clean(x: Any) -> Any:
    """NaN/inf as null (JSON has no NaN)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


class Journals:
    """Append-only JSON-lines files `logs/<name>_<SYM>.jsonl`; each record is one write() of one line
    (O_APPEND), so a reader never sees half a record. Every record carries ts (the record's own, such as a
    fill's execution time, else the clock's), time (the same moment in ISO), symbol and mode."""

    def __init__(self, log_dir: Path, symbol: str, mode: str, clock: Clock):
        self.dir, self.symbol, self.mode, self.clock = log_dir, symbol, mode, clock
        self.dir.mkdir(parents=True, exist_ok=True)
        self._fds: dict[str, int] = {}
        self._lines: dict[str, int] = {}
        self.lock = threading.Lock()

    def path(self, name: str) -> Path:
        return self.dir / f"{name}_{self.symbol}.jsonl"

    def write(self, name: str, record: dict) -> dict:
        fields = _clean(record)
        ms = fields.pop("ts", None) or self.clock.exchange_ms() or self.clock.wall_ms()
        rec = {"ts": ms, "time": iso(ms), "symbol": self.symbol, "mode": self.mode, **fields}
        line = (json.dumps(rec, default=_json_default, allow_nan=False) + "\n").encode()
        with self.lock:
            fd = self._fds.get(name)
            if fd is None:
                self._lines[name] = self.lines(name)
                fd = self._fds[name] = os.open(self.path(name), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            os.write(fd, line)
            self._lines[name] += 1
        return rec

    def lines(self, name: str) -> int:
        """Records in journal `name` so far (those of earlier runs included)."""
        if name in self._lines:
            return self._lines[name]
        path = self.path(name)
        if not path.is_file():
            return 0
        with path.open("rb") as f:
            return sum(1 for _ in f)

    def event(self, event: str, message: str, level: str = "info", **details: Any) -> None:
        """events_<SYM>.jsonl (what the notifier sends) and the human log."""
        getattr(log, "warning" if level == "warning" else "error" if level in ("error", "critical") else "info")(
            "%s: %s", event, message)
        self.write("events", {"event": event, "level": level, "message": message, **details})

    def close(self) -> None:
        with self.lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


def setup_logging(log_dir: Path, verbose: bool) -> None:
    """Console plus the rotating `logs/live_trading_v2.log`."""
    log_dir.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in (RotatingFileHandler(log_dir / "live_trading_v2.log", maxBytes=20 << 20, backupCount=5,
                                        encoding="utf-8"), logging.StreamHandler(sys.stderr)):
        handler.setFormatter(fmt)
        root.addHandler(handler)


# ---------------------------------------------------------------- state file
def state_path(cfg: GlobalConfig, mode: str) -> Path:
    """`state/bot_state_<SYM>.json`; dry-run keeps its own file so it never touches live state."""
    suffix = "_dry-run" if mode == "dry-run" else ""
    return Path(cfg.live.state_dir) / f"bot_state_{cfg.symbol}{suffix}.json"


def load_state(path: Path, symbol: str) -> dict:
    """The saved state, or {} for a first start. Refusal(2) for an unreadable file, another symbol, or a
    newer version than this engine knows (never guess at a future format)."""
    if not path.exists():
        return {}
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise Refusal(EXIT_CONFIG, f"state file {path} is unreadable ({err}); fix or move it") from None
    if not isinstance(state, dict) or not isinstance(state.get("version"), int):
        raise Refusal(EXIT_CONFIG, f"state file {path} has no integer 'version'")
    if state["version"] > STATE_VERSION:
        raise Refusal(EXIT_CONFIG, f"state file {path} is version {state['version']}, newer than this engine's "
                                   f"{STATE_VERSION}: run the newer engine or move the file")
    if state.get("symbol") not in (None, symbol):
        raise Refusal(EXIT_CONFIG, f"state file {path} belongs to {state.get('symbol')}, not {symbol}")
    return state


def save_state(path: Path, state: dict) -> None:
    atomic_write_text(path, json.dumps({**state, "version": STATE_VERSION}, indent=1, default=_json_default))


# ---------------------------------------------------------------- setup (no network)
@dataclass
class Setup:
    """Everything checked before the first network call."""
    cfg: GlobalConfig
    mode: str
    creds: exc.Credentials | None
    model_dir: Path | None
    edge: bool
    probabilities: pd.DataFrame | None
    state_file: Path
    state: dict
    args: argparse.Namespace


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="PurpleSky live engine (dry-run by default; real money needs keys "
                                            "AND --live).")
    add_config_args(p, ["--symbol", "--data-dir", "--keys-file", "--keys-profile", "--seed"])
    p.add_argument("--model-dir", default="models_v9", help="models_v9, models_v9/SYM or a rank_N folder")
    p.add_argument("--paper", metavar="URL", default="", help="trade on a running paper_exchange.py")
    p.add_argument("--testnet", action="store_true", help="Bybit testnet (needs keys)")
    p.add_argument("--demo", action="store_true", help="Bybit demo trading (needs keys)")
    p.add_argument("--live", action="store_true", help="real money (needs keys and passing startup checks)")
    p.add_argument("--rest-url", default="", help="REST endpoint override")
    p.add_argument("--ws-url", default="", help="WebSocket endpoint override (ws://host:port)")
    p.add_argument("--allow-no-edge", action="store_true", help="trade a model whose verdict is not EDGE")
    p.add_argument("--signal-only", action="store_true", help="predict and journal; no orders")
    p.add_argument("--log-features", action="store_true", help="journal each bar's feature vector")
    p.add_argument("--probabilities", default="", help="CSV/JSONL of bar_time + p_* columns used instead of "
                                                       "the models (scripted tests and parity)")
    p.add_argument("--lockstep", action="store_true", help="paper only: drive the exchange's market clock "
                                                           "(POST /__admin/advance) one step at a time")
    p.add_argument("--lockstep-step", default="", help="market time per lockstep advance (default: one bar)")
    p.add_argument("--max-bars", type=int, default=0, help="stop cleanly after this many closed bars (0 = run)")
    p.add_argument("--keep-orders", action="store_true", help="on stop, leave resting entries on the exchange")
    p.add_argument("--drift-halt", action="store_true", help="pause entries while a drift alert is active")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p.parse_args(argv)


def select_mode(args: argparse.Namespace) -> str:
    """dry-run unless a mode flag says otherwise; two mode flags are refused."""
    chosen = [m for m, on in (("paper", bool(args.paper)), ("testnet", args.testnet), ("demo", args.demo),
                              ("live", args.live)) if on]
    if len(chosen) > 1:
        raise Refusal(EXIT_CONFIG, f"pick one mode: {' and '.join('--' + m for m in chosen)} were both given")
    return chosen[0] if chosen else "dry-run"


def resolve_model_dir(path: str, symbol: str) -> Path | None:
    """A rank folder from `models_v9`, `models_v9/SYM` or `.../rank_N` (default rank_1); None if absent."""
    base = Path(path)
    for cand in (base, base / "rank_1", base / symbol / "rank_1"):
        if (cand / "params.json").is_file():
            return cand
    return None


def load_probabilities(path: str) -> pd.DataFrame:
    """bar_time (ISO or ms) -> p_* columns, from CSV or JSON lines; Refusal(2) naming what is wrong."""
    file = Path(path)
    try:
        frame = pd.read_json(file, lines=True) if file.suffix in (".jsonl", ".json") else pd.read_csv(file)
    except (OSError, ValueError) as err:
        raise Refusal(EXIT_CONFIG, f"--probabilities {file}: unreadable ({err})") from None
    missing = [c for c in ("bar_time",) + PROB_COLUMNS if c not in frame.columns]
    if missing:
        raise Refusal(EXIT_CONFIG, f"--probabilities {file}: missing column(s) {', '.join(missing)}")
    times = frame["bar_time"]
    ms = (times.astype("int64") if pd.api.types.is_numeric_dtype(times)
          else pd.to_datetime(times, utc=True).astype("int64") // 1_000_000)
    return frame.set_index(pd.Index(ms.to_numpy(), name="bar_ms"))[list(PROB_COLUMNS)].astype(float)


def prepare(args: argparse.Namespace, env: dict | None = None) -> Setup:
    """Arguments, config, keys, model and state, all checked before any network access (Refusal(2))."""
    mode = select_mode(args)
    try:
        base = GlobalConfig()
        model_dir = resolve_model_dir(args.model_dir, args.cfg_symbol or base.symbol)
        edge = False
        if model_dir is not None:
            params = json.loads((model_dir / "params.json").read_text(encoding="utf-8"))
            base = GlobalConfig.from_dict(params.get("config") or {})
            edge = bool(params.get("edge", False))
        base.live = LiveSettings()  # a live section inside params.json never changes the mode or endpoints
        cfg = config_from_args(args, base)
    except (ConfigError, ValueError, OSError) as err:
        raise Refusal(EXIT_CONFIG, f"config: {err}") from None
    if any(s.split("=", 1)[0].strip() == "live.mode" for s in args.set_values):
        raise Refusal(EXIT_CONFIG, "the mode comes only from --paper/--testnet/--demo/--live, not --set live.mode")
    live = cfg.live
    live.mode = mode
    live.demo = mode == "demo"
    live.position_mode = "hedge"  # a long and a short can be open together (DESIGN §1)
    live.rest_url = args.paper.rstrip("/") if args.paper else (args.rest_url or live.rest_url)
    live.ws_url = args.ws_url or live.ws_url
    if mode == "paper" and args.cfg_keys_profile is None:
        live.keys_profile = "paper"
    probabilities = load_probabilities(args.probabilities) if args.probabilities else None
    if model_dir is None and probabilities is None:
        raise Refusal(EXIT_CONFIG, f"no model at {args.model_dir} (looked for params.json in it, rank_1 and "
                                   f"{cfg.symbol}/rank_1); train one or pass --probabilities")
    if mode in ("testnet", "demo", "live") and not edge and not args.allow_no_edge:
        raise Refusal(EXIT_CONFIG, f"the model at {model_dir} has no EDGE verdict: refusing {mode} trading "
                                   "(use --allow-no-edge to trade it anyway)")
    if args.lockstep and mode != "paper":
        raise Refusal(EXIT_CONFIG, "--lockstep drives a paper exchange's clock: it needs --paper")
    if args.cfg_data_dir and not Path(args.cfg_data_dir).is_dir():
        raise Refusal(EXIT_CONFIG, f"--data-dir {args.cfg_data_dir}: no such folder (the warm-up reads its files; "
                                   "leave it out to warm up from the engine's own recordings and REST klines)")
    creds = None
    if mode != "dry-run":
        try:
            creds = exc.load_credentials(live.keys_file, live.keys_profile, env)
        except exc.KeysError as err:
            if mode != "paper" or Path(live.keys_file).exists():
                raise Refusal(EXIT_CONFIG, f"keys: {err}") from None
            creds = exc.Credentials("paper", "paper", profile="paper", source="paper default")
    if mode == "live" and creds is not None and creds.testnet:
        raise Refusal(EXIT_CONFIG, f"--live with the testnet key profile {live.keys_profile!r}: pick one")
    path = state_path(cfg, mode)
    return Setup(cfg=cfg, mode=mode, creds=creds, model_dir=model_dir, edge=edge, probabilities=probabilities,
                 state_file=path, state=load_state(path, cfg.symbol), args=args)


# ---------------------------------------------------------------- bars from the stream
class LiveBars:
    """Closed bars from stream messages, by `data_loader.bar_frame` (the research bar rule).

    Trades are kept per bar until it closes; book samples come from the stream's sampling `OrderBook`
    (the same compiled clock as `data_loader.BookReplay`), drained at each close and reduced per bar once
    complete (`orderbook.BookBarSums`, so book columns equal data_loader's bit for bit).
    A bar closes when a message stamped at or after its end arrives, or `tick(now)` passes end + grace.
    Trades stamped inside an already closed bar are counted (`late_trades`, and per bar until `take_late`)
    and logged, never applied: the signals journal and the heartbeat show them."""

    def __init__(self, bar_ms: int, book: ob.OrderBook, lock: threading.RLock, grace_ms: int):
        self.bar_ms, self.book, self.lock, self.grace_ms = bar_ms, book, lock, grace_ms
        self.open_ms: int | None = None       # open of the bar being built
        self.first_ms: int | None = None      # first bar seen live (incomplete: it began before we listened)
        self.trades: list[tuple[int, str, float, float]] = []
        self.book_sums = ob.BookBarSums(bar_ms)
        self.prev_close = math.nan
        self.late_trades = 0
        self.late_by_bar: dict[int, int] = {}   # bar open ms -> late trades not yet journaled
        self.seen_ids: deque[str] = deque(maxlen=20000)
        self._seen_set: set[str] = set()

    def start(self, ms: int) -> None:
        """The first message fixes the first bar; it is incomplete unless we listened from its open on."""
        if self.open_ms is None:
            self.open_ms = ms // self.bar_ms * self.bar_ms
            self.first_ms = self.open_ms if ms > self.open_ms else None

    def seen(self, trade_id: str) -> bool:
        """Whether a trade with this id was handled already (a duplicated push, or one REST also returned)."""
        return trade_id in self._seen_set

    def on_trade(self, ts_ms: int, side: str, size: float, price: float, trade_id: str) -> list[pd.DataFrame]:
        """Add one trade; returns bars this message closed. Duplicated pushes (same id) are dropped."""
        if self.seen(trade_id):
            return []
        if len(self.seen_ids) == self.seen_ids.maxlen:
            self._seen_set.discard(self.seen_ids[0])
        self.seen_ids.append(trade_id)
        self._seen_set.add(trade_id)
        self.start(ts_ms)
        if ts_ms < self.open_ms:
            self.late_trades += 1
            bar = ts_ms // self.bar_ms * self.bar_ms
            self.late_by_bar[bar] = self.late_by_bar.get(bar, 0) + 1
            log.warning("late trade %s stamped %s inside the closed bar %s: counted, not applied (%d so far)",
                        trade_id, iso(ts_ms), iso(ts_ms // self.bar_ms * self.bar_ms), self.late_trades)
            return []
        closed = self.close_until(ts_ms)
        self.trades.append((ts_ms, side, size, price))
        return closed

    def take_late(self) -> dict[str, int]:
        """Late trades per closed bar (ISO bar open -> count) since the last call."""
        out, self.late_by_bar = {iso(ms): n for ms, n in sorted(self.late_by_bar.items())}, {}
        return out

    def on_book_ts(self, ts_ms: int) -> list[pd.DataFrame]:
        self.start(ts_ms)
        return self.close_until(ts_ms)

    def tick(self, now_ms: int) -> list[pd.DataFrame]:
        """Close bars whose end + grace lies before exchange time now_ms."""
        return self.close_until(now_ms - self.grace_ms)

    def close_until(self, ts_ms: int) -> list[pd.DataFrame]:
        out = []
        while self.open_ms is not None and ts_ms >= self.open_ms + self.bar_ms:
            out.append(self._close())
        return out

    def _close(self) -> pd.DataFrame:
        start, end = self.open_ms, self.open_ms + self.bar_ms
        with self.lock:
            self.book.advance(end)
            self.book.flush_samples()
            samples = self.book.drain_samples()
        self.book_sums.add(samples)
        mine = [t for t in self.trades if t[0] < end]
        self.trades = [t for t in self.trades if t[0] >= end]
        trade_parts = []
        if mine:
            ts, side, size, price = zip(*mine)
            trade_parts.append(data_loader.trade_partials(np.array(ts, dtype=float) / 1000.0,
                                                          np.array(side) == "Buy", np.array(size, dtype=float),
                                                          np.array(price, dtype=float), self.bar_ms * 1000))
        bar = data_loader.bar_frame(trade_parts, self.book_sums.take(end), self.bar_ms, (start, start),
                                    self.prev_close)
        self.prev_close = float(bar["close"].iloc[0])
        self.open_ms = end
        bar.attrs["partial"] = start == self.first_ms
        return bar


def restate_on_new_day(book: ob.OrderBook, lock: threading.RLock, ts_ms: int, day: int) -> int:
    """Daily book files (the collector's, Bybit's archive) open each UTC day with a snapshot, which restarts
    the sampling clock's OFI (the first sample after it has no previous top of book). A live stream has no
    such snapshot, so after the first book message of a new day the book is re-applied as a snapshot of
    itself at that message's time: live bars stay equal to data_loader's across midnight. Returns the day."""
    today = ts_ms // 86_400_000
    if today > day >= 0 and book.valid:
        with lock:
            bp, bq, ap, aq = book.top(1 << 62)
            book.apply_snapshot(np.column_stack([bp, bq]), np.column_stack([ap, aq]), book.last_u, ts=ts_ms)
    return max(day, today)


# ---------------------------------------------------------------- warm-up
def empty_bars() -> pd.DataFrame:
    """No bars: BAR_COLUMNS over an empty UTC DatetimeIndex (so time comparisons still work)."""
    return pd.DataFrame(columns=data_loader.BAR_COLUMNS, index=pd.DatetimeIndex([], tz="UTC", name="time"))


def file_bars(cfg: GlobalConfig, folders: list[tuple[Path, int]]) -> pd.DataFrame:
    """Bars from recorded folders (data contract, through data_loader.load_bars and its Parquet cache), each
    as (folder, ms): its bars opening before ms; later folders only fill bars the earlier ones lack."""
    frames = []
    for folder, before_ms in folders:
        if not folder.is_dir():
            continue
        one = GlobalConfig.from_dict(cfg.to_dict())
        one.data.data_dir, one.data.start, one.data.end = str(folder), "", ""
        try:
            bars = data_loader.load_bars(one)
        except data_loader.DataError as err:
            log.warning("warm-up: %s skipped (%s)", folder, err)
            continue
        frames.append(bars[bars.index < pd.Timestamp(before_ms, unit="ms", tz="UTC")])
    if not frames:
        return empty_bars()
    out = frames[0]
    for more in frames[1:]:
        out = pd.concat([out, more[~more.index.isin(out.index)]]).sort_index()
    return out


def kline_bars(rows: list[list[str]], bar_ms: int) -> pd.DataFrame:
    """REST klines [start, o, h, l, c, volume, turnover] as bars whose taker-flow and book columns are
    unknown (taker split set neutral, ob_* NaN); the caller counts them as missing for warm-up."""
    if not rows:
        return empty_bars()
    a = np.array([[float(x) for x in r[:7]] for r in rows])
    a = a[np.argsort(a[:, 0])]
    vol = a[:, 5]
    frame = pd.DataFrame({"open": a[:, 1], "high": a[:, 2], "low": a[:, 3], "close": a[:, 4], "volume": vol,
                          "vol_buy": vol / 2, "vol_sell": vol / 2, "trade_count": (vol > 0).astype(np.int64),
                          "dollar_val": a[:, 6], "vwap": np.where(vol > 0, a[:, 6] / np.maximum(vol, 1e-300), a[:, 4]),
                          "taker_buy_ratio": 0.5, "is_empty": vol <= 0, "is_gap": False},
                         index=pd.DatetimeIndex(pd.to_datetime(a[:, 0].astype(np.int64), unit="ms", utc=True),
                                                name="time"))
    for col in ob.BOOK_BAR_COLUMNS:
        frame[col] = 0 if col == "ob_samples" else np.nan
    return frame[data_loader.BAR_COLUMNS]


def complete_grid(bars: pd.DataFrame, first_ms: int, last_ms: int, bar_ms: int) -> tuple[pd.DataFrame, np.ndarray]:
    """Reindex to a continuous grid [first_ms, last_ms]; returns (bars, missing mask) where bars nobody had
    carry the last close with zero volume."""
    idx = pd.DatetimeIndex(pd.to_datetime(np.arange(first_ms, last_ms + 1, bar_ms), unit="ms", utc=True),
                           name="time")
    out = bars.reindex(idx)
    missing = out["close"].isna().to_numpy()
    close = out["close"].ffill().bfill()
    for col in ("open", "high", "low", "close", "vwap"):
        out[col] = out[col].where(~missing, close)
    for col in ("volume", "vol_buy", "vol_sell", "dollar_val", "trade_count", "ob_samples"):
        out[col] = out[col].fillna(0)
    out["taker_buy_ratio"] = out["taker_buy_ratio"].fillna(0.5)
    out["is_empty"] = out["is_empty"].where(~missing, True).astype(bool)
    out["is_gap"] = out["is_gap"].where(~missing, False).astype(bool)
    out["trade_count"] = out["trade_count"].astype(np.int64)
    out["ob_samples"] = out["ob_samples"].astype(np.int64)
    return out, missing


def extend_window(window: pd.DataFrame, bar: pd.DataFrame, keep: int) -> pd.DataFrame:
    """A new frame: the last `keep` bars of `window` + the one-row `bar` (a bar of the same time as one in
    the window replaces it). The usual case, a bar after the window's last, takes one copy instead of three."""
    if not len(window):
        return bar.copy()
    if bar.index[0] > window.index[-1] and window.index.is_monotonic_increasing:
        return pd.concat([window.iloc[len(window) - keep + 1:] if len(window) >= keep else window, bar])
    joined = pd.concat([window, bar]).iloc[-keep:]
    return joined[~joined.index.duplicated(keep="last")].copy()


# ---------------------------------------------------------------- drift (PSI against training)
def drift_levels(report: dict[str, float], limits: dict[str, float], floor: float) -> dict[str, float]:
    """feature -> the PSI above which it counts as drifted: its chance level from training (models.psi_limits)
    when the model has one, never below `floor` (live.drift_psi_alert)."""
    return {name: max(floor, limits.get(name, 0.0)) for name in report}


def worst_drift(report: dict[str, float], levels: dict[str, float]) -> tuple[str, float] | None:
    """The feature furthest above its level (PSI / level), or None when every feature is within its level."""
    over = [(name, value) for name, value in report.items() if value > levels[name]]
    return max(over, key=lambda kv: kv[1] / levels[kv[0]], default=None)


def drift_report(feats: pd.DataFrame, quantiles: dict[str, list[float]], window: int) -> dict[str, float]:
    """feature -> PSI over the last `window` bars, worst first (features without training quantiles skipped)."""
    names = [n for n in quantiles if n in feats.columns]
    tail = feats.iloc[-window:][names].to_numpy(np.float64)   # one block, not a Series per feature
    out = {n: psi(tail[:, j], quantiles[n]) for j, n in enumerate(names)}
    return dict(sorted(((k, v) for k, v in out.items() if math.isfinite(v)), key=lambda kv: -kv[1]))


# ---------------------------------------------------------------- dry-run venue (matching.py in process)
SIM_METHODS = {"place_order": "place_order", "cancel_order": "cancel_order", "cancel_all_orders": "cancel_all",
               "get_open_orders": "open_orders", "get_order_history": "order_history",
               "get_positions": "position_list", "switch_position_mode": "switch_mode",
               "set_leverage": "set_leverage", "set_trading_stop": "trading_stop",
               "get_wallet_balance": "wallet_balance", "get_executions": "execution_list",
               "get_closed_pnl": "closed_pnl_list"}


class SimHTTP:
    """pybit HTTP look-alike for dry-run: account and order calls go to an in-process
    `matching.MatchingEngine` (real simulated fills, fees, positions), market data to the real endpoint.
    So dry-run runs the same ExchangeClient code paths as paper and live."""

    def __init__(self, public: Any, engine: Any, lock: threading.RLock):
        self._public, self.engine, self.lock = public, engine, lock

    def __getattr__(self, name: str) -> Any:
        target = SIM_METHODS.get(name)
        if target is None:
            return getattr(self._public, name)

        def call(**params: Any) -> dict:
            from matching import ExchangeError as SimError
            from pybit.exceptions import InvalidRequestError
            with self.lock:
                try:
                    result = getattr(self.engine, target)(dict(params))
                except SimError as err:
                    raise InvalidRequestError(request=name, message=err.msg, status_code=err.code, time="",
                                              resp_headers={}) from None
            return {"retCode": 0, "retMsg": "OK", "result": result or {}, "time": self.engine.now_ms}
        return call


# ---------------------------------------------------------------- the engine
@dataclass
class Health:
    """What gates entries besides the strategy, and what the heartbeat reports."""
    reconciled: bool = False
    api_errors: int = 0
    external: list[str] = field(default_factory=list)
    drift: dict[str, float] = field(default_factory=dict)
    drift_levels: dict[str, float] = field(default_factory=dict)
    drift_alert: bool = False
    data_lag_s: float = math.inf
    unprotected: int = 0


class Engine:
    """One symbol's live loop. `run()` returns the process exit code."""

    def __init__(self, setup: Setup, clock: Clock | None = None):
        self.setup, self.cfg, self.mode, self.args = setup, setup.cfg, setup.mode, setup.args
        self.symbol = self.cfg.symbol
        self.clock = clock or Clock(seed=self.cfg.seed, market=self.mode == "paper", lockstep=self.args.lockstep)
        self.journals = Journals(Path(self.cfg.live.log_dir), self.symbol, self.mode, self.clock)
        self.bar_ms = timeframe_seconds(self.cfg.data.timeframe) * 1000
        self.health = Health()
        self.phase = "starting"
        self.stop_event = threading.Event()
        self.stop_reason = ""          # why the engine stopped (signal, --max-bars, refusal, crash): the last heartbeat
        self.events: queue.Queue = queue.Queue()
        self.state = dict(setup.state)
        self.links: dict[str, str] = dict(self.state.get("links", {}))   # wire orderLinkId -> request id
        self.window = empty_bars()
        self.missing_until = 0         # bar number before which the window holds bars with unknown columns
        self.bars_closed = 0
        self.warm = False               # the last closed bar's features and model were usable
        self.last_stop_check = 0
        self.last_price = math.nan
        self.recv = {"book": 0, "trade": 0, "private": 0}
        self._due_bars: list[pd.DataFrame] = []                # lockstep: closed, decided at the step's end
        self._held_private: list[tuple[int, str, list]] = []   # lockstep: (push ms, topic, rows) not yet applied
        self.quantiles: dict[str, list[float]] = {}
        self.psi_limits: dict[str, float] = {}   # feature -> chance PSI of a drift window (models.psi_limits)
        self.bundle = None
        self.client: exc.ExchangeClient | None = None
        self.market: exc.MarketStream | None = None
        self.private: exc.PrivateStream | None = None
        self.watchdog: exc.StreamWatchdog | None = None
        self.sim = None
        self.sim_lock = threading.RLock()
        self._exec: Any = None
        self._state_dirty = False
        self._first_trades_whole = False   # recent trades reached back to the first bar's open (_seed_recent_trades)
        self._deferred: list | None = None                      # order requests held until a batch of events is in
        self._admin_http: Any = None
        self._admin_lock = threading.Lock()   # one admin request at a time on the kept-alive connection
        self._advancer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lockstep")  # see _advance
        self._last_beat = -math.inf
        self._beat_positions = -1      # open_positions in the heartbeat file as last written
        self.window_bars = max(self.cfg.live.window_bars, feature_engine.warmup_bars(self.cfg) + WARM_MARGIN_BARS)

    # ------------------------------------------------------------ lifecycle
    def run(self) -> int:
        """Startup, loop, shutdown; the exit code of DESIGN §3. One engine per state file: a second one (the
        same symbol and state folder) is refused before it writes anything. The last heartbeat carries the
        exit code and why (`exit_code`, `stop_reason`); an exception escaping is a crash, exit code 1."""
        lock_path = self.setup.state_file.with_suffix(".lock")
        self._lock, holder = acquire_lock(lock_path)
        if self._lock is None:
            log.error("refused: another engine (pid %s) holds %s and trades this state; stop it first", holder,
                      lock_path)
            return EXIT_CONFIG
        self._install_signals()
        code = EXIT_CRASH
        try:
            code = self._session()
            return code
        except BaseException as err:
            self.stop_reason = f"crash: {type(err).__name__}: {err}"[:200]
            raise
        finally:
            self._shutdown(code)
            self._lock.close()   # the state is saved: another engine may take it over

    def _session(self) -> int:
        """Startup checks, reconciliation and the trading loop; the exit code (refusals journalled)."""
        self.beat("starting")
        self.journals.event("startup", f"{self.symbol} {self.mode} engine starting (model "
                                       f"{self.setup.model_dir or 'scripted probabilities'})",
                            model=str(self.setup.model_dir))
        if self.mode == "dry-run" and not self.args.signal_only:
            log.info("dry-run: orders are simulated in process. To trade on Bybit add --keys-file keys.json and "
                     "--testnet / --demo, or --live for real money")
        try:
            self._load_model()
            self._connect()
            self.beat("starting")
            self._warm_up()
            self.beat("starting")
            self._start_streams()
            self.beat("reconciling")
            self._exec = None if self.args.signal_only else self._load_execution()
            if self.args.signal_only:
                self.health.reconciled = True
            elif not self.reconcile("startup"):
                return self._refuse(EXIT_RECONCILE, "reconcile_failed", "startup reconciliation could not complete")
            self.beat("trading")
            self._loop()
            return EXIT_OK
        except Refusal as err:
            return self._refuse(err.code, "error", str(err))
        except (exc.StartupCheckError, exc.AuthenticationError) as err:
            return self._refuse(EXIT_STARTUP, "error", f"startup checks refused: {err}")
        except exc.ExchangeError as err:
            if self.health.reconciled:
                raise
            where = self.cfg.live.rest_url or "the mode's default endpoint"
            if isinstance(err, exc.RejectedError):
                return self._refuse(EXIT_RECONCILE, "reconcile_failed",
                                    f"startup: the exchange at {where} refused a startup request: {err}")
            return self._refuse(EXIT_UNREACHABLE, "error", f"startup: the exchange at {where} could not be reached: "
                                                           f"{err} (exit {EXIT_UNREACHABLE}: the watchdog restarts "
                                                           f"with backoff)")

    def _refuse(self, code: int, event: str, message: str) -> int:
        """Journal why the engine will not go on (critical) and keep it as the stop reason; returns `code`."""
        self.journals.event(event, message, "critical")
        self.stop_reason = message
        return code

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        names = ["SIGINT", "SIGTERM", "SIGBREAK"]
        for name in names:
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), lambda signum, _frame: self.request_stop(signum))

    def request_stop(self, signum: int = 0) -> None:
        log.info("stop requested (signal %s): no new orders, saving state", signum)
        self.stop_reason = f"signal {signal.Signals(signum).name}" if signum else "stop requested"
        self.stop_event.set()

    def _shutdown(self, exit_code: int = EXIT_OK) -> None:
        """Cancel resting entries (unless --keep-orders), save, close; the last heartbeat says how it ended."""
        self.beat("stopping")
        try:
            if self.client is not None and self.health.reconciled and not self.args.keep_orders:
                self._cancel_resting_entries()
        except exc.ExchangeError as err:
            self.journals.event("error", f"cancelling resting entries on stop failed: {err}", "error")
        self._save()
        for stream in (self.watchdog, self.market, self.private):
            if stream is not None:
                (stream.stop if stream is self.watchdog else stream.close)()
        if getattr(self, "_recorder", None) is not None:
            self._recorder.close()
        self._advancer.shutdown(wait=False)
        self.journals.event("shutdown", f"{self.symbol} engine stopped" if exit_code == 0 else   # a failed exit
                            f"{self.symbol} engine exited with code {exit_code}: {self.stop_reason}",  # is an alarm
                            "info" if exit_code == 0 else "error", bars=self.bars_closed,
                            late_trades=self._bars.late_trades if hasattr(self, "_bars") else 0,
                            exit_code=exit_code, reason=self.stop_reason)
        self.stop_event.set()
        self._write_heartbeat({"exit_code": exit_code, "stop_reason": self.stop_reason})
        self.journals.close()

    # ------------------------------------------------------------ heartbeat
    def beat(self, phase: str | None = None) -> None:
        """Rewrite the heartbeat from the main thread (the watchdog reads its age as main-loop progress):
        on every phase change and at least every HEARTBEAT_S while the loop runs."""
        if phase is not None:
            self.phase = phase
        now = self.clock.monotonic()
        if phase is not None or now - self._last_beat >= HEARTBEAT_S:
            self._last_beat = now
            self._write_heartbeat()

    def _write_heartbeat(self, ending: dict | None = None) -> None:
        """The heartbeat file (DESIGN §3); `ending` (`exit_code`, `stop_reason`) only in the last one, as it exits."""
        positions = [p for p in self._exchange_positions().values() if p]
        self._beat_positions = len(positions)
        atomic_write_text(Path(self.cfg.live.state_dir) / f"heartbeat_{self.symbol}.json", json.dumps({
            "ts": self.clock.wall_ms(), "pid": os.getpid(), "phase": self.phase, "symbol": self.symbol,
            "mode": self.mode, "open_positions": len(positions), "last_stop_check": self.last_stop_check,
            "model": str(self.setup.model_dir or ""), "bars": self.bars_closed,
            "late_trades": self._bars.late_trades if hasattr(self, "_bars") else 0, **(ending or {})}))

    def _exchange_positions(self) -> dict[int, float]:
        return dict(self.state.get("exchange_positions", {}))

    # ------------------------------------------------------------ startup
    def _load_model(self) -> None:
        """ModelBundle (unless --probabilities) and the training quantiles the drift monitor compares with."""
        folder = self.setup.model_dir
        if folder is None:
            return
        path = folder / "features.json"
        try:
            meta = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
            if not isinstance(meta, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as err:   # a refusal (exit 2), not a crash the watchdog would restart
            raise Refusal(EXIT_CONFIG, f"model: {path}: not a readable model bundle ({err})") from None
        self.quantiles = dict(meta.get("quantiles") or {})
        window = self.cfg.live.drift_window
        if int(meta.get("psi_window") or 0) == window:
            self.psi_limits = {k: float(v) for k, v in (meta.get("psi_limits") or {}).items()}
        elif self.quantiles:
            log.info("drift: the model has no chance levels for %d-bar windows (trained for %s): every feature "
                     "alerts above PSI %g", window, meta.get("psi_window") or "none", self.cfg.live.drift_psi_alert)
        if self.setup.probabilities is None:
            from models import ModelBundle, ModelFileError
            try:
                self.bundle = ModelBundle.load(folder, feature_engine.feature_names(self.cfg))
            except ModelFileError as err:
                raise Refusal(EXIT_CONFIG, f"model: {err}") from None
        self.journals.event("model_loaded", f"model {folder} ({'EDGE' if self.setup.edge else 'no edge'})",
                            model=str(folder), edge=self.setup.edge)

    def _connect(self) -> None:
        """REST client and startup checks (clock, instrument, key permissions, hedge mode)."""
        self.client = exc.ExchangeClient(self.cfg, self.setup.creds)
        trading = self.mode != "dry-run" and not self.args.signal_only
        report = self.client.startup_checks(trading=trading)
        self.clock.offset_ms = report.time_offset_ms
        if self.mode == "dry-run":
            from matching import Instrument, MatchingEngine
            rules = report.rules
            inst = Instrument(self.symbol, rules.tick_size, rules.qty_step, rules.min_qty, rules.min_notional)
            s = self.cfg.venue
            self.sim = MatchingEngine(inst, balance=s.initial_equity, maker_fee=s.maker_fee, taker_fee=s.taker_fee,
                                      fill_rule=s.fill_rule, funding_rate=s.funding_rate_8h)
            self.client.http = SimHTTP(self.client.http, self.sim, self.sim_lock)
            self.client.set_position_mode("hedge")
        server_ms = int(self.client.request("get_server_time").get("time") or 0)
        self.clock.saw(server_ms if self.mode != "paper" else 0)

    def _warm_up(self) -> None:
        """Window of history before the first live bar: files, own recordings, then REST klines."""
        now = self._market_now()
        first_live = now // self.bar_ms * self.bar_ms
        first = first_live - self.window_bars * self.bar_ms
        folders = [(Path(self.args.cfg_data_dir), first_live)] if self.args.cfg_data_dir else []
        own_until = int(self.state.get("recorded_until_ms") or first_live)   # the bar it stopped in is partial
        folders.append((self.own_recordings(), min(first_live, own_until)))
        files = file_bars(self.cfg, folders)
        files = files[files.index >= pd.Timestamp(first, unit="ms", tz="UTC")]
        have_until = int(files.index[-1].value // 1_000_000) + self.bar_ms if len(files) else first
        klines = self._klines(max(have_until, first), first_live - self.bar_ms) if have_until < first_live else []
        parts = [part for part in (files, kline_bars(klines, self.bar_ms)) if len(part)]   # no empty frame's dtypes
        merged = pd.concat(parts) if len(parts) > 1 else (parts[0] if parts else files)
        merged = merged[~merged.index.duplicated(keep="first")].sort_index()
        start = int(merged.index[0].value // 1_000_000) if len(merged) else first_live - self.bar_ms
        grid, missing = complete_grid(merged, start, first_live - self.bar_ms, self.bar_ms)
        from_klines = ~missing & ~grid.index.isin(files.index)
        self.window = grid
        self.missing_until = 0
        for unknown, wait in ((missing, 1 + feature_engine.warmup_bars(self.cfg)),   # no data: every feature
                              (from_klines, feature_engine.kline_warmup_bars(self.cfg))):   # book and taker flow
            if unknown.any():
                last = int(grid.index[np.flatnonzero(unknown)[-1]].value // 1_000_000) // self.bar_ms
                self.missing_until = max(self.missing_until, last + wait)
        partial, wait = self.state.get("partial_bar") or (-1, 0)   # the last run's first bar, recorded partial
        if first <= partial < first_live:
            self.missing_until = max(self.missing_until, partial // self.bar_ms + wait)
        self._load_kernels()
        history_warm = start // self.bar_ms + feature_engine.warmup_bars(self.cfg)   # is_warm's rule on short history
        wait = max(0, max(self.missing_until, history_warm) - first_live // self.bar_ms)
        log.info("warm-up: %d bars from files, %d from klines; %s", len(files), len(klines),
                 "warm now" if wait == 0 else f"warm in {wait} bars ({wait * self.bar_ms / 60000:.0f} min)")

    def _load_kernels(self) -> None:
        """The book path, features and probabilities once, before any stream starts: the first live bar does not
        pay for loading the compiled kernels and LightGBM (about 0.7 s), nor the stream thread (see
        orderbook.load_kernels); results unused."""
        ob.load_kernels(self.cfg.data.ob_levels, self.bar_ms)
        feats = feature_engine.compute_features(self.window, self.cfg)
        if self.bundle is not None and len(feats):
            self.bundle.predict(feats.iloc[-1:])

    def own_recordings(self) -> Path:
        return Path("data") / f"{self.symbol}_Bybit"

    def _klines(self, start_ms: int, end_ms: int) -> list[list[str]]:
        """REST klines [start_ms, end_ms] (bar opens), KLINE_PAGE at a time."""
        interval = str(self.bar_ms // 60000) if self.bar_ms < 86_400_000 else "D"
        rows: list[list[str]] = []
        cursor = start_ms
        while cursor <= end_ms:
            env = self.client.request("get_kline", {"category": "linear", "symbol": self.symbol,
                                                    "interval": interval, "start": cursor,
                                                    "end": min(end_ms, cursor + (KLINE_PAGE - 1) * self.bar_ms),
                                                    "limit": KLINE_PAGE})
            got = (env.get("result") or {}).get("list") or []
            rows.extend(r for r in got if start_ms <= int(r[0]) <= end_ms)
            cursor += KLINE_PAGE * self.bar_ms
        return rows

    def _market_now(self) -> int:
        """Exchange time now: the paper exchange's market clock, else server time."""
        if self.mode == "paper":
            st = self._admin("state")
            self.clock.saw(int(st["market_ms"]))
            return int(st["market_ms"])
        return self.clock.exchange_ms()

    def _admin(self, action: str, body: dict | None = None) -> dict:
        """The paper exchange's test control (state, lockstep advance), on one kept-alive connection."""
        with self._admin_lock:
            if self._admin_http is None:
                import requests
                self._admin_http = requests.Session()
                self._admin_http.trust_env = False   # 127.0.0.1: no proxy from the environment
            resp = self._admin_http.post(f"{self.cfg.live.rest_url}/__admin/{action}", json=body or {}, timeout=60)
            resp.raise_for_status()
            return resp.json()

    def _start_streams(self) -> None:
        self._open_market(self.client.endpoints)
        engine = self
        self.market.start()
        streams: list = [self.market]
        if self.mode != "dry-run":
            class Private(exc.PrivateStream):
                frame_ms = 0   # creationTime (market ms) of the frame being handled

                def _on_topic(self, msg: dict) -> None:
                    self.frame_ms = int(msg.get("creationTime") or 0)
                    super()._on_topic(msg)
                    engine.events.put(("frame",))   # after its rows: lockstep counts frames processed

            self.private = Private(self.client.endpoints, self.setup.creds,
                                   stale_after=parse_duration(self.cfg.live.ws_stale_after),
                                   on_message=lambda topic, rows: self.events.put(
                                       ("private", topic, rows, self.private.frame_ms)))
            self.private.start()
            streams.append(self.private)
        wait = parse_duration(self.cfg.live.streams_ready_within)
        deadline = self.clock.monotonic() + wait
        while not all(s.ready for s in streams) and self.clock.monotonic() < deadline:
            self.clock.sleep(0.05)
        late = " and ".join("public" if s is self.market else "private" for s in streams if not s.ready)
        if late and self.args.lockstep:
            raise Refusal(EXIT_STARTUP, f"lockstep: {late} stream subscriptions not confirmed within {wait:g} s "
                                        "(live.streams_ready_within); what the exchange pushed before would be lost")
        if late:
            self.journals.event("error", f"{late} stream subscriptions not confirmed within {wait:g} s: the stream "
                                         "watchdog rebuilds them; bars begun before they listen count as missing",
                                "warning")
        self.watchdog = exc.StreamWatchdog(streams).start()
        self._seed_recent_trades()

    def _seed_recent_trades(self) -> None:
        """The bar in progress began before the stream listened: its earlier trades come from REST recent
        trades (Bybit keeps the latest 1000), handled before any queued push (a trade in both is dropped by
        its id). Its trade columns are then whole when the answer reaches back to the bar's open: only the
        book features wait for it (feature_engine.book_warmup_bars); otherwise every feature does."""
        open_ms = self.clock.exchange_ms() // self.bar_ms * self.bar_ms
        try:
            env = self.client.request("get_public_trade_history", {"category": "linear", "symbol": self.symbol,
                                                                   "limit": RECENT_TRADES_LIMIT})
        except exc.ExchangeError as err:
            log.warning("warm-up: recent trades unavailable (%s); the first bar keeps only what the stream sends",
                        err)
            return
        newest_first = (env.get("result") or {}).get("list") or []
        self._first_trades_whole = len(newest_first) < RECENT_TRADES_LIMIT or int(newest_first[-1]["time"]) < open_ms
        rows = [{"T": int(r["time"]), "S": r["side"], "v": r["size"], "p": r["price"], "i": str(r["execId"])}
                for r in reversed(newest_first) if int(r["time"]) >= open_ms]
        rows.sort(key=lambda r: r["T"])   # stable: the exchange's order within one millisecond is kept
        log.info("warm-up: %d recent trades since %s seed the bar in progress", len(rows), iso(open_ms))
        if rows:
            self._handle(("trades", rows))

    def _open_market(self, endpoints: exc.Endpoints) -> None:
        """The public stream (not yet connected), its sampling book, the bar builder and the recorder: every
        book and trade message the stream handles is queued for `_handle`, in arrival order."""
        depth = min([d for d in BYBIT_DEPTHS if d >= self.cfg.data.ob_levels] or [BYBIT_DEPTHS[-1]])
        engine = self

        class Stream(exc.MarketStream):
            book_day = -1   # UTC day of the last book message

            def _on_topic(self, msg: dict) -> None:
                super()._on_topic(msg)
                if msg.get("topic") == self.book_topic:
                    ts = int(msg.get("ts") or 0)
                    self.book_day = restate_on_new_day(self.book, self.lock, ts, self.book_day)
                    engine.events.put(("book", ts, msg))

        self.market = Stream(endpoints, self.symbol, depth=depth,
                             stale_after=parse_duration(self.cfg.live.ws_stale_after),
                             on_trades=lambda rows: self.events.put(("trades", rows)))
        self.market.book = ob.OrderBook(capacity=4096, sample_interval_ms=int(
            parse_duration(self.cfg.data.book_sample_interval) * 1000), levels=self.cfg.data.ob_levels)
        self._bars = LiveBars(self.bar_ms, self.market.book, self.market.lock,
                              0 if self.args.lockstep else int(parse_duration(self.cfg.live.bar_close_grace) * 1000))
        if len(self.window):   # a first live bar without trades is flat at the last close, as in data_loader
            self._bars.prev_close = float(self.window["close"].iloc[-1])
        self._recorder = self._make_recorder(depth)

    def _make_recorder(self, depth: int) -> Any:
        """The collector's file writer for what the engine receives (data/<SYM>_Bybit)."""
        from data_collector import BybitSymbol, CollectorSettings
        return BybitSymbol(CollectorSettings([self.symbol], "bybit", Path("data")), self.symbol, depth)

    # ------------------------------------------------------------ main loop
    def _loop(self) -> None:
        reconcile_every = self._every(parse_duration(self.cfg.live.reconcile_interval))
        next_reconcile = self.clock.schedule_s() + reconcile_every
        equity_every = self._every(parse_duration(self.cfg.live.heartbeat_interval))
        next_equity = next_stop_check = 0.0
        while not self.stop_event.is_set():
            phase = ("settling" if self.state.get("unsettled") else
                     "halted" if self.state.get("halted_day") == self._day() else "trading")
            self.beat(phase if phase != self.phase else None)   # a pass that changes nothing: the 5 s period
            if self.args.lockstep:
                if not self._lockstep_step():
                    self.stop_reason = "the paper exchange's data ended"
                    break
            else:
                self._drain(timeout=0.2)
                for bar in self._bars.tick(self.clock.exchange_ms()):
                    self.on_bar(bar)
            now = self.clock.schedule_s()
            if self._exec is not None:
                if self.state.get("unsettled"):
                    self._settle_unknown()
                if now >= next_stop_check:
                    self._guard_stops()
                    next_stop_check = now + self._every(1.0)
                rebuilt = self._private_rebuilt()
                if now >= next_reconcile or rebuilt:
                    self.reconcile("after a private-stream rebuild" if rebuilt else "periodic")
                    next_reconcile = now + reconcile_every
            if now >= next_equity:
                self._journal_equity()
                next_equity = now + equity_every
            if self._state_dirty and not self.args.lockstep:   # lockstep: written during the next advance
                self._save()
            if self.args.max_bars and self.bars_closed >= self.args.max_bars:
                self.stop_reason = f"--max-bars {self.args.max_bars} reached"
                log.info("%s", self.stop_reason)
                break

    def _stream_generations(self) -> tuple:
        return tuple((s.rebuilds, s.reconnects) for s in (self.market, self.private) if s is not None)

    def _private_rebuilt(self) -> bool:
        """Whether the private stream was rebuilt or reconnected since the last look (pushes may be lost)."""
        if self.private is None:
            return False
        count = self.private.rebuilds + self.private.reconnects
        changed = count != self.state.get("_private_generation", count)
        self.state["_private_generation"] = count
        if changed:
            self.health.reconciled = False
        return changed

    def _forget_links(self, open_links: set[str]) -> None:
        """Keep the orderLinkIds still needed (open on the exchange now, tracked by the lifecycle, or of unknown
        outcome): the state file, rewritten on every event, then stays as small on day 100 as on day 1."""
        keep = open_links | set(self._exec.orders) | set(self.state.get("unsettled", {}))
        self.links = {k: v for k, v in self.links.items() if k in keep}

    def _every(self, seconds: float) -> float:
        """A periodic job's interval on `Clock.schedule_s`: `seconds`, and in lockstep at least
        LOCKSTEP_PERIOD_BARS bars of market time. There the exchange waits for the engine and every push is
        handled before the next step, so the stop guard, the equity record and reconciliation find only what a
        fault made, while their REST reads cost more than a bar's decision."""
        return max(seconds, LOCKSTEP_PERIOD_BARS * self.bar_ms / 1000) if self.args.lockstep else seconds

    def _guard_stops(self) -> None:
        """Check stop coverage whenever a position leg is open (each fill is covered within about a second)."""
        if any(v > 0 for v in self._exchange_positions().values()):
            try:
                self.check_stops()
            except exc.ExchangeError as err:
                log.warning("stop check failed: %s", err)

    def _lockstep_step(self) -> bool:
        """Advance the paper exchange one step, stopping at each private event (a fill, a triggered stop) so it
        is handled, and its follow-up orders sent, at the market time it happened, as in real time; after each
        advance wait until everything it pushed has been processed. False at the end of its data."""
        step = parse_duration(self.args.lockstep_step) if self.args.lockstep_step else self.bar_ms / 1000
        target = self.clock.exchange_ms() + int(round(step * 1000))
        while True:
            st = self._advance({"until_ms": target, "stop_at_private": True})
            self._await_pushes(st)
            self.clock.saw(int(st["market_ms"]))
            self._decide_in_market_order(self._bars.tick(int(st["market_ms"])))
            if int(st["market_ms"]) >= target or (st.get("exhausted") and st.get("next_ms") is None) \
                    or self.stop_event.is_set():
                return not (st.get("exhausted") and st.get("next_ms") is None)

    def _advance(self, body: dict) -> dict:
        """One lockstep advance, handling its pushes while the exchange is still making them (the two processes
        then share the machine's cores instead of taking turns). Every order those pushes call for is held
        until the advance has returned, so the exchange receives it at the market time the step stopped, as if
        the pushes had been handled afterwards: the result does not depend on how far the handling got."""
        step = self._advancer.submit(self._admin, "advance", body)
        step.add_done_callback(lambda _: self.events.put(("advanced",)))   # wakes the drain below
        if self._state_dirty:   # the loop pass's state, written while the exchange works rather than before
            self._save()
        with self._events_first():
            while not step.done():
                self.beat()
                self._drain(timeout=1.0)
        return step.result()

    def _await_pushes(self, st: dict) -> None:
        """Handle stream messages until every push an advance reported (`last_push_ts`, `private_sent`) is in."""
        pushed = st.get("last_push_ts", {})
        want_book = max([v for k, v in pushed.items() if k.startswith("orderbook.")] or [0])
        want_trade = pushed.get(f"publicTrade.{self.symbol}", 0)
        deadline = self.clock.monotonic() + 20
        links = self._stream_generations()
        while self.clock.monotonic() < deadline and not self.stop_event.is_set():
            if (self.recv["book"] >= want_book and self.recv["trade"] >= want_trade
                    and (self.private is None or self.recv["private"] >= st.get("private_sent", 0))):
                break
            self.beat()
            if self._stream_generations() != links:
                log.warning("lockstep: a stream reconnected; what it missed is settled by reconciliation")
                break
            self._drain(timeout=0.05)
        self._drain(timeout=0)

    def _decide_in_market_order(self, ticked: list[pd.DataFrame]) -> None:
        """Lockstep, once the step's pushes are in: each closed bar is decided after the held private frames
        pushed before its end and before those pushed later (the backtest rule: fills inside bar t are known
        at bar t's close), whatever order the public and private sockets delivered them in."""
        bars, self._due_bars = self._due_bars + ticked, []
        held, self._held_private = self._held_private, []
        i = 0
        for bar in bars:
            end = int(bar.index[0].value // 1_000_000) + self.bar_ms
            with self._events_first():
                while i < len(held) and held[i][0] < end:
                    self._on_private(held[i][1], held[i][2])
                    i += 1
            self.on_bar(bar)
        with self._events_first():
            for _, topic, rows in held[i:]:
                self._on_private(topic, rows)

    def _closed(self, bars: list[pd.DataFrame]) -> None:
        """Bars a public message closed: decided now, or in lockstep at the step's end in market order."""
        if self.args.lockstep:
            self._due_bars.extend(bars)
            return
        for bar in bars:
            self.on_bar(bar)

    def _drain(self, timeout: float) -> None:
        """Handle queued stream messages in arrival order; the orders they call for go out once all are in."""
        try:
            item = self.events.get(timeout=timeout) if timeout > 0 else self.events.get_nowait()
        except queue.Empty:
            return
        with self._events_first():
            while True:
                self._handle(item)
                try:
                    item = self.events.get_nowait()
                except queue.Empty:
                    return

    @contextlib.contextmanager
    def _events_first(self) -> Iterator[None]:
        """Orders requested while a batch of received events is applied are sent after the whole batch: the
        lifecycle acts on everything already known. (An entry's fill and the fill of the stop the exchange
        attached to it can arrive together; answered one by one, the entry's own stop is refused because price
        is beyond it and the market exit that follows closes another position's size on the shared hedge leg.)"""
        if self._deferred is not None:
            yield
            return
        self._deferred = []
        try:
            yield
        finally:
            requests, self._deferred = self._deferred, None
            self.send(requests)

    def _handle(self, item: tuple) -> None:
        kind = item[0]
        if kind == "trades":
            low, high = math.inf, -math.inf
            for row in item[1]:
                if self._bars.seen(str(row["i"])):   # never recorded, simulated or counted twice
                    self._recorder.integrity.bump(utc_day(int(row["T"])), "duplicate_trades")
                    continue
                ts = int(row["T"])
                self.recv["trade"] = max(self.recv["trade"], ts)
                self.clock.saw(ts)
                self.last_price = float(row["p"])
                low, high = min(low, self.last_price), max(high, self.last_price)
                self._record_trade(row)
                if self.sim is not None:
                    with self.sim_lock:
                        self.sim.on_trade(float(row["p"]), float(row["v"]), row["S"], ts)
                self._closed(self._bars.on_trade(ts, row["S"], float(row["v"]), float(row["p"]), str(row["i"])))
            self._after_market_update(low, high)
        elif kind == "book":
            ts, msg = item[1], item[2]
            self.recv["book"] = max(self.recv["book"], ts)
            self.clock.saw(ts)
            self._recorder_book(msg)
            if self.sim is not None:
                with self.sim_lock, self.market.lock:
                    self.sim.on_book(self.market.book, ts)
            self._closed(self._bars.on_book_ts(ts))
        elif kind == "private" and self.args.lockstep:
            self._held_private.append((item[3], item[1], item[2]))
        elif kind == "private":
            self._on_private(item[1], item[2])
        elif kind == "frame":
            self.recv["private"] += 1
        elif kind != "advanced":
            raise ValueError(f"unknown event {kind!r}")

    def _after_market_update(self, low: float, high: float) -> None:
        """Simulated fills (dry-run) and the intrabar kill-switch check on the prices of the trades just handled
        (one publicTrade push may hold several: a sweep's worst price need not be its last)."""
        if self.sim is not None:
            with self.sim_lock:
                events = self.sim.drain()
            for topic, record in events:
                self._on_private(topic, [record])
        self._check_kill_switch(low, high)

    def _record_trade(self, row: dict) -> None:
        try:
            self._recorder.write_trade(int(row["T"]), row["S"], str(row["v"]), str(row["p"]), str(row["i"]),
                                       int(row.get("RPI") in (True, 1, "1", "true")), row.get("L") or "ZeroPlusTick")
        except (OSError, KeyError, ValueError) as err:
            log.warning("recording trade failed: %s", err)

    def _recorder_book(self, msg: dict) -> None:
        try:
            self._recorder.on_book(msg, orjson.dumps(msg))
        except (OSError, KeyError, ValueError) as err:
            log.warning("recording book message failed: %s", err)

    # ------------------------------------------------------------ bar close
    def on_bar(self, bar: pd.DataFrame) -> None:
        """One closed bar: window, features, probabilities, decisions, orders, signals journal."""
        t0 = time.perf_counter()
        bar_ms = int(bar.index[0].value // 1_000_000)
        number = bar_ms // self.bar_ms
        if bar.attrs.get("partial") and bar.index[0] in self.window.index:
            return  # began before we listened; the warm-up already holds it complete
        self.bars_closed += 1
        if len(self.window) and bar.index[0] - self.window.index[-1] > pd.Timedelta(milliseconds=self.bar_ms):
            log.warning("no bars between %s and %s (stream gap): filled flat, not warm for %d bars",
                        self.window.index[-1], bar.index[0], feature_engine.warmup_bars(self.cfg))
            first = int(self.window.index[0].value // 1_000_000)
            self.window, _ = complete_grid(self.window, first, bar_ms - self.bar_ms, self.bar_ms)
            self.missing_until = max(self.missing_until, number + feature_engine.warmup_bars(self.cfg))
        if bar.attrs.get("partial"):   # its book began late: the book features wait until it is out of reach
            wait = feature_engine.book_warmup_bars(self.cfg) if self._first_trades_whole \
                else 1 + feature_engine.warmup_bars(self.cfg)
            if number + wait > self.missing_until:
                log.info("the first bar (%s) began before the engine listened: %s wait %d bars, warm at %s",
                         iso(bar_ms), "its book columns are partial, the book features" if self._first_trades_whole
                         else "its trades are partial, all features", wait, iso(bar_ms + wait * self.bar_ms))
            self.missing_until = max(self.missing_until, number + wait)
            self.state["partial_bar"] = [bar_ms, wait]   # so a restart soon after waits for it too
        self.state["recorded_until_ms"] = bar_ms + self.bar_ms   # own recordings hold whole bars up to here
        self.window = extend_window(self.window, bar, self.window_bars)
        data_loader.mark_gaps(self.window, self.bar_ms // 1000, self.cfg.data.gap_threshold,
                              self.window["is_gap"].to_numpy(bool))   # the research gap rule, on the window
        drift_due = (bool(self.quantiles) and number % 10 == 0   # over known bars only: klines' neutral taker
                     and number - self.cfg.live.drift_window >= self.missing_until)   # split is not drift
        feats = feature_engine.compute_features(self.window, self.cfg,   # only the rows used: equal to a full run's
                                                last=self.cfg.live.drift_window if drift_due else 1)
        row = feats.iloc[-1]
        atr = float(row["atr"])
        self.state["last_atr"] = atr
        self._recorder.flush()
        warm = bool(row["is_warm"]) and number >= self.missing_until
        if warm != self.warm:
            log.info("bar %s: %s", iso(bar_ms), "warm: features and model in use, entries allowed when the other "
                     "gates are open" if warm else "not warm: no model probabilities, no entries")
            self.warm = warm
        probs = self._probabilities(bar_ms, feats) if warm else {c: math.nan for c in PROB_COLUMNS}
        if drift_due:
            self._drift(feats)
        values = dict(zip(bar.columns, bar.to_numpy(dtype=object)[0]))   # one row: 60x cheaper than to_dict
        allowed, reason = self._entry_gate(warm, values)
        close = float(values["close"])
        requests: list = []
        trades_lines = self.journals.lines("trades")   # the events this decision saw: the replay's boundary
        if not self.args.signal_only and self._exec is not None:
            import strategy
            requests = self._exec.on_bar_close(strategy.Bar(index=number, time=bar_ms / 1000.0, close=close,
                                                            atr=atr, probs=probs,
                                                            bid_depth=float(values["ob_bid_depth_mean"]),
                                                            ask_depth=float(values["ob_ask_depth_mean"])),
                                               strategy.EntryGate(allowed=allowed, reason=reason))
        latency = (time.perf_counter() - t0) * 1000.0
        s = self.cfg.strategy
        self.journals.write("signals", {
            "bar_time": iso(bar_ms), "bar_ms": bar_ms, **{c: float(values[c]) for c in
                                                          ("open", "high", "low", "close", "volume")},
            "bar": {c: values[c] for c in data_loader.BAR_COLUMNS},
            "atr": atr, "warm": warm, **probs, "exec_threshold": s.exec_threshold,
            "direction_threshold": s.direction_threshold, "aggressive_threshold": s.aggressive_threshold,
            "entries_allowed": allowed, "reason": reason, "latency_ms": latency,
            "late_trades": self._bars.take_late(), "late_trades_total": self._bars.late_trades,
            "trades_lines": trades_lines,
            "intents": [{"kind": it.kind, "side": it.side, "price": it.price, "qty": it.qty, "tp_dist": it.tp_dist,
                         "sl_dist": it.sl_dist, "reason": it.reason}
                        for it in (self._exec.last_intents if self._exec is not None else [])],
            "requests": [{"action": r.action, "kind": r.kind, "side": r.side, "price": r.price, "qty": r.qty,
                          "order_link_id": r.order_link_id} for r in requests],
            **({"features": {k: float(v) for k, v in row.items() if k != "is_warm"}} if self.args.log_features else {})})
        self.send(requests)
        self._state_dirty = True   # written at the end of this loop pass, with the events it handles

    def _probabilities(self, bar_ms: int, feats: pd.DataFrame) -> dict[str, float]:
        table = self.setup.probabilities
        if table is not None:
            if bar_ms not in table.index:
                return {c: math.nan for c in PROB_COLUMNS}
            row = table.loc[bar_ms]
            row = row.iloc[-1] if isinstance(row, pd.DataFrame) else row
            return {c: float(row[c]) for c in PROB_COLUMNS}
        pred = self.bundle.predict(feats.iloc[-1:])
        return {c: float(pred[c.replace("p_", "")].iloc[0]) if c.replace("p_", "") in pred.columns
                else float(pred[c].iloc[0]) for c in PROB_COLUMNS}

    def _drift(self, feats: pd.DataFrame) -> None:
        report = drift_report(feats, self.quantiles, self.cfg.live.drift_window)
        levels = drift_levels(report, self.psi_limits, self.cfg.live.drift_psi_alert)
        worst = worst_drift(report, levels)
        if worst is not None and not self.health.drift_alert:
            self.journals.event("drift", f"feature {worst[0]} drifted from training: PSI {worst[1]:.3f} > "
                                         f"{levels[worst[0]]:.3g} (its level: the most a {len(feats)}-bar stretch of "
                                         "training reached, at least live.drift_psi_alert)", "warning",
                                drift=report, drift_levels=levels)
        self.health.drift, self.health.drift_levels, self.health.drift_alert = report, levels, worst is not None

    def _entry_gate(self, warm: bool, bar: dict[str, Any]) -> tuple[bool, str]:
        """Live-only conditions the strategy receives as input (DESIGN §1)."""
        lag = (self.clock.exchange_ms() - max(self.recv["trade"], self.recv["book"])) / 1000.0
        self.health.data_lag_s = lag
        book = self._book_problem()
        checks = [(not warm, "not warm"), (not self.health.reconciled, "not reconciled"),
                  (bool(self.health.external), "external position/order: " + ",".join(self.health.external[:3])),
                  (lag > parse_duration(self.cfg.live.ws_stale_after), f"stale data ({lag:.0f}s)"),
                  (bool(book), f"book invalid ({book})"),
                  (self.health.api_errors >= self.cfg.live.max_api_errors, "API errors"),
                  (self.args.drift_halt and self.health.drift_alert, "drift halt"),
                  (bool(self.state.get("halted_day")) and self.state.get("halted_day") == self._day(), "kill-switch")]
        spread, mid = float(bar.get("ob_spread_mean", math.nan)), float(bar.get("ob_mid_last", math.nan))
        if math.isfinite(spread) and math.isfinite(mid) and mid > 0:
            checks.append((spread / mid > self.cfg.live.max_spread_pct, f"wide spread ({spread / mid:.4%})"))
        for failed, why in checks:
            if failed:
                if why.startswith("stale"):
                    self.journals.event("stale_data", f"no market data for {lag:.0f}s: entries paused", "warning")
                return False, why
        return True, ""

    def _book_problem(self) -> str:
        """Why the stream's book cannot be traded on now ('' when it can): out of sync (no snapshot since a gap
        or reset), a side without levels, or crossed (best bid >= best ask)."""
        if self.market is None:
            return ""
        with self.market.lock:
            book = self.market.book
            bid, ask = book.best_bid(), book.best_ask()
            synced = bool(book.st[ob.VALID]) and not self.market.awaiting_snapshot
        if not synced:
            return "out of sync"
        if not (math.isfinite(bid) and math.isfinite(ask)):
            return f"empty {'bid' if not math.isfinite(bid) else 'ask'} side"
        return "crossed" if bid >= ask else ""

    def _day(self) -> int:
        return self.clock.exchange_ms() // 86_400_000

    # ------------------------------------------------------------ orders
    def _load_execution(self) -> Any:
        """The order lifecycle (execution.py), restored losslessly from the state file."""
        text = self.state.get("execution")
        try:
            ex = execution.Execution.from_json(text, self.cfg) if text else execution.Execution(self.cfg,
                                                                                                self.symbol)
        except ValueError as err:
            raise Refusal(EXIT_CONFIG, f"state file {self.setup.state_file}: {err}") from None
        ex.reread_from_ms = int(self.state.get("exec_since_ms", 0))   # what reconciliation may read again
        return ex

    def send(self, requests: list) -> None:
        """Send order requests. A create's orderLinkId is written to the state file BEFORE it is sent (a crash
        in between leaves a known id to settle by lookup, never an orphan); an unknown outcome (timeout, 5xx,
        lost ack) stays pending and is settled by lookup, never re-sent under a new id."""
        if self._deferred is not None:
            self._deferred.extend(requests)
            return
        creates = [req for req in requests if req.action == "create"]
        for req in creates:
            self.links[req.order_link_id] = req.kind
            self.state.setdefault("unsettled", {})[req.order_link_id] = self.clock.exchange_ms()
        if creates:
            self._save()   # one write ahead of the batch: an id written but never sent settles as never placed
        for req in requests:
            wire = req.order_link_id
            if req.action != "cancel":
                self.journals.write("trades", self._exec.placed_record(req, self.clock.exchange_ms()))
            try:
                if req.action == "create":
                    self._create(req)
                    self.state["unsettled"].pop(wire, None)
                    if req.kind == "sl":
                        self._drop_attached_stops(req)
                else:
                    self._cancel(req)
                self.health.api_errors = 0
            except exc.OrderNotFoundError:
                if req.action == "cancel":
                    self._settle(wire)
            except exc.RejectedError as err:
                self._rejected(req, wire, err)
            except exc.ExchangeError as err:
                self.health.api_errors += 1
                self.journals.event("error", f"{req.action} {wire} outcome unknown ({err}): settling by lookup",
                                    "warning", order_link_id=wire)

    def _own(self, intent_key: str, kind: str) -> None:
        """Record an engine-made order (outside the lifecycle) as ours before it is sent."""
        self.links[exc.order_link_id(intent_key)] = kind
        self._save()

    def _create(self, req: Any) -> None:
        """An entry (stop attached, tpslMode=Partial), a TP limit, an exit, or the position's own stop: a
        reduce-only conditional market order triggering at `price`."""
        if req.kind == "sl":
            self.client.place_order(req.intent_key, req.side, req.qty, order_type="Market", reduce_only=True,
                                    trigger_price=req.price, trigger_direction=2 if req.side == "Sell" else 1)
            return
        market = req.order_type == "Market"
        kwargs: dict[str, Any] = dict(price=None if market else req.price, order_type=req.order_type,
                                      time_in_force=None if market else req.time_in_force,
                                      reduce_only=req.reduce_only)
        if req.stop_loss is not None and not req.reduce_only:
            kwargs.update(stop_loss=req.stop_loss, tpsl_mode="Partial")
        self.client.place_order(req.intent_key, req.side, req.qty, **kwargs)

    def _cancel(self, req: Any) -> None:
        self.client.cancel_order(order_link_id=req.order_link_id)

    def _drop_attached_stops(self, req: Any) -> None:
        """Once the position's own stop stands, cancel the stops the exchange made from the entry's attached
        stopLoss (one per partial fill), so none is left to close another position on the same leg."""
        entry = self._exec.orders.get(req.position_id)
        if entry is None or entry.request.stop_loss is None:
            return
        for order in self.client.open_orders():
            if (not order.get("orderLinkId") and "StopLoss" in str(order.get("stopOrderType"))
                    and int(order.get("positionIdx", 0)) == req.position_idx
                    and math.isclose(float(order.get("triggerPrice") or 0), entry.request.stop_loss,
                                     rel_tol=0, abs_tol=1e-9)):
                try:
                    self.client.cancel_order(order_id=str(order["orderId"]))
                except exc.OrderNotFoundError:
                    pass

    def _rejected(self, req: Any, wire: str, err: exc.ExchangeError) -> None:
        """A refusal is final: the lifecycle hears it (and journals it, once); a refused stop on a live position
        means an immediate reduce-only market exit of that position."""
        self.state.get("unsettled", {}).pop(wire, None)
        self._feed("order", {"orderLinkId": wire, "orderStatus": "Rejected", "rejectReason": str(err),
                             "updatedTime": str(self.clock.exchange_ms())})
        if req.kind == "sl" and stop_refused(err):
            self._emergency_exit(str(req.position_idx), req.qty, str(err), req.position_id)

    def _emergency_exit(self, idx: str, qty: float, why: str, position_id: str = "") -> None:
        """Reduce-only market exit of what cannot have its stop (refused: price already beyond it, or no stop
        price known): `position_id`, or else own positions of leg `idx` for `qty` (those whose own stop does not
        stand first), through the lifecycle (Execution.exit_position, reason stop_refused), so the fill closes
        them there like any exit; only a remainder of `qty` that no own position accounts for (not the
        lifecycle's) gets an engine-made order."""
        if position_id:
            requests = self._exec.exit_position(position_id, "stop_refused")
            if not requests:
                log.info("stop refused for %s (%s): already closed or its exit under way", position_id, why)
                return
            self.journals.event("error", f"stop refused for {position_id} ({why}): closing {qty} at market", "error")
            self.send(requests)
            return
        self.journals.event("error", f"stop refused for leg-{idx} ({why}): closing {qty} at market", "error")
        left = qty
        for pos in self._exec.unprotected_first(1 if idx == "1" else -1):
            if left <= 1e-12:
                return
            self.send(self._exec.exit_position(pos.position_id, "stop_refused"))
            left -= pos.qty
        if left <= 1e-12:
            return
        key = f"{self.symbol}|leg-{idx}|stop-refused-exit|{self.clock.exchange_ms()}"
        self._own(key, "exit")
        try:
            self.client.place_order(key, "Sell" if idx == "1" else "Buy", left, order_type="Market", reduce_only=True)
        except exc.ExchangeError as err:
            self.journals.event("error", f"emergency exit of {left} on leg {idx} failed: {err}", "critical")

    def _settle(self, wire: str) -> None:
        """Settle an order of unknown outcome by lookup; it is never re-sent under a new id."""
        found = self.client.find_order(wire)
        if found is None:
            return
        self.state.get("unsettled", {}).pop(wire, None)
        self._on_private("order", [found])

    def _settle_unknown(self) -> None:
        for wire in list(self.state.get("unsettled", {})):
            try:
                found = self.client.find_order(wire)
            except exc.ExchangeError as err:
                log.warning("lookup of %s failed: %s", wire, err)
                continue
            if found is not None:
                self.state["unsettled"].pop(wire, None)
                self._on_private("order", [found])
            elif self.clock.exchange_ms() - self.state["unsettled"][wire] > 10_000:
                self.state["unsettled"].pop(wire, None)
                self._feed("order", {"orderLinkId": wire, "orderStatus": "Rejected",
                                     "rejectReason": "never reached the exchange (lookup found nothing)",
                                     "updatedTime": str(self.clock.exchange_ms())})

    def _cancel_resting_entries(self) -> None:
        for order in self.client.open_orders():
            if self.links.get(order.get("orderLinkId")) == "entry" and not order.get("reduceOnly"):
                try:
                    self.client.cancel_order(order_link_id=order["orderLinkId"])
                except exc.OrderNotFoundError:
                    pass

    # ------------------------------------------------------------ exchange events
    def _on_private(self, topic: str, rows: list) -> None:
        for row in rows:
            if topic == "position":
                self._position_update(row)
            elif topic == "wallet":
                continue
            else:
                self._feed(topic, row)
        self._after_events()

    def _feed(self, topic: str, row: dict) -> None:
        """One order/execution record (WS push, REST lookup or simulator) as an ExecEvent."""
        if self._exec is None:
            return
        link = self._request_id(row)
        if link is None:
            protective = row.get("reduceOnly") in (True, "true") and not row.get("orderLinkId")
            if topic == "order" and row.get("orderStatus") in ("New", "PartiallyFilled", "Untriggered") \
                    and not protective and not exc.is_own_order(row.get("orderLinkId")):
                self._external(f"order {row.get('orderId')}")
            return
        ts = int(row.get("execTime") or row.get("updatedTime") or self.clock.exchange_ms())
        if topic == "execution":
            if row.get("execType", "Trade") != "Trade" or float(row.get("execQty") or 0) <= 0:
                return
            ev = execution.ExecEvent("fill", link, ts, exec_id=str(row["execId"]), qty=float(row["execQty"]),
                                     price=float(row["execPrice"]), fee=float(row.get("execFee") or 0),
                                     is_maker=row.get("isMaker") in (True, "true"))
        else:
            status = row.get("orderStatus")
            kind = {"New": "accepted", "Untriggered": "accepted", "Triggered": "triggered", "Rejected": "rejected",
                    "Cancelled": "cancelled", "Deactivated": "cancelled",
                    "PartiallyFilledCanceled": "cancelled"}.get(status)
            if kind is None:
                return
            self.state.get("unsettled", {}).pop(row.get("orderLinkId", ""), None)
            ev = execution.ExecEvent(kind, link, ts, reason=str(row.get("rejectReason") or row.get("cancelType")
                                                                   or ""))
        result = self._exec.on_event(ev)
        for rec in result.journal:
            self.journals.write("trades", rec)
        if result.status in ("invalid",):
            log.warning("event %s %s: %s", ev.type, link, result.message)
        self.send(result.requests)

    def _request_id(self, row: dict) -> str | None:
        """Our orderLinkId of an exchange order; a stop the exchange made from an entry's attached stopLoss (no
        orderLinkId, stopOrderType PartialStopLoss) is the lifecycle's too, under the id
        Execution.adopt_attached_stop gives it for the own position it protects. None: not the lifecycle's."""
        wire = row.get("orderLinkId") or ""
        if wire or "StopLoss" not in str(row.get("stopOrderType")) or not row.get("orderId"):
            return wire if wire in self._exec.orders else None
        order_id, side = str(row["orderId"]), str(row.get("side"))
        trigger, qty = float(row.get("triggerPrice") or math.nan), float(row.get("qty") or row.get("orderQty") or 0)
        reported = int(row.get("execTime") or row.get("createdTime") or self.clock.exchange_ms())
        known = len(self._exec.orders)
        link = self._exec.adopt_attached_stop(order_id, side, trigger, qty, reported)
        if link is not None and len(self._exec.orders) > known:   # journaled, so a replay adopts it the same way
            self.journals.write("trades", {"event": "adopted", "order_link_id": link, "order_id": order_id,
                                           "side": side, "kind": "sl", "price": trigger, "qty": qty,
                                           "report_ms": reported,
                                           "position_id": self._exec.orders[link].request.position_id,
                                           "reason": "attached stopLoss"})
        return link

    def _external(self, what: str) -> None:
        if what not in self.health.external:
            self.health.external.append(what)
            self.journals.event("external", f"{what} is not this engine's: entries paused", "warning")
            self.journals.write("trades", {"event": "external", "reason": what})

    def _position_update(self, row: dict) -> None:
        idx = str(int(row.get("positionIdx", 0)))
        self.state.setdefault("exchange_positions", {})[idx] = float(row.get("size") or 0)
        self.clock.saw(int(row.get("updatedTime") or 0) if self.mode == "paper" else 0)

    def _after_events(self) -> None:
        """Events applied: the open-orders journal now, the state file at the end of this loop pass (one write
        per batch of events; what a crash loses in between, the restart's reconciliation reads back), at once
        when the number of open legs changed (the heartbeat, written with it, must never disagree with it)."""
        self._journal_open_orders()
        self._state_dirty = True
        if sum(1 for v in self._exchange_positions().values() if v) != self._beat_positions:
            self._save()

    def _journal_open_orders(self) -> None:
        resting = [vars(r) if hasattr(r, "__dict__") else r for r in self._exec.resting()]
        key = json.dumps(resting, default=_json_default, sort_keys=True)
        if key != self.state.get("_open_orders_key"):
            self.state["_open_orders_key"] = key
            self.journals.write("open_orders", {"orders": resting})

    # ------------------------------------------------------------ reconciliation
    def reconcile(self, why: str) -> bool:
        """Compare with the exchange: both hedge rows, open orders (all pages), the executions since the
        previous reconciliation, wallet. Unknown orders/positions are external and block entries; an own
        position without a full stop gets one. False when it could not complete (a missing answer never means
        flat).

        Executions are asked for from the previous reconciliation's moment (less EXEC_OVERLAP_MS), not from
        the newest push: a fill whose push was lost while a stream was down is recovered even when a later
        push arrived (exec ids make the overlap harmless). The legs are compared with own sizes only when
        they held still while the orders and executions were read (`_steady_reads`)."""
        since = int(self.state.get("exec_since_ms", 0))
        moment = self.clock.exchange_ms()
        try:
            rows, orders, executions, steady = self._steady_reads(since)
            wallet = self.client.wallet()
        except exc.ExchangeError as err:
            self.health.reconciled = False
            self.journals.event("reconcile_failed", f"{why} reconciliation failed: {err}; entries blocked until a "
                                                    "reconciliation succeeds (cancels and reduce-only exits still go "
                                                    "out)", "error", entries_blocked=True)
            return False
        for row in sorted(executions, key=lambda r: int(r.get("execTime", 0))):
            self._feed("execution", row)
        for wire in list(self.state.get("unsettled", {})):
            self._settle(wire)
        self.health.external = []
        for order in orders:
            self._feed("order", order)
        self._forget_links({str(o.get("orderLinkId")) for o in orders})
        positions = leg_sizes(rows)
        self.state["exchange_positions"] = positions
        own = {"1": 0.0, "2": 0.0}
        for pos in self._exec.positions():
            own["1" if pos.side > 0 else "2"] += pos.qty
        for idx, size in positions.items():
            if steady and size > own.get(idx, 0.0) + 1e-12:
                self._external(f"position idx {idx} size {size} (own {own.get(idx, 0.0)})")
        if not steady:
            log.info("%s reconciliation: the legs moved while they were read (own orders filling); their sizes "
                     "are compared with own positions at the next reconciliation", why)
        self.check_stops(orders)
        self.state["wallet_equity"] = wallet.get("equity")
        self.state["exec_since_ms"] = self._exec.reread_from_ms = max(since, moment - EXEC_OVERLAP_MS)
        self.health.reconciled = True
        self._save()
        self.journals.event("reconciled", f"{why}: {len(orders)} open orders, positions {positions}",
                            orders=len(orders), positions=positions, external=self.health.external)
        return True

    def _steady_reads(self, since: int) -> tuple[list[dict], list[dict], list[dict], bool]:
        """Position rows, open orders and executions since `since`, read between two readings of the legs;
        repeated (up to RECONCILE_READS times) until both readings agree, so that no fill happened in between
        and the executions explain the legs exactly. The flag is False when the legs never held still."""
        rows = self.client.positions()
        for _ in range(RECONCILE_READS):
            orders = self.client.open_orders()
            executions = self.client.executions(since, self.clock.exchange_ms())
            again = self.client.positions()
            if leg_sizes(again) == leg_sizes(rows):
                return again, orders, executions, True
            rows = again
        return rows, orders, executions, False

    def check_stops(self, orders: list[dict] | None = None) -> int:
        """Every own position leg must be covered by reduce-only stop orders for its full size; an
        uncovered remainder gets a stop at the position's own SL (or, without one, a market exit).
        Returns the number of legs found unprotected."""
        if orders is None:      # the periodic guard: orders and legs as the exchange holds them at one moment (the
            orders = self.client.open_orders()     # streamed legs may lag an exit whose stop is already cancelled)
            positions = leg_sizes(self.client.positions())
        else:
            positions = self._exchange_positions()
        bad = 0
        for idx in ("1", "2"):
            size = positions.get(idx, 0.0)
            if size <= 0:
                continue
            covered = sum(float(o.get("qty") or 0) for o in orders if str(o.get("positionIdx")) == idx
                          and "Stop" in str(o.get("stopOrderType", "")) and o.get("reduceOnly") in (True, "true"))
            if covered + 1e-12 < size:
                bad += 1
                self._protect(idx, size - covered)
        self.health.unprotected = bad
        self.last_stop_check = self.clock.exchange_ms()
        return bad

    def _protect(self, idx: str, qty: float, trigger: float | None = None) -> None:
        """A reduce-only stop for `qty` of leg idx at `trigger` (default: the leg's first own position's SL);
        a refused or unknown stop means a reduce-only market exit instead."""
        long = idx == "1"
        own = [p for p in self._exec.positions() if (p.side > 0) == long]
        trigger = trigger if trigger is not None else (own[0].sl if own else math.nan)
        side = "Sell" if long else "Buy"
        key = f"{self.symbol}|protect|{idx}|{self.clock.exchange_ms()}"
        self.journals.event("error", f"position leg {idx} has {qty} without a stop: protecting it", "error")
        if not math.isfinite(trigger):
            self._emergency_exit(idx, qty, "no stop price known for it")
            return
        self._own(key, "sl")
        try:
            self.client.place_order(key, side, qty, order_type="Market", reduce_only=True,
                                    trigger_price=trigger, trigger_direction=2 if long else 1)
        except exc.RejectedError as err:
            if stop_refused(err):
                self._emergency_exit(idx, qty, str(err))
            else:
                self.journals.event("error", f"protecting leg {idx} failed: {err}", "critical")

    # ------------------------------------------------------------ risk and journals
    def _check_kill_switch(self, low: float, high: float) -> None:
        """Daily loss including unrealised PnL, on every trade push: the strategy's intrabar rule
        (Execution.check_kill -> strategy.intrabar_kill, the rule the backtest core applies inside bars on the
        bar's adverse extreme) compares the prices traded in [low, high] with the trigger price of the own
        positions and cash; when reached: flatten, cancel, halt until the next UTC day. The halt is kept in the
        state file so it survives a restart."""
        if self._exec is None or not (math.isfinite(low) and math.isfinite(high)) or self._bars.open_ms is None:
            return
        day = self._bars.open_ms // 86_400_000
        if self.state.get("halted_day") == day:
            return
        import strategy
        requests = self._exec.check_kill(low, high, self._bars.open_ms // self.bar_ms, self._bars.open_ms / 1000.0)
        if not (self._exec.day.halted and self._exec.day.day == day):
            return
        armed = strategy.DayState(day, self._exec.day.start_equity, False, self._exec.day.last_equity)
        trigger, direction = strategy.kill_price(self._exec.positions(), self._exec.cash, armed, self.cfg.strategy)
        worst = strategy.adverse_price(low, high, direction)
        worst = worst if math.isfinite(worst) else self.last_price
        equity, start = self._exec.mark(worst), self._exec.day.start_equity
        self.state["halted_day"] = day
        self.journals.event("kill_switch", f"daily loss {equity - start:.2f} reached the "
                                           f"{self.cfg.strategy.daily_loss_limit:.1%} limit at {worst} "
                                           f"(trigger {trigger:.6g}): flattening, halted until the next UTC day",
                            "critical", equity=equity, day_start=start, trigger=trigger)
        self.beat("flattening")
        self.send(requests)
        self._save()
        self.beat("halted")

    def _journal_equity(self) -> None:
        if self._exec is None:
            return
        equity = self._exec.mark(self.last_price) if math.isfinite(self.last_price) else self._exec.equity()
        start = self._exec.day.start_equity if math.isfinite(self._exec.day.start_equity) else equity
        self.journals.write("equity", {
            "equity": equity, "unrealised": equity - self._exec.equity(), "day_start_equity": start,
            "day_pnl": equity - start, "kill_switch": "halted" if self.state.get("halted_day") == self._day()
            else "armed", "positions": [vars(p) for p in self._exec.positions()],
            "data_lag_s": self.health.data_lag_s,
            "streams": {s.channel: {"state": s.health(), "age_s": round(s.silence(), 1),
                                    "dropped": {"/".join(k): v for k, v in getattr(s, "dropped", {}).items()}}
                        for s in (self.market, self.private) if s is not None},
            "reconciled": self.health.reconciled, "api_errors": self.health.api_errors,
            "drift": self.health.drift, "drift_levels": self.health.drift_levels,
            "late_trades": self._bars.late_trades})

    def _save(self) -> None:
        self._state_dirty = False
        if getattr(self, "_exec", None) is not None:
            self.state["execution"] = self._exec.to_json()
        self.state.update(symbol=self.symbol, mode=self.mode, links=self.links, saved_ms=self.clock.wall_ms())
        save_state(self.setup.state_file, {k: v for k, v in self.state.items() if not k.startswith("_")})
        if sum(1 for v in self._exchange_positions().values() if v) != self._beat_positions:
            self._write_heartbeat()   # the heartbeat never reports fewer or more positions than the state holds


STOP_REFUSAL_WORDS = ("expectrising", "expectfalling", "triggerprice", "stoploss", "wrongside", "lossside",
                      "shouldlower", "shouldhigher", "shouldbelower", "shouldbehigher")


def leg_sizes(rows: list[dict]) -> dict[str, float]:
    """positionIdx ("1" long leg, "2" short leg) -> size, from Bybit position rows."""
    return {str(int(r.get("positionIdx", 0))): float(r.get("size") or 0) for r in rows}


def stop_refused(err: exc.ExchangeError) -> bool:
    """Whether the exchange refused a stop because price is already beyond it. Classified by kind and wording,
    not by one retCode: Bybit answers 110092/110093 ("expect Falling, but trigger_price[..] >= current[..]")
    for a conditional order and 10001/30208-style texts naming the stop-loss side for an attached stopLoss;
    the text is compared with case, spaces, '_' and digits removed. Balance, size, duplicate, not-found and
    reduce-only refusals are other reasons and never count."""
    other = (exc.InsufficientBalanceError, exc.MinNotionalError, exc.OrderNotFoundError, exc.DuplicateOrderError,
             exc.ReduceOnlyError)
    if not isinstance(err, exc.RejectedError) or isinstance(err, other):
        return False
    text = "".join(ch for ch in str(err).lower() if "a" <= ch <= "z")
    return any(word in text for word in STOP_REFUSAL_WORDS)


def main(argv: list[str] | None = None, env: dict | None = None) -> int:
    args = parse_args(argv)
    try:
        setup = prepare(args, env)
    except Refusal as err:
        print(f"refused: {err}", file=sys.stderr)
        return err.code
    setup_logging(Path(setup.cfg.live.log_dir), args.verbose)
    return Engine(setup).run()


if __name__ == "__main__":
    sys.exit(main())
