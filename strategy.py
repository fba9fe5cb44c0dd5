"""The hybrid strategy (DESIGN.md §1): the only place that decides what to trade.

The rules are written once, as numba-compiled functions over scalars and arrays, so the compiled
backtest core can call them in its hot loop; `decide()` wraps the same functions for the paper
and live engines, taking and returning plain dataclass records.

Timing contract: `decide` runs at a bar's close. Market intents fill at the next bar's open
(plus slippage and latency); limit intents are placed then (PostOnly, rejected if they would
cross); cancels and exits also act then. Resting entries placed at the close of bar p may fill in
bars p+1 .. p+time_limit_bars and are cancelled at the close of bar p+time_limit_bars.

Kill-switch: the daily loss limit is checked at every bar close by `decide` and, between closes, by
`intrabar_kill` (the engines, on every trade) and the backtest core (on a bar's adverse extreme after its
fills): both compare prices with `kill_trigger`, the price at which the same mark-to-market equity meets the
limit. A breach flattens every position, cancels resting entries and halts entries until the next UTC day.

Stop rule: an intent's `tp_dist` is measured from the fill, its `sl_dist` from the entry's reference price
(`Intent.price`: the limit price, at which a maker entry fills; the decision close for a market entry), where
the exchange-side stop is attached when the entry is created. A market entry's stop is therefore not moved
to its fill: the backtest and the live engine stop at the same level whatever the slippage.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from numba import njit

from config import InstrumentConfig, StrategyConfig
from grid import DOWN, snap_round

LONG, SHORT = 1, -1

# intent kinds (column K_KIND of an intent row)
CANCEL, EXIT, MARKET, LIMIT = 0, 1, 2, 3
KIND_NAMES = ("cancel", "exit", "market", "limit")

# reasons (column K_REASON)
R_EXPIRED, R_KILL, R_SUPERSEDED, R_TIME, R_BREAKOUT, R_CHOP = 0, 1, 2, 3, 4, 5
REASON_NAMES = ("expired", "kill_switch", "superseded", "time", "breakout", "chop")

# intent row layout (float64 array of N_INTENT_COLS)
K_KIND, K_SIDE, K_REF, K_PRICE, K_QTY, K_TP, K_SL, K_REASON, K_ATR = range(9)
N_INTENT_COLS = 9

# parameter vector layout (float64), built by `strategy_params`
(P_OFFSET, P_TP, P_SL, P_TIME_LIMIT, P_MAX_HOLD, P_EXEC_THR, P_DIR_THR, P_AGGR_THR, P_AGGR_MULT, P_RISK,
 P_MAX_POS, P_MAX_LEV, P_DAILY_LOSS, P_TICK, P_QTY_STEP, P_MIN_QTY, P_MIN_NOTIONAL, P_BOOK_SHARE) = range(18)
N_PARAMS = 18

# day-state vector layout: current UTC day, equity at its start, halted flag, equity at the last decision
D_DAY, D_START_EQUITY, D_HALTED, D_LAST_EQUITY = range(4)


def strategy_params(strategy: StrategyConfig, instrument: InstrumentConfig) -> np.ndarray:
    """Pack the settings the rules read into one float64 vector (numba cannot read dataclasses)."""
    p = np.empty(N_PARAMS, dtype=np.float64)
    p[P_OFFSET] = strategy.limit_offset_atr
    p[P_TP] = strategy.take_profit_atr
    p[P_SL] = strategy.stop_loss_atr
    p[P_TIME_LIMIT] = strategy.time_limit_bars
    p[P_MAX_HOLD] = strategy.max_holding_bars
    p[P_EXEC_THR] = strategy.exec_threshold
    p[P_DIR_THR] = strategy.direction_threshold
    p[P_AGGR_THR] = strategy.aggressive_threshold
    p[P_AGGR_MULT] = strategy.aggressive_tp_mult
    p[P_RISK] = strategy.risk_per_trade
    p[P_MAX_POS] = strategy.max_positions
    p[P_MAX_LEV] = strategy.max_leverage
    p[P_DAILY_LOSS] = strategy.daily_loss_limit
    p[P_TICK] = instrument.tick_size
    p[P_QTY_STEP] = instrument.qty_step
    p[P_MIN_QTY] = instrument.min_qty
    p[P_MIN_NOTIONAL] = instrument.min_notional
    p[P_BOOK_SHARE] = strategy.max_book_share
    return p


@njit(cache=True)
def new_day_state() -> np.ndarray:
    """Day-state vector before the first decision (no day seen yet)."""
    state = np.empty(4)
    state[D_DAY] = -1.0
    state[D_START_EQUITY] = np.nan
    state[D_HALTED] = 0.0
    state[D_LAST_EQUITY] = np.nan
    return state


@njit(cache=True)
def roll_day(day: int, equity: float, day_state: np.ndarray) -> None:
    """Start a new UTC day in day_state (in place) when `day` differs from the one it holds.

    The day's start equity is the equity at the last decision of the previous day (D_LAST_EQUITY), or
    `equity` before any day was seen; a new day lifts the kill-switch halt. Used by the bar-close rule
    (decide_core) and the intrabar rule (kill_trigger's callers) alike, so both measure the same day.
    """
    if day != day_state[D_DAY]:
        day_state[D_START_EQUITY] = equity if day_state[D_DAY] < 0 else day_state[D_LAST_EQUITY]
        day_state[D_DAY] = day
        day_state[D_HALTED] = 0.0


@njit(cache=True)
def kill_trigger(pos_side: np.ndarray, pos_qty: np.ndarray, pos_entry: np.ndarray, cash: float,
                 start_equity: float, daily_loss: float) -> tuple:
    """The price at which mark-to-market equity reaches the daily kill-switch limit: (price, direction).

    Equity is the one the bar-close rule in decide_core uses: `cash` (initial equity plus realised PnL,
    minus every fee paid so far, entry fees of open positions included, and funding paid) plus the
    unrealised PnL of the open positions at price P, equity(P) = cash + sum_k side_k*qty_k*(P - entry_k).
    It is linear in P with slope the net quantity N = sum_k side_k*qty_k (hedge mode holds both legs; they
    net here), so the limit (1 - daily_loss) * start_equity is reached at
    P* = ((1 - daily_loss) * start_equity - cash + sum_k side_k*qty_k*entry_k) / N.
    Slots with pos_qty <= 0 are empty. Exit fees of the flatten are not counted (as at bar closes).

    direction 1: breached when a price <= P* trades (net long; also (inf, 1) when the book is flat in net
    terms and equity is already at or below the limit, so any price breaches); -1: breached when a price
    >= P* trades (net short); 0 (P* = NaN): no price breaches (net quantity 0, within 1e-9 of the gross
    quantity, and equity above the limit). P* <= 0 for a net long means no positive price breaches.
    """
    net = 0.0
    gross = 0.0
    basis = 0.0
    for k in range(pos_qty.shape[0]):
        if pos_qty[k] > 0.0:
            net += pos_side[k] * pos_qty[k]
            gross += pos_qty[k]
            basis += pos_side[k] * pos_qty[k] * pos_entry[k]
    limit = (1.0 - daily_loss) * start_equity
    if abs(net) <= 1e-9 * gross:
        if cash - basis <= limit:
            return math.inf, 1
        return math.nan, 0
    return (limit - cash + basis) / net, 1 if net > 0.0 else -1


@njit(cache=True)
def adverse_price(low: float, high: float, direction: int) -> float:
    """The adverse extreme of prices traded in [low, high] for kill_trigger's direction: the low for a net
    long (1), the high for a net short (-1); NaN when flat (0)."""
    if direction == 1:
        return low
    if direction == -1:
        return high
    return math.nan


@njit(cache=True)
def kill_crossed(low: float, high: float, trigger: float, direction: int) -> bool:
    """Whether prices traded in [low, high] breach kill_trigger's (trigger, direction): the adverse extreme
    (adverse_price) at or beyond the trigger."""
    worst = adverse_price(low, high, direction)
    return worst <= trigger if direction == 1 else worst >= trigger if direction == -1 else False


@njit(cache=True)
def kill_fill_price(open_: float, trigger: float, direction: int) -> float:
    """The raw price of the kill-switch flatten in the bar whose range breached: the trigger, or the bar's
    open when it opened already beyond it (a gap, as for stops); slippage is the caller's."""
    if direction == 1:
        return min(open_, trigger)
    return max(open_, trigger)


@njit(cache=True)
def limit_price(close: float, atr: float, side: int, params: np.ndarray) -> float:
    """PostOnly entry price close ∓ offset·ATR on the tick grid away from the market (grid.snap_round)."""
    return snap_round(close - side * params[P_OFFSET] * atr, params[P_TICK], -side)


@njit(cache=True)
def position_size(equity: float, price: float, sl_dist: float, notional_used: float, params: np.ndarray,
                  depth: float) -> float:
    """Quantity risking risk_per_trade·equity at the stop, within the leverage cap and max_book_share of the
    book `depth` (base units; NaN: no book sample, no cap); 0 when too small. The book cap keeps an order to
    a size that fills near the bar's prices, as the backtest assumes (metrics.liquidity_share measures it)."""
    if equity <= 0.0 or price <= 0.0 or sl_dist <= 0.0:
        return 0.0
    qty = params[P_RISK] * equity / sl_dist
    room = params[P_MAX_LEV] * equity - notional_used
    if room <= 0.0:
        return 0.0
    qty = min(qty, room / price)
    if params[P_BOOK_SHARE] > 0.0 and depth == depth:
        qty = min(qty, params[P_BOOK_SHARE] * depth)
    qty = snap_round(qty, params[P_QTY_STEP], DOWN)
    if qty < params[P_MIN_QTY] - 1e-12 or qty * price < params[P_MIN_NOTIONAL]:
        return 0.0
    return qty


@njit(cache=True)
def _emit(out: np.ndarray, n: int, kind: int, side: int, ref: int, price: float, qty: float,
          tp: float, sl: float, reason: int, atr: float) -> int:
    """Write one intent row; returns the new count."""
    out[n, K_KIND] = kind
    out[n, K_SIDE] = side
    out[n, K_REF] = ref
    out[n, K_PRICE] = price
    out[n, K_QTY] = qty
    out[n, K_TP] = tp
    out[n, K_SL] = sl
    out[n, K_REASON] = reason
    out[n, K_ATR] = atr
    return n + 1


@njit(cache=True)
def decide_core(bar: int, day: int, close: float, atr: float, bid_depth: float, ask_depth: float,
                p_exec_long: float, p_exec_short: float, p_dir_long: float, p_dir_short: float,
                equity: float, day_state: np.ndarray,
                pos_side: np.ndarray, pos_qty: np.ndarray, pos_fill_bar: np.ndarray,
                rest_qty: np.ndarray, rest_price: np.ndarray, rest_placed_bar: np.ndarray,
                params: np.ndarray, out: np.ndarray, allowed: bool) -> int:
    """All rules of DESIGN §1 at one bar close; writes intents into `out`, returns how many.

    Positions are slots with pos_qty > 0; resting entries are indexed 0 = long, 1 = short with
    rest_qty > 0. `day` is the UTC day number of the bar's open; day_state is updated in place.
    bid_depth, ask_depth: the bar's book depth per side (base units, NaN when unknown) for max_book_share: a
    market entry is capped by the side it takes (a long: the asks), a PostOnly entry by the side it joins.
    allowed = False (an entry gate is closed, see EntryGate) stops new entries only: the kill-switch,
    time exits and expiries still act.
    """
    n = 0
    roll_day(day, equity, day_state)
    day_state[D_LAST_EQUITY] = equity

    # kill-switch: flatten, cancel, halt until the next UTC day
    if day_state[D_HALTED] == 0.0 and equity <= (1.0 - params[P_DAILY_LOSS]) * day_state[D_START_EQUITY]:
        day_state[D_HALTED] = 1.0
        for k in range(pos_qty.shape[0]):
            if pos_qty[k] > 0.0:
                n = _emit(out, n, EXIT, int(pos_side[k]), k, close, pos_qty[k], 0.0, 0.0, R_KILL, atr)
        for s in range(2):
            if rest_qty[s] > 0.0:
                n = _emit(out, n, CANCEL, 1 - 2 * s, s, rest_price[s], rest_qty[s], 0.0, 0.0, R_KILL, atr)
        return n

    # time exits and expiries; what stays counts towards max_positions and the leverage cap
    count = 0
    notional = 0.0
    for k in range(pos_qty.shape[0]):
        if pos_qty[k] > 0.0:
            if bar - pos_fill_bar[k] >= params[P_MAX_HOLD]:
                n = _emit(out, n, EXIT, int(pos_side[k]), k, close, pos_qty[k], 0.0, 0.0, R_TIME, atr)
            else:
                count += 1
                notional += pos_qty[k] * close
    resting_long = False
    resting_short = False
    for s in range(2):
        if rest_qty[s] > 0.0:
            if bar - rest_placed_bar[s] >= params[P_TIME_LIMIT]:
                n = _emit(out, n, CANCEL, 1 - 2 * s, s, rest_price[s], rest_qty[s], 0.0, 0.0, R_EXPIRED, atr)
            else:
                if s == 0:
                    resting_long = True
                else:
                    resting_short = True
                count += 1
                notional += rest_qty[s] * rest_price[s]

    if day_state[D_HALTED] != 0.0 or not allowed or not (atr > 0.0) or not (close > 0.0):
        return n
    sl_dist = params[P_SL] * atr
    for s in range(2):
        side = 1 - 2 * s
        p_exec = p_exec_long if s == 0 else p_exec_short
        p_dir = p_dir_long if s == 0 else p_dir_short
        has_resting = resting_long if s == 0 else resting_short
        if p_dir >= params[P_AGGR_THR]:
            own = 1 if has_resting else 0
            own_notional = rest_qty[s] * rest_price[s] if has_resting else 0.0
            if count - own >= params[P_MAX_POS]:
                continue
            qty = position_size(equity, close, sl_dist, notional - own_notional, params,
                                ask_depth if side == LONG else bid_depth)
            if qty <= 0.0:
                continue
            if has_resting:
                n = _emit(out, n, CANCEL, side, s, rest_price[s], rest_qty[s], 0.0, 0.0, R_SUPERSEDED, atr)
                count -= 1
                notional -= own_notional
            n = _emit(out, n, MARKET, side, -1, close, qty, params[P_TP] * params[P_AGGR_MULT] * atr,
                      sl_dist, R_BREAKOUT, atr)
            count += 1
            notional += qty * close
        elif p_exec >= params[P_EXEC_THR] and p_dir >= params[P_DIR_THR]:
            if has_resting or count >= params[P_MAX_POS]:
                continue
            price = limit_price(close, atr, side, params)
            if price <= 0.0:
                continue
            qty = position_size(equity, price, sl_dist, notional, params, bid_depth if side == LONG else ask_depth)
            if qty <= 0.0:
                continue
            n = _emit(out, n, LIMIT, side, s, price, qty, params[P_TP] * atr, sl_dist, R_CHOP, atr)
            count += 1
            notional += qty * price
    return n


@njit(cache=True)
def is_idle(day: int, equity: float, p_exec_long: float, p_exec_short: float, p_dir_long: float,
            p_dir_short: float, day_state: np.ndarray, params: np.ndarray) -> bool:
    """True when decide_core would emit nothing and change nothing, provided no position or resting entry exists.

    Same UTC day and equity as the last decision: the day-state update is a no-op and the kill-switch
    test repeats the last one's (already acted on) outcome; with neither side's entry signal on, the
    entry rules pass over both sides. Callers check the positions and resting entries themselves.
    """
    return (day == day_state[D_DAY] and equity == day_state[D_LAST_EQUITY]
            and not (p_dir_long >= params[P_AGGR_THR]
                     or (p_exec_long >= params[P_EXEC_THR] and p_dir_long >= params[P_DIR_THR]))
            and not (p_dir_short >= params[P_AGGR_THR]
                     or (p_exec_short >= params[P_EXEC_THR] and p_dir_short >= params[P_DIR_THR])))


# ---------------------------------------------------------------- record API for the engines
@dataclass
class Position:
    """An open position; `fill_bar` is the index of the bar it filled in."""
    side: int
    qty: float
    entry_price: float
    tp: float
    sl: float
    fill_bar: int
    regime: str = "maker"


@dataclass
class RestingOrder:
    """A resting PostOnly entry placed at the close of `placed_bar`, with its exit distances."""
    side: int
    price: float
    qty: float
    placed_bar: int
    tp_dist: float
    sl_dist: float


@dataclass
class Intent:
    """An order intent: kind cancel|exit|market|limit; ref = position index (exit) or -1."""
    kind: str
    side: int
    reason: str
    qty: float
    price: float = math.nan
    tp_dist: float = math.nan
    sl_dist: float = math.nan
    ref: int = -1


@dataclass
class DayState:
    """Kill-switch bookkeeping carried between decisions."""
    day: int = -1
    start_equity: float = math.nan
    halted: bool = False
    last_equity: float = math.nan

    def to_array(self) -> np.ndarray:
        return np.array([float(self.day), self.start_equity, 1.0 if self.halted else 0.0, self.last_equity])

    def update(self, arr: np.ndarray) -> None:
        self.day, self.start_equity = int(arr[D_DAY]), float(arr[D_START_EQUITY])
        self.halted, self.last_equity = bool(arr[D_HALTED]), float(arr[D_LAST_EQUITY])


@dataclass
class EntryGate:
    """Whether new entries are allowed at this bar close, and why not (spread above live.max_spread_pct,
    book invalid, stale data, too many API errors ...). A closed gate blocks entries only."""
    allowed: bool = True
    reason: str = ""


@dataclass
class Bar:
    """The closed bar a decision is made on (time = bar open, epoch seconds; depths: the bar's
    ob_bid_depth_mean / ob_ask_depth_mean in base units, NaN when unknown)."""
    index: int
    time: float
    close: float
    atr: float
    probs: dict = field(default_factory=dict)
    bid_depth: float = math.nan
    ask_depth: float = math.nan


def decide(bar: Bar, positions: list[Position], resting: list[RestingOrder], equity: float,
           day: DayState, strategy: StrategyConfig, instrument: InstrumentConfig,
           gate: EntryGate | None = None) -> list[Intent]:
    """Order intents for one bar close; updates `day` in place. Exit intents' ref indexes `positions`.

    gate (default: open) closes new entries while exits, expiries and the kill-switch still act."""
    slots = max(len(positions), 1)
    pos_side = np.zeros(slots)
    pos_qty = np.zeros(slots)
    pos_fill = np.zeros(slots, dtype=np.int64)
    for k, p in enumerate(positions):
        pos_side[k], pos_qty[k], pos_fill[k] = p.side, p.qty, p.fill_bar
    rest_qty, rest_price, rest_bar = np.zeros(2), np.zeros(2), np.zeros(2, dtype=np.int64)
    for order in resting:
        s = 0 if order.side == LONG else 1
        if rest_qty[s] > 0:
            raise ValueError(f"two resting entries on side {order.side}: the strategy allows one per side")
        rest_qty[s], rest_price[s], rest_bar[s] = order.qty, order.price, order.placed_bar
    state = day.to_array()
    out = np.zeros((2 * slots + 8, N_INTENT_COLS))
    pr = bar.probs
    n = decide_core(bar.index, int(bar.time // 86400), bar.close, bar.atr, bar.bid_depth, bar.ask_depth,
                    float(pr.get("p_exec_long", math.nan)), float(pr.get("p_exec_short", math.nan)),
                    float(pr.get("p_dir_long", math.nan)), float(pr.get("p_dir_short", math.nan)),
                    equity, state, pos_side, pos_qty, pos_fill, rest_qty, rest_price, rest_bar,
                    strategy_params(strategy, instrument), out, gate is None or gate.allowed)
    day.update(state)
    return [intent_from_row(out[j]) for j in range(n)]


def kill_price(positions: list[Position], cash: float, day: DayState, strategy: StrategyConfig) -> tuple[float, int]:
    """kill_trigger on records: (trigger price, direction) for `positions` and `cash` (see kill_trigger for
    what equity includes) against the day's start equity; (NaN, 0) when no day has started or it is halted."""
    if day.day < 0 or day.halted or not math.isfinite(day.start_equity):
        return math.nan, 0
    side = np.array([float(p.side) for p in positions] or [0.0])
    qty = np.array([p.qty for p in positions] or [0.0])
    entry = np.array([p.entry_price for p in positions] or [0.0])
    trigger, direction = kill_trigger(side, qty, entry, cash, day.start_equity, strategy.daily_loss_limit)
    return float(trigger), int(direction)


def intrabar_kill(low: float, high: float, time: float, positions: list[Position], cash: float, day: DayState,
                  strategy: StrategyConfig) -> bool:
    """The intrabar kill-switch rule for the engines, between bar closes: True when prices traded in
    [low, high] (a single trade: low = high = its price) during the UTC day of `time` (epoch s) breach the
    trigger of `positions` and `cash` (kill_price); the day is then marked halted until the next UTC day
    and the caller flattens every position and cancels resting entries. `day` is rolled to that UTC day
    first (roll_day), as the backtest core does before its check."""
    state = day.to_array()
    if state[D_DAY] < 0:
        return False
    roll_day(int(time // 86400), math.nan, state)
    day.update(state)
    trigger, direction = kill_price(positions, cash, day, strategy)
    if not kill_crossed(low, high, trigger, direction):
        return False
    day.halted = True
    return True


def intent_from_row(row: np.ndarray) -> Intent:
    """Convert one compiled intent row into an Intent record."""
    kind = int(row[K_KIND])
    return Intent(kind=KIND_NAMES[kind], side=int(row[K_SIDE]), reason=REASON_NAMES[int(row[K_REASON])],
                  qty=float(row[K_QTY]), price=float(row[K_PRICE]),
                  tp_dist=float(row[K_TP]) if kind == MARKET or kind == LIMIT else math.nan,
                  sl_dist=float(row[K_SL]) if kind == MARKET or kind == LIMIT else math.nan,
                  ref=int(row[K_REF]) if kind == EXIT else -1)
