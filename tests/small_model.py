"""A small trained model for tests that need real probabilities without a full train.py study.

`train_small_model` fits the four LightGBM classifiers on a bars frame's warm features and its own
labels (labels.make_labels), and saves a rank folder as train.py lays it out (model files, features.json,
params.json with the config), so the live engine, backtest.py and parity.py can all load it. A few
seconds for a thousand bars.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

import feature_engine
import labels
import models
from config import GlobalConfig, atomic_write_text


def train_small_model(bars: pd.DataFrame, cfg: GlobalConfig, folder: Path, rounds: int = 20) -> models.ModelBundle:
    """Fit and save a bundle of `rounds`-tree models (4 leaves) on `bars`; returns the bundle."""
    feats = feature_engine.compute_features(bars, cfg)
    warm = feats["is_warm"].to_numpy(bool)
    frame = bars[["open", "high", "low", "close"]].assign(
        atr=feats["atr"], is_gap=bars["is_gap"] if "is_gap" in bars else False).loc[warm]
    names = feature_engine.feature_names(cfg)
    cfg.model.n_estimators, cfg.model.num_leaves, cfg.model.min_child_samples = rounds, 4, 10
    bundle = models.ModelBundle(cfg.model, names, seed=cfg.seed).fit(feats.loc[warm, names],
                                                                     labels.make_labels(frame, cfg))
    bundle.save(folder)
    atomic_write_text(folder / "params.json", json.dumps({"config": cfg.to_dict(), "edge": False}, indent=2))
    return bundle
