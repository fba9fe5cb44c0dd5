"""A local Bybit-V5-compatible exchange: matching engine, market replay, and an aiohttp REST + WS server.

The real `pybit` client talks to it unchanged (HTTP endpoint and WS URL overridden), so tests and paper
trading run the exact code paths the live bot uses, without the internet. Layers:

* `MatchingEngine` — pure and synchronous: accounts, orders, positions, fills, fees, TP/SL, conditional
  orders, instrument rules and Bybit error codes, driven by book/trade events. Prices and quantities are
  held as integer ticks and lots, so rounding never drifts.
* `MarketReplay` — feeds recorded or synthetic files (data contract) through `orderbook.OrderBook` into
  the engine on a controllable clock (`advance(seconds)`; speed 1x .. as fast as possible).
* `PaperExchange` — the aiohttp app: signed REST (`/v5/...`), public and private WS on one port, rate
  limits, and a fault-injection API (`faults` + `/__admin/...`) for tests.

Assumptions users should know: our own fills never consume the replayed liquidity (no market impact);
resting limits fill when a trade prints through their price (or, with fill_rule="touch", at it), up to
that trade's size, or when the opposite side of the book crosses them, up to the crossing depth; market
orders walk the visible book; the mark (and index) price is the book mid; funding is a flat 8-hourly rate
(StrategyConfig.funding_rate_8h, default 0); cross-margin liquidation at a flat 0.5% maintenance rate;
fees and fill rule come from StrategyConfig. Server time (`/v5/market/time`, signatures, rate limits) is
the wall clock; market data, orders and fills carry market time: the recorded times, or with
`--rebase-time` the data shifted (whole minutes) to start now. WS orderbook `u` counts per depth topic.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import heapq
import hmac
import json
import logging
import math
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field, replace
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from aiohttp import WSMsgType, web

from config import ConfigError, InstrumentConfig, VenueConfig, add_config_args, config_from_args

log = logging.getLogger("paper_exchange")

KLINE_INTERVALS: dict[str, int] = {"1": 60, "3": 180, "5": 300, "15": 900, "30": 1800, "60": 3600,
                                   "120": 7200, "240": 14400, "360": 21600, "720": 43200, "D": 86400}
BOOK_DEPTHS = (1, 50, 200, 1000)
MAX_LEVERAGE = 100.0
MAINT_MARGIN_RATE = 0.005
MAX_ACTIVE_ORDERS = 500
FUNDING_INTERVAL_MS = 8 * 3600 * 1000
PRICE_LIMIT_RATIO = 0.1
MAX_OUTBOX = 100_000
ORDER_LIMIT_PER_S = 10
DEFAULT_LIMIT_PER_S = 50
ORDER_PATHS = {"/v5/order/create", "/v5/order/amend", "/v5/order/cancel", "/v5/order/cancel-all",
               "/v5/position/set-leverage", "/v5/position/trading-stop"}


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

    @property
    def price_decimals(self) -> int:
        return max(0, -self.tick_size.normalize().as_tuple().exponent)

    @property
    def qty_decimals(self) -> int:
        return max(0, -self.qty_step.normalize().as_tuple().exponent)

    def price_str(self, ticks: int) -> str:
        """Ticks as Bybit prints prices: fixed decimals of the tick size."""
        return f"{Decimal(ticks) * self.tick_size:.{self.price_decimals}f}"

    def qty_str(self, lots: int) -> str:
        return f"{Decimal(lots) * self.qty_step:.{self.qty_decimals}f}"

    def px(self, ticks: int) -> float:
        return float(Decimal(ticks) * self.tick_size)

    def qty(self, lots: int) -> float:
        return float(Decimal(lots) * self.qty_step)

    def to_ticks(self, price: float) -> int:
        """Nearest tick of a float price from the replayed book or trades."""
        return int(round(price / float(self.tick_size)))

    def to_lots_floor(self, qty: float) -> int:
        return int(math.floor(qty / float(self.qty_step) + 1e-9))


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
        bid, ask = self.best()
        for order in self._resting():
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
        """/v5/execution/list: fills newest first, filtered by order id / link id / time window."""
        rows = list(self.executions)
        rows.reverse()
        oid, lid = p.get("orderId"), p.get("orderLinkId")
        if oid:
            rows = [e for e in rows if e.order_id == oid]
        if lid:
            rows = [e for e in rows if e.link_id == lid]
        if p.get("execType"):
            rows = [e for e in rows if e.exec_type == p["execType"]]
        start, end = _int(p, "startTime", 0), _int(p, "endTime", 0)
        if start:
            rows = [e for e in rows if e.time >= start]
        if end:
            rows = [e for e in rows if e.time <= end]
        out = self._page(p, [self.execution_record(e) for e in rows], min(max(_int(p, "limit", 50), 1), 100))
        out["category"] = "linear"
        return out

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
    def unrealised(self) -> float:
        mark = self.mark()
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

    def maintenance_margin(self) -> float:
        mark = self.mark()
        return sum(self.inst.qty(abs(p.size)) * mark * MAINT_MARGIN_RATE for p in self.positions.values())

    def _check_liquidation(self) -> None:
        """Equity at or below maintenance margin: cancel every order and close every position at market.

        Cross margin, one flat maintenance rate; a loss beyond the wallet is absorbed (balance floors at 0,
        as Bybit's insurance fund does)."""
        if not any(p.size for p in self.positions.values()) or self.equity() > self.maintenance_margin():
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


# ---------------------------------------------------------------- market replay
@dataclass
class TradePrint:
    """One replayed public trade."""
    ts_ms: int
    price: float
    size: float
    side: str
    trade_id: str


def trade_prints(chunks: Iterable[Any]) -> Iterator[TradePrint]:
    """Rows of data_loader.iter_trades chunks (timestamp s, side, size, price, trdMatchID) as TradePrints."""
    for chunk in chunks:
        ts = (chunk["timestamp"].to_numpy(dtype=float) * 1000.0).round().astype("int64")
        for t, side, size, price, tid in zip(ts, chunk["side"], chunk["size"], chunk["price"], chunk["trdMatchID"]):
            yield TradePrint(int(t), float(price), float(size), str(side), str(tid))


def _book_ts(msg: dict) -> int:
    return int(msg.get("ts") or msg.get("cts") or 0)


class MarketReplay:
    """Market time and data for the exchange: merges book messages and trades by time into the engine.

    `advance(seconds)` moves market time forward, applying every message up to it (tests run hours in
    seconds this way); it also keeps what the market-data endpoints serve: recent trades, 1-minute
    candles, 24h statistics, and the trades not yet pushed to `publicTrade` subscribers.
    `rebase_to_ms` shifts every timestamp by whole minutes so the data starts at that time (paper trading
    at 1x with a live engine that compares exchange times with its clock); by default times are as recorded.
    """

    def __init__(self, engine: MatchingEngine, book_messages: Iterable[dict], trades: Iterable[TradePrint],
                 book: Any = None, rebase_to_ms: int | None = None):
        if book is None:
            from orderbook import OrderBook
            book = OrderBook()
        self.engine = engine
        self.book = book
        self.now_ms = 0
        self.book_u = 0
        self.book_seq = 0
        self.book_ts = 0
        self.book_cts = 0
        self.recent: deque[TradePrint] = deque(maxlen=1000)
        self.unpushed: list[TradePrint] = []
        self.minutes: dict[int, list[float]] = {}
        self.exhausted = False
        self.book_updates = 0
        streams = (((_book_ts(m), 0, i, m) for i, m in enumerate(book_messages)),
                   ((t.ts_ms, 1, i, t) for i, t in enumerate(trades)))
        self._events = heapq.merge(*streams, key=lambda e: (e[0], e[1], e[2]))
        self._next: tuple | None = next(self._events, None)
        if self._next is None:
            raise ValueError("market replay has no book messages and no trades")
        first = self._next[0]
        self.offset_ms = 0 if rebase_to_ms is None else (rebase_to_ms - first) // 60000 * 60000
        self.now_ms = first + self.offset_ms
        self.start_ms = self.now_ms
        self._apply_until(self.now_ms)

    @classmethod
    def from_dir(cls, engine: MatchingEngine, data_dir: str | Path, rebase_to_ms: int | None = None) -> "MarketReplay":
        """Replay a data folder (Trade/ and Orderbook/) through the shared loader."""
        import data_loader
        return cls(engine, data_loader.iter_book_messages(data_dir), trade_prints(data_loader.iter_trades(data_dir)),
                   rebase_to_ms=rebase_to_ms)

    def advance(self, seconds: float) -> int:
        """Move market time forward by `seconds`, applying every message up to it; returns messages applied."""
        return self._apply_until(self.now_ms + int(round(seconds * 1000)))

    def _apply_until(self, target_ms: int) -> int:
        count = 0
        off = self.offset_ms
        while self._next is not None and self._next[0] + off <= target_ms:
            ts, kind, _, item = self._next
            ts += off
            self.engine.now_ms = max(self.engine.now_ms, ts)
            if kind == 0:
                if off:
                    item = {**item, "ts": ts, "cts": int(item.get("cts") or item["ts"]) + off}
                self._on_book(item, ts)
            else:
                self._on_trade(TradePrint(ts, item.price, item.size, item.side, item.trade_id) if off else item)
            count += 1
            self._next = next(self._events, None)
        if self._next is None and not self.exhausted:
            self.exhausted = True
            log.info("market replay reached the end of its data at %d", target_ms)
        self.now_ms = max(self.now_ms, target_ms)
        self.engine.now_ms = max(self.engine.now_ms, self.now_ms)
        return count

    def _on_book(self, msg: dict, ts: int) -> None:
        if self.book.apply_bybit(msg):
            data = msg["data"]
            self.book_u, self.book_seq = int(data["u"]), int(data.get("seq", 0))
            self.book_ts, self.book_cts = ts, int(msg.get("cts") or ts)
            self.book_updates += 1
            self.engine.on_book(self.book, ts)

    def _on_trade(self, t: TradePrint) -> None:
        self.recent.append(t)
        self.unpushed.append(t)
        minute = t.ts_ms // 60000 * 60000
        bar = self.minutes.get(minute)
        if bar is None:
            self.minutes[minute] = [t.price, t.price, t.price, t.price, t.size, t.price * t.size]
        else:
            bar[1] = max(bar[1], t.price)
            bar[2] = min(bar[2], t.price)
            bar[3] = t.price
            bar[4] += t.size
            bar[5] += t.price * t.size
        self.engine.on_trade(t.price, t.size, t.side, t.ts_ms)

    def candles(self, interval_s: int, start_ms: int = 0, end_ms: int = 0, limit: int = 200) -> list[list[float]]:
        """[start_ms, o, h, l, c, volume, turnover] newest first; empty intervals are flat at the last close."""
        if not self.minutes:
            return []
        step = interval_s * 1000
        first_min = min(self.minutes)
        hi_bucket = min(end_ms or self.now_ms, self.now_ms) // step * step
        lo_bucket = max(start_ms // step * step, first_min // step * step, hi_bucket - (limit - 1) * step)
        out: list[list[float]] = []
        prev_close = self._close_before(lo_bucket)
        for bucket in range(lo_bucket, hi_bucket + 1, step):
            bar = None
            for minute in range(bucket, bucket + step, 60000):
                mb = self.minutes.get(minute)
                if mb is None:
                    continue
                if bar is None:
                    bar = [float(bucket), mb[0], mb[1], mb[2], mb[3], mb[4], mb[5]]
                else:
                    bar[2] = max(bar[2], mb[1])
                    bar[3] = min(bar[3], mb[2])
                    bar[4] = mb[3]
                    bar[5] += mb[4]
                    bar[6] += mb[5]
            if bar is None:
                if prev_close is None:
                    continue
                bar = [float(bucket), prev_close, prev_close, prev_close, prev_close, 0.0, 0.0]
            prev_close = bar[4]
            out.append(bar)
        out.reverse()
        return out[:limit]

    def _close_before(self, ms: int) -> float | None:
        earlier = [m for m in self.minutes if m < ms]
        return self.minutes[max(earlier)][3] if earlier else None

    def stats_24h(self) -> dict[str, float]:
        """High, low, volume, turnover and reference prices over the last 24 h and 1 h of market time."""
        day_ago, hour_ago = self.now_ms - 86_400_000, self.now_ms - 3_600_000
        rows = [(m, b) for m, b in self.minutes.items() if m >= day_ago // 60000 * 60000]
        last = self.recent[-1].price if self.recent else 0.0
        if not rows:
            return {"high": last, "low": last, "volume": 0.0, "turnover": 0.0, "prev24h": last, "prev1h": last}
        rows.sort()
        hour = [b for m, b in rows if m >= hour_ago // 60000 * 60000]
        return {"high": max(b[1] for _, b in rows), "low": min(b[2] for _, b in rows),
                "volume": sum(b[4] for _, b in rows), "turnover": sum(b[5] for _, b in rows),
                "prev24h": rows[0][1][0], "prev1h": hour[0][0] if hour else last}

    def prune(self) -> None:
        """Keep at most ~8 days of 1-minute candles in memory."""
        horizon = self.now_ms - 8 * 86_400_000
        if self.minutes and min(self.minutes) < horizon:
            self.minutes = {m: b for m, b in self.minutes.items() if m >= horizon}


# ---------------------------------------------------------------- server
@dataclass
class Faults:
    """Injected faults; counters are consumed one request or push at a time (pushes: only those of
    `push_topic` when it is set). `mute_pushes` keeps connections open and answering pings but sends no
    data: the silent-stream case a client's staleness watchdog must catch."""
    http_5xx: int = 0
    http_status: int = 500
    rate_limit_burst: int = 0
    lose_acks: int = 0
    ack_delay_s: float = 0.0
    time_skew_ms: int = 0
    duplicate_pushes: int = 0
    reorder_pushes: int = 0
    push_topic: str = ""
    book_reset: bool = False
    mute_pushes: bool = False


@dataclass(eq=False)
class Conn:
    """One WS connection: its channel, auth state, and topics (pending ones wait for the subscribe ack)."""
    ws: web.WebSocketResponse
    request: web.Request
    private: bool
    conn_id: str = field(default_factory=lambda: uuid.uuid4().hex[:20])
    authed: bool = False
    topics: set[str] = field(default_factory=set)
    pending: set[str] = field(default_factory=set)
    outbox: asyncio.Queue = field(default_factory=asyncio.Queue)


@dataclass
class BookTopic:
    """Per-depth orderbook stream state: last levels sent and the update id."""
    depth: int
    u: int = 0
    bids: dict[str, str] = field(default_factory=dict)
    asks: dict[str, str] = field(default_factory=dict)


DEFAULT_PERMISSIONS: dict[str, list[str]] = {
    "ContractTrade": ["Order", "Position"], "Spot": [], "Wallet": [], "Options": [], "Derivatives": [],
    "CopyTrading": [], "BlockTrade": [], "Exchange": [], "NFT": [], "Affiliate": []}


def _envelope(result: Any, now_ms: int, code: int = 0, msg: str = "OK") -> dict:
    """Bybit's REST envelope (HTTP 200 even for business errors)."""
    return {"retCode": code, "retMsg": msg, "result": result if result is not None else {}, "retExtInfo": {},
            "time": now_ms}


class PaperExchange:
    """The aiohttp app (REST + WS on one 127.0.0.1 port) over a MatchingEngine and a MarketReplay."""

    def __init__(self, engine: MatchingEngine, replay: MarketReplay, api_key: str = "paper",
                 api_secret: str = "paper", speed: float = 0.0, tick_s: float = 0.05,
                 subscribe_delay_s: float = 0.05):
        self.engine = engine
        self.replay = replay
        self.inst = engine.inst
        self.api_key = api_key
        self.api_secret = api_secret
        self.speed = speed
        self.tick_s = tick_s
        self.subscribe_delay_s = subscribe_delay_s
        self.rate_window_s = 1.0
        self.faults = Faults()
        self.permissions: dict[str, list[str]] = json.loads(json.dumps(DEFAULT_PERMISSIONS))
        self.conns: set[Conn] = set()
        self.book_topics: dict[int, BookTopic] = {}
        self.ticker_sent: dict[str, str] = {}
        self.kline_sent: dict[str, tuple[int, str]] = {}
        self.held: dict[str, str] = {}
        self.hits: dict[tuple[str, str], deque[float]] = {}
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._task: asyncio.Task | None = None
        self.app = self._build_app()

    # ------------------------------------------------------------ lifecycle
    def _build_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v5/public/{channel}", self._ws_public)
        app.router.add_get("/v5/private", self._ws_private)
        app.router.add_route("*", "/__admin/{action}", self._admin)
        app.router.add_route("*", "/v5/{tail:.*}", self._rest)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Bind (127.0.0.1 only by default) and start the replay clock; returns the base URL."""
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        self.url = f"http://{host}:{self._runner.addresses[0][1]}"
        self._task = asyncio.get_running_loop().create_task(self._run_clock())
        return self.url

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for conn in list(self.conns):
            try:
                await asyncio.wait_for(conn.ws.close(), 1.0)
            except asyncio.TimeoutError:
                log.warning("WS client %s did not answer the close frame; dropping it", conn.conn_id)
        if self._runner is not None:
            await self._runner.cleanup()

    async def _run_clock(self) -> None:
        """Advance market time with the wall clock × speed (speed=inf: as fast as possible; 0: manual)."""
        loop = asyncio.get_running_loop()
        last = loop.time()
        while True:
            if math.isinf(self.speed):
                await asyncio.sleep(0)
                self.advance(5.0)
                if self.replay.exhausted:
                    await asyncio.sleep(self.tick_s)
                continue
            await asyncio.sleep(self.tick_s)
            now = loop.time()
            if self.speed > 0:
                self.advance((now - last) * self.speed)
            last = now

    def advance(self, seconds: float) -> None:
        """Move market time forward, pushing market data at most every market second while clients listen."""
        step = 1.0 if self.conns else seconds
        remaining = seconds
        while remaining > 1e-9:
            chunk = min(step, remaining)
            self.replay.advance(chunk)
            remaining -= chunk
            self.publish()
        self.replay.prune()

    def server_ms(self) -> int:
        """The exchange's wall clock, with any injected skew."""
        return int(time.time() * 1000) + self.faults.time_skew_ms

    # ------------------------------------------------------------ REST
    async def _rest(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        route = ROUTES.get(path)
        if route is None or route[0] != request.method:
            return web.Response(status=404, text="Not Found")
        method, handler_name, signed = route
        if self.faults.http_5xx > 0:
            self.faults.http_5xx -= 1
            return web.Response(status=self.faults.http_status, text="Internal Server Error")
        body = await request.read()
        headers: dict[str, str] = {}
        try:
            if signed:
                self._authenticate(request, body)
                headers = self._rate_limit(path)
            params = self._params(request, body)
            result = getattr(self, handler_name)(params)
            payload = _envelope(result, self.server_ms())
        except RateLimited as exc:
            payload = _envelope({}, self.server_ms(), exc.code, exc.msg)
            headers = self._limit_headers(path, 0, exc.reset_ms)
        except ExchangeError as exc:
            payload = _envelope({}, self.server_ms(), exc.code, exc.msg)
        self.publish()
        if path in ACK_PATHS:
            if self.faults.lose_acks > 0:
                self.faults.lose_acks -= 1
                log.info("fault: dropping the ack of %s", path)
                if request.transport is not None:
                    request.transport.abort()
                return web.Response(status=200)
            if self.faults.ack_delay_s > 0:
                await asyncio.sleep(self.faults.ack_delay_s)
        return web.json_response(payload, headers=headers, dumps=json.dumps)

    def _params(self, request: web.Request, body: bytes) -> dict:
        if request.method == "GET":
            return dict(request.query)
        if not body:
            return {}
        try:
            params = json.loads(body)
        except json.JSONDecodeError:
            raise ExchangeError(10001, "params error: request body is not JSON") from None
        if not isinstance(params, dict):
            raise ExchangeError(10001, "params error: request body must be a JSON object")
        return params

    def _authenticate(self, request: web.Request, body: bytes) -> None:
        """Bybit V5 HMAC: sign(ts + key + recv_window + raw query|body), and the timestamp window."""
        key = request.headers.get("X-BAPI-API-KEY", "")
        sign = request.headers.get("X-BAPI-SIGN", "")
        ts_text = request.headers.get("X-BAPI-TIMESTAMP", "")
        window_text = request.headers.get("X-BAPI-RECV-WINDOW", "5000")
        if not key or key != self.api_key:
            raise ExchangeError(10003, "API key is invalid.")
        try:
            ts, window = int(ts_text), int(window_text)
        except ValueError:
            raise ExchangeError(10001, "params error: X-BAPI-TIMESTAMP / X-BAPI-RECV-WINDOW invalid") from None
        now = self.server_ms()
        if not (now - window <= ts < now + 1000):
            raise ExchangeError(10002, "invalid request, please check your server timestamp or recv_window param. "
                                       f"req_timestamp[{ts}],server_timestamp[{now}],recv_window[{window}]")
        if request.method == "GET":
            payload = request.raw_path.partition("?")[2]
        else:
            payload = body.decode("utf-8", errors="replace")
        origin = f"{ts_text}{key}{window_text}{payload}"
        expected = hmac.new(self.api_secret.encode(), origin.encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, sign.lower()):
            raise ExchangeError(10004, f"error sign! origin_string[{origin}]")

    def _rate_limit(self, path: str) -> dict[str, str]:
        """Per-key, per-endpoint rolling limits per `rate_window_s` (Bybit: 1 s); an injected burst answers 10006."""
        limit = ORDER_LIMIT_PER_S if path in ORDER_PATHS else DEFAULT_LIMIT_PER_S
        now = time.time()
        hits = self.hits.setdefault((self.api_key, path), deque())
        while hits and hits[0] <= now - self.rate_window_s:
            hits.popleft()
        if self.faults.rate_limit_burst > 0:
            self.faults.rate_limit_burst -= 1
            raise RateLimited(self.server_ms() + 200)
        if len(hits) >= limit:
            reset = int((hits[0] + self.rate_window_s) * 1000) + self.faults.time_skew_ms + 1
            raise RateLimited(max(reset, self.server_ms() + 1))
        hits.append(now)
        reset = int((hits[0] + self.rate_window_s) * 1000) + self.faults.time_skew_ms
        return self._limit_headers(path, limit - len(hits), reset)

    def _limit_headers(self, path: str, remaining: int, reset_ms: int) -> dict[str, str]:
        limit = ORDER_LIMIT_PER_S if path in ORDER_PATHS else DEFAULT_LIMIT_PER_S
        return {"X-Bapi-Limit": str(limit), "X-Bapi-Limit-Status": str(max(remaining, 0)),
                "X-Bapi-Limit-Reset-Timestamp": str(reset_ms)}

    # ------------------------------------------------------------ REST handlers: market
    def h_time(self, p: dict) -> dict:
        now_ns = time.time_ns() + self.faults.time_skew_ms * 1_000_000
        return {"timeSecond": str(now_ns // 1_000_000_000), "timeNano": str(now_ns)}

    def _check_market(self, p: dict, need_symbol: bool = True) -> None:
        if (p.get("category") or "") != "linear":
            raise ExchangeError(10001, "params error: category only supports linear")
        if need_symbol and not p.get("symbol"):
            raise ExchangeError(10001, "params error: symbol is required")
        if p.get("symbol") and p["symbol"] != self.inst.symbol:
            raise ExchangeError(10001, "params error: symbol invalid")

    def h_instruments(self, p: dict) -> dict:
        self._check_market(p, need_symbol=False)
        i = self.inst
        item = {"symbol": i.symbol, "contractType": "LinearPerpetual", "status": "Trading",
                "baseCoin": i.symbol[:-4] if i.symbol.endswith("USDT") else i.symbol, "quoteCoin": "USDT",
                "launchTime": "0", "deliveryTime": "0", "deliveryFeeRate": "", "priceScale": str(i.price_decimals),
                "leverageFilter": {"minLeverage": "1", "maxLeverage": money(MAX_LEVERAGE), "leverageStep": "0.01"},
                "priceFilter": {"minPrice": str(i.tick_size), "maxPrice": str(i.tick_size * 10**9),
                                "tickSize": str(i.tick_size)},
                "lotSizeFilter": {"maxOrderQty": str(i.max_qty), "minOrderQty": str(i.min_qty),
                                  "qtyStep": str(i.qty_step), "postOnlyMaxOrderQty": str(i.max_qty),
                                  "maxMktOrderQty": str(i.max_mkt_qty), "minNotionalValue": str(i.min_notional)},
                "unifiedMarginTrade": True, "fundingInterval": 480, "settleCoin": "USDT", "copyTrading": "none",
                "upperFundingRate": "0.005", "lowerFundingRate": "-0.005", "isPreListing": False,
                "preListingInfo": None, "riskParameters": {"priceLimitRatioX": money(PRICE_LIMIT_RATIO),
                                                     "priceLimitRatioY": money(PRICE_LIMIT_RATIO)}}
        return {"category": "linear", "list": [item], "nextPageCursor": ""}

    def h_kline(self, p: dict) -> dict:
        self._check_market(p)
        interval = str(p.get("interval", ""))
        if interval not in KLINE_INTERVALS:
            raise ExchangeError(10001, f"params error: interval {interval!r} not supported "
                                       f"(one of {', '.join(KLINE_INTERVALS)})")
        limit = min(max(_int(p, "limit", 200), 1), 1000)
        rows = self.replay.candles(KLINE_INTERVALS[interval], _int(p, "start", 0), _int(p, "end", 0), limit)
        ip = self.inst.price_str
        to = self.inst.to_ticks
        out = [[str(int(r[0])), ip(to(r[1])), ip(to(r[2])), ip(to(r[3])), ip(to(r[4])),
                self.inst.qty_str(round(r[5] / float(self.inst.qty_step))), money(r[6])] for r in rows]
        return {"symbol": self.inst.symbol, "category": "linear", "list": out}

    def _levels_str(self, n: int) -> tuple[list[list[str]], list[list[str]]]:
        book = self.replay.book
        if not book.valid:
            return [], []
        bp, bq, ap, aq = book.top(n)
        ip, iq = self.inst.price_str, self.inst.qty_str
        to, lots = self.inst.to_ticks, self.inst.to_lots_floor
        return ([[ip(to(float(x))), iq(lots(float(q) + 1e-12))] for x, q in zip(bp, bq)],
                [[ip(to(float(x))), iq(lots(float(q) + 1e-12))] for x, q in zip(ap, aq)])

    def h_orderbook(self, p: dict) -> dict:
        self._check_market(p)
        limit = min(max(_int(p, "limit", 25), 1), 1000)
        bids, asks = self._levels_str(limit)
        r = self.replay
        return {"s": self.inst.symbol, "b": bids, "a": asks, "ts": r.book_ts, "u": r.book_u, "seq": r.book_seq,
                "cts": r.book_cts}

    def h_recent_trades(self, p: dict) -> dict:
        self._check_market(p)
        limit = min(max(_int(p, "limit", 500), 1), 1000)
        trades = list(self.replay.recent)[-limit:]
        trades.reverse()
        rows = [{"execId": t.trade_id, "symbol": self.inst.symbol, "price": self.inst.price_str(self.inst.to_ticks(t.price)),
                 "size": self.inst.qty_str(self.inst.to_lots_floor(t.size + 1e-12)), "side": t.side,
                 "time": str(t.ts_ms), "isBlockTrade": False, "isRPITrade": False, "seq": str(self.replay.book_seq)}
                for t in trades]
        return {"category": "linear", "list": rows}

    def _ticker(self) -> dict:
        bid, ask = self.engine.best()
        bp, bq, ap, aq = self.replay.book.top(1) if self.replay.book.valid else ([], [], [], [])
        ip = self.inst.price_str
        last = self.engine.last_price or self.inst.to_ticks(self.engine.mark() or 0.0)
        st = self.replay.stats_24h()
        prev24 = st["prev24h"] or self.inst.px(last)
        mark = self.engine.mark()
        return {"symbol": self.inst.symbol, "lastPrice": ip(last), "indexPrice": money(mark), "markPrice": money(mark),
                "prevPrice24h": money(prev24), "price24hPcnt": money((self.inst.px(last) / prev24 - 1) if prev24 else 0),
                "highPrice24h": money(st["high"]), "lowPrice24h": money(st["low"]), "prevPrice1h": money(st["prev1h"]),
                "openInterest": "0", "openInterestValue": "0", "turnover24h": money(st["turnover"]),
                "volume24h": money(st["volume"]), "fundingRate": money(self.engine.funding_rate),
                "nextFundingTime": str((self.replay.now_ms // FUNDING_INTERVAL_MS + 1) * FUNDING_INTERVAL_MS),
                "predictedDeliveryPrice": "", "basisRate": "", "deliveryFeeRate": "", "deliveryTime": "0",
                "ask1Size": self.inst.qty_str(self.inst.to_lots_floor(float(aq[0]) + 1e-12)) if len(aq) else "0",
                "bid1Price": ip(bid) if bid else "0",
                "ask1Price": ip(ask) if ask else "0",
                "bid1Size": self.inst.qty_str(self.inst.to_lots_floor(float(bq[0]) + 1e-12)) if len(bq) else "0",
                "basis": "", "tickDirection": "ZeroPlusTick"}

    def h_tickers(self, p: dict) -> dict:
        self._check_market(p, need_symbol=False)
        return {"category": "linear", "list": [self._ticker()]}

    # ------------------------------------------------------------ REST handlers: trading and account
    def h_create(self, p: dict) -> dict:
        return self.engine.place_order(p)

    def h_amend(self, p: dict) -> dict:
        return self.engine.amend_order(p)

    def h_cancel(self, p: dict) -> dict:
        return self.engine.cancel_order(p)

    def h_cancel_all(self, p: dict) -> dict:
        return self.engine.cancel_all(p)

    def h_realtime(self, p: dict) -> dict:
        return self.engine.open_orders(p)

    def h_history(self, p: dict) -> dict:
        return self.engine.order_history(p)

    def h_positions(self, p: dict) -> dict:
        return self.engine.position_list(p)

    def h_leverage(self, p: dict) -> dict:
        return self.engine.set_leverage(p)

    def h_switch_mode(self, p: dict) -> dict:
        return self.engine.switch_mode(p)

    def h_trading_stop(self, p: dict) -> dict:
        return self.engine.trading_stop(p)

    def h_wallet(self, p: dict) -> dict:
        return self.engine.wallet_balance(p)

    def h_executions(self, p: dict) -> dict:
        return self.engine.execution_list(p)

    def h_closed_pnl(self, p: dict) -> dict:
        return self.engine.closed_pnl_list(p)

    def h_fee_rate(self, p: dict) -> dict:
        return {"list": [{"symbol": self.inst.symbol, "takerFeeRate": money(self.engine.taker_fee),
                          "makerFeeRate": money(self.engine.maker_fee)}]}

    def h_query_api(self, p: dict) -> dict:
        """/v5/user/query-api: the key's permissions (a test can grant Withdraw to check a client refuses)."""
        read_only = 0 if self.permissions.get("ContractTrade") else 1
        return {"id": "1", "note": "paper", "apiKey": self.api_key, "readOnly": read_only, "secret": "",
                "permissions": self.permissions, "ips": ["*"], "type": 1, "deadlineDay": -1, "expiredAt": "",
                "createdAt": "", "unified": 0, "uta": 1, "userID": 1, "inviterID": 0, "vipLevel": "No VIP",
                "mktMakerLevel": "0", "affiliateID": 0, "rsaPublicKey": "", "isMaster": True,
                "parentUid": "0", "kycLevel": "LEVEL_DEFAULT", "kycRegion": ""}

    # ------------------------------------------------------------ WS
    async def _ws_public(self, request: web.Request) -> web.StreamResponse:
        if request.match_info["channel"] != "linear":
            return web.Response(status=404, text="only /v5/public/linear is served")
        return await self._ws(request, private=False)

    async def _ws_private(self, request: web.Request) -> web.StreamResponse:
        return await self._ws(request, private=True)

    async def _ws(self, request: web.Request, private: bool) -> web.StreamResponse:
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        conn = Conn(ws=ws, request=request, private=private)
        self.conns.add(conn)
        writer = asyncio.get_running_loop().create_task(self._writer(conn))
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                try:
                    frame = json.loads(msg.data)
                    if not isinstance(frame, dict):
                        raise ValueError("not an object")
                except ValueError:
                    self._send(conn, {"success": False, "ret_msg": "invalid JSON", "conn_id": conn.conn_id,
                                            "op": ""})
                    continue
                self._on_frame(conn, frame)
        finally:
            self.conns.discard(conn)
            writer.cancel()
        return ws

    async def _writer(self, conn: Conn) -> None:
        """The one task writing to a connection, so frames leave in exactly the order they were queued."""
        while True:
            text = await conn.outbox.get()
            if conn.ws.closed:
                return
            try:
                await conn.ws.send_str(text)
            except (ConnectionResetError, RuntimeError):
                self.conns.discard(conn)
                return

    def _send(self, conn: Conn, obj: dict | str) -> None:
        """Queue a frame; a client that falls too far behind is disconnected, as Bybit does."""
        if conn.outbox.qsize() >= MAX_OUTBOX:
            log.warning("WS client %s is %d frames behind: disconnecting it", conn.conn_id, MAX_OUTBOX)
            self.conns.discard(conn)
            if conn.request.transport is not None:
                conn.request.transport.abort()
            return
        conn.outbox.put_nowait(obj if isinstance(obj, str) else json.dumps(obj))

    def _on_frame(self, conn: Conn, frame: dict) -> None:
        op = frame.get("op")
        req_id = str(frame.get("req_id", ""))
        if op == "ping":
            if conn.private:
                self._send(conn, {"req_id": req_id, "op": "pong", "args": [str(self.server_ms())],
                                        "conn_id": conn.conn_id})
            else:
                self._send(conn, {"success": True, "ret_msg": "pong", "conn_id": conn.conn_id,
                                        "req_id": req_id, "op": "ping"})
        elif op == "auth" and conn.private:
            self._send(conn, self._auth_ws(conn, frame.get("args") or []))
        elif op in ("subscribe", "unsubscribe"):
            asyncio.get_running_loop().create_task(self._subscribe(conn, op, req_id, list(frame.get("args") or [])))
        else:
            self._send(conn, {"success": False, "ret_msg": f"error:handler not found,op:{op}",
                                    "conn_id": conn.conn_id, "req_id": req_id, "op": op or ""})

    def _auth_ws(self, conn: Conn, args: list) -> dict:
        """Private WS auth: args [key, expires_ms, hex hmac(secret, 'GET/realtime' + expires)]."""
        reply = {"success": False, "ret_msg": "", "op": "auth", "conn_id": conn.conn_id}
        if len(args) != 3:
            reply["ret_msg"] = "Params Error"
            return reply
        key, expires, sign = str(args[0]), str(args[1]), str(args[2])
        expected = hmac.new(self.api_secret.encode(), f"GET/realtime{expires}".encode(), hashlib.sha256).hexdigest()
        if key != self.api_key:
            reply["ret_msg"] = "Invalid apikey"
        elif not expires.isdigit() or int(expires) <= self.server_ms():
            reply["ret_msg"] = "Params Error"
        elif not hmac.compare_digest(expected, sign):
            reply["ret_msg"] = "Signature verification failed"
        else:
            conn.authed = True
            reply["success"] = True
        return reply

    def _valid_topic(self, conn: Conn, topic: str) -> bool:
        sym = self.inst.symbol
        if conn.private:
            return topic in ("order", "execution", "position", "wallet", "order.linear", "execution.linear",
                             "position.linear")
        parts = topic.split(".")
        if len(parts) == 3 and parts[0] == "orderbook":
            return parts[1].isdigit() and int(parts[1]) in BOOK_DEPTHS and parts[2] == sym
        if len(parts) == 3 and parts[0] == "kline":
            return parts[1] in KLINE_INTERVALS and parts[2] == sym
        return topic in (f"publicTrade.{sym}", f"tickers.{sym}")

    async def _subscribe(self, conn: Conn, op: str, req_id: str, topics: list[str]) -> None:
        """Ack after a delay (pybit stores its callback only after sending), then snapshots, then go live."""
        bad = [t for t in topics if not self._valid_topic(conn, t)]
        if op == "subscribe":
            if not bad and not (conn.private and not conn.authed):
                conn.pending.update(topics)
            await asyncio.sleep(self.subscribe_delay_s)
        ack: dict[str, Any] = {"success": not bad, "ret_msg": "", "conn_id": conn.conn_id, "req_id": req_id,
                               "op": op}
        if conn.private and not conn.authed:
            ack.update(success=False, ret_msg="Request not authorized")
        elif bad:
            ack["ret_msg"] = f"error:handler not found,topic:{','.join(bad)}"
        self._send(conn, ack)
        if not ack["success"]:
            return
        if op == "unsubscribe":
            conn.topics.difference_update(topics)
            return
        for topic in topics:
            first = self._first_push(topic)
            if first is not None:
                self._send(conn, first)
            conn.pending.discard(topic)
            conn.topics.add(topic)

    def _first_push(self, topic: str) -> dict | None:
        """What a new subscriber gets first: the orderbook snapshot (current u) or the full ticker."""
        if topic.startswith("orderbook."):
            state = self._book_topic(int(topic.split(".")[1]))
            return self._book_msg(topic, state, "snapshot", [[p, q] for p, q in state.bids.items()],
                                  [[p, q] for p, q in state.asks.items()])
        if topic.startswith("tickers."):
            ticker = self._ticker()
            return {"topic": topic, "type": "snapshot", "data": ticker, "cs": self.replay.book_seq,
                    "ts": self.replay.now_ms}
        return None

    def _book_topic(self, depth: int) -> BookTopic:
        state = self.book_topics.get(depth)
        if state is None:
            state = BookTopic(depth)
            bids, asks = self._levels_str(depth)
            state.bids, state.asks = dict((p, q) for p, q in bids), dict((p, q) for p, q in asks)
            state.u = 1
            self.book_topics[depth] = state
        return state

    def _book_msg(self, topic: str, state: BookTopic, kind: str, bids: list, asks: list) -> dict:
        return {"topic": topic, "type": kind, "ts": self.replay.book_ts or self.replay.now_ms,
                "data": {"s": self.inst.symbol, "b": bids, "a": asks, "u": state.u, "seq": self.replay.book_seq},
                "cts": self.replay.book_cts or self.replay.now_ms}

    # ------------------------------------------------------------ publishing
    def publish(self) -> None:
        """Push engine events and market data to subscribers (schedules sends; never blocks)."""
        events = self.engine.drain()
        trades, self.replay.unpushed = self.replay.unpushed, []
        if not self.conns or self.faults.mute_pushes:
            return
        frames: list[tuple[Conn, str]] = []
        for topic, record in events:
            for name in (topic, f"{topic}.linear"):  # echo the exact topic each client subscribed to
                listeners = [c for c in self.conns if c.private and c.authed and name in c.topics]
                if listeners:
                    msg = json.dumps({"id": uuid.uuid4().hex, "topic": name, "creationTime": self.engine.now_ms
                                      or self.server_ms(), "data": [record]})
                    for out in self._apply_push_faults(name, msg):
                        frames.extend((conn, out) for conn in listeners)
        for topic, msg in self._market_frames(trades):
            for out in self._apply_push_faults(topic, msg):
                for conn in self.conns:
                    if not conn.private and topic in conn.topics:
                        frames.append((conn, out))
        for conn, msg in frames:
            self._send(conn, msg)

    def _subscribed(self) -> set[str]:
        topics: set[str] = set()
        for conn in self.conns:
            if not conn.private:
                topics |= conn.topics | conn.pending
        return topics

    def _market_frames(self, trades: list[TradePrint]) -> list[tuple[str, str]]:
        """The public pushes due now: trades, book deltas per depth, tickers, candles."""
        subscribed = self._subscribed()
        out: list[tuple[str, str]] = []
        sym = self.inst.symbol
        topic = f"publicTrade.{sym}"
        if trades and topic in subscribed:
            for i in range(0, len(trades), 1024):
                rows = [{"T": t.ts_ms, "s": sym, "S": t.side, "v": self.inst.qty_str(self.inst.to_lots_floor(t.size + 1e-12)),
                         "p": self.inst.price_str(self.inst.to_ticks(t.price)), "L": "ZeroPlusTick", "i": t.trade_id,
                         "BT": False, "RPI": False, "seq": self.replay.book_seq} for t in trades[i:i + 1024]]
                out.append((topic, json.dumps({"topic": topic, "type": "snapshot", "ts": rows[-1]["T"], "data": rows})))
        reset = self.faults.book_reset
        self.faults.book_reset = False
        for depth in BOOK_DEPTHS:
            topic = f"orderbook.{depth}.{sym}"
            if topic in subscribed or depth in self.book_topics:
                msg = self._book_update(topic, depth, reset)
                if msg is not None:
                    out.append((topic, json.dumps(msg)))
        topic = f"tickers.{sym}"
        if topic in subscribed:
            ticker = self._ticker()
            key = json.dumps([ticker["lastPrice"], ticker["bid1Price"], ticker["ask1Price"], ticker["bid1Size"],
                              ticker["ask1Size"]])
            if self.ticker_sent.get(topic) != key:
                self.ticker_sent[topic] = key
                out.append((topic, json.dumps({"topic": topic, "type": "delta", "data": ticker,
                                               "cs": self.replay.book_seq, "ts": self.replay.now_ms})))
        for interval, secs in KLINE_INTERVALS.items():
            topic = f"kline.{interval}.{sym}"
            if topic in subscribed:
                out.extend((topic, m) for m in self._kline_frames(topic, interval, secs))
        return out

    def _book_update(self, topic: str, depth: int, reset: bool) -> dict | None:
        """The delta (depth 1: snapshot) between the last levels sent and the book now; u=1 on a reset."""
        state = self._book_topic(depth)
        bids, asks = self._levels_str(depth)
        new_b, new_a = dict((p, q) for p, q in bids), dict((p, q) for p, q in asks)
        if reset:
            state.u, state.bids, state.asks = 1, new_b, new_a
            return self._book_msg(topic, state, "snapshot", bids, asks)
        if depth == 1:
            if new_b == state.bids and new_a == state.asks:
                return None
            state.u += 1
            state.bids, state.asks = new_b, new_a
            return self._book_msg(topic, state, "snapshot", bids, asks)
        db = [[p, q] for p, q in new_b.items() if state.bids.get(p) != q] + \
             [[p, "0"] for p in state.bids if p not in new_b]
        da = [[p, q] for p, q in new_a.items() if state.asks.get(p) != q] + \
             [[p, "0"] for p in state.asks if p not in new_a]
        if not db and not da:
            return None
        state.u += 1
        state.bids, state.asks = new_b, new_a
        return self._book_msg(topic, state, "delta", db, da)

    def _kline_frames(self, topic: str, interval: str, secs: int) -> list[str]:
        """The current candle when it changed, and the closed one (confirm=true) when a new one starts."""
        rows = self.replay.candles(secs, limit=2)
        if not rows:
            return []
        ip, to = self.inst.price_str, self.inst.to_ticks
        step = secs * 1000

        def item(r: list[float], confirm: bool) -> dict:
            return {"start": int(r[0]), "end": int(r[0]) + step - 1, "interval": interval, "open": ip(to(r[1])),
                    "close": ip(to(r[4])), "high": ip(to(r[2])), "low": ip(to(r[3])),
                    "volume": self.inst.qty_str(round(r[5] / float(self.inst.qty_step))), "turnover": money(r[6]),
                    "confirm": confirm, "timestamp": self.replay.now_ms}

        current = rows[0]
        sent = self.kline_sent.get(topic)
        frames = []
        if sent is not None and sent[0] < int(current[0]) and len(rows) > 1 and int(rows[1][0]) == sent[0]:
            frames.append(item(rows[1], True))
        key = json.dumps(current)
        if sent is None or sent[1] != key:
            frames.append(item(current, False))
        self.kline_sent[topic] = (int(current[0]), key)
        return [json.dumps({"topic": topic, "data": [f], "ts": self.replay.now_ms, "type": "snapshot"})
                for f in frames]

    def _apply_push_faults(self, topic: str, msg: str) -> list[str]:
        """Duplicate a push, or hold one back and deliver it after the next (out of order)."""
        held = self.held.pop(topic, None)
        if self.faults.push_topic and topic != self.faults.push_topic:
            return [msg] + ([held] if held is not None else [])
        if self.faults.reorder_pushes > 0 and held is None:
            self.faults.reorder_pushes -= 1
            self.held[topic] = msg
            return []
        frames = [msg] + ([held] if held is not None else [])
        if self.faults.duplicate_pushes > 0:
            self.faults.duplicate_pushes -= 1
            frames.insert(1, msg)
        return frames

    async def drop_ws(self, channel: str = "all", how: str = "abort") -> int:
        """Fault: kill WS connections ('public'|'private'|'all'), by TCP abort or a clean close frame."""
        victims = [c for c in self.conns if channel == "all" or c.private == (channel == "private")]
        for conn in victims:
            self.conns.discard(conn)
            if how == "abort":
                transport = conn.request.transport
                if transport is not None:
                    transport.abort()
            else:
                await conn.ws.close(code=1000)
        return len(victims)

    # ------------------------------------------------------------ admin
    async def _admin(self, request: web.Request) -> web.StreamResponse:
        """Test control on the same port: advance, fault, drop_ws, permissions, state."""
        action = request.match_info["action"]
        try:
            body = await request.json() if request.can_read_body else {}
        except ValueError:
            return web.json_response({"error": "body must be JSON"}, status=400)
        if action == "advance":
            self.advance(float(body.get("seconds", 0)))
        elif action == "fault":
            for key, value in body.items():
                if not hasattr(self.faults, key):
                    return web.json_response({"error": f"unknown fault {key!r}"}, status=400)
                setattr(self.faults, key, type(getattr(self.faults, key))(value))
        elif action == "drop_ws":
            await self.drop_ws(body.get("channel", "all"), body.get("how", "abort"))
        elif action == "permissions":
            self.permissions.update(body)
        elif action != "state":
            return web.json_response({"error": f"unknown action {action!r}"}, status=404)
        return web.json_response(self.state())

    def state(self) -> dict:
        """A summary for tests and operators."""
        return {"market_ms": self.replay.now_ms, "exhausted": self.replay.exhausted,
                "equity": self.engine.equity(), "wallet": self.engine.wallet,
                "open_orders": sum(o.is_open for o in self.engine.orders.values()),
                "positions": {i: self.inst.qty(p.size) for i, p in self.engine.positions.items()},
                "connections": len(self.conns)}


ROUTES: dict[str, tuple[str, str, bool]] = {
    "/v5/market/time": ("GET", "h_time", False),
    "/v5/market/instruments-info": ("GET", "h_instruments", False),
    "/v5/market/kline": ("GET", "h_kline", False),
    "/v5/market/orderbook": ("GET", "h_orderbook", False),
    "/v5/market/recent-trade": ("GET", "h_recent_trades", False),
    "/v5/market/tickers": ("GET", "h_tickers", False),
    "/v5/order/create": ("POST", "h_create", True),
    "/v5/order/amend": ("POST", "h_amend", True),
    "/v5/order/cancel": ("POST", "h_cancel", True),
    "/v5/order/cancel-all": ("POST", "h_cancel_all", True),
    "/v5/order/realtime": ("GET", "h_realtime", True),
    "/v5/order/history": ("GET", "h_history", True),
    "/v5/position/list": ("GET", "h_positions", True),
    "/v5/position/set-leverage": ("POST", "h_leverage", True),
    "/v5/position/switch-mode": ("POST", "h_switch_mode", True),
    "/v5/position/trading-stop": ("POST", "h_trading_stop", True),
    "/v5/position/closed-pnl": ("GET", "h_closed_pnl", True),
    "/v5/account/wallet-balance": ("GET", "h_wallet", True),
    "/v5/account/fee-rate": ("GET", "h_fee_rate", True),
    "/v5/execution/list": ("GET", "h_executions", True),
    "/v5/user/query-api": ("GET", "h_query_api", True),
}
ACK_PATHS = {"/v5/order/create", "/v5/order/amend", "/v5/order/cancel", "/v5/order/cancel-all"}


# ---------------------------------------------------------------- running
def build_exchange(data_dir: str | Path, balance: float = 10000.0, speed: float = 0.0, api_key: str = "paper",
                   api_secret: str = "paper", symbol: str | None = None, venue: VenueConfig | None = None,
                   leverage: float = 10.0, rebase_time: bool = False) -> PaperExchange:
    """An exchange replaying a data folder, with the instrument rules and fees of the config
    (rebase_time: shift the data so it starts now, see MarketReplay)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data folder {data_dir} does not exist")
    costs = venue or VenueConfig()
    sym = symbol or data_dir.name.split("_")[0]
    inst = load_instrument(data_dir, sym)
    engine = MatchingEngine(inst, balance=balance, maker_fee=costs.maker_fee, taker_fee=costs.taker_fee,
                            fill_rule=costs.fill_rule, leverage=leverage, funding_rate=costs.funding_rate_8h)
    replay = MarketReplay.from_dir(engine, data_dir, int(time.time() * 1000) if rebase_time else None)
    return PaperExchange(engine, replay, api_key=api_key, api_secret=api_secret, speed=speed)


class ExchangeThread:
    """Run a PaperExchange on its own event loop in a background thread (sync callers such as pybit tests)."""

    def __init__(self, exchange: PaperExchange, host: str = "127.0.0.1", port: int = 0):
        self.exchange = exchange
        self.host, self.port = host, port
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="paper-exchange", daemon=True)
        self.url = ""

    def __enter__(self) -> "ExchangeThread":
        self.thread.start()
        self.url = asyncio.run_coroutine_threadsafe(self.exchange.start(self.host, self.port), self.loop).result(10)
        return self

    def __exit__(self, *exc: Any) -> None:
        asyncio.run_coroutine_threadsafe(self.exchange.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    @property
    def ws_public(self) -> str:
        """pybit PUBLIC_WSS template for this server."""
        return self.url.replace("http://", "ws://") + "/v5/public/{CHANNEL_TYPE}"

    @property
    def ws_private(self) -> str:
        return self.url.replace("http://", "ws://") + "/v5/private"

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run fn(*args) on the exchange's loop (coroutine functions are awaited) and return its result."""
        async def run() -> Any:
            result = fn(*args)
            return await result if asyncio.iscoroutine(result) else result
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(60)

    def advance(self, seconds: float) -> None:
        self.call(self.exchange.advance, seconds)


def _speed(text: str) -> float:
    if text.lower() in ("max", "inf", "fast"):
        return math.inf
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError("speed must be >= 0 (0 = manual clock, 'max' = as fast as possible)")
    return value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Local Bybit-V5-compatible paper exchange (REST + WS, 127.0.0.1).")
    add_config_args(parser, ["--data-dir"])
    parser.add_argument("--port", type=int, default=8765, help="port on 127.0.0.1 (0 = any free port)")
    parser.add_argument("--speed", type=_speed, default=1.0,
                        help="market seconds per wall second; 'max' = as fast as possible; 0 = frozen")
    parser.add_argument("--balance", type=float, default=10000.0, help="starting USDT wallet balance")
    parser.add_argument("--api-key", default="paper", help="the API key the exchange accepts")
    parser.add_argument("--api-secret", default="paper", help="the API secret the exchange accepts")
    parser.add_argument("--symbol", default=None, help="symbol (default: from instrument.json or the folder name)")
    parser.add_argument("--leverage", type=float, default=10.0, help="initial leverage")
    parser.add_argument("--rebase-time", action="store_true",
                        help="shift market timestamps (whole minutes) so the data starts now; use with --speed 1")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = config_from_args(args)
        exchange = build_exchange(cfg.data.data_dir, balance=args.balance, speed=args.speed, api_key=args.api_key,
                                  api_secret=args.api_secret, symbol=args.symbol, venue=cfg.venue,
                                  leverage=args.leverage, rebase_time=args.rebase_time)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        parser.error(str(exc))

    async def serve() -> None:
        url = await exchange.start("127.0.0.1", args.port)
        print(f"paper exchange listening on {url} (WS {url.replace('http', 'ws')}/v5/public/linear, "
              f"/v5/private)", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await exchange.stop()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
