"""The matching engine of one linear USDT perpetual: accounts, orders, positions, fills, fees, TP/SL.

Pure and synchronous (no I/O, no clock): `MatchingEngine` is driven by book/trade events and answers the
order/position/account requests of Bybit V5 with the same records and error codes (`ExchangeError`).
Prices and quantities are held as integer ticks and lots, so rounding never drifts. Used by
`paper_exchange.py` (behind its REST/WS server) and by the live engine's dry-run mode (in process).

Assumptions users should know: our own fills never consume the replayed liquidity (no market impact);
resting limits fill when a trade prints through their price (or, with fill_rule="touch", at it), up to
that trade's size, or when the opposite side of the book crosses them, up to the crossing depth; market
orders walk the visible book; the mark (and index) price is the book mid; funding is a flat 8-hourly rate
(default 0); cross-margin liquidation at a flat 0.5% maintenance rate.
"""
from __future__ import annotations

import json
import logging
import operator
import uuid
from collections import deque
from dataclasses import dataclass, replace
from decimal import Decimal, InvalidOperation
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any, Callable

import numpy as np

import grid
from config import InstrumentConfig

log = logging.getLogger("matching")

MAX_LEVERAGE = 100.0
MAINT_MARGIN_RATE = 0.005
MAX_ACTIVE_ORDERS = 500
FUNDING_INTERVAL_MS = 8 * 3600 * 1000
PRICE_LIMIT_RATIO = 0.1
SEVEN_DAYS_MS = 7 * 86_400_000   # Bybit V5 list queries (executions): the widest startTime..endTime window


class ExchangeError(Exception):
    """A business error answered as a Bybit retCode (HTTP 200)."""

    def __init__(self, code: int, msg: str):
        super().__init__(f"{code}: {msg}")
        self.code = code
        self.msg = msg


class RateLimited(ExchangeError):
    """10006, with the (future) time at which the window frees up."""

    def __init__(self, reset_ms: int):
        super().__init__(10006, "Too many visits!")
        self.reset_ms = reset_ms


# ---------------------------------------------------------------- instrument and number formats
def fixed_point(units: int, decimals: int) -> str:
    """An integer count of 10^-decimals as a fixed-point string: what format(Decimal, f".{decimals}f") prints
    for that exact value (-0.05 for -5 at 2 decimals), without Decimal's cost on the per-message path."""
    if decimals == 0:
        return str(units)
    whole, frac = divmod(abs(units), 10 ** decimals)
    return f"{'-' if units < 0 else ''}{whole}.{frac:0{decimals}d}"


@dataclass(frozen=True)
class Instrument:
    """Trading rules of the one replayed symbol, exact as decimals."""
    symbol: str
    tick_size: Decimal
    qty_step: Decimal
    min_qty: Decimal
    min_notional: Decimal
    max_qty: Decimal = Decimal("1000000")
    max_mkt_qty: Decimal = Decimal("500000")

    @cached_property
    def price_decimals(self) -> int:
        return max(0, -self.tick_size.normalize().as_tuple().exponent)

    @cached_property
    def qty_decimals(self) -> int:
        return max(0, -self.qty_step.normalize().as_tuple().exponent)

    @cached_property
    def _tick_units(self) -> int:
        return int(self.tick_size.scaleb(self.price_decimals))

    @cached_property
    def _step_units(self) -> int:
        return int(self.qty_step.scaleb(self.qty_decimals))

    @cached_property
    def _tick_float(self) -> float:
        return float(self.tick_size)

    @cached_property
    def _step_float(self) -> float:
        return float(self.qty_step)

    def price_str(self, ticks: int) -> str:
        """Ticks as Bybit prints prices: fixed decimals of the tick size (exact: integer arithmetic)."""
        return fixed_point(operator.index(ticks) * self._tick_units, self.price_decimals)

    def qty_str(self, lots: int) -> str:
        return fixed_point(operator.index(lots) * self._step_units, self.qty_decimals)

    @cached_property
    def price_strs(self) -> Callable[[int], str]:
        """price_str with its strings cached (a replay prints the same few thousand prices again and again)."""
        return lru_cache(maxsize=1 << 16)(self.price_str)

    @cached_property
    def qty_strs(self) -> Callable[[int], str]:
        """qty_str, cached likewise."""
        return lru_cache(maxsize=1 << 16)(self.qty_str)

    def level_arrays(self, prices: np.ndarray, qtys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Book levels as (ticks, lots) int64 arrays, best first: nearest tick, size floored to the lot (grid.py's
        rule, vectorised); price_strs/qty_strs print them as Bybit does."""
        ticks = grid.grid_indices(np.asarray(prices, dtype=np.float64), self._tick_float, grid.NEAREST)
        lots = grid.grid_indices(np.asarray(qtys, dtype=np.float64) + 1e-12, self._step_float, grid.DOWN)
        return ticks, lots

    def px(self, ticks: int) -> float:
        return float(Decimal(ticks) * self.tick_size)

    def qty(self, lots: int) -> float:
        return float(Decimal(lots) * self.qty_step)

    def to_ticks(self, price: float) -> int:
        """Nearest tick of a float price from the replayed book or trades (grid.py's one rule)."""
        return int(grid.grid_index(price, self._tick_float, grid.NEAREST))

    def to_lots_floor(self, qty: float) -> int:
        """Whole lots in a float quantity, rounded down by grid.py's one rule."""
        return int(grid.grid_index(qty, self._step_float, grid.DOWN))


def load_instrument(data_dir: str | Path | None, symbol: str, defaults: InstrumentConfig | None = None) -> Instrument:
    """Rules from <data_dir>/instrument.json when present, else the InstrumentConfig defaults."""
    cfg = defaults or InstrumentConfig()
    values: dict[str, Any] = {"symbol": symbol, "tickSize": cfg.tick_size, "qtyStep": cfg.qty_step,
                              "minOrderQty": cfg.min_qty, "minNotionalValue": cfg.min_notional}
    path = Path(data_dir) / "instrument.json" if data_dir else None
    if path is not None and path.is_file():
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from None
        unknown = set(loaded) - set(values)
        if unknown:
            log.warning("%s: ignoring unknown key(s) %s", path, ", ".join(sorted(unknown)))
        values.update({k: v for k, v in loaded.items() if k in values})
    try:
        inst = Instrument(symbol=str(values["symbol"]), tick_size=Decimal(str(values["tickSize"])),
                          qty_step=Decimal(str(values["qtyStep"])), min_qty=Decimal(str(values["minOrderQty"])),
                          min_notional=Decimal(str(values["minNotionalValue"])))
    except InvalidOperation:
        raise ValueError(f"{path}: tickSize/qtyStep/minOrderQty/minNotionalValue must be numbers") from None
    if inst.tick_size <= 0 or inst.qty_step <= 0 or inst.min_qty <= 0 or inst.min_notional < 0:
        raise ValueError(f"{path}: tickSize, qtyStep and minOrderQty must be > 0, minNotionalValue >= 0")
    return inst


def money(x: float) -> str:
    """Account values as Bybit prints them: plain decimal strings, 8 places at most."""
    text = f"{x:.8f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _dec(params: dict, key: str, required: bool = False) -> Decimal | None:
    """A decimal request parameter (string or number); 10001 when malformed."""
    raw = params.get(key)
    if raw is None or raw == "":
        if required:
            raise ExchangeError(10001, f"params error: {key} is required")
        return None
    try:
        value = Decimal(str(raw))
    except InvalidOperation:
        raise ExchangeError(10001, f"params error: {key} invalid") from None
    if not value.is_finite():
        raise ExchangeError(10001, f"params error: {key} invalid")
    return value


def _bool(params: dict, key: str) -> bool:
    raw = params.get(key, False)
    if isinstance(raw, bool):
        return raw
    return str(raw).lower() in ("true", "1")


def _int(params: dict, key: str, default: int = 0) -> int:
    raw = params.get(key)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except (TypeError, ValueError):
        raise ExchangeError(10001, f"params error: {key} invalid") from None


# ---------------------------------------------------------------- records
@dataclass
class Order:
    """One order as the exchange keeps it (integer ticks/lots)."""
    order_id: str
    link_id: str
    side: str
    order_type: str
    price: int
    qty: int
    tif: str
    position_idx: int
    reduce_only: bool
    created: int
    status: str = "New"
    close_on_trigger: bool = False
    cancel_type: str = "UNKNOWN"
    reject_reason: str = "EC_NoError"
    cum_qty: int = 0
    cum_value: float = 0.0
    cum_fee: float = 0.0
    updated: int = 0
    stop_order_type: str = ""
    trigger_price: int = 0
    trigger_direction: int = 0
    trigger_by: str = ""
    take_profit: int = 0
    stop_loss: int = 0
    tpsl_mode: str = ""
    tp_order_type: str = "Market"
    sl_order_type: str = "Market"
    tp_limit: int = 0
    sl_limit: int = 0
    tp_trigger_by: str = "LastPrice"
    sl_trigger_by: str = "LastPrice"
    last_price_on_created: int = 0
    create_type: str = "CreateByUser"
    oco_group: str = ""

    @property
    def leaves(self) -> int:
        return self.qty - self.cum_qty

    @property
    def is_open(self) -> bool:
        return self.status in ("New", "PartiallyFilled", "Untriggered")

    @property
    def sign(self) -> int:
        return 1 if self.side == "Buy" else -1


@dataclass
class Position:
    """One position slot (idx 0 one-way; 1 long / 2 short in hedge mode); size is signed lots."""
    idx: int
    size: int = 0
    entry: float = 0.0
    entry_fees: float = 0.0
    leverage: float = 10.0
    cum_realised: float = 0.0
    cur_realised: float = 0.0
    created: int = 0
    updated: int = 0
    seq: int = 0


@dataclass
class Execution:
    """One fill, kept for /v5/execution/list and the execution stream."""
    exec_id: str
    order_id: str
    link_id: str
    side: str
    order_type: str
    stop_order_type: str
    order_price: int
    order_qty: int
    leaves: int
    price: int
    qty: int
    fee: float
    fee_rate: float
    is_maker: bool
    time: int
    mark: float
    closed: int
    create_type: str
    seq: int
    exec_type: str = "Trade"


# ---------------------------------------------------------------- matching engine
class MatchingEngine:
    """Accounts, orders, positions and fills of one linear USDT symbol; pure and synchronous.

    Market input: `on_book(book, ts_ms)` after each book update and `on_trade(price, size, side, ts_ms, id)`
    per public trade. Requests: the `place/amend/cancel/...` methods raise `ExchangeError` like Bybit.
    Every state change appends (topic, record) to `events` for the private streams; the caller drains it.
    """

    def __init__(self, instrument: Instrument, balance: float = 10000.0, maker_fee: float = 0.0002,
                 taker_fee: float = 0.00055, fill_rule: str = "trade_through", leverage: float = 10.0,
                 funding_rate: float = 0.0):
        self.inst = instrument
        self.wallet = float(balance)
        self.funding_rate = funding_rate
        self.funding_epoch = -1
        self.maker_fee = maker_fee
        self.taker_fee = taker_fee
        self.fill_rule = fill_rule
        self.default_leverage = leverage
        self.hedge = False
        self.now_ms = 0
        self.book: Any = None
        self.last_price = 0
        self.seq = 0
        self.orders: dict[str, Order] = {}
        self.active: dict[str, Order] = {}
        self.link_ids: dict[str, str] = {}
        self.positions: dict[int, Position] = {0: Position(0, leverage=leverage)}
        self.executions: deque[Execution] = deque(maxlen=50000)
        self.closed_pnl: dict[str, dict] = {}
        self.closed_order: list[str] = []
        self.cum_realised = 0.0
        self.events: list[tuple[str, dict]] = []

    # ------------------------------------------------------------ market view
    def best(self) -> tuple[int, int]:
        """Best bid and ask in ticks (0 when a side is empty or there is no book)."""
        if self.book is None or not getattr(self.book, "valid", True):
            return 0, 0
        bid, ask = self.book.best_bid(), self.book.best_ask()
        to = self.inst.to_ticks
        return (to(bid) if bid == bid and bid > 0 else 0), (to(ask) if ask == ask and ask > 0 else 0)

    def levels(self, side: str, n: int = 200) -> list[tuple[int, float]]:
        """Opposite-side liquidity an order of `side` can take: [(price ticks, qty)], best first."""
        if self.book is None or not getattr(self.book, "valid", True):
            return []
        bid_px, bid_qty, ask_px, ask_qty = self.book.top(n)
        px, qty = (ask_px, ask_qty) if side == "Buy" else (bid_px, bid_qty)
        return [(self.inst.to_ticks(float(p)), float(q)) for p, q in zip(px, qty) if q > 0 and p == p and p > 0]

    def mark(self) -> float:
        """Mark price: book mid, else last trade."""
        bid, ask = self.best()
        if bid and ask:
            return (self.inst.px(bid) + self.inst.px(ask)) / 2.0
        return self.inst.px(self.last_price) if self.last_price else 0.0

    def trigger_price(self, by: str) -> int:
        """The price a trigger compares with, in ticks (the mark until the first trade prints)."""
        if by in ("MarkPrice", "IndexPrice") or not self.last_price:
            return self.inst.to_ticks(self.mark())
        return self.last_price

    # ------------------------------------------------------------ market events
    def on_book(self, book: Any, ts_ms: int) -> None:
        """The replayed book changed: resting orders the book now crosses fill as makers; triggers re-check."""
        self.book = book
        self.now_ms = max(self.now_ms, int(ts_ms))
        resting = self._resting()
        bid, ask = self.best() if resting else (0, 0)   # the replay calls this on every book message
        for order in resting:
            if order.side == "Buy" and ask and ask <= order.price:
                avail = sum(q for p, q in self.levels("Buy") if p <= order.price)
                self._fill(order, self._lots(avail), order.price, True)
            elif order.side == "Sell" and bid and bid >= order.price:
                avail = sum(q for p, q in self.levels("Sell") if p >= order.price)
                self._fill(order, self._lots(avail), order.price, True)
        self._check_triggers()
        self._settle_funding()
        self._check_liquidation()

    def on_trade(self, price: float, size: float, side: str, ts_ms: int) -> None:
        """A public trade: resting limits it trades through fill (up to its size); triggers re-check."""
        self.now_ms = max(self.now_ms, int(ts_ms))
        ticks = self.inst.to_ticks(price)
        self.last_price = ticks
        if not self.active:
            return   # nothing rests or waits for a trigger (the replay of the days before --start, a flat account)
        remaining = size
        touch = self.fill_rule == "touch"
        for order in self._resting():
            if remaining <= 0:
                break
            if order.side == "Buy" and side == "Sell":
                hit = ticks < order.price or (touch and ticks == order.price)
            elif order.side == "Sell" and side == "Buy":
                hit = ticks > order.price or (touch and ticks == order.price)
            else:
                hit = False
            if hit:
                lots = min(order.leaves, self._lots(remaining))
                if lots > 0:
                    remaining -= self.inst.qty(lots)
                    self._fill(order, lots, order.price, True)
        self._check_triggers()

    def _lots(self, qty: float) -> int:
        return self.inst.to_lots_floor(qty)

    def _resting(self) -> list[Order]:
        """Open limit orders in time priority."""
        return [o for o in self.active.values()
                if o.status in ("New", "PartiallyFilled") and o.order_type == "Limit"]

    # ------------------------------------------------------------ requests: orders
    def place_order(self, p: dict) -> dict:
        """/v5/order/create: validate like Bybit, accept, then match (fills and cancels arrive as events)."""
        self._check_symbol(p, need_symbol=True)
        side = p.get("side")
        if side not in ("Buy", "Sell"):
            raise ExchangeError(10001, "params error: side invalid")
        order_type = p.get("orderType")
        if order_type not in ("Limit", "Market"):
            raise ExchangeError(10001, "params error: orderType invalid")
        tif = p.get("timeInForce") or ("IOC" if order_type == "Market" else "GTC")
        if tif not in ("GTC", "IOC", "FOK", "PostOnly"):
            raise ExchangeError(10001, "params error: timeInForce invalid")
        if order_type == "Market":
            tif = "IOC"
        link_id = str(p.get("orderLinkId") or "")
        if len(link_id) > 36 or any(not (c.isalnum() or c in "-_") for c in link_id):
            raise ExchangeError(10001, "params error: orderLinkId invalid")
        if link_id and link_id in self.link_ids:
            raise ExchangeError(110072, "OrderLinkedID is duplicate")
        if len(self.active) >= MAX_ACTIVE_ORDERS:
            raise ExchangeError(110020, f"Not allowed to have more than {MAX_ACTIVE_ORDERS} active orders")
        qty = self._qty_lots(p)
        price = self._price_ticks(p, "price", required=order_type == "Limit") if order_type == "Limit" else 0
        idx = self._position_idx(p)
        close_on_trigger = _bool(p, "closeOnTrigger")
        closing_side = self.hedge and (idx == 1) != (side == "Buy")
        reduce_only = _bool(p, "reduceOnly") or closing_side
        trigger = self._price_ticks(p, "triggerPrice") or 0
        ref_price = price or self._taker_ref(side)
        if ref_price <= 0:
            raise ExchangeError(10001, "params error: no market price to value the order")
        self._check_notional(qty, ref_price, reduce_only or close_on_trigger)
        if price and not trigger:
            self._check_price_band(side, price)
        order = Order(order_id=str(uuid.uuid4()), link_id=link_id, side=side, order_type=order_type, price=price,
                      qty=qty, tif=tif, position_idx=idx, reduce_only=reduce_only or close_on_trigger,
                      created=self.now_ms, updated=self.now_ms, close_on_trigger=close_on_trigger,
                      last_price_on_created=self.last_price)
        self._attach_tpsl(order, p)
        if trigger:
            direction = _int(p, "triggerDirection")
            if direction not in (1, 2):
                raise ExchangeError(10001, "params error: triggerDirection invalid")
            order.trigger_price, order.trigger_direction = trigger, direction
            order.trigger_by = p.get("triggerBy") or "LastPrice"
            order.stop_order_type, order.status = "Stop", "Untriggered"
            self._check_trigger_side(order)
        if order.reduce_only:
            self._check_reduce_only(order)
        elif not trigger:
            self._check_margin(order, ref_price)
        self.orders[order.order_id] = order
        if link_id:
            self.link_ids[link_id] = order.order_id
        if order.status == "Untriggered":
            self._emit_order(order)
        else:
            self._activate(order)
        self._emit_position(self.positions[idx])
        return {"orderId": order.order_id, "orderLinkId": order.link_id}

    def amend_order(self, p: dict) -> dict:
        """/v5/order/amend: qty, price, trigger price and attached TP/SL of an open order."""
        self._check_symbol(p)
        order = self._find_open(p)
        qty = self._qty_lots(p) if p.get("qty") not in (None, "") else order.qty
        price = self._price_ticks(p, "price") if p.get("price") not in (None, "") else order.price
        trigger = self._price_ticks(p, "triggerPrice") if p.get("triggerPrice") not in (None, "") else None
        if qty <= order.cum_qty:
            raise ExchangeError(10001, "params error: qty must exceed the filled quantity")
        if order.order_type == "Limit":
            self._check_notional(qty, price, order.reduce_only)
        if qty > order.qty and not order.reduce_only and order.status != "Untriggered":
            self._check_margin(replace(order, qty=qty - order.qty, cum_qty=0), price or self._taker_ref(order.side))
        changed = (qty != order.qty or price != order.price or
                   (trigger is not None and trigger != order.trigger_price))
        for key in ("takeProfit", "stopLoss"):
            value = p.get(key)
            if value not in (None, ""):
                ticks = self._price_ticks(p, key) if _dec(p, key) != 0 else 0
                attr = "take_profit" if key == "takeProfit" else "stop_loss"
                changed |= getattr(order, attr) != ticks
                setattr(order, attr, ticks)
        if not changed:
            raise ExchangeError(10001, "The order remains unchanged as the parameters entered match the existing ones.")
        order.qty, order.price = qty, price
        if trigger is not None:
            order.trigger_price = trigger
        order.updated = self.now_ms
        if order.tif == "PostOnly" and self._crosses(order):
            order.reject_reason = "EC_PostOnlyWillTakeLiquidity"
            self._cancel(order, "UNKNOWN")
            return {"orderId": order.order_id, "orderLinkId": order.link_id}
        self._emit_order(order)
        if order.status in ("New", "PartiallyFilled") and order.order_type == "Limit":
            self._match_aggressive(order)
        self._emit_position(self.positions[order.position_idx])
        return {"orderId": order.order_id, "orderLinkId": order.link_id}

    def cancel_order(self, p: dict) -> dict:
        """/v5/order/cancel of one open order; 110001 when unknown or already finished."""
        self._check_symbol(p)
        order = self._find_open(p)
        self._cancel(order, "CancelByUser")
        self._emit_position(self.positions[order.position_idx])
        return {"orderId": order.order_id, "orderLinkId": order.link_id}

    def cancel_all(self, p: dict) -> dict:
        """/v5/order/cancel-all, optionally only plain (Order) or conditional (StopOrder) orders."""
        if not (p.get("symbol") or p.get("settleCoin") or p.get("baseCoin")):
            raise ExchangeError(10001, "params error: symbol or settleCoin is required")
        if p.get("symbol"):
            self._check_symbol(p)
        flt = p.get("orderFilter") or ""
        done = []
        for order in list(self.active.values()):
            if not order.is_open:
                continue
            conditional = order.status == "Untriggered"
            if (flt == "Order" and conditional) or (flt in ("StopOrder", "tpslOrder") and not conditional):
                continue
            self._cancel(order, "CancelByUser")
            done.append({"orderId": order.order_id, "orderLinkId": order.link_id})
        return {"list": done, "success": "1"}

    def open_orders(self, p: dict) -> dict:
        """/v5/order/realtime: open orders (or, with openOnly=1 / an explicit id, recent closed ones)."""
        if p.get("symbol"):
            self._check_symbol(p)
        elif not (p.get("settleCoin") or p.get("baseCoin")):
            raise ExchangeError(10001, "params error: symbol or settleCoin is required")
        oid, lid = p.get("orderId"), p.get("orderLinkId")
        flt = p.get("orderFilter") or ""
        limit = min(max(_int(p, "limit", 20), 1), 50)
        if oid or lid:
            found = self._lookup(oid, lid)
            rows = [found] if found is not None else []
        elif str(p.get("openOnly", "0")) == "1":
            rows = [self.orders[i] for i in reversed(self.closed_order[-500:])]
        else:
            rows = [o for o in self.active.values() if o.is_open]
            rows.sort(key=lambda o: o.created, reverse=True)
        if flt == "Order":
            rows = [o for o in rows if not o.stop_order_type]
        elif flt in ("StopOrder", "tpslOrder"):
            rows = [o for o in rows if o.stop_order_type]
        return self._page(p, [self.order_record(o) for o in rows], limit)

    def order_history(self, p: dict) -> dict:
        """/v5/order/history: every order, newest first."""
        rows = sorted(self.orders.values(), key=lambda o: o.updated, reverse=True)
        oid, lid = p.get("orderId"), p.get("orderLinkId")
        if oid or lid:
            rows = [o for o in rows if o.order_id == oid or (lid and o.link_id == lid)]
        return self._page(p, [self.order_record(o) for o in rows], min(max(_int(p, "limit", 20), 1), 50))

    # ------------------------------------------------------------ requests: positions and account
    def position_list(self, p: dict) -> dict:
        """/v5/position/list: a row per slot for a symbol query, non-zero rows for a settleCoin query."""
        if p.get("symbol"):
            self._check_symbol(p)
            rows = [self.position_record(pos) for pos in self._slots()]
        elif p.get("settleCoin"):
            rows = [self.position_record(pos) for pos in self._slots() if pos.size]
        else:
            raise ExchangeError(10001, "params error: symbol or settleCoin is required")
        return {"list": rows, "nextPageCursor": "", "category": "linear"}

    def set_leverage(self, p: dict) -> dict:
        """/v5/position/set-leverage; 110043 when unchanged (benign)."""
        self._check_symbol(p)
        buy, sell = _dec(p, "buyLeverage", True), _dec(p, "sellLeverage", True)
        assert buy is not None and sell is not None
        if not self.hedge and buy != sell:
            raise ExchangeError(10001, "params error: buy leverage must equal sell leverage in one-way mode")
        for lev in (buy, sell):
            if not (Decimal(1) <= lev <= Decimal(str(MAX_LEVERAGE))) or lev != lev.quantize(Decimal("0.01")):
                raise ExchangeError(10001, "params error: leverage invalid")
        wanted = {0: float(buy)} if not self.hedge else {1: float(buy), 2: float(sell)}
        if all(self.positions[i].leverage == lev for i, lev in wanted.items()):
            raise ExchangeError(110043, "Set leverage not modified")
        for i, lev in wanted.items():
            self.positions[i].leverage = lev
            self._emit_position(self.positions[i])
        self.default_leverage = float(buy)
        return {}

    def switch_mode(self, p: dict) -> dict:
        """/v5/position/switch-mode: 0 one-way, 3 hedge; refused with open positions or orders."""
        self._check_symbol(p)
        mode = _int(p, "mode", -1)
        if mode not in (0, 3):
            raise ExchangeError(10001, "params error: mode invalid")
        if (mode == 3) == self.hedge:
            raise ExchangeError(110025, "Position mode is not modified")
        if any(pos.size for pos in self.positions.values()):
            raise ExchangeError(110024, "You have an existing position, so position mode cannot be switched")
        if any(o.is_open for o in self.active.values()):
            raise ExchangeError(110028, "You have existing open orders, so position mode cannot be switched")
        lev = self.default_leverage
        self.hedge = mode == 3
        self.positions = ({1: Position(1, leverage=lev), 2: Position(2, leverage=lev)} if self.hedge
                          else {0: Position(0, leverage=lev)})
        return {}

    def trading_stop(self, p: dict) -> dict:
        """/v5/position/trading-stop: set/replace/cancel ('0') the position's TP and SL; 34040 if unchanged."""
        self._check_symbol(p)
        mode = p.get("tpslMode") or "Full"
        if mode not in ("Full", "Partial"):
            raise ExchangeError(10001, "params error: tpslMode invalid")
        idx = _int(p, "positionIdx", -1)
        if idx not in self.positions:
            raise ExchangeError(10001, "position idx not match position mode")
        pos = self.positions[idx]
        if pos.size == 0:
            raise ExchangeError(10001, "can not set tp/sl/ts for zero position")
        if p.get("trailingStop") not in (None, "", "0", 0):
            raise ExchangeError(10001, "params error: trailingStop is not supported by the paper exchange")
        changed = False
        for key, kind in (("takeProfit", "TakeProfit"), ("stopLoss", "StopLoss")):
            if p.get(key) in (None, ""):
                continue
            ticks = self._price_ticks(p, key) if _dec(p, key) != 0 else 0
            if mode == "Full":
                existing = self._full_tpsl(idx, kind)
                if (existing.trigger_price if existing else 0) == ticks:
                    continue
                changed = True
                if ticks:
                    self._check_tpsl_side(pos, kind, ticks)
                if existing is not None:
                    self._cancel(existing, "CancelByUser", status="Deactivated")
                if ticks:
                    self._new_tpsl(pos, kind, ticks, "Full", 0, "Market", 0,
                                   p.get("tpTriggerBy" if kind == "TakeProfit" else "slTriggerBy") or "LastPrice", "")
            elif ticks:
                size_key = "tpSize" if kind == "TakeProfit" else "slSize"
                lots = self._qty_lots({"qty": p.get(size_key)}) if p.get(size_key) else abs(pos.size)
                otype = p.get("tpOrderType" if kind == "TakeProfit" else "slOrderType") or "Market"
                limit = self._price_ticks(p, "tpLimitPrice" if kind == "TakeProfit" else "slLimitPrice") or 0
                self._check_tpsl_side(pos, kind, ticks)
                self._new_tpsl(pos, kind, ticks, "Partial", min(lots, abs(pos.size)), otype, limit,
                               p.get("tpTriggerBy" if kind == "TakeProfit" else "slTriggerBy") or "LastPrice", "")
                changed = True
        if not changed:
            raise ExchangeError(34040, "not modified")
        self._emit_position(pos)
        return {}

    def wallet_balance(self, p: dict) -> dict:
        """/v5/account/wallet-balance (UNIFIED, USDT)."""
        if (p.get("accountType") or "UNIFIED") != "UNIFIED":
            raise ExchangeError(10001, "accountType only support UNIFIED")
        return {"list": [self.wallet_record()]}

    def execution_list(self, p: dict) -> dict:
        """/v5/execution/list: fills newest first, filtered by order id / link id / time window. The window is
        at most 7 days (Bybit V5): none given -> the last 7 days; startTime alone -> [startTime, startTime + 7
        days]; endTime alone -> [endTime - 7 days, endTime]; both further apart -> 10001."""
        rows = list(self.executions)
        rows.reverse()
        oid, lid = p.get("orderId"), p.get("orderLinkId")
        if oid:
            rows = [e for e in rows if e.order_id == oid]
        if lid:
            rows = [e for e in rows if e.link_id == lid]
        if p.get("execType"):
            rows = [e for e in rows if e.exec_type == p["execType"]]
        start, end = self._seven_days(_int(p, "startTime", 0), _int(p, "endTime", 0))
        rows = [e for e in rows if start <= e.time <= end]
        out = self._page(p, [self.execution_record(e) for e in rows], min(max(_int(p, "limit", 50), 1), 100))
        out["category"] = "linear"
        return out

    def _seven_days(self, start: int, end: int) -> tuple[int, int]:
        """The [start, end] ms window of a 7-day-limited list query (see execution_list)."""
        if start and end:
            if end - start > SEVEN_DAYS_MS:
                raise ExchangeError(10001, "params error: the time range between startTime and endTime "
                                           "cannot exceed 7 days")
            return start, end
        if start:
            return start, start + SEVEN_DAYS_MS
        end = end or self.now_ms
        return end - SEVEN_DAYS_MS, end

    def closed_pnl_list(self, p: dict) -> dict:
        """/v5/position/closed-pnl: one row per closing order, newest first."""
        rows = sorted(self.closed_pnl.values(), key=lambda r: int(r["updatedTime"]), reverse=True)
        start, end = _int(p, "startTime", 0), _int(p, "endTime", 0)
        rows = [r for r in rows if (not start or int(r["updatedTime"]) >= start)
                and (not end or int(r["updatedTime"]) <= end)]
        out = self._page(p, rows, min(max(_int(p, "limit", 50), 1), 100))
        out["category"] = "linear"
        return out

    # ------------------------------------------------------------ validation helpers
    def _check_symbol(self, p: dict, need_symbol: bool = False) -> None:
        """category=linear is required; the symbol, when given (or required), must be the replayed one."""
        if p.get("category") != "linear":
            raise ExchangeError(10001, "params error: category only supports linear")
        if need_symbol and not p.get("symbol"):
            raise ExchangeError(10001, "params error: symbol is required")
        if p.get("symbol") and p.get("symbol") != self.inst.symbol:
            raise ExchangeError(10001, f"params error: symbol invalid (only {self.inst.symbol} is traded)")

    def _qty_lots(self, p: dict) -> int:
        qty = _dec(p, "qty", required=True)
        assert qty is not None
        lots = qty / self.inst.qty_step
        if qty <= 0 or lots != lots.to_integral_value():
            raise ExchangeError(10001, f"params error: qty {qty} is not a positive multiple of qtyStep "
                                       f"{self.inst.qty_step}")
        if qty < self.inst.min_qty:
            raise ExchangeError(10001, "The number of contracts exceeds minimum limit allowed")
        if qty > self.inst.max_qty:
            raise ExchangeError(10001, "The number of contracts exceeds maximum limit allowed")
        return int(lots)

    def _price_ticks(self, p: dict, key: str, required: bool = False) -> int:
        value = _dec(p, key, required)
        if value is None:
            return 0
        ticks = value / self.inst.tick_size
        if value <= 0 or ticks != ticks.to_integral_value():
            raise ExchangeError(10001, f"params error: {key} {value} is not a positive multiple of tickSize "
                                       f"{self.inst.tick_size}")
        return int(ticks)

    def _position_idx(self, p: dict) -> int:
        idx = _int(p, "positionIdx", 0)
        if (self.hedge and idx not in (1, 2)) or (not self.hedge and idx != 0):
            raise ExchangeError(10001, "position idx not match position mode")
        return idx

    def _check_notional(self, lots: int, ticks: int, reducing: bool) -> None:
        if reducing:
            return
        notional = Decimal(lots) * self.inst.qty_step * Decimal(ticks) * self.inst.tick_size
        if notional < self.inst.min_notional:
            raise ExchangeError(110094, f"Order does not meet minimum order value {self.inst.min_notional}USDT")

    def _check_trigger_side(self, order: Order) -> None:
        """110092/110093: a rising trigger must sit above the current price, a falling one below."""
        current = self.trigger_price(order.trigger_by)
        if not current:
            return
        ip = self.inst.price_str
        if order.trigger_direction == 1 and order.trigger_price <= current:
            raise ExchangeError(110092, f"expect Rising, but trigger_price[{ip(order.trigger_price)}] <= "
                                        f"current[{ip(current)}]")
        if order.trigger_direction == 2 and order.trigger_price >= current:
            raise ExchangeError(110093, f"expect Falling, but trigger_price[{ip(order.trigger_price)}] >= "
                                        f"current[{ip(current)}]")

    def _check_price_band(self, side: str, ticks: int) -> None:
        """110003 for a limit price beyond mark × (1 ± PRICE_LIMIT_RATIO) on the aggressive side."""
        mark = self.mark()
        if not mark:
            return
        if (side == "Buy" and self.inst.px(ticks) > mark * (1 + PRICE_LIMIT_RATIO) + 1e-9) or \
                (side == "Sell" and self.inst.px(ticks) < mark * (1 - PRICE_LIMIT_RATIO) - 1e-9):
            raise ExchangeError(110003, "Order price is out of permissible range")

    def _taker_ref(self, side: str) -> int:
        bid, ask = self.best()
        ref = ask if side == "Buy" else bid
        return ref or self.last_price

    def _opening_lots(self, order: Order, lots: int) -> int:
        """How much of a fill of `lots` would open or increase exposure (the rest reduces)."""
        pos = self.positions[order.position_idx]
        if self.hedge:
            opens = (order.position_idx == 1) == (order.side == "Buy")
            return lots if opens else 0
        if pos.size == 0 or (pos.size > 0) == (order.side == "Buy"):
            return lots
        return max(0, lots - abs(pos.size))

    def _check_margin(self, order: Order, ref_ticks: int) -> None:
        """110007 when the initial margin plus the taker fee of the opening part exceeds what is available."""
        opening = self._opening_lots(order, order.qty)
        if opening == 0:
            return
        lev = self.positions[order.position_idx].leverage
        notional = self.inst.qty(opening) * self.inst.px(ref_ticks)
        need = notional / lev + notional * self.taker_fee
        if need > self.available() + 1e-9:
            raise ExchangeError(110007, "ab not enough for new order")

    def _check_reduce_only(self, order: Order) -> None:
        """110017 when a reduce-only order has nothing to reduce on its side."""
        pos = self._reduce_target(order)
        if pos is None or pos.size == 0:
            raise ExchangeError(110017, "Reduce-only rule not satisfied")

    def _reduce_target(self, order: Order) -> Position | None:
        """The position a reduce-only order would shrink, if it is on the opposite side."""
        if self.hedge:
            pos = self.positions[order.position_idx]
            opens = (order.position_idx == 1) == (order.side == "Buy")
            return None if opens else pos
        pos = self.positions[0]
        if pos.size == 0 or (pos.size > 0) == (order.side == "Buy"):
            return None
        return pos

    def _find_open(self, p: dict) -> Order:
        oid, lid = p.get("orderId"), p.get("orderLinkId")
        if not oid and not lid:
            raise ExchangeError(10001, "params error: OrderId or orderLinkId is required")
        order = self._lookup(oid, lid)
        if order is None or not order.is_open:
            raise ExchangeError(110001, "Order does not exist")
        return order

    def _lookup(self, oid: str | None, lid: str | None) -> Order | None:
        if oid:
            return self.orders.get(oid)
        return self.orders.get(self.link_ids.get(lid or "", ""))

    @staticmethod
    def _page(p: dict, rows: list[dict], limit: int) -> dict:
        """Cursor pagination: the cursor is the offset of the next page."""
        try:
            start = int(p.get("cursor") or 0)
        except ValueError:
            raise ExchangeError(10001, "params error: cursor invalid") from None
        page = rows[start:start + limit]
        nxt = str(start + limit) if start + limit < len(rows) else ""
        return {"list": page, "nextPageCursor": nxt}

    def _slots(self) -> list[Position]:
        return [self.positions[i] for i in sorted(self.positions)]

    # ------------------------------------------------------------ TP/SL
    def _attach_tpsl(self, order: Order, p: dict) -> None:
        """Read takeProfit/stopLoss attached to an entry order (active once it fills)."""
        tp, sl = self._price_ticks(p, "takeProfit"), self._price_ticks(p, "stopLoss")
        if not (tp or sl):
            return
        if order.reduce_only:
            raise ExchangeError(10001, "params error: TP/SL cannot be set on a reduce-only order")
        mode = p.get("tpslMode") or "Full"
        if mode not in ("Full", "Partial"):
            raise ExchangeError(10001, "params error: tpslMode invalid")
        ref = order.price or self._taker_ref(order.side)
        if tp and (tp - ref) * order.sign <= 0:
            raise ExchangeError(10001, "params error: takeProfit must be on the profit side of the entry")
        if sl and (ref - sl) * order.sign <= 0:
            raise ExchangeError(10001, "params error: stopLoss must be on the loss side of the entry")
        order.take_profit, order.stop_loss, order.tpsl_mode = tp, sl, mode
        order.tp_trigger_by = p.get("tpTriggerBy") or "LastPrice"
        order.sl_trigger_by = p.get("slTriggerBy") or "LastPrice"
        order.tp_order_type = p.get("tpOrderType") or "Market"
        order.sl_order_type = p.get("slOrderType") or "Market"
        if mode == "Full" and (order.tp_order_type != "Market" or order.sl_order_type != "Market"):
            raise ExchangeError(10001, "params error: Full tpslMode requires Market tp/sl order types")
        order.tp_limit = self._price_ticks(p, "tpLimitPrice")
        order.sl_limit = self._price_ticks(p, "slLimitPrice")
        if (order.tp_order_type == "Limit" and not order.tp_limit) or (order.sl_order_type == "Limit" and not order.sl_limit):
            raise ExchangeError(10001, "params error: tpLimitPrice/slLimitPrice required for Limit tp/sl")

    def _check_tpsl_side(self, pos: Position, kind: str, ticks: int) -> None:
        """TP above / SL below the reference price for a long (mirrored for a short)."""
        ref = self.last_price or self.inst.to_ticks(pos.entry)
        long = pos.size > 0
        bad = (ticks <= ref) if (kind == "TakeProfit") == long else (ticks >= ref)
        if bad:
            raise ExchangeError(10001, f"params error: {kind} {self.inst.price_str(ticks)} is on the wrong side "
                                       f"of the last price {self.inst.price_str(ref)}")

    def _full_tpsl(self, idx: int, kind: str) -> Order | None:
        for o in self.active.values():
            if o.is_open and o.position_idx == idx and o.stop_order_type == kind and o.tpsl_mode == "Full":
                return o
        return None

    def _new_tpsl(self, pos: Position, kind: str, ticks: int, mode: str, lots: int, order_type: str,
                  limit: int, trigger_by: str, group: str) -> Order:
        """A conditional reduce-only close for a position (Full: whole size at trigger time)."""
        long = pos.size > 0
        rise = (kind == "TakeProfit") == long
        partial = mode == "Partial"
        stop_type = ("PartialTakeProfit" if kind == "TakeProfit" else "PartialStopLoss") if partial else kind
        order = Order(order_id=str(uuid.uuid4()), link_id="", side="Sell" if long else "Buy",
                      order_type=order_type, price=limit if order_type == "Limit" else 0, qty=lots,
                      tif="GTC" if order_type == "Limit" else "IOC", position_idx=pos.idx, reduce_only=True,
                      created=self.now_ms, updated=self.now_ms, status="Untriggered", close_on_trigger=True,
                      stop_order_type=stop_type, trigger_price=ticks, trigger_direction=1 if rise else 2,
                      trigger_by=trigger_by, tpsl_mode=mode, last_price_on_created=self.last_price,
                      create_type="CreateByTakeProfit" if kind == "TakeProfit" else "CreateByStopLoss",
                      oco_group=group)
        self.orders[order.order_id] = order
        self._emit_order(order)
        return order

    def _arm_tpsl(self, entry: Order, opened: int) -> None:
        """After an entry fill: Full mode sets the position TP/SL; Partial adds closes for the filled lots."""
        pos = self.positions[entry.position_idx]
        if entry.tpsl_mode == "Full":
            for kind, ticks in (("TakeProfit", entry.take_profit), ("StopLoss", entry.stop_loss)):
                existing = self._full_tpsl(pos.idx, kind)
                if ticks and (existing is None or existing.trigger_price != ticks):
                    if existing is not None:
                        self._cancel(existing, "CancelByUser", status="Deactivated")
                    trig = entry.tp_trigger_by if kind == "TakeProfit" else entry.sl_trigger_by
                    self._new_tpsl(pos, kind, ticks, "Full", 0, "Market", 0, trig, "")
            return
        group = f"{entry.order_id}:{entry.cum_qty}"
        if entry.take_profit:
            self._new_tpsl(pos, "TakeProfit", entry.take_profit, "Partial", opened, entry.tp_order_type,
                           entry.tp_limit, entry.tp_trigger_by, group)
        if entry.stop_loss:
            self._new_tpsl(pos, "StopLoss", entry.stop_loss, "Partial", opened, entry.sl_order_type,
                           entry.sl_limit, entry.sl_trigger_by, group)

    def _check_triggers(self) -> None:
        """Fire every conditional order whose trigger price was crossed."""
        for order in [o for o in self.active.values() if o.status == "Untriggered"]:
            if order.status != "Untriggered":
                continue
            ref = self.trigger_price(order.trigger_by)
            if not ref:
                continue
            if (order.trigger_direction == 1 and ref >= order.trigger_price) or \
               (order.trigger_direction == 2 and ref <= order.trigger_price):
                self._trigger(order)

    def _trigger(self, order: Order) -> None:
        """A conditional order becomes live; a TP/SL closes its position and cancels its partner."""
        if order.tpsl_mode:
            pos = self.positions[order.position_idx]
            if pos.size == 0:
                self._cancel(order, "CancelByTpSlTsClear", status="Deactivated")
                return
            order.qty = abs(pos.size) if order.tpsl_mode == "Full" else min(order.qty, abs(pos.size))
            for other in list(self.active.values()):
                if other is not order and other.status == "Untriggered" and other.tpsl_mode == order.tpsl_mode \
                        and other.position_idx == order.position_idx and order.oco_group == other.oco_group \
                        and (order.tpsl_mode == "Partial" or other.stop_order_type in ("TakeProfit", "StopLoss")):
                    self._cancel(other, "CancelByTpSlTsClear", status="Deactivated")
        order.status = "Triggered"
        order.updated = self.now_ms
        self._emit_order(order)
        if order.reduce_only:
            target = self._reduce_target(order)
            if target is None or target.size == 0:
                self._cancel(order, "CancelByReduceOnly")
                return
        else:
            try:
                self._check_margin(order, order.price or self._taker_ref(order.side))
            except ExchangeError:
                order.reject_reason = "EC_Others"  # Bybit documents no specific reason for this case
                self._cancel(order, "UNKNOWN", status="Rejected")
                return
        self._activate(order)

    # ------------------------------------------------------------ matching
    def _activate(self, order: Order) -> None:
        """A live order meets the book: PostOnly check, taking liquidity, then rest or cancel the rest."""
        if order.order_type == "Limit" and order.tif == "PostOnly":
            if self._crosses(order):
                order.reject_reason = "EC_PostOnlyWillTakeLiquidity"
                self._cancel(order, "UNKNOWN")
                return
            order.status = "New"
            self._emit_order(order)
            return
        if order.tif == "FOK" and self._takeable(order) < order.leaves:
            order.reject_reason = "EC_CancelForNoFullFill"
            self._cancel(order, "UNKNOWN")
            return
        order.status = "New"
        taken = self._match_aggressive(order)
        if order.is_open and (order.order_type == "Market" or order.tif in ("IOC", "FOK")):
            if order.cum_qty == 0:
                order.reject_reason = "EC_NoImmediateQtyToFill"
            self._cancel(order, "UNKNOWN")
        elif not taken and order.is_open:
            self._emit_order(order)

    def _crosses(self, order: Order) -> bool:
        """Would this limit order take liquidity from the book right now?"""
        bid, ask = self.best()
        return bool((order.side == "Buy" and ask and order.price >= ask) or
                    (order.side == "Sell" and bid and order.price <= bid))

    def _takeable(self, order: Order) -> int:
        total = 0.0
        for px, q in self.levels(order.side):
            if order.order_type == "Limit" and (px - order.price) * order.sign > 0:
                break
            total += q
        return self._lots(total)

    def _match_aggressive(self, order: Order) -> bool:
        """Take the opposite side level by level up to the limit price; True if anything filled."""
        filled = False
        for px, q in self.levels(order.side):
            if not order.is_open or order.leaves <= 0:
                break
            if order.order_type == "Limit" and (px - order.price) * order.sign > 0:
                break
            lots = min(order.leaves, self._lots(q))
            if lots > 0:
                self._fill(order, lots, px, False)
                filled = True
        return filled

    def _fill(self, order: Order, lots: int, ticks: int, is_maker: bool) -> None:
        """Execute `lots` of an order at `ticks`: position, fees, PnL, TP/SL arming, and the events."""
        if order.status not in ("New", "PartiallyFilled"):
            return
        lots = min(lots, order.leaves)
        if order.reduce_only:
            target = self._reduce_target(order)
            cap = abs(target.size) if target is not None else 0
            if cap == 0:
                self._cancel(order, "CancelByReduceOnly")
                return
            lots = min(lots, cap)
        if lots <= 0:
            return
        opened = self._opening_lots(order, lots)
        price = self.inst.px(ticks)
        qty = self.inst.qty(lots)
        rate = self.maker_fee if is_maker else self.taker_fee
        fee = price * qty * rate
        closed = lots - opened
        self._apply_position(order, lots, opened, closed, price, fee)
        self.wallet -= fee
        order.cum_qty += lots
        order.cum_value += price * qty
        order.cum_fee += fee
        order.updated = self.now_ms
        order.status = "Filled" if order.leaves == 0 else "PartiallyFilled"
        self.seq += 1
        exe = Execution(exec_id=str(uuid.uuid4()), order_id=order.order_id, link_id=order.link_id, side=order.side,
                        order_type=order.order_type, stop_order_type=order.stop_order_type,
                        order_price=order.price, order_qty=order.qty, leaves=order.leaves, price=ticks, qty=lots,
                        fee=fee, fee_rate=rate, is_maker=is_maker, time=self.now_ms, mark=self.mark(),
                        closed=closed, create_type=order.create_type, seq=self.seq)
        self.executions.append(exe)
        log.info("fill %s %s %s @ %s (%s, fee %s) %s", order.side, self.inst.qty_str(lots), self.inst.symbol,
                 self.inst.price_str(ticks), "maker" if is_maker else "taker", money(fee), order.link_id or order.order_id)
        if order.status == "Filled":
            self.closed_order.append(order.order_id)
        self.events.append(("execution", self.execution_record(exe, ws=True)))
        self._emit_order(order)
        if opened and (order.take_profit or order.stop_loss):
            self._arm_tpsl(order, opened)
        pos = self.positions[order.position_idx]
        if pos.size == 0:
            self._clear_tpsl(pos.idx)
        else:
            self._shrink_partials(pos)
        self._emit_position(pos)
        self.events.append(("wallet", self.wallet_record()))

    def _apply_position(self, order: Order, lots: int, opened: int, closed: int, price: float, fee: float) -> None:
        """Update the slot; closed PnL carries its share of the entry fee, while realised PnL books each fee
        when paid (as Bybit's closedPnl and cumRealisedPnl do)."""
        pos = self.positions[order.position_idx]
        direction = 1 if pos.size > 0 else -1
        realised = 0.0
        booked = -(fee * opened / lots)
        if closed:
            cq = self.inst.qty(closed)
            gross = (price - pos.entry) * cq * direction
            entry_fee_part = pos.entry_fees * closed / abs(pos.size)
            close_fee = fee * closed / lots
            realised = gross - entry_fee_part - close_fee
            booked += gross - close_fee
            self.wallet += gross
            pos.entry_fees -= entry_fee_part
            pos.size -= closed * direction
            self._record_closed(order, pos, cq, price, realised, gross)
            if pos.size == 0:
                pos.entry = 0.0
                pos.entry_fees = 0.0
        if opened:
            new = order.sign * opened
            total = abs(pos.size) + opened
            pos.entry = (pos.entry * abs(pos.size) + price * opened) / total
            pos.entry_fees += fee * opened / lots
            if pos.size == 0:
                pos.created = self.now_ms
                pos.cur_realised = 0.0
            pos.size += new
        pos.cur_realised += booked
        pos.cum_realised += booked
        self.cum_realised += booked
        pos.updated = self.now_ms
        self.seq += 1
        pos.seq = self.seq

    def _record_closed(self, order: Order, pos: Position, qty: float, price: float, pnl: float, gross: float) -> None:
        rec = self.closed_pnl.get(order.order_id)
        entry_value = pos.entry * qty
        if rec is None:
            rec = {"symbol": self.inst.symbol, "orderId": order.order_id, "side": order.side,
                   "qty": self.inst.qty_str(order.qty), "orderPrice": self.inst.price_str(order.price),
                   "orderType": order.order_type, "execType": "Trade", "closedSize": "0", "cumEntryValue": "0",
                   "avgEntryPrice": "0", "cumExitValue": "0", "avgExitPrice": "0", "closedPnl": "0",
                   "fillCount": "0", "leverage": money(pos.leverage), "createdTime": str(order.created),
                   "updatedTime": str(self.now_ms)}
            self.closed_pnl[order.order_id] = rec
        size = float(rec["closedSize"]) + qty
        entry_total = float(rec["cumEntryValue"]) + entry_value
        exit_total = float(rec["cumExitValue"]) + price * qty
        rec.update({"closedSize": self.inst.qty_str(self.inst.to_lots_floor(size + 1e-12)),
                    "cumEntryValue": money(entry_total), "avgEntryPrice": money(entry_total / size),
                    "cumExitValue": money(exit_total), "avgExitPrice": money(exit_total / size),
                    "closedPnl": money(float(rec["closedPnl"]) + pnl),
                    "fillCount": str(int(rec["fillCount"]) + 1), "updatedTime": str(self.now_ms)})

    def _clear_tpsl(self, idx: int) -> None:
        """A flat position deactivates its TP/SL orders and cancels the reduce-only orders resting on it."""
        for o in list(self.active.values()):
            if o.is_open and o.position_idx == idx and o.reduce_only:
                if o.tpsl_mode:
                    self._cancel(o, "CancelByTpSlTsClear", status="Deactivated")
                elif o.status != "Untriggered":
                    self._cancel(o, "CancelByReduceOnly")

    def _shrink_partials(self, pos: Position) -> None:
        """Partial TP/SL sizes never exceed what is left of the position."""
        for o in self.active.values():
            if o.status == "Untriggered" and o.position_idx == pos.idx and o.tpsl_mode == "Partial" \
                    and o.qty > abs(pos.size):
                o.qty = abs(pos.size)

    def _cancel(self, order: Order, cancel_type: str, status: str = "Cancelled") -> None:
        order.status = status
        order.cancel_type = cancel_type
        order.updated = self.now_ms
        self.closed_order.append(order.order_id)
        self._emit_order(order)

    # ------------------------------------------------------------ accounting
    def unrealised(self, mark: float | None = None) -> float:
        """Unrealised PnL of the open positions at `mark` (default: the mark price now)."""
        mark = self.mark() if mark is None else mark
        return sum((mark - pos.entry) * self.inst.qty(pos.size) for pos in self.positions.values() if pos.size)

    def position_im(self) -> float:
        mark = self.mark()
        return sum(self.inst.qty(abs(p.size)) * mark / p.leverage for p in self.positions.values() if p.size)

    def order_im(self) -> float:
        """Initial margin reserved by resting orders that would open exposure."""
        total = 0.0
        for o in self.active.values():
            if o.status in ("New", "PartiallyFilled") and not o.reduce_only:
                opening = self._opening_lots(o, o.leaves)
                if opening:
                    px = self.inst.px(o.price) if o.price else self.mark()
                    total += self.inst.qty(opening) * px / self.positions[o.position_idx].leverage
        return total

    def _settle_funding(self) -> None:
        """At 00:00/08:00/16:00 UTC every position pays (long, rate > 0) or receives funding on its value."""
        epoch = self.now_ms // FUNDING_INTERVAL_MS
        if self.funding_epoch < 0 or epoch == self.funding_epoch:
            self.funding_epoch = epoch
            return
        self.funding_epoch = epoch
        mark = self.mark()
        for pos in self._slots():
            if not pos.size or not self.funding_rate:
                continue
            fee = self.inst.qty(pos.size) * mark * self.funding_rate
            self.wallet -= fee
            pos.cum_realised -= fee
            pos.cur_realised -= fee
            self.cum_realised -= fee
            self.seq += 1
            self.executions.append(Execution(
                exec_id=str(uuid.uuid4()), order_id="", link_id="", side="Buy" if pos.size > 0 else "Sell",
                order_type="UNKNOWN", stop_order_type="UNKNOWN", order_price=0, order_qty=0, leaves=0,
                price=self.inst.to_ticks(mark), qty=abs(pos.size), fee=fee, fee_rate=self.funding_rate,
                is_maker=False, time=epoch * FUNDING_INTERVAL_MS, mark=mark, closed=0, create_type="",
                seq=self.seq, exec_type="Funding"))
            self.events.append(("execution", self.execution_record(self.executions[-1], ws=True)))
            self._emit_position(pos)
            self.events.append(("wallet", self.wallet_record()))

    def maintenance_margin(self, mark: float | None = None) -> float:
        mark = self.mark() if mark is None else mark
        return sum(self.inst.qty(abs(p.size)) * mark * MAINT_MARGIN_RATE for p in self.positions.values())

    def _check_liquidation(self) -> None:
        """Equity at or below maintenance margin: cancel every order and close every position at market.

        Cross margin, one flat maintenance rate; a loss beyond the wallet is absorbed (balance floors at 0,
        as Bybit's insurance fund does)."""
        if not any(p.size for p in self.positions.values()):
            return
        mark = self.mark()   # checked on every book message: the mark once, not once per term
        if self.wallet + self.unrealised(mark) > self.maintenance_margin(mark):
            return
        log.warning("liquidation at mark %.8g: equity %.8g <= maintenance margin %.8g", self.mark(), self.equity(),
                    self.maintenance_margin())
        for o in list(self.active.values()):
            self._cancel(o, "CancelAllBeforeLiq", status="Deactivated" if o.status == "Untriggered" else "Cancelled")
        for pos in self._slots():
            if pos.size:
                liq = Order(order_id=str(uuid.uuid4()), link_id="", side="Sell" if pos.size > 0 else "Buy",
                            order_type="Market", price=0, qty=abs(pos.size), tif="IOC", position_idx=pos.idx,
                            reduce_only=True, created=self.now_ms, updated=self.now_ms, close_on_trigger=True,
                            create_type="CreateByLiq", last_price_on_created=self.last_price)
                self.orders[liq.order_id] = liq
                self._activate(liq)
        if self.wallet < 0:
            self.wallet = 0.0
            self.events.append(("wallet", self.wallet_record()))

    def equity(self) -> float:
        return self.wallet + self.unrealised()

    def available(self) -> float:
        return self.equity() - self.position_im() - self.order_im()

    # ------------------------------------------------------------ records (wire shapes)
    def order_record(self, o: Order, ws: bool = False) -> dict:
        """An order as /v5/order/realtime prints it (ws=True adds the stream-only fields)."""
        ip, iq = self.inst.price_str, self.inst.qty_str
        avg = money(o.cum_value / self.inst.qty(o.cum_qty)) if o.cum_qty else ""
        leaves = o.leaves if o.is_open else 0
        leaves_px = o.price or self.last_price
        rec = {"orderId": o.order_id, "orderLinkId": o.link_id, "blockTradeId": "", "symbol": self.inst.symbol,
               "price": ip(o.price) if o.price else "0", "qty": iq(o.qty), "side": o.side, "isLeverage": "",
               "positionIdx": o.position_idx, "orderStatus": o.status, "cancelType": o.cancel_type,
               "rejectReason": o.reject_reason, "avgPrice": avg, "leavesQty": iq(leaves),
               "leavesValue": money(self.inst.qty(leaves) * self.inst.px(leaves_px)) if leaves_px else "0",
               "cumExecQty": iq(o.cum_qty), "cumExecValue": money(o.cum_value), "cumExecFee": money(o.cum_fee),
               "timeInForce": o.tif, "orderType": o.order_type, "stopOrderType": o.stop_order_type,
               "orderIv": "", "triggerPrice": ip(o.trigger_price) if o.trigger_price else "0",
               "takeProfit": ip(o.take_profit) if o.take_profit else "0",
               "stopLoss": ip(o.stop_loss) if o.stop_loss else "0",
               "tpTriggerBy": o.tp_trigger_by if o.take_profit else "",
               "slTriggerBy": o.sl_trigger_by if o.stop_loss else "",
               "triggerDirection": o.trigger_direction, "triggerBy": o.trigger_by,
               "lastPriceOnCreated": ip(o.last_price_on_created) if o.last_price_on_created else "",
               "reduceOnly": o.reduce_only, "closeOnTrigger": o.close_on_trigger, "smpType": "None",
               "smpGroup": 0, "smpOrderId": "", "tpslMode": o.tpsl_mode,
               "tpLimitPrice": ip(o.tp_limit) if o.tp_limit else "0",
               "slLimitPrice": ip(o.sl_limit) if o.sl_limit else "0", "placeType": "",
               "createdTime": str(o.created), "updatedTime": str(o.updated or o.created),
               "cumFeeDetail": {"USDT": money(o.cum_fee)} if o.cum_qty else {}}
        if ws:
            rec.update({"category": "linear", "feeCurrency": "USDT" if o.cum_qty else "",
                        "closedPnl": money(float(self.closed_pnl[o.order_id]["closedPnl"]))
                        if o.order_id in self.closed_pnl else "0"})
        return rec

    def execution_record(self, e: Execution, ws: bool = False) -> dict:
        rec = {"symbol": self.inst.symbol, "orderId": e.order_id, "orderLinkId": e.link_id, "side": e.side,
               "orderPrice": self.inst.price_str(e.order_price) if e.order_price else "0",
               "orderQty": self.inst.qty_str(e.order_qty), "leavesQty": self.inst.qty_str(e.leaves),
               "createType": e.create_type, "orderType": e.order_type, "stopOrderType": e.stop_order_type,
               "execFee": money(e.fee), "execId": e.exec_id, "execPrice": self.inst.price_str(e.price),
               "execQty": self.inst.qty_str(e.qty), "execType": e.exec_type,
               "execValue": money(self.inst.px(e.price) * self.inst.qty(e.qty)), "execTime": str(e.time),
               "feeCurrency": "USDT", "isMaker": e.is_maker, "feeRate": money(e.fee_rate), "tradeIv": "",
               "markIv": "", "markPrice": money(e.mark), "indexPrice": money(e.mark), "underlyingPrice": "",
               "blockTradeId": "", "closedSize": self.inst.qty_str(e.closed), "seq": e.seq, "extraFees": ""}
        if ws:
            rec.update({"category": "linear", "isLeverage": ""})
        return rec

    def position_record(self, pos: Position, ws: bool = False) -> dict:
        mark = self.mark()
        size = abs(pos.size)
        qty = self.inst.qty(size)
        value = qty * pos.entry
        upnl = (mark - pos.entry) * self.inst.qty(pos.size) if size else 0.0
        side = ("Buy" if pos.size > 0 else "Sell") if size else ""
        ip = self.inst.price_str
        tp = self._full_tpsl(pos.idx, "TakeProfit")
        sl = self._full_tpsl(pos.idx, "StopLoss")
        rec = {"positionIdx": pos.idx, "riskId": 1, "riskLimitValue": "2000000", "symbol": self.inst.symbol,
               "side": side, "size": self.inst.qty_str(size) if size else "0", "avgPrice": money(pos.entry),
               "positionValue": money(value), "tradeMode": 0, "positionStatus": "Normal", "autoAddMargin": 0,
               "adlRankIndicator": 2 if size else 0, "leverage": money(pos.leverage),
               "positionBalance": money(value / pos.leverage), "markPrice": money(mark), "liqPrice": "",
               "bustPrice": "", "positionMM": money(qty * mark * MAINT_MARGIN_RATE),
               "positionIM": money(qty * mark / pos.leverage), "tpslMode": "Full",
               "takeProfit": ip(tp.trigger_price) if tp else "0", "stopLoss": ip(sl.trigger_price) if sl else "0",
               "trailingStop": "0", "unrealisedPnl": money(upnl), "curRealisedPnl": money(pos.cur_realised),
               "cumRealisedPnl": money(pos.cum_realised), "seq": pos.seq, "isReduceOnly": False,
               "mmrSysUpdatedTime": "", "leverageSysUpdatedTime": "", "createdTime": str(pos.created),
               "updatedTime": str(pos.updated), "breakEvenPrice": money(pos.entry) if size else "0",
               "sessionAvgPrice": "0"}
        if ws:
            rec["entryPrice"] = rec.pop("avgPrice")
            rec["category"] = "linear"
        return rec

    def wallet_record(self) -> dict:
        upnl = self.unrealised()
        equity = self.wallet + upnl
        pos_im, ord_im = self.position_im(), self.order_im()
        mm = self.maintenance_margin()
        im = pos_im + ord_im
        avail = equity - im
        coin = {"coin": "USDT", "equity": money(equity), "usdValue": money(equity), "walletBalance": money(self.wallet),
                "availableToWithdraw": money(max(avail, 0.0)), "availableToBorrow": "", "borrowAmount": "0",
                "accruedInterest": "0", "totalOrderIM": money(ord_im), "totalPositionIM": money(pos_im),
                "totalPositionMM": money(mm), "unrealisedPnl": money(upnl), "cumRealisedPnl": money(self.cum_realised),
                "bonus": "0", "collateralSwitch": True, "marginCollateral": True, "locked": "0",
                "spotHedgingQty": "0"}
        return {"totalEquity": money(equity), "accountIMRate": money(im / equity) if equity > 0 else "0",
                "totalMarginBalance": money(equity), "totalInitialMargin": money(im), "accountType": "UNIFIED",
                "totalAvailableBalance": money(avail), "accountMMRate": money(mm / equity) if equity > 0 else "0",
                "totalPerpUPL": money(upnl), "totalWalletBalance": money(self.wallet), "accountLTV": "0",
                "totalMaintenanceMargin": money(mm), "coin": [coin]}

    def _emit_order(self, order: Order) -> None:
        """Every status change passes here: publish it and keep the open-order index in time priority."""
        if order.is_open:
            self.active.setdefault(order.order_id, order)
        else:
            self.active.pop(order.order_id, None)
        self.events.append(("order", self.order_record(order, ws=True)))

    def _emit_position(self, pos: Position) -> None:
        """Bybit pushes the position on fills and on every create/amend/cancel, changed or not."""
        self.events.append(("position", self.position_record(pos, ws=True)))

    def drain(self) -> list[tuple[str, dict]]:
        """Hand over the private-stream events produced since the last call."""
        out, self.events = self.events, []
        return out
