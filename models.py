"""ModelBundle: the four LightGBM classifiers of the hybrid strategy, trained, saved and loaded without pickles.

exec_long / exec_short predict the execution labels, dir_long / dir_short the direction labels (labels.py).
Every fit bins features on its own training rows only (a fresh lgb.Dataset per model and fit; a validation
set is binned with the training set as reference), so no fold's bin boundaries ever see its test rows.
The round count a model was validated with is the one it ships with: early stopping (GBDT only, and only
with a validation set the final score does not see) truncates the booster, which is then saved as is.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pandas as pd

from config import ConfigError, ModelConfig, atomic_write_text

log = logging.getLogger(__name__)

EXEC_MODELS = ("exec_long", "exec_short")
DIR_MODELS = ("dir_long", "dir_short")
MODEL_NAMES = EXEC_MODELS + DIR_MODELS
FEATURES_FILE = "features.json"
_BAD_NAME = re.compile(r'[\s\[\]{}":,]')


class ModelFileError(ValueError):
    """A saved bundle is missing, corrupt or does not match the features it is asked to use."""


@dataclass
class FittedModel:
    """One trained classifier and the facts a report needs about it."""
    booster: lgb.Booster
    rounds: int         # boosting rounds that ship (after early stopping, if any)
    n_train: int        # labelled rows it was trained on
    n_positive: int
    constant: bool      # training rows had one class only: a constant-probability model


def lgb_params(cfg: ModelConfig, seed: int) -> dict:
    """LightGBM booster parameters for a ModelConfig (deterministic; bagging only where it acts)."""
    bagging = cfg.bagging_freq > 0
    params = {
        "objective": "binary", "metric": "binary_logloss", "boosting": cfg.boosting_type,
        "learning_rate": cfg.learning_rate, "num_leaves": cfg.num_leaves, "max_depth": cfg.max_depth,
        "min_data_in_leaf": cfg.min_child_samples, "feature_fraction": cfg.feature_fraction,
        "bagging_fraction": cfg.bagging_fraction if bagging else 1.0, "bagging_freq": cfg.bagging_freq,
        "lambda_l2": cfg.lambda_l2, "max_bin": cfg.max_bin, "num_threads": cfg.num_threads,
        "seed": seed, "deterministic": True, "force_row_wise": True, "verbosity": -1,
    }
    if cfg.boosting_type == "dart":
        params.update(drop_rate=cfg.drop_rate, skip_drop=cfg.skip_drop)
    return params


class ModelBundle:
    """Execution and direction classifiers over one ordered feature list."""

    PROBA_COLUMNS = ["p_exec_long", "p_exec_short", "p_dir_long", "p_dir_short"]

    def __init__(self, model_cfg: ModelConfig, feature_names: list[str], seed: int = 42) -> None:
        names = list(feature_names)
        bad = [n for n in names if not isinstance(n, str) or not n or _BAD_NAME.search(n)]
        if bad:
            raise ValueError(f"feature names must be non-empty without spaces or []{{}}\":, — got {bad[:5]}")
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes or not names:
            raise ValueError(f"feature names must be unique and non-empty; duplicated: {dupes}")
        self.cfg = model_cfg
        self.feature_names = names
        self.seed = int(seed)
        self.models: dict[str, FittedModel] = {}
        self.quantiles: dict[str, list[float]] = {}
        self.psi_window = 0                        # bars of the chance levels below (0: none)
        self.psi_limits: dict[str, float] = {}     # feature -> highest PSI of a psi_window stretch of training

    # ------------------------------------------------------------ training
    def fit(self, X: pd.DataFrame, labels: pd.DataFrame, valid: pd.DataFrame | None = None) -> "ModelBundle":
        """Train every model on the rows of X whose label is known (>= 0).

        `valid` (features plus label columns) is used for early stopping of GBDT only; it must be data the
        final score never sees. DART ignores it (early stopping is not valid with dropout boosting).
        """
        features = self._matrix(X, "X")
        if not X.index.equals(labels.index):
            raise ValueError("labels must have the same index as X")
        use_valid = valid is not None and self.cfg.boosting_type == "gbdt"
        if valid is not None and not use_valid:
            log.info("DART boosting: early stopping is not valid, the validation set is not used")
        self.models = {}
        self.quantiles = training_quantiles(X[self.feature_names])
        params = lgb_params(self.cfg, self.seed)
        shared: lgb.Dataset | None = None  # rows labelled for every model are binned once, relabelled per model
        for name in MODEL_NAMES:
            if name not in labels.columns:
                raise ValueError(f"labels lack column {name!r}")
            y = labels[name].to_numpy()
            rows = y >= 0
            vset = None
            if use_valid and name in valid.columns:
                vy = valid[name].to_numpy()
                if (vy >= 0).any():
                    vset = (self._matrix(valid, "valid")[vy >= 0], vy[vy >= 0].astype(np.float64))
            yk = y[rows].astype(np.float64)
            if yk.size == 0:
                raise ValueError(f"{name}: no labelled rows to train on")
            if rows.all():
                if shared is None:
                    shared = lgb.Dataset(features, yk, feature_name=self.feature_names, params=params,
                                         free_raw_data=True).construct()
                else:
                    shared.set_label(yk)   # after construct(): a label set before it would be ignored
                train_set = shared
            else:
                train_set = lgb.Dataset(features[rows], yk, feature_name=self.feature_names, params=params,
                                        free_raw_data=True)
            self.models[name] = self._fit_one(name, train_set, yk, params, vset)
        return self

    def _fit_one(self, name: str, train_set: lgb.Dataset, y: np.ndarray, params: dict,
                 valid: tuple[np.ndarray, np.ndarray] | None) -> FittedModel:
        """One classifier on its own rows; its Dataset (and so its binning) is built from training rows only."""
        n_pos = int(y.sum())
        constant = n_pos in (0, y.size)
        if constant:
            log.warning("%s: %d training rows all have label %d; shipping a constant probability model",
                        name, y.size, int(y[0]))
            booster = lgb.train(params, train_set, num_boost_round=1)
        elif valid is not None:
            valid_set = lgb.Dataset(valid[0], valid[1], reference=train_set, params=params)
            booster = lgb.train(params, train_set, num_boost_round=self.cfg.n_estimators, valid_sets=[valid_set],
                                callbacks=[lgb.early_stopping(self.cfg.early_stopping_rounds, verbose=False)])
        else:
            booster = lgb.train(params, train_set, num_boost_round=self.cfg.n_estimators)
        rounds = booster.best_iteration if booster.best_iteration > 0 else booster.current_iteration()
        shipped = lgb.Booster(model_str=booster.model_to_string(num_iteration=rounds))
        return FittedModel(shipped, rounds, int(y.size), n_pos, constant)

    # ------------------------------------------------------------ inference
    def _matrix(self, X: pd.DataFrame, what: str) -> np.ndarray:
        """The feature columns of X in bundle order as float64; a missing feature is an error."""
        missing = [n for n in self.feature_names if n not in X.columns]
        if missing:
            raise ValueError(f"{what} lacks {len(missing)} model feature(s): {', '.join(missing[:10])}")
        return X[self.feature_names].to_numpy(dtype=np.float64)

    def predict(self, X: pd.DataFrame) -> pd.DataFrame:
        """Probabilities p_exec_long, p_exec_short, p_dir_long, p_dir_short (NaN where no model was trained).

        Runs on `model.num_threads` threads like the fit (LightGBM's own default is every core: on a busy
        machine one live row then waits tens of ms at its OpenMP barrier). Rows are scored independently,
        so the thread count never changes a probability."""
        if not self.models:
            raise ValueError("ModelBundle.predict called before fit or load")
        x = self._matrix(X, "X")
        out = {col: self.models[name].booster.predict(x, num_threads=self.cfg.num_threads)
               if name in self.models and len(x) else np.full(len(x), np.nan)
               for name, col in zip(MODEL_NAMES, self.PROBA_COLUMNS)}
        return pd.DataFrame(out, index=X.index)

    def predict_where(self, X: pd.DataFrame, rows: np.ndarray) -> pd.DataFrame:
        """Probabilities on the selected rows only; NaN (no signal) elsewhere, e.g. before feature warm-up."""
        out = pd.DataFrame(np.nan, index=X.index, columns=self.PROBA_COLUMNS)
        if rows.any():
            out.loc[rows] = self.predict(X.loc[rows]).to_numpy()
        return out

    def feature_importance(self) -> pd.DataFrame:
        """Total split gain of each feature per model (rows = features in bundle order)."""
        data = {name: m.booster.feature_importance(importance_type="gain") for name, m in self.models.items()}
        return pd.DataFrame(data, index=pd.Index(self.feature_names, name="feature"))

    def summary(self) -> dict:
        """Per-model facts for params.json and reports: rounds shipped, rows, positives, constant."""
        return {name: {k: v for k, v in dataclasses.asdict(m).items() if k != "booster"}
                for name, m in self.models.items()}

    # ------------------------------------------------------------ files
    def save(self, directory: str | Path) -> None:
        """Write <model>.txt (LightGBM text) per model and features.json (features, config, model facts)."""
        if not self.models:
            raise ValueError("ModelBundle.save called before fit")
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        for name, model in self.models.items():
            atomic_write_text(folder / f"{name}.txt", model.booster.model_to_string())
        meta = {"features": self.feature_names, "models": self.summary(), "seed": self.seed,
                "quantiles": self.quantiles, "psi_window": self.psi_window, "psi_limits": self.psi_limits,
                "model_config": dataclasses.asdict(self.cfg), "lightgbm_version": lgb.__version__}
        atomic_write_text(folder / FEATURES_FILE, json.dumps(meta, indent=2))

    @classmethod
    def load(cls, directory: str | Path, feature_names: list[str] | None = None) -> "ModelBundle":
        """Read a saved bundle; refuse it when `feature_names` (the caller's features) differ from the saved ones."""
        folder = Path(directory)
        meta_path = folder / FEATURES_FILE
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            saved, facts = list(meta["features"]), dict(meta["models"])
            cfg = ModelConfig(**meta["model_config"])
        except (OSError, ValueError, KeyError, TypeError, ConfigError) as exc:
            raise ModelFileError(f"{meta_path}: not a readable model bundle ({exc})") from None
        if feature_names is not None and list(feature_names) != saved:
            raise ModelFileError(f"{meta_path}: {_feature_mismatch(saved, list(feature_names))}")
        bundle = cls(cfg, saved, seed=int(meta.get("seed", 42)))
        for name, fact in facts.items():
            path = folder / f"{name}.txt"
            try:
                booster = lgb.Booster(model_str=path.read_text(encoding="utf-8"))
            except (OSError, lgb.basic.LightGBMError) as exc:
                raise ModelFileError(f"{path}: cannot load LightGBM model ({exc})") from None
            if booster.feature_name() != saved:
                raise ModelFileError(f"{path}: {_feature_mismatch(saved, booster.feature_name())}")
            bundle.models[name] = FittedModel(booster, int(fact["rounds"]), int(fact["n_train"]),
                                              int(fact["n_positive"]), bool(fact["constant"]))
        return bundle


def training_quantiles(X: pd.DataFrame, bins: int = 10) -> dict[str, list[float]]:
    """Per-feature deciles (bins + 1 edges, NaN ignored) of the training rows: the reference distribution
    the live engine's PSI drift monitor compares with (features.json "quantiles")."""
    qs = np.linspace(0.0, 1.0, bins + 1)
    out = {}
    for name in X.columns:
        col = X[name].to_numpy(np.float64)
        col = col[np.isfinite(col)]
        if col.size:
            out[name] = [float(v) for v in np.quantile(col, qs)]
    return out


def psi(values: np.ndarray, edges: list[float]) -> float:
    """Population stability index of `values` against training deciles `edges` (each bin holds an equal
    share in training): sum (a - e) ln(a / e), shares floored at 1e-4 (Siddiqi, Credit Risk Scorecards)."""
    x = values[np.isfinite(values)]
    if x.size == 0 or len(edges) < 3:
        return math.nan
    inner = np.asarray(edges[1:-1], dtype=float)
    counts = np.bincount(np.searchsorted(inner, x, side="right"), minlength=len(inner) + 1)
    actual = np.maximum(counts / x.size, 1e-4)
    expected = np.full(actual.size, 1.0 / actual.size)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def psi_limits(X: pd.DataFrame, quantiles: dict[str, list[float]], window: int) -> dict[str, float]:
    """feature -> the highest PSI that any stretch of `window` consecutive training rows (non-overlapping blocks,
    time order) reaches against the training deciles: the chance level of the live drift monitor's window.

    A slow feature (a 24 h VWAP distance), a step-like one (a 1 h feature on 1 m bars) or a discrete one fills
    few deciles in any short stretch, so its PSI is high with no drift at all (8.3 for 200 bars of a 24 h
    feature); a fixed alert level (0.25) then fires forever. Fewer than 10 blocks: {} (no chance level)."""
    blocks = len(X) // window if window > 0 else 0
    if blocks < 10:
        return {}
    out: dict[str, float] = {}
    for name, edges in quantiles.items():
        if name not in X.columns:
            continue
        rows = X[name].to_numpy(np.float64)[:blocks * window].reshape(blocks, window)
        values = [v for v in (psi(row, edges) for row in rows) if math.isfinite(v)]
        if values:
            out[name] = max(values)
    return out


def _feature_mismatch(saved: list[str], given: list[str]) -> str:
    """Explain how two feature lists differ (missing, extra, or order)."""
    missing = [n for n in saved if n not in given]
    extra = [n for n in given if n not in saved]
    if missing or extra:
        return (f"feature list mismatch: model needs {len(saved)} features; missing {missing[:10]}, "
                f"unexpected {extra[:10]}")
    first = next(i for i, (a, b) in enumerate(zip(saved, given)) if a != b)
    return f"feature order mismatch at position {first}: model has {saved[first]!r}, given {given[first]!r}"


def reliability_table(y: np.ndarray | pd.Series, p: np.ndarray | pd.Series, bins: int = 10) -> pd.DataFrame:
    """Calibration check: per equal-width probability bin, count, mean predicted p and observed positive rate.

    Rows with an unknown label (< 0) or a NaN probability are ignored. attrs hold the Brier score and the
    expected calibration error (count-weighted |observed - predicted|).
    """
    yy = np.asarray(y, dtype=np.float64)
    pp = np.asarray(p, dtype=np.float64)
    if yy.shape != pp.shape:
        raise ValueError(f"y and p must have the same length, got {yy.shape} and {pp.shape}")
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    ok = (yy >= 0) & np.isfinite(pp)
    yy, pp = yy[ok], pp[ok]
    if ((pp < 0) | (pp > 1)).any():
        raise ValueError("probabilities must lie in [0, 1]")
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.minimum((pp * bins).astype(np.int64), bins - 1)
    count = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.bincount(which, weights=pp, minlength=bins) / count
        frac_pos = np.bincount(which, weights=yy, minlength=bins) / count
    table = pd.DataFrame({"bin_lo": edges[:-1], "bin_hi": edges[1:], "count": count,
                          "mean_p": mean_p, "frac_pos": frac_pos})
    used = count > 0
    table.attrs["brier"] = float(np.mean((pp - yy) ** 2)) if yy.size else float("nan")
    table.attrs["ece"] = (float(np.sum(count[used] * np.abs(frac_pos[used] - mean_p[used])) / yy.size)
                          if yy.size else float("nan"))
    return table
