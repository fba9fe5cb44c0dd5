"""Seconds per Optuna trial on 30 days of 5m synthetic bars, split into LightGBM fitting and everything else,
against a reference tree (e.g. an older commit) measured in the same run on the same data.

Each tree's default search runs the same number of trials from the same sampler seed; the first trial
compiles the numba kernels and is reported apart. The ratio printed is reference / this tree's mean seconds
per trial (> 1: this tree is faster).

    python benchmarks/bench_train.py [--days 30] [--trials 4] [--reference DIR]
    git worktree add /tmp/ref <commit> && python benchmarks/bench_train.py --reference /tmp/ref
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Runs inside a child process whose sys.path starts with the tree under test; prints one JSON line.
CHILD = """
import json, logging, sys, time, warnings
sys.path.insert(0, sys.argv[1])
import optuna, train
from config import GlobalConfig
logging.basicConfig(level=logging.WARNING)
optuna.logging.set_verbosity(optuna.logging.WARNING)
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
cfg = GlobalConfig(symbol="BENCHUSDT")
cfg.data.data_dir = sys.argv[2]
trials = int(sys.argv[3])
start = time.perf_counter()
data = train.load_training_data(cfg)
load_s = time.perf_counter() - start
study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=1))
study.optimize(train.make_objective(data, cfg, trials + 1, "bench"), n_trials=trials + 1)
print(json.dumps({"bars": len(data.frame), "features": len(data.features), "load_s": load_s,
                  "groups": [cfg.tune.cpcv_groups, cfg.tune.cpcv_test_groups],
                  "trials": [{"number": t.number, "boosting": t.params["boosting_type"],
                              "rounds": t.params["n_estimators"], "seconds": t.user_attrs["seconds"],
                              "fit": t.user_attrs["fit_seconds"]} for t in study.trials]}))
"""


def measure(tree: Path, folder: Path, trials: int) -> dict:
    """Run the default search of `tree` on `folder` in a child process and return its timings."""
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tree), str(folder), str(trials)], capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark of {tree} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def show(name: str, run: dict) -> float:
    """Print one tree's table; return its mean seconds per trial after the first."""
    first, rest = run["trials"][0], run["trials"][1:]
    print(f"\n{name}: {run['bars']} warm bars, {run['features']} features, CPCV N,k={run['groups']}; first trial "
          f"(numba compilation) {first['seconds']:.2f} s")
    print(f"{'trial':>5} {'boosting':>8} {'rounds':>6} {'total s':>8} {'fit s':>7} {'other %':>8}")
    for t in rest:
        print(f"{t['number']:>5} {t['boosting']:>8} {t['rounds']:>6} {t['seconds']:>8.2f} {t['fit']:>7.2f} "
              f"{100 * (t['seconds'] - t['fit']) / t['seconds']:>7.1f}%")
    total = sum(t["seconds"] for t in rest)
    fit = sum(t["fit"] for t in rest)
    print(f"mean seconds per trial {total / len(rest):.2f}; LightGBM fitting {fit / total:.1%}")
    return total / len(rest)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--reference", type=Path, default=None, help="another checkout to compare against")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    import market_sim
    with tempfile.TemporaryDirectory() as tmp:
        folder = market_sim.simulate(symbol="BENCHUSDT", days=args.days, seed=3, alpha=1.0, out=tmp,
                                     book_interval="2s", levels=50)
        here = measure(ROOT, folder, args.trials)
        ref = measure(args.reference, folder, args.trials) if args.reference else None
    print(f"data: {args.days} days of synthetic 5m bars")
    mine = show(f"this tree ({ROOT})", here)
    if ref is not None:
        theirs = show(f"reference ({args.reference})", ref)
        print(f"\nratio reference / this tree, seconds per trial: {theirs / mine:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
