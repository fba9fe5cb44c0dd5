"""A slow, obviously-correct pure-Python simulator of the hybrid strategy, written from DESIGN §1.

It shares nothing with backtest.py or strategy.py (its own decisions, fills and accounting), so
agreement trade for trade with the compiled core is evidence that both implement the rules.
Also used by benchmarks/bench_backtest.py as the speed reference.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal

import pandas as pd

PROBS = ["p_exec_long", "p_exec_short", "p_dir_long", "p_dir_short"]


@dataclass
class Pos:
    side: int
    qty: float
    entry: float
    tp: float
    sl: float
    fill_bar: int
    fine_k: int
    regime: str
    entry_fee: float
    entry_time: float
    funding: float = 0.0


@dataclass
class Order:
    side: int
    price: float
    qty: float
    placed: int
    tp_dist: float
    sl_dist: float
    fine_k: int


def on_grid(value, step, direction):
    """Grid point for value (the double nearest the decimal): the nearest one when within a millionth of a
    step, else direction(value / step), with direction math.floor or math.ceil."""
    q = value / step
    n = round(q)
    n = n if abs(q - n) <= 1e-6 else direction(q)
    return round(n * step, max(0, -Decimal(repr(step)).as_tuple().exponent))


def size(equity, price, sl_dist, used, s, inst, depth):
    """Risk-based quantity within the leverage cap and max_book_share of the book depth (NaN: no cap), rounded
    down to the step; 0 if too small."""
    if equity <= 0 or price <= 0 or sl_dist <= 0:
        return 0.0
    qty = s.risk_per_trade * equity / sl_dist
    room = s.max_leverage * equity - used
    if room <= 0:
        return 0.0
    qty = min(qty, room / price)
    if s.max_book_share > 0 and not math.isnan(depth):
        qty = min(qty, s.max_book_share * depth)
    qty = on_grid(qty, inst.qty_step, math.floor)
    if qty < inst.min_qty - 1e-12 or qty * price < inst.min_notional:
        return 0.0
    return qty


def ref_decide(i, day, close, atr, probs, equity, state, slots, resting, s, inst, depth):
    """Intents as tuples (kind, side, ref, price, qty, tp_dist, sl_dist, reason). depth: side (1 bids, -1 asks)
    -> the bar's book depth (NaN: unknown); a market entry takes the other side, a limit joins its own."""
    out = []
    if day != state["day"]:
        state["start"] = equity if state["day"] < 0 else state["last"]
        state["day"] = day
        state["halted"] = False
    state["last"] = equity
    if not state["halted"] and equity <= (1 - s.daily_loss_limit) * state["start"]:
        state["halted"] = True
        for k, p in enumerate(slots):
            if p is not None:
                out.append(("exit", p.side, k, close, p.qty, 0.0, 0.0, "kill_switch"))
        for side in (1, -1):
            if resting[side] is not None:
                o = resting[side]
                out.append(("cancel", side, -1, o.price, o.qty, 0.0, 0.0, "kill_switch"))
        return out
    count, used = 0, 0.0
    for k, p in enumerate(slots):
        if p is None:
            continue
        if i - p.fill_bar >= s.max_holding_bars:
            out.append(("exit", p.side, k, close, p.qty, 0.0, 0.0, "time"))
        else:
            count += 1
            used += p.qty * close
    live = {1: False, -1: False}
    for side in (1, -1):
        o = resting[side]
        if o is None:
            continue
        if i - o.placed >= s.time_limit_bars:
            out.append(("cancel", side, -1, o.price, o.qty, 0.0, 0.0, "expired"))
        else:
            live[side] = True
            count += 1
            used += o.qty * o.price
    if state["halted"] or not atr > 0 or not close > 0:
        return out
    sl_dist = s.stop_loss_atr * atr
    for side, name in ((1, "long"), (-1, "short")):
        p_exec, p_dir = probs[f"p_exec_{name}"], probs[f"p_dir_{name}"]
        if p_dir >= s.aggressive_threshold:
            own_n = live[side] * 1
            own_value = resting[side].qty * resting[side].price if live[side] else 0.0
            if count - own_n >= s.max_positions:
                continue
            qty = size(equity, close, sl_dist, used - own_value, s, inst, depth[-side])
            if qty <= 0:
                continue
            if live[side]:
                out.append(("cancel", side, -1, resting[side].price, resting[side].qty, 0.0, 0.0, "superseded"))
                count -= 1
                used -= own_value
            out.append(("market", side, -1, close, qty, s.take_profit_atr * s.aggressive_tp_mult * atr, sl_dist,
                        "breakout"))
            count += 1
            used += qty * close
        elif p_exec >= s.exec_threshold and p_dir >= s.direction_threshold:
            if live[side] or count >= s.max_positions:
                continue
            raw = close - side * s.limit_offset_atr * atr
            tick = inst.tick_size
            price = on_grid(raw, tick, math.floor if side == 1 else math.ceil)
            if price <= 0:
                continue
            qty = size(equity, price, sl_dist, used, s, inst, depth[side])
            if qty <= 0:
                continue
            out.append(("limit", side, -1, price, qty, s.take_profit_atr * atr, sl_dist, "chop"))
            count += 1
            used += qty * price
    return out


def _exit(p, op, hi, lo, stop_only, touch):
    """('stop'|'tp'|None, raw price) for one bar: gaps first, then the stop wins ties."""
    if p.side == 1:
        if op <= p.sl:
            return "stop", op
        if not stop_only and (op > p.tp or (touch and op >= p.tp)):
            return "tp", p.tp
        if lo <= p.sl:
            return "stop", p.sl
        if not stop_only and (hi > p.tp or (touch and hi >= p.tp)):
            return "tp", p.tp
    else:
        if op >= p.sl:
            return "stop", op
        if not stop_only and (op < p.tp or (touch and op <= p.tp)):
            return "tp", p.tp
        if hi >= p.sl:
            return "stop", p.sl
        if not stop_only and (lo < p.tp or (touch and lo <= p.tp)):
            return "tp", p.tp
    return None, 0.0


def _kill(slots, cash, start, loss_limit):
    """(price, 'down'|'up'|'any'|None) where equity cash + sum side*qty*(P - entry) meets the limit."""
    held = [p for p in slots if p is not None]
    net = sum(p.side * p.qty for p in held)
    at_zero = cash - sum(p.side * p.qty * p.entry for p in held)     # equity at P = 0
    limit = (1 - loss_limit) * start
    if abs(net) <= 1e-9 * sum(p.qty for p in held):
        return (math.inf, "any") if at_zero <= limit else (math.nan, None)
    return (limit - at_zero) / net, ("down" if net > 0 else "up")


def _hit(side, price, hi, lo, touch):
    return (lo < price or (touch and lo <= price)) if side == 1 else (hi > price or (touch and hi >= price))


def reference_backtest(frame: pd.DataFrame, probs: pd.DataFrame, cfg, fine: pd.DataFrame | None = None,
                       check_decide=None):
    """Returns (trades: list[dict], equity rows: list[dict], intents: list[tuple], rejected PostOnly count).

    check_decide(i, bar_time, close, atr, probs, equity, day_state, slots, resting, own_intents) is
    called at every decision so a test can compare another decision function with this one.
    """
    s, inst, v = cfg.strategy, cfg.instrument, cfg.venue
    bar_s = {"1m": 60, "5m": 300, "15m": 900, "1h": 3600, "4h": 14400}[cfg.data.timeframe]
    touch = v.fill_rule == "touch"
    slip = v.slippage_bps / 1e4
    times = [int(ts.timestamp()) for ts in frame.index]
    rows = frame.to_dict("records")
    prob_rows = probs.reindex(frame.index).to_dict("records")
    fine_bars = {}
    lat_steps = 0
    if fine is not None:
        ftimes = [int(ts.timestamp()) for ts in fine.index]
        frows = fine.to_dict("records")
        fine_s = min(b - a for a, b in zip(ftimes, ftimes[1:]))
        lat_steps = int(v.latency_ms / 1000.0 // fine_s)
        for j, ft in enumerate(ftimes):
            fine_bars.setdefault(ft - ft % bar_s, []).append((ft, frows[j]))
    slots = [None] * s.max_positions
    resting = {1: None, -1: None}
    pending = []
    state = {"day": -1, "start": math.nan, "halted": False, "last": math.nan}
    cash = v.initial_equity
    trades, equity_rows, intents, rejected = [], [], [], 0

    def close_pos(k, px, fee_rate, reason, when, bar):
        nonlocal cash
        p = slots[k]
        fee = p.qty * px * fee_rate
        cash += p.side * p.qty * (px - p.entry) - fee
        trades.append({"side": p.side, "regime": p.regime, "qty": p.qty, "entry_time": p.entry_time,
                       "entry_price": p.entry, "exit_time": when, "exit_price": px, "entry_fee": p.entry_fee,
                       "exit_fee": fee, "funding": p.funding, "reason": reason, "entry_bar": p.fill_bar,
                       "exit_bar": bar,
                       "pnl": p.side * p.qty * (px - p.entry) - p.entry_fee - fee - p.funding})
        slots[k] = None

    def open_pos(side, px, qty, tp_dist, sl_dist, regime, fee_rate, when, bar, fine_k, sl_ref):
        nonlocal cash
        k = slots.index(None)
        fee = qty * px * fee_rate
        cash -= fee
        way = math.ceil if side == 1 else math.floor          # TP away from the fill, SL towards sl_ref
        slots[k] = Pos(side, qty, px, on_grid(px + side * tp_dist, inst.tick_size, way),
                       on_grid(sl_ref - side * sl_dist, inst.tick_size, way), bar, fine_k, regime, fee, when)

    n = len(rows)
    for i in range(n):
        bar, t = rows[i], times[i]
        fb = fine_bars.get(t, [])
        cash_at_open, last_fill = cash, 0
        if v.funding_rate_8h != 0 and t % (8 * 3600) == 0:
            for p in slots:
                if p is not None:
                    pay = p.side * p.qty * bar["open"] * v.funding_rate_8h
                    cash -= pay
                    p.funding += pay
        if fb:
            k0 = min(lat_steps, len(fb) - 1)
            ref_px, ref_t = fb[k0][1]["open"], float(fb[k0][0])
        else:
            k0, ref_px, ref_t = -1, bar["open"], float(t)
        for kind, side, ref, price, qty, tp_d, sl_d, reason in pending:
            if kind == "cancel":
                resting[side] = None
            elif kind == "exit":
                if slots[ref] is not None:
                    p = slots[ref]
                    close_pos(ref, ref_px * (1 - p.side * slip), v.taker_fee,
                              "kill_switch" if reason == "kill_switch" else "time", ref_t, i)
                    last_fill = max(last_fill, k0)
            elif kind == "market":
                open_pos(side, ref_px * (1 + side * slip), qty, tp_d, sl_d, "taker", v.taker_fee, ref_t, i, k0,
                         price)                       # a market entry's stop: from the decision close
                last_fill = max(last_fill, k0)
            elif (side == 1 and price >= ref_px) or (side == -1 and price <= ref_px):
                rejected += 1
            else:
                resting[side] = Order(side, price, qty, i - 1, tp_d, sl_d, k0)
        pending = []
        for side in (1, -1):
            o = resting[side]
            if o is None:
                continue
            if fb:
                first = o.fine_k if (o.placed == i - 1 and o.fine_k >= 0) else 0
                for m in range(first, len(fb)):
                    if _hit(side, o.price, fb[m][1]["high"], fb[m][1]["low"], touch):
                        open_pos(side, o.price, o.qty, o.tp_dist, o.sl_dist, "maker", v.maker_fee,
                                 float(fb[m][0]), i, m, o.price)
                        resting[side] = None
                        last_fill = max(last_fill, m)
                        break
            elif _hit(side, o.price, bar["high"], bar["low"], touch):
                open_pos(side, o.price, o.qty, o.tp_dist, o.sl_dist, "maker", v.maker_fee, float(t), i, -1, o.price)
                resting[side] = None
        for k in range(len(slots)):
            p = slots[k]
            if p is None:
                continue
            new = p.fill_bar == i
            what, px, when = None, 0.0, float(t)
            if fb:
                coarse, _ = _exit(p, bar["open"], bar["high"], bar["low"], False, touch)
                if new or coarse:
                    first = p.fine_k if (new and p.fine_k >= 0) else 0
                    for m in range(first, len(fb)):
                        f = fb[m][1]
                        what, px = _exit(p, f["open"], f["high"], f["low"], new and m == first, touch)
                        if what:
                            when = float(fb[m][0])
                            last_fill = max(last_fill, m)
                            break
            else:
                what, px = _exit(p, bar["open"], bar["high"], bar["low"], new, touch)
            if what == "stop":
                close_pos(k, px * (1 - p.side * slip), v.taker_fee, "stop_loss", when, i)
            elif what == "tp":
                close_pos(k, px, v.maker_fee, "take_profit", when, i)
        if state["day"] >= 0 and (cash != cash_at_open or any(p is not None for p in slots)):
            if t // 86400 != state["day"]:
                state.update(day=t // 86400, start=state["last"], halted=False)
            trigger, way = (math.nan, None) if state["halted"] else _kill(slots, cash, state["start"],
                                                                          s.daily_loss_limit)
            path = [(float(ft), f) for ft, f in fb[last_fill:]] if fb else [(float(t), bar)]
            for when, f in path:
                if way == "any" or (way == "down" and f["low"] <= trigger) or (way == "up" and f["high"] >= trigger):
                    px = min(f["open"], trigger) if way != "up" else max(f["open"], trigger)
                    state["halted"] = True
                    for k in range(len(slots)):
                        if slots[k] is not None:
                            close_pos(k, px * (1 - slots[k].side * slip), v.taker_fee, "kill_switch", when, i)
                    resting = {1: None, -1: None}
                    break
        upnl = sum(p.side * p.qty * (bar["close"] - p.entry) for p in slots if p is not None)
        equity_rows.append({"equity": cash + upnl, "cash": cash, "upnl": upnl,
                            "positions": sum(p is not None for p in slots)})
        if i == n - 1:
            break
        depth = {1: bar.get("ob_bid_depth_mean", math.nan), -1: bar.get("ob_ask_depth_mean", math.nan)}
        own = ref_decide(i, t // 86400, bar["close"], bar["atr"], prob_rows[i], cash + upnl, state, slots,
                         resting, s, inst, depth)
        if check_decide is not None:
            check_decide(i, t, bar["close"], bar["atr"], prob_rows[i], cash + upnl, slots, resting, own)
        intents.extend((i,) + x for x in own)
        pending = own
    if n:
        last = rows[-1]
        for k in range(len(slots)):
            if slots[k] is not None:
                p = slots[k]
                close_pos(k, last["close"] * (1 - p.side * slip), v.taker_fee, "end_of_data",
                          float(times[-1] + bar_s), n - 1)
        equity_rows[-1] = {"equity": cash, "cash": cash, "upnl": 0.0, "positions": equity_rows[-1]["positions"]}
    return trades, equity_rows, intents, rejected
