"""Live bars equal data_loader's: a simulated day replayed message by message through the paper exchange's
per-message publish mode into the engine (real pybit WS), column for column and bit for bit; the engine's
own recording reads back into the same bars; late trades are counted, never lost."""
from __future__ import annotations


import numpy as np
import pandas as pd
import pytest

import data_loader
from live_support import START_MS, SYMBOL, engine_cmd, exchange, journal, make_market, run, live_config, \
    write_model_dir, write_probabilities


@pytest.fixture(scope="module")
def market(tmp_path_factory):
    return make_market(tmp_path_factory.mktemp("market"))


@pytest.fixture(scope="module")
def replayed(market, tmp_path_factory):
    """25 bars of the simulated day replayed message by message into a --signal-only engine."""
    cwd = tmp_path_factory.mktemp("replayed")
    model = write_model_dir(cwd)
    probs = write_probabilities(cwd / "p.csv", {})
    with exchange(market) as ex:
        rc, out = run(engine_cmd(ex.url, model, market, "--signal-only", "--probabilities", str(probs),
                                 "--max-bars", "25"), cwd)
    assert rc == 0, out[-3000:]
    return cwd


def loader_bars(folder) -> pd.DataFrame:
    cfg = live_config()
    cfg.data.data_dir, cfg.data.cache = str(folder), False
    return data_loader.load_bars(cfg)


def assert_bars_equal(signals: list[dict], want: pd.DataFrame) -> None:
    """Each journaled bar equals data_loader's row, column for column, bit for bit (NaN as null)."""
    for rec in signals:
        row = want.loc[pd.Timestamp(rec["bar_ms"], unit="ms", tz="UTC")]
        for col in data_loader.BAR_COLUMNS:
            got, exp = rec["bar"][col], row[col]
            if isinstance(exp, (float, np.floating)) and (exp != exp):
                assert got is None, (rec["bar_time"], col, got)
            elif isinstance(exp, (bool, np.bool_)):
                assert got == bool(exp), (rec["bar_time"], col)
            else:
                assert float(got) == float(exp), (rec["bar_time"], col, got, exp)


def test_bars_replayed_message_by_message_equal_data_loader(market, replayed):
    signals = journal(replayed, "signals")
    assert len(signals) == 25
    assert signals[0]["bar_ms"] == START_MS
    assert_bars_equal(signals, loader_bars(market))
    assert sum(r["bar"]["trade_count"] for r in signals) > 100


def test_the_engines_own_recording_reads_back_into_the_bars_it_built(replayed):
    """What the engine received, written by the collector's writer under data/<SYM>_Bybit, is read by
    data_loader into the same bars the engine journaled."""
    folder = replayed / "data" / f"{SYMBOL}_Bybit"
    assert {"Orderbook", "Trade"} <= {p.parent.name for p in folder.rglob("*") if p.is_file()}
    assert_bars_equal(journal(replayed, "signals"), loader_bars(folder))


def test_late_trades_are_counted_per_bar_and_never_lost(market, tmp_path):
    """Every trade push held back and delivered after the next one: those that land after their bar closed are
    counted per bar in the signals journal (and in total in the heartbeat), so each bar's trades equal
    data_loader's count once the late ones are added back."""
    import json
    model = write_model_dir(tmp_path)
    probs = write_probabilities(tmp_path / "p.csv", {})
    with exchange(market) as ex:
        ex.call(lambda: (setattr(ex.exchange.faults, "push_topic", f"publicTrade.{SYMBOL}"),
                         setattr(ex.exchange.faults, "reorder_pushes", 10 ** 9)))
        rc, out = run(engine_cmd(ex.url, model, market, "--signal-only", "--probabilities", str(probs),
                                 "--max-bars", "12"), tmp_path)
    assert rc == 0, out[-3000:]
    signals = journal(tmp_path, "signals")
    late: dict[int, int] = {}
    for rec in signals:
        for when, n in rec["late_trades"].items():
            ms = int(pd.Timestamp(when).value // 1_000_000)
            late[ms] = late.get(ms, 0) + n
    total = signals[-1]["late_trades_total"]
    assert total == sum(late.values()) > 0 and "late trade" in out
    beat = json.loads((tmp_path / "state" / f"heartbeat_{SYMBOL}.json").read_text())
    assert beat["late_trades"] >= total
    want = loader_bars(market)
    for rec in signals[:-2]:   # a bar's late trades arrive with the next trade push, before two more bars close
        expected = int(want.loc[pd.Timestamp(rec["bar_ms"], unit="ms", tz="UTC"), "trade_count"])
        assert rec["bar"]["trade_count"] + late.get(rec["bar_ms"], 0) == expected, rec["bar_time"]
