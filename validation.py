"""Leakage-free validation: CPCV and walk-forward with t1-based purge and embargo, PBO, deflated Sharpe.

Definitions follow López de Prado, *Advances in Financial Machine Learning* (2018): purging §7.4.1,
embargo §7.4.2, CPCV §12.4; PBO by combinatorially symmetric cross-validation (Bailey, Borwein,
López de Prado, Zhu 2015); the deflated Sharpe ratio (Bailey & López de Prado 2014); the minimum
track-record length (Bailey & López de Prado 2012).

Every sample i carries an information interval [t0_i, t1_i]: t0 when its features are known, t1 when
its label is known. Samples must be in time order (t0 non-decreasing).
"""
from __future__ import annotations

import datetime as dt
import itertools
import logging
import math
from typing import Any

import numpy as np
import pandas as pd
from scipy import special, stats

from config import parse_duration

log = logging.getLogger(__name__)

EULER_GAMMA = 0.5772156649015329
Split = tuple[np.ndarray, np.ndarray]


# ---------------------------------------------------------------- inputs
def _to_ns(name: str, values: Any) -> np.ndarray:
    """Times as int64 nanoseconds (UTC for tz-aware input); NaT and floats are refused."""
    if isinstance(values, (pd.Series, pd.Index)) or (isinstance(values, np.ndarray) and (
            np.issubdtype(values.dtype, np.datetime64) or values.dtype == object)):
        try:
            idx = pd.DatetimeIndex(values)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{name} must hold datetimes: {exc}") from None
        if idx.hasnans:
            raise ValueError(f"{name} contains NaT at position {int(np.flatnonzero(idx.isna())[0])}: "
                             "drop rows whose label is unknown before splitting")
        return idx.asi8.astype(np.int64)
    arr = np.asarray(values)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be datetime64 values or int64 nanoseconds, got dtype {arr.dtype}")
    return arr.astype(np.int64)


def _embargo_ns(embargo: Any) -> int:
    """An embargo span in nanoseconds from a timedelta, numpy/pandas timedelta, seconds or '2h'."""
    if isinstance(embargo, (dt.timedelta, np.timedelta64, pd.Timedelta)):
        ns = pd.Timedelta(embargo).value
    elif isinstance(embargo, str):
        ns = int(round(parse_duration(embargo) * 1e9))
    elif isinstance(embargo, (int, float)) and not isinstance(embargo, bool):
        ns = int(round(float(embargo) * 1e9))
    else:
        raise ValueError(f"embargo must be a time span (timedelta, seconds or e.g. '2h'), got {embargo!r}")
    if ns < 0:
        raise ValueError(f"embargo must be >= 0, got {embargo!r}")
    return ns


def _intervals(t0: Any, t1: Any) -> tuple[np.ndarray, np.ndarray]:
    """Checked (t0, t1) int64 arrays: same length, t0 non-decreasing, t1 >= t0."""
    a, b = _to_ns("t0", t0), _to_ns("t1", t1)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"t0 and t1 must be 1-D of equal length, got {a.shape} and {b.shape}")
    bad = np.flatnonzero(np.diff(a) < 0)
    if bad.size:
        raise ValueError(f"t0 must be in time order: sample {int(bad[0]) + 1} starts before sample {int(bad[0])}")
    bad = np.flatnonzero(b < a)
    if bad.size:
        raise ValueError(f"t1 < t0 at sample {int(bad[0])}: a label cannot be known before its features")
    return a, b


def _group_bounds(n: int, n_groups: int) -> np.ndarray:
    """Start positions of n_groups contiguous, near-equal groups (plus n at the end)."""
    if n_groups < 2:
        raise ValueError(f"n_groups must be >= 2, got {n_groups}")
    if n < n_groups:
        raise ValueError(f"{n} samples cannot form {n_groups} groups")
    sizes = np.full(n_groups, n // n_groups)
    sizes[: n % n_groups] += 1
    return np.concatenate([[0], np.cumsum(sizes)])


def _blocks(groups: tuple[int, ...], bounds: np.ndarray) -> list[tuple[int, int]]:
    """Merge sorted test groups into contiguous position blocks [start, stop)."""
    blocks: list[tuple[int, int]] = []
    for g in groups:
        start, stop = int(bounds[g]), int(bounds[g + 1])
        if blocks and blocks[-1][1] == start:
            blocks[-1] = (blocks[-1][0], stop)
        else:
            blocks.append((start, stop))
    return blocks


def _purged_train(candidates: np.ndarray, blocks: list[tuple[int, int]], t0: np.ndarray, t1: np.ndarray,
                  embargo: int) -> np.ndarray:
    """Candidate positions minus those overlapping a test block's [min t0, max t1] or starting in its embargo."""
    keep = candidates.copy()
    for start, stop in blocks:
        w0, w1 = t0[start:stop].min(), t1[start:stop].max()
        keep &= ~((t0 <= w1) & (t1 >= w0))
        keep &= ~((t0 > w1) & (t0 <= w1 + embargo))
    return np.flatnonzero(keep)


# ---------------------------------------------------------------- splits
def cpcv_splits(t0: Any, t1: Any, n_groups: int, n_test_groups: int, embargo: Any) -> list[Split]:
    """Combinatorial purged CV: C(N, k) (train_idx, test_idx) pairs over contiguous time groups.

    Training samples whose [t0, t1] overlaps a contiguous test block's [earliest t0, latest t1] are purged;
    then those starting within `embargo` after the block's latest t1 are embargoed (AFML §7.4.1-2).
    Split order is itertools.combinations(range(N), k), which cpcv_paths refers to.
    """
    a, b = _intervals(t0, t1)
    if not 1 <= n_test_groups < n_groups:
        raise ValueError(f"need 1 <= n_test_groups < n_groups, got k={n_test_groups}, N={n_groups}")
    h = _embargo_ns(embargo)
    bounds = _group_bounds(a.shape[0], n_groups)
    group_of = np.repeat(np.arange(n_groups), np.diff(bounds))
    splits = []
    for test_groups in itertools.combinations(range(n_groups), n_test_groups):
        is_test = np.isin(group_of, test_groups)
        train = _purged_train(~is_test, _blocks(test_groups, bounds), a, b, h)
        if train.size == 0:
            log.warning("CPCV split with test groups %s has no training samples left after purge/embargo",
                        test_groups)
        splits.append((train, np.flatnonzero(is_test)))
    return splits


def cpcv_paths(n_groups: int, n_test_groups: int) -> np.ndarray:
    """For each of the C(N-1, k-1) backtest paths and each group, the index of the split whose
    out-of-sample predictions that path uses (the j-th path takes each group's j-th split)."""
    if not 1 <= n_test_groups < n_groups:
        raise ValueError(f"need 1 <= n_test_groups < n_groups, got k={n_test_groups}, N={n_groups}")
    n_paths = math.comb(n_groups - 1, n_test_groups - 1)
    paths = np.empty((n_paths, n_groups), np.int64)
    used = np.zeros(n_groups, np.int64)
    for split, test_groups in enumerate(itertools.combinations(range(n_groups), n_test_groups)):
        for g in test_groups:
            paths[used[g], g] = split
            used[g] += 1
    return paths


def cpcv_path_predictions(split_predictions: list[tuple[np.ndarray, np.ndarray]], n_samples: int,
                          n_groups: int, n_test_groups: int) -> list[np.ndarray]:
    """Reassemble per-split out-of-sample predictions into the C(N-1, k-1) full paths (cpcv_paths order).

    split_predictions[s] = (test_idx, predictions with one row per test_idx) for split s of cpcv_splits;
    each returned path has one row per sample, every row predicted by a model that never trained on it.
    """
    paths = cpcv_paths(n_groups, n_test_groups)
    if len(split_predictions) != math.comb(n_groups, n_test_groups):
        raise ValueError(f"expected {math.comb(n_groups, n_test_groups)} splits' predictions, "
                         f"got {len(split_predictions)}")
    bounds = _group_bounds(n_samples, n_groups)
    first = np.asarray(split_predictions[0][1])
    out = []
    for path in paths:
        assembled = np.full((n_samples,) + first.shape[1:], np.nan)
        for g, split in enumerate(path):
            test_idx, preds = split_predictions[split]
            rows = np.arange(bounds[g], bounds[g + 1])
            at = np.searchsorted(test_idx, rows)
            if at.size and (at[-1] >= len(test_idx) or not np.array_equal(np.asarray(test_idx)[at], rows)):
                raise ValueError(f"split {split}'s test rows do not contain group {g}: "
                                 "predictions must come from cpcv_splits in order")
            assembled[rows] = np.asarray(preds)[at]
        out.append(assembled)
    return out


def cpcv_training_pools(split_predictions: list[tuple[np.ndarray, np.ndarray]], n_samples: int,
                        n_groups: int, n_test_groups: int) -> list[np.ndarray]:
    """For each split, the out-of-fold predictions on its training groups (stacked rows).

    Every training group of split s was held out by other splits; their predictions on it come from
    models that never trained on it. A threshold read from this pool is set without split s's test rows,
    which are what s is scored on. Splits in cpcv_splits order; each pool has the predictions' row shape.
    """
    combos = list(itertools.combinations(range(n_groups), n_test_groups))
    if len(split_predictions) != len(combos):
        raise ValueError(f"expected {len(combos)} splits' predictions, got {len(split_predictions)}")
    bounds = _group_bounds(n_samples, n_groups)
    by_group: list[list[np.ndarray]] = [[] for _ in range(n_groups)]
    for (test_idx, preds), groups in zip(split_predictions, combos):
        test_idx, preds = np.asarray(test_idx), np.asarray(preds)
        for g in groups:
            rows = (test_idx >= bounds[g]) & (test_idx < bounds[g + 1])
            by_group[g].append(preds[rows])
    return [np.concatenate([p for g in range(n_groups) if g not in groups for p in by_group[g]])
            for groups in combos]


def walk_forward_splits(t0: Any, t1: Any, n_groups: int, embargo: Any, min_train_groups: int = 1,
                        max_train_groups: int | None = None) -> list[Split]:
    """Walk-forward: each group from `min_train_groups` on is tested once, trained on the groups before it
    (all of them, or the last `max_train_groups`), with the same t1 purge and embargo as CPCV."""
    a, b = _intervals(t0, t1)
    if not 1 <= min_train_groups < n_groups:
        raise ValueError(f"need 1 <= min_train_groups < n_groups, got {min_train_groups}, N={n_groups}")
    if max_train_groups is not None and max_train_groups < 1:
        raise ValueError(f"max_train_groups must be >= 1, got {max_train_groups}")
    h = _embargo_ns(embargo)
    bounds = _group_bounds(a.shape[0], n_groups)
    positions = np.arange(a.shape[0])
    splits = []
    for g in range(min_train_groups, n_groups):
        first = 0 if max_train_groups is None else max(0, g - max_train_groups)
        candidates = (positions >= bounds[first]) & (positions < bounds[g])
        train = _purged_train(candidates, _blocks((g,), bounds), a, b, h)
        splits.append((train, positions[bounds[g]:bounds[g + 1]]))
    return splits


# ---------------------------------------------------------------- PBO
def _column_sharpe(sums: np.ndarray, squares: np.ndarray, count: int) -> np.ndarray:
    """Sharpe ratio (mean / sample std) from sums; zero variance gives ±inf, or 0 for a zero mean."""
    mean = sums / count
    var = np.maximum(squares - sums * mean, 0.0) / (count - 1)
    std = np.sqrt(var)
    with np.errstate(divide="ignore", invalid="ignore"):
        sr = mean / std
    flat = np.where(mean > 0, np.inf, np.where(mean < 0, -np.inf, 0.0))
    return np.where(std > 0, sr, flat)


def pbo(returns_matrix: Any, n_partitions: int) -> tuple[float, np.ndarray]:
    """Probability of backtest overfitting by CSCV: (PBO, logits λ of every IS/OOS partition).

    Rows are periods, columns are trials. Rows are cut into S = n_partitions equal blocks (the oldest
    T mod S rows are dropped); for each of the C(S, S/2) choices of in-sample blocks the in-sample
    Sharpe-best trial's out-of-sample relative rank ω = rank/(M+1) (average rank on ties) gives
    λ = ln(ω/(1-ω)); PBO is the share of partitions with λ <= 0.
    """
    m = np.asarray(returns_matrix, dtype=np.float64)
    if m.ndim != 2 or m.shape[1] < 2:
        raise ValueError(f"returns_matrix must be periods x trials with >= 2 trials, got shape {m.shape}")
    if not np.isfinite(m).all():
        raise ValueError("returns_matrix contains NaN or inf")
    if n_partitions < 2 or n_partitions % 2:
        raise ValueError(f"n_partitions must be even and >= 2, got {n_partitions}")
    rows = m.shape[0] // n_partitions
    if rows < 2:
        raise ValueError(f"{m.shape[0]} periods are too few for {n_partitions} partitions of >= 2 rows")
    if m.shape[0] % n_partitions:
        log.info("pbo: dropping the oldest %d of %d periods to make %d equal blocks",
                 m.shape[0] % n_partitions, m.shape[0], n_partitions)
    blocks = m[m.shape[0] - rows * n_partitions:].reshape(n_partitions, rows, m.shape[1])
    block_sum, block_sq = blocks.sum(axis=1), (blocks ** 2).sum(axis=1)
    total_sum, total_sq = block_sum.sum(axis=0), block_sq.sum(axis=0)
    half = n_partitions // 2
    combos = list(itertools.combinations(range(n_partitions), half))
    in_sample = np.zeros((len(combos), n_partitions))
    in_sample[np.repeat(np.arange(len(combos)), half), np.ravel(combos)] = 1.0
    n_trials = m.shape[1]
    chunk = max(1, 1_000_000 // n_trials)
    logits = []
    for start in range(0, len(combos), chunk):
        chosen = in_sample[start:start + chunk]
        is_sum, is_sq = chosen @ block_sum, chosen @ block_sq
        is_sr = _column_sharpe(is_sum, is_sq, rows * half)
        oos_sr = _column_sharpe(total_sum - is_sum, total_sq - is_sq, rows * half)
        best = oos_sr[np.arange(len(chosen)), np.argmax(is_sr, axis=1)][:, None]
        rank = (oos_sr < best).sum(axis=1) + ((oos_sr == best).sum(axis=1) + 1) / 2.0
        omega = rank / (n_trials + 1)
        logits.append(np.log(omega / (1.0 - omega)))
    lam = np.concatenate(logits)
    return float(np.mean(lam <= 0.0)), lam


# ---------------------------------------------------------------- Sharpe statistics
def sharpe_stats(returns: Any) -> tuple[float, float, float]:
    """Per-period Sharpe ratio (mean / sample std), skewness and Pearson kurtosis (normal = 3) of returns.

    NaN when there are fewer than 2 returns or they do not vary: no number rather than a wrong one.
    """
    r = np.asarray(returns, dtype=np.float64)
    r = r[np.isfinite(r)]
    if r.size < 2 or np.ptp(r) == 0:
        return float("nan"), float("nan"), float("nan")
    return (float(r.mean() / r.std(ddof=1)), float(stats.skew(r)),
            float(stats.kurtosis(r, fisher=False)))


def expected_max_sharpe(n_trials: int, sr_var_across_trials: float) -> float:
    """E[max SR] of n_trials unskilled trials whose Sharpe ratios vary with this variance (DSR paper, eq. 2)."""
    if n_trials < 1:
        raise ValueError(f"n_trials must be >= 1, got {n_trials}")
    if sr_var_across_trials < 0:
        raise ValueError(f"sr_var_across_trials must be >= 0, got {sr_var_across_trials}")
    if n_trials == 1:
        return 0.0
    z = (1.0 - EULER_GAMMA) * special.ndtri(1.0 - 1.0 / n_trials) + \
        EULER_GAMMA * special.ndtri(1.0 - 1.0 / (n_trials * math.e))
    return float(math.sqrt(sr_var_across_trials) * z)


def probabilistic_sharpe(sr: float, sr_benchmark: float, n_obs: int, skew: float, kurt: float) -> float:
    """P(true Sharpe > sr_benchmark) given an observed per-period sr over n_obs returns (Pearson kurtosis)."""
    if n_obs < 2:
        raise ValueError(f"n_obs must be >= 2, got {n_obs}")
    if not all(math.isfinite(x) for x in (sr, sr_benchmark, skew, kurt)):
        return float("nan")
    denom = 1.0 - skew * sr + (kurt - 1.0) / 4.0 * sr * sr
    if denom <= 0:
        raise ValueError(f"1 - skew*SR + (kurt-1)/4*SR^2 = {denom:.4g} <= 0: skew={skew}, kurt={kurt}, "
                         f"sr={sr} are inconsistent (kurt is Pearson, normal = 3)")
    return float(special.ndtr((sr - sr_benchmark) * math.sqrt(n_obs - 1) / math.sqrt(denom)))


def deflated_sharpe(sr: float, n_obs: int, skew: float, kurt: float, n_trials: int,
                    sr_var_across_trials: float) -> float:
    """Deflated Sharpe ratio: P(true Sharpe > 0) after picking the best of n_trials (Bailey & López de Prado 2014).

    sr, sr_var_across_trials and n_obs share one frequency (e.g. daily SR, variance of the trials' daily
    SRs, number of days); kurt is Pearson (normal = 3); n_trials must count every trial ever run.
    """
    return probabilistic_sharpe(sr, expected_max_sharpe(n_trials, sr_var_across_trials), n_obs, skew, kurt)


def min_track_record_length(sr: float, sr_benchmark: float, skew: float, kurt: float,
                            prob: float = 0.95) -> float:
    """Minimum track-record length: returns needed before P(true Sharpe > sr_benchmark) reaches `prob`.

    MinTRL = 1 + [1 - skew*SR + (kurt-1)/4*SR^2] * (z_prob / (SR - SR*))^2 (Bailey & López de Prado 2012,
    "The Sharpe Ratio Efficient Frontier", J. of Risk 15(2)); sr per period, kurt Pearson (normal = 3), result
    in periods (observations) of that frequency. With SR* the deflated Sharpe's expected maximum, an exam of
    n returns gives DSR >= prob exactly when n >= MinTRL. inf when sr <= sr_benchmark: no length suffices.
    """
    if not 0.0 < prob < 1.0:
        raise ValueError(f"prob must be in (0, 1), got {prob}")
    if not all(math.isfinite(x) for x in (sr, sr_benchmark, skew, kurt)):
        return float("nan")
    if sr <= sr_benchmark:
        return float("inf")
    denom = 1.0 - skew * sr + (kurt - 1.0) / 4.0 * sr * sr
    return float(1.0 + denom * (special.ndtri(prob) / (sr - sr_benchmark)) ** 2)
