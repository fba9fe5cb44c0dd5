"""Feature engine speed: the live call (compute_features(window, cfg, last=1): the last bar of a 3,000-bar
window) against the 50 ms budget and against a pandas reference measured in the same run (one rolling z-score
per model feature over the same window: the cheapest thing a naive per-column pandas engine would do), the gap
between the window's last row and the full-history value (live/research parity), and the full-history
throughput in bars per second at 5m and 1m. With --reference DIR (another checkout, e.g. the commit before a
change) that tree's compute_features is timed on the same frames, alternating call by call with this tree's so
machine load hits both alike, and its results are checked bit-equal; ratios are reference / this tree (> 1:
this tree is faster).

Bars come from market_sim files read by data_loader, exactly what training and backtests see.

    python benchmarks/bench_features.py [--days 14] [--data DIR] [--repeat 50] [--reference DIR]
    git worktree add /tmp/ref <commit> && nice -n 10 python benchmarks/bench_features.py --reference /tmp/ref
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import data_loader  # noqa: E402
import feature_engine as fe  # noqa: E402
import market_sim  # noqa: E402
from config import GlobalConfig, bars_for, set_path  # noqa: E402

BUDGET_MS = 50.0


def timings(fn, repeat: int) -> list[float]:
    """Wall times in ms of `repeat` calls (after one warm-up call)."""
    fn()
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def load_reference(tree: Path):
    """feature_engine.py of another checkout as module `feature_engine_reference` (it imports this tree's config)."""
    spec = importlib.util.spec_from_file_location("feature_engine_reference", tree / "feature_engine.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # numba's cache finds the kernels' module by name
    spec.loader.exec_module(module)
    return module


def versus(this, reference, repeat: int) -> tuple[float, float]:
    """Median ms of two calls timed alternately (so machine load hits both alike): this tree's, the reference's."""
    reference()   # compiles or loads the reference's kernels
    times: dict = {this: [], reference: []}
    for _ in range(repeat):
        for fn, out in times.items():
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times[this]), statistics.median(times[reference])


def against_reference(ref, window: pd.DataFrame, bars: pd.DataFrame, cfg: GlobalConfig, tf: str, repeat: int) -> None:
    """Print this tree against the reference tree: the live call (the window's last row; the reference computes
    the whole window, it has no `last`) and the full history, with bit-equality of what each returns."""
    live_ms, live_ref_ms = versus(lambda: fe.compute_features(window, cfg, last=1),
                                  lambda: ref.compute_features(window, cfg).iloc[[-1]], repeat)
    equal = fe.compute_features(window, cfg, last=1).equals(ref.compute_features(window, cfg).iloc[[-1]])
    print(f"[{tf}] live call, last row of the window: this tree {live_ms:.2f} ms, reference tree {live_ref_ms:.2f} ms "
          f"(medians) -> reference / this {live_ref_ms / live_ms:.2f}x; rows bit-equal: {equal}")
    full_ms, full_ref_ms = versus(lambda: fe.compute_features(bars, cfg), lambda: ref.compute_features(bars, cfg),
                                  max(3, repeat // 10))
    equal = fe.compute_features(bars, cfg).equals(ref.compute_features(bars, cfg))
    print(f"[{tf}] full history: this tree {full_ms:.2f} ms, reference tree {full_ref_ms:.2f} ms (medians) -> "
          f"reference / this {full_ref_ms / full_ms:.2f}x; frames bit-equal: {equal}")


def reference_frame(window: pd.DataFrame, n_columns: int) -> pd.DataFrame:
    """A float frame of the window's inputs with one column per model feature."""
    cols = ["close", "volume", "vol_buy", "trade_count", "dollar_val", *fe.BOOK_STATE_COLUMNS]
    frame = window[cols].astype(float)
    reps = int(np.ceil(n_columns / frame.shape[1]))
    return pd.concat([frame] * reps, axis=1).iloc[:, :n_columns]


def pandas_reference(frame: pd.DataFrame, z_bars: int) -> pd.DataFrame:
    """One rolling z-score per column, the pandas way (the reference cost)."""
    roll = frame.rolling(z_bars)
    return (frame - roll.mean()) / roll.std()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--days", type=int, default=14, help="simulated days (ignored with --data)")
    parser.add_argument("--data", default="", help="existing data folder instead of a simulated one")
    parser.add_argument("--repeat", type=int, default=50, help="timed calls per measurement")
    parser.add_argument("--window", type=int, default=3000, help="live window in bars")
    parser.add_argument("--reference", type=Path, default=None, help="another checkout to compare against")
    args = parser.parse_args()
    reference = load_reference(args.reference) if args.reference else None
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.data) if args.data else market_sim.simulate(days=args.days, seed=7, out=tmp)
        for tf in ("5m", "1m"):
            cfg = GlobalConfig()
            set_path(cfg, "data.data_dir", str(folder))
            set_path(cfg, "data.timeframe", tf)
            set_path(cfg, "data.cache", False)
            bars = data_loader.load_bars(cfg)
            n_feat = len(fe.feature_names(cfg))
            full = timings(lambda: fe.compute_features(bars, cfg), max(3, args.repeat // 10))
            rate = len(bars) / (statistics.median(full) / 1000)
            print(f"[{tf}] full history: {len(bars)} bars x {n_feat} features in {statistics.median(full):.1f} ms "
                  f"(median) = {rate:,.0f} bars/s; warm-up {fe.warmup_bars(cfg)} bars")
            if len(bars) < args.window:
                print(f"[{tf}] fewer than {args.window} bars: live-window measurement skipped")
                continue
            window = bars.iloc[-args.window:]
            live = timings(lambda: fe.compute_features(window, cfg, last=1), args.repeat)
            frame, z_bars = reference_frame(window, n_feat), bars_for(cfg.features.z_window, tf)
            ref = timings(lambda: pandas_reference(frame, z_bars), args.repeat)
            med, p95, ref_med = statistics.median(live), float(np.percentile(live, 95)), statistics.median(ref)
            names = fe.feature_names(cfg)
            last_window = fe.compute_features(window, cfg)[names].iloc[-1].to_numpy()
            last_full = fe.compute_features(bars, cfg)[names].iloc[-1].to_numpy()
            gap = np.abs(last_window - last_full) / np.maximum(1.0, np.abs(last_full))
            warm = fe.warmup_bars(cfg) <= args.window
            print(f"[{tf}] window vs full history at the last bar: max relative gap {np.nanmax(gap):.2e} "
                  f"({names[int(np.nanargmax(gap))]}); window covers the warm-up: {warm}")
            print(f"[{tf}] last bar of a {args.window}-bar window: median {med:.2f} ms, p95 {p95:.2f} ms "
                  f"= {med / BUDGET_MS:.2f}x the {BUDGET_MS:.0f} ms budget; pandas reference ({n_feat} rolling "
                  f"z-scores) {ref_med:.2f} ms -> ratio {med / ref_med:.2f}x")
            if reference is not None:
                against_reference(reference, window, bars, cfg, tf, args.repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
