"""feature_engine: no look-ahead, declared warm-ups, finite values, hand-checked maths, bad-input handling."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

import feature_engine as fe
from config import GlobalConfig, bars_for, set_path

TF_SECONDS = {"1m": 60, "5m": 300, "15m": 900, "1h": 3600}


def make_bars(n: int, seed: int = 1, timeframe: str = "5m", start: str = "2026-01-01 00:00",
              empty_every: int = 0) -> pd.DataFrame:
    """A bars frame with the loader's columns: a random walk with volatility clustering and a live book."""
    rng = np.random.default_rng(seed)
    index = pd.date_range(start, periods=n, freq=pd.Timedelta(seconds=TF_SECONDS[timeframe]), tz="UTC",
                          name="time")
    empty = np.zeros(n, bool)
    if empty_every:
        empty[empty_every::empty_every] = True
    vol = 0.002 * np.exp(np.cumsum(rng.normal(0, 0.05, n)) * 0.3)
    close = np.round(100.0 * np.exp(np.cumsum(np.where(empty, 0.0, rng.normal(0, 1, n) * vol))), 2)
    open_ = np.r_[100.0, close[:-1]]
    wick = np.where(empty, 0.0, np.abs(rng.normal(0, 1, (2, n))) * vol * close)
    high = np.round(np.maximum(open_, close) + wick[0], 2)
    low = np.round(np.minimum(open_, close) - wick[1], 2)
    volume = np.where(empty, 0.0, np.round(rng.gamma(2.0, 5.0, n), 3) + 0.001)
    share = np.clip(0.5 + rng.normal(0, 0.12, n), 0.0, 1.0)
    vol_buy = np.round(volume * share, 3)
    vwap = np.where(empty, np.nan, (high + low + close) / 3)
    imbalance = np.clip(rng.normal(0, 0.25, n), -0.99, 0.99)
    depth = rng.gamma(20.0, 10.0, (2, n))
    return pd.DataFrame({
        "open": open_, "high": high, "low": low, "close": close, "volume": volume, "vol_buy": vol_buy,
        "vol_sell": volume - vol_buy, "trade_count": np.where(empty, 0.0, rng.poisson(40, n) + 1.0),
        "dollar_val": np.where(empty, 0.0, volume * np.nan_to_num(vwap)), "vwap": vwap,
        "taker_buy_ratio": np.where(empty, np.nan, vol_buy / np.where(empty, 1.0, volume)), "is_empty": empty,
        "ob_spread_mean": 0.01 * (1 + rng.poisson(0.3, n)), "ob_micro_dev_mean": rng.normal(0, 0.002, n),
        "ob_micro_dev_std": np.abs(rng.normal(0.003, 0.001, n)), "ob_micro_dev_last": rng.normal(0, 0.002, n),
        "ob_imbalance_mean": imbalance, "ob_imbalance_last": imbalance,
        "ob_bid_depth_mean": depth[0], "ob_ask_depth_mean": depth[1],
        "ob_bid_slope_mean": rng.gamma(5.0, 0.0005, n), "ob_ask_slope_mean": rng.gamma(5.0, 0.0005, n),
        "ob_bid_integrity_mean": rng.uniform(0.01, 0.1, n), "ob_ask_integrity_mean": rng.uniform(0.01, 0.1, n),
        "ob_mid_last": close, "ob_ofi_sum": rng.normal(0, 5, n), "ob_samples": np.full(n, 300.0),
        "is_gap": np.zeros(n, bool),
    }, index=index)


def small_cfg(**features: object) -> GlobalConfig:
    """Default config with shorter regime windows, so frames of a few hundred bars get warm."""
    cfg = GlobalConfig()
    for key, value in {"day_window": "4h", "macro_window": "12h", "vwap_windows": ["1h", "4h"],
                       "htf_span": 4, **features}.items():
        set_path(cfg, f"features.{key}", value)
    cfg.validate()
    return cfg


def outage(bars: pd.DataFrame, first: int, length: int) -> pd.DataFrame:
    """The same bars with no book data (ob_samples 0, stats NaN) for `length` bars from `first`."""
    bars = bars.copy()
    rows = bars.index[first:first + length]
    book = [c for c in bars.columns if c.startswith("ob_") and c != "ob_samples"]
    bars.loc[rows, book] = np.nan
    bars.loc[rows, "ob_samples"] = 0.0
    return bars


def assert_rows_equal(a: pd.Series, b: pd.Series, rtol: float = 1e-9) -> None:
    """Same NaN pattern and values within rtol, column by column, naming the first offender."""
    for name in a.index:
        x, y = a[name], b[name]
        if name == "is_warm":
            assert x == y, f"is_warm differs at {a.name}"
            continue
        ok = (math.isnan(x) and math.isnan(y)) or abs(x - y) <= rtol * max(1.0, abs(y))
        assert ok, f"{name} at {a.name}: truncated {x!r} vs full history {y!r}"


# ---------------------------------------------------------------- no look-ahead
@pytest.mark.parametrize("timeframe", ["5m", "1m"])
def test_every_feature_on_history_truncated_at_t_equals_full_history(timeframe: str) -> None:
    cfg = GlobalConfig() if timeframe == "5m" else small_cfg()
    set_path(cfg, "data.timeframe", timeframe)
    n = fe.warmup_bars(cfg) + 300
    bars = outage(make_bars(n, seed=3, timeframe=timeframe, start="2026-01-01 00:35", empty_every=17), 400, 40)
    full = fe.compute_features(bars, cfg)
    assert list(full.columns) == fe.feature_names(cfg) + ["atr", "is_warm"]
    rng = np.random.default_rng(0)
    points = sorted(set(rng.integers(0, n, 30).tolist()) | {0, 1, 11, 12, 23, 24, 401, 439, n - 2})
    for t in points:
        assert_rows_equal(fe.compute_features(bars.iloc[:t + 1], cfg).iloc[-1], full.iloc[t])
    assert full["is_warm"].iloc[-300:].all()


def test_declared_warmup_makes_a_late_start_agree_with_full_history() -> None:
    """Live runs on a window that starts anywhere: past each feature's warm-up the start must not matter."""
    cfg = small_cfg()
    bars = make_bars(1400, seed=5, empty_every=23)
    full = fe.compute_features(bars, cfg)
    warm = fe.feature_warmups(cfg)
    for start in (7, 130):  # 7 starts mid-hour: the partial higher-timeframe bar must be ignored
        late = fe.compute_features(bars.iloc[start:], cfg)
        for name in fe.feature_names(cfg) + ["atr"]:
            a = late[name].to_numpy()[warm[name]:]
            b = full[name].to_numpy()[start + warm[name]:]
            assert np.isfinite(a).all(), f"{name} not finite after its declared warm-up"
            scale = np.maximum(1.0, np.abs(b))
            worst = np.max(np.abs(a - b) / scale)
            assert worst < 5e-3, f"{name}: warm-up {warm[name]} bars too short, start {start} differs by {worst}"


def test_rows_before_warmup_are_marked_and_not_zero_filled() -> None:
    cfg = small_cfg()
    bars = make_bars(fe.warmup_bars(cfg) + 50, seed=2)
    out = fe.compute_features(bars, cfg)
    first_warm = fe.warmup_bars(cfg)
    assert not out["is_warm"].iloc[:first_warm].any()
    assert out["is_warm"].iloc[first_warm:].all()
    vwap_window = bars_for("4h", "5m")
    assert out["vwap_4h_dist"].iloc[:vwap_window - 1].isna().all()
    assert out["bb_percent_b"].iloc[:bars_for(cfg.features.bb_window, "5m") - 1].isna().all()
    assert out["htf_1h_ret"].iloc[:11].isna().all()  # no hour has closed yet


def test_values_are_finite_after_each_declared_warmup() -> None:
    cfg = GlobalConfig()
    bars = make_bars(fe.warmup_bars(cfg) + 200, seed=11, empty_every=9)
    out = fe.compute_features(bars, cfg)
    for name, warm in fe.feature_warmups(cfg).items():
        values = out[name].to_numpy()[warm:]
        assert np.isfinite(values).all(), f"{name} has non-finite values after its warm-up of {warm} bars"
    assert not np.isinf(out.drop(columns="is_warm").to_numpy()).any()


# ---------------------------------------------------------------- hand-checked values
def tiny_bars() -> tuple[pd.DataFrame, GlobalConfig]:
    """Five 5m bars whose features are worked out by hand below; bar 2 is empty."""
    cfg = GlobalConfig()
    for key, value in {"atr_span": "15m", "rsi_span": "10m", "z_window": "20m", "imbalance_z_window": "15m",
                       "vwap_windows": ["15m"]}.items():
        set_path(cfg, f"features.{key}", value)
    cfg.validate()
    bars = make_bars(5, seed=1)
    bars["open"] = [10.0, 10.0, 11.0, 11.0, 10.5]
    bars["high"] = [10.5, 11.2, 11.0, 11.5, 12.0]
    bars["low"] = [9.8, 9.9, 11.0, 10.4, 10.4]
    bars["close"] = [10.0, 11.0, 11.0, 10.5, 12.0]
    bars["volume"] = [2.0, 4.0, 0.0, 5.0, 10.0]
    bars["vol_buy"] = [1.0, 2.8, 0.0, 3.0, 9.0]
    bars["dollar_val"] = [20.0, 42.0, 0.0, 54.0, 115.0]
    bars["is_empty"] = [False, False, True, False, False]
    bars["trade_count"] = [3.0, 5.0, 0.0, 4.0, 9.0]
    bars["ob_imbalance_mean"] = [0.1, 0.3, 0.2, 0.6, 0.6]
    return bars, cfg


def test_atr_is_an_ewm_of_true_range_with_alpha_from_the_span() -> None:
    bars, cfg = tiny_bars()
    out = fe.compute_features(bars, cfg)
    tr = [0.7, max(1.3, 0.2, 0.1), 0.0, max(1.1, 0.5, 0.6), max(1.6, 1.5, 0.1)]
    atr = [tr[0]]
    for x in tr[1:]:
        atr.append(0.5 * atr[-1] + 0.5 * x)  # span 15m = 3 bars -> alpha 2 / (3 + 1)
    np.testing.assert_allclose(out["atr"], atr, rtol=1e-12)
    np.testing.assert_allclose(out["natr"], np.array(atr) / bars["close"], rtol=1e-12)


def test_rsi_is_wilder_gain_share() -> None:
    bars, cfg = tiny_bars()
    rsi = fe.compute_features(bars, cfg)["rsi"]
    gain, loss = [1.0], [0.0]  # alpha 1/2: diffs +1, 0, -0.5, +1.5
    for d in (0.0, -0.5, 1.5):
        gain.append(0.5 * gain[-1] + 0.5 * max(d, 0.0))
        loss.append(0.5 * loss[-1] + 0.5 * max(-d, 0.0))
    expected = [100 * g / (g + lo) for g, lo in zip(gain, loss)]
    assert math.isnan(rsi.iloc[0])
    np.testing.assert_allclose(rsi.iloc[1:], expected, rtol=1e-12)
    assert rsi.iloc[4] == pytest.approx(100 * 0.875 / (0.875 + 0.125))


def test_taker_buy_z_is_centred_on_its_rolling_mean_and_skips_empty_bars() -> None:
    bars, cfg = tiny_bars()
    out = fe.compute_features(bars, cfg)
    assert out["taker_buy_ratio"].tolist() == pytest.approx([0.5, 0.7, 0.5, 0.6, 0.9])
    assert out["taker_buy_z"].iloc[2] == 0.0  # empty bar: neutral, not a fake 0.5 observation
    assert math.isnan(out["taker_buy_z"].iloc[1])  # two traded bars: too few for a z-score
    window = [0.5, 0.7, 0.6]  # bars 0..3 with bar 2 empty
    assert out["taker_buy_z"].iloc[3] == pytest.approx((0.6 - 0.6) / np.std(window, ddof=1), abs=1e-12)
    window = [0.7, 0.6, 0.9]
    z4 = (0.9 - np.mean(window)) / np.std(window, ddof=1)
    assert out["taker_buy_z"].iloc[4] == pytest.approx(z4)


def test_imbalance_z_uses_a_floored_std() -> None:
    bars, cfg = tiny_bars()
    z = fe.compute_features(bars, cfg)["ob_imbalance_z"]
    window = np.array([0.3, 0.2, 0.6])
    assert z.iloc[3] == pytest.approx((0.6 - window.mean()) / window.std(ddof=1))
    window = np.array([0.2, 0.6, 0.6])
    assert z.iloc[4] == pytest.approx((0.6 - window.mean()) / window.std(ddof=1))
    flat = bars.assign(ob_imbalance_mean=0.25)
    assert fe.compute_features(flat, cfg)["ob_imbalance_z"].iloc[2:].abs().max() < 1e-9


def test_vwap_distance_is_in_atr_over_a_time_window() -> None:
    bars, cfg = tiny_bars()
    out = fe.compute_features(bars, cfg)
    vwap4 = (0.0 + 54.0 + 115.0) / (0.0 + 5.0 + 10.0)
    assert out["vwap_15m_dist"].iloc[4] == pytest.approx((12.0 - vwap4) / out["atr"].iloc[4])
    vwap2 = (20.0 + 42.0) / 6.0
    assert out["vwap_15m_dist"].iloc[2] == pytest.approx((11.0 - vwap2) / out["atr"].iloc[2])
    assert out["vwap_15m_dist"].iloc[:2].isna().all()



def test_flow_and_volatility_features_by_hand() -> None:
    bars, cfg = tiny_bars()
    set_path(cfg, "features.intraday_window", "15m")
    before = bars.copy()
    out = fe.compute_features(bars, cfg)
    pd.testing.assert_frame_equal(bars, before)  # the input is never modified
    top = 0.5 * (bars["ob_bid_depth_mean"] * bars["ob_bid_integrity_mean"]
                 + bars["ob_ask_depth_mean"] * bars["ob_ask_integrity_mean"])
    np.testing.assert_allclose(out["ofi_norm"], bars["ob_ofi_sum"] / top, rtol=1e-12)
    r = [math.log(11 / 11), math.log(10.5 / 11), math.log(12 / 10.5)]
    per_hour = 12  # 5m bars
    expected = math.sqrt(sum(x * x for x in r) / 3 * per_hour) * 1e4
    assert out["rv_intraday"].iloc[4] == pytest.approx(expected)
    bid = bars["ob_bid_depth_mean"].to_numpy()
    assert out["bid_depth_chg"].iloc[3] == pytest.approx((bid[3] - bid[2]) / (bid[3] + bid[2]))
    spread = bars["ob_spread_mean"].iloc[4]
    assert out["ob_spread_bps"].iloc[4] == pytest.approx(spread / 12.0 * 1e4)


# ---------------------------------------------------------------- higher timeframes
def test_higher_timeframe_bar_is_used_only_after_it_closes() -> None:
    cfg = small_cfg()
    bars = make_bars(60, seed=4, start="2026-01-01 00:00")
    out = fe.compute_features(bars, cfg)
    t = bars.index
    # the 00:00-00:15 bar closes with the 00:10 base bar: before that nothing is known
    assert out.loc[t[:2], "htf_15m_ret"].isna().all()
    first = bars.iloc[0:3]
    expected = (first["close"].iloc[-1] - first["open"].iloc[0]) / out["atr"]
    assert out.loc[t[2], "htf_15m_ret"] == pytest.approx(expected.iloc[2])
    assert out.loc[t[3], "htf_15m_ret"] == pytest.approx(expected.iloc[3])  # same closed bar, today's atr
    rng = (first["high"].max() - first["low"].min()) / out["atr"].iloc[4]
    assert out.loc[t[4], "htf_15m_range"] == pytest.approx(rng)
    share = first["vol_buy"].sum() / first["volume"].sum()
    assert out.loc[t[2:5], "htf_15m_taker_buy"].tolist() == pytest.approx([share] * 3)
    assert out.loc[t[5], "htf_15m_taker_buy"] == pytest.approx(
        bars["vol_buy"].iloc[3:6].sum() / bars["volume"].iloc[3:6].sum())
    assert out.loc[t[:11], "htf_1h_ret"].isna().all() and np.isfinite(out.loc[t[11], "htf_1h_ret"])


def test_changing_an_open_higher_timeframe_bar_leaves_earlier_rows_alone() -> None:
    cfg = small_cfg()
    bars = make_bars(80, seed=4)
    moved = bars.copy()
    moved.iloc[16, moved.columns.get_loc("vol_buy")] = 0.0  # 01:20, inside the 01:15-01:30 bar
    moved.iloc[16, moved.columns.get_loc("ob_imbalance_mean")] = -0.9
    a, b = fe.compute_features(bars, cfg), fe.compute_features(moved, cfg)
    htf = [c for c in a.columns if c.startswith("htf_")]
    pd.testing.assert_frame_equal(a[htf].iloc[:17], b[htf].iloc[:17])
    for name in ("htf_15m_taker_buy", "htf_15m_imbalance"):
        assert (a[name].iloc[17:20] > b[name].iloc[17:20]).all()


def test_partial_first_higher_timeframe_bar_is_ignored() -> None:
    cfg = small_cfg()
    bars = make_bars(40, seed=4, start="2026-01-01 00:05")
    out = fe.compute_features(bars, cfg)
    # 00:05 and 00:10 form a partial 00:00 bar; the first complete one closes with the 00:25 base bar
    assert out["htf_15m_ret"].iloc[:4].isna().all() and np.isfinite(out["htf_15m_ret"].iloc[4])


# ---------------------------------------------------------------- price level, empty bars, missing book
def test_no_feature_depends_on_the_price_level() -> None:
    """Scaling every price by 10 (and the tick with it) must leave every model feature unchanged."""
    cfg = small_cfg()
    bars = make_bars(700, seed=8, empty_every=13)
    scaled = bars.copy()
    prices = ["open", "high", "low", "close", "vwap", "dollar_val", "ob_spread_mean", "ob_micro_dev_mean",
              "ob_micro_dev_std", "ob_micro_dev_last", "ob_bid_slope_mean", "ob_ask_slope_mean", "ob_mid_last"]
    scaled[prices] = scaled[prices] * 10.0
    cfg10 = small_cfg()
    set_path(cfg10, "instrument.tick_size", cfg.instrument.tick_size * 10)
    a, b = fe.compute_features(bars, cfg), fe.compute_features(scaled, cfg10)
    names = fe.feature_names(cfg)
    pd.testing.assert_frame_equal(a[names], b[names], rtol=1e-9, atol=1e-12)
    assert not {"open", "high", "low", "close", "vwap", "ob_mid_last"} & set(names)
    pd.testing.assert_series_equal(a["atr"] * 10, b["atr"], rtol=1e-9)


def test_empty_bars_stay_out_of_trade_flow_statistics() -> None:
    cfg = small_cfg()
    bars = make_bars(400, seed=6, empty_every=3)
    out = fe.compute_features(bars, cfg)
    empty = bars["is_empty"].to_numpy()
    assert (out["taker_buy_ratio"][empty] == 0.5).all()
    assert (out["taker_buy_z"][empty] == 0.0).all()
    window = bars_for(cfg.features.z_window, "5m")
    t = 301
    share = (bars["vol_buy"] / bars["volume"]).iloc[t - window + 1:t + 1][~empty[t - window + 1:t + 1]]
    assert not empty[t]
    assert out["taker_buy_z"].iloc[t] == pytest.approx((share.iloc[-1] - share.mean()) / share.std(ddof=1))
    assert out["is_warm"].iloc[fe.warmup_bars(cfg):].all()


def test_short_book_gap_is_carried_and_long_gap_is_not_warm() -> None:
    cfg = small_cfg()
    bars = make_bars(900, seed=9)
    limit = bars_for(cfg.features.book_ffill, "5m")
    base = fe.compute_features(bars, cfg)
    out = fe.compute_features(outage(outage(bars, 500, limit), 600, limit + 30), cfg)
    gap = slice(500, 500 + limit)
    assert out["is_warm"].iloc[gap].all()
    assert (out["ob_bid_integrity_mean"].iloc[gap] == bars["ob_bid_integrity_mean"].iloc[499]).all()
    assert (out["ofi_norm"].iloc[gap] == 0.0).all()
    stale = slice(600 + limit, 630 + limit)
    assert out["ob_imbalance_z"].iloc[stale].isna().all() and not out["is_warm"].iloc[stale].any()
    assert out["ob_imbalance_z"].iloc[600:600 + limit].notna().all()
    assert out["is_warm"].iloc[-100:].all()
    trade_side = ["rsi", "dist_ema_21", "taker_buy_z", "vol_z", "vwap_4h_dist", "rv_day", "htf_1h_ret"]
    pd.testing.assert_frame_equal(out[trade_side], base[trade_side])


@pytest.mark.parametrize("limit", [0, 3, 40, fe._NEVER])
def test_carry_kernel_equals_the_array_formula(limit: int) -> None:
    """The compiled carry (last valid value at most `limit` bars old, and its age) against the plain array
    formula it replaced, on valid masks with long runs, single holes and an invalid start."""
    rng = np.random.default_rng(limit % 97)
    x = rng.normal(size=2000)
    valid = np.repeat(rng.random(200) < 0.7, rng.integers(1, 20, 200))[:2000]
    valid = np.r_[valid, np.ones(2000 - valid.size, bool)] & (rng.random(2000) < 0.9)
    valid[:5] = False
    idx = np.arange(x.size)
    last = np.maximum.accumulate(np.where(valid, idx, -1))
    age = np.where(last >= 0, idx - last, np.iinfo(np.int64).max)
    filled = np.where((last >= 0) & (age <= limit), x[np.maximum(last, 0)], np.nan)
    got_filled, got_age = fe._carry(x, valid, limit)
    np.testing.assert_array_equal(got_filled, filled)
    np.testing.assert_array_equal(got_age, age)


@pytest.mark.parametrize("window", [1, 2, 7, 24, 300])
def test_rolling_statistics_from_a_later_row_equal_a_run_from_row_zero(window: int) -> None:
    x = np.random.default_rng(window).normal(size=900)
    x[np.random.default_rng(1).random(900) < 0.2] = np.nan
    x[400:460] = np.nan
    full = fe._rolling_mean_std(x, window, 1, 1)
    for first in (0, 1, window - 1, window, window + 1, 2 * window - 1, 455, 899):
        part = fe._rolling_mean_std(x, window, 1, 1, first)
        for got, want in zip(part, full):
            np.testing.assert_array_equal(got[first:], want[first:])


@pytest.mark.parametrize("timeframe", ["5m", "1m"])
def test_last_rows_only_equal_the_same_rows_of_the_full_frame(timeframe: str) -> None:
    """The live call (compute_features(..., last=k)) on random bars with empty bars, book outages, NaN book
    columns and gap bars: bit-equal to the last k rows of the full computation."""
    cfg = small_cfg()
    cfg.data.timeframe = timeframe
    bars = outage(make_bars(3000, seed=12, timeframe=timeframe, empty_every=6), 700, 40)
    bars.iloc[900:930, bars.columns.get_indexer(["ob_spread_mean", "ob_bid_depth_mean", "ob_ofi_sum"])] = np.nan
    bars.iloc[300:310, bars.columns.get_loc("is_gap")] = True
    bars.iloc[2950:2980, bars.columns.get_loc("is_empty")] = True
    full = fe.compute_features(bars, cfg)
    assert full["is_warm"].iloc[-1] and not full["is_warm"].iloc[300:310].any()
    for last in (1, 2, 50, 399, 2800, 4000):
        pd.testing.assert_frame_equal(fe.compute_features(bars, cfg, last=last), full.iloc[-last:], check_exact=True)


def test_degenerate_market_gives_finite_neutral_features() -> None:
    """A frozen market (one price, no trades, constant book) must not produce inf or blow-ups."""
    cfg = small_cfg()
    bars = make_bars(600, seed=1)
    frozen = bars.index[300:]
    for col in ("open", "high", "low", "close"):
        bars.loc[frozen, col] = bars["close"].iloc[299]
    for col in ("volume", "vol_buy", "vol_sell", "trade_count", "dollar_val", "ob_ofi_sum"):
        bars.loc[frozen, col] = 0.0
    bars.loc[frozen, "is_empty"] = True
    for col in fe.BOOK_STATE_COLUMNS:
        bars.loc[frozen, col] = bars[col].iloc[299]
    bars.loc[frozen, ["ob_bid_slope_mean", "ob_ask_slope_mean"]] = 0.0
    out = fe.compute_features(bars, cfg)
    tail = out.iloc[-50:]
    assert np.isfinite(tail[fe.feature_names(cfg)].to_numpy()).all()
    assert (tail["atr"] == cfg.instrument.tick_size).all()  # floored at one tick, so ratios stay finite
    neutral = ["taker_buy_z", "ob_imbalance_z", "spread_z", "vol_z", "ofi_z", "dist_ema_9"]
    assert (tail[neutral].abs() < 1e-6).all().all()


# ---------------------------------------------------------------- registry and input checks
def test_windows_are_defined_in_time_not_bars() -> None:
    five, one = GlobalConfig(), GlobalConfig()
    set_path(one, "data.timeframe", "1m")
    w5, w1 = fe.feature_warmups(five), fe.feature_warmups(one)
    for name in ("bb_percent_b", "vwap_24h_dist", "vol_macro", "spread_z", "liq_dominance"):
        assert w1[name] == 5 * w5[name], name
    assert fe.feature_names(one) == fe.feature_names(five)
    hourly = GlobalConfig()
    set_path(hourly, "data.timeframe", "1h")
    assert not [n for n in fe.feature_names(hourly) if n.startswith("htf_")]  # nothing above 1h configured


def test_microstructure_only_drops_indicator_inputs() -> None:
    cfg = GlobalConfig()
    set_path(cfg, "features.microstructure_only", True)
    names = fe.feature_names(cfg)
    assert "ob_imbalance_z" in names and "ofi_norm" in names
    assert not [n for n in names if "ema_" in n or "rsi" in n or "atr" in n]
    out = fe.compute_features(make_bars(400, seed=2), cfg)
    assert list(out.columns) == names + ["atr", "is_warm"]
    assert fe.warmup_bars(cfg) < fe.warmup_bars(GlobalConfig())


@pytest.mark.parametrize("breakage, message", [
    (lambda b: b.drop(columns=["ob_ofi_sum"]), "ob_ofi_sum"),
    (lambda b: b.drop(columns=["is_gap"]), "is_gap.*mark_gaps"),
    (lambda b: b.drop(index=b.index[10]), "continuous 5m grid"),
    (lambda b: b.assign(close=np.where(np.arange(len(b)) == 7, 0.0, b["close"])), "00:35.*close = 0.0, expected"),
    (lambda b: b.assign(volume=np.where(np.arange(len(b)) == 3, np.nan, b["volume"])), "volume = nan"),
    (lambda b: b.tz_localize(None), "tz-aware"),
    (lambda b: b.set_axis(b.index + pd.Timedelta("1min")), "not aligned"),
])
def test_bad_bars_are_rejected_with_a_clear_message(breakage, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        fe.compute_features(breakage(make_bars(30)), GlobalConfig())


def test_empty_frame_gives_empty_features_with_all_columns() -> None:
    cfg = GlobalConfig()
    out = fe.compute_features(make_bars(5).iloc[:0], cfg)
    assert out.empty and list(out.columns) == fe.feature_names(cfg) + ["atr", "is_warm"]


# ---------------------------------------------------------------- CLI on files the loader reads
def test_cli_writes_the_features_of_a_simulated_data_folder(tmp_path, capsys) -> None:
    import data_loader
    import market_sim

    folder = market_sim.simulate(days=1, seed=5, out=tmp_path / "data", levels=50)
    sets = ["features.day_window=4h", "features.macro_window=12h", "features.htf_span=2",
            "features.vwap_windows=1h,4h"]
    out = tmp_path / "features.parquet"
    args = ["--data-dir", str(folder), "--timeframe", "5m"] + [a for s in sets for a in ("--set", s)]
    assert fe.main([*args, "-o", str(out), "--all-rows"]) == 0
    assert f"wrote 288 rows to {out}" in capsys.readouterr().out
    written = pd.read_parquet(out)
    cfg = small_cfg(htf_span=2)
    set_path(cfg, "data.data_dir", str(folder))
    expected = fe.compute_features(data_loader.load_bars(cfg), cfg)
    pd.testing.assert_frame_equal(written, expected, check_freq=False)
    assert len(written) == 288 and written["is_warm"].iloc[fe.warmup_bars(cfg):].all()
    warm_only = tmp_path / "warm.csv"
    assert fe.main([*args, "-o", str(warm_only)]) == 0
    csv = pd.read_csv(warm_only, index_col="time", parse_dates=["time"])
    assert len(csv) == int(expected["is_warm"].sum()) > 0 and csv["is_warm"].all()
    np.testing.assert_allclose(csv["ofi_z"], expected.loc[expected["is_warm"], "ofi_z"], rtol=1e-9)
    with pytest.raises(SystemExit):
        fe.main([*args, "-o", str(tmp_path / "x.json")])
    assert ".parquet or .csv" in capsys.readouterr().err


SMALL_SETS = [a for s in ("features.day_window=4h", "features.macro_window=12h", "features.htf_span=2",
                          "features.vwap_windows=1h,4h") for a in ("--set", s)]


def test_cli_start_loads_the_warmup_before_it_so_the_days_rows_are_warm(missing_day_folder, tmp_path, capsys) -> None:
    """--start D --end D: the warm-up bars before D are loaded (not written), so every bar of D is written warm,
    with the values the whole history up to D gives them, and the printed counts say so."""
    import data_loader

    out = tmp_path / "day.parquet"
    args = ["--data-dir", str(missing_day_folder), "--timeframe", "5m", *SMALL_SETS, "-o", str(out)]
    assert fe.main([*args, "--start", "2026-01-06", "--end", "2026-01-06"]) == 0
    written = pd.read_parquet(out)
    day = pd.date_range("2026-01-06", periods=288, freq="5min", tz="UTC")
    assert written.index.equals(day) and written["is_warm"].all()
    cfg = small_cfg(htf_span=2)
    set_path(cfg, "data.data_dir", str(missing_day_folder))
    set_path(cfg, "data.end", "2026-01-06")
    full = fe.compute_features(data_loader.load_bars(cfg), cfg).loc[day]
    for name in fe.feature_names(cfg) + ["atr"]:
        a, b = written[name].to_numpy(), full[name].to_numpy()
        assert np.max(np.abs(a - b) / np.maximum(1.0, np.abs(b))) < 5e-3, name
    before = fe.warmup_bars(cfg) * 300 / 86400       # days of warm-up, loaded as whole days before the 6th
    text = capsys.readouterr().out
    assert f"288 bars (5m) after {288 * math.ceil(before)} warm-up bars" in text
    assert "288 warm rows; " in text and f"wrote 288 rows to {out}" in text


@pytest.mark.parametrize("case", ["missing_folder", "start_after_end", "span_without_data", "invalid_date",
                                  "other_symbol", "no_warm_row"])
def test_cli_refuses_ordinary_mistakes_in_one_line(case, missing_day_folder, tmp_path, capsys) -> None:
    folder = str(missing_day_folder)
    args, needle = {
        "missing_folder": (["--data-dir", str(tmp_path / "nope")], f"data folder {tmp_path / 'nope'} does not exist"),
        "start_after_end": (["--data-dir", folder, "--start", "2026-01-05", "--end", "2026-01-04"],
                            "data.end = '2026-01-04' is before config.data.start = '2026-01-05'"),
        "span_without_data": (["--data-dir", folder, "--start", "2026-03-01"],
                              f"start 2026-03-01: the data in {folder} covers 2026-01-01 to 2026-01-07"),
        "invalid_date": (["--data-dir", folder, "--start", "2026-13-01"], "data.start = '2026-13-01' is invalid"),
        "other_symbol": (["--data-dir", folder, "--symbol", "BTCUSDT"], f"the data in {folder} is DEMOUSDT"),
        "no_warm_row": (["--data-dir", folder, "--start", "2026-01-04", "--end", "2026-01-04"],
                        "none of the 288 5m bars is warm"),   # the default 3-day warm-up restarts after the gap
    }[case]
    out = tmp_path / "f.parquet"
    assert fe.main([*args, "--timeframe", "5m", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, err
    assert not out.exists()


# ---------------------------------------------------------------- data gaps (issue 17, item 4)
def test_gap_bars_are_never_warm_and_features_rewarm_after_the_gap(missing_day_folder) -> None:
    """The missing day's 288 fabricated bars: none warm, none of the next warm-up warm; once warm again the
    features equal a fresh start right after the gap, so no window treats the fabricated bars as data."""
    import data_loader

    cfg = small_cfg()
    set_path(cfg, "data.data_dir", str(missing_day_folder))
    bars = data_loader.load_bars(cfg)
    out = fe.compute_features(bars, cfg)
    gap = np.flatnonzero(bars["is_gap"].to_numpy())
    assert len(gap) == 288 and gap[-1] - gap[0] == 287
    after, warmup = gap[-1] + 1, fe.warmup_bars(cfg)
    assert gap[0] > warmup and out["is_warm"].iloc[warmup:gap[0]].all()  # warm right up to the hole
    assert not out["is_warm"].iloc[gap[0]:after + warmup].any()
    assert out["is_warm"].iloc[after + warmup:].all()
    fresh = fe.compute_features(bars.iloc[after:], cfg)
    assert fresh["is_warm"].tolist() == out["is_warm"].iloc[after:].tolist()
    rewarmed = out.iloc[after + warmup:]
    for name in fe.feature_names(cfg) + ["atr"]:
        a, b = fresh[name].iloc[warmup:].to_numpy(), rewarmed[name].to_numpy()
        worst = np.max(np.abs(a - b) / np.maximum(1.0, np.abs(a)))
        assert worst < 5e-3, f"{name}: still leans on the gap {warmup} bars after it (differs by {worst})"
    for t in (gap[0], gap[0] + 3, after, after + warmup - 1, after + warmup, after + warmup + 7):
        assert_rows_equal(fe.compute_features(bars.iloc[:t + 1], cfg).iloc[-1], out.iloc[t])


def test_backtest_makes_no_entry_decision_on_a_gap_bar(missing_day_folder) -> None:
    """Probabilities exist only where features are warm (as ModelBundle.predict_where gives them), so the
    backtest's strategy decides no entry inside the missing day nor in the re-warm-up after it."""
    import backtest
    import data_loader

    cfg = small_cfg()
    set_path(cfg, "data.data_dir", str(missing_day_folder))
    bars = data_loader.load_bars(cfg)
    feats = fe.compute_features(bars, cfg)
    frame = bars[backtest.PRICE_COLUMNS].assign(atr=feats["atr"])
    sure = pd.DataFrame(0.99, index=bars.index, columns=backtest.PROB_COLUMNS)  # breakout entries whenever free
    gap = np.flatnonzero(bars["is_gap"].to_numpy())
    cold = np.arange(gap[0], gap[-1] + 1 + fe.warmup_bars(cfg))
    for probs, entries_in_gap in ((sure, True), (sure.where(feats["is_warm"], axis=0), False)):
        intents = backtest.run_backtest(frame, probs, cfg, record_intents=True).intents
        bars_with_entries = intents.loc[intents["kind"].isin(["market", "limit"]), "bar"].to_numpy()
        assert np.isin(bars_with_entries, cold).any() == entries_in_gap
        assert len(bars_with_entries) > 0


def assert_within_reach(seen: pd.DataFrame, full: pd.DataFrame, cfg: GlobalConfig, reach: dict[str, int],
                        last: int) -> dict[str, bool]:
    """Features computed on bars altered up to row `last` (`seen`) against the true ones: a feature outside
    `reach` equal everywhere, one inside equal (1e-9) from last + its reach on. Returns, per feature in reach,
    whether the alteration showed in it at all."""
    touched = {}
    for name in fe.feature_names(cfg) + ["atr"]:
        a, b = seen[name].to_numpy(), full[name].to_numpy()
        same = (a == b) | (np.isnan(a) & np.isnan(b))
        if name not in reach:
            assert same.all(), f"{name} reads the altered columns but is not in the reach"
            continue
        after = last + reach[name]
        scale = np.maximum(1.0, np.abs(b[after:]))
        assert np.nanmax(np.abs(a[after:] - b[after:]) / scale) < 1e-9, f"{name}: reach {reach[name]} too short"
        assert np.array_equal(np.isnan(a[after:]), np.isnan(b[after:])), name
        touched[name] = not same[:after].all()
    return touched


@pytest.mark.parametrize("timeframe", ["1m", "5m"])
def test_a_bar_with_partial_book_columns_reaches_only_the_book_features_and_only_for_their_declared_reach(
        timeframe: str) -> None:
    """The engine that starts listening inside a bar has that bar's trades (REST recent trades) but only part of
    its book: every feature outside book_reach must be untouched, and each book feature exact again from that
    bar + its reach on; the engine waits book_warmup_bars, not the days of the longest warm-up."""
    cfg = small_cfg()
    set_path(cfg, "data.timeframe", timeframe)
    bars = make_bars(fe.warmup_bars(cfg) + 400, seed=7, timeframe=timeframe, empty_every=29)
    k = fe.warmup_bars(cfg) + 37
    partial = bars.copy()
    book = [c for c in bars.columns if c.startswith("ob_")]
    partial.loc[partial.index[k], book] = bars.iloc[k + 150][book].to_numpy() * 1.3   # another bar's book, off
    partial.loc[partial.index[k:k + 20], book] = np.nan   # then bookless bars: the carry lends it its stats
    partial.loc[partial.index[k + 1:k + 20], "ob_samples"] = 0.0
    bars.loc[bars.index[k + 1:k + 20], book] = np.nan
    bars.loc[bars.index[k + 1:k + 20], "ob_samples"] = 0.0
    partial.loc[partial.index[k], "ob_samples"] = 12.0
    touched = assert_within_reach(fe.compute_features(partial, cfg), fe.compute_features(bars, cfg), cfg,
                                  fe.book_reach(cfg), k)
    assert sum(touched.values()) >= len(touched) - 2   # the partial bar did reach (almost) every book feature
    assert 0 < fe.book_warmup_bars(cfg) < fe.warmup_bars(cfg) / 3


@pytest.mark.parametrize("m", [7, 40])   # shorter and longer than the book_ffill carry
def test_bars_known_only_from_klines_reach_only_the_book_and_flow_features(m: int) -> None:
    """A restart fills the bars it missed from REST klines: OHLCV and turnover whole, the book, the taker split
    and the trade count unknown. Every feature outside book_reach and flow_reach is untouched, each inside is
    exact again from the last such bar + its reach, so the engine waits kline_warmup_bars, not the longest
    warm-up."""
    cfg = small_cfg()
    set_path(cfg, "data.timeframe", "1m")
    bars = make_bars(fe.warmup_bars(cfg) + 700, seed=9, timeframe="1m", empty_every=31)
    k = fe.warmup_bars(cfg) + 41
    klines = bars.copy()
    rows = klines.index[k:k + m]
    book = [c for c in bars.columns if c.startswith("ob_")]
    klines.loc[rows, book] = np.nan
    klines.loc[rows, "ob_samples"] = 0.0
    klines.loc[rows, ["vol_buy", "vol_sell"]] = (klines.loc[rows, ["volume", "volume"]] / 2).to_numpy()
    klines.loc[rows, "taker_buy_ratio"] = 0.5
    klines.loc[rows, "trade_count"] = (klines.loc[rows, "volume"] > 0).astype(float)
    touched = assert_within_reach(fe.compute_features(klines, cfg), fe.compute_features(bars, cfg), cfg,
                                  fe.kline_reach(cfg), k + m - 1)
    assert any(touched.values()) and set(fe.flow_reach(cfg)) <= set(touched)
    assert fe.book_warmup_bars(cfg) <= fe.kline_warmup_bars(cfg) < fe.warmup_bars(cfg)
