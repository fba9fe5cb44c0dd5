"""Live files of the DESIGN.md §3 schema for dashboard and notifier tests: journals, state, heartbeat, a model.

`write_live_fixture(root)` lays out `root/logs`, `root/state` and `root/models_v9/<SYM>/rank_1` as a
running engine would (paths relative to `root`, the engine's working directory) and returns what it
wrote, so tests compare the page against the journals rather than against constants.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from config import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
START = datetime(2026, 1, 5, tzinfo=timezone.utc)
BAR = timedelta(minutes=5)
THRESHOLDS = {"exec_threshold": 0.6, "direction_threshold": 0.55, "aggressive_threshold": 0.87}
DAILY_LOSS_LIMIT = 0.03
# (entry bar, exit bar or None, side, entry reason, exit event): one of each marker reason.
TRADES = [(10, 14, "long", "chop", "tp"), (20, 23, "short", "breakout", "sl"),
          (30, 40, "long", "chop", "time_exit"), (44, 47, "long", "breakout", "kill_exit"),
          (54, None, "short", "chop", None)]


@dataclass
class Fixture:
    root: Path
    symbol: str
    mode: str
    signals: list[dict] = field(default_factory=list)
    trades: list[dict] = field(default_factory=list)
    markers: int = 0

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def state(self) -> Path:
        return self.root / "state"

    def journal(self, name: str) -> Path:
        return self.logs / f"{name}_{self.symbol}.jsonl"


def iso(t: datetime) -> str:
    """UTC time as the engine writes it (live_trading_v2.iso)."""
    return t.isoformat(timespec="milliseconds")


def stamp(t: datetime, symbol: str, mode: str) -> dict:
    """The fields every live record carries: UTC time as ISO and in ms, symbol, mode."""
    return {"ts": int(t.timestamp() * 1000), "time": iso(t), "symbol": symbol, "mode": mode}


def append(path: Path, records: list[dict], torn: str = "") -> None:
    """Append whole lines (as the engine does), then optionally a torn, unterminated tail."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in records) + torn)


def signal_record(i: int, symbol: str, mode: str) -> dict:
    """Bar i: a smooth price path and four distinct probabilities."""
    t = START + i * BAR
    close = 100.0 + 3.0 * math.sin(i / 7.0) + 0.05 * i
    open_ = 100.0 + 3.0 * math.sin((i - 1) / 7.0) + 0.05 * (i - 1)
    rec = stamp(t + BAR, symbol, mode)
    rec.update({
        "bar_time": iso(t), "bar_ms": int(t.timestamp() * 1000), "open": round(open_, 4), "high": round(max(open_, close) + 0.4, 4),
        "low": round(min(open_, close) - 0.4, 4), "close": round(close, 4), "volume": 10.0 + i % 7,
        "atr": 0.8, "warm": True,
        "p_exec_long": round(0.5 + 0.4 * math.sin(i * 0.3), 4),
        "p_exec_short": round(0.5 + 0.4 * math.cos(i * 0.3), 4),
        "p_dir_long": round(0.5 + 0.35 * math.sin(i * 0.2 + 1.0), 4),
        "p_dir_short": round(0.5 + 0.35 * math.cos(i * 0.2 + 1.0), 4),
        **THRESHOLDS, "entries_allowed": True, "reason": "", "intents": [], "latency_ms": 12.5 + i % 5,
    })
    return rec


def _trade(t: datetime, fx: Fixture, event: str, side: str, kind: str, price: float, pid: str,
           reason: str, fee: float = 0.0, pnl: float | None = None) -> dict:
    rec = stamp(t, fx.symbol, fx.mode)
    rec.update({"event": event, "order_link_id": f"ps-{pid}-{kind}", "side": "Buy" if (side == "long") == (kind == "entry") else "Sell",
                "kind": kind, "price": price, "qty": 0.5, "fee": fee, "pnl": pnl, "position_id": pid, "reason": reason})
    return rec


def trade_records(fx: Fixture) -> list[dict]:
    """Order events for TRADES: placed/accepted (no marker), entry fills and exits (one marker each)."""
    out = []
    for n, (entry, exit_, side, reason, exit_event) in enumerate(TRADES):
        pid = f"p{n}"
        bar = fx.signals[entry]
        t = START + (entry + 1) * BAR
        price = bar["close"]
        out.append(_trade(t, fx, "placed", side, "entry", price, pid, reason))
        out.append(_trade(t, fx, "filled", side, "entry", price, pid, reason, fee=0.01))
        if exit_ is not None:
            xp = fx.signals[exit_]["close"]
            pnl = (xp - price) * 0.5 * (1 if side == "long" else -1)
            out.append(_trade(START + (exit_ + 1) * BAR, fx, exit_event, side,
                              "tp" if exit_event == "tp" else "sl" if exit_event == "sl" else "exit",
                              xp, pid, exit_event, fee=0.02, pnl=round(pnl, 4)))
    return out


def open_position(fx: Fixture) -> dict:
    """The open short as the engine journals it: vars(strategy.Position), fill_bar on the epoch bar grid."""
    entry = fx.signals[TRADES[-1][0]]["close"]
    fill_bar = int((START + (TRADES[-1][0] + 1) * BAR).timestamp()) // int(BAR.total_seconds())
    return {"side": -1, "qty": 0.5, "entry_price": entry, "tp": round(entry - 1.2, 4), "sl": round(entry + 1.6, 4),
            "fill_bar": fill_bar, "regime": "maker"}


def equity_record(i: int, fx: Fixture) -> dict:
    t = START + (i + 1) * BAR
    rec = stamp(t, fx.symbol, fx.mode)
    equity = 1000.0 + 2.0 * math.sin(i / 9.0) - 0.02 * i
    rec.update({
        "equity": round(equity, 4), "unrealised": -0.12, "day_start_equity": 1000.0,
        "day_pnl": round(equity - 1000.0, 4), "kill_switch": "armed", "positions": [open_position(fx)],
        "data_lag_s": 0.3,
        "streams": {"market": {"state": "ok", "age_s": 0.2}, "private": {"state": "ok", "age_s": 4.0}},
        "reconciled": True, "api_errors": 1, "drift": {"ob_imbalance": 0.31, "ret_5": 0.12, "vol_20": 0.04},
        "drift_levels": {"ob_imbalance": 0.25, "ret_5": 0.05, "vol_20": 0.25},
    })
    return rec


def write_live_fixture(root: Path, symbol: str = "BTCUSDT", mode: str = "paper", bars: int = 60,
                       heartbeat_ms: int | None = None) -> Fixture:
    """Every §3 live file for one symbol with `bars` closed bars, five trades and a rank_1 model."""
    fx = Fixture(root=root, symbol=symbol, mode=mode)
    fx.signals = [signal_record(i, symbol, mode) for i in range(bars)]
    append(fx.journal("signals"), fx.signals)
    fx.trades = trade_records(fx)
    fx.markers = sum(1 for r in fx.trades if r["event"] != "placed")
    append(fx.journal("trades"), fx.trades)
    pos = open_position(fx)
    orders = stamp(START + bars * BAR, symbol, mode)
    # Resting entries as the engine journals them: vars(strategy.RestingOrder).
    orders["orders"] = [{"side": 1, "price": round(fx.signals[-1]["close"] - 0.6, 4), "qty": 0.5,
                         "placed_bar": pos["fill_bar"] + 5, "tp_dist": 1.0, "sl_dist": 1.6}]
    append(fx.journal("open_orders"), [orders])
    append(fx.journal("equity"), [equity_record(i, fx) for i in range(bars)])
    model = f"models_v9/{symbol}/rank_1"
    events = [dict(stamp(START, symbol, mode), event="startup", level="info", message="engine started"),
              dict(stamp(START, symbol, mode), event="model_loaded", level="info", message="model loaded", model=model),
              dict(stamp(START, symbol, mode), event="reconciled", level="info", message="reconciled: 0 positions")]
    append(fx.journal("events"), events)
    write_state(fx, heartbeat_ms if heartbeat_ms is not None else int(datetime.now(timezone.utc).timestamp() * 1000))
    write_model(root / model, symbol)
    return fx


def write_state(fx: Fixture, heartbeat_ms: int, phase: str = "trading", **heartbeat: object) -> None:
    """The bot state and, atomically as the engine does, a heartbeat of `phase` (plus `heartbeat` fields, e.g. the
    last one's `exit_code` and `stop_reason`)."""
    fx.state.mkdir(parents=True, exist_ok=True)
    (fx.state / f"bot_state_{fx.symbol}.json").write_text(json.dumps(
        {"version": 1, "symbol": fx.symbol, "mode": fx.mode, "positions": [open_position(fx)]}))
    atomic_write_text(fx.state / f"heartbeat_{fx.symbol}.json", json.dumps(
        {"ts": heartbeat_ms, "symbol": fx.symbol, "mode": fx.mode, "pid": 4242, "phase": phase, "open_positions": 1,
         "last_stop_check": iso(START + 60 * BAR), "model": f"models_v9/{fx.symbol}/rank_1", **heartbeat}))


def write_model(folder: Path, symbol: str) -> None:
    """params.json with the fields the model card shows (as train.candidate_params writes them) and a report."""
    folder.mkdir(parents=True, exist_ok=True)
    params = {"symbol": symbol, "timeframe": "5m", "rank": 1, "trial": 17, "edge": True, "verdict": "EDGE",
              "thresholds": THRESHOLDS,
              "metrics": {"super_oos": {"sharpe": 1.9, "total_return": 0.042, "trades": 31, "max_drawdown": -0.018},
                          "study": {"deflated_sharpe": 0.97, "pbo": 0.12, "n_trials": 40}},
              "config": {"strategy": {"daily_loss_limit": DAILY_LOSS_LIMIT}}}
    (folder / "params.json").write_text(json.dumps(params))
    (folder / "report.html").write_text(f"<html><body><h1>Training report {symbol} rank 1</h1></body></html>")


def start_dashboard(cwd: Path, *args: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """Run live_dashboard.py as a child on a free 127.0.0.1 port (--port 0); returns (process, base URL).

    The child prints its URL once it is listening; a child that exits first fails with its stderr.
    """
    cmd = [sys.executable, str(ROOT / "live_dashboard.py"), "--port", "0", *args]
    err = cwd / "dashboard_stderr.log"
    with open(err, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=fh, text=True,
                                env={**os.environ, **(env or {})})
    line = proc.stdout.readline()  # type: ignore[union-attr]
    match = re.search(r"(http://[0-9.]+:\d+)/", line)
    if not match:
        proc.kill()
        raise RuntimeError(f"dashboard did not start: {line!r} {err.read_text()}")
    return proc, match.group(1)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
