"""Seconds per Optuna trial on 30 days of 5m synthetic bars, split into LightGBM fitting and everything else.

Target: everything other than model fitting (labels, CPCV bookkeeping, prediction, path backtests) takes
under 25% of a trial. The first trial compiles the numba kernels; it is run and reported apart.

    python benchmarks/bench_train.py [--days 30] [--trials 4]
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

import optuna

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import market_sim  # noqa: E402
import train  # noqa: E402
from config import GlobalConfig  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--trials", type=int, default=4)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    with tempfile.TemporaryDirectory() as tmp:
        folder = market_sim.simulate(symbol="BENCHUSDT", days=args.days, seed=3, alpha=1.0, out=tmp,
                                     book_interval="2s", levels=50)
        cfg = GlobalConfig(symbol="BENCHUSDT")
        cfg.data.data_dir = str(folder)
        start = time.perf_counter()
        data = train.load_training_data(cfg)
        load_s = time.perf_counter() - start
        study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=1))
        study.optimize(train.make_objective(data, cfg, args.trials + 1, "bench"), n_trials=args.trials + 1)
    first, rest = study.trials[0], study.trials[1:]
    print(f"data: {args.days} days, {len(data.frame)} warm 5m bars, {len(data.features)} features "
          f"(bars + features loaded in {load_s:.1f} s); CPCV N={cfg.tune.cpcv_groups}, k={cfg.tune.cpcv_test_groups}")
    print(f"first trial (includes numba compilation): {first.user_attrs['seconds']:.2f} s, "
          f"fit {first.user_attrs['fit_seconds']:.2f} s")
    print(f"{'trial':>5} {'boosting':>8} {'rounds':>6} {'total s':>8} {'fit s':>7} {'other s':>8} {'other %':>8}")
    total = fit = 0.0
    for t in rest:
        s, f = t.user_attrs["seconds"], t.user_attrs["fit_seconds"]
        total, fit = total + s, fit + f
        print(f"{t.number:>5} {t.params['boosting_type']:>8} {t.params['n_estimators']:>6} {s:>8.2f} {f:>7.2f} "
              f"{s - f:>8.2f} {100 * (s - f) / s:>7.1f}%")
    print(f"mean seconds per trial {total / len(rest):.2f}; LightGBM fitting {fit / total:.1%}, "
          f"everything else {(total - fit) / total:.1%} (target < 25%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
