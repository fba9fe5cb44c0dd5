"""Live bars equal data_loader's: a simulated day replayed message by message through the paper exchange's
per-message publish mode into the engine (real pybit WS), column for column and bit for bit."""
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


def test_bars_replayed_message_by_message_equal_data_loader(market, tmp_path):
    model = write_model_dir(tmp_path)
    probs = write_probabilities(tmp_path / "p.csv", {})
    with exchange(market) as ex:
        rc, out = run(engine_cmd(ex.url, model, market, "--signal-only", "--probabilities", str(probs),
                                 "--max-bars", "25"), tmp_path)
    assert rc == 0, out[-3000:]
    signals = journal(tmp_path, "signals")
    assert len(signals) == 25
    cfg = live_config()
    cfg.data.data_dir = str(market)
    cfg.data.cache = False
    want = data_loader.load_bars(cfg)
    assert signals[0]["bar_ms"] == START_MS
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
    assert sum(r["bar"]["trade_count"] for r in signals) > 100
