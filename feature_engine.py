"""Bars -> model features: the one feature function that training, backtest and live all call.

Conventions every feature keeps:
- Causal: the value at bar t uses bars <= t only (rolling windows look back; EWMs run with
  adjust=False from the first bar), so computing on history truncated at t gives the same value.
- Windows are durations from `FeatureConfig`, converted to bars with `config.bars_for`, so a "2h"
  z-score means two hours at any timeframe.
- Z-scores are centred on their rolling mean and divided by a rolling std with a floor, so a
  flat window gives 0 instead of a blow-up. No feature is ever +-inf, none is a raw price level:
  price distances are in ATR, spreads and elasticities in bps of price.
- Each feature declares its warm-up (`feature_warmups`); rows before the longest one, or with any
  feature undefined, get is_warm=False and keep NaN where a value is unknown: nothing is zero-filled.
- Empty bars (no trades): their taker-buy ratio is undefined, so it is left out of rolling trade-flow
  statistics (which need 3 traded bars in the window) and shown as neutral (ratio 0.5, z-score 0);
  zero volume and zero range count as what they are. Bars without book samples (ob_samples == 0): book state (spread, depth, imbalance, ...)
  carries the last valid value for at most `book_ffill`, book flow (OFI) counts as 0 over that
  span; beyond it book features are NaN and the row is not warm.
- Data gaps (is_gap bars, see data_loader.mark_gaps) are fabricated, not market data: a gap bar is never
  warm, and the bar after a gap restarts the warm-up count exactly as the first bar of data does, so a row
  is warm only once the longest warm-up has elapsed since the last gap bar. A warm-up is, by its
  definition, the bars after which a feature no longer depends on what came before them (rolling windows
  have left it, EWM start weights are below ewm_tolerance), so no warm value leans on a gap bar.
"""
from __future__ import annotations

import argparse
import copy
import functools
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from numba import njit

from config import ConfigError, GlobalConfig, add_config_args, bars_for, config_from_args, parse_duration, \
    timeframe_seconds


TRADE_COLUMNS = ("open", "high", "low", "close", "volume", "vol_buy", "trade_count", "dollar_val", "is_empty")
BOOK_STATE_COLUMNS = ("ob_spread_mean", "ob_micro_dev_mean", "ob_micro_dev_std", "ob_imbalance_mean",
                      "ob_bid_depth_mean", "ob_ask_depth_mean", "ob_bid_slope_mean", "ob_ask_slope_mean",
                      "ob_bid_integrity_mean", "ob_ask_integrity_mean")
REQUIRED_COLUMNS = TRADE_COLUMNS + BOOK_STATE_COLUMNS + ("ob_ofi_sum", "ob_samples", "is_gap")
_MICRO_EXCLUDE = ("ema_", "rsi", "atr", "natr")
_RATIO_FLOOR = 0.01  # std floor of z-scores of bounded ratios (taker share, imbalance, OFI per top size)
_REL_FLOOR = 0.01  # std floor of z-scores of positive quantities, as a fraction of their rolling mean
_TINY = 1e-12
_MIN_TRADED_BARS = 3  # traded bars a taker-share z-score needs in its window (empty bars are common)
_NEVER = np.iinfo(np.int64).max  # age of a value never seen; also "carry without a limit"
_seconds = functools.lru_cache(maxsize=None)(parse_duration)  # config durations: parsed once, not at every bar
_bars = functools.lru_cache(maxsize=None)(bars_for)


# ---------------------------------------------------------------- compiled kernels
@njit(cache=True)
def _ewm(x: np.ndarray, alpha: float) -> np.ndarray:
    """EWM with adjust=False starting at the first finite value; NaN inputs keep the last value (causal)."""
    out = np.empty(x.shape[0])
    s = np.nan
    for i in range(x.shape[0]):
        v = x[i]
        if v == v:
            s = v if s != s else s + alpha * (v - s)
        out[i] = s
    return out


@njit(cache=True)
def _window_moments(x: np.ndarray, lo: int, hi: int) -> tuple[int, float, float]:
    """Count, mean and sum of squared deviations of the finite values in x[lo:hi] (two passes)."""
    count = 0
    total = 0.0
    for j in range(max(lo, 0), hi):
        if x[j] == x[j]:
            count += 1
            total += x[j]
    if count == 0:
        return 0, 0.0, 0.0
    mean = total / count
    m2 = 0.0
    for j in range(max(lo, 0), hi):
        if x[j] == x[j]:
            m2 += (x[j] - mean) ** 2
    return count, mean, m2


@njit(cache=True)
def _rolling_mean_std(x: np.ndarray, window: int, min_periods: int, ddof: int,
                      first: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Rolling mean and std over the last `window` bars, skipping NaN (Welford add/remove, O(n)).

    Rows before `first` may be left NaN: the loop starts at the last refresh at or before `first`, which sets
    the whole state, so rows >= first are bit-equal to a run from row 0."""
    n = x.shape[0]
    mean_out = np.full(n, np.nan)
    std_out = np.full(n, np.nan)
    count = 0
    mean = 0.0
    m2 = 0.0
    start = first - (first + 1) % window if first + 1 >= window else 0
    for i in range(start, n):
        v = x[i]
        if v == v:
            count += 1
            delta = v - mean
            mean += delta / count
            m2 += delta * (v - mean)
        if i >= window:
            u = x[i - window]
            if u == u:
                count -= 1
                if count == 0:
                    mean = 0.0
                    m2 = 0.0
                else:
                    delta = u - mean
                    mean -= delta / count
                    m2 -= delta * (u - mean)
        if i % window == window - 1:  # exact two-pass refresh once per window, so rounding never accumulates
            count, mean, m2 = _window_moments(x, i - window + 1, i + 1)
        if count >= min_periods and count > 0:
            mean_out[i] = mean
            if count > ddof:
                std_out[i] = math.sqrt(max(m2, 0.0) / (count - ddof))
    return mean_out, std_out


@njit(cache=True)
def _carry(x: np.ndarray, valid: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """Last valid value if at most `limit` bars old (else NaN), and the age in bars of that value (int64 max
    before the first valid one)."""
    n = x.shape[0]
    filled = np.full(n, np.nan)
    age = np.full(n, _NEVER)
    last = -1
    for i in range(n):
        if valid[i]:
            last = i
        if last >= 0:
            age[i] = i - last
            if i - last <= limit:
                filled[i] = x[last]
    return filled, age


# ---------------------------------------------------------------- helpers
def _min_periods(window: int) -> int:
    """Valid values a window needs: at least half of it, so gaps thin a statistic but never fake it."""
    return max(1, (window + 1) // 2)


def _mean(x: np.ndarray, window: int, first: int) -> np.ndarray:
    """Causal rolling mean skipping NaN (rows >= first; see _rolling_mean_std)."""
    return _rolling_mean_std(x, window, _min_periods(window), 0, first)[0]


def _zscore(x: np.ndarray, window: int, first: int, abs_floor: float, rel_floor: float = 0.0) -> np.ndarray:
    """(x - rolling mean) / max(rolling std, floor); the floor keeps flat windows at 0, not +-inf (rows >= first)."""
    window = max(2, window)
    mean, std = _rolling_mean_std(x, window, max(2, _min_periods(window)), 1, first)
    floor = np.maximum(abs_floor, rel_floor * np.abs(mean))
    return (x - mean) / np.maximum(std, floor)


def _ratio(a: np.ndarray, b: np.ndarray, neutral: float) -> np.ndarray:
    """a / b with `neutral` where b is 0 (both sides empty), NaN kept."""
    safe = np.where(b == 0, 1.0, b)
    return np.where(b == 0, neutral, a / safe)


def _sym_change(now: np.ndarray, before: np.ndarray) -> np.ndarray:
    """Bounded relative change (now - before) / (now + before) in [-1, 1]; 0 when both are 0."""
    return _ratio(now - before, now + before, 0.0)


def _lag(x: np.ndarray, k: int) -> np.ndarray:
    """x shifted k bars into the future (value of bar t - k at t), NaN for the first k."""
    out = np.full(x.shape[0], np.nan)
    if k < x.shape[0]:
        out[k:] = x[:x.shape[0] - k]
    return out


def _bars_of_data(is_gap: np.ndarray) -> np.ndarray:
    """Bars before each bar since the start of data or the last gap bar (-1 on a gap bar): the warm-up clock."""
    idx = np.arange(is_gap.shape[0])
    return idx - np.maximum.accumulate(np.where(is_gap, idx, -1)) - 1


def _rsi(close: np.ndarray, alpha: float) -> np.ndarray:
    """RSI as 100 * gain / (gain + loss) of Wilder-style EWMs: 50 on a flat series, never a division by 0."""
    diff = close - _lag(close, 1)
    up = np.where(np.isnan(diff), np.nan, np.maximum(diff, 0.0))
    down = np.where(np.isnan(diff), np.nan, np.maximum(-diff, 0.0))
    gain, loss = _ewm(up, alpha), _ewm(down, alpha)
    return 100.0 * _ratio(gain, gain + loss, 0.5)


def _alpha_span(span_bars: float) -> float:
    return 2.0 / (span_bars + 1.0)


def _ewm_warmup(alpha: float, tol: float) -> int:
    """Bars after which an EWM's starting value weighs less than `tol`: (1 - alpha)^n <= tol."""
    if alpha >= 1.0:
        return 0
    return int(math.ceil(math.log(tol) / math.log(1.0 - alpha)))


def _duration_label(duration: str) -> str:
    """'4h', '24h', '90m': a window as it appears in a feature name."""
    seconds = int(round(_seconds(duration)))
    if seconds % 3600 == 0:
        return f"{seconds // 3600}h"
    if seconds % 60 == 0:
        return f"{seconds // 60}m"
    return f"{seconds}s"


def _ema_names(cfg: GlobalConfig) -> list[str]:
    """EMA names as the original system knew them: the span counted in 5m bars (45m -> ema_9)."""
    return [f"ema_{round(_seconds(s) / 300)}" for s in cfg.features.ema_spans]


def _htf_list(cfg: GlobalConfig) -> list[str]:
    """Higher timeframes strictly above the base timeframe (the others carry no extra context)."""
    base = timeframe_seconds(cfg.data.timeframe)
    return [tf for tf in cfg.features.htf_timeframes if timeframe_seconds(tf) > base]


# ---------------------------------------------------------------- registry
def feature_warmups(cfg: GlobalConfig) -> dict[str, int]:
    """Every computed column (model features and atr) -> leading bars it needs before it is reliable."""
    fc, tf = cfg.features, cfg.data.timeframe
    tol = fc.ewm_tolerance

    def bars(d: str) -> int:
        return _bars(d, tf)

    atr_w = _ewm_warmup(_alpha_span(bars(fc.atr_span)), tol)
    z_w, iz_w, tr_w = max(2, bars(fc.z_window)), max(2, bars(fc.imbalance_z_window)), bars(fc.trend_window)
    intra_w, day_w, macro_w = bars(fc.intraday_window), bars(fc.day_window), bars(fc.macro_window)
    w: dict[str, int] = {"atr": atr_w, "natr": atr_w}
    lag = bars(fc.slope_lag)
    for name, span in zip(_ema_names(cfg), fc.ema_spans):
        ema_w = _ewm_warmup(_alpha_span(bars(span)), tol)
        w[f"dist_{name}"] = max(atr_w, ema_w)
        w[f"{name}_slope"] = max(atr_w, ema_w + lag)
    w["rsi"] = _ewm_warmup(1.0 / bars(fc.rsi_span), tol) + 1
    w["bb_percent_b"] = bars(fc.bb_window)
    w.update({"taker_buy_ratio": 0, "taker_buy_z": z_w, "vol_z": z_w})
    w.update({"ob_imb_trend": tr_w, "micro_pressure": atr_w, "bid_depth_chg": 1, "ask_depth_chg": 1,
              "spread_z": z_w, "ob_spread_bps": 0, "ob_depth_log_ratio": 0, "ob_imbalance_z": iz_w,
              "price_liq_div": 1, "liq_dominance": intra_w, "micro_dev_vol": atr_w, "ob_bid_elasticity": 0,
              "ob_ask_elasticity": 0, "ob_slope_ratio": 0, "bid_slope_z": z_w, "ob_integrity_skew": 0,
              "bid_integrity_chg": 1, "ask_integrity_chg": 1, "ob_bid_integrity_mean": 0,
              "ob_ask_integrity_mean": 0})
    for vw in fc.vwap_windows:
        w[f"vwap_{_duration_label(vw)}_dist"] = max(atr_w, bars(vw))
    w.update({"vol_intraday": day_w, "vol_macro": macro_w, "atr_z": atr_w + z_w, "atr_regime": atr_w + day_w,
              "atr_macro": atr_w + macro_w})
    w.update({"ofi_norm": 0, "ofi_z": z_w, "ofi_trend": tr_w, "rv_intraday": intra_w + 1, "rv_day": day_w + 1,
              "rv_ratio": day_w + 1, "trade_intensity": day_w, "trade_intensity_regime": day_w})
    for htf in _htf_list(cfg):
        per = timeframe_seconds(htf) // timeframe_seconds(tf)
        first = 2 * per  # the first complete higher-timeframe bar has closed by then, wherever data starts
        p = f"htf_{htf}"
        w.update({f"{p}_ret": max(atr_w, first), f"{p}_range": max(atr_w, first), f"{p}_taker_buy": first,
                  f"{p}_imbalance": first,
                  f"{p}_rsi": first + (_ewm_warmup(1.0 / fc.htf_span, tol) + 1) * per,
                  f"{p}_ema_dist": max(atr_w, first + _ewm_warmup(_alpha_span(fc.htf_span), tol) * per)})
    return w


def book_reach(cfg: GlobalConfig) -> dict[str, int]:
    """Book-reading features -> bars over which one bar's book columns (ob_*) reach them: a feature at bar t
    reads the book stats of bars t-reach+1 .. t (its window over them, plus the features.book_ffill carry that
    lends a bar's stats to the bookless bars after it). Every feature not named here reads trade columns only.
    Used after a bar whose book columns are partial (the engine began listening inside it): from that bar +
    reach on, the feature is exact again, whatever its (longer) warm-up over the trade columns."""
    fc, tf = cfg.features, cfg.data.timeframe

    def bars(d: str) -> int:
        return _bars(d, tf)

    z_w, iz_w, tr_w = max(2, bars(fc.z_window)), max(2, bars(fc.imbalance_z_window)), bars(fc.trend_window)
    reach = dict.fromkeys(("micro_pressure", "micro_dev_vol", "ob_spread_bps", "ob_depth_log_ratio",
                           "ob_bid_elasticity", "ob_ask_elasticity", "ob_slope_ratio", "ob_integrity_skew",
                           "ob_bid_integrity_mean", "ob_ask_integrity_mean", "ofi_norm", "liq_dominance"), 1)
    reach.update(dict.fromkeys(("bid_depth_chg", "ask_depth_chg", "price_liq_div", "bid_integrity_chg",
                                "ask_integrity_chg"), 2))
    reach.update({"spread_z": z_w, "bid_slope_z": z_w, "ofi_z": z_w, "ob_imbalance_z": iz_w,
                  "ob_imb_trend": tr_w, "ofi_trend": tr_w})
    for htf in _htf_list(cfg):   # the higher bar holding it is seen until the next one closes
        reach[f"htf_{htf}_imbalance"] = 2 * (timeframe_seconds(htf) // timeframe_seconds(tf))
    carry = bars(fc.book_ffill)
    return {name: r + carry for name, r in reach.items()}


def flow_reach(cfg: GlobalConfig) -> dict[str, int]:
    """Features reading the taker split or the trade count (vol_buy, vol_sell, trade_count: what REST klines
    lack besides the book) -> bars over which one bar's values reach them (as book_reach)."""
    fc, tf = cfg.features, cfg.data.timeframe
    z_w, intra_w, day_w = max(2, _bars(fc.z_window, tf)), _bars(fc.intraday_window, tf), _bars(fc.day_window, tf)
    reach = {"taker_buy_ratio": 1, "taker_buy_z": z_w, "trade_intensity": day_w,
             "trade_intensity_regime": max(intra_w, day_w)}
    for htf in _htf_list(cfg):
        reach[f"htf_{htf}_taker_buy"] = 2 * (timeframe_seconds(htf) // timeframe_seconds(tf))
    return reach


def book_warmup_bars(cfg: GlobalConfig) -> int:
    """Bars after a bar with partial book columns until every model feature is exact again (see book_reach)."""
    reach = book_reach(cfg)
    return max([reach[n] for n in feature_names(cfg) if n in reach], default=0)


def kline_reach(cfg: GlobalConfig) -> dict[str, int]:
    """Features a bar known only from REST klines reaches (OHLCV and turnover whole; book, taker split and
    trade count not) -> bars: book_reach and flow_reach together."""
    reach = book_reach(cfg)
    for name, bars in flow_reach(cfg).items():
        reach[name] = max(bars, reach.get(name, 0))
    return reach


def kline_warmup_bars(cfg: GlobalConfig) -> int:
    """Bars after a bar known only from REST klines until every model feature is exact again (kline_reach)."""
    reach = kline_reach(cfg)
    return max([reach[n] for n in feature_names(cfg) if n in reach], default=0)


def _select(warmups: dict[str, int], cfg: GlobalConfig) -> list[str]:
    """Model inputs among the registry's names, honouring microstructure_only."""
    names = [n for n in warmups if n != "atr"]
    if cfg.features.microstructure_only:
        names = [n for n in names if not any(tag in n for tag in _MICRO_EXCLUDE)]
    return names


def feature_names(cfg: GlobalConfig) -> list[str]:
    """Model input columns, in a fixed order (atr is not one: it scales targets, not predictions)."""
    return _select(feature_warmups(cfg), cfg)


def warmup_bars(cfg: GlobalConfig) -> int:
    """Bars of history needed before every model feature (and atr) is reliable: the longest warm-up."""
    warm = feature_warmups(cfg)
    return max(warm[n] for n in _select(warm, cfg) + ["atr"])


def with_warmup(cfg: GlobalConfig) -> GlobalConfig:
    """The config to load bars with: data.start moved back by the features' warm-up (to a whole UTC day), so the
    first requested bar already has warm features; cfg itself when it sets no start."""
    if not cfg.data.start:
        return cfg
    seconds = warmup_bars(cfg) * timeframe_seconds(cfg.data.timeframe)
    loaded = copy.deepcopy(cfg)
    loaded.data.start = (pd.Timestamp(cfg.data.start) - pd.Timedelta(seconds=seconds)).strftime("%Y-%m-%d")
    return loaded


# ---------------------------------------------------------------- input checks
def _validate(bars: pd.DataFrame, cfg: GlobalConfig) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Reject frames the features would silently misread; return bar open times in seconds and the checked
    trade columns (TRADE_COLUMNS but is_empty) as float64 arrays."""
    missing = [c for c in REQUIRED_COLUMNS if c not in bars.columns]
    if missing:
        raise ValueError(f"bars frame lacks column(s) {', '.join(missing)} (see data_loader.load_bars; live windows: data_loader.mark_gaps adds is_gap)")
    if not isinstance(bars.index, pd.DatetimeIndex) or bars.index.tz is None:
        raise ValueError("bars index must be a tz-aware DatetimeIndex of bar open times")
    tf = timeframe_seconds(cfg.data.timeframe)
    ts = bars.index.tz_convert("UTC").asi8 // 1_000_000_000
    if ts.size and ts[0] % tf:
        raise ValueError(f"bar {bars.index[0]} is not aligned to the {cfg.data.timeframe} grid")
    steps = np.diff(ts)
    bad = np.flatnonzero(steps != tf)
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"bars are not a continuous {cfg.data.timeframe} grid: {bars.index[i]} is followed by "
                         f"{bars.index[i + 1]}")
    trade = {name: bars[name].to_numpy(np.float64) for name in TRADE_COLUMNS[:-1]}
    for name, x in trade.items():
        bad = np.flatnonzero(~np.isfinite(x) | (x <= 0 if name in ("open", "high", "low", "close") else x < 0))
        if bad.size:
            raise ValueError(f"bar {bars.index[bad[0]]}: {name} = {float(x[bad[0]])!r}, expected a finite "
                             f"{'positive price' if name in ('open', 'high', 'low', 'close') else 'value >= 0'}")
    return ts, trade


# ---------------------------------------------------------------- feature blocks
def _technical(c: np.ndarray, h: np.ndarray, low: np.ndarray, cfg: GlobalConfig,
               first: int) -> dict[str, np.ndarray]:
    """ATR (floored at one tick), NATR, EMA distances and slopes in ATR, RSI, Bollinger %B."""
    fc, tf, tick = cfg.features, cfg.data.timeframe, cfg.instrument.tick_size
    prev = _lag(c, 1)
    tr = np.fmax(h - low, np.fmax(np.abs(h - prev), np.abs(low - prev)))
    atr = np.maximum(_ewm(tr, _alpha_span(_bars(fc.atr_span, tf))), tick)
    out = {"atr": atr, "natr": atr / c}
    lag = _bars(fc.slope_lag, tf)
    for name, span in zip(_ema_names(cfg), fc.ema_spans):
        ema = _ewm(c, _alpha_span(_bars(span, tf)))
        out[f"dist_{name}"] = (c - ema) / atr
        out[f"{name}_slope"] = (ema - _lag(ema, lag)) / atr
    out["rsi"] = _rsi(c, 1.0 / _bars(fc.rsi_span, tf))
    bb_w = max(2, _bars(fc.bb_window, tf))
    mid, std = _rolling_mean_std(c, bb_w, bb_w, 0, first)
    half = fc.bb_std * np.maximum(std, 0.5 * tick)
    out["bb_percent_b"] = (c - mid + half) / (2.0 * half)
    return out


def _trade_flow(v: np.ndarray, vb: np.ndarray, empty: np.ndarray, cfg: GlobalConfig,
                first: int) -> dict[str, np.ndarray]:
    """Taker-buy share and its z-score (empty bars left out of the statistics), volume z-score."""
    z_w = max(2, _bars(cfg.features.z_window, cfg.data.timeframe))
    share = np.where(empty | (v <= 0), np.nan, vb / np.where(v > 0, v, 1.0))
    mean, std = _rolling_mean_std(share, z_w, min(z_w, _MIN_TRADED_BARS), 1, first)
    z = np.where(np.isnan(share), 0.0, (share - mean) / np.maximum(std, _RATIO_FLOOR))
    return {"taker_buy_ratio": np.where(np.isnan(share), 0.5, share),
            "taker_buy_z": z,
            "vol_z": _zscore(v, z_w, first, _TINY, _REL_FLOOR)}


def _book_state(bars: pd.DataFrame, cfg: GlobalConfig) -> dict[str, np.ndarray]:
    """Book stats with the missing-book rule: state carried <= book_ffill, flow 0 there, NaN beyond."""
    limit = _bars(cfg.features.book_ffill, cfg.data.timeframe)
    has_book = bars["ob_samples"].to_numpy(np.float64) > 0
    s = {}
    for col in BOOK_STATE_COLUMNS:
        x = bars[col].to_numpy(np.float64)
        s[col] = _carry(x, has_book & np.isfinite(x), limit)[0]
    ofi_raw = bars["ob_ofi_sum"].to_numpy(np.float64)
    age = _carry(ofi_raw, has_book, limit)[1]
    s["ob_ofi_sum"] = np.where(has_book & np.isfinite(ofi_raw), ofi_raw, np.where(age <= limit, 0.0, np.nan))
    return s


def _book(s: dict[str, np.ndarray], c: np.ndarray, v: np.ndarray, atr: np.ndarray,
          cfg: GlobalConfig, first: int) -> dict[str, np.ndarray]:
    """Order-book features from the carried per-bar book stats `s` (see _book_state)."""
    fc, tf = cfg.features, cfg.data.timeframe
    tick, step = cfg.instrument.tick_size, cfg.instrument.qty_step
    ofi = s["ob_ofi_sum"]
    z_w, tr_w = _bars(fc.z_window, tf), _bars(fc.trend_window, tf)
    imb, spread = s["ob_imbalance_mean"], s["ob_spread_mean"]
    bid_d, ask_d = s["ob_bid_depth_mean"], s["ob_ask_depth_mean"]
    bid_el, ask_el = s["ob_bid_slope_mean"] / c * 1e4, s["ob_ask_slope_mean"] / c * 1e4
    bid_i, ask_i = s["ob_bid_integrity_mean"], s["ob_ask_integrity_mean"]
    top_size = np.maximum(0.5 * (bid_d * bid_i + ask_d * ask_i), step)
    ofi_norm = ofi / np.where(np.isnan(top_size), np.nan, top_size)
    return {
        "ob_imb_trend": _mean(imb, tr_w, first),
        "micro_pressure": s["ob_micro_dev_mean"] / atr,
        "bid_depth_chg": _sym_change(bid_d, _lag(bid_d, 1)),
        "ask_depth_chg": _sym_change(ask_d, _lag(ask_d, 1)),
        "spread_z": _zscore(spread, z_w, first, 0.1 * tick),
        "ob_spread_bps": spread / c * 1e4,
        "ob_depth_log_ratio": np.log((bid_d + step) / (ask_d + step)),
        "ob_imbalance_z": _zscore(imb, _bars(fc.imbalance_z_window, tf), first, _RATIO_FLOOR),
        "price_liq_div": np.sign(c - _lag(c, 1)) * np.sign(imb - _lag(imb, 1)),
        "liq_dominance": np.log((bid_d + ask_d + step) / (_mean(v, _bars(fc.intraday_window, tf), first) + step)),
        "micro_dev_vol": s["ob_micro_dev_std"] / atr,
        "ob_bid_elasticity": bid_el,
        "ob_ask_elasticity": ask_el,
        "ob_slope_ratio": _sym_change(bid_el, ask_el),
        "bid_slope_z": _zscore(bid_el, z_w, first, _TINY, _REL_FLOOR),
        "ob_integrity_skew": bid_i - ask_i,
        "bid_integrity_chg": bid_i - _lag(bid_i, 1),
        "ask_integrity_chg": ask_i - _lag(ask_i, 1),
        "ob_bid_integrity_mean": bid_i,
        "ob_ask_integrity_mean": ask_i,
        "ofi_norm": ofi_norm,
        "ofi_z": _zscore(ofi_norm, z_w, first, _RATIO_FLOOR),
        "ofi_trend": _mean(ofi_norm, tr_w, first),
    }


def _context(c: np.ndarray, v: np.ndarray, dollar: np.ndarray, trades: np.ndarray, atr: np.ndarray,
             natr: np.ndarray, cfg: GlobalConfig, first: int) -> dict[str, np.ndarray]:
    """VWAP distances, volume/volatility regimes, realised volatility, trade intensity (VWAP from row 0: it
    carries its last defined value over all-empty windows, however old)."""
    fc, tf = cfg.features, cfg.data.timeframe
    intra_w, day_w, macro_w = (_bars(fc.intraday_window, tf), _bars(fc.day_window, tf),
                               _bars(fc.macro_window, tf))
    out: dict[str, np.ndarray] = {}
    for window in fc.vwap_windows:
        n = _bars(window, tf)
        mean_v, mean_d = (_rolling_mean_std(x, n, n, 0)[0] for x in (v, dollar))
        vwap = np.where(mean_v > 0, mean_d / np.where(mean_v > 0, mean_v, 1.0), np.nan)
        vwap = _carry(vwap, np.isfinite(vwap), _NEVER)[0]
        out[f"vwap_{_duration_label(window)}_dist"] = (c - vwap) / atr
    v_intra, v_day, v_macro = _mean(v, intra_w, first), _mean(v, day_w, first), _mean(v, macro_w, first)
    out["vol_intraday"] = (v_intra + _TINY) / (v_day + _TINY)
    out["vol_macro"] = (v_day + _TINY) / (v_macro + _TINY)
    out["atr_z"] = _zscore(natr, _bars(fc.z_window, tf), first, _TINY, _REL_FLOOR)
    n_day = _mean(natr, day_w, first)
    out["atr_regime"] = _mean(natr, intra_w, first) / n_day
    out["atr_macro"] = n_day / _mean(natr, macro_w, first)
    r2 = np.log(c / _lag(c, 1)) ** 2
    per_hour = 3600.0 / timeframe_seconds(tf)
    rv_intra, rv_day = (np.sqrt(np.maximum(_mean(r2, w, first), 0.0) * per_hour) * 1e4 for w in (intra_w, day_w))
    out["rv_intraday"], out["rv_day"] = rv_intra, rv_day
    out["rv_ratio"] = (rv_intra + _TINY) / (rv_day + _TINY)
    tc_day = _mean(trades, day_w, first)
    out["trade_intensity"] = np.log((trades + 1.0) / (tc_day + 1.0))
    out["trade_intensity_regime"] = np.log((_mean(trades, intra_w, first) + 1.0) / (tc_day + 1.0))
    return out


def _higher_timeframes(ts: np.ndarray, o: np.ndarray, h: np.ndarray, low: np.ndarray, c: np.ndarray,
                       v: np.ndarray, vb: np.ndarray, imb: np.ndarray, atr: np.ndarray,
                       cfg: GlobalConfig) -> dict[str, np.ndarray]:
    """15m/1h context from the base bars; bar t sees only higher bars that closed by t's close."""
    base = timeframe_seconds(cfg.data.timeframe)
    span = cfg.features.htf_span
    out: dict[str, np.ndarray] = {}
    for htf in _htf_list(cfg):
        sec = timeframe_seconds(htf)
        gid = ts // sec
        starts = np.flatnonzero(np.r_[True, gid[1:] != gid[:-1]])
        counts = np.diff(np.r_[starts, ts.size])
        complete = counts == sec // base  # only the first group can be partial (data starting mid-bar)
        g_open = np.where(complete, o[starts], np.nan)
        g_close = np.where(complete, c[starts + counts - 1], np.nan)
        g_high = np.where(complete, np.maximum.reduceat(h, starts), np.nan)
        g_low = np.where(complete, np.minimum.reduceat(low, starts), np.nan)
        g_vol, g_buy = np.add.reduceat(v, starts), np.add.reduceat(vb, starts)
        n_imb = np.add.reduceat(np.isfinite(imb).astype(np.float64), starts)
        g_imb = np.where(complete & (n_imb > 0),
                         np.add.reduceat(np.nan_to_num(imb), starts) / np.maximum(n_imb, 1.0), np.nan)
        g_buy_share = np.where(complete, _ratio(g_buy, g_vol, 0.5), np.nan)
        g_ema = _ewm(g_close, _alpha_span(span))
        g_rsi = _rsi(g_close, 1.0 / span)
        pos = (ts + base) // sec - 1 - gid[0]  # index of the last higher bar closed at each base bar's close
        seen = pos >= 0
        take = np.where(seen, pos, 0)

        def at(x: np.ndarray) -> np.ndarray:
            return np.where(seen, x[take], np.nan)

        p = f"htf_{htf}"
        out[f"{p}_ret"] = (at(g_close) - at(g_open)) / atr
        out[f"{p}_range"] = (at(g_high) - at(g_low)) / atr
        out[f"{p}_taker_buy"] = at(g_buy_share)
        out[f"{p}_imbalance"] = at(g_imb)
        out[f"{p}_rsi"] = at(g_rsi)
        out[f"{p}_ema_dist"] = (c - at(g_ema)) / atr
    return out


# ---------------------------------------------------------------- entry point
def compute_features(bars: pd.DataFrame, cfg: GlobalConfig, last: int | None = None) -> pd.DataFrame:
    """Model features, atr and is_warm for every bar (same index); causal, so live and research agree.

    last: only the last `last` bars' rows (the live engine needs the newest few), bit-equal to the same rows
    of the full result: EWMs still run from the first bar, rolling statistics start at their last exact
    refresh before those rows (see _rolling_mean_std)."""
    ts, trade = _validate(bars, cfg)
    warmups = feature_warmups(cfg)
    names = _select(warmups, cfg)
    if bars.empty:
        return pd.DataFrame({**{n: pd.Series(dtype=np.float64) for n in names + ["atr"]},
                             "is_warm": pd.Series(dtype=bool)}, index=bars.index)

    o, h, low, c, v = trade["open"], trade["high"], trade["low"], trade["close"], trade["volume"]
    vb, trades, dollar = trade["vol_buy"], trade["trade_count"], trade["dollar_val"]
    empty = bars["is_empty"].to_numpy(bool)
    first = 0 if last is None else max(0, len(bars) - last)
    feats = _technical(c, h, low, cfg, first)
    atr = feats["atr"]
    feats.update(_trade_flow(v, vb, empty, cfg, first))
    book = _book_state(bars, cfg)
    feats.update(_book(book, c, v, atr, cfg, first))
    feats.update(_context(c, v, dollar, trades, atr, feats["natr"], cfg, first))
    feats.update(_higher_timeframes(ts, o, h, low, c, v, vb, book["ob_imbalance_mean"], atr, cfg))
    columns = names + ["atr"]
    rows = np.stack([feats[n][first:] for n in columns])  # one contiguous row per column: cheap checks, no transpose copy
    infinite = np.isinf(rows).any(axis=1)
    if infinite.any():
        raise RuntimeError(f"feature(s) {[columns[i] for i in np.flatnonzero(infinite)]} produced +-inf: a bug")
    longest = max(warmups[n] for n in columns)
    warm = (_bars_of_data(bars["is_gap"].to_numpy(bool))[first:] >= longest) & np.isfinite(rows).all(axis=0)
    frame = pd.DataFrame(rows.T, index=bars.index[first:], columns=columns, copy=False)
    frame["is_warm"] = warm
    return frame


# ---------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    """Write the feature frame of a data folder so users can inspect what the models see. With --start the bars
    of the features' warm-up before it are loaded too (not written), so the requested days' rows are warm."""
    parser = argparse.ArgumentParser(description="Compute model features from a data folder's bars.")
    add_config_args(parser, ["--data-dir", "--timeframe", "--symbol", "--start", "--end", "--ob-levels",
                             "--book-interval"])
    parser.add_argument("-o", "--output", required=True, help="output file: .parquet or .csv")
    parser.add_argument("--all-rows", action="store_true", help="also write rows that are not warm")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = Path(args.output)
    if out.suffix not in (".parquet", ".csv"):
        parser.error(f"--output {out}: expected a .parquet or .csv file name")
    import data_loader  # the CLI reads files; the feature function itself needs only bars

    try:
        cfg = config_from_args(args)
        data_loader.require_data(cfg)
        loaded = data_loader.load_bars(with_warmup(cfg))
    except (ConfigError, data_loader.DataError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    features = compute_features(loaded, cfg)
    elapsed = time.perf_counter() - started
    span = data_loader.clip_days(features, cfg.data.start, cfg.data.end)
    n_warm = int(span["is_warm"].sum())
    if not (n_warm or args.all_rows):
        print(f"error: none of the {len(span)} {cfg.data.timeframe} bars is warm: the features need "
              f"{warmup_bars(cfg)} bars of history after the data's start or a gap (or pass --all-rows)",
              file=sys.stderr)
        return 2
    frame = span if args.all_rows else span[span["is_warm"]]
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".parquet":
        frame.to_parquet(out)
    else:
        frame.to_csv(out, index_label="time")
    before = len(features) - len(span)   # bars loaded before --start for the warm-up (the end is loaded as given)
    print(f"{len(span)} bars ({cfg.data.timeframe})" + (f" after {before} warm-up bars" if before else "")
          + f", {len(feature_names(cfg))} features, warm-up {warmup_bars(cfg)} bars, {n_warm} warm rows; "
          f"computed in {elapsed * 1000:.0f} ms; wrote {len(frame)} rows to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
