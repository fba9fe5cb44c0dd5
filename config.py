"""PurpleSky configuration: every setting in one place, as dataclasses that round-trip to JSON.

Each field carries a `check` in its metadata; `validate()` runs them and raises `ConfigError`
naming the field. Scripts share one CLI mechanism: `add_config_args` + `config_from_args`.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

CONFIG_VERSION = 3
TIMEFRAMES: dict[str, int] = {"1m": 60, "5m": 300, "15m": 900, "1h": 3600, "4h": 14400}
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


class ConfigError(ValueError):
    """A setting is unknown or invalid; the message names the field."""


def parse_duration(text: str | float | int) -> float:
    """Seconds in a duration such as '500ms', '1s', '5m', '4h', '30d' (a bare number is seconds)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*", str(text))
    if not match:
        raise ConfigError(f"invalid duration {text!r}: expected a number with unit ms/s/m/h/d, e.g. '4h'")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2) or "s"]


def timeframe_seconds(timeframe: str) -> int:
    """Seconds per bar of a supported timeframe."""
    if timeframe not in TIMEFRAMES:
        raise ConfigError(f"unknown timeframe {timeframe!r}: expected one of {', '.join(TIMEFRAMES)}")
    return TIMEFRAMES[timeframe]


def bars_for(duration: str | float, timeframe: str) -> int:
    """Whole bars (at least 1) spanning a time window, so windows mean the same time at any timeframe."""
    return max(1, int(round(parse_duration(duration) / timeframe_seconds(timeframe))))


# ---------------------------------------------------------------- field checks
def _positive(v: Any) -> bool:
    return v > 0


def _non_negative(v: Any) -> bool:
    return v >= 0


def _probability(v: Any) -> bool:
    return 0.0 < v < 1.0


def _fraction(v: Any) -> bool:
    return 0.0 <= v <= 1.0


def _range(v: Any) -> bool:
    return len(v) == 2 and v[0] <= v[1]


def _timeframe(v: Any) -> bool:
    return v in TIMEFRAMES


def _day(v: Any) -> bool:
    """Empty, or a real UTC calendar day written YYYY-MM-DD."""
    if v == "":
        return True
    try:
        return re.fullmatch(r"\d{4}-\d{2}-\d{2}", v) is not None and bool(datetime.date.fromisoformat(v))
    except ValueError:
        return False


def _duration(v: Any) -> bool:
    try:
        return parse_duration(v) > 0
    except ConfigError:
        return False


def _durations(v: Any) -> bool:
    return all(_duration(x) for x in v)


def _timeframes(v: Any) -> bool:
    return all(x in TIMEFRAMES for x in v)


def _one_of(*choices: str) -> Callable[[Any], bool]:
    def check(v: Any) -> bool:
        return v in choices
    check.__doc__ = f"one of {', '.join(choices)}"
    return check


_CHECK_TEXT = {
    _positive: "> 0", _non_negative: ">= 0", _probability: "strictly between 0 and 1",
    _fraction: "between 0 and 1", _range: "[low, high] with low <= high",
    _day: "a UTC day YYYY-MM-DD (empty = no limit)",
    _timeframe: f"one of {', '.join(TIMEFRAMES)}", _duration: "a positive duration such as '4h'",
    _durations: "positive durations such as '4h'", _timeframes: f"timeframes among {', '.join(TIMEFRAMES)}",
}


def _f(default: Any, check: Callable[[Any], bool] | None = None, help: str = "") -> Any:
    """A dataclass field with a validity check and a help text."""
    meta = {"check": check, "help": help}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: json.loads(json.dumps(d)), metadata=meta)
    return field(default=default, metadata=meta)


class _Section:
    """Validation shared by every config section."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, prefix: str = "") -> None:
        name = prefix or type(self).__name__
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, _Section):
                value.validate(f"{name}.{f.name}")
                continue
            _check_type(f"{name}.{f.name}", value, f.default if f.default is not dataclasses.MISSING
                        else f.default_factory())  # type: ignore[misc]
            check = f.metadata.get("check")
            if check is not None and not check(value):
                expected = _CHECK_TEXT.get(check) or check.__doc__ or "a valid value"
                raise ConfigError(f"{name}.{f.name} = {value!r} is invalid: expected {expected}")
        self._cross_checks(name)

    def _cross_checks(self, name: str) -> None:
        """Constraints that involve more than one field."""


def _check_type(name: str, value: Any, default: Any) -> None:
    """Reject values whose JSON type differs from the default's (ints are accepted for floats)."""
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
    elif isinstance(default, str):
        ok = isinstance(value, str)
    elif isinstance(default, list):
        ok = isinstance(value, list)
    elif isinstance(default, dict):
        ok = isinstance(value, dict)
    else:
        ok = True
    if not ok:
        raise ConfigError(f"{name} = {value!r} has the wrong type: expected {type(default).__name__}")


# ---------------------------------------------------------------- sections
@dataclass
class DataConfig(_Section):
    # the quickstart's market (train.py --demo with its defaults), so the scripts find it without --data-dir
    data_dir: str = _f("data/DEMOUSDT_Sim_s7_a1", help="folder holding Trade/ and Orderbook/")
    timeframe: str = _f("5m", _timeframe, "base bar timeframe")
    ob_levels: int = _f(50, _positive, "order-book levels used for statistics")
    book_sample_interval: str = _f("1s", _duration, "exchange-time clock for book statistics")
    cache: bool = _f(True, help="cache bars as Parquet under <data_dir>/.cache")
    start: str = _f("", _day, "first UTC day to load (YYYY-MM-DD), empty = all")
    end: str = _f("", _day, "last UTC day to load (YYYY-MM-DD, included), empty = all")
    # 30m: a traded perpetual's book stream pushes every second or faster, so half an hour with neither a
    # trade nor a book message is a recording outage, not a quiet market. Shorter stalls (reconnects last
    # seconds to minutes) stay ordinary bars: book features carry at most features.book_ffill (15m) and are
    # unknown (not warm) beyond it, without restarting the features' multi-day warm-up as a gap does.
    gap_threshold: str = _f("30m", _duration, "a stretch this long with no trades and no book is a data gap: "
                            "its bars are marked is_gap, never warm, labelled or traded")

    def _cross_checks(self, name: str) -> None:
        if self.start and self.end and self.end < self.start:
            raise ConfigError(f"{name}.end = {self.end!r} is before {name}.start = {self.start!r}: --end must be on "
                              "or after --start (both days are included)")


@dataclass
class InstrumentConfig(_Section):
    tick_size: float = _f(0.01, _positive, "price increment")
    qty_step: float = _f(0.001, _positive, "quantity increment")
    min_qty: float = _f(0.001, _positive, "minimum order quantity")
    min_notional: float = _f(5.0, _non_negative, "minimum order value in quote currency")


@dataclass
class FeatureConfig(_Section):
    ema_spans: list = _f(["45m", "105m", "250m"], _durations, "EMA spans (named ema_9/21/50 after 5m bars)")
    atr_span: str = _f("70m", _duration, "ATR smoothing span")
    rsi_span: str = _f("70m", _duration, "RSI smoothing span")
    bb_window: str = _f("100m", _duration, "Bollinger window")
    bb_std: float = _f(2.0, _positive, "Bollinger band width in standard deviations")
    slope_lag: str = _f("25m", _duration, "lag for EMA slopes")
    z_window: str = _f("2h", _duration, "window of z-scores")
    imbalance_z_window: str = _f("80m", _duration, "window of the book-imbalance z-score")
    trend_window: str = _f("20m", _duration, "window of short trends (imbalance trend)")
    vwap_windows: list = _f(["4h", "24h"], _durations, "rolling VWAP windows")
    intraday_window: str = _f("1h", _duration, "short regime window")
    day_window: str = _f("24h", _duration, "daily regime window")
    macro_window: str = _f("3d", _duration, "macro regime window (its warm-up is the longest)")
    htf_timeframes: list = _f(["15m", "1h"], _timeframes, "higher timeframes joined without look-ahead")
    htf_span: int = _f(8, _positive, "EMA/RSI span of the higher-timeframe context, in higher-timeframe bars")
    book_ffill: str = _f("15m", _duration, "carry book stats over bars without book samples for at most this long")
    ewm_tolerance: float = _f(1e-4, _probability, "weight an EWM's start may still carry when it counts as warm")
    microstructure_only: bool = _f(False, help="drop EMA/RSI/ATR-derived inputs")

    def _cross_checks(self, name: str) -> None:
        labels = [round(parse_duration(s) / 300) for s in self.ema_spans]
        if len(set(labels)) != len(labels) or 0 in labels:
            raise ConfigError(f"{name}.ema_spans = {self.ema_spans!r}: spans must differ by at least 5m and "
                              "be >= 5m (they are named ema_<span in 5m bars>)")
        for key in ("vwap_windows", "htf_timeframes"):
            values = [parse_duration(v) for v in getattr(self, key)]
            if len(set(values)) != len(values):
                raise ConfigError(f"{name}.{key} = {getattr(self, key)!r}: entries must differ")


@dataclass
class LabelConfig(_Section):
    direction_horizon_bars: int = _f(12, _positive, "bars ahead for the direction label")
    direction_move_atr: float = _f(0.5, _positive, "move beyond ±move·ATR that counts as a direction")


@dataclass
class StrategyConfig(_Section):
    limit_offset_atr: float = _f(0.5, _non_negative, "limit entry distance from close in ATR")
    take_profit_atr: float = _f(1.2, _positive, "take-profit distance in ATR")
    stop_loss_atr: float = _f(2.0, _positive, "stop-loss distance in ATR")
    time_limit_bars: int = _f(12, _positive, "bars a resting entry lives before cancel")
    max_holding_bars: int = _f(48, _positive, "bars a position may be held before a time exit")
    exec_threshold: float = _f(0.6, _probability, "min execution-model probability for a maker entry")
    direction_threshold: float = _f(0.5, _probability, "min direction probability for a maker entry")
    aggressive_threshold: float = _f(0.87, _probability, "direction probability for a taker breakout entry")
    aggressive_tp_mult: float = _f(10.0, _positive, "breakout take-profit multiple of take_profit_atr")
    risk_per_trade: float = _f(0.01, _probability, "equity fraction lost at the stop")
    max_positions: int = _f(3, _positive, "concurrent positions plus resting entries")
    max_leverage: float = _f(5.0, _positive, "cap on total notional / equity")
    max_book_share: float = _f(0.1, _non_negative, "cap on an entry's size as a fraction of the book depth (the "
                               "data.ob_levels best levels, bar mean) on the side it takes (a market entry) or "
                               "joins (a PostOnly entry); 0 = no cap")
    daily_loss_limit: float = _f(0.03, _probability, "kill-switch: loss fraction of the day's start equity")

    def _cross_checks(self, name: str) -> None:
        if self.aggressive_threshold < self.direction_threshold:
            raise ConfigError(f"{name}.aggressive_threshold ({self.aggressive_threshold}) must be >= "
                              f"direction_threshold ({self.direction_threshold})")


@dataclass
class VenueConfig(_Section):
    """What trading costs and how orders fill: read alike by backtest, labels, paper exchange and live."""
    maker_fee: float = _f(0.0002, None, "maker fee rate (negative = rebate)")
    taker_fee: float = _f(0.00055, _non_negative, "taker fee rate")
    fill_rule: str = _f("trade_through", _one_of("trade_through", "touch"), "when a resting limit fills")
    slippage_bps: float = _f(1.0, _non_negative, "market-order slippage in basis points")
    latency_ms: float = _f(250.0, _non_negative, "signal-to-order latency")
    funding_rate_8h: float = _f(0.0, None, "funding rate charged every 8h on open notional (longs pay)")
    initial_equity: float = _f(10000.0, _positive, "starting equity in quote currency")


@dataclass
class ModelConfig(_Section):
    boosting_type: str = _f("gbdt", _one_of("gbdt", "dart"), "LightGBM boosting type")
    n_estimators: int = _f(200, _positive, "boosting rounds (the count that ships)")
    learning_rate: float = _f(0.05, _positive, "shrinkage")
    num_leaves: int = _f(16, _positive, "leaves per tree")
    max_depth: int = _f(4, None, "max tree depth (-1 = unlimited)")
    min_child_samples: int = _f(40, _positive, "min samples per leaf")
    feature_fraction: float = _f(0.5, _fraction, "column subsample per tree")
    bagging_fraction: float = _f(0.8, _fraction, "row subsample (active with bagging_freq > 0)")
    bagging_freq: int = _f(1, _non_negative, "bagging every k iterations")
    lambda_l2: float = _f(1.0, _non_negative, "L2 regularisation")
    drop_rate: float = _f(0.1, _fraction, "DART drop rate")
    skip_drop: float = _f(0.5, _fraction, "DART skip-drop probability")
    max_bin: int = _f(63, _positive, "histogram bins")
    num_threads: int = _f(1, _non_negative, "LightGBM threads (0 = all cores)")
    early_stopping_rounds: int = _f(20, _positive, "GBDT rounds without validation improvement before "
                                    "stopping (only when a validation set is given; never with DART)")

    def _cross_checks(self, name: str) -> None:
        if self.num_leaves < 2:
            raise ConfigError(f"{name}.num_leaves = {self.num_leaves} is invalid: LightGBM needs >= 2")
        if self.max_bin < 2:
            raise ConfigError(f"{name}.max_bin = {self.max_bin} is invalid: LightGBM needs >= 2")
        for field_name in ("feature_fraction", "bagging_fraction"):
            if getattr(self, field_name) <= 0.0:
                raise ConfigError(f"{name}.{field_name} = {getattr(self, field_name)} is invalid: expected > 0")


@dataclass
class TuneConfig(_Section):
    trials: int = _f(20, _positive, "Optuna trials")
    candidates: int = _f(10, _positive, "top trials qualified on OOS-1")
    n_jobs: int = _f(1, _positive, "parallel trials in this process")
    storage: str = _f("", help="Optuna storage URL (default sqlite under the model dir)")
    study_name: str = _f("", help="study name (default <SYM>_<timeframe>)")
    cpcv_groups: int = _f(6, _positive, "CPCV groups N")
    cpcv_test_groups: int = _f(2, _positive, "CPCV test groups k")
    embargo: str = _f("2h", _duration, "embargo after each test block")
    dev_fraction: float = _f(0.85, _probability, "development share of the data")
    oos1_fraction: float = _f(0.10, _probability, "OOS-1 share; Super-OOS is the rest")
    min_trades_per_day: float = _f(1.0, _non_negative,
                                   "trade rate below which a score is penalised (a strategy must be testable)")
    limit_offset_atr: list = _f([0.1, 1.5], _range, "search range")
    take_profit_atr: list = _f([0.5, 3.0], _range, "search range")
    stop_loss_atr: list = _f([0.8, 4.0], _range, "search range")
    exec_top: list = _f([0.02, 0.3], _range, "search range (log) of the top fraction of out-of-fold execution "
                        "scores that may enter as maker; stored as strategy.exec_threshold")
    direction_top: list = _f([0.02, 1.0], _range, "search range (log) of the top fraction of out-of-fold "
                             "direction scores a maker entry needs; stored as strategy.direction_threshold (down to "
                             "2 %: on planted-edge markets the maker leg lost out of sample at tops 0.3-1)")
    aggressive_top: list = _f([0.002, 0.05], _range, "search range (log) of the top fraction of out-of-fold "
                              "direction scores that enter as taker; stored as strategy.aggressive_threshold")
    aggressive_tp_mult: list = _f([1.0, 10.0], _range, "search range")
    boosting_types: list = _f(["gbdt"], help="boosting types searched (gbdt and/or dart; a dart trial takes "
                              "several times longer)")
    n_estimators: list = _f([50, 300], _range, "search range")
    learning_rate: list = _f([0.01, 0.2], _range, "search range (log)")
    num_leaves: list = _f([4, 64], _range, "search range")
    max_depth: list = _f([2, 8], _range, "search range")
    min_child_samples: list = _f([10, 200], _range, "search range")
    feature_fraction: list = _f([0.3, 1.0], _range, "search range")
    bagging_fraction: list = _f([0.5, 1.0], _range, "search range")

    def _cross_checks(self, name: str) -> None:
        if self.cpcv_test_groups >= self.cpcv_groups:
            raise ConfigError(f"{name}.cpcv_test_groups ({self.cpcv_test_groups}) must be < "
                              f"cpcv_groups ({self.cpcv_groups})")
        if self.dev_fraction + self.oos1_fraction >= 1.0:
            raise ConfigError(f"{name}.dev_fraction + oos1_fraction must leave room for Super-OOS")
        bad = [b for b in self.boosting_types if b not in ("gbdt", "dart")]
        if bad or not self.boosting_types:
            raise ConfigError(f"{name}.boosting_types = {self.boosting_types!r}: expected gbdt and/or dart")


@dataclass
class LiveSettings(_Section):
    mode: str = _f("dry-run", _one_of("dry-run", "paper", "testnet", "demo", "live"), "trading mode")
    keys_file: str = _f("keys.json", help="keys file with profiles")
    keys_profile: str = _f("default", help="profile inside the keys file")
    rest_url: str = _f("", help="REST base URL override (paper exchange)")
    ws_url: str = _f("", help="WebSocket base URL override (paper exchange)")
    position_mode: str = _f("hedge", _one_of("oneway", "hedge"),
                            "exchange position mode (hedge: a long and a short at once, DESIGN §1)")
    leverage: float = _f(0.0, _non_negative, "exchange leverage to set (0 = leave)")
    max_spread_pct: float = _f(0.002, _probability, "no new entries when spread / mid exceeds this")
    max_api_errors: int = _f(5, _positive, "consecutive API errors before pausing entries")
    window_bars: int = _f(3000, _positive, "bars kept for live features")
    reconcile_interval: str = _f("30s", _duration, "how often to reconcile with the exchange")
    heartbeat_interval: str = _f("30s", _duration, "equity/heartbeat record interval")
    ws_stale_after: str = _f("60s", _duration, "rebuild a WebSocket silent for this long")
    streams_ready_within: str = _f("15s", _duration, "startup: wait this long for every stream's subscriptions; "
                                   "then live warns (the watchdog rebuilds), lockstep refuses (pushes would be lost)")
    max_time_offset: str = _f("3s", _duration, "refuse to trade with a larger clock offset")
    drift_window: int = _f(200, _positive, "bars in the drift monitor window")
    drift_psi_alert: float = _f(0.25, _positive, "alert when a feature's PSI against training exceeds this")
    bar_close_grace: str = _f("2s", _duration, "close a bar this long after its end when no later message came")
    log_dir: str = _f("logs", help="folder for logs and journals")
    state_dir: str = _f("state", help="folder for bot state")
    demo: bool = _f(False, help="use Bybit demo trading (api-demo / stream-demo) instead of mainnet/testnet")
    request_timeout: str = _f("10s", _duration, "HTTP timeout per exchange request (then it counts as lost)")
    max_retries: int = _f(4, _positive, "attempts per exchange request on transient errors")


@dataclass
class GlobalConfig(_Section):
    version: int = _f(CONFIG_VERSION, _positive, "config schema version")
    symbol: str = _f("DEMOUSDT", help="instrument symbol")
    seed: int = _f(42, _non_negative, "master random seed")
    data: DataConfig = field(default_factory=DataConfig)
    instrument: InstrumentConfig = field(default_factory=InstrumentConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    labels: LabelConfig = field(default_factory=LabelConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    venue: VenueConfig = field(default_factory=VenueConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    live: LiveSettings = field(default_factory=LiveSettings)

    def _cross_checks(self, name: str) -> None:
        if not re.fullmatch(r"[A-Z0-9]{2,30}", self.symbol):
            raise ConfigError(f"{name}.symbol = {self.symbol!r} is invalid: expected upper-case letters/digits")
        if self.version != CONFIG_VERSION:
            raise ConfigError(f"{name}.version = {self.version}: this PurpleSky reads version {CONFIG_VERSION}")

    # ------------------------------------------------------------ JSON
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict) -> "GlobalConfig":
        """Build and validate; a version-1 dict is migrated first (see `migrate`)."""
        return _build(cls, migrate(data), "GlobalConfig")

    @classmethod
    def from_json(cls, text: str) -> "GlobalConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError("config JSON must be an object")
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "GlobalConfig":
        """Read a config file; a params.json with a 'config' key is accepted too."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON: {exc}") from None
        if isinstance(data, dict) and isinstance(data.get("config"), dict):
            data = data["config"]
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: config JSON must be an object")
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None


LEGACY_TUNE_KEYS = ("exec_threshold", "direction_threshold", "aggressive_threshold")


def migrate(data: Any) -> Any:
    """A config dict in the current layout. Version 1 kept the venue settings (fees, slippage, latency,
    funding, fill rule, initial equity) inside `strategy`; they move to `venue`. Its `live.drift_z` (a
    z-score alert) has no counterpart in the PSI drift monitor (`live.drift_psi_alert`) and is dropped.
    Older configs also searched absolute threshold ranges (`tune.exec_threshold` ...), replaced by top
    fractions (`tune.exec_top` ...): those ranges are dropped (the thresholds a model uses live in
    `strategy`). Version 2 had no `strategy.max_book_share`: its files (a trained model's params.json) are
    read with 0, no book cap, as they were validated, so a new default never changes how an old model
    trades. Returns a new dict."""
    if isinstance(data, dict) and isinstance(data.get("tune"), dict) and \
            any(k in data["tune"] for k in LEGACY_TUNE_KEYS):
        data = {**data, "tune": {k: v for k, v in data["tune"].items() if k not in LEGACY_TUNE_KEYS}}
    if isinstance(data, dict) and data.get("version") == 1:
        data = _migrate_v1(data)
    if isinstance(data, dict) and data.get("version") == 2:
        data = {**data, "version": 3, "strategy": {"max_book_share": 0.0, **(data.get("strategy") or {})}}
    return data


def _migrate_v1(data: dict) -> dict:
    """Version 1 -> 2: the venue settings move out of `strategy`; `live.drift_z` is dropped."""
    out = {**data, "version": 2}
    strategy = dict(data.get("strategy") or {})
    moved = {f.name: strategy.pop(f.name) for f in dataclasses.fields(VenueConfig) if f.name in strategy}
    if "strategy" in data:
        out["strategy"] = strategy
    if moved:
        out["venue"] = {**moved, **(data.get("venue") or {})}
    if isinstance(data.get("live"), dict):
        out["live"] = {k: v for k, v in data["live"].items() if k != "drift_z"}
    return out


def _build(cls: type, data: Any, name: str) -> Any:
    """Build a section from a dict, rejecting unknown keys and validating values."""
    if not isinstance(data, dict):
        raise ConfigError(f"{name} must be an object, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{name}: unknown key(s) {', '.join(unknown)}; known: {', '.join(fields)}")
    kwargs = {}
    for key, value in data.items():
        ftype = fields[key].default_factory if fields[key].default is dataclasses.MISSING else None
        if isinstance(ftype, type) and issubclass(ftype, _Section):
            kwargs[key] = _build(ftype, value, f"{name}.{key}")
        else:
            kwargs[key] = value
    try:
        obj = cls.__new__(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            setattr(obj, f.name, kwargs.get(f.name, default))
    except TypeError as exc:
        raise ConfigError(f"{name}: {exc}") from None
    obj.validate(name)
    return obj


def _umask() -> int:
    """The process's file-creation mask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a file so readers see the old or the new content, never a torn one (temp, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file what open() would
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------- CLI mechanism
# Flag name -> dotted config path. Scripts pick the flags they expose; all share these names.
CLI_FLAGS: dict[str, str] = {
    "--symbol": "symbol",
    "--seed": "seed",
    "--data-dir": "data.data_dir",
    "--timeframe": "data.timeframe",
    "--ob-levels": "data.ob_levels",
    "--book-interval": "data.book_sample_interval",
    "--start": "data.start",
    "--end": "data.end",
    "--trials": "tune.trials",
    "--candidates": "tune.candidates",
    "--n-jobs": "tune.n_jobs",
    "--storage": "tune.storage",
    "--study-name": "tune.study_name",
    "--fill-rule": "venue.fill_rule",
    "--mode": "live.mode",
    "--keys-file": "live.keys_file",
    "--keys-profile": "live.keys_profile",
}


def get_path(cfg: GlobalConfig, path: str) -> Any:
    obj: Any = cfg
    for part in path.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"unknown config field {path!r}")
        obj = getattr(obj, part)
    return obj


def set_path(cfg: GlobalConfig, path: str, raw: Any) -> None:
    """Set a dotted field from a CLI string (or a typed value), converting to the field's type."""
    *parents, last = path.split(".")
    obj: Any = cfg
    for part in parents:
        if not isinstance(getattr(obj, part, None), _Section):
            raise ConfigError(f"unknown config section {part!r} in {path!r}")
        obj = getattr(obj, part)
    if last not in {f.name for f in dataclasses.fields(obj)} or isinstance(getattr(obj, last), _Section):
        raise ConfigError(f"unknown config field {path!r}")
    setattr(obj, last, _coerce(path, raw, getattr(obj, last)))


def _coerce(path: str, raw: Any, current: Any) -> Any:
    if not isinstance(raw, str) or isinstance(current, str):
        return raw
    try:
        if isinstance(current, bool):
            if raw.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError(raw)
            return raw.lower() in ("1", "true", "yes", "on")
        if isinstance(current, int):
            return int(raw)
        if isinstance(current, float):
            return float(raw)
        if isinstance(current, list):
            value = json.loads(raw) if raw.strip().startswith("[") else [p.strip() for p in raw.split(",")]
            return [_num(v) for v in value]
    except ValueError:
        raise ConfigError(f"{path} = {raw!r}: expected {type(current).__name__}") from None
    return raw


def _num(v: Any) -> Any:
    if isinstance(v, str):
        for conv in (int, float):
            try:
                return conv(v)
            except ValueError:
                pass
    return v


def add_config_args(parser: argparse.ArgumentParser, flags: list[str]) -> None:
    """Register the shared flags a script exposes, plus --config FILE and --set section.field=value."""
    defaults = GlobalConfig()
    for flag in flags:
        path = CLI_FLAGS[flag]
        f_help, default = _field_help(defaults, path), get_path(defaults, path)
        shown = "" if "default" in f_help or default == "" else f" (default: {default})"
        parser.add_argument(flag, dest=_dest(flag), default=None, metavar=flag.lstrip("-").upper().replace("-", "_"),
                            help=f"{f_help}{shown}")
    parser.add_argument("--config", default=None, help="start from this config JSON (or a params.json)")
    parser.add_argument("--set", dest="set_values", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override any config field, e.g. --set strategy.take_profit_atr=1.5")


def config_from_args(args: argparse.Namespace, base: GlobalConfig | None = None) -> GlobalConfig:
    """The config a script runs with: --config (or base/defaults), then shared flags, then --set."""
    cfg = GlobalConfig.load(args.config) if getattr(args, "config", None) else (base or GlobalConfig())
    for flag, path in CLI_FLAGS.items():
        value = getattr(args, _dest(flag), None)
        if value is not None:
            set_path(cfg, path, value)
    for item in getattr(args, "set_values", []) or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected SECTION.FIELD=VALUE")
        key, value = item.split("=", 1)
        set_path(cfg, key.strip(), value.strip())
    cfg.validate("config")
    return cfg


def _dest(flag: str) -> str:
    return "cfg_" + flag.lstrip("-").replace("-", "_")


def _field_help(cfg: GlobalConfig, path: str) -> str:
    *parents, last = path.split(".")
    obj: Any = cfg
    for part in parents:
        obj = getattr(obj, part)
    for f in dataclasses.fields(obj):
        if f.name == last:
            return f.metadata.get("help", "")
    return ""
