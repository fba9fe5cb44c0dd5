"""Plain-Python reference for the execution labels, written from the spec independently of labels.py.

Shorts are handled by mirroring prices (p -> -p turns a short into a long); fees use the real prices.
Used by tests/test_labels.py (exact agreement) and benchmarks/bench_labels.py (speed baseline).
"""
from __future__ import annotations

import math


def reference_labels(open_, high, low, close, atr, side, offset_atr, tp_atr, sl_atr,
                     time_limit_bars, max_holding_bars, maker_fee, fill_rule):
    """Lists (labels, t1) computed bar by bar in plain Python."""
    touch = fill_rule == "touch"
    sign = 1.0 if side == 1 else -1.0
    if side == 1:
        o, hi, lo, c = (list(map(float, x)) for x in (open_, high, low, close))
    else:
        o = [-x for x in open_]
        hi = [-x for x in low]
        lo = [-x for x in high]
        c = [-x for x in close]
    a_list = list(map(float, atr))
    n = len(c)
    labels, ends = [], []
    for t in range(n):
        a = a_list[t]
        if math.isnan(a) or math.isinf(a) or a <= 0 or math.isnan(c[t]) or math.isinf(c[t]):
            labels.append(-1)
            ends.append(-1)
            continue
        limit = c[t] - offset_atr * a
        state, entry, fill_bar = "resting", 0.0, -1
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
                    entry = o[j] if o[j] < limit else limit
                    stop = entry - sl_atr * a
                    take = entry + tp_atr * a
                    if lo[j] <= stop:
                        result, decided = 0, j
                        break
                continue
            if j > fill_bar + max_holding_bars:
                result, decided = 0, fill_bar + max_holding_bars
                break
            if j >= n:
                break
            if lo[j] <= stop:
                result, decided = 0, j
                break
            if hi[j] > take or (touch and hi[j] == take):
                real_entry, real_take = sign * entry, sign * take
                pnl = side * (real_take - real_entry) - maker_fee * (real_take + real_entry)
                result, decided = (1 if pnl > 0 else 0), j
                break
        labels.append(result)
        ends.append(decided)
    return labels, ends
