"""Execution and direction labels: hand-built scenarios pin each rule; a plain-Python reference pins the rest."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from config import GlobalConfig
from label_reference import reference_labels
from labels import crosses_gap, direction_labels, execution_labels, make_labels

# Signal at bar 0: close 100, ATR 2. Long limit 99 (offset 0.5); TP = entry + 2, SL = entry - 2 (1 ATR each).
P = dict(offset_atr=0.5, tp_atr=1.0, sl_atr=1.0, time_limit_bars=3, max_holding_bars=4, maker_fee=0.0)


def bars(rows: list[tuple[float, float, float, float]], atr: float = 2.0) -> dict[str, np.ndarray]:
    """OHLC arrays from (open, high, low, close) rows with a constant ATR."""
    arr = np.array(rows, dtype=np.float64)
    return {"open": arr[:, 0], "high": arr[:, 1], "low": arr[:, 2], "close": arr[:, 3],
            "atr": np.full(len(rows), atr)}


def label0(rows, side=1, fill_rule="trade_through", **overrides):
    """Label and t1 of the signal at bar 0."""
    b = bars(rows)
    y, t1 = execution_labels(b["open"], b["high"], b["low"], b["close"], b["atr"], side,
                             fill_rule=fill_rule, **{**P, **overrides})
    return int(y[0]), int(t1[0])


FLAT = (100.0, 100.5, 99.5, 100.0)  # never reaches 99 (long limit) nor 101 (short limit)


def test_no_fill_within_time_limit_is_zero_decided_at_expiry():
    assert label0([FLAT] * 10) == (0, 3)


def test_fill_at_expiry_bar_counts_and_bar_after_expiry_does_not():
    win = [FLAT, FLAT, FLAT, (100, 100, 98.5, 99), (99, 101.5, 99, 101)]
    assert label0(win + [FLAT] * 6) == (1, 4)
    late = [FLAT, FLAT, FLAT, FLAT, (100, 100, 98.5, 99), (99, 101.5, 99, 101)]
    assert label0(late + [FLAT] * 6) == (0, 3)


def test_touch_fills_at_limit_but_trade_through_does_not():
    rows = [FLAT, (100, 100, 99.0, 99.5), (99.5, 101.5, 99.5, 101)] + [FLAT] * 6
    assert label0(rows, fill_rule="touch") == (1, 2)
    assert label0(rows, fill_rule="trade_through") == (0, 3)


def test_take_profit_limit_follows_the_fill_rule():
    rows = [FLAT, (100, 100, 98.5, 99), (99, 101.0, 99, 101)] + [FLAT] * 6  # high exactly at TP 101
    assert label0(rows, fill_rule="touch") == (1, 2)
    assert label0(rows, fill_rule="trade_through")[0] == 0


def test_gap_through_limit_fills_at_the_limit_never_better():
    # bar 2 opens at 97, below the resting 99: the maker fills at 99 (TP 101, SL 96), not at 97 (TP 99)
    rows = [FLAT, FLAT, (97, 97.5, 96.5, 97), (97, 99.5, 97, 99)] + [FLAT] * 6
    assert label0(rows, sl_atr=1.5) == (0, 2 + P["max_holding_bars"])
    rows[4] = (99, 101.5, 99, 101)
    assert label0(rows, sl_atr=1.5) == (1, 4)


def test_postonly_limit_that_would_cross_at_placement_is_rejected():
    assert label0([FLAT, (98.5, 100.5, 98, 100)] + [FLAT] * 6) == (0, 1)  # next open 98.5 is below the 99 bid
    assert label0([FLAT, (99, 100.5, 98, 100)] + [FLAT] * 6) == (0, 1)    # at the bid also crosses
    assert label0([FLAT, (100, 102, 98, 100)] + [FLAT] * 6, offset_atr=0.0) == (0, 1)  # bid at close = open
    assert label0([FLAT, (100, 101.5, 99.5, 101)] + [FLAT] * 6, side=-1, offset_atr=0.0) == (0, 1)


def test_limit_is_rounded_to_the_tick_away_from_the_market():
    rows = [(100, 100.5, 99.5, 100.3), (100.3, 100.5, 99.2, 100), (100, 102, 99.5, 101.8)] + [FLAT] * 6
    assert label0(rows) == (1, 2)                    # limit 99.3: filled at 99.2, TP 101.3
    assert label0(rows, tick_size=1.0) == (0, 3)     # limit 99: 99.2 never trades through it
    short = [(100, 100.5, 99.5, 99.7), (99.7, 100.8, 99.5, 100), (100, 100.5, 98.0, 98.5)] + [FLAT] * 6
    assert label0(short, side=-1) == (1, 2)          # limit 100.7: filled at 100.8, TP 98.7
    assert label0(short, side=-1, tick_size=1.0) == (0, 3)  # limit 101


def test_open_beyond_take_profit_wins_over_a_later_stop_in_the_bar():
    rows = [FLAT, (100, 100, 98.5, 99), (101.5, 101.5, 96, 97)] + [FLAT] * 6  # opens above TP 101
    assert label0(rows) == (1, 2)
    assert label0(rows, fill_rule="touch") == (1, 2)
    at_tp = [FLAT, (100, 100, 98.5, 99), (101, 101, 96, 97)] + [FLAT] * 6     # opens exactly at TP
    assert label0(at_tp, fill_rule="touch") == (1, 2)
    assert label0(at_tp, fill_rule="trade_through") == (0, 2)


def test_stop_on_the_fill_bar_counts():
    rows = [FLAT, (100, 100, 96.9, 97.5)] + [(97.5, 102, 97.5, 101)] * 6  # SL 97 hit on fill bar
    assert label0(rows) == (0, 1)


def test_take_profit_on_the_fill_bar_does_not_count():
    rows = [FLAT, (100, 101.5, 98.5, 100)] + [FLAT] * 8  # fill bar high beyond TP 101
    assert label0(rows) == (0, 1 + P["max_holding_bars"])


def test_bar_reaching_both_levels_counts_as_stop():
    rows = [FLAT, (100, 100, 98.5, 99), (99, 101.5, 96.5, 99)] + [FLAT] * 6
    assert label0(rows) == (0, 2)


def test_gap_through_stop_is_a_loss():
    rows = [FLAT, (100, 100, 98.5, 99), (95, 102, 95, 101)] + [FLAT] * 6  # opens below SL 97, then spikes
    assert label0(rows) == (0, 2)


def test_time_exit_after_max_holding_bars():
    hold = P["max_holding_bars"]
    quiet = (99, 100.5, 98.5, 99.5)
    within = [FLAT, (100, 100, 98.5, 99)] + [quiet] * (hold - 1) + [(99, 101.5, 99, 101)] + [FLAT] * 3
    assert label0(within) == (1, 1 + hold)
    after = [FLAT, (100, 100, 98.5, 99)] + [quiet] * hold + [(99, 101.5, 99, 101)] + [FLAT] * 3
    assert label0(after) == (0, 1 + hold)


def test_fees_that_eat_the_take_profit_make_a_zero():
    rows = [FLAT, (100, 100, 98.5, 99), (99, 101.5, 99, 101)] + [FLAT] * 6
    assert label0(rows, maker_fee=0.0002) == (1, 2)
    assert label0(rows, maker_fee=0.02) == (0, 2)     # 2 ATR gain < 2% fees on ~200 notional
    assert label0(rows, maker_fee=-0.0002) == (1, 2)  # rebates are fine


def test_short_mirrors_long():
    # short limit 101, entry 101, TP 99, SL 103
    rows = [FLAT, (100, 101.5, 100, 101), (101, 101, 98.5, 99)] + [FLAT] * 6
    assert label0(rows, side=-1) == (1, 2)
    stop_on_fill = [FLAT, (100, 103.1, 100, 102)] + [FLAT] * 6
    assert label0(stop_on_fill, side=-1) == (0, 1)


def test_unknown_outcomes_at_the_end_are_minus_one_but_decided_ones_are_kept():
    rows = [FLAT, (100, 100, 98.5, 99), (99, 99.5, 98.5, 99)]  # filled, neither TP nor SL, data ends
    assert label0(rows) == (-1, -1)
    assert label0([FLAT, FLAT]) == (-1, -1)  # order still resting when data ends
    assert label0([FLAT, (100, 100, 96.5, 97)]) == (0, 1)  # stopped on the fill bar: known
    b = bars([FLAT] * 10)
    y, t1 = execution_labels(b["open"], b["high"], b["low"], b["close"], b["atr"], 1, **P)
    assert list(y) == [0] * 7 + [-1] * 3
    assert list(t1[:7]) == [3, 4, 5, 6, 7, 8, 9]


def test_missing_atr_gives_unknown():
    b = bars([FLAT] * 10)
    b["atr"][:2] = [np.nan, 0.0]
    y, t1 = execution_labels(b["open"], b["high"], b["low"], b["close"], b["atr"], -1, **P)
    assert list(y[:3]) == [-1, -1, 0] and list(t1[:2]) == [-1, -1]


def test_bad_arguments_are_refused():
    b = bars([FLAT] * 5)
    args = (b["open"], b["high"], b["low"], b["close"], b["atr"])
    with pytest.raises(ValueError, match="side"):
        execution_labels(*args, 0, **P)
    with pytest.raises(ValueError, match="fill_rule"):
        execution_labels(*args, 1, fill_rule="optimistic", **P)
    with pytest.raises(ValueError, match="high has 4 values"):
        execution_labels(b["open"], b["high"][:4], b["low"], b["close"], b["atr"], 1, **P)


def random_bars(seed: int, n: int, on_grid: bool) -> dict[str, np.ndarray]:
    """Random OHLC; on a 1.0 grid with ATR multiples of 4 so that ties with limits, TPs and stops happen."""
    rng = np.random.default_rng(seed)
    if on_grid:
        close = 1000 + np.cumsum(rng.integers(-3, 4, n)).astype(np.float64)
        gaps = rng.integers(-4, 5, n) * (rng.random(n) < 0.1)
        open_ = np.concatenate([[close[0]], close[:-1]]) + gaps
        high = np.maximum(open_, close) + rng.integers(0, 4, n)
        low = np.minimum(open_, close) - rng.integers(0, 4, n)
        atr = 4.0 * rng.integers(1, 3, n)
    else:
        close = 1000 * np.exp(np.cumsum(rng.normal(0, 0.002, n)))
        open_ = np.concatenate([[close[0]], close[:-1]]) * np.exp(rng.normal(0, 0.0005, n))
        high = np.maximum(open_, close) * np.exp(np.abs(rng.normal(0, 0.001, n)))
        low = np.minimum(open_, close) * np.exp(-np.abs(rng.normal(0, 0.001, n)))
        atr = np.abs(rng.normal(2.0, 0.5, n))
    atr[: rng.integers(0, 5)] = np.nan
    return {"open": open_, "high": high, "low": low, "close": close, "atr": atr}


@pytest.mark.parametrize("seed", range(24))
def test_compiled_labels_equal_the_plain_python_reference(seed):
    rng = np.random.default_rng(1000 + seed)
    b = random_bars(seed, 300, on_grid=seed % 2 == 0)
    params = dict(offset_atr=float(rng.choice([0.0, 0.25, 0.5, 1.0])), tp_atr=float(rng.choice([0.25, 0.5, 1.5])),
                  sl_atr=float(rng.choice([0.25, 0.75, 2.0])), time_limit_bars=int(rng.integers(1, 8)),
                  max_holding_bars=int(rng.integers(1, 30)), maker_fee=float(rng.choice([0.0, 0.0002, -0.0001])),
                  tick_size=float(rng.choice([0.0, 0.01, 0.5, 1.0] if seed % 2 == 0 else [0.0, 0.01, 0.03])))
    for side in (1, -1):
        for rule in ("trade_through", "touch"):
            y, t1 = execution_labels(b["open"], b["high"], b["low"], b["close"], b["atr"], side,
                                     fill_rule=rule, **params)
            ref_y, ref_t1 = reference_labels(b["open"], b["high"], b["low"], b["close"], b["atr"], side,
                                             fill_rule=rule, **params)
            assert y.tolist() == ref_y, (side, rule)
            assert t1.tolist() == ref_t1, (side, rule)
            assert set(np.unique(y)) <= {-1, 0, 1}


def test_random_data_exercises_every_outcome():
    b = random_bars(3, 2000, on_grid=True)
    y, t1 = execution_labels(b["open"], b["high"], b["low"], b["close"], b["atr"], 1, **P)
    known = y >= 0
    assert {0, 1} <= set(np.unique(y[known])) and (y == -1).any()
    idx = np.arange(len(y))
    assert (t1[known] > idx[known]).all()
    assert (t1[known] <= idx[known] + P["time_limit_bars"] + P["max_holding_bars"]).all()


def test_direction_labels_thresholds_and_tail():
    close = np.array([100.0, 101.0, 101.0, 99.0, 100.0, 100.0])
    atr = np.full(6, 2.0)  # move 0.5 ATR = 1.0, strictly beyond
    long_, short, t1 = direction_labels(close, atr, horizon=2, move_atr=0.5)
    assert long_.tolist() == [0, 0, 0, 0, -1, -1]   # 101 is not > 100 + 1
    assert short.tolist() == [0, 1, 0, 0, -1, -1]   # 99 < 101 - 1
    assert t1.tolist() == [2, 3, 4, 5, -1, -1]
    long_, short, _ = direction_labels(close, atr, horizon=1, move_atr=0.25)
    assert long_.tolist()[:2] == [1, 0] and short.tolist()[2] == 1
    atr[0] = np.nan
    assert direction_labels(close, atr, 2, 0.5)[0][0] == -1


def test_make_labels_columns_times_and_consistency():
    cfg = GlobalConfig()
    cfg.strategy.time_limit_bars, cfg.strategy.max_holding_bars = 4, 10
    b = random_bars(5, 400, on_grid=False)
    idx = pd.date_range("2026-01-01", periods=400, freq="5min", tz="UTC", name="time")
    frame = pd.DataFrame(b, index=idx).assign(is_gap=False)
    out = make_labels(frame, cfg)
    assert list(out.columns) == ["exec_long", "exec_short", "dir_long", "dir_short", "t1_exec", "t1_dir"]
    assert all(out[c].dtype == np.int8 for c in ["exec_long", "exec_short", "dir_long", "dir_short"])
    s = cfg.strategy
    y_long, t1_long = execution_labels(b["open"], b["high"], b["low"], b["close"], b["atr"], 1,
                                       s.limit_offset_atr, s.take_profit_atr, s.stop_loss_atr, 4, 10,
                                       cfg.venue.maker_fee, cfg.venue.fill_rule, cfg.instrument.tick_size)
    y_short, t1_short = execution_labels(b["open"], b["high"], b["low"], b["close"], b["atr"], -1,
                                         s.limit_offset_atr, s.take_profit_atr, s.stop_loss_atr, 4, 10,
                                         cfg.venue.maker_fee, cfg.venue.fill_rule, cfg.instrument.tick_size)
    assert out["exec_long"].tolist() == y_long.tolist() and out["exec_short"].tolist() == y_short.tolist()
    row = int(np.flatnonzero((t1_long >= 0) & (t1_short >= 0) & (t1_long != t1_short))[0])
    assert out["t1_exec"].iloc[row] == idx[max(t1_long[row], t1_short[row])] + pd.Timedelta(minutes=5)
    h = cfg.labels.direction_horizon_bars
    assert out["t1_dir"].iloc[10] == idx[10 + h] + pd.Timedelta(minutes=5)
    assert out["t1_dir"].iloc[-h:].isna().all() and (out["dir_long"].iloc[-h:] == -1).all()
    assert out["t1_exec"].isna().tolist() == ((y_long < 0) & (y_short < 0)).tolist()


def test_make_labels_names_missing_columns():
    idx = pd.date_range("2026-01-01", periods=3, freq="5min", tz="UTC")
    with pytest.raises(ValueError, match="atr"):
        make_labels(pd.DataFrame({"open": 1.0, "high": 1.0, "low": 1.0, "close": 1.0}, index=idx), GlobalConfig())
    with pytest.raises(ValueError, match="is_gap"):
        make_labels(pd.DataFrame({"open": 1.0, "high": 1.0, "low": 1.0, "close": 1.0, "atr": 1.0}, index=idx),
                    GlobalConfig())


@pytest.mark.parametrize("side,rule", [(1, "trade_through"), (-1, "touch")])
def test_each_label_is_known_at_its_t1_from_bars_up_to_t1_only(side, rule):
    b = random_bars(7, 400, on_grid=True)
    y, t1 = execution_labels(b["open"], b["high"], b["low"], b["close"], b["atr"], side, fill_rule=rule, **P)
    for t in np.flatnonzero(y >= 0)[::3]:
        cut = {k: v[: t1[t] + 1] for k, v in b.items()}
        y_cut, t1_cut = execution_labels(cut["open"], cut["high"], cut["low"], cut["close"], cut["atr"], side,
                                         fill_rule=rule, **P)
        assert (y_cut[t], t1_cut[t]) == (y[t], t1[t])
        if t1[t] > t + 1:   # one bar less and the outcome is not yet known
            short = {k: v[: t1[t]] for k, v in b.items()}
            assert execution_labels(short["open"], short["high"], short["low"], short["close"], short["atr"],
                                    side, fill_rule=rule, **P)[0][t] == -1


# ---------------------------------------------------------------- data gaps (issue 17, item 4)
def test_crosses_gap_flags_paths_that_touch_a_gap_bar():
    is_gap = np.array([0, 0, 0, 1, 1, 0, 0, 0], bool)
    t1 = np.array([2, 3, -1, 4, 6, 7, -1, -1])
    assert crosses_gap(t1, is_gap).tolist() == [False, True, False, True, True, False, False, False]


def test_no_label_inside_or_across_the_missing_day(missing_day_folder):
    """Issue 17: labels were decided inside the missing day and across it; now neither, and no other changes."""
    import data_loader
    import feature_engine

    cfg = GlobalConfig()
    cfg.data.data_dir = str(missing_day_folder)
    bars = data_loader.load_bars(cfg)
    frame = bars[["open", "high", "low", "close", "is_gap"]].assign(
        atr=feature_engine.compute_features(bars, cfg)["atr"])
    out = make_labels(frame, cfg)
    blind = make_labels(frame.assign(is_gap=False), cfg)
    gap = np.flatnonzero(bars["is_gap"].to_numpy())
    assert len(gap) == 288
    gap_open, gap_close = bars.index[gap[0]], bars.index[gap[-1]] + pd.Timedelta(minutes=5)
    starts = bars.index
    for name, t1_col in [("exec_long", "t1_exec"), ("exec_short", "t1_exec"), ("dir_long", "t1_dir"),
                         ("dir_short", "t1_dir")]:
        known, was_known = out[name].to_numpy() >= 0, blind[name].to_numpy() >= 0
        assert not known[gap].any() and was_known[gap].sum() > 0, f"{name}: decided inside the gap"
        crossing = (starts < gap_close) & (out[t1_col] > gap_open).to_numpy()
        assert not (known & crossing).any(), f"{name}: a label's path crosses the gap"
        was_crossing = (starts < gap_close) & (blind[t1_col] > gap_open).to_numpy()
        assert (was_known & was_crossing)[:gap[0]].any(), f"{name}: no label before the gap reached into it"
        clear = was_known & ~was_crossing
        assert known[clear].all() and (out[name][known] == blind[name][known]).all()
