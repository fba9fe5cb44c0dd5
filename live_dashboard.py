"""Read-only Dash page over the live engine's files (DESIGN.md §3) and the model it runs.

    python live_dashboard.py [--log-dir logs] [--state-dir state] [--model-dir models_v9]
                             [--host 127.0.0.1] [--port 8050] [--refresh-sec 2] [--auth USER:FILE]
                             [notifier flags: --discord-webhook URL --telegram-token T --telegram-chat-id ID ...]

One page for every symbol found (`state/bot_state_*.json`, `state/heartbeat_*.json` or a journal in
`logs/`): the mode banner, engine status (heartbeat age, phase, stopped cleanly / exited / offline from
the last heartbeat, reconciled, kill-switch, entries paused and why, the watchdog's restarts from
`logs/watchdog_<SYM>.jsonl`), candles with entry/exit markers by reason and the resting orders' and open
positions' TP/SL as price lines, the four model probabilities against their thresholds and their
history, equity with unrealised and today's PnL against the kill-switch line and drawdown, tables
(positions, resting orders, closed trades with fees, daily PnL), health (streams, reconnects, book
gaps, API errors, bar-close latency, drift PSI worst first) and a model card linking its report.html.

Each refresh (`dcc.Interval`, default 2 s) reads only what the engine appended since the previous one
(`journal_tail.JournalTail`) and keeps bounded windows, so its cost does not grow with the journals.
The server binds 127.0.0.1:8050 unless told otherwise (Dash's HOST/PORT environment variables are
ignored), never runs in debug mode, and refuses a non-loopback host without `--auth USER:FILE`
(HTTP basic auth, the password read from FILE, compared in constant time). No trading controls.
With notifier flags it also runs `notifier.py`'s journal watcher in a background thread.
"""
from __future__ import annotations

import argparse
import hmac
import ipaddress
import logging
import math
import re
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import orjson
import plotly.graph_objects as go
from dash import Dash, Input, Output, State, dcc, html, no_update
from flask import Response, abort, request, send_file
from plotly.subplots import make_subplots
from werkzeug.serving import make_server

import notifier
from journal_tail import JournalTail

log = logging.getLogger("live_dashboard")

JOURNALS = ("signals", "trades", "open_orders", "equity", "events", "watchdog")   # watchdog: watchdog.py's restarts
SYMBOL_RE = re.compile(r"^(?:bot_state|heartbeat|signals|trades|open_orders|equity|events)_([A-Z0-9]{2,30})\.jsonl?$")
PROBS = ("p_exec_long", "p_exec_short", "p_dir_long", "p_dir_short")
MODES = {"dry-run": ("DRY-RUN: simulated fills, no orders reach an exchange", "#5a6268"),
         "paper": ("PAPER: local paper exchange, no real money", "#1f5fa8"),
         "testnet": ("TESTNET: Bybit testnet, no real money", "#b86e00"),
         "demo": ("DEMO: Bybit demo trading, no real money", "#b86e00"),
         "live": ("LIVE: REAL MONEY", "#c00000")}
# trades_<SYM>.jsonl exit events -> marker reason; entries are marked by their strategy reason.
EXIT_REASONS = {"tp": "TP", "sl": "SL", "time_exit": "time", "kill_exit": "kill", "external": "external"}
MARKERS = {"chop": ("chop maker entry", "circle", "#1f77b4"), "breakout": ("breakout taker entry", "star", "#ff7f0e"),
           "TP": ("TP exit", "triangle-up", "#2ca02c"), "SL": ("SL exit", "triangle-down", "#d62728"),
           "time": ("time exit", "square", "#7f7f7f"), "kill": ("kill-switch exit", "x", "#000000"),
           "external": ("external", "diamond", "#9467bd")}
MAX_MARKERS, MAX_CLOSED, MAX_EQUITY, MAX_EVENTS = 2000, 500, 20_000, 200
SUPER_OOS_KEYS = ("total_return", "sharpe", "sortino", "max_drawdown", "trades", "win_rate", "profit_factor")
STYLE_TABLE = {"borderCollapse": "collapse", "fontSize": "13px", "margin": "4px 0 12px 0"}
STYLE_CELL = {"border": "1px solid #ccc", "padding": "2px 6px"}


@dataclass
class DashConfig:
    log_dir: Path
    state_dir: Path
    model_dir: Path
    bars: int = 300
    refresh_sec: float = 2.0
    offline_sec: float = 120.0


# ---------------------------------------------------------------- reading the live files
def record_time(rec: dict) -> datetime | None:
    """A record's UTC time from `ts` (ms) or, failing that, its ISO `time`."""
    ts = rec.get("ts")
    if isinstance(ts, (int, float)) and math.isfinite(ts):
        return datetime.fromtimestamp(ts / 1000.0, tz=timezone.utc)
    try:
        return datetime.fromisoformat(str(rec.get("time", "")).replace("Z", "+00:00"))
    except ValueError:
        return None


def utc_text(value: Any) -> str | None:
    """An ISO time (any offset) as naive UTC text, the form plotly.js places on a date axis without shifting."""
    try:
        t = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    if t.tzinfo is not None:
        t = t.astimezone(timezone.utc).replace(tzinfo=None)
    return t.isoformat(sep=" ")


def record_utc(rec: dict) -> str | None:
    t = record_time(rec)
    return t.astimezone(timezone.utc).replace(tzinfo=None).isoformat(sep=" ") if t else None


def side_name(side: Any) -> Any:
    """Position/resting-order side as journalled (+1/-1, strategy.Position.side) -> long/short."""
    return {1: "long", -1: "short"}.get(side, side) if isinstance(side, int) else side


def read_json(path: Path) -> dict:
    """A small state file written atomically; {} if missing or unreadable (logged)."""
    try:
        data = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    except (OSError, orjson.JSONDecodeError) as exc:
        log.warning("%s: unreadable (%s)", path, exc)
        return {}
    return data if isinstance(data, dict) else {}


def marker_reason(rec: dict) -> str | None:
    """The marker a trades record gets: a completed entry by strategy reason, an exit by its event; else None.

    One marker per order: the pieces of a partial fill (`partially_filled`) get none, the `filled` that
    completes the order does.
    """
    event = rec.get("event")
    if event == "filled" and rec.get("kind") == "entry":
        return rec.get("reason") if rec.get("reason") in MARKERS else "chop"
    return EXIT_REASONS.get(str(event))


class SymbolFeed:
    """Everything the page shows for one symbol, kept current by reading only what was appended."""

    def __init__(self, symbol: str, cfg: DashConfig) -> None:
        self.symbol, self.cfg = symbol, cfg
        self.tails = {name: JournalTail(cfg.log_dir / f"{name}_{symbol}.jsonl") for name in JOURNALS}
        self.signals: deque[dict] = deque(maxlen=cfg.bars)
        self.markers: deque[dict] = deque(maxlen=MAX_MARKERS)
        self.closed: deque[dict] = deque(maxlen=MAX_CLOSED)
        self.orders: list[dict] = []
        self.equity: deque[dict] = deque(maxlen=MAX_EQUITY)
        self.daily: dict[str, dict] = {}
        self.events: deque[dict] = deque(maxlen=MAX_EVENTS)
        self.restarts: dict[str, int] = {}   # UTC day -> watchdog restarts
        self.last_restart: dict = {}
        self.last_watchdog: dict = {}   # the newest watchdog record of any event
        self.peak = -math.inf
        self.model = ""
        self.mode = ""
        self.version = 0

    def refresh(self) -> None:
        """Fold in every record appended since the last call; `version` counts the records read."""
        for name, tail in self.tails.items():
            handle = getattr(self, f"_on_{name}")
            for rec in tail.read_new():
                self.version += 1
                if rec.get("mode"):
                    self.mode = str(rec["mode"])
                handle(rec)

    def _on_signals(self, rec: dict) -> None:
        self.signals.append(rec)

    def _on_trades(self, rec: dict) -> None:
        reason = marker_reason(rec)
        if reason is not None:
            self.markers.append(dict(rec, _marker=reason))
        if rec.get("kind") != "entry" and rec.get("pnl") is not None:  # every exit fill, partial ones too
            self.closed.append(rec)

    def _on_open_orders(self, rec: dict) -> None:
        self.orders = list(rec.get("orders") or [])

    def _on_equity(self, rec: dict) -> None:
        equity = rec.get("equity")
        if not isinstance(equity, (int, float)):
            return
        self.peak = max(self.peak, float(equity))
        rec["_drawdown"] = equity / self.peak - 1.0 if self.peak > 0 else 0.0
        self.equity.append(rec)
        day = (record_utc(rec) or "")[:10]
        self.daily[day] = {"day": day, "day_start_equity": rec.get("day_start_equity"), "day_pnl": rec.get("day_pnl"),
                           "kill_switch": rec.get("kill_switch")}

    def _on_events(self, rec: dict) -> None:
        self.events.append(rec)
        if rec.get("event") == "model_loaded" and rec.get("model"):
            self.model = str(rec["model"])

    def _on_watchdog(self, rec: dict) -> None:
        self.last_watchdog = rec
        if rec.get("event") == "restart":
            day = (record_utc(rec) or "")[:10]
            self.restarts[day] = self.restarts.get(day, 0) + 1
            self.last_restart = rec

    def heartbeat(self) -> dict:
        return read_json(self.cfg.state_dir / f"heartbeat_{self.symbol}.json")

    def model_folder(self) -> Path | None:
        """The rank folder the engine runs: its heartbeat's `model`, else its last model_loaded event."""
        name = self.heartbeat().get("model") or self.model
        if not name:
            return None
        for folder in (Path(name), self.cfg.model_dir / self.symbol / Path(name).name):
            if (folder / "params.json").is_file():
                return folder
        return None


class LiveStore:
    """The feeds of every symbol found in the log and state folders, refreshed under one lock."""

    def __init__(self, cfg: DashConfig) -> None:
        self.cfg = cfg
        self.feeds: dict[str, SymbolFeed] = {}
        self.lock = threading.RLock()

    def symbols(self) -> list[str]:
        found = set(self.feeds)
        for folder in (self.cfg.state_dir, self.cfg.log_dir):
            if folder.is_dir():
                found.update(m.group(1) for p in folder.iterdir() if (m := SYMBOL_RE.match(p.name)))
        return sorted(found)

    def refresh(self, symbol: str) -> SymbolFeed:
        with self.lock:
            feed = self.feeds.get(symbol)
            if feed is None:
                feed = self.feeds[symbol] = SymbolFeed(symbol, self.cfg)
            feed.refresh()
            return feed


# ---------------------------------------------------------------- page pieces
def fmt(value: Any, spec: str = ".4g") -> str:
    """A table cell: `spec` for numbers below 1000, thousands with cents above (an equity of 10234.56 as
    '10,234.56', never the '1.023e+04' four significant digits would print)."""
    if isinstance(value, bool) or value is None:
        return "-" if value is None else ("yes" if value else "no")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return "-"
        return f"{value:,.2f}" if abs(value) >= 1000 else format(value, spec)
    return str(value)


def table(rows: list[dict], columns: list[tuple[str, str]], table_id: str) -> html.Table:
    """A plain HTML table: columns are (record key, header)."""
    head = html.Tr([html.Th(h, style=STYLE_CELL) for _, h in columns])
    body = [html.Tr([html.Td(fmt(r.get(k)), style=STYLE_CELL) for k, _ in columns]) for r in rows]
    return html.Table([html.Thead(head), html.Tbody(body)], id=table_id, style=STYLE_TABLE)


def mode_banner(mode: str) -> tuple[str, dict]:
    text, color = MODES.get(mode, (f"MODE UNKNOWN ({mode or 'no record yet'})", "#5a6268"))
    return text, {"background": color, "color": "white", "fontWeight": "bold", "fontSize": "22px",
                  "padding": "8px 14px", "letterSpacing": "1px"}


def thresholds(sig: dict) -> dict[str, float]:
    src = sig.get("thresholds") if isinstance(sig.get("thresholds"), dict) else sig
    return {k: float(src[k]) for k in ("exec_threshold", "direction_threshold", "aggressive_threshold")
            if isinstance(src.get(k), (int, float))}


def clock_text(t: datetime, now: float) -> str:
    """'12:03 UTC' for a time of today (UTC), else '2026-01-05 12:03 UTC'."""
    t = t.astimezone(timezone.utc)
    today = datetime.fromtimestamp(now, timezone.utc).date()
    return t.strftime("%H:%M UTC" if t.date() == today else "%Y-%m-%d %H:%M UTC")


def run_state(hb: dict, hb_time: datetime | None, online: bool, now: float) -> tuple[str, bool]:
    """(what the engine's last heartbeat says of its run, whether that is alarming).

    The engine's last heartbeat, written as it exits, carries `exit_code` and `stop_reason` (DESIGN.md §3):
    exit 0 is a clean stop ('STOPPED 12:03 UTC (signal SIGINT)'), any other code an exit that needs a look.
    A heartbeat without them that is older than the offline limit is an engine that died or hangs."""
    if hb_time is not None and isinstance(hb.get("exit_code"), int):
        why = f" ({hb['stop_reason']})" if hb.get("stop_reason") else ""
        if hb["exit_code"] == 0:
            return f"STOPPED {clock_text(hb_time, now)}{why}", False
        return f"ENGINE EXITED {clock_text(hb_time, now)} with code {hb['exit_code']}{why}", True
    return ("", False) if online else ("ENGINE OFFLINE", True)


WATCHDOG_FINAL = {"gave_up": "WATCHDOG GAVE UP", "not_restarted": "WATCHDOG DID NOT RESTART"}


def watchdog_status(feed: SymbolFeed, now: float) -> list:
    """The watchdog's restarts today (UTC) and its last one with cause and backoff, or, in red, its last word
    when it stopped supervising (gave up, or an exit code it must not restart) and the engine has not beaten
    since; nothing without a record."""
    final = feed.last_watchdog if feed.last_watchdog.get("event") in WATCHDOG_FINAL else {}
    stopped = record_time(final) if final else None
    beat = record_time(feed.heartbeat())
    if stopped and not (beat and beat > stopped):
        return [html.Span(f" | {WATCHDOG_FINAL[final['event']]} {clock_text(stopped, now)}: {final.get('cause', '?')}",
                          id="watchdog", style={"color": "#c00000", "fontWeight": "bold"})]
    last = feed.last_restart
    if not last:
        return []
    today = feed.restarts.get(datetime.fromtimestamp(now, timezone.utc).date().isoformat(), 0)
    when = record_time(last)
    text = (f" | watchdog restarts today: {today}; last {clock_text(when, now) if when else '?'}: "
            f"{last.get('cause', '?')} (backoff {fmt(last.get('backoff_s'))} s)")
    return [html.Span(text, id="watchdog", style={"color": "#b86e00", "fontWeight": "bold"} if today else {})]


def engine_status(feed: SymbolFeed, now: float) -> list:
    """One line a trader reads first: heartbeat age and phase, stopped/offline, reconciled, kill-switch, entries,
    watchdog restarts."""
    hb = feed.heartbeat()
    hb_time = record_time(hb) if hb else None
    age = now - hb_time.timestamp() if hb_time else math.inf
    last_eq = feed.equity[-1] if feed.equity else {}
    last_sig = feed.signals[-1] if feed.signals else {}
    state, alarming = run_state(hb, hb_time, age <= feed.cfg.offline_sec, now)
    style = {"color": "#c00000" if alarming else "inherit", "fontWeight": "bold"}
    parts = [html.Span(f"heartbeat {age:.0f} s ago, phase {hb.get('phase', '?')}" if hb_time else "no heartbeat",
                       id="heartbeat", style=style),
             html.Span(" | " if state else ""),
             html.Span(state, id="engine-state",
                       style=style if alarming else {"color": "#5a6268", "fontWeight": "bold"}),
             html.Span(f" | reconciled: {fmt(last_eq.get('reconciled'))}"),
             html.Span(f" | kill-switch: {last_eq.get('kill_switch', '-')}", id="kill-switch")]
    if last_sig:
        allowed = last_sig.get("entries_allowed", True)
        why = last_sig.get("entries_reason") or last_sig.get("reason") or ""
        parts.append(html.Span(" | entries allowed" if allowed else f" | ENTRIES PAUSED: {why}", id="entries"))
    return parts + watchdog_status(feed, now)


def add_price_line(fig: go.Figure, y: float, color: str, dash: str, text: str, yref: str = "y") -> None:
    """A horizontal line across the plot with a label at its right end.

    Appended to the layout directly: plotly's add_hline validates the whole figure per call and cost
    ~0.1 s each, most of a refresh.
    """
    fig.layout.shapes += ({"type": "line", "xref": "paper", "x0": 0, "x1": 1, "yref": yref, "y0": y, "y1": y,
                           "line": {"color": color, "dash": dash, "width": 1}},)
    fig.layout.annotations += ({"xref": "paper", "x": 1, "xanchor": "right", "yref": yref, "y": y,
                                "yanchor": "bottom", "text": text, "showarrow": False, "font": {"size": 10}},)


def candles_figure(feed: SymbolFeed) -> go.Figure:
    """Candles of the kept bars, one marker trace per reason, and price lines for orders and TP/SL."""
    bars = list(feed.signals)
    fig = go.Figure(go.Candlestick(x=[utc_text(b.get("bar_time")) for b in bars], open=[b.get("open") for b in bars],
                                   high=[b.get("high") for b in bars], low=[b.get("low") for b in bars],
                                   close=[b.get("close") for b in bars], name="price"))
    first = record_time({"time": bars[0].get("bar_time")}) if bars else None
    for reason, (name, symbol, color) in MARKERS.items():
        marks = [m for m in feed.markers if m["_marker"] == reason and (first is None or (record_time(m) or first) >= first)]
        if marks:
            fig.add_trace(go.Scatter(
                x=[record_utc(m) for m in marks], y=[m.get("price") for m in marks], mode="markers", name=name,
                marker={"symbol": symbol, "size": 12, "color": color, "line": {"width": 1, "color": "white"}},
                text=[f"{m.get('side')} {fmt(m.get('qty'))} @ {fmt(m.get('price'))}" for m in marks]))
    for order in feed.orders:  # the engine journals its resting entries (strategy.RestingOrder)
        if order.get("kind", "entry") == "entry" and isinstance(order.get("price"), (int, float)):
            add_price_line(fig, order["price"], "#1f77b4", "dot",
                           f"resting {side_name(order.get('side'))} {fmt(order.get('qty'))}")
    for pos in feed.equity[-1].get("positions", []) if feed.equity else []:
        for key, color in (("tp", "#2ca02c"), ("sl", "#d62728")):
            if isinstance(pos.get(key), (int, float)):
                add_price_line(fig, pos[key], color, "dash", f"{key.upper()} {fmt(pos[key])} of "
                               f"{side_name(pos.get('side'))} {fmt(pos.get('qty'))} @ {fmt(pos.get('entry_price'))}")
    fig.update_layout(height=460, margin={"l": 40, "r": 10, "t": 30, "b": 20}, xaxis_rangeslider_visible=False,
                      uirevision=feed.symbol, title=f"{feed.symbol}: last {len(bars)} bars", legend={"orientation": "h"})
    return fig


def gauge_figure(name: str, value: float | None, sig: dict) -> go.Figure:
    """One probability against its threshold (exec or direction) and, for direction, the breakout band."""
    th = thresholds(sig)
    line = th.get("exec_threshold" if "exec" in name else "direction_threshold")
    steps = [{"range": [th["aggressive_threshold"], 1.0], "color": "#ffd8b0"}] \
        if "dir" in name and "aggressive_threshold" in th else []
    gauge = {"axis": {"range": [0, 1]}, "bar": {"color": "#444"}, "steps": steps}
    if line is not None:
        gauge["threshold"] = {"line": {"color": "#c00000", "width": 4}, "value": line}
    fig = go.Figure(go.Indicator(mode="gauge+number", value=value if value is not None else math.nan,
                                 number={"valueformat": ".3f"}, gauge=gauge,
                                 title={"text": name.replace("p_", "P ").replace("_", " ")}))
    fig.update_layout(height=200, margin={"l": 25, "r": 25, "t": 55, "b": 5})
    return fig


def probability_history(feed: SymbolFeed) -> go.Figure:
    bars = list(feed.signals)
    x = [utc_text(b.get("bar_time")) for b in bars]
    fig = go.Figure([go.Scatter(x=x, y=[b.get(p) for b in bars], name=p, mode="lines") for p in PROBS])
    for key, dash in (("exec_threshold", "dot"), ("direction_threshold", "dash"), ("aggressive_threshold", "dashdot")):
        value = thresholds(bars[-1]).get(key) if bars else None
        if value is not None:
            add_price_line(fig, value, "#888", dash, key)
    fig.update_layout(height=260, margin={"l": 40, "r": 10, "t": 30, "b": 20}, yaxis_range=[0, 1],
                      title="model probabilities", uirevision=feed.symbol, legend={"orientation": "h"})
    return fig


def equity_figure(feed: SymbolFeed, loss_limit: float | None) -> go.Figure:
    """Equity, unrealised and today's PnL against the kill-switch line, drawdown (one shared time axis)."""
    eq = list(feed.equity)
    x = [record_utc(r) for r in eq]
    fig = make_subplots(rows=3, cols=1, shared_xaxes=True, row_heights=[0.5, 0.28, 0.22], vertical_spacing=0.04)
    fig.add_trace(go.Scatter(x=x, y=[r.get("equity") for r in eq], name="equity"), 1, 1)
    fig.add_trace(go.Scatter(x=x, y=[r.get("unrealised") for r in eq], name="unrealised"), 2, 1)
    fig.add_trace(go.Scatter(x=x, y=[r.get("day_pnl") for r in eq], name="today's PnL"), 2, 1)
    if eq and loss_limit is not None and isinstance(eq[-1].get("day_start_equity"), (int, float)):
        add_price_line(fig, -loss_limit * eq[-1]["day_start_equity"], "#c00000", "dash",
                       f"kill-switch -{loss_limit:.1%}", yref="y2")
    fig.add_trace(go.Scatter(x=x, y=[100 * r["_drawdown"] for r in eq], name="drawdown %", fill="tozeroy",
                             line={"color": "#d62728"}), 3, 1)
    fig.update_layout(height=460, margin={"l": 40, "r": 10, "t": 30, "b": 20}, title="equity",
                      uirevision=feed.symbol, legend={"orientation": "h"})
    return fig


def bar_seconds(feed: SymbolFeed) -> float | None:
    """The bar length, from the last two closed bars' times."""
    if len(feed.signals) < 2:
        return None
    a, b = (record_time({"time": feed.signals[i].get("bar_time")}) for i in (-2, -1))
    return (b - a).total_seconds() if a and b and b > a else None


def orders_rows(feed: SymbolFeed) -> list[dict]:
    """Resting entries (strategy.RestingOrder as journalled) with side named and `placed_bar` (epoch bar grid)
    shown as that bar's UTC open time."""
    step = bar_seconds(feed)
    return [dict(o, side=side_name(o.get("side")),
                 placed=datetime.fromtimestamp(o["placed_bar"] * step, timezone.utc).strftime("%Y-%m-%d %H:%M")
                 if step and isinstance(o.get("placed_bar"), int) else o.get("placed_bar"))
            for o in feed.orders]


def positions_rows(feed: SymbolFeed, now: float) -> list[dict]:
    """Open positions (strategy.Position as journalled) with side named, age and unrealised at the last close.

    `fill_bar` counts bars on the epoch grid (bar open time // bar length), so its open time is
    fill_bar x bar length; age runs to the end of the last journalled bar (the engine's market clock, which
    in paper replays is not the wall clock), else to `now`; unrealised = side x qty x (last close - entry price).
    """
    rows = []
    step, close = bar_seconds(feed), (feed.signals[-1].get("close") if feed.signals else None)
    last_ms = feed.signals[-1].get("bar_ms") if feed.signals else None
    clock = last_ms / 1000 + step if step and isinstance(last_ms, (int, float)) else now
    for pos in feed.equity[-1].get("positions", []) if feed.equity else []:
        row = dict(pos, side=side_name(pos.get("side")))
        if step and isinstance(pos.get("fill_bar"), int):
            row["age"] = f"{(clock - pos['fill_bar'] * step) / 60:.0f} min"
        if "unrealised" not in pos and isinstance(close, (int, float)) and pos.get("side") in (1, -1) \
                and isinstance(pos.get("qty"), (int, float)) and isinstance(pos.get("entry_price"), (int, float)):
            row["unrealised"] = pos["side"] * pos["qty"] * (close - pos["entry_price"])
        rows.append(row)
    return rows


def health_section(feed: SymbolFeed) -> list:
    last = feed.equity[-1] if feed.equity else {}
    streams = [dict(v, name=k) for k, v in (last.get("streams") or {}).items() if isinstance(v, dict)]
    drift = last.get("drift") or {}
    pairs = drift.items() if isinstance(drift, dict) else [tuple(p) for p in drift]
    levels = last.get("drift_levels") if isinstance(last.get("drift_levels"), dict) else {}
    drift_rows = sorted(({"feature": k, "psi": v, "level": levels.get(k)} for k, v in pairs),
                        key=lambda r: -float(r["psi"] or 0) / float(r["level"] or 1))   # furthest above its level
    latencies = [s["latency_ms"] for s in feed.signals if isinstance(s.get("latency_ms"), (int, float))]
    return [html.H3("Health"),
            html.Div(f"data lag {fmt(last.get('data_lag_s'))} s | API errors {fmt(last.get('api_errors'))} | "
                     f"bar-close latency last {fmt(latencies[-1] if latencies else None)} ms, "
                     f"max {fmt(max(latencies) if latencies else None)} ms", id="health-line"),
            table(streams, [("name", "stream"), ("age_s", "age s"), ("state", "state"), ("reconnects", "reconnects"),
                            ("gaps", "book gaps")], "streams-table"),
            table(drift_rows, [("feature", "feature"), ("psi", "PSI vs training"),
                               ("level", "alert above (chance level)")], "drift-table")]


def model_card(feed: SymbolFeed) -> tuple[list, float | None]:
    """The loaded model's params.json essentials and its report link; also its kill-switch limit."""
    folder = feed.model_folder()
    if folder is None:
        return [html.H3("Model"), html.Div("no model journalled yet", id="model-card")], None
    params = read_json(folder / "params.json")
    metrics = params.get("metrics") or {}
    study, soos = metrics.get("study") or {}, metrics.get("super_oos") or {}
    rows = [{"k": "model", "v": str(folder)}, {"k": "verdict", "v": params.get("verdict")},
            {"k": "deflated Sharpe (DSR)", "v": study.get("deflated_sharpe")}, {"k": "PBO", "v": study.get("pbo")},
            *({"k": f"Super-OOS {k}", "v": soos[k]} for k in SUPER_OOS_KEYS if k in soos),
            *({"k": k, "v": v} for k, v in (params.get("thresholds") or {}).items())]
    limit = ((params.get("config") or {}).get("strategy") or {}).get("daily_loss_limit")
    link = html.A("training report (report.html)", href=f"/model/{feed.symbol}/report.html", target="_blank",
                  id="model-report-link") if (folder / "report.html").is_file() else html.Span("no report.html")
    return [html.H3("Model"), html.Div([table(rows, [("k", "field"), ("v", "value")], "model-table"), link],
                                       id="model-card")], limit if isinstance(limit, (int, float)) else None


def symbol_body(feed: SymbolFeed, now: float) -> list:
    if not feed.signals and not feed.equity:
        return [html.Div(f"{feed.symbol}: the engine has written no closed bar yet", id="waiting")]
    card, loss_limit = model_card(feed)
    last = feed.signals[-1] if feed.signals else {}
    gauges = [dcc.Graph(id=f"gauge-{p}", figure=gauge_figure(p, last.get(p), last), config={"displayModeBar": False},
                        style={"width": "24%", "display": "inline-block"}) for p in PROBS]
    closed = list(feed.closed)[::-1]
    return [dcc.Graph(id="candles", figure=candles_figure(feed)),
            html.Div(gauges, id="gauges"),
            dcc.Graph(id="prob-history", figure=probability_history(feed)),
            dcc.Graph(id="equity", figure=equity_figure(feed, loss_limit)),
            html.H3("Open positions"),
            table(positions_rows(feed, now), [("side", "side"), ("regime", "regime"), ("entry_price", "entry"),
                                              ("qty", "size"), ("tp", "TP"), ("sl", "SL"), ("age", "age"),
                                              ("unrealised", "unrealised at last close")], "positions-table"),
            html.H3("Resting entry orders"),
            table(orders_rows(feed),
                  [("side", "side"), ("price", "price"), ("qty", "qty"), ("tp_dist", "TP distance"),
                   ("sl_dist", "SL distance"), ("placed", "placed at bar (UTC)")], "orders-table"),
            html.H3("Exit fills (closed trades)"),
            table(closed, [("time", "time"), ("position_id", "id"), ("side", "side"), ("event", "exit"),
                           ("price", "price"), ("qty", "qty"), ("fee", "fee"), ("pnl", "pnl")], "closed-table"),
            html.H3("Daily PnL"),
            table(list(feed.daily.values())[::-1], [("day", "day (UTC)"), ("day_start_equity", "start equity"),
                                                    ("day_pnl", "PnL"), ("kill_switch", "kill-switch")], "daily-table"),
            *health_section(feed),
            html.H3("Recent events"),
            table(list(feed.events)[:-21:-1], [("time", "time"), ("event", "event"), ("level", "level"),
                                               ("message", "message")], "events-table"),
            *card]


NONE_SHOWN = ["", 0]
NO_ENGINE = ("No engine running: no journals in {log} and no state in {state}. "
             "Start live_trading_v2.py (or point --log-dir/--state-dir at its folders).")


# ---------------------------------------------------------------- the app
def build_app(cfg: DashConfig, auth: tuple[str, str] | None = None,
              clock: Callable[[], float] = time.time) -> Dash:
    """The Dash app over `cfg`'s folders; `auth` = (user, password) turns on HTTP basic auth."""
    store = LiveStore(cfg)
    app = Dash(__name__, title="PurpleSky live", update_title=None)
    server = app.server

    if auth is not None:
        @server.before_request
        def _require_auth() -> Response | None:
            given = request.authorization
            ok = given is not None and given.type == "basic" and \
                hmac.compare_digest((given.username or "").encode(), auth[0].encode()) & \
                hmac.compare_digest((given.password or "").encode(), auth[1].encode())
            return None if ok else Response("authentication required", 401,
                                            {"WWW-Authenticate": 'Basic realm="PurpleSky"'})

    @server.route("/model/<symbol>/report.html")
    def _report(symbol: str) -> Response:
        if symbol not in store.symbols():
            abort(404)
        folder = store.refresh(symbol).model_folder()
        if folder is None or not (folder / "report.html").is_file():
            abort(404)
        return send_file((folder / "report.html").resolve(), mimetype="text/html")

    def layout() -> html.Div:
        symbols = store.symbols()
        return html.Div([
            html.Div([html.Span("PurpleSky live ", style={"fontSize": "20px", "fontWeight": "bold"}),
                      dcc.Dropdown(id="symbol", options=symbols, value=symbols[0] if symbols else None,
                                   clearable=False, style={"width": "220px", "display": "inline-block",
                                                           "verticalAlign": "middle"})]),
            html.Div(id="mode-banner"), html.Div(id="engine-status", style={"padding": "4px 0"}),
            html.Div(id="body"), dcc.Store(id="shown"),
            dcc.Interval(id="tick", interval=int(cfg.refresh_sec * 1000))], style={"fontFamily": "sans-serif"})

    app.layout = layout

    @app.callback(Output("symbol", "options"), Output("mode-banner", "children"), Output("mode-banner", "style"),
                  Output("engine-status", "children"), Output("shown", "data"),
                  Input("tick", "n_intervals"), Input("symbol", "value"), State("shown", "data"))
    def _tick(_: int | None, symbol: str | None, shown: list | None) -> tuple:
        """Every tick: read what was appended, update the status; `shown` changes only with new records."""
        symbols = store.symbols()
        if not symbols:
            text, style = mode_banner("")
            return [], "NO ENGINE RUNNING", style, "", no_update if shown == NONE_SHOWN else NONE_SHOWN
        with store.lock:
            feed = store.refresh(symbol if symbol in symbols else symbols[0])
            text, style = mode_banner(feed.mode or str(feed.heartbeat().get("mode", "")))
            current = [feed.symbol, feed.version]
            return (symbols, text, style, engine_status(feed, clock()),
                    no_update if shown == current else current)

    @app.callback(Output("body", "children"), Input("shown", "data"))
    def _body(shown: list | None) -> Any:
        """Charts and tables, rebuilt only when the journals grew (a tick is cheap when nothing changed)."""
        if not shown or shown == NONE_SHOWN:
            msg = NO_ENGINE.format(log=cfg.log_dir, state=cfg.state_dir)
            return html.Div(msg, id="no-engine", style={"fontSize": "18px"})
        with store.lock:
            return symbol_body(store.feeds[shown[0]], clock())

    return app


def parse_auth(spec: str) -> tuple[str, str]:
    """`USER:FILE` -> (user, password read from FILE, trailing newline stripped); ValueError if unusable."""
    user, sep, file = spec.partition(":")
    if not sep or not user or not file:
        raise ValueError("--auth expects USER:FILE (the password is read from FILE)")
    try:
        password = Path(file).read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        raise ValueError(f"--auth: cannot read the password file {file}: {exc.strerror}") from None
    if not password:
        raise ValueError(f"--auth: the password file {file} is empty")
    return user, password


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--log-dir", default="logs", help="the engine's journal folder")
    p.add_argument("--state-dir", default="state", help="the engine's state folder (heartbeat, bot state)")
    p.add_argument("--model-dir", default="models_v9", help="model folder, to find the model the engine loaded")
    p.add_argument("--host", default="127.0.0.1", help="bind address; a non-loopback address needs --auth")
    p.add_argument("--port", type=int, default=8050)
    p.add_argument("--refresh-sec", type=float, default=2.0, help="page refresh interval")
    p.add_argument("--bars", type=int, default=300, help="bars shown in the charts")
    p.add_argument("--auth", default="", metavar="USER:FILE", help="HTTP basic auth; the password is read from FILE")
    notifier.add_arguments(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    try:
        auth = parse_auth(args.auth) if args.auth else None
        if auth is None and not is_loopback(args.host):
            raise ValueError(f"refusing to serve on non-loopback host {args.host} without --auth USER:FILE")
        watcher = notifier.watcher_from_args(args)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    cfg = DashConfig(Path(args.log_dir), Path(args.state_dir), Path(args.model_dir), bars=args.bars,
                     refresh_sec=args.refresh_sec, offline_sec=args.notify_offline_sec)
    if watcher is not None:
        watcher.start(args.notify_poll_sec)
    server = make_server(args.host, args.port, build_app(cfg, auth).server, threaded=True)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    print(f"dashboard on http://{args.host}:{server.server_port}/ (read-only; Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        if watcher is not None:
            watcher.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
