"""ModelBundle: per-fold binning, shipped round counts, determinism, text save/load, single-class folds."""
from __future__ import annotations

import json
import re

import lightgbm as lgb
import numpy as np
import pandas as pd
import pytest

from config import ConfigError, ModelConfig
from models import MODEL_NAMES, ModelBundle, ModelFileError, lgb_params, reliability_table

FEATURES = ["f_signal", "f_dir", "f_noise_a", "f_noise_b"]


def cfg(**overrides) -> ModelConfig:
    """A small, quick model config."""
    base = dict(n_estimators=40, num_leaves=8, max_depth=3, min_child_samples=20, learning_rate=0.1,
                num_threads=1)
    return ModelConfig(**{**base, **overrides})


def dataset(n: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Features where f_signal drives the execution labels and f_dir the direction labels."""
    rng = np.random.default_rng(seed)
    X = pd.DataFrame(rng.normal(size=(n, 4)), columns=FEATURES,
                     index=pd.date_range("2026-01-01", periods=n, freq="5min", tz="UTC"))
    def draw(score):
        return (rng.random(n) < 1 / (1 + np.exp(-2.5 * score))).astype(np.int8)
    labels = pd.DataFrame({"exec_long": draw(X.f_signal), "exec_short": draw(-X.f_signal),
                           "dir_long": draw(X.f_dir), "dir_short": draw(-X.f_dir)}, index=X.index)
    labels.iloc[-5:] = -1
    return X, labels


def trees(booster: lgb.Booster) -> list:
    """The trees of a booster (structure, thresholds and leaf values)."""
    return booster.dump_model()["tree_info"]


def feature_ranges(booster: lgb.Booster) -> list[tuple[float, float]]:
    """Per-feature [min:max] the booster's bins were built from (LightGBM's feature_infos)."""
    line = next(x for x in booster.model_to_string().splitlines() if x.startswith("feature_infos="))
    return [tuple(map(float, re.fullmatch(r"\[(.*):(.*)\]", part).groups())) for part in line[14:].split()]


def auc(y: np.ndarray, p: np.ndarray) -> float:
    """Rank AUC."""
    order = np.argsort(p)
    ranks = np.empty(len(p))
    ranks[order] = np.arange(1, len(p) + 1)
    pos = y == 1
    return (ranks[pos].sum() - pos.sum() * (pos.sum() + 1) / 2) / (pos.sum() * (~pos).sum())


def test_bundle_learns_each_target_from_its_own_feature():
    X, y = dataset(3000, 0)
    bundle = ModelBundle(cfg(), FEATURES).fit(X.iloc[:2000], y.iloc[:2000])
    p = bundle.predict(X.iloc[2000:])
    assert list(p.columns) == ModelBundle.PROBA_COLUMNS and p.index.equals(X.index[2000:])
    test_y = y.iloc[2000:-5]
    for name, col in zip(MODEL_NAMES, ModelBundle.PROBA_COLUMNS):
        assert auc(test_y[name].to_numpy(), p[col].to_numpy()[:-5]) > 0.75, name
    imp = bundle.feature_importance()
    assert imp["exec_long"].idxmax() == "f_signal" and imp["dir_short"].idxmax() == "f_dir"
    assert bundle.summary()["exec_long"]["n_train"] == 2000   # rows with label -1 are not trained on


def test_binning_never_sees_rows_outside_the_training_fold():
    X, y = dataset(1500, 1)
    train, test = slice(0, 1000), slice(1000, 1500)
    X_extreme = X.copy()
    X_extreme.iloc[test] = X_extreme.iloc[test] * 1e6   # test rows with values far outside the train range
    ref = ModelBundle(cfg(), FEATURES).fit(X.iloc[train], y.iloc[train])
    # the same frame with the test rows present but unlabelled: only the labelled training rows are binned
    hidden = y.copy()
    hidden.iloc[test] = -1
    with_rows = ModelBundle(cfg(), FEATURES).fit(X_extreme, hidden)
    # the test rows as a validation set: binned with the training set as reference, never refitting bins
    valid = pd.concat([X_extreme.iloc[test], y.iloc[test]], axis=1)
    with_valid = ModelBundle(cfg(boosting_type="dart", n_estimators=15), FEATURES).fit(
        X.iloc[train], y.iloc[train], valid=valid)
    dart_ref = ModelBundle(cfg(boosting_type="dart", n_estimators=15), FEATURES).fit(X.iloc[train], y.iloc[train])
    for name in MODEL_NAMES:
        assert trees(with_rows.models[name].booster) == trees(ref.models[name].booster)
        assert trees(with_valid.models[name].booster) == trees(dart_ref.models[name].booster)
        lo, hi = X.iloc[train].min().to_numpy(), X.iloc[train].max().to_numpy()
        for (b_lo, b_hi), a, b in zip(feature_ranges(with_valid.models[name].booster), lo, hi):
            assert b_lo == pytest.approx(a) and b_hi == pytest.approx(b)


def test_gbdt_early_stopping_ships_the_validated_rounds():
    X, y = dataset(2000, 2)
    noise_valid = pd.concat([X.iloc[1500:], y.iloc[1500:].sample(frac=1, random_state=0)
                             .set_axis(X.index[1500:])], axis=1)   # labels shuffled: nothing to learn
    model_cfg = cfg(n_estimators=300, learning_rate=0.3, early_stopping_rounds=5)
    bundle = ModelBundle(model_cfg, FEATURES).fit(X.iloc[:1500], y.iloc[:1500], valid=noise_valid)
    full = ModelBundle(model_cfg, FEATURES).fit(X.iloc[:1500], y.iloc[:1500])
    for name in MODEL_NAMES:
        m = bundle.models[name]
        assert m.rounds < 300 and m.booster.num_trees() == m.rounds
        assert full.models[name].rounds == 300 and full.models[name].booster.num_trees() == 300
        assert trees(m.booster) == trees(full.models[name].booster)[: m.rounds]  # same trees, truncated


def test_dart_never_early_stops(caplog):
    X, y = dataset(1200, 3)
    valid = pd.concat([X.iloc[1000:], y.iloc[1000:]], axis=1)
    with caplog.at_level("INFO"):
        bundle = ModelBundle(cfg(boosting_type="dart", n_estimators=25, early_stopping_rounds=1), FEATURES).fit(
            X.iloc[:1000], y.iloc[:1000], valid=valid)
    assert all(m.rounds == 25 and m.booster.num_trees() == 25 for m in bundle.models.values())
    assert "early stopping is not valid" in caplog.text


def test_params_follow_the_config():
    p = lgb_params(cfg(bagging_freq=0, bagging_fraction=0.5), seed=3)
    assert p["bagging_fraction"] == 1.0 and p["bagging_freq"] == 0   # bagging acts only with freq > 0
    p = lgb_params(cfg(bagging_freq=2, bagging_fraction=0.5, boosting_type="dart", drop_rate=0.2), seed=3)
    assert p["bagging_fraction"] == 0.5 and p["drop_rate"] == 0.2 and p["boosting"] == "dart"
    assert p["deterministic"] and p["seed"] == 3 and p["num_threads"] == 1
    X, y = dataset(600, 4)
    text = ModelBundle(cfg(num_leaves=5, max_depth=7, min_child_samples=33, feature_fraction=0.75), FEATURES) \
        .fit(X, y).models["exec_long"].booster.model_to_string()
    for setting in ("[num_leaves: 5]", "[max_depth: 7]", "[min_data_in_leaf: 33]", "[feature_fraction: 0.75]",
                    "[learning_rate: 0.1]", "[boosting: gbdt]"):
        assert setting in text
    with pytest.raises(ConfigError, match="feature_fraction"):
        ModelConfig(feature_fraction=0.0)


def test_training_is_deterministic_and_seeded():
    X, y = dataset(1000, 5)
    c = cfg(bagging_freq=1, bagging_fraction=0.7, feature_fraction=0.5)
    a = ModelBundle(c, FEATURES, seed=7).fit(X, y)
    b = ModelBundle(c, FEATURES, seed=7).fit(X, y)
    other = ModelBundle(c, FEATURES, seed=8).fit(X, y)
    assert a.models["exec_long"].booster.model_to_string() == b.models["exec_long"].booster.model_to_string()
    assert trees(a.models["exec_long"].booster) != trees(other.models["exec_long"].booster)


def test_save_load_round_trip_as_lightgbm_text(tmp_path):
    X, y = dataset(1000, 6)
    bundle = ModelBundle(cfg(boosting_type="dart", n_estimators=20), FEATURES, seed=11).fit(X, y)
    bundle.save(tmp_path / "rank_1")
    files = sorted(p.name for p in (tmp_path / "rank_1").iterdir())
    assert files == ["dir_long.txt", "dir_short.txt", "exec_long.txt", "exec_short.txt", "features.json"]
    assert all((tmp_path / "rank_1" / f).read_text().startswith("tree\n") for f in files if f.endswith(".txt"))
    loaded = ModelBundle.load(tmp_path / "rank_1", feature_names=FEATURES)
    pd.testing.assert_frame_equal(loaded.predict(X), bundle.predict(X))
    assert loaded.cfg == bundle.cfg and loaded.seed == 11 and loaded.summary() == bundle.summary()
    shuffled = X[FEATURES[::-1]]                 # column order of the input does not matter
    pd.testing.assert_frame_equal(loaded.predict(shuffled), bundle.predict(X))
    plain = lgb.Booster(model_file=str(tmp_path / "rank_1" / "exec_short.txt"))   # any LightGBM reads it
    np.testing.assert_allclose(plain.predict(X[FEATURES].to_numpy()), bundle.predict(X)["p_exec_short"])


def test_load_refuses_a_different_feature_list(tmp_path):
    X, y = dataset(500, 7)
    ModelBundle(cfg(), FEATURES).fit(X, y).save(tmp_path)
    with pytest.raises(ModelFileError, match=r"missing \['f_noise_b'\].*unexpected \['f_other'\]"):
        ModelBundle.load(tmp_path, feature_names=FEATURES[:3] + ["f_other"])
    with pytest.raises(ModelFileError, match="order mismatch at position 0"):
        ModelBundle.load(tmp_path, feature_names=FEATURES[::-1])
    meta = json.loads((tmp_path / "features.json").read_text())
    meta["features"] = FEATURES[:3] + ["f_renamed"]
    (tmp_path / "features.json").write_text(json.dumps(meta))
    with pytest.raises(ModelFileError, match="exec_long.txt: feature list mismatch"):
        ModelBundle.load(tmp_path)
    (tmp_path / "features.json").write_text("{not json")
    with pytest.raises(ModelFileError, match="not a readable model bundle"):
        ModelBundle.load(tmp_path)


def test_single_class_fold_gives_a_constant_model_that_saves_and_loads(tmp_path):
    X, y = dataset(400, 8)
    y["exec_short"] = np.where(y["exec_short"] >= 0, 0, -1).astype(np.int8)   # no positives in this fold
    y["dir_long"] = np.where(y["dir_long"] >= 0, 1, -1).astype(np.int8)       # only positives
    bundle = ModelBundle(cfg(boosting_type="dart"), FEATURES).fit(X, y)
    p = bundle.predict(X)
    assert bundle.models["exec_short"].constant and not bundle.models["exec_long"].constant
    assert p["p_exec_short"].max() < 1e-9 and p["p_dir_long"].min() > 1 - 1e-9
    bundle.save(tmp_path)
    assert json.loads((tmp_path / "features.json").read_text())["models"]["exec_short"]["constant"] is True
    pd.testing.assert_frame_equal(ModelBundle.load(tmp_path, FEATURES).predict(X), p)
    y["exec_long"] = -1
    with pytest.raises(ValueError, match="exec_long: no labelled rows"):
        ModelBundle(cfg(), FEATURES).fit(X, y)


def test_missing_features_and_bad_names_are_refused():
    X, y = dataset(300, 10)
    bundle = ModelBundle(cfg(), FEATURES).fit(X, y)
    with pytest.raises(ValueError, match="lacks 1 model feature.*f_dir"):
        bundle.predict(X.drop(columns="f_dir"))
    with pytest.raises(ValueError, match="feature names"):
        ModelBundle(cfg(), ["a b", "c"])
    with pytest.raises(ValueError, match="duplicated"):
        ModelBundle(cfg(), ["a", "a"])
    with pytest.raises(ValueError, match="before fit"):
        ModelBundle(cfg(), FEATURES).predict(X)


def test_reliability_table_bins_and_calibration():
    rng = np.random.default_rng(11)
    p = rng.random(200_000)
    y = (rng.random(200_000) < p).astype(int)       # perfectly calibrated
    table = reliability_table(y, p, bins=10)
    assert table["count"].sum() == 200_000 and len(table) == 10
    np.testing.assert_allclose(table["frac_pos"], table["mean_p"], atol=0.01)
    assert table.attrs["ece"] < 0.01
    over = reliability_table(y, np.clip(p + 0.2, 0, 1), bins=10)   # overconfident by 0.2
    assert over.attrs["ece"] > 0.15 and over.attrs["brier"] > table.attrs["brier"]
    sparse = reliability_table(np.array([1, 0, -1]), np.array([0.95, 0.05, 0.5]), bins=4)
    assert sparse["count"].tolist() == [1, 0, 0, 1] and np.isnan(sparse["mean_p"].iloc[1])
    assert sparse["frac_pos"].iloc[3] == 1.0 and sparse.attrs["brier"] == pytest.approx(0.0025)


def test_predict_where_leaves_unselected_rows_without_a_signal():
    X, y = dataset(400, 12)
    bundle = ModelBundle(cfg(), FEATURES).fit(X, y)
    rows = np.arange(len(X)) >= 100     # e.g. rows before feature warm-up are not predicted
    X_cold = X.copy()
    X_cold.iloc[:100] = np.nan
    p = bundle.predict_where(X_cold, rows)
    assert p.iloc[:100].isna().all().all()
    pd.testing.assert_frame_equal(p.iloc[100:], bundle.predict(X.iloc[100:]))
    assert bundle.predict_where(X, np.zeros(len(X), bool)).isna().all().all()


@pytest.mark.parametrize("boosting", ["gbdt", "dart"])
def test_binning_once_for_four_models_gives_the_models_of_separate_datasets(boosting):
    X, labels = dataset(1500, 21)
    known = labels.iloc[:-5]                  # every label known: the four models share one binned Dataset
    model_cfg = cfg(boosting_type=boosting, n_estimators=15)
    shared = ModelBundle(model_cfg, FEATURES, seed=5).fit(X.iloc[:-5], known)
    again = ModelBundle(model_cfg, FEATURES, seed=5).fit(X.iloc[:-5], known)
    params = lgb_params(model_cfg, 5)
    for name in MODEL_NAMES:
        alone = lgb.train(params, lgb.Dataset(X.iloc[:-5][FEATURES].to_numpy(np.float64),
                                              known[name].to_numpy(np.float64), feature_name=FEATURES,
                                              params=params), num_boost_round=15)
        assert trees(shared.models[name].booster) == trees(alone), name       # relabelling is exact
        assert trees(again.models[name].booster) == trees(shared.models[name].booster), name  # deterministic


def test_probabilities_do_not_depend_on_the_prediction_thread_count():
    X, y = dataset(400, 14)
    bundle = ModelBundle(cfg(num_threads=1), FEATURES).fit(X, y)
    one_thread = bundle.predict(X)
    booster = bundle.models["dir_long"].booster
    np.testing.assert_array_equal(one_thread["p_dir_long"].to_numpy(), booster.predict(X.to_numpy(), num_threads=1))
    bundle.cfg.num_threads = 0   # LightGBM default: every core
    pd.testing.assert_frame_equal(bundle.predict(X), one_thread, check_exact=True)
    pd.testing.assert_frame_equal(bundle.predict(X.iloc[[-1]]), one_thread.iloc[[-1]], check_exact=True)


def test_psi_chance_levels_are_high_for_a_slow_feature_and_low_for_noise() -> None:
    """200 consecutive bars of a slow feature (a random walk, like a 24 h VWAP distance) fill few deciles, so its
    PSI is large with no drift; the chance level records that, and stays near 0 for a fast (i.i.d.) feature."""
    from models import psi, psi_limits, training_quantiles
    rng = np.random.default_rng(11)
    n = 36_000
    X = pd.DataFrame({"noise": rng.normal(size=n), "slow": np.cumsum(rng.normal(size=n)),
                      "steps": np.repeat(rng.normal(size=n // 60), 60)})   # a 1 h feature on 1 m bars
    q = training_quantiles(X)
    limits = psi_limits(X, q, 200)
    assert limits["noise"] < 0.3 < 2.0 < limits["steps"] and limits["slow"] > 4.0
    later = np.cumsum(rng.normal(size=200)) + X["slow"].iloc[-1]   # the same process, live: no drift
    assert 0.25 < psi(later, q["slow"]) <= limits["slow"]
    assert psi_limits(X.iloc[:1999], q, 200) == {}   # 9 blocks: too few to tell chance from drift


def test_a_saved_bundle_keeps_its_psi_chance_levels(tmp_path) -> None:
    rng = np.random.default_rng(2)
    X = pd.DataFrame({"a": rng.normal(size=600), "b": rng.normal(size=600)})
    y = pd.DataFrame({n: (rng.random(600) > 0.5).astype(int) for n in MODEL_NAMES}, index=X.index)
    bundle = ModelBundle(ModelConfig(n_estimators=5), ["a", "b"]).fit(X, y)
    bundle.psi_window, bundle.psi_limits = 50, {"a": 0.4, "b": 0.3}
    bundle.save(tmp_path)
    meta = json.loads((tmp_path / "features.json").read_text())
    assert meta["psi_window"] == 50 and meta["psi_limits"] == {"a": 0.4, "b": 0.3} and set(meta["quantiles"]) == {"a", "b"}
