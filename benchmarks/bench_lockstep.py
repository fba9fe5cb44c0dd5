"""Lockstep replay speed: wall ms per 1m bar of `paper_exchange.py --lockstep` driving `live_trading_v2.py
--paper --lockstep` (real pybit, real WebSocket, two processes), the path parity.py runs.

One simulated market (market_sim, `--levels` book levels every `--book-interval`) and one small model trained on
its first day (tests/small_model.py; thresholds at quantiles of its probabilities so it trades), then the
engine replays `--bars` bars of the second day. With --reference DIR (another checkout) the same run is
repeated with that tree's scripts, and the ratio reference / this tree is printed (> 1: this tree is faster).
Time per bar: from the engine's startup reconciliation to its last bar (start-up excluded). Each tree first
replays a few bars untimed (a fresh checkout compiles its numba kernels then, not inside a timed run); with
--repeat N the trees take turns N times and the medians are compared (a shared machine's speed drifts).

    python benchmarks/bench_lockstep.py [--bars 300] [--levels 50] [--book-interval 1s] [--repeat 3] [--reference DIR]
    git worktree add /tmp/ref <commit> && python benchmarks/bench_lockstep.py --reference /tmp/ref
"""
from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})")


def build(out: Path, levels: int, book_interval: str) -> tuple[Path, Path, list[str]]:
    """(market folder, model folder, --set arguments) for a 2-day market and a model trained on day 1."""
    import pandas as pd
    import data_loader
    import feature_engine
    import market_sim
    from live_support import SYMBOL, live_config
    from small_model import train_small_model
    folder = market_sim.simulate_run(symbol=SYMBOL, days=2, seed=5, out=out, book_interval=book_interval,
                                     levels=levels, progress=False).folder
    cfg = live_config()
    cfg.data.data_dir, cfg.data.ob_levels = str(folder), min(levels, cfg.data.ob_levels)
    bars = data_loader.load_bars(cfg)
    model = out / "models_v9" / SYMBOL / "rank_1"
    day2 = pd.Timestamp("2026-01-02", tz="UTC")
    bundle = train_small_model(bars.loc[bars.index < day2], cfg, model)
    feats = feature_engine.compute_features(bars, cfg)
    probs = bundle.predict_where(feats[bundle.feature_names], feats["is_warm"].to_numpy(bool)).loc[day2:]
    p_exec, p_dir = probs.filter(like="p_exec").stack(), probs.filter(like="p_dir").stack()
    sets = {"strategy.exec_threshold": p_exec.quantile(0.5), "strategy.direction_threshold": p_dir.quantile(0.3),
            "strategy.aggressive_threshold": p_dir.quantile(0.7), "strategy.max_holding_bars": 2,
            "strategy.time_limit_bars": 2, "strategy.max_positions": 1, "strategy.daily_loss_limit": 0.9,
            "strategy.risk_per_trade": 0.00002, "live.window_bars": 1, "venue.latency_ms": 0,
            "data.ob_levels": cfg.data.ob_levels}
    return folder, model, sum((["--set", f"{k}={v}"] for k, v in sets.items()), [])


def stamp(log: str, pattern: str) -> datetime:
    """Time of the first log line containing `pattern`."""
    for line in log.splitlines():
        if pattern in line and (m := STAMP.match(line)):
            return datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f")
    raise RuntimeError(f"no log line with {pattern!r}:\n{log[-2000:]}")


def replay(tree: Path, folder: Path, model: Path, sets: list[str], bars: int) -> float:
    """Wall ms per bar of one lockstep replay with the scripts of `tree`."""
    from live_support import SYMBOL
    config = ["--config", str(model / "params.json"), *sets]
    with tempfile.TemporaryDirectory(prefix="bench_lockstep_") as work:
        log_path = Path(work) / "exchange.log"   # a file, not a pipe: a day's fills fill a pipe and block it
        with open(log_path, "w") as log_file:
            exchange = subprocess.Popen([sys.executable, str(tree / "paper_exchange.py"), "--data-dir",
                                         str(folder), "--start", "2026-01-02", "--lockstep", "--port", "0", *config],
                                        cwd=work, stdout=log_file, stderr=subprocess.STDOUT, text=True)
        try:
            url = ""
            while not url and exchange.poll() is None:
                time.sleep(0.1)
                url = m.group(1) if (m := re.search(r"listening on (http://127\.0\.0\.1:\d+)",
                                                    log_path.read_text())) else ""
            if not url:
                raise RuntimeError(f"{tree}: paper exchange did not start:\n{log_path.read_text()[-2000:]}")
            engine = subprocess.run([sys.executable, str(tree / "live_trading_v2.py"), "--symbol", SYMBOL,
                                     "--paper", url, "--lockstep", "--model-dir", str(model), "--data-dir",
                                     str(folder), "--log-features", "--max-bars", str(bars), *config],
                                    cwd=work, capture_output=True, text=True, timeout=3600)
        finally:
            exchange.terminate()
            exchange.wait(30)
    if engine.returncode != 0:
        raise RuntimeError(f"{tree}: engine exited with {engine.returncode}:\n{engine.stderr[-3000:]}")
    log = engine.stdout + engine.stderr
    began, ended = stamp(log, "reconciled: startup"), stamp(log, f"--max-bars {bars} reached")
    return (ended - began).total_seconds() * 1000.0 / bars


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bars", type=int, default=300)
    parser.add_argument("--levels", type=int, default=50)
    parser.add_argument("--book-interval", default="1s")
    parser.add_argument("--repeat", type=int, default=1, help="timed runs per tree, taken in turns")
    parser.add_argument("--reference", default="", help="another checkout to time the same way")
    args = parser.parse_args()
    if args.repeat < 1 or args.bars < 1:
        parser.error(f"--repeat and --bars need at least 1, got {args.repeat} and {args.bars}")
    if args.reference and not (Path(args.reference) / "live_trading_v2.py").is_file():
        parser.error(f"--reference {args.reference}: no checkout there (live_trading_v2.py is missing)")
    trees = [ROOT] + ([Path(args.reference).resolve()] if args.reference else [])
    with tempfile.TemporaryDirectory(prefix="bench_lockstep_market_") as tmp:
        folder, model, sets = build(Path(tmp), args.levels, args.book_interval)
        for tree in trees:
            replay(tree, folder, model, sets, 5)
        runs: dict[Path, list[float]] = {tree: [] for tree in trees}
        for _ in range(args.repeat):
            for tree in trees:
                runs[tree].append(replay(tree, folder, model, sets, args.bars))
        mine = statistics.median(runs[ROOT])
        print(f"this tree: {mine:.1f} ms a bar (median of {', '.join(f'{x:.1f}' for x in runs[ROOT])}; "
              f"{args.bars} 1m bars, book {args.levels} levels every {args.book_interval}; a day of 1m bars: "
              f"{mine * 1440 / 1000:.0f} s)")
        if args.reference:
            ref = statistics.median(runs[trees[1]])
            print(f"reference {args.reference}: {ref:.1f} ms a bar (median of "
                  f"{', '.join(f'{x:.1f}' for x in runs[trees[1]])}); ratio reference / this tree {ref / mine:.2f}")


if __name__ == "__main__":
    main()
