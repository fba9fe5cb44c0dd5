"""Label throughput: compiled execution labels vs the plain-Python reference loop, measured in the same run.

Run: python benchmarks/bench_labels.py [--bars 200000] [--ref-bars 20000]
Prints signal bars per second for both and their ratio (the issue asks for >= 50x). The compiled side also
drops labels crossing a data gap (`crosses_gap`, as make_labels does), so the ratio covers that pass too.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from label_reference import reference_labels  # noqa: E402
from labels import crosses_gap, execution_labels  # noqa: E402

PARAMS = dict(offset_atr=0.5, tp_atr=1.2, sl_atr=2.0, time_limit_bars=12, max_holding_bars=144,
              maker_fee=0.0002, fill_rule="trade_through", tick_size=0.01)


def synthetic_bars(n: int, seed: int = 1) -> dict[str, np.ndarray]:
    """A 5m-like random walk with ATR about two bar ranges."""
    rng = np.random.default_rng(seed)
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.002, n)))
    open_ = np.concatenate([[close[0]], close[:-1]])
    high = np.maximum(open_, close) * np.exp(np.abs(rng.normal(0, 0.001, n)))
    low = np.minimum(open_, close) * np.exp(-np.abs(rng.normal(0, 0.001, n)))
    atr = np.full(n, 100 * 0.004)
    return {"open": open_, "high": high, "low": low, "close": close, "atr": atr}


def rate(fn, n: int, repeats: int) -> float:
    """Best-of-repeats signal bars per second (the best run is the least disturbed on a shared machine)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return n / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bars", type=int, default=200_000, help="bars for the compiled labels")
    parser.add_argument("--ref-bars", type=int, default=20_000, help="bars for the Python reference")
    args = parser.parse_args()
    big, small = synthetic_bars(args.bars), synthetic_bars(args.ref_bars)
    cols = ("open", "high", "low", "close", "atr")
    no_gap = np.zeros(args.bars, bool)

    def compiled() -> None:
        for side in (1, -1):
            crosses_gap(execution_labels(*(big[c] for c in cols), side, **PARAMS)[1], no_gap)

    def reference() -> None:
        for side in (1, -1):
            reference_labels(*(small[c] for c in cols), side, **PARAMS)

    execution_labels(*(small[c] for c in cols), 1, **PARAMS)  # compile / load cache outside the timing
    same = execution_labels(*(small[c] for c in cols), -1, **PARAMS)[0].tolist() == \
        reference_labels(*(small[c] for c in cols), -1, **PARAMS)[0]
    fast = rate(compiled, 2 * args.bars, 9)
    slow = rate(reference, 2 * args.ref_bars, 3)
    print(f"labels (both sides, time_limit {PARAMS['time_limit_bars']}, hold {PARAMS['max_holding_bars']}):")
    print(f"  numba      : {fast:14,.0f} signal bars/s  ({args.bars:,} bars)")
    print(f"  pure Python: {slow:14,.0f} signal bars/s  ({args.ref_bars:,} bars)")
    print(f"  ratio      : {fast / slow:14,.1f}x  (target >= 50x); outputs identical: {same}")


if __name__ == "__main__":
    main()
