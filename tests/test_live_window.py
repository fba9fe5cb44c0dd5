"""The live engine's bar window (live_trading_v2.extend_window) equals the plain recipe it replaces: append the
bar, keep the last `keep` bars, a bar of an existing time replacing that bar. The features the engine computes
on it are therefore compute_features on that window (parity.py layer 2). The drift report reads the window's
features as one block and equals PSI column by column."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import feature_engine as fe
from live_trading_v2 import drift_report, extend_window, psi
from test_feature_engine import make_bars, small_cfg


def reference_window(window: pd.DataFrame, bar: pd.DataFrame, keep: int) -> pd.DataFrame:
    joined = pd.concat([window, bar]).iloc[-keep:]
    return joined[~joined.index.duplicated(keep="last")].copy()


@pytest.mark.parametrize("timeframe", ["5m", "1m"])
def test_window_after_each_bar_equals_the_reference_and_gives_its_features(timeframe: str) -> None:
    rng = np.random.default_rng(3)
    bars = make_bars(500, seed=4, timeframe=timeframe, empty_every=7)
    bars.iloc[300:340, bars.columns.get_indexer(["ob_spread_mean", "ob_imbalance_mean"])] = np.nan
    bars.iloc[350:360, bars.columns.get_loc("ob_samples")] = 0.0
    bars.iloc[400:420, bars.columns.get_loc("is_gap")] = True
    keep = 250
    mine = ref = bars.iloc[:5]
    cfg = small_cfg()
    cfg.data.timeframe = timeframe
    for i in range(5, len(bars)):
        again = [i - 1] if rng.random() < 0.1 else []   # the last close sent again: it replaces the window's copy
        for j in again + [i]:
            bar = bars.iloc[[j]].copy()
            mine, ref = extend_window(mine, bar, keep), reference_window(ref, bar, keep)
            assert mine.equals(ref), f"window differs after bar {bar.index[0]}"
    pd.testing.assert_frame_equal(mine, ref, check_exact=True)
    pd.testing.assert_frame_equal(fe.compute_features(mine, cfg), fe.compute_features(ref, cfg), check_exact=True)


def test_extended_window_is_a_new_frame() -> None:
    bars = make_bars(20)
    window = bars.iloc[:10].copy()
    before = window.copy()
    grown = extend_window(window, bars.iloc[[10]], 10)
    grown["is_gap"] = True   # the engine marks gaps on the new window in place
    pd.testing.assert_frame_equal(window, before)
    assert len(grown) == 10 and grown.index[-1] == bars.index[10]


def test_a_window_out_of_time_order_takes_the_reference_path() -> None:
    bars = make_bars(20)
    window = pd.concat([bars.iloc[:8], bars.iloc[[9]], bars.iloc[[8]]])   # 9 then 8: 9 is not the last
    for bar in (bars.iloc[[9]], bars.iloc[[10]]):
        pd.testing.assert_frame_equal(extend_window(window, bar, 6), reference_window(window, bar, 6),
                                      check_exact=True)


def test_drift_report_equals_psi_of_each_feature_over_the_window() -> None:
    cfg = small_cfg()
    feats = fe.compute_features(make_bars(600, seed=8, empty_every=4), cfg)
    early = feats.iloc[:300]
    quantiles = {n: list(np.nanquantile(early[n].to_numpy(float), np.linspace(0, 1, 11)))
                 for n in fe.feature_names(cfg) if early[n].notna().any()}
    quantiles["not_a_feature"] = [0.0, 1.0, 2.0]
    report = drift_report(feats, quantiles, 200)
    tail = feats.iloc[-200:]
    expected = {n: psi(tail[n].to_numpy(float), q) for n, q in quantiles.items() if n in tail.columns}
    assert report == {n: v for n, v in expected.items() if np.isfinite(v)}
    assert list(report.values()) == sorted(report.values(), reverse=True) and len(report) > 40
