"""market_sim benchmark: generation speed vs the physical write limit, and the planted edge through the real pipeline.

Speed: generate `--days` at the default cadence (1 s book, 200 levels) and compare the generator's byte rate with
(a) writing the same bytes to disk and (b) orjson serialising the same book messages (a fast C JSON encoder).
Edge: for alpha=1 and alpha=0, load 5m bars with data_loader, compute feature_engine features, train LightGBM on
the first 60% and score the sign of the next 15/30/60 minutes on the rest (after a purge gap), and trade the top
and bottom deciles with taker (5.5 bps/side) and maker (2 bps/side) fees. alpha=1 must show an edge, alpha=0 none.

    python benchmarks/bench_market_sim.py --days 14 [--seeds 7,8,9] [--skip-edge] [--skip-speed]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import data_loader  # noqa: E402
import feature_engine  # noqa: E402
import market_sim  # noqa: E402
from config import GlobalConfig  # noqa: E402

TAKER, MAKER = 0.00055, 0.0002


def speed(days: int, out: Path) -> None:
    """Time the default cadence and compare with writing and JSON-encoding the same output."""
    market_sim.simulate_run(days=1, out=out / "warm", book_interval="60s", levels=20, progress=False)  # compile
    s = market_sim.simulate_run(days=days, out=out / "speed", progress=False)
    total = s.book_bytes + s.trade_bytes
    print(f"generate: {days} days, 1s book, 200 levels: {s.seconds:.1f} s ({s.seconds / days:.2f} s/day), "
          f"{s.trades:,} trades, {s.book_messages:,} book messages, {total / 1e6:.0f} MB "
          f"({total / 1e6 / s.seconds:.0f} MB/s)")
    book = sorted((s.folder / "Orderbook").glob("*.data"))[0]
    raw = book.read_bytes()
    t = time.perf_counter()
    (out / "copy.bin").write_bytes(raw)
    write_s = time.perf_counter() - t
    msgs = [orjson.loads(line) for line in raw.splitlines()]
    t = time.perf_counter()
    encoded = b"\n".join(orjson.dumps(m) for m in msgs)
    encode_s = time.perf_counter() - t
    gen_rate = total / s.seconds
    print(f"reference (one day's book file, {len(raw) / 1e6:.0f} MB): write {len(raw) / write_s / 1e6:.0f} MB/s, "
          f"orjson encode {len(encoded) / encode_s / 1e6:.0f} MB/s")
    print(f"ratios: generator (simulation + formatting + writing) runs at {gen_rate / (len(raw) / write_s):.2f}x "
          f"the raw write rate and {gen_rate / (len(encoded) / encode_s):.2f}x orjson's encode-only rate")


def _edge_rows(folder: Path, alpha: float) -> list[tuple[int, float, float]]:
    """(horizon bars, AUC, gross bp per decile trade) of LightGBM on the pipeline's features, per horizon."""
    import lightgbm as lgb
    from sklearn.metrics import roc_auc_score

    cfg = GlobalConfig()
    cfg.data.data_dir = str(folder)
    cfg.data.cache = False
    bars = data_loader.load_bars(cfg)
    feats = feature_engine.compute_features(bars, cfg)
    names = feature_engine.feature_names(cfg)
    mid = np.log(bars["close"])
    rows = []
    for h in (3, 6, 12):
        fwd = (mid.shift(-h) - mid).rename("fwd")
        frame = feats[names].join(fwd).iloc[288:]      # skip the first day; LightGBM takes the slow features' NaN
        frame = frame[frame["fwd"].notna()]
        cut = int(len(frame) * 0.6)
        train, test = frame.iloc[:cut], frame.iloc[cut + h:]
        model = lgb.LGBMClassifier(n_estimators=200, learning_rate=0.03, num_leaves=8, min_child_samples=50,
                                   subsample=0.8, subsample_freq=1, colsample_bytree=0.7, verbose=-1, n_jobs=1)
        model.fit(train[names], train["fwd"] > 0)
        p = model.predict_proba(test[names])[:, 1]
        auc = roc_auc_score(test["fwd"] > 0, p)
        lo, hi = np.quantile(p, [0.1, 0.9])
        trades = np.concatenate([test["fwd"][p >= hi].to_numpy(), -test["fwd"][p <= lo].to_numpy()])
        rows.append((h, auc, trades.mean() * 1e4))
    return rows


def edge(days: int, seeds: list[int], out: Path) -> None:
    """The planted edge (alpha=1) and the control (alpha=0) through data_loader + feature_engine + LightGBM."""
    for alpha in (1.0, 0.0):
        results = []
        for seed in seeds:
            folder = market_sim.simulate(days=days, seed=seed, alpha=alpha, out=out / f"a{alpha:g}_{seed}",
                                         book_interval="5s")
            results += _edge_rows(folder, alpha)
        frame = pd.DataFrame(results, columns=["h", "auc", "gross"]).groupby("h").agg(["mean", "min", "max"])
        for h, row in frame.iterrows():
            gross = row[("gross", "mean")]
            print(f"alpha={alpha:g} h={5 * h:>2}m over seeds {seeds}: AUC mean {row[('auc', 'mean')]:.3f} "
                  f"[{row[('auc', 'min')]:.3f}, {row[('auc', 'max')]:.3f}]; top/bottom-decile trade gross "
                  f"{gross:+.1f} bp [{row[('gross', 'min')]:+.1f}, {row[('gross', 'max')]:+.1f}], "
                  f"net taker {gross - 2e4 * TAKER:+.1f} bp, net maker {gross - 2e4 * MAKER:+.1f} bp "
                  f"(round trips {2e4 * TAKER:.0f} / {2e4 * MAKER:.0f} bp)", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--days", type=int, default=14)
    parser.add_argument("--seeds", default="7,8,9", help="comma-separated seeds for the edge check")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-edge", action="store_true")
    args = parser.parse_args()
    pd.set_option("display.width", 200)
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_speed:
            speed(args.days, Path(tmp))
        if not args.skip_edge:
            edge(args.days, [int(s) for s in args.seeds.split(",")], Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
