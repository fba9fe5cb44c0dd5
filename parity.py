"""parity.py: the shadow replay that proves the bot trades what was tested.

    python parity.py --model-dir models_v9/DEMOUSDT/rank_1 --data-dir data/DEMOUSDT_Sim_s7_a1 \
        --start 2026-01-13T00:00 --end 2026-01-13T01:00 [--out parity_out] [--set section.field=value ...] [--speed N]

One command, four layers (issue 14). `paper_exchange.py` replays --data-dir from --start in lockstep (market
time moves only when the engine has processed what it was sent) and `live_trading_v2.py --paper` trades it
with the model (warm-up from the files before --start), both as child processes on 127.0.0.1; then the
engine's journals (DESIGN §3 live files) are checked against the research code on the same data:

1. Bars: the engine's bars equal `data_loader`'s, every column of every bar.
2. Features and probabilities: equal (within 1e-9) to `compute_features` + the models on the engine's own
   window at each bar; the largest deviation from a full-history recompute is reported too.
3. Decisions: `strategy.decide` through `execution.Execution`, fed the engine's recorded exchange events,
   gives the engine's own intents, intent for intent.
4. Backtest vs live: `run_backtest(record_intents=True)` on the same span: intents equal until the first fill
   the two fill models settle differently (reported with both states); trades matched one to one and their
   price, fee and PnL differences held against `Tolerance` (stated in the report and the README).

Exit 0 when every layer holds, 1 when layer 1-3 differ (the first differing item is printed) or layer 4 is
beyond its tolerance, 2 on bad arguments or a child process that failed. Writes parity.json (counts per layer)
and parity_report.html (report.py blocks) to --out. The layer comparisons are pure functions over frames.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

import metrics
import strategy as st
from backtest import DEPTH_COLUMNS, PROB_COLUMNS
from config import ConfigError, GlobalConfig, LiveSettings, atomic_write_text, config_from_args, timeframe_seconds

log = logging.getLogger("parity")

ROOT = Path(__file__).resolve().parent
INTENT_FIELDS = ["kind", "side", "reason", "qty", "price", "tp_dist", "sl_dist"]
# trades_<SYM>.jsonl events (execution.py's journal records) -> the ExecEvent type that produced them
FILL_EVENTS = ("filled", "partially_filled", "tp", "sl", "time_exit", "kill_exit")
EXEC_EVENT_TYPES = {**{e: "fill" for e in FILL_EVENTS}, "accepted": "accepted", "rejected": "rejected",
                    "cancelled": "cancelled", "expired": "expired", "triggered": "triggered"}
EXACT = 0.0
OPEN = "open"                  # a position the data ended on: live still holds it, the backtest closed it
FEATURE_TOL = 1e-9


class ParityError(RuntimeError):
    """A run that cannot be judged (bad input, a child process that failed): exit 2, naming what and where."""


# ---------------------------------------------------------------- results
@dataclass
class LayerResult:
    """One layer's verdict: how many items were compared, how many differ, and the first difference."""
    name: str
    compared: int = 0
    mismatches: int = 0
    first: dict | None = None
    details: dict = field(default_factory=dict)
    note: str = ""      # what the counts alone do not say (layer 4: intents and trades each side, first fill)

    @property
    def ok(self) -> bool:
        return self.mismatches == 0

    def summary(self) -> str:
        head = f"{self.name}: {self.compared} compared, {self.mismatches} differ" + (f" ({self.note})" if self.note
                                                                                     else "")
        return head if self.first is None else f"{head}; first: {json.dumps(metrics.json_safe(self.first))}"


@dataclass
class Tolerance:
    """Layer 4's stated tolerance: the paper exchange fills resting limits only up to each recorded trade's
    size and walks the book for market orders, the backtest fills whole orders at the bar's price plus a fixed
    slippage, so matched trades may differ by a few spreads and the depth a market order walks, and in
    quantity (a partly filled entry): PnL is compared per unit of notional traded."""
    price_bps: float = 30.0        # |entry or exit price difference| per matched trade, in bps of price
    pnl_bps: float = 60.0          # |net return difference| per matched trade (PnL over the notional each traded), bps
    unmatched_share: float = 0.10  # trades on one side only, as a share of the larger trade count
    equity_share: float = 0.01     # |final equity difference| as a share of the initial equity


def _same(a: Any, b: Any, tol: float) -> bool:
    """Equal values: NaN equals NaN, numbers within tol·max(1, |a|, |b|), anything else by ==."""
    return not bool(_differs(pd.Series([a], dtype=object), pd.Series([b], dtype=object), tol)[0])


def _differs(a: pd.Series, b: pd.Series, tol: float) -> np.ndarray:
    """Row-wise inequality of two equally long columns, as `_same` defines equality."""
    x = pd.to_numeric(a, errors="coerce").to_numpy(np.float64)
    y = pd.to_numeric(b, errors="coerce").to_numpy(np.float64)
    numeric = (a.map(_is_number) & b.map(_is_number)).to_numpy(bool)
    with np.errstate(invalid="ignore"):
        close = (x == y) | (np.abs(x - y) <= tol * np.maximum(1.0, np.maximum(np.abs(x), np.abs(y))))
    close |= np.isnan(x) & np.isnan(y)
    return np.where(numeric, ~close, a.to_numpy(object) != b.to_numpy(object))


def _is_number(v: Any) -> bool:
    return isinstance(v, (float, int, np.floating, np.integer)) and not isinstance(v, (bool, np.bool_))


# ---------------------------------------------------------------- live files (DESIGN §3)
def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSON-lines journal; a torn or non-object line is an error naming file and line."""
    records = []
    try:
        with open(path, encoding="utf-8") as fh:
            for line_no, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ParityError(f"{path}: line {line_no}: not JSON ({exc.msg})") from None
                if not isinstance(rec, dict):
                    raise ParityError(f"{path}: line {line_no}: expected an object, got {type(rec).__name__}")
                records.append(rec)
    except OSError as exc:
        raise ParityError(f"cannot read {path}: {exc.strerror}") from None
    return records


def _bar_time(rec: dict, where: str) -> pd.Timestamp:
    """A signals record's bar open time (ISO string or epoch ms)."""
    value = rec.get("bar_time")
    try:
        return (pd.Timestamp(int(value), unit="ms", tz="UTC") if isinstance(value, (int, float))
                else pd.Timestamp(value).tz_convert("UTC") if pd.Timestamp(value).tzinfo else
                pd.Timestamp(value, tz="UTC"))
    except (TypeError, ValueError):
        raise ParityError(f"{where}: bar_time {value!r} is not a time") from None


def _num(value: Any) -> float:
    """A journal number; null (JSON's NaN) as NaN."""
    return math.nan if value is None else float(value)


def signals_frame(records: list[dict], source: str = "signals") -> pd.DataFrame:
    """One row per closed bar (index = bar open, UTC): open..volume, atr, warm, p_*, entries_allowed,
    window_bars, the book depths DEPTH_COLUMNS (NaN when the record has no `bar`). Duplicate or backwards bar
    times are an error naming the record."""
    rows, times = [], []
    for n, rec in enumerate(records, start=1):
        times.append(_bar_time(rec, f"{source} record {n}"))
        rows.append({"open": _num(rec.get("open")), "high": _num(rec.get("high")), "low": _num(rec.get("low")),
                     "close": _num(rec.get("close")), "volume": _num(rec.get("volume")), "atr": _num(rec.get("atr")),
                     "warm": bool(rec.get("warm", False)), **{c: _num(rec.get(c)) for c in PROB_COLUMNS},
                     "entries_allowed": bool(rec.get("entries_allowed", True)),
                     "window_bars": int(rec.get("window_bars") or 0),
                     **{c: _num((rec.get("bar") or {}).get(c)) for c in DEPTH_COLUMNS}})
    index = pd.DatetimeIndex(times, name="time")
    if len(index) and not index.is_monotonic_increasing or index.has_duplicates:
        bad = int(np.flatnonzero(np.r_[False, np.diff(index.asi8) <= 0])[0]) + 1
        raise ParityError(f"{source} record {bad}: bar {index[bad - 1]} is not after the previous bar")
    return pd.DataFrame(rows, index=index)


def engine_bars(records: list[dict], columns: list[str], source: str = "signals") -> pd.DataFrame:
    """The engine's full bars (its `bar` field, written with --log-features), columns in `columns` order."""
    missing = [n for n, rec in enumerate(records, start=1) if not isinstance(rec.get("bar"), dict)]
    if missing:
        raise ParityError(f"{source} record {missing[0]}: no 'bar' object (run the engine with --log-features)")
    index = pd.DatetimeIndex([_bar_time(r, f"{source} record {n}") for n, r in enumerate(records, 1)], name="time")
    frame = pd.DataFrame([{c: r["bar"].get(c) for c in columns} for r in records], index=index)
    return frame.astype({c: float for c in columns if frame[c].dtype == object})


def engine_features(records: list[dict], window_bars: int, source: str = "signals") -> pd.DataFrame:
    """The engine's feature vector per bar (its `features` field, --log-features) plus p_*, warm and
    window_bars: the record's own, else `window_bars` (the engine's rule: the last that many bars, or all)."""
    rows, index = [], []
    for n, rec in enumerate(records, start=1):
        if not isinstance(rec.get("features"), dict):
            raise ParityError(f"{source} record {n}: no 'features' object (run the engine with --log-features)")
        rows.append({**{k: _num(v) for k, v in rec["features"].items()}, **{c: _num(rec.get(c)) for c in PROB_COLUMNS},
                     "window_bars": int(rec.get("window_bars") or window_bars), "warm": bool(rec.get("warm"))})
        index.append(_bar_time(rec, f"{source} record {n}"))
    return pd.DataFrame(rows, index=pd.DatetimeIndex(index, name="time"))


def _side(value: Any) -> int:
    """+1 long / -1 short from 1/-1, 'long'/'short' or 'Buy'/'Sell'."""
    if isinstance(value, str):
        return {"long": 1, "buy": 1, "short": -1, "sell": -1}[value.lower()]
    return int(value)


def engine_intents(records: list[dict], source: str = "signals") -> pd.DataFrame:
    """Every intent of every bar in journal order: time (decision bar open), kind, side, reason, qty, price,
    tp_dist, sl_dist (the shape of `backtest.BacktestResult.intents`)."""
    rows = []
    for n, rec in enumerate(records, start=1):
        when = _bar_time(rec, f"{source} record {n}")
        for item in rec.get("intents") or []:
            try:
                rows.append({"time": when, "kind": str(item["kind"]), "side": _side(item["side"]),
                             "reason": str(item.get("reason", "")), "qty": _num(item.get("qty")),
                             "price": _num(item.get("price")), "tp_dist": _num(item.get("tp_dist")),
                             "sl_dist": _num(item.get("sl_dist"))})
            except (KeyError, ValueError, TypeError) as exc:
                raise ParityError(f"{source} record {n}: unreadable intent {item!r} ({exc})") from None
    return pd.DataFrame(rows, columns=["time"] + INTENT_FIELDS)


def live_trades(records: list[dict], source: str = "trades") -> pd.DataFrame:
    """Closed round trips from the trades journal's fill records (execution.py writes one per applied
    execution: entries filled/partially_filled, exits tp/sl/time_exit/kill_exit/partially_filled): per
    position_id the qty-weighted entry and exit prices, fees and net PnL, in the columns of
    `backtest.BacktestResult.trades` that layer 4 compares; a position still open has exit_reason "open"
    and no exit (NaT/NaN)."""
    legs: dict[str, dict] = {}
    for n, rec in enumerate(records, start=1):
        if rec.get("event") not in FILL_EVENTS:
            continue
        pid = str(rec.get("position_id") or "")
        if not pid:
            raise ParityError(f"{source} record {n}: a fill without position_id")
        leg = legs.setdefault(pid, {"entry": [], "exit": [], "side": 0, "reason": ""})
        qty, price, fee = _num(rec.get("qty")), _num(rec.get("price")), _num(rec.get("fee") or 0.0)
        when = pd.Timestamp(int(rec["ts"]), unit="ms", tz="UTC")
        if rec.get("kind") == "entry":
            leg["side"] = _side(rec["side"])
            leg["entry"].append((when, qty, price, fee))
        else:
            leg["exit"].append((when, qty, price, fee))
            leg["reason"] = str(rec.get("event") if rec.get("event") != "partially_filled" else rec.get("kind"))
    rows = []
    for pid, leg in legs.items():
        if not leg["entry"]:
            continue
        qty = sum(q for _, q, _, _ in leg["entry"])
        entry_px = sum(q * p for _, q, p, _ in leg["entry"]) / qty
        out_qty = sum(q for _, q, _, _ in leg["exit"])
        exit_px = sum(q * p for _, q, p, _ in leg["exit"]) / out_qty if out_qty else math.nan
        fees = sum(f for *_, f in leg["entry"]) + sum(f for *_, f in leg["exit"])
        rows.append({"position_id": pid, "entry_time": leg["entry"][0][0],
                     "exit_time": leg["exit"][-1][0] if leg["exit"] else pd.NaT,
                     "side": "long" if leg["side"] == 1 else "short", "qty": qty, "entry_price": entry_px,
                     "exit_price": exit_px, "fees": fees, "exit_reason": leg["reason"] if leg["exit"] else OPEN,
                     "pnl": leg["side"] * min(qty, out_qty) * (exit_px - entry_px) - fees})
    cols = ["position_id", "entry_time", "exit_time", "side", "qty", "entry_price", "exit_price", "fees",
            "exit_reason", "pnl"]
    return pd.DataFrame(rows, columns=cols).sort_values("entry_time", kind="stable").reset_index(drop=True)


# ---------------------------------------------------------------- signals -> backtest.py --signals
def signals_to_backtest_csv(signals_path: Path, out_csv: Path) -> int:
    """Write `backtest.py --signals` input (time, p_*, open, high, low, close, atr, volume and the book depths
    the entry size cap reads) from a live
    `signals_<SYM>.jsonl`; returns the rows written. Bars before the first warm one are left out (the
    backtest starts there); a later bar that is not warm gets probability 0 (no signal), as the engine
    treats it."""
    frame = signals_frame(read_jsonl(signals_path), str(signals_path))
    warm = frame["warm"].to_numpy(bool) & np.isfinite(frame[PROB_COLUMNS].to_numpy()).all(axis=1)
    if not warm.any():
        raise ParityError(f"{signals_path}: no warm bar with probabilities to backtest")
    frame = frame.iloc[int(np.argmax(warm)):].copy()
    cold = ~warm[int(np.argmax(warm)):]
    frame.loc[cold, PROB_COLUMNS] = 0.0
    out = frame[PROB_COLUMNS + ["open", "high", "low", "close", "atr", "volume", *DEPTH_COLUMNS]]
    atomic_write_text(out_csv, out.to_csv(index_label="time", float_format="%.17g"))
    return len(out)


# ---------------------------------------------------------------- layer 1: bars
def compare_bars(engine: pd.DataFrame, reference: pd.DataFrame, tol: float = EXACT) -> LayerResult:
    """Every column of every engine bar against the reference (data_loader) bar at the same time; a bar one
    side lacks within the engine's span is a mismatch. Counts bars compared and bars that differ; `first`
    names the earliest such bar and its first differing column.

    The data's last bar (the reference's last) is compared but for its book columns (`details["data_ends_in"]`):
    the files end inside it, so data_loader's book samples stop at the last recorded message, while the engine
    samples the unchanged book up to the bar's end, as it does every bar, once the exchange's clock has passed
    the end of its data."""
    skipped = reference.index[(reference.index >= engine.index[0]) & (reference.index <= engine.index[-1])
                              ].difference(engine.index) if len(engine) else reference.index[:0]
    ref = reference.reindex(engine.index)
    lacking = ref.isna().all(axis=1).to_numpy()
    diff = np.column_stack([_differs(engine[c].astype(object), ref[c].astype(object), tol) for c in engine.columns]
                           ) if len(engine) else np.zeros((0, 0), bool)
    import data_loader
    data_end = reference.index[-1] if len(reference) and reference.index[-1] in engine.index else None
    if data_end is not None:
        diff[engine.index.get_loc(data_end)] &= ~engine.columns.isin(data_loader.ob.BOOK_BAR_COLUMNS)
    bad = lacking | diff.any(axis=1) if len(engine) else lacking
    res = LayerResult("bars", compared=len(engine) + len(skipped), mismatches=int(bad.sum()) + len(skipped),
                      details={"span": [str(engine.index[0]), str(engine.index[-1])] if len(engine) else None,
                               "bars_the_engine_skipped": len(skipped),
                               "data_ends_in": None if data_end is None else str(data_end)})
    if len(skipped) and (not bad.any() or skipped[0] < engine.index[int(np.argmax(bad))]):
        res.first = {"bar": str(skipped[0]), "column": "*", "engine": "missing", "reference": "bar"}
    elif bad.any():
        k = int(np.argmax(bad))
        when = engine.index[k]
        if lacking[k]:
            res.first = {"bar": str(when), "column": "*", "engine": "bar", "reference": "missing"}
        else:
            cols = [c for c, d in zip(engine.columns, diff[k]) if d]
            res.first = {"bar": str(when), "column": cols[0], "engine": engine.at[when, cols[0]],
                         "reference": ref.at[when, cols[0]], "columns_differing": cols}
    return res


# ---------------------------------------------------------------- layer 2: features and probabilities
def features_layer(engine: pd.DataFrame, history: pd.DataFrame, cfg: GlobalConfig, bundle: Any,
                   tol: float = FEATURE_TOL) -> LayerResult:
    """At each engine bar t: `compute_features` on the engine's own window (the `window_bars` bars of
    `history` ending at t) and the bundle's probabilities on its last row, against what the engine logged
    (its feature columns and p_*), within tol; probabilities exist where the features are warm and the engine
    says it is warm (it also waits out bars with unknown columns). details: the largest deviation of the
    engine's values from a full-history recompute (reported, not failed: EWMs started later differ by at most
    their tolerance)."""
    import feature_engine
    names = feature_engine.feature_names(cfg)
    res = LayerResult("features")
    logged = [c for c in names + ["atr"] + PROB_COLUMNS if c in engine.columns]
    for when, row in engine.iterrows():
        window = history.loc[:when].iloc[-int(row["window_bars"]):]
        feats = feature_engine.compute_features(window, cfg).iloc[[-1]]
        probs = (bundle.predict(feats[names]).iloc[0] if bool(feats["is_warm"].iloc[0]) and row["warm"]
                 else pd.Series(math.nan, index=PROB_COLUMNS))
        mine = pd.concat([feats.iloc[0], probs])
        res.compared += 1
        diff = [c for c in logged if not _same(row[c], float(mine[c]), tol)]
        if diff:
            res.mismatches += 1
            c = diff[0]
            res.first = res.first or {"bar": str(when), "column": c, "engine": row[c], "recomputed": mine[c],
                                      "window_bars": int(row["window_bars"]), "columns_differing": diff[:20]}
    full = feature_engine.compute_features(history, cfg)
    full_p = bundle.predict_where(full[names], full["is_warm"].to_numpy(bool))
    ref = pd.concat([full, full_p], axis=1).reindex(engine.index)
    dev = (engine[logged] - ref[logged]).abs().max()
    res.details = {"largest_full_history_deviation": {c: float(v) for c, v in dev.sort_values(ascending=False)
                                                      .head(5).items() if np.isfinite(v)},
                   "largest_full_history_prob_deviation": float(np.nanmax(dev[PROB_COLUMNS].to_numpy()))
                   if dev[PROB_COLUMNS].notna().any() else None}
    return res


# ---------------------------------------------------------------- layer 3: decisions
def compare_intents(engine: pd.DataFrame, reference: pd.DataFrame, name: str = "decisions",
                    tol: float = EXACT) -> LayerResult:
    """Intent for intent, in order: (time, kind, side, reason, qty, price, tp_dist, sl_dist). A missing or
    extra intent counts as a difference; `first` gives its position, the earlier of the two bars and both
    intents."""
    n, m = len(engine), len(reference)
    common = min(n, m)
    fields = ["time"] + INTENT_FIELDS
    diff = np.column_stack([_differs(engine[f].iloc[:common].astype(object).reset_index(drop=True),
                                     reference[f].iloc[:common].astype(object).reset_index(drop=True), tol)
                            for f in fields]) if common else np.zeros((0, len(fields)), bool)
    bad = np.r_[diff.any(axis=1), np.ones(max(n, m) - common, bool)]
    res = LayerResult(name, compared=max(n, m), mismatches=int(bad.sum()))
    if bad.any():
        k = int(np.argmax(bad))
        a = engine.iloc[k] if k < n else None
        b = reference.iloc[k] if k < m else None
        res.first = {"index": k, "bar": str(min(r["time"] for r in (a, b) if r is not None)),
                     "engine": _intent_dict(a), "reference": _intent_dict(b),
                     "fields_differing": [f for f, d in zip(fields, diff[k]) if d] if k < common else fields}
    return res


def _intent_dict(row: pd.Series | None) -> dict | None:
    return None if row is None else {"time": str(row["time"]), **{f: row[f] for f in INTENT_FIELDS}}


def replay_decisions(signals: list[dict], trades: list[dict], cfg: GlobalConfig) -> tuple[pd.DataFrame, pd.Series]:
    """`strategy.decide` through `execution.Execution` (the engine's decider), fed the engine's recorded
    exchange events (trades journal records of applied events, in journal order) and its bars, probabilities
    and entry gates (signals journal): the intents the engine should have sent (`Execution.last_intents`), in
    the shape of `engine_intents`, and the engine's equity marked at each bar close (its own fills: what it
    sized with). Each decision sees exactly the events journaled before it: the signals record's
    `trades_lines` (trades journal records written before the decision); an "adopted" record (the engine took
    the stop the exchange made from an entry's attached stopLoss as the position's) is adopted the same way, and
    a "placed" exit with reason stop_refused (the engine closing a position whose stop the exchange refused,
    `Execution.exit_position`, not a bar-close decision) is asked for the same way. intents.attrs["event_statuses"]
    counts how Execution took the events (anything but "applied" follows a divergence), intents.attrs
    ["states"] holds the state each decision saw (bar time -> equity, positions, resting). Bar.index counts
    bars on the epoch grid, as the engine does. ParityError when a signals record lacks `trades_lines`."""
    import execution
    bar_s = timeframe_seconds(cfg.data.timeframe)
    ex = execution.Execution(cfg, cfg.symbol)
    rows, k, equity, statuses, states = [], 0, [], {}, {}
    for n, rec in enumerate(signals):
        when = _bar_time(rec, f"signals record {n + 1}")
        if not isinstance(rec.get("trades_lines"), int):
            raise ParityError(f"signals record {n + 1} ({when}) has no trades_lines: written by an older engine?")
        while k < min(rec["trades_lines"], len(trades)):
            event = trades[k].get("event")
            if event == "adopted":      # the stop the exchange made from an entry's attached stopLoss
                ex.adopt_attached_stop(str(trades[k]["order_id"]), str(trades[k]["side"]),
                                       _num(trades[k].get("price")), _num(trades[k].get("qty")),
                                       int(trades[k].get("report_ms", trades[k]["ts"])))   # older journals
            elif event == "placed" and trades[k].get("kind") == "exit" and trades[k].get("reason") == "stop_refused":
                ex.exit_position(str(trades[k].get("position_id") or ""), "stop_refused")   # the engine's own call
            elif event in EXEC_EVENT_TYPES:
                status = ex.on_event(exec_event(execution, trades[k])).status
                statuses[status] = statuses.get(status, 0) + 1
            k += 1
        book = rec.get("bar") or {}
        bar = st.Bar(index=int(when.value // 1_000_000_000) // bar_s, time=when.value / 1e9,
                     close=_num(rec.get("close")), atr=_num(rec.get("atr")),
                     probs={c: _num(rec.get(c)) for c in PROB_COLUMNS},
                     bid_depth=_num(book.get("ob_bid_depth_mean")), ask_depth=_num(book.get("ob_ask_depth_mean")))
        equity.append(ex.mark(bar.close))
        states[str(when)] = {"equity": equity[-1], "positions": [asdict(p) for p in ex.positions()],
                             "resting": [asdict(o) for o in ex.resting()]}
        ex.on_bar_close(bar, st.EntryGate(bool(rec.get("entries_allowed", True)), str(rec.get("reason") or "")))
        rows += [{"time": when, "kind": i.kind, "side": i.side, "reason": i.reason, "qty": i.qty, "price": i.price,
                  "tp_dist": i.tp_dist, "sl_dist": i.sl_dist} for i in ex.last_intents]
    index = pd.DatetimeIndex([_bar_time(r, "signals") for r in signals], name="time")
    intents = pd.DataFrame(rows, columns=["time"] + INTENT_FIELDS)
    intents.attrs["event_statuses"] = statuses
    intents.attrs["states"] = states
    return intents, pd.Series(equity, index=index, name="equity")


def exec_event(execution: Any, rec: dict) -> Any:
    """A trades-journal record as the `execution.ExecEvent` it came from (EXECUTION_CONTRACT.md)."""
    fill = EXEC_EVENT_TYPES[rec["event"]] == "fill"
    return execution.ExecEvent(type=EXEC_EVENT_TYPES[rec["event"]], order_link_id=str(rec["order_link_id"]),
                               ts_ms=int(rec["ts"]), qty=_num(rec.get("qty")) if fill else 0.0,
                               price=_num(rec.get("price")) if fill else 0.0, fee=_num(rec.get("fee") or 0.0),
                               reason=str(rec.get("reason") or ""))


# ---------------------------------------------------------------- layer 4: backtest vs live
def first_fill_divergence(live: pd.DataFrame, backtest: pd.DataFrame, bar_s: int) -> dict | None:
    """The first position the two fill models settle differently: in entry order, the first pair whose side,
    entry bar, quantity or entry price differ, or, both closed, whose exit bar or price differ, or of which
    one is open and the other closed (or that one side lacks). None when all agree."""
    for k in range(max(len(live), len(backtest))):
        a = live.iloc[k] if k < len(live) else None
        b = backtest.iloc[k] if k < len(backtest) else None
        if a is not None and b is not None:
            closed = (a["exit_reason"] != OPEN, b["exit_reason"] != OPEN)
            same = (a["side"] == b["side"] and closed[0] == closed[1]
                    and _bar_of(a["entry_time"], bar_s) == _bar_of(b["entry_time"], bar_s)
                    and all(_same(a[c], b[c], 1e-12) for c in ("qty", "entry_price"))
                    and (not closed[0] or (_bar_of(a["exit_time"], bar_s) == _bar_of(b["exit_time"], bar_s)
                                           and _same(a["exit_price"], b["exit_price"], 1e-12))))
            if same:
                continue
        first = a if b is None else b if a is None else min(a, b, key=lambda r: r["entry_time"])
        return {"index": k, "bar": str(_bar_of(first["entry_time"], bar_s)),
                "live": _trade_dict(a), "backtest": _trade_dict(b)}
    return None


def _bar_of(when: pd.Timestamp, bar_s: int) -> pd.Timestamp:
    return when.floor(f"{bar_s}s")


def _trade_dict(row: pd.Series | None) -> dict | None:
    cols = ("side", "entry_time", "exit_time", "qty", "entry_price", "exit_price", "fees", "pnl", "exit_reason")
    return None if row is None else {c: (str(row[c]) if isinstance(row[c], pd.Timestamp) else row[c]) for c in cols}


def match_trades(live: pd.DataFrame, backtest: pd.DataFrame, max_gap: pd.Timedelta) -> pd.DataFrame:
    """One-to-one pairs of the same side whose entries lie within max_gap, chosen to minimise the summed entry
    time difference (an assignment problem, scipy.optimize.linear_sum_assignment; a greedy first-come match
    pairs a trade one model made alone with its neighbour's partner); in backtest entry order. Columns: both
    entry times, qty/price/fee/PnL differences (live - backtest), the price differences in bps of price and
    the net return difference in bps of notional."""
    from scipy.optimize import linear_sum_assignment
    entries = pd.to_datetime(live["entry_time"], utc=True).to_numpy(dtype="datetime64[ns]").astype(np.int64)
    bt_entries = pd.to_datetime(backtest["entry_time"], utc=True).to_numpy(dtype="datetime64[ns]").astype(np.int64)
    gap = np.abs(bt_entries[:, None] - entries[None, :]) / 1e9
    feasible = (backtest["side"].to_numpy()[:, None] == live["side"].to_numpy()[None, :]) \
        & (gap <= max_gap.total_seconds())
    big = 1e12
    rows_b, cols_l = linear_sum_assignment(np.where(feasible, gap, big)) if feasible.size else ([], [])
    rows = []
    for i, j in sorted(zip(rows_b, cols_l)):
        if not feasible[i, j]:
            continue
        a, b = live.iloc[j], backtest.iloc[i]
        rows.append({"backtest_entry": b["entry_time"], "live_entry": a["entry_time"], "side": b["side"],
                     "qty_diff": a["qty"] - b["qty"],
                     "entry_diff": a["entry_price"] - b["entry_price"], "exit_diff": a["exit_price"] - b["exit_price"],
                     "fee_diff": a["fees"] - b["fees"], "pnl_diff": a["pnl"] - b["pnl"],
                     "entry_bps": 1e4 * abs(a["entry_price"] - b["entry_price"]) / b["entry_price"],
                     "exit_bps": 1e4 * abs(a["exit_price"] - b["exit_price"]) / b["exit_price"],
                     "pnl_bps": 1e4 * abs(a["pnl"] / (a["qty"] * a["entry_price"])
                                          - b["pnl"] / (b["qty"] * b["entry_price"]))})
    return pd.DataFrame(rows, columns=["backtest_entry", "live_entry", "side", "qty_diff", "entry_diff", "exit_diff",
                                       "fee_diff", "pnl_diff", "entry_bps", "exit_bps", "pnl_bps"])


def backtest_vs_live(live_intents: pd.DataFrame, bt_intents: pd.DataFrame, live: pd.DataFrame,
                     bt: pd.DataFrame, live_eq: pd.Series, bt_equity: pd.DataFrame, equity0: float,
                     bar_s: int, max_gap: pd.Timedelta, tol: Tolerance) -> LayerResult:
    """Layer 4. Intents must agree up to the bar of the first differently settled fill (an earlier intent
    difference is a mismatch; within FEATURE_TOL, as the backtest's ATR comes from full-history features and
    the engine's from its window: prices and quantities are on their grids, TP/SL distances may differ in the
    last bits); matched trades' differences and the final equity difference must stay within
    `tol` (each excess counts as a mismatch). Closed trades only: the backtest's positions closed at the end of
    the data (end_of_data) are still open in the engine, so they are counted apart, not matched. details: the
    divergence with both states, the largest differences, the matched pairs."""
    res = LayerResult("backtest_vs_live")
    ended = bt["exit_reason"] == "end_of_data"
    every = bt.assign(exit_reason=bt["exit_reason"].where(~ended, OPEN)).sort_values("entry_time", kind="stable")
    fill = first_fill_divergence(live, every.reset_index(drop=True), bar_s)
    open_at_end = int(ended.sum())
    bt = bt[~ended].reset_index(drop=True)
    live = live[live["exit_reason"] != OPEN].reset_index(drop=True)
    intents = compare_intents(live_intents, bt_intents, "intents", FEATURE_TOL)
    res.compared = intents.compared
    if intents.first is not None and (fill is None or pd.Timestamp(intents.first["bar"]) < pd.Timestamp(fill["bar"])):
        res.mismatches += 1
        res.first = {"what": "intents differ before any fill did", **intents.first}
    pairs = match_trades(live, bt, max_gap)
    unmatched = max(len(live), len(bt)) - len(pairs)
    final_diff = (float(live_eq.iloc[-1]) - float(bt_equity["equity"].loc[:live_eq.index[-1]].iloc[-1])
                  if len(live_eq) and len(bt_equity.loc[:live_eq.index[-1]]) else math.nan)
    checks = {"price_bps": float(pairs[["entry_bps", "exit_bps"]].to_numpy().max()) if len(pairs) else 0.0,
              "pnl_bps": float(pairs["pnl_bps"].max()) if len(pairs) else 0.0,
              "unmatched_share": unmatched / max(len(live), len(bt), 1),
              "equity_share": abs(final_diff) / equity0 if math.isfinite(final_diff) else 0.0}
    beyond = [k for k, v in checks.items() if v > getattr(tol, k)]
    res.mismatches += len(beyond)
    if beyond and res.first is None:
        res.first = {"what": "beyond tolerance", "checks": {k: checks[k] for k in beyond}}
    if fill is not None:
        at = pd.Timestamp(fill["bar"])
        fill["backtest_state"] = bt_equity.loc[:at].iloc[-1].to_dict() if len(bt_equity.loc[:at]) else None
        fill["live_equity"] = float(live_eq.loc[:at].iloc[-1]) if len(live_eq.loc[:at]) else None
    res.details = {
        "trades_live": len(live), "trades_backtest": len(bt), "trades_matched": len(pairs),
        "backtest_open_at_end": open_at_end,
        "intents_live": len(live_intents), "intents_backtest": len(bt_intents),
        "intents_equal_until": intents.first["bar"] if intents.first else "end",
        "first_fill_divergence": fill, "largest": checks, "tolerance": asdict(tol),
        "largest_abs": {c: float(pairs[c].abs().max()) if len(pairs) else 0.0
                        for c in ("entry_diff", "exit_diff", "fee_diff", "pnl_diff", "qty_diff")},
        "final_equity_diff": final_diff, "pairs": pairs}
    res.note = (f"intents {len(live_intents)} live / {len(bt_intents)} backtest, {_intents_phrase(intents, fill)}; "
                f"trades {len(live)} live / {len(bt)} backtest, {len(pairs)} matched")
    return res


def _intents_phrase(intents: LayerResult, fill: dict | None) -> str:
    """How far layer 4's intents agreed, in words: they are held equal only up to the first fill the two fill
    models settled differently (after it the two sides trade from different positions)."""
    if intents.first is None:
        return "all equal" + (f"; fills first settled differently at {fill['bar']}" if fill is not None else "")
    if fill is not None and pd.Timestamp(intents.first["bar"]) >= pd.Timestamp(fill["bar"]):
        return (f"equal up to {fill['bar']}, where the fills first settled differently (the first intent "
                f"difference follows at {intents.first['bar']})")
    return f"first differ at {intents.first['bar']}, before any fill did"


# ---------------------------------------------------------------- child processes
class Child:
    """A script of this project run as a child process in its own process group, output to a log file;
    `stop()` asks it to stop (SIGINT, the scripts' graceful stop), then kills the whole group."""

    def __init__(self, name: str, args: list[str], log_path: Path, cwd: Path):
        self.name, self.log_path = name, log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "w", encoding="utf-8")
        env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_PROXY": "127.0.0.1,localhost", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, str(ROOT / f"{name}.py"), *args], cwd=cwd, env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
                                     preexec_fn=_default_sigint)

    def tail(self, lines: int = 15) -> str:
        text = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        """The first match of `pattern` in the child's output; ParityError if it exits or the time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.log_path.read_text(encoding="utf-8", errors="replace"))
            if found:
                return found
            if self.proc.poll() is not None:
                raise ParityError(f"{self.name} exited with {self.proc.returncode} before it was ready:\n{self.tail()}")
            time.sleep(0.1)
        raise ParityError(f"{self.name} not ready after {timeout:.0f} s:\n{self.tail()}")

    def stop(self, grace: float = 20.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0f s: killing it", self.name, grace)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self._log.close()


def _default_sigint() -> None:
    """In a child before exec: SIGINT handled by default again (a parent started in the background ignores it,
    and children inherit that), so `Child.stop` can ask the script to stop."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _terminate_on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def span_bounds(start: str, end: str) -> tuple[pd.Timestamp, pd.Timestamp]:
    """[first bar open, end) in UTC from YYYY-MM-DD[THH:MM] arguments; a day-only end includes that day."""
    try:
        lo, hi = pd.Timestamp(start, tz="UTC"), pd.Timestamp(end, tz="UTC")
    except ValueError:
        raise ParityError(f"--start {start!r} / --end {end!r}: expected YYYY-MM-DD or YYYY-MM-DDTHH:MM (UTC)") from None
    hi += pd.Timedelta(days=1) if "T" not in end else pd.Timedelta(0)
    if hi <= lo:
        raise ParityError(f"--end {end} is not after --start {start}")
    return lo, hi


def span_bars(start: str, end: str, bar_s: int) -> int:
    """Bars in the span (see span_bounds)."""
    lo, hi = span_bounds(start, end)
    return int((hi - lo).total_seconds() // bar_s)


def run_live(args: argparse.Namespace, cfg: GlobalConfig, out: Path) -> Path:
    """paper_exchange.py replaying from --start and live_trading_v2.py --paper against it, until the engine
    has closed every bar of the span; both stopped whatever happens. Returns the engine's folder.
    Lockstep by default; with --speed N the exchange's clock is held until the engine has reconciled, then
    runs at N market seconds per wall second (per-message pushes) and the engine keeps its own clock: the
    timing path, whose result depends on the machine."""
    work = out / "live"
    work.mkdir(parents=True, exist_ok=True)
    config = ["--config", str(args.model_dir / "params.json"), *sum((["--set", s] for s in args.set_values), [])]
    clock = ["--speed", "0", "--publish", "per-message"] if args.speed else ["--lockstep"]
    children: list[Child] = []
    previous = signal.signal(signal.SIGTERM, _terminate_on_sigterm)
    try:
        exchange = Child("paper_exchange", ["--data-dir", str(args.data_dir), "--start", args.start, *clock,
                                            "--port", "0", "--balance", repr(initial_equity(cfg)), *config],
                         out / "paper_exchange.log", work)
        children.append(exchange)
        url = exchange.wait_for(r"listening on (http://127\.0\.0\.1:\d+)", args.timeout).group(1)
        engine = Child("live_trading_v2", ["--symbol", cfg.symbol, "--paper", url, "--model-dir", str(args.model_dir),
                                           "--data-dir", str(args.data_dir), "--log-features",
                                           *([] if args.speed else ["--lockstep"]),
                                           "--max-bars", str(span_bars(args.start, args.end, bar_seconds(cfg))),
                                           *config[2:]],
                       out / "live_trading_v2.out", work)
        children.append(engine)
        if args.speed:
            engine.wait_for(r"reconciled: startup", args.timeout)
            _start_clock(url, args.speed)
        try:
            code = engine.proc.wait(args.timeout)
        except subprocess.TimeoutExpired:
            raise ParityError(f"live_trading_v2 still running after {args.timeout:.0f} s:\n{engine.tail()}") from None
        if code != 0:
            raise ParityError(f"live_trading_v2 exited with {code}:\n{engine.tail()}")
    finally:
        for child in reversed(children):
            child.stop()
        signal.signal(signal.SIGTERM, previous)
    return work


def _start_clock(url: str, speed: float) -> None:
    import requests
    resp = requests.post(f"{url}/__admin/speed", json={"speed": speed}, timeout=30)
    if resp.status_code != 200:
        raise ParityError(f"paper exchange refused speed {speed}: {resp.text}")


def bar_seconds(cfg: GlobalConfig) -> int:
    return timeframe_seconds(cfg.data.timeframe)


def initial_equity(cfg: GlobalConfig) -> float:
    """The starting equity both sides trade with."""
    return float(cfg.venue.initial_equity)


def engine_window_bars(cfg: GlobalConfig) -> int:
    """Bars in the engine's feature window (live_trading_v2: live.window_bars or the warm-up plus a margin)."""
    import feature_engine
    import live_trading_v2
    return max(cfg.live.window_bars, feature_engine.warmup_bars(cfg) + live_trading_v2.WARM_MARGIN_BARS)


def load_config(model_dir: Path, data_dir: Path, set_values: list[str]) -> GlobalConfig:
    """The model's config as the engine runs it (its own live defaults, then --set), reading data_dir whole."""
    base = GlobalConfig.load(model_dir / "params.json")
    base.live = LiveSettings()
    cfg = config_from_args(argparse.Namespace(config=None, set_values=set_values), base)
    cfg.data.data_dir, cfg.data.start, cfg.data.end = str(data_dir), "", ""
    return cfg


# ---------------------------------------------------------------- the research side
@dataclass
class Research:
    """What the research code makes of the same files: bars, and the backtest of the span."""
    bars: pd.DataFrame
    result: Any
    frame: pd.DataFrame


def run_research(cfg: GlobalConfig, params_path: Path, start: str, end: str) -> Research:
    """data_loader bars over all files, and `run_backtest(record_intents=True)` of the span with the
    model's probabilities on full-history features (warm-up from the bars before start)."""
    import backtest
    import data_loader
    bars = data_loader.load_bars(cfg)
    frame, fine, feats = backtest._load_market(cfg, None)
    probs = backtest._model_probs(cfg, params_path, feats, frame.index)
    lo, hi = span_bounds(start, end)
    frame, probs, fine = (None if x is None else x.loc[(x.index >= lo) & (x.index < hi)] for x in (frame, probs, fine))
    if frame is None or len(frame) < 2:
        raise ParityError(f"fewer than two warm bars between {start} and {end} in {cfg.data.data_dir}")
    return Research(bars, backtest.run_backtest(frame, probs, cfg, fine=fine, record_intents=True), frame)


# ---------------------------------------------------------------- verdict, files
def judge(work: Path, cfg: GlobalConfig, research: Research, bundle: Any,
          tol: Tolerance) -> tuple[list[LayerResult], pd.Series]:
    """All four layers over the engine's journals in `work` (DESIGN §3 paths); also the engine's equity per bar
    (from the decisions replay, so only up to the first decision difference, after which it no longer follows)."""
    import data_loader
    logs = work / cfg.live.log_dir
    signals = read_jsonl(logs / f"signals_{cfg.symbol}.jsonl")
    if not signals:
        raise ParityError(f"{logs / f'signals_{cfg.symbol}.jsonl'} is empty: the engine closed no bar")
    trades = read_jsonl(logs / f"trades_{cfg.symbol}.jsonl") if (logs / f"trades_{cfg.symbol}.jsonl").exists() else []
    mine = engine_bars(signals, data_loader.BAR_COLUMNS)
    history = pd.concat([research.bars.loc[research.bars.index < mine.index[0]], mine])
    bar_s = bar_seconds(cfg)
    live_intents = engine_intents(signals)
    replayed, live_eq = replay_decisions(signals, trades, cfg)
    layers = [compare_bars(mine, research.bars),
              features_layer(engine_features(signals, engine_window_bars(cfg)), history, cfg, bundle),
              compare_intents(live_intents, replayed)]
    layers[2].details["replayed_events"] = replayed.attrs["event_statuses"]
    if layers[2].first is not None:
        layers[2].first["replayed_state"] = replayed.attrs["states"].get(layers[2].first["bar"])
        live_eq = live_eq.loc[live_eq.index < pd.Timestamp(layers[2].first["bar"])]   # the replay follows no more
    bt = research.result
    layers.append(backtest_vs_live(live_intents, bt.intents, live_trades(trades), bt.trades, live_eq, bt.equity,
                                   initial_equity(cfg), bar_s,
                                   pd.Timedelta(seconds=bar_s * (cfg.strategy.time_limit_bars + 1)), tol))
    return layers, live_eq


def write_outputs(out: Path, args: argparse.Namespace, layers: list[LayerResult], live_eq: pd.Series,
                  bt_equity: pd.DataFrame, tol: Tolerance, wall_s: float) -> dict:
    """parity.json (counts per layer, first differences) and parity_report.html (report.py blocks)."""
    import plotly.graph_objects as go
    import report
    summary = {"span": [args.start, args.end], "model_dir": str(args.model_dir), "data_dir": str(args.data_dir),
               "clock": f"speed {args.speed:g}" if args.speed else "lockstep",
               "wall_time_s": round(wall_s, 1), "ok": all(layer.ok for layer in layers), "tolerance": asdict(tol),
               "layers": {layer.name: {"ok": layer.ok, "compared": layer.compared, "mismatches": layer.mismatches,
                                       "first": layer.first,
                                       **{k: v for k, v in layer.details.items() if k != "pairs"}}
                          for layer in layers}}
    atomic_write_text(out / "parity.json", json.dumps(metrics.json_safe(summary), indent=2, default=str))
    fig = go.Figure([go.Scatter(x=bt_equity.index, y=bt_equity["equity"], name="backtest", line={"width": 1.2}),
                     go.Scatter(x=live_eq.index, y=live_eq.to_numpy(), name="live (paper)", line={"width": 1.2})])
    fig.update_layout(title="Equity: backtest and live engine overlaid", height=420, yaxis_title="equity")
    counts = pd.DataFrame([{"layer": layer.name, "compared": layer.compared, "mismatches": layer.mismatches,
                            "verdict": "equal" if layer.ok else "DIFFERS", "counts": layer.note or ""}
                           for layer in layers])
    sections = [report.banner_html("PARITY HOLDS" if summary["ok"] else "PARITY BROKEN: " + next(
                    layer.summary() for layer in layers if not layer.ok), summary["ok"]),
                report.table_html(counts, f"Layers over {args.start} .. {args.end}"),
                report.figure_html(fig)]
    pairs = next((layer.details.get("pairs") for layer in layers if "pairs" in layer.details), None)
    if pairs is not None and len(pairs):
        sections.append(report.table_html(pairs, "Matched trades: live minus backtest"))
    sections.append(report.metrics_table_html({f"{layer.name}": layer.first or "none" for layer in layers},
                                              "First differences"))
    sections.append(report.assumptions_html([f"Layer 4 tolerance: {k} <= {v}" for k, v in asdict(tol).items()]
                                            + [Tolerance.__doc__.split("\n\n")[0].replace("\n", " ")],
                                            "Layer 4 tolerance"))
    atomic_write_text(out / "parity_report.html", report.page("PurpleSky parity", sections))
    return summary


def resolve_model_dir(path: Path) -> Path:
    """A rank folder holding params.json: the path itself or its rank_1."""
    for cand in (path, path / "rank_1"):
        if (cand / "params.json").is_file():
            return cand
    raise ParityError(f"no params.json in {path} or {path / 'rank_1'}: give a trained model's rank folder")


def check_span(data_dir: Path, start: str, end: str) -> None:
    """ValueError naming the folder's days when --start or --end lies outside them (the replay would begin at the
    data's first message, or find none)."""
    import data_loader
    try:
        files = data_loader.list_files(data_dir)
    except data_loader.DataError as err:
        raise ValueError(str(err)) from None
    last_day = end if "T" not in end else (pd.Timestamp(end, tz="UTC") - pd.Timedelta(1, "ms")).strftime("%Y-%m-%d")
    files.require_day("--start", start, start[:10])
    files.require_day("--end", end, last_day)   # a timed --end is exclusive


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Shadow replay: the live engine against the backtest, in layers.")
    parser.add_argument("--model-dir", type=Path, required=True, help="a rank folder (models_v9/SYM/rank_1)")
    parser.add_argument("--data-dir", type=Path, required=True, help="recorded or simulated data folder")
    parser.add_argument("--start", required=True, help="first UTC day replayed (YYYY-MM-DD, or YYYY-MM-DDTHH:MM)")
    parser.add_argument("--end", required=True, help="last UTC day replayed (YYYY-MM-DD), or the end time "
                                                     "(YYYY-MM-DDTHH:MM, exclusive)")
    parser.add_argument("--out", type=Path, default=Path("parity_out"), help="folder for parity.json and the report")
    parser.add_argument("--set", dest="set_values", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="config override for both sides, e.g. --set strategy.exec_threshold=0.5")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds the replay may take")
    parser.add_argument("--speed", type=float, default=0.0, help="0 (default): lockstep, the result independent of "
                        "machine load; N > 0: real-time-paced at N market seconds per wall second, the engine on its "
                        "own clock (the timing path; bars and fills may then differ under load)")
    args = parser.parse_args(argv)
    if not args.speed >= 0:
        parser.error(f"--speed {args.speed}: expected 0 (lockstep) or market seconds per wall second > 0")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.monotonic()
    try:
        args.model_dir, args.data_dir = resolve_model_dir(args.model_dir).resolve(), args.data_dir.resolve()
        cfg = load_config(args.model_dir, args.data_dir, args.set_values)
        span_bars(args.start, args.end, bar_seconds(cfg))
        check_span(args.data_dir, args.start, args.end)
        import models
        bundle = models.ModelBundle.load(args.model_dir)
        work = run_live(args, cfg, args.out)
        research = run_research(cfg, args.model_dir / "params.json", args.start, args.end)
        tol = Tolerance()
        layers, live_eq = judge(work, cfg, research, bundle, tol)
        write_outputs(args.out, args, layers, live_eq, research.result.equity, tol, time.monotonic() - started)
    except (ParityError, ConfigError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the paper exchange and the engine were stopped", file=sys.stderr)
        return 130
    for layer in layers:
        print(("ok    " if layer.ok else "DIFF  ") + layer.summary())
    print(f"-> {args.out / 'parity.json'}, {args.out / 'parity_report.html'}")
    return 0 if all(layer.ok for layer in layers) else 1


if __name__ == "__main__":
    sys.exit(main())
