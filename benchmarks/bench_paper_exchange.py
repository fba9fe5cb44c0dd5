"""Paper-exchange replay speed vs the physical limit, on one synthetic day (market_sim, 1 s book, 50 levels).

Measured in one process, same files:
  0. raw JSON:    orjson.loads of every book line + pandas read of the trade CSV (the physical floor),
  1. parse only:  data_loader.iter_book_messages + iter_trades (validated parsing, what any replay pays),
  2. book only:   (1) + orderbook.OrderBook.apply_bybit per message,
  3. exchange:    MarketReplay + MatchingEngine with resting orders on both sides and a conditional order
                  (the paper exchange's whole per-message work, without network).
Prints market-seconds replayed per wall second and each stage's time as a ratio of the raw-JSON floor.

    python benchmarks/bench_paper_exchange.py [--days 1] [--keep DIR]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=1)
    parser.add_argument("--keep", default="", help="folder to write the synthetic market into (kept)")
    args = parser.parse_args()
    import data_loader
    import market_sim
    import orjson
    import pandas as pd
    from orderbook import OrderBook
    from matching import MatchingEngine, load_instrument
    from paper_exchange import MarketReplay

    out = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_paper_"))
    folder = market_sim.simulate(days=args.days, out=out, levels=50, book_interval="1s")

    def raw_json() -> int:
        n = 0
        for path in sorted((folder / "Orderbook").glob("*.data")):
            with open(path, "rb") as fh:
                for line in fh:
                    orjson.loads(line)
                    n += 1
        return n + sum(len(pd.read_csv(path)) for path in sorted((folder / "Trade").glob("*.csv")))

    def parse_only() -> int:
        n = sum(1 for _ in data_loader.iter_book_messages(folder))
        return n + sum(len(c) for c in data_loader.iter_trades(folder))

    def book_only() -> int:
        book = OrderBook()
        n = 0
        for msg in data_loader.iter_book_messages(folder):
            book.apply_bybit(msg)
            n += 1
        return n + sum(len(c) for c in data_loader.iter_trades(folder))

    def exchange() -> tuple[int, int]:
        engine = MatchingEngine(load_instrument(folder, "DEMOUSDT"), balance=1e9)
        replay = MarketReplay(engine, data_loader.iter_book_messages(folder),
                              data_loader.iter_trades(folder))
        bid, ask = engine.best()
        mid = engine.inst.px((bid + ask) // 2)
        for k in range(1, 11):
            for side, px in (("Buy", mid * (1 - 0.002 * k)), ("Sell", mid * (1 + 0.002 * k))):
                engine.place_order({"category": "linear", "symbol": "DEMOUSDT", "side": side, "orderType": "Limit",
                                    "qty": "0.1", "price": f"{px:.2f}"})
        engine.place_order({"category": "linear", "symbol": "DEMOUSDT", "side": "Buy", "orderType": "Market",
                            "qty": "0.1", "triggerPrice": f"{mid * 1.05:.2f}", "triggerDirection": 1})
        replay.advance(args.days * 86400 + 60)
        engine.drain()
        return replay.book_updates, len(engine.executions)

    exchange()  # warm numba caches and imports, so the timed runs compare steady-state work
    t_raw, _ = timed(raw_json)
    t_parse, n_parse = timed(parse_only)
    t_book, _ = timed(book_only)
    t_ex, (updates, fills) = timed(exchange)
    market_s = args.days * 86400
    print(f"synthetic market: {args.days} day(s), {n_parse:,} messages+trades in {folder}")
    print(f"raw JSON     {t_raw:7.2f} s   {n_parse / t_raw:12,.0f} msg/s   1.00x")
    print(f"parse only   {t_parse:7.2f} s   {n_parse / t_parse:12,.0f} msg/s   {t_parse / t_raw:.2f}x raw")
    print(f"book only    {t_book:7.2f} s   {n_parse / t_book:12,.0f} msg/s   {t_book / t_raw:.2f}x raw")
    print(f"exchange     {t_ex:7.2f} s   {n_parse / t_ex:12,.0f} msg/s   {t_ex / t_raw:.2f}x raw   "
          f"{market_s / t_ex:,.0f} market-s per wall-s ({updates:,} book updates, {fills} fills)")


if __name__ == "__main__":
    main()
