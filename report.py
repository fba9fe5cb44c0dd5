"""Plotly HTML building blocks for backtest and training reports (one self-contained file each).

Each `*_figure` / `*_html` function returns one section; `page()` joins sections into a page that
carries plotly.js once, so reports open offline.
"""
from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

import metrics
from config import atomic_write_text

MAX_CANDLES = 20_000
_DISPLAY_RULES = ["5min", "15min", "1h", "4h", "1D", "1W"]


def _display_bars(frame: pd.DataFrame) -> pd.DataFrame:
    """Resample OHLC to the finest of a few timeframes that keeps at most MAX_CANDLES candles."""
    if len(frame) <= MAX_CANDLES:
        return frame
    for rule in _DISPLAY_RULES:
        out = frame.resample(rule).agg({"open": "first", "high": "max", "low": "min", "close": "last"}).dropna()
        if len(out) <= MAX_CANDLES:
            return out
    return out


def candles_figure(frame: pd.DataFrame, trades: pd.DataFrame, title: str = "Price and trades") -> go.Figure:
    """Candles with entry (triangles) and exit (crosses, coloured by outcome) markers."""
    bars = _display_bars(frame)
    fig = go.Figure(go.Candlestick(x=bars.index, open=bars["open"], high=bars["high"], low=bars["low"],
                                   close=bars["close"], name="price"))
    if len(trades):
        for side, symbol, color in (("long", "triangle-up", "#1f77b4"), ("short", "triangle-down", "#9467bd")):
            sub = trades[trades["side"] == side]
            fig.add_trace(go.Scatter(
                x=sub["entry_time"], y=sub["entry_price"], mode="markers", name=f"{side} entry",
                marker={"symbol": symbol, "size": 9, "color": color},
                text=[f"{r} entry, qty {q:g}" for r, q in zip(sub["regime"], sub["qty"])]))
        win = trades["pnl"] > 0
        for mask, name, color in ((win, "exit (win)", "#2ca02c"), (~win, "exit (loss)", "#d62728")):
            sub = trades[mask]
            fig.add_trace(go.Scatter(
                x=sub["exit_time"], y=sub["exit_price"], mode="markers", name=name,
                marker={"symbol": "x", "size": 8, "color": color},
                text=[f"{r}: pnl {p:.2f}" for r, p in zip(sub["exit_reason"], sub["pnl"])]))
    fig.update_layout(title=title, xaxis_rangeslider_visible=False, height=520)
    return fig


def equity_figure(equity: pd.DataFrame, title: str = "Equity (mark-to-market) and drawdown") -> go.Figure:
    """Equity curve above its drawdown, sharing the time axis."""
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.7, 0.3], vertical_spacing=0.04)
    fig.add_trace(go.Scatter(x=equity.index, y=equity["equity"], name="equity", line={"width": 1.2}), 1, 1)
    fig.add_trace(go.Scatter(x=equity.index, y=equity["drawdown"] * 100, name="drawdown %", fill="tozeroy",
                             line={"width": 0.8, "color": "#d62728"}), 2, 1)
    fig.update_yaxes(title_text="equity", row=1, col=1)
    fig.update_yaxes(title_text="drawdown %", row=2, col=1)
    fig.update_layout(title=title, height=520)
    return fig


def monthly_returns(equity: pd.Series, initial_equity: float) -> pd.DataFrame:
    """Table year x month of compounded monthly returns (fractions) from month-end equity."""
    month_end = equity.groupby([equity.index.year, equity.index.month]).last()
    prev = month_end.shift(1)
    prev.iloc[0] = initial_equity
    rets = month_end / prev - 1.0
    rets.index.names = ["year", "month"]
    return rets.unstack("month").reindex(columns=range(1, 13))


def monthly_figure(equity: pd.Series, initial_equity: float) -> go.Figure:
    """Heatmap of monthly returns in percent."""
    table = monthly_returns(equity, initial_equity) * 100
    text = [[("" if not np.isfinite(v) else f"{v:.1f}%") for v in row] for row in table.to_numpy()]
    fig = go.Figure(go.Heatmap(
        z=table.to_numpy(), x=["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"],
        y=[str(y) for y in table.index], text=text, texttemplate="%{text}", colorscale="RdYlGn", zmid=0,
        colorbar={"title": "%"}))
    fig.update_layout(title="Monthly returns", height=160 + 40 * len(table))
    return fig


def pnl_histogram(trades: pd.DataFrame) -> go.Figure:
    """Distribution of net trade PnL, split by regime."""
    fig = go.Figure()
    for regime in ("maker", "taker"):
        sub = trades[trades["regime"] == regime] if len(trades) else trades
        if len(sub):
            fig.add_trace(go.Histogram(x=sub["pnl"], name=f"{regime} trades", opacity=0.7, nbinsx=50))
    fig.update_layout(title="Trade PnL distribution (net of fees)", barmode="overlay", height=380,
                      xaxis_title="PnL (quote)", yaxis_title="trades")
    return fig


def _fmt(value: Any) -> str:
    """Readable metric value: NaN shown as n/a, fractions of order 1 kept at 4 significant digits."""
    if isinstance(value, float):
        return "n/a" if not math.isfinite(value) else f"{value:,.4g}" if abs(value) < 1e4 else f"{value:,.2f}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {v}" for k, v in value.items()) or "none"
    return str(value)


def metrics_table_html(metrics: dict, title: str = "Metrics") -> str:
    """HTML table of metric name and value."""
    rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(_fmt(v))}</td></tr>"
                   for k, v in metrics.items())
    return f"<h2>{html.escape(title)}</h2><table class='metrics'>{rows}</table>"


def assumptions_html(assumptions: Iterable[str], title: str = "Simulation assumptions") -> str:
    """Bulleted list of the assumptions behind the numbers."""
    items = "".join(f"<li>{html.escape(a)}</li>" for a in assumptions)
    return f"<h2>{html.escape(title)}</h2><ul>{items}</ul>"


def figure_html(fig: go.Figure) -> str:
    """A figure as an HTML fragment without plotly.js (page() adds it once)."""
    return fig.to_html(full_html=False, include_plotlyjs=False)


def page(title: str, sections: Iterable[str]) -> str:
    """A self-contained HTML page (plotly.js inlined once) from HTML sections."""
    from plotly.offline import get_plotlyjs
    body = "\n".join(sections)
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<script type='text/javascript'>{get_plotlyjs()}</script>"
            "<style>body{font-family:sans-serif;margin:24px}table.metrics{border-collapse:collapse}"
            "table.metrics td{border:1px solid #ccc;padding:2px 8px}</style></head>"
            f"<body><h1>{html.escape(title)}</h1>\n{body}\n</body></html>")


def backtest_sections(frame: pd.DataFrame, result: Any) -> list[str]:
    """The standard sections of a backtest: candles, equity, monthly, PnL, metrics, assumptions (a capacity
    warning first when the median order was a real share of the book it took)."""
    sections = [figure_html(candles_figure(frame, result.trades)), figure_html(equity_figure(result.equity))]
    if warning := metrics.liquidity_warning(result.metrics):
        sections.insert(0, banner_html(warning, False))
    if len(result.equity):
        sections.append(figure_html(monthly_figure(result.equity["equity"], result.initial_equity)))
    sections.append(figure_html(pnl_histogram(result.trades)))
    sections.append(metrics_table_html(result.metrics))
    sections.append(assumptions_html(result.assumptions))
    return sections


def write_backtest_report(path: str | Path, frame: pd.DataFrame, result: Any, title: str = "Backtest") -> None:
    """Write the full backtest report to `path` atomically."""
    atomic_write_text(path, page(title, backtest_sections(frame, result)))


# ---------------------------------------------------------------- training report blocks (train.py)
def path_fan_figure(times: list[str], curves: list[list[float]], labels: list[str] | None = None) -> go.Figure:
    """Every CPCV path's out-of-sample equity: the spread between paths is the uncertainty of the score."""
    fig = go.Figure()
    for i, curve in enumerate(curves):
        name = labels[i] if labels else f"path {i + 1}"
        fig.add_trace(go.Scatter(x=times[: len(curve)], y=curve, mode="lines", name=name, line={"width": 1}))
    fig.update_layout(title="CPCV paths: development-span equity, every bar traded by a fold model that never "
                            "trained on it (evidence for the search, not a forecast)",
                      yaxis_title="equity", height=380)
    return fig


def pbo_figure(logits: list[float], pbo_value: float) -> go.Figure:
    """CSCV logits of the in-sample winner's out-of-sample rank; the mass left of 0 is the PBO."""
    fig = go.Figure(go.Histogram(x=logits, nbinsx=30, name="logit"))
    fig.add_vline(x=0.0, line_dash="dash", line_color="red")
    fig.update_layout(title=f"PBO histogram (probability of backtest overfitting = {pbo_value:.2f})",
                      xaxis_title="logit of the out-of-sample rank", yaxis_title="partitions", height=340)
    return fig


def history_figure(numbers: list[int], values: list[float], trades: list[int] | None = None,
                   unit: str = "score") -> go.Figure:
    """Trial scores in order (hover: trades per path), with the best so far; `unit` says what a score is."""
    best = np.maximum.accumulate(np.asarray(values, dtype=float)) if values else []
    text = [f"{n} trades (median path)" for n in trades] if trades else None
    fig = go.Figure([go.Scatter(x=numbers, y=values, mode="markers", name="trial score", text=text),
                     go.Scatter(x=numbers, y=best, mode="lines", name="best so far")])
    fig.update_layout(title=f"Optimisation history ({unit})", xaxis_title="trial", yaxis_title=unit, height=340)
    return fig


def importance_figure(names: list[str], values: list[float], title: str, top: int = 30) -> go.Figure:
    """Horizontal bars of the largest importances."""
    order = list(np.argsort(values)[::-1][:top][::-1])
    fig = go.Figure(go.Bar(x=[values[i] for i in order], y=[names[i] for i in order], orientation="h"))
    fig.update_layout(title=title, height=max(300, 18 * len(order) + 120), margin={"l": 200})
    return fig


def table_html(frame: pd.DataFrame, title: str) -> str:
    """A DataFrame as a plain HTML table under a heading."""
    return f"<h2>{html.escape(title)}</h2>" + frame.to_html(classes="metrics", float_format=lambda x: f"{x:.4g}",
                                                            border=0, index=False, na_rep="–")


def banner_html(text: str, good: bool) -> str:
    """The verdict, impossible to miss."""
    colour = "#1b7f3b" if good else "#b00020"
    return (f"<div style='padding:12px;border:2px solid {colour};color:{colour};font-size:1.2em'>"
            f"{html.escape(text)}</div>")
