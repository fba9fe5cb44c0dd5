"""Plain-Python reference for the execution labels, written from the spec independently of labels.py.

The limit price is computed in real prices (rounded to the tick away from the market, like
strategy.limit_price); the order's life is then followed as a long on mirrored prices (p -> -p) for
shorts, and the fee check uses real prices again. Used by tests/test_labels.py (exact agreement) and
benchmarks/bench_labels.py (the speed baseline).
"""
from __future__ import annotations

import math

from reference_sim import on_grid


def _real_limit(close, atr, side, offset_atr, tick):
    raw = close - side * offset_atr * atr
    if tick <= 0:
        return raw
    return on_grid(raw, tick, math.floor if side == 1 else math.ceil)


def reference_labels(open_, high, low, close, atr, side, offset_atr, tp_atr, sl_atr,
                     time_limit_bars, max_holding_bars, maker_fee, fill_rule, tick_size=0.0):
    """Lists (labels, t1) computed bar by bar in plain Python."""
    touch = fill_rule == "touch"
    o_r, h_r, l_r, c_r, a_list = (list(map(float, x)) for x in (open_, high, low, close, atr))
    if side == 1:
        o, hi, lo = o_r, h_r, l_r
    else:
        o, hi, lo = [-x for x in o_r], [-x for x in l_r], [-x for x in h_r]
    n = len(c_r)

    labels, ends = [], []
    for t in range(n):
        a = a_list[t]
        if t == n - 1 or not (math.isfinite(a) and a > 0 and math.isfinite(c_r[t])):
            labels.append(-1)
            ends.append(-1)
            continue
        limit = _real_limit(c_r[t], a, side, offset_atr, tick_size)
        take, stop = limit + side * tp_atr * a, limit - side * sl_atr * a
        if tick_size > 0:                       # on the grid: TP away from the fill, SL towards it
            way = math.ceil if side == 1 else math.floor
            take, stop = on_grid(take, tick_size, way), on_grid(stop, tick_size, way)
        limit, take, stop = side * limit, side * take, side * stop
        if limit >= o[t + 1]:  # PostOnly would cross at placement: rejected
            labels.append(0)
            ends.append(t + 1)
            continue
        state, fill_bar = "resting", -1
        result, decided = -1, -1
        j = t
        while True:
            j += 1
            if state == "resting":
                if j > t + time_limit_bars:
                    result, decided = 0, t + time_limit_bars
                    break
                if j >= n:
                    break
                if lo[j] < limit or (touch and lo[j] == limit):
                    state, fill_bar = "open", j
                    if lo[j] <= stop:
                        result, decided = 0, j
                        break
                continue
            if j > fill_bar + max_holding_bars:
                result, decided = 0, fill_bar + max_holding_bars
                break
            if j >= n:
                break
            if o[j] <= stop:
                result, decided = 0, j
                break
            opens_beyond_take = o[j] > take or (touch and o[j] == take)
            reaches_take = hi[j] > take or (touch and hi[j] == take)
            if opens_beyond_take or (lo[j] > stop and reaches_take):
                real_entry, real_take = side * limit, side * take
                pnl = side * (real_take - real_entry) - maker_fee * (real_take + real_entry)
                result, decided = (1 if pnl > 0 else 0), j
                break
            if lo[j] <= stop:
                result, decided = 0, j
                break
        labels.append(result)
        ends.append(decided)
    return labels, ends
