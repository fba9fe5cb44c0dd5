"""Array-backed L2 order book with exchange sequence rules, top-N statistics and the book-sampling clock.

Both sides are kept as ascending sorted float64 key arrays (bids keyed by price, asks by -price) with sizes
alongside, so the best level is always the last element and the frequent near-touch updates are a binary
search plus a short shift of the few levels above them, all in numba. Prices are the exact doubles of
their decimal strings, so equal strings always meet at the same level.
The message step `on_message` (sequence checks, apply, crossed detection, exchange-time sampling) is the
single place those rules live: the file replay in data_loader.py, the Python API below and the live engine
all call it, so research and live compute identical book statistics.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from numba import njit

log = logging.getLogger(__name__)

# ------------------------------------------------------------------ state layout (int64 array)
NB, NA, LAST_U, VALID, GAPS, RESETS, CROSSED, MESSAGES, LAST_TS, NEXT_SAMPLE = range(10)
SNAPSHOTS, STALE, SKIPPED, TIME_REVERSALS, HAS_PREV, STARTED, INTERVAL, STALE_MS, LEVELS, IS_CROSSED = range(10, 20)
AFTER_SNAP, TOMB_B, TOMB_A, LO_B, LO_A, SHIFT_WORK_B, SHIFT_WORK_A = range(20, 27)
N_STATE = 27

# message modes: RAW applies without sequence checks (the caller sequences, e.g. BinanceSync);
# SEQUENCED applies the archive/WS rules (u consecutive or pu chain, u=1 reset, snapshot resets).
RAW, SEQUENCED = 0, 1

# on_message results
APPLIED, IGNORED, NEED_GROW, NEED_FLUSH = 0, 1, 2, 3

# event codes written to the event buffer (line, code, value)
EV_GAP, EV_RESET, EV_CROSSED, EV_TIME_REVERSAL, EV_STALE = 1, 2, 3, 4, 5
EVENT_NAMES = {EV_GAP: "sequence gap", EV_RESET: "u=1 server reset", EV_CROSSED: "crossed book",
               EV_TIME_REVERSAL: "timestamp went backwards", EV_STALE: "stale/duplicate update id"}

STAT_FIELDS = ("best_bid", "best_ask", "bid_size", "ask_size", "spread", "mid", "micro", "micro_dev",
               "bid_depth", "ask_depth", "imbalance", "bid_slope", "ask_slope", "bid_integrity", "ask_integrity")
N_STATS = len(STAT_FIELDS)
SAMPLE_COLUMNS = ("t_ms",) + STAT_FIELDS + ("ofi",)
N_SAMPLE_COLS = len(SAMPLE_COLUMNS)
DEFAULT_STALE_MS = 60_000
FREE_REACH = 8  # how far an insert looks for a free slot before shifting a run of levels


@dataclass
class BookStats:
    """Top-N statistics of one book state (definitions: original_system.md §2.2); NaN when a side is empty."""
    best_bid: float
    best_ask: float
    bid_size: float
    ask_size: float
    spread: float
    mid: float
    micro: float
    micro_dev: float
    bid_depth: float
    ask_depth: float
    imbalance: float
    bid_slope: float
    ask_slope: float
    bid_integrity: float
    ask_integrity: float


# ------------------------------------------------------------------ numba core
@njit(cache=True)
def _lower_bound(keys: np.ndarray, n: int, key: float) -> int:
    """First index in keys[:n] whose value is >= key (branch-free halving, n may be 0)."""
    if n == 0:
        return 0
    base = 0
    length = n
    while length > 1:
        half = length >> 1
        base = base + half if keys[base + half] < key else base
        length -= half
    return base + (1 if keys[base] < key else 0)


@njit(cache=True)
def _respread(keys: np.ndarray, qty: np.ndarray, st: np.ndarray, ni: int, ti: int, li: int) -> None:
    """Rewrite a side as [level, gap, level, gap, ..., level] centred in its arrays, so later inserts
    anywhere in the book land in a free slot next to them instead of shifting thousands of levels.
    A gap keeps the key of the level below it, so keys stay sorted and a live key is always the first
    slot holding that key."""
    lo, n = st[li], st[ni]
    live = 0
    for i in range(lo, lo + n):
        if qty[i] != 0.0:
            live += 1
    k = np.empty(live)
    v = np.empty(live)
    j = 0
    for i in range(lo, lo + n):
        if qty[i] != 0.0:
            k[j] = keys[i]
            v[j] = qty[i]
            j += 1
    size = 2 * live - 1 if live > 0 else 0
    new = (keys.shape[0] - size) // 2
    for j in range(live):
        keys[new + 2 * j] = k[j]
        qty[new + 2 * j] = v[j]
        if j + 1 < live:
            keys[new + 2 * j + 1] = k[j]
            qty[new + 2 * j + 1] = 0.0
    st[li] = new
    st[ni] = size
    st[ti] = live - 1 if live > 0 else 0
    st[SHIFT_WORK_B + (ni - NB)] = 0


@njit(cache=True)
def _set_level(keys: np.ndarray, qty: np.ndarray, st: np.ndarray, ni: int, ti: int, li: int, key: float,
               q: float) -> None:
    """Set one level's absolute size in keys[lo:lo+n]; 0 deletes (top popped, interior -> free slot)."""
    n = st[ni]
    lo = st[li]
    i = lo + _lower_bound(keys[lo:lo + n], n, key)
    top = lo + n
    if i < top and keys[i] == key:
        if q != 0.0:
            if qty[i] == 0.0:
                st[ti] -= 1
            qty[i] = q
        elif qty[i] != 0.0:
            if i == top - 1:
                n -= 1
                while n > 0 and qty[lo + n - 1] == 0.0:
                    n -= 1
                    st[ti] -= 1
                st[ni] = n
            else:
                qty[i] = 0.0
                st[ti] += 1
                if st[ti] > 64 and st[ti] > 2 * (n - st[ti]):
                    _respread(keys, qty, st, ni, ti, li)
        return
    if q == 0.0:
        return
    # a free slot at or just below the insert point takes the level without moving anything
    if i < top and qty[i] == 0.0:
        keys[i] = key
        qty[i] = q
        st[ti] -= 1
        return
    if i > lo and qty[i - 1] == 0.0:
        keys[i - 1] = key
        qty[i - 1] = q
        st[ti] -= 1
        return
    # else shift toward a nearby free slot, or the shorter run to an end of the region
    for d in range(1, FREE_REACH):
        j = i - 1 - d
        if j >= lo and qty[j] == 0.0:
            keys[j:i - 1] = keys[j + 1:i]
            qty[j:i - 1] = qty[j + 1:i]
            keys[i - 1] = key
            qty[i - 1] = q
            st[ti] -= 1
            return
        k = i + d
        if k < top and qty[k] == 0.0:
            keys[i + 1:k + 1] = keys[i:k]
            qty[i + 1:k + 1] = qty[i:k]
            keys[i] = key
            qty[i] = q
            st[ti] -= 1
            return
    down = i - lo < top - i
    if (down and lo == 0) or (not down and top == keys.shape[0]):
        _respread(keys, qty, st, ni, ti, li)
        _set_level(keys, qty, st, ni, ti, li, key, q)
        return
    if down:
        keys[lo - 1:i - 1] = keys[lo:i]
        qty[lo - 1:i - 1] = qty[lo:i]
        keys[i - 1] = key
        qty[i - 1] = q
        st[li] = lo - 1
        moved = i - lo
    else:
        keys[i + 1:top + 1] = keys[i:top]
        qty[i + 1:top + 1] = qty[i:top]
        keys[i] = key
        qty[i] = q
        moved = top - i
    st[ni] = n + 1
    work = SHIFT_WORK_B + (ni - NB)
    st[work] += moved
    if st[work] > 2 * (n + 64):
        _respread(keys, qty, st, ni, ti, li)


@njit(cache=True)
def _side_depth(keys: np.ndarray, qty: np.ndarray, n: int, levels: int) -> tuple[float, float]:
    """(total size, key of the deepest level) over the best `levels` live levels of one side."""
    depth = 0.0
    deepest = keys[n - 1]
    k = 0
    i = n - 1
    while i >= 0 and k < levels:
        if qty[i] != 0.0:
            depth += qty[i]
            deepest = keys[i]
            k += 1
        i -= 1
    return depth, deepest


@njit(cache=True)
def book_stats(bp: np.ndarray, bq: np.ndarray, nb: int, ap: np.ndarray, aq: np.ndarray, na: int,
               levels: int, out: np.ndarray) -> None:
    """Fill out[0:15] with the BookStats fields over the top `levels` levels (NaN if a side is empty)."""
    out[:N_STATS] = np.nan
    if nb == 0 or na == 0:
        return
    bid = bp[nb - 1]
    ask = -ap[na - 1]
    bsz = bq[nb - 1]
    asz = aq[na - 1]
    bd, deep_bid = _side_depth(bp, bq, nb, levels)
    ad, deep_ask = _side_depth(ap, aq, na, levels)
    mid = 0.5 * (bid + ask)
    micro = (ask * bsz + bid * asz) / (bsz + asz)
    out[0] = bid
    out[1] = ask
    out[2] = bsz
    out[3] = asz
    out[4] = ask - bid
    out[5] = mid
    out[6] = micro
    out[7] = micro - mid
    out[8] = bd
    out[9] = ad
    out[10] = (bd - ad) / (bd + ad)
    out[11] = (bid - deep_bid) / bd
    out[12] = (-deep_ask - ask) / ad
    out[13] = bsz / bd
    out[14] = asz / ad


@njit(cache=True)
def _ofi(prev: np.ndarray, bid: float, bsz: float, ask: float, asz: float) -> float:
    """Cont-Kukanov-Stoikov order-flow imbalance between the previous sample's top and this one."""
    e = 0.0
    if bid >= prev[0]:
        e += bsz
    if bid <= prev[0]:
        e -= prev[1]
    if ask <= prev[2]:
        e -= asz
    if ask >= prev[2]:
        e += prev[3]
    return e


@njit(cache=True)
def _emit_samples(st: np.ndarray, prev: np.ndarray, bp: np.ndarray, bq: np.ndarray, ap: np.ndarray,
                  aq: np.ndarray, until: int, samples: np.ndarray, ns: np.ndarray) -> None:
    """Write one sample per clock tick g < until (book as of g); stale or invalid states give no row."""
    interval = st[INTERVAL]
    if interval <= 0 or st[STARTED] == 0:
        return
    g = st[NEXT_SAMPLE]
    while g < until:
        if g - st[LAST_TS] > st[STALE_MS]:
            g = ((until + interval - 1) // interval) * interval
            st[HAS_PREV] = 0
            break
        ok = st[VALID] == 1 and st[IS_CROSSED] == 0 and st[NB] > 0 and st[NA] > 0
        if ok:
            row = samples[ns[0]]
            row[0] = float(g)
            lb, la = st[LO_B], st[LO_A]
            book_stats(bp[lb:lb + st[NB]], bq[lb:lb + st[NB]], st[NB], ap[la:la + st[NA]], aq[la:la + st[NA]],
                       st[NA], st[LEVELS], row[1:])
            bid, bsz, ask, asz = row[1], row[3], row[2], row[4]
            row[N_SAMPLE_COLS - 1] = _ofi(prev, bid, bsz, ask, asz) if st[HAS_PREV] == 1 else 0.0
            prev[0] = bid
            prev[1] = bsz
            prev[2] = ask
            prev[3] = asz
            st[HAS_PREV] = 1
            ns[0] += 1
        else:
            st[HAS_PREV] = 0
        g += interval
    st[NEXT_SAMPLE] = g


@njit(cache=True)
def _event(events: np.ndarray, ne: np.ndarray, line: int, code: int, value: int) -> None:
    """Record a notable event if the buffer has room (counters are kept regardless)."""
    if ne[0] < events.shape[0]:
        events[ne[0], 0] = line
        events[ne[0], 1] = code
        events[ne[0], 2] = value
        ne[0] += 1


@njit(cache=True)
def on_message(st: np.ndarray, prev: np.ndarray, bp: np.ndarray, bq: np.ndarray, ap: np.ndarray,
               aq: np.ndarray, mode: int, is_snap: bool, ts: int, u: int, pu: int,
               mb_px: np.ndarray, mb_q: np.ndarray, nmb: int, ma_px: np.ndarray, ma_q: np.ndarray, nma: int,
               samples: np.ndarray, ns: np.ndarray, events: np.ndarray, ne: np.ndarray, line: int) -> int:
    """Advance the sampling clock to ts, then sequence-check and apply one book message (prices > 0)."""
    cap = bp.shape[0]
    if 3 * (st[NB] + nmb) > cap or 3 * (st[NA] + nma) > cap:
        return NEED_GROW
    if st[INTERVAL] > 0 and ns[0] + st[STALE_MS] // st[INTERVAL] + 2 > samples.shape[0]:
        return NEED_FLUSH
    if st[STARTED] == 0:
        st[STARTED] = 1
        st[LAST_TS] = ts
        if st[INTERVAL] > 0:
            st[NEXT_SAMPLE] = ((ts + st[INTERVAL] - 1) // st[INTERVAL]) * st[INTERVAL]
    clock = ts
    if ts < st[LAST_TS]:
        st[TIME_REVERSALS] += 1
        _event(events, ne, line, EV_TIME_REVERSAL, ts)
        clock = st[LAST_TS]
    _emit_samples(st, prev, bp, bq, ap, aq, clock, samples, ns)
    st[LAST_TS] = clock
    st[MESSAGES] += 1
    reset = False
    if mode == SEQUENCED:
        if u == 1:
            st[RESETS] += 1
            _event(events, ne, line, EV_RESET, u)
            reset = True
        elif is_snap:
            reset = True
        elif st[VALID] == 0:
            st[SKIPPED] += 1
            return IGNORED
        elif pu >= 0 and st[AFTER_SNAP] == 1:
            # Binance-sourced file: the first diff after a snapshot must bracket its update id (pu < id <= u)
            if u < st[LAST_U]:
                st[STALE] += 1
                return IGNORED
            if pu > st[LAST_U]:
                st[GAPS] += 1
                st[VALID] = 0
                st[HAS_PREV] = 0
                _event(events, ne, line, EV_GAP, u)
                return IGNORED
        elif (pu >= 0 and pu != st[LAST_U]) or (pu < 0 and u != st[LAST_U] + 1):
            if u <= st[LAST_U]:
                st[STALE] += 1
                _event(events, ne, line, EV_STALE, u)
                return IGNORED
            st[GAPS] += 1
            st[VALID] = 0
            st[HAS_PREV] = 0
            _event(events, ne, line, EV_GAP, u)
            return IGNORED
    elif is_snap:
        reset = True
    if reset:
        st[NB] = 0
        st[NA] = 0
        st[TOMB_B] = 0
        st[TOMB_A] = 0
        st[LO_B] = cap // 2
        st[LO_A] = cap // 2
        st[SHIFT_WORK_B] = 0
        st[SHIFT_WORK_A] = 0
        st[HAS_PREV] = 0
        if is_snap:
            st[SNAPSHOTS] += 1
            st[VALID] = 1
            st[AFTER_SNAP] = 1
        else:
            st[VALID] = 0
            st[LAST_U] = u
            return IGNORED
    for i in range(nmb):
        _set_level(bp, bq, st, NB, TOMB_B, LO_B, mb_px[i], mb_q[i])
    for i in range(nma):
        _set_level(ap, aq, st, NA, TOMB_A, LO_A, -ma_px[i], ma_q[i])
    nb = st[NB]
    na = st[NA]
    tb = st[LO_B] + nb - 1
    ta = st[LO_A] + na - 1
    st[LAST_U] = u
    if not is_snap:
        st[AFTER_SNAP] = 0
    crossed = nb > 0 and na > 0 and bp[tb] >= -ap[ta]
    if crossed and st[IS_CROSSED] == 0:
        st[CROSSED] += 1
        _event(events, ne, line, EV_CROSSED, u)
    st[IS_CROSSED] = 1 if crossed else 0
    return APPLIED


@njit(cache=True)
def advance_clock(st: np.ndarray, prev: np.ndarray, bp: np.ndarray, bq: np.ndarray, ap: np.ndarray,
                  aq: np.ndarray, now: int, samples: np.ndarray, ns: np.ndarray) -> None:
    """Emit the samples due before `now` without a message (live bar close)."""
    if now > st[LAST_TS]:
        _emit_samples(st, prev, bp, bq, ap, aq, now, samples, ns)


# ------------------------------------------------------------------ .data / WS line parser (numba)
# Kept in this file with on_message: numba's cache only notices edits to a function's own file.
def _key(text: str) -> int:
    """Pack a key of up to 8 ASCII bytes into an int (how the kernel compares keys)."""
    return int.from_bytes(text.encode(), "little")


K_TYPE, K_TS, K_DATA, K_S, K_B, K_A, K_U, K_PU = (_key(k) for k in ("type", "ts", "data", "s", "b", "a", "u", "pu"))
V_SNAPSHOT, V_DELTA = _key("snapshot"), _key("delta")
_POW10 = np.array([10.0 ** i for i in range(23)])
_MAX_EXACT = 1 << 53
FAST_OK, FAST_REJECT = 0, 1
ST_DONE, ST_SLOW, ST_GROW, ST_FLUSH = 0, 1, 2, 3


@njit(cache=True)
def _ws(buf: np.ndarray, p: int, e: int) -> int:
    """Skip JSON whitespace."""
    while p < e and (buf[p] == 32 or buf[p] == 9 or buf[p] == 13 or buf[p] == 10):
        p += 1
    return p


@njit(cache=True)
def _packed_string(buf: np.ndarray, p: int, e: int) -> tuple[int, int, int, int]:
    """Read a quoted string: (packed first 8 bytes, start, end, next pos) or next pos -1 if unsupported."""
    if p >= e or buf[p] != 34:
        return 0, 0, 0, -1
    s = p + 1
    q = s
    packed = 0
    while q < e and buf[q] != 34:
        if buf[q] == 92:
            return 0, 0, 0, -1
        if q - s < 8:
            packed |= np.int64(buf[q]) << np.int64(8 * (q - s))
        q += 1
    if q >= e:
        return 0, 0, 0, -1
    if q - s > 8:
        packed = -1
    return packed, s, q, q + 1


@njit(cache=True)
def _int(buf: np.ndarray, p: int, e: int) -> tuple[int, int]:
    """Read a plain JSON integer: (value, next pos) or next pos -1."""
    neg = False
    if p < e and buf[p] == 45:
        neg = True
        p += 1
    s = p
    v = 0
    while p < e and 48 <= buf[p] <= 57 and p - s < 18:
        v = v * 10 + (buf[p] - 48)
        p += 1
    if p == s or (p < e and (48 <= buf[p] <= 57 or buf[p] == 46 or buf[p] == 101 or buf[p] == 69)):
        return 0, -1
    return (-v if neg else v), p


@njit(cache=True)
def _decimal(buf: np.ndarray, p: int, e: int) -> tuple[float, int]:
    """Read a quoted plain decimal like "1.9531" exactly (m / 10^k, both exact doubles); next pos -1 if not."""
    if p >= e or buf[p] != 34:
        return 0.0, -1
    p += 1
    s = p
    m = 0
    dot = -1
    while p < e:
        d = np.int64(buf[p]) - 48
        if 0 <= d <= 9:
            m = m * 10 + d
        elif d == -2 and dot < 0:
            dot = p
        else:
            break
        p += 1
    if p >= e or buf[p] != 34:
        return 0.0, -1
    digits = p - s - (1 if dot >= 0 else 0)
    k = p - dot - 1 if dot >= 0 else 0
    if digits == 0 or digits > 18 or m >= _MAX_EXACT or k > 22 or (dot >= 0 and k == 0):
        return 0.0, -1
    return m / _POW10[k], p + 1


@njit(cache=True)
def _skip_value(buf: np.ndarray, p: int, e: int) -> int:
    """Skip any JSON value; returns the next position or -1."""
    if p >= e:
        return -1
    c = buf[p]
    if c == 34:
        p += 1
        while p < e and buf[p] != 34:
            if buf[p] == 92:
                p += 1
            p += 1
        return p + 1 if p < e else -1
    if c == 123 or c == 91:
        depth = 0
        while p < e:
            c = buf[p]
            if c == 34:
                p = _skip_value(buf, p, e)
                if p < 0:
                    return -1
                continue
            if c == 123 or c == 91:
                depth += 1
            elif c == 125 or c == 93:
                depth -= 1
                if depth == 0:
                    return p + 1
            p += 1
        return -1
    s = p
    while p < e and buf[p] != 44 and buf[p] != 125 and buf[p] != 93 and buf[p] != 32:
        p += 1
    return p if p > s else -1


@njit(cache=True)
def _parse_levels(buf: np.ndarray, p: int, e: int, px: np.ndarray, qty: np.ndarray) -> tuple[int, int]:
    """Read [["p","q"],...] into px/qty: (count, next pos); next pos -1 if malformed or too many."""
    if p >= e or buf[p] != 91:
        return 0, -1
    p = _ws(buf, p + 1, e)
    n = 0
    if p < e and buf[p] == 93:
        return 0, p + 1
    while p < e:
        if buf[p] != 91 or n >= px.shape[0]:
            return 0, -1
        price, p = _decimal(buf, _ws(buf, p + 1, e), e)
        if p < 0 or price <= 0.0:
            return 0, -1
        p = _ws(buf, p, e)
        if p >= e or buf[p] != 44:
            return 0, -1
        q, p = _decimal(buf, _ws(buf, p + 1, e), e)
        if p < 0:
            return 0, -1
        p = _ws(buf, p, e)
        if p >= e or buf[p] != 93:
            return 0, -1
        px[n] = price
        qty[n] = q
        n += 1
        p = _ws(buf, p + 1, e)
        if p < e and buf[p] == 44:
            p = _ws(buf, p + 1, e)
        elif p < e and buf[p] == 93:
            return n, p + 1
        else:
            return 0, -1
    return 0, -1


@njit(cache=True)
def _parse_line(buf: np.ndarray, s: int, e: int, sym: np.ndarray, hdr: np.ndarray, bpx: np.ndarray,
                bq: np.ndarray, apx: np.ndarray, aq: np.ndarray) -> int:
    """Parse one .data line into hdr=[is_snap, ts, u, pu, nb, na] and the level arrays; FAST_REJECT if unsure."""
    hdr[0] = -1
    hdr[1] = -1
    hdr[2] = -1
    hdr[3] = -1
    hdr[4] = 0
    hdr[5] = 0
    have_sym = sym.shape[0] == 0
    p = _ws(buf, s, e)
    if p >= e or buf[p] != 123:
        return FAST_REJECT
    p = _ws(buf, p + 1, e)
    depth = 0
    while p < e:
        key, ks, ke, p = _packed_string(buf, p, e)
        if p < 0:
            return FAST_REJECT
        p = _ws(buf, p, e)
        if p >= e or buf[p] != 58:
            return FAST_REJECT
        p = _ws(buf, p + 1, e)
        if depth == 0 and key == K_TYPE:
            val, vs, ve, p = _packed_string(buf, p, e)
            if p < 0:
                return FAST_REJECT
            if val == V_SNAPSHOT:
                hdr[0] = 1
            elif val == V_DELTA:
                hdr[0] = 0
            else:
                return FAST_REJECT
        elif depth == 0 and key == K_TS:
            hdr[1], p = _int(buf, p, e)
        elif depth == 0 and key == K_DATA:
            if p >= e or buf[p] != 123:
                return FAST_REJECT
            depth = 1
            p = _ws(buf, p + 1, e)
            continue
        elif depth == 1 and key == K_S:
            val, vs, ve, p = _packed_string(buf, p, e)
            if p < 0 or ve - vs != sym.shape[0] and sym.shape[0] > 0:
                return FAST_REJECT
            for i in range(sym.shape[0]):
                if buf[vs + i] != sym[i]:
                    return FAST_REJECT
            have_sym = True
        elif depth == 1 and key == K_B:
            n, p = _parse_levels(buf, p, e, bpx, bq)
            hdr[4] = n
        elif depth == 1 and key == K_A:
            n, p = _parse_levels(buf, p, e, apx, aq)
            hdr[5] = n
        elif depth == 1 and key == K_U:
            hdr[2], p = _int(buf, p, e)
        elif depth == 1 and key == K_PU:
            hdr[3], p = _int(buf, p, e)
            if hdr[3] < 0:
                return FAST_REJECT
        else:
            p = _skip_value(buf, p, e)
        if p < 0:
            return FAST_REJECT
        p = _ws(buf, p, e)
        while p < e and buf[p] == 125 and depth > 0:
            depth -= 1
            p = _ws(buf, p + 1, e)
        if p < e and buf[p] == 44:
            p = _ws(buf, p + 1, e)
        elif p < e and buf[p] == 125 and depth == 0:
            p = _ws(buf, p + 1, e)
            if p != e:
                return FAST_REJECT
            break
        else:
            return FAST_REJECT
    if p != e or hdr[0] < 0 or hdr[1] < 0 or hdr[2] < 1 or not have_sym:
        return FAST_REJECT
    return FAST_OK


@njit(cache=True)
def replay_chunk(buf: np.ndarray, pos: int, final: bool, line: int, ts_lo: int, ts_hi: int, sym: np.ndarray,
                 hdr: np.ndarray,
                  st: np.ndarray, prev: np.ndarray, bp: np.ndarray, bq: np.ndarray, ap: np.ndarray,
                  aq: np.ndarray, sbp: np.ndarray, sbq: np.ndarray, sap: np.ndarray, saq: np.ndarray,
                  samples: np.ndarray, ns: np.ndarray, events: np.ndarray, ne: np.ndarray,
                  tob: np.ndarray, nt: np.ndarray) -> tuple[int, int, int]:
    """Parse, sequence, apply and sample every complete line from pos: (pos, status, next line number)."""
    end = buf.shape[0]
    while pos < end:
        nl = pos
        while nl < end and buf[nl] != 10:
            nl += 1
        if nl == end and not final:
            return pos, ST_DONE, line
        e = nl
        while e > pos and (buf[e - 1] == 13 or buf[e - 1] == 32 or buf[e - 1] == 9):
            e -= 1
        if e == pos:
            pos = nl + 1
            line += 1
            continue
        if tob.shape[0] > 0 and nt[0] >= tob.shape[0]:
            return pos, ST_FLUSH, line
        if _parse_line(buf, pos, e, sym, hdr, sbp, sbq, sap, saq) != FAST_OK or not ts_lo <= hdr[1] < ts_hi:
            return pos, ST_SLOW, line
        res = on_message(st, prev, bp, bq, ap, aq, SEQUENCED, hdr[0] == 1, hdr[1], hdr[2], hdr[3],
                            sbp, sbq, hdr[4], sap, saq, hdr[5], samples, ns, events, ne, line)
        if res == NEED_GROW:
            return pos, ST_GROW, line
        if res == NEED_FLUSH:
            return pos, ST_FLUSH, line
        if res == APPLIED and tob.shape[0] > 0:
            row = tob[nt[0]]
            row[0] = hdr[1]
            row[1] = hdr[2]
            tb, ta = st[LO_B] + st[NB] - 1, st[LO_A] + st[NA] - 1
            row[2] = bp[tb] if st[NB] > 0 else np.nan
            row[3] = bq[tb] if st[NB] > 0 else np.nan
            row[4] = -ap[ta] if st[NA] > 0 else np.nan
            row[5] = aq[ta] if st[NA] > 0 else np.nan
            nt[0] += 1
        pos = nl + 1
        line += 1
    return pos, ST_DONE, line


@njit(cache=True)
def levels_valid(levels: np.ndarray) -> bool:
    """Whether every [price, size] row of a float (n, 2) array has a finite price > 0 and a finite size >= 0
    (NaN fails every comparison). One compiled pass: a message's few levels cost a microsecond, not the
    dozen that numpy's min and max reductions take on so small an array."""
    for i in range(levels.shape[0]):
        price, size = levels[i, 0], levels[i, 1]
        if not (0.0 < price < np.inf and 0.0 <= size < np.inf):
            return False
    return True


# ------------------------------------------------------------------ Python API
def _levels(levels: Any) -> np.ndarray:
    """[[price, qty], ...] (strings or numbers) -> float64 array (n, 2); rejects non-positive prices."""
    arr = np.asarray(levels, dtype=np.float64).reshape(-1, 2) if len(levels) else np.empty((0, 2))
    if not levels_valid(arr):
        raise ValueError("book levels need finite prices > 0 and sizes >= 0")
    return arr


class OrderBook:
    """An L2 book (numba arrays) with sequence counters and an optional exchange-time sampling clock."""

    def __init__(self, capacity: int = 4096, sample_interval_ms: int = 0, levels: int = 50,
                 stale_ms: int = DEFAULT_STALE_MS, sample_buffer: int = 65536) -> None:
        self.bp = np.zeros(capacity)
        self.bq = np.zeros(capacity)
        self.ap = np.zeros(capacity)
        self.aq = np.zeros(capacity)
        self.st = np.zeros(N_STATE, dtype=np.int64)
        self.st[INTERVAL] = sample_interval_ms
        self.st[STALE_MS] = stale_ms
        self.st[LEVELS] = levels
        self.st[LO_B] = self.st[LO_A] = capacity // 2
        self.prev = np.zeros(4)
        self.samples = np.zeros((max(sample_buffer, stale_ms // max(sample_interval_ms, 1) + 16),
                                 N_SAMPLE_COLS))
        self.ns = np.zeros(1, dtype=np.int64)
        self.events = np.zeros((256, 3), dtype=np.int64)
        self.ne = np.zeros(1, dtype=np.int64)
        self._pending: list[np.ndarray] = []

    # -------------------------------------------------------------- capacity and buffers
    def grow(self, need: int) -> None:
        """Enlarge the level arrays to at least `need` slots per side, re-centring each side's levels."""
        cap = self.bp.shape[0]
        while cap < need:
            cap *= 2
        for keys, qty, lo_i, n_i in (("bp", "bq", LO_B, NB), ("ap", "aq", LO_A, NA)):
            lo, n = int(self.st[lo_i]), int(self.st[n_i])
            new_lo = (cap - n) // 2
            for name in (keys, qty):
                new = np.zeros(cap)
                new[new_lo:new_lo + n] = getattr(self, name)[lo:lo + n]
                setattr(self, name, new)
            self.st[lo_i] = new_lo

    def flush_samples(self) -> None:
        """Move the filled sample rows out of the fixed buffer."""
        if self.ns[0]:
            self._pending.append(self.samples[:self.ns[0]].copy())
            self.ns[0] = 0

    def pending_samples(self) -> int:
        """Samples emitted and not yet drained."""
        return int(self.ns[0]) + sum(len(x) for x in self._pending)

    def drain_samples(self) -> np.ndarray:
        """All samples emitted since the last drain, shape (n, len(SAMPLE_COLUMNS))."""
        self.flush_samples()
        out = np.concatenate(self._pending) if self._pending else np.empty((0, N_SAMPLE_COLS))
        self._pending = []
        return out

    def drain_events(self) -> list[tuple[int, int, int]]:
        """Notable events (line, code, value) recorded since the last drain."""
        out = [tuple(int(x) for x in row) for row in self.events[:self.ne[0]]]
        self.ne[0] = 0
        return out

    # -------------------------------------------------------------- applying messages
    def apply_arrays(self, mode: int, is_snap: bool, ts: int, u: int, pu: int, bids: np.ndarray,
                     asks: np.ndarray, line: int = 0) -> int:
        """Run one message through the shared rules (growing buffers as needed); returns APPLIED/IGNORED.
        The level columns go in contiguous: one compiled kernel whatever the message's number of levels (a
        strided column of 2+ levels and a one-level column are different numba types)."""
        bp, bq, ap, aq = (np.ascontiguousarray(side[:, i]) for side in (bids, asks) for i in (0, 1))
        while True:
            res = on_message(self.st, self.prev, self.bp, self.bq, self.ap, self.aq, mode, is_snap, int(ts),
                             int(u), int(pu), bp, bq, bids.shape[0], ap, aq, asks.shape[0], self.samples, self.ns,
                             self.events, self.ne, int(line))
            if res == NEED_GROW:
                self.grow(3 * (max(self.st[NB], self.st[NA]) + max(bids.shape[0], asks.shape[0]) + 1))
            elif res == NEED_FLUSH:
                self.flush_samples()
            else:
                return res

    def apply_snapshot(self, bids: Any, asks: Any, u: int, seq: int = 0, ts: int = 0) -> None:
        """Replace the book with a full snapshot; the book becomes valid."""
        self.apply_arrays(RAW, True, ts or int(self.st[LAST_TS]), u, -1, _levels(bids), _levels(asks))

    def apply_delta(self, bids: Any, asks: Any, u: int, seq: int = 0, ts: int = 0) -> None:
        """Apply absolute level sizes (0 deletes) with no sequence check (the caller sequences)."""
        self.apply_arrays(RAW, False, ts or int(self.st[LAST_TS]), u, -1, _levels(bids), _levels(asks))

    def apply_bybit(self, msg: dict, levels: tuple[np.ndarray, np.ndarray] | None = None) -> bool:
        """Apply a Bybit WS/archive message (u consecutive, u=1 reset, snapshot resets); True if applied.
        levels: data.b and data.a already parsed into float (n, 2) arrays (data_loader's validated lines), so
        they are not parsed again."""
        data = msg["data"]
        is_snap = msg["type"] == "snapshot"
        if not is_snap and msg["type"] != "delta":
            raise ValueError(f"unknown book message type {msg['type']!r}")
        pu = int(data["pu"]) if "pu" in data else int(msg.get("pu", -1))
        bids, asks = levels or (_levels(data.get("b", [])), _levels(data.get("a", [])))
        res = self.apply_arrays(SEQUENCED, is_snap, int(msg.get("ts", 0) or self.st[LAST_TS]), int(data["u"]),
                                pu, bids, asks)
        return res == APPLIED

    def invalidate(self) -> None:
        """Mark the book unusable after a sequence gap found by the caller; counted as a gap."""
        self.st[VALID] = 0
        self.st[GAPS] += 1
        self.st[HAS_PREV] = 0

    def advance(self, now_ms: int) -> None:
        """Emit samples due before exchange time now_ms (call at bar close when no message arrived)."""
        if self.st[INTERVAL] > 0 and self.ns[0] + self.st[STALE_MS] // self.st[INTERVAL] + 2 > self.samples.shape[0]:
            self.flush_samples()
        advance_clock(self.st, self.prev, self.bp, self.bq, self.ap, self.aq, int(now_ms), self.samples, self.ns)

    # -------------------------------------------------------------- reading
    @property
    def valid(self) -> bool:
        return bool(self.st[VALID]) and not self.st[IS_CROSSED]

    @property
    def gaps(self) -> int:
        return int(self.st[GAPS])

    @property
    def resets(self) -> int:
        return int(self.st[RESETS])

    @property
    def crossed(self) -> int:
        return int(self.st[CROSSED])

    @property
    def messages(self) -> int:
        return int(self.st[MESSAGES])

    @property
    def last_u(self) -> int:
        return int(self.st[LAST_U])

    def counters(self) -> dict[str, int]:
        """All sequence counters, for integrity reports."""
        names = {"messages": MESSAGES, "snapshots": SNAPSHOTS, "gaps": GAPS, "resets": RESETS,
                 "crossed": CROSSED, "stale": STALE, "skipped_invalid": SKIPPED, "time_reversals": TIME_REVERSALS}
        return {k: int(self.st[i]) for k, i in names.items()}

    def _side(self, bids: bool) -> tuple[np.ndarray, np.ndarray]:
        """(keys, sizes) views of one side, best level last (tombstones included)."""
        lo, n = (int(self.st[LO_B]), int(self.st[NB])) if bids else (int(self.st[LO_A]), int(self.st[NA]))
        keys, qty = (self.bp, self.bq) if bids else (self.ap, self.aq)
        return keys[lo:lo + n], qty[lo:lo + n]

    def best_bid(self) -> float:
        keys, _ = self._side(True)
        return float(keys[-1]) if len(keys) else float("nan")

    def best_ask(self) -> float:
        keys, _ = self._side(False)
        return float(-keys[-1]) if len(keys) else float("nan")

    def top(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(bid_px, bid_qty, ask_px, ask_qty) of the best n levels, best first."""
        bk, bq = self._side(True)
        ak, aq = self._side(False)
        bk, bq, ak, aq = bk[::-1], bq[::-1], ak[::-1], aq[::-1]
        bl, al = bq != 0, aq != 0
        return bk[bl][:n], bq[bl][:n], -ak[al][:n], aq[al][:n]

    def stats(self, n_levels: int) -> BookStats:
        """BookStats over the top n_levels."""
        out = np.empty(N_STATS)
        bk, bq = self._side(True)
        ak, aq = self._side(False)
        book_stats(bk, bq, len(bk), ak, aq, len(ak), n_levels, out)
        return BookStats(*(float(x) for x in out))


class BinanceSync:
    """The official Binance USD-M local-book procedure (buffer, REST snapshot, U/u/pu checks) over a book."""

    def __init__(self, book: OrderBook, max_buffer: int = 200_000) -> None:
        self.book = book
        self.max_buffer = max_buffer
        self.buffer: list[dict] = []
        self.last_update_id = 0
        self.needs_snapshot = True
        self._first_pending = True
        self._prev_u = 0

    def on_diff(self, event: dict) -> str:
        """Handle one depth event: 'buffered', 'stale', 'applied' or 'gap' (fetch a new snapshot)."""
        if self.needs_snapshot:
            self.buffer.append(event)
            if len(self.buffer) > self.max_buffer:
                self.buffer.pop(0)
            return "buffered"
        return self._apply(event)

    def _apply(self, event: dict) -> str:
        """Sequence one event against the snapshot / previous event and apply it."""
        U, u = int(event["U"]), int(event["u"])
        if self._first_pending:
            if u < self.last_update_id:
                return "stale"
            if U > self.last_update_id:
                return self._gap(event)
            self._first_pending = False
        elif int(event["pu"]) != self._prev_u:
            return self._gap(event)
        self.book.apply_delta(event.get("b", []), event.get("a", []), u, U, int(event.get("T", 0)))
        self._prev_u = u
        return "applied"

    def _gap(self, event: dict) -> str:
        """Invalidate the book and keep this event for the next snapshot."""
        self.book.invalidate()
        self.needs_snapshot = True
        self.buffer = [event]
        return "gap"

    def on_snapshot(self, rest: dict) -> list[dict]:
        """Apply a REST depth snapshot, then the buffered events after it; returns the events applied."""
        self.last_update_id = int(rest["lastUpdateId"])
        self.book.apply_snapshot(rest["bids"], rest["asks"], self.last_update_id, self.last_update_id,
                                 int(rest.get("T", 0)))
        self.needs_snapshot = False
        self._first_pending = True
        applied: list[dict] = []
        pending, self.buffer = self.buffer, []
        for i, event in enumerate(pending):
            res = self._apply(event)
            if res == "applied":
                applied.append(event)
            elif res == "gap":
                self.buffer = [event] + pending[i + 1:]
                log.warning("Binance snapshot lastUpdateId=%d does not bracket the buffered stream "
                            "(event U=%s u=%s): a newer snapshot is needed", self.last_update_id,
                            event["U"], event["u"])
                break
        return applied


# ------------------------------------------------------------------ per-bar aggregation (research and live)
_MEAN_COLS = {"ob_spread_mean": "spread", "ob_micro_dev_mean": "micro_dev", "ob_imbalance_mean": "imbalance",
              "ob_bid_depth_mean": "bid_depth", "ob_ask_depth_mean": "ask_depth", "ob_bid_slope_mean": "bid_slope",
              "ob_ask_slope_mean": "ask_slope", "ob_bid_integrity_mean": "bid_integrity",
              "ob_ask_integrity_mean": "ask_integrity"}
_LAST_COLS = {"ob_micro_dev_last": "micro_dev", "ob_imbalance_last": "imbalance", "ob_mid_last": "mid"}
_NO_BAR_LIMIT = 2 ** 62
BOOK_BAR_COLUMNS = ["ob_spread_mean", "ob_micro_dev_mean", "ob_micro_dev_std", "ob_micro_dev_last",
                    "ob_imbalance_mean", "ob_imbalance_last", "ob_bid_depth_mean", "ob_ask_depth_mean",
                    "ob_bid_slope_mean", "ob_ask_slope_mean", "ob_bid_integrity_mean", "ob_ask_integrity_mean",
                    "ob_mid_last", "ob_ofi_sum", "ob_samples"]


_SUM_SRC = list(dict.fromkeys(list(_MEAN_COLS.values()) + ["micro_dev_sq", "ofi"]))
_LAST_SRC = ["t_ms"] + list(dict.fromkeys(_LAST_COLS.values()))
_SUM_IDX = np.array([SAMPLE_COLUMNS.index(c) if c != "micro_dev_sq" else -1 for c in _SUM_SRC], dtype=np.int64)
_LAST_IDX = np.array([SAMPLE_COLUMNS.index(c) for c in _LAST_SRC], dtype=np.int64)
_MICRO_DEV = SAMPLE_COLUMNS.index("micro_dev")


@njit(cache=True)
def _reduce_bars(samples: np.ndarray, label: np.ndarray, k: int, sum_idx: np.ndarray, last_idx: np.ndarray,
                 micro_dev: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per group 0..k-1 (`label` of each sample row): NaN-skipping sums (column -1: micro_dev squared), row
    counts, and the last non-NaN value of each `last_idx` column. The sums are pandas' groupby-sum algorithm
    (Kahan compensation in row order, +-inf kept: pandas/_libs/groupby.pyx group_sum), so they equal
    `DataFrame.groupby().sum()` bit for bit; `last` equals `groupby().last()`."""
    m = len(sum_idx)
    sums, comp = np.zeros((k, m)), np.zeros((k, m))
    counts = np.zeros(k, dtype=np.int64)
    last = np.full((k, len(last_idx)), np.nan)
    for i in range(len(samples)):
        g = label[i]
        counts[g] += 1
        for j in range(m):
            c = sum_idx[j]
            val = samples[i, micro_dev] ** 2 if c < 0 else samples[i, c]
            if val != val:
                continue
            y = val - comp[g, j]
            t = sums[g, j] + y
            comp[g, j] = t - sums[g, j] - y
            if comp[g, j] != comp[g, j]:
                comp[g, j] = 0.0
            sums[g, j] = t
        for j in range(len(last_idx)):
            val = samples[i, last_idx[j]]
            if val == val:
                last[g, j] = val
    return sums, counts, last


def partial_book_bars(samples: np.ndarray, bar_ms: int) -> pd.DataFrame:
    """Per-bar sums, sums of squares, counts and last values of samples (mergeable across chunks)."""
    samples = np.ascontiguousarray(samples, dtype=np.float64).reshape(-1, N_SAMPLE_COLS)
    keys, label = np.unique((samples[:, 0].astype(np.int64) // bar_ms) * bar_ms, return_inverse=True)
    sums, counts, last = _reduce_bars(samples, label.astype(np.int64), len(keys), _SUM_IDX, _LAST_IDX, _MICRO_DEV)
    cols = {f"sum_{c}": sums[:, j] for j, c in enumerate(_SUM_SRC)}
    cols["n"] = counts
    cols.update({f"last_{c}": last[:, j] for j, c in enumerate(_LAST_SRC)})
    return pd.DataFrame(cols, index=pd.Index(keys, name="bar"), copy=False)   # fresh arrays: no copy


class BookBarSums:
    """Book samples held until their bar is complete, then reduced once by `partial_book_bars`.

    Float sums depend on how samples are chunked; reducing each bar in one pass over all its samples, in
    stream (time) order, makes the ob_* columns identical bit for bit however the stream was batched
    (research file chunks, live drains at bar closes). samples: rows of SAMPLE_COLUMNS, t_ms ascending."""

    def __init__(self, bar_ms: int) -> None:
        self.bar_ms = bar_ms
        self.parts: list[pd.DataFrame] = []
        self._held = np.empty((0, N_SAMPLE_COLS))

    def add(self, samples: np.ndarray, complete_before_ms: int | None = None) -> None:
        """Hold samples; reduce the bars opening before complete_before_ms (default: the last sample's bar,
        the only one more samples may still reach)."""
        held = np.concatenate([self._held, samples]) if len(self._held) else samples
        if not len(held):
            return
        if complete_before_ms is None:
            complete_before_ms = int(held[-1, 0]) // self.bar_ms * self.bar_ms
        done = held[:, 0] < complete_before_ms
        if done.any():
            self.parts.append(partial_book_bars(held[done], self.bar_ms))
        self._held = held[~done]

    def take(self, complete_before_ms: int | None = None) -> list[pd.DataFrame]:
        """The reduced parts so far (all held samples first when complete_before_ms is None), cleared."""
        self.add(np.empty((0, N_SAMPLE_COLS)), _NO_BAR_LIMIT if complete_before_ms is None else complete_before_ms)
        out, self.parts = self.parts, []
        return out


def merge_partial_book_bars(parts: list[pd.DataFrame]) -> pd.DataFrame:
    """Combine partial per-bar frames from several chunks into one partial frame (one part with strictly
    increasing bars is already combined: `BookBarSums` reduces each bar once)."""
    if not parts:
        return pd.DataFrame()
    if len(parts) == 1 and parts[0].index.is_monotonic_increasing and parts[0].index.is_unique:
        return parts[0]
    frame = pd.concat(parts).sort_values("last_t_ms", kind="stable")
    grouped = frame.groupby(level=0, sort=True)
    sum_cols = [c for c in frame.columns if c.startswith("sum_")] + ["n"]
    out = grouped[sum_cols].sum()
    return out.join(grouped[[c for c in frame.columns if c.startswith("last_")]].last())


def float_columns(frame: pd.DataFrame) -> dict[str, np.ndarray]:
    """Column name -> float64 values, from one 2-D conversion: a lookup per column costs pandas ~20 µs, which a
    one-bar live close would pay dozens of times. Integer columns come back exact below 2**53."""
    return dict(zip(frame.columns, frame.to_numpy(dtype=np.float64).T))


def finalize_book_bars(partial: pd.DataFrame) -> pd.DataFrame:
    """Turn merged partial sums into the ob_* bar columns (population std; index = bar open in ms)."""
    if partial.empty:
        return pd.DataFrame(columns=BOOK_BAR_COLUMNS, dtype=float)
    cols = float_columns(partial)
    n = cols["n"]
    out = {col: cols[f"sum_{src}"] / n for col, src in _MEAN_COLS.items()}
    var = cols["sum_micro_dev_sq"] / n - out["ob_micro_dev_mean"] ** 2
    out["ob_micro_dev_std"] = np.sqrt(np.clip(var, 0.0, None))
    out.update({col: cols[f"last_{src}"] for col, src in _LAST_COLS.items()})
    out["ob_ofi_sum"] = cols["sum_ofi"]
    out["ob_samples"] = n.astype(np.int64)
    return pd.DataFrame({c: out[c] for c in BOOK_BAR_COLUMNS}, index=partial.index, copy=False)


def aggregate_book_samples(samples: np.ndarray, bar_seconds: int) -> pd.DataFrame:
    """ob_* columns per bar from raw samples: the one aggregation rule used by research and live."""
    if len(samples) == 0:
        return finalize_book_bars(pd.DataFrame())
    return finalize_book_bars(partial_book_bars(samples, bar_seconds * 1000))


def load_kernels(levels: int, bar_ms: int) -> None:
    """Run the compiled kernels of the book path once on a two-level book: snapshot and delta, the sampling
    clock, top of book, stats and the bar reduction. They load from numba's on-disk cache, or are compiled on
    the first run of a fresh checkout (about 20 s on 2 cores). The live engine calls this before its streams
    start: a first use on the stream thread stops every message queued behind it (a subscription ack among
    them) for that long."""
    book = OrderBook(capacity=16, sample_interval_ms=1000, levels=levels)
    for kind, u, ts in (("snapshot", 1, 500), ("delta", 2, 1500)):
        book.apply_bybit({"type": kind, "ts": ts, "data": {"b": [["1.0", "1"]], "a": [["1.1", "1"]], "u": u}})
    book.advance(bar_ms)
    book.flush_samples()
    partial_book_bars(book.drain_samples(), bar_ms)
    book.top(1 << 62)
    book.stats(levels)
