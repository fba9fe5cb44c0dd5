"""Live engine speed: bar close -> intents latency on a full feature window, and the engine's CPU share
while it follows a paper-exchange replay at real-time speed.

Latency: the engine's own `latency_ms` (bar close -> order requests: window, compute_features, ModelBundle
probabilities, execution.on_bar_close) over bars closed through the real engine path, with
`live.window_bars` bars in the window and a real LightGBM bundle (tests/small_model.py, 300 trees a model);
target p99 <= 50 ms. With --reference DIR (another checkout, e.g. the commit before a change) the same engine
run is repeated with that tree's code on the same market and model, and the ratios reference / this tree
are printed (> 1: this tree is faster). Also compute_features alone on the same window, all rows and the
live call (last=1).
CPU share: engine process CPU seconds / wall seconds over a stretch of real-time paper trading.

    python benchmarks/bench_live.py [--bars 200] [--cpu-seconds 60] [--reference DIR]
    git worktree add /tmp/ref <commit> && nice -n 10 python benchmarks/bench_live.py --reference /tmp/ref
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import data_loader  # noqa: E402  (path set up above)
import feature_engine  # noqa: E402
import live_support as ls  # noqa: E402

START = "2026-01-03T06:00"


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def trained_model(market: Path, root: Path, window: int) -> Path:
    """A rank folder with a LightGBM bundle fitted on the market's bars before the replay starts."""
    from small_model import train_small_model
    cfg = ls.live_config(**{"live.window_bars": str(window)})
    cfg.data.data_dir, cfg.data.cache = str(market), False
    bars = data_loader.load_bars(cfg)
    folder = root / "models_v9" / ls.SYMBOL / "rank_1"
    folder.mkdir(parents=True)
    train_small_model(bars[bars.index < START], cfg, folder, rounds=300)
    return folder


def engine_latencies(tree: Path, market: Path, model: Path, cwd: Path, bars: int) -> np.ndarray:
    """latency_ms of `bars` bar closes of `tree`'s engine trading `model` on the paper exchange (lockstep)."""
    cwd.mkdir(parents=True)
    with ls.exchange(market, start=START) as ex:
        cmd = ls.engine_cmd(ex.url, model, market, "--max-bars", str(bars), "--set", "strategy.daily_loss_limit=0.9")
        cmd[1] = str(tree / "live_trading_v2.py")
        proc = subprocess.run(cmd, cwd=cwd, env={**os.environ, "PYTHONPATH": str(tree)}, capture_output=True,
                              text=True, timeout=3600, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"engine of {tree} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return np.array([s["latency_ms"] for s in ls.journal(cwd, "signals")])


def summary(lat: np.ndarray) -> dict:
    return {"bars": int(lat.size), "p50_ms": round(float(np.percentile(lat, 50)), 2),
            "p99_ms": round(float(np.percentile(lat, 99)), 2), "max_ms": round(float(lat.max()), 2)}


def latency(market: Path, root: Path, bars: int, window: int, reference: Path | None) -> dict:
    """p50/p99 of the engine's bar close -> intents latency with a full window; reference tree and ratios."""
    model = trained_model(market, root, window)
    out = {"window_bars": window, "this_tree": summary(engine_latencies(ROOT, market, model, root / "this", bars))}
    if reference is not None:
        out["reference"] = summary(engine_latencies(reference, market, model, root / "reference", bars))
        out["ratio_p50_reference_to_this"] = round(out["reference"]["p50_ms"] / out["this_tree"]["p50_ms"], 2)
        out["ratio_p99_reference_to_this"] = round(out["reference"]["p99_ms"] / out["this_tree"]["p99_ms"], 2)
    cfg = ls.live_config()
    cfg.data.data_dir, cfg.data.cache = str(market), False
    frame = data_loader.load_bars(cfg).iloc[-window:]
    for name, last in (("features_full_window_p50_ms", None), ("features_live_call_p50_ms", 1)):
        ms = []
        for _ in range(20):
            t0 = time.perf_counter()
            feature_engine.compute_features(frame, cfg, last=last)
            ms.append((time.perf_counter() - t0) * 1000)
        out[name] = round(float(np.median(ms)), 2)
    return out


def cpu_share(market: Path, cwd: Path, seconds: float) -> dict:
    """Engine CPU / wall while following the replay at 1x (per-message pushes, real-time clock)."""
    from paper_exchange import ExchangeThread, build_exchange
    model = ls.write_model_dir(cwd)
    probs = ls.busy_probabilities(cwd / "p.csv", start=START)
    with ExchangeThread(build_exchange(market, start=START, per_message=True, speed=1.0)) as ex:
        cmd = [c for c in ls.engine_cmd(ex.url, model, market, "--probabilities", str(probs)) if c != "--lockstep"]
        proc = ls.spawn(cmd, cwd)
        ls.wait_for(lambda: ls.reconciled_count(cwd) > 0, 300, "engine start")
        c0, t0 = cpu_seconds(proc.pid), time.monotonic()
        time.sleep(seconds)
        c1, t1 = cpu_seconds(proc.pid), time.monotonic()
        ls.stop(proc)
    return {"wall_s": round(t1 - t0, 1), "engine_cpu_s": round(c1 - c0, 2), "cpu_share": (c1 - c0) / (t1 - t0)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bars", type=int, default=200, help="bars closed for the latency figures")
    parser.add_argument("--window", type=int, default=3000, help="live.window_bars")
    parser.add_argument("--cpu-seconds", type=float, default=60.0, help="wall seconds of real-time replay (0: skip)")
    parser.add_argument("--reference", type=Path, default=None, help="another checkout to compare against")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        market = ls.make_market(Path(tmp) / "market", days=3)
        out = {"latency": latency(market, Path(tmp) / "lat", args.bars, args.window, args.reference)}
        if args.cpu_seconds > 0:
            (Path(tmp) / "cpu").mkdir()
            out["cpu"] = cpu_share(market, Path(tmp) / "cpu", args.cpu_seconds)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
