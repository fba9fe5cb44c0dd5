"""CPCV / walk-forward purge and embargo (incl. known bugs of other implementations), PBO and deflated Sharpe."""
from __future__ import annotations

import datetime as dt
import itertools
import math
from statistics import NormalDist

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from validation import (cpcv_path_predictions, cpcv_paths, cpcv_splits, cpcv_training_pools, deflated_sharpe,
                        expected_max_sharpe, min_track_record_length, pbo, probabilistic_sharpe, sharpe_stats,
                        walk_forward_splits)

MIN = 60 * 10**9  # one minute in ns


def minutes(t0_min, length_min):
    """int64-ns intervals from start minutes and label lengths in minutes."""
    t0 = np.asarray(t0_min, dtype=np.int64) * MIN
    return t0, t0 + np.asarray(length_min, dtype=np.int64) * MIN


def split_for(splits, n_groups, k, test_groups):
    """The split whose test groups are `test_groups` (combinations order)."""
    return splits[list(itertools.combinations(range(n_groups), k)).index(tuple(test_groups))]


# ---------------------------------------------------------------- known bugs, as regression tests
def test_purge_uses_each_label_end_not_a_fixed_window():
    # 40 one-minute samples, labels 2 min long, except sample 3 whose label runs 25 minutes (into group 2)
    lengths = np.full(40, 2)
    lengths[3] = 25
    t0, t1 = minutes(np.arange(40), lengths)
    train, test = split_for(cpcv_splits(t0, t1, 4, 1, embargo=0), 4, 1, (2,))   # test = samples 20..29
    assert test.tolist() == list(range(20, 30))
    assert 3 not in train                       # far from the block by index, but its label ends inside it
    assert {0, 1, 2, 4, 5, 17} <= set(train)    # short labels far enough stay
    assert 18 not in train and 19 not in train  # t1 = 20, 21 reach the block's first t0 (20)


def test_purge_starts_at_the_first_test_sample_start_not_its_end():
    # first test sample starts at minute 20 but its label ends at 40; a train label ending at 25 overlaps it
    lengths = np.full(40, 1)
    lengths[20] = 20
    lengths[15] = 10   # [15, 25]: overlaps [20, 40] although it ends before the first test label's end
    t0, t1 = minutes(np.arange(40), lengths)
    train, _ = split_for(cpcv_splits(t0, t1, 4, 1, embargo=0), 4, 1, (2,))
    assert 15 not in train and 14 in train


def test_embargo_is_stacked_after_the_purge_from_the_latest_label_end():
    # test block = samples 10..19 (minutes 10..19); sample 12's label is long and ends at minute 33
    lengths = np.full(40, 1)
    lengths[12] = 21
    t0, t1 = minutes(np.arange(40), lengths)
    train, _ = split_for(cpcv_splits(t0, t1, 4, 1, embargo=dt.timedelta(minutes=5)), 4, 1, (1,))
    after = sorted(i for i in train if i >= 20)
    # purge removes starts <= 33 (max t1 of the block), embargo removes starts in (33, 38]
    assert after[0] == 39
    no_embargo, _ = split_for(cpcv_splits(t0, t1, 4, 1, embargo=0), 4, 1, (1,))
    assert sorted(i for i in no_embargo if i >= 20)[0] == 34
    assert 8 in train and 9 not in train    # before the block only the purge acts (t1 of 9 = 10)


def test_non_contiguous_test_groups_are_purged_block_by_block():
    t0, t1 = minutes(np.arange(50), np.full(50, 2))
    train, test = split_for(cpcv_splits(t0, t1, 5, 2, embargo=3 * 60), 5, 2, (0, 2))
    assert set(test) == set(range(0, 10)) | set(range(20, 30))
    # the group between the two test blocks keeps everything outside the purge/embargo edges
    between = sorted(i for i in train if 10 <= i < 20)
    assert between == list(range(15, 18))  # 10..11 purged, 12..14 embargoed; 18, 19 reach minute 20
    assert sorted(i for i in train if i >= 30) == list(range(35, 40)) + list(range(40, 50))


def test_adjacent_test_groups_form_one_block_without_gap_in_between():
    t0, t1 = minutes(np.arange(40), np.full(40, 3))
    train, test = split_for(cpcv_splits(t0, t1, 4, 2, embargo=0), 4, 2, (1, 2))
    assert test.tolist() == list(range(10, 30))
    assert max(i for i in train if i < 10) == 6 and min(i for i in train if i >= 30) == 33


def test_purging_cannot_be_switched_off_or_skipped():
    t0, t1 = minutes(np.arange(30), np.full(30, 5))
    with pytest.raises(TypeError):
        cpcv_splits(t0, n_groups=3, n_test_groups=1, embargo=0)  # no default label ends: t1 is required
    train, _ = split_for(cpcv_splits(t0, t1, 3, 1, embargo=0), 3, 1, (1,))
    assert not set(range(5, 10)) & set(train)


def test_embargo_accepts_every_time_span_form():
    t0, t1 = minutes(np.arange(60), np.full(60, 2))
    ref = cpcv_splits(t0, t1, 6, 2, embargo=300)
    for emb in (dt.timedelta(minutes=5), pd.Timedelta("5min"), np.timedelta64(5, "m"), "5m", 300.0):
        got = cpcv_splits(t0, t1, 6, 2, embargo=emb)
        assert all(np.array_equal(a[0], b[0]) for a, b in zip(ref, got))


def test_datetime_inputs_equal_integer_nanoseconds():
    idx = pd.date_range("2026-01-01", periods=60, freq="5min", tz="UTC")
    t1 = idx + pd.Timedelta("25min")
    a = cpcv_splits(idx, t1, 6, 2, embargo="10m")
    b = cpcv_splits(idx.asi8, t1.asi8, 6, 2, embargo="10m")
    c = cpcv_splits(pd.Series(idx), pd.Series(t1), 6, 2, embargo=600)
    assert all(np.array_equal(x[0], y[0]) and np.array_equal(x[0], z[0]) for x, y, z in zip(a, b, c))


def test_bad_inputs_get_clear_errors():
    t0, t1 = minutes(np.arange(10), np.full(10, 1))
    with pytest.raises(ValueError, match="time order"):
        cpcv_splits(t0[::-1], t1[::-1], 2, 1, 0)
    with pytest.raises(ValueError, match="t1 < t0 at sample 0"):
        cpcv_splits(t0, t0 - 1, 2, 1, 0)
    with pytest.raises(ValueError, match="NaT"):
        cpcv_splits(pd.DatetimeIndex(t0), pd.DatetimeIndex(t1).where(np.arange(10) != 4), 2, 1, 0)
    with pytest.raises(ValueError, match="n_test_groups < n_groups"):
        cpcv_splits(t0, t1, 3, 3, 0)
    with pytest.raises(ValueError, match="embargo"):
        cpcv_splits(t0, t1, 2, 1, -5)
    with pytest.raises(ValueError, match="cannot form"):
        cpcv_splits(t0, t1, 11, 1, 0)


# ---------------------------------------------------------------- properties over random label lengths
@st.composite
def labelled_samples(draw):
    """Time-ordered samples with ties and gaps, random label lengths, and a CPCV configuration."""
    n = draw(st.integers(8, 120))
    steps = draw(st.lists(st.integers(0, 5), min_size=n, max_size=n))
    lengths = draw(st.lists(st.integers(0, 40), min_size=n, max_size=n))
    n_groups = draw(st.integers(2, min(8, n)))
    k = draw(st.integers(1, n_groups - 1))
    embargo = draw(st.integers(0, 30))
    t0 = np.cumsum(steps).astype(np.int64)
    return t0, t0 + np.asarray(lengths, np.int64), n_groups, k, embargo


def check_split(t0, t1, train, test, embargo_units):
    """Brute-force checks of one split against AFML's definitions (times in raw units, embargo in units)."""
    assert not set(train) & set(test)
    test_sorted = np.sort(test)
    blocks = np.split(test_sorted, np.flatnonzero(np.diff(test_sorted) > 1) + 1)
    for i in range(len(t0)):
        if i in set(test):
            continue
        overlaps = any(t0[i] <= t1[j] and t1[i] >= t0[j] for j in test)
        embargoed = any(t1[b].max() < t0[i] <= t1[b].max() + embargo_units for b in blocks)
        assert (i in set(train)) == (not overlaps and not embargoed), i


@settings(max_examples=60, deadline=None)
@given(labelled_samples())
def test_cpcv_property_no_overlap_embargo_and_exact_coverage(sample):
    t0, t1, n_groups, k, embargo = sample
    splits = cpcv_splits(t0, t1, n_groups, k, embargo=embargo * 1e-9)  # raw units are ns
    assert len(splits) == math.comb(n_groups, k)
    tested = np.zeros(len(t0), int)
    bounds = np.array_split(np.arange(len(t0)), n_groups)
    for (train, test), groups in zip(splits, itertools.combinations(range(n_groups), k)):
        assert test.tolist() == sorted(np.concatenate([bounds[g] for g in groups]).tolist())
        check_split(t0, t1, train, test, embargo)
        tested[test] += 1
    assert (tested == math.comb(n_groups - 1, k - 1)).all()


@settings(max_examples=40, deadline=None)
@given(labelled_samples(), st.integers(1, 3), st.none() | st.integers(1, 3))
def test_walk_forward_property_trains_on_the_purged_past_only(sample, min_train, max_train):
    t0, t1, n_groups, _, embargo = sample
    if min_train >= n_groups:
        return
    splits = walk_forward_splits(t0, t1, n_groups, embargo * 1e-9, min_train, max_train)
    groups = np.array_split(np.arange(len(t0)), n_groups)
    assert [s[1].tolist() for s in splits] == [g.tolist() for g in groups[min_train:]]
    for g, (train, test) in enumerate(splits, start=min_train):
        first = 0 if max_train is None else max(0, g - max_train)
        allowed = set(np.concatenate(groups[first:g]).tolist())
        assert set(train) <= allowed and all(i < test[0] for i in train)
        assert all(t1[i] < t0[test[0]] for i in train)
        kept = {i for i in allowed if t1[i] < t0[test].min()}
        assert set(train) == kept


def test_cpcv_paths_reassemble_every_sample_once_per_path():
    n_groups, k = 6, 2
    t0, t1 = minutes(np.arange(60), np.full(60, 1))
    splits = cpcv_splits(t0, t1, n_groups, k, embargo=0)
    paths = cpcv_paths(n_groups, k)
    assert paths.shape == (math.comb(n_groups - 1, k - 1), n_groups)
    groups = np.array_split(np.arange(60), n_groups)
    pairs = set()
    for path in paths:
        assembled = np.full(60, -1)
        for g, split in enumerate(path):
            assert set(groups[g]) <= set(splits[split][1])   # that split did test this group
            assembled[groups[g]] = split
            pairs.add((int(split), g))
        assert (assembled >= 0).all()
    every_test = {(s, g) for s, combo in enumerate(itertools.combinations(range(n_groups), k)) for g in combo}
    assert pairs == every_test and len(every_test) == paths.size   # each OOS prediction used exactly once


def test_path_predictions_come_from_models_that_never_trained_on_the_rows():
    n, n_groups, k = 90, 6, 3
    t0, t1 = minutes(np.arange(n), np.full(n, 4))
    splits = cpcv_splits(t0, t1, n_groups, k, embargo=60)
    # "predictions" = (split id, sample id): shows which model predicted which row
    preds = [(test, np.column_stack([np.full(len(test), s), test])) for s, (_, test) in enumerate(splits)]
    paths = cpcv_path_predictions(preds, n, n_groups, k)
    assert len(paths) == math.comb(n_groups - 1, k - 1)
    for path in paths:
        assert path[:, 1].tolist() == list(range(n))
        for row, split in enumerate(path[:, 0].astype(int)):
            assert row in set(splits[split][1]) and row not in set(splits[split][0])
    used = {(int(s), row) for path in paths for row, s in enumerate(path[:, 0])}
    assert len(used) == n * len(paths)   # no split's prediction of a row is used in two paths
    with pytest.raises(ValueError, match="do not contain group"):
        cpcv_path_predictions(preds[::-1], n, n_groups, k)


@pytest.mark.parametrize("n_groups,k", [(4, 1), (6, 2), (5, 3)])
def test_training_pools_hold_only_out_of_fold_predictions_of_the_training_groups(n_groups, k):
    n = 103
    t0, t1 = minutes(np.arange(n), np.ones(n))
    splits = cpcv_splits(t0, t1, n_groups, k, 0)
    # each split "predicts" (row id, split id), so a pool tells where every value came from
    preds = [(test, np.column_stack([test, np.full(test.size, s)])) for s, (_, test) in enumerate(splits)]
    for s, ((_, test), pool) in enumerate(zip(splits, cpcv_training_pools(preds, n, n_groups, k))):
        rows, makers = pool[:, 0].astype(int), pool[:, 1].astype(int)
        assert not np.isin(rows, test).any()                   # never the rows split s is scored on
        for row, maker in zip(rows, makers):                   # every value from a model that held its row out
            assert row in splits[maker][1]
        train_rows = np.setdiff1d(np.arange(n), test)
        copies = math.comb(n_groups - 1, k - 1)                # each training row, once per split testing it
        assert sorted(rows) == sorted(np.repeat(train_rows, copies))


def test_object_arrays_of_timestamps_are_accepted():
    idx = pd.date_range("2026-01-01", periods=40, freq="5min", tz="UTC")
    t1 = np.maximum((idx + pd.Timedelta("10min")).to_numpy(), (idx + pd.Timedelta("20min")).to_numpy())
    assert t1.dtype == object
    a = cpcv_splits(idx.to_numpy(), t1, 4, 2, embargo=pd.Timedelta("5min"))
    b = cpcv_splits(idx.asi8, (idx + pd.Timedelta("20min")).asi8, 4, 2, embargo=300)
    assert all(np.array_equal(x[0], y[0]) for x, y in zip(a, b))


# ---------------------------------------------------------------- PBO
def pbo_by_definition(m, s):
    """Straight loop over the CSCV definition (oracle for the vectorised pbo)."""
    rows = m.shape[0] // s
    m = m[m.shape[0] - rows * s:]
    blocks = np.split(np.arange(len(m)), s)
    lam = []
    for chosen in itertools.combinations(range(s), s // 2):
        is_rows = np.concatenate([blocks[i] for i in chosen])
        oos_rows = np.setdiff1d(np.arange(len(m)), is_rows)
        def sr(x):
            mean, std = x.mean(axis=0), x.std(axis=0, ddof=1)
            return np.array([mu / sd if sd > 0 else (math.inf if mu > 0 else -math.inf if mu < 0 else 0.0)
                             for mu, sd in zip(mean, std)])
        best = np.argmax(sr(m[is_rows]))
        omega = stats.rankdata(sr(m[oos_rows]))[best] / (m.shape[1] + 1)
        lam.append(np.log(omega / (1 - omega)))
    return np.mean(np.array(lam) <= 0), np.array(lam)


def test_pbo_equals_the_definition_loop():
    m = np.random.default_rng(0).normal(0, 1, (203, 7))
    value, lam = pbo(m, 8)
    ref_value, ref_lam = pbo_by_definition(m, 8)
    assert len(lam) == math.comb(8, 4)
    np.testing.assert_allclose(lam, ref_lam, rtol=1e-9)
    assert value == ref_value


def test_pbo_near_one_for_noise_trials_with_equal_full_sample_sharpe():
    # the paper's overfitting benchmark: noise trials rescaled to the same full-sample mean and std, so the
    # in-sample winner is mechanically an out-of-sample loser
    m = np.random.default_rng(1).normal(0, 1, (1000, 50))
    m = (m - m.mean(axis=0)) / m.std(axis=0) * 0.01 + 0.0005
    value, lam = pbo(m, 10)
    assert value > 0.95 and np.median(lam) < -1.5


def test_pbo_near_one_half_for_independent_noise_trials():
    values = [pbo(np.random.default_rng(seed).normal(0, 0.01, (600, 30)), 10)[0] for seed in range(8)]
    assert 0.3 < np.mean(values) < 0.7


def test_pbo_near_zero_with_one_truly_better_strategy():
    m = np.random.default_rng(2).normal(0, 0.01, (1000, 50))
    m[:, 17] += 0.004
    value, lam = pbo(m, 10)
    assert value < 0.05 and np.median(lam) > 2


def test_pbo_handles_flat_trials_and_ties():
    m = np.random.default_rng(5).normal(0, 0.01, (400, 6))
    m[:, 0] = 0.0        # a trial that never trades: Sharpe 0, not NaN
    m[:, 1] = m[:, 2]    # two identical trials tie in every rank
    value, lam = pbo(m, 8)
    ref_value, ref_lam = pbo_by_definition(m, 8)
    assert np.isfinite(lam).all() and value == ref_value
    np.testing.assert_allclose(lam, ref_lam, rtol=1e-9)


def test_pbo_refuses_bad_shapes():
    with pytest.raises(ValueError, match="even"):
        pbo(np.zeros((100, 3)), 5)
    with pytest.raises(ValueError, match=">= 2 trials"):
        pbo(np.zeros((100, 1)), 4)
    with pytest.raises(ValueError, match="too few"):
        pbo(np.zeros((7, 3)), 4)


# ---------------------------------------------------------------- deflated Sharpe
def test_deflated_sharpe_reproduces_the_papers_numerical_example():
    # Bailey & López de Prado (2014), section 5: annualised SR 2.5 over 1250 days, 100 trials whose annualised
    # SRs have variance 0.5, skew -3, kurtosis 10 -> E[max SR] ~ 0.1132 (daily) and DSR ~ 0.9004
    sr, var = 2.5 / math.sqrt(250), 0.5 / 250
    assert expected_max_sharpe(100, var) == pytest.approx(0.1132, abs=5e-5)
    assert deflated_sharpe(sr, 1250, -3.0, 10.0, 100, var) == pytest.approx(0.9004, abs=5e-4)


def test_deflated_sharpe_matches_the_formula_worked_by_hand():
    nd, gamma = NormalDist(), 0.5772156649015329
    sr, n_obs, skew, kurt, n, var = 0.08, 500, -0.4, 5.0, 25, 0.0009
    sr0 = math.sqrt(var) * ((1 - gamma) * nd.inv_cdf(1 - 1 / n) + gamma * nd.inv_cdf(1 - 1 / (n * math.e)))
    z = (sr - sr0) * math.sqrt(n_obs - 1) / math.sqrt(1 - skew * sr + (kurt - 1) / 4 * sr ** 2)
    assert deflated_sharpe(sr, n_obs, skew, kurt, n, var) == pytest.approx(nd.cdf(z), abs=1e-9)


def test_deflated_sharpe_penalises_more_trials_and_rewards_more_data():
    args = dict(skew=0.0, kurt=3.0, sr_var_across_trials=0.002)
    one = deflated_sharpe(0.1, 400, n_trials=1, **args)
    assert one == pytest.approx(probabilistic_sharpe(0.1, 0.0, 400, 0.0, 3.0))
    values = [deflated_sharpe(0.1, 400, n_trials=n, **args) for n in (1, 10, 100, 1000)]
    assert values == sorted(values, reverse=True) and values[-1] < 0.5 < values[0]
    assert deflated_sharpe(0.2, 2000, n_trials=10, **args) > deflated_sharpe(0.2, 200, n_trials=10, **args)
    with pytest.raises(ValueError, match="n_trials"):
        deflated_sharpe(0.1, 100, 0.0, 3.0, 0, 0.01)
    with pytest.raises(ValueError, match="inconsistent"):
        deflated_sharpe(1.0, 100, 5.0, 1.0, 5, 0.01)


def test_sharpe_stats_moments():
    r = np.random.default_rng(3).normal(0.001, 0.01, 200_000)
    sr, skew, kurt = sharpe_stats(r)
    assert sr == pytest.approx(r.mean() / r.std(ddof=1), rel=1e-12)
    assert abs(skew) < 0.03 and kurt == pytest.approx(3.0, abs=0.05)
    lognormal = np.random.default_rng(4).lognormal(0, 0.5, 100_000)
    assert sharpe_stats(lognormal)[1] > 1.0
    assert all(math.isnan(x) for x in sharpe_stats(np.full(10, 0.01)))
    assert math.isnan(deflated_sharpe(float("nan"), 100, 0.0, 3.0, 5, 0.01))


def test_min_track_record_length_is_where_the_probabilistic_sharpe_reaches_the_cut_off():
    for sr, bench, skew, kurt in [(0.1, 0.0, 0.0, 3.0), (0.05, 0.02, -1.5, 9.0), (0.3, 0.1, 0.8, 4.0)]:
        n = min_track_record_length(sr, bench, skew, kurt, 0.95)
        assert probabilistic_sharpe(sr, bench, math.ceil(n), skew, kurt) >= 0.95
        assert probabilistic_sharpe(sr, bench, math.floor(n) - 1, skew, kurt) < 0.95
    nd = NormalDist()
    sr, bench, skew, kurt = 0.08, 0.03, -0.5, 6.0
    by_hand = 1 + (1 - skew * sr + (kurt - 1) / 4 * sr ** 2) * (nd.inv_cdf(0.95) / (sr - bench)) ** 2
    assert min_track_record_length(sr, bench, skew, kurt) == pytest.approx(by_hand, rel=1e-9)
    # a normal, zero-benchmark track record with per-period SR 0.1 needs ~273 periods (1 + 1.005 * (1.645/0.1)^2)
    assert min_track_record_length(0.1, 0.0, 0.0, 3.0) == pytest.approx(1 + 1.005 * (nd.inv_cdf(0.95) / 0.1) ** 2)
    assert min_track_record_length(0.02, 0.02, 0.0, 3.0) == math.inf
    assert min_track_record_length(-0.1, 0.0, 0.0, 3.0) == math.inf
    assert math.isnan(min_track_record_length(float("nan"), 0.0, 0.0, 3.0))
    with pytest.raises(ValueError, match="prob"):
        min_track_record_length(0.1, 0.0, 0.0, 3.0, prob=1.0)
