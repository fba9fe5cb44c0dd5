"""Training labels and their end times `t1` (the bar whose close decides each label, used for purging).

Execution label (the "sniper"), per side, for a signal at the close of bar t, with the backtester's fills:
  * a PostOnly limit at close_t ∓ offset·ATR_t (rounded to the tick away from the market) is placed at the
    open of bar t+1; if it would cross there (a buy at or above that open) it is rejected: label 0;
  * it rests on bars t+1 … t+time_limit_bars and fills at its own price (never better, even on a gap) on the
    first bar that trades through it (`trade_through`: low < limit for a long) or reaches it (`touch`);
  * after the fill, TP = fill ± tp·ATR_t (a maker limit, same fill rule) and SL = fill ∓ sl·ATR_t (a stop,
    triggered when the price reaches it), on the tick grid as the backtester sets them (TP away from the
    fill, SL towards it);
  * on the fill bar only the stop can trigger (the bar cannot tell whether its extreme came before the fill);
    on later bars an open beyond a level decides first, and a bar reaching both levels counts as the stop;
  * no exit within max_holding_bars after the fill bar is a time exit.
  Label 1 only when the take-profit is reached first and the trade is profitable after maker fees on entry
  and exit; 0 otherwise; -1 when the data ends before the outcome is known (callers drop those rows).
Direction label (the "trend filter"): 1 when close[t+h] is beyond close_t ± move·ATR_t.
Data gaps: a label whose path t … t1 touches a gap bar (`is_gap`, fabricated by the loader, see
data_loader.mark_gaps) is unknown (-1, t1 NaT): no label is decided inside a gap or across one.
"""
from __future__ import annotations

import logging
import math

import numba
import numpy as np
import pandas as pd

from config import GlobalConfig, timeframe_seconds
from grid import DOWN, UP, snap_round

log = logging.getLogger(__name__)

FILL_RULES = ("trade_through", "touch")
LABEL_COLUMNS = ("exec_long", "exec_short", "dir_long", "dir_short")
_BAR_COLUMNS = ("open", "high", "low", "close", "atr")


@numba.njit(cache=True, inline="always")
def _first_below(low: np.ndarray, sign: float, start: int, last: int, level: float) -> int:
    """First bar j in [start, last] with sign·low[j] < level, else last + 1 (a slice keeps the scan branch-light)."""
    seg = low[start:last + 1]
    for q in range(seg.shape[0]):
        if sign * seg[q] < level:
            return start + q
    return last + 1


@numba.njit(cache=True, inline="always")
def _first_exit(low: np.ndarray, high: np.ndarray, sign: float, start: int, last: int, stop: float,
                take_above: float) -> int:
    """First bar j in [start, last] with sign·low[j] <= stop or sign·high[j] > take_above, else last + 1."""
    lo = low[start:last + 1]
    hi = high[start:last + 1]
    for q in range(lo.shape[0]):
        if (sign * lo[q] <= stop) | (sign * hi[q] > take_above):
            return start + q
    return last + 1


@numba.njit(cache=True)
def _execution_core(open_: np.ndarray, high: np.ndarray, low: np.ndarray, close: np.ndarray, atr: np.ndarray,
                    sign: float, offset_atr: float, tp_atr: float, sl_atr: float, time_limit_bars: int,
                    max_holding_bars: int, maker_fee: float, touch: bool,
                    tick: float) -> tuple[np.ndarray, np.ndarray]:
    """Compiled labels, worked as a long on sign·price: a short (sign -1) mirrors p -> -p with high <-> low.

    Mirroring by multiplying on read (exact) spares four array copies per call. A limit that fills on touch
    (x <= level) is tested strictly against nextafter(level, +inf), which is exact, so the scans carry no rule
    branches. tick > 0 rounds the limit down to the tick grid by the one rule (grid.snap_round; for a mirrored
    short that is up, as strategy.limit_price rounds it).
    """
    n = close.shape[0]
    low, high = (low, high) if sign > 0.0 else (high, low)  # the mirrored low is -high
    label = np.full(n, -1, np.int8)
    t1 = np.full(n, -1, np.int64)
    for t in range(n - 1):
        a = atr[t]
        c = sign * close[t]
        if not (math.isfinite(a) and a > 0.0 and math.isfinite(c)):
            continue
        limit = c - offset_atr * a
        if tick > 0.0:
            limit = snap_round(limit, tick, DOWN)
        if limit >= sign * open_[t + 1]:
            label[t] = 0
            t1[t] = t + 1
            continue
        expiry = t + time_limit_bars
        last = min(expiry, n - 1)
        fill = _first_below(low, sign, t + 1, last, np.nextafter(limit, np.inf) if touch else limit)
        if fill > last:
            if expiry <= n - 1:
                label[t] = 0
                t1[t] = expiry
            continue
        take = limit + tp_atr * a
        stop = limit - sl_atr * a
        if tick > 0.0:
            take = snap_round(take, tick, UP)
            stop = snap_round(stop, tick, UP)
        if sign * low[fill] <= stop:
            label[t] = 0
            t1[t] = fill
            continue
        end = fill + max_holding_bars
        last = min(end, n - 1)
        take_above = np.nextafter(take, -np.inf) if touch else take
        j = _first_exit(low, high, sign, fill + 1, last, stop, take_above)
        if j <= last:
            if sign * open_[j] > take_above or sign * low[j] > stop:
                pnl = (take - limit) - maker_fee * sign * (take + limit)
                label[t] = 1 if pnl > 0.0 else 0
            else:
                label[t] = 0
            t1[t] = j
        elif end <= n - 1:
            label[t] = 0
            t1[t] = end
    return label, t1


@numba.njit(cache=True)
def crosses_gap(t1: np.ndarray, is_gap: np.ndarray) -> np.ndarray:
    """Bool per signal bar t: its decided path t … t1[t] holds a gap bar (t1 = -1, unknown, never crosses).

    One backward pass carrying the next gap bar at or after t; t1 and is_gap have the same length n.
    """
    n = t1.shape[0]
    out = np.zeros(n, np.bool_)
    next_gap = n
    for t in range(n - 1, -1, -1):
        if is_gap[t]:
            next_gap = t
        out[t] = t1[t] >= next_gap
    return out


def _as_float_array(name: str, values: object, n: int | None = None) -> np.ndarray:
    """A contiguous float64 copy of a price column, with a clear error on a length mismatch."""
    arr = np.ascontiguousarray(np.asarray(values, dtype=np.float64))
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"{name} has {arr.shape[0]} values but close has {n}")
    return arr


def execution_labels(open: np.ndarray, high: np.ndarray, low: np.ndarray, close: np.ndarray,
                     atr: np.ndarray, side: int, offset_atr: float, tp_atr: float, sl_atr: float,
                     time_limit_bars: int, max_holding_bars: int, maker_fee: float,
                     fill_rule: str = "trade_through", tick_size: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Execution labels (int8: 1, 0, or -1 = unknown) and t1 (int64 bar index deciding each label, -1 if unknown).

    tick_size > 0 rounds the limit price to the instrument's tick away from the market, as orders are.
    """
    if side not in (1, -1):
        raise ValueError(f"side must be 1 (long) or -1 (short), got {side!r}")
    if fill_rule not in FILL_RULES:
        raise ValueError(f"fill_rule must be one of {FILL_RULES}, got {fill_rule!r}")
    if time_limit_bars < 1 or max_holding_bars < 1:
        raise ValueError("time_limit_bars and max_holding_bars must be >= 1 "
                         f"(got {time_limit_bars}, {max_holding_bars})")
    if offset_atr < 0 or tp_atr <= 0 or sl_atr <= 0:
        raise ValueError(f"need offset_atr >= 0, tp_atr > 0, sl_atr > 0 (got {offset_atr}, {tp_atr}, {sl_atr})")
    c = _as_float_array("close", close)
    n = c.shape[0]
    o, h, lo = (_as_float_array(name, v, n) for name, v in (("open", open), ("high", high), ("low", low)))
    return _execution_core(o, h, lo, c, _as_float_array("atr", atr, n), float(side), float(offset_atr),
                           float(tp_atr), float(sl_atr), int(time_limit_bars), int(max_holding_bars),
                           float(maker_fee), fill_rule == "touch", float(tick_size))


def direction_labels(close: np.ndarray, atr: np.ndarray, horizon: int,
                     move_atr: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Direction labels (long, short as int8 with -1 = unknown) and t1 = t + horizon (-1 if unknown)."""
    if horizon < 1 or move_atr <= 0:
        raise ValueError(f"need horizon >= 1 and move_atr > 0 (got {horizon}, {move_atr})")
    c = _as_float_array("close", close)
    a = _as_float_array("atr", atr, c.shape[0])
    n = c.shape[0]
    long_ = np.full(n, -1, np.int8)
    short = np.full(n, -1, np.int8)
    t1 = np.full(n, -1, np.int64)
    m = max(n - horizon, 0)
    future = c[horizon:]
    now, width = c[:m], move_atr * a[:m]
    known = np.isfinite(now) & np.isfinite(width) & (a[:m] > 0) & np.isfinite(future)
    long_[:m] = np.where(known, future > now + width, -1)
    short[:m] = np.where(known, future < now - width, -1)
    t1[:m] = np.where(known, np.arange(m) + horizon, -1)
    return long_, short, t1


def make_labels(frame: pd.DataFrame, cfg: GlobalConfig) -> pd.DataFrame:
    """All four labels for a bar frame plus t1_exec / t1_dir: UTC close time of the bar deciding them (NaT = unknown).

    frame: OHLC, atr and the loader's bool is_gap per bar. t1_exec is the later of the long and short
    execution labels' decision times, so purging by it covers every execution label the row carries.
    Labels whose path crosses a gap bar are unknown (-1) with t1 unknown.
    """
    missing = [c for c in _BAR_COLUMNS + ("is_gap",) if c not in frame.columns]
    if missing:
        raise ValueError(f"make_labels: frame lacks column(s) {', '.join(missing)}")
    if not isinstance(frame.index, pd.DatetimeIndex):
        raise ValueError(f"make_labels: frame index must be a DatetimeIndex of bar open times, "
                         f"got {type(frame.index).__name__}")
    s, lab, venue = cfg.strategy, cfg.labels, cfg.venue
    bars = {c: frame[c].to_numpy(np.float64) for c in _BAR_COLUMNS}
    gap = frame["is_gap"].to_numpy(np.bool_)
    out = pd.DataFrame(index=frame.index)
    t1_exec = []
    for name, side in (("exec_long", 1), ("exec_short", -1)):
        y, t1 = execution_labels(bars["open"], bars["high"], bars["low"], bars["close"], bars["atr"], side,
                                 s.limit_offset_atr, s.take_profit_atr, s.stop_loss_atr, s.time_limit_bars,
                                 s.max_holding_bars, venue.maker_fee, venue.fill_rule, cfg.instrument.tick_size)
        across = crosses_gap(t1, gap)
        y[across], t1[across] = -1, -1
        out[name] = y
        t1_exec.append(t1)
    d_long, d_short, t1_dir = direction_labels(bars["close"], bars["atr"], lab.direction_horizon_bars,
                                               lab.direction_move_atr)
    across = crosses_gap(t1_dir, gap)
    d_long[across], d_short[across], t1_dir[across] = -1, -1, -1
    out["dir_long"] = d_long
    out["dir_short"] = d_short
    close_times = frame.index + pd.Timedelta(seconds=timeframe_seconds(cfg.data.timeframe))
    out["t1_exec"] = _index_to_time(np.maximum(t1_exec[0], t1_exec[1]), close_times)
    out["t1_dir"] = _index_to_time(t1_dir, close_times)
    for name in LABEL_COLUMNS:
        known = out[name] >= 0
        log.debug("%s: %d known, positive rate %.4f", name, int(known.sum()),
                  float(out.loc[known, name].mean()) if known.any() else float("nan"))
    return out


def _index_to_time(t1: np.ndarray, close_times: pd.DatetimeIndex) -> pd.DatetimeIndex:
    """Map bar indices to their close times, -1 to NaT."""
    times = close_times[np.clip(t1, 0, None)]
    return times.where(t1 >= 0)
