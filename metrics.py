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
