"""train.py — PurpleSky's main job: tune, validate and ship the hybrid strategy's models.

Flow: bars + features → time split (development 85% | OOS-1 10% | Super-OOS 5%, embargoed gaps) →
Optuna (TPE) over strategy + model parameters, each trial scored by CPCV on the development span →
the top candidates retrained on all development data and ranked on OOS-1 → the winner retrained on
development + OOS-1 and examined once on Super-OOS → deflated Sharpe, PBO and a plain verdict →
`models_v9/<SYM>/rank_N/` artifacts with an HTML report.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import signal
import socket
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import optuna
import pandas as pd
from tqdm import tqdm

import backtest
import data_loader
import feature_engine
import labels as labels_mod
import metrics
import validation
from config import (ConfigError, GlobalConfig, add_config_args, atomic_write_text, bars_for,
                    config_from_args, parse_duration, timeframe_seconds)
from models import ModelBundle, psi_limits

log = logging.getLogger("train")
LABEL_COLUMNS = ["exec_long", "exec_short", "dir_long", "dir_short"]
PRICE_COLUMNS = ["open", "high", "low", "close", "atr"]
BACKTEST_COLUMNS = PRICE_COLUMNS + metrics.LIQUIDITY_COLUMNS   # + what the capacity check reads
RETURN_PERIOD = "15min"        # the one return frequency of every Sharpe: CPCV paths, OOS-1, the exam, the DSR
PERIODS_PER_YEAR = 4 * 24 * 365
SCORE_BOUND = 10.0             # scores are annualised Sharpe ratios, softly bounded to +-SCORE_BOUND
NO_TRADES = -SCORE_BOUND - 1.0  # the score of a span without a trade: "no strategy", below every trader
TOPS = ("exec_top", "direction_top", "aggressive_top")
DSR_CUTOFF = 0.95
MIN_SEGMENT_BARS = 24
DEMO_DAYS = 14
DEMO_TRIALS = 12
DEMO_SEED = 7
DEMO_SPLIT = (0.6, 0.15)  # development, OOS-1 shares: a 25% exam (~2.6 of 14 days after warm-up and gaps)
INDEPENDENT_SEED_OFFSET = 1000  # the demo's independent market: seed + this
INDEPENDENT_DAYS = 3            # days the champion trades on it, after the features' warm-up days


class TrainError(Exception):
    """A problem the user can fix (no data, too few bars, unreachable storage); shown without a traceback."""


# ---------------------------------------------------------------- data and splits
@dataclass
class Segments:
    """Row ranges of the three time segments; `gap` bars separate them so no label spans a boundary."""
    dev: slice
    oos1: slice
    super_oos: slice
    gap: int


@dataclass
class TrainData:
    frame: pd.DataFrame          # contiguous bars from the first warm one: OHLC, is_gap, atr, is_warm, features
    fine: pd.DataFrame | None    # 1m bars that settle same-bar TP/SL races (None at 1m)
    features: list[str]
    segments: Segments
    fingerprint: str
    bar_seconds: int


def label_horizon_bars(cfg: GlobalConfig) -> int:
    """Bars from a signal until its longest label is known (entry window + holding, or direction horizon)."""
    s = cfg.strategy
    return max(s.time_limit_bars + s.max_holding_bars + 1, cfg.labels.direction_horizon_bars)


def split_segments(n_rows: int, cfg: GlobalConfig) -> Segments:
    """Development / OOS-1 / Super-OOS row ranges with gaps at least as long as the label horizon."""
    gap = max(label_horizon_bars(cfg), bars_for(cfg.tune.embargo, cfg.data.timeframe))
    dev_end = int(n_rows * cfg.tune.dev_fraction)
    oos1_end = int(n_rows * (cfg.tune.dev_fraction + cfg.tune.oos1_fraction))
    segments = Segments(slice(0, dev_end), slice(dev_end + gap, oos1_end), slice(oos1_end + gap, n_rows), gap)
    min_dev = cfg.tune.cpcv_groups * MIN_SEGMENT_BARS + gap
    sizes = {"development": dev_end, "OOS-1": oos1_end - dev_end - gap, "Super-OOS": n_rows - oos1_end - gap}
    needs = {"development": min_dev, "OOS-1": MIN_SEGMENT_BARS, "Super-OOS": MIN_SEGMENT_BARS}
    short = [f"{k} has {sizes[k]} bars, needs {needs[k]}" for k in sizes if sizes[k] < needs[k]]
    if short:
        raise TrainError(f"too few bars for the requested split ({n_rows} warm {cfg.data.timeframe} bars, "
                         f"gaps of {gap} bars): " + "; ".join(short) + ". Record more data or use a "
                         "smaller --timeframe.")
    return segments


def data_fingerprint(bars: pd.DataFrame) -> str:
    """A hash of the bars the models saw, so a report can be tied to its exact data."""
    digest = hashlib.sha256(bars.index.asi8.tobytes())
    digest.update(np.ascontiguousarray(bars[["open", "high", "low", "close", "volume"]].to_numpy()).tobytes())
    return digest.hexdigest()[:16]


def load_training_data(cfg: GlobalConfig) -> TrainData:
    """Bars and features for the configured data folder and timeframe, restricted to warm rows."""
    try:
        bars = data_loader.load_bars(cfg)
    except data_loader.DataError as exc:
        raise TrainError(str(exc)) from None
    if bars.empty or int((~bars["is_empty"]).sum()) == 0:
        raise TrainError(f"no trades in {cfg.data.data_dir} at timeframe {cfg.data.timeframe}")
    features = feature_engine.compute_features(bars, cfg)
    names = feature_engine.feature_names(cfg)
    warm = features["is_warm"].to_numpy(bool)
    if not warm.any():
        raise TrainError(f"{len(bars)} bars in {cfg.data.data_dir} are all inside the features' warm-up "
                         f"({feature_engine.warmup_bars(cfg)} bars): record more data")
    frame = bars[["open", "high", "low", "close", "is_gap", *metrics.LIQUIDITY_COLUMNS]].join(
        features[["atr", "is_warm", *names]])
    frame = frame.iloc[int(np.argmax(warm)):]
    fine = data_loader.load_bars(cfg, "1m") if cfg.data.timeframe != "1m" else None
    return TrainData(frame, fine, names, split_segments(len(frame), cfg), data_fingerprint(bars),
                     timeframe_seconds(cfg.data.timeframe))


# ---------------------------------------------------------------- search space
def trial_config(trial: optuna.trial.BaseTrial, base: GlobalConfig) -> GlobalConfig:
    """The config a trial evaluates: strategy and model parameters drawn together from TuneConfig ranges."""
    cfg = copy.deepcopy(base)
    s, m, r = cfg.strategy, cfg.model, cfg.tune
    s.limit_offset_atr = trial.suggest_float("limit_offset_atr", *r.limit_offset_atr)
    s.take_profit_atr = trial.suggest_float("take_profit_atr", *r.take_profit_atr)
    s.stop_loss_atr = trial.suggest_float("stop_loss_atr", *r.stop_loss_atr)
    trial.suggest_float("exec_top", *r.exec_top, log=True)
    trial.suggest_float("direction_top", *r.direction_top, log=True)
    trial.suggest_float("aggressive_top", *r.aggressive_top, log=True)
    s.aggressive_tp_mult = trial.suggest_float("aggressive_tp_mult", *r.aggressive_tp_mult)
    m.boosting_type = trial.suggest_categorical("boosting_type", r.boosting_types)
    m.n_estimators = trial.suggest_int("n_estimators", *r.n_estimators)
    m.learning_rate = trial.suggest_float("learning_rate", *r.learning_rate, log=True)
    m.num_leaves = trial.suggest_int("num_leaves", *r.num_leaves)
    m.max_depth = trial.suggest_int("max_depth", *r.max_depth)
    m.min_child_samples = trial.suggest_int("min_child_samples", *r.min_child_samples, log=True)
    m.feature_fraction = trial.suggest_float("feature_fraction", *r.feature_fraction)
    m.bagging_fraction = trial.suggest_float("bagging_fraction", *r.bagging_fraction)
    cfg.validate("trial")
    return cfg


# ---------------------------------------------------------------- scoring
def period_returns(result: "backtest.BacktestResult") -> pd.Series:
    """Mark-to-market returns per RETURN_PERIOD: the single-path series every Sharpe here is computed from."""
    return metrics.period_returns(result.equity["equity"], result.initial_equity, RETURN_PERIOD)


def span_score(result: "backtest.BacktestResult", returns: pd.Series, cfg: GlobalConfig) -> float:
    """A bounded, trade-aware score of one out-of-sample run, in annualised Sharpe units.

    The annualised Sharpe of the RETURN_PERIOD returns (0 when flat), softly bounded to ±SCORE_BOUND
    (SCORE_BOUND·tanh(Sharpe / SCORE_BOUND): about the Sharpe itself below 5, never beyond the bound). A positive
    score is shrunk by trades / (tune.min_trades_per_day × days) when the span trades less often than that, and
    by the rarer leg's trades / half that number when one leg (maker or taker) is rarer, so a lucky handful of
    trades or a one-legged hybrid cannot top the study; a span without a trade scores NO_TRADES, below every
    span that traded ("no strategy").
    """
    legs = trade_counts(result)
    if legs["trades"] == 0:
        return NO_TRADES
    sharpe = metrics.sharpe(returns.to_numpy(), PERIODS_PER_YEAR)
    score = SCORE_BOUND * float(np.tanh(sharpe / SCORE_BOUND)) if np.isfinite(sharpe) else 0.0
    days = (result.equity.index[-1] - result.equity.index[0]).total_seconds() / 86400.0
    needed = cfg.tune.min_trades_per_day * days
    rarer_leg = min(legs["maker_trades"], legs["taker_trades"])
    if score > 0 and needed > 0:
        score *= min(1.0, legs["trades"] / needed) * min(1.0, rarer_leg / (needed / 2.0))
    return score


def trade_counts(result: "backtest.BacktestResult") -> dict[str, int]:
    """Trades of a run by leg: maker (chop, PostOnly entries) and taker (breakout, market entries)."""
    regime = result.trades["regime"] if len(result.trades) else pd.Series(dtype=object)
    return {"trades": int(len(result.trades)), "maker_trades": int((regime == "maker").sum()),
            "taker_trades": int((regime == "taker").sum())}


@dataclass
class Timer:
    """Seconds spent fitting models versus the whole trial (for the benchmark and the report)."""
    fit: float = 0.0

    def timed_fit(self, bundle: ModelBundle, X: pd.DataFrame, y: pd.DataFrame) -> None:
        start = time.perf_counter()
        bundle.fit(X, y)
        self.fit += time.perf_counter() - start


# ---------------------------------------------------------------- thresholds from score distributions
def family_scores(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Finite execution scores (long and short pooled) and direction scores of an (n, 4) PROBA_COLUMNS array."""
    p = np.asarray(probs, dtype=np.float64)
    exec_, dir_ = p[:, :2].ravel(), p[:, 2:].ravel()
    return exec_[np.isfinite(exec_)], dir_[np.isfinite(dir_)]


@dataclass
class ScoreReference:
    """Out-of-fold scores that thresholds are read from, per model family (long and short pooled)."""
    exec_values: np.ndarray
    dir_values: np.ndarray

    @classmethod
    def of(cls, probs: np.ndarray) -> "ScoreReference":
        exec_, dir_ = family_scores(probs)
        if exec_.size == 0 or dir_.size == 0:
            raise TrainError("no out-of-fold scores to set a threshold from")
        return cls(exec_, dir_)

    def thresholds(self, tops: dict[str, float]) -> dict[str, float]:
        """Probabilities above which the top fractions of this reference's scores lie (the live thresholds):
        numpy's 'inverted_cdf' quantile at 1 - top, so `p >= threshold` selects that top fraction."""
        exec_thr = float(np.quantile(self.exec_values, 1.0 - tops["exec_top"], method="inverted_cdf"))
        dir_thr, aggr_thr = np.quantile(self.dir_values, [1.0 - tops["direction_top"], 1.0 - tops["aggressive_top"]],
                                        method="inverted_cdf")
        return {"exec_threshold": exec_thr, "direction_threshold": float(dir_thr),
                "aggressive_threshold": float(max(dir_thr, aggr_thr))}

    def ranks(self, probs: np.ndarray) -> np.ndarray:
        """Each score's empirical CDF value in this reference (same family; NaN stays NaN): comparing a rank
        with 1 - top is comparing the score with `thresholds(...)`."""
        p = np.asarray(probs, dtype=np.float64)
        out = np.full(p.shape, np.nan)
        for cols, ref in (((0, 1), np.sort(self.exec_values)), ((2, 3), np.sort(self.dir_values))):
            for c in cols:
                ok = np.isfinite(p[:, c])
                out[ok, c] = np.searchsorted(ref, p[ok, c], side="right") / ref.size
        return out


def trial_tops(params: dict) -> dict[str, float]:
    """A trial's top fractions (exec_top, direction_top, aggressive_top) from its parameters."""
    return {name: float(params[name]) for name in TOPS}


def with_thresholds(cfg: GlobalConfig, thresholds: dict[str, float]) -> GlobalConfig:
    """A copy of cfg whose strategy uses these probability thresholds."""
    out = copy.deepcopy(cfg)
    for name, value in thresholds.items():
        setattr(out.strategy, name, float(value))
    out.validate("thresholds")
    return out


def rank_thresholds(tops: dict[str, float]) -> dict[str, float]:
    """Thresholds in rank space (see ScoreReference.ranks): a top fraction f is the rank 1 - f."""
    dir_thr = 1.0 - tops["direction_top"]
    return {"exec_threshold": 1.0 - tops["exec_top"], "direction_threshold": dir_thr,
            "aggressive_threshold": max(dir_thr, 1.0 - tops["aggressive_top"])}


# ---------------------------------------------------------------- fitting and testing
def labelled(frame: pd.DataFrame, cfg: GlobalConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Training samples: warm rows whose four labels are known (rows whose outcome lies past the data's end
    are dropped, never labelled 0), with those labels."""
    lab = labels_mod.make_labels(frame[PRICE_COLUMNS + ["is_gap"]], cfg)
    keep = (lab[LABEL_COLUMNS].to_numpy() >= 0).all(axis=1) & frame["is_warm"].to_numpy(bool)
    return frame[keep], lab[keep]


def predict_span(bundle: ModelBundle, frame: pd.DataFrame, features: list[str]) -> pd.DataFrame:
    """Probabilities on a span's warm rows; NaN (no signal, so no entry) where features are not warm."""
    return bundle.predict_where(frame[features], frame["is_warm"].to_numpy(bool))


def fit_bundle(frame: pd.DataFrame, features: list[str], cfg: GlobalConfig, timer: Timer) -> ModelBundle:
    """Train the four models on every labelled row of `frame`."""
    rows, lab = labelled(frame, cfg)
    if len(rows) < MIN_SEGMENT_BARS:
        raise TrainError(f"only {len(rows)} labelled rows to train on")
    bundle = ModelBundle(cfg.model, features, seed=cfg.seed)
    timer.timed_fit(bundle, rows[features], lab)
    bundle.psi_window = cfg.live.drift_window
    bundle.psi_limits = psi_limits(rows[features], bundle.quantiles, cfg.live.drift_window)
    return bundle


def run_segment(data: TrainData, frame: pd.DataFrame, probs: pd.DataFrame,
                cfg: GlobalConfig) -> "backtest.BacktestResult":
    """Backtest a span with given probabilities (the one engine every number comes from)."""
    return backtest.run_backtest(frame[BACKTEST_COLUMNS], probs, cfg, fine=data.fine)


@dataclass
class CpcvOutcome:
    score: float
    path_scores: list[float]
    path_trades: list[dict[str, int]]  # trades per path by leg (trade_counts)
    path_sharpes: list[float]      # per-period (RETURN_PERIOD) Sharpe of each single path, 0 when flat
    path_equity: list[pd.Series]   # hourly mark-to-market equity of each path (the report's fan)
    mean_returns: pd.Series        # period returns averaged over paths (a trial's row in the PBO matrix)
    skew: float                    # skewness and Pearson kurtosis of all paths' period returns
    kurt: float
    dev_thresholds: dict[str, float]  # the probabilities the top fractions select in the dev span's out-of-fold scores


def evaluate_cpcv(data: TrainData, cfg: GlobalConfig, tops: dict[str, float], timer: Timer) -> CpcvOutcome:
    """Score a config by CPCV on the development span: purged, embargoed folds, backtested as paths.

    Each split's thresholds are its top fractions of the out-of-fold scores on its own training groups
    (validation.cpcv_training_pools), never of the test rows it is scored on; a path applies them by
    comparing each split's scores as ranks in that reference.
    """
    span = data.frame.iloc[data.segments.dev]
    dev, lab = labelled(span, cfg)
    t0 = (dev.index + pd.Timedelta(seconds=data.bar_seconds)).to_numpy()
    t1 = np.maximum(lab["t1_exec"].to_numpy(), lab["t1_dir"].to_numpy())
    n_groups, n_test = cfg.tune.cpcv_groups, cfg.tune.cpcv_test_groups
    splits = validation.cpcv_splits(t0, t1, n_groups, n_test, pd.Timedelta(seconds=parse_duration(cfg.tune.embargo)))
    X = dev[data.features]
    split_probs = []
    for train_idx, test_idx in splits:
        bundle = ModelBundle(cfg.model, data.features, seed=cfg.seed)
        timer.timed_fit(bundle, X.iloc[train_idx], lab.iloc[train_idx])
        split_probs.append((test_idx, bundle.predict(X.iloc[test_idx]).to_numpy()))
    pools = validation.cpcv_training_pools(split_probs, len(dev), n_groups, n_test)
    ranked = [(idx, ScoreReference.of(pool).ranks(p)) for (idx, p), pool in zip(split_probs, pools)]
    rank_cfg = with_thresholds(cfg, rank_thresholds(tops))
    scores, trades, sharpes, curves, returns = [], [], [], [], []
    for path in validation.cpcv_path_predictions(ranked, len(dev), n_groups, n_test):
        probs = pd.DataFrame(path, index=dev.index, columns=ModelBundle.PROBA_COLUMNS).reindex(span.index)
        result = run_segment(data, span, probs, rank_cfg)
        r = period_returns(result)
        scores.append(span_score(result, r, cfg))
        trades.append(trade_counts(result))
        sharpes.append(float(np.nan_to_num(validation.sharpe_stats(r.to_numpy())[0])))
        curves.append(result.equity["equity"].resample("1h").last())
        returns.append(r)
    _, skew, kurt = validation.sharpe_stats(pd.concat(returns).to_numpy())
    reference = ScoreReference.of(np.concatenate([p for _, p in split_probs]))
    return CpcvOutcome(float(np.median(scores)), scores, trades, sharpes, curves,
                       pd.concat(returns, axis=1).mean(axis=1), skew, kurt, reference.thresholds(tops))


# ---------------------------------------------------------------- the study
def open_storage(url: str) -> optuna.storages.BaseStorage:
    """An Optuna storage from a URL: sqlite/postgresql/mysql (RDB) or 'journal:<file>'; clear errors."""
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend
        path = Path(url[len("journal:"):])
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    engine_kwargs = {"connect_args": {"connect_timeout": 10}} if url.startswith("postgresql") else {}
    for attempt in range(4):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=60,
                                              grace_period=180)
        except Exception as exc:  # noqa: BLE001 — every driver error becomes one readable message
            if _schema_race(exc):
                time.sleep(0.5 + attempt)  # workers starting together race to create the schema; retry finds it
                continue
            text = str(exc).strip()
            reason = redact(text.splitlines()[0] if text else type(exc).__name__)
            raise TrainError(f"cannot open study storage {redact(url)}: {reason}") from None
    raise TrainError(f"cannot create the study schema in {redact(url)}: concurrent workers kept colliding")


def _schema_race(exc: Exception) -> bool:
    """Whether opening the storage lost the race to create its schema: PostgreSQL's IntegrityError or
    ProgrammingError, SQLite's OperationalError "table ... already exists" or "database is locked" (optuna
    issues 1092, 4621)."""
    import sqlalchemy.exc
    if isinstance(exc, (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError)):
        return True
    return isinstance(exc, sqlalchemy.exc.OperationalError) and ("already exists" in str(exc) or "locked" in str(exc))


def redact(text: str) -> str:
    """Hide passwords in storage URLs before they reach a log or an error."""
    return re.sub(r"(://[^:/@\s]+:)[^@\s]+@", r"\1***@", text)


def default_storage(cfg: GlobalConfig, model_dir: Path) -> str:
    path = model_dir / cfg.symbol / "study.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path.resolve()}"


class StopFlag:
    """First Ctrl-C: finish the running trial, then stop; second Ctrl-C: stop at once."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("Ctrl-C: stopping after the running trial (press again to abort now)")


def make_objective(data: TrainData, base: GlobalConfig, budget: int, worker: str) -> Callable:
    """The Optuna objective: CPCV score of the trial's config; trials past the budget are not run."""
    def objective(trial: optuna.Trial) -> float:
        if trial.number >= budget:
            trial.study.stop()
            raise optuna.TrialPruned(f"trial budget of {budget} reached")
        cfg = trial_config(trial, base)
        timer, start = Timer(), time.perf_counter()
        outcome = evaluate_cpcv(data, cfg, trial_tops(trial.params), timer)
        elapsed = time.perf_counter() - start
        attrs = {"worker": worker, "seconds": round(elapsed, 3), "fit_seconds": round(timer.fit, 3),
                 "path_scores": [round(s, 6) for s in outcome.path_scores], "path_trades": outcome.path_trades,
                 "trades": int(np.median([t["trades"] for t in outcome.path_trades])),
                 "path_sharpes": outcome.path_sharpes, "sharpe": float(np.median(outcome.path_sharpes)),
                 "skew": outcome.skew, "kurtosis": outcome.kurt, "dev_thresholds": outcome.dev_thresholds,
                 "period_returns": [round(float(x), 9) for x in outcome.mean_returns],
                 "path_equity": [[round(float(x), 2) for x in c] for c in outcome.path_equity],
                 "path_times": [t.isoformat() for t in outcome.path_equity[0].index]}
        for key, value in metrics.json_safe(attrs).items():
            trial.set_user_attr(key, value)
        return outcome.score
    return objective


def run_study(study: optuna.Study, objective: Callable, budget: int, n_jobs: int, stop: StopFlag) -> None:
    """Optimise until the study holds `budget` trials, with a progress bar showing the best score."""
    done = len([t for t in study.trials if t.state.is_finished()])
    if done >= budget:
        return
    bar = tqdm(total=budget, initial=done, desc="trials", unit="trial", dynamic_ncols=True)

    def on_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        bar.update(1)
        try:
            bar.set_postfix(best=f"{study.best_value:.3f}")
        except ValueError:
            pass
        if stop.requested:
            study.stop()
    try:
        study.optimize(objective, n_trials=budget - done, n_jobs=n_jobs, callbacks=[on_trial],
                       catch=(ValueError, ArithmeticError))
    finally:
        bar.close()


# ---------------------------------------------------------------- qualification and final exam
@dataclass
class Candidate:
    trial: optuna.trial.FrozenTrial
    cfg: GlobalConfig              # with the probability thresholds its models use
    bundle: ModelBundle | None = None
    oos1: Any = None               # BacktestResult on OOS-1
    oos1_score: float = float("nan")
    rank_score: float = float("nan")  # what OOS-1 ranks by: CPCV and OOS-1 scores weighted by their lengths
    final: Any = None              # BacktestResult on Super-OOS (the winner only)
    extra: dict = field(default_factory=dict)


def distinct_complete(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Completed trials, one per distinct parameter set (a repeated point is not new evidence)."""
    seen, out = set(), []
    for t in study.trials:
        key = json.dumps(t.params, sort_keys=True)
        if t.state == optuna.trial.TrialState.COMPLETE and key not in seen:
            seen.add(key)
            out.append(t)
    return out


def qualify(study: optuna.Study, data: TrainData, base: GlobalConfig, timer: Timer) -> list[Candidate]:
    """Retrain the top CPCV trials on all development data and rank them on OOS-1.

    A candidate's thresholds are its top fractions of its trial's out-of-fold development scores. Rank: the
    bounded CPCV and OOS-1 scores (both annualised Sharpe, see span_score) averaged with weights equal to the
    bars each one saw (evidence_weighted_score), so two days of OOS-1 cannot outvote the development span's
    CPCV evidence; a candidate without an OOS-1 trade ranks below every trader.
    """
    complete = distinct_complete(study)
    if not complete:
        raise TrainError("the study has no completed trial to qualify")
    top = sorted(complete, key=lambda t: t.value, reverse=True)[: base.tune.candidates]
    candidates = []
    frame = data.frame
    for trial in tqdm(top, desc="OOS-1 qualification", unit="candidate", dynamic_ncols=True):
        cfg = with_thresholds(trial_config(optuna.trial.FixedTrial(trial.params), base),
                              trial.user_attrs["dev_thresholds"])
        bundle = fit_bundle(frame.iloc[data.segments.dev], data.features, cfg, timer)
        oos = frame.iloc[data.segments.oos1]
        probs = predict_span(bundle, oos, data.features)
        result = run_segment(data, oos, probs, cfg)
        score = span_score(result, period_returns(result), cfg)
        rank = NO_TRADES if score == NO_TRADES else evidence_weighted_score(
            max(trial.value, NO_TRADES), data.segments.dev.stop, score, len(oos))
        candidates.append(Candidate(trial, cfg, bundle, result, score, rank, extra={"oos1_probs": probs}))
    return sorted(candidates, key=lambda c: (c.rank_score, c.trial.value), reverse=True)


def evidence_weighted_score(cpcv_score: float, cpcv_bars: int, oos1_score: float, oos1_bars: int) -> float:
    """The two out-of-sample scores of a candidate weighted by the bars behind each: a Sharpe estimate's
    variance falls as 1/length (Lo 2002), so the length-weighted mean is the pooled estimate that trusts each
    span as much as its length warrants. Scores in annualised Sharpe units (span_score), bars > 0."""
    return (cpcv_score * cpcv_bars + oos1_score * oos1_bars) / float(cpcv_bars + oos1_bars)


def final_exam(winner: Candidate, data: TrainData) -> None:
    """Backtest the qualified winner once on the untouched Super-OOS slice, as it ships.

    The exam model is the development-trained model OOS-1 qualified, not a retrained one: retraining shifts a
    model's score distribution away from any threshold read before, which can silence a leg. Its thresholds
    are its top fractions of its own scores on OOS-1, data it was not fitted on and is not examined on.
    """
    seg = data.segments
    reference = ScoreReference.of(winner.extra["oos1_probs"].to_numpy())
    winner.cfg = with_thresholds(winner.cfg, reference.thresholds(trial_tops(winner.trial.params)))
    final = data.frame.iloc[seg.super_oos]
    winner.final = run_segment(data, final, predict_span(winner.bundle, final, data.features), winner.cfg)


def finite_or(value: Any, default: float) -> float:
    return float(value) if value is not None and np.isfinite(value) else default


def study_statistics(study: optuna.Study, winner: Candidate) -> dict:
    """Deflated Sharpe and MinTRL of the Super-OOS result given every distinct trial run, and the study's PBO.

    DSR (Bailey & López de Prado 2014): PSR(SR0) = Φ((SR - SR0)·sqrt(n - 1) / sqrt(1 - skew·SR + (kurt - 1)/4·SR²))
    with SR0 = sqrt(V[SR_n])·((1 - γ)Φ⁻¹(1 - 1/N) + γΦ⁻¹(1 - 1/(N·e))), N every distinct trial, V the variance of
    their Sharpe ratios; MinTRL (Bailey & López de Prado 2012) is the n at which that PSR reaches DSR_CUTOFF.

    Like for like: the exam's Sharpe and every trial's Sharpe are per-RETURN_PERIOD Sharpe ratios of single
    backtest paths (a trial's is the median over its CPCV paths, never the Sharpe of path-averaged returns);
    skewness and kurtosis come from the winner's CPCV path returns (thousands of points, not the exam's few),
    normal when undefined.
    """
    complete = [t for t in distinct_complete(study) if "sharpe" in t.user_attrs]
    trial_sr = np.array([finite_or(t.user_attrs["sharpe"], 0.0) for t in complete])
    returns = period_returns(winner.final).to_numpy()
    sr = finite_or(validation.sharpe_stats(returns)[0], 0.0)
    skew = finite_or(winner.trial.user_attrs.get("skew"), 0.0)
    kurt = finite_or(winner.trial.user_attrs.get("kurtosis"), 3.0)
    n_trials = max(len(complete), 1)
    sr_var = float(np.var(trial_sr, ddof=1)) if len(trial_sr) > 1 else 0.0
    sr0 = validation.expected_max_sharpe(n_trials, sr_var)
    n_obs = max(len(returns), 2)
    period_days = pd.Timedelta(RETURN_PERIOD).total_seconds() / 86400.0
    stats = {"return_period": RETURN_PERIOD, "super_oos_sharpe": sr, "super_oos_periods": int(len(returns)),
             "super_oos_days": len(returns) * period_days, "skew": skew, "kurtosis": kurt,
             "n_trials": n_trials, "trial_sharpe_var": sr_var, "expected_max_sharpe": sr0,
             "deflated_sharpe": validation.deflated_sharpe(sr, n_obs, skew, kurt, n_trials, sr_var),
             "min_track_record_periods": validation.min_track_record_length(sr, sr0, skew, kurt, DSR_CUTOFF),
             "pbo": float("nan"), "pbo_logits": []}
    stats["min_track_record_days"] = stats["min_track_record_periods"] * period_days
    length = min(len(t.user_attrs["period_returns"]) for t in complete) if complete else 0
    matrix = np.array([t.user_attrs["period_returns"][:length] for t in complete], dtype=float).T
    n_partitions = min(16, (length // 4) // 2 * 2)
    if len(complete) >= 2 and n_partitions >= 4:
        stats["pbo"], logits = validation.pbo(matrix, n_partitions)
        stats["pbo_logits"] = [float(x) for x in np.asarray(logits)]
    return stats


def verdict(winner: Candidate, stats: dict, super_oos_share: float) -> tuple[str, str]:
    """(code, sentence): EDGE, NO EDGE, INCONCLUSIVE or NO STRATEGY, with the exam's length and trades.

    NO STRATEGY: the best candidate has no OOS-1 trade (nothing trades). NO EDGE: the exam or OOS-1 loses,
    or the exam's Sharpe does not beat the expected best of the study's unskilled trials (no exam length
    would then suffice). EDGE: deflated Sharpe >= DSR_CUTOFF, i.e. the exam is at least the MinTRL long.
    INCONCLUSIVE: the exam made money but is shorter than the MinTRL; says how many more days it needs.
    """
    legs = trade_counts(winner.final)
    final_ret = float(winner.final.metrics["total_return"])
    oos1_ret = float(winner.oos1.metrics["total_return"])
    dsr = finite_or(stats["deflated_sharpe"], 0.0)
    exam = (f"Super-OOS {stats['super_oos_days']:.1f} days, {legs['trades']} trades ({legs['maker_trades']} maker, "
            f"{legs['taker_trades']} taker), return {final_ret:+.2%}, "
            f"Sharpe {annualised_text(stats['super_oos_sharpe'])} annualised"
            f"; OOS-1 return {oos1_ret:+.2%} over {len(winner.oos1.trades)} trades; deflated Sharpe {dsr:.3f} "
            f"after {stats['n_trials']} distinct trials; MinTRL {stats['min_track_record_days']:.1f} days; "
            f"PBO {stats['pbo']:.2f}")
    if len(winner.oos1.trades) == 0:
        return "NO STRATEGY", (f"NO STRATEGY: no candidate trades on OOS-1 ({exam}). There is nothing to trade.")
    if final_ret <= 0 or oos1_ret <= 0 or not np.isfinite(stats["min_track_record_days"]):
        why = ("the exam or OOS-1 loses" if final_ret <= 0 or oos1_ret <= 0 else
               "the exam's Sharpe does not beat the expected best of the study's trials")
        return "NO EDGE", f"NO EDGE: {why} ({exam}). Do not trade these models."
    if dsr >= DSR_CUTOFF:
        caveat = metrics.liquidity_warning(winner.final.metrics)
        return "EDGE", f"EDGE: the evidence supports an edge ({exam})." + (f" But {caveat}." if caveat else "")
    more = max(stats["min_track_record_days"] - stats["super_oos_days"], 0.0)
    return "INCONCLUSIVE", (f"INCONCLUSIVE: need ≈ {more:.1f} more days of exam (≈ {more / super_oos_share:.0f} "
                            f"more days of data at this split): the exam made money but is shorter than its "
                            f"MinTRL ({exam}). Do not trade these models yet.")


# ---------------------------------------------------------------- report
TRAIN_ASSUMPTIONS = [
    "Time split: development / OOS-1 / Super-OOS (tune.dev_fraction, tune.oos1_fraction, the rest), separated by "
    "gaps at least as long as the longest label horizon and the embargo, so no label spans a boundary.",
    "Each trial labels the data for its own strategy parameters and is scored by CPCV on the development span: "
    "training samples overlapping a test block's label intervals are purged, then an embargo follows each block; "
    "LightGBM bins features on each fold's training rows only.",
    "Thresholds are top fractions of each model family's own out-of-fold scores (trial parameters exec_top, "
    "direction_top, aggressive_top), stored and used as probabilities. CPCV split: read from the out-of-fold "
    "scores on its training groups; OOS-1 candidate: from the trial's CPCV out-of-fold development scores; "
    "shipped (exam) model: from its own OOS-1 scores. Never from the rows they are scored on.",
    f"Scores are annualised Sharpe ratios of {RETURN_PERIOD} mark-to-market returns, softly bounded to "
    f"±{SCORE_BOUND:g} "
    "(bound·tanh(Sharpe/bound)); "
    "a positive score is shrunk when a span trades less than tune.min_trades_per_day, or when one leg (maker or "
    "taker) trades less than half that; a span without trades "
    f"scores {NO_TRADES:g} ('no strategy'). Trial score: median over CPCV paths.",
    "OOS-1 ranks the top candidates (retrained on all development data) by their CPCV and OOS-1 scores "
    "weighted by the bars each saw; only the winner sees Super-OOS, once, as it ships: the development-trained model, with "
    "thresholds from its own OOS-1 scores, and the model family "
    "and round count that CPCV scored.",
    f"Deflated Sharpe: the Super-OOS {RETURN_PERIOD} Sharpe against the expected maximum of the distinct trials' "
    "single-path Sharpe ratios (median over each trial's CPCV paths, same frequency); skewness and kurtosis from "
    "the winner's CPCV path returns. MinTRL (Bailey & López de Prado 2012): the exam length at which that "
    "deflated Sharpe reaches 0.95. PBO by CSCV over the trials' path-averaged development returns.",
]


def write_report(path: Path, cand: Candidate, data: TrainData, study: optuna.Study, stats: dict | None,
                 params: dict, extra_sections: list[str] = ()) -> None:
    """One self-contained HTML page per ranked model: the evidence for and against its edge, each curve saying
    what it is and which data it saw."""
    import report
    seg = data.segments
    sections = [report.banner_html(params["verdict"], params["edge"])]
    if cand.final is not None and stats is not None:
        sections += segment_sections(report, "Super-OOS final exam", data.frame.iloc[seg.super_oos], cand.final,
                                     "the winner (trained on the development span, thresholds from its OOS-1 scores), trading the Super-OOS slice it "
                                     "never saw, once")
        sections.append(report.metrics_table_html({k: v for k, v in stats.items() if k != "pbo_logits"},
                                                  f"Deflated Sharpe, MinTRL and PBO of the study ({RETURN_PERIOD} "
                                                  "Sharpe ratios, not annualised)"))
    sections += segment_sections(report, "OOS-1 qualification", data.frame.iloc[seg.oos1], cand.oos1,
                                 "this candidate trained on the development span, trading OOS-1, which it never saw")
    sections += list(extra_sections)
    attrs = cand.trial.user_attrs
    labels = [f"path {i + 1}: Sharpe {annualised_text(s)}, {t['trades']} trades ({t['maker_trades']} maker, "
              f"{t['taker_trades']} taker)" for i, (s, t) in enumerate(zip(attrs["path_sharpes"],
                                                                            attrs["path_trades"]))]
    sections.append(report.figure_html(report.path_fan_figure(attrs["path_times"], attrs["path_equity"], labels)))
    if stats is not None and stats["pbo_logits"]:
        sections.append(report.figure_html(report.pbo_figure(stats["pbo_logits"], stats["pbo"])))
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    sections.append(report.figure_html(report.history_figure(
        [t.number for t in done], [t.value for t in done], [t.user_attrs.get("trades", 0) for t in done],
        f"annualised Sharpe of {RETURN_PERIOD} returns, median CPCV path, bounded ±{SCORE_BOUND:g}")))
    sections.append(param_importance_section(report, study))
    gain = cand.bundle.feature_importance().sum(axis=1)
    sections.append(report.figure_html(report.importance_figure(list(gain.index), list(gain.to_numpy()),
                                                                "Feature importance (total gain, 4 models)")))
    sections.append(report.table_html(calibration(cand, data), "Calibration on OOS-1 (reliability table: the "
                                      "development-trained models' predicted probability vs the observed rate)"))
    sections.append(report.assumptions_html([*TRAIN_ASSUMPTIONS, *cand.oos1.assumptions], "Assumptions"))
    title = f"{params['symbol']} rank {params['rank']} (trial {params['trial']})"
    atomic_write_text(path, report.page(title, sections))


def annualised_text(sr_per_period: float) -> str:
    """A per-RETURN_PERIOD Sharpe ratio as the annualised figure a trader reads."""
    return f"{finite_or(sr_per_period, 0.0) * np.sqrt(PERIODS_PER_YEAR):+.1f}"


def segment_sections(report: Any, title: str, frame: pd.DataFrame, result: Any, saw: str) -> list[str]:
    """Equity, trades and metrics of one backtested span; `saw` says which model traded which data."""
    legs = trade_counts(result)
    days = len(frame) * (frame.index[1] - frame.index[0]).total_seconds() / 86400.0 if len(frame) > 1 else 0.0
    summary = (f"{title}: {days:.1f} days, {legs['trades']} trades ({legs['maker_trades']} maker, "
               f"{legs['taker_trades']} taker), return {result.metrics['total_return']:+.2%}")
    return [f"<h2>{title}</h2><p>{summary}. Curve: {saw}.</p>",
            report.figure_html(report.equity_figure(result.equity, f"{title}: equity and drawdown ({saw})")),
            report.figure_html(report.candles_figure(frame, result.trades, f"{title}: trades")),
            report.metrics_table_html(result.metrics, f"{title}: metrics")]


def param_importance_section(report: Any, study: optuna.Study) -> str:
    """fANOVA importances of the searched parameters (needs a few finished trials)."""
    try:
        imp = optuna.importance.get_param_importances(study, evaluator=optuna.importance.FanovaImportanceEvaluator(
            seed=0))
    except (RuntimeError, ValueError) as exc:
        return f"<h2>Parameter importance</h2><p>not available: {exc}</p>"
    return report.figure_html(report.importance_figure(list(imp), list(imp.values()),
                                                       "Parameter importance (fANOVA)"))


def calibration(cand: Candidate, data: TrainData) -> pd.DataFrame:
    """Predicted probability vs observed rate per model and probability bin on the OOS-1 rows whose labels are
    known; empty bins are left out."""
    from models import reliability_table
    rows, lab = labelled(data.frame.iloc[data.segments.oos1], cand.cfg)
    probs = cand.extra["oos1_probs"].reindex(rows.index)
    tables = []
    for name, col in zip(LABEL_COLUMNS, ModelBundle.PROBA_COLUMNS):
        table = reliability_table(lab[name].to_numpy(), probs[col].to_numpy(), bins=5)
        table = table[table["count"] > 0]
        tables.append(pd.DataFrame({
            "model": name,
            "probability bin": [f"{lo:.1f}–{hi:.1f}" for lo, hi in zip(table["bin_lo"], table["bin_hi"])],
            "rows": table["count"].to_numpy(), "mean predicted": table["mean_p"].round(3).to_numpy(),
            "observed rate": table["frac_pos"].round(3).to_numpy()}))
    return pd.concat(tables, ignore_index=True)


# ---------------------------------------------------------------- artifacts
def library_versions() -> dict:
    import lightgbm
    import numba
    return {"python": platform.python_version(), "numpy": np.__version__, "pandas": pd.__version__,
            "lightgbm": lightgbm.__version__, "optuna": optuna.__version__, "numba": numba.__version__}


def span(frame: pd.DataFrame, rows: slice) -> list[str]:
    part = frame.index[rows]
    return [part[0].isoformat(), part[-1].isoformat()]


def candidate_params(c: Candidate, rank: int, data: TrainData, stats: dict | None, text: str,
                     code: str) -> dict:
    """Everything needed to reproduce and judge one ranked model (params.json)."""
    seg = data.segments
    s = c.cfg.strategy
    params = {
        "symbol": c.cfg.symbol, "timeframe": c.cfg.data.timeframe, "ob_levels": c.cfg.data.ob_levels,
        "rank": rank, "trial": c.trial.number, "edge": code == "EDGE", "verdict_code": code, "verdict": text,
        "thresholds": {"exec_threshold": s.exec_threshold, "direction_threshold": s.direction_threshold,
                       "aggressive_threshold": s.aggressive_threshold},
        "top_fractions": trial_tops(c.trial.params),
        "trades": {"cpcv_paths": c.trial.user_attrs.get("path_trades"), "oos1": trade_counts(c.oos1)},
        "data": {"data_dir": c.cfg.data.data_dir, "fingerprint": data.fingerprint, "bars": len(data.frame),
                 "first_bar": data.frame.index[0].isoformat(), "last_bar": data.frame.index[-1].isoformat()},
        "splits": {"dev": span(data.frame, seg.dev), "oos1": span(data.frame, seg.oos1),
                   "super_oos": span(data.frame, seg.super_oos), "gap_bars": seg.gap},
        "trained_on": span(data.frame, seg.dev),
        "metrics": {"cpcv_score": c.trial.value, "cpcv_path_scores": c.trial.user_attrs.get("path_scores"),
                    "oos1": c.oos1.metrics, "oos1_score": c.oos1_score, "rank_score": c.rank_score},
        "versions": library_versions(),
        "config": c.cfg.to_dict(),
    }
    if c.final is not None and stats is not None:
        params["metrics"]["super_oos"] = c.final.metrics
        params["trades"]["super_oos"] = trade_counts(c.final)
        params["metrics"]["study"] = {k: v for k, v in stats.items() if k != "pbo_logits"}
        params["backtest_span"] = params["splits"]["super_oos"]
    else:
        params["backtest_span"] = params["splits"]["oos1"]
    return metrics.json_safe(params)


def unexamined_verdict(cand: Candidate, rank: int, champion_code: str) -> tuple[str, str]:
    """(code, sentence) of a rank below 1: NOT EXAMINED. Only rank 1 sits the Super-OOS exam (one exam per
    study keeps its deflated Sharpe honest), so no other rank may borrow its verdict or its EDGE flag."""
    legs = trade_counts(cand.oos1)
    return "NOT EXAMINED", (f"NOT EXAMINED: rank {rank} (trial {cand.trial.number}) was ranked on OOS-1 "
                            f"({legs['trades']} trades, {legs['maker_trades']} maker, {legs['taker_trades']} taker, "
                            f"return {float(cand.oos1.metrics['total_return']):+.2%}) but never sat the Super-OOS "
                            f"exam, which only rank 1 takes (its verdict: {champion_code}). Do not trade it.")


def save_ranked(candidates: list[Candidate], data: TrainData, study: optuna.Study, stats: dict,
                text: str, code: str, model_dir: Path, extra_sections: list[str] = ()) -> list[Path]:
    """Write rank_1..rank_K atomically (temp folder, then rename) and remove stale ranks of older runs."""
    root = model_dir / candidates[0].cfg.symbol
    root.mkdir(parents=True, exist_ok=True)
    written = []
    for rank, cand in enumerate(candidates, start=1):
        rank_code, rank_text = (code, text) if rank == 1 else unexamined_verdict(cand, rank, code)
        params = candidate_params(cand, rank, data, stats if rank == 1 else None, rank_text, rank_code)
        tmp = root / f".rank_{rank}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        cand.bundle.save(tmp)
        atomic_write_text(tmp / "params.json", json.dumps(params, indent=2, allow_nan=False))
        write_report(tmp / "report.html", cand, data, study, stats if rank == 1 else None, params,
                     extra_sections if rank == 1 else [])
        final = root / f"rank_{rank}"
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        written.append(final)
    for stale in root.glob("rank_*"):
        if stale not in written and stale.is_dir():
            shutil.rmtree(stale)
    return written


# ---------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_args(parser, ["--symbol", "--data-dir", "--trials", "--timeframe", "--ob-levels",
                             "--candidates", "--seed", "--n-jobs", "--storage", "--study-name"])
    parser.add_argument("--model-dir", default="models_v9", help="where ranked models are saved (default: %(default)s)")
    parser.add_argument("--resume", action="store_true",
                        help="continue (or join, for distributed workers) an existing study")
    parser.add_argument("--tune-only", action="store_true",
                        help="only run trials (distributed workers); a later run finalises")
    demo = parser.add_argument_group(
        "demo", f"--demo trains on synthetic market_sim data: {DEMO_DAYS} days of 1m bars with a planted edge "
        f"(generated on first use into data/<SYM>_Sim_s<SEED>_a<ALPHA>), {DEMO_TRIALS} trials, 5 candidates, "
        f"4-group CPCV, small models and a {1 - sum(DEMO_SPLIT):.0%} Super-OOS exam; flags given explicitly still "
        "win. A demo run without --resume starts a fresh study and replaces the previous demo's models.")
    demo.add_argument("--demo", action="store_true", help="train the demo (see above)")
    demo.add_argument("--demo-seed", type=int, default=DEMO_SEED, metavar="N",
                      help="seed of the synthetic market (default: %(default)s)")
    demo.add_argument("--demo-alpha", type=float, default=1.0, metavar="A",
                      help="strength of the planted edge, 0 = none (default: %(default)s)")
    demo.add_argument("--days", type=int, default=DEMO_DAYS, metavar="N",
                      help="days of synthetic data; longer gives a longer, more decisive exam (default: %(default)s)")
    parser.add_argument("--log-level", default="INFO", help="logging level (default: %(default)s)")
    return parser


def demo_data_dir(symbol: str, seed: int, alpha: float, days: int) -> Path:
    """data/<SYM>_Sim_s<seed>_a<alpha>[_d<days>]: one folder per synthetic market, so any run can be rebuilt."""
    suffix = "" if days == DEMO_DAYS else f"_d{days}"
    return Path("data") / f"{symbol}_Sim_s{seed}_a{alpha:g}{suffix}"


def make_demo_data(folder: Path, symbol: str, seed: int, alpha: float, days: int, levels: int,
                   book_interval: str = "1s") -> None:
    """Generate the synthetic market into `folder` (written aside, then renamed, so a half-made one never stays)."""
    import market_sim
    market_sim.check_run(symbol, days, alpha, book_interval, levels)
    log.info("generating %d days of synthetic market data (seed %d, alpha %g) in %s", days, seed, alpha, folder)
    work = folder.parent / f".{folder.name}.tmp"
    shutil.rmtree(work, ignore_errors=True)
    made = market_sim.simulate(symbol=symbol, days=days, seed=seed, alpha=alpha, out=str(work), levels=levels,
                               book_interval=book_interval)
    made.rename(folder)
    shutil.rmtree(work, ignore_errors=True)


def simulator_settings(data_dir: str | Path) -> dict | None:
    """The settings market_sim wrote beside synthetic data (simulation.json: seed, alpha, book_interval_ms,
    levels, ...), or None for recorded market data."""
    path = Path(data_dir) / "simulation.json"
    if not path.is_file():
        return None
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TrainError(f"cannot read the simulator settings {path}: {exc}") from None
    missing = [k for k in ("seed", "alpha", "book_interval_ms", "levels") if k not in settings]
    if missing:
        raise TrainError(f"{path} lacks {', '.join(missing)}: regenerate the synthetic market")
    return settings


def demo_config(args: argparse.Namespace, cfg: GlobalConfig) -> GlobalConfig:
    """The demo's config: synthetic planted-alpha data at 1m (generated on first use) and a small, fast study;
    flags the user gave (and --set values) still win."""
    given = {k for k, v in vars(args).items() if v is not None}
    if "cfg_symbol" not in given:
        cfg.symbol = "DEMOUSDT"
    folder = demo_data_dir(cfg.symbol, args.demo_seed, args.demo_alpha, args.days)
    defaults = {"cfg_data_dir": ("data", "data_dir", str(folder)),
                "cfg_timeframe": ("data", "timeframe", "1m"),
                "cfg_trials": ("tune", "trials", DEMO_TRIALS),
                "cfg_candidates": ("tune", "candidates", 5)}
    for dest, (section, name, value) in defaults.items():
        if dest not in given:
            setattr(getattr(cfg, section), name, value)
    if not args.set_values:
        cfg.tune.cpcv_groups, cfg.tune.cpcv_test_groups = 4, 1
        cfg.tune.n_estimators, cfg.tune.num_leaves = [30, 80], [4, 16]
        cfg.tune.dev_fraction, cfg.tune.oos1_fraction = DEMO_SPLIT
    if "cfg_data_dir" not in given and not folder.is_dir():
        make_demo_data(folder, cfg.symbol, args.demo_seed, args.demo_alpha, args.days, cfg.data.ob_levels)
    cfg.validate("demo config")
    return cfg


def independent_market_sections(winner: Candidate, cfg: GlobalConfig, sim: dict) -> list[str]:
    """The champion on a new synthetic market from the simulator settings `sim` of the training data
    (simulator_settings) with another seed: shows what the planted edge does out of sample, as a property of
    the simulator, never as evidence about real markets. The market is generated once beside the training data."""
    import report
    seed, alpha = int(sim["seed"]) + INDEPENDENT_SEED_OFFSET, float(sim["alpha"])
    warmup_days = int(np.ceil(feature_engine.warmup_bars(cfg) * timeframe_seconds(cfg.data.timeframe) / 86400.0))
    days = warmup_days + INDEPENDENT_DAYS
    folder = Path(cfg.data.data_dir).parent / demo_data_dir(cfg.symbol, seed, alpha, days).name
    if not folder.is_dir():
        make_demo_data(folder, cfg.symbol, seed, alpha, days, int(sim["levels"]), f"{int(sim['book_interval_ms'])}ms")
    market = copy.deepcopy(cfg)
    market.data.data_dir = str(folder)
    bars = data_loader.load_bars(market)
    feats = feature_engine.compute_features(bars, market)
    frame = bars[["open", "high", "low", "close", *metrics.LIQUIDITY_COLUMNS]].join(
        feats[["atr", "is_warm", *winner.bundle.feature_names]])
    warm = frame["is_warm"].to_numpy(bool)
    if not warm.any():
        raise TrainError(f"the independent market in {folder} has no bar past the features' warm-up")
    frame = frame.iloc[int(np.argmax(warm)):]
    fine = data_loader.load_bars(market, "1m") if market.data.timeframe != "1m" else None
    probs = predict_span(winner.bundle, frame, winner.bundle.feature_names)
    result = backtest.run_backtest(frame[BACKTEST_COLUMNS], probs, winner.cfg, fine=fine)
    title = f"Independent synthetic market (seed {seed}, alpha {alpha:g}, same simulator settings)"
    note = ("<p><b>A property of the simulator, not evidence about real markets:</b> the champion (trial "
            f"{winner.trial.number}), unchanged, trading a market the simulator generated independently of the "
            "training data.</p>")
    return [note, *segment_sections(report, title, frame, result,
                                    f"the champion (trial {winner.trial.number}) on data from another seed")]


def fresh_demo_study(storage: optuna.storages.BaseStorage, name: str, model_dir: Path, symbol: str) -> None:
    """A demo re-run starts over: drop the previous demo study and its ranked models, saying so."""
    if name in {s.study_name for s in optuna.study.get_all_study_summaries(storage)}:
        optuna.delete_study(study_name=name, storage=storage)
        print(f"demo: starting a fresh study {name!r} (the previous demo study was deleted)")
    old = sorted((model_dir / symbol).glob("rank_*"))
    if old:
        print(f"demo: the previous demo models in {model_dir / symbol} will be replaced")


def study_name(cfg: GlobalConfig) -> str:
    return cfg.tune.study_name or f"{cfg.symbol}_{cfg.data.timeframe}"


def check_storage(storage: optuna.storages.BaseStorage, url: str, name: str, resume: bool) -> None:
    """Fail before any slow work: the storage must answer, and a fresh run must not reuse a study's trials."""
    try:
        summaries = {s.study_name: s for s in optuna.study.get_all_study_summaries(storage)}
    except Exception as exc:  # noqa: BLE001 — every driver error becomes one readable message
        raise TrainError(f"cannot read study storage {redact(url)}: {redact(str(exc))[:200]}") from None
    if name in summaries and summaries[name].n_trials > 0 and not resume:
        raise TrainError(f"study {name!r} already has {summaries[name].n_trials} trials in {redact(url)}: "
                         "pass --resume to continue it, or --study-name for a new one")


def create_study(cfg: GlobalConfig, storage: optuna.storages.BaseStorage, worker: int = 0) -> optuna.Study:
    """Create or load the study, its TPE sampler seeded from (seed, trials already stored, worker).

    A resumed study or a second worker therefore draws new points instead of repeating the first ones
    (a fresh single-worker study stays reproducible from cfg.seed); `worker` tells apart workers that
    start together on one storage (e.g. their process ids).
    """
    study = optuna.create_study(study_name=study_name(cfg), storage=storage, direction="maximize",
                                load_if_exists=True)
    seed = int(np.random.SeedSequence([cfg.seed, len(study.trials), worker]).generate_state(1)[0])
    study.sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(4, cfg.tune.trials // 4),
                                               multivariate=True, constant_liar=True)
    study.set_user_attr("config", cfg.to_dict())
    return study


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    try:
        cfg = config_from_args(args)
        if args.demo:
            cfg = demo_config(args, cfg)
        return train(cfg, Path(args.model_dir), args.resume, args.tune_only, demo=args.demo)
    except (TrainError, ConfigError, data_loader.DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def train(cfg: GlobalConfig, model_dir: Path, resume: bool = False, tune_only: bool = False,
          demo: bool = False) -> int:
    """Run the whole pipeline; returns the process exit code. A demo without `resume` starts a fresh study;
    on synthetic data (simulator_settings) the champion is also shown on an independent synthetic market."""
    data_loader.require_data(cfg)   # the folder holds cfg.symbol and the span: checked before any file is made
    shared = bool(cfg.tune.storage)
    storage_url = cfg.tune.storage or default_storage(cfg, model_dir)
    storage = open_storage(storage_url)
    if demo and not resume:
        fresh_demo_study(storage, study_name(cfg), model_dir, cfg.symbol)
    check_storage(storage, storage_url, study_name(cfg), resume)
    data = load_training_data(cfg)
    sim = simulator_settings(cfg.data.data_dir)
    study = create_study(cfg, storage, os.getpid() if shared else 0)
    seg = data.segments
    log.info("%d warm bars: development %d, OOS-1 %d, Super-OOS %d (gaps of %d bars); %d features",
             len(data.frame), seg.dev.stop, seg.oos1.stop - seg.oos1.start,
             seg.super_oos.stop - seg.super_oos.start, seg.gap, len(data.features))
    stop = StopFlag()
    previous = signal.signal(signal.SIGINT, stop)
    try:
        worker = f"{socket.gethostname()}:{os.getpid()}"
        run_study(study, make_objective(data, cfg, cfg.tune.trials, worker), cfg.tune.trials, cfg.tune.n_jobs,
                  stop)
    finally:
        signal.signal(signal.SIGINT, previous)
    finished = len([t for t in study.trials if t.state.is_finished()])
    if stop.requested or finished < cfg.tune.trials:
        print(f"stopped after {finished} of {cfg.tune.trials} trials; continue with --resume")
        return 130 if stop.requested else 0
    if tune_only:
        print(f"study {study.study_name}: {finished} trials done; run without --tune-only to finalise")
        return 0
    timer = Timer()
    candidates = qualify(study, data, cfg, timer)
    winner = candidates[0]
    final_exam(winner, data)
    stats = study_statistics(study, winner)
    code, text = verdict(winner, stats, 1.0 - cfg.tune.dev_fraction - cfg.tune.oos1_fraction)
    extra = independent_market_sections(winner, cfg, sim) if sim is not None else []
    paths = save_ranked(candidates, data, study, stats, text, code, model_dir, extra)
    print(text)
    print(f"models: {', '.join(str(p) for p in paths)}")
    print(f"report: {paths[0] / 'report.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
