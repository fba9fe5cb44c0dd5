"""Synthetic market generator: days of trades and L2 book in exactly the collector's files.

Users have no data on day one and tests need days of it, so this writes
`<out>/<SYM>_Sim/Trade/<SYM><date>.csv` (Bybit archive columns) and
`<out>/<SYM>_Sim/Orderbook/<date>_<SYM>_ob<levels>.data` (Bybit JSON lines: a snapshot at each file
start, then deltas of changed levels only with consecutive `u`) plus `instrument.json`.

The model, per book step of `book_interval` seconds:
- latent log mid with stochastic volatility (fast + slow log-vol OU: clustering, fat tails) and a
  regime chain: choppy (most of the time) and trending breakouts (up or down, higher vol, thinner book,
  wider spread, more trades);
- a hidden informed signal `S` (OU, ~1 h memory) plus a `lead` that ramps up minutes before each
  breakout. With `alpha > 0` the mid drifts with `alpha·(S, trend, mean reversion to an anchor in chop)`
  and `alpha·(S + lead)` leaks, each channel under its own independent noise, into book depth imbalance,
  touch sizes (micro-price) and the taker side of market orders. With `alpha = 0` the mid is a
  martingale and the leaks are pure noise: nothing observable predicts returns (the overfitting control);
- a price-space book on a tick grid: spread of a few ticks, depth growing away from the touch, levels
  refreshing (faster near the touch), vanishing and reappearing, occasional walls; market orders from a
  self-exciting (Hawkes, exponential kernel) process consume the touch.
Everything is deterministic for a seed. Hot loops are numba kernels that write JSON/CSV bytes directly.
"""
from __future__ import annotations

import argparse
import datetime as dt
import gzip as gzip_module
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from numba import njit
from tqdm import tqdm

from config import ConfigError, InstrumentConfig, parse_duration

log = logging.getLogger("market_sim")

_RING = 1 << 13          # ring buffer of price ticks holding both sides of the book
_TRADE_HEADER = ("timestamp,symbol,side,size,price,tickDirection,trdMatchID,grossValue,"
                 "homeNotional,foreignNotional,RPI\n")


class MarketParams(NamedTuple):
    """Calibration of the synthetic market (rates per second, times in seconds); a NamedTuple so numba can read it."""
    daily_vol: float = 0.04          # base daily volatility of the log mid
    vol_fast_tau: float = 1800.0     # fast log-vol OU memory
    vol_fast_std: float = 0.35
    vol_slow_tau: float = 86400.0    # slow log-vol OU memory
    vol_slow_std: float = 0.25
    trend_rate: float = 1 / 28800.0  # chop -> breakout (about every 8 h)
    trend_end_rate: float = 1 / 2400.0  # breakout -> chop (about 40 min)
    trend_vol_mult: float = 1.6
    trend_drift: float = 0.03        # breakout drift in units of local sigma per second (times alpha)
    mr_tau: float = 2700.0           # mean-reversion time to the chop anchor (times alpha)
    anchor_tau: float = 14400.0      # anchor memory in chop
    signal_tau: float = 3600.0       # informed signal memory
    signal_drift: float = 0.022      # drift per unit signal in units of local sigma per second
    lead_tau: float = 600.0          # how far ahead the informed side sees a breakout
    lead_weight: float = 1.5         # weight of the breakout lead in the leaked information
    noise_tau: float = 300.0         # memory of the noise hiding each leak channel
    noise_std: float = 1.3
    depth_gamma: float = 0.35        # book depth log-skew per unit leak
    touch_gamma: float = 0.6         # touch size log-skew per unit leak
    flow_gamma: float = 0.6          # taker buy log-odds per unit leak
    flow_chase: float = 0.4          # taker buy log-odds per sigma of the last step's move
    spread_rate: float = 0.2         # how often the spread is redrawn
    spread_extra: float = 0.8        # mean extra ticks over one (scaled by vol, x1.8 in breakouts)
    size_base: float = 2.0           # mean touch size (base units)
    size_growth: float = 0.08        # mean level size grows by this fraction per tick from the touch
    size_sigma: float = 0.6          # log-normal dispersion of level sizes
    empty_prob: float = 0.15         # chance a refreshed level (beyond the first two) is empty
    empty_far: float = 0.6           # ... rising to this at `sparse_ticks` from the touch (deep books are sparse)
    sparse_ticks: float = 100.0
    trend_depth_mult: float = 0.6    # depth in breakouts relative to chop
    near_levels: float = 8.0         # levels near the touch that refresh fast
    near_rate: float = 0.25          # refresh rate of each near level
    far_rate: float = 0.005          # refresh rate of each far level
    wall_rate: float = 1 / 1800.0    # wall appearances per side in chop (x0.3 in breakouts)
    wall_life: float = 600.0         # mean wall lifetime
    wall_mult: float = 25.0          # wall size relative to a normal level
    hawkes_mu: float = 0.25          # baseline market-order rate
    hawkes_branching: float = 0.6    # mean children per order
    hawkes_decay: float = 0.2        # kernel decay rate (1/s)
    trade_size_mu: float = -0.5      # log-normal trade size (base units)
    trade_size_sigma: float = 1.1


@dataclass(frozen=True)
class SimSummary:
    """What a run produced, for the CLI and benchmarks."""
    folder: Path
    days: int
    trades: int
    book_messages: int
    book_bytes: int
    trade_bytes: int
    seconds: float


# ---------------------------------------------------------------- byte writers (numba)
@njit(cache=True)
def _grow(buf: np.ndarray, pos: int, need: int) -> np.ndarray:
    """Return a buffer with room for `need` more bytes after pos (doubling, contents kept)."""
    if pos + need <= buf.shape[0]:
        return buf
    size = buf.shape[0] * 2
    while size < pos + need:
        size *= 2
    out = np.empty(size, np.uint8)
    out[:pos] = buf[:pos]
    return out


@njit(cache=True)
def _put(buf: np.ndarray, pos: int, src: np.ndarray) -> int:
    """Copy bytes; return the new position."""
    n = src.shape[0]
    buf[pos:pos + n] = src
    return pos + n


@njit(cache=True)
def _put_uint(buf: np.ndarray, pos: int, value: int) -> int:
    """Write a non-negative integer in decimal."""
    if value == 0:
        buf[pos] = 48
        return pos + 1
    digits = 0
    v = value
    while v > 0:
        digits += 1
        v //= 10
    v = value
    for i in range(digits - 1, -1, -1):
        buf[pos + i] = 48 + v % 10
        v //= 10
    return pos + digits


@njit(cache=True)
def _put_fixed(buf: np.ndarray, pos: int, value: int, decimals: int) -> int:
    """Write value·10^-decimals with exactly `decimals` decimals (no exponent, like exchange strings)."""
    scale = 10 ** decimals
    pos = _put_uint(buf, pos, value // scale)
    if decimals > 0:
        buf[pos] = 46
        frac = value % scale
        for i in range(decimals, 0, -1):
            buf[pos + i] = 48 + frac % 10
            frac //= 10
        pos += decimals + 1
    return pos


@njit(cache=True)
def _put_level(buf: np.ndarray, pos: int, tick: int, lots: int, tick_dec: int, qty_dec: int) -> int:
    """Write ["price","size"] (size "0" deletes the level)."""
    buf[pos] = 91
    buf[pos + 1] = 34
    pos = _put_fixed(buf, pos + 2, tick, tick_dec)
    buf[pos] = 34
    buf[pos + 1] = 44
    buf[pos + 2] = 34
    pos += 3
    if lots == 0:
        buf[pos] = 48
        pos += 1
    else:
        pos = _put_fixed(buf, pos, lots, qty_dec)
    buf[pos] = 34
    buf[pos + 1] = 93
    return pos + 2


# ---------------------------------------------------------------- the day kernel
# state slots carried from day to day
_X, _ANCHOR, _HF, _HS, _SIG, _NB, _NT, _NF, _SPREAD, _BB, _BA, _U, _SEQ, _EXC, _LAST_PX, _LAST_DIR, \
    _INIT, _Z, _CONS_B, _CONS_A, _STEP, _N_STATE = range(22)


@njit(cache=True)
def _drift_variance(p: MarketParams) -> float:
    """Long-run variance rate of the informed drifts relative to sigma² (signal OU + breakouts).

    The diffusion is scaled down by 1/sqrt(1 + alpha²·this) so alpha moves information, not volatility.
    """
    signal = p.signal_drift ** 2 * 2.0 * p.signal_tau
    duration = 1.0 / p.trend_end_rate
    chop_share = p.trend_end_rate / (p.trend_rate + p.trend_end_rate)
    trend = (p.trend_drift * p.trend_vol_mult) ** 2 * 2.0 * duration * duration * p.trend_rate * chop_share
    return signal + trend


@njit(cache=True)
def _ou(value: float, decay: float, std: float) -> float:
    """One exact step of a zero-mean OU process with stationary std `std`."""
    return value * decay + std * math.sqrt(1.0 - decay * decay) * np.random.standard_normal()


@njit(cache=True)
def _level_size(k: int, sign: float, leak_depth: float, leak_touch: float, trend: bool,
                p: MarketParams, lots_per_unit: float, allow_empty: bool) -> int:
    """A fresh size (lots) for the level k ticks from the touch, or 0 when it comes up empty."""
    empty = p.empty_prob + (p.empty_far - p.empty_prob) * min(1.0, k / p.sparse_ticks) if k >= 2 else 0.0
    if allow_empty and np.random.random() < empty:
        return 0
    mean = p.size_base * (1.0 + p.size_growth * k) / (1.0 - empty) * math.exp(sign * p.depth_gamma * leak_depth)
    if k < 2:
        mean *= math.exp(sign * p.touch_gamma * leak_touch)
    if trend:
        mean *= p.trend_depth_mult
    s = p.size_sigma
    size = mean * math.exp(s * np.random.standard_normal() - 0.5 * s * s)
    lots = int(size * lots_per_unit)
    return lots if lots > 0 else 1


@njit(cache=True)
def _mark(chg_tick: np.ndarray, chg_side: np.ndarray, n_chg: int, seen: np.ndarray, tick: int,
          side: int, stamp: int) -> int:
    """Record that a level changed this step (once per level)."""
    slot = (tick & (seen.shape[1] - 1))
    if seen[side, slot] != stamp:
        seen[side, slot] = stamp
        chg_tick[n_chg] = tick
        chg_side[n_chg] = side
        n_chg += 1
    return n_chg


@njit(cache=True)
def _simulate_day(seed: int, n_steps: int, dt: float, dt_ms: int, day_ms: int, alpha: float, levels: int,
                  regime: np.ndarray, lead: np.ndarray, state: np.ndarray, book: np.ndarray,
                  wall_until: np.ndarray, seen: np.ndarray, published: np.ndarray, p: MarketParams, tick: float,
                  lots_per_unit: float, tick_dec: int, qty_dec: int, head_snap: np.ndarray, head_delta: np.ndarray,
                  sym_part: np.ndarray):
    """Advance the market one UTC day: returns book JSON bytes, message count and the day's trades."""
    np.random.seed(seed)
    mask = _RING - 1
    sig_base = p.daily_vol / math.sqrt(86400.0)
    sq = math.sqrt(dt)
    d_hf = math.exp(-dt / p.vol_fast_tau)
    d_hs = math.exp(-dt / p.vol_slow_tau)
    d_sig = math.exp(-dt / p.signal_tau)
    d_noise = math.exp(-dt / p.noise_tau)
    a_anchor = 1.0 - math.exp(-dt / p.anchor_tau)
    p_spread = 1.0 - math.exp(-dt * p.spread_rate)
    kappa = 1.0 / p.mr_tau
    noise_scale = 1.0 / math.sqrt(1.0 + alpha * alpha * _drift_variance(p))
    near = min(int(p.near_levels), levels)
    hawkes_jump = p.hawkes_branching * p.hawkes_decay
    decay = p.hawkes_decay

    buf = np.empty(1 << 22, np.uint8)
    pos = 0
    n_msgs = 0
    cap_t = 1 << 16
    tr_t = np.empty(cap_t, np.int64)      # 1e-4 s since epoch
    tr_side = np.empty(cap_t, np.int8)    # 1 = Buy, 0 = Sell
    tr_lots = np.empty(cap_t, np.int64)
    tr_px = np.empty(cap_t, np.int64)
    tr_dir = np.empty(cap_t, np.int8)
    n_tr = 0
    max_chg = 8 * levels + 4096
    chg_tick = np.empty(max_chg, np.int64)
    chg_side = np.empty(max_chg, np.int8)

    for i in range(n_steps):
        trend = regime[i] != 0
        direction = float(regime[i])
        stamp = int(state[_STEP]) + 1
        state[_STEP] = stamp
        # ---- latent mid and hidden information
        state[_HF] = _ou(state[_HF], d_hf, p.vol_fast_std)
        state[_HS] = _ou(state[_HS], d_hs, p.vol_slow_std)
        state[_SIG] = _ou(state[_SIG], d_sig, 1.0)
        state[_NB] = _ou(state[_NB], d_noise, p.noise_std)
        state[_NT] = _ou(state[_NT], d_noise, p.noise_std)
        state[_NF] = _ou(state[_NF], d_noise, p.noise_std)
        h = state[_HF] + state[_HS]
        sigma = sig_base * math.exp(h) * (p.trend_vol_mult if trend else 1.0)
        drift = alpha * sigma * (p.signal_drift * state[_SIG] + p.trend_drift * direction)
        sigma *= noise_scale
        if not trend:
            drift -= alpha * kappa * (state[_X] - state[_ANCHOR])
        shock = np.random.standard_normal()
        state[_Z] = shock
        state[_X] += drift * dt + sigma * sq * shock
        if trend:
            state[_ANCHOR] = state[_X]
        else:
            state[_ANCHOR] += a_anchor * (state[_X] - state[_ANCHOR])
        info = alpha * (state[_SIG] + p.lead_weight * lead[i])
        leak_depth = info + state[_NB]
        leak_touch = info + state[_NT]
        leak_flow = info + state[_NF]

        # ---- touch from the mid and a persistent spread
        if state[_INIT] == 0.0 or np.random.random() < p_spread:
            extra = p.spread_extra * math.exp(h) * (1.8 if trend else 1.0)
            state[_SPREAD] = 1.0 + np.random.poisson(extra)
        spread = int(state[_SPREAD])
        center = math.exp(state[_X]) / tick
        bb = int(math.floor(center - spread / 2.0 + 0.5))
        ba = bb + spread
        n_chg = 0
        if state[_INIT] == 0.0:
            for k in range(levels):
                book[0, (bb - k) & mask] = _level_size(k, 1.0, leak_depth, leak_touch, trend, p,
                                                       lots_per_unit, True)
                book[1, (ba + k) & mask] = _level_size(k, -1.0, leak_depth, leak_touch, trend, p,
                                                       lots_per_unit, True)
            state[_INIT] = 1.0
        else:
            pbb = int(state[_BB])
            pba = int(state[_BA])
            # trades since the last step ate into the old touch
            if state[_CONS_B] > 0 and book[0, pbb & mask] > 0:
                book[0, pbb & mask] = max(0, book[0, pbb & mask] - int(state[_CONS_B]))
                n_chg = _mark(chg_tick, chg_side, n_chg, seen, pbb, 0, stamp)
            if state[_CONS_A] > 0 and book[1, pba & mask] > 0:
                book[1, pba & mask] = max(0, book[1, pba & mask] - int(state[_CONS_A]))
                n_chg = _mark(chg_tick, chg_side, n_chg, seen, pba, 1, stamp)
            # bid window [bb-L+1, bb]: drop what left it, fill what entered it
            if bb != pbb:
                for t in range(pbb - levels + 1, pbb + 1):
                    if (t > bb or t <= bb - levels) and book[0, t & mask] > 0:
                        book[0, t & mask] = 0
                        wall_until[0, t & mask] = 0
                        n_chg = _mark(chg_tick, chg_side, n_chg, seen, t, 0, stamp)
                for t in range(bb - levels + 1, bb + 1):
                    if t > pbb or t <= pbb - levels:
                        q = _level_size(bb - t, 1.0, leak_depth, leak_touch, trend, p, lots_per_unit, True)
                        book[0, t & mask] = q
                        wall_until[0, t & mask] = 0
                        if q > 0:
                            n_chg = _mark(chg_tick, chg_side, n_chg, seen, t, 0, stamp)
            if ba != pba:
                for t in range(pba, pba + levels):
                    if (t < ba or t >= ba + levels) and book[1, t & mask] > 0:
                        book[1, t & mask] = 0
                        wall_until[1, t & mask] = 0
                        n_chg = _mark(chg_tick, chg_side, n_chg, seen, t, 1, stamp)
                for t in range(ba, ba + levels):
                    if t < pba or t >= pba + levels:
                        q = _level_size(t - ba, -1.0, leak_depth, leak_touch, trend, p, lots_per_unit, True)
                        book[1, t & mask] = q
                        wall_until[1, t & mask] = 0
                        if q > 0:
                            n_chg = _mark(chg_tick, chg_side, n_chg, seen, t, 1, stamp)
            # resting liquidity refreshes: fast near the touch, slowly deeper
            for side in range(2):
                sign = 1.0 if side == 0 else -1.0
                n_near = min(np.random.poisson(p.near_rate * near * dt), 64)
                n_far = min(np.random.poisson(p.far_rate * (levels - near) * dt), 256)
                for j in range(n_near + n_far):
                    k = np.random.randint(0, near) if j < n_near else np.random.randint(near, levels)
                    t = bb - k if side == 0 else ba + k
                    if wall_until[side, t & mask] > stamp:
                        continue
                    q = _level_size(k, sign, leak_depth, leak_touch, trend, p, lots_per_unit, True)
                    if q != book[side, t & mask]:
                        book[side, t & mask] = q
                        n_chg = _mark(chg_tick, chg_side, n_chg, seen, t, side, stamp)
                # walls: large resting orders some ticks away, more common in chop
                if np.random.random() < p.wall_rate * dt * (0.3 if trend else 1.0):
                    k = np.random.randint(4, min(41, levels))
                    t = bb - k if side == 0 else ba + k
                    q = int(p.wall_mult * _level_size(k, sign, leak_depth, leak_touch, trend, p, lots_per_unit, False))
                    book[side, t & mask] = q
                    wall_until[side, t & mask] = stamp + int(np.random.exponential(p.wall_life) / dt) + 1
                    n_chg = _mark(chg_tick, chg_side, n_chg, seen, t, side, stamp)
        # the touch always holds liquidity
        if book[0, bb & mask] == 0:
            book[0, bb & mask] = _level_size(0, 1.0, leak_depth, leak_touch, trend, p, lots_per_unit, False)
            n_chg = _mark(chg_tick, chg_side, n_chg, seen, bb, 0, stamp)
        if book[1, ba & mask] == 0:
            book[1, ba & mask] = _level_size(0, -1.0, leak_depth, leak_touch, trend, p, lots_per_unit, False)
            n_chg = _mark(chg_tick, chg_side, n_chg, seen, ba, 1, stamp)
        state[_BB] = bb
        state[_BA] = ba

        # ---- book message at this step's exchange time: only levels whose published size changed
        ts = day_ms + i * dt_ms
        kept = 0
        for c in range(n_chg):
            slot = chg_tick[c] & mask
            if book[chg_side[c], slot] != published[chg_side[c], slot]:
                published[chg_side[c], slot] = book[chg_side[c], slot]
                chg_tick[kept] = chg_tick[c]
                chg_side[kept] = chg_side[c]
                kept += 1
        n_chg = kept
        if i == 0:
            for k in range(levels):
                published[0, (bb - k) & mask] = book[0, (bb - k) & mask]
                published[1, (ba + k) & mask] = book[1, (ba + k) & mask]
        if i == 0 or n_chg > 0:
            state[_U] += 1.0
            state[_SEQ] += 1.0 + n_chg + np.random.randint(0, 5)
            buf = _grow(buf, pos, 512 + 40 * (2 * levels + n_chg))
            pos = _put(buf, pos, head_snap if i == 0 else head_delta)
            pos = _put_uint(buf, pos, ts)
            pos = _put(buf, pos, sym_part)
            for side in range(2):
                if side == 1:
                    buf[pos] = 93           # ],"a":[
                    buf[pos + 1] = 44
                    buf[pos + 2] = 34
                    buf[pos + 3] = 97
                    buf[pos + 4] = 34
                    buf[pos + 5] = 58
                    buf[pos + 6] = 91
                    pos += 7
                first = True
                if i == 0:
                    for k in range(levels):
                        t = bb - k if side == 0 else ba + k
                        q = book[side, t & mask]
                        if q > 0:
                            if not first:
                                buf[pos] = 44
                                pos += 1
                            pos = _put_level(buf, pos, t, q, tick_dec, qty_dec)
                            first = False
                else:
                    for c in range(n_chg):
                        if chg_side[c] == side:
                            if not first:
                                buf[pos] = 44
                                pos += 1
                            t = chg_tick[c]
                            pos = _put_level(buf, pos, t, book[side, t & mask], tick_dec, qty_dec)
                            first = False
            # ],"u":<u>,"seq":<seq>},"cts":<cts>}\n
            for ch in (93, 44, 34, 117, 34, 58):
                buf[pos] = ch
                pos += 1
            pos = _put_uint(buf, pos, int(state[_U]))
            for ch in (44, 34, 115, 101, 113, 34, 58):
                buf[pos] = ch
                pos += 1
            pos = _put_uint(buf, pos, int(state[_SEQ]))
            for ch in (125, 44, 34, 99, 116, 115, 34, 58):
                buf[pos] = ch
                pos += 1
            pos = _put_uint(buf, pos, ts - 2 - np.random.randint(0, 15))
            buf[pos] = 125
            buf[pos + 1] = 10
            pos += 2
            n_msgs += 1

        # ---- market orders until the next step (Hawkes thinning; intensity only decays between orders)
        state[_CONS_B] = 0.0
        state[_CONS_A] = 0.0
        mu = p.hawkes_mu * math.exp(0.8 * h) * (1.8 if trend else 1.0)
        p_buy = 1.0 / (1.0 + math.exp(-(p.flow_chase * state[_Z] + p.flow_gamma * leak_flow)))
        t0 = (day_ms + i * dt_ms) / 1000.0
        t = 0.0
        exc = state[_EXC]
        while True:
            bound = mu + exc
            w = np.random.exponential(1.0 / bound)
            if t + w >= dt:
                exc *= math.exp(-decay * (dt - t))
                break
            t += w
            exc *= math.exp(-decay * w)
            if np.random.random() * bound > mu + exc:
                continue
            exc += hawkes_jump
            if n_tr == cap_t:
                cap_t *= 2
                tr_t = np.concatenate((tr_t, np.empty(cap_t - n_tr, np.int64)))
                tr_side = np.concatenate((tr_side, np.empty(cap_t - n_tr, np.int8)))
                tr_lots = np.concatenate((tr_lots, np.empty(cap_t - n_tr, np.int64)))
                tr_px = np.concatenate((tr_px, np.empty(cap_t - n_tr, np.int64)))
                tr_dir = np.concatenate((tr_dir, np.empty(cap_t - n_tr, np.int8)))
            buy = np.random.random() < p_buy
            size = math.exp(p.trade_size_mu + p.trade_size_sigma * np.random.standard_normal())
            lots = max(1, int(size * lots_per_unit))
            px = ba if buy else bb
            stamp_t = int(math.floor((t0 + t) * 10000.0))
            if stamp_t >= (day_ms + (i + 1) * dt_ms) * 10:
                stamp_t = (day_ms + (i + 1) * dt_ms) * 10 - 1
            tr_t[n_tr] = stamp_t
            tr_side[n_tr] = 1 if buy else 0
            tr_lots[n_tr] = lots
            tr_px[n_tr] = px
            last = int(state[_LAST_PX])
            if last == 0 or px == last:
                tr_dir[n_tr] = 1 if state[_LAST_DIR] <= 1 else 3   # ZeroPlus / ZeroMinus
            else:
                tr_dir[n_tr] = 0 if px > last else 2               # Plus / Minus
            state[_LAST_DIR] = tr_dir[n_tr]
            state[_LAST_PX] = px
            if buy:
                state[_CONS_A] += lots
            else:
                state[_CONS_B] += lots
            n_tr += 1
        state[_EXC] = exc
    return buf[:pos], n_msgs, tr_t[:n_tr], tr_side[:n_tr], tr_lots[:n_tr], tr_px[:n_tr], tr_dir[:n_tr]


@njit(cache=True)
def _regime_path(seed: int, n: int, dt: float, p: MarketParams) -> tuple[np.ndarray, np.ndarray]:
    """Regime per step (0 chop, ±1 breakout direction) and the informed lead on coming breakouts."""
    np.random.seed(seed)
    regime = np.zeros(n, np.int8)
    p_start = 1.0 - math.exp(-dt * p.trend_rate)
    p_end = 1.0 - math.exp(-dt * p.trend_end_rate)
    state = 0
    for i in range(n):
        if state == 0:
            if np.random.random() < p_start:
                state = 1 if np.random.random() < 0.5 else -1
        elif np.random.random() < p_end:
            state = 0
        regime[i] = state
    lead = np.zeros(n, np.float32)
    a = math.exp(-dt / p.lead_tau)
    acc = 0.0
    for i in range(n - 2, -1, -1):
        acc = a * acc + (1.0 - a) * regime[i + 1]
        lead[i] = acc
    return regime, lead


@njit(cache=True)
def _put_hex(buf: np.ndarray, pos: int, n: int) -> int:
    """Write n random lower-case hex digits."""
    for _ in range(n):
        d = np.random.randint(0, 16)
        buf[pos] = 48 + d if d < 10 else 87 + d
        pos += 1
    return pos


@njit(cache=True)
def _format_trades(seed: int, t: np.ndarray, side: np.ndarray, lots: np.ndarray, px: np.ndarray,
                   tdir: np.ndarray, sym_field: np.ndarray, words: np.ndarray, word_len: np.ndarray,
                   tick_dec: int, qty_dec: int, gross_mult: int) -> np.ndarray:
    """Bybit archive CSV rows (without header) for the day's trades; trdMatchID is a random uuid."""
    np.random.seed(seed)
    n = t.shape[0]
    buf = np.empty(160 * n + 16, np.uint8)
    pos = 0
    for j in range(n):
        pos = _put_fixed(buf, pos, t[j], 4)
        pos = _put(buf, pos, sym_field)               # ,SYM,
        w = 0 if side[j] == 1 else 1                  # Buy / Sell
        buf[pos:pos + word_len[w]] = words[w, :word_len[w]]
        pos += word_len[w]
        buf[pos] = 44
        pos = _put_fixed(buf, pos + 1, lots[j], qty_dec)
        buf[pos] = 44
        pos = _put_fixed(buf, pos + 1, px[j], tick_dec)
        buf[pos] = 44
        pos += 1
        w = 2 + tdir[j]                               # PlusTick, ZeroPlusTick, MinusTick, ZeroMinusTick
        buf[pos:pos + word_len[w]] = words[w, :word_len[w]]
        pos += word_len[w]
        buf[pos] = 44
        pos += 1
        for group in (8, 4, 4, 4, 12):
            pos = _put_hex(buf, pos, group)
            buf[pos] = 45
            pos += 1
        buf[pos - 1] = 44
        notional = px[j] * lots[j]
        pos = _put_uint(buf, pos, notional * gross_mult)
        buf[pos] = 44
        pos = _put_fixed(buf, pos + 1, lots[j], qty_dec)
        buf[pos] = 44
        pos = _put_fixed(buf, pos + 1, notional, tick_dec + qty_dec)
        buf[pos] = 44
        buf[pos + 1] = 48
        buf[pos + 2] = 10
        pos += 3
    return buf[:pos]


# ---------------------------------------------------------------- orchestration
def _decimals(step: float, name: str) -> int:
    """Decimal places of a power-of-ten increment (exchange strings are written in whole steps)."""
    d = max(0, round(-math.log10(step)))
    if abs(10.0 ** -d - step) > 1e-12:
        raise ConfigError(f"instrument {name} = {step} must be a power of ten for the simulator")
    return d


def _ascii(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("ascii"), dtype=np.uint8).copy()


def _child_seed(seed: int, *keys: int) -> int:
    """An independent 31-bit seed per (seed, stream, day), so each day is reproducible on its own."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1)[0] & 0x7FFFFFFF)


def _write(path: Path, data: bytes | np.ndarray, header: bytes, gz: bool) -> int:
    """Write a file atomically (temp + rename); return bytes written before compression."""
    tmp = path.with_name(f".{path.name}.tmp")
    opener = (lambda f: gzip_module.open(f, "wb", compresslevel=5)) if gz else (lambda f: open(f, "wb"))
    with opener(tmp) as fh:
        fh.write(header)
        fh.write(memoryview(data))
    tmp.replace(path)
    return len(header) + len(data)


def _clear_previous(folder: Path, symbol: str) -> None:
    """Remove files of an earlier run in this simulator folder so the loader never mixes two runs."""
    stale = list((folder / "Trade").glob(f"{symbol}????-??-??.csv*")) + \
        list((folder / "Orderbook").glob(f"????-??-??_{symbol}_ob*.data*"))
    for path in stale:
        path.unlink()
    if stale:
        log.info("removed %d files of an earlier simulation in %s", len(stale), folder)


def check_run(symbol: str, days: int, alpha: float, book_interval: str | float, levels: int,
              start: str = "2026-01-01") -> tuple[int, dt.date]:
    """A run's settings checked before anything is written or announced: (book step in ms, first day);
    ConfigError naming the first bad one."""
    if not isinstance(days, int) or days < 1:
        raise ConfigError(f"days = {days!r}: expected a whole number >= 1")
    if not 5 <= levels <= 1000:
        raise ConfigError(f"levels = {levels!r}: expected 5..1000 book levels per side")
    if not (alpha >= 0 and math.isfinite(alpha)):
        raise ConfigError(f"alpha = {alpha!r}: expected a finite number >= 0")
    step = parse_duration(book_interval)
    dt_ms = int(round(step * 1000))
    if dt_ms < 10 or abs(dt_ms - step * 1000) > 1e-6 or 86_400_000 % dt_ms:
        raise ConfigError(f"book_interval = {book_interval!r}: expected whole milliseconds >= 10ms "
                          "dividing a day (e.g. 100ms, 1s, 5s)")
    if not symbol.isalnum() or symbol.upper() != symbol:
        raise ConfigError(f"symbol = {symbol!r}: expected upper-case letters/digits")
    try:
        return dt_ms, dt.date.fromisoformat(start)
    except ValueError:
        raise ConfigError(f"start = {start!r}: expected YYYY-MM-DD") from None


def simulate_run(symbol: str = "DEMOUSDT", days: int = 14, seed: int = 7, alpha: float = 1.0,
                 out: str | Path = "data", book_interval: str | float = "1s", levels: int = 200,
                 gzip: bool = False, start: str = "2026-01-01", params: MarketParams = MarketParams(),
                 progress: bool = True) -> SimSummary:
    """Generate `days` UTC days of trades and book into `<out>/<SYM>_Sim`; returns what was written."""
    began = time.perf_counter()
    dt_ms, first_day = check_run(symbol, days, alpha, book_interval, levels, start)
    inst = InstrumentConfig()
    tick_dec = _decimals(inst.tick_size, "tick_size")
    qty_dec = _decimals(inst.qty_step, "qty_step")
    if tick_dec + qty_dec > 8:
        raise ConfigError("tick_size × qty_step must be a multiple of 1e-8 (Bybit grossValue)")

    folder = Path(out) / f"{symbol}_Sim"
    (folder / "Trade").mkdir(parents=True, exist_ok=True)
    (folder / "Orderbook").mkdir(parents=True, exist_ok=True)
    _clear_previous(folder, symbol)
    instrument = {"symbol": symbol, "tickSize": f"{inst.tick_size:.{tick_dec}f}",
                  "qtyStep": f"{inst.qty_step:.{qty_dec}f}", "minOrderQty": f"{inst.min_qty:.{qty_dec}f}",
                  "minNotionalValue": f"{inst.min_notional:g}"}
    (folder / "instrument.json").write_text(json.dumps(instrument, indent=2) + "\n", encoding="utf-8")
    (folder / "simulation.json").write_text(json.dumps(
        {"symbol": symbol, "days": days, "seed": seed, "alpha": alpha, "book_interval_ms": dt_ms,
         "levels": levels, "start": start, "params": params._asdict()}, indent=2) + "\n", encoding="utf-8")

    steps_per_day = 86_400_000 // dt_ms
    dt_s = dt_ms / 1000.0
    regime, lead = _regime_path(_child_seed(seed, 0), steps_per_day * days, dt_s, params)
    rng = np.random.default_rng(_child_seed(seed, 1))
    state = np.zeros(_N_STATE)
    state[_X] = rng.uniform(math.log(150.0), math.log(500.0))   # start price: a few hundred
    state[_ANCHOR] = state[_X]
    state[_SEQ] = float(rng.integers(10**9, 10**10))
    state[_U] = float(rng.integers(10**6, 10**8))     # like a live stream: u=1 would mean a server reset
    book = np.zeros((2, _RING), np.int64)
    wall_until = np.zeros((2, _RING), np.int64)
    seen = np.zeros((2, _RING), np.int64)
    published = np.zeros((2, _RING), np.int64)
    head_snap = _ascii(f'{{"topic":"orderbook.{levels}.{symbol}","type":"snapshot","ts":')
    head_delta = _ascii(f'{{"topic":"orderbook.{levels}.{symbol}","type":"delta","ts":')
    sym_part = _ascii(f',"data":{{"s":"{symbol}","b":[')
    sym_field = _ascii(f",{symbol},")
    names = ["Buy", "Sell", "PlusTick", "ZeroPlusTick", "MinusTick", "ZeroMinusTick"]
    words = np.zeros((len(names), 16), np.uint8)
    word_len = np.array([len(w) for w in names], np.int64)
    for k, w in enumerate(names):
        words[k, :len(w)] = _ascii(w)
    gross_mult = round(10 ** (8 - tick_dec - qty_dec))
    suffix = ".gz" if gzip else ""
    trades = msgs = book_bytes = trade_bytes = 0
    for d in tqdm(range(days), desc=f"simulating {symbol}", unit="day", disable=not progress):
        day = first_day + dt.timedelta(days=d)
        day_ms = int(dt.datetime(day.year, day.month, day.day, tzinfo=dt.timezone.utc).timestamp() * 1000)
        lo, hi = d * steps_per_day, (d + 1) * steps_per_day
        text, n_msgs, t, side, lots, px, tdir = _simulate_day(
            _child_seed(seed, 2, d), steps_per_day, dt_s, dt_ms, day_ms, float(alpha), levels,
            regime[lo:hi], lead[lo:hi], state, book, wall_until, seen, published, params, inst.tick_size,
            1.0 / inst.qty_step, tick_dec, qty_dec, head_snap, head_delta, sym_part)
        csv = _format_trades(_child_seed(seed, 3, d), t, side, lots, px, tdir, sym_field, words, word_len,
                             tick_dec, qty_dec, gross_mult)
        iso = day.isoformat()
        book_bytes += _write(folder / "Orderbook" / f"{iso}_{symbol}_ob{levels}.data{suffix}", text, b"", gzip)
        trade_bytes += _write(folder / "Trade" / f"{symbol}{iso}.csv{suffix}", csv,
                              _TRADE_HEADER.encode("ascii"), gzip)
        trades += len(t)
        msgs += n_msgs
    summary = SimSummary(folder, days, trades, msgs, book_bytes, trade_bytes, time.perf_counter() - began)
    log.info("wrote %d days to %s: %d trades, %d book messages, %.1f MB in %.1f s", days, folder, trades, msgs,
             (book_bytes + trade_bytes) / 1e6, summary.seconds)
    return summary


def simulate(symbol: str = "DEMOUSDT", days: int = 14, seed: int = 7, alpha: float = 1.0,
             out: str | Path = "data", book_interval: str | float = "1s", levels: int = 200,
             gzip: bool = False, start: str = "2026-01-01") -> Path:
    """Write a synthetic market in the collector's layout and return the `<SYM>_Sim` folder."""
    return simulate_run(symbol, days, seed, alpha, out, book_interval, levels, gzip, start).folder


def main(argv: list[str] | None = None) -> int:
    """CLI: generate days of synthetic trades and order book."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--symbol", default="DEMOUSDT", help="instrument symbol")
    parser.add_argument("--days", type=int, default=14, help="UTC days to generate")
    parser.add_argument("--seed", type=int, default=7, help="random seed (same seed, same files)")
    parser.add_argument("--alpha", type=float, default=1.0,
                        help="strength of the planted informed flow (0 = nothing predicts returns)")
    parser.add_argument("--book-interval", default="1s", help="book update cadence (e.g. 100ms, 1s, 5s)")
    parser.add_argument("--levels", type=int, default=200, help="book levels per side (file name obN)")
    parser.add_argument("--out", default="data", help="parent folder of <SYM>_Sim")
    parser.add_argument("--start", default="2026-01-01", help="first UTC day (YYYY-MM-DD)")
    parser.add_argument("--gzip", action="store_true", help="write .csv.gz / .data.gz")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        s = simulate_run(args.symbol, args.days, args.seed, args.alpha, args.out, args.book_interval,
                         args.levels, args.gzip, args.start)
    except ConfigError as exc:
        parser.error(str(exc))
    print(f"{s.folder}: {s.days} days, {s.trades:,} trades ({s.trade_bytes / 1e6:.1f} MB), "
          f"{s.book_messages:,} book messages ({s.book_bytes / 1e6:.1f} MB) in {s.seconds:.1f} s")
    return 0


if __name__ == "__main__":
    import market_sim  # run the importable module: numba's on-disk cache is keyed by module, not __main__
    sys.exit(market_sim.main())
