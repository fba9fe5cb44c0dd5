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
from models import ModelBundle

log = logging.getLogger("train")
LABEL_COLUMNS = ["exec_long", "exec_short", "dir_long", "dir_short"]
PRICE_COLUMNS = ["open", "high", "low", "close", "atr"]
HOURS_PER_YEAR = 24 * 365
MIN_SEGMENT_BARS = 24
DEMO_DAYS = 14
DEMO_TRIALS = 12


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
    frame = bars[["open", "high", "low", "close", "is_gap"]].join(features[["atr", "is_warm", *names]])
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
    s.exec_threshold = trial.suggest_float("exec_threshold", *r.exec_threshold)
    s.direction_threshold = trial.suggest_float("direction_threshold", *r.direction_threshold)
    s.aggressive_threshold = max(s.direction_threshold,
                                 trial.suggest_float("aggressive_threshold", *r.aggressive_threshold))
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
def hourly_returns(result: "backtest.BacktestResult") -> pd.Series:
    """Mark-to-market returns per hour: enough observations for short spans, free of per-trade scale."""
    return metrics.period_returns(result.equity["equity"], result.initial_equity, "1h")


def path_score(result: "backtest.BacktestResult", returns: pd.Series, cfg: GlobalConfig) -> float:
    """Sortino of one out-of-sample run's hourly returns (0 when undefined, never an unbounded reward for no
    losses); capped at 0 and penalised when it trades too rarely for any later slice to test it."""
    score = metrics.sortino(returns.to_numpy(), HOURS_PER_YEAR)
    score = 0.0 if not np.isfinite(score) else score
    days = (result.equity.index[-1] - result.equity.index[0]).total_seconds() / 86400.0
    needed = cfg.tune.min_trades_per_day * days
    if len(result.trades) < needed:
        score = min(score, 0.0) - (1.0 - len(result.trades) / needed)
    return score


@dataclass
class Timer:
    """Seconds spent fitting models versus the whole trial (for the benchmark and the report)."""
    fit: float = 0.0

    def timed_fit(self, bundle: ModelBundle, X: pd.DataFrame, y: pd.DataFrame) -> None:
        start = time.perf_counter()
        bundle.fit(X, y)
        self.fit += time.perf_counter() - start


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
    return bundle


def run_segment(data: TrainData, frame: pd.DataFrame, probs: pd.DataFrame,
                cfg: GlobalConfig) -> "backtest.BacktestResult":
    """Backtest a span with given probabilities (the one engine every number comes from)."""
    return backtest.run_backtest(frame[PRICE_COLUMNS], probs, cfg, fine=data.fine)


@dataclass
class CpcvOutcome:
    score: float
    path_scores: list[float]
    path_trades: list[int]
    path_equity: list[pd.Series]   # hourly mark-to-market equity of each path (the report's fan)
    mean_returns: pd.Series        # hourly returns averaged over paths (a trial's row in the PBO matrix)


def evaluate_cpcv(data: TrainData, cfg: GlobalConfig, timer: Timer) -> CpcvOutcome:
    """Score a config by CPCV on the development span: purged, embargoed folds, backtested as paths."""
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
    scores, trades, curves, returns = [], [], [], []
    for path in validation.cpcv_path_predictions(split_probs, len(dev), n_groups, n_test):
        probs = pd.DataFrame(path, index=dev.index, columns=ModelBundle.PROBA_COLUMNS).reindex(span.index)
        result = run_segment(data, span, probs, cfg)
        r = hourly_returns(result)
        scores.append(path_score(result, r, cfg))
        trades.append(len(result.trades))
        curves.append(result.equity["equity"].resample("1h").last())
        returns.append(r)
    mean_returns = pd.concat(returns, axis=1).mean(axis=1)
    return CpcvOutcome(float(np.median(scores)), scores, trades, curves, mean_returns)


# ---------------------------------------------------------------- the study
def open_storage(url: str) -> optuna.storages.BaseStorage:
    """An Optuna storage from a URL: sqlite/postgresql/mysql (RDB) or 'journal:<file>'; clear errors."""
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend
        path = Path(url[len("journal:"):])
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    import sqlalchemy.exc
    engine_kwargs = {"connect_args": {"connect_timeout": 10}} if url.startswith("postgresql") else {}
    for attempt in range(4):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=60,
                                              grace_period=180)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            time.sleep(0.5 + attempt)  # workers starting together race to create the schema; retry finds it
        except Exception as exc:  # noqa: BLE001 — every driver error becomes one readable message
            text = str(exc).strip()
            reason = redact(text.splitlines()[0] if text else type(exc).__name__)
            raise TrainError(f"cannot open study storage {redact(url)}: {reason}") from None
    raise TrainError(f"cannot create the study schema in {redact(url)}: concurrent workers kept colliding")


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
        outcome = evaluate_cpcv(data, cfg, timer)
        elapsed = time.perf_counter() - start
        trial.set_user_attr("worker", worker)
        trial.set_user_attr("seconds", round(elapsed, 3))
        trial.set_user_attr("fit_seconds", round(timer.fit, 3))
        trial.set_user_attr("path_scores", [round(s, 6) for s in outcome.path_scores])
        trial.set_user_attr("path_trades", outcome.path_trades)
        trial.set_user_attr("hourly_returns", [round(float(x), 9) for x in outcome.mean_returns])
        trial.set_user_attr("path_equity", [[round(float(x), 2) for x in c] for c in outcome.path_equity])
        trial.set_user_attr("path_times", [t.isoformat() for t in outcome.path_equity[0].index])
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
    cfg: GlobalConfig
    bundle: ModelBundle | None = None
    oos1: Any = None               # BacktestResult on OOS-1
    oos1_score: float = float("nan")
    final: Any = None              # BacktestResult on Super-OOS (the winner only)
    extra: dict = field(default_factory=dict)


def qualify(study: optuna.Study, data: TrainData, base: GlobalConfig, timer: Timer) -> list[Candidate]:
    """Retrain the top CPCV trials on all development data and rank them by one OOS-1 backtest."""
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise TrainError("the study has no completed trial to qualify")
    top = sorted(complete, key=lambda t: t.value, reverse=True)[: base.tune.candidates]
    candidates = []
    frame = data.frame
    for trial in tqdm(top, desc="OOS-1 qualification", unit="candidate", dynamic_ncols=True):
        cfg = trial_config(optuna.trial.FixedTrial(trial.params), base)
        bundle = fit_bundle(frame.iloc[data.segments.dev], data.features, cfg, timer)
        oos = frame.iloc[data.segments.oos1]
        probs = predict_span(bundle, oos, data.features)
        result = run_segment(data, oos, probs, cfg)
        score = path_score(result, hourly_returns(result), cfg)
        candidates.append(Candidate(trial, cfg, bundle, result, score, extra={"oos1_probs": probs}))
    return sorted(candidates, key=lambda c: (c.oos1_score, c.trial.value), reverse=True)


def final_exam(winner: Candidate, data: TrainData, timer: Timer) -> None:
    """Retrain the winner on development + OOS-1 and backtest it once on the untouched Super-OOS slice."""
    seg = data.segments
    winner.bundle = fit_bundle(data.frame.iloc[: seg.oos1.stop], data.features, winner.cfg, timer)
    final = data.frame.iloc[seg.super_oos]
    winner.final = run_segment(data, final, predict_span(winner.bundle, final, data.features), winner.cfg)


def study_statistics(study: optuna.Study, winner: Candidate) -> dict:
    """Deflated Sharpe of the Super-OOS result given every trial run, and the study's PBO."""
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE
                and t.user_attrs.get("hourly_returns")]
    length = min(len(t.user_attrs["hourly_returns"]) for t in complete)
    matrix = np.array([t.user_attrs["hourly_returns"][:length] for t in complete], dtype=float).T
    # A trial that never traded has a flat equity: its Sharpe is 0, not undefined.
    trial_sr = np.nan_to_num([validation.sharpe_stats(matrix[:, j])[0] for j in range(matrix.shape[1])])
    returns = hourly_returns(winner.final).to_numpy()
    sr, skew, kurt = validation.sharpe_stats(returns)
    n_trials = max(len(study.trials), 1)
    sr_var = float(np.var(trial_sr, ddof=1)) if len(trial_sr) > 1 else 0.0
    dsr = validation.deflated_sharpe(sr, len(returns), skew, kurt, n_trials, sr_var)
    stats = {"super_oos_sharpe_hourly": sr, "super_oos_hours": int(len(returns)), "skew": skew, "kurtosis": kurt,
             "n_trials": n_trials, "trial_sharpe_var": sr_var, "deflated_sharpe": dsr,
             "pbo": float("nan"), "pbo_logits": []}
    n_partitions = min(16, (matrix.shape[0] // 4) // 2 * 2)
    if matrix.shape[1] >= 2 and n_partitions >= 4:
        stats["pbo"], logits = validation.pbo(matrix, n_partitions)
        stats["pbo_logits"] = [float(x) for x in np.asarray(logits)]
    return stats


def verdict(winner: Candidate, stats: dict) -> tuple[bool, str]:
    """Edge only when Super-OOS made money, OOS-1 agreed, and the Sharpe survives deflation for all trials."""
    final_ret = float(winner.final.metrics["total_return"])
    oos1_ret = float(winner.oos1.metrics["total_return"])
    dsr = float(stats["deflated_sharpe"])
    edge = final_ret > 0 and oos1_ret > 0 and dsr >= 0.95
    reasons = (f"Super-OOS return {final_ret:+.2%} over {len(winner.final.trades)} trades, OOS-1 return "
               f"{oos1_ret:+.2%}, deflated Sharpe {dsr:.3f} after {stats['n_trials']} trials, "
               f"PBO {stats['pbo']:.2f}")
    if edge:
        return True, f"EDGE: the evidence supports an edge ({reasons})."
    return False, f"NO EDGE: the evidence does not support an edge ({reasons}). Do not trade these models."


# ---------------------------------------------------------------- report
TRAIN_ASSUMPTIONS = [
    "Time split: development 85%, OOS-1 10%, Super-OOS 5%, separated by gaps at least as long as the longest "
    "label horizon and the embargo, so no label spans a boundary.",
    "Each trial labels the data for its own strategy parameters and is scored by CPCV on the development span: "
    "training samples overlapping a test block's label intervals are purged, then an embargo follows each block; "
    "LightGBM bins features on each fold's training rows only.",
    "Trial score: median over CPCV paths of the annualised Sortino of hourly mark-to-market returns, capped at 0 "
    "and penalised when a path trades less often than tune.min_trades_per_day.",
    "Thresholds are trial parameters: they are never chosen on the data that scores them.",
    "OOS-1 ranks the top candidates retrained on all development data; only the winner sees Super-OOS, once, "
    "retrained on development + OOS-1 with the same model family and round count that CPCV scored.",
    "Deflated Sharpe: hourly Super-OOS returns against the expected maximum Sharpe of all trials in the study; "
    "PBO by CSCV over the trials' hourly development returns.",
]


def write_report(path: Path, cand: Candidate, data: TrainData, study: optuna.Study, stats: dict | None,
                 params: dict) -> None:
    """One self-contained HTML page per ranked model: the evidence for and against its edge."""
    import report
    seg = data.segments
    sections = [report.banner_html(params["verdict"], params["edge"])]
    if cand.final is not None and stats is not None:
        sections += segment_sections(report, "Super-OOS final exam", data.frame.iloc[seg.super_oos], cand.final)
        sections.append(report.metrics_table_html({k: v for k, v in stats.items() if k != "pbo_logits"},
                                                  "Deflated Sharpe and PBO of the study"))
    sections += segment_sections(report, "OOS-1 qualification", data.frame.iloc[seg.oos1], cand.oos1)
    attrs = cand.trial.user_attrs
    sections.append(report.figure_html(report.path_fan_figure(attrs["path_times"], attrs["path_equity"])))
    if stats is not None and stats["pbo_logits"]:
        sections.append(report.figure_html(report.pbo_figure(stats["pbo_logits"], stats["pbo"])))
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    sections.append(report.figure_html(report.history_figure([t.number for t in done], [t.value for t in done])))
    sections.append(param_importance_section(report, study))
    gain = cand.bundle.feature_importance().sum(axis=1)
    sections.append(report.figure_html(report.importance_figure(list(gain.index), list(gain.to_numpy()),
                                                                "Feature importance (total gain, 4 models)")))
    sections.append(report.table_html(calibration(cand, data), "Calibration on OOS-1 (reliability table)"))
    sections.append(report.assumptions_html([*TRAIN_ASSUMPTIONS, *cand.oos1.assumptions], "Assumptions"))
    title = f"{params['symbol']} rank {params['rank']} (trial {params['trial']})"
    atomic_write_text(path, report.page(title, sections))


def segment_sections(report: Any, title: str, frame: pd.DataFrame, result: Any) -> list[str]:
    return [f"<h2>{title}</h2>",
            report.figure_html(report.equity_figure(result.equity, f"{title}: equity and drawdown")),
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
    """Predicted probability vs observed rate per model on the OOS-1 rows whose labels are known."""
    from models import reliability_table
    rows, lab = labelled(data.frame.iloc[data.segments.oos1], cand.cfg)
    probs = cand.extra["oos1_probs"].reindex(rows.index)
    tables = []
    for name, col in zip(LABEL_COLUMNS, ModelBundle.PROBA_COLUMNS):
        table = reliability_table(lab[name].to_numpy(), probs[col].to_numpy(), bins=5)
        tables.append(table.assign(model=name))
    return pd.concat(tables).set_index("model", append=True)


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
                     edge: bool) -> dict:
    """Everything needed to reproduce and judge one ranked model (params.json)."""
    seg = data.segments
    s = c.cfg.strategy
    params = {
        "symbol": c.cfg.symbol, "timeframe": c.cfg.data.timeframe, "ob_levels": c.cfg.data.ob_levels,
        "rank": rank, "trial": c.trial.number, "edge": edge, "verdict": text,
        "thresholds": {"exec_threshold": s.exec_threshold, "direction_threshold": s.direction_threshold,
                       "aggressive_threshold": s.aggressive_threshold},
        "data": {"data_dir": c.cfg.data.data_dir, "fingerprint": data.fingerprint, "bars": len(data.frame),
                 "first_bar": data.frame.index[0].isoformat(), "last_bar": data.frame.index[-1].isoformat()},
        "splits": {"dev": span(data.frame, seg.dev), "oos1": span(data.frame, seg.oos1),
                   "super_oos": span(data.frame, seg.super_oos), "gap_bars": seg.gap},
        "trained_on": span(data.frame, slice(0, seg.oos1.stop) if c.final is not None else seg.dev),
        "metrics": {"cpcv_score": c.trial.value, "cpcv_path_scores": c.trial.user_attrs.get("path_scores"),
                    "oos1": c.oos1.metrics, "oos1_score": c.oos1_score},
        "versions": library_versions(),
        "config": c.cfg.to_dict(),
    }
    if c.final is not None and stats is not None:
        params["metrics"]["super_oos"] = c.final.metrics
        params["metrics"]["study"] = {k: v for k, v in stats.items() if k != "pbo_logits"}
        params["backtest_span"] = params["splits"]["super_oos"]
    else:
        params["backtest_span"] = params["splits"]["oos1"]
    return metrics.json_safe(params)


def save_ranked(candidates: list[Candidate], data: TrainData, study: optuna.Study, stats: dict,
                text: str, edge: bool, model_dir: Path) -> list[Path]:
    """Write rank_1..rank_K atomically (temp folder, then rename) and remove stale ranks of older runs."""
    root = model_dir / candidates[0].cfg.symbol
    root.mkdir(parents=True, exist_ok=True)
    written = []
    for rank, cand in enumerate(candidates, start=1):
        params = candidate_params(cand, rank, data, stats if rank == 1 else None, text, edge)
        tmp = root / f".rank_{rank}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        cand.bundle.save(tmp)
        atomic_write_text(tmp / "params.json", json.dumps(params, indent=2, allow_nan=False))
        write_report(tmp / "report.html", cand, data, study, stats if rank == 1 else None, params)
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_args(parser, ["--symbol", "--data-dir", "--trials", "--timeframe", "--ob-levels",
                             "--candidates", "--seed", "--n-jobs", "--storage", "--study-name"])
    parser.add_argument("--model-dir", default="models_v9", help="where ranked models are saved")
    parser.add_argument("--resume", action="store_true",
                        help="continue (or join, for distributed workers) an existing study")
    parser.add_argument("--tune-only", action="store_true",
                        help="only run trials (distributed workers); a later run finalises")
    parser.add_argument("--demo", action="store_true",
                        help="generate synthetic data/DEMOUSDT_Sim if missing and train on it")
    parser.add_argument("--log-level", default="INFO")
    return parser


def demo_config(args: argparse.Namespace, cfg: GlobalConfig) -> GlobalConfig:
    """The built-in default: two weeks of planted-alpha synthetic data at 1m (generated on first use) and a
    small, fast study; flags the user gave still win."""
    import market_sim
    cfg.symbol = "DEMOUSDT"
    given = {k for k, v in vars(args).items() if v is not None}
    defaults = {"cfg_data_dir": ("data", "data_dir", "data/DEMOUSDT_Sim"),
                "cfg_timeframe": ("data", "timeframe", "1m"),
                "cfg_trials": ("tune", "trials", DEMO_TRIALS),
                "cfg_candidates": ("tune", "candidates", 5)}
    for dest, (section, name, value) in defaults.items():
        if dest not in given:
            setattr(getattr(cfg, section), name, value)
    if not args.set_values:
        cfg.tune.cpcv_groups, cfg.tune.cpcv_test_groups = 5, 2
        cfg.tune.n_estimators, cfg.tune.num_leaves = [30, 80], [4, 16]
    if "cfg_data_dir" not in given and not Path(cfg.data.data_dir).is_dir():
        log.info("generating %d days of synthetic market data in %s", DEMO_DAYS, cfg.data.data_dir)
        market_sim.simulate(symbol=cfg.symbol, days=DEMO_DAYS, seed=7, alpha=1.0,
                            out=str(Path(cfg.data.data_dir).parent))
    cfg.validate("demo config")
    return cfg


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


def create_study(cfg: GlobalConfig, storage: optuna.storages.BaseStorage, shared: bool) -> optuna.Study:
    """Create or load the study; workers sharing a storage get distinct sampler seeds."""
    seed = cfg.seed if not shared else cfg.seed + (os.getpid() % 100_000)
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(4, cfg.tune.trials // 4),
                                         multivariate=True, constant_liar=True)
    study = optuna.create_study(study_name=study_name(cfg), storage=storage, sampler=sampler,
                                direction="maximize", load_if_exists=True)
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
        return train(cfg, Path(args.model_dir), args.resume, args.tune_only)
    except (TrainError, ConfigError, data_loader.DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def train(cfg: GlobalConfig, model_dir: Path, resume: bool = False, tune_only: bool = False) -> int:
    """Run the whole pipeline; returns the process exit code."""
    shared = bool(cfg.tune.storage)
    storage_url = cfg.tune.storage or default_storage(cfg, model_dir)
    storage = open_storage(storage_url)
    check_storage(storage, storage_url, study_name(cfg), resume)
    data = load_training_data(cfg)
    study = create_study(cfg, storage, shared)
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
    final_exam(winner, data, timer)
    stats = study_statistics(study, winner)
    edge, text = verdict(winner, stats)
    paths = save_ranked(candidates, data, study, stats, text, edge, model_dir)
    print(text)
    print(f"models: {', '.join(str(p) for p in paths)}")
    print(f"report: {paths[0] / 'report.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
