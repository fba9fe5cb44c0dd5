"""Performance statistics as pure functions of an equity curve and a trade list.

Ratios use daily mark-to-market returns and a 365-day year (crypto trades every day). Undefined
values (no trades, no losing trade, flat curve) are NaN, never a made-up number; `to_json` writes
them as null.
"""
from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pandas as pd

DAYS_PER_YEAR = 365.0


def period_returns(equity: pd.Series, initial_equity: float, period: str) -> pd.Series:
    """Close-to-close returns of the equity marked at each UTC period's last bar (first period vs initial)."""
    if equity.empty:
        return pd.Series(dtype=float)
    period_end = equity.groupby(equity.index.floor(period)).last()
    prev = period_end.shift(1)
    prev.iloc[0] = initial_equity
    return period_end / prev - 1.0


def daily_returns(equity: pd.Series, initial_equity: float) -> pd.Series:
    """Close-to-close returns of the equity marked at each UTC day's last bar (first day vs initial)."""
    return period_returns(equity, initial_equity, "D")


def bar_returns(equity: pd.Series, initial_equity: float) -> pd.Series:
    """Bar-by-bar mark-to-market returns (first bar vs initial equity), e.g. for a deflated Sharpe."""
    prev = equity.shift(1)
    if not prev.empty:
        prev.iloc[0] = initial_equity
    return equity / prev - 1.0


def sharpe(returns: pd.Series | np.ndarray, periods_per_year: float = DAYS_PER_YEAR) -> float:
    """Annualised Sharpe ratio (zero risk-free rate, sample std); NaN when undefined."""
    r = np.asarray(returns, dtype=float)
    if r.size < 2:
        return math.nan
    sd = r.std(ddof=1)
    return float(r.mean() / sd * math.sqrt(periods_per_year)) if sd > 0 else math.nan


def sortino(returns: pd.Series | np.ndarray, periods_per_year: float = DAYS_PER_YEAR) -> float:
    """Annualised Sortino ratio: mean over the downside deviation (root mean square of the negative parts)."""
    r = np.asarray(returns, dtype=float)
    if r.size < 2:
        return math.nan
    downside = math.sqrt(float(np.mean(np.minimum(r, 0.0) ** 2)))
    return float(r.mean() / downside * math.sqrt(periods_per_year)) if downside > 0 else math.nan


def max_drawdown(equity: pd.Series) -> tuple[float, pd.Timedelta]:
    """Deepest fall from a running peak (a negative fraction) and the longest time spent below a peak."""
    if equity.empty:
        return math.nan, pd.Timedelta(0)
    values = equity.to_numpy(dtype=float)
    peak = np.maximum.accumulate(values)
    dd = values / peak - 1.0
    underwater = np.concatenate([[False], values < peak, [False]]).astype(np.int8)
    edges = np.diff(underwater)
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1)
    ns = equity.index.as_unit("ns").asi8
    begin = ns[np.maximum(starts - 1, 0)]
    finish = ns[np.minimum(ends, len(ns) - 1)]
    longest = pd.Timedelta(int((finish - begin).max()) if starts.size else 0, unit="ns")
    return float(dd.min()), longest


MIN_DAYS_TO_ANNUALISE = 30.0
MIN_DAILY_RETURNS = 7     # a Sharpe ratio from fewer daily returns is noise dressed as a statistic


def cagr(initial_equity: float, final_equity: float, days: float) -> float:
    """Compound annual growth rate over `days` calendar days; NaN below a month, where compounding a few
    hours' return to a year prints an absurd number that means nothing."""
    if initial_equity > 0 and final_equity <= 0:
        return -1.0
    if days < MIN_DAYS_TO_ANNUALISE or initial_equity <= 0:
        return math.nan
    return float((final_equity / initial_equity) ** (DAYS_PER_YEAR / days) - 1.0)


def calmar(annual_return: float, max_dd: float) -> float:
    """Annual return over the absolute maximum drawdown; NaN without a drawdown."""
    return annual_return / abs(max_dd) if max_dd < 0 else math.nan


def trade_stats(trades: pd.DataFrame) -> dict[str, Any]:
    """Win rate, profit factor, expectancy, PnL, fees and holding of a set of closed trades."""
    pnl = trades["pnl"].to_numpy(dtype=float) if len(trades) else np.zeros(0)
    wins, losses = pnl[pnl > 0], pnl[pnl < 0]
    loss_sum = -losses.sum()
    hold = (trades["exit_time"] - trades["entry_time"]).dt.total_seconds() / 3600.0 if len(trades) else None
    return {
        "trades": int(pnl.size),
        "win_rate": float(wins.size / pnl.size) if pnl.size else math.nan,
        "profit_factor": float(wins.sum() / loss_sum) if loss_sum > 0 else math.nan,
        "expectancy": float(pnl.mean()) if pnl.size else math.nan,
        "avg_win": float(wins.mean()) if wins.size else math.nan,
        "avg_loss": float(losses.mean()) if losses.size else math.nan,
        "net_pnl": float(pnl.sum()),
        "fees": float(trades["fees"].sum()) if len(trades) else 0.0,
        "funding": float(trades["funding"].sum()) if len(trades) else 0.0,
        "avg_holding_hours": float(hold.mean()) if hold is not None else math.nan,
    }


def turnover(trades: pd.DataFrame) -> float:
    """Traded notional, both legs of every trade, in quote currency."""
    if not len(trades):
        return 0.0
    return float((trades["qty"] * (trades["entry_price"] + trades["exit_price"])).sum())


DEPTH_COLUMNS = ["ob_bid_depth_mean", "ob_ask_depth_mean"]   # book depth per side: the entry cap and this check
LIQUIDITY_COLUMNS = ["volume", *DEPTH_COLUMNS]
LIQUIDITY_WARN_SHARE = 0.2   # twice the default strategy.max_book_share: past this, whole-order fills flatter


def liquidity_share(trades: pd.DataFrame, bars: pd.DataFrame) -> dict[str, float]:
    """How large the orders were against the market they traded in, from each trade's entry bar (the bar whose
    open is the last at or before entry_time):

    depth_share: qty / the book depth of the side a market entry takes (ob_ask_depth_mean for a long,
    ob_bid_depth_mean for a short; the data.ob_levels best levels, bar mean), in median, max and the count of
    trades above LIQUIDITY_WARN_SHARE; volume_share: qty / the entry bar's traded volume (median). An entry bar
    without book samples is left out; an empty side or a bar without trades counts as unbounded.
    NaN (count 0) without trades, without those bar columns (e.g. a --signals run) or without book samples.
    A backtest fills whole orders at bar prices: orders that are a real share of the book would walk it (see
    parity.py layer 4)."""
    out = {"depth_share_median": math.nan, "depth_share_max": math.nan, "volume_share_median": math.nan,
           "trades_over_depth_share": 0}
    if not len(trades) or any(c not in bars.columns for c in LIQUIDITY_COLUMNS):
        return out
    at = np.clip(bars.index.searchsorted(trades["entry_time"], side="right") - 1, 0, len(bars) - 1)
    long = (trades["side"] == "long").to_numpy()
    bid, ask = (bars[c].to_numpy(float)[at] for c in DEPTH_COLUMNS)
    depth = np.where(long, ask, bid)
    qty = trades["qty"].to_numpy(float)
    volume = bars["volume"].to_numpy(float)[at]
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(depth == 0, np.inf, qty / depth)   # an empty side: unbounded; no book sample: NaN
        vol_share = np.where(volume == 0, np.inf, qty / volume)
    if np.isnan(share).all():
        return out
    out.update(depth_share_median=float(np.nanmedian(share)), depth_share_max=float(np.nanmax(share)),
               volume_share_median=float(np.nanmedian(vol_share)),
               trades_over_depth_share=int((share > LIQUIDITY_WARN_SHARE).sum()))
    return out


def liquidity_warning(m: dict[str, Any]) -> str:
    """One sentence when the median order exceeded LIQUIDITY_WARN_SHARE of the book it took, else ''."""
    share = m.get("depth_share_median", math.nan)
    if not (isinstance(share, float) and share > LIQUIDITY_WARN_SHARE):
        return ""
    return (f"capacity: the median order was {share:.0%} of the book depth it took (max {m['depth_share_max']:.0%}; "
            f"{m['trades_over_depth_share']} of {m['trades']} trades above {LIQUIDITY_WARN_SHARE:.0%}) and "
            f"{m['volume_share_median']:.0%} of its bar's traded volume; the backtest fills whole orders at bar "
            f"prices without market impact, so these returns overstate what such orders would earn (parity.py "
            f"layer 4 shows the difference; a smaller strategy.risk_per_trade trades smaller)")


def compute_metrics(result: Any) -> dict[str, Any]:
    """All headline metrics of a BacktestResult, overall and split by regime and side."""
    eq = result.equity["equity"]
    trades = result.trades
    initial = float(result.initial_equity)
    final = float(eq.iloc[-1]) if len(eq) else initial
    daily = daily_returns(eq, initial)
    days = (eq.index[-1] - eq.index[0]).total_seconds() / 86400.0 if len(eq) > 1 else 0.0
    if len(eq) > 1:
        days += (eq.index[1] - eq.index[0]).total_seconds() / 86400.0
    mdd, mdd_dur = max_drawdown(pd.concat([pd.Series([initial], index=eq.index[:1]), eq])
                                if len(eq) else eq)
    annual = cagr(initial, final, days)
    traded = turnover(trades)
    out: dict[str, Any] = {
        "initial_equity": initial,
        "final_equity": final,
        "total_return": final / initial - 1.0,
        "annual_return": annual,
        "sharpe": sharpe(daily) if len(daily) >= MIN_DAILY_RETURNS else math.nan,
        "sortino": sortino(daily) if len(daily) >= MIN_DAILY_RETURNS else math.nan,
        "max_drawdown": mdd,
        "max_drawdown_days": mdd_dur.total_seconds() / 86400.0,
        "calmar": calmar(annual, mdd),
        "days": days,
        "exposure": float((result.equity["positions"] > 0).mean()) if len(eq) else math.nan,
        "avg_leverage": float(result.equity["exposure"].mean()) if len(eq) else math.nan,
        "turnover_notional": traded,
        "turnover": traded / initial,
    }
    out.update(trade_stats(trades))
    for col in ("regime", "side"):
        values = ("maker", "taker") if col == "regime" else ("long", "short")
        for value in values:
            for key, stat in trade_stats(trades[trades[col] == value] if len(trades) else trades).items():
                out[f"{value}_{key}"] = stat
    out["exit_reasons"] = {str(k): int(v) for k, v in trades["exit_reason"].value_counts().items()} \
        if len(trades) else {}
    out.update({f"count_{k}": v for k, v in getattr(result, "counters", {}).items()})
    return out


def json_safe(value: Any) -> Any:
    """Plain JSON values: NaN/inf become null (an undefined number is shown as missing, never as a number)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def to_json(metrics: dict[str, Any]) -> str:
    """Strict JSON (NaN and infinities become null)."""
    return json.dumps(json_safe(metrics), indent=2)
