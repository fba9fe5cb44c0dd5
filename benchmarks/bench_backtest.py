"""Backtest speed: bars/s of the compiled core on one year of 1m bars, next to the pure-Python reference.

The reference (tests/reference_sim.py, the simulator the tests check the core against) runs on a
subset in the same process and is reported as a rate. Run: python benchmarks/bench_backtest.py
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import backtest  # noqa: E402
import strategy as st  # noqa: E402
from config import GlobalConfig  # noqa: E402
from reference_sim import reference_backtest  # noqa: E402


def market(n: int, seed: int = 7) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A 1m random walk with ATR and model-like probabilities (mostly below thresholds)."""
    rng = np.random.default_rng(seed)
    c = 100.0 * np.exp(np.cumsum(rng.normal(0, 0.001, n)))
    o = np.concatenate([[100.0], c[:-1]])
    h = np.maximum(o, c) * np.exp(np.abs(rng.normal(0, 0.0005, n)))
    lo = np.minimum(o, c) * np.exp(-np.abs(rng.normal(0, 0.0005, n)))
    idx = pd.date_range("2025-01-01", periods=n, freq="1min", tz="UTC")
    frame = pd.DataFrame({"open": o, "high": h, "low": lo, "close": c}, index=idx).round(2)
    frame["atr"] = (frame["high"] - frame["low"]).rolling(14, min_periods=1).mean()
    probs = pd.DataFrame(rng.beta(2, 3, (n, 4)), index=idx, columns=backtest.PROB_COLUMNS)
    return frame, probs


def best_of(fn, repeats: int) -> float:
    """Fastest wall time of `repeats` calls (the least disturbed by other load)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bars", type=int, default=525_600, help="bars in the core run (one year of 1m)")
    parser.add_argument("--ref-bars", type=int, default=20_000, help="bars in the reference run")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cfg = GlobalConfig()
    cfg.data.timeframe = "1m"
    frame, probs = market(args.bars)
    s = cfg.venue
    arr = [np.ascontiguousarray(frame[c].to_numpy(np.float64)) for c in ("open", "high", "low", "close", "atr")]
    p = [np.ascontiguousarray(probs[c].to_numpy(np.float64)) for c in backtest.PROB_COLUMNS]
    t = backtest._epoch_seconds(frame.index)
    ft, fo, fh, fl, fstart, fend, lat = backtest._fine_arrays(None, t, 60, s.latency_ms)
    params = st.strategy_params(cfg.strategy, cfg.instrument)
    allowed = np.ones(args.bars, dtype=np.bool_)

    def core() -> tuple:
        return backtest.simulate_core(t, *arr, *p, ft, fo, fh, fl, fstart, fend, lat, params, s.maker_fee,
                                      s.taker_fee, s.slippage_bps / 1e4, s.funding_rate_8h, False,
                                      s.initial_equity, 60.0, False, allowed)

    t0 = time.perf_counter()
    _, n_trades, *_ = core()
    warm = time.perf_counter() - t0
    core_s = best_of(core, args.repeats)
    full_s = best_of(lambda: backtest.run_backtest(frame, probs, cfg), args.repeats)
    sub_f, sub_p = frame.iloc[:args.ref_bars], probs.iloc[:args.ref_bars]
    ref_s = best_of(lambda: reference_backtest(sub_f, sub_p, cfg), 1)
    core_rate = args.bars / core_s
    full_rate = args.bars / full_s
    ref_rate = args.ref_bars / ref_s
    print(f"bars: {args.bars:,} (1m, one year) | trades: {n_trades:,} | first call incl. compile/cache load "
          f"{warm:.2f} s")
    print(f"compiled core        : {core_s:8.3f} s  {core_rate:14,.0f} bars/s")
    print(f"run_backtest (+frames, metrics): {full_s:8.3f} s  {full_rate:14,.0f} bars/s")
    print(f"pure-Python reference: {args.ref_bars:,} bars in {ref_s:.3f} s  {ref_rate:14,.0f} bars/s")
    print(f"ratio core / reference: {core_rate / ref_rate:,.0f}x   run_backtest / reference: "
          f"{full_rate / ref_rate:,.0f}x")
    print(f"target >= 1,000,000 bars/s: {'met' if core_rate >= 1e6 else 'NOT met'}; "
          f">= 100x reference: {'met' if core_rate / ref_rate >= 100 else 'NOT met'}")


if __name__ == "__main__":
    main()
