"""Dashboard refresh cost vs journal size: p50 of one refresh over a 100 MB signals journal, measured
against the cost of reading that journal once in full (what a non-incremental page pays every tick),
and against the same refresh over a 1 MB journal (the cost must not grow with the file).

Run: python benchmarks/bench_dashboard.py [--mb 100] [--small-mb 1] [--ticks 40]
A refresh = what one dcc.Interval tick does when the engine appended a bar: read the new lines of every
journal (live_dashboard.LiveStore.refresh) and rebuild the charts and tables (symbol_body).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import live_dashboard  # noqa: E402
from live_fixtures import append, equity_record, signal_record, write_live_fixture  # noqa: E402


def grow(fx, megabytes: float) -> int:
    """Append bars to the signals journal until it holds `megabytes`; returns the number of bars."""
    path, n = fx.journal("signals"), len(fx.signals)
    target = megabytes * 1e6
    with open(path, "a", encoding="utf-8") as fh:
        while path.stat().st_size < target:
            fh.write("".join(json.dumps(signal_record(i, fx.symbol, fx.mode)) + "\n" for i in range(n, n + 500)))
            fh.flush()
            n += 500
    return n


def full_read(path: Path) -> float:
    """Seconds to read and parse every line once (the physical cost of one non-incremental refresh)."""
    start = time.perf_counter()
    with open(path, "rb") as fh:
        records = [orjson.loads(line) for line in fh]
    assert records
    return time.perf_counter() - start


def refresh_p50(root: Path, fx, bars: int, ticks: int) -> tuple[float, float]:
    """(first load s, p50 of `ticks` refreshes each after one appended bar and heartbeat record)."""
    cfg = live_dashboard.DashConfig(root / "logs", root / "state", root / "models_v9")
    store = live_dashboard.LiveStore(cfg)
    start = time.perf_counter()
    live_dashboard.symbol_body(store.refresh(fx.symbol), time.time())
    first = time.perf_counter() - start
    times = []
    for i in range(bars, bars + ticks):
        append(fx.journal("signals"), [signal_record(i, fx.symbol, fx.mode)])
        append(fx.journal("equity"), [equity_record(i, fx)])
        start = time.perf_counter()
        live_dashboard.symbol_body(store.refresh(fx.symbol), time.time())
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=100.0, help="size of the big signals journal")
    parser.add_argument("--small-mb", type=float, default=1.0, help="size of the small signals journal")
    parser.add_argument("--ticks", type=int, default=40, help="refreshes timed per size")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, mb in (("small", args.small_mb), ("big", args.mb)):
            root = Path(tmp) / label
            fx = write_live_fixture(root)
            bars = grow(fx, mb)
            size = fx.journal("signals").stat().st_size / 1e6
            read = min(full_read(fx.journal("signals")) for _ in range(2))
            first, p50 = refresh_p50(root, fx, bars, args.ticks)
            results[label] = p50, size
            print(f"{label}: signals journal {size:.1f} MB ({bars} bars); one full read+parse {read * 1e3:.0f} ms; "
                  f"first load {first * 1e3:.0f} ms; refresh p50 {p50 * 1e3:.1f} ms "
                  f"= {p50 / read:.4f}x the full read")
    (big, big_mb), (small, small_mb) = results["big"], results["small"]
    print(f"refresh p50 big/small journal: {big / small:.2f}x ({big_mb:.0f} MB vs {small_mb:.1f} MB; "
          f"1.0 = cost independent of the file size)")


if __name__ == "__main__":
    main()
