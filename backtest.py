"""Event-driven bar backtester for the hybrid strategy, with a compiled (numba) core.

Every decision comes from `strategy.decide_core` (the same rules the paper and live engines use);
this file only executes intents with honest fills and costs (see ASSUMPTIONS) and reports.

CLI: python backtest.py --config models_v9/<SYM>/rank_1/params.json [--data-dir DIR]
     [--start DAY --end DAY] [--signals FILE.csv] [--report FILE.html] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from numba import njit

import metrics as metrics_mod
import strategy as st
from config import ConfigError, GlobalConfig, add_config_args, config_from_args, timeframe_seconds
from grid import snap_round

log = logging.getLogger("backtest")

PROB_COLUMNS = ["p_exec_long", "p_exec_short", "p_dir_long", "p_dir_short"]
PRICE_COLUMNS = ["open", "high", "low", "close"]
DEPTH_COLUMNS = metrics_mod.DEPTH_COLUMNS   # what strategy.max_book_share caps entries by
FUNDING_PERIOD_S = 8 * 3600

# trade record layout (float64 rows written by the core)
(T_SIDE, T_REGIME, T_QTY, T_ENTRY_TIME, T_ENTRY_PX, T_ENTRY_FEE, T_EXIT_TIME, T_EXIT_PX, T_EXIT_FEE,
 T_REASON, T_FUNDING, T_ENTRY_BAR, T_EXIT_BAR, T_TP, T_SL) = range(15)
N_TRADE_COLS = 15
EXIT_TP, EXIT_SL, EXIT_TIME, EXIT_KILL, EXIT_END = 0, 1, 2, 3, 4
EXIT_NAMES = ("take_profit", "stop_loss", "time", "kill_switch", "end_of_data")
MAKER, TAKER = 0, 1

# open-position slot layout
(PS_ENTRY, PS_TP, PS_SL, PS_FINE_K, PS_REGIME, PS_ENTRY_FEE, PS_ENTRY_TIME, PS_FUNDING) = range(8)
N_POS_COLS = 8

# resting-entry layout (row 0 = long, 1 = short)
RS_TP, RS_SL, RS_FINE_K = range(3)

# per-bar equity record layout
E_EQUITY, E_CASH, E_UPNL, E_NOTIONAL, E_NPOS = range(5)

# counters
C_REJECTED_POSTONLY, C_FUNDING_EVENTS, C_FINE_RESOLVED, C_KILL_INTRABAR = range(4)

ASSUMPTIONS = [
    "Decisions are taken at each bar close from that bar's probabilities; orders act from the next bar's open.",
    "Market orders (breakout entries, time and kill-switch exits) fill at the next bar's open (with finer bars: "
    "the open of the fine bar containing open + latency) moved against us by the slippage; taker fee.",
    "PostOnly entries are placed at the next bar's open; one that would cross (buy at/above, sell at/below that "
    "price) is rejected, never filled as taker.",
    "Resting limits (entries, take-profits) fill at their own price when price trades through them "
    "(or touches them with fill_rule=touch); a maker never gets a better price, even on a gap; maker fee.",
    "Stops trigger when price touches them and fill at the stop, or at the open when the bar gaps through, "
    "moved against us by the slippage; taker fee.",
    "When one bar reaches both take-profit and stop, finer bars decide if given; otherwise the stop is assumed.",
    "On the bar a position opens only its stop can trigger unless finer bars show the take-profit came later.",
    "Take-profit set from the fill price, stop from the entry's reference price (the limit price; a market "
    "entry's decision close, where its exchange-side stop is attached), with the ATR at the decision, on the "
    "tick grid: the take-profit rounded away from the fill, the stop towards it.",
    "Sizing: risk_per_trade x equity / stop distance, capped so positions plus resting entries stay within "
    "max_leverage x equity, rounded down to the quantity step; orders below min quantity or notional are skipped.",
    "max_positions counts open positions plus resting entries; at most one resting entry per side.",
    "Daily kill-switch on mark-to-market equity (fees and funding paid included) versus the UTC day's start "
    "equity, intrabar: within a bar the fills come first (orders arriving at the open, resting entries, then "
    "take-profits and stops, as above); the positions left then breach when the bar's adverse extreme (the low "
    "for a net long, the high for a net short; with finer bars, the first finer bar from the bar's last fill on) "
    "reaches the price where equity hits the limit (strategy.kill_trigger). All positions are closed at that "
    "price (at the open when the bar opened beyond it) moved against us by the slippage, taker fee, as the live "
    "engine, which checks every trade, sends its market exit on the first print through it; resting entries are "
    "cancelled and no entries are taken until the next UTC day. The same rule at bar closes flattens at the next "
    "open.",
    "Funding (if set) is charged at bar opens on 00/08/16 UTC on open notional at that open; longs pay a "
    "positive rate.",
    "Equity is marked to market at every bar close; positions open at the end are closed at the last close "
    "(slippage, taker fee) and counted. No partial fills, queue position or market impact are modelled: entries "
    "are capped at strategy.max_book_share of the bar's book depth on the side they take or join (the live rule), "
    "and metrics.json's depth_share_* say how large the orders were against that book.",
    "Fill times are the open time of the bar (or finer bar) in which the fill happened.",
]


@njit(cache=True)
def _grow(arr: np.ndarray) -> np.ndarray:
    """Double a record buffer's rows."""
    bigger = np.zeros((arr.shape[0] * 2, arr.shape[1]))
    bigger[:arr.shape[0]] = arr
    return bigger


@njit(cache=True)
def _exit_check(side: int, sl: float, tp: float, op: float, hi: float, lo: float, stop_only: bool,
                touch: bool) -> tuple:
    """Which exit one bar triggers (0 none, EXIT_SL+1, EXIT_TP+1 coded as 1/2) and its raw price.

    Gaps first (a stop gapped through fills at the open; a take-profit limit gapped through fills at
    its price); within the bar the stop wins ties (pessimistic); stop_only on the fill bar.
    """
    if side == 1:
        if op <= sl:
            return 1, op
        if not stop_only and (op > tp or (touch and op >= tp)):
            return 2, tp
        if lo <= sl:
            return 1, sl
        if not stop_only and (hi > tp or (touch and hi >= tp)):
            return 2, tp
    else:
        if op >= sl:
            return 1, op
        if not stop_only and (op < tp or (touch and op <= tp)):
            return 2, tp
        if hi >= sl:
            return 1, sl
        if not stop_only and (lo < tp or (touch and lo <= tp)):
            return 2, tp
    return 0, 0.0


@njit(cache=True)
def _limit_hit(side: int, price: float, hi: float, lo: float, touch: bool) -> bool:
    """Does a resting entry at `price` fill on a bar with this high/low."""
    if side == 1:
        return lo < price or (touch and lo <= price)
    return hi > price or (touch and hi >= price)


@njit(cache=True)
def _close(k: int, px: float, fee_rate: float, reason: int, when: float, bar: int,
           pos: np.ndarray, side: np.ndarray, qty: np.ndarray, fill_bar: np.ndarray,
           trades: np.ndarray, nt: int, cash: float) -> float:
    """Close slot k at px: book the trade row nt and return the new cash."""
    fee = qty[k] * px * fee_rate
    cash += side[k] * qty[k] * (px - pos[k, PS_ENTRY]) - fee
    row = trades[nt]
    row[T_SIDE] = side[k]
    row[T_REGIME] = pos[k, PS_REGIME]
    row[T_QTY] = qty[k]
    row[T_ENTRY_TIME] = pos[k, PS_ENTRY_TIME]
    row[T_ENTRY_PX] = pos[k, PS_ENTRY]
    row[T_ENTRY_FEE] = pos[k, PS_ENTRY_FEE]
    row[T_EXIT_TIME] = when
    row[T_EXIT_PX] = px
    row[T_EXIT_FEE] = fee
    row[T_REASON] = reason
    row[T_FUNDING] = pos[k, PS_FUNDING]
    row[T_ENTRY_BAR] = fill_bar[k]
    row[T_EXIT_BAR] = bar
    row[T_TP] = pos[k, PS_TP]
    row[T_SL] = pos[k, PS_SL]
    qty[k] = 0.0
    return cash


@njit(cache=True)
def _open(s: int, px: float, qty_: float, tp_dist: float, sl_dist: float, sl_ref: float, tick: float, regime: int,
          fee_rate: float, when: float, bar: int, fine_k: int, pos: np.ndarray, side: np.ndarray, qty: np.ndarray,
          fill_bar: np.ndarray) -> float:
    """Open a position in a free slot; returns the entry fee (to take from cash).

    TP and SL go on the tick grid, both rounded in the position's direction (grid.snap_round): the
    take-profit `tp_dist` away from the fill, the stop `sl_dist` from the entry's reference price `sl_ref`
    (strategy.py's stop rule: the limit price, or the decision close of a market entry), towards it.
    """
    for k in range(qty.shape[0]):
        if qty[k] == 0.0:
            fee = qty_ * px * fee_rate
            side[k] = s
            qty[k] = qty_
            fill_bar[k] = bar
            pos[k, PS_ENTRY] = px
            pos[k, PS_TP] = snap_round(px + s * tp_dist, tick, s)
            pos[k, PS_SL] = snap_round(sl_ref - s * sl_dist, tick, s)
            pos[k, PS_FINE_K] = fine_k
            pos[k, PS_REGIME] = regime
            pos[k, PS_ENTRY_FEE] = fee
            pos[k, PS_ENTRY_TIME] = when
            pos[k, PS_FUNDING] = 0.0
            return fee
    raise AssertionError("no free position slot: max_positions accounting is broken")


@njit(cache=True)
def _kill_flatten(i: int, trigger: float, direction: int, cash: float, nt: int, t: np.ndarray, o: np.ndarray,
                  ft: np.ndarray, fo: np.ndarray, fh: np.ndarray, fl: np.ndarray, m_from: int, m_end: int,
                  taker_fee: float, slip: float, day_state: np.ndarray, pos: np.ndarray, side: np.ndarray,
                  qty: np.ndarray, fill_bar: np.ndarray, rq: np.ndarray, trades: np.ndarray,
                  counters: np.ndarray) -> tuple:
    """The daily kill-switch inside bar i, whose range reached `trigger` (strategy.kill_trigger of the positions
    left after the bar's fills; see ASSUMPTIONS): with fine bars, the first fine bar from m_from to m_end that
    reaches it (none: nothing happens), else the bar itself. Every position is closed at the trigger (or that
    bar's open when it opened beyond it) moved against us by the slippage, taker fee; resting entries are
    cancelled and the day is halted. Returns (cash, trade count)."""
    px = st.kill_fill_price(o[i], trigger, direction)
    when = float(t[i])
    if m_end >= 0:
        px = math.nan
        for m in range(m_from, m_end):
            if st.kill_crossed(fl[m], fh[m], trigger, direction):
                px = st.kill_fill_price(fo[m], trigger, direction)
                when = float(ft[m])
                break
        if math.isnan(px):
            return cash, nt
    day_state[st.D_HALTED] = 1.0
    counters[C_KILL_INTRABAR] += 1
    for k in range(qty.shape[0]):
        if qty[k] > 0.0:
            cash = _close(k, px * (1.0 - side[k] * slip), taker_fee, EXIT_KILL, when, i,
                          pos, side, qty, fill_bar, trades, nt, cash)
            nt += 1
    rq[0] = 0.0
    rq[1] = 0.0
    return cash, nt


@njit(cache=True)
def simulate_core(t: np.ndarray, o: np.ndarray, h: np.ndarray, lo_: np.ndarray, c: np.ndarray,
                  atr: np.ndarray, pel: np.ndarray, pes: np.ndarray, pdl: np.ndarray, pds: np.ndarray,
                  ft: np.ndarray, fo: np.ndarray, fh: np.ndarray, fl: np.ndarray,
                  fstart: np.ndarray, fend: np.ndarray, lat_steps: int,
                  params: np.ndarray, maker_fee: float, taker_fee: float, slip: float, funding_rate: float,
                  touch: bool, initial_equity: float, bar_seconds: float, record_intents: bool,
                  allowed: np.ndarray, bid_depth: np.ndarray, ask_depth: np.ndarray) -> tuple:
    """Run the whole simulation; returns (trades, n_trades, equity_rows, intents_log, n_intents, counters).

    t/ft are bar open times in epoch seconds; fstart/fend index each bar's fine bars (empty = none);
    allowed[i] is the entry gate at bar i's close (strategy.EntryGate); bid_depth/ask_depth[i] the bar's
    book depth per side for strategy.max_book_share (NaN: unknown, no cap).
    """
    n = t.shape[0]
    cap = int(params[st.P_MAX_POS])
    tick = params[st.P_TICK]
    pos = np.zeros((cap, N_POS_COLS))
    side = np.zeros(cap)
    qty = np.zeros(cap)
    fill_bar = np.zeros(cap)
    rest = np.zeros((2, 3))
    rq = np.zeros(2)
    rp = np.zeros(2)
    rbar = np.zeros(2)
    pend = np.zeros((2 * cap + 8, st.N_INTENT_COLS))
    npend = 0
    day_state = st.new_day_state()
    trades = np.zeros((64, N_TRADE_COLS))
    nt = 0
    ilog = np.zeros((64 if record_intents else 1, st.N_INTENT_COLS + 1))
    ni = 0
    eq = np.zeros((n, 5))
    counters = np.zeros(4)
    cash = initial_equity
    k_trig, k_dir = math.nan, 0
    k_cash, k_start, k_halted = math.nan, math.nan, -1.0
    for i in range(n):
        if trades.shape[0] - nt < cap + 2:
            trades = _grow(trades)
        fine = fend[i] > fstart[i]
        day = int(t[i] // 86400)
        filled = False
        m_from = fstart[i]          # the kill-switch watches the fine bars from the bar's last fill on
        # funding at the bar open, on positions held through it
        if funding_rate != 0.0 and t[i] % FUNDING_PERIOD_S == 0:
            for k in range(cap):
                if qty[k] > 0.0:
                    pay = side[k] * qty[k] * o[i] * funding_rate
                    cash -= pay
                    pos[k, PS_FUNDING] += pay
                    counters[C_FUNDING_EVENTS] += 1
        # orders sent at the previous close arrive now
        k0 = -1
        ref_px = o[i]
        ref_t = float(t[i])
        if fine:
            k0 = min(fstart[i] + lat_steps, fend[i] - 1)
            ref_px = fo[k0]
            ref_t = float(ft[k0])
        for j in range(npend):
            kind = int(pend[j, st.K_KIND])
            s = int(pend[j, st.K_SIDE])
            if kind == st.CANCEL:
                rq[int(pend[j, st.K_REF])] = 0.0
            elif kind == st.EXIT:
                k = int(pend[j, st.K_REF])
                if qty[k] > 0.0:
                    reason = EXIT_KILL if int(pend[j, st.K_REASON]) == st.R_KILL else EXIT_TIME
                    cash = _close(k, ref_px * (1.0 - side[k] * slip), taker_fee, reason, ref_t, i,
                                  pos, side, qty, fill_bar, trades, nt, cash)
                    nt += 1
                    filled = True
                    m_from = max(m_from, k0)
            elif kind == st.MARKET:
                cash -= _open(s, ref_px * (1.0 + s * slip), pend[j, st.K_QTY], pend[j, st.K_TP],
                              pend[j, st.K_SL], pend[j, st.K_PRICE], tick, TAKER, taker_fee, ref_t, i, k0, pos,
                              side, qty, fill_bar)
                filled = True
                m_from = max(m_from, k0)
            else:
                price = pend[j, st.K_PRICE]
                r = int(pend[j, st.K_REF])
                if (s == 1 and price >= ref_px) or (s == -1 and price <= ref_px):
                    counters[C_REJECTED_POSTONLY] += 1
                else:
                    rq[r] = pend[j, st.K_QTY]
                    rp[r] = price
                    rbar[r] = i - 1
                    rest[r, RS_TP] = pend[j, st.K_TP]
                    rest[r, RS_SL] = pend[j, st.K_SL]
                    rest[r, RS_FINE_K] = k0
        npend = 0
        # resting entries
        for r in range(2):
            if rq[r] > 0.0:
                s = 1 - 2 * r
                if fine:
                    m0 = int(rest[r, RS_FINE_K]) if rbar[r] == i - 1 and rest[r, RS_FINE_K] >= 0 else fstart[i]
                    for m in range(m0, fend[i]):
                        if _limit_hit(s, rp[r], fh[m], fl[m], touch):
                            cash -= _open(s, rp[r], rq[r], rest[r, RS_TP], rest[r, RS_SL], rp[r], tick, MAKER,
                                          maker_fee, float(ft[m]), i, m, pos, side, qty, fill_bar)
                            rq[r] = 0.0
                            filled = True
                            m_from = max(m_from, m)
                            break
                elif _limit_hit(s, rp[r], h[i], lo_[i], touch):
                    cash -= _open(s, rp[r], rq[r], rest[r, RS_TP], rest[r, RS_SL], rp[r], tick, MAKER, maker_fee,
                                  float(t[i]), i, -1, pos, side, qty, fill_bar)
                    rq[r] = 0.0
                    filled = True
        # exits: take-profit and stop of every open position
        for k in range(cap):
            if qty[k] == 0.0:
                continue
            s = int(side[k])
            tp = pos[k, PS_TP]
            sl = pos[k, PS_SL]
            new = fill_bar[k] == i
            code = 0
            px = 0.0
            when = float(t[i])
            if fine:
                coarse_code, _ = _exit_check(s, sl, tp, o[i], h[i], lo_[i], False, touch)
                if new or coarse_code != 0:
                    m0 = int(pos[k, PS_FINE_K]) if new and pos[k, PS_FINE_K] >= 0 else fstart[i]
                    for m in range(m0, fend[i]):
                        code, px = _exit_check(s, sl, tp, fo[m], fh[m], fl[m], new and m == m0, touch)
                        if code != 0:
                            when = float(ft[m])
                            m_from = max(m_from, m)
                            break
                    if coarse_code != 0 and not new:
                        counters[C_FINE_RESOLVED] += 1
            else:
                code, px = _exit_check(s, sl, tp, o[i], h[i], lo_[i], new, touch)
            if code == 1:
                cash = _close(k, px * (1.0 - s * slip), taker_fee, EXIT_SL, when, i,
                              pos, side, qty, fill_bar, trades, nt, cash)
                nt += 1
                filled = True
            elif code == 2:
                cash = _close(k, px, maker_fee, EXIT_TP, when, i, pos, side, qty, fill_bar, trades, nt, cash)
                nt += 1
                filled = True
        # intrabar kill-switch: the trigger of what is left after the bar's fills (strategy.kill_trigger, kept
        # until a fill, cash or the day state changes) against the bar's adverse extreme; a book that is flat,
        # unchanged and not breached (k_dir 0) cannot breach
        if (k_dir != 0 or filled or cash != k_cash) and day_state[st.D_DAY] >= 0.0:
            if day != day_state[st.D_DAY]:
                st.roll_day(day, math.nan, day_state)
            if (filled or cash != k_cash or day_state[st.D_START_EQUITY] != k_start
                    or day_state[st.D_HALTED] != k_halted):
                k_cash, k_start, k_halted = cash, day_state[st.D_START_EQUITY], day_state[st.D_HALTED]
                k_trig, k_dir = math.nan, 0
                if k_halted == 0.0:
                    k_trig, k_dir = st.kill_trigger(side, qty, pos[:, PS_ENTRY], cash, k_start,
                                                    params[st.P_DAILY_LOSS])
            if k_dir != 0 and st.kill_crossed(lo_[i], h[i], k_trig, k_dir):
                cash, nt = _kill_flatten(i, k_trig, k_dir, cash, nt, t, o, ft, fo, fh, fl, m_from,
                                         fend[i] if fine else -1, taker_fee, slip, day_state, pos, side, qty,
                                         fill_bar, rq, trades, counters)
        # mark to market at the close
        upnl = 0.0
        notional = 0.0
        npos = 0
        for k in range(cap):
            if qty[k] > 0.0:
                upnl += side[k] * qty[k] * (c[i] - pos[k, PS_ENTRY])
                notional += qty[k] * c[i]
                npos += 1
        equity = cash + upnl
        eq[i, E_EQUITY] = equity
        eq[i, E_CASH] = cash
        eq[i, E_UPNL] = upnl
        eq[i, E_NOTIONAL] = notional
        eq[i, E_NPOS] = npos
        if i == n - 1:
            break
        if (npos == 0 and rq[0] == 0.0 and rq[1] == 0.0
                and st.is_idle(day, equity, pel[i], pes[i], pdl[i], pds[i], day_state, params)):
            continue
        npend = st.decide_core(i, day, c[i], atr[i], bid_depth[i], ask_depth[i], pel[i], pes[i], pdl[i], pds[i],
                               equity, day_state, side, qty, fill_bar, rq, rp, rbar, params, pend, allowed[i])
        if record_intents:
            while ilog.shape[0] - ni < npend:
                ilog = _grow(ilog)
            for j in range(npend):
                ilog[ni, 0] = i
                ilog[ni, 1:] = pend[j]
                ni += 1
    # the end: close what is still open at the last close
    if n > 0:
        end_t = float(t[n - 1]) + bar_seconds
        for k in range(cap):
            if qty[k] > 0.0:
                cash = _close(k, c[n - 1] * (1.0 - side[k] * slip), taker_fee, EXIT_END, end_t, n - 1,
                              pos, side, qty, fill_bar, trades, nt, cash)
                nt += 1
        eq[n - 1, E_EQUITY] = cash
        eq[n - 1, E_CASH] = cash
        eq[n - 1, E_UPNL] = 0.0
    return trades, nt, eq, ilog, ni, counters


# ---------------------------------------------------------------- Python API
@dataclass
class BacktestResult:
    """Everything one run produced; metrics come from metrics.compute_metrics."""
    trades: pd.DataFrame
    fills: pd.DataFrame
    equity: pd.DataFrame
    metrics: dict
    initial_equity: float
    counters: dict = field(default_factory=dict)
    intents: pd.DataFrame | None = None
    assumptions: list = field(default_factory=lambda: list(ASSUMPTIONS))

    def bar_returns(self) -> pd.Series:
        """Bar-by-bar mark-to-market returns (for deflated-Sharpe and PBO statistics)."""
        return metrics_mod.bar_returns(self.equity["equity"], self.initial_equity)


def _check_frame(frame: pd.DataFrame, columns: list[str], what: str) -> None:
    """Refuse frames the simulation cannot trust, naming the problem."""
    missing = [col for col in columns if col not in frame.columns]
    if missing:
        raise ValueError(f"{what} lacks column(s) {', '.join(missing)}")
    if not isinstance(frame.index, pd.DatetimeIndex) or frame.index.tz is None:
        raise ValueError(f"{what} must be indexed by a tz-aware (UTC) DatetimeIndex of bar open times")
    if not frame.index.is_monotonic_increasing or frame.index.has_duplicates:
        raise ValueError(f"{what} index must be strictly increasing")
    prices = frame[[col for col in PRICE_COLUMNS if col in frame.columns]].to_numpy(np.float64)
    if prices.size and not np.isfinite(prices).all():
        bad = frame.index[~np.isfinite(prices).all(axis=1)][0]
        raise ValueError(f"{what} has a non-finite price at {bad}")


def _epoch_seconds(index: pd.DatetimeIndex) -> np.ndarray:
    """Bar open times as int64 epoch seconds."""
    return index.tz_convert("UTC").as_unit("ns").asi8 // 1_000_000_000


def _fine_arrays(fine: pd.DataFrame | None, t: np.ndarray, bar_s: int, latency_ms: float) -> tuple:
    """Index the finer bars inside each bar; returns (ft, fo, fh, fl, fstart, fend, lat_steps)."""
    n = t.shape[0]
    if fine is None or len(fine) == 0:
        z = np.zeros(0)
        return np.zeros(0, np.int64), z, z, z, np.zeros(n, np.int64), np.zeros(n, np.int64), 0
    _check_frame(fine, PRICE_COLUMNS, "fine bars")
    ft = _epoch_seconds(fine.index)
    steps = np.diff(ft)
    fine_s = int(np.min(steps)) if steps.size else bar_s
    if fine_s >= bar_s or bar_s % fine_s != 0:
        raise ValueError(f"fine bars ({fine_s}s) must divide the bar timeframe ({bar_s}s)")
    fstart = np.searchsorted(ft, t, side="left").astype(np.int64)
    fend = np.searchsorted(ft, t + bar_s, side="left").astype(np.int64)
    cols = [np.ascontiguousarray(fine[col].to_numpy(np.float64)) for col in ("open", "high", "low")]
    return ft, cols[0], cols[1], cols[2], fstart, fend, int(latency_ms / 1000.0 // fine_s)


def run_backtest(frame: pd.DataFrame, probs: pd.DataFrame, cfg: GlobalConfig,
                 fine: pd.DataFrame | None = None, record_intents: bool = False,
                 entries_allowed: np.ndarray | None = None) -> BacktestResult:
    """Simulate the hybrid strategy over `frame` (open/high/low/close/atr) with model probabilities `probs`.

    entries_allowed: optional bool per bar, the entry gate at its close (default: always open)."""
    _check_frame(frame, PRICE_COLUMNS + ["atr"], "bars")
    missing = [col for col in PROB_COLUMNS if col not in probs.columns]
    if missing:
        raise ValueError(f"probabilities lack column(s) {', '.join(missing)}")
    sc, venue = cfg.strategy, cfg.venue
    bar_s = timeframe_seconds(cfg.data.timeframe)
    t = _epoch_seconds(frame.index)
    if t.size > 1 and int(np.min(np.diff(t))) != bar_s:
        raise ValueError(f"bars are {int(np.min(np.diff(t)))} s apart but the timeframe is {cfg.data.timeframe} "
                         f"({bar_s} s): set data.timeframe (--timeframe) to match the bars")
    if fine is not None and t.size:
        end = frame.index[-1] + pd.Timedelta(seconds=bar_s)
        fine = fine.loc[(fine.index >= frame.index[0]) & (fine.index < end)]
    p = probs.reindex(frame.index)[PROB_COLUMNS].to_numpy(np.float64)
    arr = {col: np.ascontiguousarray(frame[col].to_numpy(np.float64)) for col in PRICE_COLUMNS + ["atr"]}
    ft, fo, fh, fl, fstart, fend, lat_steps = _fine_arrays(fine, t, bar_s, venue.latency_ms)
    trades_raw, nt, eq, ilog, ni, counters = simulate_core(
        t, arr["open"], arr["high"], arr["low"], arr["close"], arr["atr"],
        np.ascontiguousarray(p[:, 0]), np.ascontiguousarray(p[:, 1]), np.ascontiguousarray(p[:, 2]),
        np.ascontiguousarray(p[:, 3]), ft, fo, fh, fl, fstart, fend, lat_steps,
        st.strategy_params(sc, cfg.instrument), venue.maker_fee, venue.taker_fee, venue.slippage_bps / 1e4,
        venue.funding_rate_8h, venue.fill_rule == "touch", venue.initial_equity, float(bar_s), record_intents,
        _gate_array(entries_allowed, len(frame)), *_depth_arrays(frame))
    trades = _trades_frame(trades_raw[:nt], frame.index)
    equity = _equity_frame(eq, frame.index)
    result = BacktestResult(
        trades=trades, fills=fills_from_trades(trades), equity=equity, metrics={},
        initial_equity=venue.initial_equity,
        counters={"rejected_postonly": int(counters[C_REJECTED_POSTONLY]),
                  "funding_events": int(counters[C_FUNDING_EVENTS]),
                  "fine_resolved_exits": int(counters[C_FINE_RESOLVED]),
                  "intrabar_kills": int(counters[C_KILL_INTRABAR])},
        intents=_intents_frame(ilog[:ni], frame.index) if record_intents else None)
    result.metrics = metrics_mod.compute_metrics(result)
    result.metrics.update(metrics_mod.liquidity_share(trades, frame))
    return result


def _depth_arrays(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(bid, ask) book depth per bar for the strategy's max_book_share; NaN (no cap) where the bars carry no
    ob_*_depth_mean columns (a --signals run without a data folder)."""
    return tuple(np.ascontiguousarray(frame[col].to_numpy(np.float64)) if col in frame.columns
                 else np.full(len(frame), np.nan) for col in DEPTH_COLUMNS)


def _gate_array(entries_allowed: np.ndarray | None, n: int) -> np.ndarray:
    """The per-bar entry gate as a contiguous bool array (all open by default)."""
    if entries_allowed is None:
        return np.ones(n, dtype=np.bool_)
    gate = np.ascontiguousarray(np.asarray(entries_allowed, dtype=np.bool_))
    if gate.shape != (n,):
        raise ValueError(f"entries_allowed has shape {gate.shape}, expected ({n},): one flag per bar")
    return gate


def _to_time(seconds: np.ndarray) -> pd.DatetimeIndex:
    """Epoch seconds (float) to UTC timestamps."""
    return pd.to_datetime(np.round(seconds * 1e3).astype(np.int64), unit="ms", utc=True)


def _trades_frame(raw: np.ndarray, index: pd.DatetimeIndex) -> pd.DataFrame:
    """One row per closed trade, with gross and net PnL."""
    side = raw[:, T_SIDE].astype(np.int64)
    gross = side * raw[:, T_QTY] * (raw[:, T_EXIT_PX] - raw[:, T_ENTRY_PX])
    fees = raw[:, T_ENTRY_FEE] + raw[:, T_EXIT_FEE]
    out = pd.DataFrame({
        "entry_time": _to_time(raw[:, T_ENTRY_TIME]),
        "exit_time": _to_time(raw[:, T_EXIT_TIME]),
        "side": np.where(side == 1, "long", "short"),
        "regime": np.where(raw[:, T_REGIME] == MAKER, "maker", "taker"),
        "qty": raw[:, T_QTY],
        "entry_price": raw[:, T_ENTRY_PX],
        "exit_price": raw[:, T_EXIT_PX],
        "take_profit": raw[:, T_TP],
        "stop_loss": raw[:, T_SL],
        "exit_reason": [EXIT_NAMES[int(r)] for r in raw[:, T_REASON]],
        "entry_fee": raw[:, T_ENTRY_FEE],
        "exit_fee": raw[:, T_EXIT_FEE],
        "fees": fees,
        "funding": raw[:, T_FUNDING],
        "gross_pnl": gross,
        "pnl": gross - fees - raw[:, T_FUNDING],
        "entry_bar": raw[:, T_ENTRY_BAR].astype(np.int64),
        "exit_bar": raw[:, T_EXIT_BAR].astype(np.int64),
    })
    out["holding_bars"] = out["exit_bar"] - out["entry_bar"]
    return out.sort_values(["exit_time", "entry_time"], kind="stable").reset_index(drop=True)


def fills_from_trades(trades: pd.DataFrame) -> pd.DataFrame:
    """Every fill (entries and exits) in time order, with liquidity, fee and reason."""
    entry = pd.DataFrame({
        "time": trades["entry_time"], "trade_id": trades.index, "action": "entry",
        "side": np.where(trades["side"] == "long", "buy", "sell"), "qty": trades["qty"],
        "price": trades["entry_price"], "liquidity": trades["regime"], "fee": trades["entry_fee"],
        "reason": np.where(trades["regime"] == "maker", "limit_entry", "breakout_entry")})
    exit_liq = np.where(trades["exit_reason"] == "take_profit", "maker", "taker")
    exit_ = pd.DataFrame({
        "time": trades["exit_time"], "trade_id": trades.index, "action": "exit",
        "side": np.where(trades["side"] == "long", "sell", "buy"), "qty": trades["qty"],
        "price": trades["exit_price"], "liquidity": exit_liq, "fee": trades["exit_fee"],
        "reason": trades["exit_reason"]})
    fills = pd.concat([entry, exit_], ignore_index=True)
    return fills.sort_values(["time", "trade_id", "action"], kind="stable").reset_index(drop=True)


def _equity_frame(eq: np.ndarray, index: pd.DatetimeIndex) -> pd.DataFrame:
    """Per-bar mark-to-market equity with drawdown and exposure (notional / equity)."""
    equity = eq[:, E_EQUITY]
    peak = np.maximum.accumulate(equity) if equity.size else equity
    with np.errstate(divide="ignore", invalid="ignore"):
        exposure = np.where(equity > 0, eq[:, E_NOTIONAL] / equity, np.nan)
        drawdown = np.where(peak > 0, equity / peak - 1.0, np.nan)
    block = np.column_stack([equity, eq[:, E_CASH], eq[:, E_UPNL], eq[:, E_NOTIONAL], drawdown, exposure])
    out = pd.DataFrame(block, index=index, columns=["equity", "cash", "upnl", "notional", "drawdown", "exposure"],
                       copy=False)
    out.insert(4, "positions", eq[:, E_NPOS].astype(np.int64))
    return out


def _intents_frame(ilog: np.ndarray, index: pd.DatetimeIndex) -> pd.DataFrame:
    """The compiled core's intents, one row per intent, in the record form strategy.decide returns."""
    rows = []
    for row in ilog:
        intent = st.intent_from_row(row[1:])
        rows.append({"bar": int(row[0]), "time": index[int(row[0])], **intent.__dict__})
    return pd.DataFrame(rows, columns=["bar", "time", "kind", "side", "reason", "qty", "price", "tp_dist",
                                       "sl_dist", "ref"])


def save_outputs(result: BacktestResult, out_dir: Path) -> None:
    """Write trades.csv (every fill and exit with reason), closed_trades.csv, equity.csv, metrics.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    result.fills.to_csv(out_dir / "trades.csv", index=False)
    result.trades.to_csv(out_dir / "closed_trades.csv", index=False)
    result.equity.to_csv(out_dir / "equity.csv", index_label="time")
    (out_dir / "metrics.json").write_text(metrics_mod.to_json(result.metrics), encoding="utf-8")


# ---------------------------------------------------------------- CLI
def _read_signals(path: Path) -> pd.DataFrame:
    """Read a signals CSV (time + the four probabilities, optionally open/high/low/close/atr, and volume and
    the book depths DEPTH_COLUMNS for the entry size cap and the capacity check)."""
    try:
        df = pd.read_csv(path)
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read signals file {path}: {exc}") from None
    if "time" not in df.columns:
        raise ValueError(f"{path}: needs a 'time' column (bar open time, UTC)")
    missing = [col for col in PROB_COLUMNS if col not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)}")
    times = pd.to_datetime(df["time"], utc=True, errors="coerce")
    if times.isna().any():
        line = int(np.flatnonzero(times.isna().to_numpy())[0]) + 2
        raise ValueError(f"{path}: line {line}: unreadable time {df['time'].iloc[line - 2]!r}")
    for col in PROB_COLUMNS:
        values = pd.to_numeric(df[col], errors="coerce")
        bad = values.isna() | (values < 0) | (values > 1)
        if bad.any():
            line = int(np.flatnonzero(bad.to_numpy())[0]) + 2
            raise ValueError(f"{path}: line {line}: {col} = {df[col].iloc[line - 2]!r} is not a probability")
        df[col] = values
    df.index = pd.DatetimeIndex(times, name="time")
    if df.index.has_duplicates or not df.index.is_monotonic_increasing:
        raise ValueError(f"{path}: times must be strictly increasing")
    return df.drop(columns=["time"])


def _load_market(cfg: GlobalConfig, signals: pd.DataFrame | None) -> tuple:
    """Bars with ATR for the run (from the signals file when it carries prices, else from the data folder, refused
    when it lacks cfg's symbol or days; for a model from the features' warm-up before data.start on, so the first
    requested bar is warm), 1m bars, and the features computed on the way (None when the signals carried prices)."""
    if signals is not None and all(col in signals.columns for col in PRICE_COLUMNS + ["atr"]):
        kept = [c for c in PRICE_COLUMNS + ["atr", "volume"] + DEPTH_COLUMNS if c in signals.columns]
        return signals[kept].astype(np.float64), None, None
    import data_loader
    import feature_engine
    data_loader.require_data(cfg)
    loaded = feature_engine.with_warmup(cfg) if signals is None else cfg
    bars = data_loader.load_bars(loaded)
    feats = feature_engine.compute_features(bars, cfg)
    frame = bars[PRICE_COLUMNS + metrics_mod.LIQUIDITY_COLUMNS].assign(atr=feats["atr"]).loc[feats["atr"].notna()]
    fine = data_loader.load_bars(loaded, "1m") if cfg.data.timeframe != "1m" else None
    return frame, fine, feats


def _model_probs(cfg: GlobalConfig, config_path: Path, features: pd.DataFrame,
                 frame_index: pd.DatetimeIndex) -> pd.DataFrame:
    """The four probabilities from the model bundle saved beside params.json (NaN before feature warm-up)."""
    import feature_engine
    import models
    bundle = models.ModelBundle.load(config_path.parent)
    feats = features.reindex(frame_index)
    warm = feats["is_warm"].fillna(False).to_numpy(bool)
    if not warm.any():
        raise ValueError("no bar is past the feature warm-up: load a longer span")
    return bundle.predict_where(feats[feature_engine.feature_names(cfg)], warm)


def _saved_span(config_path: Path) -> tuple[pd.Timestamp, pd.Timestamp] | None:
    """The span a training report scored (params.json 'backtest_span'), so the CLI reproduces its numbers."""
    try:
        span = json.loads(config_path.read_text(encoding="utf-8")).get("backtest_span")
    except (OSError, json.JSONDecodeError):
        return None
    return (pd.Timestamp(span[0]), pd.Timestamp(span[1])) if span else None


def _between(df: pd.DataFrame | None, lo: pd.Timestamp, hi: pd.Timestamp) -> pd.DataFrame | None:
    """Rows with bar open time in [lo, hi]."""
    return None if df is None else df.loc[(df.index >= lo) & (df.index <= hi)]


def _training_overlap(config_path: Path, frame: pd.DataFrame) -> str:
    """A warning when the traded bars overlap data the model was fitted to (params.json): the development span it
    was tuned and trained on, or OOS-1, which picked it among the candidates and set its thresholds; else ''."""
    try:
        params = json.loads(config_path.read_text(encoding="utf-8"))
        spans = {"the data this model was tuned and trained on ({} .. {})": (params["splits"]["dev"][0],
                                                                             params["trained_on"][1]),
                 "OOS-1 ({} .. {}), which picked this model and set its thresholds": tuple(params["splits"]["oos1"])}
        spans = {text: (pd.Timestamp(lo), pd.Timestamp(hi)) for text, (lo, hi) in spans.items()}
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return ""
    hit = [text.format(lo, hi) for text, (lo, hi) in spans.items()
           if len(frame) and frame.index[0] <= hi and frame.index[-1] >= lo]
    if hit:
        return (f"warning: the backtest span {frame.index[0]} .. {frame.index[-1]} overlaps {' and '.join(hit)}: "
                "in-sample numbers, not evidence of an edge")
    return ""


def _unmatched_signals(path: Path, signals: pd.DatetimeIndex, chosen: pd.DatetimeIndex,
                       bars: pd.DatetimeIndex) -> str:
    """'' when every chosen signal time (the file's rows inside --start/--end) is the open time of a bar traded; a
    warning counting those that are not (they are ignored); ValueError naming the file's and the bars' spans when
    none is, since nothing could trade."""
    unmatched = int((~chosen.isin(bars)).sum())
    if len(chosen) and not unmatched:
        return ""
    spans = f"the signals in {path} span {_span_text(signals)}, the bars {_span_text(bars)}"
    if unmatched == len(chosen):
        raise ValueError(f"no signal time is a bar's open time ({spans})")
    return f"warning: {unmatched} of {len(chosen)} signal rows match no bar and are ignored ({spans})"


def _span_text(index: pd.DatetimeIndex) -> str:
    """'first .. last' of a time index ('no rows' when empty)."""
    return f"{index[0]} .. {index[-1]}" if len(index) else "no rows"


def _slice(df: pd.DataFrame | None, start: str, end: str) -> pd.DataFrame | None:
    """Keep whole UTC days from start to end (inclusive)."""
    if df is None:
        return None
    lo = pd.Timestamp(start, tz="UTC") if start else df.index[0] if len(df) else None
    hi = pd.Timestamp(end, tz="UTC") + pd.Timedelta(days=1) if end else None
    out = df.loc[df.index >= lo] if lo is not None else df
    return out.loc[out.index < hi] if hi is not None else out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Backtest the hybrid strategy (honest fills and costs).")
    add_config_args(parser, ["--symbol", "--data-dir", "--timeframe", "--start", "--end", "--fill-rule"])
    parser.add_argument("--signals", type=Path, help="CSV of time + p_exec_long,p_exec_short,p_dir_long,"
                        "p_dir_short (optionally open,high,low,close,atr): run without models")
    parser.add_argument("--report", type=Path, help="write the HTML report here")
    parser.add_argument("--out", type=Path, default=Path("backtest_out"),
                        help="folder for trades.csv, closed_trades.csv, equity.csv, metrics.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = config_from_args(args)
        if args.signals is None and not args.config:
            raise ConfigError("give --signals FILE or --config params.json of a trained model")
        signals = _read_signals(args.signals) if args.signals else None
        frame, fine, feats = _load_market(cfg, signals)
        probs = (signals[PROB_COLUMNS] if signals is not None
                 else _model_probs(cfg, Path(args.config), feats, frame.index))
        span = (_saved_span(Path(args.config)) if args.config and signals is None
                and not (cfg.data.start or cfg.data.end) else None)
        if span is not None:
            frame, probs = (_between(x, *span) for x in (frame, probs))
        else:
            frame, probs, fine = (_slice(x, cfg.data.start, cfg.data.end) for x in (frame, probs, fine))
        if frame is None or len(frame) < 2:
            raise ValueError("fewer than two bars to backtest in the chosen span")
        warning = (_training_overlap(Path(args.config), frame) if signals is None
                   else _unmatched_signals(args.signals, signals.index, probs.index, frame.index))
        if warning:
            print(warning, file=sys.stderr)
        result = run_backtest(frame, probs, cfg, fine=fine)
    except (ConfigError, ValueError, OSError, RuntimeError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    save_outputs(result, args.out)
    if args.report:
        import report
        report.write_backtest_report(args.report, frame, result, title=f"{cfg.symbol} backtest")
    m = result.metrics
    print(f"bars {len(frame)}  trades {m['trades']}  total return {m['total_return']:.2%}  "
          f"{sharpe_text(m['sharpe'])}  max drawdown {m['max_drawdown']:.2%}  fees {m['fees']:.2f}  "
          f"-> {args.out}" + (f", {args.report}" if args.report else ""))
    if warning := metrics_mod.liquidity_warning(m):
        print(f"warning: {warning}")
    return 0


def sharpe_text(value: float) -> str:
    """The summary line's Sharpe: annualised from daily returns, or why there is none (too few days)."""
    if math.isfinite(value):
        return f"sharpe {value:.2f}"
    return f"sharpe n/a (under {metrics_mod.MIN_DAILY_RETURNS} daily returns)"


if __name__ == "__main__":
    sys.exit(main())
