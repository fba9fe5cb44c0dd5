"""Live engine speed: bar close -> intents latency on a full feature window, and the engine's CPU share
while it follows a paper-exchange replay at real-time speed.

Latency: the engine's own `latency_ms` (bar close -> order requests: compute_features on the window,
probabilities, execution.on_bar_close) over bars closed through the real engine path, with
`live.window_bars` bars in the window; target p99 <= 50 ms. Reference measured in the same run:
compute_features alone on the same window (the floor of a full-window recompute), printed as a ratio.
CPU share: engine process CPU seconds / wall seconds over a stretch of real-time paper trading.

    python benchmarks/bench_live.py [--bars 200] [--cpu-seconds 60]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import feature_engine  # noqa: E402  (path set up above)
import live_support as ls  # noqa: E402


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def latency(market: Path, cwd: Path, bars: int) -> dict:
    """p50/p99 of the engine's bar close -> intents latency with a full window, and the reference."""
    model = ls.write_model_dir(cwd, **{"live.window_bars": "3000"})
    probs = ls.busy_probabilities(cwd / "p.csv", minutes=bars + 5, start="2026-01-03T06:00")
    with ls.exchange(market, start="2026-01-03T06:00") as ex:
        rc, out = ls.run(ls.engine_cmd(ex.url, model, market, "--probabilities", str(probs), "--max-bars",
                                       str(bars), "--set", "strategy.daily_loss_limit=0.9"), cwd, timeout=3600)
    if rc != 0:
        raise SystemExit(out[-3000:])
    lat = np.array([s["latency_ms"] for s in ls.journal(cwd, "signals")])
    cfg = ls.live_config()
    cfg.data.data_dir, cfg.data.cache = str(market), False
    import data_loader
    window = data_loader.load_bars(cfg).iloc[-3000:]
    ref = []
    for _ in range(20):
        t0 = time.perf_counter()
        feature_engine.compute_features(window, cfg)
        ref.append((time.perf_counter() - t0) * 1000)
    return {"bars": int(lat.size), "window_bars": int(len(window)), "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "features_only_p50_ms": float(np.median(ref)),
            "ratio_p50_to_features": float(np.percentile(lat, 50) / np.median(ref))}


def cpu_share(market: Path, cwd: Path, seconds: float) -> dict:
    """Engine CPU / wall while following the replay at 1x (per-message pushes, real-time clock)."""
    from paper_exchange import ExchangeThread, build_exchange
    model = ls.write_model_dir(cwd)
    probs = ls.busy_probabilities(cwd / "p.csv", start="2026-01-03T06:00")
    with ExchangeThread(build_exchange(market, start="2026-01-03T06:00", per_message=True, speed=1.0)) as ex:
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
    parser.add_argument("--cpu-seconds", type=float, default=60.0, help="wall seconds of real-time replay")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        market = ls.make_market(Path(tmp) / "market", days=3)
        (Path(tmp) / "lat").mkdir()
        (Path(tmp) / "cpu").mkdir()
        out = {"latency": latency(market, Path(tmp) / "lat", args.bars),
               "cpu": cpu_share(market, Path(tmp) / "cpu", args.cpu_seconds)}
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
