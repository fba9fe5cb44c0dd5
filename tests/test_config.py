"""config.py: exact JSON round-trip, field-naming errors, and the shared CLI mechanism."""
from __future__ import annotations

import argparse
import json
import os
import stat

import pytest

import config
from config import (ConfigError, GlobalConfig, add_config_args, atomic_write_text, bars_for,
                    config_from_args, parse_duration)


def test_default_config_round_trips_exactly() -> None:
    cfg = GlobalConfig()
    text = cfg.to_json()
    again = GlobalConfig.from_json(text)
    assert again == cfg
    assert again.to_json() == text


def test_modified_values_round_trip_bit_for_bit(tmp_path) -> None:
    cfg = GlobalConfig(symbol="BTCUSDT")
    cfg.strategy.take_profit_atr = 0.1 + 0.2          # not representable exactly in decimal
    cfg.venue.maker_fee = -0.00025                    # rebates are allowed
    cfg.features.vwap_windows = ["3h", "36h"]
    cfg.tune.n_estimators = [77, 333]
    path = tmp_path / "cfg.json"
    cfg.save(path)
    loaded = GlobalConfig.load(path)
    assert loaded == cfg
    assert loaded.strategy.take_profit_atr == 0.1 + 0.2


def test_params_json_with_config_key_loads(tmp_path) -> None:
    cfg = GlobalConfig(symbol="ETHUSDT")
    path = tmp_path / "params.json"
    path.write_text(json.dumps({"config": cfg.to_dict(), "metrics": {"sharpe": 1.0}}))
    assert GlobalConfig.load(path) == cfg


@pytest.mark.parametrize("section,key,value,needle", [
    ("strategy", "stop_loss_atr", -1.0, "strategy.stop_loss_atr"),
    ("strategy", "limit_offset_atr", -0.5, "strategy.limit_offset_atr"),
    ("strategy", "exec_threshold", 1.0, "strategy.exec_threshold"),
    ("strategy", "direction_threshold", 0.0, "strategy.direction_threshold"),
    ("strategy", "aggressive_threshold", 1.2, "strategy.aggressive_threshold"),
    ("data", "timeframe", "7m", "data.timeframe"),
    ("data", "ob_levels", "fifty", "data.ob_levels"),
    ("data", "start", "2026-13-01", "data.start"),
    ("data", "end", "2026-02-30", "data.end"),
    ("data", "start", "2026-1-5", "data.start"),
    ("model", "boosting_type", "goss", "model.boosting_type"),
    ("venue", "fill_rule", "magic", "venue.fill_rule"),
    ("tune", "embargo", "soon", "tune.embargo"),
])
def test_invalid_values_name_the_field(section, key, value, needle) -> None:
    data = GlobalConfig().to_dict()
    data[section][key] = value
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        GlobalConfig.from_dict(data)


def test_unknown_keys_are_rejected_with_their_names() -> None:
    data = GlobalConfig().to_dict()
    data["strategy"]["take_profit"] = 1.0
    with pytest.raises(ConfigError, match="take_profit"):
        GlobalConfig.from_dict(data)
    data = GlobalConfig().to_dict()
    data["extra_section"] = {}
    with pytest.raises(ConfigError, match="extra_section"):
        GlobalConfig.from_dict(data)


def test_cross_field_rules() -> None:
    data = GlobalConfig().to_dict()
    data["strategy"]["aggressive_threshold"] = 0.4
    data["strategy"]["direction_threshold"] = 0.6
    with pytest.raises(ConfigError, match="aggressive_threshold"):
        GlobalConfig.from_dict(data)
    data = GlobalConfig().to_dict()
    data["tune"]["cpcv_test_groups"] = data["tune"]["cpcv_groups"]
    with pytest.raises(ConfigError, match="cpcv_test_groups"):
        GlobalConfig.from_dict(data)
    data = GlobalConfig().to_dict()
    data["data"].update(start="2026-01-14", end="2026-01-13")
    with pytest.raises(ConfigError, match=r"data\.end = '2026-01-13' is before .*data\.start = '2026-01-14'"):
        GlobalConfig.from_dict(data)
    data["data"]["end"] = "2026-01-14"                # one day: both ends are included
    assert GlobalConfig.from_dict(data).data.end == "2026-01-14"


def test_invalid_json_and_missing_file_are_clear(tmp_path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="bad.json"):
        GlobalConfig.load(bad)
    with pytest.raises(ConfigError, match="cannot read config"):
        GlobalConfig.load(tmp_path / "missing.json")


def test_durations_and_bar_conversion() -> None:
    assert parse_duration("500ms") == 0.5
    assert parse_duration("4h") == 14400
    assert parse_duration(90) == 90
    assert bars_for("4h", "5m") == 48
    assert bars_for("4h", "15m") == 16
    assert bars_for("1m", "1h") == 1
    with pytest.raises(ConfigError, match="duration"):
        parse_duration("four hours")
    with pytest.raises(ConfigError, match="timeframe"):
        bars_for("4h", "2m")


def _parse(argv: list[str]) -> GlobalConfig:
    parser = argparse.ArgumentParser()
    add_config_args(parser, ["--symbol", "--timeframe", "--ob-levels", "--trials"])
    return config_from_args(parser.parse_args(argv))


def test_cli_flags_and_set_overrides_apply_with_types() -> None:
    cfg = _parse(["--symbol", "BTCUSDT", "--timeframe", "15m", "--ob-levels", "200", "--trials", "7",
                  "--set", "strategy.take_profit_atr=1.5", "--set", "model.boosting_type=dart",
                  "--set", "features.vwap_windows=2h,8h"])
    assert (cfg.symbol, cfg.data.timeframe, cfg.data.ob_levels, cfg.tune.trials) == ("BTCUSDT", "15m", 200, 7)
    assert cfg.strategy.take_profit_atr == 1.5 and cfg.model.boosting_type == "dart"
    assert cfg.features.vwap_windows == ["2h", "8h"]
    untouched = GlobalConfig()
    assert cfg.strategy.stop_loss_atr == untouched.strategy.stop_loss_atr


@pytest.mark.parametrize("argv,needle", [
    (["--timeframe", "2m"], "data.timeframe"),
    (["--ob-levels", "many"], "data.ob_levels"),
    (["--set", "strategy.nope=1"], "strategy.nope"),
    (["--set", "strategy.take_profit_atr"], "SECTION.FIELD=VALUE"),
    (["--set", "strategy.stop_loss_atr=-2"], "stop_loss_atr"),
])
def test_cli_errors_name_the_field(argv, needle) -> None:
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        _parse(argv)


def test_cli_config_file_is_the_base(tmp_path) -> None:
    base = GlobalConfig(symbol="SOLUSDT")
    base.strategy.max_positions = 1
    path = tmp_path / "base.json"
    base.save(path)
    cfg = _parse(["--config", str(path), "--timeframe", "1h"])
    assert cfg.symbol == "SOLUSDT" and cfg.strategy.max_positions == 1 and cfg.data.timeframe == "1h"


def test_atomic_write_keeps_old_content_when_rename_fails(tmp_path, monkeypatch) -> None:
    target = tmp_path / "state.json"
    atomic_write_text(target, "old")

    def broken_replace(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(config.os, "replace", broken_replace)
    with pytest.raises(OSError):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["state.json"]


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_atomic_write_gives_files_the_users_umask(tmp_path, mask) -> None:
    old = os.umask(mask)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o666 & ~mask


V1_PARAMS = os.path.join(os.path.dirname(__file__), "data", "params_v1.json")


def test_version_1_params_json_written_before_venueconfig_loads_with_venue_settings_moved() -> None:
    """tests/data/params_v1.json was written by GlobalConfig of version 1 (venue settings inside strategy)."""
    with open(V1_PARAMS, encoding="utf-8") as fh:
        raw = json.load(fh)["config"]
    assert raw["version"] == 1 and raw["strategy"]["fill_rule"] == "touch" and "venue" not in raw
    cfg = GlobalConfig.load(V1_PARAMS)
    assert cfg.version == config.CONFIG_VERSION == 3
    assert cfg.strategy.max_book_share == 0.0                   # validated without the book cap: none
    assert (cfg.venue.maker_fee, cfg.venue.taker_fee, cfg.venue.fill_rule) == (-0.00025, 0.0006, "touch")
    assert (cfg.venue.slippage_bps, cfg.venue.latency_ms, cfg.venue.funding_rate_8h) == (2.5, 400.0, 0.0001)
    assert cfg.venue.initial_equity == 2500.0
    assert cfg.strategy.take_profit_atr == 1.7 and not hasattr(cfg.strategy, "maker_fee")
    assert GlobalConfig.from_json(cfg.to_json()) == cfg          # saved again as version 3


def test_a_version_2_model_keeps_trading_without_the_book_cap_it_was_validated_without() -> None:
    data = GlobalConfig().to_dict()
    data["version"] = 2
    del data["strategy"]["max_book_share"]
    assert GlobalConfig.from_dict(data).strategy.max_book_share == 0.0
    assert GlobalConfig().strategy.max_book_share == 0.1          # new models are capped
    data["strategy"]["max_book_share"] = 0.05                      # a version-2 file cannot carry it, but if so
    assert GlobalConfig.from_dict(data).strategy.max_book_share == 0.05


def test_current_version_rejects_venue_keys_inside_strategy() -> None:
    data = GlobalConfig().to_dict()
    data["strategy"]["maker_fee"] = 0.0
    with pytest.raises(ConfigError, match="maker_fee"):
        GlobalConfig.from_dict(data)


def test_absolute_threshold_search_ranges_of_older_configs_are_dropped_on_load() -> None:
    data = GlobalConfig().to_dict()
    data["tune"].update(exec_threshold=[0.3, 0.8], direction_threshold=[0.3, 0.7], aggressive_threshold=[0.55, 0.95])
    cfg = GlobalConfig.from_dict(data)
    assert cfg == GlobalConfig() and not hasattr(cfg.tune, "exec_threshold")
