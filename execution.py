"""The order lifecycle (DESIGN.md §1-§2): intents -> order requests, exchange events -> state. No I/O.

One lifecycle for every engine: the backtest core (`backtest.simulate_core`) follows it in compiled form,
the dry-run/paper/live engines drive this class, and tests/test_execution.py proves that this class plus
`strategy.decide`, fed the core's own fills bar by bar, reproduces the core's intents and trades exactly.
No clock is read and nothing is sent here: times arrive in events, requests are returned to the caller.

Lifecycle (the same as the core's):
  * `on_bar_close(bar, gate)` marks equity at the bar's close from this object's OWN fills (cash +
    unrealised PnL, the number the core sizes with, not the wallet's mark-price equity), runs
    `strategy.decide` on its own positions, resting entries and `DayState`, and turns the intents into
    `OrderRequest`s that act from the next bar: a PostOnly entry (the exchange rejects it if it would
    cross), a market entry, a reduce-only market exit (time / kill-switch) which also cancels the
    position's own TP and SL, and cancels of resting entries (expired, superseded, kill-switch).
  * Every entry carries its own exchange-side stop from creation (`stop_loss`: the entry's reference
    price ∓ SL distance, rounded towards it; with Bybit tpslMode=Partial), so a fill is never unprotected.
    The reference price is the limit price (a maker entry's fill) or the decision close (a market entry):
    strategy.py's stop rule, which the core applies too, so the attached stop is never at another level
    than the position's. When the entry has filled, the follow-ups are the position's own take-profit (a
    reduce-only GTC limit = a maker order, `grid.snap_round(fill ± distance, tick, side)`: from the FILL
    price, rounded away from it) and stop (a reduce-only conditional market order, kind "sl", `price` =
    its trigger = the attached stop's level, for the whole position). When a TP, SL or exit fill closes a
    position, the sibling is cancelled.
  * `on_event(ExecEvent)` applies what the exchange reports. Impossible or stale events are reported in
    `EventResult.status` and never applied twice or backwards: "unknown" (link id we never sent, or
    a funding event for a leg we do not hold), "duplicate" (exec id already applied, or the same status
    again), "stale" (older than the order's last update, or a status behind the current one, e.g.
    accepted after filled), "invalid" (fill larger than the order or the position, non-positive qty or
    price, unknown event type).

Refinements of /work/coord/EXECUTION_CONTRACT.md (names kept):
  * `OrderRequest.order_link_id` is the wire id itself (already hashed). `OrderRequest` adds `intent_key`
    (what `order_link_id` hashes: pass it as `intent=` to `exchange_client.ExchangeClient.place_order`,
    which derives the same orderLinkId). For kind "sl", `price` is the stop's trigger price.
  * orderLinkIds: `order_link_id(key)` = "ps-" + 32 hex (35 chars, Bybit allows 36); keys are
    "<SYM>|<bar open epoch s>|entry|<Buy/Sell>" for entries and "<entry key>|tp", "|sl",
    "|exit|<bar open epoch s>" (or "|exit|stop_refused", exit_position) for a position's orders, so a resend
    (after a lost ack or a restart from the state file) is the same order. An exit or a stop put back after
    an exit that was settled cancelled/rejected (a known outcome) is a new order: its key adds "|<attempt>"
    ("|sl|<n>" for the stop), so no two of a position's orders ever share an orderLinkId. `order_link_id` and `is_own_order` live here (the lifecycle names
    its orders); `exchange_client` imports them.
  * `ExecEvent` adds `side` (funding events: the leg "Buy" = long, "Sell" = short) and the types
    "triggered" (a stop triggered; its fill follows) and "funding" (`fee` = amount paid by the leg,
    shared by the leg's positions in proportion to their qty). Fills of a partially filled order are
    applied one by one; an entry's TP and SL follow-ups are issued when the entry is done (filled, or
    cancelled/expired after a partial fill). A fill reported for an order already cancelled counts
    when its time is not after the cancellation (it happened first), otherwise it is "stale".
  * `Execution.last_intents`: the intents of the last `on_bar_close` (exit `ref` = the position's slot;
    slots are kept like the core's: a new position takes the first free one), for signals_<SYM>.jsonl.
  * Bar.index should count bars on the epoch grid (bar open time // timeframe) so ages survive restarts.
  * What decide sees between a request and its answer: a PostOnly entry counts as resting from the moment
    it is requested; an entry with a cancel requested no longer does; a market entry counts once it fills
    (the core fills it at the next open); an exit already under way is not requested again; an exit that
    ended without closing its position is re-attempted at the next close (even when decide does not ask
    again, as on a halted day), and until it fills the position has its stop back (_exit_failed_requests).
  * Journal records (`EventResult.journal`, `placed_record`): DESIGN §3 trades_<SYM>.jsonl fields
    `ts` (ms), `symbol`, `event`, `order_link_id`, `side`, `kind`, `price`, `qty`, `fee`, `pnl` (exit fills:
    net of both fees and funding, as backtest trades), `position_id`, `reason`; the engine adds `mode`
    and the ISO time. Entry fills add `tp`/`sl` once known.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from dataclasses import dataclass, field

import grid
import strategy as st
from config import GlobalConfig

LINK_ID_PREFIX = "ps-"
STATE_VERSION = 1
SIDE_NAME = {st.LONG: "Buy", st.SHORT: "Sell"}
SIDE_OF = {"Buy": st.LONG, "Sell": st.SHORT}
EVENT_TYPES = ("accepted", "rejected", "fill", "cancelled", "expired", "triggered", "funding")
TERMINAL = ("filled", "cancelled", "rejected", "expired")
STATUS_RANK = {"pending": 0, "accepted": 1, "triggered": 2, "partially_filled": 3,
               "filled": 4, "cancelled": 4, "rejected": 4, "expired": 4}
QTY_TOL = 1e-9          # relative tolerance of "the whole order / position" in quantity comparisons
EXIT_EVENT = {"time": "time_exit", "kill_switch": "kill_exit", "stop_refused": "sl"}
EXIT_FAILED = ("cancelled", "rejected", "expired")   # an exit settled without closing its position: known outcome
PRUNE_BARS = 10         # settled orders of closed positions are kept this many bars after they settled. The state
                        # file is written on every batch of events, so its size is the engine's cost per event (at
                        # 60 bars a busy engine wrote 95 KB twice a bar). A late event for a pruned order is
                        # reported "unknown", never applied; a position's orders stay while it is open;
                        # reconciliation settles the rest


def order_link_id(intent: str) -> str:
    """Deterministic orderLinkId for an intent key: the same intent always maps to the same id (≤36 chars)."""
    if not intent:
        raise ValueError("an order intent key is required (it makes retries idempotent)")
    return LINK_ID_PREFIX + hashlib.blake2b(intent.encode("utf-8"), digest_size=16).hexdigest()


def is_own_order(link_id: str | None) -> bool:
    """Whether an order was placed by this system (its orderLinkId carries our prefix)."""
    return bool(link_id) and str(link_id).startswith(LINK_ID_PREFIX)


# ---------------------------------------------------------------- records
@dataclass
class OrderRequest:
    """What the engine sends: create or cancel one order (prices on the tick grid, qty on the step)."""
    action: str                # "create" | "cancel"
    order_link_id: str
    kind: str                  # "entry" | "tp" | "sl" | "exit"
    side: str                  # "Buy" | "Sell": the exchange side of THIS order
    order_type: str            # "Limit" | "Market"
    qty: float
    price: float | None        # Limit price; kind "sl": the stop's trigger; None for other Market orders
    time_in_force: str         # "PostOnly" | "GTC" | "IOC"
    reduce_only: bool
    position_idx: int          # hedge mode: 1 = long leg, 2 = short leg
    stop_loss: float | None    # entries: the exchange-side stop attached on create (tpslMode=Partial)
    position_id: str           # the position this order opens or closes
    reason: str                # strategy reason (chop, breakout, time, kill_switch, expired, ...)
    intent_key: str = ""       # what order_link_id hashes (ExchangeClient.place_order(intent=...))


@dataclass
class ExecEvent:
    """What the engine feeds back (from the WS/REST private streams or a matching engine)."""
    type: str                  # one of EVENT_TYPES
    order_link_id: str
    ts_ms: int                 # exchange time of the event
    exec_id: str = ""          # fills and funding: unique execution id (duplicates are dropped)
    qty: float = 0.0           # fills: this execution's qty
    price: float = 0.0         # fills: this execution's price
    fee: float = 0.0           # fills: fee paid (quote); funding: amount paid by the leg
    is_maker: bool = False
    reason: str = ""           # rejected/cancelled: the exchange's reason text
    side: str = ""             # funding: the leg, "Buy" (long) or "Sell" (short)


@dataclass
class EventResult:
    """The outcome of one event: applied or why not, follow-up requests, journal records."""
    status: str                # "applied" | "duplicate" | "stale" | "unknown" | "invalid"
    message: str
    requests: list[OrderRequest] = field(default_factory=list)
    journal: list[dict] = field(default_factory=list)


@dataclass
class Order:
    """An order this lifecycle asked for and what the exchange has said about it."""
    request: OrderRequest
    bar: int                   # index of the bar at whose close it was requested
    status: str = "pending"
    filled: float = 0.0
    ts_ms: int = -1            # exchange time of the last applied status event
    cancel_requested: bool = False
    tp_dist: float = math.nan  # entries: exit distances from the fill
    sl_dist: float = math.nan
    exec_ids: list[str] = field(default_factory=list)
    settled_bar: int | None = None   # index of the first bar close that saw it settled: pruning counts from it
    last_fill_ms: int = -1           # exchange time of its last applied fill


@dataclass
class Book:
    """An open position: its own TP and SL orders, its fill bar and costs so far."""
    position_id: str           # = the entry's orderLinkId
    entry_key: str
    side: int
    qty: float
    entry_price: float
    entry_fee: float
    fill_bar: int
    entry_ts_ms: int
    regime: str                # "maker" (PostOnly entry) | "taker" (market entry)
    opened_qty: float
    tp: float = math.nan
    sl: float = math.nan
    funding: float = 0.0
    tp_link: str = ""
    sl_link: str = ""
    exit_link: str = ""


def _leg(side: int) -> int:
    """Hedge-mode positionIdx of a position side: 1 long leg, 2 short leg."""
    return 1 if side == st.LONG else 2


# ---------------------------------------------------------------- the lifecycle
class Execution:
    """State `strategy.decide` reads and the order lifecycle around it, for one symbol (see module doc)."""

    def __init__(self, cfg: GlobalConfig, symbol: str):
        self.cfg = cfg
        self.symbol = symbol
        self.bar = -1                         # index of the last closed bar
        self.cash = cfg.venue.initial_equity
        self.last_equity = self.cash
        self.day = st.DayState()
        self.slots: list[Book | None] = [None] * cfg.strategy.max_positions
        self.orders: dict[str, Order] = {}
        self.seen_exec: dict[str, str] = {}    # exec id -> link id (or the funding leg)
        self.reread_from_ms: int | None = None   # the engine re-reads executions from here: see _prune
        self.last_intents: list[st.Intent] = []

    # ------------------------------------------------------------ what decide reads
    def mark(self, price: float) -> float:
        """Equity at `price`: cash from own fills plus unrealised PnL (summed in slot order, as the core)."""
        upnl = 0.0
        for p in self.slots:
            if p is not None:
                upnl += p.side * p.qty * (price - p.entry_price)
        return self.cash + upnl

    def equity(self) -> float:
        """Equity marked at the last bar close (what decide sized with)."""
        return self.last_equity

    def positions(self) -> list[st.Position]:
        """Open positions in slot order."""
        return [st.Position(p.side, p.qty, p.entry_price, p.tp, p.sl, p.fill_bar, p.regime)
                for p in self.slots if p is not None]

    def resting(self) -> list[st.RestingOrder]:
        """Resting PostOnly entries (sent, not done, no cancel requested)."""
        return [st.RestingOrder(SIDE_OF[o.request.side], o.request.price, o.request.qty - o.filled, o.bar,
                                o.tp_dist, o.sl_dist)
                for o in self._open_entries()]

    def pending(self) -> list[OrderRequest]:
        """Requests not yet settled: creates without an answer, cancels of orders still open."""
        out = [o.request for o in self.orders.values() if o.status == "pending"]
        out += [self._cancel_request(o, "resend") for o in self.orders.values()
                if o.cancel_requested and o.status not in TERMINAL]
        return out

    def _open_entries(self) -> list[Order]:
        return [o for o in self.orders.values()
                if o.request.kind == "entry" and o.request.order_type == "Limit" and o.status not in TERMINAL
                and not o.cancel_requested]

    # ------------------------------------------------------------ bar close
    def on_bar_close(self, bar: st.Bar, gate: st.EntryGate | None = None) -> list[OrderRequest]:
        """Mark at bar.close, decide with own state, and return the order requests that act from the next bar."""
        self.bar = bar.index
        self.last_equity = self.mark(bar.close)
        live = [k for k, p in enumerate(self.slots) if p is not None]
        intents = st.decide(bar, self.positions(), self.resting(), self.last_equity, self.day,
                            self.cfg.strategy, self.cfg.instrument, gate)
        self.last_intents = [dataclasses.replace(it, ref=live[it.ref]) if it.kind == "exit" else it
                             for it in intents]
        requests: list[OrderRequest] = []
        for it in self.last_intents:
            requests += self._requests_for(it, bar)
        for pos in [p for p in self.slots if p is not None and self._exit_failed(p)]:
            requests += self._exit(pos, self.orders[pos.exit_link].request.reason, str(int(bar.time)), bar.index)
        self._prune()
        return requests

    def check_kill(self, low: float, high: float, bar_index: int, bar_time: float) -> list[OrderRequest]:
        """The intrabar daily kill-switch (strategy.intrabar_kill) on prices traded in [low, high] since the
        last check, within the bar that opened at `bar_time` (epoch s; `bar_index` as Bar.index): when they
        reach the trigger of this object's own positions and cash (the equity the bar-close rule uses), the
        day is halted and every position gets a reduce-only market exit (reason kill_switch, cancelling its TP
        and SL) and every resting entry a cancel. Returns those requests ([] when nothing breached).
        The backtest core applies the same rule after a bar's fills, on its adverse extreme."""
        if not st.intrabar_kill(low, high, bar_time, self.positions(), self.cash, self.day, self.cfg.strategy):
            return []
        bar = st.Bar(index=bar_index, time=bar_time, close=math.nan, atr=math.nan)
        requests = []
        for pos in [p for p in self.slots if p is not None]:
            requests += self._exit(pos, "kill_switch", str(int(bar_time)), bar_index)
        return requests + [self._cancel(o, "kill_switch") for o in self._open_entries()]

    def _prune(self) -> None:
        """Forget orders settled PRUNE_BARS bars ago or more whose position is closed (late events for them are
        then reported as unknown), so the state file stays small. Counted from the settlement, not the request,
        and never while an event of the order lies at or after `reread_from_ms`, where the engine's next
        reconciliation starts re-reading executions (however long reconciliations kept failing): a forgotten
        fill read again would look new, and the exchange's attached stop, which has no orderLinkId, could be
        adopted for another open position of its leg."""
        live = {p.position_id for p in self.slots if p is not None}
        for link, order in list(self.orders.items()):
            if order.status not in TERMINAL:
                continue
            if order.settled_bar is None:
                order.settled_bar = self.bar
            reread = self.reread_from_ms is not None and max(order.ts_ms, order.last_fill_ms) >= self.reread_from_ms
            if order.settled_bar < self.bar - PRUNE_BARS and order.request.position_id not in live and not reread:
                del self.orders[link]
                for exec_id in order.exec_ids:
                    self.seen_exec.pop(exec_id, None)

    def _requests_for(self, it: st.Intent, bar: st.Bar) -> list[OrderRequest]:
        """One intent as order requests (registering the orders they create)."""
        if it.kind == "cancel":
            return [self._cancel(o, it.reason) for o in self._open_entries() if SIDE_OF[o.request.side] == it.side]
        if it.kind == "exit":
            return self._exit(self.slots[it.ref], it.reason, str(int(bar.time)), bar.index)
        return [self._entry(it, bar)]

    def _entry(self, it: st.Intent, bar: st.Bar) -> OrderRequest:
        tick = self.cfg.instrument.tick_size
        key = f"{self.symbol}|{int(bar.time)}|entry|{SIDE_NAME[it.side]}"
        link = order_link_id(key)
        limit = it.kind == "limit"
        ref_price = it.price if limit else bar.close
        req = OrderRequest(action="create", order_link_id=link, kind="entry", side=SIDE_NAME[it.side],
                           order_type="Limit" if limit else "Market", qty=it.qty, price=it.price if limit else None,
                           time_in_force="PostOnly" if limit else "IOC", reduce_only=False,
                           position_idx=_leg(it.side),
                           stop_loss=grid.snap_round(ref_price - it.side * it.sl_dist, tick, it.side),
                           position_id=link, reason=it.reason, intent_key=key)
        self.orders[link] = Order(req, bar.index, tp_dist=it.tp_dist, sl_dist=it.sl_dist)
        return req

    def exit_position(self, position_id: str, reason: str) -> list[OrderRequest]:
        """A reduce-only market exit of one own position outside the bar-close rules, through this lifecycle so
        its fill closes the position here like any exit (reason "stop_refused": the exchange refused the
        position's stop because price is already beyond it; journaled as "sl"). orderLinkId key
        "<entry key>|exit|<reason>" (+ "|<attempt>" on a re-attempt). [] for a position not held or whose
        exit is under way."""
        pos = self._position(position_id)
        return [] if pos is None else self._exit(pos, reason, reason, self.bar)

    def unprotected_first(self, side: int) -> list[Book]:
        """Own positions of one side (st.LONG/st.SHORT), those whose own stop does not stand (none yet, settled,
        or a cancel asked) first: the ones to close when a stop for part of that leg is refused."""
        def stands(pos: Book) -> bool:
            stop = self.orders.get(pos.sl_link)
            return stop is not None and stop.status not in TERMINAL and not stop.cancel_requested
        return sorted((p for p in self.slots if p is not None and p.side == side), key=stands)

    def adopt_attached_stop(self, order_id: str, side: str, trigger: float, qty: float, ts_ms: int) -> str | None:
        """The stop the exchange makes from an entry's attached stopLoss (tpslMode=Partial: a reduce-only
        conditional order with NO orderLinkId, stopOrderType PartialStopLoss, one per partial fill) as an order
        of the open position it protects, kind "sl" (key "<SYM>|attached|<orderId>", never sent), so its fill
        closes that position here like the own stop's: the TP is cancelled and nothing else is closed. Returns
        the id to feed its events under. Matched once, by the closing `side` ("Buy"/"Sell") and `trigger` (= the
        entry's stop_loss; NaN when the report has none, as execution records: then the leg's first position
        without a standing own stop); `qty` its size (0: the position's); `ts_ms` the report's time (execTime,
        or the order's createdTime): a stop never belongs to a position whose entry filled after it, so an old
        report (a re-read execution of a forgotten position) is never taken for today's. None when no open
        position matches."""
        key = f"{self.symbol}|attached|{order_id}"
        if order_link_id(key) in self.orders:
            return order_link_id(key)
        leg = SIDE_OF.get(side)
        for pos in self.unprotected_first(-leg) if leg is not None else []:
            if pos.entry_ts_ms > ts_ms:
                continue
            entry = self.orders[pos.position_id].request
            if entry.stop_loss is not None and (math.isnan(trigger) or
                                                math.isclose(entry.stop_loss, trigger, rel_tol=0, abs_tol=1e-9)):
                req = self._order(pos, "sl", key, entry.reason, price=entry.stop_loss, qty=qty or pos.qty)
                self.orders[req.order_link_id].status = "accepted"
                return req.order_link_id
        return None

    def _exit(self, pos: Book, reason: str, tag: str, bar_index: int) -> list[OrderRequest]:
        """A reduce-only market close of `pos` (nothing if an exit is under way), key "<entry key>|exit|<tag>".
        The first attempt also cancels the position's TP and SL. A re-attempt, after an earlier exit settled
        cancelled/rejected without closing the position (a KNOWN outcome, so a new order is no duplicate), adds
        "|<attempt>" to the key, so no two exits of one position share an orderLinkId even within one bar, and
        keeps the stop put back by _exit_failed_requests until it fills (the fill cancels it)."""
        current = self.orders.get(pos.exit_link)
        if current is not None and current.status not in TERMINAL:
            return []
        attempt = sum(1 for o in self.orders.values()
                      if o.request.kind == "exit" and o.request.position_id == pos.position_id)
        key = f"{pos.entry_key}|exit|{tag}" + (f"|{attempt}" if attempt else "")
        req = OrderRequest(action="create", order_link_id=order_link_id(key), kind="exit",
                           side=SIDE_NAME[-pos.side], order_type="Market", qty=pos.qty, price=None,
                           time_in_force="IOC", reduce_only=True, position_idx=_leg(pos.side), stop_loss=None,
                           position_id=pos.position_id, reason=reason, intent_key=key)
        self.orders[req.order_link_id] = Order(req, bar_index)
        pos.exit_link = req.order_link_id
        out = [req]
        for link in (pos.tp_link, pos.sl_link) if attempt == 0 else ():
            order = self.orders.get(link)
            if order is not None and order.status not in TERMINAL and not order.cancel_requested:
                out.append(self._cancel(order, reason))
        return out

    def _exit_failed(self, pos: Book) -> bool:
        """Whether the position's last exit settled cancelled/rejected/expired with the position still held."""
        order = self.orders.get(pos.exit_link)
        return order is not None and order.status in EXIT_FAILED

    def _exit_failed_requests(self, order: Order) -> list[OrderRequest]:
        """An exit that ended without (fully) closing its position (e.g. a reduce-only IOC market cancelled for
        lack of liquidity): the rest gets its exchange-side stop back at once, at the position's stop level
        (key "<entry key>|sl|<n>"), unless one still stands or the exchange refused that stop (reason
        stop_refused: price is beyond it). The exit itself is re-attempted at the next bar close (on_bar_close)."""
        pos = self._position(order.request.position_id)
        if pos is None or pos.exit_link != order.request.order_link_id or order.request.reason == "stop_refused" \
                or not math.isfinite(pos.sl):
            return []
        stop = self.orders.get(pos.sl_link)
        if stop is not None and stop.status not in TERMINAL and not stop.cancel_requested:
            return []
        n = sum(1 for o in self.orders.values() if o.request.kind == "sl" and o.request.position_id == pos.position_id)
        req = self._order(pos, "sl", f"{pos.entry_key}|sl|{n}", order.request.reason)
        pos.sl_link = req.order_link_id
        return [req]

    def _cancel(self, order: Order, reason: str) -> OrderRequest:
        order.cancel_requested = True
        return self._cancel_request(order, reason)

    @staticmethod
    def _cancel_request(order: Order, reason: str) -> OrderRequest:
        return dataclasses.replace(order.request, action="cancel", reason=reason)

    # ------------------------------------------------------------ exchange events
    def on_event(self, ev: ExecEvent) -> EventResult:
        """Apply one exchange event, or report why it cannot be (see the module doc)."""
        if ev.type not in EVENT_TYPES:
            return EventResult("invalid", f"event type {ev.type!r} for {ev.order_link_id!r}: expected one of "
                                          f"{', '.join(EVENT_TYPES)}")
        if ev.exec_id and ev.exec_id in self.seen_exec:
            return EventResult("duplicate", f"exec id {ev.exec_id} ({ev.type} {ev.order_link_id}) already applied")
        if ev.type == "funding":
            return self._funding(ev)
        order = self.orders.get(ev.order_link_id)
        if order is None:
            whose = "ours but not in the state" if is_own_order(ev.order_link_id) else "not placed by this system"
            return EventResult("unknown", f"{ev.type} for unknown orderLinkId {ev.order_link_id!r} ({whose})")
        if ev.type == "fill":
            return self._fill(order, ev)
        return self._status(order, ev)

    def _status(self, order: Order, ev: ExecEvent) -> EventResult:
        """accepted / rejected / cancelled / expired / triggered: a forward move of the order's status."""
        link = order.request.order_link_id
        if ev.ts_ms < order.ts_ms:
            return EventResult("stale", f"{ev.type} for {link} at {ev.ts_ms} is older than its last update "
                                        f"({order.ts_ms})")
        if ev.type == order.status:
            return EventResult("duplicate", f"{link} is already {ev.type}")
        if STATUS_RANK[ev.type] <= STATUS_RANK[order.status]:
            return EventResult("stale", f"{ev.type} for {link} would move it back from {order.status}")
        order.status = ev.type
        order.ts_ms = ev.ts_ms
        out = EventResult("applied", f"{link} {ev.type}")
        out.journal.append(self._record(ev.type, order, ev.ts_ms, order.request.price, order.request.qty, 0.0,
                                        reason=ev.reason or order.request.reason))
        if ev.type in TERMINAL and order.request.kind == "entry" and order.filled > 0.0:
            out.requests += self._protect(self._position(order.request.position_id))
        if ev.type in EXIT_FAILED and order.request.kind == "exit":
            out.requests += self._exit_failed_requests(order)
        return out

    def _fill(self, order: Order, ev: ExecEvent) -> EventResult:
        link = order.request.order_link_id
        if not (ev.qty > 0.0 and ev.price > 0.0 and math.isfinite(ev.qty + ev.price + ev.fee)):
            return EventResult("invalid", f"fill {ev.exec_id} for {link}: qty {ev.qty} and price {ev.price} must "
                                          "be positive and finite")
        if order.status in ("cancelled", "expired") and ev.ts_ms > order.ts_ms or order.status == "rejected":
            return EventResult("stale", f"fill {ev.exec_id} for {link} at {ev.ts_ms} after it was {order.status}")
        if order.filled + ev.qty > order.request.qty * (1 + QTY_TOL):
            return EventResult("invalid", f"fill {ev.exec_id} of {ev.qty} for {link} exceeds the order: "
                                          f"{order.filled} of {order.request.qty} already filled")
        if order.request.kind == "entry":
            result = self._entry_fill(order, ev)
        else:
            result = self._exit_fill(order, ev)
        if result.status == "applied":
            order.last_fill_ms = max(order.last_fill_ms, ev.ts_ms)
        if result.status == "applied" and ev.exec_id:
            self.seen_exec[ev.exec_id] = link
            order.exec_ids.append(ev.exec_id)
        return result

    def _entry_fill(self, order: Order, ev: ExecEvent) -> EventResult:
        req = order.request
        side = SIDE_OF[req.side]
        pos = self._position(req.position_id)
        if pos is None:
            pos = Book(position_id=req.position_id, entry_key=req.intent_key, side=side, qty=ev.qty,
                       entry_price=ev.price, entry_fee=ev.fee, fill_bar=self.bar + 1, entry_ts_ms=ev.ts_ms,
                       regime="maker" if req.order_type == "Limit" else "taker", opened_qty=ev.qty)
            self._place(pos)
        else:
            total = pos.qty + ev.qty
            pos.entry_price = (pos.entry_price * pos.qty + ev.price * ev.qty) / total
            pos.qty = pos.opened_qty = total
            pos.entry_fee += ev.fee
        self.cash -= ev.fee
        done = _count_fill(order, ev.qty)
        out = EventResult("applied", f"{req.order_link_id} {'filled' if done else 'partially filled'}")
        if done or order.status in ("cancelled", "expired"):
            out.requests += self._protect(pos)
        record = self._record("filled" if done else "partially_filled", order, ev.ts_ms, ev.price, ev.qty, ev.fee)
        if done:
            record.update(tp=pos.tp, sl=pos.sl)
        out.journal.append(record)
        return out

    def _exit_fill(self, order: Order, ev: ExecEvent) -> EventResult:
        req = order.request
        pos = self._position(req.position_id)
        if pos is None or ev.qty > pos.qty * (1 + QTY_TOL):
            held = 0.0 if pos is None else pos.qty
            return EventResult("invalid", f"fill {ev.exec_id} of {ev.qty} for {req.kind} {req.order_link_id} "
                                          f"exceeds position {req.position_id} ({held} held)")
        whole = ev.qty >= pos.qty * (1 - QTY_TOL)
        q = pos.qty if whole else ev.qty
        share = 1.0 if whole else q / pos.qty
        entry_fee, funding = pos.entry_fee * share, pos.funding * share
        gross = pos.side * q * (ev.price - pos.entry_price)
        self.cash += gross - ev.fee
        _count_fill(order, ev.qty)
        name = {"tp": "tp", "sl": "sl"}.get(req.kind) or EXIT_EVENT.get(req.reason, "time_exit")
        out = EventResult("applied", f"{req.kind} {req.order_link_id} filled {ev.qty} of {req.position_id}")
        record = self._record(name if whole else "partially_filled", order, ev.ts_ms, ev.price, ev.qty, ev.fee,
                              pnl=gross - (entry_fee + ev.fee) - funding)
        out.journal.append(record)
        if whole:
            self.slots[self.slots.index(pos)] = None
            for link in (pos.tp_link, pos.sl_link, pos.exit_link):
                sibling = self.orders.get(link)
                if sibling is not None and sibling is not order and sibling.status not in TERMINAL \
                        and not sibling.cancel_requested:
                    out.requests.append(self._cancel(sibling, req.kind))
        else:
            pos.qty -= q
            pos.entry_fee -= entry_fee
            pos.funding -= funding
        return out

    def _funding(self, ev: ExecEvent) -> EventResult:
        side = SIDE_OF.get(ev.side)
        held = [p for p in self.slots if p is not None and p.side == side]
        if side is None or not held or not math.isfinite(ev.fee):
            return EventResult("unknown", f"funding {ev.exec_id} of {ev.fee} for leg {ev.side!r}: no open "
                                          "position on that leg")
        total = sum(p.qty for p in held)
        for p in held:
            pay = ev.fee * (p.qty / total)
            self.cash -= pay
            p.funding += pay
        if ev.exec_id:
            self.seen_exec[ev.exec_id] = f"funding:{ev.side}"
        return EventResult("applied", f"funding {ev.fee} on the {ev.side} leg")

    # ------------------------------------------------------------ positions
    def _position(self, position_id: str) -> Book | None:
        return next((p for p in self.slots if p is not None and p.position_id == position_id), None)

    def _place(self, pos: Book) -> None:
        """Put a new position in the first free slot (as the core); a slot is added if none is free."""
        if None in self.slots:
            self.slots[self.slots.index(None)] = pos
        else:
            self.slots.append(pos)

    def _protect(self, pos: Book | None) -> list[OrderRequest]:
        """After the entry: the take-profit limit from the fill and the stop at the attached stop's level, for the
        whole position (strategy.py's stop rule)."""
        if pos is None or pos.tp_link:
            return []
        entry = self.orders[pos.position_id]
        tick = self.cfg.instrument.tick_size
        pos.tp = grid.snap_round(pos.entry_price + pos.side * entry.tp_dist, tick, pos.side)
        pos.sl = entry.request.stop_loss
        tp = self._order(pos, "tp", pos.entry_key + "|tp", entry.request.reason)
        sl = self._order(pos, "sl", pos.entry_key + "|sl", entry.request.reason)
        pos.tp_link, pos.sl_link = tp.order_link_id, sl.order_link_id
        return [tp, sl]

    def _order(self, pos: Book, kind: str, key: str, reason: str, price: float | None = None,
               qty: float | None = None) -> OrderRequest:
        """Register one of the position's own reduce-only orders (default: for its whole size): the TP (a GTC
        limit at pos.tp) or the stop (kind "sl": a conditional market order triggering at pos.sl)."""
        tp = kind == "tp"
        price = price if price is not None else pos.tp if tp else pos.sl
        req = OrderRequest(action="create", order_link_id=order_link_id(key), kind=kind, side=SIDE_NAME[-pos.side],
                           order_type="Limit" if tp else "Market", qty=qty or pos.qty, price=price,
                           time_in_force="GTC", reduce_only=True, position_idx=_leg(pos.side), stop_loss=None,
                           position_id=pos.position_id, reason=reason, intent_key=key)
        self.orders[req.order_link_id] = Order(req, self.bar)
        return req

    # ------------------------------------------------------------ journal
    def _record(self, event: str, order: Order, ts_ms: int, price: float | None, qty: float, fee: float,
                pnl: float | None = None, reason: str = "") -> dict:
        """One trades_<SYM>.jsonl record (DESIGN §3); the engine adds mode and the ISO time."""
        req = order.request
        return {"ts": ts_ms, "symbol": self.symbol, "event": event, "order_link_id": req.order_link_id,
                "side": req.side, "kind": req.kind, "price": price,
                "qty": qty, "fee": fee, "pnl": pnl, "position_id": req.position_id, "reason": reason or req.reason}

    def placed_record(self, req: OrderRequest, ts_ms: int) -> dict:
        """The "placed" journal record of a create the engine has just sent."""
        return self._record("placed", self.orders[req.order_link_id], ts_ms, req.price, req.qty, 0.0,
                            reason=req.reason)

    # ------------------------------------------------------------ state file
    def to_json(self) -> str:
        """The whole state as JSON (NaN written as null); from_json(to_json()) is identical."""
        state = {"version": STATE_VERSION, "symbol": self.symbol, "bar": self.bar, "cash": self.cash,
                 "last_equity": self.last_equity, "day": _plain(self.day),
                 "slots": [None if p is None else _plain(p) for p in self.slots],
                 "orders": [_plain(o) for o in self.orders.values()],
                 "seen_exec": self.seen_exec,
                 "last_intents": [_plain(it) for it in self.last_intents]}
        return json.dumps(state, allow_nan=False)

    @classmethod
    def from_json(cls, text: str, cfg: GlobalConfig) -> "Execution":
        """Rebuild from to_json's text; ValueError names what is wrong."""
        try:
            state = json.loads(text)
            if state.get("version") != STATE_VERSION:
                raise ValueError(f"state version {state.get('version')!r}, expected {STATE_VERSION}")
            ex = cls(cfg, state["symbol"])
            ex.bar, ex.cash, ex.last_equity = state["bar"], state["cash"], state["last_equity"]
            ex.day = _load(st.DayState, state["day"])
            ex.slots = [None if p is None else _load(Book, p) for p in state["slots"]]
            ex.orders = {}
            for raw in state["orders"]:
                order = _load(Order, {**raw, "request": _load(OrderRequest, raw["request"])})
                ex.orders[order.request.order_link_id] = order
            ex.seen_exec = dict(state["seen_exec"])
            ex.last_intents = [_load(st.Intent, it) for it in state["last_intents"]]
        except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as exc:
            raise ValueError(f"execution state is not readable: {type(exc).__name__}: {exc}") from None
        return ex


def _count_fill(order: Order, qty: float) -> bool:
    """Add a fill to the order's filled qty and move its status forward; True when the order is complete."""
    order.filled += qty
    done = order.filled >= order.request.qty * (1 - QTY_TOL)
    if done:
        order.status = "filled"
    elif STATUS_RANK[order.status] < STATUS_RANK["partially_filled"]:
        order.status = "partially_filled"
    return done


def _plain(obj) -> dict:
    """A record as JSON-ready values (nested records too; NaN as None, since strict JSON has no NaN)."""
    out = {}
    for name in _field_names(type(obj)):
        value = getattr(obj, name)
        kind = type(value)
        if kind is float:
            value = None if value != value else value
        elif kind is list:
            value = list(value)
        elif kind not in _SCALARS and dataclasses.is_dataclass(value):
            value = _plain(value)
        out[name] = value
    return out


_SCALARS = (str, int, bool, type(None))


@functools.lru_cache(maxsize=None)
def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def _load(cls: type, data: dict):
    """A dataclass from its asdict() form; None in a plain float field is NaN again. A field with a default
    that the data lacks (a state file written before the field existed) keeps its default."""
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data and (f.default is not dataclasses.MISSING
                                   or f.default_factory is not dataclasses.MISSING):
            continue
        value = data[f.name]
        kwargs[f.name] = math.nan if value is None and f.type == "float" else value
    return cls(**kwargs)
