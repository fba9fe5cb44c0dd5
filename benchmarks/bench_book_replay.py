"""Book replay speed vs the physical limit: the loader's replay (parse + apply + sample + per-bar partials)
against a plain orjson.loads loop over the same file's lines, at two file sizes, each run in a fresh
process so peak memory (VmHWM) is per measurement; times are the best of 5 interleaved runs.

The file is the real Binance BTCUSDT recording (../shared/realdata/binance_usdm) synced with BinanceSync,
written in the Bybit .data schema (with pu) and repeated with shifted times and update ids.

    python benchmarks/bench_book_replay.py [--mb 60] [--keep DIR]
"""
from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
REAL = ROOT.parent / "shared" / "realdata" / "binance_usdm"
REPEATS = 5  # best of N, parse and replay interleaved, so a busy shared machine disturbs the ratio less


def recorded_messages(symbol: str = "btcusdt") -> list[dict]:
    """The recording's REST snapshot and every diff the official procedure applies, as .data messages."""
    from orderbook import BinanceSync, OrderBook
    sync = BinanceSync(OrderBook())
    out: list[dict] = []

    def delta(ev: dict) -> dict:
        return {"topic": f"orderbook.1000.{ev['s']}", "type": "delta", "ts": ev["T"],
                "data": {"s": ev["s"], "b": ev["b"], "a": ev["a"], "u": ev["u"], "seq": ev["U"], "pu": ev["pu"]},
                "cts": ev["E"]}

    for day in ("20240718", "20240719"):
        with gzip.open(REAL / f"usdm_{symbol}_{day}.gz", "rb") as fh:
            for line in fh:
                obj = orjson.loads(line.split(b" ", 1)[1])
                if "lastUpdateId" in obj:
                    sym = symbol.upper()
                    out.append({"topic": f"orderbook.1000.{sym}", "type": "snapshot", "ts": obj["T"],
                                "data": {"s": sym, "b": obj["bids"], "a": obj["asks"], "u": obj["lastUpdateId"],
                                         "seq": obj["lastUpdateId"]}, "cts": obj["E"]})
                    out.extend(delta(ev) for ev in sync.on_snapshot(obj))
                elif obj["data"].get("e") == "depthUpdate" and sync.on_diff(obj["data"]) == "applied":
                    out.append(delta(obj["data"]))
    return out


def write_file(path: Path, messages: list[dict], target_mb: float) -> int:
    """Repeat the messages with shifted ts/u until the file reaches target_mb; returns the line count."""
    t0, t1 = messages[0]["ts"], messages[-1]["ts"]
    u0, u1 = messages[0]["data"]["u"], messages[-1]["data"]["u"]
    size, lines, k = 0, 0, 0
    with open(path, "wb") as fh:
        while size < target_mb * 1e6:
            dt, du = k * (t1 - t0 + 1000), k * (u1 - u0 + 10)
            for m in messages:
                d = dict(m["data"], u=m["data"]["u"] + du, seq=m["data"]["seq"] + du)
                if "pu" in d:
                    d["pu"] = d["pu"] + du
                line = orjson.dumps(dict(m, ts=m["ts"] + dt, cts=m["cts"] + dt, data=d)) + b"\n"
                fh.write(line)
                size += len(line)
                lines += 1
            k += 1
    return lines


def _peak_rss_mb() -> float:
    """This process's peak resident memory."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _parse_only(path: str) -> int:
    """The physical limit: orjson.loads on every line of the file."""
    n = 0
    with open(path, "rb") as fh:
        for line in fh:
            orjson.loads(line)
            n += 1
    return n


def _replay(path: str) -> dict:
    """The loader's book replay with per-bar aggregation, as load_bars runs it."""
    import data_loader as dl
    import orderbook as ob
    sums = ob.BookBarSums(300_000)
    rep = dl.BookReplay("BTCUSDT", 1000, 50).run([Path(path)], on_samples=sums.add)
    bars = ob.finalize_book_bars(ob.merge_partial_book_bars(sums.take()))
    return {"messages": rep.book["messages"], "bad": rep.bad_book_lines, "slow": rep.slow_path_lines,
            "gaps": rep.book["gaps"], "samples": rep.samples, "bars": len(bars)}


def worker(kind: str, path: str, warm: str) -> dict:
    """'parse' / 'replay': one run for peak memory; 'time': both interleaved, best wall and CPU time of each."""
    if kind == "parse":
        return {"messages": _parse_only(path), "peak_mb": _peak_rss_mb()}
    _replay(warm)
    if kind == "replay":
        return dict(_replay(path), peak_mb=_peak_rss_mb())
    best = {"parse": [float("inf")] * 2, "replay": [float("inf")] * 2}
    for _ in range(REPEATS):
        for name, fn in (("parse", _parse_only), ("replay", _replay)):
            t, c = time.perf_counter(), time.process_time()
            fn(path)
            best[name] = [min(best[name][0], time.perf_counter() - t), min(best[name][1], time.process_time() - c)]
    return best


def run(kind: str, path: Path, warm: Path) -> dict:
    """Run one worker in a fresh interpreter and return its figures."""
    out = subprocess.run([sys.executable, __file__, "--worker", kind, str(path), str(warm)], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=60.0, help="size of the smaller file (the larger is 2x)")
    parser.add_argument("--keep", default="", help="folder to write the files to (default: a temp folder)")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return
    messages = recorded_messages()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.keep or tmp)
        warm = folder / "warm.data"
        write_file(warm, messages[:200], 0.01)
        print(f"{'file':>8} {'MB':>7} {'msgs':>9} | {'parse msg/s':>12} {'MB/s':>7} {'peakMB':>7} | "
              f"{'replay msg/s':>12} {'MB/s':>7} {'peakMB':>7} | ratio")
        for mult in (1, 2):
            path = folder / f"bench_{mult}x.data"
            lines = write_file(path, messages, args.mb * mult)
            mb = path.stat().st_size / 1e6
            parse, replay, times = run("parse", path, warm), run("replay", path, warm), run("time", path, warm)
            (p_wall, p_cpu), (r_wall, r_cpu) = times["parse"], times["replay"]
            print(f"{mult}x{'':>6} {mb:7.1f} {lines:9d} | {lines / p_wall:12,.0f} {mb / p_wall:7.1f} "
                  f"{parse['peak_mb']:7.0f} | {lines / r_wall:12,.0f} {mb / r_wall:7.1f} "
                  f"{replay['peak_mb']:7.0f} | {p_wall / r_wall:5.2f}  (CPU-time ratio {p_cpu / r_cpu:.2f})")
            print(f"{'':>9}replay check: {replay['messages']} messages, {replay['bad']} bad, {replay['slow']} slow-path, "
                  f"{replay['gaps']} gaps, {replay['samples']} samples, {replay['bars']} 5m bars")
            if not args.keep:
                path.unlink()


if __name__ == "__main__":
    main()
